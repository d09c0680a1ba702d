"""Defects found by the settings hunt: a setting silently ignored, misapplied, shown as other
than what runs, or dropped by a resume. One test per defect, each failing on the code before
its fix; the references are what the run really computes (the kernels' own defaults, the
uninterrupted run, the stage alone).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import rlhf_kernels
from rlhf import cli, rl
from tests.helpers import PROMPTS, interrupt_at, rl_config, rl_tokenizer, tiny_backbone

pytestmark = pytest.mark.reference_kernels


@pytest.fixture(scope="module")
def tokenizer():
    return rl_tokenizer()


def _printed(capsys, argv) -> dict:
    import yaml

    assert cli.main(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)


# --------------------------------------------------------------------------------------------
# --print-config shows advantage_norm as the norm the run uses
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm, estimator, shown", [
    ("grpo", None, "group"), ("dr_grpo", None, "none"), ("rloo", None, "none"),
    ("dapo", None, "group"), ("grpo", "rloo", "none")])
def test_print_config_shows_the_advantage_norm_the_run_uses(capsys, algorithm, estimator,
                                                            shown):
    """advantage_norm=auto (the default) was printed as `auto` by --print-config and recorded
    so in summary.json and the summary's algorithm_settings (as null): not the norm the run
    applies. Now every view shows the estimator's own norm, the one group_advantages(norm=None)
    takes, and the advantages computed with the shown value are the run's."""
    extra = [f"advantage_estimator={estimator}"] if estimator else []
    for argv in (["grpo", f"algorithm={algorithm}", *extra, "--print-config"],
                 ["pipeline", f"algorithm={algorithm}",
                  *(f"ppo.{e}" for e in extra), "--print-config"]):
        printed = _printed(capsys, argv)
        assert (printed["ppo"] if argv[0] == "pipeline" else printed)["advantage_norm"] == shown
    cfg = rl.RLConfig(algorithm=algorithm, advantage_estimator=estimator)
    assert cfg.settings.advantage_norm == shown
    rewards = torch.tensor([0.0, 1.0, 3.0, 0.5, 2.0, 2.0, 1.0, -1.0] * 2)
    torch.testing.assert_close(
        rl._group_advantages(rewards, cfg.settings),
        rlhf_kernels.group_advantages(rewards, group_size=cfg.settings.group_size,
                                      estimator=cfg.settings.advantage_estimator, norm=None))
    # an explicit norm is shown as given; PPO (no group advantages) shows none
    assert rl.printable_config(rl.GRPOConfig(advantage_norm="batch"))["advantage_norm"] == "batch"
    assert rl.RLConfig().settings.advantage_norm is None
    assert "advantage_norm" not in rl.printable_config(rl.RLConfig())


# --------------------------------------------------------------------------------------------
# DAPO's once-per-run warning stays once across a resume
# --------------------------------------------------------------------------------------------
def test_dynamic_sampling_warns_once_per_run_across_a_resume(tmp_path, tokenizer):
    """The 'groups of the batch are flat' warning says '(warned once per run)', but a resumed
    run warned again: the flag lived in the process only. It is now kept in the checkpoint."""
    cfg = rl_config(tmp_path, "dapo", rollout_batch_size=8, group_size=2, minibatch_size=4,
                    num_iterations=2, dynamic_sampling_rounds=2)

    def flat(prompts, responses):
        return [1.0] * len(responses)

    def filled_warnings(caught) -> int:
        return sum("dynamic_sampling/filled_groups" in str(w.message) for w in caught)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KeyboardInterrupt):
            rl.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer,
                     prompts=PROMPTS, reward_fn=flat, on_iteration=interrupt_at(1))
        assert filled_warnings(caught) == 1
        cfg.resume = True
        rl.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS,
                 reward_fn=flat)
        assert filled_warnings(caught) == 1  # the resumed run's iteration 2: no repeat


# --------------------------------------------------------------------------------------------
# the pipeline checks its RL stage's settings under its own algorithm
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [[], ["model=some/model"], ["task=arithmetic",
                                                             "model=some/model"]])
def test_pipeline_rl_settings_are_checked_under_the_pipelines_algorithm(capsys, tmp_path, mode):
    """`rlhf pipeline algorithm=grpo ppo.advantage_estimator=rloo` was refused with 'group_size=1
    with the rloo advantage estimator gives every sample an advantage of 0': the ppo section
    was built and checked under PPO's presets (group_size 1) before the pipeline set its
    algorithm. The stage alone (`rlhf grpo advantage_estimator=rloo`) took it. Now the section
    starts from the pipeline's algorithm, on the command line and in a YAML file alike."""
    printed = _printed(capsys, ["pipeline", *mode, "algorithm=grpo",
                                "ppo.advantage_estimator=rloo", "--print-config"])
    assert (printed["ppo"]["algorithm"], printed["ppo"]["advantage_estimator"],
            printed["ppo"]["group_size"]) == ("grpo", "rloo", 8)
    config = tmp_path / "pipeline.yaml"
    config.write_text("algorithm: dr_grpo\nppo:\n  advantage_estimator: rloo\n"
                      + "".join(f"{line.replace('=', ': ')}\n" for line in mode))
    printed = _printed(capsys, ["pipeline", str(config), "--print-config"])
    assert printed["ppo"]["advantage_estimator"] == "rloo"
    assert printed["ppo"]["loss_normalizer"] == "max_length"  # dr_grpo's preset
    assert _printed(capsys, ["grpo", "advantage_estimator=rloo", "--print-config"])[
        "advantage_estimator"] == "rloo"


# --------------------------------------------------------------------------------------------
# rlhf frontier: its base pipeline is the pipeline the same settings give
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    ["algorithm=grpo", "ppo.num_iterations=5"], ["algorithm=grpo", "ppo.advantage_estimator=rloo"],
    ["sft.epochs=2"], ["algorithm=rloo"]])
def test_frontier_base_is_the_pipeline_of_the_same_settings(overrides):
    """The frontier's `base.` settings were put over PipelineConfig(), not over what `rlhf
    pipeline` starts from: base.algorithm=grpo with any base.ppo setting ran the base's RL
    stage at PPO's kl_coef 0.1 (the pipeline: 0.3), base.ppo.advantage_estimator=rloo was
    refused (PPO's group size), base.sft.epochs=2 was refused at the start (the preset's
    max_steps kept). Now base is the pipeline config those settings give."""
    from rlhf.config import load_config
    from rlhf.frontier import FrontierConfig
    from rlhf.pipeline import PipelineConfig

    frontier = load_config(FrontierConfig, None, [f"base.{o}" for o in overrides])
    assert frontier.base == load_config(PipelineConfig, None, overrides)


def test_frontier_refuses_a_base_of_another_task(tmp_path, monkeypatch):
    """base.task=arithmetic was accepted: the frontier ran the arithmetic pipeline as its base
    (a pretrained model's whole RL run), then failed on the gold figures that task does not
    have. It is refused before anything runs."""
    from rlhf import frontier, pipeline
    from rlhf.config import load_config

    def no_run(cfg):
        raise AssertionError("the base pipeline ran")

    monkeypatch.setattr(pipeline, "run", no_run)
    cfg = load_config(frontier.FrontierConfig, None, [
        f"output_dir={tmp_path}", "base.task=arithmetic", "base.model=some/model"])
    with pytest.raises(ValueError, match=r"base\.task='arithmetic' is not supported"):
        frontier.run(cfg)


@pytest.mark.parametrize("base_algorithm", ["ppo", "grpo"])
@pytest.mark.parametrize("point", ["ppo", "rloo"])
def test_a_frontier_point_runs_the_pipelines_rl_settings(base_algorithm, point):
    """Each point is the RL stage `rlhf pipeline algorithm=<point>` runs, at its fixed kl_coef.
    A PPO point of a critic-free base (base.algorithm=grpo) took RLConfig's critic_lr 5e-5 (the
    base has no critic settings), not the task's 2e-3: its critic learned 40 times slower."""
    from dataclasses import replace

    from rlhf import frontier, pipeline
    from rlhf.config import load_config

    cfg = load_config(frontier.FrontierConfig, None, [f"base.algorithm={base_algorithm}"])
    got = frontier._rl_config(cfg, point, 0.5, "out")
    alone = load_config(pipeline.PipelineConfig, None,
                        [f"algorithm={point}", f"output_dir={cfg.output_dir}/base"])
    assert got == replace(pipeline.stage_configs(alone)["ppo"], output_dir="out", kl_coef=0.5,
                          kl_target=None)


def _frontier_base(base, quantization="none"):
    """What the frontier's base pipeline leaves for its points in ``base``: the tokenizer, the
    SFT model and a reward-stage backbone on it (tiny, untrained)."""
    from rlhf.models import LoraSpec, SharedBackbone, load_causal_lm
    from tests.helpers import tiny_llama

    tokenizer = rl_tokenizer()
    tokenizer.save_pretrained(base / "tokenizer")
    tiny_llama(tokenizer).save_pretrained(base / "sft" / "model")
    SharedBackbone.from_model(
        load_causal_lm(base / "sft" / "model", quantization=quantization, device="cpu"),
        lora=LoraSpec(rank=4, alpha=8), name_or_path=str(base / "sft" / "model"),
    ).save(base / "rm" / "backbone")
    return base


def test_a_frontier_point_runs_on_the_bases_quantized_model(tmp_path, monkeypatch):
    """base.quantization=nf4: the base pipeline's reward model and RL stage ran on the nf4 SFT
    model, but each point loaded that model in full precision and its RL stage stopped with
    "quantization='nf4' but the backbone given is none", after the whole base run. A point
    now loads it as the base's RL stage did."""
    from rlhf import frontier

    base = _frontier_base(tmp_path / "base", "nf4")
    seen = []

    def train(cfg, *, backbone, **kwargs):
        seen.append((cfg.quantization, backbone.quantization))
        raise KeyboardInterrupt  # the point's RL run itself is not under test

    monkeypatch.setattr(rl, "train", train)
    cfg = frontier.FrontierConfig(output_dir=str(tmp_path), device="cpu",
                                  base=frontier.pipeline.PipelineConfig(quantization="nf4"))
    with pytest.raises(KeyboardInterrupt):
        frontier._run_point(cfg, "grpo", 0.1, base, 0.0, 0.0)
    assert seen == [("nf4", "nf4")]


def test_frontier_print_config_shows_what_runs(capsys):
    """`rlhf frontier --print-config` printed its config as given: the base pipeline's stages
    without the folders, seed and algorithm the pipeline gives them, settings the run refuses
    (base.ppo.critic_lr with a critic-free base) without a word, and nothing of the points'
    RL settings. It now shows the base as `rlhf pipeline --print-config` does, each
    algorithm's point settings, and refuses what the run refuses."""
    import yaml

    from rlhf.frontier import NOTES_HEADER

    assert cli.main(["frontier", "base.algorithm=grpo", "algorithms=ppo,rloo",
                     "kl_coefs=0.05,0.5", "--print-config"]) == 0
    # the config (it loads back: tests/trainer/test_frontier.py), then what runs, as comments
    config_text, notes = capsys.readouterr().out.split(f"# {NOTES_HEADER}\n")
    assert yaml.safe_load(config_text)["base"]["ppo"]["advantage_norm"] == "auto"  # as given
    printed = yaml.safe_load("".join(line.removeprefix("# ") + "\n"
                                     for line in notes.splitlines()))
    assert printed["base"]["ppo"]["output_dir"] == "runs/frontier/base/grpo"
    assert printed["base"]["ppo"]["advantage_norm"] == "group"
    assert "critic_lr" not in printed["base"]["ppo"]
    ppo_points, rloo_points = printed["points"]["ppo"], printed["points"]["rloo"]
    assert ppo_points["critic_lr"] == 0.002 and "critic_lr" not in rloo_points
    assert ppo_points["kl_coef"] == rloo_points["kl_coef"] == [0.05, 0.5]
    assert (ppo_points["kl_target"], rloo_points["advantage_norm"]) == (None, "none")
    assert cli.main(["frontier", "base.algorithm=grpo", "base.ppo.critic_lr=1",
                     "--print-config"]) == 2
    assert "ppo.critic_lr=1.0 has no effect with algorithm=grpo" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# rlhf pipeline task=arithmetic: a resume keeps the held-out curve of curve_every
# --------------------------------------------------------------------------------------------
def test_arithmetic_resume_keeps_the_heldout_curve(tiny_chat_model, tmp_path,  # noqa: F811
                                                   monkeypatch):
    """curve_every's held-out points lived in the process only: a run interrupted after
    iteration 2 and resumed reported the curve [0, 3], without the points at 1 and 2. They are
    now kept in heldout_curve.json, and the resumed run's curve is the whole one."""
    import json

    out = tmp_path / "run"
    argv = ["pipeline", "task=arithmetic", f"model={tiny_chat_model}", "algorithm=grpo",
            f"output_dir={out}", "ppo.num_iterations=3", "ppo.rollout_batch_size=8",
            "ppo.group_size=4", "ppo.minibatch_size=8", "ppo.grad_accum_steps=1",
            "ppo.max_new_tokens=4",
            "ppo.save_every=1", "eval_problems=4", "curve_every=1", "curve_problems=3",
            "sample_batch_size=4", "n_show_samples=1"]
    train = rl.train

    def interrupted_after_2(cfg, **kwargs):
        measure = kwargs.pop("on_iteration")

        def on_iteration(iteration, metrics):
            measure(iteration, metrics)
            if iteration == 2:
                raise KeyboardInterrupt

        return train(cfg, on_iteration=on_iteration, **kwargs)

    monkeypatch.setattr(rl, "train", interrupted_after_2)
    assert cli.main(argv) == cli.EXIT_INTERRUPTED
    before = json.loads((out / "heldout_curve.json").read_text())
    assert [p["iteration"] for p in before] == [0, 1, 2]
    monkeypatch.setattr(rl, "train", train)
    assert cli.main([*argv, "--resume"]) == 0
    curve = json.loads((out / "summary.json").read_text())["heldout_curve"]
    assert [p["iteration"] for p in curve] == [0, 1, 2, 3]
    assert curve[:3] == before


# --------------------------------------------------------------------------------------------
# SFT: a skipped step (nonfinite=skip) still counts for log_every and save_every
# --------------------------------------------------------------------------------------------
def test_a_skipped_sft_step_is_logged_and_checkpointed_like_any_step(tmp_path, monkeypatch):
    """nonfinite=skip: the SFT loop `continue`d past a skipped step's bookkeeping, so its
    record was never written (log_every missed it: the last step's record too when that one
    was skipped), its save_every checkpoint never made, and on_step never called. The reward
    and RL stages log and checkpoint a skipped step as any other; now SFT does too."""
    import math

    from rlhf import sft, task
    from rlhf.checkpoint import list_checkpoints
    from tests.helpers import read_jsonl, review_tokenizer, sft_config, tiny_llama

    corpus = task.make_corpus(32, seed=0)
    tokenizer = review_tokenizer(corpus)
    calls = []
    loss = sft.lm_loss

    def nan_at_step_2(logp, labels, n_tokens):
        calls.append(1)
        value = loss(logp, labels, n_tokens)
        return value * float("nan") if len(calls) == 2 else value

    monkeypatch.setattr(sft, "lm_loss", nan_at_step_2)
    steps = []
    cfg = sft_config(tmp_path, max_steps=3, grad_accum_steps=1, nonfinite="skip",
                     save_every=2, keep_last=None)
    # the warning numbers steps as metrics.jsonl does (it said "skipped step 1" for step 2)
    with pytest.warns(UserWarning,
                      match=r"skipped step 2: non-finite loss and grad norm \(loss nan"):
        summary = sft.train(cfg, model=tiny_llama(tokenizer), tokenizer=tokenizer,
                            examples=corpus, on_step=lambda step, m: steps.append(step))
    records = read_jsonl(tmp_path / "sft" / "metrics.jsonl")
    assert [r["step"] for r in records] == steps == [1, 2, 3]
    assert not math.isfinite(records[1]["loss"]) and records[1]["skipped_steps"] == 1
    assert [p.name for p in list_checkpoints(tmp_path / "sft" / "checkpoints")] == [
        "step-0000002", "step-0000003"]
    assert summary["skipped_steps"] == 1 and math.isfinite(summary["final_loss"])


def test_rm_print_config_refuses_what_the_run_refuses(capsys):
    """`rlhf rm eval_every=5 eval_fraction=0 --print-config` printed the config (exit 0) that
    the run then refused (nothing held out to evaluate): --print-config checks as the run."""
    assert cli.main(["rm", "eval_every=5", "eval_fraction=0", "--print-config"]) == 2
    assert "eval_every=5 has no effect with eval_fraction=0" in capsys.readouterr().err
    assert _printed(capsys, ["rm", "eval_every=5", "--print-config"])["eval_every"] == 5


# --------------------------------------------------------------------------------------------
# a warm-up longer than the run is said
# --------------------------------------------------------------------------------------------
def test_a_warmup_longer_than_the_run_is_said(tmp_path, tokenizer):
    """SFT's default warmup_steps=20 in a 12-step run (or RL's 5 in a 4-step one): the
    learning rate rose for the whole run and peaked at 12/20 of lr, without a word. The
    schedule every stage uses says so; a warm-up that fits says nothing."""
    import warnings

    from rlhf.stage import warmup_cosine_schedule

    def schedule(warmup, total):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = warmup_cosine_schedule(optimizer, warmup, total, 0.5)
        lrs = []
        for _ in range(total):
            lrs.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return lrs

    with pytest.warns(UserWarning, match=r"warmup_steps=20 is more than the run's 12 optimizer "
                                         r"steps: .* peaks at 60% of lr"):
        assert max(schedule(20, 12)) == pytest.approx(12 / 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert max(schedule(12, 12)) == 1.0 and max(schedule(0, 3)) == 1.0
    # the RL stage's own: num_iterations x ppo_epochs x minibatches / grad_accum_steps steps
    cfg = rl_config(tmp_path, "grpo", num_iterations=1, warmup_steps=5)  # 2 steps
    with pytest.warns(UserWarning, match=r"warmup_steps=5 is more than the run's 2 optimizer"):
        rl.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS)


# --------------------------------------------------------------------------------------------
# SFT: a preset's learning rate belongs to its kind of fine-tuning
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, lr", [
    (["pipeline", "model=some/model", "sft.lora_rank=0"], 2e-5),  # the LoRA preset -> full
    (["pipeline", "model=some/model", "sft.lora_rank=0", "sft.lr=1e-5"], 1e-5),
    (["pipeline", "model=some/model", "sft.lora_rank=8"], 5e-4),  # LoRA still: the preset's
    (["pipeline", "model=some/model"], 5e-4),
    (["sft", "lora_rank=4"], 2e-4),  # the built-in task's full-weight preset -> LoRA
    (["sft"], 3e-3)])
def test_a_preset_lr_is_not_kept_for_the_other_kind_of_fine_tuning(argv, lr):
    """`rlhf pipeline model=X sft.lora_rank=0` (full-weight SFT of a pretrained model) kept
    the LoRA preset's lr=5e-4, 25 times the full-weight default 2e-5, without a word. A preset's
    lr is now left out when lora_rank switches the kind of fine-tuning and lr is not given: the
    run takes the default of the kind asked for, as SFTConfig(lr=None) does."""
    from rlhf import cli, pipeline, sft
    from rlhf.config import load_config

    command, overrides = argv[0], argv[1:]
    if command == "pipeline":
        cfg = pipeline.stage_configs(load_config(pipeline.PipelineConfig, None, overrides))["sft"]
    else:
        cfg = load_config(getattr(sft, cli.STAGES[command].config_class), None, overrides)
    assert cfg.resolved(100).lr == pytest.approx(lr)


@pytest.mark.parametrize("overrides, lr", [
    (["sft.model=m", "sft.dataset=s.jsonl", "reward.dataset=p.jsonl", "ppo.dataset=q.jsonl"],
     2e-5), (["sft.model=m", "sft.dataset=s.jsonl", "reward.dataset=p.jsonl",
              "ppo.dataset=q.jsonl", "sft.lora_rank=8"], 2e-4)])
def test_pipeline_print_config_shows_the_sft_lr_the_run_takes(capsys, overrides, lr):
    """On your data the SFT stage starts from SFTConfig(), lr=None (2e-5 full-weight, 2e-4
    LoRA): `rlhf pipeline --print-config` and summary.json showed `lr: null`, not the lr the
    stage trained at (`rlhf sft --print-config` shows it since 4a75333)."""
    printed = _printed(capsys, ["pipeline", *overrides, "--print-config"])
    assert printed["sft"]["lr"] == pytest.approx(lr)


def test_frontier_points_sample_on_cpu_threads(tmp_path, monkeypatch):
    """cpu_threads held for each point's RL run (the stage's own limit) and for the base
    pipeline, but not for the points' held-out sampling, which ran on torch's default thread
    count (every core; the pipeline's own evaluation runs on cpu_threads). The whole frontier
    now runs on cpu_threads, as rlhf pipeline does."""
    from rlhf import frontier, pipeline

    _frontier_base(tmp_path / "base")
    monkeypatch.setattr(pipeline, "run", lambda cfg: {
        "gold_heldout": {"sft_mean": 0.0, "sft_stderr": 0.1}})
    monkeypatch.setattr(rl, "train", lambda cfg, **kwargs: {"iterations": 0})
    threads = []

    def sample_texts(backbone, tokenizer, prompts, role, cfg, seed, batch_size, **kwargs):
        threads.append(torch.get_num_threads())
        n = len(prompts)
        return ["a fine blender"] * n, torch.zeros(n), torch.zeros(n)

    monkeypatch.setattr(pipeline, "sample_texts", sample_texts)
    cfg = frontier.FrontierConfig(output_dir=str(tmp_path), device="cpu", cpu_threads=1,
                                  algorithms=("grpo",), kl_coefs=(0.1,), eval_samples=4)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        frontier.run(cfg)
        assert torch.get_num_threads() == 2  # restored after the run
    finally:
        torch.set_num_threads(previous)
    assert threads == [1]


# --------------------------------------------------------------------------------------------
# RL: a kl_horizon that turns the adaptive kl_coef negative is refused
# --------------------------------------------------------------------------------------------
def test_a_kl_horizon_too_short_for_the_batch_is_refused():
    """kl_horizon=10 with rollout_batch_size=64 was accepted: one update below kl_target
    multiplied kl_coef by 1 - 0.2 x 64/10 = -0.28, a negative KL weight (a bonus for moving away
    from the reference), its sign flipping at every update after. It is refused; a horizon
    above rollout_batch_size / 5 keeps kl_coef positive, and without kl_target it is unused."""
    with pytest.raises(ValueError, match=r"kl_horizon=10 is too short for rollout_batch_size="
                                         r"64: .* 1 \+- 1\.28, which makes it negative"):
        rl.RLConfig(kl_horizon=10, rollout_batch_size=64)
    with pytest.raises(ValueError, match="kl_horizon=12 is too short"):
        rl.RLConfig(kl_horizon=12, rollout_batch_size=64)  # 1 - 0.2 x 64/12 < 0 as well
    controller = rl.AdaptiveKLController(0.1, 6.0, 13)
    rl.RLConfig(kl_horizon=13, rollout_batch_size=64)
    assert all(controller.update(0.0, 64) > 0 for _ in range(50))  # shrinks, stays > 0
    rl.RLConfig(kl_horizon=10, rollout_batch_size=64, kl_target=None)  # no controller


@pytest.mark.parametrize("overrides, bound", [([], 6.0), (["ppo.kl_target=3"], 3.0),
                                              (["kl_bound=2"], 2.0),
                                              (["ppo.kl_target=null"], None)])
def test_pipeline_print_config_shows_the_kl_bound_the_evaluation_uses(capsys, overrides, bound):
    """kl_bound=null (the default) means ppo.kl_target, the bound summary.json's
    kl_to_reference is held to; --print-config and summary.json's config showed null."""
    assert _printed(capsys, ["pipeline", *overrides, "--print-config"])["kl_bound"] == bound


def test_frontier_refuses_a_points_settings_before_the_base_runs(tmp_path, monkeypatch, capsys):
    """base.ppo.rollout_batch_size=12 suits the base's PPO but not a GRPO point (group_size 8):
    the frontier ran the whole base pipeline (SFT, pairs, reward model, RL) and only then
    stopped at its first GRPO point. Every point's settings are now checked first."""
    from rlhf import frontier, pipeline
    from rlhf.config import load_config

    def no_base(cfg):
        raise AssertionError("the base pipeline ran")

    monkeypatch.setattr(pipeline, "run", no_base)
    cfg = load_config(frontier.FrontierConfig, None, [
        f"output_dir={tmp_path}", "algorithms=ppo,grpo", "base.ppo.rollout_batch_size=12",
        "base.ppo.minibatch_size=4"])
    with pytest.raises(ValueError, match=r"the grpo points: rollout_batch_size \(12\) must be a "
                                         r"multiple of group_size \(8\)"):
        frontier.run(cfg)
    assert cli.main(["frontier", "algorithms=ppo,grpo", "base.ppo.rollout_batch_size=12",
                     "base.ppo.minibatch_size=4", "--print-config"]) == 2
    assert "the grpo points: rollout_batch_size (12)" in capsys.readouterr().err


def test_frontier_resume_reuses_finished_runs_only_under_their_settings(tmp_path, monkeypatch):
    """`rlhf frontier --resume` reused a finished base pipeline and finished points by their
    summary.json / result.json alone: resumed with other settings (base.ppo.num_iterations, the
    frontier's num_iterations) it mixed the old runs' figures with new ones without a word,
    where `rlhf pipeline --resume` refuses a changed setting. Now a finished run is reused
    only under the settings of its run.json; a change is refused as --resume refuses it."""
    import json
    from dataclasses import asdict, replace

    from rlhf import frontier, pipeline
    from rlhf.checkpoint import RunDirectoryError, open_run
    from rlhf.config import load_config

    def config(*overrides):
        return load_config(frontier.FrontierConfig, None, [
            f"output_dir={tmp_path}", "algorithms=[grpo]", "kl_coefs=[0.1]", "resume=true",
            *overrides])

    cfg = config()
    base = frontier._base_config(replace(cfg, resume=False))
    with open_run(base.output_dir, "pipeline", asdict(base), resume=False):
        (tmp_path / "base" / "summary.json").write_text(json.dumps(
            {"gold_heldout": {"sft_mean": 0.0, "sft_stderr": 0.1}}))
    point = frontier._rl_config(replace(cfg, resume=False), "grpo", 0.1,
                                tmp_path / "points" / "grpo-kl0.1")
    with open_run(point.output_dir, "grpo", asdict(point), resume=False):
        for name, text in (("metrics.jsonl", '{"iteration": 1}\n'), ("result.json", '{"done": 1}')):
            (tmp_path / "points" / "grpo-kl0.1" / name).write_text(text)

    def no_base(cfg):
        raise AssertionError("the finished base pipeline ran again")

    monkeypatch.setattr(pipeline, "run", no_base)
    with pytest.raises(RunDirectoryError, match=r"ppo\.num_iterations: 20 -> 5"):
        frontier.run(config("base.ppo.num_iterations=5"))
    with pytest.raises(RunDirectoryError, match=r"num_iterations: 20 -> 3"):
        frontier._run_point(config("num_iterations=3"), "grpo", 0.1, tmp_path / "base", 0, 1)
    assert frontier._run_point(cfg, "grpo", 0.1, tmp_path / "base", 0, 1) == {"done": 1}
    monkeypatch.setattr(frontier, "_run_point", lambda *args: (_ for _ in ()).throw(
        KeyboardInterrupt))  # the base is reused: the points come next
    with pytest.raises(KeyboardInterrupt):
        frontier.run(cfg)


def test_frontier_resume_says_a_new_run_starts_only_when_one_does(tmp_path, monkeypatch, capsys):
    """`rlhf frontier --resume` always printed "--resume: ... holds no run yet (no run.json),
    so a new run starts there", also when it resumed: the frontier keeps its run.json files in
    base/ and points/<point>/, none at the top. The line now appears only for a new run."""
    from rlhf import frontier

    monkeypatch.setattr(frontier, "run", lambda cfg: {})
    assert cli.main(["frontier", f"output_dir={tmp_path}", "--resume"]) == 0
    assert "holds no run yet" in capsys.readouterr().err
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "run.json").write_text("{}")
    assert cli.main(["frontier", f"output_dir={tmp_path}", "--resume"]) == 0
    assert "holds no run yet" not in capsys.readouterr().err


@pytest.mark.parametrize("setting", ["model=some/model", "dataset=train.jsonl"])
def test_sft_print_config_refuses_a_model_without_data_as_the_run_does(capsys, setting):
    """`rlhf sft model=X --print-config` printed a config (exit 0) that the run refuses ("SFT
    needs both `model` and `dataset`, or neither"); --print-config checks as the run."""
    assert cli.main(["sft", setting, "--print-config"]) == 2
    assert "SFT needs both `model` and `dataset`, or neither" in capsys.readouterr().err
    _printed(capsys, ["sft", "model=some/model", "dataset=train.jsonl", "--print-config"])


def test_a_list_setting_takes_one_number_as_it_takes_one_name(tmp_path):
    """`rlhf frontier kl_coefs=0.1` was refused ("must be a list, got 0.1") where
    `algorithms=grpo` gave ["grpo"]: one value of a list setting is a list of one, for numbers
    as for names, on the command line and in YAML."""
    from rlhf.config import load_config
    from rlhf.frontier import FrontierConfig

    cfg = load_config(FrontierConfig, None, ["kl_coefs=0.1", "algorithms=grpo"])
    assert (cfg.kl_coefs, cfg.algorithms) == ((0.1,), ("grpo",))
    config = tmp_path / "frontier.yaml"
    config.write_text("kl_coefs: 1\nalgorithms: rloo\n")
    cfg = load_config(FrontierConfig, config)
    assert (cfg.kl_coefs, cfg.algorithms) == ((1.0,), ("rloo",))
    assert load_config(FrontierConfig, None, ["kl_coefs=0.1,0.3"]).kl_coefs == (0.1, 0.3)
    with pytest.raises(ValueError, match="must be a list"):
        load_config(FrontierConfig, None, ["kl_coefs={a: 1}"])


def test_overlong_penalty_is_not_shown_without_an_overlong_buffer(capsys):
    """overlong_penalty acts only through overlong_buffer (refused when changed without it),
    yet --print-config and summary.json listed it in every run, unlike the other settings a
    run does not use (kl_horizon without kl_target, dynamic_sampling_rounds without dynamic
    sampling)."""
    assert "overlong_penalty" not in _printed(capsys, ["grpo", "--print-config"])
    shown = _printed(capsys, ["grpo", "overlong_buffer=4", "--print-config"])
    assert shown["overlong_penalty"] == 1.0
    assert "overlong_penalty" not in _printed(capsys, ["pipeline", "--print-config"])["ppo"]


@pytest.mark.parametrize("argv, unused, used", [
    (["sft"], ["lora_alpha", "epochs"], ["max_steps", "corpus_size"]),
    (["sft", "model=m", "dataset=d.jsonl"], ["lora_alpha", "corpus_size", "vocab_size"],
     ["epochs"]),
    (["sft", "model=m", "dataset=d.jsonl", "lora_rank=8"], ["corpus_size"], ["lora_alpha"])])
def test_sft_print_config_leaves_out_the_settings_the_run_does_not_use(capsys, argv, unused,
                                                                       used):
    """--print-config (and the pipeline's summary.json) listed lora_alpha without LoRA, epochs
    beside max_steps and the built-in task's corpus_size / vocab_size with a model: settings
    the run ignores (refused when changed), shown as if they applied. The RL stage's view
    already leaves such settings out."""
    shown = _printed(capsys, [*argv, "--print-config"])
    assert not set(unused) & set(shown) and set(used) <= set(shown)
    piped = _printed(capsys, ["pipeline", "--print-config"])["sft"]
    assert "lora_alpha" not in piped and "epochs" not in piped and piped["max_steps"] == 400


# ---------------------------------------------------------------------------------------------
# rlhf ppo --print-config shows the base quantization the run loads
# ---------------------------------------------------------------------------------------------
def test_print_config_shows_the_quantization_the_backbone_records(capsys, tmp_path):
    """quantization=null means the backbone's own, which its roles.json records: --print-config
    showed null, not the base the run loads; an explicit setting is shown as given, and a
    roles.json of a version that did not record it means an unquantized base."""
    nf4, older = tmp_path / "nf4", tmp_path / "older"
    for directory, info in ((nf4, {"quantization": "nf4"}), (older, {})):
        directory.mkdir()
        (directory / "roles.json").write_text(json.dumps(info))
    assert _printed(capsys, ["ppo", f"model={nf4}", "--print-config"])["quantization"] == "nf4"
    assert _printed(capsys, ["ppo", f"model={nf4}", "quantization=int8",
                             "--print-config"])["quantization"] == "int8"
    assert _printed(capsys, ["grpo", f"model={older}", "--print-config"])["quantization"] == "none"
    assert _printed(capsys, ["ppo", "--print-config"])["quantization"] is None  # no model yet
