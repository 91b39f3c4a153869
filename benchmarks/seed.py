"""A NoCloud seed (ISO9660 labelled `cidata`) whose user-data does what a herovm bootstrap does.

The user-data is translated from the HeroScript file itself (tests/integration/data/full.hero), action by
action, so the two guests are asked for the same files, commands, user, environment, service and hostname:

| HeroScript        | cloud-config                                                               |
| ---               | ---                                                                        |
| file.write        | write_files (path, content, permissions)                                   |
| dir.create        | runcmd: mkdir -p + chmod                                                   |
| env.set           | /etc/profile.d/bench-env.sh + `export` in the runcmd script (later actions) |
| cmd.run           | runcmd line                                                                |
| user.add          | users (shell, NOPASSWD sudo)                                               |
| service.start     | a systemd unit (Restart=) in write_files + `systemctl enable --now`        |
| system.hostname   | hostname                                                                   |

Like herovm, the host supplies the guest's SSH host key (Ed25519) and root's authorized key, so cloud-init
generates no host keys; root is not resized (herovm does not resize either). The last runcmd line writes
`BENCH-CI-RUNCMD-DONE uptime=...` to the serial console; cloud-init's final message is
`BENCH-CI-FINAL uptime=...`. The host only reads the console file: it never polls SSH to learn this.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from herovm.guest import configdrive
from herovm.heroscript import parse

RUNCMD_MARKER = "BENCH-CI-RUNCMD-DONE"
FINAL_MARKER = "BENCH-CI-FINAL"


def _mode(value: str | None, default: str) -> str:
    return value if value else default


def _bool(value: str | None) -> bool:
    return str(value).lower() in ("true", "yes", "1", "on")


def cloud_config(
    hero_text: str, variables: dict[str, str], *, host_key: str, host_pub: str, root_pub: str
) -> dict:
    playbook = parse(hero_text, path="bootstrap.hero", variables=variables or None)
    files: list[dict] = [
        {"path": "/root/.ssh/authorized_keys", "permissions": "0600", "content": root_pub.strip() + "\n"},
    ]
    users: list[dict] = []
    runcmd: list[str] = ["set -e"]
    env: dict[str, str] = {}
    config: dict = {}
    for a in playbook.actions:
        kind = f"{a.actor}.{a.name}"
        p = dict(a.params)
        if kind == "file.write":
            files.append(
                {
                    "path": p["path"],
                    "content": p.get("content", ""),
                    "permissions": _mode(p.get("mode"), "0644"),
                }
            )
        elif kind == "dir.create":
            path = shlex.quote(p["path"])
            runcmd.append(f"mkdir -p {path} && chmod {_mode(p.get('mode'), '0755')} {path}")
        elif kind == "env.set":
            pairs = dict(item.split("=", 1) for item in a.args)
            if p.get("name"):
                pairs[p["name"]] = p.get("value", "")
            env.update(pairs)
            exports = "; ".join(f"export {k}={shlex.quote(v)}" for k, v in pairs.items())
            runcmd.append(exports)
            runcmd.append(f"echo {shlex.quote(exports)} >> /etc/profile.d/bench-env.sh")
        elif kind == "cmd.run":
            runcmd.append(f"(cd /root && sh -c {shlex.quote(p['cmd'])})")
        elif kind == "user.add":
            user = {"name": p["name"], "shell": p.get("shell", "/bin/bash"), "lock_passwd": True}
            if _bool(p.get("sudo")):
                user["sudo"] = "ALL=(ALL) NOPASSWD:ALL"
            users.append(user)
        elif kind == "service.start":
            restart = {"always": "always", "on-failure": "on-failure", "never": "no"}[
                p.get("restart", "on-failure")
            ]
            env_lines = "".join(f"Environment={shlex.quote(f'{k}={v}')}\n" for k, v in env.items())
            unit = (
                f"[Unit]\nDescription=bench service {p['name']}\n\n[Service]\n{env_lines}"
                f"ExecStart=/bin/sh -c {shlex.quote(p['cmd'])}\nRestart={restart}\n\n"
                "[Install]\nWantedBy=multi-user.target\n"
            )
            files.append({"path": f"/etc/systemd/system/{p['name']}.service", "content": unit})
            runcmd.append(f"systemctl daemon-reload && systemctl enable --now {p['name']}.service")
        elif kind == "system.hostname":
            config["hostname"] = p["name"]
            config["preserve_hostname"] = False
        else:
            raise ValueError(f"{kind} (line {a.line}) has no cloud-config translation in this benchmark")
    runcmd.append(f"echo \"{RUNCMD_MARKER} uptime=$(cut -d' ' -f1 /proc/uptime)\" > /dev/ttyS0")
    config.update(
        {
            "ssh_deletekeys": True,
            "ssh_genkeytypes": ["ed25519"],  # already given above, so nothing is generated
            "ssh_keys": {"ed25519_private": host_key, "ed25519_public": host_pub.strip()},
            "disable_root": False,
            "resize_rootfs": False,
            "growpart": {"mode": "off"},
            "users": users,
            "write_files": files,
            "runcmd": runcmd,
            "final_message": f"{FINAL_MARKER} uptime=$UPTIME",
        }
    )
    return config


def write_seed(path: Path, config: dict, instance_id: str, hostname: str) -> None:
    """The NoCloud seed ISO: `user-data` (JSON is YAML) and `meta-data`, volume label `cidata`."""
    user_data = ("#cloud-config\n" + json.dumps(config, indent=1) + "\n").encode()
    meta_data = json.dumps({"instance-id": instance_id, "local-hostname": hostname}).encode()
    configdrive.write_iso(path, "cidata", {"user-data": user_data, "meta-data": meta_data})
