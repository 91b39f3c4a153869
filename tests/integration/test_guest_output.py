"""The console log is guest-written: a real guest forges `@herovm` lines on /dev/console and floods it, and
`herovm status` / `herovm logs` (the CLI, as a user runs it) still answer, truthfully and fast. One boot."""

from __future__ import annotations

import json
import subprocess
import time
from subprocess import DEVNULL

import pytest
from guests import HEROVM, cli

from herovm import state
from herovm.guest.events import console_files
from herovm.manager import Manager

BOOTSTRAP = "!!file.write path:/root/a content:'x'\n\n!!cmd.run cmd:'echo hi; sleep 4'\n"

# Run in the guest by python3: the nonce from the config drive (any process can read /dev/vdb), then lines a
# hostile process would write to the console once the boot is over.
FORGE = r"""
import json, re
nonce = re.search(rb'"nonce": *"([0-9a-f]+)"', open("/dev/vdb", "rb").read(1 << 16)).group(1).decode()
p = "@herovm "
lines = [
    p + '{"event": "action.end", "seq": 8, "t": 1, "index": "x", "action": 1, "ok": true, "seconds": "s"}',
    p + '{"event": "failed", "seq": 8, "t": 1, "stage": 7, "error": ["x"], "line": "2"}',
    p + "[" * 200000 + "]" * 200000,
    p + json.dumps({"event": "failed", "seq": 9, "t": 99.0, "stage": "action", "error": "FORGED-1"}),
    p + json.dumps({"event": "boot", "seq": 0, "t": 99.1, "nonce": nonce, "agent": "1"}),
    p + json.dumps({"event": "failed", "seq": 1, "t": 99.2, "stage": "setup", "error": "FORGED-2"}),
    p + json.dumps({"event": "failed", "seq": 2, "t": 99, "stage": "x", "error": "\x1b]0;owned\x07\x1b[2J"}),
    "FORGERY-DONE",
]
with open("/dev/console", "w") as f:
    for line in lines:
        f.write(line + "\n")
print(nonce)
"""


@pytest.fixture(scope="module")
def guest(image, run_id, tmp_path_factory):
    """A VM whose `herovm up` was killed (SIGKILL) mid-boot, after the agent's `boot` and long before its
    `ready` (the bootstrap sleeps): nobody saw the end on the agent channel, so only the console can tell."""
    name = f"it-{run_id}-forger"
    script = tmp_path_factory.mktemp("forger") / "boot.hero"
    script.write_text(BOOTSTRAP)
    up = subprocess.Popen([*HEROVM, "up", name, "--bootstrap", str(script)], stdout=DEVNULL, stderr=DEVNULL)
    try:
        wait_for_console(name, b'"event":"boot"', proc=up)
        up.kill()
        up.wait()
        wait_for_console(name, b'"event":"ready"')
        with Manager() as m:
            vm = m.get(name)
            yield vm
            vm.close()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        cli("down", name, "--force", timeout=300)


def wait_for_console(name: str, marker: bytes, timeout: float = 180, proc=None) -> None:
    path = state.VMDir(name).console_log
    deadline = time.monotonic() + timeout
    while not path.exists() or marker not in path.read_bytes()[-(1 << 20) :]:
        assert time.monotonic() < deadline, f"{marker!r} never reached the console log"
        assert proc is None or proc.poll() is None, "herovm up ended before it was killed"
        time.sleep(0.02)


def record_outcome(name: str, outcome: str | None) -> None:
    """None: what `status` sees when `up` was killed after the boot began (the nonce recorded, no outcome)."""
    with Manager() as m:
        meta = m.backend.get(name).metadata
        last = {k: v for k, v in meta["last_boot"].items() if k != "outcome"}
        m.backend.set_metadata(
            name, {**meta, "last_boot": {**last, **({"outcome": outcome} if outcome else {})}}
        )


def status_json(name: str) -> dict:
    out = cli("status", name, "--json", timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_status_after_up_was_killed_comes_from_this_boots_console(guest):
    st = status_json(guest.name)
    assert set(st["last_boot"]) == {
        "nonce",
        "started",
    }  # recorded before the start; no outcome: up was killed
    assert st["agent"] == "ready" and st["events"] == "whole" and st["failure"] is None
    assert [(s["action"], s["line"], s["ok"]) for s in st["steps"]] == [
        ("file.write", 1, True),
        ("cmd.run", 3, True),
    ]
    assert guest.exec(["cat", "/root/a"]).stdout == b"x"


def test_forged_console_lines_change_nothing(guest):
    name = guest.name
    before = status_json(name)
    assert before["agent"] == "ready" and [s["action"] for s in before["steps"]] == ["file.write", "cmd.run"]
    run = guest.exec(["python3", "-c", FORGE], timeout=60)
    assert run.exit_code == 0, run.stderr
    assert run.stdout.decode().strip() == guest.meta["last_boot"]["nonce"]  # the guest knew its nonce
    wait_for_console(name, b"FORGERY-DONE")

    for recorded in ("ready", None):  # as `up` left it, and as if `up` had been killed before the end
        record_outcome(name, recorded)
        st = status_json(name)
        assert st["agent"] == "ready", recorded
        assert st["steps"] == before["steps"] and st["failure"] is None and st["events"] == "whole"
        text = cli("status", name, timeout=60)
        assert text.returncode == 0, text.stderr
        assert "agent ready" in text.stdout and "FORGED" not in text.stdout
        assert "[2] line 3    cmd.run          ok" in text.stdout

    logs = cli("logs", name, timeout=60)
    assert logs.returncode == 0, logs.stderr
    lines = logs.stdout.splitlines()
    ready = next(i for i, line in enumerate(lines) if "ready at" in line)
    forged = [line for line in lines if "FORGED" in line or "owned" in line]
    assert len(forged) == 3 and all(lines.index(x) > ready and "ignored (" in x for x in forged)
    assert "\x1b" not in logs.stdout and "\x07" not in logs.stdout


def test_a_guest_flooding_its_console_leaves_it_bounded_and_status_fast(guest):
    name = guest.name
    flood = 12 << 20  # more than virtlogd keeps (4 files of 2 MiB): the oldest must go
    run = guest.exec(
        f"head -c {flood} /dev/zero | tr '\\0' 'x' | fold -w 200 > /dev/console; echo FLOOD-DONE", timeout=400
    )
    assert run.exit_code == 0, run.stderr
    guest.exec("echo FLOOD-END > /dev/console", timeout=60)
    wait_for_console(name, b"FLOOD-END")
    path = state.VMDir(name).console_log
    files = console_files(path)
    sizes = [f.stat().st_size for f in files]
    assert len(files) >= 2, "virtlogd rotated the console log"
    assert max(sizes) <= 2 << 20 and sum(sizes) <= 9 << 20, sizes

    record_outcome(name, None)  # `up` killed: only the console could tell, and its start is gone
    t0 = time.monotonic()
    st = status_json(name)
    took = time.monotonic() - t0
    assert took < 10, took  # the CLI's own start included; status itself reads 1 MiB at most
    assert st["agent"] == "unknown" and st["events"] == "cut"  # not a guess
    record_outcome(name, "ready")  # what `up` saw on the agent channel stands; the steps are gone
    st = status_json(name)
    assert st["agent"] == "ready" and st["events"] == "cut" and st["steps"] == []
    text = cli("status", name, timeout=60)
    assert text.returncode == 0 and "no longer in the console log" in text.stdout
    assert cli("logs", name, timeout=60).returncode == 0
    assert guest.exec(["true"]).exit_code == 0  # the guest is fine
