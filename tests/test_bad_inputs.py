"""Bad inputs, table-driven: every case is refused with exit code 2, a message that names the input
(file, key or flag) and what was expected, and an unchanged store.

A case goes through ``jobs.submit.main`` or ``jobs.run.main`` in-process (``via="submit"``/``"run"``:
the exit code, the message on stderr/stdout, the last JSON line, the store folder before and after),
or through the loader a phase uses (``via="load"``: the ``ConfigError``/``InputError`` it raises).
To add a case, append a ``Case`` to ``CASES``: ``make`` gets an ``Env`` (the test's folder and the
``tiny_config`` factory) and returns the argv (submit/run) or a callable (load); ``names`` are the
substrings the message must contain (``{tmp}`` and ``{config}`` are filled in), ``expected`` says
what was expected.
"""
# ruff: noqa: E501 (the table of cases: one line each)

from __future__ import annotations

import io
import json
import signal
import struct
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from conftest import REPO, untouched_mlflow_db

from selma_core.errors import EXIT_INVALID, ConfigError, InputError

# -- the test's world ------------------------------------------------------------------------------


@dataclass
class Env:
    tmp: Path
    make_config: Callable[..., Path]

    def config(self, **overrides) -> str:
        return str(self.make_config(**overrides))

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def skill(self, data: dict | bytes | str, name: str = "bad") -> str:
        """A config whose only skill is ``name``, read from ``<tmp>/skills/<name>.yaml`` = ``data``."""
        self.write(f"skills/{name}.yaml", yaml.safe_dump(data) if isinstance(data, dict) else data)
        return self.config(skills=[name], skills_dir=str(self.tmp / "skills"))


@dataclass(frozen=True)
class Case:
    id: str
    via: Literal["submit", "run", "load"]
    make: Callable[[Env], Any]  # argv (submit, run) or a zero-argument callable (load)
    names: tuple[str, ...]  # what the message must name: file, key, flag, value
    expected: str  # and what it says was expected
    env: dict[str, str] = field(default_factory=dict)


def submit(*flags: str, **overrides) -> Callable[[Env], list[str]]:
    return lambda env: ["--phase", "all", *flags, "--config", env.config(**overrides)]


def run(*flags: str, **overrides) -> Callable[[Env], list[str]]:
    return lambda env: [*flags, "--config", env.config(**overrides)]


def config_file(data: bytes | str, name: str = "bad.yaml") -> Callable[[Env], list[str]]:
    return lambda env: ["--phase", "all", "--config", str(env.write(name, data))]


def with_skill(data: dict | bytes | str) -> Callable[[Env], list[str]]:
    return lambda env: ["--phase", "all", "--config", env.skill(data)]


def with_benchmark(name: str, data: bytes | str) -> Callable[[Env], list[str]]:
    def make(env: Env) -> list[str]:
        path = env.write(name, data)
        return [
            "--phase",
            "all",
            "--config",
            env.config(prompts={"contamination": {"benchmarks": [str(path)]}}),
        ]

    return make


GOOD_SKILL = {
    "name": "bad",
    "description": "a skill file with one mistake",
    "seeds": ["three red apples on a table"],
    "offline": {"templates": ["{n} cats"], "slots": {"n": ["two", "three"]}},
}


def skill(**changes) -> dict:
    data = {**GOOD_SKILL, **changes}
    return {k: v for k, v in data.items() if v is not None}


# -- crafted datasets and adapters -----------------------------------------------------------------


def jpeg(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` px and whose pixels never come: what a
    decompression bomb looks like before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def image_shard(env: Env, members: dict[str, bytes]) -> Path:
    """An images output folder whose WebDataset shard holds ``members``."""
    from selma_core.phases.images import SHARD_NAME

    folder = env.tmp / "images-out"
    folder.mkdir(exist_ok=True)
    with tarfile.open(folder / SHARD_NAME, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return folder


def meta(prompt: str = "three red apples") -> bytes:
    return json.dumps({"id": "p0", "prompt": prompt}).encode()


def read_dataset(members: dict[str, bytes]) -> Callable[[Env], Callable]:
    from selma_core.phases.images import read_image_dataset

    return lambda env: lambda: read_image_dataset(image_shard(env, members))


def not_a_tar(env: Env) -> Callable:
    from selma_core.phases.images import read_image_dataset

    folder = env.write("images-out/shard-00000.tar", b"not a tar at all").parent
    return lambda: read_image_dataset(folder)


def decode_dataset(members: dict[str, bytes]) -> Callable[[Env], Callable]:
    """The train phase's path: read the shard, then decode its images."""
    from selma_core.phases.images import read_image_dataset
    from selma_core.phases.train import _decode_images

    return lambda env: lambda: _decode_images(read_image_dataset(image_shard(env, members)), 8)[1]


def lora_tensors(rank: int = 2, up_rank: int | None = None, prefix: str = "unet.mid.attn.to_q") -> dict:
    import torch

    return {
        f"{prefix}.lora.down.weight": torch.randn(rank, 8),
        f"{prefix}.lora.up.weight": torch.randn(8, up_rank or rank),
    }


def kohya_tensors() -> dict:
    """The same layer in kohya/A1111 keys: another format (and naming) than diffusers'."""
    import torch

    return {
        "lora_unet_mid_attn_to_q.lora_down.weight": torch.randn(2, 8),
        "lora_unet_mid_attn_to_q.lora_up.weight": torch.randn(8, 2),
        "lora_unet_mid_attn_to_q.alpha": torch.tensor(2.0),
    }


def safetensors_file(env: Env, tensors: dict, metadata: dict | None, name: str) -> Path:
    from safetensors.torch import save_file

    path = env.tmp / name
    save_file(tensors, str(path), metadata=metadata)
    return path


LORA_META = {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 2})}


def adapter(tensors: Callable[[], dict], metadata: dict | None = LORA_META, name="a.safetensors"):
    from selma_core.lora import load_adapter

    return lambda env: lambda: load_adapter(safetensors_file(env, tensors(), metadata, name))


def adapter_bytes(name: str, data: bytes | Callable[[], bytes]) -> Callable[[Env], Callable]:
    from selma_core.lora import load_adapter

    def make(env: Env) -> Callable:
        path = env.write(name, data() if callable(data) else data)
        return lambda: load_adapter(path if "/" not in name else path.parent)

    return make


def torch_saved(obj: Callable[[], Any]) -> Callable[[], bytes]:
    def make() -> bytes:
        import torch

        buf = io.BytesIO()
        torch.save(obj(), buf)
        return buf.getvalue()

    return make


def truncated_safetensors() -> bytes:
    from safetensors.torch import save

    return save(lora_tensors(), metadata=LORA_META)[:-40]


def experts_of_two_base_models(env: Env) -> Callable:
    """Experts whose layers have the same names and different shapes: trained on other models."""
    import torch

    from selma_core.lora import LoraAdapter, LoraLayer
    from selma_core.merging import check_merge_inputs

    def expert(width: int) -> LoraAdapter:
        layer = LoraLayer(down=torch.zeros(2, width), up=torch.zeros(width, 2))
        return LoraAdapter(layers={"unet.mid.attn.to_q": layer}, rank=2, alpha=2.0)

    return lambda: check_merge_inputs({"sd15": expert(320), "sdxl": expert(640)}, None)


def tampered_manifest(env: Env) -> Callable:
    """A committed output whose manifest names a file outside the output folder."""
    from selma_core.storage import LocalArtifactStore

    store = LocalArtifactStore(env.tmp / "store")
    store.write_json(
        "prompts/x/abc/_manifest.json",
        {
            "key": "prompts/x/abc",
            "files": {"../../../escaped.txt": {"size": 1, "sha256": "0", "object": "a/f"}},
        },
    )
    return lambda: store.fetch_dir("prompts/x/abc", env.tmp / "cache")


CSV_WITHOUT_PROMPTS = "id,question\n1,how many cats?\n"

# -- the table -------------------------------------------------------------------------------------

# fmt: off
CASES: list[Case] = [
    # config: types, keys, empty lists, bounds, names, encodings, shapes
    Case("config-wrong-type", "submit", submit(train={"steps": "many"}), ("{config}", "train.steps"), "an integer"),
    Case("config-bool-for-int", "submit", submit(executor={"max_parallel": True}), ("executor.max_parallel",), "an integer"),
    Case("config-unknown-key", "submit", submit(trian={"steps": 3}), ("{config}", "trian"), "expected one of"),
    Case("config-unknown-nested-key", "submit", submit(images={"num_steps": 3}), ("images.num_steps",), "expected one of"),
    Case("config-bad-choice", "submit", submit(prompts={"backend": "gpt"}), ("prompts.backend", "'gpt'"), "one of"),
    Case("config-list-expected", "submit", submit(skills="counting"), ("{config}", "skills"), "a list of str"),
    Case("config-empty-skills", "submit", submit(skills=[]), ("{config}", "skills"), "at least one skill"),
    Case("config-empty-target-modules", "submit", submit(train={"target_modules": []}), ("train", "target_modules"), "at least one"),
    Case("config-huge-num-prompts", "submit", submit(prompts={"num_prompts": 10**12}), ("prompts", "num_prompts"), "at most"),
    Case("config-huge-train-steps", "submit", submit(train={"steps": 10**9}), ("train", "steps"), "at most"),
    Case("config-huge-sampling-steps", "submit", submit(images={"num_inference_steps": 10**9}), ("images", "num_inference_steps"), "at most"),
    Case("config-huge-height", "submit", submit(images={"height": 8 * 10**6}), ("images", "height"), "at most"),
    Case("config-huge-resolution", "submit", submit(train={"resolution": 8 * 10**6}), ("train", "resolution"), "at most"),
    Case("config-heldout-out-of-range", "submit", submit(prompts={"heldout_fraction": 1.5}), ("heldout_fraction",), "(0, 1)"),
    Case("config-name-traversal", "submit", submit(name="../../x"), ("{config}", "name", "../../x"), "DNS-1123"),
    Case("config-skill-traversal", "submit", submit(skills=["../../x"]), ("{config}", "skills", "../../x"), "lowercase letters"),
    Case("config-storage-scheme", "submit", submit(storage={"uri": "ftp://host/x"}), ("storage", "uri", "ftp://host/x"), "file://PATH"),
    Case("config-merge-weight-unknown-skill", "submit", submit(merge={"weights": {"counting": 0.5, "nope": 0.5}}), ("merge.weights", "'nope'"), "the pipeline's skills"),
    Case("config-allow-pickle-not-bool", "submit", submit(allow_pickle_checkpoints="yes"), ("allow_pickle_checkpoints",), "true or false"),
    Case("config-skills-dir-missing", "submit", lambda env: submit(skills_dir=str(env.tmp / "nowhere"))(env), ("{tmp}/nowhere/counting.yaml",), "known skills"),
    Case("config-missing-file", "submit", lambda env: ["--phase", "all", "--config", str(env.tmp / "nope.yaml")], ("{tmp}/nope.yaml",), "file not found"),
    Case("config-not-utf8", "submit", config_file(b"name: caf\xe9\nbase_model: random:tiny-sd\n"), ("{tmp}/bad.yaml",), "UTF-8"),
    Case("config-not-a-mapping", "submit", config_file("- name\n- skills\n"), ("{tmp}/bad.yaml",), "a mapping"),
    Case("config-invalid-yaml", "submit", config_file("name: [unclosed\n"), ("{tmp}/bad.yaml",), "invalid YAML"),
    Case("config-empty-file", "submit", config_file(""), ("{tmp}/bad.yaml", "name"), "missing required key"),
    # skill files
    Case("skill-missing-seeds", "submit", with_skill(skill(seeds=None)), ("{tmp}/skills/bad.yaml", "seeds"), "missing required key"),
    Case("skill-empty-seeds", "submit", with_skill(skill(seeds=[" "])), ("{tmp}/skills/bad.yaml", "seeds"), "at least one seed"),
    Case("skill-contradictory-word-limits", "submit", with_skill(skill(checks={"min_words": 9, "max_words": 3})), ("{tmp}/skills/bad.yaml", "max_words"), "contradictory"),
    Case("skill-required-word-forbidden", "submit", with_skill(skill(checks={"require_any": [["red"]], "forbid": ["red"]})), ("{tmp}/skills/bad.yaml", "require_any"), "forbidden"),
    Case("skill-seed-breaks-checks", "submit", with_skill(skill(checks={"min_words": 10})), ("{tmp}/skills/bad.yaml", "seeds"), "breaks the skill's own checks"),
    Case("skill-huge-target-count", "submit", with_skill(skill(target_count=10**12)), ("{tmp}/skills/bad.yaml", "target_count"), "at most"),
    Case("skill-slot-without-words", "submit", with_skill(skill(offline={"templates": ["{x} dogs"]})), ("{tmp}/skills/bad.yaml", "{{x}}"), "no words"),
    Case("skill-name-traversal", "submit", with_skill(skill(name="../../x")), ("{tmp}/skills/bad.yaml", "name", "../../x"), "lowercase letters"),
    Case("skill-not-utf8", "submit", with_skill(b"name: bad\ndescription: caf\xe9\n"), ("{tmp}/skills/bad.yaml",), "UTF-8"),
    Case("skill-not-a-mapping", "submit", with_skill("- three red apples\n"), ("{tmp}/skills/bad.yaml",), "a mapping"),
    Case("skill-unknown", "submit", submit(skills=["counting", "nosuch"]), ("'nosuch'", "nosuch.yaml"), "known skills: "),
    # command-line flags
    Case("submit-bad-phase", "submit", lambda env: ["--phase", "bogus", "--config", env.config()], ("--phase", "'bogus'"), "invalid choice"),
    Case("submit-bad-backend", "submit", submit("--backend", "slurm"), ("--backend", "'slurm'"), "invalid choice"),
    Case("submit-skill-not-in-config", "submit", submit("--skill", "nosuch"), ("--skill nosuch", "{config}"), "its skills: counting, spatial"),
    Case("submit-skill-traversal", "submit", submit("--skill", "../../x"), ("--skill ../../x",), "its skills: counting, spatial"),
    Case("submit-skill-on-a-global-phase", "submit", lambda env: ["--phase", "merge", "--skill", "counting", "--config", env.config()], ("--skill", "--phase merge"), "one job for every skill"),
    Case("submit-max-parallel-zero", "submit", submit("--max-parallel", "0"), ("--max-parallel",), ">= 1"),
    Case("submit-max-parallel-garbage", "submit", submit("--max-parallel", "two"), ("--max-parallel", "'two'"), "invalid int value"),
    Case("submit-force-unknown-job", "submit", submit("--force", "nosuch:job"), ("--force nosuch:job",), "no such job; jobs: prompts:counting"),
    Case("submit-force-unknown-skill", "submit", submit("--force", "train:nosuch"), ("--force train:nosuch",), "no such job"),
    Case("submit-force-outside-selection", "submit", lambda env: ["--phase", "prompts", "--force", "prompts", "--config", env.config()], ("--force prompts", "images:counting"), "select them too"),
    Case("run-bad-phase", "run", run("--phase", "bogus"), ("--phase", "'bogus'"), "invalid choice"),
    Case("run-shards-garbage", "run", run("--phase", "merge-search", "--shards", "a,b"), ("--shards a,b",), "comma-separated shard numbers"),
    Case("run-shards-index-out-of-range", "run", run("--phase", "merge-search", "--shards", "0,1"), ("--shards 0,1", "JOB_COMPLETION_INDEX=7"), "comma-separated shard numbers", env={"JOB_COMPLETION_INDEX": "7"}),
    Case("run-shard-index-unknown", "run", run("--phase", "merge-search", "--shard-index", "99"), ("--shard-index 99",), "jobs: prompts:counting"),
    Case("run-skill-not-in-config", "run", run("--phase", "train", "--skill", "nosuch"), ("--skill nosuch",), "one of the pipeline's skills"),
    Case("run-skill-traversal", "run", run("--phase", "prompts", "--skill", "../../x"), ("--skill ../../x",), "one of the pipeline's skills"),
    Case("run-nnodes-without-master-addr", "run", run("--phase", "train", "--skill", "counting", "--nproc-per-node", "2", "--nnodes", "2"), ("--nnodes", "--master-addr"), "needs"),
    Case("run-per-skill-phase-without-skill", "run", run("--phase", "train"), ("--phase train",), "needs --skill"),
    Case("run-skill-on-a-global-phase", "run", run("--phase", "merge", "--skill", "counting"), ("--phase merge", "--skill counting"), "drop --skill"),
    # datasets: the images phase's WebDataset shard, as the train phase reads it
    Case("dataset-not-a-tar", "load", not_a_tar, ("{tmp}/images-out/shard-00000.tar",), "a tar"),
    Case("dataset-json-not-utf8", "load", read_dataset({"p0.jpg": jpeg(16, 16), "p0.json": b'{"prompt": "caf\xe9"}'}), ("shard-00000.tar", "p0.json"), "UTF-8"),
    Case("dataset-json-invalid", "load", read_dataset({"p0.jpg": jpeg(16, 16), "p0.json": b"{prompt"}), ("shard-00000.tar", "p0.json"), "JSON"),
    Case("dataset-json-without-prompt", "load", read_dataset({"p0.jpg": jpeg(16, 16), "p0.json": b'["x"]'}), ("shard-00000.tar", "p0.json"), "'prompt'"),
    Case("dataset-sample-without-json", "load", read_dataset({"p0.jpg": jpeg(16, 16)}), ("shard-00000.tar", "'p0'"), ".json"),
    Case("dataset-image-1px", "load", decode_dataset({"p0.jpg": jpeg(1, 1), "p0.json": meta()}), ("'p0'", "1x1"), "at least 8 px"),
    Case("dataset-image-bomb", "load", decode_dataset({"p0.jpg": png_header(20_000, 20_000), "p0.json": meta()}), ("'p0'", "decompression bomb"), "at most 8192 px"),
    Case("dataset-image-over-the-limit", "load", decode_dataset({"p0.jpg": png_header(9000, 9000), "p0.json": meta()}), ("'p0'", "9000x9000"), "at most 8192 px"),
    Case("dataset-image-too-wide", "load", decode_dataset({"p0.jpg": png_header(8200, 16), "p0.json": meta()}), ("'p0'", "8200x16"), "at most 8192 px"),
    Case("dataset-image-garbage", "load", decode_dataset({"p0.jpg": b"\xff\xd8 not really a jpeg", "p0.json": meta()}), ("'p0'",), "cannot be decoded"),
    # adapters
    Case("adapter-pickle-bin", "load", adapter_bytes("lora.bin", torch_saved(lora_tensors)), ("{tmp}/lora.bin", "allow_pickle_checkpoints: true"), "safetensors"),
    Case("adapter-pickle-pt", "load", adapter_bytes("lora.pt", torch_saved(lora_tensors)), ("{tmp}/lora.pt", "allow_pickle_checkpoints: true"), "safetensors"),
    Case("adapter-pickle-ckpt", "load", adapter_bytes("lora.ckpt", torch_saved(lora_tensors)), ("{tmp}/lora.ckpt", "allow_pickle_checkpoints: true"), "safetensors"),
    Case("adapter-pickle-in-folder", "load", adapter_bytes("expert/pytorch_lora_weights.bin", torch_saved(lora_tensors)), ("{tmp}/expert/pytorch_lora_weights.bin", "allow_pickle_checkpoints: true"), "safetensors"),
    Case("adapter-unknown-suffix", "load", adapter_bytes("lora.npz", b"PK\x03\x04"), ("{tmp}/lora.npz",), ".safetensors"),
    Case("adapter-garbage-bytes", "load", adapter_bytes("lora.safetensors", b"\x00" * 7 + b"garbage" * 9), ("{tmp}/lora.safetensors",), "safetensors file"),
    Case("adapter-truncated", "load", adapter_bytes("lora.safetensors", truncated_safetensors), ("{tmp}/lora.safetensors",), "safetensors file"),
    Case("adapter-wrong-shapes", "load", adapter(lambda: lora_tensors(rank=2, up_rank=4)), ("{tmp}/a.safetensors", "unet.mid.attn.to_q"), "rank"),
    Case("adapter-rank-not-as-configured", "load", adapter(lambda: lora_tensors(rank=4)), ("{tmp}/a.safetensors", "unet.mid.attn.to_q"), "r=2"),
    Case("adapter-another-format", "load", adapter(kohya_tensors), ("{tmp}/a.safetensors", "'lora_unet_mid_attn_to_q."), "diffusers' LoRA format"),
    Case("adapter-metadata-garbage", "load", adapter(lora_tensors, {"lora_adapter_metadata": "{not json"}), ("{tmp}/a.safetensors", "lora_adapter_metadata"), "JSON"),
    Case("adapter-metadata-without-rank", "load", adapter(lora_tensors, {"lora_adapter_metadata": "{}"}), ("{tmp}/a.safetensors", "unet.r"), "rank"),
    Case("adapter-of-another-base-model", "load", experts_of_two_base_models, ("'sd15'", "'sdxl'", "unet.mid.attn.to_q"), "different base models"),
    # benchmark files (prompts.contamination.benchmarks)
    Case("benchmark-unknown-suffix", "submit", with_benchmark("bench.xlsx", "a,b\n"), ("{tmp}/bench.xlsx",), ".csv, .json, .jsonl or .txt"),
    Case("benchmark-empty", "submit", with_benchmark("bench.txt", ""), ("{tmp}/bench.txt",), "no prompts"),
    Case("benchmark-not-utf8", "submit", with_benchmark("bench.txt", b"two cats on a caf\xe9 table\n"), ("{tmp}/bench.txt",), "UTF-8"),
    Case("benchmark-csv-without-prompt-column", "submit", with_benchmark("bench.csv", CSV_WITHOUT_PROMPTS), ("{tmp}/bench.csv",), "column named one of"),
    Case("benchmark-json-not-a-list", "submit", with_benchmark("bench.json", "42"), ("{tmp}/bench.json",), "a list"),
    Case("benchmark-missing", "submit", lambda env: submit(prompts={"contamination": {"benchmarks": [str(env.tmp / "gone.csv")]}})(env), ("{tmp}/gone.csv",), "not found"),
    # the store: a manifest that would write outside the output folder
    Case("store-manifest-escapes", "load", tampered_manifest, ("prompts/x/abc", "../../../escaped.txt"), "names separated by '/'"),
]
# fmt: on


def test_the_table_is_large_and_its_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 30


@pytest.fixture
def world(tmp_path, tiny_config, monkeypatch):
    """The case's folder with a store that already holds something, and guards: a case that gets
    past validation fails at once instead of running jobs."""
    from selma_core.storage import LocalArtifactStore

    LocalArtifactStore(tmp_path / "store").write_json("sentinel/_manifest.json", {"files": {}})
    previous = signal.getsignal(signal.SIGTERM)  # jobs.*.main install a SIGTERM handler

    def unexpected(*args, **kwargs):
        raise AssertionError("the case was accepted: it got as far as running jobs")

    monkeypatch.setattr("jobs.submit.make_executor", unexpected)
    monkeypatch.setattr("selma_core.storage.open_store", unexpected)
    yield Env(tmp_path, tiny_config)
    signal.signal(signal.SIGTERM, previous)


def store_listing(root: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_exit_code_2(case: Case, world: Env, capsys, monkeypatch):
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    made = case.make(world)
    if case.via == "load":
        with pytest.raises((ConfigError, InputError)) as info:
            made()
        code, message = info.value.exit_code, str(info.value)
    else:
        from jobs import run as run_module
        from jobs import submit as submit_module

        main = submit_module.main if case.via == "submit" else run_module.main
        before = store_listing(world.tmp / "store")
        code = main(made)
        out, err = capsys.readouterr()
        message = err + out
        assert "Traceback" not in message, message
        last = json.loads(out.strip().splitlines()[-1])
        assert last.get("error"), out
        assert store_listing(world.tmp / "store") == before, "the store changed"
        assert untouched_mlflow_db(world.tmp / "mlflow.db"), "an MLflow run was started"
    assert code == EXIT_INVALID, message
    config = str(world.tmp / "pipeline.yaml")
    for name in case.names:
        assert name.format(tmp=world.tmp, config=config) in message, message
    assert case.expected in message, message


# -- store keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../x", "a/../../b", "/etc/passwd", "a/./b", "a//b", "a\\..\\b", ""])
def test_the_store_rejects_keys_that_escape_its_root(tmp_path, key):
    from selma_core.storage import LocalArtifactStore

    store = LocalArtifactStore(tmp_path / "store")
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "f.txt").write_text("x")
    for call in (
        lambda: store.write_bytes(key, b"x"),
        lambda: store.read_bytes(key),
        lambda: store.exists(key),
        lambda: store.list_keys(key),
        lambda: store.delete_prefix(key),
        lambda: store.commit_dir(staged, key),
        lambda: store.fetch_dir(key, tmp_path / "cache"),
    ):
        with pytest.raises(ValueError, match="invalid store key"):
            call()
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "b").exists()


def test_names_that_become_keys_are_dns_labels_everywhere(tmp_path):
    """Pipeline and skill names are checked where they enter: config, skill file, and load_skill."""
    from selma_core.skills import load_skill

    skills = tmp_path / "skills"
    skills.mkdir()
    (tmp_path / "evil.yaml").write_text(yaml.safe_dump(GOOD_SKILL))
    for name in ("../evil", "/abs/evil", "a/b", "..", "Upper"):
        with pytest.raises(ConfigError, match="not a valid skill name"):
            load_skill(skills, name)


# -- pickle checkpoints: refused by default; with the opt-in, read with weights_only=True ----------


def test_allow_pickle_checkpoints_defaults_off_and_changes_no_output_key(tiny_config):
    from selma_core.config import load_config
    from selma_core.plan import build_plan
    from selma_core.skills import load_skills

    off = load_config(tiny_config())
    on = load_config(tiny_config(allow_pickle_checkpoints=True))
    assert off.allow_pickle_checkpoints is False and on.allow_pickle_checkpoints is True
    plan_off = build_plan(off, load_skills(off.skills_path, off.skills))
    plan_on = build_plan(on, load_skills(on.skills_path, on.skills))
    assert {j: s.key for j, s in plan_off.jobs.items()} == {j: s.key for j, s in plan_on.jobs.items()}


def test_opted_in_pickle_lora_loads_with_weights_only(tmp_path, monkeypatch):
    import torch

    from selma_core.lora import load_adapter

    tensors = lora_tensors(rank=2)
    torch.save(tensors, tmp_path / "lora.pt")
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    adapter = load_adapter(tmp_path / "lora.pt", allow_pickle=True)
    assert seen == [True]
    layer = adapter.layers["unet.mid.attn.to_q"]
    assert torch.equal(layer.down, tensors["unet.mid.attn.to_q.lora.down.weight"])
    assert adapter.rank == 2 and adapter.scale == 1.0  # no metadata: alpha = rank, as diffusers reads it


class Payload:
    """Unpickling this would create a file: what a malicious checkpoint does instead."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_opted_in_pickle_with_arbitrary_objects_is_refused_by_weights_only(tmp_path):
    import torch

    from selma_core.lora import load_adapter

    marker = tmp_path / "code-ran"
    torch.save({"unet.x.lora.down.weight": Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="weights_only") as info:
        load_adapter(tmp_path / "evil.pt", allow_pickle=True)
    assert str(tmp_path / "evil.pt") in str(info.value) and info.value.exit_code == EXIT_INVALID
    assert not marker.exists()


def test_random_test_models_are_saved_as_safetensors(model_cache):
    from selma_core.models.random_models import materialize_random_model

    folder = materialize_random_model("random:tiny-sd", model_cache)
    weights = [p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt", ".pth")]
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights


def test_a_model_folder_with_pickle_weights_is_refused_unless_opted_in(tmp_path, model_cache):
    """``from_pretrained`` gets ``use_safetensors=True``: a folder whose UNet is a .bin is refused,
    naming the folder and the opt-in; with the opt-in, diffusers reads it (weights_only)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from selma_core.models.loading import load_diffusion_pipeline
    from selma_core.models.random_models import materialize_random_model

    folder = tmp_path / "pickled-sd"
    shutil.copytree(materialize_random_model("random:tiny-sd", model_cache), folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(unet), folder / "unet" / "diffusion_pytorch_model.bin")
    unet.unlink()
    with pytest.raises(ConfigError, match="allow_pickle_checkpoints") as info:
        load_diffusion_pipeline(str(folder), model_cache)
    assert str(folder) in str(info.value)
    assert load_diffusion_pipeline(str(folder), model_cache, allow_pickle=True).unet is not None


def test_the_shipped_configs_still_load():
    from selma_core.config import load_config

    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert load_config(path).allow_pickle_checkpoints is False
