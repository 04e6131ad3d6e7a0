"""ComfyUI's own side of the text-encoder tests, run in a child process (ComfyUI sets global state).

    python -m comfy_text_reference tokenize <comfyui> <prompts.json> <out.json>
    python -m comfy_text_reference save <comfyui> <job.json> <out_dir>
    python -m comfy_text_reference shapes <comfyui> <out.json>

`tokenize`: the ids ComfyUI's own tokenizer classes give (SDTokenizer for CLIP-L, SDXLClipGTokenizer,
T5XXLTokenizer) for each prompt; Llama's from the `tokenizers` library over ComfyUI's tokenizer.json
(ComfyUI's LLAMA3Tokenizer wraps LlamaTokenizerFast, which gives wrong ids under transformers 5).

`save`: ComfyUI text-encoder files made by ComfyUI's CLIPSave node from ComfyUI's own text-encoder
modules (HiDream's, which hold CLIP-L, CLIP-G, T5-XXL and Llama) filled with given weights, in each
format: fp32, bf16, fp16, fp8 (every tensor float8, as ComfyUI's fp8 weight dtype stores it) and
scaled fp8 (ComfyUI's scaled_fp8 ops, weights quantised by their own `set_weight`). For each file it
also writes ComfyUI's forward on given token ids (CLIP, Llama) and ComfyUI's dequantised weights.

Two tiny-model adjustments, both outside the saved names: ComfyUI fixes some embedding sizes (CLIP's
49408-token vocabulary, T5's 32 relative-position buckets), so those embeddings are swapped for ones
of the tiny sizes (T5's forward then is not ComfyUI's, so it is not used as a reference); ComfyUI's Llama fixes head_dim 128 as a class attribute, set to
the tiny model's here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from child.comfy_start import start_comfy

FORMATS = ("fp32", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2", "scaled_fp8")


def tokenize(comfy_dir: str, prompts_path: str, out_path: str) -> None:
    from comfy import sd1_clip, sdxl_clip
    from comfy.text_encoders.flux import T5XXLTokenizer
    from tokenizers import Tokenizer

    prompts = json.loads(Path(prompts_path).read_text())
    clip_l, clip_g = sd1_clip.SDTokenizer(), sdxl_clip.SDXLClipGTokenizer()
    t5 = T5XXLTokenizer()  # pads to 256 with 0, as Flux in ComfyUI
    llama = Tokenizer.from_file(os.path.join(comfy_dir, "comfy/text_encoders/llama_tokenizer/tokenizer.json"))

    def ids(tok, prompt):
        return [t for t, _ in tok.tokenize_with_weights(prompt)[0]]

    out = {
        "clip_l": [ids(clip_l, p) for p in prompts],
        "clip_g": [ids(clip_g, p) for p in prompts],
        "t5": [ids(t5, p) for p in prompts],
        "llama": [llama.encode(p).ids for p in prompts],
    }
    Path(out_path).write_text(json.dumps(out))


# -- files --------------------------------------------------------------------------------------------


def comfy_encoder(kind: str, fmt: str, config: dict):
    """A comfy.sd.CLIP over HiDream's text-encoder module holding only `kind`, in format `fmt`."""
    import comfy.sd
    import comfy.text_encoders.hidream as hidream
    import comfy.text_encoders.llama as llama
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(fmt)
    dtype = dtype or (torch.float8_e5m2 if fmt == "fp8_e5m2" else torch.float8_e4m3fn)
    options: dict = {"dtype": torch.float32 if fmt == "scaled_fp8" else dtype}
    if fmt == "scaled_fp8":
        options["scaled_fp8"] = torch.float8_e4m3fn
    # CLIP-G goes in the CLIP-L slot: the same ComfyUI class and names, and SDXLClipG's penultimate-
    # layer default cannot be built with the tiny CLIP-G's one layer.
    kind = "clip_l" if kind == "clip_g" else kind
    name = {"clip_l": "clip_l", "t5": "t5xxl", "llama": "llama"}[kind]
    if kind == "llama":
        llama.Llama2Config.head_dim = config.pop("head_dim")
        options["vocab_size"] = config["vocab_size"]
    options[f"{name}_model_config"] = config

    class Target:
        params: dict = {}
        clip = hidream.hidream_clip(
            clip_l=kind == "clip_l", clip_g=False, t5=kind == "t5", llama=kind == "llama",
            dtype_t5=options["dtype"], dtype_llama=options["dtype"],
        )  # fmt: skip
        tokenizer = hidream.HiDreamTokenizer

    clip = comfy.sd.CLIP(Target, model_options=options)
    return clip, getattr(clip.cond_stage_model, name)


def fill(encoder, kind: str, weights: dict, fmt: str) -> None:
    """Load `weights` (transformers names) into ComfyUI's module; scaled fp8 quantised by ComfyUI."""
    import torch

    modules = dict(encoder.transformer.named_modules())
    for name, t in encoder.transformer.state_dict().items():
        owner = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
        if name in weights and weights[name].shape != t.shape and isinstance(owner, torch.nn.Embedding):
            # a size ComfyUI fixes (CLIP's vocabulary, T5's 32 buckets): the tiny one's, same name
            owner.weight = torch.nn.Parameter(
                torch.empty(weights[name].shape, dtype=t.dtype), requires_grad=False
            )
            owner.num_embeddings = weights[name].shape[0]
    missing, unexpected = encoder.transformer.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not m.endswith(("scale_weight", "scale_input", "scaled_fp8"))]
    assert not missing and not unexpected, (missing, unexpected)
    if fmt != "scaled_fp8":
        return
    for name, module in encoder.transformer.named_modules():
        if hasattr(module, "scale_weight") and hasattr(module, "set_weight"):
            w = weights[f"{name}.weight"].float()
            module.scale_weight.data.fill_(float(w.abs().max()) / 448.0)
            module.set_weight(w, inplace_update=True, seed=0)


def comfy_forward(encoder, kind: str, ids):
    """ComfyUI's own forward (fp32 compute): {name: tensor} to compare with transformers'."""
    import torch

    with torch.no_grad():
        if kind.startswith("clip"):
            x, _, projected, pooled = encoder.transformer(ids, dtype=torch.float32)
            return {"last_hidden_state": x, "pooled": pooled, "projected": projected}
        if kind == "llama":
            x, _ = encoder.transformer(ids, dtype=torch.float32)
            return {"last_hidden_state": x}
    return {}


def dequantised(encoder) -> dict:
    """Every weight as ComfyUI computes with it (scaled fp8: `convert_weight`), in fp32."""
    out = {}
    modules = dict(encoder.transformer.named_modules())
    for name, t in encoder.transformer.state_dict().items():
        if name.endswith(("scale_weight", "scale_input")) or name == "scaled_fp8":
            continue
        owner = modules.get(name.rsplit(".", 1)[0])
        if name.endswith(".weight") and hasattr(owner, "scale_weight"):
            out[name] = owner.convert_weight(t).float()
        else:
            out[name] = t.float()
    return out


def save(comfy_dir: str, job_path: str, out_dir: str) -> None:
    import folder_paths
    import torch
    from comfy_extras.nodes_model_merging import CLIPSave
    from safetensors.torch import load_file, save_file

    job = json.loads(Path(job_path).read_text())
    out = Path(out_dir)
    folder_paths.set_output_directory(str(out))
    for entry in job["encoders"]:
        weights = load_file(entry["weights"])
        ids = torch.tensor(entry["ids"])
        for fmt in entry.get("formats", FORMATS):
            clip, encoder = comfy_encoder(entry["kind"], fmt, dict(entry["config"]))
            fill(encoder, entry["kind"], weights, fmt)
            stem = f"{entry['name']}_{fmt}"
            CLIPSave().save(clip, stem)
            written = sorted(out.glob(f"{stem}_*_00001_.safetensors"))
            assert len(written) == 1, written
            written[0].rename(out / f"{stem}.safetensors")
            ref = {
                f"forward.{k}": v.contiguous() for k, v in comfy_forward(encoder, entry["kind"], ids).items()
            }
            ref.update({f"weight.{k}": v.contiguous() for k, v in dequantised(encoder).items()})
            save_file(ref, str(out / f"{stem}.reference.safetensors"))


def shapes(comfy_dir: str, out_path: str) -> None:
    """{encoder: {name: shape}} of ComfyUI's full-size HiDream text encoders (CLIP-L, CLIP-G, T5-XXL,
    Llama 3.1 8B) as CLIPSave would write them, built on the meta device (no memory)."""
    import comfy.text_encoders.hidream as hidream
    import torch

    with torch.device("meta"):
        model = hidream.hidream_clip()(device="meta", dtype=torch.bfloat16, model_options={})
    out: dict = {}
    for name, t in model.state_dict().items():
        encoder, _, rest = name.partition(".")
        out.setdefault(encoder, {})[rest.removeprefix("transformer.")] = list(t.shape)
    Path(out_path).write_text(json.dumps(out))


def main() -> None:
    command, comfy_dir, *args = sys.argv[1:]
    start_comfy(comfy_dir, "--disable-metadata")
    {"tokenize": tokenize, "save": save, "shapes": shapes}[command](comfy_dir, *args)


if __name__ == "__main__":
    main()
