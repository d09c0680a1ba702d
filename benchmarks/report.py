"""Render the README's results table from the JSON files in benchmarks/results/: no figure typed
by hand.

    python -m benchmarks.report            # print the markdown block
    python -m benchmarks.report --write    # replace it in README.md, between the markers
    python -m benchmarks.report --full     # every row, not only ours against the best peer

For every (device, op, case, impl) the newest row wins (by the file's environment date, then the
file name), so a rerun of part of the benchmarks updates only its rows. GPU results are grouped per
GPU; CPU results are shown apart and labelled as such. With no GPU file at all the block says so
instead of showing any GPU figure. Each row names the run's date and git SHA; each device heading
names the torch / triton / CUDA versions of its files.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import RESULTS_DIR
from benchmarks.proof import is_ours

BEGIN = "<!-- results:begin (python -m benchmarks.report --write; do not edit by hand) -->"
END = "<!-- results:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"
PROOF_COMMAND = "bash scripts/gpu_check.sh proof"


@dataclass
class Source:
    """One result file: its environment and the rows that name an (op, case, impl)."""

    path: Path
    environment: dict
    rows: list[dict] = field(default_factory=list)
    skipped: int = 0  # rows without op/case/impl (summaries of hand-made runs): not tabulated

    @property
    def device(self) -> str:
        return str(self.environment.get("device") or "device not recorded")

    @property
    def date(self) -> str:
        return str(self.environment.get("date") or "")

    @property
    def sha(self) -> str:
        return str(self.environment.get("git_sha") or "unknown")[:7]

    @property
    def is_gpu(self) -> bool:
        return self.device not in ("cpu", "device not recorded")


def load(directory: Path = RESULTS_DIR) -> tuple[list[Source], list[str]]:
    """Every ``*.json`` result file in ``directory`` (not its subfolders); the files that could
    not be read come back as messages, never silently dropped."""
    sources, problems = [], []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(path.read_text())
            environment, rows = data["environment"], data["rows"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            problems.append(f"`{path.name}`: not a result file ({type(err).__name__}: {err})")
            continue
        source = Source(path, environment)
        for row in rows:
            if isinstance(row, dict) and all(isinstance(row.get(k), str)
                                             for k in ("op", "case", "impl")):
                if isinstance(row.get("run"), str):  # variants of one impl in one file (e.g.
                    # the CPU allocator runs): each its own row, not the file's last one
                    row = dict(row, impl=f"{row['impl']} ({row['run']})")
                source.rows.append(row)
            else:
                source.skipped += 1
        sources.append(source)
    return sources, problems


def newest(sources: list[Source]) -> dict[tuple[str, str, str, str], tuple[dict, Source]]:
    """(device, op, case, impl) -> the row of the newest file that has it."""
    chosen: dict[tuple[str, str, str, str], tuple[dict, Source]] = {}
    for source in sorted(sources, key=lambda s: (s.date, s.path.name)):
        for row in source.rows:
            chosen[(source.device, row["op"], row["case"], row["impl"])] = (row, source)
    return chosen


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{digits}g}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _stamp(source: Source) -> tuple[str, str]:
    return source.date[:10] or "?", f"`{source.sha}`"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _measured(row: dict, key: str = "ms") -> str:
    if row.get("error"):
        return f"{row['error'][:80]}"
    return _num(row.get(key))


def _peers_of(impl: str, impls: list[str]) -> list[str]:
    """The rows ours is compared with: same op and case, not ours; the fused PPO loss only with
    its unfused PPO path, the other ops never with it; a replayed CUDA graph only with replayed
    CUDA graphs, a plain call only with plain calls."""
    graphed = impl.endswith("(CUDA graph)")
    others = [i for i in impls if not is_ours(i) and i.endswith("(CUDA graph)") == graphed]
    if impl == "linear_ppo_loss":
        return [i for i in others if i.startswith("ppo-")]
    return [i for i in others if not i.startswith("ppo-")]


SPECIAL_OPS = ("e2e_ppo", "cuda_tests", "proof")


def _is_kernel_row(op: str, row: dict) -> bool:
    """A benchmarks.common row (timed by do_bench: ``ms``, or the error that replaced it)."""
    return op not in SPECIAL_OPS and ("ms" in row or "error" in row)


def kernel_rows(chosen, device: str, full: bool) -> list[list[str]]:
    by_case: dict[tuple[str, str], dict[str, tuple[dict, Source]]] = {}
    for (dev, op, case, impl), value in chosen.items():
        if dev == device and _is_kernel_row(op, value[0]):
            by_case.setdefault((op, case), {})[impl] = value
    out = []
    for (op, case), impls in sorted(by_case.items()):
        names = list(impls)
        shown = names if full else [i for i in names if is_ours(i)]
        for impl in sorted(shown, key=lambda i: (not is_ours(i), i)):
            row, source = impls[impl]
            peers = [(impls[p][0]["ms"], p, impls[p][1]) for p in _peers_of(impl, names)
                     if impls[p][0].get("ms")]
            best = min(peers, default=None, key=lambda t: t[0])
            rate = (f"{_num(row['pct_of_floor'])}%" if row.get("pct_of_floor") is not None
                    else f"{_num(row['tflops'])} TFLOP/s" if row.get("tflops") is not None
                    else "—")
            vs = "—"
            if best and row.get("ms"):
                vs = f"{best[1]} {_num(best[0])} ms ({_num(best[0] / row['ms'])}×)"
                if best[2].sha != source.sha:
                    vs += f" [peer run {best[2].date[:10]} `{best[2].sha}`]"
            if row.get("vs_unfused") is not None:
                vs += f"; {_num(row['vs_unfused'])}× unfused"
            target = row.get("target_ms")
            met = ("" if target is None or not row.get("ms")
                   else " ✓" if row["ms"] <= target else " ✗")
            out.append([op, case, impl, _measured(row), rate, _num(row.get("peak_extra_mib")),
                        vs if is_ours(impl) else "(peer)",
                        f"{_num(target)}{met}" if target is not None else "—", *_stamp(source)])
    return out


def e2e_rows(chosen, device: str) -> list[list[str]]:
    out = []
    peer_last = lambda kv: (kv[0][2], kv[0][3].startswith("peer"), kv[0][3])  # noqa: E731
    for (dev, op, case, impl), (row, source) in sorted(chosen.items(), key=peer_last):
        if dev != device or op != "e2e_ppo":
            continue
        config = row.get("config") or {}
        peer = row.get("peer") or {}
        batch = config.get("batch", peer.get("batch"))
        prompt = config.get("prompt_length", peer.get("prompt"))
        response = config.get("response_length", peer.get("response"))
        sizes = f"{batch}×({prompt}+{response})" if batch else "—"
        dtype = config.get("dtype") or peer.get("dtype") or "—"
        cap = config.get("max_memory_gib")
        labels = (("memory_ratio", "memory peer/ours"), ("speed_ratio", "speed ours/peer"))
        ratios = ", ".join(f"{label} {_num(row[key])}×" for key, label in labels if row.get(key))
        out.append([case, impl, sizes, dtype, f"{_num(cap)} GiB" if cap else "—",
                    _measured(row, "peak_gib"), _measured(row, "s_per_batch"),
                    _measured(row, "response_tok_per_s"), ratios or "—", *_stamp(source)])
    return out


def tests_rows(chosen, device: str) -> list[list[str]]:
    return [[case, str(row.get("passed", 0)), str(row.get("failed", 0)),
             str(row.get("errors", 0)), str(row.get("skipped", 0)), _num(row.get("seconds")),
             "; ".join(row.get("failures") or [])[:200] or "—", *_stamp(source)]
            for (dev, op, case, _), (row, source) in sorted(chosen.items())
            if dev == device and op == "cuda_tests"]


def proof_rows(chosen, device: str) -> list[list[str]]:
    """The parts of the last proof; a part's own SHA where the log has one (rows kept from an
    earlier commit by a PROOF_PARTS rerun), else the summary file's."""
    return [[case, str(row.get("status")), _num(row.get("seconds")), _num(row.get("budget_s")),
             _stamp(source)[0], f"`{row['git_sha'][:7]}`" if row.get("git_sha")
             else _stamp(source)[1]]
            for (dev, op, case, _), (row, source) in
            sorted(chosen.items(), key=lambda kv: (kv[1][1].date, kv[0]))
            if dev == device and op == "proof"]


def other_tables(chosen, device: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """Rows of any other kind (``host_overhead``, say): one table per result-file kind, its
    columns the rows' own scalar fields in the order they first appear, nothing interpreted."""
    groups: dict[str, list[tuple[dict, Source]]] = {}
    for (dev, op, _case, _impl), (row, source) in sorted(chosen.items()):
        if dev == device and op not in SPECIAL_OPS and not _is_kernel_row(op, row):
            groups.setdefault(source.path.name.split("-", 1)[0], []).append((row, source))
    tables = []
    for kind, members in sorted(groups.items()):
        keys: list[str] = []
        for row, _ in members:
            keys += [k for k, v in row.items() if k not in ("op", "case", "impl") and k not in keys
                     and (v is None or isinstance(v, (int, float, str)))]
        header = ["op", "case", "impl", *keys, "date", "SHA"]
        rows = [[row["op"], row["case"], row["impl"], *(_num(row.get(k)) for k in keys),
                 *_stamp(source)] for row, source in members]
        tables.append((f"`{kind}` (the file's own columns):", header, rows))
    return tables


def _versions(sources: list[Source], device: str) -> str:
    seen = []
    for s in sources:
        if s.device == device:
            env = s.environment
            text = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "cuda") if env.get(k))
            if text and text not in seen:
                seen.append(text)
    return "; ".join(seen) or "versions not recorded"


def device_section(chosen, sources: list[Source], device: str, full: bool) -> list[str]:
    lines = [f"#### {device} ({_versions(sources, device)})", ""]
    parts = [
        ("Last `proof` run, per part:", ["part", "status", "s", "budget s", "date", "SHA"],
         proof_rows(chosen, device)),
        ("CUDA kernel tests (compiled, not interpreted), per file:",
         ["file", "passed", "failed", "errors", "skipped", "s", "failures", "date", "SHA"],
         tests_rows(chosen, device)),
        ("Kernels: ours, the fastest peer of the same case and its time over ours "
         "(`benchmarks/README.md` defines every figure):",
         ["op", "case (shape, dtype, pass)", "impl", "ms", "% of floor / rate",
          "peak extra MiB", "fastest peer (peer ms / ours)", "target ms", "date", "SHA"],
         kernel_rows(chosen, device, full)),
        ("End-to-end PPO (one iteration, random-init models at the named shape; peers in the "
         "same call):",
         ["shape", "impl", "batch×(prompt+response)", "dtype", "memory cap", "peak GiB",
          "s / batch", "response tok/s", "vs ours (peer rows)", "date", "SHA"],
         e2e_rows(chosen, device)),
        *other_tables(chosen, device),
    ]
    for title, header, rows in parts:
        if rows:
            lines += [title, "", *_table(header, rows), ""]
    return lines


def render(directory: Path = RESULTS_DIR, full: bool = False) -> str:
    """The markdown block (without the markers): GPU sections first, then the CPU ones."""
    sources, problems = load(directory)
    chosen = newest(sources)
    devices = sorted({s.device for s in sources if s.rows})
    gpus = sorted({s.device for s in sources if s.rows and s.is_gpu})
    lines = ["### Measured results", "",
             f"Rendered by `python -m benchmarks.report` from `benchmarks/results/`; the newest "
             f"row per device and case. Regenerate with `{PROOF_COMMAND}` (on a GPU) then "
             "`python -m benchmarks.report --write`.", ""]
    if not gpus:
        lines += ["**No GPU run yet.** No file in `benchmarks/results/` comes from a GPU, so "
                  "this table has no GPU figure: no kernel time, no GPU memory, no GPU "
                  f"end-to-end speed. `{PROOF_COMMAND}` on an H100/H200 writes them.", ""]
    for device in gpus:
        lines += device_section(chosen, sources, device, full)
    for device in (d for d in devices if d not in gpus):
        lines += [f"**{device.upper()} only (not GPU figures):** measured on a machine without "
                  "a GPU; none of these is a GPU time, rate or memory figure "
                  "(`benchmarks/README.md` says what each one measures).", ""]
        lines += device_section(chosen, sources, device, full)[2:]
    lines += ["Files:", ""]
    for s in sources:
        note = f"; {s.skipped} rows without op/case/impl not tabulated" if s.skipped else ""
        lines.append(f"- `{s.path.name}`: {s.device}, {s.date[:10] or '?'}, `{s.sha}`, "
                     f"{len(s.rows)} rows{note}")
    lines += [f"- {p}" for p in problems]
    return "\n".join(lines).rstrip() + "\n"


def replace_block(text: str, block: str) -> str:
    """``text`` with the part between the BEGIN and END markers replaced by ``block``."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    found = len(pattern.findall(text))
    if found != 1:
        raise ValueError(f"expected one '{BEGIN}' ... '{END}' block, found {found}: add the two "
                         "markers (each on its own line) where the table goes")
    return pattern.sub(lambda _: f"{BEGIN}\n{block}{END}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--write", action="store_true", help="replace the block in the README")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--full", action="store_true", help="every row, peers too")
    args = parser.parse_args(argv)
    block = render(args.results_dir, args.full)
    if not args.write:
        print(block, end="")
        return 0
    try:
        text = args.readme.read_text()
        updated = replace_block(text, block)
    except (OSError, ValueError) as err:
        print(f"python -m benchmarks.report: {args.readme}: {err}", file=sys.stderr)
        return 1
    if updated != text:
        args.readme.write_text(updated)
        print(f"updated the results block in {args.readme}")
    else:
        print(f"{args.readme}: results block already up to date")
    return 0


if __name__ == "__main__":
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(main))
