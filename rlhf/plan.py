"""Memory planner: the expected peak memory of each PPO stage, and the largest batch that fits.

``plan(config, batch=..., prompt_length=..., response_length=...)`` counts, for the iteration of
``benchmarks/e2e_ppo.py`` (the same steps as rlhf/rl.py, one SharedBackbone for four roles)::

    resident   base weights (dtype) + 3 LoRA adapters and 2 heads (fp32, PEFT's adapter dtype)
               + AdamW moments of the trained policy and critic adapters and the value head
               + the rollout engine's static KV cache (kept between iterations)
    rollout    + the prefill's largest layer working set (B x P tokens, no grad)
               or one decode step's logits and sampling buffers (B x V), whichever is larger
    scoring    + one no-grad forward of ``forward_chunk`` rows (a layer's working set, the
               final hidden states) + one ``linear_logprobs`` logits chunk or the fp32 copy the
               value head reads
    update     + adapter gradients + one minibatch: with gradient checkpointing the input of
               every layer plus one layer's saved activations and backward temporaries, without
               it every layer's saved activations; + the loss head (``linear_ppo_loss``'s d hidden
               and one logits chunk, or the value head's fp32 copy)

Per-token byte counts of a layer follow what PyTorch and PEFT allocate for a Llama/Qwen2 decoder
layer: HF RMSNorm upcasts to fp32, every LoRA'd linear casts its input to the adapter dtype
(fp32; a new tensor when the base is bf16) and forms ``base + B(A(x)) * s`` in fp32 before the
cast back. Attention is assumed to be SDPA flash/efficient (no S x S scores; on the CPU the S x S
boolean mask of the model is added). Allocator slack, CUDA context and cuBLAS workspaces are not
counted (``overhead_gib`` adds a constant for them; 0 by default).

``critic=False`` plans a critic-free run (GRPO and its family, rlhf/rl.py): no critic adapter
(deleted before training), no value-head reads, no critic gradients or AdamW moments.

``quantization="nf4"|"fp4"|"int8"`` plans a bitsandbytes-quantized base (rlhf/quant.py,
docs/quantization.md): the decoder linears as bitsandbytes stores them, the dense copy a 4-bit
matmul makes of its weight as a transient; ``optimizer="adamw8bit"`` 8-bit Adam moments.
``plan_training_stage`` plans one step of the SFT (LoRA) and reward-model stages, and ``fit``
answers what fits a card per stage (``rlhf plan MODEL --card 12``): the largest batch and the
longest sequence, or why nothing fits. ``card_table_block`` renders the README's card table.
``update_activations`` (the update stage's activations) is what ``rlhf.memory.estimate_memory``
counts the docs/memory.md table with too, for the shared backbone and the four-model setups.

``main(argv)`` is the ``rlhf plan`` command: a preset name (``PRESETS``, or its hub name,
``PRESET_HUB_NAMES``), a named model, a model directory, a saved backbone, a config.json or a
hub name in the local cache.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BATCH_SEARCH_LIMIT", "PRESETS", "PRESET_HUB_NAMES", "LiveTensorTracker", "ModelDims",
           "fit", "fit_table_markdown", "hf_config", "largest_batch", "main", "plan",
           "plan_training_stage"]

GIB = 2**30
STAGES = ("rollout", "scoring", "update")

# Public configs (config.json on the Hugging Face hub), written here: nothing is downloaded.
PRESETS: dict[str, dict] = {
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0,
                         max_position_embeddings=32768, rms_norm_eps=1e-6),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536,
                         intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0,
                         max_position_embeddings=32768, rms_norm_eps=1e-6),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, tie_word_embeddings=False, rope_theta=1000000.0,
                       max_position_embeddings=32768, rms_norm_eps=1e-6),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0,
                       max_position_embeddings=8192, rms_norm_eps=1e-5),
    # a few-second CPU shape for --smoke runs and tests
    "tiny": dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 tie_word_embeddings=True, max_position_embeddings=512),
}

# The presets' Hugging Face hub names (base and instruct models have the same shapes): `rlhf
# plan Qwen/Qwen2.5-1.5B` plans the preset without the hub or its cache.
PRESET_HUB_NAMES: dict[str, str] = {
    "Qwen/Qwen2.5-0.5B": "qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b",
    "Qwen/Qwen2.5-1.5B": "qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B-Instruct": "qwen2.5-1.5b",
    "Qwen/Qwen2.5-7B": "qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b",
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b", "meta-llama/Meta-Llama-3-8B-Instruct": "llama-3-8b",
}
# the largest batch `largest_batch` and `fit` try: one found there may not be the largest
BATCH_SEARCH_LIMIT = 4096
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")  # rlhf/quant.py
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
# linear_logprobs / linear_ppo_loss: one (rows, V) logits chunk of at most this many bytes
_LOGITS_BUDGET = {"cuda": 512 * 2**20, "cpu": 64 * 2**20}


def hf_config(name: str, **overrides):
    """A ``transformers`` config for preset ``name`` (random-init benchmarks; no download)."""
    from transformers import AutoConfig

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    values = dict(PRESETS[name])
    values.update(overrides)
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


@dataclass(frozen=True)
class ModelDims:
    """The numbers of a Llama/Qwen2-style decoder that decide its memory."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    qkv_bias: bool

    @classmethod
    def from_dict(cls, config: dict) -> ModelDims:
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in config]
        if missing:
            raise ValueError(f"the model config lacks {missing}: the planner needs a "
                             "Llama/Qwen2-style decoder config")
        heads = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"], num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias")),
        )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of q, k, v, o, gate, up, down."""
        h, q, kv, i = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def params(self) -> int:
        h = self.hidden_size
        layer = sum(a * b for a, b in self.linears()) + 2 * h
        if self.qkv_bias:
            layer += self.q_dim + 2 * self.kv_dim
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * layer + h + head

    def lora_params(self, rank: int) -> int:
        return self.num_layers * sum(rank * (a + b) for a, b in self.linears())

    def lm_head_params(self) -> int:
        """The lm_head's own parameters (0 when it is tied to the input embeddings)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def weight_bytes(self, w: int, quantization: str = "none",
                     quantize_lm_head: bool = False) -> int:
        """Bytes of the base weights: everything in ``w`` bytes, except with a quantization
        the decoder linears (and, with ``quantize_lm_head``, an untied lm_head) as
        bitsandbytes stores them (``quantized_linear_bytes``)."""
        total = self.params() * w
        if quantization == "none":
            return total
        shapes = [shape for shape in self.linears() for _ in range(self.num_layers)]
        if quantize_lm_head and not self.tie_word_embeddings:
            shapes.append((self.hidden_size, self.vocab_size))
        for a, b in shapes:
            total += quantized_linear_bytes(a, b, quantization) - a * b * w
        return total


# bitsandbytes' storage of one quantized (in, out) weight. 4-bit with double quant: two weights
# per byte, one uint8 absmax per 64-weight block, one fp32 absmax per 256 blocks, the 16-entry
# fp32 code, the nested 256-entry fp32 code and an fp32 offset. int8: one byte per weight and an
# fp32 scale per output row (SCB).
_BNB_BLOCK, _BNB_NESTED_BLOCK = 64, 256


def quantized_linear_bytes(fan_in: int, fan_out: int, quantization: str) -> int:
    n = fan_in * fan_out
    if quantization == "int8":
        return n + 4 * fan_out
    if quantization not in ("nf4", "fp4"):
        raise ValueError(f"quantization={quantization!r} is not one of {QUANTIZATIONS}")
    blocks = -(-n // _BNB_BLOCK)
    return (n + 1) // 2 + blocks + 4 * -(-blocks // _BNB_NESTED_BLOCK) + 4 * (16 + 256 + 1)


def _load_config(config) -> dict:
    if isinstance(config, dict):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, str) and config in PRESETS:
        return PRESETS[config]
    if isinstance(config, str) and config.lower() in PRESETS \
            and not Path(config).expanduser().exists():
        return PRESETS[config.lower()]  # Qwen2.5-1.5B
    from rlhf import named_models

    path = Path(config).expanduser()
    if not path.exists() and named_models.is_named(str(config)):  # what model= takes too
        path = named_models.model_dir(str(config))
    if path.is_dir() and (path / "roles.json").is_file() and not (path / "config.json").is_file():
        # a saved SharedBackbone (runs/rm/backbone, what `rlhf ppo model=` takes): its base's
        # config is recorded in roles.json
        base = json.loads((path / "roles.json").read_text()).get("base_config")
        if isinstance(base, dict):
            return base
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file() and isinstance(config, str) and "/" in config \
            and not Path(config).expanduser().exists():
        # a hub name (org/name) whose files are in the local Hugging Face cache: no network
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(config, "config.json")
        except ValueError:  # not a hub name at all (runs/rm/backbne, ./model): a missing path
            cached = None
        if isinstance(cached, str):
            path = Path(cached)
    if not path.is_file() and isinstance(config, str) \
            and not Path(config).expanduser().exists():
        hub_names = {name.lower(): preset for name, preset in PRESET_HUB_NAMES.items()}
        if config.lower() in hub_names:  # a preset's hub name, not in the local cache
            return PRESETS[hub_names[config.lower()]]
    if not path.is_file():
        missing = ""
        if isinstance(config, str) and not Path(config).expanduser().exists() \
                and (config.startswith(("/", ".", "~")) or config.count("/") > 1):
            missing = f" (there is no file or directory {config!r})"
        elif isinstance(config, str) and Path(config).expanduser().is_dir():
            missing = f" (the directory {config!r} holds no config.json)"
        import difflib

        known = [*PRESETS, *named_models.NAMED_MODELS, *PRESET_HUB_NAMES]
        close = difflib.get_close_matches(str(config), known, n=2, cutoff=0.75) \
            or difflib.get_close_matches(str(config).lower(), known, n=2, cutoff=0.75)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else (
            "; for another model, give its config.json (the one file of its hub folder the "
            "planner reads)")
        raise ValueError(f"{config!r} is neither a preset ({sorted(PRESETS)}), a named model "
                         f"({sorted(named_models.NAMED_MODELS)}), a model directory (its "
                         f"config.json, or a saved backbone's roles.json), a config.json file, "
                         f"nor a hub name in the local Hugging Face cache{missing}{hint}")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not a model config: it does not read as JSON "
                         f"({error}); give a model directory or its config.json") from None
    if not isinstance(values, dict):
        raise ValueError(f"{str(path)!r} is not a model config: it holds a JSON "
                         f"{type(values).__name__}, where a config.json is one object "
                         f"(hidden_size, num_hidden_layers, ...)")
    needed = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads")
    lacking = [key for key in needed if key not in values]
    if lacking:
        raise ValueError(f"the model config {str(path)!r} (model_type "
                         f"{values.get('model_type')!r}) lacks {lacking}: the planner needs a "
                         f"Llama/Qwen2-style decoder config")
    return values


# --------------------------------------------------------------------------------------------
# per-token byte counts of one decoder layer
# --------------------------------------------------------------------------------------------
def _layer_forward_peak(d: ModelDims, w: int, lora: bool) -> int:
    """Bytes per token live at the peak of one layer's no-grad forward (its MLP): the residual
    and normed input, act(gate), and inside up_proj its output plus, with LoRA, the fp32
    ``B(A(x)) * s`` and the fp32 sum (and the fp32 copy of the input when the base is not fp32).
    Under the trainer's bf16 autocast (rlhf/lora_forward.py) the sum is one bf16 GEMM output,
    but the no-grad stages measured on the H200 still peaked as this counts (rollout and scoring
    at 1.01 and 0.99 of it at the Qwen2.5-1.5B shape; counting only the bf16 output gave 1.04),
    so it serves both modes."""
    h, i = d.hidden_size, d.intermediate_size
    cast = 4 * h if (lora and w != 4) else 0
    lora_terms = 8 * i if lora else 0
    return 2 * w * h + 2 * w * i + lora_terms + cast


def _layer_saved(d: ModelDims, w: int, fast_lora: bool = False) -> int:
    """Bytes per token one LoRA'd layer keeps for its backward (training forward).

    RMSNorm (HF) keeps its normalised fp32 product (bf16 base: the fp32 copy of its input and the
    bf16 cast instead) and its output; attention keeps the rotated queries, the keys and values
    repeated to the query heads (SDPA with a padding mask takes the repeat_kv path) and its
    output; the MLP keeps gate, act(gate), up and their product; LoRA keeps an fp32 copy of each
    adapted linear's input when the base is not fp32 (one per linear: PEFT casts per call);
    ``fast_lora`` (bf16 autocast, rlhf/lora_forward.py): the adapters read the linears' own
    inputs, which the layer keeps anyway, so nothing more.
    """
    h, i, q = d.hidden_size, d.intermediate_size, d.q_dim
    upcast = 0 if w == 4 else 4
    norms = 2 * (2 * w * h + upcast * h)
    attention = 4 * w * q
    mlp = 4 * w * i
    lora_inputs = 0 if fast_lora else upcast * (3 * h + q + 2 * h + i)  # q k v, o, gate up, down
    return norms + attention + mlp + lora_inputs + w * h  # + the residual sum


def _layer_backward_extra(d: ModelDims, w: int, fast_lora: bool = False) -> int:
    """Bytes per token of gradient temporaries while one layer's backward runs (its MLP): the
    gradients of the product and of act(gate), of the residual stream, and with a bf16 base the
    fp32 gradient flowing through the LoRA branch (none with ``fast_lora``: bf16 autocast)."""
    h, i = d.hidden_size, d.intermediate_size
    return 2 * w * i + 2 * w * h + (4 * i if w != 4 and not fast_lora else 0)


def _logits_chunk(tokens: int, vocab: int, itemsize: int, device: str) -> int:
    """Bytes of one (rows, V) logits chunk of linear_logprobs / linear_ppo_loss."""
    budget = _LOGITS_BUDGET["cuda" if device == "cuda" else "cpu"]
    rows = max(1, budget // (vocab * itemsize))
    if rows >= 64:
        rows -= rows % 64
    return min(rows, tokens) * vocab * itemsize


# --------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------
def plan(config="qwen2.5-1.5b", *, batch: int = 16, prompt_length: int = 128,
         response_length: int = 256, lora_rank: int = 16, dtype: str = "bfloat16",
         gradient_checkpointing: bool = True, minibatch: int | None = None,
         forward_chunk: int | None = None, device: str = "cuda", top_p: float = 1.0,
         overhead_gib: float = 0.0, config_overrides: dict | None = None,
         critic: bool = True, quantization: str = "none", quantize_lm_head: bool = False,
         optimizer: str = "adamw", gpus: int = 1, strategy: str = "ddp",
         autocast: bool | None = None) -> dict:
    """Expected peak bytes per stage of one PPO iteration (module docstring), per GPU.

    config: a preset name, a config.json path (or its directory), a dict or an HF config.
    minibatch / forward_chunk: rows per update step / per scoring forward (default: batch).
    quantization: the base's decoder linears as bitsandbytes stores them (``dtype`` is then the
    compute dtype of everything else); each quantized matmul dequantizes its weight to
    ``dtype`` first, so one layer's largest weight is a transient of every forward and backward.
    optimizer: the adapters' AdamW (``adamw8bit``: 1-byte moments for tensors of 4096 elements
    or more; ``paged_*`` as their unpaged versions: paging only moves what does not fit).
    gpus, strategy: data parallel over ``gpus`` ranks (docs/distributed.md): the batch sizes are
    global and a rank runs its share of the rows, holds the whole gathered rollout and a flat
    copy of the gradients for their all-reduce; ``fsdp2`` also shards the decoder layers'
    weights (one gathered layer and the prefetched next one whole at a time).
    autocast: whether the stages run under autocast in ``dtype`` (None: as the trainer does, on
    CUDA with a 16-bit dtype). With a dense base the LoRA layers then take the two-GEMM path of
    rlhf/lora_forward.py, whose backward keeps no fp32 copies of the layers' inputs (a quantized
    base keeps PEFT's forward): the update stage counts less (the H200 measured the Qwen2.5-1.5B
    update at 0.97 of this count, 0.90 of the fp32-copy one).
    Returns ``{"peak_bytes", "peak_stage", "resident": {...}, "stages": {stage: {part: bytes,
    "total": bytes}}, "inputs": {...}}``.
    """
    values = dict(_load_config(config))
    values.update(config_overrides or {})
    d = ModelDims.from_dict(values)
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPE_BYTES)}")
    for name, value in (("batch", batch), ("prompt_length", prompt_length),
                        ("response_length", response_length), ("lora_rank", lora_rank)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    for name, value in (("minibatch", minibatch), ("forward_chunk", forward_chunk)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 (rows), or None for the whole batch; got "
                             f"{value}")
    _check_choices(quantization, optimizer, quantize_lm_head)
    # a minibatch is a share of the rollout batch (the RL stage refuses a rollout batch that is
    # not a multiple of it; the CLI says so): never more rows than the batch has
    minibatch = min(minibatch or batch, batch)
    forward_chunk = min(forward_chunk or batch, batch)
    _check_sharding(gpus, strategy, quantization)
    global_batch = batch  # every rank holds the gathered rollout (rlhf/distributed.py)
    batch, minibatch = -(-batch // gpus), -(-minibatch // gpus)  # a rank's rows
    forward_chunk = min(forward_chunk, batch)
    w = _DTYPE_BYTES[dtype]
    if autocast is None:
        autocast = device == "cuda" and w != 4
    fast = bool(autocast) and quantization == "none"
    h, v, L = d.hidden_size, d.vocab_size, d.num_layers
    S = prompt_length + response_length
    lora = d.lora_params(lora_rank)
    head = h + 1
    # policy adapter, critic adapter + value head (critic-free: the policy adapter alone)
    trained = 2 * lora + head if critic else lora
    trained_tensors = _lora_tensors(d, lora_rank) * (2 if critic else 1) + ([h, 1] if critic
                                                                            else [])
    # a quantized layer's weight, dequantized for its matmul (the largest of a layer), and a
    # quantized lm_head's, dequantized whole for the fused log-probs and the decode step
    dequant = _dequant_bytes(d, w, quantization)
    head_dequant = (v * h * w if quantization != "none" and quantize_lm_head
                    and not d.tie_word_embeddings else 0)

    weights = _weights_per_gpu(d, w, quantization, quantize_lm_head, gpus, strategy)
    resident = {
        "weights": weights,
        "adapters_and_heads": 4 * ((3 if critic else 2) * lora + 2 * head),
        "adam_states": adam_state_bytes(trained_tensors, optimizer),
        "kv_cache": 2 * L * batch * d.kv_dim * S * w,
        "rollout_tensors": (global_batch * S * (8 + 8)
                            + global_batch * response_length * (4 * 8)),
    }
    base = sum(resident.values())

    # rollout: the prefill's layer working set, or one decode step's (B, V) sampling buffers
    prefill_tokens = batch * prompt_length
    prefill = (_forward_peak(d, w, prefill_tokens, dequant)
               + batch * prompt_length * S * w  # the 4-D additive prefill mask
               + 2 * prefill_tokens * d.head_dim * max(w, 4))  # rotary cos / sin
    sampling = batch * v * (w + 4 * 5 + (4 * 3 + 8 if top_p < 1.0 else 0)) + head_dequant
    rollout = {"prefill_or_decode": max(prefill, sampling)}

    # scoring: one no-grad forward of forward_chunk rows, then the head read
    n = forward_chunk * S
    forward = _forward_peak(d, w, n, dequant) + forward_chunk * S * S
    head_read = max(_logits_chunk(n, v, w, device) + n * (4 * 3)  # logp, lse, entropy
                    + head_dequant,
                    # the value head reads an fp32 copy of the hidden states
                    n * 4 * h + n * 4 if critic else 0)
    scoring = {"forward": max(forward, n * w * h + head_read)}

    # update: one minibatch, policy then critic
    update = {"grads": 4 * trained * (2 if gpus > 1 else 1),  # + the flat all-reduce buffer
              **update_activations(d, w, rows=minibatch, prompt_length=prompt_length,
                                   response_length=response_length,
                                   gradient_checkpointing=gradient_checkpointing, fast_lora=fast,
                                   critic=critic, device=device, quantization=quantization,
                                   head_dequant=head_dequant)}
    stages = {}
    for name, parts in (("rollout", rollout), ("scoring", scoring), ("update", update)):
        parts = dict(parts)
        parts["resident"] = base
        parts["overhead"] = int(overhead_gib * GIB)
        parts["total"] = sum(parts.values())
        stages[name] = parts
    peak_stage = max(STAGES, key=lambda s: stages[s]["total"])
    return {
        "peak_bytes": stages[peak_stage]["total"],
        "peak_stage": peak_stage,
        "resident": resident,
        "stages": stages,
        "inputs": dict(batch=global_batch, prompt_length=prompt_length,
                       response_length=response_length, lora_rank=lora_rank, dtype=dtype,
                       gradient_checkpointing=gradient_checkpointing, minibatch=minibatch,
                       forward_chunk=forward_chunk, device=device, params=d.params(),
                       lora_params_per_adapter=lora, critic=critic,
                       quantization=quantization, quantize_lm_head=quantize_lm_head,
                       optimizer=optimizer, gpus=gpus, strategy=strategy,
                       batch_per_gpu=batch, minibatch_per_gpu=minibatch,
                       autocast=bool(autocast)),
    }


def layer_activations(d: ModelDims, w: int, tokens: int, gradient_checkpointing: bool,
                      quantization: str = "none", fast_lora: bool = False) -> tuple[int, int]:
    """The decoder layers' part of a training step over ``tokens`` positions, every stage's:
    (what all layers keep for the backward: each layer's input under gradient checkpointing,
    else ``_layer_saved``, plus int8's kept inputs; one layer's backward: its gradient
    temporaries, its activations recomputed under checkpointing, a dequantized weight)."""
    saved = d.num_layers * tokens * (
        (w * d.hidden_size if gradient_checkpointing else _layer_saved(d, w, fast_lora))
        + _int8_kept_inputs(d, w, quantization, gradient_checkpointing))
    backward = tokens * (_layer_backward_extra(d, w, fast_lora)
                         + (_layer_saved(d, w, fast_lora) if gradient_checkpointing else 0)
                         ) + _dequant_bytes(d, w, quantization, backward=True)
    return saved, backward


def update_activations(d: ModelDims, w: int, *, rows: int, prompt_length: int,
                       response_length: int, gradient_checkpointing: bool = True,
                       fast_lora: bool = False, critic: bool = True, device: str = "cuda",
                       quantization: str = "none", head_dequant: int = 0,
                       eager_logits: bool = False) -> dict:
    """Activation bytes of one PPO update step over ``rows`` sequences (the policy's backward,
    then the critic's): ``{"saved_activations", "backward_or_head"}``. ``plan``'s update stage
    and ``rlhf.memory.estimate_memory`` both count it here.

    saved_activations: what the layers keep for the backward (with gradient checkpointing each
    layer's input, without it ``_layer_saved``) and the (rows, S, S) boolean attention mask.
    backward_or_head: the larger of the last layer's backward (its saved activations, recomputed
    under checkpointing, and gradient temporaries) and the loss head after the forward: the
    policy's ``linear_ppo_loss`` over the response (one logits chunk and its gradient), or with
    ``eager_logits`` (B, S, V) logits in the weights' dtype + an fp32 log-softmax + its fp32
    gradient (a model's own lm_head forward); or the value head's fp32 copy of the hidden
    states and its gradient (``critic``). ``fast_lora``: the layers keep no fp32 copies of the
    adapted linears' inputs (rlhf/lora_forward.py under autocast, or no adapters at all).
    """
    h, v = d.hidden_size, d.vocab_size
    S = prompt_length + response_length
    n, n_resp = rows * S, rows * response_length
    saved_layers, layer_backward = layer_activations(d, w, n, gradient_checkpointing,
                                                     quantization, fast_lora)
    final = n * w * h * 3  # final norm input / output and the returned hidden states
    if eager_logits:
        policy_head = n * v * (w + 4 + 4)
    else:
        policy_head = (n_resp * w * h * 2  # the response slice and its gradient
                       + _logits_chunk(n_resp, v, w, device) * 2  # logits chunk and d logits
                       + head_dequant)
    value_head = n * 4 * h * 2 if critic else 0  # fp32 copy of the hidden states, its grad
    return {"saved_activations": saved_layers + rows * S * S,
            "backward_or_head": max(layer_backward, final + max(policy_head, value_head))}


def _check_choices(quantization: str, optimizer: str, quantize_lm_head: bool) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not one of {QUANTIZATIONS}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not one of {OPTIMIZERS}")
    if quantize_lm_head and quantization == "int8":
        raise ValueError("quantize_lm_head with int8 is refused by the trainer (rlhf/quant.py: "
                         "LLM.int8 quantizes the head's inputs too); plan nf4 or fp4")
    if quantize_lm_head and quantization == "none":
        raise ValueError("quantize_lm_head quantizes the lm_head of a quantized base, and "
                         "quantization='none' plans a dense one; add --quantization nf4 (or "
                         "fp4), or leave --quantize-lm-head out")


def _lora_tensors(d: ModelDims, rank: int) -> list[int]:
    """Element counts of one adapter's tensors: A (rank x in) and B (out x rank) per linear."""
    return [n for a, b in d.linears() for n in (rank * a, b * rank)] * d.num_layers


def adam_state_bytes(numels: list[int], optimizer: str = "adamw") -> int:
    """AdamW state bytes of fp32 tensors of these element counts. torch: two fp32 moments.
    bitsandbytes 8-bit: tensors of 4096 elements or more get two uint8 moments, an fp32 absmax
    per 256-element block each and two 256-entry fp32 maps; smaller ones stay 32-bit."""
    if optimizer.endswith("8bit"):
        return sum(2 * n + 2 * 4 * -(-n // 256) + 2 * 256 * 4 if n >= 4096 else 8 * n
                   for n in numels)
    return sum(8 * n for n in numels)


def _int8_kept_inputs(d: ModelDims, w: int, quantization: str, checkpointing: bool) -> int:
    """Bytes per token and layer that LLM.int8() layers keep under gradient checkpointing:
    bitsandbytes' MatMul8bitLt stores its input on the autograd context as a plain attribute,
    out of reach of checkpointing's saved-tensor hooks, so the inputs of q/k/v (shared), o,
    gate/up (shared) and down live until the backward, as without checkpointing."""
    if quantization != "int8" or not checkpointing:
        return 0
    return w * (2 * d.hidden_size + d.q_dim + d.intermediate_size)


def _forward_peak(d: ModelDims, w: int, tokens: int, dequant: int) -> int:
    """Peak bytes of one layer's no-grad forward over ``tokens`` (plus the hidden states it
    returns). A quantized matmul's dense weight lives while the base product is computed: with
    the residual, the normed input and the MLP's two products, before the LoRA terms exist."""
    h, i = d.hidden_size, d.intermediate_size
    lora_peak = tokens * (_layer_forward_peak(d, w, lora=True) + w * h)
    return max(lora_peak, tokens * (3 * w * h + 2 * w * i) + dequant)


def _dequant_bytes(d: ModelDims, w: int, quantization: str, backward: bool = False) -> int:
    """The transient dense weight of a quantized matmul: bitsandbytes' 4-bit path dequantizes
    the layer's weight to the compute dtype and runs a plain matmul, forward and backward (the
    largest linear of a layer bounds it); LLM.int8() multiplies int8 by int8 forward, but its
    backward multiplies the gradient by the dequantized weight."""
    if quantization in ("nf4", "fp4") or (quantization == "int8" and backward):
        return max(a * b for a, b in d.linears()) * w
    return 0


class LiveTensorTracker:
    """CPU-side accounting of live tensor bytes: the measurement the plan is checked against.

    A ``TorchDispatchMode`` sees every ATen op (forward and autograd backward); each op output's
    storage is recorded with a weak reference and its bytes, and storages whose last reference is
    gone are dropped before every op. ``peak`` is the largest sum of live storage bytes seen right
    after an op (when its outputs and inputs coexist); ``stage_peaks`` the same per stage
    (``mark(name)`` starts a stage). Tensors made before the mode (weights, optimizer state) are
    counted with ``add``. Not seen: memory inside a kernel that is not a tensor (e.g. Triton
    interpreter copies, BLAS workspaces) and allocator slack, which is why on a GPU the plan is
    checked against ``torch.cuda.max_memory_allocated`` instead.
    """

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self._expired = torch.UntypedStorage._expired

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                # tensors freed since the last op go first: an op's peak is its inputs (alive,
                # referenced by args) plus its outputs, not the temporaries that died before it
                tracker._sweep()
                out = func(*args, **(kwargs or {}))
                tracker._after_op(out)
                return out

        self._mode = _Mode()
        self.live: dict[int, tuple] = {}
        self.current = 0
        self.peak = 0
        self.stage: str | None = None
        self.stage_peaks: dict[str, int] = {}

    def add(self, *tensors) -> None:
        """Count tensors made outside the mode (parameters, buffers, optimizer state)."""
        import torch
        from torch.multiprocessing.reductions import StorageWeakRef

        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in self.live:
                self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                self.current += storage.nbytes()

    def _sweep(self) -> None:
        # this runs before every op over every live storage: call the C check StorageWeakRef's
        # expired() ends in, without its two Python wrappers (the same answer, ~5x faster)
        expired = self._expired
        dead = [key for key, (ref, _) in self.live.items() if expired(ref.cdata)]
        for key in dead:
            self.current -= self.live.pop(key)[1]

    def _after_op(self, out) -> None:
        from torch.utils._pytree import tree_leaves

        self.add(*tree_leaves(out))
        self.peak = max(self.peak, self.current)
        if self.stage is not None:
            self.stage_peaks[self.stage] = max(self.stage_peaks[self.stage], self.current)

    def mark(self, stage: str) -> None:
        """Start a stage: its peak starts at what is live now."""
        self._sweep()
        self.stage = stage
        self.stage_peaks[stage] = max(self.stage_peaks.get(stage, 0), self.current)

    def __enter__(self):
        self._sweep()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def largest_batch(config, card_gib: float, *, limit: int = BATCH_SEARCH_LIMIT, **kwargs) -> int:
    """The largest batch (minibatch and forward chunk = batch unless given) whose planned peak
    fits in ``card_gib``; 0 when not even batch 1 fits."""
    if not (isinstance(card_gib, (int, float)) and math.isfinite(card_gib) and card_gib > 0):
        raise ValueError(f"the card's memory must be a number of GiB > 0 (e.g. --card 24), got "
                         f"{card_gib}")
    load = _load_peak(config, "rl", kwargs)

    def fits(b: int) -> bool:
        return max(plan(config, batch=b, **kwargs)["peak_bytes"], load) <= card_gib * GIB

    best = _largest(fits, limit)
    # a batch the RL stage takes: a multiple of the minibatch (when given) and of the GPUs
    return best - best % math.lcm(kwargs.get("minibatch") or 1, kwargs.get("gpus", 1))


# --------------------------------------------------------------------------------------------
# the SFT and reward-model stages, and what fits a card
# --------------------------------------------------------------------------------------------
PIPELINE_STAGES = ("sft", "rm", "rl")
# GiB a card loses to what the plan does not count: the CUDA context, cuBLAS / cuDNN
# workspaces and allocator slack (a few hundred MiB each on current drivers)
DEFAULT_RESERVE_GIB = 1.0


def plan_training_stage(stage: str, config="qwen2.5-1.5b", *, batch: int = 8,
                        seq_len: int = 384, lora_rank: int = 16, dtype: str = "bfloat16",
                        device: str = "cuda", quantization: str = "none",
                        quantize_lm_head: bool = False, optimizer: str = "adamw",
                        gradient_checkpointing: bool = True,
                        config_overrides: dict | None = None, gpus: int = 1,
                        strategy: str = "ddp") -> dict:
    """Expected peak bytes of one optimizer step of the SFT (``stage="sft"``) or reward-model
    (``"rm"``) stage, as rlhf/sft.py and rlhf/reward.py run them (their
    ``gradient_checkpointing`` setting; off by default there, on by default here, as in
    ``plan``).

    sft: LoRA of ``lora_rank`` on a plain PEFT model (one adapter), ``batch`` rows of
    ``seq_len`` tokens, the fused log-probs over every position. rm: the SharedBackbone (three
    adapters, two heads), the reward adapter and head training, ``batch`` pairs = 2 x batch
    rows in one forward, the reward head reading the last real token. ``batch`` is one GPU's
    share; ``gpus`` and ``strategy="fsdp2"`` shard the reward stage's decoder layers (the SFT
    stage runs ddp: its weights stay whole).
    Returns ``{"peak_bytes", "resident": {...}, "step": {...}}``.
    """
    if stage not in ("sft", "rm"):
        raise ValueError(f"stage={stage!r} is not one of ('sft', 'rm'); the RL stage: plan()")
    values = dict(_load_config(config))
    values.update(config_overrides or {})
    d = ModelDims.from_dict(values)
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPE_BYTES)}")
    _check_choices(quantization, optimizer, quantize_lm_head)
    for name, value in (("batch", batch), ("seq_len", seq_len), ("lora_rank", lora_rank)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    w = _DTYPE_BYTES[dtype]
    h, v = d.hidden_size, d.vocab_size
    lora = d.lora_params(lora_rank)
    tensors = _lora_tensors(d, lora_rank)
    head_dequant = (v * h * w if quantization != "none" and quantize_lm_head
                    and not d.tie_word_embeddings else 0)
    if stage == "sft":
        adapters, trained, rows = 4 * lora, lora, batch
        adam = adam_state_bytes(tensors, optimizer)
    else:
        adapters, trained, rows = 4 * (3 * lora + 2 * (h + 1)), lora + h + 1, 2 * batch
        adam = adam_state_bytes(tensors + [h, 1], optimizer)
    _check_sharding(gpus, strategy, quantization)
    sharding = (gpus, strategy) if stage == "rm" else (1, "ddp")
    resident = {"weights": _weights_per_gpu(d, w, quantization, quantize_lm_head, *sharding),
                "adapters_and_heads": adapters, "adam_states": adam}
    n = rows * seq_len
    final = n * w * h * 3
    if stage == "sft":  # hidden states x lm_head over every position, fused
        head = n * w * h * 2 + _logits_chunk(n, v, w, device) * 2 + n * 4 * 2 + head_dequant
    else:  # the last real token's hidden state, an fp32 copy and the (2B,) rewards
        head = rows * (4 * h * 2 + 4 * 4)
    saved_layers, layer_backward = layer_activations(d, w, n, gradient_checkpointing,
                                                     quantization)
    step = {
        "grads": 4 * trained,
        "saved_activations": saved_layers + rows * seq_len * seq_len,
        "backward_or_head": max(layer_backward, final + head),
    }
    total = sum(resident.values()) + sum(step.values())
    return {"peak_bytes": total, "resident": resident, "step": step}


def _check_sharding(gpus: int, strategy: str, quantization: str) -> None:
    if not (isinstance(gpus, int) and gpus >= 1) or strategy not in ("ddp", "fsdp2"):
        raise ValueError(f"gpus must be an integer >= 1 and strategy ddp or fsdp2, got "
                         f"gpus={gpus!r}, strategy={strategy!r}")
    if strategy == "fsdp2" and gpus > 1 and quantization != "none":
        # rlhf/distributed.py refuses it: bitsandbytes' packed weights are no plain tensors
        raise ValueError(f"strategy fsdp2 cannot shard a quantized base (quantization="
                         f"{quantization!r}), as the stages refuse it; plan --strategy ddp with "
                         f"--quantization, or fsdp2 with the base unquantized")


def _weights_per_gpu(d: ModelDims, w: int, quantization: str = "none",
                     quantize_lm_head: bool = False, gpus: int = 1, strategy: str = "ddp") -> int:
    """The base weights one GPU of the RL stage holds: all of them, or with ``fsdp2`` over
    several GPUs its share of the decoder layers plus two whole layers (one gathered for the
    forward, the next prefetched)."""
    weights = d.weight_bytes(w, quantization, quantize_lm_head)
    if strategy == "fsdp2" and gpus > 1:
        h = d.hidden_size
        layers = weights - (d.vocab_size * h + d.lm_head_params() + h) * w
        weights += -layers + layers // gpus + 2 * layers // d.num_layers
    return weights


def _load_peak(config, stage: str, kwargs: dict) -> int:
    """What one GPU holds while a stage loads its model: under fsdp2 (reward and RL stages,
    several GPUs) each GPU loads the whole base before sharding it (docs/distributed.md), so
    the whole base must fit; 0 otherwise (the step's plan counts the weights it holds)."""
    if stage == "sft" or kwargs.get("strategy", "ddp") != "fsdp2" or kwargs.get("gpus", 1) < 2:
        return 0
    values = dict(_load_config(config))
    values.update(kwargs.get("config_overrides") or {})
    return ModelDims.from_dict(values).weight_bytes(
        _DTYPE_BYTES.get(kwargs.get("dtype", "bfloat16"), 2), kwargs.get("quantization", "none"),
        kwargs.get("quantize_lm_head", False))


def _stage_peak(stage: str, config, batch: int, prompt_length: int, response_length: int,
                **kwargs) -> int:
    load = _load_peak(config, stage, kwargs)
    if stage == "rl":
        return max(load, plan(config, batch=batch, prompt_length=prompt_length,
                              response_length=response_length, **kwargs)["peak_bytes"])
    keys = ("lora_rank", "dtype", "device", "quantization", "quantize_lm_head", "optimizer",
            "gradient_checkpointing", "config_overrides", "gpus", "strategy")
    batch = -(-batch // kwargs.get("gpus", 1))  # data parallel: a rank's rows (weights whole)
    return max(load, plan_training_stage(stage, config, batch=batch,
                                         seq_len=prompt_length + response_length,
                                         **{k: v for k, v in kwargs.items() if k in keys}
                                         )["peak_bytes"])


def _largest(fits, limit: int) -> int:
    """The largest n in [1, limit] with fits(n) (fits is monotone), 0 when fits(1) is False."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def fit(config, card_gib: float, *, batch: int = 16, prompt_length: int = 128,
        response_length: int = 256, reserve_gib: float = DEFAULT_RESERVE_GIB,
        limit: int = BATCH_SEARCH_LIMIT, **kwargs) -> dict:
    """What fits a card of ``card_gib`` GiB (``reserve_gib`` of it kept for what the plan does
    not count), per pipeline stage (``PIPELINE_STAGES``):

    ``{"sft" | "rm" | "rl": {"batch": the largest batch at the given lengths, "length": the
    largest response length (rl; prompt fixed) or sequence length (sft, rm; batch rows) at
    ``batch``, "context": the model's context, "peak_gib": the planned peak at batch and lengths,
    "why": None, or why nothing fits, "more_may_fit": the search stopped at ``limit``, so a
    larger batch may fit too}}``. RL: rollout batch = minibatch = scoring chunk (pass
    ``minibatch=`` / ``forward_chunk=`` to fix them); kwargs go to ``plan`` (quantization,
    optimizer, lora_rank, dtype, critic, ...).
    """
    if not (isinstance(card_gib, (int, float)) and math.isfinite(card_gib) and card_gib > 0):
        raise ValueError(f"the card's memory must be a number of GiB > 0 (e.g. --card 12), got "
                         f"{card_gib}")
    if not 0 <= reserve_gib < card_gib:
        # a negative reserve (or nan) is not "too large": "pass a smaller --reserve" sent the
        # user the wrong way
        fix = ("a smaller --reserve" if reserve_gib >= card_gib
               else "--reserve 0 or more (1 is usual)")
        raise ValueError(f"the reserve (--reserve, reserve_gib: GiB of the card kept for the "
                         f"CUDA context and allocator, 1 by default) must be in [0, card) = "
                         f"[0, {card_gib:g}) for a {card_gib:g} GiB card, got {reserve_gib:g}; "
                         f"pass {fix}")
    budget = (card_gib - reserve_gib) * GIB
    values = dict(_load_config(config))
    values.update(kwargs.get("config_overrides") or {})
    context = int(values.get("max_position_embeddings") or 32768)
    d = ModelDims.from_dict(values)
    w = _DTYPE_BYTES.get(kwargs.get("dtype", "bfloat16"), 2)
    quantization = kwargs.get("quantization", "none")
    out = {}
    for stage in PIPELINE_STAGES:
        rl_kwargs = kwargs if stage == "rl" else {k: v for k, v in kwargs.items()
                                                  if k not in ("minibatch", "forward_chunk",
                                                               "critic", "top_p", "autocast")}

        def peak(b, p=prompt_length, r=response_length, stage=stage, kw=rl_kwargs):
            return _stage_peak(stage, config, b, p, r, **kw)

        best_batch = _largest(lambda b: peak(b) <= budget, limit)
        more_may_fit = best_batch == limit
        if stage == "rl":  # a rollout batch the RL stage takes: a multiple of the minibatch
            # (when given) and of the GPUs (split evenly over them)
            best_batch -= best_batch % math.lcm(kwargs.get("minibatch") or 1,
                                                kwargs.get("gpus", 1))
        if stage == "rl":
            best_length = _largest(lambda r: peak(batch, r=r) <= budget,
                                   max(1, context - prompt_length))
        else:  # the whole sequence; split as prompt 0 + length
            best_length = _largest(lambda t: peak(batch, p=0, r=t) <= budget, context)
        why = None
        if best_batch == 0:
            # every GPU holds the whole base at some point: fsdp2 (reward and RL stages)
            # shards it only after loading it whole (``_load_peak``)
            lm_head = kwargs.get("quantize_lm_head", False)
            weights = d.weight_bytes(w, quantization, lm_head) / GIB
            if weights > budget / GIB:
                nf4 = d.weight_bytes(w, "nf4") / GIB
                stored = quantization if quantization != "none" else kwargs.get("dtype",
                                                                                 "bfloat16")
                sharded = stage != "sft" and _load_peak(config, stage, kwargs) > 0
                why = (f"the base weights alone are {weights:.2f} GiB ({stored}) of the "
                       f"{budget / GIB:.2f} GiB usable"
                       + (" (fsdp2 shards them only after each GPU has loaded them whole)"
                          if sharded else "")
                       + ("" if quantization != "none" else
                          f"; quantization=nf4 makes them {nf4:.2f} GiB" if nf4 < budget / GIB
                          else f"; even quantization=nf4 leaves {nf4:.2f} GiB, more than that"))
            else:
                one = peak(1) / GIB
                why = (f"one sequence of {prompt_length + response_length} tokens peaks at "
                       f"{one:.2f} GiB > {budget / GIB:.2f} GiB usable; shorten it")
        out[stage] = {"batch": best_batch, "length": best_length, "context": context,
                      "peak_gib": peak(batch) / GIB, "why": why, "more_may_fit": more_may_fit}
    return out


def format_fit(result: dict, card_gib: float, *, batch: int, prompt_length: int,
               response_length: int, reserve_gib: float = DEFAULT_RESERVE_GIB,
               checkpointing: bool = True) -> str:
    """The "what fits my card" lines of ``rlhf plan --card``."""
    names = {"sft": "SFT (LoRA)", "rm": "reward model", "rl": "RL (PPO/GRPO iteration)"}
    lines = [f"on a {card_gib:g} GiB card ({reserve_gib:g} GiB kept for the CUDA context and "
             f"allocator), prompt {prompt_length} + response {response_length} tokens"
             + (", gradient checkpointing on (gradient_checkpointing=true in the stages):"
                if checkpointing else ", gradient checkpointing off:")]
    for stage in PIPELINE_STAGES:
        r = result[stage]
        if r["why"] is not None:
            lines.append(f"  {names[stage]:<24} nothing fits: {r['why']}")
            continue
        what = "response" if stage == "rl" else "sequence"
        cap = r["context"] - (prompt_length if stage == "rl" else 0)
        length = f"{r['length']}" + (" (the context)" if r["length"] >= cap else "")
        unit = "pairs" if stage == "rm" else "sequences"
        more = " or more (the search stops there)" if r.get("more_may_fit") else ""
        lines.append(f"  {names[stage]:<24} largest batch {r['batch']} {unit}{more}; at batch "
                     f"{batch}: {what} length up to {length}"
                     + ("" if r["length"] else " (batch too large)"))
    context = result["rl"]["context"]
    if prompt_length + response_length > context:
        lines.append(f"note: prompt {prompt_length} + response {response_length} = "
                     f"{prompt_length + response_length} tokens is past the model's context of "
                     f"{context} (max_position_embeddings): the batches above are for lengths "
                     f"it was not trained on; a model with learned positions (GPT-2) cannot run "
                     f"them at all. Plan a shorter --prompt-length / --response-length")
    return "\n".join(lines)


def fit_table_markdown(models=("qwen2.5-1.5b", "qwen2.5-7b", "llama-3-8b"),
                       cards=(8, 12, 16, 24), quantizations=("none", "nf4"), *,
                       prompt_length: int = 128, response_length: int = 256,
                       reserve_gib: float = DEFAULT_RESERVE_GIB, **kwargs) -> str:
    """The README's card table: per model and base, the largest PPO batch per card (rollout
    batch = minibatch = scoring chunk, LoRA rank 16, gradient checkpointing, bf16 compute), with
    the largest SFT / reward-model batch beside it; "-" when nothing fits."""
    names = {"qwen2.5-1.5b": "Qwen2.5-1.5B", "qwen2.5-7b": "Qwen2.5-7B",
             "llama-3-8b": "Llama-3-8B"}
    header = "| model | base | weights GiB | " + " | ".join(f"{c} GiB" for c in cards) + " |"
    lines = [header, "|---|---|---:|" + "---:|" * len(cards)]
    for model in models:
        d = ModelDims.from_dict(PRESETS[model])
        for q in quantizations:
            cells = []
            for card in cards:
                r = fit(model, card, prompt_length=prompt_length,
                        response_length=response_length, reserve_gib=reserve_gib,
                        quantization=q, **kwargs)
                rl, sft_b, rm_b = r["rl"]["batch"], r["sft"]["batch"], r["rm"]["batch"]
                cells.append("-" if rl == 0 and sft_b == 0 and rm_b == 0 else
                             f"{rl or '-'} ({sft_b or '-'} / {rm_b or '-'})")
            base = "bf16" if q == "none" else q
            lines.append(f"| {names.get(model, model)} | {base} | "
                         f"{d.weight_bytes(2, q) / GIB:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


CARD_TABLE_BEGIN = "<!-- plan-cards:begin (rlhf plan --write-readme; do not edit by hand) -->"
CARD_TABLE_END = "<!-- plan-cards:end -->"


def card_table_block() -> str:
    """The README block between CARD_TABLE_BEGIN and CARD_TABLE_END (markers included)."""
    import textwrap

    caption = textwrap.fill(
        "Largest batch per card, computed by `rlhf plan MODEL --card N [--quantization nf4]`: "
        "the PPO iteration's rows (rollout batch = minibatch = scoring chunk), in brackets "
        "the SFT (LoRA) batch / the reward model's pairs; prompt 128 + response 256 tokens, "
        "LoRA rank 16 on every linear, bf16 compute, gradient checkpointing on in every stage "
        f"(`gradient_checkpointing=true`), {DEFAULT_RESERVE_GIB:g} GiB of each card kept for "
        "the CUDA context and allocator; `-`: nothing fits (`rlhf plan` says why). Computed, "
        "not measured.", width=99)
    return "\n".join([
        CARD_TABLE_BEGIN,
        caption,
        "",
        fit_table_markdown(),
        CARD_TABLE_END,
    ])


def write_readme(path: Path) -> None:
    """Replace the card-table block of the README at ``path`` with ``card_table_block()``."""
    text = path.read_text()
    start, end = text.find(CARD_TABLE_BEGIN), text.find(CARD_TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no {CARD_TABLE_BEGIN} ... {CARD_TABLE_END} block")
    path.write_text(text[:start] + card_table_block() + text[end + len(CARD_TABLE_END):])


def format_plan(result: dict, card_gib: float | None = None, best_batch: int | None = None,
                more_may_fit: bool = False) -> str:
    """The table ``rlhf plan`` prints (GiB)."""
    inputs = result["inputs"]
    lines = [f"model: {inputs['params'] / 1e9:.2f} B parameters, LoRA "
             f"{inputs['lora_params_per_adapter'] / 1e6:.1f} M per adapter x "
             f"{3 if inputs['critic'] else 2}{'' if inputs['critic'] else ' (no critic)'}; batch "
             f"{inputs['batch']}, prompt {inputs['prompt_length']}, response "
             f"{inputs['response_length']}, {inputs['dtype']}"
             + (f" compute, {inputs['quantization']} base" if inputs.get("quantization", "none")
                != "none" else "")
             + (", autocast" if inputs.get("autocast") else "")
             + (f", {inputs['optimizer']}" if inputs.get("optimizer", "adamw") != "adamw"
                else "")
             + ", gradient checkpointing "
             f"{'on' if inputs['gradient_checkpointing'] else 'off'}"
             + (f"; per GPU of {inputs['gpus']} ({inputs['strategy']}): batch "
                f"{inputs['batch_per_gpu']}" if inputs.get("gpus", 1) > 1 else ""),
             "resident: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in result["resident"].items()
                                      if k != "rollout_tensors") + " GiB"]
    lines.append(f"{'stage':<8} {'peak GiB':>9}  parts (GiB, besides the resident state)")
    for stage in STAGES:
        parts = result["stages"][stage]
        detail = ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items()
                           if k not in ("total", "resident", "overhead"))
        lines.append(f"{stage:<8} {parts['total'] / GIB:>9.2f}  {detail}")
    lines.append(f"peak: {result['peak_bytes'] / GIB:.2f} GiB ({result['peak_stage']})")
    if card_gib is not None:
        lines.append(f"largest batch on a {card_gib:g} GiB card (RL, the reserve kept): "
                     f"{best_batch}" + (" or more (the search stops there)" if more_may_fit
                                        else "")
                     + (f" (over all {inputs['gpus']} GPUs)" if inputs.get("gpus", 1) > 1
                        else ""))
    return "\n".join(lines)


def recorded_quantization(model: str) -> str | None:
    """The base quantization a saved backbone directory's roles.json records (what
    ``SharedBackbone.load`` re-quantizes its base to: "none" for one written before it was
    recorded), or None when ``model`` is not such a directory."""
    path = Path(model).expanduser()
    try:
        info = json.loads((path / "roles.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or (path / "config.json").is_file():
        return None
    value = info.get("quantization") or "none"
    return value if value in QUANTIZATIONS else None


_COUNT_WORDS = {
    "--batch": " (the rollout's sequences)",
    "--prompt-length": " (tokens)", "--response-length": " (tokens)",
    "--lora-rank": " (the adapters' rank)",
    "--minibatch": " (rows per optimizer step; leave it out for the whole batch)",
    "--forward-chunk": " (rows per scoring forward; leave it out for the whole batch)",
    "--gpus": " (GPUs)",
}


def main(argv: list[str] | None = None) -> int:
    """``rlhf plan [MODEL] [--batch ...]``: print the plan; MODEL is a preset or a config.json."""
    parser = argparse.ArgumentParser(prog="rlhf plan", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", nargs="?", default="qwen2.5-1.5b",
                        help=f"preset ({', '.join(sorted(PRESETS))}), or what a stage's "
                             f"model= takes: a model directory or config.json, a saved "
                             f"backbone (runs/rm/backbone), a named model, a cached hub name")
    parser.add_argument("--batch", type=int, default=16,
                        help="the RL stage's rollout batch (sequences; rollout_batch_size)")
    parser.add_argument("--prompt-length", type=int, default=128,
                        help="prompt tokens per sequence (max_prompt_length)")
    parser.add_argument("--response-length", type=int, default=256,
                        help="response tokens per sequence (max_new_tokens)")
    parser.add_argument("--lora-rank", type=int, default=16,
                        help="rank of the LoRA adapters (policy, critic, reward)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPE_BYTES),
                        help="the weights' dtype (the compute dtype with --quantization)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true",
                        help="keep every layer's activations for the backward (more memory)")
    parser.add_argument("--minibatch", type=int, default=None,
                        help="rows per optimizer step (minibatch_size); default: the batch")
    parser.add_argument("--forward-chunk", type=int, default=None,
                        help="rows per no-grad scoring forward (forward_batch_size); default: "
                             "the batch")
    parser.add_argument("--card", type=float, default=24.0, metavar="GiB",
                        help="report the largest batch that fits this much memory")
    parser.add_argument("--no-autocast", action="store_true",
                        help="plan an RL run without bf16 autocast (bf16: false in the ppo "
                             "section): PEFT's fp32 adapter path keeps an fp32 copy of each "
                             "adapted linear's input for the backward")
    parser.add_argument("--critic-free", action="store_true",
                        help="a critic-free run (grpo, rloo, ...): no critic adapter, value "
                             "head or critic optimizer state")
    parser.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                        help="the base's linears as bitsandbytes stores them (rlhf/quant.py); "
                             "--dtype is then the compute dtype. Default: what a saved "
                             "backbone's roles.json records (what `rlhf ppo model=` loads), "
                             "else none")
    parser.add_argument("--quantize-lm-head", action="store_true",
                        help="quantize the lm_head too (4-bit only; dequantized per call)")
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS,
                        help="the adapters' AdamW (adamw8bit: 8-bit moments)")
    parser.add_argument("--reserve", type=float, default=DEFAULT_RESERVE_GIB, metavar="GiB",
                        help="GiB of the card kept for the CUDA context, workspaces and "
                             "allocator slack when answering what fits")
    parser.add_argument("--gpus", type=int, default=1, metavar="N",
                        help="data parallel on N GPUs (torchrun): batch sizes are global, each "
                             "GPU runs its share of the rows; the figures are per GPU")
    parser.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp2"),
                        help="with --gpus: fsdp2 also shards the decoder layers' weights "
                             "(reward and RL stages; docs/distributed.md)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--write-readme", action="store_true",
                        help="re-render the README's card table (repository checkout) and exit")
    args = parser.parse_args(argv)
    # counts, named by the flag typed (plan()'s own checks name its parameters: "lora_rank
    # must be >= 1" for --lora-rank 0)
    for flag, value in (("--batch", args.batch), ("--prompt-length", args.prompt_length),
                        ("--response-length", args.response_length),
                        ("--lora-rank", args.lora_rank), ("--minibatch", args.minibatch),
                        ("--forward-chunk", args.forward_chunk), ("--gpus", args.gpus)):
        if value is not None and value < 1:
            parser.exit(2, f"{parser.prog}: error: {flag} {value}: expected an integer >= 1"
                           f"{_COUNT_WORDS.get(flag, '')}\n")
    if args.minibatch is not None and args.minibatch >= 1 and args.batch % args.minibatch:
        # the RL stage refuses it (rollout_batch_size must be a multiple of minibatch_size)
        parser.exit(2, f"{parser.prog}: error: --batch {args.batch} (the rollout batch) must be "
                       f"a multiple of --minibatch {args.minibatch}, as the RL stage requires "
                       f"of rollout_batch_size and minibatch_size\n")
    if args.gpus > 1 and args.batch >= 1 and (args.batch % args.gpus
                                              or (args.minibatch or args.batch) < args.gpus):
        # the RL stage refuses a rollout whose prompts do not split evenly over the ranks, and
        # a minibatch with fewer rows than ranks (rlhf/distributed.py, shard)
        parser.exit(2, f"{parser.prog}: error: --batch {args.batch} over --gpus {args.gpus}: "
                       f"the RL stage splits the rollout evenly over the GPUs and every "
                       f"minibatch over them too, so --batch must be a multiple of --gpus and "
                       f"--minibatch at least --gpus\n")
    if args.strategy == "fsdp2" and args.gpus == 1:
        parser.exit(2, f"{parser.prog}: error: --strategy fsdp2 shards the base over several "
                       f"GPUs and --gpus is 1, where it changes nothing; add --gpus N (N >= 2) "
                       f"or leave --strategy out\n")
    recorded = None
    if args.quantization is None:  # a saved backbone's base loads as its roles.json says
        recorded = recorded_quantization(args.model)
        args.quantization = recorded or "none"
    if args.write_readme:
        readme = Path(__file__).resolve().parents[1] / "README.md"
        write_readme(readme)
        print(f"wrote the card table into {readme}")
        return 0
    kwargs = dict(prompt_length=args.prompt_length, response_length=args.response_length,
                  lora_rank=args.lora_rank, dtype=args.dtype,
                  gradient_checkpointing=not args.no_gradient_checkpointing,
                  critic=not args.critic_free, quantization=args.quantization,
                  quantize_lm_head=args.quantize_lm_head, optimizer=args.optimizer,
                  gpus=args.gpus, strategy=args.strategy)
    if args.no_autocast:
        kwargs["autocast"] = False
    try:
        result = plan(args.model, batch=args.batch, minibatch=args.minibatch,
                      forward_chunk=args.forward_chunk, **kwargs)
        # the same usable memory as the per-stage answers below (the card less --reserve)
        best = (largest_batch(args.model, args.card - args.reserve, minibatch=args.minibatch,
                              forward_chunk=args.forward_chunk, **kwargs)
                if args.card > args.reserve else 0)
        fits = fit(args.model, args.card, batch=args.batch, reserve_gib=args.reserve,
                   minibatch=args.minibatch, forward_chunk=args.forward_chunk, **kwargs)
    except ValueError as error:  # a bad value: one line, no usage block (exit status 2)
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if args.json:
        result["largest_batch"] = {"card_gib": args.card, "batch": best}
        result["fit"] = {"card_gib": args.card, "reserve_gib": args.reserve, **fits}
        print(json.dumps(result, indent=1))
    else:
        if recorded not in (None, "none"):
            print(f"quantization: {recorded}, as {args.model}'s roles.json records it (the RL "
                  f"stage loads that backbone's base so); --quantization none plans it dense")
        step = math.lcm(args.minibatch or 1, args.gpus)  # largest_batch's rounding
        print(format_plan(result, args.card, best, more_may_fit=best + step > BATCH_SEARCH_LIMIT))
        load = _load_peak(args.model, "rl", kwargs)
        if load:
            print(f"load: each GPU holds the whole base ({load / GIB:.2f} GiB) while the stage "
                  f"loads it, before fsdp2 shards it; a card must fit that too")
        print(format_fit(fits, args.card, batch=args.batch, prompt_length=args.prompt_length,
                         response_length=args.response_length, reserve_gib=args.reserve,
                         checkpointing=not args.no_gradient_checkpointing))
    return 0


if __name__ == "__main__":  # python -m rlhf.plan (`rlhf plan` goes through rlhf.cli)
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(main))

