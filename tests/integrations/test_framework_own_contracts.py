"""Contracts that TRL's and veRL's own unit tests check on the functions our drop-ins replace,
held by our drop-ins (found by running those frameworks' tests against the patched functions;
docs/integrations.md, "The frameworks' own tests").

* TRL's fused lm head (``trl.trainer.utils._ChunkedLogProbFunction``, replaced by
  ``rlhf_kernels.integrations.trl.ChunkedLogProbFunction``): the six-argument call TRL's tests
  make returns all five outputs (TRL's ``outputs`` defaults to every field); under autocast the
  weight gradient comes from the autocast-rounded hidden states (two hidden states equal after
  the bf16 cast give bit-identical log-probs and weight gradients); with any of hidden / weight /
  bias frozen the others get the float64 gradient and the frozen ones none.
* veRL's fused lm head (``FusedLinearForPPOFunction``): veRL's own test compiles the module that
  calls it with ``dynamic=True``; the drop-in gives the float64 values and gradients compiled,
  at two token counts (the second a recompile-free dynamic shape).

The drop-ins need no framework here (the TRL one falls back to TRL only for options not used
below); values are held to float64 closed forms.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_kernels.integrations.trl import ChunkedLogProbFunction
from rlhf_kernels.integrations.verl_fused_linear import FusedLinearForPPOFunction

N, H, V = 40, 16, 131


def _inputs(dtype=torch.float32, seed=0, bias=True):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=generator).to(dtype)
    weight = (torch.randn(V, H, generator=generator) * H ** -0.5 * 3).to(dtype)
    b = torch.randn(V, generator=generator).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=generator)
    return hidden, weight, b, labels


def _reference(hidden, weight, bias, labels, temperature):
    """float64: log-prob of the label, entropy, log sum p^2, mean logit, label is first argmax."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    z = logits / temperature
    log_p = z.log_softmax(-1)
    logp = log_p.gather(-1, labels[:, None])[:, 0]
    entropy = -(log_p.exp() * log_p).sum(-1)
    log_sum_sq = torch.logsumexp(2 * log_p, -1)
    return logp, entropy, log_sum_sq, z.mean(-1), z.argmax(-1) == labels


def test_trl_six_argument_call_returns_every_output():
    hidden, weight, bias, labels = _inputs()
    out = ChunkedLogProbFunction.apply(hidden, weight, bias, labels, 0.7, 32)
    assert len(out) == 5 and all(x is not None for x in out)
    ref = _reference(hidden, weight, bias, labels, 0.7)
    for name, got, want in zip(("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"),
                               out[:4], ref[:4]):
        assert got.dtype == torch.float32 and got.shape == (N,), name
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5, msg=name)
    assert out[4].dtype == torch.bool
    assert torch.equal(out[4], ref[4])


def test_trl_weight_gradient_from_the_autocast_hidden_states():
    """Two fp32 hidden states equal after the bf16 cast: under bf16 autocast the matmuls (forward
    and backward) see the same bf16 values, so log-probs and weight gradients are bit-identical
    (a backward that used the fp32 hidden states would depend on the discarded bits)."""
    hidden = torch.linspace(1.0, 2.0, N * H).reshape(N, H).to(torch.bfloat16).float()
    perturbed = hidden + 1e-4
    assert torch.equal(hidden.to(torch.bfloat16), perturbed.to(torch.bfloat16))
    _, weight, _, labels = _inputs(bias=False)
    results = []
    for h in (hidden, perturbed):
        h = h.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp, *_ = ChunkedLogProbFunction.apply(h, w, None, labels, 1.0, 32, None, 1.0,
                                                    ("log_probs",))
        logp.sum().backward()
        results.append((logp.detach(), w.grad))
    assert results[0][0].dtype == torch.float32
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("trainable", ["hidden", "weight", "bias"])
def test_trl_gradients_with_partially_frozen_inputs(trainable):
    hidden, weight, bias, labels = _inputs()
    tensors = {"hidden": hidden, "weight": weight, "bias": bias}
    tensors[trainable].requires_grad_()
    logp, entropy, *_ = ChunkedLogProbFunction.apply(
        tensors["hidden"], tensors["weight"], tensors["bias"], labels, 0.7, 32)
    (2.0 * logp + 0.5 * entropy).sum().backward()

    leaves = {k: v.detach().double().requires_grad_(k == trainable) for k, v in tensors.items()}
    ref_logp, ref_entropy, *_ = _reference(leaves["hidden"], leaves["weight"], leaves["bias"],
                                           labels, 0.7)
    (2.0 * ref_logp + 0.5 * ref_entropy).sum().backward()
    for name, tensor in tensors.items():
        if name == trainable:
            assert tensor.grad is not None and tensor.grad.dtype == tensor.dtype, name
            torch.testing.assert_close(tensor.grad.double(), leaves[name].grad,
                                       atol=1e-4, rtol=1e-4, msg=name)
        else:
            assert tensor.grad is None, name


def test_verl_fused_head_compiled_with_dynamic_shapes():
    """veRL's own test compiles FusedLinearForPPO (which calls FusedLinearForPPOFunction.apply)
    with dynamic=True: values and gradients stay the float64 ones, at two token counts."""

    def head(hidden, weight, ids):
        return FusedLinearForPPOFunction.apply(hidden, weight, ids, 1.5, 64)

    compiled = torch.compile(head, dynamic=True, backend="aot_eager")
    for tokens, seed in ((37, 0), (53, 1)):
        generator = torch.Generator().manual_seed(seed)
        hidden = torch.randn(1, tokens, H, generator=generator).requires_grad_()
        weight = (torch.randn(V, H, generator=generator) * H ** -0.5 * 3).requires_grad_()
        ids = torch.randint(0, V, (1, tokens), generator=generator)
        g_logp = torch.randn(1, tokens, generator=generator)
        g_entropy = torch.randn(1, tokens, generator=generator)
        logp, entropy = compiled(hidden, weight, ids)
        assert logp.shape == entropy.shape == (1, tokens)
        gh, gw = torch.autograd.grad((logp * g_logp).sum() + (entropy * g_entropy).sum(),
                                     (hidden, weight))

        h64 = hidden.detach().double().requires_grad_()
        w64 = weight.detach().double().requires_grad_()
        ref_logp, ref_entropy, *_ = _reference(h64[0], w64, None, ids[0], 1.5)
        rh, rw = torch.autograd.grad((ref_logp * g_logp[0].double()).sum()
                                     + (ref_entropy * g_entropy[0].double()).sum(), (h64, w64))
        torch.testing.assert_close(logp[0].double(), ref_logp, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(entropy[0].double(), ref_entropy, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(gh.double(), rh, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gw.double(), rw, atol=1e-4, rtol=1e-4)
