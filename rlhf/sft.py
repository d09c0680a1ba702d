"""Stage 1, supervised fine-tuning: one loop, setup -> train -> save.

Loss: the causal-LM negative log-likelihood of the *response* tokens only (prompt tokens and
padding carry label -100), averaged over the response tokens of the whole optimizer step (all
gradient-accumulation micro-batches together). The token log-likelihoods come from
``rlhf_kernels.linear_logprobs`` (hidden states x lm_head, no (B, T, V) logits) when the kernel
library has it, else from ``rlhf_kernels.logprobs`` on the logits.

On the built-in task (``model=None``, ``dataset=None``) the stage builds the review corpus, trains
a tokenizer on it and trains a tiny Llama from scratch with full weights; the pipeline then wraps
the result in ``SharedBackbone`` (adapters are added after SFT). With ``model`` set, any local or
hub causal LM is fine-tuned with full weights.

Checkpoints (atomic, every ``save_every`` steps, on Ctrl-C and at the end) hold the model weights,
the optimizer and scheduler states and the step. The data order is a pure function of
(seed, epoch), so a resumed run sees exactly the batches an uninterrupted run would have seen
and logs the same metrics.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import rlhf_kernels
from rlhf.compile import layers_context
from rlhf.seeding import derived_seed
from rlhf.stage import (
    autocast_dtype_for,
    check_common_settings,
    check_device,
    check_keep_last,
    check_max_memory,
    check_positions,
    check_seed,
    check_settings,
    check_vocabulary,
    limits_cpu_threads,
    resolve_device,
    step_or_skip,
    warmup_cosine_schedule,
)

__all__ = ["SFTConfig", "lm_loss", "preset_for", "printable_config", "train", "used_settings"]


# The built-in task's byte-level BPE: the 256 bytes and 3 special tokens at least; token ids
# are 32-bit in the tokenizers library (a larger value raised OverflowError, a traceback).
VOCAB_SIZE_RANGE = (256 + 3, 2**32 - 1)


def check_vocab_size(vocab_size: int, name: str = "vocab_size") -> None:
    """The built-in task's tokenizer size in its range, before anything runs (too small was
    refused only once the corpus was built, too large ended in a traceback)."""
    low, high = VOCAB_SIZE_RANGE
    if not low <= vocab_size <= high:
        raise ValueError(f"{name}={vocab_size} is out of range: the built-in task's byte-level "
                         f"BPE tokenizer has {low} tokens at least (256 bytes and 3 special "
                         f"tokens) and {high} at most; the default is 1024")


@dataclass
class SFTConfig:
    """Supervised fine-tuning settings. The defaults are for a pretrained model on one GPU; the
    built-in task (no ``model``: a tiny Llama from scratch) has its own, ``task.SFT_SETTINGS``,
    which ``rlhf sft`` and ``rlhf pipeline`` start from when no model is given."""

    output_dir: str = "runs/sft"
    model: str | None = None  # local dir or hub name of a causal LM; None: tiny Llama from scratch
    tokenizer: str | None = None  # defaults to ``model``; built-in task: trained on the corpus
    dataset: str | None = None  # local JSON/JSONL/Parquet or hub name; None: the built-in corpus
    corpus_size: int = 4000  # built-in task only
    vocab_size: int = 1024  # built-in task only
    max_length: int = 1024  # tokens per example (prompt + completion); longer ones are cut
    batch_size: int = 8
    grad_accum_steps: int = 4
    epochs: float = 1.0  # passes over the data, rounded to whole optimizer steps
    max_steps: int | None = None  # optimizer steps; when set, it replaces ``epochs``
    lora_rank: int = 0  # 0: full-weight fine-tuning; > 0: LoRA adapters, merged in at the end
    lora_alpha: int = 32
    lr: float | None = None  # None: 2e-5 for full-weight fine-tuning, 2e-4 with LoRA
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_last: int | None = 2  # checkpoints kept (the newest); None: keep every one
    resume: bool = False
    overwrite: bool = False  # a fresh run deletes an earlier run's files in output_dir first
    device: str = "auto"  # "auto": cuda when available, else cpu
    max_memory: float | None = None  # GiB: cap CUDA memory (emulates a smaller card)
    # torch intra-op threads while the stage runs on the CPU (None: torch's default). As in the
    # pipeline (rlhf/pipeline.py, cpu_threads): small matrices gain little from more threads,
    # and on cores shared with other processes thread barriers make every op several times
    # slower. Restored when the stage returns.
    cpu_threads: int | None = 1
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    nonfinite: str = "error"  # "error": raise; "skip": drop that optimizer step (counted, warned)
    max_skipped_steps: int = 10
    # the base loaded as none | nf4 | fp4 | int8 (QLoRA: needs lora_rank > 0 and a model); the
    # adapters train on it and are merged into the full-precision base at the end (quant.py)
    quantization: str = "none"
    optimizer: str = "adamw"  # adamw | adamw8bit | paged_adamw | paged_adamw8bit (quant.py)
    # recompute each layer's activations in the backward: one (B, T, H) per layer is kept
    # instead of every layer's working set (rlhf plan counts both)
    gradient_checkpointing: bool = False
    packing: str = "auto"  # packed sequences: auto | on | off (rlhf/packing.py)
    # the decoder layers compiled (regional torch.compile, rlhf/compile.py): less host time per
    # step for small models, a compile on the first steps
    torch_compile: bool = False

    def __post_init__(self) -> None:
        from rlhf.packing import check_packing

        check_packing(self.packing)
        check_common_settings(self.nonfinite, self.grad_accum_steps, self.batch_size,
                              1 if self.max_steps is None else self.max_steps,
                              max_skipped_steps=self.max_skipped_steps)
        if not (self.epochs > 0 and math.isfinite(self.epochs)):  # inf: OverflowError later
            raise ValueError(f"epochs={self.epochs!r} is out of range: SFTConfig.epochs must be "
                             f"a finite number > 0 (or set max_steps)")
        if self.lora_rank < 0 or self.lora_alpha < 1:
            raise ValueError(f"lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha}: lora_rank "
                             f"must be >= 0 (0: full-weight fine-tuning) and lora_alpha >= 1")
        check_max_memory(self.max_memory)
        check_seed(self.seed)
        check_keep_last(self.keep_last)
        check_device(self.device)
        from rlhf import quant

        quant.check_optimizer(self.optimizer, device=self.device)
        if quant.check_quantization(self.quantization) != "none" and self.model is None:
            raise ValueError(
                f"quantization={self.quantization!r} needs model=: the built-in task's SFT "
                f"trains a tiny model from scratch with full weights, there is no pretrained "
                f"base to quantize (rlhf pipeline quantization= quantizes the SFT result for the "
                f"reward and RL stages)")
        quant.check_trainable(self.quantization, self.lora_rank, "sft")
        check_settings(self, positive=("lr", "grad_clip"), non_negative=("weight_decay",),
                       fractions=("min_lr_ratio",),
                       counts=("max_length", "corpus_size", "vocab_size", "log_every",
                               "cpu_threads"),
                       zero_or_more=("warmup_steps", "save_every", "max_skipped_steps"))
        check_vocab_size(self.vocab_size)

    @classmethod
    def config_defaults(cls, values) -> SFTConfig:
        """What ``load_config`` starts from: without ``model`` (the built-in task: a tiny Llama
        from scratch), the task's own settings (``task.SFT_SETTINGS``); with one, the defaults
        for a pretrained model. A preset value that would replace a given setting is left out
        (``preset_for``: max_steps when epochs is given, lr when lora_rank changes kind)."""
        from rlhf import task
        from rlhf.config import is_set

        if is_set(values, "model"):
            return cls()
        return cls(**preset_for(task.SFT_SETTINGS, values))

    def check_used_settings(self) -> None:
        """Refuse a setting this configuration would ignore (one ValueError naming it): each
        applies to one mode only, and ``load_config`` cannot tell which mode a nested config
        ends up in until it is complete (``rlhf pipeline model=...`` sets ``sft.model`` last),
        so this runs when a run starts (and for --print-config), not in ``__post_init__``."""
        defaults = {f.name: f.default for f in dataclasses.fields(SFTConfig)}
        if self.max_steps is not None and self.epochs != defaults["epochs"]:
            raise ValueError(f"epochs={self.epochs:g} has no effect with max_steps="
                             f"{self.max_steps} (max_steps replaces epochs); set one of them")
        if self.lora_rank == 0 and self.lora_alpha != defaults["lora_alpha"]:
            raise ValueError(f"lora_alpha={self.lora_alpha} has no effect with lora_rank=0 "
                             f"(full-weight fine-tuning, no adapters); set lora_rank too, or "
                             f"remove lora_alpha")
        if self.model is not None:
            for name in ("corpus_size", "vocab_size"):
                if getattr(self, name) != defaults[name]:
                    raise ValueError(f"{name}={getattr(self, name)} has no effect with model="
                                     f"{self.model!r}: it is a setting of the built-in task "
                                     f"(no model); remove it")
        elif self.tokenizer is not None:
            raise ValueError(f"tokenizer={self.tokenizer!r} needs model=: the built-in task "
                             f"(no model) trains its own tokenizer on its corpus")

    def resolved(self, n_examples: int) -> SFTConfig:
        """A copy with the data-dependent defaults filled in: ``lr`` (2e-5 full-weight, 2e-4
        LoRA) and ``max_steps`` (``epochs`` over ``n_examples`` examples)."""
        lr = self.lr if self.lr is not None else (2e-4 if self.lora_rank else 2e-5)
        per_epoch = max(1, n_examples // self.batch_size // self.grad_accum_steps)
        steps = self.max_steps if self.max_steps is not None else \
            max(1, round(self.epochs * per_epoch))
        return dataclasses.replace(self, lr=lr, max_steps=steps)


def preset_for(preset: dict, values, prefix: str = "") -> dict:
    """``preset`` (a stage's preset settings) without what would silently replace the settings
    the raw config tree ``values`` gives: its ``max_steps`` when ``<prefix>epochs`` is set
    without ``<prefix>max_steps`` (the steps would replace the epochs), and its ``lr`` when
    ``<prefix>lora_rank`` switches between full-weight and LoRA fine-tuning without
    ``<prefix>lr`` (the preset's lr is tuned for its own kind: the run then takes the default
    of the kind asked for, 2e-5 full-weight or 2e-4 LoRA, as ``lr=None`` does)."""
    from rlhf.config import is_set, value_of

    kept = dict(preset)
    if is_set(values, prefix + "epochs") and not is_set(values, prefix + "max_steps"):
        kept.pop("max_steps", None)
    if "lr" in kept and is_set(values, prefix + "lora_rank") and not is_set(values,
                                                                          prefix + "lr"):
        if bool(value_of(values, prefix + "lora_rank", int)) != bool(kept.get("lora_rank", 0)):
            kept.pop("lr")
    return kept


def check_model_and_data(cfg: SFTConfig) -> None:
    """``rlhf sft`` loads both ``model`` and ``dataset``, or neither (the built-in task); in
    the pipeline ``sft.model`` alone runs the built-in task on that model (its own check)."""
    if (cfg.model is None) != (cfg.dataset is None):
        raise ValueError(
            "SFT needs both `model` and `dataset`, or neither (the built-in task); got "
            f"model={cfg.model!r}, dataset={cfg.dataset!r}"
        )


def printable_config(cfg: SFTConfig) -> dict:
    """What ``rlhf sft --print-config`` shows; a setting the run would refuse is refused here."""
    from rlhf.config import config_to_dict

    cfg.check_used_settings()
    check_model_and_data(cfg)
    return used_settings(cfg, config_to_dict(cfg))


def used_settings(cfg: SFTConfig, values: dict) -> dict:
    """``values`` (cfg's settings as a dict) with ``lr`` as the run takes it and without the
    settings it does not use (``check_used_settings`` refuses them changed): lora_alpha without
    LoRA, epochs beside max_steps, the built-in task's corpus_size and vocab_size with a model.
    What --print-config shows and the pipeline's summary.json records."""
    values = dict(values)
    if cfg.lr is None:  # the default the run takes (max_steps from epochs needs the data)
        values["lr"] = cfg.resolved(1).lr
    unused = (("lora_alpha",) if not cfg.lora_rank else ()) + \
        (("epochs",) if cfg.max_steps is not None else ()) + \
        (("corpus_size", "vocab_size") if cfg.model is not None else ())
    for key in unused:
        values.pop(key, None)
    return values


def token_logprobs_of(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor, packing=None) -> torch.Tensor:
    """Log-likelihood of each next token under a Hugging Face causal LM.

    input_ids, attention_mask, labels: (B, T). Returns (B, T - 1) fp32: the log-probability of
    labels[:, 1:] given the prefix; positions with label -100 give 0. Uses the fused
    hidden x lm_head op (no (B, T, V) logits tensor is built) when the lm_head is a plain Linear.
    ``packing`` (an ``rlhf.packing.Packing``): packed sequences on that path when it packs the
    batch (rlhf/packing.py); the lm_head then runs on the labelled tokens only. The logits path
    (an lm_head that is not a Linear) runs padded.
    """
    targets = labels[:, 1:]
    lm_head = model.get_output_embeddings()
    if isinstance(lm_head, torch.nn.Linear):
        from rlhf.quant import dense_weight  # a 4-bit lm_head dequantized

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        packed = packing.plan(base, input_ids, attention_mask) if packing is not None else None
        if packed is not None:
            from rlhf.packing import packed_logprobs

            return packed_logprobs(packed, packed.run(model.get_decoder()), labels,
                                   dense_weight(lm_head), lm_head.bias)
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)[0]
        return rlhf_kernels.linear_logprobs(hidden[:, :-1], dense_weight(lm_head), targets,
                                            bias=lm_head.bias)
    if packing is not None:  # the logits path runs padded: counted as such
        packing.count_padded(attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return rlhf_kernels.logprobs(logits[:, :-1], targets)


def lm_loss(logp: torch.Tensor, labels: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Sum of the response-token NLL of this micro-batch divided by the tokens of the whole step.

    logp (B, T - 1) from ``token_logprobs_of``; labels (B, T) with -100 off the response.
    Dividing by the step's token count (not the micro-batch's) makes accumulation exact.
    """
    mask = (labels[:, 1:] != -100).to(logp.dtype)
    return -(logp * mask).sum() / max(1, n_tokens)


# ----------------------------------------------------------------------------------------------
# setup helpers
# ----------------------------------------------------------------------------------------------
def _builtin_setup(cfg: SFTConfig):
    """The built-in task: corpus, tokenizer trained on it, tiny Llama from scratch."""
    from transformers import LlamaForCausalLM

    from rlhf import task

    corpus = task.make_corpus(cfg.corpus_size, seed=cfg.seed)
    tokenizer = task.train_tokenizer(
        [ex["prompt"] + ex["completion"] for ex in corpus], vocab_size=cfg.vocab_size
    )
    from rlhf.seeding import seeded

    with seeded(cfg.seed):  # the initial weights depend on the seed alone
        model = LlamaForCausalLM(task.tiny_llama_config(tokenizer))
    return model, tokenizer, corpus


def _load_model_and_data(cfg: SFTConfig):
    from rlhf import data
    from rlhf.loading import load_causal_lm, load_tokenizer

    if cfg.model is None and cfg.dataset is None:
        return _builtin_setup(cfg)
    check_model_and_data(cfg)
    # the quick checks first: a bad tokenizer or dataset stops the run before the model loads
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model,
                               setting="tokenizer" if cfg.tokenizer else "model")
    examples = data.load_sft_dataset(cfg.dataset)
    data.check_chat_rows(examples, tokenizer, cfg.dataset)
    model = load_causal_lm(cfg.model, quantization=cfg.quantization,
                           device=resolve_device(cfg.device))
    return model, tokenizer, examples


def _with_lora(model, cfg: SFTConfig):
    """``model`` with LoRA adapters of ``cfg.lora_rank`` on its linear layers (the base frozen),
    initialised from the run's seed (rlhf/seeding.py)."""
    from peft import get_peft_model

    from rlhf.models import LoraSpec, _quiet_peft
    from rlhf.seeding import seeded

    spec = LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    with _quiet_peft(), seeded(derived_seed(cfg.seed, "sft", "adapters")):
        return get_peft_model(model, spec.peft_config(model))


def _batch_indices(n_examples: int, batch_size: int, micro_step: int, seed: int) -> torch.Tensor:
    """Example indices of global micro-batch ``micro_step``: a fresh permutation each epoch,
    determined by (seed, epoch) alone so that resuming replays the same order."""
    per_epoch = max(1, n_examples // batch_size)
    epoch, index = divmod(micro_step, per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return order[index * batch_size:(index + 1) * batch_size]


def _save(directory: Path, model, optimizer, scheduler, step: int, cfg, **extra) -> None:
    """A checkpoint; `extra`: run_id (ties it to run.json), and what the summary needs when a
    resumed run has no step left to train (last_metrics, skipped_steps). Then all but the
    newest ``cfg.keep_last`` checkpoints are deleted."""
    from rlhf import distributed
    from rlhf.checkpoint import prune_checkpoints, save_state

    if not distributed.is_main():
        # torchrun: rank 0 alone writes; a full-weight host copy of the model and optimizer on
        # every rank, thrown away, took N times the model's size of host memory at each save
        return
    if cfg.lora_rank or cfg.quantization != "none":
        # the adapters only: the frozen (or quantized) base comes back from cfg.model on resume,
        # and a copy of it in every checkpoint would be gigabytes (3 GB at 1.5B in bf16)
        params = {name: t.detach().cpu() for name, t in model.named_parameters()
                  if t.requires_grad}
    else:
        params = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    save_state(directory, step=step, params=params, optimizer=optimizer.state_dict(),
               scheduler=scheduler.state_dict(), config=asdict(cfg), **extra)
    if cfg.keep_last is not None:
        prune_checkpoints(directory.parent, cfg.keep_last)


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------
@limits_cpu_threads
def train(
    cfg: SFTConfig,
    *,
    model=None,
    tokenizer=None,
    examples: Sequence[dict] | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict:
    """Run SFT; returns a summary dict (final loss, steps, output paths, the trained model).

    ``model``/``tokenizer``/``examples`` (SFT records with prompt/completion or messages) replace
    what ``cfg`` would load; the pipeline passes them. ``on_step(step, metrics)`` is called after
    every optimizer step (tests use it to interrupt a run).

    ``output_dir`` is locked for the run and tied to it by its run.json (rlhf/checkpoint.py,
    ``open_run``): a fresh run refuses a directory holding another run unless
    ``overwrite=True``; ``resume=True`` refuses changed settings.
    """
    from rlhf import checkpoint, quant

    quant.check_optimizer(cfg.optimizer, device=quant.resolve_auto(cfg.device))  # auto: CPU?
    cfg.check_used_settings()
    # rows given (the pipeline's): cfg.dataset is not read here, the caller fingerprints it
    with checkpoint.open_run(cfg.output_dir, "sft", asdict(cfg), resume=cfg.resume,
                             overwrite=cfg.overwrite, reads_data=examples is None) as run:
        return _train(cfg, run, model=model, tokenizer=tokenizer, examples=examples,
                      on_step=on_step)


def _train(cfg: SFTConfig, run, *, model, tokenizer, examples, on_step) -> dict:
    from rlhf import checkpoint, data, distributed
    from rlhf.checkpoint import interrupts_held
    from rlhf.metrics import MetricsLogger
    from rlhf.packing import Packing

    # ---- setup ----
    # torchrun: a micro-batch the ranks cannot share stops the run before anything loads
    distributed.check_split(cfg.batch_size, what="micro-batch", setting="batch_size")
    if model is None or tokenizer is None or examples is None:
        loaded = _load_model_and_data(cfg)
        model = model if model is not None else loaded[0]
        tokenizer = tokenizer if tokenizer is not None else loaded[1]
        examples = examples if examples is not None else loaded[2]
    device = resolve_device(cfg.device, cfg.max_memory)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoded = data.tokenize_sft(examples, tokenizer, max_length=cfg.max_length)
    input_ids, attention_mask, labels = (
        encoded["input_ids"], encoded["attention_mask"], encoded["labels"]
    )
    n_examples = input_ids.shape[0]
    if n_examples == 0:
        raise ValueError("the SFT dataset is empty after tokenisation; nothing to train on")
    check_vocabulary(input_ids, model, "the SFT data, tokenised,")
    check_positions(model, input_ids.shape[1], "the longest SFT example, tokenised, has",
                    f"set max_length={{positions}} or less (it is {cfg.max_length})")
    cfg = cfg.resolved(n_examples)  # lr and max_steps when left to their defaults
    from rlhf import quant

    if quant.quantization_of(model) != cfg.quantization:
        raise ValueError(f"sft: quantization={cfg.quantization!r} but the model given is "
                         f"{quant.quantization_of(model)}; load it with "
                         f"load_causal_lm(..., quantization={cfg.quantization!r})")
    if cfg.lora_rank:
        model = _with_lora(model, cfg)
    model = distributed.prepare(model, device, [p for p in model.parameters() if p.requires_grad],
                                stage="sft")  # torchrun: data parallel (rlhf/distributed.py)
    if cfg.quantization == "none":  # a quantized model was loaded onto its device
        model.to(device)
    if cfg.gradient_checkpointing:
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x
            lm.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    packing = Packing(cfg.packing)
    packing.check_model(model, "packing")
    if cfg.packing == "on" and not isinstance(model.get_output_embeddings(), torch.nn.Linear):
        warnings.warn("[sft] packing='on': this model's lm_head is not a Linear, so the loss "
                      "takes the logits path, which runs padded", stacklevel=1)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = quant.make_optimizer(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        cfg.optimizer, device, lr=cfg.lr, betas=(0.9, 0.95),
    ) if cfg.optimizer != "adamw" else torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    scheduler = warmup_cosine_schedule(optimizer, cfg.warmup_steps, cfg.max_steps,
                                       cfg.min_lr_ratio)
    autocast_dtype = autocast_dtype_for(device, cfg.bf16)
    compiled_layers = layers_context(model, cfg.torch_compile)
    step = 0
    ckpt_root = out_dir / "checkpoints"
    resumed: dict = {}
    if cfg.resume:
        last, state = run.resume_checkpoint(ckpt_root)
        if last is not None:
            resumed = state
            named = dict(model.named_parameters())
            if state["params"].keys() <= named.keys() and (
                    cfg.lora_rank or cfg.quantization != "none"):
                # the adapters only (a LoRA checkpoint of an older version holds the whole
                # state dict: loaded below)
                with torch.no_grad():
                    for name, value in state["params"].items():
                        named[name].copy_(value)
            else:
                model.load_state_dict(state["params"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step = int(state["step"])
            if distributed.is_main():  # (once, not once per torchrun rank)
                print(f"[sft] resumed from {last} at step {step}")
    logger = MetricsLogger(out_dir / "metrics.jsonl", append=cfg.resume and step > 0,
                           resume_step=step)

    # ---- train ----
    # a run resumed from its final checkpoint trains no step: its summary comes from there
    skipped = int(resumed.get("skipped_steps", 0))
    last_metrics: dict = dict(resumed.get("last_metrics", {}))

    def save(at: int) -> None:
        _save(ckpt_root / f"step-{at:07d}", model, optimizer, scheduler, at, cfg,
              run_id=run.run_id, last_metrics=last_metrics, skipped_steps=skipped)

    progress = tqdm(total=cfg.max_steps, initial=step, desc="sft", dynamic_ncols=True)
    try:
        while step < cfg.max_steps:
            started = time.perf_counter()
            # dropout draws from the global RNG: seed it per step, so that a resumed run draws
            # what the uninterrupted one did (rlhf/seeding.py)
            torch.manual_seed(derived_seed(cfg.seed, "sft", step))
            micro = [
                _batch_indices(n_examples, cfg.batch_size, step * cfg.grad_accum_steps + k,
                               cfg.seed)
                for k in range(cfg.grad_accum_steps)
            ]
            n_tokens = int(sum((labels[idx, 1:] != -100).sum() for idx in micro))
            total_loss = 0.0
            packing.take_stats()  # the token counts of this step's forwards only
            for idx in micro:
                idx = distributed.shard(idx)  # torchrun: this rank's rows of the micro-batch
                ids = input_ids[idx].to(device)
                mask = attention_mask[idx].to(device)
                lab = labels[idx].to(device)
                with compiled_layers():  # the backward too: its recomputation runs the layers
                    with torch.autocast(device.type, dtype=autocast_dtype,
                                        enabled=autocast_dtype is not None):
                        logp = token_logprobs_of(model, ids, mask, lab, packing)
                    loss = lm_loss(logp, lab, n_tokens)
                    loss.backward()
                total_loss += float(loss.detach())
            # torchrun: the gradients (and the loss) summed over ranks, one all-reduce
            total_loss, = distributed.sum_gradients(
                [p for p in model.parameters() if p.requires_grad], [total_loss])
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            # a Ctrl-C or SIGTERM from here to the step's record waits for them: inside
            # optimizer.step() it left some parameters updated and others not, and the
            # checkpoint saved then held that model as the previous step (interrupts_held)
            with interrupts_held():
                skipped = step_or_skip(optimizer, "sft", step, total_loss, grad_norm,
                                       cfg.lr, skipped, cfg)
                # a skipped step is still a step: logged (its loss non-finite), counted by
                # log_every and save_every, as in the reward and RL stages
                scheduler.step()
                step += 1
                progress.update(1)
                elapsed = time.perf_counter() - started
                last_metrics = {
                    "step": step, "loss": total_loss, "grad_norm": grad_norm,
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": n_tokens / max(elapsed, 1e-9),
                    "skipped_steps": skipped, **packing.token_stats(),
                }
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    logger.log(last_metrics, step=step)
                    progress.set_postfix(loss=f"{total_loss:.3f}")
            if on_step is not None:
                on_step(step, last_metrics)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                save(step)
    except KeyboardInterrupt:
        # a second interrupt waits for the checkpoint (torchrun sends every rank the Ctrl-C
        # the terminal already sent it: it cut the save short, and no checkpoint was left)
        with interrupts_held():
            save(step)
            if distributed.is_main():  # (the rank that wrote it)
                print(f"\n[sft] interrupted at step {step}; checkpoint saved, continue with "
                      f"resume=True")
        raise
    finally:
        progress.close()
        logger.close()

    # ---- save ----
    save(step)
    if cfg.quantization != "none":  # fold the adapter into the full-precision base
        from rlhf.models import load_causal_lm

        model = quant.merge_lora_into_dense(model, load_causal_lm(cfg.model, setting="model"))
    elif cfg.lora_rank:  # the stages after SFT load a plain model: fold the adapters in
        model = model.merge_and_unload()
    final_dir = out_dir / "model"
    checkpoint.save_pretrained_atomic(final_dir, model, tokenizer)
    return {
        "stage": "sft",
        "steps": step,
        "final_loss": last_metrics.get("loss"),
        "skipped_steps": skipped,
        "model_dir": str(final_dir),
        "model": model,
        "tokenizer": tokenizer,
    }
