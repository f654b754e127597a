"""Phase 1, prompts: an LLM writes a skill's training prompts by in-context learning (self-instruct).

Recipe, one skill per job:
1. Pool = the skill's seed prompts (they are kept, ``source: seed``).
2. Each request shows ``examples_per_request`` prompts sampled from the pool and asks for
   ``prompts_per_request`` more that follow the skill's rules (``backend``: ``openai`` for any
   OpenAI-compatible API, ``offline`` for the template generator, which is not an LLM).
3. The reply is parsed (numbered or bulleted list, JSON array); lines that break the rules (empty,
   over ``max_words``) are rejected; a candidate whose ROUGE-L against any accepted prompt exceeds
   ``rouge_threshold`` is dropped as a near-duplicate. Accepted prompts join the pool.
4. Stop at ``num_prompts`` (default: the skill's ``target_count``). Raises ``InputError`` when
   ``max_requests`` pass without reaching it, or when ``max_useless_requests`` replies in a row yield
   nothing usable (quoting what came back).
5. A ``heldout_fraction`` of the prompts (positions drawn before generation, deterministic for
   ``seed``) is kept for evaluation: never trained on, never shown to the LLM as an example.
Output: ``prompts.jsonl`` (``{id, skill, text, source, request_id, model, split}``) and ``stats.json``.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Literal

from selma_core.errors import InputError
from selma_core.prompting.openai_compat import OpenAIConfig
from selma_core.typed_yaml import execution_only


@dataclass
class PromptsConfig:
    # "offline" composes prompts from the skill's vocabulary (demos, tests); "openai" asks an LLM.
    backend: Literal["offline", "openai"] = "offline"
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    # Prompts per skill; None uses each skill's target_count.
    num_prompts: int | None = None
    # In-context examples per request (SELMA: 3) and new prompts asked for per request.
    examples_per_request: int = 3
    prompts_per_request: int = 20
    # ROUGE-L F-measure above which a candidate is a near-duplicate (SELMA's code: 0.8).
    rouge_threshold: float = 0.8
    # Longest prompt accepted, in words (CLIP's text encoder reads 77 tokens).
    max_words: int = 60
    heldout_fraction: float = 0.1
    max_requests: int = execution_only(200)
    max_useless_requests: int = execution_only(5)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_prompts is not None and self.num_prompts < 2:
            raise ValueError(
                f"num_prompts: expected >= 2 (one to train, one held out), got {self.num_prompts}"
            )
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction: expected a number in (0, 1), got {self.heldout_fraction}")
        for name in ("examples_per_request", "prompts_per_request", "max_requests", "max_useless_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if not 0.0 < self.rouge_threshold <= 1.0:
            raise ValueError(f"rouge_threshold: expected a number in (0, 1], got {self.rouge_threshold}")


def make_backend(cfg: PromptsConfig):
    if cfg.backend == "openai":
        from selma_core.prompting.openai_compat import OpenAICompatibleBackend

        return OpenAICompatibleBackend(cfg.openai)
    from selma_core.prompting.offline import OfflineTemplateGenerator

    return OfflineTemplateGenerator(seed=cfg.seed)


def generate_prompts(ctx, skill_name: str) -> dict:
    """Write ``ctx.job.key``: the skill's prompts with their train/held-out split."""
    from tqdm import tqdm

    from selma_core.prompting.dedup import RougeDeduplicator
    from selma_core.prompting.request import PromptRequest, parse_prompt_list

    cfg: PromptsConfig = ctx.config.prompts
    skill = ctx.skills[skill_name]
    target = cfg.num_prompts or skill.target_count
    backend = make_backend(cfg)
    rng = random.Random(f"{cfg.seed}:{skill_name}")
    dedup = RougeDeduplicator(cfg.rouge_threshold)
    records: list[dict] = []
    rejected = {"duplicate": 0, "too_long": 0, "empty": 0}

    heldout: set[int] = set()  # positions in ``records``; chosen once the seeds are in

    def accept(text: str, source: str, request_id: str | None) -> None:
        if len(records) < target and dedup.add(text):
            position = len(records)
            records.append(
                {
                    "id": f"{skill_name}-{position:05d}",
                    "skill": skill_name,
                    "text": text,
                    "source": source,
                    "request_id": request_id,
                    "model": None if source == "seed" else backend.model_name,
                    "split": "heldout" if position in heldout else "train",
                }
            )
        elif len(records) < target:
            rejected["duplicate"] += 1

    for seed_text in skill.seeds:
        if seed_text.strip():
            accept(seed_text.strip(), "seed", None)

    # The held-out split is drawn before generation, among the generated prompts (not the seeds,
    # which we wrote): held-out prompts are never trained on and never shown as in-context examples.
    n_heldout = min(max(1, round(cfg.heldout_fraction * target)), target - 1)
    split_rng = random.Random(f"{cfg.seed}:{skill_name}:split")
    first = len(records) if target - len(records) >= n_heldout else 0
    heldout.update(split_rng.sample(range(first, target), n_heldout))
    for position, record in enumerate(records):  # seeds, when there are too few generated places
        record["split"] = "heldout" if position in heldout else "train"

    start = time.monotonic()
    requests = useless = 0
    samples: list[str] = []
    progress = tqdm(total=target, initial=len(records), desc=f"prompts {skill_name}", unit="prompt")
    try:
        while len(records) < target:
            if requests >= cfg.max_requests:
                raise InputError(
                    f"prompts for skill {skill_name!r}: only {len(records)} of {target} distinct prompts "
                    f"after {requests} requests (rejected: {rejected}); raise prompts.max_requests, "
                    f"lower num_prompts, or raise rouge_threshold ({cfg.rouge_threshold})"
                )
            pool = [r["text"] for r in records if r["split"] == "train"]
            examples = tuple(rng.sample(pool, min(cfg.examples_per_request, len(pool))))
            request = PromptRequest(f"{skill_name}-{requests:05d}", skill, examples, cfg.prompts_per_request)
            reply = backend.complete(request)
            requests += 1
            before = len(records)
            for text in parse_prompt_list(reply):
                if len(text.split()) > cfg.max_words:
                    rejected["too_long"] += 1
                    continue
                accept(text, "offline" if cfg.backend == "offline" else "llm", request.request_id)
            if not reply.strip():
                rejected["empty"] += 1
            progress.update(len(records) - before)
            if len(records) == before:
                useless += 1
                samples.append(reply.strip()[:120])
                if useless >= cfg.max_useless_requests:
                    raise InputError(
                        f"prompts for skill {skill_name!r}: {useless} requests in a row gave no new usable "
                        f"prompt (accepted {len(records)} of {target}); "
                        f"samples of what came back: {samples[-3:]!r}"
                    )
            else:
                useless = 0
    finally:
        progress.close()

    stats = {
        "skill": skill_name,
        "accepted": len(records),
        "train": len(records) - n_heldout,
        "heldout": n_heldout,
        "rejected": rejected,
        "requests": requests,
        "tokens": backend.tokens_used,
        "wall_s": round(time.monotonic() - start, 3),
        "backend": cfg.backend,
        "model": backend.model_name,
    }
    with ctx.output() as out:
        with open(out / "prompts.jsonl", "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        (out / "stats.json").write_text(json.dumps(stats, indent=1))
    ctx.run.log_metrics(
        {
            "prompts.accepted": len(records),
            "prompts.heldout": n_heldout,
            "prompts.requests": requests,
            "prompts.rejected_duplicate": rejected["duplicate"],
            "prompts.rejected_too_long": rejected["too_long"],
        }
    )
    return stats


def read_prompts(path) -> list[dict]:
    """The records of a committed ``prompts.jsonl``."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
