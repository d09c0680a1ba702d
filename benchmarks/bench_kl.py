"""KL penalty and reward shaping, the fused kernels against eager PyTorch and torch.compile.

Cases: 64K tokens (64 x 1024), 256K (128 x 2048) and 1M (512 x 2048); fp32 log-probs (what the
logprob op produces) and bf16 for kl_penalty. kl_penalty with the k3 estimator, d clamped to
+-20 and the result to +-10 (veRL's settings), forward alone and forward + backward (gradients of
both inputs, a random upstream gradient). shape_rewards with k1, a bool right-padded mask, the
score at the last valid token. Peers: eager (``rlhf_kernels.reference``), torch.compile of it,
ours (``backend="triton"``).

The floor (every input read once, every output written once), per token:
kl_penalty fwd: 2 inputs in, 4 B out; fwd+bwd adds the upstream gradient (4 B) and both inputs
in and both gradients out; shape_rewards: 2 x 4 B + 1 B mask in, 4 B out (plus 4 B per row).

``python -m benchmarks.bench_kl [--smoke]``.
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
from rlhf_kernels.ops.kl import kl_penalty  # noqa: E402
from rlhf_kernels.ops.rewards import shape_rewards  # noqa: E402

CASES = [(64, 1024), (128, 2048), (512, 2048)]
SMOKE_CASES = [(3, 33)]
KL_OPTIONS = dict(estimator="k3", clamp=10.0, log_ratio_clamp=20.0)


def _peers(eager, ours, smoke: bool) -> list[tuple[str, object]]:
    peers = [("eager", eager)]
    if not smoke:
        peers.append(("torch.compile", torch.compile(eager)))
    peers.append(("ours", ours))
    return peers


def _kl_rows(B: int, T: int, dtype: torch.dtype, device, smoke: bool) -> list[dict]:
    n = B * T
    size = torch.finfo(dtype).bits // 8
    logp = (-3 * torch.rand(B, T, device=device)).to(dtype).requires_grad_()
    ref_logp = (logp.detach().float() + 0.3 * torch.randn(B, T, device=device)).to(dtype)
    ref_logp.requires_grad_()
    grad = torch.randn(B, T, device=device)
    case = f"{B}x{T} {str(dtype).removeprefix('torch.')}"
    eager = lambda a, b: reference.kl_penalty(a, b, **KL_OPTIONS)  # noqa: E731
    ours = lambda a, b: kl_penalty(a, b, **KL_OPTIONS, backend="triton")  # noqa: E731
    rows = []
    for impl, fn in _peers(eager, ours, smoke):
        def forward(fn=fn):
            with torch.no_grad():
                return fn(logp, ref_logp)

        def forward_backward(fn=fn):
            return torch.autograd.grad(fn(logp, ref_logp), (logp, ref_logp), grad)

        rows.append(result_row("kl_penalty", f"{case} fwd", impl, time_ms(forward),
                               n * (2 * size + 4), peak_extra_mib(forward)))
        rows.append(result_row("kl_penalty", f"{case} fwd+bwd", impl, time_ms(forward_backward),
                               n * (2 * size + 4) + n * (4 + 2 * size + 2 * size),
                               peak_extra_mib(forward_backward)))
    return rows


def _reward_rows(B: int, T: int, device, smoke: bool) -> list[dict]:
    n = B * T
    logp = -3 * torch.rand(B, T, device=device)
    ref_logp = logp + 0.3 * torch.randn(B, T, device=device)
    lengths = torch.randint(T // 2, T + 1, (B,), device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    scores = torch.randn(B, device=device)
    args = (scores, logp, ref_logp, mask, 0.05)
    eager = lambda *a: reference.shape_rewards(*a)  # noqa: E731
    ours = lambda *a: shape_rewards(*a, backend="triton")  # noqa: E731
    rows = []
    for impl, fn in _peers(eager, ours, smoke):
        step = lambda fn=fn: fn(*args)  # noqa: E731
        rows.append(result_row("shape_rewards", f"{B}x{T} fp32 k1", impl, time_ms(step),
                               n * (4 + 4 + 1 + 4) + B * 4, peak_extra_mib(step)))
    return rows


def run(smoke: bool = False) -> list[dict]:
    """Rows for the result table; ``smoke`` runs tiny shapes on the CPU in seconds."""
    if smoke:
        device = torch.device("cpu")
        cases = SMOKE_CASES
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("bench_kl needs a CUDA device (use smoke=True on the CPU)")
        device = torch.device("cuda")
        cases = CASES
    rows = []
    for B, T in cases:
        for dtype in (torch.float32, torch.bfloat16):
            rows += _kl_rows(B, T, dtype, device, smoke)
        rows += _reward_rows(B, T, device, smoke)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes, no result file")
    cli = parser.parse_args()
    result = run(smoke=cli.smoke)
    print_table(result)
    if not cli.smoke:
        print(f"wrote {save_results('kl', result)}")
