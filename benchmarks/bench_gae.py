"""GAE (and the advantage whitening that follows it), the scan kernel against its peers.

Cases (docs/design.md §4): B=64 T=1024 and B=512 T=2048, fp32 rewards / values, a bool
right-padded mask with a few interior holes. Peers:

* python loop: the per-token loop PPO frameworks run (TRL / veRL style, written here): walk t from
  T-1 down to 0 with batch-wide tensor ops, carry next value and last advantage, skip masked
  positions, stack the columns at the end;
* eager: ``rlhf_kernels.reference.gae`` (the same recurrence, written into preallocated outputs);
* torch.compile of the eager reference (dynamo unrolls the T-step loop, so compilation takes a
  while; the compile time is reported as the case's ``setup_s``, and only T <= COMPILE_MAX_T is
  compiled);
* ours (``backend="triton"``): one launch, batch-parallel reverse scans; on a GPU also
  ``ours (CUDA graph)``: the call captured once and replayed, its GPU time without the host
  time per call (which bounds the plain call at these sizes).

masked_whiten over the same advantages: eager reference, torch.compile of it, ours.

The floor: rewards and values read once (4 B each), the mask once (1 B), advantages and returns
written once (4 B each): 17 B per token; ~35 MB at 512 x 2048, about 12 us on an H100. Whitening:
x and mask read once, output written once (9 B per token). Target: gae at 512 x 2048 <= 25 us
(the per-token Python loop: 107 ms on an H100).

``python -m benchmarks.bench_gae [--smoke]``.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import Case, cuda_graphed, print_table, run_cases, save_results
from rlhf_kernels import reference
from rlhf_kernels.ops.gae import gae
from rlhf_kernels.ops.whiten import masked_whiten

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
    """torch.compile(fn) with its first call (the compilation) done here, so that the case's
    ``setup_s`` is the compile time and the timed calls are warm."""
    compiled = torch.compile(fn)
    compiled(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return compiled


def _make(fn, build_args, compile_first: bool = False, graphed: bool = False):
    def make():
        args = build_args()
        call = _compiled(fn, args) if compile_first else fn
        step = lambda: call(*args)  # noqa: E731
        # graphed: captured once, the case times the replay (GPU work, no host time per call)
        return cuda_graphed(step) if graphed else step

    return make


def _eager_gae(r, v, m):
    return reference.gae(r, v, m, GAMMA, LAM)


def _gae_cases(B: int, T: int, device, smoke: bool) -> list[Case]:
    def build():
        return torch.randn(B, T, device=device), torch.randn(B, T, device=device), \
            _mask(B, T, device)

    floor_bytes = B * T * (4 + 4 + 1 + 4 + 4)
    peers = [
        ("python loop", _make(lambda r, v, m: python_loop_gae(r, v, m, GAMMA, LAM), build), {}),
        ("eager", _make(_eager_gae, build), {}),
    ]
    if not smoke and T <= COMPILE_MAX_T:
        peers.append(("torch.compile", _make(_eager_gae, build, compile_first=True), {}))
    target = None if smoke else GAE_TARGET_MS.get((B, T))
    ours = lambda r, v, m: gae(r, v, m, GAMMA, LAM, backend="triton")  # noqa: E731
    peers.append(("ours", _make(ours, build), {"target_ms": target}))
    if not smoke:
        peers.append(("ours (CUDA graph)", _make(ours, build, graphed=True), {}))
    return [Case("gae", f"{B}x{T} fp32", impl, make, floor_bytes, extra=extra)
            for impl, make, extra in peers]


def _whiten_cases(B: int, T: int, device, smoke: bool) -> list[Case]:
    def build():
        return torch.randn(B, T, device=device), _mask(B, T, device)

    eager = lambda x, m: reference.masked_whiten(x, m)  # noqa: E731
    peers = [("eager", _make(eager, build))]
    if not smoke:
        peers.append(("torch.compile", _make(eager, build, compile_first=True)))
    peers.append(("ours", _make(lambda x, m: masked_whiten(x, m, backend="triton"), build)))
    return [Case("masked_whiten", f"{B}x{T} fp32", impl, make, B * T * (4 + 1 + 4))
            for impl, make in peers]


def cases(smoke: bool = False) -> list[Case]:
    """Every (case, implementation) to time: the GPU shapes, or tiny CPU shapes (smoke)."""
    device = torch.device("cpu" if smoke else "cuda")
    result = []
    for B, T in SMOKE_CASES if smoke else CASES:
        result += _gae_cases(B, T, device, smoke)
        result += _whiten_cases(B, T, device, smoke)
    return result


def run(smoke: bool = False) -> list[dict]:
    """Rows for the result table; ``smoke`` runs tiny shapes on the CPU in seconds."""
    if not smoke and not torch.cuda.is_available():
        raise RuntimeError("bench_gae needs a CUDA device (use smoke=True on the CPU)")
    return run_cases(cases(smoke))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes, no result file")
    cli = parser.parse_args(argv)
    result = run(smoke=cli.smoke)
    print_table(result, columns=("op", "case", "impl", "ms", "gb_per_s", "pct_of_floor",
                                 "peak_extra_mib", "target_ms", "setup_s"), smoke=cli.smoke)
    if not cli.smoke:
        print(f"wrote {save_results('gae', result)}")
    return 0


if __name__ == "__main__":
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(main))
