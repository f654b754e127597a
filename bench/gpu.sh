#!/bin/bash
# Every GPU measurement of issue 8 (../shared/gpu/README.md: one session has 15 minutes of device
# time in all, machine start included; one call runs at most 600 s). From the project root, once on
# the dev machine:
#   ../shared/gpu/fetch-wheels.sh            # diffusers wheel into .whl/ (the GPU image lacks it)
# then two device calls, carrying .whl, the second at once (the machine stays warm only 30 s):
#   bash bench/gpu.sh fork-server-cuda train-sd15-full-graph train-sdxl-blocks-graph  # timeout_s 480
#   bash bench/gpu.sh generate-sd15-full generate-sd15-full-graph-vae                  # timeout_s 380
# With no names it runs them all (over 600 s: too long for one call); `attention` (per-shape
# kernel times, about 60 s) runs only when named. LIMIT_S=N overrides each measurement's limit.
# Results: one JSON line per measurement on stdout and in $OUT/<bench>.jsonl (in the .jsonl a
# measurement that restarts from the store has two: the first written before the restart, so that
# a time limit there loses nothing; the last is complete), each with a profile
# of the project's steps after the timed ones ($OUT/<bench>-<arch>-profile.txt); every
# measurement's output in $OUT/log.txt (a call returns at most 8 files). Each measurement has its
# own time limit, so one that hangs leaves the others.
set -u
OUT=${OUT:-$(mktemp -d)}
export OUT PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
# The GPU machine has no diffusers: without the wheel every measurement would fail on import.
if ! python3 -c "import diffusers" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "no diffusers and no .whl/: run ../shared/gpu/fetch-wheels.sh and carry .whl"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import diffusers, peft, torch, transformers; print('diffusers', diffusers.__version__, 'torch', torch.__version__)" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
WORK=/tmp/selma-bench; mkdir -p "$WORK"
ONLY="$*"

run() {  # run LIMIT_S NAME WORK_SUBDIR SCRIPT ARGS...: measurements sharing WORK_SUBDIR share caches
  local limit=$1 name=$2 dir=$3; shift 3
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  if [ -z "$ONLY" ] && [ "$name" = attention ]; then return; fi
  limit=${LIMIT_S:-$limit}
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" python3 "$@" --work-dir "$WORK/$dir" >"$WORK/$name.out" 2>>"$LOG"
  echo "exit $?" | tee -a "$LOG"
  cat "$WORK/$name.out" >>"$LOG"
  tail -n 1 "$WORK/$name.out"
}

# Times on an H200 (2026-11-27, bench/RESULTS.md), model building and the reference included:
# SD 1.x training ~255 s (a cold compile of the whole UNet takes 145 s); SDXL training ~140 s (its
# 16 block graphs compile in 93 s); generation ~145 s; each with its profile. The training restarts
# from the store were measured then (SD 1.x 28 s, SDXL 23 s) and are not measured again (every
# training measurement passes --no-restart-check); generation's is measured below.
# A measurement's `-graph` twin runs the project with `--cuda-graph`: in training each micro-batch
# replayed as a CUDA graph, in generation the compiled UNet (the GPU sat idle 51% of each SDXL
# training step, 8% of each SD 1.x one and of each generation batch, waiting for Python to launch
# kernels). The training twins run alone, compiling cold (their plain figures, 2.99x and 2.34x,
# were measured then; each line has its own reference, so its ratio is this run's). Generation's
# twin runs after its plain measurement, in its work folder: its kernels come from the first one's
# caches (its graph is lowered again: the CUDA-graph mode is part of the cache key), and it also
# compiles the VAE's decoder (`--compile-vae`: the eager decode, 259 ms a batch, included 122 ms
# of layout copies around group norms); each line's `project_vae_decode_ms` is its decode alone,
# so the two changes' shares of the difference can be told apart. The twin then restarts from the
# store (a new process, an empty inductor cache: a job on a fresh node) and draws one batch, its
# warm-up `compile_restart_warmup_s` (generation's was not measured yet; about 45 s). Expected:
# ~415 s (with the fork-server check) and ~320 s, with the machine's start about 825 of the
# session's 900 s.
# The plain one also times the eager decode in the contiguous layout (`--vae-contiguous`, a few
# seconds): the other way to spare those copies.
run 75 attention attention bench/attention.py --arch sd15 sdxl
# Not a speed: whether jobs forked by the local executor's fork server can use CUDA (about 20 s).
run 60 fork-server-cuda fork-server bench/fork_server_cuda.py
run 260 train-sd15-full train-sd15 bench/train_throughput.py --arch sd15 --compile full --profile 2 --no-restart-check
run 270 train-sd15-full-graph train-sd15 bench/train_throughput.py --arch sd15 --compile full --profile 2 --no-restart-check --cuda-graph
run 170 train-sdxl-blocks train-sdxl bench/train_throughput.py --arch sdxl --compile blocks --steps 12 --warmup 2 --images 32 --profile 2 --no-restart-check
run 170 train-sdxl-blocks-graph train-sdxl bench/train_throughput.py --arch sdxl --compile blocks --steps 12 --warmup 3 --images 32 --profile 2 --no-restart-check --cuda-graph
run 170 generate-sd15-full generate-sd15 bench/generate_throughput.py --arch sd15 --compile full --profile 1 --vae-contiguous --no-restart-check
run 200 generate-sd15-full-graph-vae generate-sd15 bench/generate_throughput.py --arch sd15 --compile full --profile 1 --cuda-graph --compile-vae
