"""docs/protocol.md says what herovm/protocol.py does: its tables (the config drive's keys, the events
and their fields, the setup steps, bootstrap sources, failure stages and service states, the commands, the
exec frames) and the wire constants it names are read here and held equal to the module, so that neither
can drift from the other."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from herovm import protocol
from herovm.protocol import Command, DriveConfig, Kind

DOC = Path(__file__).resolve().parents[2] / "docs/protocol.md"


def table(header: str) -> list[list[str]]:
    """The rows of the table whose header row begins with `| header |`, as lists of cells."""
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def ticked(text: str) -> list[str]:
    return re.findall(r"`([^`]*)`", text)


def fields(cell: str) -> dict[str, tuple[bool, list[str]]]:
    """An events row's "other fields": each field's name -> (marked optional, its [vocabulary])."""
    out = {}
    for item in re.split(r",\s*(?![^()\[\]]*[)\]])", cell):  # commas outside brackets
        if not ticked(item):  # "none"
            continue
        name = ticked(item)[0]
        vocabulary = re.search(r"\[([^\]]*)\]", item)
        out[name.rstrip("?")] = (name.endswith("?"), ticked(vocabulary.group(1)) if vocabulary else [])
    return out


def test_the_events_table_is_the_schema() -> None:
    rows = table("event")
    assert [ticked(row[0])[0] for row in rows] == list(Kind.ALL)
    for row in rows:
        kind = ticked(row[0])[0]
        documented = fields(row[1])
        schema = protocol.SCHEMA[kind]
        assert list(documented) == [f.name for f in schema], kind
        for f in schema:
            optional, vocabulary = documented[f.name]
            assert optional == (not f.required), f"{kind}.{f.name}: `?` must mark exactly the optional fields"
            assert vocabulary == list(f.values), f"{kind}.{f.name}: the vocabulary differs from protocol.py"


@pytest.mark.parametrize(
    ("kind", "field", "vocabulary"),
    [
        (Kind.SETUP, "step", protocol.Step),
        (Kind.BOOTSTRAP, "source", protocol.Source),
        (Kind.FAILED, "stage", protocol.Stage),
        (Kind.SERVICE, "state", protocol.ServiceState),
    ],
)
def test_each_closed_vocabulary_is_on_its_field(kind: str, field: str, vocabulary: type) -> None:
    (f,) = [f for f in protocol.SCHEMA[kind] if f.name == field]
    assert f.values == vocabulary.ALL and f.values  # type: ignore[attr-defined]


def test_the_commands_table_is_every_command() -> None:
    assert [ticked(row[0])[0] for row in table("op")] == list(Command.ALL)


def test_the_config_drive_table_is_the_document() -> None:
    rows = table("key")
    keys = [key for row in rows for key in ticked(row[0])]
    assert keys == ["v", *(k.name for k in DriveConfig.KEYS)]
    assert f"`{protocol.DRIVE_VERSION}`" in rows[0][1]
    for row in rows:
        (kind,) = {k.kind for k in DriveConfig.KEYS if k.name in ticked(row[0])} or {None}
        if isinstance(kind, type) and issubclass(kind, protocol.Record):
            shown = set(re.findall(r'"(\w+)":', row[1]))  # the keys of the objects the row shows
            assert shown == {k.name for k in kind.KEYS}, row[0]


def limit(cell: str) -> int | None:
    if not cell:
        return None
    number, unit = re.fullmatch(r"(\d+)(?: (KiB|MiB))?(?: \(.*\))?", cell).groups()  # type: ignore[union-attr]
    return int(number) << {None: 0, "KiB": 10, "MiB": 20}[unit]


def test_the_exec_frames_table_is_the_framing() -> None:
    documented = []
    for row in table("kind"):
        for kind in dict.fromkeys(ticked(row[0])):  # `P` / `P`: ping and pong, one kind
            documented.append((kind.encode(), row[1], limit(row[3])))
    assert documented == list(protocol.FRAMES)
    assert {kind for kind, _, _ in protocol.FRAMES} == set(protocol.Frame.ALL)


def test_the_wire_constants_the_page_names_are_the_modules() -> None:
    text = " ".join(DOC.read_text().split())  # lines rewrapped do not matter
    magic = protocol.EXEC_MAGIC.decode().replace("\n", "\\n")  # as the page writes it: HEROVM-EXEC/2\n
    for needle in (
        f"label `{protocol.DRIVE_LABEL}`",
        f"holding `{protocol.DRIVE_FILE}`",
        f"ISO9660 name `{protocol.DRIVE_FILE_ISO9660}`",
        f"port named `{protocol.AGENT_PORT_NAME}`",
        f"`{protocol.CONSOLE_PREFIX}{{json}}`",
        f"AF_VSOCK port {protocol.AGENT_VSOCK_PORT}",
        f"`CONNECT {protocol.AGENT_VSOCK_PORT}`",
        f"vsock port {protocol.SSH_PORT}",
        f"`{magic}`",
        f'HMAC("{protocol.AGENT_PROOF_LABEL.decode()[:-1]}\\n"',
        f'HMAC("{protocol.HOST_ANSWER_LABEL.decode()[:-1]}\\n"',
        f"1 byte kind, {protocol.FRAME_HEADER_SIZE - 1} bytes big-endian length",
        f"default `{protocol.EXEC_HOME}`",
        ", ".join(f"`{name}`" for name in protocol.EXEC_ENV),
        f"`{protocol.BOOTSTRAP_NAME}`",
        f"exactly one of {', '.join(f'`{c}`' for c in protocol.REQUEST_COMMANDS)}",
    ):
        assert needle in text, needle
