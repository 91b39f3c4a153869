"""Integration tests: real guests under QEMU (TCG here, KVM where it works) through a real libvirtd.

Every VM is made through `vm_factory`, which removes it at teardown whether the test passed or not. Names are
unique per run, so parallel or leftover runs never collide.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from herovm import images
from herovm.manager import Manager
from herovm.progress import Progress

DATA = Path(__file__).parent / "data"

pytestmark = pytest.mark.integration


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def image() -> images.Image:
    """The default image, built once on this machine and reused (rebuilt when its sources change)."""
    return images.ensure("default")


class Recorder:
    """Collects the progress events of `up`, including every agent event."""

    def __init__(self) -> None:
        self.events: list[Progress] = []

    def __call__(self, p: Progress) -> None:
        self.events.append(p)

    def agent_events(self) -> list[dict]:
        return [p.data for p in self.events if p.stage == "agent"]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="session")
def run_id() -> Iterator[str]:
    """This run's tag in every VM name; at the end, whatever a failed test left under it is removed."""
    tag = uuid.uuid4().hex[:6]
    yield tag
    with Manager() as manager:
        for machine in manager.backend.list():
            if machine.name.startswith(f"it-{tag}-"):
                with contextlib.suppress(Exception):
                    manager.down(machine.name)


@pytest.fixture
def unique_name(run_id: str, request: pytest.FixtureRequest) -> Iterator:
    counter = iter(range(1000))

    def make(tag: str = "") -> str:
        base = (tag or request.node.name.removeprefix("test_")).replace("_", "-")[:20].strip("-")
        return f"it-{run_id}-{base}-{next(counter)}"

    yield make


@contextlib.contextmanager
def _factory(progress=None) -> Iterator:
    made: list[str] = []
    manager = Manager(progress=progress) if progress else Manager()

    def up(name: str, **kwargs):
        made.append(name)
        kwargs.setdefault("timeout", "3m")
        return manager.up(name, **kwargs)

    up.manager = manager  # type: ignore[attr-defined]
    try:
        yield up
    finally:
        for name in made:
            with contextlib.suppress(Exception):
                manager.down(name)
        manager.close()


@pytest.fixture
def vm_factory(image: images.Image, recorder: Recorder) -> Iterator:
    """vm_factory(name, **up_kwargs) -> VM; every VM it made is removed at teardown, pass or fail."""
    with _factory(recorder) as up:
        yield up


@pytest.fixture(scope="module")
def module_vm_factory(image: images.Image) -> Iterator:
    """Like vm_factory, for VMs shared by a module's tests (boots are the expensive part)."""
    with _factory() as up:
        yield up


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator:
    """A file server on the host's loopback; the guest reaches it as 10.0.2.2:PORT (user-mode networking)."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):  # keep test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.root = root  # type: ignore[attr-defined]
    yield server
    server.shutdown()
    server.server_close()


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("HEROVM_TEST", "1")


@pytest.fixture(scope="module")
def serve_alone() -> Iterator[None]:
    """Every `herovm serve` of the HEROVM_HOME reads the sandboxes its servers recorded there (a restarted
    server rebuilds its view), so two serve test files at once saw, listed and killed each other's
    sandboxes: each serve test file asks for this (`pytest.mark.usefixtures`), and they take turns."""
    from guests import alone

    with alone("serve"):
        yield
