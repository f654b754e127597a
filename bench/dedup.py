"""Benchmark: ROUGE-L near-duplicate filtering, the naive rouge_score loop vs selma's filter.

    python bench/dedup.py [--skill everyday] [--candidates 10000] [--subset 1500] [--threshold 0.8]

Generates candidates with the offline prompt backend (fixed seed), runs the naive loop (every
candidate scored with rouge_score against every accepted prompt) and selma's filter on the first
``--subset`` candidates, checks both keep exactly the same prompts, then times selma's filter on all
candidates. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rouge_score import rouge_scorer  # noqa: E402

from selma_core.prompting.dedup import RougeDeduplicator  # noqa: E402
from selma_core.prompting.offline import OfflineTemplateGenerator  # noqa: E402
from selma_core.prompting.request import PromptRequest, parse_prompt_list  # noqa: E402
from selma_core.skills import load_skill  # noqa: E402


def candidates(skill_name: str, count: int, seed: int) -> list[str]:
    skill = load_skill(Path(__file__).resolve().parents[1] / "skills", skill_name)
    generator = OfflineTemplateGenerator(seed=seed)
    texts: list[str] = []
    request = 0
    while len(texts) < count:
        reply = generator.complete(PromptRequest(f"{skill_name}-{request:05d}", skill, (), 20))
        texts.extend(parse_prompt_list(reply))
        request += 1
    return texts[:count]


def naive_filter(texts: list[str], threshold: float) -> list[str]:
    """The self-instruct way: score each candidate against every kept prompt with rouge_score."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept: list[str] = []
    for text in texts:
        scores = [scorer.score(prior, text)["rougeL"].fmeasure for prior in kept]
        if not scores or max(scores) <= threshold:
            kept.append(text)
    return kept


def project_filter(texts: list[str], threshold: float) -> list[str]:
    dedup = RougeDeduplicator(threshold)
    for text in texts:
        dedup.add(text)
    return list(dedup.accepted)


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skill", default="everyday")
    parser.add_argument("--candidates", type=int, default=10_000)
    parser.add_argument("--subset", type=int, default=1_500)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    texts = candidates(args.skill, args.candidates, args.seed)
    subset = texts[: args.subset]
    naive_kept, naive_s = timed(naive_filter, subset, args.threshold)
    print(f"naive rouge_score loop, {len(subset)} candidates: {naive_s:.2f} s, kept {len(naive_kept)}")
    project_kept, project_subset_s = timed(project_filter, subset, args.threshold)
    print(f"selma filter, {len(subset)} candidates: {project_subset_s:.3f} s, kept {len(project_kept)}")
    all_kept, project_all_s = timed(project_filter, texts, args.threshold)
    print(f"selma filter, {len(texts)} candidates: {project_all_s:.2f} s, kept {len(all_kept)}")
    result = {
        "skill": args.skill,
        "threshold": args.threshold,
        "subset": len(subset),
        "naive_s": round(naive_s, 3),
        "project_subset_s": round(project_subset_s, 4),
        "speedup": round(naive_s / project_subset_s, 1),
        "identical": naive_kept == project_kept,
        "kept_subset": len(project_kept),
        "candidates": len(texts),
        "project_10k_s": round(project_all_s, 3),
        "kept_all": len(all_kept),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
