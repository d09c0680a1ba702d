"""The critic-free drop-ins for veRL and OpenRLHF against float64 re-implementations.

veRL and OpenRLHF are not installed in CI, so each drop-in is held to an independent float64
implementation, written here from the framework's documented semantics (veRL 0.9.1's
core_algos estimators and GSPO / CISPO losses, OpenRLHF 0.11.2's group baselines and GSPO
PolicyLoss): values, gradients and metrics on random inputs with masks (holes, fully masked
rows, groups of one, prompt ids out of order). Per-sequence (B,) advantages must give exactly
what the same advantages expanded to (B, T) give, through every loss drop-in. Where a framework
is importable, its own functions are compared too. The kernels' Triton path is forced (the
interpreter on a CPU).
"""

from __future__ import annotations

import functools
import sys
import types

import numpy as np
import pytest
import torch

from rlhf_kernels import integrations
from rlhf_kernels.integrations import openrlhf as our_openrlhf
from rlhf_kernels.integrations import verl as our_verl
from tests.numerics import DEVICE


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "triton")


def _close(ours, ref, atol=1e-5, rtol=1e-4, name=""):
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    torch.testing.assert_close(ours.double().cpu(), ref.double().cpu(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


def _holes_mask(B, T, seed_row_empty=None):
    """(B, T) float 0/1: random holes, at least one valid token per row except ``seed_row_empty``
    (fully masked)."""
    m = torch.rand(B, T) < 0.7
    m[:, 0] = True
    if seed_row_empty is not None:
        m[seed_row_empty] = False
    return m.to(torch.float32).to(DEVICE)


# prompt ids as veRL passes them (uid strings, out of order), with one prompt of a single response
_INDEX = np.array(["u7", "u2", "u7", "u9", "u2", "u7", "u5", "u2", "u9", "u7"], dtype=object)


def _groups(labels) -> list[list[int]]:
    rows: dict = {}
    for i, label in enumerate(labels):
        rows.setdefault(label, []).append(i)
    return list(rows.values())


# --------------------------------------------------------------------------------------------
# float64 re-implementations of veRL 0.9.1's semantics
# --------------------------------------------------------------------------------------------
def _grpo64(rewards, mask, index, eps=1e-6, scale=True):
    scores = rewards.double().sum(-1)
    out = torch.empty_like(scores)
    for rows in _groups(index):
        s = scores[rows]
        mean, std = (s.mean(), s.std()) if len(rows) > 1 else (0.0, 1.0)
        out[rows] = (s - mean) / (std + eps) if scale else s - mean
    return out[:, None] * (mask != 0).double()


def _rloo64(rewards, mask, index, alone):
    """alone: what a response alone in its group gets ("score" for veRL's loop, "zero" for its
    vectorized form)."""
    scores = rewards.double().sum(-1)
    out = torch.empty_like(scores)
    for rows in _groups(index):
        s = scores[rows]
        if len(rows) == 1:
            out[rows] = s if alone == "score" else 0.0
        else:
            out[rows] = s - (s.sum() - s) / (len(rows) - 1)
    return out[:, None] * (mask != 0).double()


def _whiten64(x, mask):
    valid = mask != 0
    mean = x[valid].mean()
    var = x[valid].var()  # unbiased
    return (x - mean) / torch.sqrt(var + 1e-8) * valid.double()


def _rpp_baseline64(rewards, mask, index):
    scores = rewards.double().sum(-1)
    centred = torch.empty_like(scores)
    for rows in _groups(index):
        s = scores[rows]
        centred[rows] = s - (s.mean() if len(rows) > 1 else 0.0)
    return _whiten64(centred[:, None] * (mask != 0).double(), mask)


def _rpp64(rewards, mask, gamma):
    """Discounted returns over the valid tokens (masked positions skipped, 0), whitened."""
    r = rewards.double()
    returns = torch.zeros_like(r)
    running = torch.zeros(r.shape[0], dtype=torch.float64, device=r.device)
    for t in reversed(range(r.shape[1])):
        valid = mask[:, t] != 0
        new = r[:, t] + gamma * running
        returns[:, t] = torch.where(valid, new, torch.zeros_like(new))
        running = torch.where(valid, new, running)
    return _whiten64(returns, mask), returns


def _agg64(loss, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
           loss_scale_factor=None):
    """veRL 0.9.1's agg_loss, float64."""
    m = (mask != 0).double()
    total = (loss * m).sum()
    if mode == "token-mean":
        return total / (m.sum() if batch_num_tokens is None else batch_num_tokens) * dp_size
    if mode == "token-sum":
        return total * dp_size
    has = m.sum(-1) > 0
    rows = (loss * m).sum(-1)
    if mode == "seq-mean-token-mean":
        rows = rows / m.sum(-1).clamp_min(1)
    n_rows = has.double().sum() if global_batch_size is None else global_batch_size
    out = rows[has].sum() / n_rows * dp_size
    if mode == "seq-mean-token-sum-norm":
        out = out / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return out


def _masked_mean64(x, mask):
    m = (mask != 0).double()
    return (x * m).sum() / m.sum()


def _verl_gspo64(old, logp, adv, mask, low, high, mode, info, weights=None):
    """veRL's GSPO-token form: log s_it = sg(mean_i(logp - old)) + logp - sg(logp), bounded by
    +10 from above; s clipped to [1 - low, 1 + high]; no dual clip; times the rollout weights.
    Aggregated with ``mode`` (and the global batch info), as veRL 0.9.1's GSPO."""
    m = (mask != 0).double()
    d = logp - old
    row_mean = (d * m).sum(-1) / m.sum(-1).clamp_min(1)
    log_s = (logp - logp.detach() + row_mean.detach()[:, None]).clamp(max=10.0)
    s = torch.exp(log_s)
    loss1, loss2 = -adv * s, -adv * s.clamp(1 - low, 1 + high)
    per_token = torch.maximum(loss1, loss2)
    if weights is not None:
        per_token = per_token * weights.double()
    loss = _agg64(per_token, mask, mode, **info)
    metrics = {"actor/pg_clipfrac": _masked_mean64((loss2 > loss1).double(), mask).item(),
               "actor/ppo_kl": _masked_mean64(-d, mask).item(),
               "actor/pg_clipfrac_lower": 0.0}
    return loss, metrics


def _verl_cispo64(old, logp, adv, mask, low, high, mode, info):
    d = (logp - old).clamp(-20.0, 20.0)
    ratio = torch.exp(d)
    weight = ratio.clamp(1 - low, 1 + high).detach()
    loss = _agg64(-weight * adv * logp, mask, mode, **info)
    outside = (ratio < 1 - low) | (ratio > 1 + high)
    metrics = {"actor/pg_clipfrac": _masked_mean64(outside.double(), mask).item(),
               "actor/ppo_kl": _masked_mean64(-d, mask).item(),
               "actor/pg_clipfrac_lower": 0.0}
    return loss, metrics


def _verl_sapo64(old, logp, adv, mask, tau_pos, tau_neg, info, weights=None):
    """veRL 0.9.1's SAPO: the gate sigmoid(tau (r - 1)) 4 / tau on -A, r = exp(clamp(logp - old,
    +-20)), tau by the sign of A, times the rollout weights; always seq-mean-token-mean."""
    d = (logp - old).clamp(-20.0, 20.0)
    ratio = torch.exp(d)
    tau = torch.where(adv > 0, tau_pos, tau_neg).double()
    per_token = -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * adv
    if weights is not None:
        per_token = per_token * weights
    loss = _agg64(per_token, mask, "seq-mean-token-mean", **info)
    metrics = {"actor/pg_clipfrac": 0.0, "actor/ppo_kl": _masked_mean64(-d, mask).item(),
               "actor/pg_clipfrac_lower": 0.0}
    return loss, metrics


def _verl_vanilla64(old, logp, adv, mask, low, high, c, mode, info, weights=None):
    ratio = torch.exp((logp - old).clamp(-20.0, 20.0))
    clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - low, 1 + high))
    per_token = torch.where(adv < 0, torch.minimum(clipped, -adv * c), clipped)
    if weights is not None:  # rollout correction: each token's loss times its weight
        per_token = per_token * weights
    return _agg64(per_token, mask, mode, **info)


class _ActorConfig(dict):
    """The fields veRL's policy losses read, by attribute and by .get, as its configs do."""

    __getattr__ = dict.get


def _rollout(B=6, T=9, per_row=True, spread=0.6):
    """old_logp, logp (fp32, masked positions hold finite junk), advantages (B, T) one value per
    row (times the mask, as veRL's estimators give) or per token, mask with one empty row."""
    mask = _holes_mask(B, T, seed_row_empty=2)
    old = -torch.rand(B, T, device=DEVICE) * 3
    logp = old + spread * torch.randn(B, T, device=DEVICE)
    if per_row:
        adv = torch.randn(B, 1, device=DEVICE) * mask
    else:
        adv = torch.randn(B, T, device=DEVICE)
    return old, logp, adv, mask


def _value_and_grad(fn, logp):
    leaf = logp.detach().clone().requires_grad_(True)
    loss, metrics = fn(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, metrics


# --------------------------------------------------------------------------------------------
# veRL: advantage estimators
# --------------------------------------------------------------------------------------------
def _estimator_cases(rewards, mask, index, config):
    return {
        "grpo": (lambda fn: fn(rewards, mask, index), _grpo64(rewards, mask, index)),
        "grpo_vectorized": (lambda fn: fn(rewards, mask, index), _grpo64(rewards, mask, index)),
        "rloo": (lambda fn: fn(rewards, mask, index, config=config),
                 _rloo64(rewards, mask, index, "score")),
        "rloo_vectorized": (lambda fn: fn(rewards, mask, index, config=config),
                            _rloo64(rewards, mask, index, "zero")),
        "reinforce_plus_plus_baseline": (lambda fn: fn(rewards, mask, index, config=config),
                                         _rpp_baseline64(rewards, mask, index)),
        "reinforce_plus_plus": (lambda fn: fn(rewards, mask, config),
                                _rpp64(rewards, mask, config.gamma)[0]),
    }


@pytest.mark.parametrize("name", ["grpo", "grpo_vectorized", "rloo", "rloo_vectorized",
                                  "reinforce_plus_plus_baseline", "reinforce_plus_plus"])
def test_verl_estimators_against_float64(name):
    B, T = len(_INDEX), 7
    rewards = torch.randn(B, T, device=DEVICE)
    mask = _holes_mask(B, T)
    config = _ActorConfig(gamma=0.93)
    call, ref = _estimator_cases(rewards, mask, _INDEX, config)[name]
    advantages, returns = call(our_verl.ADVANTAGE_ESTIMATORS[name])
    _close(advantages, ref, name=f"{name} advantages")
    assert advantages.dtype == torch.float32 and not advantages.requires_grad
    if name == "reinforce_plus_plus":
        _close(returns, _rpp64(rewards, mask, 0.93)[1], name="returns")
    else:
        assert returns is advantages  # veRL returns the same tensor twice


@pytest.mark.parametrize("variant", ["compute_grpo_outcome_advantage",
                                     "compute_grpo_vectorized_outcome_advantage"])
@pytest.mark.parametrize("scale, eps", [(True, 1e-6), (False, 1e-6), (True, 0.5)])
def test_verl_grpo_options(variant, scale, eps):
    B, T = len(_INDEX), 5
    rewards = torch.randn(B, T, device=DEVICE)
    rewards[[1, 4, 7], :] = 0.25  # a group whose scores are all equal: std 0
    mask = _holes_mask(B, T)
    adv, _ = getattr(our_verl, variant)(rewards, mask, _INDEX, eps, scale)
    _close(adv, _grpo64(rewards, mask, _INDEX, eps, scale), name=variant)


@pytest.mark.parametrize("dtype, mask_dtype", [
    (torch.bfloat16, torch.bool), (torch.bfloat16, torch.float32), (torch.float32, torch.int64),
    (torch.float64, torch.float32)])
def test_verl_estimator_dtypes(dtype, mask_dtype):
    """veRL's dtype for each estimator; the values are the exact ones rounded once."""
    B, T = len(_INDEX), 4
    rewards = torch.randn(B, T, device=DEVICE).to(dtype)
    mask = _holes_mask(B, T).to(mask_dtype)
    config = _ActorConfig(gamma=1.0)
    promoted = torch.promote_types(dtype, mask_dtype) if mask_dtype.is_floating_point else dtype
    at_least_fp32 = torch.promote_types(promoted, torch.float32)
    bincount = torch.float32 if dtype == torch.float32 else torch.float64
    expected = {
        "grpo": promoted, "grpo_vectorized": at_least_fp32, "rloo": promoted,
        "rloo_vectorized": torch.promote_types(promoted, bincount),
        "reinforce_plus_plus_baseline": promoted, "reinforce_plus_plus": promoted,
    }
    cases = _estimator_cases(rewards, mask, _INDEX, config)
    for name, (call, ref) in cases.items():
        adv, returns = call(our_verl.ADVANTAGE_ESTIMATORS[name])
        assert adv.dtype == expected[name], f"{name}: {adv.dtype} != {expected[name]}"
        tol = 2e-2 if dtype == torch.bfloat16 or expected[name] == torch.bfloat16 else 1e-5
        _close(adv, ref, atol=tol, rtol=tol, name=f"{name} {dtype}")
        if name == "reinforce_plus_plus":
            assert returns.dtype == dtype  # veRL's returns buffer has the rewards' dtype
        kept, _ = call(functools.partial(our_verl.ADVANTAGE_ESTIMATORS[name], keep_fp32=True))
        assert kept.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name


def test_verl_index_forms_and_errors():
    """uid strings, integer lists, numpy ints and tensors group the same way; a wrong length or
    an unhashable id is refused with a message."""
    B, T = 6, 3
    rewards = torch.randn(B, T, device=DEVICE)
    mask = torch.ones(B, T, device=DEVICE)
    labels = [3, 1, 3, 8, 1, 3]
    forms = [np.array([f"id{x}" for x in labels], dtype=object), np.array(labels), labels,
             torch.tensor(labels), tuple(str(x) for x in labels)]
    ref = _grpo64(rewards, mask, labels)
    for index in forms:
        _close(our_verl.compute_grpo_outcome_advantage(rewards, mask, index)[0], ref,
               name=type(index).__name__)
    with pytest.raises(ValueError, match="one prompt id per response"):
        our_verl.compute_rloo_outcome_advantage(rewards, mask, labels[:4])
    with pytest.raises(TypeError, match="hashable"):
        our_verl.compute_grpo_outcome_advantage(rewards, mask, [[1], [1], [2], [2], [3], [3]])


def test_verl_estimators_fall_back_where_verl_raises(monkeypatch):
    """Whitening needs 2 valid tokens and REINFORCE++ a config: veRL's own function runs (and
    raises there)."""
    calls = []

    def fake_original(module, name):
        return lambda *args: calls.append(name) or ("veRL", name)

    monkeypatch.setattr(our_verl, "original", fake_original)
    rewards = torch.randn(3, 4, device=DEVICE)
    one_token = torch.zeros(3, 4, device=DEVICE)
    one_token[1, 2] = 1
    our_verl.compute_reinforce_plus_plus_baseline_outcome_advantage(rewards, one_token, [0, 0, 1])
    our_verl.compute_reinforce_plus_plus_outcome_advantage(rewards, one_token,
                                                           _ActorConfig(gamma=1.0))
    our_verl.compute_reinforce_plus_plus_outcome_advantage(rewards, torch.ones(3, 4), None)
    assert calls == ["compute_reinforce_plus_plus_baseline_outcome_advantage",
                     "compute_reinforce_plus_plus_outcome_advantage",
                     "compute_reinforce_plus_plus_outcome_advantage"]


# --------------------------------------------------------------------------------------------
# veRL: policy losses
# --------------------------------------------------------------------------------------------
_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
          "token-sum"]
_GLOBAL_INFO = [
    {},
    {"dp_size": 2, "batch_num_tokens": 61, "global_batch_size": 11, "loss_scale_factor": 16},
]


def _assert_metrics(ours, ref, name):
    assert ours.keys() == ref.keys(), name
    for key in ref:
        assert isinstance(ours[key], float), f"{name} {key}: {type(ours[key]).__name__}"
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), f"{name} {key}"


@pytest.mark.parametrize("loss", ["gspo", "cispo"])
@pytest.mark.parametrize("mode", _MODES)
@pytest.mark.parametrize("info", _GLOBAL_INFO, ids=["local", "global"])
def test_verl_gspo_cispo_against_float64(loss, mode, info):
    old, logp, adv, mask = _rollout(per_row=True)
    logp[0, :2] = old[0, :2] + torch.tensor([3.0, -3.0], device=DEVICE)  # past the clip range
    config = _ActorConfig(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28,
                          global_batch_info=info)
    ours_fn = our_verl.POLICY_LOSSES[loss]
    ref_fn = {"gspo": _verl_gspo64, "cispo": _verl_cispo64}[loss]
    value, grad, metrics = _value_and_grad(
        lambda lp: ours_fn(old, lp, adv, mask, mode, config), logp)
    ref, ref_grad, ref_metrics = _value_and_grad(
        lambda lp: ref_fn(old.double(), lp, adv.double(), mask, 0.15, 0.28, mode, info),
        logp.double())
    _close(value, ref, name=f"{loss} {mode} loss")
    _close(grad, ref_grad, name=f"{loss} {mode} d logp")
    _assert_metrics(metrics, ref_metrics, f"{loss} {mode}")
    expected = torch.float32
    assert value.dtype == expected


@pytest.mark.parametrize("weighted", [False, True], ids=["", "rollout weights"])
@pytest.mark.parametrize("per_row", [True, False], ids=["per-row A", "per-token A"])
@pytest.mark.parametrize("mode", _MODES)
def test_verl_gspo_token_form_against_float64(mode, per_row, weighted):
    """veRL's GSPO is GSPO-token: each token's gradient is its own log-prob's, times the row's
    ratio. With per-token advantages or rollout weights that differs from the gradient through
    the row mean, so the drop-in takes the token-level loss against shifted old log-probs: loss,
    d logp and metrics against the float64 form, rows far below 1 (veRL has no lower bound)
    and past the clip range included."""
    old, logp, adv, mask = _rollout(per_row=per_row)
    logp[0, :2] = old[0, :2] + torch.tensor([3.0, -3.0], device=DEVICE)
    logp[3] = old[3] - 12.0  # a row mean far below -10: no bound there
    weights = _rollout_weights(adv.shape) if weighted else None
    config = _ActorConfig(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28,
                          global_batch_info={})
    value, grad, metrics = _value_and_grad(
        lambda lp: our_verl.compute_policy_loss_gspo(old, lp, adv, mask, mode, config, weights),
        logp)
    ref, ref_grad, ref_metrics = _value_and_grad(
        lambda lp: _verl_gspo64(old.double(), lp, adv.double(), mask, 0.15, 0.28, mode, {},
                                weights), logp.double())
    _close(value, ref, name=f"gspo {mode} loss")
    _close(grad, ref_grad, name=f"gspo {mode} d logp")
    _assert_metrics(metrics, ref_metrics, f"gspo {mode}")
    if not per_row or weighted:
        # the sequence ratio with the gradient through the row mean (the op's
        # ratio_level="sequence") is another gradient here: the token form is needed. Shown on
        # a fixed rollout: on a random one every row whose weights vary may be clipped (no
        # gradient in either form), 1 seed in 100 or so.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            old, logp, adv, mask = _rollout(per_row=per_row)

        def through_mean(lp):
            m = (mask != 0).double()
            row = ((lp - old.double()) * m).sum(-1) / m.sum(-1).clamp_min(1)
            ratio = torch.exp(row)[:, None].expand_as(lp)
            a = adv.double() * (1.0 if weights is None else weights.double())
            per_token = torch.maximum(-a * ratio, -a * ratio.clamp(0.85, 1.28))
            return _agg64(per_token, mask, mode), {}

        _, token_form_grad, _ = _value_and_grad(
            lambda lp: _verl_gspo64(old.double(), lp, adv.double(), mask, 0.15, 0.28, mode, {},
                                    weights), logp.double())
        _, other_grad, _ = _value_and_grad(through_mean, logp.double())
        assert (other_grad - token_form_grad).abs().max() > 1e-3


def test_verl_gspo_bounded_above_and_the_one_case_left_to_verl(monkeypatch):
    """A row mean above +10 is bounded there (value exp(10), no gradient through it, as veRL's
    clamp); one row above +10 with another below -10 is veRL's own call (the op's log-ratio
    clamp is symmetric)."""
    config = _ActorConfig(clip_ratio=0.2, global_batch_info={})
    old, logp, adv, mask = _rollout(per_row=False)
    logp[3] = old[3] + 12.0
    adv[3] = -0.7  # A < 0: the unclipped ratio exp(10) is the loss
    weights = _rollout_weights(adv.shape)
    value, grad, metrics = _value_and_grad(
        lambda lp: our_verl.compute_policy_loss_gspo(old, lp, adv, mask, "token-mean", config,
                                                     weights), logp)
    ref, ref_grad, ref_metrics = _value_and_grad(
        lambda lp: _verl_gspo64(old.double(), lp, adv.double(), mask, 0.2, 0.2, "token-mean",
                                {}, weights), logp.double())
    _close(value, ref, name="gspo, ratio bounded above")
    _close(grad, ref_grad, name="gspo, ratio bounded above: d logp")
    assert float(grad[3].abs().max()) == 0.0
    _assert_metrics(metrics, ref_metrics, "gspo bounded above")
    calls = []
    monkeypatch.setattr(our_verl, "original",
                        lambda module, name: lambda *a: calls.append(name) or "veRL")
    logp[4] = old[4] - 12.0
    assert our_verl.compute_policy_loss_gspo(old, logp, adv, mask, "token-mean", config) == "veRL"
    assert calls == ["compute_policy_loss_gspo"]


def _rollout_weights(shape, seed=4):
    """veRL's rollout correction weights: >= 0, some exactly 0 (a rejected token), below and
    above 1."""
    weights = 2.0 * torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    weights[0, :2] = 0.0
    weights[1, 3] = 0.0
    return weights.to(DEVICE)


@pytest.mark.parametrize("info", _GLOBAL_INFO, ids=["local", "global"])
@pytest.mark.parametrize("per_row", [True, False], ids=["per-row A", "per-token A"])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "rollout weights"])
def test_verl_sapo_against_float64(info, per_row, weighted):
    """veRL's SAPO (tau_pos for A > 0 tokens, tau_neg for the others, seq-mean-token-mean
    whatever loss_agg_mode says) against its float64 formula: loss, d logp and metrics, with
    ratios far outside 1 (the gate saturates) and rollout correction weights (some 0)."""
    old, logp, adv, mask = _rollout(per_row=per_row)
    logp[0, :2] = old[0, :2] + torch.tensor([3.0, -3.0], device=DEVICE)
    adv[1, :3] = 0.0  # tau_neg's side, nothing to add
    weights = _rollout_weights(adv.shape) if weighted else None
    config = _ActorConfig(clip_ratio=0.2, tau_pos=1.3, tau_neg=2.5, global_batch_info=info)
    value, grad, metrics = _value_and_grad(
        lambda lp: our_verl.compute_policy_loss_sapo(old, lp, adv, mask, "token-mean", config,
                                                     weights), logp)
    ref, ref_grad, ref_metrics = _value_and_grad(
        lambda lp: _verl_sapo64(old.double(), lp, adv.double(), mask, 1.3, 2.5, info,
                                None if weights is None else weights.double()), logp.double())
    _close(value, ref, name="sapo loss")
    _close(grad, ref_grad, name="sapo d logp")
    _assert_metrics(metrics, ref_metrics, "sapo")
    assert value.dtype == torch.float32
    # the temperatures reach the op by sign: swapped, the loss changes
    swapped = _ActorConfig(config, tau_pos=2.5, tau_neg=1.3)
    other, _ = our_verl.compute_policy_loss_sapo(old, logp, adv, mask, "token-mean", swapped,
                                                 weights)
    assert not torch.allclose(other, value)


def test_verl_sapo_temperatures_outside_the_op_go_to_verl(monkeypatch):
    calls = []
    monkeypatch.setattr(our_verl, "original",
                        lambda module, name: lambda *a: calls.append(name) or "veRL")
    old, logp, adv, mask = _rollout()
    for bad in (dict(tau_neg=0.0), dict(tau_pos=-1.0), dict(tau_pos=float("inf")),
                dict(tau_neg=None)):
        config = _ActorConfig(dict(tau_pos=1.0, tau_neg=1.05, global_batch_info={}), **bad)
        assert our_verl.compute_policy_loss_sapo(old, logp, adv, mask, "token-mean",
                                                 config) == "veRL", bad
    assert calls == ["compute_policy_loss_sapo"] * 4


@pytest.mark.parametrize("info", _GLOBAL_INFO, ids=["local", "global"])
def test_verl_vanilla_token_sum(info):
    """veRL 0.9.1's agg_loss has token-sum (times dp_size): now computed by the kernels."""
    old, logp, adv, mask = _rollout(per_row=False)
    config = _ActorConfig(clip_ratio=0.2, clip_ratio_c=3.0, global_batch_info=info)
    value, grad, _ = _value_and_grad(
        lambda lp: our_verl.compute_policy_loss_vanilla(old, lp, adv, mask, "token-sum", config),
        logp)
    ref, ref_grad, _ = _value_and_grad(
        lambda lp: (_verl_vanilla64(old.double(), lp, adv.double(), mask, 0.2, 0.2, 3.0,
                                    "token-sum", info), None), logp.double())
    _close(value, ref, name="token-sum loss")
    _close(grad, ref_grad, name="token-sum d logp")


# --------------------------------------------------------------------------------------------
# (B,) advantages == the same advantages expanded to (B, T), through every loss drop-in
# --------------------------------------------------------------------------------------------
def _openrlhf_loss_self(policy_loss_type, dual_clip=None, token_level_loss=True):
    return types.SimpleNamespace(
        clip_eps_low=0.2, clip_eps_high=0.27, dual_clip=dual_clip,
        token_level_loss=False if policy_loss_type == "gspo" else token_level_loss,
        policy_loss_type=policy_loss_type, is_correction_level="off")


def _loss_dropins():
    config = _ActorConfig(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28,
                          clip_ratio_c=3.0, global_batch_info={})
    return {
        "verl vanilla": lambda o, lp, a, m: our_verl.compute_policy_loss_vanilla(
            o, lp, a, m, "seq-mean-token-mean", config),
        "verl gspo": lambda o, lp, a, m: our_verl.compute_policy_loss_gspo(
            o, lp, a, m, "token-mean", config),
        "verl cispo": lambda o, lp, a, m: our_verl.compute_policy_loss_cispo(
            o, lp, a, m, "seq-mean-token-sum", config),
        "verl deprecated": lambda o, lp, a, m: our_verl.compute_policy_loss(
            o, lp, a, m, 0.2, loss_agg_mode="token-mean"),
        "verl sapo": lambda o, lp, a, m: our_verl.compute_policy_loss_sapo(
            o, lp, a, m, "seq-mean-token-mean", _ActorConfig(config, tau_pos=1.0, tau_neg=1.05)),
        "openrlhf ppo": lambda o, lp, a, m: our_openrlhf.policy_loss_forward(
            _openrlhf_loss_self("ppo", dual_clip=3.0), lp, o, a, m)[:3],
        "openrlhf gspo": lambda o, lp, a, m: our_openrlhf.policy_loss_forward(
            _openrlhf_loss_self("gspo", dual_clip=3.0), lp, o, a, m)[:3],
    }


@pytest.mark.parametrize("name", list(_loss_dropins()))
def test_per_sequence_advantages_equal_expanded(name):
    fn = _loss_dropins()[name]
    old, logp, _, mask = _rollout(per_row=True)
    per_seq = torch.randn(old.shape[0], device=DEVICE)
    expanded = per_seq[:, None].expand(old.shape)
    results = []
    # (B, 1): veRL's and OpenRLHF's own losses broadcast it against (B, T)
    for adv in (per_seq, expanded, expanded.contiguous(), per_seq[:, None]):
        leaf = logp.detach().clone().requires_grad_(True)
        out = fn(old, leaf, adv, mask)
        (grad,) = torch.autograd.grad(out[0], leaf)
        results.append((out, grad))
    (out_b, grad_b), *others = results
    for out_bt, grad_bt in others:
        assert torch.equal(out_b[0], out_bt[0]), f"{name}: loss {out_b[0]} != {out_bt[0]}"
        assert torch.equal(grad_b, grad_bt), f"{name}: gradients differ"
        for a, b in zip(out_b[1:], out_bt[1:]):
            assert (a == b) if not torch.is_tensor(a) else torch.equal(a, b), name


@pytest.mark.parametrize("name", list(_loss_dropins()))
def test_advantages_broadcast_as_torch_broadcasts_them(name):
    """veRL's and OpenRLHF's losses multiply the ratio by the advantages (``-advantages *
    ratio``), so they take every shape torch broadcasts to (B, T): a (T,) or (1, T) row (one
    value per token position), a 0-d scalar; and a (B,) vector where B == T is that (T,) row,
    not one value per sequence. The drop-ins raised ValueError for the first three and read the
    last per sequence (another loss, silently)."""
    fn = _loss_dropins()[name]
    old, logp, _, mask = _rollout(B=7, T=7)
    row = torch.randn(7, device=DEVICE)
    for adv in (row, row[None, :], torch.tensor(-0.7, device=DEVICE)):
        full = torch.broadcast_to(adv, old.shape).contiguous()  # torch's reading, materialised
        outs = []
        for a in (adv, full):
            leaf = logp.detach().clone().requires_grad_(True)
            out = fn(old, leaf, a, mask)
            outs.append((out, torch.autograd.grad(out[0], leaf)[0]))
        (out, grad), (out_full, grad_full) = outs
        tag = f"{name} {tuple(adv.shape)}"
        torch.testing.assert_close(out[0], out_full[0], msg=lambda m, tag=tag: f"{tag}: {m}")
        torch.testing.assert_close(grad, grad_full, msg=lambda m, tag=tag: f"{tag}: {m}")
        if name == "verl vanilla":  # and veRL's formula in float64 on the broadcast advantages
            ref, ref_grad, _ = _value_and_grad(
                lambda lp, full=full: (_verl_vanilla64(old.double(), lp, full.double(), mask,
                                                       0.15, 0.28, 3.0, "seq-mean-token-mean",
                                                       {}), None),
                logp.double())
            _close(out[0], ref, name=f"{tag} loss")
            _close(grad, ref_grad, name=f"{tag} d logp")


# --------------------------------------------------------------------------------------------
# OpenRLHF
# --------------------------------------------------------------------------------------------
def _openrlhf_baseline64(raw, n, estimator, indices):
    """OpenRLHF 0.11.2's baseline step: scatter to prompt order, view (-1, n), shape, gather."""
    r = raw.double()
    ordered = torch.empty_like(r)
    ordered[indices] = r
    g = ordered.reshape(-1, n)
    if estimator == "rloo":
        g = g - (g.sum(-1, keepdim=True) - g) / (n - 1)
    elif estimator in ("reinforce_baseline", "dr_grpo"):
        g = g - g.mean(-1, keepdim=True)
    elif estimator == "group_norm":
        g = (g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True) + 1e-9)
    elif estimator == "flash_reinforce":
        g = g - g.mean()
    return g.reshape(-1)[indices]


@pytest.mark.parametrize("estimator", ["group_norm", "dr_grpo", "rloo", "reinforce_baseline",
                                       "flash_reinforce", "reinforce", "gae"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_openrlhf_group_baselines(estimator, dtype):
    n, N = 4, 16
    raw = torch.randn(N, device=DEVICE).to(dtype)
    raw[4:8] = 0.5  # a prompt whose samples all score the same
    indices = torch.randperm(N, device=DEVICE)
    out = our_openrlhf.group_baseline_rewards(raw, n, estimator, indices)
    ref = _openrlhf_baseline64(raw, n, estimator, indices)
    assert out.dtype == torch.promote_types(dtype, torch.float32)
    _close(out, ref, name=f"{estimator} {dtype}")
    in_order = our_openrlhf.group_baseline_rewards(raw, n, estimator)
    _close(in_order, _openrlhf_baseline64(raw, n, estimator, torch.arange(N, device=DEVICE)),
           name=f"{estimator} in prompt order")


def test_openrlhf_group_baseline_errors():
    r = torch.randn(6, device=DEVICE)
    with pytest.raises(ValueError, match="whole groups"):
        our_openrlhf.group_baseline_rewards(r, 4, "rloo")
    with pytest.raises(ValueError, match="n_samples_per_prompt > 1"):
        our_openrlhf.group_baseline_rewards(r, 1, "group_norm")
    with pytest.raises(ValueError, match="OpenRLHF's"):
        our_openrlhf.group_baseline_rewards(r, 3, "grpo")
    with pytest.raises(ValueError, match=r"\(N,\)"):
        our_openrlhf.group_baseline_rewards(r.view(2, 3), 3, "rloo")
    with pytest.raises(ValueError, match="indices"):
        our_openrlhf.group_baseline_rewards(r, 3, "rloo", torch.arange(5))
    # one sample per prompt: r - mean = 0 for the mean baselines, as OpenRLHF
    assert not our_openrlhf.group_baseline_rewards(r, 1, "dr_grpo").any()
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="n_samples_per_prompt must be an int >= 1"):
            our_openrlhf.group_baseline_rewards(r, bad, "rloo")


def test_openrlhf_group_baselines_take_numpy_and_tensor_counts():
    """n_samples_per_prompt from numpy config arithmetic or a 0-d tensor is the same count
    (before: refused unless a Python int)."""
    r = torch.randn(6, device=DEVICE)
    want = our_openrlhf.group_baseline_rewards(r, 3, "group_norm")
    for n in (np.int64(3), np.int32(3), torch.tensor(3)):
        assert torch.equal(our_openrlhf.group_baseline_rewards(r, n, "group_norm"), want)


def _openrlhf_gspo64(old, logp, adv, mask, low, high, dual_clip, dp_size=1,
                     global_batch_size=None):
    """OpenRLHF's GSPO: ratio = exp(mean over valid tokens of logp - old) per row, unclamped,
    gradient through the mean; PPO clip (and dual clip); per-sample aggregation."""
    m = (mask != 0).double()
    d = logp - old
    ratio = torch.exp((d * m).sum(-1) / m.sum(-1).clamp_min(1))[:, None] * m
    surr1, surr2 = ratio * adv, ratio.clamp(1 - low, 1 + high) * adv
    inner = torch.minimum(surr1, surr2)
    if dual_clip is not None:
        inner = torch.where(adv < 0, torch.maximum(inner, dual_clip * adv), inner)
    per_token = -inner
    has = m.sum(-1) > 0
    rows = (per_token * m).sum(-1) / m.sum(-1).clamp_min(1)
    n_rows = has.double().sum() if global_batch_size is None else global_batch_size
    loss = rows[has].sum() / n_rows * (dp_size if global_batch_size is not None else 1)
    clip_ratio = _masked_mean64((surr2 < surr1).double(), mask)
    return loss, (clip_ratio, _masked_mean64(-d, mask))


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("global_info", [{}, {"dp_size": 2, "global_batch_size": 9}])
def test_openrlhf_gspo_against_float64(dual_clip, per_row, global_info):
    old, logp, adv, mask = _rollout(per_row=per_row)
    logp[4] = old[4] + 1.5  # a row far past the clip range
    this = _openrlhf_loss_self("gspo", dual_clip=dual_clip)

    def ours(lp):
        loss, clip_ratio, ppo_kl, vllm_kl, filtered = our_openrlhf.policy_loss_forward(
            this, lp, old, adv, mask, None, **global_info)
        assert vllm_kl is None and filtered is None
        return loss, (clip_ratio, ppo_kl)

    value, grad, (clip_ratio, ppo_kl) = _value_and_grad(ours, logp)
    ref, ref_grad, (ref_clip, ref_kl) = _value_and_grad(
        lambda lp: _openrlhf_gspo64(old.double(), lp, adv.double(), mask, 0.2, 0.27, dual_clip,
                                    **global_info), logp.double())
    _close(value, ref, name="gspo loss")
    _close(grad, ref_grad, name="gspo d logp")
    _close(clip_ratio, ref_clip, name="clip_ratio")
    _close(ppo_kl, ref_kl, name="ppo_kl")
    assert value.dtype == clip_ratio.dtype == ppo_kl.dtype == torch.float32


def test_openrlhf_gspo_without_mask_goes_to_openrlhf(monkeypatch):
    monkeypatch.setattr(our_openrlhf, "original",
                        lambda module, name: lambda *a: ("OpenRLHF", name))
    old, logp, adv, _ = _rollout()
    out = our_openrlhf.policy_loss_forward(_openrlhf_loss_self("gspo"), logp, old, adv, None)
    assert out == ("OpenRLHF", "PolicyLoss.forward")


@pytest.mark.parametrize("bad", [-0.5, float("nan")], ids=["negative", "nan"])
def test_clip_ranges_outside_the_kernels_domain_go_to_the_framework(monkeypatch, bad):
    """veRL and OpenRLHF take their clip ranges as they come and compute a loss from a negative
    or NaN one (torch.clamp with those bounds); the op refuses them, and the drop-ins raised its
    ValueError ('clip_low=-0.5 must be >= 0 ...'), naming an option the framework's user never
    set, where the framework computes. Those calls now run the framework's own function; clip
    ranges of 0 and +inf stay with the kernels (veRL's float64 formula)."""
    monkeypatch.setattr(our_verl, "original", lambda module, name: lambda *a: ("veRL", name))
    monkeypatch.setattr(our_openrlhf, "original",
                        lambda module, name: lambda *a: ("OpenRLHF", name))
    old, logp, adv, mask = _rollout(per_row=False)
    losses = (our_verl.compute_policy_loss_vanilla, our_verl.compute_policy_loss_gspo,
              our_verl.compute_policy_loss_cispo)
    for field in ("clip_ratio_low", "clip_ratio_high"):
        config = _ActorConfig(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2,
                              clip_ratio_c=3.0, global_batch_info={})
        config[field] = bad
        for fn in losses:
            assert fn(old, logp, adv, mask, "token-mean", config) == ("veRL", fn.__name__)
    assert our_verl.compute_policy_loss(old, logp, adv, mask, 0.2, bad) == (
        "veRL", "compute_policy_loss")
    assert our_verl.compute_value_loss(logp, adv, old, mask, bad) == ("veRL", "compute_value_loss")
    for field, value in (("clip_eps_low", bad), ("clip_eps_high", bad), ("dual_clip", 0.5)):
        this = _openrlhf_loss_self("ppo")
        setattr(this, field, value)  # dual_clip <= 1 set after OpenRLHF's constructor checked it
        assert our_openrlhf.policy_loss_forward(this, logp, old, adv, mask) == (
            "OpenRLHF", "PolicyLoss.forward")
    value_self = types.SimpleNamespace(clip_eps=bad, token_level_loss=True)
    assert our_openrlhf.value_loss_forward(value_self, logp, old, adv, mask) == (
        "OpenRLHF", "ValueLoss.forward")
    # in the kernels' domain: computed here, veRL's formula
    config = _ActorConfig(clip_ratio=0.2, clip_ratio_low=0.0, clip_ratio_high=float("inf"),
                          clip_ratio_c=3.0, global_batch_info={})
    value, grad, _ = _value_and_grad(
        lambda lp: our_verl.compute_policy_loss_vanilla(old, lp, adv, mask, "token-mean", config),
        logp)
    ref, ref_grad, _ = _value_and_grad(
        lambda lp: (_verl_vanilla64(old.double(), lp, adv.double(), mask, 0.0, float("inf"), 3.0,
                                    "token-mean", {}), None), logp.double())
    _close(value, ref, name="clip 0 / inf loss")
    _close(grad, ref_grad, name="clip 0 / inf d logp")


def test_verl_negative_rollout_weights_go_to_verl(monkeypatch):
    """veRL multiplies each token's loss by its rollout weight; the drop-ins fold the weight into
    the advantages, which is exact for weights >= 0 (veRL's truncated ratios) but for w < 0
    gives min(r wA, c wA) where veRL computes w min(rA, cA): another loss, silently. A call with
    a negative weight is veRL's own; the same weights made >= 0 stay with the kernels (veRL's
    float64 formula)."""
    monkeypatch.setattr(our_verl, "original", lambda module, name: lambda *a: ("veRL", name))
    old, logp, adv, mask = _rollout(per_row=False)
    weights = _rollout_weights(adv.shape)
    weights[2, 1] = -0.5
    config = _ActorConfig(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28,
                          clip_ratio_c=3.0, tau_pos=1.0, tau_neg=1.05, global_batch_info={})
    for fn in our_verl.POLICY_LOSSES.values():
        assert fn(old, logp, adv, mask, "token-mean", config, weights) == ("veRL", fn.__name__)
    weights = weights.abs()
    value, grad, _ = _value_and_grad(
        lambda lp: our_verl.compute_policy_loss_vanilla(old, lp, adv, mask, "token-mean", config,
                                                        weights), logp)
    ref, ref_grad, _ = _value_and_grad(
        lambda lp: (_verl_vanilla64(old.double(), lp, adv.double(), mask, 0.15, 0.28, 3.0,
                                    "token-mean", {}, weights.double()), None), logp.double())
    _close(value, ref, name="weighted loss")
    _close(grad, ref_grad, name="weighted d logp")


def test_discounts_and_grpo_epsilon_outside_the_kernels_domain_go_to_the_framework(monkeypatch):
    """veRL's and OpenRLHF's GAE and discounted returns compute with any gamma / lambda (1.5
    grows the returns, NaN makes them NaN) and veRL's GRPO with any epsilon (NaN, inf, negative;
    unused without the std division); the ops refuse them outside [0, 1] / a finite number >= 0,
    and the drop-ins raised their ValueError ('gamma=1.5 must be in [0, 1]', 'eps=nan must be a
    finite number >= 0') where the frameworks compute. Those calls now run the framework's
    function; GRPO without the std division ignores epsilon, as veRL (its float64 formula)."""
    monkeypatch.setattr(our_verl, "original", lambda module, name: lambda *a: ("veRL", name))
    monkeypatch.setattr(our_openrlhf, "original",
                        lambda module, name: lambda *a: ("OpenRLHF", name))
    B, T = 6, 5
    rewards, values = torch.randn(B, T, device=DEVICE), torch.randn(B, T, device=DEVICE)
    mask = _holes_mask(B, T)
    index = ["a", "a", "b", "b", "b", "c"]
    for gamma, lam in ((1.5, 0.95), (0.99, float("nan")), (-0.1, 0.95), (0.99, 2.0)):
        assert our_verl.compute_gae_advantage_return(rewards, values, mask, gamma, lam) == (
            "veRL", "compute_gae_advantage_return")
        assert our_openrlhf.get_advantages_and_returns(None, values, rewards, mask, gamma,
                                                       lam) == (
            "OpenRLHF", "RemoteExperienceMaker.get_advantages_and_returns")
    for gamma in (1.5, float("nan"), float("inf")):
        assert our_verl.compute_reinforce_plus_plus_outcome_advantage(
            rewards, mask, _ActorConfig(gamma=gamma)) == (
            "veRL", "compute_reinforce_plus_plus_outcome_advantage")
        assert our_openrlhf.get_cumulative_returns(None, rewards, mask, gamma) == (
            "OpenRLHF", "RemoteExperienceMaker.get_cumulative_returns")
    for fn in (our_verl.compute_grpo_outcome_advantage,
               our_verl.compute_grpo_vectorized_outcome_advantage):
        for eps in (float("nan"), float("inf"), -1.0):
            assert fn(rewards, mask, index, eps) == ("veRL", fn.__name__)
            adv, _ = fn(rewards, mask, index, eps, False)  # no division: epsilon unused
            _close(adv, _grpo64(rewards, mask, index, scale=False), name=f"{fn.__name__} {eps}")


# --------------------------------------------------------------------------------------------
# registration under veRL's names
# --------------------------------------------------------------------------------------------
@pytest.fixture
def fake_verl(monkeypatch):
    """A stand-in veRL with the functions and registries patch_verl targets, under veRL's
    names (whatever veRL is or is not installed, these modules are used and then removed)."""
    modules = {}
    for name in ("verl", "verl.trainer", "verl.trainer.ppo", "verl.trainer.ppo.core_algos",
                 "verl.utils", "verl.utils.torch_functional", "verl.utils.experimental",
                 "verl.utils.experimental.torch_functional"):
        modules[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, modules[name])
    core = modules["verl.trainer.ppo.core_algos"]
    functional = modules["verl.utils.torch_functional"]

    def stand_in(name):
        def fn(*args, **kwargs):
            return ("veRL", name)
        fn.__name__ = name
        return fn

    core.ADV_ESTIMATOR_REGISTRY, core.POLICY_LOSS_REGISTRY = {}, {}
    for registry, ours in ((core.ADV_ESTIMATOR_REGISTRY, our_verl.ADVANTAGE_ESTIMATORS),
                           (core.POLICY_LOSS_REGISTRY, our_verl.POLICY_LOSSES)):
        for key, fn in ours.items():
            setattr(core, fn.__name__, stand_in(fn.__name__))
            registry[key] = getattr(core, fn.__name__)
    for name in ("kl_penalty", "compute_policy_loss", "compute_value_loss"):
        setattr(core, name, stand_in(name))
    for name in ("logprobs_from_logits", "entropy_from_logits",
                 "entropy_from_logits_with_chunking"):
        setattr(functional, name, stand_in(name))
    modules["verl.utils.experimental.torch_functional"].FusedLinearForPPOFunction = object
    monkeypatch.setattr(integrations, "_ORIGINALS", {})
    return core


def test_patch_verl_registers_under_verl_names(fake_verl):
    before = {**fake_verl.ADV_ESTIMATOR_REGISTRY, **fake_verl.POLICY_LOSS_REGISTRY}
    expected = {**our_verl.ADVANTAGE_ESTIMATORS, **our_verl.POLICY_LOSSES}
    assert set(our_verl.ADVANTAGE_ESTIMATORS) == {
        "gae", "grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "reinforce_plus_plus",
        "reinforce_plus_plus_baseline"}
    assert set(our_verl.POLICY_LOSSES) == {"vanilla", "gspo", "cispo", "sapo"}
    with integrations.patch_verl() as patch:
        assert not patch.skipped
        registries = {**fake_verl.ADV_ESTIMATOR_REGISTRY, **fake_verl.POLICY_LOSS_REGISTRY}
        for key, fn in expected.items():
            assert registries[key] is fn, key
            assert getattr(fake_verl, fn.__name__) is fn, fn.__name__
        # a fallback reaches veRL's own function while the patch is active
        assert integrations.original("verl.trainer.ppo.core_algos",
                                     "compute_policy_loss_gspo")() == (
            "veRL", "compute_policy_loss_gspo")
    after = {**fake_verl.ADV_ESTIMATOR_REGISTRY, **fake_verl.POLICY_LOSS_REGISTRY}
    assert after == before
    with integrations.patch_verl(keep_fp32=True):
        wrapped = fake_verl.ADV_ESTIMATOR_REGISTRY["grpo"]
        assert wrapped is not our_verl.compute_grpo_outcome_advantage
        rewards, mask = torch.randn(4, 3), torch.ones(4, 3, dtype=torch.bool)
        adv, _ = wrapped(rewards.bfloat16(), mask, [0, 0, 1, 1])
        assert adv.dtype == torch.float32  # veRL's dtype would be bf16


# --------------------------------------------------------------------------------------------
# against the frameworks themselves, where they are importable
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def verl_core():
    return pytest.importorskip("verl.trainer.ppo.core_algos")


def _verl_actor_config(**fields):
    """A veRL ActorConfig carrying just the fields the losses read (GSPO and CISPO check its
    type); built without the dataclass' validation of the fields they do not read."""
    from verl.workers.config import ActorConfig

    class Config(ActorConfig):
        strategy, rollout_n = "fsdp", 1  # abstract in ActorConfig

    config = object.__new__(Config)
    for key, value in fields.items():
        object.__setattr__(config, key, value)
    return config


@pytest.mark.parametrize("name", ["grpo", "grpo_vectorized", "rloo", "rloo_vectorized",
                                  "reinforce_plus_plus_baseline", "reinforce_plus_plus"])
def test_verl_estimators_against_verl(verl_core, name):
    B, T = len(_INDEX), 6
    rewards = torch.randn(B, T)
    mask = _holes_mask(B, T).cpu()
    config = _ActorConfig(gamma=0.9)
    theirs_fn = verl_core.get_adv_estimator_fn(name)
    call, _ = _estimator_cases(rewards, mask, _INDEX, config)[name]
    ours = call(our_verl.ADVANTAGE_ESTIMATORS[name])
    theirs = call(lambda r, *a, **k: theirs_fn(r.clone(), *a, **k))
    for o, t, what in zip(ours, theirs, ("advantages", "returns")):
        assert o.dtype == t.dtype, f"{name} {what}"
        _close(o, t, name=f"{name} {what}")


@pytest.mark.parametrize("loss", ["gspo", "cispo"])
@pytest.mark.parametrize("mode", _MODES)
def test_verl_gspo_cispo_against_verl(verl_core, loss, mode):
    old, logp, adv, mask = _rollout(per_row=True)
    old, logp, adv, mask = old.cpu(), logp.cpu(), adv.cpu(), mask.cpu()
    config = _verl_actor_config(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28,
                                global_batch_info={})
    theirs_fn = verl_core.get_policy_loss_fn(loss)
    value, grad, metrics = _value_and_grad(
        lambda lp: our_verl.POLICY_LOSSES[loss](old, lp, adv, mask, mode, config), logp)
    ref, ref_grad, ref_metrics = _value_and_grad(
        lambda lp: theirs_fn(old, lp, adv, mask, mode, config), logp)
    _close(value, ref, name=f"{loss} {mode}")
    _close(grad, ref_grad, name=f"{loss} {mode} d logp")
    _assert_metrics(metrics, ref_metrics, f"{loss} {mode}")


@pytest.mark.parametrize("weighted", [False, True], ids=["", "rollout weights"])
@pytest.mark.parametrize("per_row", [True, False], ids=["per-row A", "per-token A"])
@pytest.mark.parametrize("mode", _MODES)
def test_verl_gspo_token_form_against_verl(verl_core, mode, per_row, weighted):
    """Our GSPO drop-in against veRL's own compute_policy_loss_gspo with per-token advantages
    and rollout correction weights (which fell back to veRL before): loss, d logp, metrics."""
    old, logp, adv, mask = (t.cpu() for t in _rollout(per_row=per_row))
    logp[0, :2] = old[0, :2] + torch.tensor([3.0, -3.0])
    logp[3] = old[3] - 12.0
    weights = _rollout_weights(adv.shape).cpu() if weighted else None
    config = _verl_actor_config(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28,
                                global_batch_info={})
    theirs_fn = verl_core.get_policy_loss_fn("gspo")
    assert theirs_fn is not our_verl.compute_policy_loss_gspo
    value, grad, metrics = _value_and_grad(
        lambda lp: our_verl.compute_policy_loss_gspo(old, lp, adv, mask, mode, config, weights),
        logp)
    ref, ref_grad, ref_metrics = _value_and_grad(
        lambda lp: theirs_fn(old, lp, adv, mask, mode, config, weights), logp)
    assert value.dtype == ref.dtype
    _close(value, ref, name=f"gspo {mode}")
    _close(grad, ref_grad, name=f"gspo {mode} d logp")
    _assert_metrics(metrics, ref_metrics, f"gspo {mode}")


@pytest.mark.parametrize("weighted", [False, True], ids=["", "rollout weights"])
@pytest.mark.parametrize("per_row", [True, False], ids=["per-row A", "per-token A"])
@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean"])
def test_verl_sapo_against_verl(verl_core, mode, per_row, weighted):
    """Our drop-in against veRL's own compute_policy_loss_sapo (POLICY_LOSS_REGISTRY["sapo"]):
    loss, d logp, metrics, with veRL's rollout correction weights."""
    old, logp, adv, mask = (t.cpu() for t in _rollout(per_row=per_row))
    logp[0, :2] = old[0, :2] + torch.tensor([3.0, -3.0])
    weights = _rollout_weights(adv.shape).cpu() if weighted else None
    config = _verl_actor_config(clip_ratio=0.2, tau_pos=1.3, tau_neg=2.5, global_batch_info={})
    theirs_fn = verl_core.get_policy_loss_fn("sapo")
    assert theirs_fn is not our_verl.compute_policy_loss_sapo
    value, grad, metrics = _value_and_grad(
        lambda lp: our_verl.compute_policy_loss_sapo(old, lp, adv, mask, mode, config, weights),
        logp)
    ref, ref_grad, ref_metrics = _value_and_grad(
        lambda lp: theirs_fn(old, lp, adv, mask, mode, config, weights), logp)
    assert value.dtype == ref.dtype
    _close(value, ref, name=f"sapo {mode}")
    _close(grad, ref_grad, name=f"sapo {mode} d logp")
    _assert_metrics(metrics, ref_metrics, f"sapo {mode}")


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_openrlhf_gspo_against_openrlhf(dual_clip):
    loss_module = pytest.importorskip("openrlhf.models.loss")
    old, logp, adv, mask = (t.cpu() for t in _rollout(per_row=False))
    module = loss_module.PolicyLoss(0.2, 0.27, dual_clip=dual_clip, policy_loss_type="gspo")
    value, grad, _ = _value_and_grad(
        lambda lp: (our_openrlhf.policy_loss_forward(module, lp, old, adv, mask)[0], None), logp)
    own = integrations.original("openrlhf.models.loss", "PolicyLoss.forward")
    ref, ref_grad, _ = _value_and_grad(lambda lp: (own(module, lp, old, adv, mask)[0], None),
                                       logp)
    _close(value, ref, name="gspo loss")
    _close(grad, ref_grad, name="gspo d logp")
