#!/usr/bin/env bash
# Run one glm-launcher job on a single device (MindFormers' interface):
#
#   bash scripts/run_standalone.sh CONFIG_PATH DEVICE_ID RUN_STATUS [key=value ...]
#
# = glm RUN_STATUS --config CONFIG_PATH --device_id DEVICE_ID (its log: OUTPUT_DIR/log/glm.log);
# `bash scripts/run_standalone.sh --help` for the details.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m glm.launch_scripts run_standalone "$@"
