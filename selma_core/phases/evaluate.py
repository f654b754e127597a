"""Phase 5, eval: base vs each expert vs the merged model, per skill, with intervals and a report.

Recipe, one job:
1. The prompts (``eval.benchmark``): each skill's held-out prompts (``heldout``, never trained on;
   a skill trained on an external dataset: its held-out captions, ``selma_core.datasets``),
   DSG-1k (``dsg1k``) or TIFA v1.0 (``tifa``); at most ``max_prompts_per_skill`` per group.
2. For each model variant (``eval.models``; default ``base``, ``expert:<skill>`` for every skill,
   ``merged``; also ``models:/NAME/VERSION`` from the model registry) draw one image per prompt,
   every variant with the same per-prompt seed, so the comparison is paired. Images already drawn
   with the same weights, settings, prompt and seed are read from the store's image cache.
3. Score every image with ``eval.metrics`` (CLIPScore, PickScore, ImageReward, HPS, VQAScore) and,
   on a benchmark, its own questions (DSG: dependency-linked yes/no questions; TIFA: multiple
   choice) answered by a VQA model. Scores and answers go through the answer cache in the store:
   a rerun, or another aggregation, computes no model call it already made.
4. Per skill and overall: means with bootstrap intervals, and each variant minus base on the same
   prompts with its paired interval and p-value.
5. Commit ``results.json`` (everything, per prompt too), ``results.md`` (the tables), the images,
   and ``report.html`` + ``figures/*.png`` (charts and image grids); log every figure and metric to
   MLflow, and tag the registered merged model with its scores (what promotion compares).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from selma_core.errors import ConfigError, InputError
from selma_core.faults import fault_point
from selma_core.phases.images import SamplingConfig
from selma_core.phases.merge import ADAPTER_DIR, EXPERTS_DIR
from selma_core.storage.base import sha256_file

BENCHMARKS = ("heldout", "dsg1k", "tifa")
# base | merged | expert:SKILL | models:/NAME/VERSION | models:/NAME@ALIAS (resolved by the controller)
MODEL_PATTERN = re.compile(
    r"^(base|merged|expert:[a-z0-9_-]+|models:/[A-Za-z0-9_.-]+(/[0-9]+|@[A-Za-z0-9_-]+))$"
)
ANSWER_CACHE_KEY = "cache/answers/eval"
IMAGE_CACHE_PREFIX = "cache/eval-images"
REPORT_FILE = "report.html"
# Images scored per metric call (and in memory at once).
SCORE_CHUNK = 64


@dataclass
class EvalConfig(SamplingConfig):
    """Sampling settings (as in ``images``) for the evaluation images, plus what to score."""

    # heldout: each skill's held-out prompts; dsg1k: DSG-1k; tifa: TIFA v1.0 (with their questions).
    benchmark: Literal["heldout", "dsg1k", "tifa"] = "heldout"
    # Models compared: base, merged, expert:SKILL, models:/NAME/VERSION or models:/NAME@ALIAS.
    # None: base, every expert (with compare_experts) and merged.
    models: list[str] | None = None
    # Per-image metrics: clip_score, pickscore, image_reward, hps, vqascore. dsg1k and tifa add
    # their own question-answering score.
    metrics: list[str] = field(default_factory=lambda: ["clip_score"])
    # CLIP model for CLIPScore: hub id, local folder, or random:tiny-clip (tests).
    clip_model: str = "openai/clip-vit-large-patch14"
    pickscore_model: str = "yuvalkirstain/PickScore_v1"
    # None: PickScore's base CLIP processor for PickScore_v1, else the model's own folder.
    pickscore_processor: str | None = None
    image_reward_model: str = "THUDM/ImageReward"
    # hps-v2, hps-v2.1 (upstream checkpoints: pickles, need allow_pickle_checkpoints or converting),
    # or a folder converted with `python -m selma_core.metrics.hps convert`.
    hps_model: str = "hps-v2.1"
    # The VQA model answering DSG/TIFA questions (SELMA's TIFA model: BLIP-2 FlanT5-XL).
    vqa_backend: Literal["blip2", "instructblip", "chat-vlm"] = "blip2"
    vqa_model: str = "Salesforce/blip2-flan-t5-xl"
    # The VQA model of VQAScore (P("Yes") to "Does this figure show ...?").
    vqascore_backend: Literal["blip2", "instructblip", "chat-vlm"] = "instructblip"
    vqascore_model: str = "Salesforce/instructblip-flan-t5-xl"
    # DSG-1k annotations (dsg-1k-anns.csv): a path; None downloads upstream's, checksum-checked.
    dsg_annotations: str | None = None
    # dsg-official (the DSG authors' rule) or selma (SELMA's code); every figure says which.
    dsg_convention: Literal["dsg-official", "selma"] = "dsg-official"
    # TIFA v1.0 questions (tifa_v1.0_question_answers.json): a path or URL; None downloads upstream's,
    # which needs tifa_questions_sha256 (selma knows no hash for it).
    tifa_questions: str | None = None
    tifa_questions_sha256: str | None = None
    # How a free-form VQA answer becomes a choice: embedding (TIFA's rule) or exact.
    tifa_matcher: Literal["embedding", "exact"] = "embedding"
    tifa_embedding_model: str = "sentence-transformers/all-mpnet-base-v2"
    # Seeds distinct from the training images' (the same prompt id gets another image).
    seed: int = 1000
    # Cap on prompts per skill (benchmarks: per category), the first ones in file order.
    max_prompts_per_skill: int | None = None
    # Also score each single-skill expert (SELMA's per-skill comparison); costs one pass per skill.
    compare_experts: bool = True
    # Bootstrap confidence intervals of means and of paired differences.
    confidence: float = 0.95
    bootstrap_resamples: int = 2000
    # Sample prompts per skill shown as image grids in the report.
    report_samples_per_skill: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        from selma_core.metrics.suite import IMAGE_TEXT_METRICS

        if self.max_prompts_per_skill is not None and self.max_prompts_per_skill < 1:
            raise ValueError(f"max_prompts_per_skill: expected >= 1, got {self.max_prompts_per_skill}")
        unknown = [m for m in self.metrics if m not in IMAGE_TEXT_METRICS]
        if unknown:
            raise ValueError(f"metrics: unknown {unknown[0]!r}; known: {', '.join(IMAGE_TEXT_METRICS)}")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics: each metric once, got {self.metrics}")
        if not self.metrics and self.benchmark == "heldout":
            raise ValueError("metrics: the heldout benchmark needs at least one metric")
        for model in self.models or []:
            if not MODEL_PATTERN.fullmatch(model):
                raise ValueError(
                    f"models: {model!r} is not base, merged, expert:SKILL, models:/NAME/VERSION or "
                    "models:/NAME@ALIAS"
                )
        if self.models is not None and (not self.models or len(set(self.models)) != len(self.models)):
            raise ValueError(f"models: expected distinct models, got {self.models}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence: expected a number between 0 and 1, got {self.confidence}")
        if self.bootstrap_resamples < 100:
            raise ValueError(f"bootstrap_resamples: expected >= 100, got {self.bootstrap_resamples}")
        if self.report_samples_per_skill < 0:
            raise ValueError(f"report_samples_per_skill: expected >= 0, got {self.report_samples_per_skill}")
        if (self.tifa_questions or "").startswith(("http://", "https://")) and not self.tifa_questions_sha256:
            # Checked wherever the config is read (the controller, and a job run by hand).
            raise ValueError(
                f"tifa_questions is a URL ({self.tifa_questions}): give tifa_questions_sha256 too, so "
                "that what is downloaded is checked (and a changed file is not scored under the same "
                "settings)"
            )

    def keyed(self, skills: list[str]) -> EvalConfig:
        """This config as the output's key hashes it, for a pipeline of ``skills``: ``models`` that
        spell out the default list are the default (the same evaluation), and ``compare_experts``,
        which only the default list reads, is at its default when ``models`` is given."""
        for compare in (True, False):
            default = replace(self, models=None, compare_experts=compare)
            if self.models is not None and self.models == eval_variants(default, skills):
                return default
        if self.models is not None:
            return replace(self, compare_experts=EvalConfig.compare_experts)
        return self


def eval_variants(cfg: EvalConfig, skills: list[str]) -> list[str]:
    """The models compared, in report order (``base`` first when present: the baseline)."""
    if cfg.models is None:
        experts = [f"expert:{s}" for s in skills] if cfg.compare_experts else []
        return ["base", *experts, "merged"]
    for model in cfg.models:
        if model.startswith("expert:") and model.split(":", 1)[1] not in skills:
            raise ConfigError(f"eval.models: {model}: no such skill; skills: {', '.join(skills)}")
        if "@" in model:
            raise ConfigError(
                f"eval.models: {model}: a registry alias moves; jobs.submit resolves it to a version "
                "(models:/NAME/VERSION) before the jobs start"
            )
    return list(cfg.models)


def variant_slug(variant: str) -> str:
    """A file-name-safe form of a variant (``expert:counting`` -> ``expert_counting``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", variant.replace("models:/", "registry_"))


def _file_safe(prompt_id: str) -> str:
    """A file name for a prompt id: the id itself when it is safe, else its safe form and a short
    hash of it, so that two ids ("tifa160 1", "tifa160_1") never share one image file."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", prompt_id)
    return safe if safe == prompt_id else f"{safe}-{hashlib.sha256(prompt_id.encode()).hexdigest()[:8]}"


# -- models: the base pipeline and each variant's adapters ---------------------------------------


@contextlib.contextmanager
def loaded_adapters(pipe, name: str, adapters: list[tuple], allow_pickle: bool = False):
    """Adapters (folder, weight) loaded and combined with ``set_adapters`` inside the block
    (safetensors only, unless ``allow_pickle``)."""
    from selma_core.models.loading import weights_kwargs

    names = []
    try:
        for i, (path, _) in enumerate(adapters):
            names.append(f"{re.sub(r'[^A-Za-z0-9_]', '_', name)}_{i}")
            pipe.load_lora_weights(str(path), adapter_name=names[-1], **weights_kwargs(allow_pickle))
        if names:
            pipe.set_adapters(names, [weight for _, weight in adapters])
        yield pipe
    finally:
        if names:
            pipe.unload_lora_weights()


@dataclass
class Variant:
    """One model compared: its adapters over the base model, and what identifies its weights."""

    name: str
    adapters: list[tuple[Path, float]]
    identity: str  # the weights' content, for the image cache


def committed_weights(ctx, key: str, output_dir: Path, adapters: list[tuple[Path, float]]) -> str:
    """What identifies the weights of ``adapters`` (folders of the fetched output ``key``) for the
    image cache: their files' checksums in the output's manifest, and their weights. Not the key:
    a forced rerun commits other weights under the same key, whose images must be drawn anew."""
    from selma_core.lora import WEIGHT_NAME

    files = ctx.store.read_manifest(key)["files"]
    digest = hashlib.sha256()
    for folder, weight in adapters:
        name = (folder / WEIGHT_NAME).relative_to(output_dir).as_posix()
        if name not in files:
            raise InputError(f"{ctx.store.url(key)}: no {name} in its manifest")
        digest.update(f"{name}\0{files[name]['sha256']}\0{weight!r}\n".encode())
    return f"store-adapter:{digest.hexdigest()}"


def resolve_variant(ctx, variant: str, downloads: Path | None = None) -> Variant:
    """What a model compared is: its adapters and the identity of their weights. A registry model's
    adapter is downloaded into a fresh folder under ``downloads`` (default: the cache's
    ``registry/NAME/VERSION``), which the caller removes when done."""
    if variant == "base":
        return Variant(variant, [], "base")
    if variant.startswith("expert:"):
        skill = variant.split(":", 1)[1]
        expert_dir = ctx.fetch("train", skill)
        adapters = [(expert_dir, 1.0)]
        key = ctx.plan.job("train", skill).key
        return Variant(variant, adapters, committed_weights(ctx, key, expert_dir, adapters))
    if variant == "merged":
        merge_dir = ctx.fetch("merge")
        info = json.loads((merge_dir / "merge.json").read_text())
        if info["method"] == "adapters":  # experts side by side, combined with set_adapters
            experts = info["experts"]
            adapters = [(merge_dir / EXPERTS_DIR / s, experts[s]["weight"]) for s in experts]
        else:
            adapters = [(merge_dir / ADAPTER_DIR, 1.0)]
        key = ctx.plan.job("merge").key
        return Variant(variant, adapters, committed_weights(ctx, key, merge_dir, adapters))
    name, _, version = variant[len("models:/") :].partition("/")
    # A fresh folder per job: a download that died half-way is never mistaken for a whole one.
    parent = downloads or Path(ctx.config.cache_dir) / "registry" / name / version
    parent.mkdir(parents=True, exist_ok=True)
    model = ctx.run.download_registered_adapter(name, version, Path(tempfile.mkdtemp(dir=parent)))
    if model["base_model"] != ctx.config.base_model:
        raise InputError(
            f"eval.models: {variant} is an adapter for {model['base_model']!r}, not this pipeline's "
            f"base_model {ctx.config.base_model!r}"
        )
    trained_on, drawn_on = model.get("base_model_revision"), ctx.config.base_model_revision
    if trained_on and drawn_on and trained_on != drawn_on:
        raise InputError(
            f"eval.models: {variant} is an adapter for {model['base_model']!r} at revision {trained_on}, "
            f"not this pipeline's base_model_revision {drawn_on}"
        )
    adapter = Path(str(model["adapter_path"]))
    # By content: registries elsewhere (staging, a recreated database) reuse names and versions.
    files = sorted(p for p in (adapter.rglob("*") if adapter.is_dir() else [adapter]) if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(adapter) if adapter.is_dir() else path.name}\0".encode())
        digest.update(sha256_file(path).encode())
    return Variant(variant, [(adapter, 1.0)], f"registry-adapter:{digest.hexdigest()}")


# The last 12 bytes of every whole PNG: the empty IEND chunk and its CRC.
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


class ImageCache:
    """Evaluation images in the store, one PNG object per (weights, sampling settings, prompt, seed).

    Drawing is the slow part of an evaluation: another metric, benchmark cap or aggregation must not
    redraw what the same weights already drew for the same prompt and seed. Objects are written
    atomically (the store's ``write_bytes``); one that does not decode as an image is redrawn.
    """

    def __init__(self, store, settings: dict[str, Any]) -> None:
        self.store = store
        self.settings = settings
        self.hits = 0
        self.misses = 0

    def key(self, identity: str, prompt: str, seed: int) -> str:
        from selma_core.config import stable_hash

        digest = stable_hash({"weights": identity, "settings": self.settings, "prompt": prompt, "seed": seed})
        return f"{IMAGE_CACHE_PREFIX}/{digest[:2]}/{digest}.png"

    def get(self, key: str) -> bytes | None:
        from PIL import Image

        try:  # one request, and an object deleted between a check and the read is simply a miss
            data = self.store.read_bytes(key)
        except FileNotFoundError:
            return None
        # verify() checks every chunk's CRC up to IEND but stops there: a PNG cut inside its IEND
        # chunk passes it. The cache writes whole PNGs only, so one must end with the IEND chunk.
        if not data.endswith(PNG_END):
            return None
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
        except Exception:  # a damaged object: draw again (and overwrite it)
            return None
        return data

    def put(self, key: str, data: bytes) -> None:
        self.store.write_bytes(key, data)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class LazyPipeline:
    """The base diffusion pipeline, loaded on first use: a rerun whose images are all cached
    loads no model at all."""

    def __init__(self, ctx, device: str) -> None:
        self.ctx = ctx
        self.device = device
        self._pipe = None

    def get(self):
        if self._pipe is None:
            from selma_core.models.loading import load_diffusion_pipeline
            from selma_core.phases.images import torch_dtype

            cfg = self.ctx.config
            self._pipe = load_diffusion_pipeline(
                cfg.base_model,
                cfg.cache_dir,
                cfg.base_model_revision,
                torch_dtype(cfg.eval.dtype, self.device),
                allow_pickle=cfg.allow_pickle_checkpoints,
            ).to(self.device)
            if getattr(self._pipe, "unet", None) is not None:
                from selma_core.models import speed

                # SDPA, and channels_last on CUDA, as the images phase draws. No fused QKV
                # projections: each variant's LoRA adapters wrap the separate ones.
                speed.prepare_for_inference(self._pipe, self.device, fuse_qkv=False)
        return self._pipe


def draw_variant(
    ctx, variant: Variant, prompts, cache: ImageCache, pipeline: LazyPipeline, folder: Path
) -> dict[str, Path]:
    """``variant``'s image for every prompt, as a PNG file in ``folder``: from the cache, or drawn
    (and cached). Files, not bytes in memory: DSG-1k's 1,060 images for five models are gigabytes."""
    from tqdm import tqdm

    from selma_core.phases.images import draw_images, prompt_seed

    cfg: EvalConfig = ctx.config.eval
    folder.mkdir(parents=True, exist_ok=True)
    wanted = [
        (
            p,
            cache.key(variant.identity, p.text, prompt_seed(cfg.seed, p.prompt_id)),
            folder / f"{_file_safe(p.prompt_id)}.png",
        )
        for p in prompts
    ]

    def from_cache(item) -> bool:
        _, key, path = item
        data = cache.get(key)
        if data is not None:
            path.write_bytes(data)
        return data is not None

    # The store's requests side by side (storage.transfer_threads): a rerun of a large benchmark
    # reads thousands of cached images, each a round trip to the store.
    found = ctx.store.transfer_each(from_cache, wanted)
    paths = {p.prompt_id: path for (p, _, path), hit in zip(wanted, found, strict=True) if hit}
    missing = [item for item, hit in zip(wanted, found, strict=True) if not hit]
    cache.hits += len(paths)
    cache.misses += len(missing)
    if not missing:
        return paths

    def keep(drawn) -> None:  # PNG-encoded, saved and cached beside the other images of the batch
        (_, key, path), image = drawn
        data = _png(image)
        path.write_bytes(data)
        cache.put(key, data)

    pipe = pipeline.get()
    with (
        loaded_adapters(pipe, variant.name, variant.adapters, ctx.config.allow_pickle_checkpoints),
        tqdm(total=len(missing), desc=f"draw {variant.name}", unit="image") as bar,
    ):
        for first in range(0, len(missing), cfg.batch_size):
            batch = missing[first : first + cfg.batch_size]
            seeds = [prompt_seed(cfg.seed, p.prompt_id) for p, _, _ in batch]
            images = draw_images(pipe, [p.text for p, _, _ in batch], seeds, cfg, pipeline.device)
            ctx.store.transfer_each(keep, list(zip(batch, images, strict=True)))
            paths.update((p.prompt_id, path) for p, _, path in batch)
            bar.update(len(batch))
    fault_point("eval.after_variant")
    return paths


# -- scoring --------------------------------------------------------------------------------------


def load_eval_set(ctx, cfg: EvalConfig):
    from selma_core.metrics import eval_sets
    from selma_core.metrics.benchmarks import benchmark_file
    from selma_core.phases.prompts import read_prompts

    cap = cfg.max_prompts_per_skill
    if cfg.benchmark == "heldout":
        from selma_core.datasets import prompt_records

        def records_of(skill: str) -> list[dict]:
            # A dataset skill's held-out captions come from its dataset (no prompts job).
            return prompt_records(ctx, skill, read_prompts)

        return eval_sets.heldout_set(records_of, list(ctx.config.skills), cap)
    cache_dir = ctx.config.cache_dir
    if cfg.benchmark == "dsg1k":
        path = benchmark_file("dsg1k-annotations", path=cfg.dsg_annotations, cache_dir=cache_dir)
        return eval_sets.dsg1k_set(str(path), cap)
    if cfg.tifa_questions and cfg.tifa_questions.startswith(("http://", "https://")):
        source = cfg.tifa_questions  # read (and checked against tifa_questions_sha256) by load_questions
    else:
        source = str(
            benchmark_file(
                "tifa-v1-question-answers",
                path=cfg.tifa_questions,
                cache_dir=cache_dir,
                sha256=cfg.tifa_questions_sha256,
            )
        )
    return eval_sets.tifa_set(source, cfg.tifa_questions_sha256, cap)


def ask_in_chunks(backend, images: dict[str, Path], asked: list[tuple[str, str]]) -> list[str]:
    """The backend's answer to each (prompt id, question), its image read from ``images``, a chunk of
    prompts at a time: every question of an image goes in the same call (so its bytes are read and
    hashed once) and at most ``SCORE_CHUNK`` images are in memory."""
    answers: list[str] = []
    for first in range(0, len(asked), SCORE_CHUNK * 8):
        chunk = asked[first : first + SCORE_CHUNK * 8]
        data = {prompt_id: images[prompt_id].read_bytes() for prompt_id in dict.fromkeys(p for p, _ in chunk)}
        answers += backend.answer([data[p] for p, _ in chunk], [q for _, q in chunk])
    return answers


def question_scores(ctx, cfg: EvalConfig, eval_set, images: dict[str, dict[str, Path]], answer_cache, device):
    """DSG or TIFA per prompt and variant: ``({variant: {prompt id: score}}, {variant: figures},
    {variant: {prompt id: {question (DSG: its id): answer}}})``, the figures being the benchmark's
    own aggregate (DSG per category, TIFA average and per type)."""
    from selma_core.metrics.vqa import cached_backend, load_vqa_backend

    backend = cached_backend(
        load_vqa_backend(
            cfg.vqa_backend,
            cfg.vqa_model,
            ctx.config.cache_dir,
            device=device,
            allow_pickle=ctx.config.allow_pickle_checkpoints,
        ),
        answer_cache,
    )
    per_prompt: dict[str, dict[str, float]] = {}
    figures: dict[str, dict] = {}
    asked_and_answered: dict[str, dict[str, dict[str, str]]] = {}  # variant -> prompt -> question -> answer
    matcher = None
    for variant, paths in images.items():
        if eval_set.benchmark == "dsg1k":
            from selma_core.metrics.dsg import normalize_answer, score_dsg

            asked = [(item, q) for item in eval_set.dsg_items.values() for q in item.questions]
            answers = ask_in_chunks(backend, paths, [(item.item_id, q.text) for item, q in asked])
            result = score_dsg(
                eval_set.dsg_items,
                {
                    (item.item_id, q.question_id): normalize_answer(a)
                    for (item, q), a in zip(asked, answers, strict=True)
                },
                convention=cfg.dsg_convention,
            )
            per_prompt[variant] = dict(result.item_scores)
            figures[variant] = result.to_json()
            for (item, q), a in zip(asked, answers, strict=True):
                asked_and_answered.setdefault(variant, {}).setdefault(item.item_id, {})[
                    str(q.question_id)
                ] = a
        else:
            from selma_core.metrics.tifa import EmbeddingChoiceMatcher, ExactChoiceMatcher, score_tifa

            if matcher is None:
                matcher = (
                    EmbeddingChoiceMatcher.from_pretrained(
                        cfg.tifa_embedding_model, device=device, cache_dir=ctx.config.cache_dir
                    )
                    if cfg.tifa_matcher == "embedding"
                    else ExactChoiceMatcher()
                )
            questions = eval_set.tifa_questions
            answers = ask_in_chunks(backend, paths, [(q.prompt_id, q.question) for q in questions])
            result = score_tifa(
                questions,
                {(q.prompt_id, q.question): a for q, a in zip(questions, answers, strict=True)},
                matcher,
            )
            per_prompt[variant] = dict(result.prompt_scores)
            figures[variant] = {k: v for k, v in result.to_json().items() if k != "caption_scores"}
            for q, a in zip(questions, answers, strict=True):
                asked_and_answered.setdefault(variant, {}).setdefault(q.prompt_id, {})[q.question] = a
    return per_prompt, figures, asked_and_answered


def format_tables(results: dict) -> str:
    """Markdown: per metric, the means with intervals (skill rows, variant columns) and the paired
    differences against base."""
    variants = results["variants"]
    level = f"{100 * results.get('confidence', 0.95):g}%"
    lines: list[str] = [
        f"Mean [{level} bootstrap interval over prompts] per skill and model; differences are paired "
        "by prompt (same prompt, same seed).",
        "",
    ]
    for metric, info in results["metrics"].items():
        lines += [f"### {info['label']} ({info['scale']})", ""]
        lines += ["| skill | " + " | ".join(variants) + " |", "|" + "---|" * (len(variants) + 1)]
        for skill, row in results["summary"][metric].items():
            cells = [
                f"{row[v]['mean']:.3f} [{row[v]['low']:.3f}, {row[v]['high']:.3f}]" if v in row else "-"
                for v in variants
            ]
            lines.append(f"| {skill} | " + " | ".join(cells) + " |")
        others = [v for v in variants if any(v in row for row in results["paired"][metric].values())]
        if others:
            lines += ["", f"{metric}: difference vs base, [{level} interval], p", ""]
            lines += ["| skill | " + " | ".join(others) + " |", "|" + "---|" * (len(others) + 1)]
            for skill, row in results["paired"][metric].items():
                cells = [_difference_cell(row[v]) if v in row else "-" for v in others]
                lines.append(f"| {skill} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _difference_cell(diff: dict) -> str:
    p = "" if diff.get("p_value") is None else f" p={diff['p_value']:.3f}"
    return f"{diff['difference']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]{p}"


def evaluate(ctx, skill_name: str | None = None) -> dict:
    cfg: EvalConfig = ctx.config.eval
    start = time.monotonic()
    eval_set = load_eval_set(ctx, cfg)
    # Registry adapters downloaded for this job alone, removed when it ends.
    registry = Path(ctx.config.cache_dir) / "registry"
    registry.mkdir(parents=True, exist_ok=True)
    downloads = Path(tempfile.mkdtemp(prefix="eval-", dir=registry))
    try:
        return _evaluate(ctx, cfg, eval_set, downloads, start)
    finally:
        shutil.rmtree(downloads, ignore_errors=True)


def _evaluate(ctx, cfg: EvalConfig, eval_set, downloads: Path, start: float) -> dict:
    from selma_core.metrics.answer_cache import NotAResult, StoreBackedAnswerCache
    from selma_core.metrics.suite import IMAGE_TEXT_METRICS, CachedMetric, MetricInfo, open_metric
    from selma_core.metrics.summary import summarize
    from selma_core.models.loading import resolve_device
    from selma_core.phases.images import torch_dtype

    variants = [resolve_variant(ctx, v, downloads) for v in eval_variants(cfg, list(ctx.config.skills))]
    device = resolve_device(ctx.config.device)
    sampling = {
        "base_model": [ctx.config.base_model, ctx.config.base_model_revision],
        "steps": cfg.num_inference_steps,
        "guidance": cfg.guidance_scale,
        "size": [cfg.height, cfg.width],
        "dtype": str(torch_dtype(cfg.dtype, device)),
        "device": device.split(":")[0],
    }
    image_cache = ImageCache(ctx.store, sampling)
    pipeline = LazyPipeline(ctx, device)
    from selma_core.phases.images import prompt_seed

    rows = [
        {
            "variant": v.name,
            "skill": p.skill,
            "prompt_id": p.prompt_id,
            "prompt": p.text,
            "seed": prompt_seed(cfg.seed, p.prompt_id),
            "image": f"images/{variant_slug(v.name)}/{_file_safe(p.prompt_id)}.png",
            "scores": {},
        }
        for v in variants
        for p in eval_set.prompts
    ]
    metrics_info: dict[str, dict] = {}
    figures: dict[str, dict] = {}
    scratch = Path(ctx.config.cache_dir) / "answer-cache"
    # The answer cache is committed even if this job fails later: answers computed are still right.
    with StoreBackedAnswerCache(ctx.store, ANSWER_CACHE_KEY, scratch) as answer_cache, ctx.output() as out:
        images = {
            v.name: draw_variant(
                ctx, v, eval_set.prompts, image_cache, pipeline, out / "images" / variant_slug(v.name)
            )
            for v in variants
        }
        print(f"eval: {image_cache.hits} image(s) from the cache, {image_cache.misses} drawn", flush=True)
        for name in cfg.metrics:
            metric = CachedMetric(
                open_metric(name, cfg, ctx.config.cache_dir, device, ctx.config.allow_pickle_checkpoints),
                answer_cache,
            )
            for first in range(0, len(rows), SCORE_CHUNK):
                chunk = rows[first : first + SCORE_CHUNK]
                try:
                    scores = metric.score(
                        [images[r["variant"]][r["prompt_id"]].read_bytes() for r in chunk],
                        [r["prompt"] for r in chunk],
                    )
                except NotAResult as e:  # e.g. NaN from a model run in float16
                    row = chunk[e.position]
                    raise InputError(
                        f"eval: {name} ({metric.version.split('|')[0]}) on variant {row['variant']}, skill "
                        f"{row['skill']}, prompt {row['prompt_id']} ({row['prompt'][:60]!r}): {e}"
                    ) from e
                for row, score in zip(chunk, scores, strict=True):
                    row["scores"][name] = score
            metrics_info[name] = {**IMAGE_TEXT_METRICS[name].to_dict(), "model": metric.version.split("|")[0]}
            print(
                f"eval: {name}: {metric.computed} pair(s) scored, {len(rows) - metric.computed} cached",
                flush=True,
            )
        if eval_set.benchmark != "heldout":
            name = "dsg" if eval_set.benchmark == "dsg1k" else "tifa"
            per_prompt, figures, answers = question_scores(ctx, cfg, eval_set, images, answer_cache, device)
            for row in rows:
                row["scores"][name] = per_prompt[row["variant"]].get(row["prompt_id"])
                row["answers"] = answers[row["variant"]].get(row["prompt_id"], {})
            if name != "dsg":
                info = MetricInfo("TIFA", "prompt accuracy 0-1").to_dict()
            elif cfg.dsg_convention == "selma":
                # SELMA's figures pool each category's questions; the tables here average items (what
                # the intervals and paired differences resample), so they say so. The pooled figures
                # are results.json's benchmark_scores.
                info = MetricInfo("DSG (selma zeroing, mean of items)", "item score 0-1").to_dict()
            else:
                info = MetricInfo(f"DSG ({cfg.dsg_convention})", "item score 0-1").to_dict()
            if name == "dsg":
                info["convention"] = cfg.dsg_convention
            metrics_info = {name: {**info, "vqa_model": cfg.vqa_model}, **metrics_info}

        variant_names = [v.name for v in variants]
        summary, paired = summarize(
            rows,
            list(metrics_info),
            eval_set.skills,
            variant_names,
            baseline="base" if "base" in variant_names else None,
            confidence=cfg.confidence,
            resamples=cfg.bootstrap_resamples,
        )
        results = {
            "benchmark": eval_set.benchmark,
            "skills": eval_set.skills,
            "skill_of_group": eval_set.skill_of_group,
            "variants": variant_names,
            "metrics": metrics_info,
            "per_prompt": rows,
            "summary": summary,
            "paired": paired,
            "benchmark_scores": figures,
            "confidence": cfg.confidence,
            "bootstrap_resamples": cfg.bootstrap_resamples,
            "cache": {"images_cached": image_cache.hits, "images_drawn": image_cache.misses},
            "wall_s": round(time.monotonic() - start, 3),
        }
        report_files = _write_results(ctx, results, out)
    _track(ctx, results, report_files)
    return {"benchmark": eval_set.benchmark, "variants": variant_names, "summary": _means(results)}


def _means(results: dict) -> dict:
    """{metric: {skill: {variant: mean}}}: the short form printed and returned."""
    return {
        metric: {skill: {v: round(i["mean"], 4) for v, i in row.items()} for skill, row in by_skill.items()}
        for metric, by_skill in results["summary"].items()
    }


def _write_results(ctx, results: dict, out: Path) -> list[Path]:
    """results.json, results.md and the report into the output folder; the registered merged model
    tagged with its scores. Returns copies of the report files for MLflow, made outside the output
    folder (which is gone once committed)."""
    from selma_core.report import write_report

    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(format_tables(results))
    written = write_report(results, out, out, samples_per_skill=ctx.config.eval.report_samples_per_skill)
    _tag_registered_model(ctx, results)
    staged = Path(tempfile.mkdtemp(prefix="eval-report-", dir=ctx.scratch_dir))
    copies = []
    for path in [written["html"], *written["figures"]]:
        copies.append(staged / Path(path).relative_to(out))
        copies[-1].parent.mkdir(parents=True, exist_ok=True)
        copies[-1].write_bytes(Path(path).read_bytes())
    return copies


# What makes two versions' scores comparable: the same prompts, sampling and scorers. Which models
# were compared beside them, and how intervals are drawn, change no mean.
SETTINGS_TAG = "selma.eval.settings"
_NOT_SETTINGS = ("models", "compare_experts", "confidence", "bootstrap_resamples", "report_samples_per_skill")


def eval_settings_hash(cfg: EvalConfig) -> str:
    from selma_core.config import stable_hash
    from selma_core.typed_yaml import output_dict

    return stable_hash({k: v for k, v in output_dict(cfg).items() if k not in _NOT_SETTINGS})[:16]


# What makes two versions' scores comparable: per metric, the sampling and the metric's settings
# (selma.eval_settings.<metric>); per skill, the prompts scored (selma.eval_prompts.<skill>).
METRIC_SETTINGS_PREFIX = "selma.eval_settings."
PROMPTS_PREFIX = "selma.eval_prompts."
# The tags an evaluation owns on a registered version: replaced whole by the next one.
EVAL_TAG_PREFIXES = ("selma.eval.", METRIC_SETTINGS_PREFIX, PROMPTS_PREFIX)


def registered_model_tags(results: dict, cfg: EvalConfig, eval_key: str) -> dict[str, str]:
    """The merged model's scores as tags on its registry version (what ``jobs.promote`` compares),
    from a heldout evaluation's results: per metric and skill the merged model's mean, their mean,
    the base model's; and what makes scores comparable: per metric the sampling settings and the
    metric's own model and settings (nothing else of eval's), per skill the prompts scored (their
    ids and texts: another prompts job gives other prompts, and other scores for the same model).
    Per skill, so that a candidate with a new skill still compares on the skills it shares."""
    from selma_core.config import stable_hash
    from selma_core.plan import METRIC_SETTINGS

    prompts: dict[str, set] = {}
    for row in results["per_prompt"]:
        prompts.setdefault(row["skill"], set()).add((row["prompt_id"], row["prompt"]))
    tags = {"selma.eval.key": eval_key, SETTINGS_TAG: eval_settings_hash(cfg)}
    tags.update({PROMPTS_PREFIX + skill: stable_hash(sorted(rows)) for skill, rows in prompts.items()})
    sampling = {f.name: getattr(cfg, f.name) for f in fields(SamplingConfig) if f.name != "batch_size"}
    for metric, by_skill in results["summary"].items():
        merged = {s: row["merged"]["mean"] for s, row in by_skill.items() if s != "all" and "merged" in row}
        tags.update({f"selma.eval.{metric}.{s}": f"{v:.6f}" for s, v in merged.items()})
        if merged:
            tags[f"selma.eval.{metric}.mean"] = f"{sum(merged.values()) / len(merged):.6f}"
        base = {s: row["base"]["mean"] for s, row in by_skill.items() if s != "all" and "base" in row}
        if base:
            tags[f"selma.eval.base.{metric}.mean"] = f"{sum(base.values()) / len(base):.6f}"
        if metric in METRIC_SETTINGS:
            own = {name: getattr(cfg, name) for name in METRIC_SETTINGS[metric]}
            tags[METRIC_SETTINGS_PREFIX + metric] = stable_hash(
                {"metric": metric, "sampling": sampling, "settings": own}
            )
    return tags


def _tag_registered_model(ctx, results: dict) -> None:
    """The merged model's scores on its registry version: what ``jobs.promote`` compares. Tagged
    before the commit, so never lost; an earlier evaluation's tags are replaced whole. Only a
    version that is this pipeline's merged model (by its store key): after a registry reset, the
    version number merge.json names may be another model's."""
    from selma_core.tracking.base import TAG_STORE_KEY

    if "merged" not in results["variants"] or results["benchmark"] != "heldout":
        return
    merge_info = json.loads((ctx.fetch("merge") / "merge.json").read_text())
    registered = merge_info.get("registered")
    if not registered:
        return
    tags = registered_model_tags(results, ctx.config.eval, ctx.job.key)
    merge_key = ctx.plan.job("merge").key
    if not ctx.run.tag_model_version(
        registered["name"], registered["version"], tags, EVAL_TAG_PREFIXES, expect={TAG_STORE_KEY: merge_key}
    ):
        print(
            f"eval: {_not_this_merged_model(registered, merge_key, ctx.config.tracking.uri)}", file=sys.stderr
        )


def _not_this_merged_model(registered: dict, merge_key: str, registry: str) -> str:
    """The warning for a version merge.json names that, in ``registry``, is another model."""
    return (
        f"warning: {registered['name']} v{registered['version']} in {registry} is not this "
        f"pipeline's merged model ({merge_key}): not tagged with its scores (the merge registered it "
        "at another tracking server: jobs.submit --force merge registers it here)"
    )


def retag_registered_model(store, plan, cfg: EvalConfig, tracker) -> str | None:
    """After a skipped eval job: its committed results' tags back on the merged model's version,
    when another evaluation tagged it since (its tags are what promote compares, and they must be
    this evaluation's). Only that version is tagged: after a registry reset the number merge.json
    names may be another model's. What was done, to say; None when nothing was."""
    from selma_core.tracking.base import TAG_STORE_KEY

    eval_key, merge_key = plan.job("eval").key, plan.job("merge").key
    if cfg.benchmark != "heldout" or not store.is_committed(eval_key) or not store.is_committed(merge_key):
        return None
    registered = json.loads(store.read_output_file(merge_key, "merge.json")).get("registered")
    if not registered:
        return None
    version = tracker.model_version(registered["name"], version=registered["version"])
    if version is None or version.tags.get("selma.eval.key") == eval_key:
        return None
    results = json.loads(store.read_output_file(eval_key, "results.json"))
    if "merged" not in results["variants"]:
        return None
    tags = registered_model_tags(results, cfg, eval_key)
    if not tracker.set_model_version_tags(
        registered["name"], registered["version"], tags, EVAL_TAG_PREFIXES, expect={TAG_STORE_KEY: merge_key}
    ):
        return _not_this_merged_model(registered, merge_key, tracker.uri)
    return (
        f"{registered['name']} v{registered['version']}: its scores tagged again from this pipeline's "
        f"evaluation ({eval_key}, skipped: committed), replacing those of "
        f"{version.tags.get('selma.eval.key') or 'none'}"
    )


def _track(ctx, results: dict, report_files: list[Path]) -> None:
    metrics: dict[str, float] = {}
    for metric, by_skill in results["summary"].items():
        for skill, row in by_skill.items():
            for variant, interval in row.items():
                name = f"{metric}.{skill}.{variant.replace(':', '.').replace('/', '.')}"
                metrics[name] = interval["mean"]
                metrics[f"{name}.low"] = interval["low"]
                metrics[f"{name}.high"] = interval["high"]
        for skill, row in results["paired"][metric].items():
            for variant, diff in row.items():
                name = f"{metric}.{skill}.{variant.replace(':', '.').replace('/', '.')}.vs_base"
                metrics[name] = diff["difference"]
    ctx.run.log_metrics(metrics)
    ctx.run.log_dict(
        {
            k: results[k]
            for k in ("benchmark", "variants", "metrics", "summary", "paired", "benchmark_scores")
        },
        "eval/results_summary.json",
    )
    staged = report_files[0].parent
    try:
        for path in report_files:
            folder = path.parent.relative_to(staged)
            ctx.run.log_artifact(path, "eval" if str(folder) == "." else f"eval/{folder.as_posix()}")
    finally:
        shutil.rmtree(staged, ignore_errors=True)


# -- what merge-search shares with eval ----------------------------------------------------------


def load_heldout(ctx, skills: list[str], cap: int | None) -> dict[str, list[dict]]:
    """Each skill's held-out prompts (never trained on), at most ``cap`` of them: a generated skill's
    held-out split, a dataset skill's held-out captions (``selma_core.datasets.split_dataset``)."""
    from selma_core.datasets import prompt_records
    from selma_core.phases.prompts import read_prompts

    heldout: dict[str, list[dict]] = {}
    for skill in skills:
        records = [r for r in prompt_records(ctx, skill, read_prompts) if r["split"] == "heldout"]
        if not records:
            raise InputError(f"{ctx.job.id}: skill {skill!r} has no held-out prompts")
        heldout[skill] = records[:cap] if cap else records
    return heldout


def open_eval_models(ctx, metric: str = "clip_score"):
    """The base pipeline and the image-text ``metric`` (with the eval section's model), on the job's
    device."""
    from selma_core.metrics.suite import open_metric
    from selma_core.models.loading import resolve_device

    cfg = ctx.config
    device = resolve_device(cfg.device)
    scorer = open_metric(metric, cfg.eval, cfg.cache_dir, device, cfg.allow_pickle_checkpoints)
    return LazyPipeline(ctx, device).get(), scorer, device


def draw_and_score(pipe, scorer, heldout: dict[str, list[dict]], cfg: EvalConfig, device: str) -> list[dict]:
    """One image per held-out prompt (seeded by prompt id, so every model gets the same noise) and
    its ``scorer`` score; a row per prompt."""
    from selma_core.phases.images import draw_images, prompt_seed

    rows = []
    for skill, records in heldout.items():
        for first in range(0, len(records), cfg.batch_size):
            batch = records[first : first + cfg.batch_size]
            texts = [r["text"] for r in batch]
            images = draw_images(pipe, texts, [prompt_seed(cfg.seed, r["id"]) for r in batch], cfg, device)
            for record, score in zip(batch, scorer.score(images, texts), strict=True):
                if not math.isfinite(score):  # a NaN would win (or lose) every comparison silently
                    raise InputError(
                        f"{type(scorer).__name__} scored {score} on skill {skill}, prompt {record['id']} "
                        f"({record['text'][:60]!r}): not a score (e.g. a model run in float16 overflowing)"
                    )
                rows.append(
                    {"skill": skill, "prompt_id": record["id"], "prompt": record["text"], "score": score}
                )
    return rows
