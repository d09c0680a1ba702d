"""The roles' LoRA adapters on PEFT's layers: their spec, switching them, checkpointing with them.

``LoraSpec`` is the rank / alpha / dropout / targets every role's adapter shares. Running a role
means activating its adapter on every LoRA layer. PEFT's own switches (``set_adapter``,
``disable_adapter``) also flip ``requires_grad`` of the adapter weights, and autograd silently
drops the gradient of a leaf whose ``requires_grad`` was turned off between the forward and the
backward; ``switch`` sets each layer's active adapter directly where the layers are PEFT's stock
tuner layers (``direct_switch_works``) and otherwise calls PEFT's switch, after which the caller
puts its own ``requires_grad`` set back. ``role_aware_checkpoint`` makes a decoder layer's
backward-time recomputation run with the adapter its forward ran with. ``SharedBackbone``
(rlhf/backbone.py) holds the roles and calls these.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from rlhf.backbone import SharedBackbone


@dataclass
class LoraSpec:
    """LoRA hyper-parameters shared by every role's adapter.

    ``target_modules=None`` targets every attention and MLP linear of the backbone (PEFT's
    ``"all-linear"``, which leaves the lm_head out; the lm_head must stay a plain weight for
    ``linear_logprobs``).
    """

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraSpec.rank must be a positive int, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoraSpec.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)
            if any(name in ("lm_head", "embed_out", "output") for name in self.target_modules):
                raise ValueError(
                    f"LoraSpec.target_modules={self.target_modules} includes the lm_head; the "
                    "lm_head must stay a plain weight (token_logprobs reads it for "
                    "linear_logprobs). Target attention/MLP linears only, or None for all of them."
                )

    def peft_config(self, causal_lm: nn.Module):
        """The ``peft.LoraConfig`` for ``causal_lm`` (GPT-2's Conv1D layers need fan_in_fan_out)."""
        from peft import LoraConfig
        from transformers.pytorch_utils import Conv1D

        uses_conv1d = any(isinstance(m, Conv1D) for m in causal_lm.modules())
        self.check_rank(causal_lm)
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules if self.target_modules else "all-linear",
            fan_in_fan_out=uses_conv1d,
            bias="none",
        )


    def check_rank(self, causal_lm: nn.Module) -> None:
        """Refuse a rank above every adapted layer's own (min of its in and out features): such
        an adapter is larger than the layer's full-weight update, and lora_rank=100000 on a
        small model allocated for minutes (or ran out of memory with a traceback) instead."""
        output = causal_lm.get_output_embeddings() if hasattr(
            causal_lm, "get_output_embeddings") else None
        targets = set(self.target_modules or ())
        widest = max((min(m.in_features, m.out_features)
                      for name, m in causal_lm.named_modules()
                      if isinstance(m, nn.Linear) and m is not output
                      and (not targets or name.rsplit(".", 1)[-1] in targets)), default=None)
        if widest is not None and self.rank > widest:
            raise ValueError(f"lora_rank={self.rank} is more than the rank of any layer it "
                             f"adapts (at most {widest} in this model: the smaller of a layer's "
                             f"input and output sizes), so its adapters are larger than the "
                             f"full-weight update; use lora_rank={widest} or less (16 to 64 is "
                             f"usual)")


def find_lora_layers(module: nn.Module) -> list[nn.Module]:
    """PEFT's tuner layers (the adapted linears) under ``module``, in module order."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def adapter_parameters(layers: Iterable[nn.Module], role: str):
    """The parameters of ``role``'s adapter on ``layers`` (A and B of every adapted linear)."""
    for layer in layers:
        for attr in layer.adapter_layer_names:
            per_adapter = getattr(layer, attr)
            if role in per_adapter:
                entry = per_adapter[role]
                yield from (entry.parameters() if isinstance(entry, nn.Module) else (entry,))


def switch(layers: Iterable[nn.Module], role: str | None, direct: bool) -> None:
    """Activate ``role``'s adapter (None: disable all) on ``layers``.

    PEFT's ``set_adapter`` / ``enable_adapters`` set two attributes of the layer, the active
    adapter names and the disabled flag, and flip requires_grad of every adapter weight, which
    the caller must then put back. At 168 adapted linears (Qwen2.5-0.5B) that took 14 ms of host
    CPU time per switch (``benchmarks/host_trainer.py``), and an RL iteration switches roles
    about seven times. ``direct`` (where ``direct_switch_works``): the two attributes are set
    directly, the same state, requires_grad never touched.
    """
    if direct:
        for layer in layers:
            if role is not None:
                layer._active_adapter = [role]
            layer._disable_adapters = role is None
        return
    for layer in layers:
        if role is None:
            layer.enable_adapters(False)
        else:
            layer.set_adapter(role)
            if layer.disable_adapters:
                layer.enable_adapters(True)


def copy_adapter(layers: Iterable[nn.Module], source: str, target: str) -> None:
    """Copy adapter ``source``'s weights into adapter ``target`` on every layer holding both."""
    for layer in layers:
        for attr in layer.adapter_layer_names:
            per_adapter = getattr(layer, attr)
            if source in per_adapter and target in per_adapter:
                src, dst = per_adapter[source], per_adapter[target]
                if isinstance(src, nn.Module):
                    dst.load_state_dict(src.state_dict())
                else:
                    dst.copy_(src)



@contextmanager
def _quiet_peft():
    """PEFT asks transformers ``is_gradient_checkpointing``, deprecated in transformers 5.2x."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        yield


def direct_switch_works(layers: list[nn.Module], role: str) -> bool:
    """Whether ``switch`` may set the layers' active adapter and disabled flag directly.
    ``layers`` were just switched to ``role`` by PEFT itself. Yes when every layer runs PEFT's
    own ``set_adapter`` and ``enable_adapters`` of ``BaseTunerLayer`` (no subclass adds work to
    them), keeps the two as plain instance attributes (what those methods assign), and reads
    them back through the public ``active_adapters`` / ``disable_adapters``."""
    import inspect

    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in layers:
        cls = type(layer)
        if cls.set_adapter is not BaseTunerLayer.set_adapter \
                or cls.enable_adapters is not BaseTunerLayer.enable_adapters:
            return False
        for name in ("_active_adapter", "_disable_adapters"):
            if isinstance(inspect.getattr_static(cls, name, None), property) \
                    or name not in vars(layer):
                return False
        if layer.active_adapters != [role] or layer.disable_adapters is not False:
            return False
    return True


def role_aware_checkpoint(backbone: SharedBackbone, layer_loras: list[nn.Module],
                          checkpoint_func: Callable) -> Callable:
    """Wrap a decoder layer's checkpoint function so that its backward-time recomputation runs
    with the role that was active during its forward, not the one active at backward time."""
    backbone_ref = weakref.ref(backbone)  # the layer must not keep the backbone alive

    def checkpoint_with_role(function, *args, **kwargs):
        owner = backbone_ref()
        if owner is None:  # the backbone is gone; the bare model checkpoints as usual
            return checkpoint_func(function, *args, **kwargs)
        forward_role = owner._active_role

        def run_with_forward_role(*inner_args, **inner_kwargs):
            if owner._active_role == forward_role:
                return function(*inner_args, **inner_kwargs)
            owner._switch(layer_loras, forward_role)
            try:
                return function(*inner_args, **inner_kwargs)
            finally:
                owner._switch(layer_loras, owner._active_role)

        return checkpoint_func(run_with_forward_role, *args, **kwargs)

    checkpoint_with_role._role_aware = True
    checkpoint_with_role._inner = checkpoint_func
    return checkpoint_with_role
