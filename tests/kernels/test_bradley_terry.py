"""bradley_terry_loss: the fused Triton kernel against the float64 reference.

Values, stats and gradients of both rewards (random upstream gradient) over dtypes x sizes x
margin kinds x centering, closed-form cases, extreme reward gaps, strided inputs, bad input and
torch.compile.
"""

import math

import pytest
import torch

from rlhf_kernels import reference
from rlhf_kernels.ops.bradley_terry import bradley_terry_loss
from tests.numerics import DEVICE, assert_close, assert_close_2x, assert_stats_editable

DTYPES = (torch.float32, torch.bfloat16)
SHAPES = [(1,), (7,), (257,), (3, 1025)]  # (3, 1025): several programs in the forward


def make_margin(kind: str, shape):
    if kind == "none":
        return None
    if kind == "float":
        return 0.5
    if kind == "scalar-tensor":
        return torch.tensor(0.25, device=DEVICE)
    if kind == "per-pair":
        return torch.rand(shape, device=DEVICE)
    # "broadcast": one margin per leading row
    return torch.rand(shape[:-1] + (1,), device=DEVICE)


def check_against_reference(chosen, rejected, margin, center_coef, name=""):
    dtype = chosen.dtype
    upstream = torch.randn((), device=DEVICE)

    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    loss, stats = bradley_terry_loss(c, r, margin, center_coef, backend="triton")
    (loss * upstream).backward()

    margin64 = margin.double() if isinstance(margin, torch.Tensor) else margin
    c64, r64 = chosen.double().requires_grad_(), rejected.double().requires_grad_()
    loss64, stats64 = reference.bradley_terry_loss(c64, r64, margin64, center_coef)
    (loss64 * upstream.double()).backward()

    ct, rt = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    loss_t, stats_t = reference.bradley_terry_loss(ct, rt, margin, center_coef)
    (loss_t * upstream).backward()

    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close_2x(loss, loss_t, loss64, dtype, name=f"{name} loss")
    assert c.grad.dtype == dtype and r.grad.dtype == dtype
    assert_close_2x(c.grad, ct.grad, c64.grad, dtype, name=f"{name} grad chosen")
    assert_close_2x(r.grad, rt.grad, r64.grad, dtype, name=f"{name} grad rejected")
    assert set(stats) == set(stats64)
    for key in stats64:
        assert not stats[key].requires_grad
        assert_close_2x(stats[key], stats_t[key], stats64[key], dtype, name=f"{name} {key}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("margin_kind", ["none", "float", "scalar-tensor", "per-pair",
                                         "broadcast"])
def test_matches_reference(dtype, shape, margin_kind):
    chosen = (2 * torch.randn(shape, device=DEVICE)).to(dtype)
    rejected = (2 * torch.randn(shape, device=DEVICE)).to(dtype)
    margin = make_margin(margin_kind, shape)
    for center_coef in (0.0, 0.01):
        check_against_reference(chosen, rejected, margin, center_coef,
                                name=f"{shape} margin={margin_kind} center={center_coef}")


def test_extreme_reward_gaps_stay_finite_and_accurate():
    # |z| up to 200: softplus must neither overflow (e^200) nor lose the e^-z tail.
    chosen = torch.tensor([200.0, -200.0, 30.0, -30.0, 1e-3, 0.0], device=DEVICE)
    rejected = torch.zeros_like(chosen)
    check_against_reference(chosen, rejected, None, 0.0, name="extreme")
    # z = 30: the loss is log1p(e^-30) ~ 9.4e-14, far below fp32's epsilon relative to 1.
    loss, _ = bradley_terry_loss(chosen[2:3], rejected[2:3], backend="triton")
    assert loss.item() == pytest.approx(math.exp(-30.0), rel=1e-5, abs=0)


def test_strided_pairs():
    # The usual layout: rewards (B, 2) from one forward pass, chosen = [:, 0], rejected = [:, 1].
    rewards = torch.randn(33, 2, device=DEVICE)
    check_against_reference(rewards[:, 0], rewards[:, 1], torch.rand(66, device=DEVICE)[::2],
                            0.05, name="strided")


# --------------------------------------------------------------------------------------------
# closed-form cases
# --------------------------------------------------------------------------------------------
def test_equal_rewards():
    """r_c == r_r: each pair costs log 2 and pulls chosen up / rejected down by 1/2 per pair."""
    n = 5
    c = torch.full((n,), 0.7, device=DEVICE, requires_grad=True)
    r = torch.full((n,), 0.7, device=DEVICE, requires_grad=True)
    loss, stats = bradley_terry_loss(c, r, backend="triton")
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2.0))
    assert_close(c.grad, torch.full((n,), -0.5 / n), atol=1e-7, name="chosen")
    assert_close(r.grad, torch.full((n,), 0.5 / n), atol=1e-7, name="rejected")
    assert stats["accuracy"].item() == 0.0 and stats["reward_margin"].item() == 0.0


def test_margin_and_centering_hand_worked():
    # One pair, r_c = 1, r_r = 0, margin 1 -> z = 0: loss log 2 + coef * 1^2; gradients
    # -1/2 + 2 coef and +1/2 + 2 coef; accuracy ignores the margin (1 > 0).
    c = torch.tensor([1.0], device=DEVICE, requires_grad=True)
    r = torch.tensor([0.0], device=DEVICE, requires_grad=True)
    loss, stats = bradley_terry_loss(c, r, margin=1.0, center_coef=0.1, backend="triton")
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2.0) + 0.1)
    assert c.grad.item() == pytest.approx(-0.5 + 0.2)
    assert r.grad.item() == pytest.approx(0.5 + 0.2)
    assert stats["accuracy"].item() == 1.0 and stats["reward_margin"].item() == 1.0
    assert stats["chosen_mean"].item() == 1.0 and stats["rejected_mean"].item() == 0.0


# --------------------------------------------------------------------------------------------
# bad input, torch.compile
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(rejected_rewards=torch.zeros(4)), r"rejected_rewards has shape \(4,\) but "
                                            r"chosen_rewards has shape \(3,\)"),
    (dict(chosen_rewards=torch.zeros(0), rejected_rewards=torch.zeros(0)), r"at least one"),
    (dict(margin=torch.zeros(2)), r"margin has shape \(2,\), which does not broadcast"),
    (dict(margin=torch.zeros(1, 3)), r"margin has shape \(1, 3\)"),
    (dict(chosen_rewards=torch.zeros(3, dtype=torch.int32)), r"chosen_rewards must be a floating"),
    (dict(margin=torch.zeros(3, requires_grad=True)), r"margin requires grad"),
])
def test_bad_input_raises(kwargs, match):
    args = dict(chosen_rewards=torch.zeros(3), rejected_rewards=torch.zeros(3))
    args.update(kwargs)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        bradley_terry_loss(**args, backend="triton")


def test_torch_compile_fullgraph():
    chosen = torch.randn(40, device=DEVICE)
    rejected = torch.randn(40, device=DEVICE)
    margin = torch.rand(40, device=DEVICE)

    def step(c, r, m):
        loss, stats = bradley_terry_loss(c, r, m, center_coef=0.01, backend="triton")
        return loss + 1.0, stats["accuracy"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_in = [chosen.clone().requires_grad_(), rejected.clone().requires_grad_()]
    comp_in = [chosen.clone().requires_grad_(), rejected.clone().requires_grad_()]
    loss_eager, acc_eager = step(*eager_in, margin)
    loss_comp, acc_comp = compiled(*comp_in, margin)
    loss_eager.backward()
    loss_comp.backward()
    assert_close(loss_comp, loss_eager, atol=1e-6)
    assert_close(acc_comp, acc_eager, atol=0)
    for a, b in zip(comp_in, eager_in):
        assert_close(a.grad, b.grad, atol=1e-7)


@pytest.mark.parametrize("rejected_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_stats_edited_in_place_before_backward(rejected_dtype):
    """Editing the returned stats in place before the backward leaves both gradients unchanged
    (they were views of the tensor saved for the backward: autograd refused the edit)."""
    chosen = torch.randn(6, device=DEVICE)
    rejected = torch.randn(6, device=DEVICE).to(rejected_dtype)
    assert_stats_editable(
        lambda c, r: bradley_terry_loss(c, r, center_coef=0.1, backend="triton"), chosen,
        rejected, name="bradley_terry_loss")


@pytest.mark.parametrize("custom_op", [False, True])
def test_a_second_derivative_is_refused_on_both_paths(monkeypatch, custom_op):
    """The gradient is the saved one times the upstream gradient: differentiating it again would
    treat the saved gradient as a constant (a silently wrong second derivative). Both the eager
    Function and the custom op (torch.compile's path, whose backward is a torch multiply too)
    refuse it by name; a plain backward is unaffected."""
    from rlhf_kernels.ops import bradley_terry as bt

    if custom_op:
        monkeypatch.setattr(bt, "launch_directly", lambda *tensors: False)
    chosen = torch.randn(6, device=DEVICE, requires_grad=True)
    rejected = torch.randn(6, device=DEVICE, requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, rejected, backend="triton")
    (grad,) = torch.autograd.grad(loss, chosen, create_graph=True)
    assert grad.requires_grad  # (plain torch ops would give a gradient without this history)
    with pytest.raises(RuntimeError, match="bradley_terry_loss: its gradient is not different"):
        grad.pow(2).sum().backward()  # e.g. a gradient penalty
    loss, _ = bradley_terry_loss(chosen, rejected, backend="triton")
    loss.backward()
    assert chosen.grad is not None and rejected.grad is not None


@pytest.mark.parametrize("custom_op", [False, True])
def test_a_second_derivative_by_autograd_grad_is_refused_on_both_paths(monkeypatch, custom_op):
    """torch.autograd.grad(penalty + other, inputs, allow_unused=True) runs only the nodes on
    a path to ``inputs``: the error node must lie on one, or the penalty's second-order term is
    silently dropped (the result was ``other``'s gradient alone: ones)."""
    from rlhf_kernels.ops import bradley_terry as bt

    if custom_op:
        monkeypatch.setattr(bt, "launch_directly", lambda *tensors: False)
    chosen = torch.randn(6, device=DEVICE, requires_grad=True)
    rejected = torch.randn(6, device=DEVICE, requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, rejected, backend="triton")
    (grad,) = torch.autograd.grad(loss, chosen, create_graph=True)
    with pytest.raises(RuntimeError, match="bradley_terry_loss: its gradient is not different"):
        torch.autograd.grad(grad.square().sum() + chosen.sum(), chosen, allow_unused=True)


@pytest.mark.filterwarnings("ignore:rlhf_kernels. under torch.func:RuntimeWarning")
def test_the_eager_path_applies_its_function_natively_and_only_where_that_is_the_same():
    """The eager path calls autograd's native apply (``backend.direct_apply``), skipping
    ``Function.apply``'s Python layer, which only matters for a Function with ``setup_context``
    or under torch.func transforms. The op's Function defines none and the eager path is taken
    only outside transforms (``launch_directly``); a Function that defines one is refused, and
    under ``torch.func.grad`` the op still gives the float64 reference's gradient."""
    from rlhf_kernels import backend
    from rlhf_kernels.ops import bradley_terry as bt

    assert bt._apply_bradley_terry.__self__ is bt._BradleyTerryFunction

    class WithSetupContext(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

    with pytest.raises(TypeError, match="WithSetupContext defines setup_context"):
        backend.direct_apply(WithSetupContext)
    chosen = torch.randn(9, device=DEVICE, dtype=torch.float64)
    rejected = torch.randn(9, device=DEVICE)
    grad = torch.func.grad(lambda c: bradley_terry_loss(c.float(), rejected)[0])(chosen)
    expected = torch.func.grad(
        lambda c: reference.bradley_terry_loss(c, rejected.double())[0])(chosen)
    assert_close(grad, expected, atol=1e-7)


@pytest.mark.parametrize("center_coef", [0.0, 0.1])
def test_an_infinite_reward(center_coef):
    """A reward of +-inf in one pair (a diverging reward model): loss and both gradients as the
    float64 reference's. Without centering, a chosen reward of +inf adds 0 to the loss and its
    pair gets a zero gradient, -inf adds inf with a finite gradient; the kernel's centering
    gradient 2 * center_coef * (r_c + r_r) was 0 * inf = NaN there, so the pair's gradient was
    NaN. With centering the term is inf (its gradient too) on both paths."""
    g = torch.Generator().manual_seed(4)
    chosen = torch.randn(5, generator=g).to(DEVICE)
    rejected = torch.randn(5, generator=g).to(DEVICE)
    for where, value in (("chosen", math.inf), ("chosen", -math.inf), ("rejected", math.inf),
                         ("rejected", -math.inf)):
        inputs = {"chosen": chosen.clone(), "rejected": rejected.clone()}
        inputs[where][2] = value
        results = []
        for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
            c = inputs["chosen"].to(dtype).clone().requires_grad_()
            r = inputs["rejected"].to(dtype).clone().requires_grad_()
            loss, _ = bradley_terry_loss(c, r, center_coef=center_coef, backend=backend)
            loss.backward()
            results.append((loss.detach().double(), c.grad.double(), r.grad.double()))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, equal_nan=True,
                                       msg=lambda m: f"{where} {value}: {m}")
