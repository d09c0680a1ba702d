"""One TRL ``GRPOTrainer`` step at the Qwen2.5-0.5B shape on the CPU: TRL as installed against
TRL under ``rlhf_kernels.integrations.patch_trl()`` (peak memory and time).

Model: a random-initialised ``Qwen2ForCausalLM`` of Qwen2.5-0.5B's published shape (hidden 896,
24 layers, 14 heads / 2 key-value heads, MLP 4864, vocabulary 151936, tied embeddings), fp32
weights, built from a config (nothing is downloaded); a word-level tokenizer over the whole
vocabulary; a reward function in Python (the fraction of even token ids). GRPOConfig as TRL's
defaults (loss_type "dapo", beta 0, gradient checkpointing on) except: ``--batch`` completions
per step (``--generations`` per prompt), ``--prompt-length`` / ``--completion-length`` tokens,
SGD (no optimizer state, so the memory is the model, its gradients and the step's activations),
one step.

Each configuration runs in its own process, so that the memory figures are its own:

* ``step``: ``trainer.train()`` for one step (generation, reward, advantages, the loss forward
  and backward, the SGD update): wall seconds, and the peak resident memory (RSS high-water mark,
  reset through ``/proc/self/clear_refs`` just before the step) above the RSS just before it;
* ``loss``: the loss forward and backward alone (``trainer._compute_loss`` + ``backward``) on the
  batch that step trained on, measured the same way: where the patched functions act.

RSS is the whole process's memory (weights and gradients included, the same in both): the
difference between the rows is what the lm head and the loss cost. The children run with glibc's
mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``) so that
freed tensors leave the RSS and a phase's high-water mark counts its own allocations. In the
loss phase the gradients already exist (allocated as zeros before it: the Trainer frees them
after the step), so it counts activations, logits and the loss's temporaries, and the
backward's transient gradient of each weight before it is added in place.

Patched, the kernels run on the CPU through ``--backend`` (each in its own process, the child
sets ``RLHF_KERNELS_BACKEND``):

* ``native`` (the default): the library's C++ CPU kernels (``csrc/cpu``), what ``patch_trl``
  runs on a CPU by default ("auto" resolves fp32 heads to them): the fused head
  ``linear_logprobs`` folds the logits in chunks of rows (64 MiB of fp32 logits per chunk at
  most), and ``ppo_policy_loss`` is the native loss. The kernels are loaded (built on a cold
  cache) before the step, so the step does not time a build;
* ``reference``: the plain-PyTorch reference (``RLHF_KERNELS_BACKEND=reference``, or "auto"
  when the native kernels cannot be built): it makes the (N, V) logits, so it is not the
  memory-saving path;
* ``interpreter``: the Triton kernels under the Triton interpreter: the chunked algorithm a GPU
  runs, at interpreter speed, so its time is no speed figure.

``both`` runs native and reference, ``all`` the three. The child counts which backend each of
the patched ops resolved to and which native kernels were called (``backends``,
``native_kernel_calls`` in the file's ``runs``), and fails if the kernels it is named after did
not run. TRL's own fused head on the CPU folds (N, 32768) logit tiles in torch.

    python -m benchmarks.trl_grpo_step [--backend native|reference|interpreter|both|all]
        [--batch 4] [--generations 4] [--prompt-length 16] [--completion-length 16] [--no-save]

writes ``benchmarks/results/trl_grpo_step-cpu-<date>.json`` (rows: op ``trl_grpo_step``, case
= the phase and sizes, impl ``trl`` or ``trl+patch_trl (<backend>)``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                  max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  tie_word_embeddings=True)
_RESULT = "RESULT "
_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Reset the RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _measure(fn):
    """(seconds, peak RSS above the RSS at the start in MiB, fn's result)."""
    import gc

    gc.collect()
    start_kib = _status_kib("VmRSS")
    _reset_peak()
    started = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - started
    return seconds, (_status_kib("VmHWM") - start_kib) / 1024, out


def _even_fraction(completions, **kwargs):
    """The fraction of the completion's words whose token id is even."""
    return [sum(w.startswith("w") and int(w[1:]) % 2 == 0 for w in c.split())
            / max(len(c.split()), 1) for c in completions]


# What each --backend must resolve the patched ops to (backend.resolve_backend's answer).
_RESOLVES_TO = {"native": "native", "reference": "reference", "interpreter": "triton"}
# The native kernels the fused head's forward and backward call (csrc/cpu/logprobs.cpp).
_HEAD_KERNELS = ("logprobs_fwd", "logprobs_bwd")
_GROUPS = {"both": ("native", "reference"), "all": ("native", "reference", "interpreter")}


class _Tally:
    """Counts, per phase, which backend each rlhf_kernels op resolved to and which native
    kernels were called: the record of what really ran (a Python counter per op call)."""

    def __init__(self) -> None:
        import collections
        import sys as _sys

        from rlhf_kernels import _native, backend

        self.backends: collections.Counter = collections.Counter()
        self.native: collections.Counter = collections.Counter()
        resolve, native_ops = backend.resolve_backend, _native.ops
        tally = self

        def resolve_backend(tensor, backend=None, op=None):
            chosen = resolve(tensor, backend, op)
            tally.backends[f"{op}: {chosen}"] += 1
            return chosen

        class _Counting:
            def __getattr__(self, name):
                tally.native[name] += 1
                return getattr(native_ops(), name)

        # the op modules imported resolve_backend by name; every native kernel call goes
        # through rlhf_kernels._native.ops()
        self._wrapped = [module for name, module in list(_sys.modules.items())
                         if name.startswith("rlhf_kernels.ops.")
                         and getattr(module, "resolve_backend", None) is resolve]
        for module in self._wrapped:
            module.resolve_backend = resolve_backend
        _native.ops = lambda: _Counting()
        self._originals = resolve, native_ops

    def undo(self) -> None:
        from rlhf_kernels import _native

        resolve, _native.ops = self._originals
        for module in self._wrapped:
            module.resolve_backend = resolve

    def take(self) -> dict:
        """This phase's counts (and start the next phase from zero)."""
        out = dict(backends=dict(sorted(self.backends.items())),
                   native_kernel_calls=dict(sorted(self.native.items())))
        self.backends.clear()
        self.native.clear()
        return out


def _check_ran(backend: str, phase: str, counts: dict) -> None:
    """Refuse a row labelled with a backend whose kernels did not run."""
    want = _RESOLVES_TO[backend]
    head = {k: v for k, v in counts["backends"].items() if k.startswith("linear_logprobs:")}
    other = sorted(k for k in counts["backends"] if not k.endswith(": " + want))
    if f"linear_logprobs: {want}" not in head or other:
        raise RuntimeError(
            f"--backend {backend} ({phase}): the patched ops resolved to {counts['backends']}; "
            f"expected linear_logprobs and every other op on {want!r}")
    if backend == "native" and not all(counts["native_kernel_calls"].get(k)
                                       for k in _HEAD_KERNELS):
        raise RuntimeError(
            f"--backend native ({phase}): the native kernels called were "
            f"{counts['native_kernel_calls']}; expected the fused head's {_HEAD_KERNELS}")
    if backend != "native" and counts["native_kernel_calls"]:
        raise RuntimeError(f"--backend {backend} ({phase}) called native kernels: "
                           f"{counts['native_kernel_calls']}")


def child(args) -> dict:
    """One configuration, in this process: returns its measurements."""
    import tempfile
    import warnings

    import torch
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    warnings.simplefilter("ignore")
    patched = args.child != "trl"
    config = Qwen2Config(pad_token_id=0, eos_token_id=1, bos_token_id=2, **QWEN25_05B)
    vocab = config.vocab_size
    # one word per id; the special tokens are spelled so that no word contains one (the
    # tokenizer splits added tokens out of words: "t1" inside "t123" would be cut out)
    words = dict(zip(_SPECIAL, range(4))) | {f"w{i}": i for i in range(4, vocab)}
    tokenizer = Tokenizer(WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                        eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
    generator = torch.Generator().manual_seed(1)
    prompts = args.batch // args.generations
    dataset = Dataset.from_dict({"prompt": [
        " ".join(f"w{i}" for i in torch.randint(4, vocab, (args.prompt_length,),
                                                 generator=generator).tolist())
        for _ in range(prompts)]})
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    grpo_args = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_grpo_step_"), use_cpu=True, report_to=[],
        per_device_train_batch_size=args.batch, num_generations=args.generations,
        max_completion_length=args.completion_length, max_steps=1, logging_steps=1,
        save_strategy="no", optim="sgd", learning_rate=1e-6, seed=0, bf16=False)
    patch = tally = None
    native = dict(available=None, build_or_load_s=None, failure=None)
    if patched:
        import rlhf_kernels  # noqa: F401 - imports every op module, for the tally to wrap
        from rlhf_kernels import _native
        from rlhf_kernels.backend import triton_interpreter_enabled
        from rlhf_kernels.integrations import patch_trl

        if args.child == "native":
            # built (cold cache) or loaded now, not inside the timed step
            native.update(available=_native.available(), build_or_load_s=_native.build_seconds(),
                          failure=_native.failure_reason())
            if not native["available"]:
                raise RuntimeError(f"--backend native: the native CPU kernels are not "
                                   f"available: {native['failure']}")
        if triton_interpreter_enabled() != (args.child == "interpreter"):
            raise RuntimeError(f"--backend {args.child} with TRITON_INTERPRET="
                               f"{os.environ.get('TRITON_INTERPRET')!r}")
        tally = _Tally()
        patch = patch_trl()
    trainer = trl.GRPOTrainer(model=model, reward_funcs=_even_fraction, args=grpo_args,
                              train_dataset=dataset, processing_class=tokenizer)
    load_before = os.getloadavg()
    step_s, step_mib, _ = _measure(trainer.train)
    ran = {}
    if tally is not None:
        ran["step"] = tally.take()
        _check_ran(args.child, "step", ran["step"])
    logs = trainer.state.log_history[0]
    inputs = trainer._buffered_inputs[0]
    # The step ends with the Trainer's model.zero_grad(), which frees the gradients (None): they
    # are allocated again, as zeros, before the loss phase, so that phase measures what the
    # forward and backward add on top of the weights and their gradients (the backward
    # accumulates into them in place) instead of the gradients' fp32 copy of the model.
    grads = [p for p in trainer.model.parameters() if p.requires_grad]
    for p in grads:
        p.grad = torch.zeros_like(p)
    grads_mib = sum(p.numel() * p.element_size() for p in grads) / 2**20
    fallback = None
    if patched:
        from rlhf_kernels.integrations.trl import grpo_loss_fallback_reason

        fallback = grpo_loss_fallback_reason(trainer, inputs)

    def loss_forward_backward():
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        return loss.detach().item()

    loss_s, loss_mib, loss_value = _measure(loss_forward_backward)
    if tally is not None:
        ran["loss"] = tally.take()
        _check_ran(args.child, "loss", ran["loss"])
    if patch is not None:
        patch.undo()
        tally.undo()
    completion = inputs["completion_mask"]
    return dict(
        step_s=step_s, step_peak_rss_above_start_mib=step_mib,
        loss_fwd_bwd_s=loss_s, loss_peak_rss_above_start_mib=loss_mib, loss=loss_value,
        step_loss=logs.get("loss"), reward=logs.get("reward"), grad_norm=logs.get("grad_norm"),
        completion_tokens=int(completion.sum()), rows=int(completion.shape[0]),
        sequence_length=int(inputs["prompt_ids"].shape[1] + completion.shape[1]),
        loss_type=trainer.loss_type, beta=trainer.beta, fallback_reason=fallback,
        gradients_allocated_before_loss_mib=grads_mib, backend=args.child if patched else None,
        backend_env=os.environ.get("RLHF_KERNELS_BACKEND"),
        triton_interpret=os.environ.get("TRITON_INTERPRET"), native_kernels=native, ran=ran,
        gradient_checkpointing=bool(grpo_args.gradient_checkpointing),
        torch_threads=torch.get_num_threads(), trl=trl.__version__,
        load_average_1min=[load_before[0], os.getloadavg()[0]],
    )


def _ran(result: dict, phase: str) -> str:
    """The backends the patched ops resolved to in ``phase`` ("torch (TRL)" unpatched)."""
    counts = result["ran"].get(phase)
    if counts is None:
        return "torch (TRL)"
    return "/".join(sorted({key.split(": ")[1] for key in counts["backends"]}))


def _run_child(impl: str, backend: str | None, args) -> dict:
    env = dict(os.environ)
    env.pop("RLHF_KERNELS_POISON", None)  # the test suite's NaN fill is no user setting
    # glibc keeps freed heap memory resident and serves later allocations from it, so an RSS
    # high-water mark would miss what a phase allocates over memory an earlier phase freed. A
    # fixed mmap threshold of 64 KiB (no dynamic raise) and no trim threshold give every
    # tensor above 64 KiB its own mapping, returned to the system when freed: RSS then follows
    # the live tensors, in every configuration alike.
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    # the interpreter only where asked for: importing the benchmarks package on a machine
    # without CUDA turns it on unless TRITON_INTERPRET is set (benchmarks/__init__.py), and a
    # user's CPU run has it off
    env.pop("RLHF_KERNELS_BACKEND", None)
    env["TRITON_INTERPRET"] = "0"
    if backend == "interpreter":
        env.update(TRITON_INTERPRET="1", RLHF_KERNELS_BACKEND="triton")
    elif backend is not None:
        env["RLHF_KERNELS_BACKEND"] = backend
    command = [sys.executable, "-m", "benchmarks.trl_grpo_step", "--child", backend or impl,
               "--batch", str(args.batch), "--generations", str(args.generations),
               "--prompt-length", str(args.prompt_length),
               "--completion-length", str(args.completion_length)]
    done = subprocess.run(command, env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for line in done.stdout.splitlines():
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT):])
    raise RuntimeError(f"{impl} ({backend}) gave no result (exit {done.returncode}):\n"
                       f"{done.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trl_grpo_step",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=(*_RESOLVES_TO, *_GROUPS), default="native",
                        help="the patched side's kernels: native (the CPU default), reference, "
                             "interpreter; both = native and reference, all = the three")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--completion-length", type=int, default=16)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--child", choices=("trl", *_RESOLVES_TO), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch % args.generations:
        parser.error(f"--batch {args.batch} must be a multiple of --generations "
                     f"{args.generations} (GRPO samples that many completions per prompt)")
    if args.child:
        print(_RESULT + json.dumps(child(args)), flush=True)
        return 0

    sizes = (f"qwen2.5-0.5b, {args.batch} completions ({args.generations}/prompt), "
             f"prompt {args.prompt_length} + completion {args.completion_length}")
    backends = _GROUPS.get(args.backend, (args.backend,))
    runs = [("trl", None)] + [("patched", b) for b in backends]
    rows, details = [], {}
    for impl, backend in runs:
        print(f"[trl_grpo_step] running {impl}{f' ({backend})' if backend else ''} ...",
              flush=True)
        result = _run_child(impl, backend, args)
        name = "trl" if impl == "trl" else f"trl+patch_trl ({backend})"
        # the machine's 1-minute load before and after (other processes share the cores)
        load = "/".join(f"{x:.1f}" for x in result["load_average_1min"])
        rows.append(dict(op="trl_grpo_step", case=f"train step: {sizes}", impl=name,
                         s=result["step_s"], peak_rss_mib=result["step_peak_rss_above_start_mib"],
                         reward=result["reward"], grad_norm=result["grad_norm"], load_1min=load,
                         ran=_ran(result, "step")))
        rows.append(dict(op="trl_grpo_step", case=f"loss fwd+bwd: {sizes}", impl=name,
                         s=result["loss_fwd_bwd_s"],
                         peak_rss_mib=result["loss_peak_rss_above_start_mib"], load_1min=load,
                         ran=_ran(result, "loss")))
        details[name] = result
    for row in rows:
        print(f"{row['case'][:12]:12s}  {row['impl']:32s}  {row['s']:8.2f} s  "
              f"{row['peak_rss_mib']:9.1f} MiB")
    if not args.no_save:
        from pathlib import Path

        from benchmarks.common import save_results

        path = save_results("trl_grpo_step", rows)
        data = json.loads(Path(path).read_text())
        data["note"] = (
            "CPU, not a GPU figure. s: wall seconds of the phase. peak_rss_mib: the process's "
            "RSS high-water mark during the phase above its RSS at the start of the phase "
            "(reset through /proc/self/clear_refs); weights and gradients are the same in every "
            "row. Patched: native = the C++ CPU kernels (what patch_trl runs on a CPU by "
            "default; the fused head folds the logits in chunks of rows); reference = the "
            "kernels' PyTorch reference, which makes the (N, V) logits; interpreter = the "
            "Triton kernels' chunked algorithm under the Triton interpreter (its time is "
            "interpreter time, not a speed figure). runs.<impl>.ran: which backend each "
            "patched op resolved to and the native kernels called, per phase.")
        data["settings"] = dict(vars(args), shape=QWEN25_05B, weights="fp32, random init",
                                optimizer="sgd", command=" ".join(["python -m "
                                                                   "benchmarks.trl_grpo_step",
                                                                   *(argv or sys.argv[1:])]))
        data["runs"] = details  # everything each configuration's process reported
        trl_rows = {r["case"]: r for r in rows if r["impl"] == "trl"}
        data["checks"] = {
            f"{r['impl']} | {r['case']}": {
                "grad_norm_relative_difference_vs_trl":
                    abs(r["grad_norm"] - trl_rows[r["case"]]["grad_norm"])
                    / max(abs(trl_rows[r["case"]]["grad_norm"]), 1e-30),
                "same_reward_as_trl": r["reward"] == trl_rows[r["case"]]["reward"]}
            for r in rows if r["impl"] != "trl" and r.get("grad_norm") is not None}
        Path(path).write_text(json.dumps(data, indent=1))
        print(f"[trl_grpo_step] wrote {path}")
    return 0


if __name__ == "__main__":
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(main))
