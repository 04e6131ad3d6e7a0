"""Resolution types, aspect buckets, crops and the too-small-dataset message, with hand-worked numbers."""

from pathlib import Path

import pytest

from tunegraph.trainer.data.backends import DatasetSpec
from tunegraph.trainer.data.buckets import align, bucket_size, plan_image, too_large, too_small
from tunegraph.trainer.data.sizing import check_dataset_size, repeats_needed, usable_samples
from tunegraph.trainer.errors import DatasetError


def spec(**kw):
    return DatasetSpec(id="ds", instance_data_dir=Path("."), **kw)


def test_align_rounds_half_up_to_64_and_never_below_64():
    assert [align(v) for v in (0, 31, 32, 95, 96, 1000, 1254.1)] == [64, 64, 64, 64, 128, 1024, 1280]


def test_pixel_area_resolution_is_an_edge_whose_square_is_the_area():
    s = spec(resolution=1024, resolution_type="pixel_area")
    assert bucket_size(1.0, s) == (1024, 1024)
    # aspect 1.5: 1024*sqrt(1.5) = 1254.1 -> 1280; 1024/sqrt(1.5) = 836.1 -> 832
    assert bucket_size(1.5, s) == (1280, 832)
    # aspect 0.75: 1024*0.866 = 886.8 -> 896 (13.86 -> 14); 1024/0.866 = 1182.4 -> 1152 (18.47 -> 18)
    assert bucket_size(0.75, s) == (896, 1152)


def test_area_resolution_is_megapixels():
    # 1.0 MP: sqrt(1e6) = 1000 -> 1024 edge; 0.25 MP -> 500 -> 512
    assert bucket_size(1.0, spec(resolution=1.0, resolution_type="area")) == (1024, 1024)
    assert bucket_size(1.0, spec(resolution=0.25, resolution_type="area")) == (512, 512)


def test_pixel_resolution_is_the_shorter_edge():
    s = spec(resolution=512, resolution_type="pixel")
    assert bucket_size(0.75, s) == (512, 704)  # 512/0.75 = 682.7 -> 704
    assert bucket_size(2.0, s) == (1024, 512)


def test_minimum_and_maximum_size_use_the_resolution_unit():
    assert too_small((500, 2000), spec(resolution_type="pixel", minimum_image_size=512))  # shorter edge 500
    # pixel_area compares areas: 500 x 2000 = 1e6 >= 512^2
    assert not too_small((500, 2000), spec(resolution_type="pixel_area", minimum_image_size=512))
    assert too_small((1000, 1000), spec(resolution_type="area", minimum_image_size=1.05))  # 1.0 MP < 1.05
    assert not too_small((1, 1), spec(minimum_image_size=None))
    assert too_large((600, 100), spec(resolution_type="pixel", maximum_image_size=512))  # either edge
    assert not too_large((600, 100), spec(resolution_type="pixel_area", maximum_image_size=512))  # area 6e4


def test_square_center_crop_resizes_to_cover_then_cuts_the_middle():
    s = spec(resolution=64, crop=True, crop_aspect="square", crop_style="center")
    p = plan_image((200, 100), s, seed=0, content_hash="h")
    # cover 64x64: scale max(64/200, 64/100) = 0.64 -> 128x64; center box x = (128-64)//2 = 32
    assert p.resize == (128, 64) and p.box == (32, 0, 96, 64) and p.bucket == "64x64"
    corner = plan_image((200, 100), spec(resolution=64, crop=True, crop_style="corner"), 0, "h")
    assert corner.box == (0, 0, 64, 64)


def test_random_crop_is_fixed_by_seed_and_image():
    s = spec(resolution=64, crop=True, crop_style="random")
    boxes = {plan_image((1000, 100), s, seed, h).box for seed in range(4) for h in ("a", "b")}
    assert plan_image((1000, 100), s, 1, "a") == plan_image((1000, 100), s, 1, "a")
    assert len(boxes) > 4  # 640x64 leaves 577 positions; 8 (seed, image) pairs land on different ones
    assert all(b[1] == 0 and b[2] - b[0] == 64 and 0 <= b[0] <= 576 for b in boxes)


def test_preserve_crop_keeps_the_aspect_bucket():
    s = spec(resolution=128, crop=True, crop_aspect="preserve", crop_style="center")
    p = plan_image((300, 100), s, 0, "h")
    # aspect 3: 128*1.732 = 221.7 -> 192; 128/1.732 = 73.9 -> 64; cover: max(192/300, 64/100) = 0.64 -> 192x64
    assert p.bucket == "192x64" and p.resize == (192, 64) and p.box == (0, 0, 192, 64)


def test_no_crop_resizes_straight_to_the_bucket():
    p = plan_image((300, 100), spec(resolution=128, crop=False), 0, "h")
    assert p.resize == (192, 64) and p.box == (0, 0, 192, 64)


def test_aspect_bucket_rounding_decides_the_bucket():
    # 1100x1000 is aspect 1.1; rounded to 0 decimals it is 1.0, a square bucket
    assert plan_image((1100, 1000), spec(aspect_bucket_rounding=0), 0, "h").bucket == "1024x1024"
    # 1.1: 1024*1.0488 = 1073.98 -> 1088; 1024/1.0488 = 976.4 -> 960
    assert plan_image((1100, 1000), spec(aspect_bucket_rounding=2), 0, "h").bucket == "1088x960"


def test_closest_crop_aspect_picks_nearest_listed_aspect():
    s = spec(
        resolution=128, crop=True, crop_aspect="closest", crop_aspect_buckets=(1.0, 2.0), crop_style="center"
    )
    # 2.9 is closest to 2.0: 128*1.414 = 181 -> 192; 128/1.414 = 90.5 -> 64
    assert plan_image((290, 100), s, 0, "h").bucket == "192x64"
    assert plan_image((110, 100), s, 0, "h").bucket == "128x128"


def test_target_downsample_size_resizes_large_images_before_cropping():
    s = spec(resolution=64, crop=True, crop_style="center", maximum_image_size=128, target_downsample_size=96)
    # 400x200: sqrt(area) 282.8 > 128 -> scale to area 96^2: factor 96/282.84 = 0.3394 -> 135.8x67.9
    # it still covers 64x64, so it is kept: resize (136, 68), center box (36, 2)
    p = plan_image((400, 200), s, 0, "h")
    assert p.resize == (136, 68) and p.box == (36, 2, 100, 66)
    small = plan_image((120, 60), s, 0, "h")  # not over the maximum: plain cover resize
    assert small.resize == (128, 64)


def test_usable_samples_drop_buckets_that_cannot_fill_a_batch():
    counts = {"64x64": 5, "128x64": 1}
    assert usable_samples(counts, repeats=0, batch_size=2) == 4  # 5 -> 4, 1 -> 0
    assert usable_samples(counts, repeats=1, batch_size=2) == 12  # 10 + 2
    assert repeats_needed(counts, batch_size=4, need=16) == 3  # r=3: 20//4*4 + 4//4*4 = 24


def test_too_small_dataset_message_names_dataset_counts_and_repeats_fix():
    with pytest.raises(DatasetError) as e:
        check_dataset_size("subject", {"64x64": 3, "64x128": 1}, 0, 2, 8, "mdb.json")
    msg = str(e.value)
    assert "mdb.json" in msg and "'subject'" in msg and "4 images" in msg
    assert "2 usable samples" in msg and "needs 16" in msg  # 3 -> one batch of 2, 1 -> none
    assert "64x128 (1 samples)" in msg and "dropped" in msg
    # r=2: 9 -> 8 and 3 -> 2 give 10 < 16; r=3: 12 + 4 = 16
    assert 'Raise "repeats" to 3 or more' in msg


def test_big_enough_dataset_passes_exactly_at_the_boundary():
    # 8 images fill batch 2 x accumulation 4 = 8 exactly: no error (returns None) ...
    assert check_dataset_size("ok", {"64x64": 8}, 0, 2, 4, "m") is None
    assert usable_samples({"64x64": 8}, 0, 2) == 8
    # ... and one image fewer is the too-small error
    with pytest.raises(DatasetError, match="7 usable samples"):
        check_dataset_size("ok", {"64x64": 7}, 0, 1, 8, "m")
