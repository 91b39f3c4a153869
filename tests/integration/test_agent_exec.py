"""Exec served by the guest agent on the SSH port, on a real guest (docs/protocol.md, "Exec without SSH").

The exec semantics shared with SSH (exit codes, env, cwd, stdin, timeouts, 100 MB) are in test_lifecycle;
these tests are about what is particular to the agent path: it is the one used, SSH still answers on
the same port, only the VM's token opens it (and only the VM's agent gets a request), whoever reaches the
port cannot exhaust the guest without the token, and a command never outlives the host that asked for it.
The protocol's finer points, with no VM, are in tests/unit/test_exec_protocol.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import os
import socket
import struct
import subprocess
import textwrap
import threading
import time

import pytest
from guests import cli

from herovm import state
from herovm.errors import GuestError
from herovm.guest.agent_exec import AgentExec
from herovm.protocol import AGENT_PROOF_LABEL, EXEC_MAGIC, HOST_ANSWER_LABEL

HEADER = struct.Struct(">cI")


@pytest.fixture(scope="module")
def box(module_vm_factory, run_id):
    vm = module_vm_factory(f"it-{run_id}-agentexec")
    yield vm
    vm.close()


def _connect(vm, made: list[socket.socket] | None = None):
    def connect(timeout: float) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", vm.ssh_port), timeout=timeout)
        sock.settimeout(None)
        if made is not None:
            made.append(sock)
        return sock

    return connect


def _gone(vm, pid: str, settle_s: float = 5.0) -> bool:
    deadline = time.monotonic() + settle_s
    while vm.exec(["kill", "-0", pid]).exit_code == 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_exec_goes_through_the_agent_and_ssh_still_answers_on_the_same_port(box):
    # sshd puts SSH_CLIENT in a session's environment; the agent does not.
    assert box.exec(["sh", "-c", 'echo "${SSH_CLIENT:-agent}"']).stdout == b"agent\n"
    assert box._conn is None  # no SSH connection was needed
    conn = box.connection()
    try:
        assert conn.exec(["sh", "-c", 'echo "${SSH_CLIENT:+ssh}"']).stdout == b"ssh\n"
    finally:
        conn.close()  # its sshd session would count against the flood test's 32


def test_shell_lines_missing_commands_and_directories(box):
    assert box.exec("for i in 1 2; do echo $i; done | wc -l").stdout == b"2\n"
    missing = box.exec(["no-such-command-here"])
    assert missing.exit_code == 127 and b"command not found" in missing.stderr
    nodir = box.exec(["pwd"], cwd="/no/such/dir")
    assert nodir.exit_code == 1 and b"/no/such/dir" in nodir.stderr
    box.exec(["mkdir", "-p", "/root/sub"])
    assert box.exec(["pwd"], cwd="sub").stdout == b"/root/sub\n"  # relative to home, as over SSH
    assert box.exec(["pwd"]).stdout == b"/root\n"
    assert box.exec("kill -TERM $$").exit_code == 128 + 15


def _frame(kind: bytes, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def _jframe(kind: bytes, obj: object) -> bytes:
    return _frame(kind, json.dumps(obj).encode())


def _mac(token: str, label: bytes, nonce: str, challenge: str) -> str:
    return hmac.new(
        token.encode(), label + nonce.encode() + b" " + challenge.encode(), hashlib.sha256
    ).hexdigest()


def _raw(vm, token: str | None = None) -> socket.socket:
    """A connection to the agent past the magic; with ``token``, through the handshake (HELLO, the agent's
    CHALLENGE and its proof checked, AUTH) as the host does it."""
    sock = socket.create_connection(("127.0.0.1", vm.ssh_port), timeout=10)
    nonce = os.urandom(32).hex()
    sock.sendall(EXEC_MAGIC + _jframe(b"H", {"nonce": nonce}))
    if token is not None:
        kind, payload = _read_frame(sock)
        greeting = json.loads(payload)
        assert kind == b"C"
        assert greeting["proof"] == _mac(token, AGENT_PROOF_LABEL, nonce, greeting["challenge"])
        answer = _mac(token, HOST_ANSWER_LABEL, nonce, greeting["challenge"])
        sock.sendall(_jframe(b"A", {"answer": answer}))
    return sock


def _read_frame(sock: socket.socket) -> tuple[bytes, bytes]:
    kind, length = HEADER.unpack(sock.recv(HEADER.size, socket.MSG_WAITALL))
    return kind, sock.recv(length, socket.MSG_WAITALL)


def _frames_until_closed(sock: socket.socket) -> list[tuple[bytes, bytes]]:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    frames = []
    while data:
        kind, length = HEADER.unpack_from(data)
        frames.append((kind, data[HEADER.size : HEADER.size + length]))
        data = data[HEADER.size + length :]
    return frames


def _token(vm) -> str:
    return state.VMDir(vm.name).exec_token.read_text().strip()


def _console_has_no_traceback(vm) -> None:
    console = state.VMDir(vm.name).console_log.read_text(errors="replace")
    assert "Traceback" not in console and "Out of memory" not in console


def test_a_host_with_the_wrong_token_stops_before_sending_anything(box):
    wrong = AgentExec(target=box.name, token="0" * 64, connect=_connect(box))
    with (
        wrong,
        pytest.raises(GuestError, match=f"did not prove it is VM {box.name}'s agent: its proof is wrong"),
    ):
        wrong.exec(["true"])


def test_without_the_handshake_or_with_a_wrong_answer_nothing_runs(box):
    marker = f"/tmp/unauth-{time.monotonic_ns()}"
    request = _jframe(b"R", {"argv": ["touch", marker]})
    with socket.create_connection(("127.0.0.1", box.ssh_port), timeout=10) as sock:
        sock.sendall(EXEC_MAGIC + request)  # a request straight away, as the old protocol allowed
        # Refused from its header: the agent hangs up with the payload unread, so the E frame may be lost
        # to the reset that follows.
        assert _frames_until_closed(sock) in ([], [(b"E", b'{"error":"unexpected frame kind b\'R\'"}')])
    with _raw(box) as sock:
        kind, payload = _read_frame(sock)
        assert kind == b"C"
        sock.sendall(_jframe(b"A", {"answer": "0" * 64}))
        assert _frames_until_closed(sock) == [(b"E", b'{"error":"exec refused: wrong token"}')]
        with contextlib.suppress(OSError):
            sock.sendall(request)  # too late: the agent has hung up
    assert box.exec(["test", "-e", marker]).exit_code == 1


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        (b"[]", "bad request: not a JSON object"),
        (b'{"argv": [1, 2]}', "bad request: argv must be a list of strings, the first not empty"),
        (b'{"argv": ["true"], "env": ["A=1"]}', "bad request: env must be an object of strings"),
        (b'{"shell": "true", "cwd": {}}', "bad request: cwd must be a string"),
    ],
)
def test_a_malformed_request_gets_an_error_frame_and_no_traceback(box, request_, error):
    with _raw(box, _token(box)) as sock:
        sock.sendall(_frame(b"R", request_))
        assert _frames_until_closed(sock) == [
            (b"E", json.dumps({"error": error}, separators=(",", ":")).encode())
        ]
    assert box.exec(["true"]).exit_code == 0
    _console_has_no_traceback(box)


def _stream_until_refused(sock: socket.socket, limit: int) -> int:
    sent = 0
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        while sent < limit:
            sock.sendall(b"\0" * (1 << 20))
            sent += 1 << 20
    return sent


@pytest.mark.parametrize("after_hello", [False, True], ids=["at-once", "after-hello"])
def test_a_400_mib_stdin_frame_before_authentication_leaves_the_guest_alive(box, after_hello):
    """The attack that OOM-killed the guest in 7 s: the agent hangs up on the frame's header."""
    threads = int(box.exec(["awk", "/^Threads/{print $2}", "/proc/1/status"]).stdout)
    with socket.create_connection(("127.0.0.1", box.ssh_port), timeout=30) as sock:
        hello = _jframe(b"H", {"nonce": "0" * 64}) if after_hello else b""
        sock.sendall(EXEC_MAGIC + hello + HEADER.pack(b"0", 400 << 20))
        sent = _stream_until_refused(sock, 400 << 20)
    assert sent < 64 << 20, f"the agent took {sent >> 20} MiB of a frame before authentication"
    assert box.manager.backend.get(box.name).state == "running"
    assert box.exec(["echo", "alive"]).stdout == b"alive\n"
    assert int(box.exec(["awk", "/^Threads/{print $2}", "/proc/1/status"]).stdout) <= threads + 2
    _console_has_no_traceback(box)


def test_idle_unauthenticated_connections_are_few_and_short_lived(box):
    """A flood of connections that say the magic and nothing more: the agent keeps at most 32 of them, for
    5 s at most, and the host's exec gets through meanwhile (it retries a refused connection)."""
    threads = int(box.exec(["awk", "/^Threads/{print $2}", "/proc/1/status"]).stdout)
    started = time.monotonic()
    flood = []
    for _ in range(100):
        sock = socket.create_connection(("127.0.0.1", box.ssh_port), timeout=30)
        sock.sendall(EXEC_MAGIC)
        flood.append(sock)
    assert box.exec(["echo", "through"]).stdout == b"through\n"
    for sock in flood:
        sock.settimeout(30)
        assert _frames_until_closed(sock) == []  # hung up on, without a word
        sock.close()
    assert time.monotonic() - started < 20
    assert int(box.exec(["awk", "/^Threads/{print $2}", "/proc/1/status"]).stdout) <= threads + 2


COUNT_SSHD = (
    "import os\n"
    "def stat(p):\n"
    "    try:\n"
    "        return open(f'/proc/{p}/stat').read().rsplit(') ', 1)[1].split()\n"
    "    except OSError:\n"
    "        return []\n"
    "print(sum(1 for p in os.listdir('/proc') if p.isdigit() and stat(p)[1:2] == ['1']\n"
    "          and open(f'/proc/{p}/comm').read().strip() == 'sshd'))\n"
)


def test_a_flood_of_ssh_connections_gets_at_most_32_sshd_and_ssh_works_after(box):
    """Every non-exec connection costs an `sshd -i` until its login grace: 150 silent SSH clients took 280 MB
    of a guest. The agent runs at most 32 at once and refuses the rest at once; afterwards SSH works."""
    flood = []
    try:
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", box.ssh_port), timeout=30)
            sock.sendall(b"SSH-2.0-flood\r\n")
            flood.append(sock)
        deadline = time.monotonic() + 30
        while int(box.exec(["python3", "-c", COUNT_SSHD]).stdout) < 32:
            assert time.monotonic() < deadline, "the flood never reached 32 sessions"
            time.sleep(0.2)
        time.sleep(1)  # the other 8 have been dispatched by now: refused, not started
        assert int(box.exec(["python3", "-c", COUNT_SSHD]).stdout) == 32
        refused = 0
        for sock in flood:
            sock.settimeout(0.5)
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                data = sock.recv(4096)
                refused += not data or not data.startswith(b"SSH-")
        assert refused == 8, refused
        assert box.exec(["echo", "exec is separate"]).stdout == b"exec is separate\n"
    finally:
        for sock in flood:
            sock.close()
    deadline = time.monotonic() + 20
    while int(box.exec(["python3", "-c", COUNT_SSHD]).stdout) > 0:
        assert time.monotonic() < deadline, "the flood's sshd did not end with their connections"
        time.sleep(0.2)
    conn = box.connection()
    try:
        assert conn.exec(["echo", "ssh"]).stdout == b"ssh\n"
    finally:
        conn.close()


def _ssh_session_pid(box) -> int:
    """The pid of the `sshd -i` the agent started for a new SSH connection (the session's ancestor whose
    parent is PID 1), once that connection is closed and the agent has reaped it."""
    conn = box.connection()
    walk = 'p=$$; while pp=$(awk "/^PPid:/{print \\$2}" /proc/$p/status) && [ "$pp" != 1 ]; do p=$pp; done; '
    walk += "echo $p"
    pid = int(conn.exec(["sh", "-c", walk]).stdout)
    conn.close()
    deadline = time.monotonic() + 10
    while box.exec(["test", "-e", f"/proc/{pid}"]).exit_code == 0:
        assert time.monotonic() < deadline, "the SSH session never ended"
        time.sleep(0.1)
    return pid


def test_exit_codes_stay_right_when_an_ssh_sessions_pid_is_reused(box):
    """An `sshd -i` nobody waits for ends; the next command gets its pid (forced through ns_last_pid): its
    exit status is its own. The agent used to answer with the session's."""
    hits = 0
    for _ in range(5):
        pid = _ssh_session_pid(box)
        # After a pause: the agent starts this command's reader threads (tids are pids too) meanwhile.
        box.exec(["sh", "-c", f"sleep 0.3; echo {pid - 1} > /proc/sys/kernel/ns_last_pid"])
        r = box.exec(["sh", "-c", "echo $$; exit 7"])
        assert r.exit_code == 7
        hits += int(r.stdout) == pid
    assert hits >= 3, f"the pid was reused in only {hits} of 5 tries"


IMPOSTOR = textwrap.dedent(
    """
    import json, os, socket, struct, sys
    server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    print("listening", flush=True)
    conn, _ = server.accept()
    conn.settimeout(30)
    got = conn.recv(len(sys.argv[2]) + 5, socket.MSG_WAITALL)
    got += conn.recv(struct.unpack(">I", got[-4:])[0], socket.MSG_WAITALL)
    greeting = json.dumps({"challenge": os.urandom(32).hex(), "proof": os.urandom(32).hex()}).encode()
    conn.sendall(b"C" + struct.pack(">I", len(greeting)) + greeting)
    try:
        while data := conn.recv(65536):
            got += data
    except OSError:
        pass
    print(got.hex(), flush=True)
    """
)


def test_an_impostor_on_a_stopped_vms_port_gets_nothing_and_exec_says_so(vm_factory, unique_name):
    """An unprivileged user binds the port of a stopped VM and plays its agent: `herovm exec` sends it no
    command, environment or stdin, and fails (255) with one line that says what happened."""
    name = unique_name("impostor")
    vm = vm_factory(name)
    assert vm.exec(["true"]).exit_code == 0
    vm.close()
    vm_factory.manager.stop(name)
    impostor = subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-c", IMPOSTOR,
         str(vm.ssh_port), EXEC_MAGIC.decode()],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert impostor.stdout.readline() == "listening\n"
        out = cli("exec", name, "--env", "API_KEY=s3cret-env", "-i", "--", "cat", "/etc/shadow",
                  input="s3cret-stdin", timeout=60)  # fmt: skip
        got = bytes.fromhex(impostor.communicate(timeout=30)[0].strip())
    finally:
        impostor.kill()
        impostor.wait()
    assert out.returncode == 255
    assert out.stderr.splitlines()[0] == (
        f"herovm: error: the process on 127.0.0.1:{vm.ssh_port} did not prove it is VM {name}'s agent: "
        "its proof is wrong"
    )
    assert got.startswith(EXEC_MAGIC)
    kind, length = HEADER.unpack_from(got, len(EXEC_MAGIC))
    assert kind == b"H" and len(got) == len(EXEC_MAGIC) + HEADER.size + length  # a nonce, nothing more
    for secret in (b"s3cret", b"shadow", b"API_KEY"):
        assert secret not in got


def test_token_file_is_private(box):
    token = state.VMDir(box.name).exec_token
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text().strip()) == 64


def test_concurrent_execs_use_separate_connections(box):
    results: dict[int, bytes] = {}

    def work(i: int) -> None:
        for j in range(5):
            results[i * 10 + j] = box.exec(["echo", str(i * 10 + j)]).stdout

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {k: f"{k}\n".encode() for k in range(40) if k % 10 < 5}


def test_timeout_kills_a_command_that_does_not_read_its_stdin(box):
    # 50 MB of stdin the command never reads clogs the connection; the kill must get through anyway.
    r = box.exec("echo $$ > /tmp/clogged.pid; exec sleep 300", stdin=io.BytesIO(b"x" * (50 << 20)), timeout=3)
    assert r.timed_out and r.exit_code == 124
    assert _gone(box, box.exec(["cat", "/tmp/clogged.pid"]).stdout.decode().strip())


def test_a_raising_callback_kills_the_command(box):
    def stop(_: bytes) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        box.exec("echo $$; exec sleep 300", on_stdout=stop)
    pid = box.exec(["sh", "-c", "pgrep -x sleep || true"]).stdout.decode().split()
    assert all(_gone(box, p) for p in pid)


def test_the_command_dies_with_the_connection_that_asked_for_it(box):
    pids: list[bytes] = []
    made: list[socket.socket] = []
    token = state.VMDir(box.name).exec_token.read_text()
    client = AgentExec(target=box.name, token=token, connect=_connect(box, made))

    def run() -> None:
        with pytest.raises(GuestError):
            client.exec("echo $$; exec sleep 300", on_stdout=pids.append)

    runner = threading.Thread(target=run)
    runner.start()
    deadline = time.monotonic() + 30
    while not pids and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids, "the command never started"
    for sock in made:  # cut the connection under the running exec, as a host that dies would
        sock.shutdown(socket.SHUT_RDWR)
    runner.join(30)
    assert not runner.is_alive()
    assert _gone(box, pids[0].decode().strip())
