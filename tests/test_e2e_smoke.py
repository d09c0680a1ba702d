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
