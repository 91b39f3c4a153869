"""A hostile SFTP v3 server on stdin/stdout, for sshd's ``Subsystem sftp`` (standard library only).

It serves a made-up tree read from a JSON file (argv[1]) at every request, so a test rewrites the file
and the next request sees the new tree. A node is ``{"kind": "file"|"dir"|"link", "mode": int,
"data": str, "target": str, "entries": {name: node} or [[name, node], ...]}`` (a list may say a name
twice); a name or a target written ``"hex:..."`` is sent as those raw bytes, and an entry that is the
string ``"@loop"`` is its own parent directory again (a tree without end).

Names may be anything (``../../x``, ``/tmp/x``, ``a/b``, NUL), and the server plays along with a client
that trusts them: a path that joins a directory and such a name (``/d/../../x``, or ``/tmp/x`` itself)
finds that entry, so a client that writes where a name points gets the data to write.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import sys

INIT, VERSION, OPEN, CLOSE, READ = 1, 2, 3, 4, 5
LSTAT, FSTAT, OPENDIR, READDIR, REALPATH, STAT, READLINK = 7, 8, 11, 12, 16, 17, 19
STATUS, HANDLE, DATA, NAME, ATTRS = 101, 102, 103, 104, 105
OK, EOF, NO_SUCH_FILE, FAILURE, UNSUPPORTED = 0, 1, 2, 4, 8
KINDS = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "link": stat.S_IFLNK}


def raw(text: str) -> bytes:
    return bytes.fromhex(text[4:]) if text.startswith("hex:") else text.encode("utf-8")


def pairs(node: dict) -> list:
    """The entries of a directory node as (name as the client decodes it, child)."""
    entries = node.get("entries") or {}
    items = entries.items() if isinstance(entries, dict) else entries
    return [(raw(name).decode("utf-8", "surrogateescape"), child) for name, child in items]


def find_named(node: dict, name: str) -> dict | None:
    """The entry anywhere in the tree whose name is ``name`` itself (e.g. ``/tmp/x``)."""
    for entry, child in pairs(node):
        if child == "@loop":
            continue
        if entry == name:
            return child
        found = find_named(child, name)
        if found is not None:
            return found
    return None


def string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def attrs(node: dict) -> bytes:
    mode = KINDS[node["kind"]] | node.get("mode", 0o644)
    size = len(raw(node.get("data", "")))
    return struct.pack(">IQIII", 0x1 | 0x2 | 0x4, size, 0, 0, mode)


class Server:
    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self.handles: dict[bytes, object] = {}
        self.counter = 0

    def lookup(self, path: bytes) -> dict | None:
        with open(self.scenario, encoding="utf-8") as fh:
            node: dict = {"kind": "dir", "mode": 0o755, "entries": json.load(fh)}
        text = path.decode("utf-8", "surrogateescape")
        named = find_named(node, text)
        if named is not None:
            return named
        parts = [part for part in text.split("/") if part not in ("", ".")]
        while parts:
            entries = dict(pairs(node))
            for count in range(len(parts), 0, -1):  # the longest name first: "../../x" is one entry
                child = entries.get("/".join(parts[:count]))
                if child is not None:
                    break
            else:
                return None
            node = node if child == "@loop" else child
            parts = parts[count:]
        return node

    def handle(self, value: object) -> bytes:
        self.counter += 1
        key = str(self.counter).encode()
        self.handles[key] = value
        return key

    def serve(self, kind: int, rid: int, body: bytes) -> bytes:
        def status(code: int, message: str = "") -> bytes:
            return struct.pack(">BII", STATUS, rid, code) + string(message.encode()) + string(b"")

        def one_name(name: bytes) -> bytes:
            return struct.pack(">BII", NAME, rid, 1) + string(name) + string(name) + struct.pack(">I", 0)

        def take_string(offset: int = 0) -> tuple[bytes, int]:
            (length,) = struct.unpack_from(">I", body, offset)
            return body[offset + 4 : offset + 4 + length], offset + 4 + length

        if kind in (STAT, LSTAT, OPENDIR, OPEN, READLINK, REALPATH):
            path, _ = take_string()
            if kind == REALPATH:
                return one_name(path)
            node = self.lookup(path)
            if node is None:
                return status(NO_SUCH_FILE, "no such file")
            if kind in (STAT, LSTAT):
                return struct.pack(">BI", ATTRS, rid) + attrs(node)
            if kind == READLINK:
                return one_name(raw(node.get("target", "")))
            if kind == OPENDIR:
                entries = [
                    (name.encode("utf-8", "surrogateescape"), node if child == "@loop" else child)
                    for name, child in pairs(node)
                ]
                return struct.pack(">BI", HANDLE, rid) + string(self.handle(entries))
            return struct.pack(">BI", HANDLE, rid) + string(self.handle(raw(node.get("data", ""))))
        handle, offset = take_string()
        value = self.handles.get(handle)
        if kind == CLOSE:
            self.handles.pop(handle, None)
            return status(OK)
        if kind == FSTAT and isinstance(value, bytes):
            return struct.pack(">BIIQ", ATTRS, rid, 0x1, len(value))
        if kind == READ and isinstance(value, bytes):
            start, length = struct.unpack_from(">QI", body, offset)
            chunk = value[start : start + length]
            return struct.pack(">BI", DATA, rid) + string(chunk) if chunk else status(EOF)
        if kind == READDIR and isinstance(value, list):
            if not value:
                return status(EOF)
            reply = struct.pack(">BII", NAME, rid, len(value))
            for name, node in value:
                reply += string(name) + string(name) + attrs(node)
            value.clear()
            return reply
        return status(UNSUPPORTED if value is None else FAILURE, "unsupported")


def read_exactly(fd: int, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = os.read(fd, count - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def main() -> None:
    server = Server(sys.argv[1])
    while True:
        try:
            (length,) = struct.unpack(">I", read_exactly(0, 4))
            packet = read_exactly(0, length)
        except EOFError:
            return
        kind = packet[0]
        if kind == INIT:
            reply = struct.pack(">BI", VERSION, 3)
        else:
            (rid,) = struct.unpack_from(">I", packet, 1)
            reply = server.serve(kind, rid, packet[5:])
        out = memoryview(struct.pack(">I", len(reply)) + reply)
        while out:
            out = out[os.write(1, out) :]


if __name__ == "__main__":
    main()
