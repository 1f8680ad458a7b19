"""The KVM ABI as data: ioctl numbers, constants and ctypes layouts (x86_64 by default).

`from kvmlab.uapi import *` gives what a C program gets from <linux/kvm.h> on x86_64.
"""

from kvmlab.uapi import arm64 as _arm64
from kvmlab.uapi.kvm import *  # noqa: F403
from kvmlab.uapi.x86 import *  # noqa: F403


def ioctl_name(request: int) -> str:
    """The KVM_* name of an ioctl request number (its hex value if kvmlab does not know it)."""
    return _IOCTL_NAMES.get(request & 0xFFFFFFFF, hex(request))


_IOCTL_NAMES = {
    value: name
    for name, value in sorted(globals().items())
    if name.startswith("KVM_")
    and isinstance(value, int)
    and (value >> 8) & 0xFF == 0xAE  # KVMIO in the type byte: an ioctl, not a flag or a number
    and not name.startswith(("KVM_CAP_", "KVM_EXIT_"))
}
_IOCTL_NAMES.update(_arm64.ARM64_IOCTL_NAMES)  # arm64-only ioctls, named in traces
