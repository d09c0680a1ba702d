"""Packed sequences: run the transformer on real tokens only (docs/packing.md).

A padded batch ``(B, T)`` with an ``attention_mask`` costs ``B x T`` token slots in every linear
layer, MLP and attention call, whatever the mask says. Packing concatenates the real tokens of
the rows into fewer, fuller rows; position ids restart at 0 for every sequence and attention
stays inside each sequence. Two layouts:

* **flat** (flash-attn): all real tokens in one ``(1, N)`` row, with ``cu_seqlens`` (the
  cumulative sequence lengths) handed to ``flash_attn_varlen_func``. Attention costs
  ``sum(n_i^2)``, the rest ``N``. Used when flash-attn is usable (the ``gpu`` extra on a CUDA
  device, or a model loaded with ``attn_implementation="flash_attention_2"``).
* **bins** (SDPA or eager attention): the sequences are placed first-fit-decreasing into rows of
  a width ``W``; a row's unused tail is throw-away sequences. transformers (>= 5) sees position
  ids that restart and no attention mask, detects the packed format itself
  (``masking_utils.find_packed_sequence_indices``) and builds the block-diagonal causal mask per
  row. One ``(1, N)`` row would make that mask, and SDPA's work, ``N x N``; ``W`` is the longest
  sequence ``L`` (then attention is at most the padded batch's ``B x T x T``) or a multiple up
  to ``4 L`` where the estimated work (``_bin_width``, ``attention_cost_of``: attention is a
  small share of a large model's work) is lower.

``PackedBatch`` holds the index maps: ``index`` (N,) is the flat ``b * T + t`` position of each
real token in the padded batch (row-major order), ``slots`` (N,) its flat ``r * W + w`` position
in the packed rows. ``unpack`` scatters packed hidden states back to ``(B, T, H)`` (zeros at
padding), so every op downstream of the transformer body works unchanged; ``rows`` gathers the
``(N, H)`` real-token rows, which ``SharedBackbone.token_logprobs`` uses to run the lm_head on
real tokens only.

``Packing`` is the per-model choice ``packing = auto | on | off`` plus the token counters the
stages report (``tokens_real``, ``tokens_padded``, ``tokens_processed``):

* ``off``: never pack;
* ``on``: pack every batch; a model type or attention implementation that is not supported is
  an error;
* ``auto``: pack a batch when the model is supported and packing removes at least
  ``AUTO_MIN_SAVING`` (10 %) of the padded batch's token slots (``tokens_processed <= 0.9 x
  B x T``); otherwise run it padded.

Supported: model types whose packed forward is verified equal to the padded one in
tests/trainer/test_packing.py (``SUPPORTED_MODEL_TYPES``: Llama, Qwen2, GPT-2, whose absolute
position embeddings read the restarted position ids), with SDPA, eager or flash attention, and
no sliding window. Positions follow the padded path's convention
(``rlhf.layout._position_ids``: real tokens counted from 0, holes in the mask skipped), so packed
and padded forwards see the same positions and the same keys.
"""

from __future__ import annotations

import contextvars
import warnings
from dataclasses import dataclass

import torch

__all__ = [
    "AUTO_MIN_SAVING",
    "PACKING_MODES",
    "SUPPORTED_MODEL_TYPES",
    "VARLEN_ATTENTION",
    "PackedBatch",
    "Packing",
    "check_packing",
    "pack",
    "packed_logprobs",
    "unsupported_reason",
]

PACKING_MODES = ("auto", "on", "off")
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "gpt2")
AUTO_MIN_SAVING = 0.1
# our attention implementation for flat packing without a flash-loaded model: SDPA for every
# call except a flat packed one, which goes to flash_attn_varlen_func (registered on first use)
VARLEN_ATTENTION = "rlhf_varlen_sdpa"
FLASH_ATTENTIONS = ("flash_attention_2", "flash_attention_3")
SUPPORTED_ATTENTIONS = ("sdpa", "eager", VARLEN_ATTENTION, *FLASH_ATTENTIONS)
# dtypes flash_attn_varlen_func takes; other dtypes (fp32 without autocast) run the per-sequence
# SDPA loop instead
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def check_packing(value, setting: str = "packing") -> str:
    """``value`` if it is one of ``PACKING_MODES``, else a ValueError naming ``setting``."""
    if value not in PACKING_MODES:
        raise ValueError(f"{setting}={value!r} is not a packing mode; expected one of "
                         f"{PACKING_MODES} (auto: pack when the model supports it and it removes "
                         f"at least {AUTO_MIN_SAVING:.0%} of the padded token slots)")
    return value


def _attention_of(causal_lm) -> str:
    return str(getattr(causal_lm.config, "_attn_implementation", None) or "eager")


def unsupported_reason(causal_lm) -> str | None:
    """Why ``causal_lm`` (a Hugging Face causal LM, PEFT-wrapped or not) cannot run packed, or
    None when it can."""
    config = getattr(causal_lm, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return (f"model_type={model_type!r} is not one whose packed forward is verified (only "
                f"{SUPPORTED_MODEL_TYPES})")
    attention = _attention_of(causal_lm)
    if attention not in SUPPORTED_ATTENTIONS:
        return (f"attn_implementation={attention!r} is not supported for packing (only "
                f"{SUPPORTED_ATTENTIONS[:2] + FLASH_ATTENTIONS})")
    if getattr(config, "use_sliding_window", False) or any(
            kind == "sliding_attention" for kind in (getattr(config, "layer_types", None) or ())):
        return "the model uses sliding-window attention, which packing does not handle"
    return None


_FLASH: list = []  # the import's outcome, once: a failing import costs milliseconds per try


def flash_varlen_function():
    """``flash_attn.flash_attn_varlen_func`` when flash-attn is installed (the ``gpu`` extra),
    else None."""
    if not _FLASH:
        try:
            from flash_attn import flash_attn_varlen_func
        except Exception:  # noqa: BLE001 - not installed, or built for another torch/CUDA
            flash_attn_varlen_func = None
        _FLASH.append(flash_attn_varlen_func)
    return _FLASH[0]


def uses_flash(causal_lm, device: torch.device) -> bool:
    """Whether packed forwards of ``causal_lm`` take the flat layout with flash varlen attention:
    the model was loaded with flash attention, or flash-attn is installed and the model is on a
    CUDA device with SDPA attention (it is then switched to ``VARLEN_ATTENTION``)."""
    attention = _attention_of(causal_lm)
    if attention in FLASH_ATTENTIONS or attention == VARLEN_ATTENTION:
        return True
    return attention == "sdpa" and device.type == "cuda" and flash_varlen_function() is not None


# --------------------------------------------------------------------------------------------
# packing a batch
# --------------------------------------------------------------------------------------------
@dataclass
class PackedBatch:
    """A padded ``(B, T)`` batch packed into ``(R, W)`` rows (module docstring).

    input_ids, position_ids: (R, W) int64; index, slots: (N,) int64 (padded and packed flat
    positions of the N real tokens, row-major order of the padded batch); cu_seqlens: (S + 1,)
    int32 cumulative lengths of the S non-empty sequences in the flat layout (None for bins);
    max_seqlen: the longest sequence; flat: the layout.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    index: torch.Tensor
    slots: torch.Tensor
    shape: tuple[int, int]
    cu_seqlens: torch.Tensor | None
    max_seqlen: int
    flat: bool

    @property
    def tokens_real(self) -> int:
        return int(self.index.numel())

    @property
    def tokens_padded(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def tokens_processed(self) -> int:
        return int(self.input_ids.numel())

    def model_kwargs(self) -> dict:
        """Keyword arguments of the inner model's forward for this packed batch."""
        kwargs = dict(input_ids=self.input_ids, position_ids=self.position_ids,
                      attention_mask=None, use_cache=False)
        if self.flat:
            kwargs.update(cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
                          max_length_q=self.max_seqlen, max_length_k=self.max_seqlen)
        return kwargs

    def run(self, inner: torch.nn.Module) -> torch.Tensor:
        """The inner transformer (``model`` of Llama, ``transformer`` of GPT-2) on the packed
        rows -> (R, W, H) final hidden states."""
        token = _FLAT_CALL.set(self.flat)
        try:
            return inner(**self.model_kwargs())[0]
        finally:
            _FLAT_CALL.reset(token)

    def rows(self, packed: torch.Tensor) -> torch.Tensor:
        """(R, W, ...) packed values -> (N, ...) the real tokens', row-major padded order."""
        return packed.reshape(-1, *packed.shape[2:]).index_select(0, self.slots)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(R, W, ...) packed values -> (B, T, ...) with zeros at padded positions
        (differentiable: the gradient flows back to the real tokens' slots)."""
        values = self.rows(packed)
        batch, length = self.shape
        out = values.new_zeros(batch * length, *values.shape[1:])
        return out.index_copy(0, self.index, values).reshape(batch, length, *values.shape[1:])


def packed_logprobs(packed: PackedBatch, hidden: torch.Tensor, targets: torch.Tensor,
                    weight: torch.Tensor, bias: torch.Tensor | None = None, *, start: int = 0,
                    temperature: float = 1.0, return_entropy: bool = False,
                    ignore_index: int = -100):
    """Next-token log-probs from packed hidden states, the lm_head run on real tokens only.

    hidden (R, W, H) from ``packed.run``; targets (B, T) int: the token each position is scored
    as, ``ignore_index`` where none (padding, prompt). Column j of the result scores
    ``targets[:, start + 1 + j]`` from the hidden state at ``start + j``, as the padded layout
    does; a target whose previous position is padding (the first real token of a left-padded
    row) has no hidden state there and gives 0, like every ignored one. Returns logp
    (B, T - 1 - start) fp32 [, entropy of the same shape] through ``rlhf_kernels.linear_logprobs``.
    """
    import rlhf_kernels

    batch, length = packed.shape
    index = packed.index
    column = index % length
    flat_targets = targets.reshape(-1)
    next_target = flat_targets.index_select(0, (index + 1).clamp(max=batch * length - 1))
    keep = (column >= start) & (column < length - 1) & (next_target != ignore_index)
    chosen = keep.nonzero().squeeze(-1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, packed.slots.index_select(0,
                                                                                         chosen))
    out = rlhf_kernels.linear_logprobs(rows, weight, next_target.index_select(0, chosen).long(),
                                       bias=bias, temperature=temperature,
                                       ignore_index=ignore_index, return_entropy=return_entropy)
    where = index.index_select(0, chosen)

    def scatter(values: torch.Tensor) -> torch.Tensor:
        full = values.new_zeros(batch * length).index_copy(0, where, values)
        return full.view(batch, length)[:, start:length - 1]

    if return_entropy:
        return scatter(out[0]), scatter(out[1])
    return scatter(out)


def _first_fit_decreasing(lengths: list[int], width: int) -> list[tuple[int, int]]:
    """(row, offset) of each sequence placed first-fit-decreasing into rows of ``width``."""
    free: list[int] = []  # room left in each row
    place = [(0, 0)] * len(lengths)
    for b in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[b]
        row = next((r for r, room in enumerate(free) if room >= n), None)
        if row is None:
            row = len(free)
            free.append(width)
        place[b] = (row, width - free[row])
        free[row] -= n
    return place


def _bin_width(lengths: list[int], attention_cost: float | None) -> int:
    """The bins' width: the longest sequence L, or with ``attention_cost`` (a slot's attention
    cost per unit of width, relative to the rest of its cost: ``attention_cost_of``) the one of
    L, 2L, 3L, 4L (at most the total) with the least estimated work R x W x (1 + a x W)."""
    longest, total = max(lengths), sum(lengths)
    if attention_cost is None:
        return longest
    best = None
    for width in range(longest, min(4 * longest, max(total, longest)) + 1, longest):
        rows = 1 + max(row for (row, _), n in zip(_first_fit_decreasing(lengths, width), lengths)
                       if n)
        cost = rows * width * (1.0 + attention_cost * width)
        if best is None or cost < best[0]:
            best = (cost, width)
    return best[1]


def attention_cost_of(config) -> float:
    """A token slot's attention work per unit of bin width relative to its other work, for a
    decoder of this config: SDPA over a bin of width W costs ~4 W H flops per query slot (Q K^T
    and the weighted sum of V over all W keys, masked or not), the linears ~2 (4 H^2 + 3 H I)
    (q, k, v, o and a gated MLP; the lm_head runs on real tokens only, so it is left out)."""
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) \
        or 4 * hidden
    return 4.0 * hidden / (2.0 * (4 * hidden * hidden + 3 * hidden * inner))


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, flat: bool,
         lengths: list[int] | None = None, attention_cost: float | None = None) -> PackedBatch:
    """Pack a padded batch (any padding side, holes allowed): ``input_ids`` (B, T) int,
    ``attention_mask`` (B, T) (nonzero = real token). ``flat``: one (1, N) row with
    ``cu_seqlens`` (flash varlen); else first-fit-decreasing rows of the longest sequence's
    width L, or with ``attention_cost`` (``attention_cost_of(config)``) of the width in L..4L
    that costs least (``_bin_width``). ``lengths``: the rows' real-token counts when already
    read to the host. Rows without a real token take no slot. The unused tails of bins repeat
    the first real token (run, then dropped; a pad id there would make transformers warn about
    padding without a mask), as sequences of at most L tokens (positions stay below L).
    """
    device = input_ids.device
    batch, length = input_ids.shape
    real = attention_mask != 0
    if lengths is None:
        lengths = real.sum(-1).tolist()
    index = real.reshape(-1).nonzero().squeeze(-1)
    n_real = int(index.numel())
    if n_real == 0:
        raise ValueError("attention_mask has no real token; nothing to pack")
    max_seqlen = max(lengths)
    # positions counting real tokens from 0 (rlhf.layout._position_ids), real tokens only
    positions = (real.long().cumsum(-1) - 1).reshape(-1).index_select(0, index)
    ids = input_ids.reshape(-1).index_select(0, index).long()
    if flat:
        non_empty = [n for n in lengths if n]
        cu = torch.tensor([0, *torch.tensor(non_empty).cumsum(0).tolist()], dtype=torch.int32,
                          device=device)
        return PackedBatch(ids[None], positions[None], index,
                           torch.arange(n_real, device=device), (batch, length), cu, max_seqlen,
                           True)
    width = _bin_width(lengths, attention_cost)
    place = _first_fit_decreasing(lengths, width)
    n_rows = 1 + max(row for (row, _), n in zip(place, lengths) if n)
    # each real token's slot: its sequence's start slot + its position in the sequence
    starts = torch.tensor([row * width + offset for row, offset in place], device=device)
    row_of_token = index // length
    slots = starts.index_select(0, row_of_token) + positions
    # every slot's position: the slot minus the start of the segment (a sequence or a bin's
    # unused tail) it lies in
    segment_starts = {row * width + offset for (row, offset), n in zip(place, lengths) if n}
    used = [0] * n_rows
    for (row, _), n in zip(place, lengths):
        used[row] += n
    segment_starts |= {row * width + tail for row in range(n_rows)
                       for tail in range(used[row], width, max_seqlen)}
    segment_starts |= {row * width for row in range(n_rows)}
    total = n_rows * width
    is_start = torch.zeros(total, dtype=torch.bool, device=device)
    is_start[torch.tensor(sorted(segment_starts), device=device)] = True
    slot_numbers = torch.arange(total, device=device)
    segment_start = torch.where(is_start, slot_numbers, 0).cummax(0).values
    packed_positions = slot_numbers - segment_start
    packed_ids = ids[:1].expand(total).index_copy(0, slots, ids)
    return PackedBatch(packed_ids.view(n_rows, width), packed_positions.view(n_rows, width),
                       index, slots, (batch, length), None, max_seqlen, False)


# --------------------------------------------------------------------------------------------
# the choice per model, and the counters
# --------------------------------------------------------------------------------------------
class Packing:
    """``packing = auto | on | off`` for one model, and the tokens its forwards processed.

    ``plan(causal_lm, input_ids, attention_mask)`` returns the ``PackedBatch`` to run, or None
    for the padded forward, and counts the batch: ``tokens_real`` (real tokens),
    ``tokens_padded`` (B x T, what the padded forward processes) and ``tokens_processed`` (the
    slots actually run). ``take_stats`` returns the counts since the last call and resets them.
    """

    def __init__(self, mode: str = "off") -> None:
        self.mode = check_packing(mode)
        self._said_shared_prefix = False
        self._stats = {"tokens_real": 0, "tokens_padded": 0, "tokens_processed": 0,
                       "packed_forwards": 0, "padded_forwards": 0}

    def check_model(self, causal_lm, setting: str = "packing") -> None:
        """With ``on``, refuse a model that cannot run packed (one clear error)."""
        reason = unsupported_reason(causal_lm)
        if self.mode == "on" and reason is not None:
            raise ValueError(f"{setting}='on' cannot apply: {reason}; use packing='auto' (packs "
                             f"when it can) or 'off'")

    def plan(self, causal_lm, input_ids: torch.Tensor,
             attention_mask: torch.Tensor) -> PackedBatch | None:
        batch, length = input_ids.shape
        if self.mode == "off":
            self._count(None, batch * length, attention_mask)
            return None
        self.check_model(causal_lm)
        if unsupported_reason(causal_lm) is not None:  # auto on an unsupported model
            self._count(None, batch * length, attention_mask)
            return None
        lengths = (attention_mask != 0).sum(-1).tolist()
        if not any(lengths):
            self._count(None, batch * length, attention_mask, lengths)
            return None
        flat = uses_flash(causal_lm, input_ids.device)
        if flat:
            _use_varlen_attention(causal_lm)
        packed = pack(input_ids, attention_mask, flat=flat, lengths=lengths,
                      attention_cost=attention_cost_of(causal_lm.config))
        if self.mode == "auto" and \
                packed.tokens_processed > (1.0 - AUTO_MIN_SAVING) * batch * length:
            self._count(None, batch * length, attention_mask, lengths)
            return None
        self._count(packed, batch * length, attention_mask, lengths)
        return packed

    def count_padded(self, attention_mask: torch.Tensor) -> None:
        """Count a forward that ran padded outside ``plan`` (a path that cannot pack)."""
        self._count(None, attention_mask.numel(), attention_mask)

    def count_shared_prefix(self, attention_mask: torch.Tensor, processed: int) -> None:
        """Count a padded forward whose rows ran their shared prompt once
        (``SharedBackbone.hidden_states(shared_prefix=)``): ``processed`` slots run. With
        ``on``, says once that such forwards are not packed (the setting asked for every
        batch)."""
        if self.mode == "on" and not self._said_shared_prefix:
            self._said_shared_prefix = True
            warnings.warn(
                "packing='on': the rollout holds groups of samples of one prompt, so the RL "
                "scoring and update forwards run each group's prompt once (the shared-prefix "
                "forward) with the responses padded, not packed; a reward model's forward "
                "still packs (docs/packing.md). packing='auto' runs the same without this "
                "warning", stacklevel=2)
        self._count(None, attention_mask.numel(), attention_mask, processed=processed)

    def _count(self, packed, padded: int, attention_mask, lengths=None,
               processed: int | None = None) -> None:
        real = sum(lengths) if lengths is not None else int((attention_mask != 0).sum())
        self._stats["tokens_real"] += real
        self._stats["tokens_padded"] += padded
        if processed is None:
            processed = packed.tokens_processed if packed else padded
        self._stats["tokens_processed"] += processed
        self._stats["packed_forwards" if packed else "padded_forwards"] += 1

    def token_stats(self) -> dict:
        """``tokens_real``, ``tokens_padded`` and ``tokens_processed`` since the last call (the
        metrics the stages log), then every count reset to 0. Under torchrun: summed over ranks
        (rlhf/distributed.py)."""
        from rlhf import distributed

        stats = self.take_stats()
        return distributed.sum_counts(
            {key: stats[key] for key in ("tokens_real", "tokens_padded", "tokens_processed")})

    def take_stats(self) -> dict:
        """Counts since the last call (then reset to 0)."""
        stats = dict(self._stats)
        for key in self._stats:
            self._stats[key] = 0
        return stats


# --------------------------------------------------------------------------------------------
# flat packing on a model loaded with SDPA: flash_attn_varlen_func for the packed calls only
# --------------------------------------------------------------------------------------------
_FLAT_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("rlhf_flat_packed_call",
                                                                  default=False)


def _varlen_mask(*args, **kwargs):
    """SDPA's mask, except in a flat packed call: the attention reads ``cu_seqlens`` there, and
    the (N, N) block-diagonal mask transformers would build is not needed."""
    from transformers.masking_utils import sdpa_mask

    if _FLAT_CALL.get():
        return None
    return sdpa_mask(*args, **kwargs)


def _segment_sdpa(query, key, value, cu_seqlens, scaling, dropout):
    """Causal SDPA per sequence of a flat packed (1, heads, N, d) batch -> (1, N, heads, d)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    bounds = cu_seqlens.tolist()
    parts = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling,
        dropout_p=dropout) for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts, dim=2).transpose(1, 2)


def _varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, **kwargs):
    """Attention of ``VARLEN_ATTENTION``: flash_attn_varlen_func on a flat packed call (it
    carries ``cu_seq_lens_q``), transformers' SDPA on every other call (generation, padded
    forwards). query (1, heads, N, d), key/value (1, kv_heads, N, d) -> ((1, N, heads, d),
    None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    function = flash_varlen_function()
    if function is None or query.dtype not in FLASH_DTYPES:
        return _segment_sdpa(query, key, value, cu_seqlens, scaling, dropout), None
    out = function(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                   cu_seqlens, kwargs.get("cu_seq_lens_k", cu_seqlens), kwargs["max_length_q"],
                   kwargs.get("max_length_k", kwargs["max_length_q"]), dropout_p=dropout,
                   softmax_scale=scaling, causal=True)
    out = out[0] if isinstance(out, tuple) else out
    return out[None], None


def _use_varlen_attention(causal_lm) -> None:
    """Register ``VARLEN_ATTENTION`` with transformers and switch an SDPA model to it (a model
    loaded with flash attention keeps transformers' own varlen path)."""
    if _attention_of(causal_lm) != "sdpa":
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, _varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    causal_lm.set_attn_implementation(VARLEN_ATTENTION)
