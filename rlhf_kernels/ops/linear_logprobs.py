"""Log-probabilities of chosen tokens straight from hidden states, never holding the (N, V) logits.

Math (per token row ``h`` of ``hidden (N, H)``, ``W (V, H)``, optional ``b (V,)`` and LoRA factors
``A (r, H)``, ``B (V, r)`` with scale ``s``)::

    z      = h @ W.T + s * (h @ A.T) @ B.T + b              # one row of logits, (V,)
    logp   = z[label] / T - lse,   lse = logsumexp(z / T)   # T = temperature
    entropy = lse - sum_j p_j z_j / T,   p = softmax(z / T)

and, asked for with ``stats`` (not differentiable; computed from each chunk of logits while it
exists, by torch ops on the chunk, see ``logits_stats``)::

    log_sum_sq_probs = log sum_j p_j^2     mean_logits = sum_j z_j / (T V)
    is_top1 = (label == the first argmax_j z_j)

Rows whose label is ``ignore_index`` give logp = entropy = 0 and no gradient: their d logits
are written as 0 by the kernel and their hidden rows are zeroed before the d weight / d LoRA
matmuls, so a NaN or inf hidden state there contributes exactly 0 (not 0 * NaN).

How: the rows are cut into chunks of ``C`` tokens. For each chunk the logits ``(C, V)`` are made
with cuBLAS matmuls in the inputs' dtype (bf16 on a GPU), the logprobs kernels of
``rlhf_kernels.ops.logprobs`` (fp32 math, one pass over the vocabulary) turn them into
logp / entropy / lse, and the chunk is dropped. Forward keeps only lse and entropy (N floats each).
Backward recomputes each chunk's logits, the logprobs backward kernel overwrites them in place
with ``d logits``, and the chunk's gradients are accumulated::

    d h_c  = dz @ W + s * (dz @ B) @ A        (written, one chunk of rows at a time)
    d W   += dz.T @ h_c        d b += sum_rows dz
    d B   += s * dz.T @ (h_c @ A.T)           d A += s * (dz @ B).T @ h_c

so the largest temporary is one chunk of logits, ``C x V`` elements. Only the gradients whose
input requires grad are computed.

When d weight is wanted, that row sweep would add every chunk's ``d W`` (V, H) into an fp32
accumulator: a read and a write of V x H fp32 per chunk, and V x H x 4 bytes held. The
backward then sweeps over slices of the vocabulary instead (``vocabulary_sweep``,
``_backward_by_vocabulary``): each slice's logits for all N rows, ``d W`` of the slice as one
matmul over every row (written once, rounded once), and ``d h`` summed over the slices in fp32
(N x H). Same matmuls, same temporary size; chosen when N < V or d hidden is not wanted (the
trainer's frozen lm_head keeps the row sweep, which needs no large accumulator at all).

Bytes: the op is matmul-bound (2·N·V·H flops forward, 8·N·V·H forward + backward with the
recomputation); besides the matmul operands, each chunk of logits is written once by the matmul
and read once by the forward kernel (forward), and written by the matmul, read and rewritten by
the backward kernel and read by the two gradient matmuls (backward).

Chunk size: ``chunk_size`` rows when given; otherwise ``memory_budget_bytes // (V * itemsize)``
rows, where the budget defaults to min(512 MiB, free CUDA memory / 4) on a GPU and 64 MiB on the
CPU, rounded down to a multiple of 64 rows when that large.
With ``stats`` including log_sum_sq_probs and 16-bit logits, an fp32 temporary the chunk's size
in bytes adds to it (fp32 / fp64 logits are worked on in place: nothing added).

Dtypes: hidden / weight / bias / LoRA factors fp16, bf16, fp32 or fp64. The matmuls run in the
promoted dtype of hidden and weight (cast the others to it; matching dtypes avoid a copy of the
weight); the logprobs kernels compute in fp32; logp / entropy are fp32 (fp64 when the matmuls
are fp64, as the reference's). Gradients come back in each input's own dtype. Every gradient
summed over chunks or slices is summed in fp32 (16-bit inputs) and rounded once at the end; the
bias and LoRA gradients are fp32 sums.

Dispatch: the forward and backward sweeps are ``torch.library`` custom ops for torch.compile,
export, torch.func and fake tensors; in plain eager mode (``rlhf_kernels.backend.
launch_directly``) they run directly, under a ``torch.autograd.Function`` when a gradient is
wanted (same sweeps, same bits, less host time).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_kernels import _alloc, reference
from rlhf_kernels._alloc import empty
from rlhf_kernels._checks import (
    check_float,
    check_same_device,
    finite_setting,
    int_setting,
    real_setting,
)
from rlhf_kernels.backend import direct_apply, launch_directly, resolve_backend
from rlhf_kernels.ops.logprobs import no_double_backward, savable_labels

__all__ = ["linear_logprobs", "choose_chunk_rows", "LinearLogprobsOutput", "STATS"]

DEFAULT_CUDA_BUDGET_BYTES = 512 * 2**20
DEFAULT_CPU_BUDGET_BYTES = 64 * 2**20
_EMPTY = (0,)


# --------------------------------------------------------------------------------------------
# the per-chunk logprobs kernels (rlhf_kernels.ops.logprobs)
# --------------------------------------------------------------------------------------------
_KERNELS = None


def _logprob_kernels():
    # Imported on first use (ops/logprobs.py defines @triton.jit kernels), then kept: an import
    # statement per call costs host time.
    global _KERNELS
    if _KERNELS is None:
        from rlhf_kernels.ops.logprobs import logprobs_bwd, logprobs_fwd

        _KERNELS = logprobs_fwd, logprobs_bwd
    return _KERNELS


def empty_like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``_alloc.empty(t.shape, dtype, t.device)`` (contiguous, NaN-filled under
    RLHF_KERNELS_POISON) at about half the host time: ``torch.empty(shape, dtype=, device=)``
    parses the shape and device again."""
    out = torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)
    if _alloc._POISON:
        out.fill_(float("nan"))
    return out


# --------------------------------------------------------------------------------------------
# chunking and the per-chunk matmuls (shared with ops/ppo_fused.py)
# --------------------------------------------------------------------------------------------
def choose_chunk_rows(
    n_rows: int,
    vocab: int,
    itemsize: int,
    device: torch.device,
    chunk_size: int = 0,
    memory_budget_bytes: int = 0,
) -> int:
    """Rows per chunk: ``chunk_size`` if > 0, else what fits one ``(rows, V)`` logits chunk in
    the budget (``memory_budget_bytes`` if > 0, else the device default; see module docstring)."""
    if n_rows == 0:
        return 1
    if chunk_size > 0:
        return min(chunk_size, n_rows)
    budget = memory_budget_bytes
    if budget <= 0:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = min(DEFAULT_CUDA_BUDGET_BYTES, free // 4)
        else:
            budget = DEFAULT_CPU_BUDGET_BYTES
    rows = max(1, budget // max(1, vocab * itemsize))
    if rows >= 64:
        rows -= rows % 64  # whole tensor-core tiles for the matmuls
    return min(rows, n_rows)


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(hidden.dtype, weight.dtype)


def cast_to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t.to(dtype)``; None stays None. Same dtype: ``t`` itself, without the microsecond a
    no-op ``.to()`` costs."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def cast_head(dtype, weight, bias, lora_a, lora_b):
    """The lm_head pieces in the matmul dtype (a copy only where the dtype differs)."""
    return (cast_to(weight, dtype), cast_to(bias, dtype), cast_to(lora_a, dtype),
            cast_to(lora_b, dtype))


def chunk_logits(h_c, weight, bias, lora_a, lora_b, lora_scale):
    """(C, H) rows -> ((C, V) logits in the matmul dtype, (C, r) LoRA activations or None)."""
    if bias is not None:
        logits = torch.addmm(bias, h_c, weight.t())
    else:
        logits = h_c @ weight.t()
    u = None
    if lora_a is not None:
        u = h_c @ lora_a.t()
        logits.addmm_(u, lora_b.t(), alpha=lora_scale)
    return logits, u


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b``. A 16-bit ``a @ b`` into an fp32 ``acc``: on CUDA one GEMM with an fp32
    output, so the product is never rounded to 16 bits; elsewhere (no such GEMM on the CPU) the
    product is rounded once and added in fp32."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if acc.device.type == "cuda":
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, NotImplementedError):  # a GPU without the fp32-output GEMM
            pass
    acc.add_(torch.mm(a, b))


class HeadGrads:
    """Gradients of the lm_head inputs over the row chunks; None where no gradient is wanted.

    d weight sums one product per row chunk. A 16-bit running sum would be rounded at every
    chunk, an error that grows with the number of chunks (and that biases training: small
    contributions are lost against a large sum); it is kept in fp32 instead and rounded once, at
    the end, to the weight's dtype, so d weight is as exact as one GEMM over all rows. The LoRA
    and bias gradients (small) are fp32 sums too. d hidden is one GEMM per row, never summed.

    ``single`` (every row in one chunk, the common case at small N): nothing is allocated up
    front; each gradient is its one product, made by ``accumulate`` (the same values as a sum
    of one term: the product rounded once; no zero fill, no ``out=``: less host time per call).
    """

    def __init__(self, n_rows, hidden, weight, bias, lora_a, lora_b, needs, dtype,
                 single=False):
        need_h, need_w, need_b, need_a, need_lb = needs
        has_lora = lora_a is not None
        self.wanted = (bool(need_h), bool(need_w), bool(need_b and bias is not None),
                       bool(need_a and has_lora), bool(need_lb and has_lora))
        self.single = single = single and n_rows > 0  # no rows: the zero gradients below
        self.hidden = self.weight = self.bias = self.lora_a = self.lora_b = None
        if single:
            return
        device = hidden.device
        h_dim = hidden.shape[-1]
        # d hidden: every row is written exactly once (one chunk each), so no zero fill.
        if need_h:  # hidden is (n_rows, H) here: empty_like is the cheaper allocation
            self.hidden = (empty_like(hidden, dtype) if hidden.shape == (n_rows, h_dim)
                           else empty((n_rows, h_dim), dtype, device))
        self.weight = (torch.zeros(weight.shape, dtype=_accumulator_dtype(dtype), device=device)
                       if need_w else None)
        zeros = lambda t, want: (torch.zeros(t.shape, dtype=torch.float32, device=device)  # noqa
                                 if want else None)
        self.bias = zeros(bias, self.wanted[2])
        self.lora_a = zeros(lora_a, self.wanted[3])
        self.lora_b = zeros(lora_b, self.wanted[4])

    def any(self) -> bool:
        return any(self.wanted)

    def reads_rows(self) -> bool:
        """Whether a gradient multiplies by the hidden rows (d weight, d lora): ignored rows must
        then be zeroed first (``zero_rows``)."""
        return self.wanted[1] or self.wanted[3] or self.wanted[4]

    def accumulate(self, start, dlogits, h_c, u, weight, lora_a, lora_b, lora_scale):
        """Add one chunk's contribution; ``dlogits`` (C, V) is d loss / d logits of rows
        ``start : start + C`` in the matmul dtype."""
        need_h, need_w, need_b, need_a, need_lb = self.wanted
        rows = dlogits.shape[0]
        du = None
        if lora_a is not None and (need_h or need_a):
            du = (dlogits @ lora_b) * lora_scale  # (C, r)
        if self.single:
            if need_h:
                self.hidden = torch.mm(dlogits, weight)
                if du is not None:
                    self.hidden.addmm_(du, lora_a)
            if need_w:
                self.weight = torch.mm(dlogits.t(), h_c)
            if need_b:
                self.bias = dlogits.sum(0, dtype=torch.float32)
            if need_a:
                self.lora_a = du.t() @ h_c
            if need_lb:
                self.lora_b = (dlogits.t() @ u) * lora_scale
            return
        if need_h:
            dh = self.hidden if rows == self.hidden.shape[0] else self.hidden[start:start + rows]
            torch.matmul(dlogits, weight, out=dh)
            if du is not None:
                dh.addmm_(du, lora_a)
        if need_w:
            add_product(self.weight, dlogits.t(), h_c)
        if need_b:
            self.bias += dlogits.sum(0, dtype=torch.float32)
        if need_a:
            self.lora_a += du.t() @ h_c
        if need_lb:
            self.lora_b += (dlogits.t() @ u) * lora_scale

    def outputs(self, hidden, weight, bias, lora_a, lora_b, placeholder=True):
        """The five gradients in their inputs' dtypes; where none is wanted, an empty tensor
        (what a custom op must return), or None with ``placeholder=False``."""
        def out(acc, like, wanted):
            if acc is None or not wanted:
                return hidden.new_empty(_EMPTY) if placeholder else None
            return acc if acc.dtype == like.dtype else acc.to(like.dtype)

        return tuple(out(acc, like, wanted) for acc, like, wanted in zip(
            (self.hidden, self.weight, self.bias, self.lora_a, self.lora_b),
            (hidden, weight, bias, lora_a, lora_b), self.wanted))


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """check_labels=True: one host sync; raises on a label outside [0, vocab) that is not
    ignore_index. (Without it such a label gives NaN logp: the kernels never read out of
    bounds.)"""
    if labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"labels must be in [0, {vocab}) (the vocabulary size) or equal ignore_index="
            f"{ignore_index}; found label {first}. Set padding labels to ignore_index."
        )


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-token outputs: fp64 when the matmuls run in fp64 (as the reference), else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def zero_rows(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(N, H) rows with keep == False set to 0 (a copy): rows whose d logits are 0 must add
    exactly 0 to d weight / d lora, and 0 * NaN = NaN for a NaN or inf hidden state there."""
    return torch.where(keep.unsqueeze(-1), h, 0)


# --------------------------------------------------------------------------------------------
# per-token statistics of the logits (``stats``)
# --------------------------------------------------------------------------------------------
STATS = reference.LOGPROB_STATS  # ("log_sum_sq_probs", "mean_logits", "is_top1")
# bit of each statistic in the custom op's ``stats`` argument
_STAT_BITS = {name: 1 << i for i, name in enumerate(STATS)}
_ALL_STATS = (1 << len(STATS)) - 1


class LinearLogprobsOutput(NamedTuple):
    """What ``linear_logprobs(..., stats=...)`` returns: each field (...) like ``labels``, None
    where not asked for (entropy: ``return_entropy``; the others: ``stats``)."""

    logp: torch.Tensor
    entropy: torch.Tensor | None
    log_sum_sq_probs: torch.Tensor | None
    mean_logits: torch.Tensor | None
    is_top1: torch.Tensor | None


def stats_bits(stats) -> int:
    """``stats`` (a name, or an iterable of names among ``STATS``) -> the op's bit mask."""
    names = (stats,) if isinstance(stats, str) else stats
    try:
        names = tuple(names)
    except TypeError:
        raise ValueError(f"stats must be a tuple of names among {STATS}, got {stats!r}") from None
    bits = 0
    for name in names:
        if name not in _STAT_BITS:
            hint = " (the entropy: return_entropy=True)" if name == "entropy" else ""
            raise ValueError(f"stats: {name!r} is not a statistic linear_logprobs computes; "
                             f"expected names among {STATS}{hint}")
        bits |= _STAT_BITS[name]
    return bits


def stats_outputs(labels: torch.Tensor, dtype: torch.dtype, bits: int):
    """The (log_sum_sq_probs, mean_logits, is_top1) outputs asked for by ``bits``, shaped like
    labels (float ``dtype``, bool); None where not asked for."""
    def out(name, out_type):
        return empty_like(labels, out_type) if bits & _STAT_BITS[name] else None

    return (out("log_sum_sq_probs", dtype), out("mean_logits", dtype),
            torch.empty_like(labels, dtype=torch.bool) if bits & _STAT_BITS["is_top1"] else None)


def logits_stats(logits, labels, temperature, ignore_index, outs, overwrite=False) -> None:
    """The statistics of one block of logits, written into ``outs``.

    logits (C, V) in the matmul dtype; labels (C,); outs: (log_sum_sq_probs, mean_logits,
    is_top1), each a (C,) tensor to write (fp32, fp64 for fp64 logits; bool) or None. With
    ``z = logits / temperature`` and ``p = softmax(z)`` (``reference.logprob_stats``)::

        mean_logits      = sum_j z_j / V                          (summed in fp32 / fp64)
        is_top1          = label == the first argmax_j z_j         (torch.max: first maximum)
        log_sum_sq_probs = 2 log |e| - 2 log sum_j e_j,  e_j = exp((x_j - max x) / T)
                           (= 2 log |softmax(x)|: torch.softmax, for 16-bit logits at T = 1)

    Rows whose label is ignore_index get 0 / False. Torch ops on the block, each one pass over
    it (the op is matmul-bound: these are O(C V) next to the matmul's O(C V H)).
    log_sum_sq_probs works on fp32 (fp64) copies of row blocks the size of ``logits`` in bytes
    (half its rows for 16-bit logits), or on ``logits`` itself, overwritten, when ``overwrite``
    and the logits are already fp32 (fp64): no temporary larger than the chunk.
    """
    lss, mean, top1 = outs
    valid = labels != ignore_index
    acc = out_dtype(logits.dtype)
    if mean is not None:
        total = logits.sum(-1, dtype=acc).div_(temperature * logits.shape[-1])
        mean.copy_(total.masked_fill_(~valid, 0.0))
    if lss is None and top1 is None:
        return
    rows = logits.shape[0]
    in_place = overwrite and logits.dtype == acc
    softmax_path = lss is not None and not in_place and temperature == 1.0
    if top1 is not None or (lss is not None and not softmax_path):
        row_max, argmax = logits.max(-1)  # one pass for both; the first maximum on ties
    if top1 is not None:
        torch.eq(argmax, labels, out=top1)
        top1.logical_and_(valid)
    if lss is None:
        return
    itemsize = torch.finfo(acc).bits // 8
    # fp32 (fp64) temporaries of ``block`` rows: one chunk of logits in bytes at most
    block = rows if in_place else max(1, rows * logits.element_size() // itemsize)
    inv_t = 1.0 / temperature
    for start in range(0, rows, block):
        sl = slice(start, start + block)
        if softmax_path:
            # 16-bit logits, temperature 1 (DPO's WPO): torch's softmax reads them and writes
            # fp32 probabilities in one op (shifted by the row max inside); sum p^2 = |p|^2.
            p = torch.softmax(logits[sl], -1, dtype=acc)
            value = torch.linalg.vector_norm(p, dim=-1).log_().mul_(2.0)
        else:
            e = logits[sl] if in_place else logits[sl].to(acc, copy=True)
            # x - max first (exact for nearby values), then the scale: relative rounding, as
            # the reference's log_softmax; e <= 1, so neither sum overflows.
            e.sub_(row_max[sl].unsqueeze(-1))
            if inv_t != 1.0:
                e.mul_(inv_t)
            e.exp_()
            log_sum = e.sum(-1).log_()
            value = torch.linalg.vector_norm(e, dim=-1).log_().sub_(log_sum).mul_(2.0)
        lss[sl] = value.masked_fill_(~valid[sl], 0.0)


# --------------------------------------------------------------------------------------------
# forward / backward sweeps
# --------------------------------------------------------------------------------------------
def _forward_sweep(hidden, weight, labels, bias, lora_a, lora_b, lora_scale, temperature,
                   ignore_index, return_entropy, chunk_size, memory_budget_bytes, check_labels,
                   stats):
    """The forward custom op's implementation: ``_sweep``'s outputs as six tensors, an empty
    (0,) tensor for each statistic not asked for."""
    logp, entropy, saved, extras = _sweep(hidden, weight, labels, bias, lora_a, lora_b,
                                          lora_scale, temperature, ignore_index, return_entropy,
                                          chunk_size, memory_budget_bytes, check_labels, stats)
    extras = (None, None, None) if extras is None else extras
    dtypes = (logp.dtype, logp.dtype, torch.bool)  # the fake impl's
    return (logp, entropy, saved, *(hidden.new_empty(_EMPTY, dtype=dtype) if t is None else t
                                    for t, dtype in zip(extras, dtypes)))


def _sweep(hidden, weight, labels, bias, lora_a, lora_b, lora_scale, temperature, ignore_index,
           return_entropy, chunk_size, memory_budget_bytes, check_labels, stats=0):
    """-> (logp (labels.shape), entropy (labels.shape) or (0,), saved (1 or 2, N) fp32: row 0
    lse, row 1 a private copy of entropy for the backward, extras: None when ``stats`` (a bit
    mask, ``_STAT_BITS``) is 0, else (log_sum_sq_probs, mean_logits, is_top1) of labels.shape,
    None where not asked for)."""
    logprobs_fwd, _ = _logprob_kernels()
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    if check_labels:
        check_label_range(labels, vocab, ignore_index)
    labels1d = labels.reshape(-1)
    dtype = compute_dtype(hidden, weight)
    w, b, a, lb = cast_head(dtype, weight, bias, lora_a, lora_b)
    h = cast_to(hidden, dtype)
    # Allocated in their final shape (the caller gets ordinary tensors); the kernels write each
    # chunk's rows straight into them through flat views.
    logp = empty_like(labels, out_dtype(dtype))
    entropy = (empty_like(labels, out_dtype(dtype)) if return_entropy
               else empty(_EMPTY, out_dtype(dtype), device))
    saved = empty((2 if return_entropy else 1, n_rows), torch.float32, device)
    logp_flat, ent_flat = logp.view(-1), entropy.view(-1)
    extras = stats_outputs(labels, out_dtype(dtype), stats) if stats else None
    rows = choose_chunk_rows(n_rows, vocab, h.element_size(), device, chunk_size,
                             memory_budget_bytes)
    if rows >= n_rows and n_rows > 0:  # one chunk: the whole tensors, no per-chunk slicing
        logits, _ = chunk_logits(h, w, b, a, lb, lora_scale)
        lse, saved_entropy = saved.unbind(0) if return_entropy else (saved.view(-1), None)
        logprobs_fwd(logits, labels1d, temperature, ignore_index, return_entropy,
                     out=(logp_flat, ent_flat if return_entropy else None, lse),
                     saved_entropy=saved_entropy)
        if extras is not None:
            logits_stats(logits, labels1d, temperature, ignore_index,
                         tuple(None if t is None else t.view(-1) for t in extras), overwrite=True)
        return logp, entropy, saved, extras
    flat_extras = None if extras is None else tuple(None if t is None else t.view(-1)
                                                    for t in extras)
    for start in range(0, n_rows, rows):
        sl = slice(start, min(start + rows, n_rows))
        logits, _ = chunk_logits(h[sl], w, b, a, lb, lora_scale)
        logprobs_fwd(logits, labels1d[sl], temperature, ignore_index, return_entropy,
                     out=(logp_flat[sl], ent_flat[sl] if return_entropy else None, saved[0, sl]),
                     saved_entropy=saved[1, sl] if return_entropy else None)
        if flat_extras is not None:  # while the chunk exists; it is dropped next
            logits_stats(logits, labels1d[sl], temperature, ignore_index,
                         tuple(None if t is None else t[sl] for t in flat_extras),
                         overwrite=True)
        del logits
    return logp, entropy, saved, extras


def _backward_sweep(grad_logp, grad_entropy, hidden, weight, labels, bias, lora_a, lora_b, lse,
                    entropy, lora_scale, temperature, ignore_index, chunk_size,
                    memory_budget_bytes, needs, placeholder=True):
    _, logprobs_bwd = _logprob_kernels()
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    dtype = compute_dtype(hidden, weight)
    w, b, a, lb = cast_head(dtype, weight, bias, lora_a, lora_b)
    h = cast_to(hidden, dtype)
    labels = labels.reshape(-1)
    grad_logp = None if grad_logp is None else grad_logp.reshape(-1)
    grad_entropy = None if grad_entropy is None else grad_entropy.reshape(-1)
    rows = choose_chunk_rows(n_rows, vocab, h.element_size(), device, chunk_size,
                             memory_budget_bytes)
    if vocabulary_sweep(needs, n_rows, vocab, rows, h):
        h = zero_rows(h, labels != ignore_index)
        return _backward_by_vocabulary(grad_logp, grad_entropy, h, w, b, a, lb, labels, lse,
                                       entropy, lora_scale, temperature, ignore_index,
                                       rows * vocab, needs, (hidden, weight, bias, lora_a,
                                                             lora_b), placeholder)
    single = rows >= n_rows  # one chunk: the whole tensors, no per-chunk slicing
    grads = HeadGrads(n_rows, hidden, weight, bias, lora_a, lora_b, needs, dtype, single)
    if grads.reads_rows():
        h = zero_rows(h, labels != ignore_index)  # ignored rows: exactly 0, even for NaN h
    if grads.any():
        for start in range(0, n_rows, rows):
            stop = min(start + rows, n_rows)
            sl = slice(start, stop)
            rows_of = (lambda t: t) if single else (lambda t, sl=sl: None if t is None else t[sl])
            h_c = rows_of(h)
            logits, u = chunk_logits(h_c, w, b, a, lb, lora_scale)
            # (logprobs_bwd makes the upstream gradients fp32 and contiguous)
            logprobs_bwd(
                logits, rows_of(labels), rows_of(lse),
                rows_of(entropy) if grad_entropy is not None else None,
                rows_of(grad_logp), rows_of(grad_entropy), temperature, ignore_index, logits,
            )
            grads.accumulate(start, logits, h_c, u, w, a, lb, lora_scale)
            del logits, u
    return grads.outputs(hidden, weight, bias, lora_a, lora_b, placeholder)


def vocabulary_sweep(needs, n_rows: int, vocab: int, rows: int, h: torch.Tensor) -> bool:
    """Whether the backward goes over slices of the vocabulary rather than chunks of rows.

    Both make the same matmuls. The row sweep adds each chunk's d weight (V, H) into an fp32
    accumulator: per chunk a read and a write of V x H fp32 (2.3 GiB each at V = 151936,
    H = 4096), and that much memory for the whole backward. The vocabulary sweep writes each
    slice of d weight once, from one matmul over all N rows, and accumulates d hidden (N, H)
    over the slices instead. With the same temporary (C x V elements, so as many slices as row
    chunks) it moves N / V of the row sweep's accumulator bytes, and holds an N x H fp32
    accumulator instead of a V x H one: the vocabulary sweep when d weight is wanted, the rows
    do not fit one chunk, and either d hidden is not wanted or N < V. Its column offsets are a
    Triton kernel argument (the native CPU kernel takes whole rows: the row sweep there).
    """
    need_h, need_w = needs[0], needs[1]
    if not need_w or rows >= n_rows or (need_h and n_rows >= vocab):
        return False
    from rlhf_kernels.ops import logprobs as logprobs_module  # (imported with the kernels)

    return not logprobs_module.native_cpu_kernels(h)  # what the logprobs launcher decides


def vocabulary_slice_columns(n_rows: int, vocab: int, elements: int) -> int:
    """Columns per vocabulary slice: ``elements`` (the row sweep's C x V temporary) over the N
    rows, rounded down to a multiple of 64 when that large (whole tensor-core tiles)."""
    cols = max(1, elements // max(1, n_rows))
    if cols >= vocab:
        return vocab
    return cols - cols % 64 if cols >= 64 else cols


def _backward_by_vocabulary(grad_logp, grad_entropy, h, w, b, a, lb, labels, lse, entropy,
                            lora_scale, temperature, ignore_index, elements, needs, inputs,
                            placeholder):
    """The backward as a sweep over slices ``[v0, v1)`` of the vocabulary (``vocabulary_sweep``).

    h: (N, H) in the matmul dtype, ignored rows zeroed. Per slice, with u = h @ A.T (N, r)::

        z_s = h @ W_s.T + s * u @ B_s.T + b_s    (N, v1 - v0), then d z_s in place (the kernel,
                                                  with lse / entropy of the whole rows)
        d W_s = d z_s.T @ h        d b_s = sum_rows d z_s        d B_s = s * d z_s.T @ u
        d h  += d z_s @ W_s        d u  += s * d z_s @ B_s        (fp32 accumulators)

    and after the sweep d h += d u @ A, d A = d u.T @ h. Each slice of d weight / d B / d b is
    one matmul over every row, written once (no running sum over chunks).
    """
    _, logprobs_bwd = _logprob_kernels()
    hidden, weight, bias, lora_a, lora_b = inputs
    need_h, need_w, need_b, need_a, need_lb = needs
    n_rows, vocab = h.shape[0], w.shape[0]
    dtype, device = h.dtype, h.device
    acc_dtype = _accumulator_dtype(dtype)
    cols = vocabulary_slice_columns(n_rows, vocab, elements)
    single = cols >= vocab
    has_lora = a is not None
    u = h @ a.t() if has_lora else None
    d_h = None
    if need_h:  # one slice: d h is one matmul, written in place; else an fp32 sum
        d_h = (empty((n_rows, h.shape[1]), dtype, device) if single
               else torch.zeros((n_rows, h.shape[1]), dtype=acc_dtype, device=device))
    d_u = (torch.zeros((n_rows, a.shape[0]), dtype=acc_dtype, device=device)
           if has_lora and (need_h or need_a) else None)
    d_w = empty(w.shape, dtype, device)
    d_b = empty(b.shape, torch.float32, device) if need_b and b is not None else None
    d_lb = empty(lb.shape, torch.float32, device) if need_lb and has_lora else None
    for v0 in range(0, vocab, cols):
        v1 = min(v0 + cols, vocab)
        w_s = w if single else w[v0:v1]
        if b is not None:
            z = torch.addmm(b if single else b[v0:v1], h, w_s.t())
        else:
            z = h @ w_s.t()
        lb_s = None
        if has_lora:
            lb_s = lb if single else lb[v0:v1]
            z.addmm_(u, lb_s.t(), alpha=lora_scale)
        logprobs_bwd(z, labels, lse, entropy if grad_entropy is not None else None, grad_logp,
                     grad_entropy, temperature, ignore_index, z, col_offset=v0,
                     label_vocab=vocab)
        torch.mm(z.t(), h, out=d_w[v0:v1])
        if d_b is not None:
            torch.sum(z, 0, dtype=torch.float32, out=d_b[v0:v1])
        if d_lb is not None:
            d_lb[v0:v1] = (z.t() @ u).mul_(lora_scale)
        if d_u is not None:
            add_product(d_u, z, lb_s)
        if d_h is not None:
            if single:
                torch.mm(z, w_s, out=d_h)
            else:
                add_product(d_h, z, w_s)
        del z
    d_a = None
    if d_u is not None:
        d_u16 = d_u.mul_(lora_scale).to(dtype)
        if d_h is not None:
            if d_h.dtype == dtype:
                d_h.addmm_(d_u16, a)
            else:
                add_product(d_h, d_u16, a)
        if need_a:
            d_a = (d_u16.t() @ h).to(torch.float32)

    def out(grad, like, wanted):
        if grad is None or not wanted:
            return hidden.new_empty(_EMPTY) if placeholder else None
        return grad if grad.dtype == like.dtype else grad.to(like.dtype)

    return (out(d_h, hidden, need_h), out(d_w, weight, need_w), out(d_b, bias, need_b),
            out(d_a, lora_a, need_a), out(d_lb, lora_b, need_lb))


# --------------------------------------------------------------------------------------------
# torch.library registration (custom ops + fake impls + autograd)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("rlhf_kernels::linear_logprobs_fwd", mutates_args=())
def _linear_logprobs_fwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    lora_scale: float,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    chunk_size: int,
    memory_budget_bytes: int,
    check_labels: bool,
    stats: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, H), labels (...) with N elements -> (logp (...), entropy (...) or (0,), saved
    (1 or 2, N) fp32, log_sum_sq_probs, mean_logits, is_top1 (...) or (0,) each; ``stats`` is
    the bit mask of the last three); see ``_sweep``."""
    return _forward_sweep(hidden, weight, labels, bias, lora_a, lora_b, lora_scale, temperature,
                          ignore_index, return_entropy, chunk_size, memory_budget_bytes,
                          check_labels, stats)


@_linear_logprobs_fwd_op.register_fake
def _(hidden, weight, labels, bias, lora_a, lora_b, lora_scale, temperature, ignore_index,
      return_entropy, chunk_size, memory_budget_bytes, check_labels, stats):
    dtype = out_dtype(compute_dtype(hidden, weight))

    def stat(name, stat_dtype):
        shape = labels.shape if stats & _STAT_BITS[name] else _EMPTY
        return hidden.new_empty(shape, dtype=stat_dtype)

    return (hidden.new_empty(labels.shape, dtype=dtype),
            hidden.new_empty(labels.shape if return_entropy else _EMPTY, dtype=dtype),
            hidden.new_empty((2 if return_entropy else 1, hidden.shape[0]), dtype=torch.float32),
            stat("log_sum_sq_probs", dtype), stat("mean_logits", dtype),
            stat("is_top1", torch.bool))


@torch.library.custom_op("rlhf_kernels::linear_logprobs_bwd", mutates_args=())
def _linear_logprobs_bwd_op(
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    lora_scale: float,
    temperature: float,
    ignore_index: int,
    chunk_size: int,
    memory_budget_bytes: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    need_lora_a: bool,
    need_lora_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (d hidden, d weight, d bias, d lora_a, d lora_b); empty (0,) where not wanted."""
    needs = (need_hidden, need_weight, need_bias, need_lora_a, need_lora_b)
    return _backward_sweep(grad_logp, grad_entropy, hidden, weight, labels, bias, lora_a, lora_b,
                           lse, entropy, lora_scale, temperature, ignore_index, chunk_size,
                           memory_budget_bytes, needs)


def fake_head_grads(hidden, weight, bias, lora_a, lora_b, needs):
    """Fake (shape-only) gradients of the five lm_head inputs, for register_fake."""
    def like(t, need):
        return t.new_empty(t.shape) if need and t is not None else hidden.new_empty(_EMPTY)

    return tuple(like(t, need) for t, need in zip((hidden, weight, bias, lora_a, lora_b), needs))


@_linear_logprobs_bwd_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, labels, bias, lora_a, lora_b, lse, entropy,
      lora_scale, temperature, ignore_index, chunk_size, memory_budget_bytes, need_hidden,
      need_weight, need_bias, need_lora_a, need_lora_b):
    needs = (need_hidden, need_weight, need_bias, need_lora_a, need_lora_b)
    return fake_head_grads(hidden, weight, bias, lora_a, lora_b, needs)


def _setup_context(ctx, inputs, output):
    (hidden, weight, labels, bias, lora_a, lora_b, lora_scale, temperature, ignore_index,
     return_entropy, chunk_size, memory_budget_bytes, _, _) = inputs
    # The private saved state, not the returned logp / entropy (the caller may edit those).
    _, _, saved, log_sum_sq, mean, _ = output
    ctx.mark_non_differentiable(saved, log_sum_sq, mean)  # (is_top1 is bool)
    ctx.save_for_backward(hidden, weight, savable_labels(labels), bias, lora_a, lora_b, saved)
    ctx.options = (lora_scale, temperature, ignore_index, return_entropy, chunk_size,
                   memory_budget_bytes)


def _head_backward(ctx, grad_logp, grad_entropy, sweep):
    """The gradients of both autograd paths from the saved state; ``sweep(*args, needs)`` runs
    the backward sweep (through the backward custom op, or directly on the eager path)."""
    hidden, weight, labels, bias, lora_a, lora_b, saved = ctx.saved_tensors
    if hidden.dim() != 2:  # the eager path saves hidden (..., H) as it came
        hidden = hidden.reshape(-1, hidden.shape[-1])
    lse, entropy = saved[0], saved[1] if saved.shape[0] > 1 else None
    lora_scale, temperature, ignore_index, return_entropy, chunk_size, budget = ctx.options
    need = ctx.needs_input_grad
    needs = (need[0], need[1], need[3] and bias is not None,
             need[4] and lora_a is not None, need[5] and lora_b is not None)
    if not return_entropy:
        grad_entropy = None
    d_hidden, d_weight, d_bias, d_a, d_b = sweep(
        grad_logp, grad_entropy, hidden, weight, labels, bias, lora_a, lora_b, lse,
        entropy if return_entropy else None, lora_scale, temperature, ignore_index, chunk_size,
        budget, needs=needs)
    hidden_shape = getattr(ctx, "hidden_shape", None)  # the eager path flattens (..., H) itself
    if d_hidden is not None and hidden_shape is not None:
        d_hidden = d_hidden.view(hidden_shape)
    pick = lambda g, wanted: g if wanted else None
    return (pick(d_hidden, needs[0]), pick(d_weight, needs[1]), None, pick(d_bias, needs[2]),
            pick(d_a, needs[3]), pick(d_b, needs[4]), None, None, None, None, None, None, None,
            None)


def _backward(ctx, grad_logp, grad_entropy, *_grad_saved_and_stats):
    return _head_backward(ctx, grad_logp, grad_entropy,
                          lambda *args, needs: _linear_logprobs_bwd_op(*args, *needs))


_linear_logprobs_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _LinearLogprobsFunction(torch.autograd.Function):
    """The eager path (``launch_directly``): the custom ops' sweeps under one autograd Function,
    without their dispatch and autograd host time (same kernels and matmuls, same bits). The
    returned logp / entropy are fresh tensors; the backward reads only the private saved state.
    """

    # options: (lora_scale, temperature, ignore_index, return_entropy, chunk_size,
    # memory_budget_bytes, check_labels, stats) as one tuple argument: autograd.Function.apply
    # costs host time per argument.
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, lora_a, lora_b, options):
        # hidden (..., H) is flattened here, not by the caller: no view node in the graph.
        ctx.hidden_shape = hidden.shape
        logp, entropy, saved, extras = _sweep(hidden.reshape(-1, hidden.shape[-1]), weight,
                                              labels, bias, lora_a, lora_b, *options)
        # The input itself is saved, not the flattened view: a view made here (grad mode is off)
        # turned an in-place edit of hidden before the backward into torch's "a view was
        # created in no_grad mode" error instead of the version counter's "modified by an
        # inplace operation" (_head_backward flattens it again).
        ctx.save_for_backward(hidden, weight, savable_labels(labels), bias, lora_a, lora_b,
                              saved)
        ctx.options = options[:6]  # without check_labels and stats
        if extras is None:
            return logp, entropy
        # (log_sum_sq_probs, mean_logits, is_top1), None where not asked for: no gradient
        ctx.mark_non_differentiable(*(t for t in extras if t is not None))
        return logp, entropy, *extras

    @staticmethod
    @no_double_backward("linear_logprobs")
    def backward(ctx, grad_logp, grad_entropy, *_grad_stats):
        # ``_backward`` with the sweep called directly instead of through the backward op; one
        # gradient per forward argument (the six inputs and the options tuple).
        return _eager_backward(ctx, grad_logp, grad_entropy)[:7]


_apply_linear_logprobs = direct_apply(_LinearLogprobsFunction)


def _eager_backward(ctx, grad_logp, grad_entropy):
    return _head_backward(ctx, grad_logp, grad_entropy,
                          lambda *args, needs: _backward_sweep(*args, needs, placeholder=False))


# --------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------
def check_temperature(temperature) -> float:
    """The same rule as ``logprobs``: logits are divided by it, so 0, inf and NaN are refused.
    -> the temperature as a float (from any real number or a 0-d tensor)."""
    value = real_setting("temperature", temperature)
    if not 0.0 < value < float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return value


def head_settings(lora_scale, temperature, ignore_index, chunk_size, memory_budget_bytes):
    """The scalar settings shared by linear_logprobs and linear_ppo_loss, checked and converted
    (Python / numpy numbers, 0-d tensors) -> (lora_scale, temperature, ignore_index,
    chunk_size or None, memory_budget_bytes or None)."""
    chunk_size = int_setting("chunk_size", chunk_size, none_ok=True)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got "
                         f"{chunk_size!r}")
    memory_budget_bytes = int_setting("memory_budget_bytes", memory_budget_bytes, none_ok=True)
    if memory_budget_bytes is not None and memory_budget_bytes < 1:
        raise ValueError(f"memory_budget_bytes must be a positive int or None, got "
                         f"{memory_budget_bytes!r}")
    lora_scale = finite_setting(
        "lora_scale", lora_scale,
        "the head is weight + lora_scale * lora_b @ lora_a; PEFT's is lora_alpha / r")
    return (lora_scale, check_temperature(temperature),
            int_setting("ignore_index", ignore_index), chunk_size, memory_budget_bytes)


def autocast_head(hidden, weight, bias, lora_a, lora_b):
    """Under autocast on hidden's device: ((hidden, weight, bias, lora_a, lora_b) cast to the
    autocast dtype as autocast casts a matmul's inputs (fp64 and None kept), True); else (them
    unchanged, False).

    The head ops cast in their Python wrapper and then run with autocast off, so their matmuls
    take the autocast dtype whether the op runs eagerly or compiled (a compiled custom op runs
    with autocast off: the chunk matmuls were bf16 in eager mode and fp32 under torch.compile).
    """
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return (hidden, weight, bias, lora_a, lora_b), False
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t if t is None or t.dtype in (dtype, torch.float64) else t.to(dtype)

    return tuple(cast(t) for t in (hidden, weight, bias, lora_a, lora_b)), True


def check_head_inputs(hidden, weight, labels, bias, lora_a, lora_b) -> None:
    """Shapes, dtypes and devices shared by linear_logprobs and linear_ppo_loss (the scalar
    settings: ``head_settings``)."""
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., H); got a 0-d tensor")
    if weight.dim() != 2 or 0 in weight.shape:
        raise ValueError(f"weight must have shape (V, H) with V >= 1 and H >= 1, got "
                         f"{tuple(weight.shape)}")
    vocab, h_dim = weight.shape
    if hidden.shape[-1] != h_dim:
        raise ValueError(
            f"hidden has H={hidden.shape[-1]} (shape {tuple(hidden.shape)}) but weight has "
            f"H={h_dim} (shape {tuple(weight.shape)}); the last dims must match"
        )
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an int64 (or int32) tensor, got {got}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but hidden has leading shape "
            f"{tuple(hidden.shape[:-1])}; they must match"
        )
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != (vocab,):
            raise ValueError(f"bias must have shape (V,) = ({vocab},), got {tuple(bias.shape)}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together (or neither)")
    if lora_a is not None:
        check_float("lora_a", lora_a)
        check_float("lora_b", lora_b)
        if lora_a.dim() != 2 or lora_a.shape[1] != h_dim:
            raise ValueError(f"lora_a must have shape (r, H) with H={h_dim}, got "
                             f"{tuple(lora_a.shape)}")
        rank = lora_a.shape[0]
        if lora_b.shape != (vocab, rank):
            raise ValueError(f"lora_b must have shape (V, r) = ({vocab}, {rank}), got "
                             f"{tuple(lora_b.shape)}")
    device = hidden.device
    if (weight.device != device or labels.device != device
            or (bias is not None and bias.device != device)
            or (lora_a is not None and (lora_a.device != device or lora_b.device != device))):
        check_same_device(("hidden", hidden), ("weight", weight), ("labels", labels),
                          ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b))


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    memory_budget_bytes: int | None = None,
    *,
    check_labels: bool = False,
    backend: str | None = None,
    stats: tuple[str, ...] | str | None = None,
):
    """Per-token log-probabilities (and entropy) of ``labels`` under the lm_head, chunked.

    hidden (..., H) fp16/bf16/fp32/fp64, weight (V, H), labels (...) int64, bias (V,),
    lora_a (r, H), lora_b (V, r) -> logp (...) [, entropy (...)]: the same as
    ``logprobs(hidden @ (weight + lora_scale * lora_b @ lora_a).T + bias, labels, temperature,
    ignore_index, return_entropy)`` while holding at most ``chunk_size x V`` logits at a time
    (forward and backward). ``chunk_size`` (rows) or ``memory_budget_bytes`` set the chunk; by
    default it is chosen from the free memory (module docstring). Differentiable in hidden,
    weight, bias, lora_a and lora_b (only those requiring grad are computed).

    Outputs are fp32, or fp64 when hidden or weight is fp64 (on both backends; the Triton path's
    softmax math is fp32 and cast). Under autocast the matmuls run in the autocast dtype (the
    inputs are cast as autocast casts a matmul's; fp64 stays), eagerly and compiled alike.
    They are ordinary tensors: editing them in place does not change the backward. A row whose
    label is ignore_index adds exactly 0 to every gradient, even when its hidden state is NaN or
    inf.

    check_labels: False (default): no host sync; a label outside [0, V) that is not ignore_index
    gives NaN logp for its row (never an out-of-bounds read). True: raise a ValueError naming it
    instead, at the cost of one host sync per call.

    stats: per-token statistics of the tempered logits ``z = logits / temperature``, computed
    from each chunk of logits while it exists (no extra matmul, no (N, V) tensor), none by
    default. Names among ``STATS`` (a tuple, or one name)::

        "log_sum_sq_probs"  log sum_j p_j^2, p = softmax(z)  (TRL's DPO WPO weight)
        "mean_logits"       sum_j z_j / V                    (TRL's logits/* metrics)
        "is_top1"           bool: label == the first argmax_j z_j (torch.argmax's tie rule)

    With ``stats`` given (even empty) the call returns a ``LinearLogprobsOutput`` named tuple
    (logp, entropy, log_sum_sq_probs, mean_logits, is_top1), None in the fields not asked for
    (entropy: ``return_entropy``). The statistics are fp32 (fp64 with fp64 matmuls) and bool,
    not differentiable; logp / entropy and their gradients are the same as without them. Rows
    whose label is ignore_index give 0 / False. The spec is ``reference.logprob_stats``.
    Cost: a few passes of torch ops over each chunk; log_sum_sq_probs of 16-bit logits uses an
    fp32 temporary the size of the chunk in bytes (so that chunk's memory doubles).
    """
    check_head_inputs(hidden, weight, labels, bias, lora_a, lora_b)
    (hidden, weight, bias, lora_a, lora_b), autocast_on = autocast_head(hidden, weight, bias,
                                                                        lora_a, lora_b)
    if autocast_on:
        with torch.autocast(hidden.device.type, enabled=False):
            return linear_logprobs(hidden, weight, labels, bias, lora_a, lora_b, lora_scale,
                                   temperature, ignore_index, return_entropy, chunk_size,
                                   memory_budget_bytes, check_labels=check_labels,
                                   backend=backend, stats=stats)
    lora_scale, temperature, ignore_index, chunk_size, memory_budget_bytes = head_settings(
        lora_scale, temperature, ignore_index, chunk_size, memory_budget_bytes)
    bits = 0 if stats is None else stats_bits(stats)
    if resolve_backend(hidden, backend, "linear_logprobs") == "reference":
        if check_labels:
            check_label_range(labels, weight.shape[0], ignore_index)
        if stats is not None:
            names = tuple(name for name in STATS if bits & _STAT_BITS[name])
            return LinearLogprobsOutput(*reference.linear_logprobs_stats(
                hidden, weight, labels, bias, lora_a, lora_b, lora_scale, temperature,
                ignore_index, return_entropy, names))
        return reference.linear_logprobs(hidden, weight, labels, bias, lora_a, lora_b, lora_scale,
                                         temperature, ignore_index, return_entropy)
    rest = (labels.long(), bias, lora_a, lora_b, lora_scale, temperature, ignore_index,
            bool(return_entropy), chunk_size or 0, memory_budget_bytes or 0, bool(check_labels),
            bits)
    if not launch_directly(hidden, weight, labels, bias, lora_a, lora_b):
        logp, entropy, _, *extras = _linear_logprobs_fwd_op(
            hidden.reshape(-1, hidden.shape[-1]), weight, *rest)
        if bits:  # the op's (0,) placeholders are the statistics not asked for
            extras = [t if bits & bit else None for t, bit in zip(extras, _STAT_BITS.values())]
    elif torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, weight, bias, lora_a, lora_b)):
        logp, entropy, *extras = _apply_linear_logprobs(hidden, weight, *rest[:4], rest[4:])
    else:
        logp, entropy, _, extras = _sweep(hidden.reshape(-1, hidden.shape[-1]), weight, *rest)
    if stats is not None:
        if not bits:
            extras = (None, None, None)
        return LinearLogprobsOutput(logp, entropy if return_entropy else None, *extras)
    return (logp, entropy) if return_entropy else logp
