"""The nftables rule that keeps default-mode guests off the host (applied for real in
tests/integration/test_network.py); here, what it says and which resolver it lets through."""

from __future__ import annotations

from pathlib import Path

from herovm.backends import hostguard


def test_the_rule_refuses_new_flows_of_passts_group_to_local_addresses_only():
    rules = hostguard.ruleset(4242, [])
    assert "meta skgid 4242 ct state new fib daddr type local reject" in rules
    assert rules.startswith("table inet herovm\ndelete table inet herovm\n")  # replaced whole, idempotent
    assert "dport 53" not in rules


def test_a_local_resolver_keeps_port_53_and_nothing_else(tmp_path: Path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# stub\nnameserver 127.0.0.53\nnameserver 192.0.2.200\n")
    assert hostguard.local_resolvers(conf) == ["127.0.0.53"]
    rules = hostguard.ruleset(7, ["127.0.0.53", "::1"])
    for line in (
        "meta skgid 7 ip daddr 127.0.0.53 udp dport 53 accept",
        "meta skgid 7 ip daddr 127.0.0.53 tcp dport 53 accept",
        "meta skgid 7 ip6 daddr ::1 udp dport 53 accept",
    ):
        assert line in rules
    assert rules.index("dport 53 accept") < rules.index("reject")


def test_a_remote_or_missing_resolver_gets_no_exception(tmp_path: Path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.0.2.200\nnameserver 127.0.0.1\n")  # only the first one is used
    assert hostguard.local_resolvers(conf) == []
    assert hostguard.local_resolvers(tmp_path / "absent") == []
    conf.write_text("nameserver not-an-address\n")
    assert hostguard.local_resolvers(conf) == []
