"""The memory of one PPO training step, computed from a model's shape: docs/memory.md.

``estimate_memory`` gives the bytes of weights, gradients, Adam states and activations of a
shared-backbone run and of the four-model setups it replaces; ``memory_table_markdown`` renders
the table of docs/memory.md (``python -m rlhf.memory`` prints it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["LLAMA_3_8B", "QWEN2_5_1_5B", "SETUPS", "ModelShape", "estimate_memory",
           "memory_table_markdown"]


@dataclass(frozen=True)
class ModelShape:
    """The shape numbers of a Llama/Qwen2-style decoder that decide its memory."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_config(cls, config, name: str = "") -> ModelShape:
        """From a Llama/Qwen2-style Hugging Face config."""
        return cls(name or config.model_type, config.vocab_size, config.hidden_size,
                   config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads,
                   getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   bool(getattr(config, "tie_word_embeddings", False)),
                   config.model_type == "qwen2")

    @property
    def kv_dim(self) -> int:
        return self.hidden_size // self.num_heads * self.num_kv_heads

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of the seven linears of one decoder layer (q, k, v, o, gate, up, down)."""
        h, kv, i = self.hidden_size, self.kv_dim, self.intermediate_size
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    def backbone_params(self) -> int:
        """Parameters without the lm_head: embeddings, layers, final norm."""
        h = self.hidden_size
        per_layer = sum(a * b for a, b in self.linear_shapes()) + 2 * h
        if self.qkv_bias:
            per_layer += h + 2 * self.kv_dim
        return self.vocab_size * h + self.num_layers * per_layer + h

    def lm_head_params(self) -> int:
        """Extra parameters of the lm_head (0 when tied to the embeddings)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def params(self) -> int:
        return self.backbone_params() + self.lm_head_params()

    def lora_params(self, rank: int) -> int:
        """Parameters of one LoRA adapter of rank ``rank`` on every attention and MLP linear."""
        return self.num_layers * sum(rank * (a + b) for a, b in self.linear_shapes())


# Shapes from the public configs of Qwen/Qwen2.5-1.5B and meta-llama/Meta-Llama-3-8B.
QWEN2_5_1_5B = ModelShape("Qwen2.5-1.5B", 151936, 1536, 8960, 28, 12, 2, True, qkv_bias=True)
LLAMA_3_8B = ModelShape("Llama-3-8B", 128256, 4096, 14336, 32, 32, 8, False)

SETUPS = ("shared-lora", "separate-lora", "separate-full")


def estimate_memory(shape: ModelShape, setup: str = "shared-lora", *, batch: int = 16,
                    seq_len: int = 384, lora_rank: int = 16, gradient_checkpointing: bool = True,
                    fused_logprobs: bool | None = None, logprob_chunk_tokens: int = 1024) -> dict:
    """Computed bytes of one PPO training step's resident state (no measurement).

    Setups:
      ``shared-lora``   one bf16 backbone; policy/critic/reward LoRA adapters (fp32) + fp32 heads;
                        reference = adapters off. Policy and critic adapters train.
      ``separate-lora`` four bf16 backbones (policy, reference, reward, critic; reward and critic
                        without lm_head), LoRA adapters on policy and critic.
      ``separate-full`` four bf16 backbones, policy and critic fully trained.
    Assumptions: bf16 weights and (full fine-tuning) bf16 grads without an fp32 master copy; fp32
    adapters, adapter grads and Adam moments (2 x 4 bytes per trained parameter); activations of
    one backward at a time (policy or critic) for ``batch`` sequences of ``seq_len`` tokens, with
    flash/SDPA attention (no T x T scores); with gradient checkpointing one bf16 (B, T, H) per
    layer plus one layer's working set ``B T (6 H + 2 kv + 4 I)`` bf16, without it every layer's
    working set. Logits: ``fused_logprobs`` (default: shared-lora only) holds
    ``logprob_chunk_tokens x V`` fp32 at a time, the eager path (B, T, V) bf16 logits + fp32
    log-softmax + fp32 gradient. KV cache for generation and allocator overhead are left out.
    Returns bytes: ``weights``, ``grads``, ``optimizer``, ``activations``, ``total``.
    """
    if setup not in SETUPS:
        raise ValueError(f"setup={setup!r} is not one of {SETUPS}")
    bf16, fp32 = 2, 4
    lora = shape.lora_params(lora_rank)
    head = shape.hidden_size + 1
    full, no_lm_head = shape.params(), shape.backbone_params()
    if setup == "shared-lora":
        weights = bf16 * full + fp32 * (3 * lora + 2 * head)
        trained = [(fp32, lora), (fp32, lora + head)]  # policy adapter; critic adapter + head
    elif setup == "separate-lora":
        weights = bf16 * (2 * full + 2 * no_lm_head) + fp32 * (2 * lora + 2 * head)
        trained = [(fp32, lora), (fp32, lora + head)]
    else:
        weights = bf16 * (2 * full + 2 * no_lm_head) + fp32 * 2 * head
        trained = [(bf16, full), (bf16, no_lm_head + head)]
    grads = sum(size * n for size, n in trained)
    optimizer = sum(2 * fp32 * n for _, n in trained)

    tokens = batch * seq_len
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.kv_dim
    layer_working_set = bf16 * tokens * (6 * h + 2 * kv + 4 * i)
    if gradient_checkpointing:
        layers = shape.num_layers * bf16 * tokens * h + layer_working_set
    else:
        layers = shape.num_layers * layer_working_set
    fused = setup == "shared-lora" if fused_logprobs is None else fused_logprobs
    if fused:
        logits = fp32 * min(tokens, logprob_chunk_tokens) * shape.vocab_size
    else:
        logits = (bf16 + fp32 + fp32) * tokens * shape.vocab_size
    activations = layers + logits
    return {"weights": weights, "grads": grads, "optimizer": optimizer,
            "activations": activations,
            "total": weights + grads + optimizer + activations}


def memory_table_markdown(shapes: Iterable[ModelShape] = (QWEN2_5_1_5B, LLAMA_3_8B), *,
                          batch: int = 16, seq_len: int = 384, lora_rank: int = 16) -> str:
    """The markdown table of docs/memory.md (GiB, computed by ``estimate_memory``)."""
    gib = 1024 ** 3
    lines = ["| model | setup | weights | grads | Adam states | activations | total |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for shape in shapes:
        for setup in SETUPS:
            m = estimate_memory(shape, setup, batch=batch, seq_len=seq_len, lora_rank=lora_rank)
            cells = " | ".join(f"{m[k] / gib:.2f}" for k in
                               ("weights", "grads", "optimizer", "activations", "total"))
            lines.append(f"| {shape.name} ({shape.params() / 1e9:.2f} B) | {setup} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m rlhf.memory: the table of docs/memory.md
    print(memory_table_markdown())
