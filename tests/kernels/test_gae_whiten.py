"""gae and masked_whiten: the Triton kernels against the float64 reference and closed forms.

gae: a hand-worked T = 3 sequence (with and without a masked hole), gamma = lam = 1 with zero
values (a reverse cumulative sum), then the reference loop for T = 1, 257, 1025 and T's that force
several chunks, with right/left padding, interior holes, all-masked rows, bool/float/no masks and
fp32/bf16 inputs. masked_whiten: dtypes x sizes x masks x flags, n = 0, n = 1, a closed form, a
large-offset input, several blocks per program, determinism. Bad input and torch.compile for both.
"""

import math

import pytest
import torch

from rlhf_kernels import reference
from rlhf_kernels.ops.gae import _gae_op, gae
from rlhf_kernels.ops.whiten import _masked_whiten_op, masked_whiten
from tests.numerics import DEVICE, assert_close, assert_close_2x, padded_mask


# --------------------------------------------------------------------------------------------
# gae
# --------------------------------------------------------------------------------------------
def check_gae(rewards, values, mask, gamma, lam, name="", advantages_returns=None):
    dtype = rewards.dtype
    if advantages_returns is None:
        advantages_returns = gae(rewards, values, mask, gamma, lam, backend="triton")
    adv, ret = advantages_returns
    adv64, ret64 = reference.gae(rewards.double(), values.double(), mask, gamma, lam)
    adv_t, ret_t = reference.gae(rewards, values, mask, gamma, lam)
    for out in (adv, ret):
        assert out.dtype == torch.float32 and out.shape == rewards.shape
        assert not out.requires_grad
    # Advantages are sums of many deltas: judge the error relative to their size.
    scale = max(1.0, ret64.abs().max().item(), adv64.abs().max().item()) if adv.numel() else 1.0
    assert_close_2x(adv, adv_t, adv64, dtype, scale, name=f"{name} advantages")
    assert_close_2x(ret, ret_t, ret64, dtype, scale, name=f"{name} returns")


def test_gae_hand_worked():
    # r = [1, 0, 2], v = [0.5, 1, -1], gamma 0.9, lam 0.8 (gamma * lam = 0.72), worked backwards:
    #   t=2: delta = 2 + 0.9*0 - (-1) = 3;        A = 3
    #   t=1: delta = 0 + 0.9*(-1) - 1 = -1.9;     A = -1.9 + 0.72*3 = 0.26
    #   t=0: delta = 1 + 0.9*1 - 0.5 = 1.4;       A = 1.4 + 0.72*0.26 = 1.5872
    rewards = torch.tensor([[1.0, 0.0, 2.0]], device=DEVICE)
    values = torch.tensor([[0.5, 1.0, -1.0]], device=DEVICE)
    adv, ret = gae(rewards, values, None, gamma=0.9, lam=0.8, backend="triton")
    assert_close(adv, torch.tensor([[1.5872, 0.26, 3.0]]), atol=1e-6, name="advantages")
    assert_close(ret, torch.tensor([[2.0872, 1.26, 2.0]]), atol=1e-6, name="returns")
    # Position 1 masked: it outputs 0 and is skipped, so t=0 sees v=-1 and A=3 from t=2:
    #   t=0: delta = 1 + 0.9*(-1) - 0.5 = -0.4;  A = -0.4 + 0.72*3 = 1.76
    mask = torch.tensor([[True, False, True]], device=DEVICE)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8, backend="triton")
    assert_close(adv, torch.tensor([[1.76, 0.0, 3.0]]), atol=1e-6, name="advantages (hole)")
    assert_close(ret, torch.tensor([[2.26, 0.0, 2.0]]), atol=1e-6, name="returns (hole)")


@pytest.mark.parametrize("T", [1, 5, 300])
def test_gae_is_a_reverse_cumsum_when_gamma_lam_are_one(T):
    # gamma = lam = 1 and V = 0: A_t = sum of the rewards of the valid positions s >= t.
    n_rows = 5
    rewards = torch.randn(n_rows, T, device=DEVICE)
    mask = padded_mask(n_rows, T)
    adv, ret = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0,
                   backend="triton")
    masked_rewards = (rewards * mask).double()
    expected = masked_rewards.flip(-1).cumsum(-1).flip(-1) * mask
    assert_close(adv, expected, atol=1e-5 * math.sqrt(T), name="reverse cumsum")
    assert_close(ret, expected, atol=1e-5 * math.sqrt(T), name="returns = advantages")


# The interpreter runs a scan element by element, so the mask-kind variants stay at T <= 257.
@pytest.mark.parametrize("dtype,mask_kind,T", [
    (dtype, "bool", T) for dtype in (torch.float32, torch.bfloat16) for T in (1, 257, 1025)
] + [
    (dtype, kind, T) for dtype in (torch.float32, torch.bfloat16) for kind in ("float", "none")
    for T in (1, 257)
], ids=str)
def test_gae_matches_reference(dtype, mask_kind, T):
    n_rows = 5
    rewards = torch.randn(n_rows, T, device=DEVICE).to(dtype)
    values = (2 * torch.randn(n_rows, T, device=DEVICE)).to(dtype)
    mask = padded_mask(n_rows, T)
    mask = {"bool": mask, "float": mask.float(), "none": None}[mask_kind]
    check_gae(rewards, values, mask, 0.99, 0.95, name=f"T={T} {dtype} mask={mask_kind}")


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.5, 0.0), (0.0, 0.7), (0.99, 0.95)])
def test_gae_hyperparameters(gamma, lam):
    rewards = torch.randn(5, 40, device=DEVICE)
    values = torch.randn(5, 40, device=DEVICE)
    check_gae(rewards, values, padded_mask(5, 40), gamma, lam, name=f"gamma={gamma} lam={lam}")


def test_gae_carries_across_many_chunks():
    # 16-wide chunks over T = 100 (7 chunks): holes straddle chunk borders and chunks 1-2 are
    # entirely masked, so both carries (next valid value, next advantage) cross empty chunks.
    T = 100
    rewards = torch.randn(3, T, device=DEVICE)
    values = torch.randn(3, T, device=DEVICE)
    mask = padded_mask(3, T)
    mask[0] = torch.rand(T, device=DEVICE) > 0.3
    mask[0, 15:17] = False
    mask[0, 16:48] = False
    mask[0, 63:66] = False
    for block_t in (16, 32):
        result = _gae_op(rewards, values, mask, 0.97, 0.9, block_t)
        check_gae(rewards, values, mask, 0.97, 0.9, name=f"block_t={block_t}",
                  advantages_returns=result)


def test_gae_long_rows_use_several_chunks():
    # T = 2100 > the 2048-wide chunk: two chunks through the public function.
    rewards = torch.randn(2, 2100, device=DEVICE)
    values = torch.randn(2, 2100, device=DEVICE)
    mask = padded_mask(3, 2100)[1:]
    check_gae(rewards, values, mask, 1.0, 0.95, name="T=2100")


def test_gae_leading_dims_and_strides():
    # (2, 3, T) with a transpose in the leading dims and a sliced time axis; int mask.
    base_r = torch.randn(3, 2, 90, device=DEVICE)
    base_v = torch.randn(3, 2, 90, device=DEVICE)
    rewards, values = base_r.transpose(0, 1)[..., ::2], base_v.transpose(0, 1)[..., 1::2]
    mask = padded_mask(6, 45).reshape(2, 3, 45).to(torch.int32)
    check_gae(rewards, values, mask, 0.99, 0.95, name="strided")


def test_gae_edge_cases():
    empty = torch.empty(3, 0, device=DEVICE)
    adv, ret = gae(empty, empty, backend="triton")
    assert adv.shape == ret.shape == (3, 0)
    r64 = torch.randn(2, 9, dtype=torch.float64, device=DEVICE)
    adv, ret = gae(r64, r64, None, 0.9, 0.9, backend="triton")  # float64 -> the reference
    adv_ref, ret_ref = reference.gae(r64, r64, None, 0.9, 0.9)
    assert adv.dtype == torch.float64 and torch.equal(adv, adv_ref) and torch.equal(ret, ret_ref)


def test_gae_bad_input():
    x = torch.zeros(2, 5, device=DEVICE)
    with pytest.raises(ValueError, match=r"values has shape \(2, 4\) but rewards has shape"):
        gae(x, torch.zeros(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match=r"mask has shape \(5,\) but rewards has shape"):
        gae(x, x, torch.ones(5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="rewards must have a time dimension"):
        gae(torch.zeros(()), torch.zeros(()))
    with pytest.raises(ValueError, match="values must be a floating tensor"):
        gae(x, x.long())
    with pytest.raises(TypeError, match="mask must be a torch.Tensor or None"):
        gae(x, x, [[1] * 5] * 2)


# --------------------------------------------------------------------------------------------
# masked_whiten
# --------------------------------------------------------------------------------------------
def check_whiten(x, mask, shift_mean, unbiased, name="", out=None):
    if out is None:
        out = masked_whiten(x, mask, shift_mean, unbiased, backend="triton")
    out64 = reference.masked_whiten(x.double(), mask, shift_mean, unbiased)
    out_t = reference.masked_whiten(x, mask, shift_mean, unbiased)
    assert out.dtype == torch.float32 and out.shape == x.shape and not out.requires_grad
    scale = max(1.0, out64.abs().max().item()) if out.numel() else 1.0
    assert_close_2x(out, out_t, out64, x.dtype, scale, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(7,), (3, 7), (4, 1025), (2, 3, 257)], ids=str)
@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_whiten_matches_reference(dtype, shape, mask_kind):
    x = (3 * torch.randn(shape, device=DEVICE) + 2).to(dtype)
    mask = torch.rand(shape, device=DEVICE) > 0.3
    mask = {"bool": mask, "float": mask.float(), "none": None}[mask_kind]
    for shift_mean in (True, False):
        for unbiased in (True, False):
            check_whiten(x, mask, shift_mean, unbiased,
                         name=f"{shape} mask={mask_kind} shift={shift_mean} unbiased={unbiased}")


def test_whiten_closed_forms():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0], device=DEVICE)
    mask = torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool, device=DEVICE)
    # mean 2.5, unbiased variance 5/3, biased 5/4; the masked 100 plays no part and outputs 0.
    for unbiased, var in ((True, 5.0 / 3.0), (False, 1.25)):
        expected = (torch.tensor([-1.5, -0.5, 0.5, 1.5, 0.0], device=DEVICE)
                    / math.sqrt(var + 1e-8))
        out = masked_whiten(x, mask, unbiased=unbiased, backend="triton")
        assert_close(out, expected, atol=1e-6, name=f"unbiased={unbiased}")
        out = masked_whiten(x, mask, shift_mean=False, unbiased=unbiased, backend="triton")
        assert_close(out, (expected + 2.5) * mask, atol=1e-6, name="shift_mean=False")

    # n = 0: all zeros, no NaN. n = 1: variance 0, so the one valid token whitens to 0
    # (to x itself with shift_mean=False).
    none_valid = torch.zeros_like(mask)
    for shift_mean in (True, False):
        out = masked_whiten(x, none_valid, shift_mean=shift_mean, backend="triton")
        assert_close(out, torch.zeros(5), atol=0.0, name="n=0")
    one_valid = torch.zeros_like(mask)
    one_valid[2] = True
    out = masked_whiten(x, one_valid, backend="triton")
    assert_close(out, torch.zeros(5), atol=0.0, name="n=1")
    out = masked_whiten(x, one_valid, shift_mean=False, backend="triton")
    assert_close(out, torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0]), atol=0.0, name="n=1 no shift")
    for unbiased in (True, False):
        check_whiten(x, one_valid, True, unbiased, name="n=1 vs reference")
        check_whiten(x, none_valid, False, unbiased, name="n=0 vs reference")


def test_whiten_several_blocks_per_program_and_large_offset():
    # 10 blocks of 1024 + 5 over at most 3 programs in pass 1: each merges 3-4 blocks (Chan).
    # A large offset with a small spread checks the centred (cancellation-free) variance.
    n = 10 * 1024 + 5
    x = 1000.0 + 0.01 * torch.randn(n, device=DEVICE)
    mask = torch.rand(n, device=DEVICE) > 0.5
    for max_partials in (3, 0):
        out = _masked_whiten_op(x, mask, True, True, 1e-8, max_partials)
        check_whiten(x, mask, True, True, name=f"max_partials={max_partials}", out=out)
    out = _masked_whiten_op(x, None, False, False, 1e-8, 4)
    check_whiten(x, None, False, False, name="no mask, 4 partials", out=out)


def test_whiten_is_deterministic():
    # No atomics: the same input gives the same bits.
    x = torch.randn(6, 1000, device=DEVICE)
    mask = torch.rand(6, 1000, device=DEVICE) > 0.2
    first = masked_whiten(x, mask, backend="triton")
    assert torch.equal(first, masked_whiten(x, mask, backend="triton"))


def test_whiten_strided_input_and_float64():
    base = torch.randn(40, 6, device=DEVICE)
    x = base.t()[:, ::3]  # non-contiguous (6, 14)
    mask = (torch.rand(14, 6, device=DEVICE) > 0.3).t()
    check_whiten(x, mask, True, True, name="strided")
    x64 = torch.randn(3, 5, dtype=torch.float64, device=DEVICE)
    out = masked_whiten(x64, None, backend="triton")  # float64 -> the reference
    assert out.dtype == torch.float64 and torch.equal(out, reference.masked_whiten(x64))


def test_whiten_bad_input():
    x = torch.zeros(2, 5, device=DEVICE)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\) but x has shape \(2, 5\)"):
        masked_whiten(x, torch.ones(2, 4, device=DEVICE))
    for eps in (-1.0, float("inf"), float("nan")):  # inf made every output 0
        with pytest.raises(ValueError, match=f"eps={eps} must be a finite number >= 0"):
            masked_whiten(x, eps=eps)
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        masked_whiten(x.int())


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------
def test_torch_compile_traces_without_graph_breaks():
    rewards = torch.randn(3, 30, device=DEVICE)
    values = torch.randn(3, 30, device=DEVICE)
    mask = padded_mask(3, 30)

    def advantages(rewards, values, mask):
        adv, ret = gae(rewards, values, mask, 0.99, 0.95, backend="triton")
        return masked_whiten(adv, mask, backend="triton"), ret

    compiled = torch.compile(advantages, fullgraph=True, backend="aot_eager")
    adv_c, ret_c = compiled(rewards, values, mask)
    adv_e, ret_e = advantages(rewards, values, mask)
    assert_close(adv_c, adv_e, atol=0.0, name="compiled advantages")
    assert_close(ret_c, ret_e, atol=0.0, name="compiled returns")


@pytest.mark.parametrize("dtype,backend", [(torch.float32, "triton"), (torch.float64, "triton"),
                                           (torch.float32, "reference")], ids=str)
def test_whiten_output_has_no_gradient_on_every_path(dtype, backend):
    """The documented 'no gradient' holds for every dtype and backend: fp64 input and the
    reference backend once returned a differentiable result while the kernels' was detached."""
    x = torch.randn(2, 6, device=DEVICE, dtype=dtype, requires_grad=True)
    mask = torch.rand(2, 6, device=DEVICE) > 0.3
    out = masked_whiten(x, mask, backend=backend)
    assert not out.requires_grad and out.grad_fn is None
