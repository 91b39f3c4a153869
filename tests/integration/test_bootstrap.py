"""Issue 3: a herovm image boots, fetches a HeroScript bootstrap and runs it, reporting every step."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from herovm import state
from herovm.errors import BootFailed
from herovm.guest.events import console_events

DATA = Path(__file__).parent / "data"


def test_full_bootstrap_effects_and_events(vm_factory, unique_name, recorder):
    name = unique_name("full")
    vm = vm_factory(name, bootstrap=str(DATA / "full.hero"), variables={"WHO": "tests"})

    # Every effect, seen from the host over SSH with the pinned host key.
    def sh(cmd: str) -> str:
        r = vm.exec(cmd)
        assert r.exit_code == 0, (cmd, r)
        return r.stdout.decode()

    assert sh("cat /etc/herovm-test/hello.txt") == "hello from tests"
    assert sh("stat -c %a /etc/herovm-test/hello.txt").strip() == "640"
    assert sh("cat /etc/herovm-test/multi.txt") == "line one\n  indented two"
    assert sh("stat -c %a /srv/app").strip() == "750"
    assert sh("cat /srv/app/cmd.out") == "bonjour from cmd.run\n"
    assert "uid=1000(agent)" in sh("id agent")
    assert sh("sudo -n -u agent sudo -n true && echo sudo-ok").strip() == "sudo-ok"
    assert sh("hostname").strip() == "renamed-box"
    assert "GREETING" in sh("cat /etc/profile.d/herovm-env.sh")
    first = int(sh("cat /run/ticker"))
    time.sleep(2.5)
    assert int(sh("cat /run/ticker")) > first, "the supervised service keeps running"
    assert (
        sh(
            "test ! -e /usr/bin/cloud-init && ! dpkg -l 'cloud-init*' 2>/dev/null | grep -q ^ii && echo none"
        ).strip()
        == "none"
    )
    assert sh("cat /proc/1/comm").strip() == "python3", "the agent is PID 1"

    # Every step's event came over the channel, in order, for this boot.
    events = recorder.agent_events()
    kinds = [e["event"] for e in events]
    assert kinds[0] == "boot" and kinds[-1] == "ready"
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    starts = [e for e in events if e["event"] == "action.start"]
    ends = [e for e in events if e["event"] == "action.end"]
    assert [e["action"] for e in ends] == [
        "file.write",
        "file.write",
        "dir.create",
        "env.set",
        "cmd.run",
        "user.add",
        "service.start",
        "system.hostname",
    ]
    assert [e["line"] for e in starts] == [e["line"] for e in ends] == [2, 4, 9, 11, 13, 15, 17, 20]
    assert all(e["ok"] for e in ends)
    cmd_end = ends[4]
    assert cmd_end["exit_code"] == 0 and "to-stdout" in cmd_end["output"] and "to-stderr" in cmd_end["output"]
    assert events[0]["nonce"] == vm.meta["last_boot"]["nonce"]
    # The same story is mirrored on the console, readable after the fact.
    mirrored = console_events(state.VMDir(name).console_log, vm.meta["last_boot"]["nonce"])
    assert [e["seq"] for e in mirrored] == [e["seq"] for e in events]


def test_failing_action_reports_line_and_output_and_keeps_guest(vm_factory, unique_name):
    name = unique_name("fail")
    script = (
        "!!file.write path:/root/before content:'x'\n\n"
        "!!cmd.run cmd:'echo about to fail; echo oops >&2; exit 7'\n\n"
        "!!file.write path:/root/after content:'never'\n"
    )
    with pytest.raises(BootFailed) as info:
        vm_factory(name, bootstrap=script)
    err = info.value
    assert err.details["action"] == "cmd.run" and err.details["line"] == 3
    assert "exited with 7" in err.message and ":3 " in err.message
    assert "about to fail" in err.details["output"] and "oops" in err.details["output"]
    # The guest stays up for inspection; later actions did not run.
    m = vm_factory.manager
    vm = m.get(name)
    assert m.backend.get(name).state == "running"
    assert vm.exec("cat /root/before; test -e /root/after || echo absent").stdout.decode() == "xabsent\n"
    st = m.status(name)
    assert st["agent"] == "failed" and st["failure"]["line"] == 3
    assert [s["ok"] for s in st["steps"]] == [True, False]
    vm.close()


def test_bootstrap_by_url_pinned_and_refused(vm_factory, unique_name, http_server):
    script = b"!!file.write path:/root/from-url content:'fetched'\n"
    (http_server.root / "boot.hero").write_bytes(script)
    port = http_server.server_address[1]
    url = f"http://10.0.2.2:{port}/boot.hero"  # the host's loopback, as user-mode networking shows it

    # nat: the guest fetches it itself, from the host's loopback (the default mode would refuse that).
    good = vm_factory(
        unique_name("url"), net="nat", bootstrap=url, bootstrap_sha256=hashlib.sha256(script).hexdigest()
    )
    assert good.exec(["cat", "/root/from-url"]).stdout == b"fetched"
    good.close()

    bad_sha = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(BootFailed) as info:
        vm_factory(unique_name("badsha"), net="nat", bootstrap=url, bootstrap_sha256=bad_sha)
    assert info.value.details["stage"] == "fetch"
    assert "does not match" in info.value.message and bad_sha in info.value.message


def test_pkg_install_from_the_image_apt_cache(vm_factory, unique_name):
    """pkg.install with no network traffic: `tree` waits in the image's apt cache
    (herovm/_data/images/default.toml)."""
    vm = vm_factory(unique_name("pkg"), bootstrap="!!pkg.install tree\n")
    r = vm.exec(["sh", "-c", "dpkg-query -W -f='${Status}' tree; echo; tree -L 1 /srv | head -1"])
    assert r.exit_code == 0, r
    assert r.stdout.decode().splitlines() == ["install ok installed", "/srv"]
    vm.close()


def test_modes_are_kept_and_services_are_recorded_in_a_real_guest(vm_factory, unique_name):
    """The agent as PID 1 of a real guest: a file or directory written without `mode` keeps the mode it had,
    a service that exits at once is recorded as exited (never left "running" with a dead pid), and one that
    keeps failing backs off (the VM's `down` then stops it, during its backoff or not)."""
    script = (
        "!!file.write path:/srv/keys mode:0600 content:'ssh-ed25519 AAAA one<BR>'\n"
        "!!file.write path:/srv/keys append:true content:'ssh-ed25519 AAAA two<BR>'\n"
        "!!dir.create path:/tmp\n"
        "!!service.start name:quick cmd:'exit 3' restart:never\n"
        "!!service.start name:flapping cmd:'exit 1' restart:always\n"
    )
    vm = vm_factory(unique_name("keep"), bootstrap=script)
    r = vm.exec(["sh", "-c", "stat -c %a /srv/keys /tmp; wc -l < /srv/keys"])
    assert r.exit_code == 0 and r.stdout.decode().split() == ["600", "1777", "2"], r
    deadline = time.monotonic() + 10
    while True:
        status = json.loads(vm.exec(["cat", "/run/herovm/status.json"]).stdout)
        services = status["services"]
        if services["quick"]["state"] == "exited" and services["flapping"]["restarts"] >= 2:
            break
        assert time.monotonic() < deadline, services
        time.sleep(0.2)
    assert (services["quick"]["pid"], services["quick"]["last_exit"]) == (None, 3)
    vm.close()
