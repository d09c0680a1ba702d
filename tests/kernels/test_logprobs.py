"""logprobs: the Triton kernels against the float64 reference (values, entropy, d logits).

Every case forces ``backend="triton"`` (the interpreter on a CPU-only machine) and checks the 2x
rule: kernel error <= 2 x (same-dtype eager PyTorch error) + atol[dtype], both against float64.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from rlhf_kernels import reference
from rlhf_kernels.ops.logprobs import _rows3d, logprobs, logprobs_bwd, logprobs_fwd
from tests.numerics import DEVICE, assert_close, assert_close_2x

# The module itself (rlhf_kernels.ops may one day re-export the function under the same name).
logprobs_module = importlib.import_module("rlhf_kernels.ops.logprobs")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IGNORE = -100


def _eager_same_dtype(logits, labels, temperature, ignore_index):
    """What a user would write in eager PyTorch, computed in the logits' own dtype."""
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = log_p.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * valid
    entropy = -(log_p.exp() * log_p).sum(-1) * valid
    return logp, entropy


def _make_labels(shape, V, n_ignored=1):
    labels = torch.randint(0, V, shape, device=DEVICE)
    flat = labels.view(-1)
    if n_ignored and flat.numel() > 1:
        flat[torch.randperm(flat.numel(), device=DEVICE)[:n_ignored]] = IGNORE
    return labels


def _check_against_reference(logits, labels, temperature=1.0, ignore_index=IGNORE, entropy=True,
                             name=""):
    """Values and d logits (random upstream grads on logp and entropy) vs the float64 reference."""
    dtype = logits.dtype
    g_logp = torch.randn(labels.shape, device=DEVICE)
    g_ent = torch.randn(labels.shape, device=DEVICE)

    def loss(lp, ent):
        total = (lp.double() * g_logp.double()).sum()
        return total + (ent.double() * g_ent.double()).sum() if entropy else total

    x = logits.detach().clone().requires_grad_(True)
    out = logprobs(x, labels, temperature, ignore_index, return_entropy=entropy,
                   backend="triton")
    lp, ent = out if entropy else (out, None)
    (grad,) = torch.autograd.grad(loss(lp, ent), x)
    assert lp.dtype == torch.float32 and lp.shape == labels.shape
    assert grad.dtype == dtype and grad.shape == logits.shape

    x64 = logits.detach().double().requires_grad_(True)
    lp64, ent64 = reference.logprobs(x64, labels, temperature, ignore_index, return_entropy=True)
    (grad64,) = torch.autograd.grad(loss(lp64, ent64 if entropy else None), x64)

    xe = logits.detach().clone().requires_grad_(True)
    lpe, ente = _eager_same_dtype(xe, labels, temperature, ignore_index)
    (grade,) = torch.autograd.grad(loss(lpe, ente if entropy else None), xe)

    assert_close_2x(lp, lpe, lp64, dtype, name=f"{name} logp")
    if entropy:
        assert ent.dtype == torch.float32 and ent.shape == labels.shape
        assert_close_2x(ent, ente, ent64, dtype, name=f"{name} entropy")
    assert_close_2x(grad, grade, grad64, dtype, name=f"{name} d logits")
    ignored = labels == ignore_index
    assert torch.all(lp[ignored] == 0) and torch.all(grad[ignored] == 0)
    return lp, grad


# ------------------------------------------------------------------------------------------
# values and gradients over dtypes, awkward vocabulary sizes, temperature and entropy
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V, shape", [(1, (2, 3)), (3, (2, 3)), (1271, (2, 3)), (50257, (1, 3))])
@pytest.mark.parametrize("temperature, entropy", [(1.0, False), (1.0, True), (0.7, True)])
def test_values_and_grads(dtype, V, shape, temperature, entropy):
    logits = (3 * torch.randn(*shape, V, device=DEVICE)).to(dtype)
    labels = _make_labels(shape, V)
    _check_against_reference(logits, labels, temperature, entropy=entropy,
                             name=f"V={V} T={temperature}")


def test_single_token_vocabulary_is_certain():
    # Closed form: with V = 1 the only token has probability 1: logp 0, entropy 0, no gradient.
    logits = torch.randn(4, 1, device=DEVICE).requires_grad_(True)
    lp, ent = logprobs(logits, torch.zeros(4, dtype=torch.int64, device=DEVICE),
                       return_entropy=True, backend="triton")
    (grad,) = torch.autograd.grad(lp.sum() + ent.sum(), logits)
    assert torch.all(lp == 0) and torch.all(ent == 0) and torch.all(grad == 0)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_lanes_past_the_vocabulary_compute_zero_in_fp16():
    """V = 1 in fp16 with a very negative logit (lse = -28.6 at T = 0.7): the lanes of the
    block past V must not compute exp(-lse) ~ 3e12 (an fp16 overflow, harmless on the GPU since
    never stored, but a cast warning in the interpreter). Closed form: logp 0, zero gradient,
    up to one rounding of the scaled logit: compiled for a GPU, x / T - max(x / T) may be
    contracted into one fused multiply-add (measured on an H200: logp 9.5e-7, half an fp32 ulp
    of 28.6)."""
    logits = torch.full((2, 1), -20.0, device=DEVICE, dtype=torch.float16, requires_grad=True)
    labels = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    lp, ent = logprobs(logits, labels, 0.7, return_entropy=True, backend="triton")
    (grad,) = torch.autograd.grad((lp * torch.tensor([1.5, -2.0], device=DEVICE)).sum()
                                  + ent.sum(), logits)
    one_rounding = torch.finfo(torch.float32).eps * 20.0 / 0.7
    assert lp.abs().max() <= one_rounding and ent.abs().max() <= one_rounding
    assert torch.all(grad.abs() <= 4 * one_rounding)  # (1 - p) / T times weights <= 2


def test_uniform_logits_closed_form():
    # All-equal logits: logp = -log V and entropy = log V exactly (up to fp32 rounding).
    V = 1271
    logits = torch.full((2, V), 0.25, device=DEVICE)
    labels = torch.tensor([0, V - 1], device=DEVICE)
    lp, ent = logprobs(logits, labels, return_entropy=True, backend="triton")
    assert_close(lp, torch.full((2,), -math.log(V)), atol=1e-5, name="logp")
    assert_close(ent, torch.full((2,), math.log(V)), atol=1e-5, name="entropy")


# ------------------------------------------------------------------------------------------
# leading shapes and strides
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("leading", [(), (5,), (2, 1), (1, 4), (2, 2, 3)], ids=str)
def test_leading_shapes(leading):
    V = 37
    logits = torch.randn(*leading, V, device=DEVICE)
    labels = _make_labels(leading, V, n_ignored=1 if len(leading) else 0)
    _check_against_reference(logits, labels, 1.3, name=f"leading={leading}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_shifted_slice_is_read_in_place(dtype):
    # The causal-LM shift logits[:, :-1, :]: batch stride (T+1) V, row stride V, no copy.
    B, T, V = 2, 4, 1271
    full = torch.randn(B, T + 1, V, device=DEVICE).to(dtype)
    sliced = full[:, :-1, :]
    assert not sliced.is_contiguous()
    assert _rows3d(sliced).data_ptr() == sliced.data_ptr()
    labels = _make_labels((B, T), V)
    _check_against_reference(sliced, labels, name="slice")


def test_transposed_leading_dims_and_strided_vocab():
    V = 129
    time_major = torch.randn(3, 2, V, device=DEVICE)  # (T, B, V) stored, read as (B, T, V)
    batch_major = time_major.transpose(0, 1)
    assert _rows3d(batch_major).data_ptr() == batch_major.data_ptr()
    labels = _make_labels((2, 3), V)
    _check_against_reference(batch_major, labels, name="transposed")
    vocab_strided = torch.randn(2, V, 3, device=DEVICE).transpose(1, 2)  # stride(-1) == 3
    _check_against_reference(vocab_strided, _make_labels((2, 3), V), name="stride(-1)=3")


# ------------------------------------------------------------------------------------------
# ignore_index, in-place backward, label checks, non-finite logits
# ------------------------------------------------------------------------------------------
def test_custom_ignore_index_and_all_ignored():
    V = 50
    logits = torch.randn(3, 4, V, device=DEVICE)
    labels = _make_labels((3, 4), V, n_ignored=0)
    labels[1] = -1
    _check_against_reference(logits, labels, ignore_index=-1, name="ignore_index=-1")
    all_ignored = torch.full((3, 4), IGNORE, device=DEVICE)
    x = logits.clone().requires_grad_(True)
    lp, ent = logprobs(x, all_ignored, return_entropy=True, backend="triton")
    (grad,) = torch.autograd.grad(lp.sum() + ent.sum(), x)
    assert torch.all(lp == 0) and torch.all(ent == 0) and torch.all(grad == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sliced", [False, True])
def test_inplace_backward_gives_the_same_gradient(dtype, sliced):
    B, T, V = 2, 3, 1271
    weight = torch.randn(B, T + 1, V, device=DEVICE).to(dtype).requires_grad_(True)
    labels = _make_labels((B, T), V)
    g_logp, g_ent = torch.randn(B, T, device=DEVICE), torch.randn(B, T, device=DEVICE)
    grads, buffers = [], []
    for inplace in (False, True):
        logits = weight * 1.0  # an intermediate activation, as the lm_head output would be
        rows = logits[:, :-1, :] if sliced else logits[:, 1:, :].contiguous()
        lp, ent = logprobs(rows, labels, 0.8, return_entropy=True, inplace_backward=inplace,
                           backend="triton")
        (grad,) = torch.autograd.grad((lp * g_logp).sum() + (ent * g_ent).sum(), weight)
        grads.append(grad)
        buffers.append(rows.detach())
    assert torch.equal(grads[0], grads[1])
    # In place, the logits buffer now holds its own gradient (documented: do not reuse it);
    # out of place it is left alone.
    rows_grad = grads[0][:, :-1, :] if sliced else grads[0][:, 1:, :]
    assert torch.equal(buffers[1], rows_grad)
    assert not torch.equal(buffers[0], rows_grad)


def test_inplace_backward_falls_back_for_overlapping_rows():
    V = 33
    row = torch.randn(1, 1, V, device=DEVICE, requires_grad=True)
    logits = (row * 1.0).expand(2, 3, V)  # all rows share one buffer: cannot take the grad
    labels = _make_labels((2, 3), V)
    lp = logprobs(logits, labels, inplace_backward=True, backend="triton")
    (grad,) = torch.autograd.grad(lp.sum(), row)
    lp64 = reference.logprobs(row.detach().double().expand(2, 3, V), labels)
    x64 = row.detach().double().requires_grad_(True)
    (grad64,) = torch.autograd.grad(reference.logprobs(x64.expand(2, 3, V), labels).sum(), x64)
    assert_close(lp, lp64, atol=1e-5, name="logp")
    assert_close(grad, grad64, atol=1e-5, name="grad")


def test_inplace_backward_detects_another_saved_user():
    # Another op saved the same logits for its backward: autograd must refuse, not go wrong.
    w = torch.randn(2, 3, 17, device=DEVICE, requires_grad=True)
    logits = w * 1.0
    other = (logits * logits).sum()  # saves logits
    lp = logprobs(logits, _make_labels((2, 3), 17, 0), inplace_backward=True, backend="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp.sum() + other).backward()


def test_inplace_backward_refuses_a_leaf():
    leaf = torch.randn(2, 3, 17, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="inplace_backward=True needs logits that are an "):
        logprobs(leaf, _make_labels((2, 3), 17), inplace_backward=True, backend="triton")


def test_inplace_backward_refuses_a_view_of_a_leaf():
    """leaf[:, :-1] or leaf.view(-1, V) is not a leaf itself, but the in-place backward would
    write the gradient into the leaf's memory (it once did: the leaf's data silently became its
    gradient)."""
    leaf = torch.randn(2, 4, 17, device=DEVICE, requires_grad=True)
    for view, labels in ((leaf[:, :-1], _make_labels((2, 3), 17)),
                         (leaf.view(-1, 17), _make_labels((8,), 17))):
        with pytest.raises(ValueError, match="or a view of one"):
            logprobs(view, labels, inplace_backward=True, backend="triton")


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("bad", [1271, 5000, -1, -101])
def test_out_of_range_labels(bad, backend):
    V = 1271
    logits = torch.randn(2, 3, V, device=DEVICE)
    labels = _make_labels((2, 3), V)
    labels[1, 2] = bad
    # Opt-in check (one host sync): a clear error naming the label.
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\).*found label {bad}"):
        logprobs(logits, labels, check_labels=True, backend=backend)
    # Default (no sync): the bad row gives NaN, never an out-of-bounds read nor a finite wrong
    # number; the other rows are exact.
    x = logits.clone().requires_grad_(True)
    lp, ent = logprobs(x, labels, return_entropy=True, backend=backend)
    assert torch.isnan(lp[1, 2])
    good = torch.ones_like(labels, dtype=torch.bool)
    good[1, 2] = False
    if backend == "triton":  # the bad row's gradient is NaN too, the others are untouched
        (grad,) = torch.autograd.grad(lp.sum(), x)
        assert torch.isnan(grad[1, 2]).all() and torch.isfinite(grad[good]).all()
    fixed = labels.masked_fill(~good, 0)
    ref_lp, ref_ent = reference.logprobs(logits.double(), fixed, return_entropy=True)
    assert_close(lp[good], ref_lp[good], atol=1e-5, name="other rows")
    assert_close(ent, ref_ent, atol=1e-5, name="entropy (does not depend on the label)")


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("entropy", [False, True])
def test_outputs_can_be_edited_in_place(entropy, backend):
    """As TRL's own tests do: the returned tensors are ordinary (not views of an op's internal
    buffer), and editing them after the loss is built leaves the backward unchanged (the op does
    not save the tensors it returns)."""
    V = 29
    logits = torch.randn(2, 3, V, device=DEVICE)
    labels = _make_labels((2, 3), V)
    g_logp, g_ent = torch.randn(2, 3, device=DEVICE), torch.randn(2, 3, device=DEVICE)
    x = logits.clone().requires_grad_(True)
    out = logprobs(x, labels, 0.8, return_entropy=entropy, backend=backend)
    lp, ent = out if entropy else (out, None)
    loss = (lp * g_logp).sum() + ((ent * g_ent).sum() if entropy else 0.0)
    lp[0, 1] = 0.0
    lp.mul_(3.0)
    assert lp[0, 1] == 0.0
    if entropy:
        ent[1, 2] = 7.0
        ent.add_(1.0)
        assert ent[1, 2] == 8.0
    (grad,) = torch.autograd.grad(loss, x)
    x64 = logits.double().requires_grad_(True)
    lp64, ent64 = reference.logprobs(x64, labels, 0.8, return_entropy=True)
    loss64 = (lp64 * g_logp).sum() + ((ent64 * g_ent).sum() if entropy else 0.0)
    (grad64,) = torch.autograd.grad(loss64, x64)
    assert_close(grad, grad64, atol=1e-5, name="d logits after editing the outputs")


@pytest.fixture(params=["default-blocks", "small-blocks"])
def block_config(request, monkeypatch):
    """Run a test with the real launch config and with 128-entry blocks, so that a 1271-entry
    row spans many blocks (running-max rescaling, a partial last block, all -inf blocks)."""
    if request.param == "small-blocks":
        monkeypatch.setattr(logprobs_module, "_launch_config", lambda V, entropy=False: (128, 4, 1))
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_multi_block_rows(dtype, temperature, block_config):
    logits = (3 * torch.randn(2, 3, 1271, device=DEVICE)).to(dtype)
    logits[0, 0, 1200:] += 6  # the running max moves late in the row
    _check_against_reference(logits, _make_labels((2, 3), 1271), temperature,
                             name=block_config)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_minus_inf_entries_are_masked_vocabulary(dtype, block_config):
    # -inf entries behave as absent tokens: same values as a huge negative finite logit (whose
    # probability underflows to exactly 0 in float64) and exactly zero gradient there.
    N, V = 4, 1271
    logits = (2 * torch.randn(N, V, device=DEVICE)).to(dtype)
    labels = torch.randint(0, V, (N,), device=DEVICE)
    masked = torch.rand(N, V, device=DEVICE) < 0.3
    masked[torch.arange(N), labels] = False
    masked[1, :1024] = True  # a whole first block masked: the running max starts at -inf
    masked[1, labels[1]] = False
    with_inf = logits.masked_fill(masked, float("-inf"))
    finite64 = logits.double().masked_fill(masked, -1e4)
    x = with_inf.clone().requires_grad_(True)
    lp, ent = logprobs(x, labels, 0.9, return_entropy=True, backend="triton")
    g_logp, g_ent = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    (grad,) = torch.autograd.grad((lp * g_logp).sum() + (ent * g_ent).sum(), x)
    x64 = finite64.clone().requires_grad_(True)
    lp64, ent64 = reference.logprobs(x64, labels, 0.9, return_entropy=True)
    (grad64,) = torch.autograd.grad((lp64 * g_logp).sum() + (ent64 * g_ent).sum(), x64)
    # The float64 reference sees exactly the (low-precision) values the kernel reads and the
    # kernel computes in fp32, so logp and entropy are fp32-accurate whatever the input dtype
    # (a dtype-scaled atol would let a bf16-precision softmax through).
    assert_close(lp, lp64, atol=1e-5, name="logp")
    assert_close(ent, ent64, atol=1e-5, name="entropy")
    # d logits is stored in the logits' dtype: allow its rounding (eps relative) on top of atol.
    assert_close(grad, grad64, atol=1e-5, rtol=torch.finfo(dtype).eps, name="d logits")
    assert torch.all(grad[masked] == 0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees log(0)
def test_non_finite_rows():
    V = 40
    logits = torch.randn(4, V, device=DEVICE)
    logits[1, 7] = float("nan")
    logits[2] = float("-inf")
    labels = torch.tensor([3, 3, 3, IGNORE], device=DEVICE)
    lp, ent = logprobs(logits, labels, return_entropy=True, backend="triton")
    ref_lp, ref_ent = reference.logprobs(logits.double(), labels, return_entropy=True)
    assert torch.isnan(lp[1]) and torch.isnan(ent[1])  # NaN row -> NaN for that row only
    assert torch.isnan(lp[2]) and ent[2] == 0  # all -inf: logp NaN, entropy 0 (0 log 0 = 0)
    # the reference (the spec) says the same for the all -inf row
    assert torch.isnan(ref_lp[2]) and ref_ent[2] == 0
    assert_close(lp[[0, 3]], ref_lp[[0, 3]], atol=1e-5, name="finite rows")
    assert_close(ent[[0, 3]], ref_ent[[0, 3]], atol=1e-5, name="finite rows")


# ------------------------------------------------------------------------------------------
# dtypes of the inputs, validation, backends
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_int32_labels_and_fp64_logits(backend):
    V = 300
    logits = torch.randn(2, 5, V, device=DEVICE, dtype=torch.float64, requires_grad=True)
    labels = _make_labels((2, 5), V)
    lp, ent = logprobs(logits, labels.to(torch.int32), return_entropy=True, backend=backend)
    # fp64 in, fp64 out on both backends (the Triton path computes in fp32 and casts)
    assert lp.dtype == ent.dtype == torch.float64
    ref_lp, ref_ent = reference.logprobs(logits, labels, return_entropy=True)
    assert_close(lp, ref_lp, atol=1e-5, name="int32 labels")
    assert_close(ent, ref_ent, atol=1e-5, name="entropy")
    (grad,) = torch.autograd.grad(lp.sum() + ent.sum(), logits)
    (grad64,) = torch.autograd.grad(ref_lp.sum() + ref_ent.sum(), logits)
    assert grad.dtype == torch.float64
    assert_close(grad, grad64, atol=1e-5, name="d logits")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(labels_shape=(2, 4)), r"labels has shape \(2, 4\) but logits has shape"),
        (dict(labels_dtype=torch.float32), "labels must be int64 or int32"),
        (dict(logits_dtype=torch.int64), "logits must be a floating tensor"),
        (dict(temperature=0.0), "temperature must be a positive finite number, got 0.0"),
        (dict(temperature=float("inf")), "temperature must be a positive finite number"),
        (dict(backend="cuda"), "is not a backend"),
    ],
)
def test_bad_input(kwargs, message):
    logits = torch.randn(2, 3, 11, device=DEVICE).to(kwargs.get("logits_dtype", torch.float32))
    labels = torch.zeros(kwargs.get("labels_shape", (2, 3)), device=DEVICE)
    labels = labels.to(kwargs.get("labels_dtype", torch.int64))
    with pytest.raises(ValueError, match=message):
        logprobs(logits, labels, kwargs.get("temperature", 1.0),
                 backend=kwargs.get("backend", "triton"))


def test_reference_backend_matches():
    logits = torch.randn(2, 3, 64, device=DEVICE)
    labels = _make_labels((2, 3), 64)
    lp, ent = logprobs(logits, labels, 1.1, return_entropy=True, backend="reference")
    lp_t, ent_t = logprobs(logits, labels, 1.1, return_entropy=True, backend="triton")
    assert_close(lp_t, lp, atol=1e-5, name="logp")
    assert_close(ent_t, ent, atol=1e-5, name="entropy")


# ------------------------------------------------------------------------------------------
# torch.compile and the internal launchers used by the fused ops
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, inplace", [("triton", False), ("triton", True),
                                              ("reference", False)])
def test_torch_compile_fullgraph(backend, inplace):
    # fullgraph: no graph break, so no host sync either (the label check is opt-in)
    B, T, V = 2, 3, 97
    weight = torch.randn(B, T + 1, V, device=DEVICE)
    labels = _make_labels((B, T), V)

    def step(w, labels):
        logits = w * 1.0
        lp, ent = logprobs(logits[:, :-1], labels, 0.9, return_entropy=True,
                           inplace_backward=inplace, backend=backend)
        return (lp * 2).sum() - 0.1 * ent.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    w_eager = weight.clone().requires_grad_(True)
    w_comp = weight.clone().requires_grad_(True)
    loss_eager = step(w_eager, labels)
    loss_eager.backward()
    loss_comp = compiled(w_comp, labels)
    loss_comp.backward()
    assert_close(loss_comp, loss_eager, atol=1e-5, name="loss")
    assert_close(w_comp.grad, w_eager.grad, atol=1e-6, name="grad")
    w64 = weight.double().requires_grad_(True)
    lp64, ent64 = reference.logprobs(w64[:, :-1], labels, 0.9, return_entropy=True)
    ((lp64 * 2).sum() - 0.1 * ent64.sum()).backward()
    assert_close(w_comp.grad, w64.grad, atol=1e-5, name="grad vs reference")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("grads", ["both", "logp", "entropy"])
def test_launchers_on_a_strided_chunk(dtype, grads):
    # What linear_logprobs / the fused PPO loss do: a row chunk of a wider buffer, stride(0) != V.
    N, V = 5, 1271
    buffer = (2 * torch.randn(N, V + 50, device=DEVICE)).to(dtype)
    chunk = buffer[:, 3:V + 3]
    labels = _make_labels((N,), V)
    want_entropy = grads != "logp"
    logp, entropy, lse = logprobs_fwd(chunk, labels, 1.2, IGNORE, want_entropy)
    assert (entropy is not None) == want_entropy
    x64 = chunk.double().requires_grad_(True)
    lp64, ent64 = reference.logprobs(x64, labels, 1.2, IGNORE, return_entropy=True)
    valid = labels != IGNORE
    assert_close(logp, lp64, atol=1e-5 if dtype == torch.float32 else 1e-4, name="logp")
    assert_close(lse[valid], torch.logsumexp(x64.detach()[valid] / 1.2, -1), atol=1e-4,
                 name="lse")
    g_logp = torch.randn(N, device=DEVICE) if grads != "entropy" else None
    g_ent = torch.randn(N, device=DEVICE) if grads != "logp" else None
    total = (lp64 * (g_logp if g_logp is not None else 0)).sum()
    total = total + (ent64 * (g_ent if g_ent is not None else 0)).sum()
    (grad64,) = torch.autograd.grad(total, x64)
    atol = 1e-6 if dtype == torch.float32 else 1e-2
    out = torch.empty(N, V, device=DEVICE, dtype=torch.float32)  # fp32 grad of bf16 logits
    assert logprobs_bwd(chunk, labels, lse, entropy, g_logp, g_ent, 1.2, IGNORE, out) is out
    assert_close(out, grad64, atol=1e-5, name="out-of-place fp32")
    in_place = chunk.clone()
    logprobs_bwd(in_place, labels, lse, entropy, g_logp, g_ent, 1.2, IGNORE, in_place)
    assert_close(in_place, grad64, atol=atol, name="in place")
