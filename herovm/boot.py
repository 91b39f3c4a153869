"""The boot conversation: write a VM's config drive for this boot, start the machine, follow its agent's
events until `ready` or `failed`, record the outcome in the machine's metadata, and turn a failure into a
BootFailed that says where the boot stopped (with the console's last lines when the agent never spoke)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, replace

from . import state
from .backends import Backend
from .backends.base import GUEST_NET, copy_console
from .errors import BootFailed, HeroVMError, NotFound
from .guest.events import AgentChannel, console_events, console_tail
from .progress import Progress, Reporter, still_waiting
from .protocol import AGENT_VSOCK_PORT, BOOTSTRAP_LIMIT, SSH_PORT, TERMINAL, Command, Kind, Stage
from .protocol_host import Story, describe_event, printable
from .record import LastBoot, VMRecord, epoch, now


@dataclass
class BootReport:
    """What the agent said during one boot."""

    events: list[dict] = field(default_factory=list)

    @property
    def outcome(self) -> str | None:
        """The first `ready` or `failed`: what decides a boot (herovm.protocol.Story)."""
        return next((e["event"] for e in self.events if e["event"] in TERMINAL), None)

    def actions(self) -> list[dict]:
        return [e for e in self.events if e["event"] == "action.end"]


class _EarlyFailure(Exception):
    """The boot failed before the agent ran (seen on the console)."""


@dataclass
class Boot:
    """Boots VMs of one backend, reporting to `progress`; `fetch_timeout`: seconds the guest waits for a
    bootstrap URL to answer."""

    backend: Backend
    progress: Reporter
    fetch_timeout: float

    def write_drive(self, vmdir: state.VMDir, record: VMRecord) -> str:
        """Write the VM's config drive for its next boot; returns the boot's nonce."""
        local = vmdir.read_meta()
        nonce = secrets.token_hex(16)
        from .guest import configdrive

        configdrive.write(
            vmdir.drive,
            {
                "name": vmdir.name,
                "hostname": vmdir.name,
                "nonce": nonce,
                "network": GUEST_NET if record.ssh_port else None,
                "ssh": self._ssh_config(vmdir, record),
                "bootstrap": local.get("bootstrap_entry"),
                "vars": local.get("vars") or {},
                "secrets": vmdir.read_secrets(),
                "limits": {"bootstrap_bytes": BOOTSTRAP_LIMIT, "fetch_timeout": self.fetch_timeout},
                "deadline": epoch(record.expires),
            },
        )
        return nonce

    @staticmethod
    def _ssh_config(vmdir: state.VMDir, record: VMRecord) -> dict:
        return {
            "host_key": vmdir.host_key.read_text(),
            "authorized_keys": [record.client_key],
            "port": SSH_PORT,
            "exec_token": vmdir.exec_token.read_text() if vmdir.exec_token.exists() else None,
        }

    def run(self, vmdir: state.VMDir, timeout_s: float) -> VMRecord:
        """Start the machine with a fresh config drive and follow the agent until ready or failed."""
        name = vmdir.name
        machine = self.backend.get(name)
        if machine is None:
            raise NotFound(f"VM {name} not found")
        record = VMRecord.from_json(name, machine.metadata)
        nonce = self.write_drive(vmdir, record)
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        vmdir.agent_socket.unlink(missing_ok=True)
        copy_console(self.backend, name, vmdir.console_log)  # a VM on another host: its console so far
        console_start = vmdir.console_log.stat().st_size if vmdir.console_log.exists() else 0
        # The nonce is the domain's before the guest runs: `status` tells this boot's events from any other
        # (an earlier boot's, or a guest's forgery) even if this process is killed before the end.
        begun = LastBoot(nonce=nonce, started=now())
        self.backend.set_metadata(name, record.booted(begun).to_json())
        self.progress(Progress("boot", f"starting {name}"))
        try:
            # QEMU binds the SSH forward as it starts: a port taken meanwhile makes the start fail, so a
            # started VM owns its port (the allocation lock keeps herovm's own VMs apart).
            with still_waiting(self.progress, "boot", f"waiting for {self.backend.name} to start {name}"):
                self.backend.start(name)
        except HeroVMError as e:
            raise BootFailed(f"{name} could not start: {e.message}", stage="start") from e
        report = self._follow(vmdir, record, nonce, (t0, deadline), console_start)
        return self._conclude(vmdir, record, begun, report, t0)

    def handover(self, vmdir: state.VMDir, record: VMRecord, nonce: str, timeout_s: float) -> VMRecord:
        """A clone's first moments (a template's, a fork's: the machine runs on from another's memory):
        hand the agent the VM's own identity (Command.IDENTITY; docs/protocol.md) and follow it until it
        says `ready` under `nonce` (which the VM's metadata holds already) or `failed`."""
        t0 = time.monotonic()
        begun = LastBoot(nonce=nonce, started=now())
        identity = {
            "op": Command.IDENTITY,
            "name": vmdir.name,
            "hostname": vmdir.name,
            "nonce": nonce,
            "ssh": self._ssh_config(vmdir, record),
            "seed": secrets.token_hex(64),
            "time": time.time(),
            "deadline": epoch(record.expires),
        }
        report = self._follow(vmdir, record, nonce, (t0, t0 + timeout_s), 0, first=identity)
        return self._conclude(vmdir, record, begun, report, t0)

    def _conclude(
        self, vmdir: state.VMDir, record: VMRecord, begun: LastBoot, report: BootReport, t0: float
    ) -> VMRecord:
        """Record how the boot ended; BootFailed, saying where it stopped, unless it became ready."""
        name = vmdir.name
        seconds = round(time.monotonic() - t0, 3)
        record = record.booted(replace(begun, outcome=report.outcome, seconds=seconds))
        self.backend.set_metadata(name, record.to_json())
        if report.outcome == "ready":
            return record
        failed = next((e for e in reversed(report.events) if e["event"] == Kind.FAILED), {})

        def said(key: str) -> str:  # what the guest said, safe to print
            return printable(failed.get(key), one_line=True)

        copy_console(self.backend, name, vmdir.console_log)
        if failed.get("stage") == Stage.ACTION:
            raise BootFailed(
                f"bootstrap of {name} failed at {said('file')}:{failed.get('line')} "
                f"({said('action')}): {said('error')}",
                hint=f"the VM is kept for inspection: `herovm ssh {name}`, then `herovm down {name}`",
                stage=Stage.ACTION,
                action=failed.get("action"),
                line=failed.get("line"),
                output=failed.get("output", ""),
            )
        why = said("error") if failed.get("error") else "no answer"
        raise BootFailed(
            f"{name} did not become ready: {said('stage')}: {why}",
            hint=f"the VM is kept for inspection (`herovm logs {name} --console`); "
            f"remove it with `herovm down {name}`",
            stage=failed.get("stage"),
            console=console_tail(vmdir.console_log),
        )

    def _follow(
        self,
        vmdir: state.VMDir,
        record: VMRecord,
        nonce: str,
        times: tuple[float, float],
        console_start: int,
        first: dict | None = None,
    ) -> BootReport:
        """Follow the agent's events until ready or failed. While the channel is quiet, look at this boot's
        console output too: the initramfs reports its failures there, before any agent exists."""
        report = BootReport()
        name = vmdir.name
        t0, deadline = times
        # Only this boot's agent writes the channel (the socket is new with each start), so a `boot` event
        # without a nonce (the agent could not read its drive) is this boot's too.
        story = Story(nonce, unnamed=True)

        def check_console() -> None:
            if story.begun:  # the agent speaks: what the console says now is no longer the initramfs
                return
            copy_console(self.backend, name, vmdir.console_log)
            for event in console_events(vmdir.console_log, offset=console_start):
                if event["event"] == Kind.FAILED and event.get("stage") == Stage.INITRAMFS:
                    report.events.append(event)
                    raise _EarlyFailure

        try:
            channel = agent_channel(self.backend, record, deadline)
        except TimeoutError:
            self._fail_unanswered(name, vmdir, "its agent channel never appeared")
        except OSError as e:  # e.g. a socket path over the 107-byte limit under a deep HEROVM_HOME
            raise HeroVMError(
                f"cannot open the agent channel of {name}: {e}", hint="use a shorter HEROVM_HOME"
            ) from e
        try:
            if first is not None:  # a command for the agent before anything else (a clone's identity)
                channel.send(first)
            for event in channel.events(deadline, on_idle=check_console):
                if story.take(event) != Story.THIS:
                    continue
                report.events.append(event)
                self.progress(
                    Progress(
                        "agent",
                        describe_event(event),
                        {**event, "host_seconds": round(time.monotonic() - t0, 3)},
                    )
                )
                if story.outcome is not None:
                    return report
        except _EarlyFailure:
            return report
        except TimeoutError:
            self._fail_unanswered(name, vmdir, f"no ready after {deadline - t0:.0f}s")
        finally:
            channel.close()
        self._fail_unanswered(name, vmdir, "the guest stopped before it was ready")
        return report  # not reached

    def _fail_unanswered(self, name: str, vmdir: state.VMDir, why: str) -> None:
        machine = self.backend.get(name)
        copy_console(self.backend, name, vmdir.console_log)
        tail = console_tail(vmdir.console_log)
        raise BootFailed(
            f"{name}: {why} (state {machine.state if machine else 'gone'}); "
            f"last console line: {tail[-1] if tail else '(none)'}",
            hint=f"see `herovm logs {name} --console`; remove it with `herovm down {name}`",
            stage="boot",
            console=tail,
        )


def agent_channel(backend: Backend, record: VMRecord, deadline: float) -> AgentChannel:
    """The VM's agent channel (events in, commands out), however its backend reaches the guest; waits for
    it until `deadline` (TimeoutError)."""
    connect = backend.guest_connector(record.name, record.ssh_port)
    return AgentChannel(None, deadline, sock=connect(AGENT_VSOCK_PORT, deadline))
