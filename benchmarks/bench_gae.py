"""GAE (and the advantage whitening that follows it), the scan kernel against its peers.

Cases (DESIGN.md section 4): B=64 T=1024 and B=512 T=2048, fp32 rewards / values, a bool
right-padded mask with a few interior holes. Peers:

* python loop: the per-token loop PPO frameworks run (TRL / veRL style, written here): walk t from
  T-1 down to 0 with batch-wide tensor ops, carry next value and last advantage, skip masked
  positions, stack the columns at the end;
* eager: ``rlhf_kernels.reference.gae`` (the same recurrence, written into preallocated outputs);
* torch.compile of the eager reference (dynamo unrolls the T-step loop, so compilation takes a
  while; the compile time is reported, and only T <= COMPILE_MAX_T is compiled);
* ours (``backend="triton"``): one launch, batch-parallel reverse scans.

masked_whiten over the same advantages: eager reference, torch.compile of it, ours.

The floor: rewards and values read once (4 B each), the mask once (1 B), advantages and returns
written once (4 B each): 17 B per token; ~35 MB at 512 x 2048, about 12 us on an H100. Whitening:
x and mask read once, output written once (9 B per token). Target: gae at 512 x 2048 <= 25 us
(the per-token Python loop: 107 ms on an H100).

``python -m benchmarks.bench_gae [--smoke]``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    # Smoke mode on a CPU machine runs our kernels under the Triton interpreter; this must be set
    # before rlhf_kernels' op modules define their @triton.jit functions.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.common import (  # noqa: E402
    peak_extra_mib,
    print_table,
    result_row,
    save_results,
    time_ms,
)
from rlhf_kernels import reference  # noqa: E402
from rlhf_kernels.ops.gae import gae  # noqa: E402
from rlhf_kernels.ops.whiten import masked_whiten  # noqa: E402

CASES = [(64, 1024), (512, 2048)]
SMOKE_CASES = [(3, 33)]
GAE_TARGET_MS = {(512, 2048): 0.025}  # issue 2, on an H100
COMPILE_MAX_T = 1024
GAMMA, LAM = 1.0, 0.95


def python_loop_gae(rewards, values, mask, gamma: float, lam: float):
    """The per-token loop of PPO trainers (TRL / veRL style), masked positions skipped."""
    mask = mask.to(rewards.dtype)
    T = rewards.shape[-1]
    next_value = torch.zeros_like(rewards[:, 0])
    last_adv = torch.zeros_like(rewards[:, 0])
    columns = []
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * last_adv
        next_value = m * values[:, t] + (1 - m) * next_value
        last_adv = m * adv + (1 - m) * last_adv
        columns.append(adv * m)
    advantages = torch.stack(columns[::-1], dim=1)
    return advantages, (advantages + values) * mask


def _mask(B: int, T: int, device) -> torch.Tensor:
    lengths = torch.randint(T // 2, T + 1, (B,), device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    return mask & (torch.rand(B, T, device=device) > 0.02)


def _compiled(fn, args):
    """torch.compile(fn) with its first call (the compilation) done here; (fn, seconds)."""
    compiled = torch.compile(fn)
    t0 = time.perf_counter()
    compiled(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return compiled, time.perf_counter() - t0


def _gae_rows(B: int, T: int, device, smoke: bool) -> list[dict]:
    n = B * T
    rewards = torch.randn(B, T, device=device)
    values = torch.randn(B, T, device=device)
    mask = _mask(B, T, device)
    args = (rewards, values, mask)
    case = f"{B}x{T} fp32"
    floor_bytes = n * (4 + 4 + 1 + 4 + 4)
    peers = [
        ("python loop", lambda r, v, m: python_loop_gae(r, v, m, GAMMA, LAM), {}),
        ("eager", lambda r, v, m: reference.gae(r, v, m, GAMMA, LAM), {}),
    ]
    if not smoke and T <= COMPILE_MAX_T:
        fn, seconds = _compiled(lambda r, v, m: reference.gae(r, v, m, GAMMA, LAM), args)
        peers.append(("torch.compile", fn, {"compile_s": round(seconds, 1)}))
    target = None if smoke else GAE_TARGET_MS.get((B, T))
    peers.append(("ours", lambda r, v, m: gae(r, v, m, GAMMA, LAM, backend="triton"),
                  {"target_ms": target}))
    rows = []
    for impl, fn, extra in peers:
        step = lambda fn=fn: fn(*args)  # noqa: E731
        rows.append(result_row("gae", case, impl, time_ms(step), floor_bytes,
                               peak_extra_mib(step), **extra))
    return rows


def _whiten_rows(B: int, T: int, device, smoke: bool) -> list[dict]:
    x = torch.randn(B, T, device=device)
    mask = _mask(B, T, device)
    args = (x, mask)
    peers = [("eager", lambda x, m: reference.masked_whiten(x, m), {})]
    if not smoke:
        fn, seconds = _compiled(lambda x, m: reference.masked_whiten(x, m), args)
        peers.append(("torch.compile", fn, {"compile_s": round(seconds, 1)}))
    peers.append(("ours", lambda x, m: masked_whiten(x, m, backend="triton"), {}))
    rows = []
    for impl, fn, extra in peers:
        step = lambda fn=fn: fn(*args)  # noqa: E731
        rows.append(result_row("masked_whiten", f"{B}x{T} fp32", impl, time_ms(step),
                               B * T * (4 + 1 + 4), peak_extra_mib(step), **extra))
    return rows


def run(smoke: bool = False) -> list[dict]:
    """Rows for the result table; ``smoke`` runs tiny shapes on the CPU in seconds."""
    if smoke:
        device = torch.device("cpu")
        cases = SMOKE_CASES
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("bench_gae needs a CUDA device (use smoke=True on the CPU)")
        device = torch.device("cuda")
        cases = CASES
    rows = []
    for B, T in cases:
        rows += _gae_rows(B, T, device, smoke)
        rows += _whiten_rows(B, T, device, smoke)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes, no result file")
    cli = parser.parse_args()
    result = run(smoke=cli.smoke)
    print_table(result, columns=("op", "case", "impl", "ms", "gb_per_s", "pct_of_floor",
                                 "peak_extra_mib", "target_ms", "compile_s"))
    if not cli.smoke:
        print(f"wrote {save_results('gae', result)}")
