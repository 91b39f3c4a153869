"""docs/faults.md pairs every guarantee with the test that proves it: each test it names must exist, so a
renamed or removed test cannot leave a guarantee that nothing checks."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = re.compile(r"`([\w/.]*?test_\w+\.py)?(::[\w*\[\]|.-]+)?`")


def references() -> list[tuple[str, str | None]]:
    """(test file, test name or None) for each reference; `::name` alone means the file named before it."""
    found = []
    for line in (ROOT / "docs/faults.md").read_text().splitlines():
        if not line.startswith("|"):
            continue
        current = None
        for match in REFERENCE.finditer(line):
            file, name = match.groups()
            if file:
                current = file
            if current and (file or name):
                found.append((current, name[2:].split("[")[0] if name else None))
    return found


def resolve(file: str) -> Path:
    candidates = [p for p in (ROOT / "tests").rglob(Path(file).name) if str(p).endswith(file)]
    assert len(candidates) == 1, f"docs/faults.md names {file}: found {candidates}"
    return candidates[0]


def test_every_test_that_faults_md_names_exists():
    refs = references()
    assert len(refs) > 40
    missing = []
    for file, name in refs:
        path = resolve(file)
        if name is None:
            continue
        defined = re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M)
        if not fnmatch.filter(defined, name):
            missing.append(f"{file}::{name}")
    assert missing == []


def test_no_two_test_modules_share_a_name():
    """Test directories are not packages: two modules of one name stop pytest's collection of the whole
    suite ("import file mismatch"), which a run of tests/unit alone does not show. It happened twice."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py") if not (p.parent / "__init__.py").exists()]
    assert sorted({n for n in names if names.count(n) > 1}) == []
