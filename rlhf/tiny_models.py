"""Tiny random-initialised Hugging Face models for tests: Llama, Qwen2 and GPT-2 shapes.

Nothing is downloaded: each model is built from a config. Dropout is off, so training mode is
deterministic, and bos/eos ids lie inside the small vocabulary. Sizes default to hidden 32,
2 layers, 4 heads (2 key/value heads for Llama and Qwen2: grouped-query attention is exercised).
Qwen2 and GPT-2 tie the lm_head to the input embeddings (as Qwen2.5-1.5B and GPT-2 do), Llama
does not.
"""

from __future__ import annotations

import torch

__all__ = ["ARCHITECTURES", "tiny_config", "tiny_causal_lm", "tiny_reward_model"]

ARCHITECTURES = ("llama", "qwen2", "gpt2")


def tiny_config(arch: str, vocab_size: int = 128, hidden_size: int = 32, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
                max_position_embeddings: int = 256, tie_word_embeddings: bool | None = None,
                **overrides):
    """A tiny ``transformers`` config for ``arch`` in ``ARCHITECTURES``; ``overrides`` are set on
    it as keyword arguments of the config class."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is not one of {ARCHITECTURES}")
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4 (bos, eos, pad and a token), got {vocab_size}")
    intermediate_size = intermediate_size or 2 * hidden_size
    special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if arch == "gpt2":
        kwargs = dict(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers,
                      n_head=num_heads, n_inner=intermediate_size,
                      n_positions=max_position_embeddings, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, summary_first_dropout=0.0,
                      tie_word_embeddings=True if tie_word_embeddings is None
                      else tie_word_embeddings, **special)
        kwargs.update(overrides)
        return GPT2Config(**kwargs)
    config_class = LlamaConfig if arch == "llama" else Qwen2Config
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size,
                  intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  max_position_embeddings=max_position_embeddings, attention_dropout=0.0,
                  tie_word_embeddings=(arch == "qwen2") if tie_word_embeddings is None
                  else tie_word_embeddings, **special)
    kwargs.update(overrides)
    return config_class(**kwargs)


def _build(model_class, config, seed: int, dtype: torch.dtype):
    # A private RNG stream: building a model must not move the caller's global seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # dtype at construction, not model.to(dtype): that would also round the fp32 rotary
        # buffers (inv_freq) to bf16, unlike from_pretrained(dtype=...).
        model = model_class.from_config(config, dtype=dtype)
    return model.eval()


def tiny_causal_lm(arch: str, vocab_size: int = 128, seed: int = 0,
                   dtype: torch.dtype = torch.float32, **config_kwargs):
    """A random-initialised ``AutoModelForCausalLM`` of ``tiny_config(arch, vocab_size, ...)``,
    the same weights for the same seed, in eval mode."""
    from transformers import AutoModelForCausalLM

    return _build(AutoModelForCausalLM, tiny_config(arch, vocab_size, **config_kwargs), seed,
                  dtype)


def tiny_reward_model(arch: str, vocab_size: int = 128, seed: int = 0,
                      dtype: torch.dtype = torch.float32, **config_kwargs):
    """A random-initialised ``AutoModelForSequenceClassification`` with one label (a reward
    model)."""
    from transformers import AutoModelForSequenceClassification

    config = tiny_config(arch, vocab_size, num_labels=1, **config_kwargs)
    return _build(AutoModelForSequenceClassification, config, seed, dtype)
