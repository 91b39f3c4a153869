"""The agent keeps `--secret` values out of its events: they are mirrored on the serial console, which the
host keeps as the VM's console log and shows in `herovm logs` and `status`."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "herovm/_data/agent"))
from herovm_agent.events import CONSOLE_PREFIX, Events  # noqa: E402

SECRET = 'tok-3xample"\\with quote'


def events_with_secret() -> tuple[Events, io.StringIO]:
    console = io.StringIO()
    events = Events(None, console=console)
    events.keep_secret({"TOKEN": SECRET, "SHORT": "tok", "EMPTY": ""})
    return events, console


def test_no_event_carries_a_secret_on_the_console_or_in_the_replay() -> None:
    events, console = events_with_secret()
    events.emit("action.end", index=0, action="cmd.run", ok=False, output=f"curl -H {SECRET}\n", error=SECRET)
    events.emit("failed", stage="validate", error=f"timeout: '{SECRET}' is not a duration")
    events.emit("status", status={"actions": [{"error": SECRET}], "n": [1, SECRET]})
    text = console.getvalue()
    assert "3xample" not in text and "3xample" not in "".join(events._history)
    lines = [json.loads(ln[len(CONSOLE_PREFIX) :]) for ln in text.splitlines()]
    assert lines[0]["output"] == "curl -H [secret TOKEN]\n" and lines[0]["error"] == "[secret TOKEN]"
    assert lines[1]["error"] == "timeout: '[secret TOKEN]' is not a duration"  # the longest value first
    assert lines[2]["status"] == {"actions": [{"error": "[secret TOKEN]"}], "n": [1, "[secret TOKEN]"]}


def test_a_shorter_secret_is_redacted_too_and_other_fields_are_kept() -> None:
    events, console = events_with_secret()
    record = events.emit("action.end", index=3, ok=True, seconds=0.5, output="tok tok", exit_code=0)
    assert record["output"] == "[secret SHORT] [secret SHORT]"
    assert (record["index"], record["ok"], record["seconds"], record["exit_code"]) == (3, True, 0.5, 0)


def test_without_secrets_events_are_as_emitted() -> None:
    console = io.StringIO()
    events = Events(None, console=console)
    assert events.emit("action.end", output="tok")["output"] == "tok"
    assert events.redact({"a": "tok"}) == {"a": "tok"}
