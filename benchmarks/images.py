"""The comparison images: herovm's `default`, a stock-style Debian `cloudinit` image and the `floor`.

All three boot the same kernel file, `herovm.images.ensure("default").kernel`. The cloud-init image installs
the very same kernel package (`linux-image-<version>` from the default image's manifest, from the same
mirror) so its modules and Debian initramfs match that kernel; the build checks that the vmlinuz it got is
byte-identical to herovm's.

Cached under `<herovm images>/.bench/<variant>-<key>/`, the key hashing the recipe below, this module's
build steps and the default kernel's sha256: a new kernel or recipe gives a new build, nothing else does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from herovm import images as herovm_images
from herovm import state

Log = Callable[[str], None]

# Bump when a build step below changes in a way the recipe does not show.
BUILD_FORMAT = 2

# A Debian cloud guest as a cloud would boot it: systemd, udev, networkd DHCP, cloud-init, sshd, and the
# stock Debian initramfs (initramfs-tools, default MODULES=most, default compression).
CLOUDINIT_RECIPE = {
    "suite": "bookworm",
    "variant": "apt",
    "packages": [
        "systemd",
        "systemd-sysv",
        "udev",
        "cloud-init",
        "openssh-server",
        "sudo",
        "python3",
        "iproute2",
        "ca-certificates",
        "kmod",
        "procps",
        "initramfs-tools",
    ],
    "path_excludes": herovm_images.load_recipe("default").get("path_excludes", []),
    "path_includes": herovm_images.load_recipe("default").get("path_includes", []),
    "root_size": "2GB",
    # Favourable to cloud-init: only the datasource it will find, so ds-identify probes nothing else.
    "cloud_cfg": "datasource_list: [ NoCloud, None ]\n",
    # Fallback DHCP for any Ethernet link; cloud-init renders its own (networkd) config first.
    "networkd": "[Match]\nName=e*\n\n[Network]\nDHCP=ipv4\n",
    "fstab": "/dev/vda / ext4 rw,discard,errors=remount-ro 0 1\n",
}

FLOOR_INIT = """#!/bin/busybox sh
# The boot floor: the kernel has reached its first user-space process. Say when, then power off.
/bin/busybox mount -t proc proc /proc
read up idle < /proc/uptime
echo "BENCH-FLOOR-INIT uptime=$up"
/bin/busybox poweroff -f
"""


@dataclass(frozen=True)
class BenchImage:
    variant: str
    path: Path
    kernel: Path
    initrd: Path
    disk: Path | None
    cmdline: str
    info: dict


def bench_dir() -> Path:
    return state.ensure_dir(state.images_dir() / ".bench", 0o755)


def _key(variant: str, recipe: object, kernel_sha: str) -> str:
    blob = json.dumps({"v": variant, "r": recipe, "k": kernel_sha, "f": BUILD_FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)
    except subprocess.CalledProcessError as e:
        tail = " | ".join((e.stderr or e.stdout or "").strip().splitlines()[-8:])
        raise RuntimeError(f"{what} failed: {tail}") from e


def _load(variant: str, path: Path, kernel: Path) -> BenchImage | None:
    """The cached image at `path`, booted with `kernel`: the default image's, whose sha256 is in the cache
    key. (The path recorded at build time goes away when that default image is pruned.)"""
    try:
        info = json.loads((path / "info.json").read_text())
    except (OSError, ValueError):
        return None
    disk = path / "base.qcow2" if info.get("disk") else None
    img = BenchImage(variant, path, kernel, path / "initrd.img", disk, info["cmdline"], info)
    if not img.kernel.is_file() or not img.initrd.is_file() or (disk is not None and not disk.is_file()):
        return None
    return img


def _publish(variant: str, key: str, work: Path, info: dict, kernel: Path) -> BenchImage:
    (work / "info.json").write_text(json.dumps(info, indent=2))
    os.chmod(work, 0o755)
    for p in work.iterdir():
        os.chmod(p, 0o644)
    final = bench_dir() / f"{variant}-{key}"
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    img = _load(variant, final, kernel)
    assert img is not None
    return img


def default_image(log: Log) -> herovm_images.Image:
    return herovm_images.ensure("default", lambda p: log(p.message))


# ---------------------------------------------------------------------------------------------- floor


def floor_image(default: herovm_images.Image, log: Log) -> BenchImage:
    """A busybox initramfs whose /init prints its uptime and powers off (busybox-static from the default
    image's own root file system, so nothing new is downloaded)."""
    kernel_sha = default.manifest["files"]["vmlinuz"]["sha256"]
    key = _key("floor", FLOOR_INIT, kernel_sha)
    with state.named_lock("bench-image-floor"):
        if img := _load("floor", bench_dir() / f"floor-{key}", default.kernel):
            return img
        log("building the floor initramfs (busybox + /init)")
        rootfs_tar = herovm_images.build_rootfs(
            "default", herovm_images.load_recipe("default"), lambda p: log(p.message)
        )
        with tarfile.open(rootfs_tar) as tar:
            member = next(m for m in tar.getmembers() if m.name.lstrip("./") == "usr/bin/busybox")
            busybox = tar.extractfile(member).read()  # type: ignore[union-attr]
        work = Path(tempfile.mkdtemp(prefix=".floor-", dir=bench_dir()))
        try:
            entries = [
                ("dev", 0o40755, b""),
                ("proc", 0o40755, b""),
                ("bin", 0o40755, b""),
                ("init", 0o100755, FLOOR_INIT.encode()),
                ("bin/busybox", 0o100755, busybox),
            ]
            (work / "initrd.img").write_bytes(herovm_images.newc_archive(entries))
            info = {
                "variant": "floor",
                "kernel": str(default.kernel),
                "kernel_version": default.manifest["kernel_version"],
                "kernel_sha256": kernel_sha,
                "cmdline": default.cmdline,
                "disk": False,
                "initrd_bytes": (work / "initrd.img").stat().st_size,
            }
            return _publish("floor", key, work, info, default.kernel)
        finally:
            shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------ cloud-init


def cloudinit_image(default: herovm_images.Image, log: Log) -> BenchImage:
    kver = default.manifest["kernel_version"]
    kernel_sha = default.manifest["files"]["vmlinuz"]["sha256"]
    recipe = {**CLOUDINIT_RECIPE, "kernel_package": f"linux-image-{kver}"}
    key = _key("cloudinit", recipe, kernel_sha)
    with state.named_lock("bench-image-cloudinit"):
        if img := _load("cloudinit", bench_dir() / f"cloudinit-{key}", default.kernel):
            return img
        work = Path(tempfile.mkdtemp(prefix=".cloudinit-", dir=bench_dir()))
        try:
            tar = work / "rootfs.tar"
            _mmdebstrap(recipe, kver, tar, log)
            root = work / "root"
            root.mkdir()
            log("unpacking the cloud-init root file system")
            _run(["tar", "-xf", str(tar), "-C", str(root), "--numeric-owner"], "unpacking")
            tar.unlink()
            vmlinuz, initrd = root / f"boot/vmlinuz-{kver}", root / f"boot/initrd.img-{kver}"
            if not vmlinuz.is_file() or herovm_images.file_sha256(vmlinuz) != kernel_sha:
                raise RuntimeError(
                    f"the cloud-init image's kernel {vmlinuz.name} is not byte-identical to the default "
                    f"image's ({default.kernel}): rebuild the default image, then run again"
                )
            if not initrd.is_file():
                raise RuntimeError(f"initramfs-tools made no {initrd.name}")
            shutil.copy2(initrd, work / "initrd.img")
            log("making the cloud-init ext4 root disk")
            raw = work / "root.ext4"
            with open(raw, "wb") as f:
                f.truncate(herovm_images.parse_size(recipe["root_size"]))
            _run(["mkfs.ext4", "-q", "-F", "-L", "bench-root", "-d", str(root), str(raw)], "mkfs.ext4")
            shutil.rmtree(root)
            _run(
                ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(work / "base.qcow2")],
                "qemu-img convert",
            )
            raw.unlink()
            info = {
                "variant": "cloudinit",
                "kernel": str(default.kernel),
                "kernel_version": kver,
                "kernel_sha256": kernel_sha,
                # The default image's command line (quiet, no legacy probing), with the root it needs.
                "cmdline": default.cmdline,
                "disk": True,
                "packages": recipe["packages"] + [recipe["kernel_package"]],
                "initrd_bytes": (work / "initrd.img").stat().st_size,
                "disk_bytes": (work / "base.qcow2").stat().st_size,
            }
            return _publish("cloudinit", key, work, info, default.kernel)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _mmdebstrap(recipe: dict, kver: str, out: Path, log: Log) -> None:
    mirror = herovm_images.host_apt_mirror(recipe["suite"])
    log(f"building the cloud-init root file system with mmdebstrap (Debian {recipe['suite']}; minutes)")
    cfg = recipe["cloud_cfg"].replace("'", "'\\''")
    net = recipe["networkd"].replace("'", "'\\''")
    fstab = recipe["fstab"].replace("'", "'\\''")
    hooks = [
        'rm -f "$1"/etc/ssh/ssh_host_*',  # each VM gets its own host key (from the user-data here)
        'rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/log/*.log',
        'echo bench-cloudinit > "$1"/etc/hostname',
        f"printf '%s' '{cfg}' > \"$1\"/etc/cloud/cloud.cfg.d/90-bench.cfg",
        f"printf '%s' '{net}' > \"$1\"/etc/systemd/network/99-bench-dhcp.network",
        f"printf '%s' '{fstab}' > \"$1\"/etc/fstab",
        'chroot "$1" systemctl enable systemd-networkd.service',
        f'[ -e "$1"/boot/initrd.img-{kver} ] || chroot "$1" update-initramfs -c -k {kver}',
        ': > "$1"/etc/machine-id',  # first boot, as in a cloud image
    ]
    cmd = [
        "mmdebstrap",
        f"--variant={recipe['variant']}",
        f"--include={','.join(recipe['packages'] + [recipe['kernel_package']])}",
    ]
    cmd += [f"--dpkgopt=path-exclude={p}" for p in recipe["path_excludes"]]
    cmd += [f"--dpkgopt=path-include={p}" for p in recipe["path_includes"]]
    cmd += [f"--customize-hook={h}" for h in hooks]
    cmd += [recipe["suite"], str(out), mirror]
    _run(cmd, "mmdebstrap (cloud-init image)")
