"""herovm/protocol.py, the contract both sides import: each wire constant is written there and nowhere else,
the agent sends its closed vocabularies by name and every word of them, and the exec framing and the
handshake helpers do what the standard library would."""

from __future__ import annotations

import ast
import hashlib
import hmac
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from herovm import protocol
from herovm.protocol import Kind, Source, Stage, Step

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "herovm/_data/agent/herovm_agent"

# Every file that makes up herovm or its guest, but the tests and the documentation.
SOURCES = [
    p
    for folder in ("herovm", "benchmarks", "scripts")
    for p in sorted((ROOT / folder).rglob("*"))
    if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".md", ".pyc")
]


@pytest.mark.parametrize(
    "literal",
    [
        protocol.AGENT_PORT_NAME,  # the domain template too
        f'"{protocol.CONSOLE_PREFIX}"',
        "HEROVM-EXEC/",
        "herovm-exec/",
        f'"{protocol.DRIVE_LABEL}"',
        protocol.DRIVE_FILE_ISO9660,
        '"event": "failed"',  # the initramfs's line: made from the contract (images.initramfs_protocol)
    ],
)
def test_each_wire_constant_is_written_once(literal: str) -> None:
    holders = [str(p.relative_to(ROOT)) for p in SOURCES if literal in p.read_text(errors="replace")]
    allowed = [] if literal.startswith('"event"') else ["herovm/protocol.py"]
    assert holders == allowed, f"{literal} is written outside herovm/protocol.py"


def sent(path: Path, method: str) -> list[ast.expr]:
    """The first argument of every call of `.method(...)` in `path`."""
    tree = ast.parse(path.read_text())
    return [
        node.args[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == method
        and node.args
    ]


def named(args: list[ast.expr], vocabulary: type) -> set[str]:
    """The vocabulary's words that `args` name as `Vocabulary.NAME`; a bare string fails the test."""
    words = set()
    for arg in args:
        assert not isinstance(arg, ast.Constant), (
            f"a bare {arg.value!r} where {vocabulary.__name__}.X belongs"
        )
        if (
            isinstance(arg, ast.Attribute)
            and isinstance(arg.value, ast.Name)
            and arg.value.id == vocabulary.__name__
        ):
            words.add(getattr(vocabulary, arg.attr))
    return words


def test_the_agent_sends_every_setup_step_failure_stage_and_event_by_name() -> None:
    main = AGENT / "main.py"
    assert named(sent(main, "step"), Step) == set(Step.ALL)
    # INITRAMFS: the initramfs's own (images.initramfs_protocol)
    assert named(sent(main, "fail"), Stage) == set(Stage.ALL) - {Stage.INITRAMFS}
    # SERVICE: the supervisor's, through Agent.notify
    assert named(sent(main, "emit"), Kind) == set(Kind.ALL) - {Kind.SERVICE}
    assert Kind.SERVICE in named(
        [n for n in ast.walk(ast.parse(main.read_text())) if isinstance(n, ast.Attribute)], Kind
    )


def test_the_agent_names_every_bootstrap_source() -> None:
    used = {
        getattr(Source, n.attr)
        for n in ast.walk(ast.parse((AGENT / "main.py").read_text()))
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "Source"
    }
    assert used == set(Source.ALL)


def test_vocabularies_list_their_words_once_in_order() -> None:
    assert Stage.ALL[0] == Stage.INITRAMFS and Stage.ALL[-1] == Stage.AGENT
    assert protocol.Frame.PING == protocol.Frame.PONG and protocol.Frame.ALL.count(protocol.Frame.PING) == 1
    assert {Kind.READY, Kind.FAILED} == protocol.TERMINAL and not protocol.TERMINAL & protocol.AFTER_END


HEADER = struct.Struct(">cI")


@given(st.sampled_from(protocol.Frame.ALL), st.binary(max_size=300))
def test_a_frame_is_its_kind_its_length_and_its_payload(kind: bytes, payload: bytes) -> None:
    data = protocol.frame(kind, payload)
    assert data == HEADER.pack(kind, len(payload)) + payload
    assert protocol.frame_header(data[: protocol.FRAME_HEADER_SIZE]) == (kind, len(payload))
    assert protocol.frame_header(bytearray(HEADER.pack(kind, 400 << 20))) == (kind, 400 << 20)


def test_after_the_handshake_the_agent_reads_what_the_host_sends_but_the_handshake() -> None:
    f = protocol.Frame
    limits = {f.REQUEST: protocol.MAX_REQUEST, f.STDIN: protocol.MAX_CHUNK, f.KILL: 0, f.PING: 0}
    assert limits == protocol.AUTHENTICATED_LIMITS


def test_the_two_proofs_are_hmacs_with_their_own_labels() -> None:
    token, nonce, challenge = b"ab" * 32, "01" * 32, "fe" * 32
    message = nonce.encode() + b" " + challenge.encode()
    want = hmac.new(token, protocol.AGENT_PROOF_LABEL + message, hashlib.sha256).hexdigest()
    assert protocol.agent_proof(token, nonce, challenge) == want
    answer = hmac.new(token, protocol.HOST_ANSWER_LABEL + message, hashlib.sha256).hexdigest()
    assert protocol.host_answer(token, nonce, challenge) == answer != want
    assert protocol.same_digest(want, want) and not protocol.same_digest(want, answer)
    assert protocol.is_hex64(want) and not protocol.is_hex64(want.upper()) and not protocol.is_hex64(want[1:])
    assert not protocol.is_hex64(None)
