"""Data parallelism (rlhf/distributed.py): world size 2 computes what world size 1 computes.

One group of 2 CPU processes (gloo, started as torchrun starts them:
tests/trainer/distributed_worker.py) runs, one after the other: the reward model, PPO and GRPO (each
under ddp and fsdp2; PPO under ddp with the real rollout engine, the others on rollouts that depend
on the prompt rows alone, ``FixedEngine``), the real rollout engine on fsdp2-sharded layers, a
reward-model run resumed from a world-size-1 checkpoint, RL settings the ranks cannot share
(refused before any work), and SFT with a checkpoint every step, during which rank 1 dies. The same
runs in this process (world size 1) are the reference: losses and every other logged number, and
the trained adapters / weights, to fp32 tolerance. The SFT run must stop with a clear error on rank
0 (not hang), leave its step-2 checkpoint, and resume from it here at world size 1 to the same
steps 3 and 4 as an uninterrupted run. Process start-up (torch + transformers, in each rank)
dominates the time. """

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_worker as worker  # noqa: E402

from rlhf import distributed  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

GROUP_SCENARIOS = ["rm", "rm@fsdp2", "rm_resume", "ppo_real", "ppo_gc@fsdp2", "grpo",
                   "grpo@fsdp2", "ppo_steptokens", "dapo_flat", "engine@fsdp2", "refusals",
                   "sft_ckpt"]
# measured, not computed: they differ between any two runs
TIMING_KEYS = {"rollout_s", "scoring_s", "update_s", "iteration_s", "tokens_per_s",
               "pairs_per_s", "peak_memory_mb",
               # padding depends on which rows share a batch (rlhf/packing.py); real tokens do not
               "tokens_padded", "tokens_processed"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-rank group's outputs, and the same scenarios at world size 1."""
    import os
    import shutil

    old_backend = os.environ.get("RLHF_KERNELS_BACKEND")
    os.environ["RLHF_KERNELS_BACKEND"] = "reference"  # as the ranks run (test_stages.py: why)
    try:
        root = tmp_path_factory.mktemp("distributed")
        (root / "ws2").mkdir()
        tokenizer = worker.make_tokenizer(root / "ws2" / "tokenizer")
        # rm_resume: the 2 ranks resume the world-size-1 run's step-1 checkpoint
        worker.run_scenario("rm_every", root / "ws1", tokenizer)
        shutil.copytree(root / "ws1" / "rm_every", root / "ws2" / "rm_resume")
        for later in sorted((root / "ws2" / "rm_resume" / "checkpoints").iterdir())[1:]:
            shutil.rmtree(later)
        results = worker.launch(GROUP_SCENARIOS, root / "ws2",
                                env={"KILL_RANK1_AT_STEP": "2"})
        for scenario in ("rm", "ppo_real", "ppo", "grpo", "ppo_steptokens"):
            worker.run_scenario(scenario, root / "ws1", tokenizer)
        worker.run_scenario("sft_ckpt", root / "ws1", tokenizer)
    finally:
        if old_backend is None:
            os.environ.pop("RLHF_KERNELS_BACKEND", None)
        else:
            os.environ["RLHF_KERNELS_BACKEND"] = old_backend
    return root, results, tokenizer


def metrics(directory: Path) -> list[dict]:
    return [json.loads(line) for line in open(directory / "metrics.jsonl")]


# Fractions of tokens beyond a clip boundary: a token whose ratio or value lies within rounding
# of the boundary counts on either side (the ranks' half-batch matmuls round differently from
# one process's: assert_same_params), which moves the iteration's mean by one token's share of
# one micro-batch: value/clipfrac 0.1979 vs 0.2083 (1/96) in ppo_real's iteration 2 on this
# development machine, every loss and other stat still equal to 1e-4. A wrong reduction moves
# every micro-batch's fraction, and the losses.
CLIP_FRACTION_TOLERANCE = 0.02


def assert_same_metrics(ws1: list[dict], ws2: list[dict], skip=()) -> None:
    assert len(ws1) == len(ws2) > 0
    for one, two in zip(ws1, ws2, strict=True):
        assert one.keys() == two.keys()
        for key, value in one.items():
            if key in TIMING_KEYS or key in skip or not isinstance(value, float):
                assert key in TIMING_KEYS or key in skip or value == two[key], key
                continue
            tolerance = CLIP_FRACTION_TOLERANCE if key.endswith("clipfrac") else 1e-5
            assert math.isclose(value, two[key], rel_tol=1e-4, abs_tol=tolerance), \
                (one.get("step"), key, value, two[key])


def last_params(directory: Path) -> dict[str, torch.Tensor]:
    last = sorted((directory / "checkpoints").iterdir())[-1]
    return load_file(last / "params.safetensors")


def assert_same_params(ws1: dict, ws2: dict) -> None:
    """fp32 tolerance for trained weights. atol 5e-5: the ranks' half-batch matmuls may round
    differently from one process's whole-batch ones (the CPU's GEMM kernels pick their blocking
    by shape), and Adam's normalised step turns a last-bit gradient difference of a weight whose
    gradient is near 0 into a visible one: 1.1e-5 and 1.5e-5 (one element of 2048 each) after
    two SFT steps on an AVX512-BF16 / AMX CPU. A missing or wrong reduction moves most elements
    by about the learning rate."""
    assert ws1.keys() == ws2.keys() and ws1
    for name, value in ws1.items():
        torch.testing.assert_close(ws2[name], value, rtol=1e-4, atol=5e-5, msg=name)


def test_group_ran_and_rank_death_stopped_it_with_a_clear_error(runs):
    root, (rank0, rank1), _ = runs
    assert rank1.returncode == 17, rank1.stderr[-3000:]  # died on purpose in sft_ckpt, step 2
    # rank 0 stopped (launch() fails on a hang) with one clear error, not a traceback of gloo's
    assert rank0.returncode != 0
    assert "RankFailure" in rank0.stderr and "Another rank has most likely died" in \
        rank0.stderr and "--resume" in rank0.stderr, rank0.stderr[-3000:]
    done = json.loads((root / "ws2" / "collectives.json").read_text())
    assert set(done) == set(GROUP_SCENARIOS) - {"sft_ckpt"}, rank0.stderr[-3000:]


@pytest.mark.parametrize("scenario", ["rm", "rm@fsdp2"])
def test_reward_model_world_size_2_equals_1(runs, scenario):
    root = runs[0]
    assert_same_metrics(metrics(root / "ws1" / "rm"), metrics(root / "ws2" / scenario))
    assert_same_params(last_params(root / "ws1" / "rm"), last_params(root / "ws2" / scenario))


def test_world_size_1_checkpoint_resumes_at_world_size_2(runs):
    """The reward model's step-1 checkpoint of a one-process run, resumed by 2 ranks: steps 2-3,
    the final evaluation and the adapters are the uninterrupted one-process run's; rank 0 alone
    says it resumed (each rank printed it)."""
    root, (rank0, rank1), _ = runs
    resumed = root / "ws2" / "rm_resume"
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == \
        ["step-0000001", "step-0000002", "step-0000003"]
    assert_same_metrics(metrics(root / "ws1" / "rm_every"), metrics(resumed))
    assert_same_params(last_params(root / "ws1" / "rm_every"), last_params(resumed))
    assert "[rm] resumed from" in rank0.stdout and "resumed from" not in rank1.stdout


@pytest.mark.parametrize("scenario", ["ppo_real", "ppo_gc@fsdp2", "grpo", "grpo@fsdp2",
                                      "ppo_steptokens"])
def test_rl_update_world_size_2_equals_1(runs, scenario):
    """ppo_real: the real engine, each rank sampling its rows with their part of the global
    batch's draws: the same responses as one process. The others: rollouts that depend on the
    prompt rows alone (FixedEngine). So the same whitened / group advantages, minibatches,
    normalised losses, clipped gradients, KL controller and metrics. The explained variance is
    the mean of the ranks' (documented), not the global one. fsdp2: the policy's and the
    critic's backward in one step (recomputing each layer with its role under gradient
    checkpointing), the reference with the adapters off and the fused lm_head loss all run
    through the sharded layers."""
    root = runs[0]
    reference = scenario.partition("@")[0].removesuffix("_gc")
    ws1, ws2 = metrics(root / "ws1" / reference), metrics(root / "ws2" / scenario)
    assert_same_metrics(ws1, ws2, skip={"value/explained_variance"})
    assert ws1[-1]["policy/approx_kl"] > 1e-6  # the updates moved the policy off the old one
    assert_same_params(last_params(root / "ws1" / reference),
                       last_params(root / "ws2" / scenario))
    # fsdp2 saved the (sharded) base whole: the same weights as the unsharded run
    for name in ("adapters", "heads.safetensors", "base/model.safetensors"):
        assert (root / "ws2" / scenario / "backbone" / name).exists()
    if scenario.endswith("fsdp2"):
        one = load_file(root / "ws1" / reference / "backbone" / "base" / "model.safetensors")
        two = load_file(root / "ws2" / scenario / "backbone" / "base" / "model.safetensors")
        assert one.keys() == two.keys()
        for name, value in one.items():
            assert torch.equal(value, two[name]), name


def test_dynamic_sampling_keeps_every_rank_in_step(runs):
    """DAPO's dynamic sampling with half the prompts' groups flat: the ranks ran the same
    rounds (the engine's stopping test and the gathers are collectives: a rank that sampled
    another round would hang the group) and trained only on groups with a spread."""
    root = runs[0]
    records = metrics(root / "ws2" / "dapo_flat")
    assert [r["iteration"] for r in records] == [1, 2]
    for record in records:
        assert record["dynamic_sampling/rounds"] >= 2  # the first round was not enough
        assert 0 < record["dynamic_sampling/kept_fraction"] < 1
        assert record["dynamic_sampling/filled_groups"] == 0
        assert record["group/zero_std_fraction"] == 0.0
        assert math.isfinite(record["policy/loss"])


def test_other_ranks_draw_no_progress_bars(runs):
    """Rank 0 alone draws the stages' progress bars (docs/distributed.md). tqdm reads
    TQDM_DISABLE when it is imported, before the process group exists, so setting it then left
    rank 1 drawing every bar of every stage into the same terminal."""
    _, (rank0, rank1), _ = runs
    assert "reward model:" in rank0.stderr and "%|" in rank0.stderr, rank0.stderr[-2000:]
    assert "%|" not in rank1.stderr, rank1.stderr[-2000:]


def test_batch_the_ranks_cannot_share_stops_before_any_work(runs):
    """A rollout whose prompts (rollout_batch_size / group_size) do not split evenly, or a
    minibatch with fewer rows than ranks, stops the run with one line naming the setting
    before the rollout engine is built; the minibatch was refused only after a whole rollout
    had been sampled and scored, the prompts once the backbone and the engine were built.
    SFT's and the reward model's micro-batches of fewer rows than ranks: before their data is
    read (they were refused at the first step, once the model had loaded)."""
    result = json.loads((runs[0] / "ws2" / "refusals" / "result.json").read_text())
    assert result == {
        "sft": "ValueError: a micro-batch of 1 rows cannot be split over 2 ranks: it must be at "
               "least the number of processes (2); change batch_size or the number of "
               "processes",
        "rm": "ValueError: a micro-batch of pairs of 1 rows cannot be split over 2 ranks: it "
              "must be at least the number of processes (2); change batch_size or the number "
              "of processes",
        "prompts": "ValueError: a rollout batch of prompts of 3 rows cannot be split over 2 "
                   "ranks: it must be a multiple of the number of processes (2); change "
                   "rollout_batch_size / group_size or the number of processes",
        "minibatch": "ValueError: a minibatch of 1 rows cannot be split over 2 ranks: it must "
                     "be at least the number of processes (2); change minibatch_size or the "
                     "number of processes"}


def test_rollout_engine_on_sharded_layers(runs):
    """fsdp2: the real engine (static KV cache, eager decode) on the sharded backbone samples
    what the whole one samples, and ranks whose rows finish at different steps keep decoding
    together (each step all-gathers every layer), instead of hanging."""
    result = json.loads((runs[0] / "ws2" / "engine@fsdp2" / "result.json").read_text())
    assert result["strategy"] == "fsdp2" and result["same"] == [True, True]
    assert len(set(result["response_lengths"])) == 2  # the ranks stopped at different steps


def test_one_gradient_all_reduce_per_optimizer_step(runs):
    root = runs[0]
    counts = json.loads((root / "ws2" / "collectives.json").read_text())
    rm_steps = len([r for r in metrics(root / "ws1" / "rm") if "loss" in r])
    assert counts["rm"]["gradients"] == rm_steps == 3
    cfg = worker.rl_config("unused", "ppo")
    steps = cfg.num_iterations * cfg.ppo_epochs * cfg.rollout_batch_size \
        // (cfg.minibatch_size * cfg.grad_accum_steps)
    assert counts["ppo_real"]["gradients"] == counts["grpo"]["gradients"] == steps == 8


def test_sft_world_size_2_checkpoint_resumes_at_world_size_1(runs, tmp_path):
    """SFT at world size 2 equals world size 1 until rank 1 dies after step 2; the step-2
    checkpoint it leaves resumes here, in one process, to the uninterrupted run's steps 3-4."""
    import os
    import shutil

    from rlhf import sft

    root, _, tokenizer = runs
    ws1 = root / "ws1" / "sft_ckpt"
    died = root / "ws2" / "sft_ckpt"
    ws2_metrics = metrics(died)
    assert [r["step"] for r in ws2_metrics] == [1, 2]
    assert_same_metrics(metrics(ws1)[:2], ws2_metrics)
    step2 = load_file(ws1 / "checkpoints" / "step-0000002" / "params.safetensors")
    assert_same_params(step2, last_params(died))  # the full model after 2 steps
    assert sorted(p.name for p in (died / "checkpoints").iterdir()) == \
        ["step-0000001", "step-0000002"]  # complete ones only: nothing half-written

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(died, resumed_dir)
    os.environ["RLHF_KERNELS_BACKEND"] = "reference"
    try:
        # the manifest holds the run's output_dir; resume_safe, so the copy resumes
        summary = sft.train(worker.sft_config(resumed_dir, save_every=1, max_steps=4,
                                              keep_last=None, resume=True),
                            model=worker.tiny_model(tokenizer), tokenizer=tokenizer,
                            examples=worker.sft_examples())
    finally:
        os.environ.pop("RLHF_KERNELS_BACKEND", None)
    assert summary["steps"] == 4
    assert_same_metrics(metrics(ws1), metrics(resumed_dir))
    assert_same_params(last_params(ws1), last_params(resumed_dir))


def test_sft_checkpoint_costs_other_ranks_nothing(monkeypatch, tmp_path):
    """Rank 0 alone writes a checkpoint; the other ranks copied the whole model (full-weight
    SFT: every weight) to the host first and threw it away, so that each save took the model's
    size of host memory once per rank (8 copies of a 7B model on an 8-GPU machine)."""
    from rlhf import sft

    class Untouchable(torch.nn.Linear):
        def state_dict(self, *args, **kwargs):
            raise AssertionError("a rank other than 0 read the model for a checkpoint")

        def named_parameters(self, *args, **kwargs):
            raise AssertionError("a rank other than 0 read the model for a checkpoint")

    model = Untouchable(2, 2)
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    cfg = worker.sft_config(tmp_path)
    for lora_rank in (0, 4):  # full-weight: the state dict; LoRA: the trainable parameters
        sft._save(tmp_path / "checkpoints" / "step-0000001", model, optimizer, scheduler, 1,
                  sft.SFTConfig(**{**cfg.__dict__, "lora_rank": lora_rank}))
    assert not (tmp_path / "checkpoints").exists()


def test_a_second_ctrl_c_waits_for_the_interrupt_checkpoint(runs, tmp_path, monkeypatch):
    """Ctrl-C under torchrun reaches every rank twice: from the terminal, and from torchrun's
    agent, which passes the SIGINT it got on to the ranks a few milliseconds later. The second
    one cut rank 0's checkpoint short (atomic: nothing was left), so the run resumed from its
    last periodic checkpoint; held, it comes once the checkpoint is written. One process here,
    both signals sent to itself: the first after step 2, the second as the save begins."""
    import os
    import signal

    from rlhf import sft

    tokenizer = runs[2]  # (the group's: the module's runs have loaded everything)
    real_save = sft._save
    sent = []

    def save_with_second_interrupt(directory, *args, **kwargs):
        if sent == ["first"]:
            sent.append("second")
            os.kill(os.getpid(), signal.SIGINT)  # torchrun's copy
        return real_save(directory, *args, **kwargs)

    def interrupt(step, _metrics):
        if step == 2:
            sent.append("first")
            os.kill(os.getpid(), signal.SIGINT)  # the terminal's

    monkeypatch.setattr(sft, "_save", save_with_second_interrupt)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    with pytest.raises(KeyboardInterrupt):
        sft.train(worker.sft_config(tmp_path / "run", max_steps=4), model=worker.tiny_model(
            tokenizer), tokenizer=tokenizer, examples=worker.sft_examples(), on_step=interrupt)
    assert sent == ["first", "second"]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000002"]


def test_step_metrics_keep_their_precision_beside_half_precision_gradients(monkeypatch):
    """sum_gradients carries the step's metrics (the logged loss) in the gradients' buffer. With
    bf16 gradients alone (full-weight SFT of a model loaded in bf16, transformers' default for
    a bf16 checkpoint) the loss came back rounded to bf16 (2.345678 -> 2.34375) at world size
    2 and not in one process. The all-reduce is emulated as the other ranks adding zeros."""
    reduced = []
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(distributed.dist, "all_reduce",
                        lambda tensor, **_: reduced.append(tensor.dtype))
    half = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    half.grad = torch.full((3,), 0.5, dtype=torch.bfloat16)
    assert distributed.sum_gradients([half], [2.345678, 1e-3]) == [2.345678, 1e-3]
    assert reduced == [torch.float64, torch.bfloat16] and torch.equal(half.grad, 0.5 * half)
    # beside an fp32 bucket (LoRA adapters, heads) they ride in it: one all-reduce each
    wide = torch.nn.Parameter(torch.ones(2))
    wide.grad = torch.full((2,), 0.25)
    reduced.clear()
    summed = distributed.sum_gradients([half, wide], [2.345678])
    assert math.isclose(summed[0], 2.345678, rel_tol=1e-7)
    assert reduced == [torch.bfloat16, torch.float32]


def test_one_process_hooks_change_nothing():
    """Without a process group every hook returns its input: single-process runs are
    bit-identical to what they were (tests/trainer/test_stages.py holds their numbers)."""
    assert not distributed.is_distributed() and distributed.world_size() == 1
    index = torch.arange(5)
    assert distributed.shard(index, even=True) is index
    x, mask = torch.randn(3, 4), torch.ones(3, 4)
    import rlhf_kernels

    assert torch.equal(distributed.masked_whiten(x, mask), rlhf_kernels.masked_whiten(x, mask))
    loss = torch.tensor(1.5)
    assert distributed.weighted(loss, {"a": 1.0}, 1, 2) == (loss, {"a": 1.0})
    assert distributed.sum_gradients([], [0.25, 3.0]) == [0.25, 3.0]
    assert distributed.global_mean([1.0, 2.0]) == 1.5
    assert distributed.strategy() == "none"
    with pytest.raises(ValueError, match="strategy='zero3' is not a strategy"):
        distributed.set_strategy("zero3")


def test_launcher_errors(monkeypatch):
    from rlhf import cli

    with pytest.raises(SystemExit, match="--nproc must be >= 1"):
        cli._launch_torchrun(0, ["sft", "--nproc", "0"])
    assert cli._launch_torchrun(1, ["sft", "--nproc", "1"]) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="already runs under it"):
        cli._launch_torchrun(2, ["sft", "--nproc", "2"])
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not a number"):
        distributed.init_from_env("cpu")


def test_init_from_env_refuses_a_device_the_ranks_cannot_use(monkeypatch):
    """Under torchrun a device setting no rank can run on was a traceback or a crash mid-run:
    device=cuda without CUDA (AttributeError: torch._C has no _cuda_setDevice), more processes
    than GPUs under nccl (CUDA's invalid device ordinal), device=cuda:0 under nccl (every rank
    on GPU 0, refused by NCCL at the first collective). Each is now one line before the
    rendezvous, as is a bad RLHF_DIST_STRATEGY (said once the model had loaded); under gloo,
    ranks beyond the GPUs share them, as docs/distributed.md says."""
    for name, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RLHF_DIST_BACKEND", raising=False)
    monkeypatch.setitem(distributed._STATE, "gpu", None)
    joined, current = [], []
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **_: joined.append(backend))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("RLHF_DIST_STRATEGY", "zero3")  # was said once the model had loaded
    with pytest.raises(ValueError, match="RLHF_DIST_STRATEGY='zero3' is not a strategy"):
        distributed.init_from_env("cpu")
    monkeypatch.delenv("RLHF_DIST_STRATEGY")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda' but .*use device=cpu"):
        distributed.init_from_env("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"process 1 \(LOCAL_RANK\) has no GPU of its own: 1 "
                                         r"CUDA GPU\(s\) visible.*--nproc-per-node"):
        distributed.init_from_env("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="device='cuda:0' under torchrun .* every process "
                                         "would use GPU 0.*write device=cuda"):
        distributed.init_from_env("cuda:0")
    assert joined == [] and current == []  # nothing started
    distributed.init_from_env("cuda")  # nccl, this process's own GPU
    monkeypatch.setenv("RLHF_DIST_BACKEND", "gloo")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    distributed.init_from_env("cuda")  # gloo: the second process shares the one GPU
    assert joined == ["nccl", "gloo"] and current == [1, 0]
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    assert distributed.local_device(torch.device("cuda")) == torch.device("cuda", 0)


def test_rank_0_error_reaches_the_others_as_a_class_the_cli_reports(monkeypatch):
    """An error of rank 0 in open_run or a resume read is raised on every rank. One whose class
    takes more than a message (json.JSONDecodeError, UnicodeDecodeError: ValueErrors, one line
    on rank 0) came back a RuntimeError, which the CLI does not report as bad input: the other
    ranks printed a traceback. It now comes back as the nearest class that takes a message."""
    import json as json_module

    def from_rank_0(box, src):
        box[0] = ("error", json_module.JSONDecodeError, "run.json: Expecting value: line 1")

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "broadcast_object_list", from_rank_0)
    with pytest.raises(ValueError, match=r"^\(from rank 0\) run.json: Expecting value"):
        distributed.broadcast_from_main(lambda: None)


def test_plan_accounts_for_data_parallel_ranks():
    """rlhf plan --gpus N: a rank holds its share of the rows (the KV cache and activations of
    batch / N) but the whole gathered rollout and a flat copy of the gradients; fsdp2 also
    shards the decoder layers (two of them whole at a time)."""
    from rlhf.plan import plan

    one = plan("qwen2.5-7b", batch=64)
    ddp = plan("qwen2.5-7b", batch=64, gpus=8)
    fsdp = plan("qwen2.5-7b", batch=64, gpus=8, strategy="fsdp2")
    alone = plan("qwen2.5-7b", batch=8)  # one GPU with a rank's rows
    assert ddp["resident"]["kv_cache"] == alone["resident"]["kv_cache"] \
        == one["resident"]["kv_cache"] // 8
    assert ddp["resident"]["rollout_tensors"] == one["resident"]["rollout_tensors"]
    assert ddp["stages"]["update"]["grads"] == 2 * alone["stages"]["update"]["grads"]
    assert ddp["resident"]["weights"] == one["resident"]["weights"]
    # weights - layers + layers / 8 + 2 layers / 28 (Qwen2.5-7B: 28 layers, untied lm_head)
    layers = (one["resident"]["weights"] - fsdp["resident"]["weights"]) / (1 - 1 / 8 - 2 / 28)
    assert 0.8 * one["resident"]["weights"] < layers < one["resident"]["weights"]
    assert fsdp["peak_bytes"] < ddp["peak_bytes"] < one["peak_bytes"]
    assert ddp["inputs"]["batch"] == 64 and ddp["inputs"]["batch_per_gpu"] == 8
    with pytest.raises(ValueError, match="gpus must be an integer >= 1"):
        plan("qwen2.5-7b", gpus=0)


def test_fsdp2_refusals(monkeypatch):
    """fsdp2 shards frozen plain weights: SFT (it trains or merges into every weight) and a
    bitsandbytes-quantized base are refused with what to use instead; auto falls back to ddp."""
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)

    class Params4bit(torch.nn.Parameter):  # the name bitsandbytes' packed 4-bit weights carry
        pass

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    try:
        distributed.set_strategy("fsdp2")
        with pytest.raises(ValueError, match="SFT runs data-parallel"):
            distributed.prepare(model, torch.device("cpu"), [], stage="sft")
        # a command whose later stages take fsdp2 (rlhf pipeline) runs its SFT with ddp
        with distributed.replicated_sft():
            assert distributed.prepare(model, torch.device("cpu"), [], stage="sft") is model
            assert distributed.strategy() == "ddp"
        with pytest.raises(ValueError, match="SFT runs data-parallel"):
            distributed.prepare(model, torch.device("cpu"), [], stage="sft")
        model[0].weight = Params4bit(model[0].weight.detach(), requires_grad=False)
        with pytest.raises(ValueError, match="cannot shard a bitsandbytes-quantized base"):
            distributed.prepare(model, torch.device("cpu"), [], stage="rm")
        distributed.set_strategy("auto")
        assert distributed.prepare(model, torch.device("cpu"), [], stage="rm") is model
        assert distributed.strategy() == "ddp"
    finally:
        distributed.set_strategy(None)


def test_the_pipeline_runs_its_sft_stage_replicated_under_fsdp2(tmp_path, monkeypatch):
    """`rlhf pipeline strategy=fsdp2 --nproc N` shards the reward and RL stages; its SFT stage
    (every weight trained) takes ddp instead of refusing fsdp2 and stopping the pipeline: the
    pipeline's sft.train runs inside distributed.replicated_sft, where prepare(stage="sft") under
    fsdp2 gives ddp (test_fsdp2_refusals)."""
    from rlhf import pipeline, sft
    from tests.helpers import micro_config

    class Stop(Exception):
        pass

    def sft_train(*args, **kwargs):  # what the stage asks of distributed, as on rank 0 of 2
        model = torch.nn.Linear(2, 2)
        with monkeypatch.context() as ranks:
            ranks.setattr(distributed, "is_distributed", lambda: True)
            assert distributed.prepare(model, torch.device("cpu"), [], stage="sft") is model
            seen.append(distributed.strategy())
        raise Stop

    seen = []
    monkeypatch.setattr(sft, "train", sft_train)
    try:
        distributed.set_strategy("fsdp2")
        with pytest.raises(Stop):
            pipeline.run(micro_config(tmp_path / "run"))
        assert seen == ["ddp"]
    finally:
        distributed.set_strategy(None)
