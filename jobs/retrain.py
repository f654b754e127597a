"""Retrain and gate: run the whole pipeline, then promote the result only if it wins.

    python -m jobs.retrain --config configs/sd15.yaml [--backend kubernetes] [--summary FILE]

What CI runs (``.github/workflows/retrain.yml``), and what a person can run by hand: 1. ``python -m
jobs.submit --phase all`` (work whose output exists is skipped, so only what changed is redone);
2. ``python -m jobs.promote --unless-judged``: the candidate is judged unless it was judged before
on the same scores, champion and gate (so a candidate whose first run stopped before its gate, say
at a failed eval, is judged by the rerun that completes it, and an unchanged rerun judges nothing);
3. a Markdown report (the jobs, the comparison table, the verdict) appended to ``--summary`` or
``$GITHUB_STEP_SUMMARY``. Exit code: the pipeline's when it fails, else the promotion's (0 promoted
or nothing new, 3 refused); 130 when interrupted (SIGTERM too), after stopping the running step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from jobs.cli import echo
from jobs.signals import terminate_as_interrupt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.retrain",
        description=__doc__.split("\n\n")[0],
        epilog="Exit code: the pipeline's when it fails (see jobs.submit --help), else the gate's: "
        "0 promoted or nothing new, 3 refused; 130 interrupted.",
    )
    parser.add_argument("--config", required=True, help="pipeline config YAML")
    parser.add_argument("--backend", choices=("local", "kubernetes"), help="executor (default: the config's)")
    parser.add_argument("--summary", help="append the Markdown report here (default: $GITHUB_STEP_SUMMARY)")
    return parser


def _run(module: str, args: list[str]) -> tuple[int, dict]:
    """Run a selma command, its output passing through; its exit code and last JSON line."""
    # A session of its own: Ctrl-C in a terminal reaches this process alone, which passes it on as
    # SIGTERM, once, whether the interrupt came from a terminal, kill -INT or a CI runner's SIGTERM.
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    last = "{}"
    assert process.stdout is not None
    try:
        for line in process.stdout:
            sys.stdout.write(line)
            if line.startswith("{"):
                last = line
        code = process.wait()
    except KeyboardInterrupt:
        # The step (a controller with running jobs) cancels its own work on SIGTERM, and we wait
        # for it rather than leave it running without us. A second interrupt stops the wait.
        process.terminate()
        for line in process.stdout:  # what it says as it stops, its last JSON line included
            sys.stdout.write(line)
        process.wait()
        raise
    try:
        return code, json.loads(last)
    except json.JSONDecodeError:
        return code, {}


def report(config: str, pipeline: dict, promotion: dict | None) -> str:
    lines = [f"## selma retraining: `{config}`", "", "| job | status |", "|---|---|"]
    lines += [f"| {j.get('job')} | {j.get('status')} |" for j in pipeline.get("jobs", [])]
    if pipeline.get("error"):
        lines += ["", f"**Pipeline error:** {pipeline['error']}"]
    if promotion is not None:
        lines += ["", "### Promotion", ""]
        if promotion.get("rows"):
            from selma_core.promotion import Decision

            # The gate's own table (a skill the candidate lacks, or a mean over no skills, is "-").
            lines += [Decision(bool(promotion.get("promoted")), rows=promotion["rows"]).table(), ""]
        if promotion.get("promoted"):
            lines.append(f"**Promoted** v{promotion['candidate']} to champion.")
        elif promotion.get("unchanged"):
            lines.append("Nothing new to promote: " + "; ".join(promotion.get("reasons", [])) + ".")
        elif promotion.get("error") or promotion.get("candidate") is None:
            # The gate did not judge (a configuration error, the registry failing): no verdict.
            lines.append(f"**Gate error:** {promotion.get('error') or 'jobs.promote printed no result'}")
        else:
            reasons = "; ".join(promotion.get("reasons", [])) or promotion.get("error", "")
            lines.append(f"**Refused** v{promotion.get('candidate')}: {reasons}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    terminate_as_interrupt()
    submit_args = ["--phase", "all", "--config", args.config]
    if args.backend:
        submit_args += ["--backend", args.backend]
    try:
        code, pipeline = _run("jobs.submit", submit_args)
        promotion = None
        if code == 0:
            code, promotion = _run("jobs.promote", ["--config", args.config, "--unless-judged"])
    except KeyboardInterrupt:
        echo("interrupted: retraining stopped")
        return 130
    summary = args.summary or os.environ.get("GITHUB_STEP_SUMMARY")
    text = report(args.config, pipeline, promotion)
    if summary:
        with open(Path(summary), "a", encoding="utf-8") as f:
            f.write(text)
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
