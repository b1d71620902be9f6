#!/usr/bin/env bash
# Start (or stop) a real one-node Slurm cluster on this machine, for litft's multi-node tests and for
# trying the sbatch templates without a cluster. Needs root and Debian's slurm-wlm + munge packages.
#
#   bash extensions/slurm/localhost.sh install   # apt-get install slurm-wlm munge (once)
#   bash extensions/slurm/localhost.sh start     # munged, slurmctld, slurmd; waits until the node is idle
#   bash extensions/slurm/localhost.sh stop      # stops the three daemons
#
# The state lives in $LITFT_SLURM_DIR (default /tmp/litft-slurm): pid files, logs, spool dirs.
set -euo pipefail
cmd=${1:-start}
dir=${LITFT_SLURM_DIR:-/tmp/litft-slurm}
host=$(hostname -s)
cpus=$(nproc)

install() {
  if command -v slurmctld >/dev/null && command -v munged >/dev/null; then return; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

start() {
  mkdir -p "$dir"/{spool/ctld,spool/d,log}
  # munge: a random key owned by munge, mode 400
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    head -c 1024 /dev/urandom > /etc/munge/munge.key
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 400 /etc/munge/munge.key
  if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
  fi
  mkdir -p /etc/slurm
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  printf 'CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n' > /etc/slurm/cgroup.conf
  pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
  pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
  for _ in $(seq 60); do
    if sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "slurm: node $host is up"; return 0
    fi
    sleep 1
  done
  echo "slurm: node did not come up; see $dir/log" >&2
  return 1
}

stop() {
  for name in slurmd slurmctld; do
    if [ -f "$dir/$name.pid" ]; then kill "$(cat "$dir/$name.pid")" 2>/dev/null || true; fi
    pkill -x "$name" 2>/dev/null || true
  done
  pkill -x munged 2>/dev/null || true
}

case "$cmd" in
  install) install ;;
  start) install; start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
