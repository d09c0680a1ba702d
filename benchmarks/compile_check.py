"""Does every Triton kernel compile for the GPU? Checked on a CPU, before a GPU is at hand.

The test suite runs the kernels through the Triton interpreter, which never compiles them: a
kernel that the interpreter accepts can still fail in the compiler (an op or option the NVIDIA
backend rejects, a dtype the interpreter promotes silently, a constexpr branch only a GPU takes)
and that would show only on a GPU, where time is scarce. This script calls every public op on
CPU tensors with the launches mocked (``benchmarks.host_overhead.host_only_launches``: the
arguments are bound for real, as on a GPU, and nothing runs), over a matrix of sizes (small and
awkward, and the real ones: 64K tokens, GAE 512 x 2048, a 151936-entry vocabulary), dtypes and
options, on the eager path and through the custom ops (what torch.compile runs), so that every
kernel is launched; it records each distinct specialisation (kernel, signature, constexprs,
divisibility attributes, warps, stages) and compiles it with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` (sm_90: H100/H200; ``--arch 89`` for sm_89) through Triton's
bundled ``ptxas``. It reports each kernel's specialisations, registers and spills, and exits 1
if any fails to compile or a kernel of rlhf_kernels.ops was never launched (so not checked).

    python -m benchmarks.compile_check [--arch 90 [89 ...]] [--kernels OP ...] [--save]
        [--json PATH] [--fp32-only]

``--save`` writes the per-kernel summary to ``benchmarks/results/compile_check-<arches>-<date>
.json``; ``--json`` every compile.

Run it as a script in a fresh process (the kernels must be compiled-mode ``JITFunction``s: it
clears ``TRITON_INTERPRET`` before rlhf_kernels is imported). About 1 s of CPU per
specialisation and architecture.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator

# As a script: compiled-mode kernels (benchmarks/__init__.py turns the interpreter on without
# CUDA), no NaN-filled buffers.
if __name__ == "__main__" and "rlhf_kernels.ops.policy_loss" not in sys.modules:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("RLHF_KERNELS_POISON", None)

import torch  # noqa: E402

from benchmarks.static_sass import Launch, compile_sass, record_launches  # noqa: E402

# The launchers choose block sizes and warps from the sizes, so each op is called at a small
# awkward size and at the sizes a training step really has (the DESIGN shapes: 64K tokens,
# GAE 512 x 2048, Qwen's 151936-entry vocabulary, ...). With the launches mocked, large CPU
# tensors cost only their allocation (and the fused ops' chunk matmuls, kept to a few tokens).
VOCABS = (1000, 32000, 151936)  # 1000: not a multiple of any block (the masked tail)
TOKENS = ((3, 5), (64, 1024))  # (rows, T) of the (B, T) ops
H = 64
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _grad_leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _backward(out) -> None:
    """Backward through every differentiable output (a loss, or log-probs [and entropy])."""
    tensors = out if isinstance(out, tuple) else (out,)
    total = sum(t.float().sum() for t in tensors
                if isinstance(t, torch.Tensor) and t.requires_grad)
    if isinstance(total, torch.Tensor):
        total.backward()


def _mask(rows: int, t: int) -> torch.Tensor:
    mask = torch.ones(rows, t, dtype=torch.bool)
    mask[0, t // 2:] = False
    return mask


def _vocabulary_calls(rk) -> Iterator[tuple[str, Callable[[], object]]]:
    B, T = 2, 3
    labels = {V: torch.randint(0, V, (B, T)) for V in VOCABS}
    for V, dtype, entropy, temperature, inplace in itertools.product(
            VOCABS, FLOATS, (False, True), (1.0, 0.7), (False, True)):
        def call(V=V, dtype=dtype, entropy=entropy, temperature=temperature, inplace=inplace):
            full = _grad_leaf(torch.randn(B, T + 1, V).to(dtype))
            # the causal-shift view of a leaf; inplace_backward needs logits made in the graph
            logits = full[:, :-1] * 1 if inplace else full[:, :-1]
            _backward(rk.logprobs(logits, labels[V], temperature=temperature,
                                  return_entropy=entropy, inplace_backward=inplace))
        yield f"logprobs V={V} {dtype} entropy={entropy} T={temperature} inplace={inplace}", call

    for V, dtype, entropy, lora, bias in itertools.product(
            VOCABS, FLOATS, (False, True), (False, True), (False, True)):
        def call(V=V, dtype=dtype, entropy=entropy, lora=lora, bias=bias):
            hidden = _grad_leaf(torch.randn(B, T, H).to(dtype))
            weight = _grad_leaf((torch.randn(V, H) * H ** -0.5).to(dtype))
            extra = {}
            if bias:
                extra["bias"] = _grad_leaf(torch.randn(V).to(dtype))
            if lora:
                extra.update(lora_a=_grad_leaf(torch.randn(4, H).to(dtype)),
                             lora_b=_grad_leaf(torch.randn(V, 4).to(dtype) * 0.1),
                             lora_scale=2.0)
            _backward(rk.linear_logprobs(hidden, weight, labels[V], return_entropy=entropy,
                                         **extra))
        yield f"linear_logprobs V={V} {dtype} entropy={entropy} lora={lora} bias={bias}", call

    # the fused PPO ops: every loss form, ratio level, KL estimator, entropy bonus
    fused_options = [
        dict(),
        dict(ref_logp=True, kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01),
        dict(ref_logp=True, kl_coef=0.1, kl_estimator="k3", dual_clip=3.0),
        dict(ratio_level="sequence", reduction="seq-mean-token-mean"),
        dict(loss_type="cispo", clip_low=1.0, clip_high=4.0, reduction="token-sum",
             normalizer=7.0),
        dict(log_ratio_clamp=None, temperature=0.7, reduction="seq-mean-token-sum-norm"),
    ]
    mask = _mask(B, T)
    for V, dtype, per_token_adv, options in itertools.product(
            VOCABS, FLOATS, (False, True), fused_options):
        def make(per_token_adv=per_token_adv, options=options):
            options = dict(options)
            rollout = dict(old_logp=-torch.rand(B, T) * 3,
                           advantages=torch.randn(B, T) if per_token_adv else torch.randn(B))
            if options.pop("ref_logp", False):
                rollout["ref_logp"] = -torch.rand(B, T) * 3
            return rollout, options

        def from_logits(V=V, dtype=dtype, make=make):
            rollout, options = make()
            full = _grad_leaf(torch.randn(B, T + 1, V).to(dtype))
            _backward(rk.ppo_loss_from_logits(full[:, :-1], labels[V], mask=mask, **rollout,
                                              **options)[0])

        def linear(V=V, dtype=dtype, make=make):
            rollout, options = make()
            hidden = _grad_leaf(torch.randn(B, T, H).to(dtype))
            weight = _grad_leaf((torch.randn(V, H) * H ** -0.5).to(dtype))
            _backward(rk.linear_ppo_loss(hidden, weight, labels[V], mask=mask, **rollout,
                                         **options)[0])

        tag = f"V={V} {dtype} adv={'BT' if per_token_adv else 'B'} {options}"
        yield f"ppo_loss_from_logits {tag}", from_logits
        yield f"linear_ppo_loss {tag}", linear


def _token_calls(rk) -> Iterator[tuple[str, Callable[[], object]]]:
    for (B, T), dtype in itertools.product(TOKENS, FLOATS):
        mask = _mask(B, T)
        size = f"{B}x{T} {dtype}"

        def tokens(B=B, T=T, dtype=dtype):
            return [(-torch.rand(B, T) * 3).to(dtype) for _ in range(3)]

        for estimator, clamp in itertools.product(("k1", "k2", "k3", "abs"), (None, 5.0)):
            def kl(estimator=estimator, clamp=clamp, tokens=tokens):
                logp, ref, _ = tokens()
                _backward(rk.kl_penalty(_grad_leaf(logp), ref, estimator=estimator,
                                        clamp=clamp, log_ratio_clamp=clamp))
                _backward(rk.kl_penalty(_grad_leaf(logp)[:, 1:], ref[:, 1:],  # strided rows
                                        estimator=estimator))
            yield f"kl_penalty {size} {estimator} clamp={clamp}", kl

        for clips in ((None, None), (5.0, 10.0)):
            def shape(clips=clips, tokens=tokens, dtype=dtype, B=B, T=T, mask=mask):
                logp, ref, _ = tokens()
                rk.shape_rewards(torch.randn(B).to(dtype), logp, ref, mask, kl_coef=0.1,
                                 score_clip=clips[0], kl_clamp=clips[1])
                rk.shape_rewards(torch.randn(B).to(dtype), logp, ref, mask, kl_coef=0.1,
                                 estimator="k3", score_index=torch.randint(0, T, (B,)))
            yield f"shape_rewards {size} clips={clips}", shape

        def whiten(dtype=dtype, B=B, T=T, mask=mask):
            for shift, unbiased in itertools.product((True, False), repeat=2):
                rk.masked_whiten(torch.randn(B, T).to(dtype), mask, shift_mean=shift,
                                 unbiased=unbiased)
            rk.masked_whiten(torch.randn(B, T).to(dtype))
        yield f"masked_whiten {size}", whiten

        policy_options = [
            dict(),
            dict(dual_clip=3.0, reduction="seq-mean-token-mean"),
            dict(ratio_level="sequence", log_ratio_clamp=None, reduction="token-sum"),
            dict(loss_type="cispo", clip_low=1.0, clip_high=4.0, normalizer=torch.tensor(9.0)),
            dict(ref_logp=True, kl_coef=0.1, kl_estimator="k3",
                 reduction="seq-mean-token-sum-norm"),
            dict(ref_logp=True, kl_coef=0.1, kl_estimator="k1", reduction="seq-mean-token-sum"),
        ]
        for per_token_adv, options in itertools.product((False, True), policy_options):
            def policy(per_token_adv=per_token_adv, options=options, tokens=tokens,
                       dtype=dtype, B=B, T=T, mask=mask):
                options = dict(options)
                logp, old, ref = tokens()
                if options.pop("ref_logp", False):
                    options["ref_logp"] = ref
                adv = (torch.randn(B, T) if per_token_adv else torch.randn(B)).to(dtype)
                _backward(rk.ppo_policy_loss(_grad_leaf(logp), old, adv, mask, **options)[0])
            yield (f"ppo_policy_loss {size} adv={'BT' if per_token_adv else 'B'} {options}",
                   policy)

        for clip, reduction in ((0.2, "token-mean"), (None, "seq-mean-token-mean")):
            def value(clip=clip, reduction=reduction, tokens=tokens, mask=mask):
                v, old, ret = tokens()
                _backward(rk.ppo_value_loss(_grad_leaf(v), old, ret, mask, clip=clip,
                                            reduction=reduction)[0])
            yield f"ppo_value_loss {size} clip={clip} {reduction}", value

    for (B, T), dtype in itertools.product(((3, 5), (4, 700), (512, 2048)), FLOATS):
        def gae(B=B, T=T, dtype=dtype):
            rk.gae(torch.randn(B, T).to(dtype), torch.randn(B, T).to(dtype), _mask(B, T),
                   0.99, 0.95)
            rk.gae(torch.randn(B, T).to(dtype), torch.randn(B, T).to(dtype))
        yield f"gae {B}x{T} {dtype}", gae

    for n, dtype in itertools.product((7, 8192, 100_000), FLOATS):
        for margin, center in ((None, 0.0), (0.5, 0.01), ("tensor", 0.0)):
            def bt(n=n, margin=margin, center=center, dtype=dtype):
                chosen, rejected = (_grad_leaf(torch.randn(n).to(dtype)) for _ in range(2))
                m = torch.rand(n).to(dtype) if margin == "tensor" else margin
                _backward(rk.bradley_terry_loss(chosen, rejected, m, center)[0])
            yield f"bradley_terry_loss {n} {dtype} margin={margin} center={center}", bt

    for n, dtype in itertools.product((16, 4096), FLOATS):
        for estimator, norm in itertools.product(("grpo", "dr_grpo", "rloo"),
                                                 (None, "group", "batch", "none")):
            def groups(n=n, estimator=estimator, norm=norm, dtype=dtype):
                rk.group_advantages(torch.randn(n).to(dtype), group_size=4,
                                    estimator=estimator, norm=norm)
                rk.group_advantages(torch.randn(6).to(dtype),
                                    group_ids=torch.tensor([0, 0, 1, 1, 1, 2]),
                                    estimator=estimator, norm=norm)
            yield f"group_advantages {n} {dtype} {estimator} norm={norm}", groups


def calls() -> Iterator[tuple[str, Callable[[], object]]]:
    """(label, call) for every op over the sizes, dtypes and options its launchers specialise
    on. Each call runs the forward and, where the op is differentiable, the backward."""
    import rlhf_kernels as rk

    yield from _vocabulary_calls(rk)
    yield from _token_calls(rk)


@contextlib.contextmanager
def custom_op_path():
    """Within: the ops run their torch.library custom ops (what torch.compile traces, with the
    custom op's own backward kernels) instead of the eager fast path."""
    patched = [(m, m.launch_directly) for name, m in list(sys.modules.items())
               if name.startswith("rlhf_kernels") and m is not None
               and callable(getattr(m, "launch_directly", None))]
    for module, _ in patched:
        module.launch_directly = lambda *tensors: False
    try:
        yield
    finally:
        for module, original in patched:
            module.launch_directly = original


def _key(launch: Launch) -> tuple:
    options = launch.options
    return (launch.name, repr(sorted(launch.signature.items(), key=str)),
            repr(sorted(launch.constexprs.items(), key=str)),
            repr(sorted(launch.attrs.items(), key=str)),
            options.num_warps, options.num_stages)


def record(only: set[str] | None = None,
           source: Callable[[], Iterable[tuple[str, Callable[[], object]]]] = calls,
           ) -> tuple[dict[tuple, Launch], list[str]]:
    """Every distinct specialisation the calls of ``source`` launch (on both paths), and the
    calls that raised."""
    found: dict[tuple, Launch] = {}
    failed = []
    for path in ("eager", "custom op"):
        for label, call in source():
            if only and label.split()[0] not in only:
                continue
            try:
                with record_launches() as recorded, (
                        custom_op_path() if path == "custom op" else contextlib.nullcontext()):
                    call()
            except Exception as error:  # noqa: BLE001 - report every failing call, then fail
                failed.append(f"{label} ({path}): {type(error).__name__}: {error}")
                continue
            for launch in recorded:
                found.setdefault(_key(launch), launch)
    return found, failed


def check(arches: tuple[int, ...] = (90,), only: set[str] | None = None,
          source: Callable[[], Iterable[tuple[str, Callable[[], object]]]] = calls) -> dict:
    """Record the specialisations, compile each for every arch -> a JSON-ready result."""
    from benchmarks.host_overhead import _check_compiled_mode

    _check_compiled_mode()  # one clear error instead of one per call
    start = time.time()
    launches, call_errors = record(only, source)
    rows = []
    for launch in launches.values():
        for arch in arches:
            row = {"kernel": launch.name, "arch": f"sm_{arch}",
                   "num_warps": launch.options.num_warps,
                   "num_stages": launch.options.num_stages,
                   "constexprs": {launch.fn.arg_names[k[0]]: v
                                  for k, v in launch.constexprs.items()
                                  if len(k) == 1 and k[0] < len(launch.fn.arg_names)}}
            try:
                compiled = compile_sass(launch, arch)
                row.update(ok=True, regs=compiled["regs"], local_bytes=compiled["local"])
            except Exception as error:  # noqa: BLE001 - a kernel that does not compile
                row.update(ok=False, error=f"{type(error).__name__}: {str(error)[:2000]}")
            rows.append(row)
    import triton

    launched = {launch.name for launch in launches.values()}
    return {"triton": triton.__version__, "torch": torch.__version__,
            "arches": [f"sm_{a}" for a in arches], "specialisations": len(launches),
            "call_errors": call_errors, "rows": rows, "seconds": round(time.time() - start, 1),
            # a kernel no call reached was not checked: the matrix needs a call for it
            "never_launched": [] if only or source is not calls
            else sorted(set(all_kernels()) - launched)}


def all_kernels() -> list[str]:
    """The names of every launchable Triton kernel in rlhf_kernels (the ``*_kernel``
    ``JITFunction``s; the others are device functions, compiled into them)."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import rlhf_kernels.ops

    names = set()
    for info in pkgutil.iter_modules(rlhf_kernels.ops.__path__):
        module = importlib.import_module(f"rlhf_kernels.ops.{info.name}")
        names |= {name for name, value in vars(module).items()
                  if isinstance(value, JITFunction) and name.endswith("_kernel")}
    return sorted(names)


def per_kernel(result: dict) -> list[dict]:
    """One row per kernel and architecture: specialisations, failures, registers, spills."""
    by_kernel: dict[tuple[str, str], list[dict]] = {}
    for row in result["rows"]:
        by_kernel.setdefault((row["kernel"], row["arch"]), []).append(row)
    rows = []
    for (kernel, arch), group in sorted(by_kernel.items()):
        ok = [r for r in group if r["ok"]]
        rows.append({"kernel": kernel, "arch": arch, "specialisations": len(group),
                     "failed": len(group) - len(ok),
                     "regs_min": min((r["regs"] for r in ok), default=None),
                     "regs_max": max((r["regs"] for r in ok), default=None),
                     "spilling": sum(1 for r in ok if r["local_bytes"] > 0)})
    return rows


def summary(result: dict) -> str:
    lines = [f"{'kernel':40} {'arch':6} {'specs':>5} {'failed':>6} {'regs':>9} {'spills':>6}"]
    for row in per_kernel(result):
        regs = f"{row['regs_min']}-{row['regs_max']}" if row["regs_min"] is not None else "-"
        lines.append(f"{row['kernel']:40} {row['arch']:6} {row['specialisations']:5} "
                     f"{row['failed']:6} {regs:>9} {row['spilling']:6}")
    failed = [r for r in result["rows"] if not r["ok"]]
    lines.append(f"{result['specialisations']} specialisations, {len(result['rows'])} compiles, "
                 f"{len(failed)} failed, {len(result['call_errors'])} calls raised, "
                 f"{result['seconds']} s")
    for row in failed:
        lines.append(f"FAILED {row['kernel']} {row['arch']} {row['constexprs']}: "
                     f"{row['error'].splitlines()[0] if row['error'] else ''}")
    lines.extend(f"CALL RAISED {error}" for error in result["call_errors"])
    lines.extend(f"NEVER LAUNCHED {name} (not checked: add a call for it)"
                 for name in result["never_launched"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90],
                        help="compute capabilities to compile for (90: H100/H200, 89: L4/4090)")
    parser.add_argument("--kernels", nargs="+", default=None, metavar="OP",
                        help="only the calls of these ops (e.g. ppo_policy_loss gae)")
    parser.add_argument("--json", default=None,
                        help="also write every compile (one row per specialisation) here")
    parser.add_argument("--save", action="store_true",
                        help="write the per-kernel summary to benchmarks/results/")
    parser.add_argument("--fp32-only", action="store_true",
                        help="only fp32 inputs (a quick check of the tool itself)")
    args = parser.parse_args(argv)
    if args.fp32_only:
        global FLOATS
        FLOATS = (torch.float32,)
    result = check(tuple(args.arch), set(args.kernels) if args.kernels else None)
    print(summary(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1, default=str)
    if args.save:
        from benchmarks.common import RESULTS_DIR, environment

        env = environment()
        arches = "-".join(result["arches"]).replace("_", "")
        path = RESULTS_DIR / f"compile_check-{arches}-{env['date'][:10]}.json"
        # "rows" stays empty: not timings (benchmarks.report tabulates rows)
        failures = [{k: v for k, v in row.items() if k != "error"} | {
            "error": row["error"].splitlines()[0]} for row in result["rows"] if not row["ok"]]
        path.write_text(json.dumps({
            "environment": env, "triton": result["triton"], "arches": result["arches"],
            "specialisations": result["specialisations"], "compiles": len(result["rows"]),
            "failures": failures, "call_errors": result["call_errors"],
            "never_launched": result["never_launched"],
            "seconds": result["seconds"], "kernels": per_kernel(result), "rows": []},
            indent=1, default=str))
        print(f"wrote {path}")
    bad = ([r for r in result["rows"] if not r["ok"]] or result["call_errors"]
           or result["never_launched"])
    return 1 if bad or not result["rows"] else 0


if __name__ == "__main__":
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(main))
