#!/usr/bin/env bash
# A single-host SLURM cluster for the tests: munge + slurmctld + slurmd, no systemd.
#   tests/slurm/cluster.sh start DIR [NODES] -> writes DIR/slurm.conf and starts the daemons; with
#       NODES=N > 1, N slurmd on this host (nodes dt1..dtN, each on its own port, each given 1/N of
#       this host's CPUs and at least one: a job of one task per node fits on every node)
#   tests/slurm/cluster.sh stop DIR          -> stops them by PID
# Finished jobs stay in `scontrol show job` for an hour (MinJobAge), so tests can read their record.
# Needs root (munge runs as user munge) and Debian's slurmctld slurmd slurm-client munge, which
# `start` installs with apt-get when they are missing.
set -euo pipefail
cmd=$1
dir=$(realpath -m "$2")
nodes=${3:-1}

if [ "$cmd" = stop ]; then
    for pidfile in "$dir"/*.pid; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    packages="slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends $packages >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $packages >/dev/null; }
fi
mkdir -p "$dir/spool/ctld" "$dir/log"
host=$(hostname -s)
cpus=$(nproc)
cat > "$dir/slurm.conf" <<CONF
ClusterName=disttrain
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$((16800 + RANDOM % 100))
SlurmdPort=$((16900 + RANDOM % 50))
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SchedulerParameters=sched_interval=5,bf_interval=5
MinJobAge=3600
ReturnToService=2
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
CONF
if [ "$nodes" = 1 ]; then
    names=$host
    mkdir -p "$dir/spool/d-$host"
    echo "NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN" >> "$dir/slurm.conf"
else
    # N slurmd on this host, each its own node with its own port and 1/N of the CPUs (at least one)
    names=dt[1-$nodes]
    base=$((16950 + RANDOM % 40))
    per=$(( cpus / nodes > 0 ? cpus / nodes : 1 ))
    for i in $(seq 1 "$nodes"); do
        mkdir -p "$dir/spool/d-dt$i"
        echo "NodeName=dt$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((base + i)) CPUs=$per State=UNKNOWN" >> "$dir/slurm.conf"
        grep -q "[[:space:]]dt$i\$" /etc/hosts || echo "127.0.0.1 dt$i" >> /etc/hosts  # node names must resolve
    done
fi
echo "PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP" >> "$dir/slurm.conf"

# munge: key + socket dir owned by user munge
mkdir -p /run/munge /etc/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then  # no munged answering: start ours
    runuser -u munge -- munged  # returns once the daemon is up and has written /run/munge/munged.pid
    cp /run/munge/munged.pid "$dir/munged.pid"  # ours: stopped with the cluster
fi

export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$dir/slurm.conf"
if [ "$nodes" = 1 ]; then
    slurmd -f "$dir/slurm.conf"
else
    for i in $(seq 1 "$nodes"); do
        slurmd -f "$dir/slurm.conf" -N "dt$i"
    done
fi
for _ in $(seq 1 60); do
    if timeout 10 srun -N"$nodes" -n"$nodes" true 2>/dev/null; then
        echo "SLURM_CONF=$dir/slurm.conf"
        exit 0
    fi
    sleep 1
done
echo "slurm did not come up; logs in $dir/log" >&2
exit 1
