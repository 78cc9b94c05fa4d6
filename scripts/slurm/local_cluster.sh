#!/bin/bash
# A one-node SLURM cluster on this machine, for testing simpo's SLURM path for real: munged,
# slurmctld and slurmd on localhost, with their key, sockets, ports, state and logs in one folder.
# Needs Debian's slurm-wlm and munge (`apt-get install slurm-wlm munge`) and root.
#
#   scripts/slurm/local_cluster.sh start DIR   # prints `export SLURM_CONF=DIR/slurm.conf`
#   scripts/slurm/local_cluster.sh stop DIR    # stops the three daemons by their pid files
#
# sbatch, squeue, scontrol, scancel ... talk to it when SLURM_CONF points at DIR/slurm.conf.
# Jobs run as root on this machine, with the environment they were submitted from.
set -euo pipefail

action=${1:?usage: local_cluster.sh start|stop DIR}
dir=${2:?usage: local_cluster.sh start|stop DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
conf=$dir/slurm.conf

stop() {
  # The cluster's jobs first, while its daemons run: a job step whose slurmd and slurmctld have
  # gone lingers (retrying to report its end), and would hold the node of the next cluster.
  local ctld=$dir/slurmctld.pid
  if [[ -f $conf && -f $ctld ]] && kill -0 "$(cat "$ctld")" 2>/dev/null; then
    SLURM_CONF=$conf scancel --full --signal=KILL --user="$(id -un)" 2>/dev/null || true
    SLURM_CONF=$conf scancel --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 100); do
      [[ -z $(SLURM_CONF=$conf squeue -h 2>/dev/null) ]] && break
      sleep 0.2
    done
  fi
  # slurmd first: it may still be reporting a job to slurmctld. munged last: both need it.
  for name in slurmd slurmctld munged; do
    pidfile=$dir/$name.pid
    [[ -f $pidfile ]] || continue
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
  # A job step left over all the same (it holds a file of this cluster's folder open).
  local pid fd
  for pid in $(pgrep -x slurmstepd || true); do
    for fd in "/proc/$pid"/fd/*; do
      if [[ $(readlink "$fd" 2>/dev/null) == "$dir"/* ]]; then
        kill -9 "$pid" 2>/dev/null || true
        break
      fi
    done
  done
}

if [[ $action == stop ]]; then
  stop
  exit 0
fi
[[ $action == start ]] || { echo "usage: local_cluster.sh start|stop DIR" >&2; exit 2; }
for tool in munged slurmctld slurmd sbatch; do
  command -v "$tool" >/dev/null ||
    { echo "$tool not found: apt-get install slurm-wlm munge" >&2; exit 2; }
done
stop  # a cluster left over from an earlier start in this folder

# Free ports of our own, so that the cluster never meets another one on this machine.
read -r ctld_port slurmd_port < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)

# Fresh state: no job of an earlier cluster in this folder is remembered.
rm -rf "$dir/state" "$dir/spool"
mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
chmod 755 "$dir" "$dir/munge"
if [[ ! -f $dir/munge/munge.key ]]; then
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 400 "$dir/munge/munge.key"
socket=$dir/munge/munge.socket

host=$(hostname -s)
cpus=$(nproc)
memory=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
cat >"$conf" <<EOF
ClusterName=simpo-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Quick turnover: a requeued job runs again within seconds, finished jobs stay visible a while.
SchedulerParameters=sched_interval=2,batch_sched_delay=0
MinJobAge=600
KillWait=30
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF

munged --force --key-file="$dir/munge/munge.key" --socket="$socket" \
  --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/seed"
export SLURM_CONF=$conf
slurmctld -f "$conf"
slurmd -f "$conf"

# Up when the node takes jobs.
for _ in $(seq 100); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "export SLURM_CONF=$conf"
    exit 0
  fi
  sleep 0.2
done
echo "the local SLURM cluster did not come up; logs: $dir/*.log" >&2
sinfo >&2 || true
exit 1
