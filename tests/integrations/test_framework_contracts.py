"""The frameworks' own contracts, kept by the drop-ins of rlhf_kernels.integrations.

What TRL's, veRL's and OpenRLHF's tests ask of the functions the drop-ins replace: the output
dtype and shape for fp16 / bf16 / fp32 / fp64 logits, the values, editing the returned tensors in
place and then running the backward, torch.compile(fullgraph=True), strided and expanded
(stride-0) ids and masks, the temperature. Each is checked with the framework patched, against the
framework's own unpatched function, on both backends (the Triton kernels under the interpreter on
a CPU, and the PyTorch reference).

TRL is in the [dev] extra, so CI runs its checks. veRL and OpenRLHF are not (Ray, DeepSpeed,
vLLM): their checks against the framework run where it is installed and skip elsewhere, and the
framework-free checks at the end hold their drop-ins to the same contracts with float64 closed
forms and the dtype each framework's code gives, so CI exercises those drop-ins too.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import types
import warnings

import pytest
import torch

from rlhf_kernels import integrations
from rlhf_kernels.integrations import openrlhf as our_openrlhf
from rlhf_kernels.integrations import trl as our_trl
from rlhf_kernels.integrations import verl as our_verl
from tests.numerics import DEVICE

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# Two results rounded to the output dtype from nearly equal values differ by at most an ulp or
# two; fp64 outputs of the Triton path carry fp32 arithmetic.
TOL = {
    torch.float16: dict(atol=4e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=1.6e-2),
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float64: dict(atol=2e-5, rtol=1e-5),
}
V = 37


@pytest.fixture(params=["triton", "reference"])
def backend(request, monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", request.param)
    return request.param


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels compute in, and what keep_fp32 returns."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _same(ours, theirs, dtype, name, exact=None):
    """The framework's dtype and shape; values within an ulp or two of the output dtype from
    ``exact`` (the framework's function on float64 inputs; its result itself when not given).
    In fp16 / bf16 a framework's own values may be further off than that (veRL's entropy
    subtracts two rounded terms), so low-precision outputs are held to the exact value."""
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype}, the framework's {theirs.dtype}"
    assert ours.shape == theirs.shape, f"{name}: shape {ours.shape} != {theirs.shape}"
    target = theirs if exact is None else exact
    torch.testing.assert_close(ours.double(), target.double(), **TOL[dtype],
                               msg=lambda m: f"{name}: {m}")


def _logits(shape, dtype, scale=3.0):
    return (scale * torch.randn(*shape, device=DEVICE)).to(dtype)


# float64 closed forms of the log-probability and the entropy
def _log_softmax64(logits, temperature=1.0):
    return torch.log_softmax(logits.double() / temperature, dim=-1)


def _logp64(logits, labels, temperature=1.0):
    return _log_softmax64(logits, temperature).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _entropy64(logits, temperature=1.0):
    log_p = _log_softmax64(logits, temperature)
    return -(log_p.exp() * log_p).sum(-1)


# ============================================================================================
# TRL (trl.trainer.utils), patched with patch_trl()
# ============================================================================================
_TRL_NAMES = ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")


@pytest.fixture(scope="module")
def trl_utils():
    return pytest.importorskip("trl.trainer.utils")


@pytest.fixture
def trl(trl_utils):
    """(the patched trl.trainer.utils, TRL's own functions by name)."""
    own = {name: integrations.original("trl.trainer.utils", name) for name in _TRL_NAMES}
    with integrations.patch_trl():
        yield trl_utils, own


def _trl_calls(index, row_mask, temperature):
    """name -> f(module or dict of functions, logits) returning a tuple of outputs."""

    def get(where, name):
        return where[name] if isinstance(where, dict) else getattr(where, name)

    return {
        "selective_log_softmax": lambda m, x: (
            get(m, "selective_log_softmax")(x, index, temperature, row_mask),),
        "entropy_from_logits": lambda m, x: (get(m, "entropy_from_logits")(x),),
        "selective_log_softmax_and_entropy": lambda m, x: tuple(
            get(m, "selective_log_softmax_and_entropy")(x, index, True, temperature, row_mask)),
    }


def _keeping_fp32(fn):
    return lambda *args: fn(*args, keep_fp32=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", _TRL_NAMES)
def test_trl_dtype_shape_and_values(trl, backend, dtype, name):
    utils, own = trl
    logits = _logits((2, 5, V), dtype)
    index = torch.randint(0, V, (2, 5), device=DEVICE)
    row_mask = torch.rand(2, 5, device=DEVICE) < 0.7
    call = _trl_calls(index, row_mask, 0.8)[name]
    ours, theirs = call(utils, logits), call(own, logits)
    # TRL's eager path (a CPU) returns the logits' dtype; the drop-in returns the same.
    for a, b, exact in zip(ours, theirs, call(own, logits.double())):
        _same(a, b, dtype, name, exact)
    # ... and that is the kernels' result rounded once, which keep_fp32 returns unrounded
    keep_fp32 = {n: _keeping_fp32(getattr(our_trl, n)) for n in _TRL_NAMES}
    for a, b in zip(ours, call(keep_fp32, logits)):
        assert b.dtype == _kernel_dtype(dtype)
        assert torch.equal(a, b.to(dtype)), f"{name}: not the fp32 result rounded once"


def test_patch_trl_keep_fp32(trl_utils):
    logits = _logits((3, V), torch.bfloat16)
    index = torch.randint(0, V, (3,), device=DEVICE)
    with integrations.patch_trl(keep_fp32=True) as patch:
        assert {f"trl.trainer.utils.{name}" for name in _TRL_NAMES} <= set(patch.patched)
        logp, entropy = trl_utils.selective_log_softmax_and_entropy(logits, index)
        assert logp.dtype == entropy.dtype == torch.float32
        assert trl_utils.entropy_from_logits(logits.double()).dtype == torch.float64
        torch.testing.assert_close(logp.double(), _logp64(logits, index), atol=1e-5, rtol=1e-5)
    assert trl_utils.selective_log_softmax(logits, index).dtype == torch.bfloat16  # undone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_mask", [True, False])
def test_trl_outputs_edited_in_place_then_backward(trl, backend, dtype, use_mask):
    """TRL slices its logits, ids and mask without copying and edits the returned log-probs in
    place (masking prompt and padding) before the backward: the gradient must be that of the
    edited outputs."""
    utils, own = trl
    base = _logits((2, 5, V), dtype).requires_grad_()
    logits = base[:, 1:4]
    index = torch.randint(0, V, (2, 5), device=DEVICE)[:, 1:4]
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]], device=DEVICE).bool()[:, 1:4]
    row_mask = mask if use_mask else None
    completion = torch.tensor([[True, False, True], [False, True, True]], device=DEVICE)

    def loss(fns, x):
        logp, entropy = fns["selective_log_softmax_and_entropy"](x, index, True, 0.7, row_mask)
        logp[0, 2] = 0.0
        entropy[1, 0] = 0.0
        alone = fns["selective_log_softmax"](x, index, 0.7, row_mask)
        alone[~completion] = 0.0
        entropy_only = fns["entropy_from_logits"](x)
        entropy_only.mul_(0.25)
        # entropy without a gradient (TRL's DPO trainer): a plain tensor, editable too
        logp_too, frozen = fns["selective_log_softmax_and_entropy"](x, index, False, 0.7, row_mask)
        frozen[0, 0] = 1.0
        assert not frozen.requires_grad
        return (2 * logp.sum() + 0.5 * entropy.sum() + alone.sum() + entropy_only.sum()
                + logp_too.sum()).float()

    patched = {name: getattr(utils, name) for name in _TRL_NAMES}
    loss(patched, logits).backward()
    # TRL's own functions on a float64 copy: the exact gradient of the same edited outputs
    exact = base.detach().double().requires_grad_()
    loss(own, exact[:, 1:4]).backward()
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(base.grad.double(), exact.grad, **tol)
    assert not base.grad[:, 0].any() and not base.grad[:, 4].any()


def test_trl_compile_fullgraph(trl, backend):
    utils, _ = trl
    torch._dynamo.reset()  # the backend is read from the environment at trace time
    logits = _logits((2, 3, 257), torch.bfloat16).requires_grad_()
    index = torch.randint(0, 257, (2, 3), device=DEVICE)
    row_mask = torch.tensor([[1, 0, 1], [0, 1, 1]], device=DEVICE).bool()

    def loss(x, index, row_mask):
        logp, entropy = utils.selective_log_softmax_and_entropy(
            x, index, temperature=0.8, row_mask=row_mask)
        alone = utils.selective_log_softmax(x, index, 0.8, row_mask)
        return (logp + 0.1 * entropy + alone).float().sum() + utils.entropy_from_logits(x).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(logits, index, row_mask)
    value.backward()
    grad, logits.grad = logits.grad.clone(), None
    eager = loss(logits, index, row_mask)
    eager.backward()
    torch.testing.assert_close(value, eager)
    torch.testing.assert_close(grad, logits.grad)
    assert torch.isfinite(grad.float()).all()


def test_trl_strided_and_expanded_inputs(trl, backend):
    """Non-contiguous logits (leading dims transposed, stride(-1) != 1), ids expanded from one
    row (stride 0), a row_mask that broadcasts, an expanded row_mask: as TRL's own."""
    utils, own = trl
    index_row = torch.randint(0, V, (1, 4), device=DEVICE)
    index = index_row.expand(3, 4)
    cases = [
        (_logits((4, 3, V), torch.float32).transpose(0, 1), index),
        (_logits((3, 4, 2 * V), torch.float32)[..., ::2], index),
    ]
    masks = [None, (torch.rand(3, 1, device=DEVICE) < 0.5),
             (torch.rand(1, 4, device=DEVICE) < 0.5).expand(3, 4)]
    for logits, ids in cases:
        for row_mask in masks:
            for name, call in _trl_calls(ids, row_mask, 1.3).items():
                if name == "entropy_from_logits" and row_mask is not None:
                    continue
                shape = None if row_mask is None else tuple(row_mask.shape)
                for a, b in zip(call(utils, logits), call(own, logits)):
                    _same(a, b, torch.float32, f"{name}, row_mask {shape}")
    # int32 ids (TRL's kernel takes them; its eager gather does not): same as int64 ids
    logits = cases[0][0]
    torch.testing.assert_close(utils.selective_log_softmax(logits, index.int()),
                               own["selective_log_softmax"](logits, index))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_trl_temperature(trl, backend, temperature):
    utils, own = trl
    logits = _logits((2, 4, V), torch.float32)
    index = torch.randint(0, V, (2, 4), device=DEVICE)
    for name, call in _trl_calls(index, None, temperature).items():
        for a, b in zip(call(utils, logits), call(own, logits)):
            _same(a, b, torch.float32, name)
    for bad in (0.0, -1.0):
        for fn in (utils.selective_log_softmax, own["selective_log_softmax"]):
            with pytest.raises(ValueError, match="temperature"):
                fn(logits, index, bad)


def test_trl_top_k_ids_go_to_trl(trl, backend):
    utils, own = trl
    logits = _logits((2, 3, V), torch.bfloat16)
    index = torch.randint(0, V, (2, 3, 4), device=DEVICE)
    ours, theirs = utils.selective_log_softmax(logits, index), own["selective_log_softmax"](
        logits, index)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_trl_kernel_dispatch_mirrors_trl(trl_utils):
    """The drop-in returns fp32 exactly where TRL would run its own Triton kernel (which returns
    fp32): our predicate against TRL's, on tensor stand-ins that claim a CUDA device."""
    theirs = getattr(trl_utils, "_supports_trl_loss_kernel", None)
    if theirs is None:
        pytest.skip("this TRL version has no _supports_trl_loss_kernel")

    class Fake:
        def __init__(self, shape, dtype, device="cuda", last_stride=1):
            self.shape, self.dtype, self.device = torch.Size(shape), dtype, torch.device(device)
            self.ndim, self._last = len(shape), last_stride

        def stride(self, dim):
            return self._last

    cases = 0
    for device in ("cuda", "cpu", "xpu"):
        for dtype in DTYPES:
            for shape in [(7,), (3, 7), (2, 3, 7), (2, 2, 3, 7), (3, 0)]:
                for last in (1, 2):
                    logits = Fake(shape, dtype, device, last)
                    lead = shape[:-1]
                    for index in (None, Fake(lead, torch.int64, device),
                                  Fake(lead, torch.int32, device), Fake(lead, torch.int16, device),
                                  Fake(lead + (2,), torch.int64, device)):
                        masks = [None] if index is None else [
                            None, Fake(lead, torch.bool, device), Fake(lead, torch.float32, device),
                            Fake(lead + (1,), torch.bool, device)]
                        for row_mask in masks:
                            expected = theirs(logits, index, row_mask) and our_trl._TRITON_INSTALLED
                            assert our_trl.trl_uses_its_kernel(logits, index, row_mask) == expected
                            cases += 1
    assert cases > 500


# ============================================================================================
# veRL and OpenRLHF against the frameworks themselves (where installed)
# ============================================================================================
@pytest.fixture(scope="module")
def verl_f():
    return pytest.importorskip("verl.utils.torch_functional")


@pytest.fixture(scope="module")
def verl_core():
    return pytest.importorskip("verl.trainer.ppo.core_algos")


@pytest.fixture(scope="module")
def openrlhf_utils():
    return pytest.importorskip("openrlhf.models.utils")


@pytest.fixture(scope="module")
def openrlhf_loss():
    return pytest.importorskip("openrlhf.models.loss")


def _unwrap(fn):
    """OpenRLHF's compute_entropy is torch.compile'd; compare with the function it wraps."""
    return getattr(fn, "_torchdynamo_orig_callable", fn)


@pytest.mark.parametrize("dtype", DTYPES)
def test_verl_logprobs_and_entropy_contract(verl_f, backend, dtype):
    names = ("logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking")
    own = {n: integrations.original("verl.utils.torch_functional", n) for n in names}
    logits = _logits((6, V), dtype)
    labels = torch.randint(0, V, (6,), device=DEVICE)
    calls = {
        "logprobs_from_logits": lambda f, x: f(x, labels, inplace_backward=False),
        "entropy_from_logits": lambda f, x: f(x),
        "entropy_from_logits_with_chunking": lambda f, x: f(x, 4),
    }
    with integrations.patch_verl():
        for name, call in calls.items():
            out_dtype = torch.float32 if name.endswith("chunking") else dtype
            _same(call(getattr(verl_f, name), logits), call(own[name], logits), out_dtype, name,
                  call(own[name], logits.double()))
        # veRL's flash-attn path reshapes labels: (1, N) labels for (N, V) logits
        wide = verl_f.logprobs_from_logits(logits, labels.view(1, -1), inplace_backward=False)
        _same(wide, own["logprobs_from_logits"](logits, labels), dtype, "labels (1, N)",
              own["logprobs_from_logits"](logits.double(), labels))


@pytest.mark.parametrize("dtype", DTYPES)
def test_openrlhf_logprobs_entropy_kl_contract(openrlhf_utils, backend, dtype):
    names = ("log_probs_from_logits", "compute_entropy", "compute_approx_kl")
    own = {n: _unwrap(integrations.original("openrlhf.models.utils", n)) for n in names}
    logits = _logits((2, 5, V), dtype)
    labels = torch.randint(0, V, (2, 5), device=DEVICE)
    logp, base = -3 * torch.rand(2, 2, 5, device=DEVICE).to(dtype)
    with integrations.patch_openrlhf():
        # the temperature divides the caller's logits in place: each call gets its own copy
        _same(openrlhf_utils.log_probs_from_logits(logits.clone(), labels, 0.9),
              own["log_probs_from_logits"](logits.clone(), labels, 0.9), dtype, "logp",
              own["log_probs_from_logits"](logits.double(), labels, 0.9))
        _same(openrlhf_utils.compute_entropy(logits), own["compute_entropy"](logits), dtype,
              "entropy", own["compute_entropy"](logits.double()))
        for estimator in ("k1", "k2", "k3"):
            _same(openrlhf_utils.compute_approx_kl(logp, base, kl_estimator=estimator),
                  own["compute_approx_kl"](logp, base, kl_estimator=estimator),
                  torch.float32, estimator)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_verl_losses_kl_gae_dtypes(verl_core, dtype):
    """Every veRL drop-in gives veRL's dtype for half and double inputs (not only fp32)."""
    B, T = 3, 8
    old = (-3 * torch.rand(B, T, device=DEVICE)).to(dtype)
    logp = (old.double() + 0.3 * torch.randn(B, T, device=DEVICE)).to(dtype)
    adv, values, returns = (torch.randn(B, T, device=DEVICE).to(dtype) for _ in range(3))
    mask = torch.ones(B, T, device=DEVICE)
    mask[0, 5:] = 0

    class Config(dict):
        __getattr__ = dict.get

    config = Config(clip_ratio=0.2, clip_ratio_c=3.0, global_batch_info={})
    calls = {
        "kl_penalty": lambda f: f(logp, old, "low_var_kl"),
        "compute_gae_advantage_return": lambda f: f(adv, values, mask, 0.99, 0.95),
        "compute_policy_loss_vanilla": lambda f: f(old, logp, adv, mask, "token-mean", config)[0],
        "compute_policy_loss(seq-mean)": lambda f: f(old, logp, adv, mask, 0.2,
                                                     loss_agg_mode="seq-mean-token-mean"),
        "compute_value_loss": lambda f: f(values, returns, adv, mask, 0.2),
    }
    for name, call in calls.items():
        fn_name = name.split("(")[0]
        ours = call(getattr(our_verl, fn_name))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # veRL's deprecated compute_policy_loss
            theirs = call(integrations.original("verl.trainer.ppo.core_algos", fn_name))
        ours = ours if isinstance(ours, tuple) else (ours,)
        theirs = theirs if isinstance(theirs, tuple) else (theirs,)
        for a, b in zip(ours, theirs):
            assert a.dtype == b.dtype, f"{name}: {a.dtype}, veRL's {b.dtype}"
            torch.testing.assert_close(a.double(), b.double(), atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_openrlhf_losses_and_gae_dtypes(openrlhf_loss, dtype):
    B, T = 3, 8
    old = (-3 * torch.rand(B, T, device=DEVICE)).to(dtype)
    logp = (old.double() + 0.3 * torch.randn(B, T, device=DEVICE)).to(dtype)
    adv, values, returns = (torch.randn(B, T, device=DEVICE).to(dtype) for _ in range(3))
    mask = torch.ones(B, T, device=DEVICE)
    mask[0, 5:] = 0
    chosen, rejected = torch.randn(2, 6, device=DEVICE).to(dtype)
    for token_level in (True, False):
        module = openrlhf_loss.PolicyLoss(token_level_loss=token_level)
        for a, b in zip(our_openrlhf.policy_loss_forward(module, logp, old, adv, mask)[:3],
                        integrations.original("openrlhf.models.loss", "PolicyLoss.forward")(
                            module, logp, old, adv, mask)[:3]):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a.double(), b.double(), atol=5e-2, rtol=2e-2)
        value_module = openrlhf_loss.ValueLoss(0.2, token_level_loss=token_level)
        a = our_openrlhf.value_loss_forward(value_module, values, adv, returns, mask)
        b = integrations.original("openrlhf.models.loss", "ValueLoss.forward")(
            value_module, values, adv, returns, mask)
        assert a.dtype == b.dtype
    for ours, cls in ((our_openrlhf.pairwise_loss_forward, openrlhf_loss.PairWiseLoss),
                      (our_openrlhf.log_exp_loss_forward, openrlhf_loss.LogExpLoss)):
        a, b = ours(None, chosen, rejected), cls()(chosen, rejected)
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.double(), b.double(), atol=5e-2, rtol=2e-2)
    experience = pytest.importorskip("openrlhf.trainer.ppo_utils.experience_maker")
    maker = experience.RemoteExperienceMaker
    for a, b in zip(our_openrlhf.get_advantages_and_returns(None, values, returns, mask, 0.9, 0.9),
                    maker.get_advantages_and_returns(None, values, returns, mask, 0.9, 0.9)):
        assert a.dtype == b.dtype
    assert (our_openrlhf.get_cumulative_returns(None, returns, mask, 0.9).dtype
            == maker.get_cumulative_returns(None, returns, mask, 0.9).dtype)


# ============================================================================================
# veRL and OpenRLHF drop-ins without the frameworks (these run in CI): the same contracts,
# against float64 closed forms and the dtypes the frameworks' code gives (read from veRL 0.9.1
# and OpenRLHF 0.11.2; the checks above hold them to the frameworks where installed)
# ============================================================================================
def _verl_logp_dtype(logits):
    """veRL: fp32 from flash-attn's cross entropy (CUDA, installed), else the logits' dtype."""
    return torch.float32 if our_verl._verl_uses_flash_ce(logits) else logits.dtype


def _openrlhf_logp_dtype(logits):
    """OpenRLHF: flash-attn's cross entropy (fp32) for fp32 / fp64 logits when it imports."""
    return torch.float32 if our_openrlhf._openrlhf_uses_flash_ce(logits) else logits.dtype


def _stand_in_flash_attn(root, imports):
    """A flash_attn package under ``root`` with ops/triton/cross_entropy.py defining
    cross_entropy_loss; with ``imports=False`` its __init__ raises the ImportError of a CUDA
    extension built for another torch (installed, but not importable)."""
    package = root / "flash_attn"
    (package / "ops" / "triton").mkdir(parents=True)
    (package / "__init__.py").write_text(
        "" if imports else "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c10')\n")
    (package / "ops" / "__init__.py").write_text("")
    (package / "ops" / "triton" / "__init__.py").write_text("")
    (package / "ops" / "triton" / "cross_entropy.py").write_text(
        "def cross_entropy_loss(*args, **kwargs):\n    raise AssertionError('not called here')\n")


def _frameworks_flash_ce_condition():
    """veRL's (at its import) and OpenRLHF's (at each call) test, as they write it."""
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def flash_attn_path(tmp_path, monkeypatch):
    """Puts a stand-in flash_attn first on sys.path (make it with _stand_in_flash_attn) and
    forgets the drop-ins' cached answer; both undone afterwards, and a flash_attn imported
    before is put back."""
    def loaded():
        return [m for m in sys.modules if m.split(".")[0] == "flash_attn"]

    for name in loaded():
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(integrations._contract, "_flash_ce_imports", None)
    monkeypatch.delenv("VERL_DISABLE_FLASH_ATTN_CE", raising=False)
    yield tmp_path
    for name in loaded():  # the stand-in's
        sys.modules.pop(name)


def _skip_unless_the_stand_in_is_found(root):
    spec = importlib.util.find_spec("flash_attn")
    if spec is None or not str(spec.origin).startswith(str(root)):
        pytest.skip("another importer provides flash_attn here (e.g. a stub of it)")


@pytest.mark.parametrize("imports", [False, True], ids=["fails to import", "imports"])
def test_flash_attn_counts_where_its_cross_entropy_imports(flash_attn_path, monkeypatch,
                                                          imports):
    """veRL and OpenRLHF take flash-attn's cross entropy (fp32 output) only where importing it
    succeeds; an installed flash-attn whose CUDA extension fails to load leaves them on their
    PyTorch path (the logits' dtype). The drop-ins used to test 'installed' and returned fp32
    there."""
    _stand_in_flash_attn(flash_attn_path, imports)
    _skip_unless_the_stand_in_is_found(flash_attn_path)
    assert integrations._contract.installed("flash_attn")  # installed either way
    assert _frameworks_flash_ce_condition() is imports
    cuda_logits = types.SimpleNamespace(device=torch.device("cuda"))  # only the device is read
    assert our_verl._verl_uses_flash_ce(cuda_logits) is imports
    logits = torch.randn(2, 3, 11, dtype=torch.float64, device=DEVICE)
    labels = torch.randint(0, 11, (2, 3), device=DEVICE)
    logp = our_openrlhf.log_probs_from_logits(logits, labels)
    assert logp.dtype == (torch.float32 if imports else torch.float64)
    # fp64 logits: the kernels compute in fp32 on the Triton and native backends
    torch.testing.assert_close(logp.double(), _logp64(logits, labels), atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("VERL_DISABLE_FLASH_ATTN_CE", "1")  # veRL's switch still wins
    assert not our_verl._verl_uses_flash_ce(cuda_logits)


def test_flash_attn_check_traces_under_compile(flash_attn_path):
    """The first check may run while torch.compile traces (fullgraph): it is a constant there."""
    _stand_in_flash_attn(flash_attn_path, imports=False)
    _skip_unless_the_stand_in_is_found(flash_attn_path)
    torch._dynamo.reset()
    compiled = torch.compile(our_openrlhf.log_probs_from_logits, fullgraph=True,
                             backend="aot_eager")
    logits = torch.randn(2, 5, dtype=torch.float64, device=DEVICE)
    assert compiled(logits, torch.tensor([1, 4], device=DEVICE)).dtype == torch.float64
    assert integrations._contract._flash_ce_imports is False


def _logp64_ignoring(logits, labels, temperature=1.0):
    """The closed form with flash-attn's ignore index (-100 gives 0)."""
    logp = _logp64(logits, labels.clamp_min(0), temperature)
    return torch.where(labels == -100, torch.zeros_like(logp), logp)


def _logprob_dropins(labels, temperature):
    """name -> (f(logits, **kw), the framework's output dtype for the logits, float64 closed
    form). OpenRLHF's log_probs_from_logits divides its logits in place: it gets a copy."""
    return {
        "verl.logprobs_from_logits": (
            lambda x, **kw: our_verl.logprobs_from_logits(x, labels, False, **kw),
            _verl_logp_dtype, lambda x: _logp64_ignoring(x, labels)),
        "verl.entropy_from_logits": (
            our_verl.entropy_from_logits, lambda x: x.dtype, _entropy64),
        "verl.entropy_from_logits_with_chunking": (
            our_verl.entropy_from_logits_with_chunking, lambda x: torch.float32, _entropy64),
        "openrlhf.log_probs_from_logits": (
            lambda x, **kw: our_openrlhf.log_probs_from_logits(x.clone(), labels, temperature,
                                                               **kw),
            # OpenRLHF divides the logits in their own dtype first (one rounding of its own)
            _openrlhf_logp_dtype,
            lambda x: _logp64_ignoring((x.double() / temperature).to(x.dtype), labels)),
        "openrlhf.compute_entropy": (
            our_openrlhf.compute_entropy, lambda x: x.dtype, _entropy64),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_verl_openrlhf_logprob_dropins_dtype_and_values(backend, dtype):
    logits = _logits((6, V), dtype)
    labels = torch.randint(0, V, (6,), device=DEVICE)
    labels[2] = -100  # flash-attn's ignore index: 0
    for name, (fn, framework_dtype, exact) in _logprob_dropins(labels, 0.9).items():
        out, kept = fn(logits), fn(logits, keep_fp32=True)
        assert out.dtype == framework_dtype(logits), f"{name}: {out.dtype}"
        assert out.shape == logits.shape[:-1], name
        assert kept.dtype == _kernel_dtype(dtype), name
        assert torch.equal(out, kept.to(out.dtype)), f"{name}: not the fp32 result rounded once"
        torch.testing.assert_close(kept.double(), exact(logits), atol=2e-5, rtol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
    base = -3 * torch.rand(2, 7, device=DEVICE)
    logp = base + torch.randn(2, 7, device=DEVICE)
    # OpenRLHF computes its KL estimate on .float() inputs: fp32 for every input dtype
    kl = our_openrlhf.compute_approx_kl(logp.to(dtype), base.to(dtype), kl_estimator="k3")
    assert kl.dtype == torch.float32


def test_labels_with_one_label_per_row_in_any_shape(backend):
    """veRL (issue 10, item 4) and OpenRLHF reshape the labels on their flash-attn path: labels
    (1, N) for (N, V) logits are accepted, as is any shape with one label per row."""
    logits = _logits((5, V), torch.float32)
    labels = torch.randint(0, V, (5,), device=DEVICE)
    for fn in (lambda x, y: our_verl.logprobs_from_logits(x, y, False),
               our_openrlhf.log_probs_from_logits):
        expected = fn(logits, labels)
        torch.testing.assert_close(expected.double(), _logp64(logits, labels), atol=2e-5,
                                   rtol=1e-5)
        for shaped in (labels.view(1, 5), labels.view(5, 1),
                       torch.stack([labels, labels], -1)[:, 0]):  # strided (stride 2)
            out = fn(logits, shaped)
            assert out.shape == (5,) and torch.equal(out, expected)
        with pytest.raises(ValueError, match="one label per row"):
            fn(logits, labels[:4].view(1, 4))
    # (B, T, V) logits with ids expanded from one row (stride 0)
    logits3 = _logits((3, 4, V), torch.float32)
    ids = torch.randint(0, V, (1, 4), device=DEVICE).expand(3, 4)
    torch.testing.assert_close(our_verl.logprobs_from_logits(logits3, ids, False).double(),
                               _logp64(logits3, ids), atol=2e-5, rtol=1e-5)


def test_verl_logprobs_in_place_backward_leaves_a_leaf_it_views_alone(backend):
    """veRL's default inplace_backward=True on a view of a leaf (its tests slice a leaf's
    logits): the drop-in turns the in-place gradient off there, as for the leaf itself, so the
    leaf keeps its values and gets the exact gradient (it once received its gradient as data)."""
    leaf = _logits((3, 5, V), torch.float32).requires_grad_()
    before = leaf.detach().clone()
    labels = torch.randint(0, V, (3, 4), device=DEVICE)
    our_verl.logprobs_from_logits(leaf[:, :-1], labels).sum().backward()
    assert torch.equal(leaf.detach(), before)
    exact = before.double().requires_grad_()
    _logp64(exact[:, :-1], labels).sum().backward()
    torch.testing.assert_close(leaf.grad.double(), exact.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("flash_ce", [False, True], ids=["pytorch path", "flash-attn path"])
def test_verl_logprobs_in_place_backward_only_where_verl_takes_flash_attn(backend, monkeypatch,
                                                                          flash_ce):
    """veRL's logprobs_from_logits writes the gradient into the logits (inplace_backward=True,
    its default) only through flash-attn's cross entropy; its PyTorch path (no flash-attn, CPU
    logits, VERL_DISABLE_FLASH_ATTN_CE=1) ignores the flag, so an op that saved the same logits
    for its backward still reads them. The drop-in wrote in place on every path, and such a
    backward raised 'modified by an inplace operation' where veRL's ran."""
    monkeypatch.setattr(our_verl, "_verl_uses_flash_ce", lambda logits: flash_ce)
    base = _logits((4, V), torch.float32).requires_grad_()
    labels = torch.randint(0, V, (4,), device=DEVICE)
    logits = base * 1.5  # an intermediate (the lm head's output)
    other = (torch.softmax(logits, -1) * logits).sum()  # saves the logits; its backward runs last
    logp = our_verl.logprobs_from_logits(logits, labels)
    before = logits.detach().clone()
    if flash_ce and backend != "reference":  # the buffer takes the gradient, as flash-attn's,
        with pytest.raises(RuntimeError, match="inplace"):  # and autograd catches the reader
            (logp.sum() + other).backward()
        return
    (logp.sum() + other).backward()
    assert torch.equal(logits.detach(), before)
    exact = base.detach().double().requires_grad_()
    x = exact * 1.5
    (_logp64(x, labels).sum() + (torch.softmax(x, -1) * x).sum()).backward()
    torch.testing.assert_close(base.grad.double(), exact.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verl_openrlhf_outputs_edited_in_place_then_backward(backend, dtype):
    base = _logits((4, V), dtype).requires_grad_()
    labels = torch.randint(0, V, (4,), device=DEVICE)
    weight = torch.randn(4, device=DEVICE)

    def loss(x, logp_fns, entropy_fns):
        total = 0.0
        for fn in logp_fns:
            logp = fn(x * 1.0)  # an intermediate, as the lm_head output (inplace_backward)
            logp[1] = 0.0
            total = total + (logp.double() * weight).sum()
        for fn in entropy_fns:
            entropy = fn(x)
            entropy[2] = 0.0
            entropy.mul_(0.5)
            total = total + entropy.double().sum()
        return total

    ours = loss(base,
                [lambda x: our_verl.logprobs_from_logits(x, labels.view(1, -1)),
                 lambda x: our_openrlhf.log_probs_from_logits(x, labels, 0.8)],
                [our_verl.entropy_from_logits, our_verl.entropy_from_logits_with_chunking,
                 our_openrlhf.compute_entropy])
    ours.backward()
    exact = base.detach().double().requires_grad_()
    ref = loss(exact,
               [lambda x: _logp64(x, labels), lambda x: _logp64(x, labels, 0.8)],
               [_entropy64, _entropy64, _entropy64])
    ref.backward()
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(base.grad.double(), exact.grad, **tol)


def test_dropins_compile_fullgraph_on_the_first_native_call(monkeypatch):
    """The first op call of a process finds out whether the native CPU kernels are there
    (building or loading them: the file system, hashing, timing). When that call came under
    torch.compile(fullgraph=True), Dynamo traced into it and failed ('Dynamo does not know how
    to trace the builtin posix.stat'); it now runs eagerly, its answer a constant."""
    from rlhf_kernels import _native

    if DEVICE.type != "cpu" or not _native.available():
        pytest.skip("the native CPU kernels run on CPU tensors, where they build")
    built, calls = _native._OPS, []

    def first_build():  # what the first call does before the kernels are loaded
        os.stat(os.getcwd())
        calls.append(time.perf_counter())
        _native._OPS = built

    monkeypatch.setattr(_native, "_OPS", None)
    monkeypatch.setattr(_native, "_build", first_build)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "native")
    torch._dynamo.reset()
    compiled = torch.compile(our_verl.entropy_from_logits, fullgraph=True, backend="aot_eager")
    logits = _logits((3, V), torch.float32)
    torch.testing.assert_close(compiled(logits).double(), _entropy64(logits), atol=1e-5,
                               rtol=1e-5)
    assert len(calls) == 1 and _native._OPS is built


@pytest.fixture
def cuda_like_autocast():
    """torch.autocast on the CPU that runs softmax and log_softmax in fp32, as CUDA's autocast
    does (its fp32 list: softmax, log_softmax, exp, log, sum, ...; the CPU's keeps them in bf16),
    so the frameworks' autocast dtypes can be checked without a GPU. Undone afterwards."""
    if DEVICE.type != "cpu":
        pytest.skip("simulates CUDA's autocast policy on the CPU")
    lib = torch.library.Library("aten", "IMPL")
    below = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def in_fp32(name):
        op = getattr(torch.ops.aten, name).default

        def kernel(x, dim, half_to_float):
            with torch._C._ExcludeDispatchKeyGuard(below):
                return op(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim,
                          False)
        return kernel

    for name in ("_softmax", "_log_softmax"):
        lib.impl(name, in_fp32(name), "AutocastCPU")
    try:
        yield lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    finally:
        lib._destroy()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logprob_entropy_dropins_keep_fp32_under_cuda_like_autocast(backend, cuda_like_autocast,
                                                                    dtype):
    """veRL computes its log-probs and entropies inside torch.autocast (its FSDP engine's
    forward_step), where CUDA runs log_softmax / softmax in fp32: veRL's PyTorch path (no
    flash-attn, or VERL_DISABLE_FLASH_ATTN_CE=1) and its entropy give fp32 for bf16 logits, as
    OpenRLHF's do. The drop-ins returned the logits' dtype there, bf16-rounded log-probs (an
    error of up to 0.03 at logp = -5, in every PPO ratio) and entropies."""
    logits = _logits((2, 3, V), dtype)
    labels = torch.randint(0, V, (2, 3), device=DEVICE)
    with cuda_like_autocast():
        assert torch.log_softmax(logits, -1).dtype == torch.float32  # the simulated policy
        outputs = {
            "verl logprobs": (our_verl.logprobs_from_logits(logits.clone(), labels),
                              _logp64(logits, labels)),
            "openrlhf logprobs": (our_openrlhf.log_probs_from_logits(logits.clone(), labels),
                                  _logp64(logits, labels)),
            "verl entropy": (our_verl.entropy_from_logits(logits), _entropy64(logits)),
            "openrlhf entropy": (our_openrlhf.compute_entropy(logits), _entropy64(logits)),
        }
    for name, (out, exact) in outputs.items():
        assert out.dtype == torch.float32, f"{name}: {out.dtype}"
        torch.testing.assert_close(out.double(), exact, atol=2e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # without autocast: the logits' dtype, as before; meta tensors (no autocast for that device
    # type: asking raised) still give shapes and dtypes where the backend takes them
    assert our_verl.entropy_from_logits(logits).dtype == dtype
    assert our_verl.logprobs_from_logits(logits.clone(), labels).dtype == dtype
    if backend == "reference":  # the kernels' backends refuse meta tensors by name
        meta = torch.empty(2, 3, V, dtype=dtype, device="meta")
        assert our_openrlhf.compute_entropy(meta).shape == (2, 3)


@pytest.fixture
def cuda_like_loss_autocast():
    """torch.autocast on the CPU that also runs sum, exp, log and pow in fp32 for bf16 / fp16
    inputs, as CUDA's autocast does (the CPU's keeps them in bf16): the frameworks' loss
    formulas aggregate with sum and take exp / pow, so under CUDA's autocast their bf16 losses
    come out fp32. Undone afterwards."""
    if DEVICE.type != "cpu":
        pytest.skip("simulates CUDA's autocast policy on the CPU")
    lib = torch.library.Library("aten", "IMPL")
    below = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def in_fp32(op):
        def kernel(*args, **kwargs):
            args = [a.float() if isinstance(a, torch.Tensor)
                    and a.dtype in (torch.float16, torch.bfloat16) else a for a in args]
            with torch._C._ExcludeDispatchKeyGuard(below):
                return op(*args, **kwargs)
        return kernel

    for name, overload in (("sum", "default"), ("sum", "dim_IntList"), ("exp", "default"),
                           ("log", "default"), ("pow", "Tensor_Scalar"),
                           ("pow", "Tensor_Tensor")):
        lib.impl(f"{name}.{overload}" if overload != "default" else name,
                 in_fp32(getattr(getattr(torch.ops.aten, name), overload)), "AutocastCPU")
    try:
        yield lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    finally:
        lib._destroy()


def test_loss_dropins_follow_autocast_like_the_frameworks(cuda_like_loss_autocast):
    """Under CUDA's autocast veRL's and OpenRLHF's own loss formulas give fp32 for bf16 inputs
    (agg_loss / masked_mean sum, the ratio's exp, the value loss's square, LogExpLoss's exp and
    log run in fp32 there); the drop-ins rounded their fp32 results to bf16 (type promotion
    alone). Also without autocast: veRL's masked_mean over a bool mask divides by an fp32 count,
    so compute_policy_loss's ppo_kl is fp32 for bf16 log-probs (it was bf16). Against the
    frameworks' formulas' dtypes (veRL 0.9.1, OpenRLHF 0.11.2); KL k1 / abs and PairWiseLoss
    have no such op and keep bf16."""
    import numpy as np

    class Config(dict):
        __getattr__ = dict.get

    config = Config(clip_ratio=0.2, clip_ratio_c=3.0, global_batch_info={})
    B, T = 3, 5
    bf16 = torch.bfloat16
    old = (-3 * torch.rand(B, T, device=DEVICE)).to(bf16)
    logp = (old.float() + 0.3 * torch.randn(B, T, device=DEVICE)).to(bf16)
    adv, values, returns = (torch.randn(B, T, device=DEVICE).to(bf16) for _ in range(3))
    mask = torch.ones(B, T, dtype=bf16, device=DEVICE)
    chosen, rejected = torch.randn(2, 4, device=DEVICE).to(bf16)
    index = np.array([0, 0, 1])
    policy = types.SimpleNamespace(clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None,
                                   token_level_loss=True, policy_loss_type="ppo",
                                   enable_vllm_is_correction=False)
    value = types.SimpleNamespace(clip_eps=0.2, token_level_loss=True)
    calls = {
        "verl vanilla": (lambda: our_verl.compute_policy_loss_vanilla(
            old, logp, adv, mask, "token-mean", config)[0], torch.float32),
        "verl compute_policy_loss": (lambda: our_verl.compute_policy_loss(
            old, logp, adv, mask, 0.2)[:3], torch.float32),
        "verl value": (lambda: our_verl.compute_value_loss(values, returns, adv, mask, 0.2)[0],
                       torch.float32),
        "verl kl k3": (lambda: our_verl.kl_penalty(logp, old, "low_var_kl"), torch.float32),
        "verl kl k2": (lambda: our_verl.kl_penalty(logp, old, "mse"), torch.float32),
        "verl kl k1": (lambda: our_verl.kl_penalty(logp, old, "kl"), bf16),
        "verl kl abs": (lambda: our_verl.kl_penalty(logp, old, "abs"), bf16),
        "verl grpo": (lambda: our_verl.compute_grpo_outcome_advantage(adv, mask, index)[0],
                      torch.float32),
        "verl rloo_vectorized": (lambda: our_verl.compute_rloo_vectorized_outcome_advantage(
            adv, mask, index)[0], torch.float32),
        "openrlhf policy": (lambda: our_openrlhf.policy_loss_forward(
            policy, logp, old, adv, mask)[:3:2], torch.float32),
        "openrlhf value": (lambda: our_openrlhf.value_loss_forward(
            value, values, old, returns, mask), torch.float32),
        "openrlhf logexp": (lambda: our_openrlhf.log_exp_loss_forward(None, chosen, rejected),
                            torch.float32),
        "openrlhf pairwise": (lambda: our_openrlhf.pairwise_loss_forward(None, chosen,
                                                                         rejected), bf16),
    }
    with cuda_like_loss_autocast():
        assert torch.exp(old).dtype == torch.float32  # the simulated policy
        got = {name: call() for name, (call, _) in calls.items()}
    for name, (_, want) in calls.items():
        outs = got[name] if isinstance(got[name], tuple) else (got[name],)
        assert all(t.dtype == want for t in outs), (name, [t.dtype for t in outs])
    ppo_kl = our_verl.compute_policy_loss(old, logp, adv, mask.bool(), 0.2)[2]
    assert ppo_kl.dtype == torch.float32


def test_verl_openrlhf_compile_fullgraph(backend):
    torch._dynamo.reset()  # the backend is read from the environment at trace time
    logits = _logits((2, 3, 41), torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 41, (2, 3), device=DEVICE)
    logp, ref_logp = -3 * torch.rand(2, 2, 3, device=DEVICE)

    def loss(x, labels, logp, ref_logp):
        a = our_verl.logprobs_from_logits(x * 1.0, labels.view(1, -1))
        b = our_openrlhf.log_probs_from_logits(x * 1.0, labels, 0.9)
        c = our_verl.entropy_from_logits(x) + our_openrlhf.compute_entropy(x)
        kl = our_verl.kl_penalty(logp, ref_logp, "k3+") + our_openrlhf.compute_approx_kl(
            logp, ref_logp, kl_estimator="k3")
        return (a.view(2, 3) + b + c).float().sum() + kl.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(logits, labels, logp, ref_logp)
    value.backward()
    grad, logits.grad = logits.grad.clone(), None
    eager = loss(logits, labels, logp, ref_logp)
    eager.backward()
    torch.testing.assert_close(value, eager)
    torch.testing.assert_close(grad, logits.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_loss_kl_gae_dropins_return_the_frameworks_dtypes(backend, dtype, mask_dtype):
    """The dtype each framework's own arithmetic gives (type promotion of its inputs, fp32 where
    it calls .float()), and that is the kernels' result rounded once."""
    B, T = 3, 8
    old = -3 * torch.rand(B, T, device=DEVICE)
    logp = old + 0.3 * torch.randn(B, T, device=DEVICE)
    adv, values, returns = torch.randn(3, B, T, device=DEVICE)
    old, logp, adv, values, returns = (t.to(dtype) for t in (old, logp, adv, values, returns))
    mask = torch.ones(B, T, device=DEVICE)
    mask[0, 5:] = 0
    mask = mask.to(mask_dtype)
    same = torch.promote_types(dtype, mask_dtype)  # x * mask, masked means
    at_least_fp32 = torch.promote_types(same, torch.float32)  # after a .float()
    frac = torch.promote_types(torch.float32, mask_dtype)  # clip fractions: .float() first
    verl_masked_mean = same if mask_dtype.is_floating_point else at_least_fp32

    class Config(dict):
        __getattr__ = dict.get

    config = Config(clip_ratio=0.2, clip_ratio_c=3.0, global_batch_info={})
    policy = types.SimpleNamespace(token_level_loss=True, policy_loss_type="ppo", clip_eps_low=0.2,
                                   clip_eps_high=0.2, dual_clip=None)
    seq_policy = types.SimpleNamespace(**{**vars(policy), "token_level_loss": False})
    value = types.SimpleNamespace(clip_eps=0.2, token_level_loss=True)
    counts = dict(dp_size=2, batch_num_tokens=torch.tensor(40.0, device=DEVICE),
                  global_batch_size=torch.tensor(6.0, device=DEVICE))
    cases = {
        "verl.kl_penalty": (lambda **kw: our_verl.kl_penalty(logp, old, "low_var_kl", **kw),
                            [dtype]),
        "verl.kl_penalty k3+": (lambda **kw: our_verl.kl_penalty(logp, old, "k3+", **kw),
                                [dtype]),
        "verl.gae": (lambda **kw: our_verl.compute_gae_advantage_return(
            adv, values, mask, 0.99, 0.95, **kw), [same, same]),
        "verl.policy_loss token-mean": (lambda **kw: our_verl.compute_policy_loss_vanilla(
            old, logp, adv, mask, "token-mean", config, **kw)[0], [same]),
        "verl.policy_loss seq-mean": (lambda **kw: our_verl.compute_policy_loss_vanilla(
            old, logp, adv, mask, "seq-mean-token-mean", config, **kw)[0], [at_least_fp32]),
        # GSPO's drop-in feeds the op fp32 shifted old log-probs; veRL's dtype is still its
        # inputs' (bf16 for bf16 log-probs and the bool mask veRL's actor passes)
        "verl.gspo token-mean": (lambda **kw: our_verl.compute_policy_loss_gspo(
            old, logp, adv, mask, "token-mean", config, **kw)[0], [same]),
        "verl.gspo seq-mean": (lambda **kw: our_verl.compute_policy_loss_gspo(
            old, logp, adv, mask, config=config, **kw)[0], [at_least_fp32]),
        # its ppo_kl is veRL's masked_mean: a bool mask's count plus 1e-8 is an fp32 scalar
        "verl.compute_policy_loss": (lambda **kw: our_verl.compute_policy_loss(
            old, logp, adv, mask, 0.2, **kw), [same, frac, verl_masked_mean, frac]),
        "verl.value_loss": (lambda **kw: our_verl.compute_value_loss(
            values, returns, adv, mask, 0.2, **kw), [same, frac]),
        "openrlhf.compute_approx_kl": (lambda **kw: our_openrlhf.compute_approx_kl(
            logp, old, kl_estimator="k2", **kw), [torch.float32]),
        "openrlhf.PolicyLoss": (lambda **kw: our_openrlhf.policy_loss_forward(
            policy, logp, old, adv, mask, **kw)[:3], [same, frac, same]),
        "openrlhf.PolicyLoss sequence-level": (lambda **kw: our_openrlhf.policy_loss_forward(
            seq_policy, logp, old, adv, mask, **kw)[:1], [at_least_fp32]),
        "openrlhf.ValueLoss": (lambda **kw: our_openrlhf.value_loss_forward(
            value, values, adv, returns, mask, **kw), [same]),
        # OpenRLHF's trainers pass the global counts as 0-d fp32 tensors (get_loss_batch_info):
        # its loss, a 0-d sum divided by them, is at least fp32
        "openrlhf.PolicyLoss global counts": (lambda **kw: our_openrlhf.policy_loss_forward(
            policy, logp, old, adv, mask, **counts, **kw)[:1], [at_least_fp32]),
        "openrlhf.ValueLoss global counts": (lambda **kw: our_openrlhf.value_loss_forward(
            value, values, adv, returns, mask, **counts, **kw), [at_least_fp32]),
        "openrlhf.PairWiseLoss": (lambda **kw: our_openrlhf.pairwise_loss_forward(
            None, values[0], returns[0], **kw), [dtype]),
        "openrlhf.LogExpLoss": (lambda **kw: our_openrlhf.log_exp_loss_forward(
            None, values[0], returns[0], **kw), [dtype]),
        "openrlhf.gae": (lambda **kw: our_openrlhf.get_advantages_and_returns(
            None, values, returns, mask, 0.99, 0.95, **kw), [same, same]),
        "openrlhf.cumulative_returns": (lambda **kw: our_openrlhf.get_cumulative_returns(
            None, returns, mask, 0.9, **kw), [dtype]),
    }
    for name, (call, expected) in cases.items():
        outs, kept = call(), call(keep_fp32=True)
        outs = outs if isinstance(outs, tuple) else (outs,)
        kept = kept if isinstance(kept, tuple) else (kept,)
        assert [o.dtype for o in outs] == expected, name
        for o, k in zip(outs, kept):
            assert k.dtype == _kernel_dtype(dtype), f"{name}: keep_fp32 gave {k.dtype}"
            assert torch.equal(o, k.to(o.dtype)), f"{name}: not the fp32 result rounded once"


def test_kl_dropins_take_a_reference_made_under_inference_mode(backend):
    """A reference model's log-probs computed under torch.inference_mode: the frameworks' own
    KL (torch arithmetic that saves no input) takes them with a log-prob that needs grad; the
    drop-ins (a kernel whose backward needs both inputs) did not: 'Inference tensors cannot be
    saved for backward'."""
    logp = (-3 * torch.rand(2, 5, device=DEVICE)).requires_grad_()
    with torch.inference_mode():
        ref = logp.detach() + torch.linspace(-15.0, 15.0, 10, device=DEVICE).view(2, 5)
    plain = ref.clone()
    calls = {
        "verl low_var_kl": lambda r: our_verl.kl_penalty(logp, r, "low_var_kl"),
        "verl k3+": lambda r: our_verl.kl_penalty(logp, r, "k3+"),
        "openrlhf k3": lambda r: our_openrlhf.compute_approx_kl(logp, r, kl_estimator="k3"),
        "openrlhf k2 unbiased": lambda r: our_openrlhf.compute_approx_kl(
            logp, r, r, kl_estimator="k2", unbiased_gradient=True),
    }
    for name, call in calls.items():
        value = call(ref)
        (grad,) = torch.autograd.grad(value.sum(), logp)
        expected = call(plain)
        (expected_grad,) = torch.autograd.grad(expected.sum(), logp)
        assert torch.equal(value, expected) and torch.equal(grad, expected_grad), name


@pytest.fixture
def vocab_sharded_logits():
    """(plain logits (2, 3, V), the same as a DTensor sharded over the vocabulary, a function
    that replicates a tensor on the mesh) on a one-process gloo group (made here unless the
    session has one)."""
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.tensor import DeviceMesh, Replicate, Shard, distribute_tensor

    made = not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", list(range(dist.get_world_size())))
        logits = _logits((2, 3, V), torch.float32).cpu()
        yield (logits, distribute_tensor(logits, mesh, [Shard(2)]),
               lambda t: distribute_tensor(t, mesh, [Replicate()]))
    finally:
        if made:
            dist.destroy_process_group()


def test_logprob_dropins_hand_sharded_logits_to_the_framework(trl_utils, vocab_sharded_logits,
                                                              monkeypatch):
    """Logits sharded over the vocabulary (a DTensor, tensor parallelism): the frameworks' torch
    code runs on them through DTensor; the kernels cannot (their op has no sharding rule, so it
    raised NotImplementedError). The drop-ins hand such calls to the framework's function."""
    logits, sharded, replicate = vocab_sharded_logits
    labels = torch.randint(0, V, (2, 3))
    with integrations.patch_trl():  # TRL's own functions are the fallbacks
        logp = our_trl.selective_log_softmax(sharded, replicate(labels))
        pair = our_trl.selective_log_softmax_and_entropy(sharded, replicate(labels),
                                                         row_mask=replicate(labels > 3))
        entropy = our_trl.entropy_from_logits(sharded)
    # TRL's own float32 code computed these: the float32 tolerance against the float64 forms
    torch.testing.assert_close(logp.full_tensor().double(), _logp64(logits, labels),
                               **TOL[torch.float32])
    torch.testing.assert_close(entropy.full_tensor().double(), _entropy64(logits),
                               **TOL[torch.float32])
    torch.testing.assert_close(pair[0].full_tensor().double(),
                               _logp64(logits, labels) * (labels > 3), **TOL[torch.float32])
    # veRL / OpenRLHF (stand-ins for their functions where they are not installed)
    for module, name, call in (
            ("verl.utils.torch_functional", "logprobs_from_logits",
             lambda: our_verl.logprobs_from_logits(sharded, labels)),
            ("verl.utils.torch_functional", "entropy_from_logits",
             lambda: our_verl.entropy_from_logits(sharded)),
            ("verl.utils.torch_functional", "entropy_from_logits_with_chunking",
             lambda: our_verl.entropy_from_logits_with_chunking(sharded)),
            ("openrlhf.models.utils", "log_probs_from_logits",
             lambda: our_openrlhf.log_probs_from_logits(sharded, labels)),
            ("openrlhf.models.utils", "compute_entropy",
             lambda: our_openrlhf.compute_entropy(sharded))):
        seen = []
        monkeypatch.setitem(integrations._ORIGINALS, (module, name),
                            lambda x, *args, seen=seen: seen.append(x) or "theirs")
        assert call() == "theirs" and seen[0] is sharded, name


def test_patch_functions_bind_keep_fp32():
    """patch_<framework>(keep_fp32=True) installs variants that keep the kernels' precision;
    they are drop-ins (a second patch keeps the framework's original) with the same names."""
    for fn in (our_verl.entropy_from_logits, our_openrlhf.policy_loss_forward,
               our_trl.selective_log_softmax):
        bound = integrations._contract.bind_keep_fp32(fn)
        assert bound.__name__ == fn.__name__ and integrations._is_dropin(bound)
    logits = _logits((3, V), torch.bfloat16)
    bound = integrations._contract.bind_keep_fp32(our_verl.entropy_from_logits)
    assert bound(logits).dtype == torch.float32
    assert bound(logits, keep_fp32=False).dtype == torch.bfloat16


def test_log_prob_and_entropy_dropins_compute_fp64_logits_in_fp64():
    """veRL's and OpenRLHF's eager formulas keep fp64 logits in fp64; the kernels compute in
    fp32, so fp64 logits go to the fp64 reference: values and gradients to 1e-12 of the
    float64 closed forms (the kernels were ~3e-7 off)."""
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 17, dtype=torch.float64, device=DEVICE) * 3).requires_grad_()
    labels = torch.randint(0, 17, (3, 5), device=DEVICE)
    exact_logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    p = torch.softmax(logits, -1)
    exact_entropy = -(p * torch.log_softmax(logits, -1)).sum(-1)
    weights = torch.randn(3, 5, dtype=torch.float64, device=DEVICE)
    cases = {
        "veRL logprobs_from_logits": (
            lambda z: our_verl.logprobs_from_logits(z, labels, inplace_backward=False), exact_logp),
        "veRL entropy_from_logits": (our_verl.entropy_from_logits, exact_entropy),
        "OpenRLHF log_probs_from_logits": (
            lambda z: our_openrlhf.log_probs_from_logits(z, labels), exact_logp),
        "OpenRLHF compute_entropy": (our_openrlhf.compute_entropy, exact_entropy),
    }
    for name, (dropin, exact) in cases.items():
        got = dropin(logits)
        assert got.dtype == torch.float64, name
        torch.testing.assert_close(got, exact, atol=1e-12, rtol=1e-12, msg=name)
        (grad,) = torch.autograd.grad((got * weights).sum(), logits)
        (want,) = torch.autograd.grad((exact * weights).sum(), logits, retain_graph=True)
        torch.testing.assert_close(grad, want, atol=1e-12, rtol=1e-12, msg=f"{name} gradient")
