"""Exec served by the guest agent on the SSH port, on a real guest (PROTOCOL.md, "Exec without SSH").

The exec semantics shared with SSH (exit codes, env, cwd, stdin, timeouts, 100 MB) are in test_lifecycle;
these tests are about what is particular to the agent path: it is the one used, SSH still answers on
the same port, only the VM's token opens it, and a command never outlives the host that asked for it.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time

import pytest

from herovm import state
from herovm.errors import GuestError
from herovm.guest.agent_exec import MAGIC, AgentExec


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
    over_ssh = box.connection().exec(["sh", "-c", 'echo "${SSH_CLIENT:+ssh}"'])
    assert over_ssh.stdout == b"ssh\n"


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


def test_a_wrong_token_is_refused(box):
    wrong = AgentExec(target=box.name, token="0" * 64, connect=_connect(box))
    with wrong, pytest.raises(GuestError, match="refused"):
        wrong.exec(["true"])


def test_a_request_without_the_challenge_answer_is_refused_and_runs_nothing(box):
    marker = f"/tmp/unauth-{time.monotonic_ns()}"
    with socket.create_connection(("127.0.0.1", box.ssh_port), timeout=10) as sock:
        sock.sendall(MAGIC)
        request = json.dumps({"argv": ["touch", marker]}).encode()
        sock.sendall(b"R" + len(request).to_bytes(4, "big") + request)
        sock.settimeout(10)
        replies = b""
        while chunk := sock.recv(4096):
            replies += chunk
    assert b"refused" in replies  # then the agent hung up
    assert box.exec(["test", "-e", marker]).exit_code == 1


def test_a_request_that_is_not_an_object_ends_the_connection_quietly(box):
    with socket.create_connection(("127.0.0.1", box.ssh_port), timeout=10) as sock:
        sock.sendall(MAGIC + b"R" + (2).to_bytes(4, "big") + b"[]")
        sock.settimeout(10)
        while sock.recv(4096):
            pass  # the challenge, then the agent hangs up
    assert box.exec(["true"]).exit_code == 0
    console = state.VMDir(box.name).console_log.read_text(errors="replace")
    assert "Traceback" not in console


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
