"""TRL PPOTrainer (trl 1.12, `trl.experimental.ppo`): the peer of benchmarks/e2e_ppo.py, CPU or GPU.

Same construction as the runner behind the GPU anchor figures of docs/design.md §4: random-
initialised Qwen2.5-shaped policy (CausalLM), value and reward models (SequenceClassification, 1
label), bf16 weights, LoRA r=16 / alpha 32 on all linear layers with the reference = adapters off
(PEFT=1) or a separate reference model (PEFT=0), gradient checkpointing, one PPO epoch, one
minibatch, a fixed response length (no stop token). It runs on CUDA when there is a GPU (memory:
``torch.cuda.max_memory_allocated`` from just before training, the weights included, as the anchor
measures it) and otherwise on the CPU (PPOConfig use_cpu=True; bf16=True is accepted there; memory:
peak RSS above the size after the imports).

Caveat found with trl 1.12.0 + transformers 5.23: PPOTrainer overrides Trainer.train() and never
calls gradient_checkpointing_enable, so ``gradient_checkpointing=True`` in PPOConfig (what the
GPU anchor passes) leaves checkpointing OFF on the policy and the value model (the result's
``gc_active`` records what was really in effect). ``--enable-gc`` turns it on by hand on the
policy and value models before the trainer is built (non-reentrant, transformers 5's default).

Run in a venv holding trl==1.12.0:

    python benchmarks/peers/trl_ppo_peer.py SHAPE PEFT BATCH PROMPT RESPONSE STEPS [--enable-gc]
    python benchmarks/peers/trl_ppo_peer.py 0.5b 1 4 32 32 3

or beside ours, in one call (our e2e with the same shape and sizes, then this script)::

    python -m benchmarks.e2e_ppo --device cpu --shape qwen2.5-0.5b --batch 4 \
        --prompt-length 32 --response-length 32 --peer-script benchmarks/peers/trl_ppo_peer.py \
        --peer-python /path/to/venv-with-trl-1.12/bin/python
    python -m benchmarks.e2e_ppo --shape qwen2.5-1.5b \
        --peer-script benchmarks/peers/trl_ppo_peer.py --peer-arg=--enable-gc     # on a GPU

Prints one ``RESULT {json}`` line: seconds per PPO batch (median of the step-to-step times,
so the first step, which carries the start-up, is not counted), response tokens/s = B * R / that,
and memory (``peak_GiB``): on a GPU the allocator's peak during training; on the CPU the
process's peak RSS (getrusage ru_maxrss) above the RSS measured after the imports and before any
model is built. Out of memory on a GPU gives a RESULT line with ``"oom": true``.
"""
from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import tempfile
import time

import peft
import torch
import transformers
import trl
from datasets import Dataset
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    TrainerCallback,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer


def rss_now_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


# Qwen2.5 published configs (vocab 151936, untied lm_head as in the GPU anchor)
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4),
}
VOCAB = 151936
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str]) -> int:
    enable_gc = "--enable-gc" in argv
    argv = [a for a in argv if a != "--enable-gc"]
    if len(argv) != 6:
        print(__doc__)
        return 2
    shape, use_peft = argv[0], argv[1] == "1"
    batch, prompt, response, steps = (int(x) for x in argv[2:6])
    baseline_kib = rss_now_kib()  # after the imports, before any model exists

    config = Qwen2Config(vocab_size=VOCAB, max_position_embeddings=4096,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                         bos_token_id=2, **SHAPES[shape])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # bf16 weights (and LoRA adapters), as on the GPU

    def causal_lm():
        with torch.device(DEVICE):
            return Qwen2ForCausalLM(config)

    def scalar_head():
        head_config = Qwen2Config(**config.to_dict())
        head_config.num_labels = 1
        with torch.device(DEVICE):
            return Qwen2ForSequenceClassification(head_config)

    # word-level tokenizer over the whole vocabulary: t0 pad, t1 eos, t2 bos, t3 unk
    words = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(words, unk_token="t3")),
        pad_token="t0", eos_token="t1", bos_token="t2", unk_token="t3")
    tokenizer.padding_side = "left"

    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, VOCAB, (prompt,), generator=generator).tolist()
               for _ in range(batch * (steps + 1))]
    dataset = Dataset.from_dict({"input_ids": prompts})

    policy = causal_lm()
    value_model = scalar_head()
    reward_model = scalar_head()
    ref_model = None if use_peft else causal_lm()
    if enable_gc:
        for model in (policy, value_model):
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_config = None
    if use_peft:
        from peft import LoraConfig
        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                 task_type="CAUSAL_LM")

    args = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_ppo_peer_"),
        use_cpu=DEVICE == "cpu", bf16=True,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_mini_batches=1, num_ppo_epochs=1, local_rollout_forward_batch_size=batch,
        response_length=response, total_episodes=batch * steps, num_sample_generations=0,
        stop_token=None, missing_eos_penalty=None, temperature=1.0,
        gradient_checkpointing=True, learning_rate=1e-6,
        report_to=[], save_strategy="no", logging_steps=1, dataset_num_proc=None)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy,
                         ref_model=ref_model, reward_model=reward_model,
                         train_dataset=dataset, value_model=value_model,
                         peft_config=peft_config)

    stamps: list[float] = []
    gc_active: dict[str, bool] = {}

    def backbone_gc(model) -> bool:  # the flag the decoder layers consult
        for module in model.modules():
            if hasattr(module, "layers") and hasattr(module, "gradient_checkpointing"):
                return bool(module.gradient_checkpointing)
        return False

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            gc_active.update(policy=backbone_gc(trainer.model.policy),
                             value=backbone_gc(trainer.model.value_model))

    trainer.add_callback(StepClock())
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the peak from here: weights included
    started = time.perf_counter()
    try:
        trainer.train()
    except torch.OutOfMemoryError:
        print("RESULT " + json.dumps(dict(
            system=f"trl-{trl.__version__} PPOTrainer", shape=f"qwen2.5-{shape}", peft=use_peft,
            batch=batch, prompt=prompt, response=response, oom=True, device=DEVICE,
            enable_gc_flag=enable_gc, peak_GiB=torch.cuda.max_memory_allocated() / 2**30,
            gpu=torch.cuda.get_device_name())), flush=True)
        return 0
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    finished = time.perf_counter()

    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    sec = statistics.median(intervals) if intervals else finished - started
    peak_kib = peak_rss_kib()
    result = dict(
        system=f"trl-{trl.__version__} PPOTrainer", shape=f"qwen2.5-{shape}", peft=use_peft,
        batch=batch, prompt=prompt, response=response, steps=len(stamps),
        step_intervals_s=intervals, sec_per_batch=sec,
        response_tokens_per_s=batch * response / sec,
        first_step_s=(stamps[0] - started) if stamps else None, total_train_s=finished - started,
        baseline_rss_gib=baseline_kib / 2**20, peak_rss_gib=peak_kib / 2**20,
        peak_rss_above_baseline_gib=(peak_kib - baseline_kib) / 2**20,
        # what `python -m benchmarks.e2e_ppo --peer-script` compares with ours
        peak_GiB=(torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda"
                  else (peak_kib - baseline_kib) / 2**20),
        memory=("torch.cuda.max_memory_allocated during training" if DEVICE == "cuda"
                else "peak RSS above the size after the imports"),
        gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else None,
        gradient_checkpointing_arg=args.gradient_checkpointing, enable_gc_flag=enable_gc,
        gc_active=gc_active, dtype="bfloat16", device=DEVICE, threads=torch.get_num_threads(),
        torch=torch.__version__, transformers=transformers.__version__,
        peft_version=peft.__version__, trl_version=trl.__version__,
        python=platform.python_version(),
        model_dtype=str(next(trainer.model.parameters()).dtype),
        mixed_precision=trainer.accelerator.mixed_precision)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
