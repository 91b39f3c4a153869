"""docs/actions.md is generated from the action registries: it must say what the code does."""

from pathlib import Path

from herovm.cli import action_sections
from herovm.cli_script import actions_markdown

DOC = Path(__file__).resolve().parents[2] / "docs/actions.md"


def test_actions_reference_is_current() -> None:
    assert DOC.read_text() == actions_markdown(action_sections()), (
        "docs/actions.md is stale: regenerate it with `herovm script actions --markdown > docs/actions.md`"
    )


def test_every_action_has_help_and_an_example_that_validates(tmp_path: Path) -> None:
    from herovm.heroscript import parse, validate

    (tmp_path / "setup.hero").write_text("!!cmd.run cmd:true\n")  # the file vm.create's example names
    for _, registry in action_sections():
        for spec in registry.specs():
            assert spec.help and spec.example, spec.fullname
            playbook = parse(spec.example, path=str(tmp_path / "example.hero"))
            problems = [p for p in validate(playbook, registry) if p.severity == "error"]
            assert not problems, (spec.fullname, [str(p) for p in problems])
