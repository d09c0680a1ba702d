"""Shared numerics for the tests: the device under test and the 2x tolerance rule
(docs/design.md §3).

error(kernel) <= 2 * error(same-dtype PyTorch) + atol[dtype], errors measured against the
float64 reference as the max absolute difference.
"""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = torch.as_tensor(ref).to(x.device)  # closed forms are often written on the CPU
    if x.shape != ref.shape:
        raise AssertionError(f"shape {tuple(x.shape)} != reference shape {tuple(ref.shape)}")
    diff = (x.double() - ref.double()).abs()
    # NaN anywhere (e.g. a poisoned, unwritten output) must fail.
    if torch.isnan(diff).any():
        return float("inf")
    return diff.max().item() if diff.numel() else 0.0


def assert_close_2x(kernel, torch_same_dtype, ref64, dtype, atol_scale: float = 1.0, name="",
                    same_dtype_err: float = 0.0):
    """Check the 2x rule; ``torch_same_dtype`` is the eager PyTorch result in the input dtype.
    ``same_dtype_err``: the error of further same-dtype computations of the same result (e.g.
    emulated runs of the eager code); the rule takes the largest."""
    err_kernel = max_abs_err(kernel, ref64)
    err_torch = max(max_abs_err(torch_same_dtype, ref64), same_dtype_err)
    bound = 2 * err_torch + ATOL[dtype] * atol_scale
    assert err_kernel <= bound, (
        f"{name}: kernel error {err_kernel:.3e} > 2 x torch error {err_torch:.3e} "
        f"+ atol {ATOL[dtype] * atol_scale:.1e} (dtype {dtype})"
    )


def assert_close(x, ref, atol, rtol=0.0, name=""):
    x = torch.as_tensor(x)
    ref = torch.as_tensor(ref).to(x.device)  # closed forms are often written on the CPU
    err = (x.double() - ref.double()).abs()
    tol = atol + rtol * ref.double().abs()
    bad = ~(err <= tol)
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {err.numel()} elements off; max error "
        f"{err.max().item() if err.numel() else 0:.3e} (atol {atol}, rtol {rtol})"
    )


def padded_mask(n_rows: int, T: int) -> torch.Tensor:
    """Rows cycle through right padding, left padding, interior holes, all-masked, all-valid."""
    mask = torch.ones(n_rows, T, dtype=torch.bool, device=DEVICE)
    for row in range(n_rows):
        kind = row % 5
        cut = int(torch.randint(0, T, ()).item()) if T > 1 else 0
        if kind == 0:
            mask[row, cut + 1:] = False
        elif kind == 1:
            mask[row, :cut] = False
        elif kind == 2:
            mask[row] = torch.rand(T, device=DEVICE) > 0.4
        elif kind == 3:
            mask[row] = False
    return mask


def assert_stats_editable(loss_fn, *inputs: torch.Tensor, name: str = "") -> None:
    """``loss_fn(*leaves) -> (loss, stats)``: editing every returned stat in place before the
    backward (a distributed all_reduce, a rescale) leaves the gradient of every input unchanged,
    and autograd accepts the edit."""
    grads = []
    for edit in (False, True):
        leaves = [t.clone().requires_grad_() for t in inputs]
        loss, stats = loss_fn(*leaves)
        if edit:
            for value in stats.values():
                value.mul_(100.0)
        loss.backward()
        grads.append([leaf.grad for leaf in leaves])
    for before, after in zip(*grads):
        assert torch.equal(before, after), f"{name}: an edit of the stats changed a gradient"
