#!/usr/bin/env bash
# Launch a distributed glm-launcher job, one supervised process per device (MindFormers' interface):
#
#   bash scripts/run_distribute.sh RANK_TABLE_FILE|none CONFIG_PATH DEVICE_RANGE RUN_STATUS [RANK_SIZE] [PREDICT_DATA] [key=value ...]
#
# The launcher is glm/launch.py (`glm launch`); `bash scripts/run_distribute.sh --help` for the details.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m glm.launch_scripts run_distribute "$@"
