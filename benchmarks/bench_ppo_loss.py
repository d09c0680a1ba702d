"""PPO policy / value losses and the Bradley-Terry loss, fused kernels against their peers.

Cases (DESIGN.md section 4): 64K tokens (64 x 1024) and 1M tokens (512 x 2048), fp32 log-probs /
values (what the logprob op and the value head produce), fp32 advantages / returns, a bool
right-padded mask; forward + backward (the gradient of the loss with respect to logp / values,
a random upstream gradient) and the forward alone. Bradley-Terry on 64K and 1M pairs. Peers:

* eager: the reference formula (``rlhf_kernels.reference``) run on the GPU in fp32;
* torch.compile of that formula;
* ours (``backend="triton"``), for the policy loss also with seq-mean-token-mean (one more pass
  over the mask) and with the dual clip.

The floor: every input read once and the gradient written once (policy: 3 x 4 B + 1 B mask in,
4 B out per token; the forward alone: the 13 B in). At 64K tokens that is ~1 MB, well under a
microsecond of bandwidth, so these ops are launch-bound: the figure that matters is ms against
the 0.05 ms target for the policy loss fwd+bwd on 64K tokens (eager: 0.70 ms on an H100).

``python -m benchmarks.bench_ppo_loss [--smoke]``.
"""

from __future__ import annotations

import argparse
import os

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
from rlhf_kernels.ops.bradley_terry import bradley_terry_loss  # noqa: E402
from rlhf_kernels.ops.policy_loss import ppo_policy_loss  # noqa: E402
from rlhf_kernels.ops.value_loss import ppo_value_loss  # noqa: E402

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
    peers = [("eager", eager)]
    if not smoke:
        peers.append(("torch.compile", torch.compile(eager)))
    peers.append(("ours", ours))
    peers.extend(extra_ours)
    return peers


def _policy_rows(B: int, T: int, device, smoke: bool) -> list[dict]:
    n = B * T
    logp = (-3 * torch.rand(B, T, device=device)).requires_grad_()
    old_logp = logp.detach() + 0.3 * torch.randn(B, T, device=device)
    advantages = torch.randn(B, T, device=device)
    mask = _right_padded_mask(B, T, device)
    grad = torch.randn((), device=device)
    inputs = (logp, old_logp, advantages, mask)
    case = f"{B}x{T} fp32"
    target = POLICY_TARGET_MS.get((B, T)) if not smoke else None

    eager = lambda *a: reference.ppo_policy_loss(*a)  # noqa: E731
    ours = lambda *a: ppo_policy_loss(*a, backend="triton")  # noqa: E731
    extra = [
        ("ours seq-mean-token-mean", lambda *a: ppo_policy_loss(
            *a, reduction="seq-mean-token-mean", backend="triton")),
        ("ours dual_clip=3", lambda *a: ppo_policy_loss(*a, dual_clip=3.0, backend="triton")),
    ]
    rows = []
    for impl, fn in _peers(eager, ours, smoke, extra):
        step = _fwd_bwd(fn, inputs, (0,), grad)
        rows.append(result_row("ppo_policy_loss", f"{case} fwd+bwd", impl, time_ms(step),
                               n * (3 * 4 + 1 + 4), peak_extra_mib(step),
                               target_ms=target if impl == "ours" else None))
    for impl, fn in _peers(eager, ours, smoke):
        step = _fwd(fn, inputs)
        rows.append(result_row("ppo_policy_loss", f"{case} fwd", impl, time_ms(step),
                               n * (3 * 4 + 1), peak_extra_mib(step)))
    return rows


def _value_rows(B: int, T: int, device, smoke: bool) -> list[dict]:
    n = B * T
    values = torch.randn(B, T, device=device).requires_grad_()
    old_values = values.detach() + 0.3 * torch.randn(B, T, device=device)
    returns = torch.randn(B, T, device=device)
    mask = _right_padded_mask(B, T, device)
    grad = torch.randn((), device=device)
    inputs = (values, old_values, returns, mask)
    eager = lambda *a: reference.ppo_value_loss(*a)  # noqa: E731
    ours = lambda *a: ppo_value_loss(*a, backend="triton")  # noqa: E731
    rows = []
    for impl, fn in _peers(eager, ours, smoke):
        step = _fwd_bwd(fn, inputs, (0,), grad)
        rows.append(result_row("ppo_value_loss", f"{B}x{T} fp32 fwd+bwd", impl, time_ms(step),
                               n * (3 * 4 + 1 + 4), peak_extra_mib(step)))
    return rows


def _bradley_terry_rows(n: int, device, smoke: bool) -> list[dict]:
    chosen = torch.randn(n, device=device).requires_grad_()
    rejected = torch.randn(n, device=device).requires_grad_()
    grad = torch.randn((), device=device)
    inputs = (chosen, rejected)
    eager = lambda *a: reference.bradley_terry_loss(*a, center_coef=0.01)  # noqa: E731
    ours = lambda *a: bradley_terry_loss(*a, center_coef=0.01, backend="triton")  # noqa: E731
    rows = []
    for impl, fn in _peers(eager, ours, smoke):
        step = _fwd_bwd(fn, inputs, (0, 1), grad)
        rows.append(result_row("bradley_terry_loss", f"{n} pairs fp32 fwd+bwd", impl,
                               time_ms(step), n * (2 * 4 + 2 * 4), peak_extra_mib(step)))
    return rows


def run(smoke: bool = False) -> list[dict]:
    """Rows for the result table; ``smoke`` runs tiny shapes on the CPU in seconds."""
    if smoke:
        device = torch.device("cpu")
        cases = SMOKE_CASES
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("bench_ppo_loss needs a CUDA device (use smoke=True on the CPU)")
        device = torch.device("cuda")
        cases = CASES
    rows = []
    for B, T in cases:
        rows += _policy_rows(B, T, device, smoke)
        rows += _value_rows(B, T, device, smoke)
        rows += _bradley_terry_rows(B * T, device, smoke)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes, no result file")
    args = parser.parse_args()
    result = run(smoke=args.smoke)
    print_table(result, columns=("op", "case", "impl", "ms", "gb_per_s", "pct_of_floor",
                                 "peak_extra_mib", "target_ms"))
    if not args.smoke:
        print(f"wrote {save_results('ppo_loss', result)}")
