# shellcheck shell=bash
# What deploy/stack.sh and deploy/slurm/cluster.sh share: their command line, messages, free
# ports, and the servers they start (pid files with start times, readiness waits, bounded stops).
# Sourced, not run; the script sets PROG (its name in messages) first, and DIR (its folder,
# absolute) before it calls anything that reads DIR/run or DIR/logs.

die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*" >&2; }

parse_args() {  # parse_args "$@": sets ACTION (start, stop or status) and DIR, or says the usage
  [[ $# -eq 2 && ($1 == start || $1 == stop || $1 == status) ]] ||
    die "usage: $PROG start|stop|status DIR"
  # shellcheck disable=SC2034  # read by the script that sources this file
  ACTION=$1
  DIR=$2
}

existing_dir() {  # existing_dir WHAT: DIR made absolute; an error when there is no such folder
  [[ -d $DIR ]] || die "no $1 in $DIR"
  DIR=$(cd "$DIR" && pwd)
}

need() {  # need CMD HINT: an error naming CMD and how to install it when it is not on PATH
  command -v "$1" >/dev/null 2>&1 || die "$1 not found ($2)"
}

PYTHON=$(command -v python || command -v python3 || true)

free_port() {  # a TCP port free on 127.0.0.1 now
  [[ -n $PYTHON ]] || die "python not found (activate the project's virtualenv)"
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- processes: the pids a script started, with their start times --------------------------

start_time() {  # field 22 of /proc/PID/stat (after the command name, which may hold spaces)
  local stat fields
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  read -r -a fields <<<"${stat##*) }"
  echo "${fields[19]}"
}

alive() {  # alive NAME: the process recorded in run/NAME.pid still runs (same start time)
  local file="$DIR/run/$1.pid" pid started now
  [[ -f $file ]] || return 1
  read -r pid started <"$file" || return 1
  now=$(start_time "$pid") || return 1
  [[ $now == "$started" ]]
}

already_running() {  # already_running NAME WHAT: true, saying so, when NAME's process runs
  alive "$1" || return 1
  say "$2 already running"
}

say_status() {  # say_status NAME...: whether each one's process runs; false if one does not
  local name down=0
  for name in "$@"; do
    if alive "$name"; then say "$name: running"; else say "$name: stopped"; down=1; fi
  done
  return "$down"
}

launch() {  # launch NAME LOG CMD...: in the background, in its own session (pid = session id)
  local name=$1 log=$2 pid
  shift 2
  setsid "$@" >>"$log" 2>&1 </dev/null 9>&- &  # fd 9 holds stack.sh's lock: not for a server
  pid=$!
  printf '%s %s\n' "$pid" "$(start_time "$pid")" >"$DIR/run/$name.pid.tmp"
  mv "$DIR/run/$name.pid.tmp" "$DIR/run/$name.pid"
}

members() {  # members SID: pids of the live (non-zombie) processes in that session
  local sid=$1 file stat fields
  for file in /proc/[0-9]*/stat; do
    { read -r stat <"$file"; } 2>/dev/null || continue
    read -r -a fields <<<"${stat##*) }"  # state, ppid, process group, session, ...
    if [[ ${fields[0]} != Z && ${fields[3]} == "$sid" ]]; then echo "${stat%% *}"; fi
  done
}

stop_launched() {  # stop_launched NAME: SIGTERM its session, bounded wait, then SIGKILL the rest
  local name=$1 file="$DIR/run/$1.pid" pid started i left
  if ! alive "$name"; then
    rm -f "$file"
    return 0
  fi
  read -r pid started <"$file"
  say "stopping $name (session $pid)"
  kill -TERM -- "-$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    [[ -n $(members "$pid") ]] || break
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

log_tail() {  # log_tail NAME: the last lines of DIR/logs/NAME.log and NAME.out, on stderr
  local files=() file
  for file in "$DIR/logs/$1.log" "$DIR/logs/$1.out"; do
    if [[ -s $file ]]; then files+=("$file"); fi
  done
  if [[ ${#files[@]} -gt 0 ]]; then tail -n 20 "${files[@]}" >&2 || true; fi
}

wait_until() {  # wait_until SECONDS WHAT NAME CMD...: poll CMD (SECONDS of pauses at least, so
  # a slow CMD on a loaded machine waits longer); if NAME exits or no answer, error with its log
  local seconds=$1 what=$2 name=$3 i
  shift 3
  for ((i = 0; i < seconds * 5; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if ! alive "$name"; then
      log_tail "$name"
      die "$what exited while starting (log: $DIR/logs/$name.log)"
    fi
    sleep 0.2
  done
  log_tail "$name"
  die "$what did not answer within $seconds s (log: $DIR/logs/$name.log)"
}
