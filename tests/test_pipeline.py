"""`rlhf.pipeline.run` end to end on a micro configuration (seconds): every output is written,
the summary holds the acceptance numbers, resume skips finished stages, and resuming from any
point reproduces the uninterrupted run's summary exactly."""

from __future__ import annotations

import json
import shutil

import pytest

from rlhf.pipeline import PipelineConfig, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    # The loops, not the kernels, are under test (see tests/test_stages.py).
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")


def micro_config(output_dir) -> PipelineConfig:
    cfg = PipelineConfig(output_dir=str(output_dir), device="cpu", corpus_size=160,
                         vocab_size=300, hidden_size=32, num_layers=1, pair_prompts=96,
                         lora_rank=4, lora_alpha=8, eval_samples=16, sample_batch_size=32)
    cfg.sft.max_steps, cfg.sft.batch_size, cfg.sft.warmup_steps, cfg.sft.lr = 80, 16, 4, 1e-2
    cfg.reward.epochs, cfg.reward.batch_size, cfg.reward.save_every = 1.0, 2, 1
    cfg.ppo.num_iterations, cfg.ppo.rollout_batch_size, cfg.ppo.minibatch_size = 2, 8, 4
    cfg.ppo.max_new_tokens, cfg.ppo.max_prompt_length, cfg.ppo.save_every = 16, 40, 1
    return cfg


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted micro run, shared by the tests below: (output dir, summary)."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RLHF_KERNELS_BACKEND", "reference")
        summary = run(micro_config(out))
    return out, json.loads(json.dumps(summary, default=str))


def _figures(summary: dict) -> dict:
    """A summary without what legitimately differs between runs: timings, peak memory, and the
    config's resume flags and output folders (the tests resume in a copy)."""

    def keep(key: str) -> bool:
        return not (key.endswith("_s") or key in ("tokens_per_s", "pairs_per_s",
                                                   "peak_memory_mb", "resume", "output_dir"))

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if keep(k)}
        return value

    return strip(json.loads(json.dumps(summary, default=str)))


def _checkpoints(directory):
    return sorted((directory / "checkpoints").glob("step-*"))


def test_pipeline_writes_everything_and_resume_skips_done_stages(finished, tmp_path):
    src, summary = finished
    out = tmp_path / "run"
    shutil.copytree(src, out)
    for name in ("summary.json", "metrics.jsonl", "curves.png", "samples.md", "pairs.jsonl",
                 "tokenizer/tokenizer.json", "sft/model/config.json", "rm/backbone/roles.json",
                 "ppo/backbone/roles.json", "ppo/metrics.jsonl"):
        assert (out / name).exists(), name
    written = json.loads((out / "summary.json").read_text())
    rm, gold, kl = written["reward_model"], written["gold_heldout"], written["kl_to_reference"]
    assert 0.0 <= rm["heldout_accuracy"] <= 1.0
    assert 0.5 <= rm["noise_ceiling_heldout"] <= 1.0
    assert gold["n_samples_each"] == 16
    for key in ("sft_mean", "ppo_mean"):
        assert -1.0 <= gold[key] <= 1.0
    assert gold["difference"] == pytest.approx(gold["ppo_mean"] - gold["sft_mean"])
    # independent standard errors of two means add in quadrature
    assert gold["sft_stderr"] > 0 and gold["ppo_stderr"] > 0
    assert gold["difference_stderr"] == pytest.approx(
        (gold["sft_stderr"] ** 2 + gold["ppo_stderr"] ** 2) ** 0.5)
    assert gold["difference_in_stderr"] == pytest.approx(
        gold["difference"] / gold["difference_stderr"])
    assert kl["bound"] == written["config"]["ppo"]["kl_target"]
    assert kl["mean"] == kl["mean"] and kl["stderr"] >= 0  # measured (not NaN)
    # the verdict is the comparison of the measured KL with the bound (only a bool before)
    assert kl["within_bound"] is (kl["mean"] <= kl["bound"])
    assert "before" in (out / "samples.md").read_text()
    assert summary["reward_model"] == rm
    ppo_lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(ppo_lines) == 2 and "gold_reward" in json.loads(ppo_lines[-1])

    # resume: every stage is complete, so none is trained again and the stage numbers stay
    sft_metrics = (out / "sft" / "metrics.jsonl").read_text()
    cfg = micro_config(out)
    cfg.resume = True
    again = run(cfg)
    assert (out / "sft" / "metrics.jsonl").read_text() == sft_metrics
    assert _figures(again) == _figures(summary)
    assert again["timings_s"]["sft_s"] < summary["timings_s"]["sft_s"]


def _remove(*paths) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _keep_first_checkpoint(stage_dir) -> None:
    """An interruption inside a stage: only its first periodic checkpoint was written."""
    checkpoints = _checkpoints(stage_dir)
    assert len(checkpoints) >= 2, checkpoints
    _remove(*checkpoints[1:], stage_dir / "summary.json", stage_dir / "backbone")


# Each interruption point: what a kill there leaves undone, removed from a finished run.
INTERRUPTIONS = {
    "after SFT": lambda out: _remove(out / "pairs.jsonl", out / "rm", out / "ppo"),
    "after pair sampling": lambda out: _remove(out / "rm", out / "ppo"),
    "during RM training": lambda out: (_remove(out / "ppo"), _keep_first_checkpoint(out / "rm")),
    "after RM training": lambda out: _remove(out / "ppo"),
    "during PPO": lambda out: _keep_first_checkpoint(out / "ppo"),
}


@pytest.mark.parametrize("point", list(INTERRUPTIONS))
def test_resume_from_any_point_reproduces_the_uninterrupted_summary(finished, tmp_path, point):
    """Resuming must give every figure of the uninterrupted run (timings aside). Before, the
    adapters and heads were initialised from the global RNG, whose state differs when the SFT
    model is loaded instead of trained: 24 of 38 figures changed."""
    src, summary = finished
    out = tmp_path / "run"
    shutil.copytree(src, out)
    _remove(out / "summary.json", out / "metrics.jsonl", out / "curves.png", out / "samples.md")
    INTERRUPTIONS[point](out)
    cfg = micro_config(out)
    cfg.resume = True
    resumed = run(cfg)
    assert _figures(resumed) == _figures(summary)
    assert _figures(json.loads((out / "summary.json").read_text())) == _figures(summary)


def test_a_stage_with_dropout_resumes_exactly(tmp_path):
    """Dropout draws from the global RNG; each step seeds it from (seed, stage, step), so a run
    resumed in a fresh state (here: the global RNG reseeded in between) logs the same losses."""
    import torch
    from transformers import LlamaForCausalLM

    from rlhf import sft, task

    corpus = task.make_corpus(48, seed=3)
    tokenizer = task.train_tokenizer([ex["prompt"] + ex["completion"] for ex in corpus],
                                     vocab_size=300)

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(task.tiny_llama_config(
            tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.5))

    def config(name):
        return sft.SFTConfig(output_dir=str(tmp_path / name), max_steps=6, batch_size=8,
                             lr=1e-2, warmup_steps=1, log_every=1, save_every=0, max_length=48,
                             device="cpu")

    def losses(name):
        return [json.loads(line)["loss"] for line in
                (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    sft.train(config("full"), model=model(), tokenizer=tokenizer, examples=corpus)

    def interrupt(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    cfg = config("cut")
    with pytest.raises(KeyboardInterrupt):
        sft.train(cfg, model=model(), tokenizer=tokenizer, examples=corpus, on_step=interrupt)
    torch.manual_seed(12345)  # whatever ran in between
    cfg.resume = True
    sft.train(cfg, model=model(), tokenizer=tokenizer, examples=corpus)
    assert losses("cut") == losses("full")
