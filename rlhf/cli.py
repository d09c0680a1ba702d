"""`rlhf sft | rm | ppo | grpo | pipeline | frontier [config.yaml] [key=value ...] [--resume]`;
`rlhf plan`.

Each command builds its stage's config dataclass (defaults, then the YAML file, then the
overrides; see rlhf/config.py) and calls the stage's entry point:

    rlhf sft       rlhf.sft.SFTConfig           -> rlhf.sft.train(cfg)
    rlhf rm        rlhf.reward.RewardConfig     -> rlhf.reward.train(cfg)
    rlhf ppo       rlhf.rl.PPOConfig            -> rlhf.rl.train(cfg)   (algorithm=ppo)
    rlhf grpo      rlhf.rl.GRPOConfig           -> rlhf.rl.train(cfg)   (algorithm=grpo)
    rlhf pipeline  rlhf.pipeline.PipelineConfig -> rlhf.pipeline.run(cfg)
    rlhf frontier  rlhf.frontier.FrontierConfig -> rlhf.frontier.run(cfg)

`rlhf ppo` and `rlhf grpo` are one RL stage; they differ only in the default algorithm (and
output_dir): either takes `algorithm=` (ppo, grpo, dr_grpo, rloo, gspo, dapo, cispo,
sapo).
`rlhf pipeline` with no arguments runs all three stages on the built-in review task.
`--resume` sets `resume=true` (the stage continues from its last checkpoint);
`--print-config` prints the resolved config as YAML (for the pipeline: the settings each stage
will really use) and exits without training.
`rlhf plan MODEL [options]` prints the expected peak memory of a PPO iteration per stage and the
largest batch that fits a card (rlhf/plan.py; `rlhf plan --help`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import re
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from rlhf.errors import describe_os_error

__all__ = ["EXIT_BROKEN_PIPE", "STAGES", "STOP_SIGNALS", "Stage", "Terminated", "check_output_dir",
           "main", "quiet_broken_pipe", "sigterm_as_interrupt"]


@dataclass(frozen=True)
class Stage:
    module: str
    config_class: str
    entry_point: str
    help: str


STAGES: dict[str, Stage] = {
    "sft": Stage("rlhf.sft", "SFTConfig", "train",
                 "supervised fine-tuning on prompt/completion, messages or text data"),
    "rm": Stage("rlhf.reward", "RewardConfig", "train",
                "reward model (Bradley-Terry) on prompt/chosen/rejected pairs"),
    "ppo": Stage("rlhf.rl", "PPOConfig", "train",
                 "PPO against the reward model, KL-regularised to the reference (the RL stage; "
                 "algorithm= picks another)"),
    "grpo": Stage("rlhf.rl", "GRPOConfig", "train",
                  "GRPO (critic-free, group_size samples per prompt): the RL stage with "
                  "algorithm=grpo"),
    "pipeline": Stage("rlhf.pipeline", "PipelineConfig", "run",
                      "SFT -> reward model -> RL (algorithm=ppo|grpo|...); with no arguments, "
                      "PPO on the built-in task"),
    "frontier": Stage("rlhf.frontier", "FrontierConfig", "run",
                      "over-optimisation frontier on the built-in task: the RL stage of each "
                      "algorithm at several KL strengths, gold and proxy reward against KL"),
}
EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 130, 143  # 128 + SIGINT / SIGTERM
EXIT_HANGUP = 129  # 128 + SIGHUP
# The signals that stop a run as Ctrl-C does (a checkpoint, then the --resume line): SIGTERM,
# and SIGHUP where the platform has one (not Windows): a closed terminal or a dropped ssh
# session sends it to a run started without nohup, which ended at once with no checkpoint.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP")
                     if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill PID``, ``timeout``, a batch scheduler's preemption, ``docker stop``) or
    SIGHUP (the terminal closed, the ssh session dropped), raised where the run is, as Ctrl-C
    raises KeyboardInterrupt: the stages catch KeyboardInterrupt, so they save a checkpoint
    before the process ends, as they do on Ctrl-C. Without it, Python's default action ended
    the process at once, and --resume went back to the last periodic checkpoint (up to
    save_every steps lost: 500 by default in SFT). ``signum`` is the signal that came."""

    def __init__(self, message: str = "", signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended."""
        return 128 + int(self.signum)


class _HungUpOutput:
    """sys.stdout / sys.stderr after a SIGHUP: once a write fails because the terminal is gone
    (EIO) or the pipe's reader is (EPIPE: ``| tee log``, which the hang-up ended too), the
    stream's file descriptor, and the other standard one where it is the same terminal or
    pipe, are pointed at os.devnull and the write goes there (so do the writes of whoever
    holds the stream itself, a progress bar). Without it the stage's 'interrupted, checkpoint
    saved' line raised OSError after the save, and the run ended with that traceback (where no
    one reads it) and exit status 1 instead of 129."""

    def __init__(self, stream):
        self._stream = stream

    def _guarded(self, call, *args):
        import errno

        try:
            return call(*args)
        except OSError as error:
            if error.errno not in (errno.EIO, errno.EPIPE):
                raise
            dead = os.fstat(self._stream.fileno())
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                for fd in {self._stream.fileno(), 1, 2}:
                    with contextlib.suppress(OSError):
                        if os.path.samestat(os.fstat(fd), dead):
                            os.dup2(devnull, fd)
            finally:
                os.close(devnull)
            return call(*args)

    def write(self, text):
        return self._guarded(self._stream.write, text)

    def flush(self):
        return self._guarded(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _guard_output_after_hangup() -> None:
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or isinstance(stream, _HungUpOutput):
            continue
        try:
            stream.fileno()
        except (AttributeError, OSError, ValueError):  # not a file (pytest's capture, StringIO)
            continue
        setattr(sys, name, _HungUpOutput(stream))


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, the first SIGTERM or SIGHUP (``STOP_SIGNALS``) raises ``Terminated``
    in the main thread (a second one of that signal ends the process at once, Python's
    default). Not under torchrun: a rank raising where the signal finds it could leave the
    others waiting in a collective for it; there ``distributed.install_stop_handlers`` (set by
    ``init_from_env``) notes the signal and every rank raises ``Terminated`` together at the
    next shared collective. A SIGHUP that is ignored (``nohup``) stays ignored: such a run goes
    on after the terminal closes."""
    if (threading.current_thread() is not threading.main_thread()
            or os.environ.get("WORLD_SIZE", "1") != "1"):
        yield
        return

    def terminate(signum, frame):
        signal.signal(signum, signal.SIG_DFL)
        name = signal.Signals(signum).name
        if name == "SIGHUP":
            _guard_output_after_hangup()
        raise Terminated(f"terminated by signal {signum} ({name})", signum)

    previous = {}
    try:
        for number in STOP_SIGNALS:
            if number != signal.SIGTERM and signal.getsignal(number) == signal.SIG_IGN:
                continue  # nohup: the user asked the run to outlive the terminal
            previous[number] = signal.signal(number, terminate)
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="A lean one-GPU RLHF trainer: SFT -> reward model -> RL (PPO, GRPO, ...).",
        epilog="Example: rlhf pipeline ppo.kl_coef=0.05 sft.max_steps=200",
    )
    commands = parser.add_subparsers(dest="command",
                                     metavar="{sft,rm,ppo,grpo,pipeline,frontier,plan}")
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
        sub.add_argument("--nproc", type=int, default=None, metavar="N",
                         help="data-parallel on N processes of this machine (one per GPU): "
                              "launches torchrun --nproc-per-node N for you "
                              "(docs/distributed.md); strategy=ddp|fsdp2|auto picks how")
    return parser


def _split_args(args: Sequence[str], config_class=None) -> tuple[str | None, list[str]]:
    """The config path (the one argument without '=') and the overrides. An argument without
    '=' that is no file but one of ``config_class``'s settings (`rlhf sft lr 1e-4`, `rlhf ppo
    resume`) is a key without its value, not a config file that "does not exist"."""
    paths = [arg for arg in args if "=" not in arg]
    names = {f.name for f in fields(config_class)} if config_class is not None else set()
    for arg in paths:
        if arg.replace("-", "_") in names and not Path(arg).expanduser().exists():
            key = arg.replace("-", "_")
            flag = " (or --resume)" if key == "resume" else ""
            raise ValueError(f"{arg!r} is a setting without a value: write {key}=<value>{flag} "
                             f"(key=value, no spaces around '='), or give a YAML config file")
    if len(paths) > 1:
        raise ValueError(f"expected at most one config file, got {paths}; overrides must look "
                         f"like key=value")
    return (paths[0] if paths else None), [arg for arg in args if "=" in arg]


def _resume_command(command: str, args: Sequence[str], config_path: str | None, cfg,
                    nproc: int | None = None) -> str:
    """The command that continues an interrupted run: its own arguments and --resume, without
    ``overwrite=`` / ``resume=`` (``overwrite=true`` with --resume is refused as a contradiction,
    so repeating the run's command line gave a command that stopped at once), and with
    ``overwrite=false`` when the config file may set it; ``--nproc N`` when the run was launched
    with it (the ranks torchrun starts learn N from ``_NPROC_ENV``); each argument
    shell-quoted, so that a path with a space pastes back as one argument."""
    kept = [arg for arg in args if arg.partition("=")[0].strip() not in ("overwrite", "resume")]
    if config_path is not None and getattr(cfg, "overwrite", False):
        kept.append("overwrite=false")  # the file's `overwrite: true`
    if nproc is None and os.environ.get(_NPROC_ENV, "").isdigit():
        nproc = int(os.environ[_NPROC_ENV])
    launch = ["--nproc", str(nproc)] if nproc is not None and nproc > 1 else []
    return " ".join(shlex.quote(arg) for arg in ["rlhf", command, *kept, *launch, "--resume"])


# set by --nproc N for torchrun and its ranks: N, and the command that resumes the run
_NPROC_ENV = "RLHF_NPROC"
_RESUME_ENV = "RLHF_RESUME_COMMAND"


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


def check_output_dir(output_dir: str | os.PathLike) -> None:
    """Stop before anything loads when ``output_dir`` cannot be written: a file is in its place
    (or in the place of one of its parents), or the nearest existing parent is read-only."""
    if not str(output_dir).strip():
        # Path("") is the current directory: the run would own it, and overwrite=true would
        # delete a run's files there (an unset shell variable in output_dir=$OUT does this)
        raise ValueError("output_dir is empty; give the directory the run writes to (e.g. "
                         "output_dir=runs/try1), or leave it out for the stage's default")
    path = Path(output_dir).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "" if probe == path else f" (its parent {str(probe)!r} is a file)"
        raise ValueError(f"output_dir={str(output_dir)!r} is a file, not a directory{where}; "
                         f"choose another output_dir or move the file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir={str(output_dir)!r} cannot be written: {str(probe)!r} is "
                         f"read-only for this user; choose an output_dir you can write to")


def _one_line(error: BaseException, where: str | None = None) -> str:
    """The user's line for an error the CLI reports without a traceback."""
    if isinstance(error, OSError) and error.errno is not None:
        message = describe_os_error(error, where)
    else:
        message = str(error) or type(error).__name__
    return " ".join(message.split())  # one line, whatever the library put in the message


# Errors that are about the user's input or machine, not about our code: the message says what
# to do, the traceback would only bury it (RLHF_TRACEBACK=1 shows it anyway). FloatingPointError
# is the stages' non-finite loss guard; OSError a full disk, a read-only directory, a missing file.
USER_ERRORS = (ValueError, FloatingPointError, OSError)


_OUR_PACKAGES = tuple(str(Path(__file__).resolve().parents[1] / name) + os.sep
                      for name in ("rlhf", "rlhf_kernels"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rlhf` command; returns the process exit code. Warnings of this
    trainer and its kernels print as one line, `rlhf <command>: warning: ...` (Python's format,
    a file path and a source line, stays for other packages' warnings)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else "rlhf"
    python_format = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None):
        if str(Path(filename).resolve()).startswith(_OUR_PACKAGES):
            if os.environ.get("RANK", "0") != "0":
                return ""  # every rank checks the same settings: rank 0 says it once
            return f"rlhf {command}: warning: {message}\n"
        return python_format(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
    try:
        return quiet_broken_pipe(_main, argv)
    finally:
        warnings.formatwarning = python_format


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `yes | head`'s yes


def quiet_broken_pipe(entry, *args) -> int:
    """``entry(*args)``, a console entry point's body, whose output may go to a pipe that closes
    early (``rlhf plan ... | head``, ``python -m rlhf.memory | head -3``, ``--print-config |
    grep lr``): the reader has what it wanted, so the command ends quietly with status 141
    (128 + SIGPIPE, as a C tool the signal ends) instead of a BrokenPipeError traceback. The
    standard streams are pointed at os.devnull first, so that the interpreter's flush at exit
    does not fail again ("Exception ignored ... BrokenPipeError")."""
    try:
        code = entry(*args)
        sys.stdout.flush()  # what print() buffered: the pipe may be gone by now
        return code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(AttributeError, OSError, ValueError):
                    os.dup2(devnull, stream.fileno())  # not a file (pytest's capture): left
        finally:
            os.close(devnull)
        return EXIT_BROKEN_PIPE


def _out_of_memory_line(error: BaseException) -> str:
    """The user's line for torch's OutOfMemoryError (a batch, a length or a rank too large for
    the card or the host), which ended the run in a traceback: torch's first sentences (what
    it tried to allocate, what the card has) and what to change."""
    sentences = re.split(r"(?<=\.)\s+", " ".join(str(error).split()))
    said = " ".join(sentence for sentence in sentences[:3]
                    if not sentence.startswith(("Including", "If reserved", "See ")))
    known = re.search(r"out of memory|not enough memory", said, re.IGNORECASE)
    return (f"{'' if known else 'out of memory: '}{said.rstrip('.')}. Lower the batch "
            f"(batch_size; in the RL stage minibatch_size or forward_batch_size, with "
            f"grad_accum_steps to keep the step's size), the lengths (max_length, "
            f"max_new_tokens) or lora_rank, or set gradient_checkpointing=true; `rlhf plan "
            f"MODEL` estimates what fits")


def _check_kernels_backend() -> None:
    """RLHF_KERNELS_BACKEND, which the kernels read at each call: a value that is no backend is
    refused before the run loads anything, not at the first op, once a model has loaded."""
    from rlhf_kernels import backend

    value = os.environ.get(backend.ENV_VAR)
    if value is not None and value.lower() not in backend.BACKENDS:
        raise ValueError(f"{backend.ENV_VAR}={value!r} is not a backend; expected one of "
                         f"{backend.BACKENDS} (or unset: auto)")


def _device_notices(cfg, values) -> None:
    """Say (one warning per setting) what the user set that this run's device will not read:
    ``bf16=true`` where the run computes on the CPU (bf16 autocast is for a CUDA GPU; the CPU
    computes in fp32), ``cpu_threads=N`` where it runs on a GPU (torch's thread count is set
    for a stage on the CPU only). As ``max_memory`` on the CPU is said (rlhf/stage.py): a
    notice, not an error, since one config file often serves a GPU machine and a laptop.
    ``values``: the raw tree of what was given (``config.given_values``), so that a default
    (bf16: true, cpu_threads: 1) is never said; the device is the config's own ``device``
    (every stage, the pipeline and the frontier have one; ``auto`` as this machine resolves
    it)."""
    from rlhf.config import given_keys, value_of

    device = getattr(cfg, "device", None)
    if not isinstance(device, str):
        return
    given = {key: key.rsplit(".", 1)[-1] for key in given_keys(values)}
    bf16 = [key for key, name in given.items()
            if name == "bf16" and _given_value(values, key, bool) is True]
    threads = [key for key, name in given.items()
               if name == "cpu_threads" and _given_value(values, key, int) is not None]
    if not bf16 and not threads:
        return
    import torch

    on = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" \
        else device.split(":")[0]
    how = f"device={device}" + (f", {on} on this machine" if device == "auto" else "")
    if bf16 and on == "cpu":
        shown = ", ".join(f"{key}=true" for key in bf16)
        has, it = ("has", "it") if len(bf16) == 1 else ("have", "them")
        warnings.warn(f"{shown} {has} no effect on the CPU ({how}): bf16 autocast runs on a "
                      f"CUDA GPU, and on the CPU the stages compute in fp32; remove {it}, or run "
                      f"on a GPU", stacklevel=2)
    if threads and on == "cuda":
        shown = ", ".join(f"{key}={value_of(values, key, int)}" for key in threads)
        has, it = ("has", "it") if len(threads) == 1 else ("have", "them")
        warnings.warn(f"{shown} {has} no effect on a GPU ({how}): it sets torch's threads for "
                      f"a stage that runs on the CPU; remove {it}, or run with device=cpu",
                      stacklevel=2)


def _given_value(values, key: str, field_type):
    """``key``'s given value as ``field_type``, or None when it is null or not of that type
    (the config's own check has said so already, or will)."""
    from rlhf.config import value_of

    try:
        return value_of(values, key, field_type)
    except ValueError:
        return None


def _main(argv: list[str]) -> int:
    from rlhf.config import config_to_dict, given_values, load_config

    if argv[:1] == ["plan"]:
        from rlhf.plan import main as plan_main

        return plan_main(argv[1:])
    parser = _parser()
    # key=value overrides may also follow an option (`--resume ppo.kl_coef=0.1`, as a --resume
    # refusal says to add them): argparse leaves a positional after an option over
    ns, extra = parser.parse_known_args(argv)
    unknown = [arg for arg in extra if arg.startswith("-") or ns.command is None]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        ns.args = list(ns.args) + extra
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
    # --nproc N: this process checks the settings, then becomes torchrun, whose processes read
    # them again and print their own warnings (here they would be said once more)
    launching = ns.nproc is not None and not ns.print_config

    def fail(error: BaseException, where: str | None = None) -> int:
        if os.environ.get("RLHF_TRACEBACK") == "1" or isinstance(error, BrokenPipeError):
            raise error  # a closed pipe: the reader has gone, nothing to say (quiet_broken_pipe)
        if getattr(error, "from_rank_0", False):  # torchrun: rank 0's error, which it says
            return EXIT_USAGE
        # "SFTConfig.lr must be ...": the class is the Python API's name; the user typed lr
        # (not "TRL's GRPOConfig.num_iterations", another library's class of that name)
        line = re.sub(rf"(?<!'s )\b{re.escape(config_class.__name__)}\.(?=[A-Za-z_])", "",
                      _one_line(error, where))
        print(f"rlhf {ns.command}: error: {line}", file=sys.stderr)
        return EXIT_USAGE

    try:
        from rlhf import distributed

        config_path, overrides = _split_args(ns.args, config_class)
        # strategy= is a setting of the run's processes, not of a stage's config
        strategies = [arg.split("=", 1)[1] for arg in overrides if arg.startswith("strategy=")]
        overrides = [arg for arg in overrides if not arg.startswith("strategy=")]
        distributed.set_strategy(strategies[-1] if strategies else None)
        if ns.resume:
            if "resume" not in {f.name for f in fields(config_class)}:
                raise ValueError(f"{stage.config_class} has no `resume` field; --resume does not "
                                 f"apply to `rlhf {ns.command}`")
            overrides.append("resume=true")
        try:
            with warnings.catch_warnings() if launching else contextlib.nullcontext():
                if launching:
                    warnings.simplefilter("ignore")
                cfg = load_config(config_class, config_path, overrides)
            with warnings.catch_warnings():  # read once more: its warnings are said above
                warnings.simplefilter("ignore")
                given = given_values(config_path, overrides)
        except ValueError as error:
            if (config_path is None or any(arg.startswith("strategy.") for arg in overrides)
                    or not str(error).startswith("unknown config key 'strategy'")):
                raise
            # the file's `strategy:` (the command line's strategy= is taken out above): it was
            # refused with the stage's valid keys, as if strategy= did not exist
            raise ValueError(f"strategy in {config_path!r} is not a setting of the config "
                             f"file: it picks how the processes of --nproc N or torchrun share "
                             f"the model; give it on the command line (`rlhf {ns.command} "
                             f"{config_path} strategy=ddp|fsdp2|auto`) and remove it from the "
                             f"file") from None
        if getattr(cfg, "resume", False) is True and getattr(cfg, "overwrite", False) is True:
            # said by the run directory once the stage starts; here --print-config refuses it
            # too, and a run says it alone (not after "--resume: ... a new run starts there")
            raise ValueError("resume=true and overwrite=true contradict each other: resume "
                             "continues the run in output_dir, overwrite deletes it; drop one "
                             "(--resume, or overwrite=true)")
        if isinstance(getattr(cfg, "output_dir", None), str):
            # `output_dir=~/runs/x` (quoted, from a YAML file, or a shell that leaves it) is a
            # home directory, as it is for model= and dataset=, not a folder named ~ here
            cfg.output_dir = os.path.expanduser(cfg.output_dir)
    except USER_ERRORS as error:
        return fail(error)
    printable = getattr(module, "printable_config", config_to_dict)
    if launching:  # (printing the config launches nothing)
        # the settings were read above and are resolved here as --print-config resolves them
        # (the pipeline's checks of its stages), so that a wrong one is said once, not once by
        # each process torchrun starts
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                printable(cfg)
        except USER_ERRORS as error:
            return fail(error)
        try:
            code = _launch_torchrun(ns.nproc, argv, _resume_command(
                ns.command, ns.args, config_path, cfg, ns.nproc))
        except SystemExit as refused:  # bad input: the command's own error line, exit status 2
            reason = str(refused.code).removeprefix("rlhf: error: ")
            print(f"rlhf {ns.command}: error: {reason}", file=sys.stderr)
            return EXIT_USAGE
        if code is not None:
            return code

    if ns.print_config:
        import yaml

        # What the run would really use: a module may resolve settings its config only holds
        # (the pipeline sets each stage's output_dir, seed, device, ... from its own fields).
        try:
            shown = printable(cfg)
        except USER_ERRORS as error:
            return fail(error)
        _device_notices(cfg, given)
        print(yaml.safe_dump(shown, sort_keys=False), end="")
        notes = getattr(module, "printed_notes", None)  # derived, shown as comments: the
        if notes is not None:                           # output loads back as a config
            print("".join(f"# {line}\n" for line in notes(cfg).splitlines()), end="")
        return 0
    output_dir = getattr(cfg, "output_dir", None)
    try:
        _check_kernels_backend()  # read by the first op call, after the model has loaded
        if output_dir is not None:
            check_output_dir(output_dir)
            # a module whose runs keep their run.json elsewhere says where (rlhf frontier)
            holds_run = getattr(module, "holds_run",
                                lambda directory: (Path(directory) / "run.json").exists())
            if getattr(cfg, "resume", False) and os.environ.get("RANK", "0") == "0" and \
                    not holds_run(Path(output_dir).expanduser()):
                # a mistyped output_dir would otherwise train from scratch without a word
                print(f"rlhf {ns.command}: --resume: {output_dir} holds no run yet (no "
                      f"run.json), so a new run starts there", file=sys.stderr)
        # under torchrun (WORLD_SIZE > 1): join the process group (rlhf/distributed.py)
        distributed.init_from_env(getattr(cfg, "device", "auto"))
        if strategies and not distributed.is_distributed():
            # the strategy picks how several processes share the model; one has nothing to pick
            print(f"rlhf {ns.command}: strategy={strategies[-1]} applies to a run of several "
                  f"processes (--nproc N or torchrun); this run is one process, where it changes "
                  f"nothing", file=sys.stderr)
        _device_notices(cfg, given)
        try:
            with sigterm_as_interrupt():
                summary = entry_point(cfg)
        finally:
            # asked before leaving the process group: after it every rank reads as rank 0, and
            # each printed the summary (--nproc N showed it N times)
            main_rank = distributed.is_main()
            distributed.shutdown()
    except KeyboardInterrupt as interrupt:
        # The stages save a checkpoint before re-raising Ctrl-C (or SIGTERM / SIGHUP,
        # Terminated) once their loop runs (and say so); one while the model or data loads
        # comes before any checkpoint.
        terminated = isinstance(interrupt, Terminated)
        how = f"terminated ({interrupt.signal_name})" if terminated else "interrupted"
        again = _resume_command(ns.command, ns.args, config_path, cfg)
        if os.environ.get("RANK", "0") == "0":  # torchrun: once, not once per rank
            print(f"\nrlhf {ns.command}: {how}. Continue with `{again}` (it continues from the "
                  f"last checkpoint under {output_dir or 'the output directory'}, or starts "
                  f"afresh when there is none).", file=sys.stderr)
        return interrupt.exit_code if terminated else EXIT_INTERRUPTED
    except (*USER_ERRORS, distributed.RankFailure) as error:
        # Bad input (data without the needed columns, an unknown model path, a diverged run, a
        # full disk, ...) or a torchrun peer that died: one line that says what is wrong and
        # what to do.
        return fail(error, None if output_dir is None else str(output_dir))
    except RuntimeError as error:
        import torch

        if not isinstance(error, torch.OutOfMemoryError) or \
                os.environ.get("RLHF_TRACEBACK") == "1":
            raise
        return fail(ValueError(_out_of_memory_line(error)))
    if isinstance(summary, dict) and main_rank:
        written = getattr(module, "SUMMARY_FILE", None)
        if written is not None and output_dir is not None:
            # the pipeline and the frontier print their figures themselves and write the whole
            # summary (every setting, hundreds of lines): dumped here, it pushed those figures
            # off the screen
            print(f"summary: {Path(output_dir) / written}")
        else:
            print(json.dumps(_printable(summary), indent=2, default=str))
    return 0


def _launch_torchrun(nproc: int, argv: Sequence[str], resume_command: str = "") -> int | None:
    """``--nproc N``: run this same command under ``torchrun --standalone --nproc-per-node N``:
    this process becomes torchrun (it does not return); None when there is nothing to launch
    (N = 1). ``resume_command``: what torchrun says to run after a signal stopped the ranks.

    torchrun replaces this process (exec) instead of running as its child: a signal for this
    process (``kill PID``, ``timeout``, a scheduler's preemption, a closed terminal) then
    reaches torchrun, which stops every rank. As a child, torchrun and its ranks outlived the
    killed launcher and trained on in the background, holding output_dir's lock."""
    if nproc < 1:
        raise SystemExit(f"rlhf: error: --nproc must be >= 1 (processes on this machine), got "
                         f"{nproc}")
    if "WORLD_SIZE" in os.environ:
        raise SystemExit(f"rlhf: error: --nproc {nproc} launches torchrun, and this process "
                         f"already runs under it (WORLD_SIZE={os.environ['WORLD_SIZE']}); "
                         f"drop --nproc")
    if nproc == 1:
        return None
    args, skip = [], False
    for arg in argv:  # the command without --nproc N
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "rlhf", *args]
    print(f"rlhf: launching {nproc} processes: {' '.join(command[1:])}", file=sys.stderr)
    # torchrun itself, except that a rank that stopped with an error (its one line already
    # printed) gives its exit status (2: bad input), not torchrun's 1 and a traceback
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[_NPROC_ENV] = str(nproc)
    os.environ[_RESUME_ENV] = resume_command
    os.execv(sys.executable, [sys.executable, "-c", _TORCHRUN, *command[3:]])
    return None  # not reached: execv does not return


_TORCHRUN = """
import os, signal, sys
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run
try:
    run(parse_args(sys.argv[1:]))
except ChildFailedError as error:
    codes = [failure.exitcode for failure in error.failures.values()]
    sys.exit(next((code for code in codes if code > 0), 1))
except SignalException as error:  # kill, timeout, a closed terminal: the ranks are stopped
    name = signal.Signals(error.sigval).name
    again = os.environ.get("RLHF_RESUME_COMMAND")
    again = f"`{again}`" if again else "the same command and --resume"
    print(f"rlhf: torchrun got {name} and stopped every process; continue the run with "
          f"{again} (from its last checkpoint)", file=sys.stderr)
    sys.exit(128 + int(error.sigval))
"""


if __name__ == "__main__":
    sys.exit(main())
