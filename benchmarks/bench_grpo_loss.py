"""The GRPO loss straight from hidden states: time and peak memory, against the peers.

One GRPO training step's loss, forward + backward (gradients to the hidden states and the
lm_head weight), bf16, B sequences of T tokens, one advantage per sequence, the clipped token
ratio (eps 0.2 / 0.28 as DAPO), beta * k3 KL to a reference in the loss, and GRPO's reduction
(mean over sequences of each sequence's token mean). A fifth of the tokens are padding.

Implementations:

* ``eager``: ``hidden @ W.T``, fp32 ``log_softmax`` and ``gather``, then the loss in PyTorch: the
  whole ``(B, T, V)`` logits live at once (what most GRPO code did until 2025);
* ``trl``: TRL's own path since 1.x: its chunked lm-head log-prob function (the one
  ``add_fused_lm_head`` installs; 32K-token chunks, fp32 logits per chunk) and then the GRPO loss
  written as TRL's trainer writes it, if ``trl`` is installed or a TRL wheel is in
  ``.whl/kernel-peers/`` (``benchmarks.common.trl_fused_head``);
* ``compile``: ``eager`` under ``torch.compile`` (Inductor fuses the softmax, gather and loss;
  the logits still live at once);
* ``liger``: Liger's ``LigerFusedLinearGRPOLoss`` (chunked, one advantage per sequence), if
  installed;
* ``ours``: ``rlhf_kernels.linear_ppo_loss`` with (B,) advantages, ``ref_logp`` / ``kl_coef``
  and ``reduction="seq-mean-token-mean"``: one sweep, the gradient made in the forward.

Floor: the op is matmul-bound, 6 N V H flops (forward, d hidden, d weight) for N valid tokens;
``tflops`` is that over the time, ``peak_extra_mib`` the allocator peak above the inputs.
``python -m benchmarks.bench_grpo_loss [--smoke]`` (CUDA) writes benchmarks/results/.
"""

from __future__ import annotations

import argparse
import math

import torch

from benchmarks.common import Case, print_table, run_cases, save_results, trl_fused_head
from rlhf_kernels.ops.ppo_fused import linear_ppo_loss

OP = "grpo_loss"
# (B, T, H, V): the Qwen2.5-0.5B head (H 896) and the Qwen2.5-7B head (H 3584), 8K tokens
SHAPES = [(16, 512, 896, 151936), (16, 512, 3584, 152064)]
SMOKE_SHAPES = [(3, 5, 8, 67)]
EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.04


def _inputs(B, T, H, V, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g) * 0.5).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = _mask(B, T).to(device)
    # near a near-uniform policy's log-probs, so ratios fall on both sides of the clip range
    old_logp = (-math.log(V) + 0.1 * torch.randn(B, T, generator=g)).to(device)
    ref_logp = (old_logp.cpu() + 0.1 * torch.randn(B, T, generator=g)).to(device)
    advantages = torch.randn(B, generator=g).to(device)
    return hidden, weight, labels, mask, old_logp, ref_logp, advantages


def _mask(B, T):
    """(B, T) right padding, response lengths uniform in [3T/5, T] (a fixed draw)."""
    lengths = torch.randint(T * 3 // 5, T + 1, (B,), generator=torch.Generator().manual_seed(1))
    return torch.arange(T)[None, :] < lengths[:, None]


def _grpo_from_logp(logp, old_logp, ref_logp, advantages, mask):
    """The GRPO loss from per-token log-probs, as TRL's trainer computes it (our own code)."""
    ratio = torch.exp(logp - old_logp)
    A = advantages[:, None]
    per_token = -torch.minimum(ratio * A, ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * A)
    d = ref_logp - logp
    per_token = per_token + BETA * (torch.exp(d) - d - 1)
    m = mask.to(per_token.dtype)
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


def _eager(hidden, weight, labels, mask, old_logp, ref_logp, advantages, _backend):
    logits = (hidden @ weight.t()).float()
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    return _grpo_from_logp(logp, old_logp, ref_logp, advantages, mask)


def _trl():
    peer = trl_fused_head()
    if peer is None:
        return None
    chunked_logprob, vocab_chunk = peer

    def fn(hidden, weight, labels, mask, old_logp, ref_logp, advantages, _backend):
        # as add_fused_lm_head's forward on a GPU: only the valid tokens are scored
        out = chunked_logprob.apply(hidden[mask], weight, None, labels[mask], 1.0,
                                    vocab_chunk, None, 1.0, ("log_probs",))
        logp = hidden.new_zeros(mask.shape, dtype=out[0].dtype).masked_scatter(mask, out[0])
        return _grpo_from_logp(logp, old_logp, ref_logp, advantages, mask)
    return fn


def _liger():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return None
    loss_fn = LigerFusedLinearGRPOLoss(beta=BETA, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                                       loss_type="grpo", use_ref_model=True)

    def fn(hidden, weight, labels, mask, old_logp, ref_logp, advantages, _backend):
        out = loss_fn(hidden, weight, labels, mask.to(torch.int64), advantages,
                      ref_per_token_logps=ref_logp, old_per_token_logps=old_logp)
        return out[0] if isinstance(out, tuple) else out
    return fn


def _ours(hidden, weight, labels, mask, old_logp, ref_logp, advantages, backend):
    loss, _ = linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask,
                              ref_logp=ref_logp, kl_coef=BETA, kl_estimator="k3",
                              clip_low=EPS_LOW, clip_high=EPS_HIGH,
                              reduction="seq-mean-token-mean", backend=backend)
    return loss


_compiled = None


def _compile(*args):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_eager, dynamic=False)
    return _compiled(*args)


def _impls(cuda: bool) -> dict:
    """name -> (fn, optional): the optional peers are skipped (a row with an error) on failure.
    Ours first; the torch.compile peer last (the first cut when the time budget runs out)."""
    impls = {"ours": (_ours, False), "eager": (_eager, False)}
    # the peers are GPU code paths (Triton kernels compiled for CUDA): not in the CPU smoke run
    for name, make in (("trl", _trl), ("liger", _liger)) if cuda else ():
        fn = make()
        if fn is not None:
            impls[name] = (fn, True)
    if cuda:
        impls["compile"] = (_compile, True)
    return impls


def _shape_cases(B, T, H, V, device, dtype, cuda) -> list[Case]:
    backend = "triton" if cuda else None

    def make_with(fn):
        def make():
            inputs = _inputs(B, T, H, V, device, dtype)
            hidden, weight = inputs[0], inputs[1]

            def step():
                loss = fn(*inputs, backend)
                return torch.autograd.grad(loss, (hidden, weight))
            return step
        return make

    tokens = int(_mask(B, T).sum())
    name = f"B={B} T={T} H={H} V={V} {str(dtype).removeprefix('torch.')}"
    return [Case(OP, f"{name} fwd+bwd", impl, make_with(fn), flops=6.0 * tokens * V * H,
                 optional=optional)
            for impl, (fn, optional) in _impls(cuda).items()]


def cases(smoke: bool = False) -> list[Case]:
    """bf16 GPU shapes, or one tiny fp32 CPU shape (the smoke check of the script)."""
    if smoke:
        return [c for shape in SMOKE_SHAPES
                for c in _shape_cases(*shape, torch.device("cpu"), torch.float32, cuda=False)]
    return [c for shape in SHAPES
            for c in _shape_cases(*shape, torch.device("cuda"), torch.bfloat16, cuda=True)]


def run(smoke: bool = False) -> list[dict]:
    """Rows for the result table, each with ``vs_eager``: its time over the eager path's."""
    if not smoke and not torch.cuda.is_available():
        raise RuntimeError("bench_grpo_loss needs a CUDA device (use smoke=True on the CPU)")
    rows = run_cases(cases(smoke))
    eager = {r["case"]: r["ms"] for r in rows if r["impl"] == "eager"}
    for row in rows:
        base = eager.get(row["case"])
        row["vs_eager"] = row["ms"] / base if row["ms"] and base else None
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shape, no result file")
    cli = parser.parse_args(argv)
    results = run(smoke=cli.smoke)
    print_table(results, columns=("case", "impl", "ms", "tflops", "vs_eager", "peak_extra_mib"),
                smoke=cli.smoke)
    if not cli.smoke:
        print(f"wrote {save_results(OP, results)}")
    return 0


if __name__ == "__main__":
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(main))
