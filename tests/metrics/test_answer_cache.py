"""The VQA/score answer cache: hits skip the model, keys, first-write-wins, concurrent writers, the store."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import REPO

from selma_core.metrics.answer_cache import (
    CACHE_FILE,
    AnswerCache,
    CachedValue,
    CacheKey,
    NotAResult,
    StoreBackedAnswerCache,
    cached,
    image_sha256,
)
from selma_core.storage.local import LocalArtifactStore

IMAGES = [b"\x89PNG fake image %d" % i for i in range(3)]
QUESTIONS = ["is there a cat?", "how many dogs?"]


class FakeVqa:
    """A fake VQA model (no model at all): a deterministic answer per (image, question), and a record
    of every batch it was asked."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[bytes, str]]] = []

    def __call__(self, images: list[bytes], questions: list[str]) -> list[str]:
        self.calls.append(list(zip(images, questions, strict=True)))
        return [self.answer(image, question) for image, question in zip(images, questions, strict=True)]

    @staticmethod
    def answer(image: bytes, question: str) -> str:
        return f"{image_sha256(image)[:6]}:{question}"


def grid() -> tuple[list[bytes], list[str]]:
    """Every image asked every question (as TIFA does)."""
    pairs = [(image, question) for image in IMAGES for question in QUESTIONS]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def test_a_second_evaluation_calls_no_model(tmp_path):
    images, questions = grid()
    fake = FakeVqa()
    with AnswerCache(tmp_path / "answers.sqlite") as cache:
        first = cached(fake, cache, "fake-vqa", "1")(images, questions)
        assert len(fake.calls) == 1 and len(fake.calls[0]) == 6
        assert cache.stats() == {"hits": 0, "misses": 6, "written": 6}
    fake_again = FakeVqa()
    with AnswerCache(tmp_path / "answers.sqlite") as cache:  # a new process would reopen the file
        second = cached(fake_again, cache, "fake-vqa", "1")(images, questions)
        assert cache.hits == 6 and cache.misses == 0
    assert fake_again.calls == []
    assert second == first == [FakeVqa.answer(i, q) for i, q in zip(images, questions, strict=True)]


def test_order_is_kept_with_mixed_hits_and_misses(tmp_path):
    fake = FakeVqa()
    with AnswerCache(tmp_path / "answers.sqlite") as cache:
        vqa = cached(fake, cache, "fake-vqa", "1")
        vqa([IMAGES[0], IMAGES[2]], [QUESTIONS[0], QUESTIONS[1]])  # two pairs cached
        fake.calls.clear()
        images = [IMAGES[1], IMAGES[0], IMAGES[1], IMAGES[2], IMAGES[0], IMAGES[1]]
        questions = [QUESTIONS[0], QUESTIONS[0], QUESTIONS[0], QUESTIONS[1], QUESTIONS[1], QUESTIONS[1]]
        answers = vqa(images, questions)
        assert answers == [FakeVqa.answer(i, q) for i, q in zip(images, questions, strict=True)]
        # One batch, each distinct missing pair once, in first-seen order.
        assert fake.calls == [
            [(IMAGES[1], QUESTIONS[0]), (IMAGES[0], QUESTIONS[1]), (IMAGES[1], QUESTIONS[1])]
        ]
        assert vqa([], []) == [] and len(fake.calls) == 1


def test_another_backend_version_or_template_is_a_miss(tmp_path):
    images, questions = grid()
    fake = FakeVqa()
    with AnswerCache(tmp_path / "answers.sqlite") as cache:
        cached(fake, cache, "fake-vqa", "1")(images, questions)
        cached(fake, cache, "fake-vqa", "2")(images, questions)
        cached(fake, cache, "other-vqa", "1")(images, questions)
        cached(fake, cache, "fake-vqa", "1", template="Question: {} Answer:")(images, questions)
        assert [len(c) for c in fake.calls] == [6, 6, 6, 6]
        assert len(cache) == 24
        cached(fake, cache, "fake-vqa", "2")(images, questions)
        assert len(fake.calls) == 4


def test_scores_are_cached_as_floats(tmp_path):
    calls = []

    def fake_clip_score(images: list[bytes], texts: list[str]) -> list[float]:
        calls.append(len(images))
        return [len(image) + len(text) / 100 for image, text in zip(images, texts, strict=True)]

    with AnswerCache(tmp_path / "answers.sqlite") as cache:
        score = cached(fake_clip_score, cache, "fake-clip", "1", field="score")
        first = score(IMAGES, ["a cat", "a dog", "a cow"])
        assert score(IMAGES, ["a cat", "a dog", "a cow"]) == first
        assert calls == [3] and all(isinstance(s, float) for s in first)
        # The same keys asked for an answer: a score-only row is a miss for the answer field.
        fake = FakeVqa()
        cached(fake, cache, "fake-clip", "1")(IMAGES[:1], ["a cat"])
        assert len(fake.calls) == 1
        key = CacheKey.for_image("fake-clip", "1", IMAGES[0], "a cat")
        assert cache.get_many([key])[key] == CachedValue(
            answer=FakeVqa.answer(IMAGES[0], "a cat"), score=first[0]
        )


def test_a_nan_score_names_the_position_of_its_input_and_nothing_is_cached(tmp_path):
    """NaN cannot be cached (SQLite keeps it as NULL): the error carries the position of the input
    it was computed for (not its place among the misses), so the eval can name the prompt."""
    with AnswerCache(tmp_path / "answers.sqlite") as cache:
        score = cached(lambda images, texts: [1.0] * len(images), cache, "fake-clip", "1", field="score")
        score(IMAGES[:1], ["a cat"])  # a hit next time: the misses are inputs 1 and 2
        broken = cached(lambda images, texts: [2.0, float("nan")], cache, "fake-clip", "1", field="score")
        with pytest.raises(NotAResult, match="the score for input 2 is NaN") as raised:
            broken(IMAGES, ["a cat", "a dog", "a cow"])
        assert raised.value.position == 2 and len(cache) == 1


def test_the_first_value_stored_wins(tmp_path):
    key = CacheKey("fake-vqa", "1", image_sha256(b"img"), "is it red?")
    with AnswerCache(tmp_path / "answers.sqlite") as cache:
        assert cache.put_many({key: CachedValue(answer="yes")}) == 1
        assert cache.put_many([(key, CachedValue(answer="no"))]) == 0
        assert cache.get_many([key]) == {key: CachedValue(answer="yes")}
        assert cache.put_many({key: CachedValue(answer="no", score=0.9)}) == 1  # fills the empty score
        assert cache.get_many([key]) == {key: CachedValue(answer="yes", score=0.9)}


def test_a_wrong_result_count_is_an_error_and_nothing_is_cached(tmp_path):
    with AnswerCache(tmp_path / "answers.sqlite") as cache:
        broken = cached(lambda images, questions: ["only one"], cache, "fake-vqa", "1")
        with pytest.raises(ValueError, match="returned 1 results for 2 inputs"):
            broken(IMAGES[:2], QUESTIONS)
        assert len(cache) == 0


WRITER = """
import pathlib, sys, time
from selma_core.metrics.answer_cache import AnswerCache, CacheKey, CachedValue
path, name, count, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), pathlib.Path(sys.argv[4])
order = range(count) if name.endswith("a") else reversed(range(count))  # meet in the middle
with AnswerCache(path) as cache:
    print("ready", flush=True)
    while not go.exists():  # start together, so the two really write at once
        time.sleep(0.005)
    for i in order:  # many small transactions, to interleave with the other writer
        keys = [CacheKey("fake-vqa", "1", "%064x" % (i * 4 + j), "q") for j in range(4)]
        cache.put_many({k: CachedValue(answer=name) for k in keys})
        cache.get_many(keys)
"""


def _check_consistent(path: Path, rows: int, writers: set[str]) -> None:
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT COUNT(*) FROM answers").fetchone() == (rows,)
        assert {a for (a,) in conn.execute("SELECT DISTINCT answer FROM answers")} <= writers


def test_concurrent_writer_processes_do_not_corrupt_the_cache(tmp_path):
    path, go = tmp_path / "answers.sqlite", tmp_path / "go"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), name, "400", str(go)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name in ("writer-a", "writer-b")
    ]
    for writer in writers:
        assert writer.stdout is not None and writer.stdout.readline() == b"ready\n"
    go.touch()
    for writer in writers:
        _, stderr = writer.communicate(timeout=60)
        assert writer.returncode == 0, stderr.decode()
    # The same 1600 keys from both writers (from opposite ends): each key stored once, first wins.
    _check_consistent(path, 1600, {"writer-a", "writer-b"})


def test_concurrent_writer_threads_do_not_corrupt_the_cache(tmp_path):
    path = tmp_path / "answers.sqlite"
    errors: list[BaseException] = []
    shared = AnswerCache(path)  # one object used by two threads, and two connections of their own

    def write(cache: AnswerCache, name: str) -> None:
        try:
            for i in range(100):
                keys = [CacheKey("fake-vqa", "1", "%064x" % (i * 3 + j), "q") for j in range(3)]
                cache.put_many({k: CachedValue(answer=name) for k in keys})
                assert set(cache.get_many(keys)) == set(keys)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(shared, f"shared-{n}")) for n in range(2)]
    own = [AnswerCache(path) for _ in range(2)]
    threads += [threading.Thread(target=write, args=(cache, f"own-{n}")) for n, cache in enumerate(own)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for cache in [shared, *own]:
        cache.close()
    assert errors == []
    _check_consistent(path, 300, {"shared-0", "shared-1", "own-0", "own-1"})


def test_merge_from_adds_missing_rows_and_keeps_existing_ones(tmp_path):
    kept = CacheKey("fake-vqa", "1", "a" * 64, "q")
    new = CacheKey("fake-vqa", "1", "b" * 64, "q")
    with AnswerCache(tmp_path / "other.sqlite") as other:
        other.put_many({kept: CachedValue(answer="other"), new: CachedValue(answer="other")})
    with AnswerCache(tmp_path / "mine.sqlite") as mine:
        mine.put_many({kept: CachedValue(answer="mine")})
        assert mine.merge_from(tmp_path / "other.sqlite") == 1
        assert mine.get_many([kept, new]) == {
            kept: CachedValue(answer="mine"),
            new: CachedValue(answer="other"),
        }


def test_store_round_trip(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    prefix = "cache/answers/fake-vqa"
    images, questions = grid()
    fake = FakeVqa()
    with StoreBackedAnswerCache(store, prefix, tmp_path / "job1") as cache:
        first = cached(fake, cache, "fake-vqa", "1")(images, questions)
    assert len(fake.calls) == 1
    assert store.is_committed(prefix)
    manifest = store.read_manifest(prefix)
    assert list(manifest["files"]) == [CACHE_FILE] and manifest["metadata"]["rows"] == 6
    assert not any((tmp_path / "job1").glob("answer-cache-*"))  # the working copy is removed

    # Another job, on another machine (scratch): everything is a hit, and nothing new is committed.
    fake_again = FakeVqa()
    with StoreBackedAnswerCache(store, prefix, tmp_path / "job2") as cache:
        assert cached(fake_again, cache, "fake-vqa", "1")(images, questions) == first
        assert cache.hits == 6
    assert fake_again.calls == []
    assert store.read_manifest(prefix)["attempt"] == manifest["attempt"]


def test_two_jobs_committing_keep_each_others_rows(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    prefix = "cache/answers/fake-vqa"
    job_a = StoreBackedAnswerCache(store, prefix, tmp_path / "a")
    job_b = StoreBackedAnswerCache(store, prefix, tmp_path / "b")
    cache_a, cache_b = job_a.open(), job_b.open()  # both start from the same (empty) store
    cached(FakeVqa(), cache_a, "fake-vqa", "1")(IMAGES, ["q"] * 3)
    cached(FakeVqa(), cache_b, "fake-vqa", "1")(IMAGES, ["other q"] * 3)
    job_a.close()
    job_b.close()  # merges a's commit before committing
    fake = FakeVqa()
    with StoreBackedAnswerCache(store, prefix, tmp_path / "c") as cache:
        cached(fake, cache, "fake-vqa", "1")(IMAGES * 2, ["q"] * 3 + ["other q"] * 3)
    assert fake.calls == []
    assert store.read_manifest(prefix)["metadata"]["rows"] == 6


def test_a_failed_block_still_commits_its_answers(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    job = StoreBackedAnswerCache(store, "cache/answers/fake-vqa", tmp_path / "job")
    with pytest.raises(RuntimeError, match="later step failed"), job as cache:
        cached(FakeVqa(), cache, "fake-vqa", "1")(IMAGES, ["q"] * 3)
        raise RuntimeError("later step failed")
    assert store.read_manifest("cache/answers/fake-vqa")["metadata"]["rows"] == 3


def test_a_cache_with_a_damaged_manifest_is_replaced_not_fatal(tmp_path):
    """A cache is an optimisation: a manifest cut short is ignored and replaced, not an eval failing
    with exit 2 for good."""
    store = LocalArtifactStore(tmp_path / "store")
    prefix = "cache/answers/fake-vqa"
    with StoreBackedAnswerCache(store, prefix, tmp_path / "job1") as cache:
        cached(FakeVqa(), cache, "fake-vqa", "1")(IMAGES, ["q"] * 3)
    manifest = tmp_path / "store" / prefix / "_manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    fake = FakeVqa()
    with StoreBackedAnswerCache(store, prefix, tmp_path / "job2") as cache:
        assert len(cache) == 0
        cached(fake, cache, "fake-vqa", "1")(IMAGES, ["other q"] * 3)
    assert len(fake.calls) == 1
    assert store.read_manifest(prefix)["metadata"]["rows"] == 3  # replaced whole


def test_an_unreadable_committed_cache_is_replaced_not_fatal(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / CACHE_FILE).write_bytes(b"not a database" * 100)
    store.commit_dir(junk, "cache/answers/fake-vqa")
    fake = FakeVqa()
    with StoreBackedAnswerCache(store, "cache/answers/fake-vqa", tmp_path / "job") as cache:
        assert len(cache) == 0
        cached(fake, cache, "fake-vqa", "1")(IMAGES, ["q"] * 3)
    assert len(fake.calls) == 1
    fetched = store.fetch_dir("cache/answers/fake-vqa", tmp_path / "check") / CACHE_FILE
    with sqlite3.connect(fetched) as conn:
        assert conn.execute("SELECT COUNT(*) FROM answers").fetchone() == (3,)
    assert json.loads(json.dumps(store.read_manifest("cache/answers/fake-vqa")["metadata"]))["schema"] == 1
