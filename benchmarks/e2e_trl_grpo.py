"""TRL's ``GRPOTrainer`` and ours side by side on a real model: SmolLM2-135M-Instruct on
``task=arithmetic`` (rlhf/arithmetic.py), the same settings, one command.

Both runs get the same model (the named model's folder, fp32), the same training prompts in the
same order (the prompts our run draws, handed to TRL as an unshuffled dataset; each side records
what its reward function saw and the parent checks they are equal), the same group size
(``--generations`` samples of ``--prompts`` prompts per step), completion length, temperature 1,
LoRA (rank ``--lora-rank``, alpha 2 x rank, every attention and MLP linear), learning rate
(constant), KL weight ``--beta`` to the base, number of steps and torch threads. Everything else
is each library's default (TRL: loss_type "dapo", gradient checkpointing on, AdamW; ours: the
grpo preset and task=arithmetic's update in micro-batches of 8, no gradient checkpointing,
AdamW), written into the results.

Each side runs in its own process (so the peak memories are separate):

* seconds per step: the median over the steps (first step excluded when there are 3 or more);
  ours split into rollout (generation) / scoring (reward + reference log-probs) / update; TRL's
  into generation+scoring (``_generate_and_score_completions``: generation, reward, reference
  log-probs) and the rest of the step (loss forward + backward + optimizer);
* peak memory: the process's RSS high-water mark (VmHWM) at the end of training, model loading
  included (the same model in both);
* the reward curve (mean reward of each step's samples);
* held-out greedy accuracy after the last step, on the first ``--heldout`` problems of the
  held-out set, measured by the same code for both (``arithmetic.evaluate``; TRL's adapter is
  merged into its base for it), and the base model's on the same problems.

    python -m benchmarks.e2e_trl_grpo [--steps 6] [--prompts 4] [--generations 8]
        [--completion-length 12] [--lora-rank 16] [--lr 2e-4] [--beta 0.04] [--threads 2]
        [--heldout 100] [--only ours|trl] [--device cpu|cuda] [--ours-minibatch 8]
        [--ours-gradient-checkpointing] [--no-save]

writes ``benchmarks/results/e2e_trl_grpo-<device>-<date>.json`` (rows: op ``e2e_trl_grpo``,
impl ``ours`` / ``trl``). The CPU may be shared with other work: the 1-minute load average is
recorded before and after each side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_RESULT = "RESULT "
MODEL = "smollm2-135m-instruct"


def _vmhwm_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _load() -> float:
    return os.getloadavg()[0]


def _median_steps(times: list[float]) -> float:
    kept = times[1:] if len(times) >= 3 else times
    return statistics.median(kept)


def _train_prompt_order(args) -> list[int]:
    """The train-problem indices our RL loop draws, step by step (rl._train: a generator seeded
    with seed * 1_000_003 + iteration, ``prompts`` rows). TRL gets them in this order."""
    import torch

    from rlhf import arithmetic

    n = len(arithmetic.problems("train"))
    order = []
    for iteration in range(args.steps):
        rng = torch.Generator().manual_seed(args.seed * 1_000_003 + iteration)
        order += torch.randint(n, (args.prompts,), generator=rng).tolist()
    return order


def _kernel_backend(device: str) -> str:
    """The backend our ops run in this process (what a user's ``rlhf`` run picks)."""
    import torch

    from rlhf_kernels.backend import resolve_backend, triton_interpreter_enabled

    if triton_interpreter_enabled():
        raise RuntimeError("the benchmark's 'ours' process imported rlhf_kernels with "
                           "TRITON_INTERPRET on: its ops would run interpreted Triton kernels, "
                           "not what a user's run does; run it with TRITON_INTERPRET=0")
    return resolve_backend(torch.empty(1, device=device), op="logprobs")


def _child_ours(args) -> dict:
    import torch

    from rlhf import arithmetic
    from rlhf import rl as rl_stage
    from rlhf.models import LoraSpec, SharedBackbone, load_tokenizer
    from rlhf.stage import cpu_allocator_setting, resolve_device

    torch.set_num_threads(args.threads)
    # the trainer's device set-up first, as `rlhf` runs it: on the CPU that installs its
    # allocator (rlhf.stage.bound_cpu_allocator_slack) before the model is loaded
    resolve_device(args.device)
    backend = _kernel_backend(args.device)
    tokenizer = load_tokenizer(args.model_dir)
    backbone = SharedBackbone.from_pretrained(
        args.model_dir, lora=LoraSpec(rank=args.lora_rank, alpha=2 * args.lora_rank),
        roles=("policy",), seed=args.seed)
    heldout = arithmetic.problems("heldout", args.heldout)
    evaluation = dict(max_new_tokens=args.completion_length, batch_size=100)
    backbone.to(args.device)
    base = arithmetic.evaluate(backbone, tokenizer, heldout, role=None, **evaluation)
    seen: list[list] = []

    def reward_fn(prompts, texts):
        seen.append([list(arithmetic.problem_of(p)) for p in prompts[::args.generations]])
        return arithmetic.rewards(prompts, texts)

    load_before = _load()
    with tempfile.TemporaryDirectory() as out:
        cfg = rl_stage.GRPOConfig(
            output_dir=out, num_iterations=args.steps,
            rollout_batch_size=args.prompts * args.generations, group_size=args.generations,
            minibatch_size=args.ours_minibatch,
            grad_accum_steps=args.prompts * args.generations // args.ours_minibatch,
            ppo_epochs=1, gradient_checkpointing=args.ours_gradient_checkpointing,
            max_prompt_length=64, max_new_tokens=args.completion_length, temperature=1.0,
            lr=args.lr, warmup_steps=0, min_lr_ratio=1.0, kl_coef=args.beta, kl_target=None,
            forward_batch_size=0, save_every=0, keep_last=1, seed=args.seed,
            device=args.device, cpu_threads=args.threads)
        summary = rl_stage.train(cfg, backbone=backbone, tokenizer=tokenizer,
                                 prompts=arithmetic.prompts("train"), reward_fn=reward_fn)
        records = [json.loads(line) for line in
                   (Path(out) / "metrics.jsonl").read_text().splitlines()]
    peak = _vmhwm_mib()
    load_after = _load()
    after = arithmetic.evaluate(backbone, tokenizer, heldout, **evaluation)
    return {
        "step_s": _median_steps([r["iteration_s"] for r in records]),
        "rollout_s": _median_steps([r["rollout_s"] for r in records]),
        "scoring_s": _median_steps([r["scoring_s"] for r in records]),
        "update_s": _median_steps([r["update_s"] for r in records]),
        "step_times_s": [r["iteration_s"] for r in records],
        "peak_rss_mib": peak,
        "reward_curve": [r["proxy_reward"] for r in records],
        "kl_curve": [r["kl"] for r in records],
        "base_accuracy": base["accuracy"], "base_stderr": base["stderr"],
        "accuracy": after["accuracy"], "stderr": after["stderr"],
        "prompts_seen": seen, "old_logprobs": summary["old_logprobs"],
        "kernel_backend": backend,
        "cpu_allocator": cpu_allocator_setting(),
        "settings": f"grpo preset (loss seq-mean-token-mean, k3 KL in the loss), one optimizer "
                    f"step per rollout in micro-batches of {args.ours_minibatch}, gradient "
                    f"checkpointing {args.ours_gradient_checkpointing}, AdamW",
        "load_average_1min": [load_before, load_after], "torch_threads": torch.get_num_threads(),
    }


def _child_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf import arithmetic
    from rlhf.models import SharedBackbone

    torch.set_num_threads(args.threads)
    train = arithmetic.problems("train")
    order = _train_prompt_order(args)
    dataset = Dataset.from_list([{"prompt": arithmetic.prompt(*train[i])} for i in order])
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    seen: list[list] = []
    rewards_per_step: list[float] = []

    def reward_func(prompts, completions, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        seen.append([list(arithmetic.problem_of(p)) for p in prompts[::args.generations]])
        scores = arithmetic.rewards(prompts, texts)
        rewards_per_step.append(sum(scores) / len(scores))
        return scores

    step_times: list[float] = []
    phase = {"generate_and_score": []}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, per_device_train_batch_size=args.prompts * args.generations,
            num_generations=args.generations, steps_per_generation=1,
            gradient_accumulation_steps=1, max_completion_length=args.completion_length,
            temperature=1.0, learning_rate=args.lr, lr_scheduler_type="constant",
            warmup_steps=0, beta=args.beta, max_steps=args.steps, shuffle_dataset=False,
            logging_steps=1, save_strategy="no", report_to="none", seed=args.seed,
            use_cpu=args.device == "cpu", bf16=False, dataloader_num_workers=0)
        trainer = GRPOTrainer(
            model=model, reward_funcs=reward_func, args=config, train_dataset=dataset,
            processing_class=tokenizer, callbacks=[StepTimer()],
            peft_config=LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                   lora_dropout=0.0, target_modules="all-linear",
                                   task_type="CAUSAL_LM"))
        inner = trainer._generate_and_score_completions

        def timed(*a, **k):
            started = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                phase["generate_and_score"].append(time.perf_counter() - started)

        trainer._generate_and_score_completions = timed
        load_before = _load()
        trainer.train()
        peak = _vmhwm_mib()
        load_after = _load()
        merged = trainer.model.merge_and_unload()
    heldout = arithmetic.problems("heldout", args.heldout)
    evaluation = dict(max_new_tokens=args.completion_length, batch_size=100)
    backbone = SharedBackbone.from_model(merged, roles=("policy",))
    after = arithmetic.evaluate(backbone, tokenizer, heldout, role=None, **evaluation)
    generate = phase["generate_and_score"]
    rest = [t - g for t, g in zip(step_times, generate)]
    import trl

    return {
        "step_s": _median_steps(step_times),
        "generate_and_score_s": _median_steps(generate),
        "update_s": _median_steps(rest),
        "step_times_s": step_times,
        "peak_rss_mib": peak,
        "reward_curve": rewards_per_step,
        "accuracy": after["accuracy"], "stderr": after["stderr"],
        "prompts_seen": seen,
        "settings": f"trl {trl.__version__} defaults (loss_type {config.loss_type}, "
                    f"gradient_checkpointing {config.gradient_checkpointing}, optim "
                    f"{config.optim}) with the shared settings",
        "load_average_1min": [load_before, load_after], "torch_threads": torch.get_num_threads(),
    }


def _run_child(side: str, args) -> dict:
    command = [sys.executable, "-m", "benchmarks.e2e_trl_grpo", "--child", side,
               "--model-dir", args.model_dir, *_shared_argv(args)]
    # TRITON_INTERPRET=0, not just unset: benchmarks/__init__.py turns the interpreter on for
    # the GPU scripts' CPU smoke mode, and with it our ops would run their Triton kernels
    # interpreted (tens of times slower) instead of the native CPU kernels a user's run gets.
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               TRITON_INTERPRET="0")
    print(f"[e2e_trl_grpo] {side}: {' '.join(command)}", file=sys.stderr)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith(_RESULT)]
    if result.returncode != 0 or not lines:
        tail = "\n".join((result.stderr or "").splitlines()[-25:])
        raise RuntimeError(f"the {side} run failed (exit {result.returncode}):\n{tail}")
    out = json.loads(lines[-1][len(_RESULT):])
    out["process_wall_s"] = time.perf_counter() - started
    return out


def _shared_argv(args) -> list[str]:
    return ["--steps", str(args.steps), "--prompts", str(args.prompts), "--generations",
            str(args.generations), "--completion-length", str(args.completion_length),
            "--lora-rank", str(args.lora_rank), "--lr", str(args.lr), "--beta", str(args.beta),
            "--threads", str(args.threads), "--heldout", str(args.heldout), "--seed",
            str(args.seed), "--device", args.device, "--ours-minibatch", str(args.ours_minibatch),
            *(["--ours-gradient-checkpointing"] if args.ours_gradient_checkpointing else [])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=12)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heldout", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--only", choices=("ours", "trl"))
    parser.add_argument("--ours-minibatch", type=int, default=8,
                        help="rows per micro-batch of our update (one optimizer step per rollout; "
                             "task=arithmetic's default 8)")
    parser.add_argument("--ours-gradient-checkpointing", action="store_true")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--child", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run = _child_ours if args.child == "ours" else _child_trl
        print(_RESULT + json.dumps(run(args)), flush=True)
        return 0

    from rlhf.models import resolve_pretrained

    args.model_dir = resolve_pretrained(args.model)[0]  # converts a named model once, here
    sides = [args.only] if args.only else ["ours", "trl"]
    runs = {side: _run_child(side, args) for side in sides}
    checks = {}
    if len(runs) == 2:
        ours, trl_run = runs["ours"], runs["trl"]
        checks = {
            "same_prompts_every_step": ours["prompts_seen"] == trl_run["prompts_seen"],
            "speedup_step_trl_over_ours": trl_run["step_s"] / ours["step_s"],
            "peak_rss_ours_over_trl": ours["peak_rss_mib"] / trl_run["peak_rss_mib"],
            "accuracy_difference_ours_minus_trl": ours["accuracy"] - trl_run["accuracy"],
            "accuracy_difference_stderr": (ours["stderr"] ** 2 + trl_run["stderr"] ** 2) ** 0.5,
        }
    case = (f"{args.model} arithmetic: {args.prompts} prompts x {args.generations}, "
            f"{args.completion_length} new tokens, LoRA r={args.lora_rank}, {args.steps} steps, "
            f"{args.threads} threads")
    rows = [{"op": "e2e_trl_grpo", "case": case, "impl": side, "s": run["step_s"],
             "peak_rss_mib": run["peak_rss_mib"], "heldout_accuracy": run["accuracy"],
             "heldout_stderr": run["stderr"], "heldout_n": args.heldout}
            for side, run in runs.items()]
    for side, run in runs.items():
        phases = ", ".join(f"{k} {run[k]:.1f}" for k in ("rollout_s", "scoring_s",
                                                         "generate_and_score_s", "update_s")
                           if k in run)
        print(f"{side:>4}: {run['step_s']:.1f} s/step (median; {phases}), peak RSS "
              f"{run['peak_rss_mib']:.0f} MiB, held-out accuracy {run['accuracy']:.3f} +- "
              f"{run['stderr']:.3f} on {args.heldout}, rewards "
              f"{[round(r, 3) for r in run['reward_curve']]}")
    if checks:
        print(json.dumps(checks, indent=2))
    if args.no_save:
        return 0
    import torch

    from benchmarks.common import environment as harness_environment

    environment = harness_environment()
    payload = {"environment": environment,
               "note": "seconds per step: medians over the steps (the first excluded when there "
                       "are 3 or more); peak_rss_mib: VmHWM of each side's own process at the end "
                       "of training (model loading included). The CPU was shared with other "
                       "work: see load_average_1min per side.",
               "settings": {k: v for k, v in vars(args).items() if k not in ("child",)},
               "runs": runs, "checks": checks, "rows": rows,
               "torch": torch.__version__}
    device = environment["device"].replace(" ", "_").replace("/", "_")
    path = Path(__file__).parent / "results" / (f"e2e_trl_grpo-{device}-"
                                                f"{environment['date'][:10]}.json")
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(main))
