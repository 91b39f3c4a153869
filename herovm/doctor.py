"""`herovm doctor`: what herovm found on this host, why it chose what it chose, and how to fix the rest."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
from dataclasses import dataclass

from . import accel, images, state
from .tools import which


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


def _tool(name: str, package: str, why: str) -> Check:
    path = which(name)
    if path:
        return Check(name, "ok", f"{path} ({why})")
    return Check(name, "fail", f"not found ({why})", f"apt-get install {package}  (or run scripts/setup)")


def kvm_device_access(device: str = "/dev/kvm", user: str = "libvirt-qemu") -> Check | None:
    """Whether the user QEMU runs as may open an existing /dev/kvm. Where it may not (0600 root, no udev),
    libvirt's capability probe (as root) sees KVM and its validity check (as that user) does not, so it
    re-probes QEMU on every call: each define took 60-150 s on a fresh machine. None: nothing to check."""
    try:
        st = os.stat(device)
        pw = pwd.getpwnam(user)
    except (FileNotFoundError, KeyError):
        return None
    if not stat.S_ISCHR(st.st_mode):
        return None
    groups = set(os.getgrouplist(user, pw.pw_gid))
    if st.st_uid == pw.pw_uid:
        allowed = st.st_mode & 0o600 == 0o600
    elif st.st_gid in groups:
        allowed = st.st_mode & 0o060 == 0o060
    else:
        allowed = st.st_mode & 0o006 == 0o006
    mode = f"{stat.S_IMODE(st.st_mode):04o} {_name(pwd.getpwuid, st.st_uid)}:{_name(grp.getgrgid, st.st_gid)}"
    if allowed:
        return Check("kvm device", "ok", f"{device} ({mode}) opens for {user}")
    return Check(
        "kvm device",
        "fail",
        f"{device} is {mode}: {user} (QEMU under libvirt) cannot open it, so libvirt re-probes QEMU on "
        "every call (each define takes minutes)",
        f"groupadd --system kvm; chgrp kvm {device}; chmod 0660 {device}; usermod -aG kvm {user}  "
        "(what Debian's udev rule does; scripts/setup does it)",
    )


def _name(lookup, number: int) -> str:
    try:
        return lookup(number)[0]
    except KeyError:
        return str(number)


def run_checks(uri: str | None = None) -> list[Check]:
    from .backends.libvirt import default_uri

    checks = [
        _tool("qemu-system-x86_64", "qemu-system-x86", "runs the guests"),
        _tool("qemu-img", "qemu-utils", "makes the copy-on-write disks"),
        _tool("mmdebstrap", "mmdebstrap", "builds images"),
        _tool("mkfs.ext4", "e2fsprogs", "builds images"),
        _tool("passt", "passt", "the default network mode: egress without access to this host"),
        _tool("nft", "nftables", "the default network mode: keeps guests off this host's own addresses"),
    ]
    hosts_too = uri is None  # the hosts added (herovm.hosts) are used with the default connection only
    uri = uri or default_uri()
    try:
        import libvirt

        conn = libvirt.open(uri)
        checks.append(
            Check(
                "libvirt",
                "ok",
                f"connected to {uri} (libvirt {conn.getLibVersion() // 1000000}."
                f"{conn.getLibVersion() // 1000 % 1000}, {conn.getType()})",
            )
        )
        conn.close()
    except Exception as e:  # noqa: BLE001 - any failure here is the diagnosis
        fix = (
            "start it: libvirtd -d && virtlogd -d (scripts/setup does this)"
            if uri.startswith("qemu:///system")
            else "check the URI given with --connect / HEROVM_LIBVIRT_URI"
        )
        checks.append(Check("libvirt", "fail", f"cannot connect to {uri}: {e}", fix))
    if uri.startswith("qemu:///system") and (kvm := kvm_device_access()) is not None:
        checks.append(kvm)
    choice = accel.detect()
    checks.append(
        Check(
            "accelerator",
            "ok" if choice.accel == "kvm" else "warn",
            f"{choice.accel}: {'; '.join(choice.reasons)}",
            ""
            if choice.accel == "kvm"
            else "guests run under software emulation (TCG): slower but "
            "correct; use a host with VMX/SVM for KVM",
        )
    )
    try:
        image = images.find("default")
        shared = image is not None and state.shared_images_dir() in image.path.parents
        if image is None:
            detail = "default image not built yet"
            fix = (
                "herovm image build (or the first herovm up builds it)"
                if os.geteuid() == 0
                else "only root builds images: `sudo herovm image build` once, and every user reads it"
            )
        else:
            detail = f"default/{image.id} at {image.path}" + (
                " (root's, shared with every user)" if shared else ""
            )
            fix = ""
        checks.append(Check("image", "ok" if image else "warn", detail, fix))
    except Exception as e:  # noqa: BLE001
        checks.append(Check("image", "fail", str(e)))
    ch = os.environ.get("HEROVM_CLOUD_HYPERVISOR") or shutil.which("cloud-hypervisor")
    why = []  # the backend (--backend cloud-hypervisor) runs only with both
    if not ch:
        why.append("no cloud-hypervisor binary (not packaged in Debian, not on PyPI; none on PATH)")
    if choice.accel != "kvm":
        why.append(f"it needs KVM that runs ordinary guests, and here {choice.reasons[0]}")
    checks.append(
        Check(
            "cloud-hypervisor",
            "ok" if not why else "warn",
            f"{ch}: can run guests" if not why else "cannot run here: " + "; ".join(why),
            ""
            if not why
            else "put a cloud-hypervisor release binary on PATH (or HEROVM_CLOUD_HYPERVISOR) on a host "
            "with VMX/SVM; here only the libvirt backend runs guests",
        )
    )
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid()).pw_name
        checks.append(
            Check(
                "user",
                "warn",
                f"not root ({me}): VMs run under qemu:///session as {me}; --net restricted, nat and none "
                "work, --net default needs root (its nftables rule keeps guests off this host)",
                "use --net restricted (no egress) or run as root for --net default",
            )
        )
        if choice.accel == "kvm" and (kvm := kvm_device_access(user=me)) is not None and kvm.status != "ok":
            kvm.fix = f"usermod -aG kvm {me} (then log in again), or guests run under TCG"
            checks.append(kvm)
    if hosts_too:
        checks += host_checks()
    return checks


def host_checks() -> list[Check]:
    """One line per host added with `herovm host add` (herovm.hosts): does it answer, with what."""
    from . import hosts

    added = hosts.remote_hosts()
    if not added:
        return []
    from .backends.remote import RemoteLibvirtBackend

    backends = {name: RemoteLibvirtBackend(host) for name, host in added.items()}
    try:
        facts = hosts.facts_of(backends)
    finally:
        for b in backends.values():
            b.close()
    return [
        Check(
            f"host {f.name}",
            "ok" if f.reachable else "warn",
            f"{f.uri}: {f.accel}, {f.cpus} CPUs, {(f.memory_free or 0) >> 20} MiB free, "
            f"{f.vms_running} VMs running"
            if f.reachable
            else f"{f.uri}: cannot be reached ({f.error})",
            ""
            if f.reachable
            else "check its sshd and libvirtd, and your key; `herovm host ls` (docs/hosts.md)",
        )
        for f in facts
        if f.name != hosts.LOCAL
    ]
