"""The herovm init agent: PID 1 of a herovm guest. See bootstrap/PROTOCOL.md."""

VERSION = "2"
