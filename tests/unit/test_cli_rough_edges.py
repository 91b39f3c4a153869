"""The rough edges a new user hit (issue 16), each held: usage errors are one line and a hint, like herovm's
own; status takes several VMs and says the truth about stopped ones; `ls` says READY only for a VM that
answers; `stop --timeout` takes a duration; `exec --json`; events are rendered for people; `up` prints a
failed action's output. On libvirt's test driver, through the real `herovm` entry point where it matters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from specs import define_in_vmdir, unique
from typer.testing import CliRunner

from herovm.cli import app
from herovm.errors import BootFailed

URI = "test:///default"


@pytest.fixture(autouse=True)
def home(isolated_home: Path) -> Path:
    return isolated_home


def run(*args: str):
    return CliRunner().invoke(app, ["--connect", URI, *args])


def herovm(*args: str) -> subprocess.CompletedProcess:
    """The installed entry point (herovm.cli:main), not typer's runner: usage errors are formatted there."""
    return subprocess.run([sys.executable, "-m", "herovm", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "message", "where"),
    [
        (["up"], "Missing argument 'NAME'.", "herovm up"),
        (
            ["up", "x", "--cpus", "lots"],
            "Invalid value for '--cpus': 'lots' is not a valid integer.",
            "herovm up",
        ),
        (["nosuch"], "No such command 'nosuch'.", "herovm"),
        (["snapshot", "create", "x"], "Missing argument 'SNAP'.", "herovm snapshot create"),
    ],
)
def test_usage_errors_are_one_line_and_a_hint(args: list[str], message: str, where: str) -> None:
    result = herovm(*args)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"herovm: error: {message}", f"  hint: see `{where} --help`"]
    assert "╭" not in result.stderr + result.stdout


def test_several_vms_status_and_the_truth_about_a_stopped_one(tmp_path: Path, backend) -> None:
    names = [unique("st"), unique("st")]
    for name in names:
        define_in_vmdir(backend, tmp_path, name, {"last_boot": {"nonce": "N", "outcome": "ready"}})
    text = run("status", *names)
    assert text.exit_code == 0
    assert [line for line in text.stdout.splitlines() if line and not line.startswith(" ")] == [
        f"{name}: stopped (its last boot: ready)" for name in names
    ]
    assert "agent ready" not in text.stdout
    listed = json.loads(run("status", *names, "--json").stdout)
    assert [s["name"] for s in listed] == names and all(s["state"] == "stopped" for s in listed)
    assert json.loads(run("status", names[0], "--json").stdout)["name"] == names[0]  # one: an object
    rows = json.loads(run("ls", "--json").stdout)
    assert {r["name"]: r["ready"] for r in rows if r["name"] in names} == dict.fromkeys(names, False)
    missing = run("status", names[0], "nope-vm")
    assert missing.exit_code == 3 and "VM nope-vm not found" in missing.stderr


def test_stop_takes_a_duration(tmp_path: Path, backend) -> None:
    name = unique("stop")
    define_in_vmdir(backend, tmp_path, name, {})
    assert run("stop", name, "--timeout", "lots").exit_code == 2
    result = run("stop", name, "--timeout", "5s", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == {"name": name, "state": "stopped"}


def test_exec_json_and_its_own_failures() -> None:
    result = run("exec", "nope", "--json", "--", "true")
    assert result.exit_code == 3
    assert json.loads(result.stdout)["error"] == "NotFound"
    assert run("exec", "Bad_Name", "--", "true").exit_code == 2


def test_a_failed_actions_output_is_printed_inert(capsys: pytest.CaptureFixture[str]) -> None:
    import click

    from herovm.cli import _fail

    error = BootFailed("bootstrap failed", hint="inspect it", output="one\ntwo\x1b[2J\n")
    with pytest.raises(click.exceptions.Exit):
        _fail(error)
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "herovm: error: bootstrap failed",
        "  output| one",
        "  output| two\\x1b[2J",
        "  hint: inspect it",
    ]


def test_image_build_force_is_refused_while_something_lies_on_the_image(home: Path) -> None:
    """`--force` rebuilds (it used to do nothing when cached), but never under a VM's, template's or fork
    layer's disk: the image's base would change under their overlays."""
    from herovm import disks, images, state
    from herovm.errors import Busy

    recipe = images.load_recipe("default")
    path = state.images_dir() / "default" / images.image_id(recipe)
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"cmdline": "x", "built": "then"}))
    for name in ("vmlinuz", "initrd.img"):
        (path / name).write_bytes(b"")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path / "base.qcow2"), "1M"], check=True)
    vmdir = state.VMDir("user1")
    vmdir.create()
    disks.create_overlay(path / "base.qcow2", vmdir.disk, what="user1")
    template = home / "templates" / "t1"
    template.mkdir(parents=True)
    disks.create_overlay(path / "base.qcow2", template / "disk.qcow2", what="t1")
    assert disks.users_of(path / "base.qcow2", home) == ["user1", "template t1"]
    with pytest.raises(Busy, match=r"image default/\w+ is in use: user1, template t1 lie on it"):
        images.build("default", force=True)
    assert images.build("default") == images.find("default")  # without --force: the cached one


def test_logs_json_is_one_event_a_line_and_says_which_count(tmp_path: Path, backend) -> None:
    from herovm import state
    from herovm.protocol import CONSOLE_PREFIX

    name = unique("logs")
    define_in_vmdir(backend, tmp_path, name, {"last_boot": {"nonce": "N"}})
    events = [
        {"event": "boot", "seq": 0, "t": 1.0, "nonce": "N"},
        {"event": "ready", "seq": 1, "t": 2.0},
        {"event": "ready", "seq": 2, "t": 3.0},  # a second end: a guest's forgery, it does not count
    ]
    lines = ["[    0.5] kernel says hi"] + [CONSOLE_PREFIX + json.dumps(e) for e in events]
    state.VMDir(name).console_log.write_text("\n".join(lines) + "\n")
    out = [json.loads(line) for line in run("logs", name, "--json").stdout.splitlines()]
    assert [(e["event"], e["counts"]) for e in out] == [("boot", True), ("ready", True), ("ready", False)]
    raw = [json.loads(line) for line in run("logs", name, "--console", "--json").stdout.splitlines()]
    assert raw[0] == "[    0.5] kernel says hi" and len(raw) == 4
    assert json.loads(run("image", "rm", "default", "000000000000", "--json").stdout)["error"] == "NotFound"
