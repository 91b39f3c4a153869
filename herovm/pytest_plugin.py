"""pytest plugin: a fresh, real herovm VM per test. Loaded automatically once herovm is installed (entry
point `pytest11`); nothing happens, and libvirt is not touched, unless a test asks for a fixture.

    def test_build(herovm_vm):
        assert herovm_vm.exec(["true"]).exit_code == 0

    @pytest.mark.herovm(bootstrap="setup.hero", memory="512MB")
    def test_service(herovm_vm): ...

    @pytest.mark.herovm(template="py311")  # restored from a template instead of booted
    def test_fast(herovm_vm): ...

    @pytest.mark.herovm(bootstrap="web.hero", publish=[8080])  # the guest's 8080 on a free host port
    def test_web(herovm_vm):
        host, port = herovm_vm.port(8080)  # ("127.0.0.1", 40123)

Fixtures: `herovm_vm` (function scope: a VM with a unique name, removed after the test whatever happened),
`herovm_manager` (session scope: the herovm.Manager the VMs come from).
Options: --herovm-backend NAME (libvirt or cloud-hypervisor; default: $HEROVM_BACKEND, else libvirt, as for
`herovm`), --herovm-image RECIPE, --herovm-bootstrap FILE, --herovm-template TEMPLATE (restore each VM from
a template made with `herovm template create`: ~1 s instead of a boot), --herovm-keep-on-failure (keep the
VM of a failed test for inspection; its name and how to remove it are printed), --herovm-name-prefix PREFIX.
The marker's keyword arguments go to Manager.up (the settings of herovm.settings.VMSettings: bootstrap,
memory, cpus, disk, image, variables, timeout, accel, ...); a relative bootstrap path is looked up beside the
test file first, then in the current directory.
Every VM made in the session is removed at its end, also when it was interrupted (Ctrl-C) between or
during tests, except those kept with --herovm-keep-on-failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from . import liveness
from .liveness import SESSION_MARK

MARKER = "herovm"


@dataclass
class _Session:
    backend: str | None = None  # None: herovm.backends.get_backend decides
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    manager: Any = None
    made: set[str] = field(default_factory=set)  # VMs made and not yet removed
    kept: list[tuple[str, str]] = field(default_factory=list)  # (VM name, test node id)
    counter: int = 0

    def up(self, name: str, settings: dict[str, Any]) -> Any:
        """Make VM `name` with `settings` (Manager.up's keywords), marked as this session's (`gc` removes it
        once this pytest process is gone: herovm.leftovers.orphaned_test_vms)."""
        from .settings import VMSettings

        self.made.add(name)
        return self.get_manager().up_marked(name, VMSettings.of(settings), {SESSION_MARK: liveness.mark()})

    def get_manager(self):
        if self.manager is None:
            from .manager import Manager

            self.manager = Manager(self.backend)
        return self.manager

    def keep(self, name: str, nodeid: str) -> None:
        """Keep the VM for inspection: no longer marked as this session's, so `gc` leaves it afterwards."""
        from dataclasses import replace

        from .record import VMRecord

        m = self.get_manager()
        record = VMRecord.from_json(name, m.machine(name).metadata)
        unmarked = {k: v for k, v in record.extra.items() if k != SESSION_MARK}
        m.backend.set_metadata(name, replace(record, extra=unmarked).to_json())
        self.made.discard(name)
        self.kept.append((name, nodeid))

    def remove(self, name: str) -> None:
        from .errors import NotFound

        with contextlib.suppress(NotFound):
            self.get_manager().down(name)
        self.made.discard(name)

    def cleanup(self) -> list[str]:
        """Remove every VM this session made and did not keep; returns what could not be removed."""
        failed = []
        for name in sorted(self.made):
            try:
                self.remove(name)
            except Exception:
                failed.append(name)
        if self.manager is not None:
            with contextlib.suppress(Exception):
                self.manager.close()
            self.manager = None
        return failed


_SESSION = pytest.StashKey[_Session]()
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("herovm", "herovm VMs as fixtures")
    group.addoption(
        "--herovm-backend",
        default=None,
        metavar="NAME",
        help="libvirt or cloud-hypervisor (default: $HEROVM_BACKEND, else libvirt)",
    )
    group.addoption("--herovm-image", default="default", metavar="RECIPE", help="image of herovm_vm VMs")
    group.addoption(
        "--herovm-bootstrap", default=None, metavar="FILE", help="HeroScript bootstrap of herovm_vm VMs"
    )
    group.addoption(
        "--herovm-template",
        default=None,
        metavar="TEMPLATE",
        help="restore herovm_vm VMs from this template (herovm template create) instead of booting them",
    )
    group.addoption(
        "--herovm-keep-on-failure",
        action="store_true",
        default=False,
        help="keep the VM of a failed test (its name and how to remove it are printed)",
    )
    group.addoption(
        "--herovm-name-prefix", default="pt", metavar="PREFIX", help="VM names are PREFIX-RUNID-TEST-N"
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "herovm(**settings): settings of the herovm_vm VM for this test, as Manager.up takes them "
        "(bootstrap=, memory=, cpus=, disk=, image=, variables=, timeout=, accel=, template=, publish=)",
    )
    config.stash[_SESSION] = _Session(backend=config.getoption("herovm_backend", None))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Runs after pytest tore the fixtures down: removes whatever an interrupted teardown left."""
    state = session.config.stash.get(_SESSION, None)
    if state is None:
        return
    left = state.cleanup()
    if left:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"herovm: could not remove {', '.join(left)}: remove with `herovm down NAME`")


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash.get(_SESSION, None)
    if not state or not state.kept:
        return
    terminalreporter.section("herovm: VMs kept for inspection")
    for name, nodeid in state.kept:
        terminalreporter.write_line(
            f"kept VM {name} of failed test {nodeid}: inspect with `herovm ssh {name}`, "
            f"remove with `herovm down {name}`"
        )


def _unique_name(state: _Session, prefix: str, test_name: str) -> str:
    state.counter += 1
    slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower().removeprefix("test_")).strip("-") or "t"
    head = f"{prefix}-{state.run_id}-"
    tail = f"-{state.counter}"
    slug = slug[: max(1, 40 - len(head) - len(tail))].strip("-") or "t"
    return f"{head}{slug}{tail}"


def _bootstrap(value: Any, test_file: Path | None) -> Any:
    if not isinstance(value, str | os.PathLike) or not value:
        return value
    text = os.fspath(value)
    if "\n" in text or text.lstrip().startswith("!") or text.startswith(("http://", "https://")):
        return text
    path = Path(text).expanduser()
    if not path.is_absolute() and test_file is not None and (test_file.parent / path).exists():
        return str(test_file.parent / path)
    return str(path)


@pytest.fixture(scope="session")
def herovm_manager(pytestconfig: pytest.Config) -> Iterator:
    """The session's herovm.Manager, on the backend --herovm-backend names."""
    state = pytestconfig.stash[_SESSION]
    yield state.get_manager()
    state.cleanup()


@pytest.fixture
def herovm_vm(request: pytest.FixtureRequest, herovm_manager: Any) -> Iterator:
    """A fresh VM for this test (a herovm.VM: exec, put, get), removed afterwards."""
    config = request.config
    state = config.stash[_SESSION]
    marker = request.node.get_closest_marker(MARKER)
    if marker is not None and marker.args:
        raise pytest.UsageError("@pytest.mark.herovm takes keyword arguments only, e.g. memory='512MB'")
    settings = _settings_for(request, marker.kwargs if marker is not None else {})
    name = _unique_name(state, config.getoption("herovm_name_prefix"), request.node.name)
    vm = None
    try:
        vm = state.up(name, settings)
        yield vm
    finally:
        if vm is not None:
            vm.close()
        reports = request.node.stash.get(_REPORTS, {})
        failed = any(r.failed for r in reports.values()) or vm is None
        if failed and config.getoption("herovm_keep_on_failure") and herovm_manager.backend.get(name):
            state.keep(name, request.node.nodeid)
        else:
            state.remove(name)


def _option_settings(config: pytest.Config) -> dict[str, Any]:
    """The VM settings the command line gives (--herovm-image, --herovm-bootstrap, --herovm-template)."""
    if config.getoption("herovm_template"):
        return {"template": config.getoption("herovm_template")}
    settings: dict[str, Any] = {"image": config.getoption("herovm_image")}
    if config.getoption("herovm_bootstrap"):
        settings["bootstrap"] = config.getoption("herovm_bootstrap")
    return settings


def _settings_for(request: pytest.FixtureRequest, extra: dict[str, Any]) -> dict[str, Any]:
    """The command line's VM settings with `extra` over them, or `extra` alone when it names a template (the
    VM is the template's: its image and bootstrap too); a relative bootstrap is looked up beside the test
    file first."""
    settings = dict(extra) if extra.get("template") else {**_option_settings(request.config), **extra}
    test_file = Path(str(request.node.path)) if getattr(request.node, "path", None) else None
    if "bootstrap" in settings:
        settings["bootstrap"] = _bootstrap(settings["bootstrap"], test_file)
    return settings


def _scoped_vm(request: pytest.FixtureRequest, herovm_manager: Any, tag: str, extra: dict) -> Iterator:
    state = request.config.stash[_SESSION]
    settings = _settings_for(request, extra)
    name = _unique_name(state, request.config.getoption("herovm_name_prefix"), tag)
    vm = None
    try:
        vm = state.up(name, settings)
        yield vm
    finally:
        if vm is not None:
            vm.close()
        state.remove(name)


@pytest.fixture(scope="module")
def herovm_module_vm(request: pytest.FixtureRequest, herovm_manager: Any) -> Iterator:
    """One VM for the whole test module (a herovm.VM), removed after its last test. Its settings: the
    command line's, then the module's `herovm_settings = {...}` (Manager.up's keywords)."""
    extra = dict(getattr(request.module, "herovm_settings", {}) or {})
    yield from _scoped_vm(request, herovm_manager, request.module.__name__.rsplit(".", 1)[-1], extra)


@pytest.fixture(scope="session")
def herovm_session_vm(request: pytest.FixtureRequest, herovm_manager: Any) -> Iterator:
    """One VM for the whole session (the command line's settings), removed at its end."""
    yield from _scoped_vm(request, herovm_manager, "session", {})


@pytest.fixture
def herovm_factory(request: pytest.FixtureRequest, herovm_manager: Any) -> Iterator:
    """`herovm_factory(**settings) -> VM`: as many VMs as a test wants (Manager.up's keywords, over the
    command line's), each with a unique name; all removed after the test, pass or fail."""
    state = request.config.stash[_SESSION]
    made: list[Any] = []

    def make(**settings: Any) -> Any:
        wanted = _settings_for(request, settings)
        name = _unique_name(state, request.config.getoption("herovm_name_prefix"), request.node.name)
        try:
            vm = state.up(name, wanted)
        except BaseException:
            state.remove(name)
            raise
        made.append(vm)
        return vm

    try:
        yield make
    finally:
        for vm in made:
            vm.close()
            state.remove(vm.name)
