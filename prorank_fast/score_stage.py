"""Stage 2: fine-grained score learning on the LM head, no new layers.

score = sum_k w_k * z[token_k] at the last prompt position (by default z["1"] - z["0"]),
trained with bce | mse | listwise | distill. The backbone runs once over a packed batch
(no padding, varlen attention); only the last position of each sequence reaches the head,
and only the K output-set rows of the head are read (prorank_fast.kernels.score).
"""

from __future__ import annotations

import torch

from prorank_fast.kernels import restricted_vocab_score, restricted_vocab_score_loss

from .model import backbone, lm_head_weight
from .packing import PackedBatch


def _varlen_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int) -> dict:
    """What transformers forwards to the registered attention function for packed input."""
    return {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": max_seqlen,
        "max_length_k": max_seqlen,
    }


class RerankerForTraining(torch.nn.Module):
    """Wraps a *ForCausalLM so that one forward = backbone + restricted-vocabulary loss.

    It is the FSDP root: the LM head (tied to the embeddings in Qwen2.5-0.5B) belongs to
    the root's parameter group, which FSDP2 gathers in the root's pre-forward hook, so the
    head's weight read below is the full, unsharded tensor. Reading it outside a forward of
    the root (after backbone() returned) is the bug TRL and Liger hit under ZeRO-3 / FSDP.
    """

    def __init__(self, lm: torch.nn.Module, output_ids, token_weights, loss: str, temperature: float = 1.0):
        super().__init__()
        self.lm = lm
        self.output_ids = tuple(int(i) for i in output_ids)
        self.token_weights = tuple(float(w) for w in token_weights)
        self.loss = loss
        self.temperature = temperature

    def last_hidden(self, input_ids, position_ids, cu_seqlens, max_seqlen, last_index) -> torch.Tensor:
        """[S, H] hidden states at the last token of each packed sequence."""
        out = backbone(self.lm)(
            input_ids=input_ids, position_ids=position_ids, use_cache=False, **_varlen_kwargs(cu_seqlens, max_seqlen)
        )
        return out.last_hidden_state[0].index_select(0, last_index)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        last_index: torch.Tensor,
        labels: torch.Tensor | None = None,
        teacher_scores: torch.Tensor | None = None,
        group_size: int | None = None,
    ):
        """Returns (summed loss, scores [S]) with labels, else scores [S] only."""
        hidden = self.last_hidden(input_ids, position_ids, cu_seqlens, max_seqlen, last_index)
        weight = lm_head_weight(self.lm)
        if labels is None:
            return restricted_vocab_score(hidden, weight, self.output_ids, self.token_weights)
        return restricted_vocab_score_loss(
            hidden,
            weight,
            labels if self.loss != "distill" else None,
            token_ids=self.output_ids,
            token_weights=self.token_weights,
            loss=self.loss,
            group_size=group_size,
            teacher_scores=teacher_scores,
            temperature=self.temperature,
            reduction="sum",
        )


def batch_inputs(batch: PackedBatch, with_labels: bool = True) -> dict:
    """The keyword arguments of RerankerForTraining.forward for one packed batch."""
    kwargs = dict(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        cu_seqlens=batch.cu_seqlens,
        max_seqlen=batch.max_seqlen,
        last_index=batch.last_index,
    )
    if with_labels:
        kwargs.update(labels=batch.labels, teacher_scores=batch.teacher_scores, group_size=batch.group_size)
    return kwargs


def loss_units(batch: PackedBatch, loss: str) -> int:
    """What one micro-batch's summed loss counts: groups for listwise/distill, pairs otherwise.
    Accumulation divides by the step's total so that the gradient is a mean over the step."""
    if loss in ("listwise", "distill"):
        return batch.num_sequences // batch.group_size
    return batch.num_sequences
