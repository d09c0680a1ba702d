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
def _reference_kernels_where_marked(request, monkeypatch):
    """`pytestmark = pytest.mark.reference_kernels`: the module's training loops, run
    directories or settings are under test, not the kernels (their own files test those
    against the float64 reference). Under the Triton interpreter (how the suite runs without a
    GPU) a loop of kernel calls would take minutes, so the ops run their plain-PyTorch
    reference there."""
    if request.node.get_closest_marker("reference_kernels") is not None:
        monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.addinivalue_line("markers", "reference_kernels: the ops run their plain-PyTorch "
                                       "reference in this test (the loops are under test)")
    # `pytest -n auto` (pytest-xdist, the README's test command): the suite times nothing, so
    # pytest-benchmark's warning that parallel workers disable benchmarks (one per process) is
    # noise; disabled here before that plugin reads the option
    if config.getoption("numprocesses", None) or os.environ.get("PYTEST_XDIST_WORKER"):
        if hasattr(config.option, "benchmark_disable"):
            config.option.benchmark_disable = True


def _interpreter_rounds_bf16_like_the_gpu() -> None:
    """Make the Triton interpreter's fp32 -> bf16 cast round to nearest even, as the GPU does.

    The interpreter truncates that cast (a whole bf16 ulp, always towards zero), so bf16 outputs
    of a kernel carry a bias the GPU build never has and the 2x rule fails at random. Emulating
    the GPU cast here keeps the kernels free of interpreter-only workarounds. If a Triton release
    moves this private hook, nothing is patched and the tests still run.
    """
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    original = getattr(builder, "cast_impl", None)
    if original is None or handle is None or getattr(original, "_rounds_bf16", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            as_bf16 = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            bits = as_bf16.view(torch.int16).numpy().view(np.uint16)
            return handle(bits, dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl._rounds_bf16 = True
    builder.cast_impl = cast_impl


def _interpreter_frees_launch_arguments_like_the_gpu() -> None:
    """Collect the reference cycle the Triton interpreter leaves around a launch's arguments.

    On a GPU the launcher keeps no reference to its arguments once the kernel is queued; the
    interpreter leaves them in a reference cycle that lives until the next garbage collection, so
    a temporary passed to a kernel (e.g. a linear_logprobs logits chunk) outlives its last use
    and the memory tests (tests/trainer/test_plan.py counts live tensors) would charge it to
    whatever runs next. A young-generation collection after each interpreted launch (~50 us)
    frees it at once. If a Triton release moves the class, nothing is patched.
    """
    import gc

    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    executor = getattr(interpreter, "GridExecutor", None)
    original = executor.__dict__.get("__call__") if executor is not None else None
    if original is None or getattr(original, "_collects", False):
        return

    def call(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        finally:
            gc.collect(0)

    call._collects = True
    executor.__call__ = call


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_rounds_bf16_like_the_gpu()
    _interpreter_frees_launch_arguments_like_the_gpu()


@pytest.fixture(autouse=True, scope="session")
def _the_trainers_cpu_allocator():
    """The whole session runs with the CPU allocator the trainer installs on the CPU
    (rlhf.stage.bound_cpu_allocator_slack: the native block cache, else glibc's fixed mmap
    threshold), from the first test on, instead of from whichever test first resolves a CPU
    device: what a test sees then does not depend on the order the tests run in.
    tests/trainer/test_cpu_allocator.py checks each setting in its own fresh process. Not on a GPU
    machine, where the bootstrap does not build the native kernels and the proof's CUDA tests
    should not wait for that build."""
    if not torch.cuda.is_available():
        from rlhf.stage import bound_cpu_allocator_slack

        bound_cpu_allocator_slack()
    yield


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Every test runs with one intra-op thread, as the stages do by default (cpu_threads=1).

    The test models are tiny: a second thread buys nothing, and each op pays the threads'
    fork/join; on CI's 2 shared cores that made the tests that call the model directly (not
    through a stage) several times slower (tests/trainer/test_stages.py's rollout tests: 19 CPU s
    with 2 threads, 6 with 1). What a test computes does not depend on it; tests that are about the
    thread setting set their own count and restore it.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs every run (docs/design.md §3), but reproducible from the printed seed.
    seed = int(os.environ.get("RLHF_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_logreport(report):
    if report.failed:
        for key, value in report.user_properties:
            if key == "seed":
                report.sections.append(("random seed", f"rerun with RLHF_TEST_SEED={value}"))
