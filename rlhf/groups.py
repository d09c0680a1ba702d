"""What the critic-free RL stage does with its groups beyond the advantages: DAPO's dynamic
sampling, and the overlong reward shaping any algorithm can use.

Dynamic sampling (``dynamic_sampling``, on in the ``dapo`` preset). A group whose samples all
got the same reward has advantage 0 in every row (every estimator subtracts the group's mean):
it adds nothing to the policy gradient, yet it takes its place in the batch and, under a token
normaliser, shrinks everyone else's share of the step. DAPO (Yu et al. 2025) drops those groups
and samples more prompts until the batch is full of groups that teach something. Here one
sampling round is what an iteration samples anyway (``rollout_batch_size / group_size`` prompts,
``group_size`` samples each, scored); rounds repeat, at most ``dynamic_sampling_rounds`` in all,
until the kept groups fill the batch. The batch is then the first kept groups in sampling order;
the rows past it are dropped. When the rounds run out first, the batch is completed with flat
groups (the earliest first) and the metrics say how many (``dynamic_sampling/filled_groups``),
so the update always sees ``rollout_batch_size`` rows and the schedule stays as planned.

"Flat" is judged on the scores the rewards come from (after the overlong shaping and
``score_clip``), not on the KL penalty: a group is flat when those scores' standard deviation is
at most 1e-6 (the same test as the ``group/zero_std_fraction`` metric), i.e. when its advantages
would be 0 with the KL in the loss. DAPO's recipe tests the task's accuracy alone; with
``overlong_buffer`` set the two differ on a group whose answers are all right (or all wrong) but
of different lengths in the buffer: its penalties differ, it has advantages, and it is kept.

Under torchrun each rank samples its share of every round; rounds continue until every rank has
its share of kept groups (one all-reduce of the counts per round), so that every rank runs the
same rounds (the engine's stopping test is a collective) and holds the same number of rows.

Every round draws its prompts and its sampling seed from the iteration's generator, after the
rounds before it: a resumed run replays the same rounds.

Overlong shaping (``overlong_buffer``, DAPO's soft overlong punishment). A response of L tokens
(EOS included) gets ``overlong_penalty * min(0, (max_new_tokens - overlong_buffer - L) /
overlong_buffer)`` added to its score: nothing up to ``max_new_tokens - overlong_buffer``
tokens, then linearly down to ``-overlong_penalty`` at ``max_new_tokens`` (a truncated response
has L = max_new_tokens). The reward model's or function's own score is what ``proxy_reward``
reports; the penalty has its own metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf import distributed
from rlhf.engine import Generation

__all__ = ["FLAT_STD", "Round", "dynamic_sample", "flat_groups", "overlong_penalty",
           "reward_scores"]

# a group whose rewards' std is at most this teaches nothing (advantages 0); rl._group_metrics'
# group/zero_std_fraction applies the same test
FLAT_STD = 1e-6


def flat_groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) per-row values in consecutive groups of ``group_size`` -> (B / G,) bool: the groups
    whose values are all the same (standard deviation <= ``FLAT_STD``)."""
    groups = values.double().view(-1, group_size)
    if group_size == 1:
        return torch.ones(groups.shape[0], dtype=torch.bool, device=values.device)
    return groups.std(-1, unbiased=True) <= FLAT_STD


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int,
                     penalty: float) -> torch.Tensor:
    """(B,) response lengths (tokens, EOS included) -> (B,) fp32 penalties <= 0: 0 up to
    ``max_new_tokens - buffer`` tokens, then linear down to ``-penalty`` at ``max_new_tokens``."""
    if buffer == 0:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    excess = lengths.double() - (max_new_tokens - buffer)
    return (-(excess / buffer) * penalty).clamp(max=0.0).float()


def reward_scores(scores: torch.Tensor, generation: Generation, cfg) -> torch.Tensor:
    """The scores the rewards come from: the reward's scores plus the overlong penalty (when
    ``cfg.overlong_buffer`` > 0); ``score_clip`` is applied by the reward shaping after."""
    if cfg.overlong_buffer == 0:
        return scores
    return scores + overlong_penalty(generation.response_lengths, cfg.max_new_tokens,
                                     cfg.overlong_buffer, cfg.overlong_penalty)


def _clipped(scores: torch.Tensor, score_clip: float | None) -> torch.Tensor:
    return scores if score_clip is None else scores.clamp(-score_clip, score_clip)


@dataclass
class Round:
    """One sampling round: the prompts' indices (one per group), their generation (G rows per
    prompt, consecutive) and the reward's scores (B,) of the rows."""

    rows: torch.Tensor
    generation: Generation
    scores: torch.Tensor


def dynamic_sample(first: Round, sample_round: Callable[[], Round], cfg, pad_token_id: int
                   ) -> tuple[Round, dict]:
    """Sampling rounds (``first``, then ``sample_round()`` as needed) -> (the batch: this rank's
    ``rollout_batch_size / world`` rows of kept groups, flat groups filling what the rounds
    did not, metrics). See the module docstring."""
    group_size = cfg.settings.group_size
    need = first.rows.shape[0]  # groups of this rank
    rounds = [first]
    kept: list[tuple[int, int]] = []  # (round, group), informative, in sampling order
    flat: list[tuple[int, int]] = []
    while True:
        last = rounds[-1]
        shaped = _clipped(reward_scores(last.scores, last.generation, cfg), cfg.score_clip)
        is_flat = flat_groups(shaped, group_size).tolist()
        for group, no_spread in enumerate(is_flat):
            (flat if no_spread else kept).append((len(rounds) - 1, group))
        # every rank runs the same rounds: stop when every rank has its share
        if distributed.min_count(len(kept)) >= need or len(rounds) >= cfg.dynamic_sampling_rounds:
            break
        rounds.append(sample_round())
    filled = max(0, need - len(kept))
    chosen = kept[:need] + flat[:filled]
    parts, scores, rows = [], [], []
    for r, round_ in enumerate(rounds):
        groups = [g for rr, g in chosen if rr == r]
        if not groups:
            continue
        index = torch.tensor(groups, dtype=torch.long)
        row_index = (index[:, None] * group_size + torch.arange(group_size)).flatten()
        row_index = row_index.to(round_.generation.sequences.device)
        parts.append(round_.generation.rows(row_index))
        scores.append(round_.scores[row_index])
        rows.append(round_.rows[index.to(round_.rows.device)])
    counts = distributed.sum_counts({"groups": len(rounds) * need, "kept": len(kept),
                                     "filled": filled})
    metrics = {
        "dynamic_sampling/rounds": len(rounds),
        # groups with any spread among every group sampled this iteration (all rounds)
        "dynamic_sampling/kept_fraction": counts["kept"] / max(1, counts["groups"]),
        "dynamic_sampling/filled_groups": counts["filled"],
    }
    batch = Round(torch.cat(rows), Generation.concat(parts, pad_token_id), torch.cat(scores))
    return batch, metrics
