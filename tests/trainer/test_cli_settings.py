"""Settings that change a run's results say so where they are described, and --resume keeps
them: ``sample_batch_size`` read as a speed / memory knob, while it changes which preference
pairs and held-out responses the pipeline samples."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import yaml

from rlhf import pipeline
from rlhf.checkpoint import config_changes
from rlhf.config import config_to_dict

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.reference_kernels


def _comment_above(source: str, field: str) -> str:
    """The comment lines right above ``field: ...`` in a dataclass's source, and its own."""
    lines = source.splitlines()
    at = next(i for i, line in enumerate(lines) if re.match(rf"\s*{field}\s*:", line))
    block = [lines[at]]
    for line in reversed(lines[:at]):
        if not line.strip().startswith("#"):
            break
        block.insert(0, line)
    return " ".join(line.strip().lstrip("# ") for line in block)


def _yaml_comment(path: Path, key: str) -> str:
    """A key's line in a commented YAML file and the comment-only lines that continue it."""
    lines = path.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{key}:"))
    block = [lines[at]]
    for line in lines[at + 1:]:
        if not line.strip().startswith("#") or not line.startswith(" "):
            break
        block.append(line)
    return " ".join(line.split("#", 1)[-1].strip() for line in block)


def test_sample_batch_size_changes_the_samples_and_says_so():
    """The fact: one seed, the same prompts, batches of 2 or of 4 prompts draw other responses
    (every batch draws from one generator). So --resume refuses a change (not a resume-safe
    setting), and the setting's description says it is part of the results: the config's
    comment and configs/pipeline.yaml (it had no description at all)."""
    from tests.helpers import PROMPTS, randomised_policy, rl_config, rl_tokenizer

    tokenizer = rl_tokenizer()
    backbone = randomised_policy(tokenizer)
    cfg = rl_config(None, "grpo")
    by_two, _ = pipeline.sample_texts(backbone, tokenizer, PROMPTS[:4], None, cfg, 3, 2)
    by_four, _ = pipeline.sample_texts(backbone, tokenizer, PROMPTS[:4], None, cfg, 3, 4)
    assert by_two != by_four

    old = config_to_dict(pipeline.PipelineConfig())
    new = config_to_dict(pipeline.PipelineConfig(sample_batch_size=64))
    assert [change for change, _ in config_changes(old, new, pipeline._RESUME_SAFE)] == \
        ["sample_batch_size: 256 -> 64"]

    described = _comment_above(inspect.getsource(pipeline.PipelineConfig), "sample_batch_size")
    assert "results" in described and "other pairs" in described, described
    in_yaml = _yaml_comment(ROOT / "configs" / "pipeline.yaml", "sample_batch_size")
    assert "other results" in in_yaml, in_yaml


# ------------------------------------------------------------------ bad values: one line, status 2
def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rlhf {command}: error: "), err
    return err[0]


def test_a_config_file_that_is_a_directory_or_not_text_is_named(tmp_path, capsys):
    """A directory given as the config file was reported as not existing; a file that is not
    UTF-8 text gave only "'utf-8' codec can't decode byte 0xff in position 0", naming neither
    the file nor what it should be."""
    from rlhf import cli

    folder = tmp_path / "configs.yaml"
    folder.mkdir()
    assert cli.main(["sft", str(folder), "--print-config"]) == cli.EXIT_USAGE
    line = _error_line(capsys, "sft")
    assert f"config file {str(folder)!r} is a directory" in line and "does not exist" not in line
    binary = tmp_path / "latin1.yaml"
    binary.write_bytes("# caf\xe9\nlr: 0.1\n".encode("latin-1"))
    assert cli.main(["sft", str(binary), "--print-config"]) == cli.EXIT_USAGE
    assert f"config file {str(binary)!r} is not UTF-8 text" in _error_line(capsys, "sft")


@pytest.mark.parametrize("argv, message", [
    # OverflowError tracebacks once the run started (epochs x steps per epoch, the tokenizer)
    (["sft", "epochs=inf"], "epochs=inf is out of range"),
    (["rm", "epochs=inf"], "epochs must be a finite number > 0, got inf"),
    (["pipeline", "reward.epochs=inf"], "reward.epochs must be a finite number > 0"),
    # read as 100000000000000000000 and said so; now as typed, by the integer limit
    (["sft", "vocab_size=1e20"], "config key 'vocab_size' must be an integer of at most 2**53 "
                                 "(9007199254740992) in size, got '1e20'"),
    # refused only after the corpus was built; now by --print-config too
    (["sft", "vocab_size=10"], "vocab_size=10 is out of range"),
    (["pipeline", "vocab_size=100"], "vocab_size=100 is out of range"),
])
def test_values_that_ended_in_a_traceback_are_refused_before_the_run(argv, message, capsys):
    from rlhf import cli

    assert cli.main([*argv, "--print-config"]) == cli.EXIT_USAGE
    assert message in _error_line(capsys, argv[0])


def test_the_reward_stages_pairs_per_second_counts_the_pairs_it_trained_on(tmp_path, monkeypatch):
    """With fewer training pairs than batch_size (a micro-batch is then all of them),
    pairs_per_s counted batch_size x grad_accum_steps pairs a step: 8 x 2 = 16 where a step
    trained on 2 x 3. The clock is a counter here: one second per reading."""
    import types

    from rlhf import reward
    from tests.helpers import rl_tokenizer, sentiment_pairs, tiny_backbone

    ticks = iter(range(1_000_000))
    monkeypatch.setattr(reward, "time", types.SimpleNamespace(
        perf_counter=lambda: float(next(ticks))))
    tokenizer = rl_tokenizer()
    cfg = reward.RewardConfig(output_dir=str(tmp_path / "rm"), batch_size=8, epochs=1.0,
                              grad_accum_steps=2, warmup_steps=0, save_every=0, log_every=1,
                              device="cpu", max_length=160)
    reward.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer,
                 train_pairs=sentiment_pairs(3, 0), eval_pairs=sentiment_pairs(2, 7))
    logged = [json.loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl")]
    assert [record["pairs_per_s"] for record in logged if "loss" in record] == [6.0]


def test_strategy_in_a_config_file_says_where_it_goes(tmp_path, capsys):
    """`strategy: fsdp2` in the YAML file was an unknown key followed by the stage's valid keys,
    as if the documented strategy= did not exist; it is a setting of the command line."""
    from rlhf import cli

    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.001\nstrategy: fsdp2\n")
    assert cli.main(["sft", str(path), "--print-config"]) == cli.EXIT_USAGE
    line = _error_line(capsys, "sft")
    assert f"strategy in {str(path)!r} is not a setting of the config file" in line
    assert f"rlhf sft {path} strategy=" in line and "Valid keys" not in line


def test_a_key_given_twice_on_the_command_line_is_said(capsys):
    """`lr=1e-3 ... lr=3e-3` took the last value without a word (a YAML file with a key twice
    is refused). The last one still wins (--resume's refusal says to add `key=value` to the
    command), with one warning line that names both."""
    import warnings

    from rlhf import cli

    with pytest.warns(UserWarning) as said:
        assert cli.main(["sft", "lr=0.001", "max_steps=5", "lr=0.003", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["lr"] == 0.003
    assert [str(w.message) for w in said] == [
        "lr is given twice on the command line (lr=0.001, then lr=0.003); the last one, "
        "lr=0.003, is used"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same value twice: nothing to say
        assert cli.main(["sft", "lr=0.001", "lr=0.001", "--print-config"]) == 0


def test_a_config_file_under_the_home_directory_is_found(tmp_path, monkeypatch, capsys):
    """`rlhf sft '~/run.yaml'` (quoted, or from a script that passes it through) said the file
    does not exist, where model=, dataset= and output_dir= take ~ as the home directory."""
    from rlhf import cli

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run.yaml").write_text("lr: 0.004\n")
    assert cli.main(["sft", "~/run.yaml", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["lr"] == 0.004


def test_a_kernels_backend_that_is_none_is_refused_before_anything_loads(capsys, monkeypatch,
                                                                          tmp_path):
    """RLHF_KERNELS_BACKEND=foo was refused at the first op call, once the model had loaded
    (minutes for a large one); the CLI now refuses it first, before output_dir is made."""
    from rlhf import cli

    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "foo")
    out = tmp_path / "run"
    assert cli.main(["sft", f"output_dir={out}", "max_steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rlhf sft: error: RLHF_KERNELS_BACKEND='foo' is not a backend; expected one "
                   "of ('auto', 'triton', 'native', 'reference') (or unset: auto)"]
    assert not out.exists()
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "Reference")  # any case, as the kernels read it
    cli._check_kernels_backend()


@pytest.mark.parametrize("argv, expected", [
    (["rm", "max_steps=1"], "unknown config key 'max_steps' for RewardConfig. The reward stage "
                            "counts epochs, not steps: epochs=0.1 trains on a tenth of the pairs."),
    (["sft", "num_iterations=2"], "unknown config key 'num_iterations' for SFTConfig. "
                                  "'num_iterations' is a setting of `rlhf ppo / grpo`: is this "
                                  "the config of another command?"),
    (["ppo", "corpus_size=100"], "'corpus_size' is a setting of `rlhf sft / pipeline`"),
    # TRL's (and veRL's) names of our settings
    (["grpo", "num_generations=8"], "'num_generations' is TRL's (or veRL's) name: here the "
                                    "setting is 'group_size': the samples per prompt."),
    (["grpo", "num_ppo_epochs=2"], "here the setting is 'ppo_epochs': passes over each rollout. "
                                   "(TRL's GRPOConfig.num_iterations is ppo_epochs too"),
    (["sft", "learning_rate=1e-4"], "here the setting is 'lr'."),
    (["pipeline", "beta=0.1"], "'beta' is TRL's (or veRL's) name: here the setting is "
                               "'ppo.kl_coef': the KL penalty's weight."),
    (["pipeline", "sft.num_train_epochs=2"], "here the setting is 'sft.epochs'"),
])
def test_a_key_of_another_command_says_so(capsys, argv, expected):
    """`rlhf rm max_steps=1` suggested max_skipped_steps, and `rlhf sft configs/ppo.yaml` listed
    SFT's keys without saying the file was another command's; a TRL user's name of a setting
    (num_generations, beta, learning_rate) got the list of keys, or a wrong guess."""
    from rlhf import cli

    assert cli.main([*argv, "--print-config"]) == 2
    line = capsys.readouterr().err.strip()
    assert expected in line and "Did you mean" not in line, line


# ---- settings a device does not read are said -------------------------------------------------
@pytest.mark.parametrize("argv, cuda, said", [
    (["sft", "bf16=true", "device=cpu"], False, "bf16=true has no effect on the CPU (device=cpu)"),
    (["ppo", "bf16=yes"], False, "bf16=true has no effect on the CPU (device=auto, cpu on this "
                                 "machine)"),
    (["pipeline", "ppo.bf16=true", "sft.bf16=true"], False,
     "ppo.bf16=true, sft.bf16=true have no effect on the CPU"),
    (["rm", "cpu_threads=4"], True, "cpu_threads=4 has no effect on a GPU (device=auto, cuda on "
                                    "this machine)"),
    (["sft", "bf16=true"], True, None),  # on a GPU it is the autocast
    (["sft", "bf16=false", "device=cpu"], False, None),  # what the CPU does anyway
    (["sft", "device=cpu"], False, None),  # the default bf16: true is not the user's word
    (["ppo", "cpu_threads=4", "device=cpu"], True, None),
])
def test_a_setting_the_device_does_not_read_is_said(capsys, monkeypatch, argv, cuda, said):
    """`rlhf sft bf16=true` on a CPU machine trained in fp32 without a word (bf16 autocast is a
    CUDA setting), and `cpu_threads=4` on a GPU run changed nothing: each is said once, as a
    warning (as max_memory on the CPU is), when the user gave it and the run's device ignores
    it; the defaults never are."""
    import warnings

    import torch

    from rlhf import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main([*argv, "--print-config"]) == 0
    notices = [str(w.message) for w in caught if "has no effect on" in str(w.message)
               or "have no effect on" in str(w.message)]
    if said is None:
        assert notices == []
    else:
        assert len(notices) == 1 and notices[0].startswith(said), notices
    capsys.readouterr()
