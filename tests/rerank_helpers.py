"""Exported tiny rerankers for the Reranker / export / CLI tests: no training, no download.

A demo byte-level BPE tokenizer (Qwen2 pre-tokenization, trained on a few sentences) or the
real Qwen2 tokenizer, a randomly initialised tiny Qwen2ForCausalLM, saved as export_model
saves it (save_pretrained + tokenizer + prorank_fast.export.write_ecosystem_files).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from prorank_fast.data import get_template
from prorank_fast.export import write_ecosystem_files
from prorank_fast.modeling import build_tiny_model, load_tokenizer

TEXTS = [
    "the cat sat on the mat",
    "dogs bark at night and sleep all day",
    "what is the capital of france",
    "paris is the capital and largest city of france",
    "bm25 is a ranking function used by search engines",
    "a reranker scores each query document pair",
] * 10

# Pairs of different lengths; none ends in punctuation or whitespace (see test_export for those).
PAIRS = [
    ("what is the capital of france", "paris is the capital and largest city of france"),
    ("cat", "the cat sat on the mat"),
    ("what is the capital of france", "dogs bark at night"),
    ("bm25 ranking", "bm25 is a ranking function used by search engines " * 6 + "and more"),
    ("a", "b"),
]


def demo_tokenizer(folder: Path):
    from prorank_fast.data.demo import train_demo_tokenizer

    if not (folder / "tokenizer.json").exists():
        train_demo_tokenizer(TEXTS, vocab_size=600, out_dir=folder)
    return load_tokenizer(folder)


def qwen2_tokenizer_path() -> str | None:
    return os.environ.get("PRORANK_QWEN2_TOKENIZER") or None


def export_tiny(
    folder: Path,
    tokenizer,
    *,
    template: str = "prorank",
    instruction: str | None = None,
    max_length: int = 320,
    token_weights=(1.0, -1.0),
    seed: int = 0,
) -> Path:
    """A random tiny Qwen2 reranker exported to ``folder`` (returns it)."""
    tpl = get_template(template)
    output_ids = tpl.output_token_ids(tokenizer)
    torch.manual_seed(seed)
    # 10x the default init scale: scores that differ across pairs by ~1, so that one wrong
    # token or position shows far above the tolerances
    model = build_tiny_model({"initializer_range": 0.2}, len(tokenizer), tokenizer.pad_token_id, torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_ecosystem_files(folder, tokenizer, tpl, output_ids, token_weights, instruction, max_length, 16)
    return folder
