#!/usr/bin/env bash
# Cross-validation on a Slurm cluster: one array task per fold, run from a clone.
#
#   deploy/slurm/submit.sh [--wait] [-n NAME] [-S key=value ...] [-F SBATCH_OPTION ...]
#                          [--repo GIT] [--scratch DIR] [--logs DIR] [--keep] [-- SBATCH_OPTIONS]
#
# Takes the current commit (a workspace with uncommitted changes is refused) and submits:
#   1. `prepare`: download + prepare, restored from the DVC remote's run-cache when it has them;
#   2. one array task per fold of split.folds (after 1): train@k + evaluate@k, outputs and
#      run-cache pushed to the remote, tracked to the MLflow server;
#   3. `head` (after every task of 2 ended): fails with one line naming the folds that did not
#      finish (a finished task marks its fold done in GIT, under refs/covidseg-slurm/); else
#      `dvc exp run -n NAME` restores every fold from the run-cache, runs aggregate, and
#      `dvc exp push` sends the experiment NAME to GIT: `dvc exp show` there lists it.
# Each job works in a clone of the commit under DIR (--scratch; default on the node:
# $COVIDSEG_SLURM_SCRATCH, else $TMPDIR, else /tmp), removed at its end unless --keep.
#
#   --wait        block until the head job ends; exit with its status (its error line on stderr)
#   -n NAME       the experiment's name (default cv-<commit>[-<hash of the -S values>]: the same
#                 for a resubmission, whose folds then land under the same MLflow parent run)
#   -S key=value  a params.yaml override, as for `dvc exp run -S` (repeatable)
#   -F OPTION     an sbatch option for the fold tasks only, e.g. -F --gres=gpu:1 (repeatable)
#   --repo GIT    where the jobs clone from and the experiment goes: a path or a git remote's name
#                 (default: this clone, which the nodes must then see at the same path)
#   --logs DIR    the jobs' logs (default: .dvc/tmp/slurm/NAME in this clone)
#   -- ...        sbatch options for every job (--partition, --account, --time, --qos, ...)
#
# Standard output: NAME=..., PREPARE_JOB=..., FOLD_JOB=..., HEAD_JOB=..., LOGS=... lines (for
# eval); progress and errors go to standard error. The jobs take the environment of this shell
# (sbatch --export=ALL): MLFLOW_TRACKING_URI with its user and password, the object store's keys
# (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), PATH with the project's Python environment, and
# SLURM_CONF where the cluster needs it. No credential goes on a command line or into a file.
set -euo pipefail

PROG=deploy/slurm/submit.sh
die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*" >&2; }
usage() {
  die "usage: $PROG [--wait] [-n NAME] [-S key=value ...] [-F SBATCH_OPTION ...] [--repo GIT]" \
    "[--scratch DIR] [--logs DIR] [--keep] [-- SBATCH_OPTIONS]"
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
JOB=$HERE/job.sh

WAIT=0 KEEP=0 NAME="" REPO="" SCRATCH="" LOGS=""
SETS=() FOLD_OPTS=() ALL_OPTS=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --wait) WAIT=1 ;;
    --keep) KEEP=1 ;;
    -n | --name) [[ $# -ge 2 ]] || usage; NAME=$2; shift ;;
    -S | --set-param) [[ $# -ge 2 ]] || usage; SETS+=(-S "$2"); shift ;;
    -F) [[ $# -ge 2 ]] || usage; FOLD_OPTS+=("$2"); shift ;;
    --repo) [[ $# -ge 2 ]] || usage; REPO=$2; shift ;;
    --scratch) [[ $# -ge 2 ]] || usage; SCRATCH=$2; shift ;;
    --logs) [[ $# -ge 2 ]] || usage; LOGS=$2; shift ;;
    --) shift; ALL_OPTS=("$@"); break ;;
    *) usage ;;
  esac
  shift
done

command -v sbatch >/dev/null 2>&1 || die "sbatch not found: run this where Slurm's commands are"
command -v dvc >/dev/null 2>&1 || die "dvc not found (activate the project's virtualenv)"
ROOT=$(git rev-parse --show-toplevel 2>/dev/null) || die "not inside a git clone of the project"
cd "$ROOT"
[[ -f dvc.yaml && -f params.yaml ]] || die "$ROOT has no dvc.yaml and params.yaml"

# --- what is submitted: the commit, its params with the overrides, its remote --------------

dirty=$(git status --porcelain --untracked-files=normal)
if [[ -n $dirty ]]; then
  die "uncommitted changes ($(head -n 3 <<<"$dirty" | awk '{print $2}' | paste -sd, -)...):" \
    "the jobs run the commit; commit or stash them first"
fi
COMMIT=$(git rev-parse HEAD)

# one Python call: the overrides applied to a copy of params.yaml and validated as every stage
# would (a bad value is refused here, before any job), the folds, the commit's default remote
if ! plan=$(PROG=$PROG python - "${SETS[@]}" <<'EOF'
import os
import shutil
import sys
import tempfile
from pathlib import Path

from dvc.config import Config
from dvc.utils.cli_parse import to_path_overrides
from dvc.utils.hydra import apply_overrides

from covidseg.config import load_params
from covidseg.errors import CovidSegError

def refuse(message: str) -> None:
    sys.exit(f"{os.environ['PROG']}: error: {' '.join(message.split())}")


sets = [value for flag, value in zip(sys.argv[1::2], sys.argv[2::2], strict=True)]
with tempfile.TemporaryDirectory() as tmp:
    params = Path(tmp) / "params.yaml"
    shutil.copy("params.yaml", params)
    for path, overrides in to_path_overrides(sets).items():
        if path != "params.yaml":
            refuse(f"-S {path}:...: the pipeline reads its params from params.yaml")
        try:
            apply_overrides(params, overrides)
        except Exception as error:
            cause = str(error.__cause__ or "").strip().splitlines()
            refuse(f"-S {' '.join(overrides)}: {cause[0] if cause else error}")
    try:
        folds = load_params(params).split.folds
    except CovidSegError as error:
        refuse(str(error).replace(str(params), "params.yaml"))
repo = Config(dvc_dir=".dvc", validate=False).read("repo")
remote = repo.get("core", {}).get("remote", "")
url = repo.get("remote", {}).get(remote, {}).get("url", "")
print(",".join(str(fold) for fold in folds))
print(remote)
print(url)
EOF
); then
  exit 1
fi
{ read -r FOLDS; read -r REMOTE; read -r REMOTE_URL; } <<<"$plan"
[[ -n $FOLDS ]] || die "split.folds is empty"
[[ -n $REMOTE && -n $REMOTE_URL ]] ||
  die "the commit's .dvc/config names no default DVC remote: the jobs share data and results" \
    "through one (dvc remote add -d ...; git commit .dvc/config)"
case $REMOTE_URL in
  s3://*)
    if [[ -z ${AWS_ACCESS_KEY_ID:-} || -z ${AWS_SECRET_ACCESS_KEY:-} ]] &&
      [[ -z ${AWS_PROFILE:-} && ! -f ${AWS_SHARED_CREDENTIALS_FILE:-$HOME/.aws/credentials} ]]; then
      die "the jobs read the object store's keys from the environment and AWS_ACCESS_KEY_ID /" \
        "AWS_SECRET_ACCESS_KEY are not set (eval \"\$(deploy/stack.sh start DIR)\" sets them)"
    fi
    ;;
  /*) ;;
  *://*) ;;
  *) die "the DVC remote $REMOTE is a relative path ($REMOTE_URL): the jobs' clones cannot find it" ;;
esac
case ${MLFLOW_TRACKING_URI:-} in
  http://* | https://* | databricks*) ;;
  "") die "MLFLOW_TRACKING_URI is not set: each fold would track into its scratch clone, deleted" \
    "with it (eval \"\$(deploy/stack.sh start DIR)\", or export your server's URL)" ;;
  *) die "MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI is not a tracking server the nodes share" ;;
esac

if [[ -z $NAME ]]; then
  NAME=cv-${COMMIT:0:7}
  if [[ ${#SETS[@]} -gt 0 ]]; then
    NAME+=-$(printf '%s\n' "${SETS[@]}" | sha256sum | cut -c1-6)
  fi
fi
git check-ref-format "refs/exps/$NAME" || die "-n $NAME: not a valid experiment name"
if git for-each-ref --format='%(refname)' refs/exps | grep -q "/$NAME\$"; then
  die "an experiment named $NAME exists already (dvc exp remove $NAME, or -n another name)"
fi

if [[ -z $REPO ]]; then
  REPO=$ROOT
elif git remote get-url "$REPO" >/dev/null 2>&1; then
  remote=$REPO
  REPO=$(git remote get-url "$remote")
  if ! git branch -r --contains "$COMMIT" 2>/dev/null | grep -q "^ *$remote/"; then
    die "commit ${COMMIT:0:7} is not on $remote (git push $remote first): the jobs clone from there"
  fi
fi
[[ -z $SCRATCH ]] || SCRATCH=$(realpath -m "$SCRATCH")
LOGS=${LOGS:-$ROOT/.dvc/tmp/slurm/$NAME}
mkdir -p "$LOGS"
LOGS=$(cd "$LOGS" && pwd)

# --- submission ----------------------------------------------------------------------------

sub() {  # sub ROLE-specific sbatch options... -- job arguments...: the job id
  local out
  out=$(sbatch --parsable --export=ALL "$@") || die "sbatch refused the job (see above)"
  echo "${out%%;*}"
}

job_args=("$REPO" "$COMMIT" "$NAME" "${SCRATCH:-}" "$KEEP")
PREPARE_JOB=$(sub --job-name="$NAME:prepare" --output="$LOGS/prepare-%j.out" \
  "${ALL_OPTS[@]}" "$JOB" prepare "${job_args[@]}" "${SETS[@]}")
FOLD_JOB=$(sub --job-name="$NAME:fold" --output="$LOGS/fold-%a-%A.out" --array="$FOLDS" \
  --dependency="afterok:$PREPARE_JOB" --kill-on-invalid-dep=yes \
  "${ALL_OPTS[@]}" "${FOLD_OPTS[@]}" "$JOB" fold "${job_args[@]}" "${SETS[@]}") ||
  { scancel "$PREPARE_JOB"; exit 1; }
HEAD_JOB=$(sub --job-name="$NAME:head" --output="$LOGS/head-%j.out" \
  --dependency="afterany:$FOLD_JOB" \
  "${ALL_OPTS[@]}" "$JOB" head "${job_args[@]}" "$PREPARE_JOB" "$FOLD_JOB" "$FOLDS" \
  "${SETS[@]}") || { scancel "$PREPARE_JOB" "$FOLD_JOB"; exit 1; }

say "submitted $NAME (commit ${COMMIT:0:7}, folds $FOLDS): prepare $PREPARE_JOB, folds" \
  "$FOLD_JOB, head $HEAD_JOB; logs in $LOGS"
cat <<EOF
NAME=$NAME
PREPARE_JOB=$PREPARE_JOB
FOLD_JOB=$FOLD_JOB
HEAD_JOB=$HEAD_JOB
LOGS=$LOGS
EOF

[[ $WAIT == 1 ]] || exit 0

# --- --wait: follow the jobs until the head ends ---------------------------------------------

head_state() {  # STATE EXITCODE of the head job (slurmctld, else the accounting database)
  local line
  line=$(scontrol show job -o "$HEAD_JOB" 2>/dev/null) || line=""
  if [[ $line =~ JobState=([A-Z_]+).*ExitCode=([0-9]+) ]]; then
    echo "${BASH_REMATCH[1]} ${BASH_REMATCH[2]}"
    return
  fi
  line=$(sacct -n -P -X -j "$HEAD_JOB" -o State,ExitCode 2>/dev/null | head -n 1) || line=""
  if [[ $line =~ ^([A-Z_]+)[^|]*\|([0-9]+) ]]; then
    echo "${BASH_REMATCH[1]} ${BASH_REMATCH[2]}"
    return
  fi
  echo "UNKNOWN 0"
}

trap 'say "stopped waiting; the jobs go on (scancel $PREPARE_JOB $FOLD_JOB $HEAD_JOB stops them)"; exit 130' INT TERM
declare -A seen=()
while :; do
  for job in "$PREPARE_JOB" "$FOLD_JOB" "$HEAD_JOB"; do
    while read -r line; do
      [[ $line =~ JobState=([A-Z_]+) ]] || continue
      state=${BASH_REMATCH[1]}
      case $job in
        "$PREPARE_JOB") label="$job (prepare)" ;;
        "$HEAD_JOB") label="$job (head)" ;;
        *) [[ $line =~ ArrayTaskId=([^ ]+) ]] && label="${job}_${BASH_REMATCH[1]} (fold ${BASH_REMATCH[1]})" ;;
      esac
      if [[ ${seen[$label]:-} != "$state" ]]; then
        seen[$label]=$state
        say "job $label: $state"
      fi
    done < <(scontrol show job -o "$job" 2>/dev/null || true)
  done
  read -r state code < <(head_state)
  case $state in
    PENDING | RUNNING | CONFIGURING | COMPLETING | REQUEUED | RESIZING | SUSPENDED | UNKNOWN) ;;
    *) break ;;
  esac
  sleep 1
done
if [[ $state == COMPLETED ]]; then
  say "$NAME is done: dvc exp show lists it in $REPO"
  exit 0
fi
line=$(grep -h '^error: ' "$LOGS/head-$HEAD_JOB.out" 2>/dev/null | tail -n 1) || line=""
echo "${line:-error: the head job $HEAD_JOB ended $state (log: $LOGS/head-$HEAD_JOB.out)}" >&2
[[ $code -ne 0 ]] && exit "$code"
exit 1
