"""Regional torch.compile of the decoder layers (rlhf/compile.py, ``torch_compile=true``).

The compiled layers must compute what the eager ones do under every role of the shared
backbone (the role is a guard of the graph, not a constant baked into it), through gradient
checkpointing's recomputation, and give the eager error or result when compiling fails. Most
tests compile with AOTAutograd's eager backend (traced and differentiated like the inductor's
graphs, run with torch ops: seconds); one compiles with the inductor, as a run does.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import pytest
import torch
from torch import nn

from rlhf import compile as compile_module
from rlhf import distributed, rl
from rlhf.compile import CompiledLayers, decoder_layers
from rlhf.models import LoraSpec, SharedBackbone
from rlhf.tiny_models import tiny_causal_lm

ROLES = ("policy", "critic", None)


@pytest.fixture(autouse=True)
def _aot_eager(monkeypatch):
    monkeypatch.setattr(compile_module, "DEFAULT_BACKEND", "aot_eager")
    torch._dynamo.reset()  # no compiled variant of another test is reused
    yield
    torch._dynamo.reset()


def backbone(arch: str = "llama", layers: int = 2, seed: int = 0,
             checkpointing: bool = False) -> SharedBackbone:
    """A tiny backbone whose roles' adapters all differ (PEFT starts LoRA B at 0)."""
    model = tiny_causal_lm(arch, seed=seed, num_layers=layers)
    shared = SharedBackbone.from_model(model, lora=LoraSpec(rank=4, alpha=8))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in shared.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    if checkpointing:
        shared.enable_gradient_checkpointing()
    return shared.train()


def batch(seed: int = 0, rows: int = 3, length: int = 9):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    return ids, mask


def loss_and_grads(model: SharedBackbone, role, ids, mask, context=contextlib.nullcontext):
    """hidden states of ``role`` and the gradients of a fixed weighted sum of them with respect
    to that role's adapter."""
    params = model.trainable_parameters(role) if role is not None else []
    for param in params:
        param.grad = None
    with context():
        hidden = model.hidden_states(ids, mask, role)
        weights = torch.linspace(-1, 1, hidden.numel(), device=hidden.device).view(hidden.shape)
        (hidden * weights).sum().backward() if params else None
    # (None: a head of the role, which the hidden states do not reach)
    return hidden.detach(), [None if p.grad is None else p.grad.clone() for p in params]


@pytest.mark.parametrize("arch, layers", [("llama", 3), ("qwen2", 2), ("gpt2", 2)])
def test_decoder_layers_are_the_repeated_blocks(arch, layers):
    model = tiny_causal_lm(arch, num_layers=layers)
    found = decoder_layers(model)
    assert len(found) == layers and len({type(layer) for layer in found}) == 1
    assert type(found[0]).__name__ in model._no_split_modules
    with pytest.raises(ValueError, match="no repeated decoder layers"):
        decoder_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


def test_compiled_layers_compute_every_role_as_eager():
    """Each role (and the reference, adapters off) through the compiled layers gives the eager
    hidden states (the role is a guard of the graph: the roles really differ), and the policy's
    adapter gradients with gradient checkpointing, whose backward recomputes through the
    compiled forward (without checkpointing: the RL stage's test below)."""
    model = backbone(layers=1, checkpointing=True)  # one layer: one variant per role
    ids, mask = batch()
    with torch.no_grad():
        eager = {role: model.hidden_states(ids, mask, role) for role in ROLES}
    eager_grads = loss_and_grads(model, "policy", ids, mask)
    compiled = CompiledLayers(model.causal_lm)
    with torch.no_grad(), compiled.active():
        for role in ROLES + ("policy",):  # the policy again after the others
            torch.testing.assert_close(model.hidden_states(ids, mask, role), eager[role],
                                       rtol=1e-5, atol=1e-6)
    hidden, grads = loss_and_grads(model, "policy", ids, mask, compiled.active)
    torch.testing.assert_close(hidden, eager_grads[0], rtol=1e-5, atol=1e-6)
    assert sum(g is not None for g in grads) >= 8
    for got, want in zip(grads, eager_grads[1]):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert compiled.failed is None
    assert (eager["policy"] - eager["critic"]).abs().max() > 1e-2
    assert (eager["policy"] - eager[None]).abs().max() > 1e-2


def test_layers_get_their_forward_back_after_the_block():
    model = backbone()
    layers = decoder_layers(model.causal_lm)
    compiled = CompiledLayers(model.causal_lm)
    with compiled.active():
        assert all("forward" in vars(layer) for layer in layers)
    assert all("forward" not in vars(layer) for layer in layers)
    with pytest.raises(RuntimeError, match="inside"):
        with compiled.active():
            raise RuntimeError("inside")
    assert all("forward" not in vars(layer) for layer in layers)


def test_a_failed_compile_runs_eagerly_with_one_warning(monkeypatch):
    """torch.compile failing (here: a compiler that raises at the first call) leaves the eager
    result and one RuntimeWarning naming the error; later calls run eagerly without a word."""
    def failing_compile(function, **_):
        def call(*args, **kwargs):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return call

    monkeypatch.setattr(compile_module.torch, "compile", failing_compile)
    model = backbone()
    ids, mask = batch()
    eager = loss_and_grads(model, "policy", ids, mask)
    compiled = CompiledLayers(model.causal_lm)
    with pytest.warns(RuntimeWarning, match=r"could not compile the decoder layers "
                                            r"\(RuntimeError: no C\+\+ compiler found\)"):
        hidden, grads = loss_and_grads(model, "policy", ids, mask, compiled.active)
    assert compiled.failed == "RuntimeError: no C++ compiler found"
    torch.testing.assert_close(hidden, eager[0], rtol=0, atol=0)
    for got, want in zip(grads, eager[1]):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_and_grads(model, "critic", ids, mask, compiled.active)


def test_an_error_of_the_layer_itself_is_raised_as_eager_raises_it(monkeypatch):
    model = backbone()
    compiled = CompiledLayers(model.causal_lm)
    ids, mask = batch()
    with compiled.active(), pytest.raises(Exception) as compiled_error:
        model.hidden_states(ids.float(), mask, "policy")  # float ids: the embedding refuses
    with pytest.raises(Exception) as eager_error:
        model.hidden_states(ids.float(), mask, "policy")
    assert type(compiled_error.value) is type(eager_error.value)


def test_cached_calls_run_eagerly(monkeypatch):
    """A layer given a key/value cache (a group's shared prompt) runs its eager forward: the
    compiled one is never called (it would compile a variant per layer of the stack)."""
    model = backbone()
    compiled = CompiledLayers(model.causal_lm)
    called = []
    monkeypatch.setattr(compiled, "_compiled_forward", lambda cls: called.append(cls) or (
        lambda *a, **k: pytest.fail("the compiled forward ran with a cache")))
    ids = torch.randint(3, 100, (4, 10))
    ids[2:, :6] = ids[:2, :6]  # rows 2, 3 share row 0, 1's six-token prompt
    mask = torch.ones_like(ids)
    with torch.no_grad():
        eager = model.hidden_states(ids, mask, "policy", shared_prefix=6)
        with compiled.active():
            shared = model.hidden_states(ids, mask, "policy", shared_prefix=6)
    torch.testing.assert_close(shared, eager, rtol=0, atol=0)
    assert called == [] and compiled.failed is None


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("RLHF_TEST_INDUCTOR")),
                    reason="the inductor's first C++ build takes about a minute on a 2-core CPU "
                           "(RLHF_TEST_INDUCTOR=1 runs it; benchmarks/host_trainer.py compares "
                           "the compiled update's gradients with eager ones in every run)")
def test_inductor_compiles_the_layers():
    """The backend a run uses (C++ kernels on the CPU, Triton's on a GPU): one layer, one role,
    forward and backward as eager to rounding."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = backbone(layers=1).to(device)
    ids, mask = (t.to(device) for t in batch())
    eager = loss_and_grads(model, "policy", ids, mask)
    compiled = CompiledLayers(model.causal_lm, backend="inductor")
    hidden, grads = loss_and_grads(model, "policy", ids, mask, compiled.active)
    assert compiled.failed is None
    torch.testing.assert_close(hidden, eager[0], rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, eager[1]):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _record_compiled_calls(monkeypatch) -> list[bool]:
    """Compiling replaced by a recorder of the calls (whether each ran with gradients): the
    stages' wiring in a second, not the minute of each stage's compiled variants (what the
    compiled forward computes is the role tests' subject above)."""
    calls: list[bool] = []

    def recorder(self, cls):
        def forward(layer, *args, **kwargs):
            calls.append(torch.is_grad_enabled())
            return cls.forward(layer, *args, **kwargs)
        return forward

    monkeypatch.setattr(CompiledLayers, "_compiled_forward", recorder)
    return calls


def test_the_rl_stage_with_torch_compile_trains_as_eager(tmp_path, monkeypatch):
    """``torch_compile=true`` (GRPO: groups of one prompt, which the compiled update runs row by
    row instead of once per group): the scoring (no gradient) and the update (gradients) run
    the layers through the compiled forward, the adapters are those eager training gives, to
    rounding, and the layers' forward is the class's again after the run."""
    from tests.helpers import PROMPTS, rl_config, rl_tokenizer, tiny_backbone

    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    compiled_calls = _record_compiled_calls(monkeypatch)
    tokenizer = rl_tokenizer()
    trained = {}
    for flag in (False, True):
        model = tiny_backbone(tokenizer)
        cfg = rl_config(tmp_path / str(flag), "grpo", num_iterations=1, torch_compile=flag)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            rl.train(cfg, backbone=model, tokenizer=tokenizer, prompts=PROMPTS)
        trained[flag] = [p.detach().clone() for p in model.trainable_parameters("policy")]
        assert all("forward" not in vars(layer) for layer in decoder_layers(model.causal_lm))
        assert (True in compiled_calls and False in compiled_calls) is flag
    moved = max((p - q).abs().max() for p, q in zip(trained[False],
                                                    [p.detach() for p in tiny_backbone(
                                                        tokenizer).trainable_parameters("policy")]))
    assert moved > 1e-3  # the step changed the adapter (lr 1e-2)
    for got, want in zip(trained[True], trained[False]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_sft_and_reward_stages_run_every_layer_call_compiled(tmp_path, monkeypatch):
    """SFT (with gradient checkpointing) and the reward stage (its training steps and its
    evaluation) with ``torch_compile=true``: every decoder-layer call
    goes through the compiled forward, and the layers are plain again after the run."""
    from rlhf import reward, sft
    from tests.helpers import sentiment_pairs, sft_config, tiny_backbone, tiny_model
    from tests.trainer.test_stages import corpus, tokenizer

    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    compiled_calls = _record_compiled_calls(monkeypatch)
    examples = corpus.__wrapped__()[:16]
    tok = tokenizer.__wrapped__(examples)

    def layer_calls(model):
        calls = []
        for layer in decoder_layers(model):
            layer.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
        return calls

    for flag in (False, True):
        compiled_calls.clear()
        model = tiny_model(tok)
        calls = layer_calls(model)
        cfg = sft_config(tmp_path / f"sft{flag}", max_steps=1, grad_accum_steps=1,
                         gradient_checkpointing=True, torch_compile=flag)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sft.train(cfg, model=model, tokenizer=tok, examples=examples)
        # each layer's forward (with transformers 4's checkpointing also its recomputation in
        # the backward; transformers 5 checkpoints inside the layer's forward, so inside the
        # compiled graph)
        assert len(calls) >= len(decoder_layers(model))
        assert compiled_calls == (calls if flag else [])
        assert all("forward" not in vars(layer) for layer in decoder_layers(model))

    compiled_calls.clear()
    model = tiny_backbone(tok)
    calls = layer_calls(model.causal_lm)
    cfg = reward.RewardConfig(output_dir=str(tmp_path / "rm"), batch_size=8, epochs=1.0,
                              grad_accum_steps=1, lr=2e-2, warmup_steps=1, log_every=1,
                              eval_every=1, device="cpu", max_length=48, torch_compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reward.train(cfg, backbone=model, tokenizer=tok, train_pairs=sentiment_pairs(8, 0),
                     eval_pairs=sentiment_pairs(4, 7))
    assert compiled_calls == calls and True in calls and False in calls  # training, evaluation
    assert all("forward" not in vars(layer) for layer in decoder_layers(model.causal_lm))


def test_torch_compile_is_refused_with_fsdp2(monkeypatch):
    monkeypatch.setattr(distributed, "strategy", lambda: "fsdp2")
    cfg = rl.RLConfig(torch_compile=True)
    with pytest.raises(ValueError, match="torch_compile=true is not supported with "
                                         "strategy=fsdp2"):
        rl._compiled_layers(backbone(), cfg)
    assert rl._compiled_layers(backbone(), rl.RLConfig()) is contextlib.nullcontext
    with pytest.raises(ValueError, match="not supported with strategy=fsdp2"):
        compile_module.layers_context(backbone().causal_lm, True)  # SFT, the reward stage
    assert compile_module.layers_context(backbone().causal_lm, False) is contextlib.nullcontext


def test_host_floats_reads_every_value_as_float_does():
    """The RL loop's one read per optimizer step (rl.host_floats): each tensor's float() value
    exactly, whatever its dtype (fp32 next to fp64: promoted, never rounded), the structure
    kept, numbers made floats, None left alone; one stack, so one transfer from a GPU."""
    values = [torch.tensor(0.1), torch.tensor(1e-300, dtype=torch.float64),
              torch.tensor(True), torch.tensor([7], dtype=torch.int64),
              torch.tensor(0.3, dtype=torch.bfloat16), torch.tensor(float("nan"))]
    tree = [(values[0], {"a": values[1], "b": values[2]}, None, [values[3], 2, values[4]]),
            (values[5], {}, None, [])]
    got = rl.host_floats(tree)
    want = [(float(values[0]), {"a": float(values[1]), "b": 1.0}, None,
             [7.0, 2.0, float(values[4])]), (float("nan"), {}, None, [])]
    assert got[0] == want[0] and type(got[0][3][1]) is float
    assert got[1][0] != got[1][0] and got[1][1:] == want[1][1:]  # NaN stays NaN
    assert rl.host_floats([]) == [] and rl.host_floats({"x": None}) == {"x": None}
