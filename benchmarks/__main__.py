"""Run every benchmark: `python -m benchmarks [--json PATH]` (or `make bench`).

Each figure is printed as it is measured, then all of them with their targets (met / not met),
and written as JSON to PATH (default benchmarks/results.json).
"""

import argparse
from pathlib import Path

from benchmarks import boot, kvm_run, lifetimes, startup, vmm, workbench
from benchmarks.results import summary, write_json

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    default = Path(__file__).with_name("results.json")
    parser.add_argument("--json", type=Path, default=default, help=f"default: {default}")
    args = parser.parse_args()
    figures = startup.main()
    figures += kvm_run.main()
    figures += lifetimes.main()
    figures += vmm.main()
    figures += boot.main()
    figures += workbench.main()
    print("\nSummary")
    print(summary(figures))
    write_json(figures, args.json)
    print(f"written to {args.json}")
