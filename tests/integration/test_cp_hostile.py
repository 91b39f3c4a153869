"""`herovm cp VM:/dir LOCAL` from a guest that plants symlinks and setuid files (docs/security.md).

One boot: the symlink-swap attack of the security report, through the CLI, twice.
"""

from __future__ import annotations

import os
import stat

from guests import cli


def test_cp_symlink_swap_attack_never_writes_through_a_link(vm_factory, unique_name, tmp_path):
    name = unique_name("cp-swap")
    vm = vm_factory(name)
    target = tmp_path / "target"
    target.write_text("precious\n")
    setup = vm.exec(
        f"mkdir -p /root/d && ln -sfn {target} /root/d/f && echo s > /root/d/s && chmod 4755 /root/d/s "
        "&& ln -sfn s /root/d/keep"
    )
    assert setup.exit_code == 0, setup.stderr
    out = tmp_path / "out"

    first = cli("cp", f"{name}:/root/d", str(out))
    assert first.returncode == 0, first.stderr
    assert f"skipped the symlink guest:/root/d/f -> '{target}'" in first.stderr
    assert not os.path.lexists(out / "f")
    assert os.readlink(out / "keep") == "s"
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((out / "s").stat().st_mode) == 0o755 & ~umask  # no setuid bit

    # The guest replaces its link by a file; a link at that place on the host (as an older herovm left
    # it) is replaced, not written through.
    assert vm.exec("rm /root/d/f && echo from-the-guest > /root/d/f").exit_code == 0
    (out / "f").symlink_to(target)
    second = cli("cp", f"{name}:/root/d", str(out))
    assert second.returncode == 0, second.stderr
    assert target.read_text() == "precious\n"
    assert not (out / "f").is_symlink() and (out / "f").read_text() == "from-the-guest\n"
    vm.close()
