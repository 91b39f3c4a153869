"""A real HTTP server on 127.0.0.1 for the tests of herovm's URL fetch: it answers at once, or trickles its
answer (headers or body) a few bytes at a time, as a slow or hostile server would."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator


@contextlib.contextmanager
def http_server(body: bytes, *, trickle: str = "", every: float = 0.2) -> Iterator[str]:
    """Serve `body` at every path; yields the base URL. trickle: "" (all at once), "body" (headers at once,
    then one byte of the body each `every` seconds) or "headers" (one byte of the headers each `every`)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            try:
                if trickle == "headers":
                    for i in range(len(head)):
                        if stop.wait(every):
                            return
                        conn.sendall(head[i : i + 1])
                    conn.sendall(body)
                elif trickle == "body":
                    conn.sendall(head)
                    for i in range(len(body)):
                        if stop.wait(every):
                            return
                        conn.sendall(body[i : i + 1])
                else:
                    conn.sendall(head + body)
            except OSError:
                return  # the client gave up (herovm shut the connection down at its deadline)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        srv.close()


def elapsed(fn, *args, **kwargs) -> tuple[float, BaseException | None]:
    """(seconds `fn` took, the exception it raised or None)."""
    t0 = time.monotonic()
    try:
        fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - handed to the test
        return time.monotonic() - t0, e
    return time.monotonic() - t0, None
