"""ppo_value_loss: the fused Triton kernel against the float64 reference.

Values, stats and gradients (random upstream gradient) over reductions x dtypes x shapes /
padding x clip, closed-form cases, empty masks, strided inputs, bad input and torch.compile.
"""

import pytest
import torch

from rlhf_kernels import reference
from rlhf_kernels.ops.value_loss import ppo_value_loss
from tests.kernels.test_policy_loss import make_mask
from tests.numerics import DEVICE, assert_close, assert_close_2x, assert_stats_editable

REDUCTIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
              "token-sum")
DTYPES = (torch.float32, torch.bfloat16)


def make_inputs(shape, dtype, return_offset=0.0):
    values = torch.randn(shape, device=DEVICE).to(dtype)
    # Old values within ~ +-0.4 of the new ones, so that a clip of 0.2 bites on about half.
    old_values = (values.float() + 0.3 * torch.randn(shape, device=DEVICE)).to(dtype)
    returns = (torch.randn(shape, device=DEVICE) + return_offset).to(dtype)
    return values, old_values, returns


def check_against_reference(values, old_values, returns, mask, name="", **options):
    dtype = values.dtype
    upstream = torch.randn((), device=DEVICE)

    x = values.clone().requires_grad_()
    loss, stats = ppo_value_loss(x, old_values, returns, mask, backend="triton", **options)
    (loss * upstream).backward()

    x64 = values.double().requires_grad_()
    loss64, stats64 = reference.ppo_value_loss(x64, old_values.double(), returns.double(), mask,
                                               **options)
    (loss64 * upstream.double()).backward()

    xt = values.clone().requires_grad_()
    loss_t, stats_t = reference.ppo_value_loss(xt, old_values, returns, mask, **options)
    (loss_t * upstream).backward()

    assert loss.dtype == torch.float32 and loss.shape == ()
    scale = max(1.0, abs(loss64.item()))
    assert_close_2x(loss, loss_t, loss64, dtype, atol_scale=scale, name=f"{name} loss")
    assert x.grad.dtype == dtype
    assert_close_2x(x.grad, xt.grad, x64.grad, dtype, name=f"{name} grad")
    assert set(stats) == set(stats64)
    for key in stats64:
        assert not stats[key].requires_grad
        ref_scale = max(1.0, abs(stats64[key].item()))
        assert_close_2x(stats[key], stats_t[key], stats64[key], dtype, atol_scale=ref_scale,
                        name=f"{name} {key}")


CASES = [
    ((7,), "none"),
    ((6, 1), "random"),
    ((4, 257), "right"),
    ((3, 1025), "left"),
    ((2, 3, 40), "random"),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,padding", CASES, ids=str)
def test_matches_reference(reduction, dtype, shape, padding):
    values, old_values, returns = make_inputs(shape, dtype)
    mask = make_mask(shape, padding)
    for clip in (0.2, None):
        check_against_reference(values, old_values, returns, mask, reduction=reduction,
                                clip=clip, name=f"{reduction} {shape} {padding} clip={clip}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip", [0.0, 0.05, 10.0])
def test_clip_values(dtype, clip):
    shape = (5, 257)
    values, old_values, returns = make_inputs(shape, dtype)
    check_against_reference(values, old_values, returns, make_mask(shape, "right"), clip=clip,
                            name=f"clip={clip}")


def test_explained_variance_with_large_return_mean():
    """Returns around 1000 with unit spread: a one-pass E[x^2] - E[x]^2 in fp32 would lose the
    variance entirely; the Welford / Chan merge keeps it."""
    shape = (6, 1025)
    values, old_values, returns = make_inputs(shape, torch.float32, return_offset=1000.0)
    values = values + 1000.0
    old_values = old_values + 1000.0
    mask = make_mask(shape, "right")
    _, stats = ppo_value_loss(values, old_values, returns, mask, backend="triton")
    _, stats64 = reference.ppo_value_loss(values.double(), old_values.double(), returns.double(),
                                          mask)
    assert_close(stats["explained_variance"], stats64["explained_variance"], atol=1e-3)
    assert_close(stats["return_mean"], stats64["return_mean"], atol=1e-3)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_masked_batch_gives_zero_loss_and_grad(reduction):
    values, old_values, returns = make_inputs((3, 33), torch.float32)
    mask = torch.zeros(3, 33, dtype=torch.bool, device=DEVICE)
    x = values.clone().requires_grad_()
    loss, stats = ppo_value_loss(x, old_values, returns, mask, reduction=reduction,
                                 backend="triton")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))
    for key, value in stats.items():
        assert value.item() == 0.0, key


# --------------------------------------------------------------------------------------------
# closed-form cases
# --------------------------------------------------------------------------------------------
def test_hand_worked_tokens():
    """clip = 0.5, token-mean over 3 tokens:

    v = 2, old = 0, R = 0   -> v_c = 0.5: l1 = 4 > l2 = 0.25, loss 2, gradient v - R = 2
    v = 2, old = 0, R = 3   -> v_c = 0.5: l2 = 6.25 > l1 = 1, loss 3.125, gradient 0 (clipped)
    v = 1, old = 0.8, R = 0 -> within the clip: loss 0.5, gradient 1
    """
    values = torch.tensor([2.0, 2.0, 1.0], device=DEVICE)
    old = torch.tensor([0.0, 0.0, 0.8], device=DEVICE)
    returns = torch.tensor([0.0, 3.0, 0.0], device=DEVICE)
    x = values.clone().requires_grad_()
    loss, stats = ppo_value_loss(x, old, returns, clip=0.5, backend="triton")
    loss.backward()
    assert_close(loss, torch.tensor((2.0 + 3.125 + 0.5) / 3), atol=1e-6)
    assert_close(x.grad, torch.tensor([2.0, 0.0, 1.0]) / 3, atol=1e-7, name="grad")
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["value_mean"].item() == pytest.approx(5 / 3)
    assert stats["return_mean"].item() == pytest.approx(1.0)
    # errors R - v = (-2, 1, -1): Var = 14/9; Var(R) = 2 -> EV = 1 - 7/9
    assert stats["explained_variance"].item() == pytest.approx(2 / 9, abs=1e-6)


def test_tie_splits_the_gradient_like_torch_maximum():
    # v = 2, old = 0, clip = 0.5 -> v_c = 0.5; R = 1.25 is the midpoint, so l1 == l2 = 0.5625
    # exactly and torch.maximum sends half the gradient each way: (v - R) / 2 + 0 / 2.
    x = torch.tensor([2.0], device=DEVICE, requires_grad=True)
    old = torch.tensor([0.0], device=DEVICE)
    returns = torch.tensor([1.25], device=DEVICE)
    loss, stats = ppo_value_loss(x, old, returns, clip=0.5, backend="triton")
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    reference.ppo_value_loss(x64, old.double(), returns.double(), clip=0.5)[0].backward()
    assert loss.item() == 0.5 * 0.5625 and stats["clipfrac"].item() == 0.0
    assert x.grad.item() == x64.grad.item() == 0.375


def test_perfect_values():
    returns = torch.randn(4, 30, device=DEVICE)
    x = returns.clone().requires_grad_()
    loss, stats = ppo_value_loss(x, returns.clone(), returns, backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    assert stats["explained_variance"].item() == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------------------------
# layouts, bad input, torch.compile
# --------------------------------------------------------------------------------------------
def test_strided_inputs():
    B, T = 4, 37
    base = torch.randn(B, 2 * T, device=DEVICE)
    values = base[:, ::2]
    old_values = (base + 0.3 * torch.randn_like(base)).t().contiguous().t()[:, 1::2]
    returns = torch.randn(3, B, 2, T, device=DEVICE)[1, :, 0]
    check_against_reference(values, old_values, returns, make_mask((B, T), "left").float(),
                            reduction="seq-mean-token-mean", name="strided")


@pytest.mark.parametrize("kwargs,match", [
    (dict(old_values=torch.zeros(2, 4)), r"old_values has shape \(2, 4\) but values has shape"),
    (dict(returns=torch.zeros(3)), r"returns has shape \(3,\)"),
    (dict(mask=torch.ones(3, 2)), r"mask has shape \(3, 2\)"),
    (dict(reduction="sum"), r"reduction='sum' is not supported"),
    (dict(clip=-1.0), r"clip=-1.0 must be >= 0"),
    (dict(values=torch.zeros(())), r"at least one dim"),
])
def test_bad_input_raises(kwargs, match):
    args = dict(values=torch.zeros(2, 3), old_values=torch.zeros(2, 3), returns=torch.zeros(2, 3))
    args.update(kwargs)
    if args["values"].dim() == 0:
        args.update(old_values=torch.zeros(()), returns=torch.zeros(()))
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        ppo_value_loss(**args, backend="triton")


# --------------------------------------------------------------------------------------------
# normalizer= (a step's count in place of the reduction's outer denominator)
# --------------------------------------------------------------------------------------------
def _value_loss_over_count(values, old_values, returns, mask, clip, reduction, count):
    """float64, written out: 1/2 max((v - R)^2, (o + clip(v - o, +-clip) - R)^2) per counted
    token, each row's tokens weighted 1 / (its tokens) for seq-mean-token-mean and 1 otherwise,
    summed and divided by ``count``."""
    v, o, R = values.double(), old_values.double(), returns.double()
    per_token = 0.5 * torch.maximum((v - R) ** 2, (o + (v - o).clamp(-clip, clip) - R) ** 2)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    if reduction == "seq-mean-token-mean":
        per_token = per_token / mask.sum(-1, keepdim=True).clamp_min(1)
    return per_token.sum() / count


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_normalizer_replaces_the_outer_denominator(reduction):
    """normalizer=N divides the (row-weighted) token sum by N whatever the reduction, as for
    the policy loss: loss and gradient against the float64 formula, NaN padding under the mask
    ignored. N as a number, a 0-d int64 tensor (a token count, read on the device) and a 0-d
    float tensor that requires grad (no gradient flows into it) give the same bits, gradient
    included."""
    shape = (3, 37)
    values, old_values, returns = make_inputs(shape, torch.float32)
    mask = make_mask(shape, "right")
    values = values.masked_fill(~mask, float("nan"))
    count = 50
    weight = torch.tensor(float(count), device=DEVICE, requires_grad=True)
    upstream = torch.randn((), device=DEVICE)
    results = []
    for normalizer in (float(count), torch.tensor(count, device=DEVICE), weight):
        x = values.clone().requires_grad_()
        loss, _ = ppo_value_loss(x, old_values, returns, mask, 0.2, reduction, normalizer,
                                 backend="triton")
        (loss * upstream).backward()
        results.append((loss.detach(), x.grad))
    assert weight.grad is None
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])
    loss, grad = results[0]
    x64 = values.double().requires_grad_()
    want = _value_loss_over_count(x64, old_values, returns, mask, 0.2, reduction, count)
    (want * upstream.double()).backward()
    assert_close(loss, want, atol=1e-6)
    assert_close(grad, torch.where(mask, x64.grad, 0.0), atol=1e-6)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))


@pytest.mark.parametrize("reduction", ["token-mean", "seq-mean-token-sum",
                                       "seq-mean-token-sum-norm", "token-sum"])
def test_normalizer_rounds_the_loss_once(reduction):
    """Per-token losses that fp32 holds exactly (errors v - R of -5..5, halved squares summing
    to 36.5 over 7 tokens in 3 of 4 rows, T = 5): the loss with normalizer=23 is 36.5 / 23
    rounded to fp32 once, whatever the reduction's own denominator (7, 3, 5, 1), and the
    gradient is the error times fp32(1 / 23). Dividing the reduction's own mean by 23 / 7 (3,
    5) instead would round twice: a different fp32 loss for each of these denominators."""
    errors = [[5.0, -4.0, 3.0], [-3.0], [3.0, -2.0, 1.0], []]
    T, n = 5, 23
    err = torch.zeros(len(errors), T)
    mask = torch.zeros(len(errors), T, dtype=torch.bool)
    for row, row_errors in enumerate(errors):
        err[row, :len(row_errors)] = torch.tensor(row_errors)
        mask[row, :len(row_errors)] = True
    returns = torch.randint(-8, 9, (len(errors), T)).float() / 4
    values = (returns + err).masked_fill(~mask, float("nan"))
    err, mask, returns, values = (t.to(DEVICE) for t in (err, mask, returns, values))
    for normalizer in (float(n), torch.tensor(n, device=DEVICE)):
        x = values.clone().requires_grad_()
        loss, _ = ppo_value_loss(x, values, returns, mask, None, reduction, normalizer,
                                 backend="triton")
        loss.backward()
        assert loss.item() == torch.tensor(36.5 / n, dtype=torch.float64).float().item()
        scale = torch.tensor(1.0 / n, dtype=torch.float64).float()
        assert torch.equal(x.grad, err * scale.to(DEVICE))


@pytest.mark.parametrize("reduction", ["token-mean", "seq-mean-token-sum",
                                       "seq-mean-token-sum-norm"])
def test_normalizer_equal_to_the_own_denominator_gives_the_same_bits(reduction):
    """A normalizer equal to the reduction's own outer denominator (the tokens, the rows with a
    token, T) gives the loss and gradient of no normalizer bit for bit: one micro-batch making
    the whole step, a trainer's step count is that micro-batch's own."""
    shape = (4, 29)
    values, old_values, returns = make_inputs(shape, torch.float32)
    mask = make_mask(shape, "left")
    own = {"token-mean": mask.sum(), "seq-mean-token-sum": mask.any(-1).sum(),
           "seq-mean-token-sum-norm": torch.tensor(shape[-1])}[reduction]
    results = []
    for normalizer in (None, float(own), own):
        x = values.clone().requires_grad_()
        loss, _ = ppo_value_loss(x, old_values, returns, mask, 0.2, reduction, normalizer,
                                 backend="triton")
        loss.backward()
        results.append((loss.detach(), x.grad))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("normalizer,error,match", [
    (0.0, ValueError, r"normalizer must be > 0"),
    (float("nan"), ValueError, r"normalizer must be > 0 and finite.*got nan"),
    (float("inf"), ValueError, r"normalizer must be > 0 and finite.*got inf"),
    (torch.ones(2), ValueError, r"normalizer must be .* 0-d"),
    ("all", TypeError, r"normalizer must be a number"),
])
def test_bad_normalizer_raises(normalizer, error, match):
    values, old_values, returns = make_inputs((2, 3), torch.float32)
    for backend in ("triton", "reference"):
        with pytest.raises(error, match=match):
            ppo_value_loss(values, old_values, returns, normalizer=normalizer, backend=backend)


def test_torch_compile_with_a_tensor_normalizer():
    """A step's token count as a 0-d tensor goes through the custom op under torch.compile
    (fullgraph): loss and gradient as in eager mode."""
    shape = (3, 20)
    values, old_values, returns = make_inputs(shape, torch.float32)
    mask = make_mask(shape, "right")

    def step(x, old, ret, m, count):
        return ppo_value_loss(x, old, ret, m, normalizer=count, backend="triton")[0]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    count = mask.sum() + 7
    x_eager, x_comp = values.clone().requires_grad_(), values.clone().requires_grad_()
    loss_eager, loss_comp = step(x_eager, old_values, returns, mask, count), compiled(
        x_comp, old_values, returns, mask, count)
    loss_eager.backward()
    loss_comp.backward()
    assert_close(loss_comp, loss_eager, atol=1e-6)
    assert_close(x_comp.grad, x_eager.grad, atol=1e-7)


def test_gradient_wanted_for_returns_raises():
    values, old_values, returns = make_inputs((2, 5), torch.float32)
    with pytest.raises(ValueError, match="returns requires grad.*values only"):
        ppo_value_loss(values, old_values, returns.requires_grad_(), backend="triton")


def test_torch_compile_fullgraph():
    shape = (3, 50)
    values, old_values, returns = make_inputs(shape, torch.float32)
    mask = make_mask(shape, "right")

    def step(x, old, ret, m):
        loss, stats = ppo_value_loss(x, old, ret, m, reduction="seq-mean-token-sum",
                                     backend="triton")
        return 0.5 * loss, stats["explained_variance"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x_eager = values.clone().requires_grad_()
    x_comp = values.clone().requires_grad_()
    loss_eager, ev_eager = step(x_eager, old_values, returns, mask)
    loss_comp, ev_comp = compiled(x_comp, old_values, returns, mask)
    loss_eager.backward()
    loss_comp.backward()
    assert_close(loss_comp, loss_eager, atol=1e-6)
    assert_close(ev_comp, ev_eager, atol=0)
    assert_close(x_comp.grad, x_eager.grad, atol=1e-7)


@pytest.mark.parametrize("where", ("values", "old_values"))
def test_nan_at_a_counted_token_is_not_hidden(where):
    """A NaN value or old value at a counted token makes the clipped loss NaN, as the
    reference (the clamp and the max of the two losses once dropped the NaN operand)."""
    shape = (2, 5)
    inputs = dict(zip(("values", "old_values", "returns"), make_inputs(shape, torch.float32)))
    inputs[where] = inputs[where].clone()
    inputs[where][1, 2] = float("nan")
    loss, _ = ppo_value_loss(**inputs, clip=0.2, backend="triton")
    ref_loss, _ = reference.ppo_value_loss(*(inputs[k].double() for k in
                                             ("values", "old_values", "returns")), clip=0.2)
    assert torch.isnan(ref_loss) and torch.isnan(loss)


def test_stats_edited_in_place_before_backward():
    """Editing the returned stats in place before the backward leaves the gradient unchanged
    (they were views of the tensor saved for the backward: autograd refused the edit)."""
    values, old_values, returns = make_inputs((2, 7), torch.float32)
    assert_stats_editable(lambda x: ppo_value_loss(x, old_values, returns, backend="triton"),
                          values, name="ppo_value_loss")
