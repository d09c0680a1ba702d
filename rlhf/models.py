"""One Hugging Face backbone, four roles: the names of the modules it is built from, in one place.

``from rlhf.models import SharedBackbone, LoraSpec, load_causal_lm`` keeps working as it did when
this was one module; the code lives in the modules named for their job:

* rlhf/backbone.py   ``SharedBackbone``: the roles (policy, critic, reward, reference = adapters
                     off), their forwards, role-aware checkpointing, the reward-model plug-in,
                     merging, save / load; ``check_tokenizer``, ``ROLES``
* rlhf/adapters.py   ``LoraSpec`` and the adapters on PEFT's layers: switching them without
                     touching ``requires_grad``, copying one into another, checkpointing with them
* rlhf/loading.py    ``resolve_pretrained``, ``hub_offline_reason``, ``load_tokenizer``,
                     ``load_causal_lm`` (incl. bitsandbytes-quantized bases)
* rlhf/layout.py     the padded ``(B, T)`` batch: positions counting real tokens, the last real
                     token, the shared-prompt forward
* rlhf/memory.py     ``ModelShape``, ``estimate_memory``, ``memory_table_markdown`` (docs/memory.md)

Code that looks a name up at call time, and a test that patches one, use the module that holds
it (``rlhf.loading.load_causal_lm``): a name set here would not reach the code that reads it
there.
"""

from __future__ import annotations

# every name below is re-exported (the names other modules and tests import from here)
# ruff: noqa: F401
from rlhf.adapters import LoraSpec, _quiet_peft
from rlhf.backbone import (
    CHECKPOINT_FORMAT,
    IGNORE_INDEX,
    ROLES,
    SharedBackbone,
    check_tokenizer,
)
from rlhf.layout import _position_ids
from rlhf.loading import (
    HUB_PROBE_TIMEOUT_S,
    _in_hub_cache,
    hub_offline_reason,
    load_causal_lm,
    load_tokenizer,
    resolve_pretrained,
)
from rlhf.memory import (
    LLAMA_3_8B,
    QWEN2_5_1_5B,
    SETUPS,
    ModelShape,
    estimate_memory,
    memory_table_markdown,
)

__all__ = [
    "ROLES",
    "LoraSpec",
    "SharedBackbone",
    "check_tokenizer",
    "hub_offline_reason",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_pretrained",
    "ModelShape",
    "QWEN2_5_1_5B",
    "LLAMA_3_8B",
    "estimate_memory",
    "memory_table_markdown",
]


if __name__ == "__main__":  # python -m rlhf.models: the table of docs/memory.md
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(lambda: print(memory_table_markdown())))
