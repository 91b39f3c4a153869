"""The libvirt backend: QEMU guests (KVM or TCG) defined from herovm/_data/templates/libvirt-domain.xml.j2.

herovm's domains are named `herovm-<name>` and carry their metadata in `<metadata>`, so `herovm ls` asks
libvirt, not a file of ours, which machines exist.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import socket
import time
import uuid
from dataclasses import replace
from pathlib import Path
from xml.etree import ElementTree

import libvirt

from .. import disks, resources, state
from ..errors import (
    AlreadyExists,
    BackendUnavailable,
    GuestError,
    HeroVMError,
    InvalidInput,
    NotFound,
    Unsupported,
)
from ..guest.events import connect_unix
from ..guest.execution import open_tcp
from ..protocol import AGENT_PORT_NAME, AGENT_VSOCK_PORT, SSH_PORT
from . import passt
from .base import DEVICE_STATE, RAM_FILE, GuestConnector, Machine, MachineSpec, SavedState
from .save_image import SaveImage

PREFIX = "herovm-"
_QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
NAMESPACE = "urn:herovm:vm:1"
NET_NAMESPACE = "urn:herovm:net:1"  # the backend's own facts about the NIC, apart from the Manager's metadata
_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "running",
    libvirt.VIR_DOMAIN_SHUTOFF: "stopped",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
}

# Prefixes for the namespaces of herovm's domain XML, which is read and written again (a snapshot's restore)
for _prefix, _uri in (
    ("qemu", "http://libvirt.org/schemas/domain/qemu/1.0"),
    ("herovm", NAMESPACE),
    ("herovmnet", NET_NAMESPACE),
):
    ElementTree.register_namespace(_prefix, _uri)

libvirt.registerErrorHandler(lambda *_: None, None)  # libvirt would print every error to stderr itself


def default_uri() -> str:
    if uri := os.environ.get("HEROVM_LIBVIRT_URI"):
        return uri
    return "qemu:///system" if os.geteuid() == 0 else "qemu:///session"


def render_domain_xml(spec: MachineSpec, *, ram_private: bool = False, incoming: bool = False) -> str:
    """The domain's XML. `ram_private`: its ram_file is mapped copy-on-write (a clone's), not shared;
    `incoming`: QEMU waits for its state to be sent in (`-incoming defer`)."""
    import jinja2  # only defining a domain needs it: 16 ms off every other CLI call

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(resources.TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    return env.get_template("libvirt-domain.xml.j2").render(
        spec=spec,
        domain_name=PREFIX + spec.name,
        agent_port_name=AGENT_PORT_NAME,
        namespace=NAMESPACE,
        domain_type="kvm" if spec.accel == "kvm" else "qemu",
        metadata_json=json.dumps(spec.metadata, sort_keys=True),
        net_namespace=NET_NAMESPACE,
        net_json=json.dumps(
            {
                "net": spec.net,
                "ssh_port": spec.ssh_port,
                "net_dir": str(spec.net_dir) if spec.net_dir else None,
                "ports": [list(p) for p in spec.ports],
            }
        ),
        # A raw QEMU option value: a comma would end it (a HEROVM_HOME with a comma added options); QEMU
        # reads ",," as one comma.
        passt_socket=str(passt.socket_path(spec.net_dir)).replace(",", ",,") if spec.net_dir else "",
        ram_path=str(spec.ram_file).replace(",", ",,") if spec.ram_file else "",
        ram_private=ram_private,
        incoming=incoming,
    )


class LibvirtBackend:
    name = "libvirt"

    def __init__(self, uri: str | None = None) -> None:
        self.uri = uri or default_uri()
        self._conn: libvirt.virConnect | None = None  # opened at first use: `herovm exec` may not need it

    def _open(self) -> libvirt.virConnect:
        try:
            return libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            raise BackendUnavailable(
                f"cannot connect to libvirt at {self.uri}: {e.get_error_message()}",
                hint="is libvirtd running? start it with `libvirtd -d` (scripts/setup does), "
                "or pick another URI with --connect / HEROVM_LIBVIRT_URI",
            ) from e

    @property
    def conn(self) -> libvirt.virConnect:
        """The connection, reopened if libvirtd went away (a restart must not strand a long-lived Manager)."""
        if self._conn is None:
            self._conn = self._open()
            return self._conn
        try:
            # A round trip: isAlive() keeps saying yes about a daemon that went away until a write fails.
            self._conn.getLibVersion()
            alive = True
        except libvirt.libvirtError:
            alive = False
        if not alive:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = self._open()
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    def _lookup(self, name: str) -> libvirt.virDomain | None:
        try:
            return self.conn.lookupByName(PREFIX + name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise _wrap(e, f"looking up {name}") from e

    def _require(self, name: str) -> libvirt.virDomain:
        dom = self._lookup(name)
        if dom is None:
            raise NotFound(f"VM {name} not found in libvirt", hint="see `herovm ls`")
        return dom

    def define(self, spec: MachineSpec) -> None:
        if self._lookup(spec.name) is not None:
            raise AlreadyExists(
                f"VM {spec.name} already exists", hint=f"remove it with `herovm down {spec.name}`"
            )
        if spec.ram_file is not None:
            self._make_ram_file(spec.ram_file, spec.memory)
        try:
            self.conn.defineXMLFlags(render_domain_xml(spec), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_DOM_EXIST:
                raise AlreadyExists(f"VM {spec.name} already exists") from e
            raise _wrap(e, f"defining {spec.name}") from e

    def _make_ram_file(self, path: Path, size: int) -> None:
        """The file the guest's memory lives in (SharedMemory), sparse, 0600, owned by the user QEMU runs as
        (libvirt relabels the disks it knows, not a file given in QEMU's arguments)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            if (user := self._qemu_user()) is not None:
                pw = pwd.getpwnam(user)
                os.fchown(fd, pw.pw_uid, pw.pw_gid)
        finally:
            os.close(fd)

    def start(self, name: str) -> None:
        dom = self._require(name)
        net_dir = self._start_passt(dom)
        try:
            dom.create()
        except libvirt.libvirtError as e:
            passt.stop(net_dir)
            raise _wrap(e, f"starting {name}") from e

    def _start_passt(self, dom: libvirt.virDomain) -> Path | None:
        """Start the domain's passt, in the default network mode (QEMU connects to it as it starts: so does
        a restored QEMU); returns its directory, None in the other modes."""
        net = self._metadata(dom, NET_NAMESPACE)
        net_dir = _passt_dir(net) if not self.uri.startswith("test:") else None  # test driver: no QEMU
        if net_dir is not None:
            if not _is_local(self.uri):
                raise InvalidInput(
                    f"the default network mode runs passt on this machine, but {self.uri} is remote",
                    hint="use --net nat or --net restricted with a remote libvirt",
                )
            passt.start(net_dir, net["ssh_port"], self._qemu_user(), _ports(net))
        return net_dir

    def _qemu_user(self) -> str | None:
        """Who passt runs as: the user QEMU runs as, who must open passt's socket (libvirt-qemu under
        qemu:///system). passt will not run as root, so as root it gets an explicit user."""
        if os.geteuid() != 0:
            return None
        for user in (("libvirt-qemu",) if self.uri.startswith("qemu:///system") else ()) + ("nobody",):
            try:
                pwd.getpwnam(user)
                return user
            except KeyError:
                continue
        return None

    def destroy(self, name: str) -> None:
        dom = self._lookup(name)
        if dom is None:
            return
        try:
            dom.destroy()
        except libvirt.libvirtError as e:
            if e.get_error_code() not in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
                raise _wrap(e, f"stopping {name}") from e
        passt.stop(_passt_dir(self._metadata(dom, NET_NAMESPACE)))

    def pause(self, name: str) -> None:
        """libvirt's suspend: QEMU stops the vCPUs; memory, devices, the NIC's backend stay."""
        try:
            self._require(name).suspend()
        except libvirt.libvirtError as e:
            raise _wrap(e, f"pausing {name}") from e

    def resume(self, name: str) -> None:
        try:
            self._require(name).resume()
        except libvirt.libvirtError as e:
            raise _wrap(e, f"resuming {name}") from e

    def publish(self, name: str, forward: tuple[int, int]) -> None:
        """herovm.ports.Forwards: forward 127.0.0.1:host to the guest's port. The definition gets it (the
        NIC's QEMU arguments, and the NIC's metadata, which passt is started from); a running QEMU user
        network gets it at once through the monitor (HMP hostfwd_add). passt cannot add a forward while it
        runs: a running domain in the default mode is refused (Unsupported)."""
        import libvirt_qemu

        host, guest = forward
        dom = self._require(name)
        net = self._metadata(dom, NET_NAMESPACE)
        live = dom.isActive()
        if live and net.get("net") == "default":
            raise Unsupported(f"passt cannot add a forward to {name} while it runs")
        net["ports"] = [*_ports(net), [host, guest]]
        try:
            config = ElementTree.fromstring(
                dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
            )
            for arg in config.iter(f"{{{_QEMU_NS}}}arg"):
                if arg.get("value", "").startswith("user,id=hostnet0,"):
                    arg.set("value", f"{arg.get('value')},hostfwd=tcp:127.0.0.1:{host}-:{guest}")
            element = config.find(f"./metadata/{{{NET_NAMESPACE}}}net")
            if element is not None:
                element.text = json.dumps(net)
            if live:
                done = libvirt_qemu.qemuMonitorCommand(
                    dom,
                    f"hostfwd_add hostnet0 tcp:127.0.0.1:{host}-:{guest}",
                    libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
                )
                if done.strip():  # HMP says nothing when it worked
                    raise HeroVMError(f"QEMU did not add the forward to {name}: {done.strip()}")
                self._set_net_metadata(dom, net, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            self.conn.defineXML(ElementTree.tostring(config, "unicode"))
        except libvirt.libvirtError as e:
            raise _wrap(e, f"forwarding a port to {name}") from e

    def _set_net_metadata(self, dom: libvirt.virDomain, net: dict, flags: int) -> None:
        element = ElementTree.Element("net")
        element.text = json.dumps(net)
        dom.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            ElementTree.tostring(element, "unicode"),
            "herovmnet",
            NET_NAMESPACE,
            flags,
        )

    # ---------------------------------------------------------------------------------- snapshots

    def disk(self, name: str) -> Path:
        return Path(_source(_vm_disk(ElementTree.fromstring(self._require(name).XMLDesc(0)))))

    def snapshot(self, name: str, directory: Path) -> SavedState:
        """A running (or paused) domain: libvirt's external snapshot with memory, without libvirt metadata
        (herovm keeps the record): QEMU pauses the guest, writes its memory and device state to
        `directory`/memory.save (the format of virDomainSave), switches the disk to a new overlay, and lets
        the guest run on; QEMU itself keeps running. A stopped domain: a new overlay, defined as its disk.
        Either way the old overlay is the snapshot's frozen disk (docs/snapshots.md: what was measured)."""
        dom = self._require(name)
        root = ElementTree.fromstring(dom.XMLDesc(0))
        disk = _vm_disk(root)
        current = Path(_source(disk))
        new = disks.new_overlay_path(current.parent)
        if not dom.isActive():
            disks.create_overlay(current, new, what=name)
            try:
                self._define_with_disk(dom, new)
            except BaseException:
                new.unlink(missing_ok=True)
                raise
            return SavedState(current)
        memory = directory / "memory.save"
        snap = ElementTree.Element("domainsnapshot")
        ElementTree.SubElement(snap, "memory", snapshot="external", file=str(memory))
        wanted = ElementTree.SubElement(snap, "disks")
        for d in root.findall("./devices/disk"):
            target = d.find("target").get("dev")  # type: ignore[union-attr]
            if d is disk:
                e = ElementTree.SubElement(wanted, "disk", name=target, snapshot="external")
                ElementTree.SubElement(e, "driver", type="qcow2")
                ElementTree.SubElement(e, "source", file=str(new))
            else:  # the config drive: read-only, nothing to keep
                ElementTree.SubElement(wanted, "disk", name=target, snapshot="no")
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        try:
            dom.snapshotCreateXML(ElementTree.tostring(snap, "unicode"), flags)
        except libvirt.libvirtError as e:
            with contextlib.suppress(libvirt.libvirtError, HeroVMError):
                if self.disk(name) != new:
                    new.unlink(missing_ok=True)  # atomic: libvirt left the domain on its old disk
            raise _wrap(e, f"snapshotting {name}") from e
        os.chmod(memory, 0o600)
        os.chmod(new, 0o600)
        return SavedState(current, memory)

    def restore(self, name: str, saved: SavedState) -> None:
        """The domain is destroyed (if it runs) and defined with a new overlay on the snapshot's disk; with
        memory, virDomainRestoreFlags brings it back running from memory.save, on that overlay and with
        herovm's metadata as it is now, after its passt (default network mode) was started again: passt
        ends with the QEMU it served."""
        dom = self._require(name)
        self.destroy(name)
        new = disks.new_overlay_path(saved.disk.parent)
        disks.create_overlay(saved.disk, new, what=name)
        try:
            config = self._define_with_disk(dom, new)
        except BaseException:
            new.unlink(missing_ok=True)
            raise
        if saved.memory is None:
            return
        try:
            image = ElementTree.fromstring(
                self.conn.saveImageGetXMLDesc(str(saved.memory), libvirt.VIR_DOMAIN_XML_SECURE)
            )
        except libvirt.libvirtError as e:
            raise _wrap(e, f"reading the memory snapshot of {name}") from e
        _set_source(_vm_disk(image), new)
        for old in image.findall("metadata"):
            image.remove(old)
        for metadata in config.findall("metadata"):  # herovm's record as it is now, not as it was then
            image.insert(0, metadata)
        memory = _memory_args(image)  # a shared-memory template's clone: its memory block, as it was
        for old in image.findall(_COMMANDLINE):  # the NIC's forwards as they are now, too
            image.remove(old)
        image.extend(config.findall(_COMMANDLINE))
        _add_args(image, memory)
        net_dir = self._start_passt(dom)
        try:
            self.conn.restoreFlags(
                str(saved.memory), ElementTree.tostring(image, "unicode"), libvirt.VIR_DOMAIN_SAVE_RUNNING
            )
        except libvirt.libvirtError as e:
            passt.stop(net_dir)
            raise _wrap(e, f"restoring {name}") from e

    def save_device_state(self, name: str, path: Path) -> None:
        """QEMU's migration to a file, with x-ignore-shared (the guest memory in the shared ram_file is left
        out: it is that file), after libvirt's suspend: ~0.03 s and under 1 MB here. libvirt 9.0 has no call
        for it, so it goes through the monitor (libvirt_qemu; the domain is marked tainted)."""
        dom = self._require(name)
        try:
            dom.suspend()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._migrate_shared(dom, "migrate", fd, f"saving the state of {name}")
        except BaseException as e:
            path.unlink(missing_ok=True)
            if isinstance(e, libvirt.libvirtError):
                raise _wrap(e, f"saving the state of {name}") from e
            raise

    def _qmp(
        self, dom: libvirt.virDomain, command: str, files: list[int] | None = None, **arguments: object
    ) -> dict:
        import libvirt_qemu  # the monitor: only the shared-memory template path needs it

        text = json.dumps({"execute": command, "arguments": arguments})
        if files:
            answer = json.loads(libvirt_qemu.qemuMonitorCommandWithFiles(dom, text, files, 0)[0])
        else:
            answer = json.loads(libvirt_qemu.qemuMonitorCommand(dom, text, 0))
        if "error" in answer:
            raise HeroVMError(f"QEMU refused {command}: {answer['error'].get('desc')}")
        return answer.get("return") or {}

    def _migrate_shared(self, dom: libvirt.virDomain, command: str, fd: int, doing: str) -> None:
        """`migrate` (save) or `migrate-incoming` (load) the device state through `fd` (closed here), with
        x-ignore-shared on: the guest memory in the shared ram_file is not in the stream. Returns when QEMU
        is done."""
        try:
            self._qmp(
                dom,
                "migrate-set-capabilities",
                capabilities=[{"capability": "x-ignore-shared", "state": True}],
            )
            self._qmp(dom, "getfd", files=[fd], fdname="herovm-state")
        finally:
            os.close(fd)
        self._qmp(dom, command, uri="fd:herovm-state")
        self._migration_done(dom, doing)

    def _migration_done(self, dom: libvirt.virDomain, doing: str, seconds: float = 60.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            status = self._qmp(dom, "query-migrate")
            if status.get("status") == "completed":
                return
            if status.get("status") in ("failed", "cancelled"):
                raise HeroVMError(f"QEMU failed while {doing}: {status.get('error-desc', status['status'])}")
            time.sleep(0.005)
        raise HeroVMError(f"QEMU did not finish {doing} in {seconds:.0f}s")

    def _clone_from_shared_memory(self, spec: MachineSpec, state: Path) -> None:
        """A clone of a SharedMemory template: the domain defined as an ordinary machine (what its later boots
        are), then started once with the template's memory file mapped copy-on-write and QEMU waiting for
        the device state, which is sent in through a file descriptor; then it runs. ~0.3 s, and the clones
        share the template's pages until they write them."""
        ram = state.with_name(RAM_FILE)
        if not ram.is_file():
            raise HeroVMError(f"the memory of {state.parent.name} is gone ({ram})")
        self.define(spec)
        dom = self._require(spec.name)
        net_dir = None
        try:
            live = ElementTree.fromstring(
                render_domain_xml(replace(spec, ram_file=ram), ram_private=True, incoming=True)
            )
            ElementTree.SubElement(live, "uuid").text = dom.UUIDString()  # this domain's, started as it is
            net_dir = self._start_passt(dom)
            dom = self.conn.createXML(ElementTree.tostring(live, "unicode"), libvirt.VIR_DOMAIN_START_PAUSED)
            self._migrate_shared(
                dom, "migrate-incoming", os.open(state, os.O_RDONLY), f"restoring {spec.name}"
            )
            # off again: its own memory is private, so a later snapshot or fork saves it whole, and the QEMU
            # that loads that (libvirt's restore) expects the capability off
            self._qmp(
                dom,
                "migrate-set-capabilities",
                capabilities=[{"capability": "x-ignore-shared", "state": False}],
            )
            dom.resume()
        except BaseException as e:
            passt.stop(net_dir)
            self.undefine(spec.name)
            if isinstance(e, libvirt.libvirtError):
                raise _wrap(e, f"restoring {spec.name} from {state.parent.name}") from e
            raise

    def clone(self, spec: MachineSpec, memory: Path) -> None:
        """Define `spec` as a new domain and start it from `memory`: a SharedMemory template's device state
        (_clone_from_shared_memory), or another domain's save image, restored with this domain's name, UUID,
        generation ID, metadata, disks, console, channel and network arguments, served through a pipe
        (herovm.backends.save_image: libvirt restores an image only into the UUID it names). What `memory`
        names is only read."""
        if self._lookup(spec.name) is not None:
            raise AlreadyExists(f"VM {spec.name} already exists")
        if memory.name == DEVICE_STATE:
            self._clone_from_shared_memory(spec, memory)
            return
        image = SaveImage.read(memory)
        if self._lookup(spec.name) is not None:
            raise AlreadyExists(f"VM {spec.name} already exists")
        self.define(spec)
        dom = self._require(spec.name)
        net_dir = None
        try:
            live = _cloned_xml(
                ElementTree.fromstring(image.xml), ElementTree.fromstring(render_domain_xml(spec)), dom
            )
            net_dir = self._start_passt(dom)
            with image.served_as(live, spec.disk.parent / ".restore.fifo") as fifo:
                self.conn.restoreFlags(str(fifo), live, libvirt.VIR_DOMAIN_SAVE_RUNNING)
        except BaseException as e:
            passt.stop(net_dir)
            self.undefine(spec.name)
            if isinstance(e, libvirt.libvirtError):
                raise _wrap(e, f"restoring {spec.name} from {memory.name}") from e
            raise

    def _define_with_disk(self, dom: libvirt.virDomain, path: Path) -> ElementTree.Element:
        """Make `path` the disk of the domain's definition (what its next start or restore uses)."""
        try:
            config = ElementTree.fromstring(
                dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
            )
            _set_source(_vm_disk(config), path)
            self.conn.defineXML(ElementTree.tostring(config, "unicode"))
        except libvirt.libvirtError as e:
            raise _wrap(e, f"redefining {dom.name().removeprefix(PREFIX)}") from e
        return config

    def undefine(self, name: str) -> None:
        self.destroy(name)
        dom = self._lookup(name)
        if dom is None:
            return
        flags = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        for f in (flags | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM, flags, 0):
            try:
                dom.undefineFlags(f)
                return
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return
                if e.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
                    raise _wrap(e, f"removing {name}") from e

    def node_facts(self) -> dict:
        """What `herovm host ls` shows of this libvirt's host: CPUs, free memory (as libvirt counts it), the
        accelerator guests would get, the images cached (herovm.hosts)."""
        from .. import accel, images

        try:
            info = self.conn.getInfo()
            free = self.conn.getFreeMemory()
        except libvirt.libvirtError as e:
            raise _wrap(e, "asking libvirt about this host") from e
        cached = sorted({i.id for i in images.list_images()})
        return {"cpus": info[2], "memory_free": free, "accel": accel.detect().accel, "images": cached}

    def get(self, name: str) -> Machine | None:
        dom = self._lookup(name)
        return self._machine(dom) if dom is not None else None

    def list(self) -> list[Machine]:
        try:
            doms = self.conn.listAllDomains()
        except libvirt.libvirtError as e:
            raise _wrap(e, "listing domains") from e
        machines = []
        for dom in doms:
            if not dom.name().startswith(PREFIX):
                continue
            try:
                machines.append(self._machine(dom))
            except libvirt.libvirtError:
                continue  # vanished while we looked
        return sorted(machines, key=lambda m: m.name)

    def _machine(self, dom: libvirt.virDomain) -> Machine:
        state, _ = dom.state()
        return Machine(dom.name().removeprefix(PREFIX), _STATES.get(state, "other"), self._metadata(dom))

    def _metadata(self, dom: libvirt.virDomain, namespace: str = NAMESPACE) -> dict:
        """One of herovm's JSON metadata elements of a domain ({} if it has none)."""
        try:
            return json.loads(
                ElementTree.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace)).text
                or "{}"
            )
        except (libvirt.libvirtError, ElementTree.ParseError, ValueError):
            return {}

    def set_metadata(self, name: str, metadata: dict) -> None:
        dom = self._require(name)
        element = ElementTree.Element("vm")
        element.text = json.dumps(metadata, sort_keys=True)
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if dom.isActive():
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        try:
            dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                ElementTree.tostring(element, "unicode"),
                "herovm",
                NAMESPACE,
                flags,
            )
        except libvirt.libvirtError as e:
            raise _wrap(e, f"updating {name}") from e

    def guest_connector(self, name: str, ssh_port: int | None) -> GuestConnector:
        """The agent's channel is a virtio-serial port, the unix socket QEMU serves in the VM's directory;
        port 22 is the forward on 127.0.0.1:`ssh_port`. Neither asks libvirt anything. (Another host's
        backend reaches both otherwise: `_agent_stream` and `_forward_stream`.)"""

        def connect(port: int, deadline: float) -> socket.socket:
            if port == AGENT_VSOCK_PORT:
                return self._agent_stream(name, deadline)
            if port != SSH_PORT:
                raise GuestError(f"libvirt reaches no guest port {port} of {name}: only the agent and SSH")
            if ssh_port is None:
                raise GuestError(
                    f"VM {name} has no network (--net none), so no exec or SSH",
                    hint="create it with another --net mode to exec into it",
                )
            return self._forward_stream(name, ssh_port, deadline)

        return connect

    def _agent_stream(self, name: str, deadline: float) -> socket.socket:
        return connect_unix(state.VMDir(name).agent_socket, deadline, lambda: self._running(name))

    def _running(self, name: str) -> bool:
        """Whether the domain exists and runs (or is paused); a libvirt that does not answer: assumed so."""
        try:
            dom = self._lookup(name)
            return dom is not None and bool(dom.isActive())
        except (HeroVMError, libvirt.libvirtError):
            return True

    def _forward_stream(self, name: str, port: int, deadline: float) -> socket.socket:
        return open_tcp("127.0.0.1", port, max(0.05, deadline - time.monotonic()))


_PATHS = ("serial", "console", "channel")
_COMMANDLINE = f"{{{_QEMU_NS}}}commandline"


def _add_args(domain: ElementTree.Element, values: list[str]) -> None:
    """Append QEMU arguments to a domain's qemu:commandline (made if it has none)."""
    if not values:
        return
    line = domain.find(_COMMANDLINE)
    if line is None:
        line = ElementTree.SubElement(domain, _COMMANDLINE)
    for value in values:
        ElementTree.SubElement(line, f"{{{_QEMU_NS}}}arg", value=value)


def _memory_args(domain: ElementTree.Element) -> list[str]:
    """The QEMU arguments that put a domain's guest memory in a file (a shared-memory template's clone maps
    the template's): `-object memory-backend-file...` and `-machine memory-backend=...`, without the
    `-incoming` its first start had."""
    values = [a.get("value", "") for a in domain.findall(f"./{_COMMANDLINE}/{{{_QEMU_NS}}}arg")]
    kept = []
    for option, value in zip(values, values[1:], strict=False):
        if (option == "-object" and value.startswith("memory-backend-file,id=herovm.ram,")) or (
            option == "-machine" and value == "memory-backend=herovm.ram"
        ):
            kept += [option, value]
    return kept


def _cloned_xml(saved: ElementTree.Element, fresh: ElementTree.Element, dom: libvirt.virDomain) -> str:
    """The saved domain's XML (devices and addresses as its QEMU had them, which the stream must match),
    with what belongs to the new domain taken from `fresh` (its rendered XML) and `dom` (its definition)."""
    saved.find("name").text = dom.name()  # type: ignore[union-attr]
    saved.find("uuid").text = dom.UUIDString()  # type: ignore[union-attr]
    memory = _memory_args(saved)  # a shared-memory template's clone: its memory block must be there again
    for tag in ("title", "metadata", "genid", _COMMANDLINE):
        for old in saved.findall(tag):
            saved.remove(old)
        for new in fresh.findall(tag) if tag != "genid" else ():
            saved.append(new)
    _add_args(saved, memory)
    ElementTree.SubElement(saved, "genid").text = str(uuid.uuid4())  # a new generation, for vmgenid
    _set_source(_vm_disk(saved), Path(_source(_vm_disk(fresh))))
    drives = [d for d in saved.findall("./devices/disk") if d.find("readonly") is not None]
    fresh_drives = [d for d in fresh.findall("./devices/disk") if d.find("readonly") is not None]
    for old, new in zip(drives, fresh_drives, strict=True):
        _set_source(old, Path(_source(new)))
    paths = {  # the console is the serial port, so the same file
        tag: fresh.find(f"./devices/{'serial' if tag == 'console' else tag}/source") for tag in _PATHS
    }
    for tag, wanted in paths.items():
        for device in saved.findall(f"./devices/{tag}"):
            source = device.find("source")
            if source is not None and wanted is not None:
                source.set("path", wanted.get("path", ""))
    return ElementTree.tostring(saved, "unicode")


def _vm_disk(domain: ElementTree.Element) -> ElementTree.Element:
    """The VM's own disk in a domain's XML: the first that is not read-only (the config drive is)."""
    for disk in domain.findall("./devices/disk[@device='disk']"):
        if disk.find("readonly") is None and disk.find("source") is not None:
            return disk
    raise HeroVMError(f"domain {domain.findtext('name')} has no writable disk")


def _source(disk: ElementTree.Element) -> str:
    return disk.find("source").get("file", "")  # type: ignore[union-attr]


def _set_source(disk: ElementTree.Element, path: Path) -> None:
    """Point a disk at `path`; libvirt probes its backing chain again (the old one described another)."""
    disk.find("source").set("file", str(path))  # type: ignore[union-attr]
    for below in disk.findall("backingStore"):
        disk.remove(below)


def _ports(net: dict) -> list[list[int]]:
    """The published ports of a domain's NIC metadata: (host, guest) pairs."""
    found = net.get("ports")
    return [list(p) for p in found if isinstance(p, list) and len(p) == 2] if isinstance(found, list) else []


def _passt_dir(net: dict) -> Path | None:
    """Where the VM's passt lives, when its network mode is the default one (a passt per VM)."""
    return Path(net["net_dir"]) if net.get("net") == "default" and net.get("net_dir") else None


def _is_local(uri: str) -> bool:
    """qemu:///system, qemu:///session, test:///default: no host part, so the hypervisor runs here."""
    return "://" in uri and uri.split("://", 1)[1].startswith("/") and "+" not in uri.split("://", 1)[0]


def _wrap(e: libvirt.libvirtError, doing: str) -> HeroVMError:
    code = e.get_error_code()
    if code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC):
        return BackendUnavailable(
            f"libvirt connection lost while {doing}: {e.get_error_message()}",
            hint="is libvirtd running? `libvirtd -d` starts it",
        )
    return HeroVMError(f"libvirt failed while {doing}: {e.get_error_message()}")
