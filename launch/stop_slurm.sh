#!/usr/bin/env bash
# Stop the single-node SLURM cluster that launch/start_slurm.sh started, and nothing else.
#
#   bash launch/stop_slurm.sh [--cancel-jobs] [--purge]
#
# Only the processes recorded in $STATE/started are signalled, and only while the pid still
# belongs to the program recorded (a recycled pid is left alone). Daemons that were already
# running before start_slurm.sh (e.g. a system munged) were never recorded and keep running.
#   --cancel-jobs  scancel every job of this test cluster first (jobs' processes outlive slurmd)
#   --purge        also delete the state directory (job state, accounting database, logs),
#                  the fake GPU devices and the configuration files the start script wrote
set -uo pipefail

STATE=${NONDET_SLURM_STATE:-/var/lib/nondet-slurm}
MARK="# managed by nondet_hpc launch/start_slurm.sh"
CANCEL=0
PURGE=0
for a in "$@"; do
    case "$a" in
        --cancel-jobs) CANCEL=1 ;;
        --purge) PURGE=1; CANCEL=1 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "stop_slurm: unknown argument $a" >&2; exit 2 ;;
    esac
done
STARTED="$STATE/started"
if [ ! -f "$STARTED" ]; then
    echo "stop_slurm: nothing recorded in $STARTED: nothing to stop"
    exit 0
fi

if [ "$CANCEL" = 1 ] && grep -q '^slurmctld ' "$STARTED"; then
    timeout 20 scancel --full --quiet --user="$(id -un)" >/dev/null 2>&1 || true
    timeout 20 scancel --quiet --state=PENDING >/dev/null 2>&1 || true
fi

pid_of() { awk -v n="$1" '$1==n {p=$2} END {print p}' "$STARTED"; }
stop() { # stop NAME COMM
    local name=$1 comm=$2 pid
    pid=$(pid_of "$name")
    [ -n "$pid" ] || return 0
    if [ -r "/proc/$pid/comm" ] && case "$(cat "/proc/$pid/comm")" in "$comm"*) true ;; *) false ;; esac; then
        echo "stop_slurm: stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 1 100); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
        if [ -d "/proc/$pid" ]; then
            echo "stop_slurm: $name did not exit after 20 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null
        fi
    else
        echo "stop_slurm: $name (pid $pid) is not running"
    fi
    grep -v "^$name " "$STARTED" > "$STARTED.tmp"; mv "$STARTED.tmp" "$STARTED"
}
# reverse order of start
stop slurmd slurmd
stop slurmctld slurmctld
stop slurmdbd slurmdbd
stop mariadbd mariadbd
stop munged munged

if [ -f "$STATE/devices" ]; then
    while read -r dev; do
        [ -c "$dev" ] && rm -f "$dev" && echo "stop_slurm: removed fake GPU device $dev"
    done < "$STATE/devices"
    rm -f "$STATE/devices"
fi

if [ "$PURGE" = 1 ]; then
    for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf /etc/slurm/slurmdbd.conf; do
        [ -f "$f" ] && grep -qF "$MARK" "$f" && rm -f "$f"
    done
    rm -rf "$STATE"
    echo "stop_slurm: purged $STATE and the configuration files"
fi
echo "stop_slurm: done"
