"""PLACEHOLDER: dispatches to the reference until the Triton kernel lands (helper-owned file)."""

from rlhf_kernels import reference

ppo_policy_loss = reference.ppo_policy_loss
