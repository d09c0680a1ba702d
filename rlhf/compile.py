"""Regional ``torch.compile`` of the decoder layers, for the training steps of every stage.

A PPO update step of a small model is bound by the host, not by the GPU: one step at the
Qwen2.5-0.5B shape (policy and value losses, forward and backward, gradient checkpointing)
dispatches about 30,000 aten ops, and the H200 profile had the GPU busy a fifth of the update.
Compiling the whole model costs minutes of compile time per variant (each role, train and eval,
each new sequence length) and breaks its graph at every host read. Every decoder layer of a
model runs the same code, so the layer's forward is compiled once, as a function of the layer
(the "regional compilation" recipe of PyTorch): with ``inline_inbuilt_nn_modules`` (the default
since torch 2.5) the layer's weights are inputs of the graph, and one compiled graph serves every
layer of the stack. Compile time is that of one layer per variant, whatever the depth.

``CompiledLayers(causal_lm)`` finds the decoder layers and compiles their forward lazily; inside
``with compiled.active():`` each layer's ``forward`` is the compiled one, outside it the module
is untouched. ``layers_context`` gives a stage that context (or none, with the setting off): the
RL stage (``torch_compile=true``) scores and updates inside it, SFT and the reward stage run each
micro-batch's forward and backward (and the reward stage its evaluation) inside it; the rollout
engine's decode step (a CUDA graph of its own) and saving see plain layers. Role switches of
the shared backbone are guards of the graph: a layer run with the policy adapter and one run
with the critic's are two compiled variants, each compiled on its first call. Gradient
checkpointing works through it: the recomputation calls the compiled forward again.

If compiling fails (no C++ compiler for the CPU backend, an op the compiler does not support),
the layer call that failed runs eagerly, every later one too, and one warning says why; an
error that the eager forward raises as well is the error raised.

Measured by ``benchmarks/host_trainer.py`` (CPU time of one update step at the Qwen2.5-0.5B
depth and adapter layout, narrow widths): see benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["CompiledLayers", "decoder_layers", "layers_context"]

# Each compiled variant is one entry of the layer forward's cache: roles (policy, critic,
# reward, reference), training or scoring, the first layer of a training forward (an input that
# needs no gradient) apart; shapes are dynamic from the first call.
_RECOMPILE_LIMIT = 32
DEFAULT_BACKEND = "inductor"
# A layer called with a key/value cache (the shared-prompt forwards of a group, rlhf/backbone.py)
# runs eagerly: the cache's per-layer state would be a guard of the graph, so each layer of the
# stack would compile a variant of its own.
_CACHES = ("past_key_values", "past_key_value", "cache")


def decoder_layers(causal_lm: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face causal LM: the modules whose class is named in its
    ``_no_split_modules`` (each model's list of decoder-layer classes), else the longest
    ``nn.ModuleList`` of modules of one class. A ValueError when there is none."""
    names = set(getattr(causal_lm, "_no_split_modules", None) or ())
    layers = [m for m in causal_lm.modules() if type(m).__name__ in names]
    if layers:
        return layers
    best: list[nn.Module] = []
    for module in causal_lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) \
                and len({type(m) for m in module}) == 1:
            best = list(module)
    if not best:
        raise ValueError(f"{type(causal_lm).__name__} has no repeated decoder layers to compile "
                         f"(no _no_split_modules, no ModuleList of one layer class)")
    return best


class CompiledLayers:
    """The decoder layers of ``causal_lm`` with their forward compiled, inside ``active()``.

    backend: ``torch.compile``'s backend (default ``DEFAULT_BACKEND``, "inductor": generated
    kernels; "aot_eager": traced and differentiated by AOTAutograd but run eagerly, for tests).
    The first call of each variant compiles it (seconds per variant).
    """

    def __init__(self, causal_lm: nn.Module, backend: str | None = None) -> None:
        self.layers = decoder_layers(causal_lm)
        self.backend = backend or DEFAULT_BACKEND
        self.failed: str | None = None  # why compiling failed (the layers then run eagerly)
        self._compiled: dict[type, object] = {}
        limit = getattr(torch._dynamo.config, "recompile_limit", None)
        if limit is not None and limit < _RECOMPILE_LIMIT:
            torch._dynamo.config.recompile_limit = _RECOMPILE_LIMIT

    def _compiled_forward(self, cls: type):
        compiled = self._compiled.get(cls)
        if compiled is None:
            compiled = torch.compile(cls.forward, backend=self.backend, dynamic=True)
            self._compiled[cls] = compiled
        return compiled

    def _call(self, layer: nn.Module, eager, *args, **kwargs):
        if self.failed is not None or any(kwargs.get(name) is not None for name in _CACHES):
            return eager(*args, **kwargs)
        compiled = self._compiled_forward(type(layer))
        try:
            return compiled(layer, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - compiling failed: eager from now on
            out = eager(*args, **kwargs)  # the eager error, if it fails too, is the real one
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            self.failed = f"{type(error).__name__}: {first_line}"
            warnings.warn(f"rlhf: torch_compile could not compile the decoder layers "
                          f"({self.failed}); they run eagerly (the same results, more host "
                          f"time per step)", RuntimeWarning, stacklevel=2)
            return out

    @contextmanager
    def active(self):
        """Within: every decoder layer's forward is the compiled one (the class's forward again on
        exit, even on an error)."""
        # (a layer with a forward of its own, set on the instance, keeps it: what is compiled
        # is the class's forward)
        layers = [layer for layer in self.layers if "forward" not in layer.__dict__]
        for layer in layers:
            layer.forward = functools.partial(self._call, layer, layer.forward)
        try:
            yield self
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)


def layers_context(causal_lm: nn.Module, enabled: bool,
                   backend: str | None = None) -> Callable[[], contextlib.AbstractContextManager]:
    """What a stage runs its forwards and backwards in: ``CompiledLayers(causal_lm).active`` when
    ``enabled`` (the stage's ``torch_compile`` setting), else a context that does nothing. One
    ``CompiledLayers`` per stage run, so its compiled variants serve every step. A ValueError
    under ``strategy=fsdp2``: its sharded layers gather their weights in hooks around each layer,
    which the compiled forward would bypass."""
    if not enabled:
        return contextlib.nullcontext
    from rlhf import distributed

    if distributed.strategy() == "fsdp2":
        raise ValueError("torch_compile=true is not supported with strategy=fsdp2 (its sharded "
                         "layers gather their weights in hooks around each layer); use "
                         "strategy=ddp, or torch_compile=false")
    return CompiledLayers(causal_lm, backend).active
