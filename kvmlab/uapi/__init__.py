"""The KVM ABI as data: ioctl numbers, constants and ctypes layouts (x86_64 by default).

`from kvmlab.uapi import *` gives what a C program gets from <linux/kvm.h> on x86_64.
"""

from kvmlab.uapi.kvm import *  # noqa: F403
from kvmlab.uapi.x86 import *  # noqa: F403
