"""Edge cases of the public ops that a framework hits and the per-op tests do not: scalar
settings given as numpy numbers or 0-d tensors, and the like. Each test failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree

import rlhf_kernels as rk
from rlhf_kernels._checks import SettingError
from tests.numerics import DEVICE

B, T, V, H = 2, 3, 11, 4


def _data():
    logp = -torch.rand(B, T, device=DEVICE)
    return {
        "logits": torch.randn(B, T, V, device=DEVICE),
        "labels": torch.randint(0, V, (B, T), device=DEVICE),
        "hidden": torch.randn(B, T, H, device=DEVICE),
        "weight": torch.randn(V, H, device=DEVICE),
        "logp": logp, "old_logp": logp + 0.1 * torch.randn(B, T, device=DEVICE),
        "ref_logp": logp + 0.1 * torch.randn(B, T, device=DEVICE),
        "advantages": torch.randn(B, T, device=DEVICE),
        "mask": torch.rand(B, T, device=DEVICE) > 0.2,
        "scores": torch.randn(B, device=DEVICE), "group_scores": torch.randn(4, device=DEVICE),
        "chosen": torch.randn(3, device=DEVICE), "rejected": torch.randn(3, device=DEVICE),
    }


def _rollout(x):
    return dict(old_logp=x["old_logp"], advantages=x["advantages"], mask=x["mask"],
                ref_logp=x["ref_logp"])


_POLICY = dict(kl_coef=0.1, entropy_coef=0.01, clip_low=0.2, clip_high=0.3, dual_clip=3.0,
               log_ratio_clamp=20.0, ignore_index=-100, normalizer=4.0, temperature=0.7)
_HEAD = dict(lora_scale=1.0, chunk_size=4, memory_budget_bytes=10**6)

# op -> (fn(data, **settings), the scalar settings with a valid value each)
SETTINGS = {
    "logprobs": (lambda x, **k: rk.logprobs(x["logits"], x["labels"], return_entropy=True, **k),
                 dict(temperature=0.7, ignore_index=-100)),
    "linear_logprobs": (lambda x, **k: rk.linear_logprobs(x["hidden"], x["weight"], x["labels"],
                                                          **k),
                        dict(temperature=0.7, ignore_index=-100, **_HEAD)),
    "ppo_loss_from_logits": (lambda x, **k: rk.ppo_loss_from_logits(
        x["logits"], x["labels"], **_rollout(x), **k), _POLICY),
    "linear_ppo_loss": (lambda x, **k: rk.linear_ppo_loss(
        x["hidden"], x["weight"], x["labels"], **_rollout(x), **k), dict(**_POLICY, **_HEAD)),
    "ppo_policy_loss": (lambda x, **k: rk.ppo_policy_loss(
        x["logp"], **_rollout(x), **k), dict(clip_low=0.2, clip_high=0.3, dual_clip=3.0,
                                             log_ratio_clamp=20.0, kl_coef=0.1, normalizer=4.0)),
    "ppo_value_loss": (lambda x, **k: rk.ppo_value_loss(x["logp"], x["old_logp"],
                                                        x["advantages"], x["mask"], **k),
                       dict(clip=0.2)),
    "kl_penalty": (lambda x, **k: rk.kl_penalty(x["logp"], x["ref_logp"], "k3", **k),
                   dict(clamp=1.0, log_ratio_clamp=5.0)),
    "gae": (lambda x, **k: rk.gae(x["advantages"], x["logp"], x["mask"], **k),
            dict(gamma=0.9, lam=0.8)),
    "masked_whiten": (lambda x, **k: rk.masked_whiten(x["advantages"], x["mask"], **k),
                      dict(eps=1e-8)),
    "shape_rewards": (lambda x, **k: rk.shape_rewards(x["scores"], x["logp"], x["ref_logp"],
                                                      x["mask"], **k),
                      dict(kl_coef=0.1, score_clip=1.0, kl_clamp=2.0)),
    "group_advantages": (lambda x, **k: rk.group_advantages(x["group_scores"], **k),
                         dict(group_size=2, eps=1e-6)),
    "bradley_terry_loss": (lambda x, **k: rk.bradley_terry_loss(x["chosen"], x["rejected"], **k),
                           dict(margin=0.5, center_coef=0.01)),
}
_CASES = [(op, name) for op, (_, settings) in SETTINGS.items() for name in settings]


def _equal(a, b) -> bool:
    a, b = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _variants(value):
    """(what a framework may pass, the Python number it means)."""
    if isinstance(value, int):
        return [(np.int64(value), value), (np.int32(value), value), (torch.tensor(value), value)]
    return [(np.float32(value), float(np.float32(value))), (np.float64(value), value),
            (torch.tensor(value, dtype=torch.float64), value)]


@pytest.mark.parametrize("op,name", _CASES)
def test_numpy_numbers_and_0d_tensors_are_accepted_as_settings(op, name):
    """A setting given as a numpy number (config arithmetic) or a 0-d tensor gives what the
    same Python number gives, on every op (before: np.int64 ignore_index / chunk_size /
    group_size and np.float32 normalizer / margin were refused, a 0-d tensor was refused by
    some ops and taken by others)."""
    fn, settings = SETTINGS[op]
    x = _data()
    for given, means in _variants(settings[name]):
        want = fn(x, **{**settings, name: means})
        got = fn(x, **{**settings, name: given})
        assert _equal(got, want), f"{op}({name}={given!r}) differs from {name}={means!r}"


@pytest.mark.parametrize("op,name", _CASES)
def test_settings_of_the_wrong_kind_are_one_clear_error(op, name):
    """A bool, a string, a tensor with more than one element or a tensor that requires grad is
    refused with an error naming the setting (before: True read as 1, "0.7" parsed, a float
    ignore_index truncated by some ops)."""
    fn, settings = SETTINGS[op]
    x = _data()
    value = settings[name]
    bad = [True, str(value), torch.full((2,), value)]
    if isinstance(value, int):
        bad.append(float(value) + 0.5)  # an int setting given a float
    elif name not in ("margin", "normalizer"):
        # (a margin tensor is per-pair data; a normalizer tensor is a count used detached)
        bad.append(torch.tensor(value, requires_grad=True))
    for given in bad:
        with pytest.raises((TypeError, ValueError), match=name):
            fn(x, **{**settings, name: given})
    with pytest.raises(SettingError, match=f"{name} must be"):
        fn(x, **{**settings, name: "abc"})


# --------------------------------------------------------------------------------------------
# torch.func transforms that differentiate
# --------------------------------------------------------------------------------------------
_DIFFERENTIABLE = {
    "logprobs": (lambda x, d, **b: rk.logprobs(d, x["labels"], return_entropy=True, **b)[1].sum(),
                 "logits"),
    "linear_logprobs": (lambda x, h, **b: rk.linear_logprobs(h, x["weight"].to(h.dtype),
                                                             x["labels"], **b).sum(), "hidden"),
    "ppo_loss_from_logits": (lambda x, d, **b: rk.ppo_loss_from_logits(
        d, x["labels"], x["old_logp"], x["advantages"], x["mask"], entropy_coef=0.1, **b)[0],
        "logits"),
    "linear_ppo_loss": (lambda x, h, **b: rk.linear_ppo_loss(
        h, x["weight"].to(h.dtype), x["labels"], x["old_logp"], x["advantages"], x["mask"],
        **b)[0], "hidden"),
    "ppo_policy_loss": (lambda x, lp, **b: rk.ppo_policy_loss(
        lp, x["old_logp"], x["advantages"], x["mask"], ratio_level="sequence",
        ref_logp=x["ref_logp"], kl_coef=0.1, **b)[0], "logp"),
    "ppo_value_loss": (lambda x, v, **b: rk.ppo_value_loss(v, x["old_logp"], x["advantages"],
                                                            x["mask"], **b)[0], "logp"),
    "kl_penalty": (lambda x, lp, **b: rk.kl_penalty(lp, x["ref_logp"], "k3", **b).sum(), "logp"),
    "bradley_terry_loss": (lambda x, c, **b: rk.bradley_terry_loss(c, x["rejected"], **b)[0],
                           "chosen"),
}


@pytest.mark.parametrize("op", list(_DIFFERENTIABLE))
def test_torch_func_grad_runs_the_reference(op, monkeypatch):
    """torch.func.grad (and vjp / jacrev / jvp) through an op gives the float64 reference's
    gradient, with one warning (before: torch's 'autograd.Function ... must override the
    setup_context staticmethod' from the custom ops); an explicit kernel backend there is one
    clear error."""
    from rlhf_kernels import backend

    fn, name = _DIFFERENTIABLE[op]
    x = _data()
    monkeypatch.setattr(backend, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="torch.func.grad"):
        got = torch.func.grad(lambda t: fn(x, t))(x[name])
    want = torch.func.grad(lambda t: fn(x, t, backend="reference"))(x[name].double())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="backend='triton' for rlhf_kernels.* torch.func"):
        torch.func.grad(lambda t: fn(x, t, backend="triton"))(x[name])


def test_torch_func_jvp_and_vmap_of_grad():
    x = _data()
    tangent = torch.randn_like(x["logp"])
    _, got = torch.func.jvp(lambda t: rk.kl_penalty(t, x["ref_logp"], "k2"), (x["logp"],),
                            (tangent,))
    torch.testing.assert_close(got, (x["logp"] - x["ref_logp"]) * tangent)
    per_row = torch.func.vmap(torch.func.grad(
        lambda lp, old, a: rk.ppo_policy_loss(lp, old, a, reduction="token-sum")[0]))(
        x["logp"], x["old_logp"], x["advantages"])
    whole = torch.func.grad(lambda lp: rk.ppo_policy_loss(
        lp, x["old_logp"], x["advantages"], reduction="token-sum", backend="reference")[0])(
        x["logp"])
    torch.testing.assert_close(per_row, whole)


def test_reference_group_advantages_takes_numpy_group_size():
    """rlhf_kernels.reference.group_advantages takes the settings the op takes (before: a numpy
    or 0-d tensor group_size was refused there only)."""
    from rlhf_kernels import reference

    scores = torch.randn(6, dtype=torch.float64)
    want = reference.group_advantages(scores, 3)
    for size in (np.int64(3), np.int32(3), torch.tensor(3)):
        assert torch.equal(reference.group_advantages(scores, size), want)


@pytest.mark.parametrize("op", ["ppo_policy_loss", "ppo_loss_from_logits", "linear_ppo_loss",
                                "ppo_value_loss", "bradley_terry_loss"])
def test_stats_have_the_same_keys_in_the_same_order_on_every_backend(op):
    """A caller that stacks the stats' values (one all_reduce for all of them) gets the same
    layout from the kernels and from the reference (before: ppo_policy_loss's reference put
    dual_clipfrac, pg_loss and kl first)."""
    fn, settings = SETTINGS[op]
    x = _data()
    settings = {k: v for k, v in settings.items() if k != "normalizer"}
    orders = [list(fn(x, **settings, backend=backend)[1]) for backend in ("triton", "reference")]
    assert orders[0] == orders[1]


@pytest.mark.parametrize("op", ["linear_logprobs", "linear_ppo_loss"])
def test_head_ops_under_autocast_match_compiled_and_cast_inputs(op):
    """Under autocast the lm-head ops' matmuls take the autocast dtype whether the op runs
    eagerly or under torch.compile: the same values as the op on inputs cast to that dtype
    (before: bf16 chunk matmuls in eager mode, fp32 ones compiled, where the custom op runs with
    autocast off), and fp32 leaves still get fp32 gradients."""
    x = _data()
    hidden = x["hidden"].requires_grad_()
    weight = x["weight"].requires_grad_()

    def fn(h, w):
        if op == "linear_logprobs":
            return rk.linear_logprobs(h, w, x["labels"]).sum()
        return rk.linear_ppo_loss(h, w, x["labels"], x["old_logp"], x["advantages"],
                                  x["mask"])[0]

    want = fn(hidden.detach().bfloat16(), weight.detach().bfloat16())
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = fn(hidden, weight)
        traced = compiled(hidden, weight)
    torch.testing.assert_close(eager, want, rtol=0, atol=0)
    torch.testing.assert_close(traced, want, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(eager, (hidden, weight))
    assert [g.dtype for g in grads] == [torch.float32, torch.float32]
