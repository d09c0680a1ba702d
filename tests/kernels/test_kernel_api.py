"""The public kernel ops as a framework calls them: settings, inputs and autograd uses that the
per-op tests do not reach. Each test failed before its fix; values are compared with float64
formulas written here, not with rlhf_kernels.reference."""

from __future__ import annotations

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import reference
from tests.numerics import DEVICE

B, T, V, H = 2, 3, 7, 4
NAN = float("nan")


def _logp64(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[label] in float64 (labels in [0, V)). The index is a copy: gather
    saves it, and autograd cannot save an inference tensor."""
    log_p = torch.log_softmax(logits.double(), dim=-1)
    return log_p.gather(-1, labels.long().clone().unsqueeze(-1)).squeeze(-1)


def _rollout():
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    old_logp = -1.0 - torch.rand(B, T, device=DEVICE)
    advantages = torch.randn(B, T, device=DEVICE)
    return labels, old_logp, advantages


@pytest.mark.parametrize("op", ["ppo_loss_from_logits", "linear_ppo_loss"])
@pytest.mark.parametrize("name", ["clip_low", "clip_high", "log_ratio_clamp"])
def test_fused_losses_refuse_a_nan_clip_setting(op, name):
    """clip_low / clip_high / log_ratio_clamp = NaN is one error naming the setting, as
    ppo_policy_loss gives (before: the fused losses took it and returned a NaN loss)."""
    labels, old_logp, advantages = _rollout()
    if op == "ppo_loss_from_logits":
        call = lambda **k: rk.ppo_loss_from_logits(torch.randn(B, T, V, device=DEVICE), labels,
                                                   old_logp, advantages, **k)
    else:
        call = lambda **k: rk.linear_ppo_loss(torch.randn(B, T, H, device=DEVICE),
                                              torch.randn(V, H, device=DEVICE), labels,
                                              old_logp, advantages, **k)
    with pytest.raises(ValueError, match=name):
        call(**{name: NAN})


@pytest.mark.parametrize("op", ["logprobs", "linear_logprobs"])
def test_labels_sampled_under_inference_mode(op):
    """Token ids made under torch.inference_mode (a rollout) train like any others: the gradient
    is the float64 formula's (before: the kernel paths raised 'Inference tensors cannot be
    saved for backward' where the reference ran)."""
    with torch.inference_mode():
        labels = torch.randint(0, V, (B, T), device=DEVICE)
    upstream = torch.randn(B, T, device=DEVICE)
    if op == "logprobs":
        x = torch.randn(B, T, V, device=DEVICE, requires_grad=True)
        got = torch.autograd.grad((rk.logprobs(x, labels) * upstream).sum(), x)[0]
        x64 = x.detach().double().requires_grad_()
        want = torch.autograd.grad((_logp64(x64, labels) * upstream.double()).sum(), x64)[0]
    else:
        x = torch.randn(B, T, H, device=DEVICE, requires_grad=True)
        w = torch.randn(V, H, device=DEVICE)
        got = torch.autograd.grad((rk.linear_logprobs(x, w, labels) * upstream).sum(), x)[0]
        x64 = x.detach().double().requires_grad_()
        want = torch.autograd.grad(
            (_logp64(x64 @ w.double().t(), labels) * upstream.double()).sum(), x64)[0]
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op", ["ppo_loss_from_logits", "linear_ppo_loss"])
def test_fused_second_backward_is_one_error_naming_the_op(op):
    """A second backward through a fused loss's graph (retain_graph=True) is refused with an
    error naming the op (before: autograd's version-counter message about an anonymous
    tensor). The first backward is the float64 clipped-PPO formula's gradient."""
    labels, old_logp, advantages = _rollout()
    if op == "ppo_loss_from_logits":
        x = torch.randn(B, T, V, device=DEVICE, requires_grad=True)
        loss, _ = rk.ppo_loss_from_logits(x, labels, old_logp, advantages)
        logits64 = lambda t: t
    else:
        x = torch.randn(B, T, H, device=DEVICE, requires_grad=True)
        w = torch.randn(V, H, device=DEVICE)
        loss, _ = rk.linear_ppo_loss(x, w, labels, old_logp, advantages)
        logits64 = lambda t: t @ w.double().t()
    (got,) = torch.autograd.grad(loss, x, retain_graph=True)
    x64 = x.detach().double().requires_grad_()
    ratio = torch.exp(_logp64(logits64(x64), labels) - old_logp.double())
    a = advantages.double()
    want_loss = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2)).mean()
    (want,) = torch.autograd.grad(want_loss, x64)
    torch.testing.assert_close(loss.double(), want_loss.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match=f"rlhf_kernels.{op}: a second backward"):
        torch.autograd.grad(loss, x)


@pytest.mark.parametrize("name,value", [("gamma", NAN), ("gamma", 1.5), ("gamma", -0.1),
                                        ("lam", NAN), ("lam", float("inf")), ("lam", 1.01)])
def test_gae_refuses_gamma_or_lam_outside_the_unit_interval(name, value):
    """gamma / lam outside [0, 1] (NaN included) is one error naming it (before: taken, a NaN
    made every advantage NaN). The bounds are valid: at gamma = 0 the advantage is r - V and
    the return r on each valid token (lam then does not matter), 0 on masked ones."""
    rewards = torch.randn(B, T, device=DEVICE)
    values = torch.randn(B, T, device=DEVICE)
    mask = torch.tensor([[True, True, False], [False, True, True]], device=DEVICE)
    with pytest.raises(ValueError, match=f"{name}="):
        rk.gae(rewards, values, mask, **{"gamma": 0.9, "lam": 0.9, name: value})
    advantages, returns = rk.gae(rewards, values, mask, gamma=0.0, lam=1.0)
    zero = torch.zeros((), device=DEVICE)
    torch.testing.assert_close(advantages, torch.where(mask, rewards - values, zero))
    torch.testing.assert_close(returns, torch.where(mask, rewards, zero))


def test_empty_vocabulary_or_hidden_size_is_one_clear_error():
    """A (V, H) weight with V = 0 or H = 0, or logits with V = 0, is refused naming the shape
    (before: a reshape error from inside the kernel path, an IndexError from the reference,
    or a silent NaN per token)."""
    labels, old_logp, advantages = _rollout()
    for weight in (torch.randn(0, H, device=DEVICE), torch.randn(V, 0, device=DEVICE)):
        hidden = torch.randn(B, T, weight.shape[1], device=DEVICE)
        with pytest.raises(ValueError, match=r"weight must have shape \(V, H\) with V >= 1"):
            rk.linear_logprobs(hidden, weight, labels)
        with pytest.raises(ValueError, match=r"weight must have shape \(V, H\) with V >= 1"):
            rk.linear_ppo_loss(hidden, weight, labels, old_logp, advantages)
    with pytest.raises(ValueError, match="V >= 1"):
        rk.ppo_loss_from_logits(torch.randn(B, T, 0, device=DEVICE), labels, old_logp,
                                advantages)


def test_shape_rewards_score_index_that_is_not_a_tensor():
    """score_index given as a list is a TypeError naming it (before: AttributeError 'list'
    object has no attribute 'device')."""
    logp = -torch.rand(B, T, device=DEVICE)
    with pytest.raises(TypeError, match="score_index must be"):
        rk.shape_rewards(torch.ones(B, device=DEVICE), logp, logp,
                         torch.ones(B, T, device=DEVICE), 0.1, score_index=[0, 1])


def test_reference_int32_labels_with_an_ignore_index_beyond_int32():
    """With int32 labels, an ignore_index outside the int32 range matches no label in the
    reference, as in the kernels (before: the reference compared in int32, so 2**32 - 100
    matched the label -100 and that row gave 0 where the kernels give NaN)."""
    logits = torch.randn(B, T, V, device=DEVICE)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    labels[0, 1] = -100  # out of range: not the ignore_index below
    ignore_index = 2**32 - 100
    valid = labels != -100
    want = torch.where(valid, _logp64(logits, labels.clamp(min=0)), NAN)
    for got in (reference.logprobs(logits, labels.int(), ignore_index=ignore_index),
                rk.logprobs(logits, labels.int(), ignore_index=ignore_index)):
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6, equal_nan=True)


def test_shape_rewards_mask_none_counts_every_token():
    """mask=None means every token counts, as for the other ops (before: 'mask must be a
    torch.Tensor, got NoneType'): -kl_coef * (logp - ref_logp) on every token plus the score on
    the last one."""
    scores = torch.randn(B, device=DEVICE)
    logp = -torch.rand(B, T, device=DEVICE)
    ref_logp = -torch.rand(B, T, device=DEVICE)
    want = -0.1 * (logp.double() - ref_logp.double())
    want[:, -1] += scores.double()
    got = rk.shape_rewards(scores, logp, ref_logp, None, 0.1)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)


def _weighted_setting_call(op, name, value, backend):
    """The op called with the setting `name` = value (the other settings their defaults, any
    tensor the setting needs given)."""
    labels, old_logp, advantages = _rollout()
    ref_logp = old_logp + 0.1
    kw = {name: value, "backend": backend}
    if op == "ppo_policy_loss":
        return rk.ppo_policy_loss(old_logp + 0.05, old_logp, advantages, ref_logp=ref_logp, **kw)
    if op == "ppo_loss_from_logits":
        return rk.ppo_loss_from_logits(torch.randn(B, T, V, device=DEVICE), labels, old_logp,
                                       advantages, ref_logp=ref_logp, **kw)
    hidden, weight = torch.randn(B, T, H, device=DEVICE), torch.randn(V, H, device=DEVICE)
    lora = dict(lora_a=torch.randn(2, H, device=DEVICE), lora_b=torch.randn(V, 2, device=DEVICE))
    if op == "linear_ppo_loss":
        return rk.linear_ppo_loss(hidden, weight, labels, old_logp, advantages, ref_logp=ref_logp,
                                  **lora, **kw)
    if op == "linear_logprobs":
        return rk.linear_logprobs(hidden, weight, labels, **lora, **kw)
    if op == "shape_rewards":
        return rk.shape_rewards(torch.randn(B, device=DEVICE), old_logp, ref_logp, None, **kw)
    return rk.bradley_terry_loss(torch.randn(5, device=DEVICE), torch.randn(5, device=DEVICE),
                                 **kw)


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("op,name", [
    ("ppo_policy_loss", "kl_coef"), ("ppo_policy_loss", "normalizer"),
    ("ppo_loss_from_logits", "kl_coef"), ("ppo_loss_from_logits", "entropy_coef"),
    ("linear_ppo_loss", "kl_coef"), ("linear_ppo_loss", "entropy_coef"),
    ("linear_ppo_loss", "lora_scale"), ("linear_logprobs", "lora_scale"),
    ("bradley_terry_loss", "margin"), ("bradley_terry_loss", "center_coef"),
    ("shape_rewards", "kl_coef"),
])
def test_nan_or_inf_weight_settings_are_refused(op, name, backend):
    """A NaN or infinite weight / scale setting is one ValueError naming it, its value and
    that a finite number is expected, on the kernel backend and the reference alike (before:
    taken, the loss or log-probs NaN or inf; a normalizer of inf gave a loss of 0). A 0-d
    tensor setting holding NaN is refused too (a tensor normalizer stays unread: no host
    sync)."""
    values = [NAN, float("inf"), -float("inf")]
    if name != "normalizer":
        values.append(torch.tensor(NAN))
    for value in values:
        with pytest.raises(ValueError) as caught:
            _weighted_setting_call(op, name, value, backend)
        message = str(caught.value)
        assert name in message and str(float(value)) in message and "finite" in message


def test_bradley_terry_finite_margin_and_center_coef_still_taken():
    """The finite settings the refusal above lets through are used as before: the loss is the
    float64 formula -log sigmoid(c - r - margin) + center_coef (c + r)^2, averaged."""
    c, r = torch.randn(5, device=DEVICE), torch.randn(5, device=DEVICE)
    c64, r64 = c.double(), r.double()
    want = (-torch.nn.functional.logsigmoid(c64 - r64 - 0.5) + 0.1 * (c64 + r64) ** 2).mean()
    for backend in (None, "reference"):
        for margin in (0.5, torch.tensor(0.5)):
            loss, _ = rk.bradley_terry_loss(c, r, margin=margin, center_coef=0.1,
                                            backend=backend)
            torch.testing.assert_close(loss.double(), want, atol=1e-6, rtol=1e-6)


def test_the_reference_takes_positional_arguments_as_the_op_does():
    """Each op's plain-PyTorch reference (the spec) reads a positional call as the op does:
    reference.linear_ppo_loss took ratio_level, loss_type and normalizer where the op takes
    chunk_size and memory_budget_bytes, so one long positional call meant two things."""
    import inspect

    from rlhf_kernels import reference

    def positional(fn):
        return [p.name for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    compared = 0
    for name in rk.__all__:
        op, spec = getattr(rk, name), getattr(reference, name, None)
        if not callable(spec) or not inspect.isfunction(getattr(op, "__wrapped__", op)):
            continue
        ours, theirs = positional(op), positional(spec)
        common = min(len(ours), len(theirs))
        assert ours[:common] == theirs[:common], (name, ours, theirs)
        compared += 1
    assert compared >= 12  # every public op but resolve_backend
