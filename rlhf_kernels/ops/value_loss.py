"""PLACEHOLDER: dispatches to the reference until the Triton kernel lands (helper-owned file)."""

from rlhf_kernels import reference

ppo_value_loss = reference.ppo_value_loss
