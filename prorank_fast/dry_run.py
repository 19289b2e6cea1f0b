"""`prorank-fast train RECIPE --dry-run`: load and validate a recipe offline.

Nothing is downloaded: the model is built from the recipe's architecture on the meta
device (parameter count, memory per GPU for weights + AdamW states under FSDP2), the
template's output ids are checked against a local tokenizer when one is available, and
local data paths are checked for existence and read for their first records.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import Recipe, RecipeError


def _build_on_meta(recipe: Recipe):
    import transformers

    arch = dict(recipe.model.architecture or {})
    if not arch and recipe.model.tiny:
        arch = {"model_type": "qwen2", **recipe.model.tiny, "vocab_size": recipe.model.tokenizer_vocab_size}
    if not arch:
        raise RecipeError(f"{recipe.source}: model.architecture is needed for an offline dry run")
    model_type = arch.pop("model_type", "qwen2")
    try:
        config = transformers.AutoConfig.for_model(model_type, **arch)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"{recipe.source}: model.architecture: {exc}") from exc
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return config, model


def _tokenizer_check(recipe: Recipe) -> dict:
    """Output-set ids from a local tokenizer: model.tokenizer if it is a folder, else the
    Qwen2 tokenizer named by PRORANK_QWEN2_TOKENIZER for Qwen recipes."""
    from .data import get_template
    from .modeling import load_tokenizer

    path = recipe.model.tokenizer
    source = recipe.model.name_or_path or ""
    if not path and (source.startswith("pkg:") or source.lower().endswith(".gguf")):
        from .errors import InputError

        try:  # a GGUF file holds its tokenizer: check the template's chat and output tokens against it
            ids = get_template(recipe.data.template).check_tokenizer(load_tokenizer(source), source)
        except InputError as exc:
            return {"tokenizer": f"not checked: {exc}"}
        return {"tokenizer": source, "output_token_ids": list(ids)}
    if not (path and Path(path).is_dir()):
        is_qwen = "qwen" in (recipe.model.name_or_path or "").lower()
        path = os.environ.get("PRORANK_QWEN2_TOKENIZER") if is_qwen else None
    if not path or not Path(path).is_dir():
        return {"tokenizer": "not checked (no local tokenizer; set PRORANK_QWEN2_TOKENIZER for Qwen recipes)"}
    tokenizer = load_tokenizer(path)
    template = get_template(recipe.data.template)
    ids = template.output_token_ids(tokenizer)
    return {"tokenizer": str(path), "output_token_ids": list(ids)}


def _data_check(spec: str | tuple[str, ...] | None) -> str:
    if isinstance(spec, tuple):  # several collections (data.held_out splits each)
        return "; ".join(_data_check(one) for one in spec)
    if spec is None:
        return "none"
    if spec == "demo":
        return "demo (generated)"
    if spec.startswith("hf:"):
        return f"{spec} (a datasets name: not reachable offline, not checked)"
    path = Path(spec)
    return f"{spec} ({'found' if path.exists() else 'missing: create it before training'})"


def dry_run(recipe: Recipe) -> dict:
    config, model = _build_on_meta(recipe)
    n_params = sum(p.numel() for p in model.parameters())
    # fp32 master weights + two AdamW moments + fp32 gradients, sharded by FSDP over the GPUs
    bytes_per_param = 4 * 4
    report = {
        "recipe": recipe.source,
        "model": recipe.model.name_or_path or "tiny (built from config)",
        "architecture": config.model_type,
        "parameters": n_params,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "train_state_gib_per_gpu_at_8": round(n_params * bytes_per_param / 8 / 2**30, 2),
        "template": recipe.data.template,
        "loss": recipe.stage2.loss,
        "train_data": _data_check(recipe.data.train),
        "eval_data": _data_check(recipe.data.eval),
        "stage1": (
            {
                "train_data": _data_check(recipe.stage1.train or recipe.data.train),
                "steps": recipe.stage1.max_steps,
                "group_size": recipe.stage1.group_size,
                "beta": recipe.stage1.beta,
            }
            if recipe.stage1.enabled
            else "disabled"
        ),  # fmt: skip
        **_tokenizer_check(recipe),
    }
    return report
