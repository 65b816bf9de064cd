"""Recipes: parsing, round-trip, and errors that name the key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from secateurs import recipe
from secateurs.errors import ConfigError
from secateurs.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def test_defaults_round_trip_through_yaml() -> None:
    r = recipe.Recipe()
    again = recipe.parse(yaml.safe_load(recipe.dump(r)))
    assert again == r


def test_shrink_round_to_takes_auto_an_int_or_null() -> None:
    """``round_to``'s named value (``auto``, the default) passes the recipe's type check."""
    for value in ("auto", 16, None):
        r = recipe.parse({"shrink": {"budget": {"name": "macs", "keep": 0.5}, "round_to": value}})
        assert r.shrink is not None and r.shrink.round_to == value
        assert recipe.parse(yaml.safe_load(recipe.dump(r))) == r


def test_method_specs_as_names_and_mappings() -> None:
    r = recipe.parse(
        {
            "prune": {
                "structure": {"name": "nm", "n": 2, "m": 4},
                "criterion": "obd",
                "allocation": {"name": "layer_map", "ratios": {"fc.*": 0.5}},
                "schedule": {"name": "gradual", "start": 0, "end": 2.5, "every": 0.5},
            }
        }
    )
    assert r.prune.criterion == "obd"
    steps = recipe.schedule_in_steps(r.prune.schedule, steps_per_epoch=100)
    assert steps == {"name": "gradual", "start": 0, "end": 250, "every": 50}


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"prune": {"sparsty": 0.9}}, ["prune.sparsty", "sparsity"]),
        ({"modle": {}}, ["modle", "model"]),
        ({"prune": {"sparsity": 1.5}}, ["prune.sparsity", "1.5", "[0, 1)"]),
        ({"prune": {"sparsity": "high"}}, ["prune.sparsity", "high"]),
        ({"prune": {"criterion": "magnitud"}}, ["prune.criterion", "magnitud", "magnitude"]),
        ({"prune": {"structure": {"name": "nm", "n": 4, "m": 4}}}, ["prune.structure", "n=4"]),
        ({"prune": {"structure": {"name": "nm", "k": 4}}}, ["prune.structure", "'k'"]),
        ({"prune": {"schedule": {"name": "oneshot", "every": 3}}}, ["prune.schedule", "every"]),
        ({"train": {"epochs": -1}}, ["'train'", "epochs", "-1"]),
        ({"train": {"optimizer": "lbfgs"}}, ["'train'", "optimizer", "lbfgs", "sgd"]),
        ({"finetune": {"optimizer": "lbfgs"}}, ["finetune.optimizer", "lbfgs", "sgd"]),
        ({"train": {"lr": "fast"}}, ["train.lr", "fast"]),
        ({"data": {"batch_size": 0}}, ["data.batch_size", "0"]),
        ({"prune": {"sparsity": 0.5, "budget": {"name": "params", "keep": 10}}}, ["budget"]),
        ({"shrink": {"round_to": "autox"}}, ["shrink.round_to", "autox", "'auto'", "int"]),
        ({"shrink": {"round_to": 0}}, ["round_to", "0"]),
        ({"model": "lenet-5"}, ["model", "mapping"]),
        (["not", "a", "mapping"], ["mapping"]),
    ],
)
def test_bad_recipes_name_key_value_and_allowed(raw: object, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        recipe.parse(raw)
    for word in words:
        assert word in str(info.value)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        recipe.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        recipe.load(bad)


def _leaves(raw: Any, keys: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every (key path, value) a recipe sets: its top-level keys and each section's keys (a
    method spec, itself a mapping, is one value)."""
    if isinstance(raw, dict) and len(keys) < 2:
        return [leaf for k, v in raw.items() for leaf in _leaves(v, (*keys, k))]
    return [(keys, raw)]


def _check_file(path: Path) -> None:
    """The file parses, every key it sets arrives with its value, and it round-trips."""
    raw = yaml.safe_load(path.read_text())
    r = recipe.load(path)
    plain = r.to_dict()
    for keys, value in _leaves(raw):
        got: Any = plain
        for k in keys:
            got = got[k]
        assert got == value, ".".join(keys)
    assert recipe.parse(yaml.safe_load(recipe.dump(r))) == r


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_example_recipes_are_valid_keep_every_key_and_round_trip(path: Path) -> None:
    _check_file(path)


def test_embedded_demo_recipe_is_valid_keeps_every_key_and_round_trips() -> None:
    _check_file(REPO / "src" / "secateurs" / "recipes" / "demo.yaml")


def test_finetune_follows_training_and_defaults_to_a_tenth_of_its_lr() -> None:
    r = recipe.parse({"train": {"lr": 0.1, "optimizer": "adamw"}, "finetune": {"epochs": 2}})
    ft = r.finetune.config(r.train)
    assert ft.epochs == 2 and ft.lr == pytest.approx(0.01) and ft.optimizer == "adamw"
    r = recipe.parse({"finetune": {"lr": 0.05, "weight_decay": 0.0}})
    ft = r.finetune.config(r.train)
    assert ft.lr == 0.05 and ft.weight_decay == 0.0 and ft.clip_grad is None
    # a gradient clip follows the train section unless the finetune section sets its own
    r = recipe.parse({"train": {"clip_grad": 2.0}, "finetune": {"epochs": 1}})
    assert r.finetune.config(r.train).clip_grad == 2.0
    r = recipe.parse({"train": {"clip_grad": 2.0}, "finetune": {"clip_grad": 0.5}})
    assert r.finetune.config(r.train).clip_grad == 0.5
    with pytest.raises(ConfigError, match="clip_grad"):
        recipe.parse({"finetune": {"clip_grad": -1}}).finetune.config(TrainConfig())


def test_schedule_epochs_must_be_numbers() -> None:
    with pytest.raises(ConfigError, match="epochs"):
        recipe.schedule_in_steps({"name": "gradual", "end": "soon"}, 10)
