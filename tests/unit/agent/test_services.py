"""The agent's service supervisor (`Services` in herovm/_data/agent/herovm_agent/processes.py), with
real `sh -c` services run by the agent's own reaper as PID 1 of a guest root (conftest.py): restart policies,
the backoff between restarts, the events the host is told, the logs in /var/log/herovm, and stopping at
power-off."""

from __future__ import annotations

from .conftest import GuestRoot

SUPERVISOR = """
from herovm_agent.processes import Processes, Service, Services

events = []

def notify(event, **fields):
    events.append({"t": time.monotonic(), "event": event, **fields})

processes = Processes()
services = Services(processes, notify)
ENV = {"PATH": "/usr/bin:/bin", "GREETING": "hello"}

def service(name, cmd, restart):
    s = Service(name, cmd, dict(ENV), restart)
    services.start(s)
    return s

def wait_for(what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"timed out; events: {events}"
        time.sleep(0.005)

def of(name, state=None):
    return [e for e in events if e["name"] == name and state in (None, e["state"])]

def running(pid):  # a zombie is not running; the reaper (this process, PID 1) reaps it
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
"""


def _states(events: list[dict], name: str) -> list[tuple]:
    return [(e["state"], e.get("exit_code"), e.get("restarts")) for e in events if e["name"] == name]


def test_restart_policies_with_backoff_and_events(guest: GuestRoot) -> None:
    out = guest.python(
        SUPERVISOR,
        """
        always = service("always", "echo run $GREETING; echo err >&2; sleep 0.1", "always")
        fails = service("fails", "sleep 0.05; exit 3", "on-failure")
        succeeds = service("succeeds", "sleep 0.05", "on-failure")
        never = service("never", "sleep 0.05; exit 3", "never")
        # three restarts of always take 1.4 s of backoff: long after succeeds and never would have restarted
        wait_for(lambda: len(of("always", "started")) == 4 and len(of("fails", "started")) >= 3)
        wait_for(lambda: of("succeeds", "exited") and of("never", "exited"))
        out = {"snapshot": services.snapshot()}
        # stop always while it runs (between runs it waits out its backoff), once this run wrote its line
        wait_for(lambda: always.state == "running")
        log = "/var/log/herovm/always.log"
        wait_for(lambda: open(log).read().count("err") == len(of("always", "started")))
        services.stop_all(grace=2)
        wait_for(lambda: of("always", "stopped"))
        out["events"] = events
        """,
    )
    events = out["events"]
    started = ("started", None, None)
    *runs, last = _states(events, "always")
    n = len(runs) // 2
    assert n >= 3
    assert runs == [x for k in range(1, n + 1) for x in (started, ("restarting", 0, k))] + [started]
    assert last in (("stopped", -15, None), ("stopped", 0, None))  # SIGTERM, or it had just ended by itself
    assert _states(events, "fails")[-1][0] == "stopped"  # by SIGTERM, or while it waited to restart
    fails = _states(events, "fails")[:5]
    assert fails == [started, ("restarting", 3, 1), started, ("restarting", 3, 2), started]
    assert _states(events, "succeeds") == [started, ("exited", 0, None)]
    assert _states(events, "never") == [started, ("exited", 3, None)]

    # backoff: 0.2 s after the first exit, then doubling (capped at 5 s)
    for name in ("always", "fails"):
        mine = [e for e in events if e["name"] == name]
        for before, after in zip(mine, mine[1:], strict=False):
            if before["state"] == "restarting" and after["state"] != "stopped":  # stopped while backing off
                assert after["state"] == "started"
                delay = 0.1 * 2 ** before["restarts"]
                assert delay - 0.01 <= after["t"] - before["t"] < delay + 0.5, (name, before, after)
    pids = [e["pid"] for e in events if e["name"] == "always" and e["state"] == "started"]
    assert len(set(pids)) == len(pids) and all(isinstance(p, int) for p in pids)

    snap = out["snapshot"]
    never = {"state": "exited", "pid": None, "restarts": 0, "last_exit": 3, "restart": "never"}
    assert snap["never"] == never
    assert snap["succeeds"]["state"] == "exited" and snap["succeeds"]["last_exit"] == 0
    assert snap["always"]["restarts"] >= 3 and snap["fails"]["restarts"] >= 2

    log = guest.file("/var/log/herovm/always.log").read_text()  # stdout and stderr, every run appended
    assert log == "run hello\nerr\n" * (n + 1)


def test_stop_all_stops_every_service_and_its_process_group(guest: GuestRoot) -> None:
    out = guest.python(
        SUPERVISOR,
        """
        web = service("web", "sleep 30 & echo $! > /run/web-child; sleep 30", "always")
        stubborn = service("stubborn", "trap '' TERM; echo $$ > /run/stubborn; sleep 30", "always")
        wait_for(lambda: os.path.exists("/run/web-child") and os.path.exists("/run/stubborn"))
        child = int(open("/run/web-child").read())
        t = time.monotonic()
        services.stop_all(grace=0.5)  # SIGTERM to each group; SIGKILL for what is left after the grace
        out = {"stop_seconds": time.monotonic() - t}
        wait_for(lambda: of("web", "stopped") and of("stubborn", "stopped"))
        wait_for(lambda: not running(child))
        time.sleep(0.3)  # no restart comes after a stop
        out["events"] = events
        out["snapshot"] = services.snapshot()
        """,
    )
    assert _states(out["events"], "web") == [("started", None, None), ("stopped", -15, None)]
    assert _states(out["events"], "stubborn") == [("started", None, None), ("stopped", -9, None)]
    assert 0.5 <= out["stop_seconds"] < 2
    assert {s["state"] for s in out["snapshot"].values()} == {"stopped"}
    assert all(s["pid"] is None for s in out["snapshot"].values())


def test_a_service_gets_its_environment_and_its_own_session(guest: GuestRoot) -> None:
    out = guest.python(
        SUPERVISOR,
        """
        cmd = "echo \\"$GREETING $PATH $HOME\\"; ps -o sid= -o pgid= -p $$; exec sleep 30"
        s = service("envcheck", cmd, "never")
        wait_for(lambda: open("/var/log/herovm/envcheck.log").read().count("\\n") >= 2)
        out = {"pid": s.pid, "log": open("/var/log/herovm/envcheck.log").read()}
        """,
    )
    greeting, ids = out["log"].splitlines()
    assert greeting == "hello /usr/bin:/bin "  # exactly the service's env: no HOME was given
    assert ids.split() == [str(out["pid"])] * 2  # its own session and process group, led by the service


def test_a_service_that_exits_at_once_is_never_left_running(guest: GuestRoot) -> None:
    out = guest.python(
        SUPERVISOR,
        """
        quick = [service(f"quick{i}", "exit 3", "never") for i in range(200)]
        wait_for(lambda: len([e for e in events if e["state"] == "exited"]) == len(quick))
        out = {
            "wrong": [(s.name, s.state, s.pid) for s in quick if (s.state, s.pid) != ("exited", None)],
            "order": [s.name for s in quick if [e["state"] for e in of(s.name)] != ["started", "exited"]],
        }
        """,
    )
    assert out["wrong"] == [] and out["order"] == []


def test_a_second_start_of_a_name_is_refused_and_the_first_stays_in_reach(guest: GuestRoot) -> None:
    """A name is started once (the check refuses a second `!!service.start` of it before anything runs; the
    supervisor refuses it too): the first service stays registered, so stop_all still stops it."""
    out = guest.python(
        SUPERVISOR,
        """
        first = service("web", "exec sleep 30", "always")
        try:
            service("web", "exec sleep 30", "always")
            refused = None
        except ValueError as e:
            refused = str(e)
        pid = first.pid
        out = {"refused": refused, "registered": services.services["web"] is first}
        services.stop_all(grace=0.5)
        wait_for(lambda: of("web", "stopped"))
        out.update(running=running(pid), first=first.state, states=[e["state"] for e in of("web")])
        """,
    )
    assert out["refused"] == "service 'web' was started before: each service needs its own name"
    assert out["registered"] and not out["running"] and out["first"] == "stopped"
    assert out["states"] == ["started", "stopped"]
    assert not guest.file("/var/log/herovm/web.log").read_text()


def test_stop_all_signals_only_a_process_not_yet_reaped(guest: GuestRoot) -> None:
    """stop_all (and the second, SIGKILL, round) signals a service's process group only while its process is
    the service's and not reaped: never a stale pid."""
    out = guest.python(
        SUPERVISOR,
        """
        done = service("done", "exit 0", "never")
        wait_for(lambda: of("done", "exited"))
        proc = processes.spawn(["sleep", "30"], start_new_session=True)
        out = {"signalled": processes.signal_group(proc, 0)}
        os.kill(proc.pid, 9)
        processes.wait(proc)
        out["after_reaping"] = processes.signal_group(proc, 9)
        t = time.monotonic()
        services.stop_all(grace=2)
        out.update(seconds=time.monotonic() - t, states=[e["state"] for e in of("done")])
        """,
    )
    assert out["signalled"] and not out["after_reaping"]
    assert out["seconds"] < 0.5 and out["states"] == ["started", "exited"]


def test_a_service_stopped_while_it_waits_to_restart_is_stopped(guest: GuestRoot) -> None:
    out = guest.python(
        SUPERVISOR,
        """
        flapping = service("flapping", "sleep 0.05; exit 1", "always")
        wait_for(lambda: flapping.state == "restarting")
        services.stop_all(grace=0.5)
        time.sleep(0.5)  # past the 0.2 s backoff
        out = {"state": flapping.state, "states": [e["state"] for e in of("flapping")]}
        """,
    )
    assert out["states"] == ["started", "restarting", "stopped"] and out["state"] == "stopped"
