"""`herovm script ...`: check, parse and format HeroScript files."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Annotated

import typer

from herovm.heroscript import HeroScriptError, Playbook, Problem, Registry, dumps, parse, validate
from herovm.heroscript.registry import repeated_key_warnings

_FILES_HELP = "HeroScript files (.hero, .heroscript, .md); - for stdin"


def _read(path: str) -> tuple[str, str]:
    """(text, name for messages); `-` is stdin."""
    if path == "-":
        return sys.stdin.read(), "<stdin>"
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read(), path
    except (OSError, UnicodeDecodeError) as exc:
        raise HeroScriptError(f"cannot read {path}: {exc}", file=path, line=1, col=1) from None


def _load(path: str, *, resolve_includes: bool = True) -> Playbook:
    text, name = _read(path)
    # stdin: includes are relative to the current directory, errors name <stdin>
    return parse(text, path=name, resolve_includes=resolve_includes)


def _format_problem(p: Problem) -> str:
    text = f"{p.file}:{p.line}:{p.col}: {p.severity}: {p.message}"
    if p.hint:
        text += f"\n  hint: {p.hint}"
    return text


def _action_json(pb: Playbook) -> list[dict]:
    return [
        {
            "kind": a.kind,
            "actor": a.actor,
            "name": a.name,
            "params": a.params.to_dict(),
            "args": list(a.args),
            "comments": list(a.comments),
            "file": a.file,
            "line": a.line,
        }
        for a in pb.actions
    ]


def make_app(registry_factory: Callable[[], Registry] | None = None) -> typer.Typer:
    """The `script` sub-app; with a registry factory, `check` also validates actions and parameters."""
    app = typer.Typer(help="Check, show and format HeroScript files.", no_args_is_help=True)

    @app.command()
    def check(files: Annotated[list[str], typer.Argument(help=_FILES_HELP)]) -> None:
        """Report syntax errors (and, with a registry, unknown actions and bad parameters)."""
        registry = registry_factory() if registry_factory is not None else None
        failed = False
        for path in files:
            try:
                pb = _load(path)
            except HeroScriptError as exc:
                for p in exc.problems:
                    typer.echo(_format_problem(p))
                failed = True
                continue
            problems = validate(pb, registry) if registry is not None else repeated_key_warnings(pb)
            for p in problems:
                typer.echo(_format_problem(p))
                failed = failed or p.is_error
        raise typer.Exit(1 if failed else 0)

    @app.command("parse")
    def parse_cmd(
        file: Annotated[str, typer.Argument(help="a HeroScript file, or - for stdin")],
        as_json: Annotated[bool, typer.Option("--json", help="print the actions as JSON")] = False,
    ) -> None:
        """Show the actions a file holds."""
        try:
            pb = _load(file)
        except HeroScriptError as exc:
            for p in exc.problems:
                typer.echo(_format_problem(p), err=True)
            raise typer.Exit(1) from None
        if as_json:
            typer.echo(json.dumps(_action_json(pb), indent=2, ensure_ascii=False))
            return
        for a in pb.actions:
            bangs = "!" * (("dal", "sal", "macro", "wal").index(a.kind) + 1)
            typer.echo(f"{a.file}:{a.line}:{a.col}: {bangs}{a.fullname} ({a.kind})")
            for c in a.comments:
                typer.echo(f"    // {c}")
            for arg in a.args:
                typer.echo(f"    arg {arg!r}")
            for key, value in a.params.items():
                typer.echo(f"    {key} = {value!r}")

    @app.command()
    def fmt(
        files: Annotated[list[str], typer.Argument(help="files to rewrite; - for stdin (written to stdout)")],
        check_only: Annotated[bool, typer.Option("--check", help="exit 1 if a file would change")] = False,
    ) -> None:
        """Rewrite files in canonical HeroScript."""
        status = 0
        for path in files:
            try:
                text, name = _read(path)
                pb = parse(text, path=name, resolve_includes=False)
            except HeroScriptError as exc:
                for p in exc.problems:
                    typer.echo(_format_problem(p), err=True)
                status = max(status, 2)
                continue
            if pb.dropped:
                for d in pb.dropped:
                    typer.echo(
                        f"{name}:{d.line}:{d.col}: error: fmt would drop this {d.what}; edit by hand",
                        err=True,
                    )
                status = max(status, 2)
                continue
            try:
                new = dumps(pb)
            except ValueError as exc:
                typer.echo(f"{name}: error: {exc}", err=True)
                status = max(status, 2)
                continue
            if path == "-":
                if check_only:
                    if new != text:
                        typer.echo(f"{name} would be reformatted")
                        status = max(status, 1)
                else:
                    typer.echo(new, nl=False)
                continue
            if new == text:
                continue
            if check_only:
                typer.echo(f"{name} would be reformatted")
                status = max(status, 1)
            else:
                with open(path, "w", encoding="utf-8") as fh:
                    fh.write(new)
                typer.echo(f"reformatted {name}")
        raise typer.Exit(status)

    return app


app = make_app()
