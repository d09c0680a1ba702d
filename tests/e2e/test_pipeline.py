"""`rlhf.pipeline.run` end to end on a micro configuration (seconds): every output is written,
the summary holds the acceptance numbers, resume skips finished stages, and resuming from any
point reproduces the uninterrupted run's summary exactly."""

from __future__ import annotations

import json
import shutil

import pytest

from rlhf.pipeline import PipelineConfig, run
from tests.helpers import OWN_MODEL_SHAPE, interrupt_at, micro_config, review_tokenizer, tiny_llama

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.reference_kernels]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted micro run, shared by the tests below: (output dir, summary)."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RLHF_KERNELS_BACKEND", "reference")
        summary = run(micro_config(out))
    return out, json.loads(json.dumps(summary, default=str))


def _figures(summary: dict) -> dict:
    """A summary without what legitimately differs between runs: timings, the stages a resume
    loaded, peak memory, and the config's resume flags and output folders (the tests resume in
    a copy)."""

    def keep(key: str) -> bool:
        return not (key.endswith("_s") or key in ("tokens_per_s", "pairs_per_s", "done_before",
                                                   "peak_memory_mb", "resume", "output_dir"))

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if keep(k)}
        return value

    return strip(json.loads(json.dumps(summary, default=str)))


def _checkpoints(directory):
    return sorted((directory / "checkpoints").glob("step-*"))


def test_pipeline_writes_everything_and_resume_skips_done_stages(finished, tmp_path, capsys):
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
    # one process here (tests/trainer/test_distributed.py runs the stages on 2 ranks)
    assert written["world_size"] == 1 and written["torch_threads"] >= 1
    ppo_lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(ppo_lines) == 2 and "gold_reward" in json.loads(ppo_lines[-1])

    # resume: every stage is complete, so none is trained again and the stage numbers stay
    sft_metrics = (out / "sft" / "metrics.jsonl").read_text()
    cfg = micro_config(out)
    cfg.resume = True
    capsys.readouterr()
    again = run(cfg)
    assert ("s in this invocation (SFT, the reward model, RL finished before it); outputs in"
            in capsys.readouterr().out)
    assert (out / "sft" / "metrics.jsonl").read_text() == sft_metrics
    assert _figures(again) == _figures(summary)
    assert again["timings_s"]["sft_s"] < summary["timings_s"]["sft_s"]
    # the summary says which stages it loaded: their timings are not the stages' own
    assert summary["done_before"] == [] and again["done_before"] == ["sft", "rm", "ppo"]


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


def test_the_pipeline_runs_a_critic_free_algorithm_and_resumes_it(tmp_path):
    """algorithm=grpo: the RL stage in grpo/, without a critic, its figures in the summary;
    interrupted during GRPO, a resume reproduces them."""
    out = tmp_path / "run"
    cfg = micro_config(out)
    cfg.algorithm = "grpo"
    cfg.ppo.num_iterations, cfg.ppo.group_size = 2, 4
    summary = json.loads(json.dumps(run(cfg), default=str))
    assert summary["algorithm"] == "grpo" and not (out / "ppo").exists()
    assert json.loads((out / "grpo" / "backbone" / "roles.json").read_text())["roles"] == [
        "policy", "reward"]
    used = summary["config"]["ppo"]
    assert used["algorithm"] == "grpo" and used["group_size"] == 4
    assert used["advantage_estimator"] == "grpo" and used["kl_in_loss"] is True
    assert "critic_lr" not in used and "value_clip" not in used  # no critic: not used
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert "group/zero_std_fraction" in last and "value/loss" not in last
    assert "GRPO policy" in (out / "samples.md").read_text()
    assert summary["gold_heldout"]["n_samples_each"] == 16
    _remove(out / "summary.json", out / "metrics.jsonl", out / "curves.png", out / "samples.md")
    _keep_first_checkpoint(out / "grpo")
    cfg.resume = True
    assert _figures(run(cfg)) == _figures(summary)
    # a PipelineConfig with the algorithm starts from the task's settings for it
    assert PipelineConfig(algorithm="grpo").ppo.kl_coef == 0.3
    assert PipelineConfig().ppo.settings.kl_coef == 0.1  # the PPO preset (ppo.kl_coef: null)


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

    cfg = config("cut")
    with pytest.raises(KeyboardInterrupt):
        sft.train(cfg, model=model(), tokenizer=tokenizer, examples=corpus,
                  on_step=interrupt_at(3))
    torch.manual_seed(12345)  # whatever ran in between
    cfg.resume = True
    sft.train(cfg, model=model(), tokenizer=tokenizer, examples=corpus)
    assert losses("cut") == losses("full")


# ---------------------------------------------------------------------------------------------
# your model and data (item 14): honoured, or refused in one line; never silently ignored
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("sft.output_dir=elsewhere", "sft.output_dir='elsewhere' cannot be set in rlhf pipeline"),
    ("ppo.seed=3", "ppo.seed=3 cannot be set in rlhf pipeline"),
    ("reward.device=cpu", "reward.device='cpu' cannot be set"),
    ("sft.resume=true", "sft.resume=True cannot be set"),
    ("reward.lora_rank=4", "reward.lora_rank=4 has no effect in rlhf pipeline"),
    ("ppo.model=runs/rm/backbone", "ppo.model='runs/rm/backbone' has no effect"),
    ("reward.eval_fraction=0.3", "heldout_pair_fraction"),
    ("sft.corpus_size=10", "sft.corpus_size=10 has no effect"),
    ("reward.dataset=pairs.jsonl", "sft.model, sft.dataset, ppo.dataset missing"),
    ("sft.tokenizer=some/tok", "needs sft.model"),
    ("ppo.algorithm=grpo", "ppo.algorithm='grpo' cannot be set in rlhf pipeline"),
    ("algorithm=a2c", "algorithm='a2c' is not an RL algorithm"),
])
def test_pipeline_refuses_settings_it_cannot_honour(tmp_path, capsys, override, message):
    """Before, the pipeline overwrote or ignored these and still wrote them to summary.json."""
    from rlhf import cli

    out = tmp_path / "run"
    assert cli.main(["pipeline", f"output_dir={out}", override]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("rlhf pipeline: error:") and message in err, err
    assert err.count("\n") == 1 and not out.exists()  # refused before anything ran


def test_pipeline_refuses_tiny_model_settings_with_your_model():
    from rlhf.pipeline import check_settings

    cfg = PipelineConfig(hidden_size=128)
    cfg.sft.model = "my/model"
    with pytest.raises(ValueError, match="hidden_size=128 has no effect here"):
        check_settings(cfg)
    cfg = PipelineConfig(pair_prompts=10)
    cfg.sft.model, cfg.sft.dataset = "my/model", "sft.jsonl"
    cfg.reward.dataset, cfg.ppo.dataset = "pairs.jsonl", "prompts.jsonl"
    with pytest.raises(ValueError, match="pair_prompts=10 has no effect here"):
        check_settings(cfg)


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_pipeline_runs_on_your_model_and_data(tmp_path, monkeypatch):
    """sft.model + sft.dataset -> SFT on them; reward.dataset -> the RM on those pairs (not
    sampled ones); ppo.dataset -> PPO on those prompts. No gold judge: no gold figures. Each
    data file is hashed once for run.json (before: by the pipeline and again by its stage,
    which is given the rows and never reads the file)."""
    from rlhf import checkpoint, reward, sft, task

    hashed = []
    fingerprint = checkpoint._fingerprint
    monkeypatch.setattr(checkpoint, "_fingerprint",
                        lambda path: hashed.append(path.name) or fingerprint(path))

    tokenizer = review_tokenizer(task.make_corpus(40, seed=5), vocab_size=300)
    model = tiny_llama(tokenizer, **OWN_MODEL_SHAPE)
    model_dir = tmp_path / "my-model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    sft_rows = [{"prompt": "Note:", "completion": " the battery is good."}] * 24
    pos = task.make_corpus(15, seed=1, sentiment_mix={"positive": 1.0})
    neg = task.make_corpus(15, seed=2, sentiment_mix={"negative": 1.0})
    pair_rows = [{"prompt": p["prompt"], "chosen": p["completion"], "rejected": q["completion"]}
                 for p, q in zip(pos, neg)]
    prompt_rows = [{"prompt": f"My own prompt number {i}:"} for i in range(6)]

    cfg = PipelineConfig(
        output_dir=str(tmp_path / "run"), device="cpu", heldout_pair_fraction=0.2,
        lora_rank=4, lora_alpha=8, sample_batch_size=8, n_show_samples=3,
        sft=sft.SFTConfig(model=str(model_dir), dataset=_write_jsonl(tmp_path / "s.jsonl",
                                                                      sft_rows),
                          max_steps=3, batch_size=8, grad_accum_steps=1, max_length=48,
                          log_every=1),
        reward=reward.RewardConfig(dataset=_write_jsonl(tmp_path / "p.jsonl", pair_rows),
                                   batch_size=4, grad_accum_steps=1, max_length=64,
                                   save_every=0),
    )
    cfg.ppo.dataset = _write_jsonl(tmp_path / "q.jsonl", prompt_rows)
    cfg.ppo.num_iterations, cfg.ppo.rollout_batch_size, cfg.ppo.minibatch_size = 1, 8, 4
    cfg.ppo.max_new_tokens, cfg.ppo.max_prompt_length, cfg.ppo.save_every = 6, 32, 0
    summary = run(cfg)

    out = tmp_path / "run"
    assert summary["task"] == "own data"
    # the RM trained and was measured on the given pairs: 15 pairs, 3 held out
    assert summary["reward_model"]["train_pairs"] == 12
    assert summary["reward_model"]["heldout_pairs"] == 3
    assert 0.0 <= summary["reward_model"]["heldout_accuracy"] <= 1.0
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert sorted(p["chosen"] for p in pairs) == sorted(r["chosen"] for r in pair_rows)
    # no gold judge exists for this data: no gold figures, no noise ceiling
    assert "gold_heldout" not in summary and "kl_to_reference" not in summary
    assert "noise_ceiling_heldout" not in summary["reward_model"]
    assert "gold_reward" not in json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    # SFT ran on the given data with the given model's tokenizer (3 logged steps)
    assert len((out / "sft" / "metrics.jsonl").read_text().splitlines()) >= 3
    assert (out / "tokenizer" / "tokenizer_config.json").exists()
    # PPO and the samples used the given prompts
    assert "My own prompt number 0:" in (out / "samples.md").read_text()
    # only the settings the run used are recorded
    recorded = json.loads((out / "summary.json").read_text())["config"]
    for unused in ("pair_prompts", "label_beta", "eval_samples", "hidden_size", "corpus_size"):
        assert unused not in recorded, unused
    assert "model" not in recorded["ppo"] and "eval_fraction" not in recorded["reward"]
    assert recorded["sft"]["model"] == str(model_dir)
    assert recorded["ppo"]["output_dir"] == str(out / "ppo")
    assert sorted(hashed) == ["p.jsonl", "q.jsonl", "s.jsonl"]
    assert sorted(json.loads((out / "run.json").read_text())["data"]) == [
        "ppo.dataset", "reward.dataset", "sft.dataset"]


# ---------------------------------------------------------------------------------------------
# defaults for real models; the built-in task keeps its own settings (item 15)
# ---------------------------------------------------------------------------------------------
def test_stage_defaults_are_for_pretrained_models_and_the_task_keeps_its_own():
    from dataclasses import replace

    from rlhf import ppo, reward, sft, task
    from rlhf.config import load_config

    real = sft.SFTConfig()
    assert real.max_length == 1024 and real.lora_rank == 0
    assert real.lr is None and real.max_steps is None and real.epochs == 1.0
    assert real.resolved(100).lr == 2e-5  # full-weight
    assert replace(real, lora_rank=8).resolved(100).lr == 2e-4  # LoRA
    # the length follows the data: 100 examples / (8 x 4) per optimizer step = 3 steps an epoch
    assert real.resolved(100).max_steps == 3
    assert replace(real, epochs=2.0).resolved(100).max_steps == 6
    assert replace(real, max_steps=7).resolved(100).max_steps == 7
    assert reward.RewardConfig().max_length == 1024 and reward.RewardConfig().lr == 1e-4
    assert ppo.PPOConfig().max_prompt_length == 512 and ppo.PPOConfig().lr == 2e-5
    # without a model (the built-in tiny Llama) the task's own settings apply; a set value wins
    assert load_config(sft.SFTConfig).lr == task.SFT_SETTINGS["lr"] == 3e-3
    assert load_config(sft.SFTConfig, overrides=["lr=1e-3"]).lr == 1e-3
    mine = load_config(sft.SFTConfig, overrides=["model=/my/model", "dataset=d.jsonl"])
    assert mine.lr is None and mine.max_length == 1024
    built_in = load_config(PipelineConfig, overrides=["sft.max_steps=200"])
    assert built_in.sft.max_steps == 200 and built_in.sft.lr == 3e-3
    assert built_in.ppo.max_prompt_length == 24 and built_in.reward.lr == 3e-3
    # your model on the built-in task: the task's presets for a pretrained model (LoRA SFT,
    # short sequences; tests/trainer/test_real_reviews.py); with your data too, the stages' defaults
    yours = load_config(PipelineConfig, overrides=["sft.model=/my/model", "ppo.lr=1e-6"])
    assert yours.sft.lr == task.PRETRAINED_SFT_SETTINGS["lr"] and yours.ppo.lr == 1e-6
    assert yours.ppo.max_prompt_length == task.PRETRAINED_PPO_SETTINGS["max_prompt_length"]
    data = [f"{name}.dataset=d.jsonl" for name in ("sft", "reward", "ppo")]
    own = load_config(PipelineConfig, overrides=["sft.model=/my/model", "ppo.lr=1e-6", *data])
    assert own.sft.lr is None and own.sft.max_steps is None and own.ppo.lr == 1e-6
    assert own.ppo.max_prompt_length == 512 and own.reward.lr == 1e-4


def test_a_long_prompt_error_names_the_real_setting():
    from rlhf import ppo, task

    tokenizer = task.train_tokenizer(["Review of the blender: fine."] * 4, vocab_size=280)
    with pytest.raises(ValueError) as error:
        ppo.encode_prompts(["Review of the blender:", "Iron Valley review:"], tokenizer, 3)
    message = str(error.value)
    # before: "raise max_length or set overlong='truncate'", keys PPOConfig does not have
    assert "max_prompt_length=3" in message and "ppo.max_prompt_length" in message
    assert "overlong" not in message and "the longest has" in message


def test_lora_sft_merges_its_adapters_into_the_saved_model(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from rlhf import sft, task

    corpus = task.make_corpus(24, seed=2)
    tokenizer = task.train_tokenizer([ex["prompt"] + ex["completion"] for ex in corpus],
                                     vocab_size=280)
    torch.manual_seed(0)
    model = LlamaForCausalLM(task.tiny_llama_config(
        tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = sft.SFTConfig(output_dir=str(tmp_path / "sft"), lora_rank=4, lr=1e-2, max_steps=3,
                        batch_size=8, grad_accum_steps=1, max_length=48, warmup_steps=1,
                        device="cpu")
    summary = sft.train(cfg, model=model, tokenizer=tokenizer, examples=corpus)
    assert summary["steps"] == 3 and isinstance(summary["model"], LlamaForCausalLM)
    saved = load_file(str(tmp_path / "sft" / "model" / "model.safetensors"))
    assert set(saved) == set(before)  # a plain model: no adapter weights
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(saved[q], before[q])  # the trained adapters were merged in
    assert torch.equal(saved["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "model")
    torch.testing.assert_close(reloaded.state_dict()[q], summary["model"].state_dict()[q])


def test_pipeline_runs_the_built_in_task_on_your_model(tmp_path):
    """sft.model alone: your model and its tokenizer on the built-in corpus, pairs, prompts and
    gold judge (the gold figures are real then); the tiny model's settings are not recorded."""
    import torch
    from transformers import LlamaForCausalLM

    from rlhf import task

    texts = [ex["prompt"] + ex["completion"] for ex in task.make_corpus(60, seed=9)]
    tokenizer = task.train_tokenizer(texts, vocab_size=320)
    torch.manual_seed(0)
    model = LlamaForCausalLM(task.tiny_llama_config(
        tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    model.save_pretrained(tmp_path / "my-model")
    tokenizer.save_pretrained(tmp_path / "my-model")
    cfg = micro_config(tmp_path / "run")
    cfg.vocab_size, cfg.hidden_size, cfg.num_layers = 1024, 64, 2  # the defaults: unused here
    cfg.sft.model = str(tmp_path / "my-model")
    summary = run(cfg)
    assert summary["task"] == "built-in review task"
    assert summary["gold_heldout"]["n_samples_each"] == 16 and "kl_to_reference" in summary
    saved = json.loads((tmp_path / "run" / "tokenizer" / "tokenizer.json").read_text())
    assert len(saved["model"]["vocab"]) == len(json.loads(
        (tmp_path / "my-model" / "tokenizer.json").read_text())["model"]["vocab"])
    for unused in ("vocab_size", "hidden_size", "num_layers"):
        assert unused not in summary["config"], unused
    assert summary["config"]["corpus_size"] == 160  # used: the built-in corpus
