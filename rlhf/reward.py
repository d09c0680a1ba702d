"""Stage 2, the reward model: one loop, setup -> train -> save.

The reward model is the shared backbone with its ``reward`` LoRA adapter and a scalar reward head
read at the last real token (``SharedBackbone.rewards``). Loss: Bradley-Terry,
``rlhf_kernels.bradley_terry_loss``: -log sigmoid(r_chosen - r_rejected), plus a small centring
term coef * mean((r_c + r_r)^2) that pins the reward's free offset near 0 (PPO then sees scores
of a stable scale). Chosen and rejected texts go through the backbone in one forward of 2B rows.

Held-out accuracy (fraction of held-out pairs where r_chosen > r_rejected) is measured every
``eval_every`` steps and at the end. On the built-in task the labels are noisy, so the best any
reward model can reach is the noise ceiling the pipeline reports beside it.
"""

from __future__ import annotations

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

__all__ = ["PairBatch", "RewardConfig", "check_held_out_settings", "evaluate", "pair_loss",
           "printable_config", "train"]


@dataclass
class RewardConfig:
    """Reward-model settings. The defaults are for a pretrained model on one GPU; the built-in
    task has its own, ``task.REWARD_SETTINGS``, which ``rlhf pipeline`` starts from."""

    output_dir: str = "runs/rm"
    model: str | None = None  # SFT model dir / hub name; the backbone gets the reward adapter
    dataset: str | None = None  # preference pairs file (prompt/chosen/rejected) or hub name
    eval_fraction: float = 0.2  # held-out share of the pairs when no eval set is given
    max_length: int = 1024
    batch_size: int = 8
    grad_accum_steps: int = 4
    epochs: float = 1.0
    lr: float = 1e-4  # the reward adapter (LoRA) and the fresh reward head
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    center_coef: float = 0.01
    lora_rank: int = 16
    lora_alpha: int = 32
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    save_every: int = 500  # 0: only at the end (and on Ctrl-C)
    keep_last: int | None = 2  # checkpoints kept (the newest); None: keep every one
    resume: bool = False
    overwrite: bool = False  # a fresh run deletes an earlier run's files in output_dir first
    device: str = "auto"
    max_memory: float | None = None  # GiB: cap CUDA memory (emulates a smaller card)
    cpu_threads: int | None = 1  # torch threads on the CPU (None: torch's default); see SFTConfig
    bf16: bool = True
    nonfinite: str = "error"
    max_skipped_steps: int = 10
    quantization: str = "none"  # the base: none | nf4 | fp4 | int8 (rlhf/quant.py)
    optimizer: str = "adamw"  # adamw | adamw8bit | paged_adamw | paged_adamw8bit
    gradient_checkpointing: bool = False  # recompute layer activations in the backward
    packing: str = "auto"  # packed sequences: auto | on | off (rlhf/packing.py)
    torch_compile: bool = False  # the decoder layers compiled (rlhf/compile.py)

    def __post_init__(self) -> None:
        from rlhf.packing import check_packing

        check_packing(self.packing)
        from rlhf import quant

        quant.check_quantization(self.quantization)
        quant.check_optimizer(self.optimizer, device=self.device)
        check_common_settings(self.nonfinite, self.grad_accum_steps, self.batch_size, 1,
                              max_skipped_steps=self.max_skipped_steps)
        check_max_memory(self.max_memory)
        check_seed(self.seed)
        check_keep_last(self.keep_last)
        check_device(self.device)
        check_settings(self, positive=("lr", "grad_clip", "lora_alpha"),
                       non_negative=("weight_decay", "center_coef"), fractions=("min_lr_ratio",),
                       counts=("max_length", "lora_rank", "log_every", "cpu_threads"),
                       zero_or_more=("warmup_steps", "eval_every", "save_every",
                                     "max_skipped_steps"))
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):  # inf: OverflowError later
            raise ValueError(f"epochs must be a finite number > 0, got {self.epochs}")


def check_held_out_settings(cfg: RewardConfig) -> None:
    """Refuse eval_every with eval_fraction=0 when the pairs to evaluate on come from the
    dataset (no eval set given): nothing would be held out to evaluate."""
    if cfg.eval_every and not cfg.eval_fraction:
        raise ValueError(f"eval_every={cfg.eval_every} has no effect with eval_fraction=0: no "
                         f"pairs are held out to evaluate on; set eval_fraction > 0 or remove "
                         f"eval_every")


def printable_config(cfg: RewardConfig) -> dict:
    """What ``rlhf rm --print-config`` shows; a setting the run would refuse is refused here."""
    from rlhf.config import config_to_dict

    check_held_out_settings(cfg)
    return config_to_dict(cfg)


@dataclass
class PairBatch:
    """Tokenised preference pairs, each side right-padded to its own length.

    chosen_ids, chosen_mask: (N, Tc) int64; rejected_ids, rejected_mask: (N, Tr) int64.
    """

    chosen_ids: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_ids: torch.Tensor
    rejected_mask: torch.Tensor

    def __len__(self) -> int:
        return self.chosen_ids.shape[0]

    def select(self, index: torch.Tensor, device: torch.device) -> PairBatch:
        """Rows ``index``, trimmed to the longest row of the selection, moved to ``device``."""

        def take(ids, mask):
            ids, mask = ids[index], mask[index]
            width = int(mask.sum(-1).max()) if len(index) else 0
            # right padding: the real tokens are the first ``width`` columns
            return ids[:, :width].to(device), mask[:, :width].to(device)

        c_ids, c_mask = take(self.chosen_ids, self.chosen_mask)
        r_ids, r_mask = take(self.rejected_ids, self.rejected_mask)
        return PairBatch(c_ids, c_mask, r_ids, r_mask)


def encode_pairs(pairs: Sequence[dict], tokenizer, max_length: int) -> PairBatch:
    """Preference records -> PairBatch, through ``rlhf.data.tokenize_preferences``."""
    from rlhf import data

    enc = data.tokenize_preferences(pairs, tokenizer, max_length=max_length)
    return PairBatch(enc["chosen_input_ids"], enc["chosen_attention_mask"],
                     enc["rejected_input_ids"], enc["rejected_attention_mask"])


def _pad_cat(a: torch.Tensor, b: torch.Tensor, value: int) -> torch.Tensor:
    """Stack two right-padded (N, Ta) and (N, Tb) tensors into (2N, max(Ta, Tb))."""
    width = max(a.shape[1], b.shape[1])
    a = torch.nn.functional.pad(a, (0, width - a.shape[1]), value=value)
    b = torch.nn.functional.pad(b, (0, width - b.shape[1]), value=value)
    return torch.cat([a, b], dim=0)


def pair_rewards(backbone, batch: PairBatch, pad_token_id: int):
    """Rewards of both sides in one forward: -> (chosen (N,), rejected (N,)) fp32."""
    ids = _pad_cat(batch.chosen_ids, batch.rejected_ids, pad_token_id)
    mask = _pad_cat(batch.chosen_mask, batch.rejected_mask, 0)
    rewards = backbone.rewards(ids, mask)
    n = len(batch)
    return rewards[:n], rewards[n:]


def pair_loss(backbone, batch: PairBatch, pad_token_id: int, center_coef: float):
    """Bradley-Terry loss of a batch of pairs -> (loss (), stats of detached floats)."""
    chosen, rejected = pair_rewards(backbone, batch, pad_token_id)
    loss, stats = rlhf_kernels.bradley_terry_loss(chosen, rejected, center_coef=center_coef)
    return loss, {k: float(v) for k, v in stats.items()}


@torch.no_grad()
def evaluate(backbone, pairs: PairBatch, pad_token_id: int, batch_size: int = 128,
             autocast_dtype: torch.dtype | None = None) -> dict:
    """Held-out Bradley-Terry loss and accuracy over every pair (no centring term), the rewards
    computed under ``autocast_dtype`` autocast (None: none); ``train`` passes the one it trains
    under, so that the accuracy is that of the model as it trains (and as RL scores with it)."""
    device = backbone.device
    losses, correct, n = 0.0, 0.0, len(pairs)
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(n, start + batch_size))
        with torch.autocast(device.type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            chosen, rejected = pair_rewards(backbone, pairs.select(index, device),
                                            pad_token_id)
            loss, stats = rlhf_kernels.bradley_terry_loss(chosen, rejected)  # as pair_loss
        losses += float(loss) * len(index)
        correct += float(stats["accuracy"]) * len(index)
    return {"eval_loss": losses / max(1, n), "eval_accuracy": correct / max(1, n),
            "eval_pairs": n}


def _pairs_also_in(pairs: PairBatch, others: PairBatch) -> int:
    """How many of ``pairs`` (chosen and rejected tokens) are also in ``others``: each pair
    hashed to one int64 (random position weights, wrapping arithmetic; right padding puts a
    row's tokens in its first columns whatever the batch's width), then ``torch.isin``."""
    if not len(pairs) or not len(others):
        return 0
    width = max(pairs.chosen_ids.shape[1], pairs.rejected_ids.shape[1],
                others.chosen_ids.shape[1], others.rejected_ids.shape[1])
    weights = torch.randint(1, 2**62, (2, width), generator=torch.Generator().manual_seed(0))

    def keys(batch: PairBatch) -> torch.Tensor:
        key = torch.zeros(len(batch), dtype=torch.int64)
        for side, (ids, mask) in enumerate(((batch.chosen_ids, batch.chosen_mask),
                                            (batch.rejected_ids, batch.rejected_mask))):
            key += ((ids.long() + 1) * (mask != 0) * weights[side, :ids.shape[1]]).sum(-1)
        return key

    return int(torch.isin(keys(pairs), keys(others)).sum())


def _split(pairs: PairBatch, eval_fraction: float, seed: int) -> tuple[PairBatch, PairBatch]:
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    n_eval = int(round(len(pairs) * eval_fraction))
    return pairs.select(order[n_eval:], torch.device("cpu")), \
        pairs.select(order[:n_eval], torch.device("cpu"))


def _save(directory: Path, backbone, optimizer, scheduler, step: int, cfg, **extra) -> None:
    """A checkpoint (+ `extra`, see rlhf.sft._save), then prune to ``cfg.keep_last``."""
    from rlhf.checkpoint import prune_checkpoints, save_state

    params = {name: p.detach().cpu() for name, p in backbone.named_trainable_parameters("reward")}
    save_state(directory, step=step, params=params, optimizer=optimizer.state_dict(),
               scheduler=scheduler.state_dict(), config=asdict(cfg), **extra)
    if cfg.keep_last is not None:
        prune_checkpoints(directory.parent, cfg.keep_last)


@limits_cpu_threads
def train(
    cfg: RewardConfig,
    *,
    backbone=None,
    tokenizer=None,
    train_pairs: Sequence[dict] | None = None,
    eval_pairs: Sequence[dict] | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train the reward adapter + head; returns a summary with the held-out accuracy.

    ``backbone`` (a SharedBackbone), ``tokenizer`` and the pair lists replace what ``cfg`` would
    load. Without ``eval_pairs``, ``eval_fraction`` of the pairs is held out. ``output_dir`` is
    locked and tied to the run by its run.json, as in ``rlhf.sft.train``.
    """
    from rlhf import checkpoint, quant

    quant.check_optimizer(cfg.optimizer, device=quant.resolve_auto(cfg.device))  # auto: CPU?
    # pairs given (the pipeline's): cfg.dataset is not read here, the caller fingerprints it
    with checkpoint.open_run(cfg.output_dir, "rm", asdict(cfg), resume=cfg.resume,
                             overwrite=cfg.overwrite, reads_data=train_pairs is None) as run:
        return _train(cfg, run, backbone=backbone, tokenizer=tokenizer, train_pairs=train_pairs,
                      eval_pairs=eval_pairs, on_step=on_step)


def _train(cfg: RewardConfig, run, *, backbone, tokenizer, train_pairs, eval_pairs,
           on_step) -> dict:
    from rlhf import data, distributed
    from rlhf.checkpoint import interrupts_held
    from rlhf.metrics import MetricsLogger
    from rlhf.models import LoraSpec, SharedBackbone

    # ---- setup ----
    # the quick checks first: a missing or broken dataset stops the run before the model loads,
    # as does (torchrun) a micro-batch the ranks cannot share
    distributed.check_split(cfg.batch_size, what="micro-batch of pairs", setting="batch_size")
    if eval_pairs is None:
        check_held_out_settings(cfg)
    if train_pairs is None:
        if cfg.dataset is None:
            raise ValueError("RewardConfig.dataset is required: a prompt/chosen/rejected file")
        train_pairs = data.load_preference_dataset(cfg.dataset)
    if backbone is None:
        if cfg.model is None:
            raise ValueError("RewardConfig.model is required: the SFT model directory or hub name")
        from rlhf.models import load_tokenizer

        tokenizer = tokenizer or load_tokenizer(cfg.model, setting="model")
        data.check_chat_rows(train_pairs, tokenizer, cfg.dataset if cfg.dataset else None)
        backbone = SharedBackbone.from_pretrained(
            cfg.model, lora=LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha), seed=cfg.seed,
            quantization=cfg.quantization, device=resolve_device(cfg.device),
            gradient_checkpointing=cfg.gradient_checkpointing)
    elif backbone.quantization != cfg.quantization:
        raise ValueError(f"rm: quantization={cfg.quantization!r} but the backbone given is "
                         f"{backbone.quantization}")
    elif cfg.gradient_checkpointing:
        backbone.enable_gradient_checkpointing()
    pad_id = tokenizer.pad_token_id
    train_set = encode_pairs(train_pairs, tokenizer, cfg.max_length)
    for ids in (train_set.chosen_ids, train_set.rejected_ids):
        check_vocabulary(ids, backbone.causal_lm, "the preference pairs, tokenised,")
        check_positions(backbone.causal_lm, ids.shape[1], "the longest preference text, "
                        "tokenised, has", f"set max_length={{positions}} or less (it is "
                        f"{cfg.max_length})")
    if eval_pairs is not None:
        eval_set = encode_pairs(eval_pairs, tokenizer, cfg.max_length)
    else:
        n_pairs = len(train_set)
        train_set, eval_set = _split(train_set, cfg.eval_fraction, cfg.seed)
        if cfg.eval_fraction and len(eval_set) == 0:
            # the summary would have no held-out accuracy, and nothing would say why
            warnings.warn(f"eval_fraction={cfg.eval_fraction} of {n_pairs} pair(s) holds out "
                          f"none (it rounds to 0): no held-out evaluation; give at least "
                          f"{math.floor(0.5 / cfg.eval_fraction) + 1} pairs, or eval_fraction=0 to "
                          f"train without one", stacklevel=1)
    if len(train_set) == 0:
        raise ValueError("no training pairs left for the reward model (empty dataset?)")
    leaked = _pairs_also_in(eval_set, train_set)
    if leaked:  # the held-out accuracy would partly measure memorised training pairs
        warnings.warn(f"[rm] {leaked} of {len(eval_set)} held-out pairs are also training pairs "
                      f"(the same tokens): the held-out figures overstate; remove the duplicate "
                      f"pairs from the data", stacklevel=1)
    device = resolve_device(cfg.device, cfg.max_memory)
    backbone = distributed.prepare(backbone, device, None, stage="rm")  # torchrun: ddp / fsdp2
    backbone.to(device)
    backbone.train()
    backbone.set_packing(cfg.packing)
    params = backbone.trainable_parameters("reward")
    from rlhf.quant import make_optimizer

    optimizer = (make_optimizer(params, cfg.optimizer, device, lr=cfg.lr,
                                weight_decay=cfg.weight_decay) if cfg.optimizer != "adamw"
                 else torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    # micro-batches of batch_size pairs per epoch (at least one, of all pairs when there are
    # fewer); a step takes grad_accum_steps of them, running into the next epoch if need be
    micro_per_epoch = max(1, len(train_set) // cfg.batch_size)
    steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum_steps)
    max_steps = max(1, int(round(cfg.epochs * steps_per_epoch)))
    scheduler = warmup_cosine_schedule(optimizer, cfg.warmup_steps, max_steps, cfg.min_lr_ratio)
    autocast_dtype = autocast_dtype_for(device, cfg.bf16)
    compiled_layers = layers_context(backbone.causal_lm, cfg.torch_compile)
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    step = 0
    resumed: dict = {}
    if cfg.resume:
        last, state = run.resume_checkpoint(ckpt_root)
        if last is not None:
            resumed = state
            named = dict(backbone.named_trainable_parameters("reward"))
            with torch.no_grad():
                for name, value in state["params"].items():
                    named[name].copy_(value)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step = int(state["step"])
            if distributed.is_main():  # (once, not once per torchrun rank)
                print(f"[rm] resumed from {last} at step {step}")
    logger = MetricsLogger(out_dir / "metrics.jsonl", append=cfg.resume and step > 0,
                           resume_step=step)

    # ---- train ----
    # a run resumed from its final checkpoint trains no step: its summary comes from there
    skipped = int(resumed.get("skipped_steps", 0))
    metrics: dict = dict(resumed.get("last_metrics", {}))

    def save(at: int, **final) -> None:
        _save(ckpt_root / f"step-{at:07d}", backbone, optimizer, scheduler, at, cfg,
              run_id=run.run_id, last_metrics=metrics, skipped_steps=skipped, **final)

    def finish_step() -> None:
        """The done step's evaluation (when due) and its metrics record; a Ctrl-C in it leaves
        the step's record unwritten, and the checkpoint says so (``unlogged``)."""
        if cfg.eval_every and step % cfg.eval_every == 0 and len(eval_set):
            with compiled_layers():
                metrics.update(evaluate(backbone, eval_set, pad_id,
                                        autocast_dtype=autocast_dtype))
        if step % cfg.log_every == 0 or step == max_steps or "eval_accuracy" in metrics:
            logger.log(metrics, step=step)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}",
                                 acc=f"{metrics.get('train_accuracy', 0):.2f}")

    progress = tqdm(total=max_steps, initial=step, desc="reward model", dynamic_ncols=True)
    unlogged = False  # a done step whose evaluation and record are still to come
    try:
        if resumed.get("unlogged"):  # interrupted in its evaluation: finish that step first
            unlogged = True
            finish_step()
            unlogged = False
        while step < max_steps:
            started = time.perf_counter()
            # dropout draws from the global RNG: seeded per step, so resuming replays it
            torch.manual_seed(derived_seed(cfg.seed, "reward", step))
            stats_sum: dict[str, float] = {}
            total_loss = 0.0
            n_pairs = 0  # batch_size x grad_accum_steps, or fewer: all pairs when there are fewer
            backbone.packing.take_stats()  # the token counts of this step's forwards only
            for k in range(cfg.grad_accum_steps):
                micro_step = step * cfg.grad_accum_steps + k
                epoch, index = divmod(micro_step, micro_per_epoch)
                order = torch.randperm(
                    len(train_set), generator=torch.Generator().manual_seed(cfg.seed * 31 + epoch))
                rows = order[index * cfg.batch_size:(index + 1) * cfg.batch_size]
                n_pairs += len(rows)
                local_rows = distributed.shard(rows, what="micro-batch of pairs")  # torchrun
                batch = train_set.select(local_rows, device)
                with compiled_layers():  # the backward too: its recomputation runs the layers
                    with torch.autocast(device.type, dtype=autocast_dtype,
                                        enabled=autocast_dtype is not None):
                        loss, stats = pair_loss(backbone, batch, pad_id, cfg.center_coef)
                    # torchrun: this rank's part of the mean over the micro-batch's pairs
                    loss, stats = distributed.weighted(loss, stats, len(local_rows), len(rows))
                    (loss / cfg.grad_accum_steps).backward()
                total_loss += float(loss.detach()) / cfg.grad_accum_steps
                for key, value in stats.items():
                    stats_sum[key] = stats_sum.get(key, 0.0) + value / cfg.grad_accum_steps
            # torchrun: gradients, loss and stats summed over ranks in one all-reduce
            total_loss, *summed = distributed.sum_gradients(
                params, [total_loss, *stats_sum.values()])
            stats_sum = dict(zip(stats_sum, summed, strict=True))
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            # a Ctrl-C or SIGTERM in the optimizer step waits for the step to be whole (it
            # left some parameters updated and others not, saved as the previous step); the
            # evaluation and record after it stay interruptible (``unlogged``)
            with interrupts_held():
                skipped = step_or_skip(optimizer, "rm", step, total_loss, grad_norm,
                                       cfg.lr, skipped, cfg)
                scheduler.step()
                step += 1
                progress.update(1)
                metrics = {"step": step, "loss": total_loss, "grad_norm": grad_norm,
                           "lr": scheduler.get_last_lr()[0], "skipped_steps": skipped,
                           "pairs_per_s": n_pairs / max(time.perf_counter() - started, 1e-9),
                           **backbone.packing.token_stats(),
                           **{f"train_{k}": v for k, v in stats_sum.items()}}
                unlogged = True
            finish_step()
            unlogged = False
            if on_step is not None:
                on_step(step, metrics)
            if cfg.save_every and step % cfg.save_every == 0 and step < max_steps:
                save(step)
    except KeyboardInterrupt:
        # a second interrupt (torchrun's copy of a Ctrl-C) waits for the checkpoint (rlhf/sft.py)
        with interrupts_held():
            save(step, **({"unlogged": True} if unlogged else {}))
            if distributed.is_main():
                print(f"\n[rm] interrupted at step {step}; checkpoint saved, continue with "
                      f"resume=True")
        raise
    finally:
        progress.close()

    # ---- save ----
    if "final_eval" in resumed:  # the final checkpoint: evaluated and logged before the kill
        final = dict(resumed["final_eval"])
    else:
        try:
            with compiled_layers():
                final = (evaluate(backbone, eval_set, pad_id, autocast_dtype=autocast_dtype)
                         if len(eval_set) else {})
        except KeyboardInterrupt:  # the steps are done: keep them (resume evaluates again)
            with interrupts_held():
                save(step)
                if distributed.is_main():
                    print(f"\n[rm] interrupted in the final evaluation at step {step}; "
                          f"checkpoint saved, continue with resume=True")
                logger.close()
            raise
        logger.log({"step": step, **final}, step=step)
    logger.close()
    save(step, final_eval=final)
    with distributed.full_weights(backbone):  # fsdp2: every rank gathers, rank 0 writes
        if distributed.is_main():
            backbone.save(out_dir / "backbone")
            tokenizer.save_pretrained(out_dir / "backbone")  # `rlhf ppo model=...` stands alone
    return {"stage": "reward", "steps": step, "final_loss": metrics.get("loss"),
            "skipped_steps": skipped, "train_pairs": len(train_set), **final,
            "backbone_dir": str(out_dir / "backbone")}
