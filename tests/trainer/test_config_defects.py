"""Settings a new user gets wrong, refused early with one line that names what they typed."""

from __future__ import annotations

import pytest
import torch

from rlhf import cli, pipeline, reward, rl, sft
from rlhf.config import load_config


def _error_line(capsys, argv: list[str]) -> str:
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse's parser.error (rlhf plan)
        status = exit_.code
    assert status == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"rlhf {argv[0]}: error: "), err
    return err[0]


# ---- a paged optimizer where there is no GPU ------------------------------------------------
@pytest.mark.parametrize("command", ["sft", "rm", "ppo", "grpo"])
def test_a_paged_optimizer_on_the_cpu_is_refused_with_the_settings(capsys, tmp_path, command,
                                                                   monkeypatch):
    """`rlhf sft optimizer=paged_adamw device=cpu` loaded the model (tokenised the corpus,
    seconds to minutes) before the optimizer refused it; it is now refused as the settings are
    read: nothing loads (the stage's entry point is never reached)."""
    module = {"sft": sft, "rm": reward, "ppo": rl, "grpo": rl}[command]
    monkeypatch.setattr(module, "train", lambda cfg: pytest.fail("the stage started"))
    line = _error_line(capsys, [command, "optimizer=paged_adamw8bit", "device=cpu",
                                f"output_dir={tmp_path / 'run'}"])
    assert line.split(": error: ", 1)[1] == (
        "optimizer='paged_adamw8bit' pages optimizer state between the GPU and the host; on "
        "device 'cpu' there is nothing to page; use optimizer=adamw8bit (8-bit moments, runs "
        "on the CPU), or use optimizer=adamw")
    assert not (tmp_path / "run").exists()


def test_a_paged_optimizer_of_a_pipeline_stage_is_named_as_typed(capsys):
    """The pipeline sets its stages' device: the stage's refusal names the stage's key."""
    line = _error_line(capsys, ["pipeline", "ppo.optimizer=paged_adamw", "device=cpu",
                                "--print-config"])
    assert line.startswith("rlhf pipeline: error: ppo.optimizer='paged_adamw' pages optimizer "
                           "state"), line
    assert "use ppo.optimizer=adamw8bit" in line


@pytest.mark.parametrize("stage, make", [
    ("sft", lambda tmp: sft.SFTConfig(output_dir=str(tmp), optimizer="paged_adamw")),
    ("reward", lambda tmp: reward.RewardConfig(output_dir=str(tmp), optimizer="paged_adamw")),
    ("rl", lambda tmp: rl.GRPOConfig(output_dir=str(tmp), optimizer="paged_adamw")),
])
def test_a_paged_optimizer_with_device_auto_on_a_cpu_machine_stops_before_the_run(
        tmp_path, monkeypatch, stage, make):
    """device=auto: where it lands is known once the run starts (a config file may serve a GPU
    machine and a laptop, so the config itself is accepted); on a machine without CUDA the
    stage stops before its run directory is opened and anything loads."""
    from rlhf import checkpoint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = make(tmp_path / "run")  # accepted: auto may be a GPU elsewhere
    monkeypatch.setattr(checkpoint, "open_run", lambda *a, **k: pytest.fail("the run started"))
    module = {"sft": sft, "reward": reward, "rl": rl}[stage]
    with pytest.raises(ValueError, match=r"^optimizer='paged_adamw' .* on device 'cpu' there "
                                         r"is nothing to page"):
        module.train(cfg)


def test_a_paged_optimizer_with_device_auto_stops_the_pipeline_before_its_first_stage(
        tmp_path, monkeypatch):
    """The pipeline's RL stage comes last: without the check at the start, SFT and the reward
    model trained before it refused ppo.optimizer=paged_adamw on a machine without CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(pipeline.PipelineConfig, None, [f"output_dir={tmp_path / 'run'}",
                                                       "ppo.optimizer=paged_adamw"])
    monkeypatch.setattr(pipeline, "open_run", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(ValueError, match=r"^ppo.optimizer='paged_adamw' .* nothing to page"):
        pipeline.run(cfg)


# ---- absurd numbers for integer settings ---------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    ("1e30", "must be an integer of at most 2**53 (9007199254740992) in size, got '1e30'"),
    ("-1e30", "must be an integer of at most 2**53 (9007199254740992) in size, got '-1e30'"),
    (str(10**30), f"must be an integer of at most 2**53 (9007199254740992) in size, got "
                  f"{10**30}"),
    ("1e400", "must be an integer, got '1e400'"),
    ("inf", "must be an integer, got 'inf'"),
    ("nan", "must be an integer, got 'nan'"),
    ("2.5", "must be an integer, got 2.5"),
    ("-3", "rollout_batch_size=-3 is out of range: rollout_batch_size must be an integer >= 1"),
])
def test_an_absurd_rollout_batch_size_is_said_as_typed(capsys, value, expected):
    """`rlhf ppo rollout_batch_size=1e30` was read as 1000000000000000019884624838656 and
    refused as "kl_horizon=500 is too short for rollout_batch_size=1000...": another setting's
    error, about a number the user never typed."""
    line = _error_line(capsys, ["ppo", f"rollout_batch_size={value}", "--print-config"])
    assert "kl_horizon" not in line
    message = line.split(": error: ", 1)[1].removesuffix("; no setting of this trainer needs more")
    assert message in (f"config key 'rollout_batch_size' {expected}", expected), line


@pytest.mark.parametrize("value, parsed", [("1e15", 10**15), ("9007199254740992", 2**53),
                                           ("-4", -4), ("64.0", 64)])
def test_integers_up_to_the_limit_are_read_exactly(value, parsed):
    """Whole numbers in float notation up to 2**53 are exact (the limit is the first one whose
    neighbours a float cannot tell apart); a YAML file's value is read as the command line's."""
    from rlhf.config import _coerce, _CommandLineValue

    assert _coerce(_CommandLineValue(value), int, "n") == parsed
    assert _coerce(float(value), int, "n") == parsed
    with pytest.raises(ValueError, match=r"^config key 'n' must be an integer of at most 2\*\*53"):
        _coerce(2**53 + 1, int, "n")


def test_an_absurd_integer_in_a_yaml_file_is_named(tmp_path, capsys):
    """The same from a config file (YAML reads 1e30 as a string, 1.0e+30 as a float)."""
    path = tmp_path / "ppo.yaml"
    path.write_text("num_iterations: 1.0e+30\n")
    line = _error_line(capsys, ["ppo", str(path), "--print-config"])
    assert line == ("rlhf ppo: error: config key 'num_iterations' must be an integer of at most "
                    "2**53 (9007199254740992) in size, got 1e+30; no setting of this trainer "
                    "needs more")


# ---- sizes the model or the machine cannot take ---------------------------------------------
def test_a_lora_rank_above_every_layers_rank_is_refused_before_the_adapters():
    """`rlhf sft lora_rank=100000` on a small model allocated adapters larger than the model
    for minutes (a 1e15 rank ended in an out-of-memory traceback); LoraSpec.peft_config, which
    every stage's adapters go through, now checks the rank first. The layers here have the
    shapes of a Llama's (hidden 16, MLP 48): the widest narrow side is 16, so rank 16 passes
    and 17 is refused; the lm_head (40 x 16) never takes an adapter and does not count."""
    from torch import nn

    from rlhf.adapters import LoraSpec

    class Shaped(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj = nn.Linear(16, 16), nn.Linear(16, 8)
            self.up_proj, self.down_proj = nn.Linear(16, 48), nn.Linear(48, 16)
            self.lm_head = nn.Linear(16, 400)

        def get_output_embeddings(self):
            return self.lm_head

    model = Shaped()
    LoraSpec(rank=16).check_rank(model)
    with pytest.raises(ValueError, match=r"^lora_rank=17 is more than the rank of any layer it "
                                         r"adapts \(at most 16 in this model"):
        LoraSpec(rank=17).check_rank(model)
    # only the targeted layers count: k_proj alone is 8 at its narrow side
    LoraSpec(rank=8, target_modules=["k_proj"]).check_rank(model)
    with pytest.raises(ValueError, match=r"at most 8 in this model"):
        LoraSpec(rank=9, target_modules=["k_proj"]).check_rank(model)


@pytest.mark.parametrize("message, said", [
    ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.15 GiB "
     "of which 3.20 GiB is free. Including non-PyTorch memory, this process has 75.9 GiB memory "
     "in use. If reserved but unallocated memory is large try setting "
     "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.",
     "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.15 GiB "
     "of which 3.20 GiB is free. Lower the batch"),
    ("rlhf_kernels CPU block cache: not enough memory: you tried to allocate 256 bytes.",
     "rlhf_kernels CPU block cache: not enough memory: you tried to allocate 256 bytes. Lower "
     "the batch"),
    ("alloc failed", "out of memory: alloc failed. Lower the batch"),
])
def test_out_of_memory_is_one_line_that_says_what_to_lower(capsys, tmp_path, monkeypatch,
                                                           message, said):
    """torch.OutOfMemoryError (a batch, length or rank too large for the card or the host)
    ended a run in a traceback; it is now the command's one error line, with torch's first
    sentences and the settings that lower the memory."""
    import torch

    def out_of_memory(cfg):
        raise torch.OutOfMemoryError(message)

    monkeypatch.setattr(sft, "train", out_of_memory)
    line = _error_line(capsys, ["sft", f"output_dir={tmp_path / 'run'}"])
    assert line.startswith(f"rlhf sft: error: {said}"), line
    assert line.endswith("or set gradient_checkpointing=true; `rlhf plan MODEL` estimates what "
                         "fits"), line
    monkeypatch.setenv("RLHF_TRACEBACK", "1")
    with pytest.raises(torch.OutOfMemoryError):
        cli.main(["sft", f"output_dir={tmp_path / 'run'}"])


@pytest.mark.parametrize("reserve, fix", [("-5", "pass --reserve 0 or more (1 is usual)"),
                                          ("nan", "pass --reserve 0 or more (1 is usual)"),
                                          ("24", "pass a smaller --reserve")])
def test_a_reserve_out_of_range_says_which_way_to_go(capsys, reserve, fix):
    """`rlhf plan tiny --reserve -5` said "pass a smaller --reserve" (a 24 GiB card: the
    default)."""
    line = _error_line(capsys, ["plan", "tiny", "--reserve", reserve])
    assert line.endswith(f"got {float(reserve):g}; {fix}"), line


# ---- an empty value on the command line ----------------------------------------------------
@pytest.mark.parametrize("argv, key", [(["sft", "model="], "model"),
                                       (["sft", "dataset= "], "dataset"),
                                       (["pipeline", "sft.model="], "sft.model"),
                                       (["grpo", "kl_target="], "kl_target")])
def test_an_empty_value_is_not_taken_as_null(capsys, argv, key):
    """`rlhf sft model=$MODEL` with MODEL unset read as model=null: the built-in tiny model
    trained from scratch on the built-in corpus, without a word. An empty value is refused;
    null is written null."""
    line = _error_line(capsys, [*argv, "--print-config"])
    assert line.split(": error: ", 1)[1] == (
        f"config key {key!r} is given empty ({key}=), which would mean null, its default; an "
        f"unset shell variable ({key}=$VAR) does this. Give a value, or write {key}=null for "
        f"the default")
    assert cli.main([*[arg.split("=")[0] + "=null" if "=" in arg else arg for arg in argv],
                     "--print-config"]) == 0


# ---- cpu_threads beyond any machine ---------------------------------------------------------
@pytest.mark.parametrize("argv, shown", [
    (["sft", "cpu_threads=1e15"], "cpu_threads=1000000000000000"),
    (["grpo", "cpu_threads=5000"], "cpu_threads=5000"),
    (["pipeline", "cpu_threads=5000"], "cpu_threads=5000"),
    (["frontier", "cpu_threads=5000"], "cpu_threads=5000"),
])
def test_a_thread_count_beyond_any_machine_is_refused(capsys, argv, shown):
    """cpu_threads=1e15 ended in torch's bare "Overflow when unpacking long"; 1000000 was
    accepted and torch.set_num_threads started the threads (minutes). The frontier named its
    own cpu_threads as base.cpu_threads."""
    line = _error_line(capsys, [*argv, "--print-config"])
    assert line.split(": error: ", 1)[1].startswith(
        f"{shown} is out of range: cpu_threads must be at most 4096 (this machine has ")


def test_the_frontier_names_its_own_settings_as_typed(capsys):
    line = _error_line(capsys, ["frontier", "cpu_threads=0", "--print-config"])
    assert line.split(": error: ", 1)[1] == (
        "cpu_threads=0 is out of range: cpu_threads must be an integer >= 1")


def test_more_threads_than_the_machine_has_is_said(monkeypatch):
    from rlhf import stage

    monkeypatch.setattr(stage.os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    with pytest.warns(UserWarning, match=r"cpu_threads=3 is more than this machine's 2 CPU "
                                         r"threads.*slower than cpu_threads=2"):
        with stage.limited_cpu_threads("cpu", 3):
            assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == before
