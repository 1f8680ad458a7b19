"""The ioctl request encoding of <asm-generic/ioctl.h>: direction, size, type and number in one int.

The numbers in `kvmlab.uapi.kvm` are built from these helpers, never typed in as hex, so a wrong
struct size shows up as a wrong request number in the ABI test.
"""

from __future__ import annotations

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:  # noqa: N802 (kernel name)
    """Pack an ioctl request number exactly as the kernel macro does."""
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:  # noqa: N802
    """A request with no argument struct (the argument, if any, is a plain value)."""
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, size: int) -> int:  # noqa: N802
    """A request whose struct the kernel writes back to userspace."""
    return _IOC(_IOC_READ, type_, nr, size)


def _IOW(type_: int, nr: int, size: int) -> int:  # noqa: N802
    """A request whose struct userspace passes in."""
    return _IOC(_IOC_WRITE, type_, nr, size)


def _IOWR(type_: int, nr: int, size: int) -> int:  # noqa: N802
    """A request whose struct goes both ways."""
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, size)


def _IOC_DIR(request: int) -> int:  # noqa: N802
    return (request >> _IOC_DIRSHIFT) & ((1 << _IOC_DIRBITS) - 1)


def _IOC_TYPE(request: int) -> int:  # noqa: N802
    return (request >> _IOC_TYPESHIFT) & ((1 << _IOC_TYPEBITS) - 1)


def _IOC_NR(request: int) -> int:  # noqa: N802
    return (request >> _IOC_NRSHIFT) & ((1 << _IOC_NRBITS) - 1)


def _IOC_SIZE(request: int) -> int:  # noqa: N802
    return (request >> _IOC_SIZESHIFT) & ((1 << _IOC_SIZEBITS) - 1)
