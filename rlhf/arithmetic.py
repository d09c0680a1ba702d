"""``task=arithmetic``: RL with a verifiable reward, two-digit addition on a real chat model.

No SFT, no preference pairs, no reward model: the reward of a response is 1 when the number it
gives is the sum, else 0 (``rewards``), and the gold metric is the policy's greedy accuracy on a
held-out set of problems it never trains on (``evaluate``), with its standard error.

- Problems: every ``a + b`` with ``a, b`` in 10..99 (8,100). A fixed, seeded fifth-ish of them
  (``HELDOUT_SIZE`` = 1,000) is held out; RL draws its prompts from the other 7,100, so the two
  sets are disjoint (tests/trainer/test_arithmetic.py checks it).
- Prompt: ``"What is 59 + 63? Reply with just the number."`` as one user message, which the
  tokenizer's chat template renders (with SmolLM2's default system prompt).
- Answer parser (``parse_answer``): the first number after the last ``=`` when there is one
  ("59 + 63 = 122." -> 122), else the last number in the text ("The answer is 122" -> 122);
  thousands separators and ".0" are read; no number, or a non-integer one -> None (wrong).

``rlhf pipeline task=arithmetic model=smollm2-135m-instruct algorithm=grpo`` (rlhf/pipeline.py)
measures the base model's held-out accuracy, runs the RL stage with ``rewards`` as its reward
function (``rl.train(reward_fn=...)``; PPO gets a critic adapter on the same base), measures
the policy's, and writes summary.json, samples.md and curves.png. ``RL_SETTINGS`` are the tuned
defaults for this task on a 2-core CPU (docs/real_model.md).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence
from functools import cache

import torch

__all__ = ["HELDOUT_SIZE", "QUESTION", "RL_SETTINGS", "CRITIC_RL_SETTINGS", "evaluate",
           "parse_answer", "problem_of", "problems", "prompt", "prompts", "rewards"]

QUESTION = "What is {a} + {b}? Reply with just the number."
LOW, HIGH = 10, 99  # two-digit operands
HELDOUT_SIZE = 1000
_SPLIT_SEED = 16

# The RL stage's defaults on this task (GRPO; rlhf pipeline task=arithmetic starts from these):
# 4 prompts x 8 samples per iteration, one optimizer step on the whole rollout (the ratio is 1:
# the old log-probs are the ones recorded while sampling) in 4 micro-batches of 8 (a quarter of
# the activations: a 32 x 59-token fp32 forward of the 135M model holds ~3 GB for its backward),
# 12 new tokens at temperature 1, the KL to the base in the loss at a fixed weight.
# docs/real_model.md has the runs behind them.
RL_SETTINGS = {"num_iterations": 30, "rollout_batch_size": 32, "group_size": 8,
               "minibatch_size": 8, "grad_accum_steps": 4, "ppo_epochs": 1,
               "max_prompt_length": 64,
               "max_new_tokens": 12, "temperature": 1.0, "lr": 2e-4, "warmup_steps": 0,
               "min_lr_ratio": 1.0, "kl_coef": 0.04, "kl_target": None,
               "forward_batch_size": 0, "save_every": 10}
# PPO on this task: one sample per prompt, more prompts, a critic of its own (rl._fresh_critic)
CRITIC_RL_SETTINGS = {**{k: v for k, v in RL_SETTINGS.items() if k != "group_size"},
                      "minibatch_size": 8, "grad_accum_steps": 2, "ppo_epochs": 2,
                      "critic_lr": 2e-4}


def question(a: int, b: int) -> str:
    return QUESTION.format(a=a, b=b)


def prompt(a: int, b: int) -> list[dict[str, str]]:
    """The chat prompt of ``a + b``: one user message (the chat template adds the rest)."""
    return [{"role": "user", "content": question(a, b)}]


@cache
def _split() -> dict[str, tuple[tuple[int, int], ...]]:
    pairs = [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
    random.Random(_SPLIT_SEED).shuffle(pairs)
    return {"heldout": tuple(pairs[:HELDOUT_SIZE]), "train": tuple(pairs[HELDOUT_SIZE:])}


def problems(split: str = "train", n: int | None = None) -> list[tuple[int, int]]:
    """The (a, b) problems of ``split`` ("train": 7,100, "heldout": 1,000) in a fixed order;
    the first ``n`` (all when None)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    pool = _split()[split]
    if n is not None and not 0 <= n <= len(pool):
        raise ValueError(f"n must be in [0, {len(pool)}] for the {split} split, got {n}")
    return list(pool[:n])


def prompts(split: str = "train", n: int | None = None) -> list[list[dict[str, str]]]:
    """Chat prompts of ``problems(split, n)``."""
    return [prompt(a, b) for a, b in problems(split, n)]


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_PROBLEM = re.compile(r"What is (\d+) \+ (\d+)\?")


def _to_int(token: str) -> int | None:
    """'1,234' -> 1234, '122.0' -> 122, '122.5' -> None (not an integer answer)."""
    value = float(token.replace(",", ""))
    return int(value) if value.is_integer() else None


def parse_answer(text: str) -> int | None:
    """The integer a response gives as its answer (module docstring), or None."""
    if not isinstance(text, str):
        raise ValueError(f"parse_answer expects a response string, got {type(text).__name__}")
    if "=" in text:
        after = _NUMBER.search(text[text.rindex("=") + 1:])
        if after is not None:
            return _to_int(after.group())
    found = _NUMBER.findall(text)
    return _to_int(found[-1]) if found else None


def problem_of(item) -> tuple[int, int]:
    """(a, b) of a prompt: its chat messages (the last user message) or its text."""
    if isinstance(item, str):
        text = item
    elif isinstance(item, Sequence) and item and isinstance(item[-1], Mapping):
        text = next((m.get("content", "") for m in reversed(item) if m.get("role") == "user"),
                    "")
    else:
        raise ValueError(f"expected an arithmetic prompt (text or chat messages), got "
                         f"{type(item).__name__}")
    match = _PROBLEM.search(text)
    if match is None:
        raise ValueError(f"not an arithmetic prompt (no 'What is A + B?'): {text[:80]!r}")
    return int(match.group(1)), int(match.group(2))


def rewards(prompts_: Sequence, responses: Sequence[str]) -> list[float]:
    """1.0 where the response's answer is the prompt's sum, else 0.0 (``rl.train``'s
    ``reward_fn``: one prompt per response)."""
    if len(prompts_) != len(responses):
        raise ValueError(f"got {len(prompts_)} prompts for {len(responses)} responses")
    return [float(parse_answer(text) == sum(problem_of(p)))
            for p, text in zip(prompts_, responses)]


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    var = sum((x - mean) ** 2 for x in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


@torch.no_grad()
def evaluate(backbone, tokenizer, problem_list: Sequence[tuple[int, int]], *,
             role: str | None = "policy", max_new_tokens: int = 12,
             max_prompt_length: int = 64, batch_size: int = 100,
             autocast_dtype: torch.dtype | None = None) -> dict:
    """Greedy accuracy of ``role`` (None: the base model, adapters off) on ``problem_list``,
    sampled under ``autocast_dtype`` autocast (None: none; the pipeline passes the RL stage's,
    ``stage.autocast_dtype_for``, so that the accuracy is that of the model RL trains).

    Returns {"accuracy", "stderr" (of the mean of 0/1 outcomes), "n", "correct" (list of 0/1),
    "responses" (texts)}.
    """
    from rlhf import rl
    from rlhf.engine import RolloutEngine

    if not problem_list:
        raise ValueError("evaluate needs at least one problem")
    chats = [prompt(a, b) for a, b in problem_list]
    ids, mask = rl.encode_prompts(chats, tokenizer, max_prompt_length)
    device = backbone.device
    engine = RolloutEngine(backbone, role=role, autocast_dtype=autocast_dtype)
    was_training = backbone.training
    backbone.eval()
    texts: list[str] = []
    try:
        for start in range(0, len(chats), batch_size):
            generation = engine.generate(
                ids[start:start + batch_size].to(device), mask[start:start + batch_size].to(device),
                max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, greedy=True)
            texts += rl.decode_responses(tokenizer, generation)
    finally:
        engine.release()
        backbone.train(was_training)
    correct = rewards(chats, texts)
    accuracy, stderr = mean_stderr(correct)
    return {"accuracy": accuracy, "stderr": stderr, "n": len(correct), "correct": correct,
            "responses": texts}


# ----------------------------------------------------------------------------------------------
# rlhf pipeline task=arithmetic
# ----------------------------------------------------------------------------------------------
# Top-level pipeline settings of the review task that mean nothing here.
_REVIEWS_ONLY = ("corpus_size", "vocab_size", "hidden_size", "num_layers", "pair_prompts",
                 "heldout_pair_fraction", "label_beta", "eval_samples", "kl_bound",
                 "pair_temperature", "pair_top_k", "pair_top_p")


def check_pipeline_settings(cfg) -> tuple[str, ...]:
    """Refuse, with one clear ValueError, what ``rlhf pipeline task=arithmetic`` cannot honour;
    returns the top-level settings it does not use."""
    from dataclasses import asdict, fields

    from rlhf import pipeline, reward, sft

    if cfg.model is None:
        raise ValueError("task=arithmetic needs model= (the pretrained chat model to train, e.g. "
                         "model=smollm2-135m-instruct): it has no SFT stage to make one")
    defaults = {f.name: f.default for f in fields(cfg)}
    for name in _REVIEWS_ONLY:
        if getattr(cfg, name) != defaults[name]:
            raise ValueError(f"{name}={getattr(cfg, name)!r} has no effect with task=arithmetic "
                             f"(a setting of the review task); remove it")
    for name, stage_cfg, starts in (
            ("sft", cfg.sft, (pipeline._sft_defaults(), sft.SFTConfig())),
            ("reward", cfg.reward, (pipeline._reward_defaults(), reward.RewardConfig()))):
        if all(asdict(stage_cfg) != asdict(start) for start in starts):
            changed = sorted(k for k, v in asdict(stage_cfg).items()
                             if v != asdict(starts[0])[k])
            raise ValueError(f"{name}.{changed[0] if changed else '*'} has no effect with "
                             f"task=arithmetic: it has no {name} stage (RL with a verifiable "
                             f"reward on the pretrained model); remove it")
    if cfg.ppo.dataset is not None:
        raise ValueError(f"ppo.dataset={cfg.ppo.dataset!r} has no effect with task=arithmetic: "
                         f"its prompts are the generated addition problems")
    for name in ("model", "tokenizer"):
        if getattr(cfg.ppo, name) is not None:
            raise ValueError(f"ppo.{name}={getattr(cfg.ppo, name)!r} has no effect with "
                             f"task=arithmetic; set model= instead")
    ppo_defaults = {f.name: f.default for f in fields(cfg.ppo)}
    for name in pipeline._SET_BY_PIPELINE:
        value = getattr(cfg.ppo, name)
        if name != "algorithm" and value != ppo_defaults[name]:
            raise ValueError(f"ppo.{name}={value!r} cannot be set in rlhf pipeline: the pipeline "
                             f"sets it from its own {name}; set {name}= instead")
    for name in ("eval_problems", "curve_problems"):
        value = getattr(cfg, name)
        if not 1 <= value <= HELDOUT_SIZE:
            raise ValueError(f"{name} must be in [1, {HELDOUT_SIZE}] (the held-out problems), "
                             f"got {value}")
    if cfg.curve_every < 0:
        raise ValueError(f"curve_every must be >= 0 (0: no held-out curve), got "
                         f"{cfg.curve_every}")
    _rl_config(cfg).check_critic_settings()  # also for --print-config, not only the run
    return _REVIEWS_ONLY


def _rl_config(cfg):
    from dataclasses import replace
    from pathlib import Path

    from rlhf import pipeline

    settings = {"output_dir": str(Path(cfg.output_dir) / cfg.algorithm),
                "seed": cfg.seed, "device": cfg.device, "max_memory": cfg.max_memory,
                "resume": cfg.resume, "cpu_threads": cfg.cpu_threads,
                "algorithm": cfg.algorithm,
                "gradient_checkpointing": getattr(cfg, "gradient_checkpointing", False)}
    rl_cfg = replace(cfg.ppo, **settings)
    if not rl_cfg.settings.uses_critic:
        rl_cfg = replace(rl_cfg, **pipeline._critic_defaults())
    return rl_cfg


def used_config(cfg, unused: tuple[str, ...]) -> dict:
    """The settings a ``task=arithmetic`` pipeline run uses (summary.json, --print-config)."""
    from dataclasses import asdict

    from rlhf import rl

    used = {k: v for k, v in asdict(cfg).items()
            if k not in unused and k not in ("sft", "reward", "ppo")}
    rl_cfg = _rl_config(cfg)
    used["ppo"] = rl.used_settings(rl_cfg, {k: v for k, v in asdict(rl_cfg).items()
                                            if k not in ("overwrite", "model", "tokenizer",
                                                         "dataset")})
    return used


def run_pipeline(cfg, run_dir) -> dict:
    """``rlhf pipeline task=arithmetic``: base accuracy -> RL with the exact-match reward ->
    policy accuracy, samples, curves, summary (files as in rlhf/pipeline.py's docstring)."""
    import json
    import time
    from pathlib import Path

    from rlhf import distributed, pipeline, rl, stage
    from rlhf.checkpoint import atomic_write_text
    from rlhf.metrics import plot_curves
    from rlhf.models import LoraSpec, SharedBackbone, load_tokenizer
    from rlhf.stage import resolve_device

    check_pipeline_settings(cfg)
    rl_cfg = _rl_config(cfg)
    rl_cfg.check_critic_settings()  # before the base evaluation, not after it
    label = pipeline._LABELS[cfg.algorithm]
    out = Path(cfg.output_dir)
    rl_dir = out / cfg.algorithm
    started = time.perf_counter()
    timings: dict[str, float] = {}
    tokenizer = load_tokenizer(cfg.model, setting="model")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"model={cfg.model!r}: its tokenizer has no chat template; "
                         f"task=arithmetic asks its questions as chat messages (use a chat/"
                         f"instruct model)")
    roles = ("policy", "critic") if rl_cfg.settings.uses_critic else ("policy",)
    backbone = SharedBackbone.from_pretrained(
        cfg.model, lora=LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha), roles=roles,
        seed=cfg.seed)
    device = resolve_device(cfg.device, cfg.max_memory)
    backbone.to(device)
    heldout = problems("heldout", cfg.eval_problems)
    # in the RL stage's numerics (bf16 autocast on a GPU with ppo.bf16), as rl.train samples
    evaluation = dict(max_new_tokens=rl_cfg.max_new_tokens,
                      max_prompt_length=rl_cfg.max_prompt_length,
                      batch_size=cfg.sample_batch_size,
                      autocast_dtype=stage.autocast_dtype_for(device, rl_cfg.bf16))

    # ---- 1. the base model's held-out accuracy (kept for --resume) ----
    t0 = time.perf_counter()
    base_file = out / "base_eval.json"
    # torchrun: rank 0 alone reads and writes output_dir, every rank gets what it read
    # (pipeline._on_main); every rank evaluates (a sharded model needs them all)
    base = pipeline._on_main(lambda: json.loads(base_file.read_text())
                             if cfg.resume and base_file.exists() else None)
    if base is None:
        base = evaluate(backbone, tokenizer, heldout, role=None, **evaluation)
        pipeline._on_main(lambda: pipeline._write_json(base_file, base))
    timings["base_eval_s"] = time.perf_counter() - t0

    # ---- 2. RL with the exact-match reward; a held-out curve on the side ----
    t0 = time.perf_counter()
    # the curve's points so far, kept on disk: a resumed RL run calls on_iteration only for the
    # iterations it runs, so the points of the interrupted part come from here (those it
    # re-does, after its checkpoint, are measured again on the same weights and replaced)
    curve_file = out / "heldout_curve.json"
    points = {point["iteration"]: point for point in pipeline._on_main(
        lambda: json.loads(curve_file.read_text()) if cfg.resume and curve_file.exists()
        else [])}
    points[0] = {"iteration": 0, "gold_reward": _first(base, cfg.curve_problems)}

    def on_iteration(iteration: int, metrics: dict) -> None:
        if cfg.curve_every and iteration % cfg.curve_every == 0 \
                and iteration < rl_cfg.num_iterations:
            result = evaluate(backbone, tokenizer, heldout[:cfg.curve_problems], **evaluation)
            points[iteration] = {"iteration": iteration, "gold_reward": result["accuracy"]}
            pipeline._on_main(lambda: atomic_write_text(
                curve_file, json.dumps([points[i] for i in sorted(points)])))

    rl_summary = pipeline._on_main(lambda: pipeline._stage_done(rl_dir, cfg.resume, run_dir))
    if rl_summary is None:
        rl_summary = pipeline._plain(rl.train(rl_cfg, backbone=backbone, tokenizer=tokenizer,
                                              prompts=prompts("train"), reward_fn=rewards,
                                              on_iteration=on_iteration))
        pipeline._on_main(lambda: pipeline._write_json(rl_dir / "summary.json",
                                                       {**rl_summary, "run_id": run_dir.run_id}))
    else:  # resumed after RL: its policy adapter
        backbone = SharedBackbone.load(rl_dir / "backbone")
        backbone.to(resolve_device(cfg.device, cfg.max_memory))
    timings["rl_s"] = time.perf_counter() - t0
    curve = [points[i] for i in sorted(points) if i < rl_cfg.num_iterations]

    # ---- 3. the policy's held-out accuracy ----
    t0 = time.perf_counter()
    after = evaluate(backbone, tokenizer, heldout, **evaluation)
    curve.append({"iteration": rl_cfg.num_iterations, "gold_reward": after["accuracy"],
                  "gold_reward_n": after["n"]})
    timings["eval_s"] = time.perf_counter() - t0

    # ---- 4. results ----
    shown = [{"prompt": question(a, b), "before": base["responses"][i],
              "after": after["responses"][i], "gold_before": base["correct"][i],
              "gold_after": after["correct"][i]}
             for i, (a, b) in enumerate(heldout[:cfg.n_show_samples])]

    def write_results() -> None:  # (rank 0)
        records = [json.loads(line) for line in
                   (rl_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        atomic_write_text(out / "metrics.jsonl", "".join(
            json.dumps(r) + "\n" for r in records + [
                {**point, "heldout_accuracy": point["gold_reward"]} for point in curve]))
        plot_curves(out / "metrics.jsonl", out / "curves.png", samples=shown[:4],
                    title=f"{label} on task=arithmetic ({cfg.model}); gold = held-out greedy "
                          f"accuracy", after=label)
        _write_samples(out / "samples.md", shown, label, cfg.model)

    pipeline._on_main(write_results)
    timings["total_s"] = time.perf_counter() - started
    difference = after["accuracy"] - base["accuracy"]
    difference_se = math.sqrt(base["stderr"] ** 2 + after["stderr"] ** 2)
    summary = {
        "task": "arithmetic",
        "model": cfg.model,
        "algorithm": cfg.algorithm,
        "heldout_accuracy": {
            "n_problems": after["n"], "decoding": "greedy",
            "max_new_tokens": rl_cfg.max_new_tokens,
            "base_mean": base["accuracy"], "base_stderr": base["stderr"],
            "policy_mean": after["accuracy"], "policy_stderr": after["stderr"],
            "difference": difference, "difference_stderr": difference_se,
            "difference_in_stderr": difference / difference_se if difference_se > 0 else 0.0,
        },
        "heldout_curve": curve,
        "ppo_last_iteration": rl_summary.get("last_metrics", {}),
        "timings_s": timings,
        "torch_threads": torch.get_num_threads(),
        "world_size": distributed.world_size(),  # torchrun: the number of ranks
        "config": used_config(cfg, _REVIEWS_ONLY),
    }
    pipeline._on_main(lambda: pipeline._write_json(out / "summary.json", summary))
    acc = summary["heldout_accuracy"]
    if not distributed.is_main():  # torchrun: one summary
        return summary
    print(f"\nheld-out greedy accuracy on {acc['n_problems']} problems: base "
          f"{acc['base_mean']:.3f} +- {acc['base_stderr']:.3f}, {label} {acc['policy_mean']:.3f}"
          f" +- {acc['policy_stderr']:.3f} (difference {difference:+.3f} = "
          f"{acc['difference_in_stderr']:.1f} standard errors)\ntotal "
          f"{timings['total_s']:.0f} s; outputs in {out}")
    return summary


def _first(result: dict, n: int) -> float:
    """The accuracy on the first ``n`` problems of an evaluation."""
    head = result["correct"][:n]
    return sum(head) / len(head)


def _write_samples(path, shown: list[dict], label: str, model: str) -> None:
    lines = [f"# Held-out problems: {model} before {label} vs after", "",
             "Greedy decoding; gold = 1 when the answer (the number after the last '=', else the "
             "last number) is the sum.", ""]
    for row in shown:
        lines += [f"## {row['prompt']}", "",
                  f"- before (gold {row['gold_before']:.0f}): {row['before'].strip()!r}",
                  f"- after  (gold {row['gold_after']:.0f}): {row['after'].strip()!r}", ""]
    path.write_text("\n".join(lines))
