"""Guest ports (herovm.ports): parsing --publish, the record, allocation, the domain's forwards (QEMU
hostfwd and passt's -t), `port add` on libvirt's test driver, and the `herovm port` command's errors."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path
from xml.etree import ElementTree

import libvirt
import pytest
from specs import spec, unique
from typer.testing import CliRunner

from herovm import images, ports, state
from herovm.backends import passt
from herovm.backends.base import MachineSpec
from herovm.backends.libvirt import NET_NAMESPACE, PREFIX, render_domain_xml
from herovm.cli import app
from herovm.errors import AlreadyExists, BootFailed, InvalidInput, NotFound, Unsupported
from herovm.manager import Manager
from herovm.ports import PortSpec, parse_publish, parse_spec
from herovm.record import RecordedSettings, VMRecord
from herovm.settings import VMSettings

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
URI = "test:///default"
needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")


@pytest.fixture(autouse=True)
def home(isolated_home: Path) -> Path:
    return isolated_home


# ------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "given, want",
    [
        ("8080", PortSpec(None, 8080)),
        (8080, PortSpec(None, 8080)),
        (" 9000:8080 ", PortSpec(9000, 8080)),
        ("127.0.0.1:9000:8080", PortSpec(9000, 8080)),
        ("localhost:9000:8080", PortSpec(9000, 8080)),
        ((9000, 8080), PortSpec(9000, 8080)),
        ((None, 22), PortSpec(None, 22)),
        ("65535:1", PortSpec(65535, 1)),
    ],
)
def test_parse_spec(given: object, want: PortSpec) -> None:
    assert parse_spec(given) == want


@pytest.mark.parametrize(
    "given, match",
    [
        ("", "guest port '' is not a port"),
        ("http", "guest port 'http' is not a port"),
        ("0", "guest port '0' is not a port from 1 to 65535"),
        ("65536", "not a port from 1 to 65535"),
        ("-1", "not a port"),
        ("9000:", "guest port ''"),
        (":8080", "host port ''"),
        ("9000:8080/udp", "guest port '8080/udp'"),
        ("0.0.0.0:9000:8080", "forwards listen on 127.0.0.1 only"),
        ("192.168.1.5:9000:8080", "forwards listen on 127.0.0.1 only"),
        ("a:b:c:d", "is not \\[HOST_PORT:\\]GUEST_PORT"),
        (True, "is not a port"),
        (8.5, "is not a port"),
        (70000, "not a port from 1 to 65535"),
    ],
)
def test_parse_spec_refuses(given: object, match: str) -> None:
    with pytest.raises(InvalidInput, match=match) as info:
        parse_spec(given)
    assert info.value.exit_code == 2


def test_parse_publish_lists_and_duplicates() -> None:
    assert parse_publish(None) == () == parse_publish([]) == parse_publish(())
    assert parse_publish("8080") == (PortSpec(None, 8080),)
    assert parse_publish(["8080", "9000:8081", 22]) == (
        PortSpec(None, 8080),
        PortSpec(9000, 8081),
        PortSpec(None, 22),
    )
    with pytest.raises(InvalidInput, match="guest port 8080 is given twice"):
        parse_publish(["8080", "9000:8080"])
    with pytest.raises(InvalidInput, match="host port 9000 is given twice"):
        parse_publish(["9000:8080", "9000:8081"])


def test_spec_text_round_trips() -> None:
    for text in ("8080", "9000:8080"):
        assert parse_spec(text).text() == text


def test_vm_settings_publish() -> None:
    assert VMSettings(publish=["8080", "9000:8081"]).publish == (PortSpec(None, 8080), PortSpec(9000, 8081))
    assert VMSettings().publish == ()
    assert VMSettings(net="restricted", publish=[8080]).publish == (PortSpec(None, 8080),)
    with pytest.raises(InvalidInput, match="publish: --net none has no network") as info:
        VMSettings(net="none", publish=["8080"])
    assert info.value.details["setting"] == "publish"
    with pytest.raises(InvalidInput) as info:
        VMSettings(publish=["x"])
    assert info.value.details["setting"] == "publish"
    # a clone publishes ports of its own: publish is not one of the template's settings
    assert VMSettings(template="t1", publish=["8080"]).publish == (PortSpec(None, 8080),)


def _problems(tmp_path: Path, text: str) -> list[str]:
    from herovm.playbook import check_playbook, load_playbook

    play = tmp_path / "p.hero"
    play.write_text(text)
    return [f"{p.line}:{p.col}: {p.message}" for p in check_playbook(load_playbook(play)) if p.is_error]


def test_playbook_create_takes_publish(tmp_path: Path) -> None:
    assert _problems(tmp_path, "!!vm.create name:w1 publish:'8080, 9000:8081' net:restricted\n") == []


def test_playbook_create_refuses_a_bad_port_at_its_parameter(tmp_path: Path) -> None:
    problems = _problems(tmp_path, "!!vm.create name:w1 publish:'http'\n")
    assert len(problems) == 1 and "publish 'http'" in problems[0] and problems[0].startswith("1:21:")
    problems = _problems(tmp_path, "!!vm.create name:w1 net:none publish:8080\n")
    assert len(problems) == 1 and "--net none has no network" in problems[0]


# -------------------------------------------------------------------------------------------- record


def test_record_keeps_ports_and_reads_old_records() -> None:
    r = VMRecord(name="a", ssh_port=40000, ports=((40001, 8080), (40002, 22)))
    data = r.to_json()
    assert data["ports"] == [{"host": 40001, "guest": 8080}, {"host": 40002, "guest": 22}]
    assert VMRecord.from_json("a", json.loads(json.dumps(data))).ports == r.ports
    assert "ports" not in VMRecord(name="a").to_json()  # as records were before ports existed
    assert VMRecord.from_json("a", {}).ports == ()
    junk = {"ports": [{"host": "x", "guest": 1}, [1, 2], {"host": 0, "guest": 5}, {"host": True, "guest": 2}]}
    assert VMRecord.from_json("a", junk).ports == ((1, 2),)
    assert VMRecord.from_json("a", {"ports": "8080"}).ports == ()


def test_recorded_settings_publish() -> None:
    assert "publish" not in RecordedSettings().to_json()
    s = RecordedSettings(publish=("8080", "9000:8081"))
    assert s.to_json()["publish"] == ["8080", "9000:8081"]
    assert RecordedSettings.from_json(s.to_json()) == s
    assert RecordedSettings(publish=("8080",)) != RecordedSettings()  # `up` again with other ports differs


# ---------------------------------------------------------------------------------- the domain's NIC


def _args(s: MachineSpec) -> list[str]:
    root = ElementTree.fromstring(render_domain_xml(s))
    return [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]


@pytest.mark.parametrize("net", ["nat", "restricted"])
def test_user_networking_forwards_each_port_on_loopback(tmp_path: Path, net: str) -> None:
    s = MachineSpec(
        **{**spec(tmp_path, ssh_port=40000).__dict__, "net": net, "ports": ((40001, 8080), (40002, 22))}
    )
    netdev = _args(s)[1]
    assert netdev.startswith("user,id=hostnet0,")
    assert ("restrict=on" in netdev) == (net == "restricted")
    fwds = [p for p in netdev.split(",") if p.startswith("hostfwd=")]
    assert fwds == [
        "hostfwd=tcp:127.0.0.1:40000-:22",
        "hostfwd=tcp:127.0.0.1:40001-:8080",
        "hostfwd=tcp:127.0.0.1:40002-:22",
    ]
    meta = ElementTree.fromstring(render_domain_xml(s)).find(f"metadata/{{{NET_NAMESPACE}}}net")
    assert json.loads(meta.text)["ports"] == [[40001, 8080], [40002, 22]]


def test_default_mode_forwards_through_passt_not_qemu(tmp_path: Path) -> None:
    s = MachineSpec(
        **{
            **spec(tmp_path).__dict__,
            "net": "default",
            "net_dir": tmp_path / "net",
            "ports": ((40001, 8080),),
        }
    )
    assert "hostfwd" not in " ".join(_args(s))
    meta = ElementTree.fromstring(render_domain_xml(s)).find(f"metadata/{{{NET_NAMESPACE}}}net")
    assert json.loads(meta.text)["ports"] == [[40001, 8080]]


def test_passt_gets_one_loopback_forward_per_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from herovm.backends import hostguard

    seen: list[list[str]] = []

    def run(cmd, **kwargs):
        seen.append(cmd)
        passt.socket_path(tmp_path / "net").touch()
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/passt")
    monkeypatch.setattr(hostguard, "install", lambda: 0)
    monkeypatch.setattr(subprocess, "run", run)
    passt.start(tmp_path / "net", 40000, None, [(40001, 8080), (40002, 9090)])
    cmd = seen[0]
    forwards = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--tcp-ports"]
    assert forwards == ["127.0.0.1/40000:22", "127.0.0.1/40001:8080", "127.0.0.1/40002:9090"]
    assert cmd[cmd.index("--udp-ports") + 1] == "none"


# ---------------------------------------------------------------------------------------- allocation


class _NoForwards:
    name = "plain"

    def list(self) -> list:
        return []


def _busy_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


def test_allocate(backend) -> None:
    ssh, forwards = ports.allocate(backend, "nat", ["8080", "22"])
    hosts = [ssh] + [h for h, _ in forwards]
    assert len(set(hosts)) == 3 and [g for _, g in forwards] == [8080, 22]
    assert ports.allocate(backend, "none", []) == (None, ())
    with pytest.raises(InvalidInput, match="--net none has no network"):
        ports.allocate(backend, "none", ["8080"])
    with pytest.raises(Unsupported, match="the plain backend cannot forward guest ports"):
        ports.allocate(_NoForwards(), "nat", ["8080"])
    assert ports.allocate(_NoForwards(), "nat", [])[1] == ()


def test_allocate_refuses_a_host_port_in_use(backend) -> None:
    sock, busy = _busy_port()
    with sock, pytest.raises(AlreadyExists, match=f"127.0.0.1:{busy} is already in use") as info:
        ports.allocate(backend, "nat", [f"{busy}:8080"])
    assert info.value.exit_code == 4


def test_allocate_skips_ports_other_vms_recorded(backend, tmp_path: Path, monkeypatch) -> None:
    name = unique()
    backend.define(
        spec(tmp_path, name, metadata=VMRecord(name, ssh_port=41000, ports=((41001, 80),)).to_json())
    )
    with pytest.raises(AlreadyExists, match="127.0.0.1:41001 is already in use"):
        ports.allocate(backend, "nat", ["41001:8080"])
    offered = iter([41000, 41001, 41002, 41003])
    monkeypatch.setattr(state, "allocate_port", lambda taken: next(p for p in offered if p not in taken))
    assert ports.allocate(backend, "nat", ["8080"]) == (41002, ((41003, 8080),))


def test_for_clone_takes_the_origins_guest_ports_on_new_host_ports() -> None:
    inherited = ((40001, 8080), (40002, 9090))
    assert ports.for_clone(inherited, ()) == (PortSpec(None, 8080), PortSpec(None, 9090))
    own = (PortSpec(9999, 9090), PortSpec(None, 5000))
    assert ports.for_clone(inherited, own) == (
        PortSpec(None, 8080),
        PortSpec(9999, 9090),
        PortSpec(None, 5000),
    )


# ------------------------------------------------------------------------- the Manager, on test:///


@pytest.fixture
def fake_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> images.Image:
    path = tmp_path / "image"
    path.mkdir()
    (path / "vmlinuz").write_bytes(b"kernel")
    (path / "initrd.img").write_bytes(b"initrd")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path / "base.qcow2"), "1G"], check=True)
    img = images.Image("default", "fakeid000001", path, {"cmdline": "console=ttyS0", "root_size": 1 << 30})
    monkeypatch.setattr(images, "ensure", lambda name="default", progress=None: img)
    return img


def _defined(manager: Manager, name: str, **options) -> VMRecord:
    """A VM that `up` defined and recorded (its boot fails: the test driver runs no guest)."""
    with pytest.raises(BootFailed):
        manager.up(name, timeout=0.3, keep_failed=True, **options)
    return manager.record(name)


@needs_qemu_img
def test_up_records_and_defines_the_forwards(manager: Manager, backend, fake_image) -> None:
    name = unique()
    record = _defined(manager, name, net="nat", publish=["8080", "9090"])
    assert [g for _, g in record.ports] == [8080, 9090]
    assert record.settings.publish == ("8080", "9090")
    assert len({record.ssh_port, *(h for h, _ in record.ports)}) == 3
    # what is defined (the test driver keeps no QEMU arguments, so they are checked as rendered)
    xml = render_domain_xml(manager.machine_spec(state.VMDir(name), fake_image, record))
    for h, g in record.ports:
        assert f"hostfwd=tcp:127.0.0.1:{h}-:{g}" in xml
    assert manager.port(name, 8080) == ("127.0.0.1", record.ports[0][0])
    assert manager.get(name).port(9090) == ("127.0.0.1", record.ports[1][0])
    with pytest.raises(NotFound, match=f"guest port 22 of VM {name} is not published") as info:
        manager.port(name, 22)
    assert info.value.exit_code == 3 and f"herovm port add {name} 22" in (info.value.hint or "")
    assert manager.ls()[0]["ports"][0]["address"] == f"127.0.0.1:{record.ports[0][0]}"
    assert [p["guest_port"] for p in manager.status(name)["ports"]] == [8080, 9090]
    assert json.loads(state.VMDir(name).meta_file.read_text())["ports"][0]["guest"] == 8080
    manager.down(name)


@needs_qemu_img
def test_publish_to_a_stopped_vm_is_defined_for_its_next_start(manager: Manager, backend, fake_image) -> None:
    name = unique()
    for net in ("nat", "default"):
        _defined(manager, f"{name}{net}", net=net)
        backend.destroy(f"{name}{net}")
        host, port = manager.publish(f"{name}{net}", 8080)
        assert host == "127.0.0.1" and manager.port(f"{name}{net}", 8080) == (host, port)
        assert manager.publish(f"{name}{net}", 8080) == (host, port)  # published already: as it is
        with pytest.raises(AlreadyExists, match="published on 127.0.0.1"):
            manager.publish(f"{name}{net}", 8080, port + 1 if port < 65535 else port - 1)
        dom = backend.conn.lookupByName(PREFIX + f"{name}{net}")
        net_meta = json.loads(
            ElementTree.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NET_NAMESPACE)).text
        )
        assert net_meta["ports"] == [[port, 8080]]  # what passt is started with
        assert json.loads(state.VMDir(f"{name}{net}").meta_file.read_text())["ports"] == [
            {"host": port, "guest": 8080}
        ]
        manager.down(f"{name}{net}")


@needs_qemu_img
def test_publish_to_a_running_default_mode_vm_is_refused(manager: Manager, backend, fake_image) -> None:
    name = unique()
    _defined(manager, name, net="default")
    assert manager.machine(name).state == "running"  # kept running (the test driver runs no guest)
    with pytest.raises(Unsupported, match="default network mode, whose forwards .* are fixed") as info:
        manager.publish(name, 8080)
    assert "--publish 8080" in (info.value.hint or "")
    assert manager.record(name).ports == ()
    manager.down(name)


@needs_qemu_img
def test_publish_to_a_vm_without_network_is_refused(manager: Manager, fake_image) -> None:
    name = unique()
    _defined(manager, name, net="none")
    with pytest.raises(InvalidInput, match="has no network"):
        manager.publish(name, 8080)
    manager.down(name)


def test_port_of_an_unknown_vm_is_not_found(manager: Manager) -> None:
    with pytest.raises(NotFound):
        manager.port("nope", 8080)
    with pytest.raises(NotFound):
        manager.publish("nope", 8080)


# ------------------------------------------------------------------------------------- herovm port


def run(*args: str):
    return CliRunner().invoke(app, ["--connect", URI, *args])


def test_cli_port_errors() -> None:
    r = run("port", "nope", "8080")
    assert r.exit_code == 3 and "VM nope not found" in r.output
    r = run("port", "nope", "8080", "--json")
    assert r.exit_code == 3 and json.loads(r.stdout)["error"] == "NotFound"
    r = run("port", "add", "nope", "8080")
    assert r.exit_code == 3
    r = run("port", "ls", "nope")
    assert r.exit_code == 3
    for bad in (["port", "box", "http"], ["port", "box"], ["port", "add", "box"], ["port", "box", "0"]):
        r = run(*bad)
        assert r.exit_code == 2, (bad, r.output)
        assert "hint:" in r.output
    r = run("port", "box", "8080", "--host-port", "9000")
    assert r.exit_code == 2 and "--host-port belongs to port add" in r.output


def test_cli_up_refuses_publish_without_network() -> None:
    r = run("up", "box", "--net", "none", "--publish", "8080")
    assert r.exit_code == 2 and "--net none has no network" in r.output
    r = run("up", "box", "--publish", "0.0.0.0:80:8080")
    assert r.exit_code == 2 and "forwards listen on 127.0.0.1 only" in r.output


@needs_qemu_img
def test_cli_port_of_a_vm(manager: Manager, fake_image) -> None:
    name = unique()
    record = _defined(manager, name, net="restricted", publish=["8080"])
    host_port = record.ports[0][0]
    r = run("port", name, "8080")
    assert r.exit_code == 0 and r.stdout.strip() == f"127.0.0.1:{host_port}"
    r = run("port", name, "8080", "--json")
    assert json.loads(r.stdout) == {
        "name": name,
        "guest_port": 8080,
        "host": "127.0.0.1",
        "host_port": host_port,
        "address": f"127.0.0.1:{host_port}",
    }
    r = run("port", name, "9090")
    assert r.exit_code == 3 and "not published" in r.output
    r = run("port", "ls", name)
    assert r.stdout.strip() == f"8080/tcp -> 127.0.0.1:{host_port}"
    r = run("port", "ls", name, "--json")
    assert [p["guest_port"] for p in json.loads(r.stdout)] == [8080]
    manager.down(name)
