"""End-to-end PPO iteration at published model shapes: peak memory, seconds per batch, tokens/s.

One iteration (the same steps as rlhf/ppo.py, one SharedBackbone for the four roles)::

    rollout     RolloutEngine: static KV cache, CUDA-graph decode, policy LoRA unmerged,
                log-probs of the sampled tokens recorded while sampling (the old log-probs)
    scoring     reward adapter + head (the reward model), reference log-probs (adapters off),
                critic values; chunks of ``forward_chunk`` rows, no (B, T, V) logits
    GAE         rlhf_kernels.shape_rewards, gae, masked_whiten
    update      ppo_epochs x minibatches: linear_ppo_loss from the policy's hidden states
                (backward while the policy adapter is active), ppo_value_loss for the critic;
                AdamW over the policy and critic adapters (+ value head) only; gradient
                checkpointing

Models are random-initialised from configs written in rlhf/plan.py (Qwen2.5 0.5B/1.5B/7B,
Llama-3 8B: the public shapes, nothing downloaded), bf16 on the GPU; prompts are random tokens of
random lengths, left-padded. By default rows never stop at an EOS (random models rarely emit one;
a fixed 256-token response is what TRL's numbers in DESIGN.md were measured with), so response
tokens/s = B x R / seconds per batch.

Defaults: batch 16, prompt 128, response 256, LoRA r=16, one epoch, one minibatch (DESIGN.md's
TRL table). ``--max-memory GiB`` caps the process with torch.cuda.set_per_process_memory_fraction
(emulates a smaller card). ``--smoke`` runs a tiny shape on the CPU in seconds (tests use it).
Each row also carries the planner's prediction (rlhf.plan) and measured / predicted per stage.

    python -m benchmarks.e2e_ppo --shape qwen2.5-1.5b
    python -m benchmarks.e2e_ppo --shape llama-3-8b --max-memory 24 --minibatch 4
    python -m benchmarks.e2e_ppo --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

import rlhf_kernels
from benchmarks.common import print_table, save_results
from rlhf import plan as planner
from rlhf.engine import RolloutEngine
from rlhf.models import LoraSpec, SharedBackbone

IGNORE_INDEX = -100


@dataclass
class E2EConfig:
    """One benchmark case."""

    shape: str = "qwen2.5-1.5b"
    batch: int = 16
    prompt_length: int = 128
    response_length: int = 256
    lora_rank: int = 16
    ppo_epochs: int = 1
    minibatch: int = 16  # rows per optimizer step; batch / minibatch minibatches per epoch
    forward_chunk: int = 16  # rows per no-grad scoring forward
    gradient_checkpointing: bool = True
    dtype: str = "bfloat16"
    device: str = "cuda"
    decode_graph: str = "auto"
    stop_at_eos: bool = False
    recompute_old_logprobs: bool = False  # True: one more policy forward instead of the engine's
    warmup: int = 1  # untimed iterations (CUDA-graph capture, Triton compilation)
    iterations: int = 2
    max_memory_gib: float | None = None
    temperature: float = 1.0
    lr: float = 1e-5
    seed: int = 0
    config_overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch % self.minibatch:
            raise ValueError(f"batch ({self.batch}) must be a multiple of minibatch "
                             f"({self.minibatch})")
        if self.forward_chunk < 1 or self.iterations < 1 or self.warmup < 0:
            raise ValueError("forward_chunk and iterations must be >= 1, warmup >= 0")


SMOKE = dict(shape="tiny", batch=4, prompt_length=8, response_length=8, lora_rank=4,
             minibatch=2, forward_chunk=2, dtype="float32", device="cpu", warmup=0,
             iterations=1)


# --------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------
def build_backbone(cfg: E2EConfig) -> SharedBackbone:
    """Random-initialised model of the preset shape, bf16 (or cfg.dtype), three LoRA roles."""
    from transformers import AutoModelForCausalLM

    config = planner.hf_config(cfg.shape, **cfg.config_overrides)
    config._attn_implementation = "sdpa"
    dtype = getattr(torch, cfg.dtype)
    with torch.device(cfg.device):
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    lora = LoraSpec(rank=cfg.lora_rank, alpha=2 * cfg.lora_rank)
    backbone = SharedBackbone.from_model(model, lora=lora,
                                         gradient_checkpointing=cfg.gradient_checkpointing)
    with torch.no_grad():  # adapters away from B = 0, so policy / critic / reward differ
        for name, param in backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1e-3)
    backbone.set_trainable(("policy", "critic"))
    return backbone


def synthetic_prompts(cfg: E2EConfig, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) random token ids (ids >= 3, no special tokens), lengths in [P/2, P], left-padded."""
    generator = torch.Generator().manual_seed(cfg.seed)
    batch, length = cfg.batch, cfg.prompt_length
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    lengths = torch.randint(max(1, length // 2), length + 1, (batch,), generator=generator)
    lengths[0] = length  # one full-length row: the prompt width is P
    mask = (torch.arange(length)[None, :] >= (length - lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    return ids.to(device), mask.to(device)


# --------------------------------------------------------------------------------------------
# one PPO iteration
# --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageClock:
    """Wall time per stage and (CUDA) the allocator's peak within it; ``marker`` is called at
    each stage start (the CPU tests hook a live-tensor tracker there)."""

    def __init__(self, device: torch.device, marker=None):
        self.device, self.marker = device, marker
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.marker is not None:
            self.marker(name)
        start = time.perf_counter()
        yield
        _sync(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), peak)


def _chunked(fn, sequences, attention_mask, rows: int) -> torch.Tensor:
    return torch.cat([fn(sequences[i:i + rows], attention_mask[i:i + rows])
                      for i in range(0, sequences.shape[0], rows)])


def ppo_iteration(backbone: SharedBackbone, engine: RolloutEngine, optimizer, prompt_ids,
                  prompt_mask, cfg: E2EConfig, clock: StageClock, eos_token_id=None) -> dict:
    """Rollout -> scoring -> GAE -> PPO update; returns stats (floats)."""
    with clock.stage("rollout"):
        backbone.eval()
        gen = engine.generate(prompt_ids, prompt_mask, cfg.response_length,
                              eos_token_id=eos_token_id, pad_token_id=0,
                              temperature=cfg.temperature, seed=cfg.seed)
    P = gen.prompt_length
    seq, attn = gen.sequences, gen.attention_mask
    mask = gen.response_mask.float()  # (B, R): the response frame, position t scores token P + t
    with clock.stage("scoring"), torch.no_grad():
        scores = _chunked(backbone.rewards, seq, attn, cfg.forward_chunk)
        # SharedBackbone.token_logprobs: hidden states x lm_head through linear_logprobs
        ref_logp = _chunked(lambda s, a: backbone.token_logprobs(s, a, None, cfg.temperature),
                            seq, attn, cfg.forward_chunk)[:, P - 1:] * mask
        values = _chunked(backbone.values, seq, attn, cfg.forward_chunk)[:, P - 1:-1] * mask
        if cfg.recompute_old_logprobs:
            old_logp = _chunked(
                lambda s, a: backbone.token_logprobs(s, a, "policy", cfg.temperature),
                seq, attn, cfg.forward_chunk)[:, P - 1:] * mask
        else:
            old_logp = gen.logprobs
        rewards = rlhf_kernels.shape_rewards(scores, old_logp, ref_logp, mask, kl_coef=0.05)
        advantages, returns = rlhf_kernels.gae(rewards, values, mask, 1.0, 0.95)
        advantages = rlhf_kernels.masked_whiten(advantages, mask)
    labels = torch.where(gen.response_mask, gen.response_ids, IGNORE_INDEX)
    stats: dict[str, float] = {}
    with clock.stage("update"):
        backbone.train()
        generator = torch.Generator().manual_seed(cfg.seed)
        for _epoch in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch, generator=generator).to(seq.device)
            for first in range(0, cfg.batch, cfg.minibatch):
                rows = order[first:first + cfg.minibatch]
                s, a, m = seq[rows], attn[rows], mask[rows]
                # policy: hidden states -> fused loss; backward while the policy adapter is on
                hidden = backbone.hidden_states(s, a, "policy")[:, P - 1:-1]
                pg_loss, pg_stats = rlhf_kernels.linear_ppo_loss(
                    hidden, backbone.lm_head_weight(), labels[rows], old_logp[rows],
                    advantages[rows], m, bias=backbone.lm_head_bias(),
                    temperature=cfg.temperature)
                pg_loss.backward()
                del hidden
                new_values = backbone.values(s, a)[:, P - 1:-1]
                v_loss, v_stats = rlhf_kernels.ppo_value_loss(
                    new_values, values[rows], returns[rows], m)
                v_loss.backward()
                del new_values
                torch.nn.utils.clip_grad_norm_(
                    [p for group in optimizer.param_groups for p in group["params"]], 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        backbone.eval()
    stats.update(policy_loss=pg_loss.item(), value_loss=v_loss.item(),
                 clipfrac=float(pg_stats["clipfrac"]), score=float(scores.mean()),
                 response_tokens=int(gen.response_mask.sum()),
                 response_width=int(gen.response_mask.shape[1]),
                 explained_variance=float(v_stats["explained_variance"]))
    return stats


def make_optimizer(backbone: SharedBackbone, cfg: E2EConfig):
    params = backbone.trainable_parameters("policy") + backbone.trainable_parameters("critic")
    fused = torch.device(cfg.device).type == "cuda"
    return torch.optim.AdamW(params, lr=cfg.lr, fused=fused)


def run_case(cfg: E2EConfig, marker=None) -> dict:
    """Build, warm up, time ``cfg.iterations`` iterations; one result row."""
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if cfg.max_memory_gib is not None:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(
                min(1.0, cfg.max_memory_gib * 2**30 / total), device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    backbone = build_backbone(cfg)
    optimizer = make_optimizer(backbone, cfg)
    engine = RolloutEngine(backbone, decode_graph=cfg.decode_graph)
    prompt_ids, prompt_mask = synthetic_prompts(cfg, backbone.vocab_size, device)
    eos = 2 if cfg.stop_at_eos else None
    for _ in range(cfg.warmup):
        ppo_iteration(backbone, engine, optimizer, prompt_ids, prompt_mask, cfg,
                      StageClock(device), eos)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = StageClock(device, marker)
    total_tokens = 0
    started = time.perf_counter()
    for _ in range(cfg.iterations):
        stats = ppo_iteration(backbone, engine, optimizer, prompt_ids, prompt_mask, cfg, clock,
                              eos)
        total_tokens += stats["response_tokens"]
    elapsed = time.perf_counter() - started
    n = cfg.iterations
    predicted = planner.plan(cfg.shape, batch=cfg.batch, prompt_length=cfg.prompt_length,
                             response_length=cfg.response_length, lora_rank=cfg.lora_rank,
                             dtype=cfg.dtype, gradient_checkpointing=cfg.gradient_checkpointing,
                             minibatch=cfg.minibatch, forward_chunk=cfg.forward_chunk,
                             device=device.type, config_overrides=cfg.config_overrides)
    row = {
        "op": "e2e_ppo", "case": cfg.shape, "impl": f"rlhf shared-LoRA r={cfg.lora_rank}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "s_per_batch": elapsed / n,
        "response_tok_per_s": total_tokens / elapsed,
        "generation_s": clock.seconds["rollout"] / n,
        "scoring_s": clock.seconds["scoring"] / n,
        "update_s": clock.seconds["update"] / n,
        "predicted_peak_gib": predicted["peak_bytes"] / 2**30,
        "config": asdict(cfg),
        "last_stats": stats,
        "plan": {k: v for k, v in predicted.items() if k != "config"},
    }
    if device.type == "cuda":
        peak = max(clock.peak_bytes.values())
        row["peak_gib"] = peak / 2**30
        row["stage_peak_gib"] = {k: v / 2**30 for k, v in clock.peak_bytes.items()}
        row["measured_over_predicted"] = {
            k: clock.peak_bytes[k] / predicted["stages"][k]["total"] for k in clock.peak_bytes}
        row["max_memory_gib"] = cfg.max_memory_gib
    del engine, optimizer, backbone
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run(smoke: bool = False, **overrides) -> list[dict]:
    """Entry point for ``python -m benchmarks`` style callers: one row per case."""
    base = dict(SMOKE) if smoke else {}
    base.update(overrides)
    return [run_case(E2EConfig(**base))]


COLUMNS = ("case", "device", "peak_gib", "predicted_peak_gib", "s_per_batch",
           "response_tok_per_s", "generation_s", "scoring_s", "update_s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e_ppo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", choices=sorted(planner.PRESETS),
                        help="preset shape (repeatable; default qwen2.5-1.5b)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--response-length", type=int, default=256)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--ppo-epochs", type=int, default=1)
    parser.add_argument("--minibatch", type=int, default=None, help="default: the batch")
    parser.add_argument("--forward-chunk", type=int, default=None, help="default: the batch")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--decode-graph", default="auto", choices=("auto", "cuda_graph",
                                                                   "compile", "none"))
    parser.add_argument("--stop-at-eos", action="store_true")
    parser.add_argument("--recompute-old-logprobs", action="store_true")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--max-memory", type=float, default=None, metavar="GiB",
                        help="cap with torch.cuda.set_per_process_memory_fraction")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, no files")
    args = parser.parse_args(argv)
    if args.smoke:
        rows = run(smoke=True)
        print_table(rows, COLUMNS)
        return 0
    if not torch.cuda.is_available():
        print("No CUDA device: this benchmark measures GPU memory and speed. Use --smoke to "
              "check the script on the CPU.", file=sys.stderr)
        return 2
    rows = []
    for shape in args.shape or ["qwen2.5-1.5b"]:
        cfg = E2EConfig(
            shape=shape, batch=args.batch, prompt_length=args.prompt_length,
            response_length=args.response_length, lora_rank=args.lora_rank,
            ppo_epochs=args.ppo_epochs, minibatch=args.minibatch or args.batch,
            forward_chunk=args.forward_chunk or args.batch,
            gradient_checkpointing=not args.no_gradient_checkpointing,
            decode_graph=args.decode_graph, stop_at_eos=args.stop_at_eos,
            recompute_old_logprobs=args.recompute_old_logprobs, warmup=args.warmup,
            iterations=args.iterations, max_memory_gib=args.max_memory)
        try:
            rows.append(run_case(cfg))
        except torch.OutOfMemoryError as error:
            rows.append({"op": "e2e_ppo", "case": shape, "error": f"out of memory: {error}",
                         "config": asdict(cfg)})
            torch.cuda.empty_cache()
        print_table(rows[-1:], COLUMNS)
    path = save_results("e2e_ppo", rows)
    print(f"wrote {path}")
    print_table(rows, COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
