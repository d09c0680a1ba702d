"""ppo_policy_loss: the fused Triton kernel against the float64 reference.

Values, stats and gradients (random upstream gradient) over reductions x dtypes x shapes /
padding, a table of clip options, closed-form cases, empty masks, strided inputs, bad input and
torch.compile; then the critic-free options (per-sequence advantages, GSPO's sequence ratio,
CISPO, token-sum, normalizer, the KL term) against the reference, against hand-worked
gradients, and (B,) advantages against their expansion bit for bit. Under the interpreter the
shapes stay small but keep the awkward sizes (T = 1, 257, 1025, several rows, left / right
padding, all-masked rows).
"""

import pytest
import torch

from rlhf_kernels import reference
from rlhf_kernels._checks import SettingError
from rlhf_kernels.ops.policy_loss import ppo_policy_loss
from tests.numerics import DEVICE, assert_close, assert_close_2x, assert_stats_editable

REDUCTIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
              "token-sum")
DTYPES = (torch.float32, torch.bfloat16)


def make_mask(shape, padding: str) -> torch.Tensor | None:
    """(..., T) bool mask. right / left: per-row lengths 0..T (row 0 always empty when there are
    several rows, so an all-masked row is in every padded case); random: i.i.d. tokens."""
    if padding == "none":
        return None
    T = shape[-1]
    rows = int(torch.tensor(shape[:-1]).prod()) if len(shape) > 1 else 1
    if padding == "random":
        return (torch.rand(shape, device=DEVICE) > 0.3)
    lengths = torch.randint(0, T + 1, (rows,), device=DEVICE)
    lengths[-1] = T  # at least one full row
    if rows > 1:
        lengths[0] = 0
    positions = torch.arange(T, device=DEVICE)
    if padding == "right":
        mask = positions[None, :] < lengths[:, None]
    else:
        mask = positions[None, :] >= (T - lengths)[:, None]
    return mask.reshape(shape)


def make_inputs(shape, dtype, spread=0.3):
    logp = (-torch.rand(shape, device=DEVICE) * 3).to(dtype)
    old_logp = (logp.float() + spread * torch.randn(shape, device=DEVICE)).to(dtype)
    advantages = torch.randn(shape, device=DEVICE).to(dtype)
    return logp, old_logp, advantages


def check_against_reference(logp, old_logp, advantages, mask, name="", **options):
    """Kernel vs float64 reference with the 2x rule (the same-dtype eager reference sets the
    budget); the loss tolerance scales with its magnitude (sums over 1025 tokens)."""
    dtype = logp.dtype
    upstream = torch.randn((), device=DEVICE)

    x = logp.clone().requires_grad_()
    loss, stats = ppo_policy_loss(x, old_logp, advantages, mask, backend="triton", **options)
    (loss * upstream).backward()

    x64 = logp.double().requires_grad_()
    loss64, stats64 = reference.ppo_policy_loss(x64, old_logp.double(), advantages.double(),
                                                mask, **options)
    (loss64 * upstream.double()).backward()

    xt = logp.clone().requires_grad_()
    loss_t, stats_t = reference.ppo_policy_loss(xt, old_logp, advantages, mask, **options)
    (loss_t * upstream).backward()

    assert loss.dtype == torch.float32 and loss.shape == ()
    scale = max(1.0, abs(loss64.item()))
    assert_close_2x(loss, loss_t, loss64, dtype, atol_scale=scale, name=f"{name} loss")
    assert x.grad.dtype == dtype
    assert_close_2x(x.grad, xt.grad, x64.grad, dtype, name=f"{name} grad")
    assert set(stats) == set(stats64)
    for key in stats64:
        assert not stats[key].requires_grad
        # pg_loss and kl are loss terms: under token-sum they are sums over the tokens too
        assert_close_2x(stats[key], stats_t[key], stats64[key], dtype, name=f"{name} {key}",
                        atol_scale=max(1.0, abs(stats64[key].item())))


# (shape, padding, dual_clip): every shape with and without a mask somewhere in the table.
CASES = [
    ((7,), "none", None),
    ((6, 1), "random", 3.0),
    ((4, 257), "right", None),
    ((3, 1025), "left", 3.0),
    ((2, 3, 40), "random", None),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,padding,dual_clip", CASES, ids=str)
def test_matches_reference(reduction, dtype, shape, padding, dual_clip):
    logp, old_logp, advantages = make_inputs(shape, dtype)
    mask = make_mask(shape, padding)
    check_against_reference(logp, old_logp, advantages, mask, reduction=reduction,
                            dual_clip=dual_clip, name=f"{reduction} {shape} {padding}")


OPTIONS = [
    dict(clip_low=0.2, clip_high=0.28),  # DAPO's clip-higher
    dict(clip_low=0.0, clip_high=0.0),
    dict(dual_clip=3.0),
    dict(dual_clip=1.2, clip_high=0.5),  # the dual clip binds for many A < 0 tokens
    dict(log_ratio_clamp=None),
    dict(log_ratio_clamp=0.25, dual_clip=2.0),  # the log-ratio clamp bites
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_clip_options(dtype, options):
    shape = (5, 257)
    logp, old_logp, advantages = make_inputs(shape, dtype, spread=0.6)
    mask = make_mask(shape, "right")
    for reduction in ("token-mean", "seq-mean-token-mean"):
        check_against_reference(logp, old_logp, advantages, mask, reduction=reduction,
                                name=f"{options} {reduction}", **options)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_masked_batch_gives_zero_loss_and_grad(reduction):
    logp, old_logp, advantages = make_inputs((3, 33), torch.float32)
    mask = torch.zeros(3, 33, dtype=torch.bool, device=DEVICE)
    x = logp.clone().requires_grad_()
    loss, stats = ppo_policy_loss(x, old_logp, advantages, mask, dual_clip=3.0,
                                  reduction=reduction, backend="triton")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))
    for key, value in stats.items():
        assert value.item() == 0.0, key


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0,)], ids=str)
def test_empty_tensors(shape):
    # No token at all: loss 0 for every reduction (also seq-mean-token-sum-norm with T = 0,
    # where the reference divides 0 by 0), gradient of the input's shape.
    for reduction in REDUCTIONS:
        x = torch.zeros(shape, device=DEVICE, requires_grad=True)
        zeros = torch.zeros(shape, device=DEVICE)
        loss, stats = ppo_policy_loss(x, zeros, zeros, reduction=reduction, backend="triton")
        loss.backward()
        assert loss.item() == 0.0 and x.grad.shape == shape
        assert all(value.item() == 0.0 for value in stats.values())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_padding_garbage_does_not_leak():
    """inf / NaN under the mask (uninitialised padding) changes neither loss nor gradient."""
    shape = (4, 64)
    logp, old_logp, advantages = make_inputs(shape, torch.float32)
    mask = make_mask(shape, "right")
    clean = ppo_policy_loss(logp.clone().requires_grad_(), old_logp, advantages, mask,
                            backend="triton")[0]
    dirty_logp = torch.where(mask, logp, torch.full_like(logp, float("nan")))
    dirty_adv = torch.where(mask, advantages, torch.full_like(advantages, float("inf")))
    x = dirty_logp.clone().requires_grad_()
    loss, stats = ppo_policy_loss(x, old_logp, dirty_adv, mask, backend="triton")
    loss.backward()
    assert loss.item() == clean.item()
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()
    assert all(torch.isfinite(v) for v in stats.values())


# --------------------------------------------------------------------------------------------
# closed-form cases
# --------------------------------------------------------------------------------------------
def test_ratio_one_gives_minus_mean_advantage():
    shape = (3, 20)
    logp = -torch.rand(shape, device=DEVICE)
    advantages = torch.randn(shape, device=DEVICE)
    mask = make_mask(shape, "right")
    m = mask.float()
    n = m.sum()
    for reduction, expected, grad in (
        ("token-mean", -(advantages * m).sum() / n, -advantages * m / n),
        ("seq-mean-token-sum-norm", -(advantages * m).sum() / 20, -advantages * m / 20),
    ):
        x = logp.clone().requires_grad_()
        loss, stats = ppo_policy_loss(x, logp, advantages, mask, reduction=reduction,
                                      backend="triton")
        loss.backward()
        assert_close(loss, expected, atol=1e-6, name=reduction)
        # d/dlogp of -A r at r = 1 is -A, times the reduction weight.
        assert_close(x.grad, grad, atol=1e-7, name=f"{reduction} grad")
        assert stats["clipfrac"].item() == 0.0
        assert stats["approx_kl"].item() == 0.0 and stats["ppo_kl"].item() == 0.0
        assert stats["ratio_mean"].item() == 1.0 and stats["ratio_max"].item() == 1.0


def test_hand_worked_tokens():
    """Four tokens, eps = 0.2, dual clip c = 3, token-mean over 4:

    A = +1, d = +1   -> r = e > 1.2: clipped, loss -1.2, gradient 0
    A = +1, d = -1   -> r = 1/e < 0.8: unclipped side wins, loss -1/e, gradient -1/e / 4
    A = -1, d = +0.1 -> inside the range: loss r, gradient r / 4
    A = -2, d = +3   -> loss1 = 2 e^3 > dual 2 * 3 = 6: dual clip, loss 6, gradient 0
    """
    e = torch.e
    logp = torch.tensor([[1.0, -1.0, 0.1, 3.0]], device=DEVICE)
    old = torch.zeros_like(logp)
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0]], device=DEVICE)
    x = logp.clone().requires_grad_()
    loss, stats = ppo_policy_loss(x, old, adv, dual_clip=3.0, backend="triton")
    loss.backward()
    r3 = torch.exp(torch.tensor(0.1)).item()
    assert_close(loss, torch.tensor((-1.2 - 1 / e + r3 + 6.0) / 4), atol=1e-6)
    expected_grad = torch.tensor([[0.0, -1 / e / 4, r3 / 4, 0.0]], device=DEVICE)
    assert_close(x.grad, expected_grad, atol=1e-7, name="grad")
    assert stats["clipfrac"].item() == 0.25  # only the first token: loss2 > loss1 there
    assert stats["dual_clipfrac"].item() == 0.25
    assert_close(stats["ratio_max"], torch.tensor(e**3), atol=1e-4)
    assert_close(stats["approx_kl"], torch.tensor((1 + 1 + 0.01 + 9) / 8), atol=1e-6)


def test_log_ratio_clamp_zeroes_gradient():
    # d = 30 is clamped to 20; with A < 0 the unclipped term wins (loss = -A e^20) but the
    # clamp has cut the gradient.
    logp = torch.tensor([[30.0, 0.0]], device=DEVICE)
    old = torch.zeros_like(logp)
    adv = torch.tensor([[-1.0, -1.0]], device=DEVICE)
    x = logp.clone().requires_grad_()
    loss, stats = ppo_policy_loss(x, old, adv, backend="triton")
    loss.backward()
    assert_close(loss, torch.tensor((torch.e**20 + 1) / 2), atol=0, rtol=1e-6)
    assert x.grad[0, 0].item() == 0.0 and x.grad[0, 1].item() == pytest.approx(0.5)
    assert_close(stats["ratio_max"], torch.tensor(torch.e**20), atol=0, rtol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_row_weights(reduction):
    """Ratio 1 and A = 1: dloss/dlogp is -(the reduction's weight of each token)."""
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]], device=DEVICE)
    logp = torch.zeros(3, 4, device=DEVICE)
    x = logp.clone().requires_grad_()
    loss, _ = ppo_policy_loss(x, logp, torch.ones_like(logp), mask, reduction=reduction,
                              backend="triton")
    loss.backward()
    weights = {
        "token-mean": [[0.25] * 3 + [0], [0] * 4, [0.25, 0, 0, 0]],
        "seq-mean-token-mean": [[1 / 6] * 3 + [0], [0] * 4, [0.5, 0, 0, 0]],
        "seq-mean-token-sum": [[0.5] * 3 + [0], [0] * 4, [0.5, 0, 0, 0]],
        "seq-mean-token-sum-norm": [[0.25] * 3 + [0], [0] * 4, [0.25, 0, 0, 0]],
        "token-sum": [[1.0] * 3 + [0], [0] * 4, [1.0, 0, 0, 0]],
    }[reduction]
    expected = -torch.tensor(weights, device=DEVICE)
    assert_close(x.grad, expected, atol=1e-7, name=reduction)
    assert_close(loss, expected.sum(), atol=1e-6, name=f"{reduction} loss")


# --------------------------------------------------------------------------------------------
# layouts and mask dtypes
# --------------------------------------------------------------------------------------------
def test_strided_inputs_and_mask_dtypes():
    B, T = 4, 37
    base = -torch.rand(B, 2 * T, device=DEVICE)
    logp = base[:, ::2]  # time stride 2
    old_logp = (base + 0.3 * torch.randn_like(base)).t().contiguous().t()[:, 1::2]
    advantages = torch.randn(3, B, 2, T, device=DEVICE)[1, :, 0]  # row stride 2T
    mask = make_mask((B, T), "left")
    check_against_reference(logp, old_logp, advantages, mask, name="strided",
                            reduction="seq-mean-token-mean")
    # A 3-D tensor whose leading dims cannot merge into one stride (reshape copies).
    x = torch.randn(5, 3, T, device=DEVICE).transpose(0, 1)
    check_against_reference(-x.abs(), torch.zeros_like(x), x, None, name="transposed")
    expected = ppo_policy_loss(logp, old_logp, advantages, mask, backend="triton")[0]
    for as_dtype in (torch.float32, torch.int64, torch.uint8):
        got = ppo_policy_loss(logp, old_logp, advantages, mask.to(as_dtype), backend="triton")[0]
        assert got.item() == expected.item(), as_dtype


def test_float64_and_reference_backend_use_the_reference():
    logp, old_logp, advantages = make_inputs((2, 9), torch.float64)
    loss, _ = ppo_policy_loss(logp, old_logp, advantages, backend="triton")
    assert loss.dtype == torch.float64
    expected, _ = reference.ppo_policy_loss(logp, old_logp, advantages)
    assert loss.item() == expected.item()
    loss_ref, _ = ppo_policy_loss(logp.float(), old_logp.float(), advantages.float(),
                                  backend="reference")
    assert_close(loss_ref, expected, atol=1e-6)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(old_logp=torch.zeros(2, 4)), r"old_logp has shape \(2, 4\) but logp has shape \(2, 3\)"),
    (dict(advantages=torch.zeros(3)), r"advantages has shape \(3,\)"),
    (dict(mask=torch.ones(2, 4, dtype=torch.bool)), r"mask has shape \(2, 4\)"),
    (dict(dual_clip=1.0), r"dual_clip must be > 1 .* got 1.0"),
    (dict(dual_clip=0.5), r"dual_clip must be > 1"),
    (dict(reduction="mean"), r"reduction='mean' is not supported; expected one of"),
    (dict(clip_low=-0.1), r"clip_low=-0.1 must be >= 0"),
    (dict(log_ratio_clamp=0.0), r"log_ratio_clamp=0.0 must be > 0"),
    (dict(logp=torch.zeros(2, 3, dtype=torch.int64)), r"logp must be a floating tensor"),
    (dict(mask=torch.ones(2, 3, dtype=torch.complex64)), r"mask must be bool, integer or float"),
])
def test_bad_input_raises(kwargs, match):
    args = dict(logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3), advantages=torch.zeros(2, 3))
    args.update(kwargs)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        ppo_policy_loss(**args, backend="triton")


def test_gradient_wanted_for_rollout_data_raises():
    logp, old_logp, advantages = make_inputs((2, 5), torch.float32)
    with pytest.raises(ValueError, match="advantages requires grad.*logp only"):
        ppo_policy_loss(logp.requires_grad_(), old_logp, advantages.requires_grad_(),
                        backend="triton")


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph():
    shape = (3, 50)
    logp, old_logp, advantages = make_inputs(shape, torch.float32)
    mask = make_mask(shape, "right")

    def step(x, old, adv, m):
        loss, stats = ppo_policy_loss(x, old, adv, m, dual_clip=3.0,
                                      reduction="seq-mean-token-mean", backend="triton")
        return loss * 2.0, stats["clipfrac"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x_eager = logp.clone().requires_grad_()
    x_comp = logp.clone().requires_grad_()
    loss_eager, clip_eager = step(x_eager, old_logp, advantages, mask)
    loss_comp, clip_comp = compiled(x_comp, old_logp, advantages, mask)
    loss_eager.backward()
    loss_comp.backward()
    assert_close(loss_comp, loss_eager, atol=1e-6)
    assert_close(clip_comp, clip_eager, atol=0)
    assert_close(x_comp.grad, x_eager.grad, atol=1e-7)


# --------------------------------------------------------------------------------------------
# critic-free options: per-sequence advantages, GSPO, CISPO, token-sum, normalizer, KL term
# --------------------------------------------------------------------------------------------
def _ref_logp(logp, spread=0.2):
    return (logp.float() + spread * torch.randn(logp.shape, device=DEVICE)).to(logp.dtype)


# Each case runs under every reduction. "adv": "seq" for (B,) advantages, "token" for (B, T);
# "kl": an estimator for the KL term (kl_coef 0.1); "norm": "float" or "tensor" normalizer.
CRITIC_FREE = [
    dict(ratio_level="sequence", adv="seq"),
    dict(ratio_level="sequence", adv="token", dual_clip=1.5, clip_high=0.28),
    dict(ratio_level="sequence", adv="seq", log_ratio_clamp=0.05, kl="k1"),  # the clamp bites
    dict(loss_type="cispo", adv="token", clip_high=0.28, kl="k2"),
    dict(loss_type="cispo", ratio_level="sequence", adv="seq", norm="tensor"),
    dict(adv="seq", dual_clip=3.0, kl="k3", norm="float"),
    dict(ratio_level="sequence", adv="token", dual_clip=2.0, kl="abs", norm="tensor"),
]


def _critic_free_inputs(shape, dtype, case, spread=0.6):
    logp, old_logp, advantages = make_inputs(shape, dtype, spread=spread)
    options = {k: v for k, v in case.items() if k not in ("adv", "kl", "norm")}
    if case["adv"] == "seq":
        advantages = advantages[..., 0].contiguous()
    if "kl" in case:
        options.update(ref_logp=_ref_logp(logp), kl_coef=0.1, kl_estimator=case["kl"])
    if case.get("norm") == "float":
        options["normalizer"] = 37.5
    elif case.get("norm") == "tensor":
        options["normalizer"] = torch.tensor(29, device=DEVICE)  # an integer token count
    return logp, old_logp, advantages, options


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CRITIC_FREE, ids=str)
def test_critic_free_options_match_reference(dtype, case):
    shape = (5, 37)
    logp, old_logp, advantages, options = _critic_free_inputs(shape, dtype, case)
    mask = make_mask(shape, "right")  # row 0 empty
    for reduction in REDUCTIONS:
        check_against_reference(logp, old_logp, advantages, mask, reduction=reduction,
                                name=f"{case} {reduction}", **options)


@pytest.mark.parametrize("shape,padding", [((1,), "none"), ((3, 1025), "left"),
                                           ((2, 3, 40), "random")], ids=str)
def test_critic_free_awkward_shapes_and_fp16(shape, padding):
    """T = 1, a row longer than one time block, leading dims that merge; fp16 inputs."""
    case = dict(ratio_level="sequence", adv="seq", dual_clip=3.0, kl="k3", norm="tensor")
    for dtype in (torch.float16, torch.float32):
        logp, old_logp, advantages, options = _critic_free_inputs(shape, dtype, case, spread=0.2)
        check_against_reference(logp, old_logp, advantages, make_mask(shape, padding),
                                reduction="seq-mean-token-mean", name=f"{shape} {dtype}",
                                **options)
    logp, old_logp, advantages, options = _critic_free_inputs(
        shape, torch.float32, dict(loss_type="cispo", adv="token", kl="abs"))
    check_against_reference(logp, old_logp, advantages, make_mask(shape, padding),
                            reduction="token-sum", name=f"{shape} cispo", **options)


def _run_triton(logp, old_logp, advantages, mask, **options):
    x = logp.clone().requires_grad_()
    loss, stats = ppo_policy_loss(x, old_logp, advantages, mask, backend="triton", **options)
    loss.backward()
    return loss, stats, x.grad


@pytest.mark.parametrize("options", [
    dict(),
    dict(ratio_level="sequence", dual_clip=3.0, reduction="seq-mean-token-mean"),
    dict(loss_type="cispo", reduction="token-sum", normalizer=100.0),
    dict(ratio_level="sequence", loss_type="cispo", kl_coef=0.2, kl_estimator="k3",
         reduction="seq-mean-token-sum-norm"),
], ids=str)
def test_per_sequence_advantages_equal_expanded_ones_bitwise(options):
    """(B,) advantages give exactly the loss, stats and gradient of the expanded (B, T) ones
    (read with stride 0, a materialised copy, and a (B,) view with a stride of 2)."""
    for shape, dtype in (((5, 37), torch.float32), ((2, 3, 17), torch.bfloat16)):
        logp, old_logp, _ = make_inputs(shape, dtype, spread=0.5)
        mask = make_mask(shape, "random")
        opts = dict(options)
        if "kl_coef" in opts:
            opts["ref_logp"] = _ref_logp(logp)
        wide = torch.randn(shape[:-1] + (2,), device=DEVICE).to(dtype)
        per_seq = wide[..., 0]  # stride 2 along the rows
        expected = _run_triton(logp, old_logp, per_seq.contiguous(), mask, **opts)
        for advantages in (per_seq, per_seq.unsqueeze(-1).expand(shape),
                           per_seq.unsqueeze(-1).expand(shape).contiguous()):
            got = _run_triton(logp, old_logp, advantages, mask, **opts)
            assert torch.equal(got[0], expected[0]), (shape, advantages.stride())
            assert torch.equal(got[2], expected[2]), (shape, advantages.stride())
            assert got[1].keys() == expected[1].keys()
            for key in expected[1]:
                assert torch.equal(got[1][key], expected[1][key]), key


def test_sequence_ratio_hand_worked_gradient():
    """GSPO, token-mean over the 3 + 2 valid tokens of two rows.

    Row 0: d = logp - old = (0.3, -0.1, 0.1) -> mean 0.1, s = e^0.1 inside [0.8, 1.2];
    A = (1, -2, 0.5): loss_row = sum(-A s) = 0.5 s and every valid token gets
    d/dlogp_t = (1/5) * sum_u(-A_u s) * (1/3) = 0.5 s / 15 (the mean spreads it over 3 tokens).
    Row 1: d = (0.6, 0.4) -> s = e^0.5 > 1.2 with A = (1, 1): clipped, loss -1.2 per token and
    no gradient; the padded slot holds NaN and gets 0.
    """
    nan = float("nan")
    logp = torch.tensor([[0.3, -0.1, 0.1, nan], [0.6, 0.4, nan, nan]], device=DEVICE)
    old = torch.zeros_like(logp)
    adv = torch.tensor([[1.0, -2.0, 0.5, 0.0], [1.0, 1.0, 0.0, 0.0]], device=DEVICE)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool, device=DEVICE)
    loss, stats, grad = _run_triton(logp, old, adv, mask, ratio_level="sequence")
    s0, s1 = torch.exp(torch.tensor(0.1)).item(), torch.exp(torch.tensor(0.5)).item()
    assert_close(loss, torch.tensor((0.5 * s0 - 2 * 1.2) / 5), atol=1e-6)
    g = 0.5 * s0 / 15
    assert_close(grad, torch.tensor([[g, g, g, 0], [0, 0, 0, 0]], device=DEVICE), atol=1e-7)
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)  # row 1's two tokens
    assert_close(stats["ratio_mean"], torch.tensor((3 * s0 + 2 * s1) / 5), atol=1e-6)
    assert_close(stats["ratio_max"], torch.tensor(s1), atol=1e-6)
    # approx_kl stays per token: mean of d^2 / 2 over the five tokens.
    assert_close(stats["approx_kl"], torch.tensor((0.09 + 0.01 + 0.01 + 0.36 + 0.16) / 10),
                 atol=1e-7)


def test_sequence_ratio_clamp_of_the_mean_cuts_only_the_policy_gradient():
    """The row's mean log-ratio 0.5 is clamped to 0.4: with A = -1 the unclipped term wins
    (loss e^0.4 per token) but the clamp cuts its gradient; the KL term (k1, coefficient 0.3)
    keeps its own per-token gradient 0.3 / 2. CISPO's weight has no gradient to cut:
    d/dlogp = -clip(e^0.4) A / 2 = 1.2 / 2."""
    logp = torch.tensor([[0.6, 0.4]], device=DEVICE)
    old = torch.zeros_like(logp)
    adv = torch.tensor([-1.0], device=DEVICE)
    loss, stats, grad = _run_triton(logp, old, adv, None, ratio_level="sequence",
                                    log_ratio_clamp=0.4, ref_logp=torch.zeros_like(logp),
                                    kl_coef=0.3, kl_estimator="k1")
    e04 = torch.exp(torch.tensor(0.4)).item()
    assert_close(loss, torch.tensor(e04 + 0.3 * 0.5), atol=1e-6)
    assert_close(stats["pg_loss"], torch.tensor(e04), atol=1e-6)
    assert_close(stats["kl"], torch.tensor(0.5), atol=1e-7)
    assert_close(grad, torch.full_like(logp, 0.15), atol=1e-7)
    loss, stats, grad = _run_triton(logp, old, adv, None, ratio_level="sequence",
                                    log_ratio_clamp=0.4, loss_type="cispo")
    assert_close(loss, torch.tensor(1.2 * (0.6 + 0.4) / 2), atol=1e-6)
    assert_close(grad, torch.full_like(logp, 0.6), atol=1e-7)
    assert stats["clipfrac"].item() == 1.0


def test_sequence_ratio_dual_clip_tie_halves_the_gradient():
    """A < 0 and the dual-clip constant equal to the row's ratio (read back from ratio_max, so
    the kernel compares equal values): torch.minimum's tie gives each side half the gradient,
    so each token gets half of sum_u(-A_u s) / n (token-mean weight 1/2)."""
    logp = torch.tensor([[0.6, 0.4]], device=DEVICE)
    old = torch.zeros_like(logp)
    adv = torch.tensor([[-1.0, -3.0]], device=DEVICE)
    _, stats, full = _run_triton(logp, old, adv, None, ratio_level="sequence")
    s = stats["ratio_max"].item()  # e^0.5 > 1.2: the unclipped term is the max for A < 0
    assert_close(full, torch.full_like(logp, 4 * s / 2 / 2), atol=1e-6)
    loss, stats, grad = _run_triton(logp, old, adv, None, ratio_level="sequence", dual_clip=s)
    assert_close(loss, torch.tensor(4 * s / 2), atol=1e-6)
    assert stats["dual_clipfrac"].item() == 0.0  # a tie is not counted as clipped
    assert_close(grad, 0.5 * full, atol=1e-7)


def test_cispo_hand_worked_tokens():
    """CISPO: loss = -clip(r) A logp with the clipped ratio as a constant weight.

    logp = (-1, -2), old = logp - (0.5, -0.5): r = (e^0.5, e^-0.5) = (1.65, 0.61), clipped to
    (1.28, 0.8) with clip_high 0.28; A = (1, -1). token-mean: loss = (1.28 - 0.8 * 2) / 2 and
    d/dlogp = -w A / 2 = (-0.64, 0.4): both tokens are clipped and both keep their gradient.
    """
    logp = torch.tensor([[-1.0, -2.0]], device=DEVICE)
    old = logp - torch.tensor([[0.5, -0.5]], device=DEVICE)
    adv = torch.tensor([[1.0, -1.0]], device=DEVICE)
    loss, stats, grad = _run_triton(logp, old, adv, None, loss_type="cispo", clip_high=0.28)
    assert_close(loss, torch.tensor((1.28 - 1.6) / 2), atol=1e-6)
    assert_close(grad, torch.tensor([[-0.64, 0.4]], device=DEVICE), atol=1e-7)
    assert stats["clipfrac"].item() == 1.0
    assert "dual_clipfrac" not in stats


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_normalizer_replaces_the_denominator(reduction):
    """loss(normalizer=N) * N is the reduction's numerator: the token sum for the token
    reductions, the sum of row means / row sums for the seq-mean ones. A float, a 0-d integer
    tensor and a 0-d float tensor that requires grad (no gradient flows into it) agree bit for
    bit, gradient included."""
    shape = (4, 33)
    logp, old_logp, advantages = make_inputs(shape, torch.float32)
    mask = make_mask(shape, "right")
    n = 40
    expected = _run_triton(logp, old_logp, advantages, mask, reduction=reduction, normalizer=n)
    m = mask.float()
    per_token, *_ = reference._policy_terms(
        logp.double().where(mask, 0), old_logp.double().where(mask, 0),
        advantages.double().where(mask, 0), m.double(), 0.2, 0.2, None, 20.0, "token", "ppo")
    per_token = per_token.where(mask, 0)
    if reduction == "seq-mean-token-mean":
        numerator = (per_token.sum(-1) / m.sum(-1).clamp_min(1)).sum()
    else:
        numerator = per_token.sum()
    assert_close(expected[0] * n, numerator, atol=1e-4, name=reduction)
    count = torch.tensor(n, device=DEVICE)
    weight = torch.tensor(float(n), device=DEVICE, requires_grad=True)
    for normalizer in (count, weight):
        got = _run_triton(logp, old_logp, advantages, mask, reduction=reduction,
                          normalizer=normalizer)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])
    assert weight.grad is None


def test_kl_term_off_without_coefficient_and_refused_without_reference():
    """kl_coef = 0: the plain policy loss, no pg_loss / kl stats. A kl_coef without ref_logp is
    an error (it used to drop the KL term without a word)."""
    shape = (3, 20)
    logp, old_logp, advantages = make_inputs(shape, torch.float32)
    mask = make_mask(shape, "random")
    plain = _run_triton(logp, old_logp, advantages, mask)
    got = _run_triton(logp, old_logp, advantages, mask, ref_logp=_ref_logp(logp), kl_coef=0.0)
    assert torch.equal(got[0], plain[0]) and torch.equal(got[2], plain[2])
    assert got[1].keys() == plain[1].keys()
    for backend in ("triton", "reference"):
        with pytest.raises(ValueError, match=r"kl_coef=0.5 but ref_logp is None.*pass ref_logp"):
            ppo_policy_loss(logp, old_logp, advantages, mask, kl_coef=0.5, backend=backend)
    _, stats, _ = _run_triton(logp, old_logp, advantages, mask, ref_logp=_ref_logp(logp),
                              kl_coef=0.5, dual_clip=3.0)
    assert set(stats) == set(plain[1]) | {"dual_clipfrac", "pg_loss", "kl"}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("reduction", ("seq-mean-token-mean", "token-sum"))
def test_critic_free_all_masked_and_padding_garbage(reduction):
    """An all-masked batch gives 0 (also divided by a normalizer); NaN / inf under the mask of
    logp, advantages and ref_logp changes nothing with the sequence ratio and the KL term."""
    shape = (4, 33)
    logp, old_logp, advantages = make_inputs(shape, torch.float32)
    ref = _ref_logp(logp)
    options = dict(ratio_level="sequence", dual_clip=3.0, kl_coef=0.1, kl_estimator="k3",
                   reduction=reduction, normalizer=torch.tensor(7.0, device=DEVICE))
    empty = torch.zeros(shape, dtype=torch.bool, device=DEVICE)
    loss, stats, grad = _run_triton(logp, old_logp, advantages[:, 0], empty, ref_logp=ref,
                                    **options)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    assert all(value.item() == 0.0 for value in stats.values())

    mask = make_mask(shape, "right")
    clean = _run_triton(logp, old_logp, advantages, mask, ref_logp=ref, **options)
    nan = torch.full_like(logp, float("nan"))
    dirty = _run_triton(logp.where(mask, nan), old_logp.where(mask, -nan.abs()),
                        advantages.where(mask, torch.full_like(logp, float("inf"))), mask,
                        ref_logp=ref.where(mask, nan), **options)
    assert torch.equal(dirty[0], clean[0]) and torch.equal(dirty[2], clean[2])
    for key in clean[1]:
        assert torch.equal(dirty[1][key], clean[1][key]), key


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(loss_type="grpo"), ValueError, r"loss_type='grpo' is not supported"),
    (dict(ratio_level="seq"), ValueError, r"ratio_level='seq' is not supported"),
    (dict(loss_type="cispo", dual_clip=3.0), ValueError, r"dual_clip applies to loss_type='ppo'"),
    (dict(kl_estimator="k4"), ValueError, r"kl_estimator='k4' is not supported"),
    (dict(normalizer=0.0), ValueError, r"normalizer must be > 0"),
    (dict(normalizer=float("nan")), ValueError, r"normalizer must be > 0"),
    (dict(normalizer=torch.ones(2)), ValueError, r"normalizer must be .* 0-d"),
    (dict(normalizer=torch.tensor(True)), ValueError, r"normalizer must be .* 0-d real"),
    (dict(normalizer="all"), TypeError, r"normalizer must be a number"),
    (dict(advantages=torch.zeros(3)), ValueError, r"advantages has shape \(3,\); expected one "
                                                  r"per token \(2, 3\) .* per sequence \(2,\)"),
    (dict(ref_logp=torch.zeros(2, 4), kl_coef=0.1), ValueError,
     r"ref_logp has shape \(2, 4\) but logp has shape \(2, 3\)"),
    (dict(ref_logp=torch.zeros(2, 3, dtype=torch.int32), kl_coef=0.1), ValueError,
     r"ref_logp must be a floating tensor"),
])
def test_critic_free_bad_input_raises(kwargs, error, match):
    args = dict(logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3), advantages=torch.zeros(2, 3))
    args.update(kwargs)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=match):
        ppo_policy_loss(**args, backend="triton")


def test_ref_logp_wanting_a_gradient_raises():
    logp, old_logp, advantages = make_inputs((2, 5), torch.float32)
    ref = _ref_logp(logp).requires_grad_()
    with pytest.raises(ValueError, match="ref_logp requires grad.*logp only"):
        ppo_policy_loss(logp.requires_grad_(), old_logp, advantages, ref_logp=ref, kl_coef=0.1,
                        backend="triton")


@pytest.mark.parametrize("normalizer", ["tensor", "float"])
def test_torch_compile_fullgraph_critic_free(normalizer):
    """GSPO with (B,) advantages, dual clip, the KL term and a normalizer: compiled (custom op,
    fake impl, backward through saved_grad_scale) equals eager, values and gradient."""
    shape = (3, 50)
    logp, old_logp, advantages = make_inputs(shape, torch.float32, spread=0.5)
    advantages = advantages[:, 0].contiguous()
    ref = _ref_logp(logp)
    mask = make_mask(shape, "right")
    norm = torch.tensor(60.0, device=DEVICE) if normalizer == "tensor" else 60.0

    def step(x, old, adv, m, ref_logp, n):
        loss, stats = ppo_policy_loss(x, old, adv, m, dual_clip=3.0, ratio_level="sequence",
                                      reduction="token-sum", normalizer=n, ref_logp=ref_logp,
                                      kl_coef=0.1, kl_estimator="k3", backend="triton")
        return loss * 2.0, stats["kl"], stats["clipfrac"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x_eager = logp.clone().requires_grad_()
    x_comp = logp.clone().requires_grad_()
    out_eager = step(x_eager, old_logp, advantages, mask, ref, norm)
    out_comp = compiled(x_comp, old_logp, advantages, mask, ref, norm)
    out_eager[0].backward()
    out_comp[0].backward()
    for got, expected in zip(out_comp, out_eager):
        assert torch.equal(got, expected)
    assert torch.equal(x_comp.grad, x_eager.grad)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("where", ("logp", "old_logp"))
@pytest.mark.parametrize("options", [
    dict(), dict(log_ratio_clamp=None), dict(ratio_level="sequence"),
    dict(loss_type="cispo"), dict(dual_clip=3.0, reduction="seq-mean-token-mean"),
], ids=str)
def test_nan_at_a_counted_token_is_not_hidden(where, options):
    """A NaN log-prob at a counted token makes the loss and the ratio stats NaN, as the
    reference: the log-ratio clamp and the ratio clip once returned the other operand of
    Triton's min / max for NaN, so the loss came out finite and plausible."""
    shape = (2, 5)
    logp, old_logp, advantages = make_inputs(shape, torch.float32)
    inputs = dict(logp=logp, old_logp=old_logp)
    inputs[where] = inputs[where].clone()
    inputs[where][0, 1] = float("nan")
    mask = torch.ones(shape, dtype=torch.bool, device=DEVICE)
    loss, stats = ppo_policy_loss(inputs["logp"], inputs["old_logp"], advantages, mask,
                                  backend="triton", **options)
    ref_loss, ref_stats = reference.ppo_policy_loss(
        inputs["logp"].double(), inputs["old_logp"].double(), advantages.double(), mask,
        **options)
    assert torch.isnan(ref_loss) and torch.isnan(loss)
    for name in ("approx_kl", "ppo_kl", "ratio_mean", "ratio_max"):
        assert torch.isnan(ref_stats[name]) and torch.isnan(stats[name]), name


@pytest.mark.parametrize("options", [dict(), dict(ref_logp="ref", kl_coef=0.1, dual_clip=3.0,
                                                  reduction="token-sum", normalizer=3.0)],
                         ids=["plain", "kl-dual-normalizer"])
def test_stats_edited_in_place_before_backward(options):
    """The returned stats are plain () tensors: editing them in place before the backward (a
    distributed all_reduce, a rescale) leaves the gradient unchanged. They were views of the
    tensor saved for the backward, so autograd raised 'modified by an inplace operation'."""
    logp, old_logp, advantages = make_inputs((2, 7), torch.float32)
    if options.get("ref_logp") == "ref":
        options = dict(options, ref_logp=_ref_logp(logp))
    assert_stats_editable(
        lambda x: ppo_policy_loss(x, old_logp, advantages, backend="triton", **options), logp,
        name="ppo_policy_loss")


# --------------------------------------------------------------------------------------------
# SAPO: the sigmoid gate in place of the clip, one temperature per sign of the advantage
# --------------------------------------------------------------------------------------------
def _sapo_closed_form(logp, old, adv, tau_pos, tau_neg):
    """One token, by hand: loss = -sigmoid(tau (r - 1)) 4 / tau A and d loss / d logp =
    -4 A r s (1 - s), tau by the sign of A (float64 Python arithmetic)."""
    import math

    r = math.exp(logp - old)
    tau = tau_pos if adv > 0 else tau_neg
    s = 1.0 / (1.0 + math.exp(-tau * (r - 1.0)))
    return -s * 4.0 / tau * adv, -4.0 * adv * r * s * (1.0 - s)


SAPO_CASES = [  # (shape, padding, ratio_level, per-sequence advantages, options)
    ((7,), "none", "token", False, dict()),
    ((6, 1), "random", "token", False, dict(sapo_tau_pos=0.5, sapo_tau_neg=3.0)),
    ((4, 257), "right", "token", True, dict(sapo_tau_pos=1.3, sapo_tau_neg=2.0)),
    ((3, 1025), "left", "sequence", True, dict()),
    ((2, 3, 40), "random", "sequence", False, dict(sapo_tau_neg=4.0, log_ratio_clamp=0.1)),
    ((5, 37), "right", "token", False, dict(log_ratio_clamp=0.25, ref_logp="ref", kl_coef=0.1,
                                             kl_estimator="k3")),
    ((5, 37), "right", "sequence", True, dict(normalizer="tensor", ref_logp="ref", kl_coef=0.1,
                                               kl_estimator="abs")),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,padding,ratio_level,per_sequence,options", SAPO_CASES, ids=str)
def test_sapo_matches_reference(reduction, dtype, shape, padding, ratio_level, per_sequence,
                                options):
    """Loss, stats and gradient against the float64 reference: both signs of A (and A = 0),
    masks with empty rows, awkward sizes, token and sequence ratios, the log-ratio clamp biting,
    the KL term and a tensor normalizer."""
    logp, old_logp, advantages = make_inputs(shape, dtype, spread=0.6)
    if per_sequence:
        advantages = advantages[..., 0].contiguous()
    advantages.view(-1)[:2] = 0.0  # tau_neg's side, a zero loss and gradient
    options = dict(options)
    if options.get("ref_logp") == "ref":
        options["ref_logp"] = _ref_logp(logp)
    if options.get("normalizer") == "tensor":
        options["normalizer"] = torch.tensor(23, device=DEVICE)
    check_against_reference(logp, old_logp, advantages, make_mask(shape, padding),
                            loss_type="sapo", ratio_level=ratio_level, reduction=reduction,
                            name=f"sapo {shape} {ratio_level}", **options)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_sapo_one_token_closed_form(backend):
    """Each token alone (token-sum over one valid token) against the hand formula, for A > 0
    (tau_pos), A < 0 and A = 0 (tau_neg), ratios below, at and above 1; at r = 1 the gradient is
    PPO's, -A, whatever tau."""
    tau_pos, tau_neg = 1.5, 2.5
    for adv in (0.7, -1.3, 0.0):
        for d in (-0.4, 0.0, 0.3, 2.0):
            old = -1.0
            logp = torch.tensor([[old + d, -2.0]], device=DEVICE, requires_grad=True)
            mask = torch.tensor([[True, False]], device=DEVICE)
            loss, _ = ppo_policy_loss(
                logp, torch.tensor([[old, 5.0]], device=DEVICE),
                torch.tensor([[adv, 9.0]], device=DEVICE), mask, reduction="token-sum",
                loss_type="sapo", sapo_tau_pos=tau_pos, sapo_tau_neg=tau_neg, backend=backend)
            loss.backward()
            want_loss, want_grad = _sapo_closed_form(old + d, old, adv, tau_pos, tau_neg)
            assert_close(loss, want_loss, atol=2e-6, rtol=1e-5, name=f"loss A={adv} d={d}")
            assert_close(logp.grad[0, 0], want_grad, atol=2e-6, rtol=1e-5,
                         name=f"grad A={adv} d={d}")
            assert logp.grad[0, 1].item() == 0.0
            if d == 0.0:
                assert_close(logp.grad[0, 0], -adv, atol=1e-6)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on inf
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_sapo_extreme_ratios(ratio_level):
    """Log-ratios of +-30, +-100 without a log-ratio clamp (TRL has none): the gate saturates,
    the loss is -4 A / tau or tends to -sigmoid(-tau) 4 A / tau, and the gradient is 0 or tiny,
    finite, as the float64 reference, also where exp overflows fp32 (r = inf: 0 * inf must not
    make a NaN)."""
    d = torch.tensor([[30.0, -30.0, 100.0, -100.0], [100.0, 0.5, -0.5, 88.0]], device=DEVICE)
    old = -torch.rand(2, 4, device=DEVICE) - 1.0
    logp = old + d
    adv = torch.tensor([[1.0, -2.0, -0.5, 0.3], [-1.0, 2.0, 0.7, 1.2]], device=DEVICE)
    options = dict(loss_type="sapo", log_ratio_clamp=None, ratio_level=ratio_level,
                   sapo_tau_pos=1.2, sapo_tau_neg=1.7)
    x = logp.clone().requires_grad_()
    loss, stats = ppo_policy_loss(x, old, adv, reduction="token-sum", backend="triton",
                                  **options)
    loss.backward()
    x64 = logp.double().requires_grad_()
    loss64, stats64 = reference.ppo_policy_loss(x64, old.double(), adv.double(),
                                                reduction="token-sum", **options)
    loss64.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert_close(loss, loss64, atol=1e-5, rtol=1e-6, name="loss")
    assert_close(x.grad, x64.grad, atol=1e-6, rtol=1e-5, name="grad")
    assert_close(stats["clipfrac"], stats64["clipfrac"], atol=0, name="clipfrac")


def test_sapo_per_sequence_advantages_equal_expanded_ones_bitwise():
    logp, old_logp, advantages = make_inputs((4, 33), torch.float32, spread=0.5)
    adv = advantages[:, 0].contiguous()
    mask = make_mask((4, 33), "right")
    for level in ("token", "sequence"):
        runs = []
        for a in (adv, adv[:, None].expand(-1, 33).contiguous()):
            x = logp.clone().requires_grad_()
            loss, stats = ppo_policy_loss(x, old_logp, a, mask, loss_type="sapo",
                                          ratio_level=level, backend="triton")
            loss.backward()
            runs.append((loss, stats, x.grad))
        (l1, s1, g1), (l2, s2, g2) = runs
        assert torch.equal(l1, l2) and torch.equal(g1, g2)
        assert all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sapo_tau_pos=0.0), ValueError, r"sapo_tau_pos=0.0 must be a finite number > 0"),
    (dict(sapo_tau_neg=-1.0), ValueError, r"sapo_tau_neg=-1.0 must be a finite number > 0"),
    (dict(sapo_tau_neg=float("nan")), ValueError, r"sapo_tau_neg=nan must be a finite"),
    (dict(sapo_tau_pos=float("inf")), ValueError, r"sapo_tau_pos=inf must be a finite"),
    (dict(sapo_tau_pos="1.0"), SettingError, r"sapo_tau_pos must be a real number or None, "
                                             r"got str"),
    (dict(sapo_tau_pos=True), SettingError, r"sapo_tau_pos must be a real number"),
    (dict(dual_clip=3.0), ValueError, r"dual_clip applies to loss_type='ppo' only; SAPO"),
    (dict(loss_type="ppo", sapo_tau_pos=1.0), ValueError,
     r"sapo_tau_pos=1.0 applies to loss_type='sapo' only \(got loss_type='ppo'\)"),
    (dict(loss_type="cispo", sapo_tau_neg=2.0), ValueError,
     r"sapo_tau_neg=2.0 applies to loss_type='sapo' only"),
])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_sapo_bad_settings_raise(kwargs, error, match, backend):
    args = dict(logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3), advantages=torch.zeros(2, 3),
                loss_type="sapo")
    args.update(kwargs)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=match):
        ppo_policy_loss(**args, backend=backend)


def test_sapo_settings_from_numpy_and_tensors():
    import numpy as np

    logp, old_logp, advantages = make_inputs((2, 9), torch.float32)
    want, _ = ppo_policy_loss(logp, old_logp, advantages, loss_type="sapo", sapo_tau_pos=1.5,
                              sapo_tau_neg=2.0, backend="triton")
    got, _ = ppo_policy_loss(logp, old_logp, advantages, loss_type="sapo",
                             sapo_tau_pos=np.float32(1.5), sapo_tau_neg=torch.tensor(2.0),
                             backend="triton")
    assert torch.equal(got, want)
    default, _ = ppo_policy_loss(logp, old_logp, advantages, loss_type="sapo", backend="triton")
    explicit, _ = ppo_policy_loss(logp, old_logp, advantages, loss_type="sapo",
                                  sapo_tau_pos=1.0, sapo_tau_neg=1.05, backend="triton")
    assert torch.equal(default, explicit)


def test_sapo_torch_compile_fullgraph_and_opcheck():
    """Compiled (custom op, fake impl, saved-gradient backward) equals eager, and opcheck
    accepts the custom op with SAPO's policy code and temperatures."""
    from rlhf_kernels.ops import policy_loss as module

    shape = (3, 50)
    logp, old_logp, advantages = make_inputs(shape, torch.float32, spread=0.5)
    mask = make_mask(shape, "right")

    def step(x, old, adv, m):
        loss, stats = ppo_policy_loss(x, old, adv, m, loss_type="sapo", sapo_tau_pos=1.3,
                                      sapo_tau_neg=2.0, reduction="seq-mean-token-mean",
                                      backend="triton")
        return loss * 2.0, stats["clipfrac"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x_eager = logp.clone().requires_grad_()
    x_comp = logp.clone().requires_grad_()
    out_eager = step(x_eager, old_logp, advantages, mask)
    out_comp = compiled(x_comp, old_logp, advantages, mask)
    out_eager[0].backward()
    out_comp[0].backward()
    for got, expected in zip(out_comp, out_eager):
        assert torch.equal(got, expected)
    assert torch.equal(x_comp.grad, x_eager.grad)
    for level_bit in (0, module._SEQUENCE):
        args = (logp.clone().requires_grad_(), old_logp, advantages, mask, None, None, 0.2, 0.2,
                None, 20.0, 1, module._SAPO | level_bit, 0.0, None, 1.3, 2.0)
        torch.library.opcheck(module._ppo_policy_loss_op, args)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_k3_small_log_ratios_to_a_few_ulps(backend, ratio_level):
    """The k3 term at |logp - ref_logp| in [1e-4, 2e-3] (near the reference policy, where
    e^-d + d - 1 in fp32 keeps few correct digits) against float64, masked: advantages 0 leave
    the KL term alone, token-sum with kl_coef 0.5 makes the loss 0.5 sum k3 and the gradient
    0.5 (1 - e^-d) per valid token, exactly 0 at masked ones. Bounds: test_kl_rewards.K3_RTOL
    per token, K3_SUM_RTOL for the sums."""
    from tests.kernels.test_kl_rewards import (
        K3_RTOL,
        K3_SUM_RTOL,
        assert_relative,
        k3_float64,
        tiny_log_ratios,
    )

    shape = (5, 97)
    logp, ref_logp = tiny_log_ratios(shape)
    mask = make_mask(shape, "random")
    mask[0] = False  # an all-masked row
    advantages = torch.zeros(shape, device=DEVICE)
    x = logp.clone().requires_grad_()
    loss, stats = ppo_policy_loss(x, logp, advantages, mask, reduction="token-sum",
                                  ratio_level=ratio_level, ref_logp=ref_logp, kl_coef=0.5,
                                  kl_estimator="k3", backend=backend)
    loss.backward()
    k3, slope = k3_float64(logp, ref_logp)
    k3_sum = k3[mask].sum()
    assert_relative(loss, 0.5 * k3_sum, K3_SUM_RTOL, "loss")
    assert_relative(stats["kl"], k3_sum, K3_SUM_RTOL, "kl stat")
    assert_relative(x.grad[mask], 0.5 * slope[mask], K3_RTOL, "d loss / d logp")
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))


def _kinds(t: torch.Tensor) -> torch.Tensor:
    """Per element: 0 finite, 1 +inf, 2 -inf, 3 NaN."""
    t = t.detach()
    return (torch.isposinf(t) * 1 + torch.isneginf(t) * 2 + torch.isnan(t) * 3).to(torch.int8)


_ZERO_NORMALIZER_CASES = [
    dict(kl_estimator=est, reduction=red)
    for est, red in (("k1", "token-mean"), ("k2", "seq-mean-token-mean"), ("k3", "token-sum"),
                     ("abs", "seq-mean-token-sum"))
] + [
    dict(kl_estimator="k3", ratio_level="sequence"),
    dict(kl_estimator="k1", loss_type="cispo"),
    dict(kl_estimator="k2", loss_type="sapo"),
    dict(kl_estimator="k3", dual_clip=3.0, reduction="seq-mean-token-sum-norm"),
]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.parametrize("path", ["eager", "custom op", "compiled"])
@pytest.mark.parametrize("options", _ZERO_NORMALIZER_CASES, ids=str)
def test_a_zero_normalizer_with_the_kl_term_gives_the_references_kinds(monkeypatch, path,
                                                                      options):
    """A tensor normalizer of 0, -0 or NaN with the KL term: the loss is the reference's
    pg_loss + kl_coef * kl of two quotients over 0 (+-inf each, NaN where they have opposite
    signs; the kernel gave the kind of the one sum's quotient, -inf for the reference's NaN),
    and each gradient element has the reference's kind: the N = 1 gradient over N, an exact 0
    kept (masked and clipped tokens, a 0 advantage, logp == ref_logp under k2 / k3 / abs),
    where autograd through the reference's division had made NaN of k3's finite derivative, of
    a 0 advantage's 0 and of a token's pg / KL derivatives of opposite signs. A -0 gave +inf for
    the reference's -inf (the kernels' denominator was 0 + normalizer, a +0)."""
    from rlhf_kernels.ops import policy_loss

    if path == "custom op":
        monkeypatch.setattr(policy_loss, "launch_directly", lambda *tensors: False)
    g = torch.Generator().manual_seed(11)
    B, T = 3, 6
    logp = (torch.randn(B, T, generator=g) - 2.0).to(DEVICE)
    old = (logp.cpu() + 0.4 * torch.randn(B, T, generator=g)).to(DEVICE)
    adv = torch.randn(B, T, generator=g).to(DEVICE)
    ref = (logp.cpu() + 0.4 * torch.randn(B, T, generator=g)).to(DEVICE)
    adv[0, 1] = 0.0  # a token whose policy term does not move
    ref[0, 2] = logp[0, 2]  # a KL derivative of 0 (k2, k3, abs) or 1 (k1)
    ref[2, 0] = logp[2, 0]
    adv[2, 0] = 0.0  # both 0: this token's gradient is 0
    mask = torch.ones(B, T, device=DEVICE)
    mask[1, 4:] = 0
    masked = mask == 0

    def op(x, n):
        return ppo_policy_loss(x, old, adv, mask, normalizer=n, ref_logp=ref, kl_coef=0.1,
                               backend="triton", **options)

    run = torch.compile(op, fullgraph=True, backend="aot_eager") if path == "compiled" else op
    for value in (0.0, -0.0, float("nan")):  # -0.0: x / -0 is -inf for x > 0
        x = logp.clone().requires_grad_()
        loss, stats = run(x, torch.tensor(value, device=DEVICE))
        loss.backward()
        x64 = logp.double().requires_grad_()
        want, want_stats = reference.ppo_policy_loss(
            x64, old.double(), adv.double(), mask, normalizer=torch.tensor(value).double(),
            ref_logp=ref.double(), kl_coef=0.1, **options)
        want.backward()
        what = (path, options, value)
        assert not torch.isfinite(want), what  # the case under test
        assert _kinds(loss).item() == _kinds(want).item(), (what, loss, want)
        for key in ("pg_loss", "kl"):
            assert _kinds(stats[key]).item() == _kinds(want_stats[key]).item(), (what, key)
        assert torch.equal(_kinds(x.grad), _kinds(x64.grad)), (what, x.grad, x64.grad)
        assert torch.equal(x.grad[masked], torch.zeros_like(x.grad[masked])), what
        if options["kl_estimator"] != "k1" and "ratio_level" not in options:
            # neither term moves (a GSPO token shares its row's policy gradient)
            assert x64.grad[2, 0] == 0 and x.grad[2, 0] == 0, what
        # the reference's loss is its stats' pg_loss + kl_coef * kl, as for any normalizer
        assert _kinds(want).item() == _kinds(want_stats["pg_loss"] + 0.1 * want_stats["kl"])


def test_the_references_tensor_normalizer_is_its_plain_formula_at_every_order():
    """The reference's rule for a tensor normalizer of 0 (``reference._tensor_normalizer``)
    leaves any other value to the plain formula: loss, gradient and second derivative (the
    reference backend is the one for higher-order gradients) with a tensor normalizer are those
    with the same number, bit for bit, for the policy and the value loss. A first version of the
    rule divided the gradient at the inputs always, which divided the second derivative twice."""
    g = torch.Generator().manual_seed(2)
    logp = torch.randn(3, 6, generator=g, dtype=torch.float64) - 1.0
    old = logp + 0.3 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 6, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 6, generator=g) > 0.3
    ops = {
        "policy": lambda x, n: reference.ppo_policy_loss(x, old, adv, mask, normalizer=n,
                                                         ref_logp=ref, kl_coef=0.1,
                                                         kl_estimator="k2")[0],
        "value": lambda x, n: reference.ppo_value_loss(x, old, adv, mask, normalizer=n)[0],
    }
    for name, op in ops.items():
        results = []
        for n in (7.0, torch.tensor(7.0, dtype=torch.float64), torch.tensor(7)):
            x = logp.clone().requires_grad_()
            loss = op(x, n)
            (grad,) = torch.autograd.grad(loss, x, create_graph=True)
            (second,) = torch.autograd.grad((grad * adv).sum(), x)
            results.append((loss, grad, second))
        for got in results[1:]:
            for a, b in zip(got, results[0]):
                assert torch.equal(a, b), name
        assert results[0][2].abs().sum() > 0, name  # the case under test


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_normalizer_made_under_inference_mode(backend):
    """A token count made under torch.inference_mode() (an inference tensor) as the normalizer
    of ppo_policy_loss, ppo_value_loss and ppo_loss_from_logits: the same loss and gradient as
    the same count made normally. The reference (also the path of fp64 inputs) divided by it in
    autograd, which saves the divisor, and raised 'Inference tensors cannot be saved for
    backward' (the 0-d tensor was used as it was when already in the loss's dtype)."""
    import rlhf_kernels as rk

    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 4, 5, generator=g).to(DEVICE)
    labels = torch.randint(0, 5, (2, 4), generator=g).to(DEVICE)
    logp = torch.randn(2, 4, generator=g).to(DEVICE) - 1.0
    old = logp + 0.3 * torch.randn(2, 4, generator=g).to(DEVICE)
    adv = torch.randn(2, 4, generator=g).to(DEVICE)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], device=DEVICE)
    ops = {
        "ppo_policy_loss": (lambda x, n: rk.ppo_policy_loss(
            x, old, adv, mask, normalizer=n, ref_logp=old, kl_coef=0.1, backend=backend), logp),
        "ppo_value_loss": (lambda x, n: rk.ppo_value_loss(x, old, adv, mask, normalizer=n,
                                                          backend=backend), logp),
        "ppo_loss_from_logits": (lambda x, n: rk.ppo_loss_from_logits(
            x, labels, old, adv, mask, normalizer=n, entropy_coef=0.01, backend=backend), logits),
    }
    for dtype in (torch.float32, torch.float64, torch.int64):
        with torch.inference_mode():
            made_there = torch.tensor(6, device=DEVICE).to(dtype)
        for name, (op, first) in ops.items():
            results = []
            for n in (made_there, torch.tensor(6, device=DEVICE).to(dtype)):
                x = first.clone().requires_grad_()
                loss, _ = op(x, n)
                loss.backward()
                results.append((loss.detach(), x.grad))
            assert torch.equal(results[0][0], results[1][0]), (name, dtype)
            assert torch.equal(results[0][1], results[1][1]), (name, dtype)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3", "abs"])
def test_an_infinite_ref_logp_at_a_counted_token(ratio_level, kl_estimator):
    """ref_logp = -inf (the reference model gives the sampled token no mass) or +inf at a counted
    token: loss, KL stat and gradient as the float64 reference's. k1's derivative is 1 whatever
    logp - ref_logp is; the kernel made it as d * 0 + 1, NaN there, so that token's gradient
    was NaN where the reference's is finite."""
    g = torch.Generator().manual_seed(6)
    logp = torch.randn(2, 4, generator=g).to(DEVICE) - 2.0
    old = logp + 0.2 * torch.randn(2, 4, generator=g).to(DEVICE)
    adv = torch.randn(2, 4, generator=g).to(DEVICE)
    for value in (float("-inf"), float("inf")):
        ref = logp + 0.3 * torch.randn(2, 4, generator=g).to(DEVICE)
        ref[0, 1] = value
        results = []
        for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
            x = logp.to(dtype).clone().requires_grad_()
            loss, stats = ppo_policy_loss(x, old.to(dtype), adv.to(dtype), ref_logp=ref.to(dtype),
                                          kl_coef=0.1, kl_estimator=kl_estimator,
                                          ratio_level=ratio_level, backend=backend)
            loss.backward()
            results.append((loss.detach().double(), stats["kl"].double(), x.grad.double()))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True,
                                       msg=lambda m: f"{value}: {m}")
