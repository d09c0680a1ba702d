"""A run owns its output_dir: one run at a time (lock), resume only with the run's own settings
and files (run.json), no silent mixing with or deleting of an earlier run, torn metrics lines,
temp leftovers, checkpoint pruning, file modes, and a summary that survives a kill after the
final checkpoint. The stages run a 1-layer, 16-wide Llama for a few steps (about a second)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from rlhf import checkpoint, metrics, pipeline, ppo, reward, sft, task
from rlhf.checkpoint import RunDirectoryError
from rlhf.config import load_config
from rlhf.models import LoraSpec, SharedBackbone
from tests.helpers import interrupt_at, review_tokenizer, tiny_llama

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.reference_kernels]


@pytest.fixture(scope="module")
def corpus():
    return task.make_corpus(48, seed=3)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return review_tokenizer(corpus, vocab_size=260)


def tiny_model(tokenizer):
    return tiny_llama(tokenizer, 0, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)


def sft_cfg(out, **overrides) -> sft.SFTConfig:
    settings = dict(output_dir=str(out), max_steps=6, batch_size=8, lr=1e-2, warmup_steps=1,
                    log_every=1, save_every=2, max_length=40, device="cpu")
    settings.update(overrides)
    return sft.SFTConfig(**settings)


def run_sft(cfg, tokenizer, corpus, **kwargs):
    return sft.train(cfg, model=tiny_model(tokenizer), tokenizer=tokenizer, examples=corpus,
                     **kwargs)


def steps_of(directory) -> list[int]:
    return [int(p.name.split("-")[1]) for p in checkpoint.list_checkpoints(directory)]


# ---------------------------------------------------------------- item 13: fresh vs existing


def test_fresh_run_refuses_a_directory_holding_a_run_and_overwrite_replaces_it(
        tmp_path, tokenizer, corpus):
    out = tmp_path / "sft"
    first = run_sft(sft_cfg(out, keep_last=None), tokenizer, corpus)
    assert steps_of(out / "checkpoints") == [2, 4, 6]
    old_metrics = (out / "metrics.jsonl").read_text()

    # Before, a second fresh run wrote into the same files; an interrupted shorter run then
    # resumed from the *old* run's step-6 checkpoint and reported its numbers.
    with pytest.raises(RunDirectoryError) as refused:
        run_sft(sft_cfg(out, max_steps=3), tokenizer, corpus)
    message = str(refused.value)
    for needed in (str(out), "already holds a run", "--resume", "output_dir=", "overwrite=true"):
        assert needed in message, (needed, message)
    assert (out / "metrics.jsonl").read_text() == old_metrics  # nothing touched

    # overwrite=true: the old run's files go first; then this run is interrupted and resumed
    (out / "notes.txt").write_text("mine")  # not a run file: left alone
    with pytest.raises(KeyboardInterrupt):
        run_sft(sft_cfg(out, max_steps=3, save_every=0, overwrite=True), tokenizer, corpus,
                on_step=interrupt_at(2))
    assert steps_of(out / "checkpoints") == [2] and (out / "notes.txt").read_text() == "mine"
    assert not (out / "model").exists()
    resumed = run_sft(sft_cfg(out, max_steps=3, save_every=0, resume=True), tokenizer, corpus)
    assert resumed["steps"] == 3 and resumed["final_loss"] != first["final_loss"]
    assert [r["step"] for r in metrics.read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


def test_resume_uses_only_the_files_of_its_own_run(tmp_path, tokenizer, corpus):
    out = tmp_path / "sft"
    with pytest.raises(KeyboardInterrupt):
        run_sft(sft_cfg(out), tokenizer, corpus, on_step=interrupt_at(3))
    # a checkpoint of another run dropped into the directory (copied in by hand)
    other = tmp_path / "other"
    run_sft(sft_cfg(other, max_steps=4), tokenizer, corpus)
    os.replace(other / "checkpoints" / "step-0000004", out / "checkpoints" / "step-0000004")
    with pytest.raises(RunDirectoryError, match=r"step-0000004 was written by another run"):
        run_sft(sft_cfg(out, resume=True), tokenizer, corpus)

    # a directory with run files but no run.json (an older version's run): nothing ties them
    (other / "run.json").unlink()
    with pytest.raises(RunDirectoryError, match=r"holds run files .* but no run.json"):
        run_sft(sft_cfg(other, resume=True), tokenizer, corpus)
    with pytest.raises(RunDirectoryError, match="contradict"):
        run_sft(sft_cfg(other, resume=True, overwrite=True), tokenizer, corpus)


def test_a_run_that_wrote_nothing_does_not_block_a_fresh_start(tmp_path, tokenizer, corpus):
    out = tmp_path / "sft"
    with pytest.raises(ValueError, match="empty"):
        sft.train(sft_cfg(out), model=tiny_model(tokenizer), tokenizer=tokenizer, examples=[])
    assert (out / "run.json").exists()
    assert run_sft(sft_cfg(out, max_steps=2), tokenizer, corpus)["steps"] == 2


# ---------------------------------------------------------------- item 9: changed settings


def test_resume_refuses_changed_settings_and_names_each(tmp_path, tokenizer, corpus):
    out = tmp_path / "sft"
    with pytest.raises(KeyboardInterrupt):
        run_sft(sft_cfg(out), tokenizer, corpus, on_step=interrupt_at(3))
    # Before, the new values were used for the remaining steps (or ignored for a finished
    # stage) while the summary recorded them as the run's settings.
    with pytest.raises(RunDirectoryError) as refused:
        run_sft(sft_cfg(out, resume=True, lr=2e-2, max_steps=8), tokenizer, corpus)
    message = str(refused.value)
    assert "lr: 0.01 -> 0.02" in message and "max_steps: 6 -> 8" in message, message
    assert "warmup_steps" not in message and str(out) in message
    # settings that cannot change a result may differ: checkpoint cadence, retention, a memory
    # cap, and where the run lives
    moved = tmp_path / "moved"
    os.replace(out, moved)
    with (moved / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 4, "loss": 4.9')  # item 11: the kill cut the last record off
    with pytest.warns(UserWarning, match="cut off"):
        done = run_sft(sft_cfg(moved, resume=True, save_every=1, keep_last=1, max_memory=4.0),
                       tokenizer, corpus)
    assert done["steps"] == 6 and steps_of(moved / "checkpoints") == [6]
    assert [r["step"] for r in metrics.read_metrics(moved / "metrics.jsonl")] == list(range(1, 7))


def test_pipeline_resume_refuses_a_changed_stage_setting(tmp_path, monkeypatch):
    out = tmp_path / "pipe"
    stage_runs = []

    def fake_run(cfg, run_dir):  # the stages themselves are tested above and in test_pipeline
        stage_runs.append(cfg.resume)
        (out / "sft").mkdir(exist_ok=True)
        (out / "sft" / "summary.json").write_text(json.dumps({"run_id": run_dir.run_id}))
        return {}

    monkeypatch.setattr(pipeline, "_run", fake_run)
    cfg = pipeline.PipelineConfig(output_dir=str(out), device="cpu")
    pipeline.run(cfg)
    changed = pipeline.PipelineConfig(output_dir=str(out), device="cpu", resume=True)
    changed.sft.lr, changed.ppo.kl_coef = 0.5, 0.2
    with pytest.raises(RunDirectoryError) as refused:
        pipeline.run(changed)
    assert "sft.lr: 0.003 -> 0.5" in str(refused.value)
    assert "ppo.kl_coef: null (the ppo preset: 0.1) -> 0.2" in str(refused.value)
    same = pipeline.PipelineConfig(output_dir=str(out), device="cpu", resume=True)
    same.sft.keep_last = 5  # retention only
    pipeline.run(same)
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        pipeline.run(pipeline.PipelineConfig(output_dir=str(out), device="cpu"))
    pipeline.run(pipeline.PipelineConfig(output_dir=str(out), device="cpu", overwrite=True))
    assert stage_runs == [False, True, False]
    # a finished stage's summary from another run is never reused
    run_dir = checkpoint.RunDirectory(out, "pipeline", "another-run", resumed=True)
    with pytest.raises(RunDirectoryError, match="written by another run"):
        pipeline._stage_done(out / "sft", True, run_dir)


# ------------------------------------------- resuming a run an older version wrote (run.json)
FORMAT1 = json.loads(
    (Path(__file__).resolve().parents[1] / "data" / "run_json_format1.json").read_text())
TODAY = {"sft": sft.SFTConfig, "rm": reward.RewardConfig, "ppo": ppo.PPOConfig,
         "grpo": ppo.GRPOConfig, "pipeline": pipeline.PipelineConfig}


def _flat_keys(config: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in config.items():
        keys |= (_flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict)
                 else {prefix + key})
    return keys


@pytest.mark.parametrize("kind", TODAY)
def test_every_setting_added_since_the_first_run_json_says_what_runs_did_before(kind):
    # A setting that run.json's first format lacks must say which value does what the versions
    # without it did; else a run they wrote can never resume (the old refusal: "(not set) -> x").
    added = _flat_keys(asdict(TODAY[kind]())) - _flat_keys(FORMAT1["ppo" if kind == "grpo"
                                                                     else kind])
    unregistered = {key for key in added if key.rsplit(".", 1)[-1] not in checkpoint.SETTINGS_ADDED}
    assert not unregistered, f"add to checkpoint.SETTINGS_ADDED: {sorted(unregistered)}"


@pytest.mark.parametrize("kind", ["sft", "rm", "ppo", "pipeline"])
def test_a_first_format_run_resumes_with_exactly_the_overrides_the_refusal_names(kind):
    cls = TODAY[kind]
    safe = pipeline._RESUME_SAFE if kind == "pipeline" else checkpoint.RESUME_SAFE_KEYS
    changes = checkpoint.config_changes(FORMAT1[kind], asdict(cls()), safe)
    assert changes and all(override for _, override in changes), changes
    # packing did not exist then: runs were unpacked, which today's default (auto) may not be
    assert any(change.startswith(("packing:", "sft.packing:")) for change, _ in changes)
    # the overrides, as typed after the command, give the run's settings back
    resumed = load_config(cls, None, [override for _, override in changes])
    assert checkpoint.config_changes(FORMAT1[kind], asdict(resumed), safe) == []


def test_algorithm_presets_compare_as_their_values_on_resume():
    grpo = asdict(ppo.GRPOConfig())  # clip_ratio None: the grpo preset's 0.2
    assert checkpoint.config_changes(grpo, asdict(ppo.GRPOConfig(clip_ratio=0.2))) == []
    assert checkpoint.config_changes(grpo, asdict(ppo.GRPOConfig(clip_ratio_high=0.2))) == []
    # a real change is named once (clip_ratio_high follows clip_ratio, but is not reported)
    assert checkpoint.config_changes(grpo, asdict(ppo.GRPOConfig(clip_ratio=0.3))) == [
        ("clip_ratio: null (the grpo preset: 0.2) -> 0.3", "clip_ratio=null")]
    # dapo before dynamic sampling existed did not sample again; today's preset does
    dapo = asdict(ppo.GRPOConfig(algorithm="dapo"))
    written_before = {k: v for k, v in dapo.items() if k != "dynamic_sampling"}
    assert checkpoint.config_changes(written_before, dapo) == [
        ('dynamic_sampling: (not in run.json: before this setting, runs did false) -> null '
         '(the dapo preset: true)',
         "dynamic_sampling=false")]
    assert checkpoint.config_changes(written_before,
                                     asdict(ppo.GRPOConfig(algorithm="dapo",
                                                           dynamic_sampling=False))) == []
    # the preset of the algorithm each side ran: grpo's kl_estimator k3 is not ppo's k1
    assert checkpoint.config_changes(asdict(ppo.PPOConfig()), {**asdict(ppo.PPOConfig()),
                                                               "kl_estimator": "k3"})


def test_resume_refusal_names_the_overrides_and_they_resume(tmp_path):
    run = tmp_path / "run"
    written = {**FORMAT1["sft"], "output_dir": str(run)}
    with checkpoint.open_run(run, "sft", written, resume=False):
        (run / "metrics.jsonl").write_text('{"step": 1}\n')
    today = asdict(sft.SFTConfig(output_dir=str(run), max_length=64, batch_size=32,
                                 grad_accum_steps=1, max_steps=400, lr=3e-3))
    with pytest.raises(RunDirectoryError) as refused:
        with checkpoint.open_run(run, "sft", today, resume=True):
            pass
    assert "add `cpu_threads=null packing=off` to the command" in str(refused.value)
    with checkpoint.open_run(run, "sft", {**today, "cpu_threads": None, "packing": "off"},
                             resume=True) as resumed:
        assert resumed.resumed
    # a setting this version no longer has cannot be given back: said so, no override offered
    with pytest.raises(RunDirectoryError, match="cannot give back every setting"):
        with checkpoint.open_run(run, "sft", {k: v for k, v in today.items() if k != "lr"},
                                 resume=True):
            pass


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_resume_refuses_data_whose_content_changed(tmp_path, kind):
    """run.json fingerprints each local data file or folder (a save_to_disk dataset); a resume
    after its content changed is refused, naming the setting; the same content resumes (also
    after a copy that changes only the modification time), and so do a hub name, a run.json
    without fingerprints (older versions) and nested settings (the pipeline's)."""
    run = tmp_path / "run"
    if kind == "file":
        data = tmp_path / "pairs.jsonl"
        data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
        edit = lambda: data.write_text('{"prompt": "a", "chosen": "c", "rejected": "b"}\n')  # noqa: E731
        restore = lambda: data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')  # noqa: E731
    else:
        data = tmp_path / "saved"
        (data / "train").mkdir(parents=True)
        (data / "train" / "data-00000.arrow").write_bytes(b"1234")
        edit = lambda: (data / "train" / "data-00000.arrow").write_bytes(b"1243")  # noqa: E731
        restore = lambda: (data / "train" / "data-00000.arrow").write_bytes(b"1234")  # noqa: E731
    config = {"reward": {"dataset": str(data), "lr": 1e-4}, "sft": {"dataset": "org/hub-name"}}
    with checkpoint.open_run(run, "pipeline", config, resume=False):
        (run / "metrics.jsonl").write_text('{"step": 1}\n')
    recorded = json.loads((run / "run.json").read_text())["data"]
    assert list(recorded) == ["reward.dataset"]  # the hub name has no local content
    edit()
    with pytest.raises(RunDirectoryError, match=r"the data changed since the run started: "
                                                r"reward\.dataset: '.*' \(\d+ -> \d+ bytes"):
        with checkpoint.open_run(run, "pipeline", config, resume=True):
            pass
    restore()
    os.utime(data, (1, 1))  # only the times differ (a copy): the same data
    with checkpoint.open_run(run, "pipeline", config, resume=True) as resumed:
        assert resumed.resumed
    manifest = json.loads((run / "run.json").read_text())
    del manifest["data"]  # a run.json of an older version: nothing to compare
    (run / "run.json").write_text(json.dumps(manifest))
    edit()
    with checkpoint.open_run(run, "pipeline", config, resume=True) as resumed:
        assert resumed.resumed


@pytest.mark.parametrize("where", ["the model", "inside the model", "inside the base",
                                   "inside the data"])
def test_an_output_dir_in_a_model_the_run_loads_is_refused_before_it_writes(tmp_path, where):
    """A run whose output_dir is (or is inside) a model directory it loads, the base model
    its backbone names, or a data folder it reads, wrote its run.json, checkpoints and metrics
    into that folder: its fingerprint (every file under it) changed, so its own --resume (and
    that of every run on that model) was refused as "the model (data) changed since the run
    started". It is refused at the start now, with nothing written there; an output_dir beside
    the model starts and resumes."""
    base = tmp_path / "sft" / "model"
    base.mkdir(parents=True)
    (base / "config.json").write_text('{"model_type": "llama"}\n')
    backbone = tmp_path / "rm" / "backbone"
    backbone.mkdir(parents=True)
    (backbone / "roles.json").write_text(json.dumps({"base_model": str(base)}))
    data = tmp_path / "data"
    data.mkdir()
    (data / "prompts.jsonl").write_text('{"prompt": "a"}\n')
    model, out, named = {
        "the model": (base, base, "model="),
        "inside the model": (base, base / "runs" / "rm", "model="),
        "inside the base": (backbone, base / "ppo", "the base model"),
        "inside the data": (backbone, data / "runs", "dataset="),
    }[where]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(RunDirectoryError, match=rf"output_dir '{out}' is (inside )?{named}.* "
                                                r"choose an output_dir outside"):
        with checkpoint.open_run(out, "ppo", {"model": str(model), "dataset": str(data)},
                                 resume=False):
            pass
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    beside = tmp_path / "ppo"
    config = {"model": str(model), "dataset": str(data)}
    with checkpoint.open_run(beside, "ppo", config, resume=False):
        (beside / "metrics.jsonl").write_text('{"step": 1}\n')
    with checkpoint.open_run(beside, "ppo", config, resume=True) as resumed:
        assert resumed.resumed


@pytest.mark.parametrize("reads", ["its model", "its backbone's base", "its data"])
def test_overwrite_never_deletes_what_the_new_run_reads(tmp_path, reads):
    """`rlhf ppo model=runs/ppo/backbone output_dir=runs/ppo overwrite=true` (continue from a
    trained policy, in its run's place): overwrite deleted the earlier run's files, the model
    among them, before the run loaded it; the run then stopped on a missing model and the
    trained model was gone. Now refused with nothing deleted; a model elsewhere is replaced
    as before."""
    run = tmp_path / "ppo"
    with checkpoint.open_run(run, "ppo", {"lr": 1e-4}, resume=False):
        (run / "metrics.jsonl").write_text('{"step": 1}\n')
        (run / "backbone").mkdir()
        (run / "backbone" / "roles.json").write_text("{}")
        (run / "model").mkdir()
        (run / "model" / "config.json").write_text("{}")
    outside = tmp_path / "rm_backbone"
    outside.mkdir()
    (outside / "roles.json").write_text(json.dumps({"base_model": str(run / "model")}))
    setting, value, doomed = {
        "its model": ("model", run / "backbone", "backbone"),
        "its backbone's base": ("model", outside, "model"),
        "its data": ("dataset", run / "metrics.jsonl", "metrics.jsonl"),
    }[reads]
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != ".lock")
    with pytest.raises(RunDirectoryError, match=rf"overwrite=true would delete '{run / doomed}'"
                                                rf".* nothing was deleted"):
        with checkpoint.open_run(run, "ppo", {setting: str(value)}, resume=False,
                                 overwrite=True):
            pass
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")
                  if p.name != ".lock") == files
    with checkpoint.open_run(run, "ppo", {"model": str(tmp_path / "elsewhere")}, resume=False,
                             overwrite=True):
        assert not (run / "backbone").exists() and not (run / "metrics.jsonl").exists()


# ---------------------------------------------------------------- item 10: one run per directory


def test_a_second_run_on_the_same_directory_stops_at_once(tmp_path, tokenizer, corpus):
    out = tmp_path / "sft"
    refusals = []

    def second_run(step, _metrics):
        if step == 2:  # the first run is mid-way: a second one starts on the same directory
            with pytest.raises(RunDirectoryError) as refused:
                run_sft(sft_cfg(out, resume=True), tokenizer, corpus)
            refusals.append(str(refused.value))

    first = run_sft(sft_cfg(out), tokenizer, corpus, on_step=second_run)
    assert first["steps"] == 6
    assert "in use by another run" in refusals[0] and f"pid {os.getpid()}" in refusals[0]
    # the first run's metrics are whole: one record per step, none from the second
    assert [r["step"] for r in metrics.read_metrics(out / "metrics.jsonl")] == list(range(1, 7))


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from rlhf.checkpoint import open_run
            with open_run({str(tmp_path)!r}, "sft", {{}}, resume=False):
                print("locked", flush=True)
                time.sleep(60)
        """), "--holder-marker"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryError) as refused:
            with checkpoint.open_run(tmp_path, "sft", {}, resume=True):
                pass
        assert f"pid {holder.pid}" in str(refused.value)
        assert "--holder-marker" in str(refused.value)  # its command line
    finally:
        holder.send_signal(signal.SIGKILL)  # a kill -9: no cleanup code runs
        holder.wait()
    with checkpoint.open_run(tmp_path, "sft", {}, resume=True) as run:
        assert run.directory == tmp_path
    assert (tmp_path / ".lock").read_text() == ""  # released


def test_a_run_never_cleans_or_clears_a_folder_another_run_is_using(tmp_path):
    live_temp = tmp_path / "sft" / "checkpoints" / ".step-0000002.tmp-99-0a0b0c0d"
    with checkpoint.open_run(tmp_path / "sft", "sft", {}, resume=False):
        live_temp.mkdir(parents=True)  # the stage is writing a checkpoint right now
        with pytest.raises(RunDirectoryError, match=r"holds a folder another run is using: "
                                                    rf".*sft \(pid {os.getpid()}"):
            with checkpoint.open_run(tmp_path, "pipeline", {}, resume=False, overwrite=True,
                                     run_files=checkpoint.PIPELINE_RUN_FILES):
                pass
        assert live_temp.is_dir()


def test_the_cli_says_it_in_one_line(tmp_path, capsys):
    from rlhf import cli

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')  # an earlier run's file
    assert cli.main(["sft", f"output_dir={tmp_path}"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("rlhf sft: error: output_dir") and err.count("\n") == 1, err
    assert "overwrite=true" in err and "Traceback" not in err


def test_resume_of_a_directory_without_a_run_says_a_new_run_starts(tmp_path, capsys,
                                                                    monkeypatch):
    # A mistyped output_dir with --resume used to train from scratch without a word.
    from rlhf import cli

    monkeypatch.setattr(sft, "train", lambda cfg: None)  # the stage itself is not under test
    assert cli.main(["sft", f"output_dir={tmp_path / 'typo'}", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "--resume" in err and "holds no run yet" in err and "typo" in err, err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")  # a run to resume: nothing is said
    assert cli.main(["sft", f"output_dir={tmp_path / 'run'}", "--resume"]) == 0
    assert capsys.readouterr().err == ""


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirectoryError, match=r"cannot use output_dir .*file.*writable"):
        with checkpoint.open_run(tmp_path / "file" / "run", "sft", {}, resume=False):
            pass


# ---------------------------------------------------------------- item 11: torn metrics line


def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with metrics.MetricsLogger(path, tensorboard=False) as logger:
        for step in range(1, 4):
            logger.log({"loss": 1.0 / step}, step=step)
    with path.open("a") as handle:
        handle.write('{"step": 4, "loss": 0.2')  # the disk filled up mid-record
    with pytest.warns(UserWarning, match="dropped its last line 4, which is cut off"):
        with metrics.MetricsLogger(path, append=True, resume_step=3, tensorboard=False) as log:
            log.log({"loss": 0.25}, step=4)
    assert metrics.read_metrics(path) == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 1.0 / 3},
        {"step": 4, "loss": 0.25}]
    # also when appending without a resume step: the next record must not glue onto it
    path.write_text('{"step": 1}\n{"st')
    with pytest.warns(UserWarning, match="cut off"):
        with metrics.MetricsLogger(path, append=True, tensorboard=False) as log:
            log.log({}, step=2)
    assert metrics.read_metrics(path) == [{"step": 1}, {"step": 2}]
    # a damaged line in the middle is not a crash's doing: still a clear error
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON .* in the middle of the file"):
        metrics.MetricsLogger(path, append=True, tensorboard=False)
    path.write_text('{"step": 1}\n{"st\n')
    with pytest.raises(ValueError, match="line 2 is not JSON .* its last line"):
        metrics.read_metrics(path)  # plain reading (e.g. a plot) still says what is wrong


# ---------------------------------------------------------------- item 12: leftovers, modes


def test_atomic_writes_give_normal_file_modes(tmp_path):
    previous = os.umask(0o022)
    try:
        checkpoint.atomic_write_text(tmp_path / "a.json", "{}")
        with checkpoint.atomic_directory(tmp_path / "step-0000001") as temp:
            (temp / "x").write_text("x")
        checkpoint.save_state(tmp_path / "step-0000002", step=2, params={"w": torch.ones(2)})
    finally:
        os.umask(previous)

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    # before: mkstemp's 0600 and mkdtemp's 0700, so another user (a server reading the
    # metrics or the model) could not read what the run wrote
    assert mode(tmp_path / "a.json") == 0o644
    assert mode(tmp_path / "step-0000001") == 0o755 and mode(tmp_path / "step-0000002") == 0o755
    assert mode(tmp_path / "step-0000002" / "meta.json") == 0o644


def test_temp_leftovers_of_a_killed_run_are_removed_at_the_next_start(tmp_path):
    ours = [tmp_path / "checkpoints" / ".step-0000004.tmp-4242-0a1b2c3d",  # checkpoint dir
            tmp_path / ".model.tmp-17-deadbeef",  # save_pretrained_atomic / backbone
            tmp_path / ".backbone.old-12ab34cd",  # a replaced directory on its way out
            tmp_path / ".metrics.jsonl.tmp-u8_x9k2q"]  # an older version's temp file
    for path in ours[:3]:
        path.mkdir(parents=True)
        (path / "half.bin").write_bytes(b"x" * 10)
    ours[3].write_text("partial")
    theirs = [tmp_path / ".hidden", tmp_path / "notes.tmp", tmp_path / ".x.tmp-notours"]
    for path in theirs:
        path.write_text("keep")
    with checkpoint.open_run(tmp_path, "sft", {}, resume=True):
        pass
    assert not any(path.exists() for path in ours)
    assert all(path.read_text() == "keep" for path in theirs)


def test_keep_last_prunes_old_checkpoints(tmp_path, tokenizer, corpus):
    # before: every checkpoint was kept (one per save_every steps, each a full copy)
    run_sft(sft_cfg(tmp_path / "a", save_every=1), tokenizer, corpus)
    assert steps_of(tmp_path / "a" / "checkpoints") == [5, 6]  # default keep_last=2
    run_sft(sft_cfg(tmp_path / "b", save_every=1, keep_last=None), tokenizer, corpus)
    assert steps_of(tmp_path / "b" / "checkpoints") == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        sft_cfg(tmp_path / "c", keep_last=0)


def test_a_kill_after_the_final_checkpoint_keeps_the_summary(tmp_path, tokenizer, corpus):
    """The pipeline writes a stage's summary.json after the stage returns; a kill before that
    resumes the stage from its final checkpoint, with no step left to train. Before, that run
    returned final_loss None (the pipeline's sft_final_loss), skipped_steps 0 and, for PPO, no
    last_metrics; the reward model logged its final evaluation twice."""
    out = tmp_path / "sft"
    full = run_sft(sft_cfg(out), tokenizer, corpus)
    again = run_sft(sft_cfg(out, resume=True), tokenizer, corpus)
    for key in ("steps", "final_loss", "skipped_steps"):
        assert again[key] == full[key], key
    assert isinstance(full["final_loss"], float)

    backbone = SharedBackbone.from_model(tiny_model(tokenizer), lora=LoraSpec(rank=2, alpha=4))
    pairs = [{"prompt": a["prompt"], "chosen": a["completion"], "rejected": b["completion"]}
             for a, b in zip(corpus[:24], corpus[24:48])]
    rm_cfg = dict(output_dir=str(tmp_path / "rm"), batch_size=8, epochs=1.0, device="cpu",
                  max_length=40)
    rm_full = reward.train(reward.RewardConfig(**rm_cfg), backbone=backbone,
                           tokenizer=tokenizer, train_pairs=pairs[:16], eval_pairs=pairs[16:])
    rm_metrics = (tmp_path / "rm" / "metrics.jsonl").read_text()
    rm_again = reward.train(reward.RewardConfig(**rm_cfg, resume=True), backbone=backbone,
                            tokenizer=tokenizer, train_pairs=pairs[:16], eval_pairs=pairs[16:])
    assert rm_again == rm_full and isinstance(rm_full["final_loss"], float)
    assert (tmp_path / "rm" / "metrics.jsonl").read_text() == rm_metrics

    ppo_cfg = dict(output_dir=str(tmp_path / "ppo"), num_iterations=1, rollout_batch_size=4,
                   minibatch_size=4, ppo_epochs=1, max_new_tokens=4, max_prompt_length=64,
                   device="cpu")
    prompts = task.all_prompts("train")[:4]
    ppo_full = ppo.train(ppo.PPOConfig(**ppo_cfg), backbone=backbone, tokenizer=tokenizer,
                         prompts=prompts)
    ppo_again = ppo.train(ppo.PPOConfig(**ppo_cfg, resume=True), backbone=backbone,
                          tokenizer=tokenizer, prompts=prompts)
    assert ppo_full["last_metrics"] and ppo_again["last_metrics"] == ppo_full["last_metrics"]
