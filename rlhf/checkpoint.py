"""Checkpoints that are never half-written: temp file/dir + os.replace, then resume from the last.

Layout written by the stages (one directory per checkpoint, named `step-0000123`):

    <output_dir>/checkpoints/step-0000123/
        state.pt               torch.save of everything that is not a named tensor dict
                               (step, optimizer, scheduler, RNG states, config), read back with
                               torch.load(weights_only=True): no code runs on load
        <key>.safetensors      each state value that is a {name: tensor} dict (e.g. `params`)
        models/<name>.safetensors   save_checkpoint: the full state_dict of each model
        tokenizer/             save_checkpoint: tokenizer.save_pretrained
        meta.json              human-readable: keys, step, library versions

Atomicity: a checkpoint is written into a hidden temp directory next to its target
(`.step-0000123.tmp-<pid>-<random>`) and renamed into place only once complete, so an
interruption (Ctrl-C, crash, full disk) leaves either the previous checkpoint or the new one,
never a partial one; `latest_checkpoint` ignores hidden entries. Replacing an existing directory
moves the old one aside first (`.step-0000123.old-<pid>-<random>`) and deletes it after the new
one is in place. Temp files and directories are created with the process's umask (a finished
file is 0644 under the usual umask 022, not mkstemp's 0600), and a kill that leaves one behind
is cleaned up by the next run on that output_dir (`remove_stale_temps`, under the run lock).

Run directories (`open_run`): every stage and the pipeline own their output_dir for the
duration of a run:

- a lock (`<output_dir>/.lock`, `fcntl.flock`): a second run on the same directory stops at
  once with a message naming the first (pid, host, start time, command). The kernel releases
  the lock when its process dies, so a killed run never blocks the next one.
- a manifest (`<output_dir>/run.json`): the kind of run, a run id and the resolved config,
  written when a run starts afresh. `--resume` compares the new config with it and refuses
  any changed setting (listing each, old -> new), except those that cannot change what the
  run computes (`RESUME_SAFE_KEYS`: where the run lives and how it is resumed, checkpointed and
  capped in memory); the refusal names the `key=value` overrides that give the run's settings
  back. A run written by an older version resumes when each setting added since has the value
  that did what that version did (`SETTINGS_ADDED`), and RL settings left to their algorithm's
  preset compare as the preset's value. Checkpoints carry the run id, and resuming refuses a
  checkpoint of another run, so a resumed run only ever uses the files of the run it resumes.
  run.json also keeps a fingerprint (size, sha256) of each local data file or folder the
  config names (`dataset` settings); `--resume` refuses data whose content changed since.
  It fingerprints each local model and tokenizer the config names as well (`model`,
  `tokenizer`; sampled, `MODEL_FULL_HASH_BYTES`; a saved backbone with the base model it
  names): the stages after SFT checkpoint only adapters and heads and load the base again on
  resume, so `--resume` refuses a model retrained or replaced at that path since.
  A stage given its rows by the pipeline does not read those files: the pipeline's run.json
  alone fingerprints them (`reads_data=False`), so each is hashed once.
  It records the kernels' backend the environment asked for (`RLHF_KERNELS_BACKEND`, "auto"
  when unset): a resume under another one warns that its second part rounds differently. And
  the values an RL algorithm's preset gave the settings left to it (`presets`): a resume under
  a version whose preset changed is refused like a changed setting.
- a fresh run (no --resume) into a directory that holds a run's files refuses to start (it
  would mix with them) unless `overwrite=true`, which deletes exactly those files first.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import socket
import sys
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf.errors import write_error

__all__ = [
    "MANIFEST_FILE",
    "PIPELINE_RUN_FILES",
    "RESUME_SAFE_KEYS",
    "SETTINGS_ADDED",
    "STAGE_RUN_FILES",
    "RunDirectory",
    "RunDirectoryError",
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_text",
    "capture_rng_state",
    "config_changes",
    "interrupts_held",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "normal_file_modes",
    "load_state",
    "open_run",
    "prune_checkpoints",
    "remove_stale_temps",
    "restore_rng_state",
    "save_checkpoint",
    "save_pretrained_atomic",
    "save_state",
    "DamagedCheckpointError",
]

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
STATE_FILE, META_FILE, MODELS_DIR, TOKENIZER_DIR = "state.pt", "meta.json", "models", "tokenizer"


# ----------------------------------------------------------------------------------------------
# atomic files and directories
# ----------------------------------------------------------------------------------------------


# Our temp names: `.<target name>.tmp-<pid>-<random>` while being written and
# `.<target name>.old-<pid>-<random>` for a replaced directory on its way out (SharedBackbone.save
# uses the same forms). Only names of this form are ever removed as leftovers.
# (Older versions made `.<name>.tmp-<8 chars>` with tempfile and `.<name>.old-<8 chars>`.)
TEMP_NAME_PATTERN = re.compile(r"^\..+\.(?:tmp|old)-(?:[0-9]+-)?[0-9a-z_]{8}$")


def _temp_name(path: Path, kind: str = "tmp") -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _create_temp(path: Path, directory: bool) -> Path:
    """A new temp file/dir next to `path`, created with mode 0666/0777 minus the umask (what
    open()/mkdir() give any file), not tempfile's 0600/0700: the renamed result must be as
    readable as a file written in place."""
    for _ in range(100):
        temp = _temp_name(path)
        try:
            if directory:
                os.mkdir(temp, 0o777)
            else:
                os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temp name next to {str(path)!r}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory + fsync + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_name = _create_temp(path, directory=False)
    try:
        with open(temp_name, "wb") as temp_file:
            temp_file.write(data)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_name, path)
    except BaseException:  # also Ctrl-C: never leave the temp file behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp directory; on normal exit it becomes `path`, on error it is removed.

        with atomic_directory(out / "step-0000010") as tmp:
            torch.save(..., tmp / "state.pt")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _create_temp(path, directory=True)
    try:
        yield temp
        normal_file_modes(temp)
        _fsync_tree(temp)
        if path.exists():
            # os.replace cannot replace a non-empty directory: move the old one aside first;
            # hidden names are ignored by latest_checkpoint, so readers never see a partial one.
            aside = _temp_name(path, "old")
            os.replace(path, aside)
            os.replace(temp, path)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(temp, path)
    except BaseException as error:
        shutil.rmtree(temp, ignore_errors=True)
        failed_write = write_error(error, path)  # a full disk: OSError(ENOSPC, ..., path)
        if failed_write is not None:
            raise failed_write from error
        raise


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete the temp files/dirs (TEMP_NAME_PATTERN) a killed writer left under `directory`
    (recursively); returns what was removed. Call it only while holding the directory's run
    lock (`open_run` does), so that no live writer's temp is touched."""
    removed = []
    for root, dirs, files in os.walk(directory):
        for name in [*dirs, *files]:
            if TEMP_NAME_PATTERN.match(name):
                target = Path(root) / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        target.unlink()
                removed.append(target)
        dirs[:] = [name for name in dirs if not TEMP_NAME_PATTERN.match(name)]
    return sorted(removed)


def _umask() -> int:
    """This process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_file_modes(directory: str | Path) -> None:
    """Give every file under ``directory`` the mode open() gives a new file (0666 minus the
    umask; 0777 minus it where an execute bit is set). safetensors (0.8) writes its files 0600,
    so each checkpoint's ``params.safetensors``, a saved model's ``model.safetensors`` and a
    backbone's adapters and heads could not be read by another user (a server reading the
    model), unlike every other file the run writes. Called on a directory before it is
    published (``atomic_directory``, ``SharedBackbone.save``)."""
    mask = _umask()
    for file in Path(directory).rglob("*"):
        if file.is_file() and not file.is_symlink():
            executable = file.stat().st_mode & 0o111
            wanted = (0o777 if executable else 0o666) & ~mask
            if file.stat().st_mode & 0o777 != wanted:
                os.chmod(file, wanted)


def _fsync_tree(directory: Path) -> None:
    # Data on disk before the rename publishes it (a power cut must not expose empty files).
    for file in directory.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


# ----------------------------------------------------------------------------------------------
# training state
# ----------------------------------------------------------------------------------------------


def _is_tensor_dict(value: Any) -> bool:
    return (isinstance(value, Mapping) and len(value) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def _loadable(value: Any, key: str) -> Any:
    """`value` with only types torch.load(weights_only=True) accepts; others are a clear error."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float,
                                                                             str, bytes)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {k: _loadable(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_loadable(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    if type(value).__module__ == "numpy":
        import numpy as np

        return torch.from_numpy(np.array(value)) if getattr(value, "ndim", 0) else value.item()
    raise ValueError(f"cannot checkpoint state[{key!r}] of type {type(value).__name__}: only "
                     f"tensors, numbers, strings, None, lists/tuples/dicts of them, Paths and "
                     f"enums can be saved (convert it, e.g. to a dict)")


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous copies safetensors can write: a tensor whose storage an earlier one
    already uses is cloned. Tied weights (a Qwen2/GPT-2 lm_head that is the input embedding)
    share storage in a CPU model's state_dict, and safetensors refuses shared tensors; loading
    both names back into the model restores the tie's one value."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        out[name] = tensor
    return out


def _write_state(directory: Path, state: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    tensor_keys = [key for key, value in state.items() if _is_tensor_dict(value)]
    for key in tensor_keys:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
            raise ValueError(f"state key {key!r} must be a plain name (letters, digits, _ . -)")
        save_file(_unshared(state[key]), str(directory / f"{key}.safetensors"))
    rest = {key: _loadable(value, key) for key, value in state.items() if key not in tensor_keys}
    # through a Python file: a failed write (a full disk) then surfaces as the OSError behind
    # torch's RuntimeError ("basic_ios::clear: iostream error" when torch opens the file itself)
    with open(directory / STATE_FILE, "wb") as handle:
        torch.save(rest, handle)
    meta = {"state_keys": sorted(rest), "tensor_dicts": sorted(tensor_keys),
            "torch": torch.__version__}
    for counter in ("step", "iteration", "epoch"):
        if isinstance(state.get(counter), int):
            meta[counter] = state[counter]
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))


def _read_state(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    state_file = directory / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a checkpoint: it has no {STATE_FILE}")
    file = state_file
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        for file in sorted(directory.glob("*.safetensors")):
            state[file.name[: -len(".safetensors")]] = load_file(str(file))
    except Exception as error:  # torch's zip reader, safetensors' header check, a read error
        raise _damaged(directory, file, error) from error
    return state


class DamagedCheckpointError(ValueError):
    """A checkpoint whose files cannot be read back (cut short by a copy, a disk error): the
    writes are atomic, so this run never leaves one; the message says what to do."""


def _damaged(directory: Path, file: Path, error: BaseException) -> DamagedCheckpointError:
    reason = " ".join((str(error) or type(error).__name__).split())
    if len(reason) > 160:
        reason = reason[:157] + "..."
    earlier = [path for path in list_checkpoints(directory.parent) if path != directory]
    earlier = [path for path in earlier if path.name < directory.name]
    then = (f"--resume then continues from {str(earlier[-1])!r}" if earlier else
            "--resume then starts the stage from the beginning (there is no earlier checkpoint)")
    return DamagedCheckpointError(
        f"checkpoint {str(directory)!r} is damaged: {file.name} cannot be read ({reason}). "
        f"Delete that directory and {then}, or start afresh with overwrite=true")


def save_state(directory: str | Path, **state: Any) -> Path:
    """Write a checkpoint directory atomically; returns its path.

    Each keyword whose value is a non-empty {name: tensor} dict goes to `<key>.safetensors`;
    the rest (optimizer/scheduler state dicts, step, RNG state, config dicts) to `state.pt`.
    Under torchrun only rank 0 writes (the trainable state is the same on every rank).
    """
    from rlhf import distributed

    directory = Path(directory)
    if not distributed.is_main():
        return directory
    with atomic_directory(directory) as temp:
        _write_state(temp, state)
    return directory


def load_state(directory: str | Path) -> dict[str, Any]:
    """The dict given to save_state (tensors on CPU; tuples may come back as tuples or lists)."""
    return _read_state(Path(directory))


def save_checkpoint(directory: str | Path, models: Mapping[str, torch.nn.Module] | None = None,
                    tokenizer: Any = None, state: Mapping[str, Any] | None = None) -> Path:
    """A checkpoint with full model weights (`models/<name>.safetensors`), the tokenizer and
    `state` (see save_state), written atomically. Shared (tied) tensors are stored once."""
    from safetensors.torch import save_model

    directory = Path(directory)
    with atomic_directory(directory) as temp:
        if models:
            (temp / MODELS_DIR).mkdir()
            for name, model in models.items():
                save_model(model, str(temp / MODELS_DIR / f"{name}.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(temp / TOKENIZER_DIR))
        _write_state(temp, dict(state or {}))
    return directory


def load_checkpoint(directory: str | Path,
                    models: Mapping[str, torch.nn.Module] | None = None) -> dict[str, Any]:
    """Load the weights of `models` (in place, strict) and return the saved state."""
    from safetensors.torch import load_model

    directory = Path(directory)
    state = _read_state(directory)
    for name, model in (models or {}).items():
        weights = directory / MODELS_DIR / f"{name}.safetensors"
        if not weights.is_file():
            saved = sorted(p.stem for p in (directory / MODELS_DIR).glob("*.safetensors"))
            raise FileNotFoundError(f"checkpoint {str(directory)!r} has no weights for model "
                                    f"{name!r}; it has {saved}")
        device = next(iter(model.parameters()), torch.empty(0)).device
        load_model(model, str(weights), strict=True, device=str(device))
    return state


def save_pretrained_atomic(directory: str | Path, model: Any, tokenizer: Any = None) -> Path:
    """`model.save_pretrained` (+ tokenizer) into `directory`, atomically (Hugging Face format).
    Under torchrun only rank 0 writes."""
    from rlhf import distributed

    directory = Path(directory)
    if not distributed.is_main():
        return directory
    with atomic_directory(directory) as temp:
        model.save_pretrained(str(temp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(temp))
    return directory


# ----------------------------------------------------------------------------------------------
# finding checkpoints, RNG
# ----------------------------------------------------------------------------------------------


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints `root/step-N`, oldest first (temp and hidden entries ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = CHECKPOINT_PATTERN.match(entry.name)
        if match and entry.is_dir() and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return [entry for _, entry in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint with the highest step under `root`, or None when there is none."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (keep >= 1); returns the deleted paths.
    Under torchrun only rank 0 deletes (it alone writes them)."""
    from rlhf import distributed

    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the latest checkpoint is needed to resume), "
                         f"got {keep}")
    if not distributed.is_main():
        return []
    old = list_checkpoints(root)[:-keep]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT), SIGTERM and SIGHUP (where the platform has it) until the block is
    done, then deliver them.

    A stage wraps an optimizer step in it, with what makes that step whole (the scheduler, the
    step counter, its metrics record): an interrupt inside ``optimizer.step()`` had updated some
    parameters (and their Adam moments) and not others, and the checkpoint the stage then saves
    labelled that half-updated model with the previous step, so the resumed run trained on from
    a state the uninterrupted one never had. Held, the interrupt arrives when the step is
    complete (at most one optimizer step later) and the checkpoint is the step's. A signal
    that came goes to the handler the block found (KeyboardInterrupt for SIGINT, the CLI's
    Terminated for SIGTERM and SIGHUP, or the default action; an ignored one, SIGHUP under
    nohup, stays ignored); when the block raises, that exception ends the run and the signal
    is dropped. Outside the main thread (where handlers cannot be set) the block runs as it
    is."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum, _frame) -> None:
        pending.append(signum)

    previous = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)  # Windows has no SIGHUP
        if number is None or signal.getsignal(number) == signal.SIG_IGN:
            continue  # an ignored one (SIGHUP under nohup) stays ignored
        previous[number] = signal.signal(number, hold)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if pending:  # reached only when the block completed
        handler = previous[pending[0]]
        if callable(handler):
            handler(pending[0], None)
        elif handler != signal.SIG_IGN:  # SIG_DFL, or a handler set outside Python
            signal.raise_signal(pending[0])


def capture_rng_state() -> dict[str, Any]:
    """Python, torch CPU and CUDA generator states, in a form save_state can write."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss],
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of capture_rng_state."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



# ----------------------------------------------------------------------------------------------
# run directories: lock, manifest, fresh vs resumed runs
# ----------------------------------------------------------------------------------------------

MANIFEST_FILE, LOCK_FILE = "run.json", ".lock"
# What a stage writes into its output_dir; a fresh run refuses a directory holding any of them,
# and overwrite=true deletes exactly these (other files there are left alone).
STAGE_RUN_FILES = (MANIFEST_FILE, "checkpoints", "metrics.jsonl", "summary.json", "model",
                   "backbone", "tensorboard")
PIPELINE_RUN_FILES = (MANIFEST_FILE, "summary.json", "metrics.jsonl", "curves.png", "samples.md",
                      "pairs.jsonl", "tokenizer", "base_eval.json", "heldout_curve.json",
                      *(f"{stage}/{name}" for stage in ("sft", "rm", "ppo")
                        for name in STAGE_RUN_FILES))
# Settings (matched by their last dotted component) that may differ on --resume: they cannot
# change a number the run computes. `output_dir`: the run may have been moved or copied;
# `resume`/`overwrite`: how this start treats the directory; `keep_last`/`save_every`: which
# checkpoints exist (resuming from any of them is exact); `max_memory`: a CUDA allocation cap
# (too low fails with out-of-memory, it never changes a result); `n_show_samples`: how many
# samples the pipeline prints. Everything else, thread counts and devices included (they can
# change floating-point rounding), must equal the run's.
RESUME_SAFE_KEYS = frozenset({"output_dir", "resume", "overwrite", "keep_last", "save_every",
                              "max_memory", "n_show_samples"})
_MISSING = object()
_ANY = object()  # a setting without effect unless another one leaves its old value (see below)

# Settings added after run.json's first format, each with the value(s) that do what the versions
# before it did (matched by the last dotted component, like RESUME_SAFE_KEYS). A run.json
# written before a setting existed resumes when the setting holds one of these values now, and
# the refusal of any other value names the one to pass. _ANY: the setting acts only through
# another one listed here (dynamic_sampling_rounds needs dynamic_sampling, overlong_penalty an
# overlong_buffer, lora_alpha a lora_rank; epochs only without max_steps, which configs always
# set then; the arithmetic task's settings need task=arithmetic), so that one decides.
# A new setting goes here in the same change (tests/trainer/test_run_directory.py holds every config
# field to either the first format's names or this registry).
SETTINGS_ADDED: dict[str, tuple[Any, ...]] = {
    "cpu_threads": (None,),  # the stages did not set torch's thread count
    "epochs": (_ANY,),
    "lora_rank": (0,), "lora_alpha": (_ANY,),  # SFT trained every weight
    "quantization": ("none", None), "optimizer": ("adamw",),
    "packing": ("off",), "gradient_checkpointing": (False,), "torch_compile": (False,),
    "task": ("reviews",), "model": (None,),
    "eval_problems": (_ANY,), "curve_every": (_ANY,), "curve_problems": (_ANY,),
    # the RL algorithms: every run was PPO (None: the algorithm's preset, see _preset_resolved)
    "algorithm": ("ppo",), "advantage_norm": ("auto",),
    "advantage_estimator": (None,), "group_size": (None,), "ratio_level": (None,),
    "loss_type": (None,), "loss_normalizer": (None,), "clip_ratio_high": (None,),
    "kl_in_loss": (None,),
    # DAPO's additions (no run sampled again, shaped lengths or masked cut responses before)
    "dynamic_sampling": (False,), "dynamic_sampling_rounds": (_ANY,),
    "overlong_buffer": (0,), "overlong_penalty": (_ANY,), "mask_truncated": (False,),
    # SAPO's gate (no run was SAPO before: its temperatures were unused)
    "sapo_tau_pos": (_ANY,), "sapo_tau_neg": (_ANY,),
    # the pairs' own sampling settings (the pairs were sampled as the RL stage samples: None)
    "pair_temperature": (None,), "pair_top_k": (None,), "pair_top_p": (None,),
}


class RunDirectoryError(ValueError):
    """An output_dir that cannot be used as asked (in use, holds another run, settings changed).
    A ValueError, so the CLI prints it as one `rlhf <stage>: error:` line."""


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _json_plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as it reads back from run.json (tuples -> lists, Paths/enums -> strings)."""
    def default(value: Any) -> Any:
        return value.value if isinstance(value, enum.Enum) else str(value)

    return json.loads(json.dumps(dict(config), default=default))


def _preset_resolved(flat: Mapping[str, Any], key: str, value: Any) -> Any:
    """An RL setting left to its algorithm's preset (None) as the preset's value, so that
    `clip_ratio: null` and `clip_ratio: 0.2` compare equal under PPO (rlhf/rl.py PRESETS; a
    config without `algorithm` predates the others and ran PPO)."""
    from rlhf import rl  # rl imports this module

    name = key.rsplit(".", 1)[-1]
    preset = rl.PRESETS.get(flat.get("algorithm", "ppo"))
    if value is not None or name not in rl.PRESET_KEYS or preset is None:
        return value
    if name == "clip_ratio_high" and preset[name] is None:  # the same as clip_ratio
        sibling = key[: -len(name)] + "clip_ratio"
        return _preset_resolved(flat, sibling, flat.get(sibling))
    return preset[name]


def _with_preset(flat: Mapping[str, Any], key: str, value: Any) -> str:
    """`value` as JSON, and what it resolves to when it leaves the setting to a preset."""
    resolved = _preset_resolved(flat, key, value)
    if resolved == value:
        return json.dumps(value)
    algorithm = flat.get("algorithm", "ppo")
    return f"{json.dumps(value)} (the {algorithm} preset: {json.dumps(resolved)})"


def _cli_value(value: Any) -> str:
    """`value` as a key=value override on the command line reads it back."""
    if isinstance(value, str) and value and " " not in value:
        return value
    return json.dumps(value)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any],
                   ignore: Iterable[str] = RESUME_SAFE_KEYS,
                   presets: Mapping[str, Any] | None = None) -> list[tuple[str, str | None]]:
    """The settings (dotted keys for nested configs) that differ between a run's config `old`
    and `new`, skipping keys that are in `ignore` or whose last component is: one
    `(change, override)` per setting, `change` reading `key: old -> new` and `override` the
    `key=value` that gives the run's value back (None when no value can: a setting this version
    no longer has, or one added without a SETTINGS_ADDED entry).

    A setting `old` predates (`SETTINGS_ADDED`) compares as the value that did what the run did,
    and RL settings left to their algorithm's preset compare as the preset's value; `presets`
    (run.json's, ``preset_values`` of `old` when the run started) are those values as they were
    then, so that a preset changed since is a change too."""
    ignore = set(ignore)
    presets = presets or {}
    flat_old, flat_new = _flatten(_json_plain(old)), _flatten(_json_plain(new))
    changes = []
    for key in [*flat_new, *(k for k in flat_old if k not in flat_new)]:
        name = key.rsplit(".", 1)[-1]
        if name in ignore or key in ignore:
            continue
        before, after = flat_old.get(key, _MISSING), flat_new.get(key, _MISSING)
        if before == after:
            continue
        if after is _MISSING:
            changes.append((f"{key}: {json.dumps(before)} -> (no such setting in this version)",
                            None))
            continue
        legacy = before is _MISSING and name in SETTINGS_ADDED
        olds = SETTINGS_ADDED[name] if legacy else (before,)
        if _ANY in olds:
            continue
        resolved_after = _preset_resolved(flat_new, key, after)
        if any((presets[key] if value is None and key in presets  # the run's own preset
                else _preset_resolved(flat_old, key, value)) == resolved_after
               for value in olds):
            continue
        if legacy:
            shown = f"(not in run.json: before this setting, runs did {json.dumps(olds[0])})"
        elif before is _MISSING:
            shown = "(not set)"
        else:
            shown = _with_preset(flat_old, key, before)
        after_shown = _with_preset(flat_new, key, after)
        changes.append((f"{key}: {shown} -> {after_shown}",
                        None if before is _MISSING and not legacy
                        else f"{key}={_cli_value(olds[0])}"))
    for key, started in presets.items():
        # a setting left to its algorithm's preset then and now, whose preset changed since
        left_to_preset = flat_old.get(key, _MISSING) is None and flat_new.get(key, _MISSING) is None
        if key in ignore or key.rsplit(".", 1)[-1] in ignore or not left_to_preset:
            continue
        now = _preset_resolved(flat_new, key, flat_new[key])
        if now != started:
            changes.append((f"{key}: {_with_preset(flat_new, key, flat_new[key])}, where the "
                            f"run started with {json.dumps(started)} (this version's preset "
                            f"changed)", f"{key}={_cli_value(started)}"))
    return changes


def preset_values(config: Mapping[str, Any]) -> dict[str, Any]:
    """The values the settings ``config`` leaves to its RL algorithm's preset resolve to (dotted
    keys): run.json keeps them, so that a resume under a version whose preset changed says so
    instead of continuing with the new value."""
    from rlhf import rl  # rl imports this module

    flat = _flatten(_json_plain(config))
    return {key: _preset_resolved(flat, key, value) for key, value in flat.items()
            if value is None and key.rsplit(".", 1)[-1] in rl.PRESET_KEYS}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class _RunLock:
    """An exclusive, non-blocking flock on `<directory>/.lock`, which records its holder."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock (documented limitation)
            warnings.warn("no fcntl on this platform: the output_dir is not locked against "
                          "a second run", stacklevel=3)
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise RunDirectoryError(
                f"output_dir {str(self.path.parent)!r} is in use by another run ({holder}); "
                f"two runs in one directory would mix their checkpoints and metrics. Wait for "
                f"it to finish (or stop it), or use another output_dir=...") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _busy_subdirectories(directory: Path) -> list[str]:
    """Holders of the run locks below `directory` that are held now (a stage running in a
    subfolder of the directory a pipeline is about to clean or clear)."""
    try:
        import fcntl
    except ImportError:
        return []
    busy = []
    for root, _dirs, files in os.walk(directory):
        if LOCK_FILE not in files or Path(root) == directory:
            continue
        try:
            fd = os.open(Path(root) / LOCK_FILE, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            busy.append(f"{root} ({_describe_holder(fd)})")
        finally:
            os.close(fd)  # also releases the shared lock just taken
    return busy


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "its details are not written yet"
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: "
            f"{info.get('command')}")


@dataclass
class RunDirectory:
    """An output_dir opened by `open_run`: locked, its manifest checked or written.

    directory: the output_dir; kind: "sft", "rm", "ppo" or "pipeline"; run_id: the id in
    run.json that the run's checkpoints (and the pipeline's stage summaries) carry; resumed:
    True when this start continues a run that run.json describes.
    """

    directory: Path
    kind: str
    run_id: str
    resumed: bool

    def resume_checkpoint(self, root: str | Path) -> tuple[Path | None, dict[str, Any] | None]:
        """The latest checkpoint under `root` and its state, or (None, None) when there is none.
        RunDirectoryError when it belongs to another run (another run id, or none). Under
        torchrun rank 0 reads it and sends it to the others (rlhf/distributed.py): other nodes
        need no shared disk, and every rank resumes from the same state."""
        from rlhf import distributed

        return distributed.broadcast_from_main(lambda: self._read_checkpoint(root))

    def _read_checkpoint(self, root: str | Path) -> tuple[Path | None, dict[str, Any] | None]:
        last = latest_checkpoint(root)
        if last is None:
            logged = Path(root).parent / "metrics.jsonl"
            if self.resumed and logged.is_file() and logged.stat().st_size:
                # the run logged steps but left no checkpoint (save_every=0 or not reached,
                # and a kill that saved none): it starts over, which went without a word
                print(f"[{self.kind}] --resume: {self.directory} holds no checkpoint yet "
                      f"(the run was stopped before its first one), so the run starts again "
                      f"from its first step")
            return None, None
        state = load_state(last)
        self.check_run_id(state.get("run_id"), str(last))
        return last, state

    def check_run_id(self, run_id: Any, what: str) -> None:
        if run_id != self.run_id:
            raise RunDirectoryError(
                f"{what} was written by another run (run id {run_id!r}, this run is "
                f"{self.run_id!r} per {self.directory / MANIFEST_FILE}); resuming must not mix "
                f"runs. Start a new run: a new output_dir=..., or overwrite=true to replace "
                f"{str(self.directory)!r}")


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RunDirectoryError(f"{str(path)!r} is not a readable run manifest ({error}); "
                                f"start a new run: a new output_dir=..., or overwrite=true to "
                                f"replace this one") from None
    if not (isinstance(manifest, dict) and isinstance(manifest.get("config"), dict)
            and isinstance(manifest.get("run_id"), str)):
        raise RunDirectoryError(f"{str(path)!r} is not a run manifest of this trainer (no "
                                f"run_id/config); start a new run: a new output_dir=..., or "
                                f"overwrite=true to replace this one")
    return manifest


def _is_data_key(key: str) -> bool:
    name = key.rsplit(".", 1)[-1]
    return name == "dataset" or name.endswith("_dataset")


def _fingerprint(path: Path) -> dict[str, Any]:
    """{"bytes", "sha256"} of a local data file, or of a data folder (a ``save_to_disk``
    dataset: every file under it, by relative path, size and content)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    total = 0
    for file in files:
        if file is not path:
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
                total += len(block)
    return {"bytes": total, "sha256": digest.hexdigest()}


def data_fingerprints(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The content fingerprint of every local data file or folder the config names (settings
    ``dataset`` / ``*_dataset``; a hub name or None has none), keyed by the dotted setting.
    run.json keeps them, so that a resume can tell that the data changed in between."""
    prints = {}
    for key, value in _flatten(config).items():
        if _is_data_key(key) and isinstance(value, str) and value:
            path = Path(value).expanduser()
            if path.is_file() or path.is_dir():
                prints[key] = {"path": value, **_fingerprint(path)}
    return prints


def _is_model_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("model", "tokenizer")


# A model directory is fingerprinted from samples: its files' names and sizes, every file up to
# MODEL_FULL_HASH_BYTES whole (configs, tokenizers, adapters, small weights), and of a larger
# one MODEL_SAMPLES blocks of MODEL_SAMPLE_BYTES spread evenly over it (the header included).
# Weights trained further or otherwise differ almost everywhere, so a sample sees it, while a
# 15 GB base costs ~4 MiB of reads at each start (reading all of it took minutes on a network
# disk).
MODEL_FULL_HASH_BYTES = 16 << 20
MODEL_SAMPLES, MODEL_SAMPLE_BYTES = 64, 64 << 10


def _model_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != LOCK_FILE
                  and not TEMP_NAME_PATTERN.match(p.name))


def _sampled_digest(digest, path: Path) -> int:
    total = 0
    for file in _model_files(path):
        size = file.stat().st_size
        name = file.name if file == path else str(file.relative_to(path))
        digest.update(f"{name}\0{size}\0".encode())
        with file.open("rb") as handle:
            if size <= MODEL_FULL_HASH_BYTES:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            else:
                for i in range(MODEL_SAMPLES):
                    handle.seek((size - MODEL_SAMPLE_BYTES) * i // (MODEL_SAMPLES - 1))
                    digest.update(handle.read(MODEL_SAMPLE_BYTES))
        total += size
    return total


def _model_fingerprint(path: Path) -> dict[str, Any]:
    """{"bytes", "sha256"} of a local model or tokenizer directory (or file), sampled (see
    MODEL_FULL_HASH_BYTES). A saved backbone (rlhf/backbone.py: roles.json) holds adapters and
    heads and names its base model, which a resume loads again: a local base counts too
    ("base": its path), so that an SFT model retrained at that path changes the fingerprint."""
    digest = hashlib.sha256()
    total = _sampled_digest(digest, path)
    prints: dict[str, Any] = {}
    roles = path / "roles.json"
    if path.is_dir() and roles.is_file():
        try:
            info = json.loads(roles.read_text())
        except (OSError, ValueError):
            info = {}
        base = info.get("base_model") if isinstance(info, dict) else None
        if isinstance(base, str) and base and not info.get("base_saved"):
            base_path = Path(base).expanduser()
            if base_path.is_dir() and base_path.resolve() != path.resolve():
                digest.update(b"base\0" + base.encode() + b"\0")
                total += _sampled_digest(digest, base_path)
                prints["base"] = base
    return {"bytes": total, "sha256": digest.hexdigest(), **prints}


def _backbone_base(path: Path) -> str | None:
    """The local base model a saved backbone names (roles.json's base_model), else None."""
    try:
        info = json.loads((path / "roles.json").read_text())
    except (OSError, ValueError):
        return None
    base = info.get("base_model") if isinstance(info, dict) else None
    if isinstance(base, str) and base and not info.get("base_saved") and \
            Path(base).expanduser().is_dir():
        return base
    return None


def _read_paths(config: Mapping[str, Any]) -> list[tuple[str, str, Path]]:
    """(what, kind, path) of every local model, tokenizer or data file or folder the config
    names (a saved backbone's local base model too): what the run reads."""
    paths = []
    for key, value in _flatten(config).items():
        is_model = _is_model_key(key)
        if not ((is_model or _is_data_key(key)) and isinstance(value, str) and value):
            continue
        path = Path(value).expanduser()
        if not path.exists():
            continue
        kind = "a model directory" if is_model else \
            "a data folder" if path.is_dir() else "a data file"
        paths.append((f"{key}={value!r}", kind, path))
        base = _backbone_base(path) if is_model and path.is_dir() else None
        if base is not None:
            paths.append((f"the base model {base!r} of {key}={value!r}", "a model directory",
                          Path(base).expanduser()))
    return paths


def _refuse_output_in_a_model(directory: Path, config: Mapping[str, Any]) -> None:
    """RunDirectoryError when ``directory`` (output_dir) is a local model, tokenizer or data
    directory the config names, or lies inside one (a saved backbone's base model counts).
    The run would write its checkpoints, metrics and model into a folder it reads, whose
    fingerprint (every file under it) then changes: its own --resume, and that of every run
    on that model, was refused as "the model (data) changed since the run started" (and a
    data folder's next read took the run's metrics.jsonl for data)."""
    out = directory.expanduser().resolve()
    for what, kind, read_dir in _read_paths(config):
        if not read_dir.is_dir():
            continue
        read_dir = read_dir.resolve()
        if out == read_dir or read_dir in out.parents:
            where = "is" if out == read_dir else "is inside"
            raise RunDirectoryError(
                f"output_dir {str(directory)!r} {where} {what}, {kind} the run reads: the "
                f"run would write its checkpoints, metrics and saved model into that "
                f"folder, which would then no longer hold what the run started from (a "
                f"--resume of this run, or of any run on it, would be refused as changed); "
                f"choose an output_dir outside {str(read_dir)!r}")


def _refuse_deleting_what_the_run_reads(directory: Path, names: Sequence[str],
                                        config: Mapping[str, Any]) -> None:
    """RunDirectoryError when ``overwrite=true`` would delete (``names`` under ``directory``) a
    model, tokenizer or data file the run is about to read, e.g. ``rlhf ppo
    model=runs/ppo/backbone output_dir=runs/ppo overwrite=true`` (continue from the policy a
    run trained, in its place): the earlier run's files went first, the model with them, and
    the run then stopped on a model that no longer existed; the trained model was lost."""
    doomed = [(name, (directory / name).resolve()) for name in names]
    for what, kind, path in _read_paths(config):
        path = path.resolve()
        for name, target in doomed:
            if path == target or target in path.parents:
                raise RunDirectoryError(
                    f"overwrite=true would delete {str(directory / name)!r} (a file of the run "
                    f"in output_dir {str(directory)!r}), and {what} is {kind} in it that this "
                    f"run reads: nothing was deleted. Copy or move it out of "
                    f"{str(directory)!r} and point the setting there, or choose another "
                    f"output_dir=...")


def model_fingerprints(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The fingerprint of every local model or tokenizer the config names (settings ``model``
    / ``tokenizer``, nested ones too; a hub name or None has none), keyed by the dotted
    setting. run.json keeps them: the stages after SFT checkpoint only their adapters and
    heads (and LoRA SFT its adapters), and a resume loads the base again from that path, so a
    model retrained or replaced there in between would silently carry on another run."""
    prints: dict[str, dict[str, Any]] = {}
    done: dict[Path, dict[str, Any]] = {}
    for key, value in _flatten(config).items():
        if _is_model_key(key) and isinstance(value, str) and value:
            path = Path(value).expanduser()
            if path.is_file() or path.is_dir():
                resolved = path.resolve()
                if resolved not in done:
                    done[resolved] = _model_fingerprint(path)
                prints[key] = {"path": value, **done[resolved]}
    return prints


def _data_changes(recorded: Mapping[str, Any], config: Mapping[str, Any],
                  fingerprints=None) -> list[str]:
    """The data a resumed run would read that differs from what the run started with: each
    setting whose file or folder run.json fingerprinted and which now holds other content (a
    path that is gone is left to the stage, which says so when it reads it). ``fingerprints``:
    how the config's files are fingerprinted now (``data_fingerprints``, or
    ``model_fingerprints`` for the models run.json recorded)."""
    now = (fingerprints or data_fingerprints)(config)
    changed = []
    for key, before in recorded.items():
        after = now.get(key)
        if after is None or after["path"] != before.get("path"):
            continue  # gone, or another path: the setting comparison speaks for that
        if (after["bytes"], after["sha256"]) != (before.get("bytes"), before.get("sha256")):
            changed.append(f"{key}: {after['path']!r} ({before.get('bytes')} -> "
                           f"{after['bytes']} bytes, other content)")
    return changed


def _holds_something(path: Path) -> bool:
    """A file, or a non-empty directory (an empty one has nothing to mix with or lose)."""
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return path.exists() or path.is_symlink()


def _clear(directory: Path, names: Sequence[str]) -> None:
    for name in names:
        target = directory / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    # the stage folders of a pipeline, when nothing else is in them
    for parent in sorted({(directory / name).parent for name in names}, reverse=True):
        if parent != directory and parent.is_dir():
            with contextlib.suppress(OSError):
                leftovers = [p for p in parent.iterdir() if p.name != LOCK_FILE]
                if not leftovers:
                    (parent / LOCK_FILE).unlink(missing_ok=True)
                    parent.rmdir()


_BACKEND_ENV = "RLHF_KERNELS_BACKEND"


def _kernels_backend() -> str:
    """The kernels' backend the run computes with, as the environment asks for it (unset:
    "auto"; rlhf_kernels/backend.py), kept in run.json so that a resume can tell."""
    return os.environ.get(_BACKEND_ENV, "auto").strip().lower() or "auto"


def _auto_device(config: Mapping[str, Any]) -> str | None:
    """What ``device: auto`` (the config's top-level device) is on this machine: "cuda" when a
    GPU is visible, else "cpu" (as stage.resolve_device resolves it); None for another device,
    which the settings comparison covers."""
    if config.get("device") != "auto":
        return None
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def open_run(directory: str | Path, kind: str, config: Mapping[str, Any], *, resume: bool,
             overwrite: bool = False, run_files: Sequence[str] = STAGE_RUN_FILES,
             resume_safe: Iterable[str] = RESUME_SAFE_KEYS,
             reads_data: bool = True) -> Iterator[RunDirectory]:
    """Own `directory` for one run (see the module docstring); yields a RunDirectory.

    ``reads_data=False``: the run does not read the data files (nor the models) its config
    names (the caller gave it the rows and the model, as the pipeline gives its stages), so
    none is fingerprinted or compared here; whoever read them does that (the pipeline's own
    run.json), and each file is hashed once per start, not once by the pipeline and again by
    the stage.

    Under torchrun (rlhf/distributed.py) rank 0 alone takes the lock and checks or writes the
    manifest; the other ranks get its RunDirectory (or its error), and on a normal exit every
    rank waits for the others, so rank 0's files are complete when any rank moves on.
    """
    from rlhf import distributed

    if not distributed.is_distributed():
        with _open_run(directory, kind, config, resume=resume, overwrite=overwrite,
                       run_files=run_files, resume_safe=resume_safe,
                       reads_data=reads_data) as run:
            yield run
        return
    with contextlib.ExitStack() as stack:
        run = distributed.broadcast_from_main(lambda: stack.enter_context(_open_run(
            directory, kind, config, resume=resume, overwrite=overwrite, run_files=run_files,
            resume_safe=resume_safe, reads_data=reads_data)))
        yield run
        distributed.barrier()


@contextlib.contextmanager
def _open_run(directory: str | Path, kind: str, config: Mapping[str, Any], *, resume: bool,
              overwrite: bool = False, run_files: Sequence[str] = STAGE_RUN_FILES,
              resume_safe: Iterable[str] = RESUME_SAFE_KEYS,
              reads_data: bool = True) -> Iterator[RunDirectory]:
    """open_run in this process alone.

    Takes the lock (RunDirectoryError when another run holds it), removes temp files of killed
    writers, then:
    - resume=True: with run.json, the run's kind and every setting but `resume_safe` must match
      (else RunDirectoryError listing each change); without run.json, an empty directory starts
      afresh and one holding `run_files` is refused (nothing ties them to a run or settings).
    - resume=False: a directory holding any of `run_files` is refused unless overwrite=True,
      which deletes exactly those first; then a new run.json is written.
    The lock is released when the block exits (also on errors and Ctrl-C).
    """
    directory = Path(directory)
    if resume and overwrite:
        raise RunDirectoryError("resume=true and overwrite=true contradict each other: resume "
                                "continues the run in output_dir, overwrite deletes it")
    if reads_data:
        _refuse_output_in_a_model(directory, config)
    lock = _RunLock(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except RunDirectoryError:
        raise
    except OSError as error:  # read-only, a file in the way, no permission, ...
        raise RunDirectoryError(
            f"cannot use output_dir {str(directory)!r}: {error.strerror or error} "
            f"({error.filename or directory}); choose a writable directory with "
            f"output_dir=...") from None
    try:
        busy = _busy_subdirectories(directory)
        if busy:
            raise RunDirectoryError(
                f"output_dir {str(directory)!r} holds a folder another run is using: "
                f"{'; '.join(busy)}. Wait for it to finish (or stop it), or use another "
                f"output_dir=...")
        removed = remove_stale_temps(directory)
        if removed:
            print(f"[{kind}] removed {len(removed)} temp file(s) left by an interrupted run in "
                  f"{directory}")
        manifest = _read_manifest(directory)
        present = [name for name in run_files if _holds_something(directory / name)]
        shown = ", ".join(present[:6]) + (", ..." if len(present) > 6 else "")
        if not [name for name in present if Path(name).name != MANIFEST_FILE]:
            # a run that stopped before it wrote anything (e.g. a typo in the model path):
            # nothing to continue, mix with or lose, so it is simply started afresh
            manifest, present = None, []
        if resume and manifest is not None:
            if manifest.get("kind") != kind:
                raise RunDirectoryError(
                    f"output_dir {str(directory)!r} holds a {manifest.get('kind')!r} run, not "
                    f"a {kind!r} one; give the {kind} run its own output_dir=...")
            changes = config_changes(manifest["config"], config, resume_safe,
                                     manifest.get("presets"))
            if changes:
                overrides = [override for _, override in changes if override is not None]
                how = (f"Resume with the run's settings (add `{' '.join(overrides)}` to the "
                       f"command)" if len(overrides) == len(changes) else
                       "This version cannot give back every setting of the run (see above); "
                       "finish it with the version that started it")
                raise RunDirectoryError(
                    f"--resume of {str(directory)!r} with settings that differ from the run's "
                    f"(run.json): {'; '.join(change for change, _ in changes)}. A resumed run "
                    f"must keep its settings, or its results would mix both. {how}, or start "
                    f"a new run with the new ones: a new output_dir=..., or overwrite=true to "
                    f"replace this run")
            data_changed = _data_changes(manifest.get("data", {}), config) if reads_data \
                else []
            if data_changed:
                raise RunDirectoryError(
                    f"--resume of {str(directory)!r}: the data changed since the run started: "
                    f"{'; '.join(data_changed)}. A resumed run would train its second part on "
                    f"other data than its first. Put the run's data back, or start a new run "
                    f"with this data: a new output_dir=..., or overwrite=true to replace this "
                    f"run")
            models_changed = _data_changes(manifest.get("models", {}), config,
                                           model_fingerprints) if reads_data else []
            if models_changed:
                raise RunDirectoryError(
                    f"--resume of {str(directory)!r}: the model changed since the run started: "
                    f"{'; '.join(models_changed)}. The run's checkpoints hold what it trained "
                    f"on top of that model (adapters, heads), and a resume loads the model "
                    f"again from there: its second part would continue on another model than "
                    f"its first. Put the run's model back, or start a new run on this model: "
                    f"a new output_dir=..., or overwrite=true to replace this run")
            started_on, here = manifest.get("auto_device"), _auto_device(config)
            if started_on is not None and here is not None and started_on != here:
                # `device: auto` compares equal, but it ran on another device type: a GPU's
                # bf16 autocast and kernels, or the CPU's fp32, for the second part of the run
                how = ("hide the GPUs from it (`CUDA_VISIBLE_DEVICES= rlhf ... --resume`)"
                       if started_on == "cpu" else "resume it on a machine with a GPU")
                raise RunDirectoryError(
                    f"--resume of {str(directory)!r}: the run started with device=auto on "
                    f"{started_on}, and device=auto is {here} on this machine; its second part "
                    f"would compute on another device than its first (other kernels, and "
                    f"bf16 autocast on a GPU with bf16=true), so its results would mix both. "
                    f"To continue it on {started_on}, {how}; or start a new run: a new "
                    f"output_dir=..., or overwrite=true to replace this run")
            started_with, now_with = manifest.get("kernels_backend"), _kernels_backend()
            if started_with is not None and started_with != now_with:
                # not refused: every backend computes the same function (tested against the
                # float64 reference), but in other roundings, so the resumed part is not the
                # bit-for-bit continuation a resume otherwise is
                # (one message for the pipeline and each of its stages: shown once)
                warnings.warn(
                    f"--resume: the run ran with {_BACKEND_ENV}={started_with} and "
                    f"continues with {_BACKEND_ENV}={now_with}; what it computes from here "
                    f"rounds differently from an uninterrupted run (the same function, other "
                    f"kernels). For the bit-for-bit continuation, resume with "
                    f"{_BACKEND_ENV}={started_with}", RuntimeWarning, stacklevel=3)
            manifest["kernels_backend"] = now_with  # the latest part's
            manifest.setdefault("resumed", []).append(_now())
            atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
            run = RunDirectory(directory, kind, manifest["run_id"], resumed=True)
        else:
            if present and resume:
                raise RunDirectoryError(
                    f"--resume: output_dir {str(directory)!r} holds run files ({shown}) but no "
                    f"{MANIFEST_FILE}, so nothing says which run or settings made them (an "
                    f"older version's run?). Start a new run: a new output_dir=..., or "
                    f"overwrite=true to delete them")
            if present and not overwrite:
                raise RunDirectoryError(
                    f"output_dir {str(directory)!r} already holds a run ({shown}); a new run "
                    f"there would mix with it. Continue that run with --resume, choose a new "
                    f"output_dir=..., or replace it with overwrite=true (deletes those files "
                    f"first)")
            if present:
                _refuse_deleting_what_the_run_reads(directory, present, config)
                _clear(directory, present)
            manifest = {"format": 1, "kind": kind, "run_id": uuid.uuid4().hex,
                        "created": _now(), "host": socket.gethostname(),
                        "command": " ".join(sys.argv), "config": _json_plain(config),
                        "data": data_fingerprints(config) if reads_data else {},
                        "models": model_fingerprints(config) if reads_data else {},
                        "presets": preset_values(config)}
            if _auto_device(config) is not None:  # the device type device=auto ran on
                manifest["auto_device"] = _auto_device(config)
            manifest["kernels_backend"] = _kernels_backend()
            atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
            run = RunDirectory(directory, kind, manifest["run_id"], resumed=False)
        yield run
    finally:
        lock.release()
