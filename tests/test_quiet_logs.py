"""Third-party per-load noise does not reach the console (or ComfyUI's log, which reads the same
loggers); our own messages and real library warnings do."""

from __future__ import annotations

import json
import logging

from tunegraph.trainer.adapters import attach_adapter
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.models.prepare import prepare_model

LOKR = {"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 4, "full_matrix": True,
        "apply_preset": {"target_module": ["Attention"]}}  # fmt: skip


def test_bf16_int8_load_and_bypass_attach_print_no_noise(tmp_path, capfd, caplog) -> None:
    lyco = tmp_path / "lycoris_config.json"
    lyco.write_text(json.dumps(LOKR))
    keys = {"model_flavour": "tiny", "base_model_precision": "int8-quanto", "lora_type": "lycoris"}
    cfg = TrainConfig.from_dict({**keys, "lycoris_config": str(lyco)})
    with caplog.at_level(logging.INFO):
        model = prepare_model(cfg, "cpu")  # bf16 casts: diffusers' "kept in float32: []" per module
        attach_adapter(model.transformer, cfg, model)  # quantised base: LyCORIS' force-bypass notice
        logging.getLogger("tunegraph").warning("our own message")
        logging.getLogger("diffusers.models.modeling_utils").warning("a real diffusers warning")
    out, err = capfd.readouterr()
    text = out + err + caplog.text
    assert "kept in float32" not in text and "force-bypass" not in text
    assert "our own message" in caplog.text and "quantised" in caplog.text  # tunegraph's INFO lines
    assert "a real diffusers warning" in err + caplog.text
