"""prorank_fast.kernels: fused LM-head losses for GRPO and restricted-vocabulary scoring.

Stable API (other trainers import it)::

    from prorank_fast.kernels import (fused_linear_grpo_loss, FusedLinearGRPOLoss,
        fused_linear_logprobs, restricted_vocab_score, restricted_vocab_score_loss,
        batch_invariant_linear)

``impl="auto"`` runs Triton on CUDA tensors and a chunked PyTorch path elsewhere; neither
materializes the [N, V] logits. ``reference`` holds the fp32 specification.
``batch_invariant_linear`` is a linear whose rows never depend on the other rows of the call
(the reranker's scores and the sampler's log-probs use it).
"""

from . import reference
from .grpo import FusedLinearGRPOLoss, fused_linear_grpo_loss
from .invariant_matmul import batch_invariant_linear
from .logprobs import fused_linear_logprobs
from .score import restricted_vocab_score, restricted_vocab_score_loss

__all__ = [
    "FusedLinearGRPOLoss",
    "batch_invariant_linear",
    "fused_linear_grpo_loss",
    "fused_linear_logprobs",
    "reference",
    "restricted_vocab_score",
    "restricted_vocab_score_loss",
]
