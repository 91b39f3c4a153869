"""The `herovm` command through typer's CliRunner, on libvirt's test driver and an empty HEROVM_HOME.

(Named test_cli_host.py: tests/unit/heroscript/test_cli.py already takes the module name test_cli, and
tests/unit has no __init__.py, so a second test_cli.py cannot be collected beside it.)
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest
from specs import spec, unique
from typer.testing import CliRunner

from herovm import __version__, state
from herovm.cli import app

URI = "test:///default"


@pytest.fixture(autouse=True)
def home(isolated_home: Path) -> Path:
    return isolated_home


def run(*args: str, uri: str = URI):
    return CliRunner().invoke(app, ["--connect", uri, *args])


def error_lines(result) -> list[str]:
    return result.stderr.splitlines()


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == __version__


def test_version_before_a_command() -> None:
    result = CliRunner().invoke(app, ["--version", "ls"])
    assert result.exit_code == 0
    assert result.stdout == f"{__version__}\n"


def test_no_args_shows_help() -> None:
    result = CliRunner().invoke(app, [])
    assert "Usage" in result.output
    assert "up" in result.output and "down" in result.output


def test_ls_empty() -> None:
    result = run("ls")
    assert result.exit_code == 0
    assert result.stdout == "no VMs (create one with `herovm up NAME`)\n"


def test_ls_json_empty() -> None:
    result = run("ls", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == []


def test_ls_shows_an_orphan() -> None:
    state.VMDir("orphan1").create()
    result = run("ls")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "HOST", "READY", "IMAGE", "ACCEL", "CPUS", "MEMORY", "SSH"]
    assert lines[1].split() == ["orphan1", "orphaned", "-", "no", "-", "-", "-", "-", "-"]


def test_down_unknown() -> None:
    result = run("down", "nope")
    assert result.exit_code == 3
    assert result.stdout == ""
    assert error_lines(result) == ["herovm: error: VM nope not found", "  hint: see `herovm ls`"]


def test_down_unknown_force() -> None:
    result = run("down", "nope", "--force")
    assert result.exit_code == 0
    assert result.stderr == ""


def test_down_unknown_json() -> None:
    result = run("down", "nope", "--json")
    assert result.exit_code == 3
    assert json.loads(result.stdout)["error"] == "NotFound"


def test_down_needs_a_name() -> None:
    result = run("down")
    assert result.exit_code == 2
    assert error_lines(result) == ["herovm: error: name a VM or give --all"]


def test_down_all_when_empty() -> None:
    result = run("down", "--all")
    assert result.exit_code == 0
    assert result.stdout == "removed 0 VM(s)\n"


def test_down_orphan() -> None:
    state.VMDir("orphan2").create()
    result = run("down", "orphan2")
    assert result.exit_code == 0
    assert state.list_vm_dirs() == []


def test_up_bad_name() -> None:
    result = run("up", "Bad Name")
    assert result.exit_code == 2
    lines = error_lines(result)
    assert lines[0] == "herovm: error: invalid VM name 'Bad Name'"
    assert lines[1].startswith("  hint: use 1-40 characters")
    assert state.list_vm_dirs() == []


def test_up_bad_memory() -> None:
    result = run("up", "x", "--memory", "1X")
    assert result.exit_code == 2
    assert "give a unit" in result.stderr
    assert result.stderr.startswith("herovm: error: memory: '1X' is not a size")
    assert "  hint: e.g. 1GB or 512MB" in error_lines(result)


def test_up_bad_var() -> None:
    result = run("up", "x", "--var", "novalue")
    assert result.exit_code == 2
    assert "--var 'novalue' is not KEY=VALUE" in result.stderr


def test_up_bad_accel_json() -> None:
    result = run("up", "x", "--accel", "hvf", "--json")
    assert result.exit_code == 2
    err = json.loads(result.stdout)
    assert err["error"] == "InvalidInput" and err["hint"] == "use kvm, tcg or auto"


def test_up_bootstrap_typo(tmp_path: Path) -> None:
    script = tmp_path / "b.hero"
    script.write_text("!!file.wrte path:/x\n")
    result = run("up", "x", "--bootstrap", str(script))
    assert result.exit_code == 2
    assert "b.hero:1:1: unknown action 'file.wrte'" in result.stderr


def test_up_bootstrap_fifo_is_refused_at_once(tmp_path: Path) -> None:
    """A real FIFO: reading it would wait for a writer for ever. (Should the CLI block on it after all, a
    writer opened after 10 s ends the wait, and the test fails instead of hanging.)"""
    fifo = tmp_path / "b.hero"
    os.mkfifo(fifo)
    unblock = threading.Timer(10, lambda: os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)))
    unblock.start()
    t0 = time.monotonic()
    try:
        result = run("up", "x", "--bootstrap", str(fifo))
    finally:
        unblock.cancel()
    assert time.monotonic() - t0 < 5
    assert result.exit_code == 2
    assert error_lines(result) == [f"herovm: error: bootstrap {fifo} is a FIFO, not a regular file"]
    assert state.list_vm_dirs() == []


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_up_bootstrap_device_is_one_line_error(device: str) -> None:
    result = run("up", "x", "--bootstrap", device)
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"herovm: error: bootstrap {device} is a character device, not a regular file"
    ]
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_up_bootstrap_without_actions_needs_allow_empty(tmp_path: Path) -> None:
    script = tmp_path / "setup.sh"
    script.write_text("#!/bin/sh\napt-get install -y nginx\n")
    result = run("up", "x", "--bootstrap", str(script))
    assert result.exit_code == 2
    assert error_lines(result) == [
        "herovm: error: bootstrap setup.sh has no actions (no `!!actor.name` line): is it a HeroScript file?",
        "  hint: to boot with an empty bootstrap anyway: --allow-empty (allow_empty:true in !!vm.create)",
    ]
    # with --allow-empty the bootstrap is accepted: the next check (the accelerator) speaks
    result = run("up", "x", "--bootstrap", str(script), "--allow-empty", "--accel", "hvf")
    assert result.exit_code == 2
    assert "unknown accelerator 'hvf'" in result.stderr


def test_up_secret_errors_never_repeat_what_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("hunter2_not_a_name", raising=False)
    result = run("up", "x", "--secret", "hunter2_not_a_name")
    assert result.exit_code == 2
    assert "hunter2" not in result.stderr
    assert (
        error_lines(result)[0]
        == "herovm: error: --secret number 1 names an environment variable that is not set"
    )
    result = run("up", "x", "--secret", "A=b", "--secret", "=hunter2")
    assert result.exit_code == 2 and "hunter2" not in result.stderr
    assert error_lines(result) == ["herovm: error: --secret number 2 is not NAME=VALUE or NAME"]


def test_up_secret_from_the_environment_is_not_in_an_error(tmp_path: Path) -> None:
    script = tmp_path / "b.hero"
    script.write_text("!!cmd.run cmd:'curl -H token:${T} example.org' timeout:${T}\n")
    env = {"T": "hunter2-Xy7"}
    result = CliRunner().invoke(
        app, ["--connect", URI, "up", "x", "--bootstrap", str(script), "--secret", "T", "--json"], env=env
    )
    assert result.exit_code == 2
    assert "hunter2" not in result.stdout + result.stderr
    err = json.loads(result.stdout)
    assert "timeout: '[secret T]' is not a duration" in err["message"]


def test_up_with_a_hostile_var_still_checks_the_bootstrap_as_written(tmp_path: Path, backend) -> None:
    """The value is one value: it cannot end the quote and start a `!!vm.copy` or `!!file.wrte` line."""
    script = tmp_path / "b.hero"
    script.write_text("!!cmd.run cmd:'echo ${X}'\n")
    hostile = "a'\n!!file.wrte path:/x\n"
    name = unique("hostile")
    backend.define(spec(tmp_path, name))  # what `up` checks after the bootstrap: whether the VM exists
    result = run("up", name, "--bootstrap", str(script), "--var", f"X={hostile}")
    assert result.exit_code == 4
    assert error_lines(result)[0] == f"herovm: error: VM {name} already exists (stopped) with other settings"


def test_up_url_fetch_ends_at_the_timeout() -> None:
    """`up --timeout 2s` against a real server on loopback that trickles its answer (~7 s): exit 2 in ~2 s."""
    from trickle import http_server

    body = b"!!dir.create path:/srv\n"
    sha = hashlib.sha256(body).hexdigest()
    with http_server(body, trickle="body", every=0.3) as base:
        t0 = time.monotonic()
        result = run(
            "up", "x", "--net", "restricted", "--bootstrap", f"{base}/b.hero", "--bootstrap-sha256", sha,
            "--timeout", "2s",
        )  # fmt: skip
        took = time.monotonic() - t0
    assert result.exit_code == 2
    assert (
        error_lines(result)[0]
        == f"herovm: error: cannot fetch bootstrap {base}/b.hero: no complete answer within 2s"
    )
    assert took < 3.5
    assert state.list_vm_dirs() == []


def test_exec_unknown() -> None:
    result = run("exec", "nope", "--", "true")
    assert result.exit_code == 3  # herovm's own "not found", as every command says it
    assert error_lines(result)[0] == "herovm: error: VM nope not found"


def test_ssh_and_cp_unknown() -> None:
    assert run("ssh", "nope").exit_code == 3
    result = run("cp", "./a", "nope:/tmp/a")
    assert result.exit_code == 3
    assert "VM nope not found" in result.stderr


def test_cp_needs_exactly_one_vm_side() -> None:
    for args in (("./a", "./b"), ("a:/x", "b:/y")):
        result = run("cp", *args)
        assert result.exit_code == 2
        assert "exactly one side of cp must be NAME:/path" in result.stderr


def test_status_unknown_json() -> None:
    result = run("status", "nope", "--json")
    assert result.exit_code == 3
    err = json.loads(result.stdout)
    assert err == {"error": "NotFound", "message": "VM nope not found", "hint": "see `herovm ls`"}


def test_status_invalid_name_json() -> None:
    result = run("status", "../x", "--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"] == "InvalidInput"


def test_logs_stop_start_unknown() -> None:
    for args in (("logs", "nope"), ("stop", "nope"), ("start", "nope")):
        result = run(*args)
        assert result.exit_code == 3, args
        assert result.stderr.startswith("herovm: error: VM nope not found"), args


def test_unreachable_libvirt(tmp_path: Path) -> None:
    result = run("ls", uri=f"qemu+unix:///system?socket={tmp_path}/none")
    assert result.exit_code == 5
    lines = error_lines(result)
    assert lines[0].startswith("herovm: error: cannot connect to libvirt at qemu+unix:///system")
    assert lines[1].startswith("  hint: is libvirtd running?")


def test_connect_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HEROVM_LIBVIRT_URI", f"qemu+unix:///system?socket={tmp_path}/none")
    result = CliRunner().invoke(app, ["ls"])
    assert result.exit_code == 5


def test_doctor_json() -> None:
    result = run("doctor", "--json")
    assert result.exit_code in (0, 1)
    checks = json.loads(result.stdout)
    names = [c["name"] for c in checks]
    for expected in ("qemu-system-x86_64", "qemu-img", "libvirt", "accelerator", "image", "cloud-hypervisor"):
        assert expected in names
    by_name = {c["name"]: c for c in checks}
    assert by_name["libvirt"]["status"] == "ok" and URI in by_name["libvirt"]["detail"]
    assert by_name["image"]["status"] == "warn"  # the tmp HEROVM_HOME holds no image
    assert all(
        c["status"] in ("ok", "warn", "fail") and set(c) == {"name", "status", "detail", "fix"}
        for c in checks
    )
    assert result.exit_code == (1 if any(c["status"] == "fail" for c in checks) else 0)


def test_doctor_text_with_unreachable_libvirt(tmp_path: Path) -> None:
    result = run("doctor", uri=f"qemu+unix:///system?socket={tmp_path}/none")
    assert result.exit_code == 1
    assert "[FAIL] libvirt: cannot connect to qemu+unix:///system" in result.stdout


def test_script_check_unknown_guest_action(tmp_path: Path) -> None:
    script = tmp_path / "setup.hero"
    script.write_text("!!file.write path:/x content:y\n!!cmd.rnu cmd:true\n")
    result = CliRunner().invoke(app, ["script", "check", str(script)])
    assert result.exit_code == 1
    assert f"{script}:2:1: error: unknown action 'cmd.rnu'" in result.stdout
    assert "did you mean cmd.run" in result.stdout


def test_script_check_valid(tmp_path: Path) -> None:
    script = tmp_path / "ok.hero"
    script.write_text("!!file.write path:/x content:y\n")
    result = CliRunner().invoke(app, ["script", "check", str(script)])
    assert result.exit_code == 0, result.output


def test_image_ls_empty(home: Path) -> None:
    result = CliRunner().invoke(app, ["image", "ls", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == []
    result = CliRunner().invoke(app, ["image", "ls"])
    assert result.exit_code == 0
    assert "no images cached" in result.stdout


def test_image_ls_lists_a_cached_image(home: Path) -> None:
    path = home / "images" / "default" / "abc123abc123"
    path.mkdir(parents=True)
    for name in ("vmlinuz", "initrd.img", "base.qcow2"):
        (path / name).write_bytes(b"x")
    files = {n: {"bytes": 1 << 20} for n in ("vmlinuz", "initrd.img", "base.qcow2")}
    (path / "manifest.json").write_text(
        json.dumps({"cmdline": "x", "built": "2025-01-01", "kernel_version": "6.1", "files": files})
    )
    rows = json.loads(CliRunner().invoke(app, ["image", "ls", "--json"]).stdout)
    assert rows == [
        {
            "recipe": "default",
            "id": "abc123abc123",
            "path": str(path),
            "built": "2025-01-01",
            "kernel": "6.1",
            "bytes": 3 << 20,
        }
    ]


def test_image_rm_unknown() -> None:
    result = CliRunner().invoke(app, ["image", "rm", "default"])
    assert result.exit_code == 3
    assert "no cached image default" in result.stderr
