"""The messages of envd's two Connect services, process.Process and filesystem.Filesystem.

Written from envd's published schema (process/process.proto, filesystem/filesystem.proto): field names,
numbers and types are the wire contract the E2B SDKs speak. Instead of generated code (which needs protoc),
the schema is declared here in a few lines per message and turned into a FileDescriptorProto at import;
protobuf-py makes the message classes from it, with its JSON and binary encodings, and connectrpc serves
them. `message("process.StartRequest")` is a class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from protobuf import DescFile, Message
from protobuf._codegen import file_desc  # what generated code calls: a FileDescriptorProto -> descriptors
from protobuf.wkt import timestamp_pb
from protobuf.wkt.google.protobuf.descriptor_pb import (
    DescriptorProto,
    EnumDescriptorProto,
    EnumValueDescriptorProto,
    FieldDescriptorProto,
    FileDescriptorProto,
    MessageOptions,
    MethodDescriptorProto,
    OneofDescriptorProto,
    ServiceDescriptorProto,
)

_T = FieldDescriptorProto.Type
_SCALARS = {
    "string": _T.STRING,
    "bytes": _T.BYTES,
    "bool": _T.BOOL,
    "uint32": _T.UINT32,
    "sint32": _T.SINT32,
    "int64": _T.INT64,
}


@dataclass
class F:
    """One field: `type` a scalar's name, `map`, or a message/enum's full name (".pkg.Name").
    `oneof`: a real oneof's name; `optional`: proto3 `optional` (a synthetic oneof)."""

    name: str
    number: int
    type: str
    repeated: bool = False
    oneof: str | None = None
    optional: bool = False
    enum: bool = False


@dataclass
class M:
    name: str
    fields: list[F] = field(default_factory=list)
    nested: list[M] = field(default_factory=list)
    maps: dict[str, int] = field(default_factory=dict)  # map<string,string> fields: name -> number


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _message(m: M) -> DescriptorProto:
    fields: list[FieldDescriptorProto] = []
    oneofs: list[str] = [f.oneof for f in m.fields if f.oneof and not f.optional]
    oneofs = list(dict.fromkeys(oneofs))
    synthetic: list[str] = []
    nested = [_message(n) for n in m.nested]
    for f in m.fields:
        label = FieldDescriptorProto.Label.REPEATED if f.repeated else FieldDescriptorProto.Label.OPTIONAL
        fd = FieldDescriptorProto(name=f.name, number=f.number, label=label, json_name=_camel(f.name))
        if f.type in _SCALARS:
            fd.type = _SCALARS[f.type]
        else:
            fd.type = _T.ENUM if f.enum else _T.MESSAGE
            fd.type_name = f.type
        if f.optional:
            synthetic.append(f"_{f.name}")
            fd.proto3_optional = True
        if f.oneof and not f.optional:
            fd.oneof_index = oneofs.index(f.oneof)
        fields.append(fd)
    for name, number in m.maps.items():
        entry = "".join(p.capitalize() for p in name.split("_")) + "Entry"
        nested.append(
            DescriptorProto(
                name=entry,
                field=[
                    FieldDescriptorProto(
                        name=k,
                        number=i,
                        type=_T.STRING,
                        json_name=k,
                        label=FieldDescriptorProto.Label.OPTIONAL,
                    )
                    for i, k in ((1, "key"), (2, "value"))
                ],
                options=MessageOptions(map_entry=True),
            )
        )
        fields.append(
            FieldDescriptorProto(
                name=name,
                number=number,
                label=FieldDescriptorProto.Label.REPEATED,
                type=_T.MESSAGE,
                type_name=f"{m.name}.{entry}",  # made absolute below
                json_name=_camel(name),
            )
        )
    # synthetic oneofs come after the real ones
    for fd, f in zip(fields, m.fields, strict=False):
        if f.optional:
            fd.oneof_index = len(oneofs) + synthetic.index(f"_{f.name}")
    return DescriptorProto(
        name=m.name,
        field=sorted(fields, key=lambda x: x.number),
        nested_type=nested,
        oneof_decl=[OneofDescriptorProto(name=n) for n in oneofs + synthetic],
    )


def _file(
    name: str,
    package: str,
    messages: list[M],
    enums: dict[str, list[tuple[str, int]]],
    service: str,
    methods: list[tuple[str, str, str, bool, bool]],
    deps: list[str] = (),  # type: ignore[assignment]
) -> FileDescriptorProto:
    msgs = [_message(m) for m in messages]

    for d in msgs:
        for fd in d.field:
            if fd.type_name and not fd.type_name.startswith("."):  # a map entry: "Msg.XEntry"
                fd.type_name = f".{package}.{fd.type_name}"
    return FileDescriptorProto(
        name=name,
        package=package,
        dependency=list(deps),
        syntax="proto3",
        message_type=msgs,
        enum_type=[
            EnumDescriptorProto(name=e, value=[EnumValueDescriptorProto(name=n, number=v) for n, v in values])
            for e, values in enums.items()
        ],
        service=[
            ServiceDescriptorProto(
                name=service,
                method=[
                    MethodDescriptorProto(
                        name=mname,
                        input_type=f".{package}.{i}",
                        output_type=f".{package}.{o}",
                        client_streaming=cs,
                        server_streaming=ss,
                    )
                    for mname, i, o, cs, ss in methods
                ],
            )
        ],
    )


P = ".process."
_PROCESS = _file(
    "process/process.proto",
    "process",
    [
        M(
            "PTY",
            [F("size", 1, P + "PTY.Size")],
            nested=[M("Size", [F("cols", 1, "uint32"), F("rows", 2, "uint32")])],
        ),
        M(
            "ProcessConfig",
            [
                F("cmd", 1, "string"),
                F("args", 2, "string", repeated=True),
                F("cwd", 4, "string", optional=True),
            ],
            maps={"envs": 3},
        ),
        M("ListRequest"),
        M(
            "ProcessInfo",
            [
                F("config", 1, P + "ProcessConfig"),
                F("pid", 2, "uint32"),
                F("tag", 3, "string", optional=True),
            ],
        ),
        M("ListResponse", [F("processes", 1, P + "ProcessInfo", repeated=True)]),
        M(
            "StartRequest",
            [
                F("process", 1, P + "ProcessConfig"),
                F("pty", 2, P + "PTY", optional=True),
                F("tag", 3, "string", optional=True),
                F("stdin", 4, "bool", optional=True),
            ],
        ),
        M("UpdateRequest", [F("process", 1, P + "ProcessSelector"), F("pty", 2, P + "PTY", optional=True)]),
        M("UpdateResponse"),
        M(
            "ProcessEvent",
            [
                F("start", 1, P + "ProcessEvent.StartEvent", oneof="event"),
                F("data", 2, P + "ProcessEvent.DataEvent", oneof="event"),
                F("end", 3, P + "ProcessEvent.EndEvent", oneof="event"),
                F("keepalive", 4, P + "ProcessEvent.KeepAlive", oneof="event"),
            ],
            nested=[
                M("StartEvent", [F("pid", 1, "uint32")]),
                M(
                    "DataEvent",
                    [
                        F("stdout", 1, "bytes", oneof="output"),
                        F("stderr", 2, "bytes", oneof="output"),
                        F("pty", 3, "bytes", oneof="output"),
                    ],
                ),
                M(
                    "EndEvent",
                    [
                        F("exit_code", 1, "sint32"),
                        F("exited", 2, "bool"),
                        F("status", 3, "string"),
                        F("error", 4, "string", optional=True),
                    ],
                ),
                M("KeepAlive"),
            ],
        ),
        M("StartResponse", [F("event", 1, P + "ProcessEvent")]),
        M("ConnectResponse", [F("event", 1, P + "ProcessEvent")]),
        M("SendInputRequest", [F("process", 1, P + "ProcessSelector"), F("input", 2, P + "ProcessInput")]),
        M("SendInputResponse"),
        M("ProcessInput", [F("stdin", 1, "bytes", oneof="input"), F("pty", 2, "bytes", oneof="input")]),
        M(
            "StreamInputRequest",
            [
                F("start", 1, P + "StreamInputRequest.StartEvent", oneof="event"),
                F("data", 2, P + "StreamInputRequest.DataEvent", oneof="event"),
                F("keepalive", 3, P + "StreamInputRequest.KeepAlive", oneof="event"),
            ],
            nested=[
                M("StartEvent", [F("process", 1, P + "ProcessSelector")]),
                M("DataEvent", [F("input", 2, P + "ProcessInput")]),
                M("KeepAlive"),
            ],
        ),
        M("StreamInputResponse"),
        M(
            "SendSignalRequest",
            [F("process", 1, P + "ProcessSelector"), F("signal", 2, P + "Signal", enum=True)],
        ),
        M("SendSignalResponse"),
        M("CloseStdinRequest", [F("process", 1, P + "ProcessSelector")]),
        M("CloseStdinResponse"),
        M("ConnectRequest", [F("process", 1, P + "ProcessSelector")]),
        M(
            "ProcessSelector",
            [F("pid", 1, "uint32", oneof="selector"), F("tag", 2, "string", oneof="selector")],
        ),
    ],
    {"Signal": [("SIGNAL_UNSPECIFIED", 0), ("SIGNAL_SIGTERM", 15), ("SIGNAL_SIGKILL", 9)]},
    "Process",
    [
        ("List", "ListRequest", "ListResponse", False, False),
        ("Connect", "ConnectRequest", "ConnectResponse", False, True),
        ("Start", "StartRequest", "StartResponse", False, True),
        ("Update", "UpdateRequest", "UpdateResponse", False, False),
        ("StreamInput", "StreamInputRequest", "StreamInputResponse", True, False),
        ("SendInput", "SendInputRequest", "SendInputResponse", False, False),
        ("SendSignal", "SendSignalRequest", "SendSignalResponse", False, False),
        ("CloseStdin", "CloseStdinRequest", "CloseStdinResponse", False, False),
    ],
)

FS = ".filesystem."
_ENTRY = [F("entry", 1, FS + "EntryInfo")]
_WATCH = [
    F("path", 1, "string"),
    F("recursive", 2, "bool"),
    F("include_entry", 3, "bool"),
    F("allow_network_mounts", 4, "bool"),
]
_FILESYSTEM = _file(
    "filesystem/filesystem.proto",
    "filesystem",
    [
        M("MoveRequest", [F("source", 1, "string"), F("destination", 2, "string")]),
        M("MoveResponse", _ENTRY),
        M("MakeDirRequest", [F("path", 1, "string")]),
        M("MakeDirResponse", _ENTRY),
        M("RemoveRequest", [F("path", 1, "string")]),
        M("RemoveResponse"),
        M("StatRequest", [F("path", 1, "string")]),
        M("StatResponse", _ENTRY),
        M(
            "EntryInfo",
            [
                F("name", 1, "string"),
                F("type", 2, FS + "FileType", enum=True),
                F("path", 3, "string"),
                F("size", 4, "int64"),
                F("mode", 5, "uint32"),
                F("permissions", 6, "string"),
                F("owner", 7, "string"),
                F("group", 8, "string"),
                F("modified_time", 9, ".google.protobuf.Timestamp"),
                F("symlink_target", 10, "string", optional=True),
                F("is_symlink", 12, "bool"),
            ],
            maps={"metadata": 11},
        ),
        M("ListDirRequest", [F("path", 1, "string"), F("depth", 2, "uint32")]),
        M("ListDirResponse", [F("entries", 1, FS + "EntryInfo", repeated=True)]),
        M("WatchDirRequest", _WATCH),
        M(
            "FilesystemEvent",
            [
                F("name", 1, "string"),
                F("type", 2, FS + "EventType", enum=True),
                F("entry", 3, FS + "EntryInfo", optional=True),
            ],
        ),
        M(
            "WatchDirResponse",
            [
                F("start", 1, FS + "WatchDirResponse.StartEvent", oneof="event"),
                F("filesystem", 2, FS + "FilesystemEvent", oneof="event"),
                F("keepalive", 3, FS + "WatchDirResponse.KeepAlive", oneof="event"),
            ],
            nested=[M("StartEvent"), M("KeepAlive")],
        ),
        M("CreateWatcherRequest", _WATCH),
        M("CreateWatcherResponse", [F("watcher_id", 1, "string")]),
        M("GetWatcherEventsRequest", [F("watcher_id", 1, "string")]),
        M("GetWatcherEventsResponse", [F("events", 1, FS + "FilesystemEvent", repeated=True)]),
        M("RemoveWatcherRequest", [F("watcher_id", 1, "string")]),
        M("RemoveWatcherResponse"),
    ],
    {
        "FileType": [
            ("FILE_TYPE_UNSPECIFIED", 0),
            ("FILE_TYPE_FILE", 1),
            ("FILE_TYPE_DIRECTORY", 2),
            ("FILE_TYPE_SYMLINK", 3),
        ],
        "EventType": [
            ("EVENT_TYPE_UNSPECIFIED", 0),
            ("EVENT_TYPE_CREATE", 1),
            ("EVENT_TYPE_WRITE", 2),
            ("EVENT_TYPE_REMOVE", 3),
            ("EVENT_TYPE_RENAME", 4),
            ("EVENT_TYPE_CHMOD", 5),
        ],
    },
    "Filesystem",
    [
        ("Stat", "StatRequest", "StatResponse", False, False),
        ("MakeDir", "MakeDirRequest", "MakeDirResponse", False, False),
        ("Move", "MoveRequest", "MoveResponse", False, False),
        ("ListDir", "ListDirRequest", "ListDirResponse", False, False),
        ("Remove", "RemoveRequest", "RemoveResponse", False, False),
        ("WatchDir", "WatchDirRequest", "WatchDirResponse", False, True),
        ("CreateWatcher", "CreateWatcherRequest", "CreateWatcherResponse", False, False),
        ("GetWatcherEvents", "GetWatcherEventsRequest", "GetWatcherEventsResponse", False, False),
        ("RemoveWatcher", "RemoveWatcherRequest", "RemoveWatcherResponse", False, False),
    ],
    deps=["google/protobuf/timestamp.proto"],
)


@cache
def files() -> dict[str, DescFile]:
    """The two files' descriptors, by package."""
    return {
        "process": file_desc(_PROCESS.to_binary(), [], {}),
        "filesystem": file_desc(_FILESYSTEM.to_binary(), [timestamp_pb.desc()], {}),
    }


@cache
def message(full_name: str) -> type[Message]:
    """The class of message `full_name`, e.g. "process.ProcessEvent.DataEvent"."""
    package = full_name.split(".", 1)[0]
    desc = files()[package]
    for m in _walk(desc.messages):
        if m.type_name == full_name:
            return m.type
    raise KeyError(full_name)


def _walk(messages):  # noqa: ANN001, ANN202
    for m in messages:
        yield m
        yield from _walk(getattr(m, "nested_messages", ()))


def enum_value(full_name: str, name: str) -> int:
    """The number of enum value `name` of enum `full_name` (e.g. "filesystem.FileType")."""
    package = full_name.split(".", 1)[0]
    for e in files()[package].enums:
        if e.type_name == full_name:
            return next(v.number for v in e.values if v.name == name)
    raise KeyError(full_name)
