"""``rlhf frontier``: the over-optimisation frontier of each RL algorithm on the built-in task.

A reward model is a proxy: pushed far enough from the reference, a policy raises the proxy's
score while the true (gold) reward stalls or falls. The KL to the reference is the distance; its
strength (``kl_coef``) sets how far each run goes. This command runs the RL stage at several
fixed KL strengths for each algorithm, all from one SFT model and one reward model, and measures
every policy on the same held-out prompts:

    output_dir/
      base/                 one ``rlhf pipeline`` run (SFT, pairs, reward model, and its own RL
                            stage with the default algorithm): the shared starting point
      points/<algo>-kl<c>/  the RL stage of ``algo`` at a fixed ``kl_coef = c`` (no adaptive
                            controller), started from base's reward-model backbone;
                            result.json holds the point's figures
      frontier.json         every point: held-out gold reward (mean, standard error), proxy
                            reward (the reward model's score of the same samples), KL to the
                            reference (nats per response, k1), RL wall time and peak memory
      frontier.png          gold and proxy reward against KL, one curve per algorithm
      frontier.md           the same as a table

The held-out evaluation is the pipeline's (``eval_samples`` responses to held-out prompt
combinations, sampled with the same seeds), so a point with the pipeline's own settings
reproduces its summary figures. Where the KL is applied differs by algorithm (PPO puts k1 in
the reward, the GRPO family k3 in the loss), so the same ``kl_coef`` is not the same strength
across algorithms; the x axis is the KL each policy really reached, which is comparable.
``resume=true`` keeps every finished point (and the base run) and runs the rest; a finished
run is kept only under the settings its run.json records (a changed one is refused, as
``--resume`` refuses it).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rlhf import distributed, pipeline, rl, task
from rlhf.checkpoint import PIPELINE_RUN_FILES, atomic_write_text, open_run
from rlhf.stage import limits_cpu_threads

__all__ = ["FrontierConfig", "holds_run", "printable_config", "run"]
# `rlhf frontier` prints its table and points at this file under output_dir (rlhf/cli.py)
SUMMARY_FILE = "frontier.json"


@dataclass
class FrontierConfig:
    """The algorithms and fixed KL strengths to run. ``base`` is the pipeline run that makes
    the shared SFT and reward model (``base.sft.max_steps=...`` etc.); its output_dir, seed,
    device, cpu_threads, eval_samples, resume and overwrite are the frontier's own."""

    output_dir: str = "runs/frontier"
    algorithms: tuple[str, ...] = ("ppo", "grpo", "rloo")
    kl_coefs: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
    num_iterations: int | None = None  # None: the built-in task's RL setting
    seed: int = 0
    device: str = "auto"
    cpu_threads: int | None = 1
    eval_samples: int = 400
    resume: bool = False
    overwrite: bool = False
    base: pipeline.PipelineConfig = field(default_factory=pipeline.PipelineConfig)

    def __post_init__(self) -> None:
        from rlhf.stage import check_seed

        check_seed(self.seed)
        unknown = [a for a in self.algorithms if a not in rl.ALGORITHMS]
        if unknown or not self.algorithms:
            raise ValueError(f"algorithms={list(self.algorithms)}: expected a non-empty list of "
                             f"{list(rl.ALGORITHMS)}")
        if len(set(self.algorithms)) != len(self.algorithms):
            raise ValueError(f"algorithms={list(self.algorithms)} lists an algorithm twice")
        if not self.kl_coefs or any(not (c > 0 and math.isfinite(c)) for c in self.kl_coefs):
            raise ValueError(f"kl_coefs={list(self.kl_coefs)}: expected a non-empty list of "
                             "numbers > 0 (one RL run per algorithm and value)")
        names = [point_name(self.algorithms[0], c) for c in self.kl_coefs]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:  # one point directory for two runs: the second would be refused there
            raise ValueError(f"kl_coefs={list(self.kl_coefs)} name one point twice "
                             f"({', '.join(twice)}); give each value once")
        if self.num_iterations is not None and self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1 or null, got {self.num_iterations}")
        if self.eval_samples < 2:
            raise ValueError(f"eval_samples must be >= 2 (a standard error needs two), got "
                             f"{self.eval_samples}")
        if self.resume and self.overwrite:
            raise ValueError("resume=true and overwrite=true contradict each other: resume "
                             "keeps the finished points, overwrite deletes them")

    @classmethod
    def config_defaults(cls, values) -> FrontierConfig:
        """What ``load_config`` (the command line, a YAML file) starts from: ``base`` from what
        ``rlhf pipeline`` starts from for the same settings (``PipelineConfig.config_defaults``:
        the RL stage's task settings for ``base.algorithm``, ``base.sft.epochs`` without the
        preset's max_steps). It refuses a ``base.`` setting that ``_base_config`` replaces by
        the frontier's own (it was silently ignored). In Python, ``base`` may be any pipeline
        config: those fields are replaced."""
        from rlhf.config import _parse_command_line, is_set

        for name in _BASE_SET_BY_FRONTIER:
            if is_set(values, f"base.{name}"):
                raise ValueError(f"base.{name} cannot be set in rlhf frontier: the frontier "
                                 f"sets it from its own {name}; set {name}= instead")
        for key, why in _BASE_SET_BY_POINTS.items():  # each point's own: silently replaced
            if is_set(values, key) and not (key == "base.ppo.num_iterations"
                                            and not is_set(values, "num_iterations")):
                raise ValueError(f"{key} cannot be set in rlhf frontier: {why}")
        base = values.get("base", {})
        if isinstance(base, str):  # base="{algorithm: grpo}" on the command line
            base = _parse_command_line(base, "base")
        return cls(base=pipeline.PipelineConfig.config_defaults(
            base if isinstance(base, Mapping) else {}))


# The base pipeline's settings that _base_config takes from the frontier's own fields.
_BASE_SET_BY_FRONTIER = ("output_dir", "seed", "device", "cpu_threads", "eval_samples", "resume",
                         "overwrite")


# The base pipeline's settings that each point's RL run replaces (_rl_config): what to set
# instead.
_BASE_SET_BY_POINTS = {
    "base.ppo.kl_coef": "each point runs at one of kl_coefs= (fixed); set kl_coefs= instead",
    "base.ppo.kl_target": "each point keeps its kl_coef fixed (no adaptive controller, "
                          "kl_target=null); set kl_coefs= for the strengths",
    "base.ppo.num_iterations": "num_iterations= is given too, and it is what every point runs; "
                               "give one of them",
}


def _base_config(cfg: FrontierConfig) -> pipeline.PipelineConfig:
    if cfg.base.task != "reviews":  # its pipeline has no gold judge, no reward model to share
        raise ValueError(f"rlhf frontier runs on the built-in review task (its gold judge "
                         f"measures the true reward); base.task={cfg.base.task!r} is not "
                         f"supported")
    if cfg.base.sft.model is not None or cfg.base.sft.dataset is not None:
        raise ValueError("rlhf frontier runs on the built-in task (its gold judge measures the "
                         "true reward); base.sft.model and base.sft.dataset are not supported")
    # the fields of _BASE_SET_BY_FRONTIER
    return replace(cfg.base, output_dir=str(Path(cfg.output_dir) / "base"), seed=cfg.seed,
                   device=cfg.device, cpu_threads=cfg.cpu_threads,
                   eval_samples=cfg.eval_samples, resume=cfg.resume, overwrite=cfg.overwrite)


@contextlib.contextmanager
def _named_as_base():
    """A refusal of the base pipeline's checks names the setting as typed here ("ppo.algorithm
    cannot be set" is base.ppo.algorithm on the frontier's command line)."""
    from rlhf.config import named_as_typed

    try:
        yield
    except ValueError as error:
        renamed = named_as_typed(str(error), "base.", pipeline.PipelineConfig)
        if renamed is None:
            raise
        for name in _BASE_SET_BY_FRONTIER:  # the frontier's own field, not base.<name>
            renamed = re.sub(rf"\bbase\.{name}\b", name, renamed)
        raise ValueError(renamed) from None


def printable_config(cfg: FrontierConfig) -> dict:
    """What ``rlhf frontier --print-config`` shows, a config that loads back: the frontier's own
    settings and ``base`` as configured (a setting ``rlhf pipeline`` refuses is refused here),
    less the fields the frontier and the pipeline set from their own (which a config may not
    give). ``printed_notes`` adds each algorithm's points' resolved settings, as comments."""
    from rlhf.config import config_to_dict

    with _named_as_base():  # their refusals, before anything is shown
        pipeline.printable_config(_base_config(cfg))
    _point_configs(cfg)
    shown = config_to_dict(cfg)
    # base as configured: the RL settings an algorithm's preset fills stay null, since each
    # point resolves them for its own algorithm (the base pipeline's resolved PPO values would
    # pin a GRPO point to them when loaded back); what the frontier and the pipeline set from
    # their own fields is left out (a config may not give it)
    for key in _BASE_SET_BY_FRONTIER:
        shown["base"].pop(key, None)
    for stage in ("sft", "reward", "ppo"):
        for key in pipeline._SET_BY_PIPELINE:
            shown["base"][stage].pop(key, None)
    for key in _BASE_SET_BY_POINTS:  # what each point sets (the notes show it)
        if key != "base.ppo.num_iterations" or cfg.num_iterations is not None:
            shown["base"]["ppo"].pop(key.rsplit(".", 1)[-1], None)
    return shown


def printed_notes(cfg: FrontierConfig) -> str:
    """What ``--print-config`` adds after the config, as comments: what runs, resolved (the
    base pipeline as ``rlhf pipeline --print-config`` shows it, with its stages' folders and
    its RL preset filled in; each algorithm's point settings, ``kl_coef`` the list of
    strengths, one point each). Derived from the config, so not settings of their own."""
    import yaml

    from rlhf.config import config_to_dict

    points = {}
    for algorithm, point in _point_configs(cfg).items():
        values = rl.used_settings(point, config_to_dict(point))
        points[algorithm] = {**values, "kl_coef": list(cfg.kl_coefs)}
    runs = {"base": pipeline.printable_config(_base_config(cfg)), "points": points}
    return (NOTES_HEADER + "\n" + yaml.safe_dump(runs, sort_keys=False))


NOTES_HEADER = "what runs, resolved from the settings above (not settings of their own):"


def _point_configs(cfg: FrontierConfig) -> dict[str, rl.RLConfig]:
    """Each algorithm's point RL config (at the first kl_coef), checked as its run checks it:
    a setting a point refuses (base.ppo.rollout_batch_size=12 for a point of group_size 8) is
    said before the base pipeline runs, not after it."""
    configs = {}
    for algorithm in cfg.algorithms:
        folder = Path(cfg.output_dir) / "points" / f"{algorithm}-kl<kl_coef>"
        try:
            configs[algorithm] = _rl_config(cfg, algorithm, cfg.kl_coefs[0], folder)
            configs[algorithm].check_critic_settings()
        except ValueError as error:
            raise ValueError(f"the {algorithm} points: {error}") from None
    return configs


def _check_unchanged(directory: Path, kind: str, config: dict, **run_options) -> None:
    """Refuse to reuse the finished run in ``directory`` (a point, the base pipeline) under
    settings other than its run.json's: the comparison ``--resume`` makes (RunDirectoryError
    listing each change and the overrides that give the run's settings back)."""
    with open_run(directory, kind, config, resume=True, **run_options):
        pass


def holds_run(directory: Path) -> bool:
    """Whether ``directory`` holds a frontier run to resume: its base pipeline's or a point's
    run.json (the frontier keeps none of its own)."""
    return (directory / "base" / "run.json").exists() or any(
        (directory / "points").glob("*/run.json"))


def point_name(algorithm: str, kl_coef: float) -> str:
    return f"{algorithm}-kl{kl_coef:g}"


def _rl_config(cfg: FrontierConfig, algorithm: str, kl_coef: float, out: Path) -> rl.RLConfig:
    """The pipeline's RL stage settings for ``algorithm``, at a fixed kl_coef."""
    base = replace(_base_config(cfg), algorithm=algorithm)
    stage_cfg = pipeline.stage_configs(base)["ppo"]
    # resume: a point interrupted in its RL run continues from its checkpoint (a fresh run
    # would be refused in the directory that run holds)
    settings = {"output_dir": str(out), "kl_coef": kl_coef, "kl_target": None,
                "resume": cfg.resume, "overwrite": cfg.overwrite}
    if cfg.num_iterations is not None:
        settings["num_iterations"] = cfg.num_iterations
    if stage_cfg.settings.uses_critic and pipeline._critic_free(_base_config(cfg)):
        # a critic-free base has no critic settings (rlhf pipeline refuses them there): the
        # point's critic takes the task's, as `rlhf pipeline algorithm=<point's>` would
        task_settings = pipeline._ppo_defaults(algorithm, base.task)
        settings.update({name: getattr(task_settings, name) for name in rl.CRITIC_SETTINGS})
    return replace(stage_cfg, **settings)


def _run_point(cfg: FrontierConfig, algorithm: str, kl_coef: float, base_dir: Path,
               sft_gold_mean: float, sft_gold_se: float) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf import stage
    from rlhf.models import SharedBackbone

    out = Path(cfg.output_dir) / "points" / point_name(algorithm, kl_coef)
    result_path = out / "result.json"
    rl_cfg = _rl_config(cfg, algorithm, kl_coef, out)
    # torchrun: rank 0 alone reads and writes output_dir; every rank gets what it read
    # (pipeline._on_main), so that all decide alike
    finished = pipeline._on_main(lambda: json.loads(result_path.read_text())
                                 if cfg.resume and result_path.exists() else None)
    if finished is not None:
        _check_unchanged(out, algorithm, asdict(rl_cfg))  # a finished point of these settings
        return finished
    tokenizer = AutoTokenizer.from_pretrained(base_dir / "tokenizer")
    if rl_cfg.quantization not in (None, "none"):  # the base's: as its RL stage loads it
        from rlhf.loading import load_causal_lm

        model = load_causal_lm(base_dir / "sft" / "model", setting="sft.model",
                               quantization=rl_cfg.quantization,
                               device=stage.resolve_device(cfg.device))
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir / "sft" / "model")
    backbone = SharedBackbone.load(base_dir / "rm" / "backbone", base_model=model)
    backbone.to(stage.resolve_device(cfg.device, None))
    started = time.perf_counter()
    summary = rl.train(rl_cfg, backbone=backbone, tokenizer=tokenizer,
                       prompts=task.all_prompts("train"), gold_fn=task.gold_scores)
    rl_seconds = time.perf_counter() - started
    prompts = task.ppo_prompts(cfg.eval_samples, seed=cfg.seed + 1, split="heldout")
    texts, kl, proxy = pipeline.sample_texts(
        backbone, tokenizer, prompts, "policy", rl_cfg, cfg.seed + 22,
        _base_config(cfg).sample_batch_size, with_scores=True)
    gold_mean, gold_se = pipeline.mean_stderr(task.gold_scores(texts))
    kl_mean, kl_se = pipeline.mean_stderr(kl)
    proxy_mean, proxy_se = pipeline.mean_stderr(proxy)
    diff_se = math.sqrt(gold_se ** 2 + sft_gold_se ** 2)
    last = summary.get("last_metrics", {})
    result = {
        "algorithm": algorithm, "kl_coef": kl_coef,
        "gold_mean": gold_mean, "gold_stderr": gold_se,
        "gold_gain": gold_mean - sft_gold_mean,
        "gold_gain_in_stderr": (gold_mean - sft_gold_mean) / diff_se if diff_se > 0 else 0.0,
        "proxy_mean": proxy_mean, "proxy_stderr": proxy_se,
        "kl_mean": kl_mean, "kl_stderr": kl_se,
        "rl_seconds": rl_seconds, "peak_memory_mb": last.get("peak_memory_mb"),
        "iterations": summary.get("iterations"),
        "settings": summary.get("algorithm_settings"),
    }

    def write() -> None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(result_path, json.dumps(result, indent=2) + "\n")

    pipeline._on_main(write)
    del backbone, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


@limits_cpu_threads  # as rlhf pipeline: each point's held-out sampling too, not only its RL
def run(cfg: FrontierConfig) -> dict:
    """Run (or resume) the frontier; returns what frontier.json holds."""
    root = Path(cfg.output_dir)
    base_cfg = _base_config(cfg)
    with _named_as_base():
        pipeline.check_settings(base_cfg)
    _point_configs(cfg)  # every point's settings, before the base pipeline runs
    base_summary_path = Path(base_cfg.output_dir) / "summary.json"
    # torchrun: rank 0 alone reads and writes output_dir (pipeline._on_main)
    base = pipeline._on_main(lambda: json.loads(base_summary_path.read_text())
                             if cfg.resume and base_summary_path.exists() else None)
    if base is not None:
        # the finished base is reused only for the settings it was run with (rlhf pipeline
        # --resume refuses others; reusing it here skipped that comparison)
        _check_unchanged(Path(base_cfg.output_dir), "pipeline", asdict(base_cfg),
                         run_files=PIPELINE_RUN_FILES + pipeline._RL_RUN_FILES,
                         resume_safe=pipeline._RESUME_SAFE)
    else:
        if distributed.is_main():  # torchrun: once, not once per rank
            print(f"[frontier] the shared SFT model and reward model: rlhf pipeline into "
                  f"{base_cfg.output_dir}")
        base = pipeline.run(base_cfg)
    sft_gold = base["gold_heldout"]
    points = []
    total = len(cfg.algorithms) * len(cfg.kl_coefs)
    for algorithm in cfg.algorithms:
        for kl_coef in cfg.kl_coefs:
            if distributed.is_main():
                print(f"[frontier] point {len(points) + 1}/{total}: {algorithm} at "
                      f"kl_coef={kl_coef:g}")
            points.append(_run_point(cfg, algorithm, kl_coef, Path(base_cfg.output_dir),
                                     sft_gold["sft_mean"], sft_gold["sft_stderr"]))
    result = {
        "task": "built-in review task",
        "sft_gold_mean": sft_gold["sft_mean"], "sft_gold_stderr": sft_gold["sft_stderr"],
        "eval_samples": cfg.eval_samples,
        "points": points,
        "config": asdict(cfg),
    }

    def write() -> None:
        atomic_write_text(root / "frontier.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(root / "frontier.md", render_table(result))
        plot(result, root / "frontier.png")

    pipeline._on_main(write)  # torchrun: rank 0 writes, every rank waits for the files
    if distributed.is_main():
        print(render_table(result))
        print(f"[frontier] wrote {root / 'frontier.json'}, {root / 'frontier.png'}, "
              f"{root / 'frontier.md'}")
    return result


def render_table(result: dict) -> str:
    """frontier.json's points as a Markdown table (one row per algorithm and kl_coef)."""
    lines = [
        f"SFT model: gold {result['sft_gold_mean']:+.3f} ± {result['sft_gold_stderr']:.3f} "
        f"({result['eval_samples']} held-out samples per policy).",
        "",
        "| algorithm | kl_coef | KL to SFT (nats) | gold reward | gain (SE) | proxy reward | "
        "RL time (s) | peak memory (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        memory = "—" if p.get("peak_memory_mb") is None else f"{p['peak_memory_mb']:.0f}"
        lines.append(
            f"| {p['algorithm']} | {p['kl_coef']:g} | {p['kl_mean']:.2f} ± {p['kl_stderr']:.2f} | "
            f"{p['gold_mean']:+.3f} ± {p['gold_stderr']:.3f} | {p['gold_gain_in_stderr']:+.1f} | "
            f"{p['proxy_mean']:+.2f} | {p['rl_seconds']:.0f} | {memory} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    """Gold (left) and proxy (right) reward against KL to the reference, one curve per
    algorithm (points in kl_coef order, each labelled with its kl_coef); the SFT model's gold
    reward as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlhf.checkpoint import atomic_write_bytes

    fig, (gold_ax, proxy_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_algorithm: dict[str, list[dict]] = {}
    for p in result["points"]:
        by_algorithm.setdefault(p["algorithm"], []).append(p)
    for algorithm, points in by_algorithm.items():
        points = sorted(points, key=lambda p: p["kl_coef"])
        kl = [p["kl_mean"] for p in points]
        line = gold_ax.errorbar(kl, [p["gold_mean"] for p in points],
                                yerr=[p["gold_stderr"] for p in points], marker="o",
                                capsize=3, label=algorithm)
        proxy_ax.plot(kl, [p["proxy_mean"] for p in points], marker="o",
                      color=line[0].get_color(), label=algorithm)
        for p in points:
            gold_ax.annotate(f"{p['kl_coef']:g}", (p["kl_mean"], p["gold_mean"]),
                             textcoords="offset points", xytext=(4, 4), fontsize=7)
    gold_ax.axhline(result["sft_gold_mean"], color="grey", linestyle="--", linewidth=1,
                    label="SFT model")
    gold_ax.set(xlabel="KL to the SFT model (nats per response)",
                ylabel="gold reward (held-out, mean ± SE)",
                title="true reward (labels: kl_coef)")
    proxy_ax.set(xlabel="KL to the SFT model (nats per response)",
                 ylabel="reward-model score (same samples)", title="proxy reward")
    for ax in (gold_ax, proxy_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Over-optimisation frontier on the built-in review task")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
