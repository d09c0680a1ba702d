"""Packed sequences (rlhf/packing.py): packed forwards equal padded ones.

The reference is the padded forward of the same model (attention mask + positions counting real
tokens), itself tested against the plain Hugging Face model in tests/trainer/test_models.py. Tiny
random-initialised Llama, Qwen2 and GPT-2 models (GPT-2: absolute position embeddings, which must
read the restarted position ids), adapters and heads perturbed away from their initialisation so
that a role that did nothing could not pass. Values AND gradients of every adapter and head are
compared, for left-padded, right-padded and equal-length batches with sequences of length 1, and
whole SFT / reward-model / RL steps run packed and padded. No GPU here: the flash-attn layout is
tested through its plumbing, with ``flash_attn_varlen_func`` replaced by a per-sequence float64
attention.
"""

from __future__ import annotations

import pytest
import torch

from rlhf import packing
from rlhf.models import LoraSpec, SharedBackbone
from rlhf.packing import Packing, check_packing, pack
from rlhf.tiny_models import ARCHITECTURES, tiny_causal_lm

VOCAB = 96
PAD = 0
SPEC = LoraSpec(rank=4, alpha=8)
TOL = dict(atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these matrices are tiny, and on shared cores the intra-op threads'
    barriers cost more CPU time than the work (the file took minutes with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """The kernels' plain-PyTorch backend: what is compared here is the transformer's packed and
    padded forwards, not the kernels (their own tests cover them); the interpreted Triton
    kernels would make this file minutes long."""
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
LENGTHS = [6, 1, 9, 3]  # a sequence of length 1 included


def make_backbone(arch: str, seed: int = 0) -> SharedBackbone:
    backbone = SharedBackbone.from_model(tiny_causal_lm(arch, vocab_size=VOCAB, seed=seed),
                                         lora=SPEC)
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for role in backbone.roles:
            for param in backbone.trainable_parameters(role):
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    return backbone


def make_batch(lengths, side: str, seed: int = 0, extra: int = 0):
    """(ids, mask) of rows of ``lengths`` random tokens (>= 3) padded on ``side``."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths) + extra
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for b, n in enumerate(lengths):
        span = slice(0, n) if side == "right" else slice(width - n, width)
        ids[b, span] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[b, span] = 1
    return ids, mask


def trainable(backbone):
    return [p for role in backbone.roles for p in backbone.trainable_parameters(role)]


def assert_grads_close(got, want):
    """fp32 gradients summed in another order (other attention layouts): each tensor to 1e-4
    of its largest entry."""
    assert any(w is not None and w.abs().max() > 0 for w in want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, atol=1e-4 * float(w.abs().max()) + 1e-7, rtol=1e-3)


def forward_all(backbone, ids, mask, mode: str):
    """Every forward method of the backbone and the gradients of a loss over all of them."""
    backbone.set_packing(mode)
    scored = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)  # tokens with a real previous token
    logp, entropy = backbone.token_logprobs(ids, mask, "policy", temperature=0.8,
                                            return_entropy=True)
    ref = backbone.reference_logprobs(ids, mask)
    start = backbone.token_logprobs(ids, mask, "policy", start=2)
    values = backbone.values(ids, mask)
    rewards = backbone.rewards(ids, mask)
    weights = torch.linspace(-1, 1, logp.numel()).view_as(logp)
    loss = ((logp * weights + entropy) * scored).sum() + values.square().sum() \
        + rewards.sum() + (start * scored[:, 2:]).sum()
    grads = torch.autograd.grad(loss, trainable(backbone), allow_unused=True)
    stats = backbone.packing.take_stats()
    outputs = {"logp": logp * scored, "entropy": entropy * scored, "ref": ref * scored,
               "start": start * scored[:, 2:], "values": values, "rewards": rewards}
    return outputs, grads, stats


# --------------------------------------------------------------------------------------------
# packing itself: index maps, positions, layouts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flat", [False, True])
def test_pack_places_every_real_token_once_with_restarting_positions(flat):
    ids, mask = make_batch([5, 1, 7, 3, 7], "left", seed=1)
    mask[0, -3] = 0  # a hole inside a row: its tokens before and after form one sequence
    mask[3] = 0  # a row without a real token takes no slot
    packed = pack(ids, mask, flat=flat)
    real = mask.reshape(-1) != 0
    assert packed.tokens_real == int(real.sum()) == packed.index.numel()
    assert torch.equal(packed.index, real.nonzero().squeeze(-1))
    assert packed.slots.unique().numel() == packed.tokens_real  # no slot used twice
    flat_ids = packed.input_ids.reshape(-1)
    assert torch.equal(flat_ids[packed.slots], ids.reshape(-1)[packed.index])
    # positions count the real tokens of each row from 0, as the padded forward's do
    want = (mask.cumsum(-1) - 1).reshape(-1)[packed.index]
    assert torch.equal(packed.position_ids.reshape(-1)[packed.slots], want)
    if flat:
        assert packed.input_ids.shape == (1, packed.tokens_real)
        assert packed.cu_seqlens.dtype == torch.int32
        assert packed.cu_seqlens.tolist() == [0, 4, 5, 12, 19]
        assert packed.max_seqlen == 7
    else:
        # bins of the longest sequence's width, fewer rows than the batch, fuller than padded
        assert packed.input_ids.shape[1] == 7 and packed.input_ids.shape[0] <= 4
        assert packed.tokens_processed < packed.tokens_padded
        # the unused tail of a bin is a sequence of its own: positions restart there too
        assert (packed.position_ids[:, 0] == 0).all()
    # unpack(rows) puts every real token's value back and zeros elsewhere, with gradient
    values = torch.randn(*packed.input_ids.shape, 3, requires_grad=True)
    out = packed.unpack(values)
    assert out.shape == (*ids.shape, 3)
    assert (out[mask == 0] == 0).all()
    torch.testing.assert_close(out.reshape(-1, 3)[packed.index], packed.rows(values))
    out.sum().backward()
    assert values.grad.reshape(-1, 3)[packed.slots].eq(1).all()
    assert values.grad.sum() == 3 * packed.tokens_real  # fill slots get no gradient


def test_settings_are_checked():
    for bad in ("yes", True, None, "ON"):
        with pytest.raises(ValueError, match="packing=.* is not a packing mode; expected one of"):
            check_packing(bad)
    from rlhf.ppo import PPOConfig
    from rlhf.reward import RewardConfig
    from rlhf.sft import SFTConfig

    for config in (SFTConfig, RewardConfig, PPOConfig):
        assert config().packing == "auto"
        with pytest.raises(ValueError, match="packing='maybe' is not a packing mode"):
            config(packing="maybe")
    with pytest.raises(ValueError, match="no real token; nothing to pack"):
        pack(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), flat=False)


def test_auto_packs_only_what_saves_work_and_on_refuses_unsupported_models():
    backbone = make_backbone("llama")
    backbone.set_packing("auto")
    ids, mask = make_batch([8, 8, 8], "right", seed=2)
    with torch.no_grad():
        backbone.values(ids, mask)  # nothing to remove: padded
        ids, mask = make_batch([8, 2, 3], "right", seed=2)
        backbone.values(ids, mask)  # bins [8], [3 + 2]: 16 slots <= 90 % of 24: packed
    stats = backbone.packing.take_stats()
    assert stats == {"tokens_real": 37, "tokens_padded": 48, "tokens_processed": 24 + 16,
                     "packed_forwards": 1, "padded_forwards": 1}
    assert backbone.packing.take_stats()["tokens_real"] == 0  # reset after reading
    # a model type whose packed forward is not verified: auto runs padded, on is refused
    backbone.causal_lm.config.model_type = "mistral"
    with torch.no_grad():
        backbone.values(ids, mask)
    assert backbone.packing.take_stats()["padded_forwards"] == 1
    with pytest.raises(ValueError, match="packing='on' cannot apply: model_type='mistral' is not"):
        backbone.set_packing("on")
    backbone.causal_lm.config.model_type = "llama"
    backbone.causal_lm.config.use_sliding_window = True
    with pytest.raises(ValueError, match="sliding-window"):
        backbone.set_packing("on")


def test_on_says_once_that_shared_prompt_forwards_are_not_packed():
    """A grouped rollout (GRPO and the other critic-free algorithms) runs its scoring and update
    forwards with each group's prompt once (shared_prefix), padded: packing='on' asked for every
    batch packed, so it is said, once; 'auto' (the default) runs the same without a word."""
    import warnings

    prompt, _ = make_batch([5, 3], "left", seed=4)
    response, _ = make_batch([4, 4, 2, 1], "right", seed=5)
    ids = torch.cat([prompt[[0, 0, 1, 1]], response], 1)  # 2 groups of 2 samples
    mask = torch.cat([(prompt[[0, 0, 1, 1]] != PAD), response != PAD], 1).long()
    backbone = make_backbone("llama")
    expected = {}
    for mode in ("auto", "on"):
        backbone.set_packing(mode)
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            for _ in range(2):
                got = backbone.token_logprobs(ids, mask, "policy", start=4, shared_prefix=5)
        said = [w for w in caught if "packing='on'" in str(w.message)]
        assert len(said) == (mode == "on"), mode
        # the shared-prompt forward ran (the prompts' slots counted once per group)
        assert backbone.packing.take_stats()["tokens_processed"] == 2 * (2 * 5 + 4 * 4)
        expected.setdefault("logp", got)
        torch.testing.assert_close(got, expected["logp"], **TOL)


# --------------------------------------------------------------------------------------------
# packed == padded: log-probs, values, rewards and their gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("layout", ["left", "right", "equal"])
def test_packed_forward_equals_padded(arch, layout):
    backbone = make_backbone(arch, seed=3)
    if layout == "equal":  # every row the same length: nothing to remove, packed all the same
        ids, mask = make_batch([5, 5, 5], "right", seed=4)
    else:
        ids, mask = make_batch(LENGTHS, layout, seed=4, extra=1)
        mask[2, 4] = 0  # a hole inside the longest row: the tokens around it are one sequence
    want, want_grads, padded = forward_all(backbone, ids, mask, "off")
    got, got_grads, stats = forward_all(backbone, ids, mask, "on")
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)
    assert_grads_close(got_grads, want_grads)
    assert stats["packed_forwards"] == 5 and stats["padded_forwards"] == 0
    assert stats["tokens_real"] == padded["tokens_real"] == 5 * int(mask.sum())
    if layout == "equal":
        assert stats["tokens_processed"] == stats["tokens_padded"]
    else:
        assert stats["tokens_processed"] < stats["tokens_padded"]
    # packed values are 0 at padding like the padded ones, and the first real token of a
    # left-padded row (no real token before it) has no log-prob
    assert (got["values"][mask == 0] == 0).all()
    logp = backbone.token_logprobs(ids, mask, "policy")
    assert (logp[(mask[:, :-1] == 0) | (mask[:, 1:] == 0)] == 0).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_wide_bins_equal_padded(monkeypatch, arch):
    """Bins wider than the longest sequence (chosen when attention is cheap beside the linears:
    large hidden sizes): several long sequences per bin, the unused tail cut into sequences no
    longer than the longest real one (GPT-2's position table)."""
    monkeypatch.setattr(packing, "attention_cost_of", lambda config: 0.0)
    backbone = make_backbone(arch, seed=16)
    ids, mask = make_batch([9, 6, 6, 6, 5], "left", seed=17)
    want, want_grads, _ = forward_all(backbone, ids, mask, "off")
    got, got_grads, stats = forward_all(backbone, ids, mask, "on")
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)
    assert_grads_close(got_grads, want_grads)
    packed = pack(ids, mask, flat=False, attention_cost=0.0)
    # width 9: five bins (45 slots); 18: [9 + 6], [6 + 6 + 5] (36); 27: 54; 36: 36 (a tie: the
    # narrower wins)
    assert packed.input_ids.shape == (2, 18)
    assert packed.position_ids.max() == 8  # the longest sequence's last position
    assert stats["tokens_processed"] == 5 * 36 < stats["tokens_padded"] == 5 * 45
    # a tail longer than the longest sequence is cut: its positions stay below 9 too
    monkeypatch.setattr(packing, "_bin_width", lambda lengths, cost: 18)
    tail = pack(*make_batch([9, 2], "right"), flat=False, attention_cost=0.0)
    assert tail.input_ids.shape == (1, 18) and tail.position_ids.max() == 8
    assert tail.position_ids[0, 11:].tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_packed_forward_with_gradient_checkpointing_and_several_roles():
    """Checkpointed layers recompute packed inputs with the forward's role (rlhf/models.py)."""
    grads = {}
    for mode in ("off", "on"):
        backbone = make_backbone("qwen2", seed=5)
        backbone.enable_gradient_checkpointing()
        backbone.train()
        backbone.set_packing(mode)
        ids, mask = make_batch(LENGTHS, "left", seed=6)
        scored = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
        loss = (backbone.token_logprobs(ids, mask, "policy") * scored).sum() \
            + backbone.values(ids, mask).square().sum() + backbone.rewards(ids, mask).sum()
        loss = loss + 0 * backbone.reference_logprobs(ids, mask).sum()  # a role switch between
        loss.backward()
        grads[mode] = [p.grad for p in trainable(backbone)]
    assert_grads_close(grads["on"], grads["off"])


# --------------------------------------------------------------------------------------------
# the flash-attn layout: one (1, N) row with cu_seqlens, flash_attn_varlen_func mocked
# --------------------------------------------------------------------------------------------
def reference_varlen(calls):
    """A stand-in for flash_attn_varlen_func: causal attention per sequence in float64."""

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None,
               causal=False):
        calls.append(dict(q=tuple(q.shape), k=tuple(k.shape), cu=cu_q.clone(), max=max_q,
                          causal=causal, dtype=cu_q.dtype))
        out = torch.empty_like(q)
        groups = q.shape[1] // k.shape[1]
        bounds = cu_q.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            qs = q[a:b].double().transpose(0, 1)
            ks = k[a:b].double().repeat_interleave(groups, 1).transpose(0, 1)
            vs = v[a:b].double().repeat_interleave(groups, 1).transpose(0, 1)
            scores = qs @ ks.transpose(1, 2) * softmax_scale
            causal_mask = torch.ones(b - a, b - a, dtype=torch.bool).tril()
            scores = scores.masked_fill(~causal_mask, float("-inf"))
            out[a:b] = (scores.softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
        return out

    return varlen


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("flash", [True, False], ids=["flash_varlen", "sdpa_per_sequence"])
def test_flat_layout_plumbing(monkeypatch, arch, flash):
    """With flash-attn usable, packed forwards take one (1, N) row and flash_attn_varlen_func
    gets the cu_seqlens; other calls (padded forwards, generation) stay SDPA. Without a flash
    function for the dtype, the same layout runs SDPA per sequence."""
    calls = []
    monkeypatch.setattr(packing, "uses_flash", lambda causal_lm, device: True)
    monkeypatch.setattr(packing, "flash_varlen_function",
                        lambda: reference_varlen(calls) if flash else None)
    monkeypatch.setattr(packing, "FLASH_DTYPES", (torch.float32,))
    backbone = make_backbone(arch, seed=7)
    ids, mask = make_batch(LENGTHS, "left", seed=8)
    want, want_grads, _ = forward_all(backbone, ids, mask, "off")
    got, got_grads, stats = forward_all(backbone, ids, mask, "on")
    assert backbone.causal_lm.config._attn_implementation == packing.VARLEN_ATTENTION
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)
    assert_grads_close(got_grads, want_grads)
    assert stats["tokens_processed"] == stats["tokens_real"]  # flat: no slot wasted
    layers = backbone.config.num_hidden_layers
    if flash:
        assert len(calls) == 5 * layers  # five forwards, every layer
        n = int(mask.sum())
        first = calls[0]
        assert first["q"][0] == n and first["causal"] and first["dtype"] == torch.int32
        assert first["cu"].tolist() == [0, 6, 7, 16, 19] and first["max"] == 9
        assert first["k"][1] == backbone.config.num_key_value_heads if arch != "gpt2" else True
    # a padded forward after the switch is SDPA as before (the generation engine's path)
    backbone.set_packing("off")
    with torch.no_grad():
        again = backbone.values(ids, mask)
    torch.testing.assert_close(again, want["values"], **TOL)
    if flash:
        assert len(calls) == 5 * layers


# --------------------------------------------------------------------------------------------
# whole steps: SFT, reward model, RL (PPO and a critic-free preset)
# --------------------------------------------------------------------------------------------
def test_sft_step_packed_equals_padded():
    from rlhf.sft import lm_loss, token_logprobs_of

    ids, mask = make_batch([7, 2, 9, 4], "right", seed=9)
    labels = torch.where(mask != 0, ids, -100)
    labels[:, :2] = -100  # the prompt
    results = {}
    for mode in ("off", "on"):
        model = tiny_causal_lm("llama", vocab_size=VOCAB, seed=9)
        model.train()
        packer = Packing(mode)
        logp = token_logprobs_of(model, ids, mask, labels, packer)
        loss = lm_loss(logp, labels, int((labels[:, 1:] != -100).sum()))
        loss.backward()
        results[mode] = (loss.detach(), logp.detach(), [p.grad for p in model.parameters()],
                         packer.token_stats())
    torch.testing.assert_close(results["on"][0], results["off"][0], **TOL)
    torch.testing.assert_close(results["on"][1], results["off"][1], **TOL)
    assert_grads_close(results["on"][2], results["off"][2])
    stats = results["on"][3]
    assert stats["tokens_real"] == 22 and stats["tokens_padded"] == 36
    assert stats["tokens_processed"] == 27  # first-fit decreasing, width 9: [9], [7 + 2], [4]
    assert results["off"][3]["tokens_processed"] == 36


def test_reward_model_step_packed_equals_padded():
    from rlhf.reward import PairBatch, pair_loss

    chosen = make_batch([5, 1, 8], "right", seed=10)
    rejected = make_batch([3, 6, 2], "right", seed=11)
    batch = PairBatch(chosen[0], chosen[1], rejected[0], rejected[1])
    results = {}
    for mode in ("off", "on"):
        backbone = make_backbone("gpt2", seed=12)
        backbone.set_trainable(["reward"])
        backbone.set_packing(mode)
        loss, stats = pair_loss(backbone, batch, PAD, center_coef=0.01)
        loss.backward()
        results[mode] = (loss.detach(), stats,
                         [p.grad for p in backbone.trainable_parameters("reward")])
    torch.testing.assert_close(results["on"][0], results["off"][0], **TOL)
    assert results["on"][1]["accuracy"] == results["off"][1]["accuracy"]
    assert_grads_close(results["on"][2], results["off"][2])


def fake_generation():
    from rlhf.engine import Generation

    prompts = make_batch([3, 1, 4, 2], "left", seed=13)
    responses = make_batch([5, 1, 3, 6], "right", seed=14)
    sequences = torch.cat([prompts[0], responses[0]], 1)
    attention_mask = torch.cat([prompts[1], responses[1]], 1)
    return Generation(sequences, attention_mask, responses[1].bool(),
                      torch.zeros(responses[0].shape), prompt_length=prompts[0].shape[1])


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_rl_step_packed_equals_padded(algorithm):
    from rlhf import rl

    cfg = rl.PPOConfig(algorithm=algorithm, rollout_batch_size=4, minibatch_size=4,
                       group_size=2 if algorithm == "grpo" else None, max_new_tokens=6,
                       forward_batch_size=0)
    results = {}
    for mode in ("off", "on"):
        backbone = make_backbone("llama", seed=15)
        if algorithm == "ppo":
            backbone.set_trainable(["policy", "critic"])
        else:
            backbone.drop_role("critic")
            backbone.set_trainable(["policy"])
        backbone.set_packing(mode)
        rollout = rl.make_rollout(backbone, fake_generation(), 0.05, cfg)
        p_loss, p_stats, v_loss, _ = rl.backward_losses(backbone, rollout, cfg)
        results[mode] = (rollout, p_loss.detach(), v_loss, p_stats,
                         [p.grad for role in ("policy", "critic") if role in backbone.roles
                          for p in backbone.trainable_parameters(role)],
                         backbone.packing.token_stats())
    on, off = results["on"], results["off"]
    for name in ("old_logprobs", "ref_logprobs", "scores", "rewards", "advantages",
                 "old_values", "returns"):
        if getattr(off[0], name) is not None:
            torch.testing.assert_close(getattr(on[0], name), getattr(off[0], name), **TOL,
                                       msg=name)
    torch.testing.assert_close(on[1], off[1], **TOL)
    if algorithm == "ppo":
        torch.testing.assert_close(on[2].detach(), off[2].detach(), **TOL)
    torch.testing.assert_close(on[3]["entropy"], off[3]["entropy"], **TOL)
    assert_grads_close(on[4], off[4])
    assert on[5]["tokens_real"] == off[5]["tokens_real"] > 0
    assert on[5]["tokens_processed"] < off[5]["tokens_processed"] == off[5]["tokens_padded"]


def test_stages_log_token_counts_and_train_the_same_packed(tmp_path):
    """SFT, reward-model and PPO stage runs with packing on and off from the same start: the
    same losses and rollout statistics, and every step's metrics count the tokens."""
    import copy
    import json

    from rlhf import ppo, reward, sft, task
    from tests.helpers import review_tokenizer, tiny_llama

    corpus = task.make_corpus(24, seed=1)
    tokenizer = review_tokenizer(corpus, vocab_size=300)
    with torch.random.fork_rng(devices=[]):
        model = tiny_llama(tokenizer, 0)  # STAGE_SHAPE
    pairs = [{"prompt": a["prompt"], "chosen": a["completion"], "rejected": b["completion"]}
             for a, b in zip(corpus[:12], corpus[12:])]

    def metrics(directory):
        return [json.loads(line) for line in open(tmp_path / directory / "metrics.jsonl")]

    runs = {}
    for mode in ("off", "on"):
        common = dict(device="cpu", save_every=0, packing=mode)
        sft.train(sft.SFTConfig(output_dir=str(tmp_path / f"sft-{mode}"), max_steps=2,
                                batch_size=8, grad_accum_steps=1, lr=1e-2, warmup_steps=1,
                                log_every=1, max_length=128, **common),
                  model=copy.deepcopy(model), tokenizer=tokenizer, examples=corpus)
        backbone = SharedBackbone.from_model(copy.deepcopy(model), lora=SPEC)
        reward.train(reward.RewardConfig(output_dir=str(tmp_path / f"rm-{mode}"), batch_size=6,
                                         grad_accum_steps=1, epochs=1.0, warmup_steps=1,
                                         log_every=1, max_length=128, **common),
                     backbone=backbone, tokenizer=tokenizer, train_pairs=pairs,
                     eval_pairs=pairs[:4])
        # RL from one and the same reward-model backbone (the padded run's), so that both runs
        # sample the same responses
        start = runs["off"]["backbone"] if mode == "on" else backbone
        ppo.train(ppo.PPOConfig(output_dir=str(tmp_path / f"ppo-{mode}"), num_iterations=1,
                                rollout_batch_size=4, minibatch_size=4, ppo_epochs=1,
                                max_new_tokens=6, max_prompt_length=40, **common),
                  backbone=copy.deepcopy(start), tokenizer=tokenizer,
                  prompts=task.all_prompts("train")[:4])
        runs[mode] = {"backbone": backbone, "sft": metrics(f"sft-{mode}"),
                      "rm": [m for m in metrics(f"rm-{mode}") if "loss" in m],
                      "ppo": metrics(f"ppo-{mode}")}
    on, off = runs["on"], runs["off"]
    for stage, keys in (("sft", ("loss",)), ("rm", ("loss", "train_accuracy")),
                        ("ppo", ("proxy_reward", "kl", "policy/loss", "value/loss"))):
        assert len(on[stage]) == len(off[stage]) > 0
        for a, b in zip(on[stage], off[stage]):
            for key in keys:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (stage, key)
            assert a["tokens_real"] == b["tokens_real"] > 0
            assert a["tokens_padded"] == b["tokens_padded"] == b["tokens_processed"]
            # packed: at most the padded slots (here about as many: rows of 50-128 tokens, or
            # prompts of ~35 + 6 response tokens, each fill a bin of the longest one's width)
            assert a["tokens_real"] <= a["tokens_processed"] <= a["tokens_padded"]
