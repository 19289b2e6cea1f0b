"""Keys and values that later packed passes attend to without recomputing them (stage 1:
a prompt runs once, its G completions read its keys/values; Reranker: a query's prefix runs
once per packed batch, its documents read its keys/values)."""

from __future__ import annotations

import torch

from .attention import per_query_row_attention, varlen_attention


class SharedPrefix:
    """Keys and values that later packed passes attend to without recomputing them.

    GRPO runs a prompt once and lets its G completions read the prompt's keys and values
    (training), and sampling decodes token by token against them. Per layer a store holds every
    key/value computed so far, flat [T_store, Hkv, D] (post-RoPE, as a KV cache holds them).
    A pass is a packed row of new tokens in `len(new_lengths)` sequences; sequence j attends to
    the store positions `prefixes[j]` followed by its own new tokens, causally (the diagonal
    aligned bottom-right, as with a KV cache). The model is called with `shared_prefix=self`
    (transformers passes the keyword through to the attention function) and restarting or
    continuing `position_ids` chosen by the caller.

    With gradients enabled the store keeps the autograd graph: a completion pass's gradient
    flows into the prompt pass's keys and values, so a shared prompt is backpropagated once.
    """

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.size = 0  # tokens in the store once the current pass has run
        self._base = 0

    def begin_pass(
        self, prefixes: list[torch.Tensor], new_lengths: list[int], *, append: bool, device, per_query_row: bool = False
    ) -> None:
        """Describe the next forward. prefixes: one int64 tensor of store positions per
        sequence (may be empty); new_lengths: the new tokens of each sequence, in row order.
        append: the pass's keys/values join the store (at positions size, size + 1, ...).
        per_query_row: every new token attends as a decode step of its own would
        (attention.per_query_row_attention): one pass with the bits of one pass per position."""
        if len(prefixes) != len(new_lengths):
            raise ValueError(f"{len(prefixes)} prefixes for {len(new_lengths)} sequences")
        if any(n < 1 for n in new_lengths):
            raise ValueError("every sequence of a pass needs at least one new token")
        base = self.size
        total_new = sum(new_lengths)
        new_starts = torch.tensor([0, *new_lengths], dtype=torch.int64).cumsum(0)
        gather = []
        k_lengths = []
        for j, prefix in enumerate(prefixes):
            prefix = prefix.to(dtype=torch.int64, device="cpu").reshape(-1)
            if prefix.numel() and int(prefix.max()) >= base:
                raise ValueError(f"sequence {j} attends to store position {int(prefix.max())} of {base}")
            # the new tokens sit after the store in cat([store, new])
            own = torch.arange(int(new_starts[j]), int(new_starts[j + 1]), dtype=torch.int64) + base
            gather += [prefix, own]
            k_lengths.append(prefix.numel() + new_lengths[j])
        self.gather = torch.cat(gather).to(device)
        self.cu_q = torch.tensor([0, *new_lengths], dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
        self.cu_k = torch.tensor([0, *k_lengths], dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
        self.max_q, self.max_k = max(new_lengths), max(k_lengths)
        self.total_new = total_new
        self.append = append
        self.per_query_row = per_query_row
        self._base = base
        if append:
            self.size = base + total_new

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None, causal: bool
    ) -> torch.Tensor:
        """q: [Tq, Hq, D], k/v: [Tq, Hkv, D] (this pass's tokens) -> [Tq, Hq, D]."""
        if q.shape[0] != self.total_new:
            raise ValueError(f"the pass was planned for {self.total_new} tokens, the row holds {q.shape[0]}")
        store_k, store_v = self.keys.get(layer), self.values.get(layer)
        if store_k is None:
            all_k, all_v = k, v
        else:
            if store_k.shape[0] != self._base:
                raise RuntimeError(f"layer {layer}: store holds {store_k.shape[0]} tokens, expected {self._base}")
            all_k, all_v = torch.cat([store_k, k]), torch.cat([store_v, v])
        if self.append:
            self.keys[layer], self.values[layer] = all_k, all_v
        # the gather happens inside: with gradients on CPU the store is kept for backward, not a copy per reader
        if self.per_query_row:
            return per_query_row_attention(
                q, all_k, all_v, self.cu_q, self.cu_k, scale=scale, causal=causal, gather=self.gather
            )
        return varlen_attention(
            q, all_k, all_v, self.cu_q, self.cu_k, self.max_q, self.max_k, scale=scale, causal=causal,
            gather=self.gather,
        )  # fmt: skip
