"""Shared pieces of the fused loss kernels (PPO policy / value loss, Bradley-Terry).

The losses use a "gradient in the forward" design. Every reduction of ``rlhf_kernels.reference.
reduce_loss`` is a weighted sum of per-token losses whose weights depend on the mask only:

    loss = scale * sum_{b,t} w[b] * m[b,t] * l[b,t]

    reduction                 w[b]            scale
    token-mean                1               1 / max(sum(m), 1)
    seq-mean-token-mean       1 / max(n_b, 1) 1 / max(#rows with a token, 1)
    seq-mean-token-sum        1               1 / max(#rows with a token, 1)
    seq-mean-token-sum-norm   1               1 / max(T, 1)
    token-sum                 1               1

(n_b = valid tokens of row b.) A ``normalizer`` N (a number, or a 0-d tensor read on the device)
replaces the outer denominator: scale = 1 / N whatever the reduction, w[b] unchanged
(``loss_denominator``). A forward kernel whose programs own whole rows knows w[b] (one
extra pass over that row's mask for seq-mean-token-mean), so it stores the per-token gradient
``w[b] * m * dl/dx`` while it computes the loss; a single-program "finish" kernel sums the
per-program partials into the loss, the stats and ``scale``, on the device (no host sync). The
backward is then ``grad_x = saved * (grad_loss * scale)``: one elementwise kernel,
``_saved_grad_bwd_kernel`` here, shared by the policy and value losses (``scale_saved_grad``;
the custom op ``rlhf_kernels::saved_grad_scale`` wraps it for torch.compile). In plain eager
mode the losses skip their custom ops (``rlhf_kernels.backend.launch_directly``) and the
backward is the same product as two torch multiplies (``scale_saved_grad_eager``), which costs
less host time. (Bradley-Terry's scale is 1 / pairs, known on the host: its forward stores the
gradient with the scale applied, and its backward is one multiply by ``grad_loss``.)
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from rlhf_kernels._alloc import empty
from rlhf_kernels._checks import check_reduction, check_same_shape
from rlhf_kernels.backend import direct_apply, native_cpu_kernels
from rlhf_kernels.ops._launch import CachedLaunch

# For tl.minimum / tl.maximum (and so every clamp) in the loss kernels: propagate NaN as
# torch.minimum / maximum / clamp do. Triton's default returns the other operand, which turned
# a NaN log-prob, value or score into a finite, plausible loss (the native kernels and the
# reference give NaN).
NAN = tl.constexpr(tl.PropagateNan.ALL)

__all__ = [
    "REDUCTION_CODES",
    "SavedGradLoss",
    "apply_saved_grad_loss",
    "reduction_code",
    "row_tiles",
    "as_rows",
    "check_mask",
    "mask_for_kernel",
    "row_token_count",
    "reduction_denominator",
    "loss_denominator",
    "NORMALIZER_NONE",
    "NORMALIZER_VALUE",
    "NORMALIZER_TENSOR",
    "normalizer_args",
    "saved_grad_scale",
    "scale_saved_grad",
    "scale_saved_grad_eager",
    "NAN",
    "next_power_of_2",
    "cdiv",
    "no_double_backward",
    "anchor_output",
]

# The reduction is a compile-time flag of the kernels (five variants at most).
REDUCTION_CODES = {
    "token-mean": 0,
    "seq-mean-token-mean": 1,
    "seq-mean-token-sum": 2,
    "seq-mean-token-sum-norm": 3,
    "token-sum": 4,
}
# Where the finish kernels take the outer denominator from (compile-time flag NORMALIZER of
# ``loss_denominator``): the reduction's count, a float argument, or a 0-d tensor on the device.
NORMALIZER_NONE, NORMALIZER_VALUE, NORMALIZER_TENSOR = 0, 1, 2

# Elements per program tile of the row kernels: rows x time block. Larger tiles mean fewer
# programs and fewer partials; 2048 fp32 lanes over 8 warps is 8 elements per thread per array.
_TILE = 2048
_BLOCK_T_MAX = 1024
_BWD_BLOCK = 2048


def reduction_code(reduction: str) -> int:
    check_reduction(reduction)
    return REDUCTION_CODES[reduction]


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1): ``triton.next_power_of_2`` for n >= 1,
    without its constexpr-function wrapper (about 2 us of host time per call)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, as ``triton.cdiv`` (without its wrapper)."""
    return -(-a // b)


def normalizer_args(normalizer, device: torch.device):
    """A checked ``normalizer=`` (None, a number > 0 or a 0-d tensor; ``_checks.check_normalizer``)
    -> (NORMALIZER flag, float value, 0-d tensor or None): the arguments of ``loss_denominator``.

    A tensor on ``device`` is used as it is (its value is never read on the host). A 0-d CPU
    tensor for a loss on another device is read as a number: that reads host memory, while
    moving it to the GPU would be a synchronous copy. Call it where the tensors are real (in a
    launcher), not while torch.compile traces.
    """
    if normalizer is None:
        return NORMALIZER_NONE, 0.0, None
    if isinstance(normalizer, torch.Tensor):
        if normalizer.device == device:
            return NORMALIZER_TENSOR, 0.0, normalizer
        if normalizer.device.type == "cpu":
            return NORMALIZER_VALUE, float(normalizer), None
        return NORMALIZER_TENSOR, 0.0, normalizer.to(device)
    return NORMALIZER_VALUE, float(normalizer), None


@functools.lru_cache(maxsize=1024)
def row_tiles(n_rows: int, T: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_T, number of programs) for a kernel whose programs own whole rows.

    Cached per shape: a training loop calls the losses with a handful of shapes.
    """
    block_t = min(next_power_of_2(max(T, 1)), _BLOCK_T_MAX)
    block_r = min(next_power_of_2(max(n_rows, 1)), max(1, _TILE // block_t))
    return block_r, block_t, max(1, cdiv(n_rows, block_r))


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (rows, T): a view when the leading dims merge into one stride, else a copy.

    The kernels take both strides, so neither a non-unit time stride nor a non-unit row stride
    forces a copy; only leading dims that cannot be merged do (``reshape``).
    """
    if x.dim() == 2:
        return x  # already (rows, T): no view to make
    # Explicit row count: reshape(-1, 0) is ambiguous for T = 0.
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_mask(mask: torch.Tensor | None, like_name: str, like: torch.Tensor) -> None:
    """ValueError unless mask is None or a bool / integer / floating tensor shaped like ``like``."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    check_same_shape("mask", mask, like_name, like)
    if mask.dtype not in _MASK_DTYPES:
        raise ValueError(
            f"mask must be bool, integer or floating (nonzero = the token counts), "
            f"got {mask.dtype}"
        )


def mask_for_kernel(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Bool masks are read as bytes (same storage, no copy); other dtypes as they are.

    The kernels treat any nonzero element as valid, like ``rlhf_kernels._checks.as_mask``.
    """
    if mask is not None and mask.dtype == torch.bool:
        return mask.view(torch.uint8)
    return mask


@triton.jit
def row_token_count(
    mask_ptr, mask_row_off, stride_mt, row_ok, T,
    HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Valid tokens of each of a program's rows (fp32, 0 for rows past the end)."""
    if HAS_MASK:
        acc = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
        cols = tl.arange(0, BLOCK_T)
        for t0 in range(0, T, BLOCK_T):
            t = (t0 + cols).to(tl.int64)
            inb = row_ok[:, None] & (t < T)[None, :]
            m = tl.load(mask_ptr + mask_row_off[:, None] + t[None, :] * stride_mt, mask=inb,
                        other=0)
            acc += tl.where(m != 0, 1.0, 0.0)
        count = tl.sum(acc, axis=1)
    else:
        # T may arrive as a compile-time 1 (Triton specialises ints equal to 1): add, don't cast.
        count = tl.where(row_ok, tl.zeros([BLOCK_R], dtype=tl.float32) + T, 0.0)
    return count


@triton.jit
def reduction_denominator(n_tokens, n_rows, T, REDUCTION: tl.constexpr):
    """1 / scale of the table in the module docstring (never 0, so an empty mask gives 0)."""
    if REDUCTION == 0:
        denom = tl.maximum(n_tokens, 1.0)
    elif REDUCTION == 3:
        denom = tl.maximum(n_tokens * 0.0 + T, 1.0)
    elif REDUCTION == 4:
        denom = n_tokens * 0.0 + 1.0
    else:
        denom = tl.maximum(n_rows, 1.0)
    return denom


@triton.jit
def loss_denominator(n_tokens, n_rows, T, norm_value, norm_ptr,
                     REDUCTION: tl.constexpr, NORMALIZER: tl.constexpr):
    """The outer denominator of the loss: the user's normalizer when one is given (a float
    argument, or a 0-d tensor of any real dtype loaded here, on the device: no host sync), else
    ``reduction_denominator``. A normalizer is used as it is (0 gives inf / NaN, as dividing by
    it in PyTorch would; -0 gives -inf: the value is scaled by 1, not added to 0, which turned
    a -0 into +0)."""
    if NORMALIZER == 1:
        denom = (n_tokens * 0.0 + 1.0) * norm_value
    elif NORMALIZER == 2:
        denom = (n_tokens * 0.0 + 1.0) * tl.load(norm_ptr).to(tl.float32)
    else:
        denom = reduction_denominator(n_tokens, n_rows, T, REDUCTION)
    return denom


@triton.jit
def _saved_grad_bwd_kernel(
    saved_ptr, grad_loss_ptr, scale_ptr, out_ptr,
    numel, scale_index,
    BLOCK: tl.constexpr, SELECT: tl.constexpr,
):
    # out = saved * (dL/dloss * scale), cast by the store to the input's dtype. SELECT (a tensor
    # normalizer, whose scale may be inf or NaN): a saved 0 (a masked or clipped token) gives 0,
    # not 0 * inf = NaN.
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    g = tl.load(grad_loss_ptr).to(tl.float32) * tl.load(scale_ptr + scale_index)
    saved = tl.load(saved_ptr + offs, mask=inb, other=0.0)
    grad = saved * g
    if SELECT:
        grad = tl.where(saved == 0.0, 0.0, grad)
    # The store casts to the input dtype, rounding to nearest even (tests/conftest.py makes the
    # CPU interpreter round the same way).
    tl.store(out_ptr + offs, grad, mask=inb)


# Launches without Triton's per-call binding (ops/_launch.py)
_saved_grad_bwd = CachedLaunch(globals(), "_saved_grad_bwd_kernel")


def scale_saved_grad(
    saved: torch.Tensor,
    grad_loss: torch.Tensor,
    stats: torch.Tensor,
    scale_index: int,
    dtype: torch.dtype,
    select: bool = False,
) -> torch.Tensor:
    """saved (...) fp32 contiguous, grad_loss (), stats (S,) fp32 -> saved * grad * stats[i].

    The output has ``saved``'s shape and the given dtype (the differentiated input's dtype).
    The scale is read from the loss's stats buffer by index (no slicing on the host).
    select (the loss had a tensor normalizer, so the scale may be inf or NaN: a count of 0):
    where ``saved`` is 0 (a masked token, a clipped one) the gradient is 0, as the reference's
    selects give, not 0 * inf = NaN. Without a tensor normalizer the scale is finite and the
    select would cost host time for nothing on the eager path.
    """
    if native_cpu_kernels(saved):  # the native backend's CPU tensors: the same product
        return scale_saved_grad_eager(saved, grad_loss, stats, scale_index, dtype, select)
    out = empty(saved.shape, dtype, saved.device)
    numel = saved.numel()
    if numel == 0:
        return out
    _saved_grad_bwd((cdiv(numel, _BWD_BLOCK),),
        saved, grad_loss, stats, out, numel, scale_index, BLOCK=_BWD_BLOCK,
        SELECT=bool(select), num_warps=4,
    )
    return out


def scale_saved_grad_eager(
    saved: torch.Tensor,
    grad_loss: torch.Tensor,
    stats: torch.Tensor,
    scale_index: int,
    dtype: torch.dtype,
    select: bool = False,
) -> torch.Tensor:
    """``scale_saved_grad`` as two torch multiplies, for the eager backward of the losses.

    Same arithmetic in the same order (fp32 ``grad_loss * scale``, then ``saved *`` that,
    rounded to ``dtype`` to nearest even), so the same bits; on the host two small torch ops
    cost less than an allocation plus a Triton launch.
    """
    grad = saved * (grad_loss * stats[scale_index])
    if select:
        grad = torch.where(saved == 0, 0.0, grad)
    return grad if grad.dtype == dtype else grad.to(dtype)


def no_double_backward(op_name: str):
    """Decorator for the ``backward`` of an eager autograd Function whose gradient cannot be
    differentiated again.

    A plain backward (grad mode off) calls straight through. Under ``create_graph=True`` the
    gradients come back as tensors that raise when differentiated, as the custom-op path's do
    (its backward op has no autograd formula): always, not only when the incoming gradient
    requires grad (``once_differentiable``'s test), because the gradient depends on the saved
    inputs too and a silently constant second-order term would be wrong.

    The raising node must lie on the path from those gradients to the op's inputs: autograd
    runs a node only when it leads to a tensor being differentiated, so a node fed by detached
    copies alone (``once_differentiable``'s) is skipped by ``torch.autograd.grad(..., inputs)``:
    ``allow_unused=True`` returned None (a silently missing second-order term), and without it
    autograd's "not used in the graph" error hid this one. So the node also takes the saved
    tensors that require grad (an op's saved inputs; or, for an op that saves none, a saved
    output: the loss, or the empty ``anchor_output``; its history is the op's own node, which
    leads to every input) and the incoming gradients that require grad: differentiating the
    gradients with respect to anything upstream of them runs it. (Holding the inputs themselves
    on ``ctx`` would make a cycle that only C++ autograd sees, never freed, once an input is
    edited in place with the op's output.)
    """
    message = (f"rlhf_kernels.{op_name}: its gradient is not differentiable again (double "
               "backward / create_graph=True); use backend='reference' for higher-order "
               "gradients").encode()

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if not torch.is_grad_enabled():
                return backward(ctx, *grads)
            links = [t for t in (*ctx.saved_tensors, *grads)
                     if isinstance(t, torch.Tensor) and t.requires_grad]
            with torch.no_grad():
                outputs = backward(ctx, *grads)

            def fake_requires_grad(t):
                if t is None:
                    return None
                t = t.detach()
                t.requires_grad = True
                return t

            error = torch._C._functions.DelayedError(message, len(outputs) + len(links))
            results = error(*[fake_requires_grad(t) for t in outputs], *links)
            if isinstance(results, torch.Tensor):
                results = (results,)
            return tuple(results[:len(outputs)])

        return wrapper

    return decorate


def anchor_output(like: torch.Tensor) -> torch.Tensor:
    """An empty tensor for a Function to return as an extra output and save
    (``ctx.save_for_backward``), when it saves no input that requires grad: unpacked in the
    backward it carries the Function's own node, which ``no_double_backward`` links its error
    to. Never returned to the user, so never edited in place (a saved output that was, the
    loss, would fail the plain backward's version check)."""
    return like.new_empty((0,))


class SavedGradLoss(torch.autograd.Function):
    """The eager path (``launch_directly``) of a loss whose forward launch also writes
    d loss / d input for its first argument: ``launch(*args) -> (loss, stats, saved_grad)``. The
    backward is the custom op's product ``saved_grad * (grad_loss * stats[scale_index])`` as two
    torch multiplies (``scale_saved_grad_eager``), at a fraction of its host time.

    ``SavedGradLoss.apply(launch, scale_index, select, *args) -> (loss, stats)``;
    select: the loss has a tensor normalizer (``scale_saved_grad``).
    """

    @staticmethod
    def forward(ctx, launch, scale_index, select, *args):
        loss, stats, saved_grad = launch(*args)
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        # The loss is saved only as no_double_backward's path to the inputs (a saved output:
        # no cycle; the plain backward never unpacks it, so editing the loss in place stays
        # allowed); the saved gradient, never exposed, is held.
        ctx.save_for_backward(loss)
        ctx.saved_grad = saved_grad
        # The stats are held, not saved: the caller gets them as views (a dict of () tensors)
        # and may edit them in place before the backward (an all_reduce, a rescale), which a
        # saved tensor's version check refused. The backward reads only the scale slot, which
        # no returned view covers. A non-differentiable output has no grad_fn: no cycle.
        ctx.stats = stats
        ctx.scale_index = scale_index
        ctx.select = select
        ctx.input_dtype = args[0].dtype
        ctx.n_args = len(args)
        return loss, stats

    @staticmethod
    @no_double_backward("ppo_policy_loss / ppo_value_loss")
    def backward(ctx, grad_loss, grad_stats):
        grad = None
        if grad_loss is not None:
            grad = scale_saved_grad_eager(ctx.saved_grad, grad_loss, ctx.stats, ctx.scale_index,
                                          ctx.input_dtype, ctx.select)
        return (None, None, None, grad) + (None,) * (ctx.n_args - 1)


apply_saved_grad_loss = direct_apply(SavedGradLoss)  # its .apply on the eager path


@torch.library.custom_op("rlhf_kernels::saved_grad_scale", mutates_args=())
def saved_grad_scale(
    saved: torch.Tensor,
    grad_loss: torch.Tensor,
    stats: torch.Tensor,
    scale_index: int,
    dtype: torch.dtype,
    select: bool = False,
) -> torch.Tensor:
    """``scale_saved_grad`` as a custom op (the losses' backward under torch.compile)."""
    return scale_saved_grad(saved, grad_loss, stats, scale_index, dtype, select)


@saved_grad_scale.register_fake
def _(saved, grad_loss, stats, scale_index, dtype, select=False):
    return torch.empty(saved.shape, dtype=dtype, device=saved.device)
