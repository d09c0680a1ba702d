"""The benchmark scripts' GPU cases as pytest-benchmark tests (docs/design.md §4).

    pytest benchmarks --benchmark-only                       # time every case
    pytest benchmarks --benchmark-only -k "gae and ours"     # a subset
    pytest benchmarks --benchmark-only --benchmark-save=h100 # keep the run (.benchmarks/)
    pytest benchmarks --benchmark-only --benchmark-compare   # against the last saved run

One test per (case, implementation) of each ``bench_*.py`` script: the parametrisation is the
script's own ``cases()`` list, the one ``python -m benchmarks`` times, so the two never disagree
about shapes or peers. Without CUDA every test is skipped (the kernels are timed on the GPU; the
CPU check of the scripts is ``python -m benchmarks --smoke``, which
tests/e2e/test_benchmark_scripts.py runs).

pytest-benchmark times with ``time.perf_counter`` around a call that ends in
``torch.cuda.synchronize()``, without the L2 flush of ``triton.testing.do_bench``: for the
GB-sized cases the two agree, for the microsecond-sized ones the scripts' do_bench figures (the
ones in benchmarks/results/ and the README) are the reference. Each test's ``extra_info`` carries
the bytes the op must move, GB/s at the median and the peak extra memory.
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed "
                    "(pip install -e '.[dev]')")

from benchmarks.__main__ import discover  # noqa: E402
from benchmarks.common import Case, peak_extra_mib  # noqa: E402

CUDA = torch.cuda.is_available()
NO_CUDA = ("no CUDA device: the benchmarks time GPU kernels "
           "(python -m benchmarks --smoke checks the scripts on the CPU)")


def case_id(case: Case) -> str:
    """``op/case/impl`` with no spaces, e.g. ``gae/512x2048_fp32/ours`` (for ``-k``)."""
    return f"{case.op}/{case.case}/{case.impl}".replace(" ", "_")


def all_cases() -> list[Case]:
    """The GPU cases of every bench_* script, in the order ``python -m benchmarks`` runs them."""
    return [case for script in discover()
            for case in importlib.import_module(f"benchmarks.{script}").cases(smoke=False)]


def _params() -> list:
    marks = () if CUDA else (pytest.mark.skip(reason=NO_CUDA),)
    return [pytest.param(case, id=case_id(case), marks=marks) for case in all_cases()]


@pytest.mark.parametrize("case", _params())
def test_benchmark(benchmark, case: Case) -> None:
    try:
        step = case.make()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{case.name}: out of memory making the inputs")
    except Exception as err:  # noqa: BLE001 - a third-party peer whose API moved
        if not case.optional:
            raise
        pytest.skip(f"optional peer {case.impl} failed: {type(err).__name__}: {err}")

    def synchronized():
        step()
        torch.cuda.synchronize()

    try:
        synchronized()  # warm-up: Triton compilation, torch.compile, cuBLAS heuristics
        benchmark.group = f"{case.op} {case.case}"
        benchmark.extra_info.update(op=case.op, case=case.case, impl=case.impl,
                                    bytes_moved=case.bytes_moved, flops=case.flops, **case.extra)
        benchmark.extra_info["peak_extra_mib"] = peak_extra_mib(step)
        benchmark(synchronized)
        stats = getattr(benchmark, "stats", None)
        median_s = stats.stats.median if stats is not None else None
        if median_s and case.bytes_moved:
            benchmark.extra_info["gb_per_s"] = case.bytes_moved / median_s / 1e9
        if median_s and case.flops:
            benchmark.extra_info["tflops"] = case.flops / median_s / 1e12
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{case.name}: out of memory")
    finally:
        step = None  # the inputs go before the next case allocates its own
        torch.cuda.empty_cache()
