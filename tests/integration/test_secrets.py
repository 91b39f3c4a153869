"""A secret given to `herovm up` reaches the guest and nothing the host keeps or shows; a hostile --var value
stays one value. One real guest, driven through the CLI as a user would."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from herovm import state
from herovm.backends.libvirt import PREFIX
from herovm.manager import Manager

BIN = Path(sys.executable).parent
SCRIPT = """\
!!env.set TOKEN=${TOKEN}
!!file.write path:/root/token mode:0600 content:'${TOKEN}'
!!file.write path:/root/hostile content:'${X}'
!!cmd.run cmd:'echo "token=$TOKEN"; cat /root/token'
"""
# Pasted into the text, this would end the quote and add an action (and a parameter) to the bootstrap.
HOSTILE = "x'\n!!file.write path:/root/injected content:'pwned' mode:0777\n  y:'"


def herovm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "herovm"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_a_secret_reaches_the_guest_and_nothing_else(image, unique_name, tmp_path: Path) -> None:
    name = unique_name("secret")
    secret = f"hv-s3cr3t-{uuid.uuid4().hex}"
    boot = tmp_path / "setup.hero"
    boot.write_text(SCRIPT)
    try:
        up = herovm(
            "up", name, "--bootstrap", str(boot), "--var", f"X={HOSTILE}", "--secret", "TOKEN", "--json",
            env={"TOKEN": secret},
        )  # fmt: skip
        assert up.returncode == 0, up.stderr
        assert secret not in up.stdout + up.stderr  # `up --json` and its progress lines
        st = json.loads(up.stdout)
        assert st["agent"] == "ready" and st["settings"]["secrets"] == ["TOKEN"]
        assert [s["action"] for s in st["steps"]] == ["env.set", "file.write", "file.write", "cmd.run"]

        # The guest has it: env.set for login shells and exec, file.write's content
        with Manager() as m, m.get(name) as vm:

            def sh(cmd: str) -> str:
                r = vm.exec(cmd)
                assert r.exit_code == 0, (cmd, r)
                return r.stdout.decode()

            assert sh("cat /root/token") == secret
            assert sh('. /etc/profile.d/herovm-env.sh; printf %s "$TOKEN"') == secret
            # the hostile value is the content of the one file it was put in, and added nothing
            assert sh("cat /root/hostile") == HOSTILE
            assert sh("test -e /root/injected && echo added || echo none").strip() == "none"

        # ... and nothing the host keeps or shows has it
        vmdir = state.VMDir(name)
        xml = subprocess.run(
            ["virsh", "-c", "qemu:///system", "dumpxml", PREFIX + name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "<metadata>" in xml and secret not in xml
        assert secret not in vmdir.meta_file.read_text()
        status = herovm("status", name, "--json")
        assert status.returncode == 0 and secret not in status.stdout + status.stderr
        logs = herovm("logs", name)
        assert logs.returncode == 0 and secret not in logs.stdout + logs.stderr
        console = vmdir.console_log.read_text(errors="replace")
        assert secret not in console
        # the agent wrote the output of cmd.run with the secret's name in its place
        assert "token=[secret TOKEN]" in console and "token=[secret TOKEN]" in logs.stdout
        # A guest process that writes the secret to the console itself, raw and inside a well-formed event
        # of this boot: what the host shows of it still names the secret instead of showing it.
        with Manager() as m, m.get(name) as vm:
            nonce = m.status(name)["last_boot"]["nonce"]
            event = {"event": "status", "nonce": nonce, "t": 9.0, "services": {}, "note": secret}
            line = "@herovm " + json.dumps(event)
            r = vm.exec(["sh", "-c", 'printf "%s\\n%s\\n" "$1" "$2" > /dev/console', "sh", secret, line])
            assert r.exit_code == 0, r
        for args in (("logs", name), ("logs", name, "--console"), ("status", name, "--json")):
            shown = herovm(*args)
            assert shown.returncode == 0 and secret not in shown.stdout + shown.stderr, args
        assert "[secret TOKEN]" in herovm("logs", name, "--console").stdout
        # it lives in the VM's secrets/ (0700, file 0600) for later boots, and on the per-boot drive (0600)
        kept = vmdir.secrets / "vars.json"
        assert json.loads(kept.read_text()) == {"TOKEN": secret}
        assert oct(kept.stat().st_mode & 0o777) == "0o600"
        assert oct(vmdir.secrets.stat().st_mode & 0o777) == "0o700"
        assert oct(vmdir.drive.stat().st_mode & 0o777) == "0o600"
    finally:
        with Manager() as m, contextlib.suppress(Exception):
            m.down(name)
