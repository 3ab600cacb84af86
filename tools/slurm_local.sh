#!/usr/bin/env bash
# A real one-machine SLURM cluster (munged, slurmctld, slurmd) for the SLURM tests and for
# trying megatron-prime-submit without a cluster. Needs root and Debian's slurm-wlm 22.05:
#
#   tools/slurm_local.sh install   # apt-get install munge slurmctld slurmd slurm-client
#   tools/slurm_local.sh start     # write /etc/slurm/*.conf, start the daemons, wait for the node
#   tools/slurm_local.sh status    # exit 0 when the local node is up (sinfo shows it idle/mixed)
#   tools/slurm_local.sh stop
#
# Two partitions:
#   debug (default)  this machine as it is (CPUs and memory from `slurmd -C`): jobs really run
#   gpu              eight H100-shaped nodes (112 CPUs, 8 GPUs, 2 TB) that have no slurmd:
#                    never started, but `sbatch --test-only` checks a script's request
#                    against them, so examples/slurm/*.sbatch are validated as on a DGX cluster
# No systemd: the daemons are started directly, munged as the munge user.
set -euo pipefail

STATE=${MEGATRON_PRIME_SLURM_STATE:-/var/lib/megatron-prime-slurm}
CONF_DIR=/etc/slurm
HOST=$(hostname -s)

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

install_packages() {
  command -v apt-get >/dev/null || die "apt-get not found: install munge, slurmctld, slurmd and slurm-client (slurm-wlm 22.05) by hand"
  [[ $(id -u) == 0 ]] || die "installing packages needs root"
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
      && command -v sbatch >/dev/null; then
    return 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends munge slurmctld slurmd slurm-client
}

node_up() {
  # The node counts as up once slurmd registered and it is schedulable.
  local state
  state=$(sinfo -h -n "$HOST" -p debug -o %t 2>/dev/null | head -n1) || return 1
  [[ $state == idle || $state == mix || $state == alloc ]]
}

write_config() {
  local hardware cpus memory
  hardware=$(slurmd -C | head -n1)
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hardware")
  memory=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hardware")
  [[ -n $cpus && -n $memory ]] || die "could not read CPUs/RealMemory from 'slurmd -C': $hardware"
  mkdir -p "$CONF_DIR" "$STATE"/{ctld,spool,log}
  cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by megatron_prime tools/slurm_local.sh: a one-machine test cluster.
ClusterName=megatron-prime-local
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=bf_interval=1,sched_interval=2
GresTypes=gpu
ReturnToService=2
JobRequeue=1
MinJobAge=600
# Seconds between SIGTERM and SIGKILL when a job is cancelled or runs out of time.
KillWait=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=0
$hardware State=UNKNOWN
NodeName=h100-[1-8] NodeHostname=h100-node NodeAddr=127.0.0.2 CPUs=112 Boards=1 SocketsPerBoard=2 CoresPerSocket=56 ThreadsPerCore=1 RealMemory=2000000 Gres=gpu:8 State=IDLE
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=h100-[1-8] MaxTime=7-00:00:00 State=UP
EOF
  cat >"$CONF_DIR/gres.conf" <<EOF
NodeName=h100-[1-8] Name=gpu Count=8
EOF
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 0755 /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "munged did not start (see /var/log/munge/munged.log)"
}

start() {
  [[ $(id -u) == 0 ]] || die "starting the daemons needs root"
  command -v slurmctld >/dev/null || die "slurmctld not found: run '$0 install' first"
  if node_up; then
    echo "slurm_local.sh: already up"
    return 0
  fi
  stop_daemons
  write_config
  start_munge
  /usr/sbin/slurmctld || { tail -n 20 "$STATE/log/slurmctld.log" >&2; die "slurmctld did not start"; }
  /usr/sbin/slurmd || { tail -n 20 "$STATE/log/slurmd.log" >&2; die "slurmd did not start"; }
  for _ in $(seq 120); do
    if node_up; then
      echo "slurm_local.sh: up ($(sinfo -h -o '%P %D %t' | tr '\n' ' '))"
      return 0
    fi
    sleep 0.5
  done
  tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
  die "the node did not come up within 60 s"
}

stop_daemons() {
  local pidfile
  for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
    if [[ -s $pidfile ]]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
    fi
  done
  for _ in $(seq 40); do
    pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || return 0
    sleep 0.25
  done
  pkill -9 -x slurmd || true
  pkill -9 -x slurmctld || true
}

case ${1:-} in
  install) install_packages ;;
  start) start ;;
  status) node_up ;;
  stop) stop_daemons ;;
  *) echo "usage: $0 install|start|status|stop" >&2; exit 2 ;;
esac
