"""The Cloud Hypervisor backend: one `cloud-hypervisor --api-socket` process per VM, driven over its REST API.

Source of truth. Cloud Hypervisor keeps no list of machines, so this backend keeps one small state file per
VM, `HEROVM_HOME/ch/NAME.json` (0600, directory 0700): the VM config sent with `vm.create`, herovm's
metadata, the VMM's pid and the start time of that pid. A machine exists while its state file does; its state
comes from the live VMM (`vm.info`), and a VMM that is not running means "stopped".

Processes. The VMM is exec'd directly (no shell), in a session and process group of its own, with its pid in
`VMDIR/cloud-hypervisor.pid` and in the state file. It is only ever signalled after checking that the pid
still is that process (same start time in /proc, the VM's api socket on its command line). Stopping asks
`vm.shutdown` and `vmm.shutdown` first, each with a timeout, then SIGTERM and SIGKILL to the process group.

Lifecycle. define: start the VMM, `vmm.ping`, `vm.create` (Cloud Hypervisor checks the config), write the
state file; any failure kills the VMM and leaves no state file. start: `vm.boot` on that VMM, or a new VMM
(after a power-off the VMM is gone) with `vm.create` + `vm.boot`. destroy: the VMM ends. The guest is
reached through hybrid vsock (herovm/guest/vsock.py): no network device. See docs/cloud-hypervisor.md.

Capabilities: Pausable (`vm.pause`, `vm.resume`), Snapshots (`vm.snapshot` while paused, the disk frozen as a
copy of the overlay; a restore is a new VMM's `vm.restore`) and Clones (a new VM restored from another's
snapshot on its own files); see `snapshot` for why the disk is copied.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .. import disks, state
from ..errors import AlreadyExists, BackendUnavailable, HeroVMError, InvalidInput, NotFound
from ..guest import vsock
from .base import GuestConnector, Machine, MachineSpec, SavedState

API_ROOT = "/api/v1/"
GUEST_CID = 3
_STATES = {"Created": "stopped", "Shutdown": "stopped", "Running": "running", "Paused": "paused"}


class CloudHypervisorError(HeroVMError):
    """The VMM answered an API request with an error (status and Cloud Hypervisor's messages kept)."""


def vm_config(spec: MachineSpec, kernel: Path, vsock_socket: Path) -> dict:
    """The `vm.create` body (VmConfig in cloud-hypervisor.yaml), as plain data."""
    return {
        "payload": {"kernel": str(kernel), "initramfs": str(spec.initrd), "cmdline": spec.cmdline},
        "cpus": {"boot_vcpus": spec.cpus, "max_vcpus": spec.cpus},
        "memory": {"size": spec.memory},
        "disks": [
            # the overlay's base image is a qcow2 backing file: Cloud Hypervisor opens those only if asked
            {"id": "root", "path": str(spec.disk), "image_type": "Qcow2", "backing_files": True},
            {"id": "drive", "path": str(spec.drive), "image_type": "Raw", "readonly": True},
        ],
        "serial": {"mode": "File", "file": str(spec.console_log)},
        "console": {"mode": "Off"},
        "rng": {"src": "/dev/urandom"},
        "vsock": {"id": "vsock0", "cid": GUEST_CID, "socket": str(vsock_socket)},
    }


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


class CloudHypervisorBackend:
    name = "cloud-hypervisor"

    def __init__(
        self,
        binary: str | os.PathLike | None = None,
        *,
        api_timeout: float = 5.0,
        start_timeout: float = 10.0,
        kernel: Callable[[Path], Path] | None = None,
        snapshot_timeout: float = 300.0,
    ) -> None:
        self.binary = str(binary) if binary else os.environ.get("HEROVM_CLOUD_HYPERVISOR") or None
        self.api_timeout = api_timeout
        self.start_timeout = start_timeout
        self.snapshot_timeout = snapshot_timeout  # vm.snapshot and vm.restore write or read all guest memory
        self._kernel = kernel  # bzImage -> bootable kernel; default: herovm.kernel.ensure_vmlinux
        self._children: dict[int, subprocess.Popen] = {}

    # --------------------------------------------------------------------------- state files

    @staticmethod
    def state_dir() -> Path:
        return state.ensure_dir(state.home() / "ch", 0o700)

    def _state_path(self, name: str) -> Path:
        return self.state_dir() / f"{state.validate_name(name)}.json"

    def _load(self, name: str) -> dict | None:
        try:
            return json.loads(self._state_path(name).read_text())
        except (OSError, ValueError):
            return None

    def _save(self, st: dict) -> None:
        path = self._state_path(st["name"])
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(st, f, indent=1, sort_keys=True)
        tmp.replace(path)

    def _require(self, name: str) -> dict:
        st = self._load(name)
        if st is None:
            raise NotFound(f"VM {name} not found (no {self._state_path(name)})", hint="see `herovm ls`")
        return st

    # ---------------------------------------------------------------------------- Backend API

    def define(self, spec: MachineSpec) -> None:
        self._refuse_network(spec)
        path, st = self._claim(spec)
        try:
            st["config"] = vm_config(spec, self._bootable_kernel(spec.kernel), Path(st["vsock_socket"]))
            self._spawn(st)
            self._api(st, "PUT", "vm.create", st["config"])
            self._save(st)
        except BaseException:
            self._end_process(st)
            path.unlink(missing_ok=True)
            raise

    @staticmethod
    def _refuse_network(spec: MachineSpec) -> None:
        if spec.net != "none":
            raise InvalidInput(
                f"the cloud-hypervisor backend gives guests no network device (asked: --net {spec.net})",
                hint="use --net none: exec, cp and ssh reach the guest over vsock all the same",
            )

    def _claim(self, spec: MachineSpec) -> tuple[Path, dict]:
        """The new VM's state file, created empty (so its name is claimed: a second claim fails, whatever
        else runs), and its state, without "config" yet. AlreadyExists if the VM exists."""
        path = self._state_path(spec.name)
        vmdir = spec.disk.parent
        st = {
            "name": spec.name,
            "vmdir": str(vmdir),
            "api_socket": str(vmdir / "ch-api.sock"),
            "vsock_socket": str(vmdir / "vsock.sock"),
            "metadata": spec.metadata,
            "pid": None,
            "pid_start": None,
        }
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise AlreadyExists(
                f"VM {spec.name} already exists", hint=f"remove it with `herovm down {spec.name}`"
            ) from None
        os.close(fd)
        return path, st

    def start(self, name: str) -> None:
        st = self._require(name)
        if self._pid(st) is not None:
            vm_state = self._vm_state(st)
            if vm_state == "Running":
                return
            if vm_state == "Created":
                self._boot(st)
                return
            self._end_process(st)  # shut down, paused or unanswering: start over with a fresh VMM
        try:
            self._spawn(st)
            self._api(st, "PUT", "vm.create", st["config"])
        except BaseException:
            self._end_process(st)
            raise
        self._boot(st)

    def _boot(self, st: dict) -> None:
        Path(st["vsock_socket"]).unlink(missing_ok=True)
        try:
            self._api(st, "PUT", "vm.boot")
        except BaseException:
            self._end_process(st)
            raise

    def destroy(self, name: str) -> None:
        st = self._load(name)
        if st is not None:
            self._end_process(st)

    def undefine(self, name: str) -> None:
        st = self._load(name)
        if st is None:
            return
        self._end_process(st)
        self._state_path(name).unlink(missing_ok=True)

    def get(self, name: str) -> Machine | None:
        st = self._load(name)
        if st is None:
            return None
        if self._pid(st) is None:
            return Machine(name, "stopped", st.get("metadata") or {})
        vm_state = self._vm_state(st)
        return Machine(name, _STATES.get(vm_state or "", "other"), st.get("metadata") or {})

    def list(self) -> list[Machine]:
        machines = []
        for path in sorted(self.state_dir().glob("*.json")):
            if not state.NAME_RE.match(path.stem):
                continue
            machine = self.get(path.stem)
            if machine is not None:
                machines.append(machine)
        return machines

    def set_metadata(self, name: str, metadata: dict) -> None:
        st = self._require(name)
        st["metadata"] = metadata
        self._save(st)

    def close(self) -> None:
        for proc in self._children.values():
            with contextlib.suppress(OSError):
                proc.poll()  # reap what ended; running VMMs outlive this process on purpose

    def guest_connector(self, name: str, ssh_port: int | None) -> GuestConnector:
        """Every guest port over the VM's hybrid vsock (it has no NIC, so no forward: `ssh_port` is None)."""

        def connect(port: int, deadline: float) -> socket.socket:
            st = self._require(name)
            try:
                return vsock.connect_hybrid(
                    st["vsock_socket"], port, deadline, alive=lambda: self._pid(st) is not None
                )
            except ConnectionError as e:
                raise TimeoutError(str(e)) from e  # the VMM is gone: the guest will never answer

        return connect

    # ------------------------------------------------------------------------------ pause, resume

    def pause(self, name: str) -> None:
        self._api(self._running(name), "PUT", "vm.pause")

    def resume(self, name: str) -> None:
        self._api(self._running(name), "PUT", "vm.resume")

    # ------------------------------------------------------------------ snapshots and clones

    def disk(self, name: str) -> Path:
        return Path(_disk_entry(self._require(name)["config"], "root")["path"])

    def snapshot(self, name: str, directory: Path) -> SavedState:
        """A running (or paused) VM: paused (if it ran), Cloud Hypervisor's `vm.snapshot` into
        `directory`/memory.save/ (config.json, state.json, memory-ranges), its overlay copied to a new
        overlay file that becomes the frozen disk, resumed (if it ran). A stopped VM: a new overlay on its
        disk becomes its disk, as on libvirt; a VMM that still holds the VM (created, or shut down) ends
        first, so that the next start creates the VM on the new overlay.

        Why a copy, and not a new overlay on top as libvirt does: Cloud Hypervisor cannot switch a running
        VM's disk to another file. Its hot-unplug (`vm.remove-device`) and `vm.add-disk` would take the root
        disk away from a guest that has it mounted, and ending the VMM to restore it at once on a new
        overlay costs a full memory restore with the VM down. A copy of the overlay made while the VM is
        paused is the disk as the guest left it: Cloud Hypervisor (since PR #8607, in the commit our OpenAPI
        document comes from) drains the disk's requests and writes its cached qcow2 metadata when it pauses.
        The VM keeps writing its own file, and the copy, never opened by the VMM, is never written again.
        `cp --reflink=auto` clones the extents where the filesystem can (btrfs, XFS: milliseconds), else
        copies the overlay's data, keeping holes (the VM stays paused meanwhile)."""
        st = self._require(name)
        current = Path(_disk_entry(st["config"], "root")["path"])
        vm_state = self._vm_state(st) if self._pid(st) is not None else "NotCreated"
        if vm_state in ("Running", "Paused"):
            return self._snapshot_live(st, directory, current, running=vm_state == "Running")
        if vm_state is None:
            raise HeroVMError(
                f"cloud-hypervisor of {name} does not answer: the VM cannot be snapshotted",
                hint=f"see {Path(st['vmdir']) / 'cloud-hypervisor.log'}; `herovm stop {name}` ends it",
            )
        self._end_process(st)  # no VMM may keep the VM's old config: a start makes a fresh one
        new = disks.new_overlay_path(current.parent)
        disks.create_overlay(current, new, what=name)
        try:
            _disk_entry(st["config"], "root")["path"] = str(new)
            self._save(st)
        except BaseException:
            new.unlink(missing_ok=True)
            raise
        return SavedState(current)

    def _snapshot_live(self, st: dict, directory: Path, current: Path, *, running: bool) -> SavedState:
        memory = directory / "memory.save"
        memory.mkdir(mode=0o700)
        frozen = disks.new_overlay_path(current.parent)
        if running:
            self._api(st, "PUT", "vm.pause")  # Cloud Hypervisor snapshots only a paused VM
        try:
            self._api(
                st,
                "PUT",
                "vm.snapshot",
                {"destination_url": f"file://{memory.resolve()}"},
                timeout=self.snapshot_timeout,
            )
            _copy_file(current, frozen, what=f"the disk of {st['name']}")
            if running:
                running = False  # resumed below, or not to be resumed again on failure
                self._api(st, "PUT", "vm.resume")
        except BaseException:
            frozen.unlink(missing_ok=True)
            if running:
                with contextlib.suppress(HeroVMError):
                    self._api(st, "PUT", "vm.resume")
            raise
        for path in memory.iterdir():
            os.chmod(path, 0o600)
        return SavedState(frozen, memory)

    def restore(self, name: str, saved: SavedState) -> None:
        """The VMM ends (hard: `vm.shutdown` is no ACPI request) and a new overlay on `saved.disk` becomes the
        VM's disk. With memory: a new VMM is restored (`vm.restore`) from a copy of the snapshot whose
        config.json names the VM's files as they are now (its new overlay, drive, console log, vsock socket),
        and resumed; see `_restore_vmm`."""
        st = self._require(name)
        snap_config = None
        if saved.memory is not None:  # a snapshot of another machine is refused before anything changes
            snap_config = _snapshot_config(saved.memory)
            _restored_config(snap_config, st["config"])
        self._end_process(st)
        new = disks.new_overlay_path(saved.disk.parent)
        disks.create_overlay(saved.disk, new, what=name)
        try:
            _disk_entry(st["config"], "root")["path"] = str(new)
            self._save(st)
        except BaseException:
            new.unlink(missing_ok=True)
            raise
        if saved.memory is not None:
            assert snap_config is not None
            self._restore_vmm(st, saved.memory, _restored_config(snap_config, st["config"]))

    def clone(self, spec: MachineSpec, memory: Path) -> None:
        """A new VM `spec.name`, restored from `memory` (a snapshot's memory.save directory, only read) with
        `spec`'s files and metadata, and resumed; its state file is written as `define` writes it, so it is
        a VM like any other (a cold `start` after a power-off boots `spec`'s config)."""
        self._refuse_network(spec)
        snap_config = _snapshot_config(memory)
        path, st = self._claim(spec)
        try:
            st["config"] = vm_config(spec, self._bootable_kernel(spec.kernel), Path(st["vsock_socket"]))
            self._restore_vmm(st, memory, _restored_config(snap_config, st["config"]))
            self._save(st)
        except BaseException:
            self._end_process(st)
            path.unlink(missing_ok=True)
            raise

    def _restore_vmm(self, st: dict, memory: Path, config: dict) -> None:
        """A new VMM for the VM of `st`, restored from the snapshot in `memory` with `config` as its
        config.json, and resumed. Cloud Hypervisor restores the config the snapshot holds (RestoreConfig in
        the OpenAPI document overrides no path), so it reads a copy of the snapshot: a directory in the VM's
        directory with `config` as config.json and the snapshot's other files hard-linked (copied where a
        link cannot be made), removed once the restore is done: it reads memory-ranges into the guest's
        memory then (the default, eager `memory_restore_mode`). The snapshot itself is never written. Any
        failure ends the new VMM."""
        work = Path(st["vmdir"]) / f".ch-restore-{secrets.token_hex(4)}"
        work.mkdir(mode=0o700)
        try:
            for src in memory.iterdir():
                if src.name != "config.json":
                    _link_or_copy(src, work / src.name, what=f"the snapshot restored as {st['name']}")
            state.write_private(work / "config.json", json.dumps(config, indent=1))
            Path(st["vsock_socket"]).unlink(missing_ok=True)  # the restored VMM binds it again
            try:
                self._spawn(st)
                self._api(
                    st,
                    "PUT",
                    "vm.restore",
                    {"source_url": f"file://{work.resolve()}"},
                    timeout=self.snapshot_timeout,
                )
                self._api(st, "PUT", "vm.resume")
            except BaseException:
                self._end_process(st)
                raise
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _running(self, name: str) -> dict:
        st = self._require(name)
        if self._pid(st) is None:
            raise HeroVMError(f"VM {name} is stopped", hint=f"start it with `herovm start {name}`")
        return st

    # ---------------------------------------------------------------------------- the API

    def _api(
        self, st: dict, method: str, endpoint: str, body: dict | None = None, timeout: float | None = None
    ) -> dict | None:
        timeout = self.api_timeout if timeout is None else timeout
        conn = _UnixHTTPConnection(st["api_socket"], timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            conn.request(method, API_ROOT + endpoint, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except TimeoutError as e:
            raise HeroVMError(
                f"cloud-hypervisor of {st['name']} did not answer {endpoint} within {timeout:g}s",
                endpoint=endpoint,
                timeout=True,
            ) from e
        except (OSError, http.client.HTTPException) as e:
            raise HeroVMError(
                f"cannot reach the cloud-hypervisor API of {st['name']} ({endpoint}): {e}", endpoint=endpoint
            ) from e
        finally:
            conn.close()
        if 200 <= resp.status < 300:
            try:
                return json.loads(raw) if raw.strip() else None
            except ValueError:
                return None
        raise CloudHypervisorError(
            f"cloud-hypervisor refused {endpoint} for {st['name']} (HTTP {resp.status}): {_messages(raw)}",
            status=resp.status,
            endpoint=endpoint,
        )

    def _vm_state(self, st: dict) -> str | None:
        """Cloud Hypervisor's VmState, "NotCreated" on 404, None if the VMM does not answer."""
        try:
            info = self._api(st, "GET", "vm.info", timeout=min(self.api_timeout, 2.0))
        except CloudHypervisorError as e:
            return "NotCreated" if e.details.get("status") == 404 else None
        except HeroVMError:
            return None
        return (info or {}).get("state")

    # ------------------------------------------------------------------------- the process

    def _find_binary(self) -> str:
        binary = self.binary or shutil.which("cloud-hypervisor")
        if not binary:
            from .. import accel

            kvm = accel.detect()
            raise BackendUnavailable(
                "cloud-hypervisor is not installed"
                + ("" if kvm.accel == "kvm" else f", and KVM cannot run guests here ({kvm.reasons[0]})"),
                hint="install a cloud-hypervisor release binary on PATH (or set HEROVM_CLOUD_HYPERVISOR); "
                "see `herovm doctor`",
            )
        return binary

    def _bootable_kernel(self, bzimage: Path) -> Path:
        if self._kernel is not None:
            return self._kernel(bzimage)
        from ..kernel import ensure_vmlinux

        return ensure_vmlinux(bzimage)

    def _spawn(self, st: dict) -> None:
        binary = self._find_binary()
        vmdir = Path(st["vmdir"])
        api = Path(st["api_socket"])
        api.unlink(missing_ok=True)
        with open(vmdir / "cloud-hypervisor.log", "ab") as log:
            proc = subprocess.Popen(
                [binary, "--api-socket", f"path={api}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=vmdir,
                start_new_session=True,  # its own session and process group: no terminal signals reach it
                close_fds=True,
            )
        self._children[proc.pid] = proc
        st["pid"], st["pid_start"] = proc.pid, _start_time(proc.pid)
        (vmdir / "cloud-hypervisor.pid").write_text(f"{proc.pid}\n")
        if self._state_path(st["name"]).exists():
            self._save(st)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if proc.poll() is not None:
                raise HeroVMError(
                    f"cloud-hypervisor exited at once (status {proc.returncode}): {_tail(vmdir)}",
                    hint=f"see {vmdir / 'cloud-hypervisor.log'}",
                )
            try:
                self._api(st, "GET", "vmm.ping", timeout=1.0)
                return
            except CloudHypervisorError:
                raise
            except HeroVMError:
                if time.monotonic() >= deadline:
                    raise HeroVMError(
                        f"cloud-hypervisor did not answer vmm.ping within {self.start_timeout:g}s"
                    ) from None
                time.sleep(0.02)

    def _pid(self, st: dict) -> int | None:
        """The VMM's pid if that process is still ours and alive (not a zombie, not a reused pid)."""
        pid = st.get("pid")
        if not pid:
            return None
        proc = self._children.get(pid)
        if proc is not None and proc.poll() is not None:
            return None
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X") or int(fields[19]) != st.get("pid_start"):
            return None
        return pid if f"path={st['api_socket']}".encode() in cmdline else None

    def _end_process(self, st: dict) -> None:
        """The VMM ends: vm.shutdown and vmm.shutdown, each within the API timeout; then SIGTERM, SIGKILL.
        Afterwards no process of this VM runs and its sockets and pid file are gone."""
        pid = self._pid(st)
        if pid is not None:
            hung = False
            for endpoint in ("vm.shutdown", "vmm.shutdown"):
                try:
                    self._api(st, "PUT", endpoint)
                except CloudHypervisorError:
                    continue  # e.g. 404/405: no VM created or booted; the VMM answers, so go on
                except HeroVMError:
                    hung = True
                    break
            if hung or not self._wait_gone(st, self.api_timeout):
                for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
                    if self._pid(st) is None:
                        break
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, sig)  # its own group (start_new_session): helpers die with it
                    self._wait_gone(st, wait)
            if self._pid(st) is not None:
                raise HeroVMError(f"cloud-hypervisor pid {pid} of {st['name']} survived SIGKILL")
        vmdir = Path(st["vmdir"])
        for path in (
            Path(st["api_socket"]),
            Path(st["api_socket"] + ".lock"),
            Path(st["vsock_socket"]),
            vmdir / "cloud-hypervisor.pid",
        ):
            with contextlib.suppress(OSError):
                path.unlink()
        st["pid"] = st["pid_start"] = None
        if self._state_path(st["name"]).exists():
            self._save(st)

    def _wait_gone(self, st: dict, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self._pid(st) is not None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        proc = self._children.pop(st.get("pid") or 0, None)
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.wait(timeout=1)
        return True


def _start_time(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _messages(raw: bytes) -> str:
    """Cloud Hypervisor's error body: a JSON list of messages, outermost first."""
    try:
        messages = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace").strip() or "(no details)"
    if isinstance(messages, list):
        return ": ".join(str(m) for m in messages) or "(no details)"
    return str(messages)


def _tail(vmdir: Path) -> str:
    try:
        lines = (vmdir / "cloud-hypervisor.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(no output)"


def _disk_entry(config: dict, disk_id: str) -> dict:
    """The disk `disk_id` ("root": the VM's overlay; "drive": its config drive) of a VmConfig."""
    for disk in config.get("disks") or []:
        if disk.get("id") == disk_id:
            return disk
    raise HeroVMError(f"the VM config has no disk {disk_id!r}")


def _snapshot_config(memory: Path) -> dict:
    """The config.json of a Cloud Hypervisor snapshot directory; InvalidInput if it is none."""
    try:
        config = json.loads((memory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InvalidInput(f"{memory} is not a Cloud Hypervisor snapshot (its config.json: {e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("disks"), list):
        raise InvalidInput(f"{memory} is not a Cloud Hypervisor snapshot (config.json has no disks)")
    return config


def _restored_config(saved: dict, config: dict) -> dict:
    """The snapshot's VmConfig `saved` (all its devices and settings, which its state.json must match) with
    the files of the VM restored from it, as `config` (the VM's own VmConfig) names them: each disk's
    path (by id), the serial's file, the vsock's socket, the kernel and initramfs. InvalidInput if the
    snapshot is of a machine of other sizes or disks."""
    out = copy.deepcopy(saved)
    ids = sorted(str(d.get("id")) for d in out["disks"])
    if ids != sorted(str(d.get("id")) for d in config["disks"]):
        raise InvalidInput(f"the snapshot's machine has other disks ({', '.join(ids)})")
    for what, path in (("cpus", "boot_vcpus"), ("memory", "size")):
        have, want = (out.get(what) or {}).get(path), config[what][path]
        if have != want:
            raise InvalidInput(f"the snapshot's machine has {what} {path} {have}, this one {want}")
    for disk in out["disks"]:
        disk["path"] = _disk_entry(config, disk["id"])["path"]
    if isinstance(out.get("serial"), dict) and "file" in config.get("serial", {}):
        out["serial"]["file"] = config["serial"]["file"]
    if isinstance(out.get("vsock"), dict) and "vsock" in config:
        out["vsock"]["socket"] = config["vsock"]["socket"]
    if isinstance(out.get("payload"), dict):
        for key in ("kernel", "initramfs"):
            if key in config["payload"]:
                out["payload"][key] = config["payload"][key]
    return out


def _copy_file(src: Path, dst: Path, *, what: str) -> None:
    """Copy `src` to the new file `dst` (0600 from the start): extents cloned where the filesystem can,
    holes kept. `what` names the file in the error."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:  # onto the existing file: cp keeps its mode
        subprocess.run(
            ["cp", "--reflink=auto", "--", str(src), str(dst)], check=True, capture_output=True, text=True
        )
    except subprocess.CalledProcessError as e:
        dst.unlink(missing_ok=True)
        raise HeroVMError(f"cannot copy {what} ({src}): {e.stderr.strip()}") from e
    except BaseException:
        dst.unlink(missing_ok=True)
        raise


def _link_or_copy(src: Path, dst: Path, *, what: str) -> None:
    """`dst` names the file `src` too (a hard link), or, where none can be made (another filesystem,
    fs.protected_hardlinks), is a copy of it."""
    try:
        os.link(src, dst)
    except OSError:
        _copy_file(src, dst, what=what)
