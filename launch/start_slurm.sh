#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this Debian/Ubuntu machine (run as root).
#
#   bash launch/start_slurm.sh [--gpus N] [--cpus N] [--mem-mb N] [--reconfigure]
#
# What it runs: munged, MariaDB (its own data directory and port, loopback only), slurmdbd
# (so that `sacct` works), slurmctld and slurmd. No systemd and no cgroups are needed: see
# DEVELOPERS.md for the settings and why each one is there.
#
# Idempotent: when the cluster it started is up, it checks it and exits 0 in about a second.
# Missing Debian packages (slurmctld slurmd slurm-client munge slurmdbd mariadb-server) are
# installed with apt-get. Everything it starts is recorded in $STATE/started (name, pid) so that
# launch/stop_slurm.sh stops exactly that and nothing else.
#
# Options
#   --gpus N        declare N fake GPUs (gres gpu:N) backed by character devices
#                   /dev/nondet_gpu0.. (mknod c 1 3, i.e. /dev/null); default 0
#   --cpus N        CPUs the node offers (default: max(nproc, 2), so that two single-CPU array
#                   tasks always run at once)
#   --mem-mb N      RealMemory of the node in MiB (default: 90% of MemTotal)
#   --reconfigure   rewrite the configuration and restart the SLURM daemons even when up
# Environment
#   NONDET_SLURM_STATE    state directory (default /var/lib/nondet-slurm)
#   NONDET_SLURM_DB_PORT  MariaDB TCP port on 127.0.0.1 (default 33306)
#   NONDET_SLURM_CLUSTER  cluster name (default nondet)
set -euo pipefail

STATE=${NONDET_SLURM_STATE:-/var/lib/nondet-slurm}
DB_PORT=${NONDET_SLURM_DB_PORT:-33306}
CLUSTER=${NONDET_SLURM_CLUSTER:-nondet}
CONF_DIR=/etc/slurm
MARK="# managed by nondet_hpc launch/start_slurm.sh"
GPUS=0
CPUS=""
MEM_MB=""
RECONF=0

die() { echo "start_slurm: error: $*" >&2; exit 1; }
say() { echo "start_slurm: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --gpus) GPUS=${2:?--gpus needs a number}; shift 2 ;;
        --gpus=*) GPUS=${1#*=}; shift ;;
        --cpus) CPUS=${2:?--cpus needs a number}; shift 2 ;;
        --cpus=*) CPUS=${1#*=}; shift ;;
        --mem-mb) MEM_MB=${2:?--mem-mb needs a number}; shift 2 ;;
        --mem-mb=*) MEM_MB=${1#*=}; shift ;;
        --reconfigure) RECONF=1; shift ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
case "$GPUS" in ''|*[!0-9]*) die "--gpus wants a whole number, got '$GPUS'" ;; esac

[ "$(id -u)" = 0 ] || die "run me as root (I install packages and start system daemons)"
command -v apt-get >/dev/null || die "this script supports Debian/Ubuntu (apt-get) only"

T0=$(date +%s)
mkdir -p "$STATE"/{run,log,ctld,slurmd,mysql-run}
STARTED="$STATE/started"
touch "$STARTED"

# --------------------------------------------------------------------------- helpers
# alive NAME: the pid recorded for NAME runs (and is still that program)
recorded_pid() { awk -v n="$1" '$1==n {p=$2} END {print p}' "$STARTED"; }
pid_is() { # pid_is PID COMM-PREFIX
    [ -n "$1" ] && [ -r "/proc/$1/comm" ] && case "$(cat "/proc/$1/comm" 2>/dev/null)" in "$2"*) true ;; *) false ;; esac
}
alive() { pid_is "$(recorded_pid "$1")" "$2"; }
record() { # record NAME PID
    grep -v "^$1 " "$STARTED" > "$STARTED.tmp" || true
    echo "$1 $2" >> "$STARTED.tmp"
    mv "$STARTED.tmp" "$STARTED"
}
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    local t=$1 what=$2; shift 2
    local end=$(( $(date +%s) + t ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$end" ] || return 1
        sleep 0.3
    done
}
pidfile_pid() { [ -s "$1" ] && tr -dc '0-9' < "$1" || true; }
tailog() { [ -f "$1" ] && { echo "---- last lines of $1" >&2; tail -n 20 "$1" >&2; } || true; }

# --------------------------------------------------------------------------- packages
need_pkgs=()
command -v slurmctld >/dev/null || need_pkgs+=(slurmctld)
command -v slurmd    >/dev/null || need_pkgs+=(slurmd)
command -v sbatch    >/dev/null || need_pkgs+=(slurm-client)
command -v munged    >/dev/null || need_pkgs+=(munge)
command -v slurmdbd  >/dev/null || need_pkgs+=(slurmdbd)
{ command -v mariadbd || command -v mysqld; } >/dev/null || need_pkgs+=(mariadb-server)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    say "installing ${need_pkgs[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # Keep the packages' maintainer scripts from starting daemons of their own (no systemd
    # here; we start ours below). Only when no policy-rc.d exists: never clobber one.
    policy_made=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; policy_made=1
    fi
    trap '[ "$policy_made" = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
    install() { apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" > "$STATE/log/apt.log" 2>&1; }
    if ! install; then
        apt-get update -q > "$STATE/log/apt-update.log" 2>&1 || { tailog "$STATE/log/apt-update.log"; die "apt-get update failed"; }
        install || { tailog "$STATE/log/apt.log"; die "apt-get install ${need_pkgs[*]} failed"; }
    fi
    [ "$policy_made" = 1 ] && rm -f /usr/sbin/policy-rc.d
    trap - EXIT
    say "packages installed in $(( $(date +%s) - T0 )) s"
fi
MARIADBD=$(command -v mariadbd || command -v mysqld)
INSTALL_DB=$(command -v mariadb-install-db || command -v mysql_install_db)
MYSQL=$(command -v mariadb || command -v mysql)

# --------------------------------------------------------------------------- configuration
HOST=$(hostname -s)
NPROC=$(nproc)
[ -n "$CPUS" ] || CPUS=$(( NPROC > 2 ? NPROC : 2 ))
if [ -z "$MEM_MB" ]; then
    MEM_MB=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
fi
DEF_MEM=$(( MEM_MB / CPUS ))
[ "$DEF_MEM" -gt 2048 ] && DEF_MEM=2048

if [ -e "$CONF_DIR/slurm.conf" ] && ! grep -qF "$MARK" "$CONF_DIR/slurm.conf"; then
    die "$CONF_DIR/slurm.conf exists and was not written by this script; I will not overwrite it.
Move it away (or point SLURM_CONF elsewhere) if you want the local test cluster."
fi

DB_PASS_FILE="$STATE/db_password"
[ -s "$DB_PASS_FILE" ] || { head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' > "$DB_PASS_FILE"; chmod 600 "$DB_PASS_FILE"; }
DB_PASS=$(cat "$DB_PASS_FILE")

GRES_LINE=""
if [ "$GPUS" -gt 0 ]; then
    GRES_LINE="Gres=gpu:$GPUS"
fi

mkdir -p "$CONF_DIR"
new_conf=$(mktemp)
cat > "$new_conf" <<EOF
$MARK
# Single-node test cluster for nondet_hpc. See DEVELOPERS.md for why each setting is here.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
# credentials of a requeued job must expire before it may start again: 10 s, not 120 s
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# no cgroups and no systemd here
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
MpiDefault=none
ReturnToService=2
# job accounting through slurmdbd (MariaDB): sacct works
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobCompType=jobcomp/none
# allocate single CPUs with memory; without a default memory per CPU a job would get the
# whole node's memory and array tasks would run one at a time
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$DEF_MEM
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
DependencyParameters=kill_invalid_depend
MaxArraySize=1001
MinJobAge=600
KillWait=10
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB $GRES_LINE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=cpu Nodes=$HOST MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP
EOF

conf_changed=1
if [ -f "$CONF_DIR/slurm.conf" ] && cmp -s "$new_conf" "$CONF_DIR/slurm.conf"; then conf_changed=0; fi
if [ "$conf_changed" = 1 ]; then mv "$new_conf" "$CONF_DIR/slurm.conf"; else rm -f "$new_conf"; fi
chmod 644 "$CONF_DIR/slurm.conf"

# fake GPUs: gres needs a device file per GPU; a character device c 1 3 (like /dev/null)
{
    echo "$MARK"
    echo "AutoDetect=off"
    if [ "$GPUS" -gt 0 ]; then
        echo "NodeName=$HOST Name=gpu File=/dev/nondet_gpu[0-$((GPUS - 1))]"
    fi
} > "$CONF_DIR/gres.conf.new"
if cmp -s "$CONF_DIR/gres.conf.new" "$CONF_DIR/gres.conf" 2>/dev/null; then rm -f "$CONF_DIR/gres.conf.new"; else mv "$CONF_DIR/gres.conf.new" "$CONF_DIR/gres.conf"; conf_changed=1; fi
for ((i = 0; i < GPUS; i++)); do
    dev=/dev/nondet_gpu$i
    if [ ! -e "$dev" ]; then
        mknod "$dev" c 1 3 || die "could not create the fake GPU device $dev (mknod c 1 3)"
        chmod 666 "$dev"
        echo "$dev" >> "$STATE/devices"
    fi
done

cat > "$CONF_DIR/slurmdbd.conf" <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
chmod 600 "$CONF_DIR/slurmdbd.conf"

# --------------------------------------------------------------------------- munge
munge_ok() { munge -n -t 5 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    chmod 755 /run/munge
    rm -f /run/munge/munged.pid
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged --force > "$STATE/log/munged.start" 2>&1 || { tailog "$STATE/log/munged.start"; die "munged did not start"; }
    wait_for 10 munge munge_ok || die "munged started but munge/unmunge fails"
    record munged "$(pidfile_pid /run/munge/munged.pid)"
fi

# --------------------------------------------------------------------------- MariaDB
DATADIR="$STATE/mysql"
SOCK="$STATE/mysql-run/mysqld.sock"
sql() { "$MYSQL" --no-defaults -S "$SOCK" -uroot "$@"; }
db_ok() { sql -e 'select 1' >/dev/null 2>&1; }
if ! db_ok; then
    # mariadbd runs as mysql: its socket, pid file and log live in a folder it owns
    chown mysql:mysql "$STATE/mysql-run"
    if [ ! -d "$DATADIR/mysql" ]; then
        say "initialising MariaDB in $DATADIR"
        mkdir -p "$DATADIR"; chown mysql:mysql "$DATADIR"
        "$INSTALL_DB" --no-defaults --datadir="$DATADIR" --user=mysql --auth-root-authentication-method=socket \
            --skip-test-db > "$STATE/log/mysql-install.log" 2>&1 || { tailog "$STATE/log/mysql-install.log"; die "mariadb-install-db failed"; }
    fi
    say "starting MariaDB on 127.0.0.1:$DB_PORT"
    setsid "$MARIADBD" --no-defaults --datadir="$DATADIR" --user=mysql --socket="$SOCK" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$STATE/mysql-run/mariadb.pid" \
        --log-error="$STATE/mysql-run/mariadb.log" --innodb-buffer-pool-size=64M \
        --innodb-lock-wait-timeout=900 --skip-name-resolve </dev/null >/dev/null 2>&1 &
    record mariadbd $!
    wait_for 60 mariadb db_ok || { tailog "$STATE/mysql-run/mariadb.log"; die "MariaDB did not come up"; }
fi
sql <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF

# --------------------------------------------------------------------------- SLURM daemons
start_daemon() { # start_daemon NAME PIDFILE LOG BINARY ARGS...
    local name=$1 pidfile=$2 log=$3; shift 3
    rm -f "$pidfile"
    "$@" > "$STATE/log/$name.start" 2>&1 || { tailog "$STATE/log/$name.start"; tailog "$log"; die "$name did not start"; }
    wait_for 20 "$name pid" test -s "$pidfile" || { tailog "$log"; die "$name wrote no pid file"; }
    record "$name" "$(pidfile_pid "$pidfile")"
}
stop_recorded() { # stop_recorded NAME COMM
    local p; p=$(recorded_pid "$1")
    if pid_is "$p" "$2"; then
        kill "$p" 2>/dev/null || true
        wait_for 20 "$1 exit" bash -c "! test -d /proc/$p" || kill -9 "$p" 2>/dev/null || true
    fi
}
if [ "$RECONF" = 1 ] || [ "$conf_changed" = 1 ]; then
    # configuration changed: restart the SLURM daemons we run so they read it
    for d in slurmd slurmctld; do alive $d $d && { say "restarting $d (configuration changed)"; stop_recorded $d $d; }; done
fi

dbd_ok() { sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; }
if ! alive slurmdbd slurmdbd; then
    say "starting slurmdbd"
    start_daemon slurmdbd "$STATE/run/slurmdbd.pid" "$STATE/log/slurmdbd.log" /usr/sbin/slurmdbd
fi
wait_for 60 slurmdbd dbd_ok || { tailog "$STATE/log/slurmdbd.log"; die "slurmdbd does not answer (sacctmgr list cluster)"; }
if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" > "$STATE/log/sacctmgr.log" 2>&1 || { cat "$STATE/log/sacctmgr.log" >&2; die "sacctmgr add cluster $CLUSTER failed"; }
fi

if ! alive slurmctld slurmctld; then
    say "starting slurmctld"
    start_daemon slurmctld "$STATE/run/slurmctld.pid" "$STATE/log/slurmctld.log" /usr/sbin/slurmctld
fi
wait_for 30 slurmctld scontrol ping || { tailog "$STATE/log/slurmctld.log"; die "slurmctld does not answer (scontrol ping)"; }

if ! alive slurmd slurmd; then
    say "starting slurmd"
    start_daemon slurmd "$STATE/run/slurmd.pid" "$STATE/log/slurmd.log" /usr/sbin/slurmd
fi

node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1; }
node_ready() { case "$(node_state)" in idle*|mixed*|allocated*|completing*) true ;; *) false ;; esac; }
if ! wait_for 30 node node_ready; then
    # a node left DOWN/DRAINED by an earlier run: bring it back
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    wait_for 30 node node_ready || { tailog "$STATE/log/slurmd.log"; tailog "$STATE/log/slurmctld.log"; die "node $HOST is '$(node_state)', not idle"; }
fi
# accounting must answer too (submitit and nondet_hpc.status read job states from sacct)
wait_for 30 sacct sacct -n -X -S now-1minutes -o jobid || die "sacct does not answer"

say "cluster '$CLUSTER' up on $HOST: $CPUS CPUs, ${MEM_MB} MiB, gres gpu:$GPUS, partitions debug (default), cpu, gpu; $(( $(date +%s) - T0 )) s"
say "logs in $STATE/log; stop with: bash launch/stop_slurm.sh"
