"""`rlhf sft | rm | ppo | pipeline [config.yaml] [key=value ...] [--resume]` and `rlhf plan ...`.

Each command builds its stage's config dataclass (defaults, then the YAML file, then the
overrides; see rlhf/config.py) and calls the stage's entry point:

    rlhf sft       rlhf.sft.SFTConfig           -> rlhf.sft.train(cfg)
    rlhf rm        rlhf.reward.RewardConfig     -> rlhf.reward.train(cfg)
    rlhf ppo       rlhf.ppo.PPOConfig           -> rlhf.ppo.train(cfg)
    rlhf pipeline  rlhf.pipeline.PipelineConfig -> rlhf.pipeline.run(cfg)

`rlhf pipeline` with no arguments runs all three stages on the built-in review task.
`--resume` sets `resume=true` (the stage continues from its last checkpoint);
`--print-config` prints the resolved config as YAML and exits without training.
`rlhf plan MODEL [options]` prints the expected peak memory of a PPO iteration per stage and the
largest batch that fits a card (rlhf/plan.py; `rlhf plan --help`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields

__all__ = ["STAGES", "Stage", "main"]


@dataclass(frozen=True)
class Stage:
    module: str
    config_class: str
    entry_point: str
    help: str


STAGES: dict[str, Stage] = {
    "sft": Stage("rlhf.sft", "SFTConfig", "train",
                 "supervised fine-tuning on prompt/completion or messages data"),
    "rm": Stage("rlhf.reward", "RewardConfig", "train",
                "reward model (Bradley-Terry) on prompt/chosen/rejected pairs"),
    "ppo": Stage("rlhf.ppo", "PPOConfig", "train",
                 "PPO against the reward model, KL-regularised to the reference"),
    "pipeline": Stage("rlhf.pipeline", "PipelineConfig", "run",
                      "SFT -> reward model -> PPO; with no arguments, on the built-in task"),
}
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="A lean one-GPU RLHF trainer: SFT -> reward model -> PPO.",
        epilog="Example: rlhf pipeline ppo.kl_coef=0.05 sft.max_steps=200",
    )
    commands = parser.add_subparsers(dest="command", metavar="{sft,rm,ppo,pipeline,plan}")
    commands.add_parser("plan", add_help=False,
                        help="expected peak memory per PPO stage and the largest batch that fits")
    for name, stage in STAGES.items():
        sub = commands.add_parser(name, help=stage.help, description=stage.help)
        sub.add_argument("args", nargs="*", metavar="[config.yaml] [key=value]",
                         help="an optional YAML config file, then key=value overrides "
                              "(dotted keys for nested configs, e.g. ppo.kl_coef=0.1)")
        sub.add_argument("--resume", action="store_true",
                         help="continue from the last checkpoint in output_dir")
        sub.add_argument("--print-config", action="store_true",
                         help="print the resolved config as YAML and exit")
    return parser


def _split_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """The config path (the one argument without '=') and the overrides."""
    paths = [arg for arg in args if "=" not in arg]
    if len(paths) > 1:
        raise ValueError(f"expected at most one config file, got {paths}; overrides must look "
                         f"like key=value")
    return (paths[0] if paths else None), [arg for arg in args if "=" in arg]


def _import_stage(stage: Stage):
    try:
        return importlib.import_module(stage.module)
    except ModuleNotFoundError as error:
        if error.name is not None and (stage.module == error.name
                                       or stage.module.startswith(error.name + ".")):
            raise RuntimeError(f"the stage module {stage.module} is not available in this "
                               f"installation (is the checkout complete?)") from error
        if error.name is not None and not error.name.startswith("rlhf"):
            raise RuntimeError(f"{stage.module} needs the package {error.name!r}, which is not "
                               f"installed; install the trainer's dependencies with "
                               f"pip install -e '.[train]'") from error
        raise


def _printable(summary: dict) -> dict:
    """The JSON-friendly part of a stage summary (models and tokenizers are left out)."""
    kept = {}
    for key, value in summary.items():
        if isinstance(value, float) and not math.isfinite(value):
            kept[key] = str(value)
        elif isinstance(value, (str, int, float, bool)) or value is None:
            kept[key] = value
        elif isinstance(value, dict):
            inner = _printable(value)
            if inner:
                kept[key] = inner
        elif isinstance(value, (list, tuple)) and all(
                isinstance(v, (str, int, float, bool)) or v is None for v in value):
            kept[key] = list(value)
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rlhf` command; returns the process exit code."""
    from rlhf.config import config_to_dict, load_config

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:
        from rlhf.plan import main as plan_main

        return plan_main(argv[1:])
    parser = _parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    stage = STAGES[ns.command]
    try:
        module = _import_stage(stage)
    except RuntimeError as error:
        print(f"rlhf {ns.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    config_class = getattr(module, stage.config_class)
    entry_point = getattr(module, stage.entry_point)

    try:
        config_path, overrides = _split_args(ns.args)
        if ns.resume:
            if "resume" not in {f.name for f in fields(config_class)}:
                raise ValueError(f"{stage.config_class} has no `resume` field; --resume does not "
                                 f"apply to `rlhf {ns.command}`")
            overrides.append("resume=true")
        cfg = load_config(config_class, config_path, overrides)
    except (ValueError, FileNotFoundError) as error:
        print(f"rlhf {ns.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE

    if ns.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    try:
        summary = entry_point(cfg)
    except KeyboardInterrupt:
        # The stages save a checkpoint before re-raising Ctrl-C.
        print(f"\nrlhf {ns.command}: interrupted; a checkpoint was saved under "
              f"{getattr(cfg, 'output_dir', 'the output directory')}. Continue with "
              f"`rlhf {' '.join([ns.command, *ns.args])} --resume`.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, FileNotFoundError) as error:
        # Bad input (data without the needed columns, an empty dataset, a model directory that
        # is not one, ...): the message says what is wrong; the traceback would only bury it.
        # RLHF_TRACEBACK=1 shows it anyway.
        if os.environ.get("RLHF_TRACEBACK") == "1":
            raise
        print(f"rlhf {ns.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(summary, dict):
        print(json.dumps(_printable(summary), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
