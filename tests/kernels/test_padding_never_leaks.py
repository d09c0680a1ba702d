"""Masked positions never contaminate anything, on either backend.

Padding is often uninitialised memory, and a model's hidden states / logits at padded positions
can be anything: NaN, +inf, -inf. For every op that takes a mask (or ignore_index labels), on the
reference backend and on the Triton path (the interpreter without a GPU), each case is run twice:
once with finite junk at the masked positions and once with NaN / +inf / -inf poked there. Every
output (per-token outputs at padding included, every stat) and every gradient must be finite and
equal, bit for bit, between the two runs. (kl_penalty and bradley_terry_loss take no mask: a
non-finite input is a real input there and gives a non-finite output where it sits.)

A -inf logit at a *valid* position is a legitimate "this token is banned" entry: logprobs with
entropy must give finite values and gradients there too, equal to the op over the vocabulary
without those entries.
"""

from __future__ import annotations

import pytest
import torch

import rlhf_kernels as rk
from tests.numerics import DEVICE, padded_mask

BACKENDS = ("reference", "triton")
ROWS, T, V, H = 5, 9, 11, 8  # padded_mask cycles right/left padding, holes, all-masked, full
NAN, INF = float("nan"), float("inf")


def poisoned(x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """x with the masked positions (masked: x's shape, or its leading dims for whole rows)
    replaced by NaN, +inf and -inf in turn."""
    pattern = torch.tensor([NAN, INF, -INF], device=x.device)
    pattern = pattern[torch.arange(x.numel(), device=x.device) % 3].reshape(x.shape).to(x.dtype)
    if masked.dim() < x.dim():
        masked = masked.reshape(*masked.shape, *([1] * (x.dim() - masked.dim())))
    return torch.where(masked, pattern, x)


def flat_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return [t for item in out for t in flat_outputs(item)]


def junk_like(x: torch.Tensor) -> torch.Tensor:
    """Finite but large values, so a multiply-by-mask would still change the result via 0 * x."""
    return torch.randn_like(x) * 30.0


def rollout(mask):
    """Per-token rollout tensors (ROWS, T) with finite junk at the masked positions."""
    logp = -torch.rand(ROWS, T, device=DEVICE) * 3
    old = logp + 0.3 * torch.randn(ROWS, T, device=DEVICE)
    adv = torch.randn(ROWS, T, device=DEVICE)
    return [torch.where(mask, t, junk_like(t)) for t in (logp, old, adv)]


def labels_for(mask):
    """Token ids at valid positions; at masked ones a mix of ignore_index and real ids."""
    labels = torch.randint(0, V, (ROWS, T), device=DEVICE)
    ignored = ~mask & (torch.rand(ROWS, T, device=DEVICE) < 0.5)
    return torch.where(ignored, torch.full_like(labels, -100), labels)


# Each case: make() -> (inputs dict, {name: bool positions to poison}, mask, labels)
#            call(inputs, mask, labels, backend) -> outputs; grads(backend) -> names to diff.
def _policy():
    mask = padded_mask(ROWS, T)
    logp, old, adv = rollout(mask)
    inputs = {"logp": logp, "old_logp": old, "advantages": adv}
    return inputs, {k: ~mask for k in inputs}, mask, None


def _value():
    mask = padded_mask(ROWS, T)
    values, old, returns = rollout(mask)
    inputs = {"values": values, "old_values": old, "returns": returns * 4 + 1}
    return inputs, {k: ~mask for k in inputs}, mask, None


def _gae():
    mask = padded_mask(ROWS, T)
    rewards, values, _ = rollout(mask)
    inputs = {"rewards": rewards, "values": values}
    return inputs, {k: ~mask for k in inputs}, mask, None


def _whiten():
    mask = padded_mask(ROWS, T)
    inputs = {"x": rollout(mask)[2] * 3 + 2}
    return inputs, {"x": ~mask}, mask, None


def _rewards():
    mask = padded_mask(ROWS, T)
    logp, ref, _ = rollout(mask)
    scores = torch.randn(ROWS, device=DEVICE)
    # A row with no valid token has nowhere to put its score: its score may be junk too.
    inputs = {"scores": scores, "logp": logp, "ref_logp": ref}
    return inputs, {"scores": ~mask.any(-1), "logp": ~mask, "ref_logp": ~mask}, mask, None


def _logits_rows():
    mask = padded_mask(ROWS, T)
    labels = labels_for(mask)
    logits = torch.randn(ROWS, T, V, device=DEVICE) * 2
    return logits, mask, labels


def _logprobs():
    logits, _, labels = _logits_rows()
    return {"logits": logits}, {"logits": labels == -100}, None, labels


def _linear_head():
    mask = padded_mask(ROWS, T)
    labels = labels_for(mask)
    hidden = torch.randn(ROWS, T, H, device=DEVICE)
    weight = torch.randn(V, H, device=DEVICE) * H ** -0.5 * 2
    bias = torch.randn(V, device=DEVICE)
    return {"hidden": hidden, "weight": weight, "bias": bias}, mask, labels


def _linear_logprobs():
    inputs, _, labels = _linear_head()
    return inputs, {"hidden": labels == -100}, None, labels


def _fused_logits():
    logits, mask, labels = _logits_rows()
    logp, old, adv = rollout(mask)
    counted = mask & (labels != -100)
    inputs = {"logits": logits, "old_logp": old, "advantages": adv, "ref_logp": logp}
    return inputs, {k: ~counted for k in inputs}, mask, labels


def _fused_linear():
    head, mask, labels = _linear_head()
    logp, old, adv = rollout(mask)
    counted = mask & (labels != -100)
    inputs = dict(head, old_logp=old, advantages=adv, ref_logp=logp)
    poison = {k: ~counted for k in ("hidden", "old_logp", "advantages", "ref_logp")}
    return inputs, poison, mask, labels


REDUCTIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
FUSED = dict(kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0, reduction="seq-mean-token-mean")

CASES = {
    "ppo_policy_loss": (
        _policy,
        lambda x, m, lab, b: [
            rk.ppo_policy_loss(x["logp"], x["old_logp"], x["advantages"], m, dual_clip=dual,
                               reduction=reduction, backend=b)
            for reduction, dual in zip(REDUCTIONS, (3.0, None, 3.0, None))],
        lambda b: ("logp",) if b == "triton" else ("logp", "old_logp", "advantages")),
    "ppo_value_loss": (
        _value,
        lambda x, m, lab, b: [
            rk.ppo_value_loss(x["values"], x["old_values"], x["returns"], m, clip=clip,
                              reduction=reduction, backend=b)
            for reduction, clip in zip(REDUCTIONS, (0.2, None, 0.2, None))],
        lambda b: ("values",) if b == "triton" else ("values", "old_values", "returns")),
    "gae": (
        _gae,
        lambda x, m, lab, b: rk.gae(x["rewards"], x["values"], m, gamma=0.9, lam=0.8, backend=b),
        lambda b: ()),
    "masked_whiten": (
        _whiten,
        lambda x, m, lab, b: (rk.masked_whiten(x["x"], m, backend=b),
                              rk.masked_whiten(x["x"], m, shift_mean=False, backend=b)),
        lambda b: ()),
    "shape_rewards": (
        _rewards,
        lambda x, m, lab, b: rk.shape_rewards(x["scores"], x["logp"], x["ref_logp"], m, 0.1,
                                              estimator="k3", backend=b),
        lambda b: ()),
    "logprobs": (
        _logprobs,
        lambda x, m, lab, b: rk.logprobs(x["logits"], lab, backend=b),
        lambda b: ("logits",)),
    "logprobs+entropy": (
        _logprobs,
        lambda x, m, lab, b: rk.logprobs(x["logits"], lab, 0.7, return_entropy=True, backend=b),
        lambda b: ("logits",)),
    "linear_logprobs": (
        _linear_logprobs,
        lambda x, m, lab, b: rk.linear_logprobs(x["hidden"], x["weight"], lab, x["bias"],
                                                return_entropy=True, backend=b),
        lambda b: ("hidden", "weight", "bias")),
    "ppo_loss_from_logits": (
        _fused_logits,
        lambda x, m, lab, b: rk.ppo_loss_from_logits(
            x["logits"], lab, x["old_logp"], x["advantages"], m, ref_logp=x["ref_logp"],
            backend=b, **FUSED),
        lambda b: ("logits",)),
    "linear_ppo_loss": (
        _fused_linear,
        lambda x, m, lab, b: rk.linear_ppo_loss(
            x["hidden"], x["weight"], lab, x["old_logp"], x["advantages"], m, bias=x["bias"],
            ref_logp=x["ref_logp"], backend=b, **FUSED),
        lambda b: ("hidden", "weight", "bias")),
}


def run(call, inputs, grad_names, mask, labels, backend, upstream):
    leaves = {k: v.detach().clone().requires_grad_(k in grad_names) for k, v in inputs.items()}
    outs = flat_outputs(call(leaves, mask, labels, backend))
    grads = []
    if grad_names:
        total = sum((o.double() * u).sum() for o, u in zip(outs, upstream) if o.requires_grad)
        grads = list(torch.autograd.grad(total, [leaves[k] for k in grad_names]))
    return [o.detach() for o in outs], grads


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(CASES))
def test_poisoned_padding_changes_nothing(op, backend):
    make, call, grads_for = CASES[op]
    inputs, poison, mask, labels = make()
    grad_names = grads_for(backend)
    dirty = {k: poisoned(v, poison[k]) if k in poison else v for k, v in inputs.items()}
    assert all(not torch.isfinite(dirty[k]).all() for k in poison if poison[k].any())

    clean_outs = flat_outputs(call(inputs, mask, labels, backend))
    upstream = [torch.randn(o.shape, dtype=torch.float64, device=DEVICE) for o in clean_outs]
    clean, clean_grads = run(call, inputs, grad_names, mask, labels, backend, upstream)
    outs, grads = run(call, dirty, grad_names, mask, labels, backend, upstream)

    names = [f"output {i}" for i in range(len(clean))] + [f"d {k}" for k in grad_names]
    for name, got, want in zip(names, outs + grads, clean + clean_grads):
        assert torch.isfinite(want).all(), f"{op} [{backend}] {name}: not finite with finite junk"
        bad = ~torch.isfinite(got)
        assert not bad.any(), (
            f"{op} [{backend}] {name}: {int(bad.sum())} of {got.numel()} elements not finite "
            "when the padding holds NaN / inf")
        assert torch.equal(got, want), (
            f"{op} [{backend}] {name}: differs when the padding holds NaN / inf instead of "
            f"finite junk; max difference {(got.double() - want.double()).abs().max():.3e}")


PER_TOKEN = ("gae", "masked_whiten", "shape_rewards", "logprobs", "logprobs+entropy",
             "linear_logprobs")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("op", PER_TOKEN)
def test_both_backends_write_the_same_padding(op):
    """Per-token outputs are 0 at every position that does not count, on both backends, with
    NaN / inf there in the input; elsewhere the backends agree to fp32 rounding."""
    make, call, _ = CASES[op]
    inputs, poison, mask, labels = make()
    dirty = {k: poisoned(v, poison[k]) if k in poison else v for k, v in inputs.items()}
    padding = ~mask if mask is not None else labels == -100
    ref = flat_outputs(call(dirty, mask, labels, "reference"))
    tri = flat_outputs(call(dirty, mask, labels, "triton"))
    for i, (r, t) in enumerate(zip(ref, tri)):
        assert (r[padding] == 0).all() and (t[padding] == 0).all(), f"{op} output {i} padding"
        torch.testing.assert_close(t, r, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# -inf logits at valid positions (banned tokens)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_vocabulary_entries_give_finite_entropy_gradients(backend):
    rows, vocab = 6, 13
    banned = torch.zeros(vocab, dtype=torch.bool, device=DEVICE)
    banned[[0, 4, 5, 12]] = True
    kept = (~banned).nonzero().squeeze(-1)
    logits = torch.randn(rows, vocab, device=DEVICE) * 2
    logits[:, banned] = -INF
    # Labels among the kept tokens, in both numberings.
    labels_kept = torch.randint(0, kept.numel(), (rows,), device=DEVICE)
    labels = kept[labels_kept]
    up_logp, up_ent = torch.randn(rows, device=DEVICE), torch.randn(rows, device=DEVICE)

    x = logits.clone().requires_grad_()
    logp, ent = rk.logprobs(x, labels, 0.8, return_entropy=True, backend=backend)
    ((logp * up_logp).sum() + (ent * up_ent).sum()).backward()

    y = logits[:, kept].clone().requires_grad_()
    logp_k, ent_k = rk.logprobs(y, labels_kept, 0.8, return_entropy=True, backend=backend)
    ((logp_k * up_logp).sum() + (ent_k * up_ent).sum()).backward()

    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert torch.isfinite(x.grad).all(), f"[{backend}] NaN gradient with -inf logits"
    assert (x.grad[:, banned] == 0).all()
    # the same fp32 math over two vocabulary layouts: equal up to a few ulps of the values
    torch.testing.assert_close(logp, logp_k, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(ent, ent_k, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(x.grad[:, kept], y.grad, rtol=2e-6, atol=1e-6)
