"""PLACEHOLDER: dispatches to the reference until the Triton kernel lands (helper-owned file)."""

from rlhf_kernels import reference

bradley_terry_loss = reference.bradley_terry_loss
