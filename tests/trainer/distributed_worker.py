"""One rank of the multi-process runs of tests/trainer/test_distributed.py (not a test module
itself).

``launch(scenarios, out, world_size)`` starts ``world_size`` copies of this file the way torchrun
does (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment; gloo on the
CPU); each runs the named scenarios one after the other in one process group, so the process
start-up (torch, transformers, the group) is paid once. The builders and configs below are the
ones the test runs in one process for the world-size-1 reference.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# the stages' device: cpu in the tests; tests/trainer/distributed_gpu_check.py sets cuda
DEVICE = os.environ.get("RLHF_TEST_DEVICE", "cpu")


# ----------------------------------------------------------------------------------------------
# the shared set-up: tiny models, data, configs
# ----------------------------------------------------------------------------------------------
def make_tokenizer(directory: Path):
    """The tiny BPE tokenizer, trained once and saved (every rank loads the same files)."""
    from rlhf import task
    from tests.helpers import review_tokenizer

    tokenizer = review_tokenizer(task.make_corpus(96, seed=1), vocab_size=300)
    tokenizer.save_pretrained(directory)
    return tokenizer


def load_tokenizer(directory: Path):
    from rlhf.models import load_tokenizer as load

    return load(str(directory))


def tiny_model(tokenizer, seed: int = 0):
    from tests.helpers import tiny_llama

    return tiny_llama(tokenizer, seed)  # the shape tests/trainer/test_stages.py trains


def tiny_backbone(tokenizer, seed: int = 0):
    from rlhf.models import LoraSpec, SharedBackbone

    backbone = SharedBackbone.from_model(tiny_model(tokenizer, seed),
                                         lora=LoraSpec(rank=4, alpha=8))
    torch.manual_seed(seed + 1)
    for head in (backbone.value_head, backbone.reward_head):
        torch.nn.init.normal_(head.weight, std=0.2)
    # a non-zero policy adapter: a fresh LoRA B is zero and the first step would be special
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 2)
        for p in backbone.trainable_parameters("policy"):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return backbone


def sft_examples():
    from rlhf import task

    return task.make_corpus(64, seed=3)


def preference_pairs(n: int = 40, seed: int = 5):
    from rlhf import task

    pos = task.make_corpus(n, seed=seed, sentiment_mix={"positive": 1.0})
    neg = task.make_corpus(n, seed=seed + 1, sentiment_mix={"negative": 1.0})
    return [{"prompt": p["prompt"], "chosen": p["completion"], "rejected": q["completion"]}
            for p, q in zip(pos, neg, strict=True)]


def sft_config(output_dir, **overrides):
    from rlhf import sft

    settings = dict(output_dir=str(output_dir), max_steps=3, batch_size=6, grad_accum_steps=2,
                    lr=1e-2, warmup_steps=1, log_every=1, save_every=0, max_length=48,
                    device=DEVICE, bf16=False)
    settings.update(overrides)
    return sft.SFTConfig(**settings)


def rm_config(output_dir, **overrides):
    from rlhf import reward

    settings = dict(output_dir=str(output_dir), batch_size=8, grad_accum_steps=2, epochs=1.5,
                    lr=1e-2, warmup_steps=1, log_every=1, eval_every=0, save_every=0,
                    max_length=48, device=DEVICE, bf16=False, lora_rank=4, lora_alpha=8)
    settings.update(overrides)
    return reward.RewardConfig(**settings)


def rl_config(output_dir, algorithm: str, **overrides):
    from rlhf import rl

    settings = dict(output_dir=str(output_dir), algorithm=algorithm, num_iterations=2,
                    rollout_batch_size=8, minibatch_size=2, grad_accum_steps=2, ppo_epochs=2,
                    max_new_tokens=6, max_prompt_length=40, lr=1e-2, warmup_steps=1,
                    save_every=0, device=DEVICE, bf16=False, kl_target=2.0, kl_horizon=50,
                    old_logprobs="forward", forward_batch_size=0)
    if algorithm == "ppo":
        settings["critic_lr"] = 1e-2
    else:
        settings["group_size"] = 2
    settings.update(overrides)
    return rl.RLConfig(**settings)


class FixedEngine:
    """A stand-in for RolloutEngine whose responses depend on the prompt row alone (its tokens,
    the sample number within its group and the call number), never on which rows share the
    batch or on the model: a rollout batch fixed independently of the world size and of
    rounding. (The real engine gives every rank its rows' part of the global batch's draws:
    the same responses too, unless rounding flips a draw.)"""

    decode_graph = "none"

    def __init__(self, backbone, role="policy", autocast_dtype=None):
        self.vocab = backbone.vocab_size
        self.calls = 0

    def generate(self, ids, mask, max_new_tokens, *, eos_token_id, pad_token_id,
                 samples_per_prompt=1, **_):
        from rlhf.engine import Generation

        self.calls += 1
        ids = ids.repeat_interleave(samples_per_prompt, 0)
        mask = mask.repeat_interleave(samples_per_prompt, 0)
        rows, lengths = [], []
        for row in range(ids.shape[0]):
            key = int((ids[row] * mask[row]).sum().item()) * 131 + (row % samples_per_prompt) * 7 \
                + self.calls
            generator = torch.Generator().manual_seed(key)
            length = int(torch.randint(1, max_new_tokens + 1, (1,), generator=generator))
            tokens = torch.randint(3, self.vocab, (max_new_tokens,), generator=generator)
            tokens[length - 1] = eos_token_id
            tokens[length:] = pad_token_id
            rows.append(tokens)
            lengths.append(length)
        longest = max(lengths)
        tokens = torch.stack(rows)[:, :longest].to(ids.device)
        response_mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
                         ).to(ids.device)
        return Generation(sequences=torch.cat([ids, tokens], 1),
                          attention_mask=torch.cat([mask, response_mask.long()], 1),
                          response_mask=response_mask,
                          logprobs=torch.zeros(tokens.shape, dtype=torch.float32,
                                               device=ids.device),
                          prompt_length=ids.shape[1])

    def release(self):
        pass


# ----------------------------------------------------------------------------------------------
# scenarios: each runs one stage into out/<name>
# ----------------------------------------------------------------------------------------------
def run_scenario(name: str, out: Path, tokenizer, on_step=None):
    """Run scenario ``name`` (in this process, whatever its world size) into ``out / name``."""
    from rlhf import distributed, reward, rl, sft

    base, _, strategy = name.partition("@")  # "rm@fsdp2": the rm scenario under fsdp2
    distributed.set_strategy(strategy or None)
    directory = out / name
    if base.startswith("sft"):
        overrides = {"save_every": 1, "max_steps": 4, "keep_last": None} \
            if base == "sft_ckpt" else {}
        return sft.train(sft_config(directory, **overrides), model=tiny_model(tokenizer),
                         tokenizer=tokenizer, examples=sft_examples(), on_step=on_step)
    if base in ("rm", "rm_every", "rm_resume"):
        # rm_every: a checkpoint every step (the same numbers); rm_resume: resumes the copy of
        # another world size's rm_every run that test_distributed.py leaves in out / name
        overrides = {"save_every": 1, "keep_last": None} if base != "rm" else {}
        pairs = preference_pairs()
        return reward.train(rm_config(directory, resume=base == "rm_resume", **overrides),
                            backbone=tiny_backbone(tokenizer), tokenizer=tokenizer,
                            train_pairs=pairs[:34], eval_pairs=pairs[34:])
    if base in ("ppo", "grpo", "dapo", "ppo_gc", "ppo_real", "grpo_real", "dapo_flat",
                "ppo_steptokens"):
        from rlhf import task

        # ppo_gc: PPO with role-aware gradient checkpointing (the same numbers as ppo);
        # *_real: the real rollout engine (its draws for the global batch on every rank);
        # dapo_flat: dynamic sampling with a reward that leaves half the prompts' groups flat;
        # ppo_steptokens: PPO whose policy and value losses divide by the step's tokens
        algorithm = base.removesuffix("_gc").removesuffix("_real").removesuffix("_flat") \
            .removesuffix("_steptokens")
        overrides = {"dynamic_sampling_rounds": 8} if base == "dapo_flat" else {}
        if base == "ppo_steptokens":
            overrides = {"loss_normalizer": "step_tokens"}
        cfg = rl_config(directory, algorithm, gradient_checkpointing=base.endswith("_gc"),
                        **overrides)
        prompts = task.all_prompts("train")[:32]
        flat = set(prompts[::2])

        def half_flat_reward(row_prompts, responses):
            return [0.0 if p in flat else float(len(r) % 5) for p, r in
                    zip(row_prompts, responses, strict=True)]

        original = rl.RolloutEngine
        if not base.endswith("_real"):
            rl.RolloutEngine = FixedEngine
        try:
            return rl.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer,
                            prompts=prompts,
                            reward_fn=half_flat_reward if base == "dapo_flat" else None)
        finally:
            rl.RolloutEngine = original
    if base == "engine":
        return _engine_scenario(directory, tokenizer)
    if base == "pipeline":
        return _pipeline_scenario(directory)
    if base == "frontier":
        return _frontier_scenario(directory)
    if base == "cli_sigterm":
        return _sigterm_scenario(directory, out)
    if base == "refusals":
        return _refusals_scenario(directory, tokenizer)
    raise ValueError(f"unknown scenario {name!r}")


class _NoEngine:
    """Stands in for RolloutEngine where a run must stop before it builds one."""

    def __init__(self, *args, **kwargs):
        raise AssertionError("the rollout engine was built: the run got past its set-up")


class _Unread(list):
    """Rows a run must stop before it reads."""

    def _read(self, *args, **kwargs):
        raise AssertionError("the data was read: the run got past its set-up")

    __iter__ = __len__ = __getitem__ = _read


def _refusals_scenario(directory: Path, tokenizer) -> None:
    """Settings 2 ranks cannot share (RL: 3 prompts per rollout, a minibatch of 1 row; SFT and
    the reward model: micro-batches of 1 row): each must stop the run with its ValueError
    before any work (RL: before the engine is built, not after a rollout; SFT and RM: before
    their data is read, not at the first step once the model has loaded).
    Writes {case: "ValueError: <message>"} to result.json (rank 0)."""
    from rlhf import distributed, reward, rl, sft, task

    def grpo(**overrides):
        return lambda out: rl.train(rl_config(out, "grpo", **overrides),
                                    backbone=tiny_backbone(tokenizer), tokenizer=tokenizer,
                                    prompts=task.all_prompts("train")[:8])

    cases = {
        "prompts": grpo(rollout_batch_size=12, group_size=4),
        "minibatch": grpo(minibatch_size=1),
        "sft": lambda out: sft.train(sft_config(out, batch_size=1), model=tiny_model(tokenizer),
                                     tokenizer=tokenizer, examples=_Unread()),
        "rm": lambda out: reward.train(rm_config(out, batch_size=1),
                                       backbone=tiny_backbone(tokenizer), tokenizer=tokenizer,
                                       train_pairs=_Unread(), eval_pairs=_Unread()),
    }
    seen = {}
    original = rl.RolloutEngine
    rl.RolloutEngine = _NoEngine
    try:
        for case, run in cases.items():
            try:
                run(directory / case)
                seen[case] = "no error"
            except Exception as error:  # noqa: BLE001 (recorded, compared by the test)
                seen[case] = f"{type(error).__name__}: {error}"
    finally:
        rl.RolloutEngine = original
    if distributed.is_main():
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "result.json").write_text(json.dumps(seen))


def _writes_on_rank_1(directory: Path, run) -> None:
    """``run()`` (a pipeline or frontier run into ``directory``) while rank 1 records every file
    or directory it creates or renames under ``directory`` (rank 0 alone may write there: every
    rank writing raced, "Directory not empty"); each rank writes the summary ``run`` returned
    and what it recorded to ``<directory>.rank<r>.json``, beside the output directory."""
    import builtins

    from rlhf import distributed

    root = str(directory.resolve())
    written: list[str] = []

    def inside(path) -> bool:
        try:
            return os.path.abspath(os.fspath(path)).startswith(root)
        except TypeError:  # a file descriptor
            return False

    originals = {"replace": os.replace, "rename": os.rename, "mkdir": os.mkdir,
                 "open": builtins.open}

    def recorded(name):
        def call(path, *args, **kwargs):
            result = originals[name](path, *args, **kwargs)
            mode = args[0] if args else kwargs.get("mode", "r")
            if inside(path) and (name != "open" or any(c in str(mode) for c in "wax+")):
                written.append(f"{name} {path}")
            return result
        return call

    if distributed.rank() == 1:
        os.replace, os.rename, os.mkdir = (recorded(n) for n in ("replace", "rename", "mkdir"))
        builtins.open = recorded("open")
    try:
        summary = run()
    finally:
        os.replace, os.rename, os.mkdir = originals["replace"], originals["rename"], \
            originals["mkdir"]
        builtins.open = originals["open"]
    (directory.parent / f"{directory.name}.rank{distributed.rank()}.json").write_text(
        json.dumps({"summary": summary, "written": written}, default=str))


def _pipeline_scenario(directory: Path) -> None:
    """``rlhf pipeline`` on tests/helpers.py's micro configuration (``_writes_on_rank_1``)."""
    from rlhf import pipeline
    from tests.helpers import micro_config

    _writes_on_rank_1(directory, lambda: pipeline.run(micro_config(directory)))


def _frontier_scenario(directory: Path) -> None:
    """``rlhf frontier`` with the micro pipeline as its base and one point (one PPO iteration),
    run (``_writes_on_rank_1``), then resumed (every file read on rank 0)."""
    from dataclasses import replace

    from rlhf import distributed, frontier
    from tests.helpers import micro_config

    base = micro_config(directory / "unused")
    cfg = frontier.FrontierConfig(output_dir=str(directory), base=base, device="cpu",
                                  algorithms=("ppo",), kl_coefs=(0.1,), num_iterations=1,
                                  eval_samples=base.eval_samples)
    _writes_on_rank_1(directory, lambda: frontier.run(cfg))
    resumed = frontier.run(replace(cfg, resume=True))  # reads the base's and the point's files
    (directory.parent / f"{directory.name}.resumed.rank{distributed.rank()}.json").write_text(
        json.dumps(resumed, default=str))


def _sigterm_scenario(directory: Path, out: Path) -> int:
    """`rlhf sft` through the CLI (cli.main, in this process group), 6 steps without a periodic
    checkpoint; rank 1 alone gets SIGTERM after step 2, as a rank torchrun passes a SIGTERM to.
    Returns the CLI's exit status (the process exits with it: it leaves the process group)."""
    import signal

    from rlhf import cli, distributed, sft

    real_train = sft.train

    def train(cfg, **kwargs):
        def on_step(step, _metrics):
            if step == 2 and distributed.rank() == 1:
                os.kill(os.getpid(), signal.SIGTERM)

        return real_train(cfg, on_step=on_step, **kwargs)

    sft.train = train
    try:
        return cli.main(["sft", f"model={out / 'model'}", f"dataset={out / 'sft.jsonl'}",
                         f"output_dir={directory}", "max_steps=6", "save_every=0",
                         "batch_size=6", "max_length=48", "warmup_steps=1", "lr=1e-2",
                         f"device={DEVICE}", "bf16=false", "log_every=1"])
    finally:
        sft.train = real_train


def _engine_scenario(directory: Path, tokenizer) -> None:
    """The real rollout engine on the prepared backbone (fsdp2: sharded layers): each rank
    samples its own prompts, with a third of the vocabulary ending a response so that the ranks'
    rows finish at different steps, and must draw exactly what the unsharded backbone draws."""
    from rlhf import distributed, rl, task
    from rlhf.engine import RolloutEngine
    from rlhf.stage import resolve_device

    device = resolve_device(DEVICE)
    backbone = tiny_backbone(tokenizer).to(device)
    prompts = task.all_prompts("train")[4 * distributed.rank():4 * distributed.rank() + 4]
    ids, mask = (t.to(device) for t in rl.encode_prompts(prompts, tokenizer, 40))
    stop = list(range(3, len(tokenizer) // 3))
    kwargs = dict(eos_token_id=stop, pad_token_id=tokenizer.pad_token_id,
                  seed=11 + distributed.rank())
    whole = RolloutEngine(backbone)
    before = whole.generate(ids, mask, 12, **kwargs)
    before_mode = whole._mode_for(device)
    backbone = distributed.prepare(backbone, device, None, stage="engine")
    engine = RolloutEngine(backbone)
    distributed.prepare_engine(engine)
    after = engine.generate(ids, mask, 12, **kwargs)
    same = torch.equal(before.sequences, after.sequences) and \
        torch.equal(before.logprobs, after.logprobs)
    mine = torch.tensor([before.response_mask.shape[1], int(same)], device=device)
    everyone = [torch.zeros_like(mine) for _ in range(distributed.world_size())]
    torch.distributed.all_gather(everyone, mine)
    if distributed.is_main():
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "result.json").write_text(json.dumps({
            "strategy": distributed.strategy(), "same": [bool(x[1]) for x in everyone],
            "response_lengths": [int(x[0]) for x in everyone],
            "decode_graph": [before_mode, engine.decode_graph]}))


def launch(scenarios: list[str], out: Path, world_size: int = 2, timeout: float = 600,
           env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Run ``scenarios`` on ``world_size`` ranks of this file; returns each rank's result.
    ``timeout``: a backstop (a rank waiting for a dead one stops after RLHF_DIST_TIMEOUT=60 s
    on its own); the group takes 45-90 s on 2 busy cores, and went past 240 s on a 2-core
    machine running other tests at a load of 6."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = []
    for rank in range(world_size):
        rank_env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank),
                        WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port), RLHF_KERNELS_BACKEND="reference",
                        RLHF_DIST_TIMEOUT="60", OMP_NUM_THREADS="1")
        # progress bars on: rank 0 draws them in its stderr, the others must not
        rank_env.pop("TQDM_DISABLE", None)
        rank_env.update(env or {})
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE / "distributed_worker.py"), str(out), *scenarios],
            env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for rank, proc in enumerate(procs):
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise AssertionError(f"rank {rank} still running after {timeout} s: a hang") from None
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


def main(argv: list[str]) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    out, scenarios = Path(argv[0]), argv[1:]
    from rlhf import distributed

    torch.set_num_threads(1)
    distributed.init_from_env(DEVICE)
    tokenizer = load_tokenizer(out / "tokenizer")
    counts = {}
    die_at = int(os.environ.get("KILL_RANK1_AT_STEP", "0"))

    def on_step(step, _metrics):
        if die_at and distributed.rank() == 1 and step == die_at:
            os._exit(17)  # a rank that dies without a word, as a killed process does

    for name in scenarios:
        before = dict(distributed.COLLECTIVES)
        result = run_scenario(name, out, tokenizer,
                              on_step=on_step if name == "sft_ckpt" else None)
        if name == "cli_sigterm":  # through the CLI, which left the process group: the last
            sys.exit(result)
        counts[name] = {k: distributed.COLLECTIVES[k] - before[k] for k in before}
        if distributed.is_main():
            (out / "collectives.json").write_text(json.dumps(counts))
    distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    main(sys.argv[1:])
