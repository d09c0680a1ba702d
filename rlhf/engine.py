"""The fast rollout engine: static KV cache, prefill + decode loop, decode step in a CUDA graph.

What it does, for B prompts left-padded to P tokens and at most R new tokens:

1. **Static KV cache** (``StaticKVCache``): one ``(B, kv_heads, P + R, head_dim)`` key and value
   buffer per layer, allocated at the prefill and written in place. Its addresses never change, so
   the decode step can be captured once and replayed.
2. **Prefill**: one forward over the prompts with an explicit 4-D additive attention mask (causal,
   pad keys hidden) and position ids from the prompt mask (padding does not shift positions), only
   the last position's logits kept (``logits_to_keep=1``).
3. **Decode**: one token per step. On CUDA the model forward of a step is captured in a CUDA graph
   (``decode_graph="cuda_graph"``, the default there) or compiled with
   ``torch.compile(mode="reduce-overhead")``; every step replays it after updating static input
   buffers in place (token, position, cache slot, mask column), so a step costs one graph launch
   instead of hundreds of kernel launches through PEFT-wrapped layers. On the CPU the step runs
   eagerly by default; ``decode_graph="compile"`` compiles it there too (Inductor's C++ code),
   which is how the CPU tests show that the step reads no per-step Python state: one compiled
   graph serves every step and every call, with the eager tokens.
4. **LoRA unmerged**: the policy adapter runs through PEFT's unmerged forward
   (``base(x) + B(A(x)) * scale``); the shared base weights are never written, so they stay the
   bit-exact reference model.
5. **Log-probs while sampling**: from the one-step logits ``(B, V)`` the engine records
   ``log_softmax(logits / temperature)[token]`` in fp32 - the same tempered, *unfiltered*
   distribution the trainer scores (top-k / top-p only change which token is drawn). No
   ``(B, T, V)`` tensor exists at any point.
6. **EOS per row**: a row stops after its first EOS (the EOS is a response token, mask 1); later
   columns of that row are ``pad_token_id`` with mask 0 and log-prob 0. The loop ends early when
   every row has stopped (checked every ``check_every`` steps, one host sync each).

Layout of the result (``Generation``)::

    sequences       (B, P + R) int64   [pad.. prompt | response .. eos pad..]
    attention_mask  (B, P + R) int64   prompt mask, then the response mask
    response_mask   (B, R)     bool    1 on response tokens up to and including the first EOS
    logprobs        (B, R)     fp32    log-prob of each response token under the sampling model
                                       (tempered), 0 where response_mask is 0

R is trimmed to the longest response actually generated (``<= max_new_tokens``).

Entry points: ``generate(model, prompt_ids, prompt_mask, max_new_tokens, ...)`` for one call, or a
``RolloutEngine`` kept across RL iterations (reuses its cache and captured graph while the batch
shape stays the same; ``release()`` frees them before a memory-hungry phase).
``samples_per_prompt=G`` samples G responses of every prompt (the groups of GRPO and its
family): the prompts are repeated in place, rows b*G .. b*G + G - 1 belonging to prompt b.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from rlhf import attention, distributed, lora_forward

__all__ = [
    "DECODE_GRAPH_MODES",
    "Generation",
    "RolloutEngine",
    "StaticKVCache",
    "generate",
    "pad_frame",
    "sample_tokens",
]

DECODE_GRAPH_MODES = ("auto", "cuda_graph", "compile", "none")


# --------------------------------------------------------------------------------------------
# Result container
# --------------------------------------------------------------------------------------------
@dataclass
class Generation:
    """Prompts, sampled responses and their log-probs; shapes in the module docstring."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    prompt_length: int

    @property
    def response_ids(self) -> torch.Tensor:
        """(B, R) int64; padding after EOS."""
        return self.sequences[:, self.prompt_length:]

    @property
    def response_lengths(self) -> torch.Tensor:
        """(B,) int64: response tokens per row, EOS included."""
        return self.response_mask.sum(-1)

    def without_prompt_padding(self) -> Generation:
        """The same generation without the prompt columns that are padding in every row.

        Generating from prompts padded to a fixed width keeps the engine's cache and captured
        graph; scoring the sequences afterwards need not pay for the all-pad columns. Positions
        come from the attention mask, so dropping them changes no number. One host sync.
        """
        longest_prompt = int(self.attention_mask[:, :self.prompt_length].sum(-1).max().item())
        drop = self.prompt_length - longest_prompt
        if drop == 0:
            return self
        return Generation(
            sequences=self.sequences[:, drop:],
            attention_mask=self.attention_mask[:, drop:],
            response_mask=self.response_mask,
            logprobs=self.logprobs,
            prompt_length=longest_prompt,
        )

    def truncated(self, eos_token_id: int | Sequence[int] | None) -> torch.Tensor:
        """(B,) bool: the rows whose response has no EOS (cut at the length limit)."""
        if eos_token_id is None:
            return torch.ones(self.response_mask.shape[0], dtype=torch.bool,
                              device=self.response_mask.device)
        eos = torch.as_tensor(eos_token_id, device=self.sequences.device).reshape(-1)
        return ~(torch.isin(self.response_ids, eos) & self.response_mask).any(-1)

    def rows(self, index: torch.Tensor) -> Generation:
        """The generation of the rows ``index`` (same columns)."""
        return Generation(self.sequences[index], self.attention_mask[index],
                          self.response_mask[index], self.logprobs[index], self.prompt_length)

    @staticmethod
    def concat(parts: Sequence[Generation], pad_token_id: int) -> Generation:
        """The rows of ``parts`` one after the other, laid out as one generation: prompts
        left-padded to the longest prompt width, responses right-padded to the longest response
        (pad id, mask 0, log-prob 0: what the masks hide)."""
        if len(parts) == 1:
            return parts[0]
        prompt = max(p.prompt_length for p in parts)
        response = max(p.response_mask.shape[1] for p in parts)

        def frame(part: Generation, name: str, value, per_token: bool = False) -> torch.Tensor:
            return pad_frame(getattr(part, name), 0 if per_token else
                             prompt - part.prompt_length,
                             response - part.response_mask.shape[1], value)

        return Generation(
            sequences=torch.cat([frame(p, "sequences", pad_token_id) for p in parts]),
            attention_mask=torch.cat([frame(p, "attention_mask", 0) for p in parts]),
            response_mask=torch.cat([frame(p, "response_mask", False, True) for p in parts]),
            logprobs=torch.cat([frame(p, "logprobs", 0.0, True) for p in parts]),
            prompt_length=prompt,
        )


def pad_frame(tensor: torch.Tensor, left: int, right: int, value) -> torch.Tensor:
    """A (B, P + R) sequence-frame tensor padded with ``left`` prompt columns and ``right``
    response columns, or a (B, R) response-frame tensor (pass left=0) with ``right``."""
    if left == 0 and right == 0:
        return tensor
    return torch.nn.functional.pad(tensor, (left, right), value=value)


# --------------------------------------------------------------------------------------------
# Static KV cache
# --------------------------------------------------------------------------------------------
class StaticKVCache(Cache):
    """Preallocated keys/values, written in place at the positions in ``write_positions``.

    Each layer's buffers are ``(B, kv_heads, max_length, head_dim)`` in the model dtype, allocated
    on the first ``update`` of that layer (the prefill), then never reallocated. The engine points
    ``write_positions`` (an int64 device tensor, the cache slots of the tokens in the current
    forward) at a static buffer before it captures the decode step, so that a replayed graph
    writes the slot the buffer holds at replay time.

    Only the methods the Hugging Face decoder models call with an explicit 4-D attention mask are
    implemented (``update``, the length queries); it is a ``transformers`` ``Cache`` so that type
    checks in the models pass, but it does not call ``Cache.__init__``, whose signature changes
    between releases.
    """

    is_compileable = True

    def __init__(self, num_layers: int, max_length: int):  # noqa: D107 - documented on the class
        self.num_layers = num_layers
        self.max_length = max_length
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.write_positions: torch.Tensor | None = None
        self.seen_tokens = 0  # host-side count, for models that ask for the cache length
        self.layers: list = []

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None, *args, **kwargs):
        """key/value_states (B, kv_heads, q, head_dim) -> (B, kv_heads, L, head_dim) buffers."""
        if self.write_positions is None:
            raise RuntimeError("StaticKVCache.write_positions must be set before a forward")
        keys = self.keys[layer_idx]
        if keys is None:
            batch, heads, _, _ = key_states.shape
            shape_k = (batch, heads, self.max_length, key_states.shape[-1])
            shape_v = (batch, heads, self.max_length, value_states.shape[-1])
            keys = torch.zeros(shape_k, dtype=key_states.dtype, device=key_states.device)
            self.keys[layer_idx] = keys
            self.values[layer_idx] = torch.zeros(
                shape_v, dtype=value_states.dtype, device=value_states.device
            )
        values = self.values[layer_idx]
        keys.index_copy_(2, self.write_positions, key_states.to(keys.dtype))
        values.index_copy_(2, self.write_positions, value_states.to(values.dtype))
        return keys, values

    # Length queries. With an explicit 4-D mask and explicit position ids the models use these
    # at most for bookkeeping; they answer from the host-side counter (no device sync).
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_length

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.max_length, 0

    def get_query_offset(self, *args, **kwargs) -> int:
        return self.seen_tokens

    def __len__(self) -> int:
        return self.num_layers

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    def nbytes(self) -> int:
        """Bytes held by the allocated key/value buffers."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


# Shorter common heads are not worth a forward of their own.
MIN_COMMON_PREFIX = 8


def common_prefix_length(ids: torch.Tensor, valid: torch.Tensor) -> int:
    """(R, P) prompt ids and bool mask -> how many leading columns every row holds alike (the
    same id and the same padding), capped at P - 1 so that every row keeps a column of its own
    (its last-position logits); 0 for fewer than 2 rows or a head of fewer than
    MIN_COMMON_PREFIX real tokens."""
    rows, length = ids.shape
    if rows < 2 or length < 2:
        return 0
    alike = ((ids == ids[:1]) | ~valid) & (valid == valid[:1])
    alike = alike.all(0)
    common = min(int(alike.int().cumprod(0).sum()), length - 1)  # one host sync per call
    # worth a forward of its own only for enough real tokens (a head of padding costs little)
    return common if int(valid[0, :common].sum()) >= MIN_COMMON_PREFIX else 0


def _copy_rows(target: StaticKVCache, source: StaticKVCache, rows) -> None:
    """Every layer's keys/values of ``source`` to ``target`` through ``rows`` (the batch
    mapping: expand or repeat_interleave); in place where ``target`` has buffers already (a
    captured decode step reads their addresses)."""
    for buffers, filled in ((target.keys, source.keys), (target.values, source.values)):
        for layer, tensor in enumerate(filled):
            if tensor is None:
                continue
            if buffers[layer] is None:
                buffers[layer] = rows(tensor).contiguous()
            else:
                buffers[layer].copy_(rows(tensor))


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) any float dtype -> (tokens (B,) int64, logp (B,) fp32).

    ``logp = log_softmax(logits / temperature)[token]``: the tempered distribution *before* the
    top-k / top-p filters, i.e. what the trainer recomputes from the sequences. Greedy takes the
    argmax of the logits. Sampling draws from softmax(filtered logits / temperature) with the
    exponential-race trick (argmax of p / E, E ~ Exp(1)): no host sync, so it can sit inside a
    captured decode loop. Top-k keeps the k largest logits; top-p keeps the smallest set of most
    likely tokens whose probability reaches ``top_p`` (the most likely token always stays).
    """
    scores = logits.float() / temperature
    log_norm = torch.logsumexp(scores, dim=-1)
    if greedy:
        tokens = scores.argmax(-1)
    else:
        filtered = scores
        if 0 < top_k < scores.shape[-1]:
            kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
            filtered = filtered.masked_fill(filtered < kth, float("-inf"))
        if top_p < 1.0:
            sorted_scores, order = torch.sort(filtered, dim=-1, descending=True)
            sorted_probs = torch.softmax(sorted_scores, dim=-1)
            # drop a token when the tokens ranked above it already reach top_p
            drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
            drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
            filtered = filtered.masked_fill(drop, float("-inf"))
        probs = torch.softmax(filtered, dim=-1)
        race = distributed.exponential_like(probs, generator)  # torchrun: the global draw
        tokens = (probs / race).argmax(-1)
    logp = scores.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - log_norm
    return tokens, logp


# --------------------------------------------------------------------------------------------
# Model resolution: what to call, with which adapter active
# --------------------------------------------------------------------------------------------
def _is_shared_backbone(model) -> bool:
    return hasattr(model, "lm_head_weight") and hasattr(model, "hidden_states")


def _causal_lm_of(model) -> torch.nn.Module:
    """The module whose forward takes input_ids / attention_mask / position_ids / past_key_values
    and returns logits: a SharedBackbone's Hugging Face model (LoRA layers injected), or the
    given Hugging Face causal LM / PEFT model itself."""
    if _is_shared_backbone(model):
        return model.causal_lm
    return model


def _cache_keyword(lm: torch.nn.Module) -> str:
    """The forward keyword that takes the KV cache: ``cache`` in recent transformers (where
    ``past_key_values`` is deprecated), ``past_key_values`` before. A PEFT wrapper's forward takes
    **kwargs, so its base model's signature decides."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    try:
        parameters = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def _config_of(lm: torch.nn.Module):
    config = getattr(lm, "config", None)
    if config is None and hasattr(lm, "get_base_model"):
        config = lm.get_base_model().config
    if config is None:
        raise TypeError(f"{type(lm).__name__} has no .config; pass a Hugging Face causal LM")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@contextlib.contextmanager
def _role_active(model, role: str | None):
    """Activate ``role``'s adapter on a SharedBackbone for the duration (None: adapters off);
    the role active before comes back afterwards. A plain HF / PEFT model is left as it is:
    whatever adapter is active samples."""
    if not _is_shared_backbone(model):
        yield
        return
    if role is not None and role not in model.roles:
        raise ValueError(f"role {role!r} has no adapter in this backbone (roles: {model.roles})")
    # SharedBackbone switches adapters layer by layer, keeps its trainable set and restores the
    # previous role on exit (backbone.py).
    with model.as_role(role):
        yield


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    """Dropout off while sampling; the previous train/eval state comes back afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _check_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None:
    if prompt_ids.dim() != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_ids and prompt_mask must both be (B, P); got {tuple(prompt_ids.shape)} and "
            f"{tuple(prompt_mask.shape)}"
        )
    if prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
        raise ValueError(f"empty prompt batch: prompt_ids has shape {tuple(prompt_ids.shape)}")
    mask = prompt_mask.to(torch.int64)
    if bool((mask[:, -1] == 0).any()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError(
            "prompts must be left-padded: each row of prompt_mask must be 0...0 1...1 with a real "
            "last token (use tokenizer.padding_side = 'left' or rlhf.data's prompt collator)"
        )


def _eos_tensor(eos_token_id, device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids:
        return None
    return torch.tensor(ids, dtype=torch.int64, device=device)


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------
class RolloutEngine:
    """Generates from a SharedBackbone (``role``'s adapter, default the policy) or any HF causal LM.

    The cache, the static decode buffers and the captured decode step are kept between calls
    with the same ``(B, P, max_new_tokens)``; a different shape rebuilds them. The captured graph
    reads the model's parameters at their current addresses, so in-place optimizer updates of the
    adapters are seen by the next rollout; anything that *reallocates* parameters (``.to()``,
    loading a checkpoint) needs ``release()`` first.

    decode_graph: "auto" (CUDA graph on CUDA, eager on CPU), "cuda_graph" (CUDA only; eager on
    the CPU), "compile" (``torch.compile(mode="reduce-overhead")`` of the step, on CUDA or CPU),
    "none" (eager). If capturing fails the engine warns once and runs eagerly.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        role: str | None = "policy",
        decode_graph: str = "auto",
        autocast_dtype: torch.dtype | None = None,
        check_every: int = 16,
    ):
        if decode_graph not in DECODE_GRAPH_MODES:
            raise ValueError(
                f"decode_graph={decode_graph!r} is not a mode; expected one of {DECODE_GRAPH_MODES}"
            )
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.model = model
        self.role = role
        self.lm = _causal_lm_of(model)
        self.config = _config_of(self.lm)
        self._cache_keyword = _cache_keyword(self.lm)
        self.decode_graph = decode_graph
        self.autocast_dtype = autocast_dtype
        self.check_every = check_every
        self._shape: tuple | None = None
        self._graph_failed = False
        self._reset_state()

    # ---------------------------------------------------------------- state
    def _reset_state(self) -> None:
        self.cache: StaticKVCache | None = None
        self._graph = None
        self._compiled = None
        self._step_logits: torch.Tensor | None = None
        self._shape = None

    def release(self) -> None:
        """Free the KV cache, the static buffers and the captured graph (and its memory pool)."""
        self._reset_state()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _adapter_copies(self):
        """Under autocast, the active LoRA adapters in the autocast dtype for the whole call
        (rlhf/lora_forward.py: no weight casts in the decode steps)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return lora_forward.rollout_copies(self.lm, self.autocast_dtype)

    def _mode_for(self, device: torch.device) -> str:
        if self.decode_graph == "auto":
            return "cuda_graph" if device.type == "cuda" else "none"
        if self.decode_graph == "cuda_graph" and device.type != "cuda":
            return "none"  # CUDA graphs only exist on CUDA; the CPU path is the eager one
        return self.decode_graph

    def _autocast(self, device: torch.device):
        """Autocast for a whole generate() call, with its cast cache off. With the cache on,
        the fp32 adapter weights' bf16 casts made by the prefill were reused inside the graph
        capture, so the graph recorded no cast and read the cached copies; autocast frees them
        when generate() returns, and the next rollout's replays (after an optimizer step) read
        stale or reused memory, silently. Without the cache each cast is a kernel of the step,
        captured and replayed with the current weights (as PyTorch advises for CUDA graphs)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype,
                              cache_enabled=False)

    def _allocate(self, batch: int, prompt_length: int, max_new_tokens: int, device, dtype) -> None:
        """Cache and static decode buffers for this shape (reused while the shape is unchanged)."""
        shape = (batch, prompt_length, max_new_tokens, device, dtype)
        if self._shape == shape:
            return
        self._reset_state()
        total = prompt_length + max_new_tokens
        self.cache = StaticKVCache(self.config.num_hidden_layers, total)
        # decode-step inputs, updated in place before each step (graph replay reads them)
        self._step_ids = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self._step_positions = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self._step_slot = torch.zeros(1, dtype=torch.int64, device=device)
        self._step_mask = torch.zeros(batch, 1, 1, total, dtype=dtype, device=device)
        self._shape = shape

    # ---------------------------------------------------------------- forward passes
    def _forward(self, input_ids, mask4d, position_ids) -> torch.Tensor:
        """One model forward writing into the cache; -> last-position logits (B, V)."""
        out = self.lm(
            input_ids=input_ids,
            attention_mask=mask4d,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_keyword: self.cache},
        )
        return out.logits[:, -1, :]

    def _decode_forward(self) -> torch.Tensor:
        return self._forward(self._step_ids, self._step_mask, self._step_positions)

    def _capture(self, device: torch.device, mode: str) -> None:
        """Build the replayable decode step (CUDA graph or compiled); eager on failure."""
        if mode == "none" or self._graph_failed:
            return
        if self._graph is not None or self._compiled is not None:
            return
        try:
            if mode == "cuda_graph":
                stream = torch.cuda.Stream(device=device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up outside the graph (lazy inits, cuBLAS handles)
                        self._decode_forward()
                torch.cuda.current_stream(device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._step_logits = self._decode_forward()
                self._graph = graph
            else:
                for buf in (self._step_ids, self._step_positions, self._step_slot,
                            self._step_mask, *self.cache.keys, *self.cache.values):
                    if buf is not None:
                        torch._dynamo.mark_static_address(buf)
                self._compiled = torch.compile(
                    self._decode_forward, mode="reduce-overhead", dynamic=False
                )
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager
            self._graph_failed = True
            self._graph = None
            self._compiled = None
            warnings.warn(
                f"rlhf.engine: could not build the {mode} decode step ({type(error).__name__}: "
                f"{error}); decoding eagerly (correct, but launch-bound on a GPU)",
                RuntimeWarning,
                stacklevel=3,
            )

    def _decode_step(self) -> torch.Tensor:
        if self._graph is not None:
            self._graph.replay()
            return self._step_logits
        if self._compiled is not None:
            return self._compiled()
        return self._decode_forward()

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        max_new_tokens: int,
        *,
        eos_token_id: int | Sequence[int] | None,
        pad_token_id: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        greedy: bool = False,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        samples_per_prompt: int = 1,
    ) -> Generation:
        """prompt_ids, prompt_mask (B, P) LEFT-padded -> Generation (module docstring).

        ``samples_per_prompt`` = G > 1 samples G responses of each prompt (a critic-free RL
        group): the result has B x G rows, rows b*G .. b*G + G - 1 those of prompt b. Each row
        draws its own tokens, so the G responses differ.

        temperature > 0 scales the logits for sampling and for the recorded log-probs; greedy
        takes the argmax. ``seed`` (or a ``generator`` on the prompts' device) makes the draws
        reproducible; with neither, torch's global RNG is used. ``eos_token_id``: one id, several,
        or None (never stop early).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not temperature > 0:
            raise ValueError(
                f"temperature must be > 0, got {temperature} (use greedy=True for argmax decoding)"
            )
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if isinstance(samples_per_prompt, bool) or not isinstance(samples_per_prompt, int) \
                or samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be an integer >= 1, got "
                             f"{samples_per_prompt!r}")
        _check_prompts(prompt_ids, prompt_mask)
        # each distinct prompt is prefilled once; its keys/values serve its G rows
        shared = (prompt_ids, prompt_mask, samples_per_prompt) if samples_per_prompt > 1 else None
        if samples_per_prompt > 1:
            prompt_ids = prompt_ids.repeat_interleave(samples_per_prompt, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(samples_per_prompt, dim=0)
        device = prompt_ids.device
        if generator is None and seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
        with _role_active(self.model, self.role), _eval_mode(self.lm), self._autocast(device), \
                self._adapter_copies(), attention.selected(self.lm):
            return self._generate(
                prompt_ids, prompt_mask, max_new_tokens, _eos_tensor(eos_token_id, device),
                pad_token_id, temperature, top_k, top_p, greedy, generator, shared,
            )

    def _prefill(self, prompt_ids: torch.Tensor, prompt_valid: torch.Tensor,
                 mask4d: torch.Tensor, positions: torch.Tensor, shared: tuple | None
                 ) -> torch.Tensor:
        """Fill the cache with the prompts' keys/values -> (B, V) last-position logits.

        Two kinds of repeated work are skipped, both exact up to the order in which sums round:
        * groups (``shared`` = (ids, mask, G): every G-th row is a distinct prompt): each
          distinct prompt is prefilled once and its keys/values copied to its G rows;
        * a common head: the leading columns that every (distinct) prompt holds alike, ids and
          padding (a chat template's system prompt; ``common_prefix_length``), are prefilled
          once, for one row, and copied to the others before the rest of the prompt runs.
        ``mask4d`` / ``positions``: the B rows' prefill mask (B, 1, P, L) and positions (B, P).
        """
        group = shared[2] if shared is not None else 1
        ids = shared[0] if shared is not None else prompt_ids
        mask4d, positions, valid = mask4d[::group], positions[::group], prompt_valid[::group]
        main = self.cache
        # the distinct rows' cache: the main one, or a scratch one copied to the groups after
        rows_cache = main if group == 1 else StaticKVCache(main.num_layers, main.max_length)
        common = common_prefix_length(ids, valid)
        if common:
            head = StaticKVCache(main.num_layers, main.max_length)
            head.write_positions, head.seen_tokens = main.write_positions[:common], 0
            self.cache = head
            try:
                self._forward(ids[:1, :common], mask4d[:1, :, :common], positions[:1, :common])
            finally:
                self.cache = main
            _copy_rows(rows_cache, head, lambda t: t.expand(ids.shape[0], -1, -1, -1))
        rows_cache.write_positions = main.write_positions[common:]
        rows_cache.seen_tokens = common
        self.cache = rows_cache
        try:
            logits = self._forward(ids[:, common:], mask4d[:, :, common:], positions[:, common:])
        finally:
            self.cache = main
        if group > 1:
            _copy_rows(main, rows_cache, lambda t: t.repeat_interleave(group, dim=0))
            logits = logits.repeat_interleave(group, dim=0)
        return logits

    def _generate(self, prompt_ids, prompt_mask, max_new_tokens, eos, pad_token_id, temperature,
                  top_k, top_p, greedy, generator, shared=None) -> Generation:
        device = prompt_ids.device
        batch, prompt_length = prompt_ids.shape
        total = prompt_length + max_new_tokens
        dtype = self.autocast_dtype or next(self.lm.parameters()).dtype
        mode = self._mode_for(device)
        self._allocate(batch, prompt_length, max_new_tokens, device, dtype)
        cache = self.cache
        min_value = torch.finfo(dtype).min
        prompt_valid = prompt_mask.to(torch.bool)

        # ---- prefill: causal over real prompt tokens; a pad query also sees itself, so that no
        # row of the softmax is empty (an all-masked row would put NaN in the cache)
        query = torch.arange(prompt_length, device=device)
        key = torch.arange(total, device=device)
        allowed = (key[None, :] <= query[:, None]) & (
            torch.cat([prompt_valid, prompt_valid.new_zeros(batch, max_new_tokens)], 1)[:, None, :]
            | (key[None, :] == query[:, None])[None]
        )
        prefill_mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        prefill_mask.masked_fill_(~allowed, min_value)
        positions = (prompt_valid.long().cumsum(-1) - 1).clamp_min(0)
        cache.write_positions = query
        cache.seen_tokens = 0
        logits = self._prefill(prompt_ids, prompt_valid, prefill_mask[:, None], positions, shared)
        del prefill_mask, allowed
        cache.seen_tokens = prompt_length

        # ---- decode buffers: the next token goes to slot P + t, at position n_real + t
        self._step_mask.fill_(min_value)
        self._step_mask[:, 0, 0, :prompt_length].masked_fill_(prompt_valid, 0.0)
        self._step_positions.copy_(prompt_valid.long().sum(-1, keepdim=True))
        self._step_slot.fill_(prompt_length)
        cache.write_positions = self._step_slot
        self._capture(device, mode)

        tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.int64, device=device)
        logprobs = torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=device)
        response_mask = torch.zeros(batch, max_new_tokens, dtype=torch.bool, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        check_every = 1 if device.type == "cpu" else self.check_every
        steps = 0
        for t in range(max_new_tokens):
            token, logp = sample_tokens(logits, temperature, top_k, top_p, greedy, generator)
            active = ~finished
            tokens[:, t] = torch.where(active, token, torch.full_like(token, pad_token_id))
            logprobs[:, t] = torch.where(active, logp, torch.zeros_like(logp))
            response_mask[:, t] = active
            if eos is not None:
                finished = finished | (active & torch.isin(token, eos))
            steps = t + 1
            if t + 1 == max_new_tokens:
                break
            # torchrun + fsdp2: every rank decodes until all are done (rlhf/distributed.py)
            if eos is not None and (t + 1) % check_every == 0 and distributed.all_done(finished):
                break
            # feed the token: slot P + t opens in the mask, the row's position advances by one
            self._step_ids.copy_(tokens[:, t:t + 1])
            self._step_mask[:, 0, 0, prompt_length + t] = 0.0
            if t > 0:
                self._step_positions.add_(1)
                self._step_slot.add_(1)
            cache.seen_tokens = prompt_length + t
            logits = self._decode_step()

        # trim to the longest response (one host sync)
        longest = int(response_mask[:, :steps].sum(-1).max().item()) if steps else 0
        longest = max(longest, 1)
        tokens = tokens[:, :longest]
        response_mask = response_mask[:, :longest]
        logprobs = logprobs[:, :longest]
        sequences = torch.cat([prompt_ids.to(torch.int64), tokens], dim=1)
        attention_mask = torch.cat(
            [prompt_mask.to(torch.int64), response_mask.to(torch.int64)], dim=1
        )
        return Generation(
            sequences=sequences,
            attention_mask=attention_mask,
            response_mask=response_mask,
            logprobs=logprobs,
            prompt_length=prompt_length,
        )


def generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    *,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    role: str | None = "policy",
    decode_graph: str = "auto",
    autocast_dtype: torch.dtype | None = None,
    samples_per_prompt: int = 1,
) -> Generation:
    """One rollout with a throw-away ``RolloutEngine`` (see it for the arguments).

    model: a SharedBackbone (``role``'s adapter samples; None = adapters off = the reference) or
    any Hugging Face causal LM / PEFT model (its active adapter samples). prompt_ids, prompt_mask:
    (B, P) int64, left-padded. Returns a ``Generation``. In a PPO loop keep one ``RolloutEngine``
    instead, so the cache and the captured decode step are built once.
    """
    engine = RolloutEngine(model, role=role, decode_graph=decode_graph,
                           autocast_dtype=autocast_dtype)
    try:
        return engine.generate(
            prompt_ids, prompt_mask, max_new_tokens, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, temperature=temperature, top_k=top_k, top_p=top_p,
            greedy=greedy, seed=seed, generator=generator, samples_per_prompt=samples_per_prompt,
        )
    finally:
        engine.release()
