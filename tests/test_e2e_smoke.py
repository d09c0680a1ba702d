"""benchmarks/e2e_ppo.py --smoke: the whole PPO iteration runs on a tiny shape on the CPU."""

from __future__ import annotations

import math

from benchmarks import e2e_ppo


def test_smoke_run_reports_every_figure(capsys):
    rows = e2e_ppo.run(smoke=True)
    assert len(rows) == 1
    row = rows[0]
    for key in ("s_per_batch", "response_tok_per_s", "generation_s", "scoring_s", "update_s",
                "predicted_peak_gib"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    stats = row["last_stats"]
    assert all(math.isfinite(v) for v in stats.values())
    cfg = e2e_ppo.SMOKE
    assert stats["response_tokens"] == cfg["batch"] * cfg["response_length"]  # no EOS stop
    assert e2e_ppo.main(["--smoke"]) == 0
    assert "tiny" in capsys.readouterr().out


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
