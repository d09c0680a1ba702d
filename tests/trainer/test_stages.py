"""The three training stages on a tiny model: a few steps each, finite and decreasing losses,
shapes and masks of what flows between steps, resume == uninterrupted, non-finite handling.

Everything runs on the CPU in seconds (a 2-layer, 32-wide Llama; a 300-token BPE).
"""

from __future__ import annotations

import math

import pytest
import torch

import rlhf_kernels
from rlhf import ppo, reward, sft, task
from rlhf.checkpoint import load_state
from rlhf.engine import RolloutEngine
from rlhf.models import LoraSpec, SharedBackbone
from tests.helpers import (
    interrupt_at,
    read_jsonl,
    review_tokenizer,
    sentiment_pairs,
    sft_config,
    tiny_backbone,
    tiny_model,
)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.reference_kernels]


@pytest.fixture(scope="module")
def corpus():
    return task.make_corpus(96, seed=1)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return review_tokenizer(corpus, vocab_size=300)


# ---------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------
def test_lm_loss_counts_response_tokens_only(tokenizer):
    """The SFT loss equals the float64 reference NLL averaged over completion tokens only."""
    from rlhf import data

    model = tiny_model(tokenizer)
    examples = [{"prompt": "Review of the blender:", "completion": " The price is good."},
                {"prompt": "Glass City review:", "completion": " I was bored the whole time."}]
    enc = data.tokenize_sft(examples, tokenizer, max_length=48)
    ids, mask, labels = enc["input_ids"], enc["attention_mask"], enc["labels"]
    assert bool((labels[:, 1:] != -100).any()) and bool((labels[:, :4] == -100).all())
    n_tokens = int((labels[:, 1:] != -100).sum())
    logp = sft.token_logprobs_of(model, ids, mask, labels)
    assert logp.shape == (2, ids.shape[1] - 1) and logp.dtype == torch.float32
    loss = sft.lm_loss(logp, labels, n_tokens)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    expected = -rlhf_kernels.reference.logprobs(logits[:, :-1], labels[:, 1:]).sum() / n_tokens
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)


def test_sft_trains_and_resume_matches_uninterrupted(tmp_path, tokenizer, corpus):
    full = sft.train(sft_config(tmp_path / "a"), model=tiny_model(tokenizer),
                     tokenizer=tokenizer, examples=corpus)
    records = read_jsonl(tmp_path / "a" / "sft" / "metrics.jsonl")
    losses = [r["loss"] for r in records]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    assert (tmp_path / "a" / "sft" / "model" / "config.json").exists()
    assert full["steps"] == 12

    cfg = sft_config(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        sft.train(cfg, model=tiny_model(tokenizer), tokenizer=tokenizer, examples=corpus,
                  on_step=interrupt_at(5))
    assert (tmp_path / "b" / "sft" / "checkpoints" / "step-0000005").is_dir()
    cfg.resume = True
    # a fresh model: everything must come back from the checkpoint
    sft.train(cfg, model=tiny_model(tokenizer, seed=123), tokenizer=tokenizer, examples=corpus)
    resumed = read_jsonl(tmp_path / "b" / "sft" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in zip(records, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)


def test_sft_lora_checkpoints_hold_the_adapters_and_resume_matches(tmp_path, tokenizer, corpus):
    """With LoRA the base is frozen: a checkpoint holds the trainable parameters only (it held
    the whole model, gigabytes at a real size), and a resume on the same base gives the
    uninterrupted run's losses."""
    settings = dict(lora_rank=4, max_steps=6)
    sft.train(sft_config(tmp_path / "a", **settings), model=tiny_model(tokenizer),
              tokenizer=tokenizer, examples=corpus)
    records = read_jsonl(tmp_path / "a" / "sft" / "metrics.jsonl")
    cfg = sft_config(tmp_path / "b", **settings)
    with pytest.raises(KeyboardInterrupt):
        sft.train(cfg, model=tiny_model(tokenizer), tokenizer=tokenizer, examples=corpus,
                  on_step=interrupt_at(3))
    saved = load_state(tmp_path / "b" / "sft" / "checkpoints" / "step-0000003")["params"]
    assert saved and all("lora_" in name for name in saved), sorted(saved)[:3]
    cfg.resume = True
    sft.train(cfg, model=tiny_model(tokenizer), tokenizer=tokenizer, examples=corpus)
    resumed = read_jsonl(tmp_path / "b" / "sft" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(records, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)


def test_sft_nonfinite_loss_is_an_error_or_counted_skip(tmp_path, tokenizer, corpus):
    model = tiny_model(tokenizer)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        sft.train(sft_config(tmp_path / "err", max_steps=3), model=model, tokenizer=tokenizer,
                  examples=corpus)
    with pytest.warns(UserWarning, match="skipped step"), \
            pytest.raises(FloatingPointError, match="non-finite"):
        sft.train(sft_config(tmp_path / "skip", max_steps=6, nonfinite="skip",
                             max_skipped_steps=2),
                  model=model, tokenizer=tokenizer, examples=corpus)


# ---------------------------------------------------------------------------------------------
# reward model
# ---------------------------------------------------------------------------------------------


def test_reward_model_learns_and_reports_heldout_accuracy(tmp_path, tokenizer):
    backbone = tiny_backbone(tokenizer)
    cfg = reward.RewardConfig(output_dir=str(tmp_path / "rm"), batch_size=16, epochs=4.0,
                              grad_accum_steps=1, lr=2e-2, warmup_steps=1, log_every=1,
                              device="cpu", max_length=48)
    summary = reward.train(cfg, backbone=backbone, tokenizer=tokenizer,
                           train_pairs=sentiment_pairs(64, 0), eval_pairs=sentiment_pairs(32, 7))
    records = [r for r in read_jsonl(tmp_path / "rm" / "metrics.jsonl") if "loss" in r]
    losses = [r["loss"] for r in records]
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    assert 0.0 <= summary["eval_accuracy"] <= 1.0 and summary["eval_pairs"] == 32
    assert summary["eval_accuracy"] > 0.6
    # the saved backbone scores the held-out pairs exactly as the trained one does
    loaded = SharedBackbone.load(tmp_path / "rm" / "backbone")
    pairs = reward.encode_pairs(sentiment_pairs(8, 3), tokenizer, 48)
    with torch.no_grad():
        a = reward.pair_rewards(backbone, pairs, tokenizer.pad_token_id)
        b = reward.pair_rewards(loaded, pairs, tokenizer.pad_token_id)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------
def ppo_config(tmp_path, **overrides) -> ppo.PPOConfig:
    settings = dict(output_dir=str(tmp_path / "ppo") if tmp_path else "unused",
                    num_iterations=4, rollout_batch_size=8,
                    minibatch_size=4, ppo_epochs=2, max_new_tokens=10, lr=1e-2, critic_lr=1e-2,
                    warmup_steps=1, save_every=0, device="cpu", kl_target=2.0, kl_horizon=50,
                    max_prompt_length=40)
    settings.update(overrides)
    return ppo.PPOConfig(**settings)


def policy_generation(backbone, tokenizer, cfg: ppo.PPOConfig, n_prompts: int, seed: int = 0):
    """A rollout batch as ppo.train makes it: prompts padded to max_prompt_length, the engine,
    the all-pad prompt columns dropped."""
    ids, mask = ppo.encode_prompts(task.all_prompts("train")[:n_prompts], tokenizer,
                                   cfg.max_prompt_length)
    assert ids.shape == (n_prompts, cfg.max_prompt_length)  # fixed width for the engine
    gen = RolloutEngine(backbone).generate(
        ids, mask, cfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, temperature=cfg.temperature, top_k=cfg.top_k,
        top_p=cfg.top_p, seed=seed)
    trimmed = gen.without_prompt_padding()
    drop = gen.prompt_length - trimmed.prompt_length
    assert drop > 0 and bool((gen.attention_mask[:, :drop] == 0).all())
    assert torch.equal(trimmed.sequences, gen.sequences[:, drop:])
    assert torch.equal(trimmed.response_ids, gen.response_ids)
    return trimmed


def test_rollout_shapes_masks_and_targets(tokenizer):
    backbone = tiny_backbone(tokenizer)
    cfg = ppo_config(None)
    gen = policy_generation(backbone, tokenizer, cfg, 6)
    rollout = ppo.make_rollout(backbone, gen, kl_coef=0.1, cfg=cfg)
    batch, width = gen.sequences.shape
    response = width - gen.prompt_length
    assert rollout.prompt_length == gen.prompt_length
    for name in ("old_logprobs", "ref_logprobs", "old_values", "rewards", "advantages",
                 "returns", "action_mask"):
        tensor = getattr(rollout, name)
        # the response frame: column j is about response token j
        assert tensor.shape == (batch, response) and tensor.dtype == torch.float32, name
        assert torch.isfinite(tensor).all(), name
        assert bool((tensor[rollout.action_mask == 0] == 0).all()), name
    assert rollout.scores.shape == (batch,)
    torch.testing.assert_close(rollout.action_mask, gen.response_mask.float())
    # column j is log p(response token j | everything before it): float64 log_softmax of the
    # full logits at sequence position P - 1 + j
    with torch.no_grad():
        logits = backbone.logits(gen.sequences, gen.attention_mask, "policy").double()
    logp = torch.log_softmax(logits / cfg.temperature, -1)[:, gen.prompt_length - 1:-1]
    expected = logp.gather(-1, gen.response_ids[..., None]).squeeze(-1) * rollout.action_mask
    torch.testing.assert_close(rollout.old_logprobs.double(), expected, rtol=0, atol=1e-4)
    # fresh adapters (LoRA B = 0): policy == reference, so the KL penalty is exactly 0 and the
    # whole sequence reward sits on the last response token
    torch.testing.assert_close(rollout.old_logprobs, rollout.ref_logprobs, rtol=0, atol=0)
    last = gen.response_mask.sum(-1) - 1
    torch.testing.assert_close(rollout.rewards.sum(-1), rollout.scores)
    torch.testing.assert_close(rollout.rewards[torch.arange(batch), last], rollout.scores)
    # the advantages are whitened over the response tokens
    valid = rollout.advantages[rollout.action_mask > 0]
    assert abs(float(valid.mean())) < 1e-5 and abs(float(valid.std()) - 1) < 1e-3
    # scoring a few rows at a time changes no number
    chunked = ppo.make_rollout(backbone, gen, kl_coef=0.1,
                               cfg=ppo_config(None, forward_batch_size=4))
    for name in ("old_logprobs", "ref_logprobs", "old_values", "scores", "advantages"):
        torch.testing.assert_close(getattr(chunked, name), getattr(rollout, name),
                                   rtol=1e-6, atol=1e-6)
    # a minibatch keeps the frame
    part = rollout.rows(torch.tensor([4, 1]))
    assert part.prompt_length == rollout.prompt_length
    assert torch.equal(part.advantages, rollout.advantages[[4, 1]])


def test_recorded_old_logprobs_equal_the_forward_with_filters(tokenizer):
    """The engine's recorded log-probs are the old log-probs the update computes: the tempered,
    unfiltered distribution of the policy adapter, also when top-k / top-p pick the tokens."""
    backbone = tiny_backbone(tokenizer)
    with torch.no_grad():  # a policy that differs from the reference
        for name, param in backbone.named_parameters():
            if "lora_B" in name and ".policy." in name:
                param.normal_(0.0, 0.2)
    cfg = ppo_config(None, temperature=0.8, top_k=20, top_p=0.9)
    gen = policy_generation(backbone, tokenizer, cfg, 6, seed=4)
    recorded = ppo.make_rollout(backbone, gen, kl_coef=0.1, cfg=cfg, use_recorded_logprobs=True)
    forward = ppo.make_rollout(backbone, gen, kl_coef=0.1, cfg=cfg)
    mask = forward.action_mask
    assert float((forward.old_logprobs - forward.ref_logprobs).abs().max()) > 1e-2
    # fp32: the same math in another order (KV cache, one query at a time)
    torch.testing.assert_close(recorded.old_logprobs, forward.old_logprobs, rtol=0, atol=1e-4)
    assert bool((recorded.old_logprobs[mask == 0] == 0).all())
    for name in ("rewards", "advantages", "returns"):
        torch.testing.assert_close(getattr(recorded, name), getattr(forward, name),
                                   rtol=0, atol=1e-3)
    # so the first update starts at ratio 1: the policy loss's log-ratio is ~0 on every token
    _loss, stats = ppo.policy_loss(backbone, recorded, cfg)
    assert abs(float(stats["approx_kl"])) < 1e-8
    # the decision: fp32 without autocast only
    assert ppo.recorded_logprobs_match(backbone, None)
    assert not ppo.recorded_logprobs_match(backbone, torch.bfloat16)
    bf16 = SharedBackbone.from_model(tiny_model(tokenizer).to(torch.bfloat16),
                                     lora=LoraSpec(rank=4))
    assert not ppo.recorded_logprobs_match(bf16, None)


def test_ppo_losses_decrease_on_a_fixed_rollout(tokenizer):
    """A few optimizer steps on one rollout lower the policy and the value loss."""
    backbone = tiny_backbone(tokenizer)
    backbone.init_critic_from_reward()
    cfg = ppo_config(None)
    gen = policy_generation(backbone, tokenizer, cfg, 8)
    rollout = ppo.make_rollout(backbone, gen, kl_coef=0.1, cfg=cfg, use_recorded_logprobs=True)
    params = backbone.trainable_parameters("policy") + backbone.trainable_parameters("critic")
    optimizer = torch.optim.Adam(params, lr=5e-3)
    p_losses, v_losses = [], []
    for _ in range(6):
        p_loss, p_stats = ppo.policy_loss(backbone, rollout, cfg)
        p_loss.backward()
        v_loss, v_stats = ppo.value_loss(backbone, rollout, cfg)
        v_loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        p_losses.append(float(p_loss))
        v_losses.append(float(v_loss))
        assert math.isfinite(float(p_stats["entropy"])) and float(p_stats["entropy"]) > 0
    assert all(math.isfinite(x) for x in p_losses + v_losses)
    assert p_losses[-1] < p_losses[0] and v_losses[-1] < v_losses[0], (p_losses, v_losses)


def test_ppo_trains_logs_and_resume_matches_uninterrupted(tmp_path, tokenizer):
    prompts = task.all_prompts("train")[:16]

    def gold(texts):
        return task.gold_scores(texts)

    full = ppo.train(ppo_config(tmp_path / "a"), backbone=tiny_backbone(tokenizer),
                     tokenizer=tokenizer, prompts=prompts, gold_fn=gold)
    records = read_jsonl(tmp_path / "a" / "ppo" / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    keys = ("proxy_reward", "gold_reward", "kl", "kl_coef", "policy/entropy", "policy/clipfrac",
            "value/clipfrac", "value/loss", "value/explained_variance", "response_length",
            "tokens_per_s", "peak_memory_mb")
    for record in records:
        for key in keys:
            assert key in record and math.isfinite(record[key]), (key, record)
    assert full["iterations"] == 4 and (tmp_path / "a" / "ppo" / "backbone").is_dir()
    assert full["old_logprobs"] == "recorded"  # fp32 on the CPU: no policy forward in rollouts
    # the adaptive controller moved kl_coef after the first iteration
    assert records[1]["kl_coef"] != records[0]["kl_coef"]

    cfg = ppo_config(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        ppo.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=prompts,
                  gold_fn=gold, on_iteration=interrupt_at(2))
    cfg.resume = True
    ppo.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=prompts,
              gold_fn=gold)
    resumed = read_jsonl(tmp_path / "b" / "ppo" / "metrics.jsonl")
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(records, resumed):
        for key in ("proxy_reward", "gold_reward", "kl", "kl_coef", "policy/loss",
                    "value/loss", "response_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, a, b)


@pytest.mark.parametrize("config, setting, value, message", [
    (ppo.PPOConfig, "lr", -1, r"lr=-1 is out of range: PPOConfig.lr must be a finite number > 0"),
    (ppo.PPOConfig, "critic_lr", -1, r"critic_lr=-1 .*must be a finite number > 0"),
    (ppo.PPOConfig, "kl_coef", -1, r"kl_coef=-1 .*must be a finite number >= 0"),
    (ppo.PPOConfig, "lr", float("inf"), r"lr=inf is out of range"),
    (ppo.PPOConfig, "critic_lr", float("nan"), r"critic_lr=nan is out of range"),
    (ppo.PPOConfig, "entropy_coef", -0.1, r"entropy_coef=-0.1"),
    (ppo.PPOConfig, "gamma", 1.5, r"gamma=1.5 .*in \[0, 1\]"),
    (ppo.PPOConfig, "lam", -0.5, r"lam=-0.5"),
    (ppo.PPOConfig, "clip_ratio", 0.0, r"clip_ratio=0.0"),
    (ppo.PPOConfig, "value_clip", -1.0, r"value_clip=-1.0"),
    (ppo.PPOConfig, "score_clip", 0.0, r"score_clip=0.0"),
    (ppo.PPOConfig, "kl_horizon", 0, r"kl_horizon=0"),
    (ppo.PPOConfig, "ppo_epochs", 0, r"ppo_epochs=0 .*an integer >= 1"),
    (ppo.PPOConfig, "warmup_steps", -1, r"warmup_steps=-1 .*an integer >= 0"),
    (ppo.PPOConfig, "kl_estimator", "k4", r"kl_estimator='k4' is not an estimator"),
    (ppo.PPOConfig, "loss_reduction", "sum", r"loss_reduction='sum' is not a reduction"),
    (ppo.PPOConfig, "device", "tpu", r"device='tpu' is not a device"),
    (reward.RewardConfig, "lr", 0.0, r"RewardConfig.lr must be a finite number > 0"),
    (reward.RewardConfig, "center_coef", -1.0, r"center_coef=-1.0"),
    (reward.RewardConfig, "lora_rank", 0, r"lora_rank=0"),
    (reward.RewardConfig, "grad_clip", 0.0, r"grad_clip=0.0"),
    (reward.RewardConfig, "device", "gpu", r"for an NVIDIA GPU write cuda"),
    (sft.SFTConfig, "lr", -3e-3, r"SFTConfig.lr must be a finite number > 0"),
    (sft.SFTConfig, "weight_decay", -0.1, r"weight_decay=-0.1"),
    (sft.SFTConfig, "min_lr_ratio", 2.0, r"min_lr_ratio=2.0"),
    (sft.SFTConfig, "max_length", 0, r"max_length=0"),
    (sft.SFTConfig, "device", "cuda:x", r"device='cuda:x' is not a device"),
])
def test_numeric_settings_are_validated(config, setting, value, message):
    """Every stage setting out of its range is refused when the config is built, with one line
    naming the setting, the value and the range."""
    with pytest.raises(ValueError, match=message):
        config(**{setting: value})


def test_config_validation_errors():
    with pytest.raises(ValueError, match="multiple of"):
        ppo.PPOConfig(rollout_batch_size=10, minibatch_size=4)
    with pytest.raises(ValueError, match="nonfinite"):
        sft.SFTConfig(nonfinite="ignore")
    with pytest.raises(ValueError, match="temperature"):
        ppo.PPOConfig(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        ppo.PPOConfig(top_p=1.5)
    with pytest.raises(ValueError, match="old_logprobs"):
        ppo.PPOConfig(old_logprobs="rollout")
