#!/usr/bin/env bash
# A one-machine Slurm (controller + one compute node = this machine) for the data pipeline's Slurm test.
# Usage: start_local_slurm.sh DIR   -> writes DIR/slurm.conf, starts munged, slurmctld and slurmd, waits
# until the node is idle, prints `export SLURM_CONF=DIR/slurm.conf`. Needs root and Debian's slurmctld,
# slurmd, slurm-client and munge packages (the Makefile's `slurm-deps` target installs them).
# Stop it with stop_local_slurm.sh DIR.
set -euo pipefail
dir=$(realpath -m "$1")
mkdir -p "$dir"/state "$dir"/spool "$dir"/log
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
cat > "$dir/slurm.conf" <<CONF
ClusterName=ember-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=$(( 16817 + RANDOM % 1000 ))
SlurmdPort=$(( 17818 + RANDOM % 1000 ))
# No cgroups in a container: track processes by parent id, no task binding, no accounting daemon.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=600
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
    if id munge >/dev/null 2>&1; then
        su -s /bin/sh munge -c "/usr/sbin/munged" || /usr/sbin/munged --force
    else
        /usr/sbin/munged --force
    fi
fi
export SLURM_CONF="$dir/slurm.conf"
/usr/sbin/slurmctld -f "$SLURM_CONF"
/usr/sbin/slurmd -f "$SLURM_CONF"
for _ in $(seq 1 60); do
    state=$(sinfo -h -N -o "%T" 2>/dev/null | head -1 || true)
    if [ "$state" = "idle" ]; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    if [ "$state" = "down" ] || [ "$state" = "drained" ]; then
        scontrol update NodeName="$host" State=RESUME 2>/dev/null || true
    fi
    sleep 1
done
echo "slurm did not come up; logs in $dir/log" >&2
tail -20 "$dir"/log/*.log >&2 || true
exit 1
