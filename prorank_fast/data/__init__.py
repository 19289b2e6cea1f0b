"""Data: records and readers, the one BEIR loader, prompt templates, the generated demo.

records.py   Example, ReadStats, Loc, field checks, JSONL / Parquet / `datasets` record sources
readers.py   read_examples: files, BEIR folders, `datasets` names -> Examples; shape_group
beir.py      BeirData and the one BEIR / NanoBEIR loader (training and evaluation)
splits.py    a collection's queries split into training / held-out; BM25-mined groups and balanced pairs
templates.py PromptTemplate, TEMPLATES, token-id prompts with document-only truncation
demo.py      the generated demo collection and its tokenizer
"""

from ..errors import BeirFormatError, DataError
from .beir import BeirData, Qrels, Run, load_beir
from .nanobeir import load_collection, load_hf_beir
from .readers import FORMATS, read_examples, shape_group
from .records import Example, ReadStats, iter_jsonl
from .templates import TEMPLATES, PromptTemplate, TokenizedGroup, get_template, tokenize_examples

__all__ = [
    "FORMATS",
    "TEMPLATES",
    "BeirData",
    "BeirFormatError",
    "DataError",
    "Example",
    "PromptTemplate",
    "Qrels",
    "ReadStats",
    "Run",
    "TokenizedGroup",
    "get_template",
    "iter_jsonl",
    "load_beir",
    "load_collection",
    "load_hf_beir",
    "read_examples",
    "shape_group",
    "tokenize_examples",
]
