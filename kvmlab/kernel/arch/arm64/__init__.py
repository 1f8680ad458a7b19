"""arch/arm64/kvm for the simulator: an AArch64 vCPU on Unicorn, with upstream arm64 KVM rules.

Modules follow Linux's files: `arm` (arm.c: VM and vCPU ioctls, KVM_ARM_VCPU_INIT, the
KVM_RUN loop), `guest` (guest.c: ONE_REG and the register list), `reset` (reset.c), `psci`
(psci.c and hypercalls.c), `mmio` (mmio.c), `handle_exit` (handle_exit.c), `emulate`
(kvm_emulate.h: register accessors) and `hyp`, the part hardware and EL2 play: Unicorn.
"""
