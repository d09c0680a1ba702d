"""What the trainer tests share (not a test module itself): the tiny models, tokenizers,
configs and files they build, in one place so that the test files cannot drift apart.

Building is cheap (milliseconds); sizes stay per caller: each test file keeps the shape its
numbers were checked at. ``interrupt_at`` is the Ctrl-C stand-in every resume test stops its run
with. The kernel tests' tolerances and inputs are in ``tests/numerics.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhf import rl, sft, task
from rlhf.engine import RolloutEngine
from rlhf.models import LoraSpec, SharedBackbone
from rlhf.pipeline import PipelineConfig

# the shape most stage tests train: 2 layers, hidden 32, one KV head shared by two query heads
STAGE_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1)
# "your model" of the pipeline tests on your own model and data: the same with one layer
OWN_MODEL_SHAPE = dict(STAGE_SHAPE, num_hidden_layers=1)


def review_tokenizer(corpus, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on the prompts + completions of a review corpus
    (``task.make_corpus``)."""
    return task.train_tokenizer([ex["prompt"] + ex["completion"] for ex in corpus],
                                vocab_size=vocab_size)


def rl_tokenizer():
    """The tokenizer of the RL loop tests (test_grpo, test_dynamic_sampling,
    test_trainer_subsystems): trained on ``task.make_corpus(96, seed=1)``, 300 tokens."""
    return review_tokenizer(task.make_corpus(96, seed=1), vocab_size=300)


def tiny_llama(tokenizer, seed: int = 0, **shape):
    """A random ``LlamaForCausalLM`` for ``tokenizer``: ``STAGE_SHAPE`` unless ``shape`` gives
    the fields (``task.tiny_llama_config`` names). Seeds the global RNG with ``seed`` first, as
    every caller did (wrap it in ``torch.random.fork_rng`` to leave the caller's stream alone)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(task.tiny_llama_config(tokenizer, **(shape or STAGE_SHAPE)))


def interrupt_at(stop: int):
    """An ``on_step`` / ``on_iteration`` callback that raises KeyboardInterrupt (what Ctrl-C
    raises) once step or iteration ``stop`` is done: the stage saves a checkpoint and re-raises."""
    def callback(step, _metrics):
        if step == stop:
            raise KeyboardInterrupt
    return callback


# ---------------------------------------------------------------------------------------------
# the stage tests' backbone, configs and files
# ---------------------------------------------------------------------------------------------
def tiny_model(tokenizer, seed: int = 0):
    return tiny_llama(tokenizer, seed)  # STAGE_SHAPE


def tiny_backbone(tokenizer, seed: int = 0) -> SharedBackbone:
    backbone = SharedBackbone.from_model(tiny_model(tokenizer, seed),
                                         lora=LoraSpec(rank=4, alpha=8))
    torch.manual_seed(seed + 1)
    for head in (backbone.value_head, backbone.reward_head):
        torch.nn.init.normal_(head.weight, std=0.2)
    return backbone


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def sft_config(tmp_path, **overrides) -> sft.SFTConfig:
    settings = dict(output_dir=str(tmp_path / "sft"), max_steps=12, batch_size=8, lr=1e-2,
                    warmup_steps=2, log_every=1, save_every=0, max_length=48, device="cpu")
    settings.update(overrides)
    return sft.SFTConfig(**settings)


def sentiment_pairs(n: int, seed: int):
    """Clean pairs: a positive review preferred over a negative one."""
    pos = task.make_corpus(n, seed=seed, sentiment_mix={"positive": 1.0})
    neg = task.make_corpus(n, seed=seed + 1, sentiment_mix={"negative": 1.0})
    return [{"prompt": p["prompt"], "chosen": p["completion"], "rejected": q["completion"]}
            for p, q in zip(pos, neg)]


# ---------------------------------------------------------------------------------------------
# the RL loop tests (critic-free algorithms)
# ---------------------------------------------------------------------------------------------
PROMPTS = task.all_prompts("train")[:12]


def rl_config(tmp_path, algorithm="grpo", **overrides) -> rl.RLConfig:
    settings = dict(output_dir=str(tmp_path / algorithm) if tmp_path else "unused",
                    algorithm=algorithm, num_iterations=3, rollout_batch_size=8, group_size=4,
                    minibatch_size=4, ppo_epochs=1, max_new_tokens=8, lr=1e-2, warmup_steps=1,
                    save_every=0, device="cpu", kl_target=2.0, kl_horizon=50,
                    max_prompt_length=40,
                    kl_coef=0.1)  # the KL term on for every algorithm (dapo's preset has none)
    if rl.PRESETS[algorithm]["advantage_estimator"] == "gae":
        settings["critic_lr"] = 1e-2
    settings.update(overrides)
    return rl.RLConfig(**settings)


def group_generation(backbone, tokenizer, cfg: rl.RLConfig, n_prompts: int, seed: int = 0):
    ids, mask = rl.encode_prompts(PROMPTS[:n_prompts], tokenizer, cfg.max_prompt_length)
    return RolloutEngine(backbone).generate(
        ids, mask, cfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, temperature=cfg.temperature, seed=seed,
        samples_per_prompt=cfg.settings.group_size).without_prompt_padding()


def randomised_policy(tokenizer, seed: int = 0):
    """A backbone whose policy differs from the reference (PEFT starts LoRA B at 0)."""
    backbone = tiny_backbone(tokenizer, seed)
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, param in backbone.named_parameters():
            if "lora_B" in name and ".policy." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return backbone


TIMINGS = ("rollout_s", "scoring_s", "update_s", "iteration_s", "tokens_per_s", "peak_memory_mb")


def without_timings(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in TIMINGS}


# ---------------------------------------------------------------------------------------------
# the pipeline and named-model tests
# ---------------------------------------------------------------------------------------------
def micro_config(output_dir) -> PipelineConfig:
    cfg = PipelineConfig(output_dir=str(output_dir), device="cpu", corpus_size=160,
                         vocab_size=300, hidden_size=32, num_layers=1, pair_prompts=96,
                         lora_rank=4, lora_alpha=8, eval_samples=16, sample_batch_size=32)
    cfg.sft.max_steps, cfg.sft.batch_size, cfg.sft.warmup_steps, cfg.sft.lr = 80, 16, 4, 1e-2
    cfg.reward.epochs, cfg.reward.batch_size, cfg.reward.save_every = 1.0, 2, 1
    cfg.ppo.num_iterations, cfg.ppo.rollout_batch_size, cfg.ppo.minibatch_size = 2, 8, 4
    cfg.ppo.max_new_tokens, cfg.ppo.max_prompt_length, cfg.ppo.save_every = 16, 40, 1
    return cfg


def write_llama_gguf(path: Path, *, name: str, tokens: list[str], merges: list[str],
                     token_types: list, bos: int, eos: int, pad: int, hidden: int = 16,
                     layers: int = 2, heads: int = 4, kv_heads: int = 2,
                     ffn: int = 32, context: int = 64, chat_template: str | None = None,
                     seed: int = 0) -> dict:
    """A random Llama GGUF with tied embeddings (no output.weight, as SmolLM2) and a byte-level
    BPE tokenizer (``tokens`` in id order, ``merges``); returns the tensors written."""
    import gguf
    import numpy as np

    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_vocab_size(vocab)
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(pad)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    rng = np.random.default_rng(seed)
    kv = hidden // heads * kv_heads

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    tensors = {"token_embd.weight": weight(vocab, hidden),
               "output_norm.weight": 1 + weight(hidden)}
    for i in range(layers):
        tensors.update({
            f"blk.{i}.attn_norm.weight": 1 + weight(hidden),
            f"blk.{i}.attn_q.weight": weight(hidden, hidden),
            f"blk.{i}.attn_k.weight": weight(kv, hidden),
            f"blk.{i}.attn_v.weight": weight(kv, hidden),
            f"blk.{i}.attn_output.weight": weight(hidden, hidden),
            f"blk.{i}.ffn_norm.weight": 1 + weight(hidden),
            f"blk.{i}.ffn_gate.weight": weight(ffn, hidden),
            f"blk.{i}.ffn_up.weight": weight(ffn, hidden),
            f"blk.{i}.ffn_down.weight": weight(hidden, ffn),
        })
    for tensor_name, value in tensors.items():
        writer.add_tensor(tensor_name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors
