# Shared helpers of slurm/local/start.sh and stop.sh (sourced, not run).
# Every daemon of the local cluster has a PID file under $STATE/run; "alive" means that PID exists,
# runs the expected program and is not a zombie (without systemd, PID 1 reaps stopped daemons late).

# Every command in these scripts names its cluster: plain commands mean the one-node cluster of
# /etc/slurm/slurm.conf, twonode.sh passes the two-node cluster's SLURM_CONF itself. A SLURM_CONF
# exported by the caller (`eval "$(twonode.sh env)"`) must not redirect the one-node checks.
unset SLURM_CONF

STATE=${IGFIQA_SLURM_STATE:-/var/lib/igfiqa-slurm}
CLUSTER=${IGFIQA_SLURM_CLUSTER:-igfiqa}
PARTITION=${IGFIQA_SLURM_PARTITION:-debug}
RUN_DIR=$STATE/run
LOG_DIR=$STATE/log
MUNGE_LOG=/var/log/munge/munged.log
# Start order; stop.sh walks it backwards.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

say() { echo "[slurm-local] $*" >&2; }

die() {
    say "ERROR: $*"
    exit 1
}

pidfile_of() { echo "$RUN_DIR/$1.pid"; }

log_of() {
    case $1 in
        munged) echo "$MUNGE_LOG" ;;
        *) echo "$LOG_DIR/$1.log" ;;
    esac
}

# Print the last lines of a daemon's log, so a failure explains itself.
log_tail() {
    local log
    log=$(log_of "$1")
    if [[ -r $log ]]; then
        say "last lines of $log:"
        tail -n "${2:-25}" "$log" | sed 's/^/    /' >&2
    else
        say "($log does not exist)"
    fi
}

die_with_log() {
    local name=$1
    shift
    say "ERROR: $*"
    log_tail "$name"
    exit 1
}

# pid_alive PID COMM: the process exists, is not a zombie/dead, and its name is COMM.
pid_alive() {
    local pid=$1 comm=$2 stat state
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    state=${stat##*) }
    state=${state%% *}
    [[ $state != Z && $state != X ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]]
}

# recorded_pid PIDFILE COMM: the PID in PIDFILE when that process is alive and named COMM, else
# nothing (and status 1).
recorded_pid() {
    local pidfile=$1 comm=$2 pid
    [[ -r $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    pid_alive "$pid" "$comm" || return 1
    echo "$pid"
}

# daemon_pid NAME: the recorded PID when that daemon is alive, else nothing (and status 1).
daemon_pid() { recorded_pid "$(pidfile_of "$1")" "$1"; }

daemon_alive() { daemon_pid "$1" >/dev/null; }

# stop_recorded PIDFILE COMM [LABEL]: SIGTERM by recorded PID, wait, SIGKILL if it lingers; remove
# the PID file.
stop_recorded() {
    local pidfile=$1 comm=$2 label=${3:-$2} pid i
    if pid=$(recorded_pid "$pidfile" "$comm"); then
        say "stopping $label (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            pid_alive "$pid" "$comm" || break
            sleep 0.1
        done
        if pid_alive "$pid" "$comm"; then
            say "$label (pid $pid) ignored SIGTERM for 15 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
        fi
    fi
    rm -f "$pidfile"
}

# stop_daemon NAME: stop_recorded on the daemon's PID file under $RUN_DIR.
stop_daemon() { stop_recorded "$(pidfile_of "$1")" "$1"; }

# The node name slurmd registers under.
node_name() { hostname -s; }
