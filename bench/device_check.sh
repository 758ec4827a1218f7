#!/usr/bin/env bash
# GPU checks of the training path, one call on the device machine (run from the repo root):
# bench/gpu_throughput.py eager at batch 2 and 16, then with train.compile (CUDA graphs) at
# batch 2 and 16 as far as its time cap allows; JSON, logs and one markdown table under $OUT.
# Needs the wheels in .whl/ (carried). `bench/device_check.sh --cpu-smoke` runs the same
# parts here on the CPU at toy sizes (project venv, no install).
set -u
if [ "${1:-}" = "--cpu-smoke" ]; then
  smoke=(--cpu-smoke --seconds 1)
  export PYTHONPATH="$PWD"
else
  smoke=()
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
  export PYTHONPATH="$PYTHONPATH:$PWD"
fi
export PYTHONUNBUFFERED=1
OUT="${OUT:-$(mktemp -d)}"
EAGER_S="${EAGER_S:-170}"
COMPILED_S="${COMPILED_S:-240}"
bench=(python3 bench/gpu_throughput.py "${smoke[@]}")
echo "results in $OUT"

if [ ${#smoke[@]} -eq 0 ]; then
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit \
    --format=csv >"$OUT/gpu.txt" 2>&1
  cat "$OUT/gpu.txt"
fi

echo "== eager: batch 2 and 16 (cap ${EAGER_S} s)"
timeout "$EAGER_S" "${bench[@]}" --variant eager --batch 2 16 --seconds 6 \
  --json "$OUT/eager.json" >"$OUT/eager.log" 2>&1
echo "exit $?" >>"$OUT/eager.log"
grep -v '^W[0-9]' "$OUT/eager.log" | tail -n 8

echo "== compiled: batch 2, then 16 (cap ${COMPILED_S} s; compile time in 'warm-up')"
timeout "$COMPILED_S" "${bench[@]}" --variant compiled --batch 2 16 --seconds 5 --no-loader \
  --json "$OUT/compiled.json" >"$OUT/compiled.log" 2>&1
echo "exit $?" >>"$OUT/compiled.log"
grep -v '^W[0-9]' "$OUT/compiled.log" | tail -n 8

echo "== table"
tables=()
for f in "$OUT/eager.json" "$OUT/compiled.json"; do [ -s "$f" ] && tables+=("$f"); done
if [ ${#tables[@]} -gt 0 ]; then
  python3 bench/gpu_throughput.py --table "${tables[@]}" | tee "$OUT/table.md"
fi
