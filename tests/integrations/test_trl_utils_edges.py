"""TRL's log-probability / entropy helpers under patch_trl() for the arguments the common tests do
not reach: fp64 logits (TRL computes them in fp64) and a non-finite temperature (TRL divides by
it). References are float64 closed forms written here."""

import math

import pytest
import torch

from rlhf_kernels import integrations

pytest.importorskip("trl.trainer.utils")


@pytest.fixture
def utils():
    import trl.trainer.utils as module

    with integrations.patch_trl():
        yield module


def _exact(logits: torch.Tensor, index: torch.Tensor, temperature: float):
    """fp64 logp, entropy and d(logp + 0.5 entropy)/d logits of softmax(logits / T), by hand."""
    z = logits.detach().double() / temperature
    z = z - z.max(-1, keepdim=True).values
    log_p = z - z.exp().sum(-1, keepdim=True).log()
    p = log_p.exp()
    logp = log_p.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    entropy = -(p * log_p).sum(-1)
    onehot = torch.nn.functional.one_hot(index, logits.shape[-1]).double()
    d_logp = onehot - p  # d log p_i / d z
    d_entropy = -p * (log_p + entropy.unsqueeze(-1))  # d H / d z
    grad = (d_logp + 0.5 * d_entropy) / temperature
    return logp, entropy, grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp64_logits_are_computed_in_fp64(utils, temperature):
    """TRL's eager path keeps fp64 logits in fp64; the drop-ins returned fp32-rounded values
    (errors ~3e-7) in an fp64 tensor."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 4, 53, dtype=torch.float64)).requires_grad_()
    index = torch.randint(0, 53, (3, 4))
    row_mask = torch.rand(3, 4) < 0.75
    logp_ref, entropy_ref, grad_ref = _exact(logits, index, temperature)
    tight = dict(atol=1e-12, rtol=1e-12)

    logp, entropy = utils.selective_log_softmax_and_entropy(logits, index, True, temperature)
    assert logp.dtype == entropy.dtype == torch.float64
    torch.testing.assert_close(logp, logp_ref, **tight)
    torch.testing.assert_close(entropy, entropy_ref, **tight)
    (logp.sum() + 0.5 * entropy.sum()).backward()
    torch.testing.assert_close(logits.grad, grad_ref, **tight)

    alone = utils.selective_log_softmax(logits, index, temperature, row_mask)
    torch.testing.assert_close(alone, torch.where(row_mask, logp_ref, 0.0), **tight)
    tempered = (logits.detach() / temperature)
    torch.testing.assert_close(utils.entropy_from_logits(tempered),
                               _exact(tempered, index, 1.0)[1], **tight)


@pytest.mark.parametrize("fn", ["selective_log_softmax", "selective_log_softmax_and_entropy"])
def test_non_finite_temperature_is_trls_division(utils, fn):
    """TRL divides by the temperature: inf gives the uniform distribution (logp = -log V,
    entropy = log V), NaN gives NaN; the drop-ins raised a ValueError TRL does not raise. A
    temperature <= 0 is TRL's ValueError, as before."""
    vocab = 29
    logits = torch.randn(2, 3, vocab)
    index = torch.randint(0, vocab, (2, 3))
    call = getattr(utils, fn)

    def outputs(temperature):
        if fn == "selective_log_softmax":
            return (call(logits, index, temperature),)
        return call(logits, index, True, temperature)

    uniform = outputs(float("inf"))
    torch.testing.assert_close(uniform[0], torch.full((2, 3), -math.log(vocab)))
    if len(uniform) == 2:
        torch.testing.assert_close(uniform[1], torch.full((2, 3), math.log(vocab)))
    assert all(out.isnan().all() for out in outputs(float("nan")))
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be positive"):
            outputs(bad)


def _fused(utils, hidden, weight, bias, targets, temperature, logit_scale=1.0):
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    return utils._ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, 16,
                                               None, logit_scale, outputs)


def test_fused_head_fp64_inputs_give_trls_fp32_outputs(utils):
    """TRL's fused head returns fp32 outputs for any hidden dtype; the drop-in returned fp64 ones
    for fp64 hidden states and weights. Values: the float64 closed form, to fp32 rounding."""
    torch.manual_seed(1)
    hidden = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(41, 8, dtype=torch.float64)
    bias = torch.randn(41, dtype=torch.float64)
    targets = torch.randint(0, 41, (6,))
    logp, entropy, log_sum_sq, mean_logits, is_top1 = _fused(utils, hidden, weight, bias, targets,
                                                             0.7, 1.3)
    assert [t.dtype for t in (logp, entropy, log_sum_sq, mean_logits)] == [torch.float32] * 4
    assert is_top1.dtype == torch.bool
    z = (hidden.detach() @ weight.T + bias) * 1.3 / 0.7
    logp_ref, entropy_ref, _ = _exact(z, targets, 1.0)
    log_p = z.log_softmax(-1)
    torch.testing.assert_close(logp.double(), logp_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), entropy_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_sum_sq.double(), (2 * log_p).exp().sum(-1).log(),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean_logits.double(), z.mean(-1), atol=1e-5, rtol=1e-5)
    assert torch.equal(is_top1, z.argmax(-1) == targets)
    logp.sum().backward()
    assert hidden.grad.dtype == torch.float64


def test_fused_head_non_finite_temperature_is_trls_division(utils):
    """TRL's fused head multiplies by 1 / temperature: inf gives the uniform distribution (0
    logits: only token 0, the first argmax, is top-1), and 0 is its ZeroDivisionError; the
    drop-in raised ValueError for both."""
    vocab = 23
    hidden, weight = torch.randn(4, 8), torch.randn(vocab, 8)
    targets = torch.tensor([0, 5, 22, 0])
    logp, entropy, log_sum_sq, mean_logits, is_top1 = _fused(utils, hidden, weight, None,
                                                             targets, float("inf"))
    log_v = math.log(vocab)
    torch.testing.assert_close(logp, torch.full((4,), -log_v))
    torch.testing.assert_close(entropy, torch.full((4,), log_v))
    torch.testing.assert_close(log_sum_sq, torch.full((4,), -log_v))
    torch.testing.assert_close(mean_logits, torch.zeros(4))
    assert is_top1.tolist() == [True, False, False, True]
    with pytest.raises(ZeroDivisionError):
        _fused(utils, hidden, weight, None, targets, 0.0)
