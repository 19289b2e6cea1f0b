"""The reranker score and its training loss, read off the LM head (no new layers).

score = sum_k w_k * z[token_k] at the last prompt position (by default z["1"] - z["0"]),
trained with bce | mse | listwise | distill. The backbone runs once over a packed batch
(no padding, varlen attention); only the last position of each sequence reaches the head,
and only the K output-set rows of the head are read (prorank_fast.kernels.score). Training
(stage 2), held-out evaluation and Reranker all score through RerankerScorer.
"""

from __future__ import annotations

import torch

from prorank_fast.kernels import restricted_vocab_score, restricted_vocab_score_loss

from .modeling import backbone, lm_head_weight
from .packing import PackedBatch

__all__ = ["RerankerScorer", "loss_units"]


class RerankerScorer(torch.nn.Module):
    """Wraps a *ForCausalLM so that one forward = backbone over a PackedBatch + the
    restricted-vocabulary score, and with `with_loss=True` its loss.

    It is the FSDP root: the LM head (tied to the embeddings in Qwen2.5-0.5B) belongs to
    the root's parameter group, which FSDP2 gathers in the root's pre-forward hook, so the
    head's weight read below is the full, unsharded tensor. Reading it outside a forward of
    the root (after backbone() returned) is the bug TRL and Liger hit under ZeRO-3 / FSDP.

    Args:
        lm: the *ForCausalLM (decoder at backbone(lm), head at lm_head_weight(lm)).
        output_ids: the output-set token ids, e.g. (16, 15) for "1"/"0" with Qwen2.
        token_weights: one weight per output id, e.g. (1.0, -1.0).
        loss: bce | mse | listwise | distill; None for a scorer that never trains.
        temperature: the distill softmax temperature.
    """

    def __init__(self, lm: torch.nn.Module, output_ids, token_weights, loss: str | None = None,
                 temperature: float = 1.0):  # fmt: skip
        super().__init__()
        self.lm = lm
        self.output_ids = tuple(int(i) for i in output_ids)
        self.token_weights = tuple(float(w) for w in token_weights)
        if len(self.token_weights) != len(self.output_ids):
            raise ValueError(f"{len(self.token_weights)} token_weights for {len(self.output_ids)} output_ids")
        self.loss = loss
        self.temperature = temperature

    def last_hidden(self, batch: PackedBatch) -> torch.Tensor:
        """[S, H] hidden states at the last token of each packed sequence."""
        out = backbone(self.lm)(**batch.model_inputs())
        return out.last_hidden_state[0].index_select(0, batch.last_index)

    def forward(self, batch: PackedBatch, with_loss: bool = False):
        """scores [S] (the head's dtype), or with `with_loss` (summed loss, scores [S])."""
        hidden = self.last_hidden(batch)
        weight = lm_head_weight(self.lm)
        if not with_loss:
            return restricted_vocab_score(hidden, weight, self.output_ids, self.token_weights)
        if self.loss is None:
            raise ValueError("RerankerScorer: built without a loss; pass loss= to train with it")
        return restricted_vocab_score_loss(
            hidden,
            weight,
            batch.labels if self.loss != "distill" else None,
            token_ids=self.output_ids,
            token_weights=self.token_weights,
            loss=self.loss,
            group_size=batch.group_size,
            teacher_scores=batch.teacher_scores,
            temperature=self.temperature,
            reduction="sum",
        )


def loss_units(batch: PackedBatch, loss: str) -> int:
    """What one micro-batch's summed loss counts: groups for listwise/distill, pairs otherwise.
    Accumulation divides by the step's total so that the gradient is a mean over the step."""
    if loss in ("listwise", "distill"):
        return batch.num_sequences // batch.group_size
    return batch.num_sequences
