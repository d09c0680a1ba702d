"""Which implementation an op runs: the Triton kernel or the plain-PyTorch reference.

Order of precedence:
1. the ``backend=`` argument of the op call ("triton", "reference" or "auto");
2. the environment variable ``RLHF_KERNELS_BACKEND`` (same values), read at call time;
3. "auto": Triton for CUDA tensors; for CPU tensors Triton only when the Triton interpreter is on
   (``TRITON_INTERPRET=1`` when rlhf_kernels is imported, how the test suite runs the kernels
   without a GPU), else the reference.

Nothing here touches a GPU or imports Triton: importing the package is free on a CPU machine.
"""

from __future__ import annotations

import os

import torch

__all__ = ["BACKENDS", "launch_directly", "resolve_backend", "triton_interpreter_enabled"]

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "RLHF_KERNELS_BACKEND"


# Read once, at import: Triton decides interpreter or compiled mode when the kernels are
# defined (when rlhf_kernels is imported), so a later change could not take effect anyway.
_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_interpreter_enabled() -> bool:
    """Whether the Triton interpreter was on (TRITON_INTERPRET) when rlhf_kernels was imported."""
    return _INTERPRETER


def resolve_backend(tensor: torch.Tensor, backend: str | None = None) -> str:
    """Return "triton" or "reference" for an op whose main input is ``tensor``."""
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    choice = choice.lower()
    if choice not in BACKENDS:
        source = "backend=" if backend is not None else f"{ENV_VAR}="
        raise ValueError(f"{source}{choice!r} is not a backend; expected one of {BACKENDS}")
    if choice == "reference":
        return "reference"
    on_cuda = tensor.is_cuda
    if choice == "triton":
        if not on_cuda and not triton_interpreter_enabled():
            raise ValueError(
                f"backend 'triton' was requested for a tensor on {tensor.device}; Triton kernels "
                "run on CUDA tensors, or on CPU tensors under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before importing rlhf_kernels)"
            )
        return "triton"
    return "triton" if on_cuda or triton_interpreter_enabled() else "reference"


# Tensor types the Triton launchers take as they are; anything else (FakeTensor, functional or
# other wrapper subclasses) goes through the op's torch.library custom op.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def launch_directly(*tensors: torch.Tensor | None) -> bool:
    """Whether an op may run its launcher as plain Python instead of its custom op.

    The custom ops (``torch.library.custom_op`` with a fake impl and registered autograd) are
    what torch.compile, torch.export and torch.func see. In plain eager mode they only add host
    time (tens of microseconds per call and as much again in the backward), so the ops call the
    same launcher directly there, under a ``torch.autograd.Function`` when a gradient is needed:
    not while compiling or exporting, not under torch.func transforms, and only for plain
    tensors (``None`` entries are skipped).
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    for tensor in tensors:
        if tensor is not None and type(tensor) not in _PLAIN:
            return False
    return True
