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


def test_module_session_and_factory_fixtures(pytester: pytest.Pytester, prefix: str) -> None:
    """A module's VM is one VM for its tests (and takes the module's herovm_settings), the session's one
    for the session; the factory makes several in one test; every one is marked as the session's while it
    lives (gc takes a killed session's, below) and removed at the end of its scope."""
    pytester.makepyfile(
        test_a="""
        herovm_settings = {"memory": "512MB"}
        seen = []

        def test_one(herovm_module_vm, herovm_session_vm, herovm_manager):
            seen.append(herovm_module_vm.name)
            herovm_module_vm.exec("echo kept > /root/shared")
            assert herovm_manager.status(herovm_module_vm.name)["settings"]["memory"] == 512 << 20
            assert herovm_manager.record(herovm_session_vm.name).extra["pytest_session"]["pid"] > 0

        def test_two(herovm_module_vm, herovm_session_vm):
            assert [herovm_module_vm.name] == seen
            assert herovm_module_vm.exec(["cat", "/root/shared"]).stdout == b"kept\\n"

        def test_factory(herovm_factory, herovm_session_vm):
            a, b = herovm_factory(), herovm_factory(net="restricted")
            assert a.name != b.name and b.exec(["hostname"]).stdout.decode().strip() == b.name
        """
    )
    result = pytester.runpytest_subprocess("--herovm-name-prefix", prefix, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    assert names_with(prefix) == []


def test_gc_removes_the_vms_of_a_killed_session(pytester: pytest.Pytester, prefix: str) -> None:
    import signal
    import subprocess
    import sys
    import time

    pytester.makepyfile(
        test_k="""
        import time

        def test_waits(herovm_vm):
            print("VM-READY", flush=True)
            time.sleep(600)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider", "--herovm-name-prefix", prefix],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        for line in proc.stdout:  # type: ignore[union-attr]
            if "VM-READY" in line or time.monotonic() > deadline:
                break
        assert len(names_with(prefix)) == 1
    finally:
        proc.send_signal(signal.SIGKILL)  # no teardown runs: the VM stays behind
        proc.wait()
    [name] = names_with(prefix)
    gc = subprocess.run([sys.executable, "-m", "herovm", "gc"], capture_output=True, text=True)
    assert f"removed {name} (made by a pytest session that is gone, pid {proc.pid})" in gc.stdout, gc.stdout
    assert names_with(prefix) == []
