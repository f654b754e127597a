"""The prompts phase end to end: real config, skills, plan and local store; a recording tracker run."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prompting.fake_openai import FakeOpenAI, chat_reply
from rouge_score import rouge_scorer

from selma_core.config import load_config
from selma_core.context import JobContext
from selma_core.errors import InputError
from selma_core.phases.prompts import generate_prompts, read_prompts
from selma_core.plan import build_plan
from selma_core.skills import load_skills
from selma_core.storage import LocalArtifactStore
from selma_core.tracking.base import JobRun

FIELDS = {"id", "skill", "text", "source", "request_id", "model", "split"}
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(a: str, b: str) -> float:
    return SCORER.score(a, b)["rougeL"].fmeasure


class RecordingRun(JobRun):
    """A JobRun that records every call, in order."""

    def __init__(self, run_id: str = "run-test-0001") -> None:
        self.run_id = run_id
        self.params: list[dict[str, Any]] = []
        self.metrics: list[tuple[dict[str, float], int | None]] = []
        self.artifacts: list[tuple[Path, str | None]] = []
        self.dicts: list[tuple[dict[str, Any], str]] = []
        self.tags: list[dict[str, str]] = []
        self.adapters: list[tuple[Path, str, str, str, dict[str, str]]] = []

    def log_params(self, params):
        self.params.append(dict(params))

    def log_metrics(self, metrics, step=None):
        self.metrics.append((dict(metrics), step))

    def log_artifact(self, local_path, artifact_path=None):
        self.artifacts.append((Path(local_path), artifact_path))

    def log_dict(self, data, artifact_file):
        self.dicts.append((dict(data), artifact_file))

    def set_tags(self, tags):
        self.tags.append(dict(tags))

    def tag_model_version(self, name, version, tags):
        self.tags.append({"model": f"{name}/{version}", **tags})

    def register_lora_adapter(
        self, adapter_dir, base_model, model_name, alias, tags, base_model_revision=None
    ):
        self.adapters.append((Path(adapter_dir), base_model, model_name, alias, dict(tags)))
        return str(len(self.adapters))


def make_context(config_path: Path, skill: str, store_root: Path) -> JobContext:
    cfg = load_config(config_path)
    skills = load_skills(cfg.skills_dir, cfg.skills)
    plan = build_plan(cfg, skills)
    return JobContext(
        config=cfg,
        skills=skills,
        plan=plan,
        job=plan.job("prompts", skill),
        store=LocalArtifactStore(store_root),
        run=RecordingRun(),
    )


def committed_records(ctx: JobContext, tmp_path: Path) -> list[dict]:
    local = ctx.store.fetch_dir(ctx.job.key, tmp_path / "fetched")
    return read_prompts(local / "prompts.jsonl")


# -- the offline backend -----------------------------------------------------------------------


@pytest.mark.parametrize("skill, num_prompts", [("counting", 40), ("spatial", 30)])
def test_offline_end_to_end(tiny_config, tmp_path, skill, num_prompts):
    config = tiny_config(prompts={"num_prompts": num_prompts, "heldout_fraction": 0.25})
    ctx = make_context(config, skill, tmp_path / "store")
    assert not ctx.store.is_committed(ctx.job.key)

    stats = generate_prompts(ctx, skill)

    assert ctx.store.is_committed(ctx.job.key)
    manifest = ctx.store.read_manifest(ctx.job.key)
    assert set(manifest["files"]) == {"prompts.jsonl", "stats.json"}
    assert manifest["metadata"]["phase"] == "prompts"
    assert manifest["metadata"]["skill"] == skill
    assert manifest["metadata"]["mlflow_run_id"] == ctx.run.run_id

    records = committed_records(ctx, tmp_path)
    assert len(records) == num_prompts
    assert all(set(r) == FIELDS for r in records)
    assert [r["id"] for r in records] == [f"{skill}-{i:05d}" for i in range(num_prompts)]
    assert all(r["skill"] == skill for r in records)
    assert len({r["text"] for r in records}) == num_prompts

    # The seeds come first, unchanged, as "seed" with no request or model.
    seeds = ctx.skills[skill].seeds
    assert all(rouge_l(a, b) <= 0.8 for a, b in itertools.combinations(seeds, 2))
    seed_records = [r for r in records if r["source"] == "seed"]
    assert [r["text"] for r in seed_records] == seeds
    assert records[: len(seeds)] == seed_records
    assert all(r["request_id"] is None and r["model"] is None for r in seed_records)
    generated = records[len(seeds) :]
    assert generated and all(r["source"] == "offline" for r in generated)
    assert all(r["model"] == "offline-templates" for r in generated)
    assert all(r["request_id"].startswith(f"{skill}-") for r in generated)

    # Held-out share: round(0.25 * n), the rest train.
    heldout = [r for r in records if r["split"] == "heldout"]
    assert len(heldout) == round(0.25 * num_prompts)
    assert {r["split"] for r in records} == {"train", "heldout"}

    # No two accepted prompts are near-duplicates by rouge_score's own measure.
    threshold = ctx.config.prompts.rouge_threshold
    worst = max(rouge_l(a["text"], b["text"]) for a, b in itertools.combinations(records, 2))
    assert worst <= threshold

    # stats.json is what the phase returned, and it agrees with the records.
    stored = json.loads(ctx.store.read_output_file(ctx.job.key, "stats.json"))
    assert stored == stats
    assert stats["accepted"] == num_prompts
    assert stats["heldout"] == len(heldout)
    assert stats["train"] == num_prompts - len(heldout)
    assert stats["backend"] == "offline" and stats["model"] == "offline-templates"
    assert stats["tokens"] == 0
    used = {int(r["request_id"].rsplit("-", 1)[1]) for r in generated}
    # Requests go out in waves of `concurrency`; the last wave filled it.
    waves = -(-stats["requests"] // ctx.config.prompts.concurrency)
    assert stats["requests"] >= 1 and max(used) >= (waves - 1) * ctx.config.prompts.concurrency
    assert stats["rejected"].get("too_long", 0) == 0  # the offline vocabulary obeys the skill's checks
    assert stats["candidates"] == num_prompts + sum(stats["rejected"].values())
    assert 0 < stats["distinct_1"] <= 1 and 0 < stats["distinct_2"] <= 1
    assert 0 <= stats["mean_pairwise_rouge_l"] < threshold

    # Metrics were logged once, with the same numbers.
    [(logged, step)] = ctx.run.metrics
    assert step is None
    assert logged["prompts.accepted"] == num_prompts and logged["prompts.heldout"] == len(heldout)
    assert logged["prompts.requests"] == stats["requests"]
    assert logged.get("prompts.rejected.duplicate", 0) == stats["rejected"].get("duplicate", 0)
    assert logged["prompts.distinct_2"] == stats["distinct_2"]


def test_same_config_gives_the_same_prompts(tiny_config, tmp_path):
    config = tiny_config(prompts={"num_prompts": 25})
    first = make_context(config, "counting", tmp_path / "store-a")
    second = make_context(config, "counting", tmp_path / "store-b")
    assert first.job.key == second.job.key

    generate_prompts(first, "counting")
    generate_prompts(second, "counting")

    a = first.store.read_output_file(first.job.key, "prompts.jsonl")
    b = second.store.read_output_file(second.job.key, "prompts.jsonl")
    assert a == b
    assert len(a.decode().splitlines()) == 25


def test_another_seed_gives_other_prompts(tiny_config, tmp_path):
    a = make_context(tiny_config(prompts={"num_prompts": 25, "seed": 0}), "counting", tmp_path / "store-a")
    b = make_context(tiny_config(prompts={"num_prompts": 25, "seed": 1}), "counting", tmp_path / "store-b")
    assert a.job.key != b.job.key
    generate_prompts(a, "counting")
    generate_prompts(b, "counting")
    texts_a = [r["text"] for r in committed_records(a, tmp_path / "a")]
    texts_b = [r["text"] for r in committed_records(b, tmp_path / "b")]
    assert texts_a[:8] == texts_b[:8]  # the seeds
    assert texts_a != texts_b


def test_small_heldout_fraction_still_holds_out_one(tiny_config, tmp_path):
    ctx = make_context(
        tiny_config(prompts={"num_prompts": 12, "heldout_fraction": 0.01}), "counting", tmp_path / "store"
    )
    stats = generate_prompts(ctx, "counting")
    records = committed_records(ctx, tmp_path)
    assert [r["split"] for r in records].count("heldout") == 1
    assert stats["heldout"] == 1 and stats["train"] == 11


def test_fewer_prompts_than_seeds_keeps_the_first_seeds(tiny_config, tmp_path):
    ctx = make_context(tiny_config(prompts={"num_prompts": 3}), "counting", tmp_path / "store")
    stats = generate_prompts(ctx, "counting")
    records = committed_records(ctx, tmp_path)
    assert [r["text"] for r in records] == ctx.skills["counting"].seeds[:3]
    assert stats["requests"] == 0


# -- errors: nothing is committed --------------------------------------------------------------


def write_tiny_skill(skills_dir: Path) -> dict:
    skill = {
        "name": "tiny",
        "description": "A skill whose offline vocabulary can only say two things.",
        "seeds": ["a red bicycle leaning against a brick wall"],
        "target_count": 100,
        "offline": {"templates": ["{thing} on a table"], "slots": {"thing": ["cat", "dog"]}},
    }
    skills_dir.mkdir(parents=True, exist_ok=True)
    (skills_dir / "tiny.yaml").write_text(yaml.safe_dump(skill))
    return skill


def reachable(texts: list[str], threshold: float) -> int:
    """How many of ``texts`` a greedy ROUGE-L filter keeps (rouge_score computes every F)."""
    kept: list[str] = []
    for text in texts:
        if all(rouge_l(k, text) <= threshold for k in kept):
            kept.append(text)
    return len(kept)


@pytest.mark.parametrize(
    "limits, expected",
    [
        (
            {"max_useless_requests": 4},
            r"4 requests in a row gave no new usable prompt \(accepted {n} of 50;",
        ),
        (
            {"max_useless_requests": 100, "max_requests": 6},
            r"only {n} of 50 prompts after 6 requests",
        ),
    ],
    ids=["useless-requests", "max-requests"],
)
def test_vocabulary_that_cannot_reach_num_prompts(tiny_config, tmp_path, limits, expected):
    skill = write_tiny_skill(tmp_path / "skills")
    config = tiny_config(
        skills=["tiny"], skills_dir=str(tmp_path / "skills"), prompts={"num_prompts": 50, **limits}
    )
    ctx = make_context(config, "tiny", tmp_path / "store")
    candidates = [skill["seeds"][0], "cat on a table", "dog on a table"]
    n = reachable(candidates, ctx.config.prompts.rouge_threshold)
    assert n == reachable([candidates[0], *reversed(candidates[1:])], ctx.config.prompts.rouge_threshold)
    assert n == 3  # "cat on a table" vs "dog on a table": F = 0.75, under 0.8

    with pytest.raises(InputError, match=expected.format(n=n)) as info:
        generate_prompts(ctx, "tiny")
    assert "'tiny'" in str(info.value)
    assert not ctx.store.is_committed(ctx.job.key)
    # Only the saved waves stay (for a resume); nothing that looks like an output.
    assert all(k.startswith(f"{ctx.job.key}/_partial/") for k in ctx.store.list_keys(ctx.job.key))
    assert ctx.run.metrics == []


def llm_job_that_gets_nothing_usable(tiny_config, tmp_path, reply, prompts=None, openai=None):
    """A prompts job against an LLM that answers every request with ``reply``: (ctx, the job's
    InputError message, the fake server)."""
    with FakeOpenAI([reply]) as server:
        config = tiny_config(
            prompts={
                "backend": "openai",
                "num_prompts": 20,
                "max_useless_requests": 3,
                "concurrency": 1,
                **(prompts or {}),
                "openai": {
                    "base_url": server.base_url,
                    "model": "fake-llm",
                    "api_key_env": "",
                    "max_retries": 0,
                    **(openai or {}),
                },
            }
        )
        ctx = make_context(config, "counting", tmp_path / "store")
        with pytest.raises(InputError) as info:
            generate_prompts(ctx, "counting")
    return ctx, str(info.value), server


@pytest.mark.parametrize(
    "content, sample",
    [("", ""), ("   \n\n", ""), ("I'm sorry, " * 40, ("I'm sorry, " * 40).strip()[:160])],
    ids=["empty", "blank", "too-long"],
)
def test_llm_that_answers_nothing_usable(tiny_config, tmp_path, content, sample):
    reply = chat_reply(content, total_tokens=11)
    ctx, message, server = llm_job_that_gets_nothing_usable(tiny_config, tmp_path, reply)
    seeds = len(ctx.skills["counting"].seeds)
    assert f"3 requests in a row gave no new usable prompt (accepted {seeds} of 20;" in message
    assert f"samples of what came back: {[sample] * 3!r}" in message
    assert len(server.requests) == 3
    assert not ctx.store.is_committed(ctx.job.key)
    assert "token limit" not in message  # no reply was cut


def test_replies_the_token_limit_cut_say_so(tiny_config, tmp_path):
    """A reply max_tokens ended before its first whole line is empty: the error names the limit."""
    cut = chat_reply("1. three red apples on a wooden ta", total_tokens=11)
    cut.body["choices"][0]["finish_reason"] = "length"
    _, message, _ = llm_job_that_gets_nothing_usable(
        tiny_config, tmp_path, cut, prompts={"prompts_per_request": 25}, openai={"max_tokens": 12}
    )
    assert "3 requests in a row gave no new usable prompt" in message
    assert "'empty_reply': 3" in message
    assert message.endswith(
        "; 3 replies of this run stopped at the token limit (prompts.openai.max_tokens: 12): raise it, "
        "or lower prompts.prompts_per_request (25)"
    )


# -- the openai backend, against a local OpenAI-compatible server ------------------------------


def test_llm_backend_end_to_end(tiny_config, tmp_path):
    new = [
        "four blue kites above a windy beach",
        "two owls perched on a snowy branch",
        "five paper lanterns hanging over a night market",
        "three bicycles parked by a yellow door",
    ]
    reply = "\n".join(
        [
            "1. three red apples on a wooden kitchen table",  # a seed: a duplicate
            "2. " + " ".join(["word"] * 61),  # over max_words
            *[f"{i}. {text}" for i, text in enumerate(new, 3)],
            "7. one more that is never needed",
        ]
    )
    with FakeOpenAI([chat_reply(reply, total_tokens=123)]) as server:
        config = tiny_config(
            prompts={
                "backend": "openai",
                "num_prompts": 16,
                "examples_per_request": 3,
                "concurrency": 1,
                "openai": {
                    "base_url": server.base_url,
                    "model": "fake-llm",
                    "api_key_env": "",
                    "max_retries": 0,
                },
            }
        )
        ctx = make_context(config, "counting", tmp_path / "store")
        stats = generate_prompts(ctx, "counting")

    assert ctx.store.is_committed(ctx.job.key)
    records = committed_records(ctx, tmp_path)
    seeds = ctx.skills["counting"].seeds
    assert len(seeds) == 12 and "three red apples on a wooden kitchen table" in seeds
    assert [r["text"] for r in records] == seeds + new
    assert all(r["source"] == "llm" and r["model"] == "fake-llm" for r in records[12:])
    assert {r["request_id"] for r in records[12:]} == {"counting-00000"}
    assert stats["requests"] == 1 and stats["tokens"] == 123 and stats["model"] == "fake-llm"
    assert stats["rejected"] == {"duplicate": 1, "too_long": 1}

    [received] = server.requests
    assert received.path == "/v1/chat/completions"
    assert received.body["model"] == "fake-llm"
    user = received.body["messages"][1]["content"]
    assert f"Write {ctx.config.prompts.prompts_per_request} new prompts" in user
    shown = [line.split(". ", 1)[1] for line in user.splitlines() if line[:2] in ("1.", "2.", "3.")]
    assert len(shown) == 3 and set(shown) <= set(seeds)


def test_heldout_prompts_are_never_shown_as_examples(tiny_config, tmp_path, monkeypatch):
    from selma_core.prompting.offline import OfflineTemplateGenerator

    shown: set[str] = set()
    complete = OfflineTemplateGenerator.complete

    def spy(self, request):
        shown.update(request.examples)
        return complete(self, request)

    monkeypatch.setattr(OfflineTemplateGenerator, "complete", spy)
    ctx = make_context(
        tiny_config(prompts={"num_prompts": 60, "heldout_fraction": 0.2, "prompts_per_request": 4}),
        "counting",
        tmp_path / "store",
    )
    generate_prompts(ctx, "counting")
    records = committed_records(ctx, tmp_path)
    heldout = {r["text"] for r in records if r["split"] == "heldout"}
    assert len(heldout) == 12
    assert all(r["source"] != "seed" for r in records if r["split"] == "heldout")
    assert shown and not shown & heldout


def test_a_killed_job_resumes_without_losing_or_duplicating(tiny_config, tmp_path, monkeypatch):
    """Killed after two waves were saved, the rerun replays them and ends exactly as an unbroken run."""
    from selma_core.prompting.offline import OfflineTemplateGenerator

    overrides = {"num_prompts": 60, "prompts_per_request": 3, "concurrency": 2}
    unbroken = make_context(tiny_config(prompts=overrides), "spatial", tmp_path / "unbroken")
    generate_prompts(unbroken, "spatial")

    calls = []
    complete_batch = OfflineTemplateGenerator.complete_batch

    def dies_on_third_wave(self, requests):
        calls.append([r.request_id for r in requests])
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        time.sleep(0.5)  # a slow endpoint: the time the rerun's stats count too
        return complete_batch(self, requests)

    monkeypatch.setattr(OfflineTemplateGenerator, "complete_batch", dies_on_third_wave)
    broken = make_context(tiny_config(prompts=overrides), "spatial", tmp_path / "broken")
    with pytest.raises(KeyboardInterrupt):
        generate_prompts(broken, "spatial")
    assert not broken.store.is_committed(broken.job.key)
    assert len(broken.store.list_keys(f"{broken.job.key}/_partial")) == 2

    calls.clear()
    monkeypatch.setattr(
        OfflineTemplateGenerator,
        "complete_batch",
        lambda self, r: (calls.append(r), complete_batch(self, r))[1],
    )
    stats = generate_prompts(broken, "spatial")
    assert [r.request_id for r in calls[0]] == ["spatial-00004", "spatial-00005"]  # waves 1-2 not redone
    assert committed_records(broken, tmp_path / "a") == committed_records(unbroken, tmp_path / "b")
    assert (
        stats["requests"]
        == json.loads(unbroken.store.read_output_file(unbroken.job.key, "stats.json"))["requests"]
    )
    assert broken.store.list_keys(f"{broken.job.key}/_partial") == []  # cleaned up after the commit
    # The time and rate are the job's, over both runs: the replayed waves took 1 s of the first.
    assert stats["wall_s"] >= 1.0 and stats["prompts_per_s"] <= (60 - stats["seeds"]) / 1.0
    # byte for byte: replayed records (saved with sorted keys) are written in the one field order
    read = lambda ctx, rel: ctx.store.read_output_file(ctx.job.key, rel)  # noqa: E731
    assert read(broken, "prompts.jsonl") == read(unbroken, "prompts.jsonl")


def test_a_job_killed_after_its_last_wave_resumes_to_the_same_output(tiny_config, tmp_path, monkeypatch):
    """Every wave saved, the commit not made: the rerun opens no backend, yet commits the same
    prompts.jsonl, byte for byte, and stats.json names the model (from the config)."""
    import selma_core.phases.prompts as prompts_phase
    from selma_core.prompting.offline import OfflineTemplateGenerator

    overrides = {"num_prompts": 24, "prompts_per_request": 3, "concurrency": 2}
    unbroken = make_context(tiny_config(prompts=overrides), "spatial", tmp_path / "unbroken")
    generate_prompts(unbroken, "spatial")
    waves = json.loads(unbroken.store.read_output_file(unbroken.job.key, "stats.json"))["requests"] // 2

    reached = []

    def fault_point(name):
        reached.append(name)
        if len(reached) == waves:
            raise KeyboardInterrupt("killed after the last wave, before the commit")

    broken = make_context(tiny_config(prompts=overrides), "spatial", tmp_path / "broken")
    with monkeypatch.context() as patch:
        patch.setattr(prompts_phase, "fault_point", fault_point)
        with pytest.raises(KeyboardInterrupt):
            generate_prompts(broken, "spatial")
    assert not broken.store.is_committed(broken.job.key)
    with monkeypatch.context() as patch:
        patch.setattr(OfflineTemplateGenerator, "__init__", lambda *a, **k: pytest.fail("a backend opened"))
        stats = generate_prompts(broken, "spatial")
    read = lambda ctx, rel: ctx.store.read_output_file(ctx.job.key, rel)  # noqa: E731
    assert read(broken, "prompts.jsonl") == read(unbroken, "prompts.jsonl")
    assert stats["model"] == json.loads(read(unbroken, "stats.json"))["model"] == "offline-templates"


def test_a_wave_sends_concurrent_requests_and_keeps_their_order(tiny_config, tmp_path):
    """With concurrency 4, four requests are in flight together; replies are used in request order."""
    import threading

    in_flight, peak = [0], [0]
    lock = threading.Lock()

    class Slow(FakeOpenAI):
        def _next(self):
            with lock:
                in_flight[0] += 1
                peak[0] = max(peak[0], in_flight[0])
            import time

            time.sleep(0.3)
            with lock:
                in_flight[0] -= 1
            return super()._next()

    texts = [
        "two paper lanterns hanging over a quiet harbor",
        "three goats standing on a mossy stone wall",
        "four red umbrellas leaning against a cafe window",
        "five sailboats drifting past a white lighthouse",
    ]
    replies = [chat_reply(f"1. {text}") for text in texts]
    with Slow(replies) as server:
        config = tiny_config(
            prompts={
                "backend": "openai",
                "num_prompts": 16,
                "concurrency": 4,
                "openai": {
                    "base_url": server.base_url,
                    "model": "fake-llm",
                    "api_key_env": "",
                    "max_retries": 0,
                },
            }
        )
        ctx = make_context(config, "counting", tmp_path / "store")
        stats = generate_prompts(ctx, "counting")
    assert peak[0] == 4 and stats["requests"] == 4
    generated = [r for r in committed_records(ctx, tmp_path) if r["source"] == "llm"]
    assert [r["request_id"] for r in generated] == [f"counting-0000{i}" for i in range(4)]


def test_a_failed_wave_keeps_the_replies_before_the_failure_and_the_rerun_does_not_ask_again(
    tiny_config, tmp_path, monkeypatch, capsys
):
    """Requests 0 and 1 of a wave of 4 replied; request 2 failed for good (an outage past its
    retries) while 3 was in flight. The job fails (exit 1: retryable), but 0's and 1's prompts are
    saved, and the rerun asks from request 2 on."""
    import time

    from selma_core.errors import EndpointError
    from selma_core.prompting.openai_compat import OpenAICompatibleBackend

    texts = iter(
        [
            "two paper lanterns hanging over a quiet harbor",
            "three goats standing on a mossy stone wall",
            "four red umbrellas leaning against a cafe window",
            "five sailboats drifting past a white lighthouse",
            "six bicycles parked beside a yellow door",
            "two owls perched along a snowy branch",
        ]
    )

    class Fresh(FakeOpenAI):
        def _reply_to(self, body):
            with self._lock:
                return chat_reply(f"1. {next(texts)}")

    real = OpenAICompatibleBackend.complete

    def complete(self, request):
        if request.request_id.endswith("-00002"):
            time.sleep(0.3)  # after 0 and 1 replied
            raise EndpointError("LLM endpoint: HTTP 503 after 4 attempts")
        if request.request_id.endswith("-00003"):
            self._stop.wait(5)  # in flight until the wave is abandoned
        return real(self, request)

    with Fresh() as server:
        openai = {"base_url": server.base_url, "model": "fake-llm", "api_key_env": "", "max_retries": 0}
        config = tiny_config(
            prompts={"backend": "openai", "num_prompts": 16, "concurrency": 4, "openai": openai}
        )
        ctx = make_context(config, "counting", tmp_path / "store")
        with monkeypatch.context() as patch:
            patch.setattr(OpenAICompatibleBackend, "complete", complete)
            with pytest.raises(EndpointError, match="503"):
                generate_prompts(ctx, "counting")
        assert (
            "the first 2 of its 4 requests had replied: their 2 prompt(s) are kept" in capsys.readouterr().err
        )
        [saved] = ctx.store.list_keys(f"{ctx.job.key}/_partial")
        wave = ctx.store.read_json(saved)
        assert wave["requests"] == 2
        assert [r["request_id"] for r in wave["records"]] == ["counting-00000", "counting-00001"]
        asked = len(server.requests)
        assert asked == 2

        stats = generate_prompts(ctx, "counting")
        asked_again = [r.body["messages"][1]["content"] for r in server.requests[asked:]]
    generated = [r for r in committed_records(ctx, tmp_path) if r["source"] == "llm"]
    assert [r["request_id"] for r in generated] == [f"counting-0000{i}" for i in range(4)]
    assert [r["text"] for r in generated[:2]] == [r["text"] for r in wave["records"]]
    # The rerun's wave is requests 2 to 5 (two prompts were missing); 0 and 1 were not asked again.
    assert len(asked_again) == 4 and stats["requests"] == 2 + 4


def test_a_wave_that_ends_in_the_useless_replies_stop_keeps_what_it_accepted(tiny_config, tmp_path):
    """A wave of 4 replies, every one the same prompt: the first is accepted, the next three are
    duplicates, and the third useless reply stops the job (exit 2). The accepted prompt was paid
    for: it is saved, so a rerun with a higher max_useless_requests does not ask for it again."""
    reply = chat_reply("1. five sailboats drifting past a white lighthouse")
    ctx, message, server = llm_job_that_gets_nothing_usable(
        tiny_config, tmp_path, reply, prompts={"concurrency": 4}
    )
    seeds = len(ctx.skills["counting"].seeds)
    assert f"3 requests in a row gave no new usable prompt (accepted {seeds + 1} of 20;" in message
    [saved] = ctx.store.list_keys(f"{ctx.job.key}/_partial")
    wave = ctx.store.read_json(saved)
    assert [r["text"] for r in wave["records"]] == ["five sailboats drifting past a white lighthouse"]
    assert wave["requests"] == 4 and len(server.requests) == 4


def test_a_stopped_wave_saves_nothing(tiny_config, tmp_path, monkeypatch):
    """Stopped (SIGTERM, Ctrl-C, or a lost lease: then another process owns the saved waves), the
    job writes nothing more, though replies had come back."""
    from selma_core.prompting.offline import OfflineTemplateGenerator

    def stopped(self, requests):
        interrupt = KeyboardInterrupt("lease lost")
        interrupt.completed = ["1. two paper lanterns hanging over a quiet harbor"]
        raise interrupt

    monkeypatch.setattr(OfflineTemplateGenerator, "complete_batch", stopped)
    ctx = make_context(
        tiny_config(prompts={"num_prompts": 16, "concurrency": 2}), "counting", tmp_path / "store"
    )
    with pytest.raises(KeyboardInterrupt):
        generate_prompts(ctx, "counting")
    assert ctx.store.list_keys(f"{ctx.job.key}/_partial") == []


def test_an_in_process_lm_writing_garbage_is_rejected_with_samples(tiny_config, tmp_path, model_cache):
    """random:tiny-lm writes noise: the plumbing runs, nothing passes the rules, the error quotes it."""
    config = tiny_config(
        prompts={
            "backend": "transformers",
            "num_prompts": 20,
            "concurrency": 2,
            "max_useless_requests": 2,
            "transformers": {"model": "random:tiny-lm", "max_new_tokens": 32, "batch_size": 2},
        }
    )
    ctx = make_context(config, "counting", tmp_path / "store")
    with pytest.raises(InputError, match="2 requests in a row gave no new usable prompt") as info:
        generate_prompts(ctx, "counting")
    message = str(info.value)
    assert "samples of what came back" in message and "rejected: {" in message
    assert not ctx.store.is_committed(ctx.job.key)


def test_a_damaged_saved_wave_is_dropped_with_the_later_ones_and_generated_again(
    tiny_config, tmp_path, capsys
):
    """A wave damaged in the store (never by a crash: waves are written atomically) is not trusted:
    the waves before it are kept, it and the later ones are generated again, and the result is a
    complete, duplicate-free prompt set."""
    from selma_core.prompting.offline import OfflineTemplateGenerator

    overrides = {"num_prompts": 40, "prompts_per_request": 3, "concurrency": 1}
    ctx = make_context(tiny_config(prompts=overrides), "spatial", tmp_path / "store")
    calls = []
    complete_batch = OfflineTemplateGenerator.complete_batch

    def dies_on_fourth_wave(self, requests):
        calls.append(requests)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return complete_batch(self, requests)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(OfflineTemplateGenerator, "complete_batch", dies_on_fourth_wave)
        with pytest.raises(KeyboardInterrupt):
            generate_prompts(ctx, "spatial")
    waves = ctx.store.list_keys(f"{ctx.job.key}/_partial")
    assert len(waves) == 3
    first = ctx.store.read_json(waves[0])
    ctx.store.write_bytes(waves[1], b'{"records": [{"te')  # damaged in the store

    resumed = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            OfflineTemplateGenerator,
            "complete_batch",
            lambda self, r: (resumed.append([q.request_id for q in r]), complete_batch(self, r))[1],
        )
        stats = generate_prompts(ctx, "spatial")
    err = capsys.readouterr().err
    assert "damaged resume state" in err and ctx.store.url(waves[1]) in err
    # the first wave is kept (its requests are not sent again); the damaged one on is regenerated
    assert resumed[0] == [f"spatial-{first['requests']:05d}"]
    texts = [r["text"] for r in committed_records(ctx, tmp_path / "fetch")]
    assert len(texts) == 40 == stats["accepted"] and len(set(texts)) == 40
    assert all(r["text"] in texts for r in first["records"])


# -- what counts as the model talking, not a prompt -------------------------------------------------

SKILLS_DIR = Path(__file__).resolve().parents[2] / "skills"


@pytest.mark.parametrize("path", sorted(SKILLS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_seed_prompt_is_a_prompt(path):
    """long_description asks for "there is"/"there are": neither is the lead-in "here is"."""
    from selma_core.phases.prompts import rejection_reason
    from selma_core.skills import load_skill

    skill = load_skill(SKILLS_DIR, path.stem)
    assert {seed: rejection_reason(seed.strip(), skill, ()) for seed in skill.seeds} == dict.fromkeys(
        skill.seeds
    )


@pytest.mark.parametrize(
    "line, echo",
    [
        ("Sure, here are 20 new prompts:", True),
        ("Here are the prompts for the counting skill", True),
        ("Certainly! Below is a numbered list", True),
        ("I cannot help with that request.", True),
        ("As an AI language model, I will write them", True),
        ("A cat on a sofa, and there is a lamp on the left", False),
        ("A double exposure, a forest inside a woman's silhouette", False),
        ("A toy shaped as an airplane on a wooden desk", False),
        ('A street sign that reads "I cannot stop"', False),
        ("Absolutely! Here are some fresh ideas.", True),
        ("Great question! Here is a set of twenty scenes", True),
        ('"I can\'t wait" written in icing on a birthday cake', False),
        ("A sure-footed goat on a cliff above the sea", False),
        ("Of course the cat sleeps on the warm laptop", False),
        # Closing words after a list (instruct models write them routinely).
        ("I hope these prompts are useful for training your model!", True),
        ("Let me know if you would like me to generate more variations.", True),
        ("Feel free to adjust the settings.", True),
        ("These prompts cover a wide range of daily activities and settings.", True),
        ("Each of these describes a simple everyday scene.", True),
        ("A child who let me know the way, drawn in crayon", False),
        ('A card that says "I hope you feel better" on a bedside table', False),
    ],
)
def test_lead_ins_and_refusals_are_echo_and_prompts_that_contain_the_words_are_not(line, echo):
    from selma_core.phases.prompts import rejection_reason
    from selma_core.skills import load_skill

    skill = load_skill(SKILLS_DIR, "everyday")
    assert (rejection_reason(line, skill, ()) == "echo") is echo
