#!/usr/bin/env bash
# Stop the local SLURM cluster started by slurm/local/start.sh: slurmd → slurmctld → slurmdbd →
# MariaDB → munged, each by the PID start.sh recorded (a daemon start.sh did not start, such as a
# MariaDB that was already running, is left alone). The state directory is kept: job ids continue
# where they stopped next time. Running jobs are not cancelled; slurmctld keeps them in its state.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

# --nodes 2: only the two-node cluster (slurm/local/twonode.sh); without it, the two-node cluster
# goes first (it needs this cluster's munge and slurmdbd), then this cluster's daemons.
case "$*" in
    "") ;;
    "--nodes 2" | --nodes=2) exec bash "$HERE/twonode.sh" down ;;
    *) die "usage: $0 [--nodes 2]" ;;
esac
bash "$HERE/twonode.sh" down

[[ -d $RUN_DIR ]] || { say "nothing to stop ($RUN_DIR does not exist)"; exit 0; }
[[ $(id -u) -eq 0 ]] || die "stopping the local cluster needs root; run: sudo $0"

for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    stop_daemon "${DAEMONS[i]}"
done
say "stopped"
