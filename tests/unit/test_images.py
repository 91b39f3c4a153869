"""herovm.images without building an image: the cpio writer, apt sources, recipes, ids and the cache."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from herovm import images, resources, state
from herovm.errors import ImageError, InvalidInput, NotFound
from herovm.progress import Progress
from herovm.protocol import Kind, Stage
from herovm.protocol_host import console_event

CPIO = shutil.which("cpio")
needs_cpio = pytest.mark.skipif(CPIO is None, reason="cpio is not installed")


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "herovm-home"
    monkeypatch.setenv("HEROVM_HOME", str(h))
    monkeypatch.delenv("HEROVM_APT_MIRROR", raising=False)
    return h


# ------------------------------------------------------------------------------------------ newc cpio

ENTRIES = [
    ("dev", 0o40755, b""),
    ("bin", 0o40700, b""),
    ("init", 0o100755, b"#!/bin/sh\necho hi\n"),
    ("modules.order", 0o100644, b"a\nb\n"),
    ("bin/busybox", 0o100755, bytes(range(256)) * 41 + b"odd"),  # not a multiple of 4
    ("empty", 0o100600, b""),
    ("x" * 101, 0o100644, b"long name"),  # name length + header crosses a 4-byte boundary oddly
]


def test_newc_header_and_alignment() -> None:
    data = images.newc_archive(ENTRIES)
    assert data.startswith(b"070701")
    assert len(data) % 4 == 0
    assert b"TRAILER!!!\0" in data[-128:]


@needs_cpio
def test_newc_lists_with_cpio() -> None:
    data = images.newc_archive(ENTRIES)
    out = subprocess.run([CPIO, "-t", "--quiet"], input=data, capture_output=True, check=True)
    assert out.stdout.decode().split() == [name for name, _, _ in ENTRIES]
    assert out.stderr == b""


@needs_cpio
def test_newc_extracts_identical_bytes_and_modes(tmp_path: Path) -> None:
    data = images.newc_archive(ENTRIES)
    dest = tmp_path / "x"
    dest.mkdir()
    old = os.umask(0)
    try:
        subprocess.run(
            [CPIO, "-i", "-d", "--quiet", "--no-absolute-filenames"],
            input=data,
            cwd=dest,
            capture_output=True,
            check=True,
        )
    finally:
        os.umask(old)
    for name, mode, content in ENTRIES:
        path = dest / name
        st = path.lstat()
        assert st.st_mode == mode, name
        if stat.S_ISREG(mode):
            assert path.read_bytes() == content, name
    assert sorted(p.name for p in dest.iterdir()) == sorted(n for n, _, _ in ENTRIES if "/" not in n)


def test_newc_empty_archive_is_just_the_trailer() -> None:
    data = images.newc_archive([])
    assert data.count(b"070701") == 1
    assert b"TRAILER!!!" in data


# --------------------------------------------------------------------------------------- apt mirror


def test_apt_mirror_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEROVM_APT_MIRROR", "http://127.0.0.1:9/debian")
    assert images.host_apt_mirror("bookworm") == "http://127.0.0.1:9/debian"
    assert images.host_apt_mirror("no-such-suite") == "http://127.0.0.1:9/debian"


def test_apt_mirror_from_this_hosts_config() -> None:
    if (
        not any(Path("/etc/apt/sources.list.d").glob("*.sources"))
        and not Path("/etc/apt/sources.list").exists()
    ):
        pytest.skip("no apt configuration on this host")
    try:
        mirror = images.host_apt_mirror("bookworm")
    except ImageError:
        pytest.skip("this host's apt has no bookworm source")
    assert mirror.startswith(("http://", "https://", "file:/", "mirror+"))
    with pytest.raises(ImageError) as info:
        images.host_apt_mirror("no-such-suite-xyz")
    assert "HEROVM_APT_MIRROR" in (info.value.hint or "")


@pytest.fixture
def apt_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake /etc/apt. host_apt_mirror reads /etc/apt itself (no parameter for it), so only its Path
    constructor is redirected: paths under /etc/apt map into this directory, the files are real."""
    root = tmp_path / "aptroot"
    (root / "etc/apt/sources.list.d").mkdir(parents=True)
    real_path = Path

    def path(p: str | os.PathLike = ".", *rest: str) -> Path:
        s = str(p)
        if s.startswith("/etc/apt"):
            return real_path(str(root) + s, *rest)
        return real_path(p, *rest)

    monkeypatch.setattr(images, "Path", path)
    return root


def test_apt_deb822(apt_root: Path) -> None:
    (apt_root / "etc/apt/sources.list.d/debian.sources").write_text(
        "Types: deb\n"
        "# a comment line\n"
        "URIs: http://127.0.0.1:9/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb deb-src\n"
        "URIs: http://127.0.0.1:9/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main\n"
    )
    assert images.host_apt_mirror("bookworm") == "http://127.0.0.1:9/debian"
    assert images.host_apt_mirror("bookworm-updates") == "http://127.0.0.1:9/debian"
    assert images.host_apt_mirror("bookworm-security") == "http://127.0.0.1:9/debian-security"
    with pytest.raises(ImageError, match="no apt source for Debian trixie"):
        images.host_apt_mirror("trixie")


def test_apt_deb822_skips_disabled_and_src_only(apt_root: Path) -> None:
    (apt_root / "etc/apt/sources.list.d/a.sources").write_text(
        "Types: deb\nURIs: http://127.0.0.1:9/disabled\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb-src\nURIs: http://127.0.0.1:9/src\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://127.0.0.1:9/good\nSuites: bookworm\nEnabled: yes\n"
    )
    assert images.host_apt_mirror("bookworm") == "http://127.0.0.1:9/good"


def test_apt_deb822_ignores_files_with_other_suffixes(apt_root: Path) -> None:
    (apt_root / "etc/apt/sources.list.d/x.sources.disabled").write_text(
        "Types: deb\nURIs: http://127.0.0.1:9/nope\nSuites: bookworm\n"
    )
    with pytest.raises(ImageError):
        images.host_apt_mirror("bookworm")


def test_apt_one_line_format(apt_root: Path) -> None:
    (apt_root / "etc/apt/sources.list").write_text(
        "# deb http://127.0.0.1:9/commented bookworm main\n"
        "deb-src http://127.0.0.1:9/src bookworm main\n"
        "\n"
        "deb http://127.0.0.1:9/debian bookworm main contrib\n"
        "deb [arch=amd64] http://127.0.0.1:9/debian-security bookworm-security main\n"
    )
    (apt_root / "etc/apt/sources.list.d/extra.list").write_text("deb http://127.0.0.1:9/extra trixie main\n")
    assert images.host_apt_mirror("bookworm") == "http://127.0.0.1:9/debian"
    assert images.host_apt_mirror("bookworm-security") == "http://127.0.0.1:9/debian-security"
    assert images.host_apt_mirror("trixie") == "http://127.0.0.1:9/extra"


def test_apt_deb822_wins_over_one_line(apt_root: Path) -> None:
    (apt_root / "etc/apt/sources.list").write_text("deb http://127.0.0.1:9/oneline bookworm main\n")
    (apt_root / "etc/apt/sources.list.d/d.sources").write_text(
        "Types: deb\nURIs: http://127.0.0.1:9/deb822\nSuites: bookworm\n"
    )
    assert images.host_apt_mirror("bookworm") == "http://127.0.0.1:9/deb822"


def test_apt_one_line_options_with_several_entries(apt_root: Path) -> None:
    (apt_root / "etc/apt/sources.list").write_text(
        "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://127.0.0.1:9/debian bookworm main\n"
    )
    assert images.host_apt_mirror("bookworm") == "http://127.0.0.1:9/debian"


# ------------------------------------------------------------------------------------------- recipes


def test_default_recipe_loads() -> None:
    assert "default" in images.recipe_names()
    recipe = images.load_recipe("default")
    assert recipe["suite"]
    assert "linux-image-cloud-amd64" in recipe["packages"]
    assert "console=ttyS0" in recipe["cmdline"]


def test_unknown_recipe_is_not_found_with_a_hint() -> None:
    with pytest.raises(NotFound) as info:
        images.load_recipe("no-such-recipe")
    assert "no-such-recipe" in info.value.message
    assert "default" in (info.value.hint or "")
    assert info.value.exit_code == 3


def test_recipes_come_from_the_recipes_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    monkeypatch.setattr(resources, "RECIPES", recipes)
    assert images.recipe_names() == []
    with pytest.raises(NotFound) as info:
        images.load_recipe("nope")
    assert info.value.hint == "recipes: none"
    (recipes / "small.toml").write_text('suite = "bookworm"\npackages = ["a"]\n')
    assert images.recipe_names() == ["small"]
    assert images.load_recipe("small") == {"suite": "bookworm", "packages": ["a"]}


def test_recipe_name_cannot_escape_the_recipes_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (tmp_path / "outside.toml").write_text('suite = "x"\n')
    monkeypatch.setattr(resources, "RECIPES", recipes)
    with pytest.raises((NotFound, InvalidInput)):
        images.load_recipe("../outside")


def test_image_remove_cannot_escape_the_image_cache(home: Path) -> None:
    victim = state.vms_dir()
    (victim / "keep").mkdir()
    state.images_dir()
    with contextlib.suppress(NotFound, InvalidInput):
        images.remove("../vms")
    assert (victim / "keep").is_dir()


def test_assembly_fields_change_the_image_but_not_the_root_file_system() -> None:
    """root_size and cmdline are applied when the image is assembled: no new mmdebstrap run for them."""
    recipe = images.load_recipe("default")
    for change in ({"root_size": "12GB"}, {"cmdline": recipe["cmdline"] + " debug"}):
        assert images.recipe_key({**recipe, **change}) == images.recipe_key(recipe)
        assert images.image_id({**recipe, **change}) != images.image_id(recipe)
    more = {**recipe, "packages": [*recipe["packages"], "tree"]}
    assert images.recipe_key(more) != images.recipe_key(recipe)


def test_recipe_key_is_stable_and_order_independent() -> None:
    a = {"suite": "bookworm", "packages": ["a", "b"]}
    b = {"packages": ["a", "b"], "suite": "bookworm"}
    assert images.recipe_key(a) == images.recipe_key(b)
    assert images.recipe_key(a) != images.recipe_key({**a, "packages": ["a"]})


def copy_sources(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Copy every guest source (agent, initramfs, heroscript, the contract) under a new ROOT, at the same
    places relative to it, and point resources at the copy: what an installed wheel is to the checkout."""
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("AGENT", "INITRAMFS", "HEROSCRIPT", "PROTOCOL"):
        source = getattr(resources, name)
        copy = root / source.relative_to(resources.ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, copy, ignore=ignore)
        else:
            shutil.copy2(source, copy)
        monkeypatch.setattr(resources, name, copy)
    monkeypatch.setattr(resources, "ROOT", root)
    return root


@pytest.fixture
def tmp_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return copy_sources(tmp_path / "src", monkeypatch)


def test_image_id_is_the_same_for_a_faithful_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = images.load_recipe("default")
    original = images.image_id(recipe)
    copy_sources(tmp_path / "src", monkeypatch)
    assert images.image_id(recipe) == original


def test_image_id_changes_with_the_agent(tmp_sources: Path) -> None:
    recipe = images.load_recipe("default")
    before = images.image_id(recipe)
    assert images.image_id(recipe) == before
    actions = tmp_sources / "herovm/_data/agent/herovm_agent/actions.py"
    actions.write_text(actions.read_text() + "\n# changed\n")
    after = images.image_id(recipe)
    assert after != before
    assert len(after) == 12


def test_image_id_changes_with_initramfs_heroscript_and_protocol(tmp_sources: Path) -> None:
    recipe = images.load_recipe("default")
    ids = {images.image_id(recipe)}
    (tmp_sources / "herovm/_data/initramfs/init").write_text("#!/bin/sh\n")
    ids.add(images.image_id(recipe))
    (tmp_sources / "herovm/heroscript/new_module.py").write_text("X = 1\n")
    ids.add(images.image_id(recipe))
    (tmp_sources / "herovm/_data/agent/sshd_config").write_text("PasswordAuthentication yes\n")  # not Python
    ids.add(images.image_id(recipe))
    (tmp_sources / "herovm/protocol.py").write_text("# the contract, changed\n")
    ids.add(images.image_id(recipe))
    assert len(ids) == 5


def test_image_id_changes_with_the_assembly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """How the image is put together (herovm/images.py) is part of it: a cached image made by older
    assembly code must not be taken for the new one."""
    recipe = images.load_recipe("default")
    before = images.image_id(recipe)
    changed = tmp_path / "images.py"
    changed.write_bytes(Path(images.__file__).read_bytes() + b"\n# assembled differently\n")
    monkeypatch.setattr(images, "__file__", str(changed))
    assert images.image_id(recipe) != before


def test_image_id_ignores_pycache(tmp_sources: Path) -> None:
    recipe = images.load_recipe("default")
    before = images.image_id(recipe)
    cache = tmp_sources / "herovm/_data/agent/herovm_agent/__pycache__"
    cache.mkdir()
    (cache / "junk.py").write_text("x = 1\n")
    assert images.image_id(recipe) == before


def test_image_id_changes_with_the_recipe() -> None:
    recipe = images.load_recipe("default")
    assert images.image_id(recipe) != images.image_id({**recipe, "root_size": "3GB"})


# --------------------------------------------------------------------------------------------- cache


def make_image(recipe: str = "default", iid: str | None = None) -> Path:
    iid = iid or images.image_id(images.load_recipe(recipe))
    path = state.images_dir() / recipe / iid
    path.mkdir(parents=True)
    for name in ("vmlinuz", "initrd.img", "base.qcow2"):
        (path / name).write_bytes(b"x" * 10)
    manifest = {
        "name": recipe,
        "id": iid,
        "cmdline": "console=ttyS0",
        "kernel_version": "6.1",
        "built": "2025-01-01T00:00:00+00:00",
        "files": {n: {"bytes": 10} for n in ("vmlinuz", "initrd.img", "base.qcow2")},
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_find_nothing_in_an_empty_home() -> None:
    assert images.find("default") is None
    assert images.list_images() == []


def test_find_a_cached_image() -> None:
    path = make_image()
    image = images.find("default")
    assert image is not None
    assert image.path == path
    assert image.id == path.name
    assert image.kernel == path / "vmlinuz"
    assert image.initrd == path / "initrd.img"
    assert image.disk == path / "base.qcow2"
    assert image.cmdline == "console=ttyS0"
    assert images.ensure("default") == image  # found: nothing built
    assert stat.S_IMODE(state.images_dir().stat().st_mode) == 0o755


@pytest.mark.parametrize("missing", ["vmlinuz", "initrd.img", "base.qcow2", "manifest.json"])
def test_find_none_when_a_file_is_missing(missing: str) -> None:
    path = make_image()
    (path / missing).unlink()
    assert images.find("default") is None
    assert images.list_images() == []


def test_find_none_for_a_broken_manifest() -> None:
    path = make_image()
    (path / "manifest.json").write_text("{broken")
    assert images.find("default") is None


def test_find_ignores_a_stale_image() -> None:
    make_image(iid="000000000000")  # built from other agent sources
    assert images.find("default") is None
    assert [i.id for i in images.list_images()] == ["000000000000"]


def test_list_images_skips_hidden_dirs() -> None:
    make_image()
    (state.images_dir() / ".rootfs").mkdir()
    (state.images_dir() / ".rootfs" / "junk").mkdir()
    assert [i.recipe for i in images.list_images()] == ["default"]


def test_remove_one_then_all() -> None:
    a = make_image(iid="aaaaaaaaaaaa")
    b = make_image(iid="bbbbbbbbbbbb")
    assert images.remove("default", "aaaaaaaaaaaa") == [a]
    assert not a.exists() and b.exists()
    assert images.remove("default") == [state.images_dir() / "default"]
    assert not b.exists()
    with pytest.raises(NotFound) as info:
        images.remove("default")
    assert "herovm image ls" in (info.value.hint or "")
    with pytest.raises(NotFound, match="default/cccccccccccc"):
        images.remove("default", "cccccccccccc")
    with pytest.raises(InvalidInput, match="invalid image id"):
        images.remove("default", "../../vms")


# ------------------------------------------------------------------------------------ build helpers


def test_run_reports_a_missing_tool() -> None:
    with pytest.raises(ImageError, match="no-such-tool-xyz is not installed") as info:
        images._run(["no-such-tool-xyz"], "testing")
    assert info.value.hint == "run scripts/setup"


def test_run_reports_the_tail_of_a_failure() -> None:
    script = "for i in 1 2 3 4 5 6 7; do echo line$i >&2; done; exit 3"
    with pytest.raises(ImageError) as info:
        images._run(["sh", "-c", script], "the step")
    assert info.value.message == "the step failed: line3 | line4 | line5 | line6 | line7"


def test_build_rootfs_reuses_a_cached_tar(home: Path) -> None:
    recipe = images.load_recipe("default")
    cache = home / "images" / ".rootfs"
    cache.mkdir(parents=True)
    tar = cache / f"default-{images.recipe_key(recipe)}.tar"
    tar.write_bytes(b"")
    seen: list[Progress] = []
    assert images.build_rootfs("default", recipe, seen.append) == tar
    assert len(seen) == 1 and "reusing" in seen[0].message


def test_build_initramfs_from_a_fake_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    order = (resources.INITRAMFS / "modules.order").read_text().split()
    moddir = root / "usr/lib/modules/6.1.0-test/kernel/drivers"
    moddir.mkdir(parents=True)
    for m in order:
        (moddir / f"{m}.ko").write_bytes(m.encode() + SIGNATURE)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/busybox").write_bytes(b"\x7fELF busybox")
    out = tmp_path / "initrd.img"
    images._build_initramfs(root, "6.1.0-test", out)
    data = out.read_bytes()
    assert data.startswith(b"070701")
    for m in order:
        assert f"modules/{m}.ko".encode() in data
    assert images.MODULE_SIGNATURE_MARKER not in data
    if CPIO:
        listed = subprocess.run([CPIO, "-t", "--quiet"], input=data, capture_output=True, check=True)
        names = listed.stdout.decode().split()
        assert names[:10] == [
            "dev",
            "proc",
            "sys",
            "bin",
            "modules",
            "newroot",
            "init",
            "protocol.sh",
            "modules.order",
            "bin/busybox",
        ]
        assert names[10:15] == [f"bin/{a}" for a in images.INITRAMFS_APPLETS]
        assert names[15:] == [f"modules/{m}.ko" for m in order]
        unpacked = tmp_path / "unpacked"
        unpacked.mkdir()
        subprocess.run([CPIO, "-id", "--quiet"], input=data, cwd=unpacked, check=True)
        assert all(os.readlink(unpacked / "bin" / a) == "busybox" for a in images.INITRAMFS_APPLETS)
        assert (unpacked / "modules/virtio_net.ko").read_bytes() == b"virtio_net"
        assert (unpacked / "protocol.sh").read_bytes() == images.initramfs_protocol()


def test_the_initramfs_failure_line_is_a_protocol_event(tmp_path: Path) -> None:
    """init's fail(), run by a real shell with the protocol.sh the image gets: the host decodes its line."""
    (tmp_path / "protocol.sh").write_bytes(images.initramfs_protocol())
    script = (resources.INITRAMFS / "init").read_text()
    assert re.search(r"^\. /protocol\.sh\b", script, re.M)
    fail = re.search(r"^fail\(\) \{\n    (echo .*) > /dev/console$", script, re.M)
    assert fail is not None
    why = "root device /dev/vda did not appear"
    out = subprocess.run(
        ["sh", "-c", f". ./protocol.sh; {fail.group(1)}", "sh", why],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert console_event(out) == {
        "event": Kind.FAILED,
        "seq": 0,
        "t": 0,
        "stage": Stage.INITRAMFS,
        "error": why,
    }


# What a signed module ends with: the PKCS#7 signature, struct module_signature (its last 4 bytes the
# signature's length, big-endian), the marker.
SIGNATURE = b"S" * 300 + bytes(8) + (300).to_bytes(4, "big") + b"~Module signature appended~\n"


def test_modules_lose_their_signature_and_nothing_else() -> None:
    assert images.without_signature(b"\x7fELF module" + SIGNATURE) == b"\x7fELF module"
    assert images.without_signature(b"\x7fELF unsigned") == b"\x7fELF unsigned"


def test_every_applet_the_initramfs_runs_is_linked() -> None:
    """init calls applets by bare name; each must resolve in a busybox without a standalone shell too."""
    script = (resources.INITRAMFS / "init").read_text()
    code = "\n".join(line.split("#")[0] for line in script.splitlines()[1:])
    for applet in images.INITRAMFS_APPLETS:
        assert re.search(rf"(^|[\s;(]){applet} ", code, re.M), f"{applet} is linked but init never runs it"
    assert "/bin/busybox" not in code.replace("exec /bin/busybox", "")


def test_build_initramfs_names_missing_modules(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/lib/modules/6.1.0-test").mkdir(parents=True)
    with pytest.raises(ImageError, match="kernel 6.1.0-test lacks modules: virtio"):
        images._build_initramfs(root, "6.1.0-test", tmp_path / "initrd.img")


def test_install_agent_into_a_fake_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/ssh/sshd_config.d").mkdir(parents=True)
    images._install_agent(root)
    base = root / "usr/lib/herovm"
    assert (base / "agent.py").read_bytes() == (resources.AGENT / "agent.py").read_bytes()
    assert (base / "python/herovm_agent/actions.py").is_file()
    assert (base / "python/herovm/heroscript/parser.py").is_file()
    assert (base / "python/herovm/__init__.py").is_file()
    assert (base / "python/herovm/protocol.py").read_bytes() == resources.PROTOCOL.read_bytes()
    assert list((base / "python/herovm/__pycache__").glob("protocol.*.pyc"))
    assert list((base / "python/herovm_agent/__pycache__").glob("actions.*.pyc"))
    conf = root / "etc/ssh/sshd_config.d/herovm.conf"
    assert conf.read_text() == (resources.AGENT / "sshd_config").read_text()
    assert stat.S_IMODE(conf.stat().st_mode) == 0o644
