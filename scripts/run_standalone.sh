#!/usr/bin/env bash
# Run one glm-launcher job on a single device.
#
#   bash scripts/run_standalone.sh CONFIG_PATH DEVICE_ID RUN_STATUS
#
# Runs `python run_glm.py --config CONFIG_PATH --use_parallel False --run_mode RUN_STATUS
# --device_id DEVICE_ID --output_dir OUTPUT_DIR` in the foreground from the current directory,
# with DEVICE_ID exported. OUTPUT_DIR is the config's top-level `output_dir` (default ./output,
# relative to $PWD); the log is OUTPUT_DIR/log/rank_0/glm.log (also shown on the console).
# The exit code is the job's. Environment: PYTHON, GLM_ENTRY, GLM_LAUNCH_DRY_RUN (see _common.sh).
set -euo pipefail

# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
    cat <<'EOF'
Usage: bash scripts/run_standalone.sh CONFIG_PATH DEVICE_ID RUN_STATUS
  CONFIG_PATH  YAML config (relative paths are resolved against the current directory)
  DEVICE_ID    device number, e.g. 0
  RUN_STATUS   train | finetune | eval | predict | export
Example: bash scripts/run_standalone.sh configs/glm2/run_glm2_6b_lora.yaml 0 finetune
Environment: PYTHON (interpreter), GLM_ENTRY (entry point, default <repo>/run_glm.py),
             GLM_LAUNCH_DRY_RUN=1 (print the environment and command, run nothing)
EOF
}

parse_args() {
    [[ $# -eq 3 ]] || usage_error "expected 3 arguments, got $#"
    CONFIG="$(abs_path "$1")"
    DEVICE_ID="$2"
    RUN_STATUS="$3"
    [[ -f "$CONFIG" ]] || usage_error "config file $CONFIG not found"
    is_uint "$DEVICE_ID" || usage_error "DEVICE_ID must be a non-negative integer, got '$DEVICE_ID'"
    case "$RUN_STATUS" in
        train | finetune | eval | predict | export) ;;
        *) usage_error "RUN_STATUS must be train, finetune, eval, predict or export, got '$RUN_STATUS'" ;;
    esac
}

main() {
    parse_args "$@"
    find_python
    check_entry
    local out log
    out="$(output_dir_of "$CONFIG")"
    log="$out/log/rank_0/glm.log"
    local cmd=("$PYTHON" "$GLM_ENTRY" --config "$CONFIG" --use_parallel False --run_mode "$RUN_STATUS"
        --device_id "$DEVICE_ID" --output_dir "$out")

    if [[ "${GLM_LAUNCH_DRY_RUN:-0}" == 1 ]]; then
        echo "[dry run] standalone, log $log"
        show_cmd "DEVICE_ID=$DEVICE_ID" -- "${cmd[@]}"
        return 0
    fi

    mkdir -p "$(dirname "$log")"
    echo "glm-launcher: $RUN_STATUS on device $DEVICE_ID, log $log" >&2
    export DEVICE_ID
    local rc=0
    "${cmd[@]}" 2>&1 | tee "$log" || rc=$?
    if ((rc != 0)); then
        echo "error: $RUN_STATUS exited with code $rc; see $log" >&2
    fi
    return "$rc"
}

main "$@"
