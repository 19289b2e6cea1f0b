"""prorank-fast benchmarks, one file per theme, each with its CPU command and its GPU-suite section.

``python -m benchmarks.grpo_loss``    fused GRPO loss on CPU: time and peak memory growth (also ``pytest benchmarks/``)
``python -m benchmarks.stage1_step``  stage-1 GRPO step on CPU
``python -m benchmarks.stage2_step``  stage-2 training step on CPU
``python -m benchmarks.rerank``       reranking throughput on CPU
``python -m benchmarks.gpu_suite``    one command for a lent H100/H200 (``--smoke`` runs it on CPU at tiny sizes)

Importing the package loads the kernels once (``_common.load_kernels``: ``kernels/`` as
``prorank_fast.kernels`` on a bare checkout), so that every file imports the kernels and the
trainer plainly. See ``benchmarks/README.md``.
"""

from ._common import kernels

__all__ = ["kernels"]
