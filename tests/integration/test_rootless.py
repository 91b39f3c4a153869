"""herovm as an unprivileged user: a throwaway user this test creates (and removes, with every process it
ran) runs doctor, up, exec, cp both ways, ls and down through qemu:///session, with nothing copied by hand.
Its image comes from root's system-wide cache (/var/lib/herovm/images), which root builds once and every user
reads: the user builds nothing and copies nothing (building needs root: the test checks the user is told so).

The user runs the checkout's herovm with this machine's Python (/usr/bin/python3, which every user may run;
this environment's interpreter may live under /root), in a venv of its own whose .pth names the checkout and
this environment's site-packages (installing the dependencies again would compile libvirt-python)."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from second_host import end_processes_of

CHECKOUT = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = Path("/usr/bin/python3")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates a user: needs root")


def readable_by_others(path: Path) -> bool:
    """Whether a user who is not root can reach `path` (every directory on the way traversable)."""
    if not path.stat().st_mode & 0o004:
        return False
    return all(part.stat().st_mode & 0o001 for part in [*([path] if path.is_dir() else []), *path.parents])


@dataclass
class User:
    name: str
    home: Path
    python: Path

    def herovm(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {"HOME": str(self.home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        return subprocess.run(
            ["runuser", "-u", self.name, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()),
             str(self.python), "-m", "herovm", *args],
            capture_output=True, text=True, timeout=timeout, cwd=self.home,
        )  # fmt: skip


@pytest.fixture
def user(image) -> Iterator[User]:
    version = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True
    ).stdout.strip()
    if version != str(sys.version_info[:2]):
        pytest.skip(f"{SYSTEM_PYTHON} is Python {version}, this environment's is {sys.version_info[:2]}")
    site = Path(sysconfig.get_paths()["purelib"])
    if not (readable_by_others(CHECKOUT / "herovm" / "__init__.py") and readable_by_others(site)):
        pytest.skip("the checkout or this environment's site-packages is not readable by other users")
    # root's system-wide cache holds the image of these sources (the `image` fixture may have built it in
    # another HEROVM_HOME): build it there, as root would once (seconds when the root file system is cached)
    env = {k: v for k, v in os.environ.items() if k != "HEROVM_HOME"}
    built = subprocess.run(
        [sys.executable, "-m", "herovm", "image", "build"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stderr
    name = f"hvt{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
    try:
        entry = pwd.getpwnam(name)
        home = Path(entry.pw_dir)
        venv = home / "venv"
        subprocess.run(
            ["runuser", "-u", name, "--", SYSTEM_PYTHON, "-m", "venv", "--without-pip", venv], check=True
        )
        where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        purelib = subprocess.run(
            ["runuser", "-u", name, "--", venv / "bin/python", "-c", where],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        pth = Path(purelib) / "herovm-checkout.pth"
        pth.write_text(f"{CHECKOUT}\n{site}\n")
        os.chmod(pth, 0o644)
        yield User(name, home, venv / "bin/python")
    finally:
        end_processes_of(name)
        subprocess.run(["userdel", "--remove", name], capture_output=True)


def test_an_unprivileged_user_runs_vms_with_roots_shared_image(user: User) -> None:
    doctor = user.herovm("doctor")
    assert "(root's, shared with every user)" in doctor.stdout, doctor.stdout
    assert "libvirt: connected to qemu:///session" in doctor.stdout
    assert "[FAIL]" not in doctor.stdout, doctor.stdout
    built = user.herovm("image", "build", "--force")
    assert built.returncode == 6 and "only root can build images" in built.stderr
    assert "sudo herovm image build" in built.stderr
    started = time.monotonic()
    up = user.herovm("up", "box", "--net", "restricted")
    took = time.monotonic() - started
    assert up.returncode == 0, up.stderr
    vmdir = user.home / ".local/share/herovm/vms/box"
    assert vmdir.is_dir() and vmdir.stat().st_uid == pwd.getpwnam(user.name).pw_uid
    assert not (user.home / ".local/share/herovm/images/default").exists(), (
        "nothing copied into the user's cache"
    )
    exec_ = user.herovm("exec", "box", "--", "sh", "-c", "hostname; id -un")
    assert exec_.returncode == 0 and exec_.stdout.split() == ["box", "root"], exec_.stderr
    (user.home / "in.txt").write_text("from the user\n")
    os.chown(user.home / "in.txt", pwd.getpwnam(user.name).pw_uid, -1)
    assert user.herovm("cp", "in.txt", "box:/root/in.txt").returncode == 0
    assert user.herovm("exec", "box", "--", "cat", "/root/in.txt").stdout == "from the user\n"
    back = user.herovm("cp", "box:/root/in.txt", "out.txt")
    assert back.returncode == 0, back.stderr
    assert (user.home / "out.txt").read_text() == "from the user\n"
    assert (user.home / "out.txt").stat().st_uid == pwd.getpwnam(user.name).pw_uid
    assert "box" in user.herovm("ls").stdout
    assert user.herovm("down", "box").returncode == 0
    assert user.herovm("ls").stdout.startswith("no VMs")
    print(f"\nrootless up (image from root's shared cache, nothing built or copied): {took:.1f}s")
