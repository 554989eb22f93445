#!/usr/bin/env bash
# The two-node development cluster (`slurm/local/start.sh --nodes 2`, `make slurm-up NODES=2`):
# two compute nodes on this machine, each a slurmd in its own network + UTS namespace (own hostname,
# own address on a private bridge), with a controller of their own; munge and slurmdbd are the
# one-node cluster's. See slurm/README.md for why it is a second cluster and not two more nodes
# of the first one.
#
#   twonode.sh up               bridge, namespaces, /etc/hosts entries, config, slurmctld, both slurmds
#                               (idempotent: ~1 s when everything is up; needs the one-node cluster's
#                               munge and slurmdbd, which start.sh --nodes 2 starts first)
#   twonode.sh down             stop the daemons and remove everything `up` made, except the state
#                               directory and the rendered config (job ids continue next time)
#   twonode.sh kill-node NODE   pull a node's plug: SIGKILL every process in its network namespace
#                               (slurmd, slurmstepd, job tasks); `up` brings the node back
#   twonode.sh env              print `export SLURM_CONF=...` (eval it to use sinfo/squeue/... here)
#
# Addresses ($NET.0/24) exist only on the bridge and inside the namespaces this script creates; the
# namespaces have no default route, so nothing they send can leave the machine.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

TWO_STATE=$STATE/2node
TWO_CLUSTER=${IGFIQA_SLURM_2NODE_CLUSTER:-igfiqa2n}
TWO_PARTITION=multi
TWO_CONF_DIR=${IGFIQA_SLURM_2NODE_CONF_DIR:-/etc/slurm/local-2node}
TWO_CONF=$TWO_CONF_DIR/slurm.conf
CTLD_PORT=${IGFIQA_SLURM_2NODE_PORT:-6917}
SLURMD_TIMEOUT=15
NET=${IGFIQA_SLURM_2NODE_NET:-10.211.0}
BRIDGE=igfiqa-br0
BRIDGE_ADDR=$NET.1
NODES=(igfiqa-n1 igfiqa-n2)
NODE_IF=igf0 # the node's interface inside its namespace (GLOO_SOCKET_IFNAME of local-2node.yaml)
FIRST_JOB_ID_MIN=100000
HOSTS_BEGIN="# >>> igfiqa local-2node: added by slurm/local/start.sh --nodes 2, removed by stop.sh"
HOSTS_END="# <<< igfiqa local-2node"
HOSTS_FILE=${IGFIQA_HOSTS_FILE:-/etc/hosts} # another file only for the tests of this script
WAIT_S=${IGFIQA_SLURM_WAIT_S:-60}
# Bound on the wait for an empty queue before the controller is restarted on a new configuration.
QUEUE_WAIT_S=${IGFIQA_SLURM_QUEUE_WAIT_S:-600}

RUN_DIR=$TWO_STATE/run
LOG_DIR=$TWO_STATE/log

node_addr() { echo "$NET.$((10 + ${1##*n}))"; }
veth_of() { echo "$1-veth"; }
slurmd_pidfile() { echo "$RUN_DIR/slurmd-$1.pid"; }
ctld_pidfile() { echo "$RUN_DIR/slurmctld.pid"; }

# Slurm commands against this cluster (everything else on the machine talks to the one-node cluster).
two() { SLURM_CONF=$TWO_CONF "$@"; }

wait_for() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# ----------------------------------------------------------------------------- network

netns_exists() { [[ -e /run/netns/$1 ]]; }

# in_netns PID NS: the process lives in that network namespace.
in_netns() {
    [[ $(stat -L -c %i "/proc/$1/ns/net" 2>/dev/null) == "$(stat -L -c %i "/run/netns/$2" 2>/dev/null)" ]]
}

bridge_ok() { ip -br addr show dev "$BRIDGE" 2>/dev/null | grep -q "$BRIDGE_ADDR/24"; }

node_net_ok() {
    local node=$1
    netns_exists "$node" && ip -n "$node" -br addr show dev "$NODE_IF" 2>/dev/null | grep -q "$(node_addr "$node")/24"
}

install_iproute2() {
    command -v apt-get >/dev/null || die "ip (iproute2) is needed for the two-node cluster and apt-get is not available"
    say "installing iproute2"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends iproute2 >>"$TWO_STATE/apt.log" 2>&1; then
        apt-get update -q >>"$TWO_STATE/apt.log" 2>&1 || die "apt-get update failed (log: $TWO_STATE/apt.log)"
        apt-get install -y -q --no-install-recommends iproute2 >>"$TWO_STATE/apt.log" 2>&1 \
            || die "apt-get install iproute2 failed (log: $TWO_STATE/apt.log)"
    fi
}

network_up() {
    if ! ip link show dev "$BRIDGE" >/dev/null 2>&1; then
        say "creating bridge $BRIDGE ($BRIDGE_ADDR/24)"
        ip link add "$BRIDGE" type bridge || die "a Linux bridge is not available here: ip link add type bridge fails"
    fi
    ip addr replace "$BRIDGE_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local node veth
    for node in "${NODES[@]}"; do
        veth=$(veth_of "$node")
        netns_exists "$node" || { say "creating network namespace $node"; ip netns add "$node"; }
        if ! ip -n "$node" link show dev "$NODE_IF" >/dev/null 2>&1; then
            ip link del "$veth" 2>/dev/null || true # a half-made pair from an interrupted run
            ip link add "$veth" type veth peer name "$node-tmp"
            ip link set "$node-tmp" netns "$node"
            ip -n "$node" link set "$node-tmp" name "$NODE_IF"
        fi
        ip link set "$veth" master "$BRIDGE" up
        ip -n "$node" addr replace "$(node_addr "$node")/24" dev "$NODE_IF"
        ip -n "$node" link set "$NODE_IF" up
        ip -n "$node" link set lo up
    done
}

network_down() {
    local node pids
    for node in "${NODES[@]}"; do
        if netns_exists "$node"; then
            pids=$(ip netns pids "$node" 2>/dev/null || true)
            if [[ -n $pids ]]; then
                say "killing what is left in namespace $node: $(echo "$pids" | tr '\n' ' ')"
                # shellcheck disable=SC2086
                kill -KILL $pids 2>/dev/null || true
            fi
            say "removing network namespace $node (and its veth pair)"
            ip netns del "$node"
        fi
        ip link del "$(veth_of "$node")" 2>/dev/null || true
    done
    if ip link show dev "$BRIDGE" >/dev/null 2>&1; then
        say "removing bridge $BRIDGE"
        ip link del "$BRIDGE"
    fi
}

# ----------------------------------------------------------------------------- /etc/hosts

hosts_block() {
    local node
    echo "$HOSTS_BEGIN"
    for node in "${NODES[@]}"; do echo "$(node_addr "$node") $node"; done
    echo "$HOSTS_END"
}

# The lines of a hosts file (stdin) outside our block, or (with "inside") the block itself.
hosts_filter() {
    awk -v begin="$HOSTS_BEGIN" -v end="$HOSTS_END" -v want="${1:-outside}" '
        $0 == begin { inside = 1 }
        (want == "inside") == (inside == 1) { print }
        $0 == end { inside = 0 }'
}

hosts_ok() { [[ $(hosts_filter inside <"$HOSTS_FILE") == "$(hosts_block)" ]]; }

# Rewrite $HOSTS_FILE in place (it may be a bind mount, which a rename would fail on), after
# checking that every line outside our block survives; the previous file is kept as hosts.backup.
write_hosts() {
    local content=$1
    if [[ $(hosts_filter <<<"$content") != "$(hosts_filter <"$HOSTS_FILE")" ]]; then
        die "refusing to rewrite $HOSTS_FILE: the new content would change lines this script did not add"
    fi
    cp "$HOSTS_FILE" "$TWO_STATE/hosts.backup"
    printf '%s\n' "$content" >"$TWO_STATE/hosts.tmp"
    cat "$TWO_STATE/hosts.tmp" >"$HOSTS_FILE"
    rm -f "$TWO_STATE/hosts.tmp"
}

hosts_up() {
    hosts_ok && return 0
    say "adding ${NODES[*]} to $HOSTS_FILE"
    write_hosts "$(hosts_filter <"$HOSTS_FILE")"$'\n'"$(hosts_block)"
}

hosts_down() {
    grep -qxF "$HOSTS_BEGIN" "$HOSTS_FILE" || return 0
    say "removing ${NODES[*]} from $HOSTS_FILE"
    write_hosts "$(hosts_filter <"$HOSTS_FILE")"
}

# ----------------------------------------------------------------------------- configuration

render_conf() {
    local detected hardware memory nodes="" node first_job_id
    detected=$(slurmd -C | head -n 1)
    hardware=$(grep -oE '(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' <<<"$detected" | tr '\n' ' ')
    # Both nodes share this machine's memory: each is given half (of 95 %).
    memory=$(($(grep -oE 'RealMemory=[0-9]+' <<<"$detected" | cut -d= -f2) * 95 / 100 / ${#NODES[@]}))
    for node in "${NODES[@]}"; do
        nodes+="NodeName=$node NodeAddr=$(node_addr "$node") ${hardware% } RealMemory=$memory State=UNKNOWN"$'\n'
    done
    first_job_id=$(cat "$TWO_STATE/first_job_id" 2>/dev/null || echo "$FIRST_JOB_ID_MIN")
    local node_list
    node_list=$(
        IFS=,
        echo "${NODES[*]}"
    )
    sed -e "s|@CLUSTER@|$TWO_CLUSTER|g" -e "s|@STATE@|$TWO_STATE|g" -e "s|@CTLD_HOST@|$(hostname -s)|g" \
        -e "s|@BRIDGE_ADDR@|$BRIDGE_ADDR|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@PARTITION@|$TWO_PARTITION|g" \
        -e "s|@SLURMD_TIMEOUT@|$SLURMD_TIMEOUT|g" -e "s|@FIRST_JOB_ID@|$first_job_id|g" \
        -e "s|@NODE_LIST@|$node_list|g" "$HERE/slurm-2node.conf.template" \
        | NODE_LINES=${nodes%$'\n'} awk '$0 == "@NODES@" { print ENVIRON["NODE_LINES"]; next } { print }'
}

conf_current() { [[ -f $TWO_CONF ]] && [[ $(cat "$TWO_CONF") == "$(render_conf)" ]]; }

# The first job id: above the one-node cluster's ids, and above any id accounting already knows
# for this cluster (its state directory may have been wiped), so no id and no submitit result file
# is ever reused.
choose_first_job_id() {
    [[ -f $TWO_STATE/first_job_id ]] && return 0
    local last_id
    last_id=$(mariadb --batch --skip-column-names \
        -e "SELECT COALESCE(MAX(id_job), 0) FROM slurm_acct_db.${TWO_CLUSTER}_job_table" 2>/dev/null || echo 0)
    echo $((last_id >= FIRST_JOB_ID_MIN ? last_id + 1 : FIRST_JOB_ID_MIN)) >"$TWO_STATE/first_job_id"
}

# ----------------------------------------------------------------------------- daemons

ctld_alive() { recorded_pid "$(ctld_pidfile)" slurmctld >/dev/null; }
ctld_ok() { two scontrol ping 2>/dev/null | grep -q 'is UP'; }

slurmd_pid() {
    local pid
    pid=$(recorded_pid "$(slurmd_pidfile "$1")" slurmd) && in_netns "$pid" "$1" && echo "$pid"
}
slurmd_alive() { slurmd_pid "$1" >/dev/null; }

node_state() { two sinfo --noheader --nodes="$1" --format=%T 2>/dev/null | head -n 1; }

node_usable() {
    case $(node_state "$1") in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

# A node left drained or down (a node-loss test, a step that could not be killed) is resumed;
# "down*" (not responding) clears by itself once its slurmd registers (ReturnToService=2).
node_ready() {
    local state
    state=$(node_state "$1")
    case $state in
        idle | mixed | allocated | completing) return 0 ;;
        drain* | down | fail)
            say "node $1 is $state: resuming it"
            two scontrol update NodeName="$1" State=RESUME >/dev/null 2>&1 || true
            ;;
    esac
    return 1
}

jobs_in_queue() { two squeue --noheader --format=%i 2>/dev/null | wc -l; }

queue_empty() { [[ $(jobs_in_queue) -eq 0 ]]; }

start_ctld() {
    ctld_alive && return 0
    rm -f "$(ctld_pidfile)"
    say "starting slurmctld of $TWO_CLUSTER ($BRIDGE_ADDR:$CTLD_PORT)"
    /usr/sbin/slurmctld -f "$TWO_CONF" </dev/null >>"$LOG_DIR/slurmctld.log" 2>&1 8>&- 9>&- \
        || { log_tail_file "$LOG_DIR/slurmctld.log"; die "slurmctld of $TWO_CLUSTER exited with status $?"; }
    wait_for 10 "slurmctld pid" ctld_alive || { log_tail_file "$LOG_DIR/slurmctld.log"; die "slurmctld of $TWO_CLUSTER did not stay up"; }
    wait_for "$WAIT_S" slurmctld ctld_ok || { log_tail_file "$LOG_DIR/slurmctld.log"; die "slurmctld of $TWO_CLUSTER does not answer scontrol ping after ${WAIT_S} s"; }
}

# start_node NODE: slurmd in the node's network namespace and a UTS namespace of its own, where
# the hostname is the node name; the mount namespace stays the machine's (one file system, as a
# shared file system would be). slurmd forks; the daemon stays in both namespaces.
start_node() {
    local node=$1 log
    log=$LOG_DIR/slurmd-$node.log
    slurmd_alive "$node" && return 0
    rm -f "$(slurmd_pidfile "$node")"
    install -d -m 0755 "$TWO_STATE/spool/$node"
    say "starting slurmd of $node ($(node_addr "$node"), namespace $node)"
    # nsenter, not `ip netns exec`: the latter mounts a fresh /sys, which hides /sys/fs/cgroup, and
    # slurmd 22.05 refuses to start without it (even with proctrack/linuxproc and task/none).
    nsenter --net="/run/netns/$node" -- unshare --uts -- /bin/sh -c 'hostname "$1" && exec /usr/sbin/slurmd -f "$2" -N "$1"' \
        sh "$node" "$TWO_CONF" </dev/null >>"$log" 2>&1 8>&- 9>&- \
        || { log_tail_file "$log"; die "slurmd of $node exited with status $?"; }
    wait_for 10 "slurmd of $node" slurmd_alive "$node" || { log_tail_file "$log"; die "slurmd of $node did not stay up"; }
}

log_tail_file() {
    if [[ -r $1 ]]; then
        say "last lines of $1:"
        tail -n 25 "$1" | sed 's/^/    /' >&2
    fi
}

# ----------------------------------------------------------------------------- up / down

all_up() {
    local node
    bridge_ok && hosts_ok && conf_current && ctld_alive && ctld_ok || return 1
    for node in "${NODES[@]}"; do
        node_net_ok "$node" && slurmd_alive "$node" && node_usable "$node" || return 1
    done
}

cmd_up() {
    if all_up 2>/dev/null; then
        say "already up: cluster $TWO_CLUSTER, nodes ${NODES[*]}, partition $TWO_PARTITION (SLURM_CONF=$TWO_CONF)"
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "the two-node cluster is not (fully) up and starting it needs root"
    install -d -m 0755 "$TWO_STATE" "$RUN_DIR" "$LOG_DIR" "$TWO_STATE/ctld" "$TWO_STATE/spool"
    exec 8>"$TWO_STATE/lock"
    flock -w 300 8 || die "another twonode.sh held $TWO_STATE/lock for 300 s"
    if all_up 2>/dev/null; then
        say "already up (started by a concurrent run)"
        return 0
    fi
    command -v ip >/dev/null || install_iproute2
    command -v nsenter >/dev/null && command -v unshare >/dev/null \
        || die "nsenter and unshare (util-linux) are needed for the two-node cluster"
    unshare --net --uts true 2>/dev/null \
        || die "network namespaces are not available here (a container without CAP_SYS_ADMIN?): unshare --net fails"
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || die "munge does not work: run slurm/local/start.sh first"

    network_up
    hosts_up

    sacctmgr --noheader --parsable2 list cluster format=cluster >/dev/null 2>&1 \
        || die "slurmdbd does not answer: run slurm/local/start.sh first"
    if ! sacctmgr --noheader --parsable2 list cluster format=cluster | grep -qx "$TWO_CLUSTER"; then
        sacctmgr --immediate add cluster "$TWO_CLUSTER" >/dev/null || die "could not register cluster $TWO_CLUSTER"
    fi
    [[ -f $TWO_STATE/ctld/job_state ]] || choose_first_job_id

    if install_conf; then
        say "configuration written to $TWO_CONF"
        restart_for_new_conf
    fi

    start_ctld
    local node
    for node in "${NODES[@]}"; do start_node "$node"; done
    for node in "${NODES[@]}"; do
        wait_for "$WAIT_S" "node $node" node_ready "$node" || {
            two scontrol show node "$node" >&2 || true
            log_tail_file "$LOG_DIR/slurmctld.log"
            log_tail_file "$LOG_DIR/slurmd-$node.log"
            die "node $node is $(node_state "$node"), not idle, after ${WAIT_S} s"
        }
    done
    say "up: cluster $TWO_CLUSTER, nodes ${NODES[*]} ($(two sinfo --noheader --format=%T | sort -u | tr '\n' ' ')), partition $TWO_PARTITION; SLURM_CONF=$TWO_CONF"
}

# install_conf: write the rendered configuration when it changed; status 0 = changed.
install_conf() {
    local content
    content=$(render_conf)
    if [[ -f $TWO_CONF ]] && [[ $(cat "$TWO_CONF") == "$content" ]]; then
        return 1
    fi
    if [[ -s $TWO_CONF ]] && ! grep -q '^# Rendered by slurm/local/start.sh --nodes 2' "$TWO_CONF" && [[ -z ${IGFIQA_SLURM_OVERWRITE:-} ]]; then
        die "$TWO_CONF holds a configuration start.sh did not write; move it away or set IGFIQA_SLURM_OVERWRITE=1"
    fi
    install -d -m 0755 "$TWO_CONF_DIR"
    printf '%s\n' "$content" >"$TWO_CONF.tmp"
    chmod 0644 "$TWO_CONF.tmp"
    mv -f "$TWO_CONF.tmp" "$TWO_CONF"
}

# A new configuration reaches running daemons by a restart; the controller only restarts once its
# queue is empty (bounded wait), so no job of this cluster sees its controller go away.
restart_for_new_conf() {
    local node
    if ctld_alive; then
        if ctld_ok && ! queue_empty; then
            say "waiting (at most ${QUEUE_WAIT_S} s) for the $(jobs_in_queue) job(s) of $TWO_CLUSTER to end before restarting its controller"
            wait_for "$QUEUE_WAIT_S" "empty queue" queue_empty || die "jobs still queued on $TWO_CLUSTER after ${QUEUE_WAIT_S} s; the configuration was written but not applied (run again later)"
        fi
        say "restarting slurmctld of $TWO_CLUSTER to apply the new configuration"
        stop_recorded "$(ctld_pidfile)" slurmctld "slurmctld of $TWO_CLUSTER"
    fi
    for node in "${NODES[@]}"; do
        stop_recorded "$(slurmd_pidfile "$node")" slurmd "slurmd of $node"
    done
}

cmd_down() {
    [[ -d $TWO_STATE ]] || netns_exists "${NODES[0]}" || ip link show dev "$BRIDGE" >/dev/null 2>&1 || grep -qxF "$HOSTS_BEGIN" "$HOSTS_FILE" || {
        say "two-node cluster: nothing to stop"
        return 0
    }
    [[ $(id -u) -eq 0 ]] || die "stopping the two-node cluster needs root"
    install -d -m 0755 "$TWO_STATE" "$RUN_DIR"
    exec 8>"$TWO_STATE/lock"
    flock -w 300 8 || die "another twonode.sh held $TWO_STATE/lock for 300 s"
    local node
    for node in "${NODES[@]}"; do
        stop_recorded "$(slurmd_pidfile "$node")" slurmd "slurmd of $node"
    done
    network_down # also ends whatever job processes were left in the namespaces
    hosts_down
    stop_recorded "$(ctld_pidfile)" slurmctld "slurmctld of $TWO_CLUSTER"
    say "two-node cluster stopped (state kept in $TWO_STATE)"
}

cmd_kill_node() {
    local node=${1:-} pids
    [[ " ${NODES[*]} " == *" $node "* ]] || die "kill-node: expected one of ${NODES[*]}, got '${node}'"
    [[ $(id -u) -eq 0 ]] || die "kill-node needs root"
    netns_exists "$node" || die "kill-node: namespace $node does not exist"
    pids=$(ip netns pids "$node" | tr '\n' ' ')
    say "pulling the plug on $node: SIGKILL to ${pids:-no process}"
    # shellcheck disable=SC2086
    [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
    rm -f "$(slurmd_pidfile "$node")"
}

# Sourced (by the tests of its helpers), it only defines them.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    case ${1:-} in
        up) cmd_up ;;
        down) cmd_down ;;
        kill-node) cmd_kill_node "${2:-}" ;;
        env) echo "export SLURM_CONF=$TWO_CONF" ;;
        *) die "usage: $0 up | down | kill-node NODE | env" ;;
    esac
fi
