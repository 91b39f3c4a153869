"""Each guest action (herovm/_data/agent/herovm_agent/actions.py), run for real as the agent runs a bootstrap,
in a copy-on-write root of this machine (conftest.py): the files it writes are real files, read back here."""

from __future__ import annotations

import stat

import pytest

from herovm.heroscript import parse, validate

from .conftest import GuestRoot


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _ok(out: dict) -> list[dict]:
    results = out["results"]
    assert all(r["ok"] for r in results), results
    return results


def _failed(out: dict) -> dict:
    *before, last = out["results"]
    assert all(r["ok"] for r in before) and not last["ok"], out["results"]
    return last


# --- file.write -----------------------------------------------------------------------------------------


def test_file_write_writes_the_file_and_its_directories(guest: GuestRoot) -> None:
    out = guest.bootstrap(
        """
        !!file.write path:/etc/motd content:'welcome, agent'
        !!file.write path:/srv/app/conf/app.ini mode:0600 content:'
            [app]
            name = "demo"

            '
        """
    )
    first, second = _ok(out)
    assert first["value"] == {"bytes": 14}
    motd = guest.file("/etc/motd")
    assert motd.read_text() == "welcome, agent" and _mode(motd) == 0o644
    ini = guest.file("/srv/app/conf/app.ini")
    assert ini.read_text() == '[app]\nname = "demo"\n' and _mode(ini) == 0o600
    assert guest.file("/srv/app/conf").is_dir()


def test_file_write_appends_and_sets_the_owner(guest: GuestRoot) -> None:
    _ok(
        guest.bootstrap(
            """
            !!file.write path:/srv/log.txt content:'one<BR>'
            !!file.write path:/srv/log.txt content:'two' append:true owner:nobody:nogroup mode:0640
            """
        )
    )
    f = guest.file("/srv/log.txt")
    assert f.read_text() == "one\ntwo"
    assert (f.stat().st_uid, f.stat().st_gid, _mode(f)) == (65534, 65534, 0o640)


def test_file_write_takes_variables_as_values(guest: GuestRoot) -> None:
    hostile = "x'\n!!file.write path:/etc/evil content:pwned"
    script = "!!file.write path:/srv/${NAME}.txt content:'${BODY}'\n"
    _ok(guest.bootstrap(script, variables={"NAME": "v", "BODY": hostile}))
    assert guest.file("/srv/v.txt").read_text() == hostile
    assert not guest.file("/etc/evil").exists()


def test_file_write_to_an_owner_that_does_not_exist_fails_before_writing(guest: GuestRoot) -> None:
    """Whether an owner exists is known only in the guest (an earlier user.add may create it): the handler
    looks it up before it writes anything."""
    out = guest.bootstrap("!!file.write path:/srv/new/x owner:nosuchuser content:x\n")
    assert _failed(out)["error"] == "owner 'nosuchuser': no such user or group"
    assert not guest.file("/srv/new").exists()


def test_file_write_of_a_new_file_with_a_mode_is_never_wider_than_it(guest: GuestRoot) -> None:
    out = guest.bootstrap(
        """
        !!file.write path:/srv/secret mode:0600 content:'s3cret'
        !!file.write path:/srv/tool mode:4755 owner:nobody content:'#!/bin/sh'
        !!file.write path:/srv/plain content:x
        """
    )
    _ok(out)
    assert _mode(guest.file("/srv/secret")) == 0o600 and _mode(guest.file("/srv/plain")) == 0o644
    tool = guest.file("/srv/tool")  # the owner is set first: a chown would take set-user-ID away
    assert (_mode(tool), tool.stat().st_uid) == (0o4755, 65534)


def test_file_write_without_mode_keeps_an_existing_files_mode(guest: GuestRoot) -> None:
    _ok(
        guest.bootstrap(
            """
            !!file.write path:/root/.ssh/authorized_keys mode:0600 content:'ssh-ed25519 AAAA one<BR>'
            !!file.write path:/root/.ssh/authorized_keys append:true content:'ssh-ed25519 AAAA two<BR>'
            """
        )
    )
    keys = guest.file("/root/.ssh/authorized_keys")
    assert keys.read_text() == "ssh-ed25519 AAAA one\nssh-ed25519 AAAA two\n"
    assert _mode(keys) == 0o600


def test_file_write_replacing_an_existing_file_keeps_its_mode_unless_given(guest: GuestRoot) -> None:
    out = guest.bootstrap(
        """
        !!file.write path:/srv/conf mode:0640 content:one
        !!file.write path:/srv/conf content:two
        !!file.write path:/srv/other mode:0600 content:one
        !!file.write path:/srv/other mode:0644 content:two
        """
    )
    _ok(out)
    assert (guest.file("/srv/conf").read_text(), _mode(guest.file("/srv/conf"))) == ("two", 0o640)
    assert _mode(guest.file("/srv/other")) == 0o644


# --- dir.create -----------------------------------------------------------------------------------------


def test_dir_create_makes_parents_with_mode_and_owner(guest: GuestRoot) -> None:
    _ok(
        guest.bootstrap(
            """
            !!dir.create path:/srv/a/b/c
            !!dir.create path:/srv/private mode:0700 owner:nobody
            """
        )
    )
    assert _mode(guest.file("/srv/a/b/c")) == 0o755
    private = guest.file("/srv/private")
    assert (_mode(private), private.stat().st_uid, private.stat().st_gid) == (0o700, 65534, 65534)


def test_dir_create_without_mode_keeps_an_existing_directorys_mode(guest: GuestRoot) -> None:
    out = guest.bootstrap(
        """
        !!dir.create path:/tmp
        !!dir.create path:/srv/shared mode:2770
        !!dir.create path:/srv/shared owner:nobody
        !!dir.create path:/srv/open mode:0700
        !!dir.create path:/srv/open mode:0755
        """,
        after="out['tmp'] = oct(os.stat('/tmp').st_mode & 0o7777)",
    )
    _ok(out)
    assert out["tmp"] == oct(0o1777)
    shared = guest.file("/srv/shared")
    assert (_mode(shared), shared.stat().st_uid) == (0o2770, 65534)
    assert _mode(guest.file("/srv/open")) == 0o755


def test_dir_create_to_an_owner_that_does_not_exist_fails_before_creating(guest: GuestRoot) -> None:
    out = guest.bootstrap("!!dir.create path:/srv/new/dir owner:agent:nosuchgroup\n")
    assert _failed(out)["error"] == "owner 'agent:nosuchgroup': no such user or group"
    assert not guest.file("/srv/new").exists()


# --- cmd.run --------------------------------------------------------------------------------------------


def test_cmd_run_reports_output_and_logs_it(guest: GuestRoot) -> None:
    out = guest.bootstrap(
        """
        !!cmd.run cmd:'echo "$HOME $LANG $(pwd) $GREETING"; echo to-stderr >&2' env:'GREETING=hi'
        !!cmd.run cmd:pwd cwd:/srv
        """
    )
    first, second = _ok(out)
    assert first["value"] == {"exit_code": 0, "output": "/root C.UTF-8 /root hi\nto-stderr\n"}
    assert second["value"]["output"] == "/srv\n"
    log = guest.file("/var/log/herovm/bootstrap.log").read_text()
    assert log == "/root C.UTF-8 /root hi\nto-stderr\n/srv\n"


def test_cmd_run_keeps_the_tail_of_long_output(guest: GuestRoot) -> None:
    out = guest.bootstrap("!!cmd.run cmd:'seq 1 20000'\n")
    (result,) = _ok(out)
    full = "".join(f"{i}\n" for i in range(1, 20001))
    assert result["value"]["output"] == full[-4096:]
    assert guest.file("/var/log/herovm/bootstrap.log").read_text() == full


def test_cmd_run_fails_with_the_exit_code_unless_ignored(guest: GuestRoot) -> None:
    out = guest.bootstrap(
        """
        !!cmd.run cmd:'echo tried; exit 3' ignore_error:true
        !!cmd.run cmd:'echo failing; exit 4'
        !!file.write path:/srv/after content:x
        """
    )
    ignored, failed = out["results"]  # the bootstrap stops at the failure: file.write never ran
    assert ignored["ok"] and ignored["value"] == {"exit_code": 3, "output": "tried\n"}
    assert (failed["ok"], failed["error"], failed["exit_code"]) == (False, "exited with 4", 4)
    assert failed["output"] == "failing\n"
    assert not guest.file("/srv/after").exists()


def test_cmd_run_timeout_kills_the_whole_process_group(guest: GuestRoot) -> None:
    out = guest.bootstrap(
        "!!cmd.run cmd:'sleep 30 & echo $! > /run/bg; echo started; sleep 30' timeout:500ms\n",
        after="""
        bg = int(open("/run/bg").read())
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{bg}") and time.monotonic() < deadline:  # killed, then reaped by PID 1
            time.sleep(0.01)
        out["bg_gone"] = not os.path.exists(f"/proc/{bg}")
        """,
    )
    result = _failed(out)
    assert (result["error"], result["exit_code"]) == ("timed out after 0.5s", 124)
    assert result["output"] == "started\n"
    assert out["bg_gone"]


# --- user.add -------------------------------------------------------------------------------------------


def test_user_add_with_sudo_and_keys(guest: GuestRoot) -> None:
    out = guest.bootstrap(
        """
        !!user.add name:agent sudo:true ssh_keys:'ssh-ed25519 AAAA one, ssh-ed25519 AAAA two'
        !!user.add name:agent ssh_keys:'ssh-ed25519 AAAA three'
        !!file.write path:/home/agent/notes owner:agent content:x
        !!cmd.run cmd:'id -un agent; getent passwd agent | cut -d: -f6,7'
        """
    )
    first, again, _, check = _ok(out)
    uid = first["value"]["uid"]
    assert first["value"] == {"uid": uid, "home": "/home/agent"} and again["value"] == first["value"]
    assert check["value"]["output"] == "agent\n/home/agent:/bin/bash\n"
    assert "agent:x:" in guest.file("/etc/passwd").read_text()
    sudoers = guest.file("/etc/sudoers.d/90-herovm-agent")
    assert sudoers.read_text() == "agent ALL=(ALL) NOPASSWD:ALL\n" and _mode(sudoers) == 0o440
    ssh = guest.file("/home/agent/.ssh")
    keys = ssh / "authorized_keys"
    assert keys.read_text() == "ssh-ed25519 AAAA one\nssh-ed25519 AAAA two\nssh-ed25519 AAAA three\n"
    assert (_mode(ssh), _mode(keys)) == (0o700, 0o600)
    for path in (guest.file("/home/agent"), ssh, keys, guest.file("/home/agent/notes")):
        assert path.stat().st_uid == uid, path


def test_user_add_with_home_and_shell(guest: GuestRoot) -> None:
    out = guest.bootstrap("!!user.add name:svc home:/srv/svc shell:/bin/sh\n")
    (result,) = _ok(out)
    assert result["value"]["home"] == "/srv/svc" and guest.file("/srv/svc").is_dir()
    line = next(ln for ln in guest.file("/etc/passwd").read_text().splitlines() if ln.startswith("svc:"))
    assert line.endswith(":/srv/svc:/bin/sh")
    assert not guest.file("/etc/sudoers.d/90-herovm-svc").exists()


def test_user_add_reports_useradd_failing(guest: GuestRoot) -> None:
    result = _failed(guest.bootstrap("!!user.add name:'bad name'\n"))
    assert result["error"] == "useradd bad name failed" and result["exit_code"] not in (0, None)
    assert "invalid user name" in result["output"]


# --- env.set --------------------------------------------------------------------------------------------


def test_env_set_reaches_later_actions_and_login_shells(guest: GuestRoot) -> None:
    out = guest.bootstrap(
        """
        !!env.set GREETING=hello 'MOTD=have a nice day'
        !!env.set name:QUOTE value:"it's"
        !!cmd.run cmd:'echo "$GREETING|$MOTD|$QUOTE"'
        !!cmd.run cmd:'env -i sh -c ". /etc/profile.d/herovm-env.sh; echo \\"\\$MOTD|\\$QUOTE\\""'
        """
    )
    first, second, direct, login = _ok(out)
    assert first["value"] == {"set": ["GREETING", "MOTD"]} and second["value"] == {"set": ["QUOTE"]}
    assert direct["value"]["output"] == "hello|have a nice day|it's\n"
    assert login["value"]["output"] == "have a nice day|it's\n"
    assert guest.file("/etc/profile.d/herovm-env.sh").read_text() == (
        "export GREETING=hello\nexport MOTD='have a nice day'\nexport QUOTE='it'\"'\"'s'\n"
    )


# --- service.start --------------------------------------------------------------------------------------


def test_service_start_runs_a_supervised_service_with_the_bootstrap_env(guest: GuestRoot) -> None:
    out = guest.bootstrap(
        """
        !!env.set FROM_ENV_SET=1
        !!service.start name:web cmd:'echo "web $FROM_ENV_SET $PORT"; exec sleep 30' env:'PORT=8080'
        !!service.start name:worker cmd:'exec sleep 30' after:web restart:never
        """,
        after="""
        deadline = time.monotonic() + 5
        while "web 1 8080" not in open("/var/log/herovm/web.log").read() and time.monotonic() < deadline:
            time.sleep(0.01)
        out["snapshot"] = services.snapshot()
        """,
    )
    _, web, worker = _ok(out)
    snap = out["snapshot"]
    assert snap["web"]["pid"] == web["value"]["pid"] and snap["web"]["state"] == "running"
    assert snap["worker"]["pid"] == worker["value"]["pid"] and snap["worker"]["restart"] == "never"
    assert [(e["name"], e["state"]) for e in out["events"]] == [("web", "started"), ("worker", "started")]
    assert guest.file("/var/log/herovm/web.log").read_text() == "web 1 8080\n"


def test_service_start_after_a_service_not_started_fails(guest: GuestRoot) -> None:
    out = guest.bootstrap("!!service.start cmd:true name:web after:db\n")
    error = "service web is to start after 'db', which was not started before it"
    assert _failed(out)["error"] == error and out["events"] == []


# --- pkg.install ----------------------------------------------------------------------------------------


def test_pkg_install_installs_a_package_with_apt(guest: GuestRoot) -> None:
    """A real apt-get install, with no network: a package built here and installed from its file."""
    out = guest.bootstrap(
        """
        !!file.write path:/srv/pkg/DEBIAN/control content:'
            Package: herovm-hello
            Version: 1.0
            Architecture: all
            Maintainer: herovm tests <tests@herovm.invalid>
            Description: a package for the agent's tests

            '
        !!file.write path:/srv/pkg/usr/share/herovm-hello/hello content:hello
        !!cmd.run cmd:'dpkg-deb --build --root-owner-group /srv/pkg /srv/herovm-hello_1.0_all.deb'
        !!pkg.install names:/srv/herovm-hello_1.0_all.deb
        !!cmd.run cmd:"dpkg-query -W -f '${Status}' herovm-hello"
        """,
        timeout=60,
    )
    *_, install, query = _ok(out)
    assert install["value"] == {"installed": ["/srv/herovm-hello_1.0_all.deb"]}
    assert query["value"]["output"] == "install ok installed"
    assert guest.file("/usr/share/herovm-hello/hello").read_text() == "hello"
    assert "herovm-hello" in guest.file("/var/log/herovm/bootstrap.log").read_text()


def test_pkg_install_failures(guest: GuestRoot) -> None:
    unknown = _failed(guest.bootstrap("!!pkg.install herovm-no-such-package\n"))
    assert (unknown["error"], unknown["exit_code"]) == ("apt-get failed", 100)
    assert "Unable to locate package herovm-no-such-package" in unknown["output"]
    slow = _failed(guest.bootstrap("!!pkg.install names:herovm-no-such-package timeout:1ms\n"))
    assert (slow["error"], slow["exit_code"]) == ("apt-get timed out", 124)


# --- system.hostname ------------------------------------------------------------------------------------


def test_system_hostname_sets_the_kernels_and_the_files(guest: GuestRoot) -> None:
    out = guest.bootstrap("!!system.hostname name:web-1\n", after="out['uname'] = os.uname().nodename")
    _ok(out)
    assert out["uname"] == "web-1"
    assert guest.file("/etc/hostname").read_text() == "web-1\n"
    assert "127.0.1.1\tweb-1\n" in guest.file("/etc/hosts").read_text()


# --- the handlers check what they are given, before they change anything --------------------------------

# Runs one action's handler alone, past the registry's checks (as a caller that skipped them would), with
# its values as written: what the handler refuses, it refuses before it writes anything.
DIRECT = """
from herovm.heroscript import ActionFailed, Call, parse
from herovm_agent.actions import GuestContext, registry
from herovm_agent.processes import Processes, Services

def direct(line):
    action = parse(line).actions[0]
    spec = registry.get(action.fullname)
    values = {p.name: p.default for p in spec.params}
    values.update(action.params.to_dict())
    context = GuestContext(Processes(), Services(Processes(), lambda *a, **k: None))
    try:
        spec.handler(Call(action, values, list(action.args), context))
    except ActionFailed as e:
        return e.message
    return None

out = {line: direct(line) for line in LINES}
"""


def test_handlers_refuse_bad_values_before_changing_anything(guest: GuestRoot) -> None:
    lines = {
        "!!file.write path:srv/x content:x": "path 'srv/x' must be absolute",
        "!!file.write path:/srv/a/x mode:rw content:x": "mode 'rw' is not an octal file mode, e.g. 0644",
        "!!file.write path:/srv/b/x owner:'no body' content:x": f"owner 'no body' {OWNER}",
        "!!dir.create path:/srv/c mode:999": "mode '999' is not an octal file mode, e.g. 0644",
        "!!system.hostname name:web_1": "hostname 'web_1' is not a hostname; use letters, digits and '-' "
        "(not first or last), at most 63",
        "!!service.start name:web cmd:true restart:sometimes": "restart 'sometimes' is not a restart policy; "
        "use always, on-failure or never",
        "!!service.start name:'my web' cmd:true": "service name 'my web' is not a service name; use letters, "
        "digits, '-' and '_'",
        "!!env.set novalue": "env entry 'novalue' is not NAME=VALUE",
        "!!env.set name:'A B' value:x": "name 'A B' is not a variable name; use letters, digits and '_'",
        "!!env.set": "nothing to set: give NAME=VALUE arguments or name: and value:",
    }
    out = guest.python(f"LINES = {list(lines)!r}", DIRECT)
    assert out == lines
    for path in ("/srv/a", "/srv/b", "/srv/c", "/etc/hostname", "/etc/profile.d/herovm-env.sh"):
        assert not guest.file(path).exists(), path


# --- checked before anything runs -----------------------------------------------------------------------


OCTAL = "is not an octal file mode, e.g. 0644"
OWNER = "is not a user or user:group name"
SERVICE = "is not a service name; use letters, digits, '-' and '_'"
HOSTNAME = "is not a hostname; use letters, digits and '-' (not first or last), at most 63"


@pytest.mark.parametrize(
    ("script", "error"),
    [
        ("!!file.write path:etc/motd content:x", "1:14: path: 'etc/motd' must be absolute"),
        ("!!file.write path:/etc/motd mode:rw content:x", f"1:29: mode: 'rw' {OCTAL}"),
        ("!!file.write path:/x mode:17777", f"1:22: mode: '17777' {OCTAL}"),
        ("!!file.write path:/x owner:'no body'", f"1:22: owner: 'no body' {OWNER}"),
        ("!!file.write path:/x owner:agent:", f"1:22: owner: 'agent:' {OWNER}"),
        ("!!dir.create path:/srv mode:999", f"1:24: mode: '999' {OCTAL}"),
        ("!!dir.create path:srv owner:1000",
         f"1:14: path: 'srv' must be absolute\nb.hero:1:23: owner: '1000' {OWNER}"),
        ("!!cmd.run cmd:true cwd:tmp", "1:20: cwd: 'tmp' must be absolute"),
        ("!!cmd.run cmd:true env:'A=1, 1A=b'", "1:20: env: entry '1A=b' is not NAME=VALUE"),
        ("!!user.add name:svc home:srv/svc", "1:21: home: 'srv/svc' must be absolute"),
        ("!!service.start name:web cmd:true restart:sometimes",
         "1:35: restart: 'sometimes' is not a restart policy; use always, on-failure or never"),
        ("!!service.start name:'my web' cmd:true", f"1:17: name: 'my web' {SERVICE}"),
        ("!!service.start name:web cmd:true after:'db, a/b'", f"1:35: after: 'a/b' {SERVICE}"),
        ("!!service.start name:web cmd:true\n!!service.start name:web cmd:false",
         "2:17: service.start: name 'web' is already given at 1:17\n"
         "  hint: each !!service.start needs its own name"),
        ("!!system.hostname name:web_1", f"1:19: name: 'web_1' {HOSTNAME}"),
        ("!!system.hostname name:-web", f"1:19: name: '-web' {HOSTNAME}"),
        (f"!!system.hostname name:{'a' * 64}", f"1:19: name: '{'a' * 64}' {HOSTNAME}"),
        ("!!env.set A=1 novalue", "1:15: env.set: entry 'novalue' is not NAME=VALUE"),
        ("!!env.set", "1:1: env.set: nothing to set: give NAME=VALUE arguments or name: and value:"),
        ("!!env.set name:'A B' value:x",
         "1:11: name: 'A B' is not a variable name; use letters, digits and '_'"),
        ("!!pkg.install", "1:1: pkg.install: no packages named"),
        ("!!pkg.install git '-oAPT::X=1'",
         "1:19: pkg.install: '-oAPT::X=1' is not a package name or a .deb file"),
    ],
)  # fmt: skip
def test_bad_values_are_found_when_the_bootstrap_is_checked(script: str, error: str) -> None:
    """On the host, before any VM exists (`herovm script check`, `herovm up`), and in the guest before the
    first action runs: the same registry, the same checks, at the value's FILE:LINE:COL."""
    from herovm.guest.registry import guest_registry

    problems = validate(parse(script + "\n", path="b.hero"), guest_registry())
    assert "\n".join(str(p) for p in problems) == "b.hero:" + error


def test_a_variable_left_without_a_value_is_checked_as_written() -> None:
    from herovm.guest.registry import guest_registry

    script = "!!system.hostname name:${HOST}\n!!file.write path:'${DIR}/x' mode:${MODE}\n"
    (problem,) = validate(
        parse(script, path="b.hero", variables={"DIR": "/srv", "MODE": "0600"}), guest_registry()
    )
    assert (problem.line, problem.col, problem.hint) == (
        1,
        19,
        "a variable given no value stays as written: give it one (herovm up --var NAME=VALUE)",
    )
    assert (
        validate(parse(script, variables={"HOST": "web1", "DIR": "/srv", "MODE": "0600"}), guest_registry())
        == []
    )


@pytest.mark.parametrize(
    "script",
    [
        "!!file.write path:/srv/x mode:0600 owner:nobody:nogroup content:x",
        "!!file.write path:/usr/local/bin/x mode:4755 owner:_apt",
        "!!dir.create path:/tmp mode:1777 owner:www-data",
        "!!dir.create path:/srv mode:700",
        "!!system.hostname name:a",
        "!!system.hostname name:web-1",
        "!!service.start name:1_web-2 cmd:true restart:never after:''",
        "!!pkg.install git names:'/srv/x_1.0_all.deb, curl'",
        "!!env.set name:_X value:'a b'",
        "!!user.add name:svc home:/srv/svc shell:/bin/sh",
    ],
)
def test_good_values_pass_the_check(script: str) -> None:
    from herovm.guest.registry import guest_registry

    assert validate(parse(script + "\n"), guest_registry()) == []
