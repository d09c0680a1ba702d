"""Defects a new user met following the README and the docs (a clean clone, every command and
its bad inputs): each test fails on the code before its fix. Each error must be one line that
names the setting, the value seen and what is expected."""

from __future__ import annotations

import pytest

from rlhf import cli


def _error_line(capsys, argv) -> str:
    """The one stderr line of a refused `rlhf ...` command (exit status 2)."""
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse's parser.exit (rlhf plan)
        status = exit_.code
    assert status == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# ---- rlhf plan --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["runs/rm/backbne", "./no-such-model", "/no/such/model"])
def test_plan_of_a_mistyped_path_says_so(capsys, name):
    """A mistyped model path (`rlhf plan runs/rm/backbne`) got huggingface_hub's "Repo id must be
    in the form 'repo_name' or 'namespace/repo_name'", which names no setting of ours."""
    line = _error_line(capsys, ["plan", name])
    assert line.startswith(f"rlhf plan: error: {name!r} is neither a preset"), line
    assert f"there is no file or directory {name!r}" in line
    assert "Repo id" not in line


def test_plan_reserve_larger_than_the_card_names_the_flag(capsys):
    """`rlhf plan tiny --card 0.5` said "reserve_gib must be in [0, card)": a name the user never
    typed (the default --reserve 1 is what is too large)."""
    line = _error_line(capsys, ["plan", "tiny", "--card", "0.5"])
    assert "--reserve" in line and "0.5 GiB card" in line and "got 1" in line, line


# ---- a damaged checkpoint -------------------------------------------------------------------
@pytest.mark.parametrize("damaged", ["params.safetensors", "state.pt"])
def test_resume_from_a_damaged_checkpoint_says_which_and_what_to_do(tmp_path, damaged):
    """A checkpoint cut short (a copy of the run directory interrupted, a disk error) made
    `--resume` end in safetensors' or torch's traceback ("invalid header length", "failed finding
    central directory"); it is now one line naming the directory, the file and the checkpoint a
    resume continues from once it is deleted."""
    import torch

    from rlhf import checkpoint

    root = tmp_path / "checkpoints"
    for step in (20, 40):
        checkpoint.save_state(root / f"step-{step:07d}", step=step,
                              params={"w": torch.full((64, 64), float(step))})
    assert checkpoint.load_state(root / "step-0000040")["step"] == 40
    target = root / "step-0000040" / damaged
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(ValueError) as raised:
        checkpoint.load_state(root / "step-0000040")
    message = str(raised.value)
    assert f"{str(root / 'step-0000040')!r} is damaged: {damaged} cannot be read" in message
    assert f"continues from {str(root / 'step-0000020')!r}" in message
    assert float(checkpoint.load_state(root / "step-0000020")["params"]["w"][0, 0]) == 20.0


# ---- nested settings: the error names the key as typed -----------------------------------------
@pytest.mark.parametrize("command, override, expected", [
    ("pipeline", "reward.batch_size=0", "reward.batch_size must be >= 1, got 0"),
    ("pipeline", "ppo.minibatch_size=0", "ppo.minibatch_size must be >= 1, got 0"),
    ("pipeline", "reward.lr=-1", "reward.lr=-1.0 is out of range: reward.lr must be"),
    ("pipeline", "ppo.temperature=0", "ppo.temperature=0.0 is out of range: ppo.temperature "
                                      "must be a finite number > 0"),
    ("pipeline", "ppo.temperature=inf", "ppo.temperature=inf is out of range"),
    ("pipeline", "ppo.kl_target=inf", "ppo.kl_target=inf is out of range: ppo.kl_target must "
                                      "be a finite number > 0"),
    ("frontier", "base.ppo.lr=-1", "base.ppo.lr=-1.0 is out of range: base.ppo.lr must be"),
    # the setting the message says to add is named as typed too
    ("pipeline algorithm=dr_grpo", "ppo.loss_reduction=token-mean",
     "ppo.loss_reduction='token-mean' has no effect with algorithm='dr_grpo'"),
])
def test_a_nested_setting_out_of_range_is_named_as_typed(capsys, command, override, expected):
    """`rlhf pipeline reward.batch_size=0` said "batch_size must be >= 1, got 0" (sft, reward and
    ppo all have a batch setting) and `reward.lr=-1` named "RewardConfig.lr", a class name the
    user never typed; the error names the dotted key now."""
    line = _error_line(capsys, [*command.split(), override, "--print-config"])
    assert line.split(": error: ", 1)[1].startswith(expected), line
    assert "Config." not in line
    if "no effect" in expected:  # not "add loss_normalizer=batch", a key the pipeline lacks
        assert "add ppo.loss_normalizer=batch " in line, line


def test_a_top_level_setting_keeps_its_plain_name(capsys):
    line = _error_line(capsys, ["ppo", "minibatch_size=0", "--print-config"])
    assert line == "rlhf ppo: error: minibatch_size must be >= 1, got 0"


@pytest.mark.parametrize("override, expected", [
    ("sft.max_steps=1.5", "config key 'sft.max_steps' must be an integer or null, got '1.5'"),
    ("sft.lr=1e-3x", "config key 'sft.lr' must be a number or null, got '1e-3x'"),
])
def test_a_wrong_type_for_an_optional_setting_says_what_is_expected(capsys, override, expected):
    """An optional setting given a value of the wrong type said "'1.5' fits none of int | None",
    Python's annotation rather than what to type."""
    assert _error_line(capsys, ["pipeline", override, "--print-config"]) == \
        f"rlhf pipeline: error: {expected}"


# ---- the RL stage's progress bar -----------------------------------------------------------------
@pytest.mark.parametrize("with_gold", [False, True])
def test_rl_progress_bar_shows_gold_only_when_a_judge_scores(tmp_path, capsys, with_gold):
    """`rlhf ppo model=runs/rm/backbone` (a reward model, no gold judge) showed "gold=nan" on
    every iteration of its progress bar, which read as a broken run."""
    from rlhf import rl
    from tests.helpers import PROMPTS, rl_config, rl_tokenizer, tiny_backbone

    tokenizer = rl_tokenizer()
    gold = (lambda texts: [0.25] * len(texts)) if with_gold else None
    rl.train(rl_config(tmp_path, "grpo", num_iterations=1), backbone=tiny_backbone(tokenizer),
             tokenizer=tokenizer, prompts=PROMPTS, gold_fn=gold)
    err = capsys.readouterr().err
    assert "reward=" in err and "kl=" in err
    assert "nan" not in err
    assert ("gold=0.25" in err) == with_gold and ("gold=" in err) == with_gold


# ---- rlhf pipeline: a stage's warnings and checks name the stage ---------------------------------
def test_a_stage_warning_in_the_pipeline_names_the_stage_setting(tmp_path, monkeypatch):
    """`rlhf pipeline` on few pairs warned "warmup_steps=10 is more than the run's 2 optimizer
    steps ... lower warmup_steps": sft, reward and ppo each have a warmup_steps, and
    `warmup_steps=2` is no pipeline setting; the pipeline runs each stage under
    config.warnings_named, which says reward.warmup_steps."""
    import warnings

    from rlhf import sft, task
    from rlhf.config import warnings_named
    from tests.helpers import review_tokenizer, tiny_llama

    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    corpus = task.make_corpus(8, seed=1)
    tokenizer = review_tokenizer(corpus, vocab_size=300)

    def train(name):
        cfg = sft.SFTConfig(output_dir=str(tmp_path / name), max_steps=1, batch_size=4,
                            warmup_steps=5, save_every=0, max_length=48, device="cpu")
        sft.train(cfg, model=tiny_llama(tokenizer), tokenizer=tokenizer, examples=corpus)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with warnings_named("sft.", sft.SFTConfig):
            train("named")
            warnings.warn("warmup_steps=5 from elsewhere", UserWarning, stacklevel=1)
        train("plain")  # outside: the stage's own name
    texts = [str(w.message) for w in caught if "warmup_steps" in str(w.message)]
    assert texts[0].startswith("sft.warmup_steps=5 is more than the run's 1 optimizer"), texts
    assert texts[1] == "warmup_steps=5 from elsewhere"  # not this trainer's warning: as it is
    assert texts[2].startswith("warmup_steps=5 is more than the run's 1 optimizer"), texts
    assert len(texts) == 3


def test_the_pipelines_rl_checks_name_ppo_settings(capsys):
    """The RL stage's checks that `rlhf pipeline` runs before SFT said "critic_lr=0.0001 has no
    effect" and warned "kl_horizon=100 has no effect": the keys to fix are ppo.<name>."""
    import warnings

    from rlhf.config import load_config
    from rlhf.pipeline import PipelineConfig, printable_config

    line = _error_line(capsys, ["pipeline", "algorithm=grpo", "ppo.critic_lr=1e-4",
                                "--print-config"])
    assert line.startswith("rlhf pipeline: error: ppo.critic_lr=0.0001 has no effect"), line
    cfg = load_config(PipelineConfig, None, ["ppo.kl_target=null", "ppo.kl_horizon=100"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        printable_config(cfg)
    texts = {str(w.message) for w in caught}
    assert texts and all(text.startswith("ppo.kl_horizon=100 has no effect") for text in texts)


# ---- --nproc N ---------------------------------------------------------------------------------
def _fake_ranks(monkeypatch, rank_in_group: int, seen: list):
    """distributed as rank ``rank_in_group`` of a process group between init_from_env and
    shutdown (as torchrun gives it), and the stage's entry point a stub that records what the
    CLI's warning format makes of this trainer's warning."""
    import warnings

    from rlhf import distributed, sft

    state = {"joined": False}
    monkeypatch.setattr(distributed, "init_from_env", lambda device: state.update(joined=True))
    monkeypatch.setattr(distributed, "shutdown", lambda: state.update(joined=False))
    monkeypatch.setattr(distributed, "rank", lambda: rank_in_group if state["joined"] else 0)
    monkeypatch.setenv("RANK", str(rank_in_group))

    def train(cfg):
        seen.append(warnings.formatwarning("warmup_steps=20 is more than ...", UserWarning,
                                           sft.__file__, 1))
        return {"stage": "sft", "steps": 2}

    monkeypatch.setattr(sft, "train", train)


@pytest.mark.parametrize("rank_in_group", [0, 1])
def test_nproc_prints_the_summary_and_warnings_once(tmp_path, capsys, monkeypatch,
                                                    rank_in_group):
    """`rlhf sft --nproc 2` printed the summary twice and every warning twice: each rank asked
    whether it was rank 0 after leaving the process group (where every rank is), and every rank
    printed the warnings of the settings they all check."""
    seen: list = []
    _fake_ranks(monkeypatch, rank_in_group, seen)
    assert cli.main(["sft", f"output_dir={tmp_path / 'sft'}"]) == 0
    out = capsys.readouterr().out
    if rank_in_group == 0:
        assert '"stage": "sft"' in out and seen == ["rlhf sft: warning: warmup_steps=20 is more "
                                                    "than ...\n"]
    else:
        assert out == "" and seen == [""]


def test_nproc_zero_is_the_commands_error_with_status_2(capsys):
    """`rlhf sft --nproc 0` ended with exit status 1 and "rlhf: error: ..." (a SystemExit
    message), not the command's one error line and status 2 of every other bad input."""
    line = _error_line(capsys, ["sft", "--nproc", "0"])
    assert line == "rlhf sft: error: --nproc must be >= 1 (processes on this machine), got 0"


def test_nproc_refuses_a_bad_setting_before_starting_torchrun(capsys, monkeypatch):
    """`rlhf sft --nproc 2 lr=-1` started torchrun, whose every rank then printed the same
    error; the launching process now reads and resolves the settings first (the pipeline's
    checks of its stages too), and starts no process for a run that cannot start."""
    launched = []
    monkeypatch.setattr(cli, "_launch_torchrun", lambda *args: launched.append(args) or 0)
    line = _error_line(capsys, ["sft", "--nproc", "2", "batch_size=0"])
    assert line.startswith("rlhf sft: error: ") and "batch_size" in line
    line = _error_line(capsys, ["pipeline", "--nproc", "2", "ppo.minibatch_size=0"])
    assert line.startswith("rlhf pipeline: error: ") and "minibatch_size" in line
    assert launched == []
    assert cli.main(["sft", "--nproc", "2", "max_steps=3"]) == 0 and len(launched) == 1


# ---- a stage setting given at the pipeline's top level ---------------------------------------
@pytest.mark.parametrize("override, hint", [
    ("kl_coef=0.05", "Did you mean 'ppo.kl_coef'?"),
    ("lr=1e-3", "Did you mean 'ppo.lr' or 'reward.lr' or 'sft.lr'?"),
    ("sedd=1", "Did you mean 'seed'?"),  # a typo of its own key: the closest match, as before
])
def test_a_stage_setting_at_the_top_level_suggests_its_dotted_keys(capsys, override, hint):
    """`rlhf pipeline kl_coef=0.05` said "unknown config key 'kl_coef' for PipelineConfig" and
    listed the pipeline's own keys only: the setting lives under ppo."""
    line = _error_line(capsys, ["pipeline", override, "--print-config"])
    name = override.split("=")[0]
    assert line.startswith(f"rlhf pipeline: error: unknown config key {name!r} for "
                           f"PipelineConfig. {hint} Valid keys: "), line


def test_the_grpo_config_file_names_every_algorithm():
    """configs/grpo.yaml's `algorithm:` comment listed dr_grpo .. cispo and not sapo, which the
    RL stage takes as well."""
    from pathlib import Path

    from rlhf import rl

    line = next(line for line in (Path(__file__).resolve().parents[2] / "configs" / "grpo.yaml")
                .read_text().splitlines() if line.startswith("algorithm:"))
    named = set(line.replace(",", " ").replace("(", " ").split())
    assert set(rl.PRESETS) - {"ppo"} <= named, line


# ---- the reward model on very few pairs ---------------------------------------------------------
@pytest.mark.parametrize("n_pairs, eval_fraction, at_least", [(2, 0.2, 3), (5, 0.1, 6)])
def test_reward_model_says_when_eval_fraction_holds_out_nothing(tmp_path, monkeypatch, n_pairs,
                                                                eval_fraction, at_least):
    """`rlhf rm` on 2 pairs (eval_fraction 0.2 of them rounds to 0) trained without a held-out
    evaluation and said nothing: the summary just had no accuracy."""
    from rlhf import reward
    from tests.helpers import rl_tokenizer, tiny_backbone

    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    tokenizer = rl_tokenizer()
    pairs = [{"prompt": f"Review of the blender {i}:", "chosen": " Great.", "rejected": " Bad."}
             for i in range(n_pairs)]
    cfg = reward.RewardConfig(output_dir=str(tmp_path / "rm"), device="cpu", max_length=48,
                              warmup_steps=0, batch_size=2, grad_accum_steps=1,
                              eval_fraction=eval_fraction)
    with pytest.warns(UserWarning, match=rf"eval_fraction={eval_fraction} of {n_pairs} pair\(s\) "
                                         rf"holds out none .* give at least {at_least} pairs"):
        summary = reward.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer,
                               train_pairs=pairs)
    assert "eval_accuracy" not in summary
    # the count it names is the smallest that holds one out
    assert round(at_least * eval_fraction) == 1 and round((at_least - 1) * eval_fraction) == 0


# ---- what rlhf pipeline leaves on the screen -----------------------------------------------------
@pytest.mark.parametrize("command, module_name, written", [
    ("pipeline", "rlhf.pipeline", "summary.json"), ("frontier", "rlhf.frontier", "frontier.json")])
def test_the_pipelines_figures_stay_on_screen(tmp_path, capsys, monkeypatch, command,
                                              module_name, written):
    """`rlhf pipeline` printed its figures (reward-model accuracy, gold difference, KL), then
    the CLI dumped the whole summary as JSON after them: 220 lines of settings that pushed the
    figures off the screen. The summary is in summary.json (frontier.json); the CLI names it."""
    import importlib

    module = importlib.import_module(module_name)
    out = tmp_path / command

    def run(cfg):
        print("gold (VADER) on held-out prompts: ... 21.6 standard errors")
        return {"config": {f"setting_{i}": i for i in range(200)}, "figure": 0.803}

    monkeypatch.setattr(module, "run", run)
    assert cli.main([command, f"output_dir={out}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["gold (VADER) on held-out prompts: ... 21.6 standard errors",
                     f"summary: {out / written}"]


def test_a_stage_still_prints_its_summary(tmp_path, capsys, monkeypatch):
    from rlhf import sft

    monkeypatch.setattr(sft, "train", lambda cfg: {"stage": "sft", "steps": 2})
    assert cli.main(["sft", f"output_dir={tmp_path / 'sft'}"]) == 0
    assert '"steps": 2' in capsys.readouterr().out


# ---- nonfinite=skip ------------------------------------------------------------------------------
def test_a_skipped_rl_step_says_what_was_not_finite(tmp_path, monkeypatch):
    """nonfinite=skip in the RL stage warned "skipped an optimizer step at iteration 0:
    non-finite loss" for a non-finite gradient norm of iteration 1 (0-based, and the loss was
    finite); the SFT and reward stages numbered their steps one lower than metrics.jsonl too.
    When the skips ran out, the error still advised "set nonfinite=skip", which was set."""
    import torch

    from rlhf import rl
    from tests.helpers import PROMPTS, rl_config, rl_tokenizer, tiny_backbone

    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    clip = torch.nn.utils.clip_grad_norm_
    calls = []

    def first_norm_nan(*args, **kwargs):
        calls.append(1)
        norm = clip(*args, **kwargs)
        return norm * float("nan") if len(calls) == 1 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", first_norm_nan)
    tokenizer = rl_tokenizer()
    cfg = rl_config(tmp_path, "grpo", num_iterations=1, nonfinite="skip")
    with pytest.warns(UserWarning, match=r"\[grpo\] skipped an optimizer step of iteration 1: "
                                         r"non-finite policy grad norm \(policy loss [-0-9.e]+, "
                                         r"policy grad norm nan\); 1 skipped so far, at most "
                                         r"max_skipped_steps=10"):
        rl.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS)


# ---- a pipe that closes early (`| head`) -------------------------------------------------------
@pytest.mark.parametrize("args", [["rlhf.memory"], ["rlhf", "plan", "tiny"],
                                  ["rlhf.plan", "tiny", "--json"]])
def test_a_table_piped_into_a_reader_that_leaves_ends_quietly(args):
    """`python -m rlhf.memory | head -3` and `rlhf plan ... | head` ended in a BrokenPipeError
    traceback (exit status 1) once head had its lines and closed the pipe. The reader here
    closes the pipe before the command writes anything: the command ends with 141 (128 +
    SIGPIPE, as `yes | head`'s yes) and writes nothing to stderr."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first write
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert err == ""


@pytest.mark.parametrize("argv, expected", [
    (["plan", "tiny", "--batch", "0"], "--batch 0: expected an integer >= 1"),
    (["plan", "tiny", "--lora-rank", "0"], "--lora-rank 0: expected an integer >= 1"),
    (["plan", "tiny", "--prompt-length", "-1"], "--prompt-length -1: expected an integer >= 1"),
    (["plan", "tiny", "--gpus", "0"], "--gpus 0: expected an integer >= 1"),
    (["plan", "tiny", "--minibatch", "0"], "--minibatch 0: expected an integer >= 1"),
])
def test_plan_names_the_flag_of_a_count_out_of_range(capsys, argv, expected):
    """`rlhf plan tiny --lora-rank 0` said "lora_rank must be >= 1", `--gpus 0` "gpus must be an
    integer >= 1 and strategy ddp or fsdp2": plan()'s parameter names, not the flags typed."""
    line = _error_line(capsys, argv)
    assert line.startswith(f"rlhf plan: error: {expected}"), line


@pytest.mark.parametrize("argv, key", [(["sft", "lr", "1e-4"], "lr"),
                                       (["ppo", "kl-coef"], "kl_coef")])
def test_a_setting_without_its_value_is_not_a_missing_config_file(capsys, argv, key):
    """`rlhf sft lr 1e-4` (a space for the '=') said "config file 'lr' does not exist"."""
    line = _error_line(capsys, [*argv, "--print-config"])
    assert f"is a setting without a value: write {key}=<value>" in line, line
    assert "does not exist" not in line


@pytest.mark.parametrize("argv, expected", [
    (["grpo", "lr=-1", "--print-config"], "lr=-1.0 is out of range: lr must be a finite number"),
    (["sft", "epochs=0", "--print-config"], "epochs=0.0 is out of range: epochs must be"),
    (["ppo", "output_dir={tmp}/run"], "model is required: the backbone directory"),
])
def test_a_top_level_error_names_the_setting_not_the_config_class(capsys, tmp_path, argv,
                                                                  expected):
    """`rlhf grpo lr=-1` said "... GRPOConfig.lr must be ..." and `rlhf ppo` without a model
    "PPOConfig.model is required": class names of the Python API the user never typed (nested
    ones already read as typed, ppo.lr)."""
    line = _error_line(capsys, [arg.format(tmp=tmp_path) for arg in argv])
    assert line.split(": error: ", 1)[1].startswith(expected), line
    assert "Config." not in line


@pytest.mark.parametrize("print_config", [False, True])
def test_resume_with_overwrite_is_one_error_before_anything(capsys, tmp_path, print_config):
    """`rlhf sft --resume overwrite=true` printed "--resume: ... holds no run yet, so a new run
    starts there" and then the contradiction as an error (two lines, the first one wrong), and
    --print-config showed the settings as if they could run."""
    argv = ["sft", "--resume", "overwrite=true", f"output_dir={tmp_path / 'run'}"]
    line = _error_line(capsys, argv + ["--print-config"] * print_config)
    assert "resume=true and overwrite=true contradict each other" in line, line


@pytest.mark.parametrize("overrides, key", [
    (["base.ppo.kl_coef=0.5"], "base.ppo.kl_coef"),
    (["base.ppo.kl_target=3"], "base.ppo.kl_target"),
    (["base.ppo.num_iterations=2", "num_iterations=3"], "base.ppo.num_iterations"),
])
def test_frontier_refuses_a_base_setting_its_points_replace(capsys, overrides, key):
    """`rlhf frontier base.ppo.kl_coef=0.5` ran every point at its kl_coefs value with no
    adaptive controller, the 0.5 (or base.ppo.kl_target) silently unused; base.ppo.num_iterations
    with num_iterations= too ran the latter."""
    line = _error_line(capsys, ["frontier", *overrides, "--print-config"])
    assert line.startswith(f"rlhf frontier: error: {key} cannot be set in rlhf frontier"), line


def test_frontier_keeps_a_base_setting_its_points_use(capsys):
    assert cli.main(["frontier", "base.ppo.num_iterations=2", "--print-config"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("override, expected", [
    ("base.ppo.algorithm=grpo", "base.ppo.algorithm='grpo' cannot be set in rlhf pipeline: the "
                                "pipeline sets it for every stage from its own algorithm; set "
                                "base.algorithm= instead"),
    ("base.ppo.seed=3", "base.ppo.seed=3 cannot be set in rlhf pipeline: the pipeline sets it "
                        "for every stage from its own seed; set seed= instead"),
])
def test_frontier_names_a_refused_base_setting_as_typed(capsys, override, expected):
    """`rlhf frontier base.ppo.algorithm=grpo` was refused as "ppo.algorithm='grpo' ... set
    algorithm= instead", a key of `rlhf pipeline`, not of the command typed (where algorithms=
    is the frontier's own list)."""
    line = _error_line(capsys, ["frontier", override, "--print-config"])
    assert line == f"rlhf frontier: error: {expected}"
