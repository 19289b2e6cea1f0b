"""The model: loading, varlen attention over packed rows, shared-prefix passes.

attention.py     varlen attention registered with transformers ("prorank_varlen"), backends detected once
shared_prefix.py SharedPrefix: keys/values computed once, attended to by later packed passes
invariant.py     batch_invariant_linears: a model's linears on fixed row tiles (bitwise batch invariance);
                 blocked_attention: CPU attention on fixed blocks (shared prefix == whole prompt)
model.py         load_model / load_tokenizer / build_tiny_model / enable_autocast / numeric_mode /
                 recompute_norms_and_glu; backbone() and lm_head_weight()
sources.py       where weights come from: hub id, folder, GGUF file or pkg:<package>/<file.gguf>
"""

from .attention import ATTN_IMPLEMENTATION, resolve_backend, set_varlen_backend
from .invariant import batch_invariant_linears, blocked_attention
from .model import (
    TINY_DEFAULTS,
    apply_liger_kernels,
    backbone,
    build_tiny_model,
    enable_autocast,
    liger_available,
    lm_head_weight,
    load_model,
    load_tokenizer,
    numeric_mode,
    recompute_norms_and_glu,
    resolve_dtype,
)
from .shared_prefix import SharedPrefix

__all__ = [
    "ATTN_IMPLEMENTATION",
    "TINY_DEFAULTS",
    "SharedPrefix",
    "apply_liger_kernels",
    "backbone",
    "batch_invariant_linears",
    "blocked_attention",
    "build_tiny_model",
    "enable_autocast",
    "liger_available",
    "lm_head_weight",
    "load_model",
    "load_tokenizer",
    "numeric_mode",
    "recompute_norms_and_glu",
    "resolve_backend",
    "resolve_dtype",
    "set_varlen_backend",
]
