"""Recipes: dataclasses, YAML loading, `key=value` overrides, validation.

A recipe has five sections (model, data, stage1, stage2, train). Each stage owns its
optimisation settings (stage1.* and stage2.* each have lr, max_steps, warmup_ratio,
checkpoint_every); `train` holds what both share (output_dir, seed, device, max_tokens,
the optimizer's betas and weight decay, clipping, ...). `prorank-fast train RECIPE
train.lr=3e-4 output_dir=runs/x` loads the YAML into these dataclasses, then applies the
overrides; a key may be dotted (`train.lr`) or bare when it names one field of one section
(`output_dir`). Every unknown key or ill-typed value is an error naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prorank_fast.kernels.reference import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, SCORE_LOSSES

from .data import FORMATS, TEMPLATES
from .errors import RecipeError
from .grpo.rewards import SCALE_REWARDS
from .loop.distributed import DEVICES
from .modeling.attention import BACKENDS
from .modeling.model import ATTN_IMPLEMENTATIONS, AUTOCAST_DTYPES, DTYPES


def _recipes_dir() -> Path:
    """The bundled recipes: the top-level recipes/ folder, installed as prorank_fast.recipes."""
    import importlib.resources

    return Path(str(importlib.resources.files("prorank_fast.recipes")))


DEFAULT_RECIPE = "tiny"


@dataclass
class ModelConfig:
    # A *ForCausalLM: hub id, local folder, GGUF file, or pkg:<package>/<file.gguf> (a GGUF file
    # inside an installed package; modeling/sources.py). None builds a model from `tiny` (random init).
    name_or_path: str | None = None
    # Qwen2 config fields for a model built from scratch (the CPU demo).
    tiny: dict[str, Any] = field(default_factory=dict)
    # The architecture (config.json fields) of name_or_path: --dry-run builds it on the meta
    # device without downloading anything.
    architecture: dict[str, Any] = field(default_factory=dict)
    # Tokenizer path / hub id; None with `tiny` trains a small BPE tokenizer on the training text.
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 512
    dtype: str = "float32"  # float32 | bfloat16 (GPU training: FSDP2 mixed precision keeps fp32 masters)
    # bfloat16: the decoder runs under torch.autocast (weights, optimizer, LM head, losses stay in
    # `dtype`); on a CPU with bf16 matrix units ~2.6x faster training steps for SmolLM2-135M
    autocast: str | None = None
    attn_implementation: str = "prorank_varlen"  # prorank_varlen | sdpa | eager | flash_attention_2
    varlen_backend: str = "auto"  # auto | flash_attn | torch_varlen | sdpa (forces one backend)
    liger_kernels: bool = False  # Liger RMSNorm / SwiGLU / RoPE on CUDA
    gradient_checkpointing: bool = False
    # RMSNorms and the MLP's act(gate) * up recomputed in backward (same bits, ~22% fewer saved
    # activations); None: on CPU without compile
    recompute_norms_and_glu: bool | None = None
    compile: bool = False


@dataclass
class DataConfig:
    # demo | file.jsonl | file.parquet | BEIR folder | hf:<datasets name>[:split]; with data.held_out,
    # a list of BEIR folders: each split by query id, negatives mined within it, groups interleaved
    train: str | tuple[str, ...] = "demo"
    # Held-out evaluation in BEIR form (folder or "demo"); None skips nDCG.
    eval: str | None = "demo"
    format: str = "auto"  # auto | groups | pointwise | columns | beir
    template: str = "prorank"  # prorank | qwen3
    instruction: str | None = None
    max_length: int = 512  # tokens per (query, document) prompt, template included
    min_query_tokens: int = 64  # the query is never cut below this many tokens
    group_size: int = 8  # 1 positive + (group_size - 1) negatives per query (listwise/distill)
    skip_bad_records: bool = False  # count and skip instead of raising
    max_examples: int | None = None
    eval_first_stage_k: int = 30  # BM25 candidates reranked per eval query
    # Split data.train (a BEIR folder) by query id: this fraction of its queries is held out for
    # evaluation (data.eval null or the same folder), the rest trains both stages; None = off.
    held_out: float | None = None
    split_seed: int = 0  # the split's own seed (train.seed does not move it)
    negatives_depth: int = 30  # negatives are mined from BM25's top this many (minus the judged relevant)
    # positives: only judged-relevant documents within BM25's top this many (None: every judged one). Where
    # positives come from anywhere and negatives from BM25's top, lexical overlap with the query marks a
    # negative: the opposite of what reranking BM25's top k needs (README: the multi-collection ablations).
    positives_depth: int | None = None
    demo_queries: int = 120
    demo_docs_per_topic: int = 6
    demo_seed: int = 1234


@dataclass
class Stage1Config:
    """GRPO prompt warmup (ProRank stage 1). Every default is ours: the paper does not publish
    G, beta, epsilon or the learning rate."""

    enabled: bool = False  # run stage 1, then stage 2 from its weights
    # binary-labelled (query, document, 0/1) pairs, any format the readers accept; "demo" = the
    # generated demo's stage1 pairs; None = data.train (whose labels must then be 0/1)
    train: str | None = "demo"
    eval: str | None = "demo"  # held-out pairs for the valid-format rate / accuracy; None skips
    max_eval_pairs: int = 200
    max_steps: int = 100
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    prompts_per_step: int = 16  # global, across ranks
    group_size: int = 8  # G completions per prompt
    max_new_tokens: int = 2  # the answer and the end token
    # Bootstrap (ours): while the training steps' strict valid-format rate is below
    # curriculum_threshold, completions may be up to bootstrap_new_tokens long (a pretrained chat
    # model writes "Relevance: 1 ..." long before it writes just "1"; rewards graded_format and
    # parsed_correctness see those answers); from the first step at the threshold on,
    # max_new_tokens. 0 = off.
    bootstrap_new_tokens: int = 0
    curriculum_threshold: float = 0.5
    # Each step's prompts: half relevant, half not (a constant answer then earns exactly half
    # the correctness reward, and never the whole batch's)
    balance_labels: bool = True
    # DAPO's dynamic sampling: while fewer than prompts_per_step groups have reward variance,
    # draw up to max_refills more batches of prompts (groups without variance teach nothing)
    dynamic_sampling: bool = False
    max_refills: int = 2
    # Against the collapse to one answer whatever the pair: a penalty coef * max(0, floor - H) per
    # prompt on the entropy H (nats) of the answer distribution softmax(z["1"], z["0"]) at the
    # answer position (ln 2 = 0.69 is a coin; 0 = off). Greedy answers are unaffected.
    answer_entropy_floor: float = 0.0
    answer_entropy_coef: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    rewards: tuple[str, ...] = ("format", "correctness")  # registered names or module:function
    reward_weights: tuple[float, ...] = (1.0, 1.0)
    scale_rewards: str = "group"  # group | batch | none (TRL)
    beta: float = 0.0  # k3 KL to a frozen copy of the starting model; 0 = no reference model
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    num_iterations: int = 1  # optimizer steps per batch of rollouts (old log-probs when > 1)
    # Truly on-policy: sampler and policy pass run the model batch-invariantly, so the log-probs
    # recorded while sampling equal the policy pass's bit for bit (logged: rollout_logp_max_diff)
    # and serve as the old log-probs (importance ratio exactly 1; no extra pass when
    # num_iterations > 1). Off: the same, with ratios off 1 by rounding. null: on on CPU (measured
    # cost ~1.5x on the tiny default's stage 1), off on CUDA until the GPU suite has measured the
    # fixed-block Triton matmul against cuBLAS.
    batch_invariant: bool | None = None
    checkpoint_every: int = 50
    # also train stage 2 alone from the same start (output_dir/stage2_alone) and report its nDCG@10
    compare_stage2_alone: bool = False


@dataclass
class Stage2Config:
    """Fine-grained score learning (ProRank stage 2)."""

    loss: str = "listwise"  # bce | mse | listwise | distill
    temperature: float = 1.0  # distill softmax temperature
    # Output set and weights: score = sum_k w_k z[token_k]; None takes them from the template.
    token_weights: tuple[float, ...] | None = None
    lr: float = 1e-3
    warmup_ratio: float = 0.1
    max_steps: int = 100  # optimizer steps
    checkpoint_every: int = 50  # optimizer steps; 0 = only at the end
    # held-out nDCG@10 every this many steps, in metrics.jsonl and curves.png (0 = before and after only)
    eval_every: int = 0


@dataclass
class TrainConfig:
    """What both stages share."""

    output_dir: str = "runs/tiny"
    seed: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    max_tokens: int = 4096  # token budget of one micro-batch (per rank)
    grad_accum: int = 1  # stage-2 micro-batches per optimizer step
    max_grad_norm: float = 1.0
    keep_checkpoints: int = 2
    log_every: int = 1
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int | None = None  # torch CPU threads


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str = "<defaults>"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out


SECTIONS = ("model", "data", "stage1", "stage2", "train")
# Allowed values, as their owners define them (the readers, the templates, the kernels, ...).
_CHOICES = {
    ("model", "dtype"): DTYPES,
    ("model", "autocast"): AUTOCAST_DTYPES,
    ("model", "attn_implementation"): ATTN_IMPLEMENTATIONS,
    ("model", "varlen_backend"): ("auto", *BACKENDS),
    ("data", "format"): FORMATS,
    ("data", "template"): tuple(TEMPLATES),
    ("stage1", "scale_rewards"): SCALE_REWARDS,
    ("stage1", "loss_type"): LOSS_TYPES,
    ("stage1", "importance_sampling_level"): IMPORTANCE_SAMPLING_LEVELS,
    ("stage2", "loss"): SCORE_LOSSES,
    ("train", "device"): DEVICES,
}

# Keys that moved: an old recipe or override gets an error that names the new key.
_MOVED = {
    ("train", "lr"): "stage2.lr",
    ("train", "max_steps"): "stage2.max_steps",
    ("train", "warmup_ratio"): "stage2.warmup_ratio",
    ("train", "checkpoint_every"): "stage2.checkpoint_every",
}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check / convert one value against a dataclass field annotation."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        if isinstance(value, str) and value.strip().startswith("["):  # `key=[a, b]`: the list option first
            options = sorted(options, key=lambda o: typing.get_origin(o) is not tuple)
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if errors else f"{where}: got {value!r}")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise RecipeError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise RecipeError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(f"{where}: expected a string, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value if value.strip().startswith("[") else f"[{value}]")
        if not isinstance(value, list | tuple):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(args) != len(value):
            raise RecipeError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    raise RecipeError(f"{where}: unsupported field type {hint!r}")  # pragma: no cover


def _field_types(section_cls) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _set(recipe: Recipe, section: str, key: str, value: Any, where: str) -> None:
    target = getattr(recipe, section)
    types_ = _field_types(type(target))
    if (section, key) in _MOVED:
        raise RecipeError(
            f"{where}: {section}.{key} is now {_MOVED[section, key]} (each stage owns its lr, max_steps, "
            "warmup_ratio and checkpoint_every: stage1.* and stage2.*)"
        )
    if key not in types_:
        raise RecipeError(f"{where}: unknown key {section}.{key} (known: {', '.join(sorted(types_))})")
    coerced = _coerce(value, types_[key], f"{where}: {section}.{key}")
    choices = _CHOICES.get((section, key))
    if choices is not None and coerced not in choices:
        raise RecipeError(f"{where}: {section}.{key} must be one of {choices}, got {coerced!r}")
    setattr(target, key, coerced)


def recipe_path(name_or_path: str | None) -> Path:
    """A recipe file: a path, or the name of a bundled recipe (`tiny`, `prorank-0.5b`, ...)."""
    if name_or_path is None:
        name_or_path = DEFAULT_RECIPE
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise RecipeError(f"recipe file {path} does not exist")
        return path
    bundled = _recipes_dir() / f"{name_or_path}.yaml"
    if not bundled.exists():
        known = sorted(p.stem for p in _recipes_dir().glob("*.yaml"))
        raise RecipeError(f"no recipe named {name_or_path!r}: not a file, and not one of {known}")
    return bundled


def load_recipe(name_or_path: str | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe (bundled name or YAML path; None = the embedded default `tiny`) and
    apply `key=value` overrides."""
    path = recipe_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: the top level must be a mapping of sections {SECTIONS}")
    recipe = Recipe(source=str(path))
    for section, values in raw.items():
        if section not in SECTIONS:
            raise RecipeError(f"{path}: unknown section {section!r} (sections: {', '.join(SECTIONS)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise RecipeError(f"{path}: section {section!r} must be a mapping")
        for key, value in values.items():
            _set(recipe, section, key, value, str(path))
    apply_overrides(recipe, overrides or [])
    validate(recipe)
    return recipe


def apply_overrides(recipe: Recipe, overrides: list[str]) -> None:
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r}: expected key=value")
        key, value_text = item.split("=", 1)
        value = yaml.safe_load(value_text) if value_text.strip() else None
        if "." in key:
            section, name = key.split(".", 1)
            if section not in SECTIONS:
                raise RecipeError(f"override {item!r}: unknown section {section!r}")
        else:
            owners = [s for s in SECTIONS if key in _field_types(type(getattr(recipe, s)))]
            if not owners and ("train", key) in _MOVED:
                owners = ["train"]  # let _set name the key's new place
            if len(owners) != 1:
                why = "no section has it" if not owners else f"ambiguous between {owners}"
                raise RecipeError(f"override {item!r}: write section.{key} ({why})")
            section, name = owners[0], key
        _set(recipe, section, name, value, f"override {item!r}")


def validate(recipe: Recipe) -> None:
    """Cross-field checks; each error names the key."""
    where = recipe.source
    m, d, s, t = recipe.model, recipe.data, recipe.stage2, recipe.train
    if m.name_or_path is None and not m.tiny:
        raise RecipeError(f"{where}: model.name_or_path or model.tiny must be set")
    positive = {
        "data.max_length": d.max_length,
        "data.group_size": d.group_size,
        "stage2.max_steps": s.max_steps,
        "stage2.lr": s.lr,
        "train.max_tokens": t.max_tokens,
        "train.grad_accum": t.grad_accum,
    }
    for key, value in positive.items():
        if value <= 0:
            raise RecipeError(f"{where}: {key} must be > 0, got {value}")
    if s.loss in ("listwise", "distill") and d.group_size < 2:
        raise RecipeError(f"{where}: data.group_size must be >= 2 for stage2.loss={s.loss}")
    if d.negatives_depth < 1:
        raise RecipeError(f"{where}: data.negatives_depth must be >= 1")
    if d.positives_depth is not None and d.positives_depth < 1:
        raise RecipeError(f"{where}: data.positives_depth must be >= 1 or null, got {d.positives_depth}")
    if isinstance(d.train, tuple):
        if not d.train:
            raise RecipeError(f"{where}: data.train is an empty list")
        if len(d.train) == 1:
            d.train = d.train[0]
        elif d.held_out is None:
            raise RecipeError(
                f"{where}: data.train lists {len(d.train)} collections: set data.held_out (each BEIR folder is split "
                "by query id, its held-out queries evaluated on their own)"
            )
    if d.min_query_tokens < 1 or d.min_query_tokens >= d.max_length:
        raise RecipeError(f"{where}: data.min_query_tokens must be in [1, data.max_length)")
    if not 0 <= s.warmup_ratio < 1:
        raise RecipeError(f"{where}: stage2.warmup_ratio must be in [0, 1)")
    if s.temperature <= 0:
        raise RecipeError(f"{where}: stage2.temperature must be > 0")
    if s.checkpoint_every < 0 or s.eval_every < 0:
        raise RecipeError(f"{where}: stage2.checkpoint_every and stage2.eval_every must be >= 0")
    if s.token_weights is not None and len(s.token_weights) != 2:
        raise RecipeError(f"{where}: stage2.token_weights needs one weight per output token (2), got {s.token_weights}")
    if recipe.stage1.enabled:
        _validate_stage1(recipe.stage1, where)


def _validate_stage1(g: Stage1Config, where: str) -> None:
    if g.group_size < 2:
        raise RecipeError(
            f"{where}: stage1.group_size must be >= 2 (advantages are relative to the group), got {g.group_size}"
        )
    if g.max_new_tokens < 1:
        raise RecipeError(f"{where}: stage1.max_new_tokens must be >= 1, got {g.max_new_tokens}")
    if g.bootstrap_new_tokens < 0 or g.max_refills < 0 or not 0 < g.curriculum_threshold <= 1:
        raise RecipeError(
            f"{where}: stage1.bootstrap_new_tokens and stage1.max_refills must be >= 0 and "
            "stage1.curriculum_threshold in (0, 1]"
        )
    for key in ("max_steps", "prompts_per_step", "num_iterations"):
        if getattr(g, key) < 1:
            raise RecipeError(f"{where}: stage1.{key} must be >= 1, got {getattr(g, key)}")
    if g.lr <= 0:
        raise RecipeError(f"{where}: stage1.lr must be > 0")
    if g.temperature < 0 or not 0 < g.top_p <= 1:
        raise RecipeError(f"{where}: stage1.temperature must be >= 0 and stage1.top_p in (0, 1]")
    if not g.rewards or len(g.rewards) != len(g.reward_weights):
        raise RecipeError(f"{where}: stage1.rewards and stage1.reward_weights need the same, non-zero length")
    if not 0 <= g.answer_entropy_floor < 0.6932 or g.answer_entropy_coef < 0:
        raise RecipeError(f"{where}: stage1.answer_entropy_floor must be in [0, ln 2) and answer_entropy_coef >= 0")
    if g.beta < 0 or g.epsilon_low < 0 or g.epsilon_high < 0:
        raise RecipeError(f"{where}: stage1.beta / epsilon_low / epsilon_high must be >= 0")
    if not 0 <= g.warmup_ratio < 1:
        raise RecipeError(f"{where}: stage1.warmup_ratio must be in [0, 1)")
    if g.checkpoint_every < 0:
        raise RecipeError(f"{where}: stage1.checkpoint_every must be >= 0")
