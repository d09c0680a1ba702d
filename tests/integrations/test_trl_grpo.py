"""patch_trl() on TRL's GRPOTrainer: the fused lm head and the GRPO loss against TRL's own.

A tiny random Qwen2 (vocabulary 64, hidden 32, 2 layers), a word-level tokenizer built here and
a reward function in Python: nothing is downloaded. One trainer generates one batch; the loss of
that batch (values, gradients of every parameter, logged metrics) is computed by TRL 1.16's own
``GRPOTrainer._compute_loss`` with its own fused lm head, then under ``patch_trl()`` by ours, for
every covered loss type, both importance-sampling levels and the KL variants. The batch is made
off-policy (old and reference log-probs moved away from the current ones) and padded, so that
clipping, the dual clip, the sequence ratio and every normaliser matter. A PEFT adapter on
lm_head, which TRL refuses, is checked against the model's own (unfused) forward, in a
GRPOTrainer and an RLOOTrainer (which shares the fused head; its loss stays TRL's). Two full
``trainer.train()`` steps (patched and unpatched, same seed) close the file.
"""

from __future__ import annotations

import copy
import math
import tempfile
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")

from rlhf_kernels.integrations import original  # noqa: E402
from rlhf_kernels.integrations import trl as ours  # noqa: E402
from tests.numerics import assert_close_2x  # noqa: E402

VOCAB, PROMPTS, GENERATIONS, COMPLETION = 64, 2, 4, 6

# TRL's own trainer code asks transformers 5 for the deprecated checkpointing names
pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_disable` is deprecated"),
]


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "triton")


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    # special tokens no word contains (added tokens are split out of words)
    special = ("<pad>", "<eos>", "<bos>", "<unk>")
    words = dict(zip(special, range(4))) | {f"w{i}": i for i in range(4, VOCAB)}
    tokenizer = Tokenizer(WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                   eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")


def _model(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
                         eos_token_id=1, bos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config)


def _dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [" ".join(f"w{i}" for i in range(4 + k, 9 + k))
                                         for k in range(PROMPTS * 2)]})


def _reward(completions, **kwargs):
    """Any number that varies between completions: the count of even token ids."""
    return [float(sum(w.startswith("w") and int(w[1:]) % 2 == 0 for w in c.split()))
            for c in completions]


def _config(**overrides):
    settings = dict(output_dir=tempfile.mkdtemp(prefix="trl_grpo_test_"), use_cpu=True,
                    report_to=[], per_device_train_batch_size=PROMPTS * GENERATIONS // 2,
                    num_generations=GENERATIONS, max_completion_length=COMPLETION, max_steps=1,
                    logging_steps=1, save_strategy="no", learning_rate=0.5, optim="sgd",
                    beta=0.0, bf16=False, seed=0, disable_dropout=True,
                    gradient_checkpointing=False)
    settings.update(overrides)
    return trl.GRPOConfig(**settings)


def _trainer(model, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trl.GRPOTrainer(model=model, reward_funcs=_reward, args=_config(**overrides),
                               train_dataset=_dataset(), processing_class=_tokenizer())


def _off_policy_batch(trainer):
    """One generated batch, padded (a full row, short rows, an empty row) and off-policy: old
    and reference log-probs are the current ones moved by N(0, 0.35) per token."""
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        inputs = trainer._generate_and_score_completions(batch)
    mask = inputs["completion_mask"].clone()
    lengths = [COMPLETION, 3, 1, 0][: mask.shape[0]]
    for row, length in enumerate(lengths):
        mask[row, length:] = 0
    inputs["completion_mask"] = mask
    inputs["num_items_in_batch"] = mask.sum() * 2  # the generation batch: two micro-batches
    full = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], mask], 1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, full, attention, COMPLETION)
    generator = torch.Generator().manual_seed(7)
    inputs["old_per_token_logps"] = logps + 0.35 * torch.randn(logps.shape, generator=generator)
    inputs["ref_per_token_logps"] = logps + 0.35 * torch.randn(logps.shape, generator=generator)
    inputs["advantages"] = torch.tensor([1.3, -0.7, 0.4, -1.1])[: mask.shape[0]]
    return inputs


@pytest.fixture(scope="module")
def grpo():
    """(trainer, off-policy batch) shared by the loss tests; each test sets the options."""
    trainer = _trainer(_model())
    inputs = _off_policy_batch(trainer)
    trainer.current_gradient_accumulation_steps = 2  # TRL divides the loss by it
    trainer.args.steps_per_generation = 2  # and the dapo / cispo normaliser by this
    return trainer, inputs


def _set(trainer, loss_type, level, kl, delta=None, epsilon_high=0.28):
    trainer.loss_type = loss_type
    trainer.importance_sampling_level = level
    trainer.beta = 0.0 if kl is None else 0.05
    trainer.args.use_bias_correction_kl = kl == "k3-weighted"
    trainer.args.delta = delta
    trainer.epsilon_low = 0.2
    trainer.epsilon_high = 1.3 if loss_type == "cispo" else epsilon_high
    # not TRL's defaults (1.0, 1.05): a swap of the two would show
    trainer.args.sapo_temperature_pos, trainer.args.sapo_temperature_neg = 1.3, 2.5
    # VESPO's gamma weights: not TRL's defaults (2, 3, 3, 2) either
    trainer.args.vespo_k_pos, trainer.args.vespo_lambda_pos = 1.5, 2.5
    trainer.args.vespo_k_neg, trainer.args.vespo_lambda_neg = 2.5, 1.5


def _run(trainer, inputs, patched: bool, params=None):
    """(loss, gradients of ``params`` (default: every trainable parameter), metrics logged)."""
    trainer._metrics["train"].clear()
    trainer._metrics["eval"].clear()
    if params is None:
        params = [p for p in trainer.model.parameters() if p.requires_grad]
    if patched:
        with ours.patch_trl():
            assert grpo_trainer.GRPOTrainer._compute_loss is ours.grpo_compute_loss
            loss = trainer._compute_loss(trainer.model, inputs)
    else:
        loss = original(ours._GRPO, "GRPOTrainer._compute_loss")(trainer, trainer.model, inputs)
    grads = torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad else ()
    mode = "train" if trainer.model.training else "eval"
    metrics = {k: list(v) for k, v in trainer._metrics[mode].items()}
    return loss.detach(), grads, metrics


class _FixedLogps:
    """Stands for the trainer's forward: the same leaf log-probs / entropies every call, so the
    loss tests differentiate the loss alone (the fused head is tested on the model below)."""

    def __init__(self, inputs):
        generator = torch.Generator().manual_seed(11)
        shape = inputs["completion_ids"].shape
        # per-row shifts put whole sequences past the clip (row 0, A > 0) and the dual clip
        # (row 1, A < 0), for the sequence-level ratio
        shift = torch.tensor([0.5, 0.5, -0.1, 0.0])[: shape[0], None]
        noise = 0.3 * torch.randn(shape, generator=generator)
        self.logps = (inputs["old_per_token_logps"] + shift + noise).requires_grad_(True)
        self.entropies = torch.rand(shape, generator=generator) * 3

    def __call__(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        return self.logps, self.entropies, None


def _assert_same(ours_run, trl_run, name):
    (loss, grads, metrics), (loss_t, grads_t, metrics_t) = ours_run, trl_run
    torch.testing.assert_close(loss, loss_t, rtol=1e-5, atol=1e-7, equal_nan=True,
                               msg=lambda m: f"{name} loss: {m}")
    assert len(grads) == len(grads_t)
    for i, (g, g_t) in enumerate(zip(grads, grads_t)):
        if g_t is None:
            assert g is None or not g.any(), f"{name}: parameter {i} has a gradient only in ours"
            continue
        torch.testing.assert_close(g, g_t, rtol=1e-4, atol=1e-6, equal_nan=True,
                                   msg=lambda m, i=i: f"{name} grad of parameter {i}: {m}")
    assert list(metrics) == list(metrics_t), f"{name}: metrics {list(metrics)} != TRL's"
    for key in metrics_t:
        torch.testing.assert_close(torch.tensor(metrics[key]), torch.tensor(metrics_t[key]),
                                   rtol=1e-5, atol=1e-6, equal_nan=True,
                                   msg=lambda m, key=key: f"{name} metric {key}: {m}")


@pytest.fixture
def fixed_logps(grpo, monkeypatch):
    trainer, inputs = grpo
    forward = _FixedLogps(inputs)
    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", forward)
    return trainer, inputs, forward.logps


@pytest.mark.parametrize("kl", [None, "k3", "k3-weighted"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ours.GRPO_LOSS_TYPES)
def test_grpo_loss_matches_trl(fixed_logps, loss_type, level, kl):
    """Same loss, gradient and metrics as TRL's _compute_loss on the same log-probs: every
    covered loss type, both importance-sampling levels, no KL / k3 / k3 weighted by the ratio
    (use_bias_correction_kl). bnpo and dr_grpo run with delta (TRL's two-sided clip = our dual
    clip)."""
    trainer, inputs, logps = fixed_logps
    _set(trainer, loss_type, level, kl, delta=1.4 if loss_type in ("bnpo", "dr_grpo") else None)
    assert ours.grpo_loss_fallback_reason(trainer, inputs) is None
    theirs = _run(trainer, inputs, patched=False, params=[logps])
    mine = _run(trainer, inputs, patched=True, params=[logps])
    _assert_same(mine, theirs, f"{loss_type}/{level}/{kl}")
    assert theirs[0].abs() > 1e-4  # off-policy: the loss is not the on-policy ~0
    if loss_type not in ("cispo", "sapo", "vespo"):  # the batch reaches both sides of the clip
        assert 0 < theirs[2]["clip_ratio/region_mean"][0] < 1


def test_grpo_clip_metrics_with_delta_at_one_plus_epsilon_high(fixed_logps):
    """delta = 1 + epsilon_high (the smallest delta the drop-in covers): TRL counts the clips on
    the ratio already clamped at delta, so a ratio above delta is not 'high clipped' there; the
    drop-in once counted it on the unclamped ratio (clip_ratio/high_* off by up to 0.5)."""
    trainer, inputs, logps = fixed_logps
    _set(trainer, "bnpo", "token", None, delta=1.28, epsilon_high=0.28)
    assert ours.grpo_loss_fallback_reason(trainer, inputs) is None
    theirs = _run(trainer, inputs, patched=False, params=[logps])
    _assert_same(_run(trainer, inputs, patched=True, params=[logps]), theirs, "delta=1.28")


def test_grpo_loss_per_token_advantages_and_eval_mode(fixed_logps):
    """(B, T) advantages (TRL subclasses may give them), and eval mode (no accumulation)."""
    trainer, inputs, logps = fixed_logps
    _set(trainer, "grpo", "sequence", "k3")
    per_token = dict(inputs)
    generator = torch.Generator().manual_seed(3)
    per_token["advantages"] = torch.randn(inputs["completion_ids"].shape, generator=generator)
    _assert_same(_run(trainer, per_token, True, [logps]), _run(trainer, per_token, False, [logps]),
                 "(B, T) advantages")
    trainer.model.eval()
    try:
        _set(trainer, "dapo", "token", "k3-weighted")
        _assert_same(_run(trainer, inputs, True, [logps]), _run(trainer, inputs, False, [logps]),
                     "eval mode")
    finally:
        trainer.model.train()


def test_grpo_loss_through_the_model(grpo):
    """The whole _compute_loss on the model: TRL's fused head and loss against ours (the fused
    head by linear_logprobs, the loss by ppo_policy_loss), gradients of every parameter."""
    trainer, inputs = grpo
    _set(trainer, "dr_grpo", "sequence", "k3-weighted", delta=1.4)
    _assert_same(_run(trainer, inputs, True), _run(trainer, inputs, False), "model")


def _vllm_ratio(inputs, per_row: bool):
    """A vLLM importance-sampling ratio as TRL's truncate/mask modes leave it: >= 0, some
    exactly 0 (masked), others below and above 1; (B, 1) for the sequence modes."""
    rows, length = inputs["completion_ids"].shape
    generator = torch.Generator().manual_seed(5)
    ratio = 2.0 * torch.rand((rows, 1 if per_row else length), generator=generator)
    ratio[0, 0] = 0.0
    return ratio


# the per-token weights TRL multiplies its policy term by, alone and together
_WEIGHTS = {
    "vllm_is_token": dict(vllm="token"),
    "vllm_is_sequence": dict(vllm="sequence"),
    "off_policy_mask": dict(off_policy=0.05),
    "entropy_mask": dict(entropy_quantile=0.5),
    "all": dict(vllm="token", off_policy=0.05, entropy_quantile=0.5),
}


@pytest.mark.parametrize("weights", list(_WEIGHTS))
@pytest.mark.parametrize("loss_type,level,kl", [
    ("dapo", "token", None), ("grpo", "sequence", "k3"), ("bnpo", "token", "k3-weighted"),
    ("luspo", "sequence", None), ("cispo", "token", "k3"), ("dr_grpo", "sequence", None),
    ("sapo", "token", "k3-weighted"), ("sapo", "sequence", None), ("vespo", "token", "k3"),
    ("vespo", "sequence", "k3-weighted")])
def test_grpo_loss_with_policy_weights_matches_trl(fixed_logps, monkeypatch, weights, loss_type,
                                                   level, kl):
    """vLLM's importance-sampling correction (TRL's default with use_vllm), the off-policy
    sequence mask and the high-entropy token mask: same loss, gradient and metrics as TRL's
    _compute_loss, and each weight changes the loss (it is not silently dropped)."""
    trainer, inputs, logps = fixed_logps
    _set(trainer, loss_type, level, kl)
    option = _WEIGHTS[weights]
    inputs = dict(inputs)
    if "vllm" in option:
        monkeypatch.setattr(trainer, "use_vllm", True)
        monkeypatch.setattr(trainer, "vllm_importance_sampling_correction", True)
        inputs["importance_sampling_ratio"] = _vllm_ratio(inputs, option["vllm"] == "sequence")
    if "off_policy" in option:
        monkeypatch.setattr(trainer, "off_policy_mask_threshold", option["off_policy"])
        # the inference engine's log-probs, above the current ones: row 1 (A < 0) drifts past
        # the threshold and is dropped, the A > 0 rows are kept whatever their drift
        inputs["sampling_per_token_logps"] = logps.detach() + 0.8
        keep = trainer.get_off_policy_mask(
            inputs["advantages"].unsqueeze(1), logps, inputs["sampling_per_token_logps"],
            inputs["completion_mask"], option["off_policy"])
        assert keep[1].item() == 0 and keep[0].item() == 1
    if "entropy_quantile" in option:
        monkeypatch.setattr(trainer, "top_entropy_quantile", option["entropy_quantile"])
    assert ours.grpo_loss_fallback_reason(trainer, inputs) is None
    theirs = _run(trainer, inputs, patched=False, params=[logps])
    _assert_same(_run(trainer, inputs, patched=True, params=[logps]), theirs,
                 f"{weights}/{loss_type}/{level}/{kl}")
    monkeypatch.undo()
    _set(trainer, loss_type, level, kl)
    unweighted = _run(trainer, inputs, patched=False, params=[logps])
    assert not torch.allclose(theirs[0], unweighted[0]), f"{weights} did not change the loss"


@pytest.mark.parametrize("loss_type,level,kl", [
    ("grpo", "sequence", "k3-weighted"), ("bnpo", "token", "k3"), ("dapo", "sequence", None),
    ("luspo", "token", "k3"), ("cispo", "sequence", "k3-weighted"), ("sapo", "token", None),
    ("vespo", "token", "k3")])
def test_grpo_loss_with_tool_mask_and_aux_loss_matches_trl(fixed_logps, monkeypatch, loss_type,
                                                           level, kl):
    """A tool mask (tool-call tokens out of the loss: TRL's mask is completion_mask x
    tool_mask) and a MoE model's router auxiliary loss (added times router_aux_loss_coef over
    the accumulation steps, logged as aux_loss): TRL's loss, gradients (to the auxiliary loss
    too) and metrics; each changes the loss."""
    trainer, inputs, logps = fixed_logps
    _set(trainer, loss_type, level, kl)
    generator = torch.Generator().manual_seed(9)
    tool_mask = (torch.rand(inputs["completion_ids"].shape, generator=generator) > 0.3).long()
    with_tool = dict(inputs, tool_mask=tool_mask)
    assert ours.grpo_loss_fallback_reason(trainer, with_tool) is None
    theirs = _run(trainer, with_tool, patched=False, params=[logps])
    _assert_same(_run(trainer, with_tool, patched=True, params=[logps]), theirs, "tool mask")
    assert not torch.allclose(theirs[0], _run(trainer, inputs, patched=False, params=[logps])[0])
    aux = torch.tensor(0.37, requires_grad=True)
    forward = trainer._get_per_token_logps_and_entropies
    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies",
                        lambda *args, **kwargs: (forward.logps, forward.entropies, aux))
    monkeypatch.setattr(trainer, "aux_loss_enabled", True)
    monkeypatch.setattr(trainer, "router_aux_loss_coef", 0.01)
    theirs_aux = _run(trainer, inputs, patched=False, params=[logps, aux])
    _assert_same(_run(trainer, inputs, patched=True, params=[logps, aux]), theirs_aux, "aux")
    assert theirs_aux[2]["aux_loss"] == [pytest.approx(0.37)]
    assert theirs_aux[1][1] == pytest.approx(0.01 / 2)  # coefficient / accumulation steps


def test_grpo_luspo_is_the_row_sum(fixed_logps):
    """luspo: the mean over rows of each row's token sum (no division by the row's length), the
    clipped sequence-level ratio of LUSPO; a closed form on the op's own numbers."""
    trainer, inputs, logps = fixed_logps
    _set(trainer, "luspo", "sequence", None)
    mask = inputs["completion_mask"].float()
    loss, _, _ = _run(trainer, inputs, patched=True, params=[logps])
    old, advantages = inputs["old_per_token_logps"], inputs["advantages"]
    ratio = torch.exp(((logps.detach() - old) * mask).sum(-1) / mask.sum(-1).clamp(min=1))
    per_row = -torch.min(ratio * advantages, ratio.clamp(0.8, 1.28) * advantages)
    expected = (per_row * mask.sum(-1)).sum() / (mask.shape[0] * 2)  # accumulation steps 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("option", ["sapo_negative_temperature", "low_delta",
                                    "ratio_of_another_shape", "infinite_beta"])
def test_grpo_options_not_covered_run_trls_code(fixed_logps, monkeypatch, option):
    """Options the drop-in does not cover give a reason and TRL's own numbers."""
    trainer, inputs, logps = fixed_logps
    _set(trainer, "dapo", "token", None)
    inputs = dict(inputs)
    if option == "sapo_negative_temperature":  # TRL computes it; the op takes tau > 0 only
        trainer.loss_type = "sapo"
        monkeypatch.setattr(trainer.args, "sapo_temperature_neg", -1.0)
    elif option == "ratio_of_another_shape":  # e.g. a subclass's (T,) ratio: TRL's broadcast
        monkeypatch.setattr(trainer, "use_vllm", True)
        monkeypatch.setattr(trainer, "vllm_importance_sampling_correction", True)
        inputs["importance_sampling_ratio"] = _vllm_ratio(inputs, False)[0]
    elif option == "infinite_beta":  # TRL's loss is NaN; the op refused kl_coef=inf
        monkeypatch.setattr(trainer, "beta", float("inf"))
    else:
        trainer.args.delta = 1.1  # below 1 + epsilon_high: not the dual clip
    assert ours.grpo_loss_fallback_reason(trainer, inputs) is not None
    _assert_same(_run(trainer, inputs, True, [logps]), _run(trainer, inputs, False, [logps]),
                 option)


def test_grpo_vespo_is_the_gamma_weighted_reinforce_term(fixed_logps):
    """vespo: -phi(w) A logp per token, phi(w) = exp(lambda + k log w - lambda w) of the row's
    summed log-ratio w (k, lambda by the sign of A), summed over the valid tokens and divided
    by DAPO's token count; a closed form written out here on the op's own numbers."""
    trainer, inputs, logps = fixed_logps
    _set(trainer, "vespo", "token", None)
    loss, _, metrics = _run(trainer, inputs, patched=True, params=[logps])
    mask = inputs["completion_mask"].float()
    old, advantages = inputs["old_per_token_logps"], inputs["advantages"]
    log_w = (((logps.detach() - old).clamp(-20, 20) * mask).sum(-1)).clamp(math.log(1e-8), 20)
    positive = advantages >= 0
    k = torch.where(positive, 1.5, 2.5)
    lam = torch.where(positive, 2.5, 1.5)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    per_token = -(phi * advantages)[:, None] * logps.detach() * mask
    normalizer = inputs["num_items_in_batch"] * 2 / 2  # accumulation 2, steps_per_generation 2
    torch.testing.assert_close(loss, per_token.sum() / normalizer, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(metrics["vespo/phi_seq_mean"]),
                               phi.mean().reshape(1), rtol=1e-5, atol=1e-7)
    assert float(phi.max() - phi.min()) > 0.5  # the weights differ from row to row


def _entropy_state(trainer):
    return (trainer.entropy_coef, trainer._last_world_entropy,
            None if trainer._entropy_window_stats is None
            else trainer._entropy_window_stats.tolist())


@pytest.mark.parametrize("loss_type,level,kl,quantile", [
    ("grpo", "token", "k3", 1.0), ("dapo", "sequence", "k3-weighted", 0.5),
    ("cispo", "token", None, 1.0), ("luspo", "sequence", "k3", 0.5)])
def test_grpo_entropy_bonus_matches_trl(fixed_logps, monkeypatch, loss_type, level, kl, quantile):
    """TRL's entropy bonus (a static entropy_coef, and the adaptive controller over an
    accumulation window of two calls): the same loss, gradients (through the entropies too),
    metrics (policy_loss, entropy_coef) and controller state as TRL's _compute_loss."""
    trainer, inputs, logps = fixed_logps
    _set(trainer, loss_type, level, kl)
    forward = trainer._get_per_token_logps_and_entropies
    entropies = forward.entropies.requires_grad_(True)
    monkeypatch.setattr(trainer, "top_entropy_quantile", quantile)
    monkeypatch.setattr(trainer, "_entropy_bonus_enabled", True)
    monkeypatch.setattr(trainer, "entropy_coef", 0.07)
    monkeypatch.setattr(trainer, "use_adaptive_entropy", False)
    assert ours.grpo_loss_fallback_reason(trainer, inputs) is None
    theirs = _run(trainer, inputs, patched=False, params=[logps, entropies])
    mine = _run(trainer, inputs, patched=True, params=[logps, entropies])
    _assert_same(mine, theirs, f"static entropy bonus {loss_type}")
    assert "policy_loss" in theirs[2] and theirs[2]["entropy_coef"] == [0.07]
    assert theirs[1][1].abs().max() > 0  # the entropies get a gradient
    # the adaptive controller: the coefficient applies while the last world entropy is at most
    # the target; a window of two micro-batches, the update at its end
    monkeypatch.setattr(trainer, "use_adaptive_entropy", True)
    monkeypatch.setattr(trainer.args, "entropy_target", 1.6)
    monkeypatch.setattr(trainer.args, "entropy_coef_delta", 0.02)
    monkeypatch.setattr(trainer.args, "entropy_coef_min", 0.0)
    monkeypatch.setattr(trainer.args, "entropy_coef_max", 0.5)
    sync = {"value": False}
    monkeypatch.setattr(type(trainer.accelerator), "sync_gradients",
                        property(lambda self: sync["value"]))
    for last_world in (1.2, 2.0):  # below the target: applied; above: not
        for patched in (False, True):
            trainer.entropy_coef, trainer._last_world_entropy = 0.07, last_world
            trainer._entropy_window_stats = None
            runs = []
            for sync["value"] in (False, True):
                runs.append(_run(trainer, inputs, patched=patched, params=[logps, entropies]))
            state = _entropy_state(trainer)
            if not patched:
                theirs_runs, theirs_state = runs, state
        for run, run_t in zip(runs, theirs_runs):
            _assert_same(run, run_t, f"adaptive entropy {loss_type} world={last_world}")
        assert state[:2] == pytest.approx(theirs_state[:2]) and state[2] == theirs_state[2]
        assert theirs_state[0] != 0.07  # the controller moved the coefficient


def test_grpo_sapo_temperatures_reach_the_op(fixed_logps):
    """sapo_temperature_pos applies to the A > 0 tokens and _neg to the others: TRL's numbers
    with the two temperatures and with them swapped (which changes the loss), and the hand
    formula on the op's inputs (seq-mean-token-mean over the rows, / accumulation 2)."""
    trainer, inputs, logps = fixed_logps
    losses = []
    for taus in ((1.3, 2.5), (2.5, 1.3)):
        _set(trainer, "sapo", "token", None)
        trainer.args.sapo_temperature_pos, trainer.args.sapo_temperature_neg = taus
        assert ours.grpo_loss_fallback_reason(trainer, inputs) is None
        mine = _run(trainer, inputs, patched=True, params=[logps])
        _assert_same(mine, _run(trainer, inputs, patched=False, params=[logps]), f"taus {taus}")
        losses.append(mine[0])
        mask = inputs["completion_mask"].float()
        ratio = torch.exp(logps.detach() - inputs["old_per_token_logps"])
        adv = inputs["advantages"][:, None]
        tau = torch.where(adv > 0, taus[0], taus[1])
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
        rows = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        torch.testing.assert_close(mine[0], rows.mean() / 2, rtol=1e-5, atol=1e-7)
        assert list(mine[2]) == ["entropy"]  # TRL logs no clip metric for sapo
    assert not torch.allclose(losses[0], losses[1])


def test_patch_and_unpatch_restore_trl(grpo):
    trainer, _ = grpo
    utils = pytest.importorskip("trl.trainer.utils")
    own = (utils._ChunkedLogProbFunction, utils.add_fused_lm_head,
           grpo_trainer.add_fused_lm_head, grpo_trainer.GRPOTrainer._compute_loss,
           grpo_trainer.GRPOTrainer.__init__)
    ours.patch_trl()
    assert utils._ChunkedLogProbFunction is ours.ChunkedLogProbFunction
    assert grpo_trainer.add_fused_lm_head is ours.add_fused_lm_head
    ours.unpatch_trl()
    assert (utils._ChunkedLogProbFunction, utils.add_fused_lm_head,
            grpo_trainer.add_fused_lm_head, grpo_trainer.GRPOTrainer._compute_loss,
            grpo_trainer.GRPOTrainer.__init__) == own


# --------------------------------------------------------------------------------------------
# a LoRA adapter on lm_head
# --------------------------------------------------------------------------------------------
def _unfused_logps(model, input_ids, attention_mask, temperature):
    """(B, T-1) log-probs and entropies of the next tokens from the model's own logits, in fp32
    (fp64 for a float64 model: the reference of the fused head's test)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = (logits / temperature).log_softmax(-1)
    chosen = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    keep = attention_mask[:, 1:] != 0
    return chosen.masked_fill(~keep, 0.0), entropy.masked_fill(~keep, 0.0)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_fused_head_with_lora_on_lm_head(variant):
    """The fused forward of a model whose lm_head (and q_proj) carry a LoRA adapter: the
    model's own log-probs and entropies, and their gradients to every adapter parameter. Plain
    LoRA goes through linear_logprobs' LoRA inputs, DoRA through the head module.

    The gradients are checked by the 2x rule (tests/numerics.py) against the same model in
    float64, the model's own fp32 forward being the same-dtype computation; the fp32 atol scales
    with the gradient's largest entry. An element-wise tolerance against the fp32 forward does
    not hold: an entry that is small by cancellation (lm_head's lora_A sums over tokens and
    vocabulary, entries up to ~17) carries the rounding error of its large terms, a few
    1e-6 in either fp32 computation."""
    from peft import LoraConfig, get_peft_model

    model = _model(1)
    input_ids = torch.randint(4, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with ours.patch_trl():
        ours.add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"],
                        init_lora_weights=False, use_dora=variant == "dora")
    model = get_peft_model(model, config)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lm_head" in n for n in names)
    weight = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    # the float64 reference: the same base and adapter weights (its LoRA init draws, replaced by
    # the loaded ones, do not touch the test's random stream)
    with torch.random.fork_rng(devices=[]):
        model64 = get_peft_model(_model(1), copy.deepcopy(config))
    model64.load_state_dict(model.state_dict())
    model64.double()

    def run(fused: bool, net=model):
        params = [p for p in net.parameters() if p.requires_grad]
        if fused:
            out = net(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                      fused_lm_head=True)
            logp, entropy = out.log_probs, out.entropy
        else:
            logp, entropy = _unfused_logps(net, input_ids, attention_mask, 0.7)
        total = (logp * weight).sum() + (entropy * weight.flip(0)).sum()
        # adapters off: nothing trainable is used
        grads = torch.autograd.grad(total, params) if total.requires_grad else ()
        return logp.detach(), entropy.detach(), grads

    expected = run(fused=False)
    grads64 = run(fused=False, net=model64)[2]
    with ours.patch_trl():
        got = run(fused=True)
        with model.disable_adapter():  # the reference policy: the base head alone
            base_expected, base_got = run(fused=False), run(fused=True)
    for a, b, name in ((got, expected, variant), (base_got, base_expected, "adapter off")):
        def say(m, name=name):
            return f"{name}: {m}"

        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5, msg=say)
        torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-5, msg=say)
    assert len(got[2]) == len(expected[2]) == len(grads64) == len(names)
    for g, g_fp32, g64, param in zip(got[2], expected[2], grads64, names):
        assert_close_2x(g, g_fp32, g64, torch.float32, name=f"{variant}: d {param}",
                        atol_scale=max(1.0, g64.abs().max().item()))
    # TRL's own head would ignore the adapter: once unpatched, the fused forward refuses
    with pytest.raises(RuntimeError, match="ignore the adapter"):
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
              fused_lm_head=True)


def test_fused_head_refuses_unknown_outputs_with_lora_on_lm_head():
    """TRL's function, the fallback for output names we do not know (every name TRL knows is
    ours: tests/integrations/test_trl_fused_head.py), would ignore an adapter on lm_head: such a
    call is refused with one clear error instead of silently wrong numbers."""
    from peft import LoraConfig, get_peft_model

    model = _model(1)
    input_ids = torch.randint(4, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with ours.patch_trl():
        ours.add_fused_lm_head(model, outputs=("log_probs", "top_k"))
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"],
                                                 init_lora_weights=False))
        with pytest.raises(ValueError, match=r"asked for \['top_k'\] with a PEFT adapter"):
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  labels=input_ids, fused_lm_head=True)


def test_grpo_trainer_with_lora_on_lm_head():
    """TRL refuses an adapter on lm_head; under patch_trl the trainer takes it, and the loss
    (with beta: the reference is the adapter switched off) and its gradients are TRL's
    _compute_loss evaluated on the model's own, unfused log-probs."""
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                        init_lora_weights=False)
    with pytest.raises(ValueError, match="lm_head"):
        trl.GRPOTrainer(model=_model(), reward_funcs=_reward, args=_config(beta=0.05),
                        train_dataset=_dataset(), processing_class=_tokenizer(),
                        peft_config=config)
    with ours.patch_trl(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.GRPOTrainer(model=_model(), reward_funcs=_reward,
                                  args=_config(beta=0.05, loss_type="grpo"),
                                  train_dataset=_dataset(), processing_class=_tokenizer(),
                                  peft_config=config)
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.train()
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            inputs = trainer._generate_and_score_completions(batch)
        mine = _run(trainer, inputs, patched=True)

    def unfused(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        logp, entropy = _unfused_logps(model, input_ids, attention_mask, self.temperature)
        return logp[:, -logits_to_keep:], entropy[:, -logits_to_keep:], None

    with torch.no_grad(), trainer.model.disable_adapter():
        full = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        ref = unfused(trainer, trainer.model, full, attention, COMPLETION)[0]
    torch.testing.assert_close(inputs["ref_per_token_logps"], ref, rtol=1e-5, atol=1e-5)
    trainer._get_per_token_logps_and_entropies = unfused.__get__(trainer)
    theirs = _run(trainer, inputs, patched=False)
    _assert_same(mine, theirs, "lora on lm_head")
    lm_head_grads = [g for (n, p), g in zip(
        ((n, p) for n, p in trainer.model.named_parameters() if p.requires_grad), mine[1])
        if "lm_head" in n]
    assert lm_head_grads and all(g is not None and g.abs().sum() > 0 for g in lm_head_grads)


def test_rloo_trainer_with_lora_on_lm_head():
    """RLOOTrainer shares the fused head: under patch_trl it takes an adapter on lm_head (TRL
    alone refuses it) and its loss and gradients, off-policy, are those of its own _compute_loss
    on the model's unfused log-probs."""
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                        init_lora_weights=False)

    def make():
        args = trl.RLOOConfig(output_dir=tempfile.mkdtemp(prefix="trl_rloo_test_"),
                              use_cpu=True, report_to=[], per_device_train_batch_size=4,
                              num_generations=GENERATIONS, max_completion_length=COMPLETION,
                              max_steps=1, save_strategy="no", bf16=False, seed=0,
                              gradient_checkpointing=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return trl.RLOOTrainer(model=_model(), reward_funcs=_reward, args=args,
                                   train_dataset=_dataset(), processing_class=_tokenizer(),
                                   peft_config=config)

    with pytest.raises(ValueError, match="lm_head"):
        make()
    with ours.patch_trl():
        trainer = make()
        trainer.model.train()
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            inputs = trainer._generate_and_score_completions(batch)
        # off-policy: sequences past both clip bounds
        inputs["old_logps"] = inputs["old_logps"] + torch.tensor([0.5, -0.5, 0.1, -0.1])
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        loss = trainer._compute_loss(trainer.model, inputs)
        grads = torch.autograd.grad(loss, params)

    def unfused(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        logp, entropy = _unfused_logps(model, input_ids, attention_mask, self.temperature)
        return logp[:, -logits_to_keep:], entropy[:, -logits_to_keep:], None

    trainer._get_per_token_logps_and_entropies = unfused.__get__(trainer)
    loss_t = trainer._compute_loss(trainer.model, inputs)
    grads_t = torch.autograd.grad(loss_t, params)
    torch.testing.assert_close(loss, loss_t, rtol=1e-5, atol=1e-6)
    assert loss_t.abs() > 1e-3
    for g, g_t in zip(grads, grads_t):
        torch.testing.assert_close(g, g_t, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# one full training step
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings", [
    dict(beta=0.05, loss_type="grpo"),
    dict(beta=0.05, loss_type="luspo", importance_sampling_level="sequence",
         top_entropy_quantile=0.5, off_policy_mask_threshold=0.0),
    # old log-probs from the generation pass (a second step on the same batch), the dapo
    # normaliser over two micro-batches, gradient checkpointing
    dict(beta=0.04, loss_type="bnpo", num_iterations=2, max_steps=2),
    dict(loss_type="dapo", steps_per_generation=4, gradient_accumulation_steps=2, max_steps=2,
         per_device_train_batch_size=2, gradient_checkpointing=True),
    # SAPO's gate off-policy: the second step reuses the batch
    dict(beta=0.04, loss_type="sapo", num_iterations=2, max_steps=2, sapo_temperature_pos=1.3,
         sapo_temperature_neg=2.0),
    # VESPO's gamma weights off-policy: the second step reuses the batch
    dict(beta=0.04, loss_type="vespo", num_iterations=2, max_steps=2, vespo_k_pos=1.5),
    # TRL's entropy bonus on the fused head's differentiable entropies
    dict(beta=0.04, loss_type="dapo", entropy_coef=0.05),
    # the fused head's temperature, batch-scaled rewards; cispo's clip reached on the second
    # step (the batch reused after the update)
    dict(loss_type="cispo", epsilon_high=1.01, temperature=0.7, scale_rewards="batch",
         num_iterations=2, max_steps=2, _exercised=("cispo_clip_ratio", 0.0)),
    # dr_grpo's constant (max_completion_length), TRL's two-sided clip (delta: A < 0 tokens
    # above it on the second step), epsilon / epsilon_high, the unweighted k3 KL, unscaled
    # rewards, the lm head cast to fp32; both clip sides reached on the second step
    dict(loss_type="dr_grpo", importance_sampling_level="token", epsilon=0.002,
         epsilon_high=0.003, delta=1.004, beta=0.04, use_bias_correction_kl=False,
         scale_rewards="none", cast_lm_head_to_fp32=True, num_iterations=2, max_steps=2,
         _exercised=("clip_ratio/low_mean", 0.0)),
    # truncated completions masked out (one of eight ends): the second micro-batch has no
    # valid token; old log-probs from a forward pass (steps_per_generation > accumulation)
    dict(loss_type="grpo", mask_truncated_completions=True, max_completion_length=16,
         steps_per_generation=2, gradient_accumulation_steps=1, per_device_train_batch_size=4,
         max_steps=2, epsilon=0.01, _exercised=("loss", None)),
], ids=["grpo", "luspo-masks", "two-iterations", "accumulation-checkpointing", "sapo", "vespo",
        "entropy-bonus", "cispo-temperature", "dr_grpo-delta", "mask-truncated"])
def test_grpo_trainer_step_patched_and_unpatched(settings):
    """One trainer.train() step (generation, reward, GRPO loss with beta, SGD update) from the
    same seed and weights: the same logged loss and metrics (all of them: clip ratios, kl,
    entropy, grad_norm, ...) and the same updated weights; the drop-in's loss ran (no
    fallback), the high-entropy and off-policy masks included. ``_exercised`` (metric, bound):
    the last step's metric in TRL's log is above the bound (the option was reached), or, with
    bound None, is 0 (an all-masked micro-batch)."""
    settings = dict(settings)
    exercised = settings.pop("_exercised", None)
    directory = tempfile.mkdtemp(prefix="trl_grpo_model_")
    _model().save_pretrained(directory)  # the reference model (beta != 0) is built from a path
    from transformers import AutoModelForCausalLM

    def step(patched: bool):
        model = AutoModelForCausalLM.from_pretrained(directory)
        before = copy.deepcopy(model.state_dict())
        if patched:
            with ours.patch_trl():
                trainer = _trainer(model, **settings)
                assert ours.grpo_loss_fallback_reason(trainer) is None
                trainer.train()
        else:
            trainer = _trainer(model, **settings)
            trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        return logs, {k: v - before[k] for k, v in trainer.model.state_dict().items()}

    logs, update = step(patched=True)
    logs_t, update_t = step(patched=False)
    assert len(logs) == len(logs_t) == settings.get("max_steps", 1)
    assert logs[0]["reward"] == logs_t[0]["reward"]  # the same completions
    for entry, entry_t in zip(logs, logs_t):
        assert set(entry) == set(entry_t)
        for key, value in entry_t.items():
            if key == "step_time":
                continue
            if isinstance(value, float):  # None: TRL's nanmin / nanmax of an all-masked batch
                assert entry[key] == pytest.approx(value, rel=1e-4, abs=1e-7, nan_ok=True), key
            else:
                assert entry[key] == value, key
    if exercised is not None:
        key, bound = exercised
        value = logs_t[-1][key]
        assert value == 0 if bound is None else value > bound, (key, value)
    assert any(u.abs().max() > 0 for u in update_t.values())
    for key, value in update_t.items():
        torch.testing.assert_close(update[key], value, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, key=key: f"update of {key}: {m}")


@pytest.mark.parametrize("kl", ["k3", "k3-weighted"])
def test_grpo_k3_near_the_reference_keeps_its_digits(fixed_logps, monkeypatch, kl):
    """Reference log-probs within 1e-4 .. 2e-3 of the policy's (near the reference policy), old
    ones equal to the policy's and advantages 0: the loss is beta * reduce(k3) alone. Ours in
    fp32 against TRL's own _compute_loss on the same values in float64, where its
    exp(x) - x - 1 is accurate (~1e-8 relative here): loss, gradient and the kl metric within
    1e-5 relative (TRL's formula in fp32, which the drop-in computed itself for the metric and
    the ratio-weighted term, is off by percents there; the KL kernels were too)."""
    trainer, inputs, logps = fixed_logps
    _set(trainer, "grpo", "token", kl)
    g = torch.Generator().manual_seed(3)
    size = torch.empty(logps.shape).uniform_(math.log(1e-4), math.log(2e-3), generator=g).exp()
    sign = torch.where(torch.rand(logps.shape, generator=g) < 0.5, -1.0, 1.0)
    near = dict(inputs, old_per_token_logps=logps.detach().clone(),
                ref_per_token_logps=logps.detach() - sign * size,
                advantages=torch.zeros_like(inputs["advantages"]))
    mine = _run(trainer, near, patched=True, params=[logps])
    leaf64 = logps.detach().double().requires_grad_(True)
    entropies64 = torch.rand(logps.shape, generator=g, dtype=torch.float64)
    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies",
                        lambda *args, **kwargs: (leaf64, entropies64, None))
    near64 = {key: value.double() if torch.is_tensor(value) and value.is_floating_point()
              else value for key, value in near.items()}
    theirs = _run(trainer, near64, patched=False, params=[leaf64])
    (loss, (grad,), metrics), (loss64, (grad64,), metrics64) = mine, theirs
    assert loss64 > 0
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(torch.tensor(metrics["kl"], dtype=torch.float64),
                               torch.tensor(metrics64["kl"], dtype=torch.float64),
                               rtol=1e-5, atol=0.0)
