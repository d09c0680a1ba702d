"""Static analysis of the vocabulary kernels, no GPU needed: each compiled ahead of time for a GPU
target with the launch configurations the launchers really use, and the launches the fused ops
make, counted with the launches mocked.

* **Launch configurations**: the op is called on CPU tensors of the real vocabulary and dtype
  (a few rows: the specialisation does not depend on the row count) under
  ``benchmarks.host_overhead.host_only_launches``, with Triton's compile step replaced by a
  recorder: each launch hands over the signature, constexprs, options and attributes
  (pointer / int divisibility) that ``JITFunction.run`` derived from the real arguments.
* **Compile**: each recorded specialisation is compiled with ``triton.compile`` for
  ``GPUTarget("cuda", 90, 32)`` (sm_90; ``--arch 89`` for sm_89) through Triton's bundled
  ``ptxas``; ``cuobjdump`` gives the SASS and the resource usage (registers; ``LOCAL`` > 0
  means spills or stack arrays).
* **Loops**: a loop is the body between a backward branch's target and the branch. For the
  vocabulary loops one iteration handles ``BLOCK_V`` entries of one row (one warp per row at
  large V), so ``instructions per 4 KB`` = body instructions x 4096 / (BLOCK_V x element
  size), times the warps per row (each warp runs the body). Also counted per body: ``MUFU``
  (ex2 / lg2 / rcp), 64-bit integer compares (``ISETP ... .EX``), global loads (``LDG``),
  asynchronous copies (``LDGSTS``: cp.async, i.e. real software pipelining) and their waits.
* **Launch counts** of ``ppo_loss_from_logits`` on ``logits[:, :-1, :]`` and of
  ``linear_ppo_loss`` per chunk: Triton launches (mocked) plus the torch ops that launch a CUDA
  kernel (every aten op that is not a view or an allocation, counted by a dispatch mode), on CPU
  tensors of a small shape.

``python -m benchmarks.static_sass [--arch 90] [--json PATH] [--markdown]``; results to
``benchmarks/results/static_sass-sm<arch>-<date>.json`` (no device in the name: nothing ran on
one). Run it in a fresh process, as host_overhead (the kernels must be compiled-mode
``JITFunction``s). Each compile takes a few seconds of CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and "rlhf_kernels.ops.policy_loss" not in sys.modules:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("RLHF_KERNELS_POISON", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import rlhf_kernels as rk  # noqa: E402
from benchmarks import host_overhead  # noqa: E402
from benchmarks.common import RESULTS_DIR, environment, print_table  # noqa: E402

__all__ = ["Launch", "record_launches", "compile_sass", "loops", "launch_counts", "run", "main"]

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


# --------------------------------------------------------------------------------------------
# recording the launches
# --------------------------------------------------------------------------------------------
@dataclass
class Launch:
    fn: JITFunction
    signature: dict
    constexprs: dict
    options: object
    attrs: dict

    @property
    def name(self) -> str:
        return self.fn.__name__

    def constexpr(self, name: str):
        index = self.fn.arg_names.index(name)
        return self.constexprs.get((index,))


@contextlib.contextmanager
def record_launches():
    """Within: launches are mocked (host_overhead.host_only_launches) and every launch is
    recorded as a ``Launch`` (in order, repeats included) in the yielded list."""
    recorded: list[Launch] = []
    # a CachedLaunch that already holds a kernel for the specialisation launches it without
    # Triton's compile step, so nothing would be recorded: every one starts empty here (after
    # logprobs' default pipelining depth became 2, its stages=2 case recorded nothing)
    import gc

    from rlhf_kernels.ops._launch import CachedLaunch

    for launcher in [o for o in gc.get_objects() if isinstance(o, CachedLaunch)]:
        launcher._reset()

    def record(self, key, signature, device, constexprs, options, attrs, warmup):
        recorded.append(Launch(self, dict(signature), dict(constexprs), options, dict(attrs)))
        return host_overhead._NoLaunchKernel()  # not cached: every launch comes back here

    with host_overhead.host_only_launches():
        previous = JITFunction._do_compile
        JITFunction._do_compile = record
        try:
            yield recorded
        finally:
            JITFunction._do_compile = previous


# --------------------------------------------------------------------------------------------
# compiling and reading the SASS
# --------------------------------------------------------------------------------------------
def compile_sass(launch: Launch, arch: int = 90) -> dict:
    """Compile one recorded launch for sm_<arch> -> {sass, ptx, regs, local, shared}."""
    fn = launch.fn
    options = dict(launch.options.__dict__)
    if arch != 90:
        # the options were parsed for the stub driver's sm_90; re-parse for the target
        from triton.backends.nvidia.compiler import CUDABackend

        backend = CUDABackend(GPUTarget("cuda", arch, 32))
        options = backend.parse_options({k: v for k, v in options.items()
                                         if k in ("num_warps", "num_stages", "num_ctas",
                                                  "debug")}).__dict__
    src = fn.ASTSource(fn, launch.signature, launch.constexprs, launch.attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([str(_BIN / "cuobjdump"), "-sass", str(cubin)], check=True,
                              capture_output=True, text=True).stdout
        usage = subprocess.run([str(_BIN / "cuobjdump"), "-res-usage", str(cubin)], check=True,
                               capture_output=True, text=True).stdout
    field = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))  # noqa: E731
    # Triton's shared memory is dynamic: the kernel's metadata has it, not the static SHARED
    return {"sass": sass, "ptx": kernel.asm["ptx"], "regs": field("REG"),
            "local": field("LOCAL"), "shared": kernel.metadata.shared}


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"BRA\s+(?:`?\(?)?(0x[0-9a-f]+)")


def _instructions(sass: str) -> list[tuple[int, str]]:
    return [(int(m.group(1), 16), m.group(2)) for m in _INSTR.finditer(sass)]


def loops(sass: str) -> list[dict]:
    """Each backward branch's body (target .. branch): instruction counts by kind."""
    instrs = _instructions(sass)
    found = []
    for addr, text in instrs:
        m = _BRANCH.search(text)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= addr:
            continue
        body = [t for a, t in instrs if target <= a <= addr]
        found.append({
            "start": target, "end": addr, "instructions": len(body),
            "mufu": sum(t.split()[0 if not t.startswith("@") else 1].startswith("MUFU")
                        for t in body),
            "isetp64": sum("ISETP" in t and ".EX" in t for t in body),
            "ldg": sum(" LDG" in f" {t}" for t in body),
            "ldgsts": sum("LDGSTS" in t for t in body),
            "depbar": sum("DEPBAR" in t or "LDGDEPBAR" in t for t in body),
        })
    return found


# --------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------
V_DESIGN = 151936


def _logits(V: int, dtype=torch.bfloat16, rows: int = 2):
    # (B, T + 1, V) with the causal shift taken as a view, as a trainer calls it
    full = torch.randn(rows, 3, V).to(dtype)
    return full[:, :-1, :]


def _logprob_launches(V: int, dtype, entropy: bool) -> tuple[Launch, Launch]:
    logits = _logits(V, dtype).requires_grad_(False)
    leaf = logits.detach().clone().requires_grad_(True)
    labels = torch.randint(0, V, leaf.shape[:-1])
    with record_launches() as rec:
        out = rk.logprobs(leaf, labels, return_entropy=entropy)
        loss = out[0].sum() + out[1].sum() if entropy else out.sum()
        loss.backward()
    fwd = [r for r in rec if r.name == "_logprobs_fwd_kernel"]
    bwd = [r for r in rec if r.name == "_logprobs_bwd_kernel"]
    return fwd[0], bwd[0]


def _loop_row(case: str, launch: Launch, arch: int, dtype_bytes: int) -> dict:
    compiled = compile_sass(launch, arch)
    body = max(loops(compiled["sass"]), key=lambda lp: lp["instructions"], default=None)
    block_v = launch.constexpr("BLOCK_V")
    options = launch.options
    per_4kb = (None if body is None else
               body["instructions"] * options.num_warps * 4096 / (block_v * dtype_bytes))
    return {
        "case": case, "kernel": launch.name, "arch": f"sm_{arch}", "BLOCK_V": block_v,
        "num_warps": options.num_warps,
        # the loops' tl.range depth (NUM_STAGES); the kernels before it had only the option
        "num_stages": launch.constexpr("NUM_STAGES") if "NUM_STAGES" in launch.fn.arg_names
        else options.num_stages,
        "regs": compiled["regs"], "local_bytes": compiled["local"],
        "shared_bytes": compiled["shared"],
        "loop_instructions": None if body is None else body["instructions"],
        "instructions_per_4kb": per_4kb,
        "mufu": None if body is None else body["mufu"],
        "isetp64": None if body is None else body["isetp64"],
        "ldg": None if body is None else body["ldg"],
        "ldgsts": None if body is None else body["ldgsts"],
        "ptx_cp_async": compiled["ptx"].count("cp.async.ca") + compiled["ptx"].count(
            "cp.async.cg"),
        "ptx_ex2": compiled["ptx"].count("ex2.approx"),
        "ptx_ex2_ftz": compiled["ptx"].count("ex2.approx.ftz"),
    }


def sass_rows(arch: int = 90, V: int = V_DESIGN, stages: tuple[int, ...] = (1, 4)) -> list[dict]:
    """The logprobs loops at the launchers' configuration, with and without entropy; then the
    same at the default BLOCK_V / warps with the loops pipelined ``stages`` deep."""
    from rlhf_kernels.ops import logprobs as module

    rows = []
    for entropy in (False, True):
        fwd, bwd = _logprob_launches(V, torch.bfloat16, entropy)
        tag = f"bf16 V={V}" + (" +entropy" if entropy else "")
        rows.append(_loop_row(f"logprobs fwd {tag}", fwd, arch, 2))
        rows.append(_loop_row(f"logprobs bwd {tag}", bwd, arch, 2))
    default = module._launch_config
    for k in stages:
        module._launch_config = lambda v, entropy=False, k=k: default(v)[:2] + (k,)
        try:
            fwd, bwd = _logprob_launches(V, torch.bfloat16, False)
        finally:
            module._launch_config = default
        rows.append(_loop_row(f"logprobs fwd bf16 V={V} stages={k}", fwd, arch, 2))
        rows.append(_loop_row(f"logprobs bwd bf16 V={V} stages={k}", bwd, arch, 2))
    return rows


def _count(call) -> dict:
    host_overhead._NoLaunchKernel.launches = 0
    with host_overhead.host_only_launches():
        before = host_overhead._NoLaunchKernel.launches
        with host_overhead.TorchKernelOps() as mode:
            call()
        triton_launches = host_overhead._NoLaunchKernel.launches - before
    return {"triton_launches": triton_launches, "torch_kernel_ops": len(mode.ops),
            "launches": triton_launches + len(mode.ops)}


def launch_counts() -> list[dict]:
    """Launches per call (fwd+bwd) of the fused PPO ops, mocked, on small CPU shapes."""
    rows = []
    torch.manual_seed(0)
    B, T, V, H = 16, 8, 64, 16
    logits = torch.randn(B, T + 1, V)
    labels = torch.randint(0, V, (B, T))
    old = -torch.rand(B, T)
    adv = torch.randn(B, T)
    mask = torch.ones(B, T, dtype=torch.bool)

    def from_logits():
        leaf = logits.detach().requires_grad_(True)
        loss, _ = rk.ppo_loss_from_logits(leaf[:, :-1, :], labels, old, adv, mask)
        loss.backward()

    rows.append(dict(op="ppo_loss_from_logits", case=f"logits[:, :-1, :] of ({B}, {T + 1}, {V})"
                                                     " fp32, fwd+bwd", **_count(from_logits)))
    hidden = torch.randn(B, T, H)
    weight = torch.randn(V, H)
    for chunks in (1, 4):
        def linear(chunks=chunks):
            h = hidden.detach().requires_grad_(True)
            w = weight.detach().requires_grad_(True)
            loss, _ = rk.linear_ppo_loss(h, w, labels, old, adv, mask,
                                         chunk_size=B * T // chunks)
            loss.backward()

        counts = _count(linear)
        rows.append(dict(op="linear_ppo_loss", case=f"{B}x{T} tokens, H={H}, V={V} fp32, "
                                                   f"{chunks} chunk(s), fwd+bwd",
                         chunks=chunks, **counts))
    if len(rows) == 3:  # launches per chunk: the difference between 4 chunks and 1, over 3
        per_chunk = (rows[2]["launches"] - rows[1]["launches"]) / 3
        rows[1]["per_extra_chunk"] = rows[2]["per_extra_chunk"] = per_chunk
    return rows


def run(arch: int = 90) -> dict:
    return {"sass": sass_rows(arch), "launches": launch_counts()}


def markdown(result: dict) -> str:
    lines = ["| kernel (case) | BLOCK_V | warps | stages | regs | local B | shared B | "
             "loop instr | instr / 4 KB | MUFU | 64-bit ISETP | LDGSTS |",
             "|" + "---|" * 12]
    for r in result["sass"]:
        lines.append(f"| {r['case']} | {r['BLOCK_V']} | {r['num_warps']} | {r['num_stages']} | "
                     f"{r['regs']} | {r['local_bytes']} | {r['shared_bytes']} | "
                     f"{r['loop_instructions']} | "
                     f"{r['instructions_per_4kb']:.0f} | {r['mufu']} | {r['isetp64']} | "
                     f"{r['ldgsts']} |")
    lines += ["", "| op | case | Triton launches | torch kernel ops | launches |",
              "|---|---|---|---|---|"]
    for r in result["launches"]:
        lines.append(f"| {r['op']} | {r['case']} | {r['triton_launches']} | "
                     f"{r['torch_kernel_ops']} | {r['launches']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.static_sass",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="sm_<arch> target (default 90)")
    parser.add_argument("--json", type=Path, help="write the result here instead")
    parser.add_argument("--markdown", action="store_true", help="also print markdown tables")
    args = parser.parse_args(argv)
    host_overhead._check_compiled_mode()
    result = run(args.arch)
    print_table(result["sass"], columns=("case", "BLOCK_V", "num_warps", "num_stages", "regs",
                                         "local_bytes", "loop_instructions",
                                         "instructions_per_4kb", "mufu", "isetp64", "ldgsts"))
    print_table(result["launches"], columns=("op", "case", "triton_launches",
                                             "torch_kernel_ops", "launches"))
    if args.markdown:
        print(markdown(result))
    env = environment()
    path = args.json or (RESULTS_DIR / f"static_sass-sm{args.arch}-{env['date'][:10]}.json")
    # "rows" stays empty: these are not timings, and benchmarks.report tabulates rows
    path.write_text(json.dumps({"environment": env, "triton": triton.__version__,
                                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                                "rows": [], **result}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(main))
