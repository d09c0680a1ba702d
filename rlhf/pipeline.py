"""SFT -> pairs -> reward model -> RL -> evaluation, on the built-in task or on your data.

``rlhf pipeline`` (no arguments) calls ``run(PipelineConfig())``. The RL stage runs
``algorithm`` (default ppo; grpo, dr_grpo, rloo, gspo, dapo, cispo, sapo: rlhf/rl.py) with the
``ppo.*`` settings; its folder is named after the algorithm (``ppo/``, ``grpo/``, ...), and the
summary's ``ppo_*`` figures are those of the RL policy whatever the algorithm (``algorithm``
says which). Everything lands under ``cfg.output_dir`` (default ``runs/pipeline``)::

    tokenizer/            the BPE tokenizer trained on the corpus
    sft/                  SFT metrics.jsonl, checkpoints/, model/ (the tiny Llama = the reference)
    pairs.jsonl           preference pairs sampled from the SFT model, labelled by VADER + noise
    rm/                   reward-model metrics.jsonl, checkpoints/, backbone/ (reward adapter)
    ppo/                  PPO metrics.jsonl, checkpoints/, backbone/ (policy, critic, reward)
                          (grpo/ etc. for another algorithm: no critic)
    metrics.jsonl         the PPO curves (a copy of ppo/metrics.jsonl)
    curves.png            proxy reward, gold reward, KL, entropy, losses per PPO iteration
    samples.md            held-out samples of the SFT model and of the PPO policy, with scores
    summary.json          the numbers below, plus timings (of the invocation that wrote it;
                          after --resume, done_before lists the stages it loaded, not ran)

Preference pairs (built-in task): two responses of the SFT model to each of ``pair_prompts``
prompts, drawn at ``pair_temperature`` with ``pair_top_k`` / ``pair_top_p`` filtering; each left
at None samples as the RL stage does (``ppo.temperature``, ``ppo.top_k``, ``ppo.top_p``), so that
the reward model learns on responses drawn like those it scores in RL, and ``--print-config``
shows the value used. Their lengths are the RL stage's (``ppo.max_prompt_length``,
``ppo.max_new_tokens``): the reward model scores responses of those lengths.

Evaluation on held-out prompts (prompt combinations PPO never saw): ``eval_samples`` responses
from the SFT model (the backbone with adapters off) and from the PPO policy, each scored by the
gold judge (VADER), both drawn with the RL stage's sampling settings (the policy's KL is
measured at the temperature it was trained at). Reported: mean +- standard error of each, the
difference and its size in standard errors of the difference, sqrt(se_sft^2 + se_ppo^2) (two
independent samples), and the mean summed KL(policy || SFT) of the policy's samples (k1
estimate, nats per response) next to the bound ``kl_bound`` (default: the PPO ``kl_target``).

Your model and data: ``sft.model`` alone runs the built-in task on your model (its tokenizer,
the built-in corpus, pairs, prompts and gold judge). ``sft.model`` with ``sft.dataset``,
``reward.dataset`` (prompt/chosen/rejected pairs, ``heldout_pair_fraction`` of them held out) and
``ppo.dataset`` (prompts) runs every stage on your data; there is no gold judge then, so the
summary has the reward model's held-out accuracy and the PPO curves but no gold figures, and
``samples.md`` shows a few of your prompts before and after PPO, unscored. The stage settings
start from the built-in task's (``task.SFT_SETTINGS`` etc.) for the tiny model, from the task's
presets for a pretrained model (``task.PRETRAINED_*``: LoRA SFT, short sequences, a small pair
set and a few RL iterations, sized for a 135M model on a CPU; ``model=smollm2-135m-instruct``,
docs/real_model.md) when the built-in task runs on your model, and from the stages' defaults
on your data. A setting the pipeline cannot honour is refused, never
ignored (``check_settings``), and ``summary.json`` records only the settings the run used.

``resume=True`` skips every stage whose outputs are complete (its ``summary.json`` exists) and
resumes the interrupted stage from its last checkpoint. ``output_dir`` is locked for the run and
its ``run.json`` ties every file there to it (rlhf/checkpoint.py, ``open_run``): resuming with a
changed setting is refused (a finished stage must not be reused under settings it was not run
with), and a fresh run into a directory holding a run is refused unless ``overwrite=true``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf import distributed, reward, sft, stage, task
from rlhf import rl as ppo
from rlhf.checkpoint import (
    PIPELINE_RUN_FILES,
    RESUME_SAFE_KEYS,
    STAGE_RUN_FILES,
    RunDirectory,
    atomic_directory,
    atomic_write_text,
    open_run,
)
from rlhf.config import named_as_typed, nested_error, warnings_named
from rlhf.engine import RolloutEngine
from rlhf.seeding import seeded

__all__ = ["PipelineConfig", "check_settings", "mean_stderr", "pair_sampling_config", "run",
           "sample_texts", "stage_configs"]
# `rlhf pipeline` prints its figures and points at this file under output_dir (rlhf/cli.py)
SUMMARY_FILE = "summary.json"


def _sft_defaults() -> sft.SFTConfig:
    return sft.SFTConfig(**task.SFT_SETTINGS)


def _reward_defaults() -> reward.RewardConfig:
    return reward.RewardConfig(**task.REWARD_SETTINGS)


# The built-in task's RL settings for a critic-free algorithm: PPO's (task.PPO_SETTINGS) without
# the critic's, and a stronger KL weight. k3 per token in the loss at PPO's kl_coef=0.1 let GRPO
# drift past the 6-nat bound (6.5 nats on held-out prompts); 0.3 kept it at 2.1 for the same
# gold gain (20 standard errors), 0.2 at 5.3 (measured on this task, seed 0; README).
CRITIC_FREE_TASK_SETTINGS = {"kl_coef": 0.3}


def _stage_algorithm(algorithm: str) -> dict:
    """The RL stage config's ``algorithm`` for a pipeline of ``algorithm``: the stage's own
    settings (``ppo.group_size=...``, ``ppo.advantage_estimator=...`` on the command line) are
    checked under the presets they will run with, not PPO's (an unknown one: PPO's, and
    check_settings refuses it)."""
    return {"algorithm": algorithm if algorithm in ppo.ALGORITHMS else "ppo"}


def _ppo_defaults(algorithm: str = "ppo", task_name: str = "reviews") -> ppo.PPOConfig:
    if task_name == "arithmetic":
        from rlhf import arithmetic

        critic = algorithm in ppo.PRESETS and ppo.PRESETS[algorithm]["advantage_estimator"] == "gae"
        return ppo.PPOConfig(**(arithmetic.CRITIC_RL_SETTINGS if critic
                                else arithmetic.RL_SETTINGS), **_stage_algorithm(algorithm))
    settings = dict(task.PPO_SETTINGS)
    if algorithm in ppo.PRESETS and ppo.PRESETS[algorithm]["advantage_estimator"] != "gae":
        settings = {k: v for k, v in settings.items() if k not in ppo.CRITIC_SETTINGS}
        settings.update(CRITIC_FREE_TASK_SETTINGS)
    return ppo.PPOConfig(**settings, **_stage_algorithm(algorithm))


def _pretrained_ppo_defaults(algorithm: str = "ppo") -> ppo.PPOConfig:
    """The RL stage's settings of the review task on a pretrained model (task.PRETRAINED_*)."""
    critic = algorithm not in ppo.PRESETS or ppo.PRESETS[algorithm]["advantage_estimator"] == "gae"
    return ppo.PPOConfig(**(task.PRETRAINED_PPO_SETTINGS if critic
                            else task.PRETRAINED_RL_SETTINGS), **_stage_algorithm(algorithm))


def _pretrained_stage_defaults(algorithm: str = "ppo") -> dict:
    """The review task on a pretrained model without datasets: the pipeline's and every stage's
    settings (task.PRETRAINED_*), sized for a 135M model on a CPU (docs/real_model.md)."""
    return {**task.PRETRAINED_PIPELINE_SETTINGS,
            "sft": sft.SFTConfig(**task.PRETRAINED_SFT_SETTINGS),
            "reward": reward.RewardConfig(**task.PRETRAINED_REWARD_SETTINGS),
            "ppo": _pretrained_ppo_defaults(algorithm)}


@dataclass
class PipelineConfig:
    """SFT -> reward model -> PPO. Stage settings nest (``ppo.kl_target=4`` on the CLI).

    Without datasets it runs the built-in review task, on a tiny Llama trained from scratch
    (the stages start from ``task.SFT_SETTINGS`` etc.) or on your model (``model`` or
    ``sft.model``; the pipeline and the stages then start from the task's presets for a
    pretrained model, ``task.PRETRAINED_*``: ``load_config`` does this through
    ``config_defaults``, ``PipelineConfig(model=...)`` in ``__post_init__`` for the settings
    left at their defaults). With ``sft.model``, ``sft.dataset``, ``reward.dataset`` and
    ``ppo.dataset`` it runs on your model and data, from the stages' defaults for pretrained
    models.
    Every stage's ``output_dir``, ``seed``, ``device``, ``max_memory``, ``resume``,
    ``overwrite`` and ``cpu_threads`` come from the fields here; setting them per stage (or a
    setting that has no effect in the chosen mode) is refused (``check_settings``)."""

    output_dir: str = "runs/pipeline"
    # reviews: the built-in review task (SFT -> reward model -> RL); arithmetic: RL alone with a
    # verifiable reward on a pretrained chat model (rlhf/arithmetic.py)
    task: str = "reviews"
    # the pretrained model (a path, hub name or named model such as smollm2-135m-instruct):
    # task=arithmetic trains it; task=reviews starts SFT from it (the same as sft.model)
    model: str | None = None
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # a fresh run deletes an earlier run's files in output_dir first
    device: str = "auto"
    max_memory: float | None = None  # GiB: cap CUDA memory (emulates a smaller card)
    corpus_size: int = 4000  # built-in task: SFT examples
    vocab_size: int = 1024  # built-in task, tiny model: its tokenizer
    hidden_size: int = 64  # built-in task, tiny model
    num_layers: int = 2  # built-in task, tiny model
    pair_prompts: int = 2000  # built-in task: each gets two SFT samples -> one labelled pair
    heldout_pair_fraction: float = 0.2  # preference pairs held out to measure the reward model
    label_beta: float = 5.0  # built-in task: Bradley-Terry inverse temperature of the annotator
    # built-in task: how each pair's two SFT samples are drawn; None: as the RL stage samples
    # (ppo.temperature, ppo.top_k, ppo.top_p: the responses the reward model will score)
    pair_temperature: float | None = None
    pair_top_k: int | None = None  # 0: off
    pair_top_p: float | None = None  # 1.0: off
    lora_rank: int = 16
    lora_alpha: int = 32
    # prompts per sampling batch: the built-in task's preference pairs and held-out samples,
    # your prompts' samples.md, task=arithmetic's greedy held-out accuracy. Part of the
    # results, not only of speed and memory: every batch draws from one random stream, so
    # another value samples other pairs and other held-out responses (and so other reward
    # model, RL run and figures); --resume refuses a change, as for any such setting
    sample_batch_size: int = 256
    eval_samples: int = 400  # built-in task: responses per policy on held-out prompts
    kl_bound: float | None = None  # built-in task; None: ppo.kl_target
    # the RL stage's: ppo | grpo | dr_grpo | rloo | gspo | dapo | cispo | sapo
    algorithm: str = "ppo"
    # torch intra-op threads when running on the CPU (None: torch's default, OMP_NUM_THREADS).
    # The tiny model's matrices are too small to gain much from more threads, and when other
    # processes share the cores, multi-thread barriers make every op many times slower
    # (measured here: an SFT step took 0.13 s on 1 thread vs 1.9 s on 2 on a busy 2-core box).
    cpu_threads: int | None = 1
    n_show_samples: int = 8
    # the shared backbone's base for the reward model, RL and the evaluation: none | nf4 | fp4 |
    # int8 (rlhf/quant.py). SFT trains on it too when it trains LoRA on a pretrained model
    # (sft.lora_rank > 0: QLoRA); full-weight SFT (the built-in tiny model) trains in full
    # precision and the later stages load its result quantized (docs/quantization.md)
    quantization: str = "none"
    # every stage recomputes layer activations in its backward (each stage's own setting)
    gradient_checkpointing: bool = False
    eval_problems: int = 500  # task=arithmetic: held-out problems of the greedy accuracy
    curve_every: int = 10  # task=arithmetic: held-out accuracy every N iterations (0: off) ...
    curve_problems: int = 100  # ... on the first N held-out problems, for the curve
    sft: sft.SFTConfig = field(default_factory=_sft_defaults)
    reward: reward.RewardConfig = field(default_factory=_reward_defaults)
    ppo: ppo.PPOConfig = field(default_factory=_ppo_defaults)

    def __post_init__(self) -> None:
        from rlhf import quant

        self._check_own_settings()
        quant.check_quantization(self.quantization)
        if getattr(self, "task", "reviews") != "reviews" and self.quantization != "none":
            raise ValueError(f"quantization={self.quantization!r} is not supported with "
                             f"task={self.task!r} yet; the review task's stages take it")
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is not a task; expected one of {TASKS}")
        # PipelineConfig(algorithm="grpo") in Python: the RL stage, left at the built-in task's
        # PPO settings, starts from the task's settings for that algorithm instead
        if (self.algorithm != "ppo" or self.task != "reviews") and self.ppo == _ppo_defaults():
            self.ppo = _ppo_defaults(self.algorithm, self.task)
        if self.task == "reviews" and self.model is not None:
            # model= is sft.model; the stages then start from their pretrained-model defaults
            if self.sft.model not in (None, self.model):
                raise ValueError(f"model={self.model!r} and sft.model={self.sft.model!r} differ; "
                                 f"give one of them")
            if self.sft == _sft_defaults():
                own_data = any(stage_cfg.dataset is not None
                               for stage_cfg in (self.reward, self.ppo))
                self.sft = sft.SFTConfig()
                if self.reward == _reward_defaults():
                    self.reward = reward.RewardConfig()
                if self.ppo in (_ppo_defaults(), _ppo_defaults(self.algorithm)):
                    self.ppo = ppo.PPOConfig()
                if not own_data:  # the built-in task on this model: its pretrained presets
                    self._use_pretrained_presets()
            self.sft = replace(self.sft, model=self.model)

    def _check_own_settings(self) -> None:
        """The pipeline's own settings in their ranges, before anything runs: out of range,
        they would stop the run only after SFT (a sampling batch of 0, no held-out pair),
        with a traceback (a tiny model of hidden size 0), or not at all (kl_bound=-1)."""
        stage.check_device(self.device)
        stage.check_max_memory(self.max_memory)
        stage.check_seed(self.seed)
        stage.check_settings(
            self, positive=("label_beta", "kl_bound", "pair_temperature"),
            counts=("corpus_size", "vocab_size", "hidden_size", "num_layers", "pair_prompts",
                    "lora_rank", "lora_alpha", "sample_batch_size", "cpu_threads",
                    "eval_problems", "curve_problems"),
            zero_or_more=("n_show_samples", "curve_every", "pair_top_k"))
        sft.check_vocab_size(self.vocab_size)
        if self.pair_top_p is not None and not 0.0 < self.pair_top_p <= 1.0:
            raise ValueError(f"pair_top_p={self.pair_top_p!r} is out of range: it must be in "
                             f"(0, 1] (1 = off; null: the RL stage's ppo.top_p)")
        if self.eval_samples < 2:  # as rlhf frontier: one sample has no standard error
            raise ValueError(f"eval_samples={self.eval_samples} is out of range: it must be >= 2 "
                             f"(the held-out figures are means with their standard errors)")
        if not 0.0 < self.heldout_pair_fraction < 1.0:
            raise ValueError(f"heldout_pair_fraction={self.heldout_pair_fraction!r} is out of "
                             f"range: it must be in (0, 1) (the share of the preference pairs "
                             f"held out to measure the reward model; the rest trains it)")
        if self.hidden_size % 8:
            raise ValueError(f"hidden_size={self.hidden_size} is out of range: the built-in "
                             f"tiny model has 4 attention heads of an even size (rotary "
                             f"positions), so hidden_size must be a multiple of 8 (default 64)")

    def _use_pretrained_presets(self) -> None:
        """The built-in review task on a pretrained model (``model=`` in Python, the stages left
        at their defaults): every setting still at its default takes the task's pretrained
        preset (task.PRETRAINED_*)."""
        presets = _pretrained_stage_defaults(self.algorithm)
        for name in task.PRETRAINED_PIPELINE_SETTINGS:
            if getattr(self, name) == _field_default(self, name):
                setattr(self, name, presets[name])
        for name in ("sft", "reward", "ppo"):
            if getattr(self, name) == type(presets[name])():
                setattr(self, name, presets[name])

    @classmethod
    def config_defaults(cls, values) -> PipelineConfig:
        """What ``load_config`` starts from: the built-in task's stage settings (for the
        ``algorithm`` given); with ``sft.model`` (or ``model``) given, the review task's
        settings for a pretrained model (task.PRETRAINED_*), or with your datasets too, the
        stages' defaults for a pretrained model."""
        from rlhf.config import is_set

        task_name = str(values.get("task", "reviews")).strip()
        # sft.epochs without sft.max_steps: the preset's max_steps would replace those epochs;
        # sft.lora_rank of the other kind without sft.lr: the preset's lr is not for that kind
        sft_preset = sft.preset_for(task.SFT_SETTINGS, values, "sft.")
        if task_name == "reviews" and (is_set(values, "sft.model") or is_set(values, "model")):
            if any(is_set(values, f"{name}.dataset") for name in ("sft", "reward", "ppo")):
                return cls(sft=sft.SFTConfig(), reward=reward.RewardConfig(),
                           ppo=ppo.PPOConfig(**_stage_algorithm(
                               str(values.get("algorithm", "ppo")).strip())))
            stages = _pretrained_stage_defaults(str(values.get("algorithm", "ppo")).strip())
            stages["sft"] = sft.SFTConfig(**sft.preset_for(
                task.PRETRAINED_SFT_SETTINGS, values, "sft."))
            return cls(**stages)
        if task_name not in TASKS:
            task_name = "reviews"  # __post_init__ refuses it with the list of tasks
        return cls(task=task_name, sft=sft.SFTConfig(**sft_preset),
                   ppo=_ppo_defaults(str(values.get("algorithm", "ppo")).strip(), task_name))


TASKS = ("reviews", "arithmetic")
# Stage settings the pipeline sets for every stage from its own field of the same name.
_SET_BY_PIPELINE = ("output_dir", "seed", "device", "max_memory", "resume", "overwrite",
                    "cpu_threads", "algorithm", "quantization", "gradient_checkpointing")
# What --resume may see changed: the stages' copies of _SET_BY_PIPELINE are not what the stages
# use (the pipeline's own fields are, and those are compared).
_RESUME_SAFE = RESUME_SAFE_KEYS | {
    f"{name}.{key}" for name in ("sft", "reward", "ppo") for key in _SET_BY_PIPELINE}
# Stage settings that mean nothing inside the pipeline, and why.
_NOT_IN_PIPELINE = {
    ("sft", "corpus_size"): "the built-in corpus has the pipeline's corpus_size",
    ("sft", "vocab_size"): "the built-in tokenizer has the pipeline's vocab_size",
    ("reward", "model"): "the reward model is the SFT model with a reward adapter",
    ("reward", "lora_rank"): "the adapters have the pipeline's lora_rank",
    ("reward", "lora_alpha"): "the adapters have the pipeline's lora_alpha",
    ("reward", "eval_fraction"): "the pipeline holds out heldout_pair_fraction of the pairs",
    ("ppo", "model"): "PPO trains the backbone of the reward stage",
    ("ppo", "tokenizer"): "every stage uses the SFT stage's tokenizer (sft.tokenizer)",
}
# Top-level settings of the built-in task, and the modes that do not use them.
_TINY_MODEL_ONLY = ("vocab_size", "hidden_size", "num_layers")
_ARITHMETIC_ONLY = ("eval_problems", "curve_every", "curve_problems")
_BUILTIN_TASK_ONLY = ("corpus_size", "pair_prompts", "label_beta", "eval_samples", "kl_bound",
                      "pair_temperature", "pair_top_k", "pair_top_p")
# The pairs' own sampling settings and the RL stage's that each replaces (None: the RL stage's).
PAIR_SAMPLING = {"pair_temperature": "temperature", "pair_top_k": "top_k", "pair_top_p": "top_p"}
_STAGE_FOLDERS = {"sft": "sft", "reward": "rm", "ppo": "ppo"}
# The RL stage's folder is named after its algorithm (ppo/ for PPO, as before the others).
_RL_RUN_FILES = tuple(f"{algorithm}/{name}" for algorithm in ppo.ALGORITHMS if algorithm != "ppo"
                      for name in STAGE_RUN_FILES)
_LABELS = {"ppo": "PPO", "grpo": "GRPO", "dr_grpo": "Dr. GRPO", "rloo": "RLOO", "gspo": "GSPO",
           "dapo": "DAPO", "cispo": "CISPO", "sapo": "SAPO"}


def _stage_folders(cfg: PipelineConfig) -> dict[str, str]:
    return {**_STAGE_FOLDERS, "ppo": cfg.algorithm}


def _critic_free(cfg: PipelineConfig) -> bool:
    return not replace(cfg.ppo, algorithm=cfg.algorithm,
                       **_critic_defaults()).settings.uses_critic


def _critic_defaults() -> dict:
    defaults = {f.name: f.default for f in fields(ppo.RLConfig)}
    return {name: defaults[name] for name in ppo.CRITIC_SETTINGS}


def _field_default(config, name: str):
    return next(f.default for f in fields(config) if f.name == name)


def check_settings(cfg: PipelineConfig) -> tuple[bool, tuple[str, ...]]:
    """Refuse, with one clear ValueError, a setting the pipeline cannot honour. Returns
    (own_data: the run uses your datasets, the top-level settings it does not use)."""
    if cfg.algorithm not in ppo.ALGORITHMS:
        raise ValueError(f"algorithm={cfg.algorithm!r} is not an RL algorithm; expected one of "
                         f"{ppo.ALGORITHMS}")
    if _critic_free(cfg):
        # the stage starts from the task's (or the stages') PPO settings, and stage_configs
        # resets the critic's: one changed by the user would be silently ignored
        starts = (_ppo_defaults("ppo", cfg.task), _ppo_defaults(cfg.algorithm, cfg.task),
                  ppo.PPOConfig())
        for name in ppo.CRITIC_SETTINGS:
            value = getattr(cfg.ppo, name)
            if all(value != getattr(start, name) for start in starts):
                raise ValueError(f"ppo.{name}={value!r} has no effect with algorithm="
                                 f"{cfg.algorithm} (no critic); remove it")
    if cfg.task == "arithmetic":
        from rlhf import arithmetic

        return False, arithmetic.check_pipeline_settings(cfg)
    out = Path(cfg.output_dir)
    for stage_name, folder in _stage_folders(cfg).items():
        stage_cfg = getattr(cfg, stage_name)
        for name in _SET_BY_PIPELINE:
            if not hasattr(stage_cfg, name):
                continue
            value = getattr(stage_cfg, name)
            own = str(out / folder) if name == "output_dir" else getattr(cfg, name)
            if value != _field_default(stage_cfg, name) and value != own:
                where = (f"writes each stage to output_dir/{folder}" if name == "output_dir"
                         else f"sets it for every stage from its own {name}")
                raise ValueError(f"{stage_name}.{name}={value!r} cannot be set in rlhf pipeline: "
                                 f"the pipeline {where}; set {name}= instead")
    rl_cfg = stage_configs(cfg)["ppo"]
    try:  # dynamic sampling's, before SFT; its warnings and errors name ppo.<setting>
        with warnings_named("ppo.", type(rl_cfg)):
            rl_cfg.check_critic_settings()
    except ValueError as error:
        renamed = named_as_typed(str(error), "ppo.", type(rl_cfg))
        if renamed is None:
            raise
        raise ValueError(renamed) from None
    for (stage_name, name), why in _NOT_IN_PIPELINE.items():
        stage_cfg = getattr(cfg, stage_name)
        value = getattr(stage_cfg, name)
        if value != _field_default(stage_cfg, name):
            raise ValueError(f"{stage_name}.{name}={value!r} has no effect in rlhf pipeline "
                             f"({why}); remove it")
    datasets = {"sft.dataset": cfg.sft.dataset, "reward.dataset": cfg.reward.dataset,
                "ppo.dataset": cfg.ppo.dataset}
    given = [key for key, value in datasets.items() if value is not None]
    missing = [key for key, value in {"sft.model": cfg.sft.model, **datasets}.items()
               if value is None]
    if given and missing:
        raise ValueError(
            f"rlhf pipeline on your own data needs sft.model, sft.dataset, reward.dataset and "
            f"ppo.dataset; {', '.join(given)} given, {', '.join(missing)} missing (it cannot "
            f"make preference pairs or prompts for your task; with no dataset it runs the "
            f"built-in review task, on your model with sft.model= alone)")
    if cfg.sft.tokenizer is not None and cfg.sft.model is None:
        raise ValueError(f"sft.tokenizer={cfg.sft.tokenizer!r} needs sft.model: the built-in "
                         f"tiny model uses a tokenizer trained on its corpus")
    own_data = bool(given)
    try:  # e.g. sft.lora_alpha without sft.lora_rank
        stage_configs(cfg)["sft"].check_used_settings()
    except ValueError as error:
        raise ValueError(f"sft.{error}") from None
    unused = (_TINY_MODEL_ONLY if cfg.sft.model is not None else ()) + \
        (_BUILTIN_TASK_ONLY if own_data else ()) + _ARITHMETIC_ONLY
    for name in unused:
        value = getattr(cfg, name)
        if value != _field_default(cfg, name):
            what = ("tiny model" if name in _TINY_MODEL_ONLY else
                    "arithmetic task (task=arithmetic)" if name in _ARITHMETIC_ONLY else
                    "review task")
            raise ValueError(f"{name}={value!r} has no effect here: it is a setting of the "
                             f"built-in {what}, which this run does not use; remove it")
    return own_data, tuple(unused)


def pair_sampling_config(cfg: PipelineConfig, ppo_cfg: ppo.PPOConfig) -> ppo.PPOConfig:
    """The sampling settings of the built-in task's preference pairs: ``ppo_cfg`` (the RL
    stage's lengths, numerics and, for each ``pair_*`` left at None, its temperature / top_k /
    top_p) with the pairs' own ``pair_temperature``, ``pair_top_k`` and ``pair_top_p``."""
    return replace(ppo_cfg, **{setting: getattr(cfg, name) for name, setting in
                               PAIR_SAMPLING.items() if getattr(cfg, name) is not None})


def stage_configs(cfg: PipelineConfig) -> dict:
    """Copies of the stage configs with the settings the pipeline sets (cfg stays as given)."""
    out = Path(cfg.output_dir)
    stages = {}
    for name, folder in _stage_folders(cfg).items():
        stage_cfg = getattr(cfg, name)
        settings = {"output_dir": str(out / folder), "seed": cfg.seed, "device": cfg.device,
                    "max_memory": cfg.max_memory, "resume": cfg.resume,
                    "cpu_threads": cfg.cpu_threads, "algorithm": cfg.algorithm,
                    "quantization": cfg.quantization,
                    "gradient_checkpointing": cfg.gradient_checkpointing}
        if name == "sft" and not (stage_cfg.model is not None and stage_cfg.lora_rank):
            # full-weight SFT trains in full precision; the reward stage quantizes its result
            settings["quantization"] = "none"
        if name == "ppo" and _critic_free(cfg):
            settings.update(_critic_defaults())  # no critic (check_settings saw none was set)
        with warnings_named(f"{name}.", type(stage_cfg)):  # its checks' warnings, as typed
            try:  # and its errors (device=cpu with ppo.optimizer=paged_adamw)
                stages[name] = replace(stage_cfg, **{key: value for key, value in
                                                     settings.items() if hasattr(stage_cfg, key)})
            except ValueError as error:
                raise nested_error(error, type(stage_cfg), f"{name}.") from None
    return stages


def _used_config(cfg: PipelineConfig, stages: dict, unused: tuple[str, ...]) -> dict:
    """The settings this run used, for summary.json: no setting it ignored."""
    used = {name: value for name, value in asdict(cfg).items()
            if name not in unused and name not in _STAGE_FOLDERS}
    for name, stage_cfg in stages.items():
        used[name] = {key: value for key, value in asdict(stage_cfg).items()
                      if (name, key) not in _NOT_IN_PIPELINE and key != "overwrite"}
    used["ppo"] = ppo.used_settings(stages["ppo"], used["ppo"])  # the presets, resolved
    used["sft"] = sft.used_settings(stages["sft"], used["sft"])  # lr as it runs, no unused
    if "kl_bound" in used and used["kl_bound"] is None:  # the bound the evaluation uses
        used["kl_bound"] = stages["ppo"].kl_target
    pairs = pair_sampling_config(cfg, stages["ppo"])
    for name, setting in PAIR_SAMPLING.items():  # the values the pairs are sampled with
        if name in used:
            used[name] = getattr(pairs, setting)
    return used


def printable_config(cfg: PipelineConfig) -> dict:
    """What ``rlhf pipeline --print-config`` shows: the settings a run with ``cfg`` uses, with
    the stage values the pipeline sets (each stage's folder under output_dir, seed, device, ...)
    and without those it ignores (the same dict summary.json records)."""
    _, unused = check_settings(cfg)
    if cfg.task == "arithmetic":
        from rlhf import arithmetic

        return arithmetic.used_config(cfg, unused)
    return _used_config(cfg, stage_configs(cfg), unused)


@torch.no_grad()
def sample_texts(backbone, tokenizer, prompts: list[str], role: str | None,
                 ppo_cfg: ppo.PPOConfig, seed: int, batch_size: int, *,
                 with_scores: bool = False):
    """Sample one response per prompt with ``role`` (None = the reference/SFT model) through the
    rollout engine, with the sampling settings of ``ppo_cfg`` (max_prompt_length,
    max_new_tokens, temperature, top_k, top_p), in the RL stage's numerics: bf16 autocast on a
    GPU with ``ppo_cfg.bf16`` (``stage.autocast_dtype_for``, as ``rl.train``), fp32 on the CPU.

    Returns (texts, kl) where kl (N,) is the summed k1 KL(role || reference) of each response:
    the engine's recorded log-probs (those of the distribution that drew the tokens) minus the
    reference's, over the response tokens. ``with_scores``: (texts, kl, proxy) with proxy (N,)
    the reward model's score of each response.
    """
    ids, mask = ppo.encode_prompts(prompts, tokenizer, ppo_cfg.max_prompt_length)
    device = backbone.device
    autocast_dtype = stage.autocast_dtype_for(device, ppo_cfg.bf16)
    autocast = dict(device_type=device.type, dtype=autocast_dtype,
                    enabled=autocast_dtype is not None)
    engine = RolloutEngine(backbone, role=role, autocast_dtype=autocast_dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    texts: list[str] = []
    kls: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    backbone.eval()
    desc = f"sampling ({role or 'SFT model'})"
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, dynamic_ncols=True):
        gen = engine.generate(
            ids[start:start + batch_size].to(device), mask[start:start + batch_size].to(device),
            ppo_cfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, temperature=ppo_cfg.temperature,
            top_k=ppo_cfg.top_k, top_p=ppo_cfg.top_p, generator=generator,
        ).without_prompt_padding()
        texts += ppo.decode_responses(tokenizer, gen)
        if role is None:
            kls.append(torch.zeros(gen.sequences.shape[0]))
        else:
            with torch.autocast(**autocast):
                ref = backbone.reference_logprobs(gen.sequences, gen.attention_mask,
                                                  temperature=ppo_cfg.temperature)
            ref = ref[:, gen.prompt_length - 1:] * gen.response_mask
            kls.append((gen.logprobs - ref).sum(-1).cpu())
        if with_scores:
            with torch.autocast(**autocast):
                scores.append(backbone.rewards(gen.sequences, gen.attention_mask).float().cpu())
    engine.release()
    if with_scores:
        return texts, torch.cat(kls), torch.cat(scores)
    return texts, torch.cat(kls)


def mean_stderr(values) -> tuple[float, float]:
    """(mean, standard error of the mean) of the values, in float64 (0 error for one value)."""
    x = torch.as_tensor(values, dtype=torch.float64)
    n = x.numel()
    return float(x.mean()), float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0


def _on_main(fn):
    """``fn()`` on rank 0 alone, its result on every rank (one process: ``fn()``). Under
    torchrun the pipeline's files are written and read through it: by one rank (every rank
    writing the tokenizer's directory raced: "Directory not empty"), with every rank waiting
    until they are written, and rank 0's error (a full disk) raised on every rank, so that none
    goes on into a collective rank 0 will never reach (``distributed.broadcast_from_main``)."""
    return distributed.broadcast_from_main(fn)


def _write_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


_STAGE_NAMES = {"sft": "SFT", "rm": "the reward model", "ppo": "RL"}


def _stage_done(directory: Path, resume: bool, run_dir: RunDirectory) -> dict | None:
    """The summary of a finished stage of this run (resume only), else None."""
    summary = directory / "summary.json"
    if resume and summary.exists():
        loaded = json.loads(summary.read_text())
        run_dir.check_run_id(loaded.get("run_id"), str(summary))
        return loaded
    return None


def _plain(summary: dict) -> dict:
    """A stage summary without the live objects (model, tokenizer) it also returns."""
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool, dict,
                                                                list, type(None)))}


def run(cfg: PipelineConfig) -> dict:
    """Run SFT -> reward model -> PPO (and, on the built-in task, the held-out evaluation);
    returns (and writes) the summary. Settings it cannot honour are refused before anything
    runs (``check_settings``)."""
    check_settings(cfg)
    from rlhf import quant

    for name, stage_cfg in stage_configs(cfg).items():  # device=auto on a machine without a GPU
        quant.check_optimizer(stage_cfg.optimizer, f"{name}.optimizer",
                              quant.resolve_auto(cfg.device))
    if cfg.resume:  # the RL stage's algorithm is the run's: say so before the list of changes
        ppo.check_resumed_algorithm(cfg.output_dir, cfg.algorithm)
    previous_threads = torch.get_num_threads()
    if cfg.cpu_threads is not None and stage.resolve_device(cfg.device).type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)
    try:
        with open_run(cfg.output_dir, "pipeline", asdict(cfg), resume=cfg.resume,
                      overwrite=cfg.overwrite, run_files=PIPELINE_RUN_FILES + _RL_RUN_FILES,
                      resume_safe=_RESUME_SAFE) as run_dir:
            if cfg.task == "arithmetic":
                from rlhf import arithmetic

                return arithmetic.run_pipeline(cfg, run_dir)
            return _run(cfg, run_dir)
    finally:
        torch.set_num_threads(previous_threads)


def _load_pairs(path: Path) -> tuple[list[dict], list[str], float | None]:
    """pairs.jsonl -> (pairs, their split, the noise ceiling of all pairs or None)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    pairs = [{k: v for k, v in r.items() if k not in ("split", "noise_ceiling")} for r in records]
    ceiling = records[0].get("noise_ceiling") if records else None
    return pairs, [r["split"] for r in records], ceiling


def _split_pairs(pairs: list[dict], fraction: float, seed: int) -> list[str]:
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    eval_rows = set(order[:int(round(len(pairs) * fraction))].tolist())
    return ["eval" if i in eval_rows else "train" for i in range(len(pairs))]


def _run(cfg: PipelineConfig, run_dir: RunDirectory) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from rlhf import data
    from rlhf.loading import load_causal_lm, load_tokenizer
    from rlhf.metrics import plot_curves
    from rlhf.models import LoraSpec, SharedBackbone

    own_data, unused = check_settings(cfg)
    stages = stage_configs(cfg)
    sft_cfg, rm_cfg, ppo_cfg = stages["sft"], stages["reward"], stages["ppo"]
    label = _LABELS[cfg.algorithm]
    started = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(cfg.output_dir)
    pairs_path = out / "pairs.jsonl"
    # torchrun: rank 0 alone reads and writes output_dir (the other ranks may run on machines
    # without it) and decides what a resume finds there, once: ranks that looked for
    # themselves could see a file rank 0 was writing meanwhile, and go separate ways
    # (``_on_main``). One process: the same calls, made here.
    folders = _stage_folders(cfg)
    done, pairs_saved = _on_main(lambda: (
        {name: _stage_done(out / folders[name], cfg.resume, run_dir)
         for name in ("sft", "reward", "ppo")},
        cfg.resume and pairs_path.exists()))

    # ---- 1. SFT data and tokenizer ----
    if own_data:
        examples = data.load_sft_dataset(sft_cfg.dataset)
    else:
        examples = task.make_corpus(cfg.corpus_size, seed=cfg.seed)
    tokenizer_dir = out / "tokenizer"

    def run_tokenizer():
        """The run's tokenizer (rank 0: every rank gets this one, trained or loaded once):
        a resume's saved one, else trained on the corpus or your model's, saved."""
        if cfg.resume and (tokenizer_dir / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(tokenizer_dir)
        if sft_cfg.model is None:
            made = task.train_tokenizer(
                [ex["prompt"] + ex["completion"] for ex in examples], vocab_size=cfg.vocab_size)
        elif sft_cfg.tokenizer is not None:
            made = load_tokenizer(sft_cfg.tokenizer, setting="sft.tokenizer")
        else:
            made = load_tokenizer(sft_cfg.model, setting="sft.model")
        with atomic_directory(tokenizer_dir) as temp:
            made.save_pretrained(temp)
        return made

    tokenizer = _on_main(run_tokenizer)
    # the later stages' data, read and checked now: a broken pairs file, or a prompt longer
    # than ppo.max_prompt_length, must not wait for SFT (and the reward model) to finish
    if own_data:
        # (a resume whose pairs.jsonl is written reads them from there, as before)
        own_pairs = None if pairs_saved else \
            [dict(row) for row in data.load_preference_dataset(rm_cfg.dataset)]
        ppo_prompts = [row["prompt"] for row in data.load_prompt_dataset(ppo_cfg.dataset)]
        # chat rows need the tokenizer's chat template: said now, not when their stage starts
        for rows, source in ((examples, sft_cfg.dataset), (own_pairs or [], rm_cfg.dataset),
                             (ppo_prompts, ppo_cfg.dataset)):
            data.check_chat_rows(rows, tokenizer, source)
    else:
        ppo_prompts = task.all_prompts("train")
    ppo.encode_prompts(ppo_prompts, tokenizer, ppo_cfg.max_prompt_length,
                       source=ppo_cfg.dataset if own_data else None)

    # ---- 2. SFT: a tiny Llama from scratch, or your model ----
    t0 = time.perf_counter()
    sft_summary = done["sft"]
    # the stages an earlier invocation finished (resume): loaded, their timings here are that
    done_before = [name for name, summary in (
        ("sft", sft_summary), ("rm", done["reward"]), ("ppo", done["ppo"]))
        if summary is not None]
    if sft_summary is not None:  # this run's own files (not a path the summary names)
        model = AutoModelForCausalLM.from_pretrained(out / "sft" / "model")
    else:
        if sft_cfg.model is not None:
            model = load_causal_lm(sft_cfg.model, setting="sft.model",
                                   quantization=sft_cfg.quantization,
                                   device=stage.resolve_device(cfg.device))
        else:
            with seeded(cfg.seed):  # the initial weights depend on the seed alone
                model = LlamaForCausalLM(task.tiny_llama_config(
                    tokenizer, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                    intermediate_size=3 * cfg.hidden_size))
        # the pairs and the RL stage sample prompt + response: a model with fewer learned
        # positions would fail on them only after SFT
        stage.check_positions(model, ppo_cfg.max_prompt_length + ppo_cfg.max_new_tokens,
                              "a sample (ppo.max_prompt_length + ppo.max_new_tokens) has",
                              "lower them to {positions} tokens together")
        # (sft, reward and ppo share setting names; strategy=fsdp2 is meant for the frozen base
        # of the reward and RL stages: SFT, which trains every weight, runs ddp under it)
        with warnings_named("sft.", type(sft_cfg)), distributed.replicated_sft():
            trained = sft.train(sft_cfg, model=model, tokenizer=tokenizer, examples=examples)
        model = trained["model"]  # with LoRA SFT, the adapters merged in
        sft_summary = _plain(trained)
        _on_main(lambda: _write_json(out / "sft" / "summary.json",
                                     {**sft_summary, "run_id": run_dir.run_id}))
    timings["sft_s"] = time.perf_counter() - t0
    distributed.check_stop()  # torchrun: a SIGTERM during SFT's last step stops every rank here
    if cfg.quantization != "none":  # the shared backbone's base: the SFT model, quantized
        model = load_causal_lm(out / "sft" / "model", setting="sft.model",
                               quantization=cfg.quantization,
                               device=stage.resolve_device(cfg.device))

    # ---- 3. preference pairs: yours, or sampled from the SFT model and labelled by VADER ----
    t0 = time.perf_counter()
    rm_summary = done["reward"]
    rl_dir = out / folders["ppo"]
    ppo_summary = done["ppo"]
    # the base weights are the SFT model's (the backbones name its directory, not a copy)
    if ppo_summary is not None:  # resuming after RL: its backbone holds every adapter it kept
        backbone = SharedBackbone.load(rl_dir / "backbone", base_model=model)
    elif rm_summary is not None:
        backbone = SharedBackbone.load(out / "rm" / "backbone", base_model=model)
    else:
        backbone = SharedBackbone.from_model(
            model, lora=LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha), seed=cfg.seed,
            name_or_path=os.path.abspath(out / "sft" / "model"))
    backbone.to(stage.resolve_device(cfg.device, cfg.max_memory))
    if pairs_saved:
        pairs, split, ceiling_all = _on_main(lambda: _load_pairs(pairs_path))
    elif own_data:
        pairs = own_pairs
        split, ceiling_all = _split_pairs(pairs, cfg.heldout_pair_fraction, cfg.seed), None
        _on_main(lambda: atomic_write_text(pairs_path, "".join(
            json.dumps({**pair, "split": which}) + "\n" for pair, which in zip(pairs, split))))
    else:
        prompts = task.ppo_prompts(cfg.pair_prompts, seed=cfg.seed, split="train")
        pair_cfg = pair_sampling_config(cfg, ppo_cfg)  # pair_*, else the RL stage's
        texts_a, _ = sample_texts(backbone, tokenizer, prompts, None, pair_cfg, cfg.seed + 11,
                                  cfg.sample_batch_size)
        texts_b, _ = sample_texts(backbone, tokenizer, prompts, None, pair_cfg, cfg.seed + 12,
                                  cfg.sample_batch_size)
        pairs, ceiling_all = task.label_pairs(prompts, texts_a, texts_b, beta=cfg.label_beta,
                                              seed=cfg.seed)
        if len(pairs) < 10:
            raise ValueError(
                f"only {len(pairs)} of {len(prompts)} sampled pairs have different gold scores "
                "(ties carry no preference and are dropped): the SFT model is too weak to write "
                "reviews; train it longer (sft.max_steps) or raise pair_prompts"
            )
        split = _split_pairs(pairs, cfg.heldout_pair_fraction, cfg.seed)

        def write_pairs():  # rank 0's pairs, for every rank: they train on the same ones
            atomic_write_text(pairs_path, "".join(
                json.dumps({**pair, "split": which, "noise_ceiling": ceiling_all}) + "\n"
                for pair, which in zip(pairs, split)))
            return pairs, split, ceiling_all

        pairs, split, ceiling_all = _on_main(write_pairs)
    train_pairs = [p for p, s in zip(pairs, split) if s == "train"]
    eval_pairs = [p for p, s in zip(pairs, split) if s == "eval"]
    if not train_pairs or not eval_pairs:
        raise ValueError(f"heldout_pair_fraction={cfg.heldout_pair_fraction:g} of {len(pairs)} "
                         f"preference pairs holds out {len(eval_pairs)} and leaves "
                         f"{len(train_pairs)} to train on; the reward model needs both (the "
                         f"held-out ones measure it): choose a fraction that leaves at least "
                         f"one pair on each side, or give more pairs")
    timings["pairs_s"] = time.perf_counter() - t0
    distributed.check_stop()

    # ---- 4. reward model ----
    t0 = time.perf_counter()
    if rm_summary is None:
        with warnings_named("reward.", type(rm_cfg)):
            rm_summary = _plain(reward.train(rm_cfg, backbone=backbone, tokenizer=tokenizer,
                                             train_pairs=train_pairs, eval_pairs=eval_pairs))
        _on_main(lambda: _write_json(out / "rm" / "summary.json",
                                     {**rm_summary, "run_id": run_dir.run_id}))
    timings["rm_s"] = time.perf_counter() - t0
    distributed.check_stop()

    # ---- 5. RL, PPO or another algorithm (the gold judge only exists for the built-in task) ----
    t0 = time.perf_counter()
    if ppo_summary is None:
        with warnings_named("ppo.", type(ppo_cfg)):
            ppo_summary = _plain(ppo.train(ppo_cfg, backbone=backbone, tokenizer=tokenizer,
                                           prompts=ppo_prompts,
                                           gold_fn=None if own_data else task.gold_scores))
        _on_main(lambda: _write_json(rl_dir / "summary.json",
                                     {**ppo_summary, "run_id": run_dir.run_id}))
    timings["ppo_s"] = time.perf_counter() - t0
    distributed.check_stop()

    # ---- 6. samples of the SFT model and the policy: on the built-in task, the held-out
    # evaluation by the gold judge; on your data, a few of your prompts, unscored ----
    t0 = time.perf_counter()
    shown_prompts = (ppo_prompts[:cfg.n_show_samples] if own_data else
                     task.ppo_prompts(cfg.eval_samples, seed=cfg.seed + 1, split="heldout"))
    sft_texts, _ = sample_texts(backbone, tokenizer, shown_prompts, None, ppo_cfg,
                                cfg.seed + 21, cfg.sample_batch_size)
    ppo_texts, kl = sample_texts(backbone, tokenizer, shown_prompts, "policy", ppo_cfg,
                                 cfg.seed + 22, cfg.sample_batch_size)
    sft_gold = None if own_data else task.gold_scores(sft_texts)
    ppo_gold = None if own_data else task.gold_scores(ppo_texts)
    timings["eval_s"] = time.perf_counter() - t0

    # ---- 7. write the results (torchrun: every rank sampled, as the sharded model needs;
    # rank 0 writes) ----
    shown = [{"prompt": shown_prompts[i], "before": sft_texts[i], "after": ppo_texts[i],
              **({} if own_data else {"gold_before": sft_gold[i], "gold_after": ppo_gold[i]})}
             for i in range(min(cfg.n_show_samples, len(shown_prompts)))]

    def write_results() -> None:
        shutil.copyfile(rl_dir / "metrics.jsonl", out / "metrics.jsonl")
        plot_curves(out / "metrics.jsonl", out / "curves.png", samples=shown[:4],
                    title=f"{label} on your data" if own_data else
                    f"{label} on the built-in review task", after=label)
        _write_samples(out / "samples.md", shown, own_data, label)

    _on_main(write_results)
    timings["total_s"] = time.perf_counter() - started
    summary = {
        "task": "own data" if own_data else "built-in review task",
        "algorithm": cfg.algorithm,
        "reward_model": {
            "heldout_accuracy": rm_summary.get("eval_accuracy"),
            "train_pairs": len(train_pairs),
            "heldout_pairs": len(eval_pairs),
        },
        "ppo_last_iteration": ppo_summary.get("last_metrics", {}),
        "sft_final_loss": sft_summary.get("final_loss"),
        # seconds of this invocation; a resume loaded the stages of done_before instead
        "timings_s": timings,
        "done_before": done_before,
        "torch_threads": torch.get_num_threads(),
        "world_size": distributed.world_size(),  # torchrun: the number of ranks
        "cpu_allocator": stage.cpu_allocator_setting(),  # bound_cpu_allocator_slack
        "config": _used_config(cfg, stages, unused),
    }
    if not own_data:  # the figures only the gold judge can give
        summary["reward_model"].update(_noise_ceilings(eval_pairs, ceiling_all, cfg.label_beta))
        summary.update(_heldout_figures(sft_gold, ppo_gold, kl, cfg.kl_bound
                                        if cfg.kl_bound is not None else ppo_cfg.kl_target))
    _on_main(lambda: _write_json(out / "summary.json", summary))
    if distributed.is_main():  # torchrun: one summary (rlhf/distributed.py)
        _print_summary(summary, out)
    return summary


def _noise_ceilings(eval_pairs: list[dict], ceiling_all: float, beta: float) -> dict:
    """The label-noise ceiling of the held-out pairs (the bar the held-out accuracy is compared
    with) and of all pairs: the accuracy of a perfect judge on the simulated annotator's labels."""
    gold_c = task.gold_scores([p["chosen"] for p in eval_pairs])
    gold_r = task.gold_scores([p["rejected"] for p in eval_pairs])
    heldout = sum(max(q, 1 - q) for q in (1 / (1 + math.exp(-beta * (c - r)))
                                         for c, r in zip(gold_c, gold_r)))
    return {"noise_ceiling_heldout": heldout / max(1, len(eval_pairs)),
            "noise_ceiling_all_pairs": ceiling_all}


def _heldout_figures(sft_gold, ppo_gold, kl, kl_bound) -> dict:
    sft_mean, sft_se = mean_stderr(sft_gold)
    ppo_mean, ppo_se = mean_stderr(ppo_gold)
    diff_se = math.sqrt(sft_se ** 2 + ppo_se ** 2)
    kl_mean, kl_se = mean_stderr(kl)
    return {
        "gold_heldout": {
            "n_samples_each": len(sft_gold),
            "sft_mean": sft_mean, "sft_stderr": sft_se,
            "ppo_mean": ppo_mean, "ppo_stderr": ppo_se,
            "difference": ppo_mean - sft_mean,
            "difference_stderr": diff_se,
            "difference_in_stderr": (ppo_mean - sft_mean) / diff_se if diff_se > 0 else 0.0,
        },
        "kl_to_reference": {"mean": kl_mean, "stderr": kl_se, "bound": kl_bound,
                            "within_bound": kl_bound is None or kl_mean <= kl_bound},
    }


def _write_samples(path: Path, shown: list[dict], own_data: bool, label: str = "PPO") -> None:
    if own_data:
        lines = [f"# Samples on your {label} prompts: SFT model (before {label}) vs {label} "
                 f"policy (after)", "", "No gold judge exists for your task: read them.", ""]
    else:
        lines = [f"# Held-out samples: SFT model (before {label}) vs {label} policy (after)", "",
                 "Gold score = VADER compound sentiment in [-1, 1].", ""]
    for row in shown:
        before = f" (gold {row['gold_before']:+.3f})" if "gold_before" in row else ""
        after = f" (gold {row['gold_after']:+.3f})" if "gold_after" in row else ""
        lines += [f"## {row['prompt']}", "",
                  f"- before{before}: {row['before'].strip()}",
                  f"- after {after}: {row['after'].strip()}", ""]
    path.write_text("\n".join(lines))


def _print_summary(summary: dict, out: Path) -> None:
    rm = summary["reward_model"]
    accuracy = rm["heldout_accuracy"]
    label = _LABELS[summary.get("algorithm", "ppo")]
    lines = [f"\nreward model held-out accuracy "
             f"{'n/a' if accuracy is None else format(accuracy, '.3f')}"
             + (f" (label-noise ceiling {rm['noise_ceiling_heldout']:.3f})"
                if "noise_ceiling_heldout" in rm else "")]
    if "gold_heldout" in summary:
        gold, kl = summary["gold_heldout"], summary["kl_to_reference"]
        lines += [
            f"gold (VADER) on held-out prompts: SFT {gold['sft_mean']:+.3f} +- "
            f"{gold['sft_stderr']:.3f}, {label} {gold['ppo_mean']:+.3f} +- "
            f"{gold['ppo_stderr']:.3f}; "
            f"difference {gold['difference']:+.3f} = {gold['difference_in_stderr']:.1f} "
            f"standard errors",
            f"KL(policy || SFT) {kl['mean']:.2f} +- {kl['stderr']:.2f} nats per response "
            f"(bound {kl['bound']})"]
    else:
        last = summary["ppo_last_iteration"]
        nan = float("nan")
        lines.append(f"last {label} iteration: proxy reward "
                     f"{last.get('proxy_reward', nan):+.3f}, "
                     f"KL {last.get('kl', nan):.2f} nats; samples in samples.md")
    earlier = summary.get("done_before")
    this = (f" in this invocation ({', '.join(_STAGE_NAMES[name] for name in earlier)} "
            f"finished before it)" if earlier else "")
    lines.append(f"total {summary['timings_s']['total_s']:.0f} s{this}; outputs in {out}")
    print("\n".join(lines))
