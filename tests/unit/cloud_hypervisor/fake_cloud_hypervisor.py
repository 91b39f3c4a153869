"""A stand-in for `cloud-hypervisor --api-socket path=SOCKET`, built from Cloud Hypervisor's OpenAPI document.

It serves the REST API on a real unix socket and keeps one VM's state the way the document describes it:
Created -> Running <-> Paused -> Shutdown, with the documented answers (204 done, 200 + JSON for vm.info and
vmm.ping, 404 "not created", 405 "wrong state") and Cloud Hypervisor's error body (a JSON list of messages,
outermost first). Every request is checked against the document first: an unknown path is a 404, a method
the path lacks a 400, a body that does not fit the schema a 400 (as Cloud Hypervisor answers them).

Snapshots as Cloud Hypervisor takes them (its docs/snapshot_restore.md): `vm.snapshot` of a paused VM into an
existing directory writes config.json (the VM's config), state.json and memory-ranges (the "guest memory":
here a token made at boot, `boot-<pid>-<n>`); `vm.restore` on a VMM with no VM reads those three, opens the
config's disks, binds its vsock socket (which must not exist) and leaves the VM paused (running with
`resume`). The console log says `booted <token>` or `restored <token>`. Writable disks are locked while the
VM holds them (fcntl, as Cloud Hypervisor locks its disk images): a second VMM cannot open the same overlay.

Test knobs (environment): FAKE_CH_LOG=FILE appends every request and answer as a JSON line;
FAKE_CH_FAIL=endpoint:status[,...] answers that endpoint with that error status; FAKE_CH_HANG=endpoint never
answers it; FAKE_CH_IGNORE_TERM=1 ignores SIGTERM; FAKE_CH_EXIT=1 exits at once with status 1.
It runs no guest.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import socketserver
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contract  # noqa: E402

VERSION = "v48.0-herovm-stand-in"
FAIL = dict(
    (item.split(":")[0], int(item.split(":")[1]))
    for item in filter(None, os.environ.get("FAKE_CH_FAIL", "").split(","))
)
HANG = set(filter(None, os.environ.get("FAKE_CH_HANG", "").split(",")))
LOG = os.environ.get("FAKE_CH_LOG")


class VMM:
    def __init__(self) -> None:
        self.config: dict | None = None
        self.state: str | None = None  # None: no VM created
        self.exit_after_reply = False
        self.memory = ""  # what the guest's memory holds: a token per boot
        self.boots = 0
        self.held: list = []  # the disk files the VM holds (locked) and its vsock socket


vmm = VMM()


class Error(Exception):
    def __init__(self, status: int, *messages: str) -> None:
        self.status = status
        self.messages = list(messages)


def open_devices(config: dict, doing: str, *, bind_vsock: bool = False) -> None:
    """Open the config's disks (locked) and, with `bind_vsock`, bind its vsock socket, as Cloud Hypervisor
    does at boot and restore (at boot the tests' own vsock servers play the VMM's socket: not bound here)."""
    payload = config.get("payload") or {}
    for path in (payload.get("kernel"), payload.get("initramfs")):
        if path and not os.path.exists(path):
            raise Error(500, "Error from API", doing, f"Cannot open {path}")
    for disk in config.get("disks", []):
        try:
            f = open(disk["path"], "rb" if disk.get("readonly") else "r+b")  # noqa: SIM115 (held open)
        except OSError as e:
            raise Error(500, "Error from API", doing, f"Cannot open {disk['path']}: {e}") from None
        try:
            fcntl.lockf(f, (fcntl.LOCK_SH if disk.get("readonly") else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise Error(500, "Error from API", doing, f"Cannot lock {disk['path']}: it is in use") from None
        vmm.held.append(f)
    vsock = (config.get("vsock") or {}).get("socket")
    if vsock and bind_vsock:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(vsock)
        except OSError as e:
            s.close()
            raise Error(500, "Error from API", doing, f"vsock socket {vsock}: {e}") from None
        vmm.held.append(s)


def write_console(config: dict, line: str) -> None:
    serial = config.get("serial") or {}
    if serial.get("mode") == "File":
        with open(serial["file"], "w") as f:  # Cloud Hypervisor creates (truncates) the file
            f.write(f"stand-in VMM: no guest runs here; {line}\n")


def handle(method: str, endpoint: str, body: dict | None) -> tuple[int, object | None]:
    if endpoint in FAIL:
        raise Error(FAIL[endpoint], "Error from API", f"injected failure of {endpoint}")
    if endpoint == "vmm.ping":
        return 200, {"version": VERSION, "build_version": VERSION, "pid": os.getpid(), "features": []}
    if endpoint == "vmm.shutdown":
        vmm.exit_after_reply = True
        return 204, None
    if endpoint == "vm.create":
        if vmm.state is not None:
            raise Error(500, "Error from API", "The VM could not be created", "The VM is already created")
        vmm.config, vmm.state = body, "Created"
        return 204, None
    if endpoint == "vm.restore":
        if vmm.state is not None:
            raise Error(404, "Error from API", "The VM could not be restored", "The VM is already created")
        src = Path(body["source_url"].removeprefix("file://"))
        try:
            snap = json.loads((src / "config.json").read_text())
            json.loads((src / "state.json").read_text())
            memory = (src / "memory-ranges").read_text()
        except (OSError, ValueError) as e:
            raise Error(400, "Error from API", "The VM could not be restored", str(e)) from None
        open_devices(snap, "The VM could not be restored", bind_vsock=True)
        vmm.config, vmm.memory = snap, memory
        vmm.state = "Running" if body.get("resume") else "Paused"
        write_console(snap, f"restored {memory}")
        return 204, None
    if endpoint == "vm.delete":
        vmm.config = vmm.state = None
        for held in vmm.held:
            held.close()
        vmm.held.clear()
        return 204, None
    if vmm.state is None:
        raise Error(404, "Error from API", "The VM is not created")
    if endpoint == "vm.info":
        return 200, {"config": vmm.config, "state": vmm.state}
    if endpoint == "vm.boot":
        if vmm.state in ("Running", "Paused"):
            raise Error(500, "Error from API", "Error booting the VM", "The VM is already running")
        open_devices(vmm.config, "Error booting the VM")
        vmm.boots += 1
        vmm.memory = f"boot-{os.getpid()}-{vmm.boots}"
        write_console(vmm.config, f"booted {vmm.memory}")
        vmm.state = "Running"
        return 204, None
    if endpoint == "vm.pause":
        if vmm.state != "Running":
            raise Error(405, "Error from API", "The VM could not be paused", f"it is {vmm.state}")
        vmm.state = "Paused"
        return 204, None
    if endpoint == "vm.resume":
        if vmm.state != "Paused":
            raise Error(405, "Error from API", "The VM could not be resumed", f"it is {vmm.state}")
        vmm.state = "Running"
        return 204, None
    if endpoint == "vm.shutdown":
        if vmm.state not in ("Running", "Paused"):
            raise Error(405, "Error from API", "The VM could not be shut down", f"it is {vmm.state}")
        vmm.state = "Shutdown"
        for held in vmm.held:
            held.close()  # the VM's devices are gone: its disks unlocked, its vsock socket closed
        vmm.held.clear()
        return 204, None
    if endpoint == "vm.snapshot":
        if vmm.state not in ("Running", "Paused"):
            raise Error(405, "Error from API", "The VM could not be snapshotted", f"it is {vmm.state}")
        if vmm.state != "Paused":  # as in Cloud Hypervisor: only a paused VM is snapshotted
            raise Error(500, "Error from API", "The VM could not be snapshotted", "VM is not paused")
        dest = Path(body["destination_url"].removeprefix("file://"))
        if not dest.is_dir():
            raise Error(500, "Error from API", "The VM could not be snapshotted", f"{dest} is no directory")
        (dest / "config.json").write_text(json.dumps(vmm.config))
        (dest / "state.json").write_text(json.dumps({"stand_in": True}))
        (dest / "memory-ranges").write_text(vmm.memory)
        return 204, None
    raise Error(500, "Error from API", f"the stand-in does not implement {endpoint}")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Cloud Hypervisor API"
    sys_version = ""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def address_string(self) -> str:
        return "unix"

    def do_GET(self) -> None:
        self.serve("GET")

    def do_PUT(self) -> None:
        self.serve("PUT")

    def do_POST(self) -> None:
        self.serve("POST")

    def do_DELETE(self) -> None:
        self.serve("DELETE")

    def serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        endpoint = self.path.removeprefix(contract.ROOT + "/")
        body = None
        problems: list[str] = []
        status, answer = 500, None
        try:
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError as e:
                    raise Error(400, "Failed to deserialize JSON", str(e)) from None
            path_item = (
                contract.document()["paths"].get("/" + endpoint)
                if self.path.startswith(contract.ROOT + "/")
                else None
            )
            if path_item is None:
                raise Error(404, "Not Found")
            if method.lower() not in path_item:
                raise Error(400, "Bad Request")
            problems = contract.request_problems(method, self.path, body)
            if problems:
                raise Error(400, "Failed to deserialize JSON", *problems)
            if endpoint in HANG:
                time.sleep(3600)
            status, answer = handle(method, endpoint, body)
        except Error as e:
            status, answer = e.status, e.messages
        data = json.dumps(answer).encode() if answer is not None else b""
        if LOG:  # before the answer: the client may hang up as soon as it has it
            with open(LOG, "a") as f:
                record = {
                    "pid": os.getpid(),
                    "method": method,
                    "path": self.path,
                    "body": body,
                    "status": status,
                    "answer": answer,
                }
                f.write(json.dumps(record) + "\n")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            pass
        if vmm.exit_after_reply:
            os._exit(0)


class Server(socketserver.UnixStreamServer):
    def get_request(self):  # the base class's client_address is '' for unix sockets
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)


def main(argv: list[str]) -> int:
    if os.environ.get("FAKE_CH_EXIT"):
        print("stand-in: told to fail at start", file=sys.stderr)
        return 1
    if os.environ.get("FAKE_CH_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if len(argv) != 2 or argv[0] != "--api-socket":
        print(f"stand-in: usage: --api-socket path=SOCKET (got {argv})", file=sys.stderr)
        return 2
    path = argv[1].removeprefix("path=")
    if os.path.exists(path):
        os.unlink(path)
    with Server(path, Handler) as server:
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
