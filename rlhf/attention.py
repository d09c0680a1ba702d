"""Decode attention over a grouped-query KV cache without copying the cache.

With an explicit attention mask (the rollout engine always passes one: left-padded rows), the
``sdpa`` attention of transformers releases before 5.2x, and of every release under
``torch.compile``, expands the cached keys and values to one copy per query head
(``repeat_kv``) before calling SDPA. In a decode step that is two strided copies of the whole
cache per layer: 48 copies of about 14 µs each per step at the Qwen2.5-0.5B shape on an H200,
12% of the step's GPU time.

One new token per row needs no copy: the query heads that share a key/value head become that
head's queries, ``(B, H, 1, d) -> (B, H_kv, H / H_kv, d)``, and SDPA attends them to the cache
as it is; the mask ``(B, 1, 1, L)`` broadcasts over them. ``decode_sdpa`` does that for such
calls and hands every other call (prefill, several query tokens, a per-head mask, options it
does not know) to transformers' own ``sdpa`` unchanged. The rollout engine selects it around
each generate() (``selected``) on models whose attention runs ``sdpa``.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["NAME", "decode_sdpa", "selected"]

NAME = "rlhf_decode_sdpa"
_REGISTERED = False


def _stock_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _packable(module, query, attention_mask, dropout, kwargs) -> bool:
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups <= 1 or dropout:
        return False
    if any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "s_aux", "sinks")):
        return False
    if kwargs.get("output_attentions"):
        return False
    if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1
                                       or attention_mask.shape[2] != 1):
        return False
    return True


def decode_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0,
                scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature -> (output (B, q, H, d), None)."""
    if not _packable(module, query, attention_mask, dropout, kwargs):
        return _stock_sdpa()(module, query, key, value, attention_mask, dropout=dropout,
                             scaling=scaling, is_causal=is_causal, **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    # head h = kv * groups + g, the order repeat_kv expands the cache in
    packed = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        packed, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _register() -> bool:
    global _REGISTERED
    if not _REGISTERED:
        try:
            from transformers import AttentionInterface
        except ImportError:  # transformers before the attention interface (4.48)
            return False
        AttentionInterface.register(NAME, decode_sdpa)
        _REGISTERED = True
    return True


@contextlib.contextmanager
def selected(model: torch.nn.Module):
    """Inside, ``model``'s grouped-query attention layers that run transformers' ``sdpa`` run
    ``decode_sdpa`` (the configs they read are switched and switched back on exit)."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if (getattr(module, "num_key_value_groups", 1) > 1 and config is not None
                and getattr(config, "_attn_implementation", None) == "sdpa"):
            configs[id(config)] = config
    if not configs or not _register():
        yield
        return
    for config in configs.values():
        config._attn_implementation = NAME
    try:
        yield
    finally:
        for config in configs.values():
            config._attn_implementation = "sdpa"
