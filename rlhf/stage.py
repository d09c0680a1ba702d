"""Plumbing shared by the training stages (``sft``, ``reward``, ``ppo``) and the pipeline.

Settings validation (``check_common_settings``, ``check_settings``, ``check_device``,
``check_max_memory``, ``check_keep_last``), device resolution with the optional CUDA memory cap
(``resolve_device``; on the CPU it also bounds the C allocator's slack,
``bound_cpu_allocator_slack``), the CPU-thread limit around a stage's ``train``
(``limits_cpu_threads``), the warm-up + cosine learning-rate schedule and the non-finite loss
guard's error.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch

__all__ = [
    "CPU_BLOCK_CACHE_MIB",
    "CPU_MALLOC_CHOICES",
    "CPU_MMAP_THRESHOLD",
    "DEVICE_CHOICES",
    "MAX_SKIPPED_STEPS",
    "autocast_dtype_for",
    "bound_cpu_allocator_slack",
    "check_common_settings",
    "check_device",
    "check_keep_last",
    "check_max_memory",
    "check_positions",
    "check_seed",
    "check_settings",
    "check_vocabulary",
    "cpu_allocator_setting",
    "cpu_malloc_setting",
    "limited_cpu_threads",
    "learned_positions",
    "limits_cpu_threads",
    "nonfinite_error",
    "nonfinite_skipped",
    "resolve_device",
    "warmup_cosine_schedule",
]


MAX_SKIPPED_STEPS = 10  # the stages' default max_skipped_steps


def check_common_settings(nonfinite: str, grad_accum_steps: int, batch_size: int,
                          steps: int, *, batch_name: str = "batch_size",
                          steps_name: str = "max_steps",
                          max_skipped_steps: int = MAX_SKIPPED_STEPS) -> None:
    """The settings every stage has: the non-finite policy and the batch/step counts.
    ``batch_name``/``steps_name``: the stage's own names of the two counts (the RL stage's
    are minibatch_size and num_iterations), so that an error names the setting the user gave.
    A ``max_skipped_steps`` given with nonfinite='error' is said (it is nonfinite=skip's cap:
    the run stops at the first non-finite step, and the setting was ignored without a word);
    a warning, not an error, as configs made from one template often switch nonfinite alone."""
    if nonfinite not in ("error", "skip"):
        raise ValueError(f"nonfinite must be 'error' or 'skip', got {nonfinite!r}")
    if nonfinite == "error" and max_skipped_steps != MAX_SKIPPED_STEPS:
        warnings.warn(f"max_skipped_steps={max_skipped_steps} has no effect with "
                      f"nonfinite='error' (the run stops at the first non-finite step; "
                      f"max_skipped_steps caps the steps nonfinite=skip drops); set "
                      f"nonfinite=skip too, or remove max_skipped_steps", stacklevel=2)
    for name, value in (("grad_accum_steps", grad_accum_steps), (batch_name, batch_size),
                        (steps_name, steps)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


SEED_LIMIT = 2**32


def check_seed(seed: int) -> None:
    """A run's ``seed`` is a non-negative 32-bit integer: the stages derive generator seeds from
    it by multiplying (``seed * 1_000_003 + iteration`` in RL), and a seed near 2**63 overflowed
    torch's 64-bit seeds with an 'Overflow when unpacking long long' after the setup."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed={seed!r} is out of range: a seed must be an integer in "
                         f"[0, 2**32) (e.g. 0, 1, 1234)")


def check_vocabulary(ids: torch.Tensor, model, what: str) -> None:
    """Refuse token ids past ``model``'s input embeddings (a tokenizer of another model, e.g.
    ``tokenizer=`` pointing elsewhere): the embedding lookup would fail deep in the forward
    with an IndexError (a device-side assert on a GPU). ``what``: the data, in words."""
    rows = model.get_input_embeddings().num_embeddings
    largest = int(ids.max()) if ids.numel() else -1
    if largest >= rows:
        raise ValueError(f"{what} holds token id {largest}, but the model's embedding has "
                         f"{rows} rows (ids 0 .. {rows - 1}): the tokenizer does not belong to "
                         f"this model; use the model's own tokenizer (leave tokenizer= out) or "
                         f"the model that tokenizer was made for")


def learned_positions(model) -> int | None:
    """How many positions ``model`` has when they are learned absolute embeddings (GPT-2's
    ``wpe``, OPT's ``embed_positions``), which a longer sequence indexes past; None for rotary
    or other relative positions, which extend past ``max_position_embeddings`` without error."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or \
        getattr(config, "n_positions", None)
    if not isinstance(positions, int):
        return None
    inputs = model.get_input_embeddings()
    for module in model.modules():
        if (isinstance(module, torch.nn.Embedding) and module is not inputs
                and module.num_embeddings in (positions, positions + 2)):  # OPT: offset 2
            return positions
    return None


def check_positions(model, length: int, what: str, fix: str) -> None:
    """Refuse sequences of ``length`` tokens on a model with fewer learned positions: the
    position lookup would fail deep in the forward with an IndexError. ``what``: the sequences,
    in words; ``fix``: what to do, ``{positions}`` in it replaced by the model's count."""
    positions = learned_positions(model)
    if positions is not None and length > positions:
        raise ValueError(f"{what} {length} tokens, more than the model's {positions} positions "
                         f"(learned position embeddings, max_position_embeddings={positions}); "
                         f"{fix.format(positions=positions)}")


def check_max_memory(max_memory: float | None) -> None:
    if max_memory is not None and not max_memory > 0:
        raise ValueError(f"max_memory must be > 0 GiB or None (no cap), got {max_memory}")


def check_keep_last(keep_last: int | None) -> None:
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (the newest checkpoint is what resume and the "
                         f"summary need) or None to keep every checkpoint, got {keep_last}")


def check_settings(cfg, *, positive: Sequence[str] = (), non_negative: Sequence[str] = (),
                   fractions: Sequence[str] = (), counts: Sequence[str] = (),
                   zero_or_more: Sequence[str] = ()) -> None:
    """One clear ValueError for the first numeric setting of ``cfg`` out of its range.

    positive: finite floats > 0 (learning rates, clips); non_negative: finite floats >= 0
    (coefficients, weight decay); fractions: finite floats in [0, 1]; counts: ints >= 1 (sizes,
    intervals); zero_or_more: ints >= 0 (warm-up steps, "0 = off" intervals). A field whose
    value is None is not checked (None means "derived" or "off" where a field allows it).
    """
    name = type(cfg).__name__
    rules = [(positive, lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
             (non_negative, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
             (fractions, lambda v: math.isfinite(v) and 0 <= v <= 1, "a number in [0, 1]"),
             (counts, lambda v: v >= 1, "an integer >= 1"),
             (zero_or_more, lambda v: v >= 0, "an integer >= 0")]
    for fields, ok, expected in rules:
        for field in fields:
            value = getattr(cfg, field)
            if value is None or ok(value):
                continue
            hint = _SETTING_HINTS.get(field, "")
            raise ValueError(f"{field}={value!r} is out of range: {name}.{field} must be "
                             f"{expected}{hint}")
    threads = getattr(cfg, "cpu_threads", None)
    if threads is not None and threads > MAX_CPU_THREADS:
        # torch.set_num_threads would start that many threads (or overflow: 1e15)
        raise ValueError(f"cpu_threads={threads!r} is out of range: {name}.cpu_threads must be "
                         f"at most {MAX_CPU_THREADS} (this machine has {os.cpu_count()} CPU "
                         f"threads; null keeps torch's own count)")


_SETTING_HINTS = {
    "lr": " (a learning rate such as 1e-5 for full weights or 1e-4 for LoRA)",
    "critic_lr": " (the critic's learning rate, e.g. the policy's lr)",
    "kl_coef": " (0 turns the KL penalty off; 0.01 to 0.2 is usual)",
    "entropy_coef": " (0 turns the entropy bonus off)",
    "grad_clip": " (the gradient norm it clips to; 1.0 is usual)",
    "temperature": " (1.0 samples the policy as it is; a small value such as 1e-4 is near-greedy)",
    "kl_target": " (nats per sequence, e.g. 6; null keeps kl_coef fixed)",
}

# more threads than any machine has: torch.set_num_threads starts them all (1e6 took minutes)
MAX_CPU_THREADS = 4096

DEVICE_CHOICES = "auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N"


def check_device(device: str) -> None:
    """The form of a ``device`` setting: auto, cpu, cuda or cuda:N (whether a GPU is there is
    ``resolve_device``'s business, at run time)."""
    if isinstance(device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        return
    hint = ""
    if isinstance(device, str) and device.strip().lower().startswith(("gpu", "nvidia", "cuda")):
        hint = "; for an NVIDIA GPU write cuda (or cuda:N)"
    raise ValueError(f"device={device!r} is not a device this trainer runs on; use "
                     f"{DEVICE_CHOICES}{hint}")


CPU_MMAP_THRESHOLD = 128 * 1024
CPU_BLOCK_CACHE_MIB = 128
CPU_MALLOC_CHOICES = ("cache", "threshold", "default")


def cpu_malloc_setting() -> tuple[str, float]:
    """(``RLHF_CPU_MALLOC``, ``RLHF_CPU_CACHE_MIB``) from the environment, checked."""
    choice = os.environ.get("RLHF_CPU_MALLOC", "cache")
    if choice not in CPU_MALLOC_CHOICES:
        raise ValueError(f"RLHF_CPU_MALLOC={choice!r}: expected one of {CPU_MALLOC_CHOICES} "
                         f"(cache: the native kernels' block cache, the default; threshold: "
                         f"glibc's mmap threshold fixed at 128 KiB; default: glibc's own)")
    text = os.environ.get("RLHF_CPU_CACHE_MIB", str(CPU_BLOCK_CACHE_MIB))
    try:
        mib = float(text)
    except ValueError:
        mib = -1.0
    if not 0 <= mib < 2**40:  # NaN fails too
        raise ValueError(f"RLHF_CPU_CACHE_MIB={text!r}: expected the block cache's size in MiB, "
                         f"a number >= 0 (default {CPU_BLOCK_CACHE_MIB})")
    return choice, mib


@functools.cache
def bound_cpu_allocator_slack() -> str:
    """Keep this process's resident set near its live tensors on the CPU; says what it did
    ("" when nothing).

    CPU tensors come from glibc's malloc. By default glibc raises its mmap threshold to the size
    of every mmap'd block freed (up to 32 MiB), so after the first frees a forward/backward's
    activations come from the heap, which fragments and never shrinks. Measured at the
    Qwen2.5-0.5B shape (fp32, batch 4, 64 tokens, native kernels): a PPO iteration's resident
    set peaked ~1 GiB above its live tensors, 1.5x ``rlhf plan``. Two remedies,
    ``RLHF_CPU_MALLOC`` picks:

    - ``cache`` (the default where the native kernels are built): their block cache
      (csrc/cpu/allocator.cpp) becomes c10's CPU allocator. Blocks of 128 KiB or more get their
      own mappings and freed ones are kept for reuse up to ``RLHF_CPU_CACHE_MIB`` (128) MiB, so
      the resident set is the live tensors plus at most that, and a training loop's repeated
      sizes are not page-faulted afresh.
    - ``threshold`` (the fallback): glibc's mmap threshold fixed at 128 KiB with ``mallopt``,
      the same memory bound without reuse: every large block is mapped afresh (34% slower at
      that shape on the development VM, whose page faults are slow).
    - ``default``: glibc's own behaviour.

    Left alone when ``MALLOC_MMAP_THRESHOLD_`` is set (glibc applied the user's value).
    """
    choice, mib = cpu_malloc_setting()
    if choice == "default" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return ""
    if choice == "cache":
        from rlhf_kernels import _native

        if _native.available():
            _native.ops().cpu_block_cache(int(mib * 2**20))
            return f"block cache ({mib:g} MiB)"
        warnings.warn(f"the native block cache is not available ({_native.failure_reason()}): "
                      f"glibc's mmap threshold is fixed at 128 KiB instead (the same bound on "
                      f"memory, slower)", stacklevel=2)
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl's mallopt does nothing)
    except (OSError, AttributeError):
        return ""
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_mmap_threshold = -3  # malloc.h
    if mallopt(m_mmap_threshold, CPU_MMAP_THRESHOLD) != 1:
        return ""
    return "mmap threshold 128 KiB"


def cpu_allocator_setting() -> str | None:
    """The CPU allocator this process runs with, in words, once ``bound_cpu_allocator_slack``
    has run (None before: no CPU device was resolved)."""
    if bound_cpu_allocator_slack.cache_info().currsize == 0:
        return None
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}"
    return bound_cpu_allocator_slack() or "the C library's default"


def resolve_device(device: str, max_memory: float | None = None) -> torch.device:
    """"auto" -> cuda when available else cpu; "cpu", "cuda", "cuda:N" as given.

    A device that is not there (cuda on a CPU-only build or machine, cuda:3 with two GPUs) is a
    ValueError that says so.

    On the CPU, ``bound_cpu_allocator_slack`` runs once (the resident set stays near the live
    tensors, as ``rlhf plan`` counts them).

    ``max_memory`` (GiB) caps this process's CUDA memory with
    ``torch.cuda.set_per_process_memory_fraction``, which emulates a smaller card: allocations
    beyond it raise ``torch.OutOfMemoryError`` as they would there. Ignored (with a warning)
    on the CPU, and when it exceeds the card.
    """
    check_max_memory(max_memory)
    check_device(device)
    resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" \
        else torch.device(device)
    from rlhf import distributed

    resolved = distributed.local_device(resolved)  # torchrun: "cuda" is this rank's GPU
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            reason = (f"this PyTorch build ({torch.__version__}) has no CUDA support"
                      if torch.version.cuda is None else
                      f"no CUDA GPU is visible (CUDA_VISIBLE_DEVICES="
                      f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r})")
            raise ValueError(f"device={device!r} but {reason}; use device=cpu, or device=auto "
                             f"(the GPU when there is one)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but only {torch.cuda.device_count()} CUDA "
                             f"GPU(s) are visible (cuda:0 .. cuda:"
                             f"{torch.cuda.device_count() - 1})")
    if resolved.type == "cpu":
        bound_cpu_allocator_slack()
    if max_memory is not None:
        if resolved.type != "cuda":
            warnings.warn(f"max_memory={max_memory} GiB caps CUDA memory; ignored on "
                          f"{resolved.type}", stacklevel=2)
        else:
            total = torch.cuda.get_device_properties(resolved).total_memory
            if max_memory * 2**30 >= total:
                warnings.warn(f"max_memory={max_memory} GiB is not below the card's "
                              f"{total / 2**30:.1f} GiB: no cap", stacklevel=2)
            # the cap takes a device index: "cuda" (no index) means the current device
            index = resolved.index if resolved.index is not None else torch.cuda.current_device()
            torch.cuda.set_per_process_memory_fraction(min(1.0, max_memory * 2**30 / total),
                                                       index)
    return resolved


def autocast_dtype_for(device: torch.device, bf16: bool) -> torch.dtype | None:
    """The dtype a stage's forwards autocast to on ``device``: bf16 on a CUDA device when the
    stage's ``bf16`` setting is on; None (no autocast, fp32 compute) otherwise, the CPU always.

    One rule for every stage's training and for what the pipeline samples and evaluates with
    their models (preference pairs, held-out samples, the reward model's held-out accuracy):
    on a GPU those ran without autocast while the stages trained under it, in other numerics
    (and through PEFT's fp32-adapter path on a bf16 base)."""
    return torch.bfloat16 if (device.type == "cuda" and bf16) else None


def nonfinite_error(stage: str, at: str, numbers: dict[str, float], lrs: dict[str, float],
                    skipped: int, cfg) -> FloatingPointError:
    """The non-finite loss guard's one-line error: where, which numbers, what to do.

    at: "step 12" / "iteration 3" (1-based, as in metrics.jsonl); numbers: the loss(es) and
    gradient norm(s) of that step; lrs: the configured learning rate(s) by setting name.
    """
    bad = [name for name, value in numbers.items() if not math.isfinite(value)]
    shown = ", ".join(f"{name} {value:.4g}" for name, value in numbers.items())
    lower = " and ".join(f"{name}={value:g}" for name, value in lrs.items())
    if cfg.nonfinite == "skip":
        what = (f"a non-finite {' and '.join(bad)} at {at} ({shown}) after {skipped} skipped "
                f"steps, more than max_skipped_steps={cfg.max_skipped_steps}")
        # nonfinite=skip is already set: suggesting it again was no way out
        instead = f"raise max_skipped_steps (it is {cfg.max_skipped_steps})"
    else:
        what = f"non-finite {' and '.join(bad)} at {at} ({shown})"
        instead = "set nonfinite=skip to drop such steps"
    return FloatingPointError(f"[{stage}] the run diverged: {what}; lower the learning rate "
                              f"({lower}; try 10x lower) and start again, or {instead}")


def nonfinite_skipped(stage: str, at: str, numbers: dict[str, float], skipped: int,
                      cfg) -> str:
    """The warning of a step that nonfinite=skip dropped: which step (1-based, as in
    metrics.jsonl and the error), what was not finite, how many of max_skipped_steps are used."""
    bad = [name for name, value in numbers.items() if not math.isfinite(value)]
    shown = ", ".join(f"{name} {value:.4g}" for name, value in numbers.items())
    return (f"[{stage}] skipped {at}: non-finite {' and '.join(bad)} ({shown}); {skipped} "
            f"skipped so far, at most max_skipped_steps={cfg.max_skipped_steps}")


def step_or_skip(optimizer, stage: str, step: int, loss: float, grad_norm: float,
                 lr: float, skipped: int, cfg) -> int:
    """The optimizer step after a finished backward, or, where the loss or the gradient norm is
    not finite, its skip (nonfinite=skip, within max_skipped_steps: warned) or the run's end
    (``nonfinite_error``); the gradients are cleared either way. ``step``: the 0-based step
    taken now. Returns the skipped-step count. The SFT and reward-model stages' one rule (the
    RL stage sums micro-batches and judges the worst of them)."""
    numbers = {"loss": loss, "grad norm": grad_norm}
    if all(math.isfinite(value) for value in numbers.values()):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return skipped
    optimizer.zero_grad(set_to_none=True)
    at = f"step {step + 1}"
    if cfg.nonfinite == "error" or skipped >= cfg.max_skipped_steps:
        raise nonfinite_error(stage, at, numbers, {"lr": lr}, skipped, cfg)
    skipped += 1
    warnings.warn(nonfinite_skipped(stage, at, numbers, skipped, cfg), stacklevel=2)
    return skipped


@contextlib.contextmanager
def limited_cpu_threads(device: str, threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block when ``device`` is (or "auto" resolves
    to) the CPU; the previous count is restored after it. ``threads=None``: no change."""
    on_cpu = resolve_device(device).type == "cpu"  # also: a missing GPU stops the run here
    if threads is None or not on_cpu:
        yield
        return
    available = os.cpu_count()
    if available is not None and threads > available:
        warnings.warn(f"cpu_threads={threads} is more than this machine's {available} CPU "
                      f"threads: the threads take turns on the cores, which is slower than "
                      f"cpu_threads={available}", stacklevel=3)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def limits_cpu_threads(train_fn: Callable) -> Callable:
    """Decorator of a stage's ``train(cfg, ...)``: runs it under
    ``limited_cpu_threads(cfg.device, cfg.cpu_threads)``."""

    @functools.wraps(train_fn)
    def train(cfg, *args, **kwargs):
        with limited_cpu_threads(cfg.device, cfg.cpu_threads):
            return train_fn(cfg, *args, **kwargs)

    return train


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to ``min_ratio`` x lr.
    A warm-up longer than the run (``warmup_steps`` > ``total_steps``) is said: the learning
    rate would rise for the whole run and never reach the lr asked for."""
    if warmup_steps > total_steps:
        warnings.warn(f"warmup_steps={warmup_steps} is more than the run's {total_steps} optimizer "
                      f"steps: the learning rate rises for the whole run and peaks at "
                      f"{total_steps / warmup_steps:.0%} of lr; lower warmup_steps to at most "
                      f"{total_steps}", stacklevel=2)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
