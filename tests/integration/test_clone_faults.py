"""Templates, fork and snapshots under faults, with real guests: unknown names, clashes, a template whose
image or memory file is gone, truncated or another's, a disk that fills up during `snapshot create`, and
`herovm` SIGKILLed in the middle of `template create`, `snapshot create` and `fork`; after each, `gc` leaves
nothing half made and the source VM works.

The module runs in a HEROVM_HOME of its own (under /tmp, the image hard-linked into it), so removing the
image or a template file there touches nobody else's; whatever is left at the end is removed with the home.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from guests import HEROVM, assert_nothing_left, cli, home_domains, link_image

from herovm import disks, images, state
from herovm.backends.libvirt import PREFIX

PROGRESS = re.compile(r"^ *\d+\.\d\ds ")  # `  4.94s sealing ...`
BOOTSTRAP = "!!file.write path:/root/made content:'by the template'\n"


def down_everything(env: dict | None = None) -> None:
    r = cli("down", "--all", timeout=300, env=env)
    if r.returncode != 0:  # e.g. a VM another process still holds: once more after it let go
        time.sleep(2)
        cli("down", "--all", timeout=300, env=env)


@pytest.fixture(scope="module")
def home(image: images.Image) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="herovm-it-clones-", dir="/tmp"))
    os.chmod(path, 0o711)  # QEMU (libvirt-qemu) reaches the disks under it
    for cached in images.list_images():  # the session's image, and any other of this machine's (no build)
        link_image(cached, path)
    before = os.environ.get("HEROVM_HOME")
    os.environ["HEROVM_HOME"] = str(path)
    try:
        yield path
    finally:
        try:
            down_everything()
            cli("gc", timeout=300)
            for t in (path / "templates").glob("*"):
                cli("template", "rm", t.name, timeout=60)
            left = home_domains(path)
        finally:
            for name in home_domains(path):  # last resort: nothing of this home outlives the module
                with contextlib.suppress(libvirt.libvirtError):
                    conn = libvirt.open("qemu:///system")
                    dom = conn.lookupByName(PREFIX + name)
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.destroy()
                    dom.undefine()
                    conn.close()
            if before is None:
                os.environ.pop("HEROVM_HOME", None)
            else:
                os.environ["HEROVM_HOME"] = before
            shutil.rmtree(path, ignore_errors=True)
        assert left == {}, f"domains of the test's home left behind: {left}"


@pytest.fixture(scope="module")
def bootstrap(home: Path) -> Path:
    path = home / "made.hero"
    path.write_text(BOOTSTRAP)
    return path


@pytest.fixture(scope="module")
def template(home: Path, bootstrap: Path, run_id: str) -> str:
    """A template shared by the module's tests (512 MiB, no egress)."""
    name = f"it-{run_id}-tmpl"
    r = cli(*create_args(name, bootstrap))
    assert r.returncode == 0, r.stderr
    return name


@pytest.fixture
def made(home: Path) -> Iterator[list[str]]:
    """Names of VMs a test makes; each removed at teardown, pass or fail."""
    names: list[str] = []
    yield names
    for name in names:
        cli("down", name, "--force", timeout=120)


def create_args(name: str, bootstrap: Path, memory: str = "512MB") -> list[str]:
    return [
        "template",
        "create",
        name,
        "--bootstrap",
        str(bootstrap),
        "--net",
        "restricted",
        "--memory",
        memory,
    ]


def up_from(template: str, name: str, made: list[str]) -> None:
    made.append(name)
    r = cli("up", name, "--template", template, timeout=180)
    assert r.returncode == 0, r.stderr


def exec_out(name: str, command: str) -> str:
    r = cli("exec", name, "--", "sh", "-c", command, timeout=60)
    assert r.returncode == 0, (name, r.returncode, r.stderr)
    return r.stdout


def assert_one_line_error(r: subprocess.CompletedProcess, code: int, *words: str) -> None:
    """Exit `code`; stderr: progress lines, then one `herovm: error:` line (and maybe its hint), no
    traceback."""
    lines = [line for line in r.stderr.strip().splitlines() if not PROGRESS.match(line)]
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert lines and lines[0].startswith("herovm: error: "), r.stderr
    assert all(line.startswith("  hint: ") for line in lines[1:]), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def vm_names_in_ls() -> set[str]:
    r = cli("ls", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    return {row["name"] for row in json.loads(r.stdout)}


def template_names() -> set[str]:
    r = cli("template", "ls", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    return {row["name"] for row in json.loads(r.stdout)}


def assert_clean_home(home: Path, vms: set[str], tmpls: set[str]) -> None:
    """Only `vms` and `tmpls` exist, each whole: no partial template, snapshot or fork work, no builder VM,
    no layer that no disk lies on (after a `gc`: `down` leaves a fork's layer to it), and libvirt holds no
    other domain of this home."""
    assert cli("gc", timeout=180).returncode == 0
    assert vm_names_in_ls() == vms
    assert set(state.list_vm_dirs()) == vms
    assert set(home_domains(home)) == vms, home_domains(home)
    assert template_names() == tmpls
    assert sorted(p.name for p in (home / "templates").iterdir()) == sorted(tmpls)
    layers = home / "layers"
    if layers.exists():
        assert not list(layers.glob(".*")), list(layers.iterdir())
        used = set()
        tops = [p for n in vms for p in state.VMDir(n).path.glob("disk*.qcow2")]
        tops += [home / "templates" / t / "disk.qcow2" for t in tmpls]
        for top in tops:
            used.update(p.resolve() for p in disks.chain(top))
        assert {p.resolve() for p in layers.glob("*.qcow2")} <= used, "a layer no disk lies on"
    for n in vms:
        vmdir = state.VMDir(n)
        if vmdir.snapshots.exists():
            assert not list(vmdir.snapshots.glob(".*")), list(vmdir.snapshots.iterdir())


# --------------------------------------------------------------------------------------- unknowns, clashes


def test_unknown_template_and_unknown_snapshot_are_one_line_exit_3(home, template, unique_name, made):
    name = unique_name("unknown")
    r = cli("up", name, "--template", "nope")
    assert_one_line_error(r, 3, "no template nope")
    assert_nothing_left(name)
    assert_one_line_error(cli("template", "rm", "nope"), 3, "no template nope")

    up_from(template, name, made)
    for verb in ("restore", "rm"):
        assert_one_line_error(cli("snapshot", verb, name, "nope"), 3, "no snapshot nope")
    assert_one_line_error(cli("fork", unique_name("ghost"), unique_name("new")), 3, "not found")
    assert exec_out(name, "cat /root/made") == "by the template"
    assert_clean_home(home, {name}, {template})


def test_name_clashes_exit_4_and_leave_everything_as_it_was(home, template, bootstrap, unique_name, made):
    source, forked, other = unique_name("src"), unique_name("fork"), unique_name("other")
    up_from(template, source, made)
    exec_out(source, "echo source > /root/who")
    made.append(forked)
    r = cli("fork", source, forked)
    assert r.returncode == 0, r.stderr

    # a VM that exists and is not this template's: refused, not replaced
    assert_one_line_error(cli("up", forked, "--template", template), 4, f"VM {forked} already exists")
    t0 = time.monotonic()
    r = cli("template", "create", template, "--bootstrap", str(bootstrap), "--net", "restricted")
    assert_one_line_error(r, 4, f"template {template} already exists")
    assert time.monotonic() - t0 < 10, "refused before a VM was booted"
    # fork onto an existing VM, alone or among new names: nothing made, the source runs on
    made.append(other)
    assert_one_line_error(cli("fork", source, forked), 4, f"VM {forked} already exists")
    assert_one_line_error(cli("fork", source, other, forked), 4, f"VM {forked} already exists")
    assert_nothing_left(other)
    assert exec_out(source, "cat /root/who") == "source\n"
    assert exec_out(forked, "cat /root/who; hostname") == f"source\n{forked}\n"
    assert_clean_home(home, {source, forked}, {template})


# ---------------------------------------------------------------------------------- damaged templates


def test_a_template_whose_image_was_removed_is_refused_and_leaves_nothing(home, template, image, unique_name):
    name = unique_name("noimage")
    r = cli("image", "rm", image.recipe, image.id)  # herovm will not remove an image a template lies on
    assert_one_line_error(r, 4, f"image {image.recipe}/{image.id} is in use", f"template {template}")
    shutil.rmtree(home / "images" / image.recipe / image.id)  # so it goes behind herovm's back
    try:
        r = cli("up", name, "--template", template)
        assert_one_line_error(r, 3, f"template {template}", f"{image.recipe}/{image.id}", "gone")
        assert_nothing_left(name)
    finally:
        shutil.rmtree(home / "images" / image.recipe / image.id, ignore_errors=True)
        link_image(image, home)
    assert_clean_home(home, set(), {template})


def test_a_truncated_or_replaced_template_memory_is_refused_and_nothing_starts(
    home, template, bootstrap, unique_name, made, run_id
):
    other = f"it-{run_id}-tmpl768"  # another template, of another memory size
    r = cli(*create_args(other, bootstrap, "768MB"))
    assert r.returncode == 0, r.stderr
    # its memory: memory.save (libvirt's save image), or memory.ram beside device.state (a shared-memory
    # template's: docs/templates.md)
    file = next(f for f in ("memory.ram", "memory.save") if (home / "templates" / template / f).exists())
    memory = home / "templates" / template / file
    kept = home / f"{file}.{run_id}"
    os.link(memory, kept)
    try:
        for damage in ("truncated", "replaced"):
            memory.unlink()
            source = kept if damage == "truncated" else home / "templates" / other / file
            subprocess.run(["cp", "--sparse=always", str(source), str(memory)], check=True)  # 1 GiB, sparse
            if damage == "truncated":
                os.truncate(memory, kept.stat().st_size // 2)
            name = unique_name(damage)
            r = cli("up", name, "--template", template)
            assert_one_line_error(r, 255, f"template {template} is damaged", file)
            assert_nothing_left(name)
    finally:
        memory.unlink(missing_ok=True)
        os.link(kept, memory)
        kept.unlink()
    cli("template", "rm", other)
    up_from(template, unique_name("whole"), made)  # whole again: it works, so the refusals were the damage
    assert_clean_home(home, set(made), {template})


# --------------------------------------------------------------------------------------------- full disk


@pytest.fixture
def small_home(home: Path) -> Iterator[dict]:
    """A HEROVM_HOME on a 48 MiB tmpfs: a 512 MiB guest's memory (~110 MB) does not fit. Its images are
    the module home's."""
    path = Path(tempfile.mkdtemp(prefix="herovm-it-small-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0711", "tmpfs", str(path)], check=True)
    env = {**os.environ, "HEROVM_HOME": str(path)}
    try:
        (path / "images").symlink_to(home / "images")
        yield env
    finally:
        down_everything(env)
        left = home_domains(path)
        subprocess.run(["umount", "-l", str(path)], check=False)
        os.rmdir(path)
        assert left == {}, left


def test_a_disk_filling_up_during_snapshot_create_leaves_the_vm_running_and_no_snapshot(
    small_home, unique_name, run_id
):
    env = small_home
    home = Path(env["HEROVM_HOME"])
    name, forked = unique_name("full"), unique_name("fullfork")
    r = cli("up", name, "--net", "restricted", "--memory", "512MB", env=env)
    assert r.returncode == 0, r.stderr
    assert cli("exec", name, "--", "sh", "-c", "echo kept > /root/file", env=env).returncode == 0

    def vm_files() -> list[str]:
        return sorted(p.name for p in (home / "vms" / name).glob("disk*.qcow2"))

    disks_before = vm_files()
    r = cli("snapshot", "create", name, "s1", env=env)
    assert_one_line_error(r, 255, "No space left on device")
    assert cli("snapshot", "ls", name, "--json", env=env).stdout.strip() == "[]"
    snaps = home / "vms" / name / "snapshots"
    assert not snaps.exists() or list(snaps.iterdir()) == [], "no partial snapshot"
    assert vm_files() == disks_before, "no overlay left from the failed snapshot"

    r = cli("fork", name, forked, env=env)  # the fork's snapshot fails the same way
    assert r.returncode != 0 and "No space left on device" in r.stderr, r.stderr
    assert not list((home / "layers").iterdir()), "no fork work or layer left"
    assert not (home / "vms" / forked).exists()

    r = cli("exec", name, "--", "sh", "-c", "cat /root/file; echo more >> /root/file", env=env)
    assert r.returncode == 0 and r.stdout == "kept\n", r
    assert home_domains(home) == {name: "running"}
    r = cli("snapshot", "create", name, "s1", env=env)  # still no room: the same clean failure again
    assert_one_line_error(r, 255, "No space left on device")
    assert vm_files() == disks_before
    assert cli("gc", env=env).returncode == 0
    assert exec_out_env(name, env) == "kept\nmore\n"


def exec_out_env(name: str, env: dict) -> str:
    r = cli("exec", name, "--", "cat", "/root/file", env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


# ---------------------------------------------------------------------------------------- killed midway


def run_until(args: list[str], marker: str | None, after_s: float = 0.0, limit_s: float = 120) -> str:
    """Start `herovm ARGS`, SIGKILL it `after_s` after a stderr line containing `marker` appears (or
    `after_s` after its start, with no marker). Returns its stderr up to the kill."""
    proc = subprocess.Popen([*HEROVM, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    hit = threading.Event()

    def read() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            seen.append(line)
            if marker is not None and marker in line:
                hit.set()
        hit.set()  # it ended before the marker: the assertion below says so

    threading.Thread(target=read, daemon=True).start()
    try:
        if marker is not None:
            assert hit.wait(limit_s), f"no {marker!r} within {limit_s}s: {''.join(seen)}"
        time.sleep(after_s)
        assert proc.poll() is None, f"it ended before the kill: {''.join(seen)}"
    finally:
        proc.kill()
        proc.wait()
    return "".join(seen)


def gc_after_kill() -> str:
    time.sleep(1)  # libvirtd finishes a job the killed process asked for
    r = cli("gc", timeout=180)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize(
    "marker,after_s",
    [(None, 1.5), ("starting", 1.0), ("sealing", 0.0), ("saving", 0.0), ("saving", 0.5)],
)
def test_template_create_killed_midway_then_gc_leaves_nothing(home, bootstrap, run_id, marker, after_s):
    name = f"it-{run_id}-killed"
    vms_before = set(state.list_vm_dirs())
    tmpls_before = template_names()
    args = create_args(name, bootstrap)
    said = run_until(args, marker, after_s)
    out = gc_after_kill()
    assert f"partial template {name}" in out or "template create that did not finish" in out, (said, out)
    assert not (home / "templates" / f".{name}.partial").exists()
    assert_clean_home(home, vms_before, tmpls_before)
    assert not [n for n in home_domains(home) if n.startswith("tmpl-")]


def test_a_template_create_killed_while_saving_leaves_its_name_free(home, bootstrap, run_id):
    name = f"it-{run_id}-again"
    args = create_args(name, bootstrap)
    run_until(args, "saving", 0.01)
    gc_after_kill()
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert name in template_names()
    assert cli("template", "rm", name).returncode == 0


@pytest.mark.parametrize("after_s", [0.0, 0.05, 0.15])  # it takes ~0.3 s
def test_snapshot_create_killed_midway_then_gc_leaves_the_vm_whole(
    home, template, unique_name, made, after_s
):
    name = unique_name("killsnap")
    up_from(template, name, made)
    exec_out(name, "echo kept > /root/file")
    run_until(["snapshot", "create", name, "k1"], "snapshotting", after_s)
    gc_after_kill()
    assert exec_out(name, "cat /root/file") == "kept\n"
    assert json.loads(cli("snapshot", "ls", name, "--json").stdout) == []
    vmdir = state.VMDir(name)
    chain = {p.resolve() for p in disks.chain(vmdir.path / _current_disk(name))}
    assert {p.resolve() for p in vmdir.path.glob("disk*.qcow2")} <= chain, "an overlay nothing needs"
    assert_clean_home(home, {name}, {template})
    r = cli("snapshot", "create", name, "k1")
    assert r.returncode == 0, r.stderr


def _current_disk(name: str) -> str:
    conn = libvirt.open("qemu:///system")
    try:
        xml = conn.lookupByName(PREFIX + name).XMLDesc(0)
    finally:
        conn.close()
    start = xml.index("<source file='", xml.index("<disk type='file' device='disk'>")) + len("<source file='")
    return Path(xml[start : xml.index("'", start)]).name


@pytest.mark.parametrize(
    "marker,after_s",
    [("snapshotting", 0.0), ("snapshotting", 0.5), ("defining", 0.0), ("restoring", 0.0), ("restoring", 0.4)],
)
def test_fork_killed_midway_then_gc_leaves_the_source_whole_and_no_clone(
    home, template, unique_name, made, marker, after_s
):
    source, clone = unique_name("forksrc"), unique_name("forkkill")
    up_from(template, source, made)
    made.append(clone)
    exec_out(source, "echo kept > /root/file")
    said = run_until(["fork", source, clone], marker, after_s)
    out = gc_after_kill()
    assert exec_out(source, "cat /root/file") == "kept\n"
    assert_clean_home(home, {source}, {template})
    assert not (home / "vms" / clone).exists(), (said, out)
    r = cli("fork", source, clone)  # the name and the source serve a fork again
    assert r.returncode == 0, r.stderr
    assert exec_out(clone, "cat /root/file; hostname") == f"kept\n{clone}\n"


@pytest.mark.parametrize("marker,after_s", [("defining", 0.0), ("restoring", 0.0), ("restoring", 0.4)])
def test_up_from_a_template_killed_midway_then_gc_leaves_no_clone(
    home, template, unique_name, made, marker, after_s
):
    name = unique_name("upkill")
    made.append(name)
    said = run_until(["up", name, "--template", template], marker, after_s)
    out = gc_after_kill()
    assert_clean_home(home, set(), {template})
    assert_nothing_left(name)
    assert name in out, (said, out)  # gc said what it removed of it
    up_from(template, name, made)  # the name serves again
    assert exec_out(name, "cat /root/made; hostname") == f"by the template{name}\n"
