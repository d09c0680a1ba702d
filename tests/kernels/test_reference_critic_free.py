"""The float64 spec of the critic-free options of the policy losses, against closed forms and
independent formulas (the kernels are tested against this spec in their own test files)."""

import math

import pytest
import torch

from rlhf_kernels import reference as ref


@pytest.fixture(autouse=True)
def _float64_default():
    """Every tensor of these tests in float64 (the spec's precision); restored afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _batch(B=3, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 2
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    mask[-1] = False  # a row with no token
    adv = torch.randn(B, generator=g)
    return logp, old, mask, adv


def test_sequence_advantages_equal_expanded_ones():
    logp, old, mask, adv = _batch()
    for kwargs in ({}, {"ratio_level": "sequence"}, {"loss_type": "cispo"},
                   {"dual_clip": 3.0, "reduction": "seq-mean-token-sum"}):
        x1 = logp.clone().requires_grad_()
        x2 = logp.clone().requires_grad_()
        l1, s1 = ref.ppo_policy_loss(x1, old, adv, mask, **kwargs)
        l2, s2 = ref.ppo_policy_loss(x2, old, adv[:, None].expand_as(logp).clone(), mask,
                                     **kwargs)
        l1.backward()
        l2.backward()
        assert torch.equal(l1, l2)
        assert torch.equal(x1.grad, x2.grad)
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_gspo_value_and_gradient_closed_form():
    """Per row i with n_i valid tokens, dbar_i = mean(logp - old), s_i = exp(dbar_i); with
    seq-mean-token-mean the loss is the mean over rows of max(-A s, -A clip(s)) and
    d loss / d logp_t = -A_i s_i / n_i / n_rows where the clip does not bite, else 0."""
    logp, old, mask, adv = _batch(B=4, T=6, seed=1)
    x = logp.clone().requires_grad_()
    loss, stats = ref.ppo_policy_loss(x, old, adv, mask, ratio_level="sequence",
                                      reduction="seq-mean-token-mean", clip_low=0.1,
                                      clip_high=0.1)
    loss.backward()
    m = mask.double()
    rows = [i for i in range(4) if m[i].sum() > 0]
    expected_loss, expected_grad = 0.0, torch.zeros_like(logp)
    for i in rows:
        n = m[i].sum()
        s = math.exp(float(((logp[i] - old[i]) * m[i]).sum() / n))
        a = float(adv[i])
        unclipped, clipped = -a * s, -a * min(max(s, 0.9), 1.1)
        expected_loss += max(unclipped, clipped)
        if unclipped >= clipped:
            expected_grad[i] = m[i] * (-a * s / n)
    expected_loss /= len(rows)
    expected_grad /= len(rows)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-12, atol=1e-15)


def test_gspo_matches_the_gspo_token_form_with_sequence_advantages():
    """veRL's GSPO-token: log s_t = logp_t - sg(logp_t) + sg(dbar); same value, and with one
    advantage per sequence and seq-mean-token-mean the same gradient."""
    logp, old, mask, adv = _batch(B=3, T=7, seed=2)
    x = logp.clone().requires_grad_()
    loss, _ = ref.ppo_policy_loss(x, old, adv, mask, ratio_level="sequence",
                                  reduction="seq-mean-token-mean", log_ratio_clamp=None)
    loss.backward()
    y = logp.clone().requires_grad_()
    m = mask.double()
    dbar = ((y - old) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1)
    s = torch.exp(y - y.detach() + dbar.detach())
    A = adv[:, None]
    per = torch.maximum(-A * s, -A * s.clamp(0.8, 1.2))
    row = (per * m).sum(-1) / m.sum(-1).clamp_min(1)
    has = m.sum(-1) > 0
    loss_token_form = row[has].mean()
    loss_token_form.backward()
    torch.testing.assert_close(loss, loss_token_form, rtol=1e-12, atol=0)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-15)


def test_cispo_value_and_gradient_closed_form():
    logp, old, mask, _ = _batch(B=3, T=6, seed=3)
    adv = torch.randn(3, 6, generator=torch.Generator().manual_seed(9))
    x = logp.clone().requires_grad_()
    loss, stats = ref.ppo_policy_loss(x, old, adv, mask, loss_type="cispo", clip_low=1.0,
                                      clip_high=0.25, reduction="token-sum")
    loss.backward()
    m = mask.double()
    w = torch.exp(logp - old).clamp(max=1.25)
    torch.testing.assert_close(loss, (-(w * adv * logp) * m).sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(x.grad, -(w * adv) * m, rtol=1e-12, atol=0)
    outside = (torch.exp(logp - old) > 1.25).double()
    assert stats["clipfrac"].item() == pytest.approx(float((outside * m).sum() / m.sum()))


@pytest.mark.parametrize("reduction", ref.REDUCTIONS)
def test_normalizer_replaces_the_outer_denominator(reduction):
    logp, old, mask, adv = _batch(B=4, T=5, seed=4)
    m = mask.double()
    base, _ = ref.ppo_policy_loss(logp, old, adv, mask, reduction=reduction)
    outer = {"token-mean": m.sum(), "seq-mean-token-mean": (m.sum(-1) > 0).sum(),
             "seq-mean-token-sum": (m.sum(-1) > 0).sum(), "seq-mean-token-sum-norm": 5,
             "token-sum": 1}[reduction]
    for normalizer in (7.0, torch.tensor(7.0)):
        loss, _ = ref.ppo_policy_loss(logp, old, adv, mask, reduction=reduction,
                                      normalizer=normalizer)
        torch.testing.assert_close(loss, base * float(outer) / 7.0, rtol=1e-12, atol=0)


def test_token_sum_is_the_masked_sum():
    logp, old, mask, adv = _batch(seed=5)
    per = torch.maximum(-adv[:, None] * torch.exp(logp - old),
                        -adv[:, None] * torch.exp(logp - old).clamp(0.8, 1.2))
    loss, _ = ref.ppo_policy_loss(logp, old, adv, mask, reduction="token-sum")
    torch.testing.assert_close(loss, (per * mask).sum(), rtol=1e-12, atol=0)


def test_kl_term_is_added_with_the_same_reduction():
    logp, old, mask, adv = _batch(seed=6)
    ref_logp = logp - 0.2 * torch.randn_like(logp)
    pg, _ = ref.ppo_policy_loss(logp, old, adv, mask, reduction="seq-mean-token-mean")
    total, stats = ref.ppo_policy_loss(logp, old, adv, mask, reduction="seq-mean-token-mean",
                                       ref_logp=ref_logp, kl_coef=0.05, kl_estimator="k3")
    d = logp - ref_logp
    k3 = torch.exp(-d) + d - 1
    kl = ref.reduce_loss(k3, mask.double(), "seq-mean-token-mean")
    torch.testing.assert_close(total, pg + 0.05 * kl, rtol=1e-12, atol=0)
    torch.testing.assert_close(stats["kl"], kl)
    torch.testing.assert_close(stats["pg_loss"], pg)


def test_fused_reference_takes_the_same_options():
    """ppo_loss_from_logits' policy term equals ppo_policy_loss of the same log-probs."""
    g = torch.Generator().manual_seed(7)
    B, T, V = 2, 4, 11
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 2:] = False
    old = ref.logprobs(logits, labels) + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    for kwargs in ({"ratio_level": "sequence"}, {"loss_type": "cispo"},
                   {"reduction": "token-sum", "normalizer": 3.0}):
        fused, stats = ref.ppo_loss_from_logits(logits, labels, old, adv, mask, **kwargs)
        logp = ref.logprobs(logits, labels)
        plain, _ = ref.ppo_policy_loss(logp, old, adv, mask, **kwargs)
        torch.testing.assert_close(fused, plain, rtol=1e-12, atol=0)
        torch.testing.assert_close(stats["pg_loss"], plain, rtol=1e-12, atol=0)


def test_bad_options_give_one_clear_error():
    logp, old, mask, adv = _batch()
    with pytest.raises(ValueError, match="ratio_level='seq' is not supported"):
        ref.ppo_policy_loss(logp, old, adv, mask, ratio_level="seq")
    with pytest.raises(ValueError, match="loss_type='grpo' is not supported"):
        ref.ppo_policy_loss(logp, old, adv, mask, loss_type="grpo")
    with pytest.raises(ValueError, match="dual_clip applies to loss_type='ppo'"):
        ref.ppo_policy_loss(logp, old, adv, mask, loss_type="cispo", dual_clip=3.0)
    with pytest.raises(ValueError, match=r"one per sequence \(3,\)"):
        ref.ppo_policy_loss(logp, old, adv[:2], mask)
    with pytest.raises(ValueError, match="normalizer must be > 0"):
        ref.ppo_policy_loss(logp, old, adv, mask, normalizer=0)
    with pytest.raises(ValueError, match="0-d real tensor"):
        ref.ppo_policy_loss(logp, old, adv, mask, normalizer=torch.ones(2))
    with pytest.raises(ValueError, match="reduction='mean' is not supported"):
        ref.ppo_policy_loss(logp, old, adv, mask, reduction="mean")
