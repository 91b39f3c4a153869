"""herovm as a user installs it: the wheel that `pip wheel .` makes, installed in a fresh virtual environment
and run from a directory that is not the checkout. Everything herovm needs at run time (the libvirt template,
the image recipes, the guest agent, the initramfs sources: herovm/_data/) must come with the wheel, and the
image id the installed herovm computes must be the checkout's, so both use the one cached image: a guest
boots here from the image the `image` fixture built, and nothing is rebuilt.

How the environment is made, and why:
- The wheel is built from a copy of what the build reads (pyproject.toml, README.md, herovm/), so nothing is
  written into the checkout and no stale `build/` directory leaks into the wheel. pip builds it with its
  ordinary build isolation, as `pip install .` or `pipx install .` would (setuptools comes from the package
  index pip is configured with).
- The venv is made `--without-pip`, and this environment's pip installs the wheel into it (`pip --python`,
  `--no-deps --no-index`: the wheel and nothing else). Its dependencies are this environment's own, reached
  through a .pth file in the new venv's site-packages that names this environment's site-packages: installing
  them again would compile libvirt-python (minutes) and need the package index. A .pth line only adds its
  directory to sys.path; the .pth files inside that directory do not run, so the checkout's editable install
  (a finder that one of them installs) stays out. The tests check that herovm is imported from the new venv.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from guests import assert_nothing_left

import herovm
from herovm import images, resources
from herovm.manager import Manager

CHECKOUT = Path(__file__).resolve().parents[2]  # these tests run from it; the installed herovm never does


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    site: Path  # the venv's site-packages, where the wheel went
    # PATH starts with the venv's bin; no PYTHONPATH, no trace of the checkout's .venv
    env: dict[str, str] = field(repr=False)

    def run(self, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(args), cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def herovm(self, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run(str(self.venv / "bin/herovm"), *args, cwd=cwd, timeout=timeout)

    def python(self, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run(str(self.venv / "bin/python"), *args, cwd=cwd, timeout=timeout)


def check(r: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
    assert r.returncode == code, f"{r.args}: exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r


def here(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """A command of this test environment's (pip, venv), which must succeed."""
    return check(subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    top = tmp_path_factory.mktemp("wheel")
    assert not top.is_relative_to(CHECKOUT)
    src = top / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(CHECKOUT / name, src / name)
    shutil.copytree(CHECKOUT / "herovm", src / "herovm", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    dist = top / "dist"
    here(*pip, "wheel", "-q", "--no-deps", "-w", dist, src)
    (wheel,) = dist.glob("herovm-*.whl")

    venv = top / "venv"
    here(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin/python"
    here(*pip, "--python", python, "install", "-q", "--no-deps", "--no-index", wheel)
    paths = here(python, "-c", "import sysconfig, json; print(json.dumps(sysconfig.get_paths()))")
    site = Path(json.loads(paths.stdout)["purelib"])
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "zz_herovm_test_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))

    ours_bin = Path(sys.executable).parent
    path = [str(venv / "bin")] + [
        p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != ours_bin
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(path)
    return Installed(wheel, venv, site, env)


def test_the_wheel_carries_herovm_data_and_marker(installed: Installed) -> None:
    """Every file under herovm/_data/ in the checkout is in the wheel, byte for byte, and py.typed too."""
    shipped = {}
    with zipfile.ZipFile(installed.wheel) as z:
        for info in z.infolist():
            shipped[info.filename] = z.read(info)
    data = [p for p in resources.DATA.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert data, "no data in the checkout?"
    for p in data:
        name = p.relative_to(CHECKOUT).as_posix()
        assert shipped.get(name) == p.read_bytes(), f"{name} is not in the wheel as it is in the checkout"
    assert "herovm/py.typed" in shipped
    assert not [n for n in shipped if "__pycache__" in n or n.endswith(".pyc")]
    entry_points = next(v for n, v in shipped.items() if n.endswith(".dist-info/entry_points.txt")).decode()
    assert "herovm = herovm.cli:main" in entry_points and "herovm = herovm.pytest_plugin" in entry_points


def test_the_installed_cli_works_outside_the_checkout(
    installed: Installed, image: images.Image, tmp_path: Path
) -> None:
    """--version, python -m herovm, doctor, script check and image ls from the installed wheel, in a
    directory that is not the checkout; the image id it computes is the checkout's."""
    where = json.loads(
        check(
            installed.python(
                "-c",
                "import json, herovm, herovm.resources as r, herovm.images as i\n"
                "from herovm.guest.registry import guest_registry\n"
                "guest_registry()  # puts the agent the wheel ships on sys.path\n"
                "import herovm_agent\n"
                "print(json.dumps({'herovm': herovm.__file__, 'agent': herovm_agent.__file__,"
                " 'data': str(r.DATA), 'id': i.image_id(i.load_recipe('default'))}))",
                cwd=tmp_path,
            )
        ).stdout
    )
    for key in ("herovm", "agent", "data"):
        assert Path(where[key]).is_relative_to(installed.site), f"{key} from {where[key]}, not the wheel"
    assert where["id"] == image.id == images.image_id(images.load_recipe("default"))

    version = check(installed.herovm("--version", cwd=tmp_path)).stdout.strip()
    assert version == herovm.__version__
    assert check(installed.python("-m", "herovm", "--version", cwd=tmp_path)).stdout.strip() == version

    doctor = check(installed.herovm("doctor", "--json", cwd=tmp_path))
    checks = {c["name"]: c for c in json.loads(doctor.stdout)}
    assert not [c for c in checks.values() if c["status"] == "fail"], doctor.stdout
    assert checks["image"]["status"] == "ok" and image.id in checks["image"]["detail"]

    script = tmp_path / "setup.hero"
    script.write_text("!!file.write path:/etc/motd content:'from the wheel'\n!!user.add name:agent\n")
    check(installed.herovm("script", "check", str(script), cwd=tmp_path))
    bad = tmp_path / "bad.hero"
    bad.write_text("!!file.nosuchaction path:/x\n")
    refused = check(installed.herovm("script", "check", str(bad), cwd=tmp_path), code=1)
    assert "unknown action 'file.nosuchaction'" in refused.stdout
    actions = check(installed.herovm("script", "actions", cwd=tmp_path)).stdout
    assert "file.write" in actions and "vm.create" in actions

    listed = json.loads(check(installed.herovm("image", "ls", "--json", cwd=tmp_path)).stdout)
    assert {"recipe": "default", "id": image.id} in [{k: r[k] for k in ("recipe", "id")} for r in listed]


def test_up_exec_down_from_the_installed_wheel(
    installed: Installed, image: images.Image, unique_name, tmp_path: Path
) -> None:
    """One real guest, booted by the installed herovm from the cached image (not rebuilt), with a bootstrap
    checked against the agent the wheel ships."""
    name = unique_name("wheel")
    script = tmp_path / "setup.hero"
    script.write_text("!!file.write path:/etc/motd content:'from the wheel'\n")
    before = {(i.recipe, i.id) for i in images.list_images()}
    try:
        up = check(
            installed.herovm("up", name, "--bootstrap", str(script), "--json", cwd=tmp_path, timeout=300)
        )
        assert json.loads(up.stdout)["image_id"] == image.id
        ex = check(installed.herovm("exec", name, "--", "cat", "/etc/motd", cwd=tmp_path, timeout=60))
        assert ex.stdout == "from the wheel"
        assert installed.herovm("exec", name, "--", "sh", "-c", "exit 7", cwd=tmp_path).returncode == 7
        check(installed.herovm("down", name, cwd=tmp_path, timeout=120))
    finally:
        with contextlib.suppress(Exception), Manager() as m:
            m.down(name)
    assert_nothing_left(name)
    assert {(i.recipe, i.id) for i in images.list_images()} == before, "the installed herovm built an image"


def test_the_installed_pytest_plugin(installed: Installed, image: images.Image, tmp_path: Path) -> None:
    """The herovm_vm fixture, from the wheel's pytest11 entry point, in a project that is not herovm's."""
    prefix = f"pw-{uuid.uuid4().hex[:6]}"
    (tmp_path / "test_project.py").write_text(
        "import herovm\n\n\n"
        "def test_in_a_real_vm(herovm_vm):\n"
        f"    assert herovm.__file__.startswith({str(installed.site)!r})\n"
        "    assert herovm_vm.exec(['true']).exit_code == 0\n"
    )
    try:
        r = installed.python(
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--herovm-name-prefix",
            prefix,
            cwd=tmp_path,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "1 passed" in r.stdout
    finally:
        with Manager() as m:
            for row in m.ls():
                if row["name"].startswith(prefix):
                    with contextlib.suppress(Exception):
                        m.down(row["name"])
