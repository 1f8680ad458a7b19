"""Per-architecture halves of the simulated kernel (arch/x86/kvm, arch/arm64/kvm)."""
