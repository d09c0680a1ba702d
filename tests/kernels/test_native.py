"""The native CPU kernels (csrc/cpu) against the float64 reference, and the backend choice.

The kernel tests are the Triton tests themselves, collected here a second time: the op tests of
tests/kernels/test_logprobs.py, test_linear_logprobs.py, test_ppo_fused.py, test_policy_loss.py,
test_value_loss.py, test_bradley_terry.py, test_group_advantages.py, test_gae_whiten.py's GAE
and whitening tests and test_kl_rewards.py's KL and reward-shaping tests (values, gradients and
stats under the 2x rule, awkward vocabularies and shapes, strided and shifted inputs, masks,
ignore_index, out-of-range labels, non-finite rows, all-masked and empty batches, bf16 / fp16,
in-place backward, torch.compile) run with every CPU launcher pointed at the native kernel and
the Triton kernels replaced by a trap, so a pass means the native kernel computed the result. The
remaining tests check the public route: ``RLHF_KERNELS_BACKEND=native``, ``auto`` outside the
interpreter (in a fresh process, which also shows the build is cached across processes), the
one warning when the kernels cannot be built, and the same user errors as the other backends.

The first test to run builds the extension unless scripts/bootstrap.sh did (about 20 s of CPU
time, once per machine: later processes load it from torch's extensions directory); without a
C++ compiler or ninja every test here is skipped with the reason.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import rlhf_kernels
from rlhf_kernels import _native, backend, gae, logprobs, reference
from tests.kernels import (
    test_bradley_terry,
    test_gae_whiten,
    test_group_advantages,
    test_kl_rewards,
    test_linear_logprobs,
    test_logprobs,
    test_policy_loss,
    test_ppo_fused,
    test_value_loss,
)
from tests.numerics import DEVICE, assert_close, assert_close_2x

if DEVICE.type != "cpu":
    pytest.skip("the native kernels are the CPU path; this machine tests CUDA",
                allow_module_level=True)

logprobs_module = importlib.import_module("rlhf_kernels.ops.logprobs")
gae_module = importlib.import_module("rlhf_kernels.ops.gae")
kl_module = importlib.import_module("rlhf_kernels.ops.kl")
rewards_module = importlib.import_module("rlhf_kernels.ops.rewards")
whiten_module = importlib.import_module("rlhf_kernels.ops.whiten")
policy_module = importlib.import_module("rlhf_kernels.ops.policy_loss")
value_module = importlib.import_module("rlhf_kernels.ops.value_loss")
bt_module = importlib.import_module("rlhf_kernels.ops.bradley_terry")
advantages_module = importlib.import_module("rlhf_kernels.ops.advantages")
reduce_module = importlib.import_module("rlhf_kernels.ops._reduce")
ppo_terms_module = importlib.import_module("rlhf_kernels.ops._ppo_terms")
_NATIVE_MODULES = (logprobs_module, gae_module, kl_module, rewards_module, whiten_module,
                   policy_module, value_module, bt_module, advantages_module, reduce_module,
                   ppo_terms_module)
_TRITON_KERNELS = ((logprobs_module, "_logprobs_fwd_kernel"), (logprobs_module,
                   "_logprobs_bwd_kernel"), (gae_module, "_gae_fwd_kernel"),
                   (kl_module, "_kl_fwd_kernel"), (kl_module, "_kl_bwd_kernel"),
                   (kl_module, "_kl_fwd_flat_kernel"),
                   (rewards_module, "_shape_rewards_fwd_kernel"),
                   (whiten_module, "_whiten_partials_kernel"),
                   (whiten_module, "_whiten_fwd_kernel"),
                   (policy_module, "_ppo_policy_loss_fwd_kernel"),
                   (policy_module, "_ppo_policy_loss_finish_kernel"),
                   (value_module, "_ppo_value_loss_fwd_kernel"),
                   (value_module, "_ppo_value_loss_finish_kernel"),
                   (bt_module, "_bradley_terry_fwd_kernel"),
                   (bt_module, "_bradley_terry_finish_kernel"),
                   (advantages_module, "_group_advantages_kernel"),
                   (reduce_module, "_saved_grad_bwd_kernel"),
                   (ppo_terms_module, "_ppo_token_terms_kernel"))


@pytest.fixture(scope="module")
def _built():
    if not _native.available():
        pytest.skip(f"the native CPU kernels did not build: {_native.failure_reason()}")
    return _native.ops()


class _Trap:
    """Stands in for a Triton kernel: indexing it (a launch) fails the test."""

    def __getitem__(self, grid):
        raise AssertionError("a Triton kernel was launched where the native kernel should run")


@pytest.fixture(autouse=True)
def native_launchers(_built, monkeypatch, request):
    """Every CPU launcher of the native ops runs its native kernel; the Triton ones trap."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "reference":
        pytest.skip("the reference backend's case: its own suite runs it")
    for module in _NATIVE_MODULES:
        monkeypatch.setattr(module, "native_cpu_kernels", lambda t: not t.is_cuda)
    for module, name in _TRITON_KERNELS:
        monkeypatch.setattr(module, name, _Trap())


# --------------------------------------------------------------------------------------------
# The Triton suites' op tests, run again on the native kernels (see the module docstring).
# Left out: tests of the reference alone, of other ops, and the inductor compiles.
# --------------------------------------------------------------------------------------------
# The inductor compiles of the Triton suites' compile tests cost ~10 s here and test the custom
# op's tracing, which is the same on every backend: test_torch_compile_sees_the_one_custom_op
# below compiles through it with the native kernels instead (aot_eager, no codegen).
_COMPILE = "test_torch_compile_fullgraph"
_REUSED = {
    test_logprobs: {_COMPILE},
    test_linear_logprobs: {"test_choose_chunk_rows", "test_reference_backend_matches_reference",
                           _COMPILE},
    test_ppo_fused: {"test_reduction_weights_closed_form", "test_reference_backend",
                     "test_per_token_terms_follow_autograd_at_ties_and_bounds",
                     "test_fused_token_terms_match_the_torch_ops",  # the Triton kernel's test
                     "test_token_level_stats_kernel_against_the_float64_stats",  # the same
                     "test_stats_are_the_bits_of_the_reference_ppo_total", _COMPILE},
}
# The (B, T) losses and the group advantages (csrc/cpu/losses.cpp): every op test, the
# torch.compile ones included (aot_eager: the custom op and the saved-gradient backward).
_REUSED.update({test_policy_loss: set(), test_value_loss: set(), test_bradley_terry: set(),
                test_group_advantages: {"test_reference_matches_the_loop"}})
for _module, _skip in _REUSED.items():
    for _name in dir(_module):
        if _name.startswith("test_") and _name not in _skip:
            globals()[f"{_name}__{_module.__name__.split('.')[-1][5:]}"] = getattr(_module, _name)
block_config = test_logprobs.block_config  # a fixture of reused tests (the block size)
for _name in dir(test_gae_whiten):
    if _name.startswith(("test_gae_", "test_whiten_")):
        globals()[f"{_name}__native"] = getattr(test_gae_whiten, _name)
for _name in dir(test_kl_rewards):
    if _name.startswith(("test_kl_", "test_rewards_")):
        globals()[f"{_name}__native"] = getattr(test_kl_rewards, _name)


# --------------------------------------------------------------------------------------------
# Native-specific cases
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1, 7, 8, 2047, 2048, 2049, 4103])
def test_block_edges_values_and_grads(dtype, V):
    """Vocabularies around the kernel's vector width (8) and block (2048); entropy gradient on."""
    logits = (torch.randn(3, 5, V) * 4).to(dtype)
    labels = torch.randint(0, V, (3, 5))
    labels[1, 2] = -100
    test_logprobs._check_against_reference(logits, labels, temperature=0.8, name=f"V={V}")


def test_block_with_every_entry_minus_inf_then_finite():
    """A whole 2048-block of -inf before the finite entries (the running max starts at -inf)."""
    V = 5000
    logits = torch.randn(2, 3, V)
    logits[..., :2048] = float("-inf")
    labels = torch.randint(2048, V, (2, 3))
    test_logprobs._check_against_reference(logits, labels, name="leading -inf block")


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.uint8])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32),
                                    (torch.bfloat16, torch.float16)])
def test_gae_mask_and_mixed_dtypes(mask_dtype, dtypes):
    from tests.numerics import padded_mask

    rewards = torch.randn(11, 37).to(dtypes[0])
    values = torch.randn(11, 37).to(dtypes[1])
    mask = padded_mask(11, 37).to(mask_dtype)
    adv, ret = gae(rewards, values, mask, gamma=0.97, lam=0.9)
    adv64, ret64 = reference.gae(rewards.double(), values.double(), mask, 0.97, 0.9)
    assert adv.dtype == ret.dtype == torch.float32
    assert_close(adv, adv64, atol=1e-5, rtol=1e-5, name="advantages")
    assert_close(ret, ret64, atol=1e-5, rtol=1e-5, name="returns")


def _check_loss_against_reference(name, call, leaf):
    """call(impl, x, cast) -> (loss, stats), x a view of the fp32 leaf and cast applied to the
    other inputs: the native op against the float64 reference of the same input values (loss,
    stats and the leaf's gradient) under the 2x rule, with the fp32 reference as the same-dtype
    result (fp32 is the kernels' arithmetic, whatever the inputs' dtypes)."""
    results = {}
    for impl, dtype in ((rlhf_kernels, None), (reference, torch.float64),
                        (reference, torch.float32)):
        x = (leaf if dtype is None else leaf.to(dtype)).clone().requires_grad_(True)
        loss, stats = call(impl, x, lambda t, dtype=dtype: t if dtype is None else t.to(dtype))
        loss.backward()
        results[dtype] = loss, stats, x.grad
    (loss, stats, grad), (loss64, stats64, grad64), (loss32, stats32, grad32) = results.values()
    assert_close_2x(loss, loss32, loss64, torch.float32, name=f"{name} loss")
    assert stats.keys() == stats64.keys(), name
    for key in stats:
        assert_close_2x(stats[key], stats32[key], stats64[key], torch.float32,
                        atol_scale=max(1.0, abs(stats64[key].item())), name=f"{name} {key}")
    assert_close_2x(grad, grad32, grad64, torch.float32, name=f"{name} gradient")


@pytest.mark.parametrize("ratio_level, loss_type, kl_coef",
                         [("token", "ppo", 0.0), ("token", "ppo", 0.1),
                          ("sequence", "ppo", 0.1), ("token", "cispo", 0.0),
                          ("token", "sapo", 0.1), ("sequence", "sapo", 0.0)])
def test_policy_loss_with_inputs_of_mixed_dtypes_and_layouts(ratio_level, loss_type, kl_coef):
    """losses.cpp stages each input's row as fp32 on its own (one kernel body for every
    combination of dtypes): fp32 / bf16 / fp16 inputs in one call, strided, column-major and
    per-sequence (expanded), against the float64 reference of the same values."""
    g = torch.Generator().manual_seed(1)
    B, T = 6, 41
    mask = torch.rand(B, T, generator=g) > 0.25
    leaf = torch.randn(B, 2 * T, generator=g) * 0.1 - 1  # logp: fp32, time stride 2
    old = (leaf[:, ::2] + 0.2 * torch.randn(B, T, generator=g)).bfloat16().t().contiguous().t()
    advantages = torch.randn(B, generator=g).half()  # per sequence: expanded, stride 0 in T
    ref = (leaf[:, ::2] + 0.3 * torch.randn(B, T, generator=g)).half()

    def call(impl, x, cast):
        return impl.ppo_policy_loss(
            x[:, ::2], cast(old), cast(advantages), mask,
            dual_clip=3.0 if loss_type == "ppo" else None, reduction="seq-mean-token-mean",
            ratio_level=ratio_level, loss_type=loss_type, ref_logp=cast(ref) if kl_coef else None,
            kl_coef=kl_coef)

    _check_loss_against_reference(f"{ratio_level} {loss_type} kl {kl_coef}", call, leaf)


def test_value_and_bradley_terry_losses_with_inputs_of_mixed_dtypes_and_layouts():
    """As above for the value loss (fp32 strided values, bf16 column-major old values, fp16
    returns) and Bradley-Terry (fp32 strided chosen, bf16 rejected, fp16 margins)."""
    g = torch.Generator().manual_seed(2)
    B, T = 5, 33
    mask = torch.rand(B, T, generator=g) > 0.25
    leaf = torch.randn(B, 2 * T, generator=g)
    old = (leaf[:, ::2] + 0.3 * torch.randn(B, T, generator=g)).bfloat16().t().contiguous().t()
    returns = torch.randn(B, T, generator=g).half()

    def value(impl, x, cast):
        return impl.ppo_value_loss(x[:, ::2], cast(old), cast(returns), mask, clip=0.2)

    _check_loss_against_reference("value", value, leaf)
    n = 5000  # more than one 4096-pair chunk
    leaf = torch.randn(2 * n, generator=g)
    rejected = torch.randn(n, generator=g).bfloat16()
    margin = torch.rand(n, generator=g).half()

    def bradley_terry(impl, x, cast):
        return impl.bradley_terry_loss(x[::2], cast(rejected), cast(margin), center_coef=0.01)

    _check_loss_against_reference("bradley_terry", bradley_terry, leaf)


def test_gae_outputs_from_the_reusing_allocator_stay_independent():
    """The native GAE's outputs come from a cache that hands a freed block to the next call of
    the same size (csrc/cpu/register.cpp: OutputCache, or the CPU block cache when it is torch's
    CPU allocator, as conftest installs it on CPU-only machines): a result still held is never
    reused, a freed one is, and the tensors behave as any (resizable, writable)."""
    block_cache = bool(_native.ops().cpu_block_cache_stats()[0])
    rewards, values = torch.randn(64, 4096), torch.randn(64, 4096)  # 1 MiB outputs: cached
    first, first_ret = gae(rewards, values, gamma=0.9, lam=0.8)
    kept = first.clone()
    address = first_ret.data_ptr()
    del first_ret  # freed: its block goes back to the cache
    hits = _native.ops().cpu_block_cache_stats()[4]
    second, second_ret = gae(rewards * 2, values, gamma=0.9, lam=0.8)
    assert torch.equal(first, kept), "a held output was overwritten"
    if block_cache:  # a cached block of that size (the freed one, or an older one) served it
        assert _native.ops().cpu_block_cache_stats()[4] > hits
    else:
        assert address in (second.data_ptr(), second_ret.data_ptr())  # the freed block reused
    adv64, ret64 = reference.gae(rewards.double() * 2, values.double(), None, 0.9, 0.8)
    assert_close(second, adv64, atol=1e-4, rtol=1e-5, name="advantages")
    assert_close(second_ret, ret64, atol=1e-4, rtol=1e-5, name="returns")
    second.resize_(10)
    second.add_(1)
    assert second.shape == (10,)


# --------------------------------------------------------------------------------------------
# The public route (no launcher patch: what a user gets)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def public_route(monkeypatch):
    """Undo the launcher patch: the launchers follow RLHF_KERNELS_BACKEND as shipped."""
    for module in _NATIVE_MODULES:
        monkeypatch.setattr(module, "native_cpu_kernels", backend.native_cpu_kernels)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "native")
    return monkeypatch


def test_env_native_routes_to_the_native_kernels(public_route):
    logits = torch.randn(4, 9, 301, requires_grad=True)
    labels = torch.randint(0, 301, (4, 9))
    assert backend.resolve_backend(logits, None, "logprobs") == "native"
    logp, entropy = logprobs(logits, labels, return_entropy=True)  # Triton would hit the trap
    (logp.sum() + entropy.sum()).backward()
    logp64, entropy64 = reference.logprobs(logits.detach().double(), labels, return_entropy=True)
    assert_close(logp, logp64, atol=1e-5, name="logp")
    assert_close(entropy, entropy64, atol=1e-5, name="entropy")
    adv, _ = gae(torch.randn(2, 5), torch.randn(2, 5))
    assert torch.isfinite(adv).all()


def test_torch_compile_sees_the_one_custom_op(public_route):
    """fullgraph compile through the rlhf_kernels:: custom op, whose CPU body runs native."""
    logits = torch.randn(2, 6, 50)
    labels = torch.randint(0, 50, (2, 6))

    def f(x):
        return logprobs(x, labels, return_entropy=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = logits.clone().requires_grad_(True)
    lp, ent = compiled(x)
    (lp.sum() + ent.sum()).backward()
    x2 = logits.clone().requires_grad_(True)
    lp2, ent2 = f(x2)
    (lp2.sum() + ent2.sum()).backward()
    assert torch.equal(lp, lp2) and torch.equal(ent, ent2) and torch.equal(x.grad, x2.grad)


@pytest.mark.parametrize("kwargs,message", [
    (dict(labels=torch.zeros(2, 3)), "labels must be int64 or int32"),
    (dict(labels=torch.zeros(3, 2, dtype=torch.long)), "labels has shape"),
    (dict(temperature=0.0), "temperature must be a positive finite number"),
    (dict(ignore_index=1.5), "ignore_index must be an int"),
    (dict(check_labels=True, labels=torch.full((2, 3), 9)), "found label 9"),
])
def test_bad_input_same_errors_as_the_other_backends(public_route, kwargs, message):
    args = dict(logits=torch.randn(2, 3, 5), labels=torch.zeros(2, 3, dtype=torch.long))
    args.update(kwargs)
    for choice in ("native", "reference"):
        public_route.setenv("RLHF_KERNELS_BACKEND", choice)
        with pytest.raises(ValueError, match=message):
            logprobs(**args)


def test_per_call_backend_that_disagrees_under_the_interpreter_is_refused(public_route):
    if not backend.triton_interpreter_enabled():
        pytest.skip("only the interpreter lets CPU tensors run Triton")
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="set RLHF_KERNELS_BACKEND=triton"):
        logprobs(x, torch.zeros(2, dtype=torch.long), backend="triton")
    public_route.setenv("RLHF_KERNELS_BACKEND", "auto")
    with pytest.raises(ValueError, match="set RLHF_KERNELS_BACKEND=native"):
        logprobs(x, torch.zeros(2, dtype=torch.long), backend="native")


def test_every_public_op_has_a_native_kernel():
    import rlhf_kernels

    ops = {name for name in rlhf_kernels.__all__ if name != "resolve_backend"}
    assert ops == set(backend.NATIVE_OPS)


def test_native_for_an_op_without_a_native_kernel_warns_once_and_runs_the_reference(
        public_route):
    public_route.setattr(backend, "_WARNED", set())
    x = torch.randn(5)
    with pytest.warns(RuntimeWarning, match="rlhf_kernels.future_op has no native CPU kernel"):
        assert backend.resolve_backend(x, "native", "future_op") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.resolve_backend(x, "native", "future_op") == "reference"  # once


@pytest.mark.parametrize("op", ["ppo_policy_loss", "ppo_value_loss", "bradley_terry_loss",
                                "group_advantages"])
def test_env_native_routes_the_losses_to_the_native_kernels(public_route, op):
    """The public route (RLHF_KERNELS_BACKEND=native, no backend=): the launchers reach
    losses.cpp (a Triton kernel would hit the trap), the backward included."""
    assert backend.resolve_backend(torch.randn(3), None, op) == "native"
    if op == "group_advantages":
        scores = torch.randn(12)
        assert_close(rlhf_kernels.group_advantages(scores, 4),
                     reference.group_advantages(scores.double(), 4), atol=1e-5, name=op)
        return
    a, b, adv = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4)

    def call(impl, x, cast):
        if op == "ppo_policy_loss":
            return impl.ppo_policy_loss(x, cast(b), cast(adv))[0]
        if op == "ppo_value_loss":
            return impl.ppo_value_loss(x, cast(b), cast(b * 2))[0]
        return impl.bradley_terry_loss(x, cast(b))[0]

    x = a.clone().requires_grad_(True)
    call(rlhf_kernels, x, lambda t: t).backward()
    x64 = a.double().requires_grad_(True)
    loss64 = call(reference, x64, torch.Tensor.double)
    loss64.backward()
    assert_close(call(rlhf_kernels, a, lambda t: t), loss64, atol=1e-5, name=f"{op} loss")
    assert_close(x.grad, x64.grad, atol=1e-6, name=f"{op} gradient")


def test_no_build_auto_warns_once_and_native_raises(public_route):
    public_route.setattr(_native, "_OPS", None)
    public_route.setattr(_native, "_FAILURE", "no C++ compiler: 'c++' is not on PATH")
    public_route.setattr(backend, "_INTERPRETER", False)
    public_route.setattr(backend, "_WARNED", set())
    public_route.setenv("RLHF_KERNELS_BACKEND", "auto")
    x, labels = torch.randn(2, 5), torch.zeros(2, dtype=torch.long)
    with pytest.warns(RuntimeWarning, match="not available .no C.. compiler.*reference instead"):
        out = logprobs(x, labels)
    assert torch.equal(out, reference.logprobs(x, labels))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logprobs(x, labels)  # one warning per process
    public_route.setenv("RLHF_KERNELS_BACKEND", "native")
    with pytest.raises(RuntimeError, match="native CPU kernels are not available: no C"):
        logprobs(x, labels)


def test_auto_on_cpu_picks_native_in_a_fresh_process():
    """Outside the interpreter ``auto`` runs the native kernels; the fresh process loads the
    build this one made (cached across processes) instead of compiling again."""
    script = textwrap.dedent("""
        import torch
        from rlhf_kernels import _native, backend, logprobs, reference
        x = torch.randn(3, 4, 1000)
        labels = torch.randint(0, 1000, (3, 4))
        assert backend.resolve_backend(x, None, "logprobs") == "native"
        err = (logprobs(x, labels).double() - reference.logprobs(x.double(), labels)).abs().max()
        assert err < 1e-5, err
    """)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "RLHF_KERNELS_BACKEND")}
    library = _library_path()
    before = os.stat(library).st_mtime_ns
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert os.stat(library).st_mtime_ns == before, "the second process rebuilt the extension"


def _library_path() -> str:
    name = _native._build_spec()[0]
    return os.path.join(_native.build_directory(name), f"{name}.so")


_CONCURRENT_CHILD = textwrap.dedent("""
    import torch
    from rlhf_kernels import _native, backend, logprobs, reference
    x = torch.randn(3, 4, 1000)
    labels = torch.randint(0, 1000, (3, 4))
    assert backend.resolve_backend(x, None, "logprobs") == "native", _native.failure_reason()
    err = (logprobs(x, labels).double() - reference.logprobs(x.double(), labels)).abs().max()
    assert err < 1e-5, err
    print("native", _native.build_directory())
""")


def test_two_processes_starting_at_once_on_an_empty_cache_both_get_native(tmp_path):
    """Two processes start at once on a cache directory without the library (and with a stale
    torch build baton, as a killed build leaves it): the lock lets one link while the other
    waits, then both load it and run native (no fallback to the reference, no endless wait).

    The directory is seeded with this build's object files and ninja logs (not the library), so
    ninja only relinks: the race the lock closes (a load during a link) at a second's cost, not a
    second full compile on CI. Without those files it is a cold build (slower, same test).
    """
    name = _native._build_spec()[0]
    source, target = _native.build_directory(name), tmp_path / name
    target.mkdir()
    for entry in os.listdir(source):
        if not entry.endswith(".so") and "lock" not in entry:
            shutil.copy2(os.path.join(source, entry), target / entry)
    (target / "lock").write_text("")  # torch's baton of a killed build
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "RLHF_KERNELS_BACKEND")}
    env[_native.CACHE_ENV_VAR] = str(tmp_path)
    children = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_CHILD], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    for child in children:
        out, err = child.communicate(timeout=600)
        assert child.returncode == 0, err[-2000:]
        assert out.split() == ["native", str(target)], out
    assert (target / f"{name}.so").is_file()
    assert not (target / "lock").exists()


@pytest.mark.parametrize("dtype,fast_half_gemm,expected", [
    (torch.float32, False, "native"),
    (torch.bfloat16, False, "reference"),  # torch's slow half GEMM: the reference's fp32 matmuls
    (torch.bfloat16, True, "native"),
])
def test_auto_keeps_half_precision_heads_off_a_slow_half_gemm(public_route, dtype,
                                                              fast_half_gemm, expected):
    public_route.setattr(backend, "_INTERPRETER", False)
    public_route.setattr(backend, "_FAST_HALF_GEMM", fast_half_gemm)
    public_route.setenv("RLHF_KERNELS_BACKEND", "auto")
    hidden = torch.randn(2, 3, dtype=dtype)
    assert backend.resolve_backend(hidden, None, "linear_logprobs") == expected
    assert backend.resolve_backend(hidden, None, "linear_ppo_loss") == expected
    assert backend.resolve_backend(hidden, None, "logprobs") == "native"
    assert backend.resolve_backend(hidden, "native", "linear_logprobs") == "native"

