"""Every public op compiles with torch.compile(fullgraph=True) and never syncs with the host.

For each op in ``rlhf_kernels.__all__``, on backend="reference" and on the Triton path (the
interpreter without a GPU):

* ``torch.compile(fn, fullgraph=True, backend="aot_eager")`` traces the call without a graph
  break, and its outputs and its (compiled) backward's gradients equal eager's;
* an eager call makes no host sync: no ``.item()`` / ``int()`` / ``float()`` / ``bool()`` of a
  tensor, no ``.tolist()``, no ``nonzero`` or other op whose output size depends on the data.
  On CUDA this is ``torch.cuda.set_sync_debug_mode("error")``; on the CPU a dispatch mode
  refuses the ops that would sync on a GPU, and the Python-level conversions are refused when
  called from rlhf_kernels code (the Triton interpreter itself converts freely).

Shapes are tiny: the file runs in seconds under the interpreter.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_kernels as rk
from tests.numerics import DEVICE, padded_mask

BACKENDS = ("reference", "triton")
B, T, V, H = 3, 5, 7, 4


# --------------------------------------------------------------------------------------------
# host-sync detection
# --------------------------------------------------------------------------------------------
# aten ops that copy a value to the host, or whose output shape depends on the data.
_SYNC_OPS = {
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal",
    "aten::nonzero", "aten::nonzero_static", "aten::masked_select", "aten::_unique",
    "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::repeat_interleave",
    "aten::bincount", "aten::histc", "aten::allclose",
}
_CONVERSIONS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")
_PACKAGE = os.path.dirname(rk.__file__)
_TRITON_MARK = os.sep + "triton" + os.sep


class HostSync(AssertionError):
    pass


def _called_from_our_code() -> bool:
    """Innermost frame that is ours or Triton's: ours (a sync we make) or Triton's (the
    interpreter moving data, which a GPU build does not do)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if _TRITON_MARK in name:
            return False
        if name.startswith(_PACKAGE):
            return True
        frame = frame.f_back
    return False


class _NoSyncOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in _SYNC_OPS:
            raise HostSync(f"{name} synchronises with the host")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync():
    if DEVICE.type == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return
    originals = {name: getattr(torch.Tensor, name) for name in _CONVERSIONS}

    def guard(name, original):
        def wrapper(self, *args, **kwargs):
            if _called_from_our_code():
                raise HostSync(f"Tensor.{name}() called from rlhf_kernels: a host sync")
            return original(self, *args, **kwargs)
        return wrapper

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, guard(name, original))
        with _NoSyncOps():
            yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_the_sync_detector_catches_a_sync():
    x = torch.ones(3, device=DEVICE)
    with pytest.raises(Exception, match="sync"):
        with no_host_sync():
            int(x.sum())
    with pytest.raises(Exception, match="sync"):
        with no_host_sync():
            x.nonzero()


# --------------------------------------------------------------------------------------------
# the ops
# --------------------------------------------------------------------------------------------
def _labels():
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    labels[0, -1] = -100
    return labels


def _rollout():
    logp = -torch.rand(B, T, device=DEVICE) * 2
    return {"old_logp": logp + 0.2 * torch.randn(B, T, device=DEVICE),
            "advantages": torch.randn(B, T, device=DEVICE), "ref_logp": logp,
            "mask": padded_mask(B, T)}


def _head():
    return {"hidden": torch.randn(B, T, H, device=DEVICE),
            "weight": torch.randn(V, H, device=DEVICE), "bias": torch.randn(V, device=DEVICE)}


def _per_token():
    logp = -torch.rand(B, T, device=DEVICE) * 2
    return {"logp": logp, "ref_logp": logp + 0.3 * torch.randn(B, T, device=DEVICE),
            "mask": padded_mask(B, T)}


FUSED = dict(kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)

# name -> (inputs(), fn(inputs, labels, backend) -> outputs, names that get a gradient)
CASES = {
    "logprobs": (
        lambda: {"logits": torch.randn(B, T, V, device=DEVICE)},
        lambda x, lab, b: rk.logprobs(x["logits"], lab, 0.9, backend=b),
        ("logits",)),
    "logprobs+entropy": (
        lambda: {"logits": torch.randn(B, T, V, device=DEVICE)},
        lambda x, lab, b: rk.logprobs(x["logits"], lab, return_entropy=True, backend=b),
        ("logits",)),
    "linear_logprobs": (
        _head,
        lambda x, lab, b: rk.linear_logprobs(x["hidden"], x["weight"], lab, x["bias"],
                                             return_entropy=True, backend=b),
        ("hidden", "weight", "bias")),
    "kl_penalty": (
        _per_token,
        lambda x, lab, b: rk.kl_penalty(x["logp"], x["ref_logp"], "k3", clamp=10.0, backend=b),
        ("logp", "ref_logp")),
    "shape_rewards": (
        lambda: dict(_per_token(), scores=torch.randn(B, device=DEVICE)),
        lambda x, lab, b: rk.shape_rewards(x["scores"], x["logp"], x["ref_logp"], x["mask"],
                                           0.1, "k3", backend=b),
        ()),
    "shape_rewards(score_index)": (
        lambda: dict(_per_token(), scores=torch.randn(B, device=DEVICE),
                     index=torch.randint(0, T, (B,), device=DEVICE)),
        lambda x, lab, b: rk.shape_rewards(x["scores"], x["logp"], x["ref_logp"], x["mask"],
                                           0.1, score_index=x["index"], score_clip=1.0,
                                           backend=b),
        ()),
    "gae": (
        lambda: {"rewards": torch.randn(B, T, device=DEVICE),
                 "values": torch.randn(B, T, device=DEVICE), "mask": padded_mask(B, T)},
        lambda x, lab, b: rk.gae(x["rewards"], x["values"], x["mask"], 0.9, 0.8, backend=b),
        ()),
    "group_advantages": (
        lambda: {"scores": torch.randn(2 * B, device=DEVICE)},
        lambda x, lab, b: rk.group_advantages(x["scores"], 2, estimator="rloo", norm="batch",
                                              backend=b),
        ()),
    "group_advantages(group_ids)": (
        lambda: {"scores": torch.randn(2 * B, device=DEVICE),
                 "ids": torch.tensor([5, -1, 5, 9, -1, 5], device=DEVICE)},
        lambda x, lab, b: rk.group_advantages(x["scores"], group_ids=x["ids"], backend=b),
        ()),
    "masked_whiten": (
        lambda: {"x": torch.randn(B, T, device=DEVICE), "mask": padded_mask(B, T)},
        lambda x, lab, b: rk.masked_whiten(x["x"], x["mask"], backend=b),
        ()),
    "ppo_policy_loss": (
        lambda: dict(_rollout(), logp=-torch.rand(B, T, device=DEVICE) * 2),
        lambda x, lab, b: rk.ppo_policy_loss(x["logp"], x["old_logp"], x["advantages"],
                                             x["mask"], dual_clip=3.0,
                                             reduction="seq-mean-token-mean", backend=b),
        ("logp",)),
    # GSPO with (B,) advantages, the KL term and a device normalizer (three passes per row)
    "ppo_policy_loss(sequence, kl, normalizer)": (
        lambda: dict(_rollout(), logp=-torch.rand(B, T, device=DEVICE) * 2,
                     advantages=torch.randn(B, device=DEVICE),
                     normalizer=torch.tensor(6.0, device=DEVICE)),
        lambda x, lab, b: rk.ppo_policy_loss(
            x["logp"], x["old_logp"], x["advantages"], x["mask"], dual_clip=3.0,
            reduction="token-sum", ratio_level="sequence", normalizer=x["normalizer"],
            ref_logp=x["ref_logp"], kl_coef=0.1, kl_estimator="k2", backend=b),
        ("logp",)),
    "ppo_policy_loss(cispo)": (
        lambda: dict(_rollout(), logp=-torch.rand(B, T, device=DEVICE) * 2),
        lambda x, lab, b: rk.ppo_policy_loss(x["logp"], x["old_logp"], x["advantages"],
                                             x["mask"], loss_type="cispo", normalizer=4.0,
                                             backend=b),
        ("logp",)),
    "ppo_value_loss": (
        lambda: {"values": torch.randn(B, T, device=DEVICE),
                 "old_values": torch.randn(B, T, device=DEVICE),
                 "returns": torch.randn(B, T, device=DEVICE), "mask": padded_mask(B, T)},
        lambda x, lab, b: rk.ppo_value_loss(x["values"], x["old_values"], x["returns"],
                                            x["mask"], backend=b),
        ("values",)),
    "bradley_terry_loss": (
        lambda: {"chosen": torch.randn(B, device=DEVICE),
                 "rejected": torch.randn(B, device=DEVICE),
                 "margin": torch.rand(B, device=DEVICE)},
        lambda x, lab, b: rk.bradley_terry_loss(x["chosen"], x["rejected"], x["margin"],
                                                center_coef=0.01, backend=b),
        ("chosen", "rejected")),
    "ppo_loss_from_logits": (
        lambda: dict(_rollout(), logits=torch.randn(B, T, V, device=DEVICE)),
        lambda x, lab, b: rk.ppo_loss_from_logits(x["logits"], lab, x["old_logp"],
                                                  x["advantages"], x["mask"], x["ref_logp"],
                                                  backend=b, **FUSED),
        ("logits",)),
    "linear_ppo_loss": (
        lambda: dict(_rollout(), **_head()),
        lambda x, lab, b: rk.linear_ppo_loss(x["hidden"], x["weight"], lab, x["old_logp"],
                                             x["advantages"], x["mask"], x["bias"],
                                             ref_logp=x["ref_logp"], backend=b, **FUSED),
        ("hidden", "weight", "bias")),
    # the critic-free options: (B,) advantages, a device normalizer, GSPO over several chunks
    # (the two-sweep path), CISPO
    "ppo_loss_from_logits(sequence, cispo)": (
        lambda: dict(_rollout(), logits=torch.randn(B, T, V, device=DEVICE),
                     advantages=torch.randn(B, device=DEVICE),
                     normalizer=torch.tensor(6.0, device=DEVICE)),
        lambda x, lab, b: rk.ppo_loss_from_logits(
            x["logits"], lab, x["old_logp"], x["advantages"], x["mask"], x["ref_logp"],
            kl_coef=0.1, kl_estimator="k2", ratio_level="sequence", loss_type="cispo",
            reduction="token-sum", normalizer=x["normalizer"], backend=b),
        ("logits",)),
    "linear_ppo_loss(sequence, two sweeps)": (
        lambda: dict(_rollout(), **_head(), advantages=torch.randn(B, device=DEVICE),
                     normalizer=torch.tensor(6.0, device=DEVICE)),
        lambda x, lab, b: rk.linear_ppo_loss(
            x["hidden"], x["weight"], lab, x["old_logp"], x["advantages"], x["mask"], x["bias"],
            ref_logp=x["ref_logp"], kl_coef=0.1, kl_estimator="abs", ratio_level="sequence",
            normalizer=x["normalizer"], chunk_size=4, backend=b),
        ("hidden", "weight", "bias")),
}


def test_every_public_op_is_covered():
    ops = set(rk.__all__) - {"resolve_backend"}
    covered = {name.split("(")[0].split("+")[0] for name in CASES}
    assert ops == covered, f"not covered: {sorted(ops - covered)}"


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return [t for item in out for t in _flat(item)]


def _run(fn, inputs, grad_names, labels, backend, upstream=None):
    leaves = {k: v.detach().clone().requires_grad_(k in grad_names) for k, v in inputs.items()}
    outs = _flat(fn(leaves, labels, backend))
    grads = []
    if grad_names:
        if upstream is None:
            upstream = [torch.randn_like(o) for o in outs]
        total = sum((o * u).sum() for o, u in zip(outs, upstream) if o.requires_grad)
        total.backward()
        grads = [leaves[k].grad for k in grad_names]
    return [o.detach() for o in outs], grads, upstream


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(CASES))
def test_compiles_fullgraph_and_matches_eager(op, backend):
    make, fn, grad_names = CASES[op]
    inputs, labels = make(), _labels()
    eager, eager_grads, upstream = _run(fn, inputs, grad_names, labels, backend)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    outs, grads, _ = _run(compiled, inputs, grad_names, labels, backend, upstream)

    assert len(outs) == len(eager)
    for i, (got, want) in enumerate(zip(outs, eager)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True,
                                   msg=lambda m, i=i: f"{op} [{backend}] output {i}: {m}")
    for name, got, want in zip(grad_names, grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6,
                                   msg=lambda m, n=name: f"{op} [{backend}] d {n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(CASES))
def test_eager_call_and_backward_make_no_host_sync(op, backend):
    make, fn, grad_names = CASES[op]
    inputs, labels = make(), _labels()
    _run(fn, inputs, grad_names, labels, backend)  # compile the kernels outside the check
    with no_host_sync():
        outs, grads, _ = _run(fn, inputs, grad_names, labels, backend)
    assert all(o.device.type == DEVICE.type for o in outs + grads)
