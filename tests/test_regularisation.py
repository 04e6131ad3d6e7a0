"""`is_regularisation_data`: the loss of a regularisation batch is the distance to the base model's
own (adapter-free) prediction, not to the flow-matching target (SimpleTuner's parent-student loss)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunegraph.trainer.commands.demo import write_demo_config
from tunegraph.trainer.config import load_config
from tunegraph.trainer.training.loop import compute_loss
from tunegraph.trainer.training.run import prepare_run


def make_run(tmp_path: Path, lora_type: str):
    path = write_demo_config(tmp_path / "demo", steps=1)
    backends_file = path.parent / "multidatabackend.json"
    backends = json.loads(backends_file.read_text())
    backends[0]["is_regularisation_data"] = True
    backends_file.write_text(json.dumps(backends))
    keys = {
        "mixed_precision": "no",
        "eval_steps_interval": None,
        "disable_validation": True,
        "lora_type": lora_type,
    }
    return prepare_run(load_config(path, {**keys, "lora_rank": 2, "flux_lora_target": "all"}))


class Calls:
    """Records the inputs of every real `predict` call."""

    def __init__(self, model):
        self.model, self.args, self.real = model, [], model.predict
        model.predict = self

    def __call__(self, *args):
        self.args.append(args)
        return self.real(*args)


@pytest.mark.parametrize("lora_type", ["lycoris", "standard"])
def test_regularisation_loss_is_the_distance_to_the_adapter_free_prediction(tmp_path, lora_type) -> None:
    run = make_run(tmp_path, lora_type)
    batch = run.data.next_batch()
    assert batch["is_regularisation_data"] == [True, True]
    state = run.generator.get_state()
    # A fresh adapter adds nothing: student == parent, so the loss is exactly zero ...
    assert compute_loss(run, batch).item() == 0.0
    run.generator.set_state(state)
    plain = compute_loss(run, {**batch, "is_regularisation_data": [False, False]}).item()
    assert plain > 1e-3  # ... where the flow-matching target would give a real loss.

    with torch.no_grad():
        for p in run.adapter.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    calls = Calls(run.model)
    run.generator.set_state(state)
    loss = compute_loss(run, batch)
    assert len(calls.args) == 2 and torch.equal(
        calls.args[0][0], calls.args[1][0]
    )  # parent, student: same x_t
    args = calls.args[0]
    with torch.no_grad():
        student = calls.real(*args).float()
        with run.adapter.disabled():
            parent = calls.real(*args).float()
    assert not torch.allclose(student, parent)
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(student, parent).item(), rel=1e-6)
    loss.backward()  # the student side carries the gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in run.adapter.parameters())

    # A mixed batch: the parent target on the regularisation row only, noise - x0 on the other.
    run.generator.set_state(state)
    calls.args.clear()
    mixed = compute_loss(run, {**batch, "is_regularisation_data": [True, False]}).item()
    xt, s = args[0].float(), args[1].float().reshape(-1, 1, 1, 1)
    x0 = batch["latents"].float()
    flow = (xt - (1 - s) * x0) / s - x0  # noise - x0, with the noise recovered from x_t
    rows = [(student[0] - parent[0]).square().mean(), (student[1] - flow[1]).square().mean()]
    assert mixed == pytest.approx(((rows[0] + rows[1]) / 2).item(), rel=1e-4)
