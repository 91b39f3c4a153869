"""The guest kernel as Cloud Hypervisor boots it: an uncompressed vmlinux ELF with a PVH entry note.

Our images carry Debian's bzImage (`vmlinuz`). Cloud Hypervisor's direct kernel boot has always taken an
ELF vmlinux with a PVH note (XEN_ELFNOTE_PHYS32_ENTRY); bzImage direct boot was removed in 2021 and only
came back in 2024 (the 32-bit boot protocol), so the vmlinux works with every release. `ensure_vmlinux`
extracts it once per image, beside the bzImage, and checks it before anyone boots it.

The bzImage's setup header says where its compressed payload is (payload_offset at 0x248 and
payload_length at 0x24c, relative to the start of the protected-mode code). Debian compresses it with LZ4 in
the legacy frame format (magic 02 21 4c 18, then blocks of at most 8 MiB each behind their 4-byte size; the
kernel build appends the uncompressed size as 4 more bytes). The blocks are decompressed with the `lz4`
package's block API: an exact parse of the frame, in-process, with no host tool to install.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

from .errors import ImageError

LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
LZ4_LEGACY_BLOCK = 8 << 20
XEN_ELFNOTE_PHYS32_ENTRY = 18
VMLINUX = "vmlinux"


def ensure_vmlinux(image: object) -> Path:
    """The PVH vmlinux of an image (an `images.Image`, or the path of its bzImage), extracted once."""
    bzimage = Path(getattr(image, "kernel", image))  # type: ignore[arg-type]
    out = bzimage.parent / VMLINUX
    if out.is_file() and out.stat().st_mtime >= bzimage.stat().st_mtime:
        try:
            pvh_entry(out.read_bytes())
            return out
        except ImageError:
            pass  # damaged: extract it again
    data = extract_vmlinux(bzimage.read_bytes())
    pvh_entry(data)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".vmlinux.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)  # atomic: two herovm processes may extract at once
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def extract_vmlinux(bzimage: bytes) -> bytes:
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise ImageError("the kernel is not a bzImage (no HdrS setup header)")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    if len(payload) != length or length == 0:
        raise ImageError("the bzImage's payload_offset/payload_length point outside the file")
    if payload[:4] != LZ4_LEGACY_MAGIC:
        raise ImageError(
            f"the bzImage payload is not LZ4 (magic {payload[:4].hex()}); only LZ4 kernels are unpacked",
            hint="use a kernel built with CONFIG_KERNEL_LZ4, as Debian's is",
        )
    return lz4_legacy_decompress(payload)


def lz4_legacy_decompress(frame: bytes) -> bytes:
    import lz4.block

    out = bytearray()
    pos = 4
    while pos + 4 <= len(frame):
        (size,) = struct.unpack_from("<I", frame, pos)
        if pos + 4 + size > len(frame) or size == 0:
            break  # the trailing uncompressed size, or the end
        if frame[pos : pos + 4] == LZ4_LEGACY_MAGIC:  # a second legacy frame follows (concatenated)
            pos += 4
            continue
        try:
            out += lz4.block.decompress(frame[pos + 4 : pos + 4 + size], uncompressed_size=LZ4_LEGACY_BLOCK)
        except lz4.block.LZ4BlockError as e:
            raise ImageError(f"the kernel's LZ4 payload is damaged at byte {pos}: {e}") from e
        pos += 4 + size
    if not out:
        raise ImageError("the kernel's LZ4 payload holds no data")
    return bytes(out)


def pvh_entry(elf: bytes) -> int:
    """The PVH entry point of a 64-bit little-endian ELF (ImageError if it is no such ELF, or has none)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ImageError("the extracted kernel is not a 64-bit little-endian ELF")
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, kind = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            desc = pos + 12 + (namesz + 3) // 4 * 4
            if name == b"Xen" and kind == XEN_ELFNOTE_PHYS32_ENTRY and descsz >= 4:
                return struct.unpack_from("<I", elf, desc)[0]
            pos = desc + (descsz + 3) // 4 * 4
    raise ImageError(
        "the kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): Cloud Hypervisor cannot boot it",
        hint="use a kernel built with CONFIG_PVH=y, as Debian's is",
    )
