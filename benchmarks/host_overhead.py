"""Host time per call of every public op, ours beside the same computation as eager PyTorch.

For the microsecond ops (the losses, GAE, KL, whitening) the GPU work is a few microseconds and
the host's Python and dispatch work decides the time a training step spends. This script
measures that host work on the CPU, where there is no GPU to hide behind:

* **ours**: the public op (``rlhf_kernels.<op>``, Triton path) with every Triton launch replaced
  by a no-op *after* Triton's own launch preparation. ``JITFunction.run`` runs unchanged: the
  argument binder and specialisation (dtype, divisibility by 16 of pointers and ints), the
  kernel cache key, the used-globals check, the grid and ``launch_metadata``; only the compiled
  kernel's C launcher (``CompiledKernel.run``, roughly 2-5 us per launch on a GPU host) is
  replaced by an empty Python call. The CUDA driver is replaced by a stub (device 0, stream 0,
  target sm_90) and a kernel is never compiled: the first call of each specialisation stores
  the stub kernel in Triton's own per-device cache, where every later call finds it. Tensors
  live on the CPU, so allocations, views and autograd are the CPU's (the CUDA caching
  allocator and the device hop of the autograd engine are not counted). The launchers' test
  for the native CPU kernels answers as for a CUDA tensor (a type check): for CPU tensors it
  would read an environment variable, which a GPU run never does. The ops' own launchers skip
  ``JITFunction.run`` for a specialisation already launched (``rlhf_kernels/ops/_launch.py``):
  that is the path measured, as a GPU run takes it.
* **eager**: the reference formula, ``rlhf_kernels.reference.<op>`` (plain torch ops, fp32, the
  same inputs and outputs: loss and stats), run eagerly on the same CPU tensors. On the CPU
  its ops also compute, so its figure is host time plus CPU compute; the shapes are kept small
  (1024 tokens, vocabularies of 32) so that the compute is a small part of it. The
  ``eager_tiny`` columns of the JSON repeat the eager timing at 8 tokens per op, where compute
  is negligible, to show how much of the eager figure is compute.

Each figure is the median of per-call wall times (``time.perf_counter_ns``) over ``--repeats``
calls after ``--warmup`` calls, ours and eager interleaved in rounds so that a busy machine
slows both alike, with the garbage collector paused and one intra-op thread. "fwd" is a call on
inputs that do not require grad; "fwd+bwd" is the call on inputs that do, then
``torch.autograd.grad`` of the loss (or of the output against a fixed upstream gradient) with
respect to the differentiable inputs. ``ratio`` is ours / eager. The ``*_kernels`` columns count
the GPU kernels one call would launch (``kernels_per_call``: ours' Triton launches plus every
torch kernel of either side, the backward's included), which a GPU host pays per launch and
these CPU timings do not show.

``python -m benchmarks.host_overhead [--repeats N] [--warmup N] [--smoke] [--markdown]``
(``--smoke``: a few repeats, no result file). Results go to
``benchmarks/results/host_overhead-<device>-<date>.json``. Run it in a fresh process: the
kernels must be defined as compiled-mode ``JITFunction``s, so ``TRITON_INTERPRET`` (which
``benchmarks/__init__.py`` sets on a machine without CUDA) is cleared before rlhf_kernels is
imported, and a process that already imported rlhf_kernels under the interpreter is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import print_table, save_results

# Run as a script, the kernels must be defined in compiled mode (see the module docstring):
# benchmarks/__init__.py sets TRITON_INTERPRET on a CPU-only machine for the other scripts' smoke
# runs. RLHF_KERNELS_POISON (the test suite's NaN fill of new buffers) is not what a user runs.
# Imported as a module, the environment is left alone (host_only_launches checks the kernels).
if __name__ == "__main__" and "rlhf_kernels.ops.policy_loss" not in sys.modules:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("RLHF_KERNELS_POISON", None)

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import rlhf_kernels as rk  # noqa: E402
from rlhf_kernels import _alloc as rk_alloc  # noqa: E402
from rlhf_kernels import backend as rk_backend  # noqa: E402
from rlhf_kernels import reference  # noqa: E402

__all__ = ["OPS", "TorchKernelOps", "host_only_launches", "kernels_per_call", "measure", "run",
           "main"]

# Public names that are not ops.
_NOT_OPS = {"resolve_backend"}

B, T = 4, 256  # 1024 tokens for the per-token ops and the losses
# The logprob ops: 128 tokens, vocabulary 32, hidden size 16, so that the eager formula's
# log_softmax over (tokens, V) on the CPU stays a small part of its time.
LP_B, LP_T, V, H = 2, 64, 32, 16
N_PAIRS = 1024
TINY_B, TINY_T = 1, 8  # the eager_tiny shape


# --------------------------------------------------------------------------------------------
# Triton launches without a GPU
# --------------------------------------------------------------------------------------------
class _StubDriver:
    """What ``JITFunction.run`` asks the active driver for: a device, a stream, a target."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


class _NoLaunchKernel:
    """Stands in for a ``CompiledKernel``: the attributes ``JITFunction.run`` reads, no launch."""

    function = None
    packed_metadata = None
    launches = 0

    def launch_metadata(self, grid, stream, *args):
        return None  # what CompiledKernel.launch_metadata returns without a launch hook

    def run(self, *args):
        _NoLaunchKernel.launches += 1


def _stub_compile(self, key, signature, device, constexprs, options, attrs, warmup):
    kernel = _NoLaunchKernel()
    self.device_caches[device][0][key] = kernel  # Triton's own kernel cache, as _do_compile does
    return kernel


def _check_compiled_mode() -> None:
    from rlhf_kernels.ops.policy_loss import _ppo_policy_loss_fwd_kernel

    if not isinstance(_ppo_policy_loss_fwd_kernel, JITFunction):
        raise RuntimeError(
            "rlhf_kernels was imported with TRITON_INTERPRET set, so its kernels run in the "
            "Triton interpreter and there is no launch path to measure. Run this script in a "
            "fresh process: python -m benchmarks.host_overhead"
        )


def _native_cpu_kernels_as_for_cuda(tensor: torch.Tensor) -> bool:
    """backend.native_cpu_kernels for a CUDA tensor: its first test, then False."""
    tensor.is_cuda  # noqa: B018 - the same attribute read, for the same host time
    return False


@contextlib.contextmanager
def host_only_launches():
    """Within: Triton kernels prepare their launch for real and launch nothing; the "auto"
    backend picks the Triton path for CPU tensors (as under the interpreter)."""
    _check_compiled_mode()
    previous_compile = JITFunction._do_compile
    triton_driver.set_active(_StubDriver())
    JITFunction._do_compile = _stub_compile
    # resolve_backend sends CPU tensors to Triton when it believes the interpreter is on (read
    # once, at import); the kernels were defined in compiled mode, so nothing is interpreted.
    previous_interpreter, rk_backend._INTERPRETER = rk_backend._INTERPRETER, True
    # No NaN fill of new buffers (the test suite's RLHF_KERNELS_POISON, read at import).
    previous_poison, rk_alloc._POISON = rk_alloc._POISON, False
    # The launchers ask native_cpu_kernels(tensor) whether a CPU tensor takes the native C++
    # kernels; for a CUDA tensor the answer is a type check, but for CPU tensors under the
    # interpreter flag above it reads RLHF_KERNELS_BACKEND (about 1.4 us per launch), host time
    # a GPU run never spends: the launchers get the CUDA tensor's answer (same type check).
    patched = [(m, m.native_cpu_kernels) for name, m in list(sys.modules.items())
               if name.startswith("rlhf_kernels") and m is not None
               and getattr(m, "native_cpu_kernels", None) is rk_backend.native_cpu_kernels]
    for module, _ in patched:
        module.native_cpu_kernels = _native_cpu_kernels_as_for_cuda
    try:
        yield
    finally:
        for module, original in patched:
            module.native_cpu_kernels = original
        rk_alloc._POISON = previous_poison
        rk_backend._INTERPRETER = previous_interpreter
        JITFunction._do_compile = previous_compile
        triton_driver._active = None  # the next use creates the real driver again


# --------------------------------------------------------------------------------------------
# kernels per call
# --------------------------------------------------------------------------------------------
class TorchKernelOps(TorchDispatchMode):
    """Records the aten ops of a call that would launch a GPU kernel (``ops``, by name, in
    order): every op that reaches the kernels except views and the ops that launch nothing:
    allocations, ``set_`` / ``resize_`` (the custom ops' and autograd's bookkeeping), dtype
    queries, and ``scalar_tensor``, the 0-d CPU tensor a Python number becomes in
    ``torch.where(c, x, 0.0)``."""

    FREE = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                      "lift_fresh", "detach", "alias", "set_", "resize_", "scalar_tensor",
                      "promote_types", "_local_scalar_dense"})

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in self.FREE:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def kernels_per_call(step: Callable[[], object]) -> int:
    """GPU kernels one call of ``step`` would launch: its Triton launches (counted at the
    mocked launcher) plus its torch kernels (``TorchKernelOps``), the backward's included."""
    before = _NoLaunchKernel.launches
    with TorchKernelOps() as torch_kernels:
        step()
    return _NoLaunchKernel.launches - before + len(torch_kernels.ops)


# --------------------------------------------------------------------------------------------
# the ops
# --------------------------------------------------------------------------------------------
@dataclass
class Op:
    """One public op: inputs, our call and the eager formula on the same inputs."""

    name: str
    shape: str
    inputs: Callable[[int, int], dict]  # (rows, T) -> named tensors
    ours: Callable[[dict], object]
    eager: Callable[[dict], object]
    grad: tuple[str, ...] = ()  # inputs that get a gradient (empty: not differentiable)
    rows: int = B
    t: int = T


def _mask(rows: int, t: int) -> torch.Tensor:
    """Right padding: every row keeps its first 3/4 or more."""
    lengths = torch.randint(max(1, 3 * t // 4), t + 1, (rows,))
    return torch.arange(t)[None, :] < lengths[:, None]


def _tokens(rows: int, t: int) -> dict:
    logp = -torch.rand(rows, t) * 2
    return {"logp": logp, "old_logp": logp + 0.1 * torch.randn(rows, t),
            "ref_logp": logp + 0.2 * torch.randn(rows, t),
            "advantages": torch.randn(rows, t), "mask": _mask(rows, t)}


def _values(rows: int, t: int) -> dict:
    values = torch.randn(rows, t)
    return {"values": values, "old_values": values + 0.1 * torch.randn(rows, t),
            "returns": torch.randn(rows, t), "rewards": torch.randn(rows, t),
            "mask": _mask(rows, t), "scores": torch.randn(rows)}


def _logits(rows: int, t: int) -> dict:
    labels = torch.randint(0, V, (rows, t))
    return dict(_tokens(rows, t), logits=torch.randn(rows, t, V), labels=labels,
                hidden=torch.randn(rows, t, H), weight=torch.randn(V, H) * H ** -0.5)


def _pairs(rows: int, t: int) -> dict:
    n = N_PAIRS if (rows, t) == (B, T) else rows * t  # the eager_tiny shape: 8 pairs
    return {"chosen": torch.randn(n) + 0.5, "rejected": torch.randn(n)}


def _per_token_ops() -> list[Op]:
    tok = f"{B}x{T} fp32"
    lp = dict(rows=LP_B, t=LP_T)
    return [
        Op("bradley_terry_loss", f"{N_PAIRS} pairs fp32", _pairs,
           lambda a: rk.bradley_terry_loss(a["chosen"], a["rejected"]),
           lambda a: reference.bradley_terry_loss(a["chosen"], a["rejected"]),
           ("chosen", "rejected")),
        Op("gae", tok + " (eager: the per-token loop)", _values,
           lambda a: rk.gae(a["rewards"], a["values"], a["mask"], 1.0, 0.95),
           lambda a: reference.gae(a["rewards"], a["values"], a["mask"], 1.0, 0.95)),
        Op("group_advantages", f"{B * T} scores, groups of 8 fp32",
           lambda r, t: {"scores": torch.randn(r * t)},
           lambda a: rk.group_advantages(a["scores"], 8),
           lambda a: reference.group_advantages(a["scores"], 8)),
        Op("kl_penalty", tok + " k3", _tokens,
           lambda a: rk.kl_penalty(a["logp"], a["ref_logp"], "k3"),
           lambda a: reference.kl_penalty(a["logp"], a["ref_logp"], "k3"), ("logp",)),
        Op("linear_logprobs", f"{LP_B}x{LP_T} tokens, H={H}, V={V} fp32", _logits,
           lambda a: rk.linear_logprobs(a["hidden"], a["weight"], a["labels"]),
           lambda a: reference.linear_logprobs(a["hidden"], a["weight"], a["labels"]),
           ("hidden", "weight"), **lp),
        Op("linear_ppo_loss", f"{LP_B}x{LP_T} tokens, H={H}, V={V} fp32", _logits,
           lambda a: rk.linear_ppo_loss(a["hidden"], a["weight"], a["labels"], a["old_logp"],
                                        a["advantages"], a["mask"]),
           lambda a: reference.linear_ppo_loss(a["hidden"], a["weight"], a["labels"],
                                               a["old_logp"], a["advantages"], a["mask"]),
           ("hidden", "weight"), **lp),
        Op("logprobs", f"{LP_B}x{LP_T}x{V} fp32", _logits,
           lambda a: rk.logprobs(a["logits"], a["labels"]),
           lambda a: reference.logprobs(a["logits"], a["labels"]), ("logits",), **lp),
        Op("masked_whiten", tok, _tokens,
           lambda a: rk.masked_whiten(a["advantages"], a["mask"]),
           lambda a: reference.masked_whiten(a["advantages"], a["mask"])),
        Op("ppo_loss_from_logits", f"{LP_B}x{LP_T}x{V} fp32", _logits,
           lambda a: rk.ppo_loss_from_logits(a["logits"], a["labels"], a["old_logp"],
                                             a["advantages"], a["mask"]),
           lambda a: reference.ppo_loss_from_logits(a["logits"], a["labels"], a["old_logp"],
                                                    a["advantages"], a["mask"]),
           ("logits",), **lp),
        Op("ppo_policy_loss", tok, _tokens,
           lambda a: rk.ppo_policy_loss(a["logp"], a["old_logp"], a["advantages"], a["mask"]),
           lambda a: reference.ppo_policy_loss(a["logp"], a["old_logp"], a["advantages"],
                                               a["mask"]),
           ("logp",)),
        Op("ppo_value_loss", tok, _values,
           lambda a: rk.ppo_value_loss(a["values"], a["old_values"], a["returns"], a["mask"]),
           lambda a: reference.ppo_value_loss(a["values"], a["old_values"], a["returns"],
                                              a["mask"]),
           ("values",)),
        Op("shape_rewards", tok, lambda r, t: dict(_values(r, t), **_tokens(r, t)),
           lambda a: rk.shape_rewards(a["scores"], a["logp"], a["ref_logp"], a["mask"], 0.05),
           lambda a: reference.shape_rewards(a["scores"], a["logp"], a["ref_logp"], a["mask"],
                                             0.05)),
    ]


OPS: list[Op] = _per_token_ops()


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------
def _first_tensor(out) -> torch.Tensor:
    """The differentiated output: the loss of (loss, stats), logp of (logp, entropy), or it."""
    return out if isinstance(out, torch.Tensor) else out[0]


def _steps(op: Op, impl: Callable[[dict], object], rows: int, t: int):
    """(fwd step, fwd+bwd step or None) on fresh inputs of (rows, t)."""
    inputs = op.inputs(rows, t)
    fwd = lambda: impl(inputs)  # noqa: E731
    if not op.grad:
        return fwd, None
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in op.grad else v)
              for k, v in inputs.items()}
    wrt = [leaves[k] for k in op.grad]
    probe = _first_tensor(impl(leaves))
    upstream = None if probe.dim() == 0 else torch.ones_like(probe)

    def fwd_bwd():
        out = _first_tensor(impl(leaves))
        return torch.autograd.grad(out, wrt, upstream)

    return fwd, fwd_bwd


def measure(steps: dict[str, Callable[[], object]], repeats: int, warmup: int,
            rounds: int = 5) -> dict[str, float]:
    """Median microseconds per call of each step; the steps take turns in ``rounds`` rounds."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples: dict[str, list[int]] = {name: [] for name in steps}
    per_round = max(1, math.ceil(repeats / rounds))
    clock = time.perf_counter_ns
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, step in steps.items():
                times = samples[name]
                for _ in range(per_round):
                    start = clock()
                    step()
                    times.append(clock() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: statistics.median(times) / 1e3 for name, times in samples.items()}


def _ratio(ours: float | None, eager: float | None) -> float | None:
    return None if ours is None or eager is None else ours / eager


def run(repeats: int = 400, warmup: int = 20, ops: list[Op] | None = None,
        tiny: bool = True) -> list[dict]:
    """One row per op: ours / eager, fwd and fwd+bwd, in microseconds per call."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        with host_only_launches():
            for op in ops or OPS:
                steps = {}
                steps["ours_fwd"], steps["ours_fwd_bwd"] = _steps(op, op.ours, op.rows, op.t)
                steps["eager_fwd"], steps["eager_fwd_bwd"] = _steps(op, op.eager, op.rows, op.t)
                if tiny:
                    steps["eager_tiny_fwd"], steps["eager_tiny_fwd_bwd"] = _steps(
                        op, op.eager, TINY_B, TINY_T)
                row = {"op": op.name, "case": op.shape, "impl": "ours vs eager (host us)"}
                # Triton launches per call of ours (0 would mean the op never took the Triton
                # path, and the comparison would be void).
                for key in ("ours_fwd", "ours_fwd_bwd"):
                    before = _NoLaunchKernel.launches
                    if steps[key] is not None:
                        steps[key]()
                    row[f"{key}_launches"] = (_NoLaunchKernel.launches - before
                                              if steps[key] is not None else None)
                # GPU kernels per call (Triton and torch, the backward's included): on a GPU
                # host each costs a launch that the CPU figures do not contain (ours: the
                # mocked launcher; eager: the CPU runs its kernels inline).
                for key in ("ours_fwd", "ours_fwd_bwd", "eager_fwd", "eager_fwd_bwd"):
                    row[f"{key}_kernels"] = (kernels_per_call(steps[key])
                                             if steps[key] is not None else None)
                us = measure({k: v for k, v in steps.items() if v is not None}, repeats, warmup)
                for key in steps:
                    row[f"{key}_us"] = us.get(key)
                row["ratio_fwd"] = _ratio(row["ours_fwd_us"], row["eager_fwd_us"])
                row["ratio_fwd_bwd"] = _ratio(row["ours_fwd_bwd_us"], row["eager_fwd_bwd_us"])
                row["ratio"] = row["ratio_fwd_bwd"] if op.grad else row["ratio_fwd"]
                rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return rows


_COLUMNS = ("op", "ours_fwd_us", "ours_fwd_bwd_us", "eager_fwd_us", "eager_fwd_bwd_us",
            "ratio_fwd", "ratio_fwd_bwd")
_HEADERS = ("op", "ours fwd", "ours fwd+bwd", "eager fwd", "eager fwd+bwd", "ratio fwd",
            "ratio fwd+bwd", "GPU kernels ours / eager")


def _kernels_cell(row: dict) -> str:
    """GPU kernels per call, ours / eager: fwd+bwd for the differentiable ops, else fwd."""
    suffix = "fwd_bwd" if row.get("ours_fwd_bwd_kernels") is not None else "fwd"
    ours, eager = row.get(f"ours_{suffix}_kernels"), row.get(f"eager_{suffix}_kernels")
    return "–" if ours is None or eager is None else f"{ours} / {eager}"


def markdown_table(rows: list[dict]) -> str:
    """The table as benchmarks/README.md shows it (microseconds; ratios as ours / eager)."""
    lines = ["| " + " | ".join(_HEADERS) + " |", "|" + "---|" * len(_HEADERS)]
    for row in rows:
        cells = [row["op"]]
        for key in _COLUMNS[1:]:
            value = row.get(key)
            if value is None:
                cells.append("–")
            elif key.startswith("ratio"):
                cells.append(f"{value:.2f}×")
            else:
                cells.append(f"{value:.0f}")
        cells.append(_kernels_cell(row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=400, help="timed calls per figure")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first")
    parser.add_argument("--smoke", action="store_true",
                        help="a few repeats, no result file (checks that every op runs)")
    parser.add_argument("--markdown", action="store_true", help="also print the README table")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--ops", nargs="+", metavar="OP", choices=[op.name for op in OPS],
                        help="only these ops (default: all)")
    args = parser.parse_args(argv)
    repeats, warmup = (5, 1) if args.smoke else (args.repeats, args.warmup)
    rows = run(repeats=repeats, warmup=warmup,
               ops=[op for op in OPS if not args.ops or op.name in args.ops])
    print_table(rows, columns=_COLUMNS + ("case",))
    if args.markdown:
        print(markdown_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows}, indent=1))
    if not args.smoke and not args.ops:
        print(f"wrote {save_results('host_overhead', rows)}")
    return 0


if __name__ == "__main__":
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(main))
