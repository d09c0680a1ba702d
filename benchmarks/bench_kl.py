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

import torch

from benchmarks.common import Case, print_table, run_cases, save_results
from rlhf_kernels import reference
from rlhf_kernels.ops.kl import kl_penalty
from rlhf_kernels.ops.rewards import shape_rewards

CASES = [(64, 1024), (128, 2048), (512, 2048)]
SMOKE_CASES = [(3, 33)]
KL_OPTIONS = dict(estimator="k3", clamp=10.0, log_ratio_clamp=20.0)


def _peers(eager, ours, smoke: bool) -> list[tuple[str, object]]:
    """(impl, get_fn) pairs; ``get_fn()`` runs in ``make``, so torch.compile happens there."""
    peers = [("eager", lambda: eager)]
    if not smoke:
        peers.append(("torch.compile", lambda: torch.compile(eager)))
    peers.append(("ours", lambda: ours))
    return peers


def _kl_cases(B: int, T: int, dtype: torch.dtype, device, smoke: bool) -> list[Case]:
    n = B * T
    size = torch.finfo(dtype).bits // 8

    def build():
        logp = (-3 * torch.rand(B, T, device=device)).to(dtype).requires_grad_()
        ref_logp = (logp.detach().float() + 0.3 * torch.randn(B, T, device=device)).to(dtype)
        return logp, ref_logp.requires_grad_(), torch.randn(B, T, device=device)

    def forward(get_fn):
        def make():
            fn = get_fn()
            logp, ref_logp, _ = build()

            def step():
                with torch.no_grad():
                    return fn(logp, ref_logp)

            return step

        return make

    def forward_backward(get_fn):
        def make():
            fn = get_fn()
            logp, ref_logp, grad = build()
            return lambda: torch.autograd.grad(fn(logp, ref_logp), (logp, ref_logp), grad)

        return make

    case = f"{B}x{T} {str(dtype).removeprefix('torch.')}"
    eager = lambda a, b: reference.kl_penalty(a, b, **KL_OPTIONS)  # noqa: E731
    ours = lambda a, b: kl_penalty(a, b, **KL_OPTIONS, backend="triton")  # noqa: E731
    peers = _peers(eager, ours, smoke)
    return (
        [Case("kl_penalty", f"{case} fwd", impl, forward(get_fn), n * (2 * size + 4))
         for impl, get_fn in peers]
        + [Case("kl_penalty", f"{case} fwd+bwd", impl, forward_backward(get_fn),
                n * (2 * size + 4) + n * (4 + 2 * size + 2 * size))
           for impl, get_fn in peers]
    )


def _reward_cases(B: int, T: int, device, smoke: bool) -> list[Case]:
    def make_with(get_fn):
        def make():
            fn = get_fn()
            logp = -3 * torch.rand(B, T, device=device)
            ref_logp = logp + 0.3 * torch.randn(B, T, device=device)
            lengths = torch.randint(T // 2, T + 1, (B,), device=device)
            mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
            scores = torch.randn(B, device=device)
            return lambda: fn(scores, logp, ref_logp, mask, 0.05)

        return make

    eager = lambda *a: reference.shape_rewards(*a)  # noqa: E731
    ours = lambda *a: shape_rewards(*a, backend="triton")  # noqa: E731
    return [Case("shape_rewards", f"{B}x{T} fp32 k1", impl, make_with(get_fn),
                 B * T * (4 + 4 + 1 + 4) + B * 4)
            for impl, get_fn in _peers(eager, ours, smoke)]


def cases(smoke: bool = False) -> list[Case]:
    """Every (case, implementation) to time: the GPU shapes, or tiny CPU shapes (smoke)."""
    device = torch.device("cpu" if smoke else "cuda")
    result = []
    for B, T in SMOKE_CASES if smoke else CASES:
        for dtype in (torch.float32, torch.bfloat16):
            result += _kl_cases(B, T, dtype, device, smoke)
        result += _reward_cases(B, T, device, smoke)
    return result


def run(smoke: bool = False) -> list[dict]:
    """Rows for the result table; ``smoke`` runs tiny shapes on the CPU in seconds."""
    if not smoke and not torch.cuda.is_available():
        raise RuntimeError("bench_kl needs a CUDA device (use smoke=True on the CPU)")
    return run_cases(cases(smoke))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes, no result file")
    cli = parser.parse_args(argv)
    result = run(smoke=cli.smoke)
    print_table(result, smoke=cli.smoke)
    if not cli.smoke:
        print(f"wrote {save_results('kl', result)}")
    return 0


if __name__ == "__main__":
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(main))
