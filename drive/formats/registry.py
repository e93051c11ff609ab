"""The export formats by name: each builds a ``VirtualImage`` of a block source
(``catalog.read.source.MappedSource``). Owns the names; must not lay out any format itself."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from catalog.read.source import MappedSource
from drive.formats.image import VirtualImage

# name -> (module in this package, function, what it is). Imported on use.
FORMATS: dict[str, tuple[str, str, str]] = {
    "raw": ("image", "raw_image", "the disk itself (holes kept)"),
    "qcow2": ("qcow2", "qcow2_image", "qcow2 version 3, 64 KiB clusters"),
    "vhd": ("vhd", "vhd_dynamic_image", "VHD, dynamic (sparse), 2 MiB blocks"),
    "vhd-fixed": ("vhd", "vhd_fixed_image", "VHD, fixed (the disk plus a footer)"),
    "vhdx": ("vhdx", "vhdx_image", "VHDX, dynamic, 32 MiB blocks"),
    "vmdk": ("vmdk", "vmdk_image", "VMDK, monolithicSparse, 64 KiB grains"),
    # vmdk_stream_image (streamOptimized) is not offered: laid out as a VirtualImage it must
    # know every compressed grain's length first, so it reads the data twice. A sequential
    # writer (grain directory at the end, as the format allows) would not.
}
# qemu-img's name of each format (for its -f option).
QEMU_NAMES = {
    "raw": "raw",
    "vhd": "vpc",
    "vhd-fixed": "vpc",
    "vhdx": "vhdx",
    "vmdk": "vmdk",
    "qcow2": "qcow2",
}


def builder(name: str) -> Callable[[MappedSource], VirtualImage]:
    module, function, _about = FORMATS[name]
    built: Callable[[MappedSource], VirtualImage] = getattr(
        importlib.import_module(f"drive.formats.{module}"), function
    )
    return built
