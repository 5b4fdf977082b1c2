#!/usr/bin/env bash
# Several signaling instances behind one URL list, on one Redis: a call across
# instances, an instance killed with SIGKILL mid-call (scripts/scale_demo.py).
#   scripts/scale_demo.sh [--instances N]
# Needs redis-server (./run.sh test installs it; or apt-get install redis-server).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || ./run.sh setup
exec .venv/bin/python scripts/scale_demo.py "$@"
