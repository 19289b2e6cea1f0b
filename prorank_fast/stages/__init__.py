"""The stages as runs of the one loop, and what they share.

prepare.py   tokenizer, template, model, training groups, held-out data, stage-1 prompts
held_out.py  held-out nDCG@10 of the model being trained (through Reranker)
stage1.py    run_stage1: GRPO prompt warmup
stage2.py    run_stage2: fine-grained score learning
"""

from .prepare import Prepared, initial_model, load_exported, prepare
from .stage1 import run_stage1
from .stage2 import run_stage2

__all__ = ["Prepared", "initial_model", "load_exported", "prepare", "run_stage1", "run_stage2"]
