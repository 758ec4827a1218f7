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
die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*" >&2; }

usage() { die "usage: $PROG start|stop|status DIR"; }
[[ $# -eq 2 ]] || usage
ACTION=$1
[[ $ACTION == start || $ACTION == stop || $ACTION == status ]] || usage
DIR=$2
umask 077
PATH=$PATH:/usr/sbin:/sbin  # Debian puts the daemons there, outside a user's PATH

DAEMONS=(munged slurmctld slurmd)  # started in this order, stopped in the reverse one

# --- processes: the pids this script started, with their start times -----------------------

start_time() {  # field 22 of /proc/PID/stat (after the command name, which may hold spaces)
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  set -- $stat
  echo "${20}"
}

alive() {  # alive NAME: the process recorded in run/NAME.pid still runs (same start time)
  local file="$DIR/run/$1.pid" pid started now
  [[ -f $file ]] || return 1
  read -r pid started <"$file" || return 1
  now=$(start_time "$pid") || return 1
  [[ $now == "$started" ]]
}

launch() {  # launch NAME CMD...: in the foreground of its own session (pid = process group)
  local name=$1 pid
  shift
  # in DIR: the daemons (and the slurmstepd of each job, which keeps slurmd's folder) hold no
  # other folder open, and a left-over step is recognised by it
  (cd "$DIR" && exec setsid "$@" >>"$DIR/logs/$name.out" 2>&1 </dev/null) &
  pid=$!
  printf '%s %s\n' "$pid" "$(start_time "$pid")" >"$DIR/run/$name.pid.tmp"
  mv "$DIR/run/$name.pid.tmp" "$DIR/run/$name.pid"
}

session_members() {  # session_members SID: pids of live processes in that session
  local stat pid rest
  for stat in /proc/[0-9]*/stat; do
    rest=$(cat "$stat" 2>/dev/null) || continue
    pid=${rest%% *}
    rest=${rest##*) }
    set -- $rest
    if [[ $1 != Z && $4 == "$SESSION" ]]; then echo "$pid"; fi
  done
}

members() {  # members SID: live (non-zombie) processes whose session is SID
  SESSION=$1 session_members
}

stop_daemon() {  # stop_daemon NAME: SIGTERM its session, bounded wait, then SIGKILL
  local name=$1 file="$DIR/run/$1.pid" pid started i left
  if ! alive "$name"; then
    rm -f "$file"
    return 0
  fi
  read -r pid started <"$file"
  say "stopping $name (session $pid)"
  kill -TERM -- "-$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    left=$(members "$pid")
    [[ -n $left ]] || break
    sleep 0.1
  done
  left=$(members "$pid")
  if [[ -n $left ]]; then
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      [[ -n $(members "$pid") ]] || break
      sleep 0.1
    done
  fi
  rm -f "$file"
}

free_port() {
  local python
  python=$(command -v python3 || command -v python) || die "python3 not found"
  "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_until() {  # wait_until SECONDS WHAT NAME CMD...: poll CMD; on timeout, error with log tail
  local seconds=$1 what=$2 name=$3 i
  shift 3
  for ((i = 0; i < seconds * 5; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if ! alive "$name"; then
      tail -n 20 "$DIR/logs/$name.log" "$DIR/logs/$name.out" >&2 2>/dev/null || true
      die "$what exited while starting (log: $DIR/logs/$name.log)"
    fi
    sleep 0.2
  done
  tail -n 20 "$DIR/logs/$name.log" >&2 2>/dev/null || true
  die "$what did not answer within $seconds s (log: $DIR/logs/$name.log)"
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
  if alive "$name"; then
    say "$name already running"
    return 1
  fi
  command -v "$name" >/dev/null 2>&1 || die "$name not found (apt-get install slurm-wlm munge)"
  case $name in
    munged)
      say "starting munged (socket $DIR/munge/munge.socket)"
      launch munged munged --foreground --key-file="$DIR/secrets/munge.key" \
        --socket="$DIR/munge/munge.socket" --pid-file="$DIR/run/munged.daemon.pid" \
        --log-file="$DIR/logs/munged.log" --seed-file="$DIR/secrets/munged.seed"
      wait_until 30 munged munged munge_ready
      ;;
    slurmctld)
      say "starting slurmctld on 127.0.0.1:$CTLD_PORT"
      launch slurmctld slurmctld -D -f "$DIR/slurm.conf"
      wait_until 60 slurmctld slurmctld ctld_ready
      ;;
    slurmd)
      say "starting slurmd (node $NODE, $CPUS CPUs, port $SLURMD_PORT)"
      launch slurmd slurmd -D -f "$DIR/slurm.conf" -N "$NODE"
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
  say "cancelling jobs: $(echo $jobs)"
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
    trap 'if [[ $? -ne 0 ]]; then for ((j = ${#started[@]} - 1; j >= 0; j--)); do stop_daemon "${started[j]}"; done; fi' EXIT
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
    [[ -d $DIR ]] || die "no cluster in $DIR"
    DIR=$(cd "$DIR" && pwd)
    cancel_jobs
    stop_daemon slurmd
    stop_steps
    stop_daemon slurmctld
    stop_daemon munged
    say "stopped"
    ;;
  status)
    [[ -d $DIR ]] || die "no cluster in $DIR"
    DIR=$(cd "$DIR" && pwd)
    down=0
    for name in "${DAEMONS[@]}"; do
      if alive "$name"; then say "$name: running"; else say "$name: stopped"; down=1; fi
    done
    exit "$down"
    ;;
esac
