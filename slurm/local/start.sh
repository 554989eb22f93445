#!/usr/bin/env bash
# Start a real single-node SLURM cluster with accounting on this machine (Debian 12, root, no systemd):
# munged → MariaDB → slurmdbd → slurmctld → slurmd, each started by this script, PIDs recorded under
# $IGFIQA_SLURM_STATE (default /var/lib/igfiqa-slurm). Idempotent: when everything is up with the
# current configuration it only checks and returns (~1 s). Stop with slurm/local/stop.sh.
#
# The state directory is kept between runs on purpose: slurmctld's saved state holds the next job
# id, and a job id that restarts at 1 would let a reused submitit folder return an older job's result.
# Accounting (slurmdbd) is not optional: without sacct, submitit cannot see a job that was cancelled
# or died before writing its result, and job.result() waits forever.
#
# --nodes 2 also starts the two-node cluster (slurm/local/twonode.sh: two slurmds, each in its own
# network + UTS namespace on a private bridge, with a controller of their own) beside this one.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

nodes=1
while (($#)); do
    case $1 in
        --nodes) nodes=${2:-}; shift 2 || shift ;;
        --nodes=*) nodes=${1#--nodes=}; shift ;;
        *) die "usage: $0 [--nodes 1|2]" ;;
    esac
done
case $nodes in
    1) ;;
    2)
        # The one-node cluster first (its munge and slurmdbd serve both), then the two nodes.
        bash "$HERE/start.sh"
        exec bash "$HERE/twonode.sh" up
        ;;
    *) die "--nodes: 1 (the default cluster) or 2 (also the two-node cluster), got '$nodes'" ;;
esac

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
WAIT_S=${IGFIQA_SLURM_WAIT_S:-60}
NODE=$(node_name)
T0=$(date +%s%N)

elapsed() {
    local ms=$((($(date +%s%N) - T0) / 1000000))
    printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}

# ----------------------------------------------------------------------------- checks

packages_missing() {
    local p missing=()
    for p in "${PACKAGES[@]}"; do
        [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || missing+=("$p")
    done
    echo "${missing[@]}"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
mariadb_ok() { mysqladmin --silent ping >/dev/null 2>&1; }
ctld_ok() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
dbd_ok() { sacctmgr --noheader --parsable2 list cluster >/dev/null 2>&1; }

# The node's state as sinfo reports it ("idle", "mixed", "down*", ...).
node_state() { sinfo --noheader --nodes="$NODE" --format=%T 2>/dev/null | head -n 1; }

node_usable() {
    case $(node_state) in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll every 0.2 s.
wait_for() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# ----------------------------------------------------------------------------- configuration

# The hardware line of slurm.conf from what slurmd itself detects; RealMemory is trimmed to 95 %
# so the node is not declared invalid when the kernel reports a little less later.
render_slurm_conf() {
    local detected hardware memory first_job_id
    detected=$(slurmd -C | head -n 1)
    hardware=$(grep -oE '(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' <<<"$detected" | tr '\n' ' ')
    memory=$(grep -oE 'RealMemory=[0-9]+' <<<"$detected" | cut -d= -f2)
    memory=$((memory * 95 / 100))
    sed -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@STATE@|$STATE|g" -e "s|@NODE@|$NODE|g" \
        -e "s|@HARDWARE@|${hardware% }|g" -e "s|@MEMORY@|$memory|g" -e "s|@PARTITION@|$PARTITION|g" \
        "$HERE/slurm.conf.template"
    first_job_id=$(cat "$STATE/first_job_id" 2>/dev/null || true)
    if [[ -n $first_job_id ]]; then
        echo "# The accounting database already knew jobs when this state directory was created:"
        echo "# continue after them, so no job id (and no submitit result file) is ever reused."
        echo "FirstJobId=$first_job_id"
    fi
}

render_slurmdbd_conf() {
    sed -e "s|@STATE@|$STATE|g" -e "s|@DBPASS@|$(cat "$STATE/dbpass")|g" "$HERE/slurmdbd.conf.template"
}

# install_if_changed CONTENT PATH MODE: write only when the content differs; status 0 = changed.
install_if_changed() {
    local content=$1 path=$2 mode=$3
    if [[ -f $path ]] && [[ $(cat "$path") == "$content" ]]; then
        return 1
    fi
    install -d -m 0755 "$(dirname "$path")"
    printf '%s\n' "$content" >"$path.tmp"
    chmod "$mode" "$path.tmp"
    mv -f "$path.tmp" "$path"
    return 0
}

slurm_conf_current() {
    [[ -f /etc/slurm/slurm.conf ]] && [[ $(cat /etc/slurm/slurm.conf) == "$(render_slurm_conf)" ]]
}

# ----------------------------------------------------------------------------- fast path

all_up() {
    local d
    for d in slurmdbd slurmctld slurmd; do daemon_alive "$d" || return 1; done
    munge_ok && slurm_conf_current && ctld_ok && node_usable
}

if [[ -z $(packages_missing) ]] && all_up 2>/dev/null; then
    say "already up: cluster $CLUSTER, node $NODE $(node_state), partition $PARTITION ($(elapsed) s)"
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "the local cluster is not (fully) up and starting it needs root; run: sudo $0"

install -d -m 0755 "$STATE" "$RUN_DIR" "$LOG_DIR" "$STATE/ctld" "$STATE/spool"
# One start at a time: several test sessions may call this script together. Every daemon is started
# with fd 9 closed, or it would hold the lock for as long as it runs.
exec 9>"$STATE/lock"
flock -w 300 9 || die "another start.sh held $STATE/lock for 300 s"
if [[ -z $(packages_missing) ]] && all_up 2>/dev/null; then
    say "already up (started by a concurrent run)"
    exit 0
fi

# ----------------------------------------------------------------------------- packages

missing=$(packages_missing)
if [[ -n $missing ]]; then
    command -v apt-get >/dev/null || die "packages missing ($missing) and apt-get is not available"
    say "installing Debian packages: $missing"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null \
        || ! apt-get install -y -q --no-install-recommends $missing >"$STATE/apt.log" 2>&1; then
        apt-get update -q >>"$STATE/apt.log" 2>&1 || { tail -n 20 "$STATE/apt.log" >&2; die "apt-get update failed"; }
        # shellcheck disable=SC2086
        apt-get install -y -q --no-install-recommends $missing >>"$STATE/apt.log" 2>&1 \
            || { tail -n 20 "$STATE/apt.log" >&2; die "apt-get install failed (full log: $STATE/apt.log)"; }
    fi
    say "packages installed ($(elapsed) s)"
fi

# ----------------------------------------------------------------------------- munge

if ! munge_ok; then
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    rm -f /run/munge/munged.pid
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid </dev/null 9>&- \
        || die_with_log munged "munged did not start"
    wait_for 10 munge munge_ok || die_with_log munged "munge -n | unmunge still fails 10 s after starting munged"
    cp /run/munge/munged.pid "$(pidfile_of munged)"
fi

# ----------------------------------------------------------------------------- MariaDB

if ! mariadb_ok; then
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    rm -f "$(pidfile_of mariadbd)" /run/mysqld/mariadbd.pid
    say "starting mariadbd"
    # mariadbd does not daemonize: detach it from this script's session and output. It runs as
    # mysql, so its PID file goes to the mysql-owned /run/mysqld and is copied once it answers.
    setsid /usr/sbin/mariadbd --user=mysql --skip-networking --pid-file=/run/mysqld/mariadbd.pid \
        </dev/null >>"$(log_of mariadbd)" 2>&1 9>&- &
    wait_for "$WAIT_S" mariadb mariadb_ok || die_with_log mariadbd "MariaDB does not answer mysqladmin ping after ${WAIT_S} s"
    cp /run/mysqld/mariadbd.pid "$(pidfile_of mariadbd)"
fi
if [[ ! -s $STATE/dbpass ]]; then
    (umask 077 && head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$STATE/dbpass")
fi
mariadb --batch <<SQL || die_with_log mariadbd "could not create the slurm database user"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$(cat "$STATE/dbpass")';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
if [[ ! -f $STATE/first_job_id ]] && [[ ! -f $STATE/ctld/job_state ]]; then
    last_id=$(mariadb --batch --skip-column-names -e "SELECT COALESCE(MAX(id_job), 0) FROM slurm_acct_db.${CLUSTER}_job_table" 2>/dev/null || echo 0)
    if ((last_id > 0)); then
        echo $((last_id + 1)) >"$STATE/first_job_id"
    fi
fi

# ----------------------------------------------------------------------------- slurm configuration

# Never clobber a configuration this script did not write (a real cluster's, say).
for f in /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf; do
    if [[ -s $f ]] && ! grep -q '^# Rendered by slurm/local/start.sh' "$f" && [[ -z ${IGFIQA_SLURM_OVERWRITE:-} ]]; then
        die "$f holds a configuration start.sh did not write; move it away or set IGFIQA_SLURM_OVERWRITE=1"
    fi
done
changed=0
install_if_changed "$(render_slurmdbd_conf)" /etc/slurm/slurmdbd.conf 0600 && changed=1
install_if_changed "$(render_slurm_conf)" /etc/slurm/slurm.conf 0644 && changed=1
if ((changed)); then
    say "configuration written to /etc/slurm"
    for d in slurmd slurmctld slurmdbd; do
        if daemon_alive "$d"; then
            say "restarting $d to apply the new configuration"
            stop_daemon "$d"
        fi
    done
fi
# Stale PID files of Debian's own init scripts break `apt-get remove` later.
for f in /run/slurmctld.pid /run/slurmd.pid /run/slurmdbd.pid; do
    if [[ -f $f ]] && ! pid_alive "$(tr -dc '0-9' <"$f")" "$(basename "$f" .pid)"; then rm -f "$f"; fi
done

# ----------------------------------------------------------------------------- slurm daemons

# start_slurm_daemon NAME COMMAND...: the daemon forks itself and writes its PID file.
start_slurm_daemon() {
    local name=$1
    shift
    daemon_alive "$name" && return 0
    rm -f "$(pidfile_of "$name")"
    say "starting $name"
    "$@" </dev/null >>"$(log_of "$name")" 2>&1 9>&- || die_with_log "$name" "$name exited with status $?"
    wait_for 10 "$name pid" daemon_alive "$name" || die_with_log "$name" "$name did not stay up"
}

start_slurm_daemon slurmdbd /usr/sbin/slurmdbd
wait_for "$WAIT_S" slurmdbd dbd_ok || die_with_log slurmdbd "slurmdbd does not answer sacctmgr after ${WAIT_S} s"
if ! sacctmgr --noheader --parsable2 list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr --immediate add cluster "$CLUSTER" >/dev/null || die_with_log slurmdbd "could not register cluster $CLUSTER"
fi

start_slurm_daemon slurmctld /usr/sbin/slurmctld
wait_for "$WAIT_S" slurmctld ctld_ok || die_with_log slurmctld "slurmctld does not answer scontrol ping after ${WAIT_S} s"

# A node left drained or down by an earlier run (e.g. a job step that could not be killed) is resumed;
# "down*" (not responding) clears by itself once slurmd registers (ReturnToService=2).
node_ready() {
    local state
    state=$(node_state)
    case $state in
        idle | mixed | allocated | completing) return 0 ;;
        drain* | down | fail)
            say "node $NODE is $state: resuming it"
            scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
            ;;
    esac
    return 1
}

start_slurm_daemon slurmd /usr/sbin/slurmd -N "$NODE"
wait_for "$WAIT_S" "node $NODE" node_ready || {
    scontrol show node "$NODE" >&2 || true
    log_tail slurmctld 10
    die_with_log slurmd "node $NODE is $(node_state), not idle, after ${WAIT_S} s"
}
say "up: cluster $CLUSTER, node $NODE $(node_state), partition $PARTITION; state and logs in $STATE ($(elapsed) s)"
