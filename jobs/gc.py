"""Find, and with --delete remove, what the store holds that nothing reads any more.

    python -m jobs.gc --config configs/demo.yaml              # what would go, and its size
    python -m jobs.gc --config configs/demo.yaml --delete     # remove it

Garbage is: commit attempts no manifest names (killed commits, outputs committed again), the
resume state (saved image shards, prompt waves, training checkpoints) of outputs already committed,
and writes a killed process left unfinished (a local store's temporary files, S3 multipart uploads);
with --abandoned also the resume state of outputs never committed (a killed job whose settings then
changed, so that no rerun will resume it). Only what was last written --min-age ago or earlier
(default 24h) is taken, and nothing under a key whose lease a live job holds. Caches are kept. The config only
names the store (its storage section): one store shared by several pipelines is collected whole.
``selma_core/storage/garbage.py`` has the rules. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from jobs.cli import parse_args
from selma_core.errors import ConfigError, SelmaError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MIN_AGE_FLOOR_S = 3600.0


def duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``24h`` or ``7d``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a duration such as 3600, 30m, 24h or 7d")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.gc",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Without --delete nothing is changed. Exit code: 0 listed (or deleted), 2 invalid "
        "configuration, 1 the store failed. The last line printed is one JSON object.",
    )
    parser.add_argument("--config", required=True, help="pipeline config YAML (its storage section)")
    parser.add_argument("--delete", action="store_true", help="delete what is found (default: only list it)")
    parser.add_argument(
        "--min-age",
        type=duration,
        default=duration("24h"),
        metavar="AGE",
        help="take only what was last written this long ago or earlier: 3600, 90m, 24h, 7d (default 24h, "
        "at least 1h)",
    )
    parser.add_argument(
        "--abandoned",
        action="store_true",
        help="also the resume state of outputs never committed (a rerun of their job would resume from it)",
    )
    return parser


def collect(config_path: str, delete: bool, min_age_s: float, abandoned: bool, outcome: dict) -> None:
    """Find the garbage, list it, and delete it with ``delete``; what was done goes into ``outcome``
    as it is done (a failure part-way still reports the folders deleted before it)."""
    from selma_core.config import load_config
    from selma_core.storage import open_store
    from selma_core.storage.base import human_size
    from selma_core.storage.garbage import delete_garbage, find_garbage

    cfg = load_config(config_path)
    store = open_store(cfg.storage, create=False)
    now = time.time()
    garbage, warnings = find_garbage(store, min_age_s, abandoned, now)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if garbage:
        print("| kind | prefix | objects | size | last written |", file=sys.stderr)
        print("|---|---|---|---|---|", file=sys.stderr)
    for group in garbage:
        age_h = (now - group.newest) / 3600
        print(
            f"| {group.kind} | {store.url(group.prefix)} | {len(group.objects)} | {human_size(group.size)} | "
            f"{age_h:.1f} h ago |",
            file=sys.stderr,
        )
    totals: dict[str, dict[str, int]] = {}
    for group in garbage:
        total = totals.setdefault(group.kind, {"groups": 0, "objects": 0, "bytes": 0})
        total["groups"] += 1
        total["objects"] += len(group.objects)
        total["bytes"] += group.size
    size = sum(group.size for group in garbage)
    outcome.update(
        store=store.uri,
        min_age_s=min_age_s,
        abandoned=abandoned,
        bytes=size,
        totals=totals,
        garbage=[
            {"kind": g.kind, "prefix": g.prefix, "objects": len(g.objects), "bytes": g.size} for g in garbage
        ],
        warnings=warnings,
    )
    if not delete:
        print(
            f"gc {store.uri}: {len(garbage)} folder(s), {human_size(size)} of garbage found (nothing "
            "deleted: add --delete)",
            file=sys.stderr,
        )
        return
    deleted, spared = outcome.setdefault("deleted_prefixes", []), outcome.setdefault("spared_prefixes", [])
    for group in garbage:
        try:
            done = delete_garbage(store, group)
        except ConfigError as e:
            if group.write is None:
                raise
            # Refused (no s3:AbortMultipartUpload): the rest is still collected.
            print(f"{store.url(group.prefix)}: spared: {e}", file=sys.stderr)
            spared.append(group.prefix)
            continue
        if done:
            deleted.append(group.prefix)
        else:  # a job took a lease on its key since the listing, or is still writing
            busy = "is being written" if group.write else f"a job is at work on {group.key} now"
            print(f"{store.url(group.prefix)}: spared: {busy}", file=sys.stderr)
            spared.append(group.prefix)
    outcome["deleted"] = True
    print(
        f"gc {store.uri}: {len(deleted)} folder(s) of garbage deleted, {len(spared)} spared", file=sys.stderr
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv, {"deleted": False})
    if isinstance(args, int):
        return args
    outcome: dict = {"deleted": False}
    try:
        if args.min_age < MIN_AGE_FLOOR_S:
            raise ConfigError(
                f"--min-age {args.min_age:g} s: at least {MIN_AGE_FLOOR_S:g} s (1h): a reader that read a "
                "manifest just before it was replaced may still be fetching the attempt it named"
            )
        collect(args.config, args.delete, args.min_age, args.abandoned, outcome)
    except (SelmaError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        print(json.dumps({**outcome, "error": str(e)}))
        return e.exit_code if isinstance(e, SelmaError) else 1
    print(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())
