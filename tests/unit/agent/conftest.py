"""A guest's root on this machine, for running the agent's real action handlers and service supervisor.

The handlers write where a guest's bootstrap writes (/etc, /home, /var/log/herovm, /usr through apt) with no
way to point them elsewhere, so each test runs them in a copy-on-write view of this machine's root: an
overlayfs over `/` whose upper layer (a temporary directory in /dev/shm, on another file system than `/`)
takes every write. A child Python is chrooted there as PID 1 of its own mount, PID, UTS, IPC and network
namespaces, as the agent runs in a guest: it sets its own hostname, reaps every orphan, reaches no network,
and when it exits the kernel kills whatever it left running, so no service outlives its test. Nothing on
this machine changes; what the guest wrote is read afterwards from the upper layer (`GuestRoot.file`).

The agent's reaper waits for *any* child (`waitid(P_ALL)`), so it must never run inside the pytest process,
where it would steal the exit statuses of every other test's subprocesses; here it runs only in the child.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
AGENT = REPO / "herovm/_data/agent"
RESULT = "@@result "

# What the agent and the image provide before a bootstrap runs (system.make_runtime_dirs; the image has
# sudo installed, so /etc/sudoers.d exists).
SETUP = """
set -e
mount -t overlay overlay -o "lowerdir=/,upperdir=$0/upper,workdir=$0/work" "$0/root"
mount -t proc proc "$0/root/proc"
mount --bind /dev "$0/root/dev"
mkdir -p "$0/root/var/log/herovm" "$0/root/run/herovm" "$0/root/etc/sudoers.d"
exec chroot "$0/root" "$@"
"""

PRELUDE = """
import json, os, sys, time
sys.path[:0] = [{repo!r}, {agent!r}]
"""

# Runs a bootstrap as the agent does (main.py: parse with the variables, validate, run with a GuestContext);
# `results` are the ActionResults, `events` the service events.
BOOTSTRAP = """
from herovm.heroscript import HeroScriptError, parse, run, validate
from herovm_agent.actions import GuestContext, registry
from herovm_agent.processes import Processes, Services

events = []
processes = Processes()
services = Services(processes, lambda event, **fields: events.append({{"event": event, **fields}}))
playbook = parse({script!r}, path="bootstrap.hero", variables={variables!r})
errors = [str(p) for p in validate(playbook, registry) if p.severity == "error"]
assert not errors, errors
results = run(playbook, registry, GuestContext(processes, services))
out = {{
    "results": [
        {{"action": r.action.fullname, "ok": r.ok, "value": r.value, "error": r.error,
          "exit_code": r.exit_code, "output": r.output}}
        for r in results
    ],
    "events": events,
}}
{after}
"""


def _available() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount, chroot and namespaces)"
    for tool in ("unshare", "chroot", "mount"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not os.path.isdir("/dev/shm"):
        return "needs /dev/shm for the overlay's upper layer"
    try:
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                return "needs overlayfs"
    except OSError:
        return "cannot read /proc/filesystems"
    return None


class GuestRoot:
    def __init__(self, base: Path) -> None:
        self.base = base
        for sub in ("upper", "work", "root"):
            (base / sub).mkdir()

    def file(self, path: str) -> Path:
        """Where a file the guest wrote at `path` is, once the child has exited (upper layer)."""
        return self.base / "upper" / path.lstrip("/")

    def python(self, *code: str, timeout: float = 30) -> Any:
        """Run the pieces of `code` (each dedented) in the guest root as PID 1; they set `out`, which comes
        back through JSON."""
        program = "\n".join(
            [
                PRELUDE.format(repo=str(REPO), agent=str(AGENT)),
                *(textwrap.dedent(part) for part in code),
                f"print({RESULT!r} + json.dumps(out, default=str), flush=True)\n",
            ]
        )
        cmd = [
            "unshare", "--mount", "--uts", "--ipc", "--net", "--pid", "--fork", "--kill-child", "--",
            "sh", "-c", SETUP, str(self.base),
            "/usr/bin/env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG=C.UTF-8", sys.executable, "-I", "-S", "-B", "-c", program,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
        assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return json.loads(lines[-1][len(RESULT) :])

    def bootstrap(
        self, script: str, *, variables: dict[str, str] | None = None, after: str = "", timeout: float = 30
    ) -> dict:
        """Run a bootstrap with the agent's registry; returns {"results": [...], "events": [...], ...}.
        `after` is code run in the guest afterwards (it may add to `out`)."""
        code = BOOTSTRAP.format(
            script=textwrap.dedent(script), variables=variables or None, after=textwrap.dedent(after)
        )
        return self.python(code, timeout=timeout)


@pytest.fixture
def guest() -> Iterator[GuestRoot]:
    why = _available()
    if why:
        pytest.skip(why)
    base = Path(tempfile.mkdtemp(prefix="herovm-guest-", dir="/dev/shm"))
    try:
        yield GuestRoot(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
