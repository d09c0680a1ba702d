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
moves the old one aside first and deletes it after the new one is in place.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_text",
    "capture_rng_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_state",
    "prune_checkpoints",
    "restore_rng_state",
    "save_checkpoint",
    "save_pretrained_atomic",
    "save_state",
]

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
STATE_FILE, META_FILE, MODELS_DIR, TOKENIZER_DIR = "state.pt", "meta.json", "models", "tokenizer"


# ----------------------------------------------------------------------------------------------
# atomic files and directories
# ----------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory + fsync + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as temp_file:
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
    temp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield temp
        _fsync_tree(temp)
        if path.exists():
            # os.replace cannot replace a non-empty directory: move the old one aside first;
            # hidden names are ignored by latest_checkpoint, so readers never see a partial one.
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, aside / path.name)
            os.replace(temp, path)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(temp, path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


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
    torch.save(rest, directory / STATE_FILE)
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
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    for file in sorted(directory.glob("*.safetensors")):
        state[file.name[: -len(".safetensors")]] = load_file(str(file))
    return state


def save_state(directory: str | Path, **state: Any) -> Path:
    """Write a checkpoint directory atomically; returns its path.

    Each keyword whose value is a non-empty {name: tensor} dict goes to `<key>.safetensors`;
    the rest (optimizer/scheduler state dicts, step, RNG state, config dicts) to `state.pt`.
    """
    directory = Path(directory)
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
    """`model.save_pretrained` (+ tokenizer) into `directory`, atomically (Hugging Face format)."""
    directory = Path(directory)
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
    """Delete all but the newest `keep` checkpoints (keep >= 1); returns the deleted paths."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the latest checkpoint is needed to resume), "
                         f"got {keep}")
    old = list_checkpoints(root)[:-keep]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


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
