"""No VM file is readable by another local user: the disk held the pinned SSH host key and a bootstrap
secret for anyone to grep (disk.qcow2 was 0644 in a 0711 directory)."""

from __future__ import annotations

import os
import stat
import subprocess

from herovm import state

# Runs as nobody, outside every group: lists the VM directory and reads every file herovm knows of.
PROBE = """
import os, socket, stat, sys
out = []
for path in sys.argv[1:]:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        elif stat.S_ISSOCK(os.stat(path).st_mode):
            socket.socket(socket.AF_UNIX).connect(path)
        else:
            with open(path, "rb") as f:
                f.read(1)
        out.append("read " + path)
    except OSError as e:
        out.append("denied " + path)
print("\\n".join(out))
"""


def as_nobody(paths: list[str]) -> list[str]:
    r = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            PROBE,
            *paths,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def vm_files(vmdir: state.VMDir) -> list[str]:
    return [str(vmdir.path)] + sorted(
        os.path.join(root, name) for root, dirs, files in os.walk(vmdir.path) for name in dirs + files
    )


def test_no_other_user_can_read_or_list_anything_of_a_vm(vm_factory, unique_name):
    vm = vm_factory(unique_name("files"), bootstrap="!!file.write path:/root/secret content:'s3cret'\n")
    vmdir = state.VMDir(vm.name)
    for running in (True, False):
        files = vm_files(vmdir)
        assert {os.path.basename(p) for p in files} >= {"disk.qcow2", "config.iso", "console.log", "vm.json"}
        assert as_nobody(files) == [f"denied {p}" for p in files], f"running={running}"
        for path in files[1:]:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                assert stat.S_IMODE(st.st_mode) & 0o077 == 0, (path, oct(st.st_mode))
        if running:
            vm.close()
            vm_factory.manager.stop(vm.name)  # libvirt hands the disk back to root: modes must hold
