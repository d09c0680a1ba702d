"""Atomic checkpoints (nothing partial survives a failure), resume helpers, metrics JSONL, plot."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf import checkpoint, metrics


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_bytes_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    checkpoint.atomic_write_text(target, "old")
    assert target.read_text() == "old"

    def failing_replace(src, dst):
        raise OSError("disk full")  # the temp file is complete but never published

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and _leftovers(tmp_path) == []
    checkpoint.atomic_write_bytes(tmp_path / "sub" / "x.bin", b"\x00\x01")
    assert (tmp_path / "sub" / "x.bin").read_bytes() == b"\x00\x01"


@pytest.mark.parametrize("error", [RuntimeError("writer failed"), KeyboardInterrupt()])
def test_atomic_directory_leaves_nothing_partial(tmp_path, error):
    target = tmp_path / "step-0000002"
    with pytest.raises(type(error)):
        with checkpoint.atomic_directory(target) as temp:
            (temp / "half.bin").write_bytes(b"x" * 100)
            raise error  # the writer dies midway
    assert not target.exists() and _leftovers(tmp_path) == []

    # over an existing checkpoint: a failure keeps the old one whole
    with checkpoint.atomic_directory(target) as temp:
        (temp / "a.txt").write_text("first")
    with pytest.raises(type(error)):
        with checkpoint.atomic_directory(target) as temp:
            (temp / "a.txt").write_text("second, partial")
            raise error
    assert [p.name for p in target.iterdir()] == ["a.txt"]
    assert (target / "a.txt").read_text() == "first" and _leftovers(tmp_path) == []
    # and a success replaces it whole
    with checkpoint.atomic_directory(target) as temp:
        (temp / "b.txt").write_text("second")
    assert [p.name for p in target.iterdir()] == ["b.txt"] and _leftovers(tmp_path) == []


def test_save_state_failing_midway_publishes_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"cannot checkpoint state\['config.fn'\] of type "
                                         r"function"):
        checkpoint.save_state(tmp_path / "step-0000001", step=1,
                              params={"w": torch.ones(2)}, config={"fn": lambda: 0})
    assert list(tmp_path.iterdir()) == []
    assert checkpoint.latest_checkpoint(tmp_path) is None


# ---------------------------------------------------------------- state round trip


def _tiny_training_state():
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model(torch.randn(5, 4)).square().mean().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_save_state_round_trip(tmp_path):
    model, optimizer, scheduler = _tiny_training_state()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = {"lr": 1e-2, "output_dir": Path("runs/x"), "targets": ("q", "v"), "kl": None}
    path = checkpoint.save_state(tmp_path / "step-0000007", step=7, params=params,
                                 optimizer=optimizer.state_dict(),
                                 scheduler=scheduler.state_dict(), config=config,
                                 np_value=np.float32(0.5), np_array=np.arange(3),
                                 rng=checkpoint.capture_rng_state())
    assert (path / "params.safetensors").is_file() and (path / "state.pt").is_file()
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 7 and meta["tensor_dicts"] == ["params"]

    state = checkpoint.load_state(path)
    assert state["step"] == 7 and state["np_value"] == 0.5
    assert torch.equal(state["np_array"], torch.arange(3))
    assert state["config"]["output_dir"] == "runs/x" and tuple(state["config"]["targets"]) == (
        "q", "v")
    for name, value in params.items():
        assert torch.equal(state["params"][name], value)
    fresh_model, fresh_optimizer, fresh_scheduler = _tiny_training_state()
    fresh_optimizer.load_state_dict(state["optimizer"])
    fresh_scheduler.load_state_dict(state["scheduler"])
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(fresh_optimizer.state_dict()["state"][0][key], value)
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_save_state_of_a_tied_cpu_model_round_trips(tmp_path):
    # A CPU state_dict of tied embeddings holds one tensor under two names; safetensors
    # refuses shared tensors, so SFT of a Qwen2/GPT-2-shaped model failed at its checkpoint.
    model = torch.nn.Sequential(torch.nn.Embedding(7, 3), torch.nn.Linear(3, 7, bias=False))
    model[1].weight = model[0].weight
    params = model.state_dict()
    assert params["0.weight"].data_ptr() == params["1.weight"].data_ptr()
    path = checkpoint.save_state(tmp_path / "step-0000001", step=1, params=params)
    state = checkpoint.load_state(path)
    assert torch.equal(state["params"]["0.weight"], params["0.weight"])
    assert torch.equal(state["params"]["1.weight"], params["1.weight"])
    fresh = torch.nn.Sequential(torch.nn.Embedding(7, 3), torch.nn.Linear(3, 7, bias=False))
    fresh[1].weight = fresh[0].weight
    fresh.load_state_dict(state["params"])
    assert fresh[0].weight is fresh[1].weight and torch.equal(fresh[0].weight, model[0].weight)


def test_rng_state_round_trip(tmp_path):
    checkpoint.save_state(tmp_path / "step-0000001", rng=checkpoint.capture_rng_state())
    expected = (random.random(), torch.rand(3))
    checkpoint.restore_rng_state(checkpoint.load_state(tmp_path / "step-0000001")["rng"])
    again = (random.random(), torch.rand(3))
    assert expected[0] == again[0] and torch.equal(expected[1], again[1])


def _tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_save_and_load_checkpoint_with_models_and_tokenizer(tmp_path, tied):
    from transformers import AutoTokenizer

    from rlhf import task

    tokenizer = task.train_tokenizer(["It is great.", "It is bad."], vocab_size=300)
    model = _tiny_llama(tied)
    ids = torch.randint(0, 50, (2, 7))
    directory = checkpoint.save_checkpoint(tmp_path / "ckpt" / "step-0000003",
                                           models={"model": model}, tokenizer=tokenizer,
                                           state={"step": 3})
    assert checkpoint.latest_checkpoint(tmp_path / "ckpt") == directory
    other = _tiny_llama(tied)
    assert not torch.allclose(other(ids).logits, model(ids).logits)
    state = checkpoint.load_checkpoint(directory, models={"model": other})
    assert state == {"step": 3}
    torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=0, atol=0)
    loaded = AutoTokenizer.from_pretrained(directory / "tokenizer")
    assert loaded("It is great.")["input_ids"] == tokenizer("It is great.")["input_ids"]
    with pytest.raises(FileNotFoundError, match=r"no weights for model 'critic'; it has "
                                                r"\['model'\]"):
        checkpoint.load_checkpoint(directory, models={"critic": other})
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        checkpoint.load_state(tmp_path)

    final = checkpoint.save_pretrained_atomic(tmp_path / "model", model, tokenizer)
    from transformers import LlamaForCausalLM

    reloaded = LlamaForCausalLM.from_pretrained(final).eval()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert _leftovers(tmp_path) == []


def test_latest_checkpoint_ignores_partial_and_foreign_entries(tmp_path):
    assert checkpoint.latest_checkpoint(tmp_path / "missing") is None
    for step in (9, 10, 2):
        checkpoint.save_state(tmp_path / f"step-{step}", step=step)
    (tmp_path / ".step-11.tmp-123-abc").mkdir()  # a writer that died
    (tmp_path / "step-12").mkdir()  # no state file: not a checkpoint
    (tmp_path / "notes-99").mkdir()
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-10"  # numeric, not text order
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-2", "step-9",
                                                                      "step-10"]
    removed = checkpoint.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["step-2"]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-9", "step-10"]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        checkpoint.prune_checkpoints(tmp_path, keep=0)


# ---------------------------------------------------------------- metrics


def test_metrics_jsonl_round_trip(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with metrics.MetricsLogger(path, tensorboard=False) as logger:
        logger.log({"loss": torch.tensor(0.25), "acc": np.float64(0.5), "n": np.int64(3),
                    "hist": torch.tensor([1, 2]), "name": "sft", "bad": float("nan")}, step=1)
        logger.log({"loss": 0.125}, step=2)
    records = metrics.read_metrics(path)
    assert records[0] == {"step": 1, "loss": 0.25, "acc": 0.5, "n": 3, "hist": [1, 2],
                          "name": "sft", "bad": records[0]["bad"]}
    assert math.isnan(records[0]["bad"]) and records[1] == {"step": 2, "loss": 0.125}
    assert list(records[0])[0] == "step"

    # a fresh run starts a fresh file; append continues it
    with metrics.MetricsLogger(path, append=True, tensorboard=False) as logger:
        logger.log({"loss": 0.1}, step=3)
    assert [r["step"] for r in metrics.read_metrics(path)] == [1, 2, 3]
    with metrics.MetricsLogger(path, tensorboard=False) as logger:
        logger.log({"loss": 9.0}, step=1)
    assert metrics.read_metrics(path) == [{"step": 1, "loss": 9.0}]

    with pytest.raises(ValueError, match="closed"):
        logger.log({"x": 1})
    with metrics.MetricsLogger(tmp_path / "m2.jsonl", tensorboard=False) as other:
        with pytest.raises(ValueError, match="metric 'obj' has a value of type object"):
            other.log({"obj": object()})
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        metrics.read_metrics(tmp_path / "broken.jsonl")


def test_metrics_resume_drops_records_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with metrics.MetricsLogger(path, tensorboard=False) as logger:
        for step in range(1, 6):
            logger.log({"loss": 1.0 / step}, step=step)
    # the run died after logging step 5; its last checkpoint was at step 3
    with metrics.MetricsLogger(path, append=True, resume_step=3, tensorboard=False) as logger:
        for step in range(4, 7):
            logger.log({"loss": 1.0 / step}, step=step)
    assert metrics.read_metrics(path) == [{"step": s, "loss": 1.0 / s} for s in range(1, 7)]


def test_tensorboard_scalars_when_available(tmp_path, monkeypatch):
    written = []

    class FakeWriter:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, global_step=None):
            written.append((tag, value, global_step))

        def flush(self):
            pass

        def close(self):
            written.append(("closed",))

    monkeypatch.setattr(metrics, "_summary_writer_class", lambda: FakeWriter)
    with metrics.MetricsLogger(tmp_path / "m.jsonl") as logger:
        logger.log({"kl": 0.5, "name": "x", "flag": True}, step=4)
    assert written == [("dir", str(tmp_path / "tensorboard")), ("kl", 0.5, 4), ("closed",)]


def _ppo_metrics(path: Path, iterations: int = 12) -> None:
    with metrics.MetricsLogger(path, tensorboard=False) as logger:
        for it in range(1, iterations + 1):
            logger.log({"iteration": it, "proxy_reward": 0.1 * it, "gold_reward": 0.05 * it,
                        "kl": 0.3 * it, "policy/entropy": 2.0 - 0.05 * it,
                        "policy/loss": -0.01 * it, "value/loss": 1.0 / it}, step=it)


def test_plot_curves_writes_a_png(tmp_path):
    import matplotlib.image

    path = tmp_path / "metrics.jsonl"
    _ppo_metrics(path)
    plain = metrics.plot_curves(path, tmp_path / "curves.png")
    assert plain.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [{"prompt": "Review of the tent:", "before": " It is bad. " * 12,
                "after": " It is great!", "gold_before": -0.8, "gold_after": 0.9}] * 3
    with_samples = metrics.plot_curves(path, tmp_path / "with_samples.png", samples=samples)
    height_plain = matplotlib.image.imread(plain).shape[0]
    height_samples = matplotlib.image.imread(with_samples).shape[0]
    assert height_samples > height_plain  # the samples are printed under the curves
    assert _leftovers(tmp_path) == []

    sft_only = tmp_path / "sft.jsonl"
    with metrics.MetricsLogger(sft_only, tensorboard=False) as logger:
        logger.log({"loss": 1.0}, step=1)
    with pytest.raises(ValueError, match=r"no data for any plotted metric.*keys are \['loss', "
                                         r"'step'\]"):
        metrics.plot_curves(sft_only, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()



def test_plot_curves_shows_control_characters_without_font_warnings(tmp_path):
    import json
    import warnings

    from rlhf.metrics import plot_curves

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"iteration": i, "proxy_reward": 0.1 * i})
                                 for i in range(1, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Glyph ... missing from font" would raise here
        plot_curves(metrics, tmp_path / "curves.png",
                    samples=[{"prompt": "p", "before": "bad\x1cbyte", "after": "fine"}])
    assert (tmp_path / "curves.png").stat().st_size > 0
