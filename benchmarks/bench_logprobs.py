"""logprobs: log-probabilities of the chosen tokens, against its peers (docs/design.md §4).

Cases: bf16 logits 8x1024x151936 (Qwen2.5 vocabulary) and 4x512x32000 (Llama-2), read as the
causal-LM shift ``logits[:, :-1, :]`` of a (B, T+1, V) buffer, as a trainer does. Forward alone and
forward + backward (a random upstream gradient on logp). Peers:

* eager: ``logits.float().log_softmax(-1).gather(...)`` (what most RLHF code writes);
* TRL's per-row recipe: a Python loop over the batch rows, each ``logsumexp`` + ``gather``;
* torch.compile of the eager function;
* Liger's ``fused_selective_log_softmax`` (forward only, no gradient) when liger_kernel imports;
* ours, with and without entropy, and with ``inplace_backward``.

The floor: the logits read once for the forward; read, written (the gradient) and read again for
forward + backward, i.e. three passes (``bytes_moved`` below; labels and outputs are noise).

At the largest shape the cases also time ours with the vocabulary loops software-pipelined
(``ours pipelined stages=k``: ``tl.range(..., num_stages=k)``, cp.async into shared memory; the
default is k = 2, see ``_launch_config``; the cases time k = 1 and 4), after the eager peers, so
that a time-boxed proof run measures whether the default still pays on that GPU.

``python -m benchmarks.bench_logprobs [--smoke] [--sweep]``; ``--sweep`` times our kernels over
(BLOCK_V, num_warps, num_stages) on the large case to re-tune ``_launch_config`` on a new GPU.
Each of the three knobs changes the compiled kernel (the stages are the loops' ``tl.range``
pipelining depth); each row records how many new binaries its configuration compiled
(``new_binaries``: 0 would mean it timed a binary an earlier row already had).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib

import torch

from benchmarks.common import (
    Case,
    print_table,
    result_row,
    run_cases,
    save_results,
    time_ms,
)
from rlhf_kernels.ops.logprobs import logprobs

logprobs_module = importlib.import_module("rlhf_kernels.ops.logprobs")

CASES = [(8, 1024, 151936), (4, 512, 32000)]
# Pipelining depths timed beside the default (k = 1) at the largest shape.
PIPELINE_STAGES = (1, 4)  # the default is 2 (_launch_config): one below, one above
SMOKE_CASES = [(2, 8, 257)]


# ------------------------------------------------------------------------------------------
# peers
# ------------------------------------------------------------------------------------------
def eager_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def trl_per_row_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRL's recipe, re-implemented from its description: one batch row at a time, logsumexp of
    the row and the gathered logit, so only one row's worth of temporaries is alive."""
    rows = []
    for row_logits, row_labels in zip(logits, labels):
        chosen = row_logits.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1).float()
        rows.append(chosen - torch.logsumexp(row_logits.float(), dim=-1))
    return torch.stack(rows)


def ours(logits: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    return logprobs(logits, labels, check_labels=False, **kwargs)


def ours_with_entropy(logits: torch.Tensor, labels: torch.Tensor):
    return logprobs(logits, labels, return_entropy=True, check_labels=False)


def _liger_peer():
    for module_name in ("liger_kernel.ops.grpo_loss", "liger_kernel.ops"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        fn = getattr(module, "fused_selective_log_softmax", None)
        if fn is not None:
            return fn
    return None


# ------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------
def _fwd_bwd(fn, logits, labels, grad):
    def step():
        logp = fn(logits, labels)
        return torch.autograd.grad(logp, logits, grad)[0]

    return step


def _inputs(B: int, T: int, V: int, dtype: torch.dtype, device, requires_grad: bool):
    """A (B, T+1, V) logits buffer, its causal shift (a view, read in place by ours), labels and
    an upstream gradient for logp. With ``requires_grad`` the buffer is an intermediate result,
    as the lm_head's output is in a trainer (``+ zero``, a leaf scalar: nothing saved, no extra
    buffer): ``inplace_backward`` refuses a leaf or a view of one, whose data it would
    overwrite."""
    full = torch.randn(B, T + 1, V, device=device).to(dtype)
    if requires_grad:
        full = full + torch.zeros((), device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (B, T), device=device)
    grad = torch.randn(B, T, device=device)
    return full, full[:, :-1, :], labels, grad


def _inplace(logits, labels):
    # The gradient lands in the logits buffer, as it lands in the lm_head output's in a trainer
    # (a benchmark may overwrite its input).
    return ours(logits, labels, inplace_backward=True)


def _compiled_eager():
    return torch.compile(eager_logprobs)


@contextlib.contextmanager
def launch_config(config_for_v):
    """Within: the logprobs launchers take ``config_for_v(V, entropy=False) -> (BLOCK_V,
    warps, stages)`` (``entropy``: the forward that returns the entropy)."""
    default = logprobs_module._launch_config
    logprobs_module._launch_config = config_for_v
    try:
        yield
    finally:
        logprobs_module._launch_config = default


def _pipelined(step_maker, stages: int):
    """A case's ``make`` whose step runs ours with ``num_stages=stages`` in the vocabulary loops
    (the default BLOCK_V and warps), forward and backward alike."""
    def make():
        default = logprobs_module._launch_config
        step = step_maker()

        def config(V, entropy=False):
            block_v, warps, _ = default(V, entropy)
            return block_v, warps, stages

        def pipelined_step():
            with launch_config(config):
                return step()

        return pipelined_step

    return make


def _shape_cases(B: int, T: int, V: int, dtype: torch.dtype, device, smoke: bool,
                 pipelined: bool = False) -> list[Case]:
    element = torch.finfo(dtype).bits // 8
    fwd_bytes = B * T * V * element + B * T * (8 + 4)
    fwd_bwd_bytes = 3 * B * T * V * element + B * T * (8 + 4 + 4)
    name = f"{'x'.join(map(str, (B, T, V)))} {str(dtype).removeprefix('torch.')}"

    def forward(get_fn, on_buffer: bool = False):
        """``get_fn()`` is called in ``make`` (torch.compile happens there, not at listing)."""
        def make():
            fn = get_fn()
            full, logits, labels, _ = _inputs(B, T, V, dtype, device, requires_grad=False)
            source = full if on_buffer else logits

            def step():
                with torch.no_grad():
                    return fn(source, labels)

            return step

        return make

    def forward_backward(get_fn):
        def make():
            fn = get_fn()
            _, logits, labels, grad = _inputs(B, T, V, dtype, device, requires_grad=True)
            return _fwd_bwd(fn, logits, labels, grad)

        return make

    fwd_peers = [("eager", lambda: eager_logprobs), ("TRL per-row", lambda: trl_per_row_logprobs)]
    if not smoke:
        fwd_peers.append(("torch.compile", _compiled_eager))
    fwd_peers += [("ours", lambda: ours), ("ours + entropy", lambda: ours_with_entropy)]
    cases = [Case("logprobs", f"{name} fwd", impl, forward(get_fn), fwd_bytes)
             for impl, get_fn in fwd_peers]
    liger = None if smoke else _liger_peer()
    if liger is not None:
        # Liger takes the (B, T+1, V) buffer and the labels aligned to its last T positions.
        liger_fn = lambda full, y: liger(full, y, temperature=1.0)  # noqa: E731
        cases.append(Case("logprobs", f"{name} fwd", "Liger (no grad)",
                          forward(lambda: liger_fn, on_buffer=True), fwd_bytes, optional=True))

    bwd_peers = [("eager", lambda: eager_logprobs), ("TRL per-row", lambda: trl_per_row_logprobs)]
    if not smoke:
        bwd_peers.append(("torch.compile", _compiled_eager))
    bwd_peers += [("ours", lambda: ours), ("ours inplace_backward", lambda: _inplace)]
    cases += [Case("logprobs", f"{name} fwd+bwd", impl, forward_backward(get_fn), fwd_bwd_bytes)
              for impl, get_fn in bwd_peers]
    if pipelined:
        # the entropy forward keeps k = 1 by default (its registers double when pipelined):
        # timed at k = 2 here to see whether it pays anyway
        cases.append(Case("logprobs", f"{name} fwd", "ours + entropy pipelined stages=2",
                          _pipelined(forward(lambda: ours_with_entropy), 2), fwd_bytes))
        for stages in PIPELINE_STAGES:
            cases.append(Case("logprobs", f"{name} fwd", f"ours pipelined stages={stages}",
                              _pipelined(forward(lambda: ours), stages), fwd_bytes))
            cases.append(Case("logprobs", f"{name} fwd+bwd", f"ours pipelined stages={stages}",
                              _pipelined(forward_backward(lambda: ours), stages),
                              fwd_bwd_bytes))
    return cases


def cases(smoke: bool = False) -> list[Case]:
    """Every (case, implementation) to time: bf16 GPU shapes, or tiny fp32 CPU shapes (smoke)."""
    if smoke:
        return [c for B, T, V in SMOKE_CASES
                for c in _shape_cases(B, T, V, torch.float32, torch.device("cpu"), smoke=True,
                                      pipelined=True)]
    return [c for i, (B, T, V) in enumerate(CASES)
            for c in _shape_cases(B, T, V, torch.bfloat16, torch.device("cuda"), smoke=False,
                                  pipelined=i == 0)]


def run(smoke: bool = False) -> list[dict]:
    """Rows for the result table; ``smoke`` runs tiny fp32 shapes on the CPU in seconds."""
    if not smoke and not torch.cuda.is_available():
        raise RuntimeError("bench_logprobs needs a CUDA device (use smoke=True on the CPU)")
    return run_cases(cases(smoke))


def sweep(B: int = 8, T: int = 1024, V: int = 151936) -> list[dict]:
    """Time our forward and forward + backward over launch configurations (CUDA only)."""
    full = torch.randn(B, T + 1, V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    logits = full[:, :-1, :]
    labels = torch.randint(0, V, (B, T), device="cuda")
    grad = torch.randn(B, T, device="cuda")
    fwd_bytes = B * T * V * 2
    kernels = (logprobs_module._logprobs_fwd_kernel, logprobs_module._logprobs_bwd_kernel)

    def compiled() -> set:
        return {key for k in kernels for cache in k.device_caches.values() for key in cache[0]}

    rows = []
    for block_v in (1024, 2048, 4096, 8192):
        for num_warps in (1, 2, 4, 8, 16):
            if block_v // num_warps < 128:
                continue
            for num_stages in (1, 2, 3, 4):
                config = (block_v, num_warps, num_stages)
                name = f"BLOCK_V={block_v} warps={num_warps} stages={num_stages}"
                before = compiled()
                with launch_config(lambda _V, _entropy=False, c=config: c):
                    with torch.no_grad():
                        ms = time_ms(lambda: ours(logits, labels))
                    fwd = result_row("logprobs", f"sweep {V} fwd", name, ms, fwd_bytes)
                    ms = time_ms(_fwd_bwd(ours, logits, labels, grad))
                    both = result_row("logprobs", f"sweep {V} fwd+bwd", name, ms,
                                      3 * fwd_bytes)
                new = len(compiled() - before)
                for row in (fwd, both):
                    row["new_binaries"] = new
                rows += [fwd, both]
    return sorted(rows, key=lambda r: (r["case"], r["ms"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes, no result file")
    parser.add_argument("--sweep", action="store_true", help="tune the launch configuration")
    args = parser.parse_args(argv)
    result = sweep() if args.sweep else run(smoke=args.smoke)
    print_table(result, smoke=args.smoke)
    if not args.smoke:
        print(f"wrote {save_results('logprobs_sweep' if args.sweep else 'logprobs', result)}")
    return 0


if __name__ == "__main__":
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(main))
