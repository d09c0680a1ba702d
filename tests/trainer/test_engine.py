"""The rollout engine (rlhf/engine.py): recorded log-probs equal a teacher-forced forward, greedy
equals the argmax of the teacher-forced logits, EOS per row, seeding, filters, the base weights
untouched; on CUDA also the captured decode step against the eager one."""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch

import rlhf_kernels
from rlhf.engine import Generation, RolloutEngine, generate, sample_tokens
from rlhf.models import LoraSpec, SharedBackbone
from rlhf.tiny_models import tiny_causal_lm
from tests.numerics import DEVICE, assert_close

VOCAB = 128
PAD, EOS = 0, 2
# recorded log-prob vs teacher-forced forward: the same math in a different order (KV cache,
# one query at a time), so a few ulps of the logits in fp32 and a bf16 rounding in bf16
LOGP_ATOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2}


def _backbone(arch: str, dtype: torch.dtype = torch.float32) -> SharedBackbone:
    """Tiny backbone whose adapters are random (PEFT starts B = 0: policy == reference)."""
    backbone = SharedBackbone.from_model(
        tiny_causal_lm(arch, VOCAB, seed=0, dtype=dtype).to(DEVICE), lora=LoraSpec(rank=4)
    )
    with torch.no_grad():
        for name, param in backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    return backbone


def _prompts(batch: int = 3, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths (1, length - 2, length) without special ids."""
    ids = torch.randint(3, VOCAB, (batch, length), device=DEVICE)
    mask = torch.ones(batch, length, dtype=torch.int64, device=DEVICE)
    mask[0, :2] = 0
    mask[-1, :-1] = 0
    ids[mask == 0] = PAD
    return ids, mask


def _check_layout(gen: Generation, prompt_ids, prompt_mask, max_new_tokens: int) -> None:
    batch, prompt_length = prompt_ids.shape
    width = gen.response_mask.shape[1]
    assert 1 <= width <= max_new_tokens
    assert gen.sequences.shape == (batch, prompt_length + width)
    assert gen.attention_mask.shape == gen.sequences.shape
    assert gen.logprobs.shape == (batch, width) and gen.logprobs.dtype == torch.float32
    assert gen.response_mask.dtype == torch.bool
    assert torch.equal(gen.sequences[:, :prompt_length], prompt_ids)
    assert torch.equal(gen.attention_mask[:, :prompt_length], prompt_mask)
    assert torch.equal(gen.attention_mask[:, prompt_length:], gen.response_mask.long())
    off = ~gen.response_mask
    assert bool((gen.response_ids[off] == PAD).all())
    assert bool((gen.logprobs[off] == 0).all())
    assert bool((gen.logprobs[gen.response_mask] <= 0).all())
    # once a row stops it stays stopped
    assert bool((gen.response_mask[:, 1:] <= gen.response_mask[:, :-1]).all())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("decoding", ["sampled", "greedy"])
def test_recorded_logprobs_equal_teacher_forced(arch, decoding):
    backbone = _backbone(arch)
    prompt_ids, prompt_mask = _prompts()
    temperature = 0.7
    kwargs = dict(greedy=True) if decoding == "greedy" else dict(top_k=50, top_p=0.95, seed=3)
    gen = generate(backbone, prompt_ids, prompt_mask, 9, eos_token_id=EOS, pad_token_id=PAD,
                   temperature=temperature, **kwargs)
    _check_layout(gen, prompt_ids, prompt_mask, 9)
    P = gen.prompt_length
    with torch.no_grad():
        # the trainer's own scoring path: policy adapter, linear_logprobs over the sequences
        teacher = backbone.token_logprobs(gen.sequences, gen.attention_mask, "policy",
                                          temperature=temperature)[:, P - 1:]
        reference = backbone.reference_logprobs(gen.sequences, gen.attention_mask,
                                                temperature)[:, P - 1:]
    mask = gen.response_mask
    assert_close(gen.logprobs, teacher * mask, atol=LOGP_ATOL[torch.float32], name="logprobs")
    # the adapter really was on: the reference model gives other numbers
    assert (gen.logprobs - reference * mask).abs().max() > 1e-2
    if decoding == "greedy":
        with torch.no_grad():
            logits = backbone.logits(gen.sequences, gen.attention_mask, "policy")[:, P - 1:-1]
        argmax = logits.argmax(-1)
        assert torch.equal(gen.response_ids[mask], argmax[mask])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_plain_hf_model_against_full_logits(arch):
    """Any HF causal LM: recorded log-probs == rlhf_kernels.logprobs on the full logits."""
    model = tiny_causal_lm(arch, VOCAB, seed=1).to(DEVICE)
    prompt_ids, prompt_mask = _prompts(batch=4, length=5)
    gen = generate(model, prompt_ids, prompt_mask, 7, eos_token_id=None, pad_token_id=PAD,
                   temperature=1.3, seed=0)
    assert gen.response_mask.all() and gen.response_mask.shape[1] == 7  # no EOS: full length
    positions = (gen.attention_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=gen.sequences, attention_mask=gen.attention_mask,
                       position_ids=positions).logits
    P = gen.prompt_length
    teacher = rlhf_kernels.logprobs(logits[:, P - 1:-1], gen.response_ids, temperature=1.3)
    assert_close(gen.logprobs, teacher, atol=LOGP_ATOL[torch.float32], name="logprobs")


def test_bf16_within_dtype_tolerance():
    backbone = _backbone("qwen2", torch.bfloat16)
    prompt_ids, prompt_mask = _prompts()
    gen = generate(backbone, prompt_ids, prompt_mask, 6, eos_token_id=EOS, pad_token_id=PAD,
                   seed=5)
    with torch.no_grad():
        teacher = backbone.token_logprobs(gen.sequences, gen.attention_mask, "policy")
    teacher = teacher[:, gen.prompt_length - 1:] * gen.response_mask
    assert_close(gen.logprobs, teacher, atol=LOGP_ATOL[torch.bfloat16], name="bf16 logprobs")


def test_base_weights_unchanged_and_state_restored():
    backbone = _backbone("llama")
    backbone._activate("critic")
    trainable = {name: p.requires_grad for name, p in backbone.named_parameters()}
    base = {name: p.detach().clone() for name, p in backbone.causal_lm.named_parameters()
            if "lora_" not in name}
    backbone.train()
    prompt_ids, prompt_mask = _prompts()
    engine = RolloutEngine(backbone)
    for seed in range(2):
        engine.generate(prompt_ids, prompt_mask, 5, eos_token_id=EOS, pad_token_id=PAD, seed=seed)
    for name, param in backbone.causal_lm.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base[name]), f"base weight {name} changed"
    assert backbone.active_role == "critic"
    assert backbone.training and backbone.causal_lm.training
    assert {n: p.requires_grad for n, p in backbone.named_parameters()} == trainable
    # the LoRA layers are not merged
    assert not any(getattr(m, "merged", False) for m in backbone.causal_lm.modules())


def test_reference_role_samples_from_the_base():
    backbone = _backbone("qwen2")
    prompt_ids, prompt_mask = _prompts()
    gen = generate(backbone, prompt_ids, prompt_mask, 6, eos_token_id=EOS, pad_token_id=PAD,
                   seed=1, role=None)
    with torch.no_grad():
        reference = backbone.reference_logprobs(gen.sequences, gen.attention_mask)
    reference = reference[:, gen.prompt_length - 1:] * gen.response_mask
    assert_close(gen.logprobs, reference, atol=LOGP_ATOL[torch.float32], name="reference")


def test_eos_stops_each_row():
    model = tiny_causal_lm("llama", VOCAB, seed=2).to(DEVICE)
    prompt_ids, prompt_mask = _prompts(batch=4)
    free = generate(model, prompt_ids, prompt_mask, 8, eos_token_id=None, pad_token_id=PAD,
                    greedy=True)
    # make row 0's second greedy token the EOS: row 0 must stop there, other rows go on (or stop
    # at their own first occurrence of that token)
    eos = int(free.response_ids[0, 1])
    gen = generate(model, prompt_ids, prompt_mask, 8, eos_token_id=[eos, VOCAB - 1],
                   pad_token_id=PAD, greedy=True)
    _check_layout(gen, prompt_ids, prompt_mask, 8)
    for row in range(4):
        tokens = free.response_ids[row].tolist()
        hits = [i for i, t in enumerate(tokens) if t in (eos, VOCAB - 1)]
        expected = hits[0] + 1 if hits else 8
        assert int(gen.response_lengths[row]) == expected
        assert gen.response_ids[row, :expected].tolist() == tokens[:expected]
        assert torch.equal(gen.logprobs[row, :expected], free.logprobs[row, :expected])
    assert gen.response_mask.shape[1] == int(gen.response_lengths.max())  # trimmed


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_matches_hugging_face_generate(arch):
    """An independent oracle: greedy decoding with the static cache, the 4-D masks and left
    padding reproduces Hugging Face's own greedy ``generate``, EOS stopping and padding
    included."""
    model = tiny_causal_lm(arch, VOCAB, seed=2).to(DEVICE)
    prompt_ids, prompt_mask = _prompts(batch=4)
    free = generate(model, prompt_ids, prompt_mask, 10, eos_token_id=None, pad_token_id=PAD,
                    greedy=True)
    eos = int(free.response_ids[0, 2])  # row 0 stops by its third token, others maybe never
    gen = generate(model, prompt_ids, prompt_mask, 10, eos_token_id=eos, pad_token_id=PAD,
                   greedy=True)
    with torch.no_grad():
        hf = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=False,
                            max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD)
    width = gen.sequences.shape[1]
    assert hf.shape[1] >= width
    assert torch.equal(gen.sequences, hf[:, :width])
    assert bool((hf[:, width:] == PAD).all())
    assert int(gen.response_lengths[0]) == free.response_ids[0].tolist().index(eos) + 1 <= 3


def test_seeded_and_engine_reuse():
    backbone = _backbone("llama")
    prompt_ids, prompt_mask = _prompts()
    args = (prompt_ids, prompt_mask, 8)
    kw = dict(eos_token_id=EOS, pad_token_id=PAD, temperature=1.5)
    first = generate(backbone, *args, seed=11, **kw)
    engine = RolloutEngine(backbone)
    engine.generate(*args, seed=4, **kw)  # leaves stale keys/values in the reused cache
    again = engine.generate(*args, seed=11, **kw)
    assert torch.equal(first.sequences, again.sequences)
    assert torch.equal(first.logprobs, again.logprobs)
    other = engine.generate(*args, seed=12, **kw)
    assert not torch.equal(first.sequences, other.sequences)
    # top_k = 1 is greedy whatever the seed
    greedy = engine.generate(*args, greedy=True, **kw)
    top1 = engine.generate(*args, top_k=1, seed=7, **kw)
    assert torch.equal(greedy.sequences, top1.sequences)


def test_sample_tokens_filters_and_logprob():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = probs.log().float().expand(4000, 4).contiguous()
    generator = torch.Generator().manual_seed(0)
    # top_p = 0.7: {0.5, 0.3} reach it; top_k = 2 keeps the same two
    for kwargs in (dict(top_p=0.7), dict(top_k=2)):
        tokens, logp = sample_tokens(logits, generator=generator, **kwargs)
        counts = torch.bincount(tokens, minlength=4).double() / tokens.numel()
        assert counts[2] == 0 and counts[3] == 0
        assert abs(counts[0].item() - 0.5 / 0.8) < 0.04
        # the recorded log-prob is of the unfiltered distribution
        assert_close(logp, probs.log()[tokens], atol=1e-6, name="logp")
    # no filter: frequencies follow probs; temperature 2 flattens them to sqrt(p) / sum(sqrt(p))
    tokens, logp = sample_tokens(logits, temperature=2.0, generator=generator)
    tempered = probs.sqrt() / probs.sqrt().sum()
    counts = torch.bincount(tokens, minlength=4).double() / tokens.numel()
    assert (counts - tempered).abs().max() < 0.04
    assert_close(logp, tempered.log()[tokens], atol=1e-6, name="tempered logp")
    tokens, logp = sample_tokens(logits, greedy=True)
    assert bool((tokens == 0).all()) and abs(logp[0].item() - math.log(0.5)) < 1e-6


def test_bad_inputs_raise():
    model = tiny_causal_lm("llama", VOCAB).to(DEVICE)
    prompt_ids, prompt_mask = _prompts()
    right_padded = prompt_mask.flip(-1)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, prompt_ids, right_padded, 4, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt_ids, prompt_mask, 4, eos_token_id=EOS, pad_token_id=PAD,
                 temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt_ids, prompt_mask, 0, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt_ids, prompt_mask, 4, eos_token_id=EOS, pad_token_id=PAD, top_p=0)
    with pytest.raises(ValueError, match="decode_graph"):
        RolloutEngine(model, decode_graph="fast")
    with pytest.raises(ValueError, match="role"):
        generate(_backbone("llama"), prompt_ids, prompt_mask, 4, eos_token_id=EOS,
                 pad_token_id=PAD, role="judge")


def test_compiled_decode_step_reads_no_per_step_python_state():
    """decode_graph="compile" (on the CPU: Inductor). The compiled step is traced once and then
    serves every step of every call: dynamo would guard on, and recompile for, any Python value
    the step reads that changes from step to step (cache length, position, slot), and a CUDA
    graph would bake such a value in. One compiled frame, the eager tokens, and log-probs equal
    to a teacher-forced forward show the step reads only its static buffers."""
    from torch._dynamo.utils import counters

    backbone = _backbone("qwen2")
    prompt_ids, prompt_mask = _prompts(batch=3, length=6)
    kw = dict(eos_token_id=None, pad_token_id=PAD, seed=3)
    eager = RolloutEngine(backbone, decode_graph="none").generate(prompt_ids, prompt_mask, 9, **kw)
    engine = RolloutEngine(backbone, decode_graph="compile")
    frames_before = counters["frames"]["total"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed compile warns and goes eager
        runs = [engine.generate(prompt_ids, prompt_mask, 9, **kw) for _ in range(2)]
    assert engine._compiled is not None
    assert counters["frames"]["total"] - frames_before == 1, dict(counters["frames"])
    for gen in runs:
        assert torch.equal(gen.sequences, eager.sequences)
        torch.testing.assert_close(gen.logprobs, eager.logprobs, rtol=0, atol=1e-5)
        with torch.no_grad():
            teacher = backbone.token_logprobs(gen.sequences, gen.attention_mask, "policy",
                                              start=gen.prompt_length - 1)
        assert_close(gen.logprobs, teacher * gen.response_mask,
                     atol=LOGP_ATOL[torch.float32], name="compiled decode")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["cuda_graph", "compile"])
def test_captured_decode_matches_teacher_forced(mode):
    backbone = _backbone("qwen2", torch.bfloat16)
    prompt_ids, prompt_mask = _prompts(batch=4, length=7)
    kw = dict(eos_token_id=EOS, pad_token_id=PAD, seed=3)
    eager = RolloutEngine(backbone, decode_graph="none").generate(prompt_ids, prompt_mask, 12, **kw)
    engine = RolloutEngine(backbone, decode_graph=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns and goes eager
        runs = [engine.generate(prompt_ids, prompt_mask, 12, **kw) for _ in range(2)]
    assert engine._graph is not None or engine._compiled is not None
    for gen in runs:  # the first call captures, the second replays the kept graph
        with torch.no_grad():
            teacher = backbone.token_logprobs(gen.sequences, gen.attention_mask, "policy")
        teacher = teacher[:, gen.prompt_length - 1:] * gen.response_mask
        assert_close(gen.logprobs, teacher, atol=LOGP_ATOL[torch.bfloat16], name=mode)
        if mode == "cuda_graph":  # the same kernels replayed: the same numbers as eager
            assert torch.equal(gen.sequences, eager.sequences)


def test_autocast_generation_keeps_no_cast_cache():
    """Under the engine's autocast no weight cast is cached: with the cache, a captured decode
    step reads the bf16 copies made before the capture, which autocast frees when generate()
    returns (stale or reused memory in the next rollout's replays)."""
    backbone = _backbone("llama")
    engine = RolloutEngine(backbone, decode_graph="none", autocast_dtype=torch.bfloat16)
    seen = []
    forward = engine._forward

    def recording(*args, **kwargs):
        seen.append((torch.is_autocast_enabled(DEVICE.type),
                     torch.is_autocast_cache_enabled()))
        return forward(*args, **kwargs)

    engine._forward = recording
    prompt_ids, prompt_mask = _prompts()
    engine.generate(prompt_ids, prompt_mask, 4, eos_token_id=None, pad_token_id=PAD, seed=1)
    assert seen and all(enabled and not cached for enabled, cached in seen), seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_decode_under_autocast_follows_adapter_updates():
    """The trainer's GPU mode: bf16 autocast over fp32 adapters, the decode step captured once
    and replayed in later rollouts. After an in-place update of the policy adapter (what the
    optimizer does between rollouts), the replayed rollout equals an eager one on the new
    weights."""
    backbone = _backbone("qwen2", torch.bfloat16)
    prompt_ids, prompt_mask = _prompts(batch=4, length=7)
    kw = dict(eos_token_id=EOS, pad_token_id=PAD, seed=3)
    engine = RolloutEngine(backbone, decode_graph="cuda_graph", autocast_dtype=torch.bfloat16)
    eager = RolloutEngine(backbone, decode_graph="none", autocast_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns and goes eager
        first = engine.generate(prompt_ids, prompt_mask, 12, **kw)
    assert engine._graph is not None
    assert torch.equal(first.sequences, eager.generate(prompt_ids, prompt_mask, 12, **kw).sequences)
    adapters = [p for n, p in backbone.named_parameters() if "lora_" in n and ".policy." in n]
    assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters)
    with torch.no_grad():
        for p in adapters:
            p.mul_(-1.5)
    torch.empty(64 << 20, dtype=torch.uint8, device=DEVICE).fill_(255)  # reuse freed memory
    second = engine.generate(prompt_ids, prompt_mask, 12, **kw)
    want = eager.generate(prompt_ids, prompt_mask, 12, **kw)
    assert torch.equal(second.sequences, want.sequences)
    assert_close(second.logprobs, want.logprobs, atol=0, name="replayed after the update")
    assert not torch.equal(second.sequences, first.sequences)  # the update changed the policy


def test_autocast_generation_reads_adapter_copies_bit_identically(monkeypatch):
    """The engine's rollouts under autocast read the adapters' autocast-dtype copies
    (lora_forward.rollout_copies) instead of casting them in every step: the same tokens and
    log-probs bit for bit, two casts less per adapted linear per step."""
    from rlhf import lora_forward

    backbone = _backbone("qwen2")
    prompt_ids, prompt_mask = _prompts()
    kw = dict(eos_token_id=EOS, pad_token_id=PAD, seed=5)
    adapted = sum(1 for m in backbone._lora_layers if hasattr(m, "_rlhf_copies"))
    runs = {}
    for copies in (True, False):
        if not copies:
            monkeypatch.setattr(lora_forward, "rollout_copies",
                                lambda *a, **k: contextlib.nullcontext())
        engine = RolloutEngine(backbone, decode_graph="none", autocast_dtype=torch.bfloat16)
        casts = []
        forward = engine._decode_forward

        def counted(_forward=forward, _casts=casts):
            from tests.trainer.test_lora_forward import _op_counts

            out = []
            _casts.append(_op_counts(lambda: out.append(_forward()))["_to_copy"])
            return out[0]

        engine._decode_forward = counted
        runs[copies] = (engine.generate(prompt_ids, prompt_mask, 5, **kw), casts)
    (with_copies, casts_with), (without, casts_without) = runs[True], runs[False]
    assert torch.equal(with_copies.sequences, without.sequences)
    assert torch.equal(with_copies.logprobs, without.logprobs)
    assert adapted > 0 and casts_with and len(casts_with) == len(casts_without)
    assert all(b - a == 2 * adapted for a, b in zip(casts_with, casts_without))


def test_compiled_decode_under_autocast_reads_the_refreshed_adapter_copies():
    """decode_graph="compile" under autocast (on the CPU: Inductor) with the rollout's adapter
    copies: one compiled frame serves calls before and after an in-place adapter update, and
    the second call samples from the updated policy (its recorded log-probs are the updated
    policy's teacher-forced ones, not the old policy's): the compiled step reads the copies'
    buffers, refreshed in place, rather than values baked in at compile time."""
    from torch._dynamo.utils import counters

    backbone = _backbone("qwen2")
    prompt_ids, prompt_mask = _prompts(batch=3, length=6)
    kw = dict(eos_token_id=None, pad_token_id=PAD, seed=3)
    engine = RolloutEngine(backbone, decode_graph="compile", autocast_dtype=torch.bfloat16)

    def teacher(gen):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logp = backbone.token_logprobs(gen.sequences, gen.attention_mask, "policy",
                                           start=gen.prompt_length - 1)
        return logp.float() * gen.response_mask

    frames_before = counters["frames"]["total"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed compile warns and goes eager
        first = engine.generate(prompt_ids, prompt_mask, 6, **kw)
        assert_close(first.logprobs, teacher(first), atol=LOGP_ATOL[torch.bfloat16],
                     name="before the update")
        old_policy = teacher(first)
        with torch.no_grad():
            for name, param in backbone.named_parameters():
                if "lora_B" in name and ".policy." in name:
                    param.normal_(0.0, 1.0)  # a large change of the policy
        second = engine.generate(prompt_ids, prompt_mask, 6, **kw)
    assert engine._compiled is not None
    assert counters["frames"]["total"] - frames_before == 1, dict(counters["frames"])
    assert_close(second.logprobs, teacher(second), atol=LOGP_ATOL[torch.bfloat16],
                 name="after the update")
    if torch.equal(second.sequences, first.sequences):  # same tokens: compare the log-probs
        assert (second.logprobs - old_policy).abs().max() > 3 * LOGP_ATOL[torch.bfloat16]
