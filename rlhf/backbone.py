"""One Hugging Face backbone, four roles: policy, critic, reward model and reference.

PPO classically holds four models (policy, reference, reward, critic). Here the base weights of
one ``AutoModelForCausalLM`` are held once and the roles are PEFT LoRA adapters on top of them:

* reference = the base with every adapter disabled (after SFT the SFT weights *are* the base);
* policy    = base + ``policy`` adapter + the LM head;
* critic    = base + ``critic`` adapter + ``value_head`` (fp32 ``Linear(H, 1)``, every position);
* reward    = base + ``reward`` adapter + ``reward_head`` (fp32 ``Linear(H, 1)``, last real token),
  or a separately trained reward model plugged in with ``use_reward_model``.

Running a role means activating its adapter on every LoRA layer (rlhf/adapters.py), without
PEFT's switches flipping ``requires_grad``: it stays the explicit trainable set
(``set_trainable``; default: every role's adapter and head, never the base), so any mix of roles
may be run before one backward. Every forward takes a padded ``(B, T)`` batch with any padding
side (rlhf/layout.py); ``from_pretrained`` and ``load`` load the base through rlhf/loading.py.

Gradient checkpointing is adapter-aware: each decoder layer records the role it ran with, and the
backward-time recomputation reruns the layer with that role, whatever is active at backward time.
So ``(policy_loss + value_loss).backward()`` after a policy forward, a critic forward and a
reference forward gives the same gradients with checkpointing as without (tested).

Memory: pass ``torch_dtype=torch.bfloat16`` for bf16 base weights; adapters and heads stay fp32
(PEFT's adapter autocast), the base is frozen, ``gradient_checkpointing=True`` recomputes layer
activations. ``token_logprobs`` goes from hidden states straight to per-token log-probabilities
with ``rlhf_kernels.linear_logprobs``, so no ``(B, T, V)`` tensor is made. ``memory_report``
gives the bytes held per role; rlhf/memory.py computes the table in ``docs/memory.md``.

Checkpoint layout written by ``save`` (atomically: a temporary directory, then a rename)::

    directory/
      roles.json                 roles, LoRA spec, base model name and config, format version
      adapters/<role>/           PEFT ``save_pretrained`` layout (adapter_config.json +
                                 adapter_model.safetensors); ``PeftModel.from_pretrained`` reads it
      heads.safetensors          value_head.* and reward_head.*
      base/                      the base model (``save_pretrained``), only when it cannot be
                                 re-loaded from its name: changed by ``merge_into_base`` or built
                                 in memory (e.g. a model trained from scratch); never for a
                                 quantized base (roles.json records the quantization, load
                                 re-quantizes the named base: docs/quantization.md)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from rlhf import adapters, lora_forward
from rlhf.adapters import LoraSpec, _quiet_peft
from rlhf.errors import write_error
from rlhf.layout import (
    _check_batch,
    _inner_model,
    _last_real_index,
    _position_ids,
    _shared_prefix_body,
)
from rlhf.loading import _load_causal_lm
from rlhf.seeding import derived_seed, seeded

__all__ = ["CHECKPOINT_FORMAT", "IGNORE_INDEX", "ROLES", "SharedBackbone", "check_tokenizer"]

ROLES = ("policy", "critic", "reward")
IGNORE_INDEX = -100
CHECKPOINT_FORMAT = 1
_ROLES_FILE = "roles.json"
_HEADS_FILE = "heads.safetensors"

# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
def _check_roles(roles: Iterable[str]) -> tuple[str, ...]:
    roles = tuple(roles)
    if not roles:
        raise ValueError(f"roles must name at least one of {ROLES}, got an empty list")
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ValueError(f"unknown role(s) {unknown}; the roles are {ROLES}")
    if len(set(roles)) != len(roles):
        raise ValueError(f"roles must not repeat, got {roles}")
    return roles


def _check_causal_lm(causal_lm: nn.Module) -> None:
    from peft import PeftModel

    if isinstance(causal_lm, PeftModel):
        raise ValueError(
            "from_model expects the plain base model, got a PeftModel; pass "
            "peft_model.merge_and_unload() (or the base model) instead"
        )
    if not hasattr(causal_lm, "get_output_embeddings") or not hasattr(causal_lm, "config"):
        raise ValueError(
            f"expected a Hugging Face AutoModelForCausalLM, got {type(causal_lm).__name__}"
        )
    head = causal_lm.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(
            f"{type(causal_lm).__name__} has no lm_head (get_output_embeddings() is None): the "
            "policy needs one. Load the checkpoint with AutoModelForCausalLM, not AutoModel."
        )
    config = causal_lm.config
    # linear_logprobs computes hidden @ W.T (+ b); a model that post-processes its logits would
    # get different numbers from token_logprobs than from its own forward.
    if getattr(config, "final_logit_softcapping", None) is not None:
        raise ValueError("models with final_logit_softcapping (e.g. Gemma 2) are not supported: "
                         "token_logprobs reads plain hidden @ lm_head logits")
    if getattr(config, "logit_scale", 1.0) not in (None, 1.0):
        raise ValueError(f"models with logit_scale={config.logit_scale} are not supported: "
                         "token_logprobs reads plain hidden @ lm_head logits")


def check_tokenizer(model, tokenizer) -> None:
    """Raise a clear ValueError if ``tokenizer`` does not fit ``model``.

    ``model`` is a SharedBackbone or a Hugging Face model. Checks: the tokenizer has a pad token
    (batches are padded), and every id it can produce has a row in the input embeddings and the
    lm_head.
    """
    causal_lm = model.causal_lm if isinstance(model, SharedBackbone) else model
    n_embed = causal_lm.get_input_embeddings().weight.shape[0]
    get_head = getattr(causal_lm, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    n_rows = min(n_embed, _head_rows(head)) if head is not None else n_embed
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError(
            "the tokenizer has no pad token (pad_token_id is None); batches need one. Set "
            "tokenizer.pad_token = tokenizer.eos_token, or add a pad token and resize the "
            "model's embeddings (model.resize_token_embeddings(len(tokenizer)))"
        )
    n_tokens = len(tokenizer)
    if n_tokens > n_rows:
        raise ValueError(
            f"the tokenizer has {n_tokens} tokens but the model has only {n_rows} embedding/"
            "lm_head rows: ids past the end would be out of range. Use the model's own tokenizer "
            "or resize the model's embeddings (model.resize_token_embeddings(len(tokenizer)))"
        )
    if not 0 <= tokenizer.pad_token_id < n_rows:
        raise ValueError(
            f"pad_token_id={tokenizer.pad_token_id} is outside the model's {n_rows} embedding rows"
        )


def _head_rows(head: nn.Module) -> int:
    """Rows of the lm_head (a 4-bit bitsandbytes weight is stored packed: its out_features)."""
    from rlhf import quant

    return quant.out_features(head) if quant.is_quantized_linear(head) else head.weight.shape[0]






# --------------------------------------------------------------------------------------------
# the shared backbone
# --------------------------------------------------------------------------------------------
class SharedBackbone(nn.Module):
    """A causal LM whose base weights serve policy, critic, reward model and reference.

    Build it with ``from_pretrained`` (a hub name or a local directory), ``from_model`` (a model
    in memory, e.g. after full-weight SFT) or ``load`` (a directory written by ``save``).
    Every forward method takes ``input_ids (B, T) int64`` and ``attention_mask (B, T)``
    (1 = real token) with any padding side; positions count real tokens only.
    """

    def __init__(self, peft_model, *, lora: LoraSpec, roles: tuple[str, ...],
                 name_or_path: str | None, base_modified: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.lora = lora
        self.roles = roles
        self.name_or_path = name_or_path
        # True once the base weights differ from what name_or_path loads (save writes them).
        self.base_modified = base_modified
        self.reward_model: nn.Module | None = None
        self._external_reward_fn: Callable | None = None
        self._checkpointing = False  # enable_gradient_checkpointing was called
        hidden = self.hidden_size
        device = self.causal_lm.get_input_embeddings().weight.device
        # fp32 heads: a scalar read from bf16 hidden states loses little, a bf16 head would lose
        # the small updates of a slowly moving value function.
        # Initialised from a generator seeded by (seed, head) on the CPU, never from the global
        # RNG, whose state depends on what ran before (rlhf/seeding.py): the same heads on every
        # device and whether the model was trained or loaded in this process.
        self.value_head = nn.utils.skip_init(nn.Linear, hidden, 1, dtype=torch.float32,
                                             device=device)
        self.reward_head = nn.utils.skip_init(nn.Linear, hidden, 1, dtype=torch.float32,
                                              device=device)
        with torch.no_grad():
            for name, head in (("value_head", self.value_head), ("reward_head", self.reward_head)):
                generator = torch.Generator().manual_seed(derived_seed(seed, name))
                weight = torch.randn(head.weight.shape, generator=generator) / math.sqrt(hidden + 1)
                head.weight.copy_(weight)
                head.bias.zero_()
        self._lora_layers = self._find_lora_layers(self.peft_model)
        lora_forward.install(self._lora_layers)  # two GEMMs per adapted linear under autocast
        # a 4-bit base loaded elsewhere: bitsandbytes' CPU repacking breaks training (quant.py)
        from rlhf import quant

        quant.keep_4bit_layers_trainable_on_cpu(self.causal_lm)
        self._trainable_roles = set(roles)
        self._active_role: str | None = roles[0]
        self._direct_switch = False  # PEFT's own switch first, then check the direct one
        self._switch(self._lora_layers, self._active_role)
        self._direct_switch = adapters.direct_switch_works(self._lora_layers, self._active_role)
        self._apply_requires_grad()
        # Checkpointing switched on before wrapping (e.g. during full-weight SFT) must become
        # adapter-aware too, or recomputation would silently use the wrong adapter.
        if any(getattr(m, "gradient_checkpointing", False) is True
               for m in self.causal_lm.modules()):
            self.enable_gradient_checkpointing()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, lora: LoraSpec | None = None,
                        roles: Iterable[str] = ROLES, torch_dtype=None,
                        gradient_checkpointing: bool = False, attn_implementation=None,
                        trust_remote_code: bool = False, seed: int = 0, quantization=None,
                        device=None) -> SharedBackbone:
        """Load ``AutoModelForCausalLM`` from a hub name or local directory and add the adapters.

        ``torch_dtype`` (e.g. ``torch.bfloat16``) sets the base weights' dtype; adapters and heads
        stay fp32 and are initialised from ``seed`` (``from_model``). ``trust_remote_code`` is off
        unless asked for. ``quantization`` ("nf4", "fp4", "int8"; rlhf/quant.py) loads the base
        quantized onto ``device``: one quantized copy serves every role, the reference included.
        """
        causal_lm = _load_causal_lm(name_or_path, torch_dtype, attn_implementation,
                                    trust_remote_code, quantization, device)
        # A local directory is recorded as an absolute path: save() writes it to roles.json and
        # load() must find the base from any working directory (`rlhf ppo model=runs/rm/backbone`
        # run elsewhere).
        source = str(name_or_path)
        if Path(source).expanduser().is_dir():
            source = os.path.abspath(Path(source).expanduser())
        return cls.from_model(causal_lm, lora=lora, roles=roles,
                              gradient_checkpointing=gradient_checkpointing,
                              name_or_path=source, seed=seed)

    @classmethod
    def from_model(cls, causal_lm, *, lora: LoraSpec | None = None, roles: Iterable[str] = ROLES,
                   gradient_checkpointing: bool = False,
                   name_or_path: str | None = None, seed: int = 0) -> SharedBackbone:
        """Wrap a Hugging Face causal LM held in memory (it is modified in place: LoRA layers are
        injected and its weights frozen). ``name_or_path`` says where the same base weights can be
        re-loaded from; without one, ``save`` writes the base weights too.

        The adapters and heads are initialised from ``seed`` alone (rlhf/seeding.py), not from
        the global RNG: the same seed gives the same backbone whatever ran before."""
        from peft import get_peft_model

        _check_causal_lm(causal_lm)
        roles = _check_roles(roles)
        lora = lora if lora is not None else LoraSpec()
        from rlhf import quant

        if name_or_path is None and quant.quantization_of(causal_lm) != "none":
            raise ValueError(
                f"from_model got a {quant.quantization_of(causal_lm)} model without "
                f"name_or_path: checkpoints never hold a quantized base, so the backbone must "
                f"know where its full-precision base is re-loaded from; pass name_or_path=")
        causal_lm.requires_grad_(False)
        _own_aligned_storage(causal_lm)
        # PEFT initialises lora_A from the global RNG: seed it for this purpose, then restore it.
        with _quiet_peft(), seeded(derived_seed(seed, "adapters")):
            peft_model = get_peft_model(causal_lm, lora.peft_config(causal_lm),
                                        adapter_name=roles[0])
            for role in roles[1:]:
                peft_model.add_adapter(role, lora.peft_config(causal_lm))
        backbone = cls(peft_model, lora=lora, roles=roles, name_or_path=name_or_path,
                       base_modified=name_or_path is None, seed=seed)
        if gradient_checkpointing:
            backbone.enable_gradient_checkpointing()
        return backbone

    # ---------------------------------------------------------------- attributes
    @property
    def causal_lm(self) -> nn.Module:
        """The Hugging Face model (with the LoRA layers injected into it)."""
        return self.peft_model.get_base_model()

    @property
    def config(self):
        return self.causal_lm.config

    @property
    def hidden_size(self) -> int:
        return int(self.causal_lm.get_input_embeddings().weight.shape[1])

    @property
    def vocab_size(self) -> int:
        """Rows of the lm_head (may exceed the tokenizer's size when embeddings are padded)."""
        return _head_rows(self.causal_lm.get_output_embeddings())

    @property
    def device(self) -> torch.device:
        return self.causal_lm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the base weights (adapters and heads are fp32)."""
        return self.causal_lm.get_input_embeddings().weight.dtype

    @property
    def quantization(self) -> str:
        """"nf4" / "fp4" / "int8" when the base is quantized (rlhf/quant.py), else "none"."""
        from rlhf import quant

        return quant.quantization_of(self.causal_lm)

    def lm_head_weight(self) -> torch.Tensor:
        """(V, H) lm_head weight in the base dtype (the input embeddings when they are tied); a
        quantized lm_head is dequantized to its compute dtype (``quant.dense_weight``)."""
        from rlhf import quant

        return quant.dense_weight(self.causal_lm.get_output_embeddings())

    def lm_head_bias(self) -> torch.Tensor | None:
        """(V,) lm_head bias, or None (most decoder LMs have none)."""
        return getattr(self.causal_lm.get_output_embeddings(), "bias", None)

    # ---------------------------------------------------------------- roles and adapters
    @staticmethod
    def _find_lora_layers(module: nn.Module) -> list[nn.Module]:
        return adapters.find_lora_layers(module)

    def _check_role(self, role: str | None, allow_none: bool = False) -> str | None:
        if role is None and allow_none:
            return None
        if role not in ROLES:
            allowed = ROLES + ((None,) if allow_none else ())
            raise ValueError(f"unknown role {role!r}; expected one of {allowed}")
        if role not in self.roles:
            raise ValueError(
                f"role {role!r} has no adapter in this backbone (roles: {self.roles}); build it "
                f"with roles including {role!r}"
            )
        return role

    def _adapter_parameters(self, role: str, layers: Iterable[nn.Module] | None = None):
        return adapters.adapter_parameters(self._lora_layers if layers is None else layers, role)

    def _switch(self, layers: Iterable[nn.Module], role: str | None) -> None:
        """Activate ``role``'s adapter (None: disable all) on ``layers``, keeping requires_grad:
        set directly where PEFT's stock layers allow it (``adapters.switch``), else through PEFT,
        after which the explicit trainable set is put back."""
        layers = list(layers)
        adapters.switch(layers, role, direct=self._direct_switch)
        if not self._direct_switch:  # PEFT flipped requires_grad of these layers' adapters
            self._apply_requires_grad(layers)

    def _activate(self, role: str | None) -> None:
        if role != self._active_role:
            self._switch(self._lora_layers, role)
            self._active_role = role

    @contextmanager
    def as_role(self, role: str | None):
        """Run the Hugging Face model directly as ``role`` (None: the reference), e.g.
        ``with backbone.as_role("policy") as lm: lm.generate(...)``; the previous role is restored
        on exit. Inside, pass ``position_ids`` yourself for left-padded batches (``generate``
        does)."""
        previous = self._active_role
        self._activate(self._check_role(role, allow_none=True))
        try:
            yield self.causal_lm
        finally:
            self._activate(previous)

    @property
    def active_role(self) -> str | None:
        """The role whose adapter is active now (None: adapters disabled, the reference)."""
        return self._active_role

    def _apply_requires_grad(self, layers: Iterable[nn.Module] | None = None) -> None:
        layers = self._lora_layers if layers is None else list(layers)
        for role in self.roles:
            wanted = role in self._trainable_roles
            for param in self._adapter_parameters(role, layers):
                param.requires_grad_(wanted)
        self.value_head.requires_grad_("critic" in self._trainable_roles)
        self.reward_head.requires_grad_("reward" in self._trainable_roles)

    def set_trainable(self, roles: Iterable[str]) -> None:
        """Make exactly these roles' adapters and heads trainable (e.g. ``("policy", "critic")``
        in PPO, where the reward model is frozen). The base weights are never trainable."""
        roles = tuple(roles)
        for role in roles:
            self._check_role(role)
        self._trainable_roles = set(roles)
        self._apply_requires_grad()

    def trainable_parameters(self, role: str) -> list[nn.Parameter]:
        """That role's adapter parameters (+ ``value_head`` for critic, ``reward_head`` for
        reward). Hand these to the role's optimizer; re-fetch after ``merge_into_base`` is not
        needed (parameters are re-initialised in place)."""
        role = self._check_role(role)
        params = list(self._adapter_parameters(role))
        if role == "critic":
            params += list(self.value_head.parameters())
        elif role == "reward":
            params += list(self.reward_head.parameters())
        return params

    def named_trainable_parameters(self, *roles: str) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of these roles' adapters and heads, in ``named_parameters`` order:
        what a stage checkpoint saves and restores."""
        wanted = {id(p) for role in roles for p in self.trainable_parameters(role)}
        return [(name, p) for name, p in self.named_parameters() if id(p) in wanted]

    # ---------------------------------------------------------------- gradient checkpointing
    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint every decoder layer (non-reentrant), recomputing with the forward's role.

        Only active in training mode (``self.train()``), as in Hugging Face models.
        """
        causal_lm = self.causal_lm
        if not getattr(causal_lm, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(causal_lm).__name__} does not support gradient checkpointing")
        if hasattr(causal_lm, "activation_checkpointing_enable"):  # transformers >= 5.2x
            causal_lm.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            causal_lm.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        causal_lm.config.use_cache = False
        self._checkpointing = True
        wrapped = 0
        for module in causal_lm.modules():
            func = getattr(module, "_gradient_checkpointing_func", None)
            if not getattr(module, "gradient_checkpointing", False) or func is None:
                continue
            if getattr(func, "_role_aware", False):
                func = func._inner
            layer_loras = self._find_lora_layers(module)
            if layer_loras:
                module._gradient_checkpointing_func = adapters.role_aware_checkpoint(
                    self, layer_loras, func)
                wrapped += 1
        if not wrapped:
            raise ValueError(f"no checkpointable decoder layer with LoRA layers found in "
                             f"{type(causal_lm).__name__}")

    # ---------------------------------------------------------------- forward passes
    @property
    def packing(self):
        """The ``rlhf.packing.Packing`` of this backbone's forwards (mode and token counters)."""
        from rlhf.packing import Packing

        if getattr(self, "_packing", None) is None:
            self._packing = Packing("off")
        return self._packing

    def set_packing(self, mode: str, setting: str = "packing") -> None:
        """Packed sequences for every forward method: ``auto | on | off`` (rlhf/packing.py,
        docs/packing.md); ``on`` with a model that cannot run packed is a ValueError naming
        ``setting``. The token counters start from 0."""
        from rlhf.packing import Packing

        packing = Packing(mode)
        packing.check_model(self.causal_lm, setting)
        self._packing = packing

    def _body(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, role: str | None,
              shared_prefix: int = 0):
        """The transformer under ``role`` -> ((B, T, H) hidden, None) padded, or
        ((R, W, H) hidden, PackedBatch) when ``packing`` packs this batch.

        shared_prefix: the first ``shared_prefix`` columns are the prompt; rows whose prompts are
        equal (ids and mask: the samples of one group) run it once (``_shared_prefix_body``).
        """
        _check_batch(input_ids, attention_mask)
        self._activate(self._check_role(role, allow_none=True))
        inner = _inner_model(self.causal_lm)
        if shared_prefix:
            plan = self._shared_prefix_plan(input_ids, attention_mask, shared_prefix)
            if plan is not None:
                batch, length = input_ids.shape
                self.packing.count_shared_prefix(
                    attention_mask, plan[0].numel() * shared_prefix + batch * (length
                                                                              - shared_prefix))
                return _shared_prefix_body(inner, input_ids, attention_mask, shared_prefix,
                                           *plan), None
        packed = self.packing.plan(self.causal_lm, input_ids, attention_mask)
        if packed is not None:
            return packed.run(inner), packed
        out = inner(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=_position_ids(attention_mask), use_cache=False)
        return out[0], None

    def _shared_prefix_plan(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            prefix: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(first (U,), inverse (B,)) int64 when some rows share their first ``prefix`` columns
        (ids where the mask is 1, and the mask): ``first[u]`` is a row holding distinct prompt u,
        ``inverse[b]`` the prompt of row b. None when every prompt is distinct, when there is no
        response column, or under gradient checkpointing (its recomputation would append the
        prompt's keys and values to the cache a second time)."""
        batch, length = input_ids.shape
        if batch < 2 or not 0 < prefix < length:
            return None
        if self._checkpointing and self.causal_lm.training and torch.is_grad_enabled():
            return None
        real = attention_mask[:, :prefix] != 0
        key = torch.where(real, input_ids[:, :prefix].long(), -1)
        unique, inverse = torch.unique(key, dim=0, return_inverse=True)
        if unique.shape[0] == batch:
            return None
        rows = torch.arange(batch, device=key.device)
        first = torch.full((unique.shape[0],), batch, dtype=torch.long, device=key.device)
        first.scatter_reduce_(0, inverse, rows, "amin")
        return first, inverse

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      role: str | None, shared_prefix: int = 0) -> torch.Tensor:
        """(B, T) ids and mask -> (B, T, H) final-norm hidden states in the base dtype, computed
        with ``role``'s adapter active (None: adapters disabled = the reference model). With
        packing the transformer runs on the real tokens only and padded positions hold 0.
        ``shared_prefix`` P: rows with equal first P columns (a group's samples) run them once;
        the same values up to rounding, the prompt's gradient summed over its rows."""
        hidden, packed = self._body(input_ids, attention_mask, role, shared_prefix)
        return hidden if packed is None else packed.unpack(hidden)

    def policy_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) hidden states of the policy (feed them to linear_logprobs with
        ``lm_head_weight()``)."""
        return self.hidden_states(input_ids, attention_mask, "policy")

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               role: str | None = "policy") -> torch.Tensor:
        """(B, T, V) logits in the base dtype. Materialises (B, T, V): small models and tests."""
        hidden = self.hidden_states(input_ids, attention_mask, role)
        return self.causal_lm.get_output_embeddings()(hidden)

    def policy_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, V) policy logits; small models and tests only (see ``token_logprobs``)."""
        return self.logits(input_ids, attention_mask, "policy")

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       role: str | None = "policy", temperature: float = 1.0,
                       return_entropy: bool = False, start: int = 0, shared_prefix: int = 0):
        """logp (B, T-1-start) fp32 of ``input_ids[:, start+1:]`` given the prefix, under ``role``
        (None: the reference) at ``temperature`` [, entropy of the same distribution, same shape].

        Column j scores token ``start + 1 + j``; positions where ``attention_mask[:, 1:] == 0``
        give 0. ``start`` skips the vocabulary projection of positions nobody reads (PPO scores
        only the response: ``start = prompt_length - 1``); the transformer still runs over the
        whole sequence. Uses the fused ``rlhf_kernels.linear_logprobs``: no (B, T, V) logits.
        Packed (``set_packing``), the lm_head runs on the scored real tokens only, and a token
        whose previous position is padding (the first real one of a left-padded row, which the
        padded layout scores from a padding position's hidden state) gives 0 too.
        ``shared_prefix``: as in ``hidden_states``.
        """
        import rlhf_kernels

        length = input_ids.shape[1]
        if not 0 <= start < length - 1:
            raise ValueError(f"start must be in [0, {length - 1}) for sequences of {length} "
                             f"tokens, got {start}")
        hidden, packed = self._body(input_ids, attention_mask, role, shared_prefix)
        if packed is not None:
            from rlhf.packing import packed_logprobs

            targets = torch.where(attention_mask != 0, input_ids.long(), IGNORE_INDEX)
            return packed_logprobs(packed, hidden, targets, self.lm_head_weight(),
                                   self.lm_head_bias(), start=start, temperature=temperature,
                                   return_entropy=return_entropy, ignore_index=IGNORE_INDEX)
        if start:
            hidden = hidden[:, start:]
        # Labels over the kept length with the last column ignored, so the hidden states are
        # used as they are (no sliced copy when start = 0); the last column is dropped afterwards.
        labels = torch.full_like(input_ids[:, start:], IGNORE_INDEX, dtype=torch.int64)
        labels[:, :-1] = torch.where(attention_mask[:, start + 1:] != 0,
                                     input_ids[:, start + 1:].long(), IGNORE_INDEX)
        weight, bias = self.lm_head_weight(), self.lm_head_bias()
        out = rlhf_kernels.linear_logprobs(hidden, weight, labels, bias=bias,
                                           temperature=temperature, ignore_index=IGNORE_INDEX,
                                           return_entropy=return_entropy)
        if return_entropy:
            return out[0][:, :-1], out[1][:, :-1]
        return out[:, :-1]

    def reference_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           temperature: float = 1.0, start: int = 0,
                           shared_prefix: int = 0) -> torch.Tensor:
        """(B, T-1-start) fp32 log-probs under the reference (adapters off), without autograd."""
        with torch.no_grad():
            return self.token_logprobs(input_ids, attention_mask, None, temperature, start=start,
                                       shared_prefix=shared_prefix)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) fp32 value estimates: critic adapter + ``value_head`` at every position
        (0 where ``attention_mask`` is 0). ``values[:, t]`` is the value of the state after
        token t."""
        hidden = self.hidden_states(input_ids, attention_mask, "critic")
        values = self.value_head(hidden.float()).squeeze(-1)
        return torch.where(attention_mask != 0, values, torch.zeros_like(values))

    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) fp32 sequence scores at the last real token (left or right padding): the plugged
        reward model if ``use_reward_model`` was called, else reward adapter + ``reward_head``."""
        _check_batch(input_ids, attention_mask)
        if self._external_reward_fn is not None:
            return self._external_reward_fn(input_ids, attention_mask).float()
        hidden = self.hidden_states(input_ids, attention_mask, "reward")
        last = _last_real_index(attention_mask)
        hidden_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.reward_head(hidden_last.float()).squeeze(-1)

    # ---------------------------------------------------------------- stage transitions
    @torch.no_grad()
    def merge_into_base(self, role: str = "policy") -> None:
        """base := base + ``role``'s adapter, then re-initialise that adapter (B = 0).

        After SFT through the policy adapter this makes the base the SFT model, i.e. the
        reference, and the policy starts equal to it. With bf16 base weights the merge is
        rounded to bf16. Parameters are re-initialised in place, so optimizers keep valid
        references, but their state (Adam moments) belongs to the old adapter: make a new one.
        """
        role = self._check_role(role)
        if self.quantization != "none":
            raise ValueError(
                f"merge_into_base on a {self.quantization} base would round the adapter into "
                f"{self.quantization} weights (most of it lost) and leave a base that no "
                f"checkpoint can name; merge into the full-precision model instead "
                f"(quant.merge_lora_into_dense) and load that quantized")
        config = self.peft_model.peft_config[role]
        for layer in self._lora_layers:
            if role not in layer.lora_A:
                continue
            base = layer.get_base_layer()
            delta = layer.get_delta_weight(role)
            base.weight.add_(delta.to(base.weight.dtype))
            layer.reset_lora_parameters(role, config.init_lora_weights)
        self.base_modified = True

    def drop_role(self, role: str) -> None:
        """Delete ``role``'s adapter from every layer, freeing its parameters (e.g. the critic of
        a critic-free RL run, which never uses it). ``roles`` loses it; ``save`` writes the
        others. The role's head (H + 1 numbers) stays, frozen."""
        role = self._check_role(role)
        remaining = tuple(r for r in self.roles if r != role)
        if not remaining:
            raise ValueError(f"cannot drop {role!r}: it is the backbone's only role")
        active = self._active_role if self._active_role != role else remaining[0]
        with _quiet_peft(), warnings.catch_warnings():
            # PEFT says it activates another adapter; the switch below decides which
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            self.peft_model.delete_adapter(role)
        self.roles = remaining
        self._trainable_roles.discard(role)
        self._lora_layers = self._find_lora_layers(self.peft_model)
        # PEFT activated adapters of its choosing, and flipped their requires_grad: switch every
        # layer to ours explicitly, and put the trainable set back
        self._active_role = active
        self._switch(self._lora_layers, active)
        self._apply_requires_grad()

    @torch.no_grad()
    def init_critic_from_reward(self) -> None:
        """Copy the reward adapter and ``reward_head`` into the critic adapter and ``value_head``
        (the usual critic initialisation: the value function starts as the reward model)."""
        self._check_role("critic")
        self._check_role("reward")
        if self._external_reward_fn is not None:
            raise ValueError(
                "a separate reward model is plugged in (use_reward_model): the critic can only be "
                "initialised from the reward adapter; call use_reward_model(None) first or train "
                "the critic from its fresh initialisation"
            )
        adapters.copy_adapter(self._lora_layers, "reward", "critic")
        self.value_head.load_state_dict(self.reward_head.state_dict())

    def use_reward_model(self, model) -> None:
        """Score with a separately trained reward model instead of the reward adapter.

        ``model`` is one of: a ``SharedBackbone`` (its ``rewards``, e.g. a causal LM + reward head
        saved by ``save``); a Hugging Face sequence-classification model with one label and a
        ``score`` head (Llama/Qwen2/GPT-2 ``*ForSequenceClassification``), read at the last real
        token with the same position handling as here; any callable ``(input_ids,
        attention_mask) -> (B,)``; or None to go back to the reward adapter. It must use the same
        tokenizer. It is frozen and kept as the ``reward_model`` submodule.
        """
        if model is None:
            self.reward_model, self._external_reward_fn = None, None
            return
        if isinstance(model, SharedBackbone):
            model._check_role("reward")
            if model.vocab_size < self.vocab_size:
                raise ValueError(f"the reward model has {model.vocab_size} vocabulary rows, fewer "
                                 f"than this backbone's {self.vocab_size}: tokenizers differ")
            fn = model.rewards
        elif hasattr(model, "config") and hasattr(model, "get_input_embeddings"):
            fn = _sequence_classifier_scorer(model, self.vocab_size)
        elif callable(model):
            fn = model
        else:
            raise ValueError(
                f"use_reward_model expects a SharedBackbone, a Hugging Face sequence-"
                f"classification model, a callable (input_ids, attention_mask) -> (B,) or None; "
                f"got {type(model).__name__}"
            )
        if isinstance(model, nn.Module):
            model.requires_grad_(False)
            model.eval()
            self.reward_model = model
        else:
            self.reward_model = None
        self._external_reward_fn = fn

    # ---------------------------------------------------------------- save / load
    def save(self, directory, *, save_base: bool | None = None) -> None:
        """Write the checkpoint layout of the module docstring atomically.

        ``save_base=None`` writes ``base/`` only when the base cannot be re-loaded from
        ``name_or_path`` (merged into, or built in memory). A plugged reward model is not saved.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        write_base = self.base_modified if save_base is None else save_base
        quantization = self.quantization
        if write_base and quantization != "none":
            raise ValueError(f"cannot save the {quantization} base weights: checkpoints hold the "
                             f"adapters and heads only and name the full-precision base "
                             f"(base_model={self.name_or_path!r}); save_base=False")
        try:
            tmp.mkdir()
            # PEFT writes adapters other than "default" to <dir>/<adapter name>/.
            self.peft_model.save_pretrained(str(tmp / "adapters"),
                                            selected_adapters=list(self.roles))
            heads = {f"value_head.{k}": v.detach().contiguous().cpu()
                     for k, v in self.value_head.state_dict().items()}
            heads.update({f"reward_head.{k}": v.detach().contiguous().cpu()
                          for k, v in self.reward_head.state_dict().items()})
            save_file(heads, str(tmp / _HEADS_FILE))
            if write_base:
                self._save_base(tmp / "base")
            info = {
                "format": CHECKPOINT_FORMAT,
                "roles": list(self.roles),
                "base_model": self.name_or_path,
                "base_saved": bool(write_base),
                "base_dtype": str(self.dtype).removeprefix("torch."),
                "base_config": self.config.to_dict(),
                "lora": asdict(self.lora),
                "trainable_roles": sorted(self._trainable_roles),
                "quantization": quantization,
            }
            (tmp / _ROLES_FILE).write_text(json.dumps(info, indent=2, default=str))
            from rlhf.checkpoint import normal_file_modes  # safetensors writes 0600

            normal_file_modes(tmp)
            _replace_directory(tmp, directory)
        except Exception as error:
            failed_write = write_error(error, directory)  # a full disk: OSError naming the dir
            if failed_write is not None:
                raise failed_write from error
            raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _save_base(self, path: Path) -> None:
        """The base weights without the LoRA layers, as a plain ``save_pretrained`` directory."""
        state = {}
        for name, tensor in self.causal_lm.state_dict().items():
            if "lora_" in name:
                continue
            state[name.replace(".base_layer.", ".")] = tensor
        self.causal_lm.save_pretrained(str(path), state_dict=state)

    @staticmethod
    def check_directory(directory, setting: str = "model") -> Path:
        """The path of ``directory``'s roles.json, or a ValueError naming ``setting`` when
        ``directory`` is not a backbone directory (checked before anything loads)."""
        given = str(directory)
        directory = Path(directory).expanduser()
        info_path = directory / _ROLES_FILE
        written_by = ("the backbone directory the reward or PPO stage writes (e.g. "
                      "runs/rm/backbone)")
        if not directory.exists():
            raise ValueError(f"{setting}={given!r} does not exist; expected {written_by}")
        if not info_path.is_file():
            raise ValueError(f"{setting}={given!r} is not a SharedBackbone checkpoint (it has no "
                             f"{_ROLES_FILE}); expected {written_by}")
        return info_path

    @staticmethod
    def recorded_quantization(directory) -> str | None:
        """The base quantization a backbone directory's roles.json records (what ``load`` with
        ``quantization=None`` loads: "none" for one written before it was recorded), or None
        when ``directory`` is not a readable backbone directory."""
        try:
            info = json.loads((Path(directory).expanduser() / _ROLES_FILE).read_text())
        except (OSError, ValueError, TypeError):
            return None
        return info.get("quantization", "none") if isinstance(info, dict) else None

    @classmethod
    def load(cls, directory, *, base_model=None, torch_dtype=None,
             gradient_checkpointing: bool = False, attn_implementation=None,
             trust_remote_code: bool = False, setting: str = "directory",
             quantization=None, device=None) -> SharedBackbone:
        """Rebuild a backbone from ``save``'s directory (safetensors only).

        The base comes from ``base_model`` (a model in memory) if given, else ``directory/base``
        if it was saved, else ``from_pretrained(roles.json's base_model)``. ``setting`` names
        the directory in error messages (the config key it came from, e.g. "model").
        ``quantization`` None: the one roles.json records (the base is re-quantized onto
        ``device``); another value loads the base that way, with a warning when it differs from
        the one the adapters were trained on.
        """
        from peft import PeftModel
        from safetensors.torch import load_file

        given = str(directory)
        directory = Path(directory).expanduser()
        info_path = cls.check_directory(given, setting)
        info = json.loads(info_path.read_text())
        if info.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{info_path}: checkpoint format {info.get('format')!r}, expected "
                             f"{CHECKPOINT_FORMAT}")
        roles = _check_roles(info["roles"])
        lora = LoraSpec(**info["lora"])
        name_or_path = info.get("base_model")
        base_modified = bool(info.get("base_saved"))
        from rlhf import quant

        trained_on = info.get("quantization", "none")
        if quantization is None:
            quantization = trained_on
        elif quant.check_quantization(quantization, f"{setting} quantization") != trained_on:
            warnings.warn(f"{setting}={given!r}: its adapters were trained on a {trained_on} "
                          f"base, loading it with quantization={quantization!r}", stacklevel=2)
        if base_model is None:
            source = directory / "base" if info.get("base_saved") else name_or_path
            if source is None:
                raise ValueError(f"{info_path} names no base model and none was saved; pass "
                                 "base_model=")
            base_dtype = torch_dtype or (info.get("base_dtype") if quantization == "none"
                                         else None)
            base_model = _load_causal_lm(source, base_dtype, attn_implementation,
                                         trust_remote_code, quantization, device)
        else:
            _check_same_shape_config(base_model.config.to_dict(), info["base_config"])
            given_kind = quant.quantization_of(base_model)
            if given_kind != quantization:
                warnings.warn(f"{setting}={given!r}: its adapters were trained on a "
                              f"{trained_on} base, the base_model given is {given_kind}",
                              stacklevel=2)
        _check_causal_lm(base_model)
        base_model.requires_grad_(False)
        adapters = directory / "adapters"
        # the adapters' random initialisation is overwritten by the saved weights; seeded() keeps
        # it from advancing the caller's global RNG
        with _quiet_peft(), seeded(0):
            peft_model = PeftModel.from_pretrained(base_model, str(adapters / roles[0]),
                                                   adapter_name=roles[0], is_trainable=True)
            for role in roles[1:]:
                peft_model.load_adapter(str(adapters / role), adapter_name=role,
                                        is_trainable=True)
        backbone = cls(peft_model, lora=lora, roles=roles, name_or_path=name_or_path,
                       base_modified=base_modified)
        heads = load_file(str(directory / _HEADS_FILE), device=str(backbone.device))
        with torch.no_grad():
            for name, head in (("value_head", backbone.value_head),
                               ("reward_head", backbone.reward_head)):
                head.load_state_dict({k.split(".", 1)[1]: v for k, v in heads.items()
                                      if k.startswith(name + ".")})
        if "trainable_roles" in info:
            backbone.set_trainable(info["trainable_roles"])
        _own_aligned_storage(backbone)
        if gradient_checkpointing:
            backbone.enable_gradient_checkpointing()
        return backbone

    # ---------------------------------------------------------------- memory
    def memory_report(self) -> dict:
        """Bytes held per role, for the parameters as they are now.

        ``{"base": {"params"}, "<role>": {"params", "grads", "optimizer"}, ..., "total": {...}}``:
        ``params`` = that role's adapter (+ head) bytes, ``grads`` = same size in the parameter
        dtype if the role is trainable, ``optimizer`` = Adam's two moments in the parameter dtype
        (fp32 for the adapters), 0 for a frozen role. ``base`` is the shared frozen weights
        (tied weights counted once); a plugged reward model is listed as ``reward_model``.
        Activations depend on the batch: see ``estimate_memory``.
        """
        def nbytes(params) -> int:
            return sum(p.numel() * p.element_size() for p in params)

        adapter_ids = {id(p) for role in self.roles for p in self._adapter_parameters(role)}
        base = [p for p in self.causal_lm.parameters() if id(p) not in adapter_ids]
        report: dict = {"base": {"params": nbytes(base), "grads": 0, "optimizer": 0}}
        for role in self.roles:
            params = self.trainable_parameters(role)
            trainable = role in self._trainable_roles
            report[role] = {"params": nbytes(params),
                            "grads": nbytes(params) if trainable else 0,
                            "optimizer": 2 * nbytes(params) if trainable else 0}
        if self.reward_model is not None:
            report["reward_model"] = {"params": nbytes(self.reward_model.parameters()),
                                      "grads": 0, "optimizer": 0}
        report["total"] = {key: sum(entry[key] for entry in report.values())
                           for key in ("params", "grads", "optimizer")}
        return report

def _sequence_classifier_scorer(model, vocab_size: int) -> Callable:
    """(input_ids, attention_mask) -> (B,) fp32 scores of a HF ``*ForSequenceClassification``."""
    n_labels = getattr(model.config, "num_labels", None)
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Linear) or head.out_features != 1 or n_labels != 1:
        raise ValueError(
            f"a reward model must be a sequence-classification model with one label and a "
            f"`score` Linear head (e.g. LlamaForSequenceClassification, num_labels=1); got "
            f"{type(model).__name__} with num_labels={n_labels}"
        )
    n_rows = model.get_input_embeddings().weight.shape[0]
    if n_rows < vocab_size:
        raise ValueError(f"the reward model has {n_rows} embedding rows, fewer than the policy's "
                         f"{vocab_size}: it must use the same tokenizer")
    inner = _inner_model(model)

    def score(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = inner(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=_position_ids(attention_mask), use_cache=False)[0]
        last = _last_real_index(attention_mask)
        hidden_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return head(hidden_last).squeeze(-1).float()

    return score


def _own_aligned_storage(module: nn.Module) -> None:
    """Give every parameter and buffer of ``module`` whose data is not 64-byte aligned (tensors
    loaded from a safetensors file can point into it at any offset) its own allocation.

    CPU matmul kernels pick their code path by alignment, so a loaded model and the same weights
    trained in memory round differently (1e-6 in a log-prob): a resumed run would not reproduce
    the uninterrupted one bit for bit. The copy is made once, only for misaligned tensors.
    """
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.numel() and tensor.data_ptr() % 64:
                tensor.data = tensor.data.clone()


def _check_same_shape_config(given: dict, saved: dict) -> None:
    keys = ("model_type", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "vocab_size",
            "intermediate_size", "num_attention_heads", "num_key_value_heads")
    diffs = {k: (given.get(k), saved.get(k)) for k in keys
             if k in saved and given.get(k) != saved.get(k)}
    if diffs:
        listing = ", ".join(f"{k}: given {a!r}, saved {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(f"base_model does not match the checkpoint's base config ({listing})")


def _replace_directory(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is swapped out, then removed, so a
    reader sees the old or the new checkpoint, never a half-written one."""
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)

