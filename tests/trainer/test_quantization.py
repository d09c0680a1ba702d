"""Quantized bases (rlhf/quant.py, docs/quantization.md) on the CPU: bitsandbytes 4-bit and
8-bit layers through SFT (LoRA) -> reward model -> PPO and GRPO, the reference equal to the
quantized base, checkpoints without the base, the fused lm_head path, the adapters' optimizer,
and the errors.

Every model is a tiny Llama written to a temporary directory and loaded quantized from there (as
a pretrained model would be). The independent references: a plain quantized model loaded
without PEFT (the reference), the model's own unfused logits (the fused head), the backbone
before saving (the reload).
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes")

from rlhf import quant, reward, sft, task  # noqa: E402
from rlhf import rl as ppo  # noqa: E402
from rlhf.models import LoraSpec, SharedBackbone, _position_ids, load_causal_lm  # noqa: E402
from tests.helpers import interrupt_at, review_tokenizer, tiny_llama  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matrices: one thread is as fast, and on cores shared with other processes the
    # threads' barriers make every op many times slower (rlhf/pipeline.py, cpu_threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _eager_bitsandbytes(monkeypatch):
    # bitsandbytes' CPU dequantize is wrapped in torch.compile, which compiles a C++ kernel for
    # every weight shape (seconds each on a busy CI core): these tests check what the layers
    # compute, not how fast, so they run them eagerly (the same ops, uncompiled)
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.config, "disable", True)


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch, request):
    # the stage loops run the kernels' plain-PyTorch reference (as
    # tests/trainer/test_stages.py does);
    # the fused-head test runs the default backend
    if "fused" not in request.node.name:
        monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")


@pytest.fixture(scope="module")
def corpus():
    return task.make_corpus(48, seed=3)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return review_tokenizer(corpus, vocab_size=300)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    """A tiny pretrained Llama on disk: hidden 64 (whole 4-bit blocks of 64), untied head."""
    path = tmp_path_factory.mktemp("base")
    with torch.random.fork_rng(devices=[]):
        model = tiny_llama(tokenizer, 0, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def batch(tokenizer, n=3, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tokenizer), (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[-1, -3:] = 0  # right padding
    return ids, mask


def perturb_adapters(backbone, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for role in backbone.roles:
            for p in backbone.trainable_parameters(role):
                p.add_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------------------------------------
# the backbone on a quantized base
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_reference_is_the_quantized_base_exactly(base_dir, tokenizer, kind):
    backbone = SharedBackbone.from_pretrained(base_dir, lora=LoraSpec(rank=4), quantization=kind)
    assert backbone.quantization == kind
    info = quant.describe(backbone.causal_lm)
    assert info["quantized_linears"] == 2 * 7  # q k v o gate up down of both layers
    # the lm_head stays dense (the fused log-probs read it); the heads are fp32 Linear(H, 1)
    assert "lm_head" in info["dense_linears"]
    assert backbone.lm_head_weight().dtype == torch.float32
    assert backbone.value_head.weight.dtype == backbone.reward_head.weight.dtype == torch.float32
    perturb_adapters(backbone)
    ids, mask = batch(tokenizer)
    plain = load_causal_lm(base_dir, quantization=kind)  # no PEFT anywhere
    with torch.no_grad():
        expected = plain.model(input_ids=ids, attention_mask=mask,
                               position_ids=_position_ids(mask)).last_hidden_state
        for role in ("policy", None, "critic", None):  # switching back and forth
            hidden = backbone.hidden_states(ids, mask, role)
            if role is None:
                assert torch.equal(hidden, expected)
            else:
                assert not torch.allclose(hidden, expected, atol=1e-3)
        logits = plain(input_ids=ids, attention_mask=mask,
                       position_ids=_position_ids(mask)).logits.double()
    reference = backbone.reference_logprobs(ids, mask)
    expected_logp = torch.log_softmax(logits[:, :-1], -1).gather(
        -1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
    torch.testing.assert_close(reference.double(), expected_logp, atol=1e-5, rtol=1e-5)


def test_fused_logprobs_equal_unfused_with_dense_and_quantized_lm_head(base_dir, tokenizer):
    """token_logprobs (the fused linear_logprobs kernel reading lm_head_weight()) against the
    model's own logits through its lm_head module, with the head dense and 4-bit."""
    ids, mask = batch(tokenizer, seed=2)
    for quantize_head in (False, True):
        config = quant.bnb_config("nf4", quantize_lm_head=quantize_head)
        model = load_causal_lm(base_dir, quantization=config)
        backbone = SharedBackbone.from_model(model, lora=LoraSpec(rank=4), name_or_path=base_dir)
        assert quant.is_quantized_linear(backbone.causal_lm.lm_head) == quantize_head
        assert backbone.vocab_size == len(tokenizer)  # not the packed weight's rows
        perturb_adapters(backbone, seed=3)
        for role in ("policy", None):
            fused = backbone.token_logprobs(ids, mask, role)
            with torch.no_grad():
                logits = backbone.logits(ids, mask, role).double()  # the bnb lm_head's forward
            unfused = torch.log_softmax(logits[:, :-1], -1).gather(
                -1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
            torch.testing.assert_close(fused.double(), unfused, atol=2e-5, rtol=1e-5)
        # the dequantized head is the layer's own matrix, bit for bit in its compute dtype
        if quantize_head:
            x = torch.randn(5, 64)
            head = backbone.causal_lm.lm_head
            assert torch.equal(x @ quant.dense_weight(head).T, head(x))
    # int8 quantizes the head's inputs too: the fused path cannot match it, so it is refused
    with pytest.raises(ValueError, match="LLM.int8"):
        quant.bnb_config("int8", quantize_lm_head=True)
    int8 = load_causal_lm(base_dir, quantization="int8")
    with pytest.raises(ValueError, match="int8 Linear8bitLt"):
        quant.dense_weight(int8.model.layers[0].mlp.down_proj)


def test_4bit_layers_never_take_the_cpu_inference_repacking(base_dir, tokenizer):
    """bitsandbytes repacks a Linear4bit's weight for CPU inference on its first eval no-grad
    forward where the CPU has AVX512-BF16; the repacked layer computes other numbers and fails a
    later training forward. Loaded or wrapped 4-bit layers have it off on every CPU, and sampling
    then training works."""
    import bitsandbytes as bnb

    model = load_causal_lm(base_dir, quantization="nf4")
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and not any(m.support_avx512bf16_for_cpu for m in four_bit)
    for module in four_bit:  # as a model quantized elsewhere would have them on such a CPU
        module.support_avx512bf16_for_cpu = True
    backbone = SharedBackbone.from_model(model, lora=LoraSpec(rank=4), name_or_path=base_dir)
    assert not any(m.support_avx512bf16_for_cpu for m in four_bit)
    ids, mask = batch(tokenizer, seed=5)
    backbone.eval()
    with torch.no_grad():
        backbone.token_logprobs(ids, mask, "policy")
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in four_bit)
    backbone.train()
    backbone.token_logprobs(ids, mask, "policy").sum().backward()
    assert all(p.grad is not None for p in backbone.trainable_parameters("policy"))


def test_int8_cast_notice_is_said_once_not_at_every_matmul(base_dir, tokenizer, monkeypatch):
    """bitsandbytes logs its fp32 -> fp16 cast notice at every int8 matmul of an fp32 input (all
    of them on the CPU): an RL run printed ~100 lines per iteration of a 2-layer model. A loaded
    int8 model says it once; other records of that logger still pass."""
    import logging

    logger = logging.getLogger("bitsandbytes.autograd._functions")
    monkeypatch.setattr(logger, "filters", [])  # a filter an earlier test installed has fired
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.DEBUG)
    logger.addHandler(handler)
    try:
        model = load_causal_lm(base_dir, quantization="int8")
        ids, mask = batch(tokenizer, seed=7)
        with torch.no_grad():
            for _ in range(2):  # 2 forwards x 14 int8 linears
                model(input_ids=ids, attention_mask=mask)
        logger.warning("another bitsandbytes warning")
    finally:
        logger.removeHandler(handler)
    cast = [r for r in records if r.startswith("MatMul8bitLt: inputs will be cast")]
    assert len(cast) == 1 and "another bitsandbytes warning" in records


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_checkpoint_holds_adapters_and_heads_only_and_reloads(base_dir, tokenizer, tmp_path,
                                                              kind):
    backbone = SharedBackbone.from_pretrained(base_dir, lora=LoraSpec(rank=4), quantization=kind)
    perturb_adapters(backbone, seed=4)
    ids, mask = batch(tokenizer, seed=4)
    with torch.no_grad():
        before = {role: backbone.token_logprobs(ids, mask, role) for role in ("policy", None)}
        values, scores = backbone.values(ids, mask), backbone.rewards(ids, mask)
    backbone.save(tmp_path / "bb")
    files = sorted(p.relative_to(tmp_path / "bb").as_posix()
                   for p in (tmp_path / "bb").rglob("*") if p.is_file())
    assert not any(f.startswith("base/") for f in files), files
    info = json.loads((tmp_path / "bb" / "roles.json").read_text())
    assert info["quantization"] == kind and info["base_saved"] is False
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "bb" / "adapters" / "policy" / "adapter_model.safetensors"))
    assert saved and all("lora_" in name for name in saved)
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert set(load_file(str(tmp_path / "bb" / "heads.safetensors"))) == {
        "value_head.weight", "value_head.bias", "reward_head.weight", "reward_head.bias"}
    loaded = SharedBackbone.load(tmp_path / "bb")  # re-quantizes the named base
    assert loaded.quantization == kind
    with torch.no_grad():
        for role, expected in before.items():
            assert torch.equal(loaded.token_logprobs(ids, mask, role), expected)
        assert torch.equal(loaded.values(ids, mask), values)
        assert torch.equal(loaded.rewards(ids, mask), scores)
    if kind == "int8":
        return  # the rest does not depend on the kind (and int8 is the slow one on the CPU)
    # loading it another way than it was trained is allowed, with a warning
    with pytest.warns(UserWarning, match=f"trained on a {kind} base"):
        other = SharedBackbone.load(tmp_path / "bb", quantization="none")
    assert other.quantization == "none"
    # what would write or change the quantized base is refused
    with pytest.raises(ValueError, match="cannot save the .* base weights"):
        backbone.save(tmp_path / "with_base", save_base=True)
    with pytest.raises(ValueError, match="merge_into_base"):
        backbone.merge_into_base("policy")
    with pytest.raises(ValueError, match="without name_or_path"):
        SharedBackbone.from_model(load_causal_lm(base_dir, quantization=kind))


# ---------------------------------------------------------------------------------------------
# the stages
# ---------------------------------------------------------------------------------------------
def _pairs(n, seed):
    corpus = task.make_corpus(2 * n, seed=seed)
    return [{"prompt": a["prompt"], "chosen": a["completion"], "rejected": b["completion"]}
            for a, b in zip(corpus[::2], corpus[1::2])]


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_sft_rm_ppo_grpo_on_a_quantized_base(base_dir, tokenizer, corpus, tmp_path, kind):
    # ---- SFT: LoRA on the quantized base, merged into the full-precision base at the end
    model = load_causal_lm(base_dir, quantization=kind)
    cfg = sft.SFTConfig(output_dir=str(tmp_path / "sft"), model=base_dir, quantization=kind,
                        lora_rank=4, max_steps=2, batch_size=4, grad_accum_steps=1, lr=1e-2,
                        warmup_steps=0, log_every=1, save_every=0, max_length=40, device="cpu",
                        optimizer="adamw8bit")
    summary = sft.train(cfg, model=model, tokenizer=tokenizer, examples=corpus[:16])
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    # the checkpoint holds the adapters only; the final model is dense (no quantization)
    from rlhf.checkpoint import load_state

    state = load_state(next((tmp_path / "sft" / "checkpoints").iterdir()))
    assert state["params"] and all("lora_" in name for name in state["params"])
    sft_dir = summary["model_dir"]
    config = json.loads(open(f"{sft_dir}/config.json").read())
    assert "quantization_config" not in config
    assert quant.quantization_of(summary["model"]) == "none"
    base = load_causal_lm(base_dir)
    merged = dict(summary["model"].named_parameters())
    moved = [name for name, p in base.named_parameters()
             if "layers" in name and "proj" in name and not torch.equal(p, merged[name])]
    assert len(moved) == 14  # every adapted linear got its trained LoRA delta

    # ---- reward model on the SFT model, loaded quantized
    rm_cfg = reward.RewardConfig(output_dir=str(tmp_path / "rm"), model=sft_dir,
                                 quantization=kind, lora_rank=4, batch_size=4,
                                 grad_accum_steps=1, epochs=1.0, lr=1e-2, warmup_steps=0,
                                 log_every=1, save_every=0, max_length=40, device="cpu")
    rm = reward.train(rm_cfg, tokenizer=tokenizer, train_pairs=_pairs(8, 5),
                      eval_pairs=_pairs(4, 6))
    assert math.isfinite(rm["final_loss"]) and 0.0 <= rm["eval_accuracy"] <= 1.0
    backbone_dir = tmp_path / "rm" / "backbone"
    assert not (backbone_dir / "base").exists()
    assert json.loads((backbone_dir / "roles.json").read_text())["quantization"] == kind

    # ---- PPO and GRPO from the reward stage's backbone (re-quantized from roles.json)
    prompts = task.all_prompts("train")[:8]
    common = dict(num_iterations=2, rollout_batch_size=4, minibatch_size=2, ppo_epochs=1,
                  max_new_tokens=6, max_prompt_length=40, lr=1e-2, warmup_steps=0,
                  save_every=0, device="cpu", kl_target=None, model=str(backbone_dir))
    for algorithm, extra in (("ppo", dict(critic_lr=1e-2)), ("grpo", dict(group_size=2))):
        rl_cfg = ppo.PPOConfig(output_dir=str(tmp_path / algorithm), algorithm=algorithm,
                               **common, **extra)
        result = ppo.train(rl_cfg, prompts=prompts)
        records = [json.loads(line) for line in open(tmp_path / algorithm / "metrics.jsonl")]
        assert [r["iteration"] for r in records] == [1, 2]
        assert all(math.isfinite(r["kl"]) and math.isfinite(r["proxy_reward"])
                   for r in records)
        assert result["old_logprobs"] == "forward"  # a quantized base: no recorded log-probs
        out = tmp_path / algorithm / "backbone"
        assert not (out / "base").exists()
        roles = json.loads((out / "roles.json").read_text())
        assert roles["quantization"] == kind
        assert ("critic" in roles["roles"]) == (algorithm == "ppo")


def test_bad_settings_give_clear_errors(base_dir, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="'nf8' is not a quantization"):
        sft.SFTConfig(model=base_dir, quantization="nf8", lora_rank=4)
    with pytest.raises(ValueError, match="full-weight training.*cannot be trained"):
        sft.SFTConfig(model=base_dir, quantization="nf4", lora_rank=0)
    with pytest.raises(ValueError, match="needs model=.*from scratch"):
        sft.SFTConfig(quantization="nf4", lora_rank=4)
    with pytest.raises(ValueError, match="'q4' is not a quantization"):
        reward.RewardConfig(quantization="q4")
    with pytest.raises(ValueError, match="'int4' is not a quantization"):
        ppo.GRPOConfig(quantization="int4")
    with pytest.raises(ValueError, match="'sgd' is not an optimizer"):
        ppo.PPOConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="nothing to page"):
        ppo.make_optimizer([torch.nn.Parameter(torch.zeros(3))], [],
                           ppo.PPOConfig(optimizer="paged_adamw8bit"), torch.device("cpu"))
    with pytest.raises(ValueError, match="model quantization='nf5' is not a quantization"):
        load_causal_lm(base_dir, quantization="nf5")
    # a stage given a model that does not match its quantization setting
    with pytest.raises(ValueError, match="the model given is none"):
        sft.train(sft.SFTConfig(output_dir=str(tmp_path / "s"), model=base_dir,
                                quantization="nf4", lora_rank=4, max_steps=1, device="cpu"),
                  model=load_causal_lm(base_dir), tokenizer=tokenizer,
                  examples=[{"prompt": "a", "completion": "b"}])


def test_8bit_adamw_state_is_smaller_only_for_large_tensors():
    """bitsandbytes keeps 32-bit moments for tensors under 4096 elements, so the tiny models'
    adapters save nothing; a real adapter's (rank 16 x hidden 4096) moments shrink ~4x."""
    small = [(4, 64), (64, 4)]  # tiny-model LoRA factors
    large = [(16, 4096), (4096, 16)]  # Llama-3-8B rank-16 q_proj factors
    assert quant.adapter_optimizer_bytes(small, "adamw8bit") == \
        quant.adapter_optimizer_bytes(small, "adamw") == 2 * 4 * (256 + 256)
    full = quant.adapter_optimizer_bytes(large, "adamw")
    eight = quant.adapter_optimizer_bytes(large, "adamw8bit")
    assert full == 2 * 4 * 2 * 65536
    assert eight < full / 3.5, (eight, full)
    # and the 8-bit optimizer follows AdamW closely on a smooth problem
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        target = torch.randn(4096, 2)
        results = {}
        for name in ("adamw", "adamw8bit"):
            p = torch.nn.Parameter(torch.zeros(4096, 2))
            opt = quant.make_optimizer([p], name, "cpu", lr=1e-2)
            for _ in range(30):
                opt.zero_grad()
                ((p - target) ** 2).sum().backward()
                opt.step()
            results[name] = p.detach().clone()
    start = (target ** 2).sum()
    assert ((results["adamw8bit"] - target) ** 2).sum() < 0.9 * start
    torch.testing.assert_close(results["adamw8bit"], results["adamw"], atol=0.05, rtol=0.05)


def test_pipeline_quantizes_the_backbone_and_qlora_sft(base_dir, tmp_path):
    """rlhf pipeline quantization=nf4 on your model and data: SFT trains LoRA on the nf4 base
    (QLoRA) and saves the merged full-precision model; the reward model and RL load it nf4."""
    from rlhf.pipeline import PipelineConfig, run, stage_configs

    # the built-in task's SFT trains full weights from scratch: in full precision
    stages = stage_configs(PipelineConfig(quantization="nf4"))
    assert [stages[s].quantization for s in ("sft", "reward", "ppo")] == ["none", "nf4", "nf4"]
    with pytest.raises(ValueError, match="'nf2' is not a quantization"):
        PipelineConfig(quantization="nf2")

    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    pos = task.make_corpus(8, seed=1, sentiment_mix={"positive": 1.0})
    neg = task.make_corpus(8, seed=2, sentiment_mix={"negative": 1.0})
    cfg = PipelineConfig(
        output_dir=str(tmp_path / "run"), device="cpu", quantization="nf4", lora_rank=4,
        lora_alpha=8, sample_batch_size=8, n_show_samples=2, heldout_pair_fraction=0.25,
        sft=sft.SFTConfig(model=base_dir, lora_rank=4, max_steps=2, batch_size=4,
                          grad_accum_steps=1, max_length=40,
                          dataset=write("s.jsonl", task.make_corpus(8, seed=4))),
        reward=reward.RewardConfig(
            dataset=write("p.jsonl", [{"prompt": p["prompt"], "chosen": p["completion"],
                                       "rejected": q["completion"]}
                                      for p, q in zip(pos, neg)]),
            batch_size=4, grad_accum_steps=1, max_length=48, save_every=0))
    cfg.ppo.dataset = write("q.jsonl", [{"prompt": f"Review {i}:"} for i in range(4)])
    cfg.ppo.num_iterations, cfg.ppo.rollout_batch_size, cfg.ppo.minibatch_size = 1, 4, 2
    cfg.ppo.max_new_tokens, cfg.ppo.max_prompt_length, cfg.ppo.save_every = 4, 16, 0
    summary = run(cfg)
    out = tmp_path / "run"
    assert summary["config"]["sft"]["quantization"] == "nf4"  # QLoRA SFT
    assert "quantization_config" not in json.loads((out / "sft/model/config.json").read_text())
    for stage_dir in ("rm", "ppo"):
        assert json.loads((out / stage_dir / "backbone/roles.json").read_text())[
            "quantization"] == "nf4"
        assert not (out / stage_dir / "backbone/base").exists()
    assert math.isfinite(summary["ppo_last_iteration"]["kl"])


def test_gradient_checkpointing_setting_changes_no_number(base_dir, tokenizer, corpus, tmp_path,
                                                         monkeypatch):
    """QLoRA SFT and the reward stage with gradient_checkpointing=true (what rlhf plan assumes
    for a small card) train exactly as without it: recomputation repeats the same ops."""
    import transformers.modeling_utils as modeling_utils

    calls = []
    original = modeling_utils.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counting_checkpoint)
    losses = {}
    for checkpointing in (False, True):
        cfg = sft.SFTConfig(output_dir=str(tmp_path / f"sft{checkpointing}"), model=base_dir,
                            quantization="nf4", lora_rank=4, max_steps=2, batch_size=4,
                            grad_accum_steps=1, lr=1e-2, warmup_steps=0, log_every=1,
                            save_every=0, max_length=40, device="cpu",
                            gradient_checkpointing=checkpointing)
        sft.train(cfg, model=load_causal_lm(base_dir, quantization="nf4"), tokenizer=tokenizer,
                  examples=corpus[:8])
        rm_cfg = reward.RewardConfig(output_dir=str(tmp_path / f"rm{checkpointing}"),
                                     model=base_dir, quantization="nf4", lora_rank=4,
                                     batch_size=4, grad_accum_steps=1, epochs=1.0, lr=1e-2,
                                     warmup_steps=0, log_every=1, save_every=0, max_length=40,
                                     device="cpu", gradient_checkpointing=checkpointing)
        reward.train(rm_cfg, tokenizer=tokenizer, train_pairs=_pairs(8, 5),
                     eval_pairs=_pairs(2, 6))
        # two decoder layers per forward, checkpointed only when asked for
        assert (len(calls) > 0) == checkpointing, len(calls)
        losses[checkpointing] = [
            json.loads(line)["loss"]
            for name in (f"sft{checkpointing}", f"rm{checkpointing}")
            for line in open(tmp_path / name / "metrics.jsonl") if '"loss"' in line]
    assert len(losses[True]) == 4
    assert losses[True] == pytest.approx(losses[False], rel=1e-6, abs=1e-7)


def test_qlora_sft_resume_matches_uninterrupted(base_dir, tokenizer, corpus, tmp_path):
    """A QLoRA SFT run (nf4 base, 8-bit AdamW) interrupted after step 2 and resumed from its
    adapter-only checkpoint logs the losses of the uninterrupted run."""
    def config(name, **extra):
        return sft.SFTConfig(output_dir=str(tmp_path / name), model=base_dir, quantization="nf4",
                             lora_rank=4, max_steps=4, batch_size=4, grad_accum_steps=1,
                             lr=1e-2, warmup_steps=0, log_every=1, save_every=2, max_length=40,
                             device="cpu", optimizer="adamw8bit", **extra)

    def losses(name):
        return [json.loads(line)["loss"] for line in open(tmp_path / name / "metrics.jsonl")]

    def train(cfg, **kwargs):
        return sft.train(cfg, model=load_causal_lm(base_dir, quantization="nf4"),
                         tokenizer=tokenizer, examples=corpus[:16], **kwargs)

    train(config("full"))

    with pytest.raises(KeyboardInterrupt):
        train(config("cut"), on_step=interrupt_at(3))
    train(config("cut", resume=True))
    assert len(losses("full")) == 4
    assert losses("cut") == pytest.approx(losses("full"), rel=1e-6, abs=1e-7)


def test_loading_adapters_onto_another_base_kind_warns(base_dir, tmp_path):
    backbone = SharedBackbone.from_pretrained(base_dir, lora=LoraSpec(rank=4), quantization="nf4")
    backbone.save(tmp_path / "bb")
    with pytest.warns(UserWarning, match="trained on a nf4 base, the base_model given is none"):
        SharedBackbone.load(tmp_path / "bb", base_model=load_causal_lm(base_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the matching base: no warning
        loaded = SharedBackbone.load(tmp_path / "bb",
                                     base_model=load_causal_lm(base_dir, quantization="nf4"))
    assert loaded.quantization == "nf4"
