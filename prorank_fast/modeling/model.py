"""Model and tokenizer loading.

A model comes from `ModelConfig.name_or_path` (a local folder, a hub id resolved through the
local cache, or a GGUF file: see sources.py) or, when that is None, is built at random from the Qwen2 fields in
`ModelConfig.tiny` (the CPU demo). `load_model` then selects the attention implementation
("prorank_varlen" by default: packed varlen attention, see attention.py) and its backend,
and optionally enables activation checkpointing and Liger's backbone kernels. On CPU it has
backward recompute the RMSNorms and the MLP's act(gate) * up (`recompute_norms_and_glu`).

Liger's RMSNorm / SwiGLU / RoPE kernels are Triton kernels for CUDA: they are applied only
for a CUDA device and only when liger-kernel imports (detected once); otherwise load_model
warns and keeps the transformers modules. `ModelConfig.liger_kernels=false` (the default)
keeps them off.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import types
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from ..errors import InputError, RecipeError
from . import attention  # noqa: F401  (registers the "prorank_varlen" attention implementation)
from .attention import set_varlen_backend
from .sources import load_gguf_model, load_gguf_tokenizer, resolve_source

logger = logging.getLogger(__name__)

# Qwen2 architecture at toy scale. tie_word_embeddings=True as in Qwen2.5-0.5B (the LM head
# is the embedding matrix), which is also what the score head reads.
TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}

# What a recipe may name (config.py reads these): model.dtype, model.attn_implementation, model.autocast.
DTYPES = ("float32", "bfloat16")
AUTOCAST_DTYPES = (None, "bfloat16")
ATTN_IMPLEMENTATIONS = ("prorank_varlen", "sdpa", "eager", "flash_attention_2")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_DTYPES.update({"float16": torch.float16, "fp16": torch.float16})


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """ "float32" | "bfloat16" | "float16" (or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16") from None


@functools.cache
def _qwen2_config_keys() -> frozenset[str]:
    keys = {n for n in inspect.signature(Qwen2Config.__init__).parameters if n not in ("self", "kwargs")}
    keys |= set(Qwen2Config().to_dict())  # in case a release takes its fields as **kwargs
    # Accepted by Qwen2Config in 5.17 and 5.24 although not (always) in the signature.
    return frozenset(keys | {"rope_theta", "rope_scaling", "head_dim", "attn_implementation"})


def build_tiny_model(
    tiny_cfg: dict[str, Any], vocab_size: int, pad_token_id: int | None, dtype: str | torch.dtype = torch.float32
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2ForCausalLM from TINY_DEFAULTS overridden by `tiny_cfg`.

    vocab_size: the tokenizer's size (len(tokenizer)); a larger `tiny_cfg["vocab_size"]` wins
    (e.g. padded to a multiple of 64), a smaller one is an error. Initialisation follows
    torch's RNG: seed it first for a reproducible model. Unknown keys raise RecipeError.
    """
    cfg = {**TINY_DEFAULTS, **(tiny_cfg or {})}
    unknown = sorted(set(cfg) - _qwen2_config_keys())
    if unknown:
        raise RecipeError(f"model.tiny: unknown Qwen2Config field(s) {unknown}")
    requested = cfg.pop("vocab_size", None)
    if requested is not None and requested < vocab_size:
        raise RecipeError(f"model.tiny.vocab_size={requested} is smaller than the tokenizer's {vocab_size} tokens")
    cfg["vocab_size"] = max(vocab_size, requested or 0)
    if pad_token_id is not None:
        cfg["pad_token_id"] = pad_token_id
    cfg.pop("attn_implementation", None)
    if "rope_theta" in cfg and "rope_parameters" in _qwen2_config_keys():
        # transformers 5 keeps RoPE settings in rope_parameters (rope_theta is folded in, but say it explicitly).
        theta = cfg.pop("rope_theta")
        cfg.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": float(theta)})
    config = Qwen2Config(**cfg)
    model = Qwen2ForCausalLM(config)
    return model.to(resolve_dtype(dtype))


_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a folder (tokenizer.json, or vocab.json + merges.txt + tokenizer_config.json),
    a tokenizer.json file, a GGUF file (path or `pkg:` resource, see sources.py), or a hub id
    (offline: the local cache only).

    A folder whose tokenizer_config.json names a generic class (a tokenizer trained with
    `tokenizers`, like the demo's) loads as exactly that tokenizer.json: AutoTokenizer would pick
    the model type's class from a config.json next to it (Qwen2Tokenizer for a saved tiny Qwen2)
    and rebuild a different tokenizer from the vocabulary. A missing pad token is set to the EOS
    token: packing never pads, but padded baselines and exports need one.
    """
    source = resolve_source(path)
    path = Path(path)
    if source.is_gguf:
        tokenizer = load_gguf_tokenizer(source)
    elif path.is_file():
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
    elif (path / "tokenizer.json").is_file() and _tokenizer_class(path) in _GENERIC_TOKENIZER_CLASSES + (None,):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"{path}: a fast (tokenizers-backed) tokenizer is required, got {type(tokenizer).__name__}")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenizer_class(folder: Path) -> str | None:
    try:
        return json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None


@functools.cache
def liger_available() -> bool:
    """Whether liger-kernel's transformers patches import here (detected once)."""
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:
        return False
    return True


def apply_liger_kernels(model: torch.nn.Module, device: torch.device | str) -> bool:
    """Swap in Liger's RMSNorm, SwiGLU MLP and RoPE (not its losses: the score head is ours).

    Only for a CUDA `device` and an importable liger-kernel; otherwise warns and returns False.
    Note that Liger patches transformers' modeling module (RoPE is a module-level function),
    so every model of that architecture in the process is affected.
    """
    device = torch.device(device)
    if device.type != "cuda":
        warnings.warn(f"Liger kernels run on CUDA only; the model is on {device}: not applied", stacklevel=2)
        return False
    if not liger_available():
        warnings.warn("liger-kernel is not installed: Liger kernels not applied", stacklevel=2)
        return False
    kwargs = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance as apply_to_instance
    except ImportError:
        apply_to_instance = None
    try:
        if apply_to_instance is not None:
            from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

            if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
                warnings.warn(f"Liger has no kernels for model type {model.config.model_type!r}", stacklevel=2)
                return False
            apply_to_instance(model=model, **kwargs)
        elif model.config.model_type == "qwen2":
            from liger_kernel.transformers import apply_liger_kernel_to_qwen2

            apply_liger_kernel_to_qwen2(model=model, **kwargs)
        else:
            warnings.warn(f"Liger kernels not applied to model type {model.config.model_type!r}", stacklevel=2)
            return False
    except Exception as exc:  # a liger release that does not match this transformers
        warnings.warn(
            f"Liger kernels could not be applied ({type(exc).__name__}: {exc}); using transformers'", stacklevel=2
        )
        return False
    return True


def recompute_norms_and_glu(model: torch.nn.Module) -> int:
    """Keep less for backward: each RMSNorm and each MLP's act(gate) * up run under non-reentrant
    activation checkpointing, so backward recomputes them from their inputs with the same ops
    (forward and gradients bit for bit). That drops the norms' fp32 normalized copies and the
    activation's output: SmolLM2-135M under bf16 autocast keeps 26.3 instead of 33.9 KiB per
    token and layer, for 0-4% more decoder forward + backward time on CPU (`python -m
    benchmarks.activation_memory`; benchmarks/results/cpu_stage1_invariance_20261207.md).
    Liger's kernels do the same inside their own backward on CUDA. transformers' modules only;
    returns how many were changed."""
    changed = 0
    for module in model.modules():
        if not type(module).__module__.startswith("transformers."):
            continue
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_recomputed_norm_forward, module)
        elif all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            module.forward = types.MethodType(_recomputed_mlp_forward, module)
        else:
            continue
        changed += 1
    return changed


# Bound methods, not closures: copy.deepcopy (stage 1's reference model) rebinds them to the copy.
def _recomputed_norm_forward(self, *args) -> torch.Tensor:
    forward = type(self).forward
    if not torch.is_grad_enabled():
        return forward(self, *args)
    return checkpoint(forward, self, *args, use_reentrant=False, preserve_rng_state=False)


def _recomputed_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    # the activation as it is now: batch_invariant_linears swaps it within its block, and the
    # recompute runs in backward, after the block
    act = self.act_fn.forward
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not torch.is_grad_enabled():
        return self.down_proj(_glu(act, gate, up))
    return self.down_proj(checkpoint(_glu, act, gate, up, use_reentrant=False, preserve_rng_state=False))


def _glu(act, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return act(gate) * up


def _enable_activation_checkpointing(model: transformers.PreTrainedModel) -> None:
    # transformers 5.24 renamed gradient_checkpointing_enable (5.17 has only that one).
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_model(model_cfg: Any, tokenizer: Any, device: torch.device | str = "cpu") -> transformers.PreTrainedModel:
    """The *ForCausalLM described by `model_cfg` (config.ModelConfig), on `device`, in train mode.

    name_or_path set: from_pretrained (local folder, hub id from the local cache when offline, or a
    GGUF file dequantised into a plain model);
    else build_tiny_model(model_cfg.tiny, len(tokenizer), tokenizer.pad_token_id, dtype).
    Then: attention implementation (model_cfg.attn_implementation) and varlen backend
    (model_cfg.varlen_backend), activation checkpointing (model_cfg.gradient_checkpointing),
    Liger backbone kernels (model_cfg.liger_kernels, CUDA only), norms and GLU recomputed in
    backward (model_cfg.recompute_norms_and_glu; None: on CPU). `model_cfg.compile` is left to
    the trainer (it compiles per decoder layer, after sharding).
    """
    device = torch.device(device)
    dtype = resolve_dtype(model_cfg.dtype)
    attn = model_cfg.attn_implementation
    set_varlen_backend(getattr(model_cfg, "varlen_backend", "auto") or "auto")
    vocab = len(tokenizer)
    if model_cfg.name_or_path:
        source = resolve_source(model_cfg.name_or_path)
        if source.is_gguf:
            model = load_gguf_model(source, dtype)
            model.set_attn_implementation(attn)
        else:
            model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, attn_implementation=attn)
        emb = model.get_input_embeddings().weight.shape[0]
        if emb < vocab:
            raise InputError(
                f"{model_cfg.name_or_path}: {emb} embeddings but the tokenizer has {vocab} tokens (wrong tokenizer?)"
            )
    else:
        model = build_tiny_model(model_cfg.tiny, vocab, tokenizer.pad_token_id, dtype)
        model.config.bos_token_id = tokenizer.bos_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
        model.set_attn_implementation(attn)
    if model.config._attn_implementation != attn:
        raise RuntimeError(
            f"attention implementation {attn!r} was not applied (got {model.config._attn_implementation!r})"
        )
    if model_cfg.gradient_checkpointing:
        _enable_activation_checkpointing(model)
    if getattr(model_cfg, "autocast", None):
        enable_autocast(model, resolve_dtype(model_cfg.autocast))
    if getattr(model_cfg, "liger_kernels", False):
        apply_liger_kernels(model, device)
    recompute = getattr(model_cfg, "recompute_norms_and_glu", None)
    if recompute is None:  # measured on CPU; CUDA runs are left as they were (Liger does it there)
        recompute = device.type == "cpu" and not getattr(model_cfg, "compile", False)
    if recompute:
        recompute_norms_and_glu(model)
    model.to(device)
    model.train()
    return model


def enable_autocast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Run the decoder of `model` under torch.autocast(dtype) on whatever device it is on, and
    hand its last hidden states back in the LM head's dtype: weights, optimizer state, the LM
    head and the fused losses stay in the model's dtype (fp32 masters). On a CPU with bf16
    matrix units this is where the time goes (the decoder's matmuls), see README.md."""
    decoder = backbone(model)
    head_dtype = model.get_output_embeddings().weight.dtype
    active: list = []

    def enter(module, args, kwargs):
        device_type = next(module.parameters()).device.type
        context = torch.autocast(device_type=device_type, dtype=dtype)
        context.__enter__()
        active.append(context)

    def leave(module, args, kwargs, output):
        active.pop().__exit__(None, None, None)
        if getattr(output, "last_hidden_state", None) is not None:
            output.last_hidden_state = output.last_hidden_state.to(head_dtype)
        return output

    decoder.register_forward_pre_hook(enter, with_kwargs=True)
    decoder.register_forward_hook(leave, with_kwargs=True, always_call=True)


def numeric_mode(dtype: str | torch.dtype, autocast: str | torch.dtype | None) -> str:
    """How a model's scores were computed, as the tables print it: "float32" or "float32, bfloat16
    autocast". Two figures compare bit for bit only in the same mode."""

    def name(d) -> str:
        return str(resolve_dtype(d)).removeprefix("torch.")

    return name(dtype) + (f", {name(autocast)} autocast" if autocast else "")


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder of a *ForCausalLM (model.model for Qwen2/Llama): returns last hidden states
    [B, T, H] (`.last_hidden_state`) without computing logits."""
    prefix = getattr(model, "base_model_prefix", "model")
    decoder = getattr(model, prefix, None)
    if decoder is None:
        decoder = model.get_decoder()
    return decoder


def lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The output embedding weight [V, H] (the LM head; tied to the input embeddings in
    Qwen2.5-0.5B). Qwen's head has no bias. Under FSDP2 read it inside the root's forward."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("an LM head with a bias is not supported by the score head")
    return head.weight
