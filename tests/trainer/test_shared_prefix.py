"""Shared prompt prefixes (``shared_prefix`` in rlhf/models.py, ``step_rows`` in rlhf/rl.py):
rows that hold the same prompt (a GRPO group's samples) run it once, their responses on its
keys and values. Checked against the plain padded forward (every row runs its whole
sequence): the same log-probs and the same adapter gradients for Llama, Qwen2 and GPT-2 with
left-padded prompts, right-padded responses and rows in any order; the prompt is really run
once per distinct prompt (tokens counted at the embedding); and a whole critic-free iteration
ends at the same adapter weights with and without it.
"""

from __future__ import annotations

import pytest
import torch

from rlhf import rl
from rlhf.models import LoraSpec, SharedBackbone
from rlhf.tiny_models import ARCHITECTURES, tiny_causal_lm

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.reference_kernels]

PROMPT, RESPONSE, GROUP, PROMPTS = 7, 5, 3, 2


def randomised_backbone(arch: str) -> SharedBackbone:
    """A backbone whose policy adapter is not the identity (PEFT starts LoRA B at 0)."""
    backbone = SharedBackbone.from_model(tiny_causal_lm(arch), lora=LoraSpec(rank=4),
                                         roles=("policy",))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in backbone.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return backbone


def grouped_batch(seed: int = 0):
    """GROUP samples of each of PROMPTS prompts (the second left-padded by 3), responses of
    RESPONSE tokens (one right-padded by 2), rows shuffled. -> ids, mask (B, P + R)."""
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, 128, (PROMPTS, PROMPT), generator=generator)
    prompt_mask = torch.ones(PROMPTS, PROMPT, dtype=torch.long)
    prompts[1, :3], prompt_mask[1, :3] = 0, 0
    rows = PROMPTS * GROUP
    ids = torch.cat([prompts.repeat_interleave(GROUP, 0),
                     torch.randint(3, 128, (rows, RESPONSE), generator=generator)], 1)
    mask = torch.cat([prompt_mask.repeat_interleave(GROUP, 0),
                      torch.ones(rows, RESPONSE, dtype=torch.long)], 1)
    ids[0, -2:], mask[0, -2:] = 0, 0
    order = torch.randperm(rows, generator=generator)
    return ids[order], mask[order]


def logprobs_and_grads(backbone, ids, mask, shared_prefix):
    backbone.zero_grad(set_to_none=True)
    logp = backbone.token_logprobs(ids, mask, "policy", start=PROMPT - 1,
                                   shared_prefix=shared_prefix)
    weights = torch.linspace(0.5, 1.5, logp.numel()).view_as(logp)
    (logp * weights).sum().backward()
    return logp.detach(), [p.grad.clone() for p in backbone.trainable_parameters("policy")]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shared_prefix_gives_the_padded_forwards_logprobs_and_gradients(arch):
    backbone = randomised_backbone(arch)
    backbone.train()
    ids, mask = grouped_batch()
    first, inverse = backbone._shared_prefix_plan(ids, mask, PROMPT)
    assert first.numel() == PROMPTS
    assert torch.equal(ids[first][inverse, :PROMPT], ids[:, :PROMPT])

    plain_logp, plain_grads = logprobs_and_grads(backbone, ids, mask, 0)
    shared_logp, shared_grads = logprobs_and_grads(backbone, ids, mask, PROMPT)
    # fp32 models; Llama and Qwen2 take their attention softmax in fp32 whatever the dtype
    torch.testing.assert_close(shared_logp, plain_logp, rtol=1e-5, atol=1e-5)
    assert any(g.abs().max() > 1e-3 for g in plain_grads)
    for shared, plain in zip(shared_grads, plain_grads, strict=True):
        torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-5 * plain.abs().max())
    # the hidden states at every real position, the prompt's included
    with torch.no_grad():
        plain = backbone.hidden_states(ids, mask, "policy")
        shared = backbone.hidden_states(ids, mask, "policy", shared_prefix=PROMPT)
    real = mask.bool()
    torch.testing.assert_close(shared[real], plain[real], rtol=1e-5, atol=1e-5)


def test_each_distinct_prompt_runs_once():
    backbone = randomised_backbone("llama")
    ids, mask = grouped_batch()
    backbone.packing.take_stats()
    seen = []
    handle = backbone.causal_lm.get_input_embeddings().register_forward_hook(
        lambda module, args, out: seen.append(args[0].numel()))
    try:
        with torch.no_grad():
            backbone.token_logprobs(ids, mask, "policy", start=PROMPT - 1, shared_prefix=PROMPT)
            shared = list(seen)
            stats = backbone.packing.take_stats()
            seen.clear()
            backbone.token_logprobs(ids, mask, "policy", start=PROMPT - 1)
    finally:
        handle.remove()
    rows = PROMPTS * GROUP
    assert shared == [PROMPTS * PROMPT, rows * RESPONSE]
    assert seen == [rows * (PROMPT + RESPONSE)]
    # the run's token counters (the stages' metrics) say so too
    assert stats["tokens_processed"] == PROMPTS * PROMPT + rows * RESPONSE
    assert stats["tokens_padded"] == rows * (PROMPT + RESPONSE)
    assert stats["tokens_real"] == int(mask.sum())


def test_no_shared_run_without_repeated_prompts_or_under_gradient_checkpointing():
    backbone = randomised_backbone("llama")
    ids, mask = grouped_batch()
    distinct = ids[::GROUP], mask[::GROUP]
    assert backbone._shared_prefix_plan(*distinct, PROMPT) is None
    assert backbone._shared_prefix_plan(ids, mask, 0) is None
    assert backbone._shared_prefix_plan(ids, mask, ids.shape[1]) is None  # no response column
    backbone.enable_gradient_checkpointing()
    backbone.train()
    assert backbone._shared_prefix_plan(ids, mask, PROMPT) is None
    backbone.eval()
    with torch.no_grad():  # no recomputation in eval mode: shared again
        assert backbone._shared_prefix_plan(ids, mask, PROMPT) is not None


def test_step_rows_sorts_only_where_the_step_gradient_does_not_change():
    order = torch.tensor([5, 2, 7, 0])
    grpo = rl.RLConfig(algorithm="grpo", group_size=4, rollout_batch_size=8, minibatch_size=4)
    dapo = rl.RLConfig(algorithm="dapo", group_size=4, rollout_batch_size=8, minibatch_size=4)
    rloo = rl.RLConfig(algorithm="rloo", group_size=4, rollout_batch_size=8, minibatch_size=4)
    assert grpo.settings.loss_reduction == "seq-mean-token-mean"
    assert rl.step_rows(grpo, order).tolist() == [0, 2, 5, 7]
    assert rl.step_rows(dapo, order).tolist() == [0, 2, 5, 7]  # normalised by the step's tokens
    # a token mean per micro-batch weighs a token by its micro-batch's count: keep the shuffle
    assert (rloo.settings.loss_reduction, rloo.settings.loss_normalizer) == ("token-mean",
                                                                             "batch")
    assert rl.step_rows(rloo, order).tolist() == [5, 2, 7, 0]
    ppo = rl.RLConfig(algorithm="ppo", rollout_batch_size=8, minibatch_size=4)
    assert rl.step_rows(ppo, order).tolist() == [5, 2, 7, 0]


def test_a_grpo_iteration_ends_at_the_same_weights_with_and_without_sharing(tmp_path,
                                                                            monkeypatch):
    from rlhf import task
    from tests.helpers import review_tokenizer, rl_config, tiny_backbone
    from tests.trainer.test_grpo import PROMPTS as TASK_PROMPTS

    tokenizer = review_tokenizer(task.make_corpus(96, seed=1))

    def run(name):
        backbone = tiny_backbone(tokenizer)
        cfg = rl_config(tmp_path / name, "grpo", num_iterations=1, minibatch_size=2,
                        grad_accum_steps=4)
        summary = rl.train(cfg, backbone=backbone, tokenizer=tokenizer, prompts=TASK_PROMPTS,
                           gold_fn=task.gold_scores)
        return summary, [p.detach().clone() for p in backbone.trainable_parameters("policy")]

    shared_summary, shared = run("shared")
    tokens = []
    monkeypatch.setattr(rl, "_shared_prefix", lambda cfg, prompt_length: 0)
    monkeypatch.setattr(rl, "step_rows", lambda cfg, order: tokens.append(order) or order)
    plain_summary, plain = run("plain")
    assert tokens and not torch.equal(tokens[0], tokens[0].sort().values)  # really shuffled
    start = tiny_backbone(tokenizer).trainable_parameters("policy")
    assert max(float((p - s).abs().max()) for p, s in zip(plain, start)) > 1e-4  # it trained
    for a, b in zip(shared, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the rollout engine: a head common to every prompt (a chat template's system prompt) is
# prefilled once
# ---------------------------------------------------------------------------------------------
def chat_like_prompts(rows: int = 4, head: int = 12, tail: int = 5):
    """rows prompts that share their first ``head`` tokens and differ in the last ``tail``."""
    generator = torch.Generator().manual_seed(11)
    common = torch.randint(3, 128, (1, head), generator=generator).expand(rows, -1)
    ids = torch.cat([common, torch.randint(3, 128, (rows, tail), generator=generator)], 1)
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("samples_per_prompt", [1, 3])
def test_the_engine_prefills_a_common_head_once(monkeypatch, samples_per_prompt):
    from rlhf import engine as engine_module
    from rlhf.engine import RolloutEngine, common_prefix_length

    backbone = randomised_backbone("llama")
    ids, mask = chat_like_prompts()
    assert common_prefix_length(ids, mask.bool()) == 12
    engine = RolloutEngine(backbone)
    forward, shapes = engine._forward, []

    def counting_forward(input_ids, *args):
        shapes.append(tuple(input_ids.shape))
        return forward(input_ids, *args)

    engine._forward = counting_forward
    kwargs = dict(eos_token_id=None, pad_token_id=0, samples_per_prompt=samples_per_prompt)
    runs = {}
    for name, minimum in (("head once", engine_module.MIN_COMMON_PREFIX), ("plain", 10**9)):
        monkeypatch.setattr(engine_module, "MIN_COMMON_PREFIX", minimum)
        for call in range(2):  # the second call reuses the engine's cache buffers in place
            shapes.clear()
            runs[name, call] = engine.generate(ids, mask, 6, seed=5, **kwargs)
            prefill = shapes[:2] if name == "head once" else shapes[:1]
            expected = [(1, 12), (4, 5)] if name == "head once" else [(4, 17)]
            assert prefill == expected
    for call in range(2):
        once, plain = runs["head once", call], runs["plain", call]
        assert torch.equal(once.sequences, plain.sequences)
        torch.testing.assert_close(once.logprobs, plain.logprobs, rtol=0, atol=1e-5)
    # and the recorded log-probs are still the teacher-forced ones
    gen = runs["head once", 1]
    with torch.no_grad():
        forced = backbone.token_logprobs(gen.sequences, gen.attention_mask, "policy",
                                         start=gen.prompt_length - 1)
    torch.testing.assert_close(gen.logprobs, forced * gen.response_mask, rtol=0, atol=1e-5)


def test_common_prefix_length_needs_the_same_ids_and_padding():
    from rlhf.engine import MIN_COMMON_PREFIX, common_prefix_length

    ids, mask = chat_like_prompts(head=MIN_COMMON_PREFIX + 2)
    valid = mask.bool()
    assert common_prefix_length(ids, valid) == MIN_COMMON_PREFIX + 2
    assert common_prefix_length(ids[:1], valid[:1]) == 0  # one row: nothing to share
    short, short_valid = chat_like_prompts(head=MIN_COMMON_PREFIX - 1)
    assert common_prefix_length(short, short_valid.bool()) == 0
    padded = valid.clone()
    padded[1, :3] = False  # one row left-padded by 3: its first columns differ
    assert common_prefix_length(ids, padded) == 0
    same = ids[:1].expand(4, -1)  # identical prompts: every row keeps its last column
    assert common_prefix_length(same, valid) == ids.shape[1] - 1
