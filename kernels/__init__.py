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

if __name__ == "kernels":
    # This folder sits at the checkout's root, which `python -m`, pytest and torchrun put first on
    # sys.path, and `kernels` is also Hugging Face's package, which transformers imports. Under that
    # name this file stands aside: it loads the `kernels` that the rest of sys.path holds in its
    # place, or fails as if this folder were not there. Nothing of ours is importable as `kernels`.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
else:
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
