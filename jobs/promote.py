"""Promote a candidate model version to ``champion`` when it wins; a CI gate.

    python -m jobs.promote --config configs/sd15.yaml [--version 7]

Compares the candidate (``--version``, else the version with alias ``candidate``) with the current
``champion`` on the evaluation scores tagged on each version: promoted only if its mean score is
not worse and no skill regresses by more than ``promote.max_skill_regression``. Promotion moves
``champion`` to the candidate and ``previous`` to the old champion. Prints the comparison table;
the last line is one JSON object. Exit code: 0 promoted (or the candidate already is the champion),
3 refused, 2 invalid input, 1 a service failed (worth a retry).
"""

from __future__ import annotations

import argparse
import json
import sys

from selma_core.errors import ConfigError, SelmaError

# Distinct from 1 (a service failed, worth a retry) and 2 (invalid input): the gate said no.
EXIT_REFUSED = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.promote", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="pipeline config YAML (its registered model)")
    parser.add_argument("--version", help="the version to consider (default: the one aliased 'candidate')")
    parser.add_argument("--max-skill-regression", type=float, help="override promote.max_skill_regression")
    return parser


def promote(args: argparse.Namespace) -> dict:
    from selma_core.config import load_config
    from selma_core.promotion import decide, scores_from_tags
    from selma_core.tracking import open_tracker

    cfg = load_config(args.config)
    if cfg.merge.method == "adapters":
        raise ConfigError("merge.method adapters registers no merged model, so there is nothing to promote")
    tracker = open_tracker(cfg.tracking)
    name = cfg.registered_model_name
    candidate = (
        tracker.model_version(name, version=args.version)
        if args.version
        else tracker.model_version(name, alias=cfg.merge.alias)
    )
    if candidate is None:
        which = f"version {args.version}" if args.version else f"a version with alias {cfg.merge.alias!r}"
        raise ConfigError(f"registered model {name!r} at {cfg.tracking.uri} has no {which}")
    champion = tracker.model_version(name, alias="champion")
    if champion is not None and champion.version == candidate.version:
        # Nothing new was trained (a rerun that skipped everything): not a failure, nothing to do.
        print(f"{name}: v{candidate.version} is already the champion; nothing to promote")
        return {
            "model": name,
            "candidate": candidate.version,
            "champion": champion.version,
            "promoted": False,
            "reasons": ["already the champion"],
            "rows": [],
            "unchanged": True,
        }
    from selma_core.phases.evaluate import SETTINGS_TAG

    settings = (candidate.tags.get(SETTINGS_TAG), champion.tags.get(SETTINGS_TAG) if champion else None)
    if champion is not None and all(settings) and settings[0] != settings[1]:
        # Scores from other prompts, sampling or scorers are not comparable: refuse, say why.
        raise ConfigError(
            f"{name}: candidate v{candidate.version} and champion v{champion.version} were evaluated "
            f"with different eval settings ({SETTINGS_TAG} {settings[0]} vs {settings[1]}); evaluate "
            "both with the same eval section (python -m jobs.submit --phase eval) before promoting"
        )
    metric = cfg.promote.metric
    limit = (
        cfg.promote.max_skill_regression if args.max_skill_regression is None else args.max_skill_regression
    )
    decision = decide(
        scores_from_tags(candidate.tags, metric),
        scores_from_tags(champion.tags, metric) if champion else None,
        limit,
    )
    print(
        f"{name}: candidate v{candidate.version} vs champion "
        + (f"v{champion.version}" if champion else "(none)")
    )
    if decision.rows:
        print(decision.table())
    if decision.promote:
        if champion is not None:
            tracker.set_model_alias(name, "previous", champion.version)
        tracker.set_model_alias(name, "champion", candidate.version)
        print(
            f"promoted: v{candidate.version} is the champion"
            + (f"; v{champion.version} is previous" if champion else "")
        )
    else:
        print("refused: " + "; ".join(decision.reasons))
    return {
        "model": name,
        "candidate": candidate.version,
        "champion": champion.version if champion else None,
        "promoted": decision.promote,
        "reasons": decision.reasons,
        "rows": decision.rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        outcome = promote(args)
    except SelmaError as e:
        print(f"error: {e}", file=sys.stderr)
        print(json.dumps({"promoted": False, "error": str(e)}))
        return e.exit_code
    print(json.dumps(outcome))
    return 0 if outcome["promoted"] or outcome.get("unchanged") else EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
