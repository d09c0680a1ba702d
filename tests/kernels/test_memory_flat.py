"""The memory claim of the fused lm_head ops: no (N, V) tensor, ever.

A TorchDispatchMode sees every tensor that PyTorch creates while linear_logprobs and
linear_ppo_loss run forward and backward — including inside their custom ops, whose Python
implementations are re-run under the mode (a custom op is otherwise opaque to it) — and records
the largest storage. It must stay within chunk_size x V elements while N x V is 16x that bound.

Storage is counted in bytes against the bytes of one fp32 chunk (everything here is fp32 or
smaller): the Triton interpreter looks at tensors through uint8 views of their storage, which
would otherwise count 4 "elements" per float.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf_kernels import reference
from rlhf_kernels.ops import linear_logprobs as head
from rlhf_kernels.ops import ppo_fused
from tests.numerics import DEVICE

# custom op -> its Python implementation (same arguments), so that the mode sees inside it
_IMPLEMENTATIONS = {
    torch.ops.rlhf_kernels.linear_logprobs_fwd.default: head._forward_sweep,
    torch.ops.rlhf_kernels.linear_logprobs_bwd.default:
        lambda *a: head._backward_sweep(*a[:15], a[15:]),
    torch.ops.rlhf_kernels.linear_ppo_loss.default:
        lambda *a: ppo_fused._linear_sweep(*a[:22], a[22:27], *a[27:]),
}


class LargestTensor(TorchDispatchMode):
    """Records the largest storage (in bytes) of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops_seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops_seen.add(str(func))
        if func in _IMPLEMENTATIONS:
            with self:  # the mode is popped while we are in here: push it back for the inside
                out = _IMPLEMENTATIONS[func](*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


B, T, H, V, RANK, CHUNK = 2, 32, 4, 500, 2, 4
BOUND = CHUNK * V  # elements
BOUND_BYTES = BOUND * 4  # fp32


def _inputs():
    hidden = torch.randn(B, T, H, device=DEVICE, requires_grad=True)
    weight = (torch.randn(V, H, device=DEVICE) * H ** -0.5).requires_grad_()
    bias = torch.randn(V, device=DEVICE, requires_grad=True)
    lora_a = (torch.randn(RANK, H, device=DEVICE) * H ** -0.5).requires_grad_()
    lora_b = torch.randn(V, RANK, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    labels[:, -3:] = -100
    return hidden, weight, bias, lora_a, lora_b, labels


def test_setting_is_meaningful():
    # N x V is at least 16x the bound, and the other tensors (hidden, weight) fit under it, so
    # only a vocabulary-sized activation could break it.
    assert B * T * V >= 16 * BOUND
    assert B * T * H <= BOUND and V * H <= BOUND


def test_linear_logprobs_forward_backward_stays_within_one_chunk():
    hidden, weight, bias, lora_a, lora_b, labels = _inputs()
    with LargestTensor() as mode:
        logp, entropy = head.linear_logprobs(hidden, weight, labels, bias, lora_a, lora_b, 0.5,
                                             0.9, return_entropy=True, chunk_size=CHUNK,
                                             backend="triton")
    # The backward on its own (eager mode runs it directly, not through the backward op).
    with LargestTensor() as backward_mode:
        (logp.sum() + 0.1 * entropy.sum()).backward()
    assert all(t.grad is not None for t in (hidden, weight, bias, lora_a, lora_b))
    for m in (mode, backward_mode):
        assert m.largest <= BOUND_BYTES, f"a tensor of {m.largest} bytes > {BOUND_BYTES}"
        # the mode does see inside the op: the chunk of logits itself is the largest tensor
        assert m.largest == BOUND_BYTES


def test_linear_ppo_loss_forward_backward_stays_within_one_chunk():
    hidden, weight, bias, lora_a, lora_b, labels = _inputs()
    old_logp = torch.randn(B, T, device=DEVICE) - 6
    advantages = torch.randn(B, T, device=DEVICE)
    ref_logp = old_logp + 0.1
    with LargestTensor() as mode:
        loss, _ = ppo_fused.linear_ppo_loss(
            hidden, weight, labels, old_logp, advantages, None, bias, lora_a, lora_b, 0.5,
            ref_logp, kl_coef=0.1, entropy_coef=0.01, chunk_size=CHUNK, backend="triton")
        loss.backward()
    assert all(t.grad is not None for t in (hidden, weight, bias, lora_a, lora_b))
    assert mode.largest <= BOUND_BYTES, f"a tensor of {mode.largest} bytes > {BOUND_BYTES}"
    assert mode.largest == BOUND_BYTES


def test_the_unfused_path_would_break_the_bound():
    """The recorder is able to fail: the reference materialises (N, V) logits."""
    hidden, weight, bias, lora_a, lora_b, labels = _inputs()
    with LargestTensor() as mode:
        reference.linear_logprobs(hidden, weight, labels, bias).sum().backward()
    assert mode.largest >= B * T * V * 4
