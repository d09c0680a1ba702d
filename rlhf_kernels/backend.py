"""Which implementation an op runs: the Triton kernel, the native CPU kernel or the reference.

Order of precedence:
1. the ``backend=`` argument of the op call ("triton", "native", "reference" or "auto");
2. the environment variable ``RLHF_KERNELS_BACKEND`` (same values), read at call time;
3. "auto": Triton for CUDA tensors; for CPU tensors Triton when the Triton interpreter is on
   (``TRITON_INTERPRET=1`` when rlhf_kernels is imported, how the test suite runs the kernels
   without a GPU), else the native C++ kernels (``csrc/cpu``, built on first use) for the ops
   that have one, and the plain-PyTorch reference for the others, or for every op, with one
   warning saying why, when the native kernels cannot be built.

"native" runs on CPU tensors only. The ops whose launchers have a native kernel are
``NATIVE_OPS``; asking "native" of another op runs its reference with a one-time warning.
"auto" leaves ``linear_logprobs`` / ``linear_ppo_loss`` with bf16 / fp16 inputs on the reference
on CPUs without bf16 matrix instructions (their chunk matmuls would hit torch's slow half
GEMM); ``native`` still runs them there.
Under a ``torch.func`` transform that differentiates (``grad``, ``jacrev``, ``vjp``, ``jvp``,
``jacfwd``, ``hessian``) every op runs its reference, with one warning: the custom ops' autograd
(and the eager autograd Functions) cannot run there, torch's plain ops can. An explicit
``backend="triton"`` / ``"native"`` there is an error. ``vmap`` alone keeps the kernels.
Under the Triton interpreter the launchers pick the native kernels for CPU tensors only when
``RLHF_KERNELS_BACKEND=native`` is set (it is read at each launch, the backward's included), so
a per-call ``backend=`` that disagrees with it there is refused rather than half applied.

Nothing here touches a GPU, imports Triton or builds anything: importing the package is free
on a CPU machine; the native kernels are built the first time a CPU op resolves to them.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

from rlhf_kernels import _native

__all__ = ["BACKENDS", "NATIVE_OPS", "differentiating_transform_active", "direct_apply",
           "launch_directly", "native_cpu_kernels", "resolve_backend",
           "triton_interpreter_enabled"]

BACKENDS = ("auto", "triton", "native", "reference")
ENV_VAR = "RLHF_KERNELS_BACKEND"
# Ops whose CPU launchers run a native kernel (csrc/cpu): the logprobs kernels serve the four
# vocabulary ops (the fused ones call them per chunk), the scan serves gae, elementwise.cpp the
# KL estimators, reward shaping and whitening, losses.cpp the (B, T) losses and the group
# advantages: every public op.
NATIVE_OPS = frozenset({"logprobs", "linear_logprobs", "ppo_loss_from_logits",
                        "linear_ppo_loss", "gae", "kl_penalty", "shape_rewards",
                        "masked_whiten", "ppo_policy_loss", "ppo_value_loss",
                        "bradley_terry_loss", "group_advantages"})
_WARNED: set[str] = set()
# The fused-head ops run their chunk matmuls in the inputs' dtype. torch's bf16 / fp16 GEMM on a
# CPU without bf16 matrix instructions is a slow fallback (a 192 x 896 x 151936 bf16 chunk:
# 8.5 s against 1.75 s in fp32 on the AVX2 development machine), where the reference's fp32
# matmuls use MKL: "auto" keeps those ops on the reference there (fp32 inputs take the native
# path). Read once at import (a CPU feature query, nothing is built).
_HEAD_OPS = frozenset({"linear_logprobs", "linear_ppo_loss"})
_HALF = (torch.bfloat16, torch.float16)
try:
    _FAST_HALF_GEMM = bool(torch.cpu._is_avx512_bf16_supported()
                           or torch.cpu._is_amx_tile_supported())
except AttributeError:  # a torch without the queries: assume the slow fallback
    _FAST_HALF_GEMM = False


# Read once, at import: Triton decides interpreter or compiled mode when the kernels are
# defined (when rlhf_kernels is imported), so a later change could not take effect anyway.
_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_interpreter_enabled() -> bool:
    """Whether the Triton interpreter was on (TRITON_INTERPRET) when rlhf_kernels was imported."""
    return _INTERPRETER


def _env_choice() -> str:
    return os.environ.get(ENV_VAR, "auto").lower()


def native_cpu_kernels(tensor: torch.Tensor) -> bool:
    """For a launcher: whether ``tensor`` (an op's main input) runs the native kernel rather
    than the Triton one. Only reached once ``resolve_backend`` chose a kernel backend."""
    if tensor.is_cuda:
        return False
    return not _INTERPRETER or _env_choice() == "native"


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _native_or_reference(op: str, explicit: bool) -> str:
    if _native.available():
        return "native"
    reason = _native.failure_reason()
    if explicit:
        raise RuntimeError(
            f"backend 'native' was requested for rlhf_kernels.{op} but the native CPU kernels "
            f"are not available: {reason}. Use backend 'reference' (or 'auto') instead"
        )
    _warn_once("build", f"rlhf_kernels: the native CPU kernels are not available ({reason}); "
                        "CPU ops run the plain-PyTorch reference instead (set "
                        f"{ENV_VAR}=reference to choose it explicitly)")
    return "reference"


def differentiating_transform_active() -> bool:
    """Whether a torch.func transform that differentiates (grad / vjp / jacrev: Grad; jvp /
    jacfwd: Jvp) is running. torch.library custom ops run their registered autograd through an
    autograd.Function without ``setup_context``, which such a transform refuses ("must override
    the setup_context staticmethod"), and have no forward-mode rule; the reference's plain torch
    ops have both."""
    if not torch._C._are_functorch_transforms_active():
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    differentiating = (TransformType.Grad, TransformType.Jvp)
    return any(i.key() in differentiating for i in retrieve_all_functorch_interpreters())


def resolve_backend(tensor: torch.Tensor, backend: str | None = None,
                    op: str | None = None) -> str:
    """Return "triton", "native" or "reference" for an op whose main input is ``tensor``.

    op: the op's public name; None reads it off the caller (the public function).
    """
    env = _env_choice()
    choice = backend.lower() if backend is not None else env
    if choice not in BACKENDS:
        source = "backend=" if backend is not None else f"{ENV_VAR}="
        raise ValueError(f"{source}{choice!r} is not a backend; expected one of {BACKENDS}")
    if choice == "reference":
        return "reference"
    if differentiating_transform_active():
        op = op or sys._getframe(1).f_code.co_name
        if backend is not None and choice != "auto":
            raise ValueError(
                f"backend={choice!r} for rlhf_kernels.{op} under a torch.func transform that "
                "differentiates (grad, vjp, jacrev, jvp, jacfwd): the kernels' autograd cannot "
                "run there; pass backend='reference' (or 'auto', which picks it there)"
            )
        _warn_once("functorch", "rlhf_kernels: under torch.func.grad / vjp / jacrev / jvp / "
                                "jacfwd the ops run their plain-PyTorch reference (the kernels' "
                                "autograd cannot run inside those transforms)")
        return "reference"
    on_cuda = tensor.is_cuda
    on_cpu = not on_cuda and tensor.device.type == "cpu"
    if _INTERPRETER and on_cpu and backend is not None and choice in ("native", "triton") and (
            (choice == "native") != (env == "native")):
        raise ValueError(
            f"backend={choice!r} for a CPU tensor under the Triton interpreter "
            f"(TRITON_INTERPRET=1) while {ENV_VAR}={env!r}: there the CPU launchers follow "
            f"{ENV_VAR} (read at each launch, the backward's included); set {ENV_VAR}="
            f"{choice} instead of the per-call argument"
        )
    if choice == "triton":
        if not on_cuda and not triton_interpreter_enabled():
            raise ValueError(
                f"backend 'triton' was requested for a tensor on {tensor.device}; Triton kernels "
                "run on CUDA tensors, or on CPU tensors under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before importing rlhf_kernels)"
            )
        return "triton"
    if choice == "native":
        if not on_cpu:
            raise ValueError(
                f"backend 'native' was requested for a tensor on {tensor.device}; the native "
                "kernels run on CPU tensors (use 'triton' or 'auto' on a GPU)"
            )
        if op not in NATIVE_OPS:
            op = op or sys._getframe(1).f_code.co_name
            _warn_once(op, f"rlhf_kernels.{op} has no native CPU kernel yet; it runs the "
                           "plain-PyTorch reference")
            return "reference"
        return _native_or_reference(op, explicit=True)
    # auto
    if on_cuda or (on_cpu and _INTERPRETER):
        return "triton"
    if not on_cpu or op not in NATIVE_OPS:
        return "reference"
    if op in _HEAD_OPS and tensor.dtype in _HALF and not _FAST_HALF_GEMM:
        return "reference"
    return _native_or_reference(op, explicit=False)


# Tensor types the Triton launchers take as they are; anything else (FakeTensor, functional or
# other wrapper subclasses) goes through the op's torch.library custom op.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def launch_directly(*tensors: torch.Tensor | None) -> bool:
    """Whether an op may run its launcher as plain Python instead of its custom op.

    The custom ops (``torch.library.custom_op`` with a fake impl and registered autograd) are
    what torch.compile, torch.export and torch.func.vmap see (a differentiating torch.func
    transform runs the reference: ``resolve_backend``). In plain eager mode they only add host
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


def direct_apply(function: type[torch.autograd.Function]):
    """``function.apply`` for the eager path (``launch_directly``): autograd's native apply,
    without ``torch.autograd.Function.apply``'s Python layer.

    That layer binds default arguments for a Function with ``setup_context``, dispatches to an
    active torch.func transform, and unwraps tensors that escaped a finished transform (its
    "dead wrappers"). The ops' eager Functions define no ``setup_context`` and run only where
    ``launch_directly`` holds (no transform active), so for them the layer costs host time
    (about 5 us per call here) and unwraps only tensors leaked out of a torch.func function,
    which torch documents as unsupported: such a tensor now stops the op with torch's
    "Cannot access storage of TensorWrapper" error. Refused for a Function that defines
    ``setup_context``."""
    if function.setup_context is not torch.autograd.Function.setup_context:
        raise TypeError(f"{function.__name__} defines setup_context: use its .apply")
    return super(torch.autograd.Function, function).apply
