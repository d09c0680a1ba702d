"""The native CPU kernels (``csrc/cpu/*.cpp``): built on first use, cached across processes.

``ops()`` returns ``torch.ops.rlhf_kernels_native`` (the private operators the launchers of
``rlhf_kernels.ops.*`` call on CPU tensors), building the extension the first time a process
needs it: never at import. The build is ``torch.utils.cpp_extension.load`` (ninja and the
system C++ compiler) into torch's extensions directory (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``) under a name keyed on the sources, the flags and the CPU's vector
capability, so a second process (or a second test run) only loads the cached library, and a
cache copied to a machine with another instruction set builds its own variant instead of
running instructions that machine lacks.

Flags: ``-O3``, OpenMP (``at::parallel_for`` over rows, the same runtime as torch's), and
for the vector width the capability torch itself detected at run time
(``torch.backends.cpu.get_cpu_capability()``): AVX2 (``-mavx2 -mfma -mf16c``, ATen's
``CPU_CAPABILITY_AVX2`` vectors; also used on AVX-512 machines) or the portable default
(``at::vec`` in plain C++, auto-vectorised by the compiler). Never ``-march=native``.

``available()`` tries once per process and remembers a failure; ``failure_reason()`` says why
(no compiler, no ninja, a compile error).

Concurrent first uses. Build and load run under an exclusive ``fcntl`` lock on
``<build dir>/rlhf_build.lock``, so processes that start at once on a cold cache build once (the
first to take the lock runs ninja, the others wait, then find it up to date) and nobody loads the
library while another process relinks it (ninja rebuilds in place when a process's compiler
command differs, e.g. another Python's include path). The kernel drops the lock when its holder
dies, so a killed build never blocks later processes; torch's own baton (a ``lock`` file in the
same directory, removed by its owner and left behind by a killed one) is therefore stale whenever
we hold our lock, and is removed. The cache root is torch's (``TORCH_EXTENSIONS_DIR``) unless
``RLHF_KERNELS_NATIVE_CACHE`` names another directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import time
from pathlib import Path

import torch

__all__ = ["CACHE_ENV_VAR", "available", "build_directory", "build_seconds", "failure_reason",
           "ops"]

CSRC = Path(__file__).resolve().parent.parent / "csrc" / "cpu"
# register.cpp first: ninja starts the jobs in this order, and the registration (torch's operator
# headers) is the longest compile, so it runs beside the four short kernel files instead of last
_SOURCES = ("register.cpp", "logprobs.cpp", "scans.cpp", "elementwise.cpp", "losses.cpp",
            "allocator.cpp")
_HEADERS = ("common.h", "dtypes.h")

CACHE_ENV_VAR = "RLHF_KERNELS_NATIVE_CACHE"
_LOCK_NAME = "rlhf_build.lock"

_OPS = None
_FAILURE: str | None = None
_BUILD_SECONDS: float | None = None


def _capability_flags() -> tuple[str, list[str]]:
    """(name suffix, compiler flags) for the vector instructions this CPU runs."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        capability = torch.backends.cpu.get_cpu_capability()
        if capability in ("AVX2", "AVX512"):
            return "avx2", ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2",
                            "-DCPU_CAPABILITY_AVX2"]
    return "default", ["-DCPU_CAPABILITY=DEFAULT"]


def _build_spec() -> tuple[str, list[str], list[str], list[str]]:
    suffix, vec_flags = _capability_flags()
    # no FMA contraction: z = x / T is rounded once, the same z wherever the kernels read it
    cflags = ["-O3", "-ffp-contract=off", "-fopenmp", "-DNDEBUG", *vec_flags]
    ldflags = ["-fopenmp"]
    digest = hashlib.sha256()
    for name in (*_SOURCES, *_HEADERS):
        digest.update(name.encode())
        digest.update((CSRC / name).read_bytes())
    digest.update(" ".join(cflags + ldflags).encode())
    digest.update(torch.__version__.encode())
    # the checkout too: ninja's commands name the sources by path, so two checkouts sharing one
    # build directory would relink it in turn (each sees the other's command as changed)
    digest.update(str(CSRC).encode())
    name = f"rlhf_kernels_native_{suffix}_{digest.hexdigest()[:12]}"
    return name, [str(CSRC / s) for s in _SOURCES], cflags, ldflags


def _missing_tool() -> str | None:
    """A clear reason when the build cannot even start (cheaper than a failed compile)."""
    import shutil

    from torch.utils import cpp_extension

    if not all((CSRC / name).is_file() for name in (*_SOURCES, *_HEADERS)):
        return f"the C++ sources are not in {CSRC} (an installed package without csrc/)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} is not on PATH (set CXX, or install g++)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def build_directory(name: str | None = None) -> str:
    """The build directory of the extension (created if missing): ``$RLHF_KERNELS_NATIVE_CACHE/
    <name>`` when the variable is set, else torch's (``TORCH_EXTENSIONS_DIR`` or its default)."""
    name = name or _build_spec()[0]
    root = os.environ.get(CACHE_ENV_VAR)
    if root:
        directory = os.path.join(os.path.abspath(root), name)
        os.makedirs(directory, exist_ok=True)
        return directory
    from torch.utils import cpp_extension

    return cpp_extension._get_build_directory(name, False)


@contextlib.contextmanager
def _build_lock(directory: str):
    """Exclusive lock on ``directory`` for the build and the load (module docstring)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: torch's baton alone
        yield
        return
    with open(os.path.join(directory, _LOCK_NAME), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            # Under our lock no process of ours is inside torch's build of this directory: a
            # baton file left there is a killed build's, and would make torch wait forever.
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, "lock"))
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build():
    global _OPS, _FAILURE, _BUILD_SECONDS
    reason = _missing_tool()
    if reason is not None:
        _FAILURE = reason
        return
    from torch.utils import cpp_extension

    name, sources, cflags, ldflags = _build_spec()
    start = time.perf_counter()
    try:
        directory = build_directory(name)
        with _build_lock(directory):
            cpp_extension.load(name=name, sources=sources, extra_cflags=cflags,
                               extra_ldflags=ldflags, build_directory=directory,
                               is_python_module=False, verbose=False)
    except Exception as error:  # noqa: BLE001 - any build failure means "not available"
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        _FAILURE = f"the build failed ({type(error).__name__}: {lines[-1] if lines else error})"
        return
    _BUILD_SECONDS = time.perf_counter() - start
    _OPS = torch.ops.rlhf_kernels_native


# A constant to torch.compile: an op's first call may come while Dynamo traces (fullgraph), and
# the build (file system, hashing, timing) is nothing Dynamo can trace; it then runs eagerly.
@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the native kernels are built and loaded (building them on the first call)."""
    if _OPS is None and _FAILURE is None:
        _build()
    return _OPS is not None


def ops():
    """``torch.ops.rlhf_kernels_native``; raises RuntimeError with the reason when unavailable."""
    if _OPS is not None:
        return _OPS
    if not available():
        raise RuntimeError(f"the native CPU kernels are not available: {_FAILURE}")
    return _OPS


def failure_reason() -> str | None:
    """Why the build failed (None when it succeeded or was not tried yet)."""
    return _FAILURE


def build_seconds() -> float | None:
    """Seconds this process spent in ``cpp_extension.load`` (a cache hit: load time only)."""
    return _BUILD_SECONDS
