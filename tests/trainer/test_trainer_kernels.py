"""The trainer's own kernel path agrees with the reference path it is tested under elsewhere.

tests/trainer/test_stages.py and tests/e2e/test_pipeline.py run the training loops with
``RLHF_KERNELS_BACKEND=reference`` (the Triton interpreter is too slow for whole loops). Here the
same trainer functions run once with the Triton kernels (the interpreter on the CPU, the GPU when
there is one) and once with the reference, on the same tiny model and inputs, in fp32:

- PPO: ``ppo.make_rollout`` (linear_logprobs for old and reference log-probs, shape_rewards, gae,
  masked_whiten), then one minibatch of ``ppo.policy_loss`` (linear_ppo_loss) and
  ``ppo.value_loss`` (ppo_value_loss) with their backward passes: losses, stats and the gradients
  of the policy and critic adapters and the value head;
- SFT: ``sft.token_logprobs_of`` + ``sft.lm_loss`` (linear_logprobs) and the gradients of every
  weight;
- reward model: ``reward.pair_loss`` (bradley_terry_loss) and the reward adapter's gradients.

Each run counts the calls that reach ``rlhf_kernels.reference``: the reference run must reach it
(the counter works) and the Triton run must not (the kernels really ran).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

import rlhf_kernels
from rlhf import ppo, reward, sft
from rlhf.engine import Generation
from rlhf.models import LoraSpec, SharedBackbone
from rlhf.tiny_models import tiny_causal_lm
from tests.numerics import DEVICE, assert_close

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VOCAB = 131  # not a power of two: the kernels' last vocabulary block is partial
PAD, EOS = 0, 2
# fp32, the same math in another order (chunked online logsumexp vs log_softmax)
ATOL, RTOL = 2e-5, 1e-4
SPIED = ("logprobs", "linear_logprobs", "shape_rewards", "gae", "masked_whiten",
         "linear_ppo_loss", "ppo_value_loss", "bradley_terry_loss")


def run_with(backend: str, fn):
    """fn() with RLHF_KERNELS_BACKEND=backend -> (its result, calls that reached the reference)."""
    calls: Counter = Counter()

    def counting(name, original):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return wrapper

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RLHF_KERNELS_BACKEND", backend)
        for name in SPIED:
            patch.setattr(rlhf_kernels.reference, name,
                          counting(name, getattr(rlhf_kernels.reference, name)))
        result = fn()
    return result, calls


def both_backends(fn, used: tuple[str, ...]):
    """(triton result, reference result); checks which path each run took."""
    kernel, kernel_calls = run_with("triton", fn)
    ref, ref_calls = run_with("reference", fn)
    for name in used:
        assert ref_calls[name] > 0, f"the reference run never called reference.{name}"
    assert not kernel_calls, f"the Triton run fell back to the reference: {dict(kernel_calls)}"
    return kernel, ref


def backbone_with_random_adapters(seed: int = 0) -> SharedBackbone:
    backbone = SharedBackbone.from_model(tiny_causal_lm("llama", VOCAB, seed=seed).to(DEVICE),
                                         lora=LoraSpec(rank=4))
    with torch.no_grad():  # PEFT starts LoRA B at 0; make every role differ from the base
        for name, param in backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
        for head in (backbone.value_head, backbone.reward_head):
            head.weight.normal_(0.0, 0.3)
    return backbone


def grads_of(params) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in params]


def zero_grads(module) -> None:
    for p in module.parameters():
        p.grad = None


# ---------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------
def fixed_generation(batch: int = 4, prompt_length: int = 5, response_length: int = 7):
    """Left-padded prompts and responses that stop at different lengths (one EOS, one without)."""
    prompt_mask = torch.ones(batch, prompt_length, dtype=torch.int64)
    prompt_mask[0, :3] = 0
    prompt_mask[2, :1] = 0
    lengths = torch.tensor([response_length, 3, 1, 5])[:batch]
    response_mask = torch.arange(response_length)[None, :] < lengths[:, None]
    ids = torch.randint(3, VOCAB, (batch, prompt_length + response_length))
    ids[:, :prompt_length][prompt_mask == 0] = PAD
    response = ids[:, prompt_length:]
    response[~response_mask] = PAD
    response[1, 2] = EOS
    attention_mask = torch.cat([prompt_mask, response_mask.long()], 1)
    logprobs = torch.zeros(batch, response_length)  # unused: make_rollout runs the forward
    return Generation(ids.to(DEVICE), attention_mask.to(DEVICE), response_mask.to(DEVICE),
                      logprobs.to(DEVICE), prompt_length)


def test_ppo_rollout_and_minibatch_update_triton_equals_reference():
    backbone = backbone_with_random_adapters()
    backbone.init_critic_from_reward()
    backbone.train()
    cfg = ppo.PPOConfig(temperature=0.9, kl_coef=0.05, device=str(DEVICE), entropy_coef=0.01)
    generation = fixed_generation()

    kernel_rollout, ref_rollout = both_backends(
        lambda: ppo.make_rollout(backbone, generation, cfg.kl_coef, cfg),
        used=("linear_logprobs", "shape_rewards", "gae", "masked_whiten"))
    assert float(ref_rollout.action_mask.sum()) == 16
    for name in ("old_logprobs", "ref_logprobs", "old_values", "rewards", "advantages",
                 "returns", "scores"):
        # advantages are whitened (divided by a std of order 1): the same tolerance holds
        assert_close(getattr(kernel_rollout, name), getattr(ref_rollout, name), atol=ATOL,
                     rtol=RTOL, name=f"rollout.{name}")
    # the policy differs from the reference, so the KL part of the rewards is really tested
    assert float((ref_rollout.old_logprobs - ref_rollout.ref_logprobs).abs().max()) > 1e-2

    # one minibatch update from the same rollout, as in a later epoch: the policy has moved
    # since sampling, so the ratios are away from 1 and some are clipped
    with torch.no_grad():
        for param in backbone.trainable_parameters("policy"):
            param.add_(0.05 * torch.randn_like(param))
    moved = 0.5 * torch.randn_like(ref_rollout.old_logprobs) * ref_rollout.action_mask
    ref_rollout = dataclasses.replace(ref_rollout, old_logprobs=ref_rollout.old_logprobs + moved)
    policy_params = backbone.trainable_parameters("policy")
    critic_params = backbone.trainable_parameters("critic")

    def update():
        zero_grads(backbone)
        p_loss, p_stats = ppo.policy_loss(backbone, ref_rollout, cfg)
        p_loss.backward()
        v_loss, v_stats = ppo.value_loss(backbone, ref_rollout, cfg)
        v_loss.backward()
        return (p_loss.detach(), {k: v.detach().clone() for k, v in p_stats.items()},
                v_loss.detach(), {k: v.detach().clone() for k, v in v_stats.items()},
                grads_of(policy_params), grads_of(critic_params))

    kernel, ref = both_backends(update, used=("linear_ppo_loss", "ppo_value_loss"))
    assert_close(kernel[0], ref[0], atol=ATOL, rtol=RTOL, name="policy loss")
    assert_close(kernel[2], ref[2], atol=ATOL, rtol=RTOL, name="value loss")
    assert set(kernel[1]) == set(ref[1]) and set(kernel[3]) == set(ref[3])
    for key in ref[1]:
        assert_close(kernel[1][key], ref[1][key], atol=ATOL, rtol=RTOL, name=f"policy/{key}")
    for key in ref[3]:
        assert_close(kernel[3][key], ref[3][key], atol=ATOL, rtol=RTOL, name=f"value/{key}")
    assert float(ref[1]["clipfrac"]) > 0  # the clipped branch is part of the comparison
    for role, k_grads, r_grads in (("policy", kernel[4], ref[4]), ("critic", kernel[5], ref[5])):
        assert any(float(g.abs().max()) > 0 for g in r_grads), role
        for i, (k, r) in enumerate(zip(k_grads, r_grads)):
            assert_close(k, r, atol=ATOL, rtol=RTOL, name=f"{role} grad {i}")


# ---------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------
def test_sft_loss_and_gradients_triton_equals_reference():
    model = tiny_causal_lm("llama", VOCAB, seed=1).to(DEVICE).train()
    ids = torch.randint(3, VOCAB, (3, 11), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding, as the SFT collator pads
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # prompt tokens carry no loss
    n_tokens = int((labels[:, 1:] != -100).sum())
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        zero_grads(model)
        loss = sft.lm_loss(sft.token_logprobs_of(model, ids, mask, labels), labels, n_tokens)
        loss.backward()
        return loss.detach(), grads_of(params)

    (k_loss, k_grads), (r_loss, r_grads) = both_backends(step, used=("linear_logprobs",))
    assert_close(k_loss, r_loss, atol=ATOL, rtol=RTOL, name="SFT loss")
    for i, (k, r) in enumerate(zip(k_grads, r_grads)):
        assert_close(k, r, atol=ATOL, rtol=RTOL, name=f"SFT grad {i}")


# ---------------------------------------------------------------------------------------------
# reward model
# ---------------------------------------------------------------------------------------------
def test_reward_model_loss_and_gradients_triton_equals_reference():
    backbone = backbone_with_random_adapters(seed=2)
    backbone.set_trainable(("reward",))
    backbone.train()

    def side(n: int, width: int, lengths: list[int]):
        ids = torch.randint(3, VOCAB, (n, width), device=DEVICE)
        mask = (torch.arange(width, device=DEVICE)[None, :]
                < torch.tensor(lengths, device=DEVICE)[:, None]).long()
        return ids.masked_fill(mask == 0, PAD), mask

    batch = reward.PairBatch(*side(5, 9, [9, 4, 7, 2, 9]), *side(5, 8, [3, 8, 8, 5, 1]))
    params = backbone.trainable_parameters("reward")

    def step():
        zero_grads(backbone)
        loss, stats = reward.pair_loss(backbone, batch, PAD, center_coef=0.01)
        loss.backward()
        return loss.detach(), stats, grads_of(params)

    (k_loss, k_stats, k_grads), (r_loss, r_stats, r_grads) = both_backends(
        step, used=("bradley_terry_loss",))
    assert_close(k_loss, r_loss, atol=ATOL, rtol=RTOL, name="RM loss")
    assert set(k_stats) == set(r_stats)
    for key in r_stats:
        assert k_stats[key] == pytest.approx(r_stats[key], rel=RTOL, abs=ATOL), key
    for i, (k, r) in enumerate(zip(k_grads, r_grads)):
        assert_close(k, r, atol=ATOL, rtol=RTOL, name=f"RM grad {i}")
