"""prorank-fast benchmarks.

``python -m benchmarks.cpu_grpo``   CPU fused GRPO loss: time and peak memory growth (also ``pytest benchmarks/``).
``python -m benchmarks.gpu_suite``  one command for a lent H100/H200 (``--smoke`` runs it on CPU at tiny sizes).

See ``benchmarks/README.md``.
"""
