"""One source of truth for value lists: every choice list in the config key table is one of
trainer/choices.py's, and the modules that implement a key check against that same list."""

from __future__ import annotations

import pytest

from tunegraph.trainer import choices
from tunegraph.trainer.config import TrainConfig
from tunegraph.trainer.config_keys import KEYS
from tunegraph.trainer.data import backends
from tunegraph.trainer.errors import ConfigError
from tunegraph.trainer.models.registry import FAMILIES
from tunegraph.trainer.plan import presets
from tunegraph.trainer.training import flow, optim

LISTS = {name: tuple(v) for name, v in vars(choices).items() if name.isupper() and not name.startswith("_")}


def test_every_choice_list_in_the_key_table_comes_from_choices() -> None:
    invented = {
        k: key.choices for k, key in KEYS.items() if key.choices and key.choices not in LISTS.values()
    }
    assert invented == {}, (
        f"choice lists written into config_keys.py: move them to trainer/choices.py: {invented}"
    )


def test_implementing_modules_use_the_same_lists() -> None:
    assert flow.LOSS_TYPES is choices.LOSS_TYPES and flow.HUBER_SCHEDULES is choices.HUBER_SCHEDULES
    assert optim.CLIP_METHODS is choices.CLIP_METHODS and optim.SCHEDULERS is choices.LR_SCHEDULERS
    assert backends.CAPTION_STRATEGIES is choices.CAPTION_STRATEGIES
    assert backends.RESOLUTION_TYPES is choices.RESOLUTION_TYPES
    assert presets.PRESETS is choices.MEMORY_PRESETS
    assert tuple(FAMILIES) == choices.MODEL_FAMILIES  # a new family is one registry line plus its name here


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("loss_type", "LOSS_TYPES"),
        ("huber_schedule", "HUBER_SCHEDULES"),
        ("grad_clip_method", "CLIP_METHODS"),
    ],
)
def test_the_key_table_refuses_what_the_list_lacks_and_takes_each_entry(key: str, name: str) -> None:
    for value in getattr(choices, name):
        assert getattr(TrainConfig.from_dict({key: value}), key) == value
    with pytest.raises(ConfigError, match=key):
        TrainConfig.from_dict({key: "not-a-choice"})
