"""The stage-1 policy: a *ForCausalLM wrapped so that one forward is a shared-prefix pass
plus the fused GRPO loss, the log-probs of old/reference passes, or sampling logits.

The policy pass shares the prefix: a packed row of prompts runs once with gradients, and a
second packed row holds the completions' input tokens, whose attention reads the prompt
keys/values (modeling.shared_prefix.SharedPrefix). One-token completions need no second row:
the hidden state at each prompt's last position predicts every completion's only token, so a
whole group is one forward. Nothing is ever prefilled or backpropagated G times."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prorank_fast.kernels import fused_linear_grpo_loss, fused_linear_logprobs

from ..modeling import backbone, batch_invariant_linears, lm_head_weight
from ..modeling.shared_prefix import SharedPrefix
from .batches import GroupBatch, prompt_ranges


@dataclass
class GRPOOptions:
    """The fused loss's options (stage1 section of a recipe)."""

    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    temperature: float = 1.0
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    max_completion_length: int | None = None
    # Answer-entropy floor (ours, against the collapse to one answer): the entropy of the answer
    # distribution over the output set at each prompt's answer position, softmax(z[output_ids]),
    # is kept above `answer_entropy_floor` nats by a penalty coef * max(0, floor - H) per prompt.
    output_ids: tuple[int, ...] = ()
    answer_entropy_floor: float = 0.0
    answer_entropy_coef: float = 1.0
    # the decoder's linears and the LM head batch-invariant (modeling.invariant): the policy pass
    # then computes the sampler's log-probs exactly
    batch_invariant: bool = False


class PolicyForGRPO(torch.nn.Module):
    """Wraps a *ForCausalLM for stage 1; it is the FSDP root, so the LM head is read inside
    its forward (after FSDP gathered it), as in scoring.RerankerScorer.

    forward(batch, head=...):
      "grpo"     -> (loss, metrics): fused_linear_grpo_loss over the batch's completion tokens
      "logprobs" -> [N] log-probs of the completion tokens (old / reference passes)
      "sample"   -> [rows, V] logits at `rows` of a pass described by `prefix` (sampling); with
                    `draw` (logits -> [rows, n] token ids), (tokens, their log-probs [rows, n]),
                    computed as the "grpo"/"logprobs" heads compute them
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def _decoder(self, input_ids, positions, prefix: SharedPrefix) -> torch.Tensor:
        out = backbone(self.lm)(
            input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0), use_cache=False,
            shared_prefix=prefix,
        )  # fmt: skip
        return out.last_hidden_state[0]

    def completion_states(self, batch: GroupBatch) -> torch.Tensor:
        """[N, H]: for each completion token, the hidden state that predicts it."""
        return self._states(batch).index_select(0, batch.pred_index)

    def _states(self, batch: GroupBatch, as_decoded: bool = False) -> torch.Tensor:
        """cat([each prompt's last state [P, H], the completion row's states]): pred_index's domain.

        as_decoded: every completion token's state is computed exactly as at sampling time, where
        the t-th input token of a completion ran alone, attending to its prompt and its own earlier
        tokens. On CPU the completion row runs in one pass whose attention makes that call for each
        token (attention.per_query_row_attention; the linears are batch-invariant); elsewhere the
        row runs token by token, one pass per position. Otherwise one plain pass (several queries
        per completion, equal to rounding)."""
        device = batch.prompt_ids.device
        prefix = SharedPrefix()
        prefix.begin_pass(
            [torch.empty(0, dtype=torch.int64)] * batch.num_prompts, batch.prompt_lengths, append=True, device=device
        )
        prompt_states = self._decoder(batch.prompt_ids, batch.prompt_positions, prefix)
        last = torch.tensor(batch.prompt_lengths, device=device).cumsum(0) - 1
        states = [prompt_states.index_select(0, last)]
        if batch.comp_lengths:
            ranges = prompt_ranges(batch.prompt_lengths)
            several_queries = as_decoded and max(batch.comp_lengths) > 1  # one token per completion: already as decoded
            if several_queries and device.type != "cpu":
                states.append(self._completion_states_token_by_token(batch, prefix, ranges))
            else:
                prefix.begin_pass(
                    [ranges[p] for p in batch.comp_prompt], batch.comp_lengths, append=False, device=device,
                    per_query_row=several_queries,
                )  # fmt: skip
                states.append(self._decoder(batch.comp_ids, batch.comp_positions, prefix))
        return torch.cat(states)

    def _completion_states_token_by_token(self, batch: GroupBatch, prefix: SharedPrefix, ranges) -> torch.Tensor:
        """The completion row's states [T_c, H], one pass per position, as sampling.py's decode steps."""
        device = batch.comp_ids.device
        starts = [0]
        for n in batch.comp_lengths[:-1]:
            starts.append(starts[-1] + n)
        own: list[list[int]] = [[] for _ in batch.comp_lengths]  # store positions of each one's tokens
        outs, order = [], []
        for t in range(max(batch.comp_lengths)):
            live = [c for c, n in enumerate(batch.comp_lengths) if n > t]
            base = prefix.size
            prefix.begin_pass(
                [torch.cat([ranges[batch.comp_prompt[c]], torch.tensor(own[c], dtype=torch.int64)]) for c in live],
                [1] * len(live), append=True, device=device,
            )  # fmt: skip
            rows = [starts[c] + t for c in live]
            index = torch.tensor(rows, device=device)
            outs.append(self._decoder(batch.comp_ids[index], batch.comp_positions[index], prefix))
            order += rows
            for i, c in enumerate(live):
                own[c].append(base + i)
        inverse = torch.empty(len(order), dtype=torch.int64)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return torch.cat(outs).index_select(0, inverse.to(device))

    def forward(self, batch=None, *, head: str = "grpo", options: GRPOOptions | None = None,
                num_items_in_batch=None, input_ids=None, positions=None, prefix=None, rows=None,
                penalty_scale: float = 1.0, draw=None):  # fmt: skip
        weight = lm_head_weight(self.lm)
        o = options or GRPOOptions()
        if head == "sample":
            with batch_invariant_linears(self.lm, o.batch_invariant):
                states = self._decoder(input_ids, positions, prefix).index_select(0, rows)
            logits = (states @ weight.t()).float()  # in the head's dtype: no fp32 copy of [V, H] per call
            if draw is None:
                return logits
            tokens = draw(logits)  # [rows, n]
            n = tokens.shape[1]
            logp = fused_linear_logprobs(
                states.repeat_interleave(n, dim=0), weight, tokens.reshape(-1), temperature=o.temperature,
                batch_invariant=o.batch_invariant,
            )  # fmt: skip
            return tokens, logp.view(-1, n)
        with batch_invariant_linears(self.lm, o.batch_invariant):
            states = self._states(batch, as_decoded=o.batch_invariant)
        hidden = states.index_select(0, batch.pred_index)
        if head == "logprobs":
            return fused_linear_logprobs(
                hidden, weight, batch.token_ids, temperature=o.temperature, batch_invariant=o.batch_invariant
            )
        if head != "grpo":
            raise ValueError(f"head must be grpo | logprobs | sample, got {head!r}")
        loss, metrics = fused_linear_grpo_loss(
            hidden, weight, batch.token_ids, batch.advantages, batch.seq_ids,
            old_logprobs=batch.old_logprobs, ref_logprobs=batch.ref_logprobs if o.beta else None,
            beta=o.beta, epsilon_low=o.epsilon_low, epsilon_high=o.epsilon_high, delta=o.delta,
            temperature=o.temperature, loss_type=o.loss_type, importance_sampling_level=o.importance_sampling_level,
            max_completion_length=o.max_completion_length, num_items_in_batch=num_items_in_batch,
            batch_invariant=o.batch_invariant,
        )  # fmt: skip
        if o.output_ids:  # the answer distribution's entropy: logged, and floored when asked
            z = states[: batch.num_prompts].float() @ weight[list(o.output_ids)].float().t() / o.temperature
            logq = z.log_softmax(dim=-1)
            entropy = -(logq.exp() * logq).sum(dim=-1)
            metrics = {**metrics, "answer_entropy": entropy.mean().detach()}
            if o.answer_entropy_floor > 0:
                # penalty_scale turns the sum over this micro-batch's prompts into its share of the step's mean
                penalty = (o.answer_entropy_floor - entropy).clamp(min=0).sum()
                loss = loss + o.answer_entropy_coef * penalty * penalty_scale
        return loss, metrics
