#!/bin/bash
# Every GPU measurement of issue 8 in one device call (../shared/gpu/README.md: one session has 15
# minutes in all, machine start included). From the project root, once on the dev machine:
#   ../shared/gpu/fetch-wheels.sh            # diffusers wheel into .whl/ (the GPU image lacks it)
# then run with the device tool, carrying .whl:
#   bash bench/gpu.sh                        # all three measurements
#   bash bench/gpu.sh train-sd15-full        # only the named ones
#   LIMIT_S=255 bash bench/gpu.sh train-sd15-full   # one measurement, given more time
# Results: one JSON line per measurement on stdout and in $OUT/*.jsonl; logs in $OUT/*.log.
# Each measurement has its own time limit, so one that hangs (a cold compile) leaves the others.
set -u
OUT=${OUT:-$(mktemp -d)}
export OUT PYTHONUNBUFFERED=1
# The GPU machine has no diffusers: without the wheel every measurement would fail on import.
if ! python3 -c "import diffusers" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "no diffusers and no .whl/: run ../shared/gpu/fetch-wheels.sh and carry .whl"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import diffusers, peft, torch, transformers; print('diffusers', diffusers.__version__, 'torch', torch.__version__)" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
WORK=/tmp/selma-bench; mkdir -p "$WORK"
ONLY="$*"

run() {  # run LIMIT_S NAME SCRIPT ARGS...
  local limit=$1 name=$2; shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  limit=${LIMIT_S:-$limit}
  echo "== $name (limit ${limit}s)"
  timeout "$limit" python3 "$@" --work-dir "$WORK/$name" >"$OUT/$name.out" 2>"$OUT/$name.log"
  echo "exit $?"; tail -n 1 "$OUT/$name.out"
}

# Limits add up to 580 s: under the 600 s a device call may run (call it with timeout_s 600). A
# measurement cut short still leaves each recipe's figures, printed as it ends, in $OUT/NAME.log.
# SD 1.x compiles the whole UNet: one graph, where its blocks are 21 distinct shapes compiled one
# after another (over 150 s cold on an H100). SDXL compiles its blocks: 16 graphs, about 120 s cold,
# where the whole UNet took over 5 minutes.
run 195 train-sd15-full bench/train_throughput.py --arch sd15 --compile full --restart-timeout 70
run 140 generate-sd15-full bench/generate_throughput.py --arch sd15 --compile full
run 245 train-sdxl-blocks bench/train_throughput.py --arch sdxl --compile blocks --steps 12 --warmup 2 --images 32 --restart-timeout 60
