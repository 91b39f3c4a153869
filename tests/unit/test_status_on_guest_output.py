"""`status` and `logs` read what the guest wrote to its console as hostile input: forged `@herovm` lines,
nesting past the recursion limit, a rotated log, and anything hypothesis makes up. Through the Manager and
through the CLI (typer's CliRunner) on libvirt's test driver, over console files written here."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from specs import define_in_vmdir
from typer.testing import CliRunner

from herovm import state
from herovm.backends.libvirt import LibvirtBackend
from herovm.cli import app
from herovm.guest.events import CONSOLE_WINDOW
from herovm.manager import Manager
from herovm.protocol import CONSOLE_PREFIX

URI = "test:///default"
NONCE = "9f2c" * 8
_counter = itertools.count()


@pytest.fixture(autouse=True)
def home(isolated_home: Path) -> Path:
    return isolated_home


def define(backend: LibvirtBackend, tmp_path: Path, last_boot: dict) -> str:
    name = f"out{next(_counter)}-{uuid.uuid4().hex[:6]}"
    meta = {
        "settings": {"cpus": 1, "memory": 256 << 20, "accel": "tcg"},
        "image": "default",
        "last_boot": last_boot,
    }
    define_in_vmdir(backend, tmp_path, name, meta)
    return name


def at(event: dict) -> str:
    return f"[    2.0] {CONSOLE_PREFIX}{json.dumps(event)}"


def real_boot(nonce: str = NONCE) -> list[str]:
    """What the agent mirrors for a boot with two actions, with kernel lines around it."""
    return [
        "[    0.000000] Linux version 6.1.0-28-cloud-amd64",
        at({"event": "boot", "seq": 0, "t": 2.6, "nonce": nonce, "agent": "1", "kernel": "6.1", "pid": 1}),
        at({"event": "setup", "seq": 1, "t": 2.7, "step": "network", "ok": True, "seconds": 0.07}),
        at({"event": "bootstrap", "seq": 2, "t": 2.7, "source": "drive", "actions": 2, "sha256": "ab"}),
        at(
            {
                "event": "action.start",
                "seq": 3,
                "t": 2.7,
                "index": 0,
                "action": "file.write",
                "file": "b",
                "line": 1,
            }
        ),
        at(
            {
                "event": "action.end",
                "seq": 4,
                "t": 2.8,
                "index": 0,
                "action": "file.write",
                "line": 1,
                "ok": True,
                "seconds": 0.01,
                "exit_code": None,
                "output": "",
            }
        ),
        at(
            {
                "event": "action.start",
                "seq": 5,
                "t": 2.8,
                "index": 1,
                "action": "cmd.run",
                "file": "b",
                "line": 3,
            }
        ),
        at(
            {
                "event": "action.end",
                "seq": 6,
                "t": 2.9,
                "index": 1,
                "action": "cmd.run",
                "line": 3,
                "ok": True,
                "seconds": 0.1,
                "exit_code": 0,
                "output": "hi\n",
            }
        ),
        at({"event": "ready", "seq": 7, "t": 3.0, "actions": 2, "seconds": 0.4}),
    ]


REAL_STEPS = [
    {
        "index": 0,
        "action": "file.write",
        "line": 1,
        "ok": True,
        "seconds": 0.01,
        "exit_code": None,
        "error": None,
    },
    {"index": 1, "action": "cmd.run", "line": 3, "ok": True, "seconds": 0.1, "exit_code": 0, "error": None},
]

# What a process in the guest can write to /dev/console once the boot is over (it knows the nonce: it can
# read the config drive).
FORGED = [
    # shaped to make the renderers raise TypeError: strings where numbers go, and the reverse
    CONSOLE_PREFIX
    + '{"event": "action.end", "seq": 8, "t": 1, "index": "x", "action": 1, "ok": true, "seconds": "s"}',
    CONSOLE_PREFIX + '{"event": "action.start", "seq": 8, "t": "1", "index": [], "action": {}, "line": {}}',
    CONSOLE_PREFIX + '{"event": "failed", "seq": 8, "t": 1, "stage": 7, "error": ["x"], "line": "2"}',
    CONSOLE_PREFIX + '{"event": "boot"}',
    CONSOLE_PREFIX + '{"event": 5}',
    # far deeper than the recursion limit
    CONSOLE_PREFIX + "[" * 100_000 + "]" * 100_000,
    CONSOLE_PREFIX + '{"event": "failed", "seq": 9, "t": 9, "stage": "x", "error": ' + "[" * 50_000,
    # well-formed, the right nonce, after ready
    at(
        {
            "event": "failed",
            "seq": 8,
            "t": 9.0,
            "stage": "action",
            "error": "forged",
            "line": 1,
            "action": "x.y",
        }
    ),
    at({"event": "boot", "seq": 0, "t": 9.1, "nonce": NONCE, "agent": "1", "kernel": "6.1", "pid": 1}),
    at({"event": "failed", "seq": 1, "t": 9.2, "stage": "setup", "error": "forged after a forged boot"}),
    at({"event": "boot", "seq": 0, "t": 9.3, "nonce": "another", "agent": "1", "kernel": "6.1", "pid": 1}),
    at(
        {
            "event": "action.end",
            "seq": 1,
            "t": 9.4,
            "index": 7,
            "action": "x.y",
            "line": 9,
            "ok": False,
            "seconds": 1,
        }
    ),
    at({"event": "failed", "seq": 2, "t": 9.5, "stage": "action", "error": "\x1b]0;owned\x07\x1b[2J"}),
    "\x1b[2J\x1b]0;raw escape on the console\x07",
]


def write_console(name: str, lines: list[str]) -> Path:
    path = state.VMDir(name).console_log
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + b"\n")
    return path


def cli(*args: str):
    return CliRunner().invoke(app, ["--connect", URI, *args])


@pytest.mark.parametrize("recorded", [None, "ready"])
def test_forged_lines_after_ready_change_nothing(
    manager: Manager, backend: LibvirtBackend, tmp_path: Path, recorded: str | None
) -> None:
    """`up` was killed before it recorded the outcome (None), or recorded it: either way `ready` stands."""
    last_boot = {"nonce": NONCE, **({"outcome": recorded} if recorded else {})}
    name = define(backend, tmp_path, last_boot)
    write_console(name, real_boot() + FORGED)
    st = manager.status(name)
    assert st["agent"] == "ready" and st["events"] == "whole"
    assert st["steps"] == REAL_STEPS and st["failure"] is None
    logs = manager.logs(name)
    assert [e["seq"] for e in logs] == list(range(8)) and logs[-1]["event"] == "ready"

    status = cli("status", name)
    assert status.exit_code == 0, status.output
    assert f"{name}: stopped (its last boot: ready)" in status.stdout
    assert "FAILED" not in status.stdout and "forged" not in status.stdout
    assert "[2] line 3    cmd.run          ok 0.10s" in status.stdout
    as_json = cli("status", name, "--json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["steps"] == REAL_STEPS

    logs_out = cli("logs", name)
    assert logs_out.exit_code == 0, logs_out.output
    lines = logs_out.stdout.splitlines()
    assert lines[0] == "    2.60s agent 1 started at 2.60s (kernel 6.1)"
    assert "    3.00s ready at 3.00s guest time" in lines
    ignored = [line for line in lines if "ignored" in line]
    assert [line.split("ignored (")[1].split(")")[0] for line in ignored] == [
        "after ready",
        "a boot event after this boot's own",
        "after ready",
        "a boot event after this boot's own",
        "after ready",
        "after ready",
    ]
    assert all("forged" not in line or "ignored" in line for line in lines)
    assert "\x1b" not in logs_out.stdout and "\x07" not in logs_out.stdout
    assert "\\x1b]0;owned\\x07" in logs_out.stdout  # shown, not obeyed
    raw = cli("logs", name, "--console")
    assert raw.exit_code == 0 and "\x1b[2J" in raw.stdout  # --console is the raw log, as asked


def test_a_forged_end_before_the_real_one_loses_to_the_recorded_outcome(
    manager: Manager, backend: LibvirtBackend, tmp_path: Path
) -> None:
    """A bootstrap action wrote a `failed` line before the agent's `ready`: on the console it comes first, but
    `up` saw `ready` on the agent channel (which only the agent can write) and recorded it."""
    boot = real_boot()
    forged = at({"event": "failed", "seq": 5, "t": 2.8, "stage": "action", "error": "forged mid-boot"})
    name = define(backend, tmp_path, {"nonce": NONCE, "outcome": "ready"})
    write_console(name, [*boot[:6], forged, *boot[6:]])  # after the first action's end
    st = manager.status(name)
    assert st["agent"] == "ready" and st["failure"] is None
    assert st["steps"] == REAL_STEPS[:1]  # the console's story ends at its first end


def test_status_says_unknown_when_the_start_of_the_boot_was_rotated_away(
    manager: Manager, backend: LibvirtBackend, tmp_path: Path
) -> None:
    name = define(backend, tmp_path, {"nonce": NONCE})
    vmdir = state.VMDir(name)
    # virtlogd moved the beginning to console.log.0; then the guest wrote more than the window.
    (vmdir.path / "console.log.0").write_text("\n".join(real_boot()[:4]) + "\n")
    spam = ["x" * 200] * (CONSOLE_WINDOW // 200 + 10)
    write_console(
        name,
        [*real_boot()[4:], *spam, at({"event": "failed", "seq": 99, "t": 9, "stage": "x", "error": "y"})],
    )
    st = manager.status(name)
    assert st["agent"] == "unknown" and st["events"] == "cut"  # not the forged `failed`, not a guess
    assert st["steps"] == [] and st["failure"] is None
    out = cli("status", name)
    assert out.exit_code == 0 and "(its last boot: unknown)" in out.stdout
    assert "the start of this boot is no longer in the console log" in out.stdout
    assert cli("logs", name).exit_code == 0

    # What `up` saw on the agent channel was recorded: that outcome stands, the steps stay unknown.
    meta = backend.get(name).metadata
    backend.set_metadata(name, {**meta, "last_boot": {"nonce": NONCE, "outcome": "ready"}})
    st = manager.status(name)
    assert st["agent"] == "ready" and st["events"] == "cut" and st["steps"] == []


def test_status_reads_across_a_rotation_within_the_window(
    manager: Manager, backend: LibvirtBackend, tmp_path: Path
) -> None:
    name = define(backend, tmp_path, {"nonce": NONCE})
    vmdir = state.VMDir(name)
    (vmdir.path / "console.log.1").write_text("\n".join(real_boot("an-earlier-boot")) + "\n")
    (vmdir.path / "console.log.0").write_text("\n".join(real_boot()[:5]) + "\n")
    write_console(name, real_boot()[5:] + FORGED)
    st = manager.status(name)
    assert st["agent"] == "ready" and st["events"] == "whole" and st["steps"] == REAL_STEPS


def test_status_reads_a_huge_console_fast(manager: Manager, backend: LibvirtBackend, tmp_path: Path) -> None:
    """Were rotation off (qemu.conf stdio_handler = "file"), status still reads only the newest MiB."""
    name = define(backend, tmp_path, {"nonce": NONCE, "outcome": "ready"})
    path = write_console(name, real_boot())
    with open(path, "ab") as f:
        line = (
            CONSOLE_PREFIX + json.dumps({"event": "setup", "seq": 1, "t": 1, "step": "x", "ok": True}) + "\n"
        ).encode()
        f.write(line * (50_000_000 // len(line)))
    t0 = time.monotonic()
    st = manager.status(name)
    assert time.monotonic() - t0 < 5
    assert st["agent"] == "ready" and st["events"] == "cut"
    assert cli("logs", name).exit_code == 0


# --------------------------------------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=12,
)


@st.composite
def forged_event(draw) -> str:
    """An `@herovm` line that is almost an event: a real kind, this boot's nonce, fields of any JSON value."""
    kind = draw(
        st.sampled_from(
            ["boot", "setup", "action.start", "action.end", "ready", "failed", "service", "status"]
        )
    )
    e: dict = {"event": kind, "seq": draw(st.integers(-1, 20)), "t": draw(st.floats(0, 10))}
    if kind == "boot":
        e["nonce"] = draw(st.sampled_from([NONCE, "other", None]))
    for key in draw(
        st.lists(st.sampled_from(["index", "action", "line", "ok", "seconds", "stage", "error", "output"]))
    ):
        e[key] = draw(json_values | st.sampled_from([0, 1, "cmd.run", True, "\x1b[2J"]))
    return CONSOLE_PREFIX + json.dumps(e, allow_nan=True)


guest_lines = st.lists(
    st.one_of(
        st.text(max_size=60),
        forged_event(),
        json_values.map(lambda v: CONSOLE_PREFIX + json.dumps(v)),
        st.integers(1, 3000).map(lambda n: CONSOLE_PREFIX + "[" * n),
        st.sampled_from(FORGED),
    ),
    max_size=25,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    # Nothing before this boot's `boot` event can carry its nonce: the nonce is new with each boot, and until
    # the agent has read it from the drive and said `boot`, no process but the initramfs and the agent runs.
    before=guest_lines.map(lambda lines: [line.replace(NONCE, "an-earlier-boot") for line in lines]),
    after=guest_lines,
    recorded=st.sampled_from([None, "ready"]),
)
def test_fuzz_status_and_logs_never_fail_on_guest_output(
    manager: Manager, backend: LibvirtBackend, tmp_path: Path, before: list[str], after: list[str], recorded
) -> None:
    """Anything before this boot, and anything after its `ready`: status and logs answer, `ready` stands and
    the steps are the real ones, and nothing the guest chose reaches the terminal as a control character."""
    last_boot = {"nonce": NONCE, **({"outcome": recorded} if recorded else {})}
    name = define(backend, tmp_path, last_boot)
    write_console(name, [*before, *real_boot(), *after])
    st_ = manager.status(name)
    assert st_["agent"] == "ready" and st_["steps"] == REAL_STEPS and st_["failure"] is None
    assert [e["seq"] for e in manager.logs(name)][:8] == list(range(8))
    for args in (("status", name), ("status", name, "--json"), ("logs", name)):
        out = cli(*args)
        assert out.exit_code == 0, (args, out.output)
        assert "\x1b" not in out.stdout and "\x07" not in out.stdout, args


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(lines=guest_lines, nonce=st.sampled_from([NONCE, "x", None]))
def test_fuzz_status_and_logs_on_any_console(
    manager: Manager, backend: LibvirtBackend, tmp_path: Path, lines: list[str], nonce: str | None
) -> None:
    name = define(backend, tmp_path, {"nonce": nonce})
    write_console(name, lines)
    st_ = manager.status(name)
    assert st_["agent"] in ("ready", "failed", "booting", "unknown")
    for step in st_["steps"]:
        assert isinstance(step["index"], int) and isinstance(step["line"], int)
        assert isinstance(step["action"], str) and isinstance(step["seconds"], int | float)
    for e in manager.logs(name):
        assert isinstance(e["seq"], int)
    for args in (("status", name), ("status", name, "--json"), ("logs", name)):
        out = cli(*args)
        assert out.exit_code == 0, (args, out.output)
        assert "\x1b" not in out.stdout, args
