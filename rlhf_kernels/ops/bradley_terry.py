"""Bradley-Terry reward-model loss, forward and backward fused into one sweep over the pairs.

Over N pairs with z = r_c - r_r - margin and s = r_c + r_r:

    loss = (1/N) sum softplus(-z) + center_coef (1/N) sum s^2
    d loss / d r_c = (-sigmoid(-z) + 2 center_coef s) / N
    d loss / d r_r = (+sigmoid(-z) + 2 center_coef s) / N

softplus(-z) = -log sigmoid(z) is evaluated as max(-z, 0) + log1p(e^-|z|), so it neither
overflows for large |z| nor loses the small tail. The forward kernel stores the two per-pair
gradients, 1/N included (N is known on the host), in one (2, ...) fp32 buffer, so the backward
is one multiply by the upstream gradient (one for both rewards when they share a dtype), in
eager mode and under torch.compile alike; and it stores per-program partial sums of the loss
and of the stats (accuracy = mean(r_c > r_r), reward_margin = mean(r_c - r_r), chosen_mean,
rejected_mean), which a one-program kernel finishes on the device. When one program covers
every pair (up to 2048 pairs, the usual reward-model batch) it writes the loss and stats
itself: one launch in all. The margin (a float, or a tensor per pair broadcastable to the
rewards) gets no gradient.

Bytes per pair: forward reads r_c, r_r (and the margin) and writes two fp32 gradients (8 B);
backward reads those and writes the gradients in the inputs' dtypes. Reward batches are small,
so this op is launch-bound; it is fused for the launch count, not the bandwidth.

Precision: the Triton path loads fp16/bf16/fp32 and computes in fp32 (loss and stats fp32);
float64 inputs go to the float64 reference.
"""

import numbers

import torch
import triton
import triton.language as tl

from rlhf_kernels import _native_losses, reference
from rlhf_kernels._alloc import empty
from rlhf_kernels._checks import (
    SettingError,
    check_float,
    check_same_device,
    check_same_shape,
    finite_setting,
)
from rlhf_kernels.backend import (
    direct_apply,
    launch_directly,
    native_cpu_kernels,
    resolve_backend,
)
from rlhf_kernels.ops._launch import CachedLaunch
from rlhf_kernels.ops._reduce import cdiv, next_power_of_2, no_double_backward

__all__ = ["bradley_terry_loss"]

# Per-program partials: softplus sum, centering sum, correct pairs, margin, chosen, rejected.
_N_PARTIALS = 6
_STAT_NAMES = ("accuracy", "reward_margin", "chosen_mean", "rejected_mean")
_N_STATS = len(_STAT_NAMES)
_BLOCK_MAX = 2048
_FINISH_BLOCK_MAX = 1024


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _store_results(loss_ptr, stats_ptr, s_softplus, s_center, s_correct, s_diff, s_chosen,
                   s_rejected, n, center_coef, HAS_CENTER: tl.constexpr):
    """Loss and stats from the sums over all pairs (n: the pair count as a float)."""
    loss = s_softplus / n
    if HAS_CENTER:
        # As the reference: the centering term only exists when center_coef is nonzero.
        loss += center_coef * (s_center / n)
    tl.store(loss_ptr, loss)
    tl.store(stats_ptr + 0, s_correct / n)
    tl.store(stats_ptr + 1, s_diff / n)
    tl.store(stats_ptr + 2, s_chosen / n)
    tl.store(stats_ptr + 3, s_rejected / n)


@triton.jit
def _bradley_terry_fwd_kernel(
    chosen_ptr, rejected_ptr, margin_ptr, saved_grad_ptr, partial_ptr, loss_ptr, stats_ptr,
    stride_c, stride_r, stride_m,
    n_pairs, n_programs,
    margin, center_coef, n_pairs_f, inv_n,
    HAS_MARGIN_TENSOR: tl.constexpr, HAS_CENTER: tl.constexpr, FINISH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # FINISH: this is the only program; it writes the loss and stats (no partials, no finish
    # kernel).
    pid = tl.program_id(0)
    offs = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ok = offs < n_pairs
    chosen = tl.load(chosen_ptr + offs * stride_c, mask=ok, other=0.0).to(tl.float32)
    rejected = tl.load(rejected_ptr + offs * stride_r, mask=ok, other=0.0).to(tl.float32)
    diff = chosen - rejected
    z = diff - margin
    if HAS_MARGIN_TENSOR:
        z = z - tl.load(margin_ptr + offs * stride_m, mask=ok, other=0.0).to(tl.float32)

    # e = exp(-|z|) in (0, 1]: softplus(-z) = max(-z, 0) + log1p(e), sigmoid(-z) from e too.
    e = tl.exp(-tl.abs(z))
    # log1p(e) without a log1p builtin: log(1 + e) loses e below fp32 epsilon, so use the
    # series there (its error is below e^3 / 3 < 1e-12 for e < 1e-4).
    log1p_e = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
    softplus = tl.maximum(-z, 0.0) + log1p_e
    sigmoid_neg_z = tl.where(z >= 0.0, e / (1.0 + e), 1.0 / (1.0 + e))
    total = chosen + rejected
    if HAS_CENTER:
        center_grad = 2.0 * center_coef * total
    else:
        # no centering term (the reference has none): not 0 * total, NaN for an infinite reward
        center_grad = 0.0
    # saved_grad is (2, n_pairs): d loss / d chosen, then d loss / d rejected (inv_n: 1/N
    # computed on the host in float64 and rounded to fp32, as the native kernel does).
    tl.store(saved_grad_ptr + offs, (center_grad - sigmoid_neg_z) * inv_n, mask=ok)
    tl.store(saved_grad_ptr + n_pairs + offs, (center_grad + sigmoid_neg_z) * inv_n, mask=ok)

    s_softplus = tl.sum(tl.where(ok, softplus, 0.0), axis=0)
    s_center = tl.sum(tl.where(ok, total * total, 0.0), axis=0)
    s_correct = tl.sum(tl.where(ok & (diff > 0.0), 1.0, 0.0), axis=0)
    s_diff = tl.sum(tl.where(ok, diff, 0.0), axis=0)
    s_chosen = tl.sum(tl.where(ok, chosen, 0.0), axis=0)
    s_rejected = tl.sum(tl.where(ok, rejected, 0.0), axis=0)
    if FINISH:
        _store_results(loss_ptr, stats_ptr, s_softplus, s_center, s_correct, s_diff, s_chosen,
                       s_rejected, n_pairs_f, center_coef, HAS_CENTER)
    else:
        out = partial_ptr + pid
        tl.store(out + 0 * n_programs, s_softplus)
        tl.store(out + 1 * n_programs, s_center)
        tl.store(out + 2 * n_programs, s_correct)
        tl.store(out + 3 * n_programs, s_diff)
        tl.store(out + 4 * n_programs, s_chosen)
        tl.store(out + 5 * n_programs, s_rejected)


@triton.jit
def _bradley_terry_finish_kernel(
    partial_ptr, loss_ptr, stats_ptr,
    n_programs,
    n_pairs_f, center_coef,
    HAS_CENTER: tl.constexpr, BLOCK_P: tl.constexpr,
):
    offs = tl.arange(0, BLOCK_P)
    s_softplus = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_center = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_correct = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_diff = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_chosen = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_rejected = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, n_programs, BLOCK_P):
        p = p0 + offs
        ok = p < n_programs
        s_softplus += tl.load(partial_ptr + 0 * n_programs + p, mask=ok, other=0.0)
        s_center += tl.load(partial_ptr + 1 * n_programs + p, mask=ok, other=0.0)
        s_correct += tl.load(partial_ptr + 2 * n_programs + p, mask=ok, other=0.0)
        s_diff += tl.load(partial_ptr + 3 * n_programs + p, mask=ok, other=0.0)
        s_chosen += tl.load(partial_ptr + 4 * n_programs + p, mask=ok, other=0.0)
        s_rejected += tl.load(partial_ptr + 5 * n_programs + p, mask=ok, other=0.0)
    _store_results(loss_ptr, stats_ptr, tl.sum(s_softplus, axis=0), tl.sum(s_center, axis=0),
                   tl.sum(s_correct, axis=0), tl.sum(s_diff, axis=0), tl.sum(s_chosen, axis=0),
                   tl.sum(s_rejected, axis=0), n_pairs_f, center_coef, HAS_CENTER)


# Launches without Triton's per-call binding (ops/_launch.py)
_bt_fwd = CachedLaunch(globals(), "_bradley_terry_fwd_kernel")
_bt_finish = CachedLaunch(globals(), "_bradley_terry_finish_kernel")


# --------------------------------------------------------------------------------------------
# launchers and autograd
# --------------------------------------------------------------------------------------------
def _flat(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 1 else x.reshape(-1)


def _launch(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin_tensor: torch.Tensor | None,
    margin: float,
    center_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> loss () fp32, stats (_N_STATS,) fp32, saved gradients (2, *chosen.shape) fp32
    contiguous: d loss / d chosen, then d loss / d rejected."""
    if native_cpu_kernels(chosen):  # csrc/cpu/losses.cpp
        return _native_losses.bradley_terry_loss(chosen, rejected, margin_tensor, margin,
                                                 center_coef)
    device = chosen.device
    n_pairs = chosen.numel()
    chosen1, rejected1 = _flat(chosen), _flat(rejected)
    margin1 = (margin_tensor.expand(chosen.shape).reshape(-1) if margin_tensor is not None
               else chosen1)
    block = min(next_power_of_2(max(n_pairs, 1)), _BLOCK_MAX)
    n_programs = max(1, cdiv(n_pairs, block))

    loss = empty((), torch.float32, device)
    stats = empty((_N_STATS,), torch.float32, device)
    saved_grad = empty((2, *chosen.shape), torch.float32, device)
    finish = n_programs == 1  # one program: it writes the results itself
    # (no partials then: the loss buffer stands in for the unused pointer)
    partials = loss if finish else empty((_N_PARTIALS, n_programs), torch.float32, device)
    _bt_fwd((n_programs,),
        chosen1, rejected1, margin1, saved_grad, partials, loss, stats,
        chosen1.stride(0), rejected1.stride(0), margin1.stride(0),
        n_pairs, n_programs,
        margin, center_coef, float(n_pairs), 1.0 / n_pairs,
        HAS_MARGIN_TENSOR=margin_tensor is not None, HAS_CENTER=center_coef != 0.0,
        FINISH=finish, BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )
    if not finish:
        _bt_finish((1,),
            partials, loss, stats, n_programs, float(n_pairs), center_coef,
            HAS_CENTER=center_coef != 0.0,
            BLOCK_P=min(next_power_of_2(n_programs), _FINISH_BLOCK_MAX), num_warps=4,
        )
    return loss, stats, saved_grad


@torch.library.custom_op("rlhf_kernels::bradley_terry_loss", mutates_args=())
def _bradley_terry_op(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin_tensor: torch.Tensor | None,
    margin: float,
    center_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_launch`` as a custom op: what torch.compile / export / torch.func see."""
    return _launch(chosen, rejected, margin_tensor, margin, center_coef)


@_bradley_terry_op.register_fake
def _(chosen, rejected, margin_tensor, margin, center_coef):
    return (
        chosen.new_empty((), dtype=torch.float32),
        chosen.new_empty((_N_STATS,), dtype=torch.float32),
        chosen.new_empty((2, *chosen.shape), dtype=torch.float32),
    )


def _scaled(saved: torch.Tensor, grad_loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The backward's product: saved gradient times the upstream gradient, in ``dtype``."""
    grad = saved * grad_loss
    return grad if grad.dtype == dtype else grad.to(dtype)


def _setup_context(ctx, inputs, output):
    chosen, rejected = inputs[0], inputs[1]
    _, stats, saved_grad = output
    # saved_grad stays differentiable (the caller drops it): saved, its history is this op's
    # node, which no_double_backward links its error to (a path to the rewards)
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(saved_grad)
    ctx.dtypes = (chosen.dtype, rejected.dtype)


@no_double_backward("bradley_terry_loss")
def _backward(ctx, grad_loss, grad_stats, grad_saved):
    # (a torch multiply: without the decorator a second derivative would see the saved
    # gradient as a constant and silently miss its dependence on the rewards)
    (saved_grad,) = ctx.saved_tensors
    grad_chosen = grad_rejected = None
    if grad_loss is not None:
        if ctx.needs_input_grad[0]:
            grad_chosen = _scaled(saved_grad[0], grad_loss, ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_rejected = _scaled(saved_grad[1], grad_loss, ctx.dtypes[1])
    return grad_chosen, grad_rejected, None, None, None


_bradley_terry_op.register_autograd(_backward, setup_context=_setup_context)


class _BradleyTerryFunction(torch.autograd.Function):
    """The eager path (``launch_directly``): the custom op's forward launches, its backward the
    same product (one multiply for both rewards when they share a dtype). The stats leave
    through ``box`` rather than as an output: they get no gradient, and an output's autograd
    bookkeeping would cost host time on every call."""

    @staticmethod
    def forward(ctx, chosen, rejected, margin_tensor, margin, center_coef, box):
        loss, stats, saved_grad = _launch(chosen, rejected, margin_tensor, margin, center_coef)
        box.append(stats)
        ctx.set_materialize_grads(False)
        # the loss is saved only as no_double_backward's path to the rewards (as in
        # _reduce.SavedGradLoss); the saved gradient is held
        ctx.save_for_backward(loss)
        ctx.saved_grad = saved_grad
        ctx.dtypes = (chosen.dtype, rejected.dtype)
        return loss

    @staticmethod
    @no_double_backward("bradley_terry_loss")
    def backward(ctx, grad_loss):
        if grad_loss is None:
            return None, None, None, None, None, None
        saved_grad = ctx.saved_grad
        need_chosen, need_rejected = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_chosen and need_rejected and ctx.dtypes[0] == ctx.dtypes[1]:
            grad_chosen, grad_rejected = _scaled(saved_grad, grad_loss, ctx.dtypes[0]).unbind(0)
            return grad_chosen, grad_rejected, None, None, None, None
        grad_chosen = grad_rejected = None
        if need_chosen:
            grad_chosen = _scaled(saved_grad[0], grad_loss, ctx.dtypes[0])
        if need_rejected:
            grad_rejected = _scaled(saved_grad[1], grad_loss, ctx.dtypes[1])
        return grad_chosen, grad_rejected, None, None, None, None


_apply_bradley_terry = direct_apply(_BradleyTerryFunction)


# --------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------
_MARGIN_MEANING = "subtracted from r_chosen - r_rejected; None for no margin"


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss of a reward model over (chosen, rejected) pairs.

    chosen_rewards, rejected_rewards: (...) fp16/bf16/fp32/fp64, same shape, at least one pair.
    margin: None, a float (or a 0-d tensor: the same), or a tensor broadcastable to the rewards'
    shape (per-pair margin, no gradient). center_coef: weight of the centering term
    mean((r_c + r_r)^2) (0: none).

    Returns ``(loss, stats)``: loss () fp32 (fp64 for fp64 input), differentiable with respect to
    both rewards; stats (detached () tensors): accuracy = mean(r_c > r_r) (margin not
    subtracted), reward_margin = mean(r_c - r_r), chosen_mean, rejected_mean.
    backend: "triton", "reference" or "auto".
    """
    check_float("chosen_rewards", chosen_rewards)
    check_float("rejected_rewards", rejected_rewards)
    check_same_shape("rejected_rewards", rejected_rewards, "chosen_rewards", chosen_rewards)
    if isinstance(margin, torch.Tensor) and margin.dim() == 0:
        # a 0-d tensor is a scalar setting, as for every op's scalar settings (read on the
        # host): the same kernel and bits as the same Python number (the per-pair path summed
        # its statistics an ulp apart on some inputs)
        margin = finite_setting("margin", margin, _MARGIN_MEANING)
    margin_tensor = margin if isinstance(margin, torch.Tensor) else None
    if margin_tensor is not None:
        check_float("margin", margin_tensor)
        try:
            broadcast = torch.broadcast_shapes(margin_tensor.shape, chosen_rewards.shape)
        except RuntimeError:
            broadcast = None
        if broadcast != chosen_rewards.shape:
            raise ValueError(
                f"margin has shape {tuple(margin_tensor.shape)}, which does not broadcast to the "
                f"rewards' shape {tuple(chosen_rewards.shape)}; pass one margin per pair, or a "
                "float"
            )
    elif margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
            raise SettingError(f"margin must be None, a real number or a tensor, got "
                               f"{type(margin).__name__}: {margin!r}")
        margin = finite_setting("margin", margin, _MARGIN_MEANING)
    center_coef = finite_setting(
        "center_coef", center_coef,
        "the weight of the centering term mean((r_c + r_r)^2); 0 for none")
    check_same_device(("chosen_rewards", chosen_rewards), ("rejected_rewards", rejected_rewards),
                      ("margin", margin_tensor))
    if chosen_rewards.numel() == 0:
        raise ValueError(
            "bradley_terry_loss needs at least one (chosen, rejected) pair; got empty tensors "
            f"of shape {tuple(chosen_rewards.shape)}"
        )

    dtypes = (chosen_rewards.dtype, rejected_rewards.dtype,
              margin_tensor.dtype if margin_tensor is not None else None)
    if (resolve_backend(chosen_rewards, backend, "bradley_terry_loss") == "reference"
            or torch.float64 in dtypes):
        return reference.bradley_terry_loss(chosen_rewards, rejected_rewards, margin, center_coef)
    if margin_tensor is not None and margin_tensor.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "margin requires grad, but the fused kernel treats the margin as data; pass "
            "margin.detach(), or backend='reference' if you really need that gradient"
        )
    args = (chosen_rewards, rejected_rewards, margin_tensor,
            0.0 if margin is None or margin_tensor is not None else margin, center_coef)
    if not launch_directly(chosen_rewards, rejected_rewards, margin_tensor):
        loss, stats, _ = _bradley_terry_op(*args)
    elif torch.is_grad_enabled() and (chosen_rewards.requires_grad
                                      or rejected_rewards.requires_grad):
        box = []
        loss = _apply_bradley_terry(*args, box)
        stats = box[0]
    else:
        loss, stats, _ = _launch(*args)
    return loss, dict(zip(_STAT_NAMES, stats.unbind(0)))
