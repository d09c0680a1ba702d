"""The memory of one PPO update step, computed from a model's shape: the table of docs/memory.md.

``estimate_memory`` counts the weights, gradients, Adam states and activations of the shared
backbone (rlhf/backbone.py) and of the four-model setups it replaces, with the planner's model
of what PyTorch and PEFT allocate (rlhf/plan.py, the one ``rlhf plan`` answers with and the
H200 runs were checked against): the ``shared-lora`` row is ``plan``'s update stage less the
rollout engine's KV cache and the rollout tensors, and every setup's activations come from the
same ``plan.update_activations``. ``memory_table_markdown`` renders the table
(``python -m rlhf.memory`` prints it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from rlhf import plan as planner

__all__ = ["LLAMA_3_8B", "QWEN2_5_1_5B", "SETUPS", "ModelShape", "estimate_memory",
           "memory_table_markdown"]


@dataclass(frozen=True)
class ModelShape:
    """The shape numbers of a Llama/Qwen2-style decoder that decide its memory, with a name for
    the table; the counts are the planner's (``dims``: ``plan.ModelDims``)."""

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

    def config(self) -> dict:
        """The config.json values ``rlhf.plan`` reads (a Qwen2 config when ``qkv_bias``)."""
        return {"model_type": "qwen2" if self.qkv_bias else "llama",
                "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads,
                "tie_word_embeddings": self.tie_word_embeddings,
                "attention_bias": self.qkv_bias}

    def dims(self) -> planner.ModelDims:
        return planner.ModelDims.from_dict(self.config())

    @property
    def kv_dim(self) -> int:
        return self.dims().kv_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of the seven linears of one decoder layer (q, k, v, o, gate, up, down)."""
        return self.dims().linears()

    def backbone_params(self) -> int:
        """Parameters without the lm_head: embeddings, layers, final norm."""
        dims = self.dims()
        return dims.params() - dims.lm_head_params()

    def lm_head_params(self) -> int:
        """Extra parameters of the lm_head (0 when tied to the embeddings)."""
        return self.dims().lm_head_params()

    def params(self) -> int:
        return self.dims().params()

    def lora_params(self, rank: int) -> int:
        """Parameters of one LoRA adapter of rank ``rank`` on every attention and MLP linear."""
        return self.dims().lora_params(rank)


# Shapes from the public configs of Qwen/Qwen2.5-1.5B and meta-llama/Meta-Llama-3-8B.
QWEN2_5_1_5B = ModelShape("Qwen2.5-1.5B", 151936, 1536, 8960, 28, 12, 2, True, qkv_bias=True)
LLAMA_3_8B = ModelShape("Llama-3-8B", 128256, 4096, 14336, 32, 32, 8, False)

SETUPS = ("shared-lora", "separate-lora", "separate-full")


def estimate_memory(shape: ModelShape, setup: str = "shared-lora", *, batch: int = 16,
                    prompt_length: int = 128, response_length: int = 256, lora_rank: int = 16,
                    gradient_checkpointing: bool = True,
                    fused_logprobs: bool | None = None) -> dict:
    """Computed bytes of one PPO update step (no measurement) on a GPU, bf16 weights.

    Setups:
      ``shared-lora``   one backbone; policy/critic/reward LoRA adapters (fp32) + fp32 heads;
                        reference = adapters off. Policy and critic adapters (+ value head)
                        train; the LoRA layers run rlhf/lora_forward.py under bf16 autocast.
                        The figures are ``rlhf.plan.plan``'s update stage (batch = minibatch)
                        less its ``kv_cache`` and ``rollout_tensors``.
      ``separate-lora`` four backbones (policy, reference, reward, critic; reward and critic
                        without lm_head), LoRA adapters on policy and critic through PEFT's own
                        forward (an fp32 copy of each adapted linear's input kept for the
                        backward).
      ``separate-full`` four backbones, policy and critic (+ value head) fully trained: bf16
                        grads without an fp32 master copy, fp32 Adam moments.
    Activations (``plan.update_activations``): one minibatch of ``batch`` sequences of
    ``prompt_length + response_length`` tokens, one backward at a time (policy or critic),
    SDPA flash attention; with gradient checkpointing each layer's input plus one layer's
    recomputed activations and backward temporaries. Logits: ``fused_logprobs`` (default:
    shared-lora only) one ``linear_ppo_loss`` chunk over the response and its gradient, else
    (B, T, V) bf16 logits + fp32 log-softmax + fp32 gradient. Left out: the KV cache and
    sampling buffers of generation, the rollout tensors, the CUDA context and allocator slack.
    Returns bytes: ``weights``, ``grads``, ``optimizer``, ``activations``, ``total``.
    """
    if setup not in SETUPS:
        raise ValueError(f"setup={setup!r} is not one of {SETUPS}")
    fused = setup == "shared-lora" if fused_logprobs is None else fused_logprobs
    bf16, fp32 = 2, 4
    planned = planner.plan(shape.config(), batch=batch, prompt_length=prompt_length,
                           response_length=response_length, lora_rank=lora_rank,
                           dtype="bfloat16", gradient_checkpointing=gradient_checkpointing,
                           device="cuda")
    resident, update = planned["resident"], planned["stages"]["update"]
    # the shared backbone's trained set (policy adapter, critic adapter + value head) is the
    # separate-lora setup's too
    grads, optimizer = update["grads"], resident["adam_states"]
    lora, head = shape.lora_params(lora_rank), shape.hidden_size + 1
    four_models = bf16 * (2 * shape.params() + 2 * shape.backbone_params())
    if setup == "shared-lora":
        weights = resident["weights"] + resident["adapters_and_heads"]
    elif setup == "separate-lora":
        weights = four_models + fp32 * (2 * lora + 2 * head)
    else:
        weights = four_models + fp32 * 2 * head
        trained = shape.params() + shape.backbone_params()
        grads = bf16 * trained + fp32 * head
        optimizer = planner.adam_state_bytes([trained + head])
    parts = planner.update_activations(
        shape.dims(), bf16, rows=batch, prompt_length=prompt_length,
        response_length=response_length, gradient_checkpointing=gradient_checkpointing,
        fast_lora=setup != "separate-lora", eager_logits=not fused)
    activations = parts["saved_activations"] + parts["backward_or_head"]
    return {"weights": weights, "grads": grads, "optimizer": optimizer,
            "activations": activations,
            "total": weights + grads + optimizer + activations}


def memory_table_markdown(shapes: Iterable[ModelShape] = (QWEN2_5_1_5B, LLAMA_3_8B), *,
                          batch: int = 16, prompt_length: int = 128, response_length: int = 256,
                          lora_rank: int = 16) -> str:
    """The markdown table of docs/memory.md (GiB, computed by ``estimate_memory``)."""
    gib = 1024 ** 3
    lines = ["| model | setup | weights | grads | Adam states | activations | total |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for shape in shapes:
        for setup in SETUPS:
            m = estimate_memory(shape, setup, batch=batch, prompt_length=prompt_length,
                                response_length=response_length, lora_rank=lora_rank)
            cells = " | ".join(f"{m[k] / gib:.2f}" for k in
                               ("weights", "grads", "optimizer", "activations", "total"))
            lines.append(f"| {shape.name} ({shape.params() / 1e9:.2f} B) | {setup} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m rlhf.memory: the table of docs/memory.md
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(lambda: print(memory_table_markdown())))
