"""Build and cache guest images from the recipes in `herovm/_data/images/*.toml`.

An image is a directory `images/<recipe>/<id>/` holding `vmlinuz`, `initrd.img` (ours: busybox and a few
modules), `base.qcow2` (ext4 root with the agent) and `manifest.json`. The id hashes the recipe and the
agent sources, so a changed agent yields a new image while VMs keep the base their overlay was made on.
Building is two cached steps: the Debian root file system (mmdebstrap, minutes, reused while the recipe is
unchanged) and the assembly (agent, initramfs, disk: seconds).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import py_compile
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import resources, state
from .errors import Busy, ImageError, InvalidInput, NotFound
from .heroscript import parse_size
from .progress import Progress, Reporter, silent
from .protocol import CONSOLE_PREFIX, Kind, Stage
from .resources import check_recipe_name, recipe_names


def _agent_version() -> str:
    """The agent's VERSION, read from its package: one number to bump, on the guest side."""
    text = (resources.AGENT / "herovm_agent" / "__init__.py").read_text()
    match = re.search(r'^VERSION = "([^"]+)"$', text, re.MULTILINE)
    if match is None:
        raise ImageError(f"no VERSION in {resources.AGENT / 'herovm_agent' / '__init__.py'}")
    return match.group(1)


AGENT_VERSION = _agent_version()
# Bump when the way a root file system is made changes (mmdebstrap options, hooks): it is part of the key.
ROOTFS_FORMAT = 3


@dataclass(frozen=True)
class Image:
    recipe: str
    id: str
    path: Path
    manifest: dict

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"

    @property
    def disk(self) -> Path:
        return self.path / "base.qcow2"

    @property
    def cmdline(self) -> str:
        return self.manifest["cmdline"]


IMAGE_ID_RE = re.compile(r"^[0-9a-f]{12}$")


def load_recipe(name: str) -> dict:
    path = resources.RECIPES / f"{check_recipe_name(name)}.toml"
    if not path.is_file():
        raise NotFound(f"no image recipe {name!r}", hint=f"recipes: {', '.join(recipe_names()) or 'none'}")
    return tomllib.loads(path.read_text())


def _hash_files(paths: Iterable[Path], h: hashlib._Hash) -> None:
    for p in sorted(paths):
        h.update(str(p.relative_to(resources.ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")


def _guest_sources() -> list[Path]:
    """Every host file that ends up in the image besides Debian's packages."""
    files = [p for p in resources.AGENT.rglob("*") if p.is_file()]
    files += [p for p in resources.HEROSCRIPT.rglob("*.py")]
    files.append(resources.PROTOCOL)
    files += [p for p in resources.INITRAMFS.iterdir() if p.is_file()]
    return [p for p in files if "__pycache__" not in p.parts]


# What mmdebstrap is given: the cached root file system depends on these fields only, so a change to the
# rest of a recipe (root_size, cmdline, description) reassembles the image in seconds without a download.
ROOTFS_FIELDS = ("suite", "variant", "packages", "path_excludes", "path_includes", "cached_packages")


def recipe_key(recipe: dict) -> str:
    keyed = {"recipe": {k: recipe.get(k) for k in ROOTFS_FIELDS}, "format": ROOTFS_FORMAT}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def image_id(recipe: dict) -> str:
    h = hashlib.sha256(recipe_key(recipe).encode() + AGENT_VERSION.encode())
    h.update(json.dumps(recipe, sort_keys=True).encode())
    _hash_files(_guest_sources(), h)
    h.update(Path(__file__).read_bytes())  # the assembly (how the initramfs is written) is part of the image
    return h.hexdigest()[:12]


def find(recipe_name: str) -> Image | None:
    """The cached image for the recipe as it is now, or None: this herovm's own cache first, then (for a
    user who is not root) the system-wide one that root builds and every user reads."""
    recipe = load_recipe(recipe_name)
    return _in_caches(recipe_name, image_id(recipe))


def _in_caches(recipe_name: str, image_id_: str) -> Image | None:
    for root in (state.images_dir(), state.shared_images_dir()):
        if root is not None and (image := _load(recipe_name, root / recipe_name / image_id_)) is not None:
            return image
    return None


def cached(recipe_name: str, image_id_: str) -> Image | None:
    """The cached image `recipe_name`/`image_id_` (whatever the recipe is now), or None."""
    try:
        check_recipe_name(recipe_name)
    except InvalidInput:
        return None
    if not IMAGE_ID_RE.match(image_id_):
        return None
    return _in_caches(recipe_name, image_id_)


def _load(recipe_name: str, path: Path) -> Image | None:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    image = Image(recipe_name, path.name, path, manifest)
    if not all(p.is_file() for p in (image.kernel, image.initrd, image.disk)):
        return None
    return image


def list_images() -> list[Image]:
    """The cached images: this herovm's own, then those of the system-wide cache (see `find`)."""
    found = []
    for root in (state.images_dir(), state.shared_images_dir()):
        if root is None:
            continue
        for recipe_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for path in sorted(recipe_dir.iterdir()):
                if image := _load(recipe_dir.name, path):
                    found.append(image)
    return found


def ensure(recipe_name: str = "default", progress: Reporter = silent) -> Image:
    """The image for the recipe, built first if it is missing or stale."""
    return find(recipe_name) or build(recipe_name, progress)


def remove(recipe_name: str, image_id_: str | None = None) -> list[Path]:
    """Remove cached images of a recipe (all versions, or one); returns what was removed. Refused (Busy)
    while a VM, template or fork layer lies on one."""
    root = state.images_dir() / check_recipe_name(recipe_name)
    if image_id_ is not None and not IMAGE_ID_RE.match(image_id_):
        raise InvalidInput(f"invalid image id {image_id_!r}", hint="see `herovm image ls`")
    targets = [root / image_id_] if image_id_ else ([root] if root.exists() else [])
    targets = [t for t in targets if t.exists()]
    if not targets:
        raise NotFound(
            f"no cached image {recipe_name}{'/' + image_id_ if image_id_ else ''}",
            hint="see `herovm image ls`",
        )
    from . import disks

    for t in targets:
        for base in sorted(t.rglob("base.qcow2")):
            users = disks.users_of(base, state.home())
            if users:
                raise Busy(
                    f"image {recipe_name}/{base.parent.name} is in use: {', '.join(users)} lie on it",
                    hint="remove them first (`herovm down`, `herovm template rm`)",
                )
    for t in targets:
        shutil.rmtree(t)
    return targets


def images_in_use() -> set[tuple[str, str]]:
    """(recipe, id) of every image a VM's overlay is based on."""
    used = set()
    for name in state.list_vm_dirs():
        meta = state.VMDir(name).read_meta()
        if meta.get("image") and meta.get("image_id"):
            used.add((meta["image"], meta["image_id"]))
    return used


def prune(recipe_name: str, keep: str) -> list[Path]:
    """Remove older versions of a recipe's image that nothing lies on (no VM, template or fork layer);
    returns what was removed. Versions built in the last hour stay too: another herovm process may be about
    to define a VM on one. Root's system-wide cache keeps every version: other users' VMs, which root
    cannot see, may lie on them (`herovm image rm` removes one)."""
    from . import disks

    root = state.images_dir() / check_recipe_name(recipe_name)
    shared = os.geteuid() == 0 and state.images_dir() == state.SYSTEM_HOME / "images"
    used = {iid for recipe, iid in images_in_use() if recipe == recipe_name} | {keep}
    recent = time.time() - 3600
    removed = []
    for path in root.iterdir() if not shared else ():
        if IMAGE_ID_RE.match(path.name) and path.name not in used and path.stat().st_mtime < recent:
            if disks.users_of(path / "base.qcow2", state.home()):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    cache = state.images_dir() / ".rootfs"
    current = f"{recipe_name}-{recipe_key(load_recipe(recipe_name))}.tar"
    for tar in cache.glob(f"{recipe_name}-*.tar"):
        if tar.name != current:
            tar.unlink(missing_ok=True)
            removed.append(tar)
    return removed


# ---------------------------------------------------------------------------------------------- building


def host_apt_mirror(suite: str) -> str:
    """The Debian mirror this host's apt uses for `suite` ($HEROVM_APT_MIRROR overrides)."""
    if env := os.environ.get("HEROVM_APT_MIRROR"):
        return env
    candidates: list[tuple[str, list[str]]] = []
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                candidates += [
                    (uri, fields.get("suites", "").split()) for uri in fields.get("uris", "").split()
                ]
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        if path.is_file():
            for line in path.read_text().splitlines():
                parts = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
                if len(parts) >= 3 and parts[0] == "deb":
                    candidates.append((parts[1], [parts[2]]))
    for uri, suites in candidates:
        if suite in suites:
            return uri
    raise ImageError(
        f"no apt source for Debian {suite} in this host's apt configuration",
        hint="set HEROVM_APT_MIRROR to a Debian mirror URL",
    )


def _run(cmd: list[str], what: str, **kw: object) -> subprocess.CompletedProcess:
    from .tools import which

    cmd = [which(cmd[0]) or cmd[0], *cmd[1:]]
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    except FileNotFoundError as e:
        program = os.path.basename(cmd[0])
        raise ImageError(f"{what}: {program} is not installed", hint="run scripts/setup") from e
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or e.stdout or "").strip().splitlines()[-5:]
        raise ImageError(f"{what} failed: {' | '.join(tail)}") from e


def build_rootfs(recipe_name: str, recipe: dict, progress: Reporter) -> Path:
    """The Debian root file system as a tar, cached by the recipe."""
    cache = state.ensure_dir(state.images_dir() / ".rootfs", 0o755)
    tar = cache / f"{recipe_name}-{recipe_key(recipe)}.tar"
    if tar.is_file():
        progress(Progress("image", f"reusing root file system {tar.name}"))
        return tar
    mirror = host_apt_mirror(recipe["suite"])
    progress(
        Progress(
            "image",
            f"building Debian {recipe['suite']} root file system with mmdebstrap "
            f"({len(recipe['packages'])} packages; about a minute)",
        )
    )
    hooks = [
        # Host keys made by openssh-server's postinst would be shared by every VM: each VM gets its own.
        'rm -f "$1"/etc/ssh/ssh_host_*',
        'rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/log/*.log',
        'echo herovm > "$1"/etc/hostname',
    ]
    if cached := recipe.get("cached_packages"):
        download = "apt-get install -q -y --download-only --no-install-recommends"
        hooks.append(f'chroot "$1" {download} {" ".join(cached)}')
    hooks.append('rm -f "$1"/var/cache/apt/*.bin')  # apt's binary caches: ~80 MB, rebuilt on first use
    cmd = [
        "mmdebstrap",
        f"--variant={recipe.get('variant', 'apt')}",
        f"--include={','.join(recipe['packages'])}",
    ]
    cmd += [f"--dpkgopt=path-exclude={p}" for p in recipe.get("path_excludes", [])]
    cmd += [f"--dpkgopt=path-include={p}" for p in recipe.get("path_includes", [])]
    cmd += [f"--customize-hook={h}" for h in hooks]
    # Package lists stay, so pkg.install needs no `apt-get update`; the cache holds only cached_packages.
    cmd += [
        "--skip=cleanup/apt/lists,cleanup/apt/cache",
        '--aptopt=Acquire::GzipIndexes "true"',
        '--aptopt=Acquire::CompressionTypes::Order:: "gz"',
    ]
    partial = tar.with_suffix(f".{os.getpid()}.partial.tar")  # the extension picks the format
    cmd += [recipe["suite"], str(partial), mirror]
    try:
        _run(cmd, "mmdebstrap", env={**os.environ, "INITRD": "No"})
        partial.replace(tar)
    finally:
        if partial.is_dir():
            shutil.rmtree(partial)
        partial.unlink(missing_ok=True)
    return tar


def build(recipe_name: str = "default", progress: Reporter = silent, force: bool = False) -> Image:
    """The image of the recipe: the cached one, or built (and cached). `force`: built again from the Debian
    packages up, replacing the cached one; refused while a VM, template or fork layer lies on it (its disk
    would change under them)."""
    recipe = load_recipe(recipe_name)
    if os.geteuid() != 0 and (force or find(recipe_name) is None):
        # The root file system's files belong to root and system users: as another user they would be the
        # user's in the image (tar cannot give them away), and mmdebstrap's unshare mode needs subordinate
        # ids and newuidmap besides. Root builds once into the system-wide cache, which every user reads.
        shared = state.SYSTEM_HOME / "images"
        raise ImageError(
            f"image {recipe_name}/{image_id(recipe)} is not cached, and only root can build images",
            hint=f"run `sudo herovm image build {recipe_name}` once: every user reads root's cache, {shared}",
        )
    image_root = state.ensure_dir(state.images_dir() / recipe_name, 0o755)
    with state.named_lock(f"image-{recipe_name}"):
        image = find(recipe_name)  # another process may have built it while we waited
        if image is not None and not force:
            return image
        if image is not None:
            from . import disks

            users = disks.users_of(image.disk, state.home())
            if users:
                raise Busy(
                    f"image {recipe_name}/{image.id} is in use: {', '.join(users)} lie on it",
                    hint="remove them first (`herovm down`, `herovm template rm`), or build without --force",
                )
        if force:  # the Debian packages too: the root file system is built again
            rootfs = state.images_dir() / ".rootfs" / f"{recipe_name}-{recipe_key(recipe)}.tar"
            rootfs.unlink(missing_ok=True)
        rootfs_tar = build_rootfs(recipe_name, recipe, progress)
        iid = image_id(recipe)
        work = Path(tempfile.mkdtemp(prefix=f".build-{iid}-", dir=image_root))
        try:
            _assemble(recipe_name, recipe, iid, rootfs_tar, work, progress)
            os.chmod(work, 0o755)
            final = image_root / iid
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    # Read back what was just built, not find(): the guest sources may have changed during the build.
    image = _load(recipe_name, final)
    if image is None:
        raise ImageError(f"image {recipe_name} was built but cannot be read back")
    prune(recipe_name, keep=image.id)
    progress(Progress("image", f"image {recipe_name}/{image.id} ready ({_mb(image.disk)} MB disk)"))
    return image


def _mb(path: Path) -> int:
    return path.stat().st_size // (1024 * 1024)


def _assemble(
    recipe_name: str, recipe: dict, iid: str, rootfs_tar: Path, work: Path, progress: Reporter
) -> None:
    root = work / "root"
    root.mkdir()
    progress(Progress("image", "unpacking root file system"))
    _run(
        ["tar", "-xf", str(rootfs_tar), "-C", str(root), "--numeric-owner"], "unpacking the root file system"
    )
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ImageError(f"recipe {recipe_name} installed no kernel", hint="add linux-image-cloud-amd64")
    kernel_version = kernels[-1].name.removeprefix("vmlinuz-")
    shutil.copy2(kernels[-1], work / "vmlinuz")

    progress(Progress("image", f"installing the herovm agent (version {AGENT_VERSION})"))
    _install_agent(root)

    progress(Progress("image", f"building the initramfs for kernel {kernel_version}"))
    _build_initramfs(root, kernel_version, work / "initrd.img")

    progress(Progress("image", "making the ext4 root disk"))
    raw = work / "root.ext4"
    with open(raw, "wb") as f:
        f.truncate(parse_size(recipe.get("root_size", "2GB")))
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "herovm-root",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
            str(root),
            str(raw),
        ],
        "mkfs.ext4",
    )
    shutil.rmtree(root)
    _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(work / "base.qcow2")], "qemu-img")
    raw.unlink()
    for name in ("vmlinuz", "initrd.img", "base.qcow2"):
        os.chmod(work / name, 0o644)

    files = {
        name: {"sha256": file_sha256(work / name), "bytes": (work / name).stat().st_size}
        for name in ("vmlinuz", "initrd.img", "base.qcow2")
    }
    manifest = {
        "name": recipe_name,
        "id": iid,
        "description": recipe.get("description", ""),
        "suite": recipe["suite"],
        "packages": recipe["packages"],
        "kernel_version": kernel_version,
        "cmdline": recipe["cmdline"],
        "root_size": parse_size(recipe.get("root_size", "2GB")),
        "agent_version": AGENT_VERSION,
        "built": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "files": files,
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2))


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _install_agent(root: Path) -> None:
    """Copy the agent into the guest, with what it imports of herovm (install_guest_python)."""
    dest = root / "usr/lib/herovm"
    install_guest_python(dest / "python")
    shutil.copy2(resources.AGENT / "agent.py", dest / "agent.py")
    sshd_conf = root / "etc/ssh/sshd_config.d/herovm.conf"
    sshd_conf.write_text((resources.AGENT / "sshd_config").read_text())
    os.chmod(sshd_conf, 0o644)


def install_guest_python(pkg: Path) -> None:
    """The agent's Python packages under `pkg`, as the guest has them on its path: herovm_agent, and of
    herovm only the contract (protocol.py) and herovm.heroscript, beside a stub __init__ that imports nothing.
    Precompiled: a fresh overlay would otherwise pay for compiling them at every first boot."""
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(resources.AGENT / "herovm_agent", pkg / "herovm_agent", ignore=ignore)
    shutil.copytree(resources.HEROSCRIPT, pkg / "herovm/heroscript", ignore=ignore)
    shutil.copy2(resources.PROTOCOL, pkg / "herovm/protocol.py")
    (pkg / "herovm/__init__.py").write_text(
        '"""The guest side of herovm: the host-guest contract (protocol.py) and heroscript."""\n'
    )
    for py in pkg.rglob("*.py"):
        py_compile.compile(
            str(py), doraise=True, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH
        )


def initramfs_protocol() -> bytes:
    """/protocol.sh of the initramfs, which herovm/_data/initramfs/init sources: the start of the `failed`
    event it writes on the console when it cannot hand over to the agent (everything up to the error's
    string), made here from herovm.protocol so that the shell script does not write the contract a second
    time."""
    failed = {"event": Kind.FAILED, "seq": 0, "t": 0, "stage": Stage.INITRAMFS, "error": ""}
    start = CONSOLE_PREFIX + json.dumps(failed)[: -len('""}')]  # init adds "ERROR"}
    return f"# made by herovm/images.py from herovm/protocol.py\nfailed_line={shlex.quote(start)}\n".encode()


INITRAMFS_APPLETS = ("cat", "insmod", "mkdir", "mount", "usleep")  # what herovm/_data/initramfs/init runs


def _build_initramfs(root: Path, kernel_version: str, out: Path) -> None:
    modules_dir = root / "usr/lib/modules" / kernel_version
    order = (resources.INITRAMFS / "modules.order").read_text().split()
    index = {p.stem: p for p in modules_dir.rglob("*.ko")}
    missing = [m for m in order if m not in index]
    if missing:
        raise ImageError(f"kernel {kernel_version} lacks modules: {', '.join(missing)}")
    entries: list[tuple[str, int, bytes]] = [
        ("dev", 0o40755, b""),
        ("proc", 0o40755, b""),
        ("sys", 0o40755, b""),
        ("bin", 0o40755, b""),
        ("modules", 0o40755, b""),
        ("newroot", 0o40755, b""),
        ("init", 0o100755, (resources.INITRAMFS / "init").read_bytes()),
        ("protocol.sh", 0o100644, initramfs_protocol()),
        ("modules.order", 0o100644, "\n".join(order).encode() + b"\n"),
        ("bin/busybox", 0o100755, (root / "usr/bin/busybox").read_bytes()),
    ]
    entries += [(f"bin/{applet}", 0o120777, b"busybox") for applet in INITRAMFS_APPLETS]
    entries += [(f"modules/{m}.ko", 0o100644, without_signature(index[m].read_bytes())) for m in order]
    out.write_bytes(newc_archive(entries))


MODULE_SIGNATURE_MARKER = b"~Module signature appended~\n"


def without_signature(module: bytes) -> bytes:
    """A kernel module without its appended signature. The guest kernel checks a signature when there is one
    but loads unsigned modules all the same (no module.sig_enforce, no lockdown), so the check only costs
    time: ~10 ms a module at boot under emulation. The kernel notes the unsigned load as taint flag E."""
    if not module.endswith(MODULE_SIGNATURE_MARKER):
        return module
    # struct module_signature (12 bytes, its last 4 the signature's length, big-endian), then the marker
    info_end = len(module) - len(MODULE_SIGNATURE_MARKER)
    sig_len = int.from_bytes(module[info_end - 4 : info_end], "big")
    return module[: info_end - 12 - sig_len]


def newc_archive(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the kernel's initramfs format ("newc"), uncompressed: unpacking is faster than
    decompressing under software emulation, and the archive is small."""
    buf = io.BytesIO()

    def record(name: str, mode: int, data: bytes, ino: int) -> None:
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        buf.write(b"\0" * (-buf.tell() % 4))
        buf.write(data)
        buf.write(b"\0" * (-buf.tell() % 4))

    for ino, (name, mode, data) in enumerate(entries, start=1):
        record(name, mode, data, ino)
    record("TRAILER!!!", 0, b"", 0)
    return buf.getvalue()


__all__ = [
    "Image",
    "build",
    "ensure",
    "find",
    "list_images",
    "remove",
    "recipe_names",
    "host_apt_mirror",
    "newc_archive",
]
