"""Shared benchmark harness: timing, memory, the bandwidth floor, and result files.

Every figure is reported three ways (docs/design.md §4): milliseconds (median of
``triton.testing.do_bench``), GB/s of the bytes the op must move, and that as a percentage of the
measured device-copy bandwidth (the floor: every input read once, every output written once).
Peak extra memory is the allocator's peak above what was allocated before the call.

Results go to ``benchmarks/results/<name>-<gpu>-<date>.json`` with the GPU name, torch / triton /
CUDA versions, the date and the git SHA, so a figure can always be traced to the run that made it.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# where `bash scripts/gpu_check.sh wheels` puts the TRL wheel whose fused lm head the kernel
# benchmarks run as a peer (not .whl/ itself: those wheels are installed for the PPO peer,
# which needs another TRL version)
KERNEL_PEER_WHEELS = Path(__file__).resolve().parent.parent / ".whl" / "kernel-peers"
_TRL_CHUNKED_FILE = "trl/kernels/chunked_logprob.py"
_TRL_UTILS_FILE = "trl/trainer/utils.py"
# the vocabulary width of TRL's chunks, as trl.trainer.utils passes it (1.16)
_TRL_DEFAULT_VOCAB_CHUNK = 32768

__all__ = [
    "RESULTS_DIR",
    "SMOKE_NOTE",
    "Case",
    "copy_bandwidth_gbps",
    "environment",
    "peak_extra_mib",
    "print_table",
    "result_row",
    "run_cases",
    "save_results",
    "time_ms",
    "trl_fused_head",
]


def _trl_peer_package(root: str) -> str:
    """Stand-in packages for the TRL kernel file loaded alone: ``root``, ``root.kernels`` (the
    file's package) and ``root.trainer.utils`` with the one name the file imports from it at
    call time, ``maybe_gather_lm_head_ctx`` (TRL's backward gathers a ZeRO-3-sharded lm_head
    with it; outside ZeRO-3 it is a null context, which is what the stand-in returns). Returns
    the module name the kernel file is loaded under, ``root.kernels.chunked_logprob``."""
    import contextlib
    import types

    for package in (root, f"{root}.kernels", f"{root}.trainer"):
        module = sys.modules.setdefault(package, types.ModuleType(package))
        module.__path__ = []  # a package: relative imports resolve against it
    utils = types.ModuleType(f"{root}.trainer.utils")
    utils.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
    sys.modules[utils.__name__] = utils
    return f"{root}.kernels.chunked_logprob"


def trl_fused_head(wheels: Path = KERNEL_PEER_WHEELS):
    """TRL's fused lm head as a peer: (``ChunkedLogProbFunction``, the vocabulary chunk width
    TRL's trainers pass it), or None when there is none.

    From the installed TRL, else from the newest TRL wheel under ``wheels``: only the kernel's
    file is loaded from the wheel (it imports torch, triton, packaging and transformers), not
    TRL's package and its dependencies, which the GPU image lacks.
    """
    try:
        from trl.kernels import chunked_logprob
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        return chunked_logprob.ChunkedLogProbFunction, _CHUNKED_LOGPROB_CHUNK_SIZE
    except (ImportError, AttributeError):
        pass
    for wheel in sorted(wheels.glob("trl-*.whl"), reverse=True):
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            if _TRL_CHUNKED_FILE not in names:
                continue
            source = archive.read(_TRL_CHUNKED_FILE)
            utils = archive.read(_TRL_UTILS_FILE).decode() if _TRL_UTILS_FILE in names else ""
        # Triton's @jit reads its functions' source with inspect, so the file must exist on
        # disk: exec'd text fails ("@jit functions should be defined in a Python file", the
        # second H200 proof's linear and grpo parts)
        root = "_trl_peer_" + re.sub(r"\W", "_", wheel.stem)
        name = _trl_peer_package(root)
        path = Path(tempfile.gettempdir()) / "rlhf-kernel-peers" / f"{root}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != source:
            path.write_bytes(source)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # (inspect finds a class's source through its module)
        try:
            spec.loader.exec_module(module)
        except Exception as error:  # noqa: BLE001 - a broken peer is skipped, not our failure
            print(f"[peer] TRL's fused head from {wheel.name} did not load ({error!r}): skipped")
            return None
        width = re.search(r"^_CHUNKED_LOGPROB_CHUNK_SIZE\s*=\s*(\d+)", utils, re.MULTILINE)
        function = getattr(module, "ChunkedLogProbFunction", None)
        if function is not None:
            return function, int(width.group(1)) if width else _TRL_DEFAULT_VOCAB_CHUNK
    return None


def cuda_graphed(step: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """``step`` captured in one CUDA graph (after ``warmup`` calls on a side stream, as PyTorch's
    whole-step capture recipe does); returns its replay. Timing the replay measures the step's
    GPU work with no host time per call: what a trainer that captures its loss step pays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def time_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median wall time of ``fn`` in ms. CUDA: triton.testing.do_bench (flushes L2 between runs).

    On the CPU (smoke mode only) a plain perf_counter median over a few calls.
    """
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    import time

    fn()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return samples[len(samples) // 2]


def peak_extra_mib(fn: Callable[[], object]) -> float | None:
    """Peak CUDA memory allocated during ``fn`` above what was allocated before, in MiB.

    None on the CPU (no allocator statistics there).
    """
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - before) / 2**20


_BANDWIDTH_CACHE: dict[str, float] = {}


def copy_bandwidth_gbps(nbytes: int = 2**30) -> float | None:
    """Measured device-to-device copy bandwidth in GB/s, counting read + write (the floor)."""
    if not torch.cuda.is_available():
        return None
    key = f"{torch.cuda.current_device()}:{nbytes}"
    if key not in _BANDWIDTH_CACHE:
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src))
        _BANDWIDTH_CACHE[key] = 2 * nbytes / (ms * 1e-3) / 1e9
        del src, dst
    return _BANDWIDTH_CACHE[key]


_MATMUL_CACHE: dict[str, float] = {}


def matmul_tflops(dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float | None:
    """Measured dense matmul rate in TFLOP/s (an n x n x n cuBLAS GEMM in ``dtype``): the
    compute floor's denominator."""
    if not torch.cuda.is_available():
        return None
    key = f"{torch.cuda.current_device()}:{dtype}:{n}"
    if key not in _MATMUL_CACHE:
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        ms = time_ms(lambda: a @ b)
        _MATMUL_CACHE[key] = 2 * n**3 / (ms * 1e-3) / 1e12
        del a, b
    return _MATMUL_CACHE[key]


def result_row(
    op: str,
    case: str,
    impl: str,
    ms: float | None,
    bytes_moved: float | None = None,
    peak_mib: float | None = None,
    **extra,
) -> dict:
    """One table row; GB/s and % of the copy-bandwidth floor are derived from ``bytes_moved``."""
    row = {"op": op, "case": case, "impl": impl, "ms": ms, "peak_extra_mib": peak_mib}
    if ms is not None and bytes_moved:
        gbps = bytes_moved / (ms * 1e-3) / 1e9
        row["gb_per_s"] = gbps
        bw = copy_bandwidth_gbps()
        if bw:
            row["floor_ms"] = bytes_moved / (bw * 1e9) * 1e3
            row["pct_of_floor"] = 100.0 * row["floor_ms"] / ms
    row.update(extra)
    return row


def proc_status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (Linux), e.g. "VmRSS" or "VmHWM" (the peak RSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _git_sha() -> str:
    """The SHA the caller passed as RLHF_GIT_SHA when set (the checkout's HEAD, given to a copy of
    the working tree sent to a GPU machine: a copy may carry a stale repository whose HEAD is not
    the tree that runs), else HEAD's SHA, else "unknown"."""
    if os.environ.get("RLHF_GIT_SHA"):
        return os.environ["RLHF_GIT_SHA"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("RLHF_GIT_SHA") or "unknown"


def environment() -> dict:
    import triton

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": _git_sha(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cuda": torch.version.cuda,
    }
    bw = copy_bandwidth_gbps()
    if bw:
        env["copy_bandwidth_gbps"] = bw
        env["bf16_matmul_tflops"] = matmul_tflops(torch.bfloat16)
    return env


def save_results(name: str, rows: list[dict], directory: Path | None = None) -> Path:
    """Write rows plus the environment to JSON; returns the path (atomic write)."""
    env = environment()
    directory = Path(directory or RESULTS_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    device = env["device"].replace(" ", "_").replace("/", "_")
    stamp = env["date"][:10]
    path = directory / f"{name}-{device}-{stamp}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    os.replace(tmp, path)
    return path


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


# What a smoke run prints above its table instead of any time or rate.
SMOKE_NOTE = ("smoke run: tiny shapes on the CPU (the Triton interpreter or the PyTorch "
              "reference), to check that every case runs. No times, rates or memory are shown: "
              "at these shapes and on this path they are not performance figures.")
# The columns that name a case (everything else a table shows is a measurement).
_NAME_COLUMNS = ("op", "case", "impl", "device", "shape")


def print_table(rows: list[dict], columns: tuple[str, ...] = (
    "op", "case", "impl", "ms", "gb_per_s", "pct_of_floor", "peak_extra_mib",
), smoke: bool = False) -> None:
    """The result table; ``smoke=True`` prints SMOKE_NOTE and, per case, only its name columns
    and ``result`` ("ran", or the error of an optional peer that failed)."""
    if not rows:
        return
    if smoke:
        print(SMOKE_NOTE)
        columns = (*(c for c in columns if c in _NAME_COLUMNS), "result")
        rows = [{**row, "result": row.get("error") or "ran"} for row in rows]
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


@dataclass
class Case:
    """One (case, implementation) pair of a benchmark script: the unit that is timed.

    ``make`` allocates the inputs on the device and returns the step to time. Nothing is
    allocated, compiled or imported from a peer library until it is called, so listing a script's
    cases is free on a CPU machine: ``python -m benchmarks`` (through :func:`run_cases`) and
    ``pytest benchmarks --benchmark-only`` (one test per case) walk the same list.
    ``optional`` marks a third-party peer whose API may differ from what we call: its failure is
    reported in the row instead of ending the run.
    """

    op: str
    case: str
    impl: str
    make: Callable[[], Callable[[], object]]
    bytes_moved: float | None = None
    flops: float | None = None
    extra: dict = field(default_factory=dict)
    optional: bool = False

    @property
    def name(self) -> str:
        return f"{self.op} | {self.case} | {self.impl}"


def run_cases(cases: Iterable[Case]) -> list[dict]:
    """Time every case (ms, peak extra memory, GB/s and % of floor, TFLOP/s); one row each.

    ``setup_s`` is the wall time of ``make`` (input allocation, and the compilation for peers
    whose ``make`` runs a first call). A case that runs out of CUDA memory, or an optional peer
    that fails, gives a row with ``ms`` None and an ``error``; the inputs of each case are freed
    before the next one is made.
    """
    rows = []
    for case in cases:
        started = time.perf_counter()
        ms = peak = setup_s = None
        error = None
        try:
            step = case.make()
            setup_s = time.perf_counter() - started
            ms = time_ms(step)
            peak = peak_extra_mib(step)
        except torch.cuda.OutOfMemoryError as err:
            error = f"out of memory: {str(err).splitlines()[0]}"
        except Exception as err:  # noqa: BLE001 - only optional peers are allowed to fail
            if not case.optional:
                raise
            error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"[{case.op}] {case.impl} skipped: {error}")
        step = None  # drop the inputs the step holds before the next case allocates its own
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        extra = dict(case.extra)
        if case.flops is not None:
            extra["tflops"] = case.flops / (ms * 1e-3) / 1e12 if ms else None
        if error is not None:
            extra["error"] = error
        rows.append(result_row(case.op, case.case, case.impl, ms, case.bytes_moved, peak,
                               setup_s=setup_s, **extra))
    return rows
