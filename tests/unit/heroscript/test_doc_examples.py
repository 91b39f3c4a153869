"""Every example in docs/heroscript.md is real: the doc cannot drift from what herovm reads.

The doc's fenced blocks:

- ```hero: parses (with its `var=NAME=VALUE` variables) and passes the checks herovm makes before it runs it,
  as a bootstrap (the guest's actions) or as a playbook (the host's): no error, no warning.
- ```hero file=NAME: the same, and it is also the file NAME next to the other examples (for includes and
  bootstrap files).
- ```hero fmt: the same, and it is in canonical form (`herovm script fmt` leaves it as it is).
- ```hero error: fails with HeroScriptError (when it is read, or when it is checked); a ```text block right
  after it is exactly what `herovm script check example.hero` prints for it.
- ```sh and ```text: shown as they are (a ```text block only right after a `hero error` block).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from herovm.heroscript import HeroScriptError, dumps, parse, validate

DOC = Path(__file__).resolve().parents[3] / "docs/heroscript.md"
FENCE = re.compile(r"^```(.*)$")
KNOWN_TAGS = {"hero", "text", "sh"}


@dataclass
class Block:
    tag: str
    line: int  # 1-based line of the opening fence
    text: str
    error: bool = False
    canonical: bool = False
    file: str | None = None
    variables: dict[str, str] = field(default_factory=dict)
    expected: str | None = None  # the ```text block after an error block

    @property
    def id(self) -> str:
        return f"line{self.line}" + ("-error" if self.error else "")


def _blocks() -> list[Block]:
    lines = DOC.read_text(encoding="utf-8").split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        words = m.group(1).split()
        assert words, f"docs/heroscript.md:{i + 1}: a code block needs a tag (hero, text or sh)"
        end = next((j for j in range(i + 1, len(lines)) if lines[j] == "```"), None)
        assert end is not None, f"docs/heroscript.md:{i + 1}: code block never closed"
        block = Block(words[0], i + 1, "\n".join(lines[i + 1 : end]) + "\n")
        for word in words[1:]:
            key, _, value = word.partition("=")
            if word == "error":
                block.error = True
            elif word == "fmt":
                block.canonical = True
            elif key == "file" and value:
                block.file = value
            elif key == "var" and "=" in value:
                name, _, val = value.partition("=")
                block.variables[name] = val
            else:
                raise AssertionError(f"docs/heroscript.md:{i + 1}: unknown block attribute {word!r}")
        blocks.append(block)
        i = end + 1
    return blocks


def _examples() -> list[Block]:
    out: list[Block] = []
    for block in _blocks():
        if block.tag == "text":
            prev = out[-1] if out else None
            assert prev is not None and prev.error and prev.expected is None, (
                f"docs/heroscript.md:{block.line}: a text block belongs right after a `hero error` block"
            )
            prev.expected = block.text
        elif block.tag == "hero":
            out.append(block)
    return out


EXAMPLES = _examples()


def _registries():
    from herovm.guest.registry import guest_registry
    from herovm.playbook import host_registry

    return guest_registry(), host_registry()


def _registry():
    """What `herovm script check` checks against: the guest's and the host's actions."""
    guest, host = _registries()
    return guest.merge(host)


@pytest.fixture
def example_dir(tmp_path: Path) -> Path:
    """The directory of the examples, holding the doc's `file=` blocks."""
    for block in EXAMPLES:
        if block.file:
            (tmp_path / block.file).write_text(block.text, encoding="utf-8")
    return tmp_path


def test_the_doc_has_examples_of_each_kind() -> None:
    tags = {b.tag for b in _blocks()}
    assert tags <= KNOWN_TAGS, f"unknown code block tags: {tags - KNOWN_TAGS}"
    assert sum(not b.error for b in EXAMPLES) >= 15
    errors = [b for b in EXAMPLES if b.error]
    assert len(errors) >= 5 and all(b.expected for b in errors)
    assert any(b.canonical for b in EXAMPLES) and any(b.file for b in EXAMPLES)


@pytest.mark.parametrize("block", [b for b in EXAMPLES if not b.error], ids=lambda b: b.id)
def test_example_parses_and_checks(block: Block, example_dir: Path) -> None:
    path = example_dir / (block.file or "example.hero")
    playbook = parse(block.text, path=path, variables=block.variables or None)
    assert playbook.actions, "an example without actions"
    guest, host = _registries()
    as_bootstrap, as_playbook = validate(playbook, guest), validate(playbook, host)
    problems = min(as_bootstrap, as_playbook, key=len)  # a real bootstrap, or a real playbook
    assert not problems, "\n".join(str(p) for p in problems)
    if block.canonical:
        assert dumps(parse(block.text, resolve_includes=False)) == block.text


@pytest.mark.parametrize("block", [b for b in EXAMPLES if b.error], ids=lambda b: b.id)
def test_error_example_fails_with_the_message_shown(
    block: Block, example_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = example_dir / "example.hero"
    try:
        playbook = parse(block.text, path=path, variables=block.variables or None)
    except HeroScriptError:
        pass
    else:
        errors = [p for p in validate(playbook, _registry()) if p.is_error]
        assert errors, "a `hero error` example that herovm accepts"
        assert isinstance(HeroScriptError.from_problems(errors), HeroScriptError)
    if block.expected is not None:
        from herovm.cli import app

        path.write_text(block.text, encoding="utf-8")
        monkeypatch.chdir(example_dir)
        result = CliRunner().invoke(app, ["script", "check", "example.hero"])
        assert result.exit_code == 1
        assert result.output == block.expected
