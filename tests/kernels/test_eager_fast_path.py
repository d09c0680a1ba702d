"""The ops' eager fast path (``rlhf_kernels.backend.launch_directly``) is the custom op, minus
its host time.

In plain eager mode the losses, KL, GAE, whitening, reward shaping and the logprob family
(logprobs, linear_logprobs, ppo_loss_from_logits, linear_ppo_loss) call their Triton
launchers directly (under a ``torch.autograd.Function`` when a gradient is needed) instead of
through their ``torch.library`` custom ops, which torch.compile, export and torch.func still get.
Checked here: an eager call and its backward dispatch no ``rlhf_kernels::`` op; outputs and
gradients equal the custom-op path's bit for bit; fake tensors (what torch.compile and export
trace with) still go through the custom op and its fake impl. Host timings are not tested (see
``benchmarks/host_overhead.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_kernels as rk
from rlhf_kernels.ops import (
    bradley_terry,
    gae,
    kl,
    policy_loss,
    ppo_fused,
    rewards,
    value_loss,
    whiten,
)
from rlhf_kernels.ops import linear_logprobs as linear_logprobs_mod
from rlhf_kernels.ops import logprobs as logprobs_mod
from tests.numerics import DEVICE, padded_mask

B, T = 3, 37
MODULES = (bradley_terry, gae, kl, policy_loss, rewards, value_loss, whiten)


def _inputs(dtype=torch.float32):
    logp = (-torch.rand(B, T, device=DEVICE) * 2).to(dtype)
    return {
        "logp": logp, "old_logp": (logp + 0.2 * torch.randn(B, T, device=DEVICE)).to(dtype),
        "ref_logp": (logp + 0.3 * torch.randn(B, T, device=DEVICE)).to(dtype),
        "advantages": torch.randn(B, T, device=DEVICE), "mask": padded_mask(B, T),
        "values": torch.randn(B, T, device=DEVICE).to(dtype),
        "returns": torch.randn(B, T, device=DEVICE), "scores": torch.randn(B, device=DEVICE),
        "chosen": torch.randn(B * T, device=DEVICE).to(dtype),
        "rejected": torch.randn(B * T, device=DEVICE).to(dtype),
    }


# name -> (fn(inputs) -> outputs, names that get a gradient)
CASES = {
    "ppo_policy_loss": (lambda x: rk.ppo_policy_loss(
        x["logp"], x["old_logp"], x["advantages"], x["mask"], dual_clip=3.0,
        reduction="seq-mean-token-mean"), ("logp",)),
    "ppo_value_loss": (lambda x: rk.ppo_value_loss(
        x["values"], x["old_logp"], x["returns"], x["mask"]), ("values",)),
    "bradley_terry_loss": (lambda x: rk.bradley_terry_loss(
        x["chosen"], x["rejected"], 0.1, center_coef=0.01), ("chosen", "rejected")),
    "bradley_terry_loss(chosen only)": (lambda x: rk.bradley_terry_loss(
        x["chosen"], x["rejected"]), ("chosen",)),
    "kl_penalty": (lambda x: rk.kl_penalty(x["logp"], x["ref_logp"], "k3", clamp=1.0),
                   ("logp", "ref_logp")),
    "kl_penalty(logp only)": (lambda x: rk.kl_penalty(x["logp"], x["ref_logp"], "k2"),
                              ("logp",)),
    "kl_penalty(ref only)": (lambda x: rk.kl_penalty(x["logp"], x["ref_logp"], "abs"),
                             ("ref_logp",)),
    "gae": (lambda x: rk.gae(x["advantages"], x["values"], x["mask"], 0.9, 0.8), ()),
    "masked_whiten": (lambda x: rk.masked_whiten(x["advantages"], x["mask"]), ()),
    "shape_rewards": (lambda x: rk.shape_rewards(x["scores"], x["logp"], x["ref_logp"],
                                                 x["mask"], 0.1, "k3"), ()),
}


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return [t for item in out for t in _flat(item)]


def _run(fn, inputs, grad_names, upstream=None):
    leaves = {k: v.detach().clone().requires_grad_(k in grad_names) for k, v in inputs.items()}
    outs = _flat(fn(leaves))
    grads = []
    if grad_names:
        differentiable = [o for o in outs if o.requires_grad]
        if upstream is None:
            upstream = [torch.randn_like(o) for o in differentiable]
        grads = torch.autograd.grad(differentiable, [leaves[k] for k in grad_names], upstream)
    return [o.detach() for o in outs], list(grads), upstream


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("op", list(CASES))
def test_eager_path_skips_the_custom_op_and_equals_it(op, dtype, monkeypatch):
    fn, grad_names = CASES[op]
    inputs = _inputs(dtype)
    with _RecordOps() as record:
        fast, fast_grads, upstream = _run(fn, inputs, grad_names)
    custom = [name for name in record.names if name.startswith("rlhf_kernels::")]
    assert not custom, f"{op}: the eager call dispatched {custom}"

    for module in MODULES:
        monkeypatch.setattr(module, "launch_directly", lambda *tensors: False)
    with _RecordOps() as record:
        slow, slow_grads, _ = _run(fn, inputs, grad_names, upstream)
    assert any(name.startswith("rlhf_kernels::") for name in record.names), \
        f"{op}: the forced custom-op path did not run a custom op"

    assert len(fast) == len(slow) and len(fast_grads) == len(slow_grads) == len(grad_names)
    for i, (got, want) in enumerate(zip(fast + fast_grads, slow + slow_grads)):
        assert got.dtype == want.dtype and got.shape == want.shape, (op, i)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m, i=i: f"{op} output/grad {i}: {m}")


@pytest.mark.parametrize("op", list(CASES))
def test_fake_tensors_take_the_custom_op(op):
    """torch.compile and export trace with fake tensors: they must reach the custom op's fake
    impl (a direct launch would hand Triton a tensor without storage)."""
    fn, _ = CASES[op]
    inputs = _inputs()
    want = _flat(fn(inputs))
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = {k: mode.from_tensor(v) for k, v in inputs.items()}
        got = _flat(fn(fake))
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want]


def test_launch_config_arithmetic_matches_triton():
    """The launchers' plain-int next_power_of_2 / cdiv (no constexpr wrapper) agree with
    Triton's own on every value they can meet."""
    import triton

    from rlhf_kernels.ops._reduce import cdiv, next_power_of_2

    for n in range(1, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 1024, 2048):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert next_power_of_2(2**40 + 1) == 2**41


# --------------------------------------------------------------------------------------------
# the logprob family: logprobs, linear_logprobs, ppo_loss_from_logits, linear_ppo_loss
# --------------------------------------------------------------------------------------------
LP_B, LP_T, LP_V, LP_H, LP_R = 2, 5, 37, 8, 3
LP_MODULES = (logprobs_mod, linear_logprobs_mod, ppo_fused)


def _lp_inputs(dtype=torch.float32):
    labels = torch.randint(0, LP_V, (LP_B, LP_T), device=DEVICE)
    labels[0, -2:] = -100  # ignored tokens
    logp = -torch.rand(LP_B, LP_T, device=DEVICE) * 2
    return {
        "logits": torch.randn(LP_B, LP_T + 1, LP_V, device=DEVICE).to(dtype), "labels": labels,
        "hidden": torch.randn(LP_B, LP_T, LP_H, device=DEVICE).to(dtype),
        "weight": (torch.randn(LP_V, LP_H, device=DEVICE) * LP_H ** -0.5).to(dtype),
        "bias": (0.1 * torch.randn(LP_V, device=DEVICE)).to(dtype),
        "lora_a": (0.3 * torch.randn(LP_R, LP_H, device=DEVICE)).to(dtype),
        "lora_b": (0.3 * torch.randn(LP_V, LP_R, device=DEVICE)).to(dtype),
        "old_logp": logp + 0.2 * torch.randn(LP_B, LP_T, device=DEVICE),
        "ref_logp": logp + 0.3 * torch.randn(LP_B, LP_T, device=DEVICE),
        "advantages": torch.randn(LP_B, LP_T, device=DEVICE), "mask": padded_mask(LP_B, LP_T),
    }


def _rollout(x):
    return dict(old_logp=x["old_logp"], advantages=x["advantages"], mask=x["mask"])


LP_CASES = {
    "logprobs(entropy, sliced)": (lambda x: rk.logprobs(
        x["logits"][:, :-1, :], x["labels"], 0.8, return_entropy=True), ("logits",)),
    "logprobs(logp only)": (lambda x: rk.logprobs(x["logits"][:, 1:, :].contiguous(),
                                                  x["labels"]), ("logits",)),
    "logprobs(inplace_backward)": (lambda x: rk.logprobs(
        x["logits"][:, :-1, :] * 1.0, x["labels"], return_entropy=True, inplace_backward=True),
        ("logits",)),
    "linear_logprobs(bias, lora, entropy)": (lambda x: rk.linear_logprobs(
        x["hidden"], x["weight"], x["labels"], x["bias"], x["lora_a"], x["lora_b"], 0.5,
        temperature=0.9, return_entropy=True, chunk_size=4),
        ("hidden", "weight", "bias", "lora_a", "lora_b")),
    "linear_logprobs(hidden only)": (lambda x: rk.linear_logprobs(
        x["hidden"], x["weight"], x["labels"]), ("hidden",)),
    "ppo_loss_from_logits": (lambda x: rk.ppo_loss_from_logits(
        x["logits"][:, :-1, :], x["labels"], **_rollout(x), ref_logp=x["ref_logp"],
        kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0, reduction="seq-mean-token-mean"),
        ("logits",)),
    "linear_ppo_loss": (lambda x: rk.linear_ppo_loss(
        x["hidden"], x["weight"], x["labels"], **_rollout(x), lora_a=x["lora_a"],
        lora_b=x["lora_b"], lora_scale=2.0, ref_logp=x["ref_logp"], kl_coef=0.1,
        entropy_coef=0.01, chunk_size=3), ("hidden", "weight", "lora_a", "lora_b")),
}


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("op", list(LP_CASES))
def test_logprob_ops_eager_path_skips_the_custom_op_and_equals_it(op, dtype, monkeypatch):
    fn, grad_names = LP_CASES[op]
    inputs = _lp_inputs(dtype)
    outputs = []
    for grad in (True, False):
        with _RecordOps() as record:
            fast, fast_grads, upstream = _run(fn, inputs, grad_names if grad else ())
        custom = [name for name in record.names if name.startswith("rlhf_kernels::")]
        assert not custom, f"{op}: the eager call dispatched {custom}"
        with monkeypatch.context() as patch:
            for module in LP_MODULES:
                patch.setattr(module, "launch_directly", lambda *tensors: False)
            with _RecordOps() as record:
                slow, slow_grads, _ = _run(fn, inputs, grad_names if grad else (), upstream)
        assert any(name.startswith("rlhf_kernels::") for name in record.names), \
            f"{op}: the forced custom-op path did not run a custom op"
        assert len(fast) == len(slow) and len(fast_grads) == len(slow_grads)
        for i, (got, want) in enumerate(zip(fast + fast_grads, slow + slow_grads)):
            assert got.dtype == want.dtype and got.shape == want.shape, (op, i)
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m, i=i: f"{op} output/grad {i}: {m}")
        outputs.append(fast)
    # Without a gradient the fused PPO sweeps skip the per-token derivatives: same values.
    for got, want in zip(*outputs):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("op", list(LP_CASES))
def test_logprob_ops_fake_tensors_take_the_custom_op(op):
    fn, _ = LP_CASES[op]
    inputs = _lp_inputs()
    want = _flat(fn(inputs))
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        got = _flat(fn({k: mode.from_tensor(v) for k, v in inputs.items()}))
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want]


def test_logprobs_eager_outputs_are_editable_and_inplace_backward_bumps_the_version():
    """The eager Function returns fresh tensors (editing them leaves the gradient alone), and
    an in-place backward marks the logits as modified, as the mutating custom op does."""
    x = _lp_inputs()
    leaf = x["logits"].requires_grad_(True)
    lp, ent = rk.logprobs(leaf[:, :-1, :], x["labels"], return_entropy=True)
    (want,) = torch.autograd.grad(lp.sum() + ent.sum(), leaf)
    lp, ent = rk.logprobs(leaf[:, :-1, :], x["labels"], return_entropy=True)
    total = lp.sum() + ent.sum()
    lp.mul_(0).add_(5.0)
    ent.fill_(float("nan"))
    (got,) = torch.autograd.grad(total, leaf)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    logits = leaf * 1.0
    other = (logits * logits).sum()  # saves logits for its own backward
    lp = rk.logprobs(logits, torch.zeros(LP_B, LP_T + 1, dtype=torch.long, device=DEVICE),
                     inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp.sum() + other).backward()


@pytest.mark.parametrize("op", ["logprobs", "linear_logprobs"])
def test_logprob_gradients_refuse_a_double_backward(op):
    """Under create_graph=True the eager gradient must not pass for a constant: the second-order
    term would silently be 0. It raises when differentiated, as the custom-op path's does, even
    when the incoming gradient is a constant (the saved inputs carry the dependence)."""
    x = _lp_inputs()
    if op == "logprobs":
        leaf = x["logits"][:, 1:, :].contiguous().requires_grad_(True)
        out = rk.logprobs(leaf, x["labels"])
    else:
        leaf = x["hidden"].requires_grad_(True)
        out = rk.linear_logprobs(leaf, x["weight"], x["labels"])
    (grad,) = torch.autograd.grad(out.sum(), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match=f"rlhf_kernels.{op}: its gradient is not "
                                           "differentiable again"):
        (grad.square().sum() + leaf.sum()).backward()
    # a plain backward is unaffected
    (plain,) = torch.autograd.grad(rk.logprobs(leaf, x["labels"]).sum() if op == "logprobs"
                                   else rk.linear_logprobs(leaf, x["weight"], x["labels"]).sum(),
                                   leaf)
    torch.testing.assert_close(plain, grad.detach(), rtol=0, atol=0)


def _loss_for_double_backward(op, leaf):
    """A scalar of ``op`` with ``leaf`` (2, 6) as its differentiable input."""
    other = torch.randn(2, 6, device=DEVICE)
    if op == "kl_penalty":
        return rk.kl_penalty(leaf, other, "k3").sum()
    if op == "ppo_policy_loss":
        return rk.ppo_policy_loss(leaf, other, torch.randn(2, 6, device=DEVICE))[0]
    if op == "ppo_value_loss":
        return rk.ppo_value_loss(leaf, other, torch.randn(2, 6, device=DEVICE))[0]
    if op == "bradley_terry_loss":
        return rk.bradley_terry_loss(leaf, other)[0]
    labels = torch.randint(0, 5, (2, 6), device=DEVICE)
    if op == "ppo_loss_from_logits":
        logits = leaf[..., None] * torch.linspace(-1, 1, 5, device=DEVICE)
        return rk.ppo_loss_from_logits(logits, labels, other - 2, other)[0]
    weight = torch.randn(5, 1, device=DEVICE)
    return rk.linear_ppo_loss(leaf[..., None], weight, labels, other - 2, other)[0]


@pytest.mark.parametrize("path", ["eager", "custom op"])
@pytest.mark.parametrize("op", ["kl_penalty", "ppo_policy_loss", "ppo_value_loss",
                                "ppo_loss_from_logits", "linear_ppo_loss", "logprobs"])
def test_a_second_derivative_by_autograd_grad_raises_too(monkeypatch, op, path):
    """``torch.autograd.grad(f(grad), leaf, allow_unused=True)`` runs only the nodes on a path
    to ``leaf``: the error node, fed by detached copies alone, was skipped, and the second
    derivative came back as that of the other terms (here ``leaf.sum()``'s ones, silently
    missing the gradient's own), on the eager path and the custom op's (whose gradient had no
    history at all). Now the op's message, on both."""
    if path == "custom op":
        for module in (kl, policy_loss, value_loss, ppo_fused, logprobs_mod):
            monkeypatch.setattr(module, "launch_directly", lambda *tensors: False)
    leaf = torch.randn(2, 6, device=DEVICE, requires_grad=True)
    if op == "logprobs":
        labels = torch.randint(0, 5, (2, 6), device=DEVICE)
        loss = rk.logprobs(leaf[..., None] * torch.linspace(-1, 1, 5, device=DEVICE),
                           labels).sum()
    else:
        loss = _loss_for_double_backward(op, leaf)
    (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
    penalty = grad.square().sum() + leaf.sum()
    with pytest.raises(RuntimeError, match=f"rlhf_kernels.*{op}.*not differentiable again"
                                           "|no autograd formula"):
        torch.autograd.grad(penalty, leaf, allow_unused=True)


@pytest.mark.parametrize("op", ["kl_penalty", "ppo_policy_loss", "ppo_value_loss",
                                "bradley_terry_loss", "ppo_loss_from_logits", "linear_ppo_loss"])
def test_loss_gradients_refuse_a_double_backward(op):
    """As the logprob ops: under create_graph=True the losses' and KL's eager gradients raise
    when differentiated. They once came back as constants (once_differentiable passes when the
    incoming gradient is a constant), so a second-order term through them was silently 0."""
    leaf = torch.randn(2, 6, device=DEVICE, requires_grad=True)
    (grad,) = torch.autograd.grad(_loss_for_double_backward(op, leaf), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match=f"rlhf_kernels.*{op}.*: its gradient is not "
                                           "differentiable again"):
        (grad.square().sum() + leaf.sum()).backward()
    (plain,) = torch.autograd.grad(_loss_for_double_backward(op, leaf), leaf)
    assert plain.shape == grad.shape and not plain.requires_grad


@pytest.mark.parametrize("op", ["kl_penalty", "ppo_policy_loss", "bradley_terry_loss"])
def test_an_input_edited_with_the_ops_output_is_freed_without_the_garbage_collector(op):
    """The eager Functions keep what their double-backward guard needs as a saved output, never
    as a reference to an input: an input edited in place with the op's output (its history then
    leads back to the op's node) would close a cycle through C++ autograd that no garbage
    collection frees. Here the graph and the input are freed as soon as the last reference
    goes, with the collector off."""
    import gc
    import weakref

    def run():
        leaf = torch.randn(2, 4, device=DEVICE, requires_grad=True)
        x = leaf * 1.0
        old = torch.randn(2, 4, device=DEVICE)
        if op == "kl_penalty":
            kl = rk.kl_penalty(x, old, backend="triton")
            x.add_(kl)
            loss = kl.sum()
        elif op == "ppo_policy_loss":
            loss, _ = rk.ppo_policy_loss(x, old, old, None, backend="triton")
            x.add_(loss)
        else:
            loss, _ = rk.bradley_terry_loss(x[:, 0], x[:, 1], backend="triton")
            x.add_(loss)
        loss.backward()
        return weakref.ref(x), weakref.ref(loss)

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        x, loss = run()
        assert x() is None and loss() is None
    finally:
        if was_enabled:
            gc.enable()
