"""Run every benchmark: `python -m benchmarks` (or `make bench`)."""

from benchmarks import boot, kvm_run, lifetimes, vmm, workbench

if __name__ == "__main__":
    kvm_run.main()
    lifetimes.main()
    vmm.main()
    boot.main()
    workbench.main()
