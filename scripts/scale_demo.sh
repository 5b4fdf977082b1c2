#!/usr/bin/env bash
# Several signaling instances behind one URL list, on one Redis and one PostgreSQL: a call
# and messages (pushed) across instances, an instance killed with SIGKILL mid-call
# (scripts/scale_demo.py).
#   scripts/scale_demo.sh [--instances N]
# Needs redis-server and PostgreSQL (./run.sh test installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || ./run.sh setup
exec .venv/bin/python scripts/scale_demo.py "$@"
