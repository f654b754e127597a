"""Check: jobs forked by the local executor's fork server can use the GPU.

The server imports what jobs import and refuses to fork once the CUDA driver is loaded (a forked
process could not initialise it again); each job initialises CUDA itself. CI has no GPU, so this runs
with the GPU measurements (bench/gpu.sh fork-server-cuda): it starts the server as the executor does,
forks two jobs that each run a matmul on the device, the second placed on one GPU as the executor
places jobs (``CUDA_VISIBLE_DEVICES``: read when the job first uses CUDA, after the fork, so it
must see exactly that one), then a third that is shown no GPU (it must see none), and prints one
JSON line: whether the server was ready (or why not), how long it took to import, and each job's
exit status, time, output (its result, and how many GPUs it saw) and whether it saw what it should.

    python bench/fork_server_cuda.py [--device cuda] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.executors.fork_server import ForkServer, ForkServerUnavailable  # noqa: E402
from jobs.executors.local import visible_gpus  # noqa: E402

JOB = (
    "import sys, torch; device = sys.argv[1]; x = torch.randn(256, 256, device=device); "
    "print(float((x @ x).abs().sum()), torch.cuda.get_device_name() if device == 'cuda' else device, "
    "'sees', torch.cuda.device_count(), 'GPUs')"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="where the forked jobs compute (default: cuda)")
    parser.add_argument("--work-dir", type=Path, default=None, help="logs go here (default: a temp folder)")
    parser.add_argument("--no-preload", action="store_true", help="a server that imports nothing (tests)")
    args = parser.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    report: dict = {"check": "fork-server-cuda", "device": args.device}
    started = time.monotonic()
    try:
        server = ForkServer(env, os.getcwd(), work / "fork-server.log", preload=not args.no_preload)
    except ForkServerUnavailable as e:
        print(json.dumps({**report, "ok": False, "why": str(e)}))
        return 1
    report["ready_s"] = round(time.monotonic() - started, 1)
    gpus = visible_gpus() if args.device.startswith("cuda") else []
    # (device, CUDA_VISIBLE_DEVICES or None to keep the server's, how many GPUs it must see or None)
    plan = [(args.device, None, None), (args.device, None, None)]  # each initialises the device itself
    if gpus:
        plan[1:] = [(args.device, gpus[-1], 1), ("cpu", "", 0)]  # one GPU placed; none shown
    jobs = []
    try:
        for i, (device, placed, expected) in enumerate(plan):
            log = work / f"job-{i}.log"
            log.write_text("")
            started = time.monotonic()
            job_env = env if placed is None else {**env, "CUDA_VISIBLE_DEVICES": placed}
            process = server.start(["-c", JOB, device], job_env, os.getcwd(), str(log))
            code = process.wait(timeout=300)
            output = log.read_text()
            saw = expected is None or output.rstrip().endswith(f"sees {expected} GPUs")
            jobs.append(
                {
                    "exit": code,
                    "seconds": round(time.monotonic() - started, 2),
                    "gpu": placed,
                    "saw_what_it_should": saw,
                    "log": output[-400:],
                }
            )
    finally:
        server.close()
    ok = all(job["exit"] == 0 and job["saw_what_it_should"] for job in jobs)
    print(json.dumps({**report, "ok": ok, "jobs": jobs}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
