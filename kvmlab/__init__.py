"""kvmlab: Linux KVM you can run, step and watch, on a simulated /dev/kvm over Unicorn."""

__version__ = "0.1.0"
