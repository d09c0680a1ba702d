"""Host time of the trainer's role switch and update step, at a real model's layer structure.

On a GPU the PPO update of a small model is bound by the host: the H200 profile of one
Qwen2.5-0.5B iteration (``e2e_ppo --profile-stages``) had the GPU busy 20% of the update and 26%
of scoring. What the host spends there is Python and dispatch work per layer, the same on any
machine, so it is measured here on the CPU, at the published model's depth and adapter layout
(every decoder layer, every adapted linear) with widths cut to a few units, where the CPU's
compute is negligible:

* ``switch``: one role switch of the ``SharedBackbone`` (``_activate``: policy <-> critic), with
  the direct switch (``_switch``: the layers' active adapter set directly) and with PEFT's own
  ``set_adapter`` / ``enable_adapters`` followed by the explicit ``requires_grad`` set (what it
  did before); an RL iteration switches about seven times (rollout, four scoring forwards, the
  policy and the critic of each update step);
* ``update``: one PPO update step as ``rlhf ppo`` takes it (``backward_losses``: the policy loss
  through ``linear_ppo_loss`` and its backward, the value loss and its backward, gradient
  checkpointing on; both gradient clips; AdamW's step), with each of the two switches; and the
  number of aten ops the step dispatches.

Figures are process CPU seconds (``time.process_time``), the minimum over ``--repeats``
interleaved runs (the two switch modes alternate, so a busy machine slows both alike); the
kernels are the native CPU ones (``TRITON_INTERPRET`` is cleared before rlhf_kernels is
imported, as in host_overhead.py). The CPU's AdamW is the per-tensor loop (a GPU run takes the
fused kernel), so ``update`` carries that loop's host time too; the switch difference is what the
direct switch removes on any device.

``python -m benchmarks.host_trainer [--shape qwen2.5-0.5b] [--repeats N] [--smoke]`` (``--smoke``:
a two-layer model, a few repeats, no result file). Results go to
``benchmarks/results/host_trainer-cpu-<date>.json``.
"""

from __future__ import annotations

import os
import sys

# benchmarks/__init__.py sets TRITON_INTERPRET on a CPU-only machine for the other scripts'
# smoke runs; the trainer's kernels here are the native CPU ones (see the docstring).
if __name__ == "__main__" and "rlhf_kernels.ops.policy_loss" not in sys.modules:
    os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from benchmarks.common import print_table, save_results  # noqa: E402

NARROW = dict(hidden_size=56, intermediate_size=64, vocab_size=512)  # 14 heads x 4, 2 kv heads


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _cpu_seconds(fn) -> float:
    started = time.process_time()
    fn()
    return time.process_time() - started


def setup(shape: str, smoke: bool):
    """A random backbone of ``shape``'s depth and adapter layout (narrow widths), its optimizer,
    and one rollout to update on (2 rows of 8 prompt + 8 response tokens; smoke: 2 layers,
    2 + 2 tokens)."""
    from benchmarks.e2e_ppo import (
        E2EConfig,
        build_backbone,
        make_optimizer,
        ppo_settings,
        synthetic_prompts,
    )
    from rlhf.engine import RolloutEngine
    from rlhf.ppo import make_rollout

    overrides = dict(NARROW, num_hidden_layers=2) if smoke else dict(NARROW)
    length = 2 if smoke else 8
    cfg = E2EConfig(shape=shape, device="cpu", dtype="float32", batch=2, prompt_length=length,
                    response_length=length, minibatch=2, forward_chunk=2, lora_rank=16,
                    decode_graph="none", config_overrides=overrides)
    backbone = build_backbone(cfg)
    optimizer = make_optimizer(backbone, cfg)
    settings = ppo_settings(cfg)
    prompt_ids, prompt_mask = synthetic_prompts(cfg, backbone.vocab_size, torch.device("cpu"))
    backbone.eval()
    generation = RolloutEngine(backbone, decode_graph="none").generate(
        prompt_ids, prompt_mask, cfg.response_length, eos_token_id=None, pad_token_id=0,
        seed=0).without_prompt_padding()
    rollout = make_rollout(backbone, generation, settings.kl_coef, settings,
                           use_recorded_logprobs=False)
    backbone.train()
    return cfg, backbone, optimizer, settings, rollout


def measure(shape: str = "qwen2.5-0.5b", repeats: int = 12, smoke: bool = False,
            compile_update: bool = True) -> list[dict]:
    from rlhf.compile import CompiledLayers
    from rlhf.ppo import backward_losses

    torch.set_num_threads(1)
    torch.manual_seed(0)
    _, backbone, optimizer, settings, rollout = setup(shape, smoke)
    policy = backbone.trainable_parameters("policy")
    critic = backbone.trainable_parameters("critic")

    def update_step():
        backward_losses(backbone, rollout, settings)
        torch.nn.utils.clip_grad_norm_(policy, settings.grad_clip)
        torch.nn.utils.clip_grad_norm_(critic, settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def round_trip():  # two real switches: the update step leaves the critic active
        backbone._activate("policy")
        backbone._activate("critic")

    # torch_compile=true: the same step with the decoder layers compiled (rlhf/compile.py),
    # as the trainer runs it; compiled (every variant the step meets) before the timing
    compiled = CompiledLayers(backbone.causal_lm) if compile_update else None
    compiled_settings = replace(settings, torch_compile=True)

    def compiled_update_step():
        with compiled.active():
            backward_losses(backbone, rollout, compiled_settings)
        torch.nn.utils.clip_grad_norm_(policy, settings.grad_clip)
        torch.nn.utils.clip_grad_norm_(critic, settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    modes = {"direct": True, "peft set_adapter": False}
    if not backbone._direct_switch:
        raise RuntimeError("this backbone's LoRA layers do not take the direct switch")
    for direct in modes.values():  # warm-up: both paths once
        backbone._direct_switch = direct
        update_step()
        round_trip()
    compile_seconds = grad_difference = None
    if compiled is not None:
        backbone._direct_switch = True
        trained = policy + critic

        def gradients(context) -> list[torch.Tensor]:
            with context():
                backward_losses(backbone, rollout, compiled_settings)
            grads = [p.grad.clone() for p in trained]
            optimizer.zero_grad(set_to_none=True)
            return grads

        started = time.perf_counter()
        got = gradients(compiled.active)  # compiles: the policy and critic variants
        compile_seconds = time.perf_counter() - started
        if compiled.failed:
            raise RuntimeError(f"torch.compile failed: {compiled.failed}")
        # the compiled step must give the eager step's gradients (to rounding) before it is
        # timed: the largest difference, relative to the largest gradient
        want = gradients(contextlib.nullcontext)
        scale = max(float(g.abs().max()) for g in want)
        grad_difference = max(float((a - b).abs().max()) for a, b in zip(got, want)) / scale
        if not grad_difference < 1e-4:
            raise RuntimeError(f"the compiled update's gradients differ from eager ones by "
                               f"{grad_difference:.2e} of the largest")
        compiled_update_step()
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats):
        for name, direct in modes.items():
            backbone._direct_switch = direct
            assert backbone.active_role == "critic"
            times.setdefault(("switch", name), []).append(_cpu_seconds(round_trip) / 2)
            times.setdefault(("update", name), []).append(_cpu_seconds(update_step))
        if compiled is not None:
            backbone._direct_switch = True
            times.setdefault(("update", "direct + torch_compile"), []).append(
                _cpu_seconds(compiled_update_step))
    backbone._direct_switch = True
    counter = _CountOps()
    with counter:
        update_step()
    layers = backbone.causal_lm.config.num_hidden_layers
    rows = []
    for (what, name), seconds in times.items():
        rows.append({"op": "host_trainer", "case": f"{shape} ({layers} layers, "
                     f"{len(backbone._lora_layers)} adapted linears) {what}",
                     "impl": name, "ms": min(seconds) * 1e3,
                     "median_ms": sorted(seconds)[len(seconds) // 2] * 1e3,
                     "aten_ops": counter.count if what == "update" and name == "direct"
                     else None,
                     "compile_s": compile_seconds if name.endswith("torch_compile") else None,
                     "grad_rel_diff": grad_difference if name.endswith("torch_compile")
                     else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--smoke", action="store_true", help="two layers, 2 repeats, no file")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the torch_compile update step (its compile takes a "
                             "minute or so on a small CPU)")
    args = parser.parse_args(argv)
    rows = measure(args.shape, 2 if args.smoke else args.repeats, args.smoke,
                   compile_update=not args.no_compile)
    print_table(rows, columns=("case", "impl", "ms", "median_ms", "aten_ops", "compile_s",
                               "grad_rel_diff"))
    if not args.smoke:
        print(f"wrote {save_results('host_trainer', rows)}")
    return 0


if __name__ == "__main__":
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(main))
