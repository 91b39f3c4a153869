"""`herovm run -i` (herovm.session): actions cut where HeroScript says they end, each answered with one JSON
line as soon as it is complete (the test waits for each answer before it sends the next action), a failure
or an invalid action answered without ending the session. On libvirt's test driver: vm.delete of a VM that
does not exist succeeds, vm.exec of one fails."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from herovm.session import actions, serve


def test_actions_end_at_a_blank_line_the_next_action_or_the_end() -> None:
    text = (
        "!!vm.delete name:a\n"
        "\n"
        "!!vm.create name:b\n"
        "    memory:512MB\n"
        "!!vm.exec name:b cmd:'\n"
        "    echo one\n"
        "\n"
        "    !!not.an.action\n"
        "    '\n"
        "!!vm.delete name:b"
    )
    cut = list(actions(io.StringIO(text)))
    assert [line for line, _ in cut] == [1, 3, 5, 10]
    assert cut[1][1] == "!!vm.create name:b\n    memory:512MB"
    assert cut[2][1].endswith("!!not.an.action\n    '")  # the blank line and `!!` are inside its value
    assert cut[3][1] == "!!vm.delete name:b"


@pytest.fixture
def home(isolated_home: Path) -> Path:
    return isolated_home


def test_a_session_goes_on_after_failures_and_says_where(home: Path) -> None:
    text = (
        "!!vm.delete name:gone1\n\n!!vm.nosuch x:1\n!!vm.exec name:missing-vm cmd:true\n"
        "!!vm.delete name:gone2\n"
    )
    out = io.StringIO()
    code = serve(io.StringIO(text), out, uri="test:///default")
    answers = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(a["index"], a["line"], a["ok"]) for a in answers] == [
        (0, 1, True),
        (1, 3, False),
        (2, 4, False),
        (3, 5, True),
    ]
    assert answers[1]["problems"][0]["message"] == "unknown action 'vm.nosuch'"
    assert answers[2]["action"] == "vm.exec" and "VM missing-vm not found" in answers[2]["error"]
    assert code == 1


def test_each_action_is_answered_before_the_next_is_sent(home: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "herovm", "--connect", "test:///default", "run", "-i"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for n in range(3):
            proc.stdin.write(f"!!vm.delete name:gone{n}\n\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            answer = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
            assert answer["index"] == n and answer["ok"] and answer["value"]["name"] == f"gone{n}"
        proc.stdin.close()  # type: ignore[union-attr]
        assert proc.wait(30) == 0
    finally:
        proc.kill()


def test_run_needs_a_playbook_or_a_session() -> None:
    both = subprocess.run(
        [sys.executable, "-m", "herovm", "run", "-i", "x.hero"], capture_output=True, text=True
    )
    assert both.returncode == 2 and "give a playbook, or -i for a session on stdin" in both.stderr
