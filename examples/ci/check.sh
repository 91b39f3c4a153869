#!/bin/sh
# The "test suite" of ci-test-vm.hero: exit 0 when the VM is set up as expected, 3 when the file is missing.
set -u
[ -f /srv/ci/expected.txt ] || { echo "expected.txt is missing" >&2; exit 3; }
[ "$(cat /srv/ci/expected.txt)" = "all good" ] || { echo "unexpected content" >&2; exit 4; }
. /etc/profile.d/herovm-env.sh
[ "${CI:-}" = true ] || { echo "CI is not set" >&2; exit 5; }
echo "check passed on $(hostname)"
