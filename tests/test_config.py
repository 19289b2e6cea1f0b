"""Recipes: stage-owned optimisation settings, moved keys, allowed values from their owners."""

from __future__ import annotations

import re

import pytest

from prorank_fast.config import _CHOICES, load_recipe
from prorank_fast.data import FORMATS, TEMPLATES
from prorank_fast.errors import InputError, RecipeError
from prorank_fast.kernels.reference import LOSS_TYPES, SCORE_LOSSES


def test_each_stage_owns_its_optimisation_settings():
    recipe = load_recipe(None, ["stage1.lr=1e-4", "stage2.lr=2e-4", "stage2.max_steps=7", "stage1.max_steps=3"])
    assert (recipe.stage1.lr, recipe.stage2.lr) == (1e-4, 2e-4)
    assert (recipe.stage1.max_steps, recipe.stage2.max_steps) == (3, 7)
    for key in ("lr", "max_steps", "warmup_ratio", "checkpoint_every"):
        assert not hasattr(recipe.train, key), key


@pytest.mark.parametrize("key", ["lr", "max_steps", "warmup_ratio", "checkpoint_every"])
def test_a_moved_key_names_its_new_place(key):
    with pytest.raises(RecipeError, match=rf"train\.{key} is now stage2\.{key}"):
        load_recipe(None, [f"train.{key}=1"])


def test_moved_key_in_a_recipe_file(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  tiny: {hidden_size: 64}\ntrain:\n  lr: 1.0e-3\n")
    with pytest.raises(RecipeError, match=r"old\.yaml: train\.lr is now stage2\.lr"):
        load_recipe(str(path))


def test_token_weights_null_takes_the_template_s():
    recipe = load_recipe(None, ["stage2.token_weights=null"])
    assert recipe.stage2.token_weights is None
    assert TEMPLATES[recipe.data.template].token_weights == (1.0, -1.0)
    assert load_recipe(None, ["stage2.token_weights=[2.0, -1.0]"]).stage2.token_weights == (2.0, -1.0)


def test_allowed_values_are_the_owners():
    assert _CHOICES["data", "template"] == tuple(TEMPLATES)
    assert _CHOICES["data", "format"] == FORMATS
    assert _CHOICES["stage2", "loss"] == SCORE_LOSSES
    assert _CHOICES["stage1", "loss_type"] == LOSS_TYPES
    with pytest.raises(RecipeError, match=r"stage2\.loss must be one of \('bce', 'mse', 'listwise', 'distill'\)"):
        load_recipe(None, ["stage2.loss=hinge"])


def test_recipe_errors_are_input_errors():
    with pytest.raises(InputError):
        load_recipe(None, ["nope=1"])


@pytest.mark.parametrize("override", ["data.negatives_depth=0", "data.positives_depth=0"])
def test_mining_depths_are_checked(override):
    with pytest.raises(RecipeError, match=re.escape(override.split("=")[0]) + " must be >= 1"):
        load_recipe(None, [override])
    assert load_recipe(None, ["data.positives_depth=null"]).data.positives_depth is None
