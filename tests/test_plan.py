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
    for stage in planner.STAGES:
        measured, plan_total = peaks[stage], predicted["stages"][stage]["total"]
        assert abs(plan_total - measured) <= 0.25 * measured, (
            f"{stage}: planned {plan_total} B, measured {measured} B ({plan_total / measured:.2f}x)"
        )
        # the part that depends on batch and lengths, on its own (weights do not hide it)
        measured_extra, plan_extra = measured - resident, plan_total - planned_resident
        assert abs(plan_extra - measured_extra) <= 0.25 * measured_extra, (
            f"{stage} above the resident state: planned {plan_extra} B, measured "
            f"{measured_extra} B ({plan_extra / measured_extra:.2f}x)"
        )


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
def test_quantized_plan_within_25_percent_of_measured_cpu_peaks(tmp_path, monkeypatch):
    """The same accounting on an nf4 base loaded by bitsandbytes (fp32 compute on the CPU):
    packed weights, absmax and codes resident, the dequantized weight of each 4-bit matmul
    transient. The resident state must be far below the unquantized plan's (the check fails
    if the planner ignored the quantization: the tiny model's linears are 40% of its bytes)."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    sizes = dict(batch=2, prompt_length=12, response_length=8, minibatch=2, forward_chunk=1)
    cfg = E2EConfig(shape="tiny", lora_rank=4, dtype="float32", device="cpu", warmup=0,
                    iterations=1, **sizes)
    resident, peaks = _measure(cfg, _quantized_backbone(cfg, "nf4", tmp_path / "base"))
    predicted = planner.plan("tiny", lora_rank=4, dtype="float32", device="cpu",
                             quantization="nf4", **sizes)
    unquantized = planner.plan("tiny", lora_rank=4, dtype="float32", device="cpu", **sizes)
    planned_resident = predicted["stages"]["rollout"]["resident"]
    assert abs(planned_resident - resident) <= 0.05 * resident, (planned_resident, resident)
    assert unquantized["stages"]["rollout"]["resident"] > 1.3 * resident
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
