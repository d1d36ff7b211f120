# shellcheck shell=bash
# Command-line options of the msrun form of run_distribute.sh; sourced by it, not executed.
# Uses usage_error and is_uint (_common.sh) and START, END, RANK_SIZE, MULTI_NODE (parse_args).

# split_options ARG...: take the msrun options out of the command line (OPT_*); the other
# arguments are left, in order, in POSITIONAL.
split_options() {
    POSITIONAL=()
    OPT_MASTER_ADDR="" OPT_MASTER_PORT="" OPT_NODES="" OPT_NODE_RANK="" OPTS_GIVEN=()
    local name value
    while [[ $# -gt 0 ]]; do
        case "$1" in
            -h | --help) usage; exit 0 ;;
            --master_addr | --master_port | --nodes | --node_rank)
                [[ $# -ge 2 ]] || usage_error "$1 needs a value"
                name="$1" value="$2"; shift 2 ;;
            --master_addr=* | --master_port=* | --nodes=* | --node_rank=*)
                name="${1%%=*}" value="${1#*=}"; shift ;;
            --msrun) POSITIONAL+=("$1"); shift; continue ;;
            --*) usage_error "unknown option $1" ;;
            *) POSITIONAL+=("$1"); shift; continue ;;
        esac
        [[ -n "$value" ]] || usage_error "$name needs a value"
        case "$name" in
            --master_addr) OPT_MASTER_ADDR="$value" ;;
            --master_port) OPT_MASTER_PORT="$value" ;;
            --nodes) OPT_NODES="$value" ;;
            --node_rank) OPT_NODE_RANK="$value" ;;
        esac
        OPTS_GIVEN+=("$name")
    done
}

# msrun_settings: MASTER_ADDR_, MASTER_PORT_, NODES, NODE_RANK_ from the options, the environment
# and DEVICE_RANGE/RANK_SIZE, checked against each other (usage error, exit 2, on a conflict).
msrun_settings() {
    local local_n=$((END - START)) from
    MASTER_ADDR_="${OPT_MASTER_ADDR:-${MASTER_ADDR:-127.0.0.1}}"
    [[ "$MASTER_ADDR_" =~ ^[A-Za-z0-9._:-]+$ ]] ||
        usage_error "master address must be an IP address or a host name, got '$MASTER_ADDR_'"
    MASTER_PORT_="${OPT_MASTER_PORT:-${MASTER_PORT:-8118}}"
    if ! is_uint "$MASTER_PORT_" || ((${#MASTER_PORT_} > 5 || 10#$MASTER_PORT_ < 1 || 10#$MASTER_PORT_ > 65535)); then
        usage_error "master port must be a number from 1 to 65535, got '$MASTER_PORT_'"
    fi
    MASTER_PORT_=$((10#$MASTER_PORT_))
    if [[ -n "$OPT_NODES" ]]; then
        is_uint "$OPT_NODES" && ((10#$OPT_NODES >= 1)) || usage_error "--nodes must be a positive integer, got '$OPT_NODES'"
        NODES=$((10#$OPT_NODES))
        if ((MULTI_NODE)) && ((RANK_SIZE != NODES * local_n)); then
            usage_error "--nodes $NODES x $local_n ranks per node (DEVICE_RANGE [$START,$END]) is $((NODES * local_n)) ranks, but RANK_SIZE is $RANK_SIZE"
        fi
        if ((!MULTI_NODE && NODES > 1)); then
            RANK_SIZE=$((NODES * local_n)) MULTI_NODE=1
            ((END <= RANK_SIZE)) || usage_error "DEVICE_RANGE [$START,$END] is beyond the $RANK_SIZE ranks of --nodes $NODES (ranks are START..END-1)"
        fi
    elif ((MULTI_NODE)); then
        ((RANK_SIZE % local_n == 0)) ||
            usage_error "RANK_SIZE $RANK_SIZE is not a multiple of the $local_n ranks per node of DEVICE_RANGE [$START,$END]"
        NODES=$((RANK_SIZE / local_n))
    else
        NODES=1
    fi
    if ((MULTI_NODE)); then
        ((START % local_n == 0)) ||
            usage_error "DEVICE_RANGE [$START,$END] is not one whole node: START must be a multiple of $local_n (END-START)"
    fi
    local derived=$((MULTI_NODE ? START / local_n : 0))
    if [[ -n "$OPT_NODE_RANK" ]]; then
        NODE_RANK_="$OPT_NODE_RANK" from="--node_rank"
    elif [[ -n "${NODE_RANK:-}" ]]; then
        NODE_RANK_="$NODE_RANK" from="NODE_RANK"
    else
        NODE_RANK_=$derived from=""
    fi
    is_uint "$NODE_RANK_" || usage_error "$from must be a non-negative integer, got '$NODE_RANK_'"
    NODE_RANK_=$((10#$NODE_RANK_))
    ((NODE_RANK_ < NODES)) || usage_error "$from $NODE_RANK_ must be smaller than the number of nodes ($NODES)"
    ((NODE_RANK_ == derived)) ||
        usage_error "$from $NODE_RANK_ disagrees with DEVICE_RANGE [$START,$END], which holds the ranks of node $derived; use [$((NODE_RANK_ * local_n)),$(((NODE_RANK_ + 1) * local_n))]"
    local t="${CLUSTER_TIME_OUT:-120}" g="${GLM_MSRUN_GRACE:-10}"
    is_uint "$t" || usage_error "CLUSTER_TIME_OUT must be a number of seconds, got '$t'"
    is_uint "$g" || usage_error "GLM_MSRUN_GRACE must be a number of seconds, got '$g'"
}
