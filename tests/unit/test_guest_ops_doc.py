"""docs/protocol.md's "Ops" tables are herovm/protocol.py's: every op and its fields (`?`: optional), the
failure codes and the watch events, so that neither can drift from the other."""

from __future__ import annotations

from test_protocol_doc import DOC, fields, table, ticked

from herovm import protocol
from herovm.protocol import Op, OpError, WatchType


def test_the_ops_table_is_every_op_and_its_fields() -> None:
    rows = table("op request")
    assert [ticked(row[0])[0] for row in rows] == list(Op.ALL)
    for row in rows:
        op = ticked(row[0])[0]
        documented = fields(row[1])
        assert list(documented) == [f.name for f in protocol.OP_FIELDS[op]], op
        for f in protocol.OP_FIELDS[op]:
            assert documented[f.name][0] == (not f.required), f"{op}.{f.name}: `?` marks the optional fields"


def test_the_failure_codes_and_watch_events_are_the_vocabularies() -> None:
    assert [ticked(row[0])[0] for row in table("code")] == list(OpError.ALL)
    assert [ticked(row[0])[0] for row in table("watch event")] == list(WatchType.ALL)


def test_the_signals_and_limits_the_page_names_are_the_modules() -> None:
    text = " ".join(DOC.read_text().split())
    assert ", ".join(f"`{s}`" for s in protocol.SIGNALS) in text
    for name in (
        "MAX_PROCESSES",
        "PROCESS_OUTPUT_BUFFER",
        "PROCESS_STDIN_BUFFER",
        "ENDED_KEEP_S",
        "MAX_WATCHES",
    ):
        assert f"`{name}`" in text
    assert protocol.MAX_PROCESSES == 64 and "At most 64 processes" in text
    assert protocol.PROCESS_OUTPUT_BUFFER == 1 << 20 and "1 MiB per process" in text
    assert protocol.ENDED_KEEP_S == 60 and "kept 60 s" in text
