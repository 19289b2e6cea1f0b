"""prorank_fast.kernels: fused LM-head losses for GRPO and restricted-vocabulary scoring.

Stable API (other trainers import it)::

    from prorank_fast.kernels import (fused_linear_grpo_loss, FusedLinearGRPOLoss,
        fused_linear_logprobs, restricted_vocab_score, restricted_vocab_score_loss)

``impl="auto"`` runs Triton on CUDA tensors and a chunked PyTorch path elsewhere; neither
materializes the [N, V] logits. ``reference`` holds the fp32 specification.
"""

from . import reference
from .grpo import FusedLinearGRPOLoss, fused_linear_grpo_loss
from .logprobs import fused_linear_logprobs
from .score import restricted_vocab_score, restricted_vocab_score_loss

__all__ = [
    "FusedLinearGRPOLoss",
    "fused_linear_grpo_loss",
    "fused_linear_logprobs",
    "reference",
    "restricted_vocab_score",
    "restricted_vocab_score_loss",
]
