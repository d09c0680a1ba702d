"""``torch.library.opcheck`` on every ``rlhf_kernels::`` custom op.

torch.compile, export and torch.func see the ops only through their ``torch.library``
registrations: the schema (which inputs an op mutates), the fake impl (the output shapes,
dtypes and strides a trace works with), and the autograd formula. A mistake there is silent in
eager mode (the ops run their launchers directly there) and wrong under compile. opcheck checks
each of them against the real kernel: ``test_schema`` (mutations and aliasing match the
schema), ``test_autograd_registration`` (the autograd formula sits on the Autograd key),
``test_faketensor`` (the fake impl's outputs match the real ones in shape, dtype and strides)
and ``test_aot_dispatch_dynamic`` (AOTAutograd with dynamic shapes gives the eager outputs and
gradients).

The arguments are not written by hand: each case calls a public op with the custom-op path
forced (``launch_directly`` patched to False, as under torch.compile), forward and backward,
and records every ``rlhf_kernels::`` call it dispatches with its exact arguments; opcheck then
runs on each recorded call. So the checked calls are the ones the public API makes, backward
ops included, and a test below asserts that the cases reach every op the package registers
(enumerated from the dispatcher, so a new op cannot be forgotten).
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_kernels as rk
import rlhf_kernels.ops
from tests.numerics import DEVICE, padded_mask

NAMESPACE = "rlhf_kernels"
TEST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
              "test_aot_dispatch_dynamic")

# Every module of rlhf_kernels.ops imported, so every registration has run.
OP_MODULES = [importlib.import_module(f"rlhf_kernels.ops.{m.name}")
              for m in pkgutil.iter_modules(rlhf_kernels.ops.__path__)]


def registered_ops() -> set[str]:
    """Every ``rlhf_kernels::`` operator the dispatcher knows (e.g. 'rlhf_kernels::gae')."""
    return {name for name in torch._C._dispatch_get_all_op_names()
            if name.startswith(f"{NAMESPACE}::")}


# --------------------------------------------------------------------------------------------
# Tiny inputs (the Triton kernels run under the interpreter)
# --------------------------------------------------------------------------------------------
B, T, V, H, R = 2, 3, 11, 4, 2


def _inputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    labels[0, -1] = -100
    logp = -torch.rand(B, T, device=DEVICE) * 2
    return {
        "logits": torch.randn(B, T + 1, V, device=DEVICE).to(dtype), "labels": labels,
        "hidden": torch.randn(B, T, H, device=DEVICE).to(dtype),
        "weight": (torch.randn(V, H, device=DEVICE) * H ** -0.5).to(dtype),
        "bias": (0.1 * torch.randn(V, device=DEVICE)).to(dtype),
        "lora_a": (0.3 * torch.randn(R, H, device=DEVICE)).to(dtype),
        "lora_b": (0.3 * torch.randn(V, R, device=DEVICE)).to(dtype),
        "logp": logp.to(dtype),
        "old_logp": logp + 0.2 * torch.randn(B, T, device=DEVICE),
        "ref_logp": (logp + 0.3 * torch.randn(B, T, device=DEVICE)).to(dtype),
        "advantages": torch.randn(B, T, device=DEVICE), "mask": padded_mask(B, T),
        "values": torch.randn(B, T, device=DEVICE).to(dtype),
        "old_values": torch.randn(B, T, device=DEVICE),
        "returns": torch.randn(B, T, device=DEVICE), "scores": torch.randn(B, device=DEVICE),
        "group_scores": torch.randn(2 * B, device=DEVICE).to(dtype),
        "chosen": torch.randn(B, device=DEVICE).to(dtype),
        "rejected": torch.randn(B, device=DEVICE).to(dtype),
        "margin": torch.rand(B, device=DEVICE),
    }


def _rollout(x):
    return dict(old_logp=x["old_logp"], advantages=x["advantages"], mask=x["mask"])


# name -> (fn(inputs) -> outputs, names of the inputs that get a gradient)
CASES = {
    "logprobs": (lambda x: rk.logprobs(x["logits"][:, :-1, :], x["labels"], 0.8),
                 ("logits",)),
    "logprobs(entropy)": (lambda x: rk.logprobs(
        x["logits"][:, 1:, :], x["labels"], return_entropy=True), ("logits",)),
    "logprobs(inplace_backward)": (lambda x: rk.logprobs(
        x["logits"][:, :-1, :] * 1.0, x["labels"], return_entropy=True,
        inplace_backward=True), ("logits",)),
    "linear_logprobs(bias, lora, entropy)": (lambda x: rk.linear_logprobs(
        x["hidden"], x["weight"], x["labels"], x["bias"], x["lora_a"], x["lora_b"], 0.5,
        temperature=0.9, return_entropy=True, chunk_size=4),
        ("hidden", "weight", "bias", "lora_a", "lora_b")),
    "linear_logprobs(hidden only)": (lambda x: rk.linear_logprobs(
        x["hidden"], x["weight"], x["labels"]), ("hidden",)),
    "ppo_loss_from_logits": (lambda x: rk.ppo_loss_from_logits(
        x["logits"][:, :-1, :], x["labels"], **_rollout(x)), ("logits",)),
    "ppo_loss_from_logits(kl, entropy, dual clip)": (lambda x: rk.ppo_loss_from_logits(
        x["logits"][:, :-1, :], x["labels"], **_rollout(x), ref_logp=x["ref_logp"],
        kl_coef=0.1, entropy_coef=0.01, temperature=0.7, dual_clip=3.0), ("logits",)),
    "ppo_loss_from_logits(sequence ratio)": (lambda x: rk.ppo_loss_from_logits(
        x["logits"][:, :-1, :], x["labels"], **_rollout(x), ratio_level="sequence",
        reduction="seq-mean-token-mean"), ("logits",)),
    "linear_ppo_loss": (lambda x: rk.linear_ppo_loss(
        x["hidden"], x["weight"], x["labels"], **_rollout(x)), ("hidden", "weight")),
    "linear_ppo_loss(kl, entropy, lora, cispo)": (lambda x: rk.linear_ppo_loss(
        x["hidden"], x["weight"], x["labels"], **_rollout(x), bias=x["bias"],
        lora_a=x["lora_a"], lora_b=x["lora_b"], lora_scale=2.0, ref_logp=x["ref_logp"],
        kl_coef=0.1, entropy_coef=0.01, loss_type="cispo", clip_high=0.3, chunk_size=4),
        ("hidden", "weight", "bias", "lora_a", "lora_b")),
    "linear_ppo_loss(sequence ratio)": (lambda x: rk.linear_ppo_loss(
        x["hidden"], x["weight"], x["labels"], **_rollout(x), ratio_level="sequence",
        normalizer=5.0), ("hidden",)),
    "ppo_policy_loss": (lambda x: rk.ppo_policy_loss(
        x["logp"], x["old_logp"], x["advantages"], x["mask"]), ("logp",)),
    "ppo_policy_loss(kl, dual clip, seq-mean)": (lambda x: rk.ppo_policy_loss(
        x["logp"], x["old_logp"], x["advantages"], x["mask"], dual_clip=3.0,
        reduction="seq-mean-token-mean", ref_logp=x["ref_logp"], kl_coef=0.1), ("logp",)),
    "ppo_policy_loss(sequence ratio, tensor normalizer)": (lambda x: rk.ppo_policy_loss(
        x["logp"], x["old_logp"], x["advantages"], x["mask"], ratio_level="sequence",
        normalizer=torch.tensor(4.0, device=DEVICE)), ("logp",)),
    "ppo_value_loss": (lambda x: rk.ppo_value_loss(
        x["values"], x["old_values"], x["returns"], x["mask"]), ("values",)),
    "ppo_value_loss(no clip, token-sum)": (lambda x: rk.ppo_value_loss(
        x["values"], x["old_values"], x["returns"], None, clip=None, reduction="token-sum"),
        ("values",)),
    "bradley_terry_loss(margin tensor)": (lambda x: rk.bradley_terry_loss(
        x["chosen"], x["rejected"], x["margin"], center_coef=0.01), ("chosen", "rejected")),
    "bradley_terry_loss(float margin)": (lambda x: rk.bradley_terry_loss(
        x["chosen"], x["rejected"], 0.5), ("chosen",)),
    "kl_penalty(k3, clamp)": (lambda x: rk.kl_penalty(
        x["logp"], x["ref_logp"], "k3", clamp=1.0), ("logp", "ref_logp")),
    "kl_penalty(k2, log-ratio clamp)": (lambda x: rk.kl_penalty(
        x["logp"], x["ref_logp"], "k2", log_ratio_clamp=5.0), ("logp",)),
    "kl_penalty(transposed, expanded)": (lambda x: rk.kl_penalty(
        x["logp"].t(), x["ref_logp"][:1].expand(B, T).t(), "k1"), ("logp", "ref_logp")),
    "ppo_policy_loss(transposed)": (lambda x: rk.ppo_policy_loss(
        x["logp"].t(), x["old_logp"].t(), x["advantages"].t(), x["mask"].t()), ("logp",)),
    "ppo_value_loss(transposed)": (lambda x: rk.ppo_value_loss(
        x["values"].t(), x["old_values"].t(), x["returns"].t()), ("values",)),
    "gae(transposed)": (lambda x: rk.gae(x["advantages"].t(), x["values"].t(), None), ()),
    "masked_whiten(transposed)": (lambda x: rk.masked_whiten(x["advantages"].t(),
                                                             x["mask"].t()), ()),
    "shape_rewards(transposed)": (lambda x: rk.shape_rewards(
        x["scores"], x["logp"].t().t(), x["ref_logp"], x["mask"], 0.1), ()),
    "gae": (lambda x: rk.gae(x["advantages"], x["values"], x["mask"], 0.9, 0.8), ()),
    "masked_whiten": (lambda x: rk.masked_whiten(x["advantages"], x["mask"]), ()),
    "masked_whiten(no mask, keep mean)": (lambda x: rk.masked_whiten(
        x["values"], shift_mean=False, unbiased=False), ()),
    "shape_rewards": (lambda x: rk.shape_rewards(
        x["scores"], x["logp"], x["ref_logp"], x["mask"], 0.1, "k3", score_clip=1.0), ()),
    "group_advantages(grpo)": (lambda x: rk.group_advantages(x["group_scores"], 2), ()),
    "group_advantages(rloo, ids)": (lambda x: rk.group_advantages(
        x["group_scores"], group_ids=torch.tensor([0, 1, 0, 1], device=DEVICE),
        estimator="rloo"), ()),
}

def _params():
    """Every case in fp32; the first case of each public op also in bf16 (the fake impls derive
    output dtypes from the inputs'); the vocabulary ops also in fp64 (their outputs follow fp64
    logits / matmuls). Not every case in every dtype: the file stays within seconds."""
    params, seen = [], set()
    for case in CASES:
        params.append((case, torch.float32))
        op = case.split("(")[0]
        if op not in seen:
            seen.add(op)
            params.append((case, torch.bfloat16))
            if op in ("logprobs", "linear_logprobs", "ppo_loss_from_logits", "linear_ppo_loss"):
                params.append((case, torch.float64))
    return params


# --------------------------------------------------------------------------------------------
# Recording the custom-op calls of a public call
# --------------------------------------------------------------------------------------------
def _copy(t):
    """A copy of ``t`` with the same shape, strides, dtype and requires_grad (a sliced or
    expanded view stays a strided view of a fresh buffer holding the memory it spans)."""
    if not isinstance(t, torch.Tensor):
        return t
    with torch.no_grad():
        if t.numel() == 0:
            out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        else:
            extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
            span = t.detach().as_strided((extent,), (1,), t.storage_offset())
            out = span.clone().as_strided(t.shape, t.stride())
    if t.requires_grad:
        out.requires_grad_(True)
    return out


def _copy_without_grad(t):
    return _copy(t.detach()) if isinstance(t, torch.Tensor) else t


class _RecordCalls(TorchDispatchMode):
    """Records (op overload, copied args, copied kwargs) of every rlhf_kernels:: call.

    The calls made while ``backward`` is set (the backward ops) are recorded without
    requires_grad: they run under a plain backward, where grad mode is off, and they have no
    autograd formula by design (a gradient is not differentiated again: create_graph raises,
    tests/kernels/test_eager_fast_path.py), so opcheck's gradient check has nothing to compare.
    """

    def __init__(self):
        super().__init__()
        self.calls = []
        self.backward = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == NAMESPACE:
            copy = _copy_without_grad if self.backward else _copy
            self.calls.append((func, pytree.tree_map(copy, args), pytree.tree_map(copy, kwargs)))
        return func(*args, **kwargs)


def _record(case: str, dtype: torch.dtype, monkeypatch) -> list:
    fn, grad_names = CASES[case]
    for module in OP_MODULES:
        if hasattr(module, "launch_directly"):
            monkeypatch.setattr(module, "launch_directly", lambda *tensors: False)
    inputs = {k: v.detach().clone().requires_grad_(k in grad_names)
              for k, v in _inputs(dtype).items()}
    with _RecordCalls() as recorder:
        out = fn(inputs)
        outs = [t for t in pytree.tree_leaves(out)
                if isinstance(t, torch.Tensor) and t.requires_grad]
        if grad_names:
            assert outs, f"{case}: no output requires grad"
            recorder.backward = True
            torch.autograd.grad(outs, [inputs[k] for k in grad_names],
                                [torch.randn_like(o) for o in outs])
    return recorder.calls


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,dtype", _params(), ids=str)
def test_opcheck(case, dtype, monkeypatch):
    calls = _record(case, dtype, monkeypatch)
    assert calls, f"{case}: the forced custom-op path dispatched no {NAMESPACE}:: op"
    for func, args, kwargs in calls:
        torch.library.opcheck(func, args, kwargs, test_utils=TEST_UTILS)


def test_the_cases_reach_every_registered_op(monkeypatch):
    ops = registered_ops()
    # The public API's ops (one per public function at least) are registered.
    assert len(ops) >= len([n for n in rk.__all__ if n != "resolve_backend"]), sorted(ops)
    reached = set()
    for case in CASES:
        reached |= {func.name() for func, _, _ in _record(case, torch.float32, monkeypatch)}
    missing = ops - reached
    assert not missing, f"no opcheck case calls {sorted(missing)}: add one to CASES"
