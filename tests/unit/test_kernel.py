"""herovm.kernel: the vmlinux Cloud Hypervisor boots, unpacked from the image's bzImage once."""

from __future__ import annotations

import os
import struct

import pytest

from herovm import images, kernel
from herovm.errors import ImageError


def _cached_image() -> images.Image | None:
    """The default image as the recipe is now; else any cached default image (the kernel does not depend
    on the agent sources that make the image id)."""
    try:
        image = images.find("default")
    except Exception:  # noqa: BLE001 - no recipe or cache here
        return None
    if image is None:
        cached = [i for i in images.list_images() if i.recipe == "default"]
        image = max(cached, key=lambda i: i.kernel.stat().st_mtime, default=None)
    return image


def test_the_real_image_kernel_unpacks_to_a_pvh_elf() -> None:
    image = _cached_image()
    if image is None:
        pytest.skip("no default image is cached here (herovm image build makes one)")
    if not os.access(image.path, os.W_OK):
        pytest.skip(f"{image.path} is not writable by this user: the vmlinux cannot be cached there")
    path = kernel.ensure_vmlinux(image)
    assert path == image.path / "vmlinux"
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2  # ELF64
    assert kernel.pvh_entry(data) > 0  # XEN_ELFNOTE_PHYS32_ENTRY (18)
    mtime = path.stat().st_mtime_ns
    assert kernel.ensure_vmlinux(image.kernel) == path and path.stat().st_mtime_ns == mtime  # cached


def _elf(notes: bytes) -> bytes:
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 120, 0, 0, len(notes), len(notes), 4)  # PT_NOTE
    return bytes(header) + phdr + notes


def _note(name: bytes, kind: int, desc: bytes) -> bytes:
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), kind) + pad(name) + pad(desc)


def test_pvh_note_is_found_among_others() -> None:
    notes = _note(b"GNU\0", 3, b"\1" * 20) + _note(b"Xen\0", 18, struct.pack("<I", 0x1000850))
    assert kernel.pvh_entry(_elf(notes)) == 0x1000850
    with pytest.raises(ImageError, match="no PVH entry note"):
        kernel.pvh_entry(_elf(_note(b"Xen\0", 17, b"\0" * 4)))
    with pytest.raises(ImageError, match="not a 64-bit"):
        kernel.pvh_entry(b"MZ" + b"\0" * 100)


def test_bad_bzimages_are_refused_clearly() -> None:
    with pytest.raises(ImageError, match="not a bzImage"):
        kernel.extract_vmlinux(b"\0" * 4096)
    bz = bytearray(8192)
    bz[0x1F1] = 1
    bz[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", bz, 0x248, 0, 100)
    bz[1024:1028] = b"\x1f\x8b\x08\x00"  # gzip
    with pytest.raises(ImageError, match="not LZ4"):
        kernel.extract_vmlinux(bytes(bz))
    bz[1024:1028] = kernel.LZ4_LEGACY_MAGIC
    struct.pack_into("<I", bz, 1028, 50)
    bz[1032:1082] = b"\xff" * 50  # not LZ4 data
    with pytest.raises(ImageError, match="damaged"):
        kernel.extract_vmlinux(bytes(bz))
