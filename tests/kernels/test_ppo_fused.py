"""The fused PPO step (linear_ppo_loss, ppo_loss_from_logits) against the float64 reference.

Loss, stats and gradients (through autograd of the reference, with a random upstream scalar) for
every reduction, the clip options, each KL estimator and the entropy term; the gradient is made
in the forward sweep and only scaled in backward, so scaling and double backward are checked too.
The critic-free options (per-sequence advantages, which must give the bits of the expanded
per-token ones; GSPO's sequence ratio, on the linear path with rows straddling chunks; CISPO;
token-sum and normalizer) in both ops with every KL estimator, the per-token derivatives at
ties and clamp bounds against autograd, and the two-sweep path's matmul count and memory.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf_kernels import reference
from rlhf_kernels.ops.ppo_fused import (
    linear_ppo_loss,
    per_token_terms,
    ppo_loss_from_logits,
    reduction_weights,
)
from tests.numerics import DEVICE, assert_close, assert_close_2x

HEAD = ("hidden", "weight", "bias", "lora_a", "lora_b")


def _rollout(B, T, V, logp_of, ignore=True):
    """labels, mask (row 1 fully masked, some right padding), and old / ref logp near the current
    policy's so that ratios land on both sides of the clip range."""
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    if ignore:
        labels[0, 1] = -100
    mask = torch.ones(B, T, device=DEVICE, dtype=torch.bool)
    mask[1] = False
    mask[-1, T // 2:] = False
    with torch.no_grad():
        logp = logp_of(labels).float()
    old_logp = logp + 0.3 * torch.randn(B, T, device=DEVICE)
    ref_logp = logp + 0.2 * torch.randn(B, T, device=DEVICE)
    advantages = torch.randn(B, T, device=DEVICE)
    return labels, mask, old_logp, advantages, ref_logp


def _head(B, T, H, V, dtype=torch.float32, rank=3):
    hidden = torch.randn(B, T, H, device=DEVICE).to(dtype)
    weight = (torch.randn(V, H, device=DEVICE) * 2 * H ** -0.5).to(dtype)
    bias = torch.randn(V, device=DEVICE).to(dtype)
    lora_a = (torch.randn(rank, H, device=DEVICE) * H ** -0.5).to(dtype)
    lora_b = torch.randn(V, rank, device=DEVICE).to(dtype)
    return [hidden, weight, bias, lora_a, lora_b]


def _loss_and_grads(fn, params, upstream, **kw):
    leaves = [p.detach().clone().requires_grad_() for p in params]
    loss, stats = fn(*leaves, **kw)
    grads = torch.autograd.grad(loss * upstream, leaves)
    return loss, stats, grads


def _check_stats(stats, stats64, n_valid):
    assert set(stats) == set(stats64)
    for key in stats64:
        # one token flipping sides of a clip boundary moves clipfrac by 1 / n
        atol = 1.5 / max(n_valid, 1) if key == "clipfrac" else 2e-5
        assert_close(stats[key], stats64[key], atol=atol, rtol=1e-4, name=key)


OPTIONS = dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, temperature=0.8, dual_clip=3.0)


@pytest.mark.parametrize("reduction", reference.REDUCTIONS)
def test_linear_ppo_loss_reductions(reduction):
    B, T, H, V = 3, 7, 13, 67
    params = _head(B, T, H, V)
    labels, mask, old_logp, advantages, ref_logp = _rollout(
        B, T, V, lambda lab: reference.linear_logprobs(*params[:2], lab, *params[2:], 0.5, 0.8))
    upstream = torch.randn((), device=DEVICE)

    def kernel(h, w, b, a, lb):
        return linear_ppo_loss(h, w, labels, old_logp, advantages, mask, b, a, lb, 0.5,
                               ref_logp, reduction=reduction, chunk_size=4, backend="triton",
                               **OPTIONS)

    def ref(h, w, b, a, lb):
        return reference.linear_ppo_loss(h, w, labels, old_logp, advantages, mask, b, a, lb, 0.5,
                                         ref_logp, reduction=reduction, **OPTIONS)

    loss, stats, grads = _loss_and_grads(kernel, params, upstream)
    loss32, _, grads32 = _loss_and_grads(ref, params, upstream)
    loss64, stats64, grads64 = _loss_and_grads(ref, [p.double() for p in params], upstream)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close_2x(loss, loss32, loss64, torch.float32, name="loss")
    for g, g32, g64, name in zip(grads, grads32, grads64, HEAD):
        assert_close_2x(g, g32, g64, torch.float32, name=f"d {name}")
    n_valid = int((mask & (labels != -100)).sum())
    _check_stats(stats, stats64, n_valid)


def _logits_case(B, T, V, dtype):
    logits = (torch.randn(B, T, V, device=DEVICE) * 2).to(dtype)
    rollout = _rollout(B, T, V, lambda lab: reference.logprobs(logits, lab, 0.8))
    return logits, rollout


@pytest.mark.parametrize("reduction", reference.REDUCTIONS)
@pytest.mark.parametrize("kl_estimator", reference.KL_ESTIMATORS)
def test_logits_reductions_and_estimators(reduction, kl_estimator):
    B, T, V = 3, 6, 131
    logits, (labels, mask, old_logp, advantages, ref_logp) = _logits_case(B, T, V, torch.float32)
    upstream = torch.randn((), device=DEVICE)
    options = dict(OPTIONS, kl_estimator=kl_estimator, reduction=reduction)

    def kernel(z):
        return ppo_loss_from_logits(z, labels, old_logp, advantages, mask, ref_logp,
                                    backend="triton", **options)

    def ref(z):
        return reference.ppo_loss_from_logits(z, labels, old_logp, advantages, mask, ref_logp,
                                              **options)

    loss, stats, (grad,) = _loss_and_grads(kernel, [logits], upstream)
    loss32, _, (grad32,) = _loss_and_grads(ref, [logits], upstream)
    loss64, stats64, (grad64,) = _loss_and_grads(ref, [logits.double()], upstream)
    assert_close_2x(loss, loss32, loss64, torch.float32, name="loss")
    assert_close_2x(grad, grad32, grad64, torch.float32, name="d logits")
    assert grad.dtype == logits.dtype
    _check_stats(stats, stats64, int((mask & (labels != -100)).sum()))


# (dtype, options): the clip options one at a time, the entropy term alone, bf16 / fp16 logits
OPTION_CASES = [
    (torch.float32, dict()),  # plain clipped surrogate, no KL, no entropy
    (torch.float32, dict(entropy_coef=0.05)),
    (torch.float32, dict(clip_low=0.1, clip_high=0.28, log_ratio_clamp=0.25)),
    (torch.float32, dict(dual_clip=1.5, log_ratio_clamp=None, temperature=1.7)),
    (torch.bfloat16, dict(OPTIONS)),
    (torch.float16, dict(OPTIONS, reduction="seq-mean-token-mean")),
]


@pytest.mark.parametrize("dtype,options", OPTION_CASES)
def test_logits_options_and_dtypes(dtype, options):
    B, T, V = 2, 9, 77
    logits, (labels, mask, old_logp, advantages, ref_logp) = _logits_case(B, T, V, dtype)
    kernel = lambda z: ppo_loss_from_logits(z, labels, old_logp, advantages, mask, ref_logp,
                                            backend="triton", **options)
    ref = lambda z: reference.ppo_loss_from_logits(z, labels, old_logp, advantages, mask,
                                                   ref_logp, **options)
    upstream = torch.randn((), device=DEVICE)
    loss, stats, (grad,) = _loss_and_grads(kernel, [logits], upstream)
    # same-dtype eager: the reference on the low-precision logits, its gradient rounded to dtype
    loss_e, _, (grad_e,) = _loss_and_grads(ref, [logits], upstream)
    loss64, stats64, (grad64,) = _loss_and_grads(ref, [logits.double()], upstream)
    assert_close_2x(loss, loss_e, loss64, dtype, name="loss")
    assert_close_2x(grad, grad_e, grad64, dtype, name="d logits")
    _check_stats(stats, stats64, int((mask & (labels != -100)).sum()))


def test_reduction_weights_closed_form():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    x = torch.randn(3, 4, dtype=torch.float64)
    for reduction in reference.REDUCTIONS:
        for normalizer in (None, 6.0, torch.tensor(6)):
            w = reduction_weights(mask, reduction, normalizer).double()
            assert_close((w * x).sum(),
                         reference.reduce_loss(x, mask.double(), reduction, normalizer),
                         atol=1e-6, name=f"{reduction}, normalizer {normalizer}")
    w = reduction_weights(mask, "seq-mean-token-mean")
    assert torch.equal(w[0], torch.tensor([0.25, 0.25, 0.0, 0.0]))  # 1 / (2 tokens * 2 rows)
    assert torch.equal(w[2], torch.full((4,), 0.125))
    # a normalizer replaces the outer denominator: the row count 2 here, the token count 6 for
    # token-mean, 1 for token-sum
    w = reduction_weights(mask, "seq-mean-token-mean", torch.tensor(4.0))
    assert torch.equal(w[0], torch.tensor([0.125, 0.125, 0.0, 0.0]))  # 1 / (2 tokens * 4)
    assert torch.equal(reduction_weights(mask, "token-sum"), mask)
    assert torch.equal(reduction_weights(mask, "token-mean", 2.0), mask / 2)
    # no gradient through a tensor normalizer (an all-reduced count is data)
    assert not reduction_weights(mask, "token-sum", torch.tensor(2.0, requires_grad=True)
                                 ).requires_grad


def test_gradient_scaled_in_backward_and_single_use():
    B, T, V = 2, 5, 23
    logits, (labels, mask, old_logp, advantages, _) = _logits_case(B, T, V, torch.float32)
    z = logits.requires_grad_()
    loss, _ = ppo_loss_from_logits(z, labels, old_logp, advantages, mask, backend="triton")
    (g1,) = torch.autograd.grad(loss, z)
    loss, _ = ppo_loss_from_logits(z, labels, old_logp, advantages, mask, backend="triton")
    (g3,) = torch.autograd.grad(-3.0 * loss, z, retain_graph=True)
    assert_close(g3, -3.0 * g1, atol=1e-7, rtol=1e-6, name="scaled gradient")
    # the saved gradient was scaled in place: a second backward must fail, not silently double
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, z)


# the Triton interpreter computes the masked tokens' garbage in numpy, which says so; what is
# tested is that none of it reaches the loss or the gradients
_INTERPRETER_NUMPY_WARNINGS = (
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered in:RuntimeWarning"))


@_INTERPRETER_NUMPY_WARNINGS[0]
@_INTERPRETER_NUMPY_WARNINGS[1]
def test_all_masked_is_zero_not_nan():
    B, T, H, V = 2, 4, 6, 19
    params = [p.requires_grad_() for p in _head(B, T, H, V)]
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    zeros = torch.zeros(B, T, device=DEVICE)
    # garbage old_logp on masked tokens (ratio overflows) must not leak NaN into the loss
    old_logp = torch.full((B, T), -1e4, device=DEVICE)
    for reduction in reference.REDUCTIONS:
        loss, stats = linear_ppo_loss(params[0], params[1], labels, old_logp, zeros, zeros,
                                      *params[2:], log_ratio_clamp=None, reduction=reduction,
                                      entropy_coef=0.1, backend="triton")
        grads = torch.autograd.grad(loss, params)
        assert loss.item() == 0.0
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_no_grad_and_frozen_weight():
    B, T, H, V = 2, 5, 8, 29
    hidden, weight, bias, lora_a, lora_b = _head(B, T, H, V)
    labels, mask, old_logp, advantages, ref_logp = _rollout(
        B, T, V, lambda lab: reference.linear_logprobs(hidden, weight, lab))
    with torch.no_grad():
        loss_ng, stats_ng = linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask,
                                            backend="triton")
    loss64, stats64 = reference.linear_ppo_loss(hidden.double(), weight.double(), labels,
                                                old_logp, advantages, mask)
    assert_close(loss_ng, loss64, atol=1e-5, name="no-grad loss")
    # LoRA-only training: the frozen weight gets no gradient, the factors do
    lora_a.requires_grad_()
    lora_b.requires_grad_()
    loss, _ = linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask, lora_a=lora_a,
                              lora_b=lora_b, chunk_size=3, backend="triton")
    loss.backward()
    assert weight.grad is None and hidden.grad is None
    a64, b64 = (t.detach().double().requires_grad_() for t in (lora_a, lora_b))
    reference.linear_ppo_loss(hidden.double(), weight.double(), labels, old_logp, advantages,
                              mask, lora_a=a64, lora_b=b64)[0].backward()
    assert_close(lora_a.grad, a64.grad, atol=1e-5, rtol=1e-4, name="d lora_a")
    assert_close(lora_b.grad, b64.grad, atol=1e-5, rtol=1e-4, name="d lora_b")


def test_strided_logits_slice():
    """logits[:, :-1] (the usual shift) is read in place, per sequence."""
    B, T, V = 3, 6, 41
    logits = torch.randn(B, T + 1, V, device=DEVICE, requires_grad=True)
    labels, mask, old_logp, advantages, _ = _rollout(
        B, T, V, lambda lab: reference.logprobs(logits[:, :-1], lab))
    loss, _ = ppo_loss_from_logits(logits[:, :-1], labels, old_logp, advantages, mask,
                                   backend="triton")
    (grad,) = torch.autograd.grad(loss, logits)
    z64 = logits.detach().double().requires_grad_()
    loss64, _ = reference.ppo_loss_from_logits(z64[:, :-1], labels, old_logp, advantages, mask)
    (grad64,) = torch.autograd.grad(loss64, z64)
    assert_close(loss, loss64, atol=1e-5, name="loss")
    assert_close(grad, grad64, atol=1e-6, rtol=1e-5, name="d logits")
    assert (grad[:, -1] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_torch_compile_fullgraph(backend):
    # fullgraph: no graph break, so no host sync either (the label check is opt-in)
    B, T, H, V = 2, 4, 7, 31
    params = [p.requires_grad_() for p in _head(B, T, H, V)]
    labels, mask, old_logp, advantages, ref_logp = _rollout(
        B, T, V, lambda lab: reference.linear_logprobs(*params[:2], lab, *params[2:]))

    def fn(h, w, b, a, lb):
        loss, stats = linear_ppo_loss(h, w, labels, old_logp, advantages, mask, b, a, lb, 1.0,
                                      ref_logp, kl_coef=0.1, entropy_coef=0.01, chunk_size=3,
                                      backend=backend)
        # the logits twin, fed by an ordinary matmul so its gradient flows on to h and w
        loss2, _ = ppo_loss_from_logits(h @ w.t(), labels, old_logp, advantages, mask,
                                        backend=backend)
        return loss + loss2 + stats["clipfrac"]

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    grads_c = torch.autograd.grad(compiled(*params), params)
    grads_e = torch.autograd.grad(fn(*params), params)
    for gc, ge, name in zip(grads_c, grads_e, HEAD):
        assert_close(gc, ge, atol=1e-6, rtol=1e-5, name=name)


def test_reference_backend():
    B, T, V = 2, 3, 11
    logits, (labels, mask, old_logp, advantages, _) = _logits_case(B, T, V, torch.float64)
    loss, _ = ppo_loss_from_logits(logits, labels, old_logp, advantages, mask,
                                   backend="reference")
    loss64, _ = reference.ppo_loss_from_logits(logits, labels, old_logp, advantages, mask)
    assert torch.equal(loss, loss64)


@pytest.mark.parametrize("change,message", [
    (dict(old_logp=torch.zeros(2, 4)), "old_logp has shape"),
    (dict(advantages=torch.zeros(3)),
     r"advantages has shape \(3,\); expected one per token \(2, 3\) \(the shape of labels\) or "
     r"one per sequence \(2,\)"),
    (dict(ratio_level="seq"), "ratio_level='seq' is not supported"),
    (dict(loss_type="grpo"), "loss_type='grpo' is not supported"),
    (dict(loss_type="cispo", dual_clip=3.0), "dual_clip applies to loss_type='ppo' only"),
    (dict(loss_type="sapo", dual_clip=3.0), "dual_clip applies to loss_type='ppo' only; SAPO"),
    (dict(loss_type="sapo", sapo_tau_neg=0.0), "sapo_tau_neg=0.0 must be a finite number > 0"),
    (dict(loss_type="sapo", sapo_tau_pos="1"), "sapo_tau_pos must be a real number or None"),
    (dict(sapo_tau_pos=1.0), "sapo_tau_pos=1.0 applies to loss_type='sapo' only"),
    (dict(normalizer=0.0), "normalizer must be > 0"),
    (dict(normalizer=torch.ones(2)), "normalizer must be a number > 0 or a 0-d real tensor"),
    (dict(mask=torch.ones(2, 2)), "mask has shape"),
    (dict(ref_logp=torch.zeros(2, 4), kl_coef=0.1), "ref_logp has shape"),
    (dict(kl_estimator="k4"), "kl_estimator='k4' is not supported"),
    (dict(reduction="mean"), "reduction='mean' is not supported"),
    (dict(dual_clip=0.5), "dual_clip must be > 1"),
    (dict(clip_low=-0.1), "clip_low and clip_high must be >= 0"),
    (dict(log_ratio_clamp=0.0), "log_ratio_clamp must be > 0"),
    (dict(temperature=-1.0), "temperature must be a positive finite number, got -1.0"),
    (dict(temperature=float("inf")), "temperature must be a positive finite number, got inf"),
    (dict(temperature=float("nan")), "temperature must be a positive finite number, got nan"),
    (dict(labels=torch.full((2, 3), 11), check_labels=True), r"labels must be in \[0, 11\)"),
    (dict(old_logp=torch.zeros(2, 3, requires_grad=True)), "old_logp requires grad"),
    (dict(advantages=torch.zeros(2, 3, requires_grad=True)), "advantages requires grad"),
    (dict(ref_logp=torch.zeros(2, 3, requires_grad=True), kl_coef=0.1),
     "ref_logp requires grad"),
])
@pytest.mark.parametrize("path", ["logits", "linear"])
def test_bad_input(change, message, path):
    kw = dict(labels=torch.zeros(2, 3, dtype=torch.long), old_logp=torch.zeros(2, 3),
              advantages=torch.zeros(2, 3))
    kw.update(change)
    # on the device under test: CPU tensors with backend="triton" and no interpreter are refused
    # before some of these checks run
    kw = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    if path == "logits":
        with pytest.raises(ValueError, match=message):
            ppo_loss_from_logits(torch.randn(2, 3, 11, device=DEVICE), **kw, backend="triton")
    else:
        with pytest.raises(ValueError, match=message):
            linear_ppo_loss(torch.randn(2, 3, 5, device=DEVICE), torch.randn(11, 5, device=DEVICE),
                            **kw, backend="triton")


def test_empty_sequences():
    """T = 0: loss 0 and empty / zero gradients, no reshape error."""
    hidden = torch.randn(2, 0, 4, device=DEVICE, requires_grad=True)
    weight = torch.randn(7, 4, device=DEVICE, requires_grad=True)
    labels = torch.zeros(2, 0, dtype=torch.long, device=DEVICE)
    zeros = torch.zeros(2, 0, device=DEVICE)
    loss, _ = linear_ppo_loss(hidden, weight, labels, zeros, zeros, backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(weight.grad, torch.zeros_like(weight))
    logits = torch.randn(2, 0, 7, device=DEVICE, requires_grad=True)
    loss, _ = ppo_loss_from_logits(logits, labels, zeros, zeros, backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.shape == logits.shape


@pytest.mark.parametrize("path", ["logits", "linear"])
def test_rollout_tensors_that_require_grad(path):
    """The Triton path differentiates w.r.t. the policy only: a rollout tensor that requires
    grad is refused (it would silently get no gradient); the reference backend differentiates
    it, and under no_grad nothing is refused."""
    B, T, H, V = 2, 3, 5, 13
    head = _head(B, T, H, V)
    logits = head[0] @ head[1].t()
    labels, mask, _, advantages, ref_logp = _rollout(
        B, T, V, lambda lab: reference.logprobs(logits, lab))
    # old = current policy: ratio 1, never clipped, so d loss / d old_logp cannot be 0 by chance
    # (with random old_logp both counted tokens may sit outside the clip range)
    old_logp = reference.logprobs(logits, labels).detach()

    def run(backend, old, adv, ref):
        if path == "logits":
            return ppo_loss_from_logits(logits, labels, old, adv, mask, ref, kl_coef=0.1,
                                        backend=backend)
        return linear_ppo_loss(head[0], head[1], labels, old, adv, mask, ref_logp=ref,
                               kl_coef=0.1, backend=backend)

    for i, name in enumerate(("old_logp", "advantages", "ref_logp")):
        tensors = [old_logp, advantages, ref_logp]
        tensors[i] = tensors[i].clone().requires_grad_()
        with pytest.raises(ValueError, match=f"{name} requires grad.*backend='reference'"):
            run("triton", *tensors)
        with torch.no_grad():
            run("triton", *tensors)
        loss, _ = run("reference", *tensors)
        (grad,) = torch.autograd.grad(loss, tensors[i])
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_out_of_range_labels(backend):
    """No host sync by default: a counted token with a label outside [0, V) gives a NaN loss
    (never an out-of-bounds read, never a finite wrong number); check_labels=True raises."""
    B, T, H, V = 2, 4, 5, 13
    hidden, weight = _head(B, T, H, V)[:2]
    logits = hidden @ weight.t()
    labels, mask, old_logp, advantages, _ = _rollout(B, T, V,
                                                     lambda lab: reference.logprobs(logits, lab))
    labels[0, 2] = V
    assert mask[0, 2]
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\).*found label {V}"):
        ppo_loss_from_logits(logits, labels, old_logp, advantages, mask, check_labels=True,
                             backend=backend)
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\).*found label {V}"):
        linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask, check_labels=True,
                        backend=backend)
    loss, _ = ppo_loss_from_logits(logits, labels, old_logp, advantages, mask, backend=backend)
    assert torch.isnan(loss)
    loss, _ = linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask,
                              backend=backend)
    assert torch.isnan(loss)


def test_out_of_range_label_at_a_masked_token_is_ignored():
    B, T, V = 2, 4, 13
    logits, (labels, mask, old_logp, advantages, _) = _logits_case(B, T, V, torch.float32)
    assert not mask[1, 0]
    loss_ok, _ = ppo_loss_from_logits(logits, labels, old_logp, advantages, mask,
                                      backend="triton")
    labels[1, 0] = -7
    loss, _ = ppo_loss_from_logits(logits, labels, old_logp, advantages, mask, backend="triton")
    assert torch.equal(loss, loss_ok)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fp64_in_fp64_out(backend):
    B, T, H, V = 2, 3, 5, 17
    params = [p.double() for p in _head(B, T, H, V)]
    logits = params[0] @ params[1].t()
    labels, mask, old_logp, advantages, ref_logp = _rollout(
        B, T, V, lambda lab: reference.logprobs(logits, lab))
    loss, stats = ppo_loss_from_logits(logits, labels, old_logp, advantages, mask, ref_logp,
                                       backend=backend, **OPTIONS)
    loss64, _ = reference.ppo_loss_from_logits(logits, labels, old_logp, advantages, mask,
                                               ref_logp, **OPTIONS)
    assert loss.dtype == stats["entropy"].dtype == torch.float64
    # fp64 in: the matmuls run in fp64, the log-prob kernels in fp32 (docs/design.md §1.1), so
    # the loss is fp32-accurate relative to its size
    assert_close(loss, loss64, atol=1e-5, rtol=1e-5, name="loss from logits")
    loss, stats = linear_ppo_loss(*params[:2], labels, old_logp, advantages, mask, *params[2:],
                                  0.5, ref_logp, backend=backend, **OPTIONS)
    loss64, _ = reference.linear_ppo_loss(*params[:2], labels, old_logp, advantages, mask,
                                          *params[2:], 0.5, ref_logp, **OPTIONS)
    assert loss.dtype == stats["entropy"].dtype == torch.float64
    assert_close(loss, loss64, atol=1e-5, rtol=1e-5, name="linear loss")


@_INTERPRETER_NUMPY_WARNINGS[0]
@_INTERPRETER_NUMPY_WARNINGS[1]
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_at_masked_tokens_adds_nothing(poison):
    """NaN / inf hidden states or logits (and rollout values) at masked or ignored tokens: the
    loss and every gradient are finite and equal to the reference with those positions
    replaced by finite values."""
    B, T, H, V = 3, 5, 7, 19
    params = _head(B, T, H, V)
    labels, mask, old_logp, advantages, ref_logp = _rollout(
        B, T, V, lambda lab: reference.linear_logprobs(*params[:2], lab, *params[2:], 0.5, 0.8))
    dead = ~mask | (labels == -100)
    assert dead.any() and not dead.all()
    poisoned = [t.clone() for t in params]
    poisoned[0][dead] = poison
    rollout_p = [t.masked_fill(dead, poison) for t in (old_logp, advantages, ref_logp)]
    upstream = torch.randn((), device=DEVICE)

    def kernel(h, w, b, a, lb):
        return linear_ppo_loss(h, w, labels, rollout_p[0], rollout_p[1], mask, b, a, lb, 0.5,
                               rollout_p[2], chunk_size=4, backend="triton", **OPTIONS)

    def ref(h, w, b, a, lb):
        return reference.linear_ppo_loss(h, w, labels, old_logp, advantages, mask, b, a, lb,
                                         0.5, ref_logp, **OPTIONS)

    loss, _, grads = _loss_and_grads(kernel, poisoned, upstream)
    loss64, _, grads64 = _loss_and_grads(ref, [p.double() for p in params], upstream)
    assert torch.isfinite(loss)
    assert_close(loss, loss64, atol=1e-5, rtol=1e-5, name="linear loss")
    for g, g64, name in zip(grads, grads64, HEAD):
        assert torch.isfinite(g).all(), name
        assert_close(g, g64, atol=1e-5, rtol=1e-4, name=f"d {name}")

    logits = (params[0] @ params[1].t()).detach()
    poisoned_logits = logits.clone()
    poisoned_logits[dead] = poison
    loss, _, (grad,) = _loss_and_grads(
        lambda z: ppo_loss_from_logits(z, labels, rollout_p[0], rollout_p[1], mask,
                                       rollout_p[2], backend="triton", **OPTIONS),
        [poisoned_logits], upstream)
    loss64, _, (grad64,) = _loss_and_grads(
        lambda z: reference.ppo_loss_from_logits(z, labels, old_logp, advantages, mask,
                                                 ref_logp, **OPTIONS),
        [logits.double()], upstream)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close(loss, loss64, atol=1e-5, rtol=1e-5, name="loss from logits")
    assert_close(grad, grad64, atol=1e-6, rtol=1e-5, name="d logits")
    assert (grad[dead] == 0).all()


# --------------------------------------------------------------------------------------------
# the critic-free options: per-sequence advantages, GSPO's sequence ratio, CISPO, token-sum and
# normalizer, with every KL estimator
# --------------------------------------------------------------------------------------------
def _per_sequence(advantages):
    """(B, T) advantages -> (B,) ones: row 1 (fully masked in ``_rollout``) gets NaN, which must
    reach nothing."""
    adv = advantages[:, 0].clone()
    adv[1] = float("nan")
    return adv


def _expanded(advantages, T):
    return advantages[:, None].expand(-1, T).clone()


def _assert_same_bits(a, b, name):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    assert torch.equal(a, b) or (a.isnan().any() and torch.equal(a.nan_to_num(), b.nan_to_num())), \
        f"{name}: (B,) advantages differ from the expanded (B, T) ones"


# (per-sequence advantages, logits dtype, options)
CRITIC_FREE_LOGITS = {
    "gspo": (True, torch.float32, dict(ratio_level="sequence", clip_low=0.05, clip_high=0.05,
                                       reduction="seq-mean-token-mean")),
    "gspo-dual-clamp-k2": (False, torch.float32, dict(
        ratio_level="sequence", clip_low=0.02, clip_high=0.02, dual_clip=1.01,
        log_ratio_clamp=0.04, kl_coef=0.1, kl_estimator="k2", entropy_coef=0.01)),
    "cispo-normalizer-k1": (True, torch.float32, dict(
        loss_type="cispo", clip_low=1.0, clip_high=0.1, reduction="token-sum",
        normalizer=torch.tensor(7.0, device=DEVICE), kl_coef=0.1, kl_estimator="k1")),
    "cispo-sequence-abs": (False, torch.float32, dict(
        loss_type="cispo", ratio_level="sequence", clip_high=0.02, kl_coef=0.1,
        kl_estimator="abs", reduction="seq-mean-token-sum", normalizer=3.0)),
    "token-sum-dual-k3": (True, torch.float32, dict(OPTIONS, reduction="token-sum")),
    "gspo-bf16": (True, torch.bfloat16, dict(OPTIONS, ratio_level="sequence",
                                             reduction="seq-mean-token-mean", normalizer=2.0)),
    "sapo-k3": (True, torch.float32, dict(
        loss_type="sapo", sapo_tau_pos=1.3, sapo_tau_neg=2.5, reduction="seq-mean-token-mean",
        kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)),
    "sapo-sequence-clamp": (False, torch.float32, dict(
        loss_type="sapo", ratio_level="sequence", log_ratio_clamp=0.04, reduction="token-sum",
        normalizer=3.0)),
}


@pytest.mark.parametrize("case", list(CRITIC_FREE_LOGITS))
def test_logits_critic_free_options(case):
    per_sequence, dtype, options = CRITIC_FREE_LOGITS[case]
    B, T, V = 3, 7, 53
    logits, (labels, mask, old_logp, advantages, ref_logp) = _logits_case(B, T, V, dtype)
    if per_sequence:
        advantages = _per_sequence(advantages)
    kernel = lambda z, adv=advantages: ppo_loss_from_logits(  # noqa: E731
        z, labels, old_logp, adv, mask, ref_logp, backend="triton", **options)
    ref = lambda z: reference.ppo_loss_from_logits(z, labels, old_logp, advantages, mask,  # noqa
                                                   ref_logp, **options)
    upstream = torch.randn((), device=DEVICE)
    loss, stats, (grad,) = _loss_and_grads(kernel, [logits], upstream)
    loss_e, _, (grad_e,) = _loss_and_grads(ref, [logits], upstream)
    loss64, stats64, (grad64,) = _loss_and_grads(ref, [logits.double()], upstream)
    assert_close_2x(loss, loss_e, loss64, dtype, name="loss")
    assert_close_2x(grad, grad_e, grad64, dtype, name="d logits")
    assert torch.isfinite(grad).all()
    _check_stats(stats, stats64, int((mask & (labels != -100)).sum()))
    if per_sequence:
        loss_x, stats_x, (grad_x,) = _loss_and_grads(
            lambda z: kernel(z, _expanded(advantages, T)), [logits], upstream)
        _assert_same_bits(loss, loss_x, "loss")
        _assert_same_bits(grad, grad_x, "d logits")
        for key in stats:
            _assert_same_bits(stats[key], stats_x[key], key)


# (per-sequence advantages, chunk_size, options): every KL estimator once, chunk_size 3 with
# T = 5 so that rows straddle chunks (the sequence ratio's two-sweep path)
CRITIC_FREE_LINEAR = {
    "gspo-k1": (True, 3, dict(ratio_level="sequence", clip_low=0.05, clip_high=0.05,
                              reduction="seq-mean-token-mean", kl_estimator="k1",
                              entropy_coef=0.01)),
    "cispo-normalizer-k2": (True, 3, dict(
        loss_type="cispo", clip_low=1.0, clip_high=0.1, reduction="token-sum",
        normalizer=torch.tensor(9.0, device=DEVICE), kl_estimator="k2")),
    "cispo-sequence-k3": (False, 3, dict(loss_type="cispo", ratio_level="sequence",
                                         clip_high=0.02, normalizer=5.0, entropy_coef=0.01)),
    "gspo-dual-clamp-abs": (True, 3, dict(
        ratio_level="sequence", clip_low=0.02, clip_high=0.02, dual_clip=1.01,
        log_ratio_clamp=0.04, kl_estimator="abs", reduction="seq-mean-token-sum-norm")),
    "gspo-one-chunk-k3": (True, None, dict(OPTIONS, ratio_level="sequence",
                                           reduction="seq-mean-token-mean")),
    "sapo-token-k2": (False, 3, dict(loss_type="sapo", sapo_tau_neg=3.0, kl_estimator="k2",
                                     reduction="seq-mean-token-mean", entropy_coef=0.01)),
    "sapo-sequence-k3": (True, 3, dict(loss_type="sapo", ratio_level="sequence",
                                       sapo_tau_pos=0.5, normalizer=4.0)),
}


@pytest.mark.parametrize("case", list(CRITIC_FREE_LINEAR))
def test_linear_critic_free_options(case):
    per_sequence, chunk_size, options = CRITIC_FREE_LINEAR[case]
    options = dict(dict(kl_coef=0.1), **options)
    B, T, H, V = 3, 5, 8, 37
    params = _head(B, T, H, V)
    labels, mask, old_logp, advantages, ref_logp = _rollout(
        B, T, V, lambda lab: reference.linear_logprobs(*params[:2], lab, *params[2:], 0.5))
    if per_sequence:
        advantages = _per_sequence(advantages)
    upstream = torch.randn((), device=DEVICE)

    def kernel(h, w, b, a, lb, adv=advantages):
        return linear_ppo_loss(h, w, labels, old_logp, adv, mask, b, a, lb, 0.5, ref_logp,
                               chunk_size=chunk_size, backend="triton", **options)

    def ref(h, w, b, a, lb):
        return reference.linear_ppo_loss(h, w, labels, old_logp, advantages, mask, b, a, lb, 0.5,
                                         ref_logp, **options)

    loss, stats, grads = _loss_and_grads(kernel, params, upstream)
    loss32, _, grads32 = _loss_and_grads(ref, params, upstream)
    loss64, stats64, grads64 = _loss_and_grads(ref, [p.double() for p in params], upstream)
    assert_close_2x(loss, loss32, loss64, torch.float32, name="loss")
    for g, g32, g64, name in zip(grads, grads32, grads64, HEAD):
        assert_close_2x(g, g32, g64, torch.float32, name=f"d {name}")
    _check_stats(stats, stats64, int((mask & (labels != -100)).sum()))
    with torch.no_grad():  # no gradient: one sweep, the same loss
        loss_ng, _ = kernel(*params)
    _assert_same_bits(loss_ng, loss, "no-grad loss")
    if per_sequence:
        loss_x, stats_x, grads_x = _loss_and_grads(
            lambda *p: kernel(*p, adv=_expanded(advantages, T)), params, upstream)
        _assert_same_bits(loss, loss_x, "loss")
        for g, g_x, name in zip(grads, grads_x, HEAD):
            _assert_same_bits(g, g_x, f"d {name}")
        for key in stats:
            _assert_same_bits(stats[key], stats_x[key], key)


@pytest.mark.parametrize("reduction,normalizer", [("seq-mean-token-mean", None),
                                                  ("token-sum", 3.0)])
@pytest.mark.parametrize("loss_type", ["ppo", "cispo"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_per_token_terms_follow_autograd_at_ties_and_bounds(ratio_level, loss_type, reduction,
                                                            normalizer):
    """The per-token derivatives against torch autograd through the reference (fp32 both, the
    same formulas), with ratios exactly on the upper and lower clip bounds, on the log-ratio
    clamp and on the dual-clip bound, an advantage of 0 and a KL log-ratio of 0 (abs): ties
    split as torch.maximum / minimum's backward does, and clamp bounds count as inside."""
    B, T = 4, 5
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(B, T, generator=g) - 0.5
    mask = torch.ones(B, T)
    mask[2, 3:] = 0
    mask[3, 0] = 0
    A = torch.randn(B, T, generator=g)
    A[1, 2] = 0.0
    # row 2 (ratio below the clip range, on the clamp): A > 0, so the gradient flows through
    # the ratio; row 3 (ratio above the clip range): A < 0, the dual clip's side
    A[2] = A[2].abs()
    A[3] = -A[3].abs()
    shift = torch.tensor([[0.1], [-0.1], [-0.9], [0.6]])  # each row's log-ratio, roughly
    old = logp - shift - 0.01 * torch.randn(B, T, generator=g)
    ref_logp = logp + 0.05 * torch.randn(B, T, generator=g)
    ref_logp[1, 1] = logp[1, 1]
    entropy = torch.rand(B, T, generator=g)
    at = (0, 1, 2, 3) if ratio_level == "sequence" else ((0, 0), (1, 0), (2, 0), (3, 1))

    def ratio_and_d(**clips):
        _, ratio, _, _, _ = reference._policy_terms(
            logp, old, A, mask, clip_low=0.2, clip_high=0.2, dual_clip=None,
            log_ratio_clamp=clips.get("log_ratio_clamp"), ratio_level=ratio_level,
            loss_type="ppo")
        if ratio_level == "sequence":
            ratio = ratio[:, 0]
        return ratio, torch.log(ratio)

    ratio, _ = ratio_and_d()
    # exact in float64 and in fp32: r - 1 and 1 - r for r in [0.5, 2) (Sterbenz)
    clip_high = float(ratio[at[0]]) - 1.0
    clip_low = 1.0 - float(ratio[at[1]])
    d = logp - old
    if ratio_level == "sequence":
        d = torch.where(mask > 0, d, 0).sum(-1) / mask.sum(-1).clamp_min(1)
    log_ratio_clamp = -float(d[at[2]])  # the largest |log-ratio|: d = -clamp exactly there
    dual_clip = float(ratio[at[3]]) if loss_type == "ppo" else None
    ratio, _ = ratio_and_d(log_ratio_clamp=log_ratio_clamp)
    assert float(ratio[at[0]]) == 1.0 + clip_high and float(ratio[at[1]]) == 1.0 - clip_low
    assert dual_clip is None or float(ratio[at[3]]) == dual_clip
    options = dict(kl_coef=0.1, kl_estimator="abs", entropy_coef=0.05, clip_low=clip_low,
                   clip_high=clip_high, dual_clip=dual_clip, log_ratio_clamp=log_ratio_clamp)

    x = logp.clone().requires_grad_()
    e = entropy.clone().requires_grad_()
    total, _ = reference._ppo_total(
        x, e, old, A, mask, ref_logp, options["kl_coef"], "abs", options["entropy_coef"],
        clip_low, clip_high, dual_clip, log_ratio_clamp, reduction, ratio_level, loss_type,
        normalizer)
    total.backward()
    weights = reduction_weights(mask, reduction, normalizer)
    # the torch ops (bit-exact ties need torch's own exp; the fused kernel's ties are tested
    # in test_fused_token_terms_match_the_torch_ops)
    contribution, d_logp, d_entropy = per_token_terms(
        logp, entropy, old, A, weights, ref_logp, ratio_level=ratio_level, loss_type=loss_type,
        fused=False, **options)
    assert_close(contribution.sum(), total, atol=1e-6, rtol=1e-6, name="loss")
    assert_close(d_logp, x.grad, atol=1e-8, rtol=1e-5, name="d logp")
    assert_close(d_entropy, e.grad, atol=1e-8, rtol=1e-5, name="d entropy")


@pytest.mark.parametrize("loss_type,dual_clip", [("ppo", None), ("ppo", 3.0), ("cispo", None),
                                                 ("sapo", None)])
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3", "abs"])
def test_fused_token_terms_match_the_torch_ops(loss_type, dual_clip, kl_estimator):
    """ops/_ppo_terms.py (one kernel) against per_token_terms' torch ops: random tokens, a
    (B, 1) per-sequence advantage column (broadcast, never copied), masked tokens holding NaN,
    and exact ties where every exp agrees: logp == old_logp gives ratio 1, on both clip bounds
    at clip 0 (torch.maximum's tie: half the gradient each side), logp == ref_logp gives the
    abs estimator's zero derivative."""
    from rlhf_kernels.ops import _ppo_terms

    g = torch.Generator().manual_seed(1)
    B, T = 5, 7
    logp = -torch.rand(B, T, generator=g) - 0.2
    old = logp - 0.3 * torch.randn(B, T, generator=g)
    old[0] = logp[0]  # ratio exactly 1
    ref = logp + 0.1 * torch.randn(B, T, generator=g)
    ref[1, :3] = logp[1, :3]
    entropy = torch.rand(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    weights = reduction_weights(mask.float(), "token-mean", None)
    old[~mask] = float("nan")  # a token that does not count adds exactly 0
    logp, old, ref, entropy, weights = (t.to(DEVICE) for t in (logp, old, ref, entropy, weights))
    for advantages in (torch.randn(B, T, generator=g), torch.randn(B, 1, generator=g)):
        advantages = advantages.to(DEVICE)  # (the kernel runs where the suite's tensors live)
        for clip in (0.2, 0.0):
            options = dict(kl_coef=0.1, kl_estimator=kl_estimator, entropy_coef=0.02,
                           clip_low=clip, clip_high=clip, dual_clip=dual_clip,
                           log_ratio_clamp=5.0, ratio_level="token", loss_type=loss_type,
                           taus=(1.3, 2.5))
            args = (logp, entropy, old, advantages, weights, ref)
            assert _ppo_terms.can_fuse(*args, "token")
            fused = per_token_terms(*args, **options)
            torch_ops = per_token_terms(*args, fused=False, **options)
            for got, want, name in zip(fused, torch_ops, ("contribution", "d logp",
                                                          "d entropy")):
                assert_close(got, want, atol=1e-7, rtol=1e-5, name=f"{name} clip={clip}")
            no_grad = per_token_terms(*args, derivatives=False, **options)
            assert no_grad[1] is None and no_grad[2] is None
            assert_close(no_grad[0], torch_ops[0], atol=1e-7, rtol=1e-5, name="no grad")


def test_sequence_ratio_ignores_non_finite_padding():
    """GSPO's row mean over counted tokens only: NaN hidden states / logits and rollout values at
    masked or ignored tokens (rows straddling chunks included), and a NaN advantage for the row
    without a token, change nothing against the reference on finite inputs."""
    B, T, H, V = 3, 5, 6, 19
    params = _head(B, T, H, V)
    labels, mask, old_logp, advantages, ref_logp = _rollout(
        B, T, V, lambda lab: reference.linear_logprobs(*params[:2], lab, *params[2:], 0.5))
    advantages = advantages[:, 0].clone()
    dead = ~mask | (labels == -100)
    options = dict(ratio_level="sequence", reduction="seq-mean-token-mean", kl_coef=0.1,
                   entropy_coef=0.01, clip_low=0.05, clip_high=0.05)
    poisoned = [t.clone() for t in params]
    poisoned[0][dead] = float("nan")
    old_p, ref_p = (t.masked_fill(dead, float("nan")) for t in (old_logp, ref_logp))
    adv_p = advantages.clone()
    adv_p[1] = float("nan")  # row 1 has no counted token
    upstream = torch.randn((), device=DEVICE)
    loss, _, grads = _loss_and_grads(
        lambda h, w, b, a, lb: linear_ppo_loss(h, w, labels, old_p, adv_p, mask, b, a, lb, 0.5,
                                               ref_p, chunk_size=3, backend="triton",
                                               **options), poisoned, upstream)
    loss64, _, grads64 = _loss_and_grads(
        lambda h, w, b, a, lb: reference.linear_ppo_loss(h, w, labels, old_logp, advantages,
                                                         mask, b, a, lb, 0.5, ref_logp,
                                                         **options),
        [p.double() for p in params], upstream)
    assert_close(loss, loss64, atol=1e-5, rtol=1e-5, name="linear loss")
    for g, g64, name in zip(grads, grads64, HEAD):
        assert_close(g, g64, atol=1e-5, rtol=1e-4, name=f"d {name}")
    logits = (params[0] @ params[1].t()).detach()
    loss, _, (grad,) = _loss_and_grads(
        lambda z: ppo_loss_from_logits(z, labels, old_p, adv_p, mask, ref_p, backend="triton",
                                       **options), [logits.masked_fill(dead[..., None],
                                                                       float("nan"))], upstream)
    loss64, _, (grad64,) = _loss_and_grads(
        lambda z: reference.ppo_loss_from_logits(z, labels, old_logp, advantages, mask,
                                                 ref_logp, **options), [logits.double()],
        upstream)
    assert_close(loss, loss64, atol=1e-5, rtol=1e-5, name="loss from logits")
    assert_close(grad, grad64, atol=1e-6, rtol=1e-5, name="d logits")


class _LogitsMatmuls(TorchDispatchMode):
    """Counts the logits the matmuls make, in whole (N, V) sweeps: outputs (rows, V) (a chunk of
    rows) or (N, columns) (a slice of the vocabulary; ``narrow`` lists the widths of the other
    (N, .) products, H and the LoRA rank), and records the largest storage (bytes) any op
    returns."""

    def __init__(self, n_rows, vocab, narrow):
        super().__init__()
        self.n_rows, self.vocab, self.narrow = n_rows, vocab, narrow
        self.elements, self.largest = 0, 0

    @property
    def sweeps(self) -> float:
        return self.elements / (self.n_rows * self.vocab)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            rows, cols = out.shape
            if cols == self.vocab or (rows == self.n_rows and cols not in self.narrow):
                self.elements += out.numel()
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("ratio_level,grad,chunk_size,logits_sweeps", [
    ("token", True, 4, 1),  # one sweep: the gradient made with the forward
    ("sequence", True, 4, 2),  # rows straddle chunks: forward sweep, then the backward sweep
    ("sequence", False, 4, 1),  # no gradient: the forward sweep alone
    ("sequence", True, None, 1),  # one chunk holds every row: one sweep
])
def test_linear_sweeps_matmuls_and_memory(ratio_level, grad, chunk_size, logits_sweeps):
    """The matmul cost the module docstring states, and never more than one chunk of logits
    alive (the largest tensor is that chunk: 4 rows x V fp32 here, a third of N x V; the
    backward's vocabulary slices are no larger)."""
    B, T, H, V, R = 2, 6, 3, 97, 2
    params = [p.requires_grad_(grad) for p in _head(B, T, H, V, rank=R)]
    labels, mask, old_logp, advantages, ref_logp = _rollout(
        B, T, V, lambda lab: reference.linear_logprobs(*params[:2], lab, *params[2:]))
    assert all(t.numel() < 4 * V for t in params)  # only a chunk of logits can be the largest
    with _LogitsMatmuls(B * T, V, narrow=(H, R)) as mode:
        loss, _ = linear_ppo_loss(*params[:2], labels, old_logp, advantages[:, 0], mask,
                                  *params[2:], ref_logp=ref_logp, kl_coef=0.1, entropy_coef=0.1,
                                  chunk_size=chunk_size, ratio_level=ratio_level,
                                  backend="triton")
        if grad:
            loss.backward()
    assert mode.sweeps == logits_sweeps
    assert mode.largest == (4 if chunk_size else B * T) * V * 4
    assert not grad or all(p.grad is not None for p in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction,normalizer,ratio_level,loss_type,dual_clip,kl", [
    ("token-mean", None, "token", "ppo", None, False),
    ("token-mean", None, "token", "ppo", 3.0, True),
    ("token-mean", 7.0, "sequence", "ppo", None, True),
    ("seq-mean-token-mean", None, "token", "cispo", None, False),
    ("seq-mean-token-sum-norm", "tensor", "sequence", "cispo", None, True),
    ("token-sum", None, "token", "ppo", 3.0, False),
    ("seq-mean-token-mean", None, "token", "sapo", None, True),
    ("token-mean", 7.0, "sequence", "sapo", None, False),
])
def test_stats_are_the_bits_of_the_reference_ppo_total(dtype, reduction, normalizer,
                                                        ratio_level, loss_type, dual_clip, kl):
    """The fused ops' stats (ppo_fused._stats, trimmed for host time) are bit for bit those of
    reference._ppo_total on the same per-token logp / entropy, NaN / inf padding included."""
    from rlhf_kernels.ops import ppo_fused

    torch.manual_seed(0)
    shape = (3, 9)
    labels = torch.randint(0, 10, shape)
    mask = torch.rand(shape) > 0.3
    mask[1] = False
    logp = torch.where(mask, -torch.rand(shape, dtype=dtype) * 3, torch.nan)
    entropy = torch.where(mask, torch.rand(shape, dtype=dtype), torch.inf)
    old = torch.where(mask, logp + 0.3 * torch.randn(shape, dtype=dtype), torch.nan)
    adv = torch.randn(shape[:1] if ratio_level == "sequence" else shape, dtype=dtype)
    ref = logp + 0.2 * torch.randn(shape, dtype=dtype) if kl else None
    normalizer = torch.tensor(5.0) if normalizer == "tensor" else normalizer
    m, _ = ppo_fused._mask_and_weights(labels, old, mask, -100, reduction, normalizer)
    args = (logp.reshape(-1), entropy.reshape(-1), labels, old, adv, m, ref, 0.1 if kl else 0.0,
            "k3", 0.01, 0.2, 0.28, dual_clip, 20.0, reduction, ratio_level, loss_type, normalizer)
    sapo = loss_type == "sapo"
    got = ppo_fused._stats(*args, taus=(1.3, 2.5) if sapo else None)
    _, want = reference._ppo_total(logp, entropy, *args[3:], sapo_tau_pos=1.3 if sapo else None,
                                   sapo_tau_neg=2.5 if sapo else None)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name].view(-1).view(torch.uint8),
                           want[name].view(-1).view(torch.uint8)), (name, got[name], want[name])


def test_a_kl_weight_without_the_reference_is_refused():
    # It used to drop the KL term without a word (a forgotten ref_logp trains with no KL).
    B, T, V, H = 2, 3, 17, 8
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    old, adv = -torch.rand(B, T, device=DEVICE), torch.randn(B, device=DEVICE)
    hidden = torch.randn(B, T, H, device=DEVICE)
    weight = torch.randn(V, H, device=DEVICE)
    logits = torch.randn(B, T, V, device=DEVICE)
    for backend in ("triton", "reference"):
        with pytest.raises(ValueError, match=r"kl_coef=0.1 but ref_logp is None"):
            linear_ppo_loss(hidden, weight, labels, old, adv, kl_coef=0.1, backend=backend)
        with pytest.raises(ValueError, match=r"kl_coef=0.1 but ref_logp is None"):
            ppo_loss_from_logits(logits, labels, old, adv, kl_coef=0.1, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("path", ["logits", "linear"])
def test_k3_small_log_ratios_to_a_few_ulps(path, ratio_level, backend):
    """The k3 term at |logp - ref_logp| in [1e-4, 2e-3] (near the reference policy, where
    e^-d + d - 1 in fp32 keeps few correct digits) against float64, masked. ref_logp is set
    from the op's own logp (``logprobs`` / ``linear_logprobs``, the same kernels and bits), so
    d is known exactly; advantages 0 leave the KL term alone: with token-sum and kl_coef 0.5 the
    loss is 0.5 sum k3 and d loss / d logits_t = 0.5 (1 - e^-d_t) (onehot_t - softmax_t). Token
    level runs the fused per-token kernel (ops/_ppo_terms.py), sequence level the torch ops.
    Bounds: K3_SUM_RTOL for the loss; per token, the gradient's norm within K3_SUM_RTOL (the
    softmax and the head's matmuls add their own fp32 roundings to k3's few ulps)."""
    import rlhf_kernels
    from tests.kernels.test_kl_rewards import (
        K3_SUM_RTOL,
        assert_relative,
        k3_float64,
        tiny_log_ratios,
    )

    B, T, H, V = 3, 11, 16, 37
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    mask = torch.rand(B, T, device=DEVICE) > 0.3
    mask[1] = False  # an all-masked row
    advantages = torch.zeros(B, T, device=DEVICE)
    options = dict(kl_coef=0.5, kl_estimator="k3", reduction="token-sum",
                   ratio_level=ratio_level, backend=backend)
    if path == "logits":
        params = [torch.randn(B, T, V, device=DEVICE) * 2]
        logp = rlhf_kernels.logprobs(params[0], labels, backend=backend)
    else:
        params = _head(B, T, H, V)[:2]
        logp = rlhf_kernels.linear_logprobs(*params, labels, chunk_size=8, backend=backend)
        options["chunk_size"] = 8
    tiny_logp, tiny_ref = tiny_log_ratios((B, T))
    ref_logp = logp - (tiny_logp - tiny_ref)  # those magnitudes of d, from the op's own logp
    assert torch.equal((logp - ref_logp).double(), logp.double() - ref_logp.double())
    leaves = [p.clone().requires_grad_() for p in params]
    if path == "logits":
        loss, stats = ppo_loss_from_logits(leaves[0], labels, logp, advantages, mask, ref_logp,
                                           **options)
    else:
        loss, stats = linear_ppo_loss(*leaves, labels, logp, advantages, mask,
                                      ref_logp=ref_logp, **options)
    loss.backward()
    k3, slope = k3_float64(logp, ref_logp)
    assert_relative(loss, 0.5 * k3[mask].sum(), K3_SUM_RTOL, "loss")
    assert_relative(stats["kl"], k3[mask].sum(), K3_SUM_RTOL, "kl stat")
    # float64 d loss / d logits, then d hidden through the head
    logits64 = (params[0].double() if path == "logits"
                else params[0].double() @ params[1].double().T)
    grad_logits = torch.nn.functional.one_hot(labels, V) - logits64.softmax(-1)
    grad_logits = torch.where(mask[..., None], 0.5 * slope[..., None] * grad_logits, 0.0)
    want = grad_logits if path == "logits" else grad_logits @ params[1].double()
    got = leaves[0].grad
    assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))
    err = (got[mask].double() - want[mask]).norm(dim=-1)
    assert_relative(want[mask].norm(dim=-1) + err, want[mask].norm(dim=-1), K3_SUM_RTOL,
                    "d loss / d logits per token" if path == "logits" else "d hidden per token")


@pytest.mark.parametrize("n_rows,T", [(3, 9), (5, 300)])  # one program; several and the finish
@pytest.mark.parametrize("reduction,normalizer,loss_type,dual_clip,kl,per_sequence", [
    ("token-mean", None, "ppo", None, False, False),
    ("token-mean", None, "ppo", 3.0, True, True),
    ("seq-mean-token-mean", None, "cispo", None, True, False),
    ("seq-mean-token-sum-norm", "tensor", "sapo", None, False, True),
    ("token-sum", 7.0, "ppo", 3.0, True, False),
])
def test_token_level_stats_kernel_against_the_float64_stats(
        monkeypatch, n_rows, T, reduction, normalizer, loss_type, dual_clip, kl, per_sequence):
    """At token level the fused ops' stats are one Triton kernel over the tokens (and a finish
    kernel past 1024 tokens), not ``_stats``'s ~35 torch ops: the same stats as ``_stats`` on
    float64 inputs (the reference's formulas), masked tokens holding NaN / inf."""
    from rlhf_kernels.ops import ppo_fused

    shape = (n_rows, T)
    labels = torch.randint(0, 10, shape, device=DEVICE)
    mask = torch.rand(shape, device=DEVICE) > 0.3
    mask[1] = False
    logp = torch.where(mask, -torch.rand(shape, device=DEVICE) * 3, torch.nan)
    entropy = torch.where(mask, torch.rand(shape, device=DEVICE), torch.inf)
    old = torch.where(mask, logp + 0.3 * torch.randn(shape, device=DEVICE), torch.nan)
    adv = torch.randn(shape[:1] if per_sequence else shape, device=DEVICE)
    ref = logp + 0.2 * torch.randn(shape, device=DEVICE) if kl else None
    normalizer = torch.tensor(5.0, device=DEVICE) if normalizer == "tensor" else normalizer
    m, weights = ppo_fused._mask_and_weights(labels, old, mask, -100, reduction, normalizer)
    options = (0.1 if kl else 0.0, "k3", 0.01, 0.2, 0.28, dual_clip, 20.0, reduction, "token",
               loss_type, normalizer, (1.3, 2.5) if loss_type == "sapo" else None)
    want = ppo_fused._stats(logp.double().reshape(-1), entropy.double().reshape(-1), labels,
                            old.double(), adv.double(), m, None if ref is None else ref.double(),
                            *options[:-1], taus=options[-1])

    def not_the_torch_stats(*args, **kwargs):
        raise AssertionError("the token-level stats took the torch ops")

    monkeypatch.setattr(ppo_fused, "_stats", not_the_torch_stats)
    got = ppo_fused._fused_or_torch_stats(logp.reshape(-1), entropy.reshape(-1), labels, old, adv,
                                          m, weights, ref, *options)
    assert list(got) == list(want)
    n_valid = int(mask.sum())
    for key in want:
        assert got[key].dtype == torch.float32, key
        atol = 1.5 / n_valid if key == "clipfrac" else 1e-6
        assert_close(got[key], want[key], atol=atol, rtol=2e-5, name=key)


@pytest.mark.parametrize("reduction", ["token-mean", "seq-mean-token-mean"])
def test_token_level_stats_with_a_zero_nan_or_inf_normalizer_tensor(monkeypatch, reduction):
    """A tensor normalizer is used unchecked (it may be an all-reduced count still on the
    device): 0, NaN or inf there. The stats divide the reduced sums by it as the reference's
    reduce_loss does: +-inf for a 0 count (not the NaN of inf weights times terms of both
    signs), NaN for 0 / 0 over a batch without a counted token (not 0), 0 for inf; against the
    reference's float64 stats, the kernel's path taken (``_stats`` trapped; the native CPU
    kernels keep ``_stats``: tests/kernels/test_native.py runs this too)."""
    from rlhf_kernels.ops import _ppo_terms, ppo_fused

    stats_of_the_reference = ppo_fused._stats

    shape = (3, 8)
    for value in (0.0, float("nan"), float("inf"), 6.0):
        for all_masked in (False, True):
            labels = torch.randint(0, 10, shape, device=DEVICE)
            mask = torch.rand(shape, device=DEVICE) > 0.3
            mask[0, 0] = True
            mask &= not all_masked
            logp = -torch.rand(shape, device=DEVICE) * 3
            entropy = torch.rand(shape, device=DEVICE)
            old = logp + 0.3 * torch.randn(shape, device=DEVICE)
            adv = torch.randn(shape, device=DEVICE)
            ref = logp + 0.2 * torch.randn(shape, device=DEVICE)
            normalizer = torch.tensor(value, device=DEVICE)
            m = (mask & (labels != -100)).to(torch.float32)
            _, want = reference._ppo_total(
                logp.double(), entropy.double(), old.double(), adv.double(), m, ref.double(),
                0.1, "k2", 0.0, 0.2, 0.2, None, 20.0, reduction, normalizer=normalizer.double())
            m, weights = ppo_fused._mask_and_weights(labels, old, mask, -100, reduction,
                                                     normalizer)
            if not _ppo_terms.native_cpu_kernels(logp):
                monkeypatch.setattr(ppo_fused, "_stats", None)
            got = ppo_fused._fused_or_torch_stats(
                logp.reshape(-1), entropy.reshape(-1), labels, old, adv, m, weights, ref, 0.1,
                "k2", 0.0, 0.2, 0.2, None, 20.0, reduction, "token", "ppo", normalizer, None)
            monkeypatch.setattr(ppo_fused, "_stats", stats_of_the_reference)
            for key in ("pg_loss", "kl"):
                torch.testing.assert_close(got[key].double(), want[key], rtol=1e-5, atol=1e-6,
                                           equal_nan=True,
                                           msg=f"{key}, normalizer {value}, {all_masked=}")


def _kinds(t: torch.Tensor) -> torch.Tensor:
    """Per element: 0 finite, 1 +inf, 2 -inf, 3 NaN."""
    t = t.detach()
    return (torch.isposinf(t) * 1 + torch.isneginf(t) * 2 + torch.isnan(t) * 3).to(torch.int8)


@pytest.mark.parametrize("path", ["eager", "custom op"])
def test_a_zero_or_nan_normalizer_tensor_gives_the_references_non_finite_loss(monkeypatch, path):
    """A tensor normalizer is used unread (an all-reduced count, maybe on the device), so 0 or
    NaN reaches the division: every loss is the float64 reference's +-inf / NaN (the fused ones
    summed inf weights times terms of both signs and returned NaN for the reference's +-inf, and
    +inf for its inf - inf with an entropy term), and the gradient is non-finite exactly where
    the reference's is: a masked or clipped token keeps a 0 gradient (the backward made it
    0 * inf = NaN). Eagerly and through the custom ops (torch.compile's path)."""
    import rlhf_kernels as rk
    from rlhf_kernels.ops import policy_loss, ppo_fused, value_loss

    if path == "custom op":
        for module in (ppo_fused, policy_loss, value_loss):
            monkeypatch.setattr(module, "launch_directly", lambda *tensors: False)
    g = torch.Generator().manual_seed(3)
    B, T, V, H = 2, 5, 7, 6
    hidden = torch.randn(B, T, H, generator=g).to(DEVICE)
    weight = torch.randn(V, H, generator=g).to(DEVICE)
    logits = (hidden @ weight.T).contiguous()
    labels = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    old = torch.randn(B, T, generator=g).to(DEVICE) - 2.0
    adv = torch.randn(B, T, generator=g).to(DEVICE)
    ref_logp = torch.randn(B, T, generator=g).to(DEVICE) - 2.0
    mask = torch.ones(B, T, device=DEVICE)
    mask[1, 3:] = 0
    logp = torch.randn(B, T, generator=g).to(DEVICE) - 2.0
    masked = (mask == 0)

    def run(op, leaf, *args, **kw):
        got_leaf = leaf.clone().requires_grad_()
        loss, _ = op(got_leaf, *args, **kw)
        loss.backward()
        want_leaf = leaf.double().requires_grad_()
        want_loss, _ = op(want_leaf, *(a.double() if torch.is_tensor(a) and a.is_floating_point()
                                       else a for a in args), **kw, backend="reference")
        want_loss.backward()
        return loss, got_leaf.grad, want_loss, want_leaf.grad

    for value in (0.0, -0.0, float("nan")):  # -0.0: x / -0 is -inf for x > 0
        normalizer = torch.tensor(value, device=DEVICE)
        cases = []
        for entropy_coef, kl_coef, reduction in ((0.0, 0.0, "token-mean"),
                                                 (0.01, 0.1, "seq-mean-token-mean")):
            fused = dict(mask=mask, ref_logp=ref_logp, kl_coef=kl_coef, reduction=reduction,
                         entropy_coef=entropy_coef, normalizer=normalizer)
            cases.append((f"ppo_loss_from_logits {reduction}", run(
                rk.ppo_loss_from_logits, logits, labels, old, adv, **fused), masked))
            cases.append((f"linear_ppo_loss {reduction}", run(
                lambda h, *a, **kw: rk.linear_ppo_loss(h, weight.to(h.dtype), *a, **kw),
                hidden, labels, old, adv, **fused), masked))
        cases.append(("ppo_policy_loss", run(rk.ppo_policy_loss, logp, old, adv, mask,
                                             normalizer=normalizer), masked))
        cases.append(("ppo_value_loss", run(rk.ppo_value_loss, logp, old, adv, mask,
                                            normalizer=normalizer), masked))
        for name, (loss, grad, want_loss, want_grad), masked_tokens in cases:
            what = f"{name}, normalizer {value}, {path}"
            assert not torch.isfinite(want_loss), what  # the case is the one under test
            assert _kinds(loss).item() == _kinds(want_loss).item(), (what, loss, want_loss)
            assert torch.equal(torch.isfinite(grad), torch.isfinite(want_grad)), what
            at_masked = grad[masked_tokens]
            assert torch.equal(at_masked, torch.zeros_like(at_masked)), what


def test_vmap_with_a_normalizer_tensor():
    """torch.func.vmap of the fused losses with a tensor normalizer: vmap runs the custom ops
    and then the Function that gives a count of 0 the reference's loss, which torch.func
    refused (a RuntimeError: a Function without setup_context). Per sample the float64
    reference's loss (its kind for a count of 0)."""
    g = torch.Generator().manual_seed(5)
    N, B, T, V, H = 2, 2, 4, 7, 5
    hidden = torch.randn(N, B, T, H, generator=g).to(DEVICE)
    weight = torch.randn(V, H, generator=g).to(DEVICE)
    logits = (hidden @ weight.T).contiguous()
    labels = torch.randint(0, V, (N, B, T), generator=g).to(DEVICE)
    old = torch.randn(N, B, T, generator=g).to(DEVICE) - 2.0
    adv = torch.randn(N, B, T, generator=g).to(DEVICE)
    mask = torch.ones(N, B, T, device=DEVICE)
    mask[:, 1, 2:] = 0
    for value, paths in ((2.0, ("logits",)), (0.0, ("logits", "linear"))):
        kw = dict(entropy_coef=0.01, normalizer=torch.tensor(value, device=DEVICE))
        ops = {"logits": (lambda x, *a: ppo_loss_from_logits(x, *a, **kw)[0], logits),
               "linear": (lambda h, *a: linear_ppo_loss(h, weight, *a, **kw)[0], hidden)}
        want = torch.stack([reference.ppo_loss_from_logits(
            logits[i].double(), labels[i], old[i].double(), adv[i].double(), mask[i], **kw)[0]
            for i in range(N)])
        for path in paths:
            op, first = ops[path]
            loss = torch.func.vmap(op)(first, labels, old, adv, mask)
            if value:
                assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
            else:
                assert not torch.isfinite(want).any()  # the case under test
                assert torch.equal(_kinds(loss), _kinds(want)), (path, loss, want)
