"""linear_logprobs (chunked lm_head + logprobs kernels) against the float64 reference.

Values and every gradient (hidden, weight, bias, lora_a, lora_b) with a random upstream gradient,
under the 2x rule: the same-dtype eager path is ``hidden @ W.T (+ LoRA, + bias)`` in the input
dtype followed by the reference log-softmax, i.e. what a user would write without the fused op.
In bf16 the gradients' same-dtype error is the largest of that path's and of 32 emulated runs of
it (``_emulated_eager_errors``), with no atol.
"""

from __future__ import annotations

import pytest
import torch

import rlhf_kernels.ops.linear_logprobs as linear_module
import rlhf_kernels.ops.logprobs as logprobs_module
from rlhf_kernels import reference
from rlhf_kernels.ops.linear_logprobs import (
    HeadGrads,
    choose_chunk_rows,
    linear_logprobs,
    vocabulary_slice_columns,
    vocabulary_sweep,
)
from tests.numerics import DEVICE, assert_close, assert_close_2x, max_abs_err

NAMES = ("hidden", "weight", "bias", "lora_a", "lora_b")


def _make(lead, H, V, dtype, bias, rank, ignore_frac=0.2):
    scale = H ** -0.5 * 3  # logits of a few units: peaked but not one-hot distributions
    hidden = torch.randn(*lead, H, device=DEVICE).to(dtype)
    weight = (torch.randn(V, H, device=DEVICE) * scale).to(dtype)
    b = torch.randn(V, device=DEVICE).to(dtype) if bias else None
    a = (torch.randn(rank, H, device=DEVICE) * H ** -0.5).to(dtype) if rank else None
    lb = torch.randn(V, rank, device=DEVICE).to(dtype) if rank else None
    labels = torch.randint(0, V, lead, device=DEVICE)
    labels[torch.rand(lead, device=DEVICE) < ignore_frac] = -100
    return hidden, weight, b, a, lb, labels


def _eager_same_dtype(hidden, weight, labels, bias, a, lb, lora_scale, temperature,
                      return_entropy, rounded=lambda x: x):
    """The unfused path in the input dtype (logits materialised), for the 2x rule. ``rounded``
    marks the results the input dtype rounds (emulated in ``_emulated_eager_errors``)."""
    logits = rounded(hidden @ weight.t())
    if a is not None:
        logits = rounded(logits + rounded(lora_scale * rounded(rounded(hidden @ a.t()) @ lb.t())))
    if bias is not None:
        logits = rounded(logits + bias)
    return reference.logprobs(logits, labels, temperature, -100, return_entropy)


class _EmulatedRounding(torch.autograd.Function):
    """A float64 stand-in for one rounding to ``dtype``: each element gets an independent error
    uniform within half an ulp of ``dtype`` (the usual statistical model of round-to-nearest),
    in its value (unless ``exact``: an input, already representable) and in the gradient that
    comes back through it."""

    @staticmethod
    def forward(ctx, x, dtype, exact):
        ctx.dtype = dtype
        return x.clone() if exact else _with_rounding_error(x, dtype)

    @staticmethod
    def backward(ctx, grad):
        return _with_rounding_error(grad, ctx.dtype), None, None


def _with_rounding_error(x, dtype):
    ulp = torch.exp2(torch.floor(torch.log2(x.abs()))) * torch.finfo(dtype).eps  # 0 at x = 0
    return x + ulp * (torch.rand_like(x) - 0.5)


def _emulated_eager_errors(inputs64, labels, upstream, grads64, dtype, draws=32, **kw):
    """Per input, the largest gradient error (against ``grads64``) of ``draws`` emulated runs of
    ``_eager_same_dtype`` in ``dtype``: its ops in float64 on the same inputs, every result and
    every gradient given a rounding error of ``dtype`` (``_EmulatedRounding``), fresh each run.

    The eager run itself is one draw of those errors, and a small case makes few of them (one
    token, three logits: three roundings decide d logits). Its error can be far below what the
    same code usually makes (the logits' errors cancel in the softmax when they have the same
    sign), and a kernel as accurate as that code then fails the 2x rule; the largest of many
    draws is what the code can make on these inputs."""
    def emulated(h, w, lab, b, a, lb, **kw):
        h, w, b, a, lb = (None if t is None else _EmulatedRounding.apply(t, dtype, True)
                          for t in (h, w, b, a, lb))
        return _eager_same_dtype(h, w, lab, b, a, lb, **kw,
                                 rounded=lambda x: _EmulatedRounding.apply(x, dtype, False))

    worst = [0.0] * len(inputs64)
    for _ in range(draws):
        _, grads = _outputs_and_grads(emulated, inputs64, labels, upstream, **kw)
        worst = [e if g is None else max(e, max_abs_err(g, g64))
                 for e, g, g64 in zip(worst, grads, grads64)]
    return worst


def _outputs_and_grads(fn, inputs, labels, upstream, **kw):
    params = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(params[0], params[1], labels, params[2], params[3], params[4], **kw)
    outs = out if isinstance(out, tuple) else (out,)
    total = sum((o.double() * g).sum() for o, g in zip(outs, upstream))
    wanted = [p for p in params if p is not None]
    grads = iter(torch.autograd.grad(total, wanted))
    return outs, [next(grads) if p is not None else None for p in params]


# (lead shape, H, V, bias, lora rank, entropy, temperature, chunk_size)
CASES = [
    ((2, 7), 19, 131, False, 0, False, 1.0, 4),
    ((3, 5), 17, 97, True, 0, True, 0.7, 6),
    ((13,), 23, 61, False, 3, True, 1.3, 5),
    ((2, 6), 16, 129, True, 4, True, 0.5, 8),
    ((1, 1), 5, 3, True, 2, True, 1.0, None),  # one token, tiny vocabulary, automatic chunk
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,H,V,bias,rank,entropy,temperature,chunk", CASES)
def test_values_and_gradients(dtype, lead, H, V, bias, rank, entropy, temperature, chunk):
    hidden, weight, b, a, lb, labels = _make(lead, H, V, dtype, bias, rank)
    inputs = (hidden, weight, b, a, lb)
    lora_scale = 0.5
    kw = dict(lora_scale=lora_scale, temperature=temperature, return_entropy=entropy)
    upstream = [torch.randn(lead, device=DEVICE, dtype=torch.float64) for _ in range(2)]

    outs, grads = _outputs_and_grads(linear_logprobs, inputs, labels, upstream, chunk_size=chunk,
                                     backend="triton", **kw)
    inputs64 = tuple(t.double() if t is not None else None for t in inputs)
    outs64, grads64 = _outputs_and_grads(reference.linear_logprobs, inputs64, labels, upstream,
                                         **kw)
    outs_eager, grads_eager = _outputs_and_grads(_eager_same_dtype, inputs, labels, upstream,
                                                 **kw)
    # The logits are rounded to the input dtype before the softmax (in both the kernel and the
    # eager path, in different orders), which moves logp by up to an ulp of the largest logit /T.
    with torch.no_grad():
        h64, w64, b64, a64, lb64 = inputs64
        logits64 = h64 @ w64.t()
        if a64 is not None:
            logits64 = logits64 + lora_scale * ((h64 @ a64.t()) @ lb64.t())
        if b64 is not None:
            logits64 = logits64 + b64
        out_scale = max(1.0, logits64.abs().max().item() / temperature)
    for name, o, o64, oe in zip(("logp", "entropy"), outs, outs64, outs_eager):
        assert o.dtype == torch.float32 and o.shape == lead
        assert_close_2x(o, oe, o64, dtype, atol_scale=out_scale, name=name)
    if dtype == torch.float32:
        # gradients sum over tokens / vocabulary: scale atol with the gradient's size
        atol_scales = [max(1.0, g64.abs().max().item()) * out_scale ** 0.5 if g64 is not None
                       else 0.0 for g64 in grads64]
        emulated = [0.0] * len(grads64)
    else:
        # bf16: the logits' rounding rules the gradients' error; the same-dtype error is the
        # largest of the eager run and its emulated runs, with no atol (a fixed one was too
        # tight for one token and three logits, and loose enough elsewhere to pass d logits
        # off by 3%).
        atol_scales = [0.0] * len(grads64)
        emulated = _emulated_eager_errors(inputs64, labels, upstream, grads64, dtype, **kw)
    for name, g, g64, ge, t, scale, err in zip(NAMES, grads, grads64, grads_eager, inputs,
                                               atol_scales, emulated):
        if t is None:
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert_close_2x(g, ge, g64, dtype, atol_scale=scale, name=f"d {name}",
                        same_dtype_err=err)
    ignored = labels == -100
    assert (outs[0][ignored] == 0).all()


def test_frozen_weight_lora_only():
    """The trainer's case: base lm_head frozen, gradients for the LoRA factors and hidden only."""
    hidden, weight, _, a, lb, labels = _make((3, 5), 12, 67, torch.float32, False, 4)
    hidden.requires_grad_()
    a.requires_grad_()
    lb.requires_grad_()
    logp = linear_logprobs(hidden, weight, labels, lora_a=a, lora_b=lb, chunk_size=4,
                           backend="triton")
    logp.sum().backward()
    assert weight.grad is None
    h64, a64, b64 = (t.detach().double().requires_grad_() for t in (hidden, a, lb))
    reference.linear_logprobs(h64, weight.double(), labels, lora_a=a64, lora_b=b64).sum().backward()
    for t, t64, name in ((hidden, h64, "hidden"), (a, a64, "lora_a"), (lb, b64, "lora_b")):
        assert_close(t.grad, t64.grad, atol=1e-5, rtol=1e-4, name=name)


def test_no_grad_and_chunk_sizes_agree():
    hidden, weight, b, _, _, labels = _make((4, 9), 10, 53, torch.float32, True, 0)
    with torch.no_grad():
        results = [linear_logprobs(hidden, weight, labels, b, return_entropy=True, chunk_size=c,
                                   backend="triton") for c in (1, 7, 36, None)]
    for logp, ent in results[1:]:
        assert_close(logp, results[0][0], atol=1e-5, rtol=1e-6, name="logp across chunk sizes")
        assert_close(ent, results[0][1], atol=1e-5, rtol=1e-6, name="entropy across chunk sizes")


def test_strided_hidden():
    """A token-range slice (hidden[:, :-1], the usual shift) works without the caller copying."""
    hidden, weight, _, _, _, labels = _make((3, 8), 11, 41, torch.float32, False, 0)
    sliced = hidden[:, :-1]
    logp = linear_logprobs(sliced, weight, labels[:, :-1], chunk_size=5, backend="triton")
    ref = reference.linear_logprobs(sliced.double(), weight.double(), labels[:, :-1])
    assert_close(logp, ref, atol=1e-5, name="logp")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_torch_compile_fullgraph(backend):
    # fullgraph: no graph break, so no host sync either (the label check is opt-in)
    hidden, weight, b, a, lb, labels = _make((2, 5), 9, 37, torch.float32, True, 2)
    params = [t.requires_grad_() for t in (hidden, weight, b, a, lb)]

    def fn(h, w, bb, aa, bl):
        logp, ent = linear_logprobs(h, w, labels, bb, aa, bl, 0.5, 0.9, return_entropy=True,
                                    chunk_size=3, backend=backend)
        return (logp * 2).sum() + ent.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    grads_c = torch.autograd.grad(compiled(*params), params)
    grads_e = torch.autograd.grad(fn(*params), params)
    for gc, ge, name in zip(grads_c, grads_e, NAMES):
        assert_close(gc, ge, atol=1e-6, name=name)


def test_reference_backend_matches_reference():
    hidden, weight, b, _, _, labels = _make((2, 3), 6, 11, torch.float64, True, 0)
    out = linear_logprobs(hidden, weight, labels, b, backend="reference")
    assert torch.equal(out, reference.linear_logprobs(hidden, weight, labels, b))


def test_choose_chunk_rows():
    cpu = torch.device("cpu")
    assert choose_chunk_rows(1000, 50, 4, cpu, chunk_size=7) == 7
    assert choose_chunk_rows(5, 50, 4, cpu, chunk_size=7) == 5
    # budget / (V * itemsize) rows, rounded down to a multiple of 64 when that large
    assert choose_chunk_rows(10**6, 1000, 2, cpu, memory_budget_bytes=200 * 2000) == 192
    assert choose_chunk_rows(10**6, 1000, 2, cpu, memory_budget_bytes=50 * 2000) == 50
    assert choose_chunk_rows(10**6, 10**6, 4, cpu, memory_budget_bytes=1) == 1
    assert choose_chunk_rows(0, 10, 4, cpu) == 1


@pytest.mark.parametrize("change,message", [
    (dict(hidden=torch.randn(2, 3, 5)), "hidden has H=5"),
    (dict(labels=torch.zeros(2, 4, dtype=torch.long)), "labels has shape"),
    (dict(labels=torch.zeros(2, 3)), "labels must be an int64"),
    (dict(weight=torch.randn(7)), "weight must have shape"),
    (dict(bias=torch.randn(6)), "bias must have shape"),
    (dict(lora_a=torch.randn(2, 4)), "lora_a and lora_b must be given together"),
    (dict(lora_a=torch.randn(2, 5), lora_b=torch.randn(7, 2)), "lora_a must have shape"),
    (dict(lora_a=torch.randn(2, 4), lora_b=torch.randn(7, 3)), "lora_b must have shape"),
    (dict(temperature=0.0), "temperature must be a positive finite number, got 0.0"),
    (dict(temperature=float("inf")), "temperature must be a positive finite number, got inf"),
    (dict(temperature=float("nan")), "temperature must be a positive finite number, got nan"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(memory_budget_bytes=-1), "memory_budget_bytes must be a positive int"),
    (dict(labels=torch.tensor([[0, 1, 7], [0, 0, 0]]), check_labels=True),
     r"labels must be in \[0, 7\) .*found label 7"),
    (dict(hidden=torch.zeros(2, 3, 4, dtype=torch.long)), "hidden must be a floating tensor"),
])
def test_bad_input(change, message):
    kw = dict(hidden=torch.randn(2, 3, 4), weight=torch.randn(7, 4),
              labels=torch.zeros(2, 3, dtype=torch.long))
    kw.update(change)
    kw = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    with pytest.raises(ValueError, match=message):
        linear_logprobs(**kw, backend="triton")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_out_of_range_labels_give_nan(backend):
    """No host sync by default: a bad label gives NaN logp for its row (no out-of-bounds read,
    no finite wrong number); check_labels=True raises instead."""
    hidden, weight, b, _, _, labels = _make((2, 4), 6, 13, torch.float32, True, 0, 0.0)
    labels[0, 2] = 13
    labels[1, 1] = -1
    with pytest.raises(ValueError, match=r"labels must be in \[0, 13\) .*found label"):
        linear_logprobs(hidden, weight, labels, b, check_labels=True, backend=backend)
    logp = linear_logprobs(hidden, weight, labels, b, chunk_size=3, backend=backend)
    bad = torch.zeros_like(labels, dtype=torch.bool)
    bad[0, 2] = bad[1, 1] = True
    assert torch.isnan(logp[bad]).all()
    ref = reference.linear_logprobs(hidden.double(), weight.double(), labels.clamp(0, 12),
                                    b.double())
    assert_close(logp[~bad], ref[~bad], atol=1e-5, name="other rows")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fp64_in_fp64_out(backend):
    hidden, weight, b, a, lb, labels = _make((2, 3), 5, 17, torch.float64, True, 2)
    logp, ent = linear_logprobs(hidden, weight, labels, b, a, lb, return_entropy=True,
                                backend=backend)
    assert logp.dtype == ent.dtype == torch.float64
    ref_lp, ref_ent = reference.linear_logprobs(hidden, weight, labels, b, a, lb,
                                                return_entropy=True)
    assert_close(logp, ref_lp, atol=1e-5, name="logp")
    assert_close(ent, ref_ent, atol=1e-5, name="entropy")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_outputs_can_be_edited_in_place(backend):
    """The returned tensors are ordinary; editing them after the loss is built leaves the
    gradients those of the unedited outputs (the op saves private copies, not its outputs)."""
    hidden, weight, b, a, lb, labels = _make((2, 5), 7, 23, torch.float32, True, 2)
    upstream = [torch.randn(2, 5, device=DEVICE, dtype=torch.float64) for _ in range(2)]
    params = [t.clone().requires_grad_() for t in (hidden, weight, b, a, lb)]
    logp, ent = linear_logprobs(*params[:2], labels, *params[2:], 0.5, 0.9, return_entropy=True,
                                chunk_size=4, backend=backend)
    total = (logp.double() * upstream[0]).sum() + (ent.double() * upstream[1]).sum()
    logp[0, 1] = 0.0
    ent[1, 2] = 5.0
    ent.mul_(2.0)
    assert logp[0, 1] == 0.0 and ent[1, 2] == 10.0
    grads = torch.autograd.grad(total, params)
    _, grads64 = _outputs_and_grads(
        reference.linear_logprobs, [t.double() for t in (hidden, weight, b, a, lb)], labels,
        upstream, lora_scale=0.5, temperature=0.9, return_entropy=True)
    for g, g64, name in zip(grads, grads64, NAMES):
        assert_close(g, g64, atol=1e-5, rtol=1e-4, name=f"d {name}")


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_hidden_at_ignored_rows_adds_nothing(poison):
    """A NaN / inf hidden state where the label is ignore_index (padding) must not reach any
    gradient: the result equals the reference with those rows replaced by finite values."""
    hidden, weight, b, a, lb, labels = _make((2, 6), 8, 29, torch.float32, True, 3, 0.0)
    labels[0, 4:] = -100
    labels[1, 0] = -100
    ignored = labels == -100
    poisoned = hidden.clone()
    poisoned[ignored] = poison
    poisoned[0, 5, 3] = 1.0  # a row partly non-finite
    upstream = [torch.randn(2, 6, device=DEVICE, dtype=torch.float64) for _ in range(2)]
    kw = dict(lora_scale=0.5, temperature=0.9, return_entropy=True)
    outs, grads = _outputs_and_grads(linear_logprobs, (poisoned, weight, b, a, lb), labels,
                                     upstream, chunk_size=5, backend="triton", **kw)
    clean = [t.double() for t in (hidden, weight, b, a, lb)]
    outs64, grads64 = _outputs_and_grads(reference.linear_logprobs, clean, labels, upstream, **kw)
    for o, o64, name in zip(outs, outs64, ("logp", "entropy")):
        assert_close(o, o64, atol=1e-5, name=name)
    for g, g64, name in zip(grads, grads64, NAMES):
        assert torch.isfinite(g).all(), name
        assert_close(g, g64, atol=1e-5, rtol=1e-4, name=f"d {name}")
    assert (grads[0][ignored] == 0).all()


@pytest.mark.parametrize("shape", [(6, 8), (2, 3, 8)], ids=str)
def test_editing_hidden_in_place_before_backward_is_caught_by_the_version_counter(shape):
    """hidden edited in place between the forward and the backward: autograd's version-counter
    error, as for any op that saved its input (the eager path once saved a flattened view made
    with grad mode off, and torch raised a confusing "view was created in no_grad mode")."""
    leaf = torch.randn(shape, device=DEVICE, requires_grad=True)
    hidden = leaf * 1.0
    weight = torch.randn(11, shape[-1], device=DEVICE)
    labels = torch.randint(0, 11, shape[:-1], device=DEVICE)
    logp = linear_logprobs(hidden, weight, labels, chunk_size=4, backend="triton")
    hidden.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logp.sum().backward()



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_gradient_summed_over_many_chunks_is_as_exact_as_one_gemm(dtype):
    """d weight sums one product per row chunk (``HeadGrads.accumulate``, what both the
    logprobs and the fused PPO backward sweeps call). Over 256 chunks in 16 bits it stays within
    the 2x rule of one GEMM over all rows; a running sum kept in 16 bits (rounded at every
    chunk) was 4-8x off."""
    n_rows, H, V, rows = 4096, 32, 64, 16
    hidden = torch.randn(n_rows, H, device=DEVICE).to(dtype)
    weight = torch.randn(V, H, device=DEVICE).to(dtype)
    d_logits = (torch.randn(n_rows, V, device=DEVICE) / V).to(dtype)
    grads = HeadGrads(n_rows, hidden, weight, None, None, None,
                      (False, True, False, False, False), dtype)
    for start in range(0, n_rows, rows):
        grads.accumulate(start, d_logits[start:start + rows], hidden[start:start + rows], None,
                         weight, None, None, 1.0)
    d_weight = grads.outputs(hidden, weight, None, None, None)[1]
    one_gemm = d_logits.t() @ hidden
    exact = d_logits.double().t() @ hidden.double()
    assert d_weight.dtype == dtype and d_weight.shape == weight.shape
    assert_close_2x(d_weight, one_gemm, exact, dtype, name="d weight")


def test_vocabulary_sweep_choice(monkeypatch):
    """The backward goes over vocabulary slices only where it moves fewer accumulator bytes:
    d weight wanted, more than one chunk of rows, and d hidden not wanted or N < V; and only on
    the Triton kernel (the native CPU one takes whole rows)."""
    h = torch.zeros(1, device=DEVICE)
    monkeypatch.setattr(logprobs_module, "native_cpu_kernels", lambda t: True)
    assert not vocabulary_sweep((True, True, False, False, False), 100, 1000, 10, h)
    monkeypatch.setattr(logprobs_module, "native_cpu_kernels", lambda t: False)
    need = dict(hw=(True, True, False, False, False), w=(False, True, False, False, False),
                h=(True, False, False, True, True))
    assert vocabulary_sweep(need["hw"], n_rows=100, vocab=1000, rows=10, h=h)
    assert vocabulary_sweep(need["w"], n_rows=5000, vocab=1000, rows=10, h=h)
    assert not vocabulary_sweep(need["hw"], n_rows=5000, vocab=1000, rows=10, h=h)  # N >= V
    assert not vocabulary_sweep(need["h"], n_rows=100, vocab=1000, rows=10, h=h)  # no d weight
    assert not vocabulary_sweep(need["hw"], n_rows=100, vocab=1000, rows=100, h=h)  # one chunk
    # slices hold as many elements as a chunk of rows: 64-column multiples once that wide
    assert vocabulary_slice_columns(n_rows=100_000, vocab=151936, elements=1000 * 151936) == 1472
    assert vocabulary_slice_columns(n_rows=100, vocab=131, elements=4 * 131) == 5
    assert vocabulary_slice_columns(n_rows=3, vocab=131, elements=4 * 131) == 131


@pytest.mark.parametrize("sweep", ["vocabulary", "rows"])
@pytest.mark.parametrize("bias,rank,entropy,temperature", [
    (True, 3, True, 0.7), (False, 0, False, 1.0), (True, 0, True, 1.0), (False, 2, False, 1.3)])
def test_both_backward_sweeps_match_the_reference(monkeypatch, sweep, bias, rank, entropy,
                                                  temperature):
    """Every gradient of either sweep (forced) against the float64 reference, with labels on the
    slices' first and last columns, ignored rows whose hidden state is NaN, and the weight
    frozen or not."""
    lead, H, V, chunk = (2, 7), 9, 131, 4  # 4 x 131 elements: slices of 37 columns
    hidden, weight, b, a, lb, labels = _make(lead, H, V, torch.float32, bias, rank)
    if sweep == "vocabulary" and logprobs_module.native_cpu_kernels(hidden):
        pytest.skip("the native CPU logprobs backward takes whole rows "
                    "(tests/kernels/test_native.py)")
    monkeypatch.setattr(linear_module, "vocabulary_sweep",
                        lambda *args: sweep == "vocabulary")
    cols = vocabulary_slice_columns(14, V, chunk * V)
    labels[0, :5] = torch.tensor([0, cols - 1, cols, 2 * cols, V - 1])
    labels[1, 0] = -100
    hidden[1, 0] = float("nan")
    upstream = [torch.randn(lead, device=DEVICE, dtype=torch.float64) for _ in range(2)]
    kw = dict(lora_scale=0.5, temperature=temperature, return_entropy=entropy)
    inputs = (hidden, weight, b, a, lb)
    _, grads = _outputs_and_grads(linear_logprobs, inputs, labels, upstream, chunk_size=chunk,
                                  backend="triton", **kw)
    clean = hidden.clone()
    clean[1, 0] = 0.0
    _, grads64 = _outputs_and_grads(reference.linear_logprobs,
                                    [None if t is None else t.double()
                                     for t in (clean, weight, b, a, lb)], labels, upstream, **kw)
    for g, g64, t, name in zip(grads, grads64, inputs, NAMES):
        if t is None:
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert_close(g, g64, atol=1e-5, rtol=1e-4, name=f"{sweep} sweep: d {name}")
    # the trainer's case: frozen weight (the vocabulary sweep is not chosen then), LoRA or not
    h = hidden.clone().requires_grad_()
    linear_logprobs(h, weight, labels, b, chunk_size=chunk, backend="triton").sum().backward()
    h64 = clean.double().requires_grad_()
    reference.linear_logprobs(h64, weight.double(), labels,
                              None if b is None else b.double()).sum().backward()
    assert_close(h.grad, h64.grad, atol=1e-5, rtol=1e-4, name="d hidden, frozen weight")


def test_vocabulary_sweep_out_of_range_label_gives_nan_rows():
    """A label outside [0, V) (no check_labels) makes its row's gradient NaN in every slice, as
    in the row sweep; a label that is only outside one slice's columns is an ordinary label."""
    hidden, weight, _, _, _, labels = _make((2, 5), 6, 40, torch.float32, False, 0, 0.0)
    labels[0, 1] = 40
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    linear_logprobs(h, w, labels, chunk_size=2, backend="triton").sum().backward()
    assert torch.isnan(h.grad[0, 1]).all()
    ok = torch.ones(2, 5, dtype=torch.bool)
    ok[0, 1] = False
    h64 = hidden.double().requires_grad_()
    reference.linear_logprobs(h64, weight.double(), labels.clamp(max=39)).sum().backward()
    assert_close(h.grad[ok], h64.grad[ok], atol=1e-5, rtol=1e-4, name="d hidden, other rows")


@pytest.mark.parametrize("sweep", ["vocabulary", "rows"])
def test_backward_sweeps_largest_fp32_temporaries(monkeypatch, sweep):
    """What the vocabulary sweep saves: in bf16 with d weight wanted, the row sweep holds an fp32
    (V, H) accumulator for d weight; the vocabulary sweep none, only an fp32 (N, H) one for
    d hidden (N < V)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if sweep == "vocabulary" and logprobs_module.native_cpu_kernels(torch.zeros(1)):
        pytest.skip("the native CPU logprobs backward takes whole rows "
                    "(tests/kernels/test_native.py)")

    class Fp32Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 2:
                    self.shapes.add(tuple(t.shape))
            return out

    monkeypatch.setattr(linear_module, "vocabulary_sweep", lambda *args: sweep == "vocabulary")
    n_rows, H, V = 12, 8, 40
    hidden, weight, _, _, _, labels = _make((n_rows,), H, V, torch.bfloat16, False, 0)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = linear_logprobs(h, w, labels, chunk_size=4, backend="triton")
    with Fp32Shapes() as mode:
        torch.autograd.grad(logp.sum(), (h, w))
    assert ((V, H) in mode.shapes) == (sweep == "rows"), mode.shapes
    assert ((n_rows, H) in mode.shapes) == (sweep == "vocabulary"), mode.shapes


def test_vocabulary_sweep_weight_gradient_is_one_gemm_per_slice():
    """Over four row chunks' worth of rows, each slice of d weight is one matmul over all rows
    (rounded once): within the 2x rule of the unfused d logits.T @ hidden, in bf16."""
    n_rows, H, V, dtype = 128, 16, 64, torch.bfloat16
    hidden, weight, _, _, _, labels = _make((n_rows,), H, V, dtype, False, 0, 0.0)
    upstream = torch.randn(n_rows, device=DEVICE, dtype=torch.float64)
    w = weight.clone().requires_grad_()
    logp = linear_logprobs(hidden, w, labels, chunk_size=32, backend="triton")
    (logp.double() * upstream).sum().backward()
    w64 = weight.double().requires_grad_()
    (reference.linear_logprobs(hidden.double(), w64, labels) * upstream).sum().backward()
    w16 = weight.clone().requires_grad_()
    logits = hidden @ w16.t()
    (reference.logprobs(logits, labels).double() * upstream).sum().backward()
    assert w.grad.dtype == dtype
    assert_close_2x(w.grad, w16.grad, w64.grad, dtype, name="d weight")


# --------------------------------------------------------------------------------------------
# stats: per-token statistics of the logits (log_sum_sq_probs, mean_logits, is_top1)
# --------------------------------------------------------------------------------------------
ALL_STATS = ("log_sum_sq_probs", "mean_logits", "is_top1")


def _head_logits(hidden, weight, b, a, lb, lora_scale):
    """The logits ``linear_logprobs`` scores, in the inputs' own dtype (the same-dtype path of
    the 2x rule); the float64 ones from float64 inputs."""
    logits = hidden @ weight.t()
    if a is not None:
        logits = logits + lora_scale * ((hidden @ a.t()) @ lb.t())
    if b is not None:
        logits = logits + b
    return logits


# (lead shape, H, V, bias, lora rank, temperature, chunk_size)
STAT_CASES = [
    ((3, 7), 12, 1031, True, 0, 0.7, 5),  # V no block multiple, several chunks (one partial)
    ((2, 9), 16, 97, False, 3, 1.0, None),  # LoRA, one chunk
    ((17,), 8, 64, True, 2, 1.9, 4),
]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("lead,H,V,bias,rank,temperature,chunk", STAT_CASES)
def test_stats_match_reference(backend, dtype, lead, H, V, bias, rank, temperature, chunk):
    """Each statistic against the float64 reference (2x rule against the same statistic of the
    logits made in the input dtype); is_top1 exactly, where the float64 logits' top two are
    further apart than the input dtype's rounding of them; ignored rows 0 / False."""
    hidden, weight, b, a, lb, labels = _make(lead, H, V, dtype, bias, rank)
    labels.view(-1)[::5] = -100
    inputs64 = [None if t is None else t.double() for t in (hidden, weight, b, a, lb)]
    logits64 = _head_logits(*inputs64, 0.5)
    # every other counted row takes its top-1 token: is_top1 is True there (at least one row
    # always: a coin per row left all 8 counted rows of a (2, 9) case untaken, 1 in 256)
    labels.view(-1)[0] = 0  # (at least one counted row)
    top = logits64.argmax(-1)
    counted = labels != -100
    take = counted & (counted.view(-1).cumsum(0).view(lead) % 2 == 1)
    labels = torch.where(take, top, labels)
    out = linear_logprobs(hidden, weight, labels, b, a, lb, 0.5, temperature, return_entropy=True,
                          chunk_size=chunk, stats=ALL_STATS, backend=backend)
    ref = reference.linear_logprobs_stats(*inputs64[:2], labels, *inputs64[2:], 0.5, temperature,
                                          return_entropy=True)
    same_dtype = reference.logprob_stats(_head_logits(hidden, weight, b, a, lb, 0.5), labels,
                                         temperature)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scale = max(1.0, logits64.abs().max().item() / temperature)
    for name, o, o64, oe in zip(ALL_STATS[:2], out[2:4], ref[2:4], same_dtype[:2]):
        assert o.dtype == out_dtype and o.shape == lead, name
        assert_close_2x(o, oe, o64, dtype, atol_scale=scale, name=name)
    assert out.is_top1.dtype == torch.bool and out.is_top1.shape == lead
    top2 = logits64.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 8 * torch.finfo(dtype).eps * scale * temperature
    assert torch.equal(out.is_top1[clear], ref[4][clear])
    assert out.is_top1.any() and not out.is_top1.all()
    ignored = labels == -100
    assert ignored.any()
    for name, stat in zip(ALL_STATS, out[2:]):
        assert not stat[ignored].any(), name
    # logp and entropy: those of the call without stats, bit for bit
    logp, entropy = linear_logprobs(hidden, weight, labels, b, a, lb, 0.5, temperature,
                                    return_entropy=True, chunk_size=chunk, backend=backend)
    assert torch.equal(out.logp, logp) and torch.equal(out.entropy, entropy)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_is_top1_ties_take_the_first_maximum(backend, dtype):
    """Integer hidden states and weights: exact integer logits in any dtype, with ties at the
    maximum (duplicated weight rows). The target is top-1 only at the first maximum (TRL's and
    torch.argmax's rule), not at a later tied one."""
    V, H, rows = 37, 4, 29
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    hidden = torch.randint(-2, 3, (rows, H), device=DEVICE, generator=gen).to(dtype)
    weight = torch.randint(-2, 3, (V, H), device=DEVICE, generator=gen)
    weight[20:] = weight[:17]  # every max among the first 17 rows is tied with a later one
    weight = weight.to(dtype)
    logits = hidden.double() @ weight.double().t()
    is_max = logits == logits.amax(-1, keepdim=True)
    index = torch.arange(V, device=DEVICE)
    first = torch.where(is_max, index, V).amin(-1)
    last = torch.where(is_max, index, -1).amax(-1)
    tied = first != last
    labels = torch.where(torch.arange(rows, device=DEVICE) % 2 == 0, first, last)
    labels[::7] = -100
    expected = (labels == first) & (labels != -100)
    assert tied.sum() >= 10 and (tied & ~expected & (labels != -100)).any()
    assert (tied & expected).any()
    assert torch.equal(reference.logprob_stats(logits, labels, 0.6)[2], expected)
    for chunk in (3, None):
        out = linear_logprobs(hidden, weight, labels, temperature=0.6, chunk_size=chunk,
                              stats="is_top1", backend=backend)
        assert torch.equal(out.is_top1, expected), chunk
        assert out.log_sum_sq_probs is None and out.mean_logits is None and out.entropy is None


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_stats_leave_logp_entropy_and_gradients_unchanged(backend, monkeypatch):
    """Asking for the statistics changes nothing else: logp, entropy and every gradient are the
    bits of the call without them, on the eager path and on the custom-op path (torch.compile's);
    the statistics carry no gradient."""
    import importlib

    head = importlib.import_module("rlhf_kernels.ops.linear_logprobs")
    hidden, weight, b, a, lb, labels = _make((3, 5), 9, 43, torch.float32, True, 2)
    upstream = [torch.randn(3, 5, device=DEVICE) for _ in range(2)]

    def run(stats):
        params = [t.clone().requires_grad_() for t in (hidden, weight, b, a, lb)]
        out = linear_logprobs(*params[:2], labels, *params[2:], 0.5, 0.8, return_entropy=True,
                              chunk_size=4, backend=backend, stats=stats)
        logp, entropy = out[:2]
        grads = torch.autograd.grad((logp * upstream[0]).sum() + (entropy * upstream[1]).sum(),
                                    params)
        return out, grads

    plain, plain_grads = run(None)
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(head, "launch_directly", lambda *tensors: False)
        out, grads = run(ALL_STATS)
        assert isinstance(out, head.LinearLogprobsOutput)
        assert torch.equal(out.logp, plain[0]) and torch.equal(out.entropy, plain[1])
        for g, g0, name in zip(grads, plain_grads, NAMES):
            assert torch.equal(g, g0), f"d {name} (eager path: {direct})"
        for name, stat in zip(ALL_STATS, out[2:]):
            assert not stat.requires_grad, name


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_stats_api(backend):
    """stats=None: the usual return; stats given (even empty): the named tuple, None in the
    fields not asked for; one name may be a plain string; bad names are refused."""
    hidden, weight, _, _, _, labels = _make((2, 3), 6, 19, torch.float32, False, 0)
    plain = linear_logprobs(hidden, weight, labels, backend=backend)
    assert isinstance(plain, torch.Tensor)
    out = linear_logprobs(hidden, weight, labels, backend=backend, stats=())
    assert out._fields == ("logp", "entropy", *ALL_STATS)
    assert torch.equal(out.logp, plain) and out[1:] == (None, None, None, None)
    out = linear_logprobs(hidden, weight, labels, return_entropy=True, backend=backend,
                          stats="mean_logits")
    assert out.entropy is not None and out.mean_logits is not None
    assert out.log_sum_sq_probs is None and out.is_top1 is None
    with torch.no_grad():
        again = linear_logprobs(hidden, weight, labels, return_entropy=True, backend=backend,
                                stats=["mean_logits", "mean_logits"])
    assert torch.equal(again.mean_logits, out.mean_logits)
    with pytest.raises(ValueError, match=r"'top1' is not a statistic .*expected names among"):
        linear_logprobs(hidden, weight, labels, backend=backend, stats=("top1",))
    with pytest.raises(ValueError, match=r"return_entropy=True"):
        linear_logprobs(hidden, weight, labels, backend=backend, stats=("entropy",))
    with pytest.raises(ValueError, match=r"stats must be a tuple of names"):
        linear_logprobs(hidden, weight, labels, backend=backend, stats=3)


def test_stats_through_torch_compile_and_opcheck(monkeypatch):
    """The forward op with statistics under torch.compile(fullgraph) (aot_eager) gives the eager
    values and gradients, and opcheck passes on the calls the public function makes with the
    custom-op path forced (the statistics' fake outputs match the real ones)."""
    from tests.kernels.test_opcheck import TEST_UTILS, _RecordCalls

    hidden, weight, b, a, lb, labels = _make((2, 5), 9, 37, torch.float32, True, 2)
    params = [t.requires_grad_() for t in (hidden, weight, b, a, lb)]

    def fn(h, w, bb, aa, bl):
        out = linear_logprobs(h, w, labels, bb, aa, bl, 0.5, 0.9, return_entropy=True,
                              chunk_size=3, stats=ALL_STATS)
        return (out.logp * 2).sum() + out.entropy.sum(), out[2:]

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss_c, stats_c = compiled(*params)
    loss_e, stats_e = fn(*params)
    for sc, se, name in zip(stats_c, stats_e, ALL_STATS):
        assert torch.equal(sc, se), name
    for gc, ge, name in zip(torch.autograd.grad(loss_c, params),
                            torch.autograd.grad(loss_e, params), NAMES):
        assert_close(gc, ge, atol=1e-6, name=name)

    import importlib

    head = importlib.import_module("rlhf_kernels.ops.linear_logprobs")
    monkeypatch.setattr(head, "launch_directly", lambda *tensors: False)
    for stats in (ALL_STATS, ("is_top1",)):
        with _RecordCalls() as recorder:
            loss, _ = fn(*params) if stats == ALL_STATS else (linear_logprobs(
                hidden, weight, labels, stats=stats).logp.sum(), None)
        assert any(func.name() == "rlhf_kernels::linear_logprobs_fwd"
                   for func, _, _ in recorder.calls)
        for func, args, kwargs in recorder.calls:
            torch.library.opcheck(func, args, kwargs, test_utils=TEST_UTILS)


def test_stats_stay_within_one_chunk_of_memory():
    """With every statistic asked for, forward and backward still hold no tensor larger than
    one fp32 chunk of logits (tests/kernels/test_memory_flat.py's bound and tracker)."""
    from tests.kernels import test_memory_flat as flat

    hidden, weight, bias, lora_a, lora_b, labels = flat._inputs()
    with flat.LargestTensor() as mode:
        out = linear_logprobs(hidden, weight, labels, bias, lora_a, lora_b, 0.5,
                              return_entropy=True, chunk_size=flat.CHUNK, stats=ALL_STATS,
                              backend="triton")
        (out.logp.sum() + out.entropy.sum()).backward()
    assert out.is_top1.shape == labels.shape
    assert mode.largest <= flat.BOUND_BYTES, (mode.largest, flat.BOUND_BYTES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("overwrite", [False, True])
def test_logits_stats_every_path(dtype, temperature, overwrite):
    """``logits_stats`` (the per-chunk code, also what TRL's drop-in runs on a head module's
    logits) on each of its log_sum_sq_probs paths: in place (fp32 / fp64 chunk it may
    overwrite), torch.softmax (temperature 1 on a copy), the shifted copy (otherwise); blocks of
    rows (16-bit logits); -inf entries. Against ``reference.logprob_stats`` in float64."""
    from rlhf_kernels.ops.linear_logprobs import logits_stats, stats_bits, stats_outputs

    rows, V = 13, 300
    logits = (torch.randn(rows, V, device=DEVICE) * 4).to(dtype)
    logits[2, ::3] = float("-inf")
    labels = torch.randint(0, V, (rows,), device=DEVICE)
    labels[::4] = -100
    labels[1] = logits[1].float().argmax()
    ref = reference.logprob_stats(logits.double(), labels, temperature)
    same_dtype = reference.logprob_stats(logits, labels, temperature)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    outs = stats_outputs(labels, acc, stats_bits(ALL_STATS))
    kept = logits.clone()
    logits_stats(kept, labels, temperature, -100, outs, overwrite=overwrite)
    if not overwrite:
        assert torch.equal(kept, logits)
    assert_close_2x(outs[0], same_dtype[0], ref[0], dtype, name="log_sum_sq_probs")
    assert torch.isfinite(outs[0]).all()
    finite = torch.arange(rows, device=DEVICE) != 2  # row 2's mean is -inf
    assert outs[1][2] == ref[1][2] == float("-inf")
    assert_close_2x(outs[1][finite], same_dtype[1][finite], ref[1][finite], dtype,
                    atol_scale=40.0 / temperature, name="mean_logits")
    assert torch.equal(outs[2], ref[2]) and outs[2][1]


def test_native_backward_refuses_a_slice_of_columns(monkeypatch):
    """The native CPU backward takes whole rows: a slice (col_offset / label_vocab, what the
    vocabulary sweep passes the Triton kernel) is one clear error, not a wrong gradient."""
    monkeypatch.setattr(logprobs_module, "native_cpu_kernels", lambda t: True)
    logits = torch.randn(3, 5)
    labels = torch.tensor([0, 6, 9])
    lse = torch.logsumexp(logits, -1)
    with pytest.raises(ValueError, match="col_offset=4, label_vocab=12: the native CPU"):
        logprobs_module.logprobs_bwd(logits, labels, lse, None, torch.ones(3), None, 1.0, -100,
                                     torch.empty_like(logits), col_offset=4, label_vocab=12)
