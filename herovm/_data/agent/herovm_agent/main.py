"""The boot sequence of a herovm guest, run as PID 1 (docs/protocol.md)."""

from __future__ import annotations

import _signal
import _thread
import os
import sys
import time

from herovm.protocol import (
    AGENT_VSOCK_PORT,
    OUTPUT_TAIL,
    SSH,
    BootstrapSpec,
    Command,
    DriveConfig,
    Identity,
    Kind,
    Source,
    Stage,
    Step,
)

from . import VERSION, jsonio, system
from .events import Events, find_port
from .processes import Processes, Services

# Up to `ready` the agent imports only C modules and its own (see system.py). What costs tenths of a second
# under emulation (threading, subprocess, HeroScript, hashlib, urllib) is imported where first needed: an
# empty bootstrap never pays for it before `ready`, and the first event goes out sooner.

STATUS_FILE = "/run/herovm/status.json"
DONE_FILE = "/var/lib/herovm/bootstrap.done"
AGAIN_ON_REBOOT = ("env.set", "service.start", "system.hostname")


class Agent:
    def __init__(self) -> None:
        self.started = time.monotonic()
        port = find_port()
        if port is None:  # no virtio-serial port (Cloud Hypervisor): the same protocol on vsock
            system.load_vsock()
        self.events = Events(port, vsock_port=None if port else AGENT_VSOCK_PORT)
        self.events.on_command = self.on_command
        self.processes = Processes()
        self.services = Services(self.processes, self.notify)
        self.status: dict = {"state": "booting", "actions": [], "agent": VERSION}
        self.deadline: float | None = None  # when the VM's time is up (`--ttl`), on the guest's clock
        self._watching = False
        self._status_lock = _thread.allocate_lock()

    def notify(self, event: str, **fields: object) -> None:
        self.events.emit(event, **fields)
        if event == Kind.SERVICE:
            self.write_status()

    def write_status(self, **changes: object) -> None:
        with self._status_lock:
            self.status.update(changes)
            self.status["services"] = self.services.snapshot()
            tmp = STATUS_FILE + ".tmp"
            with open(tmp, "w") as f:
                f.write(jsonio.dumps(self.status, compact=False))
            os.replace(tmp, STATUS_FILE)

    def step(self, name: str, fn, *args):
        t = time.monotonic()
        try:
            result = fn(*args)
        except Exception as e:
            self.events.emit(
                Kind.SETUP, step=name, ok=False, seconds=round(time.monotonic() - t, 3), error=str(e)
            )
            raise
        self.events.emit(Kind.SETUP, step=name, ok=True, seconds=round(time.monotonic() - t, 3))
        return result

    def fail(self, stage: str, error: str, **fields: object) -> None:
        self.events.emit(Kind.FAILED, stage=stage, error=error, **fields)
        self.write_status(state="failed", error=error, stage=stage)

    def boot(self) -> None:
        try:
            config = system.read_drive()
        except Exception as e:  # noqa: BLE001 - reported, then the guest stays up for inspection
            self.events.emit(Kind.BOOT, nonce=None, agent=VERSION, kernel=os.uname().release, pid=os.getpid())
            self.fail(Stage.DRIVE, str(e))
            return
        self.events.keep_secret(config.secrets)
        self.arm_deadline(config.deadline)
        self.events.emit(
            Kind.BOOT, nonce=config.nonce, agent=VERSION, kernel=os.uname().release, pid=os.getpid()
        )
        try:
            self.step(Step.DISK, system.grow_root_filesystem)
            self.step(Step.NETWORK, system.setup_network, config.network)
            self.step(Step.HOSTNAME, system.set_hostname, config.hostname or config.name)
            if config.ssh is not None and config.ssh.host_key:
                self.step(Step.SSH, self.start_ssh, config.ssh)
        except Exception as e:  # noqa: BLE001
            self.fail(Stage.SETUP, str(e))
            return
        self.run_bootstrap(config)

    def start_ssh(self, ssh: SSH) -> None:
        system.install_ssh_keys(ssh)
        token = (ssh.exec_token or "").encode() or None
        self.ssh = system.SSHListener(ssh.port, self.processes, exec_token=token, vsock=self.events.vsock)

    def run_bootstrap(self, config: DriveConfig) -> None:
        spec = config.bootstrap or BootstrapSpec()
        try:
            text, source, digest = fetch_bootstrap(
                spec, config.limits.bootstrap_bytes, config.limits.fetch_timeout
            )
        except Exception as e:  # noqa: BLE001
            self.fail(Stage.FETCH, str(e))
            return
        if not text.strip():
            return self.finish(digest, source, 0)
        from herovm.heroscript import HeroScriptError, parse, run, validate

        from .actions import GuestContext, registry

        try:
            # substituted into the parsed values: a value can never add an action or a parameter
            variables = {**config.vars, **config.secrets}
            playbook = parse(text, path=spec.name, variables=variables or None)
            errors = [p for p in validate(playbook, registry) if p.severity == "error"]
            if errors:
                raise (
                    HeroScriptError.from_problems(errors)
                    if hasattr(HeroScriptError, "from_problems")
                    else ValueError("\n".join(map(str, errors)))
                )
        except (HeroScriptError, ValueError) as e:
            self.fail(Stage.VALIDATE, str(e))
            return
        if digest and _read(DONE_FILE) == digest:
            # This disk already ran this bootstrap: a later boot only restores its environment and services.
            playbook.actions[:] = [a for a in playbook.actions if a.fullname in AGAIN_ON_REBOOT]
            source = Source.DONE
        self.events.emit(Kind.BOOTSTRAP, source=source, actions=len(playbook.actions), sha256=digest)
        self.write_status(state="bootstrapping")

        def on_start(action, index: int) -> None:
            self.events.emit(
                Kind.ACTION_START, index=index, action=action.fullname, file=action.file, line=action.line
            )

        def on_end(result) -> None:
            value = result.value if isinstance(result.value, dict) else {}
            # redacted before the tail is cut, which could leave the end of a secret otherwise
            out = self.events.redact(result.output or str(value.get("output", "")))
            exit_code = result.exit_code if result.exit_code is not None else value.get("exit_code")
            fields = {
                "index": result.index,
                "action": result.action.fullname,
                "line": result.action.line,
                "ok": result.ok,
                "seconds": round(result.seconds, 3),
                "exit_code": exit_code,
                "output": out[-OUTPUT_TAIL:],
            }
            if result.error:
                fields["error"] = result.error
            self.events.emit(Kind.ACTION_END, **fields)
            self.status["actions"].append({k: v for k, v in fields.items() if k != "output"})

        context = GuestContext(self.processes, self.services)
        results = run(playbook, registry, context, on_start=on_start, on_end=on_end)
        failed = next((r for r in results if not r.ok), None)
        if failed:
            self.fail(
                Stage.ACTION,
                failed.error or "failed",
                action=failed.action.fullname,
                line=failed.action.line,
                file=failed.action.file,
                exit_code=failed.exit_code,
                output=self.events.redact(failed.output or "")[-OUTPUT_TAIL:],
            )
            return
        self.finish(digest, source, len(results))

    def finish(self, digest: str | None, source: str, actions: int) -> None:
        if source == Source.NONE:
            self.events.emit(Kind.BOOTSTRAP, source=source, actions=0, sha256=None)
        if digest:
            os.makedirs(os.path.dirname(DONE_FILE), exist_ok=True)
            with open(DONE_FILE, "w") as f:
                f.write(digest)
        self.write_status(state="ready")
        self.events.emit(Kind.READY, actions=actions, seconds=round(time.monotonic() - self.started, 3))

    def prepare_for_exec(self) -> None:
        """Import what the first exec needs, and start the reaper, while the host is still taking in `ready`:
        ~0.2 s under emulation that would otherwise fall on that exec. In the main thread, which has nothing
        else to do then, and is where `threading` expects to be imported."""
        from . import exec_server  # noqa: F401

        self.processes.start()

    def on_command(self, cmd: dict) -> None:
        op = cmd.get("op")
        if op == Command.STATUS:
            self.write_status()
            self.events.emit(Kind.STATUS, status=self.status)
        elif op == Command.POWEROFF:
            _thread.start_new_thread(self.poweroff, ("host asked",))
        elif op == Command.CLOCK:
            set_clock(cmd.get("time"))
        elif op == Command.SEAL:
            self.seal()
        elif op == Command.IDENTITY:
            self.take_identity(cmd)
        elif op == Command.DEADLINE:
            deadline = cmd.get("deadline")
            if deadline is None or (
                not isinstance(deadline, bool) and isinstance(deadline, int | float) and deadline > 0
            ):
                self.arm_deadline(deadline)
            else:
                print(f"herovm-agent: ignored deadline {str(deadline)[:40]!r}", flush=True)
        else:
            print(f"herovm-agent: ignored command {op!r}", flush=True)

    def seal(self) -> None:
        """Command.SEAL: a template is about to be snapshotted. From now on nothing answers with this VM's
        credentials (exec and SSH connections are closed at once, the SSH keys are gone); each clone gets
        its own with Command.IDENTITY."""
        listener = getattr(self, "ssh", None)
        if listener is not None:
            listener.seal()
        system.remove_ssh_keys()
        self.events.emit(Kind.SEALED)

    def take_identity(self, cmd: dict) -> None:
        """Command.IDENTITY: this guest was restored into a new VM (a template's clone, a fork). Reseed the
        CRNG first (its state is the snapshot's, shared with every other clone), set the clock, then take the
        VM's name, hostname, SSH keys and exec token, and only then say `boot` (the new nonce) and `ready`."""
        try:
            identity = Identity.from_json(cmd)
        except ValueError as e:
            print(f"herovm-agent: ignored an identity: {e}", flush=True)
            return
        started = time.monotonic()
        system.reseed(bytes.fromhex(identity.seed))
        set_clock(identity.time)
        self.arm_deadline(identity.deadline)  # the clone's own, or none: never the snapshotted VM's
        self.events.emit(
            Kind.BOOT,
            nonce=identity.nonce,
            agent=VERSION,
            kernel=os.uname().release,
            pid=os.getpid(),
            restored=True,
        )
        try:
            self.step(Step.HOSTNAME, system.set_hostname, identity.hostname or identity.name)
            self.step(Step.SSH, self.take_ssh, identity.ssh)
        except Exception as e:  # noqa: BLE001 - reported; the host removes the clone
            self.fail(Stage.SETUP, str(e))
            return
        self.write_status(state="ready")
        self.events.emit(
            Kind.READY, actions=len(self.status["actions"]), seconds=round(time.monotonic() - started, 3)
        )

    def take_ssh(self, ssh: SSH) -> None:
        listener = getattr(self, "ssh", None)
        if listener is None:
            self.start_ssh(ssh)
            return
        system.install_ssh_keys(ssh)
        listener.unseal((ssh.exec_token or "").encode() or None)

    def arm_deadline(self, deadline: float | None) -> None:
        """Power the guest off at `deadline` (seconds since 1970, the host's clock: the host sets the guest's
        after a pause or a restore), so a VM whose time is up stops without a daemon on the host; `gc`
        removes it. A later call replaces the deadline; None removes it."""
        self.deadline = deadline
        if deadline is not None and not self._watching:
            self._watching = True  # one watcher for good: it reads self.deadline each time it wakes
            _thread.start_new_thread(self._watch_deadline, ())

    def _watch_deadline(self) -> None:
        while True:
            deadline = self.deadline
            left = 5.0 if deadline is None else deadline - time.time()
            if left <= 0:
                self.poweroff("its time is up (ttl)")
                return
            time.sleep(min(left, 5.0))  # wakes to see a clock set after a pause, or a new deadline

    def poweroff(self, reason: str) -> None:
        import contextlib

        self.events.emit(Kind.SHUTDOWN, reason=reason)
        self.services.stop_all()
        for sig in (_signal.SIGTERM, _signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, sig)
            time.sleep(0.3)
        system.power_off()


def set_clock(value: object) -> None:
    """The host's time, after a pause or a snapshot's restore: the guest's clock stood still meanwhile (no NTP
    here). Anything but a plausible time is ignored, with a line on the console."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 1e9 < value < 1e11:
        print(f"herovm-agent: ignored clock {str(value)[:40]!r}", flush=True)
        return
    try:
        time.clock_settime(time.CLOCK_REALTIME, float(value))
    except OSError as e:
        print(f"herovm-agent: cannot set the clock: {e}", flush=True)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def fetch_bootstrap(spec: BootstrapSpec, limit: int, timeout: float) -> tuple[str, str, str | None]:
    """The bootstrap text, where it came from (a Source), and its sha256. A fetched one must match its
    pinned sha256."""
    if spec.url is None and not spec.script:
        return "", Source.NONE, None
    import hashlib

    if spec.script is not None:
        return spec.script, Source.DRIVE, hashlib.sha256(spec.script.encode()).hexdigest()
    import urllib.request

    url, want = spec.url, (spec.sha256 or "").lower()
    if not want:
        raise ValueError(f"bootstrap {url}: no sha256 given; a fetched bootstrap must be pinned")
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        data = resp.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"bootstrap {url}: larger than the limit of {limit} bytes")
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise ValueError(
            f"bootstrap {url}: sha256 {got} does not match the pinned {want}; refusing to run it"
        )
    return data.decode("utf-8"), Source.URL, got


def main() -> None:
    if os.getpid() == 1:
        system.make_runtime_dirs()
        _signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # ctrl-alt-del
    agent = Agent()
    try:
        agent.boot()
    except Exception:  # noqa: BLE001 - PID 1 must not die: report and stay up
        import traceback

        agent.fail(Stage.AGENT, traceback.format_exc(limit=5))
    try:
        agent.prepare_for_exec()
    except Exception as e:  # noqa: BLE001 - PID 1 must not die; an exec will meet the same error and say so
        print(f"herovm-agent: cannot prepare exec: {e}", flush=True)
    while True:  # the reaper, listener and channel threads do the work from here
        _signal.pause()


if __name__ == "__main__":
    sys.exit(main())
