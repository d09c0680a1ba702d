"""Cached Triton launches for the microsecond ops: Triton's launch without its per-call binding.

``kernel[grid](*args)`` runs ``JITFunction.run`` on every call: it reads several knobs, binds
and specialises every argument (dtype, 16-byte alignment of pointers, ints equal to 1 or
divisible by 16, 32- or 64-bit), builds the cache key, checks the kernel's globals, and only
then calls the compiled kernel's launcher. That is about 8-9 us of host time per launch on the
development machine (benchmarks/host_overhead.py), as much as a small op's whole eager formula.

``CachedLaunch(globals(), "kernel_name")(grid, *args, num_warps=w)`` makes the first launch of
each specialisation through ``fn[grid]`` (compiling as usual) and keeps the ``CompiledKernel``
it returns under a key that holds what Triton specialises on: per tensor its dtype and whether
its pointer is 16-byte aligned, per int whether it is 1, divisible by 16 and 32-bit, per
constexpr its value, the type of any other argument, ``num_warps`` and the current device. A
later launch with the same key calls that kernel's launcher directly, with the arguments Triton
itself would pass. The kernel's parameters are given as to ``fn[grid]``: positionally, then the
rest by name (constexprs included; no defaults), plus ``num_warps``.

Falls back to ``fn[grid](...)`` (the same result, Triton's host time) when:

* the Triton interpreter is on (``fn`` is not a compiled-mode ``JITFunction``);
* Triton's ``JITFunction.run`` does not pass ``*bound_args.values()`` to ``kernel.run`` as the
  versions this was written against do (checked once, on the source: another calling convention
  is never guessed);
* a launch hook is set (``knobs.runtime.launch_enter_hook`` / ``launch_exit_hook`` with a call
  in its chain, e.g. a profiler's), or the first
  launch did not return a ``CompiledKernel`` (asynchronous compilation);
* ``RLHF_KERNELS_CACHED_LAUNCH=0`` was set when rlhf_kernels was imported (every launch through
  Triton: a switch for ruling this path out when a kernel misbehaves on a new Triton).

Every launch through Triton asks for floating-point contraction (``enable_fp_fusion=True``,
``COMPILE_OPTIONS``): the kernels were written, checked and measured with FMA contraction, which
Triton 3.9 applies by default with a warning that 3.10 will turn it off. Asking for it keeps
the kernels' arithmetic (and their instruction counts) whatever the Triton version's default,
and the warning away; ``TRITON_FORCE_DISABLE_FP_FUSION=1`` still turns it off.
"""

from __future__ import annotations

import inspect
import os

import torch

__all__ = ["COMPILE_OPTIONS", "CachedLaunch"]

# compile options of every launch (module docstring)
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def _convention_ok() -> bool:
    try:
        from triton.runtime.jit import JITFunction

        source = inspect.getsource(JITFunction.run)
    except (ImportError, OSError, TypeError):
        return False
    return ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata,"
            " launch_metadata" in " ".join(source.split())
            and "*bound_args.values())" in source)


_ENABLED = os.environ.get("RLHF_KERNELS_CACHED_LAUNCH", "1").strip().lower() not in (
    "0", "false", "off", "no")
_CONVENTION_OK = None  # decided on the first launch (importing Triton's source costs time)
_TRITON: dict = {}  # triton.knobs.runtime and triton.runtime.driver, imported on first use


def _hooked(hook) -> bool:
    """Whether a launch hook would do anything: Triton 3.9 keeps them as ``HookChain`` objects
    (never None; a list of calls, empty unless a profiler added one), older versions as None or
    a function. With none, passing None for both (and no launch metadata) is equivalent."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return calls is None or len(calls) > 0


def _arg_key(arg):
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() & 15 == 0
    if type(arg) is int:
        return arg == 1, arg & 15 == 0, -0x80000000 <= arg < 0x80000000
    return type(arg)  # float, bool, None: Triton does not specialise on their value


class CachedLaunch:
    """A launcher for one ``@triton.jit`` kernel (see the module docstring)."""

    def __init__(self, namespace: dict, name: str):
        # The kernel is looked up by name at each call (one dict lookup), so that replacing the
        # module's kernel (a test's monkeypatch, a trap) takes effect; a new kernel resets.
        self._namespace, self._name = namespace, name
        self.fn = None
        self._reset()

    def _reset(self) -> None:
        self._cache: dict = {}
        self._constexpr: tuple[bool, ...] | None = None  # set once the fast path is known good
        self._checked = False

    def _prepare(self) -> bool:
        global _CONVENTION_OK
        from triton.runtime.jit import JITFunction

        self._checked = True
        if not isinstance(self.fn, JITFunction):  # the interpreter's InterpretedFunction
            return False
        if not _ENABLED:
            return False
        if _CONVENTION_OK is None:
            _CONVENTION_OK = _convention_ok()
        if _CONVENTION_OK:
            if not _TRITON:
                from triton import knobs
                from triton.runtime import driver

                _TRITON.update(runtime=knobs.runtime, driver=driver)
            self._constexpr = tuple(p.is_constexpr for p in self.fn.params)
            self._names = tuple(p.name for p in self.fn.params)
        return _CONVENTION_OK

    def __call__(self, grid: tuple, *args, num_warps: int = 4, **named) -> None:
        fn = self._namespace[self._name]
        if fn is not self.fn:
            self.fn = fn
            self._reset()
        if self._constexpr is None and (self._checked or not self._prepare()):
            self.fn[grid](*args, num_warps=num_warps, **named, **COMPILE_OPTIONS)
            return
        runtime = _TRITON["runtime"]
        if _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook):
            self.fn[grid](*args, num_warps=num_warps, **named, **COMPILE_OPTIONS)
            return
        if named:  # the remaining parameters by name, in the kernel's order (all of them)
            if len(named) != len(self._names) - len(args):
                raise TypeError(f"{self._name}: launch arguments {sorted(named)} after "
                                f"{len(args)} positional ones; expected exactly "
                                f"{list(self._names[len(args):])}")
            args += tuple([named[name] for name in self._names[len(args):]])
        active = _TRITON["driver"].active
        device = active.get_current_device()
        # the key, inline (a function call per argument costs more than the test)
        key = [device, num_warps]
        append = key.append
        for arg, constexpr in zip(args, self._constexpr):
            if constexpr:
                append(arg)
                continue
            kind = type(arg)
            if kind is int:
                append((arg == 1, arg & 15 == 0, -0x80000000 <= arg < 0x80000000))
            elif kind is float or kind is bool or arg is None:
                append(kind)
            else:
                append(_arg_key(arg))
        key = tuple(key)
        kernel = self._cache.get(key)
        if kernel is None:
            kernel = self.fn[grid](*args, num_warps=num_warps, **COMPILE_OPTIONS)
            if hasattr(kernel, "packed_metadata"):  # a CompiledKernel (not a compile future)
                self._cache[key] = kernel
            return
        n = len(grid)
        kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                   active.get_current_stream(device), kernel.function, kernel.packed_metadata,
                   None, None, None, *args)
