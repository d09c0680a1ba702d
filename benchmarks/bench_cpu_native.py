"""The native CPU kernels (csrc/cpu) beside eager PyTorch and torch.compile, on 2 threads.

Cases (issue 15):

* logprobs forward + backward (a random upstream gradient on logp; d logits in the logits'
  dtype), fp32 and bf16 logits at 4096 x 32000 and 2048 x 151936. Peers: eager
  ``logits.float().log_softmax(-1).gather(...)`` (what most RLHF code writes; it holds (N, V)
  fp32 log-probabilities and a (N, V) gradient of them), the same function under
  ``torch.compile`` (inductor), and ours (``backend="native"``).
* GAE 512 x 2048 with a padding mask: the per-token loop (``rlhf_kernels.reference.gae``, the
  textbook loop over T in PyTorch ops) against ours. torch.compile of a 2048-step Python loop
  is not a peer anyone runs (it unrolls the loop), so it is left out.
* linear_logprobs forward + backward, H = 896 (Qwen2.5-0.5B) and V = 32000, fp32, for 256,
  1024 and 4096 tokens: ours (chunked, 64 MiB of logits per chunk: 512 rows) against eager
  ``(hidden @ W.T).log_softmax(-1).gather(...)``, to show peak memory flat in tokens (one call
  each, no warm-up: the figure is the memory; the time is the matmuls').

Every case runs in its own process (``--one``): its inputs are made once, each implementation
is called once (compilation included), then ``--repeats`` rounds call the implementations in
turn (interleaved, so that a change in a shared machine's load hits all of them alike); before
each call the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``). ``ms`` is the
median and ``peak_extra_mib`` the largest peak resident memory above the inputs during a call
(what the step allocates: (N, V) intermediates show up here, and so does the gradient it
returns). ``ms_min`` is the fastest call and ``cpu_ms`` the median process CPU time (all
threads): on a shared machine a preemption lands in the wall time of a call but not in its CPU
time, and the minimum is the call that escaped them.

``python -m benchmarks.bench_cpu_native [--smoke] [--repeats 5] [--only gae]``; results JSON goes to
benchmarks/results/bench_cpu_native-cpu-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

THREADS = 2

LOGPROB_CASES = [(4096, 32000), (2048, 151936)]
LINEAR_TOKENS = [256, 1024, 4096]
LINEAR_HV = (896, 32000)
GAE_SHAPE = (512, 2048)
SMOKE = dict(logprobs=[(64, 1000)], linear=[16, 64], linear_hv=(32, 2000), gae=(8, 64))


def _status_mib(key: str) -> float:
    text = open("/proc/self/status").read()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1)) / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _make_steps(spec: dict) -> dict:
    """{impl: step} for one case; the inputs are shared (made once, in the measuring process)."""
    import torch

    from rlhf_kernels import gae, linear_logprobs, logprobs, reference

    torch.manual_seed(0)
    kind = spec["kind"]
    if kind == "logprobs":
        n, v = spec["shape"]
        dtype = getattr(torch, spec["dtype"])
        logits = (torch.randn(n, v) * 2).to(dtype).requires_grad_(True)
        labels = torch.randint(0, v, (n,))
        grad = torch.randn(n)

        def eager(x, y):
            return x.float().log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)

        def ours(x, y):
            return logprobs(x, y)  # RLHF_KERNELS_BACKEND=native

        def step_of(fn):
            def step():
                (dx,) = torch.autograd.grad(fn(logits, labels), logits, grad)
                return dx
            return step

        return {"eager": step_of(eager), "torch.compile": step_of(torch.compile(eager)),
                "ours (native)": step_of(ours)}
    if kind == "gae":
        rows, t = spec["shape"]
        rewards, values = torch.randn(rows, t), torch.randn(rows, t)
        lengths = torch.randint(t // 4, t + 1, (rows,))
        mask = torch.arange(t)[None, :] < lengths[:, None]
        return {"per-token loop (reference)":
                lambda: reference.gae(rewards, values, mask, 1.0, 0.95),
                "ours (native)": lambda: gae(rewards, values, mask, 1.0, 0.95)}
    if kind == "linear_logprobs":
        n = spec["tokens"]
        h_dim, v = spec["hv"]
        hidden = torch.randn(n, h_dim, requires_grad=True)
        weight = (torch.randn(v, h_dim) * h_dim ** -0.5).requires_grad_(True)
        labels = torch.randint(0, v, (n,))
        grad = torch.randn(n)

        def eager():
            logits = hidden @ weight.t()
            return logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)

        def ours():
            return linear_logprobs(hidden, weight, labels)  # native (env)

        steps = {"ours (native)": lambda: torch.autograd.grad(ours(), (hidden, weight), grad)}
        if spec["with_eager"]:
            steps["eager"] = lambda: torch.autograd.grad(eager(), (hidden, weight), grad)
        return steps
    raise ValueError(kind)


def run_one(spec: dict) -> dict:
    """Measure every implementation of one case in this process (``--one``), interleaved: each
    is warmed up once (compilation included), then the rounds run them in turn, so a change in
    the machine's load hits all of them alike."""
    import torch

    torch.set_num_threads(THREADS)
    from rlhf_kernels import _native

    if not _native.available():
        return {"error": f"native kernels unavailable: {_native.failure_reason()}"}
    steps = _make_steps(spec)
    result = {impl: {"ms_samples": [], "cpu_ms_samples": [], "peak_extra_mib": 0.0}
              for impl in steps}
    for impl, step in steps.items():
        if not spec.get("warmup", True):
            break
        started = time.perf_counter()
        step()
        result[impl]["first_call_s"] = time.perf_counter() - started
    for _ in range(spec["repeats"]):
        for impl, step in steps.items():
            base = _status_mib("VmRSS")
            _reset_peak()
            t0, c0 = time.perf_counter(), time.process_time()
            out = step()
            result[impl]["ms_samples"].append((time.perf_counter() - t0) * 1e3)
            result[impl]["cpu_ms_samples"].append((time.process_time() - c0) * 1e3)
            result[impl]["peak_extra_mib"] = max(result[impl]["peak_extra_mib"],
                                                 _status_mib("VmHWM") - base)
            del out
    for impl in steps:
        result[impl]["ms"] = statistics.median(result[impl]["ms_samples"])
        result[impl]["ms_min"] = min(result[impl]["ms_samples"])
        result[impl]["cpu_ms"] = statistics.median(result[impl]["cpu_ms_samples"])
    return result


def _spawn(spec: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # ours: the native kernels through the public route (the variable also holds under the
    # Triton interpreter, which importing benchmarks turns on for CPU smoke runs)
    env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS),
               RLHF_KERNELS_BACKEND="native")
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_cpu_native", "--one",
                           json.dumps(spec)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def specs(smoke: bool, repeats: int) -> list[dict]:
    out = []
    shapes = SMOKE["logprobs"] if smoke else LOGPROB_CASES
    for dtype in ("float32", "bfloat16"):
        for shape in shapes:
            out.append(dict(kind="logprobs", op="logprobs fwd+bwd",
                            case=f"{dtype} {shape[0]}x{shape[1]}", shape=shape, dtype=dtype,
                            repeats=repeats))
    gae_shape = SMOKE["gae"] if smoke else GAE_SHAPE
    # milliseconds per call: more rounds, so that the minimum escapes the shared machine's
    # preemptions (a time slice of another process is longer than the native call)
    out.append(dict(kind="gae", op="gae", case=f"{gae_shape[0]}x{gae_shape[1]} masked",
                    shape=gae_shape, repeats=max(repeats, 21)))
    hv = SMOKE["linear_hv"] if smoke else LINEAR_HV
    tokens = SMOKE["linear"] if smoke else LINEAR_TOKENS
    for n in tokens:
        out.append(dict(kind="linear_logprobs", op="linear_logprobs fwd+bwd",
                        case=f"fp32 N={n} H={hv[0]} V={hv[1]}", tokens=n, hv=hv,
                        with_eager=True, warmup=smoke, repeats=1 if not smoke else repeats))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, nothing saved")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", action="append", default=None, metavar="OP",
                        help="run only the cases of this op (logprobs, gae, linear_logprobs); "
                             "repeatable")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    from benchmarks.common import print_table, save_results

    rows = []
    for spec in specs(args.smoke, args.repeats):
        if args.only and spec["kind"] not in args.only:
            continue
        result = _spawn(spec)
        per_impl = {"-": result} if "error" in result else result
        for impl, measured in per_impl.items():
            row = {"op": spec["op"], "kind": spec["kind"], "case": spec["case"], "impl": impl,
                   "threads": THREADS,
                   "repeats": spec["repeats"], **measured}
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("op", "case", "impl", "ms",
                                                       "peak_extra_mib", "error")}), flush=True)
    _add_speedups(rows)
    print_table(rows, columns=("op", "case", "impl", "ms", "ms_min", "cpu_ms",
                               "speedup_vs_eager", "speedup_min", "speedup_cpu",
                               "peak_extra_mib"), smoke=args.smoke)
    if not args.smoke:
        if args.only:
            rows = _kept_rows(args.only) + rows
        print(f"saved {save_results('bench_cpu_native', rows)}")


_OP_KINDS = {"logprobs fwd+bwd": "logprobs", "gae": "gae",
             "linear_logprobs fwd+bwd": "linear_logprobs"}


def _kept_rows(only: list[str]) -> list[dict]:
    """With --only: the rows of the other ops from today's results file, each marked with the
    date and commit it was measured at (the file's environment), so a partial rerun does not
    drop them."""
    from benchmarks.common import RESULTS_DIR, environment

    env = environment()
    path = RESULTS_DIR / f"bench_cpu_native-{env['device']}-{env['date'][:10]}.json"
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    kept = []
    for row in old["rows"]:
        if row.get("kind", _OP_KINDS.get(row["op"])) in only:
            continue
        row.setdefault("measured_at", old["environment"]["date"])
        row.setdefault("measured_git_sha", old["environment"]["git_sha"])
        kept.append(row)
    return kept


def _add_speedups(rows: list[dict]) -> None:
    """speedup_vs_eager (medians), speedup_min (minima) and speedup_cpu (process CPU time): the
    eager (or per-token loop) row's figure over this row's, per case."""
    base = {}
    for row in rows:
        if row["impl"] in ("eager", "per-token loop (reference)") and row.get("ms"):
            base[(row["op"], row["case"])] = row
    for row in rows:
        ref = base.get((row["op"], row["case"]))
        if ref is None or not row.get("ms"):
            continue
        row["speedup_vs_eager"] = ref["ms"] / row["ms"]
        for key, name in (("ms_min", "speedup_min"), ("cpu_ms", "speedup_cpu")):
            if ref.get(key) and row.get(key):
                row[name] = ref[key] / row[key]


if __name__ == "__main__":
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(main))
