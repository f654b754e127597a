#!/bin/bash
# Every GPU measurement of issue 8 (../shared/gpu/README.md: one session has 15 minutes of device
# time in all, machine start included; one call runs at most 600 s). From the project root, once on
# the dev machine:
#   ../shared/gpu/fetch-wheels.sh            # diffusers wheel into .whl/ (the GPU image lacks it)
# then two device calls, carrying .whl, the second at once (so the machine is still warm):
#   bash bench/gpu.sh train-sd15-full                                   # timeout_s 360
#   bash bench/gpu.sh attention generate-sd15-full train-sdxl-blocks    # timeout_s 470
# With no names it runs all four (over 600 s: too long for one call). LIMIT_S=N overrides each
# measurement's limit. Results: one JSON line per measurement on stdout and in $OUT/*.jsonl, each
# with a profile of the project's steps after the timed ones ($OUT/*-profile.txt); logs in
# $OUT/*.log. Each measurement has its own time limit, so one that hangs leaves the others.
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

# Times on an H100 (2026-11-26, bench/RESULTS.md): SD 1.x training ~245 s before its restart (a
# cold compile of the whole UNet takes 177 s; the restart, not yet measured, has 80 s); generation
# ~140 s; SDXL training ~230 s, its restart included; the attention kernels ~20 s. The profiles and
# attention: auto's measurement (about a second) add a few seconds to each. A
# measurement cut short still leaves each recipe's figures, printed as it ends, in $OUT/NAME.log,
# and the JSON line is printed before the restart is measured.
# SD 1.x compiles the whole UNet: one graph, where its blocks are 21 distinct shapes compiled one
# after another (still compiling after 150 s). SDXL compiles its blocks: 16 graphs, 121 s cold,
# where the whole UNet took over 5 minutes (on an H200).
# Each attention kernel on SD 1.x's and SDXL's shapes against PyTorch's choice, training and
# generation: what attention: auto chooses (each throughput run measures and applies it too).
run 45 attention bench/attention.py --arch sd15 sdxl
run 345 train-sd15-full bench/train_throughput.py --arch sd15 --compile full --profile 2 --restart-timeout 80
run 155 generate-sd15-full bench/generate_throughput.py --arch sd15 --compile full --profile 1
run 250 train-sdxl-blocks bench/train_throughput.py --arch sdxl --compile blocks --steps 12 --warmup 2 --images 32 --profile 2 --restart-timeout 60
