"""Every config key is read by the code that implements it, or named in the one warning of keys
TuneGraph does not act on; the keys that were silently dropped before now act or warn."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from child.launch import child_json

from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.config_keys import ALIASES, KEYS, UNSUPPORTED
from tunegraph.trainer.models.tiny import tiny_flux_transformer
from tunegraph.trainer.training.checkpointing import enable_checkpointing
from tunegraph.trainer.training.metrics import MetricsWriter

ROOT = Path(__file__).resolve().parents[1]
# Where keys are only declared, coerced or checked, not implemented.
DECLARING = {ROOT / "trainer" / "config_keys.py", ROOT / "trainer" / "config.py"}


def _sources() -> str:
    files = [*(ROOT / "trainer").rglob("*.py"), *(ROOT / "nodes").rglob("*.py")]
    return "\n".join(p.read_text(encoding="utf-8") for p in files if p not in DECLARING)


def _read_pattern(key: str) -> re.Pattern:
    """`cfg.key`, `"key"` or an f-string naming it (`text_encoder_{i}_precision`)."""
    name = re.sub(r"\d", lambda _: r"(?:\d|\{[^}]*\})", re.escape(key))
    return re.compile(rf"(?:\.{name}\b|[\"']{name}[\"']|f[\"'][^\"']*{name})")


def test_every_key_in_the_table_is_read_by_the_code() -> None:
    sources = _sources()
    unread = [k for k in KEYS if k not in ALIASES and not _read_pattern(k).search(sources)]
    assert unread == [], (
        f"keys accepted but read nowhere (implement them or move them to UNSUPPORTED): {unread}"
    )
    assert all(target in KEYS for target in ALIASES.values())


def test_the_scan_would_catch_an_unread_key() -> None:
    assert not _read_pattern("a_key_nobody_reads").search(_sources())
    assert _read_pattern("text_encoder_3_precision").search(_sources())  # read as an f-string


def test_revision_is_named_in_the_unsupported_warning(caplog) -> None:
    assert "revision" in UNSUPPORTED and "revision" not in KEYS
    with caplog.at_level(logging.WARNING, logger="tunegraph"):
        cfg = TrainConfig.from_dict({"revision": "main", "model_flavour": "tiny"})
    assert "revision='main'" in cfg.warnings[0] and "not implemented" in caplog.text


def _block_calls(interval: int | None) -> tuple[dict[str, int], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = tiny_flux_transformer(guidance_embeds=False)
    model.transformer_blocks.append(type(model.transformer_blocks[0])(32, 2, 16))
    model.transformer_blocks.append(type(model.transformer_blocks[0])(32, 2, 16))
    calls: dict[str, int] = {}
    for name, block in model.named_modules():
        if name.count(".") == 1 and name.split(".")[0].endswith("blocks"):
            block.register_forward_pre_hook(lambda m, a, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
    cfg = TrainConfig.from_dict({"gradient_checkpointing": True, "gradient_checkpointing_interval": interval})
    enable_checkpointing(model, cfg)
    gen = torch.Generator().manual_seed(1)
    out = model(
        hidden_states=torch.randn(1, 16, 64, generator=gen),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=gen),
        pooled_projections=torch.randn(1, 32, generator=gen),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
        return_dict=False,
    )[0]
    out.square().mean().backward()
    return calls, [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_gradient_checkpointing_interval_recomputes_every_nth_block_only() -> None:
    every, grads_every = _block_calls(None)
    second, grads_second = _block_calls(2)
    # A checkpointed block runs its forward twice (once more in backward), the others once.
    assert every == {"transformer_blocks.0": 2, "transformer_blocks.1": 2, "transformer_blocks.2": 2,
                     "single_transformer_blocks.0": 2}  # fmt: skip
    assert second == {"transformer_blocks.0": 2, "transformer_blocks.1": 1, "transformer_blocks.2": 2,
                      "single_transformer_blocks.0": 2}  # fmt: skip
    assert all(
        torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads_every, grads_second, strict=True)
    )


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({}, "logs/run"),
        ({"logging_dir": "tb"}, "tb/run"),
        ({"tracker_project_name": "proj"}, "logs/proj/run"),
    ],
)
def test_logging_dir_and_project_place_the_tensorboard_logs(tmp_path, keys, expected) -> None:
    pytest.importorskip("tensorboard")
    cfg = TrainConfig.from_dict({"tracker_run_name": "run", **keys})
    with MetricsWriter(
        tmp_path,
        "tensorboard",
        cfg.tracker_run_name,
        logging_dir=cfg.logging_dir,
        project=cfg.tracker_project_name,
    ) as w:
        w.log(1, loss=1.0)
        assert w.tensorboard_dir == tmp_path / expected


def test_config_imports_without_torch() -> None:
    """The key table takes its value lists from trainer/choices.py, which needs no torch."""
    assert child_json("config_imports", timeout=120) == {"torch_imported": False}


def test_value_lists_have_one_source() -> None:
    from tunegraph.trainer import choices, quantize
    from tunegraph.trainer.adapters import targets
    from tunegraph.trainer.models.flux import FluxModel
    from tunegraph.trainer.training import optim

    assert KEYS["lr_scheduler"].choices == optim.SCHEDULERS == choices.LR_SCHEDULERS
    assert KEYS["text_encoder_1_precision"].choices == quantize.PRECISIONS == choices.PRECISIONS
    assert set(choices.PRECISIONS) <= set(KEYS["base_model_precision"].choices)  # + the base's fp8-file
    assert (
        FluxModel.lora_target_presets is targets.FLUX_LORA_TARGET_PRESETS is choices.FLUX_LORA_TARGET_PRESETS
    )
    assert KEYS["flux_lora_target"].choices == tuple(choices.FLUX_LORA_TARGET_PRESETS)
