"""rlhf_kernels.ops._launch.CachedLaunch: a repeated specialisation skips JITFunction.run and
hands the compiled kernel's launcher exactly the arguments Triton would; any change Triton
specialises on (dtype, pointer alignment, an int's 1 / divisible-by-16 / 64-bit class, a
constexpr's value, num_warps) goes through Triton again.

The kernels must be compiled-mode JITFunctions (the suite runs under the interpreter), so the
check runs in a fresh process under benchmarks.host_overhead's mocked launches (no GPU, nothing
compiled): Triton's own launch path records what it passes to the launcher.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = r'''
import os
os.environ.pop("TRITON_INTERPRET", None)
os.environ.pop("RLHF_KERNELS_POISON", None)
import torch
import triton
import triton.language as tl
import rlhf_kernels  # noqa: F401  (compiled mode, before benchmarks sets the interpreter)
from triton.runtime.jit import JITFunction

from rlhf_kernels.ops._launch import CachedLaunch


@triton.jit
def _k(x_ptr, y_ptr, n, scale, FLAG: tl.constexpr, BLOCK: tl.constexpr):
    pass


from benchmarks import host_overhead as ho  # noqa: E402

calls = []


def record_run(self, *args):
    calls.append(args)


ho._NoLaunchKernel.run = record_run
slow = []
real_run = JITFunction.run


def counting_run(self, *args, **kwargs):
    slow.append(kwargs)
    return real_run(self, *args, **kwargs)


from rlhf_kernels.ops import _launch  # noqa: E402

# decided on Triton's own run() before it is wrapped here for counting
_launch._CONVENTION_OK = _launch._convention_ok()
if not _launch._CONVENTION_OK:
    print("unknown convention")
    raise SystemExit(0)
JITFunction.run = counting_run
launch = CachedLaunch(globals(), "_k")
x = torch.zeros(64)
y = torch.zeros(64)
with ho.host_only_launches():
    base = (x, y, 64, 0.5, True, 128)
    launch((2,), *base, num_warps=4)
    assert len(slow) == 1
    # FMA contraction asked for explicitly (Triton 3.10 turns its default off)
    assert slow[0].get("enable_fp_fusion") is True, slow[0]
    via_triton = calls[-1]
    launch((2,), *base, num_warps=4)
    assert len(slow) == 1, "a repeated specialisation went through JITFunction.run"
    # the launcher got what Triton gave it: grid, stream, function, metadata, hooks, arguments
    cached = calls[-1]
    assert cached[:6] == via_triton[:6] and cached[9:] == via_triton[9:], (cached, via_triton)
    # a new float value or a new tensor of the same kind is the same specialisation
    launch((3,), x.clone(), y, 64, 0.25, True, 128, num_warps=4)
    assert len(slow) == 1 and calls[-1][0] == 3
    changes = [
        (x.double(), y, 64, 0.5, True, 128),      # dtype
        (x[1:], y, 64, 0.5, True, 128),           # pointer not 16-byte aligned
        (x, y, 1, 0.5, True, 128),                # an int equal to 1
        (x, y, 65, 0.5, True, 128),               # not divisible by 16
        (x, y, 2 ** 32, 0.5, True, 128),          # 64-bit
        (x, y, 64, 0.5, False, 128),              # a constexpr's value
        (x, y, 64, 0.5, True, 256),
    ]
    for i, args in enumerate(changes):
        launch((2,), *args, num_warps=4)
        assert len(slow) == 2 + i, f"change {i} did not go through Triton"
    launch((2,), *base, num_warps=8)
    assert len(slow) == 2 + len(changes), "num_warps is part of the key"
    # a profiler's launch hook: every launch goes through Triton (which calls the hook)
    from triton import knobs
    hook = lambda *a: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        before = len(slow)
        launch((2,), *base, num_warps=4)
        assert len(slow) == before + 1
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    # RLHF_KERNELS_CACHED_LAUNCH=0 (read at import): every launch goes through Triton
    _launch._ENABLED = False
    off = CachedLaunch(globals(), "_k")
    before = len(slow)
    off((2,), *base, num_warps=4)
    off((2,), *base, num_warps=4)
    assert len(slow) == before + 2, "the switch did not turn the cached path off"
    _launch._ENABLED = True
    # replacing the module's kernel (a test's monkeypatch) takes effect at once
    class Trap:
        def __getitem__(self, grid):
            raise RuntimeError("trap")
    globals()["_k"] = Trap()
    try:
        launch((2,), *base, num_warps=4)
        raise AssertionError("the replaced kernel was not used")
    except RuntimeError as err:
        assert str(err) == "trap"
print("ok")
'''


def test_cached_launch_skips_only_what_triton_would_reuse(tmp_path):
    script = tmp_path / "check_cached_launch.py"  # a file: @triton.jit reads its source
    script.write_text(_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    if done.stdout.strip().endswith("unknown convention"):
        pytest.skip("this Triton's JITFunction.run passes the launcher other arguments than "
                    "CachedLaunch knows: it falls back to fn[grid] (nothing to check)")
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (
        done.stdout[-2000:] + done.stderr[-4000:])


def test_cached_launch_falls_back_under_the_interpreter():
    """Under the interpreter (this suite) the kernel is not a JITFunction: plain fn[grid]."""
    from rlhf_kernels.ops._launch import CachedLaunch

    seen = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((grid, args, kwargs))

    launch = CachedLaunch({"k": Kernel()}, "k")
    launch((4,), 1, 2.0, num_warps=2)
    launch((4,), 1, 2.0, num_warps=2)
    assert seen == [((4,), (1, 2.0), {"num_warps": 2, "enable_fp_fusion": True})] * 2
