"""Group-relative advantages for critic-free RL (GRPO, Dr. GRPO, RLOO) in one launch.

B scores r_i, one per sampled sequence, fall into groups (the samples of one prompt): either
consecutive groups of ``group_size`` or by ``group_ids`` (arbitrary integers, any order). For a
score in group g with n = n_g members, mean_g and unbiased std_g (reference.group_advantages is
the spec):

    grpo     A_i = (r_i - mean_g) / (std_g + eps)           (norm "group", the default)
    dr_grpo  A_i =  r_i - mean_g                            (norm "none", the default)
    rloo     A_i =  r_i - (sum_g - r_i) / (n - 1)           (norm "none", the default)
               = n / (n - 1) * (r_i - mean_g)

Any estimator takes any ``norm``: "group" divides the centred score by std_g + eps, "batch" by
the unbiased std of all B scores + eps (TRL's scale_rewards="batch"), "none" by nothing.
Groups of one: grpo uses mean 0 and std 1 (veRL's compute_grpo_outcome_advantage gives
r / (1 + eps)); dr_grpo and rloo give 0. The batch std of B = 1 is 1.

The kernel: program p owns BLOCK_I consecutive scores i and sweeps the scores j that can share
a group with them, BLOCK_J at a time, as a (BLOCK_I, BLOCK_J) "same group" tile:

* group_ids: every j in [0, B) (ids may be anything, so any j may match); B is a few thousand at
  most, so the B^2 comparisons are a few microseconds of work spread over B / BLOCK_I programs;
* group_size: only the groups that overlap the block, [floor(i0 / G) G, ceil((i0 + BLOCK_I) / G)
  G), so the work is B (BLOCK_I + G) comparisons in all.

Statistics are two-pass and shifted by the score's own value: pass 1 sums d_ij = r_j - r_i over
the group (count n_i, s_i = sum d_ij; r_i - mean_g = -s_i / n_i and r_i - mean of the others =
-s_i / (n_i - 1) come out with no cancellation); pass 2 (norm "group") sums (d_ij - s_i/n_i)^2,
the squared deviations from the group mean. Neither ever forms r^2 or a large sum of raw
scores, so fp32 is accurate for scores with a large common offset (e.g. rewards around 1e4
with a spread of 1). norm "batch": every program also sweeps all B scores in two passes shifted
by r_0 (the same order in every program, so all agree bit for bit).

One launch, no host sync, no atomics (deterministic). Bytes: the B scores (and ids) are read
once per program that needs them (from L2 after the first), B fp32 advantages written.

Not differentiable: advantages are rollout data. The result never requires grad, even when
scores do (it is computed from scores' data; no gradient flows back to them).
Float64 scores go to the float64 reference; the Triton path computes in fp32.
"""

import torch
import triton
import triton.language as tl

from rlhf_kernels import _native_losses, reference
from rlhf_kernels._alloc import empty
from rlhf_kernels._checks import int_setting, real_setting
from rlhf_kernels.backend import launch_directly, native_cpu_kernels, resolve_backend
from rlhf_kernels.ops._launch import CachedLaunch
from rlhf_kernels.ops._reduce import cdiv, next_power_of_2

__all__ = ["group_advantages"]

ESTIMATOR_CODES = {"grpo": 0, "dr_grpo": 1, "rloo": 2}
NORM_CODES = {"none": 0, "group": 1, "batch": 2}
_BLOCK_I = 32
_BLOCK_J = 128


@triton.jit
def _load_scores(scores_ptr, stride_scores, j, limit):
    """fp32 scores at indices j (0 past ``limit``)."""
    r_j = tl.load(scores_ptr + j.to(tl.int64) * stride_scores, mask=j < limit, other=0.0)
    return r_j.to(tl.float32)


@triton.jit
def _group_block(scores_ptr, ids_ptr, stride_scores, stride_ids, group_size, j, hi, id_i,
                 HAS_IDS: tl.constexpr):
    """Scores r_j of one block of indices j, and ``same``: (BLOCK_I, BLOCK_J) whether j < hi is
    in the group of each i."""
    j_ok = j < hi
    r_j = _load_scores(scores_ptr, stride_scores, j, hi)
    if HAS_IDS:
        id_j = tl.load(ids_ptr + j.to(tl.int64) * stride_ids, mask=j_ok, other=0)
    else:
        id_j = j // group_size
    same = j_ok[None, :] & (id_j[None, :] == id_i[:, None])
    return r_j, same


# n and group_size stay runtime values (no specialisation on == 1): B = 1 and groups of one run
# the same code as every other size, the code the interpreter tests.
@triton.jit(do_not_specialize=["n", "group_size"])
def _group_advantages_kernel(
    scores_ptr, ids_ptr, out_ptr,
    n, stride_scores, stride_ids, group_size,
    eps,
    HAS_IDS: tl.constexpr, ESTIMATOR: tl.constexpr, NORM: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    first = tl.program_id(0) * BLOCK_I
    i = first + tl.arange(0, BLOCK_I)
    i_ok = i < n
    r_i = _load_scores(scores_ptr, stride_scores, i, n)
    if HAS_IDS:
        id_i = tl.load(ids_ptr + i.to(tl.int64) * stride_ids, mask=i_ok, other=0)
        lo = 0
        hi = n
    else:
        id_i = i // group_size
        lo = (first // group_size) * group_size
        hi = tl.minimum(n, tl.cdiv(first + BLOCK_I, group_size) * group_size)
    lane = tl.arange(0, BLOCK_J)

    # Pass 1: group size and sum of r_j - r_i over the group (r_i's own term is 0).
    count = tl.zeros((BLOCK_I,), tl.float32)
    shifted_sum = tl.zeros((BLOCK_I,), tl.float32)
    for j0 in range(lo, hi, BLOCK_J):
        r_j, same = _group_block(scores_ptr, ids_ptr, stride_scores, stride_ids, group_size,
                                 j0 + lane, hi, id_i, HAS_IDS)
        count += tl.sum(same.to(tl.float32), axis=1)
        # where, not a multiply by `same`: a NaN score of another group must not leak in.
        shifted_sum += tl.sum(tl.where(same, r_j[None, :] - r_i[:, None], 0.0), axis=1)
    alone = count <= 1.0  # (a lane past B has count 0; it is not stored)
    # mean_g - r_i, without forming mean_g (no cancellation against a large offset).
    mean_minus_r = shifted_sum / tl.maximum(count, 1.0)

    if ESTIMATOR == 0:  # grpo: a lone score's mean is taken as 0
        centred = tl.where(alone, r_i, -mean_minus_r)
    elif ESTIMATOR == 1:  # dr_grpo
        centred = tl.where(alone, 0.0, -mean_minus_r)
    else:  # rloo: r_i - mean of the n - 1 others = -(sum of r_j - r_i) / (n - 1)
        centred = tl.where(alone, 0.0, -shifted_sum / tl.maximum(count - 1.0, 1.0))

    if NORM == 1:
        # Pass 2: squared deviations from the group mean, (r_j - r_i) - (mean_g - r_i).
        squares = tl.zeros((BLOCK_I,), tl.float32)
        for j0 in range(lo, hi, BLOCK_J):
            r_j, same = _group_block(scores_ptr, ids_ptr, stride_scores, stride_ids,
                                     group_size, j0 + lane, hi, id_i, HAS_IDS)
            deviation = (r_j[None, :] - r_i[:, None]) - mean_minus_r[:, None]
            squares += tl.sum(tl.where(same, deviation * deviation, 0.0), axis=1)
        std = tl.sqrt_rn(squares / tl.maximum(count - 1.0, 1.0))
        advantages = centred / (tl.where(alone, 1.0, std) + eps)
    elif NORM == 2:
        # The batch std, two passes over all B scores shifted by r_0 (identical in every program).
        r_0 = tl.load(scores_ptr).to(tl.float32)
        batch_acc = tl.zeros((BLOCK_J,), tl.float32)
        for j0 in range(0, n, BLOCK_J):
            j = j0 + lane
            r_j = _load_scores(scores_ptr, stride_scores, j, n)
            batch_acc += tl.where(j < n, r_j - r_0, 0.0)
        batch_mean_minus_r0 = tl.sum(batch_acc, axis=0) / n
        batch_acc = tl.zeros((BLOCK_J,), tl.float32)
        for j0 in range(0, n, BLOCK_J):
            j = j0 + lane
            deviation = (_load_scores(scores_ptr, stride_scores, j, n) - r_0) - batch_mean_minus_r0
            batch_acc += tl.where(j < n, deviation * deviation, 0.0)
        batch_std = tl.sqrt_rn(tl.sum(batch_acc, axis=0) / tl.maximum(n - 1, 1).to(tl.float32))
        batch_std = tl.where(n > 1, batch_std, 1.0)
        advantages = centred / (batch_std + eps)
    else:
        advantages = centred
    tl.store(out_ptr + i, advantages, mask=i_ok)


# Launches without Triton's per-call binding (ops/_launch.py)
_group_adv = CachedLaunch(globals(), "_group_advantages_kernel")


def _launch(
    scores: torch.Tensor,
    group_ids: torch.Tensor | None,
    group_size: int,
    estimator: str,
    norm: str,
    eps: float,
    block_i: int = 0,
    block_j: int = 0,
) -> torch.Tensor:
    """The kernel on (B,) scores; ``block_i`` / ``block_j`` let tests force small tiles (several
    programs, several sweeps per program)."""
    if native_cpu_kernels(scores):  # csrc/cpu/losses.cpp (tiles do not apply)
        return _native_losses.group_advantages(scores, group_ids, group_size, estimator, norm,
                                               eps)
    n = scores.shape[0]
    out = empty((n,), torch.float32, scores.device)
    if n == 0:
        return out
    small = next_power_of_2(n)
    block_i = block_i or min(_BLOCK_I, small)
    block_j = block_j or min(_BLOCK_J, small)
    ids = scores if group_ids is None else group_ids  # placeholder pointer when there are none
    _group_adv((cdiv(n, block_i),),
        scores, ids, out,
        n, scores.stride(0), ids.stride(0), max(int(group_size), 1),
        float(eps),
        HAS_IDS=group_ids is not None, ESTIMATOR=ESTIMATOR_CODES[estimator],
        NORM=NORM_CODES[norm], BLOCK_I=block_i, BLOCK_J=block_j, num_warps=4,
    )
    return out


@torch.library.custom_op("rlhf_kernels::group_advantages", mutates_args=())
def _group_advantages_op(
    scores: torch.Tensor,
    group_ids: torch.Tensor | None,
    group_size: int,
    estimator: str,
    norm: str,
    eps: float,
) -> torch.Tensor:
    """``_launch`` as a custom op: what torch.compile / export / torch.func see."""
    return _launch(scores, group_ids, group_size, estimator, norm, eps)


@_group_advantages_op.register_fake
def _(scores, group_ids, group_size, estimator, norm, eps):
    return torch.empty(scores.shape, dtype=torch.float32, device=scores.device)


def group_advantages(
    scores: torch.Tensor,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    estimator: str = "grpo",
    norm: str | None = None,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-sequence advantages of critic-free RL from one score per sampled sequence.

    scores: (B,) fp16/bf16/fp32/fp64. Exactly one of ``group_size`` (int >= 1; consecutive
    groups, B % group_size == 0) or ``group_ids`` ((B,) int8/int16/int32/int64/uint8, any
    values, any order; equal id = same group). ``estimator``: "grpo" | "dr_grpo" | "rloo";
    ``norm``: None (the estimator's default: grpo "group", dr_grpo and rloo "none") | "group" |
    "batch" | "none"; ``eps`` >= 0 is added to the std.
    -> (B,) fp32 (fp64 for fp64 scores), no gradient (advantages are rollout data; scores that
    require grad give a result that does not). The math is in this module's docstring;
    groups of one: grpo r / (1 + eps) ("group"), dr_grpo and rloo 0.
    """
    if group_size is not None:
        group_size = int_setting("group_size", group_size, expected="an int >= 1")
    eps = real_setting("eps", eps)
    norm = reference.check_group_advantages(scores, group_size, group_ids, estimator, norm, eps)
    if (resolve_backend(scores, backend, "group_advantages") == "reference"
            or scores.dtype == torch.float64):
        return reference.group_advantages(scores, group_size, group_ids, estimator, norm, eps)
    size = 0 if group_size is None else group_size
    if launch_directly(scores, group_ids):
        # A fresh output with no autograd history: nothing to detach.
        return _launch(scores, group_ids, size, estimator, norm, eps)
    return _group_advantages_op(scores.detach(), group_ids, size, estimator, norm, eps)
