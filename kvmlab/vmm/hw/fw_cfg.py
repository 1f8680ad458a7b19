"""QEMU's firmware configuration device (fw_cfg), its x86 port interface at 0x510.

The guest writes a 16-bit key to the selector port (0x510), then reads the item's bytes one at
a time from the data port (0x511); reading past an item's end, or an unknown item, gives zero.
Items are numbered (FW_CFG_SIGNATURE "QEMU", FW_CFG_ID, FW_CFG_RAM_SIZE, ...) or named files
listed in the directory item FW_CFG_FILE_DIR (a big-endian count, then 64-byte entries of
size, selector and name). Numbers are little-endian; the directory is big-endian. Only the
traditional interface is offered (FW_CFG_ID bit 0): no DMA, and writes are ignored.
https://gitlab.com/qemu-project/qemu/-/blob/master/hw/nvram/fw_cfg.c
https://gitlab.com/qemu-project/qemu/-/blob/master/docs/specs/fw_cfg.rst
"""

from __future__ import annotations

import struct

from kvmlab.vmm.memory import Device

FW_CFG_IO_BASE = 0x510
FW_CFG_IO_SIZE = 2  # selector (16-bit) at +0, data (8-bit) at +1

FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MACHINE_ID = 0x06
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_MAX_FILE_PATH = 56
FW_CFG_VERSION = 0x01  # FW_CFG_ID: the traditional (port) interface; 0x02 would be DMA
FW_CFG_SIGNATURE_DATA = b"QEMU"


class FwCfgIo(Device):
    """The selector and data ports; items are added with the `fw_cfg_add_*` methods."""

    name = "fw_cfg_io"

    def __init__(self) -> None:
        self.entries: dict[int, bytes] = {}
        self.files: dict[str, bytes] = {}
        self.cur_entry = FW_CFG_SIGNATURE
        self.cur_offset = 0
        self.fw_cfg_add_bytes(FW_CFG_SIGNATURE, FW_CFG_SIGNATURE_DATA)
        self.fw_cfg_add_i32(FW_CFG_ID, FW_CFG_VERSION)
        self.fw_cfg_add_bytes(FW_CFG_FILE_DIR, struct.pack(">I", 0))

    # --- the board's side (QEMU's fw_cfg_add_*) -------------------------------------------------

    def fw_cfg_add_bytes(self, key: int, data: bytes) -> None:
        self.entries[key & ~FW_CFG_WRITE_CHANNEL] = bytes(data)

    def fw_cfg_add_i16(self, key: int, value: int) -> None:
        self.fw_cfg_add_bytes(key, struct.pack("<H", value))

    def fw_cfg_add_i32(self, key: int, value: int) -> None:
        self.fw_cfg_add_bytes(key, struct.pack("<I", value))

    def fw_cfg_add_i64(self, key: int, value: int) -> None:
        self.fw_cfg_add_bytes(key, struct.pack("<Q", value))

    def fw_cfg_add_file(self, filename: str, data: bytes) -> int:
        """Add a named item; files are kept sorted by name, selectors follow that order.
        Returns the file's selector."""
        if len(filename.encode()) >= FW_CFG_MAX_FILE_PATH:
            raise ValueError(f"fw_cfg file name too long: {filename!r}")
        if filename in self.files:
            raise ValueError(f"fw_cfg file {filename!r} already exists")
        self.files[filename] = bytes(data)
        directory = [struct.pack(">I", len(self.files))]
        for index, name in enumerate(sorted(self.files)):
            select = FW_CFG_FILE_FIRST + index
            self.entries[select] = self.files[name]
            encoded = name.encode().ljust(FW_CFG_MAX_FILE_PATH, b"\0")
            directory.append(struct.pack(">IHH", len(self.files[name]), select, 0) + encoded)
        self.fw_cfg_add_bytes(FW_CFG_FILE_DIR, b"".join(directory))
        return FW_CFG_FILE_FIRST + sorted(self.files).index(filename)

    # --- the guest's side -------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """A read of either port returns the selected item's next byte (QEMU's comb region)."""
        data = self.entries.get(self.cur_entry, b"")
        if self.cur_offset >= len(data):
            return 0
        byte = data[self.cur_offset]
        self.cur_offset += 1
        return byte

    def write(self, offset: int, size: int, value: int) -> None:
        """A 16-bit write to either port selects an item (and rewinds it); byte writes, once
        the way to write an item, are ignored (QEMU's comb region)."""
        if size == 2:
            self.fw_cfg_select(value)

    def fw_cfg_select(self, key: int) -> None:
        self.cur_entry = key & ~FW_CFG_WRITE_CHANNEL
        self.cur_offset = 0

    def reset(self) -> None:
        self.fw_cfg_select(FW_CFG_SIGNATURE)
