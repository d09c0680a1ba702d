"""The RL stage's algorithms x their settings, as a TRL or veRL user sets them: what each run
logs and computes against float64 computations written out here from the rollout it trained
on, and the settings a run would ignore refused in one line.

Tiny runs on the CPU (the 2-layer, 32-wide Llama of tests/trainer/test_grpo.py), one iteration each.
"""

from __future__ import annotations

import pytest
import torch

import rlhf_kernels
from rlhf import rl
from tests.helpers import PROMPTS, randomised_policy, read_jsonl, rl_config, rl_tokenizer

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.reference_kernels]


@pytest.fixture(scope="module")
def tokenizer():
    return rl_tokenizer()


def _one_iteration(tmp_path, tokenizer, monkeypatch, algorithm, **overrides):
    """One iteration of ``algorithm`` on a policy that differs from the reference -> (its
    metrics record, the rollout it trained on)."""
    captured = []
    make_rollout = rl.make_rollout

    def capture(*args, **kwargs):
        captured.append(make_rollout(*args, **kwargs))
        return captured[-1]

    monkeypatch.setattr(rl, "make_rollout", capture)
    cfg = rl_config(tmp_path, algorithm, num_iterations=1, **overrides)
    rl.train(cfg, backbone=randomised_policy(tokenizer), tokenizer=tokenizer, prompts=PROMPTS)
    monkeypatch.setattr(rl, "make_rollout", make_rollout)
    (record,) = read_jsonl(tmp_path / algorithm / "metrics.jsonl")
    return record, captured[0]


@pytest.mark.parametrize("algorithm", ["dapo", "dr_grpo", "cispo"])
def test_loss_parts_under_a_step_normaliser_do_not_depend_on_accumulation(tmp_path, tokenizer,
                                                                          monkeypatch, algorithm):
    """With a step normaliser (DAPO's step tokens, Dr. GRPO's rows x max_new_tokens) each
    micro-batch's loss is a part of the step's; policy/loss was scaled back to the step's
    value but its parts policy/pg_loss and policy/kl were not: with grad_accum_steps=2 they
    logged half the step's values. One step of all 8 rows on the policy that sampled them
    (ratio 1): pg_loss = -sum(A) / normaliser over the tokens (CISPO's -sum(A x logp)) and
    kl = sum(k3) / normaliser."""
    record, rollout = _one_iteration(tmp_path, tokenizer, monkeypatch, algorithm,
                                     minibatch_size=4, grad_accum_steps=2)
    m = rollout.action_mask.double()
    normaliser = float(m.sum()) if algorithm == "dapo" else 8 * 8  # rows x max_new_tokens
    d = (rollout.ref_logprobs.double() - rollout.old_logprobs.double()) * m
    kl = float(((d.exp() - d - 1) * m).sum()) / normaliser
    per_token = rollout.advantages.double()[:, None] * m
    if algorithm == "cispo":  # the weight sg(clip(1)) = 1 times logp
        per_token = per_token * rollout.old_logprobs.double()
    pg_loss = -float(per_token.sum()) / normaliser
    assert kl > 1e-3  # the policy differs from the reference
    assert record["policy/kl"] == pytest.approx(kl, rel=1e-4)
    assert record["policy/pg_loss"] == pytest.approx(pg_loss, rel=1e-3, abs=1e-6)
    assert record["policy/loss"] == pytest.approx(
        record["policy/pg_loss"] + record["kl_coef"] * record["policy/kl"], rel=1e-5, abs=1e-7)


def test_a_reduction_the_step_normaliser_overrides_is_refused():
    """Under a step normaliser the loss is the step's summed token losses over it, whatever
    the reduction (the four that sum tokens give one loss; seq-mean-token-mean divides a sum
    of row means by a token count). `algorithm=dr_grpo loss_reduction=token-mean` trained
    Dr. GRPO's loss without a word."""
    x, m = torch.randn(3, 5, dtype=torch.float64), (torch.rand(3, 5) > 0.3).double()
    same = {r: float(rlhf_kernels.reference.reduce_loss(x, m, r, normalizer=7.0))
            for r in ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm")}
    assert all(v == pytest.approx(float((x * m).sum()) / 7.0) for v in same.values()), same
    with pytest.raises(ValueError, match=r"loss_reduction='token-mean' has no effect with "
                                         r"algorithm='dr_grpo': its loss_normalizer='max_length'"
                                         r".*add loss_normalizer=batch"):
        rl.RLConfig(algorithm="dr_grpo", loss_reduction="token-mean").check_critic_settings()
    with pytest.raises(ValueError, match=r"loss_reduction='token-sum' has no effect with "
                                         r"algorithm='cispo'"):
        rl.RLConfig(algorithm="cispo", loss_reduction="token-sum").check_critic_settings()
    with pytest.raises(ValueError, match=r"loss_reduction='seq-mean-token-mean' with "
                                         r"loss_normalizer='step_tokens' would divide a sum of "
                                         r"per-row means"):
        rl.RLConfig(algorithm="grpo", loss_normalizer="step_tokens").check_critic_settings()
    for fine in (dict(algorithm="dapo", loss_reduction="token-mean"),  # the preset's own
                 dict(algorithm="dr_grpo", loss_reduction="token-mean", loss_normalizer="batch"),
                 dict(algorithm="grpo", loss_reduction="token-mean",
                      loss_normalizer="step_tokens")):
        rl.RLConfig(**fine).check_critic_settings()


def test_seq_mean_token_sum_norm_divides_by_max_new_tokens(tokenizer):
    """seq-mean-token-sum-norm (veRL's Dr. GRPO reduction) divides each row's token sum by a
    constant T; the rollout's response columns are trimmed to its longest response, so T was
    the longest response of each rollout. It is max_new_tokens, as veRL's padded responses."""
    from tests.helpers import group_generation
    from tests.trainer.test_grpo import _float64_loss

    backbone = randomised_policy(tokenizer, seed=3)
    cfg = rl_config(None, "grpo", loss_reduction="seq-mean-token-sum-norm", max_new_tokens=20)
    generation = group_generation(backbone, tokenizer, rl_config(None, "grpo", max_new_tokens=6),
                                  2, seed=1)
    rollout = rl.make_rollout(backbone, generation, kl_coef=0.3, cfg=cfg,
                              use_recorded_logprobs=True)
    assert rollout.action_mask.shape[1] < cfg.max_new_tokens
    batches = [rollout.rows(torch.tensor([0, 5, 2, 7])), rollout.rows(torch.tensor([1, 3]))]
    normalizer = rl.step_normalizer(cfg, batches)
    assert normalizer == 2 * cfg.max_new_tokens  # two micro-batches, each over T
    loss, _ = rl.policy_loss(backbone, batches[0], cfg, kl_coef=0.3, normalizer=normalizer)
    expected = _float64_loss(backbone, batches[0], cfg, 0.3, float(cfg.max_new_tokens))
    torch.testing.assert_close(2 * loss.double(), expected, rtol=1e-4, atol=1e-6)


def test_non_score_reward_is_the_penalty_the_rewards_hold(tmp_path, tokenizer, monkeypatch):
    """non_score_reward (the KL penalty's part of the reward, kl_in_loss=false) was -kl_coef x
    the summed k1 estimate whatever kl_estimator put into the rewards: the critic-free presets'
    k3 (`rlhf ppo algorithm=rloo kl_in_loss=false`, the README's example) logged another
    penalty than the one trained on. It is each row's reward minus its clipped score."""
    record, rollout = _one_iteration(tmp_path, tokenizer, monkeypatch, "rloo", kl_in_loss=False)
    m = rollout.action_mask.double()
    d = (rollout.ref_logprobs.double() - rollout.old_logprobs.double()) * m
    k3 = ((d.exp() - d - 1) * m).sum(-1)
    expected = float((-record["kl_coef"] * k3).mean())
    assert abs(expected - float((-record["kl_coef"] * -d.sum(-1)).mean())) > 1e-4  # not k1's
    assert record["non_score_reward"] == pytest.approx(expected, rel=1e-5)
    clipped = rollout.scores.double().clamp(-5.0, 5.0)  # score_clip
    assert record["non_score_reward"] == pytest.approx(
        float((rollout.rewards.double() - clipped).mean()), rel=1e-4)


def test_per_token_metrics_leave_out_micro_batches_without_a_trained_token(tmp_path, tokenizer,
                                                                           monkeypatch):
    """mask_truncated (DAPO's overlong filtering) can leave a micro-batch no token to train on;
    its per-token means (ratio_mean, entropy, clipfrac, ...) are 0 and were averaged in: half
    the rows cut, one row per micro-batch of one step, and policy/ratio_mean read 0.5 on the
    policy that sampled the rows (ratio 1). The losses still average over every micro-batch."""
    from rlhf.engine import Generation

    cut = torch.tensor([True, False, True, True, False, False, True, False])
    monkeypatch.setattr(Generation, "truncated", lambda self, eos: cut.clone())
    record, rollout = _one_iteration(tmp_path, tokenizer, monkeypatch, "grpo",
                                     mask_truncated=True, minibatch_size=1, grad_accum_steps=8)
    assert record["truncated_fraction"] == 0.5
    assert record["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert record["policy/clipfrac"] == 0.0 and record["policy/approx_kl"] < 1e-9
    # the KL term is a part of the loss: every micro-batch counts, a cut row's as 0
    m = rollout.action_mask.double()[~cut]
    d = (rollout.ref_logprobs.double() - rollout.old_logprobs.double())[~cut] * m
    kl_rows = ((d.exp() - d - 1) * m).sum(-1) / m.sum(-1)  # seq-mean-token-mean, one row each
    assert record["policy/kl"] == pytest.approx(float(kl_rows.sum()) / 8, rel=1e-4)


def test_ppo_rollout_targets_equal_a_float64_computation(tokenizer):
    """PPO's rollout targets from the tensors it scored: the per-token reward -kl_coef x k1 with
    the clipped score on the last response token, GAE(gamma, lam) over the response tokens
    written as the backward loop, the returns, and the advantages whitened over valid tokens."""
    from tests.helpers import group_generation

    backbone = randomised_policy(tokenizer, seed=5)
    cfg = rl_config(None, "ppo", group_size=None, gamma=0.9, lam=0.8, score_clip=0.05)
    gen = group_generation(backbone, tokenizer, cfg, 6, seed=2)
    rollout = rl.make_rollout(backbone, gen, kl_coef=0.3, cfg=cfg, use_recorded_logprobs=True)
    m = rollout.action_mask.double()
    old, ref = rollout.old_logprobs.double(), rollout.ref_logprobs.double()
    values = rollout.old_values.double()
    rewards = -0.3 * (old - ref) * m
    last = m.sum(-1).long() - 1
    rewards[torch.arange(6), last] += rollout.scores.double().clamp(-0.05, 0.05)
    torch.testing.assert_close(rollout.rewards.double(), rewards, rtol=1e-5, atol=1e-7)
    advantages = torch.zeros_like(rewards)
    for b in range(6):
        running, next_value = 0.0, 0.0
        for t in range(int(last[b]), -1, -1):
            delta = rewards[b, t] + 0.9 * next_value - values[b, t]
            running = delta + 0.9 * 0.8 * running
            advantages[b, t], next_value = running, values[b, t]
    torch.testing.assert_close(rollout.returns.double(), (advantages + values) * m,
                               rtol=1e-5, atol=1e-6)
    valid = advantages[m > 0]
    whitened = (advantages - valid.mean()) / (valid.var() + 1e-8).sqrt() * m
    torch.testing.assert_close(rollout.advantages.double(), whitened, rtol=1e-4, atol=1e-5)


def _float64_policy_loss(backbone, batch, cfg, kl_coef, normalizer):
    """CISPO's or GSPO's loss (with its KL term) in float64 from the policy's logits, with
    autograd: CISPO's weight sg(clip(r)) detached, GSPO's ratio through the row's mean."""
    s = cfg.settings
    logits = backbone.logits(batch.sequences, batch.attention_mask, "policy").double()
    P = batch.prompt_length
    logp = torch.log_softmax(logits / cfg.temperature, -1)[:, P - 1:-1].gather(
        -1, batch.sequences[:, P:, None]).squeeze(-1)
    m = batch.action_mask.double()
    logp = logp * m
    old, ref = batch.old_logprobs.double(), batch.ref_logprobs.double()
    A = batch.advantages.double()[:, None]
    n = m.sum(-1)
    low, high = 1 - s.clip_ratio, 1 + s.clip_ratio_high
    if s.loss_type == "cispo":
        per_token = -torch.exp(logp - old).clamp(low, high).detach() * A * logp
    else:
        ratio = torch.exp(((logp - old) * m).sum(-1) / n)[:, None]
        per_token = torch.maximum(-A * ratio, -A * ratio.clamp(low, high)).expand_as(logp)
    k3 = torch.exp(ref - logp) - (ref - logp) - 1

    def reduce(x):
        x = x * m
        if s.loss_reduction == "seq-mean-token-mean":
            return (x.sum(-1) / n).mean()
        return x.sum() / normalizer

    return reduce(per_token) + kl_coef * reduce(k3)


@pytest.mark.parametrize("algorithm", ["cispo", "gspo"])
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_policy_gradients_equal_a_float64_autograd(tokenizer, monkeypatch, algorithm, backend):
    """The gradient the update applies, not only the loss: CISPO's value is the same with or
    without the stop-gradient on its weight, its gradient is not; GSPO's flows through each
    row's mean log-ratio. The policy adapter's gradients against float64 autograd."""
    if backend == "native":
        from rlhf_kernels.backend import native_cpu_kernels

        if not native_cpu_kernels(torch.zeros(1)):
            pytest.skip("the native CPU kernels are not built here")
    from tests.helpers import group_generation

    backbone = randomised_policy(tokenizer, seed=2)
    cfg = rl_config(None, algorithm)
    gen = group_generation(backbone, tokenizer, cfg, 2, seed=5)
    rollout = rl.make_rollout(backbone, gen, kl_coef=0.3, cfg=cfg, use_recorded_logprobs=True)
    with torch.no_grad():  # the update's policy has moved from the sampling one
        for name, param in backbone.named_parameters():
            if "lora_A" in name and ".policy." in name:
                param.mul_(1.5)
    batch = rollout.rows(torch.tensor([6, 1, 3, 4]))
    normalizer = rl.step_normalizer(cfg, [batch])
    params = backbone.trainable_parameters("policy")
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", backend)
    loss, stats = rl.policy_loss(backbone, batch, cfg, kl_coef=0.3, normalizer=normalizer)
    grads = torch.autograd.grad(loss, params)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    expected = _float64_policy_loss(backbone, batch, cfg, 0.3,
                                    None if normalizer is None else float(normalizer))
    expected_grads = torch.autograd.grad(expected, params)
    assert float(stats["ratio_mean"]) != pytest.approx(1.0, abs=1e-3)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    scale = max(float(g.abs().max()) for g in expected_grads)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5 * scale)


def test_ppo_value_loss_seq_mean_token_sum_norm_divides_by_max_new_tokens(tokenizer):
    """PPO's clipped value loss under seq-mean-token-sum-norm divided by the rollout's response
    columns (its longest response) where the policy loss divides by max_new_tokens; both are
    the constant now. Against 1/2 max((v - R)^2, (clipped v - R)^2) summed in float64."""
    from tests.helpers import group_generation

    backbone = randomised_policy(tokenizer, seed=6)
    cfg = rl_config(None, "ppo", group_size=None, loss_reduction="seq-mean-token-sum-norm",
                    max_new_tokens=20, value_clip=0.05)
    gen = group_generation(backbone, tokenizer, rl_config(None, "ppo", group_size=None,
                                                          max_new_tokens=6), 4, seed=3)
    rollout = rl.make_rollout(backbone, gen, kl_coef=0.3, cfg=cfg, use_recorded_logprobs=True)
    assert rollout.action_mask.shape[1] < cfg.max_new_tokens
    with torch.no_grad():  # the critic has moved since the rollout: some values clipped
        backbone.value_head.bias.add_(0.3)
        loss, _ = rl.value_loss(backbone, rollout, cfg)
        values = backbone.values(rollout.sequences, rollout.attention_mask)[
            :, rollout.prompt_length - 1:-1].double()
    m = rollout.action_mask.double()
    old, returns = rollout.old_values.double(), rollout.returns.double()
    clipped = old + (values - old).clamp(-0.05, 0.05)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2) * m
    torch.testing.assert_close(loss.double(), per_token.sum() / 20, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("normaliser", ["step_tokens", "max_length"])
def test_ppo_value_loss_takes_the_step_normaliser(tmp_path, tokenizer, monkeypatch, normaliser):
    """PPO's value loss ignored loss_normalizer: the policy loss was divided by the optimizer
    step's count and the value loss by each micro-batch's own token count, so with micro-batches
    of unequal tokens (three rows of eight cut, mask_truncated) it was no mean over the step.
    One step of all 8 rows in two micro-batches, before the critic moves (values = old values):
    value/loss = 1/2 sum((old_values - returns)^2) over the trained tokens / the step's count
    (its tokens, or rows x max_new_tokens), in float64 from the rollout."""
    from rlhf.engine import Generation

    cut = torch.tensor([True, False, True, False, False, True, False, False])
    monkeypatch.setattr(Generation, "truncated", lambda self, eos: cut.clone())
    record, rollout = _one_iteration(tmp_path, tokenizer, monkeypatch, "ppo", group_size=None,
                                     loss_normalizer=normaliser, mask_truncated=True,
                                     minibatch_size=4, grad_accum_steps=2)
    m = rollout.action_mask.double() * ~cut[:, None]
    count = float(m.sum()) if normaliser == "step_tokens" else 8 * 8  # rows x max_new_tokens
    errors = (rollout.old_values.double() - rollout.returns.double()) ** 2 * m
    assert record["value/loss"] == pytest.approx(0.5 * float(errors.sum()) / count, rel=1e-5)


# ---- each preset is its paper's algorithm ------------------------------------------------------
# (advantage_estimator, advantage_norm, ratio_level, loss_type, loss_reduction, loss_normalizer,
#  clip_ratio, clip_ratio_high, kl_coef, kl_in_loss, kl_estimator, dynamic_sampling), each from
# the paper named (docs/algorithms.md has the sections)
PAPERS = {
    # DeepSeekMath: (r - mean) / std, the per-response token mean, eps 0.2, k3 in the loss
    "grpo": ("grpo", "group", "token", "ppo", "seq-mean-token-mean", "batch", 0.2, 0.2, 0.1,
             True, "k3", False),
    # Dr. GRPO: no std, no length normalisation (a constant), beta = 0
    "dr_grpo": ("dr_grpo", "none", "token", "ppo", "seq-mean-token-sum-norm", "max_length", 0.2,
                0.2, 0.0, True, "k3", False),
    # GSPO v2 section 5.1: the sequence ratio clipped at 3e-4 / 4e-4, no KL
    "gspo": ("grpo", "group", "sequence", "ppo", "seq-mean-token-mean", "batch", 3e-4, 4e-4, 0.0,
             True, "k3", False),
    # DAPO sections 2.3 and 4.1: clip-higher 0.2 / 0.28, the step's token mean, dynamic
    # sampling, no KL
    "dapo": ("grpo", "group", "token", "ppo", "token-mean", "step_tokens", 0.2, 0.28, 0.0, True,
             "k3", True),
    # MiniMax-M1: the IS weight truncated at 1 + 4 = 5 and not below 0, 1 / sum |o_i|, no KL
    "cispo": ("grpo", "group", "token", "cispo", "token-mean", "step_tokens", 1.0, 4.0, 0.0,
              True, "k3", False),
}


@pytest.mark.parametrize("algorithm", sorted(PAPERS))
def test_each_critic_free_preset_is_its_papers_algorithm(algorithm):
    """DAPO, GSPO, CISPO and Dr. GRPO kept GRPO's k3 KL penalty at kl_coef=0.1, where their
    papers train without a KL term (beta = 0): `rlhf grpo algorithm=dapo` was not DAPO. kl_coef
    is a preset now, 0 for those four; every other value is pinned to its paper here."""
    s = rl.RLConfig(algorithm=algorithm).settings
    got = (s.advantage_estimator, s.advantage_norm, s.ratio_level, s.loss_type,
           s.loss_reduction, s.loss_normalizer, s.clip_ratio, s.clip_ratio_high, s.kl_coef,
           s.kl_in_loss, s.kl_estimator, s.dynamic_sampling)
    assert got == PAPERS[algorithm]
    # a kl_coef given wins over the preset, as every preset value does
    assert rl.RLConfig(algorithm=algorithm, kl_coef=0.05).settings.kl_coef == 0.05


def test_a_preset_without_kl_trains_without_the_kl_term(tmp_path, tokenizer, monkeypatch):
    """`algorithm=dapo` with nothing else: no KL term in the loss (the loss is the policy
    gradient's alone) and the adaptive controller leaves kl_coef at 0; the KL to the reference
    is still measured (`kl`)."""
    record, _ = _one_iteration(tmp_path, tokenizer, monkeypatch, "dapo", kl_coef=None,
                               kl_target=None)
    assert record["kl_coef"] == 0.0
    assert "policy/kl" not in record
    assert record["policy/loss"] == pytest.approx(record["policy/pg_loss"], rel=1e-6, abs=1e-9)
    assert record["kl"] != 0.0


def test_a_run_started_with_the_old_dapo_preset_resumes_only_with_its_kl_coef():
    """A DAPO run started when its preset had kl_coef=0.1 (run.json records that value) and
    resumed under the new preset would continue without the KL term: --resume names the change
    and the override that gives the run back."""
    from rlhf.checkpoint import config_changes

    changes = config_changes({"algorithm": "dapo", "kl_coef": 0.1},
                             {"algorithm": "dapo", "kl_coef": None})
    assert changes == [("kl_coef: 0.1 -> null (the dapo preset: 0.0)", "kl_coef=0.1")]
    assert config_changes({"algorithm": "grpo", "kl_coef": 0.1},
                          {"algorithm": "grpo", "kl_coef": None}) == []


def test_a_clip_given_to_sapo_is_said_to_change_no_loss():
    """`algorithm=sapo clip_ratio=0.1` trained exactly as without it (SAPO's gate replaces the
    clip; the range only sets what clipfrac counts), without a word."""
    import warnings

    with pytest.warns(UserWarning, match=r"clip_ratio=0.1 does not change the loss with "
                                         r"loss_type='sapo'"):
        rl.RLConfig(algorithm="sapo", clip_ratio=0.1).check_critic_settings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rl.RLConfig(algorithm="sapo").check_critic_settings()
        rl.RLConfig(algorithm="grpo", clip_ratio=0.1).check_critic_settings()
