"""Is a dataset big enough to train on? Said plainly, instead of SimpleTuner's "no images detected".

A batch holds samples of one bucket only, so a bucket's samples (images x (repeats + 1)) that do not
fill a whole train_batch_size batch are dropped each epoch, as SimpleTuner drops them.
"""

from __future__ import annotations

from ..errors import DatasetError


def usable_samples(
    bucket_counts: dict[str, int], repeats: int, batch_size: int, keep_small: bool = False
) -> int:
    """Samples per epoch that land in full batches (`keep_small`: disable_bucket_pruning fills a
    bucket smaller than one batch up to one batch)."""
    return sum(
        batch_size
        if keep_small and n * (repeats + 1) < batch_size
        else n * (repeats + 1) // batch_size * batch_size
        for n in bucket_counts.values()
    )


def repeats_needed(bucket_counts: dict[str, int], batch_size: int, need: int) -> int:
    """Smallest `repeats` giving at least `need` usable samples."""
    repeats = 0
    while usable_samples(bucket_counts, repeats, batch_size) < need:
        repeats += 1
    return repeats


def check_dataset_size(
    dataset_id: str,
    bucket_counts: dict[str, int],
    repeats: int,
    batch_size: int,
    grad_accum: int,
    source: str,
    keep_small: bool = False,
) -> None:
    """Raise DatasetError when the dataset cannot fill train_batch_size x gradient_accumulation_steps."""
    need = batch_size * grad_accum
    usable = usable_samples(bucket_counts, repeats, batch_size, keep_small)
    if usable >= need:
        return
    images = sum(bucket_counts.values())
    small = [
        f"{b} ({n * (repeats + 1)} samples)"
        for b, n in sorted(bucket_counts.items())
        if n * (repeats + 1) < batch_size
    ]
    dropped = (
        f" Buckets smaller than one batch cannot form a batch and are dropped: {', '.join(small)}."
        if small
        else ""
    )
    fix = repeats_needed(bucket_counts, batch_size, need)
    raise DatasetError(
        f"{source}: dataset '{dataset_id}' is too small: {images} images x (repeats {repeats} + 1) give {usable} "
        f"usable samples, but train_batch_size {batch_size} x gradient_accumulation_steps {grad_accum} needs "
        f'{need}.{dropped} Raise "repeats" to {fix} or more for this dataset (or lower train_batch_size / '
        "gradient_accumulation_steps)."
    )
