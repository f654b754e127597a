"""Committing and fetching an output of many small files: requests side by side against one at a time.

An eval output holds thousands of PNGs (DSG-1k: 1,060 prompts for each model compared), and every
file is one request to the store: the time goes to round trips, not bytes. The store moves
``storage.transfer_threads`` files at once; the reference is the same store with one thread (what
every commit and fetch did before), measured in the same run on the same endpoint.

By default the endpoint is a ``moto_server`` this script starts on 127.0.0.1 (a loopback round
trip: real S3's are longer, so the ratio there is larger; run it against yours with
``--endpoint-url`` and ``--uri``). ``--store local`` measures a local folder instead. Prints one JSON
object as its last line.

    python bench/store_transfers.py --files 500 --kib 64 --threads 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selma_core.config import StorageConfig  # noqa: E402
from selma_core.storage import open_store  # noqa: E402

BUCKET = "selma-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    """A moto_server on a free loopback port, with the bucket made; the process and its URL."""
    import boto3

    # moto accepts any credentials; these are for it alone (set only when none are).
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(name, "moto-bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise SystemExit(f"moto_server did not start; its log: {log}") from None
            time.sleep(0.2)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    return process, endpoint


def make_output(folder: Path, files: int, kib: int) -> None:
    """``files`` files of ``kib`` KiB of random bytes (incompressible, like PNGs), in a few folders."""
    for i in range(files):
        path = folder / "images" / f"variant-{i % 5}" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(kib << 10))
    (folder / "results.json").write_text(json.dumps({"files": files}))


def measure(configs: dict[str, StorageConfig], source: Path, scratch: Path, repeats: int) -> dict[str, dict]:
    """For each config, the best of ``repeats`` commits of ``source`` and fetches of it into an empty
    cache (seconds). The configs take turns, so drift in the machine (page cache, a busy neighbour)
    weighs on each alike."""
    stores = {name: open_store(cfg) for name, cfg in configs.items()}
    best = {name: {"commit_s": float("inf"), "fetch_s": float("inf")} for name in configs}
    for _ in range(repeats):
        for name, store in stores.items():
            key = f"bench/{uuid.uuid4().hex}"
            start = time.perf_counter()
            store.commit_dir(source, key)
            best[name]["commit_s"] = min(best[name]["commit_s"], time.perf_counter() - start)
            cache = Path(tempfile.mkdtemp(dir=scratch))
            start = time.perf_counter()
            store.fetch_dir(key, cache)
            best[name]["fetch_s"] = min(best[name]["fetch_s"], time.perf_counter() - start)
            shutil.rmtree(cache)
            store.delete_prefix(key)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", choices=("s3", "local"), default="s3")
    parser.add_argument("--files", type=int, default=500, help="files in the output (default 500)")
    parser.add_argument("--kib", type=int, default=64, help="size of each file in KiB (default 64)")
    parser.add_argument(
        "--threads",
        type=int,
        default=StorageConfig().transfer_threads,
        help="storage.transfer_threads measured",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; the best counts (default 3)")
    parser.add_argument("--endpoint-url", help="an S3 endpoint to measure instead of a local moto_server")
    parser.add_argument("--uri", help="with --endpoint-url: s3://BUCKET/PREFIX to write under (cleaned up)")
    args = parser.parse_args()
    if args.endpoint_url and not args.uri:
        parser.error("--endpoint-url needs --uri s3://BUCKET/PREFIX")

    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    moto = None
    try:
        source = work / "output"
        make_output(source, args.files, args.kib)
        if args.store == "local":
            uri, endpoint, where = f"file://{work / 'store'}", None, "local folder"
        elif args.endpoint_url:
            uri, endpoint, where = args.uri, args.endpoint_url, args.endpoint_url
        else:
            moto, endpoint = start_moto(work / "moto.log")
            uri, where = f"s3://{BUCKET}/bench", "moto_server on 127.0.0.1"
        configs = {
            "serial": StorageConfig(uri=uri, endpoint_url=endpoint, transfer_threads=1),
            "side_by_side": StorageConfig(uri=uri, endpoint_url=endpoint, transfer_threads=args.threads),
        }
        times = measure(configs, source, work, args.repeats)
        serial, side_by_side = times["serial"], times["side_by_side"]
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "store": where,
                "files": args.files + 1,
                "kib": args.kib,
                "threads": args.threads,
                "reference_commit_s": round(serial["commit_s"], 4),
                "project_commit_s": round(side_by_side["commit_s"], 4),
                "commit_speedup": round(serial["commit_s"] / side_by_side["commit_s"], 2),
                "reference_fetch_s": round(serial["fetch_s"], 4),
                "project_fetch_s": round(side_by_side["fetch_s"], 4),
                "fetch_speedup": round(serial["fetch_s"] / side_by_side["fetch_s"], 2),
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
