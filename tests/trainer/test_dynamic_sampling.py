"""DAPO's dynamic sampling and overlong reward shaping (rlhf/groups.py) in the RL stage: the
flat-group test and the length penalty against closed forms; generations of different widths
concatenated score as they score apart; the rounds keep the first informative groups and fill
from the flat ones only when the rounds run out; a run trains only on groups with a spread,
warns once when it could not, and resumes to the same next iteration; bad settings are
refused in one line.

Everything runs on the CPU in seconds (the tiny model of tests/trainer/test_stages.py).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from rlhf import groups, rl
from rlhf.checkpoint import latest_checkpoint, load_state
from rlhf.engine import Generation
from tests.helpers import (
    PROMPTS,
    group_generation,
    interrupt_at,
    randomised_policy,
    read_jsonl,
    rl_config,
    rl_tokenizer,
    tiny_backbone,
    without_timings,
)

pytestmark = pytest.mark.reference_kernels


@pytest.fixture(scope="module")
def tokenizer():
    return rl_tokenizer()


# ---------------------------------------------------------------------------------------------
# closed forms
# ---------------------------------------------------------------------------------------------
def test_flat_groups_are_the_groups_without_spread():
    values = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0 + 1e-9, 2.0, 0.5, 0.5, 0.5001],
                          dtype=torch.float64)  # within 1e-6 counts as the same
    assert groups.flat_groups(values, 3).tolist() == [True, False, True, False]
    assert groups.flat_groups(values, 2).tolist() == [True, False, False, True, False, False]
    assert groups.flat_groups(values, 1).all()  # one sample: nothing to compare with


@pytest.mark.parametrize("buffer, penalty", [(4, 1.0), (10, 0.5), (1, 2.0)])
def test_overlong_penalty_closed_form(buffer, penalty):
    max_new = 10
    lengths = torch.arange(0, max_new + 1)
    got = groups.overlong_penalty(lengths, max_new, buffer, penalty)
    for length, value in zip(lengths.tolist(), got.tolist(), strict=True):
        start = max_new - buffer  # no penalty up to here, -penalty at max_new
        expected = 0.0 if length <= start else -penalty * (length - start) / buffer
        assert value == pytest.approx(expected, abs=1e-7), (length, value, expected)
    assert got[-1] == pytest.approx(-penalty)
    assert torch.equal(groups.overlong_penalty(lengths, max_new, 0, penalty),
                       torch.zeros(lengths.shape))


def test_overlong_shaping_enters_the_rewards(tokenizer):
    backbone = randomised_policy(tokenizer)
    cfg = rl_config(None, "grpo", max_new_tokens=8, overlong_buffer=5, overlong_penalty=0.7,
                    score_clip=2.0)
    gen = group_generation(backbone, tokenizer, cfg, 2)
    # responses of 1 .. 8 tokens (cut as EOS would): rows on both sides of the start at 3
    lengths = torch.arange(1, 9)
    keep = torch.arange(gen.response_mask.shape[1])[None, :] < lengths[:, None]
    P = gen.prompt_length
    gen = Generation(torch.cat([gen.sequences[:, :P], gen.response_ids.masked_fill(
                         ~keep, tokenizer.pad_token_id)], 1),
                     torch.cat([gen.attention_mask[:, :P], keep.long()], 1), keep,
                     gen.logprobs * keep, P)
    scores = torch.linspace(-1.5, 1.5, 8)
    rollout = rl.make_rollout(backbone, gen, kl_coef=0.3, cfg=cfg, use_recorded_logprobs=True,
                              scores=scores)
    # kl in the loss: the sequence reward is the clipped score plus the length penalty
    penalty = [-0.7 * max(0.0, (n - 3) / 5) for n in lengths.tolist()]
    expected = (scores.double() + torch.tensor(penalty, dtype=torch.float64)).clamp(-2.0, 2.0)
    torch.testing.assert_close(rollout.rewards.double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(rollout.scores, scores)  # the reward's own scores are what it reports


# ---------------------------------------------------------------------------------------------
# generations of different widths laid out as one
# ---------------------------------------------------------------------------------------------
def test_concatenated_generations_score_as_they_score_apart(tokenizer):
    backbone = randomised_policy(tokenizer, seed=3)
    cfg = rl_config(None, "grpo", group_size=2, max_new_tokens=10)
    short = group_generation(backbone, tokenizer, cfg, 2, seed=1)
    ids, mask = rl.encode_prompts(PROMPTS[5:8], tokenizer, cfg.max_prompt_length)
    from rlhf.engine import RolloutEngine

    long = RolloutEngine(backbone).generate(  # longer prompts, shorter responses
        ids, mask, 6, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        seed=9, samples_per_prompt=2).without_prompt_padding()
    assert short.prompt_length != long.prompt_length  # both frames need padding
    assert short.response_mask.shape[1] > long.response_mask.shape[1]
    both = Generation.concat([short.rows(torch.tensor([2, 3, 0, 1])), long],
                             tokenizer.pad_token_id)
    assert both.sequences.shape[0] == 10
    assert both.prompt_length == max(short.prompt_length, long.prompt_length)
    apart = [rl.make_rollout(backbone, g, 0.1, cfg) for g in
             (short.rows(torch.tensor([2, 3, 0, 1])), long)]
    joined = rl.make_rollout(backbone, both, 0.1, cfg)
    for name in ("old_logprobs", "ref_logprobs", "action_mask"):
        for part, rows in zip(apart, (slice(0, 4), slice(4, 10)), strict=True):
            width = getattr(part, name).shape[1]
            got = getattr(joined, name)[rows]
            torch.testing.assert_close(got[:, :width], getattr(part, name), rtol=1e-5,
                                       atol=1e-5, msg=name)
            assert not got[:, width:].any(), name  # the padding columns hold nothing
    torch.testing.assert_close(joined.scores, torch.cat([p.scores for p in apart]), rtol=1e-5,
                               atol=1e-5)
    # the tokens and their masks are the parts', shifted into the common frame
    for part, rows in zip((short.rows(torch.tensor([2, 3, 0, 1])), long),
                          (slice(0, 4), slice(4, 10)), strict=True):
        left = both.prompt_length - part.prompt_length
        width = part.sequences.shape[1]
        assert torch.equal(both.sequences[rows, left:left + width], part.sequences)
        assert not both.attention_mask[rows, :left].any()


# ---------------------------------------------------------------------------------------------
# the rounds
# ---------------------------------------------------------------------------------------------
def _round(scores, tag: int, group_size: int) -> groups.Round:
    """A sampling round whose every token is ``tag`` (to tell the rounds apart)."""
    rows = len(scores)
    sequences = torch.full((rows, 3), tag)
    generation = Generation(sequences, torch.ones(rows, 3, dtype=torch.long),
                            torch.ones(rows, 1, dtype=torch.bool), torch.zeros(rows, 1), 2)
    return groups.Round(torch.arange(rows // group_size) + 10 * tag, generation,
                        torch.tensor(scores, dtype=torch.float32))


@pytest.mark.parametrize("max_rounds, expected_rounds, expected_filled", [(4, 3, 0), (2, 2, 2)])
def test_rounds_keep_the_first_groups_with_spread(max_rounds, expected_rounds, expected_filled):
    cfg = rl_config(None, "dapo", rollout_batch_size=8, group_size=2, minibatch_size=2,
                    dynamic_sampling_rounds=max_rounds, score_clip=None)
    # 4 groups of 2 per round; a group is informative when its two scores differ
    planned = [[1, 1, 0, 1, 0, 0, 2, 2],  # groups 1 kept
               [0, 5, 3, 3, 1, 1, 7, 7],  # group 0 kept
               [1, 2, 4, 3, 0, 1, 9, 9],  # groups 0, 1, 2 kept: the batch is full
               [0, 1, 0, 1, 0, 1, 0, 1]]  # never sampled
    sampled = []

    def sample_round():
        sampled.append(len(sampled) + 1)
        return _round(planned[len(sampled)], len(sampled), 2)

    batch, metrics = groups.dynamic_sample(_round(planned[0], 0, 2), sample_round, cfg, 0)
    assert metrics["dynamic_sampling/rounds"] == expected_rounds == len(sampled) + 1
    assert metrics["dynamic_sampling/filled_groups"] == expected_filled
    kept = {4: 5, 2: 2}[max_rounds]
    assert metrics["dynamic_sampling/kept_fraction"] == pytest.approx(
        kept / (4 * expected_rounds))
    if max_rounds == 4:  # round 0 group 1, round 1 group 0, round 2 groups 0 and 1
        assert batch.rows.tolist() == [1, 10, 20, 21]
        assert batch.scores.tolist() == [0, 1, 0, 5, 1, 2, 4, 3]
        assert batch.generation.sequences[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 2, 2]
    else:  # the two kept, then the earliest flat groups (round 0 groups 0 and 2)
        assert batch.rows.tolist() == [1, 0, 2, 10]
        assert groups.flat_groups(batch.scores, 2).tolist() == [False, True, True, False]
    assert batch.generation.sequences.shape[0] == 8


# ---------------------------------------------------------------------------------------------
# the RL stage
# ---------------------------------------------------------------------------------------------
FLAT_PROMPTS = set(PROMPTS[::2])  # every sample of these prompts scores the same


def length_reward(prompts, responses):
    """1 for a response longer than 4 characters, except on FLAT_PROMPTS (always 0)."""
    return [0.0 if p in FLAT_PROMPTS else float(len(r) > 4) + 0.1 * (len(r) % 3)
            for p, r in zip(prompts, responses, strict=True)]


def test_a_dapo_run_trains_on_groups_with_spread_and_resumes(tmp_path, tokenizer):
    def cfg_at(directory):
        return rl_config(directory, "dapo", rollout_batch_size=8, group_size=2,
                         minibatch_size=4, num_iterations=3, dynamic_sampling_rounds=6)

    rl.train(cfg_at(tmp_path / "a"), backbone=tiny_backbone(tokenizer), tokenizer=tokenizer,
             prompts=PROMPTS, reward_fn=length_reward)
    records = read_jsonl(tmp_path / "a" / "dapo" / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [1, 2, 3]
    for record in records:
        # half the prompts are flat: more than one round, and no flat group was trained on
        assert record["dynamic_sampling/kept_fraction"] < 1.0
        assert record["dynamic_sampling/rounds"] >= 2
        assert record["dynamic_sampling/filled_groups"] == 0
        assert record["group/zero_std_fraction"] == 0.0
        assert record["group/reward_std"] > 0

    cfg = cfg_at(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        rl.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS,
                 reward_fn=length_reward, on_iteration=interrupt_at(2))
    assert load_state(latest_checkpoint(tmp_path / "b" / "dapo" / "checkpoints"))[
        "iteration"] == 2
    cfg.resume = True
    rl.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS,
             reward_fn=length_reward)
    resumed = read_jsonl(tmp_path / "b" / "dapo" / "metrics.jsonl")
    assert [r["iteration"] for r in resumed] == [1, 2, 3]
    for a, b in zip(records, resumed, strict=True):  # bit for bit, but the clocks and memory
        assert without_timings(a) == without_timings(b)


def test_without_dynamic_sampling_the_flat_groups_stay(tmp_path, tokenizer):
    cfg = rl_config(tmp_path, "dapo", rollout_batch_size=8, group_size=2, minibatch_size=4,
                    num_iterations=2, dynamic_sampling=False)
    rl.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS,
             reward_fn=length_reward)
    records = read_jsonl(tmp_path / "dapo" / "metrics.jsonl")
    assert max(r["group/zero_std_fraction"] for r in records) > 0  # what it would have dropped
    assert not any(key.startswith("dynamic_sampling/") for key in records[0])


def test_rounds_that_run_out_fill_with_flat_groups_and_warn_once(tmp_path, tokenizer):
    cfg = rl_config(tmp_path, "dapo", rollout_batch_size=8, group_size=2, minibatch_size=4,
                    num_iterations=2, dynamic_sampling_rounds=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rl.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS,
                 reward_fn=lambda prompts, responses: [1.0] * len(responses))
    filled = [w for w in caught if "dynamic_sampling/filled_groups" in str(w.message)]
    assert len(filled) == 1, [str(w.message) for w in caught]
    records = read_jsonl(tmp_path / "dapo" / "metrics.jsonl")
    for record in records:
        assert record["dynamic_sampling/rounds"] == 2
        assert record["dynamic_sampling/filled_groups"] == 4  # every group of the batch
        assert record["dynamic_sampling/kept_fraction"] == 0.0
        assert math.isfinite(record["policy/loss"])


def test_overlong_metrics_in_a_run(tmp_path, tokenizer):
    cfg = rl_config(tmp_path, "grpo", num_iterations=1, overlong_buffer=4)
    rl.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS,
             reward_fn=length_reward)
    (record,) = read_jsonl(tmp_path / "grpo" / "metrics.jsonl")
    assert -1.0 <= record["overlong/penalty_mean"] <= 0.0
    assert 0.0 <= record["overlong/penalised_fraction"] <= 1.0
    # the mean response length of the batch bounds the mean penalty from below
    start = cfg.max_new_tokens - 4
    assert record["overlong/penalty_mean"] <= 0.0
    if record["response_length"] > start:
        assert record["overlong/penalised_fraction"] > 0


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------
def test_presets_and_refusals():
    assert rl.RLConfig(algorithm="dapo").settings.dynamic_sampling
    for algorithm in ("ppo", "grpo", "dr_grpo", "rloo", "gspo", "cispo"):
        assert not rl.RLConfig(algorithm=algorithm).settings.dynamic_sampling, algorithm
    assert rl.RLConfig(algorithm="grpo", dynamic_sampling=True).settings.dynamic_sampling
    with pytest.raises(ValueError, match=r"dynamic_sampling_rounds=8 has no effect with "
                                         r"algorithm='grpo' \(dynamic_sampling is off\)"):
        rl.RLConfig(algorithm="grpo", dynamic_sampling_rounds=8).check_critic_settings()
    with pytest.raises(ValueError, match=r"dynamic_sampling drops the groups.*"
                                         r"advantage_estimator='gae' and group_size=1"):
        rl.RLConfig(algorithm="ppo", dynamic_sampling=True).check_critic_settings()
    with pytest.raises(ValueError, match=r"group_size=1 with the grpo advantage estimator "
                                         r"\(algorithm='dapo'\)"):
        rl.RLConfig(algorithm="dapo", group_size=1)
    rl.RLConfig(algorithm="dapo", dynamic_sampling_rounds=8).check_critic_settings()
    with pytest.raises(ValueError, match=r"overlong_buffer \(200\) must be at most "
                                         r"max_new_tokens \(128\)"):
        rl.RLConfig(overlong_buffer=200)
    with pytest.raises(ValueError, match=r"overlong_penalty=0.5 has no effect with "
                                         r"overlong_buffer=0"):
        rl.RLConfig(overlong_penalty=0.5)
    with pytest.raises(ValueError, match=r"dynamic_sampling_rounds=0 is out of range"):
        rl.RLConfig(algorithm="dapo", dynamic_sampling_rounds=0)
    with pytest.raises(ValueError, match=r"overlong_buffer=-1 is out of range"):
        rl.RLConfig(overlong_buffer=-1)


def test_with_the_reward_model_its_scores_pick_the_groups(tmp_path, tokenizer, monkeypatch):
    """No reward function: the reward model scores every round's rows (without a graph), and
    those are the scores the kept rows carry into the rollout."""
    seen = []
    original = groups.dynamic_sample

    def spy(first, sample_round, cfg, pad_token_id):
        batch, metrics = original(first, sample_round, cfg, pad_token_id)
        seen.append(batch)
        return batch, metrics

    monkeypatch.setattr(groups, "dynamic_sample", spy)
    backbone = tiny_backbone(tokenizer)
    cfg = rl_config(tmp_path, "dapo", num_iterations=1)
    rl.train(cfg, backbone=backbone, tokenizer=tokenizer, prompts=PROMPTS)
    (batch,) = seen
    assert not batch.scores.requires_grad
    # the policy adapter moved during the update, the reward adapter did not; score the
    # sampled rows with a fresh copy of the stage's start state all the same
    fresh = tiny_backbone(tokenizer)
    with torch.no_grad():
        expected = fresh.rewards(batch.generation.sequences,
                                 batch.generation.attention_mask).float()
    torch.testing.assert_close(batch.scores, expected, rtol=1e-5, atol=1e-5)
    (record,) = read_jsonl(tmp_path / "dapo" / "metrics.jsonl")
    assert record["proxy_reward"] == pytest.approx(float(expected.mean()), rel=1e-5, abs=1e-6)


def test_the_pipeline_refuses_before_anything_runs(tmp_path, capsys):
    from rlhf import cli

    for args, message in ((["algorithm=grpo", "ppo.dynamic_sampling_rounds=8"],
                           "dynamic_sampling_rounds=8 has no effect"),
                          (["algorithm=ppo", "ppo.dynamic_sampling=true"],
                           "dynamic_sampling drops the groups")):
        out = tmp_path / args[0]
        assert cli.main(["pipeline", *args, f"output_dir={out}"]) == cli.EXIT_USAGE
        assert message in capsys.readouterr().err
        assert not out.exists()  # refused before the SFT stage


def test_print_config_shows_only_what_the_run_uses():
    assert "dynamic_sampling_rounds" not in rl.printable_config(rl.RLConfig(algorithm="grpo"))
    shown = rl.printable_config(rl.RLConfig(algorithm="dapo", dynamic_sampling_rounds=6))
    assert shown["dynamic_sampling"] is True and shown["dynamic_sampling_rounds"] == 6
    assert "critic_lr" not in shown and "critic_lr" in rl.printable_config(rl.RLConfig())


# ---------------------------------------------------------------------------------------------
# mask_truncated: no loss on responses cut at max_new_tokens
# ---------------------------------------------------------------------------------------------
def test_truncated_rows_are_those_without_an_eos():
    eos = 2
    response = torch.tensor([[5, 2, 0], [5, 6, 7], [2, 0, 0], [5, 6, 2]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    gen = Generation(torch.cat([torch.ones(4, 2, dtype=torch.long), response], 1),
                     torch.cat([torch.ones(4, 2, dtype=torch.long), mask.long()], 1), mask,
                     torch.zeros(4, 3), 2)
    assert gen.truncated(eos).tolist() == [False, True, False, False]
    assert gen.truncated([7, 9]).tolist() == [True, False, True, True]  # EOS ids as a list
    assert gen.truncated(None).all()  # nothing ends without an EOS token
    # an EOS token hidden by the mask (padding) does not end a row
    hidden = Generation(gen.sequences, gen.attention_mask, mask & torch.tensor([[1, 0, 0]] * 4,
                        dtype=torch.bool), gen.logprobs, 2)
    assert hidden.truncated(eos).tolist() == [True, True, False, True]


@pytest.mark.parametrize("algorithm", ["grpo", "dapo", "gspo", "ppo"])
def test_a_masked_row_adds_nothing_to_the_step(tokenizer, algorithm):
    """The loss and gradients of a micro-batch whose cut rows are masked equal those of the
    micro-batch without the rows (the reductions count rows with a token, and step_tokens
    counts tokens)."""
    backbone = randomised_policy(tokenizer, seed=4)
    cfg = rl_config(None, algorithm, **({"group_size": 1} if algorithm == "ppo" else {}))
    gen = group_generation(backbone, tokenizer, cfg, 8 if algorithm == "ppo" else 2, seed=6)
    rollout = rl.make_rollout(backbone, gen, kl_coef=0.3, cfg=cfg, use_recorded_logprobs=True)
    cut = torch.tensor([False, True, False, False, True, False, False, False])
    results = []
    for batch in (rollout.without_rows_in_loss(cut), rollout.rows(~cut)):
        backbone.zero_grad(set_to_none=True)
        normalizer = rl.step_normalizer(cfg, [batch])
        p_loss, _, v_loss, _ = rl.backward_losses(backbone, batch, cfg, normalizer=normalizer)
        grads = {name: p.grad.clone() for name, p in backbone.named_parameters()
                 if p.grad is not None}
        results.append((float(p_loss.detach()),
                        None if v_loss is None else float(v_loss.detach()), grads))
    (loss_m, value_m, grads_m), (loss_r, value_r, grads_r) = results
    assert loss_m == pytest.approx(loss_r, rel=1e-5, abs=1e-7)
    if value_m is not None:
        assert value_m == pytest.approx(value_r, rel=1e-5, abs=1e-7)
    assert grads_m.keys() == grads_r.keys() and grads_m
    for name, grad in grads_m.items():
        torch.testing.assert_close(grad, grads_r[name], rtol=1e-4, atol=1e-6, msg=name)


def test_mask_truncated_run_with_every_response_cut_leaves_the_policy(tmp_path, tokenizer):
    """The tiny model never samples EOS in 8 tokens: every response is cut, so with
    mask_truncated no token is trained on and the policy adapter keeps its weights; without
    it, the same run moves them."""
    moved = {}
    for mask in (True, False):
        backbone = tiny_backbone(tokenizer)
        before = {k: v.detach().clone() for k, v in backbone.named_trainable_parameters("policy")}
        cfg = rl_config(tmp_path / str(mask), "grpo", num_iterations=1, mask_truncated=mask,
                        kl_coef=0.0, kl_target=None)
        rl.train(cfg, backbone=backbone, tokenizer=tokenizer, prompts=PROMPTS,
                 reward_fn=length_reward)
        (record,) = read_jsonl(tmp_path / str(mask) / "grpo" / "metrics.jsonl")
        assert record["truncated_fraction"] == 1.0
        after = dict(backbone.named_trainable_parameters("policy"))
        moved[mask] = max(float((after[k].detach() - v).abs().max()) for k, v in before.items())
    assert moved[True] == 0.0 and moved[False] > 0.0, moved
