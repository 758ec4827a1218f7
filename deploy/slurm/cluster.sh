#!/usr/bin/env bash
# A real single-host Slurm cluster for tests and demos: munged, slurmctld and slurmd from
# Debian's `munge` and `slurm-wlm`, one node with this machine's CPUs, everything on 127.0.0.1
# and inside one folder.
#
#   eval "$(deploy/slurm/cluster.sh start DIR)"   # start (or find running); prints SLURM_CONF
#   deploy/slurm/cluster.sh status DIR            # which daemons run (stderr), exit 0 if all do
#   deploy/slurm/cluster.sh stop DIR              # cancel its jobs, stop exactly what start started
#
# Standard output carries only the `export ...` lines; progress and errors go to standard error.
# Jobs run as the user who starts the cluster (SlurmUser and SlurmdUser are that user). Nothing
# here needs systemd or cgroups (proctrack/linuxproc, task/none): on a real cluster the admin
# runs these daemons under systemd with proctrack/cgroup and task/cgroup,affinity instead, so that
# a job cannot escape its CPUs, memory and GPUs, and a cancelled job leaves nothing behind.
#
# Settings (environment, read on the first start and kept in DIR/cluster.env):
#   SLURM_CPUS          CPUs of the node (default: those this process may use)
#   SLURM_CTLD_PORT, SLURM_SLURMD_PORT   ports (default: free ones)
set -euo pipefail

PROG=deploy/slurm/cluster.sh
# shellcheck source=deploy/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
parse_args "$@"
umask 077
PATH=$PATH:/usr/sbin:/sbin  # Debian puts the daemons there, outside a user's PATH

DAEMONS=(munged slurmctld slurmd)  # started in this order, stopped in the reverse one

# --- processes: launch and stop_launched (deploy/lib.sh), pid files in DIR/run ------------

launch_daemon() {  # launch_daemon NAME CMD...: a foreground daemon; its output in logs/NAME.out
  local name=$1
  shift
  # in DIR: the daemons (and the slurmstepd of each job, which keeps slurmd's folder) hold no
  # other folder open, and a left-over step is recognised by it
  (cd "$DIR" && launch "$name" "$DIR/logs/$name.out" "$@")
}

# --- state: ports and the configuration, made once -----------------------------------------

make_state() {
  mkdir -p "$DIR/run" "$DIR/logs" "$DIR/munge" "$DIR/secrets" "$DIR/state" "$DIR/spool"
  # munged wants its socket's folders open to traversal by everyone; the key stays private
  chmod 711 "$DIR" "$DIR/munge"
  chmod 700 "$DIR/secrets"
  if [[ ! -f $DIR/cluster.env ]]; then
    {
      echo "NODE=$(hostname -s)"
      # the CPUs this process may use (nproc would also obey OMP_NUM_THREADS)
      echo "CPUS=${SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
      echo "CTLD_PORT=${SLURM_CTLD_PORT:-$(free_port)}"
      echo "SLURMD_PORT=${SLURM_SLURMD_PORT:-$(free_port)}"
      echo "USER_NAME=$(id -un)"
    } >"$DIR/cluster.env.tmp"
    mv "$DIR/cluster.env.tmp" "$DIR/cluster.env"
  fi
  # shellcheck disable=SC1091
  . "$DIR/cluster.env"
  if [[ ! -f $DIR/secrets/munge.key ]]; then
    dd if=/dev/urandom of="$DIR/secrets/munge.key.tmp" bs=1024 count=1 status=none
    chmod 600 "$DIR/secrets/munge.key.tmp"
    mv "$DIR/secrets/munge.key.tmp" "$DIR/secrets/munge.key"
  fi
  write_conf
}

write_conf() {
  local conf=$DIR/slurm.conf
  cat >"$conf.tmp" <<EOF
# made by $PROG: a single-host cluster, everything on 127.0.0.1 and under $DIR
ClusterName=covidseg
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$USER_NAME
SlurmdUser=$USER_NAME
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
MpiDefault=none
# bind to the address the names resolve to (127.0.0.1 below), not to every interface
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
# no cgroups, no systemd: a real cluster uses proctrack/cgroup and task/cgroup,affinity
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.daemon.pid
SlurmdPidFile=$DIR/run/slurmd.daemon.pid
SlurmctldLogFile=$DIR/logs/slurmctld.log
SlurmdLogFile=$DIR/logs/slurmd.log
# finished jobs stay visible to scontrol for an hour (no accounting database here)
MinJobAge=3600
KillWait=5
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS State=UNKNOWN
PartitionName=main Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$conf.tmp" "$conf"
  chmod 644 "$conf"
}

# --- the daemons ---------------------------------------------------------------------------

munge_ready() { munge -S "$DIR/munge/munge.socket" -n </dev/null | unmunge -S "$DIR/munge/munge.socket"; }
ctld_ready() { SLURM_CONF=$DIR/slurm.conf scontrol ping | grep -q 'is UP'; }
node_ready() {
  local state
  state=$(SLURM_CONF=$DIR/slurm.conf sinfo -h -n "$NODE" -o '%t' 2>/dev/null) || return 1
  [[ $state == idle || $state == mix || $state == alloc ]]
}

start_daemon() {  # start_daemon NAME: 0 if started, 1 if it was running
  local name=$1
  if already_running "$name" "$name"; then return 1; fi
  need "$name" "apt-get install slurm-wlm munge"
  case $name in
    munged)
      say "starting munged (socket $DIR/munge/munge.socket)"
      launch_daemon munged munged --foreground --key-file="$DIR/secrets/munge.key" \
        --socket="$DIR/munge/munge.socket" --pid-file="$DIR/run/munged.daemon.pid" \
        --log-file="$DIR/logs/munged.log" --seed-file="$DIR/secrets/munged.seed"
      wait_until 30 munged munged munge_ready
      ;;
    slurmctld)
      say "starting slurmctld on 127.0.0.1:$CTLD_PORT"
      launch_daemon slurmctld slurmctld -D -f "$DIR/slurm.conf"
      wait_until 60 slurmctld slurmctld ctld_ready
      ;;
    slurmd)
      say "starting slurmd (node $NODE, $CPUS CPUs, port $SLURMD_PORT)"
      launch_daemon slurmd slurmd -D -f "$DIR/slurm.conf" -N "$NODE"
      wait_until 60 "slurmd (node $NODE)" slurmd node_ready
      ;;
  esac
  return 0
}

cancel_jobs() {  # cancel every job of this cluster and wait (bounded) until none is left
  local i jobs
  alive slurmctld || return 0
  export SLURM_CONF=$DIR/slurm.conf
  jobs=$(squeue -h -o '%A' 2>/dev/null | sort -u) || return 0
  [[ -n $jobs ]] || return 0
  say "cancelling jobs: ${jobs//$'\n'/ }"
  # shellcheck disable=SC2086
  scancel $jobs 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do
    [[ -z $(squeue -h -o '%A' 2>/dev/null) ]] && return 0
    sleep 0.2
  done
  say "jobs still listed after 60 s; stopping anyway"
}

stop_steps() {  # any slurmstepd of this node's spool (and its job) left after slurmd stopped
  local pid cwd left=()
  for pid in $(pgrep -x slurmstepd 2>/dev/null || true); do
    cwd=$(readlink "/proc/$pid/cwd" 2>/dev/null) || continue
    [[ $cwd == "$DIR"/* ]] && left+=("$pid")
  done
  [[ ${#left[@]} -gt 0 ]] || return 0
  say "stopping job steps ${left[*]}"
  kill -KILL "${left[@]}" 2>/dev/null || true
}

print_settings() {
  echo "export SLURM_CONF='$DIR/slurm.conf'"
}

# --- actions -------------------------------------------------------------------------------

case $ACTION in
  start)
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    make_state
    started=()
    trap 'if [[ $? -ne 0 ]]; then for ((j = ${#started[@]} - 1; j >= 0; j--)); do stop_launched "${started[j]}"; done; fi' EXIT
    for name in "${DAEMONS[@]}"; do
      if start_daemon "$name"; then started+=("$name"); fi
    done
    trap - EXIT
    if [[ ${#started[@]} -eq 0 ]]; then
      say "the cluster in $DIR is already running; nothing started"
    else
      say "the cluster in $DIR is up: node $NODE, $CPUS CPUs, partition main"
    fi
    print_settings
    ;;
  stop)
    existing_dir cluster
    cancel_jobs
    stop_launched slurmd
    stop_steps
    stop_launched slurmctld
    stop_launched munged
    say "stopped"
    ;;
  status)
    existing_dir cluster
    say_status "${DAEMONS[@]}" || exit 1
    ;;
esac
