# shellcheck shell=bash
# Helpers shared by run_standalone.sh and run_distribute.sh; sourced, not executed.
#
# Environment understood by both scripts:
#   PYTHON               python interpreter (default: python, else python3)
#   GLM_ENTRY            the python entry point (default: <repo>/run_glm.py); tests point it at a stand-in
#   GLM_LAUNCH_DRY_RUN   1 = print each rank's environment and command, launch nothing
#   GLM_KILL_TIMEOUT     seconds between SIGTERM and SIGKILL when stopping ranks (default 5)

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GLM_ENTRY="${GLM_ENTRY:-$REPO/run_glm.py}"
GLM_KILL_TIMEOUT="${GLM_KILL_TIMEOUT:-5}"

# usage_error MESSAGE: print the message and the script's usage (function `usage`), exit 2.
usage_error() {
    echo "error: $1" >&2
    usage >&2
    exit 2
}

# die MESSAGE: one-line error, exit 1.
die() {
    echo "error: $1" >&2
    exit 1
}

is_uint() {
    [[ "$1" =~ ^[0-9]+$ ]]
}

# abs_path PATH: PATH made absolute against $PWD (~ expanded); the file need not exist.
abs_path() {
    local p="$1"
    if [[ "$p" == "~" ]]; then
        p="$HOME"
    elif [[ "${p:0:1}" == "~" && "${p:1:1}" == / ]]; then
        p="$HOME/${p#"~/"}"
    fi
    if [[ "$p" == /* ]]; then
        printf '%s\n' "$p"
    else
        printf '%s\n' "$PWD/$p"
    fi
}

# find_python: set PYTHON to an interpreter (absolute path when it can be resolved).
find_python() {
    local py="${PYTHON:-}"
    if [[ -z "$py" ]]; then
        if command -v python >/dev/null 2>&1; then py=python; else py=python3; fi
    fi
    if ! command -v "$py" >/dev/null 2>&1; then
        die "python interpreter '$py' not found (set PYTHON=/path/to/python)"
    fi
    PYTHON="$(command -v "$py")"
}

# check_entry: the python entry point must exist (skipped in dry-run mode).
check_entry() {
    if [[ "${GLM_LAUNCH_DRY_RUN:-0}" != 1 && ! -f "$GLM_ENTRY" ]]; then
        die "entry point $GLM_ENTRY not found (set GLM_ENTRY=/path/to/run_glm.py)"
    fi
}

# output_dir_of CONFIG: the YAML's top-level `output_dir` as an absolute path (default ./output).
output_dir_of() {
    local value
    value="$(sed -n -E 's/^output_dir:[[:space:]]*(.*)$/\1/p' "$1" | head -n 1)"
    value="${value%%#*}"                                   # strip a trailing comment
    value="$(printf '%s' "$value" | sed -E "s/^[[:space:]]*['\"]?//; s/['\"]?[[:space:]]*$//")"
    if [[ -z "$value" || "$value" == "null" || "$value" == "~" ]]; then   # `~` is YAML's null
        value="./output"
    fi
    abs_path "$value"
}

# show_cmd VAR=VALUE... -- CMD ARGS...: one shell-quoted line, as printed by the dry run.
show_cmd() {
    local out="" word
    while [[ $# -gt 0 && "$1" != "--" ]]; do
        out+="$(printf '%q' "$1") "
        shift
    done
    shift
    for word in "$@"; do
        out+="$(printf '%q' "$word") "
    done
    printf '%s\n' "${out% }"
}

# group_alive PID: true while any process of the process group PID is alive.
group_alive() {
    kill -0 -- "-$1" 2>/dev/null || kill -0 "$1" 2>/dev/null
}

# stop_groups PID...: SIGTERM each process group (and the process itself), SIGKILL after
# $GLM_KILL_TIMEOUT seconds for whatever is still alive.
stop_groups() {
    local pid waited=0 alive
    [[ $# -eq 0 ]] && return 0
    for pid in "$@"; do
        kill -TERM -- "-$pid" 2>/dev/null || true
        kill -TERM "$pid" 2>/dev/null || true
    done
    while ((waited < GLM_KILL_TIMEOUT * 10)); do
        alive=0
        for pid in "$@"; do
            if group_alive "$pid"; then alive=1; fi
        done
        ((alive)) || return 0
        sleep 0.1
        waited=$((waited + 1))
    done
    for pid in "$@"; do
        kill -KILL -- "-$pid" 2>/dev/null || true
        kill -KILL "$pid" 2>/dev/null || true
    done
}

# show_log_tail FILE: the last lines of a failed rank's log, indented.
show_log_tail() {
    if [[ -f "$1" ]]; then
        echo "---- last lines of $1 ----" >&2
        tail -n 20 "$1" | sed 's/^/  | /' >&2
    fi
}
