"""CloudHypervisorBackend's whole lifecycle against the stand-in VMM, and what it leaves behind."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

from herovm.backends import get_backend
from herovm.backends.cloud_hypervisor import CloudHypervisorBackend, CloudHypervisorError, vm_config
from herovm.errors import AlreadyExists, HeroVMError, InvalidInput, NotFound

from . import contract
from .conftest import StandIn, alive


def test_get_backend_names_it(standin: StandIn) -> None:
    assert isinstance(get_backend("cloud-hypervisor", binary=standin.binary), CloudHypervisorBackend)
    assert get_backend("ch").name == "cloud-hypervisor"


def test_vm_config_fits_the_document(standin: StandIn) -> None:
    spec = standin.spec()
    config = vm_config(spec, spec.kernel, spec.disk.parent / "vsock.sock")
    assert contract.schema_errors("#/components/schemas/VmConfig", config) == []
    assert config["disks"][1] == {
        "id": "drive",
        "path": str(spec.drive),
        "image_type": "Raw",
        "readonly": True,
    }
    assert "net" not in config and config["console"] == {"mode": "Off"}
    assert config["serial"] == {"mode": "File", "file": str(spec.console_log)}
    # and the checker does catch what the VMM would not take
    assert contract.schema_errors("#/components/schemas/VmConfig", {**config, "cpus": {"boot_vcpus": 1}})


def test_whole_lifecycle(standin: StandIn) -> None:
    b = standin.backend()
    spec = standin.spec()
    b.define(spec)
    state_file = b.state_dir() / "box.json"
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(b.state_dir().stat().st_mode) == 0o700
    st = json.loads(state_file.read_text())
    assert alive(st["pid"]) and (spec.disk.parent / "cloud-hypervisor.pid").read_text().strip() == str(
        st["pid"]
    )
    assert b.get("box").state == "stopped"  # created, not booted
    assert [m.name for m in b.list()] == ["box"]
    with pytest.raises(AlreadyExists):
        b.define(spec)

    b.start("box")
    assert b.get("box").state == "running"
    assert spec.console_log.exists()  # serial to file
    b.set_metadata("box", {"name": "box", "last_boot": {"outcome": "ready"}})
    assert b.get("box").metadata["last_boot"] == {"outcome": "ready"}

    b.pause("box")
    assert b.get("box").state == "paused"
    b.resume("box")
    assert b.get("box").state == "running"

    first = st["pid"]
    b.destroy("box")
    assert not alive(first)
    assert b.get("box").state == "stopped"
    for left in ("ch-api.sock", "vsock.sock", "cloud-hypervisor.pid"):
        assert not (spec.disk.parent / left).exists(), left
    b.destroy("box")  # no error when already off

    b.start("box")  # a fresh VMM: vm.create again, then vm.boot
    second = json.loads(state_file.read_text())["pid"]
    assert second != first and b.get("box").state == "running"

    b.undefine("box")
    assert b.get("box") is None and not state_file.exists() and not alive(second)
    b.undefine("box")  # no error when absent
    assert b.list() == []
    b.close()

    assert standin.endpoints() == [
        "vmm.ping", "vm.create", "vm.info", "vm.info",  # define, get, list
        "vm.info", "vm.boot", "vm.info", "vm.info",  # start, get, set_metadata's get
        "vm.pause", "vm.info", "vm.resume", "vm.info",
        "vm.shutdown", "vmm.shutdown",  # destroy
        "vmm.ping", "vm.create", "vm.boot", "vm.info",  # start again
        "vm.shutdown", "vmm.shutdown",  # undefine
    ]  # fmt: skip


def test_failed_create_leaves_no_process_and_no_state_file(standin: StandIn, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_CH_FAIL", "vm.create:500")
    b = standin.backend()
    with pytest.raises(CloudHypervisorError) as info:
        b.define(standin.spec())
    assert info.value.details["status"] == 500
    assert "injected failure of vm.create" in info.value.message
    assert b.get("box") is None and list(b.state_dir().iterdir()) == []
    assert standin.pids() and not any(alive(p) for p in standin.pids())


def test_a_vmm_that_exits_at_once_leaves_nothing(standin: StandIn, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_CH_EXIT", "1")
    b = standin.backend()
    with pytest.raises(HeroVMError, match="exited at once.*told to fail"):
        b.define(standin.spec())
    assert b.get("box") is None and list(b.state_dir().iterdir()) == []


def test_no_binary_says_why(standin: StandIn, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(standin.home / "nothing"))
    monkeypatch.delenv("HEROVM_CLOUD_HYPERVISOR", raising=False)
    b = CloudHypervisorBackend(kernel=lambda bz: bz)
    with pytest.raises(HeroVMError, match="cloud-hypervisor is not installed") as info:
        b.define(standin.spec())
    assert info.value.exit_code == 5 and "HEROVM_CLOUD_HYPERVISOR" in (info.value.hint or "")
    assert b.get("box") is None


def test_a_network_mode_is_refused_before_anything_runs(standin: StandIn) -> None:
    b = standin.backend()
    with pytest.raises(InvalidInput, match="no network device"):
        b.define(standin.spec(net="nat", ssh_port=2222))
    assert b.get("box") is None and standin.requests() == []


def test_a_boot_that_fails_ends_the_vmm_and_keeps_the_definition(standin: StandIn) -> None:
    b = standin.backend()
    spec = standin.spec()
    b.define(spec)
    pid = json.loads((b.state_dir() / "box.json").read_text())["pid"]
    spec.drive.unlink()  # the VMM cannot open a disk at boot
    with pytest.raises(CloudHypervisorError, match="Cannot open"):
        b.start("box")
    assert not alive(pid) and b.get("box").state == "stopped"
    b.undefine("box")


@pytest.mark.parametrize("hang", ["vm.shutdown", "vmm.shutdown"])
def test_a_hung_api_is_killed_on_destroy(standin: StandIn, monkeypatch, hang: str) -> None:
    monkeypatch.setenv("FAKE_CH_HANG", hang)
    monkeypatch.setenv("FAKE_CH_IGNORE_TERM", "1")  # only SIGKILL ends it
    b = standin.backend(api_timeout=0.5)
    b.define(standin.spec())
    b.start("box")
    pid = json.loads((b.state_dir() / "box.json").read_text())["pid"]
    t = time.monotonic()
    b.undefine("box")
    assert time.monotonic() - t < 0.5 + 2.0 + 3.0  # API timeout, SIGTERM's grace, then SIGKILL
    assert not alive(pid) and b.get("box") is None


def test_a_reused_pid_is_never_signalled(standin: StandIn) -> None:
    b = standin.backend()
    b.define(standin.spec())
    path = b.state_dir() / "box.json"
    st = json.loads(path.read_text())
    real = st["pid"]
    b.destroy("box")
    st["pid"] = os.getpid()  # the recorded pid now belongs to someone else (here: this test)
    path.write_text(json.dumps(st))
    assert b.get("box").state == "stopped"
    b.undefine("box")  # must not kill this process
    assert alive(os.getpid()) and not alive(real)


def test_wrong_states_and_stopped_vms(standin: StandIn) -> None:
    b = standin.backend()
    with pytest.raises(NotFound):
        b.start("nope")
    with pytest.raises(NotFound):
        b.set_metadata("nope", {})
    b.define(standin.spec())
    with pytest.raises(CloudHypervisorError) as info:
        b.pause("box")  # created, not booted: the document's 405
    assert info.value.details["status"] == 405
    b.start("box")
    with pytest.raises(CloudHypervisorError) as info:
        b.resume("box")  # running, not paused
    assert info.value.details["status"] == 405 and "could not be resumed" in info.value.message
    b.destroy("box")
    with pytest.raises(HeroVMError, match="is stopped"):
        b.pause("box")
    b.undefine("box")


def test_error_answers_have_cloud_hypervisors_shape(standin: StandIn, monkeypatch) -> None:
    monkeypatch.setenv(
        "FAKE_CH_LOG", str(standin.home / "bad-requests.jsonl")
    )  # kept out of the contract check
    b = standin.backend()
    b.define(standin.spec())
    st = json.loads((b.state_dir() / "box.json").read_text())
    with pytest.raises(CloudHypervisorError) as info:
        b._api(st, "GET", "vm.no-such-thing")
    assert info.value.details["status"] == 404 and info.value.message.endswith(": Not Found")
    with pytest.raises(CloudHypervisorError) as info:
        b._api(st, "GET", "vm.create")  # a method the path does not have
    assert info.value.details["status"] == 400
    with pytest.raises(CloudHypervisorError) as info:
        b._api(st, "PUT", "vm.snapshot", {"destination": "x"})  # not the schema's field name
    assert info.value.details["status"] == 400 and "destination" in info.value.message
    with pytest.raises(CloudHypervisorError) as info:
        b._api(st, "GET", "vm.info") and b._api(st, "PUT", "vm.create", st["config"])
    assert info.value.details["status"] == 500 and "already created" in info.value.message
    b.undefine("box")
    answers = [
        json.loads(line)["answer"] for line in (standin.home / "bad-requests.jsonl").read_text().splitlines()
    ]
    errors = [a for a in answers if isinstance(a, list)]
    assert errors and all(all(isinstance(m, str) for m in a) for a in errors)
