"""group_advantages (GRPO / RLOO advantages from per-sequence scores), ours against eager PyTorch.

Cases: B = 1024 scores in 64 groups of 16, 4096 in 512 groups of 8 and 8192 in 512 groups of
16 (GRPO rollout batches), fp32 scores; each once with ``group_size`` (consecutive groups) and
once with ``group_ids`` (the same groups under shuffled int64 ids). Estimators: grpo with its
group std (the common case) and rloo with the batch std (the most work: every program also
sweeps all B scores). Peers:

* python loop: one group at a time, as veRL's compute_grpo_outcome_advantage walks its uid
  dictionary (written here: the ids go to the host once, each group's mean and std are torch
  ops on the device);
* eager: ``rlhf_kernels.reference.group_advantages`` (the ids renumbered by a sort, the group
  sums by ``index_add_``: a handful of launches, no host sync);
* eager view: the scores viewed as (prompts, group_size), mean / std along the row, as TRL's
  GRPO does (``group_size`` only, grpo only);
* torch.compile of the eager reference;
* ours (``backend="triton"``): one launch.

The floor: scores read once (4 B), ids read once (8 B, group_ids only), advantages written once
(4 B); a few tens of KB, so every implementation is launch-bound and the figure that matters is
the time of the whole call (the Python loop runs one set of launches per group).

``python -m benchmarks.bench_advantages [--smoke]``.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import Case, print_table, run_cases, save_results
from rlhf_kernels import reference
from rlhf_kernels.ops.advantages import group_advantages

CASES = [(1024, 16), (4096, 8), (8192, 16)]
SMOKE_CASES = [(12, 3)]
SETTINGS = [("grpo", "group"), ("rloo", "batch")]
EPS = 1e-6


def python_loop(scores, group_ids, estimator: str, norm: str, eps: float = EPS):
    """One group at a time (a veRL-style loop over the distinct ids), lone scores as in the
    contract (grpo: mean 0, std 1; rloo: 0)."""
    members: dict[int, list[int]] = {}
    for i, group in enumerate(group_ids.tolist()):
        members.setdefault(group, []).append(i)
    out = torch.empty_like(scores)
    batch_std = scores.std() if scores.numel() > 1 else torch.ones((), device=scores.device)
    for indices in members.values():
        index = torch.tensor(indices, device=scores.device)
        r = scores[index]
        n = len(indices)
        if n == 1:
            centred = r if estimator == "grpo" else torch.zeros_like(r)
            std = torch.ones((), device=scores.device)
        else:
            mean = r.mean()
            centred = r - mean if estimator == "grpo" else (r - mean) * (n / (n - 1))
            std = r.std()
        if norm == "group":
            centred = centred / (std + eps)
        elif norm == "batch":
            centred = centred / (batch_std + eps)
        out[index] = centred
    return out


def view_grpo(scores, group_size: int, eps: float = EPS):
    """TRL's GRPO form: rows of group_size, mean and unbiased std along the row."""
    grouped = scores.view(-1, group_size)
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + eps)).reshape(-1)


def _compiled(fn, args):
    """torch.compile(fn), its first call (the compilation) done here, in the case's setup."""
    compiled = torch.compile(fn)
    compiled(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return compiled


def _cases(B: int, G: int, estimator: str, norm: str, with_ids: bool, device,
           smoke: bool) -> list[Case]:
    def build():
        scores = torch.randn(B, device=device)
        ids = torch.randint(-2**62, 2**62, (B // G,), device=device).repeat_interleave(G)
        return scores, ids[torch.randperm(B, device=device)]

    def make_with(fn, compile_first: bool = False):
        def make():
            scores, ids = build()
            args = (scores, ids) if with_ids else (scores,)
            call = _compiled(fn, args) if compile_first else fn
            return lambda: call(*args)

        return make

    if with_ids:
        def eager(s, ids):
            return reference.group_advantages(s, group_ids=ids, estimator=estimator, norm=norm)

        def ours(s, ids):
            return group_advantages(s, group_ids=ids, estimator=estimator, norm=norm,
                                    backend="triton")

        def loop(s, ids):
            return python_loop(s, ids, estimator, norm)
    else:
        def eager(s):
            return reference.group_advantages(s, G, estimator=estimator, norm=norm)

        def ours(s):
            return group_advantages(s, G, estimator=estimator, norm=norm, backend="triton")

        def loop(s):
            return python_loop(s, torch.arange(B, device=s.device) // G, estimator, norm)

    peers = [("python loop", make_with(loop)), ("eager", make_with(eager))]
    if not with_ids and (estimator, norm) == ("grpo", "group"):
        peers.append(("eager view", make_with(lambda s: view_grpo(s, G))))
    if not smoke:
        peers.append(("torch.compile", make_with(eager, compile_first=True)))
    peers.append(("ours", make_with(ours)))
    groups = "group_ids" if with_ids else "group_size"
    case = f"B={B} G={G} {groups} {estimator}/{norm} fp32"
    floor_bytes = B * (4 + 4 + (8 if with_ids else 0))
    return [Case("group_advantages", case, impl, make, floor_bytes) for impl, make in peers]


def cases(smoke: bool = False) -> list[Case]:
    """Every (case, implementation) to time: the GPU shapes, or tiny CPU shapes (smoke)."""
    device = torch.device("cpu" if smoke else "cuda")
    result = []
    for B, G in SMOKE_CASES if smoke else CASES:
        for estimator, norm in SETTINGS:
            for with_ids in (False, True):
                result += _cases(B, G, estimator, norm, with_ids, device, smoke)
    return result


def run(smoke: bool = False) -> list[dict]:
    """Rows for the result table; ``smoke`` runs tiny shapes on the CPU in seconds."""
    if not smoke and not torch.cuda.is_available():
        raise RuntimeError("bench_advantages needs a CUDA device (use smoke=True on the CPU)")
    return run_cases(cases(smoke))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes, no result file")
    cli = parser.parse_args(argv)
    result = run(smoke=cli.smoke)
    print_table(result, smoke=cli.smoke)
    if not cli.smoke:
        print(f"wrote {save_results('advantages', result)}")
    return 0


if __name__ == "__main__":
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(main))
