"""A libvirt host reached over SSH (herovm.hosts): the libvirt backend, with the VM's files in a storage pool
on that host and its guest reached through libvirt and an SSH tunnel.

What a local VM keeps in its directory lies, for a VM on another host, in herovm's storage pool there (a
directory pool, `herovm`), put there through libvirt's storage API (never scp):

- the image's kernel, initrd and base disk: volumes `img.<image id>.<file>`, uploaded once per host and
  checked: the upload is read back and its sha256 compared with the one the image's manifest records before
  a `.sha256` volume records it, so an upload cut short is never taken for a whole one;
- the VM's overlay (`vm.<name>.disk.qcow2`, made there by libvirt on the base), its config drive (uploaded
  at each start), its console log and its agent socket (`vm.<name>.*`).
- a template's copy: its saved memory and its disk (`tpl.<name>-<hex>.memory.save`, `.disk.qcow2`), and
  while a clone of it is restored, the copy of the save image it restores from (`vm.<name>.restore.save`).

The VM's keys, token and record stay in its local directory. The guest is reached as a local one is, but
through the host: the agent's channel through libvirt's own stream to it (virDomainOpenChannel), port 22
through an SSH tunnel (paramiko, direct-tcpip to the host's 127.0.0.1:PORT), with the key and pinned host
key of the libvirt connection. A host that stops answering fails calls after libvirt's keepalive (a few
seconds), not at TCP's timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

import libvirt

from .. import disks, state
from ..errors import AlreadyExists, BackendUnavailable, HeroVMError, Unsupported
from ..progress import Progress, Reporter, silent
from ..protocol import AGENT_PORT_NAME
from .base import MachineSpec, SavedState
from .libvirt import LibvirtBackend, _cloned_xml, _wrap, render_domain_xml
from .save_image import HEADER, MAX_DATA, SaveImage

if TYPE_CHECKING:
    import paramiko

    from ..hosts import Host

POOL = "herovm"
KEEPALIVE = (2, 3)  # libvirt's keepalive: a probe every 2 s, the connection dead after 3 unanswered
CHUNK = 1 << 20

_loop_started = False
_loop_lock = threading.Lock()


def _event_loop() -> None:
    """libvirt's default event loop in a thread of its own: keepalives need one."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


def _in_thread(call: Callable[[], Any], timeout: float, what: str) -> Any:
    """`call()` in a daemon thread, waited for at most `timeout` seconds: TimeoutError after that (the
    thread is left behind: a libvirt call to a host that went away returns only when libvirt gives up)."""
    from ..hosts import at_once

    result = at_once({what: call}, timeout)[what]
    if isinstance(result, TimeoutError):
        raise TimeoutError(f"{what}: {result}")
    if isinstance(result, BaseException):
        raise result
    return result


def _image_volume(local: Path) -> str:
    """The volume a file of a cached image becomes on a host: `img.<image id>.<file>`."""
    name = f"img.{local.parent.name}.{local.name}"
    if not all(c.isalnum() or c in "._-" for c in name):
        raise HeroVMError(f"unexpected image file name {local}")
    return name


def _vm_prefix(name: str) -> str:
    return f"vm.{name}."  # VM names hold no dot, so no VM's prefix is another's


def _volume_xml(name: str, size: int, fmt: str, base: Path | None = None) -> str:
    """A volume of herovm's pool (0600), in format `fmt`; with `base`, a qcow2 overlay on that path there."""
    below = (
        f"<backingStore><path>{escape(str(base))}</path><format type='qcow2'/></backingStore>" if base else ""
    )
    return (
        f"<volume><name>{name}</name><capacity unit='bytes'>{size}</capacity><target>"
        f"<format type='{fmt}'/><permissions><mode>0600</mode></permissions></target>{below}</volume>"
    )


def _template_prefix(tag: str) -> str:
    return f"tpl.{tag}."


def _template_tag(memory: Path) -> str:
    """The tag of a template's memory volume (`tpl.<tag>.memory.save`)."""
    parts = memory.name.split(".")
    if len(parts) != 4 or parts[0] != "tpl" or parts[2:] != ["memory", "save"]:
        raise HeroVMError(f"{memory} is not a template's memory on another host")
    return parts[1]


def _virtual_size(qcow2: Path) -> int:
    """A qcow2 file's virtual size, from its header (bytes 24-31, big-endian)."""
    with open(qcow2, "rb") as f:
        header = f.read(32)
    if len(header) < 32 or header[:4] != b"QFI\xfb":
        raise HeroVMError(f"{qcow2} is not a qcow2 file")
    return struct.unpack(">Q", header[24:32])[0]


def _digest(local: Path) -> str:
    """The sha256 of a file of a cached image, as its manifest records it (herovm.images hashes each file
    when it builds the image); a file no manifest names is hashed here."""
    from ..images import file_sha256

    try:
        manifest = json.loads((local.parent / "manifest.json").read_text())
        recorded = manifest["files"][local.name]["sha256"]
        if isinstance(recorded, str) and len(recorded) == 64:
            return recorded
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return file_sha256(local)


def bridge(
    read: Callable[[], bytes], write: Callable[[bytes], None], close: Callable[[], None], what: str
) -> socket.socket:
    """A socket whose peer is pumped to and from another stream (`read` returns b"" at its end), by two
    threads; closing either side ends both. How a tunnelled or libvirt stream becomes the socket callers of
    a GuestConnector expect."""
    outer, inner = socket.socketpair()
    done = threading.Event()

    def finish() -> None:
        if not done.is_set():
            done.set()
            with contextlib.suppress(Exception):
                close()
            with contextlib.suppress(OSError):
                inner.shutdown(socket.SHUT_RDWR)
            inner.close()

    def inward() -> None:
        try:
            while data := read():
                inner.sendall(data)
        except Exception:  # noqa: BLE001, S110 - either end going away ends the bridge
            pass
        finish()

    def outward() -> None:
        try:
            while data := inner.recv(CHUNK):
                write(data)
        except Exception:  # noqa: BLE001, S110
            pass
        finish()

    threading.Thread(target=inward, name=f"{what}-in", daemon=True).start()
    threading.Thread(target=outward, name=f"{what}-out", daemon=True).start()
    return outer


class RemoteLibvirtBackend(LibvirtBackend):
    """The libvirt backend on another host (see the module's docstring). Templates are kept there as
    volumes (freeze_template, clone); snapshots, fork and published ports stay on the local host: each
    raises Unsupported here."""

    def __init__(self, host: Host, timeout: float | None = None) -> None:
        super().__init__(host.libvirt_uri())
        self.host = host
        from ..hosts import answer_timeout

        self.timeout = timeout if timeout is not None else answer_timeout()
        self._ssh: paramiko.SSHClient | None = None
        self._ssh_lock = threading.Lock()
        self._checked: set[str] = set()  # image volumes found whole on the host by this process

    # ------------------------------------------------------------------------------- connections

    def _open(self) -> libvirt.virConnect:
        _event_loop()
        try:
            conn = _in_thread(lambda: libvirt.open(self.uri), self.timeout, f"connect-{self.host.name}")
            conn.setKeepAlive(*KEEPALIVE)
            return conn
        except TimeoutError as e:
            raise self._unreachable(f"no answer in {self.timeout:g}s") from e
        except libvirt.libvirtError as e:
            raise self._unreachable(e.get_error_message()) from e

    def _unreachable(self, why: str) -> BackendUnavailable:
        return BackendUnavailable(
            f"host {self.host.name} ({self.host.uri}) cannot be reached: {why}",
            hint="see `herovm host ls`; VMs on other hosts are not affected",
        )

    def close(self) -> None:
        super().close()
        with self._ssh_lock:
            if self._ssh is not None:
                self._ssh.close()
                self._ssh = None

    def ssh(self) -> paramiko.SSHClient:
        """The SSH connection beside libvirt's (made at first use, again if it dropped): same user, key and
        pinned host key (its known_hosts file; an unknown or changed key is refused)."""
        import paramiko

        from ..hosts import known_hosts_file

        with self._ssh_lock:
            transport = self._ssh.get_transport() if self._ssh is not None else None
            if self._ssh is not None and transport is not None and transport.is_active():
                return self._ssh
            user, address, port, _ = self.host.address
            client = paramiko.SSHClient()
            client.load_host_keys(str(known_hosts_file(self.host.name)))
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            try:
                sock = socket.create_connection((address, port), timeout=self.timeout)
                # paramiko's keepalive never waits for an answer: a host that went away would keep the
                # transport "active" for minutes (TCP's retransmissions); this ends it in ~8 s
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 8000)
                client.connect(
                    address,
                    port,
                    username=user,
                    key_filename=self.host.identity,
                    sock=sock,
                    look_for_keys=False,
                    allow_agent=False,
                    timeout=self.timeout,
                    banner_timeout=self.timeout,
                    auth_timeout=self.timeout,
                )
            except (OSError, paramiko.SSHException) as e:
                client.close()
                raise self._unreachable(f"SSH: {e or type(e).__name__}") from e
            transport = client.get_transport()
            assert transport is not None
            transport.set_keepalive(KEEPALIVE[0])
            # a refused tunnel is an answer here (port_in_use: the port is free), not an error to print
            logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)
            self._ssh = client
            return client

    def default_pool_path(self) -> str:
        """herovm's pool directory on the host (herovm.hosts.default_pool), the remote home asked over SSH."""
        from ..hosts import default_pool

        path = self.host.address[3]
        if path == "/system":
            return default_pool(path, None)
        _, stdout, _ = self.ssh().exec_command('printf %s "$HOME"', timeout=self.timeout)
        return default_pool(path, stdout.read(4096).decode(errors="replace").strip())

    # ------------------------------------------------------------------------------------ the pool

    def ensure_pool(self) -> libvirt.virStoragePool:
        """herovm's directory pool on the host, defined, built and started if it is not (0711: traversable,
        not listable; its volumes are 0600)."""
        try:
            pool = self.conn.storagePoolLookupByName(POOL)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise _wrap(e, f"looking up the pool on {self.host.name}") from e
            if not self.host.pool:
                raise HeroVMError(f"host {self.host.name} has no pool directory recorded") from e
            xml = (
                f"<pool type='dir'><name>{POOL}</name><target><path>{escape(self.host.pool)}</path>"
                "<permissions><mode>0711</mode></permissions></target></pool>"
            )
            try:
                pool = self.conn.storagePoolDefineXML(xml, 0)
                pool.build(0)
                pool.setAutostart(1)
            except libvirt.libvirtError as e2:
                raise _wrap(e2, f"making herovm's pool on {self.host.name}") from e2
        try:
            if not pool.isActive():
                pool.create(0)
        except libvirt.libvirtError as e:
            raise _wrap(e, f"starting herovm's pool on {self.host.name}") from e
        return pool

    def _pool(self, refresh: bool = False) -> libvirt.virStoragePool:
        pool = self.ensure_pool()
        if refresh:
            with contextlib.suppress(libvirt.libvirtError):
                pool.refresh(0)
        return pool

    def _pool_path(self, volume: str) -> Path:
        assert self.host.pool
        return Path(self.host.pool) / volume

    def _volume(self, pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
        try:
            return pool.storageVolLookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise _wrap(e, f"looking up {name} on {self.host.name}") from e

    def _delete(self, pool: libvirt.virStoragePool, name: str) -> None:
        vol = self._volume(pool, name)
        if vol is not None:
            with contextlib.suppress(libvirt.libvirtError):
                vol.delete(0)

    def _create(
        self, pool: libvirt.virStoragePool, name: str, size: int, base: Path | None = None
    ) -> libvirt.virStorageVol:
        """A new volume (0600): raw, to be uploaded; or with `base`, a qcow2 overlay on that path there."""
        xml = _volume_xml(name, size, "raw" if base is None else "qcow2", base)
        try:
            return pool.createXML(xml, 0)
        except libvirt.libvirtError as e:
            raise _wrap(e, f"making {name} on {self.host.name}") from e

    def _upload(
        self, vol: libvirt.virStorageVol, data: Callable[[int], bytes], size: int, offset: int = 0
    ) -> None:
        stream = self.conn.newStream(0)
        try:
            vol.upload(stream, offset, size, 0)
            while chunk := data(CHUNK):
                view = memoryview(chunk)
                while view:
                    sent = stream.send(bytes(view[: 256 << 10]))
                    view = view[sent:]
            stream.finish()
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise

    def _download(self, vol: libvirt.virStorageVol, sink: Callable[[bytes], None], size: int = 0) -> None:
        stream = self.conn.newStream(0)
        try:
            vol.download(stream, 0, size, 0)
            while True:
                data = stream.recv(CHUNK)
                if not data or not isinstance(data, bytes):
                    break
                sink(data)
            stream.finish()
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise

    def image_volume(self, local: Path, progress: Reporter = silent) -> Path:
        """The path on the host of the volume holding the image file `local`, uploaded first unless a
        checked copy is there (its `.sha256` volume says the sha256 of this file)."""
        name = _image_volume(local)
        if name in self._checked:  # `up` prepares before it defines, and define makes sure again
            return self._pool_path(name)
        digest = _digest(local)
        size = local.stat().st_size
        with state.named_lock(f"upload-{self.host.name}", what=f"an upload to {self.host.name}"):
            pool = self._pool(refresh=True)
            vol, mark = self._volume(pool, name), self._volume(pool, f"{name}.sha256")
            if vol is not None and mark is not None and self._read_small(mark) == digest:
                self._checked.add(name)
                return self._pool_path(name)
            for stale in (name, f"{name}.sha256"):
                self._delete(pool, stale)
            progress(Progress("upload", f"uploading {local.name} ({size >> 20} MiB) to {self.host.name}"))
            t0 = time.monotonic()
            try:
                vol = self._create(pool, name, size)
                with open(local, "rb") as f:
                    self._upload(vol, f.read, size)
                h = hashlib.sha256()
                self._download(vol, h.update, size)
                if h.hexdigest() != digest:
                    raise HeroVMError(
                        f"{name} on {self.host.name} does not read back with the sha256 its image records",
                        hint="check the local image (`herovm image build --force` rebuilds it), then retry",
                    )
                text = digest.encode()
                mark = self._create(pool, f"{name}.sha256", len(text))
                self._upload(mark, _reader(text), len(text))
            except BaseException:
                for stale in (name, f"{name}.sha256"):
                    with contextlib.suppress(HeroVMError, libvirt.libvirtError):
                        self._delete(pool, stale)
                raise
            progress(
                Progress(
                    "upload", f"{local.name} is on {self.host.name}, checked ({time.monotonic() - t0:.1f}s)"
                )
            )
            self._checked.add(name)
            return self._pool_path(name)

    def _read_small(self, vol: libvirt.virStorageVol, limit: int = 4096) -> str:
        got = bytearray()
        try:
            self._download(vol, got.extend)
        except libvirt.libvirtError:
            return ""
        return bytes(got[:limit]).decode(errors="replace").strip()

    def images(self) -> list[str]:
        """The image ids whose base disk is on this host, checked."""
        names = self._pool(refresh=True).listVolumes()
        marked = {n.split(".")[1] for n in names if n.startswith("img.") and n.endswith(".base.qcow2.sha256")}
        return sorted(marked)

    def prune_images(self) -> list[str]:
        """Remove the image volumes (`img.ID.*`) of every image no machine on this host lies on (any herovm
        home's: their records name their image); returns the volumes removed. Under this home's upload lock:
        an `up` of this home between its upload and its define is not robbed of its image."""
        from ..record import VMRecord

        with state.named_lock(f"upload-{self.host.name}", what=f"an upload to {self.host.name}"):
            used = {VMRecord.from_json(m.name, m.metadata).image_id for m in self.list()}
            pool = self._pool(refresh=True)
            removed = []
            for volume in sorted(pool.listVolumes()):
                if volume.startswith("img.") and volume.split(".")[1] not in used:
                    self._delete(pool, volume)
                    removed.append(volume)
            return removed

    def prepare(self, spec: MachineSpec, progress: Reporter = silent) -> None:
        """Put the image files `spec` boots from on the host (uploaded once: `image_volume`)."""
        base = disks.backing_file(spec.disk)
        for local in (spec.kernel, spec.initrd, *([base] if base else [])):
            self.image_volume(local, progress)

    # ------------------------------------------------------------------------------- the machine

    def node_facts(self) -> dict[str, Any]:
        try:
            info = self.conn.getInfo()
            free = self.conn.getFreeMemory()
        except libvirt.libvirtError as e:
            raise _wrap(e, f"asking {self.host.name} about itself") from e
        return {"cpus": info[2], "memory_free": free, "images": self.images()}

    def accel(self) -> str:
        """kvm where the host's libvirt offers it, else tcg. (A PVM host offers /dev/kvm that ordinary
        kernels hang on: `host add --accel tcg` for such a host; docs/hosts.md.)"""
        try:
            self.conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
            return "kvm"
        except libvirt.libvirtError:
            return "tcg"

    def define(self, spec: MachineSpec) -> None:
        if spec.ram_file is not None:
            raise Unsupported(
                f"a template's memory file is made on the local host only, not on {self.host.name}"
            )
        base = disks.backing_file(spec.disk)
        if base is None:
            raise HeroVMError(f"{spec.disk} has no base image")
        self._define(spec, self._pool_path(_image_volume(base)))

    def _define(self, spec: MachineSpec, base: Path) -> MachineSpec:
        """Define `spec` on the host, its disk a new overlay volume on `base` (a path there); returns the
        spec as the host sees it (its files' paths there)."""
        self.prepare(spec)  # already there when Manager.up prepared it (with progress)
        pool = self._pool(refresh=True)
        prefix = _vm_prefix(spec.name)
        for old in pool.listVolumes():  # a killed run's, of a VM of this name that no longer exists
            if old.startswith(prefix) and self._lookup(spec.name) is None:
                self._delete(pool, old)
        disk = f"{prefix}disk.qcow2"
        self._create(pool, disk, _virtual_size(spec.disk), base)
        from dataclasses import replace

        remote = replace(
            spec,
            kernel=self._pool_path(_image_volume(spec.kernel)),
            initrd=self._pool_path(_image_volume(spec.initrd)),
            disk=self._pool_path(disk),
            drive=self._pool_path(f"{prefix}drive.iso"),
            console_log=self._pool_path(f"{prefix}console.log"),
            channel=self._pool_path(f"{prefix}agent"),
            net_dir=None,
        )
        if len(str(remote.channel).encode()) > 107:
            self._delete(pool, disk)
            raise HeroVMError(
                f"the agent socket path on {self.host.name} would be too long ({remote.channel})",
                hint="add the host again with a shorter --pool",
            )
        try:
            super().define(remote)
        except BaseException:
            self._delete(pool, disk)
            raise
        return remote

    def start(self, name: str) -> None:
        """Upload the config drive this boot reads (the local VM directory's, just written), then start."""
        self._upload_drive(name)
        super().start(name)

    def _upload_drive(self, name: str) -> None:
        pool = self._pool()
        volume = f"{_vm_prefix(name)}drive.iso"
        self._delete(pool, volume)
        data = state.VMDir(name).drive.read_bytes()
        self._upload(self._create(pool, volume, len(data)), _reader(data), len(data))

    def undefine(self, name: str) -> None:
        super().undefine(name)
        pool = self._pool(refresh=True)
        for volume in pool.listVolumes():
            if volume.startswith(_vm_prefix(name)):
                self._delete(pool, volume)

    def copy_console(self, name: str, dest: Path) -> None:
        """Copy the VM's console log from the host to `dest` (0600), where status, logs and boot read it."""
        pool = self._pool(refresh=True)
        vol = self._volume(pool, f"{_vm_prefix(name)}console.log")
        if vol is None:
            return
        got = bytearray()
        self._download(vol, got.extend)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(got)
        tmp.replace(dest)

    # ----------------------------------------------------------------------------- the guest

    def _agent_stream(self, name: str, deadline: float) -> socket.socket:
        """The agent's channel through libvirt's stream to it (virDomainOpenChannel), as a socket."""
        while True:
            stream = None
            try:
                dom = self._require(name)
                stream = self.conn.newStream(0)
                dom.openChannel(AGENT_PORT_NAME, stream, 0)
                break
            except libvirt.libvirtError as e:
                if stream is not None:
                    with contextlib.suppress(libvirt.libvirtError):
                        stream.abort()
                if time.monotonic() >= deadline or not self._running(name):
                    raise TimeoutError(
                        f"the agent channel of {name} did not open: {e.get_error_message()}"
                    ) from e
                time.sleep(0.1)

        def read() -> bytes:
            data = stream.recv(CHUNK)
            return data if isinstance(data, bytes) else b""

        def write(data: bytes) -> None:
            view = memoryview(data)
            while view:
                view = view[stream.send(bytes(view)) :]

        return bridge(read, write, stream.abort, f"channel-{name}")

    def _forward_stream(self, name: str, port: int, deadline: float) -> socket.socket:
        """Port 22 through an SSH tunnel (direct-tcpip) to the host's 127.0.0.1:`port`, where QEMU forwards
        it to the guest, as a socket."""
        import paramiko

        while True:
            transport = self.ssh().get_transport()
            assert transport is not None
            try:
                channel = transport.open_channel(
                    "direct-tcpip",
                    ("127.0.0.1", port),
                    ("127.0.0.1", 0),
                    timeout=max(0.5, deadline - time.monotonic()),
                )
                break
            except paramiko.ChannelException as e:  # the host's 127.0.0.1:port refused: not listening yet
                if time.monotonic() >= deadline:
                    raise ConnectionRefusedError(
                        f"{self.host.name}:127.0.0.1:{port} (the SSH forward of {name}) refused: {e}"
                    ) from e
                time.sleep(0.1)
            except paramiko.SSHException as e:
                raise self._unreachable(f"SSH tunnel: {e}") from e

        def write(data: bytes) -> None:
            channel.sendall(data)

        return bridge(lambda: channel.recv(CHUNK), write, channel.close, f"tunnel-{name}")

    def port_in_use(self, port: int) -> bool:
        """herovm.ports.RemotePorts: whether the host's 127.0.0.1:`port` accepts a connection (asked through
        the tunnel; a refusal means free)."""
        import paramiko

        transport = self.ssh().get_transport()
        assert transport is not None
        try:
            transport.open_channel(
                "direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 0), timeout=self.timeout
            ).close()
            return True
        except paramiko.ChannelException:
            return False
        except paramiko.SSHException as e:
            raise self._unreachable(f"SSH tunnel: {e}") from e

    # ------------------------------------------------------------------------------- templates

    def freeze_template(self, name: str, tag: str) -> dict[str, Any]:
        """Keep the running machine `name` as template volumes on the host (base.HostTemplates): its memory
        and device state saved by libvirt (virDomainSave; the machine stops) to `tpl.<tag>.memory.save`, its
        disk copied by libvirt to `tpl.<tag>.disk.qcow2` (a whole disk of its own: a copy made through the
        storage API keeps no backing file, and the template then needs no image volume). Returns the
        volumes' paths and sizes; nothing of them is left if it fails."""
        prefix = _template_prefix(tag)
        dom = self._require(name)
        memory, disk = self._pool_path(f"{prefix}memory.save"), f"{prefix}disk.qcow2"
        try:
            dom.save(str(memory))
            pool = self._pool(refresh=True)
            source = self._volume(pool, f"{_vm_prefix(name)}disk.qcow2")
            if source is None:
                raise HeroVMError(f"the disk of {name} is gone from {self.host.name}")
            copy = pool.createXMLFrom(_volume_xml(disk, source.info()[1], "qcow2"), source, 0)
            saved = self._volume(pool, memory.name)
            if saved is None:
                raise HeroVMError(f"libvirt on {self.host.name} wrote no {memory.name}")
            return {
                "tag": tag,
                "memory": str(memory),
                "disk": str(self._pool_path(disk)),
                "memory_bytes": saved.info()[1],
                "disk_bytes": copy.info()[2],
            }
        except BaseException as e:
            with contextlib.suppress(HeroVMError, libvirt.libvirtError):  # a host gone: `gc` names them
                self.remove_template(tag)
            if isinstance(e, libvirt.libvirtError):
                raise _wrap(e, f"keeping {name} as a template on {self.host.name}") from e
            raise

    def remove_template(self, tag: str) -> list[str]:
        """Remove the template volumes `tpl.<tag>.*`; their names."""
        pool = self._pool(refresh=True)
        removed = [v for v in pool.listVolumes() if v.startswith(_template_prefix(tag))]
        for volume in removed:
            self._delete(pool, volume)
        return removed

    def clone(self, spec: MachineSpec, memory: Path) -> None:
        """Define `spec` and start it from a template's saved memory on this host (`memory`, the path there
        of `tpl.<tag>.memory.save`), its disk a new overlay on the template's disk. libvirt restores a save
        image only into the domain its XML names, so each clone restores from a copy of it made on the host
        by libvirt (0.15 s for 120 MB here) whose header and XML are then rewritten for the clone (its
        name, UUID, disks, console, channel, network arguments), as herovm.backends.save_image does for a
        local template through a pipe; the copy is removed once the clone runs."""
        if self._lookup(spec.name) is not None:
            raise AlreadyExists(f"VM {spec.name} already exists")
        prefix = _template_prefix(_template_tag(memory))
        pool = self._pool(refresh=True)
        saved = self._volume(pool, memory.name)
        if saved is None or self._volume(pool, f"{prefix}disk.qcow2") is None:
            raise HeroVMError(
                f"the template's memory or disk is gone from {self.host.name} ({prefix}*)",
                hint="make the template again (`herovm template rm`, then `template create`)",
            )
        image = self._save_image(saved, memory)
        remote = self._define(spec, self._pool_path(f"{prefix}disk.qcow2"))
        restore = f"{_vm_prefix(spec.name)}restore.save"
        try:
            dom = self._require(spec.name)
            live = _cloned_xml(
                ElementTree.fromstring(image.xml), ElementTree.fromstring(render_domain_xml(remote)), dom
            )
            header = image.header_for(live)
            if len(header) > image.stream_offset:
                raise HeroVMError(f"the XML of {spec.name} does not fit in the template's save image")
            copy = pool.createXMLFrom(_volume_xml(restore, image.size, "raw"), saved, 0)
            self._upload(copy, _reader(header), len(header))
            self._upload_drive(spec.name)
            self.conn.restoreFlags(str(self._pool_path(restore)), live, libvirt.VIR_DOMAIN_SAVE_RUNNING)
        except BaseException as e:
            self.undefine(spec.name)
            if isinstance(e, libvirt.libvirtError):
                raise _wrap(e, f"restoring {spec.name} on {self.host.name}") from e
            raise
        self._delete(pool, restore)

    def _save_image(self, vol: libvirt.virStorageVol, path: Path) -> SaveImage:
        """The header and XML of the save image in `vol` (read from the host: its first KiBs)."""
        size = vol.info()[1]
        got = bytearray()
        stream = self.conn.newStream(0)
        try:
            vol.download(stream, 0, min(size, MAX_DATA + HEADER.size), 0)
            while len(got) < HEADER.size or len(got) < HEADER.size + HEADER.unpack(got[: HEADER.size])[2]:
                data = stream.recv(CHUNK)
                if not data or not isinstance(data, bytes):
                    break
                got += data
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
        return SaveImage.parse(path, size, _reader(bytes(got)))

    # ------------------------------------------------------------------ what stays on the local host

    def _local_only(self, what: str) -> Unsupported:
        return Unsupported(
            f"{what} on host {self.host.name}: herovm does that on the local host only",
            hint="make the VM on the local host (--host local) for snapshots, templates, fork and ports",
        )

    def snapshot(self, name: str, directory: Path) -> SavedState:
        raise self._local_only("snapshots")

    def restore(self, name: str, saved: SavedState) -> None:
        raise self._local_only("snapshots")

    def save_device_state(self, name: str, path: Path) -> None:
        raise self._local_only("templates")

    def publish(self, name: str, forward: tuple[int, int]) -> None:
        raise self._local_only("published ports")


def _reader(data: bytes) -> Callable[[int], bytes]:
    view = memoryview(data)
    offset = 0

    def read(n: int) -> bytes:
        nonlocal offset
        chunk = bytes(view[offset : offset + n])
        offset += len(chunk)
        return chunk

    return read
