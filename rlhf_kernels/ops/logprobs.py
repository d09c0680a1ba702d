"""Log-probabilities (and entropy) of the chosen tokens, one sweep over the vocabulary.

Math (per row, z = logits / T, T the temperature, y the label)::

    lse     = log sum_j exp(z_j)                      (online: running max m, running sum s)
    logp    = z_y - lse
    entropy = -sum_j p_j log p_j = lse - E_p[z]       (p = softmax(z))

The forward keeps, per row, ``m`` (the running max), ``s = sum exp(z - m)`` and
``a = sum exp(z - m) * (z - m)``; when the max moves from m to m', both are rescaled by
exp(m - m') (and ``a`` gains ``(m - m') * s``). At the end ``lse = m + log s`` and
``entropy = log s - a / s``: two non-negative terms, so there is no cancellation.

The backward writes the logits gradient directly, again in one sweep, from the saved lse and
entropy (no softmax is kept between the passes)::

    dz_j      = g_logp * (onehot_j - p_j) - g_H * p_j * (log p_j + H)
    d logit_j = dz_j / T                   (in the logits' dtype; optionally into the logits buffer)

Rows whose label is ``ignore_index`` give logp = entropy = 0 and a zero gradient; the forward skips
their vocabulary sweep entirely and the backward only writes their zeros.

Bytes: the forward reads the logits once (N * V * elem) and writes 4-12 bytes per row; the backward
reads them once more and writes the gradient once (2 * N * V * elem). For bf16 8x1024x151936 that
is 2.49 GB forward and 7.47 GB forward + backward: the copy-bandwidth floor of the op.

Non-finite logits (the Triton path; the reference gives the same values):

* ``-inf`` entries are masked vocabulary entries: probability 0, zero gradient; the result is the
  same as with those entries removed from the vocabulary (a label pointing at one gives -inf).
* a NaN (or +inf) anywhere in a row gives NaN logp / entropy / gradient for that row only (the
  reference's entropy reads 0 there, an artefact of its ``p > 0`` test; NaN is the honest answer).
* a label outside [0, V) that is not ``ignore_index`` (nothing checks on the host by default)
  reads nothing and gives NaN logp and a NaN d logits row when logp has a gradient (the
  entropy is unaffected); ``check_labels=True`` raises instead.
* a row whose logits are all ``-inf`` gives logp NaN (as ``torch.log_softmax``), entropy 0 (the
  reference's ``0 log 0 = 0``) and a NaN gradient; give such rows ``ignore_index`` instead.

fp64 logits are accepted by the Triton path but computed in fp32 (outputs cast to fp64, as the
reference's dtype; gradient fp64); ``backend="reference"`` computes in fp64.

The returned logp / entropy are not saved for the backward: the forward kernel also writes lse
and a private copy of entropy into a (2, N) fp32 buffer that the backward reads, so editing the
outputs in place leaves the gradient unchanged.

Dispatch: torch.compile, export, torch.func and fake tensors go through the ``torch.library``
custom ops below (``rlhf_kernels::logprobs_fwd`` with its registered autograd and the
``logprobs_bwd`` / ``logprobs_bwd_inplace_`` ops). In plain eager mode
(``rlhf_kernels.backend.launch_directly``) the same launchers run directly, under a
``torch.autograd.Function`` when the logits need a gradient: the same kernels with the same
arguments (the same bits), without the custom ops' dispatch and autograd host time.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from rlhf_kernels import _native, reference
from rlhf_kernels._alloc import empty
from rlhf_kernels._checks import check_float, check_same_device, int_setting, real_setting
from rlhf_kernels.backend import (
    direct_apply,
    launch_directly,
    native_cpu_kernels,
    resolve_backend,
    triton_interpreter_enabled,
)
from rlhf_kernels.ops._launch import CachedLaunch
from rlhf_kernels.ops._reduce import next_power_of_2, no_double_backward

__all__ = ["logprobs", "logprobs_fwd", "logprobs_bwd"]

_EMPTY = (0,)


# --------------------------------------------------------------------------------------------
# Kernels. Rows are addressed as (outer, inner) = divmod(row, n_inner) so that a (B, T, V) slice
# such as logits[:, :-1, :] (row stride V, batch stride (T+1) V) is read in place, without a copy.
# --------------------------------------------------------------------------------------------
# exp2 with flush-to-zero semantics. Triton lowers tl.exp / tl.exp2 to ``ex2.approx.f32``
# without .ftz, which sm_80+ executes as MUFU.EX2 wrapped in a denormal fix-up (a compare and two
# predicated multiplies per element: about a quarter of the forward loop's SASS). libdevice's
# exp2f under Triton's default nvvm-reflect FTZ is ``ex2.approx.ftz.f32``: one MUFU. The only
# difference is for results below 2**-126 (returned as 0 instead of a denormal): a term of a
# softmax sum or a probability that small changes nothing a float32 result can show. The Triton
# interpreter has no libdevice, so there it is tl.exp2 (the same math in numpy).
if triton_interpreter_enabled():
    @triton.jit
    def exp2_ftz(x):
        return tl.exp2(x)
else:
    @triton.jit
    def exp2_ftz(x):
        return libdevice.exp2(x)


LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,
    labels_ptr,
    logp_ptr,
    entropy_ptr,
    saved_entropy_ptr,
    lse_ptr,
    stride_outer,
    stride_inner,
    n_inner,
    V,
    inv_temperature,
    ignore_index,
    BLOCK_V: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
    SAVE_ENTROPY: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    # Ignored rows skip the sweep: zero trip count, no bytes read.
    v_end = tl.where(valid, V, 0)
    offsets = tl.arange(0, BLOCK_V)
    # The sweep works in base 2 on the raw logits x: with k2 = log2(e) / T, exp(z - z_max) is
    # 2^((x - m) * k2), m the running max of x (k2 > 0: the same entry is the max). The shift is
    # subtracted before the scale, so that the max entry's term is exactly 1 (a row with one
    # finite logit gives logp exactly 0) and the rounding is relative to x - m, as in the
    # reference's log_softmax; one MUFU.EX2 per entry, no exp fix-up (exp2_ftz).
    k2 = inv_temperature * LOG2E
    m = -float("inf")  # running max of x; the shift, except 0 while every x so far is -inf
    s = 0.0  # sum 2^((x - m) * k2)
    a = 0.0  # sum 2^t * t, t = (x - m) * k2   (entropy only; base-2 units)
    for start in tl.range(0, v_end, BLOCK_V, num_stages=NUM_STAGES):
        cols = start + offsets
        x = tl.load(row_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # While every x so far is -inf, shift by 0 instead: -inf - -inf would be NaN.
        m_shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        moved = (m - m_shift) * k2
        scale = exp2_ftz(moved)
        t = (x - m_shift) * k2
        e = exp2_ftz(t)
        if RETURN_ENTROPY:
            # While s == 0, moved may be -inf: take 0 (not -inf * 0 = NaN).
            moved = tl.where(s > 0.0, moved, 0.0) * s
            # -inf entries: e == 0 and t == -inf; their term is 0 (0 log 0 = 0).
            et = e * tl.where(e > 0.0, t, 0.0)
            a = (a + moved) * scale + tl.sum(et, axis=0)
        s = s * scale + tl.sum(e, axis=0)
        m = m_shift

    # s == 0 only for ignored rows (lse unused, log(1) = 0 keeps it finite) and all -inf rows.
    lse = m * inv_temperature + tl.log2(tl.where(valid, s, 1.0)) * LN2
    # Out-of-range labels (only possible with check_labels=False) read nothing and give NaN.
    label_ok = (label >= 0) & (label < V)
    z_label = tl.load(row_ptr + label, mask=valid & label_ok, other=float("nan"))
    logp = z_label.to(tl.float32) * inv_temperature - lse
    # fp32 math; the outputs may be fp64 (fp64 logits), the cast happens in the store
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0).to(logp_ptr.dtype.element_ty))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
    if RETURN_ENTROPY:
        # s == 0: all -inf (0 log 0 = 0, as the reference); a NaN s stays NaN.
        s_pos = tl.where(s == 0.0, 1.0, s)
        entropy = tl.where(valid, tl.where(s == 0.0, 0.0, (tl.log2(s_pos) - a / s_pos) * LN2),
                           0.0)
        tl.store(entropy_ptr + row, entropy.to(entropy_ptr.dtype.element_ty))
        if SAVE_ENTROPY:
            # a private fp32 copy for the backward: the caller may edit the returned entropy
            tl.store(saved_entropy_ptr + row, entropy)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr,
    labels_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    out_ptr,
    stride_outer,
    stride_inner,
    out_stride_outer,
    out_stride_inner,
    n_inner,
    V,
    inv_temperature,
    ignore_index,
    col_offset,
    label_vocab,
    BLOCK_V: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # The V columns of a row are columns [col_offset, col_offset + V) of a vocabulary of
    # label_vocab entries (0 and V for whole rows; a slice of the vocabulary for linear_logprobs'
    # vocabulary sweep): labels are in the whole vocabulary's numbering.
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row % n_inner
    row_ptr = logits_ptr + outer * stride_outer + inner * stride_inner
    out_row_ptr = out_ptr + outer * out_stride_outer + inner * out_stride_inner
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    label_ok = (label >= 0) & (label < label_vocab)
    # The in-row column compare is 32-bit (V < 2**31): an int64 compare costs about five
    # instructions per element. A label outside [0, label_vocab) may wrap here, but its row's
    # gradient is NaN whatever the compare says (c below); a label outside this slice's columns
    # matches none of them.
    label32 = (label - col_offset).to(tl.int32)
    lse = tl.load(lse_ptr + row)
    # d logit_j = c * (onehot_j - p_j) - c_H * p_j * (log2 p_j + H * log2(e)), the per-row
    # factors folded once: c = g_logp / T (NaN for an out-of-range label: its logp is NaN, so
    # the gradient is NaN rather than a plausible number), c_H = g_H * ln(2) / T; both 0 for an
    # ignored row, whose loads are predicated off (p = 0): it gets exact zeros.
    c = 0.0
    if HAS_GRAD_LOGP:
        c = tl.load(grad_logp_ptr + row) * inv_temperature
        c = tl.where(label_ok, c, float("nan"))
    c = tl.where(valid, c, 0.0)
    c_h = 0.0
    h2 = 0.0
    if HAS_GRAD_ENTROPY:
        c_h = tl.where(valid, tl.load(grad_entropy_ptr + row) * (inv_temperature * LN2), 0.0)
        h2 = tl.load(entropy_ptr + row) * LOG2E
    read_end = tl.where(valid, V, 0)
    offsets = tl.arange(0, BLOCK_V)
    # Each block is read and then written by this program alone, so out may be the logits buffer.
    for start in tl.range(0, V, BLOCK_V, num_stages=NUM_STAGES):
        cols = start + offsets
        # lanes past V (and ignored rows) read -inf: p = 0 there, so they compute an exact 0
        # rather than exp(-lse), which overflows fp16 when lse is very negative (never stored)
        x = tl.load(row_ptr + cols, mask=cols < read_end, other=float("-inf")).to(tl.float32)
        # log2 p = (x / T - lse) * log2(e): the difference first (one FFMA), so that a
        # certain token gets p exactly 1 at T = 1; then one MUFU.EX2 without fix-up.
        t = (x * inv_temperature - lse) * LOG2E
        p = exp2_ftz(t)
        grad = tl.where(cols == label32, c, 0.0) - c * p
        if HAS_GRAD_ENTROPY:
            # -inf entries: p == 0 and t == -inf; the term is 0.
            grad -= c_h * p * tl.where(p > 0.0, t + h2, 0.0)
        tl.store(out_row_ptr + cols, grad.to(out_ptr.dtype.element_ty), mask=cols < V)


# Launches without Triton's per-call argument binding once a specialisation was seen
# (ops/_launch.py); looked up at call time, so a test or a sweep may swap the kernels.
_fwd_launch = CachedLaunch(globals(), "_logprobs_fwd_kernel")
_bwd_launch = CachedLaunch(globals(), "_logprobs_bwd_kernel")


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _launch_config(V: int, entropy: bool = False) -> tuple[int, int, int]:
    """(BLOCK_V, num_warps, num_stages) for a row of V entries (``entropy``: the forward that
    also returns the entropy).

    A row is a streaming reduction, so what matters is bytes in flight per SM, not threads per
    row. Large vocabularies stream 2048-entry blocks with one warp per row (the reductions stay
    inside the warp: shuffles, no shared-memory barrier), so many rows per SM keep loads in
    flight: the configuration Liger's selective log-softmax uses, measured at 97% of the copy
    floor on an H200 (forward, bf16 8x1024x151936; benchmarks/results). ``num_stages`` is the
    vocabulary loops' ``tl.range(..., num_stages=k)``: k >= 2 software-pipelines the logits
    loads (the sm_90 compile shows cp.async, LDGSTS, and k - 1 blocks in shared memory; also
    more registers: 80 in the backward at k = 2, 255 at k = 4, against 72 at k = 1, so fewer
    rows per SM). k = 2 for large vocabularies, measured on the H200 (bf16 8x1024x151936,
    883821a): forward 0.609 ms at k = 2 against 0.665 ms at k = 1 (96% / 88% of the copy floor),
    forward + backward 1.88 against 1.92 ms; k = 4 gains 2% more at 3x the backward's registers.
    The forward with entropy keeps k = 1 (0.633 ms on the H200): at k = 2 it takes 161-182
    registers against 72, and its time there is unmeasured (``bench_logprobs`` times it).
    The loop's arithmetic and order are the same at every k (the loads are only issued earlier),
    so the results are bit-identical. ``benchmarks/bench_logprobs.py --sweep`` times k = 1..4
    (different binaries; ``python -m benchmarks.static_sass`` shows their SASS). Small
    vocabularies take the whole row in one block. Cached per V: it runs twice per forward +
    backward, and ``triton.next_power_of_2`` alone costs microseconds of host time.
    """
    if V > 2048:
        return 2048, 1, 1 if entropy else 2
    block_v = max(16, next_power_of_2(V))
    return block_v, max(1, min(4, block_v // 512)), 1


def _rows3d_view(x: torch.Tensor) -> torch.Tensor | None:
    """(..., V) with stride(-1) == 1 -> a (B, T, V) view of the same memory, or None when the
    leading dims cannot be described by two strides."""
    V = x.shape[-1]
    if x.dim() == 1:
        return x.view(1, 1, V)
    try:
        return x.view(1, -1, V)  # all leading dims collapse onto one row stride
    except (RuntimeError, ValueError):  # fake tensors raise ValueError
        pass
    try:
        return x.view(-1, x.shape[-2], V)  # e.g. logits[:, :-1, :]
    except (RuntimeError, ValueError):  # fake tensors raise ValueError
        return None


def _rows3d(x: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (B, T, V) with stride(-1) == 1; a copy only when no view exists."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = _rows3d_view(x)
    return rows if rows is not None else x.contiguous().view(1, -1, x.shape[-1])


def _rows_disjoint(x3d: torch.Tensor) -> bool:
    """True when no two rows of the (B, T, V) view overlap in memory (safe to write in place)."""
    B, T, V = x3d.shape
    s_outer, s_inner, _ = x3d.stride()
    inner_ok = T == 1 or s_inner >= V
    outer_ok = B == 1 or s_outer >= (T - 1) * s_inner + V
    return inner_ok and outer_ok


def _out_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """logp / entropy dtype: fp64 for fp64 logits (as the reference), fp32 otherwise."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def _fwd3d(logits3d, labels1d, temperature, ignore_index, logp, entropy, lse, saved_entropy):
    """One forward launch over the B * T rows of (B, T, V) logits, written into the given buffers.

    logp: (N,) elements of any float dtype, contiguous (any shape: the kernel indexes row-major);
    entropy: the same, or None (not computed); lse: (N,) fp32 contiguous; saved_entropy: (N,) fp32
    contiguous or None: a private copy of entropy for the backward (so that the caller may edit
    the entropy it was returned).
    """
    B, T, V = logits3d.shape
    N = B * T
    if N == 0:
        return
    return_entropy = entropy is not None
    save_entropy = return_entropy and saved_entropy is not None
    if native_cpu_kernels(logits3d):  # csrc/cpu/logprobs.cpp: the same math, one sweep per row
        _native.ops().logprobs_fwd(logits3d, labels1d, logp, entropy, lse,
                                   saved_entropy if save_entropy else None, 1.0 / temperature,
                                   ignore_index)
        return
    block_v, num_warps, num_stages = _launch_config(V, return_entropy)
    # every parameter positionally, constexprs included (CachedLaunch)
    _fwd_launch(
        (N,), logits3d, labels1d, logp, entropy if return_entropy else logp,
        saved_entropy if save_entropy else lse, lse,
        logits3d.stride(0), logits3d.stride(1), T, V,
        1.0 / temperature, ignore_index,
        block_v, return_entropy, save_entropy, num_stages, num_warps=num_warps,
    )


def _bwd3d(logits3d, labels1d, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index,
           out3d, col_offset=0, label_vocab=None):
    B, T, V = logits3d.shape
    N = B * T
    if N == 0:
        return out3d
    has_grad_entropy = grad_entropy is not None
    if has_grad_entropy and entropy is None:
        raise ValueError("grad_entropy was given but entropy is None; run the forward with "
                         "return_entropy=True")
    whole_rows = label_vocab is None or (col_offset == 0 and label_vocab == V)
    if native_cpu_kernels(logits3d):  # csrc/cpu/logprobs.cpp
        if not whole_rows:  # (linear_logprobs' vocabulary sweep asks for Triton only)
            raise ValueError(f"col_offset={col_offset}, label_vocab={label_vocab}: the native "
                             f"CPU logprobs backward takes whole rows of the vocabulary, not a "
                             f"slice of columns; run the Triton kernel for slices")
        _native.ops().logprobs_bwd(logits3d, labels1d, _flat_fp32(lse),
                                   _flat_fp32(entropy) if has_grad_entropy else None, grad_logp,
                                   grad_entropy, out3d, 1.0 / temperature, ignore_index)
        return out3d
    block_v, num_warps, num_stages = _launch_config(V)
    # every parameter positionally, constexprs included (CachedLaunch)
    _bwd_launch(
        (N,), logits3d, labels1d, lse,
        entropy if has_grad_entropy else lse,
        grad_logp if grad_logp is not None else lse,
        grad_entropy if has_grad_entropy else lse,
        out3d,
        logits3d.stride(0), logits3d.stride(1), out3d.stride(0), out3d.stride(1), T, V,
        1.0 / temperature, ignore_index, col_offset, V if label_vocab is None else label_vocab,
        block_v, grad_logp is not None, has_grad_entropy, num_stages, num_warps=num_warps,
    )
    return out3d


def _flat_fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    # Upstream gradients may be expanded (stride 0) or bf16; the kernel wants (N,) contiguous fp32.
    # (Each step only when needed: a no-op reshape / .to() / .contiguous() still costs host time.)
    if t is None:
        return None
    if t.dim() != 1:
        t = t.reshape(-1)
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return t if t.is_contiguous() else t.contiguous()


def logprobs_fwd(
    logits2d: torch.Tensor,
    labels1d: torch.Tensor,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    out: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None,
    saved_entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Forward launcher on a (N, V) block of logits (used by the fused linear / PPO ops).

    logits2d: (N, V) fp16/bf16/fp32/fp64, stride(1) == 1, any stride(0) (a chunk of a bigger
    buffer is fine). labels1d: (N,) int64/int32, contiguous. No validation and no host sync:
    labels outside [0, V) that are not ``ignore_index`` give NaN logp (never an out-of-bounds
    read). Returns ``(logp (N,), entropy (N,) or None, lse (N,) fp32)``, where
    lse = logsumexp(logits / temperature) per row (0 for ignored rows), which ``logprobs_bwd``
    takes back. The math is fp32.

    out: optional ``(logp, entropy or None, lse)`` buffers to write into instead of new fp32
    ones, each with N contiguous elements (e.g. row slices of the caller's whole-batch outputs:
    no copy per chunk); logp / entropy may be any float dtype, lse is fp32. saved_entropy:
    optional (N,) fp32 contiguous buffer that receives a second copy of entropy (in the same
    launch), for a backward that must not depend on the returned entropy.
    """
    if logits2d.dim() != 2 or logits2d.stride(1) != 1:
        raise ValueError(f"logits2d must be (N, V) with stride(1) == 1, got shape "
                         f"{tuple(logits2d.shape)} strides {logits2d.stride()}")
    if out is None:
        n, device = logits2d.shape[0], logits2d.device
        out = (empty((n,), torch.float32, device),
               empty((n,), torch.float32, device) if return_entropy else None,
               empty((n,), torch.float32, device))
    logp, entropy, lse = out
    entropy = entropy if return_entropy else None
    _fwd3d(logits2d.unsqueeze(0), labels1d.contiguous(), float(temperature), int(ignore_index),
           logp, entropy, lse, saved_entropy)
    return logp, entropy, lse


def logprobs_bwd(
    logits2d: torch.Tensor,
    labels1d: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    out: torch.Tensor,
    col_offset: int = 0,
    label_vocab: int | None = None,
) -> torch.Tensor:
    """Backward launcher: writes d loss / d logits2d into ``out`` (N, V) and returns ``out``.

    logits2d, labels1d, temperature, ignore_index: as given to ``logprobs_fwd``; lse and entropy:
    what it returned (entropy may be None when grad_entropy is None). grad_logp / grad_entropy:
    (N,) fp32 upstream gradients, either may be None (treated as zero). out: (N, V) of any float
    dtype with stride(1) == 1; it may be ``logits2d`` itself (each block is read before it is
    overwritten by the same program), which saves the (N, V) allocation. Ignored rows get 0.

    col_offset, label_vocab: logits2d may hold only columns ``[col_offset, col_offset + V)`` of
    rows of a ``label_vocab``-entry vocabulary (lse and entropy still of the whole rows, labels
    in the whole vocabulary's numbering): the gradient of those columns (Triton kernel only).
    """
    if out.shape != logits2d.shape or out.stride(1) != 1:
        raise ValueError(f"out must have the shape of logits2d {tuple(logits2d.shape)} and "
                         f"stride(1) == 1, got shape {tuple(out.shape)} strides {out.stride()}")
    if logits2d.stride(1) != 1:
        raise ValueError(f"logits2d must have stride(1) == 1, got strides {logits2d.stride()}")
    _bwd3d(logits2d.unsqueeze(0), labels1d.contiguous(), lse, entropy, _flat_fp32(grad_logp),
           _flat_fp32(grad_entropy), float(temperature), int(ignore_index), out.unsqueeze(0),
           col_offset, label_vocab)
    return out


# --------------------------------------------------------------------------------------------
# torch.library registration (so torch.compile(fullgraph=True) traces through the op)
# --------------------------------------------------------------------------------------------
def _check_labels_in_range(labels: torch.Tensor, V: int, ignore_index: int) -> None:
    """check_labels=True: one min/max reduction and one host sync over the labels that are not
    ignore_index; raises on a label outside [0, V)."""
    if labels.numel() == 0:
        return
    counted = labels != ignore_index
    lo, hi = torch.aminmax(torch.where(counted, labels, torch.zeros_like(labels)))
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= V:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"labels must be in [0, {V}) (the vocabulary size) or equal ignore_index="
            f"{ignore_index}; found label {bad}. Set padding labels to ignore_index."
        )


def _prepare(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _rows3d(logits), labels.reshape(-1).contiguous()


@torch.library.custom_op("rlhf_kernels::logprobs_fwd", mutates_args=())
def _logprobs_fwd_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    inplace_backward: bool,
    check_labels: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (logp (labels.shape), entropy (labels.shape, or (0,) without return_entropy), saved).

    logp / entropy are fp32 (fp64 for fp64 logits), freshly allocated in their final shape (not
    views, so the caller may edit them in place). saved: (1 or 2, N) fp32, the backward's own
    state: row 0 lse, row 1 (with entropy) a private copy of entropy.
    """
    return _forward(logits, labels, temperature, ignore_index, return_entropy, check_labels)


def _forward(logits, labels, temperature, ignore_index, return_entropy, check_labels):
    """The forward op's body, also run directly in plain eager mode (``launch_directly``)."""
    if check_labels:
        _check_labels_in_range(labels, logits.shape[-1], ignore_index)
    logits3d, labels1d = _prepare(logits, labels)
    device, dtype = logits.device, _out_dtype(logits.dtype)
    logp = empty(labels.shape, dtype, device)
    if return_entropy:
        entropy = empty(labels.shape, dtype, device)
        saved = empty((2, labels1d.shape[0]), torch.float32, device)
        lse, saved_entropy = saved.unbind(0)  # one call for both rows
    else:
        entropy = empty(_EMPTY, dtype, device)
        saved = empty((1, labels1d.shape[0]), torch.float32, device)
        lse, saved_entropy = saved.view(-1), None
    _fwd3d(logits3d, labels1d, temperature, ignore_index, logp,
           entropy if return_entropy else None, lse, saved_entropy)
    return logp, entropy, saved


@_logprobs_fwd_op.register_fake
def _(logits, labels, temperature, ignore_index, return_entropy, inplace_backward, check_labels):
    dtype = _out_dtype(logits.dtype)
    logp = logits.new_empty(labels.shape, dtype=dtype)
    entropy = logits.new_empty(labels.shape if return_entropy else _EMPTY, dtype=dtype)
    saved = logits.new_empty((2 if return_entropy else 1, labels.numel()), dtype=torch.float32)
    return logp, entropy, saved


def _split_saved(saved: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    return saved[0], saved[1] if saved.shape[0] > 1 else None


@torch.library.custom_op("rlhf_kernels::logprobs_bwd", mutates_args=())
def _logprobs_bwd_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    saved: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    return _backward_out_of_place(logits, labels, saved, grad_logp, grad_entropy, temperature,
                                  ignore_index)


def _backward_out_of_place(logits, labels, saved, grad_logp, grad_entropy, temperature,
                           ignore_index):
    """The backward op's body (also run directly in eager mode): d logits in a new buffer."""
    logits3d, labels1d = _prepare(logits, labels)
    out = empty(logits.shape, logits.dtype, logits.device)
    _bwd3d(logits3d, labels1d, *_split_saved(saved), _flat_fp32(grad_logp),
           _flat_fp32(grad_entropy), temperature, ignore_index, out.view(logits3d.shape))
    return out


def _backward_in_place(logits, labels, saved, grad_logp, grad_entropy, temperature,
                       ignore_index):
    """The in-place backward op's body: d logits written into the logits buffer."""
    logits3d, labels1d = _prepare(logits, labels)
    _bwd3d(logits3d, labels1d, *_split_saved(saved), _flat_fp32(grad_logp),
           _flat_fp32(grad_entropy), temperature, ignore_index, logits3d)


@_logprobs_bwd_op.register_fake
def _(logits, labels, saved, grad_logp, grad_entropy, temperature, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("rlhf_kernels::logprobs_bwd_inplace_", mutates_args=("logits",))
def _logprobs_bwd_inplace_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    saved: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> None:
    _backward_in_place(logits, labels, saved, grad_logp, grad_entropy, temperature, ignore_index)


@_logprobs_bwd_inplace_op.register_fake
def _(logits, labels, saved, grad_logp, grad_entropy, temperature, ignore_index):
    return None


def is_or_views_a_grad_leaf(t: torch.Tensor) -> bool:
    """Whether ``t`` is a leaf that requires grad or a view of one (``leaf[:, :-1]``,
    ``leaf.view(-1, V)``): memory an in-place backward must not write its gradient into."""
    if t.is_leaf:
        return t.requires_grad
    base = t._base
    return base is not None and base.is_leaf and base.requires_grad


def _can_write_in_place(logits: torch.Tensor) -> bool:
    # A copy (stride(-1) != 1, or leading dims no two strides describe) or overlapping rows
    # (an expanded tensor) cannot take the gradient in place: fall back to a fresh buffer.
    if logits.stride(-1) != 1:
        return False
    rows = _rows3d_view(logits)
    return rows is not None and _rows_disjoint(rows)


def savable_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels as the backward may save them. Token ids sampled under torch.inference_mode (a
    rollout) are inference tensors, which autograd refuses to save ("Inference tensors cannot
    be saved for backward") where the reference's plain torch ops never save them: such labels
    are copied (N ids, small beside the logits); others are saved as they are, so an in-place
    edit before the backward still trips the version counter."""
    return labels.clone() if labels.is_inference() else labels


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, return_entropy, inplace_backward, _ = inputs
    # Not the returned logp / entropy: the caller may edit those in place.
    _, _, saved = output
    ctx.inplace_backward = inplace_backward
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(saved)
    ctx.save_for_backward(logits, savable_labels(labels), saved)


def _backward(ctx, grad_logp, grad_entropy, _grad_saved):
    logits, labels, saved = ctx.saved_tensors
    if saved.shape[0] == 1:
        grad_entropy = None
    args = (labels, saved, grad_logp, grad_entropy, ctx.temperature, ctx.ignore_index)
    if ctx.inplace_backward and _can_write_in_place(logits):
        torch.ops.rlhf_kernels.logprobs_bwd_inplace_(logits, *args)
        grad_logits = logits
    else:
        grad_logits = torch.ops.rlhf_kernels.logprobs_bwd(logits, *args)
    return grad_logits, None, None, None, None, None, None


_logprobs_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _LogprobsFunction(torch.autograd.Function):
    """The eager path (``launch_directly``): the custom ops' bodies under one autograd Function,
    without their dispatch and autograd host time. Same kernels, same arguments, same bits; the
    returned logp / entropy are fresh tensors, the backward reads only its private saved state.
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, return_entropy,
                inplace_backward, check_labels):
        logp, entropy, saved = _forward(logits, labels, temperature, ignore_index,
                                        return_entropy, check_labels)
        ctx.inplace_backward = inplace_backward
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        ctx.save_for_backward(logits, savable_labels(labels), saved)
        return logp, entropy

    @staticmethod
    @no_double_backward("logprobs")
    def backward(ctx, grad_logp, grad_entropy):
        # Gradients are materialised (zeros for an unused output), as for the custom op.
        logits, labels, saved = ctx.saved_tensors
        if saved.shape[0] == 1:
            grad_entropy = None
        args = (labels, saved, grad_logp, grad_entropy, ctx.temperature, ctx.ignore_index)
        if ctx.inplace_backward and _can_write_in_place(logits):
            _backward_in_place(logits, *args)
            # What the mutating custom op does: a later reader of the logits saved for another
            # backward (or a second backward through this graph) fails loudly.
            torch.autograd.graph.increment_version(logits)
            return logits, None, None, None, None, None, None
        return _backward_out_of_place(logits, *args), None, None, None, None, None, None


_apply_logprobs = direct_apply(_LogprobsFunction)


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------
def logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    *,
    check_labels: bool = False,
    backend: str | None = None,
):
    """Log-probability (and entropy) of the chosen tokens under softmax(logits / temperature).

    logits: (..., V) fp16/bf16/fp32/fp64. Leading dims may have any strides (e.g.
        ``logits[:, :-1, :]`` is read in place); stride(-1) != 1 costs a copy.
    labels: (...) int64 or int32, the shape of ``logits.shape[:-1]``; ``ignore_index`` marks
        positions that give logp = entropy = 0 and no gradient.
    Returns logp (...), and entropy (...) when ``return_entropy``: fp32, or fp64 for fp64 logits
        on both backends (the Triton path computes in fp32 and casts; the reference in fp64).
        They are ordinary tensors: editing them in place is fine and does not change the
        backward.

    inplace_backward: the backward writes d logits into the logits buffer itself instead of a new
        (..., V) tensor (saves one logits-sized allocation, e.g. 2.3 GiB for bf16 8x1024x151936).
        After backward the logits tensor holds its own gradient, so: use it only when the logits
        are an intermediate activation (e.g. the lm_head output) that nothing reads afterwards.
        Autograd catches another op that saved the same logits for its backward (it raises
        "modified by an inplace operation"), as it does a ``retain_graph`` double backward. A leaf
        tensor that requires grad, or a view of one, is refused (the backward would overwrite the
        leaf's data). When the
        buffer cannot take the gradient in place (stride(-1) != 1, overlapping rows of an expanded
        tensor, leading dims that need a copy) the backward quietly uses a fresh buffer instead.
    check_labels: False (the default): no validation and no host sync; a label outside [0, V)
        that is not ignore_index gives NaN logp (and entropy as usual) for its row on both
        backends, never an out-of-bounds read nor a finite wrong number. True: raise a ValueError
        naming the bad label instead, at the cost of one min/max reduction and one host sync per
        call (use it while debugging a data pipeline).
    backend: "triton", "native", "reference" or "auto"/None (see ``rlhf_kernels.backend``).
    """
    check_float("logits", logits)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32 token ids, got {labels.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be (..., V) with V >= 1, got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but logits has shape {tuple(logits.shape)}; "
            f"labels must have the logits' leading shape {tuple(logits.shape[:-1])}"
        )
    check_same_device(("logits", logits), ("labels", labels))
    temperature = real_setting("temperature", temperature)
    if not (temperature > 0.0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    ignore_index = int_setting("ignore_index", ignore_index)

    if inplace_backward and is_or_views_a_grad_leaf(logits):
        raise ValueError(
            "inplace_backward=True needs logits that are an intermediate result (e.g. the lm_head "
            "output), but got a leaf tensor that requires grad, or a view of one (e.g. "
            "leaf[:, :-1]): the backward would overwrite that leaf's data with the gradient. "
            "Pass inplace_backward=False, or compute the logits in the graph."
        )
    if resolve_backend(logits, backend, "logprobs") == "reference":
        if check_labels:
            _check_labels_in_range(labels, logits.shape[-1], ignore_index)
        return reference.logprobs(logits, labels, temperature, ignore_index, return_entropy)
    args = (logits, labels, temperature, ignore_index, bool(return_entropy),
            bool(inplace_backward), bool(check_labels))
    if not launch_directly(logits, labels):
        logp, entropy, _ = _logprobs_fwd_op(*args)
    elif torch.is_grad_enabled() and logits.requires_grad:
        logp, entropy = _apply_logprobs(*args)
    else:
        logp, entropy, _ = _forward(logits, labels, temperature, ignore_index,
                                    bool(return_entropy), bool(check_labels))
    return (logp, entropy) if return_entropy else logp
