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
import textwrap
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks import common
from benchmarks.__main__ import discover
from benchmarks.common import Case, result_row, run_cases, save_results

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ["bench_advantages", "bench_gae", "bench_grpo_loss", "bench_kl", "bench_linear_logprobs",
           "bench_logprobs", "bench_packing", "bench_ppo_loss"]
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
            # (the losses' eager backward is torch ops: one Bradley-Terry launch in all)
            assert row["ours_fwd_bwd_launches"] >= row["ours_fwd_launches"], row
        else:
            assert row["ours_fwd_bwd_us"] is None and row["eager_fwd_bwd_us"] is None, row
        assert row["ours_fwd_launches"] >= 1, row
        for side in ("ours", "eager"):  # kernels per call: counted, the backward's included
            fwd, fwd_bwd = row[f"{side}_fwd_kernels"], row[f"{side}_fwd_bwd_kernels"]
            assert isinstance(fwd, int) and fwd >= 1, row
            assert (fwd_bwd is None) == (row["op"] not in differentiable), row
            assert fwd_bwd is None or fwd_bwd > fwd, row
        assert row["ours_fwd_kernels"] >= row["ours_fwd_launches"], row
        for key in keys:
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, \
                (key, row)
    header = done.stdout.splitlines()[0].split()
    assert header[:5] == ["op", "ours_fwd_us", "ours_fwd_bwd_us", "eager_fwd_us",
                          "eager_fwd_bwd_us"]
    assert all(op in done.stdout for op in ops)


def test_kernels_per_call_counts_what_a_gpu_would_launch():
    """Closed forms: each computing aten op is one kernel (the backward's included), views,
    ``set_`` and bare allocations none."""
    from benchmarks import host_overhead

    x = torch.randn(8, requires_grad=True)
    y = torch.randn(8)
    assert host_overhead.kernels_per_call(lambda: x.view(2, 4).t()) == 0
    assert host_overhead.kernels_per_call(lambda: torch.empty(8)) == 0
    assert host_overhead.kernels_per_call(lambda: (y.exp() + 1).sum()) == 3
    # forward: mul, sum; backward: ones_like (the seed), expand (a view) then mul by y
    assert host_overhead.kernels_per_call(
        lambda: torch.autograd.grad((x * y).sum(), [x])) == 4


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


# ------------------------------------------------------------------------------------------
# benchmarks.compile_check: every kernel compiled for sm_90 on the CPU
# ------------------------------------------------------------------------------------------
def test_compile_check_compiles_each_specialisation_for_sm90(tmp_path):
    """A subset (the Bradley-Terry and GAE calls with fp32 inputs: their forward and finish
    kernels at small and real sizes) compiled for sm_90 in a fresh process; the whole matrix
    takes minutes (``python -m benchmarks.compile_check``)."""
    out = tmp_path / "compile.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_check", "--kernels", "bradley_terry_loss",
         "gae", "--fp32-only", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    kernels = {row["kernel"] for row in result["rows"]}
    # the finish kernel runs only past 2048 pairs: the size matrix reaches it (Bradley-Terry's
    # backward is a torch multiply on either path: no kernel of ours)
    assert kernels == {"_bradley_terry_fwd_kernel", "_bradley_terry_finish_kernel",
                       "_gae_fwd_kernel"}, kernels
    assert result["call_errors"] == []
    assert all(row["ok"] and row["regs"] > 0 and row["arch"] == "sm_90"
               for row in result["rows"]), result["rows"]
    # one specialisation per distinct binary: GAE's block sizes follow the shape
    gae_blocks = {row["constexprs"]["BLOCK_T"] for row in result["rows"]
                  if row["kernel"] == "_gae_fwd_kernel"}
    assert len(gae_blocks) >= 3, gae_blocks
    assert "0 failed" in done.stdout


def test_compile_check_fails_when_a_kernel_does_not_compile():
    """The failure path: a compile error is reported with its kernel and exits 1."""
    script = textwrap.dedent("""
        import os, sys
        os.environ["TRITON_INTERPRET"] = "0"  # compiled-mode kernels (benchmarks/__init__.py)
        os.environ.pop("RLHF_KERNELS_POISON", None)
        from benchmarks import compile_check

        def broken(launch, arch):  # what triton.compile raises on a kernel it rejects
            raise RuntimeError(f"PassManager::run failed for {launch.name}")

        compile_check.compile_sass = broken
        sys.exit(compile_check.main(["--kernels", "gae"]))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED _gae_fwd_kernel sm_90" in done.stdout and "PassManager" in done.stdout


def test_e2e_busy_seconds_and_profiled_stage_clock():
    """The device-busy measurement behind e2e_ppo --profile-stages: the union of intervals (a
    closed form), and a profiled stage's busy time on the CPU lies within its wall time and
    covers the matmuls it ran."""
    from benchmarks import e2e_ppo

    assert e2e_ppo.busy_seconds([]) == 0.0
    assert e2e_ppo.busy_seconds([(3, 4), (0, 1), (0.5, 2), (3.5, 3.6), (2, 2.5)]) == 3.5
    clock = e2e_ppo.ProfiledStageClock(torch.device("cpu"), ("update",))
    a = torch.randn(384, 384)
    with clock.stage("update"):
        for _ in range(20):
            a = torch.tanh(a @ a)
    with clock.stage("rollout"):  # not profiled
        a = a @ a
    assert set(clock.busy) == {"update"} and set(clock.seconds) == {"update", "rollout"}
    assert 0 < clock.busy["update"] <= clock.seconds["update"]
    top = clock.top["update"]
    assert {row["name"] for row in top} >= {"aten::matmul", "aten::tanh"}
    tanh = next(row for row in top if row["name"] == "aten::tanh")
    assert tanh["calls"] == 20 and tanh["ms"] > 0


def test_e2e_autocast_is_the_trainers(monkeypatch):
    """e2e_ppo runs under the autocast `rlhf ppo` uses (rlhf/rl.py: bf16 on CUDA when the
    weights are bf16) in all three stages, unless --autocast off."""
    from benchmarks import e2e_ppo

    cfg = e2e_ppo.E2EConfig(shape="tiny", batch=2, minibatch=2)
    assert cfg.autocast == "auto" and e2e_ppo.autocast_dtype(cfg) is torch.bfloat16
    assert e2e_ppo.autocast_dtype(replace(cfg, autocast="off")) is None
    assert e2e_ppo.autocast_dtype(replace(cfg, device="cpu")) is None
    assert e2e_ppo.autocast_dtype(replace(cfg, dtype="float32")) is None
    with pytest.raises(ValueError, match="autocast='on'"):
        e2e_ppo.E2EConfig(shape="tiny", batch=2, minibatch=2, autocast="on")
    seen = {}
    smoke = e2e_ppo.E2EConfig(**{**e2e_ppo.SMOKE, "device": "cpu"})
    monkeypatch.setattr(e2e_ppo, "autocast_dtype", lambda c: torch.bfloat16)
    for name in ("make_rollout", "backward_losses"):
        real = getattr(e2e_ppo, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen[_name] = (torch.is_autocast_enabled("cpu"), args[3:4], kwargs)
            return _real(*args, **kwargs)
        monkeypatch.setattr(e2e_ppo, name, spy)
    e2e_ppo.run_case(smoke)
    assert seen["make_rollout"][0] is True  # scoring under autocast
    assert seen["backward_losses"][1] == (torch.bfloat16,)  # the update's autocast dtype


def test_e2e_decode_compare_times_the_rollout_per_mode():
    """--decode-compare: after the timed iterations, the rollout alone on a fresh engine per
    mode, its first call and one timed call, against the timed iterations' generation time."""
    from benchmarks import e2e_ppo

    cfg = e2e_ppo.E2EConfig(**{**e2e_ppo.SMOKE, "decode_compare": ("none",)})
    seen = []  # the row as it grows: timed first, the comparison last
    row = e2e_ppo.run_case(cfg, on_row=lambda r: seen.append(set(r)))
    assert len(seen) == 2 and "decode_compare" not in seen[0] and "decode_compare" in seen[1]
    got = row["decode_compare"]["none"]
    assert got["response_tokens"] == cfg.batch * cfg.response_length
    assert got["first_call_s"] > 0 and got["generation_s"] > 0
    assert got["vs_main"] == pytest.approx(row["generation_s"] / got["generation_s"])
    assert got["fell_back_to_eager"] is False
    with pytest.raises(ValueError, match="decode_compare"):
        e2e_ppo.E2EConfig(**{**e2e_ppo.SMOKE, "decode_compare": ("fast",)})


def test_static_sass_records_a_configuration_already_launched():
    """static_sass compiles each launch it records; a pipelining depth equal to the default
    (whose kernel a CachedLaunch already holds) is recorded too (it raised IndexError)."""
    script = textwrap.dedent("""
        import json
        from benchmarks import static_sass
        from rlhf_kernels.ops import logprobs
        k = logprobs._launch_config(151936)[2]
        print(json.dumps([k, static_sass.sass_rows(stages=(k,))]))
    """)
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # compiled-mode kernels
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    default_stages, rows = json.loads(done.stdout.splitlines()[-1])
    assert [r["case"].split(" bf16")[0] for r in rows] == ["logprobs fwd", "logprobs bwd"] * 3
    assert rows[-1]["num_stages"] == default_stages and rows[-1]["regs"] > 0
    assert all(r["local_bytes"] == 0 for r in rows)  # no spills


def test_trl_fused_head_peer_loads_from_a_wheel_without_trl_installed(tmp_path, monkeypatch):
    """The GPU image has no TRL: the benchmarks' TRL peer is the kernel file of a carried wheel,
    loaded alone, with the vocabulary chunk width TRL's trainers pass it."""
    trl = pytest.importorskip("trl")
    site = Path(trl.__file__).resolve().parent.parent
    if not (site / "trl" / "kernels" / "chunked_logprob.py").is_file():
        pytest.skip("this TRL has no fused lm head")
    import zipfile

    wheel = tmp_path / "trl-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in ("trl/kernels/chunked_logprob.py", "trl/trainer/utils.py"):
            source = (site / name).read_text()
            if name.endswith("utils.py"):  # a width only the wheel has: read from it, not assumed
                source = re.sub(r"^_CHUNKED_LOGPROB_CHUNK_SIZE\s*=.*$",
                                "_CHUNKED_LOGPROB_CHUNK_SIZE = 48", source, flags=re.MULTILINE)
            archive.writestr(name, source)
    (tmp_path / "trl-0.1.0-py3-none-any.whl").write_bytes(b"")  # older and broken: not read
    for name in [m for m in sys.modules if m == "trl" or m.startswith("trl.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    assert common.trl_fused_head(tmp_path / "empty") is None
    function, width = common.trl_fused_head(tmp_path)
    assert width == 48 and "trl" not in [m.split(".")[0] for m in sys.modules if sys.modules[m]]
    # Triton's @jit reads the source through inspect: the module must be a file on disk (an
    # exec'd string failed on the H200 with "@jit functions should be defined in a Python file")
    import inspect

    source_file = Path(inspect.getsourcefile(function))
    assert source_file.read_text() == (site / "trl/kernels/chunked_logprob.py").read_text()
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(100, 16, dtype=torch.float64)
    labels = torch.randint(0, 100, (37,))
    logp = function.apply(hidden, weight, None, labels, 1.0, width, None, 1.0, ())[0]
    expected = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, labels[:, None])[:, 0]
    torch.testing.assert_close(logp.double(), expected, rtol=1e-5, atol=1e-5)
    # the backward imports TRL's ZeRO-3 gather helper from its package (`..trainer.utils`): the
    # H200 proof's forward + backward row failed on it ("attempted relative import with no known
    # parent package"); outside ZeRO-3 the helper is a null context
    upstream = torch.randn(37, dtype=torch.float64)
    (grad,) = torch.autograd.grad((logp.double() * upstream).sum(), hidden)
    (want,) = torch.autograd.grad((expected * upstream).sum(), hidden)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5)



# ------------------------------------------------------------------------------------------
# scripts/gpu_check.sh proof, benchmarks.proof and benchmarks.report (no GPU needed)
# ------------------------------------------------------------------------------------------
GPU_CHECK = REPO / "scripts" / "gpu_check.sh"
PROOF_PARTS = ["tests", "logprobs", "ppo_loss", "gae", "kl", "linear", "grpo", "e2e-1.5b",
               "e2e-0.5b", "e2e-8b"]


def test_gpu_check_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _plan(*parts: str, **env) -> list[str]:
    done = subprocess.run(["bash", str(GPU_CHECK), *parts], cwd=REPO, capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "GPU_CHECK_DRY_RUN": "1", **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_gpu_check_proof_dry_run_plans_every_part_within_nine_minutes():
    import shlex

    lines = _plan("proof", WHEELHOUSE="/nonexistent")
    steps = {}
    for line in lines:
        found = re.match(r"\[plan\] (\S+)\s+budget\s+(\d+) s: (.*)$", line)
        if found:
            steps[found[1]] = (int(found[2]), found[3])
    # priority order: a run cut off anywhere keeps the most important results
    assert list(steps) == [*PROOF_PARTS, "report"]
    setup_s = 20
    assert setup_s + sum(budget for budget, _ in steps.values()) <= 9 * 60
    # the budgets in the script header are the ones the plan uses
    header = GPU_CHECK.read_text().split("set -uo pipefail")[0]
    documented = (REPO / "benchmarks" / "README.md").read_text()
    for part, (budget, _) in steps.items():
        assert re.search(rf"#\s+{re.escape(part)}\s+{budget} s\s", header), part
        assert f"| {part} | {budget} s |" in documented, part  # benchmarks/README's table
    argv = {part: shlex.split(command) for part, (_, command) in steps.items() if part != "report"}
    tests = argv["tests"]
    assert tests[1:3] == ["-m", "pytest"] and any(a.startswith("--junitxml=") for a in tests)
    test_files = [a for a in tests if a.startswith("tests/")]
    assert test_files[0] == "tests/kernels/test_logprobs.py"
    assert all((REPO / f.split("::")[0]).is_file() for f in test_files)
    # the node ids name tests that exist (a renamed test would silently select nothing)
    for node in (f for f in test_files if "::" in f):
        path, name = node.split("::")
        assert f"def {name.split('[')[0]}(" in (REPO / path).read_text(), node
    for part in ("logprobs", "ppo_loss", "gae", "kl", "linear", "grpo"):
        assert argv[part][1:3] == ["-m", "benchmarks.proof"] and "--budget-s" in argv[part]
        soft = float(argv[part][argv[part].index("--budget-s") + 1])
        assert soft < steps[part][0], part  # the case in flight ends before the hard timeout
        module = argv[part][argv[part].index("bench") + 1]
        assert importlib.import_module(f"benchmarks.{module}").cases(smoke=False)
    # the one large linear shape is a case the script really lists
    linear = argv["linear"]
    match = linear[linear.index("--match") + 1]
    from benchmarks import bench_linear_logprobs

    impls = {c.impl for c in bench_linear_logprobs.cases(smoke=False) if match in c.name}
    assert {"linear_logprobs", "linear_ppo_loss", "unfused", "ppo-unfused",
            "linear_logprobs row-sweep"} <= impls
    if common.trl_fused_head() is not None:  # TRL's fused head, fwd and fwd+bwd
        trl = [c.name for c in bench_linear_logprobs.cases(smoke=False)
               if match in c.name and c.impl == "trl-chunked"]
        assert len(trl) == 2, trl
    for part, shape in (("e2e-1.5b", "qwen2.5-1.5b"), ("e2e-0.5b", "qwen2.5-0.5b")):
        cmd = argv[part]
        assert cmd[1:3] == ["-m", "benchmarks.e2e_ppo"] and cmd[cmd.index("--shape") + 1] == shape
    cmd = argv["e2e-1.5b"]  # TRL's PPOTrainer beside ours at the design bar's shape
    assert cmd[cmd.index("--peer-script") + 1] == "benchmarks/peers/trl_ppo_peer.py"
    assert (REPO / "benchmarks/peers/trl_ppo_peer.py").is_file()
    assert float(cmd[cmd.index("--peer-timeout") + 1]) < steps["e2e-1.5b"][0]
    assert "--profile-stages" in argv["e2e-0.5b"] and "--profile-stages" not in argv["e2e-1.5b"]
    small = argv["e2e-0.5b"]
    assert "--compare-torch-compile" in small and "--peer-script" not in small
    big = argv["e2e-8b"]
    assert big[big.index("--shape") + 1] == "llama-3-8b"
    assert big[big.index("--max-memory") + 1] == "24" and "--peer-script" not in big
    assert any("benchmarks.report" in line and "--write" in line for line in lines)


def test_gpu_check_proof_parts_selects_parts_and_keeps_the_other_rows(tmp_path):
    """PROOF_PARTS reruns the parts it names; proof_parts.tsv keeps the other parts' rows of
    the last run and replaces the rerun ones."""
    lines = _plan("proof", WHEELHOUSE="/nonexistent", PROOF_PARTS="tests e2e-0.5b")
    planned = [re.match(r"\[plan\] (\S+)", line)[1] for line in lines if "budget" in line]
    assert planned == ["tests", "e2e-0.5b", "report"], planned
    assert any("benchmarks.proof tests" in line for line in lines)
    old, new = "a" * 40, "b" * 40
    previous = (f"setup\tok\t21\t20\t{old}\ntests\tfailed (exit 1)\t65\t75\t{old}\n"
                f"kl\tok\t30\t30\t{old}\ne2e-0.5b\ttimed out at 80 s\t82\t80\t{old}\n"
                f"e2e-8b\tok\t43\t70\n")  # (a log from before the SHA column)
    (tmp_path / "results" / "logs").mkdir(parents=True)
    (tmp_path / "results" / "logs" / "proof_parts.tsv").write_text(previous)
    done, parts, results, _, readme = _stub_proof(
        tmp_path, PROOF_PARTS="tests e2e-0.5b", keep_results=True, RLHF_GIT_SHA=new)
    assert done.returncode == 0, done.stdout + done.stderr
    assert parts == {"kl": "ok", "e2e-8b": "ok", "trl-peer": parts["trl-peer"], "setup": "ok",
                     "tests": "ok", "e2e-0.5b": "ok"}
    calls = (tmp_path / "calls").read_text()
    assert "qwen2.5-0.5b" in calls and "qwen2.5-1.5b" not in calls and "bench_kl" not in calls
    # each part row keeps the commit it ran at; the README's parts table shows it
    summary = json.loads(next(results.glob("proof_summary-*.json")).read_text())
    shas = {row["case"]: row.get("git_sha") for row in summary["rows"]}
    assert shas == {"kl": old, "e2e-8b": None, "trl-peer": new, "setup": new, "tests": new,
                    "e2e-0.5b": new}
    text = readme.read_text()
    assert re.search(r"\| kl \| ok \| 30 \| 30 \| [0-9-]+ \| `aaaaaaa` \|", text), text
    assert re.search(r"\| tests \| ok \| \d+ \| 75 \| [0-9-]+ \| `bbbbbbb` \|", text)


def test_gpu_check_dry_run_keeps_the_other_parts():
    lines = _plan("tests", "kernels", "e2e", "e2e-8b")
    text = "\n".join(lines)
    assert "-m pytest -q -rs" in text and "-m benchmarks " in text and "--sweep" in text
    assert "--shape qwen2.5-0.5b --shape qwen2.5-1.5b" in text and "--peer-full" in text
    assert "--shape llama-3-8b --max-memory 24" in text
    wheels = _plan("wheels")
    assert "pip download --no-deps --only-binary=:all: --python-version 3.12" in wheels[0]
    assert "trl==1.12.0" in wheels[0]


def test_gpu_check_refuses_without_a_gpu_or_an_unknown_part():
    if not torch.cuda.is_available():
        done = subprocess.run(["bash", str(GPU_CHECK), "proof"], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and "no CUDA device" in done.stderr
    done = subprocess.run(["bash", str(GPU_CHECK), "speed"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "GPU_CHECK_DRY_RUN": "1"})
    assert done.returncode == 2 and "unknown part 'speed'" in done.stderr


# A stand-in for python3 that says there is a GPU and fakes the GPU work: pytest writes a JUnit
# file, bench_kl fails, e2e_ppo writes a result file; the summary and the report are real.
_STUB = r"""#!/usr/bin/env bash
echo "$*" >>"$STUB_CALLS"
case "$1" in
-c) case "$2" in *cuda.is_available*) exit 0 ;; *PYTHONPATH*) echo "$PYTHONPATH"; exit 0 ;;
    *"import trl"*) [ -n "${STUB_TRL:-}" ] && { echo "$STUB_TRL"; exit 0; }
                    echo "No module named trl" >&2 ;;
    esac; exit 1 ;;
-) cat >/dev/null; echo "FAKE GPU | torch 0"; exit 0 ;;
esac
case "$2" in
pytest)
    for a in "$@"; do case "$a" in --junitxml=*) xml=${a#--junitxml=} ;; esac; done
    sleep "${STUB_TEST_SLEEP:-0}"
    printf '%s' "$STUB_JUNIT" >"$xml"
    exit 0 ;;
benchmarks.proof)
    case " $* " in *" bench "*) case " $* " in *" bench_kl "*) exit 3 ;; esac; exit 0 ;; esac
    exec "$REAL_PY" "$@" ;;
benchmarks.report) exec "$REAL_PY" "$@" ;;
benchmarks.e2e_ppo)
    prev=""; for a in "$@"; do
        [ "$prev" = --results-dir ] && dir=$a; [ "$prev" = --shape ] && shape=$a; prev=$a; done
    echo "${STUB_E2E//SHAPE/$shape}" >"$dir/e2e_ppo-FAKE_GPU-2030-01-01.json"
    exit 0 ;;
esac
exit 0
"""
_STUB_JUNIT = (
    '<testsuites><testsuite><testcase classname="tests.kernels.test_logprobs" name="a" time="1.5"/>'
    '<testcase classname="tests.kernels.test_gae_whiten" name="b" time="0.5">'
    '<failure message="off by 1e-3"/></testcase></testsuite></testsuites>')
_STUB_E2E = json.dumps({
    "environment": {"device": "FAKE GPU", "date": "2030-01-01T00:00:00+00:00",
                    "git_sha": "7" * 40},
    "rows": [{"op": "e2e_ppo", "case": "SHAPE", "impl": "rlhf shared-LoRA r=16", "peak_gib": 1.5,
              "s_per_batch": 2.0, "response_tok_per_s": 2048.0}]})


def _stub_proof(tmp_path, keep_results=False, **env):
    stub = tmp_path / "python3"
    stub.write_text(_STUB)
    stub.chmod(0o755)
    results, out = tmp_path / "results", tmp_path / "out"
    results.mkdir(exist_ok=keep_results)
    out.mkdir()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.BEGIN}\nold\n{report.END}\n\nafter\n")
    done = subprocess.run(
        ["bash", str(GPU_CHECK), "proof"], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHON": str(stub), "REAL_PY": sys.executable,
             "STUB_CALLS": str(tmp_path / "calls"), "GPU_CHECK_RESULTS": str(results),
             "GPU_CHECK_README": str(readme), "OUT": str(out), "WHEELHOUSE": "/nonexistent",
             "PEER_PYTHON": str(stub), "STUB_JUNIT": _STUB_JUNIT, "STUB_E2E": _STUB_E2E,
             **env})
    parts = [line.split("\t") for line in (results / "logs" / "proof_parts.tsv").read_text()
             .splitlines()]
    return done, {p[0]: p[1] for p in parts}, results, out, readme


def test_gpu_check_proof_runs_every_part_records_and_reports(tmp_path):
    """The whole proof on a stand-in interpreter: parts in order, a failing part does not stop
    the rest, the missing TRL peer is said, e2e files get their shape in the name, the summary
    and the CUDA test results become result files, the README block and $OUT are written."""
    import tarfile

    done, parts, results, out, readme = _stub_proof(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr  # bench_kl failed
    assert list(parts) == ["trl-peer", "setup", *PROOF_PARTS]
    assert parts["kl"] == "failed (exit 3)" and parts["trl-peer"].startswith("not run: ")
    assert all(parts[p] == "ok" for p in PROOF_PARTS if p != "kl")
    assert "TRL peer not run" in done.stderr and "No module named trl" in done.stderr
    calls = (tmp_path / "calls").read_text()
    assert "--peer-script" not in calls
    names = sorted(p.name.rsplit("-", 4)[0] for p in results.glob("*.json"))
    assert names == ["cuda_tests", "e2e_ppo_llama-3-8b", "e2e_ppo_qwen2.5-0.5b",
                     "e2e_ppo_qwen2.5-1.5b", "proof_summary"]
    tests = json.loads(next(results.glob("cuda_tests-*.json")).read_text())["rows"]
    assert [(r["case"], r["passed"], r["failed"]) for r in tests] == [
        ("tests/kernels/test_gae_whiten.py", 0, 1), ("tests/kernels/test_logprobs.py", 1, 0)]
    assert tests[0]["failures"] == ["b: off by 1e-3"]
    text = readme.read_text()
    assert text.startswith("# x\n\n") and text.endswith("\n\nafter\n") and "old" not in text
    assert "#### FAKE GPU" in text and "| qwen2.5-1.5b | rlhf shared-LoRA r=16 |" in text
    assert "failed (exit 3)" in text  # the parts table
    with tarfile.open(out / "gpu_check_results.tgz") as packed:
        assert any(n.startswith("results/e2e_ppo_llama-3-8b-") for n in packed.getnames())


def test_gpu_check_proof_installs_the_carried_wheels_for_the_peer_alone(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "trl-1.12.0-py3-none-any.whl").write_bytes(b"")
    site = tmp_path / "peer site"
    # 100 s in all (10 for the report): e2e-1.5b finds ~85 s of its 100 left, and the cut is
    # taken from the peer (its 65 s become ~50); e2e-0.5b still has its 80 s, the peer its 45
    done, parts, _, _, _ = _stub_proof(tmp_path, WHEELHOUSE=str(wheels), PEER_SITE=str(site),
                                       STUB_TRL="1.12.0", PROOF_TOTAL_S="100")
    assert "trl-peer" not in parts and parts["e2e-1.5b"] == "ok", done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert any(c.startswith("-m pip install -q --no-index --no-deps") and f"--target {site} "
               in c and c.endswith("trl-1.12.0-py3-none-any.whl") for c in calls)
    wrapper = Path(f"{site}-python")
    e2e = [c for c in calls if c.startswith("-m benchmarks.e2e_ppo")]
    assert [c.split("--shape ")[1].split()[0] for c in e2e] == [
        "qwen2.5-1.5b", "qwen2.5-0.5b", "llama-3-8b"]
    peer = "--peer-script benchmarks/peers/trl_ppo_peer.py --peer-python " + str(wrapper)
    assert f"{peer} --peer-steps 2 --peer-timeout " in e2e[0]
    assert 25 <= int(e2e[0].split("--peer-timeout ")[1].split()[0]) < 65
    assert "--peer" not in e2e[1] and "--peer" not in e2e[2]  # TRL beside the 1.5B run only
    # the wrapper runs the same interpreter with the wheels' folder first on its path
    probe = subprocess.run([str(wrapper), "-c", "show PYTHONPATH"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": "/x", "STUB_CALLS": os.devnull})
    assert probe.returncode == 0 and probe.stdout == f"{site}:/x\n", probe.stderr


def test_gpu_check_proof_timeout_cuts_a_part_and_skips_the_rest(tmp_path):
    done, parts, results, _, _ = _stub_proof(tmp_path, PROOF_TOTAL_S="17",
                                             STUB_TEST_SLEEP="60", STUB_TRL="1.16.0")
    assert done.returncode == 1
    assert parts["trl-peer"].startswith("not run: ") and "has trl 1.16.0, the peer needs 1.12.0" \
        in parts["trl-peer"]
    assert re.fullmatch(r"timed out at [5-7] s", parts["tests"]), parts  # 17 s - 10 s reserve
    assert all(parts[p] == "skipped: no time left" for p in PROOF_PARTS[1:]), parts
    assert "skipped: no time left" in next(results.glob("proof_summary-*.json")).read_text()


# ------------------------------------------------------------------------------------------
# benchmarks.proof: case selection, priority, per-case saving, the budget
# ------------------------------------------------------------------------------------------
def test_proof_bench_runs_ours_first_saves_each_case_and_honours_the_budget(tmp_path, monkeypatch):
    from benchmarks import bench_kl, proof

    saved = []
    real_save = common.save_results

    def recording_save(name, rows, directory=None):
        saved.append((name, [r["impl"] for r in rows]))
        return real_save(name, rows, directory)

    monkeypatch.setattr(common, "save_results", recording_save)
    rows = proof.run_bench("bench_kl", match=("3x33 float32 fwd |",), smoke=True,
                           directory=tmp_path, save_as="kl_proof")
    listed = [c.impl for c in bench_kl.cases(smoke=True) if "3x33 float32 fwd |" in c.name]
    assert sorted(listed) == sorted(r["impl"] for r in rows) and len(rows) == 2
    assert [r["impl"] for r in rows] == ["ours", "eager"]  # ours first, whatever the listing
    # a file after every case, then the final one
    assert saved == [("kl_proof", ["ours"]), ("kl_proof", ["ours", "eager"]),
                     ("kl_proof", ["ours", "eager"])]
    assert bench_kl.cases is not None and bench_kl.run_cases is common.run_cases  # restored
    stored = json.loads(next(tmp_path.glob("kl_proof-*.json")).read_text())
    assert [r["impl"] for r in stored["rows"]] == ["ours", "eager"]
    # a spent budget: the cases not started are rows that say so, none is timed
    rows = proof.run_bench("bench_kl", match=("3x33",), smoke=True, directory=tmp_path,
                           budget_s=0.0)
    assert rows and all(r["ms"] is None and r["error"].startswith("not run: the part's time "
                                                                  "budget") for r in rows)
    with pytest.raises(SystemExit, match="no case matches"):
        proof.run_bench("bench_kl", match=("no such case",), smoke=True, directory=tmp_path)


def test_proof_bench_records_a_failing_case_and_goes_on(tmp_path, monkeypatch):
    from benchmarks import bench_gae, proof

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access\nmore")

    real_cases = bench_gae.cases

    def cases(smoke=False):
        listed = real_cases(smoke)[:2]
        return [Case(listed[0].op, listed[0].case, "ours", broken), listed[1]]

    monkeypatch.setattr(bench_gae, "cases", cases)
    rows = proof.run_bench("bench_gae", smoke=True, directory=tmp_path)
    assert rows[0]["impl"] == "ours" and rows[0]["ms"] is None
    assert rows[0]["error"] == "RuntimeError: CUDA error: an illegal memory access"
    assert rows[1]["ms"] is not None


# ------------------------------------------------------------------------------------------
# benchmarks.report
# ------------------------------------------------------------------------------------------
from benchmarks import report  # noqa: E402


def _result(directory: Path, name: str, device: str, date: str, sha: str, rows: list[dict]):
    env = {"device": device, "date": date, "git_sha": sha, "torch": "2.99", "triton": "9.9",
           "cuda": "13.0" if device != "cpu" else None}
    path = directory / f"{name}-{device.replace(' ', '_')}-{date[:10]}.json"
    path.write_text(json.dumps({"environment": env, "rows": rows}))
    return path


def _row(op, case, impl, ms, **extra):
    return {"op": op, "case": case, "impl": impl, "ms": ms, **extra}


def test_report_without_a_gpu_file_says_so_and_labels_cpu_rows(tmp_path):
    _result(tmp_path, "e2e_ppo", "cpu", "2026-11-22T10:00:00+00:00", "a" * 40, [
        {"op": "e2e_ppo", "case": "qwen2.5-0.5b", "impl": "rlhf shared-LoRA r=16",
         "peak_gib": 2.9, "s_per_batch": 29.7, "response_tok_per_s": 4.31,
         "config": {"batch": 4, "prompt_length": 32, "response_length": 32,
                    "dtype": "bfloat16"}}])
    (tmp_path / "broken.json").write_text("{not json")
    text = report.render(tmp_path)
    assert "**No GPU run yet.**" in text and "####" not in text
    assert "**CPU only (not GPU figures):**" in text
    assert "| qwen2.5-0.5b | rlhf shared-LoRA r=16 | 4×(32+32) | bfloat16 | — | 2.9 | 29.7 |" \
        in text
    assert "2026-11-22 | `aaaaaaa` |" in text
    assert "`broken.json`: not a result file" in text  # never silently dropped


def test_report_newest_row_per_case_and_device(tmp_path):
    case = "8x1024x151936 bfloat16 fwd"
    _result(tmp_path, "logprobs", "NVIDIA H200", "2030-01-01T00:00:00+00:00", "1" * 40, [
        _row("logprobs", case, "ours", 2.0, pct_of_floor=40.0, peak_extra_mib=1.0),
        _row("logprobs", case, "eager", 10.0),
        _row("logprobs", case, "torch.compile", 1.5)])
    # a later partial rerun: only ours and eager again, ours faster
    _result(tmp_path, "logprobs_rerun", "NVIDIA H200", "2030-01-02T00:00:00+00:00", "2" * 40, [
        _row("logprobs", case, "ours", 1.0, pct_of_floor=80.0, peak_extra_mib=1.0,
             target_ms=0.92),
        _row("logprobs", case, "eager", 9.0)])
    # an older file of the same case on another GPU stays its own
    _result(tmp_path, "logprobs", "NVIDIA H100 80GB HBM3", "2029-01-01T00:00:00+00:00",
            "3" * 40, [_row("logprobs", case, "ours", 3.0, error="out of memory: x")])
    text = report.render(tmp_path)
    assert "No GPU run yet" not in text
    h100, h200 = text.index("#### NVIDIA H100 80GB HBM3"), text.index("#### NVIDIA H200")
    assert "torch 2.99, triton 9.9, cuda 13.0" in text
    lines = [line for line in text.splitlines() if line.startswith(f"| logprobs | {case} |")]
    assert len(lines) == 2  # ours only, once per device (peers in the 'fastest peer' column)
    h200_line = next(line for line in lines if "`2222222`" in line)
    # newest ours (1.0 ms, 2030-01-02) against the fastest newest peer: torch.compile 1.5 ms
    # from the older run, which is said
    assert "| ours | 1 | 80% |" in h200_line
    assert "torch.compile 1.5 ms (1.5×) [peer run 2030-01-01 `1111111`]" in h200_line
    assert "| 0.92 ✗ |" in h200_line  # 1.0 ms against the 0.92 ms target
    h100_line = next(line for line in lines if "`3333333`" in line)
    assert "out of memory: x" in h100_line and h100 < h200
    full = report.render(tmp_path, full=True)
    assert sum(line.startswith(f"| logprobs | {case} |") for line in full.splitlines()) == 4


def test_report_keeps_each_run_variant_of_one_impl(tmp_path):
    """Rows of one (op, case, impl) that a file tells apart by ``run`` (the CPU allocator runs
    of e2e_ppo) are each a row of the table; without ``run`` the file's last one stands."""
    rows = [dict(op="e2e_ppo", case="qwen2.5-0.5b", impl="rlhf", run=run, peak_gib=peak,
                 s_per_batch=seconds, config={"batch": 4}) for run, peak, seconds in
            (("block cache (the default)", 2.32, 28.3), ("glibc mmap threshold", 2.25, 36.6))]
    _result(tmp_path, "e2e_ppo_cpu_allocator", "cpu", "2030-01-01T00:00:00+00:00", "1" * 40, rows)
    sources, _ = report.load(tmp_path)
    chosen = report.newest(sources)
    assert {key[3] for key in chosen} == {"rlhf (block cache (the default))",
                                          "rlhf (glibc mmap threshold)"}
    assert {row["s_per_batch"] for row, _ in chosen.values()} == {28.3, 36.6}


def test_report_target_mark(tmp_path):
    _result(tmp_path, "gae", "NVIDIA H200", "2030-01-01T00:00:00+00:00", "1" * 40, [
        _row("gae", "512x2048 fp32", "ours", 0.02, target_ms=0.025),
        _row("gae", "512x2048 fp32", "eager", 1.0),
        _row("ppo_policy_loss", "64x1024 fp32 fwd+bwd", "ours", 0.06, target_ms=0.05),
        _row("ppo_policy_loss", "64x1024 fp32 fwd+bwd", "eager", 0.7)])
    text = report.render(tmp_path)
    assert "| 0.025 ✓ |" in text and "| 0.05 ✗ |" in text


def test_report_compares_cuda_graph_rows_with_cuda_graph_peers(tmp_path):
    """A replayed CUDA graph (GPU work only) is compared with the peers' replayed graphs, and a
    plain call only with plain calls: a graph replay is no peer of a host-bound call."""
    case = "64x1024 fp32 fwd+bwd"
    _result(tmp_path, "ppo_loss", "NVIDIA H200", "2030-01-01T00:00:00+00:00", "1" * 40, [
        _row("ppo_policy_loss", case, "ours", 0.3),
        _row("ppo_policy_loss", case, "eager", 0.5),
        _row("ppo_policy_loss", case, "ours (CUDA graph)", 0.01),
        _row("ppo_policy_loss", case, "eager (CUDA graph)", 0.04)])
    lines = {line.split(" | ")[2]: line for line in report.render(tmp_path).splitlines()
             if line.startswith(f"| ppo_policy_loss | {case} |")}
    assert set(lines) == {"ours", "ours (CUDA graph)"}
    assert "| eager 0.5 ms (1.67×) |" in lines["ours"]
    assert "| eager (CUDA graph) 0.04 ms (4×) |" in lines["ours (CUDA graph)"]


def test_report_write_replaces_the_block_and_is_idempotent(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    _result(results, "gae", "NVIDIA H200", "2030-01-01T00:00:00+00:00", "1" * 40,
            [_row("gae", "512x2048 fp32", "ours", 0.02)])
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{report.BEGIN}\nhand-typed 0.01 ms\n{report.END}\n\noutro\n")
    args = ["--results-dir", str(results), "--readme", str(readme), "--write"]
    assert report.main(args) == 0
    first = readme.read_text()
    assert "hand-typed" not in first and "#### NVIDIA H200" in first
    assert first.startswith(f"intro\n\n{report.BEGIN}\n") and first.endswith(
        f"{report.END}\n\noutro\n")
    assert report.main(args) == 0 and readme.read_text() == first  # idempotent
    # a newer result changes the block, and only the block
    _result(results, "gae", "NVIDIA H200", "2030-01-02T00:00:00+00:00", "2" * 40,
            [_row("gae", "512x2048 fp32", "ours", 0.015)])
    assert report.main(args) == 0
    second = readme.read_text()
    rows = [line for line in second.splitlines() if line.startswith("| gae |")]
    assert len(rows) == 1 and "`2222222`" in rows[0] and "| 0.015 |" in rows[0]
    assert second.split(report.BEGIN)[0] == first.split(report.BEGIN)[0]
    assert second.split(report.END)[1] == first.split(report.END)[1]
    readme.write_text("no markers\n")
    assert report.main(args) == 1 and readme.read_text() == "no markers\n"


def test_readme_results_block_is_the_rendered_one():
    """README.md's block is what `python -m benchmarks.report --write` makes of the committed
    results: no figure in it typed by hand."""
    text = (REPO / "README.md").read_text()
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    assert report.replace_block(text, report.render()) == text, \
        "README results block is stale: run python -m benchmarks.report --write"


def test_git_sha_without_a_repository_comes_from_the_caller(monkeypatch):
    """A GPU machine gets a copy of the working tree without .git: gpu_check.sh's caller passes
    the SHA (RLHF_GIT_SHA), and the result files record it instead of "unknown"."""
    def no_git(*args, **kwargs):
        raise subprocess.CalledProcessError(128, args[0])

    monkeypatch.setattr(common.subprocess, "run", no_git)
    monkeypatch.delenv("RLHF_GIT_SHA", raising=False)
    assert common._git_sha() == "unknown"
    monkeypatch.setenv("RLHF_GIT_SHA", "ab" * 20)
    assert common._git_sha() == "ab" * 20


def test_grpo_bench_peers_compute_our_loss():
    """The GRPO benchmark times the same loss in every implementation: its eager formula (the
    one TRL's trainer writes) against ours, value and gradients, on the CPU."""
    from benchmarks import bench_grpo_loss as bench

    inputs = bench._inputs(3, 7, 8, 29, "cpu", torch.float32, seed=3)
    hidden, weight = inputs[0], inputs[1]
    eager = bench._eager(*inputs, None)
    grads_eager = torch.autograd.grad(eager, (hidden, weight))
    ours = bench._ours(*inputs, None)
    grads_ours = torch.autograd.grad(ours, (hidden, weight))
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_ours, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------
# benchmarks.trl_grpo_step: which kernels a row's process ran (no model is built here)
# ------------------------------------------------------------------------------------------
def test_trl_grpo_step_child_env_names_the_backend(monkeypatch):
    """Each --backend's process gets its own RLHF_KERNELS_BACKEND / TRITON_INTERPRET, whatever
    the caller's environment holds (here the test suite's TRITON_INTERPRET=1)."""
    from benchmarks import trl_grpo_step as bench

    assert bench._GROUPS["both"] == ("native", "reference")
    seen = {}

    def fake_run(command, env, **kwargs):
        seen[command[command.index("--child") + 1]] = env
        return subprocess.CompletedProcess(command, 0, bench._RESULT + "{}\n", "")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    args = bench.argparse.Namespace(batch=4, generations=4, prompt_length=2, completion_length=2)
    for impl, backend in [("trl", None), *(("patched", b) for b in bench._GROUPS["all"])]:
        assert bench._run_child(impl, backend, args) == {}
    assert {k: (e.get("RLHF_KERNELS_BACKEND"), e.get("TRITON_INTERPRET"))
            for k, e in seen.items()} == {"trl": (None, "0"), "native": ("native", "0"),
                                          "reference": ("reference", "0"),
                                          "interpreter": ("triton", "1")}


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_trl_grpo_step_tally_records_what_ran(monkeypatch, backend):
    """The child's tally sees the backend the fused head resolved to and the native kernels it
    called; a row named after other kernels than those that ran is refused."""
    from benchmarks import trl_grpo_step as bench
    from rlhf_kernels import _native

    if backend == "native" and not _native.available():
        pytest.skip(f"native kernels unavailable: {_native.failure_reason()}")
    import rlhf_kernels

    monkeypatch.setenv("RLHF_KERNELS_BACKEND", backend)
    tally = bench._Tally()
    try:
        hidden = torch.randn(5, 8, requires_grad=True)
        rlhf_kernels.linear_logprobs(hidden, torch.randn(11, 8),
                                     torch.randint(0, 11, (5,))).sum().backward()
        counts = tally.take()
    finally:
        tally.undo()
    assert counts["backends"] == {f"linear_logprobs: {backend}": 1}
    calls = counts["native_kernel_calls"]
    assert calls == ({"logprobs_fwd": 1, "logprobs_bwd": 1} if backend == "native" else {})
    assert rlhf_kernels.ops.linear_logprobs.resolve_backend is rlhf_kernels.resolve_backend
    bench._check_ran(backend, "step", counts)
    for other in set(bench._RESOLVES_TO) - {backend}:
        with pytest.raises(RuntimeError, match=f"--backend {other} "):
            bench._check_ran(other, "step", counts)


def test_linear_row_sweep_case_forces_the_row_sweep_and_restores_the_choice():
    """The bench's ``linear_logprobs row-sweep`` rows time the backward on chunks of rows at a
    shape where the op itself would sweep the vocabulary, and leave the op's choice as it was."""
    from benchmarks import bench_linear_logprobs
    from rlhf_kernels.ops import linear_logprobs as linear_module

    needs = (True, True, False, False, False)
    shape = dict(n_rows=16384, vocab=151936, rows=1728, h=torch.zeros(1))
    chosen = linear_module.vocabulary_sweep
    from rlhf_kernels.ops import logprobs as logprobs_module

    assert chosen(needs, **shape) is not logprobs_module.native_cpu_kernels(shape["h"])
    with bench_linear_logprobs._row_sweep():
        assert linear_module.vocabulary_sweep(needs, **shape) is False
    assert linear_module.vocabulary_sweep is chosen


def test_host_trainer_measures_both_switches():
    """benchmarks/host_trainer.py (smoke: two layers): a row per (switch | update, direct |
    PEFT's switch), the direct switch cheaper than PEFT's, and the step's aten op count."""
    from benchmarks import host_trainer

    rows = host_trainer.measure(repeats=1, smoke=True, compile_update=False)
    by = {(row["case"].rsplit(" ", 1)[1], row["impl"]): row for row in rows}
    assert set(by) == {(what, impl) for what in ("switch", "update")
                       for impl in ("direct", "peft set_adapter")}
    assert by["switch", "direct"]["ms"] < by["switch", "peft set_adapter"]["ms"]
    assert by["update", "direct"]["aten_ops"] > 100
    assert "(2 layers, 14 adapted linears)" in by["update", "direct"]["case"]


def test_host_trainer_times_the_compiled_update(monkeypatch):
    """host_trainer's torch_compile row: the update step through the compiled layers, its
    compile time (the first step's), its gradients compared with the eager step's, and the
    layers back to their class's forward afterwards. Compiling is replaced by a recorder of the
    calls here (a real compile of its variants took 25 s of CI; tests/trainer/test_compile.py
    compares compiled layers with eager ones)."""
    from benchmarks import host_trainer
    from rlhf.compile import CompiledLayers

    calls = []

    def recorder(self, cls):
        return lambda layer, *args, **kwargs: calls.append(cls) or cls.forward(layer, *args,
                                                                               **kwargs)

    monkeypatch.setattr(CompiledLayers, "_compiled_forward", recorder)
    rows = host_trainer.measure(repeats=1, smoke=True)
    assert calls  # the compiled row's step ran through the compiled forward
    by = {(row["case"].rsplit(" ", 1)[1], row["impl"]): row for row in rows}
    compiled = by["update", "direct + torch_compile"]
    assert compiled["ms"] > 0 and compiled["compile_s"] > 0
    assert 0 <= compiled["grad_rel_diff"] < 1e-4  # checked against the eager step's gradients
    assert by["update", "direct"]["compile_s"] is None


def test_e2e_torch_compile_runs_the_trainers_compiled_update(capsys, monkeypatch):
    """e2e_ppo's torch_compile case: the trainer's own setting (the update's policy forward runs
    every row's prompt), a row label of its own; --compare-torch-compile with --torch-compile is
    refused in one line, before main() sets anything up (its CPU set-up picks the kernels'
    backend in the environment)."""
    from benchmarks import e2e_ppo

    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "auto")  # restored at the end, whatever ran
    monkeypatch.delenv("RLHF_KERNELS_BACKEND")

    assert e2e_ppo.ppo_settings(e2e_ppo.E2EConfig(torch_compile=True)).torch_compile is True
    assert e2e_ppo.ppo_settings(e2e_ppo.E2EConfig()).torch_compile is False
    with pytest.raises(SystemExit):
        e2e_ppo.main(["--torch-compile", "--compare-torch-compile", "--device", "cpu"])
    assert "--compare-torch-compile runs each case without, then with" in capsys.readouterr().err
    assert "RLHF_KERNELS_BACKEND" not in os.environ


# ---- a pipe that closes early (`| head -1`) ---------------------------------------------------
_MAIN_SCRIPTS = sorted(path.stem for path in (REPO / "benchmarks").glob("*.py")
                       if 'if __name__ == "__main__":' in path.read_text())


def test_every_benchmark_script_is_listed():
    assert {"bench_kl", "host_overhead", "compile_check", "report"} <= set(_MAIN_SCRIPTS)


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy's, harmless
@pytest.mark.parametrize("script", _MAIN_SCRIPTS)
def test_a_script_piped_into_a_reader_that_leaves_ends_quietly(script, monkeypatch, capsys):
    """`python -m benchmarks.host_overhead --repeats 5 | head -1` ended in a BrokenPipeError
    traceback once head had its line; each script's entry point now goes through
    rlhf.cli.quiet_broken_pipe, as the CLI's does: exit status 141 (128 + SIGPIPE), nothing
    said. The script runs as `python -m` runs it (runpy, __name__ == "__main__"), and the write
    to the closed pipe happens where its command line is read, before any benchmark runs."""
    import argparse
    import runpy

    def closed_pipe(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    for name in ("TRITON_INTERPRET", "RLHF_KERNELS_POISON"):  # host_overhead pops them
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{script}.py"])
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", closed_pipe)
    with pytest.raises(SystemExit) as ended:
        runpy.run_module(f"benchmarks.{script}", run_name="__main__", alter_sys=False)
    assert ended.value.code == 141
    assert capsys.readouterr().err == ""
