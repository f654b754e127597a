"""Optional phase, merge-search: which expert weights make the best merged model?

Recipe:
1. The candidates are weight vectors over the skills' experts: SELMA's 1/N first, then a ``grid``
   (``grid_points`` values from ``low`` to ``high`` per expert, at most ``max_candidates``) or
   ``random`` draws (``samples`` vectors, uniform in [low, high], fixed ``seed``).
2. One job per candidate (they run in parallel): the experts are loaded side by side and combined
   with ``set_adapters(names, weights)``, which is exactly the linear merge with those weights;
   images are drawn for every skill's held-out prompts with the eval phase's sampling settings and
   seeds, and scored with ``metric`` (an image-text metric of the eval phase, with its model from
   the eval section: CLIPScore by default; best set to what ``promote.metric`` judges by).
3. A final job gathers every candidate's scores into one table, picks the best mean, commits
   ``search.json`` and logs the table and the best weights. With ``merge.weights`` unset, the merge
   phase then uses the best weights.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass
from typing import Literal

from selma_core.errors import InputError
from selma_core.typed_yaml import hashed_unless_default


@dataclass
class MergeSearchConfig:
    enabled: bool = False
    strategy: Literal["grid", "random"] = "grid"
    grid_points: int = 3
    samples: int = 8
    low: float = 0.0
    high: float = 1.0
    max_candidates: int = 32
    seed: int = 0
    # Held-out prompts scored per skill for each candidate (None: all); fewer is faster, noisier.
    max_prompts_per_skill: int | None = None
    # What candidates are scored with: one of eval.metrics' names (clip_score, pickscore,
    # image_reward, hps, vqascore), its model the eval section's (eval.pickscore_model, ...).
    # Hashed only when not the default: searches made before the setting keep their keys.
    metric: str = hashed_unless_default("clip_score")

    def __post_init__(self) -> None:
        if self.grid_points < 2:
            raise ValueError(f"grid_points: expected >= 2, got {self.grid_points}")
        if self.samples < 1 or self.max_candidates < 1:
            raise ValueError("samples and max_candidates: expected >= 1")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"low and high: expected finite numbers, got {self.low} and {self.high}")
        if self.high <= self.low:
            raise ValueError(f"high: expected more than low ({self.low}), got {self.high}")
        if self.max_prompts_per_skill is not None and self.max_prompts_per_skill < 1:
            raise ValueError(f"max_prompts_per_skill: expected >= 1, got {self.max_prompts_per_skill}")
        from selma_core.metrics.suite import IMAGE_TEXT_METRICS

        if self.metric not in IMAGE_TEXT_METRICS:
            raise ValueError(f"metric: unknown {self.metric!r}; known: {', '.join(IMAGE_TEXT_METRICS)}")
        if self.strategy == "random" and self.samples + 1 > self.max_candidates:
            raise ValueError(
                f"samples: {self.samples} random candidates and SELMA's 1/N make {self.samples + 1}, more "
                f"than max_candidates {self.max_candidates}; lower samples or raise max_candidates"
            )


def too_large_a_grid(cfg: MergeSearchConfig, n_experts: int, size: int):
    from selma_core.errors import ConfigError

    return ConfigError(
        f"merge_search: a grid of {cfg.grid_points} points for {n_experts} experts has {size} candidates "
        f"(with SELMA's 1/N), more than max_candidates {cfg.max_candidates}; use strategy: random, fewer "
        "grid_points, or raise max_candidates"
    )


def candidate_weights(cfg: MergeSearchConfig, n_experts: int) -> list[list[float]]:
    """The weight vectors to try, SELMA's 1/N first; deterministic."""
    uniform = [round(1.0 / n_experts, 6)] * n_experts
    found = [uniform]
    if cfg.strategy == "grid":
        step = (cfg.high - cfg.low) / (cfg.grid_points - 1)
        values = [round(cfg.low + i * step, 6) for i in range(cfg.grid_points)]
        # All zeros is no candidate; 1/N, first, may be off the grid: the count is known after both.
        size = cfg.grid_points**n_experts
        if size > cfg.max_candidates + 1:  # too many whatever 1/N does: not enumerated at all
            raise too_large_a_grid(cfg, n_experts, size)
        pool = [list(v) for v in itertools.product(values, repeat=n_experts) if any(v)]
        size = len(found) + sum(1 for weights in pool if weights not in found)
        if size > cfg.max_candidates:
            raise too_large_a_grid(cfg, n_experts, size)
    else:
        rng = random.Random(cfg.seed)
        pool = [
            [round(rng.uniform(cfg.low, cfg.high), 6) for _ in range(n_experts)] for _ in range(cfg.samples)
        ]
    for weights in pool:
        if weights not in found:
            found.append(weights)
    return found  # within max_candidates: a grid is checked above, random samples by the config


def score_candidate(ctx, index: int) -> dict:
    """One candidate: the experts combined with its weights, scored per skill on held-out prompts."""
    from selma_core.phases.evaluate import draw_and_score, load_heldout, loaded_adapters, open_eval_models

    search = ctx.config.merge_search
    weights = candidate_weights(search, len(ctx.config.skills))[index]
    skills = list(ctx.config.skills)
    heldout = load_heldout(ctx, skills, search.max_prompts_per_skill)
    pipe, scorer, device = open_eval_models(ctx, search.metric)
    experts = [(ctx.fetch("train", s), w) for s, w in zip(skills, weights, strict=True)]
    with loaded_adapters(pipe, "candidate", experts, ctx.config.allow_pickle_checkpoints):
        rows = draw_and_score(pipe, scorer, heldout, ctx.config.eval, device)
    per_skill = {s: sum(r["score"] for r in rows if r["skill"] == s) / len(heldout[s]) for s in skills}
    result = {
        "index": index,
        "weights": dict(zip(skills, weights, strict=True)),
        "metric": search.metric,
        "scores": per_skill,
        "mean": sum(per_skill.values()) / len(skills),
    }
    with ctx.output() as out:
        (out / "candidate.json").write_text(json.dumps(result, indent=1))
    ctx.run.log_metrics({"search.mean": result["mean"], **{f"search.{s}": v for s, v in per_skill.items()}})
    return result


def select_best(ctx, skill_name: str | None = None) -> dict:
    """All candidates' scores in one table; the best mean wins (ties: the earlier candidate)."""
    candidates = []
    for dep in ctx.job.deps:
        job = ctx.plan.jobs[dep]
        if job.phase == "merge-search":
            candidates.append(json.loads(ctx.store.read_output_file(job.key, "candidate.json")))
    candidates.sort(key=lambda c: c["index"])
    unscored = [c["index"] for c in candidates if not math.isfinite(c["mean"])]
    if unscored:  # NaN compares false with everything: max() would keep or skip it silently
        raise InputError(
            f"merge-search: candidate(s) {unscored} have no finite mean score (committed before "
            "scores were checked); rerun them with --force merge-search"
        )
    best = max(candidates, key=lambda c: (c["mean"], -c["index"]))
    skills = list(ctx.config.skills)
    header = "| # | " + " | ".join(f"w:{s}" for s in skills) + " | " + " | ".join(skills) + " | mean |"
    lines = [header, "|" + "---|" * (2 * len(skills) + 2)]
    for c in candidates:
        mark = " (best)" if c is best else ""
        lines.append(
            f"| {c['index']}{mark} | "
            + " | ".join(f"{c['weights'][s]:.3f}" for s in skills)
            + " | "
            + " | ".join(f"{c['scores'][s]:.3f}" for s in skills)
            + f" | {c['mean']:.3f} |"
        )
    table = "\n".join(lines)
    metric = candidates[0].get("metric", "clip_score")
    summary = {"metric": metric, "best": best, "candidates": candidates, "table": table}
    with ctx.output() as out:
        (out / "search.json").write_text(json.dumps(summary, indent=1))
        (out / "search.md").write_text(table + "\n")
    ctx.run.log_params({f"search.best_weight.{s}": w for s, w in best["weights"].items()})
    ctx.run.log_metrics({"search.best_mean": best["mean"], "search.candidates": len(candidates)})
    ctx.run.log_dict(summary, "merge_search.json")
    print(f"merge search, scored with {metric}:\n{table}")
    return {"metric": metric, "best": best, "candidates": len(candidates)}
