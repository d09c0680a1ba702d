"""Run every benchmark script and print one table: ``python -m benchmarks [--smoke] [names...]``.

Without CUDA only ``--smoke`` makes sense (tiny shapes on the CPU, checks the scripts run); the real
mode needs a GPU and writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import torch

from benchmarks.common import print_table, save_results

# CPU benchmarks with their own command line (one process per case, 2 threads), not GPU cases:
# run them as ``python -m benchmarks.<name>``
CPU_ONLY = ("bench_cpu_native",)


def discover() -> list[str]:
    import benchmarks

    return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__)
                  if m.name.startswith("bench_") and m.name not in CPU_ONLY)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help="bench_* modules to run (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes, no result files")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("No CUDA device: the benchmarks time GPU kernels. Use --smoke to check the scripts "
              "on the CPU.", file=sys.stderr)
        return 2
    names = args.names or discover()
    all_rows = []
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        rows = module.run(smoke=args.smoke)
        if not args.smoke:
            path = save_results(name.removeprefix("bench_"), rows)
            print(f"[{name}] wrote {path}")
        all_rows.extend(rows)
    print_table(all_rows, smoke=args.smoke)
    return 0


if __name__ == "__main__":
    from rlhf.cli import quiet_broken_pipe

    raise SystemExit(quiet_broken_pipe(main))
