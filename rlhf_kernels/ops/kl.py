"""Per-token KL estimators of KL(pi || pi_ref) from the sampled token, fused forward and backward.

With d = logp - ref_logp (optionally clamped to +-log_ratio_clamp first):

    k1 = d            dk1/dd = 1
    k2 = d^2 / 2      dk2/dd = d
    k3 = e^-d + d - 1 dk3/dd = 1 - e^-d
    abs = |d|         dabs/dd = sign(d)      (0 at d = 0, as torch.abs)

and the result optionally clamped to +-clamp. A clamp (of d or of the result) that bites gives a
zero gradient, exactly like ``torch.clamp`` (the bounds themselves still pass the gradient).
d logp = g * dkl/dd and d ref_logp = -g * dkl/dd.

Bytes per token: forward reads logp and ref_logp (2 x itemsize) and writes fp32 kl (4 B);
backward reads the upstream gradient (4 B) and both inputs, and writes both gradients in the
inputs' dtypes. Both are single elementwise passes, so the floor is the memory traffic. In
plain eager mode the common call (contiguous inputs, no clamps) instead writes d kl / d logp
(fp32, 4 B/token) in the forward and its backward is ``grad * that`` as one torch multiply: the
same fp32 arithmetic and, for fp32 inputs, the same bytes in all (4 B/token more written forward,
8 fewer read backward), at a fraction of the host time (no backward allocation and launch).

Precision: the Triton path loads any of fp16/bf16/fp32 and computes in fp32; float64 inputs go to
the float64 reference (there is no reason to run them through an fp32 kernel). k3 and its
derivative are within a few fp32 ulps of the exact values for every d, |d| << 1 included (the
usual case near the reference policy, where e^-d + d - 1 written literally keeps few correct
digits): a series for |d| <= 1, see ``k3_and_grad``.
"""


import torch
import triton
import triton.language as tl

from rlhf_kernels import _alloc, _native, reference
from rlhf_kernels._checks import check_float, check_same_device, check_same_shape, real_setting
from rlhf_kernels.backend import direct_apply, launch_directly, native_cpu_kernels, resolve_backend
from rlhf_kernels.ops._launch import CachedLaunch
from rlhf_kernels.ops._reduce import NAN, cdiv, no_double_backward

__all__ = ["kl_penalty", "KL_ESTIMATOR_CODES", "kl_estimate", "k3", "k3_and_grad",
           "check_kl_options", "k3_torch"]

# The estimator is a compile-time flag of the kernels (four variants at most).
KL_ESTIMATOR_CODES = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}

_BLOCK = 1024


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
# k3 near d = 0. e^-d + d - 1 in fp32 cancels: the rounding of e^-d (about 6e-8) is all that is
# left of a result of about d^2 / 2, so at |d| ~ 1e-3 (near the reference policy, the usual
# case) it is off by several percent on average and by half at worst (at |d| ~ 1e-4 by all of
# it or more); expm1(-d) + d still keeps expm1's rounding of about |d| * 6e-8, 1e-4 relative at
# |d| = 1e-3. For |d| <= 1 the kernels
# take the Taylor series k3 = d^2 (1/2 - d/6 + d^2/24 - ... + (-d)^9 / 11!) by Horner (a few
# fp32 ulps: the truncated terms are below 2^-27 of k3 there, and a rapidly falling series
# rounds like its first term), and the derivative 1 - e^-d = d - k3 from it (no cancellation:
# |k3| <= 0.72 |d| there). For |d| > 1, k3 >= 0.36 |d| and 1 - e^-d >= 0.63: e^-d's rounding
# costs a few ulps at most, and tl.exp serves on every target (there is no expm1 in tl.math,
# and libdevice's expm1 does not run under the Triton interpreter, so the tests could not run
# what the GPU runs). Plain arithmetic and tl.exp only: the GPU and the interpreter compute the
# same formula.
@triton.jit
def _k3_series(x):
    """k3 of an fp32 x with |x| <= 1 (the series above)."""
    p = -2.505210838544172e-08 * x + 2.755731922398589e-07  # -1/11!, 1/10!
    p = p * x - 2.7557319223985893e-06  # -1/9!
    p = p * x + 2.48015873015873e-05  # 1/8!
    p = p * x - 0.0001984126984126984  # -1/7!
    p = p * x + 0.001388888888888889  # 1/6!
    p = p * x - 0.008333333333333333  # -1/5!
    p = p * x + 0.041666666666666664  # 1/4!
    p = p * x - 0.16666666666666666  # -1/3!
    p = p * x + 0.5  # 1/2!
    return x * x * p


@triton.jit
def k3_and_grad(d):
    """k3 = e^-d + d - 1 of an fp32 log-ratio d and its derivative 1 - e^-d, each to a few fp32
    ulps for every d (see above); NaN for NaN, as the plain formula."""
    near = tl.abs(d) <= 1.0
    # the series' argument, bounded so the far side's powers cannot overflow (tl.where keeps
    # the other side's values there)
    kl_near = _k3_series(tl.minimum(tl.maximum(d, -1.0), 1.0))
    e = tl.exp(-d)
    kl = tl.where(near, kl_near, e + d - 1.0)
    dkl = tl.where(near, d - kl_near, 1.0 - e)
    return kl, dkl


@triton.jit
def k3(d):
    """k3 of an fp32 log-ratio d alone (``k3_and_grad``'s value)."""
    near = tl.abs(d) <= 1.0
    kl_near = _k3_series(tl.minimum(tl.maximum(d, -1.0), 1.0))
    return tl.where(near, kl_near, tl.exp(-d) + d - 1.0)


@triton.jit
def kl_estimate(d, ESTIMATOR: tl.constexpr):
    """The estimator of an fp32 log-ratio d (shared with the reward-shaping kernel)."""
    if ESTIMATOR == 0:
        kl = d
    elif ESTIMATOR == 1:
        kl = 0.5 * d * d
    elif ESTIMATOR == 2:
        kl = k3(d)
    else:
        kl = tl.abs(d)
    return kl


@triton.jit
def _kl_fwd_kernel(
    logp_ptr, ref_ptr, out_ptr,
    stride_logp_row, stride_logp_col, stride_ref_row, stride_ref_col, stride_out_row,
    n_cols, n_col_blocks,
    clamp, log_ratio_clamp,
    ESTIMATOR: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_LOG_RATIO_CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # A 1-D grid over (row, column block) pairs: no grid-dimension limit on either count.
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_col_blocks
    cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < n_cols
    logp = tl.load(logp_ptr + row * stride_logp_row + cols * stride_logp_col, mask=in_row,
                   other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + row * stride_ref_row + cols * stride_ref_col, mask=in_row,
                  other=0.0).to(tl.float32)
    d = logp - ref
    if HAS_LOG_RATIO_CLAMP:
        d = tl.minimum(tl.maximum(d, -log_ratio_clamp, NAN), log_ratio_clamp, NAN)
    kl = kl_estimate(d, ESTIMATOR)
    if HAS_CLAMP:
        kl = tl.minimum(tl.maximum(kl, -clamp, NAN), clamp, NAN)
    tl.store(out_ptr + row * stride_out_row + cols, kl, mask=in_row)


@triton.jit
def _kl_bwd_kernel(
    grad_ptr, logp_ptr, ref_ptr, grad_logp_ptr, grad_ref_ptr,
    stride_grad_row, stride_grad_col, stride_logp_row, stride_logp_col,
    stride_ref_row, stride_ref_col, stride_gout_row,
    n_cols, n_col_blocks,
    clamp, log_ratio_clamp,
    ESTIMATOR: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_LOG_RATIO_CLAMP: tl.constexpr,
    GRAD_LOGP: tl.constexpr, GRAD_REF: tl.constexpr, BLOCK: tl.constexpr,
):
    # GRAD_LOGP / GRAD_REF: which of the two gradients to write (the other pointer is unused).
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_col_blocks
    cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < n_cols
    grad = tl.load(grad_ptr + row * stride_grad_row + cols * stride_grad_col, mask=in_row,
                   other=0.0).to(tl.float32)
    logp = tl.load(logp_ptr + row * stride_logp_row + cols * stride_logp_col, mask=in_row,
                   other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + row * stride_ref_row + cols * stride_ref_col, mask=in_row,
                  other=0.0).to(tl.float32)
    d = logp - ref
    # torch.clamp passes the gradient where lo <= x <= hi (bounds included).
    if HAS_LOG_RATIO_CLAMP:
        grad = tl.where((d >= -log_ratio_clamp) & (d <= log_ratio_clamp), grad, 0.0)
        d = tl.minimum(tl.maximum(d, -log_ratio_clamp, NAN), log_ratio_clamp, NAN)
    if HAS_CLAMP:
        kl = kl_estimate(d, ESTIMATOR)
        grad = tl.where((kl >= -clamp) & (kl <= clamp), grad, 0.0)
    if ESTIMATOR == 0:
        dkl = grad
    elif ESTIMATOR == 1:
        dkl = grad * d
    elif ESTIMATOR == 2:
        _, slope = k3_and_grad(d)
        dkl = grad * slope
    else:
        dkl = tl.where(d > 0, grad, tl.where(d < 0, -grad, 0.0))
    # Both gradients come out of one contiguous row layout; the store casts to the input dtype.
    if GRAD_LOGP:
        tl.store(grad_logp_ptr + row * stride_gout_row + cols, dkl, mask=in_row)
    if GRAD_REF:
        tl.store(grad_ref_ptr + row * stride_gout_row + cols, -dkl, mask=in_row)


@triton.jit
def _kl_fwd_flat_kernel(
    logp_ptr, ref_ptr, out_ptr, dkl_ptr, n,
    ESTIMATOR: tl.constexpr, SAVE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    # The common call (contiguous inputs, no clamps) with the fewest arguments: Triton's launch
    # binds and specialises every argument on the host, about 0.3 us each. SAVE_GRAD: also
    # write d kl / d logp (fp32) for the eager backward, which is then one torch multiply.
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    logp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    d = logp - ref
    if ESTIMATOR == 2:
        kl, dkl = k3_and_grad(d)  # once for both the estimate and its derivative
        tl.store(out_ptr + offs, kl, mask=inb)
        if SAVE_GRAD:
            tl.store(dkl_ptr + offs, dkl, mask=inb)
    else:
        tl.store(out_ptr + offs, kl_estimate(d, ESTIMATOR), mask=inb)
        if SAVE_GRAD:
            if ESTIMATOR == 0:
                dkl = tl.full([BLOCK], 1.0, tl.float32)
            elif ESTIMATOR == 1:
                dkl = d
            else:
                dkl = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
            tl.store(dkl_ptr + offs, dkl, mask=inb)


_kl_fwd_flat = CachedLaunch(globals(), "_kl_fwd_flat_kernel")
_kl_fwd = CachedLaunch(globals(), "_kl_fwd_kernel")
_kl_bwd = CachedLaunch(globals(), "_kl_bwd_kernel")


def k3_torch(d: torch.Tensor, derivative: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """k3 = e^-d + d - 1 of a log-ratio d (any shape, fp32 or fp64) and its derivative
    1 - e^-d (None unless ``derivative``), with torch ops, for the torch paths of the fused ops.

    Evaluated as expm1(-d) + d in float64 and rounded once to d's dtype: within an fp32 rounding
    of the exact value for |d| down to about 1e-10 (float64 expm1's rounding, about 1e-16 |d|,
    against k3 ~ d^2 / 2), where fp32's own e^-d + d - 1 (or expm1(-d) + d) is off by percents
    (by 1e-4) at |d| ~ 1e-3. (A polynomial as in the kernels would be about ten torch ops.)"""
    d64 = d.double()
    em1 = torch.expm1(-d64)
    kl = (em1 + d64).to(d.dtype)
    return kl, ((-em1).to(d.dtype) if derivative else None)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _as_rows(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], int, int, list[int]]:
    """Same-shape tensors as (rows, cols) -> (tensors, n_rows, n_cols, [row, col stride each]).

    When all are contiguous they are one row of numel columns and are passed as they are (the
    kernel only needs their pointers; no view to make). Otherwise strides are passed to the
    kernels, so only leading dims that cannot be merged into one row stride are copied (by
    ``reshape``).
    """
    if all(t.is_contiguous() for t in tensors):
        n = tensors[0].numel()
        return list(tensors), 1, n, [n, 1] * len(tensors)
    cols = tensors[0].shape[-1]
    rows = [t.reshape(-1, cols) for t in tensors]
    return rows, rows[0].shape[0], cols, [s for t in rows for s in t.stride()]


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    """(...) -> (rows, cols) for the native kernels (a view unless the dims cannot merge)."""
    return t.reshape(1, -1) if t.dim() == 0 else t.reshape(-1, t.shape[-1])


def _empty_like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous buffer of ``t``'s shape and device (``_alloc.empty``, NaN-filled under
    RLHF_KERNELS_POISON). ``empty_like`` costs about half the host time of ``torch.empty(shape,
    dtype=, device=)``, which parses the shape and device again."""
    out = torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)
    if _alloc._POISON:
        out.fill_(float("nan"))
    return out


# The options tuples of the calls without clamps, per estimator code, made once.
_OPTIONS_NO_CLAMPS = {code: (code, None, None) for code in KL_ESTIMATOR_CODES.values()}
# The launch options without clamps, made once (the common call).
_NO_CLAMPS = dict(clamp=0.0, log_ratio_clamp=0.0, HAS_CLAMP=False, HAS_LOG_RATIO_CLAMP=False)


def _options(clamp: float | None, log_ratio_clamp: float | None) -> dict:
    if clamp is None and log_ratio_clamp is None:
        return _NO_CLAMPS
    return dict(
        clamp=0.0 if clamp is None else float(clamp),
        log_ratio_clamp=0.0 if log_ratio_clamp is None else float(log_ratio_clamp),
        HAS_CLAMP=clamp is not None,
        HAS_LOG_RATIO_CLAMP=log_ratio_clamp is not None,
    )


def _launch_fwd(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: int,
    clamp: float | None,
    log_ratio_clamp: float | None,
) -> torch.Tensor:
    out = _empty_like(logp, torch.float32)
    n = logp.numel()
    if n == 0:
        return out
    if native_cpu_kernels(logp):  # csrc/cpu/elementwise.cpp
        _native.ops().kl_fwd(_rows2d(logp), _rows2d(ref_logp), _rows2d(out), estimator, clamp,
                             log_ratio_clamp)
        return out
    if logp.is_contiguous() and ref_logp.is_contiguous():
        if clamp is None and log_ratio_clamp is None:
            _kl_fwd_flat(((n + _BLOCK - 1) // _BLOCK,), logp, ref_logp, out, out, n, estimator,
                         False, _BLOCK, num_warps=4)
            return out
        # What _as_rows gives for contiguous tensors (one row of n), without building it.
        n_col_blocks = cdiv(n, _BLOCK)
        _kl_fwd((n_col_blocks,),
            logp, ref_logp, out, n, 1, n, 1, n, n, n_col_blocks,
            ESTIMATOR=estimator, BLOCK=_BLOCK, num_warps=4, **_options(clamp, log_ratio_clamp),
        )
        return out
    (logp2, ref2, out2), n_rows, n_cols, strides = _as_rows(logp, ref_logp, out)
    n_col_blocks = cdiv(n_cols, _BLOCK)
    _kl_fwd((n_rows * n_col_blocks,),
        logp2, ref2, out2,
        *strides[:4], strides[4],
        n_cols, n_col_blocks,
        ESTIMATOR=estimator, BLOCK=_BLOCK, num_warps=4, **_options(clamp, log_ratio_clamp),
    )
    return out


@torch.library.custom_op("rlhf_kernels::kl_penalty", mutates_args=())
def _kl_penalty_op(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: int,
    clamp: float | None,
    log_ratio_clamp: float | None,
) -> torch.Tensor:
    return _launch_fwd(logp, ref_logp, estimator, clamp, log_ratio_clamp)


@_kl_penalty_op.register_fake
def _(logp, ref_logp, estimator, clamp, log_ratio_clamp):
    return torch.empty(logp.shape, dtype=torch.float32, device=logp.device)


def _launch_bwd(
    grad: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: int,
    clamp: float | None,
    log_ratio_clamp: float | None,
    need_logp: bool = True,
    need_ref: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """-> (d logp, d ref_logp), each contiguous in its input's dtype, or None where not needed
    (at least one is)."""
    grad_logp = _empty_like(logp, logp.dtype) if need_logp else None
    grad_ref = _empty_like(ref_logp, ref_logp.dtype) if need_ref else None
    n = logp.numel()
    if n == 0:
        return grad_logp, grad_ref
    if native_cpu_kernels(logp):  # csrc/cpu/elementwise.cpp
        _native.ops().kl_bwd(
            _rows2d(grad if grad.dtype == torch.float32 else grad.float()), _rows2d(logp),
            _rows2d(ref_logp), None if grad_logp is None else _rows2d(grad_logp),
            None if grad_ref is None else _rows2d(grad_ref), estimator, clamp, log_ratio_clamp)
        return grad_logp, grad_ref
    # A gradient that is not needed is not written: the other's buffer stands in for it.
    out_logp = grad_logp if need_logp else grad_ref
    out_ref = grad_ref if need_ref else grad_logp
    if grad.is_contiguous() and logp.is_contiguous() and ref_logp.is_contiguous():
        # What _as_rows gives for contiguous tensors (one row of n), without building it.
        n_col_blocks = cdiv(n, _BLOCK)
        _kl_bwd((n_col_blocks,),
            grad, logp, ref_logp, out_logp, out_ref, n, 1, n, 1, n, 1, n, n, n_col_blocks,
            ESTIMATOR=estimator, GRAD_LOGP=need_logp, GRAD_REF=need_ref, BLOCK=_BLOCK,
            num_warps=4, **_options(clamp, log_ratio_clamp),
        )
        return grad_logp, grad_ref
    # grad may be an expanded (stride-0) tensor, e.g. from .sum(); the strides handle it.
    (grad2, logp2, ref2, gl2, gr2), n_rows, n_cols, strides = _as_rows(
        grad, logp, ref_logp, out_logp, out_ref)
    n_col_blocks = cdiv(n_cols, _BLOCK)
    _kl_bwd((n_rows * n_col_blocks,),
        grad2, logp2, ref2, gl2, gr2,
        *strides[:6], strides[6],
        n_cols, n_col_blocks,
        ESTIMATOR=estimator, GRAD_LOGP=need_logp, GRAD_REF=need_ref, BLOCK=_BLOCK,
        num_warps=4, **_options(clamp, log_ratio_clamp),
    )
    return grad_logp, grad_ref


@torch.library.custom_op("rlhf_kernels::kl_penalty_backward", mutates_args=())
def _kl_penalty_backward_op(
    grad: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: int,
    clamp: float | None,
    log_ratio_clamp: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_bwd(grad, logp, ref_logp, estimator, clamp, log_ratio_clamp)


@_kl_penalty_backward_op.register_fake
def _(grad, logp, ref_logp, estimator, clamp, log_ratio_clamp):
    return torch.empty_like(logp, memory_format=torch.contiguous_format), torch.empty_like(
        ref_logp, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logp, ref_logp, estimator, clamp, log_ratio_clamp = inputs
    ctx.save_for_backward(logp, ref_logp)
    ctx.options = (estimator, clamp, log_ratio_clamp)


def _backward(ctx, grad):
    logp, ref_logp = ctx.saved_tensors
    grad_logp, grad_ref = _kl_penalty_backward_op(grad, logp, ref_logp, *ctx.options)
    return grad_logp, grad_ref, None, None, None


_kl_penalty_op.register_autograd(_backward, setup_context=_setup_context)


class _KLFunction(torch.autograd.Function):
    """The eager path (``launch_directly``): the same kernels as the custom ops, without their
    host time."""

    # The options as one tuple argument: autograd.Function.apply costs host time per argument.
    @staticmethod
    def forward(ctx, logp, ref_logp, options):
        ctx.options = options
        n = logp.numel()
        if (options[1] is None and options[2] is None and n and logp.is_contiguous()
                and ref_logp.is_contiguous() and not native_cpu_kernels(logp)):
            # The common call: the forward launch also writes d kl / d logp (fp32), and the
            # backward is grad * that, one torch multiply (no allocation + launch of the backward
            # kernel). Same fp32 arithmetic as the backward kernel; the GPU bytes are the same
            # for fp32 inputs (4 B/token more written here, 8 B/token fewer read there).
            # (k1's derivative is 1: nothing to write, the backward passes grad through.)
            out = _empty_like(logp, torch.float32)
            k1 = options[0] == 0
            dkl = out if k1 else _empty_like(logp, torch.float32)
            _kl_fwd_flat(((n + _BLOCK - 1) // _BLOCK,), logp, ref_logp, out, dkl, n,
                         options[0], not k1, _BLOCK, num_warps=4)
            # the output is saved only as no_double_backward's path to the inputs (which the
            # slow path below saves; as in _reduce.SavedGradLoss); d kl / d logp is held
            ctx.save_for_backward(out)
            ctx.dkl = None if k1 else dkl
            ctx.dtypes = (logp.dtype, ref_logp.dtype)
            return out
        ctx.save_for_backward(logp, ref_logp)
        ctx.dtypes = None
        return _launch_fwd(logp, ref_logp, *options)

    @staticmethod
    @no_double_backward("kl_penalty")
    def backward(ctx, grad):
        need_logp, need_ref = ctx.needs_input_grad[:2]
        if not (need_logp or need_ref):
            return None, None, None
        if ctx.dtypes is not None:
            dkl = ctx.dkl
            d_logp = grad if dkl is None else grad * dkl
            d_ref = -d_logp if need_ref else None
            dtype_logp, dtype_ref = ctx.dtypes
            if need_logp and dtype_logp != torch.float32:
                d_logp = d_logp.to(dtype_logp)
            if need_ref and dtype_ref != torch.float32:
                d_ref = d_ref.to(dtype_ref)
            return (d_logp if need_logp else None), d_ref, None
        logp, ref_logp = ctx.saved_tensors
        # Only the gradients autograd asks for (the reference model's log-probs usually need
        # none): one buffer less to allocate and write.
        grad_logp, grad_ref = _launch_bwd(grad, logp, ref_logp, *ctx.options, need_logp,
                                          need_ref)
        return grad_logp, grad_ref, None


_apply_kl = direct_apply(_KLFunction)


# --------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------
def check_kl_options(estimator: str, **clamps: float | None) -> None:
    """ValueError for an unknown estimator or a negative / NaN clamp bound."""
    if estimator not in KL_ESTIMATOR_CODES:
        raise ValueError(
            f"estimator={estimator!r} is not supported; expected one of "
            f"{tuple(KL_ESTIMATOR_CODES)}"
        )
    for name, value in clamps.items():
        if value is not None and not (float(value) >= 0.0):
            raise ValueError(
                f"{name}={value} must be a non-negative bound (the clamp is to [-{name}, "
                f"+{name}]), or None for no clamp"
            )


def kl_penalty(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: str = "k1",
    clamp: float | None = None,
    log_ratio_clamp: float | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-token KL estimate from the sampled token's log-probabilities.

    logp, ref_logp: (...) fp16/bf16/fp32/fp64, same shape -> kl (...) fp32 (fp64 for fp64 input),
    differentiable with respect to both inputs.

    estimator: "k1" (d), "k2" (d^2/2), "k3" (e^-d + d - 1) or "abs" (|d|), d = logp - ref_logp.
    log_ratio_clamp clamps d before the estimator (veRL: 20 inside k3); clamp clamps the result
    (OpenRLHF / veRL: 10). Clamped elements get zero gradient, as with torch.clamp.
    backend: "triton", "reference" or "auto" (see rlhf_kernels.backend).
    """
    check_float("logp", logp)
    check_float("ref_logp", ref_logp)
    check_same_shape("ref_logp", ref_logp, "logp", logp)
    if ref_logp.device != logp.device:
        check_same_device(("logp", logp), ("ref_logp", ref_logp))
    code = KL_ESTIMATOR_CODES.get(estimator)
    # Known estimator and no clamps (the usual call) need no further check: host time counts.
    if code is None or clamp is not None or log_ratio_clamp is not None:
        clamp = real_setting("clamp", clamp, none_ok=True)
        log_ratio_clamp = real_setting("log_ratio_clamp", log_ratio_clamp, none_ok=True)
        check_kl_options(estimator, clamp=clamp, log_ratio_clamp=log_ratio_clamp)
    if (not torch.compiler.is_compiling() and torch.is_grad_enabled()
            and (logp.requires_grad or ref_logp.requires_grad)):
        # A tensor made under torch.inference_mode (e.g. a reference model's log-probs) cannot
        # be saved for the backward, which torch's own k1 / k3 formulas never need to do: the
        # backward gets a copy of it. (Eager only: Dynamo cannot trace is_inference().)
        logp = logp.clone() if logp.is_inference() else logp
        ref_logp = ref_logp.clone() if ref_logp.is_inference() else ref_logp
    use_reference = torch.float64 in (logp.dtype, ref_logp.dtype)
    if resolve_backend(logp, backend, "kl_penalty") == "reference" or use_reference:
        return reference.kl_penalty(logp, ref_logp, estimator, clamp, log_ratio_clamp)
    if clamp is None and log_ratio_clamp is None:
        options = _OPTIONS_NO_CLAMPS[code]  # made once: host time counts
    else:
        options = (code, clamp, log_ratio_clamp)
    if not launch_directly(logp, ref_logp):
        return _kl_penalty_op(logp, ref_logp, *options)
    if torch.is_grad_enabled() and (logp.requires_grad or ref_logp.requires_grad):
        return _apply_kl(logp, ref_logp, options)
    return _launch_fwd(logp, ref_logp, *options)
