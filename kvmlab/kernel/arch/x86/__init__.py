"""arch/x86/kvm: the x86 vCPU, its registers and its exits, on a Unicorn CPU."""
