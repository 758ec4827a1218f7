#!/usr/bin/env bash
# One job of a cross-validation submitted by deploy/slurm/submit.sh (not meant to be run by hand):
#
#   job.sh prepare REPO COMMIT NAME SCRATCH KEEP [-S key=value ...]
#   job.sh fold    REPO COMMIT NAME SCRATCH KEEP [-S key=value ...]   (fold = SLURM_ARRAY_TASK_ID)
#   job.sh head    REPO COMMIT NAME SCRATCH KEEP PREPARE_JOB FOLD_JOB FOLDS [-S key=value ...]
#
# Each job works in its own clone of COMMIT under SCRATCH, with the data from the DVC remote
# that the commit's .dvc/config names and the credentials and MLflow server of the submitting
# shell's environment (sbatch --export=ALL). `prepare` runs download + prepare (restored from the
# remote's run-cache when it has them); a fold task runs train@k + evaluate@k, pushes its
# outputs and run-cache, and then marks the fold done in REPO (a git ref under refs/covidseg-slurm/
# named by the commit and the -S values, pointing at the commit); `head` checks that every fold
# is marked, runs the whole pipeline with `dvc exp run` (each fold restored from the run-cache,
# then aggregate), pushes the experiment to REPO with `dvc exp push` and removes the marks.
# Sbatch spools this file, so a job runs the version submitted.
set -euo pipefail

say() { echo "covidseg-slurm: $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

[[ $# -ge 6 ]] || die "usage: job.sh prepare|fold|head REPO COMMIT NAME SCRATCH KEEP ..."
ROLE=$1 REPO=$2 COMMIT=$3 NAME=$4 SCRATCH=$5 KEEP=$6
shift 6
if [[ $ROLE == head ]]; then
  [[ $# -ge 3 ]] || die "head: the prepare job, the fold job and the folds are missing"
  PREPARE_JOB=$1 FOLD_JOB=$2 FOLDS=$3
  shift 3
fi
SETS=("$@")  # -S key=value ..., exactly as given to submit.sh
# where a finished fold is marked: the commit and the overrides decide what a fold computes
if [[ ${#SETS[@]} -gt 0 ]]; then
  MARKS=refs/covidseg-slurm/$COMMIT/$(printf '%s\n' "${SETS[@]}" | sha256sum | cut -c1-12)
else
  MARKS=refs/covidseg-slurm/$COMMIT/no-overrides
fi
# the node's scratch unless submit.sh --scratch named one
SCRATCH=${SCRATCH:-${COVIDSEG_SLURM_SCRATCH:-${TMPDIR:-/tmp}}}

# one thread per CPU Slurm gave the task, unless the submitting shell chose
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export DVC_NO_ANALYTICS=${DVC_NO_ANALYTICS:-1}

case $ROLE in
  prepare) TAG=prepare ;;
  fold)
    [[ -n ${SLURM_ARRAY_TASK_ID:-} ]] || die "a fold task runs as a Slurm array task"
    FOLD=$SLURM_ARRAY_TASK_ID
    TAG=fold-$FOLD
    ;;
  head) TAG="head" ;;
  *) die "unknown role $ROLE" ;;
esac
WORK=$SCRATCH/covidseg-slurm/$NAME/$TAG-${SLURM_JOB_ID:-$$}

say "$TAG of $NAME: job ${SLURM_JOB_ID:-?} on $(hostname -s) as $(id -un) (uid $(id -u)), commit $COMMIT"
say "work folder $WORK, OMP_NUM_THREADS=$OMP_NUM_THREADS"

cleanup() {
  if [[ $KEEP != 1 ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

clone() {
  rm -rf "$WORK"
  mkdir -p "$(dirname "$WORK")"
  git clone -q --no-checkout "$REPO" "$WORK"
  git -C "$WORK" checkout -q --detach "$COMMIT"
  cd "$WORK"
}

save_run_cache() {  # save_run_cache STAGE...: record these stages' runs in the run-cache
  # DVC records no run of a stage that has `cache: false` outputs other than metrics and plots
  # (train's epoch log, evaluate's per-case table), and `dvc push --run-cache` sends no such
  # output. Both are done here: the entries are saved (DVC's own key: command, dependencies'
  # hashes, params) with those files in the cache, and the files are pushed, so that the head
  # and a resubmission restore the stage instead of running it again.
  python - "$@" <<'EOF'
import sys

from dvc.repo import Repo

wanted = set(sys.argv[1:])
with Repo() as repo:
    stages = [stage for stage in repo.index.stages if stage.addressing in wanted]
    missing = wanted - {stage.addressing for stage in stages}
    if missing:
        sys.exit(f"error: no stage {', '.join(sorted(missing))} in dvc.yaml")
    files = []
    for stage in stages:
        repo.stage_cache.save(stage)
        files += [out.hash_info for out in stage.outs if not out.use_cache]
    try:
        failed = repo.cloud.push(files).failed
    except Exception as error:  # an unreachable remote raises: one line, as `dvc push` says it
        sys.exit(f"error: failed to push data to the cloud ({', '.join(sorted(wanted))}): {error}")
    if failed:
        sys.exit(f"error: {len(failed)} files of {', '.join(sorted(wanted))} were not pushed")
EOF
}

tasks() {  # tasks SPEC: the task ids of an array spec such as 2, 0-2 or 0,3-4 (one a line)
  local part
  for part in ${1//,/ }; do
    part=${part%%%*}
    if [[ $part =~ ^([0-9]+)-([0-9]+)(:([0-9]+))?$ ]]; then
      seq "${BASH_REMATCH[1]}" "${BASH_REMATCH[4]:-1}" "${BASH_REMATCH[2]}"
    else
      echo "$part"
    fi
  done
}

job_states() {  # job_states JOB: "TASK STATE" lines (TASK is - for a job that is no array)
  local lines line task state
  if lines=$(scontrol show job -o "$1" 2>/dev/null) && [[ -n $lines ]]; then
    while read -r line; do
      state=UNKNOWN
      [[ $line =~ JobState=([A-Z_]+) ]] && state=${BASH_REMATCH[1]}
      if [[ $line =~ ArrayTaskId=([^ ]+) ]]; then
        for task in $(tasks "${BASH_REMATCH[1]}"); do echo "$task $state"; done
      else
        echo "- $state"
      fi
    done <<<"$lines"
    return 0
  fi
  # gone from slurmctld's memory (MinJobAge): the accounting database, where there is one
  lines=$(sacct -n -P -X -j "$1" -o JobID,State 2>/dev/null) || return 1
  [[ -n $lines ]] || return 1
  while IFS='|' read -r id state; do
    if [[ $id =~ _\[?([0-9,:%-]+)\]?$ ]]; then
      for task in $(tasks "${BASH_REMATCH[1]}"); do echo "$task ${state%% *}"; done
    else
      echo "- ${state%% *}"
    fi
  done <<<"$lines"
}

done_folds() {  # the folds marked done in REPO, one a line
  git ls-remote "$REPO" "$MARKS/fold-*" | sed -n 's|.*/fold-\([0-9]*\)$|\1|p' | sort -n
}

check_folds() {  # fail with one line unless every fold is marked done
  local fold state states finished missing=() why=()
  if states=$(job_states "$PREPARE_JOB"); then
    state=$(awk '{print $2; exit}' <<<"$states")
    [[ $state == COMPLETED ]] ||
      die "the prepare job $PREPARE_JOB of $NAME ended $state (log: prepare-$PREPARE_JOB.out):" \
        "no fold ran"
  fi
  finished=$(done_folds) || die "cannot list the folds marked done in $REPO"
  states=$(job_states "$FOLD_JOB") || states=""
  for fold in $(tasks "$FOLDS"); do
    grep -qx "$fold" <<<"$finished" && continue
    missing+=("$fold")
    state=$(awk -v f="$fold" '$1 == f {print $2; exit}' <<<"$states")
    # a task cancelled while pending leaves no record of its own beside its array's
    [[ -n $state ]] || { [[ -n $states ]] && state="never ran"; } || state="no Slurm record"
    why+=("fold $fold $state")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  die "folds $(IFS=,; echo "${missing[*]}") of $NAME did not finish" \
    "($(printf '%s, ' "${why[@]}" | sed 's/, $//')): their results are not on the remote;" \
    "submit again and only they run"
}

case $ROLE in
  prepare)
    clone
    dvc exp run --pull -n "$NAME" "${SETS[@]}" prepare
    dvc push --run-cache
    ;;
  fold)
    clone
    dvc exp run --pull -n "$NAME" "${SETS[@]}" "evaluate@$FOLD"
    save_run_cache "train@$FOLD" "evaluate@$FOLD"
    dvc push --run-cache
    git push -q -f "$REPO" "$COMMIT:$MARKS/fold-$FOLD"  # last: the fold is on the remote
    ;;
  head)
    check_folds
    clone
    log=$WORK/.dvc/tmp/head.log
    mkdir -p "$(dirname "$log")"
    dvc exp run --pull -n "$NAME" "${SETS[@]}" 2>&1 | tee "$log"
    if ran=$(grep -oE "^Running stage '(train|evaluate)@[0-9]+'" "$log"); then
      say "warning: the head ran $(echo "$ran" | cut -d"'" -f2 | paste -sd, -) itself: the run-cache held no result for it"
    fi
    dvc exp push --run-cache "$REPO" "$NAME"
    say "experiment $NAME pushed to $REPO"
    for fold in $(tasks "$FOLDS"); do git push -q "$REPO" --delete "$MARKS/fold-$fold"; done
    ;;
esac
say "$TAG of $NAME done"
