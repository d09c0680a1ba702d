"""`rlhf pipeline`, `rlhf frontier` and a stop signal under torchrun: 2 CPU ranks (gloo,
started as torchrun starts them by tests/trainer/distributed_worker.py), one group for all three
scenarios.

- pipeline: the micro pipeline of tests/helpers.py. Every rank wrote output_dir (the tokenizer's
  directory raced: "Directory not empty"); rank 1 now writes nothing there, and the two ranks
  return the same summary (the same pairs, stages and held-out figures).
- frontier: `rlhf frontier` on the micro pipeline with one PPO point, then resumed: rank 1
  wrote each point's result and frontier.json/.md/.png too, and read the finished files for
  itself on --resume; now rank 0 alone reads and writes them, and both ranks print nothing twice.
- cli_sigterm: `rlhf sft` through the CLI, rank 1 alone gets SIGTERM after step 2. Before, a
  SIGTERM ended a rank at once (no checkpoint, the other left to fail in its next collective);
  now both ranks stop at step 3's gradient all-reduce, rank 0 saves the step-2 checkpoint, both
  exit with 143, and only rank 0 says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_worker as worker  # noqa: E402

from tests.helpers import read_jsonl, without_timings  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun_pipeline")
    tokenizer = worker.make_tokenizer(root / "tokenizer")
    model = worker.tiny_model(tokenizer)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "sft.jsonl").write_text("".join(json.dumps(row) + "\n"
                                            for row in worker.sft_examples()))
    rank0, rank1 = worker.launch(["pipeline", "frontier", "cli_sigterm"], root, timeout=300)
    return root, rank0, rank1


def _timeless(summary: dict) -> dict:
    """A summary without what each rank measures for itself (seconds, speeds)."""
    return {key: without_timings(value) if key == "ppo_last_iteration" else value
            for key, value in summary.items() if key != "timings_s"}


def test_the_pipeline_writes_on_rank_0_alone_and_the_ranks_agree(group):
    root, rank0, rank1 = group
    assert (root / "pipeline.rank0.json").exists(), rank0.stderr[-3000:]
    assert (root / "pipeline.rank1.json").exists(), rank1.stderr[-3000:]
    zero = json.loads((root / "pipeline.rank0.json").read_text())
    one = json.loads((root / "pipeline.rank1.json").read_text())
    assert one["written"] == []  # rank 0 alone created or renamed anything under output_dir
    assert _timeless(zero["summary"]) == _timeless(one["summary"])
    assert zero["summary"]["world_size"] == 2
    out = root / "pipeline"
    for name in ("tokenizer/tokenizer_config.json", "pairs.jsonl", "sft/summary.json",
                 "rm/summary.json", "ppo/summary.json", "metrics.jsonl", "curves.png",
                 "samples.md", "summary.json"):
        assert (out / name).exists(), name
    # the written summary is the one both ranks returned (JSON turns tuples into lists)
    written = json.loads((out / "summary.json").read_text())
    assert _timeless(written) == _timeless(zero["summary"])
    # the pairs both ranks trained on are the file's
    assert len(read_jsonl(out / "pairs.jsonl")) == \
        zero["summary"]["reward_model"]["train_pairs"] + \
        zero["summary"]["reward_model"]["heldout_pairs"]


def test_a_sigterm_on_one_rank_stops_both_at_one_step_with_a_checkpoint(group):
    root, rank0, rank1 = group
    assert (rank0.returncode, rank1.returncode) == (143, 143), \
        (rank0.stderr[-3000:], rank1.stderr[-3000:])
    out = root / "cli_sigterm"
    # save_every=0: the only checkpoint is the interrupt's, of the last whole step
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]
    assert [row["step"] for row in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert "[sft] interrupted at step 2; checkpoint saved" in rank0.stdout
    assert "rlhf sft: terminated (SIGTERM). Continue with `rlhf sft" in rank0.stderr
    # the user-facing lines come once, from rank 0
    assert "interrupted" not in rank1.stdout + rank1.stderr
    assert "terminated" not in rank1.stdout + rank1.stderr
    assert "Traceback" not in rank0.stderr + rank1.stderr


@pytest.fixture
def stop_handlers(monkeypatch):
    """This process as a rank under torchrun with the stop handlers installed (the other rank's
    part of each all-reduce is emulated by the test); the handlers of before come back."""
    import signal

    from rlhf import distributed

    before = {number: signal.getsignal(number) for number in distributed._stop_signals()}
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "_device", lambda: torch.device("cpu"))
    distributed.install_stop_handlers()
    yield distributed
    distributed._remove_stop_handlers()
    assert {number: signal.getsignal(number) for number in before} == before


def _other_rank_adds(distributed, monkeypatch, last: float):
    """dist.all_reduce as if the other rank's tensor were zeros but for its stop flag (the last
    element): ``last`` (0: no signal there)."""
    def all_reduce(tensor, op=None):
        if op == distributed.dist.ReduceOp.MAX:
            tensor[-1] = max(float(tensor[-1]), last)
        else:
            tensor[-1] += last
    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)


def test_a_sigterm_is_noted_and_every_rank_stops_at_the_next_gradient_all_reduce(
        stop_handlers, monkeypatch):
    """Under torchrun SIGTERM no longer ends a rank where it is: it sets the rank's flag, which
    rides in the step's gradient all-reduce (no extra collective); a flag on any rank raises
    the CLI's Terminated on every rank there, before the optimizer step."""
    import os
    import signal

    from rlhf import cli

    distributed = stop_handlers
    weight = torch.nn.Parameter(torch.ones(2))
    weight.grad = torch.full((2,), 0.5)
    _other_rank_adds(distributed, monkeypatch, 0.0)
    assert distributed.sum_gradients([weight], [1.25]) == [1.25]  # nobody signalled
    distributed.check_stop()
    os.kill(os.getpid(), signal.SIGTERM)  # this rank: noted, the process goes on
    assert distributed.stop_requested()
    with pytest.raises(cli.Terminated) as raised:
        distributed.sum_gradients([weight], [1.25])
    assert raised.value.signum == signal.SIGTERM and raised.value.exit_code == 143
    assert not distributed.stop_requested()  # said once
    _other_rank_adds(distributed, monkeypatch, float(signal.SIGTERM))  # only the other rank
    with pytest.raises(cli.Terminated):
        distributed.sum_gradients([weight], [1.25])
    with pytest.raises(cli.Terminated):  # the pipeline's check between stages
        distributed.check_stop()


def test_a_sigterm_held_by_an_optimizer_step_is_noted_after_it(stop_handlers):
    """interrupts_held (around each optimizer step) gives a SIGTERM that came during the step to
    the stop handler once the step is whole: noted, not lost and not fatal."""
    import os
    import signal

    from rlhf import checkpoint

    distributed = stop_handlers
    with checkpoint.interrupts_held():
        os.kill(os.getpid(), signal.SIGTERM)
        assert not distributed.stop_requested()
    assert distributed.stop_requested()


def test_an_error_of_rank_0_is_said_once(monkeypatch, capsys, tmp_path):
    """An error of rank 0 that every rank raises (broadcast_from_main: open_run refusing a
    --resume with changed settings, the pipeline's pairs) was printed by every rank, the others'
    lines "(from rank 0) ..." copies of rank 0's. The CLI of another rank now leaves it to rank
    0: exit status 2, no line; rank 0's own error is said as before."""
    from rlhf import cli, distributed, sft

    def from_rank_0(box, src):
        box[0] = ("error", ValueError, "--resume of 'run' with settings that differ")

    def train(cfg):
        return distributed.broadcast_from_main(lambda: {})

    monkeypatch.setattr(sft, "train", train)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "broadcast_object_list", from_rank_0)
    arguments = ["sft", f"output_dir={tmp_path / 'run'}", "max_steps=3"]
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert cli.main(arguments) == cli.EXIT_USAGE
    assert "error" not in capsys.readouterr().err
    monkeypatch.setattr(distributed, "rank", lambda: 0)  # rank 0: its own error, said

    def refused():
        raise ValueError("--resume of 'run' with settings that differ")

    monkeypatch.setattr(sft, "train", lambda cfg: distributed.broadcast_from_main(refused))
    assert cli.main(arguments) == cli.EXIT_USAGE
    assert "rlhf sft: error: --resume of 'run' with settings that differ" in \
        capsys.readouterr().err


def test_the_frontier_writes_on_rank_0_alone_and_resumes_from_its_files(group):
    """rlhf frontier wrote each point's result.json and frontier.json/.md/.png on every rank,
    and each rank read the finished base and points for itself on --resume."""
    root, rank0, rank1 = group
    assert (root / "frontier.rank1.json").exists(), rank1.stderr[-3000:]
    zero = json.loads((root / "frontier.rank0.json").read_text())
    one = json.loads((root / "frontier.rank1.json").read_text())
    assert one["written"] == []
    timeless = [{k: v for k, v in r["summary"]["points"][0].items()
                 if k not in ("rl_seconds", "peak_memory_mb")} for r in (zero, one)]
    assert timeless[0] == timeless[1]
    out = root / "frontier"
    written = json.loads((out / "frontier.json").read_text())
    assert written["points"] == json.loads(json.dumps(zero["summary"]["points"]))
    for name in ("frontier.md", "frontier.png", "points/ppo-kl0.1/result.json",
                 "base/summary.json"):
        assert (out / name).exists(), name
    # resumed: nothing run again, every rank returns what rank 0 read from the files
    for rank in (0, 1):
        resumed = json.loads((root / f"frontier.resumed.rank{rank}.json").read_text())
        assert resumed["points"] == written["points"]
    assert rank1.stdout.count("[frontier]") == 0 and rank0.stdout.count("[frontier] wrote") == 2
