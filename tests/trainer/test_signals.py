"""SIGHUP (a closed terminal, a dropped ssh session, for a run started without nohup) stops a
run as SIGTERM and Ctrl-C do: the stage saves the checkpoint of its last whole step, the CLI
names the signal and the --resume command, exit status 128 + SIGHUP = 129. Before, Python's
default action ended the process at once, with no checkpoint.

The checkpoint a stage writes on the interrupt, and the exact resume from it, are the same code
path for every signal (tests/trainer/test_resume_defects.py runs it with SIGTERM); here: that SIGHUP
takes that path, from another process, with the terminal gone.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rlhf import checkpoint, cli, sft

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP (Windows)")
ROOT = Path(__file__).resolve().parents[2]


def _unhandled(signum, _frame):
    raise AssertionError("the SIGHUP reached the handler outside the run (by default: the "
                         "process ends at once, with no checkpoint)")


@pytest.fixture
def sighup_restored():
    """SIGHUP's handler outside the run, in place of the default (which would end pytest)."""
    previous = signal.signal(signal.SIGHUP, _unhandled)
    yield
    signal.signal(signal.SIGHUP, previous)


def test_the_cli_says_a_sighup_and_exits_129(monkeypatch, capsys, tmp_path, sighup_restored):
    """`rlhf <stage>` under SIGHUP: the stage's interrupt path (Terminated, a KeyboardInterrupt),
    then one line naming SIGHUP and the --resume command, exit status 128 + 1."""
    seen = []

    def entry_point(cfg):
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(5)  # the handler runs before this returns
        except KeyboardInterrupt as interrupt:  # where a stage saves its checkpoint
            seen.append((type(interrupt), interrupt.signum))
            raise
        return {}

    monkeypatch.setattr(sft, "train", entry_point)
    code = cli.main(["sft", f"output_dir={tmp_path / 'run'}", "max_steps=3"])
    assert code == cli.EXIT_HANGUP == 129
    assert seen == [(cli.Terminated, signal.SIGHUP)]
    err = capsys.readouterr().err
    assert "rlhf sft: terminated (SIGHUP). Continue with `rlhf sft" in err and "--resume`" in err
    assert signal.getsignal(signal.SIGHUP) is _unhandled  # put back after the run


def test_an_optimizer_step_holds_a_sighup_until_it_is_whole(sighup_restored):
    """interrupts_held (around each SFT / reward-model optimizer step) holds SIGHUP as it holds
    SIGINT and SIGTERM: the step finishes, then the CLI's Terminated comes."""
    done = []
    with pytest.raises(cli.Terminated) as raised, cli.sigterm_as_interrupt():
        with checkpoint.interrupts_held():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)
            done.append("the rest of the step")
    assert done == ["the rest of the step"] and raised.value.signum == signal.SIGHUP


def test_a_sighup_ignored_by_nohup_stays_ignored(sighup_restored):
    """Under nohup (SIGHUP ignored) the run outlives the terminal, as it did before."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with cli.sigterm_as_interrupt(), checkpoint.interrupts_held():
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


# A stage that steps until it is interrupted, then does what the stages do: save a checkpoint,
# print a line, re-raise. Run by the real CLI (cli.main) in a process of its own: the real
# stages need seconds of model set-up; their checkpoint on an interrupt is tested elsewhere.
_STAGE = '''
import dataclasses, sys, time
from pathlib import Path
from rlhf import cli

@dataclasses.dataclass
class Config:
    output_dir: str = "run"
    resume: bool = False

def train(cfg):
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    step = 0
    try:
        while True:
            step += 1
            print(f"step {step}", flush=True)
            if step == 3:
                (out / "started").write_text("")
            time.sleep(0.02)
    except KeyboardInterrupt:
        (out / "checkpoint").write_text(str(step))
        print(f"[loop] interrupted at step {step}; checkpoint saved", flush=True)
        # what holds the stream itself writes there too (a progress bar, a logging handler)
        sys.__stderr__.write("closing the progress bar\\n")
        sys.__stderr__.flush()
        raise

cli.STAGES["loop"] = cli.Stage("__main__", "Config", "train", "a loop")
sys.exit(cli.main(["loop", "output_dir=" + sys.argv[1]]))
'''


def test_a_run_whose_terminal_hung_up_saves_and_exits_129(tmp_path):
    """The ssh session drops: the terminal (a pty) is gone, so every write to it fails (EIO),
    then SIGHUP comes. The stage saves its checkpoint, its 'interrupted' line, what a progress
    bar writes to the stream it holds and the CLI's line go nowhere instead of raising OSError
    (which ended the run with exit status 1 and a traceback), and the exit status is 129."""
    run = tmp_path / "run"
    master, slave = os.openpty()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("RLHF_TRACEBACK", None)
    env.pop("WORLD_SIZE", None)
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_STAGE), str(run)],
                               stdin=slave, stdout=slave, stderr=slave, env=env,
                               start_new_session=True)
    os.close(slave)
    try:
        deadline = time.monotonic() + 60
        while not (run / "started").exists():
            assert process.poll() is None, "the stage ended before it was signalled"
            assert time.monotonic() < deadline, "the stage did not start within 60 s"
            if select.select([master], [], [], 0.05)[0]:
                os.read(master, 65536)  # keep the pty's buffer from filling
    finally:
        os.close(master)  # the hang-up: the slave side now fails every write with EIO
    process.send_signal(signal.SIGHUP)
    try:
        code = process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 129, f"exit status {code} (-1: killed by the SIGHUP)"
    assert int((run / "checkpoint").read_text()) >= 3


# ------------------------------------------------------------------ --nproc N: the launcher
_LAUNCHER = '''
import sys
sys.path.insert(0, sys.argv[1])  # the real trainer (the working directory has the stand-in)
from rlhf import cli
cli._launch_torchrun(2, ["sft", "--nproc", "2"], "rlhf sft 'a=b c' --nproc 2 --resume")
'''
_STAND_IN_RANK = '''
import os, time
from pathlib import Path
Path(os.environ["RANKS_DIR"], os.environ["RANK"]).write_text(str(os.getpid()))
while True:
    time.sleep(0.1)
'''


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_kill_of_an_nproc_launch_stops_its_ranks(tmp_path):
    """`rlhf <stage> --nproc 2` ran torchrun as its child: `kill PID` (or timeout, or a closed
    terminal) ended the launcher alone, and torchrun and both ranks trained on in the
    background, orphaned, holding output_dir's lock. The launcher now becomes torchrun, which
    stops every rank, says so in one line and exits 128 + SIGTERM. The ranks are stand-ins
    (a loop), so that no rank imports the trainer."""
    stand_in = tmp_path / "ranks" / "rlhf"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text("")
    (stand_in / "__main__.py").write_text(_STAND_IN_RANK)
    ranks = tmp_path / "pids"
    ranks.mkdir()
    env = {**os.environ, "RANKS_DIR": str(ranks)}
    for name in ("PYTHONPATH", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                 "MASTER_PORT"):
        env.pop(name, None)
    log = tmp_path / "launcher.log"
    with open(log, "w") as out:
        # run where `python -m rlhf` (each rank's command) finds the stand-in first
        launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(ROOT)], env=env,
                                    cwd=stand_in.parent, stdout=out, stderr=out,
                                    start_new_session=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while len(pids) < 2:
            assert launcher.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the ranks did not start within 90 s"
            time.sleep(0.1)
            pids = [int(p.read_text()) for p in ranks.iterdir() if p.read_text()]
        launcher.send_signal(signal.SIGTERM)
        code = launcher.wait(60)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids), "the ranks outlived the killed launcher"
        assert code == 128 + signal.SIGTERM, f"exit status {code}\n{log.read_text()[-2000:]}"
        said = log.read_text()
        assert ("rlhf: torchrun got SIGTERM and stopped every process; continue the run with "
                "`rlhf sft 'a=b c' --nproc 2 --resume`") in said
        assert "Traceback" not in said
    finally:
        for pid in [launcher.pid, *pids]:  # only what this test started
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.wait(10)
