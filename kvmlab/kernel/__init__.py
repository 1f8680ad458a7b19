"""The simulated kvm module, named after virt/kvm/kvm_main.c and arch/x86/kvm."""
