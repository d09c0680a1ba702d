"""The Python side of ``bash scripts/gpu_check.sh proof``: time-boxed benchmark runs, and the CUDA
test results and the run's own summary as result files.

``bench NAME``   runs one ``bench_*`` script's cases (optionally only those whose name contains
                 every ``--match`` string) with our implementations first and the torch.compile
                 peers last, saves the rows after every case (so a run cut off by its part's
                 timeout keeps what it measured), and stops starting new cases once
                 ``--budget-s`` has passed: the cases left get a row saying they were not run.
                 Rows go to ``benchmarks/results/<save-as>-<device>-<date>.json``.
``tests XML``    turns pytest's JUnit XML into ``cuda_tests-<device>-<date>.json``: one row per test
                 file (passed / failed / skipped / errors / seconds, the failures' first lines).
``summary TSV``  turns gpu_check.sh's part log (part, status, seconds, budget) into
                 ``proof_summary-<device>-<date>.json``.

Every file carries benchmarks.common.environment() (GPU, torch / triton / CUDA versions, date, git
SHA); ``python -m benchmarks.report`` renders the README's table from them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from benchmarks import common


def is_ours(impl: str) -> bool:
    """Our implementation in a benchmark row ("ours", "ours <variant>", the fused linear ops);
    every other impl is a peer or a baseline."""
    return impl in ("linear_logprobs", "linear_ppo_loss") or impl == "ours" \
        or impl.startswith(("ours ", "linear_logprobs "))


def _priority(case: common.Case) -> int:
    """Ours first (the figures the README claims), then the eager peers and our tuning variants
    (``ours pipelined ...``: the same op with another launch configuration), then the
    torch.compile peers, whose first call compiles (tens of seconds each on a bare machine)."""
    if is_ours(case.impl):
        return 1 if "pipelined" in case.impl else 0
    return 2 if "compile" in case.impl.lower() else 1


def run_bench(name: str, match: tuple[str, ...] = (), budget_s: float | None = None,
              save_as: str | None = None, smoke: bool = False,
              directory: Path | None = None) -> list[dict]:
    """Run ``benchmarks.<name>`` through its own ``run()`` (so its derived columns, such as
    ``vs_unfused``, are computed as usual), with the case list filtered and reordered and a
    result file written after every case. A case that fails gets a row with ``error`` instead of
    ending the run; cases not started before ``budget_s`` get ``error`` "not run: ...".

    ``smoke`` runs the tiny CPU shapes (tests only; the rows are still saved where ``directory``
    says). Returns the rows written last.
    """
    module = importlib.import_module(f"benchmarks.{name}")
    if not hasattr(module, "cases") or not hasattr(module, "run"):
        raise SystemExit(f"benchmarks.{name} has no cases()/run(): not a bench_* script")
    save_as = save_as or name.removeprefix("bench_")
    listed_cases = module.cases
    real_run_cases = module.run_cases
    started = time.monotonic()

    def selected(smoke: bool = False) -> list[common.Case]:
        chosen = [c for c in listed_cases(smoke) if all(m in c.name for m in match)]
        if not chosen:
            raise SystemExit(f"benchmarks.{name}: no case matches {list(match)}; the cases are "
                             + "; ".join(c.name for c in listed_cases(smoke)))
        return sorted(chosen, key=_priority)  # stable: the script's order within a priority

    def run_cases_saving(cases) -> list[dict]:
        rows: list[dict] = []
        for case in cases:
            if budget_s is not None and time.monotonic() - started > budget_s:
                rows.append(common.result_row(
                    case.op, case.case, case.impl, None,
                    error=f"not run: the part's time budget ({budget_s:.0f} s) was spent"))
                continue
            try:
                rows.extend(real_run_cases([case]))
            except Exception as err:  # noqa: BLE001 - recorded in the row, the next case runs
                traceback.print_exc()
                first = str(err).splitlines()[0] if str(err) else ""
                rows.append(common.result_row(case.op, case.case, case.impl, None,
                                              error=f"{type(err).__name__}: {first}"))
            common.save_results(save_as, rows, directory)
            print(f"[{name}] {case.name}: "
                  f"{rows[-1].get('error') or format(rows[-1]['ms'], '.4f') + ' ms'}",
                  flush=True)
        return rows

    module.cases, module.run_cases = selected, run_cases_saving
    try:
        rows = module.run(smoke=smoke)
    finally:
        module.cases, module.run_cases = listed_cases, real_run_cases
    path = common.save_results(save_as, rows, directory)
    print(f"[{name}] wrote {path}")
    return rows


def junit_rows(xml_path: Path) -> list[dict]:
    """One row per test file from pytest's JUnit XML: counts, seconds, the failures' first lines.

    A run interrupted by its timeout (SIGINT) still writes the XML for the tests that ran."""
    root = ET.parse(xml_path).getroot()
    counts: dict[str, dict] = defaultdict(lambda: {
        "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "seconds": 0.0, "failures": []})
    for case in root.iter("testcase"):
        module = (case.get("classname") or "?").split(".")
        # classname is "tests.kernels.test_logprobs" or "tests.kernels.test_logprobs.TestClass"
        depth = next((i for i, m in enumerate(module) if m.startswith("test_")), len(module) - 1)
        entry = counts["/".join(module[:depth + 1])]
        entry["seconds"] += float(case.get("time") or 0.0)
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[child.tag]
                if child.tag != "skipped":
                    message = (child.get("message") or "").splitlines()
                    entry["failures"].append(f"{case.get('name')}: {message[0] if message else ''}"
                                             [:300])
                break
        entry[outcome] += 1
    return [{"op": "cuda_tests", "case": f"{file}.py", "impl": "pytest", **entry}
            for file, entry in sorted(counts.items())]


def summary_rows(tsv_path: Path) -> list[dict]:
    """gpu_check.sh's part log: one ``part<TAB>status<TAB>seconds<TAB>budget_s<TAB>sha`` line
    per part (the SHA: the commit the part ran at, which a PROOF_PARTS rerun keeps per row;
    older logs have no fifth field)."""
    rows = []
    for line in Path(tsv_path).read_text().splitlines():
        if not line.strip():
            continue
        part, status, seconds, budget, sha = (line.split("\t") + ["", "", "", ""])[:5]
        row = {"op": "proof", "case": part, "impl": "gpu_check.sh", "status": status,
               "seconds": float(seconds) if seconds else None,
               "budget_s": float(budget) if budget else None}
        if sha and sha != "unknown":
            row["git_sha"] = sha
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.proof",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="where the JSON goes (default: benchmarks/results)")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="one bench_* script, time-boxed, saved per case")
    bench.add_argument("name", help="bench_* module, e.g. bench_logprobs")
    bench.add_argument("--match", action="append", default=[],
                       help="only cases whose 'op | case | impl' contains this (repeatable: all)")
    bench.add_argument("--budget-s", type=float, default=None,
                       help="start no new case after this many seconds")
    bench.add_argument("--save-as", default=None, help="result file name (default: the op)")
    bench.add_argument("--smoke", action="store_true", help="tiny CPU shapes (tests)")
    tests = sub.add_parser("tests", help="pytest JUnit XML -> cuda_tests result file")
    tests.add_argument("xml", type=Path)
    summary = sub.add_parser("summary", help="gpu_check.sh part log -> proof_summary file")
    summary.add_argument("tsv", type=Path)
    args = parser.parse_args(argv)
    if args.command == "bench":
        if not args.smoke:
            import torch

            if not torch.cuda.is_available():
                print("No CUDA device: the benchmarks time GPU kernels (use --smoke on the CPU).",
                      file=sys.stderr)
                return 2
        rows = run_bench(args.name, tuple(args.match), args.budget_s, args.save_as, args.smoke,
                         args.results_dir)
        return 1 if any(r.get("error") and is_ours(r["impl"]) for r in rows) else 0
    if args.command == "tests":
        if not args.xml.is_file():
            print(f"{args.xml}: no JUnit XML (pytest did not get far enough to write it)",
                  file=sys.stderr)
            return 1
        rows = junit_rows(args.xml)
        name = "cuda_tests"
    else:
        rows = summary_rows(args.tsv)
        name = "proof_summary"
    print(f"wrote {common.save_results(name, rows, args.results_dir)}")
    return 0


if __name__ == "__main__":
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(main))
