"""End-to-end PPO iteration at published model shapes: peak memory, seconds per batch, tokens/s.

One iteration, with the trainer's own functions (rlhf/ppo.py: make_rollout, backward_losses,
make_optimizer; one SharedBackbone for the four roles)::

    rollout     RolloutEngine: static KV cache, CUDA-graph decode, policy LoRA unmerged,
                log-probs of the sampled tokens recorded while sampling
    scoring     reward adapter + head (the reward model), reference log-probs (adapters off),
                old log-probs (a policy forward in bf16, as `rlhf ppo` does; the recorded ones
                with --old-logprobs recorded), critic values; ``forward_chunk`` rows per
                forward, lm_head over the response positions only, no (B, T, V) logits;
                shape_rewards, gae, masked_whiten
    update      ppo_epochs x minibatches: linear_ppo_loss from the policy's hidden states
                (backward while the policy adapter is active), ppo_value_loss for the critic;
                AdamW over the policy and critic adapters (+ value head) only; gradient
                checkpointing

Models are random-initialised from configs written in rlhf/plan.py (Qwen2.5 0.5B/1.5B/7B,
Llama-3 8B: the public shapes, nothing downloaded), bf16 on the GPU, run under bf16 autocast in
all three stages as `rlhf ppo` runs them (``--autocast off``: none, as the first two H200 proofs
ran, with PEFT's fp32 adapter GEMMs); prompts are random tokens of
random lengths, left-padded. By default rows never stop at an EOS (random models rarely emit one;
a fixed 256-token response is what TRL's anchor figures in docs/design.md §4 were measured
with), so response tokens/s = B x R / seconds per batch.

Defaults: batch 16, prompt 128, response 256, LoRA r=16, one epoch, one minibatch (the TRL table of
docs/design.md §4). ``--max-memory GiB`` caps the process with
torch.cuda.set_per_process_memory_fraction (emulates a smaller card). ``--smoke`` runs a tiny shape
on the CPU in seconds (tests use it). Each row also carries the planner's prediction (rlhf.plan) and
measured / predicted per stage.

    python -m benchmarks.e2e_ppo --shape qwen2.5-1.5b
    python -m benchmarks.e2e_ppo --shape llama-3-8b --max-memory 24 --minibatch 4
    python -m benchmarks.e2e_ppo --shape qwen2.5-1.5b --peer-script benchmarks/peers/trl_ppo_peer.py
    python -m benchmarks.e2e_ppo --smoke

``--profile-stages`` runs one more, untimed iteration under torch.profiler and adds
``device_busy`` to the row: per stage the seconds the GPU was busy (the union of its kernels'
and copies' intervals) over the stage's unprofiled seconds, and the decode step's GPU time (the
captured graph replayed back to back) over the measured time per generated token. Near 1 the
GPU is the limit; well below 1 the host keeps it waiting (what a CUDA graph of the step would
remove).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from benchmarks.common import (
    copy_bandwidth_gbps,
    matmul_tflops,
    print_table,
    proc_status_kib,
    save_results,
)
from rlhf import plan as planner
from rlhf.compile import CompiledLayers
from rlhf.engine import DECODE_GRAPH_MODES, RolloutEngine
from rlhf.models import LoraSpec, SharedBackbone
from rlhf.ppo import PPOConfig, backward_losses, make_rollout, recorded_logprobs_match
from rlhf.ppo import make_optimizer as ppo_make_optimizer
from rlhf.stage import cpu_allocator_setting, resolve_device

OLD_LOGPROBS = ("auto", "forward", "recorded")
AUTOCAST = ("auto", "off")


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
    old_logprobs: str = "auto"  # "auto" as rlhf ppo decides; "forward"; "recorded" (the engine's)
    warmup: int = 1  # untimed iterations (CUDA-graph capture, Triton compilation)
    iterations: int = 2
    max_memory_gib: float | None = None
    temperature: float = 1.0
    lr: float = 1e-5
    seed: int = 0
    # one more iteration after the timed ones: how busy the device was in each stage
    # (device_busy(); it is not counted in the timings)
    profile_stages: bool = False
    # after the timed iterations, the rollout alone with each of these decode modes (e.g.
    # "compile": torch.compile's fused, graph-replayed step); decode_compare() in the row
    decode_compare: tuple[str, ...] = ()
    # "auto": bf16 autocast on a GPU with bf16 weights, as `rlhf ppo` runs (its bf16 setting:
    # rollout, scoring and update); "off": none (the first two H200 proofs ran so, with PEFT's
    # fp32 adapter GEMMs)
    autocast: str = "auto"
    # scoring and update with the decoder layers compiled, as `rlhf ppo torch_compile=true` runs
    # them (rlhf/compile.py); the warm-up iterations compile (their time: the row's warmup_s)
    torch_compile: bool = False
    config_overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch % self.minibatch:
            raise ValueError(f"batch ({self.batch}) must be a multiple of minibatch "
                             f"({self.minibatch})")
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ValueError(f"old_logprobs={self.old_logprobs!r}; expected one of "
                             f"{OLD_LOGPROBS}")
        unknown = [m for m in self.decode_compare if m not in DECODE_GRAPH_MODES]
        if unknown:
            raise ValueError(f"decode_compare={unknown}; modes are {DECODE_GRAPH_MODES}")
        if self.autocast not in AUTOCAST:
            raise ValueError(f"autocast={self.autocast!r}; expected one of {AUTOCAST}")
        if self.forward_chunk < 1 or self.iterations < 1 or self.warmup < 0:
            raise ValueError("forward_chunk and iterations must be >= 1, warmup >= 0")


def autocast_dtype(cfg: E2EConfig) -> torch.dtype | None:
    """The autocast dtype the trainer would use here (rlhf/rl.py: bf16 on CUDA), or None."""
    if cfg.autocast == "auto" and cfg.device == "cuda" and cfg.dtype == "bfloat16":
        return torch.bfloat16
    return None


def _autocast(cfg: E2EConfig):
    dtype = autocast_dtype(cfg)
    return torch.autocast(cfg.device, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


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
    """Wall time per stage and its memory peak: on CUDA the allocator's, on the CPU (when
    ``rss_base`` is given and the peak can be reset) the resident set's above ``rss_base``.
    ``marker`` is called at each stage start (the CPU tests hook a live-tensor tracker there)."""

    def __init__(self, device: torch.device, marker=None, rss_base: int | None = None):
        self.device, self.marker, self.rss_base = device, marker, rss_base
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.marker is not None:
            self.marker(name)
        rss = self.device.type == "cpu" and self.rss_base is not None and _reset_peak_rss()
        start = time.perf_counter()
        yield
        _sync(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), peak)
        elif rss:
            peak = _peak_rss_bytes() - self.rss_base
            self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), peak)


def busy_seconds(intervals) -> float:
    """Length of the union of (start, end) intervals: the time at least one of them ran."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def top_device_work(profile, device: torch.device, n: int = 10) -> list[dict]:
    """The ``n`` names (kernels on CUDA, aten ops on the CPU) that kept the device busiest in a
    torch.profiler session: total ms, calls, ms per call."""
    totals: dict[str, list] = {}
    for event in _device_events(profile, device):
        entry = totals.setdefault(event.name, [0.0, 0])
        entry[0] += (event.time_range.end - event.time_range.start) * 1e-3
        entry[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:n]
    return [{"name": name[:120], "ms": ms, "calls": calls, "ms_per_call": ms / calls}
            for name, (ms, calls) in ranked]


def _device_events(profile, device: torch.device):
    """The events of a torch.profiler session that ran on the device: the kernels, copies and
    fills on CUDA; on the CPU the aten ops."""
    cuda = device.type == "cuda"
    for event in profile.events():
        on_device = getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA
        if on_device == cuda and (cuda or event.name.startswith("aten::")):
            yield event


def _device_intervals(profile, device: torch.device) -> list[tuple[float, float]]:
    """(start, end) in seconds of what ran on the device in a torch.profiler session (on the
    CPU nested aten ops fall inside their parent's interval, which busy_seconds merges)."""
    intervals = []
    for event in _device_events(profile, device):
        start, end = event.time_range.start, event.time_range.end  # microseconds
        if end > start:
            intervals.append((start * 1e-6, end * 1e-6))
    return intervals


class ProfiledStageClock(StageClock):
    """A StageClock that also records, per stage, the seconds the device was busy: the union
    of the intervals of what ran on it (torch.profiler; kernels and copies on CUDA, aten ops on
    the CPU). The profiler's own host cost slows the stage down, so compare the busy seconds
    with the unprofiled stage time: busy / unprofiled near 1 means the device was the limit
    (nothing for CUDA graphs to win), well below 1 that the host kept it waiting."""

    def __init__(self, device: torch.device, stages: tuple[str, ...]):
        super().__init__(device)
        self.stages = stages
        self.busy: dict[str, float] = {}
        self.top: dict[str, list[dict]] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        if name not in self.stages:
            with super().stage(name):
                yield
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof, super().stage(name):
            yield
        intervals = _device_intervals(prof, self.device)
        self.top[name] = top_device_work(prof, self.device)
        if not intervals:  # the profiler saw nothing run there (no CUPTI): not "idle"
            self.busy[name] = None
        elif self.busy.get(name, 0.0) is not None:
            self.busy[name] = self.busy.get(name, 0.0) + busy_seconds(intervals)


def decode_step_device_s(engine: RolloutEngine, device: torch.device, steps: int = 64
                         ) -> float | None:
    """Seconds one replay of the engine's captured decode step keeps the GPU busy: ``steps``
    replays back to back (a replay's launch is microseconds of host time, so they queue and
    the GPU runs them without gaps). None without a captured graph. The replays rewrite the
    cache slot of the last step, which the next generation prefills afresh."""
    graph = getattr(engine, "_graph", None)
    if graph is None or device.type != "cuda":
        return None
    graph.replay()  # the first replay after other work may pay a cold start
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    _sync(device)
    return (time.perf_counter() - start) / steps


def decode_step_top_kernels(engine: RolloutEngine, device: torch.device, steps: int = 4
                            ) -> list[dict] | None:
    """The kernels of the captured decode step that take the most GPU time (per step), from
    ``steps`` replays under torch.profiler; None without a captured graph."""
    graph = getattr(engine, "_graph", None)
    if graph is None or device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        _sync(device)
    top = top_device_work(prof, device)
    for row in top:
        row["ms"] /= steps
        row["calls"] /= steps
    return top


def decode_compare(backbone, prompt_ids, prompt_mask, cfg: E2EConfig, eos,
                   generation_s: float) -> dict:
    """The rollout alone with each mode of ``cfg.decode_compare``, on a fresh engine: the first
    call (capture / compilation included) and one timed call; ``vs_main`` is the timed
    iterations' generation seconds over this mode's (> 1: this mode is faster)."""
    device = prompt_ids.device
    out = {}
    for mode in cfg.decode_compare:
        engine = RolloutEngine(backbone, decode_graph=mode, autocast_dtype=autocast_dtype(cfg))
        times = []
        for _ in range(2):
            _sync(device)
            started = time.perf_counter()
            gen = engine.generate(prompt_ids, prompt_mask, cfg.response_length,
                                  eos_token_id=eos, pad_token_id=0,
                                  temperature=cfg.temperature, seed=cfg.seed)
            _sync(device)
            times.append(time.perf_counter() - started)
        out[mode] = {"first_call_s": times[0], "generation_s": times[1],
                     "vs_main": generation_s / times[1],
                     "response_tokens": int(gen.response_mask.sum()),
                     "fell_back_to_eager": bool(engine._graph_failed)}
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_busy(backbone, engine, optimizer, prompt_ids, prompt_mask, cfg: E2EConfig, eos,
                stage_seconds: dict[str, float], compiled=None) -> dict:
    """One more iteration, profiled: per stage the seconds the device was busy and that over
    the stage's unprofiled time (``stage_seconds``, per iteration); for the rollout, the decode
    step's GPU time (graph replays) against the measured time per generated token."""
    device = prompt_ids.device
    clock = ProfiledStageClock(device, ("scoring", "update"))
    ppo_iteration(backbone, engine, optimizer, prompt_ids, prompt_mask, cfg, clock, eos,
                  compiled)
    out = {"busy_s": dict(clock.busy), "top_device_work": dict(clock.top),
           "busy_fraction": {k: v / stage_seconds[k] for k, v in clock.busy.items()
                             if v is not None and stage_seconds.get(k)},
           "how": "torch.profiler over one more iteration; busy_fraction = busy seconds / the "
                  "stage's unprofiled seconds"}
    step = decode_step_device_s(engine, device)
    if step is not None:
        measured = stage_seconds["rollout"] / cfg.response_length
        out.update(decode_step_gpu_ms=step * 1e3, decode_step_measured_ms=measured * 1e3,
                   decode_busy_fraction=step / measured,
                   decode_step_top_kernels=decode_step_top_kernels(engine, device))
    return out


def ppo_settings(cfg: E2EConfig) -> PPOConfig:
    """The trainer's settings for this case (rlhf/ppo.py's defaults otherwise: clip 0.2,
    token-mean, gamma 1, lambda 0.95, k1 KL in the reward, whitened advantages)."""
    return PPOConfig(rollout_batch_size=cfg.batch, minibatch_size=cfg.minibatch,
                     ppo_epochs=cfg.ppo_epochs, max_prompt_length=cfg.prompt_length,
                     max_new_tokens=cfg.response_length, temperature=cfg.temperature,
                     kl_coef=0.05, kl_target=None, forward_batch_size=cfg.forward_chunk,
                     lr=cfg.lr, critic_lr=cfg.lr, device=cfg.device,
                     torch_compile=cfg.torch_compile)


def uses_recorded_logprobs(backbone: SharedBackbone, cfg: E2EConfig) -> bool:
    """``auto`` decides as ``rlhf ppo`` does (recorded only when exact: fp32 weights, no
    autocast; so bf16 runs a policy forward, as TRL does); ``recorded`` skips that forward."""
    if cfg.old_logprobs == "auto":
        return recorded_logprobs_match(backbone, autocast_dtype(cfg))
    return cfg.old_logprobs == "recorded"


def ppo_iteration(backbone: SharedBackbone, engine: RolloutEngine, optimizer, prompt_ids,
                  prompt_mask, cfg: E2EConfig, clock: StageClock, eos_token_id=None,
                  compiled=None) -> dict:
    """Rollout -> scoring -> GAE -> PPO update with the trainer's own functions
    (``rlhf.ppo.make_rollout``, ``backward_losses``); returns stats (floats). ``compiled``: the
    ``rlhf.compile.CompiledLayers`` scoring and update run in (``torch_compile``), or None."""
    settings = ppo_settings(cfg)
    recorded = uses_recorded_logprobs(backbone, cfg)
    layers = compiled.active if compiled is not None else contextlib.nullcontext
    with clock.stage("rollout"):
        backbone.eval()
        gen = engine.generate(prompt_ids, prompt_mask, cfg.response_length,
                              eos_token_id=eos_token_id, pad_token_id=0,
                              temperature=cfg.temperature, seed=cfg.seed).without_prompt_padding()
    with clock.stage("scoring"):
        # reward adapter + head, reference (adapters off) and, unless recorded, old log-probs
        # through linear_logprobs over the response positions, critic values, shaped rewards,
        # GAE and whitening; forward_chunk rows per forward
        with _autocast(cfg), layers():
            rollout = make_rollout(backbone, gen, settings.kl_coef, settings,
                                   use_recorded_logprobs=recorded)
    policy_params = backbone.trainable_parameters("policy")
    critic_params = backbone.trainable_parameters("critic")
    with clock.stage("update"):
        backbone.train()
        generator = torch.Generator().manual_seed(cfg.seed)
        for _epoch in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch, generator=generator).to(gen.sequences.device)
            for first in range(0, cfg.batch, cfg.minibatch):
                batch = rollout.rows(order[first:first + cfg.minibatch])
                with layers():
                    pg_loss, pg_stats, v_loss, v_stats = backward_losses(
                        backbone, batch, settings, autocast_dtype(cfg))
                torch.nn.utils.clip_grad_norm_(policy_params, settings.grad_clip)
                torch.nn.utils.clip_grad_norm_(critic_params, settings.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        backbone.eval()
    stats = {}
    if not recorded:
        # issue item 5 at the real shape: the engine's recorded log-probs against the
        # teacher-forced forward the update uses (bf16: a few 1e-2 nats expected)
        diff = (gen.logprobs - rollout.old_logprobs).abs()[gen.response_mask]
        stats.update(recorded_vs_forward_logp_max=float(diff.max()),
                     recorded_vs_forward_logp_mean=float(diff.mean()))
    return dict(**stats, policy_loss=pg_loss.item(), value_loss=v_loss.item(),
                clipfrac=float(pg_stats["clipfrac"]), score=float(rollout.scores.mean()),
                response_tokens=int(gen.response_mask.sum()),
                response_width=int(gen.response_mask.shape[1]),
                explained_variance=float(v_stats["explained_variance"]))


def make_optimizer(backbone: SharedBackbone, cfg: E2EConfig):
    """The trainer's optimizer (rlhf.ppo.make_optimizer): adapters and value head only."""
    return ppo_make_optimizer(backbone.trainable_parameters("policy"),
                              backbone.trainable_parameters("critic"), ppo_settings(cfg),
                              torch.device(cfg.device))


def iteration_floor(cfg: E2EConfig, uses_recorded: bool, copy_gbps: float | None = None,
                    matmul_tflops: float | None = None) -> dict:
    """A lower bound on one PPO iteration's time, from the model's numbers (rlhf.plan).

    Generation is memory-bound: each of the R decode steps reads the base weights (decoder
    layers + lm_head) at least once, at the measured copy bandwidth. Everything else is
    compute-bound: 2 flops per weight per token for each forward over the B x S tokens (reward,
    reference, old log-probs unless recorded, values), and for the update per epoch, for each of
    policy and critic, forward + checkpoint recomputation + the backward's activation gradient
    (the base is frozen: no weight-gradient GEMMs) = 3 forwards; lm_head only over the B x R
    response positions, and in the update twice (logits, then their gradient into the hidden
    states; it sits outside the checkpointed layers, so nothing recomputes it). Attention's S^2
    terms and LoRA's rank-r GEMMs are left out (small at these lengths), so the bound is
    optimistic, never pessimistic.
    """
    dims = planner.ModelDims.from_dict(planner.PRESETS[cfg.shape] | cfg.config_overrides)
    itemsize = torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size()
    head = dims.vocab_size * dims.hidden_size
    embeddings = head if dims.tie_word_embeddings else 2 * head
    body = dims.params() - embeddings  # decoder layers and norms
    B, R, S = cfg.batch, cfg.response_length, cfg.prompt_length + cfg.response_length
    forward_body, forward_head = 2 * body * B * S, 2 * head * B * R
    scoring = 2 * forward_body + forward_head  # reward + values, reference
    if not uses_recorded:
        scoring += forward_body + forward_head  # old log-probs
    update = cfg.ppo_epochs * (3 * forward_body + 2 * forward_head + 3 * forward_body)
    floor = {"decode_bytes": R * (body + head) * itemsize, "scoring_flops": scoring,
             "update_flops": update}
    if copy_gbps and matmul_tflops:
        floor["generation_s"] = floor["decode_bytes"] / (copy_gbps * 1e9)
        floor["scoring_s"] = scoring / (matmul_tflops * 1e12)
        floor["update_s"] = update / (matmul_tflops * 1e12)
        floor["total_s"] = floor["generation_s"] + floor["scoring_s"] + floor["update_s"]
        floor["copy_gbps"], floor["matmul_tflops"] = copy_gbps, matmul_tflops
    return floor


def _rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 elsewhere)."""
    try:
        return proc_status_kib("VmRSS") * 1024
    except (OSError, RuntimeError):
        return 0


def _reset_peak_rss() -> bool:
    """Start a new peak-RSS measurement: Linux resets VmHWM to the current RSS when "5" is
    written to /proc/self/clear_refs. False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """The peak resident set since the last ``_reset_peak_rss`` (VmHWM), else the process's
    lifetime peak (ru_maxrss)."""
    try:
        return proc_status_kib("VmHWM") * 1024
    except (OSError, RuntimeError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _import_model_code(cfg: E2EConfig) -> None:
    """Build and drop a 2-layer, 64-wide model of the case's architecture with its LoRA roles:
    the modules that building imports (the architecture's modeling code, peft's layers, about
    0.3 GiB of Python for Qwen2) are then part of the process before the CPU case's baseline,
    as torch's are, rather than counted as the model's memory, which ``rlhf plan`` predicts."""
    tiny = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, vocab_size=256,
                num_attention_heads=4, num_key_value_heads=2)
    backbone = build_backbone(replace(cfg, config_overrides=cfg.config_overrides | tiny,
                                      lora_rank=min(cfg.lora_rank, 8)))
    del backbone
    gc.collect()


def run_case(cfg: E2EConfig, marker=None, on_row=None) -> dict:
    """Build, warm up, time ``cfg.iterations`` iterations; one result row. ``on_row(row)`` is
    called with the row as it grows (timed, then profiled, then the decode comparison), so that
    a caller cut off by a time limit keeps what was measured."""
    device = resolve_device(cfg.device, cfg.max_memory_gib)  # the trainer's max_memory cap
    if device.type == "cuda":
        # the floor's rates, measured (and cached) before the model takes the memory
        rates = copy_bandwidth_gbps(), matmul_tflops(getattr(torch, cfg.dtype))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _import_model_code(cfg)
        _reset_peak_rss()
        rss_start = _rss_bytes()
    backbone = build_backbone(cfg)
    optimizer = make_optimizer(backbone, cfg)
    engine = RolloutEngine(backbone, decode_graph=cfg.decode_graph,
                           autocast_dtype=autocast_dtype(cfg))
    prompt_ids, prompt_mask = synthetic_prompts(cfg, backbone.vocab_size, device)
    eos = 2 if cfg.stop_at_eos else None
    compiled = CompiledLayers(backbone.causal_lm) if cfg.torch_compile else None
    warmup_started = time.perf_counter()
    for _ in range(cfg.warmup):
        ppo_iteration(backbone, engine, optimizer, prompt_ids, prompt_mask, cfg,
                      StageClock(device), eos, compiled)
    warmup_seconds = time.perf_counter() - warmup_started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # as on the GPU, the peak of the timed iterations (the build's transient, e.g.
        # transformers' random init of an untied lm_head before tying, is reported apart)
        build_peak = _peak_rss_bytes() - rss_start
        _reset_peak_rss()
    clock = StageClock(device, marker, rss_base=None if device.type == "cuda" else rss_start)
    total_tokens = 0
    started = time.perf_counter()
    for _ in range(cfg.iterations):
        stats = ppo_iteration(backbone, engine, optimizer, prompt_ids, prompt_mask, cfg, clock,
                              eos, compiled)
        total_tokens += stats["response_tokens"]
    elapsed = time.perf_counter() - started
    n = cfg.iterations
    recorded = uses_recorded_logprobs(backbone, cfg)
    predicted = planner.plan(cfg.shape, batch=cfg.batch, prompt_length=cfg.prompt_length,
                             response_length=cfg.response_length, lora_rank=cfg.lora_rank,
                             dtype=cfg.dtype, gradient_checkpointing=cfg.gradient_checkpointing,
                             minibatch=cfg.minibatch, forward_chunk=cfg.forward_chunk,
                             device=device.type, config_overrides=cfg.config_overrides,
                             autocast=autocast_dtype(cfg) is not None)
    row = {
        "op": "e2e_ppo", "case": cfg.shape,
        "impl": f"rlhf shared-LoRA r={cfg.lora_rank}"
                + (" + torch_compile" if cfg.torch_compile else ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "s_per_batch": elapsed / n,
        "response_tok_per_s": total_tokens / elapsed,
        "generation_s": clock.seconds["rollout"] / n,
        "scoring_s": clock.seconds["scoring"] / n,
        "update_s": clock.seconds["update"] / n,
        "predicted_peak_gib": predicted["peak_bytes"] / 2**30,
        "old_logprobs": "recorded" if recorded else "forward",
        "warmup_s": warmup_seconds,  # the untimed iterations (with torch_compile: compiling)
        "compile_failed": compiled.failed if compiled is not None else None,
        "config": asdict(cfg),
        "last_stats": stats,
        "plan": {k: v for k, v in predicted.items() if k != "config"},
    }
    if device.type == "cuda":
        floor = iteration_floor(cfg, recorded, *rates)
        row["floor"] = floor
        row["floor_s"] = floor["total_s"]
        row["pct_of_floor"] = 100 * floor["total_s"] / row["s_per_batch"]
        peak = max(clock.peak_bytes.values())
        row["peak_gib"] = peak / 2**30
        row["stage_peak_gib"] = {k: v / 2**30 for k, v in clock.peak_bytes.items()}
        row["measured_over_predicted"] = {
            k: clock.peak_bytes[k] / predicted["stages"][k]["total"] for k in clock.peak_bytes}
        row["max_memory_gib"] = cfg.max_memory_gib
    else:
        # the timed iterations' peak resident set above the process's size before the model
        # was built (weights, activations, optimizer state, and also allocator slack and BLAS
        # buffers); where the peak cannot be reset it is the process's lifetime peak
        peak = max(_peak_rss_bytes() - rss_start, *clock.peak_bytes.values())
        row["peak_gib"] = peak / 2**30
        row["build_peak_gib"] = build_peak / 2**30
        if clock.peak_bytes:  # per stage, where the peak could be reset
            row["stage_peak_gib"] = {k: v / 2**30 for k, v in clock.peak_bytes.items()}
            row["measured_over_predicted"] = {
                k: clock.peak_bytes[k] / predicted["stages"][k]["total"]
                for k in clock.peak_bytes}
        row["cpu_allocator"] = cpu_allocator_setting()  # resolve_device set it up
        row["memory"] = ("peak RSS of the timed iterations above the process once the model's "
                         "code is imported, before the model is built")
        row["kernels_backend"] = os.environ.get("RLHF_KERNELS_BACKEND", "auto")
    report = on_row or (lambda _row: None)
    report(row)
    if cfg.profile_stages:
        row["device_busy"] = device_busy(backbone, engine, optimizer, prompt_ids, prompt_mask,
                                         cfg, eos, {k: v / n for k, v in clock.seconds.items()},
                                         compiled)
        report(row)
    if cfg.decode_compare:  # last: compiling a decode step can take long on a bare machine
        row["decode_compare"] = decode_compare(backbone, prompt_ids, prompt_mask, cfg, eos,
                                               row["generation_s"])
        report(row)
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
           "response_tok_per_s", "generation_s", "scoring_s", "update_s", "floor_s",
           "pct_of_floor")
PEER_COLUMNS = ("case", "impl", "peak_gib", "s_per_batch", "response_tok_per_s",
                "memory_ratio", "speed_ratio")

# The peer script's shape names (TRL's PPOTrainer runs Qwen2.5 shapes only)
PEER_SHAPES = {"qwen2.5-0.5b": "0.5b", "qwen2.5-1.5b": "1.5b", "qwen2.5-7b": "7b"}


def run_peer(script: str, cfg: E2EConfig, peft: bool = True, steps: int = 3,
             timeout_s: float | None = None, python: str | None = None,
             extra_args: tuple[str, ...] = ()) -> dict:
    """Run a peer PPO script (``benchmarks/peers/trl_ppo_peer.py``: TRL's PPOTrainer) in a
    subprocess at ``cfg``'s shape and sizes; its ``RESULT {json}`` line as a row. The peer's
    usage is ``script SHAPE PEFT BATCH PROMPT RESPONSE STEPS``, run by ``python`` (default: this
    interpreter; another one when TRL 1.12 lives in its own environment), with ``extra_args``
    after the six (``--enable-gc`` for benchmarks/peers/trl_ppo_peer.py). A failure becomes a
    row with ``error``."""
    import json
    import subprocess

    impl = " ".join(["peer", Path(script).name, "LoRA" if peft else "full", *extra_args])
    row = {"op": "e2e_ppo", "case": cfg.shape, "impl": impl}
    if cfg.shape not in PEER_SHAPES:
        return {**row, "error": f"the peer runs {sorted(PEER_SHAPES)} only"}
    command = [python or sys.executable, script, PEER_SHAPES[cfg.shape], "1" if peft else "0",
               str(cfg.batch), str(cfg.prompt_length), str(cfg.response_length), str(steps),
               *extra_args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {timeout_s} s", "command": command}
    results = [line[len("RESULT "):] for line in done.stdout.splitlines()
               if line.startswith("RESULT ")]
    if done.returncode != 0 or not results:
        tail = (done.stdout + done.stderr)[-2000:]
        return {**row, "error": f"exit code {done.returncode}, no RESULT line", "output": tail,
                "command": command}
    peer = json.loads(results[-1])
    row.update(peer=peer, peak_gib=peer.get("peak_GiB"), s_per_batch=peer.get("sec_per_batch"),
               response_tok_per_s=peer.get("response_tokens_per_s"))
    if peer.get("oom"):
        row["error"] = "out of memory"
    return row


def compare(ours: dict, peer: dict) -> dict:
    """The peer row with our advantage: memory_ratio = peer peak / our peak, speed_ratio = our
    tokens/s / the peer's (> 1: we are leaner / faster)."""
    out = dict(peer)
    if ours.get("peak_gib") and peer.get("peak_gib"):
        out["memory_ratio"] = peer["peak_gib"] / ours["peak_gib"]
    if ours.get("response_tok_per_s") and peer.get("response_tok_per_s"):
        out["speed_ratio"] = ours["response_tok_per_s"] / peer["response_tok_per_s"]
    return out


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
    parser.add_argument("--old-logprobs", default="auto", choices=OLD_LOGPROBS,
                        help="auto: as rlhf ppo (a policy forward in bf16); recorded: the "
                             "engine's values (skips that forward)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--max-memory", type=float, default=None, metavar="GiB",
                        help="cap with torch.cuda.set_per_process_memory_fraction")
    parser.add_argument("--peer-script", metavar="PATH",
                        help="also run this peer (benchmarks/peers/trl_ppo_peer.py: TRL's "
                             "PPOTrainer) at each Qwen2.5 shape, same sizes, in a "
                             "subprocess, and report memory_ratio / speed_ratio against it")
    parser.add_argument("--peer-full", action="store_true",
                        help="run the peer in full fine-tuning mode too (4 models)")
    parser.add_argument("--peer-steps", type=int, default=3)
    parser.add_argument("--peer-timeout", type=float, default=None, metavar="s")
    parser.add_argument("--peer-arg", action="append", default=[], metavar="ARG",
                        help="passed to the peer after its six arguments (repeatable), e.g. "
                             "--peer-arg=--enable-gc for benchmarks/peers/trl_ppo_peer.py")
    parser.add_argument("--peer-python", metavar="PATH",
                        help="the interpreter that has the peer's packages (default: this one)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: a real shape on the CPU (one --shape; memory is the peak "
                             "RSS; our ops run the native CPU kernels, or what "
                             "RLHF_KERNELS_BACKEND says); says nothing of GPU speed")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="the model's dtype (float32 on CPUs whose bf16 GEMM is a slow "
                             "fallback: no AVX512-BF16 / AMX)")
    parser.add_argument("--profile-stages", action="store_true",
                        help="one more (untimed) iteration under torch.profiler: per stage the "
                             "seconds the device was busy over the stage's time, and the "
                             "decode step's GPU time (graph replays) over the measured time "
                             "per token; says whether host time is left to remove")
    parser.add_argument("--decode-compare", action="append", default=[],
                        choices=DECODE_GRAPH_MODES, metavar="MODE",
                        help="after the timed iterations, time the rollout alone with this "
                             "decode mode too (repeatable; e.g. compile: torch.compile's step)")
    parser.add_argument("--autocast", default="auto", choices=AUTOCAST,
                        help="auto: bf16 autocast on a GPU with bf16 weights, as rlhf ppo runs "
                             "(rollout, scoring, update); off: none")
    parser.add_argument("--results-dir", metavar="DIR", default=None,
                        help="where the JSON goes (default: benchmarks/results)")
    parser.add_argument("--torch-compile", action="store_true",
                        help="the update with the decoder layers compiled (rlhf ppo "
                             "torch_compile=true); the warm-up iteration compiles")
    parser.add_argument("--compare-torch-compile", action="store_true",
                        help="after each shape's case (and its peer), the same case again with "
                             "--torch-compile, as a row of its own (no profile, no decode "
                             "comparison)")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, no files")
    args = parser.parse_args(argv)
    if args.compare_torch_compile and args.torch_compile:  # (before anything is set up)
        parser.error("--compare-torch-compile runs each case without, then with "
                     "--torch-compile; pass one of them")
    if args.smoke:
        rows = run(smoke=True)
        print_table(rows, COLUMNS, smoke=True)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("No CUDA device: this benchmark measures GPU memory and speed. Use --smoke to "
              "check the script on the CPU, or --device cpu for a real shape on the CPU.",
              file=sys.stderr)
        return 2
    if args.device == "cpu":
        if len(args.shape or []) > 1:
            parser.error("--device cpu measures the process's peak RSS: one --shape per run")
        if args.max_memory is not None:
            parser.error("--max-memory caps CUDA memory; it has no meaning with --device cpu")
        # the native CPU kernels of our ops (the PyTorch reference where they cannot be built),
        # not the Triton interpreter (minutes per call at a 152K vocabulary), which
        # benchmarks/__init__ turned on for the CPU
        from rlhf_kernels import _native

        if "RLHF_KERNELS_BACKEND" not in os.environ:
            os.environ["RLHF_KERNELS_BACKEND"] = "native" if _native.available() else "reference"
            if not _native.available():
                print(f"the native CPU kernels are not available ({_native.failure_reason()}): "
                      f"our ops run the PyTorch reference", file=sys.stderr)
    rows = []
    cases = []
    for shape in args.shape or ["qwen2.5-1.5b"]:
        cfg = E2EConfig(
            shape=shape, batch=args.batch, prompt_length=args.prompt_length,
            response_length=args.response_length, lora_rank=args.lora_rank,
            ppo_epochs=args.ppo_epochs, minibatch=args.minibatch or args.batch,
            forward_chunk=args.forward_chunk or args.batch,
            gradient_checkpointing=not args.no_gradient_checkpointing,
            decode_graph=args.decode_graph, stop_at_eos=args.stop_at_eos,
            old_logprobs=args.old_logprobs, warmup=args.warmup,
            iterations=args.iterations, max_memory_gib=args.max_memory, device=args.device,
            dtype=args.dtype, profile_stages=args.profile_stages, autocast=args.autocast,
            decode_compare=tuple(args.decode_compare), torch_compile=args.torch_compile)
        cases.append((cfg, True))
        if args.compare_torch_compile:
            cases.append((replace(cfg, torch_compile=True, profile_stages=False,
                                  decode_compare=()), False))
    for cfg, with_peer in cases:
        shape = cfg.shape
        try:
            # saved as it grows: a run cut off by the caller's time limit keeps our figures
            ours = run_case(cfg, on_row=lambda row, done=list(rows): save_results(
                "e2e_ppo", [*done, row], args.results_dir))
        except torch.OutOfMemoryError as error:
            ours = {"op": "e2e_ppo", "case": shape, "error": f"out of memory: {error}",
                    "config": asdict(cfg)}
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        rows.append(ours)
        # saved after every row: a run cut off by the caller's time limit (gpu_check's parts)
        # while a peer runs keeps our figures
        save_results("e2e_ppo", rows, args.results_dir)
        print_table([ours], COLUMNS)
        if args.peer_script and with_peer:
            for peft in (True, False) if args.peer_full else (True,):
                peer = compare(ours, run_peer(args.peer_script, cfg, peft, args.peer_steps,
                                              args.peer_timeout, args.peer_python,
                                              tuple(args.peer_arg)))
                rows.append(peer)
                save_results("e2e_ppo", rows, args.results_dir)
                print_table([peer], PEER_COLUMNS)
    path = save_results("e2e_ppo", rows, args.results_dir)
    print(f"wrote {path}")
    peer_rows = [r for r in rows if r.get("impl", "").startswith("peer")]
    print_table([r for r in rows if r not in peer_rows], COLUMNS)
    if peer_rows:
        print_table(peer_rows, PEER_COLUMNS)
    return 0


if __name__ == "__main__":
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(main))
