"""The guest agent's boot path: what it imports before `ready`, and the pieces that stand in for the
standard modules it avoids there (JSON, HMAC, the plain-command check), held to those modules' results."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from herovm import images, protocol

AGENT = Path(__file__).resolve().parents[2] / "herovm/_data/agent"
sys.path.insert(0, str(AGENT))
from herovm_agent import exec_server, jsonio  # noqa: E402

# Each costs tens of milliseconds at boot under emulation, mostly in what it imports in turn.
KEPT_OFF_THE_BOOT_PATH = {
    "json", "re", "enum", "threading", "socket", "selectors", "ctypes", "contextlib", "collections",
    "functools", "queue", "subprocess", "signal", "hashlib", "hmac", "typing", "dataclasses",
    "herovm.heroscript",
}  # fmt: skip


def test_the_boot_path_imports_only_c_modules_and_the_agent(tmp_path: Path) -> None:
    """Import what PID 1 imports before `ready` (an empty bootstrap), in a fresh interpreter started the way
    the initramfs starts it, from the agent's packages laid out as the image has them, and list what got
    loaded. Of herovm only the contract may come: herovm.protocol, which imports nothing itself."""
    images.install_guest_python(tmp_path)
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); before = set(sys.modules)\n"
        "import herovm_agent.main\n"
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    loaded = set(subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True,
                                check=True).stdout.split())  # fmt: skip
    assert "herovm_agent.main" in loaded and "herovm_agent.jsonio" in loaded
    assert not loaded & KEPT_OFF_THE_BOOT_PATH, f"imported at boot: {sorted(loaded & KEPT_OFF_THE_BOOT_PATH)}"
    assert {m for m in loaded if m.split(".")[0] == "herovm"} == {"herovm", "herovm.protocol"}


def test_the_contract_imports_nothing_at_all() -> None:
    """herovm.protocol, in a fresh interpreter: nothing but itself and __future__ (its annotations)."""
    where = str(Path(protocol.__file__).parent)
    code = (
        f"import sys; sys.path.insert(0, {where!r}); before = set(sys.modules)\n"
        "import protocol\n"
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    loaded = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()  # fmt: skip
    assert set(loaded) <= {"protocol", "__future__"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_jsonio_writes_what_json_writes(value) -> None:
    assert jsonio.dumps(value) == json.dumps(value, separators=(",", ":"), default=str)
    assert jsonio.dumps(value, compact=False) == json.dumps(value, default=str)


def test_jsonio_writes_other_types_as_their_str() -> None:
    assert jsonio.dumps({"p": Path("/x"), "b": b"y", "t": (1, 2)}) == '{"p":"/x","b":"b\'y\'","t":[1,2]}'


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from(["", " ", "\n\t ", "\r\n"]), st.booleans())
def test_jsonio_reads_what_json_reads(value, space: str, as_bytes: bool) -> None:
    text = space + json.dumps(value, indent=1 if space else None) + space
    assert _same(jsonio.loads(text.encode() if as_bytes else text), json.loads(text))


@pytest.mark.parametrize(
    "text", ["", " ", "{", "{} x", "[1,]", "nul", "[1] [2]", "{'a': 1}", '"\\x"', "\ufeff{}", b"\xff"]
)
def test_jsonio_refuses_what_json_refuses(text) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        jsonio.loads(text)


@pytest.mark.parametrize("key_len", [0, 1, 32, 63, 64, 65, 200])
def test_agent_hmac_is_hmac_sha256(key_len: int) -> None:
    key, message = bytes(range(key_len % 256)) * (key_len // 256 + 1), b"challenge " * key_len
    key = key[:key_len]
    assert protocol.hmac_sha256(key, message) == hmac.new(key, message, hashlib.sha256).hexdigest()


# The plain-command rule as a regular expression: the agent checks it with a character set instead.
SIMPLE_LINE = re.compile(r"[A-Za-z0-9_./:,+@%-][A-Za-z0-9_./:=,+@%-]*( +[A-Za-z0-9_./:=,+@%-]+)*")


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet="aZ09_./:=,+@%- \t\n$'\"*;|&~cd", max_size=12))
def test_a_line_runs_without_bash_exactly_when_it_is_plain_words(line: str) -> None:
    words = line.split()
    plain = bool(SIMPLE_LINE.fullmatch(line.strip())) and "=" not in words[0]
    expected = words if plain and words[0] not in exec_server.SHELL_ONLY else ["/bin/bash", "-c", line]
    assert exec_server._simple_command(line) == expected
