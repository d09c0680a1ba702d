"""Packed sequences against padding (rlhf/packing.py) at a variable-length RL batch.

A small Llama-shaped model (hidden 256, 4 layers, 8 heads / 4 key-value heads, MLP 704,
vocabulary 8192, LoRA rank 16 on every linear: the shared backbone), fp32, batch 16 of a
32-token prompt and a response of uniformly 16-256 tokens (left-padded prompts, right-padded
responses, as the RL stage scores them). Two phases of one RL iteration:

* ``scoring``: reference log-probs, values and rewards without autograd (``make_rollout``'s
  three forwards);
* ``update``: the policy's log-probs and the critic's values, forward and backward (train
  mode, the adapters trainable).

Implementations: ``padded`` (the (B, T) batch with its attention mask), ``ours packed (bins)``
(first-fit-decreasing rows of the longest sequence's width, SDPA with transformers'
block-diagonal mask: the CPU / no-flash-attn path) and ``ours packed (flat, per-sequence
SDPA)`` (the flash-attn layout, one (1, N) row, whose attention without flash-attn runs SDPA
sequence by sequence). On the CPU (``python -m benchmarks.bench_packing``), per phase: one
process times every implementation, their calls interleaved (so that a shared machine's load
falls on all of them alike), ``--repeats`` calls each after a warm-up: ``ms`` is the fastest
call (the least disturbed by other processes; ``ms_median`` beside it), ``tokens_per_s`` real
tokens x forwards over it, and ``speedup_vs_padded`` the median over the rounds of the two
times in the same round (``summarize``); then each implementation runs once more in a process
of its own for its peak resident memory (VmHWM, reset through ``/proc/self/clear_refs`` after
a warm-up) above the resident memory before the call; glibc's mmap threshold is fixed at
64 KiB so freed tensors leave the RSS. One torch thread, the kernels' PyTorch reference
backend (what the trainer runs on a CPU without the native kernels: its log-probs are computed
in float64 from (N, V) logits, so the lm_head's share of the time is larger than a GPU's). Writes
``benchmarks/results/packing-cpu-<date>.json``.

``cases(smoke)`` / ``run(smoke)`` are the harness's protocol (``python -m benchmarks``): the
same phases on the GPU (``ms`` and ``peak_extra_mib`` from the CUDA allocator), tiny shapes
with ``--smoke`` (on the CPU, with the kernels' reference).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from benchmarks.common import Case, print_table, proc_status_kib, run_cases, save_results

MODEL = dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
             intermediate_size=704, max_position_embeddings=512)
SMOKE_MODEL = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=64, max_position_embeddings=128)
BATCH, PROMPT, RESPONSE = 16, 32, (16, 256)
SMOKE_BATCH, SMOKE_PROMPT, SMOKE_RESPONSE = 4, 4, (2, 12)
IMPLS = ("padded", "ours packed (bins)", "ours packed (flat, per-sequence SDPA)")
PHASES = ("scoring", "update")
_RESULT = "RESULT "


def make_batch(batch: int, prompt: int, response: tuple[int, int], vocab: int, seed: int = 0,
               device: str = "cpu"):
    """(ids, mask) (B, prompt + max response): left-padded prompts of 1..prompt tokens (most
    full), right-padded responses of uniformly response[0]..response[1] tokens."""
    gen = torch.Generator().manual_seed(seed)
    prompt_lengths = torch.randint(max(1, prompt * 3 // 4), prompt + 1, (batch,), generator=gen)
    response_lengths = torch.randint(response[0], response[1] + 1, (batch,), generator=gen)
    width = prompt + int(response_lengths.max())
    ids = torch.randint(3, vocab, (batch, width), generator=gen)
    columns = torch.arange(width)
    real = (columns >= prompt - prompt_lengths[:, None]) & \
        (columns < prompt + response_lengths[:, None])
    ids = torch.where(real, ids, 0)
    return ids.to(device), real.long().to(device)


def make_backbone(smoke: bool, device: str = "cpu"):
    from rlhf.models import LoraSpec, SharedBackbone
    from rlhf.tiny_models import tiny_causal_lm

    shape = dict(SMOKE_MODEL if smoke else MODEL)
    vocab = shape.pop("vocab_size")
    backbone = SharedBackbone.from_model(tiny_causal_lm("llama", vocab_size=vocab, **shape),
                                         lora=LoraSpec(rank=4 if smoke else 16, alpha=32))
    return backbone.to(device)


def _step(backbone, ids, mask, impl: str, phase: str):
    """The phase's call for ``impl`` (packing set on the backbone; the flat layout forced)."""
    from rlhf import packing

    flat = impl.startswith("ours packed (flat")
    start = PROMPT - 1 if ids.shape[1] > PROMPT else 0
    scored = mask[:, 1:].float()

    def scoring():
        with torch.no_grad():
            backbone.reference_logprobs(ids, mask, start=start)
            backbone.values(ids, mask)
            backbone.rewards(ids, mask)

    def update():
        loss = -(backbone.token_logprobs(ids, mask, "policy") * scored).sum() \
            + backbone.values(ids, mask).square().mul(mask).sum()
        loss.backward()
        backbone.zero_grad(set_to_none=True)

    def step():
        # the flat (flash-attn) layout is forced for this call only: impls alternate in a process
        original = packing.uses_flash
        if flat:
            packing.uses_flash = lambda causal_lm, device: True
        backbone.set_packing("off" if impl == "padded" else "on")
        backbone.train(phase == "update")
        backbone.set_trainable(["policy", "critic"])
        try:
            (scoring if phase == "scoring" else update)()
        finally:
            packing.uses_flash = original

    return step


def _with_reference_kernels(step):
    """``step`` on the kernels' PyTorch reference (the CPU measurement's backend; under the
    Triton interpreter a smoke run would take minutes)."""
    from rlhf_kernels.backend import ENV_VAR

    def on_reference():
        previous = os.environ.get(ENV_VAR)
        os.environ[ENV_VAR] = "reference"
        try:
            return step()
        finally:
            if previous is None:
                os.environ.pop(ENV_VAR)
            else:
                os.environ[ENV_VAR] = previous

    return on_reference


def cases(smoke: bool = False) -> list[Case]:
    """The harness's cases: each phase for each implementation on the default device."""
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    shape = (SMOKE_BATCH, SMOKE_PROMPT, SMOKE_RESPONSE) if smoke else (BATCH, PROMPT, RESPONSE)
    vocab = (SMOKE_MODEL if smoke else MODEL)["vocab_size"]
    hidden, layers = (SMOKE_MODEL if smoke else MODEL)["hidden_size"], \
        (SMOKE_MODEL if smoke else MODEL)["num_layers"]
    real_tokens = int(make_batch(*shape, vocab)[1].sum())
    # useful work: 2 flops per weight per real token (layers ~ 12 H^2, the lm_head V H)
    flops = 2.0 * real_tokens * (12 * hidden * hidden * layers + vocab * hidden)
    out = []
    for phase in PHASES:
        for impl in IMPLS:
            def make(impl=impl, phase=phase):
                backbone = make_backbone(smoke, device)
                ids, mask = make_batch(*shape, vocab, device=device)
                step = _step(backbone, ids, mask, impl, phase)
                return step if device == "cuda" else _with_reference_kernels(step)

            case = f"{phase} B={shape[0]} prompt {shape[1]} response {shape[2][0]}-{shape[2][1]}"
            out.append(Case("packing", case, impl, make,
                            flops=flops * (1 if phase == "scoring" else 3)))
    return out


def run(smoke: bool = False) -> list[dict]:
    return run_cases(cases(smoke))


# --------------------------------------------------------------------------------------------
# the CPU measurement: one process per (implementation, phase)
# --------------------------------------------------------------------------------------------


def _setup(smoke: bool):
    torch.set_num_threads(1)
    shape = (SMOKE_BATCH, SMOKE_PROMPT, SMOKE_RESPONSE) if smoke else (BATCH, PROMPT, RESPONSE)
    vocab = (SMOKE_MODEL if smoke else MODEL)["vocab_size"]
    backbone = make_backbone(smoke)
    ids, mask = make_batch(*shape, vocab)
    case = f"B={shape[0]} prompt {shape[1]} response {shape[2][0]}-{shape[2][1]}"
    return backbone, ids, mask, case


def _child_time(phase: str, repeats: int, smoke: bool) -> None:
    """Every implementation of ``phase`` in this one process, the calls interleaved (padded,
    bins, flat, padded, ...): on a shared machine the load then falls on all of them alike."""
    backbone, ids, mask, case = _setup(smoke)
    steps = {impl: _step(backbone, ids, mask, impl, phase) for impl in IMPLS}
    seconds: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    tokens = {}
    forwards = 3 if phase == "scoring" else 2
    for impl in IMPLS:  # warm-up, and one call's token counts
        backbone.packing.take_stats()
        steps[impl]()
        stats = backbone.packing.take_stats()
        tokens[impl] = {key: stats[key] // forwards
                        for key in ("tokens_real", "tokens_padded", "tokens_processed")}
    for _ in range(repeats):
        for impl in IMPLS:
            started = time.perf_counter()
            steps[impl]()
            seconds[impl].append(time.perf_counter() - started)
    for impl in IMPLS:
        row = {"op": "packing", "case": f"{phase} {case}", "impl": impl,
               "forwards_per_call": forwards, **tokens[impl], "repeats": repeats,
               "times_s": seconds[impl]}
        print(_RESULT + json.dumps(row), flush=True)


def _child_memory(impl: str, phase: str, smoke: bool) -> None:
    """Peak resident memory of one call of ``impl`` (after a warm-up) above the RSS before it."""
    import gc

    backbone, ids, mask, _ = _setup(smoke)
    step = _step(backbone, ids, mask, impl, phase)
    step()
    gc.collect()
    start_kib = proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    print(_RESULT + json.dumps({"peak_rss_mib": (proc_status_kib("VmHWM") - start_kib) / 1024}),
          flush=True)


def _run_child(args: list[str], smoke: bool) -> list[dict]:
    env = {**os.environ, "RLHF_KERNELS_BACKEND": "reference", "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", "benchmarks.bench_packing", *args] + \
        (["--smoke"] if smoke else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [line for line in done.stdout.splitlines() if line.startswith(_RESULT)]
    if done.returncode or not lines:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line[len(_RESULT):]) for line in lines]


def measure_cpu(repeats: int, smoke: bool) -> list[dict]:
    rows = []
    for phase in PHASES:
        timed = _run_child(["--child-time", phase, "--repeats", str(repeats)], smoke)
        for row in timed:
            row.update(_run_child(["--child-memory", row["impl"], phase], smoke)[0])
        for row in summarize(timed):
            print(f"{phase:8s} {row['impl']:40s} {row['ms']:9.1f} ms "
                  f"{row['tokens_per_s']:8.0f} tok/s  peak {row['peak_rss_mib']:7.1f} MiB",
                  flush=True)
        rows += timed
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per phase, against its padded row: ``speedup_vs_padded``, the median over the rounds of
    padded time / this time in the same round (the calls are interleaved, so a round's load
    falls on both alike; a shared machine's load moves the medians of the times themselves),
    ``ms`` and ``tokens_per_s`` of the fastest call (the least disturbed by other processes;
    ``ms_median`` beside it) and ``memory_vs_padded``."""
    for row in rows:
        padded = next(r for r in rows if r["impl"] == "padded"
                      and r["case"].split()[0] == row["case"].split()[0])
        ratios = sorted(a / b for a, b in zip(padded["times_s"], row["times_s"]))
        row["speedup_vs_padded"] = ratios[len(ratios) // 2]
        times = sorted(row["times_s"])
        row["ms"] = times[0] * 1e3
        row["ms_median"] = times[len(times) // 2] * 1e3
        row["tokens_per_s"] = row["tokens_real"] * row["forwards_per_call"] / times[0]
        row["memory_vs_padded"] = row["peak_rss_mib"] / max(padded["peak_rss_mib"], 1e-9)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_packing",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: the script runs")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--child-time", metavar="PHASE", help=argparse.SUPPRESS)
    parser.add_argument("--child-memory", nargs=2, metavar=("IMPL", "PHASE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_time:
        _child_time(args.child_time, args.repeats, args.smoke)
        return 0
    if args.child_memory:
        _child_memory(*args.child_memory, args.smoke)
        return 0
    rows = measure_cpu(args.repeats, args.smoke)
    print_table(rows, columns=("case", "impl", "ms", "ms_median", "tokens_per_s", "peak_rss_mib",
                               "tokens_real", "tokens_processed", "tokens_padded",
                               "speedup_vs_padded"))
    if not args.smoke and not args.no_save:
        print("wrote", save_results("packing", rows))
    return 0


if __name__ == "__main__":
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(main))
