"""EMA of adapter weights: the update math, swapping in for validation, and checkpoint state."""

import pytest
import torch

from tunegraph.trainer.errors import TrainingError
from tunegraph.trainer.training.ema import EMA


def test_update_is_the_exponential_moving_average():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = EMA([p], decay=0.9)
    expected = torch.tensor([1.0, -2.0])
    for value in ([2.0, 0.0], [4.0, 1.0], [0.0, 3.0]):
        with torch.no_grad():
            p.copy_(torch.tensor(value))
        ema.update()
        expected = 0.9 * expected + 0.1 * torch.tensor(value)
    torch.testing.assert_close(ema.shadow[0], expected, rtol=1e-6, atol=1e-7)
    assert ema.num_updates == 3
    # by hand: ((1*.9 + .2)*.9 + .4)*.9 + 0 = 1.251
    assert ema.shadow[0][0].item() == pytest.approx(1.251, rel=1e-6)


def test_swapped_in_uses_ema_weights_then_restores_trained_ones():
    layer = torch.nn.Linear(3, 2)
    ema = EMA(layer.parameters(), decay=0.5)
    trained = [p.detach().clone() for p in layer.parameters()]
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    ema.update()  # shadow = trained + 0.5
    after_step = [p.detach().clone() for p in layer.parameters()]
    x = torch.randn(4, 3)
    with ema.swapped_in(layer):
        for p, t in zip(layer.parameters(), trained, strict=True):
            torch.testing.assert_close(p.detach(), t + 0.5)
        inside = layer(x)
    for p, a in zip(layer.parameters(), after_step, strict=True):
        assert torch.equal(p.detach(), a)
    assert not torch.allclose(inside, layer(x))


def test_state_dict_round_trip_and_mismatch_error():
    p = torch.nn.Parameter(torch.randn(4))
    ema = EMA([p], decay=0.99)
    ema.update()
    other = EMA([torch.nn.Parameter(torch.zeros(4))], decay=0.5)
    state = ema.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # goes straight into safetensors
    other.load_state_dict(state)
    assert other.decay == 0.99 and other.num_updates == 1
    assert torch.equal(other.shadow[0], ema.shadow[0])
    with pytest.raises(TrainingError, match="does not fit"):
        EMA([torch.nn.Parameter(torch.zeros(5))]).load_state_dict(ema.state_dict())
    with pytest.raises(TrainingError, match="ema_decay"):
        EMA([p], decay=1.5)


def test_bf16_params_keep_a_float32_shadow():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    ema = EMA([p], decay=0.999)
    with torch.no_grad():
        p.fill_(2.0)
    ema.update()
    assert ema.shadow[0].dtype == torch.float32
    assert ema.shadow[0][0].item() == pytest.approx(1.001, rel=1e-6)
