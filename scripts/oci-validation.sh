#!/usr/bin/env bash
# Runs the OCI runtime conformance suite, opencontainers/runtime-tools'
# validation/ tests, against an OCI runtime and prints a table: each test,
# pass/fail, its TAP assertions ok/not ok, and totals. The table also goes
# to a markdown file ($OUT) so two runtimes can be compared side by side.
#
#   sudo RUNTIME=runc scripts/oci-validation.sh /path/to/runtime-tools
#   sudo RUNTIME=$PWD/target/debug/vmrun-oci scripts/oci-validation.sh /path/to/runtime-tools
#
# The runtime-tools checkout is the first argument or $RUNTIME_TOOLS. The
# validation executables and runtimetest are built in it once (Debian's Go,
# the checkout's vendored modules, offline) and rebuilt when their sources
# change. Environment:
#   RUNTIME   the runtime's command (default runc)
#   TIMEOUT   seconds one test may take (default 300, times WAIT_SCALE up
#             to 1800: tests that make many containers, such as
#             linux_cgroups_cpus, take twenty minutes where guest kernel mode
#             is emulated)
#   TESTS     an extended regex: only the tests whose name matches
#   STATE_ROOT  the runtime's state directory, where a test killed at its
#             timeout left its container (default /run/runc for runc,
#             /run/vmrun-oci otherwise): those are deleted
#   OUT       the markdown table (default /tmp/oci-validation-<runtime>.md);
#             each test's TAP output goes to $OUT.d/<test>.tap
#   WAIT_SCALE  a whole number (default 1: the suite as published). The
#             suite gives a container 10 s (some steps 5 s, 3 s) to reach
#             a state; its runtimetest, a Go program that makes about a
#             thousand system calls, needs about 20 s in a guest whose
#             kernel mode is emulated. With WAIT_SCALE=N every wait of the
#             suite's WaitingForStatus is N times longer (built from the
#             same sources with a go build overlay, into separate
#             executables); the table's header says so. Use it to see what
#             a runtime applies apart from its speed, never as the result.
# For vmrun-oci, the guest kernel and agent come from VMRUN_KERNEL and
# VMRUN_AGENT_INITRD (else VMRUN_TEST_KERNEL and this checkout's
# rootfs/build.sh), and VMRUN_HOME defaults to a directory kept between
# runs (its warm-start template is built by the first container).
# Needs root (the runtimes make containers). Long: not part of CI; see
# docs/oci.md.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
rt=${1:-${RUNTIME_TOOLS:-}}
if [ -z "$rt" ] || [ ! -d "$rt/validation" ]; then
    cat >&2 <<'EOF'
scripts/oci-validation.sh: give a runtime-tools checkout (argument or RUNTIME_TOOLS) with validation/, e.g.
    git clone https://github.com/opencontainers/runtime-tools && git -C runtime-tools checkout 0105384
(Debian's golang-github-opencontainers-runtime-tools-dev lacks validation/.)
EOF
    exit 2
fi
rt=$(cd "$rt" && pwd)
[ "$(id -u)" -eq 0 ] || { echo "scripts/oci-validation.sh: run as root (the runtime makes containers)" >&2; exit 2; }

# golang-go: builds the suite; tar: its tests unpack their root file system.
pkgs=(golang-go tar coreutils)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "scripts/oci-validation.sh: installing ${missing[*]}" >&2
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
fi

RUNTIME=${RUNTIME:-runc}
if [ -z "${TIMEOUT:-}" ]; then
    TIMEOUT=$((300 * ${WAIT_SCALE:-1}))
    if [ "$TIMEOUT" -gt 1800 ]; then TIMEOUT=1800; fi
fi
STATE_ROOT=${STATE_ROOT:-$([ "$(basename "$RUNTIME")" = runc ] && echo /run/runc || echo /run/vmrun-oci)}
TESTS=${TESTS:-.}
name=$(basename "$RUNTIME")
OUT=${OUT:-/tmp/oci-validation-$name.md}
command -v "$RUNTIME" >/dev/null || { echo "scripts/oci-validation.sh: runtime $RUNTIME not found" >&2; exit 2; }
RUNTIME=$(command -v "$RUNTIME")
export RUNTIME

if [ "$name" = vmrun-oci ]; then
    export VMRUN_KERNEL=${VMRUN_KERNEL:-${VMRUN_TEST_KERNEL:-}}
    [ -n "$VMRUN_KERNEL" ] || { echo "scripts/oci-validation.sh: set VMRUN_KERNEL (or VMRUN_TEST_KERNEL) to the guest kernel" >&2; exit 2; }
    export VMRUN_AGENT_INITRD=${VMRUN_AGENT_INITRD:-$("$here/rootfs/build.sh" | tail -1)}
    export VMRUN_HOME=${VMRUN_HOME:-/var/tmp/vmrun-oci-validation}
    mkdir -p "$VMRUN_HOME"
fi

# Build once: runtimetest (static, copied into each bundle) and one
# executable per validation/<test>/<test>.go.
export GOFLAGS=-mod=vendor GOPROXY=off GO111MODULE=on GOCACHE=${GOCACHE:-/var/tmp/oci-validation-gocache}
cd "$rt"
stale() { [ ! -x "$1" ] || [ -n "$(find "$2" -name '*.go' -newer "$1" -print -quit)" ]; }
if stale runtimetest cmd/runtimetest; then
    echo "building runtimetest" >&2
    CGO_ENABLED=0 go build -tags "netgo osusergo" -o runtimetest ./cmd/runtimetest
fi
WAIT_SCALE=${WAIT_SCALE:-1}
[[ $WAIT_SCALE =~ ^[1-9][0-9]*$ ]] || { echo "scripts/oci-validation.sh: WAIT_SCALE must be a whole number, 1 or more" >&2; exit 2; }
suffix=t overlay=()
if [ "$WAIT_SCALE" -gt 1 ]; then
    # The one change: WaitingForStatus multiplies its retryTimeout.
    suffix=wait$WAIT_SCALE.t
    patched=$(mktemp -d)
    trap 'rm -rf "$patched"' EXIT
    awk -v n="$WAIT_SCALE" '{ print } /^func WaitingForStatus\(/ { print "\tretryTimeout *= " n }' validation/util/test.go >"$patched/test.go"
    grep -q "retryTimeout \*= $WAIT_SCALE" "$patched/test.go" || { echo "scripts/oci-validation.sh: WaitingForStatus not found in validation/util/test.go" >&2; exit 2; }
    printf '{"Replace": {"%s": "%s"}}' "$rt/validation/util/test.go" "$patched/test.go" >"$patched/overlay.json"
    overlay=(-overlay "$patched/overlay.json")
fi
mapfile -t sources < <(find validation -name '*.go' -not -path 'validation/util/*' | sort)
for src in "${sources[@]}"; do
    exe=${src%.go}.$suffix
    if stale "$exe" "$(dirname "$src")" || [ -n "$(find validation/util -newer "$exe" -print -quit)" ]; then
        echo "building $exe" >&2
        go build "${overlay[@]}" -o "$exe" "./$src"
    fi
done

# Run: each test from the checkout's root (it reads rootfs-<arch>.tar.gz
# and runtimetest there), under a timeout, its TAP output kept.
taps=$OUT.d
rm -rf "$taps"
mkdir -p "$taps"
{
    echo "# OCI validation: $RUNTIME"
    echo
    echo "runtime-tools $(git -C "$rt" rev-parse --short HEAD 2>/dev/null || cat "$rt/VERSION"), $(date -u +%Y-%m-%dT%H:%MZ), timeout ${TIMEOUT}s$([ "$WAIT_SCALE" -gt 1 ] && echo ", the suite's waits made $WAIT_SCALE times longer (WAIT_SCALE)")"
    echo
    echo "| test | result | ok | not ok |"
    echo "| --- | --- | --- | --- |"
} >"$OUT"
pass=0 fail=0 oks=0 notoks=0
for src in "${sources[@]}"; do
    test=$(basename "${src%.go}")
    [[ $test =~ $TESTS ]] || continue
    tap=$taps/$test.tap
    rc=0
    before=$(ls "$STATE_ROOT" 2>/dev/null || true)
    timeout -k 10 "$TIMEOUT" "./${src%.go}.$suffix" >"$tap" 2>&1 </dev/null || rc=$?
    # A test killed at its timeout leaves its container: deleted, so that
    # it does not get in the next test's way (its cgroup path, its id).
    if [ "$rc" -eq 124 ]; then
        for id in $(ls "$STATE_ROOT" 2>/dev/null || true); do
            grep -qxF "$id" <<<"$before" || "$RUNTIME" delete --force "$id" >/dev/null 2>&1 || true
        done
    fi
    ok=$(grep -c '^ok ' "$tap" || true)
    notok=$(grep -c '^not ok ' "$tap" || true)
    # A YAML diagnostic with an "error" that belongs to no test line is how
    # several tests (the hooks ones) report a failure without an assertion.
    orphans=$(awk '/^  ---/ { yaml = 1; orphan = !owner; owner = 0; next }
                   /^  \.\.\./ { yaml = 0; next }
                   yaml && orphan && /^    "error":/ { n++; orphan = 0 }
                   !yaml && /^(not )?ok / { owner = 1 }
                   END { print n + 0 }' "$tap")
    # Passed: it exited 0, its plan ("1..N") was printed, no assertion
    # failed (a skip counts as ok, as in TAP) and no failure was reported.
    if [ "$rc" -eq 0 ] && [ "$notok" -eq 0 ] && [ "$orphans" -eq 0 ] && grep -q '^1\.\.[0-9]' "$tap"; then
        result=pass pass=$((pass + 1))
    else
        result=fail fail=$((fail + 1))
        [ "$rc" -eq 124 ] && result="fail (timeout)"
    fi
    oks=$((oks + ok)) notoks=$((notoks + notok))
    printf '%-40s %-16s %4s ok %4s not ok\n' "$test" "$result" "$ok" "$notok"
    echo "| $test | $result | $ok | $notok |" >>"$OUT"
done
echo "| **total** | **$pass pass, $fail fail** | $oks | $notoks |" >>"$OUT"
printf '%-40s %-16s %4s ok %4s not ok\n' total "$pass/$((pass + fail)) pass" "$oks" "$notoks"
echo "table: $OUT; TAP output: $taps/" >&2
