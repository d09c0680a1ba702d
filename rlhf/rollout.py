"""Sampling responses from a causal LM with a KV cache (the simple loop; see rlhf.engine).

Layout of a generated batch (the ``Generation`` dataclass), for B prompts left-padded to P tokens
and at most R new tokens::

    sequences       (B, P + R) int64   [pad.. prompt | response .. eos pad..]
    attention_mask  (B, P + R) int64   1 on real prompt tokens and on response tokens up to and
                                       including the first EOS of the row
    response_mask   (B, R)     bool    the response part of ``attention_mask``

Left padding on the prompt keeps every row's last prompt token at column P - 1, so the first
decode step is one batched forward; position ids come from the attention mask so that padding
does not shift positions. A row stops at its first EOS (kept, and counted as a response token);
later columns of that row are padding.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import DynamicCache

__all__ = ["Generation", "SamplingConfig", "generate", "generate_with_role", "sample_next_token"]


@dataclass
class SamplingConfig:
    """How tokens are drawn. ``top_k = 0`` and ``top_p = 1.0`` switch those filters off."""

    max_new_tokens: int = 24
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0, got {self.temperature} (use a small value such as "
                "1e-4 for near-greedy decoding)"
            )
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    """Prompts and sampled responses; shapes in the module docstring."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_length: int

    @property
    def response_ids(self) -> torch.Tensor:
        """(B, R) int64; padding after EOS."""
        return self.sequences[:, self.prompt_length:]

    @property
    def response_lengths(self) -> torch.Tensor:
        """(B,) int64: response tokens per row, EOS included."""
        return self.response_mask.sum(-1)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) any float dtype -> token ids (B,) int64.

    Temperature first, then top-k, then top-p (nucleus: the smallest set of most likely tokens
    whose probability reaches ``top_p``; the most likely token always stays).
    """
    scores = logits.float() / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    sampling: SamplingConfig,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Generation:
    """Sample responses with a KV cache from any Hugging Face causal LM (a PEFT model included:
    whichever adapter is active on ``model`` is the one that samples).

    prompt_ids, prompt_mask: (B, P) int64, LEFT-padded (the collators in ``rlhf.data`` pad prompts
    on the left). ``generator`` (CPU) makes the draws reproducible. Returns a ``Generation``.
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_ids and prompt_mask must both be (B, P); got {tuple(prompt_ids.shape)} and "
            f"{tuple(prompt_mask.shape)}"
        )
    if prompt_mask.shape[1] and bool((prompt_mask[:, -1] == 0).any()):
        raise ValueError(
            "prompts must be left-padded (the last column of prompt_mask is 0 for some row); "
            "pad prompts on the left for generation"
        )
    device = prompt_ids.device
    batch, prompt_length = prompt_ids.shape
    attention_mask = prompt_mask.long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    cache = DynamicCache()
    step_ids = prompt_ids
    step_positions = position_ids
    with autocast:
        for _ in range(sampling.max_new_tokens):
            out = model(
                input_ids=step_ids,
                attention_mask=attention_mask,
                position_ids=step_positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = out.past_key_values
            token = sample_next_token(
                out.logits[:, -1],
                sampling.temperature,
                sampling.top_k,
                sampling.top_p,
                generator=generator,
            ).to(device)
            is_real = ~finished
            token = torch.where(is_real, token, torch.full_like(token, pad_token_id))
            new_tokens.append(token)
            kept.append(is_real)
            finished = finished | (token == eos_token_id)
            if bool(finished.all()):
                break
            attention_mask = torch.cat([attention_mask, is_real.long().unsqueeze(-1)], dim=-1)
            step_ids = token.unsqueeze(-1)
            step_positions = step_positions[:, -1:] + 1
    response = torch.stack(new_tokens, dim=1)
    response_mask = torch.stack(kept, dim=1)
    sequences = torch.cat([prompt_ids, response], dim=1)
    full_mask = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)
    return Generation(sequences, full_mask, response_mask, prompt_length)


def generate_with_role(
    backbone,
    role: str | None,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    sampling: SamplingConfig,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Generation:
    """``generate`` with one role of a ``SharedBackbone``: "policy" samples from the policy
    adapter, None from the reference (all adapters off, i.e. the SFT model)."""
    with backbone.as_role(role) as causal_lm:
        return generate(causal_lm, prompt_ids, prompt_mask, sampling, eos_token_id,
                        pad_token_id, generator=generator, autocast_dtype=autocast_dtype)
