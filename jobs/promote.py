"""Promote a candidate model version to ``champion`` when it wins; a CI gate.

    python -m jobs.promote --config configs/sd15.yaml [--version 7]

Compares the candidate (``--version``, else the version with alias ``candidate``, unless a merge of
another configuration of the same name registered it: then this configuration's own) with the current
``champion`` on the evaluation scores tagged on each version: promoted only if its mean score is
not worse and no skill regresses by more than ``promote.max_skill_regression`` (nor is missing:
``selma_core.promotion``). Promotion moves
``champion`` to the candidate and ``previous`` to the old champion. Every verdict is tagged on the
candidate (``selma.promotion.verdict``, and ``selma.promotion.judged``: what it was judged on), so
that ``--unless-judged`` (what ``jobs.retrain`` runs) judges a version only once for the same scores,
champion and gate. Prints the comparison table; the last line is one JSON object. Exit code: 0
promoted (or nothing new to judge), 3 refused, 2 invalid input, 1 a service failed (worth a retry).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from jobs.cli import parse_args
from selma_core.errors import ConfigError, SelmaError

# Distinct from 1 (a service failed, worth a retry) and 2 (invalid input): the gate said no.
EXIT_REFUSED = 3

# Tags on the judged version: the verdict, and a digest of all it rests on (the scores of both
# versions, the champion's version, the gate), so a rerun with nothing new does not judge again.
VERDICT_TAG, JUDGED_TAG = "selma.promotion.verdict", "selma.promotion.judged"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.promote",
        description=__doc__.split("\n\n")[0],
        epilog="Exit code: 0 promoted (or nothing new to judge), 3 refused, 2 invalid input, 1 a service "
        "failed (worth a retry). The last line printed is one JSON object.",
    )
    parser.add_argument("--config", required=True, help="pipeline config YAML (its registered model)")
    parser.add_argument(
        "--version",
        help="the version to consider (default: the one with the merge.alias alias, 'candidate' unless set)",
    )
    parser.add_argument("--max-skill-regression", type=float, help="override promote.max_skill_regression")
    parser.add_argument(
        "--unless-judged",
        action="store_true",
        help="exit 0 without judging when there is nothing new to judge: the candidate was judged "
        "before on the same scores, against the same champion, with the same gate (or the config "
        "registers no merged model, merge.method adapters). What jobs.retrain runs",
    )
    return parser


def unchanged(name: str, candidate: str | None, champion: str | None, reason: str) -> dict:
    """The outcome when there is nothing to judge (exit 0, no alias moved)."""
    print(f"{name}: nothing to promote: {reason}")
    return {
        "model": name,
        "candidate": candidate,
        "champion": champion,
        "promoted": False,
        "reasons": [reason],
        "rows": [],
        "unchanged": True,
    }


def judgement_digest(candidate: dict, champion: dict | None, champion_version: str | None, gate: dict) -> str:
    """What a verdict rests on, as a short digest."""
    from selma_core.config import stable_hash

    return stable_hash(
        {"candidate": candidate, "champion": champion, "champion_version": champion_version, "gate": gate}
    )


def _merge_key(cfg) -> str | None:
    """The store key of this configuration's merge output; None when the plan cannot be built here
    (a dataset skill's data out of reach)."""
    from selma_core.plan import build_plan
    from selma_core.skills import load_skills

    try:
        return build_plan(cfg, load_skills(cfg.skills_path, cfg.skills)).jobs["merge"].key
    except (SelmaError, OSError, KeyError):
        return None


def _how_to_register(cfg, config_path: str, key: str | None) -> str:
    """What registers the candidate: the merge job, or, where its output is committed already (it
    registered it at another tracking server, or before registration was on), its forced rerun."""
    from selma_core.storage import open_store

    run = f"python -m jobs.submit --phase all --config {config_path}"
    try:
        committed = key is not None and open_store(cfg.storage, create=False).is_committed(key)
    except (SelmaError, OSError):  # the store unreachable: the general advice
        committed = False
    if not committed:
        return f"the merge phase registers one ({run})"
    return (
        f"the merge output in the store ({key}) was registered elsewhere (another tracking "
        "server, or before merge.register was on), and a rerun skips the committed merge: "
        f"rerun it to register it here ({run.replace(' --config', ' --force merge --config')})"
    )


def _candidate(tracker, cfg, config_path: str, name: str):
    """This configuration's candidate: the version holding ``merge.alias``, unless a merge of another
    configuration registered it (its ``selma.store_key`` is not this configuration's merge output:
    the pipeline's name is shared, and a rerun that skips its committed merge moves no alias).
    Then the newest version of this configuration's merge output; a ``ConfigError`` when there is
    none. A version registered by hand (no store key) is judged as the alias says."""
    from selma_core.tracking.base import TAG_STORE_KEY

    alias = cfg.merge.alias
    holder = tracker.model_version(name, alias=alias)
    key = _merge_key(cfg)
    held = holder.tags.get(TAG_STORE_KEY) if holder is not None else None
    if holder is not None and (key is None or held in (None, key)):
        return holder
    mine = tracker.newest_model_version_with_tag(name, TAG_STORE_KEY, key) if key else None
    where = f"registered model {name!r} at {cfg.tracking.uri}"
    if mine is not None:
        # No holder: the alias was renamed (merge.alias is not part of the merge's key, so the
        # committed merge was skipped and set none) or removed by hand.
        where_alias = (
            f"alias {alias!r} is on v{holder.version}, the merged model of another configuration ({held})"
            if holder is not None
            else f"no version holds alias {alias!r}"
        )
        print(f"note: {where_alias}; judging v{mine.version}, this configuration's ({key})", file=sys.stderr)
        return mine
    if holder is None:
        raise ConfigError(
            f"{where} has no version with alias {alias!r}: {_how_to_register(cfg, config_path, key)}"
        )
    raise ConfigError(
        f"{where}: alias {alias!r} is on v{holder.version}, the merged model of another configuration "
        f"({held}), and no version is this configuration's ({key}): {_how_to_register(cfg, config_path, key)}"
    )


def _check_comparable(name: str, metric: str, candidate, champion, config_path: str) -> None:
    """A ``ConfigError`` unless the two versions' scores of ``metric`` are comparable: drawn with the
    same sampling, scored with the same metric settings, and, on each skill both were scored on,
    on the same prompts (another prompts job gives other prompts: other scores for the same model).
    Versions tagged before selma told these apart: the same eval section, as then."""
    from selma_core.phases.evaluate import METRIC_SETTINGS_PREFIX, PROMPTS_PREFIX, SETTINGS_TAG

    tag = METRIC_SETTINGS_PREFIX + metric
    if tag not in candidate.tags or tag not in champion.tags:
        tag = SETTINGS_TAG
    differ = []
    pair = (candidate.tags.get(tag), champion.tags.get(tag))
    if all(pair) and pair[0] != pair[1]:
        differ.append(f"sampling or {metric} settings ({tag} {pair[0]} vs {pair[1]})")
    prompts = sorted(
        key.removeprefix(PROMPTS_PREFIX)
        for key, value in candidate.tags.items()
        if key.startswith(PROMPTS_PREFIX) and champion.tags.get(key, value) != value
    )
    if prompts:
        differ.append(f"prompts of skill(s) {', '.join(prompts)} ({PROMPTS_PREFIX}<skill>)")
    if differ:
        raise ConfigError(
            f"{name}: candidate v{candidate.version} and champion v{champion.version} have {metric} scores "
            f"from different {' and '.join(differ)}: not comparable. Evaluate both on this configuration's "
            f"prompts (python -m jobs.submit --phase eval --model base merged models:/{name}/"
            f"{champion.version} --config {config_path}: its report compares them), then move the alias "
            "by hand if the candidate wins"
        )


def promote(args: argparse.Namespace) -> dict:
    from selma_core.config import load_config
    from selma_core.promotion import PREFIX, decide, scores_from_tags
    from selma_core.tracking import open_tracker

    if args.max_skill_regression is not None and not args.max_skill_regression >= 0:
        # As the config's own check: a negative margin would call an improvement a drop.
        raise ConfigError(f"--max-skill-regression: expected >= 0, got {args.max_skill_regression}")
    cfg = load_config(args.config)
    name = cfg.registered_model_name
    if cfg.promote.metric not in cfg.eval.metrics:
        # The eval phase tags only the metrics it computes: every candidate would lack this one.
        raise ConfigError(
            f"{cfg.source_path}: promote.metric {cfg.promote.metric} is not one of eval.metrics "
            f"({', '.join(cfg.eval.metrics) or 'none'}), so no version is ever scored on it; set "
            "promote.metric to one of them"
        )
    if cfg.merge.method == "adapters" or (not cfg.merge.register and not args.version):
        why = (
            "merge.method adapters registers no merged model, so there is nothing to promote"
            if cfg.merge.method == "adapters"
            else "merge.register is false: the merge registers no version, so there is no candidate "
            "to promote (give --version V to promote one registered otherwise)"
        )
        if args.unless_judged:
            return unchanged(name, None, None, why)
        raise ConfigError(why)
    tracker = open_tracker(cfg.tracking, create=False)
    if args.version:
        candidate = tracker.model_version(name, version=args.version)
        if candidate is None:
            raise ConfigError(
                f"registered model {name!r} at {cfg.tracking.uri} has no version {args.version}"
            )
    else:
        candidate = _candidate(tracker, cfg, args.config, name)
    champion = tracker.model_version(name, alias="champion")
    if champion is not None and champion.version == candidate.version:
        # Nothing new was trained (a rerun that skipped everything): not a failure, nothing to do.
        return unchanged(
            name, candidate.version, champion.version, f"v{candidate.version} is already the champion"
        )
    if champion is not None:
        _check_comparable(name, cfg.promote.metric, candidate, champion, args.config)
    metric = cfg.promote.metric
    limit = (
        cfg.promote.skill_regression_limit if args.max_skill_regression is None else args.max_skill_regression
    )
    candidate_scores = scores_from_tags(candidate.tags, metric, candidate.version)
    champion_scores = scores_from_tags(champion.tags, metric, champion.version) if champion else None
    champion_version = champion.version if champion else None
    if champion is not None and not champion_scores:
        # Without this, every candidate would pass: there is nothing to compare against.
        raise ConfigError(
            f"{name}: champion v{champion.version} has no {metric} scores (tags {PREFIX}{metric}.*): "
            "its alias was moved by hand, or it was evaluated without the merged model on held-out "
            "prompts. The gate cannot compare; move the champion alias by hand if the candidate "
            f"v{candidate.version} should replace it"
        )
    digest = judgement_digest(
        candidate_scores, champion_scores, champion_version, {"metric": metric, "max_skill_regression": limit}
    )
    if args.unless_judged and candidate.tags.get(JUDGED_TAG) == digest:
        verdict = candidate.tags.get(VERDICT_TAG, "judged")
        against = f"champion v{champion_version}" if champion else "no champion"
        return unchanged(
            name,
            candidate.version,
            champion_version,
            f"v{candidate.version} was {verdict} before, on the same scores, against {against}, "
            "with the same gate",
        )
    decision = decide(candidate_scores, champion_scores, limit)
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
    verdict = "promoted" if decision.promote else "refused"
    tracker.set_model_version_tags(name, candidate.version, {VERDICT_TAG: verdict, JUDGED_TAG: digest})
    return {
        "model": name,
        "candidate": candidate.version,
        "champion": champion.version if champion else None,
        "promoted": decision.promote,
        "reasons": decision.reasons,
        "rows": decision.rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv, {"promoted": False})
    if isinstance(args, int):
        return args
    try:
        outcome = promote(args)
    except SelmaError as e:
        print(f"error: {e}", file=sys.stderr)
        print(json.dumps({"promoted": False, "error": str(e)}))
        return e.exit_code
    except Exception as e:  # the registry failing mid-way (an outage): worth a retry; still a JSON line
        traceback.print_exc()
        print(json.dumps({"promoted": False, "error": repr(e)}))
        return 1
    print(json.dumps(outcome))
    return 0 if outcome["promoted"] or outcome.get("unchanged") else EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
