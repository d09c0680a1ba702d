"""Seeds derived from a run's ``seed``: every random draw of the trainer comes from one of them.

The trainer never relies on the state of torch's global RNG, because that state depends on what
ran before in the process: a pipeline that trains the SFT model draws differently from one that
resumes and loads it, so anything initialised from the global RNG afterwards (adapters, heads)
would differ, and a resumed run would not reproduce the uninterrupted one. Instead each purpose
(the LoRA adapters, the heads, ...) gets its own seed, a pure function of the run's seed and a
name, and draws inside ``seeded(...)`` or from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["derived_seed", "seeded"]


def derived_seed(seed: int, *purpose: str | int) -> int:
    """A 63-bit seed for ``purpose`` (e.g. ``("adapters",)``), a pure function of ``seed`` and
    ``purpose``: the same on every run and machine, unrelated between different purposes."""
    text = ":".join(str(part) for part in (int(seed), *purpose))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with torch's global RNG (CPU and every initialised CUDA device) seeded with
    ``seed``, and restore the caller's RNG state afterwards: for library code (PEFT's adapter
    initialisation) that can only draw from the global RNG."""
    devices = (list(range(torch.cuda.device_count()))
               if torch.cuda.is_available() and torch.cuda.is_initialized() else [])
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for device in devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield
