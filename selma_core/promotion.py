"""Deciding whether a candidate model replaces the champion: pure comparison, no I/O.

A candidate is promoted when its mean score (the mean of its per-skill means: each skill counts once,
unlike the report's ``all`` row, which pools prompts) is not worse than the champion's and no skill's score
drops by more than ``max_skill_regression``. A candidate that lacks a skill the champion was scored
on is refused (it may have lost it); with other skills than the champion's, the two means are
taken over the skills both have. Scores are the tags the eval phase sets on each
registered version (``selma.eval.<metric>.<skill>`` and ``.mean``). Compare versions evaluated on the
same held-out prompts: their eval settings are part of each version's ``selma.eval.key``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from selma_core.errors import InputError

PREFIX = "selma.eval."


def scores_from_tags(tags: dict[str, str], metric: str, version: str | None = None) -> dict[str, float]:
    """{skill or "mean": score} from a version's tags; a tag that is not a number is an ``InputError``
    naming it (the eval phase writes numbers: someone edited it)."""
    prefix = f"{PREFIX}{metric}."
    scores = {}
    for key, value in tags.items():
        if key.startswith(prefix):
            try:
                scores[key[len(prefix) :]] = float(value)
            except ValueError as e:
                of = f" of version {version}" if version else ""
                raise InputError(f"tag {key}{of} is {value!r}, not a number: evaluate it again") from e
    return scores


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)  # skill, champion, candidate, change, ok

    def table(self) -> str:
        lines = ["| skill | champion | candidate | change | |", "|---|---|---|---|---|"]
        for row in self.rows:
            champion = "-" if row["champion"] is None else f"{row['champion']:.3f}"
            change = "-" if row["change"] is None else f"{row['change']:+.3f}"
            verdict = "ok" if row["ok"] else "REGRESSION"
            candidate = "-" if row["candidate"] is None else f"{row['candidate']:.3f}"
            lines.append(f"| {row['skill']} | {champion} | {candidate} | {change} | {verdict} |")
        return "\n".join(lines)


def decide(
    candidate: dict[str, float], champion: dict[str, float] | None, max_skill_regression: float
) -> Decision:
    if "mean" not in candidate:
        return Decision(False, ["the candidate has no evaluation scores: run --phase eval first"])
    broken = sorted(s for s, v in candidate.items() if not math.isfinite(v))
    if broken:
        # NaN compares false with everything: it would pass the gate and then block every later one.
        return Decision(
            False, [f"the candidate's score is not a number for {', '.join(broken)}: evaluate it again"]
        )
    if champion is not None:
        # A champion's score that is not a number (promoted before this check) is no score at all.
        champion = {s: v for s, v in champion.items() if math.isfinite(v)}
    if champion is None:
        rows = [
            {"skill": s, "champion": None, "candidate": v, "change": None, "ok": True}
            for s, v in candidate.items()
        ]
        return Decision(True, ["no champion yet"], rows)
    decision = Decision(True)
    skills, champion_skills = set(candidate) - {"mean"}, set(champion) - {"mean"}
    dropped = sorted(champion_skills - skills)
    other_skills = skills != champion_skills
    if other_skills and "mean" in champion:
        # Means over different skills are not comparable: both are taken over the shared ones.
        shared = sorted(skills & champion_skills)
        candidate = {**candidate, "mean": _mean([candidate[s] for s in shared])}
        champion = {**champion, "mean": _mean([champion[s] for s in shared])}
    for skill in sorted(candidate, key=lambda s: (s == "mean", s)):
        before = champion.get(skill)
        change = None if before is None or candidate[skill] is None else candidate[skill] - before
        if skill == "mean":
            ok = change is None or change >= 0
            if not ok:
                decision.reasons.append(
                    f"mean score {candidate[skill]:.3f} is below the champion's {before:.3f}"
                    + (" (both over the skills they share)" if other_skills else "")
                )
        else:
            ok = change is None or change >= -max_skill_regression
            if not ok:
                decision.reasons.append(
                    f"skill {skill} drops by {-change:.3f} "
                    f"(more than max_skill_regression {max_skill_regression})"
                )
        decision.rows.append(
            {"skill": skill, "champion": before, "candidate": candidate[skill], "change": change, "ok": ok}
        )
    for skill in dropped:  # the champion was scored on it, the candidate was not: it may have lost it
        decision.reasons.append(
            f"skill {skill}: the champion was scored on it, the candidate was not (a merged model "
            "without a skill the champion has is not promoted by the gate; move the alias by hand if "
            "that is intended)"
        )
        decision.rows.insert(
            -1, {"skill": skill, "champion": champion[skill], "candidate": None, "change": None, "ok": False}
        )
    decision.promote = not decision.reasons
    return decision


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
