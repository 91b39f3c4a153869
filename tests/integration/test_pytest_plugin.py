"""The pytest plugin (herovm.pytest_plugin, loaded through its pytest11 entry point) in a pytest of its own
(pytester, in a subprocess) that boots real guests. Every run gets its own --herovm-name-prefix, and every
test here removes that prefix's VMs at teardown, pass or fail."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterator

import pytest

from herovm.manager import Manager

pytest_plugins = ["pytester"]


def names_with(prefix: str) -> list[str]:
    with Manager() as m:
        return [row["name"] for row in m.ls() if row["name"].startswith(prefix)]


@pytest.fixture
def prefix(image) -> Iterator[str]:
    p = f"pb-{uuid.uuid4().hex[:6]}"
    try:
        yield p
    finally:
        with Manager() as m:
            for name in names_with(p):
                with contextlib.suppress(Exception):
                    m.down(name)


def test_passing_tests_marker_and_bootstrap_option(pytester: pytest.Pytester, prefix: str) -> None:
    pytester.makefile(".hero", boot="!!file.write path:/etc/from-option content:'option'\n")
    data = pytester.mkdir("data")
    (data / "marked.hero").write_text("!!file.write path:/etc/from-marker content:'marker'\n")
    pytester.makepyfile(
        test_vm="""
        import pytest

        def test_default(herovm_vm):
            assert herovm_vm.exec(["true"]).exit_code == 0
            assert herovm_vm.exec(["cat", "/etc/from-option"]).stdout == b"option"

        @pytest.mark.herovm(bootstrap="data/marked.hero", memory="512MB")
        def test_marker(herovm_vm, herovm_manager):
            assert herovm_vm.exec(["cat", "/etc/from-marker"]).stdout == b"marker"
            assert herovm_vm.exec("test -e /etc/from-option").exit_code == 1
            assert herovm_manager.status(herovm_vm.name)["settings"]["memory"] == 512 << 20
        """
    )
    result = pytester.runpytest_subprocess(
        "--herovm-name-prefix", prefix, "--herovm-bootstrap", "boot.hero", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=2)
    assert names_with(prefix) == []


def test_failed_test_kept_with_keep_on_failure(pytester: pytest.Pytester, prefix: str) -> None:
    pytester.makepyfile(
        test_vm="""
        def test_fails(herovm_vm):
            herovm_vm.exec("echo evidence > /root/evidence")
            assert herovm_vm.exec(["false"]).exit_code == 0

        def test_passes(herovm_vm):
            assert herovm_vm.exec(["true"]).exit_code == 0
        """
    )
    result = pytester.runpytest_subprocess(
        "--herovm-name-prefix", prefix, "--herovm-keep-on-failure", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    match = re.search(rf"kept VM ({prefix}-\S+) of failed test test_vm.py::test_fails", out)
    assert match, out
    name = match.group(1)
    assert f"remove with `herovm down {name}`" in out
    assert names_with(prefix) == [name]  # the passing test's VM is gone
    with Manager() as m, m.get(name) as vm:
        assert vm.exec(["cat", "/root/evidence"]).stdout == b"evidence\n"


def test_failed_test_removed_without_option_and_on_interrupt(pytester: pytest.Pytester, prefix: str) -> None:
    pytester.makepyfile(
        test_vm="""
        def test_fails(herovm_vm):
            assert herovm_vm.exec(["false"]).exit_code == 0

        def test_interrupted(herovm_vm):
            raise KeyboardInterrupt

        def test_never_runs():
            pass
        """
    )
    result = pytester.runpytest_subprocess("--herovm-name-prefix", prefix, "-p", "no:cacheprovider")
    out = result.stdout.str()
    assert "1 failed" in out and "KeyboardInterrupt" in out, out
    assert "kept VM" not in out
    assert names_with(prefix) == []
