#!/usr/bin/env bash
# Start (or stop) a real one-node Slurm cluster on this machine, for litft's multi-node tests and for
# trying the sbatch templates without a cluster. Needs root and Debian's slurm-wlm + munge packages.
#
#   bash extensions/slurm/localhost.sh install   # apt-get install slurm-wlm munge (once)
#   bash extensions/slurm/localhost.sh start     # munged, slurmctld, slurmd; waits until the node is idle
#   bash extensions/slurm/localhost.sh stop      # stops the daemons that `start` started (by their pids)
#
# The state lives in $LITFT_SLURM_DIR (default /tmp/litft-slurm): pid files, logs, spool dirs, and `started`, the
# daemons this script started. A daemon that was already running (a system service) is used and left running.
set -euo pipefail
cmd=${1:-start}
dir=${LITFT_SLURM_DIR:-/tmp/litft-slurm}
host=$(hostname -s)
cpus=$(nproc)

pid_file() {
  case "$1" in
    munged) echo /run/munge/munged.pid ;;
    *) echo "$dir/$1.pid" ;;
  esac
}

# the pid of a running daemon from its pid file, if that process is indeed the daemon
daemon_pid() {
  local file pid
  file=$(pid_file "$1")
  [ -s "$file" ] || return 1
  pid=$(cat "$file")
  [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$1" ] || return 1
  echo "$pid"
}

# running: from its pid file, or (a daemon started some other way, e.g. as a system service) by its name
running() { daemon_pid "$1" >/dev/null || pgrep -x "$1" >/dev/null; }

started() { mkdir -p "$dir"; grep -qsx "$1" "$dir/started" || echo "$1" >> "$dir/started"; }

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
  if ! running munged; then
    runuser -u munge -- /usr/sbin/munged --pid-file="$(pid_file munged)"
    started munged
  fi
  mkdir -p /etc/slurm
  # MinJobAge=10: finished jobs leave slurmctld's memory after 10 s (default 300), which lets `sbatch --wait` poll
  # every 8 s instead of backing off to 32 s (it waits at most half of MinJobAge between polls)
  local old_conf
  old_conf=$(cat /etc/slurm/slurm.conf 2>/dev/null || true)
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
MinJobAge=10
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  printf 'CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n' > /etc/slurm/cgroup.conf
  for daemon in slurmctld slurmd; do
    if ! running "$daemon"; then
      "/usr/sbin/$daemon"
      started "$daemon"
    elif [ "$daemon" = slurmctld ] && [ "$old_conf" != "$(cat /etc/slurm/slurm.conf)" ]; then
      scontrol reconfigure  # already running with an older slurm.conf
    fi
  done
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
  # only what `start` started, newest first, each by the pid in its pid file (checked to be that daemon)
  [ -f "$dir/started" ] || { echo "slurm: nothing started by $0 to stop"; return 0; }
  for daemon in slurmd slurmctld munged; do
    grep -qx "$daemon" "$dir/started" || continue
    pid=$(daemon_pid "$daemon") || { echo "slurm: $daemon is not running"; continue; }
    kill "$pid"
    for _ in $(seq 50); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
    if [ -d "/proc/$pid" ]; then echo "slurm: $daemon (pid $pid) did not stop in 10 s; killing it" >&2; kill -9 "$pid"; fi
    echo "slurm: stopped $daemon (pid $pid)"
  done
  rm -f "$dir/started"
}

case "$cmd" in
  install) install ;;
  start) install; start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
