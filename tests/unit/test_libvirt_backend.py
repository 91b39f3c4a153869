"""LibvirtBackend on libvirt's own test driver (test:///default): real define/start/destroy/undefine, metadata
and schema validation, in-process and without a guest.

All test:///default connections of one process share one state while any of them is open, so every test
uses unique names and cleans up; `conn` opens a second, independent connection to look behind the backend.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from xml.etree import ElementTree

import libvirt
import pytest
from specs import spec, unique

from herovm.backends import get_backend
from herovm.backends.base import MachineSpec
from herovm.backends.libvirt import NAMESPACE, PREFIX, LibvirtBackend, default_uri, render_domain_xml
from herovm.errors import AlreadyExists, BackendUnavailable, HeroVMError, InvalidInput, NotFound

URI = "test:///default"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HEROVM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def conn(backend):
    c = libvirt.open(URI)
    yield c
    c.close()


# ------------------------------------------------------------------------------------------- the XML


def test_rendered_xml_has_everything(tmp_path: Path) -> None:
    s = spec(tmp_path, "xml1", ssh_port=40123, metadata={"k": "v & <w>"})
    root = ElementTree.fromstring(render_domain_xml(s))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == PREFIX + "xml1"
    assert root.find("memory").get("unit") == "b" and root.findtext("memory") == str(256 << 20)
    assert root.findtext("vcpu") == "2"
    assert root.findtext("os/kernel") == str(s.kernel)
    assert root.findtext("os/initrd") == str(s.initrd)
    assert root.findtext("os/cmdline") == s.cmdline
    assert root.find("features/acpi") is not None
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        assert root.findtext(event) == "destroy"
    disks = root.findall("devices/disk")
    assert [(d.find("source").get("file"), d.find("target").get("dev")) for d in disks] == [
        (str(s.disk), "vda"),
        (str(s.drive), "vdb"),
    ]
    assert disks[0].find("driver").get("type") == "qcow2"
    assert disks[1].find("readonly") is not None
    serial = root.find("devices/serial")
    assert serial.get("type") == "file" and serial.find("source").get("path") == str(s.console_log)
    channel = root.find("devices/channel")
    assert channel.get("type") == "unix"
    assert channel.find("source").get("path") == str(s.channel)
    assert channel.find("source").get("mode") == "bind"
    assert channel.find("target").get("name") == "org.herovm.agent.0"
    meta = root.find(f"metadata/{{{NAMESPACE}}}vm")
    assert json.loads(meta.text) == {"k": "v & <w>"}
    args = [a.get("value") for a in root.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    assert args[0] == "-netdev"
    assert "hostfwd=tcp:127.0.0.1:40123-:22" in args[1]
    assert "0.0.0.0" not in args[1] and "hostfwd=tcp::" not in args[1]
    assert args[2:] == ["-device", "virtio-net-pci,netdev=hostnet0,addr=0x10"]


def test_rendered_xml_without_network(tmp_path: Path) -> None:
    xml = render_domain_xml(spec(tmp_path, "xml2", ssh_port=None))
    root = ElementTree.fromstring(xml)
    assert root.find(f"{{{QEMU_NS}}}commandline") is None
    assert "hostfwd" not in xml and "-netdev" not in xml
    assert root.find("devices/interface") is None


@pytest.mark.parametrize("accel, domain_type", [("kvm", "kvm"), ("tcg", "qemu")])
def test_domain_type_follows_accel(tmp_path: Path, accel: str, domain_type: str) -> None:
    assert ElementTree.fromstring(render_domain_xml(spec(tmp_path, accel=accel))).get("type") == domain_type


def test_rendered_xml_escapes_paths(tmp_path: Path) -> None:
    weird = tmp_path / "a b&c<d>'e\""
    s = MachineSpec(**{**spec(tmp_path, "xml3").__dict__, "disk": weird / "disk.qcow2"})
    root = ElementTree.fromstring(render_domain_xml(s))
    assert root.find("devices/disk/source").get("file") == str(weird / "disk.qcow2")


def test_a_comma_in_the_home_cannot_add_qemu_options(tmp_path: Path) -> None:
    home = tmp_path / "h,addr.path=/tmp/evil"
    s = MachineSpec(**{**spec(tmp_path, "xml4").__dict__, "net": "default", "net_dir": home / "net"})
    args = [a.get("value") for a in ElementTree.fromstring(render_domain_xml(s)).iter(f"{{{QEMU_NS}}}arg")]
    netdev = args[args.index("-netdev") + 1]
    # QEMU splits on a single comma only: the path stays one value, with no option of its own
    assert netdev.endswith(f"addr.path={str(home).replace(',', ',,')}/net/passt.sock")
    assert [part for part in netdev.replace(",,", "\0").split(",") if "evil" in part] == [
        f"addr.path={home}/net/passt.sock".replace(",", "\0")
    ]


@pytest.mark.parametrize("ssh_port", [40124, None])
def test_rendered_xml_passes_libvirts_schema_with_qemu_namespace(
    backend: LibvirtBackend, tmp_path: Path, ssh_port: int | None
) -> None:
    # VIR_DOMAIN_DEFINE_VALIDATE checks the whole document against libvirt's RelaxNG schema, the
    # <qemu:commandline> namespace included, before the test driver drops that namespace. A broken
    # qemu element must be rejected: that shows the validation sees it.
    s = spec(tmp_path, ssh_port=ssh_port)
    xml = render_domain_xml(s)
    backend.conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    assert backend.get(s.name) is not None
    backend.undefine(s.name)
    if ssh_port:
        broken = xml.replace("<qemu:arg value='-device'/>", "<qemu:bogus value='-device'/>")
        assert broken != xml
        with pytest.raises(libvirt.libvirtError, match="failed to validate against schema"):
            backend.conn.defineXMLFlags(broken, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)


# --------------------------------------------------------------------------------------- lifecycle


def test_define_validates_and_stores_the_domain(backend: LibvirtBackend, conn, tmp_path: Path) -> None:
    s = spec(tmp_path, accel="kvm")
    backend.define(s)
    dom = conn.lookupByName(PREFIX + s.name)
    assert not dom.isActive()
    assert dom.isPersistent()
    root = ElementTree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert root.get("type") == "kvm"
    assert root.findtext("os/kernel") == str(s.kernel)
    assert root.findtext("os/cmdline") == s.cmdline
    assert root.find("features/acpi") is not None
    assert root.findtext("on_reboot") == "destroy"
    assert [d.find("source").get("file") for d in root.findall("devices/disk")] == [str(s.disk), str(s.drive)]
    assert root.find("devices/serial/source").get("path") == str(s.console_log)
    assert root.find("devices/channel/target").get("name") == "org.herovm.agent.0"
    assert int(root.findtext("memory")) == 256 * 1024  # KiB as libvirt stores it
    m = backend.get(s.name)
    assert m is not None and m.name == s.name and m.state == "stopped" and m.metadata == s.metadata


def test_define_rejects_what_the_schema_rejects(backend: LibvirtBackend, tmp_path: Path) -> None:
    s = MachineSpec(**{**spec(tmp_path).__dict__, "kernel": Path("relative/vmlinuz")})
    with pytest.raises(HeroVMError, match="failed to validate against schema"):
        backend.define(s)
    assert backend.get(s.name) is None


def test_define_twice_is_already_exists(backend: LibvirtBackend, tmp_path: Path) -> None:
    s = spec(tmp_path)
    backend.define(s)
    with pytest.raises(AlreadyExists) as info:
        backend.define(s)
    assert info.value.exit_code == 4
    assert f"herovm down {s.name}" in (info.value.hint or "")
    assert [m.name for m in backend.list()].count(s.name) == 1


def test_start_destroy_state_transitions(backend: LibvirtBackend, tmp_path: Path) -> None:
    s = spec(tmp_path)
    backend.define(s)
    assert backend.get(s.name).state == "stopped"
    backend.start(s.name)
    assert backend.get(s.name).state == "running"
    with pytest.raises(HeroVMError, match=f"starting {s.name}"):
        backend.start(s.name)  # already running: libvirt refuses, wrapped in our error
    backend.destroy(s.name)
    assert backend.get(s.name).state == "stopped"
    backend.destroy(s.name)  # already stopped: not an error
    assert backend.get(s.name).state == "stopped"
    backend.start(s.name)
    assert backend.get(s.name).state == "running"


def test_paused_state(backend: LibvirtBackend, conn, tmp_path: Path) -> None:
    s = spec(tmp_path)
    backend.define(s)
    backend.start(s.name)
    conn.lookupByName(PREFIX + s.name).suspend()
    assert backend.get(s.name).state == "paused"
    assert [m.state for m in backend.list() if m.name == s.name] == ["paused"]


def test_start_unknown_is_not_found(backend: LibvirtBackend) -> None:
    with pytest.raises(NotFound):
        backend.start(unique("nope"))


def test_get_unknown_is_none(backend: LibvirtBackend) -> None:
    assert backend.get(unique("nope")) is None


def test_undefine_running_domain(backend: LibvirtBackend, conn, tmp_path: Path) -> None:
    s = spec(tmp_path)
    backend.define(s)
    backend.start(s.name)
    backend.undefine(s.name)  # stops it first; the test driver rejects the NVRAM flag: falls back
    assert backend.get(s.name) is None
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(PREFIX + s.name)


def test_undefine_and_destroy_of_absent_are_not_errors(backend: LibvirtBackend) -> None:
    name = unique("gone")
    backend.undefine(name)
    backend.destroy(name)
    assert backend.get(name) is None


def test_define_after_undefine(backend: LibvirtBackend, tmp_path: Path) -> None:
    s = spec(tmp_path)
    backend.define(s)
    backend.undefine(s.name)
    backend.define(s)
    assert backend.get(s.name).state == "stopped"


# ---------------------------------------------------------------------------------------- metadata


def _raw_metadata(conn, name: str, flags: int) -> dict:
    xml = conn.lookupByName(PREFIX + name).metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, flags)
    return json.loads(ElementTree.fromstring(xml).text)


def test_set_metadata_on_a_stopped_domain(backend: LibvirtBackend, conn, tmp_path: Path) -> None:
    s = spec(tmp_path, metadata={"a": 1})
    backend.define(s)
    new = {"a": 2, "last_boot": {"nonce": "n1", "outcome": "ready"}, "text": 'é <&> "q"'}
    backend.set_metadata(s.name, new)
    assert backend.get(s.name).metadata == new
    assert _raw_metadata(conn, s.name, libvirt.VIR_DOMAIN_AFFECT_CONFIG) == new
    backend.start(s.name)
    assert backend.get(s.name).metadata == new  # the config's metadata becomes the live one


def test_set_metadata_on_a_running_domain_reaches_live_and_config(
    backend: LibvirtBackend, conn, tmp_path: Path
) -> None:
    s = spec(tmp_path, metadata={"a": 1})
    backend.define(s)
    backend.start(s.name)
    backend.set_metadata(s.name, {"a": 3})
    assert _raw_metadata(conn, s.name, libvirt.VIR_DOMAIN_AFFECT_LIVE) == {"a": 3}
    assert _raw_metadata(conn, s.name, libvirt.VIR_DOMAIN_AFFECT_CONFIG) == {"a": 3}
    backend.destroy(s.name)
    assert backend.get(s.name).metadata == {"a": 3}  # survives the power-off


def test_set_metadata_unknown_is_not_found(backend: LibvirtBackend) -> None:
    with pytest.raises(NotFound):
        backend.set_metadata(unique("nope"), {})


def test_foreign_or_broken_metadata_reads_as_empty(backend: LibvirtBackend, conn, tmp_path: Path) -> None:
    s = spec(tmp_path)
    backend.define(s)
    dom = conn.lookupByName(PREFIX + s.name)
    dom.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        "<vm>not json</vm>",
        "herovm",
        NAMESPACE,
        libvirt.VIR_DOMAIN_AFFECT_CONFIG,
    )
    assert backend.get(s.name).metadata == {}
    dom.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, NAMESPACE, libvirt.VIR_DOMAIN_AFFECT_CONFIG
    )
    assert backend.get(s.name).metadata == {}


# -------------------------------------------------------------------------------------------- list


def test_list_shows_only_herovm_domains(backend: LibvirtBackend, conn, tmp_path: Path) -> None:
    names = sorted([unique("lb"), unique("la")])
    for n in names:
        backend.define(spec(tmp_path, n))
    foreign = unique("foreign")
    conn.defineXML(
        f"<domain type='test'><name>{foreign}</name><memory>1024</memory><os><type>hvm</type></os></domain>"
    )
    lookalike = "herovmx-" + unique()  # shares letters with the prefix, not the prefix
    conn.defineXML(
        f"<domain type='test'><name>{lookalike}</name><memory>1024</memory><os><type>hvm</type></os></domain>"
    )
    listed = [m.name for m in backend.list()]
    assert [n for n in listed if n in names] == names  # sorted
    assert foreign not in listed and lookalike not in listed
    assert "test" not in listed  # the driver's own default domain
    assert all(conn.lookupByName(PREFIX + n) for n in listed)


def test_list_includes_running_and_stopped(backend: LibvirtBackend, tmp_path: Path) -> None:
    a, b = unique("ra"), unique("rb")
    backend.define(spec(tmp_path, a))
    backend.define(spec(tmp_path, b))
    backend.start(a)
    states = {m.name: m.state for m in backend.list()}
    assert states[a] == "running" and states[b] == "stopped"


# ------------------------------------------------------------------------------------- connections


def test_unreachable_uri_is_backend_unavailable(tmp_path: Path) -> None:
    uri = f"qemu+unix:///system?socket={tmp_path}/nonexistent"
    backend = LibvirtBackend(uri)  # connects at first use
    with pytest.raises(BackendUnavailable) as info:
        backend.list()
    err = info.value
    assert err.exit_code == 5
    assert err.message.startswith(f"cannot connect to libvirt at {uri}: ")
    assert "\n" not in err.message
    assert "libvirtd -d" in (err.hint or "") and "--connect" in (err.hint or "")


def test_default_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEROVM_LIBVIRT_URI", URI)
    assert default_uri() == URI
    monkeypatch.delenv("HEROVM_LIBVIRT_URI")
    assert default_uri() == ("qemu:///system" if os.geteuid() == 0 else "qemu:///session")


def test_get_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    b = get_backend("libvirt", uri=URI)
    try:
        assert isinstance(b, LibvirtBackend) and b.uri == URI and b.name == "libvirt"
    finally:
        b.close()
    with pytest.raises(InvalidInput, match="unknown backend"):
        get_backend("vmware")


def test_close_twice_is_harmless() -> None:
    b = LibvirtBackend(URI)
    b.close()
    b.close()


def test_a_lost_connection_is_backend_unavailable(backend: LibvirtBackend, mocker) -> None:
    # A daemon that dies mid-call cannot be produced with the in-process test driver: fake only the error.
    err = libvirt.libvirtError("End of file while reading data: Input/output error")
    mocker.patch.object(err, "get_error_code", return_value=libvirt.VIR_ERR_RPC)
    mocker.patch.object(err, "get_error_message", return_value="End of file while reading data")
    mocker.patch.object(backend.conn, "listAllDomains", side_effect=err)
    with pytest.raises(BackendUnavailable, match="libvirt connection lost while listing domains") as info:
        backend.list()
    assert "libvirtd -d" in (info.value.hint or "")
