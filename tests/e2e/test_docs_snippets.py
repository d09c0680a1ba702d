"""The docs do what they say: every ```python block of docs/*.md runs on the CPU (or is listed in
SKIPPED with the reason), every `rlhf ...` command that README.md and docs/*.md show is accepted
as written (its settings parse and pass the checks made before anything loads), every relative
link of README.md and docs/*.md names a file that exists and, for a Markdown file, a heading it
has, and the repository files and `rlhf.` / `rlhf_kernels.` names they cite exist.
tests/e2e/test_readme_snippets.py runs the README's own Python snippets."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
# the pages whose links, file names, code names and command-line flags are checked
ALL_PAGES = [*PAGES, ROOT / "benchmarks" / "README.md"]


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), re.S | re.M)


def _python_blocks() -> dict[tuple[str, int], str]:
    return {(page.name, index): code
            for page in DOCS for index, code in enumerate(_blocks(page, "python"))}


# (page, index of the block among the page's ```python blocks) -> why it is not run here.
SKIPPED: dict[tuple[str, int], str] = {}
# Blocks run by a test of their own below (they need a stand-in for the reader's objects).
RUN_BY_A_TEST = {("integrations.md", 0), ("integrations.md", 1)}


def test_every_python_block_of_the_docs_is_run_or_listed_as_skipped():
    """A new snippet fails here until it is run by a test or listed in SKIPPED with a reason."""
    blocks = set(_python_blocks())
    unlisted = blocks - set(SKIPPED) - RUN_BY_A_TEST
    assert not unlisted, f"python blocks neither run nor listed in SKIPPED: {sorted(unlisted)}"
    stale = (set(SKIPPED) | RUN_BY_A_TEST) - blocks
    assert not stale, f"listed blocks that no longer exist (the docs changed): {sorted(stale)}"


@pytest.mark.parametrize("key", sorted(SKIPPED), ids=lambda key: f"{key[0]}[{key[1]}]")
def test_skipped_python_blocks(key):
    pytest.skip(SKIPPED[key])


class _StandInTrainer:
    """The reader's `trainer`: its fit()/train() calls TRL's helpers as a TRL trainer would, and
    records what they returned while the patch was on."""

    def __init__(self):
        self.seen: dict[str, object] = {}

    def _step(self):
        import torch
        import trl.trainer.utils as trl_utils

        generator = torch.Generator().manual_seed(0)
        logits = torch.randn(2, 5, 11, generator=generator).to(torch.bfloat16)
        index = torch.randint(0, 11, (2, 5), generator=generator)
        self.seen["function"] = trl_utils.selective_log_softmax
        self.seen["logits"], self.seen["index"] = logits, index
        self.seen["logp"] = trl_utils.selective_log_softmax(logits, index)

    fit = train = _step


def _integrations_namespace(monkeypatch) -> tuple[dict, list[str]]:
    """Runs the first block of docs/integrations.md. Without veRL installed (as here), with
    `patch_trl`, which its own comment offers instead; `trainer` is a stand-in."""
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")  # tiny CPU tensors: the spec is fast
    code = _python_blocks()[("integrations.md", 0)]
    try:
        import verl  # noqa: F401
    except ImportError:
        assert "with patch_verl() as patch:" in code, "the snippet changed: update this test"
        code = code.replace("patch_verl", "patch_trl")
    namespace: dict = {"trainer": _StandInTrainer()}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/integrations.md", "exec"), namespace)  # noqa: S102 - our docs
    return namespace, out.getvalue().splitlines()


def test_integrations_patch_snippet_swaps_the_functions_in_and_back(monkeypatch):
    """"print(patch.patched): "module.attribute" of every replaced function", the trainer runs
    with the drop-ins, and leaving the `with` block puts the framework's own functions back."""
    pytest.importorskip("trl")
    import trl.trainer.utils as trl_utils

    original = trl_utils.selective_log_softmax
    namespace, printed = _integrations_namespace(monkeypatch)
    assert "trl.trainer.utils.selective_log_softmax" in printed[0], printed
    assert namespace["trainer"].seen["function"] is not original  # patched during fit()
    assert trl_utils.selective_log_softmax is original  # and undone after the block


def test_integrations_keep_fp32_snippet_returns_fp32_for_bf16_logits(monkeypatch):
    """"with patch_trl(keep_fp32=True): TRL's helpers return fp32 for bf16 logits", where TRL's
    own function (CPU logits: its PyTorch path) returns bf16; the values are the float64 log-probs
    to fp32 rounding."""
    pytest.importorskip("trl")
    import torch
    import trl.trainer.utils as trl_utils

    namespace, _ = _integrations_namespace(monkeypatch)
    trainer = namespace["trainer"] = _StandInTrainer()
    code = _python_blocks()[("integrations.md", 1)]
    exec(compile(code, "docs/integrations.md", "exec"), namespace)  # noqa: S102 - our docs
    logits, index, logp = (trainer.seen[k] for k in ("logits", "index", "logp"))
    assert logp.dtype == torch.float32, logp.dtype
    assert trl_utils.selective_log_softmax(logits, index).dtype == torch.bfloat16  # unpatched
    want = torch.log_softmax(logits.double(), -1).gather(-1, index[..., None]).squeeze(-1)
    assert (logp.double() - want).abs().max() < 1e-5


# ---- the `rlhf` commands the pages show -------------------------------------------------------

# a command with one of these is a template (`model=...`, `MODEL`, `[--x]`, `--gpus N`, `<name>`)
_PLACEHOLDER = re.compile(r"\.\.\.|<|\[|\bMODEL\b|\bN\b|\|")
_STAGE = re.compile(r"(?:^|&& |-m )rlhf ((?:sft|rm|ppo|grpo|pipeline|frontier|plan)\b.*)$")
# shown, but not run here: what they do is not a check of the settings
_NOT_RUN = {"plan --write-readme": "rewrites README.md's card table "
                                   "(tests/trainer/test_plan.py holds that table to the code)"}


def _commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text()
        lines = [line.split(" #")[0].strip()
                 for block in _blocks(page, "bash")
                 for line in block.replace("\\\n", " ").splitlines()]
        # inline, in the prose (a span may break across lines)
        lines += [" ".join(span.split()) for span in re.findall(r"`(rlhf [^`]+)`", text)]
        for line in lines:
            match = _STAGE.search(line)
            if (match and not _PLACEHOLDER.search(match.group(1))
                    and match.group(1).strip() not in _NOT_RUN):
                found.append((page.name, match.group(1).strip()))
    return sorted(set(found))


def test_the_pages_show_commands():
    pages = {page for page, _ in _commands()}
    assert {"README.md", "distributed.md", "real_model.md"} <= pages, pages
    assert not {command for _, command in _commands()} & set(_NOT_RUN)


@pytest.mark.parametrize("page,command", _commands(), ids=lambda x: x)
def test_every_rlhf_command_shown_is_accepted(page, command, tmp_path, monkeypatch):
    """Each `rlhf <stage> ...` runs through the CLI as written with --print-config added (which
    loads and checks the settings, then stops before anything heavy; `--nproc N` is dropped: the
    torchrun launch itself is tests/trainer/test_distributed.py's); `rlhf plan ...` runs in full."""
    from rlhf import distributed
    from rlhf.cli import main

    monkeypatch.chdir(tmp_path)  # relative output_dir= and dataset= paths name nothing here
    args = shlex.split(command)
    if args[0] != "plan":
        args = [arg for i, arg in enumerate(args)
                if arg != "--nproc" and not (i and args[i - 1] == "--nproc")]
        args += [] if "--print-config" in args else ["--print-config"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                code = main(args)
            except SystemExit as exit_:  # argparse: --help
                code = exit_.code
    finally:
        distributed.set_strategy(None)  # strategy= is process state the CLI sets
    assert code == 0, f"{page}: `rlhf {command}` exited {code}:\n{out.getvalue()[-2000:]}"
    assert out.getvalue().strip(), "it printed nothing"


# ---- relative links ---------------------------------------------------------------------------

def _anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation but '-' and '_' dropped, spaces to '-', a
    repeated id numbered -1, -2, ..."""
    anchors, counts, fenced = set(), {}, False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).replace("`", "").lower())
            slug = slug.replace(" ", "-")
            n = counts.get(slug, 0)
            counts[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


@pytest.mark.parametrize("page", ALL_PAGES, ids=_page_id)
def test_relative_links_resolve(page):
    """[text](path#anchor) and ![alt](path): the file exists (inside the repository) and the
    anchor is a heading of the Markdown file it names."""
    broken, links = [], re.findall(r"\]\(([^)\s]+)\)", page.read_text())
    for link in links:
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if ROOT not in target.parents and target != ROOT:
            broken.append(f"{link} (outside the repository)")
        elif not target.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link} (no heading #{anchor} in {target.relative_to(ROOT)})")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_anchor_rule_matches_githubs():
    """The heading-id rule above, on headings of these pages whose ids GitHub shows."""
    page = ROOT / "docs" / "real_model.md"
    anchors = _anchors(page)
    assert "taskreviews-on-smollm2-135m-instruct-lora-sft-a-reward-model-grpo" in anchors
    assert "dapos-dynamic-sampling-on-this-task" in anchors


# ---- files and code the pages name -----------------------------------------------------------

_REPO_DIRS = ("rlhf/", "rlhf_kernels/", "tests/", "benchmarks/", "csrc/", "docs/", "scripts/")


@pytest.mark.parametrize("page", ALL_PAGES, ids=_page_id)
def test_files_named_in_code_spans_exist(page):
    """`rlhf/engine.py`, `benchmarks/results/x.json`, `csrc/cpu/`: a path under one of the
    repository's folders names something that exists (docs/ paths also relative to docs/); on
    a page below the root, a path under one of its own folders too (benchmarks/README.md's
    `results/x.json`, `peers/trl_ppo_peer.py`)."""
    missing = []
    own = () if page.parent == ROOT else tuple(
        f"{d.name}/" for d in page.parent.iterdir() if d.is_dir())
    for span in re.findall(r"`([\w./-]+)`", page.read_text()):
        if "*" in span:
            continue
        if span.startswith(_REPO_DIRS):
            if not (ROOT / span).exists() and not (ROOT / "docs" / span).exists():
                missing.append(span)
        elif own and span.startswith(own) and not (page.parent / span).exists():
            missing.append(span)
    assert not missing, f"{page.name} names files that do not exist: {missing}"


@pytest.mark.parametrize("page", ALL_PAGES, ids=_page_id)
def test_code_names_resolve(page):
    """`rlhf.models.SharedBackbone`, `rlhf_kernels.integrations.verl.ADVANTAGE_ESTIMATORS`: a
    dotted name of this repository's packages imports, attribute by attribute."""
    import importlib

    broken = []
    for name in sorted(set(re.findall(r"`((?:rlhf|rlhf_kernels)(?:\.\w+)+)", page.read_text()))):
        parts, found = name.split("."), None
        for cut in range(len(parts), 0, -1):  # the longest importable module prefix
            try:
                found = importlib.import_module(".".join(parts[:cut]))
                break
            except ImportError:
                continue
        for attribute in parts[cut:]:
            found = getattr(found, attribute, None)
        if found is None:
            broken.append(name)
    assert not broken, f"{page.name} names code that does not exist: {broken}"


def _classes() -> dict[str, type]:
    """Every class defined in rlhf/ and rlhf_kernels/ (not the framework drop-ins, which import
    the frameworks), by name."""
    import importlib
    import inspect
    import pkgutil

    import rlhf
    import rlhf_kernels

    classes: dict[str, type] = {}
    for package in (rlhf, rlhf_kernels):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if ".integrations" in module.name or module.name.endswith("__main__"):
                continue
            loaded = importlib.import_module(module.name)
            for name, value in vars(loaded).items():
                if inspect.isclass(value) and value.__module__ == loaded.__name__:
                    classes.setdefault(name, value)
    return classes


def test_class_members_named_exist():
    """`SharedBackbone.memory_report`, `RolloutEngine._prefill`: a member of one of this
    repository's classes, named in README.md or docs/*.md, exists."""
    classes, broken = _classes(), []
    for page in ALL_PAGES:
        for owner, member in re.findall(r"`(?:[\w.]*\.)?([A-Z]\w+)\.(\w+)", page.read_text()):
            if owner in classes and not hasattr(classes[owner], member):
                broken.append(f"{page.name}: {owner}.{member}")
    assert not broken, f"members that do not exist: {broken}"


# ---- command-line flags the pages show ----------------------------------------------------------

# `python -m benchmarks.e2e_ppo --shape ...`, `python benchmarks/peers/x.py --enable-gc`,
# `rlhf plan --card 12`, `torchrun ... -m rlhf grpo --resume`, and in the prose a benchmark
# script by its name (`e2e_ppo --profile-stages`, `bench_logprobs.py --sweep`)
_COMMAND = re.compile(r"(?:python3? -m (?P<module>benchmarks(?:\.\w+)?|rlhf)\b"
                      r"|(?P<script>(?:benchmarks/)?[\w/]+\.py)"
                      r"|(?<![\w/.=-])(?P<name>(?:bench_|e2e_|trl_|host_|static_|compile_)\w+)"
                      r"|(?<![\w/.=-])rlhf(?= \w))")


def _shown_commands(page: Path) -> list[str]:
    """Every command line of the page's ```bash blocks and of its inline code spans (outside
    the fenced blocks, whose backticks would pair the spans wrongly)."""
    text = page.read_text()
    lines = [line for block in _blocks(page, "bash")
             for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    lines += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    return [part for line in lines for part in re.split(r"&&|;|\|\|", line.split(" #")[0])]


def _flag_sources(page: Path, match: re.Match, rest: str) -> Path:
    """The file whose argparse takes the command's flags."""
    if match.group("script"):
        script = match.group("script")
        for base in (ROOT, page.parent, ROOT / "benchmarks"):
            if (base / script).exists():
                return base / script
        return ROOT / script
    if match.group("name"):
        return ROOT / "benchmarks" / f"{match.group('name')}.py"
    module = match.group("module") or "rlhf"
    if module == "rlhf":
        return ROOT / "rlhf" / ("plan.py" if rest.split()[:1] == ["plan"] else "cli.py")
    if module == "benchmarks":
        return ROOT / "benchmarks" / "__main__.py"
    return ROOT / (module.replace(".", "/") + ".py")


def _flags_shown() -> list[tuple[str, str, str]]:
    """(page, file whose parser should take it, --flag) for every flag of a command shown; a
    value after '=' (`--peer-arg=--enable-gc`, the peer's own flag) is not the command's."""
    found = set()
    for page in ALL_PAGES:
        for part in _shown_commands(page):
            match = _COMMAND.search(part)
            if not match or "--" not in part[match.end():]:
                continue
            if re.search(r"--[\w-]+[ =]$", part[:match.start()]):
                continue  # a fragment: the script is an option's value (`--peer-script x.py`)
            rest = part[match.end():]
            source = _flag_sources(page, match, rest)
            for flag in re.findall(r"(?<![\w=-])(--[a-z][\w-]*)", rest):
                found.add((_page_id(page), str(source.relative_to(ROOT)), flag))
    return sorted(found)


def test_the_pages_show_flags():
    sources = {source for _, source, _ in _flags_shown()}
    assert {"rlhf/cli.py", "rlhf/plan.py", "benchmarks/e2e_ppo.py",
            "benchmarks/__main__.py"} <= sources, sources


def test_every_flag_shown_exists():
    """Each `--flag` of a `python -m benchmarks...`, `rlhf ...` or `python benchmarks/...py`
    command shown in README.md, docs/*.md and benchmarks/README.md is one that command's
    argparse defines (its source has `"--flag"`): a renamed or dropped option fails here, not in
    a reader's shell. `--help` is argparse's own."""
    missing = []
    for page, source, flag in _flags_shown():
        path = ROOT / source
        if flag == "--help":
            continue
        if not path.exists():
            missing.append(f"{page}: {flag} of {source}, which does not exist")
        elif f'"{flag}"' not in path.read_text():
            missing.append(f"{page}: {flag} (not an option of {source})")
    assert not missing, "flags the pages show that the commands do not take:\n" + "\n".join(missing)


def test_environment_variables_named_exist():
    """`RLHF_KERNELS_BACKEND`, `PROOF_PARTS`, `GPU_CHECK_DRY_RUN`: every variable of ours a page
    names is read by the code or the scripts (a renamed variable would leave a dead
    instruction)."""
    sources = "\n".join(path.read_text(errors="replace")
                        for folder in ("rlhf", "rlhf_kernels", "benchmarks", "scripts", "csrc",
                                       "tests", ".ci")
                        for path in (ROOT / folder).rglob("*")
                        if path.suffix in (".py", ".sh", ".cpp", ".h", "") and path.is_file()
                        and "__pycache__" not in path.parts and path != Path(__file__))
    missing = set()
    for page in ALL_PAGES:
        for name in re.findall(r"\b((?:RLHF|PROOF|GPU_CHECK|PEER)_[A-Z0-9_]+)", page.read_text()):
            if name not in sources:
                missing.add(f"{_page_id(page)}: {name}")
    assert not missing, f"variables no code reads: {sorted(missing)}"


def test_commits_cited_exist():
    """`7adc4fa`, "commit 8090662": a commit a page cites to date a figure is one of this
    repository's (skipped in a copy without git history, such as the GPU machine's)."""
    import subprocess

    if not (ROOT / ".git").exists():
        pytest.skip("no git history here")
    cited = set()
    for page in ALL_PAGES:
        text = page.read_text()
        cited |= set(re.findall(r"`([0-9a-f]{7,40})`", text))
        cited |= set(re.findall(r"\b(?:commit|commits|at|since|before) ([0-9a-f]{7,40})\b", text))
    cited = {sha for sha in cited if re.search(r"[a-f]", sha) and re.search(r"\d", sha)}
    assert len(cited) > 20, cited
    out = subprocess.run(["git", "cat-file", "--batch-check"], cwd=ROOT, capture_output=True,
                         text=True, input="".join(f"{sha}^{{commit}}\n" for sha in sorted(cited)),
                         check=True).stdout
    missing = [line.split()[0] for line in out.splitlines() if line.endswith("missing")]
    assert not missing, f"commits the pages cite that this repository does not have: {missing}"


def test_every_module_run_with_python_m_exists():
    """`python -m benchmarks.e2e_ppo`, `python -m rlhf.models`: each module of this repository a
    page runs exists and can be run (a package with __main__.py, or a module file)."""
    missing = set()
    for page in ALL_PAGES:
        for part in _shown_commands(page):
            for module in re.findall(r"python3? -m ((?:rlhf|rlhf_kernels|benchmarks)[\w.]*)",
                                     part):
                path = ROOT / module.replace(".", "/")
                if not ((path / "__main__.py").exists() or path.with_suffix(".py").exists()):
                    missing.add(f"{_page_id(page)}: python -m {module}")
    assert not missing, sorted(missing)


def test_design_sections_cited_exist():
    """"docs/design.md §4", "§1.4": docs/design.md promises stable section numbers; every "§N"
    the pages, the code or the scripts cite is one of its numbered headings."""
    design = (ROOT / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", design, re.M))
    assert {"1", "1.4", "4", "5"} <= sections, sections
    files = [*ALL_PAGES, *(path for folder in ("rlhf", "rlhf_kernels", "benchmarks", "scripts",
                                               "csrc", "tests")
                           for path in (ROOT / folder).rglob("*")
                           if path.suffix in (".py", ".sh", ".cpp", ".h", ".md")
                           and "__pycache__" not in path.parts)]
    wrong = {f"{path.relative_to(ROOT)}: §{number}" for path in files
             for number in re.findall(r"§(\d+(?:\.\d+)?)", path.read_text(errors="replace"))
             if number not in sections}
    assert not wrong, f"sections docs/design.md does not have: {sorted(wrong)}"


# ---- figures benchmarks/README.md quotes from its result files ----------------------------------

_BENCH_README = ROOT / "benchmarks" / "README.md"
_RESULTS = ROOT / "benchmarks" / "results"


def _table_after(text: str, header: str) -> list[list[str]]:
    """The rows (cells) of the Markdown table whose header line starts with ``header``."""
    lines = text[text.index(header):].split("\n\n")[0].splitlines()[2:]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]


def _rows(name: str) -> list[dict]:
    import json

    return json.loads((_RESULTS / name).read_text())["rows"]


def test_host_overhead_table_is_its_result_file():
    """"Now (results/host_overhead-cpu-<date>.json, the output of --markdown)": the table is
    that file, to the digits shown."""
    import re

    text = _BENCH_README.read_text()
    named = re.search(r"\*\*Now\*\* \(`results/(host_overhead-cpu-[0-9-]+\.json)`", text)
    assert named is not None, "the Now table names no host_overhead result file"
    section = text[named.start():]
    shown = _table_after(section, "| op | ours fwd |")

    def us(value):
        return "–" if value is None else f"{value:.0f}"

    def ratio(value):
        return "–" if value is None else f"{value:.2f}×"

    def kernels(r):  # forward + backward where the op has a gradient, else forward
        part = "fwd" if r.get("ours_fwd_bwd_kernels") is None else "fwd_bwd"
        return f"{r[f'ours_{part}_kernels']} / {r[f'eager_{part}_kernels']}"

    want = [[r["op"], us(r["ours_fwd_us"]), us(r.get("ours_fwd_bwd_us")), us(r["eager_fwd_us"]),
             us(r.get("eager_fwd_bwd_us")), ratio(r["ratio_fwd"]), ratio(r.get("ratio_fwd_bwd")),
             kernels(r)]
            for r in sorted(_rows(named.group(1)), key=lambda r: r["op"])]
    assert shown == want


def test_packing_table_is_its_result_file():
    """"Packed sequences (CPU)": token slots, fastest ms, real tokens/s, the same-round speed-up
    and the peak RSS of each row are packing-cpu-2026-11-30.json's."""
    shown = _table_after(_BENCH_README.read_text(), "| phase | implementation |")
    impls = {"padded": "padded", "ours packed (bins)": "packed, bins (SDPA, block-diagonal mask)",
             "ours packed (flat, per-sequence SDPA)": "packed, flat (per-sequence SDPA)"}
    want = [[r["case"].split()[0], impls[r["impl"]], str(r["tokens_processed"]), f"{r['ms']:.0f}",
             f"{r['tokens_per_s']:.0f}", f"{r['speedup_vs_padded']:.2f}×",
             f"{r['peak_rss_mib']:.0f}"] for r in _rows("packing-cpu-2026-11-30.json")]
    assert shown == want


def test_native_cpu_tables_are_their_result_file():
    """"Native CPU kernels": the logprobs rows (eager, torch.compile and ours ms, ours against
    eager, peaks) and the linear_logprobs table are bench_cpu_native-cpu-2026-11-30.json's."""
    rows = {(r["case"], r["impl"]): r for r in _rows("bench_cpu_native-cpu-2026-11-30.json")}
    text = _BENCH_README.read_text()
    for cells in _table_after(text, "| case | eager ms | torch.compile ms |"):
        match = re.match(r"logprobs fwd\+bwd (fp32|bf16) (\d+×\d+)", cells[0])
        if not match:
            continue
        case = f"{'float32' if match[1] == 'fp32' else 'bfloat16'} {match[2].replace('×', 'x')}"
        eager, compiled, ours = (rows[case, impl] for impl in
                                 ("eager", "torch.compile", "ours (native)"))
        assert cells[1:4] == [f"{eager['ms']:.0f}", f"{compiled['ms']:.0f}", f"{ours['ms']:.0f}"]
        assert cells[4] == " / ".join(f"{ours[k]:.2f}×" for k in
                                      ("speedup_vs_eager", "speedup_min", "speedup_cpu"))
        assert cells[5] == " / ".join(f"{r['peak_extra_mib']:.0f}" for r in (eager, compiled, ours))
    for cells in _table_after(text, "| tokens | eager ms | ours ms |"):
        case = f"fp32 N={cells[0]} H=896 V=32000"
        eager, ours = rows[case, "eager"], rows[case, "ours (native)"]
        assert cells[1:] == [f"{eager['ms']:.0f}", f"{ours['ms']:.0f}",
                             f"{eager['peak_extra_mib']:.0f}", f"{ours['peak_extra_mib']:.0f}"]


def test_cpu_allocator_tables_are_their_result_file():
    """docs/memory.md ("On the CPU: the allocator") and docs/native_cpu.md ("End to end") show
    the four runs of e2e_ppo_cpu_allocator-cpu-2026-11-30.json: seconds per iteration, page
    faults / stage seconds, peak and peak over plan per stage, to the digits shown."""
    rows = _rows("e2e_ppo_cpu_allocator-cpu-2026-11-30.json")
    stages = ("rollout", "scoring", "update")

    def ratios(row, sep):
        return sep.join(f"{row['measured_over_predicted'][s]:.2f}" for s in stages)

    memory = _table_after((ROOT / "docs" / "memory.md").read_text(), "| ops, allocator |")
    assert sorted(cells[1:] for cells in memory) == sorted(
        [f"{r['s_per_batch']:.1f}", f"{r['process']['minor_page_faults'] / 1e6:.2f} M",
         f"{r['peak_gib']:.2f}", ratios(r, ", ")] for r in rows)
    native = _table_after((ROOT / "docs" / "native_cpu.md").read_text(), "| ops | CPU allocator |")
    assert sorted(cells[2:] for cells in native) == sorted(
        [f"{r['s_per_batch']:.1f}",
         " / ".join(f"{r[f'{s}_s']:.1f}" for s in ("generation", "scoring", "update")),
         f"{r['peak_gib']:.2f}", ratios(r, " / ")] for r in rows)


def test_trl_side_by_side_figures_are_their_result_files():
    """docs/integrations.md's GRPOTrainer-step table is trl_grpo_step-cpu-2026-11-30.json (peak
    RSS and seconds of the step and of the loss, per configuration), and the TRL side by side of
    README.md and docs/real_model.md is e2e_trl_grpo-cpu-2026-11-30.json (seconds per step, peak
    RSS, held-out accuracy with its standard error)."""
    step = {(r["case"].split(":")[0], r["impl"]): r
            for r in _rows("trl_grpo_step-cpu-2026-11-30.json")}
    labels = {"TRL 1.16 as installed": "trl", "patched, native": "trl+patch_trl (native)",
              "patched, PyTorch reference": "trl+patch_trl (reference)",
              "patched, Triton kernels": "trl+patch_trl (interpreter)"}
    table = _table_after((ROOT / "docs" / "integrations.md").read_text(), "| | step: peak RSS |")
    assert len(table) == len(labels)
    for cells in table:
        impl = next(impl for label, impl in labels.items() if cells[0].startswith(label))
        train, loss = step["train step", impl], step["loss fwd+bwd", impl]
        assert cells[1:] == [f"{train['peak_rss_mib']:.0f} MiB", f"{train['s']:.1f}",
                             f"{loss['peak_rss_mib']:.0f} MiB", f"{loss['s']:.1f}"], cells[0]
    ours, trl = (next(r for r in _rows("e2e_trl_grpo-cpu-2026-11-30.json") if r["impl"] == impl)
                 for impl in ("ours", "trl"))
    for page in (ROOT / "README.md", ROOT / "docs" / "real_model.md"):
        rows = {cells[0]: cells[1:] for cells in _table_after(page.read_text(), "| 6 GRPO steps")}
        seconds = next(v for k, v in rows.items() if k.startswith("seconds per step"))
        peak = next(v for k, v in rows.items() if k.startswith("peak RSS"))
        accuracy = next(v for k, v in rows.items() if k.startswith("held-out greedy accuracy"))
        assert [seconds[0].split()[0].strip("*"), seconds[1].split()[0]] == [
            f"{ours['s']:.1f}", f"{trl['s']:.1f}"], page.name
        assert [peak[0].split()[0].strip("*"), peak[1].split()[0]] == [
            f"{ours['peak_rss_mib'] / 1024:.2f}", f"{trl['peak_rss_mib'] / 1024:.2f}"], page.name
        assert accuracy == [f"{100 * r['heldout_accuracy']:.0f}% ± "
                            f"{100 * r['heldout_stderr']:.0f}%" for r in (ours, trl)], page.name


def test_real_model_figures_are_docs_figures_json():
    """The SmolLM2 results README.md and docs/real_model.md quote are the runs' summaries in
    docs/figures/ (arithmetic_grpo_smollm2.json, reviews_grpo_smollm2.json), as each page
    writes them."""
    import json

    figures = ROOT / "docs" / "figures"
    arithmetic = json.loads((figures / "arithmetic_grpo_smollm2.json").read_text())
    reviews = json.loads((figures / "reviews_grpo_smollm2.json").read_text())
    acc, rm = arithmetic["heldout_accuracy"], reviews["reward_model"]
    gold, kl = reviews["gold_heldout"], reviews["kl_to_reference"]

    def pct(mean, se):
        return f"{100 * mean:.1f}% ± {100 * se:.1f}%"

    base, after = pct(acc["base_mean"], acc["base_stderr"]), pct(acc["policy_mean"],
                                                                 acc["policy_stderr"])
    diff = f"+{100 * acc['difference']:.1f} points"
    se = f"{acc['difference_in_stderr']:.1f}"
    gain = f"+{gold['difference']:.3f} = {gold['difference_in_stderr']:.1f} standard errors"
    common = [base, after, f"{rm['heldout_accuracy']:.3f}", f"{rm['noise_ceiling_heldout']:.3f}",
              f"+{gold['sft_mean']:.3f} ± {gold['sft_stderr']:.3f}",
              f"+{gold['ppo_mean']:.3f} ± {gold['ppo_stderr']:.3f}", gain]
    wanted = {"README.md": [*common, f"{diff} ({se} SE)", f"at a KL of {kl['mean']:.2f} nats"],
              "real_model.md": [*common, f"{diff} = {se} standard errors",
                                f"{kl['mean']:.2f} ± {kl['stderr']:.2f} nats per response"]}
    missing = []
    for page in (ROOT / "README.md", ROOT / "docs" / "real_model.md"):
        text = " ".join(page.read_text().split())
        missing += [f"{page.name}: {p}" for p in wanted[page.name] if p not in text]
    assert not missing, missing


def test_readme_data_layouts_are_what_the_loaders_do(tmp_path):
    """The README's data paragraph says how a JSON file holds its rows, that ShareGPT's message
    keys are refused naming the keys, and which call writes rows from pandas: each is what the
    loaders do (a JSON object of columns was read as one row before)."""
    import json

    from rlhf import data

    text = " ".join((ROOT / "README.md").read_text().split())
    call = "df.to_json(path, orient='records', lines=True)"
    assert "A JSON file holds a list of row objects, a JSONL file one object per line" in text
    assert f"is refused with the call that writes rows instead (`{call}`)" in text
    assert "ShareGPT's `from`/`value` keys are refused" in text
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    for name in ("list.json", "lines.jsonl"):
        assert len(data.load_sft_dataset(tmp_path / name)) == 2
    (tmp_path / "columns.json").write_text(json.dumps({"prompt": {"0": "a", "1": "c"},
                                                       "completion": {"0": "b", "1": "d"}}))
    with pytest.raises(ValueError, match=re.escape(call)):
        data.load_sft_dataset(tmp_path / "columns.json")
    (tmp_path / "share.jsonl").write_text(json.dumps(
        {"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}))
    with pytest.raises(ValueError, match="ShareGPT's 'from'/'value' keys; each message needs "
                                         "'role'"):
        data.load_sft_dataset(tmp_path / "share.jsonl")
