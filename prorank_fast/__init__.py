"""prorank-fast: train small causal language models into document rerankers (ProRank), fast."""

__version__ = "0.1.0"

__all__ = ["Reranker", "__version__"]


def __getattr__(name: str):
    # Lazy: `import prorank_fast` stays cheap (no torch / transformers) until Reranker is used.
    if name == "Reranker":
        from .rerank import Reranker

        return Reranker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
