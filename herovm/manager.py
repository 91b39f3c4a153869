"""The lifecycle of herovm VMs over a backend: up, start, stop, pause, resume, down, gc, ls, status, logs
(exec and cp are the VM handle's, herovm/vm.py).

The Manager holds the verbs; what a VM is made with is herovm.settings, what is recorded about it
herovm.record, its bootstrap herovm.bootstrap, a boot herovm.boot; the backend knows the hypervisor.
Modules that only creating or booting a VM needs (images, keys, the config drive, HeroScript) are imported
where they are used: `herovm exec` pays for none of them (tens of ms per call).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import accel as accel_mod
from . import disks, leftovers, ports, snapshots, state
from .backends import Backend, Machine, MachineSpec, get_backend, require
from .backends.base import RAM_FILE, Pausable, SharedMemory, copy_console
from .errors import (
    AlreadyExists,
    BackendUnavailable,
    BootFailed,
    GuestError,
    HeroVMError,
    InvalidInput,
    NotFound,
)
from .progress import Progress, Reporter, silent, still_waiting
from .protocol import AGENT_VSOCK_PORT, FETCH_TIMEOUT_S, Command, Stage
from .record import RecordedSettings, VMRecord, after, now
from .settings import VMSettings, seconds
from .vm import VM

if TYPE_CHECKING:  # and imported where used: `herovm exec` needs none of these (~10 ms a call)
    from .api_types import SnapshotInfo, TemplateInfo, VMInfo, VMStatus
    from .boot import Boot
    from .bootstrap import Bootstrap
    from .hosts import Host, HostFacts
    from .images import Image

__all__ = ["VM", "Manager"]

# Under TCG, QEMU finds translated code by virtual address, so address-space randomisation makes every new
# process translate its code (ld.so, libc) afresh: exec of /usr/bin/true 23 ms with it, 4 ms without;
# bash -c true 53 ms vs 10 ms. Guests under KVM keep ASLR. docs/benchmarks.md: how to turn it back on.
TCG_KERNEL_ARGS = "norandmaps"


class Manager:
    """with herovm.Manager() as m: vm = m.up("box", bootstrap="setup.hero"); vm.exec(["uname", "-a"])"""

    def __init__(
        self, backend: Backend | str | None = None, *, uri: str | None = None, progress: Reporter = silent
    ) -> None:
        """`backend`: a Backend, or its name; None: herovm.backends.get_backend decides ($HEROVM_BACKEND,
        else libvirt). `uri`: libvirt's connection URI."""
        self.backend = (
            get_backend(backend, uri=uri) if backend is None or isinstance(backend, str) else backend
        )
        self.progress = progress
        self.fetch_timeout = FETCH_TIMEOUT_S  # seconds the guest waits for a bootstrap URL to answer
        # the hosts new VMs may be placed on when none is named (None: every host; `herovm serve --host`)
        self.allowed_hosts: list[str] | None = None

    def close(self) -> None:
        """Close the backend's connection (libvirt's); VM handles made by this Manager stop working."""
        self.backend.close()

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- up

    def up(self, name: str, settings: VMSettings | None = None, **options: Any) -> VM:
        """Create and boot a VM, returning once its bootstrap has run and it answers exec. `settings`, or
        `options` (keyword arguments named as VMSettings's fields, e.g. memory="512MB"), say how.

        An existing running VM with the same settings is returned as it is. If the boot fails before any
        bootstrap action ran (no agent, a bad drive, a refused bootstrap), the half-made VM is removed and
        the error carries the last console lines; if an action failed, the VM is kept for inspection.
        `keep_failed` keeps it in every case.

        `variables` and `secrets` are substituted into the bootstrap's parsed values (`${NAME}`, `{NAME}`).
        A secret reaches the guest (its config drive) and is kept in the VM's `secrets/` for later boots, but
        never in the domain's metadata, vm.json, progress or errors (its value is shown as `[secret NAME]`);
        the agent keeps it out of its events and so out of the console log. A bootstrap that is given but
        holds no action is refused unless `allow_empty`."""
        state.validate_name(name)
        return self.up_marked(name, VMSettings.of(options, base=settings), {})

    def up_marked(self, name: str, settings: VMSettings, marks: dict[str, Any]) -> VM:
        """`up`, with `marks` kept in the VM's record: what made it, so that `gc` can tell when that is gone
        (a template's builder VM: herovm.templates; a pytest session's VM: herovm.pytest_plugin)."""
        state.validate_name(name)
        if settings.template is not None:
            return self._up_from_template(name, settings, marks)
        if not settings.secrets:
            return self._up(name, settings, marks)
        from .bootstrap import redact, redacted

        secret_vars = settings.secrets
        report = self.progress
        self.progress = lambda p: report(
            Progress(p.stage, redact(p.message, secret_vars), redacted(p.data, secret_vars))  # type: ignore[arg-type]
        )
        try:
            return self._up(name, settings, marks)
        except HeroVMError as e:
            e.message = redact(e.message, secret_vars)
            e.hint = redact(e.hint, secret_vars) if e.hint else e.hint
            e.details = redacted(e.details, secret_vars)  # type: ignore[assignment]
            e.args = (e.message,)
            raise
        finally:
            self.progress = report

    def _up_from_template(self, name: str, s: VMSettings, marks: dict[str, Any]) -> VM:
        from . import templates

        existing = self.backend.get(name)
        if existing is not None:
            record = VMRecord.from_json(name, existing.metadata)
            if (
                record.origin == {"template": s.template}
                and existing.state == "running"
                and record.last_boot.ready
            ):
                self.progress(Progress("up", f"{name} is already up from template {s.template}"))
                return VM(self, record)
            if record.origin == {"template": s.template} and existing.state == "stopped":
                return self.start(name, s.timeout)
            raise AlreadyExists(
                f"VM {name} already exists ({existing.state})",
                hint=f"pick another name or remove it with `herovm down {name}`",
            )
        return templates.up(self, name, s.template, s.keep_failed, s.publish, s.ttl, marks, host=s.host)  # type: ignore[arg-type]

    def _up(self, name: str, s: VMSettings, marks: dict[str, Any] | None = None) -> VM:
        from .bootstrap import bootstrap_of, fetch_on_host

        boot = bootstrap_of(s)
        timeout_s = s.timeout
        if boot.url and s.net in ("restricted", "none"):  # the guest itself has no egress
            fetch_started = time.monotonic()
            fetch_s = min(self.fetch_timeout, timeout_s)
            boot = fetch_on_host(boot, s.variables, fetch_s, secrets=s.secrets, allow_empty=s.allow_empty)
            timeout_s -= time.monotonic() - fetch_started  # one --timeout for the fetch and the boot
        if s.net == "nat":
            self.progress(
                Progress("up", "warning: --net nat lets the guest reach this host's loopback services")
            )
        host = self._place(name, s, marks or {})
        wanted = RecordedSettings(
            image=s.image,
            cpus=s.cpus,
            memory=s.memory,
            disk=s.disk,
            accel=host.accel if not host.local and s.accel == "auto" else accel_mod.choose(s.accel).accel,
            bootstrap=boot.digest,
            net=s.net,
            vars=dict(s.variables),
            kernel_args=s.kernel_args,
            secrets=tuple(sorted(s.secrets)),  # their names: the values stay in the VM's secrets/ directory
            publish=tuple(p.text() for p in s.publish),
        )
        vmdir = state.VMDir(name)
        with vmdir.lock(wait=0):  # a second `up` of the same name fails at once instead of queueing
            existing = self.backend.get(name)
            if existing is not None:
                record = VMRecord.from_json(name, existing.metadata)
                same = record.settings == wanted and vmdir.holds_secrets(s.secrets)
                if same and existing.state == "running" and record.last_boot.ready:
                    self.progress(Progress("up", f"{name} is already up with these settings"))
                    return VM(self, record)
                if same and existing.state == "stopped":  # as `start` would: its disk, its bootstrap done
                    self.progress(Progress("up", f"{name} exists, stopped, with these settings: starting it"))
                    vmdir.mark_paused(False)
                    return VM(self, self.booter().run(vmdir, timeout_s))
                if same and existing.state == "paused":
                    raise AlreadyExists(
                        f"VM {name} already exists (paused)", hint=f"resume it with `herovm resume {name}`"
                    )
                why = "with other settings" if not same else "but not ready"
                raise AlreadyExists(
                    f"VM {name} already exists ({existing.state}) {why}",
                    hint=f"pick another name or remove it with `herovm down {name}`",
                )
            from . import images

            img = images.ensure(s.image, self.progress)
            self._create(vmdir, img, wanted, boot, dict(s.secrets), marks or {}, s.ttl, host.name)
            try:
                record = self.booter().run(vmdir, timeout_s)
            except KeyboardInterrupt:
                self.progress(Progress("up", f"interrupted: removing {name}"))
                self.remove_held(name)
                raise
            except BootFailed as e:
                if not s.keep_failed and e.details.get("stage") != Stage.ACTION:
                    self.progress(Progress("up", f"removing {name}: nothing to inspect"))
                    self.remove_held(name)
                    e.hint = "see the console lines above; `herovm up --keep-failed` keeps such a VM"
                raise
        return VM(self, record)

    def _create(
        self,
        vmdir: state.VMDir,
        img: Image,
        settings: RecordedSettings,
        boot: Bootstrap,
        secret_vars: dict,
        marks: dict[str, Any],
        ttl: float | None = None,
        host: str = "local",
    ) -> None:
        """Make the VM's directory (keys, disk, vm.json) and define its machine on `host` (herovm.hosts); on
        any failure, undo both."""
        name = vmdir.name
        if vmdir.exists():  # left by a crashed herovm: libvirt has no such VM, so it is garbage
            vmdir.remove()
        defined = False
        try:
            vmdir.create()
            from .guest import keys

            if secret_vars:  # for every boot's config drive; never in vm.json or the domain
                vmdir.write_secrets(secret_vars)
            client_pub = keys.generate_keypair(vmdir.client_key, comment=f"herovm-client@{name}")
            host_pub = keys.generate_keypair(vmdir.host_key, comment=f"herovm-host@{name}")
            keys.generate_token(vmdir.exec_token)
            disks.create_overlay(
                img.disk, vmdir.disk, max(settings.disk, img.manifest.get("root_size", 0)), what=name
            )
            with state.named_lock("ports"):
                port, published = ports.allocate(self.on_host(host), settings.net, settings.publish)
                record = VMRecord(
                    name=name,
                    settings=settings,
                    image=img.recipe,
                    image_id=img.id,
                    ssh_port=port,
                    ports=published,
                    host_key=host_pub,
                    client_key=client_pub,
                    agent_exec=int(img.manifest.get("agent_version", "1")) >= 2,
                    bootstrap=boot.url or boot.name if boot.drive_entry() else None,
                    created=now(),
                    backend=self.backend.name,
                    home=str(state.home()),  # every HEROVM_HOME shares libvirt: gc, ls keep to theirs
                    expires=after(ttl) if ttl else None,
                    host=host if host != "local" else None,
                    extra=marks,
                )
                local = {"bootstrap_entry": boot.drive_entry(), "vars": settings.vars}
                vmdir.write_meta({**record.to_json(), **local})
                spec = self.machine_spec(vmdir, img, record)
                self.progress(
                    Progress(
                        "define",
                        f"defining {name} ({settings.accel}, {settings.memory >> 20} MiB, port {port})",
                    )
                )
                if host != "local":  # the image goes to the VM's host first (once), with progress
                    self.backend.prepare(spec, self.progress)  # type: ignore[attr-defined]
                with still_waiting(
                    self.progress,
                    "define",
                    f"waiting for {self.backend.name} to define {name} (see herovm doctor)",
                ):
                    self.backend.define(spec)
                defined = True
        except BaseException:
            # Only what this call made is removed: a domain someone else defined meanwhile stays.
            if defined:
                self.backend.undefine(name)
            vmdir.remove()
            raise

    def on_host(self, host: str) -> Backend:
        """The backend of the host `host` alone (ports are allocated among its machines only)."""
        from .backends.fleet import Fleet

        return self.backend.on(host) if isinstance(self.backend, Fleet) else self.backend

    def _place(self, name: str, s: VMSettings, marks: dict[str, Any] | None = None) -> Host:
        """The host a new VM goes on: `s.host`, or the placement rule among the hosts that can take it
        (herovm.hosts.place); the local host when no other was added."""
        from . import hosts
        from .backends.fleet import Fleet

        if not isinstance(self.backend, Fleet):
            if s.host not in (None, hosts.LOCAL):
                hosts.get(s.host)  # NotFound when it was never added, with its hint
                raise InvalidInput(
                    f"host {s.host} is not used with --connect or another backend than libvirt",
                    hint="hosts are used with the default libvirt connection (no --connect)",
                )
            return hosts.local_host()
        from .backends.fleet import LOCAL_ONLY
        from .templates import BUILDER_MARK

        reasons = (
            ("net", s.net == "default"),
            ("publish", bool(s.publish)),
            # a template's VM: where --host says, else here (its memory and disk stay on its host)
            ("template", BUILDER_MARK in (marks or {}) and s.host is None),
        )
        local_only = next((LOCAL_ONLY[key] for key, why in reasons if why), None)
        chosen = self.backend.place(s.host, s.memory, local_only, self.progress, among=self.allowed_hosts)
        return hosts.get(chosen)

    def machine_spec(self, vmdir: state.VMDir, img: Image, record: VMRecord) -> MachineSpec:
        """The machine the backend makes for the VM: its image's kernel, its directory's files, its record."""
        s = record.settings
        assert s is not None, "a record being defined has its settings"
        tcg = TCG_KERNEL_ARGS if s.accel == "tcg" else ""
        return MachineSpec(
            name=vmdir.name,
            cpus=s.cpus,
            memory=s.memory,
            kernel=img.kernel,
            initrd=img.initrd,
            cmdline=" ".join(arg for arg in (img.cmdline, tcg, s.kernel_args) if arg),
            disk=vmdir.disk,
            drive=vmdir.drive,
            console_log=vmdir.console_log,
            channel=vmdir.agent_socket,
            ssh_port=record.ssh_port,
            accel=s.accel,
            metadata=record.to_json(),
            net=s.net,
            net_dir=vmdir.net_dir,
            ports=record.ports,
            ram_file=vmdir.path / RAM_FILE if self._shares_memory(record) else None,
        )

    def _shares_memory(self, record: VMRecord) -> bool:
        """Whether the VM runs on guest memory kept in a file: a template's VM, where the backend can
        (SharedMemory: its clones then share the template's pages)."""
        from .templates import BUILDER_MARK

        local = record.host in (None, "local")  # another host's template is a save image there
        return BUILDER_MARK in record.extra and local and isinstance(self.backend, SharedMemory)

    def booter(self) -> Boot:
        """Boots (and hands clones their identity) for this Manager's backend, reporting to its progress."""
        from .boot import Boot

        return Boot(self.backend, self.progress, self.fetch_timeout)

    # ----------------------------------------------------------------------------- other verbs

    def machine(self, name: str) -> Machine:
        """The VM as the backend sees it (state, metadata); NotFound if there is none."""
        state.validate_name(name)
        machine = self.backend.get(name)
        if machine is None:
            raise NotFound(f"VM {name} not found", hint="see `herovm ls`")
        return machine

    def record(self, name: str) -> VMRecord:
        """What herovm recorded about the VM; NotFound if there is none."""
        return VMRecord.from_json(name, self.machine(name).metadata)

    def get(self, name: str) -> VM:
        """A handle on the existing VM `name` (exec, cp, files, ...); NotFound if there is none."""
        return VM(self, self.record(name))

    def attach(self, name: str) -> VM:
        """Like :meth:`get`, from the VM's local directory without asking the backend (the hot path of
        ``herovm exec``): a VM that is stopped or gone is reported at its first use."""
        vmdir = state.VMDir(name)
        if not vmdir.exists():
            return self.get(name)
        return VM(self, VMRecord.from_json(name, vmdir.read_meta()))

    def require_running(self, name: str) -> None:
        """GuestError naming the VM's state, and what brings it back, unless it runs."""
        machine = self.machine(name)
        if machine.state == "paused":
            raise GuestError(f"VM {name} is paused", hint=f"resume it with `herovm resume {name}`")
        if machine.state != "running":
            raise GuestError(f"VM {name} is {machine.state}", hint=f"start it with `herovm start {name}`")

    def pause(self, name: str) -> None:
        """Freeze a running VM: its vCPUs stop, so it uses no CPU; its memory, processes, files and open
        connections stay as they are until `resume`. A paused VM is left as it is. `exec` into a paused VM
        fails at once, naming the state."""
        pausable = require(self.backend, Pausable)
        vmdir = state.VMDir(name)
        with vmdir.lock():
            machine = self.machine(name)
            if machine.state == "paused":
                if not vmdir.paused_file.exists():  # paused by someone else (virsh suspend)
                    vmdir.mark_paused(True)
                return
            if machine.state != "running":
                raise GuestError(
                    f"VM {name} is {machine.state}: only a running VM can be paused",
                    hint=f"start it with `herovm start {name}`",
                )
            vmdir.mark_paused(True)  # first: an exec that starts now already knows
            try:
                pausable.pause(name)
            except BaseException:
                vmdir.mark_paused(False)
                raise

    def resume(self, name: str) -> None:
        """Let a paused VM run on from where it was. A running VM is left as it is."""
        pausable = require(self.backend, Pausable)
        vmdir = state.VMDir(name)
        with vmdir.lock():
            machine = self.machine(name)
            if machine.state == "paused":
                pausable.resume(name)
                self.set_guest_clock(name)
            elif machine.state != "running":
                raise GuestError(
                    f"VM {name} is {machine.state}: only a paused VM can be resumed",
                    hint=f"start it with `herovm start {name}`",
                )
            vmdir.mark_paused(False)

    def stop(self, name: str, timeout: float = 20.0) -> None:
        """Power the guest off through its agent (services get TERM), or hard after `timeout`."""
        vmdir = state.VMDir(name)
        with vmdir.lock():
            machine = self.machine(name)
            if machine.state == "paused" and isinstance(self.backend, Pausable):
                self.backend.resume(name)  # a frozen guest cannot power itself off: its services get TERM
            vmdir.mark_paused(False)
            if machine.state == "stopped":
                return
            self.progress(Progress("stop", f"stopping {name}"))
            deadline = time.monotonic() + timeout
            from .boot import agent_channel

            try:
                channel = agent_channel(
                    self.backend, VMRecord.from_json(name, machine.metadata), time.monotonic() + 2
                )
                channel.send({"op": Command.POWEROFF})
                channel.close()
                while time.monotonic() < deadline:
                    m = self.backend.get(name)
                    if m is None or m.state == "stopped":
                        return
                    time.sleep(0.1)
            except (TimeoutError, OSError):
                pass
            self.progress(Progress("stop", f"{name} did not power off in {timeout:g}s: stopping it hard"))
            self.backend.destroy(name)

    def start(self, name: str, timeout: str | float = "5m") -> VM:
        """Boot a stopped VM again (its disk as it was; its bootstrap does not run twice) and return once it
        answers exec; a running VM is returned as it is. `timeout`: seconds, or a duration such as "2m"."""
        vmdir = state.VMDir(name)
        with vmdir.lock():
            machine = self.machine(name)
            if machine.state == "running":
                return VM(self, VMRecord.from_json(name, machine.metadata))
            if machine.state == "paused":
                raise GuestError(f"VM {name} is paused", hint=f"resume it with `herovm resume {name}`")
            vmdir.mark_paused(False)
            record = self.booter().run(vmdir, seconds(timeout, "timeout"))
        return VM(self, record)

    def set_guest_clock(self, name: str) -> None:
        """Tell the guest's agent the time (Command.CLOCK): its clock stood still while the VM was paused,
        and a restored guest's clock is the snapshot's (there is no NTP in the guest). The agent reads it
        within 0.1 s. Best effort: a guest that cannot be reached keeps its clock, and says nothing."""
        if not self._tell_agent(name, {"op": Command.CLOCK, "time": time.time()}):
            self.progress(Progress("clock", f"could not set the clock of {name}: its agent did not answer"))

    def set_ttl(self, name: str, ttl: str | float | None) -> str | None:
        """Make the VM's time up `ttl` from now (a duration: "30m", or seconds), or never (None): recorded
        (so `gc` and its later boots follow it) and told to its agent (Command.DEADLINE), which powers the
        guest off then. Returns when it is up (ISO 8601), or None. A guest whose agent cannot be reached now
        (paused, stopped) takes it at its next boot; `gc` removes it once its time is up in any case."""
        from .record import epoch

        with state.VMDir(name).lock():
            record = self.record(name)
            expires = after(seconds(ttl, "ttl")) if ttl is not None else None
            self.backend.set_metadata(name, replace(record, expires=expires).to_json())
        self._tell_agent(name, {"op": Command.DEADLINE, "deadline": epoch(expires)})
        return expires

    def _tell_agent(self, name: str, command: dict) -> bool:
        """Send one command to the VM's agent over its channel; False if it could not be reached (best
        effort: for what the guest may also learn later, or not at all)."""
        try:
            connect = self.backend.guest_connector(name, None)
            with connect(AGENT_VSOCK_PORT, time.monotonic() + 0.2) as sock:  # it runs: its channel is there
                sock.sendall(json.dumps(command).encode() + b"\n")
            return True
        except (OSError, HeroVMError):  # TimeoutError is an OSError
            return False

    # ---------------------------------------------------------------------------------------- hosts

    def host_facts(self) -> list[HostFacts]:
        """Every host herovm may place VMs on (`local` first; herovm.hosts), asked at once, each within
        HEROVM_HOST_TIMEOUT: reachable or not (and why), accelerator, CPUs, free memory, room, herovm VMs
        running, images there. `herovm host ls`."""
        from . import hosts
        from .backends.fleet import Fleet

        if isinstance(self.backend, Fleet):
            return self.backend.facts()
        return hosts.facts_of({hosts.LOCAL: self.backend})

    def hosts(self) -> list[dict]:
        """`host_facts` as JSON rows (`herovm host ls --json`)."""
        return [f.to_json() for f in self.host_facts()]

    def prune_host(self, name: str) -> list[str]:
        """Remove from host `name` the image volumes no VM there lies on (`herovm host prune`); returns
        them. The local host's images are `herovm image rm`'s."""
        from . import hosts
        from .backends.fleet import Fleet
        from .backends.remote import RemoteLibvirtBackend

        hosts.get(name)  # NotFound, with its hint
        backend = self.backend.on(name) if isinstance(self.backend, Fleet) else None
        if not isinstance(backend, RemoteLibvirtBackend):
            raise InvalidInput(
                f"host {name}: only other hosts' images are pruned here", hint="see `herovm image rm`"
            )
        return backend.prune_images()

    # ------------------------------------------------------------------------------------ snapshots

    def snapshot(self, name: str, snap: str) -> dict:
        """Snapshot the VM as `snap` (a name like a VM's). A running or paused VM: its disk and its memory and
        device state, taken while it is paused for a moment; it runs on (or stays paused). A stopped VM: its
        disk. Files go under the VM's directory (0600) and only a complete snapshot gets its name: one
        interrupted leaves a `.SNAP.partial` directory that the next create of that name, or `gc`, removes.
        Returns the snapshot's row (see `snapshots`)."""
        return snapshots.create(self, name, snap)

    def snapshots(self, name: str | None = None) -> list[dict]:
        """The snapshots of one VM, or of every VM of this home: one row each (vm, name, created, kind
        "memory" or "disk", state: the VM's then, memory_bytes, disk_bytes: the frozen overlay's, seconds:
        how long taking it took), oldest first."""
        return snapshots.listing(self, name)

    def restore(self, name: str, snap: str) -> dict:
        """Roll the VM back to its snapshot `snap`: its disk as it was then, and for a memory snapshot its
        running state (it runs on from that moment: processes, files; its clock is set to now). A disk
        snapshot leaves the VM stopped (`start` boots it). The snapshot stays, so it can be restored again.
        Returns the snapshot's row with the VM's `vm_state` now."""
        return snapshots.restore(self, name, snap)

    def remove_snapshot(self, name: str, snap: str) -> None:
        """Remove the VM's snapshot `snap`: its memory file, and its frozen disk unless the VM's disk or
        another snapshot's still lies on it."""
        snapshots.remove(self, name, snap)

    # ------------------------------------------------------------------------------------ guest ports

    def port(self, name: str, guest_port: int) -> tuple[str, int]:
        """(host, port) on this host where the VM's `guest_port` is published; NotFound if it is not."""
        return ports.port(self, name, guest_port)

    def publish(self, name: str, guest_port: int, host_port: int | None = None) -> tuple[str, int]:
        """Publish the VM's `guest_port` on 127.0.0.1:`host_port` (a free one if None); see herovm.ports."""
        return ports.publish(self, name, guest_port, host_port)

    # ------------------------------------------------------------------------------ templates, fork

    def create_template(
        self,
        name: str,
        settings: VMSettings | None = None,
        *,
        hosts: list[str] | None = None,
        **options: Any,
    ) -> dict:
        """Make template `name`: boot a VM with `settings` (or `options`, as for `up`), run its bootstrap,
        seal it, keep its memory and disk, remove the VM. `up(..., template=name)` then restores a new VM
        from it instead of booting. `hosts`: make a copy of it on each (herovm.hosts; the local one when
        none is named, or `host=`), from the same settings: its clones are then placed among them. Returns
        its row (see `templates`)."""
        from . import templates

        return templates.create(self, name, VMSettings.of(options, base=settings), hosts)

    def templates(self) -> list[dict]:
        """Every template: name, created, hosts (those with a copy of it, `local` first), image, cpus, memory,
        net, bootstrap, memory_bytes, disk_bytes, seconds (how long making it took), used_by (the VMs whose
        disks lie on it)."""
        from . import templates

        return templates.listing(self)

    def remove_template(self, name: str, force: bool = False) -> list[str]:
        """Remove template `name`; refused (Busy) while a VM's disk lies on it. Its copies on other hosts
        are removed there first; a host that does not answer refuses it (BackendUnavailable), unless `force`
        (a host gone for good), which forgets that copy here; returns the hosts whose copy was forgotten."""
        from . import templates

        return templates.remove(self, name, forget_unreachable=force)

    def fork(self, source: str, names: list[str]) -> dict:
        """New VMs `names` from the running VM `source`: each holds its memory (processes, files) and disk
        as they were at the fork, with an identity of its own; writes after the fork cross in neither
        direction. The source runs on. Returns {"source", "source_pause_seconds", "clones": [{"name",
        "seconds"}]}."""
        from . import clones

        return clones.fork(self, source, names)

    def down(self, name: str, wait: float = 300.0, forget_unreachable: bool = False) -> None:
        """Remove the VM: its domain, disk, drive, keys and state. Nothing is left.

        The guest is powered off before the lock is taken: an `up` of the same VM in another process then
        fails at once (its guest stopped) and lets go, instead of `down` waiting for its whole boot.

        A VM on another host that cannot be reached is refused (BackendUnavailable), unless
        `forget_unreachable` (`down --force`): then only what this machine holds of it goes (its directory:
        keys, record), and its machine and files on that host stay there (docs/hosts.md)."""
        state.validate_name(name)
        vmdir = state.VMDir(name)
        try:
            machine = self.backend.get(name)
        except BackendUnavailable as e:
            from .hosts import LOCAL, host_of_vm

            # never a local VM: with libvirtd down here, its domain would outlive the disk removed with it
            if not forget_unreachable or not vmdir.exists() or host_of_vm(name) == LOCAL:
                raise
            with vmdir.lock(wait=wait):
                self.progress(Progress("down", f"forgetting {name}: {e.message}; its machine there stays"))
                vmdir.remove()
            return
        if machine is None and not vmdir.exists():
            from .backends.fleet import Fleet

            if isinstance(self.backend, Fleet):  # on another host, and no directory says so: look there
                self.backend.list()
                machine = self.backend.get(name)
            if machine is None:
                raise NotFound(f"VM {name} not found", hint="see `herovm ls`")
        if machine is not None and not self.owns(machine):
            raise NotFound(
                f"VM {name} belongs to another herovm home ({machine.metadata.get('home')})",
                hint="run herovm with HEROVM_HOME set to that directory to manage it",
            )
        self.backend.destroy(name)
        with vmdir.lock(wait=wait):
            self.remove_held(name)

    def remove_held(self, name: str) -> None:
        """Remove the VM's domain and directory; the caller holds its lock (down, gc, a failed up)."""
        self.progress(Progress("down", f"removing {name}"))
        self.backend.undefine(name)
        state.VMDir(name).remove()

    def owns(self, machine: Machine) -> bool:
        """Whether a domain belongs to this HEROVM_HOME (domains made before homes were recorded: yes)."""
        home = VMRecord.from_json(machine.name, machine.metadata).home
        return home is None or os.path.realpath(home) == os.path.realpath(state.home())

    def own_machines(self) -> dict[str, Machine]:
        """This HEROVM_HOME's machines, by name."""
        return {m.name: m for m in self.backend.list() if self.owns(m)}

    def down_all(self) -> list[str]:
        """`down` every VM of this HEROVM_HOME (and every VM directory left without a machine); returns
        their names."""
        names = sorted(set(self.own_machines()) | set(state.list_vm_dirs()))
        for name in names:
            self.down(name)
        return names

    def gc(self) -> list[str]:
        """Remove what crashed or killed herovm processes left behind (herovm.leftovers.collect): VM
        directories without a domain, domains never started, stale lock files, partial snapshots and
        templates (and a killed `template create`'s VM), overlays and fork layers nothing needs. Running
        and paused VMs of the user are never touched, nor anything a herovm process is working on."""
        return leftovers.collect(self)

    def ls(self) -> list[dict]:
        """Every VM of this HEROVM_HOME, by name: one row each (`herovm ls --json`; typed: `vms()`)."""
        rows = []
        for m in self.own_machines().values():
            record = VMRecord.from_json(m.name, m.metadata)
            s = record.settings or RecordedSettings()
            rows.append(
                {
                    "name": m.name,
                    "state": m.state,
                    "host": record.host or "local",
                    "image": record.image,
                    "accel": s.accel,
                    "cpus": s.cpus,
                    "memory": s.memory,
                    "ports": ports.rows(record.ports),
                    "ssh_port": record.ssh_port,
                    "ready": record.last_boot.ready and m.state == "running",  # answers exec now
                }
            )
        known = {r["name"] for r in rows}
        for orphan in state.list_vm_dirs():
            if orphan not in known:
                rows.append(
                    {
                        "name": orphan,
                        "state": "orphaned",
                        "host": None,
                        "image": None,
                        "accel": None,
                        "cpus": None,
                        "memory": None,
                        "ports": [],
                        "ssh_port": None,
                        "ready": False,
                    }
                )
        return sorted(rows, key=lambda r: r["name"])

    def status(self, name: str) -> dict:
        """The VM's facts, and what its last boot came to. The outcome is what `up` (or `start`) saw on the
        agent channel, recorded in the domain; if that process did not see the end (it was killed), the
        console decides: the first `ready` or `failed` of the boot with the recorded nonce. Nothing the guest
        writes after that, or with another nonce, counts (herovm.protocol.Story). When the beginning of the
        boot is no longer in the console (rotated away) the steps are unknown, and so is an outcome nobody
        recorded: `agent` is then "unknown" rather than a guess."""
        from .bootstrap import redacted
        from .guest.events import console_story

        machine = self.machine(name)
        record = VMRecord.from_json(name, machine.metadata)
        vmdir = state.VMDir(name)
        copy_console(self.backend, name, vmdir.console_log)  # a VM on another host: its console, copied
        last = record.last_boot
        story, whole = console_story(vmdir.console_log, last.nonce)
        agent = last.outcome or story.outcome or ("booting" if story.begun else "unknown")
        facts = {
            "name": name,
            "state": machine.state,
            "paused_since": vmdir.paused_since() if machine.state == "paused" else None,
            "backend": self.backend.name,
            "host": record.host or "local",
            "image": record.image,
            "image_id": record.image_id,
            "settings": record.settings.to_json() if record.settings else None,
            "ssh_port": record.ssh_port,
            "ports": ports.rows(record.ports),
            "bootstrap": record.bootstrap,
            "created": record.created,
            "last_boot": last.to_json(),
            "restored": record.restored,  # the snapshot it was rolled back to since its last boot, if any
            "origin": record.origin,  # a clone's: {"template": T} or {"fork": SOURCE, "at": TIME}
            "expires": record.expires,  # when its time is up (`--ttl`): it powers off, and `gc` removes it
            "agent": agent,  # what its last boot came to (ready, failed, booting, unknown); `state`: now
            # whole: the boot's events from its start; cut: its start is no longer in the console (a guest
            # that writes a lot: virtlogd rotates the log); none: the console holds nothing of this boot.
            "events": "whole" if story.begun else ("none" if whole else "cut"),
            "steps": [
                {k: e.get(k) for k in ("index", "action", "line", "ok", "seconds", "exit_code", "error")}
                for e in story.events_of("action.end")
            ],
            "failure": story.failure if agent == "failed" else None,
        }
        return redacted(facts, vmdir.read_secrets())  # type: ignore[return-value]

    # ------------------------------------------------------------------------- typed forms (api_types)

    def info(self, name: str) -> VMStatus:
        """`status` as a VMStatus (herovm.api_types): the same facts, typed."""
        from .api_types import VMStatus

        return VMStatus.from_json(self.status(name))

    def vms(self) -> list[VMInfo]:
        """`ls` as VMInfo rows (herovm.api_types), by name."""
        from .api_types import VMInfo

        return [VMInfo.from_json(row) for row in self.ls()]

    def snapshot_infos(self, name: str | None = None) -> list[SnapshotInfo]:
        """`snapshots` as SnapshotInfo rows: one VM's, or every VM's of this home, oldest first."""
        from .api_types import SnapshotInfo

        return [SnapshotInfo.from_json(row) for row in self.snapshots(name)]

    def template_infos(self) -> list[TemplateInfo]:
        """`templates` as TemplateInfo rows."""
        from .api_types import TemplateInfo

        return [TemplateInfo.from_json(row) for row in self.templates()]

    def make_template(
        self,
        name: str,
        settings: VMSettings | None = None,
        *,
        hosts: list[str] | None = None,
        **options: Any,
    ) -> TemplateInfo:
        """`create_template`, returning a TemplateInfo: boot a VM, run its bootstrap, keep its memory and
        disk as template `name` (on each of `hosts`), remove the VM; `up(..., template=name)` then restores
        VMs from it."""
        from .api_types import TemplateInfo

        return TemplateInfo.from_json(self.create_template(name, settings, hosts=hosts, **options))

    def logs(self, name: str, console: bool = False) -> Path | list[dict]:
        """The events of the VM's last boot as the console mirrors them (see `status`), or with `console`
        the console log's path (raw: pass what you show of it through `redactor`)."""
        from .bootstrap import redacted
        from .guest.events import console_story

        nonce = self.record(name).last_boot.nonce
        vmdir = state.VMDir(name)
        copy_console(self.backend, name, vmdir.console_log)
        if console:
            return vmdir.console_log
        events = console_story(vmdir.console_log, nonce)[0].events
        return redacted(events, vmdir.read_secrets())  # type: ignore[return-value]

    def redactor(self, name: str) -> Callable[[str], str]:
        """Replaces the VM's secret values by `[secret NAME]` in text read from the guest. The agent redacts
        its own events already; this also covers what a guest process wrote to the console itself."""
        from .bootstrap import redact

        secrets = state.VMDir(state.validate_name(name)).read_secrets()
        return lambda text: redact(text, secrets)
