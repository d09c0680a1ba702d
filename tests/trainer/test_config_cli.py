"""Config loading (defaults -> YAML -> key=value) and the `rlhf` command line."""

from __future__ import annotations

import enum
import errno
import io
import os
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml

from rlhf import cli, ppo, reward, sft
from rlhf.config import config_to_dict, load_config, parse_overrides, save_config
from rlhf.stage import nonfinite_error, resolve_device


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Inner:
    kl_coef: float = 0.05
    steps: int = 10
    adaptive: bool = False
    output_dir: str = "runs/inner"


@dataclass
class Outer:
    name: str = "run"
    lr: float = 1e-3
    model: str | None = None
    max_len: int | None = 64
    layers: list[int] = field(default_factory=lambda: [1, 2])
    shape: tuple[int, int] = (3, 4)
    targets: list[str] | None = None
    mode: Literal["fixed", "adaptive"] = "fixed"
    color: Color = Color.RED
    path: Path = Path("out")
    extra: dict[str, float] = field(default_factory=dict)
    ppo: Inner = field(default_factory=lambda: Inner(output_dir="runs/outer/ppo"))
    resume: bool = False

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def test_defaults_yaml_then_overrides(tmp_path):
    assert load_config(Outer) == Outer()
    config_file = tmp_path / "c.yaml"
    config_file.write_text("lr: 1e-4\nname: 2024\nppo:\n  steps: 20\n  kl_coef: 0.2\n"
                           "layers: [4, 5, 6]\nextra: {a: 1}\n")
    cfg = load_config(Outer, config_file, ["ppo.kl_coef=0.5", "model=gpt2", "max_len=null"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)  # YAML 1.1 reads 1e-4 as a string
    assert cfg.name == "2024"
    # The parent default of the nested config (its output_dir) is kept.
    assert cfg.ppo == Inner(kl_coef=0.5, steps=20, output_dir="runs/outer/ppo")
    assert cfg.model == "gpt2" and cfg.max_len is None
    assert cfg.layers == [4, 5, 6] and cfg.extra == {"a": 1.0}


@pytest.mark.parametrize("override, attribute, expected", [
    ("lr=3", "lr", 3.0),
    ("lr=2.5e-5", "lr", 2.5e-5),
    ("name=123", "name", "123"),  # a string field keeps the text as typed
    ("name=null", "name", "null"),
    ("model=None", "model", None),
    ("max_len=128", "max_len", 128),
    ("max_len=1e3", "max_len", 1000),
    ("layers=[7, 8]", "layers", [7, 8]),
    ("layers=7,8,9", "layers", [7, 8, 9]),
    ("shape=[5, 6]", "shape", (5, 6)),
    ("targets=q_proj,v_proj", "targets", ["q_proj", "v_proj"]),
    ("mode=adaptive", "mode", "adaptive"),
    ("color=blue", "color", Color.BLUE),
    ("color=BLUE", "color", Color.BLUE),
    ("path=/tmp/x", "path", Path("/tmp/x")),
    ("resume=true", "resume", True),
    ("resume=no", "resume", False),
    ("resume=1", "resume", True),
    ("ppo={steps: 3}", "ppo", Inner(steps=3, output_dir="runs/outer/ppo")),
    ("ppo.adaptive=yes", "ppo", Inner(adaptive=True, output_dir="runs/outer/ppo")),
])
def test_override_coercion(override, attribute, expected):
    value = getattr(load_config(Outer, None, [override]), attribute)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("override, message", [
    ("lrr=1", r"unknown config key 'lrr'.*Did you mean 'lr'.*Valid keys: color, extra, layers"),
    ("ppo.kl_cof=1", r"unknown config key 'ppo.kl_cof'.*'ppo.kl_coef'.*under 'ppo'"),
    ("lr=fast", r"'lr' must be a number, got 'fast'"),
    ("max_len=2.5", r"'max_len' must be an integer or null, got '2.5'"),
    ("ppo.steps=2.5", r"'ppo.steps' must be an integer, got 2.5"),
    ("resume=maybe", r"'resume' must be true or false, got 'maybe'"),
    ("mode=random", r"'mode' must be one of \['fixed', 'adaptive'\]"),
    ("color=green", r"'color' must be one of \['RED', 'BLUE'\]"),
    ("shape=[1]", r"'shape' must have 2 items"),
    ("ppo=3", r"'ppo' is a nested config"),
    ("lr=-1", r"lr must be > 0, got -1"),  # the dataclass's own check runs
    ("lr", r"must look like key=value"),
    ("=3", r"must look like key=value"),
    ("ppo..steps=3", r"must look like key=value"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(Outer, None, [override])


def test_bad_files_and_conflicting_overrides(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(Outer, tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(Outer, tmp_path / "empty.yaml") == Outer()
    (tmp_path / "unknown.yaml").write_text("ppo:\n  nope: 1\n")
    with pytest.raises(ValueError, match="'ppo.nope'"):
        load_config(Outer, tmp_path / "unknown.yaml")
    with pytest.raises(ValueError, match="already"):
        parse_overrides(["ppo=1", "ppo.steps=2"])
    with pytest.raises(TypeError, match="dataclass"):
        load_config(dict)


def test_required_fields_and_round_trip(tmp_path):
    @dataclass
    class Needs:
        data: str
        epochs: int = 1

    with pytest.raises(ValueError, match=r"needs values for \['data'\]"):
        load_config(Needs, None, ["epochs=2"])
    assert load_config(Needs, None, ["data=x.jsonl"]) == Needs("x.jsonl")

    cfg = load_config(Outer, None, ["ppo.steps=7", "color=blue", "path=p", "shape=[1, 2]"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text()) == config_to_dict(cfg)
    assert load_config(Outer, tmp_path / "resolved.yaml") == cfg


# ---------------------------------------------------------------- the command line


@pytest.fixture
def fake_stage(monkeypatch):
    """A stage module `rlhf._fake_stage` whose train() records the config it was given."""
    module = types.ModuleType("rlhf._fake_stage")
    calls = []

    def train(cfg):
        calls.append(cfg)
        if cfg.name == "interrupt":
            raise KeyboardInterrupt
        return {"stage": "fake", "loss": 0.5, "model": object(), "nested": {"acc": 0.8},
                "bad": float("nan")}

    module.Outer, module.train, module.calls = Outer, train, calls
    monkeypatch.setitem(sys.modules, "rlhf._fake_stage", module)
    monkeypatch.setitem(cli.STAGES, "sft", cli.Stage("rlhf._fake_stage", "Outer", "train", "x"))
    return module


def test_cli_builds_the_config_and_calls_the_stage(fake_stage, tmp_path, capsys):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("ppo:\n  steps: 99\n")
    assert cli.main(["sft", str(config_file), "ppo.kl_coef=0.3", "lr=0.01", "--resume"]) == 0
    (cfg,) = fake_stage.calls
    assert cfg.ppo.steps == 99 and cfg.ppo.kl_coef == 0.3 and cfg.lr == 0.01 and cfg.resume
    printed = capsys.readouterr().out
    assert '"loss": 0.5' in printed and '"acc": 0.8' in printed and "model" not in printed


def test_cli_print_config_and_errors(fake_stage, tmp_path, capsys):
    assert cli.main(["sft", "--print-config", "ppo.steps=4"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["ppo"]["steps"] == 4
    assert fake_stage.calls == []

    assert cli.main(["sft", "ppo.stepz=4"]) == cli.EXIT_USAGE
    assert "unknown config key 'ppo.stepz'" in capsys.readouterr().err
    assert cli.main(["sft", "a.yaml", "b.yaml"]) == cli.EXIT_USAGE
    assert "at most one config file" in capsys.readouterr().err
    assert cli.main(["sft", str(tmp_path / "none.yaml")]) == cli.EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err
    assert cli.main([]) == cli.EXIT_USAGE

    assert cli.main(["sft", "name=interrupt"]) == cli.EXIT_INTERRUPTED
    assert "--resume" in capsys.readouterr().err


def test_cli_overrides_may_follow_an_option(fake_stage, capsys, monkeypatch):
    """`--resume ppo.steps=4`: an override after an option (where a --resume refusal says to add
    it) was 'unrecognized arguments'; an unknown option still is."""
    assert cli.main(["sft", "ppo.steps=3", "--print-config", "ppo.steps=4"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["ppo"]["steps"] == 4
    with pytest.raises(SystemExit) as stopped:
        cli.main(["sft", "--print-config", "--bogus"])
    assert stopped.value.code == cli.EXIT_USAGE
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    # --print-config with --nproc prints the config once and launches no torchrun
    monkeypatch.setattr(cli, "_launch_torchrun",
                        lambda *a: pytest.fail("--print-config launched torchrun"))
    assert cli.main(["sft", "--nproc", "2", "--print-config", "ppo.steps=5"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["ppo"]["steps"] == 5


def test_cli_warnings_are_one_line():
    """A warning of the trainer prints as `rlhf <command>: warning: ...`, not as Python's file
    path, line number and source line (a separate process: pytest records warnings itself)."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "rlhf", "ppo", "kl_coef=0", "kl_target=4",
                           "--print-config"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "kl_target" in line]
    assert lines == [line for line in lines if line.startswith("rlhf ppo: warning: kl_target=4.0 "
                                                                "has no effect with kl_coef=0")]
    assert len(lines) == 1 and "UserWarning" not in done.stderr and ".py:" not in done.stderr


def test_sft_print_config_shows_the_learning_rate_the_run_takes():
    """lr: null means "2e-5 full-weight, 2e-4 with LoRA"; --print-config showed null."""
    assert sft.printable_config(sft.SFTConfig())["lr"] == 2e-5
    assert sft.printable_config(sft.SFTConfig(model="m", dataset="d.jsonl",
                                              lora_rank=8))["lr"] == 2e-4
    assert sft.printable_config(sft.SFTConfig(lr=1e-3))["lr"] == 1e-3


def test_cli_says_when_a_stage_module_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(cli.STAGES, "ppo", cli.Stage("rlhf._no_such_stage", "C", "train", "x"))
    assert cli.main(["ppo"]) == cli.EXIT_USAGE
    assert "rlhf._no_such_stage is not available" in capsys.readouterr().err


def test_cli_resolves_the_real_stage_configs(capsys):
    # The shipped stages: the CLI finds their config classes and applies overrides.
    for command in cli.STAGES:
        stage = cli.STAGES[command]
        try:
            __import__(stage.module)
        except ModuleNotFoundError:
            continue  # that stage has not landed yet in this checkout
        assert cli.main([command, "--print-config", "seed=3"] if command != "pipeline"
                        else [command, "--print-config"]) == 0
        resolved = yaml.safe_load(capsys.readouterr().out)
        assert isinstance(resolved, dict) and resolved
        if command != "pipeline":
            assert resolved["seed"] == 3


def test_example_configs_load():
    # configs/*.yaml must stay in sync with the dataclasses they configure.
    config_dir = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(config_dir.glob("*.yaml"))
    assert files, "configs/*.yaml examples are missing"
    for path in files:
        command = path.stem.split("_")[0]
        stage = cli.STAGES.get(command)
        assert stage is not None, f"{path.name} should start with one of {list(cli.STAGES)}"
        module = __import__(stage.module, fromlist=["_"])
        config_class = getattr(module, stage.config_class)
        loaded = config_to_dict(load_config(config_class, path))
        # The examples say "values below are the defaults": hold them to it, so a retuned
        # default cannot leave a stale example behind.
        assert loaded == config_to_dict(config_class()), f"{path.name} differs from the defaults"


def test_cli_plan_prints_peak_and_largest_batch(capsys):
    from rlhf.cli import main

    assert main(["plan", "qwen2.5-0.5b", "--batch", "4", "--card", "24", "--json"]) == 0
    import json

    plan = json.loads(capsys.readouterr().out)
    assert plan["inputs"]["batch"] == 4
    assert plan["peak_stage"] in plan["stages"]
    assert 0 < plan["peak_bytes"] < 24 * 2**30
    assert plan["largest_batch"]["card_gib"] == 24 and plan["largest_batch"]["batch"] >= 4


def test_cli_reports_bad_input_as_one_line_error(tmp_path, capsys):
    # A dataset without a model is bad input the stage rejects with a ValueError: the CLI prints
    # its message on one line (no traceback) and exits 2.
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "hi", "completion": "there"}\n')
    code = cli.main(["sft", f"dataset={data}", f"output_dir={tmp_path / 'out'}", "max_steps=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("rlhf sft: error:") and "Traceback" not in err
    assert "model" in err and err.count("\n") == 1


def test_max_memory_caps_cuda_and_is_checked(monkeypatch):
    """max_memory (GiB; every stage, and the pipeline passes it on) -> the card's fraction for
    set_per_process_memory_fraction; validated; ignored with a warning on the CPU and when not
    below the card."""
    import warnings

    import torch

    from rlhf import ppo, reward, sft

    for config in (sft.SFTConfig, reward.RewardConfig, ppo.PPOConfig):
        with pytest.raises(ValueError, match="max_memory must be > 0"):
            config(max_memory=0)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a card, on any machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    # torch's own device-index check, as the real function applies it: a bare "cuda" (no index)
    # is refused there (found on an H200: device=auto with max_memory crashed)
    from torch.cuda._utils import _get_device_index

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device: calls.append((fraction,
                                                               _get_device_index(device))))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_device("cuda:0", 24.0) == torch.device("cuda:0")
        assert resolve_device("cuda:0") == torch.device("cuda:0")  # no cap asked: no call
        assert resolve_device("cuda", 24.0) == torch.device("cuda")
        assert resolve_device("auto", 24.0) == torch.device("cuda")
    assert calls == [(0.3, 0)] * 3
    del calls[1:]
    with pytest.warns(UserWarning, match="no cap"):
        resolve_device("cuda:0", 96.0)
    assert calls[-1][0] == 1.0
    with pytest.warns(UserWarning, match="ignored on cpu"):
        assert resolve_device("cpu", 8.0) == torch.device("cpu")
    assert len(calls) == 2


# ---------------------------------------------------------------- one line per user error
# Every case below is an error the README promises as one `rlhf <stage>: error: ...` line
# (exit status 2, no traceback unless RLHF_TRACEBACK=1): what was wrong, the value seen, what
# to do. They run the real stages on a tiny saved model; each fails before or within a step.


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    """A saved tiny Llama + BPE tokenizer, an SFT file, a preference file and a prompts file."""
    import json

    import torch
    from transformers import LlamaForCausalLM

    from rlhf import task

    root = tmp_path_factory.mktemp("tiny_run")
    corpus = task.make_corpus(48, seed=3)
    tokenizer = task.train_tokenizer([ex["prompt"] + ex["completion"] for ex in corpus],
                                     vocab_size=260)
    torch.manual_seed(0)
    model = LlamaForCausalLM(task.tiny_llama_config(
        tokenizer, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    with open(root / "sft.jsonl", "w") as handle:
        for example in corpus[:16]:
            handle.write(json.dumps(example) + "\n")
    with open(root / "pairs.jsonl", "w") as handle:
        for example in corpus[:16]:
            handle.write(json.dumps({"prompt": example["prompt"], "chosen": " good.",
                                     "rejected": " bad."}) + "\n")
    (root / "empty_dir").mkdir()
    (root / "config_only").mkdir()
    model.config.to_json_file(root / "config_only" / "config.json")
    (root / "no_weights").mkdir()
    model.config.to_json_file(root / "no_weights" / "config.json")
    tokenizer.save_pretrained(root / "no_weights")
    (root / "a_file").write_text("not a directory\n")
    return root


def _sft_args(inputs, tmp_path, *extra):
    return ["sft", f"model={inputs / 'model'}", f"dataset={inputs / 'sft.jsonl'}",
            f"output_dir={tmp_path / 'out'}", "max_steps=2", "batch_size=4", "device=cpu",
            "save_every=0", "log_every=1", "warmup_steps=0", *extra]


def _one_error_line(capsys, command: str = "sft") -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(f"rlhf {command}: error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture
def reference_kernels(monkeypatch):
    # the stages' loops, not the kernels, are under test: the plain-PyTorch reference keeps the
    # runs at a second (the Triton interpreter would take minutes)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")


@pytest.mark.parametrize("extra, expected", [
    (["device=tpu"], r"device='tpu' is not a device .* use auto .*cpu, cuda or cuda:N"),
    (["device=gpu"], r"device='gpu' is not a device .*write cuda"),
    (["lr=-1"], r"lr=-1.0 is out of range: lr must be a finite number > 0"),
    (["lr=nan"], r"lr=nan is out of range"),
    (["model={root}/no_such_model"], r"model='.*/no_such_model' does not exist"),
    (["model={root}/empty_dir"], r"model='.*/empty_dir'.*not a Hugging Face model directory"),
    (["model={root}/config_only"], r"model='.*/config_only' holds no tokenizer"),
    (["model={root}/no_weights"],
     r"could not load the model of model='.*/no_weights': .*no file named model.safetensors"),
    (["output_dir={root}/a_file"], r"output_dir='.*/a_file' is a file, not a directory"),
    (["output_dir={root}/a_file/run"], r"its parent '.*/a_file' is a file"),
    (["dataset={root}/broken.jsonl"], r"broken.jsonl line 2, column \d+: .*fix or remove"),
])
def test_cli_user_errors_are_one_line(tiny_run_inputs, tmp_path, capsys, reference_kernels,
                                      extra, expected):
    import re

    (tiny_run_inputs / "broken.jsonl").write_text(
        '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "compl\n')
    extra = [arg.replace("{root}", str(tiny_run_inputs)) for arg in extra]
    assert cli.main(_sft_args(tiny_run_inputs, tmp_path, *extra)) == cli.EXIT_USAGE
    line = _one_error_line(capsys)
    assert re.search(expected, line), line


def test_cli_malformed_yaml_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\nmax_steps: : 3\n")
    assert cli.main(["sft", str(bad)]) == cli.EXIT_USAGE
    line = _one_error_line(capsys)
    assert "bad.yaml' is not valid YAML at line 2, column" in line and "fix the file" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only build")
def test_cli_cuda_on_a_cpu_build_is_one_line(tiny_run_inputs, tmp_path, capsys):
    started = time.perf_counter()
    assert cli.main(_sft_args(tiny_run_inputs, tmp_path, "device=cuda")) == cli.EXIT_USAGE
    line = _one_error_line(capsys)
    assert "device='cuda' but this PyTorch build" in line and "no CUDA support" in line
    assert "device=cpu" in line
    assert time.perf_counter() - started < 5  # said before the model loads
    # the other stages and a missing index say the same
    for config in (sft.SFTConfig, reward.RewardConfig, ppo.PPOConfig):
        with pytest.raises(ValueError, match="no CUDA support"):
            resolve_device(config(device="cuda:1").device)


def test_cli_model_typos_in_rm_and_ppo_are_one_line(tiny_run_inputs, tmp_path, capsys):
    missing = tiny_run_inputs / "runs" / "sft" / "modle"
    assert cli.main(["rm", f"model={missing}", f"dataset={tiny_run_inputs / 'pairs.jsonl'}",
                     f"output_dir={tmp_path / 'rm'}", "device=cpu"]) == cli.EXIT_USAGE
    assert "model='" + str(missing) + "' does not exist" in _one_error_line(capsys, "rm")
    assert cli.main(["ppo", f"model={missing}", f"output_dir={tmp_path / 'ppo'}",
                     "device=cpu"]) == cli.EXIT_USAGE
    line = _one_error_line(capsys, "ppo")
    assert "does not exist" in line and "runs/rm/backbone" in line
    # a model directory where the reward stage's backbone directory is expected
    assert cli.main(["ppo", f"model={tiny_run_inputs / 'model'}", f"output_dir={tmp_path / 'p'}",
                     "device=cpu"]) == cli.EXIT_USAGE
    assert "is not a SharedBackbone checkpoint" in _one_error_line(capsys, "ppo")


def test_cli_hub_name_without_network_fails_fast(tiny_run_inputs, tmp_path, capsys,
                                                 monkeypatch):
    """No network (every connection refused): one line within seconds, not a minute of HTTP
    retries and a page of traceback."""
    import errno
    import socket

    def no_network(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty cache
    started = time.perf_counter()
    code = cli.main(_sft_args(tiny_run_inputs, tmp_path, "model=no-such-org/no-such-model"))
    elapsed = time.perf_counter() - started
    assert code == cli.EXIT_USAGE
    line = _one_error_line(capsys)
    assert "model='no-such-org/no-such-model' is not a local directory" in line
    assert "not in the Hugging Face cache" in line and "cannot be reached" in line
    assert elapsed < 15, f"{elapsed:.0f} s"


def test_cli_diverging_run_names_the_step_and_lr(tiny_run_inputs, tmp_path, capsys,
                                                  reference_kernels):
    code = cli.main(_sft_args(tiny_run_inputs, tmp_path, "lr=1e9", "max_steps=6"))
    assert code == cli.EXIT_USAGE
    line = _one_error_line(capsys)
    assert "[sft] the run diverged: non-finite" in line
    assert " at step " in line and "lower the learning rate (lr=1e+09" in line


def test_nonfinite_error_names_what_and_where():
    cfg = types.SimpleNamespace(nonfinite="error", max_skipped_steps=10)
    message = str(nonfinite_error("ppo", "iteration 3", {"policy loss": float("nan"),
                                                       "grad norm": 1.5},
                                  {"lr": 1e-3, "critic_lr": 2e-3}, 0, cfg))
    assert message.startswith("[ppo] the run diverged: non-finite policy loss at iteration 3")
    assert "(policy loss nan, grad norm 1.5)" in message
    assert "lr=0.001 and critic_lr=0.002" in message and "nonfinite=skip" in message
    cfg.nonfinite = "skip"
    message = str(nonfinite_error("rm", "step 9", {"loss": float("inf")}, {"lr": 1.0}, 10, cfg))
    assert "after 10 skipped steps, more than max_skipped_steps=10" in message
    # nonfinite=skip is set: the way out is more skipped steps, not nonfinite=skip again
    assert "raise max_skipped_steps (it is 10)" in message and "nonfinite=skip" not in message


class _FullDisk(io.RawIOBase):
    """A file that takes `room` bytes, then fails every write with ENOSPC (a full disk)."""

    def __init__(self, room: int):
        self.room = room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return len(data)


def test_cli_full_disk_is_one_line(tiny_run_inputs, tmp_path, capsys, monkeypatch,
                                   reference_kernels):
    """torch.save on a full disk raises RuntimeError('... iostream error' / 'unexpected pos');
    the checkpoint writer makes it OSError(ENOSPC, path) and the CLI says what to do."""
    real_save = torch.save

    def save_to_full_disk(obj, f, *args, **kwargs):
        return real_save(obj, _FullDisk(room=64), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_to_full_disk)
    assert cli.main(_sft_args(tiny_run_inputs, tmp_path)) == cli.EXIT_USAGE
    line = _one_error_line(capsys)
    assert "no space left on the disk while writing '" + str(tmp_path / "out") in line
    assert "checkpoints/step-0000002" in line and "--resume" in line
    # and nothing half-written is left where resume would look for it
    assert not list((tmp_path / "out" / "checkpoints").glob("step-*"))


def test_write_errors_become_os_errors_naming_the_path(tmp_path):
    from safetensors import SafetensorError

    from rlhf.errors import describe_os_error, write_error

    rust = SafetensorError("Error while serializing: I/O error: No space left on device "
                           "(os error 28)")
    error = write_error(rust, tmp_path / "model")
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert error.filename == str(tmp_path / "model")
    try:
        try:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        except OSError:
            raise RuntimeError("basic_ios::clear: iostream error")  # noqa: B904 - as torch does
    except RuntimeError as torch_error:
        error = write_error(torch_error, "/x/state.pt")
    assert error.errno == errno.EROFS and "choose an output_dir you can write to" in \
        describe_os_error(error)
    assert write_error(RuntimeError("a bug, not the disk"), "/x") is None
    assert write_error(KeyboardInterrupt(), "/x") is None


def test_cli_read_only_output_dir_is_one_line(tiny_run_inputs, tmp_path, capsys, monkeypatch):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real_access = os.access
    # root may write anywhere, so the read-only directory is what os.access reports for it
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False
                        if Path(path) == read_only and mode & os.W_OK
                        else real_access(path, mode, **kw))
    args = _sft_args(tiny_run_inputs, tmp_path, f"output_dir={read_only / 'run'}")
    assert cli.main(args) == cli.EXIT_USAGE
    line = _one_error_line(capsys)
    assert f"output_dir='{read_only / 'run'}' cannot be written: '{read_only}' is read-only" \
        in line


def test_cli_os_errors_during_a_run_are_one_line(fake_stage, monkeypatch, capsys, tmp_path):
    target = tmp_path / "out" / "metrics.jsonl"

    def train(cfg):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))

    monkeypatch.setattr(fake_stage, "train", train)
    assert cli.main(["sft"]) == cli.EXIT_USAGE
    line = _one_error_line(capsys)
    assert f"cannot write '{target}': Permission denied; choose an output_dir" in line
    monkeypatch.setenv("RLHF_TRACEBACK", "1")
    with pytest.raises(PermissionError):
        cli.main(["sft"])


def test_cli_traceback_on_request(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RLHF_TRACEBACK", "1")
    with pytest.raises(ValueError, match="device='tpu'"):
        cli.main(["sft", "device=tpu"])


def test_plan_rejects_a_card_of_no_memory(capsys):
    for card in ("-1", "0", "nan"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["plan", "tiny", "--card", card])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("rlhf plan: error: the card's memory")
    with pytest.raises(SystemExit):
        cli.main(["plan", "tiny", "--minibatch", "-2"])
    assert "--minibatch -2: expected an integer >= 1" in capsys.readouterr().err


def test_stages_limit_cpu_threads_like_the_pipeline(tiny_run_inputs, tmp_path, monkeypatch,
                                                    reference_kernels):
    """A standalone stage on the CPU runs with cpu_threads (default 1, as the pipeline) torch
    threads, and gives the caller's count back afterwards."""
    seen = []
    real_loss = sft.lm_loss

    def recording_loss(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(sft, "lm_loss", recording_loss)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert cli.main(_sft_args(tiny_run_inputs, tmp_path)) == 0
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 3
        seen.clear()
        assert cli.main(_sft_args(tiny_run_inputs, tmp_path / "b", "cpu_threads=2")) == 0
        assert set(seen) == {2} and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    for config in (sft.SFTConfig, reward.RewardConfig, ppo.PPOConfig):
        assert config().cpu_threads == 1
        with pytest.raises(ValueError, match="cpu_threads"):
            config(cpu_threads=0)


def test_pipeline_print_config_shows_what_the_stages_use(tmp_path, capsys):
    """The stage folders, seed, device and threads the pipeline really gives each stage, not
    the standalone stages' defaults (runs/sft, ...) that it overrides."""
    out = tmp_path / "run"
    assert cli.main(["pipeline", "--print-config", f"output_dir={out}", "seed=7",
                     "device=cpu", "cpu_threads=2"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    for stage, folder in (("sft", "sft"), ("reward", "rm"), ("ppo", "ppo")):
        assert shown[stage]["output_dir"] == str(out / folder)
        assert shown[stage]["seed"] == 7 and shown[stage]["device"] == "cpu"
        assert shown[stage]["cpu_threads"] == 2
    assert shown["output_dir"] == str(out)
    # a setting the pipeline would refuse is refused here too, in one line
    assert cli.main(["pipeline", "--print-config", "sft.output_dir=elsewhere"]) == 2
    assert "cannot be set in rlhf pipeline" in _one_error_line(capsys, "pipeline")


def test_hub_names_load_from_the_cache_when_the_hub_is_unreachable(monkeypatch):
    """A hub name that is cached loads from the cache alone (no minute of retries); the checks
    tell local paths from hub names by their form."""
    from rlhf import loading

    monkeypatch.setattr(loading, "hub_offline_reason", lambda: "no network (test)")
    monkeypatch.setattr(loading, "_in_hub_cache", lambda repo, files: repo == "org/cached")
    assert loading.resolve_pretrained("org/cached") == ("org/cached", {"local_files_only": True})
    with pytest.raises(ValueError, match=r"model='org/other' is not a local directory, not in "
                                         r"the Hugging Face cache.*no network \(test\)"):
        loading.resolve_pretrained("org/other")
    monkeypatch.setattr(loading, "hub_offline_reason", lambda: None)
    assert loading.resolve_pretrained("org/other") == ("org/other", {})
    for path in ("runs/sft/model", "./model", "/abs/model", "~/model", "a b"):
        with pytest.raises(ValueError, match="does not exist"):
            loading.resolve_pretrained(path)
    monkeypatch.undo()  # the real probe: offline mode is a reason, without any connection
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in loading.hub_offline_reason()
