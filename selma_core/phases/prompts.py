"""Phase 1, prompts: an LLM writes a skill's training prompts by in-context learning (self-instruct).

Recipe, one skill per job:
1. Pool = the skill's seed prompts (kept, ``source: seed``). The held-out positions (a
   ``heldout_fraction`` of ``num_prompts``, among the generated ones) are drawn first, so held-out
   prompts are never trained on and never shown to the LLM as examples.
2. Requests go out in waves of ``concurrency``: each shows ``examples_per_request`` prompts sampled
   from the training pool and asks for ``prompts_per_request`` more that follow the skill's rules.
   ``backend``: ``openai`` (any OpenAI-compatible API), ``transformers`` (an in-process causal LM),
   or ``offline`` (the template generator, which is not an LLM).
3. Each reply is parsed (numbered or bulleted list, JSON array); a candidate is rejected, with its
   reason counted, when it is empty, not text, echoes the instructions, breaks the skill's
   ``checks`` (length, what it must test, what it must avoid), is within ``contamination``'s
   ROUGE-L of an evaluation benchmark prompt, or within ``rouge_threshold`` of an accepted prompt.
4. After every wave the accepted prompts are saved (``<key>/_partial/``): a job killed at any point
   and restarted continues where it was, losing and duplicating nothing. A wave that fails first
   saves what its requests before the first failed one brought back.
5. Stop at ``num_prompts`` (default: the skill's ``target_count``). ``InputError`` when
   ``max_requests`` pass without reaching it (the count reached and the rejection reasons), or when
   ``max_useless_requests`` replies in a row give nothing usable (quoting samples of them).
Output: ``prompts.jsonl`` (``{id, skill, text, source, request_id, model, split}``) and
``stats.json`` (accepted, rejected by reason, deduplication rate, contamination drops,
distinct-1/2, mean pairwise ROUGE-L, requests, tokens, wall time, prompts per second).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from selma_core.errors import InputError
from selma_core.faults import fault_point
from selma_core.prompting.openai_compat import OpenAIConfig
from selma_core.prompting.transformers_lm import TransformersConfig
from selma_core.skills import MAX_PROMPTS
from selma_core.typed_yaml import execution_only

# A record's fields, in the order prompts.jsonl writes them (whatever order a saved wave kept them in).
RECORD_FIELDS = ("id", "skill", "text", "source", "request_id", "model", "split")

# A line that is the model talking about the task, not a prompt: a lead-in ("Sure, here are 20 new
# prompts:", "Great question! Here is ..."), a refusal, or words about the request. Lead-ins count
# only at the start of a line (after at most a short interjection) and with their punctuation,
# other markers only as whole words: "there is a lamp", "a double exposure, ...", "sure-footed",
# "Of course the cat ..." and '"I can't wait" in icing' are prompts.
_ECHO = re.compile(
    r"^\s*(?:[\w' ]{1,30}[!,.]\s+)?"
    r"(?:here (?:is|are)\b|(?:sure|certainly|of course|absolutely)[!,.:]"
    r"|i (?:cannot|can't|can not|am unable)\b)"
    r"|\b(?:as an ai|new prompts|numbered list|rules every prompt|example prompts|prompts for)\b"
    # ... and its closing words: "I hope these prompts are useful!", "Let me know if ...".
    r"|^\s*(?:i hope\b|let me know\b|feel free\b|hope (?:this|these|that)\b|(?:each|all) of these\b)"
    r"|\bthese prompts\b",
    re.IGNORECASE,
)


@dataclass
class ContaminationConfig:
    """Evaluation benchmark files whose prompts must not leak into training."""

    # Paths (relative to the config file) to DSG-1k .csv, TIFA .json, GenEval .jsonl or .txt files.
    # (Their contents, not their paths, are part of the prompts' output key.)
    benchmarks: list[str] = field(default_factory=list, metadata={"affects_output": False})
    # A candidate whose ROUGE-L against any benchmark prompt exceeds this is dropped.
    rouge_threshold: float = 0.7

    def __post_init__(self) -> None:
        if not 0.0 < self.rouge_threshold <= 1.0:
            raise ValueError(f"rouge_threshold: expected a number in (0, 1], got {self.rouge_threshold}")


@dataclass
class PromptsConfig:
    # "offline" composes prompts from the skill's vocabulary (demos, tests); "openai" asks an LLM
    # API; "transformers" runs a causal LM in the job.
    backend: Literal["offline", "openai", "transformers"] = "offline"
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    transformers: TransformersConfig = field(default_factory=TransformersConfig)
    # Prompts per skill; None uses each skill's target_count.
    num_prompts: int | None = None
    # In-context examples per request (SELMA: 3) and new prompts asked for per request.
    examples_per_request: int = 3
    prompts_per_request: int = 20
    # Requests per wave; a wave's examples come from the pool as it was when the wave started.
    concurrency: int = 8
    # ROUGE-L F-measure above which a candidate is a near-duplicate (SELMA's code: 0.8; self-instruct: 0.7).
    rouge_threshold: float = 0.8
    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)
    heldout_fraction: float = 0.1
    max_requests: int = execution_only(1000)
    max_useless_requests: int = execution_only(10)
    seed: int = 0

    @property
    def needs_gpu(self) -> bool:
        """Whether the prompts job wants a GPU: an LLM in the job itself does, an API or a server
        elsewhere does not."""
        return self.backend == "transformers"

    def keyed(self) -> PromptsConfig:
        """This config as the output's key hashes it: the settings the prompts do not depend on
        put back to their defaults. The backends not in use (``openai.model`` while ``backend``
        is ``transformers``), the name of the variable the API key is read from, and the
        contamination threshold with no benchmark to compare against. Editing them redoes
        nothing, and the keys of configs that leave them as they are stay what they were."""
        defaults = PromptsConfig()
        unused = {b: getattr(defaults, b) for b in ("openai", "transformers") if b != self.backend}
        keyed = dataclasses.replace(self, **unused)
        keyed.openai = dataclasses.replace(keyed.openai, api_key_env=defaults.openai.api_key_env)
        if not self.contamination.benchmarks:
            keyed.contamination = defaults.contamination
        return keyed

    def __post_init__(self) -> None:
        if self.num_prompts is not None and self.num_prompts < 2:
            raise ValueError(
                f"num_prompts: expected >= 2 (one to train, one held out), got {self.num_prompts}"
            )
        if self.num_prompts is not None and self.num_prompts > MAX_PROMPTS:
            raise ValueError(f"num_prompts: expected at most {MAX_PROMPTS:,}, got {self.num_prompts:,}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction: expected a number in (0, 1), got {self.heldout_fraction}")
        for name in (
            "examples_per_request",
            "prompts_per_request",
            "concurrency",
            "max_requests",
            "max_useless_requests",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if not 0.0 < self.rouge_threshold <= 1.0:
            raise ValueError(f"rouge_threshold: expected a number in (0, 1], got {self.rouge_threshold}")


def make_backend(cfg: PromptsConfig, cache_dir: str = "", device: str = "cpu", allow_pickle: bool = False):
    if cfg.backend == "openai":
        from selma_core.prompting.openai_compat import OpenAICompatibleBackend

        return OpenAICompatibleBackend(cfg.openai)
    if cfg.backend == "transformers":
        from selma_core.prompting.transformers_lm import TransformersBackend

        return TransformersBackend(
            cfg.transformers, cache_dir, device, seed=cfg.seed, allow_pickle=allow_pickle
        )
    from selma_core.prompting.offline import OfflineTemplateGenerator

    return OfflineTemplateGenerator(seed=cfg.seed)


def backend_model_name(cfg: PromptsConfig) -> str:
    """The model the backend would report (``model_name``), from the config: without opening it."""
    if cfg.backend == "openai":
        return cfg.openai.model
    if cfg.backend == "transformers":
        return cfg.transformers.model
    from selma_core.prompting.offline import OfflineTemplateGenerator

    return OfflineTemplateGenerator.model_name


def rejection_reason(text: str, skill, examples: tuple[str, ...]) -> str | None:
    """Why a parsed line cannot be a prompt of ``skill`` (before any similarity check), or None."""
    if not text.strip():
        return "empty"
    letters = sum(c.isalpha() for c in text)
    if letters < 0.6 * len(text.replace(" ", "")) or any(
        s in text for s in ("http", "```", "{", "}", "<", ">")
    ):
        return "not_text"
    if text in examples or _ECHO.search(text):
        return "echo"
    return skill.checks.violation(text)


def seed_problems(skill, rouge_threshold: float) -> list[str]:
    """The seeds the prompts job would drop, each with why: what any candidate must pass (text, no
    echo, the skill's checks) and no seed a near-duplicate of an earlier one."""
    from selma_core.prompting.dedup import RougeDeduplicator

    dedup = RougeDeduplicator(rouge_threshold)
    problems = []
    for i, seed in enumerate(skill.seeds):
        reason = rejection_reason(seed.strip(), skill, ())
        if reason is None and not dedup.add(seed.strip()):
            reason = f"a near-duplicate of an earlier seed (ROUGE-L above {rouge_threshold})"
        if reason is not None:
            problems.append(f"seeds[{i}] {seed.strip()[:60]!r}: {reason}")
    return problems


@dataclass
class _LoopState:
    """Everything the loop has decided so far; saved after every wave, restored on a restart."""

    records: list[dict] = field(default_factory=list)
    requests: int = 0
    tokens: int = 0
    candidates: int = 0
    rejected: Counter = field(default_factory=Counter)
    useless: int = 0
    samples: list[str] = field(default_factory=list)
    # Seconds spent generating up to the last wave, over every run that contributed (a resumed
    # job's own time adds to it).
    wall_s: float = 0.0


def generate_prompts(ctx, skill_name: str) -> dict:
    """Write ``ctx.job.key``: the skill's prompts with their train/held-out split."""
    from tqdm import tqdm

    from selma_core.models.loading import resolve_device
    from selma_core.prompting.contamination import benchmark_index
    from selma_core.prompting.dedup import RougeDeduplicator
    from selma_core.prompting.request import PromptRequest, parse_prompt_list
    from selma_core.prompting.stats import distinct_n, mean_pairwise_rouge_l

    cfg: PromptsConfig = ctx.config.prompts
    skill = ctx.skills[skill_name]
    target = cfg.num_prompts or skill.target_count
    dedup = RougeDeduplicator(cfg.rouge_threshold)
    benchmarks = (
        benchmark_index(cfg.contamination.benchmarks, cfg.contamination.rouge_threshold)
        if cfg.contamination.benchmarks
        else None
    )
    state = _LoopState()
    heldout: set[int] = set()

    def consider(
        text: str, source: str, request_id: str | None, examples: tuple[str, ...], model
    ) -> str | None:
        """Accept ``text`` or count why not; why not (None when accepted)."""
        state.candidates += 1
        reason = rejection_reason(text, skill, examples)
        if reason is None and benchmarks is not None and benchmarks.is_near_duplicate(text):
            reason = "contamination"
        if reason is None and not dedup.add(text):
            reason = "duplicate"
        if reason is not None:
            state.rejected[reason.split(" ")[0]] += 1
            return reason
        position = len(state.records)
        state.records.append(
            {
                "id": f"{skill_name}-{position:05d}",
                "skill": skill_name,
                "text": text,
                "source": source,
                "request_id": request_id,
                "model": model,
                "split": "heldout" if position in heldout else "train",
            }
        )
        return None

    for i, seed_text in enumerate(skill.seeds):
        if len(state.records) < target:
            reason = consider(seed_text.strip(), "seed", None, (), None)
            if reason is not None:  # the controller refuses such a skill first (seed_problems)
                print(
                    f"prompts {skill_name}: dropped seeds[{i}] {seed_text.strip()[:60]!r}: {reason}",
                    file=sys.stderr,
                    flush=True,
                )
    n_seeds = len(state.records)
    # Held-out positions among the generated prompts (not our seeds), drawn before generation.
    n_heldout = min(max(1, round(cfg.heldout_fraction * target)), target - 1)
    first = n_seeds if target - n_seeds >= n_heldout else 0
    heldout.update(random.Random(f"{cfg.seed}:{skill_name}:split").sample(range(first, target), n_heldout))
    for position, record in enumerate(state.records):
        record["split"] = "heldout" if position in heldout else "train"

    partial = f"{ctx.job.key}/_partial"
    resumed = _resume(ctx.store, partial, state, dedup)
    if resumed:
        print(f"resuming: {len(state.records)} prompts from {resumed} saved waves", file=sys.stderr)

    backend = None
    if len(state.records) < target:
        backend = make_backend(
            cfg, ctx.config.cache_dir, resolve_device(ctx.config.device), ctx.config.allow_pickle_checkpoints
        )
    source = {"offline": "offline"}.get(cfg.backend, "llm")
    start, earlier_s = time.monotonic(), state.wall_s
    progress = tqdm(total=target, initial=len(state.records), desc=f"prompts {skill_name}", unit="prompt")

    def use_replies(requests: list, replies: list[str]) -> None:
        """Each reply's candidates considered, in request order; the useless-replies guard counted."""
        for request, reply in zip(requests, replies, strict=True):
            state.requests += 1
            before = len(state.records)
            for text in parse_prompt_list(reply):
                if len(state.records) >= target:
                    break
                consider(text, source, request.request_id, request.examples, backend.model_name)
            if not reply.strip():
                state.rejected["empty_reply"] += 1
            if len(state.records) > before or len(state.records) >= target:
                state.useless = 0
                continue
            state.useless += 1
            state.samples = (state.samples + [reply.strip()[:160]])[-3:]
            if state.useless >= cfg.max_useless_requests:
                raise InputError(
                    f"prompts for skill {skill_name!r}: {state.useless} requests in a row gave no new "
                    f"usable prompt (accepted {len(state.records)} of {target}; rejected: "
                    f"{dict(state.rejected)}); samples of what came back: {state.samples!r}"
                    f"{_cut_replies(backend, cfg)}"
                )

    def use_and_save(requests, replies, tokens_before: int) -> int:
        """``use_replies``, then the wave saved with its tokens and time; also when its replies end
        in the useless-replies stop: the prompts it did accept were paid for, and a rerun (with a
        higher max_useless_requests) does not ask again. Not after a stop (KeyboardInterrupt: a lost
        lease stops the job too, and then another process owns the saved waves). The number of
        records before it."""
        new_from = len(state.records)

        def save() -> None:
            state.tokens += backend.tokens_used - tokens_before
            state.wall_s = earlier_s + time.monotonic() - start
            _save_wave(ctx.store, partial, state, new_from)

        try:
            use_replies(requests, replies)
        except InputError:
            save()
            raise
        save()
        return new_from

    try:
        while len(state.records) < target:
            if state.requests >= cfg.max_requests:
                raise InputError(
                    f"prompts for skill {skill_name!r}: only {len(state.records)} of {target} prompts "
                    f"after {state.requests} requests (rejected: {dict(state.rejected)}); raise "
                    "prompts.max_requests, lower num_prompts, or raise rouge_threshold "
                    f"({cfg.rouge_threshold}){_cut_replies(backend, cfg)}"
                )
            wave = []
            pool = [r["text"] for r in state.records if r["split"] == "train"]
            for i in range(state.requests, min(state.requests + cfg.concurrency, cfg.max_requests)):
                rng = random.Random(f"{cfg.seed}:{skill_name}:{i}")
                examples = tuple(rng.sample(pool, min(cfg.examples_per_request, len(pool))))
                wave.append(PromptRequest(f"{skill_name}-{i:05d}", skill, examples, cfg.prompts_per_request))
            tokens_before = backend.tokens_used
            try:
                replies = backend.complete_batch(wave)
            except Exception as e:
                # The wave failed: the replies that came back before the first missing one are paid
                # for; keep them, so a rerun does not ask again. Not when the job was stopped
                # (KeyboardInterrupt): a lost lease stops it too, and then another process owns the
                # saved waves, so nothing more may be written.
                kept = list(getattr(e, "completed", None) or [])
                if kept:
                    new_from = use_and_save(wave[: len(kept)], kept, tokens_before)
                    print(
                        f"prompts {skill_name}: the wave failed; the first {len(kept)} of its {len(wave)} "
                        f"requests had replied: their {len(state.records) - new_from} prompt(s) are kept "
                        "for the rerun",
                        file=sys.stderr,
                        flush=True,
                    )
                raise
            new_from = use_and_save(wave, replies, tokens_before)
            progress.update(len(state.records) - new_from)
            fault_point("prompts.after_wave")
    finally:
        progress.close()

    elapsed = earlier_s + time.monotonic() - start  # a resumed job's: the saved waves' time too
    texts = [r["text"] for r in state.records]
    generated = len(state.records) - n_seeds
    stats = {
        "skill": skill_name,
        "accepted": len(state.records),
        "seeds": n_seeds,
        "train": len(state.records) - n_heldout,
        "heldout": n_heldout,
        "candidates": state.candidates,
        "rejected": dict(sorted(state.rejected.items())),
        "dedup_rate": state.rejected["duplicate"] / state.candidates if state.candidates else 0.0,
        "contamination_drops": state.rejected["contamination"],
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "mean_pairwise_rouge_l": mean_pairwise_rouge_l(texts, seed=cfg.seed),
        "requests": state.requests,
        "tokens": state.tokens,
        "wall_s": round(elapsed, 3),
        "prompts_per_s": generated / elapsed if elapsed > 0 else 0.0,
        "backend": cfg.backend,
        # (a rerun that replayed every wave opens no backend: the name comes from the config)
        "model": backend.model_name if backend else backend_model_name(cfg),
    }
    with ctx.output() as out:
        with open(out / "prompts.jsonl", "w", encoding="utf-8") as f:
            for record in state.records:
                ordered = {name: record[name] for name in RECORD_FIELDS}  # replayed or not
                f.write(json.dumps(ordered, ensure_ascii=False) + "\n")
        (out / "stats.json").write_text(json.dumps(stats, indent=1))
    ctx.store.delete_prefix(partial)  # the committed output supersedes the saved waves
    print(format_stats(stats), file=sys.stderr)
    ctx.run.log_metrics(
        {f"prompts.{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float)) and k != "skill"}
        | {f"prompts.rejected.{k}": float(v) for k, v in stats["rejected"].items()}
    )
    return stats


def _cut_replies(backend, cfg: PromptsConfig) -> str:
    """For a too-few-prompts error: how many replies the token limit ended, and what to change (a
    reply cut before its first whole line is an empty one)."""
    if not backend.replies_cut:
        return ""
    return (
        f"; {backend.replies_cut} replies of this run stopped at the token limit "
        f"({backend.token_limit}): raise it, or lower prompts.prompts_per_request ({cfg.prompts_per_request})"
    )


def _save_wave(store, partial: str, state: _LoopState, new_from: int) -> None:
    """One object per wave: the prompts it accepted and the counters after it."""
    wave = {
        "records": state.records[new_from:],
        "requests": state.requests,
        "tokens": state.tokens,
        "candidates": state.candidates,
        "rejected": dict(state.rejected),
        "useless": state.useless,
        "samples": state.samples,
        "wall_s": state.wall_s,
    }
    store.write_json(f"{partial}/wave-{state.requests:08d}.json", wave)


def _resume(store, partial: str, state: _LoopState, dedup) -> int:
    """Replay saved waves into ``state``; how many there were.

    Waves are written atomically, so a damaged one was damaged in the store: it and every later
    wave (their counters build on it) are dropped and regenerated. The good ones are rewritten as
    one wave, so no stale later wave is ever replayed; a crash in between only loses the resume
    state (the prompts are generated again), never mixes it."""
    keys = store.list_keys(partial)
    before = len(state.records)  # the seeds
    for done, key in enumerate(keys):
        try:
            wave = store.read_json(key)
            records = list(wave["records"])
            counters = (wave["requests"], wave["tokens"], wave["candidates"])
            rejected, useless, samples = Counter(wave["rejected"]), wave["useless"], wave["samples"]
            wall_s = float(wave.get("wall_s", 0.0))  # saved before waves said: not counted
            texts = [record["text"] for record in records]
        except (ValueError, KeyError, TypeError) as e:  # ValueError: not JSON / not UTF-8
            print(
                f"warning: {store.url(key)}: damaged resume state ({type(e).__name__}: {e}); it and "
                f"{len(keys) - done - 1} later wave(s) are dropped and generated again",
                file=sys.stderr,
            )
            store.delete_prefix(partial)
            if len(state.records) > before:
                _save_wave(store, partial, state, before)
            return done
        for text, record in zip(texts, records, strict=True):
            dedup.index.add(text)
            state.records.append(record)
        state.requests, state.tokens, state.candidates = counters
        state.rejected, state.useless, state.samples = rejected, useless, samples
        state.wall_s = wall_s
    return len(keys)


def format_stats(stats: dict) -> str:
    rejected = ", ".join(f"{k} {v}" for k, v in stats["rejected"].items()) or "none"
    return (
        f"prompts {stats['skill']}: {stats['accepted']} accepted ({stats['train']} train, "
        f"{stats['heldout']} held out) from {stats['candidates']} candidates in {stats['requests']} "
        f"requests; rejected: {rejected}\n"
        f"  dedup rate {stats['dedup_rate']:.3f}, contamination drops {stats['contamination_drops']}, "
        f"distinct-1 {stats['distinct_1']:.3f}, distinct-2 {stats['distinct_2']:.3f}, "
        f"mean pairwise ROUGE-L {stats['mean_pairwise_rouge_l']:.3f}\n"
        f"  {stats['tokens']} tokens, {stats['wall_s']:.1f} s, {stats['prompts_per_s']:.1f} prompts/s"
    )


def read_prompts(path) -> list[dict]:
    """The records of a committed ``prompts.jsonl``."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
