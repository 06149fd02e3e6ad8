#!/usr/bin/env bash
# A single-host SLURM cluster for the tests: munge + slurmctld + slurmd, no systemd.
#   tests/slurm/cluster.sh start DIR   -> writes DIR/slurm.conf, starts the daemons, prints their PIDs
#   tests/slurm/cluster.sh stop DIR    -> stops them by PID
# Needs root (munge runs as user munge) and Debian's slurmctld slurmd slurm-client munge, which
# `start` installs with apt-get when they are missing.
set -euo pipefail
cmd=$1
dir=$(realpath -m "$2")

if [ "$cmd" = stop ]; then
    for pidfile in "$dir"/*.pid; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
mkdir -p "$dir/spool/ctld" "$dir/spool/d" "$dir/log"
host=$(hostname -s)
cpus=$(nproc)
cat > "$dir/slurm.conf" <<CONF
ClusterName=disttrain
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$((16800 + RANDOM % 100))
SlurmdPort=$((16900 + RANDOM % 100))
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SchedulerParameters=sched_interval=5,bf_interval=5
ReturnToService=2
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

# munge: key + socket dir owned by user munge
mkdir -p /run/munge /etc/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- munged
    pgrep -x munged > "$dir/munged.pid"  # ours: stopped with the cluster
fi

export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$dir/slurm.conf"
slurmd -f "$dir/slurm.conf"
for _ in $(seq 1 60); do
    if timeout 10 srun -N1 -n1 true 2>/dev/null; then
        echo "SLURM_CONF=$dir/slurm.conf"
        exit 0
    fi
    sleep 1
done
echo "slurm did not come up; logs in $dir/log" >&2
exit 1
