"""veRL's fused lm head (``FusedLinearForPPOFunction``) by rlhf_kernels.linear_logprobs.

Framework-free: the drop-in against a float64 computation of the same math (logits = hidden @
weight.T / temperature, log-softmax at the label, entropy), values and both gradients with random
upstream gradients, and veRL's output contract (log_probs fp32, entropy in the hidden states'
dtype, the input_ids' shape). Where veRL is importable, against veRL's own function and through
``patch_verl()``; a stand-in module checks the patch wiring everywhere.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from rlhf_kernels.integrations import verl_fused_linear as ours
from tests.numerics import DEVICE, assert_close_2x

V, H = 97, 24


def _inputs(shape, dtype, seed=0, requires_grad=True):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=generator).to(DEVICE, dtype)
    weight = (torch.randn(V, H, generator=generator) * H ** -0.5 * 3).to(DEVICE, dtype)
    ids = torch.randint(0, V, shape, generator=generator).to(DEVICE)
    return hidden.requires_grad_(requires_grad), weight.requires_grad_(requires_grad), ids


def _torch_math(hidden, weight, ids, temperature, compute_dtype):
    """The head written in torch at ``compute_dtype``: veRL's math (matmul, division by the
    temperature, fp32 softmax) in the dtype asked for (float64: the reference)."""
    logits = (hidden.to(compute_dtype) @ weight.to(compute_dtype).T) / temperature
    logits = logits.to(torch.promote_types(compute_dtype, torch.float32))
    log_probs = logits.log_softmax(-1)
    logp = log_probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy


def _value_and_grads(fn, hidden, weight, grad_logp, grad_entropy):
    logp, entropy = fn(hidden, weight)
    gh, gw = torch.autograd.grad(
        (logp.float() * grad_logp).sum() + (entropy.float() * grad_entropy).sum(),
        (hidden, weight))
    return logp, entropy, gh, gw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37,), (3, 13)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_against_float64(dtype, shape, temperature):
    hidden, weight, ids = _inputs(shape, dtype)
    generator = torch.Generator().manual_seed(1)
    grad_logp = torch.randn(shape, generator=generator).to(DEVICE)
    grad_entropy = torch.randn(shape, generator=generator).to(DEVICE)

    mine = _value_and_grads(
        lambda h, w: ours.FusedLinearForPPOFunction.apply(h, w, ids, temperature),
        hidden, weight, grad_logp, grad_entropy)
    same = _value_and_grads(lambda h, w: _torch_math(h, w, ids, temperature, dtype),
                            hidden, weight, grad_logp, grad_entropy)
    ref = _value_and_grads(lambda h, w: _torch_math(h, w, ids, temperature, torch.float64),
                           hidden, weight, grad_logp, grad_entropy)
    assert mine[0].dtype == torch.float32 and mine[0].shape == ids.shape  # veRL's contract
    assert mine[1].dtype == dtype and mine[1].shape == ids.shape
    for i, name in enumerate(("log_probs", "entropy", "d hidden", "d weight")):
        assert_close_2x(mine[i], same[i], ref[i], dtype, name=name)


def test_entropy_only_backward_and_keep_fp32():
    """veRL's function takes a backward through one output alone (the other's gradient None);
    the fp32 variant (patch_verl(keep_fp32=True)) returns the entropy unrounded."""
    hidden, weight, ids = _inputs((2, 9), torch.bfloat16)
    _, entropy = ours.FusedLinearForPPOFunction.apply(hidden, weight, ids)
    gh, = torch.autograd.grad(entropy.float().sum(), (hidden,))
    hidden64 = hidden.detach().double().requires_grad_(True)
    _, ref_entropy = _torch_math(hidden64, weight.detach(), ids, 1.0, torch.float64)
    ref_gh, = torch.autograd.grad(ref_entropy.sum(), (hidden64,))
    # the gradient is rounded to bf16 (the input's dtype): a few bf16 ulps
    torch.testing.assert_close(gh.double(), ref_gh, atol=3e-2, rtol=3e-2)
    logp32, entropy32 = ours.FusedLinearForPPOFunctionFP32.apply(hidden, weight, ids)
    assert logp32.dtype == entropy32.dtype == torch.float32
    with torch.no_grad():
        _, same_entropy = _torch_math(hidden, weight, ids, 1.0, torch.bfloat16)  # fp32 out
    assert_close_2x(entropy32, same_entropy, ref_entropy.detach(), torch.bfloat16,
                    name="entropy, keep_fp32")
    assert not torch.equal(entropy32, entropy.float())  # rounded to bf16 only by default


def test_temperatures_outside_the_kernels_domain_go_to_verl(monkeypatch):
    """veRL's head divides the logits by whatever temperature it is given (0 makes them NaN, a
    negative one flips them, inf makes them 0); linear_logprobs takes a finite number > 0, and
    the drop-in raised its ValueError ('temperature must be a positive finite number') where
    veRL computes. Those calls run veRL's own function; a 0-d tensor temperature stays here."""
    calls = []

    class VerlHead:
        @staticmethod
        def apply(*args):
            calls.append(args[3])
            return "veRL"

    monkeypatch.setattr(ours, "original", lambda module, name: VerlHead)
    hidden, weight, ids = _inputs((2, 5), torch.float32)
    for temperature in (0.0, -0.5, float("inf"), float("nan")):
        assert ours.FusedLinearForPPOFunction.apply(hidden, weight, ids, temperature) == "veRL"
    assert len(calls) == 4
    logp, entropy = ours.FusedLinearForPPOFunction.apply(hidden, weight, ids,
                                                         torch.tensor(0.7))
    ref_logp, ref_entropy = _torch_math(hidden.detach(), weight.detach(), ids, 0.7,
                                        torch.float64)
    assert len(calls) == 4
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_refused_with_the_shape_expected():
    hidden, weight, ids = _inputs((2, 5), torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match=r"input_ids of shape \(5,\).*expected \(2, 5\)"):
        ours.FusedLinearForPPOFunction.apply(hidden, weight, ids[0])
    with pytest.raises(ValueError, match=r"vocab_weights must be \(vocab, 24\)"):
        ours.FusedLinearForPPOFunction.apply(hidden, weight[:, :5], ids)
    with pytest.raises(ValueError, match="hidden_states must be"):
        ours.FusedLinearForPPOFunction.apply(hidden[0, 0], weight, ids[0, 0])


class _Recorder:
    """Stands for veRL's FusedLinearForPPOFunction in a stand-in module."""

    calls = 0

    @classmethod
    def apply(cls, *args, **kwargs):
        cls.calls += 1
        raise AssertionError("the framework's own function ran under the patch")


def _stand_in_verl(monkeypatch):
    """A minimal ``verl.utils.experimental.torch_functional`` whose FusedLinearForPPO module
    calls the module-level function as veRL's does, and a second module that imported it by
    name."""
    names = ["verl", "verl.utils", "verl.utils.experimental", ours.TARGET_MODULE,
             "verl.models_stand_in"]
    modules = {name: types.ModuleType(name) for name in names}
    functional = modules[ours.TARGET_MODULE]
    functional.FusedLinearForPPOFunction = _Recorder

    class FusedLinearForPPO(torch.nn.Module):
        def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
            return functional.FusedLinearForPPOFunction.apply(
                hidden_states, vocab_weights, input_ids, temperature, 512)

    functional.FusedLinearForPPO = FusedLinearForPPO
    modules["verl.models_stand_in"].FusedLinearForPPOFunction = _Recorder
    modules["verl"].__path__ = []  # a package, as far as importlib is concerned
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return functional, modules["verl.models_stand_in"]


def test_patch_verl_swaps_the_fused_head_in_and_out(monkeypatch):
    if any(name == "verl" or name.startswith("verl.") for name in sys.modules):
        pytest.skip("a real veRL is loaded (test_against_verl_itself checks the patch there)")
    functional, importer = _stand_in_verl(monkeypatch)
    from rlhf_kernels.integrations import verl as our_verl

    hidden, weight, ids = _inputs((2, 7), torch.float32)
    with pytest.warns(UserWarning, match="left unpatched"):  # the stand-in has no core_algos
        patch = our_verl.patch_verl()
    with patch:
        assert functional.FusedLinearForPPOFunction is ours.FusedLinearForPPOFunction
        assert importer.FusedLinearForPPOFunction is ours.FusedLinearForPPOFunction
        logp, entropy = functional.FusedLinearForPPO()(hidden, weight, ids, 0.9)
        ref_logp, ref_entropy = _torch_math(hidden, weight, ids, 0.9, torch.float64)
        torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-5, rtol=1e-5)
    assert functional.FusedLinearForPPOFunction is _Recorder
    assert importer.FusedLinearForPPOFunction is _Recorder
    assert _Recorder.calls == 0
    with pytest.warns(UserWarning, match="left unpatched"):
        with our_verl.patch_verl(keep_fp32=True):
            assert functional.FusedLinearForPPOFunction is ours.FusedLinearForPPOFunctionFP32


def test_against_verl_itself():
    verl_f = pytest.importorskip("verl.utils.experimental.torch_functional")
    from rlhf_kernels.integrations import verl as our_verl

    hidden, weight, ids = _inputs((2, 11), torch.float32)
    grads = torch.randn(2, 11), torch.randn(2, 11)
    theirs = _value_and_grads(
        lambda h, w: verl_f.FusedLinearForPPOFunction.apply(h, w, ids, 0.8, 4), hidden, weight,
        *grads)
    with our_verl.patch_verl():
        assert verl_f.FusedLinearForPPOFunction is ours.FusedLinearForPPOFunction
        mine = _value_and_grads(lambda h, w: verl_f.FusedLinearForPPO()(h, w, ids, 0.8),
                                hidden, weight, *grads)
    for a, b in zip(mine, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
