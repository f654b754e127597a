"""Phase 4, merge: the skill experts become one multi-skill adapter, ΔW = Σ wᵢ·sᵢ·BᵢAᵢ.

Recipe, one job:
1. Read every skill's committed expert; check weights and layers before touching tensors
   (``selma_core.merging.check_merge_inputs``).
2. Merge exactly (factor concatenation, see ``selma_core.merging``); ``weights`` per skill default
   to 1/N.
3. Register the merged adapter in the MLflow model registry under the pipeline's registered-model
   name, with MLflow's diffusers LoRA flavor, and point the ``alias`` (``candidate``) at it; then
   commit it to the store in diffusers' LoRA format with ``merge.json``. Registration comes first so
   that a committed merge is always a registered one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from selma_core.errors import ConfigError


@dataclass
class MergeConfig:
    # "linear": SELMA's merge, exact (the merged adapter has rank Σ rᵢ).
    method: Literal["linear"] = "linear"
    # Weight per skill name; None: 1/N each.
    weights: dict[str, float] | None = None
    # Register the merged adapter in the MLflow model registry, with this alias.
    register: bool = True
    alias: str = "candidate"


def resolve_weights(cfg: MergeConfig, skills: list[str]) -> list[float] | None:
    if cfg.weights is None:
        return None
    unknown = sorted(set(cfg.weights) - set(skills))
    if unknown:
        raise ConfigError(
            f"merge.weights: unknown skill {unknown[0]!r}; the pipeline's skills: {', '.join(skills)}"
        )
    missing = [s for s in skills if s not in cfg.weights]
    if missing:
        raise ConfigError(
            f"merge.weights: no weight for skill {missing[0]!r}; give one for each of {', '.join(skills)}"
        )
    return [cfg.weights[s] for s in skills]


def merge_skill_experts(ctx, skill_name: str | None = None) -> dict:
    from selma_core.lora import load_adapter, save_adapter
    from selma_core.merging import merge_experts
    from selma_core.models.loading import resolve_model_path
    from selma_core.tracking import TAG_CONFIG_HASH

    cfg: MergeConfig = ctx.config.merge
    skills = list(ctx.config.skills)
    weights = resolve_weights(cfg, skills)
    experts = {s: load_adapter(ctx.fetch("train", s)) for s in skills}
    merged = merge_experts(experts, weights)
    used = weights or [1.0 / len(skills)] * len(skills)
    summary = {
        "method": cfg.method,
        "experts": {
            s: {
                "key": ctx.plan.job("train", s).key,
                "weight": w,
                "rank": experts[s].rank,
                "scale": experts[s].scale,
            }
            for s, w in zip(skills, used, strict=True)
        },
        "rank": merged.rank,
        "base_model": ctx.config.base_model,
    }
    with ctx.output() as out:
        save_adapter(merged, out)
        if cfg.register:
            # The registry's base model must be loadable by MLflow's loader: a hub id or a local folder.
            base = resolve_model_path(ctx.config.base_model, ctx.config.cache_dir)
            version = ctx.run.register_lora_adapter(
                out,
                base_model=base,
                model_name=ctx.config.registered_model_name,
                alias=cfg.alias,
                tags={
                    "selma.store_key": ctx.job.key,
                    TAG_CONFIG_HASH: ctx.config.config_hash(),
                    "selma.skills": ",".join(skills),
                    "selma.base_model": ctx.config.base_model,
                },
            )
            summary["registered"] = {
                "name": ctx.config.registered_model_name,
                "version": version,
                "alias": cfg.alias,
            }
        (out / "merge.json").write_text(json.dumps(summary, indent=1))
    ctx.run.log_params(
        {
            "merge.method": cfg.method,
            "merge.rank": merged.rank,
            **{f"merge.weight.{s}": w for s, w in zip(skills, used, strict=True)},
        }
    )
    return summary
