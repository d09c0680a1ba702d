"""The built-in task end to end: corpus, tokenizer, SFT, pairs, RM, PPO, held-out eval.

``rlhf pipeline`` (no arguments) calls ``run(PipelineConfig())``. Everything lands under
``cfg.output_dir`` (default ``runs/pipeline``)::

    tokenizer/            the BPE tokenizer trained on the corpus
    sft/                  SFT metrics.jsonl, checkpoints/, model/ (the tiny Llama = the reference)
    pairs.jsonl           preference pairs sampled from the SFT model, labelled by VADER + noise
    rm/                   reward-model metrics.jsonl, checkpoints/, backbone/ (reward adapter)
    ppo/                  PPO metrics.jsonl, checkpoints/, backbone/ (policy, critic, reward)
    metrics.jsonl         the PPO curves (a copy of ppo/metrics.jsonl)
    curves.png            proxy reward, gold reward, KL, entropy, losses per PPO iteration
    samples.md            held-out samples of the SFT model and of the PPO policy, with scores
    summary.json          the numbers below, plus timings

Evaluation on held-out prompts (prompt combinations PPO never saw): ``eval_samples`` responses
from the SFT model (the backbone with adapters off) and from the PPO policy, each scored by the
gold judge (VADER). Reported: mean +- standard error of each, the difference and its size in
standard errors of the difference, sqrt(se_sft^2 + se_ppo^2) (two independent samples), and the
mean summed KL(policy || SFT) of the policy's samples (k1 estimate, nats per response) next to
the bound ``kl_bound`` (default: the PPO ``kl_target``).

``resume=True`` skips every stage whose outputs are complete (its ``summary.json`` exists) and
resumes the interrupted stage from its last checkpoint. ``output_dir`` is locked for the run and
its ``run.json`` ties every file there to it (rlhf/checkpoint.py, ``open_run``): resuming with a
changed setting is refused (a finished stage must not be reused under settings it was not run
with), and a fresh run into a directory holding a run is refused unless ``overwrite=true``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf import ppo, reward, sft
from rlhf.checkpoint import (
    PIPELINE_RUN_FILES,
    RunDirectory,
    atomic_directory,
    atomic_write_text,
    open_run,
)
from rlhf.engine import RolloutEngine
from rlhf.seeding import seeded

__all__ = ["PipelineConfig", "run"]


def _sft_defaults() -> sft.SFTConfig:
    return sft.SFTConfig()


def _reward_defaults() -> reward.RewardConfig:
    return reward.RewardConfig()


def _ppo_defaults() -> ppo.PPOConfig:
    return ppo.PPOConfig()


@dataclass
class PipelineConfig:
    """The built-in task end to end. Stage settings nest (``ppo.kl_target=4`` on the CLI); their
    ``output_dir``, ``seed``, ``device``, ``max_memory`` and ``resume`` are set by the pipeline
    from the fields here."""

    output_dir: str = "runs/pipeline"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # a fresh run deletes an earlier run's files in output_dir first
    device: str = "auto"
    max_memory: float | None = None  # GiB: cap CUDA memory (emulates a smaller card)
    corpus_size: int = 4000
    vocab_size: int = 1024
    hidden_size: int = 64
    num_layers: int = 2
    pair_prompts: int = 2000  # each gets two SFT samples -> one labelled pair (ties dropped)
    heldout_pair_fraction: float = 0.2
    label_beta: float = 5.0  # Bradley-Terry inverse temperature of the simulated annotator
    lora_rank: int = 16
    lora_alpha: int = 32
    sample_batch_size: int = 256
    eval_samples: int = 400  # responses per policy on held-out prompts (cycling over the 40)
    kl_bound: float | None = None  # None: ppo.kl_target
    # torch intra-op threads when running on the CPU (None: torch's default, OMP_NUM_THREADS).
    # The tiny model's matrices are too small to gain much from more threads, and when other
    # processes share the cores, multi-thread barriers make every op many times slower
    # (measured here: an SFT step took 0.13 s on 1 thread vs 1.9 s on 2 on a busy 2-core box).
    cpu_threads: int | None = 1
    n_show_samples: int = 8
    sft: sft.SFTConfig = field(default_factory=_sft_defaults)
    reward: reward.RewardConfig = field(default_factory=_reward_defaults)
    ppo: ppo.PPOConfig = field(default_factory=_ppo_defaults)


@torch.no_grad()
def sample_texts(backbone, tokenizer, prompts: list[str], role: str | None,
                 ppo_cfg: ppo.PPOConfig, seed: int, batch_size: int):
    """Sample one response per prompt with ``role`` (None = the reference/SFT model) through the
    rollout engine, with the sampling settings of ``ppo_cfg`` (max_prompt_length,
    max_new_tokens, temperature, top_k, top_p).

    Returns (texts, kl) where kl (N,) is the summed k1 KL(role || reference) of each response:
    the engine's recorded log-probs (those of the distribution that drew the tokens) minus the
    reference's, over the response tokens.
    """
    ids, mask = ppo.encode_prompts(prompts, tokenizer, ppo_cfg.max_prompt_length)
    device = backbone.device
    engine = RolloutEngine(backbone, role=role)
    generator = torch.Generator(device=device).manual_seed(seed)
    texts: list[str] = []
    kls: list[torch.Tensor] = []
    backbone.eval()
    desc = f"sampling ({role or 'SFT model'})"
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, dynamic_ncols=True):
        gen = engine.generate(
            ids[start:start + batch_size].to(device), mask[start:start + batch_size].to(device),
            ppo_cfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, temperature=ppo_cfg.temperature,
            top_k=ppo_cfg.top_k, top_p=ppo_cfg.top_p, generator=generator,
        ).without_prompt_padding()
        texts += ppo.decode_responses(tokenizer, gen)
        if role is None:
            kls.append(torch.zeros(gen.sequences.shape[0]))
        else:
            ref = backbone.reference_logprobs(gen.sequences, gen.attention_mask,
                                              temperature=ppo_cfg.temperature)
            ref = ref[:, gen.prompt_length - 1:] * gen.response_mask
            kls.append((gen.logprobs - ref).sum(-1).cpu())
    engine.release()
    return texts, torch.cat(kls)


def _mean_stderr(values) -> tuple[float, float]:
    x = torch.as_tensor(values, dtype=torch.float64)
    n = x.numel()
    return float(x.mean()), float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0


def _write_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def _stage_done(directory: Path, resume: bool, run_dir: RunDirectory) -> dict | None:
    """The summary of a finished stage of this run (resume only), else None."""
    summary = directory / "summary.json"
    if resume and summary.exists():
        loaded = json.loads(summary.read_text())
        run_dir.check_run_id(loaded.get("run_id"), str(summary))
        return loaded
    return None


def _plain(summary: dict) -> dict:
    """A stage summary without the live objects (model, tokenizer) it also returns."""
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool, dict,
                                                                list, type(None)))}


def run(cfg: PipelineConfig) -> dict:
    """Run the built-in task end to end; returns (and writes) the summary."""
    previous_threads = torch.get_num_threads()
    if cfg.cpu_threads is not None and sft.resolve_device(cfg.device).type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)
    try:
        with open_run(cfg.output_dir, "pipeline", asdict(cfg), resume=cfg.resume,
                      overwrite=cfg.overwrite, run_files=PIPELINE_RUN_FILES) as run_dir:
            return _run(cfg, run_dir)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: PipelineConfig, run_dir: RunDirectory) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from rlhf import task
    from rlhf.metrics import plot_curves
    from rlhf.models import LoraSpec, SharedBackbone

    started = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, stage_cfg in (("sft", cfg.sft), ("rm", cfg.reward), ("ppo", cfg.ppo)):
        stage_cfg.output_dir = str(out / name)
        stage_cfg.seed = cfg.seed
        stage_cfg.device = cfg.device
        stage_cfg.max_memory = cfg.max_memory
        stage_cfg.resume = cfg.resume

    # ---- 1. corpus and tokenizer ----
    corpus = task.make_corpus(cfg.corpus_size, seed=cfg.seed)
    tokenizer_dir = out / "tokenizer"
    if cfg.resume and (tokenizer_dir / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = task.train_tokenizer([ex["prompt"] + ex["completion"] for ex in corpus],
                                         vocab_size=cfg.vocab_size)
        with atomic_directory(tokenizer_dir) as temp:
            tokenizer.save_pretrained(temp)

    # ---- 2. SFT: a tiny Llama from scratch ----
    t0 = time.perf_counter()
    sft_summary = _stage_done(out / "sft", cfg.resume, run_dir)
    if sft_summary is not None:  # this run's own files (not a path the summary names)
        model = AutoModelForCausalLM.from_pretrained(out / "sft" / "model")
    else:
        with seeded(cfg.seed):  # the initial weights depend on the seed alone
            model = LlamaForCausalLM(task.tiny_llama_config(
                tokenizer, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                intermediate_size=3 * cfg.hidden_size))
        sft_summary = _plain(sft.train(cfg.sft, model=model, tokenizer=tokenizer,
                                       examples=corpus))
        _write_json(out / "sft" / "summary.json", {**sft_summary, "run_id": run_dir.run_id})
    timings["sft_s"] = time.perf_counter() - t0

    # ---- 3. preference pairs sampled from the SFT model, labelled by VADER + BT noise ----
    t0 = time.perf_counter()
    rm_summary = _stage_done(out / "rm", cfg.resume, run_dir)
    ppo_summary = _stage_done(out / "ppo", cfg.resume, run_dir)
    if ppo_summary is not None:  # resuming after PPO: its backbone holds every adapter
        backbone = SharedBackbone.load(out / "ppo" / "backbone")
    elif rm_summary is not None:
        backbone = SharedBackbone.load(out / "rm" / "backbone")
    else:
        backbone = SharedBackbone.from_model(
            model, lora=LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha), seed=cfg.seed)
    backbone.to(sft.resolve_device(cfg.device, cfg.max_memory))
    pairs_path = out / "pairs.jsonl"
    if cfg.resume and pairs_path.exists():
        records = [json.loads(line) for line in pairs_path.read_text().splitlines()]
        pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records]
        split = [r["split"] for r in records]
        ceiling_all = records[0]["noise_ceiling"] if records else float("nan")
    else:
        prompts = task.ppo_prompts(cfg.pair_prompts, seed=cfg.seed, split="train")
        texts_a, _ = sample_texts(backbone, tokenizer, prompts, None, cfg.ppo, cfg.seed + 11,
                                  cfg.sample_batch_size)
        texts_b, _ = sample_texts(backbone, tokenizer, prompts, None, cfg.ppo, cfg.seed + 12,
                                  cfg.sample_batch_size)
        pairs, ceiling_all = task.label_pairs(prompts, texts_a, texts_b, beta=cfg.label_beta,
                                              seed=cfg.seed)
        if len(pairs) < 10:
            raise ValueError(
                f"only {len(pairs)} of {len(prompts)} sampled pairs have different gold scores "
                "(ties carry no preference and are dropped): the SFT model is too weak to write "
                "reviews; train it longer (sft.max_steps) or raise pair_prompts"
            )
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed))
        n_eval = int(round(len(pairs) * cfg.heldout_pair_fraction))
        eval_rows = set(order[:n_eval].tolist())
        split = ["eval" if i in eval_rows else "train" for i in range(len(pairs))]
        atomic_write_text(pairs_path, "".join(
            json.dumps({**pair, "split": which, "noise_ceiling": ceiling_all}) + "\n"
            for pair, which in zip(pairs, split)))
    train_pairs = [p for p, s in zip(pairs, split) if s == "train"]
    eval_pairs = [p for p, s in zip(pairs, split) if s == "eval"]
    # the ceiling of the held-out pairs alone: the bar the held-out accuracy is compared with
    gold_c = task.gold_scores([p["chosen"] for p in eval_pairs])
    gold_r = task.gold_scores([p["rejected"] for p in eval_pairs])
    eval_ceiling = sum(
        max(q, 1 - q) for q in (1 / (1 + math.exp(-cfg.label_beta * (c - r)))
                                for c, r in zip(gold_c, gold_r))
    ) / max(1, len(eval_pairs))
    timings["pairs_s"] = time.perf_counter() - t0

    # ---- 4. reward model ----
    t0 = time.perf_counter()
    if rm_summary is None:
        rm_summary = _plain(reward.train(cfg.reward, backbone=backbone, tokenizer=tokenizer,
                                         train_pairs=train_pairs, eval_pairs=eval_pairs))
        _write_json(out / "rm" / "summary.json", {**rm_summary, "run_id": run_dir.run_id})
    timings["rm_s"] = time.perf_counter() - t0

    # ---- 5. PPO ----
    t0 = time.perf_counter()
    if ppo_summary is None:
        ppo_summary = _plain(ppo.train(cfg.ppo, backbone=backbone, tokenizer=tokenizer,
                                       prompts=task.all_prompts("train"),
                                       gold_fn=task.gold_scores))
        _write_json(out / "ppo" / "summary.json", {**ppo_summary, "run_id": run_dir.run_id})
    timings["ppo_s"] = time.perf_counter() - t0

    # ---- 6. held-out evaluation: SFT vs PPO samples by the gold judge ----
    t0 = time.perf_counter()
    heldout = task.ppo_prompts(cfg.eval_samples, seed=cfg.seed + 1, split="heldout")
    sft_texts, _ = sample_texts(backbone, tokenizer, heldout, None, cfg.ppo, cfg.seed + 21,
                                cfg.sample_batch_size)
    ppo_texts, kl = sample_texts(backbone, tokenizer, heldout, "policy", cfg.ppo,
                                 cfg.seed + 22, cfg.sample_batch_size)
    sft_gold, ppo_gold = task.gold_scores(sft_texts), task.gold_scores(ppo_texts)
    sft_mean, sft_se = _mean_stderr(sft_gold)
    ppo_mean, ppo_se = _mean_stderr(ppo_gold)
    diff_se = math.sqrt(sft_se ** 2 + ppo_se ** 2)
    kl_mean, kl_se = _mean_stderr(kl)
    kl_bound = cfg.kl_bound if cfg.kl_bound is not None else cfg.ppo.kl_target
    timings["eval_s"] = time.perf_counter() - t0

    # ---- 7. write the results ----
    shutil.copyfile(out / "ppo" / "metrics.jsonl", out / "metrics.jsonl")
    shown = [{"prompt": heldout[i], "before": sft_texts[i], "after": ppo_texts[i],
              "gold_before": sft_gold[i], "gold_after": ppo_gold[i]}
             for i in range(min(cfg.n_show_samples, len(heldout)))]
    plot_curves(out / "metrics.jsonl", out / "curves.png", samples=shown[:4],
                title="PPO on the built-in review task")
    _write_samples(out / "samples.md", heldout, sft_texts, sft_gold, ppo_texts, ppo_gold,
                   cfg.n_show_samples)
    timings["total_s"] = time.perf_counter() - started
    summary = {
        "reward_model": {
            "heldout_accuracy": rm_summary.get("eval_accuracy"),
            "noise_ceiling_heldout": eval_ceiling,
            "noise_ceiling_all_pairs": ceiling_all,
            "train_pairs": len(train_pairs),
            "heldout_pairs": len(eval_pairs),
        },
        "gold_heldout": {
            "n_samples_each": len(heldout),
            "sft_mean": sft_mean, "sft_stderr": sft_se,
            "ppo_mean": ppo_mean, "ppo_stderr": ppo_se,
            "difference": ppo_mean - sft_mean,
            "difference_stderr": diff_se,
            "difference_in_stderr": (ppo_mean - sft_mean) / diff_se if diff_se > 0 else 0.0,
        },
        "kl_to_reference": {"mean": kl_mean, "stderr": kl_se, "bound": kl_bound,
                            "within_bound": kl_bound is None or kl_mean <= kl_bound},
        "ppo_last_iteration": ppo_summary.get("last_metrics", {}),
        "sft_final_loss": sft_summary.get("final_loss"),
        "timings_s": timings,
        "torch_threads": torch.get_num_threads(),
        "config": asdict(cfg),
    }
    _write_json(out / "summary.json", summary)
    _print_summary(summary, out)
    return summary


def _write_samples(path: Path, prompts, sft_texts, sft_gold, ppo_texts, ppo_gold, n: int):
    lines = ["# Held-out samples: SFT model (before PPO) vs PPO policy (after)", "",
             "Gold score = VADER compound sentiment in [-1, 1].", ""]
    for i in range(min(n, len(prompts))):
        lines += [f"## {prompts[i]}", "",
                  f"- before (gold {sft_gold[i]:+.3f}): {sft_texts[i].strip()}",
                  f"- after  (gold {ppo_gold[i]:+.3f}): {ppo_texts[i].strip()}", ""]
    path.write_text("\n".join(lines))


def _print_summary(summary: dict, out: Path) -> None:
    rm, gold, kl = summary["reward_model"], summary["gold_heldout"], summary["kl_to_reference"]
    print(
        f"\nreward model held-out accuracy {rm['heldout_accuracy']:.3f} "
        f"(label-noise ceiling {rm['noise_ceiling_heldout']:.3f})\n"
        f"gold (VADER) on held-out prompts: SFT {gold['sft_mean']:+.3f} +- {gold['sft_stderr']:.3f}"
        f", PPO {gold['ppo_mean']:+.3f} +- {gold['ppo_stderr']:.3f}; difference "
        f"{gold['difference']:+.3f} = {gold['difference_in_stderr']:.1f} standard errors\n"
        f"KL(policy || SFT) {kl['mean']:.2f} +- {kl['stderr']:.2f} nats per response "
        f"(bound {kl['bound']})\n"
        f"total {summary['timings_s']['total_s']:.0f} s; outputs in {out}"
    )
