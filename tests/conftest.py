"""Test set-up: without a GPU, every Triton kernel runs on CPU tensors under the interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e. before
rlhf_kernels' op modules are imported, so it is set here, at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs start as NaN so that an element a kernel never writes fails the test.
os.environ.setdefault("RLHF_KERNELS_POISON", "1")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs every run (DESIGN.md §3), but reproducible from the printed seed.
    seed = int(os.environ.get("RLHF_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_logreport(report):
    if report.failed:
        for key, value in report.user_properties:
            if key == "seed":
                report.sections.append(("random seed", f"rerun with RLHF_TEST_SEED={value}"))
