"""The herovm init agent: PID 1 of a herovm guest. See docs/protocol.md."""

VERSION = "2"
