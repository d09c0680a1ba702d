"""Config loading (defaults -> YAML -> key=value) and the `rlhf` command line."""

from __future__ import annotations

import enum
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from rlhf import cli
from rlhf.config import config_to_dict, load_config, parse_overrides, save_config


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
    ("max_len=2.5", r"'max_len'.*fits none of"),
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
    config_dir = Path(__file__).resolve().parents[1] / "configs"
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
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device: calls.append((fraction, device)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sft.resolve_device("cuda:0", 24.0) == torch.device("cuda:0")
        assert sft.resolve_device("cuda:0") == torch.device("cuda:0")  # no cap asked: no call
    assert calls == [(0.3, torch.device("cuda:0"))]
    with pytest.warns(UserWarning, match="no cap"):
        sft.resolve_device("cuda:0", 96.0)
    assert calls[-1][0] == 1.0
    with pytest.warns(UserWarning, match="ignored on cpu"):
        assert sft.resolve_device("cpu", 8.0) == torch.device("cpu")
    assert len(calls) == 2
