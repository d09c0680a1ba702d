"""What the pipeline samples and evaluates runs in the RL stage's numerics, with the settings it
says it uses.

On a GPU the RL stage samples and scores under bf16 autocast (``ppo.bf16``), but the pipeline's
preference pairs, its held-out samples (and the frontier's, through ``sample_texts``), the
arithmetic task's held-out accuracy and the reward model's held-out accuracy ran without it:
other numerics than the models were trained and used in, and PEFT's fp32-adapter path on a bf16
base. This machine has no GPU, so these tests evaluate the one rule (``autocast_dtype_for``) as
if the device were CUDA and check what the engine and the forwards are given: the CPU runs the
same code under CPU autocast. With the real rule on the CPU nothing is autocast.
"""

from __future__ import annotations

import pytest
import torch

from rlhf import pipeline, reward, stage
from rlhf.engine import RolloutEngine
from tests.helpers import PROMPTS, randomised_policy, rl_config, rl_tokenizer

_RULE = stage.autocast_dtype_for

pytestmark = pytest.mark.reference_kernels


@pytest.fixture(scope="module")
def tokenizer():
    return rl_tokenizer()


def _as_if_cuda(device, bf16):
    """The rule, evaluated for a CUDA device whatever ``device`` is."""
    return _RULE(torch.device("cuda"), bf16)


class _Stop(Exception):
    """Raised by a trapped call: the run under test stops there."""


def _trap_autocast(monkeypatch, module):
    """Replace ``module.evaluate`` by a call that records the ``autocast_dtype`` it was given
    and raises _Stop; returns the list of recorded dtypes."""
    given = []

    def evaluate(*args, autocast_dtype=None, **kwargs):
        given.append(autocast_dtype)
        raise _Stop

    monkeypatch.setattr(module, "evaluate", evaluate)
    return given


def _autocast_now(device_type: str = "cpu"):
    """The autocast dtype in force on ``device_type`` (None when autocast is off)."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def test_the_autocast_rule():
    """bf16 on a CUDA device when bf16 is on; never on the CPU (its runs stay fp32)."""
    assert _RULE(torch.device("cuda"), True) is torch.bfloat16
    assert _RULE(torch.device("cuda:1"), True) is torch.bfloat16
    assert _RULE(torch.device("cuda"), False) is None
    assert _RULE(torch.device("cpu"), True) is None
    assert _RULE(torch.device("cpu"), False) is None


def _recording_engine(seen: list):
    """A RolloutEngine that appends ("engine", its autocast_dtype) to ``seen``."""
    class Recording(RolloutEngine):
        def __init__(self, *args, autocast_dtype=None, **kwargs):
            seen.append(("engine", autocast_dtype))
            super().__init__(*args, autocast_dtype=autocast_dtype, **kwargs)

    return Recording


@pytest.mark.parametrize("as_cuda, bf16, expected", [
    (False, True, None),  # the CPU: nothing changes
    (True, True, torch.bfloat16),  # a GPU with ppo.bf16: the RL stage's autocast
    (True, False, None),  # a GPU with ppo.bf16=false: fp32, as the RL stage
])
def test_sample_texts_runs_in_the_rl_stages_autocast(tokenizer, monkeypatch, as_cuda, bf16,
                                                     expected):
    """pipeline.sample_texts (the pairs, the held-out samples, the frontier's points) gives the
    rollout engine the RL stage's autocast dtype, and runs the reference's log-probs (the KL)
    and the reward model's scores under it. Before, the engine had none and the forwards ran
    outside any autocast, on a GPU as on the CPU."""
    seen: list = []
    monkeypatch.setattr(pipeline, "RolloutEngine", _recording_engine(seen))
    if as_cuda:
        monkeypatch.setattr(stage, "autocast_dtype_for", _as_if_cuda)
    backbone = randomised_policy(tokenizer)
    for name in ("reference_logprobs", "rewards"):
        forward = getattr(backbone, name)

        def recorded(*args, _forward=forward, _name=name, **kwargs):
            seen.append((_name, _autocast_now()))
            return _forward(*args, **kwargs)

        monkeypatch.setattr(backbone, name, recorded)
    cfg = rl_config(None, "grpo", bf16=bf16)
    texts, kl, proxy = pipeline.sample_texts(backbone, tokenizer, PROMPTS[:4], "policy", cfg, 3,
                                             2, with_scores=True)
    assert len(texts) == 4 and torch.isfinite(kl).all() and torch.isfinite(proxy).all()
    assert seen == [("engine", expected)] + [("reference_logprobs", expected),
                                             ("rewards", expected)] * 2
    seen.clear()
    texts, kl = pipeline.sample_texts(backbone, tokenizer, PROMPTS[:2], None, cfg, 3, 2)
    assert seen == [("engine", expected)] and torch.equal(kl, torch.zeros(2))


def test_the_reward_models_heldout_accuracy_is_measured_under_its_training_autocast(
        tokenizer, tmp_path, monkeypatch):
    """reward.train evaluated its held-out pairs outside autocast, on a GPU too, while it
    trained under bf16 autocast (and RL scores with it under autocast): the held-out accuracy
    was that of other numerics. evaluate now takes the training's autocast dtype."""
    from tests.helpers import sentiment_pairs, tiny_backbone

    backbone = tiny_backbone(tokenizer)
    pairs = reward.encode_pairs(sentiment_pairs(6, 7), tokenizer, 80)
    inside = []
    rewards = backbone.rewards

    def recorded(*args, **kwargs):
        inside.append(_autocast_now())
        return rewards(*args, **kwargs)

    monkeypatch.setattr(backbone, "rewards", recorded)
    plain = reward.evaluate(backbone, pairs, tokenizer.pad_token_id)
    assert inside == [None]
    autocast = reward.evaluate(backbone, pairs, tokenizer.pad_token_id,
                               autocast_dtype=torch.bfloat16)
    assert inside == [None, torch.bfloat16] and autocast["eval_pairs"] == plain["eval_pairs"]

    given = _trap_autocast(monkeypatch, reward)  # evaluate records its dtype, stops
    for as_cuda, expected in ((False, None), (True, torch.bfloat16)):
        monkeypatch.setattr(reward, "autocast_dtype_for", _as_if_cuda if as_cuda else _RULE)
        cfg = reward.RewardConfig(output_dir=str(tmp_path / f"rm-{as_cuda}"),
                                  batch_size=4, epochs=1.0, grad_accum_steps=1, warmup_steps=0,
                                  save_every=0, device="cpu", max_length=80)
        with pytest.raises(_Stop):
            reward.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer,
                         train_pairs=sentiment_pairs(4, 0), eval_pairs=sentiment_pairs(2, 7))
        assert given[-1] is expected


def test_arithmetic_evaluation_runs_in_the_rl_stages_autocast(tiny_chat_model, tmp_path,  # noqa: F811
                                                              monkeypatch):
    """rlhf pipeline task=arithmetic measured the held-out accuracy (before RL, the curve and
    after RL) with an engine given no autocast: on a GPU not the numerics the RL stage samples
    the same policy in. The pipeline now gives evaluate the RL stage's autocast dtype, and
    evaluate gives it to the engine."""
    from rlhf import arithmetic
    from rlhf.models import LoraSpec, SharedBackbone, load_tokenizer

    seen: list = []
    monkeypatch.setattr("rlhf.engine.RolloutEngine", _recording_engine(seen))
    tokenizer = load_tokenizer(str(tiny_chat_model))
    backbone = SharedBackbone.from_pretrained(str(tiny_chat_model), lora=LoraSpec(rank=4),
                                              roles=("policy",))
    problems = arithmetic.problems("heldout", 2)
    plain = arithmetic.evaluate(backbone, tokenizer, problems, max_new_tokens=4)
    autocast = arithmetic.evaluate(backbone, tokenizer, problems, max_new_tokens=4,
                                   autocast_dtype=torch.bfloat16)
    assert seen == [("engine", None), ("engine", torch.bfloat16)]
    assert plain["n"] == autocast["n"] == 2

    given = _trap_autocast(monkeypatch, arithmetic)  # evaluate records its dtype, stops
    for as_cuda, bf16, expected in ((False, True, None), (True, True, torch.bfloat16),
                                    (True, False, None)):
        monkeypatch.setattr(stage, "autocast_dtype_for", _as_if_cuda if as_cuda else _RULE)
        cfg = pipeline.PipelineConfig(task="arithmetic", model=str(tiny_chat_model),
                                      algorithm="grpo", device="cpu", eval_problems=4,
                                      output_dir=str(tmp_path / f"run-{as_cuda}-{bf16}"))
        cfg.ppo.bf16 = bf16
        with pytest.raises(_Stop):
            pipeline.run(cfg)
        assert given[-1] is expected


# --------------------------------------------------------------------------------------------
# the preference pairs' own sampling settings
# --------------------------------------------------------------------------------------------
def _printed(capsys, argv) -> dict:
    import yaml

    from rlhf import cli

    assert cli.main(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_shows_how_the_pairs_are_sampled(capsys):
    """The pairs were drawn with ppo.temperature / top_k / top_p, which nothing said: a user
    lowering ppo.temperature for RL silently changed the reward model's data too. They have
    their own settings now, which default to the RL stage's (None) and show the values used."""
    shown = _printed(capsys, ["pipeline", "--print-config"])
    assert (shown["pair_temperature"], shown["pair_top_k"], shown["pair_top_p"]) == (1.0, 0, 1.0)
    shown = _printed(capsys, ["pipeline", "ppo.temperature=0.8", "ppo.top_k=50", "--print-config"])
    assert (shown["pair_temperature"], shown["pair_top_k"], shown["pair_top_p"]) == (0.8, 50, 1.0)
    shown = _printed(capsys, ["pipeline", "ppo.temperature=0.8", "pair_temperature=1.2",
                              "pair_top_p=0.9", "--print-config"])
    assert (shown["pair_temperature"], shown["pair_top_k"], shown["pair_top_p"]) == (1.2, 0, 0.9)
    assert (shown["ppo"]["temperature"], shown["ppo"]["top_p"]) == (0.8, 1.0)


@pytest.mark.parametrize("settings, message", [
    (dict(pair_temperature=0.0), r"pair_temperature=0.0 is out of range"),
    (dict(pair_top_k=-1), r"pair_top_k=-1 is out of range"),
    (dict(pair_top_p=1.5), r"pair_top_p=1.5 is out of range: it must be in \(0, 1\]"),
    (dict(pair_temperature=0.7, task="arithmetic", model="m"),
     r"pair_temperature=0.7 has no effect with task=arithmetic"),
])
def test_pair_sampling_settings_out_of_range_or_unused_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        pipeline.check_settings(pipeline.PipelineConfig(**settings))


def test_pair_sampling_settings_are_refused_on_your_own_pairs():
    cfg = pipeline.PipelineConfig(pair_top_k=20)
    cfg.sft.model, cfg.sft.dataset = "m", "s.jsonl"
    cfg.reward.dataset, cfg.ppo.dataset = "p.jsonl", "q.jsonl"
    with pytest.raises(ValueError, match=r"pair_top_k=20 has no effect here: it is a setting "
                                         r"of the built-in review task"):
        pipeline.check_settings(cfg)


@pytest.mark.parametrize("pair_settings, pairs_drawn_with", [
    ({}, (0.8, 40, 0.95)),  # the RL stage's, as before
    (dict(pair_temperature=1.3, pair_top_k=0, pair_top_p=1.0), (1.3, 0, 1.0)),
    (dict(pair_top_p=0.5), (0.8, 40, 0.5)),  # the others stay the RL stage's
])
def test_the_pipeline_samples_its_pairs_with_the_pair_settings(tmp_path, monkeypatch,
                                                               pair_settings, pairs_drawn_with):
    """rlhf pipeline draws both samples of each pair with pair_* (the RL stage's where None),
    and the held-out samples of both models with the RL stage's settings. SFT, the reward model
    and RL are stand-ins: the calls are under test."""
    from rlhf import rl, sft

    calls = []

    def sample_texts(backbone, tokenizer, prompts, role, cfg, seed, batch_size, **kwargs):
        calls.append((role, seed, (cfg.temperature, cfg.top_k, cfg.top_p),
                      (cfg.max_new_tokens, cfg.bf16)))
        if seed == 21:  # the held-out samples of the SFT model: the pairs are done
            raise _Stop
        # A liked, B disliked by the gold judge: every pair has a preference
        text = "It is great, I love it." if seed == 11 else "It is awful, I hate it."
        return [text] * len(prompts), torch.zeros(len(prompts))

    def stand_in(name):
        def train(cfg, **kwargs):
            from pathlib import Path

            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            return {"model": kwargs.get("model"), "stage": name}
        return train

    monkeypatch.setattr(pipeline, "sample_texts", sample_texts)
    for module, name in ((sft, "sft"), (reward, "reward"), (rl, "rl")):
        monkeypatch.setattr(module, "train", stand_in(name))
    cfg = pipeline.PipelineConfig(output_dir=str(tmp_path / "run"), device="cpu", corpus_size=40,
                                  vocab_size=300, hidden_size=32, num_layers=1, pair_prompts=20,
                                  lora_rank=4, lora_alpha=8, eval_samples=4, sample_batch_size=8,
                                  seed=0, **pair_settings)
    cfg.ppo.temperature, cfg.ppo.top_k, cfg.ppo.top_p = 0.8, 40, 0.95
    cfg.ppo.max_new_tokens, cfg.ppo.max_prompt_length = 12, 40
    with pytest.raises(_Stop):
        pipeline.run(cfg)
    assert [(role, seed) for role, seed, *_ in calls] == [(None, 11), (None, 12), (None, 21)]
    assert [drawn for _, _, drawn, _ in calls] == [pairs_drawn_with] * 2 + [(0.8, 40, 0.95)]
    assert all(rest == (12, True) for *_, rest in calls)  # lengths and numerics: the RL stage's
