"""Data parallelism for every stage: torchrun launches, ``torch.distributed`` synchronises.

``torchrun --nproc-per-node N -m rlhf <stage> ...`` starts N copies of the stage; each calls
``init_from_env`` (the CLI does) and from then on the stages' small hooks below make the N
processes compute what one process computes on the same global batches (docs/distributed.md):

- **Data.** The order of global batches stays a pure function of (seed, epoch); each rank takes
  a contiguous share of every global batch (``shard``). RL ranks sample their share of each
  iteration's prompts (``shard(..., even=True)``) with their rows' part of the global batch's
  random draws (``global_sampling_rows``: the responses one process samples), score it, and
  then gather the scored rollout (``gather_rollout``) so that every rank holds the same global
  rollout and cuts the same global minibatches as one process would.
- **Exact normalisation.** Every loss is a sum over the global batch divided by a global count:
  SFT's response tokens of the step (counted from the global indices on every rank), the reward
  model's pairs (``weighted``), the RL losses' reduction denominators (``rl_shard``: the counts
  of the global minibatch, which every rank holds; or the step-wide ``normalizer=``). A rank's
  loss is its part of that sum, so the gradients are *summed* over ranks, not averaged.
- **Gradient sync.** ``sum_gradients``: one coalesced all-reduce of the trainable gradients per
  optimizer step (buckets of ``BUCKET_ELEMENTS``; a LoRA run has one), the step's scalar
  metrics riding in the same buffer. Not DDP: the shared backbone switches LoRA roles within a
  step (policy backward, then critic backward, reference and reward forwards without grad), and
  DDP's reducer assumes one forward/backward of one parameter set per step; with gradient
  accumulation it would also sync every micro-batch unless wrapped in ``no_sync``, and it
  averages where the global normalisation needs a sum. ``COLLECTIVES`` counts every collective
  this module issues (tests and docs/distributed.md quote it).
- **Metrics** are reduced across ranks and logged by rank 0 (``MetricsLogger`` writes nothing
  on other ranks). **Checkpoints** are written by rank 0 alone (``rlhf.checkpoint``) and hold
  the full (replicated) trainable state, so a run resumes at any world size; rank 0 reads the
  checkpoint and broadcasts it (``broadcast_from_main``), so other nodes need no shared disk.
- **Strategy.** ``ddp`` replicates the model. ``fsdp2`` (``prepare``) applies
  ``torch.distributed.fsdp.fully_shard`` to every decoder layer with the adapters and heads as
  ``ignored_params``: the frozen base weights of the layers are sharded and all-gathered layer
  by layer, the small trainable part stays replicated and goes through ``sum_gradients``, and
  embeddings / final norm / lm_head stay whole so the fused lm_head kernels read a plain
  weight. ``auto`` picks fsdp2 when the base weights take more than ``FSDP2_AUTO_FRACTION`` of
  a GPU's memory.
- **Failures.** A collective that fails (a rank died, the network dropped) or times out
  (``RLHF_DIST_TIMEOUT`` seconds, default 1800) raises ``RankFailure`` with what to do; the
  checkpoints written so far are complete (atomic) and resume at any world size.
- **Stopping together.** SIGTERM (torchrun passes on the one it gets: ``kill``, a scheduler's
  preemption) and SIGHUP do not stop a rank where it is: ``init_from_env`` makes them set a
  flag (``install_stop_handlers``), which rides in the collectives every rank reaches anyway
  (``sum_gradients``: each optimizer step; ``gather_rollout``: each RL iteration;
  ``check_stop``: the pipeline between its stages). Once any rank has the flag, every rank
  raises the CLI's ``Terminated`` at that same collective, so the stages' interrupt path runs
  on all of them at the same step: rank 0 writes the checkpoint of the last whole step (no
  collective needed), and every rank exits with 128 + the signal, none left waiting for
  another. (Ctrl-C stays immediate: the terminal's SIGINT reaches every rank at once.)

Without a process group (one process) every function here returns its input unchanged, so a
single-process run computes bit for bit what it computed before this module existed.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

__all__ = ["BUCKET_ELEMENTS", "COLLECTIVES", "STRATEGIES", "RankFailure", "Shares", "all_done",
           "barrier", "broadcast_from_main", "check_split", "check_stop", "exponential_like",
           "full_tensors", "full_weights", "gather_rollout", "gather_rows", "global_mean",
           "global_sampling_rows", "group_advantages", "init_from_env", "install_stop_handlers",
           "is_distributed", "is_main", "local_device", "masked_whiten", "min_count", "prepare",
           "prepare_engine", "rank", "reduce_stats", "replicated_sft", "rl_shard", "scaled",
           "set_strategy", "shard", "shutdown", "stop_requested", "strategy", "sum_counts",
           "sum_gradients", "weighted", "world_size"]

STRATEGIES = ("auto", "ddp", "fsdp2")
BUCKET_ELEMENTS = 2**25  # elements per all-reduce bucket (128 MiB of fp32), DDP's order of size
FSDP2_AUTO_FRACTION = 0.4  # auto: fsdp2 when the base weights exceed this share of the GPU
# every collective this module issued, by kind; "gradients": the all-reduces of sum_gradients
COLLECTIVES = {"all_reduce": 0, "all_gather": 0, "broadcast": 0, "barrier": 0, "gradients": 0}
_STATE: dict[str, Any] = {"strategy": None, "resolved": None, "gpu": None}


class RankFailure(RuntimeError):
    """A collective with the other ranks failed or timed out: a rank died or hangs."""


# ----------------------------------------------------------------------------------------------
# the process group
# ----------------------------------------------------------------------------------------------
def is_distributed() -> bool:
    """Whether this process is one of several ranks (a process group of size > 1)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files and logs."""
    return rank() == 0


def _timeout() -> datetime.timedelta:
    raw = os.environ.get("RLHF_DIST_TIMEOUT", "1800")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"RLHF_DIST_TIMEOUT={raw!r}: expected a number of seconds > 0 (how "
                         f"long a rank waits for the others before the run stops)")
    return datetime.timedelta(seconds=seconds)


def init_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); returns whether this process is one of several ranks.

    Backend: nccl when ``device`` is (or "auto" resolves to) CUDA, with this rank's GPU
    ``cuda:LOCAL_RANK`` made current (``_local_gpu``); gloo on the CPU. WORLD_SIZE unset or 1:
    nothing to do. A device this process cannot use (no CUDA, no GPU of its own under nccl) is
    a ValueError before the rendezvous. Ranks other than 0 show no progress bars.
    """
    size = os.environ.get("WORLD_SIZE", "1")
    if not size.isdigit() or int(size) < 1:
        raise ValueError(f"WORLD_SIZE={size!r} is not a number of processes; launch with "
                         f"torchrun --nproc-per-node N -m rlhf <stage> ...")
    if dist.is_initialized():
        return is_distributed()
    if int(size) == 1:
        return False
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: start the ranks "
                         f"with torchrun (torchrun --nproc-per-node N -m rlhf <stage> ...)")
    from rlhf.stage import check_device, resolve_device

    check_device(device)
    _requested_strategy()  # a bad RLHF_DIST_STRATEGY is said now, not once the model has loaded
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    # RLHF_DIST_BACKEND=gloo on GPUs: debugging, or several ranks on one GPU (NCCL refuses that)
    backend = os.environ.get("RLHF_DIST_BACKEND") or ("nccl" if cuda else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"RLHF_DIST_BACKEND={backend!r}: expected nccl or gloo")
    if cuda:
        if device != "auto":
            resolve_device(device)  # no CUDA, or no such GPU: the one-process run's error line
        _STATE["gpu"] = _local_gpu(device, backend, int(size))
        torch.cuda.set_device(_STATE["gpu"])
    dist.init_process_group(backend, timeout=_timeout())
    if dist.get_rank() != 0:
        _silence_progress_bars()
    if is_distributed():
        install_stop_handlers()
    return is_distributed()


def _local_gpu(device: str, backend: str, world: int) -> int:
    """The GPU of this rank: cuda:LOCAL_RANK (nccl: one GPU per process); under gloo, ranks
    beyond the visible GPUs share them (LOCAL_RANK modulo their number) and ``cuda:N`` puts
    every rank on GPU N. A setting nccl cannot run is a ValueError that says what to use."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    index = torch.device(device).index if device.startswith("cuda") else None
    if backend == "gloo":
        return index if index is not None else local % count
    if index is not None and index != local:
        raise ValueError(f"device={device!r} under torchrun ({world} processes): every process "
                         f"would use GPU {index}, and nccl takes one GPU per process; write "
                         f"device=cuda (each process takes cuda:LOCAL_RANK) or device=auto, or "
                         f"set RLHF_DIST_BACKEND=gloo for processes that share one GPU")
    if local >= count:
        raise ValueError(f"this machine's process {local} (LOCAL_RANK) has no GPU of its own: "
                         f"{count} CUDA GPU(s) visible, and nccl takes one per process; start at "
                         f"most {count} processes per machine (--nproc-per-node / --nproc "
                         f"{count}), or set RLHF_DIST_BACKEND=gloo for processes that share "
                         f"GPUs")
    return local


def _silence_progress_bars() -> None:
    """Ranks other than 0 show no progress bar. tqdm reads TQDM_DISABLE when it is imported
    (the stages import it before the process group exists), so the variable alone came too
    late: every bar is made with disable=True from here on."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        import tqdm.std
    except ImportError:
        return
    original = tqdm.std.tqdm.__init__
    if getattr(original, "_rank_silenced", False):
        return

    @functools.wraps(original)
    def silent(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    silent._rank_silenced = True
    tqdm.std.tqdm.__init__ = silent


def shutdown() -> None:
    """Leave the process group (the CLI calls it when the stage returns); SIGTERM and SIGHUP
    get their handlers of before ``install_stop_handlers`` back."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _STATE["resolved"] = _STATE["gpu"] = None
    _remove_stop_handlers()


# ----------------------------------------------------------------------------------------------
# stopping together on SIGTERM / SIGHUP
# ----------------------------------------------------------------------------------------------
# signal: the first stop signal this rank got (None: none); handlers: what install replaced
_STOP: dict[str, Any] = {"signal": None, "handlers": None}


def _stop_signals() -> list[int]:
    return [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]


def _request_stop(signum: int, _frame) -> None:
    """The handler of SIGTERM and SIGHUP under torchrun: note the signal; the ranks stop
    together at their next shared collective (``_stop_if_asked``). A second one (torchrun
    passes on a SIGHUP the terminal sent every rank already) changes nothing; torchrun's
    SIGKILL, after its shutdown timeout (30 s by default), is the backstop."""
    if signum == getattr(signal, "SIGHUP", None):
        from rlhf.cli import _guard_output_after_hangup

        _guard_output_after_hangup()  # the terminal is gone: the messages go nowhere
    if _STOP["signal"] is None:
        _STOP["signal"] = int(signum)


def install_stop_handlers() -> None:
    """Under torchrun (``init_from_env`` calls it once the group exists): SIGTERM and SIGHUP
    set this rank's stop flag instead of ending the process (module docstring, "Stopping
    together"); a SIGHUP that is ignored (nohup) stays ignored. Only in the main thread (where
    handlers can be set): the flag then rides in the collectives on every rank or on none."""
    if _STOP["handlers"] is not None or threading.current_thread() is not threading.main_thread():
        return
    previous = {}
    for number in _stop_signals():
        if number != signal.SIGTERM and signal.getsignal(number) == signal.SIG_IGN:
            continue
        previous[number] = signal.signal(number, _request_stop)
    _STOP["handlers"], _STOP["signal"] = previous, None


def _remove_stop_handlers() -> None:
    previous, _STOP["handlers"], _STOP["signal"] = _STOP["handlers"], None, None
    if previous and threading.current_thread() is threading.main_thread():
        for number, handler in previous.items():
            signal.signal(number, handler)


def stop_requested() -> bool:
    """Whether this rank got SIGTERM or SIGHUP (under torchrun, with the handlers installed)."""
    return _STOP["signal"] is not None


def _stopping() -> bool:
    """Whether the collectives carry the stop flag: the handlers are installed (on every rank
    or on none: ``install_stop_handlers``)."""
    return _STOP["handlers"] is not None and is_distributed()


def _stop_if_asked(flag: float) -> None:
    """``flag``: the stop flags of every rank, reduced (sum or max): raise ``Terminated`` on
    this rank when any rank got a stop signal. The signal named is this rank's own, else
    SIGTERM (what torchrun passes on)."""
    if not flag > 0:
        return
    from rlhf.cli import Terminated

    signum = _STOP["signal"] or int(signal.SIGTERM)
    _STOP["signal"] = None  # said once: the interrupt path after it must not meet it again
    raise Terminated(f"terminated by signal {signum} ({signal.Signals(signum).name}) under "
                     f"torchrun: every rank stops at this step", signum)


def check_stop() -> None:
    """Stop every rank together (``Terminated``) when any got SIGTERM or SIGHUP: one small
    all-reduce, for the places between stages where no other collective carries the flag
    (the pipeline calls it before each of its phases). Nothing in one process."""
    if not _stopping():
        return
    flag = torch.tensor([float(_STOP["signal"] or 0)], dtype=torch.float64, device=_device())
    _collective("all_reduce", "all-reduce of the stop flag", dist.all_reduce, flag,
                op=dist.ReduceOp.MAX)
    _stop_if_asked(float(flag.item()))


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index becomes this rank's GPU under torchrun: the one
    ``init_from_env`` made current (cuda:LOCAL_RANK; under gloo, LOCAL_RANK modulo the GPUs),
    or cuda:LOCAL_RANK where the process group was made some other way."""
    if device.type == "cuda" and device.index is None and is_distributed():
        gpu = _STATE["gpu"]  # None: the process group was made without init_from_env
        if gpu is None:
            gpu = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
        return torch.device("cuda", gpu)
    return device


def _collective(kind: str, what: str, fn: Callable, *args, **kwargs):
    """Run one collective; a failure becomes a RankFailure that says what happened."""
    COLLECTIVES[kind] += 1
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ConnectionError) as error:
        if isinstance(error, RankFailure):
            raise
        raise RankFailure(
            f"rank {rank()} of {world_size()}: the {what} with the other ranks failed "
            f"({' '.join(str(error).split())[:300]}). Another rank has most likely died or "
            f"stalled (see its error, or torchrun's summary); the run stops here. The "
            f"checkpoints written so far are complete: start again with --resume (any number "
            f"of processes)") from error


def barrier() -> None:
    if is_distributed():
        _collective("barrier", "barrier", dist.barrier)


def broadcast_from_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, its result (any picklable object) on every rank. An exception on
    rank 0 is raised on every rank: as its own class where that class can be built from the
    message (ValueError and its kin), else as the nearest base class that can (``_rebuilt``);
    the message says "from rank 0", and its ``from_rank_0`` attribute is True (the CLI prints
    rank 0's line alone)."""
    if not is_distributed():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except Exception as error:  # re-raised here after the others learnt about it
            _collective("broadcast", "broadcast of rank 0's result", dist.broadcast_object_list,
                        [("error", type(error), str(error))], src=0)
            raise
        _collective("broadcast", "broadcast of rank 0's result", dist.broadcast_object_list,
                    box, src=0)
        return box[0][1]
    _collective("broadcast", "broadcast of rank 0's result", dist.broadcast_object_list, box,
                src=0)
    if box[0][0] == "error":
        _kind, error_type, message = box[0]
        error = _rebuilt(error_type, f"(from rank 0) {message}")
        error.from_rank_0 = True  # the CLI leaves it to rank 0 to say (once, not once per rank)
        raise error
    return box[0][1]


def _rebuilt(error_type: type, message: str) -> Exception:
    """``error_type(message)``, else the nearest class of its MRO that takes one message (a
    JSONDecodeError comes back a ValueError, which the CLI reports in one line as it does on
    rank 0), else a RuntimeError."""
    for cls in error_type.__mro__:
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            continue
        try:
            error = cls(message)
        except Exception:  # noqa: BLE001 (a constructor that wants other arguments)
            continue
        if str(error) == message:
            return error
    return RuntimeError(message)


# ----------------------------------------------------------------------------------------------
# strategy and model preparation
# ----------------------------------------------------------------------------------------------
def set_strategy(name: str | None) -> None:
    """``ddp``, ``fsdp2`` or ``auto`` (None: the RLHF_DIST_STRATEGY environment variable, else
    auto). The CLI sets it from ``strategy=...``."""
    if name is not None and name not in STRATEGIES:
        raise ValueError(f"strategy={name!r} is not a strategy; expected one of {STRATEGIES}")
    _STATE["strategy"], _STATE["resolved"] = name, None


def _requested_strategy() -> str:
    name = _STATE["strategy"] or os.environ.get("RLHF_DIST_STRATEGY", "auto")
    if name not in STRATEGIES:
        raise ValueError(f"RLHF_DIST_STRATEGY={name!r} is not a strategy; expected one of "
                         f"{STRATEGIES}")
    return name


def strategy() -> str:
    """The strategy in force: "none" for one process, else "ddp" or "fsdp2" (auto resolved by
    ``prepare``; before that, auto reads as ddp)."""
    if not is_distributed():
        return "none"
    return _STATE["resolved"] or ("ddp" if _requested_strategy() == "auto"
                                  else _requested_strategy())


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (or a model wrapping one): the largest
    ModuleList whose entries are all of one class."""
    best = None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and \
                len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise ValueError(f"strategy=fsdp2 shards decoder layers, and {type(model).__name__} has "
                         f"no list of layers; use strategy=ddp")
    return best


def _base_bytes(model: torch.nn.Module, trainable: set) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p not in trainable)


def prepare(model: torch.nn.Module, device: torch.device,
            trainable: Sequence[torch.nn.Parameter] | None,
            *, stage: str) -> torch.nn.Module:
    """Apply the strategy to ``model`` before it moves to ``device``; returns it.

    ``trainable``: every parameter any role of this stage may train (full-weight SFT: all of
    them; None: ``model`` is a SharedBackbone, and its adapters of every role and heads).
    ddp: nothing to do (the gradients are summed by ``sum_gradients``). fsdp2: ``fully_shard``
    on each decoder layer with ``trainable`` ignored, so only frozen base weights are sharded
    (module docstring); full-weight training and SFT are refused (they run with ddp).
    """
    if not is_distributed():
        return model
    requested = _requested_strategy()
    if trainable is None:  # a SharedBackbone: the adapters and heads of every role
        trainable = [p for role in model.roles for p in model.trainable_parameters(role)]
    trainable = set(trainable)
    chosen = requested
    if requested == "auto":
        chosen = "ddp"
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            chosen = "fsdp2" if _base_bytes(model, trainable) > FSDP2_AUTO_FRACTION * total \
                else "ddp"
    if stage == "sft":
        if requested == "fsdp2" and not _STATE.get("sft_replicated"):
            raise ValueError("strategy=fsdp2 shards the frozen base of the reward and RL stages; "
                             "SFT runs data-parallel with replicated weights: use strategy=ddp "
                             "(or auto) for sft")
        chosen = "ddp"
    quantized = any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters())
    if chosen == "fsdp2" and quantized:
        if requested == "fsdp2":
            raise ValueError("strategy=fsdp2 cannot shard a bitsandbytes-quantized base (its "
                             "packed weights are no plain tensors); a 4-bit or 8-bit base is "
                             "already small: use strategy=ddp")
        chosen = "ddp"
    if chosen == "fsdp2":
        frozen = [p for p in model.parameters() if p not in trainable]
        if not frozen:
            raise ValueError(f"strategy=fsdp2 shards the frozen base weights, and {stage} trains "
                             f"every weight (full-weight fine-tuning); use strategy=ddp, or "
                             f"LoRA (lora_rank > 0)")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world_size(),))
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh, ignored_params=trainable & set(layer.parameters()))
    _STATE["resolved"] = chosen
    return model


@contextlib.contextmanager
def replicated_sft() -> Iterator[None]:
    """Inside, ``strategy=fsdp2`` gives an SFT stage ddp instead of refusing it: for a command
    that runs SFT and then the reward and RL stages (``rlhf pipeline``), where fsdp2 is meant
    for the frozen base of the later stages and SFT, which trains every weight, runs ddp as
    ``auto`` and ``rlhf plan --strategy fsdp2`` have it."""
    before = _STATE.get("sft_replicated", False)
    _STATE["sft_replicated"] = True
    try:
        yield
    finally:
        _STATE["sft_replicated"] = before


def prepare_engine(engine) -> None:
    """Under fsdp2 a decode step all-gathers each layer's weights: no captured CUDA graph."""
    if strategy() == "fsdp2" and getattr(engine, "decode_graph", "none") != "none":
        engine.decode_graph = "none"


def all_done(finished: torch.Tensor) -> bool:
    """Whether every row is finished (a generation may stop). Under fsdp2 every rank must run
    the same number of decode steps (each one all-gathers weights), so all ranks must agree."""
    done = bool(finished.all())
    if strategy() != "fsdp2":
        return done
    flag = torch.tensor([1.0 if done else 0.0], device=finished.device)
    _collective("all_reduce", "all-reduce of the generation's stop flag", dist.all_reduce, flag,
                op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


@contextlib.contextmanager
def full_weights(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Under fsdp2, ``state_dict()`` of ``model`` (and of any module holding its sharded
    layers) gives whole CPU tensors on rank 0 inside the block, so that the usual savers
    (SharedBackbone.save, save_pretrained) write full weights. Every rank must enter it (the
    layers are all-gathered one at a time); otherwise nothing happens."""
    if strategy() != "fsdp2":
        yield model
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    layers = [m for m in model.modules() if isinstance(m, FSDPModule)]
    whole = []
    for layer in layers:  # every rank, the same order: each full_tensor is a collective
        full = {}
        for name, value in layer.state_dict().items():
            if isinstance(value, DTensor):
                COLLECTIVES["all_gather"] += 1
                full[name] = value.full_tensor().cpu()
        whole.append(full if is_main() else {})
    # FSDP2's pre-save hook puts the shards back before any state_dict; the layers' own
    # state_dict (which a parent's calls for its children) swaps the whole tensors in after it
    for layer, full in zip(layers, whole, strict=True):
        original = layer.state_dict

        def with_full(*args, destination=None, prefix="", keep_vars=False, _original=original,
                      _full=full, **kwargs):
            out = _original(*args, destination=destination, prefix=prefix, keep_vars=keep_vars,
                            **kwargs)
            for name, value in _full.items():
                out[prefix + name] = value
            return out

        layer.state_dict = with_full
    try:
        yield model
    finally:
        for layer in layers:
            del layer.state_dict  # the class's method again


def full_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every DTensor (fsdp2 shard) made whole (every rank must call it)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, value in state.items():
        if isinstance(value, DTensor):
            COLLECTIVES["all_gather"] += 1
            value = value.full_tensor()
        out[name] = value
    return out


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def shard(index: torch.Tensor, *, even: bool = False, what: str = "batch") -> torch.Tensor:
    """This rank's contiguous share of the global batch ``index`` (rows of it, in order).

    Shares differ by at most one row; ``even=True`` demands equal shares (the RL rollout, whose
    ranks gather each other's rows). Fewer rows than ranks is an error: a rank with nothing to
    do would skip the collectives the others wait for."""
    if not is_distributed():
        return index
    check_split(len(index), even=even, what=what)
    return torch.tensor_split(index, world_size())[rank()]


def check_split(rows: int, *, even: bool = False, what: str = "batch",
                setting: str = "the batch size") -> None:
    """ValueError unless ``rows`` can be ``shard``-ed over the ranks (at least one each; with
    ``even``, equal shares). A stage calls it on its batch settings before it loads anything,
    so that a batch the processes cannot share stops the run at once; ``setting`` names
    what to change. Nothing to check in one process."""
    if not is_distributed():
        return
    size = world_size()
    if rows < size or (even and rows % size):
        need = "a multiple of" if even else "at least"
        raise ValueError(f"a {what} of {rows} rows cannot be split over {size} ranks: it must "
                         f"be {need} the number of processes ({size}); change {setting} or "
                         f"the number of processes")


_SAMPLING_ROWS: list[tuple[int, int]] = []  # (first row, global rows) of the running generate


@contextlib.contextmanager
def global_sampling_rows(total: int) -> Iterator[None]:
    """Inside, the rollout engine's random draws are those of the whole global batch of
    ``total`` rows (each rank keeps its rows' part; ``exponential_like``), so the samples of
    rank r's share are the ones one process draws for those rows: with the same seed on every
    rank, a rollout does not depend on the world size (up to rounding that flips a draw)."""
    if not is_distributed():
        yield
        return
    if total % world_size():
        raise ValueError(f"a rollout of {total} rows cannot be split evenly over "
                         f"{world_size()} ranks")
    _SAMPLING_ROWS.append((rank() * (total // world_size()), total))
    try:
        yield
    finally:
        _SAMPLING_ROWS.pop()


def exponential_like(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Exp(1) noise of ``probs``' shape (B, V): this rank's rows of a draw for the global batch
    inside ``global_sampling_rows``, else a draw of its own shape."""
    if not _SAMPLING_ROWS:
        return torch.empty_like(probs).exponential_(generator=generator)
    first, total = _SAMPLING_ROWS[-1]
    noise = torch.empty((total, *probs.shape[1:]), dtype=probs.dtype, device=probs.device)
    return noise.exponential_(generator=generator)[first:first + probs.shape[0]]


def weighted(loss: torch.Tensor, stats: dict[str, float], n_local: int,
             n_global: int) -> tuple[torch.Tensor, dict[str, float]]:
    """A mean over this rank's ``n_local`` rows as its part of the mean over ``n_global``
    (summed over ranks by ``sum_gradients``); unchanged in one process."""
    if not is_distributed():
        return loss, stats
    share = n_local / n_global
    return loss * share, {key: value * share for key, value in stats.items()}


def _denominator(mask: torch.Tensor, reduction: str) -> torch.Tensor | None:
    """The outer denominator ``rlhf_kernels.reduce_loss`` uses for ``reduction`` (None when it
    does not depend on the rows: T or 1)."""
    if reduction == "token-mean":
        return mask.sum().clamp_min(1)
    if reduction in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return (mask.sum(-1) > 0).sum().clamp_min(1).to(mask.dtype)
    return None


class Shares(NamedTuple):
    """What turns a rank's RL losses and stats into its parts of the global micro-batch's:
    loss: the factor of both losses, the policy's and PPO's value loss (None: nothing to do);
    tokens: the rank's share of the micro-batch's valid tokens (for the per-token mean stats)."""

    loss: torch.Tensor | None
    tokens: torch.Tensor


def rl_shard(batch, reduction: str, normalizer) -> tuple[Any, Shares | None]:
    """This rank's rows of a global RL micro-batch and its ``Shares``; (batch, None) in one
    process.

    Both losses with a step ``normalizer`` are already parts of the global sum; otherwise
    both are rescaled from the local to the global denominator of ``reduction``
    (token-mean: tokens; seq-mean-*: rows with a token; the T / 1 reductions need nothing).
    Every rank holds the global micro-batch, so the global counts cost no communication."""
    if not is_distributed():
        return batch, None
    rows = torch.arange(batch.sequences.shape[0], device=batch.sequences.device)
    local = batch.rows(shard(rows, what="minibatch"))
    global_denominator = _denominator(batch.action_mask, reduction)
    factor = None if global_denominator is None else \
        _denominator(local.action_mask, reduction) / global_denominator
    tokens = local.action_mask.sum() / batch.action_mask.sum().clamp_min(1)
    return local, Shares(None if normalizer is not None else factor, tokens)


# stats that are no per-token mean: a maximum (reduced with max) and the explained variance (a
# ratio of variances: the mean over ranks, an approximation)
def _is_max(key: str) -> bool:
    return "max" in key.rsplit("/", 1)[-1]


def _is_ratio(key: str) -> bool:
    return key.rsplit("/", 1)[-1] == "explained_variance"


# stats reduced as the loss is (its policy-gradient and KL terms): scaled as the loss
_LOSS_PARTS = ("pg_loss", "kl")


def scaled(loss: torch.Tensor, stats: Mapping[str, Any], factor, tokens):
    """A rank's loss and loss-part stats times ``factor`` (None: as they are) and its per-token
    mean stats times its token share (``Shares``), so that their sums over ranks are the global
    values."""
    def part(key, value):
        if _is_max(key) or _is_ratio(key):
            return value
        if key in _LOSS_PARTS:
            return value if factor is None else value * factor
        return value * tokens

    return loss if factor is None else loss * factor, \
        {key: part(key, value) for key, value in stats.items()}


# ----------------------------------------------------------------------------------------------
# reductions
# ----------------------------------------------------------------------------------------------
def sum_gradients(params: Sequence[torch.nn.Parameter],
                  scalars: Sequence[float] = ()) -> list[float]:
    """Sum the gradients of ``params`` over ranks in place (one all-reduce per bucket of
    ``BUCKET_ELEMENTS``; a parameter without a gradient counts as zeros), and ``scalars`` (the
    step's metrics, summed as well, riding in the first fp32 / fp64 bucket; with bf16 or fp16
    gradients alone, a full-weight run of a half-precision model, in an fp64 all-reduce of
    their own: a bf16 buffer rounded the logged loss to 3 significant digits). Returns the
    summed scalars; in one process, the scalars as they are and no gradient is touched.

    Under torchrun the stop flag rides along (one more scalar): when any rank got SIGTERM or
    SIGHUP, every rank raises ``Terminated`` here, before the optimizer step, and the stage
    saves the checkpoint of its last whole step ("Stopping together")."""
    if not is_distributed():
        return list(scalars)
    if not _stopping():
        return _sum_gradients(params, scalars)
    *summed, flag = _sum_gradients(params, [*scalars, float(_STOP["signal"] or 0)])
    _stop_if_asked(flag)
    return summed


def _sum_gradients(params: Sequence[torch.nn.Parameter],
                   scalars: Sequence[float]) -> list[float]:
    params = [p for p in params if p.requires_grad or p.grad is not None]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        if not buckets or size + p.numel() > BUCKET_ELEMENTS or \
                buckets[-1][0].grad.dtype != p.grad.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel()
    wide = (torch.float32, torch.float64)
    carrier = next((number for number, bucket in enumerate(buckets)
                    if bucket[0].grad.dtype in wide), None)
    if carrier is None:  # nothing to train on this step, or half-precision gradients only
        flat = torch.tensor(list(scalars), dtype=torch.float64, device=_device())
        if scalars or not buckets:
            _collective("all_reduce", "all-reduce of the step's metrics", dist.all_reduce, flat)
        if not buckets:
            return flat.tolist()
    out: list[float] = list(scalars) if carrier is not None else flat.tolist()
    for number, bucket in enumerate(buckets):
        grads = [p.grad.reshape(-1) for p in bucket]
        extra = len(scalars) if number == carrier else 0
        head = grads[0]
        flat = torch.cat(grads + ([torch.tensor(list(scalars), dtype=head.dtype,
                                                device=head.device)] if extra else []))
        COLLECTIVES["gradients"] += 1
        _collective("all_reduce", "all-reduce of the gradients", dist.all_reduce, flat)
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()
        if extra:
            out = flat[offset:offset + extra].double().tolist()
    return out


def sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """Integer counts (tokens seen, ...) summed over ranks (one all-reduce); in one process,
    ``counts`` itself."""
    if not is_distributed() or not counts:
        return counts
    values = torch.tensor(list(counts.values()), dtype=torch.int64, device=_device())
    _collective("all_reduce", "all-reduce of the token counts", dist.all_reduce, values)
    return dict(zip(counts, (int(v) for v in values.tolist()), strict=True))


def min_count(count: int) -> int:
    """The smallest of every rank's ``count`` (one all-reduce); in one process, ``count``."""
    if not is_distributed():
        return count
    value = torch.tensor([count], dtype=torch.int64, device=_device())
    _collective("all_reduce", "all-reduce of the kept group counts", dist.all_reduce, value,
                op=dist.ReduceOp.MIN)
    return int(value.item())


def global_mean(values: Sequence[float]) -> float:
    """The mean of ``values`` gathered from every rank (in one process: their mean)."""
    values = list(values)
    if not is_distributed():
        return float(sum(values) / len(values))
    totals = torch.tensor([float(sum(values)), float(len(values))], dtype=torch.float64,
                          device=_device())
    _collective("all_reduce", "all-reduce of a metric", dist.all_reduce, totals)
    return float(totals[0] / totals[1])


def reduce_stats(sums: dict[str, float]) -> dict[str, float]:
    """RL loss statistics summed over a rank's micro-batches (each already its part of the
    global value, ``scaled``) -> the same over all ranks: summed, except maxima (max) and the
    explained variance (mean over ranks). One all-reduce per kind."""
    if not is_distributed() or not sums:
        return sums
    out = {}
    device = _device()
    for keys, op in (([k for k in sums if not _is_max(k) and not _is_ratio(k)], "sum"),
                     ([k for k in sums if _is_max(k)], "max"),
                     ([k for k in sums if _is_ratio(k)], "mean")):
        if not keys:
            continue
        values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
        _collective("all_reduce", "all-reduce of the loss statistics", dist.all_reduce, values,
                    op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            values = values / world_size()
        out.update(zip(keys, values.tolist(), strict=True))
    return {key: out[key] for key in sums}


def _device() -> torch.device:
    """Where the small tensors of a collective live: this rank's GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """(n, ...) on every rank (same shape) -> (world_size * n, ...) in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    _collective("all_gather", f"all-gather of {what}", dist.all_gather, parts, tensor.contiguous())
    return torch.cat(parts)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``rlhf_kernels.masked_whiten(x, mask)`` with the mean and (unbiased) variance over the
    valid tokens of every rank (two all-reduces; the reference's formula). One process: the
    kernel itself."""
    import rlhf_kernels

    if not is_distributed():
        return rlhf_kernels.masked_whiten(x, mask)
    valid = mask > 0
    xv = torch.where(valid, x.double(), torch.zeros((), dtype=torch.float64, device=x.device))
    totals = torch.stack([xv.sum(), valid.sum().double()])
    _collective("all_reduce", "all-reduce of the advantages' mean", dist.all_reduce, totals)
    n = totals[1]
    mean = totals[0] / n.clamp_min(1)
    centered = torch.where(valid, xv - mean, torch.zeros_like(xv))
    squares = (centered * centered).sum()
    _collective("all_reduce", "all-reduce of the advantages' variance", dist.all_reduce, squares)
    var = squares / (n - 1).clamp_min(1)
    out = (xv - mean) * torch.rsqrt(var + 1e-8)
    return torch.where(valid, out, torch.zeros_like(out)).to(torch.float32)


def group_advantages(rewards: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]
                     ) -> torch.Tensor:
    """``fn`` (the group-advantage op) over the rewards of every rank (gathered), this rank's
    rows of the result: groups never straddle ranks, but norm="batch" reads the whole batch."""
    if not is_distributed():
        return fn(rewards)
    everything = fn(_all_gather(rewards, "the sequence rewards"))
    return everything.view(world_size(), -1)[rank()]


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``tensor`` (equal counts), in rank order; in one process, itself."""
    if not is_distributed():
        return tensor
    if tensor.dtype == torch.bool:  # (gloo gathers no bool)
        return _all_gather(tensor.to(torch.uint8), "per-row flags").bool()
    return _all_gather(tensor, "per-row values")


def gather_rollout(rollout, pad_token_id: int):
    """Every rank's rollout rows (equal counts) -> the global rollout, in rank order, laid out
    as one process lays it out: prompts left-padded to the longest prompt of any rank, responses
    right-padded to the longest response (pad id / mask 0 / zeros, what the masks hide)."""
    if not is_distributed():
        return rollout
    prompt = rollout.prompt_length
    response = rollout.action_mask.shape[1]
    # (with the stop flag: every rank stops here, before the update, when any got SIGTERM)
    stopping = _stopping()
    widths = torch.tensor([prompt, response] + ([_STOP["signal"] or 0] if stopping else []),
                          dtype=torch.int64, device=_device())
    _collective("all_reduce", "all-reduce of the rollout widths", dist.all_reduce, widths,
                op=dist.ReduceOp.MAX)
    if stopping:
        _stop_if_asked(float(widths[2]))
    max_prompt, max_response = (int(v) for v in widths[:2].tolist())
    left, right = max_prompt - prompt, max_response - response
    from rlhf.engine import pad_frame  # engine imports this module

    def pad(tensor, value, per_token):
        if tensor is None or tensor.dim() < 2:
            return tensor
        return pad_frame(tensor, 0 if per_token else left, right, value)  # (B, R) | (B, P + R)

    fields = {
        "sequences": pad(rollout.sequences, pad_token_id, False),
        "attention_mask": pad(rollout.attention_mask, 0, False),
    }
    for name in ("action_mask", "old_logprobs", "ref_logprobs", "old_values", "rewards",
                 "advantages", "returns"):
        fields[name] = pad(getattr(rollout, name), 0, True)
    fields["scores"] = rollout.scores
    gathered = {name: None if value is None else _all_gather(value, f"the rollout's {name}")
                for name, value in fields.items()}
    return type(rollout)(prompt_length=max_prompt, **gathered)
