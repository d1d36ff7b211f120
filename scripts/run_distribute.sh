#!/usr/bin/env bash
# Launch a distributed glm-launcher job: one process per device, supervised.
#
#   bash scripts/run_distribute.sh RANK_TABLE_FILE CONFIG_PATH DEVICE_RANGE RUN_STATUS [RANK_SIZE] [PREDICT_DATA]
#
# RANK_TABLE_FILE is an HCCL rank table (Ascend), or `none` / `--msrun` to launch with msrun
# (no rank table; the only form that works on CPU and GPU). See `usage` below for the details.
set -euo pipefail

# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
# shellcheck source=scripts/_msrun_args.sh
source "$(dirname "${BASH_SOURCE[0]}")/_msrun_args.sh"

usage() {
    cat <<'EOF'
Usage: bash scripts/run_distribute.sh RANK_TABLE_FILE CONFIG_PATH DEVICE_RANGE RUN_STATUS [RANK_SIZE] [PREDICT_DATA]
       bash scripts/run_distribute.sh none CONFIG_PATH DEVICE_RANGE RUN_STATUS [RANK_SIZE] [PREDICT_DATA] [MSRUN OPTIONS]
  RANK_TABLE_FILE  HCCL rank-table JSON (tools/hccl_tools.py), or `none` / `--msrun` to launch with msrun
  CONFIG_PATH      YAML config; its top-level output_dir (default ./output) holds the logs
  DEVICE_RANGE     [START,END]: devices START..END-1 of this machine, e.g. [0,8]
  RUN_STATUS       train | finetune | eval | predict
  RANK_SIZE        total ranks over all machines (multi-machine only). Without it: one machine,
                   DEVICE_ID=i, RANK_ID=i-START. With it: RANK_ID=i, DEVICE_ID=i-START, so the
                   k-th server runs DEVICE_RANGE [8k,8k+8] and RANK_SIZE 8*servers.
  PREDICT_DATA     predict only: the 5th argument on one machine, the 6th after RANK_SIZE otherwise
Every rank runs from the current directory; rank k logs to OUTPUT_DIR/log/rank_k/glm.log.
If a rank fails, the others are stopped and the script exits non-zero naming the rank's log.
MSRUN OPTIONS (msrun form only, anywhere on the line, `--opt VALUE` or `--opt=VALUE`; they win over
the environment variables in brackets):
  --master_addr ADDR  scheduler host, the IP or name of node 0 [MASTER_ADDR, default 127.0.0.1]
  --master_port PORT  scheduler port, 1-65535 [MASTER_PORT, default 8118]
  --nodes N           number of machines; RANK_SIZE defaults to N*(END-START), and must equal it if given
  --node_rank K       this machine's index, 0 <= K < nodes [NODE_RANK]; on several machines it follows from
                      DEVICE_RANGE (K = START/(END-START)) and, if given, must agree with it
Examples:
  bash scripts/run_distribute.sh hccl_8p_01234567_10.0.0.1.json configs/glm2/run_glm2_6b_lora.yaml [0,8] finetune
  bash scripts/run_distribute.sh none configs/glm2/run_glm2_6b_lora.yaml [0,2] finetune            # msrun
  bash scripts/run_distribute.sh none cfg.yaml [8,16] finetune --nodes 2 --master_addr 10.0.0.1    # msrun, node 1 of 0..1
Environment:
  msrun form: MASTER_ADDR, MASTER_PORT, NODE_RANK (see above), CLUSTER_TIME_OUT (120 s), MSRUN (msrun
              executable), GLM_MSRUN_GRACE (10 s: how long msrun may take to stop after a worker failed
              before the launcher kills the job)
  PYTHON, GLM_ENTRY (entry point, default <repo>/run_glm.py), GLM_KILL_TIMEOUT (5 s),
  GLM_LAUNCH_DRY_RUN=1 (print each rank's environment and command, launch nothing)
EOF
}

parse_args() {
    [[ $# -ge 4 && $# -le 6 ]] || usage_error "expected 4 to 6 arguments, got $#"
    RANK_TABLE_ARG="$1"
    CONFIG="$(abs_path "$2")"
    local range="$3"
    RUN_STATUS="$4"
    [[ -f "$CONFIG" ]] || usage_error "config file $CONFIG not found"
    if [[ "$RANK_TABLE_ARG" == none || "$RANK_TABLE_ARG" == --msrun ]]; then
        USE_MSRUN=1
        RANK_TABLE_FILE=""
    else
        USE_MSRUN=0
        RANK_TABLE_FILE="$(abs_path "$RANK_TABLE_ARG")"
        [[ -f "$RANK_TABLE_FILE" ]] || usage_error "rank table $RANK_TABLE_FILE not found"
    fi
    if [[ ! "$range" =~ ^\[([0-9]+),([0-9]+)\]$ ]]; then
        usage_error "DEVICE_RANGE must look like [0,8] (two non-negative integers), got '$range'"
    fi
    START=$((10#${BASH_REMATCH[1]}))
    END=$((10#${BASH_REMATCH[2]}))
    ((START < END)) || usage_error "DEVICE_RANGE [$START,$END]: START must be smaller than END"
    case "$RUN_STATUS" in
        train | finetune | eval | predict) ;;
        *) usage_error "RUN_STATUS must be train, finetune, eval or predict, got '$RUN_STATUS'" ;;
    esac

    MULTI_NODE=0
    PREDICT_DATA=""
    HAVE_PREDICT_DATA=0
    local rank_size=""
    if [[ "$RUN_STATUS" == predict ]]; then
        if [[ $# -eq 5 ]]; then
            PREDICT_DATA="$5"; HAVE_PREDICT_DATA=1
        elif [[ $# -eq 6 ]]; then
            rank_size="$5"; PREDICT_DATA="$6"; HAVE_PREDICT_DATA=1
        fi
    else
        [[ $# -le 5 ]] || usage_error "PREDICT_DATA is only accepted with RUN_STATUS predict"
        if [[ $# -eq 5 ]]; then rank_size="$5"; fi
    fi
    if [[ -n "$rank_size" ]]; then
        is_uint "$rank_size" || usage_error "RANK_SIZE must be a positive integer, got '$rank_size'"
        RANK_SIZE=$((10#$rank_size))
        ((END <= RANK_SIZE)) || usage_error "RANK_SIZE $RANK_SIZE is too small for DEVICE_RANGE [$START,$END] (ranks are START..END-1)"
        MULTI_NODE=1
    else
        RANK_SIZE=$((END - START))
    fi
    if ((USE_MSRUN)); then
        msrun_settings
    elif [[ ${#OPTS_GIVEN[@]} -gt 0 ]]; then
        usage_error "${OPTS_GIVEN[0]} is only for the msrun form (RANK_TABLE_FILE none)"
    fi
}

# entry_args: the arguments every rank passes to run_glm.py.
entry_args() {
    ENTRY_ARGS=(--config "$CONFIG" --use_parallel True --run_mode "$RUN_STATUS" --output_dir "$OUT")
    if ((HAVE_PREDICT_DATA)); then
        ENTRY_ARGS+=(--predict_data "$PREDICT_DATA")
    fi
}

# ---------------------------------------------------------------------------------------------
# rank-table form: one background process per rank, supervised by this script
# ---------------------------------------------------------------------------------------------

PIDS=()
RANK_OF=()
LOG_OF=()
STOPPING=0

stop_ranks() {
    local live=() idx
    for idx in "${!PIDS[@]}"; do
        if group_alive "${PIDS[idx]}"; then live+=("${PIDS[idx]}"); fi
    done
    stop_groups "${live[@]+"${live[@]}"}"
    wait 2>/dev/null || true
}

# on_signal CODE: Ctrl-C / kill: stop every rank, exit 128+signal.
on_signal() {
    ((STOPPING)) && return
    STOPPING=1
    echo "glm-launcher: interrupted, stopping all ranks" >&2
    stop_ranks
    exit "$1"
}

launch_rank_table() {
    if ! PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m glm.parallel check-rank-table \
        "$RANK_TABLE_FILE" --rank-size "$RANK_SIZE" >/dev/null; then
        exit 1
    fi
    export RANK_TABLE_FILE RANK_SIZE
    local i rank device log
    trap 'on_signal 130' INT
    trap 'on_signal 143' TERM
    trap stop_ranks EXIT
    for ((i = START; i < END; i++)); do
        if ((MULTI_NODE)); then
            rank=$i; device=$((i - START))
        else
            rank=$((i - START)); device=$i
        fi
        log="$OUT/log/rank_$rank/glm.log"
        local envs=("RANK_TABLE_FILE=$RANK_TABLE_FILE" "RANK_ID=$rank" "DEVICE_ID=$device" "RANK_SIZE=$RANK_SIZE")
        if [[ "${GLM_LAUNCH_DRY_RUN:-0}" == 1 ]]; then
            echo "[dry run] rank $rank (device $device), log $log"
            show_cmd "${envs[@]}" -- "$PYTHON" "$GLM_ENTRY" "${ENTRY_ARGS[@]}"
            continue
        fi
        mkdir -p "$(dirname "$log")"
        {
            echo "# glm-launcher rank $rank: ${envs[*]}"
            echo "# $(show_cmd -- "$PYTHON" "$GLM_ENTRY" "${ENTRY_ARGS[@]}")"
        } >"$log"
        # setsid: each rank leads its own process group, so stopping it also stops its children.
        # The MS_* variables of a surrounding msrun job would switch MindSpore to dynamic networking.
        env -u MS_ROLE -u MS_NODE_ID -u MS_WORKER_NUM -u MS_SCHED_HOST -u MS_SCHED_PORT "${envs[@]}" \
            setsid "$PYTHON" "$GLM_ENTRY" "${ENTRY_ARGS[@]}" >>"$log" 2>&1 </dev/null &
        PIDS+=("$!")
        RANK_OF+=("$rank")
        LOG_OF+=("$log")
        echo "glm-launcher: rank $rank on device $device started (pid $!), log $log" >&2
    done
    if [[ "${GLM_LAUNCH_DRY_RUN:-0}" == 1 ]]; then
        trap - EXIT INT TERM
        return 0
    fi
    supervise_ranks
}

supervise_ranks() {
    local -a rc_of=()
    local idx pid rc finished
    while :; do
        finished=0
        for idx in "${!PIDS[@]}"; do
            if [[ -n "${rc_of[idx]:-}" ]]; then
                finished=$((finished + 1)); continue
            fi
            pid="${PIDS[idx]}"
            kill -0 "$pid" 2>/dev/null && continue
            rc=0
            wait "$pid" || rc=$?
            rc_of[idx]=$rc
            finished=$((finished + 1))
            if ((rc != 0)); then
                echo "error: rank ${RANK_OF[idx]} exited with code $rc; stopping the other ranks" >&2
                STOPPING=1
                stop_ranks
                show_log_tail "${LOG_OF[idx]}"
                echo "error: rank ${RANK_OF[idx]} failed (exit code $rc); see its log: ${LOG_OF[idx]}" >&2
                trap - EXIT
                exit 1
            fi
        done
        if ((finished == ${#PIDS[@]})); then
            trap - EXIT
            echo "glm-launcher: all ${#PIDS[@]} ranks finished; logs in $OUT/log/rank_*/glm.log" >&2
            return 0
        fi
        sleep 1
    done
}

# ---------------------------------------------------------------------------------------------
# msrun form: msrun starts the scheduler and the workers; this script bounds the time msrun needs
# to stop after a failure (its scheduler waits for a heartbeat time-out of ~30 s otherwise).
# ---------------------------------------------------------------------------------------------

MSRUN_PID=""
SHIM_DIR=""
declare -A WORKER_RANK=()

msrun_children() {
    pgrep -P "$MSRUN_PID" 2>/dev/null || true
}

# remember_workers: map msrun's worker pids to their RANK_ID (read from /proc/PID/environ).
remember_workers() {
    local child env_line
    for child in $(msrun_children); do
        [[ -n "${WORKER_RANK[$child]:-}" ]] && continue
        env_line="$({ tr '\0' '\n' <"/proc/$child/environ"; } 2>/dev/null || true)"
        if grep -qx 'MS_ROLE=MS_WORKER' <<<"$env_line"; then
            WORKER_RANK[$child]="$(sed -n 's/^RANK_ID=//p' <<<"$env_line" | head -n 1)"
        fi
    done
}

stop_msrun() {
    local pids=() p
    if [[ -n "$MSRUN_PID" ]]; then
        kill -INT "$MSRUN_PID" 2>/dev/null || true   # msrun's own handler kills its workers
        pids+=("$MSRUN_PID")
        for p in $(msrun_children) "${!WORKER_RANK[@]}"; do pids+=("$p"); done
    fi
    local live=()
    for p in "${pids[@]+"${pids[@]}"}"; do
        if group_alive "$p"; then live+=("$p"); fi
    done
    stop_groups "${live[@]+"${live[@]}"}"
    wait 2>/dev/null || true
    if [[ -n "$SHIM_DIR" ]]; then rm -rf "$SHIM_DIR"; fi
    SHIM_DIR=""
}

on_signal_msrun() {
    ((STOPPING)) && return
    STOPPING=1
    echo "glm-launcher: interrupted, stopping msrun and its workers" >&2
    stop_msrun
    exit "$1"
}

launch_msrun() {
    local local_n=$((END - START)) node_rank="$NODE_RANK_" master_addr="$MASTER_ADDR_"
    local master_port="$MASTER_PORT_" timeout="${CLUSTER_TIME_OUT:-120}" grace="${GLM_MSRUN_GRACE:-10}"
    local msrun="${MSRUN:-}"
    if [[ -z "$msrun" ]]; then
        if command -v msrun >/dev/null 2>&1; then msrun="$(command -v msrun)"; else msrun="$(dirname "$PYTHON")/msrun"; fi
    fi
    [[ -x "$msrun" || "${GLM_LAUNCH_DRY_RUN:-0}" == 1 ]] || die "msrun not found (install mindspore >= 2.3 or set MSRUN=/path/to/msrun)"

    local log_dir="$OUT/log/msrun" k
    local cmd=("$msrun" --worker_num="$RANK_SIZE" --local_worker_num="$local_n" --master_addr="$master_addr"
        --master_port="$master_port" --node_rank="$node_rank" --log_dir="$log_dir" --join=True
        --cluster_time_out="$timeout" "$GLM_ENTRY" "${ENTRY_ARGS[@]}")
    # msrun sets DEVICE_ID to the local index; on one machine, a range not starting at 0 is mapped
    # through the visible-device lists (Ascend, GPU) instead, unless the user set them.
    local envs=("RANK_SIZE=$RANK_SIZE") visible var
    if ((!MULTI_NODE && START > 0)); then
        visible="$(seq -s, "$START" $((END - 1)))"
        for var in ASCEND_RT_VISIBLE_DEVICES CUDA_VISIBLE_DEVICES; do
            if [[ -z "${!var:-}" ]]; then envs+=("$var=$visible"); fi
        done
    fi
    if [[ "${GLM_LAUNCH_DRY_RUN:-0}" == 1 ]]; then
        for ((k = 0; k < local_n; k++)); do
            echo "[dry run] rank $((node_rank * local_n + k)) (device $k): RANK_ID=$((node_rank * local_n + k)) DEVICE_ID=$k RANK_SIZE=$RANK_SIZE, log $OUT/log/rank_$((node_rank * local_n + k))/glm.log"
        done
        show_cmd "${envs[@]}" -- "${cmd[@]}"
        return 0
    fi

    mkdir -p "$log_dir"
    for ((k = node_rank * local_n; k < (node_rank + 1) * local_n; k++)); do
        mkdir -p "$OUT/log/rank_$k"
        ln -sfn "../msrun/worker_$k.log" "$OUT/log/rank_$k/glm.log"
    done
    # msrun always starts workers as `python ENTRY ...`: make `python` mean $PYTHON.
    SHIM_DIR="$(mktemp -d "${TMPDIR:-/tmp}/glm-msrun.XXXXXX")"
    printf '#!/usr/bin/env bash\nexec %q "$@"\n' "$PYTHON" >"$SHIM_DIR/python"
    chmod +x "$SHIM_DIR/python"
    trap 'on_signal_msrun 130' INT
    trap 'on_signal_msrun 143' TERM
    trap stop_msrun EXIT
    echo "glm-launcher: msrun with $local_n local workers (node $node_rank, $RANK_SIZE ranks in all)," \
        "logs $OUT/log/rank_*/glm.log -> $log_dir/worker_*.log" >&2
    # A RANK_TABLE_FILE left in the environment would make MindSpore on Ascend use the rank-table init.
    env -u RANK_TABLE_FILE PATH="$SHIM_DIR:$PATH" "${envs[@]}" setsid "${cmd[@]}" \
        >"$log_dir/msrun.log" 2>&1 </dev/null &
    MSRUN_PID=$!
    supervise_msrun "$log_dir" "$grace"
}

supervise_msrun() {
    local log_dir="$1" grace="$2" failed_at="" rc=0 line pid code rank
    while kill -0 "$MSRUN_PID" 2>/dev/null; do
        remember_workers
        if [[ -z "$failed_at" ]] && grep -q 'exit with exception' "$log_dir/msrun.log" 2>/dev/null; then
            failed_at=$SECONDS
            echo "error: a worker failed; waiting up to ${grace}s for msrun to stop the others" >&2
        fi
        if [[ -n "$failed_at" ]] && ((SECONDS - failed_at >= grace)); then
            echo "error: msrun did not stop within ${grace}s; killing the job" >&2
            break
        fi
        sleep 0.5
    done
    if kill -0 "$MSRUN_PID" 2>/dev/null; then
        stop_msrun
        rc=1
    else
        wait "$MSRUN_PID" || rc=$?
        stop_msrun   # workers of a crashed msrun, if any
    fi
    trap - EXIT INT TERM
    if ((rc == 0)); then
        echo "glm-launcher: all ranks finished; logs in $OUT/log/rank_*/glm.log" >&2
        return 0
    fi
    line="$(grep -m 1 -o 'Worker process [0-9]* exit with exception. Error code: -\?[0-9]*' "$log_dir/msrun.log" || true)"
    if [[ -n "$line" ]]; then
        pid="$(sed -E 's/Worker process ([0-9]+).*/\1/' <<<"$line")"
        code="${line##*: }"
        rank="${WORKER_RANK[$pid]:-}"
        if [[ -n "$rank" ]]; then
            show_log_tail "$log_dir/worker_$rank.log"
            echo "error: rank $rank failed (exit code $code); see its log: $OUT/log/rank_$rank/glm.log" >&2
            exit 1
        fi
        echo "error: worker pid $pid failed (exit code $code); see $log_dir/msrun.log and $log_dir/worker_*.log" >&2
        exit 1
    fi
    show_log_tail "$log_dir/msrun.log"
    echo "error: msrun exited with code $rc; see $log_dir/msrun.log and $log_dir/worker_*.log" >&2
    exit 1
}

main() {
    split_options "$@"
    parse_args "${POSITIONAL[@]+"${POSITIONAL[@]}"}"
    find_python
    check_entry
    OUT="$(output_dir_of "$CONFIG")"
    entry_args
    ulimit -u unlimited 2>/dev/null || true
    if ((USE_MSRUN)); then
        launch_msrun
    else
        launch_rank_table
    fi
}

main "$@"
