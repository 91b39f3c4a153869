"""A HeroScript session for agents (`herovm run -i`): actions read from a stream, each run as soon as it is
complete, each answered with one JSON line, the session going on after a failure.

    $ herovm run -i
    !!vm.create name:box net:restricted

    {"index": 0, "action": "vm.create", "line": 1, "ok": true, "seconds": 4.1, ...}
    !!vm.exec name:box cmd:'uname -r'
    !!vm.exec name:nope cmd:true
    {"index": 1, "action": "vm.exec", "line": 3, "ok": true, ...}

When an action is complete: HeroScript lets an action go on over indented continuation lines and
multi-line values, so a line alone does not say it ended. It has when a blank line follows it outside a
multi-line value, when the next unindented `!!` line starts another action, or at the end of the input.
An agent ends each action with a blank line (or sends the next one) and reads one JSON line per action.

Each answer is `herovm.playbook.result_json` of the action (ok, seconds, value, error, exit_code, output), or,
for text that is not a valid action, `{"index", "line", "ok": false, "error": "...", "problems": [...]}`:
nothing of it ran. Line numbers count from the start of the session. One Manager serves the whole
session, so guest connections are kept between actions. Exit status: 0 when every action succeeded, 1 if
one failed, 130 when interrupted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import IO

from .heroscript import HeroScriptError
from .heroscript import run as run_actions
from .playbook import PlayContext, check_playbook, host_registry, load_playbook, result_json

_OPENS_MULTILINE = re.compile(r"""(?:^|\s)[\w.]+:\s*(?:'''|\"\"\"|'|")\s*$""")


def actions(lines: Iterable[str]) -> Iterable[tuple[int, str]]:
    """The input cut into actions: (the line its text starts on, counted from 1; its text)."""
    buffer: list[str] = []
    start = 1
    quote: str | None = None  # the closing quote of an open multi-line value
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        stripped = line.strip()
        if quote is not None:
            buffer.append(line)
            if stripped == quote:
                quote = None
            continue
        if line.startswith("!!") and buffer and any(b.strip() for b in buffer):
            yield start, "\n".join(buffer)
            buffer, start = [], number
        if not stripped:
            if any(b.strip() for b in buffer):
                yield start, "\n".join(buffer)
            buffer, start = [], number + 1
            continue
        if not buffer:
            start = number
        buffer.append(line)
        if (opened := _OPENS_MULTILINE.search(line)) is not None:
            quote = opened.group(0).split(":", 1)[1].strip()
    if any(b.strip() for b in buffer):
        yield start, "\n".join(buffer)


def serve(
    stream: Iterable[str],
    out: IO[str],
    variables: Mapping[str, str] | None = None,
    *,
    backend: str | None = None,
    uri: str | None = None,
) -> int:
    """Run the session: every action of `stream` as it completes, one JSON line each on `out`."""
    failed = False
    index = 0

    def answer(obj: dict) -> None:
        out.write(json.dumps(obj, default=str) + "\n")
        out.flush()

    with PlayContext(backend=backend, uri=uri) as ctx:
        try:
            for line, text in actions(stream):
                # blank lines in front keep the parser's line numbers the session's
                source = "\n" * (line - 1) + text
                try:
                    playbook = load_playbook("<session>", variables=variables, text=source)
                    errors = [p for p in check_playbook(playbook) if p.is_error]
                    if errors:
                        raise HeroScriptError.from_problems(errors)
                    results = run_actions(playbook, host_registry(), ctx, keep_going=True)
                except HeroScriptError as e:
                    failed = True
                    problems = [
                        {"line": p.line, "col": p.col, "message": p.message, "hint": p.hint}
                        for p in e.problems
                    ]
                    answer({"index": index, "line": line, "ok": False, "error": str(e), "problems": problems})
                    index += 1
                    continue
                for r in results:
                    answer({**result_json(r), "index": index})
                    failed = failed or not r.ok
                    index += 1
        except KeyboardInterrupt:
            return 130
    return 1 if failed else 0
