"""The memory planner (rlhf/plan.py) against a measured CPU-side accounting of a real PPO step.

What is measured: ``LiveTensorTracker`` sums the bytes of every live tensor storage (weights,
optimizer state, KV cache, activations, gradients, kernel outputs) around each ATen op of one
iteration of benchmarks/e2e_ppo.py (rollout with the engine, scoring, GAE, PPO update with
gradient checkpointing) on a tiny model, and records the peak per stage. Not measured: memory
that is not a tensor (Triton-interpreter copies, BLAS workspaces) and allocator slack; the GPU
check against torch.cuda.max_memory_allocated is the benchmark's job.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.e2e_ppo import (
    E2EConfig,
    StageClock,
    build_backbone,
    make_optimizer,
    ppo_iteration,
    synthetic_prompts,
)
from rlhf import plan as planner
from rlhf.engine import RolloutEngine

GIB = 2**30


def _measure(cfg: E2EConfig, backbone=None) -> tuple[int, dict[str, int]]:
    """(resident bytes before the iteration, peak bytes per stage) of the second iteration."""
    from rlhf.quant import quant_state_tensors

    device = torch.device("cpu")
    backbone = backbone if backbone is not None else build_backbone(cfg)
    optimizer = make_optimizer(backbone, cfg)
    engine = RolloutEngine(backbone)
    prompt_ids, prompt_mask = synthetic_prompts(cfg, backbone.vocab_size, device)
    # first iteration: Adam moments and the engine's cache exist afterwards, as in a long run
    ppo_iteration(backbone, engine, optimizer, prompt_ids, prompt_mask, cfg, StageClock(device))
    tracker = planner.LiveTensorTracker()
    tracker.add(*backbone.parameters(), *backbone.buffers(), prompt_ids, prompt_mask)
    tracker.add(*quant_state_tensors(backbone.causal_lm))  # absmax and codes of a 4-bit base
    for state in optimizer.state.values():
        tracker.add(*state.values())
    tracker.add(*[t for t in engine.cache.keys + engine.cache.values if t is not None])
    tracker.add(engine._step_ids, engine._step_positions, engine._step_slot, engine._step_mask)
    with tracker:
        resident = tracker.current
        ppo_iteration(backbone, engine, optimizer, prompt_ids, prompt_mask, cfg,
                      StageClock(device, tracker.mark))
    return resident, tracker.stage_peaks


def _assert_stages_within_25_percent(predicted, peaks, resident, planned_resident) -> None:
    """Every stage's planned peak within 25% of the measured one, and so is the part above the
    resident state on its own (the part that depends on batch and lengths: weights do not hide
    it)."""
    for stage in planner.STAGES:
        measured, plan_total = peaks[stage], predicted["stages"][stage]["total"]
        assert abs(plan_total - measured) <= 0.25 * measured, (
            f"{stage}: planned {plan_total} B, measured {measured} B ({plan_total / measured:.2f}x)"
        )
        measured_extra, plan_extra = measured - resident, plan_total - planned_resident
        assert abs(plan_extra - measured_extra) <= 0.25 * measured_extra, (
            f"{stage} above the resident state: planned {plan_extra} B, measured "
            f"{measured_extra} B ({plan_extra / measured_extra:.2f}x)"
        )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("sizes", [
    dict(batch=4, prompt_length=16, response_length=16, minibatch=2, forward_chunk=2),
    dict(batch=6, prompt_length=20, response_length=28, minibatch=6, forward_chunk=3),
], ids=["small", "wider"])
def test_plan_within_25_percent_of_measured_cpu_peaks(dtype, sizes):
    cfg = E2EConfig(shape="tiny", lora_rank=4, dtype=dtype, device="cpu", warmup=0,
                    iterations=1, **sizes)
    resident, peaks = _measure(cfg)
    predicted = planner.plan("tiny", lora_rank=4, dtype=dtype, device="cpu", **sizes)
    planned_resident = predicted["stages"]["rollout"]["resident"]
    assert abs(planned_resident - resident) <= 0.05 * resident, (planned_resident, resident)
    _assert_stages_within_25_percent(predicted, peaks, resident, planned_resident)


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is as fast, and on shared cores far faster (thread barriers).
    The bytes measured do not depend on it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _quantized_backbone(cfg: E2EConfig, quantization: str, directory):
    """build_backbone's model, saved and loaded back quantized by bitsandbytes (the trainer's
    load path), with the same adapters set-up."""
    from transformers import AutoModelForCausalLM

    from rlhf.models import LoraSpec, SharedBackbone, load_causal_lm

    config = planner.hf_config(cfg.shape)
    torch.manual_seed(cfg.seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    model = load_causal_lm(directory, quantization=quantization, attn_implementation="sdpa")
    backbone = SharedBackbone.from_model(model, lora=LoraSpec(rank=cfg.lora_rank,
                                                              alpha=2 * cfg.lora_rank),
                                         gradient_checkpointing=cfg.gradient_checkpointing,
                                         name_or_path=str(directory))
    with torch.no_grad():
        for name, param in backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1e-3)
    backbone.set_trainable(("policy", "critic"))
    return backbone


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_plan_within_25_percent_of_measured_cpu_peaks(quantization, tmp_path,
                                                                monkeypatch):
    """The same accounting on an nf4 / int8 base loaded by bitsandbytes (fp32 compute on the
    CPU): packed weights, absmax and codes (int8: row scales) resident; the dequantized weight of
    each 4-bit matmul (int8: of its backward) transient; int8's layer inputs kept through
    checkpointing. The resident state must be far below the unquantized plan's (the check fails
    if the planner ignored the quantization: the tiny model's linears are 40% of its bytes)."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    sizes = dict(batch=2, prompt_length=12, response_length=8, minibatch=2, forward_chunk=1)
    cfg = E2EConfig(shape="tiny", lora_rank=4, dtype="float32", device="cpu", warmup=0,
                    iterations=1, **sizes)
    resident, peaks = _measure(cfg, _quantized_backbone(cfg, quantization, tmp_path / "base"))
    predicted = planner.plan("tiny", lora_rank=4, dtype="float32", device="cpu",
                             quantization=quantization, **sizes)
    unquantized = planner.plan("tiny", lora_rank=4, dtype="float32", device="cpu", **sizes)
    planned_resident = predicted["stages"]["rollout"]["resident"]
    assert abs(planned_resident - resident) <= 0.05 * resident, (planned_resident, resident)
    assert unquantized["stages"]["rollout"]["resident"] > (1.3 if quantization == "nf4"
                                                            else 1.15) * resident
    _assert_stages_within_25_percent(predicted, peaks, resident, planned_resident)


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "llama-3-8b"])
def test_preset_parameter_counts_match_transformers(name):
    """The planner's parameter count == the HF model built from the same config (on meta)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(planner.hf_config(name))
    counted = sum(p.numel() for p in model.parameters())  # tied weights appear once
    dims = planner.ModelDims.from_dict(planner.PRESETS[name])
    assert dims.params() == counted


def test_lora_parameter_count_matches_peft():
    cfg = E2EConfig(shape="tiny", lora_rank=4, dtype="float32", device="cpu")
    backbone = build_backbone(cfg)
    dims = planner.ModelDims.from_dict(planner.PRESETS["tiny"])
    adapter = sum(p.numel() for p in backbone.trainable_parameters("policy"))
    assert dims.lora_params(4) == adapter


def test_published_bars_and_largest_batch():
    # the bars, as the planner sees them (the GPU benchmark checks them for real)
    assert planner.plan("qwen2.5-1.5b")["peak_bytes"] <= 8 * GIB
    assert planner.plan("qwen2.5-0.5b")["peak_bytes"] <= 4 * GIB
    assert planner.plan("llama-3-8b", minibatch=4, forward_chunk=4)["peak_bytes"] <= 24 * GIB
    best = planner.largest_batch("qwen2.5-1.5b", 24.0)
    assert planner.plan("qwen2.5-1.5b", batch=best)["peak_bytes"] <= 24 * GIB
    assert planner.plan("qwen2.5-1.5b", batch=best + 1)["peak_bytes"] > 24 * GIB
    assert planner.largest_batch("llama-3-8b", 8.0) == 0  # the bf16 weights alone are 15 GiB
    # more tokens never need less memory
    small = planner.plan("qwen2.5-1.5b", batch=8)["stages"]
    large = planner.plan("qwen2.5-1.5b", batch=16)["stages"]
    assert all(large[s]["total"] > small[s]["total"] for s in planner.STAGES)
    no_ckpt = planner.plan("qwen2.5-1.5b", gradient_checkpointing=False)["stages"]["update"]
    assert no_ckpt["total"] > large["update"]["total"]


def test_autocast_plans_the_two_gemm_lora_backward():
    """On CUDA with a 16-bit dtype the trainer runs under autocast, where rlhf/lora_forward.py's
    LoRA backward keeps no fp32 copy of a layer's inputs (PEFT's path keeps one per adapted
    linear): by default the plan counts that, exactly those terms less per token of the
    recomputed layer; the no-grad stages and a quantized base (PEFT's forward) are unchanged."""
    kw = dict(batch=16, minibatch=16, forward_chunk=16)
    on = planner.plan("qwen2.5-1.5b", **kw)
    off = planner.plan("qwen2.5-1.5b", autocast=False, **kw)
    assert on["inputs"]["autocast"] is True and off["inputs"]["autocast"] is False
    assert planner.plan("qwen2.5-1.5b", device="cpu", **kw)["inputs"]["autocast"] is False
    assert planner.plan("qwen2.5-1.5b", dtype="float32", **kw)["inputs"]["autocast"] is False
    for stage in ("rollout", "scoring"):
        assert on["stages"][stage]["total"] == off["stages"][stage]["total"]
    d = planner.ModelDims.from_dict(planner.PRESETS["qwen2.5-1.5b"])
    h, i, q = d.hidden_size, d.intermediate_size, d.q_dim
    copies = 4 * (3 * h + q + 2 * h + i)  # an fp32 copy of each adapted linear's input
    tokens = 16 * (128 + 256)
    # at most those copies and the fp32 LoRA gradient less in the recomputed layer (the loss
    # head may bound the stage instead)
    saved = off["stages"]["update"]["backward_or_head"] - on["stages"]["update"]["backward_or_head"]
    assert 0 < saved <= tokens * (copies + 4 * i)
    # without checkpointing every layer keeps them: exactly L copies per token less
    full = [planner.plan("qwen2.5-1.5b", gradient_checkpointing=False, autocast=a, **kw)
            for a in (False, True)]
    assert (full[0]["stages"]["update"]["saved_activations"]
            - full[1]["stages"]["update"]["saved_activations"]) == d.num_layers * tokens * copies
    # the command line: --no-autocast plans PEFT's fp32 adapter path, and the model line says
    # which mode it planned
    import contextlib
    import io

    lines = {}
    for argv in ([], ["--no-autocast"]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert planner.main(["qwen2.5-1.5b", *argv]) == 0
        lines[bool(argv)] = out.getvalue().splitlines()
    assert "bfloat16, autocast," in lines[False][0] and "autocast" not in lines[True][0]
    update = {k: next(line for line in v if line.startswith("update")) for k, v in lines.items()}
    assert float(update[True].split()[1]) > float(update[False].split()[1])
    nf4 = dict(quantization="nf4", **kw)
    assert planner.plan("qwen2.5-1.5b", **nf4)["stages"] == planner.plan(
        "qwen2.5-1.5b", autocast=False, **nf4)["stages"]


def test_main_with_config_json_and_errors(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(planner.PRESETS["qwen2.5-0.5b"]))
    assert planner.main([str(path), "--batch", "8", "--card", "24"]) == 0
    out = capsys.readouterr().out
    assert "rollout" in out and "update" in out and "largest batch on a 24 GiB card" in out
    assert planner.main([str(tmp_path), "--json"]) == 0  # a directory holding config.json
    result = json.loads(capsys.readouterr().out)
    assert result["peak_stage"] in planner.STAGES and result["largest_batch"]["batch"] > 0
    with pytest.raises(SystemExit) as exit_info:
        planner.main(["no-such-model"])
    assert exit_info.value.code == 2  # argparse's usage error, not a crash or a clean exit
    error = capsys.readouterr().err
    assert "'no-such-model' is neither a preset" in error and "qwen2.5-1.5b" in error
    with pytest.raises(ValueError, match="lacks"):
        planner.plan({"hidden_size": 8})
    with pytest.raises(ValueError, match="batch"):
        planner.plan("tiny", batch=0)


# ---------------------------------------------------------------------------------------------
# quantized bases, the SFT / reward-model stages, what fits a card (issue 13)
# ---------------------------------------------------------------------------------------------
def _train_step_peaks(stage: str, gradient_checkpointing: bool, directory, batch=4, length=24):
    """(resident, peak) live tensor bytes of the second optimizer step of the SFT stage (LoRA on
    a PEFT model, rlhf.sft's loss) or the reward stage (SharedBackbone, rlhf.reward's pair loss)
    on an nf4 tiny model."""
    from transformers import AutoModelForCausalLM

    from rlhf import reward, sft
    from rlhf.models import LoraSpec, SharedBackbone, _quiet_peft, load_causal_lm
    from rlhf.quant import quant_state_tensors

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(planner.hf_config("tiny"),
                                     dtype=torch.float32).save_pretrained(directory)
    ids = torch.randint(3, 500, (batch, length))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :8] = -100
    if stage == "sft":
        from peft import get_peft_model

        model = load_causal_lm(directory, quantization="nf4", attn_implementation="sdpa")
        with _quiet_peft():
            model = get_peft_model(model, LoraSpec(rank=4, alpha=8).peft_config(model))
        if gradient_checkpointing:
            model.get_base_model().activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            logp = sft.token_logprobs_of(model, ids, mask, labels)
            sft.lm_loss(logp, labels, int((labels[:, 1:] != -100).sum())).backward()
    else:
        model = SharedBackbone.from_pretrained(directory, lora=LoraSpec(rank=4, alpha=8),
                                               quantization="nf4", attn_implementation="sdpa",
                                               gradient_checkpointing=gradient_checkpointing)
        model.set_trainable(("reward",))
        params = model.trainable_parameters("reward")
        pairs = reward.PairBatch(ids, mask, ids.flip(0), mask)

        def step():
            reward.pair_loss(model, pairs, 0, 0.01)[0].backward()
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for tracked in (False, True):  # the first step makes the Adam moments
        tracker = planner.LiveTensorTracker()
        if tracked:
            tracker.add(*model.parameters(), *model.buffers(), ids, mask, labels)
            tracker.add(*quant_state_tensors(model))
            for state in optimizer.state.values():
                tracker.add(*state.values())
            tracker.__enter__()
            resident = tracker.current
        try:
            step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            if tracked:
                tracker.__exit__(None, None, None)
    return resident, tracker.peak


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["full", "checkpointed"])
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_sft_and_reward_plans_within_25_percent_of_measured_cpu_peaks(
        stage, gradient_checkpointing, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    resident, peak = _train_step_peaks(stage, gradient_checkpointing, tmp_path)
    predicted = planner.plan_training_stage(
        stage, "tiny", batch=4, seq_len=24, lora_rank=4, dtype="float32", device="cpu",
        quantization="nf4", gradient_checkpointing=gradient_checkpointing)
    planned_resident = sum(predicted["resident"].values())
    assert abs(planned_resident - resident) <= 0.05 * resident, (planned_resident, resident)
    extra, planned_extra = peak - resident, predicted["peak_bytes"] - planned_resident
    assert abs(planned_extra - extra) <= 0.25 * extra, (
        f"{stage}: planned {planned_extra} B above the resident state, measured {extra} B "
        f"({planned_extra / extra:.2f}x)")


def test_8bit_adam_state_bytes_match_bitsandbytes():
    """The planner's AdamW state bytes == what torch's and bitsandbytes' optimizers allocate,
    for Llama-3-8B rank-16 LoRA factors (8-bit) and a tiny one (kept 32-bit)."""
    pytest.importorskip("bitsandbytes")
    from rlhf.quant import adapter_optimizer_bytes

    shapes = [(16, 4096), (4096, 16), (16, 4096), (1024, 16), (4, 64), (4096,), (1,)]
    numels = [math.prod(shape) for shape in shapes]
    for name in ("adamw", "adamw8bit"):
        assert planner.adam_state_bytes(numels, name) == adapter_optimizer_bytes(shapes, name)
    full = planner.plan("llama-3-8b", minibatch=4, forward_chunk=4)["resident"]["adam_states"]
    small = planner.plan("llama-3-8b", minibatch=4, forward_chunk=4,
                         optimizer="adamw8bit")["resident"]["adam_states"]
    assert 3.5 < full / small < 4.0  # 8 bytes per parameter -> 2 and a little


def test_fit_is_the_largest_that_fits_and_says_why_nothing_does(capsys):
    budget = (12 - planner.DEFAULT_RESERVE_GIB) * GIB
    result = planner.fit("llama-3-8b", 12, quantization="nf4", batch=16)
    rl, sft_, rm = result["rl"], result["sft"], result["rm"]
    assert all(r["why"] is None and r["batch"] > 0 for r in result.values())
    kwargs = dict(quantization="nf4")
    assert planner.plan("llama-3-8b", batch=rl["batch"], **kwargs)["peak_bytes"] <= budget
    assert planner.plan("llama-3-8b", batch=rl["batch"] + 1, **kwargs)["peak_bytes"] > budget
    assert planner.plan("llama-3-8b", batch=16, response_length=rl["length"],
                        **kwargs)["peak_bytes"] <= budget
    assert planner.plan("llama-3-8b", batch=16, response_length=rl["length"] + 1,
                        **kwargs)["peak_bytes"] > budget
    for stage, r in (("sft", sft_), ("rm", rm)):
        def peak(b, length=384, stage=stage):
            return planner.plan_training_stage(stage, "llama-3-8b", batch=b, seq_len=length,
                                               **kwargs)["peak_bytes"]
        assert peak(r["batch"]) <= budget < peak(r["batch"] + 1)
        assert peak(16, r["length"]) <= budget < peak(16, r["length"] + 1)
    # bf16: the weights alone exceed the card, and the answer says what would fit them
    for r in planner.fit("llama-3-8b", 12).values():
        assert r["batch"] == 0 and "quantization=nf4 makes them 5.31 GiB" in r["why"]
    # a sequence too long for the card even at batch 1
    long = planner.fit("llama-3-8b", 8, quantization="nf4", response_length=4096)
    assert long["rl"]["batch"] == 0 and "one sequence of 4224 tokens" in long["rl"]["why"]
    assert planner.main(["llama-3-8b", "--card", "12"]) == 0
    out = capsys.readouterr().out
    assert out.count("nothing fits: the base weights alone are 14.96 GiB") == 3
    assert planner.main(["llama-3-8b", "--card", "12", "--quantization", "nf4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fit"]["rl"]["batch"] == rl["batch"]
    # the headline and the RL line answer the same question: with a fixed minibatch and
    # scoring chunk the headline took them as the batch (12 where the RL line said 60)
    args = ["llama-3-8b", "--card", "12", "--quantization", "nf4", "--batch", "16",
            "--minibatch", "4", "--forward-chunk", "4", "--json"]
    assert planner.main(args) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["largest_batch"]["batch"] == shown["fit"]["rl"]["batch"] > 16
    with pytest.raises(ValueError, match="quantization='nf3'"):
        planner.plan("tiny", quantization="nf3")
    with pytest.raises(ValueError, match="reserve_gib"):
        planner.fit("tiny", 1, reserve_gib=2)


def test_readme_card_table_is_what_the_code_renders():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert planner.card_table_block() in readme, "README card table is stale: rlhf plan " \
                                                  "--write-readme"


def test_fit_says_when_the_lengths_are_past_the_models_context(capsys):
    # The tiny preset's context is 512 positions: 400 + 256 tokens are past it.
    assert planner.main(["tiny", "--card", "8", "--prompt-length", "400",
                         "--response-length", "256"]) == 0
    out = capsys.readouterr().out
    assert "656 tokens is past the model's context of 512" in out, out
    assert planner.main(["tiny", "--card", "8", "--prompt-length", "128",
                         "--response-length", "256"]) == 0
    assert "past the model's context" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# what a new user types: hub names, typos, a file that is no config, a small model, a small card
# ---------------------------------------------------------------------------------------------
def test_presets_answer_to_their_hub_names_and_any_case(tmp_path, monkeypatch):
    """`rlhf plan Qwen/Qwen2.5-1.5B` (the name on the model card) was refused unless the model
    was in the local hub cache, and `Qwen2.5-1.5B` for its capitals."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    for name, preset in (("Qwen/Qwen2.5-1.5B", "qwen2.5-1.5b"),
                         ("qwen/qwen2.5-0.5b-instruct", "qwen2.5-0.5b"),
                         ("Qwen2.5-7B", "qwen2.5-7b"),
                         ("meta-llama/Meta-Llama-3-8B-Instruct", "llama-3-8b")):
        assert planner.plan(name, batch=4) == planner.plan(preset, batch=4), name


def test_unknown_model_suggests_the_close_name_or_a_config_json():
    with pytest.raises(ValueError, match=r"'qwen2\.5-1\.5' is neither a preset .*; did you mean "
                                         r"'qwen2\.5-1\.5b'"):
        planner.plan("qwen2.5-1.5")
    with pytest.raises(ValueError, match=r"'mistral-7b' is neither .*; for another model, give "
                                         r"its config\.json"):
        planner.plan("mistral-7b")


@pytest.mark.parametrize("name, text, message", [
    ("notes.md", "# not json", r"'.*notes\.md' is not a model config: it does not read as JSON"),
    ("rows.json", '[{"prompt": "a"}]', r"'.*rows\.json' is not a model config: it holds a JSON "
                                       r"list"),
    ("config.json", '{"model_type": "gpt2", "n_embd": 768, "vocab_size": 50257}',
     r"the model config '.*config\.json' \(model_type 'gpt2'\) lacks \['hidden_size', "),
])
def test_a_file_that_is_no_decoder_config_is_named(tmp_path, capsys, name, text, message):
    """`rlhf plan README.md` said only "Expecting value: line 1 column 1 (char 0)"; a JSON list
    "dictionary update sequence element #0 has length 1; 2 is required"; a GPT-2 config's
    missing keys did not name the file."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        planner.plan(str(path))
    with pytest.raises(SystemExit) as exit_info:
        planner.main([str(path)])
    assert exit_info.value.code == 2 and str(path) in capsys.readouterr().err


def test_a_batch_at_the_search_limit_is_not_called_the_largest(capsys):
    """The search for the largest batch stops at BATCH_SEARCH_LIMIT (4096): the tiny preset on
    24 GiB fits far more (its planned peak at 4096 rows is well under the card), and the plan
    printed "largest batch 4096" as if 4097 did not fit."""
    limit = planner.BATCH_SEARCH_LIMIT
    assert planner.plan("tiny", batch=limit)["peak_bytes"] < 12 * GIB
    result = planner.fit("tiny", 24)
    assert all(r["batch"] == limit and r["more_may_fit"] for r in result.values())
    assert not any(r["more_may_fit"] for r in planner.fit("qwen2.5-1.5b", 24).values())
    assert planner.main(["tiny", "--card", "24"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"largest batch {limit} sequences or more") == 2, out  # SFT and RL lines
    assert f"(RL, the reserve kept): {limit} or more" in out
    assert planner.main(["qwen2.5-1.5b", "--card", "24"]) == 0
    assert "or more" not in capsys.readouterr().out


def test_nothing_fits_offers_only_what_helps():
    """On a card too small for even the 4-bit base the answer offered quantization=nf4 as the
    cure."""
    for r in planner.fit("qwen2.5-7b", 4).values():
        assert "even quantization=nf4 leaves 5.17 GiB" in r["why"]
        assert "makes them" not in r["why"]
    for r in planner.fit("qwen2.5-7b", 12).values():
        assert "quantization=nf4 makes them 5.17 GiB" in r["why"]


def test_fsdp2_shards_the_reward_stage_and_never_a_quantized_base(capsys):
    """docs/distributed.md: fsdp2 shards the frozen base of the reward and RL stages after each
    GPU loaded it whole, SFT runs ddp, and a bitsandbytes-quantized base is refused. The planner
    kept the reward model's base whole under --strategy fsdp2 (Qwen2.5-7B on 8 x 24 GiB: 112
    pairs where the RL stage's sharding gave it room for 248), let a base that cannot load fit,
    and planned fsdp2 on an nf4 base, a run no stage takes."""
    d = planner.ModelDims.from_dict(planner.PRESETS["qwen2.5-7b"])
    layers = d.params() * 2 - (2 * d.vocab_size * d.hidden_size + d.hidden_size) * 2
    per_gpu = d.params() * 2 - layers + layers // 8 + 2 * layers // d.num_layers
    kwargs = dict(gpus=8, strategy="fsdp2")
    rm = planner.plan_training_stage("rm", "qwen2.5-7b", batch=2, **kwargs)
    assert rm["resident"]["weights"] == per_gpu
    assert planner.plan("qwen2.5-7b", batch=16, **kwargs)["resident"]["weights"] == per_gpu
    sft = planner.plan_training_stage("sft", "qwen2.5-7b", batch=2, **kwargs)
    assert sft["resident"]["weights"] == d.params() * 2  # SFT runs ddp
    whole = planner.plan_training_stage("rm", "qwen2.5-7b", batch=2)
    assert whole["peak_bytes"] - rm["peak_bytes"] == d.params() * 2 - per_gpu
    sharded, replicated = planner.fit("qwen2.5-7b", 24, **kwargs), planner.fit("qwen2.5-7b", 24,
                                                                             gpus=8)
    assert sharded["rm"]["batch"] > replicated["rm"]["batch"]
    assert sharded["sft"]["batch"] == replicated["sft"]["batch"]
    # each GPU loads the whole base before sharding it (docs/distributed.md): on 12 GiB cards
    # the 14.19 GiB bf16 base does not load, though a sharded step would fit
    budget = (12 - planner.DEFAULT_RESERVE_GIB) * GIB
    assert planner.plan("qwen2.5-7b", batch=8, **kwargs)["peak_bytes"] < budget
    small = planner.fit("qwen2.5-7b", 12, **kwargs)
    for stage in ("rm", "rl"):
        assert small[stage]["batch"] == 0
        assert (f"the base weights alone are {d.params() * 2 / GIB:.2f} GiB (bfloat16) of the "
                f"11.00 GiB usable (fsdp2 shards them only after each GPU has loaded them "
                f"whole)") in small[stage]["why"]
    assert planner.largest_batch("qwen2.5-7b", 11, **kwargs) == 0
    assert planner.main(["qwen2.5-7b", "--gpus", "8", "--strategy", "fsdp2"]) == 0
    assert (f"load: each GPU holds the whole base ({d.params() * 2 / GIB:.2f} GiB) while the "
            f"stage loads it") in capsys.readouterr().out
    for call in (lambda: planner.plan("qwen2.5-7b", quantization="nf4", **kwargs),
                 lambda: planner.plan_training_stage("rm", "qwen2.5-7b", quantization="nf4",
                                                     **kwargs)):
        with pytest.raises(ValueError, match="fsdp2 cannot shard a quantized base"):
            call()


def test_a_saved_backbone_is_planned_with_the_quantization_it_records(tmp_path, capsys):
    """`rlhf plan runs/rm/backbone` planned a dense bf16 base for a backbone whose roles.json
    records nf4, which `rlhf ppo model=` then loads 4-bit (18.0 against 8.7 GiB at Llama-3-8B).
    The recorded quantization is now the default, said in one line; --quantization overrides
    it; a backbone without the field (written before it was recorded) is dense."""
    backbone = tmp_path / "backbone"
    backbone.mkdir()
    roles = {"base_config": planner.PRESETS["qwen2.5-0.5b"], "quantization": "nf4"}
    (backbone / "roles.json").write_text(json.dumps(roles))

    def planned(*argv):
        assert planner.main([str(backbone), "--json", *argv]) == 0
        return json.loads(capsys.readouterr().out)

    kw = dict(batch=16)
    weights = {q: planner.plan(planner.PRESETS["qwen2.5-0.5b"], quantization=q, **kw)
               for q in ("nf4", "none")}
    assert weights["nf4"] != weights["none"]
    assert planned()["stages"] == weights["nf4"]["stages"]
    assert planned("--quantization", "none")["stages"] == weights["none"]["stages"]
    assert planner.main([str(backbone)]) == 0
    assert f"quantization: nf4, as {backbone}'s roles.json records it" in capsys.readouterr().out
    del roles["quantization"]
    (backbone / "roles.json").write_text(json.dumps(roles))
    assert planned()["stages"] == weights["none"]["stages"]
