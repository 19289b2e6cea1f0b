"""prorank-fast: train small causal language models into document rerankers (ProRank), fast."""

__version__ = "0.1.0"
