"""How a padded ``(B, T)`` batch runs through a Hugging Face decoder.

Every forward of ``SharedBackbone`` (rlhf/backbone.py) and of a plugged sequence-classifier
reward model takes ``input_ids (B, T)`` and ``attention_mask (B, T)`` (1 = real token) with any
padding side. This module holds what that layout needs: the batch check, positions that count
real tokens only (so a left-padded row sees the positions of its unpadded sequence), the index of
each row's last real token (where a reward is read), the transformer under the LM head, and the
shared-prompt forward that runs each distinct prompt of a group once into a key/value cache.
Packed sequences (rlhf/packing.py) follow the same position convention.
"""

from __future__ import annotations

import torch
from torch import nn


def _check_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)
        raise ValueError(f"input_ids must be a (B, T) tensor, got {got}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be int64 (or int32), got {input_ids.dtype}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = (tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor)
               else type(attention_mask).__name__)
        raise ValueError(
            f"attention_mask must be a tensor of the shape of input_ids {tuple(input_ids.shape)} "
            f"(1 = real token, 0 = padding), got {got}"
        )


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, T) int64 positions counting real tokens only.

    With left padding the first real token must sit at position 0, as in the unpadded sequence;
    Hugging Face models default to ``arange(T)`` and would shift it.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def _last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) int64 index of the last real token, left or right padding."""
    real = attention_mask != 0
    if not bool(real.any(-1).all()):
        empty = (~real.any(-1)).nonzero().flatten().tolist()
        raise ValueError(f"rows {empty} of attention_mask have no real token; nothing to score")
    positions = torch.arange(real.shape[-1], device=real.device)
    return torch.where(real, positions, -1).amax(-1)


def _inner_model(causal_lm: nn.Module) -> nn.Module:
    """The transformer under the LM head (``model`` for Llama/Qwen2, ``transformer`` for GPT-2)."""
    prefix = getattr(causal_lm, "base_model_prefix", "")
    inner = getattr(causal_lm, prefix, None) if prefix else None
    if inner is None and hasattr(causal_lm, "get_decoder"):
        inner = causal_lm.get_decoder()
    if inner is None:
        raise ValueError(
            f"{type(causal_lm).__name__} exposes no inner transformer (base_model_prefix="
            f"{prefix!r}, no get_decoder()); expected a Hugging Face *ForCausalLM model"
        )
    return inner


def _shared_prefix_body(inner: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        prefix: int, first: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """(B, T, H) hidden states with each distinct prompt run once (``SharedBackbone.
    _shared_prefix_plan``): the U prompts ``input_ids[first, :prefix]`` fill a key/value cache,
    its rows are repeated to the B rows (``inverse``), and the B responses run on it.

    The prompt's activations are computed and stored once per distinct prompt instead of once
    per row, and autograd sums the gradient reaching them from every row that reads them. With
    GRPO's groups of G samples and prompts much longer than the responses (a chat template),
    most of a forward is the prompt: the update and the reference scoring then cost about
    (P + G R) / (G (P + R)) of the padded forward.
    """
    from rlhf.engine import _cache_keyword

    positions = _position_ids(attention_mask)
    head = inner(input_ids=input_ids[first, :prefix], attention_mask=attention_mask[first, :prefix],
                 position_ids=positions[first, :prefix], use_cache=True)
    keyword = _cache_keyword(inner)  # "cache" in transformers >= 5.2x, "past_key_values" before
    cache = getattr(head, keyword)
    cache.batch_select_indices(inverse)  # a differentiable gather of every layer's keys/values
    tail = inner(input_ids=input_ids[:, prefix:], attention_mask=attention_mask,
                 position_ids=positions[:, prefix:], use_cache=True, **{keyword: cache})
    return torch.cat([head.last_hidden_state[inverse], tail.last_hidden_state], dim=1)
