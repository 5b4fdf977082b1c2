#!/usr/bin/env bash
# qcall's one entry point on a fresh machine: sets itself up, then runs.
#
#   ./run.sh demo [ARGS]    set up, then run `qcall demo` (the main job)
#   ./run.sh test [ARGS]    set up, then run the test suite (pytest ARGS)
#   ./run.sh setup          set up only: apt packages, .venv, pip install
#   ./run.sh qcall ARGS     set up, then run any qcall command
#
# Set-up is idempotent and quick when nothing changed. It installs Debian's
# portaudio19-dev (for microphone and speaker), and pulseaudio, pulseaudio-utils
# and espeak-ng (the sound-server device tests), when it can (root or sudo);
# when it cannot, it says so and carries on without live audio, which the
# demo and the tests do not need. PYTHON selects the interpreter (>= 3.11).
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '\033[1m[qcall setup]\033[0m %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      PYTHON=$candidate; break
    fi
  done
fi
[ -n "$PYTHON" ] || die "Python >= 3.11 not found; on Debian: apt-get install python3 (bookworm has 3.11)"

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo "$@"
  else return 1
  fi
}

apt_install() {  # apt_install PKG...: install missing Debian packages if we can
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || { say "not Debian: please install ${missing[*]} yourself"; return 1; }
  say "installing Debian packages: ${missing[*]}"
  local log
  log=$(mktemp)
  if as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$log" 2>&1 &&
     as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >>"$log" 2>&1; then
    rm -f "$log"; return 0
  fi
  [ -s "$log" ] && tail -n 5 "$log" >&2
  rm -f "$log"
  say "could not install ${missing[*]} (need root or passwordless sudo): run"
  say "    sudo apt-get install ${missing[*]}"
  return 1
}

setup() {
  local extras="test"
  if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    apt_install python3-venv || die "python3-venv is needed to create the virtual environment"
  fi
  if command -v dpkg-query >/dev/null 2>&1; then
    # A user-space sound server with virtual devices for the device tests and
    # scripts/bench_audio_latency.py (qcall/call/soundserver.py); speech for them.
    apt_install pulseaudio pulseaudio-utils espeak-ng ||
      say "continuing without pulseaudio: the sound-server device tests will skip"
    if apt_install portaudio19-dev; then
      extras="test,audio"
      command -v gcc >/dev/null 2>&1 || apt_install gcc python3-dev || extras="test"
    else
      say "continuing without live audio (files and test tones still work)"
    fi
  fi
  if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $PYTHON"
    "$PYTHON" -m venv .venv || die "could not create .venv"
  fi
  local stamp=.venv/.qcall-installed
  local want
  want="$extras $(cat pyproject.toml | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "installing qcall and its dependencies into .venv ($extras)"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    if ! .venv/bin/python -m pip install -q -e ".[$extras]" 2> .venv/pip-error.log; then
      if [ "$extras" != test ]; then
        say "installing with audio failed (see .venv/pip-error.log); retrying without pyaudio"
        extras=test
        .venv/bin/python -m pip install -q -e ".[$extras]" 2> .venv/pip-error.log ||
          { cat .venv/pip-error.log >&2; die "pip install failed"; }
      else
        cat .venv/pip-error.log >&2; die "pip install failed"
      fi
    fi
    echo "$want" > "$stamp"
  fi
}

test_services() {  # servers the scale-out tests start themselves (docs/signaling.md)
  apt_install redis-server coturn tcpdump iptables iproute2 iputils-ping ||
    say "continuing without some servers: their tests are skipped, saying why"
  command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 ||
    apt_install postgresql || true
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  demo)  setup; exec .venv/bin/qcall demo "$@" ;;
  test)  setup; test_services
         # the operations dashboard's browser test (tests/test_dashboard.py) drives Debian's chromium
         apt_install chromium chromium-driver || say "continuing without chromium: the browser test skips"
         exec .venv/bin/python -m pytest "$@" ;;
  qcall) setup; exec .venv/bin/qcall "$@" ;;
  *) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
