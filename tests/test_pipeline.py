"""`rlhf.pipeline.run` end to end on a micro configuration (seconds): every output is written,
the summary holds the acceptance numbers, and resume skips finished stages."""

from __future__ import annotations

import json

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
    cfg.reward.epochs, cfg.reward.batch_size = 1.0, 8
    cfg.ppo.num_iterations, cfg.ppo.rollout_batch_size, cfg.ppo.minibatch_size = 2, 8, 4
    cfg.ppo.max_new_tokens, cfg.ppo.max_prompt_length = 16, 40
    return cfg


def test_pipeline_writes_everything_and_resume_skips_done_stages(tmp_path):
    out = tmp_path / "run"
    summary = run(micro_config(out))
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
    assert again["reward_model"] == rm
    assert again["timings_s"]["sft_s"] < summary["timings_s"]["sft_s"]
