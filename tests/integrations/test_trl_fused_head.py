"""patch_trl()'s fused lm head with every output TRL asks for: log_probs, entropy,
log_sum_sq_probs, mean_logits and is_top1 (SFTTrainer, DPOTrainer, KTOTrainer).

The drop-in ``ChunkedLogProbFunction`` against TRL's own ``_ChunkedLogProbFunction`` and the
float64 reference (``reference.linear_logprobs_stats``) on awkward sizes (a vocabulary no block
multiple, TRL's vocabulary tiles not dividing it, temperature and logit_scale != 1, bias, bf16,
exact ties for is_top1); with a PEFT adapter on lm_head against the model's own logits; then one
real training step of SFTTrainer, DPOTrainer (WPO weighting on) and KTOTrainer, TRL's own head
against ours: the same loss, metrics, gradient norm and updated weights, and the patched step
computed every fused-head call with ``linear_logprobs`` (TRL's function trapped).
"""

from __future__ import annotations

import copy
import math
import tempfile
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("peft")
utils = pytest.importorskip("trl.trainer.utils")

from rlhf_kernels import reference  # noqa: E402
from rlhf_kernels.integrations import trl as ours  # noqa: E402
from tests.numerics import assert_close_2x  # noqa: E402

ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
STATS = ALL[2:]
# TRL's own function, whatever is patched in later
TRL_FUNCTION = utils._ChunkedLogProbFunction

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_disable` is deprecated"),
]


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "triton")


class _Spy:
    """Counts the drop-in's linear_logprobs calls (and the stats each asked for)."""

    def __init__(self, monkeypatch):
        self.stats = []
        real = ours.linear_logprobs

        def spy(*args, **kwargs):
            self.stats.append(tuple(kwargs.get("stats") or ()))
            return real(*args, **kwargs)

        monkeypatch.setattr(ours, "linear_logprobs", spy)


def _trap_trl(monkeypatch):
    """TRL's own function raises when called: a pass means the drop-in served every call."""
    def trap(*args, **kwargs):
        raise AssertionError("TRL's own _ChunkedLogProbFunction ran: the drop-in fell back")

    monkeypatch.setattr(TRL_FUNCTION, "apply", staticmethod(trap))


# --------------------------------------------------------------------------------------------
# the function: ours against TRL's and the float64 reference
# --------------------------------------------------------------------------------------------
def _reference(hidden, weight, bias, targets, temperature, logit_scale):
    """The float64 outputs and the gradients of hidden, weight, bias of a fixed sum of
    log_probs and entropy."""
    h, w, b = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    out = reference.linear_logprobs_stats(h, w, targets, b, temperature=temperature / logit_scale,
                                          return_entropy=True)
    return out, (h, w, b)


def _loss(logp, entropy):
    weights = torch.linspace(-1.0, 2.0, logp.numel(), dtype=torch.float64)
    return (logp.double() * weights).sum() + (entropy.double() * weights.flip(0)).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropin_matches_trl_and_the_reference(dtype, monkeypatch):
    """Every output and the gradients of log_probs / entropy: ours within the 2x rule of the
    float64 reference, TRL's own being the same-dtype computation; is_top1 equal to TRL's where
    the top two logits are apart by more than the dtype's rounding; only log_probs and entropy
    carry a gradient."""
    n, h_dim, vocab, temperature, logit_scale = 37, 16, 1031, 0.7, 1.3
    hidden = torch.randn(n, h_dim).to(dtype)
    weight = (torch.randn(vocab, h_dim) * 0.5).to(dtype)
    bias = (torch.randn(vocab) * 0.3).to(dtype)
    logits64 = (hidden.double() @ weight.double().t() + bias.double()) * logit_scale
    targets = torch.randint(0, vocab, (n,))
    targets[::3] = logits64.argmax(-1)[::3]  # is_top1 True on a third of the rows

    def run(function):
        params = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        out = function.apply(*params[:2], params[2], targets, temperature, 256, None,
                             logit_scale, ALL)
        grads = torch.autograd.grad(_loss(out[0], out[1]), params)
        return out, grads

    spy = _Spy(monkeypatch)
    ours_out, ours_grads = run(ours.ChunkedLogProbFunction)
    assert spy.stats == [STATS]  # our kernel, not TRL's
    trl_out, trl_grads = run(TRL_FUNCTION)
    ref_out, params64 = _reference(hidden, weight, bias, targets, temperature, logit_scale)
    grads64 = torch.autograd.grad(_loss(ref_out[0], ref_out[1]), params64)
    scale = max(1.0, logits64.abs().max().item() / temperature)
    for name, o, t, r in zip(ALL[:4], ours_out, trl_out, ref_out):
        assert o.dtype == t.dtype == torch.float32 and o.shape == (n,), name
        assert_close_2x(o, t, r, dtype, atol_scale=scale, name=name)
    for name, o in zip(ALL, ours_out):
        assert o.requires_grad == (name in ("log_probs", "entropy")), name
    assert ours_out[4].dtype == torch.bool
    top2 = logits64.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 8 * torch.finfo(dtype).eps * scale * temperature
    assert torch.equal(ours_out[4][clear], trl_out[4][clear])
    assert torch.equal(ours_out[4][clear], ref_out[4][clear])
    assert ours_out[4].sum() >= n // 4
    for name, g, t, g64 in zip(("hidden", "weight", "bias"), ours_grads, trl_grads, grads64):
        assert g.dtype == dtype, name
        assert_close_2x(g, t, g64, dtype, atol_scale=max(1.0, g64.abs().max().item()) * scale,
                        name=f"d {name}")


@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "is_top1"),
                                     ("log_probs", "entropy", "mean_logits"),
                                     ("log_probs", "log_sum_sq_probs")], ids=str)
def test_outputs_not_asked_for_are_none_as_trl(outputs):
    hidden, weight = torch.randn(9, 8), torch.randn(50, 8)
    targets = torch.randint(0, 50, (9,))
    ours_out = ours.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 16, None,
                                                 1.0, outputs)
    trl_out = TRL_FUNCTION.apply(hidden, weight, None, targets, 1.0, 16, None, 1.0, outputs)
    assert [o is None for o in ours_out] == [t is None for t in trl_out]
    assert [name for name, o in zip(ALL, ours_out) if o is not None] == list(outputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_is_top1_ties_as_trl(dtype):
    """Integer hidden states and weights: exact logits with ties at the maximum. The target is
    top-1 at the first maximum only, in ours as in TRL's."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randint(-2, 3, (31, 4), generator=gen).to(dtype)
    weight = torch.randint(-2, 3, (45, 4), generator=gen)
    weight[25:] = weight[:20]
    weight = weight.to(dtype)
    logits = hidden.double() @ weight.double().t()
    is_max = logits == logits.amax(-1, keepdim=True)
    index = torch.arange(45)
    first = torch.where(is_max, index, 45).amin(-1)
    last = torch.where(is_max, index, -1).amax(-1)
    assert (first != last).sum() >= 10
    targets = torch.where(torch.arange(31) % 2 == 0, first, last)
    got = ours.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 0.8, 16, None, 1.0,
                                            ("log_probs", "is_top1"))[4]
    trl_got = TRL_FUNCTION.apply(hidden, weight, None, targets, 0.8, 16, None, 1.0,
                                 ("log_probs", "is_top1"))[4]
    assert torch.equal(got, targets == first)
    assert torch.equal(got, trl_got)


def test_softcapping_without_adapter_stays_trls(monkeypatch):
    """Gemma 2's final_logit_softcapping is not in linear_logprobs: TRL's function computes it,
    every output included."""
    spy = _Spy(monkeypatch)
    hidden, weight = torch.randn(6, 8), torch.randn(40, 8)
    targets = torch.randint(0, 40, (6,))
    got = ours.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 16, 5.0, 1.0, ALL)
    expected = TRL_FUNCTION.apply(hidden, weight, None, targets, 1.0, 16, 5.0, 1.0, ALL)
    assert spy.stats == []
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


# --------------------------------------------------------------------------------------------
# a PEFT adapter on lm_head: every output, against the model's own logits
# --------------------------------------------------------------------------------------------
VOCAB = 64


def _qwen(seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_every_output_with_an_adapter_on_lm_head(variant, monkeypatch):
    """TRL's own head would ignore the adapter; ours includes it in all five outputs: equal to
    the statistics of the adapted model's own logits (plain LoRA through linear_logprobs' LoRA
    inputs, DoRA through the head module)."""
    from peft import LoraConfig, get_peft_model

    model = _qwen(2)
    input_ids = torch.randint(4, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with ours.patch_trl():
        ours.add_fused_lm_head(model, temperature=0.7, outputs=ALL)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"],
                        init_lora_weights=False, use_dora=variant == "dora")
    model = get_peft_model(model, config)
    spy = _Spy(monkeypatch)
    with ours.patch_trl():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                    fused_lm_head=True)
    assert spy.stats == ([STATS] if variant == "lora" else [])
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    logp = (logits.double() / 0.7).log_softmax(-1)
    expected_logp = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    expected_entropy = -(logp.exp() * logp).sum(-1)
    log_sum_sq, mean, is_top1 = reference.logprob_stats(logits.double(), targets, 0.7)
    got = (out.log_probs, out.entropy, out.log_sum_sq_probs, out.mean_logits)
    for name, g, e in zip(ALL, got, (expected_logp, expected_entropy, log_sum_sq, mean)):
        torch.testing.assert_close(g[keep].double(), e[keep], rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{variant} {name}: {m}")
        assert not g[~keep].any(), name
    assert torch.equal(out.is_top1, is_top1)
    assert out.log_probs.requires_grad and not out.mean_logits.requires_grad


def test_adapter_on_lm_head_at_infinite_temperature_is_trls_division():
    """TRL's head multiplies the logits by 1 / temperature whatever it is; at temperature inf
    the distribution is uniform (logp -log V, entropy log V, log sum p^2 -log V, mean logit 0).
    With a plain LoRA adapter on lm_head the drop-in raised the op's ValueError instead."""
    from peft import LoraConfig, get_peft_model

    model = _qwen(1)
    input_ids = torch.randint(4, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    with ours.patch_trl():
        ours.add_fused_lm_head(model, temperature=float("inf"), outputs=ALL)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"],
                                             init_lora_weights=False))
    with ours.patch_trl():
        out = model(input_ids=input_ids, labels=input_ids, fused_lm_head=True)
    log_v = math.log(VOCAB)
    for got, expected in ((out.log_probs, -log_v), (out.entropy, log_v),
                          (out.log_sum_sq_probs, -log_v), (out.mean_logits, 0.0)):
        torch.testing.assert_close(got, torch.full_like(got, expected))
    out.log_probs.sum().backward()  # differentiable, as TRL's (a zero gradient here)


def test_a_deep_copy_of_the_model_scores_with_its_own_weights():
    """TRL binds its fused forward to the model, so copy.deepcopy(model) (e.g. a reference model
    copied from the policy) scores with the copy's backbone and head. The drop-in's forward was a
    closure over the original model: the copy silently returned the original's log-probs."""
    model = _qwen(3)
    with ours.patch_trl():
        ours.add_fused_lm_head(model, temperature=0.9)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(-2.0)
        twin.model.norm.weight.add_(0.5)
    input_ids = torch.randint(4, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    with ours.patch_trl(), torch.no_grad():
        got = twin(input_ids=input_ids, labels=input_ids, fused_lm_head=True).log_probs
        hidden = twin.model(input_ids=input_ids).last_hidden_state[:, :-1].double()
    logp = (hidden @ twin.lm_head.weight.double().T / 0.9).log_softmax(-1)
    expected = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# one real training step: SFTTrainer, DPOTrainer, KTOTrainer, TRL's head against ours
# --------------------------------------------------------------------------------------------
WORDS = "the movie was great and the acting was bad but the plot was fine".split()


def _text(start: int, count: int) -> str:
    return " ".join(WORDS[(start + j) % len(WORDS)] for j in range(count))


def _repeated(i: int) -> str:
    """A completion that repeats a word: the tiny model below predicts the current token, so
    some targets are its top-1 and the accuracy metrics are not all 0."""
    return " " + " ".join([WORDS[i]] * (2 + i)) + " " + _text(i + 5, 2)


@pytest.fixture(scope="module")
def tokenizer():
    from tests.helpers import rl_tokenizer

    return rl_tokenizer()


def _model(tokenizer):
    """tests/helpers.tiny_llama with lm_head = 8 x the input embeddings: the next-token
    argmax is often the current token."""
    from tests.helpers import tiny_llama

    with torch.random.fork_rng(devices=[]):
        model = tiny_llama(tokenizer)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight * 8)
    return model


def _args(config_cls, **overrides):
    settings = dict(output_dir=tempfile.mkdtemp(prefix="trl_fused_head_test_"), use_cpu=True,
                    report_to=[], max_steps=1, logging_steps=1, save_strategy="no",
                    learning_rate=0.5, optim="sgd", bf16=False, seed=0,
                    per_device_train_batch_size=4)
    settings.update(overrides)
    return config_cls(**settings)


def _datasets():
    from datasets import Dataset

    prompts = [_text(i, 3) for i in range(4)]
    return {
        "sft": Dataset.from_dict({"prompt": prompts,
                                  "completion": [_repeated(i) for i in range(4)]}),
        "dpo": Dataset.from_dict({"prompt": prompts,
                                  "chosen": [_repeated(i) for i in range(4)],
                                  "rejected": [" " + _text(i + 2, 4 - i % 3) for i in range(4)]}),
        "kto": Dataset.from_dict({"prompt": prompts,
                                  "completion": [_repeated(i) for i in range(4)],
                                  "label": [True, False, True, False]}),
    }


def _train_one_step(kind, tokenizer, patched):
    """-> (the logged metrics of the step, the updated weights)."""
    model = _model(tokenizer)
    dataset = _datasets()[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch = ours.patch_trl() if patched else None
        try:
            if kind == "sft":
                trainer = trl.SFTTrainer(model=model, args=_args(trl.SFTConfig),
                                         train_dataset=dataset, processing_class=tokenizer)
            elif kind == "dpo":
                trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model),
                                         args=_args(trl.DPOConfig, use_weighting=True),
                                         train_dataset=dataset, processing_class=tokenizer)
            else:
                trainer = trl.KTOTrainer(model=model, ref_model=copy.deepcopy(model),
                                         args=_args(trl.KTOConfig), train_dataset=dataset,
                                         processing_class=tokenizer)
            trainer.train()
        finally:
            if patch is not None:
                patch.undo()
    metrics = dict(trainer.state.log_history[0])
    return metrics, {n: p.detach().clone() for n, p in model.named_parameters()}


# the stats each trainer's policy head asks for (its reference model: log_probs alone)
_TRAINER_STATS = {"sft": {("is_top1",)},
                  "dpo": {("log_sum_sq_probs", "mean_logits", "is_top1"), ()},
                  "kto": {("mean_logits",), ()}}
_METRICS = {"sft": ("loss", "grad_norm", "entropy", "mean_token_accuracy"),
            "dpo": ("loss", "grad_norm", "entropy", "mean_token_accuracy", "logits/chosen",
                    "logits/rejected", "logps/chosen", "logps/rejected"),
            "kto": ("loss", "grad_norm", "entropy", "logits/chosen", "logits/rejected",
                    "logps/chosen", "logps/rejected", "kl")}


@pytest.mark.parametrize("kind", ["sft", "dpo", "kto"])
def test_one_training_step_matches_trl(kind, tokenizer, monkeypatch):
    """One SGD step (lr 0.5, so the weights move by half the gradient) with TRL's fused head,
    then under patch_trl with ours: the same loss, metrics (entropy, mean_token_accuracy from
    is_top1, logits/* from mean_logits; DPO's WPO weights from log_sum_sq_probs), gradient norm
    and updated weights within fp32 rounding; every fused-head call of the patched step went
    through linear_logprobs with the statistics the trainer asks for."""
    expected, weights = _train_one_step(kind, tokenizer, patched=False)
    spy = _Spy(monkeypatch)
    _trap_trl(monkeypatch)
    got, got_weights = _train_one_step(kind, tokenizer, patched=True)
    assert spy.stats and set(spy.stats) == _TRAINER_STATS[kind], spy.stats
    for name in _METRICS[kind]:
        assert name in got, (name, sorted(got))
        assert got[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    if kind == "sft":
        assert got["mean_token_accuracy"] > 0
    for name, w in weights.items():
        torch.testing.assert_close(got_weights[name], w, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{kind} {name}: {m}")
    moved = max((got_weights[n] - _model(tokenizer).state_dict()[n]).abs().max().item()
                for n in weights)
    assert moved > 1e-4  # the step did train


# --------------------------------------------------------------------------------------------
# SFTTrainer / DPOTrainer / KTOTrainer with a PEFT adapter on lm_head (TRL refuses it)
# --------------------------------------------------------------------------------------------
def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                      init_lora_weights=False)


def _build(kind, tokenizer, **kwargs):
    dataset = _datasets()[kind]
    model = _model(tokenizer)
    if kind == "sft":
        return trl.SFTTrainer(model=model, args=_args(trl.SFTConfig), train_dataset=dataset,
                              processing_class=tokenizer, **kwargs)
    if kind == "dpo":
        return trl.DPOTrainer(model=model, args=_args(trl.DPOConfig, use_weighting=True),
                              train_dataset=dataset, processing_class=tokenizer, **kwargs)
    return trl.KTOTrainer(model=model, args=_args(trl.KTOConfig), train_dataset=dataset,
                          processing_class=tokenizer, **kwargs)


def test_sft_with_lora_on_lm_head_is_the_models_own_loss(tokenizer, monkeypatch):
    """Under patch_trl SFTTrainer takes a LoRA adapter on lm_head (TRL refuses it): its loss,
    entropy and mean_token_accuracy (from is_top1) are those of the adapted model's own logits,
    and so are the gradients of every adapter weight, lm_head's included."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="lm_head"):
            _build("sft", tokenizer, peft_config=_lora_config())
        with ours.patch_trl():
            trainer = _build("sft", tokenizer, peft_config=_lora_config())
    model = trainer.model
    model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lm_head" in n for n in names)
    spy = _Spy(monkeypatch)
    with ours.patch_trl():
        loss = trainer.compute_loss(model, dict(inputs))
        grads = torch.autograd.grad(loss, params)
    assert spy.stats == [("is_top1",)]  # plain LoRA: through linear_logprobs
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[:, :-1].double()
    targets = inputs["labels"][:, 1:]
    keep = targets != -100
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)[keep]
    expected_loss = nll.mean()
    entropy = -(logp.exp() * logp).sum(-1)[keep].mean()
    accuracy = (logits.argmax(-1) == targets)[keep].double().mean()
    expected_grads = torch.autograd.grad(expected_loss, params)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    assert metrics["entropy"] == pytest.approx(entropy.item(), rel=1e-5)
    assert metrics["mean_token_accuracy"] == pytest.approx(accuracy.item(), abs=1e-6)
    assert accuracy > 0
    for name, g, e in zip(names, grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"d {name}: {m}")
        assert g.abs().sum() > 0, name


def test_kto_takes_a_lora_on_lm_head(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="lm_head"):
            _build("kto", tokenizer, peft_config=_lora_config())
        with ours.patch_trl():
            trainer = _build("kto", tokenizer, peft_config=_lora_config())
    assert any("lm_head.lora_A" in n for n, _ in trainer.model.named_parameters())


def test_dpo_trains_a_lora_on_lm_head(tokenizer, monkeypatch):
    """DPOTrainer (its reference: the adapter switched off) takes a LoRA adapter on lm_head
    under patch_trl and trains it: one step moves lm_head's lora_A / lora_B, every fused-head
    call through linear_logprobs (the outputs' values with an adapter:
    test_every_output_with_an_adapter_on_lm_head). KTOTrainer's step is the same path."""
    kind = "dpo"
    spy = _Spy(monkeypatch)
    _trap_trl(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ours.patch_trl():
            trainer = _build(kind, tokenizer, peft_config=_lora_config())
            before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                      if p.requires_grad and "lm_head" in n}
            trainer.train()
    # (the reference pass: the same model with the adapter off, so the policy's outputs)
    assert len(before) == 2 and spy.stats and set(spy.stats) <= _TRAINER_STATS[kind]
    after = dict(trainer.model.named_parameters())
    for name, value in before.items():
        assert (after[name].detach() - value).abs().max() > 1e-5, name
    assert all(torch.isfinite(torch.tensor(v)) for k, v in trainer.state.log_history[0].items()
               if isinstance(v, float))
