"""Kill anywhere: a job killed with SIGKILL at any fault point (``selma_core.faults``) and run again
completes, redoes no committed unit of work, and commits what an uninterrupted run commits.

How: one uninterrupted reference run of a one-skill tiny pipeline (3 prompt waves, 3 image shards,
4 training steps, 3 evaluated variants), the store copied before each phase. Each case starts from
the copy taken before its phase (upstream outputs as the reference committed them), runs the phase's
job with ``SELMA_FAULT`` set and checks it died by SIGKILL at that point leaving nothing committed,
reruns the job without the fault, and compares every committed output with the reference's.
Outputs are content-addressed by config, so a downstream job of a rerun reads exactly the bytes it
read in the reference run (the loose files below are read by no downstream phase, but
``merge.json``), and its output is the reference's: the last phase's cases compare the whole final
store.

Jobs run as ``python -m jobs.run`` in processes forked by the local executor's fork server
(``jobs.executors.fork_server``), which imported torch, diffusers and MLflow once (a fresh process
spends ~13 s importing on 2 cores; the 38 jobs here would not fit the CI budget). Each job is a
process of its own, killed as a pod would be; nothing computed is shared (the server imports modules
and computes nothing before it forks).

Bit-identical on CPU (sha256 of the committed file equals the reference's): prompts.jsonl, the
image shards, shards.json and images.jsonl, loss.json, the evaluation images, results.md, report.html,
figures.
Compared loosely (``LOOSE``), with why:
- ``*.safetensors`` (expert, kohya, merged): every tensor bit-identical and the metadata equal; the
  bytes may differ because safetensors writes its header's metadata map in a per-process random
  order (a Rust HashMap), in uninterrupted runs too.
- prompts ``stats.json``, ``expert.json``, eval ``results.json``: equal but for wall-clock times and
  (eval) how many images came from the cache, which is exactly what a resumed run changes.
- ``merge.json``: equal but for ``registered.version``: a kill after the MLflow registration and
  before the commit leaves that version behind, and the rerun registers the next one.
- ``answers.sqlite`` (the evaluation answer cache): the same rows but for their ``created_at``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, write_config
from job_helpers import ForkedJobs

from selma_core.config import StorageConfig
from selma_core.storage import LocalArtifactStore
from selma_core.storage.base import MANIFEST

pytestmark = pytest.mark.slow

SKILL = "counting"  # 12 seeds
PHASES = [
    ("prompts", SKILL),
    ("images", SKILL),
    ("train", SKILL),
    ("merge-search-candidate", None),  # merge-search's one candidate job (--shard-index 0)
    ("merge-search", None),  # the job that picks the best candidate
    ("merge", None),
    ("eval", None),
]
# jobs.run's flags for a phase of PHASES (the candidate is merge-search's shard 0).
PHASE_ARGV = {"merge-search-candidate": ["--phase", "merge-search", "--shard-index", "0"]}
OVERRIDES = {
    "skills": [SKILL],
    # 12 seeds + 3 waves of one request for 2 prompts; 4 of the 18 held out -> 14 training prompts.
    "prompts": {"num_prompts": 18, "prompts_per_request": 2, "concurrency": 1},
    "images": {"batch_size": 4, "shard_size": 6},  # 14 images in 3 shards (6, 6, 2), 5 batches
    "train": {"steps": 4, "log_every": 1, "checkpoint_every": 1},  # checkpoints after steps 1, 2, 3
    # One skill: SELMA's weight 1.0 is the only candidate; the merge takes the weight it picks.
    "merge_search": {"enabled": True, "grid_points": 2},
    # 4 held-out prompts x 3 variants (base, expert:counting, merged) = 12 images.
    "eval": {"bootstrap_resamples": 100, "report_samples_per_skill": 1},
}
JOB_TIMEOUT_S = 300


@dataclass
class Job:
    returncode: int
    stdout: str
    stderr: str

    @property
    def result(self) -> dict:
        lines = [line for line in self.stdout.splitlines() if line.startswith("{")]
        assert lines, f"no result line; stderr:\n{self.stderr[-3000:]}"
        return json.loads(lines[-1])


class Zygote(ForkedJobs):
    """Runs each job in a process forked by the fork server, one at a time, its log read back."""

    def __init__(self, logs: Path) -> None:
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        env = {
            **{name: value for name, value in os.environ.items() if name != "SELMA_FAULT"},
            # One thread per job: 2 shared cores, and the same reductions in every run.
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONPATH": pythonpath,
        }
        super().__init__(env, logs)

    def run_phase(self, config: Path, phase: str, skill: str | None, fault: str | None = None) -> Job:
        flags = PHASE_ARGV.get(phase, ["--phase", phase])
        argv = ["-m", "jobs.run", *flags, "--config", str(config), *(["--skill", skill] if skill else [])]
        env = {**self.env, **({"SELMA_FAULT": fault} if fault else {})}
        code, text = self.run(argv, phase, env, JOB_TIMEOUT_S)
        return Job(code, text, text)  # stdout and stderr, one log as the local executor keeps it


@dataclass
class Reference:
    work: Path  # every case runs here: the same paths (config, store, MLflow) as the reference
    config: Path
    snapshots: list[Path]  # snapshots[i]: the work folder before phase i; [-1]: after the last
    keys: dict[str, str]  # phase -> its output key
    jobs: dict[str, Job]  # phase -> the reference job
    zygote: Zygote

    def reset(self, phase: str) -> LocalArtifactStore:
        shutil.rmtree(self.work)
        shutil.copytree(self.snapshots[phase_index(phase)], self.work)
        return LocalArtifactStore(self.work / "store")

    def run(self, phase: str, fault: str | None = None) -> Job:
        return self.zygote.run_phase(self.config, phase, dict(PHASES)[phase], fault)


def phase_index(phase: str) -> int:
    return [p for p, _ in PHASES].index(phase)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_cache):
    base = tmp_path_factory.mktemp("kill-anywhere")
    work = base / "work"
    work.mkdir()
    config = write_config(work, model_cache, **OVERRIDES)
    (base / "logs").mkdir()
    zygote = Zygote(base / "logs")
    snapshots, keys, jobs = [], {}, {}
    try:
        # A job killed at its start creates the MLflow database: no case pays for creating it.
        assert zygote.run_phase(config, "prompts", SKILL, "job.start").returncode == -9
        for i, (phase, skill) in enumerate(PHASES):
            snapshots.append(shutil.copytree(work, base / f"before-{i}-{phase}"))
            job = zygote.run_phase(config, phase, skill)
            assert job.returncode == 0, job.stderr[-5000:]
            jobs[phase] = job
            keys[phase] = job.result["output"].split("/store/", 1)[1]
        snapshots.append(shutil.copytree(work, base / "final"))
        yield Reference(work, config, snapshots, keys, jobs, zygote)
    finally:
        zygote.close()


# -- comparing committed outputs ----------------------------------------------------------------


def committed(store_root: Path) -> dict[str, dict]:
    """key -> manifest, for every committed output under a store folder."""
    return {
        m.parent.relative_to(store_root).as_posix(): json.loads(m.read_text())
        for m in store_root.rglob(MANIFEST)
    }


def _safetensors(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _json_without(*fields: str):
    def normalize(path: Path):
        data = json.loads(path.read_text())
        for name in fields:
            parent, _, leaf = name.rpartition(".")
            ((data.get(parent) or {}) if parent else data).pop(leaf, None)
        return data

    return normalize


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _answers(path: Path):
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT backend, version, image_sha256, text, template, answer, score FROM answers")
        return sorted(rows.fetchall(), key=repr)


# Files compared by content rather than by bytes (see the module docstring for why).
LOOSE = {
    "stats.json": _json_without("wall_s", "prompts_per_s"),
    "expert.json": _json_without("wall_s", "images_per_s"),
    "merge.json": _json_without("registered.version"),
    "results.json": _json_without("wall_s", "cache"),
    "answers.sqlite": _answers,
}
# How to compare the content of a file expected bit-identical that is not (telling a gap apart).
CONTENT = {"prompts.jsonl": _records}


def _equal_content(a: Path, b: Path, rel: str) -> bool:
    if rel.endswith(".safetensors"):
        (meta_a, tensors_a), (meta_b, tensors_b) = _safetensors(a), _safetensors(b)
        return (
            meta_a == meta_b
            and tensors_a.keys() == tensors_b.keys()
            and all(
                tensors_a[k].dtype == tensors_b[k].dtype and tensors_a[k].equal(tensors_b[k])
                for k in tensors_a
            )
        )
    compare = {**LOOSE, **CONTENT}.get(Path(rel).name)
    return compare is not None and compare(a) == compare(b)


def compare_outputs(store_root: Path, reference_root: Path) -> dict[str, str]:
    """How the committed outputs differ from the reference's: {} when every file is equal, bit for
    bit or (``LOOSE`` files) in content; else file -> "bytes" (expected bit-identical, the same
    content) or "content"."""
    ours, theirs = committed(store_root), committed(reference_root)
    assert sorted(ours) == sorted(theirs)
    problems = {}
    for key, manifest in ours.items():
        files, reference_files = manifest["files"], theirs[key]["files"]
        assert sorted(files) == sorted(reference_files), key
        for rel, info in files.items():
            if info["sha256"] == reference_files[rel]["sha256"]:
                continue
            ours_path = store_root / key / info["object"]
            reference_path = reference_root / key / reference_files[rel]["object"]
            same = _equal_content(ours_path, reference_path, rel)
            if not (same and (rel.endswith(".safetensors") or Path(rel).name in LOOSE)):
                problems[f"{key}/{rel}"] = "bytes" if same else "content"
    return problems


def attempts(store: LocalArtifactStore, key: str) -> dict[str, list[str]]:
    """attempt folder -> its files, under an output key (committed or not)."""
    found: dict[str, list[str]] = {}
    for k in store.list_keys(key):
        rest = k[len(key) + 1 :]
        if "/" in rest and not rest.startswith(("_partial/", "_shards/", "_checkpoints/")):
            attempt, rel = rest.split("/", 1)
            found.setdefault(attempt, []).append(rel)
    return found


# -- the cases ----------------------------------------------------------------------------------

CASES = [
    # (phase, SELMA_FAULT): early, mid-write of an output, during a checkpoint or output upload,
    # just before and just after the completion marker (the manifest).
    ("prompts", "job.start"),
    ("prompts", "prompts.after_wave@2"),
    ("prompts", "store.commit.before_manifest"),
    ("prompts", "store.commit.after_manifest"),
    ("images", "job.start"),
    ("images", "images.after_batch@3"),
    ("images", "images.after_shard@2"),
    ("images", "store.upload.mid@1"),
    # train: commits its latent cache (3 files) first, a checkpoint (4 files) after steps 1, 2 and 3,
    # then its output (the 5th commit)
    ("train", "train.after_step@2"),
    ("train", "train.after_checkpoint@2"),
    ("train", "store.upload.mid@5"),
    ("train", "store.commit.before_manifest@5"),
    ("train", "store.commit.after_manifest@5"),
    ("merge", "job.start"),
    ("merge", "merge.before_commit"),
    ("merge-search-candidate", "job.start"),
    ("merge-search-candidate", "store.commit.before_manifest"),
    ("merge-search", "store.commit.before_manifest"),
    ("eval", "job.start"),
    ("eval", "eval.after_variant@1"),
    ("eval", "store.upload.mid@3"),
    ("eval", "store.commit.before_manifest@1"),
]
# KNOWN GAPS, reported and not fixed here (file -> how it differs from the uninterrupted run's):
KNOWN_GAPS = {
    # (none for prompts: a resumed job writes its records in one field order and takes the model's
    # name from the config when every wave was replayed; none for images: shards are bit-identical)
}

RESUMING = re.compile(r"resuming: (\d+) prompts from (\d+) saved waves")
EVAL_IMAGES = re.compile(r"eval: (\d+) image\(s\) from the cache, (\d+) drawn")
EVAL_SCORED = re.compile(r"eval: clip_score: (\d+) pair\(s\) scored")


@pytest.mark.parametrize(("phase", "fault"), CASES, ids=[f"{p}-{f}" for p, f in CASES])
def test_killed_job_reruns_to_the_reference_output(reference, phase, fault):
    store = reference.reset(phase)
    key = reference.keys[phase]

    killed = reference.run(phase, fault)
    assert killed.returncode == -9, f"expected death by SIGKILL at {fault}:\n{killed.stderr[-5000:]}"
    assert f"SELMA_FAULT: SIGKILL at {fault}" in killed.stderr
    after_marker = fault.startswith("store.commit.after_manifest")
    # Nothing that looks finished, unless the kill came after the completion marker itself.
    assert store.is_committed(key) == after_marker
    orphans = attempts(store, key)
    upload = re.fullmatch(r"store\.upload\.mid@(\d+)", fault)
    if upload:  # the output's first files, uploaded under an attempt folder no manifest names
        n = int(upload.group(1))
        if phase == "train":  # @5: mid-way through the first checkpoint's commit (after the cache's 3)
            orphans = attempts(store, f"{key}/_checkpoints/step-00000001")
            n -= 3
        # At least the n uploads counted (eval's answer cache, one file, may be one of them), and
        # what the other transfer threads finished before the kill landed.
        [uploaded] = [len(files) for files in orphans.values()]
        assert n - (phase == "eval") <= uploaded <= n - 1 + StorageConfig().transfer_threads
    waves = store.list_keys(f"{key}/_partial")
    saved_shards = [k for k in store.list_keys(f"{key}/_shards") if k.endswith(".tar.json")]
    saved = [store.read_json(k) for k in waves]
    cached_images = len(store.list_keys("cache/eval-images"))
    answers_committed = store.is_committed("cache/answers/eval")
    checkpoints = [  # the steps of the committed train checkpoints
        int(k.split("/")[-2][5:]) for k in store.list_keys(f"{key}/_checkpoints") if k.endswith(MANIFEST)
    ]

    rerun = reference.run(phase)
    assert rerun.returncode == 0, rerun.stderr[-5000:]
    assert rerun.result["status"] == ("skipped" if after_marker else "ran")
    if not after_marker:  # a new attempt, whole; the killed one's files are never named
        assert store.read_manifest(key)["attempt"] not in orphans

    # What the rerun redid: nothing committed before the kill, at most the unit in flight.
    reference_result = reference.jobs[phase].result["result"]
    if phase == "prompts" and not after_marker:
        resumed = RESUMING.search(rerun.stderr)
        if saved:  # every saved wave replayed, its requests not sent again
            assert resumed and int(resumed.group(2)) == len(saved), rerun.stderr[-3000:]
            assert int(resumed.group(1)) == reference_result["seeds"] + sum(len(w["records"]) for w in saved)
            redone = reference_result["requests"] - saved[-1]["requests"]
            assert redone == {"prompts.after_wave@2": 1, "store.commit.before_manifest": 0}[fault]
        else:
            assert fault == "job.start" and not resumed
    if phase == "prompts" and after_marker:  # skipped; the saved waves are left behind, unread
        assert len(waves) == reference_result["requests"]
    if phase == "images":  # 3 shards (6, 6, 2), each saved as it completes: only the others are drawn
        # (after_batch@3: mid-way through shard 1; upload.mid: every shard saved, the commit begun)
        saved_count = {"job.start": 0, "images.after_batch@3": 1, "images.after_shard@2": 2}.get(fault, 3)
        assert len(saved_shards) == saved_count
        reused = [0, 6, 12, 14][saved_count]
        result = rerun.result["result"]
        assert result["images"] == reference_result["images"] == reference_result["drawn"] == 14
        assert (result["drawn"], result["reused"]) == (14 - reused, reused)
        assert store.list_keys(f"{key}/_shards") == []  # the saved shards, deleted after the commit
    if phase == "train":  # resumed from the newest committed checkpoint: only the steps since it redone
        # (killed before step 2's checkpoint, right after it, mid-way through the first one's upload;
        # before or after the output's manifest, the 2 kept are steps 2 and 3's)
        expected = {"train.after_step@2": [1], "train.after_checkpoint@2": [1, 2], "store.upload.mid@5": []}
        assert checkpoints == expected.get(fault, [2, 3])
        if after_marker:  # skipped; the checkpoints are left behind, unread garbage (docs/reliability.md)
            store.delete_prefix(f"{key}/_checkpoints")
        else:
            resumed_from, result = (checkpoints or [0])[-1], rerun.result["result"]
            assert (result["steps"], result["resumed_from_step"]) == (4, resumed_from)
            assert (f"train: resuming at step {resumed_from} of 4" in rerun.stderr) == bool(resumed_from)
            assert store.list_keys(f"{key}/_checkpoints") == []  # deleted after the commit
    if phase == "merge":
        registered = rerun.result["result"]["registered"]["version"]
        # Registered before the commit: the rerun finds the version of the same output (tag
        # selma.store_key) and reuses it rather than registering a second one.
        assert registered == "1"
    if phase == "eval":
        # Images are cached in the store one by one as they are drawn: none is drawn twice.
        assert cached_images == {"job.start": 0, "eval.after_variant@1": 4}.get(fault, 12)
        assert EVAL_IMAGES.search(rerun.stdout).groups() == (str(cached_images), str(12 - cached_images))
        # Scores are cached too, but committed when the job ends: a kill before loses them.
        scored = EVAL_SCORED.search(rerun.stdout)[1]
        assert scored == ("0" if answers_committed else EVAL_SCORED.search(reference.jobs["eval"].stdout)[1])

    after = reference.snapshots[phase_index(phase) + 1]
    problems = {Path(k).name: how for k, how in compare_outputs(store.root, after / "store").items()}
    assert problems == KNOWN_GAPS.get((phase, fault), {})
    if fault == "store.commit.before_manifest" and phase == "prompts":
        assert json.loads(store.read_output_file(key, "stats.json"))["model"] == "offline-templates"
    if problems:
        pytest.xfail(f"known gaps: {problems}")
