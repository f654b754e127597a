"""Phase 5, eval: base model vs each expert vs the merged model, on every skill's held-out prompts.

Recipe, one job:
1. Read each skill's held-out prompts (never trained on), at most ``max_prompts_per_skill``.
2. For each model variant (``base``, ``expert:<skill>`` for every skill, ``merged``), draw one image
   per prompt with the same per-prompt seeds, so the comparison is paired.
3. Score each image against its prompt with CLIPScore (``clip_model``).
4. Commit ``results.json`` (per-skill mean per variant, and every per-prompt score), ``results.md``
   (the table) and the images; log ``clip_score.<skill>.<variant>`` to MLflow.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass

from selma_core.errors import InputError
from selma_core.phases.images import SamplingConfig
from selma_core.phases.merge import ADAPTER_DIR, EXPERTS_DIR


@dataclass
class EvalConfig(SamplingConfig):
    """Sampling settings (as in ``images``) for the evaluation images, plus what to score."""

    # CLIP model for CLIPScore: hub id, local folder, or random:tiny-clip (tests).
    clip_model: str = "openai/clip-vit-large-patch14"
    # Seeds distinct from the training images' (the same prompt id gets another image).
    seed: int = 1000
    # Cap on held-out prompts scored per skill (None: all of them).
    max_prompts_per_skill: int | None = None
    # Also score each single-skill expert (SELMA's per-skill comparison); costs one pass per skill.
    compare_experts: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_prompts_per_skill is not None and self.max_prompts_per_skill < 1:
            raise ValueError(f"max_prompts_per_skill: expected >= 1, got {self.max_prompts_per_skill}")


def format_table(table: dict[str, dict[str, float]], variants: list[str]) -> str:
    """A Markdown table: one row per skill, one column per variant, plus the mean row."""
    header = "| skill | " + " | ".join(variants) + " |"
    lines = [header, "|" + "---|" * (len(variants) + 1)]
    for skill, row in table.items():
        lines.append(f"| {skill} | " + " | ".join(f"{row[v]:.2f}" for v in variants) + " |")
    return "\n".join(lines)


def load_heldout(ctx, skills: list[str], cap: int | None) -> dict[str, list[dict]]:
    """Each skill's held-out prompts (never trained on), at most ``cap`` of them."""
    from selma_core.phases.prompts import read_prompts

    heldout: dict[str, list[dict]] = {}
    for skill in skills:
        records = [
            r for r in read_prompts(ctx.fetch("prompts", skill) / "prompts.jsonl") if r["split"] == "heldout"
        ]
        if not records:
            raise InputError(f"{ctx.job.id}: skill {skill!r} has no held-out prompts")
        heldout[skill] = records[:cap] if cap else records
    return heldout


def open_eval_models(ctx):
    """The base pipeline and the CLIP scorer, on the job's device."""
    from selma_core.metrics.clip_score import ClipScorer
    from selma_core.models.loading import load_diffusion_pipeline, resolve_device
    from selma_core.phases.images import torch_dtype

    cfg: EvalConfig = ctx.config.eval
    device = resolve_device(ctx.config.device)
    pipe = load_diffusion_pipeline(
        ctx.config.base_model,
        ctx.config.cache_dir,
        ctx.config.base_model_revision,
        torch_dtype(cfg.dtype, device),
        allow_pickle=ctx.config.allow_pickle_checkpoints,
    ).to(device)
    return pipe, ClipScorer(cfg.clip_model, ctx.config.cache_dir, device), device


@contextlib.contextmanager
def loaded_adapters(pipe, name: str, adapters: list[tuple], allow_pickle: bool = False):
    """Adapters (folder, weight) loaded and combined with ``set_adapters`` inside the block
    (safetensors only, unless ``allow_pickle``)."""
    from selma_core.models.loading import weights_kwargs

    names = []
    try:
        for i, (path, _) in enumerate(adapters):
            names.append(f"{name.replace(':', '_')}_{i}")
            pipe.load_lora_weights(str(path), adapter_name=names[-1], **weights_kwargs(allow_pickle))
        if names:
            pipe.set_adapters(names, [weight for _, weight in adapters])
        yield pipe
    finally:
        if names:
            pipe.unload_lora_weights()


def draw_and_score(pipe, scorer, heldout: dict[str, list[dict]], cfg: EvalConfig, device: str, save_dir=None):
    """One image per held-out prompt (seeded by prompt id, so every model gets the same noise) and
    its CLIPScore; a row per prompt."""
    from selma_core.phases.images import draw_images, prompt_seed

    rows = []
    for skill, records in heldout.items():
        for first in range(0, len(records), cfg.batch_size):
            batch = records[first : first + cfg.batch_size]
            texts = [r["text"] for r in batch]
            images = draw_images(pipe, texts, [prompt_seed(cfg.seed, r["id"]) for r in batch], cfg, device)
            for record, image, score in zip(batch, images, scorer.score(images, texts), strict=True):
                if save_dir is not None:
                    save_dir.mkdir(parents=True, exist_ok=True)
                    image.save(save_dir / f"{record['id']}.png")
                rows.append(
                    {"skill": skill, "prompt_id": record["id"], "prompt": record["text"], "clip_score": score}
                )
    return rows


def evaluate(ctx, skill_name: str | None = None) -> dict:
    from tqdm import tqdm

    cfg: EvalConfig = ctx.config.eval
    skills = list(ctx.config.skills)
    heldout = load_heldout(ctx, skills, cfg.max_prompts_per_skill)

    merge_dir = ctx.fetch("merge")
    merge_info = json.loads((merge_dir / "merge.json").read_text())
    # Each variant: the adapters to load, and their weights.
    adapters: dict[str, list[tuple]] = {"base": []}
    if cfg.compare_experts:
        adapters.update({f"expert:{s}": [(ctx.fetch("train", s), 1.0)] for s in skills})
    if merge_info["method"] == "adapters":  # experts side by side, combined with set_adapters
        experts = merge_info["experts"]
        adapters["merged"] = [(merge_dir / EXPERTS_DIR / s, experts[s]["weight"]) for s in skills]
    else:
        adapters["merged"] = [(merge_dir / ADAPTER_DIR, 1.0)]
    variants = list(adapters)

    pipe, scorer, device = open_eval_models(ctx)
    start = time.monotonic()
    rows = []
    with ctx.output() as out:
        for variant in tqdm(variants, desc="eval", unit="model"):
            with loaded_adapters(pipe, variant, adapters[variant], ctx.config.allow_pickle_checkpoints):
                folder = out / "images" / variant.replace(":", "_")
                rows += [
                    {"variant": variant, **row}
                    for row in draw_and_score(pipe, scorer, heldout, cfg, device, folder)
                ]
        table = {
            skill: {
                v: sum(r["clip_score"] for r in rows if r["skill"] == skill and r["variant"] == v)
                / len(heldout[skill])
                for v in variants
            }
            for skill in skills
        }
        table["mean"] = {v: sum(table[s][v] for s in skills) / len(skills) for v in variants}
        results = {
            "metric": "clip_score",
            "clip_model": cfg.clip_model,
            "variants": variants,
            "table": table,
            "per_prompt": rows,
            "wall_s": round(time.monotonic() - start, 3),
        }
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text(format_table(table, variants) + "\n")
        registered = merge_info.get("registered")
        if registered:  # the scores promotion compares; tagged before the commit, so never lost
            scores = {
                f"selma.eval.clip_score.{skill}": f"{row['merged']:.6f}" for skill, row in table.items()
            }
            scores["selma.eval.base.clip_score.mean"] = f"{table['mean']['base']:.6f}"
            scores["selma.eval.key"] = ctx.job.key
            ctx.run.tag_model_version(registered["name"], registered["version"], scores)
    ctx.run.log_metrics(
        {
            f"clip_score.{skill}.{v.replace(':', '.')}": score
            for skill, row in table.items()
            for v, score in row.items()
        }
    )
    ctx.run.log_dict({"variants": variants, "table": table}, "eval/results_table.json")
    return {"table": table, "variants": variants}
