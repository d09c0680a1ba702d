"""The review task on a pretrained named model (``rlhf pipeline model=<named model>``).

The path of ``rlhf pipeline model=smollm2-135m-instruct`` (task=reviews, the default) on a tiny
Llama GGUF this test writes itself, registered as a named model (rlhf/named_models.py), so CI
covers it without the real model: the pretrained presets (task.PRETRAINED_*), LoRA SFT merged
into the SFT model, pairs labelled by the gold judge, the reward model as a LoRA adapter and a
value head on that model, then GRPO or PPO, and the gold figures. The real SmolLM2-135M run is
marked: RLHF_REAL_MODEL=1 runs it for a few steps.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from rlhf import named_models, task  # noqa: E402
from rlhf.pipeline import PipelineConfig  # noqa: E402
from tests.helpers import write_llama_gguf  # noqa: E402

NAME = "tiny-reviews-gguf"
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 16, 2, 4, 2, 32, 128


def write_reviews_gguf(path: Path, seed: int = 0) -> None:
    """A 2-layer Llama GGUF with tied embeddings (as SmolLM2) whose byte-level BPE vocabulary
    (1024 tokens) is trained on the review corpus, so a review is tens of tokens, not hundreds
    of bytes."""
    texts = [ex["prompt"] + ex["completion"] for ex in task.make_corpus(800, seed=seed)]
    tokenizer = task.train_tokenizer(texts, vocab_size=1024)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    specials = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    write_llama_gguf(path, name="tiny-reviews-llama", tokens=tokens, merges=merges,
                     token_types=[gguf.TokenType.CONTROL if i in specials
                                  else gguf.TokenType.NORMAL for i in range(len(tokens))],
                     bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
                     pad=tokenizer.pad_token_id, hidden=HIDDEN, layers=LAYERS, heads=HEADS,
                     kv_heads=KV_HEADS, ffn=FFN, context=CONTEXT, seed=seed)


@pytest.fixture(scope="module")
def named_tiny(tmp_path_factory):
    """The tiny GGUF registered as a named model, converted into a cache of this module's own
    (RLHF_MODEL_CACHE), as model=smollm2-135m-instruct is on first use."""
    root = tmp_path_factory.mktemp("reviews_gguf")
    path = root / "tiny.gguf"
    write_reviews_gguf(path)
    patch = pytest.MonkeyPatch()
    patch.setenv(named_models.CACHE_ENV, str(root / "cache"))
    named_models.register(named_models.NamedModel(
        name=NAME, path=str(path), gguf_sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
    yield named_models.model_dir(NAME)
    named_models.unregister(NAME)
    patch.undo()


# ---------------------------------------------------------------------------------------------
# the presets of the review task on a pretrained model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["model", "sft.model"])
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_a_pretrained_model_starts_from_the_tasks_presets(key, algorithm):
    from rlhf.config import load_config

    cfg = load_config(PipelineConfig, overrides=[f"{key}=some/model", f"algorithm={algorithm}"])
    for name, value in task.PRETRAINED_PIPELINE_SETTINGS.items():
        assert getattr(cfg, name) == value, name
    for name, value in task.PRETRAINED_SFT_SETTINGS.items():
        assert getattr(cfg.sft, name) == value, name
    assert cfg.sft.model == "some/model" and cfg.sft.lora_rank > 0  # LoRA SFT
    for name, value in task.PRETRAINED_REWARD_SETTINGS.items():
        assert getattr(cfg.reward, name) == value, name
    rl = task.PRETRAINED_RL_SETTINGS if algorithm == "grpo" else task.PRETRAINED_PPO_SETTINGS
    for name, value in rl.items():
        assert getattr(cfg.ppo, name) == value, name
    assert cfg.ppo.settings.group_size == (8 if algorithm == "grpo" else 1)
    # Python: PipelineConfig(model=...) starts from the same presets
    python = PipelineConfig(model="some/model", algorithm=algorithm)
    assert (python.sft, python.reward, python.ppo) == (cfg.sft, cfg.reward, cfg.ppo)
    assert python.pair_prompts == cfg.pair_prompts and python.eval_samples == cfg.eval_samples


def test_set_values_win_and_your_data_keeps_the_stage_defaults():
    from rlhf import ppo, reward, sft
    from rlhf.config import load_config

    cfg = load_config(PipelineConfig, overrides=["model=m", "pair_prompts=2000", "sft.lr=1e-4",
                                                 "ppo.num_iterations=3", "eval_samples=400"])
    assert cfg.pair_prompts == 2000 and cfg.eval_samples == 400  # the field defaults, set
    assert cfg.sft.lr == 1e-4 and cfg.sft.max_steps == task.PRETRAINED_SFT_SETTINGS["max_steps"]
    assert cfg.ppo.num_iterations == 3
    assert cfg.ppo.max_new_tokens == task.PRETRAINED_PPO_SETTINGS["max_new_tokens"]
    # with your datasets: the stages' defaults for a pretrained model, as before
    own = load_config(PipelineConfig, overrides=[
        "sft.model=m", "sft.dataset=s.jsonl", "reward.dataset=p.jsonl", "ppo.dataset=q.jsonl"])
    assert own.sft == sft.SFTConfig(model="m", dataset="s.jsonl")
    assert own.reward == reward.RewardConfig(dataset="p.jsonl")
    assert own.ppo == ppo.PPOConfig(dataset="q.jsonl")
    assert own.pair_prompts == 2000
    # the tiny model from scratch keeps the built-in task's settings
    tiny = load_config(PipelineConfig)
    assert tiny.sft.lr == task.SFT_SETTINGS["lr"] and tiny.sft.lora_rank == 0
    assert tiny.ppo.max_prompt_length == task.PPO_SETTINGS["max_prompt_length"]


def test_every_prompt_and_review_fits_the_presets_on_smollm2_tokenizer():
    """The preset lengths hold the task on SmolLM2's tokenizer (its cached folder, when there)."""
    from rlhf.models import load_tokenizer

    folder = named_models.cache_root() / "smollm2-135m-instruct"
    if not (folder / "tokenizer.json").exists():
        pytest.skip("SmolLM2-135M-Instruct is not in the model cache")
    tokenizer = load_tokenizer(str(folder))
    prompts = task.all_prompts("train") + task.all_prompts("heldout")
    longest_prompt = max(len(tokenizer(p)["input_ids"]) for p in prompts)
    assert longest_prompt <= task.PRETRAINED_RL_SETTINGS["max_prompt_length"]
    corpus = task.make_corpus(2000, seed=0)
    longest = max(len(tokenizer(ex["prompt"] + ex["completion"])["input_ids"]) for ex in corpus)
    assert longest + 1 <= task.PRETRAINED_SFT_SETTINGS["max_length"]  # + eos
    longest_review = max(len(tokenizer(ex["completion"])["input_ids"]) for ex in corpus)
    assert longest_review + 1 <= task.PRETRAINED_RL_SETTINGS["max_new_tokens"]


# ---------------------------------------------------------------------------------------------
# the whole pipeline on the tiny named model
# ---------------------------------------------------------------------------------------------
_TINY_RUN = ["sft.max_steps=4", "sft.lr=1e-2", "sft.save_every=0", "pair_prompts=48",
             "reward.epochs=1", "ppo.num_iterations=2", "ppo.rollout_batch_size=8",
             "ppo.minibatch_size=4", "ppo.max_new_tokens=12", "eval_samples=12",
             "sample_batch_size=16", "n_show_samples=4", "ppo.save_every=0"]


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_reviews_pipeline_on_a_named_model(named_tiny, tmp_path, monkeypatch, algorithm):
    from safetensors.torch import load_file

    from rlhf.cli import main

    # the ops' PyTorch reference: the path under test is the pipeline's (the Triton kernels
    # would run in the interpreter here, tens of seconds for nothing the kernel tests miss)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    out = tmp_path / "run"
    extra = ["ppo.group_size=4"] if algorithm == "grpo" else ["ppo.ppo_epochs=1"]
    assert main(["pipeline", f"model={NAME}", f"algorithm={algorithm}", f"output_dir={out}",
                 *_TINY_RUN, *extra]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "built-in review task" and summary["algorithm"] == algorithm
    used = summary["config"]
    assert used["model"] == NAME and used["sft"]["model"] == NAME
    assert used["sft"]["lora_rank"] == task.PRETRAINED_SFT_SETTINGS["lora_rank"]
    assert used["reward"]["max_length"] == task.PRETRAINED_REWARD_SETTINGS["max_length"]
    assert used["ppo"]["max_prompt_length"] == task.PRETRAINED_RL_SETTINGS["max_prompt_length"]
    for unused in ("vocab_size", "hidden_size", "num_layers"):
        assert unused not in used, unused

    # LoRA SFT: the saved SFT model is a plain model (the adapters merged in) of the named
    # model's shape, its linear weights moved, its (frozen) embeddings not
    base = load_file(str(named_tiny / "model.safetensors"))
    tuned = load_file(str(out / "sft" / "model" / "model.safetensors"))
    assert set(tuned) == set(base)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(tuned[q], base[q])
    assert torch.equal(tuned["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert json.loads((out / "sft" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4

    # the pairs: labelled by the gold judge, every pair's texts with different gold scores
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert 10 <= len(pairs) <= 48
    chosen = task.gold_scores([p["chosen"] for p in pairs])
    rejected = task.gold_scores([p["rejected"] for p in pairs])
    assert all(abs(c - r) > task.TIE_TOLERANCE for c, r in zip(chosen, rejected))
    heldout = sum(p["split"] == "eval" for p in pairs)
    rm = summary["reward_model"]
    assert (rm["heldout_pairs"], rm["train_pairs"]) == (heldout, len(pairs) - heldout)
    assert 0.0 <= rm["heldout_accuracy"] <= 1.0 and 0.5 <= rm["noise_ceiling_heldout"] <= 1.0
    roles = json.loads((out / algorithm / "backbone" / "roles.json").read_text())
    assert Path(roles["base_model"]).resolve() == (out / "sft" / "model").resolve()

    # the gold figures: the shown samples' scores are VADER's; the difference in standard errors
    gold = summary["gold_heldout"]
    assert gold["n_samples_each"] == 12
    shown = (out / "samples.md").read_text()
    entry = r"^- (?:before|after) +\(gold ([+-]\d\.\d{3})\): (.*?)(?=\n- |\n\n## |\n*\Z)"
    rows = re.findall(entry, shown, re.S | re.M)
    assert len(rows) == 8
    for score, text in rows:
        assert float(score) == pytest.approx(task.gold_scores([text])[0], abs=6e-4)
    expected = (gold["ppo_mean"] - gold["sft_mean"]) / math.hypot(gold["sft_stderr"],
                                                                   gold["ppo_stderr"])
    assert gold["difference_in_stderr"] == pytest.approx(expected)
    last = summary["ppo_last_iteration"]
    assert last["iteration"] == 2 and ("value/loss" in last) == (algorithm == "ppo")
    assert summary["kl_to_reference"]["bound"] == 6.0
    for name in ("curves.png", "metrics.jsonl", "tokenizer/tokenizer_config.json"):
        assert (out / name).exists(), name


@pytest.mark.skipif(os.environ.get("RLHF_REAL_MODEL") != "1",
                    reason="the real SmolLM2-135M-Instruct (a 93 MB package, minutes of CPU): "
                           "set RLHF_REAL_MODEL=1 to run it")
def test_real_model_reviews_few_steps(tmp_path):
    from rlhf.cli import main

    out = tmp_path / "real"
    assert main(["pipeline", "model=smollm2-135m-instruct", "algorithm=grpo",
                 f"output_dir={out}", "sft.max_steps=2", "pair_prompts=24", "reward.epochs=1",
                 "eval_samples=8", "sample_batch_size=24", "ppo.max_new_tokens=16",
                 "ppo.num_iterations=1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reward_model"]["train_pairs"] > 0
    assert summary["gold_heldout"]["n_samples_each"] == 8
    assert summary["ppo_last_iteration"]["iteration"] == 1
