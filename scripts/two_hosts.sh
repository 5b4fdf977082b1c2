#!/usr/bin/env bash
# The two-machine Beijing–Hefei call (docs/two-machines.md), reproduced on one machine.
#
# Two network namespaces stand for the two hosts, each with one interface:
#
#   host A (netns qa-*)         the wire (netns qw-*)            host B (netns qb-*)
#   va 10.77.0.1/24 ──veth── wa  [two_hosts_wire.py: delay]  wb ──veth── vb 10.77.0.2/24
#
# Host A runs the signaling server, the Beijing side of the QKD network (its KME)
# and alice; host B runs the Hefei side (its KME) and bob. The split link
# Jinan–Taian's BB84 and relay hop, the signaling and the call's media all cross
# the wire, which delays every frame by the beijing-hefei one-way delay
# (qcall.call.netem PROFILES: 965 km x 4.9 us/km + 16 x 50 us), in user space
# because this kernel has no netem. The commands run in each namespace are the
# ones docs/two-machines.md gives for real hosts.
#
# Usage: scripts/two_hosts.sh [--keep DIR] [--seconds N]     (as root: ip netns)
# Env:   PYTHON (default: .venv/bin/python or python3), DELAY_MS, SPEEDUP, BLOCK_PULSES
# Prints the call report (JSON) on stdout; exit 0 when every check holds.
# Only addresses inside the namespaces (10.77.0.0/24) are used; all is removed on exit,
# whatever the exit path (success, failure, Ctrl-C, SIGTERM): every process started is
# killed by its PID (with --keep too; --keep keeps the files only).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
SECONDS_CALL=6
KEEP=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --keep) KEEP="$2"; shift 2 ;;
        --seconds) SECONDS_CALL="$2"; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "two_hosts.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null; then how="sudo $0"; else how="run it as root"; fi
    echo "two_hosts.sh: needs root for ip netns: $how" >&2
    exit 2
fi
command -v ip >/dev/null || { echo "two_hosts.sh: needs iproute2 (ip)" >&2; exit 2; }

TAG=$$
NA=qa-$TAG NB=qb-$TAG NW=qw-$TAG
A_IP=10.77.0.1 B_IP=10.77.0.2
SIG_PORT=8765 SITE_PORT=7400
TONE=440
if [[ -n "$KEEP" ]]; then WORK=$KEEP; mkdir -p "$WORK"; else WORK=$(mktemp -d /tmp/qcall-two-hosts.XXXXXX); fi
WORK=$(cd "$WORK" && pwd)
mkdir -p "$WORK/a" "$WORK/b"
PIDS=()

log() { echo "two_hosts: $*" >&2; }

cleanup() {
    local status=$?
    trap '' INT TERM   # cleanup runs to its end
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for _ in $(seq 50); do   # 5 s for a clean exit, then SIGKILL
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        (( alive )) || break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for ns in "$NA" "$NB" "$NW"; do ip netns del "$ns" 2>/dev/null || true; done
    if [[ -z "$KEEP" ]]; then rm -rf "$WORK"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# On host A or host B: `qcall …` exactly as docs/two-machines.md has it.
on_a() { ip netns exec "$NA" env -u QCALL_HOME PYTHONUNBUFFERED=1 "$@"; }
on_b() { ip netns exec "$NB" env -u QCALL_HOME PYTHONUNBUFFERED=1 "$@"; }
# In the background, recording the PID of the process itself (`ip netns exec` and `env`
# exec it): `on_a … &` would record a subshell's PID and leave the process running.
bg_a() { ip netns exec "$NA" env -u QCALL_HOME PYTHONUNBUFFERED=1 "$@" & PIDS+=($!); }
bg_b() { ip netns exec "$NB" env -u QCALL_HOME PYTHONUNBUFFERED=1 "$@" & PIDS+=($!); }
QCALL=("$PYTHON" -m qcall)

fail() {
    log "$*"
    for f in "$WORK"/a/*.log "$WORK"/b/*.log; do
        [[ -f "$f" ]] && { echo "--- $f (last lines)" >&2; tail -n 15 "$f" >&2; }
    done
    exit 1
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2; shift 2
    local deadline=$((SECONDS + limit))
    until "$@"; do
        (( SECONDS < deadline )) || fail "timed out after ${limit} s waiting for $what"
        sleep 0.2
    done
}

# --- the two hosts and the wire ---------------------------------------------------------
DELAY_MS=${DELAY_MS:-$("$PYTHON" -c 'from qcall.call.netem import PROFILES; print(PROFILES["beijing-hefei"].delay_ms)')}
log "namespaces $NA (A, $A_IP) and $NB (B, $B_IP), wire $NW with ${DELAY_MS} ms one-way delay"
for ns in "$NA" "$NB" "$NW"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip link add va netns "$NA" type veth peer name wa netns "$NW"
ip link add vb netns "$NB" type veth peer name wb netns "$NW"
ip -n "$NA" addr add "$A_IP/24" dev va
ip -n "$NB" addr add "$B_IP/24" dev vb
for host in "$NA:va" "$NB:vb"; do
    ns=${host%%:*} dev=${host##*:}
    ip -n "$ns" link set "$dev" gso_max_segs 1          # real frames on the wire, no GSO
    ip netns exec "$ns" "$PYTHON" "$HERE/two_hosts_wire.py" --tx-csum-off "$dev"
    ip -n "$ns" link set "$dev" up
done
ip -n "$NW" link set wa up promisc on
ip -n "$NW" link set wb up promisc on
ip netns exec "$NW" "$PYTHON" "$HERE/two_hosts_wire.py" --delay-ms "$DELAY_MS" wa wb \
    >"$WORK/wire.log" 2>&1 &
WIRE=$!
PIDS+=("$WIRE")

# --- provisioning (docs/two-machines.md step 1): on A, then copied to B -----------------
on_a "${QCALL[@]}" network-site init --topology beijing-hefei --split Jinan-Taian \
    --out "$WORK/a/bundle" >"$WORK/a/init.log" 2>&1 || fail "network-site init failed"
cp -a "$WORK/a/bundle" "$WORK/b/bundle"       # stands for scp over a secure channel
on_a "${QCALL[@]}" --home "$WORK/a/alice" identity new --name alice >"$WORK/a/identity.log" 2>&1
on_b "${QCALL[@]}" --home "$WORK/b/bob" identity new --name bob >"$WORK/b/identity.log" 2>&1

# --- host A: signaling server and the Beijing site; host B: the Hefei site ---------------
bg_a "$PYTHON" -m signaling --host "$A_IP" --port "$SIG_PORT" >"$WORK/a/signaling.log" 2>&1
SITE_OPTS=(--speedup "${SPEEDUP:-1}" --pool 8 --json-status)
[[ -n "${BLOCK_PULSES:-}" ]] && SITE_OPTS+=(--block-pulses "$BLOCK_PULSES")
bg_a "${QCALL[@]}" network-site run --bundle "$WORK/a/bundle" --site Beijing \
    --listen "$A_IP:$SITE_PORT" --state "$WORK/a/net" "${SITE_OPTS[@]}" \
    >"$WORK/a/site.jsonl" 2>"$WORK/a/site.log"
bg_b "${QCALL[@]}" network-site run --bundle "$WORK/b/bundle" --site Hefei \
    --connect "$A_IP:$SITE_PORT" --state "$WORK/b/net" "${SITE_OPTS[@]}" \
    >"$WORK/b/site.jsonl" 2>"$WORK/b/site.log"
log "QKD sites starting; waiting for keys relayed across the split link Jinan-Taian"
SITES_STARTED=$(date +%s.%N)
wait_for 90 "both QKD sites to be ready" test -e "$WORK/a/net/ready" -a -e "$WORK/b/net/ready"
READY_S=$(awk -v a="$SITES_STARTED" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

# --- the call: bob listens on B, alice calls from A --------------------------------------
SIG_URL="ws://$A_IP:$SIG_PORT"
bg_b "${QCALL[@]}" --home "$WORK/b/bob" listen --auto-answer --once \
    --network "$WORK/b/net/network.json" --signaling "$SIG_URL" --rekey-interval 2 \
    --output "$WORK/b/bob.wav" --report "$WORK/b/bob.json" >"$WORK/b/bob.log" 2>&1
BOB=$!
wait_for 30 "bob to register" grep -q "listening as" "$WORK/b/bob.log"
log "bob is listening on host B; alice calls him from host A (${SECONDS_CALL} s, ${TONE} Hz)"
alice_status=0
on_a "${QCALL[@]}" --home "$WORK/a/alice" call bob \
    --network "$WORK/a/net/network.json" --signaling "$SIG_URL" --rekey-interval 2 \
    --tone "$TONE" --chirp-every 1 --seconds "$SECONDS_CALL" --quiet \
    --report "$WORK/a/alice.json" >"$WORK/a/alice.log" 2>&1 || alice_status=$?
bob_status=0
wait_for 30 "bob's report" test -e "$WORK/b/bob.json"
wait "$BOB" || bob_status=$?
log "call finished (alice exit $alice_status, bob exit $bob_status)"
sleep 1.2   # one more --json-status line from each site
kill "$WIRE" && wait "$WIRE" || true   # the wire writes its frame counts

report_status=0
"$PYTHON" "$HERE/two_hosts_report.py" "$WORK" --tone "$TONE" --delay-ms "$DELAY_MS" \
    --sites-ready-s "$READY_S" \
    || report_status=$?
[[ $report_status -eq 0 && $alice_status -eq 0 && $bob_status -eq 0 ]] || fail "checks failed"
log "ok"
