"""The RL stage's critic-free algorithms (rlhf/rl.py) on a tiny model: every algorithm trains,
checkpoints and resumes to the same next iteration; no critic exists in a critic-free run; the
advantages are group_advantages of the engine's groups; a step's loss equals a float64
computation written out here; bad settings are refused in one line.

Everything runs on the CPU in seconds (a 2-layer, 32-wide Llama; a 300-token BPE).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import rlhf_kernels
from rlhf import cli, rl, task
from rlhf.checkpoint import RunDirectoryError, latest_checkpoint, load_state
from rlhf.engine import RolloutEngine
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

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.reference_kernels]


@pytest.fixture(scope="module")
def tokenizer():
    return rl_tokenizer()


# ---------------------------------------------------------------------------------------------
# presets and settings
# ---------------------------------------------------------------------------------------------
def test_presets_resolve_and_explicit_settings_win():
    s = rl.RLConfig().settings
    assert (s.advantage_estimator, s.group_size, s.loss_reduction, s.kl_in_loss,
            s.kl_estimator, s.clip_ratio_high) == ("gae", 1, "token-mean", False, "k1", 0.2)
    assert s.uses_critic
    expected = {  # the contract's presets
        "grpo": ("grpo", "token", "ppo", "seq-mean-token-mean", "batch"),
        "dr_grpo": ("dr_grpo", "token", "ppo", "seq-mean-token-sum-norm", "max_length"),
        "rloo": ("rloo", "token", "ppo", "token-mean", "batch"),
        "gspo": ("grpo", "sequence", "ppo", "seq-mean-token-mean", "batch"),
        "dapo": ("grpo", "token", "ppo", "token-mean", "step_tokens"),
        "cispo": ("grpo", "token", "cispo", "token-mean", "step_tokens"),
        "sapo": ("grpo", "token", "sapo", "seq-mean-token-mean", "batch"),
    }
    for algorithm, values in expected.items():
        s = rl.RLConfig(algorithm=algorithm).settings
        assert (s.advantage_estimator, s.ratio_level, s.loss_type, s.loss_reduction,
                s.loss_normalizer) == values, algorithm
        assert not s.uses_critic and s.kl_in_loss and s.kl_estimator == "k3", algorithm
    assert rl.RLConfig(algorithm="dapo").settings.clip_ratio_high == 0.28
    # an explicit setting wins over the preset
    s = rl.RLConfig(algorithm="grpo", loss_reduction="token-sum", kl_in_loss=False,
                    group_size=4, clip_ratio_high=0.3, advantage_norm="batch").settings
    assert (s.loss_reduction, s.kl_in_loss, s.group_size, s.clip_ratio_high,
            s.advantage_norm) == ("token-sum", False, 4, 0.3, "batch")
    assert rl.GRPOConfig().algorithm == "grpo" and rl.GRPOConfig().output_dir == "runs/grpo"
    assert rl.PPOConfig().algorithm == "ppo"


@pytest.mark.parametrize("settings, message", [
    (dict(algorithm="reinforce"), r"algorithm='reinforce' is not an algorithm"),
    (dict(algorithm="grpo", group_size=3), r"rollout_batch_size \(64\) must be a multiple of "
                                           r"group_size \(3\)"),
    (dict(algorithm="rloo", group_size=1), r"group_size=1 with the rloo advantage estimator"),
    # a group of one: its score as its advantage, no baseline (veRL's lone-group rule)
    (dict(algorithm="gspo", group_size=1), r"group_size=1 with the grpo advantage estimator "
                                           r"\(algorithm='gspo'\) gives every sample its own "
                                           r"score as its advantage, with no baseline"),
    (dict(algorithm="grpo", group_size=0), r"group_size=0 is out of range"),
    (dict(advantage_estimator="vtrace"), r"advantage_estimator='vtrace' is not an advantage"),
    (dict(ratio_level="seq"), r"ratio_level='seq' is not a ratio level"),
    (dict(loss_type="vespo"), r"loss_type='vespo' is not a loss type"),
    # TRL's loss types that are algorithms or reductions here: the error says which
    (dict(loss_type="dr_grpo"), r"is not a loss type.*TRL's loss_type='dr_grpo' is "
                                r"algorithm=dr_grpo here$"),
    (dict(loss_type="bnpo"), r"TRL's loss_type='bnpo' .* is loss_reduction=token-mean "
                             r"loss_normalizer=batch here$"),
    (dict(algorithm="sapo", sapo_tau_neg=0.0), r"sapo_tau_neg=0.0 is out of range"),
    (dict(loss_normalizer="global"), r"loss_normalizer='global' is not a loss normalizer"),
    (dict(advantage_norm="std"), r"advantage_norm='std' is not an advantage norm"),
    (dict(clip_ratio_high=0.0), r"clip_ratio_high=0.0 is out of range"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        rl.RLConfig(**settings)


def test_sapo_temperatures_apply_to_sapo_only():
    """SAPO's gate temperatures: shown and passed to the op for loss_type=sapo (its preset, or
    any algorithm given loss_type=sapo), refused when changed for another loss type, and not
    shown where they do not apply."""
    cfg = rl.RLConfig(algorithm="sapo", sapo_tau_neg=2.0)
    assert rl.sapo_temperatures(cfg) == dict(sapo_tau_pos=1.0, sapo_tau_neg=2.0)
    shown = rl.printable_config(cfg)
    assert (shown["loss_type"], shown["sapo_tau_pos"], shown["sapo_tau_neg"]) == ("sapo", 1.0, 2.0)
    dapo_sapo = rl.RLConfig(algorithm="dapo", loss_type="sapo", sapo_tau_pos=0.5)
    assert rl.sapo_temperatures(dapo_sapo) == dict(sapo_tau_pos=0.5, sapo_tau_neg=1.05)
    grpo = rl.RLConfig(algorithm="grpo")
    assert rl.sapo_temperatures(grpo) == {} and "sapo_tau_pos" not in rl.printable_config(grpo)
    with pytest.raises(ValueError, match=r"sapo_tau_pos=2.0 has no effect with "
                                         r"algorithm='grpo' \(loss_type='ppo'"):
        rl.RLConfig(algorithm="grpo", sapo_tau_pos=2.0).check_critic_settings()


def test_critic_settings_are_refused_without_a_critic(tmp_path, capsys):
    cfg = rl.RLConfig(algorithm="grpo", critic_lr=1e-3, output_dir=str(tmp_path / "g"))
    with pytest.raises(ValueError, match=r"critic_lr=0.001 has no effect with "
                                         r"algorithm='grpo'.*no critic"):
        rl.train(cfg)
    assert not (tmp_path / "g").exists()  # refused before anything was written
    assert cli.main(["grpo", "gamma=0.9", f"output_dir={tmp_path / 'h'}"]) == cli.EXIT_USAGE
    assert "gamma=0.9 has no effect" in capsys.readouterr().err
    rl.RLConfig(algorithm="ppo", critic_lr=1e-3).check_critic_settings()  # PPO has a critic


def test_cli_grpo_alias_and_print_config(capsys):
    import yaml

    assert cli.main(["grpo", "--print-config", "group_size=4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["algorithm"] == "grpo" and shown["group_size"] == 4
    # the presets are shown resolved, and the critic settings a grpo run has not
    assert shown["loss_reduction"] == "seq-mean-token-mean" and shown["kl_estimator"] == "k3"
    assert "critic_lr" not in shown and "value_clip" not in shown
    assert cli.main(["ppo", "--print-config", "algorithm=rloo"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["advantage_estimator"] == "rloo" and shown["group_size"] == 8
    assert cli.main(["ppo", "--print-config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["advantage_estimator"] == "gae" and shown["critic_lr"] == 5e-5


# ---------------------------------------------------------------------------------------------
# groups and advantages
# ---------------------------------------------------------------------------------------------
def test_engine_samples_a_group_per_prompt(tokenizer):
    backbone = tiny_backbone(tokenizer)
    cfg = rl_config(None, group_size=4)
    ids, mask = rl.encode_prompts(PROMPTS[:3], tokenizer, cfg.max_prompt_length)
    gen = RolloutEngine(backbone).generate(
        ids, mask, 12, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        seed=3, samples_per_prompt=4)
    assert gen.sequences.shape[0] == 12
    prompts = gen.sequences[:, :gen.prompt_length]
    assert torch.equal(prompts, ids.repeat_interleave(4, 0))  # rows b*4 .. b*4 + 3: prompt b
    # the 4 samples of a prompt are drawn independently: not all the same response
    for b in range(3):
        group = gen.response_ids[4 * b:4 * b + 4]
        assert any(not torch.equal(group[0], group[k]) for k in range(1, 4)), group
    with pytest.raises(ValueError, match="samples_per_prompt must be an integer >= 1"):
        RolloutEngine(backbone).generate(ids, mask, 4, eos_token_id=None, pad_token_id=0,
                                         samples_per_prompt=0)


@pytest.mark.parametrize("algorithm, kl_in_loss", [("grpo", None), ("rloo", None),
                                                   ("dr_grpo", False)])
def test_advantages_are_group_advantages_of_the_engine_groups(tokenizer, algorithm, kl_in_loss):
    backbone = randomised_policy(tokenizer)
    cfg = rl_config(None, algorithm, kl_in_loss=kl_in_loss, score_clip=0.05,
                    kl_estimator=None if kl_in_loss is None else "k1")
    gen = group_generation(backbone, tokenizer, cfg, 2)
    rollout = rl.make_rollout(backbone, gen, kl_coef=0.3, cfg=cfg, use_recorded_logprobs=True)
    assert rollout.old_values is None and rollout.returns is None
    assert rollout.advantages.shape == (8,) and rollout.rewards.shape == (8,)
    score = rollout.scores.double().clamp(-0.05, 0.05)  # score_clip
    if cfg.settings.kl_in_loss:  # the sequence reward is the score alone
        expected_reward = score
    else:  # minus kl_coef x the summed k1 estimate of the response
        kl = ((rollout.old_logprobs - rollout.ref_logprobs) * rollout.action_mask).double()
        expected_reward = score - 0.3 * kl.sum(-1)
        assert float(kl.abs().sum()) > 1e-3  # the policy differs from the reference
    torch.testing.assert_close(rollout.rewards.double(), expected_reward, rtol=1e-5, atol=1e-6)
    # closed forms over the consecutive groups of 4 (rows 0-3: prompt 0, rows 4-7: prompt 1)
    r = expected_reward.view(2, 4)
    centred = r - r.mean(-1, keepdim=True)
    closed = {"grpo": centred / (r.std(-1, keepdim=True) + 1e-6), "dr_grpo": centred,
              "rloo": r - (r.sum(-1, keepdim=True) - r) / 3}[algorithm]
    torch.testing.assert_close(rollout.advantages.double(), closed.reshape(-1), rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(
        rollout.advantages,
        rlhf_kernels.reference.group_advantages(rollout.rewards, group_size=4,
                                                estimator=algorithm).float())


# ---------------------------------------------------------------------------------------------
# one step's loss against a float64 computation written out here
# ---------------------------------------------------------------------------------------------
def _float64_loss(backbone, batch, cfg, kl_coef, normalizer):
    """The algorithm's loss from the float64 log-softmax of the policy's logits."""
    s = cfg.settings
    with torch.no_grad():
        logits = backbone.logits(batch.sequences, batch.attention_mask, "policy").double()
    P = batch.prompt_length
    logp_all = torch.log_softmax(logits / cfg.temperature, -1)[:, P - 1:-1]
    response = batch.sequences[:, P:]
    m = batch.action_mask.double()
    logp = logp_all.gather(-1, response[..., None]).squeeze(-1) * m
    old, ref = batch.old_logprobs.double(), batch.ref_logprobs.double()
    A = batch.advantages.double()[:, None].expand_as(logp)
    n = m.sum(-1)
    if s.ratio_level == "sequence":
        ratio = torch.exp(((logp - old) * m).sum(-1) / n)[:, None].expand_as(logp)
    else:
        ratio = torch.exp(logp - old)
    low, high = 1 - s.clip_ratio, 1 + s.clip_ratio_high
    if s.loss_type == "cispo":
        per_token = -ratio.clamp(low, high) * A * logp
    elif s.loss_type == "sapo":  # the soft gate, its temperature by the sign of A
        tau = torch.where(A > 0, cfg.sapo_tau_pos, cfg.sapo_tau_neg).double()
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * A
    else:
        per_token = torch.maximum(-A * ratio, -A * ratio.clamp(low, high))
    k3 = torch.exp(ref - logp) - (ref - logp) - 1

    def reduce(x):
        x = x * m
        if s.loss_reduction == "seq-mean-token-mean":
            return (x.sum(-1) / n).sum() / (n > 0).sum()
        if normalizer is not None:
            return x.sum() / normalizer
        return x.sum() / m.sum()

    return reduce(per_token) + kl_coef * reduce(k3)


@pytest.mark.parametrize("algorithm, backend", [
    *((algorithm, "reference") for algorithm in ("grpo", "dr_grpo", "gspo", "dapo", "cispo",
                                                 "sapo")),
    # the kernels' paths: (B,) advantages and KL, the sequence ratio, CISPO with a tensor count,
    # SAPO's gate
    ("grpo", "triton"), ("gspo", "triton"), ("cispo", "triton"), ("sapo", "triton")])
def test_a_step_loss_equals_a_float64_computation(tokenizer, algorithm, backend, monkeypatch):
    """The loss the update backpropagates (rlhf_kernels.linear_ppo_loss with the algorithm's
    options: the Triton kernels under the interpreter, and the reference)."""
    if backend == "triton" and not rlhf_kernels.backend.triton_interpreter_enabled():
        pytest.skip("the Triton kernels run on CPU tensors under TRITON_INTERPRET=1 only")
    backbone = randomised_policy(tokenizer, seed=2)
    # SAPO at temperatures of its own (not the defaults): they reach the op
    cfg = rl_config(None, algorithm, **(dict(sapo_tau_pos=0.7, sapo_tau_neg=2.5)
                                        if algorithm == "sapo" else {}))
    gen = group_generation(backbone, tokenizer, cfg, 2, seed=5)
    rollout = rl.make_rollout(backbone, gen, kl_coef=0.3, cfg=cfg, use_recorded_logprobs=True)
    # the update's policy has moved from the one that sampled: ratios away from 1, some clipped
    with torch.no_grad():
        for name, param in backbone.named_parameters():
            if "lora_A" in name and ".policy." in name:
                param.mul_(1.5)
    batch = rollout.rows(torch.tensor([6, 1, 3, 4]))
    normalizer = rl.step_normalizer(cfg, [batch, rollout.rows(torch.tensor([0, 2]))])
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", backend)
    loss, stats = rl.policy_loss(backbone, batch, cfg, kl_coef=0.3, normalizer=normalizer)
    loss.backward()  # the update's backward runs on either backend
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in backbone.trainable_parameters("policy"))
    expected = _float64_loss(backbone, batch, cfg, 0.3,
                             None if normalizer is None else float(normalizer))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)
    assert float(stats["ratio_mean"]) != pytest.approx(1.0, abs=1e-4)
    if algorithm == "dapo":  # every valid token of both micro-batches
        assert float(normalizer) == float(rollout.action_mask[[6, 1, 3, 4, 0, 2]].sum())
    if algorithm == "dr_grpo":  # the step's rows x max_new_tokens
        assert normalizer == 6 * cfg.max_new_tokens


# ---------------------------------------------------------------------------------------------
# training, checkpoints, resume
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", rl.ALGORITHMS)
def test_every_algorithm_trains_and_resumes_to_the_same_next_iteration(tmp_path, tokenizer,
                                                                      algorithm):
    def gold(texts):
        return task.gold_scores(texts)

    full = rl.train(rl_config(tmp_path / "a", algorithm), backbone=tiny_backbone(tokenizer),
                    tokenizer=tokenizer, prompts=PROMPTS, gold_fn=gold)
    records = read_jsonl(tmp_path / "a" / algorithm / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert full["algorithm"] == algorithm and full["stage"] == algorithm
    critic_free = algorithm != "ppo"
    keys = ["proxy_reward", "gold_reward", "kl", "kl_coef", "policy/loss", "policy/entropy",
            "response_length", "peak_memory_mb"]
    keys += (["group/reward_std", "group/zero_std_fraction", "advantage/std", "policy/kl"]
             if critic_free else ["value/loss", "non_score_reward"])
    for record in records:
        for key in keys:
            assert key in record and math.isfinite(record[key]), (key, record)
        assert ("value/loss" in record) is not critic_free
        assert record["peak_memory_mb"] > 0
    if critic_free:
        assert 0.0 <= records[0]["group/zero_std_fraction"] <= 1.0

    cfg = rl_config(tmp_path / "b", algorithm)
    with pytest.raises(KeyboardInterrupt):
        rl.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS,
                 gold_fn=gold, on_iteration=interrupt_at(2))
    state = load_state(latest_checkpoint(tmp_path / "b" / algorithm / "checkpoints"))
    assert state["algorithm"] == algorithm and state["iteration"] == 2
    if critic_free:  # the policy adapter alone: no critic adapter, no value head
        assert all(".policy." in key for key in state["params"]), list(state["params"])
        assert len(state["optimizer"]["param_groups"]) == 1
    cfg.resume = True
    rl.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS,
             gold_fn=gold)
    resumed = read_jsonl(tmp_path / "b" / algorithm / "metrics.jsonl")
    assert [r["iteration"] for r in resumed] == [1, 2, 3]
    # bit for bit: every metric but the clocks and the memory
    for a, b in zip(records, resumed, strict=True):
        assert without_timings(a) == without_timings(b)


def test_a_critic_free_run_has_no_critic(tmp_path, tokenizer, monkeypatch):
    backbone = tiny_backbone(tokenizer)
    assert "critic" in backbone.roles  # as the reward stage leaves it

    def no_values(*args, **kwargs):
        raise AssertionError("a critic-free run computed values")

    monkeypatch.setattr(backbone, "values", no_values)
    monkeypatch.setattr(backbone, "init_critic_from_reward", no_values)
    cfg = rl_config(tmp_path, "grpo", num_iterations=1)
    rl.train(cfg, backbone=backbone, tokenizer=tokenizer, prompts=PROMPTS)
    assert backbone.roles == ("policy", "reward")
    assert not [name for name, _ in backbone.named_parameters() if ".critic." in name]
    assert backbone.value_head.weight.grad is None and not backbone.value_head.weight.requires_grad
    saved = json.loads((tmp_path / "grpo" / "backbone" / "roles.json").read_text())
    assert saved["roles"] == ["policy", "reward"]


def test_resume_with_another_algorithm_is_refused(tmp_path, tokenizer):
    cfg = rl_config(tmp_path, "grpo", num_iterations=1, output_dir=str(tmp_path / "run"))
    rl.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS)
    other = rl_config(tmp_path, "rloo", num_iterations=1, output_dir=str(tmp_path / "run"),
                      resume=True)
    with pytest.raises(RunDirectoryError, match=r"that run trains with algorithm='grpo', this "
                                                r"one asks for algorithm='rloo'"):
        rl.train(other, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS)


def test_the_planner_counts_no_critic_for_a_critic_free_run():
    from rlhf import plan as planner

    with_critic = planner.plan("qwen2.5-0.5b", batch=8)
    without = planner.plan("qwen2.5-0.5b", batch=8, critic=False)
    lora = with_critic["inputs"]["lora_params_per_adapter"]
    head = 896 + 1
    # one fp32 adapter fewer; no AdamW moments or gradients for the critic adapter and value head
    assert (with_critic["resident"]["adapters_and_heads"]
            - without["resident"]["adapters_and_heads"]) == 4 * lora
    assert with_critic["resident"]["adam_states"] - without["resident"]["adam_states"] \
        == 8 * (lora + head)
    assert (with_critic["stages"]["update"]["grads"] - without["stages"]["update"]["grads"]
            == 4 * (lora + head))
    assert without["peak_bytes"] < with_critic["peak_bytes"]
    assert without["inputs"]["critic"] is False


def _tensor_peak(tmp_path, tokenizer, algorithm) -> tuple[int, int]:
    """(peak live tensor bytes during the second iteration of a run, which has the AdamW moments
    as every later one does; bytes of the critic adapter + value head)."""
    from rlhf.plan import LiveTensorTracker

    backbone = tiny_backbone(tokenizer)
    critic = sum(p.numel() * p.element_size() for p in backbone.trainable_parameters("critic"))
    tracker = LiveTensorTracker()
    tracker.add(*backbone.parameters(), *backbone.buffers())
    save = backbone.save

    def marked_save(*args, **kwargs):  # the final save copies the weights: not an iteration
        tracker.mark("save")
        return save(*args, **kwargs)

    backbone.save = marked_save
    cfg = rl_config(tmp_path, algorithm, num_iterations=2, minibatch_size=8)
    with tracker:
        rl.train(cfg, backbone=backbone, tokenizer=tokenizer, prompts=PROMPTS,
                 on_iteration=lambda i, m: tracker.mark("iteration 2") if i == 1 else None)
    return tracker.stage_peaks["iteration 2"], critic


def test_a_critic_free_iteration_holds_less_memory_than_ppo(tmp_path, tokenizer):
    """Every live tensor counted (plan.LiveTensorTracker): the same rollout size, with and
    without a critic. GRPO saves at least the critic adapter's gradients and AdamW moments (and
    deletes the adapter itself), plus the value forward's activations."""
    ppo_peak, critic = _tensor_peak(tmp_path / "p", tokenizer, "ppo")
    grpo_peak, _ = _tensor_peak(tmp_path / "g", tokenizer, "grpo")
    assert grpo_peak < ppo_peak - 3 * critic, (grpo_peak, ppo_peak, critic)


def test_cli_grpo_trains_a_saved_backbone(tmp_path, tokenizer, capsys):
    """`rlhf grpo model=<the reward stage's backbone> dataset=prompts.jsonl`: the critic the
    loaded backbone brings is dropped, the run trains and writes a backbone without it."""
    source = tiny_backbone(tokenizer)
    source.save(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": prompt}) + "\n" for prompt in PROMPTS[:4]))
    out = tmp_path / "grpo"
    assert cli.main(["grpo", f"model={tmp_path / 'rm'}", f"dataset={tmp_path / 'prompts.jsonl'}",
                     f"output_dir={out}", "num_iterations=1", "rollout_batch_size=8",
                     "group_size=4", "minibatch_size=4", "ppo_epochs=1", "max_new_tokens=6",
                     "max_prompt_length=40", "device=cpu"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    assert summary["algorithm"] == "grpo" and summary["iterations"] == 1
    assert json.loads((out / "backbone" / "roles.json").read_text())["roles"] == ["policy",
                                                                                   "reward"]
    assert json.loads((out / "run.json").read_text())["kind"] == "grpo"
    assert len(read_jsonl(out / "metrics.jsonl")) == 1


def test_pipeline_samples_with_the_reward_models_scores(tokenizer):
    """pipeline.sample_texts(with_scores=True) adds each response's proxy reward; the texts and
    KL are those of the call without it."""
    from rlhf import pipeline

    backbone = randomised_policy(tokenizer)
    cfg = rl_config(None, "grpo")
    texts, kl = pipeline.sample_texts(backbone, tokenizer, PROMPTS[:3], "policy", cfg, 4, 2)
    again, kl_again, proxy = pipeline.sample_texts(backbone, tokenizer, PROMPTS[:3], "policy",
                                                   cfg, 4, 2, with_scores=True)
    assert again == texts and torch.equal(kl_again, kl) and proxy.shape == (3,)
    assert torch.isfinite(proxy).all() and float(proxy.std()) > 0


def test_pipeline_resume_with_another_algorithm_is_refused_by_name(tmp_path):
    from rlhf import pipeline

    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"format": 1, "kind": "pipeline", "run_id": "x",
                                              "config": {"seed": 0}}))  # an older PPO run
    cfg = pipeline.PipelineConfig(output_dir=str(out), algorithm="rloo", resume=True)
    with pytest.raises(RunDirectoryError, match=r"that run trains with algorithm='ppo', this "
                                                r"one asks for algorithm='rloo'"):
        pipeline.run(cfg)
