"""kl_penalty and shape_rewards: the Triton kernels against the float64 reference.

kl_penalty: values and gradients of both inputs (random upstream gradient) over dtypes x
estimators x clamps x awkward shapes, strided inputs, closed-form values at known log-ratios.
shape_rewards: dtypes x estimators x T = 1, 257, 1025 with right/left padding, interior holes and
all-masked rows, with and without score_index / score_clip / kl_clamp; a hand-worked case; bad
input; torch.compile tracing of both ops.
"""

import math

import pytest
import torch

from rlhf_kernels import reference
from rlhf_kernels.ops.kl import kl_penalty
from rlhf_kernels.ops.rewards import shape_rewards
from tests.numerics import ATOL, DEVICE, assert_close, assert_close_2x, padded_mask

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ESTIMATORS = ("k1", "k2", "k3", "abs")


# --------------------------------------------------------------------------------------------
# kl_penalty
# --------------------------------------------------------------------------------------------
def check_kl(logp, ref_logp, estimator, clamp, log_ratio_clamp, name=""):
    """Values and both gradients vs float64 autograd through the reference (2x rule)."""
    dtype = logp.dtype
    a, b = logp.clone().requires_grad_(), ref_logp.clone().requires_grad_()
    kl = kl_penalty(a, b, estimator, clamp, log_ratio_clamp, backend="triton")
    upstream = torch.randn(kl.shape, device=DEVICE)
    kl.backward(upstream)

    a64, b64 = logp.double().requires_grad_(), ref_logp.double().requires_grad_()
    kl64 = reference.kl_penalty(a64, b64, estimator, clamp, log_ratio_clamp)
    kl64.backward(upstream.double())

    at, bt = logp.clone().requires_grad_(), ref_logp.clone().requires_grad_()
    kl_t = reference.kl_penalty(at, bt, estimator, clamp, log_ratio_clamp)
    kl_t.backward(upstream)

    assert kl.dtype == torch.float32 and kl.shape == logp.shape
    # mixed-dtype inputs: judge by the coarser one
    coarse = max(dtype, ref_logp.dtype, key=lambda t: ATOL[t])
    assert_close_2x(kl, kl_t, kl64, coarse, name=f"{name} kl")
    assert a.grad.dtype == dtype and b.grad.dtype == ref_logp.dtype
    # The gradients are rounded to the input dtype: one rounding is relative to their size, and
    # eager's different fp32 operation order can land on the other neighbour of a bf16 value.
    scale = max(1.0, a64.grad.abs().max().item()) if a64.grad.numel() else 1.0
    assert_close_2x(a.grad, at.grad, a64.grad, dtype, scale, name=f"{name} grad logp")
    assert_close_2x(b.grad, bt.grad, b64.grad, ref_logp.dtype, scale, name=f"{name} grad ref_logp")


def random_logps(shape, dtype, spread=1.0):
    logp = (-spread * torch.rand(shape, device=DEVICE) * 3).to(dtype)
    ref_logp = (logp.float() + spread * torch.randn(shape, device=DEVICE)).to(dtype)
    return logp, ref_logp


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("clamp,log_ratio_clamp", [(None, None), (0.5, None), (None, 0.7),
                                                   (10.0, 20.0), (0.3, 0.5)])
def test_kl_matches_reference(dtype, estimator, clamp, log_ratio_clamp):
    for shape in [(1,), (3, 1), (2, 257), (1025,)]:
        logp, ref_logp = random_logps(shape, dtype)
        check_kl(logp, ref_logp, estimator, clamp, log_ratio_clamp,
                 name=f"{shape} {estimator} clamp={clamp} lr_clamp={log_ratio_clamp}")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_strided_and_mixed_dtype_inputs(estimator):
    # Non-mergeable leading dims (a transpose), a sliced last dim, and bf16 against fp32.
    base = -3 * torch.rand(4, 3, 530, device=DEVICE)
    logp = base.transpose(0, 1)[:, :, ::2]  # (3, 4, 265), strides everywhere
    ref_logp = (base + torch.randn_like(base)).to(torch.bfloat16).transpose(0, 1)[:, :, 1::2]
    check_kl(logp, ref_logp, estimator, 2.0, 5.0, name="strided")


def test_kl_scalar_and_empty_inputs():
    check_kl(torch.tensor(-1.0, device=DEVICE), torch.tensor(-2.5, device=DEVICE), "k3", None,
             None, name="0-d")
    empty = torch.empty(2, 0, device=DEVICE)
    assert kl_penalty(empty, empty, "k2", backend="triton").shape == (2, 0)


def test_kl_gradient_from_sum():
    # .sum() hands the backward an expanded (stride 0) gradient.
    logp, ref_logp = random_logps((3, 100), torch.float32)
    a = logp.clone().requires_grad_()
    kl_penalty(a, ref_logp, "k2", backend="triton").sum().backward()
    assert_close(a.grad, logp - ref_logp, atol=1e-6, name="d(sum k2)/d logp = d")


def test_kl_closed_form_values_and_gradients():
    ln2 = math.log(2.0)
    # d = 0 for every estimator: value 0; gradient 1 for k1, 0 for the others.
    zeros = torch.zeros(5, device=DEVICE)
    for estimator, grad in [("k1", 1.0), ("k2", 0.0), ("k3", 0.0), ("abs", 0.0)]:
        a = (zeros - 1.5).requires_grad_()
        kl = kl_penalty(a, zeros - 1.5, estimator, backend="triton")
        kl.sum().backward()
        assert_close(kl, zeros, atol=0.0, name=f"{estimator} at d=0")
        assert_close(a.grad, zeros + grad, atol=0.0, name=f"{estimator} grad at d=0")

    # Known d: k1 = d, k2 = d^2/2, k3 = e^-d + d - 1, abs = |d|; d/dd of each.
    d = torch.tensor([ln2, -2.0, 3.0], device=DEVICE)
    dd = d.double()
    expected = {
        "k1": (dd, torch.ones_like(dd)),
        "k2": (0.5 * dd * dd, dd),
        "k3": (torch.exp(-dd) + dd - 1.0, 1.0 - torch.exp(-dd)),
        "abs": (dd.abs(), torch.sign(dd)),
    }
    assert math.isclose(expected["k3"][0][0].item(), 0.5 - 1.0 + ln2, rel_tol=1e-7)
    for estimator, (value, slope) in expected.items():
        a = d.clone().requires_grad_()
        b = torch.zeros_like(d).requires_grad_()
        kl = kl_penalty(a, b, estimator, backend="triton")
        kl.sum().backward()
        assert_close(kl, value, atol=1e-6, name=f"{estimator} value")
        assert_close(a.grad, slope, atol=1e-6, name=f"{estimator} grad logp")
        assert_close(b.grad, -slope, atol=1e-6, name=f"{estimator} grad ref_logp")

    # Clamps that bite: the value sticks at the bound and the gradient is 0.
    a = torch.tensor([5.0, 30.0, -30.0], device=DEVICE).requires_grad_()
    kl = kl_penalty(a, torch.zeros(3, device=DEVICE), "k1", clamp=1.0, backend="triton")
    kl.sum().backward()
    assert_close(kl, torch.tensor([1.0, 1.0, -1.0]), atol=0.0, name="k1 clamp value")
    assert_close(a.grad, torch.zeros(3), atol=0.0, name="k1 clamp grad")
    a = torch.tensor([-30.0, 0.5], device=DEVICE).requires_grad_()
    kl = kl_penalty(a, torch.zeros(2, device=DEVICE), "k3", log_ratio_clamp=20.0,
                    backend="triton")
    kl.sum().backward()
    k3_at_bound = math.exp(20.0) - 20.0 - 1.0
    assert_close(kl, torch.tensor([k3_at_bound, math.exp(-0.5) - 0.5]), atol=0.0,
                 rtol=1e-6, name="k3 log-ratio clamp value")
    assert_close(a.grad, torch.tensor([0.0, 1.0 - math.exp(-0.5)]), atol=1e-6,
                 name="k3 log-ratio clamp grad")


def test_kl_float64_goes_to_the_reference():
    logp, ref_logp = random_logps((3, 7), torch.float64)
    out = kl_penalty(logp, ref_logp, "k3", backend="triton")
    assert out.dtype == torch.float64
    assert torch.equal(out, reference.kl_penalty(logp, ref_logp, "k3"))


def test_kl_bad_input():
    x = torch.zeros(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"ref_logp has shape \(2, 4\) but logp has shape"):
        kl_penalty(x, torch.zeros(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="estimator='k4' is not supported"):
        kl_penalty(x, x, "k4")
    with pytest.raises(ValueError, match="clamp=-1.0 must be a non-negative bound"):
        kl_penalty(x, x, "k1", clamp=-1.0)
    with pytest.raises(ValueError, match="log_ratio_clamp=nan must be a non-negative"):
        kl_penalty(x, x, "k3", log_ratio_clamp=float("nan"))
    with pytest.raises(ValueError, match="logp must be a floating tensor"):
        kl_penalty(x.long(), x)
    with pytest.raises(ValueError, match="backend='cuda' is not a backend"):
        kl_penalty(x, x, backend="cuda")


# --------------------------------------------------------------------------------------------
# shape_rewards
# --------------------------------------------------------------------------------------------
def check_rewards(scores, logp, ref_logp, mask, kl_coef, estimator, score_index, score_clip,
                  kl_clamp, name=""):
    args = (kl_coef, estimator, score_index, score_clip, kl_clamp)
    out = shape_rewards(scores, logp, ref_logp, mask, *args, backend="triton")
    out64 = reference.shape_rewards(scores.double(), logp.double(), ref_logp.double(), mask, *args)
    out_t = reference.shape_rewards(scores, logp, ref_logp, mask, *args)
    assert out.dtype == torch.float32 and out.shape == logp.shape and not out.requires_grad
    assert_close_2x(out, out_t, out64, logp.dtype, name=name)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 257, 1025])
@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("with_index", [False, True], ids=["last-valid", "score_index"])
def test_rewards_match_reference(dtype, T, estimator, with_index):
    n_rows = 5
    logp, ref_logp = random_logps((n_rows, T), dtype)
    scores = (3 * torch.randn(n_rows, device=DEVICE)).to(dtype)
    mask = padded_mask(n_rows, T)
    index = torch.randint(0, T, (n_rows,), device=DEVICE) if with_index else None
    for score_clip, kl_clamp in [(None, None), (1.0, 0.5)]:
        check_rewards(scores, logp, ref_logp, mask, 0.05, estimator, index, score_clip, kl_clamp,
                      name=f"T={T} {estimator} index={with_index} clip={score_clip}")


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64, torch.uint8])
def test_rewards_mask_dtypes_and_leading_dims(mask_dtype):
    # (2, 3, T) with a transpose in the leading dims; masks as float / int / uint8 0-1 tensors.
    T = 130
    base_logp, base_ref = random_logps((3, 2, T), torch.float32)
    logp, ref_logp = base_logp.transpose(0, 1), base_ref.transpose(0, 1)
    mask = padded_mask(6, T).reshape(2, 3, T).to(mask_dtype)
    scores = torch.randn(2, 3, device=DEVICE)
    check_rewards(scores, logp, ref_logp, mask, 0.1, "k2", None, None, None, name="leading dims")


def test_rewards_hand_worked():
    # k1, kl_coef 0.5; d = [1, -2, 4, 0.5]; mask [1, 1, 0, 1] -> last valid is position 3.
    logp = torch.tensor([[-1.0, -4.0, -0.5, -2.0]], device=DEVICE)
    ref_logp = torch.tensor([[-2.0, -2.0, -4.5, -2.5]], device=DEVICE)
    mask = torch.tensor([[1, 1, 0, 1]], dtype=torch.bool, device=DEVICE)
    score = torch.tensor([3.0], device=DEVICE)
    out = shape_rewards(score, logp, ref_logp, mask, 0.5, backend="triton")
    assert_close(out, torch.tensor([[-0.5, 1.0, 0.0, -0.25 + 3.0]]), atol=1e-7, name="default")
    # score clipped to 2, placed at (masked) position 2 by score_index
    out = shape_rewards(score, logp, ref_logp, mask, 0.5,
                        score_index=torch.tensor([2], device=DEVICE), score_clip=2.0,
                        backend="triton")
    assert_close(out, torch.tensor([[-0.5, 1.0, 2.0, -0.25]]), atol=1e-7, name="score_index")
    # all masked: zero everywhere, the score has nowhere to go
    out = shape_rewards(score, logp, ref_logp, torch.zeros_like(mask), 0.5, backend="triton")
    assert_close(out, torch.zeros(1, 4), atol=0.0, name="all masked")


def test_rewards_last_valid_token_in_an_earlier_block():
    # T = 2100 spans three 1024-wide blocks; the last valid token sits in the first block, so
    # the right-to-left walk must carry "not found yet" through two empty blocks.
    T = 2100
    logp, ref_logp = random_logps((2, T), torch.float32)
    mask = torch.zeros(2, T, dtype=torch.bool, device=DEVICE)
    mask[0, 10:700] = True
    mask[1, 1023] = True
    scores = torch.tensor([5.0, -7.0], device=DEVICE)
    out = check_rewards(scores, logp, ref_logp, mask, 0.1, "k1", None, None, None, name="blocks")
    kl = (logp - ref_logp)[1, 1023]
    assert_close(out[1, 1023], -7.0 - 0.1 * kl, atol=1e-6, name="score at 1023")


def test_rewards_bad_input():
    logp = torch.zeros(2, 5, device=DEVICE)
    mask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    scores = torch.zeros(2, device=DEVICE)
    with pytest.raises(ValueError, match=r"score_index holds 5, outside \[0, 5\)"):
        shape_rewards(scores, logp, logp, mask, 0.1,
                      score_index=torch.tensor([0, 5], device=DEVICE), check_index=True)
    with pytest.raises(ValueError, match=r"score_index holds -1, outside \[0, 5\)"):
        shape_rewards(scores, logp, logp, mask, 0.1,
                      score_index=torch.tensor([-1, 2], device=DEVICE), check_index=True)
    with pytest.raises(ValueError, match="score_index must be an integer tensor"):
        shape_rewards(scores, logp, logp, mask, 0.1,
                      score_index=torch.tensor([0.0, 1.0], device=DEVICE))
    with pytest.raises(ValueError, match=r"scores has shape \(3,\) but logp has shape \(2, 5\)"):
        shape_rewards(torch.zeros(3, device=DEVICE), logp, logp, mask, 0.1)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\)"):
        shape_rewards(scores, logp, logp, mask[:, :4], 0.1)
    with pytest.raises(ValueError, match="estimator='kl' is not supported"):
        shape_rewards(scores, logp, logp, mask, 0.1, estimator="kl")
    with pytest.raises(ValueError, match="score_clip=-1.0 must be a non-negative bound"):
        shape_rewards(scores, logp, logp, mask, 0.1, score_clip=-1.0)
    with pytest.raises(ValueError, match="logp must have a time dimension"):
        shape_rewards(torch.zeros(()), logp[0, 0], logp[0, 0], mask[0, 0], 0.1)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_rewards_out_of_range_score_index_gives_a_nan_row_without_a_host_check(backend):
    # By default nothing is checked on the host (no sync); the score must not vanish silently,
    # so the row whose index is outside [0, T) is NaN and the other rows are untouched.
    logp, ref_logp = random_logps((4, 5), torch.float32)
    mask = torch.ones(4, 5, dtype=torch.bool, device=DEVICE)
    scores = torch.randn(4, device=DEVICE)
    index = torch.tensor([0, 5, -1, 4], device=DEVICE)
    out = shape_rewards(scores, logp, ref_logp, mask, 0.1, score_index=index, backend=backend)
    assert torch.isnan(out[1:3]).all()
    good = torch.tensor([0, 3])
    want = reference.shape_rewards(scores[good], logp[good], ref_logp[good], mask[good], 0.1,
                                   score_index=index[good])
    assert_close(out[good], want, atol=1e-6, name="rows with a valid index")


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------
def test_torch_compile_traces_without_graph_breaks():
    logp, ref_logp = random_logps((3, 40), torch.float32)
    mask = padded_mask(3, 40)
    scores = torch.randn(3, device=DEVICE)

    def step(logp, ref_logp, mask, scores):
        kl = kl_penalty(logp, ref_logp, "k3", clamp=10.0, backend="triton")
        rewards = shape_rewards(scores, logp, ref_logp, mask, 0.1, "k1", backend="triton")
        return (kl * mask).sum(), rewards

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = logp.clone().requires_grad_()
    loss, rewards = compiled(a, ref_logp, mask, scores)
    loss.backward()
    b = logp.clone().requires_grad_()
    loss_e, rewards_e = step(b, ref_logp, mask, scores)
    loss_e.backward()
    assert_close(loss, loss_e, atol=1e-5, name="compiled loss")
    assert_close(rewards, rewards_e, atol=0.0, name="compiled rewards")
    assert_close(a.grad, b.grad, atol=0.0, name="compiled grad")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_clamps_keep_nan(estimator):
    """clamp / log_ratio_clamp of a NaN log-ratio give NaN, as torch.clamp (Triton's default
    min / max returned the bound instead: a finite KL out of a NaN log-prob)."""
    logp, ref_logp = random_logps((2, 6), torch.float32)
    logp[0, 3] = float("nan")
    out = kl_penalty(logp, ref_logp, estimator, clamp=10.0, log_ratio_clamp=20.0,
                     backend="triton")
    want = reference.kl_penalty(logp.double(), ref_logp.double(), estimator, clamp=10.0,
                                log_ratio_clamp=20.0)
    assert torch.equal(torch.isnan(out), torch.isnan(want)) and torch.isnan(out[0, 3])


def test_rewards_clamps_keep_nan():
    """score_clip of a NaN score and kl_clamp of a NaN KL at a valid token give NaN there,
    as the reference (not the clip bound)."""
    logp, ref_logp = random_logps((2, 4), torch.float32)
    mask = torch.ones(2, 4, dtype=torch.bool, device=DEVICE)
    scores = torch.tensor([float("nan"), 1.0], device=DEVICE)
    logp[1, 1] = float("nan")
    out = shape_rewards(scores, logp, ref_logp, mask, 0.1, score_clip=5.0, kl_clamp=5.0,
                        backend="triton")
    want = reference.shape_rewards(scores.double(), logp.double(), ref_logp.double(), mask, 0.1,
                                   score_clip=5.0, kl_clamp=5.0)
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert torch.isnan(out[0, 3]) and torch.isnan(out[1, 1])


# --------------------------------------------------------------------------------------------
# k3 near the reference policy (|d| << 1), every backend
# --------------------------------------------------------------------------------------------
# There k3 ~ d^2 / 2 and e^-d + d - 1 in fp32 keeps only the rounding of e^-d (about 6e-8):
# at |d| in [1e-4, 2e-3] it was off by 50-100% on average (the gradient 1 - e^-d by up to 1e-3),
# expm1(-d) + d by up to 1e-3 at |d| = 1e-4. The ops now take a series there (ops/kl.py,
# csrc/cpu/common.h) or float64 (the torch paths, the reference). The bound: one fp32 rounding
# is 2^-24 ~ 6e-8 relative; the series, d^2 and the ops around k3 (kl_coef, the upstream
# gradient, a cast) add a few more, so 1e-6 (about 17 roundings) is a few-ulps bound with room;
# measured, the worst element is about 1.5e-7. Sums (a loss over a few hundred tokens) take
# K3_SUM_RTOL.
K3_RTOL = 1e-6
K3_SUM_RTOL = 1e-5


def tiny_log_ratios(shape):
    """(logp, ref_logp) fp32 with d = logp - ref_logp of magnitude 1e-4 .. 2e-3 (log-uniform),
    either sign. logp in [-3, -0.5]: logp and ref_logp are within a factor 2 of each other, so
    the kernels' fp32 d is exact (Sterbenz) and the float64 reference sees the same d."""
    logp = -0.5 - 2.5 * torch.rand(shape, device=DEVICE)
    magnitude = torch.exp(torch.empty(shape, device=DEVICE).uniform_(math.log(1e-4),
                                                                      math.log(2e-3)))
    sign = torch.where(torch.rand(shape, device=DEVICE) < 0.5, -1.0, 1.0)
    ref_logp = logp - sign * magnitude
    assert torch.equal((logp - ref_logp).double(), logp.double() - ref_logp.double())
    return logp, ref_logp


def k3_float64(logp, ref_logp):
    """(k3, d k3 / d logp) in float64 of the fp32 inputs' log-ratio, accurate to ~1e-12 here."""
    d = logp.double() - ref_logp.double()
    em1 = torch.expm1(-d)
    return em1 + d, -em1


def assert_relative(x, want, rtol, name):
    """|x - want| <= rtol |want| elementwise (want nonzero); NaN fails."""
    x, want = torch.as_tensor(x).double(), torch.as_tensor(want).double().to(x.device)
    assert bool((want != 0).all()), f"{name}: the reference has zeros"
    err = ((x - want) / want).abs()
    worst = err.max().item() if err.numel() else 0.0
    assert not err.isnan().any() and worst <= rtol, (
        f"{name}: relative error {worst:.3e} > {rtol:.0e} (mean {err.mean().item():.3e})")


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("layout", ["contiguous", "clamped", "strided"])
def test_kl_k3_small_log_ratios_to_a_few_ulps(backend, layout):
    """k3 and both gradients of fp32 inputs at |d| in [1e-4, 2e-3] against float64: each kernel
    path (the eager one-pass forward that also writes the derivative, the clamped kernels, the
    strided ones), with a random upstream gradient."""
    logp, ref_logp = tiny_log_ratios((6, 301))
    clamps = (10.0, 20.0) if layout == "clamped" else (None, None)
    if layout == "strided":
        logp, ref_logp = logp.t(), ref_logp.t()
    a, b = logp.clone().requires_grad_(), ref_logp.clone().requires_grad_()
    kl = kl_penalty(a, b, "k3", *clamps, backend=backend)
    upstream = torch.rand(kl.shape, device=DEVICE) + 0.5
    kl.backward(upstream)
    want, slope = k3_float64(logp, ref_logp)
    assert_relative(kl, want, K3_RTOL, f"{layout} k3")
    assert_relative(a.grad, upstream.double() * slope, K3_RTOL, f"{layout} d k3 / d logp")
    assert_relative(b.grad, -upstream.double() * slope, K3_RTOL, f"{layout} d k3 / d ref_logp")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_rewards_k3_small_log_ratios_to_a_few_ulps(backend):
    """shape_rewards with k3 at |d| in [1e-4, 2e-3]: -kl_coef k3 to a few ulps at every valid
    token (scores 0, so the last valid token holds the KL part alone), 0 at masked ones."""
    n_rows, T = 7, 203
    logp, ref_logp = tiny_log_ratios((n_rows, T))
    mask = padded_mask(n_rows, T)
    scores = torch.zeros(n_rows, device=DEVICE)
    out = shape_rewards(scores, logp, ref_logp, mask, 0.05, "k3", backend=backend)
    want, _ = k3_float64(logp, ref_logp)
    assert_relative(out[mask], -0.05 * want[mask], K3_RTOL, "rewards")
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
