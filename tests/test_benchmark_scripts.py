"""The benchmark scripts run (smoke mode, CPU) and the harness in benchmarks/common.py is right.

Timing figures are not checked here (the CPU runs the kernels in the Triton interpreter); what is
checked is that each script's rows are well formed, that every case has our implementation and a
peer, that ``run()`` times exactly the cases ``cases()`` lists (the list pytest-benchmark
parametrises over), and the arithmetic and file format of the harness.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from benchmarks import common
from benchmarks.__main__ import discover
from benchmarks.common import Case, result_row, run_cases, save_results

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["bench_gae", "bench_kl", "bench_linear_logprobs", "bench_logprobs", "bench_ppo_loss"]
# Our implementations in each script's rows ("ours", "ours <variant>", or the op's name); every
# other impl is a peer ("unfused", a cuBLAS matmul then our logprobs kernel, is the baseline).
OURS = {"bench_linear_logprobs": {"linear_logprobs", "linear_ppo_loss"}}


def _is_ours(script: str, impl: str) -> bool:
    return impl in OURS.get(script, ()) or impl == "ours" or impl.startswith("ours ")


def test_discover_finds_every_script():
    assert discover() == SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_rows_are_well_formed(script):
    module = importlib.import_module(f"benchmarks.{script}")
    listed = module.cases(smoke=True)
    rows = module.run(smoke=True)
    assert [(r["op"], r["case"], r["impl"]) for r in rows] == \
        [(c.op, c.case, c.impl) for c in listed], "run() must time exactly the cases() list"
    impls_by_case = defaultdict(set)
    for row in rows:
        for key in ("op", "case", "impl"):
            assert isinstance(row[key], str) and row[key], (key, row)
        assert isinstance(row["ms"], float) and math.isfinite(row["ms"]) and row["ms"] > 0, row
        assert "error" not in row, row
        if row.get("gb_per_s") is not None:
            assert row["gb_per_s"] > 0, row
        impls_by_case[(row["op"], row["case"])].add(row["impl"])
    for key, impls in impls_by_case.items():
        assert any(_is_ours(script, i) for i in impls), f"{key}: no implementation of ours"
        assert any(not _is_ours(script, i) for i in impls), f"{key}: no peer"
        assert len(impls) == sum(1 for r in rows if (r["op"], r["case"]) == key), \
            f"{key}: an implementation is listed twice"


@pytest.mark.parametrize("script", SCRIPTS)
def test_gpu_cases_list_without_a_gpu(script):
    """pytest-benchmark collects the GPU cases on any machine: listing them allocates nothing,
    and their ids (op/case/impl) are unique."""
    module = importlib.import_module(f"benchmarks.{script}")
    listed = module.cases(smoke=False)
    names = [c.name for c in listed]
    assert listed and len(set(names)) == len(names)
    for case in listed:
        assert callable(case.make)
        assert case.bytes_moved is None or case.bytes_moved > 0
        assert case.bytes_moved is not None or case.flops is not None, \
            f"{case.name}: neither bytes nor flops, no GB/s or TFLOP/s to report"


def test_cli_smoke_exits_zero():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "bench_kl"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # times under the interpreter are not performance figures: a smoke run says so and prints
    # none (no ms, GB/s, % of floor or memory column), only what ran
    from benchmarks.common import SMOKE_NOTE

    note, header, *table = done.stdout.splitlines()
    assert note == SMOKE_NOTE
    assert header.split() == ["op", "case", "impl", "result"]
    assert table and all(line.split()[-1] == "ran" for line in table)
    assert "kl_penalty" in done.stdout and "shape_rewards" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_without_smoke_on_cpu_says_why():
    done = subprocess.run([sys.executable, "-m", "benchmarks", "bench_kl"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "No CUDA device" in done.stderr and "--smoke" in done.stderr


# ------------------------------------------------------------------------------------------
# benchmarks.common
# ------------------------------------------------------------------------------------------
def test_result_row_derives_bandwidth_from_bytes_and_ms(monkeypatch):
    monkeypatch.setattr(common, "copy_bandwidth_gbps", lambda: None)
    row = result_row("op", "case", "impl", ms=2.0, bytes_moved=4e9, peak_mib=3.5, note="x")
    # 4e9 bytes in 2 ms = 2e12 B/s = 2000 GB/s
    assert row["gb_per_s"] == pytest.approx(2000.0)
    assert row["peak_extra_mib"] == 3.5 and row["note"] == "x"
    assert "floor_ms" not in row and "pct_of_floor" not in row  # no measured copy bandwidth
    assert "gb_per_s" not in result_row("op", "case", "impl", ms=None, bytes_moved=4e9)
    assert "gb_per_s" not in result_row("op", "case", "impl", ms=2.0)


def test_result_row_percent_of_floor(monkeypatch):
    monkeypatch.setattr(common, "copy_bandwidth_gbps", lambda: 1000.0)  # 1 TB/s
    row = result_row("op", "case", "impl", ms=8.0, bytes_moved=4e9)
    assert row["floor_ms"] == pytest.approx(4.0)  # 4e9 B at 1e12 B/s
    assert row["pct_of_floor"] == pytest.approx(50.0)
    assert row["gb_per_s"] == pytest.approx(500.0)


def test_save_results_writes_environment_atomically(tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace

    def recording_replace(src, dst):
        replaced.append((Path(src), Path(dst)))
        assert Path(src).exists() and Path(src) != Path(dst)
        real_replace(src, dst)

    monkeypatch.setattr(common.os, "replace", recording_replace)
    rows = [result_row("gae", "3x33 fp32", "ours", 1.5, 1000)]
    target = tmp_path / "new" / "dir"
    path = save_results("gae", rows, directory=target)
    assert path.parent == target and path.name.startswith("gae-cpu-") and path.suffix == ".json"
    assert replaced == [(replaced[0][0], path)] and replaced[0][0].parent == target
    assert sorted(p.name for p in target.iterdir()) == [path.name]  # no temporary left
    data = json.loads(path.read_text())
    env = data["environment"]
    for key in ("device", "torch", "triton", "git_sha", "date"):
        assert env[key], key
    assert env["device"] == ("cpu" if not torch.cuda.is_available() else env["device"])
    assert env["torch"] == torch.__version__
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", env["git_sha"])
    assert re.match(r"\d{4}-\d\d-\d\dT", env["date"])
    assert path.name.endswith(f"{env['date'][:10]}.json")
    assert data["rows"] == rows
    # A second save of the same name and day replaces the file whole.
    save_results("gae", rows[:0], directory=target)
    assert json.loads(path.read_text())["rows"] == []


def test_run_cases_derives_tflops_and_reports_optional_failures():
    calls = []

    def make_ok():
        calls.append("make")
        return lambda: calls.append("step")

    def make_broken():
        raise TypeError("peer API moved")

    rows = run_cases([
        Case("op", "c", "ours", make_ok, bytes_moved=1e6, flops=1e9, extra={"target_ms": 0.1}),
        Case("op", "c", "peer", make_broken, optional=True),
    ])
    ours, peer = rows
    assert calls.count("make") == 1 and calls.count("step") >= 2
    assert ours["tflops"] == pytest.approx(1e9 / (ours["ms"] * 1e-3) / 1e12)
    assert ours["gb_per_s"] == pytest.approx(1e6 / (ours["ms"] * 1e-3) / 1e9)
    assert ours["target_ms"] == 0.1 and ours["setup_s"] >= 0
    assert peer["ms"] is None and "peer API moved" in peer["error"]
    with pytest.raises(TypeError, match="peer API moved"):
        run_cases([Case("op", "c", "ours", make_broken)])  # ours failing is a bug, not a skip


# ------------------------------------------------------------------------------------------
# benchmarks.host_overhead
# ------------------------------------------------------------------------------------------
def test_host_overhead_smoke_covers_every_op(tmp_path):
    """A few repeats in a fresh process (the kernels must not be the interpreter's): one row
    per public op, every figure positive and finite, fwd+bwd exactly for the differentiable
    ops, and ours really went through Triton's launch path (no timing is asserted)."""
    import rlhf_kernels

    out = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.host_overhead", "--smoke", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    ops = set(rlhf_kernels.__all__) - {"resolve_backend"}
    assert sorted(r["op"] for r in rows) == sorted(ops)
    differentiable = {"bradley_terry_loss", "kl_penalty", "linear_logprobs", "linear_ppo_loss",
                      "logprobs", "ppo_loss_from_logits", "ppo_policy_loss", "ppo_value_loss"}
    for row in rows:
        keys = ["ours_fwd_us", "eager_fwd_us", "ratio_fwd"]
        if row["op"] in differentiable:
            keys += ["ours_fwd_bwd_us", "eager_fwd_bwd_us", "ratio_fwd_bwd"]
            assert row["ours_fwd_bwd_launches"] >= 2, row  # a forward and a backward kernel
        else:
            assert row["ours_fwd_bwd_us"] is None and row["eager_fwd_bwd_us"] is None, row
        assert row["ours_fwd_launches"] >= 1, row
        for key in keys:
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, \
                (key, row)
    header = done.stdout.splitlines()[0].split()
    assert header[:5] == ["op", "ours_fwd_us", "ours_fwd_bwd_us", "eager_fwd_us",
                          "eager_fwd_bwd_us"]
    assert all(op in done.stdout for op in ops)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="checks a process whose kernels are the interpreter's")
def test_host_overhead_refuses_interpreted_kernels():
    """In a process whose kernels are the interpreter's there is no launch path to time: the
    script says so instead of timing the interpreter."""
    import rlhf_kernels  # noqa: F401  (under the interpreter, as the test suite runs it)
    from benchmarks import host_overhead

    with pytest.raises(RuntimeError, match="fresh process"):
        with host_overhead.host_only_launches():
            pass
