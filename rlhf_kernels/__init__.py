"""rlhf_kernels: fused Triton kernels for RLHF, each with a plain-PyTorch reference.

Every op takes plain tensors, works for any leading shape, computes in fp32 and returns fp32
per-token quantities. See docs/design.md §1 for the math; ``rlhf_kernels.reference`` is the spec.
Importing this package touches no GPU and compiles nothing.
"""

from rlhf_kernels.backend import resolve_backend
from rlhf_kernels.ops.advantages import group_advantages
from rlhf_kernels.ops.bradley_terry import bradley_terry_loss
from rlhf_kernels.ops.gae import gae
from rlhf_kernels.ops.kl import kl_penalty
from rlhf_kernels.ops.linear_logprobs import linear_logprobs
from rlhf_kernels.ops.logprobs import logprobs
from rlhf_kernels.ops.policy_loss import ppo_policy_loss
from rlhf_kernels.ops.ppo_fused import linear_ppo_loss, ppo_loss_from_logits
from rlhf_kernels.ops.rewards import shape_rewards
from rlhf_kernels.ops.value_loss import ppo_value_loss
from rlhf_kernels.ops.whiten import masked_whiten

__version__ = "0.1.0"

__all__ = [
    "bradley_terry_loss",
    "gae",
    "group_advantages",
    "kl_penalty",
    "linear_logprobs",
    "linear_ppo_loss",
    "logprobs",
    "masked_whiten",
    "ppo_loss_from_logits",
    "ppo_policy_loss",
    "ppo_value_loss",
    "resolve_backend",
    "shape_rewards",
]
