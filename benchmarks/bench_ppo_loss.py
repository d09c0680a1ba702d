"""PPO policy / value losses and the Bradley-Terry loss, fused kernels against their peers.

Cases (docs/design.md §4): 64K tokens (64 x 1024) and 1M tokens (512 x 2048), fp32 log-probs /
values (what the logprob op and the value head produce), fp32 advantages / returns, a bool
right-padded mask; forward + backward (the gradient of the loss with respect to logp / values,
a random upstream gradient) and the forward alone. Bradley-Terry on 64K and 1M pairs. Peers:

* eager: the reference formula (``rlhf_kernels.reference``) run on the GPU in fp32;
* torch.compile of that formula;
* ours (``backend="triton"``), for the policy loss also with seq-mean-token-mean (one more pass
  over the mask) and with the dual clip;
* on a GPU, ``eager (CUDA graph)`` and ``ours (CUDA graph)``: the policy loss fwd+bwd step
  captured once and replayed (``benchmarks.common.cuda_graphed``), i.e. its GPU work without the
  host time per call, which is what bounds the plain calls at these sizes.

The floor: every input read once and the gradient written once (policy: 3 x 4 B + 1 B mask in,
4 B out per token; the forward alone: the 13 B in). At 64K tokens that is ~1 MB, well under a
microsecond of bandwidth, so these ops are launch-bound: the figure that matters is ms against
the 0.05 ms target for the policy loss fwd+bwd on 64K tokens (eager: 0.70 ms on an H100).

``python -m benchmarks.bench_ppo_loss [--smoke]``.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import Case, cuda_graphed, print_table, run_cases, save_results
from rlhf_kernels import reference
from rlhf_kernels.ops.bradley_terry import bradley_terry_loss
from rlhf_kernels.ops.policy_loss import ppo_policy_loss
from rlhf_kernels.ops.value_loss import ppo_value_loss

CASES = [(64, 1024), (512, 2048)]
SMOKE_CASES = [(3, 33)]
POLICY_TARGET_MS = {(64, 1024): 0.05}  # issue 2: 64K tokens fwd+bwd on an H100


def _right_padded_mask(B: int, T: int, device) -> torch.Tensor:
    lengths = torch.randint(T // 2, T + 1, (B,), device=device)
    return torch.arange(T, device=device)[None, :] < lengths[:, None]


def _fwd_bwd(loss_fn, inputs, wrt: tuple[int, ...], grad: torch.Tensor):
    def step():
        loss, _ = loss_fn(*inputs)
        return torch.autograd.grad(loss, [inputs[i] for i in wrt], grad)

    return step


def _fwd(loss_fn, inputs):
    def step():
        with torch.no_grad():
            return loss_fn(*inputs)

    return step


def _peers(eager, ours, smoke: bool, extra_ours=()) -> list[tuple[str, object]]:
    """(impl, get_fn) pairs; ``get_fn()`` runs in ``make``, so torch.compile happens there."""
    peers = [("eager", lambda: eager)]
    if not smoke:
        peers.append(("torch.compile", lambda: torch.compile(eager)))
    peers.append(("ours", lambda: ours))
    peers.extend((impl, lambda fn=fn: fn) for impl, fn in extra_ours)
    return peers


def _make(get_fn, build_inputs, wrt: tuple[int, ...] | None, graphed: bool = False):
    """``make`` for one case: fresh inputs, then the fwd+bwd step (``wrt`` given) or fwd alone;
    ``graphed``: that step captured in a CUDA graph, the case times its replay."""
    def make():
        fn = get_fn()
        inputs, grad = build_inputs()
        step = _fwd(fn, inputs) if wrt is None else _fwd_bwd(fn, inputs, wrt, grad)
        return cuda_graphed(step) if graphed else step

    return make


def _policy_cases(B: int, T: int, device, smoke: bool) -> list[Case]:
    n = B * T

    def build():
        logp = (-3 * torch.rand(B, T, device=device)).requires_grad_()
        old_logp = logp.detach() + 0.3 * torch.randn(B, T, device=device)
        advantages = torch.randn(B, T, device=device)
        mask = _right_padded_mask(B, T, device)
        return (logp, old_logp, advantages, mask), torch.randn((), device=device)

    case = f"{B}x{T} fp32"
    target = POLICY_TARGET_MS.get((B, T)) if not smoke else None
    eager = lambda *a: reference.ppo_policy_loss(*a)  # noqa: E731
    ours = lambda *a: ppo_policy_loss(*a, backend="triton")  # noqa: E731
    extra = [
        ("ours seq-mean-token-mean", lambda *a: ppo_policy_loss(
            *a, reduction="seq-mean-token-mean", backend="triton")),
        ("ours dual_clip=3", lambda *a: ppo_policy_loss(*a, dual_clip=3.0, backend="triton")),
    ]
    cases = [Case("ppo_policy_loss", f"{case} fwd+bwd", impl, _make(get_fn, build, (0,)),
                  n * (3 * 4 + 1 + 4), extra={"target_ms": target if impl == "ours" else None})
             for impl, get_fn in _peers(eager, ours, smoke, extra)]
    if not smoke:  # the step's GPU work alone: captured once, replayed
        cases += [Case("ppo_policy_loss", f"{case} fwd+bwd", f"{impl} (CUDA graph)",
                       _make(lambda fn=fn: fn, build, (0,), graphed=True), n * (3 * 4 + 1 + 4))
                  for impl, fn in (("eager", eager), ("ours", ours))]
    cases += [Case("ppo_policy_loss", f"{case} fwd", impl, _make(get_fn, build, None),
                   n * (3 * 4 + 1))
              for impl, get_fn in _peers(eager, ours, smoke)]
    return cases


def _value_cases(B: int, T: int, device, smoke: bool) -> list[Case]:
    def build():
        values = torch.randn(B, T, device=device).requires_grad_()
        old_values = values.detach() + 0.3 * torch.randn(B, T, device=device)
        returns = torch.randn(B, T, device=device)
        mask = _right_padded_mask(B, T, device)
        return (values, old_values, returns, mask), torch.randn((), device=device)

    eager = lambda *a: reference.ppo_value_loss(*a)  # noqa: E731
    ours = lambda *a: ppo_value_loss(*a, backend="triton")  # noqa: E731
    return [Case("ppo_value_loss", f"{B}x{T} fp32 fwd+bwd", impl, _make(get_fn, build, (0,)),
                 B * T * (3 * 4 + 1 + 4))
            for impl, get_fn in _peers(eager, ours, smoke)]


def _bradley_terry_cases(n: int, device, smoke: bool) -> list[Case]:
    def build():
        chosen = torch.randn(n, device=device).requires_grad_()
        rejected = torch.randn(n, device=device).requires_grad_()
        return (chosen, rejected), torch.randn((), device=device)

    eager = lambda *a: reference.bradley_terry_loss(*a, center_coef=0.01)  # noqa: E731
    ours = lambda *a: bradley_terry_loss(*a, center_coef=0.01, backend="triton")  # noqa: E731
    return [Case("bradley_terry_loss", f"{n} pairs fp32 fwd+bwd", impl,
                 _make(get_fn, build, (0, 1)), n * (2 * 4 + 2 * 4))
            for impl, get_fn in _peers(eager, ours, smoke)]


def cases(smoke: bool = False) -> list[Case]:
    """Every (case, implementation) to time: the GPU shapes, or tiny CPU shapes (smoke)."""
    device = torch.device("cpu" if smoke else "cuda")
    result = []
    for B, T in SMOKE_CASES if smoke else CASES:
        result += _policy_cases(B, T, device, smoke)
        result += _value_cases(B, T, device, smoke)
        result += _bradley_terry_cases(B * T, device, smoke)
    return result


def run(smoke: bool = False) -> list[dict]:
    """Rows for the result table; ``smoke`` runs tiny shapes on the CPU in seconds."""
    if not smoke and not torch.cuda.is_available():
        raise RuntimeError("bench_ppo_loss needs a CUDA device (use smoke=True on the CPU)")
    return run_cases(cases(smoke))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes, no result file")
    args = parser.parse_args(argv)
    result = run(smoke=args.smoke)
    print_table(result, columns=("op", "case", "impl", "ms", "gb_per_s", "pct_of_floor",
                                 "peak_extra_mib", "target_ms"), smoke=args.smoke)
    if not args.smoke:
        print(f"wrote {save_results('ppo_loss', result)}")
    return 0


if __name__ == "__main__":
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(main))
