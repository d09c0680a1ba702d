"""group_advantages: the reference against closed forms and an independent float64 loop, the
Triton kernel (the interpreter without a GPU) against the float64 reference.

Closed forms: hand-worked groups (std 1 and 5, a pair, a lone score), RLOO's n / (n - 1) (r -
mean), the batch std, B = 1, equal scores. Semantics of the frameworks, written here as closed
forms: veRL's compute_grpo_outcome_advantage (token rewards summed per sequence, groups by uid,
lone sample mean 0 / std 1, advantage broadcast over the response mask) and TRL's GRPO
(scores viewed as (prompts, num_generations), scale_rewards group / batch / none). Then random
scores of awkward sizes (B = 1, prime group counts, shuffled ids of any integer dtype and
value, tiles forced small so that programs sweep several times), every dtype with the 2x rule,
a large common offset, NaN confined to its group, determinism, no gradient, the eager fast path
against the custom op, and every bad argument's error.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_kernels as rk
from rlhf_kernels import reference
from rlhf_kernels.ops import advantages as advantages_mod
from rlhf_kernels.ops.advantages import _launch, group_advantages
from tests.numerics import DEVICE, assert_close, assert_close_2x

ESTIMATORS = ("grpo", "dr_grpo", "rloo")
NORMS = ("group", "batch", "none")
BACKENDS = ("reference", "triton")
# Written out here, not read from the package: the defaults are part of the contract.
DEFAULT_NORM = {"grpo": "group", "dr_grpo": "none", "rloo": "none"}


def tensor(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


# --------------------------------------------------------------------------------------------
# closed forms
# --------------------------------------------------------------------------------------------
# scores [1, 2, 3 | 5, 0 | 10] with ids [7, 7, 7, -1, -1, 3]:
#   group 7:  mean 2, std 1, r - mean = (-1, 0, 1)
#   group -1: mean 2.5, std sqrt(2 * 2.5^2 / 1) = 2.5 sqrt(2), r - mean = (2.5, -2.5)
#   group 3:  the lone 10
#   batch:    mean 3.5, squared deviations 6.25 + 2.25 + 0.25 + 2.25 + 12.25 + 42.25 = 65.5,
#             std = sqrt(65.5 / 5) = sqrt(13.1)
SCORES = [1.0, 2.0, 3.0, 5.0, 0.0, 10.0]
IDS = [7, 7, 7, -1, -1, 3]
BATCH_STD = math.sqrt(13.1)
EPS = 1e-6
HAND = {
    ("grpo", "group"): [-1 / (1 + EPS), 0, 1 / (1 + EPS), 2.5 / (2.5 * math.sqrt(2) + EPS),
                        -2.5 / (2.5 * math.sqrt(2) + EPS), 10 / (1 + EPS)],
    ("grpo", "none"): [-1, 0, 1, 2.5, -2.5, 10],  # a lone score's mean is 0
    ("grpo", "batch"): [x / (BATCH_STD + EPS) for x in (-1, 0, 1, 2.5, -2.5, 10)],
    ("dr_grpo", "none"): [-1, 0, 1, 2.5, -2.5, 0],  # a lone score gives 0
    ("dr_grpo", "group"): [-1 / (1 + EPS), 0, 1 / (1 + EPS), 2.5 / (2.5 * math.sqrt(2) + EPS),
                           -2.5 / (2.5 * math.sqrt(2) + EPS), 0],
    ("dr_grpo", "batch"): [x / (BATCH_STD + EPS) for x in (-1, 0, 1, 2.5, -2.5, 0)],
    # RLOO: r - mean of the others = n / (n - 1) (r - mean): 3/2 (-1, 0, 1), 2 (2.5, -2.5), 0.
    ("rloo", "none"): [-1.5, 0, 1.5, 5, -5, 0],
    ("rloo", "group"): [-1.5 / (1 + EPS), 0, 1.5 / (1 + EPS), 5 / (2.5 * math.sqrt(2) + EPS),
                        -5 / (2.5 * math.sqrt(2) + EPS), 0],
    ("rloo", "batch"): [x / (BATCH_STD + EPS) for x in (-1.5, 0, 1.5, 5, -5, 0)],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator,norm", list(HAND), ids=str)
def test_hand_worked_groups(estimator, norm, backend):
    for dtype in (torch.float64, torch.float32):
        got = group_advantages(tensor(SCORES, dtype), group_ids=tensor(IDS, torch.int64),
                               estimator=estimator, norm=norm, backend=backend)
        assert got.dtype == dtype and got.shape == (6,)
        atol = 1e-12 if dtype == torch.float64 else 1e-6
        assert_close(got, tensor(HAND[estimator, norm]), atol=atol,
                     name=f"{estimator}/{norm} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_norm_is_the_estimators_own(backend):
    scores, ids = tensor(SCORES, torch.float32), tensor(IDS, torch.int64)
    for estimator in ESTIMATORS:
        got = group_advantages(scores, group_ids=ids, estimator=estimator, backend=backend)
        assert_close(got, tensor(HAND[estimator, DEFAULT_NORM[estimator]]), atol=1e-6,
                     name=estimator)
    # grpo with group_size: [1, 2, 3 | 5, 0, 10]: std 1 and 5 (mean 5, deviations 0, -5, 5).
    got = group_advantages(scores, 3, backend=backend)
    assert_close(got, tensor([-1, 0, 1, 0, -5, 5]) / (tensor([1, 1, 1, 5, 5, 5]) + EPS),
                 atol=1e-6, name="grpo group_size=3")


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_score_and_equal_scores(backend):
    one = tensor([3.0], torch.float32)
    # B = 1: one group of one; the batch std of one score is 1.
    for norm in NORMS:
        got = group_advantages(one, 1, norm=norm, backend=backend)
        expected = 3.0 if norm == "none" else 3.0 / (1 + EPS)
        assert_close(got, tensor([expected]), atol=1e-6, name=f"grpo B=1 {norm}")
        for estimator in ("dr_grpo", "rloo"):
            got = group_advantages(one, group_ids=tensor([4], torch.int32), estimator=estimator,
                                   norm=norm, backend=backend)
            assert_close(got, tensor([0.0]), atol=0, name=f"{estimator} B=1 {norm}")
    # A group of equal scores has std 0: 0 / (0 + eps) = 0, finite.
    same = tensor([2.5, 2.5, 2.5, -1.0, 4.0], torch.float32)
    got = group_advantages(same, group_ids=tensor([1, 1, 1, 2, 2], torch.int64), backend=backend)
    assert_close(got[:3], tensor([0.0, 0.0, 0.0]), atol=0, name="equal scores")
    # Empty batch: an empty result.
    assert group_advantages(same[:0], 2, backend=backend).shape == (0,)


# --------------------------------------------------------------------------------------------
# the frameworks' semantics, as closed forms written here
# --------------------------------------------------------------------------------------------
def verl_grpo_outcome(token_rewards, response_mask, uids, epsilon, norm_by_std):
    """veRL's compute_grpo_outcome_advantage, as its documented semantics: a sequence's score is
    the sum of its token rewards; samples with the same uid form a group; a group of one has
    mean 0 and std 1, a larger group its mean and unbiased std; the advantage (score - mean) /
    (std + epsilon) (or score - mean without std scaling) is broadcast over the response."""
    score = token_rewards.sum(-1)
    groups = defaultdict(list)
    for i, uid in enumerate(uids):
        groups[uid].append(float(score[i]))
    advantages = []
    for i, uid in enumerate(uids):
        members = groups[uid]
        if len(members) == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(members) / len(members)
            std = math.sqrt(sum((x - mean) ** 2 for x in members) / (len(members) - 1))
        centred = float(score[i]) - mean
        advantages.append(centred / (std + epsilon) if norm_by_std else centred)
    return tensor(advantages)[:, None] * response_mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_verl_grpo_outcome_semantics(backend):
    B, T = 11, 6
    lengths = torch.randint(1, T + 1, (B,), device=DEVICE)
    mask = (torch.arange(T, device=DEVICE)[None, :] < lengths[:, None]).double()
    # An outcome reward on the last response token, as veRL's reward managers place it.
    token_rewards = torch.zeros(B, T, dtype=torch.float64, device=DEVICE)
    token_rewards[torch.arange(B), lengths - 1] = torch.randn(B, dtype=torch.float64)
    uids = ["a", "b", "a", "c", "b", "a", "d", "b", "c", "a", "e"]  # d and e are alone
    as_ids = {u: k for k, u in enumerate(sorted(set(uids)))}
    ids = tensor([as_ids[u] for u in uids], torch.int64)
    scores = token_rewards.sum(-1).float()
    for norm_by_std, norm in ((True, "group"), (False, "none")):
        expected = verl_grpo_outcome(token_rewards, mask, uids, 1e-6, norm_by_std)
        got = group_advantages(scores, group_ids=ids, estimator="grpo", norm=norm, eps=1e-6,
                               backend=backend)
        assert_close(got[:, None] * mask, expected, atol=2e-6, name=f"veRL norm={norm}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_trl_grpo_scaling(backend):
    """TRL's GRPO: rewards viewed as (prompts, num_generations); advantages are rewards minus
    the prompt's mean, divided by std + eps per prompt ("group"), by the std of all rewards
    ("batch") or not at all ("none"); torch.std is unbiased."""
    G, prompts = 4, 5
    rewards = torch.randn(prompts * G, dtype=torch.float64, device=DEVICE)
    grouped = rewards.view(prompts, G)
    centred = (grouped - grouped.mean(1, keepdim=True)).reshape(-1)
    group_std = grouped.std(1).repeat_interleave(G)
    expected = {"group": centred / (group_std + 1e-4),
                "batch": centred / (rewards.std() + 1e-4), "none": centred}
    for norm, want in expected.items():
        got = group_advantages(rewards.float(), G, norm=norm, eps=1e-4, backend=backend)
        assert_close(got, want, atol=2e-6, name=f"TRL scale_rewards={norm}")


# --------------------------------------------------------------------------------------------
# the reference against an independent float64 loop
# --------------------------------------------------------------------------------------------
def loop_advantages(scores, group_of, estimator, norm, eps):
    """The contract, one score at a time, in Python floats (math.fsum)."""
    r = [float(x) for x in scores]
    members = defaultdict(list)
    for i, g in enumerate(group_of):
        members[g].append(r[i])

    def std(values):
        mean = math.fsum(values) / len(values)
        return math.sqrt(math.fsum((x - mean) ** 2 for x in values) / (len(values) - 1))

    batch_std = std(r) if len(r) > 1 else 1.0
    out = []
    for i, g in enumerate(group_of):
        values, n = members[g], len(members[g])
        if n == 1:
            centred, group_std = (r[i] if estimator == "grpo" else 0.0), 1.0
        else:
            if estimator == "rloo":
                baseline = (math.fsum(values) - r[i]) / (n - 1)
            else:
                baseline = math.fsum(values) / n
            centred, group_std = r[i] - baseline, std(values)
        scale = {"group": group_std + eps, "batch": batch_std + eps, "none": 1.0}[norm]
        out.append(centred / scale)
    return tensor(out)


def random_ids(B: int, n_groups: int, dtype=torch.int64) -> torch.Tensor:
    """Shuffled ids of ``n_groups`` groups of uneven sizes (some of one), arbitrary values."""
    cut = torch.randperm(B - 1)[: n_groups - 1].sort().values + 1
    sizes = torch.diff(torch.cat([torch.tensor([0]), cut, torch.tensor([B])]))
    info = torch.iinfo(dtype)
    values = torch.randperm(min(info.max - info.min, 10_000))[:n_groups] + info.min
    if dtype == torch.int64:
        values = values * 1_000_003 + 10**12  # far from small, some negative
    ids = values.repeat_interleave(sizes)[torch.randperm(B)]
    return ids.to(dtype).to(DEVICE)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_reference_matches_the_loop(estimator):
    scores = 3 * torch.randn(29, dtype=torch.float64, device=DEVICE) + 1
    ids = random_ids(29, 11)
    for norm in NORMS:
        got = reference.group_advantages(scores, group_ids=ids, estimator=estimator, norm=norm)
        want = loop_advantages(scores, ids.tolist(), estimator, norm, 1e-6)
        assert_close(got, want, atol=1e-12, name=f"{estimator}/{norm} ids")
        got = reference.group_advantages(scores[:28], 7, estimator=estimator, norm=norm)
        want = loop_advantages(scores[:28], [i // 7 for i in range(28)], estimator, norm, 1e-6)
        assert_close(got, want, atol=1e-12, name=f"{estimator}/{norm} group_size")
    # groups of one everywhere, and one group of everything
    for group_size in (1, 29):
        got = reference.group_advantages(scores, group_size, estimator=estimator, norm="batch")
        want = loop_advantages(scores, [i // group_size for i in range(29)], estimator, "batch",
                               1e-6)
        assert_close(got, want, atol=1e-12, name=f"{estimator} group_size={group_size}")


# --------------------------------------------------------------------------------------------
# the Triton kernel against the float64 reference
# --------------------------------------------------------------------------------------------
def check_kernel(scores, group_size=None, group_ids=None, estimator="grpo", norm=None, eps=1e-6,
                 got=None, name=""):
    if got is None:
        got = group_advantages(scores, group_size, group_ids, estimator, norm, eps,
                               backend="triton")
    assert got.dtype == torch.float32 and got.shape == scores.shape and not got.requires_grad
    ref64 = reference.group_advantages(scores.double(), group_size, group_ids, estimator, norm,
                                       eps)
    same_dtype = reference.group_advantages(scores, group_size, group_ids, estimator, norm, eps)
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    assert_close_2x(got, same_dtype, ref64, scores.dtype, scale, name=name)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kernel_matches_reference_all_dtypes(estimator, dtype):
    scores = (2 * torch.randn(60, device=DEVICE) + 0.5).to(dtype)
    ids = random_ids(60, 13)  # 13 groups (a prime), uneven sizes
    for norm in (None, *NORMS):
        check_kernel(scores, group_ids=ids, estimator=estimator, norm=norm,
                     name=f"{estimator}/{norm} ids {dtype}")
        check_kernel(scores, 5, estimator=estimator, norm=norm,
                     name=f"{estimator}/{norm} group_size=5 {dtype}")


# Under the interpreter a launch costs ~0.1-1 ms per tile op, so the sizes stay small; the
# small-tile test below makes the programs sweep several times.
@pytest.mark.parametrize("B,group_size", [(1, 1), (2, 1), (2, 2), (91, 7), (91, 13), (91, 91)])
def test_kernel_group_size_awkward_sizes(B, group_size):
    scores = torch.randn(B, device=DEVICE)
    for estimator in ESTIMATORS:
        for norm in NORMS:
            check_kernel(scores, group_size, estimator=estimator, norm=norm,
                         name=f"B={B} G={group_size} {estimator}/{norm}")


@pytest.mark.parametrize("B,n_groups", [(1, 1), (2, 2), (37, 1), (37, 37), (61, 17)])
def test_kernel_group_ids_awkward_sizes(B, n_groups):
    scores = torch.randn(B, device=DEVICE)
    ids = random_ids(B, n_groups)
    for estimator in ESTIMATORS:
        for norm in NORMS:
            check_kernel(scores, group_ids=ids, estimator=estimator, norm=norm,
                         name=f"B={B} groups={n_groups} {estimator}/{norm}")


@pytest.mark.parametrize("ids_dtype", (torch.int32, torch.int16, torch.int8, torch.uint8),
                         ids=str)
def test_kernel_group_ids_of_every_integer_dtype(ids_dtype):
    scores = torch.randn(40, device=DEVICE)
    ids = random_ids(40, 11, ids_dtype)
    for k, norm in enumerate(NORMS):
        check_kernel(scores, group_ids=ids, estimator=ESTIMATORS[k], norm=norm,
                     name=f"{ids_dtype} {ESTIMATORS[k]}/{norm}")


@pytest.mark.parametrize("block_i,block_j", [(4, 4), (2, 8)])
def test_kernel_small_tiles_sweep_several_times(block_i, block_j):
    """Many programs, each sweeping its group range in several steps: group_size windows that
    start and end inside a tile, and ids spread over the whole batch."""
    scores = torch.randn(15, device=DEVICE)
    ids = random_ids(15, 5)
    for k, (size, group_ids) in enumerate(((3, None), (5, None), (15, None), (0, ids))):
        for m, norm in enumerate(NORMS):
            estimator = ESTIMATORS[(k + m) % 3]
            got = _launch(scores, group_ids, size, estimator, norm, 1e-6, block_i, block_j)
            check_kernel(scores, size or None, group_ids, estimator, norm, got=got,
                         name=f"tiles {block_i}x{block_j} G={size} {estimator}/{norm}")


def test_kernel_large_common_offset():
    """Rewards around 1e4 with a spread of 1: fp32 keeps about 1e-3 absolute resolution there,
    yet every difference r_j - r_i is exact, so a shifted two-pass kernel is accurate to fp32
    rounding of the advantage. The textbook fp32 formula (E[r^2] - E[r]^2) is not: it is shown
    to miss the same tolerance, so the tolerance separates the two."""
    B, G = 64, 8
    scores = (1e4 + torch.randn(B, device=DEVICE)).float()
    ids = random_ids(B, 9)
    atol = 2e-5
    for estimator in ESTIMATORS:
        for norm in NORMS:
            for size, group_ids in ((G, None), (None, ids)):
                got = group_advantages(scores, size, group_ids, estimator, norm,
                                       backend="triton")
                want = reference.group_advantages(scores.double(), size, group_ids, estimator,
                                                  norm)
                assert_close(got, want, atol=atol, rtol=2e-6,
                             name=f"offset 1e4 {estimator}/{norm} G={size}")
    grouped = scores.view(-1, G)
    mean = grouped.mean(1, keepdim=True)
    naive_var = ((grouped * grouped).mean(1, keepdim=True) - mean * mean) * G / (G - 1)
    naive = (grouped - mean) / (naive_var.clamp_min(0).sqrt() + 1e-6)
    want = reference.group_advantages(scores.double(), G).view(-1, G)
    assert (naive.double() - want).abs().max().item() > 100 * atol


def test_kernel_strided_inputs_and_fp64():
    table = torch.randn(40, 3, device=DEVICE)
    ids = torch.randint(0, 6, (40, 2), device=DEVICE)
    scores, group_ids = table[:, 1], ids[:, 0]  # strides 3 and 2
    for estimator in ESTIMATORS:
        check_kernel(scores, group_ids=group_ids, estimator=estimator, norm="group",
                     name=f"strided {estimator}")
        check_kernel(scores, 4, estimator=estimator, norm="batch", name=f"strided {estimator}")
    # fp64 scores are computed by the float64 reference, on either backend.
    scores64 = torch.randn(12, dtype=torch.float64, device=DEVICE)
    got = group_advantages(scores64, 3, estimator="rloo", norm="group", backend="triton")
    assert got.dtype == torch.float64
    assert torch.equal(got, reference.group_advantages(scores64, 3, estimator="rloo",
                                                       norm="group"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_score_stays_in_its_group(backend):
    scores = torch.randn(9, device=DEVICE)
    scores[4] = float("nan")
    ids = tensor([0, 0, 1, 1, 1, 2, 2, 2, 3], torch.int64)
    for estimator in ESTIMATORS:
        got = group_advantages(scores, group_ids=ids, estimator=estimator, norm="group",
                               backend=backend)
        assert torch.isnan(got[2:5]).all()
        clean = torch.ones(9, dtype=torch.bool, device=DEVICE)
        clean[2:5] = False
        want = reference.group_advantages(scores.double(), group_ids=ids, estimator=estimator,
                                          norm="group")
        # the other groups as the fp32 formula gives them (a fixed atol failed when a random
        # group's std was small: (s - mean) / std amplifies fp32 rounding, seed 1437202113)
        same_dtype = reference.group_advantages(scores, group_ids=ids, estimator=estimator,
                                                norm="group")
        scale = max(1.0, want[clean].abs().max().item())
        assert_close_2x(got[clean], same_dtype[clean], want[clean], torch.float32, scale,
                        name=f"{estimator} around a NaN")


def test_kernel_is_deterministic():
    scores = torch.randn(150, device=DEVICE)
    ids = random_ids(150, 31)
    first = group_advantages(scores, group_ids=ids, norm="batch", backend="triton")
    again = group_advantages(scores, group_ids=ids, norm="batch", backend="triton")
    assert torch.equal(first, again)


# --------------------------------------------------------------------------------------------
# no gradient, the eager fast path, the backend choice
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_even_when_scores_require_grad(backend):
    scores = torch.randn(8, device=DEVICE, requires_grad=True)
    got = group_advantages(scores, 4, backend=backend)
    assert not got.requires_grad and got.grad_fn is None
    assert_close(got, reference.group_advantages(scores.detach().double(), 4), atol=2e-6)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_eager_fast_path_equals_the_custom_op(monkeypatch):
    scores = torch.randn(24, device=DEVICE).to(torch.bfloat16)
    ids = random_ids(24, 5)
    calls = [lambda: group_advantages(scores, 6, estimator="rloo", norm="batch"),
             lambda: group_advantages(scores, group_ids=ids, estimator="grpo")]
    with _RecordOps() as record:
        fast = [call() for call in calls]
    assert not [n for n in record.names if n.startswith("rlhf_kernels::")]
    monkeypatch.setattr(advantages_mod, "launch_directly", lambda *tensors: False)
    with _RecordOps() as record:
        slow = [call() for call in calls]
    assert record.names.count("rlhf_kernels::group_advantages") == 2
    for got, want in zip(fast, slow):
        assert torch.equal(got, want)


def test_backend_env_var_selects_the_reference(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the Triton launcher ran")

    monkeypatch.setattr(advantages_mod, "_launch", refuse)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    scores = torch.randn(6, device=DEVICE)
    got = rk.group_advantages(scores, 3)
    assert torch.equal(got, reference.group_advantages(scores, 3))
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="RLHF_KERNELS_BACKEND='nonsense' is not a backend"):
        rk.group_advantages(scores, 3)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_say_what_is_expected(backend):
    scores = torch.randn(6, device=DEVICE)
    ids = torch.tensor([0, 0, 1, 1, 2, 2], device=DEVICE)

    def call(*args, **kwargs):
        return group_advantages(*args, backend=backend, **kwargs)

    with pytest.raises(ValueError, match="exactly one of group_size .* got neither"):
        call(scores)
    with pytest.raises(ValueError, match="exactly one of group_size .* got both"):
        call(scores, 2, ids)
    with pytest.raises(ValueError, match=r"B=6 scores do not split into groups of group_size=4 "
                                         r"\(6 % 4 = 2\)"):
        call(scores, 4)
    # (a 0-d integer tensor is an int: tests/kernels/test_kernel_edge_cases.py)
    for bad in (0, -2, 2.0, True, torch.tensor(2.0)):
        with pytest.raises(ValueError, match="group_size must be an int >= 1, got"):
            call(scores, bad)
    with pytest.raises(ValueError, match="group_ids must be an integer tensor .* got "
                                         "torch.float32"):
        call(scores, group_ids=ids.float())
    with pytest.raises(ValueError, match="group_ids must be an integer tensor .* got torch.bool"):
        call(scores, group_ids=ids > 0)
    with pytest.raises(ValueError, match="group_ids must be a \\(B,\\) integer torch.Tensor, "
                                         "got list"):
        call(scores, group_ids=[0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"group_ids has shape \(5,\) but scores has shape "
                                         r"\(6,\)"):
        call(scores, group_ids=ids[:5])
    with pytest.raises(ValueError, match=r"scores must be 1-D, one score per sequence: expected "
                                         r"\(B,\), got shape \(2, 3\)"):
        call(scores.view(2, 3), 3)
    with pytest.raises(ValueError, match="scores must be a floating tensor"):
        call(ids, 2)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor, got list"):
        call([1.0, 2.0], 2)
    with pytest.raises(ValueError, match="estimator='ppo' is not supported; expected one of "
                                         r"\('grpo', 'dr_grpo', 'rloo'\)"):
        call(scores, 2, estimator="ppo")
    with pytest.raises(ValueError, match="norm='std' is not supported; expected None"):
        call(scores, 2, norm="std")
    for eps in (-1.0, float("inf"), float("nan")):  # inf made every advantage 0
        with pytest.raises(ValueError, match=f"eps={eps} must be a finite number >= 0"):
            call(scores, 2, eps=eps)
    if DEVICE.type == "cuda":
        with pytest.raises(ValueError, match="all inputs must be on one device"):
            call(scores, group_ids=ids.cpu())
