"""Phase 4, merge: the skill experts become one multi-skill model.

Recipe, one job:
1. Read every skill's committed expert; check weights and layers before touching any tensor.
2. Merge by ``method``:
   - ``linear`` (SELMA, the default): ΔW = Σ wᵢ·sᵢ·BᵢAᵢ, wᵢ = 1/N unless ``weights`` are given
     (sᵢ each expert's alpha/rank scale). ``export: exact`` concatenates the experts' factors (rank
     Σrᵢ, no error); ``export: svd`` truncates each layer's ΔW to ``export_rank``.
   - ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: applied to
     each layer's full ΔW (peft's merge utilities), then factorized by SVD: full rank for
     ``exact``, ``export_rank`` for ``svd``. Default weights: 1 for ties/dare_ties (their disjoint
     mean already averages), 1/N for the others.
   - ``adapters``: no merged weights; the experts are kept side by side and combined at inference
     with diffusers' ``set_adapters(names, weights)``, as SELMA's own inference did.
   Each layer's and the total relative Frobenius error of the export are reported.
3. Also write the merged adapter in the kohya/A1111 key format (``export_kohya``) for ComfyUI and
   WebUI users, and optionally (``export_fused``) a whole pipeline with the LoRA fused into the UNet.
4. Register the merged adapter in the MLflow model registry (diffusers LoRA flavor) under the
   pipeline's registered-model name and point ``alias`` (``candidate``) at it, then commit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Literal

from selma_core.errors import ConfigError
from selma_core.faults import fault_point
from selma_core.typed_yaml import execution_only

ADAPTER_DIR = "adapter"  # the merged adapter, diffusers' LoRA format
KOHYA_FILE = "kohya/selma_merged_lora.safetensors"
FUSED_DIR = "fused"
EXPERTS_DIR = "experts"  # method "adapters": each expert, as trained


@dataclass
class MergeConfig:
    # "linear" is SELMA's merge; the others merge each layer's full ΔW; "adapters" keeps the experts apart.
    method: Literal[
        "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "adapters"
    ] = "linear"
    # Weight per skill name; None: the method's default (see the module docstring).
    weights: dict[str, float] | None = None
    # Share of each ΔW kept by ties, dare_* and magnitude_prune.
    density: float = 0.5
    majority_sign_method: Literal["total", "frequency"] = "total"
    # "exact": no approximation; "svd": each layer truncated to export_rank (smaller files).
    export: Literal["exact", "svd"] = "exact"
    export_rank: int | None = None
    export_kohya: bool = True
    # A full pipeline with the merged LoRA fused into the UNet (as large as the base model).
    export_fused: bool = False
    # DARE's random drops.
    seed: int = 0
    # Register the merged adapter in the MLflow model registry, with this alias.
    register: bool = execution_only(True)
    alias: str = execution_only("candidate")

    def __post_init__(self) -> None:
        for skill, weight in (self.weights or {}).items():
            if not math.isfinite(weight):  # YAML reads .nan and .inf as floats: an all-NaN adapter
                raise ValueError(f"weights: {skill}: expected a finite number, got {weight}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density: expected a number in (0, 1], got {self.density}")
        if self.export == "svd" and (self.export_rank is None or self.export_rank < 1):
            raise ValueError("export: svd needs export_rank, a positive rank to truncate each layer to")
        if not isinstance(self.alias, str) or not re.fullmatch(r"[\w-]{1,255}", self.alias):
            # MLflow's own rule for alias names, checked only once the version is registered.
            raise ValueError(
                f"alias: expected letters, digits, '_' and '-' (at most 255), got {self.alias!r}"
            )
        if self.alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", self.alias):
            # MLflow refuses these, and only after the version is registered: the job would fail then.
            raise ValueError(f"alias: {self.alias!r} is reserved by MLflow's registry (latest, v<N>)")
        if self.alias in ("champion", "previous"):
            raise ValueError(
                f"alias: {self.alias!r} is jobs.promote's: a merge pointing it at each new version would "
                "skip the promotion gate; use another name (default: candidate)"
            )
        if self.method == "adapters" and (self.export == "svd" or self.export_fused):
            raise ValueError(
                "method: adapters keeps the experts apart; export svd/fused need a merged method"
            )

    def keyed(self) -> MergeConfig:
        """This config as the output's key hashes it: the settings ``method`` and ``export`` do not
        read at their defaults, so editing them redoes no merge (and registers no new version)."""
        defaults = MergeConfig()
        unread: dict = {}
        if self.method not in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
            unread["density"] = defaults.density
        if self.method not in ("ties", "dare_ties"):
            unread["majority_sign_method"] = defaults.majority_sign_method
        if not self.method.startswith("dare_"):  # the only random merges
            unread["seed"] = defaults.seed
        if self.export != "svd":
            unread["export_rank"] = defaults.export_rank
        return dataclasses.replace(self, **unread)


def resolve_weights(cfg: MergeConfig, skills: list[str]) -> list[float]:
    """The weight of each skill's expert, checked: known skills only, one for each, signs allowed."""
    from selma_core.merging import NONNEGATIVE_METHODS

    if cfg.weights is None:
        default = 1.0 if cfg.method in ("ties", "dare_ties") else 1.0 / len(skills)
        return [default] * len(skills)
    if not cfg.weights:
        raise ConfigError("merge.weights: an empty mapping; give a weight per skill or leave it out")
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
    if cfg.method in NONNEGATIVE_METHODS:
        negative = [s for s in skills if cfg.weights[s] < 0]
        if negative:
            raise ConfigError(
                f"merge.weights: {negative[0]!r} is negative, which method {cfg.method} does not allow"
            )
    return [cfg.weights[s] for s in skills]


def merge_adapters(experts: dict, cfg: MergeConfig, weights: list[float]):
    """The merged adapter and its report (no I/O)."""
    import torch

    from selma_core.merging import (
        MergeReport,
        adapter_from_deltas,
        check_merge_inputs,
        merge_experts,
        merge_layer_deltas,
    )

    check_merge_inputs(experts, weights)
    if cfg.method == "linear":
        merged = merge_experts(experts, weights)
        if cfg.export == "exact":
            zero = {module: 0.0 for module in merged.layers}
            return merged, MergeReport(rank=merged.rank, layer_errors=zero, total_error=0.0)
        deltas = {module: merged.delta(module) for module in merged.layers}
        return adapter_from_deltas(deltas, cfg.export_rank, merged.config)
    adapters = list(experts.values())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # DARE's drops are random: the same seed, the same merge
        deltas = {
            module: merge_layer_deltas(
                cfg.method,
                [a.delta(module) for a in adapters],
                weights,
                cfg.density,
                cfg.majority_sign_method,
            )
            for module in adapters[0].layers
        }
    rank = cfg.export_rank if cfg.export == "svd" else None
    return adapter_from_deltas(deltas, rank, adapters[0].config)


def export_kohya(adapter, path) -> None:
    """The kohya/A1111 key format (``lora_unet_..._to_q.lora_down.weight``), without ``.alpha``
    entries: each layer's scale is folded into its up factor, and a file without alphas is read at
    scale 1 everywhere (kohya, A1111, ComfyUI, diffusers). With per-layer alphas, diffusers reads
    layers whose rank differs from the most common one at the wrong scale (a ΔW merge exports
    each layer at its own rank)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    from selma_core.lora import canonical_safetensors

    peft_state = {}
    for module, layer in adapter.layers.items():
        peft_state[f"{module}.lora_A.weight"] = layer.down.float().contiguous()
        peft_state[f"{module}.lora_B.weight"] = (adapter.layer_scale(module) * layer.up.float()).contiguous()
    state = {
        k: v.contiguous()
        for k, v in convert_state_dict_to_kohya(peft_state).items()
        if not k.endswith(".alpha")
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"ss_network_module": "networks.lora", "format": "pt"})
    canonical_safetensors(path)


def export_fused(
    base_model: str, cache_dir: str, revision: str | None, adapter_dir, path, allow_pickle: bool = False
) -> None:
    """The base pipeline with the merged LoRA fused into its UNet, saved with ``save_pretrained``."""
    from selma_core.models.loading import load_diffusion_pipeline, weights_kwargs

    pipe = load_diffusion_pipeline(base_model, cache_dir, revision, allow_pickle=allow_pickle)
    pipe.load_lora_weights(str(adapter_dir), **weights_kwargs(allow_pickle))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    pipe.save_pretrained(str(path))


def merge_skill_experts(ctx, skill_name: str | None = None) -> dict:
    import shutil

    from selma_core.lora import WEIGHT_NAME, load_adapter, save_adapter
    from selma_core.models.loading import resolve_model_path
    from selma_core.storage.base import sha256_file
    from selma_core.tracking import TAG_CONFIG_HASH
    from selma_core.tracking.base import TAG_ADAPTER_SHA256, TAG_STORE_KEY

    cfg: MergeConfig = ctx.config.merge
    skills = list(ctx.config.skills)
    if any(ctx.plan.jobs[dep].phase == "merge-search" for dep in ctx.job.deps):
        # merge.weights unset and a weight search ran: its best weights.
        search = json.loads(ctx.store.read_output_file(ctx.plan.job("merge-search").key, "search.json"))
        weights = [search["best"]["weights"][s] for s in skills]
    else:
        weights = resolve_weights(cfg, skills)
    expert_dirs = {s: ctx.fetch("train", s) for s in skills}
    allow_pickle = ctx.config.allow_pickle_checkpoints
    experts = {s: load_adapter(path, allow_pickle) for s, path in expert_dirs.items()}
    summary: dict = {
        "method": cfg.method,
        "experts": {
            s: {
                "key": ctx.plan.job("train", s).key,
                "weight": w,
                "rank": experts[s].rank,
                "scale": experts[s].scale,
            }
            for s, w in zip(skills, weights, strict=True)
        },
        "base_model": ctx.config.base_model,
    }
    with ctx.output() as out:
        if cfg.method == "adapters":
            from selma_core.merging import check_merge_inputs

            check_merge_inputs(experts, weights)
            for skill, path in expert_dirs.items():
                (out / EXPERTS_DIR / skill).mkdir(parents=True)
                shutil.copyfile(path / WEIGHT_NAME, out / EXPERTS_DIR / skill / WEIGHT_NAME)
        else:
            merged, report = merge_adapters(experts, cfg, weights)
            save_adapter(merged, out / ADAPTER_DIR)
            summary.update(
                rank=report.rank,
                export=cfg.export,
                total_relative_error=report.total_error,
                layer_relative_errors=report.layer_errors,
            )
            if cfg.export_kohya:
                export_kohya(merged, out / KOHYA_FILE)
            if cfg.export_fused:
                export_fused(
                    ctx.config.base_model,
                    ctx.config.cache_dir,
                    ctx.config.base_model_revision,
                    out / ADAPTER_DIR,
                    out / FUSED_DIR,
                    allow_pickle,
                )
            if cfg.register:
                # The registry's base model must be loadable by MLflow's loader: a hub id or a folder.
                base = resolve_model_path(ctx.config.base_model, ctx.config.cache_dir)
                version = ctx.run.register_lora_adapter(
                    out / ADAPTER_DIR,
                    base_model=base,
                    model_name=ctx.config.registered_model_name,
                    alias=cfg.alias,
                    base_model_revision=ctx.config.base_model_revision,
                    tags={
                        TAG_STORE_KEY: ctx.job.key,
                        TAG_CONFIG_HASH: ctx.config.config_hash(),
                        "selma.skills": ",".join(skills),
                        "selma.base_model": ctx.config.base_model,
                        "selma.base_model_revision": ctx.config.base_model_revision or "",
                        "selma.merge_method": cfg.method,
                        # What makes a version the same adapter: a forced rerun commits other
                        # weights under the same key, and must not reuse the version of the old ones.
                        TAG_ADAPTER_SHA256: sha256_file(out / ADAPTER_DIR / WEIGHT_NAME),
                    },
                )
                summary["registered"] = {
                    "name": ctx.config.registered_model_name,
                    "version": version,
                    "alias": cfg.alias,
                }
        (out / "merge.json").write_text(json.dumps(summary, indent=1))
        fault_point("merge.before_commit")
    metrics = {f"merge.weight.{s}": w for s, w in zip(skills, weights, strict=True)}
    if "total_relative_error" in summary:
        metrics.update(
            {"merge.rank": summary["rank"], "merge.total_relative_error": summary["total_relative_error"]}
        )
    ctx.run.log_metrics(metrics)
    return {k: v for k, v in summary.items() if k != "layer_relative_errors"}
