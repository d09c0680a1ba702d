"""The README's kernel quickstart runs on the CPU as it says, and gives finite numbers."""

from __future__ import annotations

import math
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _kernel_quickstart() -> str:
    text = README.read_text()
    section = text[text.index("## Quickstart: the kernels"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_kernel_quickstart_gives_a_finite_loss_on_the_cpu(monkeypatch):
    """"Replace every device="cuda" by device="cpu"; the snippet then runs unchanged": at the
    README's V and H (what decides whether an unscaled lm_head overflows the k3 KL), with fewer
    rows so that it takes a second. Every loss and statistic must be finite."""
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")  # what CPU tensors run by default
    code = _kernel_quickstart().replace('device="cuda"', 'device="cpu"')
    shapes = "B, T, V, H = 4, 256, 32000, 1024"
    assert shapes in code, "the README's shapes changed: update this test"
    code = code.replace(shapes, "B, T, V, H = 2, 8, 32000, 1024")
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    loss, stats = namespace["loss"], namespace["stats"]
    assert math.isfinite(loss.item()), f"loss={loss.item()}"
    for name, value in stats.items():
        assert math.isfinite(float(value)), f"{name}={float(value)}"
    loss.backward()  # the fused op's gradients for the lm_head and the hidden states
    for name in ("hidden", "weight"):
        assert math.isfinite(float(namespace[name].grad.abs().max())), f"{name}.grad"
