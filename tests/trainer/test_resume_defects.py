"""Resume defects found by interrupting runs and comparing them with uninterrupted ones.

- a resume on a base model replaced (retrained) at its path since the run started went on
  silently: the reward and RL stages (and LoRA SFT) checkpoint only adapters and heads, and
  load the base again from ``model=``;
- SIGTERM (``kill PID``, ``timeout``, a scheduler's preemption) ended a run without the
  checkpoint Ctrl-C writes: the resume went back to the last periodic checkpoint;
- every safetensors file a run wrote (checkpoint parameters, the saved model, the backbone's
  heads and adapters) was mode 0600, unreadable by another user, unlike the run's other files;
- TensorBoard kept the records a resumed run logs again (metrics.jsonl drops them);
- a Ctrl-C (or SIGTERM) inside an SFT or reward-model optimizer step saved a half-updated
  model as the previous step.
"""

from __future__ import annotations

import json
import os
import signal
import stat

import pytest
import torch

from rlhf import checkpoint, cli, metrics, sft, task
from rlhf.checkpoint import RunDirectoryError, load_state
from tests.helpers import review_tokenizer, tiny_llama

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.reference_kernels]


@pytest.fixture(scope="module")
def corpus():
    return task.make_corpus(48, seed=3)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return review_tokenizer(corpus)


def _save_model(directory, tokenizer, seed: int):
    model = tiny_llama(tokenizer, seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def _sft_config(out, **overrides) -> sft.SFTConfig:
    settings = dict(output_dir=str(out), max_steps=4, batch_size=8, lr=1e-2, warmup_steps=1,
                    log_every=1, save_every=0, max_length=48, device="cpu")
    settings.update(overrides)
    return sft.SFTConfig(**settings)


def _records(path):
    """metrics.jsonl without its timings (tokens_per_s, pairs_per_s)."""
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_per_s")}
            for line in open(path)]


# ------------------------------------------------------------------ a replaced base model
def test_a_resume_on_a_model_replaced_at_its_path_is_refused(tmp_path, tokenizer):
    """run.json fingerprints the local model (and tokenizer) a run loads; --resume after a
    model retrained at that path (another SFT run with overwrite=true) is refused, naming
    the setting. The same weights copied back (only the file times differ) resume, as do a
    hub name and a run.json of an older version without fingerprints."""
    base = tmp_path / "sft-model"
    _save_model(base, tokenizer, seed=0)
    config = {"model": str(base), "tokenizer": "org/hub-name", "lr": 1e-4}
    run = tmp_path / "rm"
    with checkpoint.open_run(run, "rm", config, resume=False):
        (run / "metrics.jsonl").write_text('{"step": 1}\n')
    recorded = json.loads((run / "run.json").read_text())["models"]
    assert list(recorded) == ["model"]  # a hub name has no local content
    weights = (base / "model.safetensors").read_bytes()

    _save_model(base, tokenizer, seed=1)  # retrained: same files and sizes, other weights
    assert (base / "model.safetensors").stat().st_size == len(weights)
    with pytest.raises(RunDirectoryError, match=r"the model changed since the run started: "
                                                r"model: '.*sft-model' .*other content"):
        with checkpoint.open_run(run, "rm", config, resume=True):
            pass

    (base / "model.safetensors").write_bytes(weights)  # put back
    os.utime(base / "model.safetensors", (1, 1))
    with checkpoint.open_run(run, "rm", config, resume=True) as resumed:
        assert resumed.resumed
    manifest = json.loads((run / "run.json").read_text())
    del manifest["models"]  # written by an older version: nothing to compare
    (run / "run.json").write_text(json.dumps(manifest))
    _save_model(base, tokenizer, seed=1)
    with checkpoint.open_run(run, "rm", config, resume=True) as resumed:
        assert resumed.resumed


def test_a_backbones_base_model_counts_in_its_fingerprint(tmp_path, tokenizer):
    """An RL run's model= is a saved backbone (adapters and heads) that names its base model;
    a resume loads that base again, so an SFT model retrained at the base's path is refused
    as well, though the backbone directory itself is unchanged."""
    from rlhf.models import LoraSpec, SharedBackbone

    base = tmp_path / "sft-model"
    _save_model(base, tokenizer, seed=0)
    backbone_dir = tmp_path / "rm-backbone"
    SharedBackbone.from_pretrained(str(base), lora=LoraSpec(rank=2), seed=0).save(backbone_dir)
    config = {"model": str(backbone_dir), "algorithm": "ppo"}
    run = tmp_path / "ppo"
    with checkpoint.open_run(run, "ppo", config, resume=False):
        (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert json.loads((run / "run.json").read_text())["models"]["model"]["base"] == str(base)
    before = {p.name: p.read_bytes() for p in backbone_dir.iterdir() if p.is_file()}

    _save_model(base, tokenizer, seed=1)
    assert {p.name: p.read_bytes() for p in backbone_dir.iterdir() if p.is_file()} == before
    with pytest.raises(RunDirectoryError, match=r"model changed since the run started: model: "):
        with checkpoint.open_run(run, "ppo", config, resume=True):
            pass


def test_a_reward_stage_resume_on_a_retrained_sft_model_is_refused(tmp_path, tokenizer):
    """End to end: `rlhf rm model=<sft model>` interrupted, the SFT model retrained at that
    path, then `--resume`: refused before anything trains (it continued on the new base,
    with the adapters and head trained on the old one)."""
    from rlhf import reward

    base = tmp_path / "sft-model"
    _save_model(base, tokenizer, seed=0)
    good = task.make_corpus(12, seed=1, sentiment_mix={"positive": 1.0})
    bad = task.make_corpus(12, seed=2, sentiment_mix={"negative": 1.0})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": g["prompt"], "chosen": g["completion"],
                                         "rejected": b["completion"]}) + "\n"
                             for g, b in zip(good, bad)))
    cfg = reward.RewardConfig(output_dir=str(tmp_path / "rm"), model=str(base),
                              dataset=str(pairs), batch_size=4, grad_accum_steps=1,
                              epochs=1.0, lora_rank=2, max_length=64, warmup_steps=1,
                              save_every=0, log_every=1, device="cpu")

    def stop(step, _metrics):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reward.train(cfg, on_step=stop)
    assert (tmp_path / "rm" / "checkpoints" / "step-0000001").is_dir()
    _save_model(base, tokenizer, seed=1)
    cfg.resume = True
    with pytest.raises(RunDirectoryError, match=r"model changed since the run started"):
        reward.train(cfg)
    assert [r["step"] for r in _records(tmp_path / "rm" / "metrics.jsonl")] == [1]


# ------------------------------------------------------------------ SIGTERM
def test_sigterm_saves_a_checkpoint_and_the_resume_matches_the_uninterrupted_run(
        tmp_path, tokenizer, corpus):
    """A SIGTERM during SFT (save_every=0: no periodic checkpoint) is turned into the
    interrupt Ctrl-C raises: the stage writes the checkpoint of the step it is at, and the
    resumed run's metrics and weights are the uninterrupted run's, bit for bit (on the CPU).
    Before, the process ended at once and --resume started from step 0."""
    full = sft.train(_sft_config(tmp_path / "full"), model=tiny_llama(tokenizer),
                     tokenizer=tokenizer, examples=corpus)

    def terminate(step, _metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = _sft_config(tmp_path / "cut")
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(cli.Terminated), cli.sigterm_as_interrupt():
        sft.train(cfg, model=tiny_llama(tokenizer), tokenizer=tokenizer, examples=corpus,
                  on_step=terminate)
    assert signal.getsignal(signal.SIGTERM) == previous  # put back after the block
    assert checkpoint.latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step-0000002"
    cfg.resume = True
    resumed = sft.train(cfg, model=tiny_llama(tokenizer, seed=7), tokenizer=tokenizer,
                        examples=corpus)
    assert resumed["steps"] == full["steps"] == 4
    assert _records(tmp_path / "cut" / "metrics.jsonl") == \
        _records(tmp_path / "full" / "metrics.jsonl")
    a = load_state(tmp_path / "full" / "checkpoints" / "step-0000004")["params"]
    b = load_state(tmp_path / "cut" / "checkpoints" / "step-0000004")["params"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_cli_says_a_sigterm_and_exits_143(monkeypatch, capsys, tmp_path):
    """`rlhf <stage>` under SIGTERM: the run's interrupt path, then one line naming SIGTERM
    and the --resume command, exit status 128 + 15."""
    seen = []

    def entry_point(cfg):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt as interrupt:  # where a stage saves its checkpoint
            seen.append(type(interrupt))
            raise
        return {}

    monkeypatch.setattr(sft, "train", entry_point)
    code = cli.main(["sft", f"output_dir={tmp_path / 'run'}", "max_steps=3"])
    assert code == cli.EXIT_TERMINATED == 143 and seen == [cli.Terminated]
    err = capsys.readouterr().err
    assert "rlhf sft: terminated (SIGTERM). Continue with `rlhf sft" in err and "--resume`" in err


@pytest.mark.parametrize("in_file", [False, True])
def test_the_resume_command_an_interrupt_names_runs_the_run_again(monkeypatch, capsys, tmp_path,
                                                                  in_file):
    """A run started with overwrite=true (on the command line or in its config file), then
    interrupted: the `--resume` command the CLI prints must continue it. It repeated
    overwrite=true, which --resume refuses as a contradiction, so the printed command stopped at
    once; and a path with a space came back as two arguments."""
    import shlex

    seen = []

    def entry_point(cfg):
        seen.append(cfg)
        if not cfg.resume:
            raise KeyboardInterrupt
        return {}

    monkeypatch.setattr(sft, "train", entry_point)
    data = tmp_path / "my data.jsonl"
    args = ["sft", f"output_dir={tmp_path / 'run'}", "max_steps=3", f"dataset={data}"]
    if in_file:
        config = tmp_path / "sft.yaml"
        config.write_text("overwrite: true\nlr: 0.001\n")
        args.insert(1, str(config))
    else:
        args.append("overwrite=true")
    assert cli.main(args) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    again = shlex.split(err.split("Continue with `", 1)[1].split("`", 1)[0])
    assert again[0] == "rlhf" and again[-1] == "--resume"
    assert cli.main(again[1:]) == 0, capsys.readouterr().err
    first, resumed = seen
    assert resumed.resume and not resumed.overwrite  # what open_run needs to continue the run
    assert resumed.dataset == str(data) and resumed.output_dir == first.output_dir
    assert (resumed.max_steps, resumed.lr) == (3, first.lr)


# ------------------------------------------------------------------ an interrupt inside a step
class _SignalInsideTheOptimizerStep:
    """Sends SIGINT (what Ctrl-C sends) to this process from inside ``optimizer.step()``,
    between the updates of two parameters: at the ``at``-th in-place ``lerp_`` (AdamW's
    first-moment update, one per parameter and step), through a torch function mode."""

    def __init__(self, at: int):
        from torch.overrides import TorchFunctionMode

        self.calls, self.sent = 0, False
        outer = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if "lerp_" in getattr(func, "__name__", ""):
                    outer.calls += 1
                    if outer.calls == at:
                        outer.sent = True
                        os.kill(os.getpid(), signal.SIGINT)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_an_interrupt_inside_the_optimizer_step_resumes_to_the_uninterrupted_run(
        stage, tmp_path, tokenizer, corpus):
    """Ctrl-C in the middle of step 2's optimizer step: the step is finished (and logged)
    first, its checkpoint saved, and the resumed run equals the uninterrupted one. Before,
    the interrupt left some parameters (and Adam moments) updated and others not, and the
    checkpoint saved them as step 1: the resumed losses differed from step 2 on."""
    from rlhf import reward
    from rlhf.models import LoraSpec, SharedBackbone

    def run(out, **kwargs):
        if stage == "sft":
            return sft.train(_sft_config(out), model=tiny_llama(tokenizer),
                             tokenizer=tokenizer, examples=corpus, **kwargs)
        good = task.make_corpus(16, seed=1, sentiment_mix={"positive": 1.0})
        bad = task.make_corpus(16, seed=2, sentiment_mix={"negative": 1.0})
        pairs = [{"prompt": g["prompt"], "chosen": g["completion"],
                  "rejected": b["completion"]} for g, b in zip(good, bad)]
        cfg = reward.RewardConfig(output_dir=str(out), batch_size=4, grad_accum_steps=1,
                                  epochs=1.0, lr=1e-2, warmup_steps=1, log_every=1,
                                  save_every=0, max_length=48, device="cpu",
                                  resume=kwargs.pop("resume", False))
        backbone = SharedBackbone.from_model(tiny_llama(tokenizer), lora=LoraSpec(rank=2))
        return reward.train(cfg, backbone=backbone, tokenizer=tokenizer,
                            train_pairs=pairs, eval_pairs=pairs[:4], **kwargs)

    def resume(out):
        if stage == "sft":
            cfg = _sft_config(out)
            cfg.resume = True
            return sft.train(cfg, model=tiny_llama(tokenizer), tokenizer=tokenizer,
                             examples=corpus)
        return run(out, resume=True)

    run(tmp_path / "full")
    trained = len(load_state(checkpoint.latest_checkpoint(
        tmp_path / "full" / "checkpoints"))["params"])
    signal_in_step = _SignalInsideTheOptimizerStep(at=trained + trained // 2)
    with pytest.raises(KeyboardInterrupt), signal_in_step.mode:
        run(tmp_path / "cut")
    assert signal_in_step.sent  # inside step 2's optimizer step
    assert checkpoint.latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step-0000002"
    resume(tmp_path / "cut")
    assert _records(tmp_path / "cut" / "metrics.jsonl") == \
        _records(tmp_path / "full" / "metrics.jsonl")
    last = checkpoint.latest_checkpoint(tmp_path / "full" / "checkpoints").name
    a = load_state(tmp_path / "full" / "checkpoints" / last)["params"]
    b = load_state(tmp_path / "cut" / "checkpoints" / last)["params"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ file modes
def test_every_file_a_run_writes_is_readable_by_others(tmp_path, tokenizer):
    """Under the usual umask 022 the run's safetensors files are 0644 like its other files:
    a checkpoint's parameters, a saved model's weights, a backbone's heads and adapters
    (safetensors wrote them 0600)."""
    from rlhf.models import LoraSpec, SharedBackbone

    previous = os.umask(0o022)
    try:
        checkpoint.save_state(tmp_path / "step-0000001", step=1, params={"w": torch.ones(2)})
        model = tiny_llama(tokenizer)
        checkpoint.save_pretrained_atomic(tmp_path / "model", model, tokenizer)
        SharedBackbone.from_model(model, lora=LoraSpec(rank=2)).save(tmp_path / "backbone")
    finally:
        os.umask(previous)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"params.safetensors", "model.safetensors", "heads.safetensors"} <= names
    assert any(p.name.startswith("adapter_model") for p in files)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


# ------------------------------------------------------------------ TensorBoard
def test_tensorboard_hides_the_records_a_resumed_run_logs_again(tmp_path, monkeypatch):
    """metrics.jsonl drops the records past the checkpoint a run resumes from; TensorBoard's
    writer is told the same (purge_step: the first step logged again), or its curves would
    hold both the old and the new values of those steps."""
    made = []

    class FakeWriter:
        def __init__(self, log_dir, **kwargs):
            made.append(kwargs)

        def add_scalar(self, tag, value, global_step=None):
            pass

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(metrics, "_summary_writer_class", lambda: FakeWriter)
    path = tmp_path / "metrics.jsonl"
    with metrics.MetricsLogger(path) as logger:
        for step in range(1, 6):
            logger.log({"loss": 1.0 / step}, step=step)
    with metrics.MetricsLogger(path, append=True, resume_step=3) as logger:
        logger.log({"loss": 0.0}, step=4)
    assert made == [{}, {"purge_step": 4}]
    assert [r["step"] for r in metrics.read_metrics(path)] == [1, 2, 3, 4]


# ------------------------------------------------------------------ settings without effect
@pytest.mark.parametrize("command", ["sft", "rm", "ppo", "grpo"])
def test_max_skipped_steps_without_nonfinite_skip_is_said(command, recwarn):
    """max_skipped_steps caps the steps nonfinite=skip drops; with nonfinite=error (the
    default) the run stops at the first non-finite step, and a max_skipped_steps given was
    ignored without a word. Now a warning names it; with nonfinite=skip, or at the default,
    nothing is said."""
    import importlib

    from rlhf.config import load_config

    stage = cli.STAGES[command]
    config_class = getattr(importlib.import_module(stage.module), stage.config_class)
    with pytest.warns(UserWarning, match=r"^max_skipped_steps=3 has no effect with "
                                         r"nonfinite='error' .* set nonfinite=skip too"):
        load_config(config_class, None, ["max_skipped_steps=3"])
    recwarn.clear()
    load_config(config_class, None, ["max_skipped_steps=3", "nonfinite=skip"])
    load_config(config_class, None, ["max_skipped_steps=10"])
    assert not [w for w in recwarn if "max_skipped_steps" in str(w.message)]


def test_the_pipeline_names_a_stages_max_skipped_steps_as_typed(recwarn):
    """In rlhf pipeline the warning names the stage's setting as typed, once."""
    from rlhf.config import load_config
    from rlhf.pipeline import PipelineConfig

    load_config(PipelineConfig, None, ["reward.max_skipped_steps=2"])
    said = [str(w.message) for w in recwarn if "max_skipped_steps" in str(w.message)]
    assert len(said) == 1 and said[0].startswith(
        "reward.max_skipped_steps=2 has no effect with nonfinite='error'"), said


def test_a_resume_without_a_checkpoint_says_it_starts_again(tmp_path, tokenizer, corpus,
                                                            capsys):
    """A run killed before its first checkpoint (save_every=0, SIGKILL: nothing saved) had
    logged steps; --resume started it again from step 1 without a word. Now it says so, and the
    restarted run is the uninterrupted one."""
    class Killed(BaseException):  # not KeyboardInterrupt: no checkpoint, as after SIGKILL
        pass

    def kill(step, _metrics):
        if step == 2:
            raise Killed

    sft.train(_sft_config(tmp_path / "full"), model=tiny_llama(tokenizer), tokenizer=tokenizer,
              examples=corpus)
    cfg = _sft_config(tmp_path / "cut")
    with pytest.raises(Killed):
        sft.train(cfg, model=tiny_llama(tokenizer), tokenizer=tokenizer, examples=corpus,
                  on_step=kill)
    assert checkpoint.latest_checkpoint(tmp_path / "cut" / "checkpoints") is None
    capsys.readouterr()
    cfg.resume = True
    sft.train(cfg, model=tiny_llama(tokenizer), tokenizer=tokenizer, examples=corpus)
    assert "[sft] --resume: " in capsys.readouterr().out
    assert _records(tmp_path / "cut" / "metrics.jsonl") == \
        _records(tmp_path / "full" / "metrics.jsonl")


def test_an_rl_interrupt_while_the_iterations_record_is_written_names_its_checkpoint_right(
        tmp_path, monkeypatch):
    """A Ctrl-C (or SIGTERM) while the RL stage writes iteration 2's metrics record: the
    snapshot of iteration 1 was saved as step-0000002 (the counter already said 2) and the
    message said 'checkpoint of iteration 2'. The checkpoint is now named by the iteration it
    holds, and the resumed run's numbers are the uninterrupted run's."""
    from rlhf import rl
    from tests.helpers import PROMPTS, rl_config, rl_tokenizer, tiny_backbone

    tokenizer = rl_tokenizer()
    settings = dict(num_iterations=2, save_every=10)
    rl.train(rl_config(tmp_path / "full", **settings), backbone=tiny_backbone(tokenizer),
             tokenizer=tokenizer, prompts=PROMPTS)
    log = metrics.MetricsLogger.log

    def interrupted(self, record, step=None):
        written = log(self, record, step=step)
        if step == 2:
            raise KeyboardInterrupt  # after the record of iteration 2 is out
        return written

    cfg = rl_config(tmp_path / "cut", **settings)
    monkeypatch.setattr(metrics.MetricsLogger, "log", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rl.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS)
    monkeypatch.setattr(metrics.MetricsLogger, "log", log)
    saved = checkpoint.list_checkpoints(tmp_path / "cut" / "grpo" / "checkpoints")
    assert [(p.name, load_state(p)["iteration"]) for p in saved] == [("step-0000001", 1)]
    cfg.resume = True
    rl.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS)
    drop = ("peak_memory_mb",)
    got, want = (
        [{k: v for k, v in r.items() if not (k.endswith("_s") or k in drop)}
         for r in _records(tmp_path / run / "grpo" / "metrics.jsonl")] for run in ("cut", "full"))
    assert got == want


def test_an_rl_interrupt_while_the_record_is_written_after_a_checkpoint_names_the_iteration(
        tmp_path, monkeypatch, capsys):
    """The same interrupt when the previous iteration's checkpoint exists (save_every=1: no
    snapshot is taken, none is written): the message named iteration 3 for the update of
    iteration 2, whose counter was already up."""
    from rlhf import rl
    from tests.helpers import PROMPTS, rl_config, rl_tokenizer, tiny_backbone

    tokenizer = rl_tokenizer()
    log = metrics.MetricsLogger.log

    def interrupted(self, record, step=None):
        written = log(self, record, step=step)
        if step == 2:
            raise KeyboardInterrupt
        return written

    monkeypatch.setattr(metrics.MetricsLogger, "log", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rl.train(rl_config(tmp_path / "cut", num_iterations=3, save_every=1),
                 backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS)
    out = capsys.readouterr().out
    assert "interrupted during the update of iteration 2, which a checkpoint cannot hold" in out
    assert "continues from" in out and "step-0000001" in out


def test_a_resume_after_an_algorithms_preset_changed_is_refused(tmp_path, monkeypatch):
    """run.json kept `clip_ratio: null` (the algorithm's preset), and a resume compared the
    preset with itself: under a version whose preset changed (GSPO's clip went from PPO's 0.2
    to the paper's 3e-4), the run went on with the new clip without a word. run.json now keeps
    the values the preset gave when the run started; a resume under another preset is refused,
    naming the setting that gives the run's value back."""
    from rlhf import rl
    from rlhf.checkpoint import RunDirectoryError, open_run

    config = {"output_dir": str(tmp_path), "algorithm": "gspo", "clip_ratio": None,
              "clip_ratio_high": None, "lr": 0.1}
    with open_run(tmp_path, "ppo", config, resume=False):
        (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    started = dict(rl.PRESETS["gspo"])
    with open_run(tmp_path, "ppo", config, resume=True) as run:  # the same preset: resumes
        assert run.resumed
    monkeypatch.setitem(rl.PRESETS, "gspo", dict(started, clip_ratio=0.2, clip_ratio_high=0.2))
    with pytest.raises(RunDirectoryError) as refused:
        with open_run(tmp_path, "ppo", config, resume=True):
            pass
    message = str(refused.value)
    assert "clip_ratio: null (the gspo preset: 0.2), where the run started with 0.0003" in message
    assert f"clip_ratio={started['clip_ratio']:g} clip_ratio_high=" in message
    given = dict(config, clip_ratio=started["clip_ratio"],
                 clip_ratio_high=started["clip_ratio_high"])
    with open_run(tmp_path, "ppo", given, resume=True) as run:  # the run's values, given
        assert run.resumed


def test_the_resume_command_of_an_nproc_run_keeps_nproc(monkeypatch):
    """A run launched with `--nproc N` resumes with `--nproc N`: the launcher computes the
    command for torchrun's message after a signal, and each rank (started by torchrun without
    the flag) learns N from the environment the launcher set."""
    monkeypatch.delenv(cli._NPROC_ENV, raising=False)
    cfg = sft.SFTConfig()
    assert (cli._resume_command("sft", ["overwrite=true", "dataset=a b.jsonl"], None, cfg, 2)
            == "rlhf sft 'dataset=a b.jsonl' --nproc 2 --resume")
    assert cli._resume_command("sft", ["lr=1"], None, cfg) == "rlhf sft lr=1 --resume"
    monkeypatch.setenv(cli._NPROC_ENV, "4")  # a rank of `--nproc 4`
    assert cli._resume_command("sft", ["lr=1"], None, cfg) == "rlhf sft lr=1 --nproc 4 --resume"
