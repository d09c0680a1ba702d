"""benchmarks/e2e_ppo.py --smoke: the whole PPO iteration runs on a tiny shape on the CPU."""

from __future__ import annotations

import math

from benchmarks import e2e_ppo


def test_smoke_run_reports_every_figure(capsys, monkeypatch):
    # one smoke run, through the command line: its rows are run()'s, recorded on the way out
    returned = []
    original_run = e2e_ppo.run

    def recording_run(*args, **kwargs):
        returned.append(original_run(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(e2e_ppo, "run", recording_run)
    assert e2e_ppo.main(["--smoke"]) == 0
    assert "tiny" in capsys.readouterr().out
    assert len(returned) == 1
    rows = returned[0]
    assert len(rows) == 1
    row = rows[0]
    for key in ("s_per_batch", "response_tok_per_s", "generation_s", "scoring_s", "update_s",
                "predicted_peak_gib"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    stats = row["last_stats"]
    assert all(math.isfinite(v) for v in stats.values())
    cfg = e2e_ppo.SMOKE
    assert stats["response_tokens"] == cfg["batch"] * cfg["response_length"]  # no EOS stop


def test_peer_side_by_side_parses_the_peer_and_computes_ratios(tmp_path):
    """--peer-script: the peer runs as ``script SHAPE PEFT B P R STEPS`` and its RESULT line
    becomes a row with memory / speed ratios against ours; failures become error rows."""
    peer = tmp_path / "peer.py"
    peer.write_text(
        "import json, sys\n"
        "shape, peft, b, p, r, steps = sys.argv[1:]\n"
        "assert (shape, b, p, r, steps) == ('1.5b', '16', '128', '256', '3'), sys.argv\n"
        "print('some log line')\n"
        "print('RESULT ' + json.dumps({'peak_GiB': 65.0, 'sec_per_batch': 20.0,\n"
        "      'response_tokens_per_s': 200.0, 'peft': peft == '1'}))\n")
    cfg = e2e_ppo.E2EConfig(shape="qwen2.5-1.5b")
    row = e2e_ppo.run_peer(str(peer), cfg, peft=False, steps=3)
    assert "error" not in row and row["peer"]["peft"] is False
    assert row["impl"].endswith("full") and row["peak_gib"] == 65.0
    compared = e2e_ppo.compare({"peak_gib": 6.5, "response_tok_per_s": 1000.0}, row)
    assert math.isclose(compared["memory_ratio"], 10.0)
    assert math.isclose(compared["speed_ratio"], 5.0)
    # a crashing peer, a peer that prints no RESULT, a shape the peer does not have
    crash = tmp_path / "crash.py"
    crash.write_text("raise SystemExit('boom')\n")
    failed = e2e_ppo.run_peer(str(crash), cfg)
    assert "exit code 1" in failed["error"] and "boom" in failed["output"]
    assert "memory_ratio" not in e2e_ppo.compare({"peak_gib": 1.0}, failed)
    silent = tmp_path / "silent.py"
    silent.write_text("print('nothing')\n")
    assert "no RESULT" in e2e_ppo.run_peer(str(silent), cfg)["error"]
    llama = e2e_ppo.run_peer(str(peer), e2e_ppo.E2EConfig(shape="llama-3-8b"))
    assert "runs" in llama["error"]
    # extra arguments follow the six, and name the row
    echo = tmp_path / "echo.py"
    echo.write_text("import json, sys\n"
                    "print('RESULT ' + json.dumps({'argv': sys.argv[1:], 'peak_GiB': 1.0}))\n")
    row = e2e_ppo.run_peer(str(echo), cfg, extra_args=("--enable-gc",))
    assert row["peer"]["argv"] == ["1.5b", "1", "16", "128", "256", "3", "--enable-gc"]
    assert row["impl"] == "peer echo.py LoRA --enable-gc"


def test_iteration_floor_counts_the_models_weights():
    """The floor's weight counts agree with the Hugging Face model built from the same config
    (on the meta device), and the old-log-probs forward is counted only when it runs."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf import plan as planner

    for shape in ("qwen2.5-1.5b", "llama-3-8b"):  # tied and untied lm_head
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(planner.hf_config(shape))
        named = dict(model.named_parameters())  # a tied lm_head appears once
        head = model.get_output_embeddings().weight.numel()
        body = sum(p.numel() for n, p in named.items()
                   if "embed_tokens" not in n and "lm_head" not in n)
        cfg = e2e_ppo.E2EConfig(shape=shape, batch=4, minibatch=4, prompt_length=10,
                                response_length=6)
        forward = e2e_ppo.iteration_floor(cfg, uses_recorded=False)
        recorded = e2e_ppo.iteration_floor(cfg, uses_recorded=True, copy_gbps=2000.0,
                                           matmul_tflops=500.0)
        assert forward["decode_bytes"] == 6 * (body + head) * 2  # bf16
        one_forward = 2 * body * 4 * 16 + 2 * head * 4 * 6
        assert forward["scoring_flops"] - recorded["scoring_flops"] == one_forward
        assert forward["update_flops"] == 6 * 2 * body * 4 * 16 + 2 * 2 * head * 4 * 6
        assert "total_s" not in forward
        assert math.isclose(recorded["total_s"], recorded["decode_bytes"] / 2000e9
                            + (recorded["scoring_flops"] + recorded["update_flops"]) / 500e12)


def test_cpu_device_run_writes_a_row_with_peak_rss(tmp_path, monkeypatch):
    """--device cpu: a real run (here the tiny shape) with the reference ops, memory as peak
    RSS, the JSON in --results-dir; one shape only, no --max-memory."""
    import json

    import pytest

    # main() sets this itself for --device cpu; setting it here makes monkeypatch undo it
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    args = ["--device", "cpu", "--shape", "tiny", "--batch", "2", "--prompt-length", "6",
            "--response-length", "4", "--warmup", "0", "--iterations", "1",
            "--results-dir", str(tmp_path)]
    assert e2e_ppo.main(args) == 0
    (path,) = tmp_path.glob("e2e_ppo-cpu-*.json")
    (row,) = json.loads(path.read_text())["rows"]
    assert row["device"] == "cpu" and row["peak_gib"] > 0 and "RSS" in row["memory"]
    assert row["last_stats"]["response_tokens"] == 2 * 4
    # bf16 weights: the old log-probs come from a forward, checked against the recorded ones
    assert row["old_logprobs"] == "forward"
    assert 0 <= row["last_stats"]["recorded_vs_forward_logp_max"] < 6e-2
    for bad in (["--shape", "tiny", "--shape", "qwen2.5-0.5b"], ["--max-memory", "4"]):
        with pytest.raises(SystemExit):
            e2e_ppo.main(["--device", "cpu", *bad])
