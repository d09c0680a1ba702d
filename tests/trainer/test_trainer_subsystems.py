"""Defects found by the trainer-subsystems hunt (resume, data, planner, ...): one test per
defect, each failing on the code before its fix. The references are the uninterrupted run, the
file's own lines, and the configuration the run really uses.
"""

from __future__ import annotations

import pytest
import torch

from rlhf import rl, task
from rlhf.checkpoint import latest_checkpoint, load_state
from tests.helpers import PROMPTS, read_jsonl, rl_config, rl_tokenizer, tiny_backbone

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.reference_kernels]


@pytest.fixture(scope="module")
def tokenizer():
    return rl_tokenizer()


# --------------------------------------------------------------------------------------------
# resume: Ctrl-C in the middle of an RL iteration's update
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm, save_every, snapshot", [
    ("ppo", 1, True), ("grpo", 1, True), ("ppo", 10, True), ("grpo", 10, True),
    ("ppo", 10, False)])
def test_ctrl_c_during_an_rl_update_resumes_to_the_uninterrupted_numbers(
        tmp_path, tokenizer, monkeypatch, algorithm, save_every, snapshot):
    """Ctrl-C lands in the update of iteration 2, after its first optimizer step (the update is
    most of an iteration's time). The checkpoint written then labelled weights already stepped
    in iteration 2 as iteration 1, and the resumed run redid iteration 2 on top of its own
    steps: different numbers from iteration 2 on. Now the checkpoint of iteration 1 is written
    from its snapshot, taken just before iteration 2's first step, even where no periodic
    checkpoint (save_every=10) would hold it: only iteration 2 is redone, and the resumed run
    gives the uninterrupted run's numbers. Without the snapshot (a state too large to keep),
    nothing half-done is written and the resume starts from the newest checkpoint (none here:
    from the start), with the same numbers."""
    if not snapshot:
        monkeypatch.setattr(rl, "WHOLE_ITERATION_SNAPSHOT_BYTES", 0)
    settings = dict(num_iterations=3, minibatch_size=2, save_every=save_every)  # 4 steps each
    torch.set_num_threads(1)
    rl.train(rl_config(tmp_path / "full", algorithm, **settings),
             backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS)
    want = read_jsonl(tmp_path / "full" / algorithm / "metrics.jsonl")

    cfg = rl_config(tmp_path / "cut", algorithm, **settings)
    backward = rl.backward_losses
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4 + 3:  # iteration 2, third micro-batch: two optimizer steps done
            raise KeyboardInterrupt
        return backward(*args, **kwargs)

    monkeypatch.setattr(rl, "backward_losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rl.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS)
    monkeypatch.setattr(rl, "backward_losses", backward)
    newest = latest_checkpoint(tmp_path / "cut" / algorithm / "checkpoints")
    if snapshot or save_every == 1:
        assert load_state(newest)["iteration"] == 1
    else:
        assert newest is None
    cfg.resume = True
    rl.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS)
    got = read_jsonl(tmp_path / "cut" / algorithm / "metrics.jsonl")
    assert [r["iteration"] for r in got] == [1, 2, 3]
    for a, b in zip(want, got):
        for key in ("proxy_reward", "kl", "kl_coef", "policy/loss", "response_length"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (key, a, b)


# --------------------------------------------------------------------------------------------
# data: a bad row is said before the model loads, naming the file and its line
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loader, text, where, message", [
    # a row without a field (datasets fills null), after a BOM and blank lines
    ("sft", '\ufeff{"prompt": "a", "completion": "b"}\n\n  \n{"prompt": "c"}\n',
     "line 4", "column 'completion' is missing or null"),
    ("sft", '{"prompt": "a", "completion": "b"}\n{"prompt": 5, "completion": "x"}\n',
     "line 2", "column 'prompt' is int 5"),
    ("sft", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
     '"content": "yo"}]}\n{"messages": [{"role": "user", "content": "hi"}]}\n',
     "line 2", "column 'messages' has no assistant turn"),
    ("pairs", '{"prompt": null, "chosen": "b", "rejected": "c"}\n\n'
     '{"prompt": "a", "chosen": "b", "rejected": null}\n', "line 3",
     "column 'rejected' is missing or null"),
    ("prompts", '{"prompt": "a"}\n{"prompt": [{"role": "user", "content": "x"}]}\n'
     '{"prompt": [{"role": "user"}]}\n', "line 3", "column 'prompt', message 1 is"),
    ("sft_list", '[{"prompt": "a", "completion": "b"},\n {"prompt": "c", "completion": null}]',
     "row 2", "column 'completion' is missing or null"),
])
def test_a_bad_row_is_one_error_naming_the_file_and_line(tmp_path, loader, text, where,
                                                         message):
    """Before: a null or wrong-typed value passed loading and stopped the run after the model
    had loaded, as "row 1: ..." (0-based, no file; "row 1" is the file's line 2, or line 4
    after blank lines). Now loading refuses it, naming the file and the line as an editor
    counts it (a JSON list: the row, from 1)."""
    from rlhf import data

    path = tmp_path / ("rows.json" if loader == "sft_list" else "rows.jsonl")
    path.write_text(text, encoding="utf-8")
    load = {"sft": data.load_sft_dataset, "sft_list": data.load_sft_dataset,
            "pairs": data.load_preference_dataset, "prompts": data.load_prompt_dataset}[loader]
    with pytest.raises(ValueError) as caught:
        load(str(path))
    assert str(caught.value).startswith(f"dataset {str(path)!r} {where}: {message}")
    assert "\n" not in str(caught.value)


def test_good_odd_rows_still_load(tmp_path):
    """A BOM, blank lines, unicode, extra columns and a null preference prompt (no prompt)
    are accepted as before."""
    from rlhf import data

    path = tmp_path / "pairs.jsonl"
    path.write_text('\ufeff{"prompt": "caf\\u00e9 \U0001f600", "chosen": "b", "rejected": "c", '
                    '"extra": 1}\n\n{"prompt": null, "chosen": "b", "rejected": "c"}\n',
                    encoding="utf-8")
    rows = data.load_preference_dataset(str(path))
    assert len(rows) == 2 and rows[0]["prompt"] == "café 😀" and rows[1]["prompt"] is None


def test_the_cli_says_a_bad_row_before_loading_the_model(tmp_path, capsys, monkeypatch):
    from rlhf import cli, loading

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(loading, "load_causal_lm", no_model)
    from tests.helpers import review_tokenizer

    review_tokenizer(task.make_corpus(32, seed=0)).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    rows = tmp_path / "sft.jsonl"
    rows.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    code = cli.main(["sft", f"model={tmp_path / 'model'}", f"dataset={rows}",
                     f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: dataset {str(rows)!r} line 2: column 'completion' is missing" in err


# --------------------------------------------------------------------------------------------
# rlhf plan: settings the run could not use are refused, not planned as something else
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    # the RL stage refuses a rollout batch that is not a multiple of the minibatch; plan
    # planned an update of 8 rows from a rollout of 4
    (["--batch", "4", "--minibatch", "8"], "--batch 4 (the rollout batch) must be a multiple "
                                           "of --minibatch 8"),
    (["--batch", "6", "--minibatch", "4"], "--batch 6 (the rollout batch) must be a multiple"),
    # no quantized base: the flag was dropped without a word (the same figures as without it)
    (["--quantize-lm-head"], "quantization='none' plans a dense one; add --quantization nf4"),
    # one GPU: fsdp2 shards nothing, the figures were ddp's
    (["--strategy", "fsdp2"], "--strategy fsdp2 shards the base over several GPUs and --gpus "
                              "is 1"),
    # the RL stage splits the rollout evenly over the ranks, and a minibatch over them too
    (["--batch", "16", "--gpus", "3"], "--batch 16 over --gpus 3: the RL stage splits the "
                                       "rollout evenly"),
    (["--batch", "16", "--gpus", "4", "--minibatch", "2"], "--minibatch at least --gpus"),
])
def test_plan_refuses_what_it_would_ignore(capsys, argv, message):
    from rlhf import plan

    with pytest.raises(SystemExit) as caught:
        plan.main(["qwen2.5-0.5b", *argv])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_plan_never_plans_a_minibatch_larger_than_the_batch():
    """The card search tries batches below a given minibatch: those update on the batch's
    rows, as the stage would (it cannot take more), and the largest batch reported is one the
    RL stage accepts (a multiple of the minibatch)."""
    from rlhf import plan

    small = plan.plan("qwen2.5-0.5b", batch=2, minibatch=8)
    assert small == plan.plan("qwen2.5-0.5b", batch=2, minibatch=2) | {
        "inputs": small["inputs"]}
    assert small["inputs"]["minibatch"] == 2
    best = plan.fit("qwen2.5-0.5b", 24, batch=8, minibatch=3)["rl"]["batch"]
    assert best > 0 and best % 3 == 0

    def peak(batch):
        return plan.plan("qwen2.5-0.5b", batch=batch, minibatch=3)["peak_bytes"]

    budget = (24 - plan.DEFAULT_RESERVE_GIB) * plan.GIB
    assert peak(best) <= budget < peak(best + 3)
    # over 4 GPUs: a multiple of 4 (the rollout splits evenly), the largest that fits
    best = plan.fit("qwen2.5-0.5b", 24, batch=8, gpus=4)["rl"]["batch"]
    assert best > 0 and best % 4 == 0

    def per_gpu(batch):
        return plan.plan("qwen2.5-0.5b", batch=batch, gpus=4)["peak_bytes"]

    assert per_gpu(best) <= budget < per_gpu(best + 4)
    assert plan.largest_batch("qwen2.5-0.5b", 24 - plan.DEFAULT_RESERVE_GIB, gpus=4) == best


# --------------------------------------------------------------------------------------------
# distributed: a strategy in a one-process run
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_a_strategy_in_a_one_process_run_is_said_to_change_nothing(capsys, monkeypatch,
                                                                  tmp_path, strategy):
    """strategy= picks how several processes share the model; in one process (no --nproc, no
    torchrun) the stages ignore it, which was not said (`rlhf rm strategy=fsdp2` on one GPU
    looked like a sharded run)."""
    from rlhf import cli, reward

    monkeypatch.setattr(reward, "train", lambda cfg: {"stage": "reward"})
    code = cli.main(["rm", f"strategy={strategy}", f"output_dir={tmp_path / 'rm'}"])
    err = capsys.readouterr().err
    assert code == 0
    assert (f"rlhf rm: strategy={strategy} applies to a run of several processes (--nproc N "
            f"or torchrun); this run is one process, where it changes nothing") in err
    code = cli.main(["rm", f"output_dir={tmp_path / 'rm'}"])
    assert code == 0 and "strategy" not in capsys.readouterr().err


def test_plan_takes_every_model_a_stage_takes(tmp_path, monkeypatch):
    """`rlhf ppo model=runs/rm/backbone` and `model=smollm2-135m-instruct` are the README's
    commands; `rlhf plan` refused both ("neither a preset nor a config.json"), and a hub name
    in the local cache too. Each plans as its base model's config.json does."""
    from huggingface_hub import constants

    from rlhf import named_models, plan
    from rlhf.models import LoraSpec, SharedBackbone
    from rlhf.tiny_models import tiny_causal_lm

    model = tiny_causal_lm("qwen2", hidden_size=64, num_layers=3)
    model.config.save_pretrained(tmp_path / "base")
    want = plan.plan(str(tmp_path / "base" / "config.json"), batch=4)
    assert want["inputs"]["params"] > 0

    SharedBackbone.from_model(model, lora=LoraSpec(rank=2, alpha=4)).save(tmp_path / "backbone")
    assert not (tmp_path / "backbone" / "config.json").exists()
    assert plan.plan(str(tmp_path / "backbone"), batch=4) == want

    monkeypatch.setitem(named_models.NAMED_MODELS, "tiny-named", object())
    monkeypatch.setattr(named_models, "model_dir", lambda name, **kw: tmp_path / "base")
    assert plan.plan("tiny-named", batch=4) == want

    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert plan.plan("org/tiny", batch=4) == want
    with pytest.raises(ValueError, match="'org/other' is neither a preset .* nor a hub name in "
                                         "the local Hugging Face cache"):
        plan.plan("org/other")


# --------------------------------------------------------------------------------------------
# resume: Ctrl-C during the reward model's evaluations
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eval_every, cut_at", [(0, 1), (2, 2)],
                         ids=["final_eval", "periodic_eval"])
def test_ctrl_c_during_a_reward_model_evaluation_resumes_to_the_same_run(
        tmp_path, tokenizer, monkeypatch, eval_every, cut_at):
    """final_eval: the evaluation after the last step ran outside the loop's Ctrl-C handler,
    so a Ctrl-C there saved nothing and --resume trained the whole stage again (with the default
    save_every, nothing had been saved). periodic_eval: a Ctrl-C in the evaluation of step 4
    saved step 4 but its metrics record (with the eval numbers) was never written, and the
    resumed run went on from step 5 without it. Now both resume to the uninterrupted run's
    metrics.jsonl and summary."""
    from rlhf import reward
    from tests.helpers import sentiment_pairs

    def config(name):
        return reward.RewardConfig(output_dir=str(tmp_path / name), batch_size=16, epochs=1.0,
                                   grad_accum_steps=1, lr=2e-2, warmup_steps=1, log_every=1,
                                   eval_every=eval_every, device="cpu", max_length=48)

    def run(cfg):
        return reward.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer,
                            train_pairs=sentiment_pairs(64, 0),
                            eval_pairs=sentiment_pairs(16, 7))

    def numbers(records):
        return [{k: v for k, v in r.items() if k not in ("pairs_per_s", "time")}
                for r in records]

    want = run(config("full"))
    want_records = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    evaluate = reward.evaluate
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == cut_at:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(reward, "evaluate", interrupted)
    cfg = config("cut")
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(reward, "evaluate", evaluate)
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints") is not None
    cfg.resume = True
    got = run(cfg)
    assert numbers(read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == numbers(want_records)
    for key in ("steps", "final_loss", "eval_loss", "eval_accuracy"):
        assert got[key] == want[key], key


def test_nproc_gives_a_ranks_error_status_without_torchruns_traceback(capfd, tmp_path,
                                                                     monkeypatch):
    """`rlhf sft ... --nproc 2` with bad input: each rank says its one error line and exits 2,
    and torchrun then ended with status 1 and a ChildFailedError traceback box under it. Now the
    launch ends with the ranks' status (2, as without --nproc) and no traceback. The command
    _launch_torchrun builds runs with a stand-in rank (a script that fails as a rank does)
    instead of `-m rlhf ...`, which would cost two processes importing the trainer."""
    import subprocess

    from rlhf import cli

    rank = tmp_path / "rank.py"
    rank.write_text("import sys\nprint('rlhf rm: error: seed=-1 ...', file=sys.stderr)\n"
                    "sys.exit(2)\n")
    launched = []
    # the launcher becomes torchrun (exec): recorded here instead
    monkeypatch.setattr(cli.os, "execv", lambda path, command: launched.append(command))
    cli._launch_torchrun(2, ["rm", "seed=-1", "--nproc", "2"])
    command, = launched
    tail = command.index("-m", 3)  # the `-m rlhf rm seed=-1` after torchrun's own options
    assert command[tail:] == ["-m", "rlhf", "rm", "seed=-1"]
    monkeypatch.undo()
    code = subprocess.call([*command[:tail], str(rank)])
    err = capfd.readouterr().err
    # the first rank to fail makes torchrun stop the other, which may go before it prints
    assert "rlhf rm: error: seed=-1" in err
    assert code == 2
    assert "Traceback" not in err and "ChildFailedError" not in err


def test_a_prompt_too_long_is_named_by_its_file_line(tmp_path, tokenizer):
    """The RL stage refuses prompts longer than max_prompt_length before the backbone loads;
    the error gave their count and the longest length, not which rows to shorten or remove."""
    import json

    from rlhf import data

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "a short one"}) + "\n\n"
                    + json.dumps({"prompt": "word " * 60}) + "\n"
                    + json.dumps({"prompt": "word " * 70}) + "\n")
    prompts = [row["prompt"] for row in data.load_prompt_dataset(str(path))]
    with pytest.raises(ValueError) as caught:
        rl.encode_prompts(prompts, tokenizer, 20, source=str(path))
    message = str(caught.value)
    assert message.startswith("2 of 3 prompts are longer than max_prompt_length=20 tokens")
    first = len(data.encode_prompt(prompts[1], tokenizer))
    assert f"the first is dataset {str(path)!r} line 3, {first} tokens" in message
    with pytest.raises(ValueError, match=f"the first is prompt 2, {first} tokens"):
        rl.encode_prompts(prompts, tokenizer, 20)


# --------------------------------------------------------------------------------------------
# config files: a key given twice
# --------------------------------------------------------------------------------------------
def test_a_config_key_given_twice_is_refused_with_both_lines(tmp_path, capsys):
    """yaml.safe_load keeps the last of two equal keys: a file with `lr: 1e-3` and further
    down `lr: 2e-3` trained at 2e-3 without a word. Now it is one error naming both lines; YAML
    merge keys (`<<: *base`, then a key over it) still work."""
    from rlhf import cli
    from rlhf.config import load_config
    from rlhf.sft import SFTConfig

    path = tmp_path / "sft.yaml"
    path.write_text("lr: 1.0e-3\nmax_steps: 3\nlr: 2.0e-3\n")
    assert cli.main(["sft", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert (f"rlhf sft: error: config file {str(path)!r} is not valid YAML at line 3, column 1: "
            f"the key 'lr' is given twice (first at line 1)") in err
    path.write_text("sft:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    assert cli.main(["pipeline", str(path), "--print-config"]) == 2
    assert "at line 3, column 3: the key 'lr' is given twice (first at line 2)" in \
        capsys.readouterr().err
    merged = tmp_path / "merged.yaml"
    merged.write_text("<<: {lr: 1.0e-3, max_steps: 3}\nlr: 2.0e-3\n")
    cfg = load_config(SFTConfig, merged)
    assert cfg.lr == 2.0e-3 and cfg.max_steps == 3


# --------------------------------------------------------------------------------------------
# frontier: a point interrupted in its RL run, and two kl_coefs naming one point
# --------------------------------------------------------------------------------------------
def test_frontier_resume_continues_an_interrupted_point(tmp_path, monkeypatch):
    """`rlhf frontier --resume` kept the finished points but started an interrupted point's RL
    run afresh (resume=false) in its directory, which holds that run: refused ("holds another
    run ... overwrite=true"), so the frontier could not be resumed past it. Now the point's RL
    run resumes from its checkpoint and the point's figures equal the uninterrupted ones."""
    from dataclasses import replace

    from rlhf import frontier
    from rlhf.models import LoraSpec, SharedBackbone
    from tests.helpers import (
        OWN_MODEL_SHAPE,
        interrupt_at,
        micro_config,
        review_tokenizer,
        tiny_llama,
    )

    base_dir = tmp_path / "base"
    tokenizer = review_tokenizer(task.make_corpus(64, seed=0))
    tokenizer.save_pretrained(base_dir / "tokenizer")
    model = tiny_llama(tokenizer, **OWN_MODEL_SHAPE)
    model.save_pretrained(base_dir / "sft" / "model")
    SharedBackbone.from_model(model, lora=LoraSpec(rank=4, alpha=8)).save(
        base_dir / "rm" / "backbone")

    def config(name, **overrides):
        return frontier.FrontierConfig(output_dir=str(tmp_path / name), algorithms=("grpo",),
                                       kl_coefs=(0.1,), num_iterations=2, device="cpu",
                                       eval_samples=4, base=micro_config(tmp_path / "unused"),
                                       **overrides)

    want = frontier._run_point(config("full"), "grpo", 0.1, base_dir, 0.0, 1.0)
    train = rl.train

    def interrupted(*args, **kwargs):
        return train(*args, on_iteration=interrupt_at(1), **kwargs)

    monkeypatch.setattr(rl, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        frontier._run_point(config("cut"), "grpo", 0.1, base_dir, 0.0, 1.0)
    monkeypatch.setattr(rl, "train", train)
    got = frontier._run_point(replace(config("cut"), resume=True), "grpo", 0.1, base_dir, 0.0,
                              1.0)
    assert got["iterations"] == 2
    for key in ("gold_mean", "kl_mean", "proxy_mean", "gold_gain"):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key


def test_frontier_refuses_two_kl_coefs_of_one_point():
    """Two kl_coefs that name one point (0.1 twice, or 0.1 and 0.1000001, both 'kl0.1') ran
    the second into the first's directory after the first had trained: refused there, an hour
    into a real frontier. Now refused when the config is read, as a repeated algorithm is."""
    from rlhf import frontier

    for coefs in ((0.1, 0.1), (0.1, 0.1000001)):
        with pytest.raises(ValueError, match=r"kl_coefs=\[0.1, 0.1.*\] name one point twice "
                                             r"\(grpo-kl0.1\)"):
            frontier.FrontierConfig(algorithms=("grpo",), kl_coefs=coefs)


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_chat_rows_without_a_chat_template_are_said_before_the_model_loads(
        tmp_path, capsys, monkeypatch, stage):
    """Chat rows (message lists) with a tokenizer that has no chat template stopped the run
    after the model had loaded, as "this row is a chat ..." (no file, no row). Now they are
    refused before, naming the file and line of the first chat row."""
    from rlhf import cli, loading, models
    from tests.helpers import review_tokenizer

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(loading, "load_causal_lm", no_model)
    monkeypatch.setattr(models.SharedBackbone, "from_pretrained", no_model)
    review_tokenizer(task.make_corpus(32, seed=0)).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    user = '{"role": "user", "content": "hi"}'
    reply = '{"role": "assistant", "content": "yo"}'
    rows = tmp_path / "rows.jsonl"
    if stage == "sft":
        rows.write_text(f'\n{{"messages": [{user}, {reply}]}}\n')
        column, line = "messages", 2
    else:
        rows.write_text(f'{{"prompt": [{user}], "chosen": [{reply}], "rejected": [{reply}]}}\n')
        column, line = "prompt", 1
    code = cli.main([stage, f"model={tmp_path / 'model'}", f"dataset={rows}",
                     f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert (f"error: dataset {str(rows)!r} line {line}: column {column!r} is a chat (a list of "
            f"messages) but the tokenizer has no chat template") in err


def test_chat_prompts_without_a_chat_template_name_their_row(tokenizer):
    from rlhf import data

    prompts = ["a", [{"role": "user", "content": "hi"}]]
    with pytest.raises(ValueError, match="^row 2: column 'prompt' is a chat"):
        data.check_chat_rows(prompts, tokenizer)
    data.check_chat_rows(["a", "b"], tokenizer)  # no chat row: nothing to say


@pytest.mark.parametrize("text, where, message", [
    ('{"prompt": "a", "completion": "b"}\n\n'
     '{"prompt": [{"role": "user", "content": "hi"}], "completion": "b"}\n', "line 3",
     "column 'prompt' is a list here and a string on line 1 of rows.jsonl"),
])
def test_a_column_of_mixed_kinds_names_the_line(tmp_path, text, where, message):
    """Strings in some rows and message lists in others: `datasets` refused the file with
    Arrow's "JSON parse error: Column(/prompt) changed from string to array in row 1" (a row
    number within a block of the file). Now the error names the line where the kind changes
    and the line of the first kind."""
    from rlhf import data

    path = tmp_path / "rows.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError) as caught:
        data.load_sft_dataset(str(path))
    assert str(caught.value) == (
        f"could not read dataset {str(path)!r}: {path} {where}: {message}; a column holds one "
        f"kind of value in every row (e.g. all strings, or all lists of chat messages)")


def test_a_save_to_disk_folder_loads_as_its_rows(tmp_path):
    """A folder written by `datasets`' save_to_disk (the library's own local format) was read
    as a folder of JSON files: its metadata (state.json, dataset_info.json) as rows, ending in
    a 30-line CastError. Now it loads as the dataset it holds (a DatasetDict: its train split),
    and its rows are checked like any others."""
    import datasets

    from rlhf import data

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                          "test": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "dict"))
    assert data.load_sft_dataset(str(tmp_path / "one")).to_list() == rows
    assert data.load_sft_dataset(str(tmp_path / "dict")).to_list() == rows[:1]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "no_train"))
    with pytest.raises(ValueError, match=r"is a DatasetDict without a 'train' split; its splits "
                                         r"are \['test'\]"):
        data.load_sft_dataset(str(tmp_path / "no_train"))
    datasets.Dataset.from_list([rows[0], {"prompt": "c", "completion": None}]).save_to_disk(
        str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"'.*bad' row 2: column 'completion' is missing"):
        data.load_sft_dataset(str(tmp_path / "bad"))


def test_csv_files_load_as_text_and_name_their_lines(tmp_path):
    """CSV was refused ("expected .json, .jsonl or .parquet"). It loads now, every cell as text
    (a completion "5" stays the string "5", as the tokeniser needs), and a bad row is named by
    the line its record starts on (a quoted field may span lines; blank lines are skipped)."""
    from rlhf import data

    path = tmp_path / "rows.csv"
    path.write_text('prompt,completion\n"What is 2+3?",5\n"two\nlines",x\n')
    rows = data.load_sft_dataset(str(path))
    assert rows.to_list() == [{"prompt": "What is 2+3?", "completion": "5"},
                              {"prompt": "two\nlines", "completion": "x"}]
    path.write_text('prompt,completion\n"two\nlines",x\n\n"c",\n')
    with pytest.raises(ValueError, match=r"rows.csv' line 5: column 'completion' is missing"):
        data.load_sft_dataset(str(path))
    (tmp_path / "more.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(ValueError, match="mixes CSV and JSON files"):
        data.load_sft_dataset(str(tmp_path))


def test_pairs_with_the_same_chosen_and_rejected_are_said(tokenizer):
    """A pair whose chosen and rejected are the same text states no preference (its
    Bradley-Terry loss is log 2 whatever the model, its gradient 0): it was trained on without
    a word. Now a warning counts them and names the first; distinct pairs say nothing."""
    import warnings

    from rlhf import data

    pairs = [{"prompt": "p", "chosen": " good", "rejected": " bad"},
             {"prompt": "p", "chosen": " same", "rejected": " same"},
             {"prompt": "q", "chosen": " same", "rejected": " same"}]
    with pytest.warns(UserWarning, match=r"2 of 3 preference pairs have the same chosen and "
                                         r"rejected tokens \(the first: row 2\)"):
        data.tokenize_preferences(pairs, tokenizer, max_length=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.tokenize_preferences(pairs[:1], tokenizer, max_length=32)


def test_a_hub_dataset_without_a_hub_is_said_from_the_cache_alone(monkeypatch):
    """dataset=org/name with no network: `datasets` retried its connections for half a minute
    before failing (models are said within seconds: rlhf.loading.hub_offline_reason). Now the
    hub is probed first and, when it cannot be used, the dataset is looked up in the datasets
    cache alone (offline mode) and the error says why the hub was not tried."""
    import datasets
    from huggingface_hub import constants

    from rlhf import data, loading

    seen = []

    def load_dataset(*args, **kwargs):
        seen.append((datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE))
        raise FileNotFoundError("Dataset org/nothere is not cached")

    before = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(loading, "hub_offline_reason", lambda: "no connection (test)")
    with pytest.raises(ValueError, match=r"could not load dataset 'org/nothere': it is not a "
                                         r"local file, not in the datasets cache, and the hub "
                                         r"cannot be used: no connection \(test\)"):
        data.load_sft_dataset("org/nothere")
    assert seen == [(True, True)]
    assert (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE) == before
    monkeypatch.setattr(loading, "hub_offline_reason", lambda: None)  # a hub: asked as before
    with pytest.raises(ValueError, match="loading it from the Hugging Face hub failed"):
        data.load_sft_dataset("org/nothere")
    assert seen[1] == before


def test_a_saved_backbone_given_where_a_model_goes_is_named_so(tmp_path):
    """`rlhf rm model=runs/rm/backbone` (or sft): the error said the directory "has no
    config.json ... check the path", though the path is right and holds a backbone. Now it says
    what the directory is and names the base model its roles.json records."""
    from rlhf.models import LoraSpec, SharedBackbone, resolve_pretrained
    from rlhf.tiny_models import tiny_causal_lm

    backbone = SharedBackbone.from_model(tiny_causal_lm("llama"), lora=LoraSpec(rank=2, alpha=4),
                                         name_or_path="/models/sft")
    backbone.save(tmp_path / "backbone")
    with pytest.raises(ValueError, match=r"model='.*backbone' is a saved backbone \(adapters and "
                                         r"heads, roles.json\), not a causal LM; this setting "
                                         r"takes a model directory, such as its base "
                                         r"'/models/sft'"):
        resolve_pretrained(str(tmp_path / "backbone"))


def test_a_run_directory_given_where_its_model_goes_names_the_model_inside(tmp_path):
    """`rlhf rm model=runs/sft` (the SFT run's directory, not its model): the error said the
    folder is no Hugging Face model directory and to check the path; now it names the model
    folder the run wrote. A folder without a run.json keeps the generic error."""
    from rlhf.loading import resolve_pretrained
    from rlhf.tiny_models import tiny_causal_lm

    run = tmp_path / "runs" / "sft"
    tiny_causal_lm("llama").save_pretrained(run / "model")
    (run / "run.json").write_text("{}")
    with pytest.raises(ValueError, match=r"model='.*sft' is a run's directory, not a model: did "
                                         r"you mean model='.*sft/model'\?"):
        resolve_pretrained(str(run))
    (run / "run.json").unlink()
    with pytest.raises(ValueError, match="is not a Hugging Face model directory"):
        resolve_pretrained(str(run))
    assert resolve_pretrained(str(run / "model")) == (str(run / "model"), {})


@pytest.mark.parametrize("command, module", [("sft", "sft"), ("rm", "reward"),
                                             ("pipeline", "pipeline")])
def test_output_dir_under_home_is_not_a_folder_named_tilde(tmp_path, monkeypatch, command,
                                                          module):
    """`output_dir=~/runs/x` (quoted, in a YAML file, or from a shell that does not expand it)
    wrote the run into a folder literally named '~' in the current directory, while model= and
    dataset= read ~ as the home directory. Now output_dir is the home directory's too."""
    import importlib

    from rlhf import cli

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    seen = []
    stage = importlib.import_module(f"rlhf.{module}")
    entry = "run" if module == "pipeline" else "train"
    monkeypatch.setattr(stage, entry, lambda cfg: seen.append(cfg.output_dir) or {})
    assert cli.main([command, "output_dir=~/runs/x"]) == 0
    assert seen == [str(tmp_path / "home" / "runs" / "x")]
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize("loader", ["sft", "pairs", "prompts"])
def test_rows_under_a_key_of_one_json_object_are_said_so(tmp_path, loader):
    """{"data": [rows]} is read by `datasets` as one row of one column 'data': the error said
    the columns were wrong and to rename them, though the rows' columns were right, one level
    down (and the CLI has no field= setting). Now it says where the rows are and how to write
    the file."""
    import json

    from rlhf import data

    row = {"sft": {"prompt": "a", "completion": "b"},
           "pairs": {"prompt": "a", "chosen": "b", "rejected": "c"},
           "prompts": {"prompt": "a"}}[loader]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"data": [row, row]}))
    load = {"sft": data.load_sft_dataset, "pairs": data.load_preference_dataset,
            "prompts": data.load_prompt_dataset}[loader]
    with pytest.raises(ValueError) as caught:
        load(str(path))
    assert str(caught.value) == (
        f"dataset {str(path)!r} is one JSON object holding its rows under the key 'data' (their "
        f"columns: {sorted(row)}), which reads as one row of one column 'data'; write the rows "
        f"as a list at the top of the file, or one JSON object per line (.jsonl)")
    path.write_text(json.dumps([row, row]))
    assert len(load(str(path))) == 2


def test_held_out_pairs_that_are_also_training_pairs_are_said(tmp_path, tokenizer):
    """Duplicate pairs in the data land on both sides of the held-out split (or a separate eval
    file repeats training pairs): the held-out accuracy then partly measures memorised pairs,
    without a word. Now a warning counts them (compared by their tokens)."""
    import warnings

    from rlhf import reward
    from tests.helpers import sentiment_pairs

    pairs = sentiment_pairs(24, 0)
    train = reward.encode_pairs(pairs, tokenizer, 48)
    # 5 held-out pairs: 3 of them training pairs (one twice), 2 new ones
    held_out = [pairs[3], pairs[7], pairs[7], *sentiment_pairs(2, 9)]
    assert reward._pairs_also_in(reward.encode_pairs(held_out, tokenizer, 48), train) == 3
    cpu = torch.device("cpu")
    assert reward._pairs_also_in(train.select(torch.arange(5, 24), cpu),
                                 train.select(torch.arange(5), cpu)) == 0

    def run(name, eval_pairs):
        cfg = reward.RewardConfig(output_dir=str(tmp_path / name), batch_size=8, epochs=0.3,
                                  device="cpu", max_length=48)
        reward.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer,
                     train_pairs=pairs, eval_pairs=eval_pairs)

    with pytest.warns(UserWarning, match=r"\[rm\] 3 of 5 held-out pairs are also training "
                                         r"pairs \(the same tokens\)"):
        run("leak", held_out)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*held-out pairs are also training pairs")
        run("clean", sentiment_pairs(4, 9))
