"""Expert training on random test models: the loss is finite, the LoRA moves, the adapter loads."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from graph_helpers import FailingBackend, ReplayingBackend
from PIL import Image
from train_helpers import tiny_train_config

from selma_core.lora import load_adapter
from selma_core.models.loading import load_diffusion_pipeline
from selma_core.phases.images import ImagesConfig, draw_images
from selma_core.phases.train import ExpertTrainer, TrainConfig, _weight_dtype

PROMPTS = ["two red apples on a table", "a cat to the left of a box", "three cups in a row"]


def tiny_dataset(model_cache, spec: str = "random:tiny-sd") -> list[tuple[dict, bytes]]:
    pipe = load_diffusion_pipeline(spec, model_cache)
    cfg = ImagesConfig(num_inference_steps=2, height=32, width=32)
    images = draw_images(pipe, PROMPTS, [1, 2, 3], cfg, "cpu")
    data = []
    for i, (prompt, image) in enumerate(zip(PROMPTS, images, strict=True)):
        buf = io.BytesIO()
        image.save(buf, format="JPEG")
        data.append(({"id": f"s-{i}", "prompt": prompt}, buf.getvalue()))
    return data


def train(model_cache, spec: str, steps: int = 3, graph_backend=None, **overrides):
    cfg = tiny_train_config(steps=steps, **overrides)
    torch.manual_seed(0)
    trainer = ExpertTrainer(load_diffusion_pipeline(spec, model_cache), cfg, "cpu")
    trainer.graph_backend = graph_backend  # a stand-in for the GPU's CUDA graph (tests/graph_helpers.py)
    if graph_backend is not None:
        graph_backend.grads_of = trainer.params
    history = trainer.train(tiny_dataset(model_cache, spec))
    return trainer, history


def adapter_tensors(trainer) -> dict:
    return {name: p.detach().clone() for name, p in zip(trainer.param_names, trainer.params, strict=True)}


@pytest.mark.parametrize("spec", ["random:tiny-sd", "random:tiny-sd-v", "random:tiny-sdxl"])
def test_expert_trains_and_its_adapter_loads_in_diffusers(tmp_path, model_cache, spec):
    trainer, history = train(model_cache, spec)
    assert [step for step, _ in history] == [1, 2, 3]
    assert all(np.isfinite(loss) and loss > 0 for _, loss in history)
    trainer.save(tmp_path / "adapter")
    adapter = load_adapter(tmp_path / "adapter")
    assert adapter.rank == 2 and adapter.scale == 2.0
    # Gaussian init starts B at zero; after training the update is non-zero.
    assert max(float(adapter.delta(m).abs().max()) for m in adapter.layers) > 0

    pipe = load_diffusion_pipeline(spec, model_cache)
    cfg = ImagesConfig(num_inference_steps=2, height=32, width=32)
    base = np.asarray(draw_images(pipe, PROMPTS[:1], [7], cfg, "cpu")[0], dtype=np.int16)
    pipe.load_lora_weights(str(tmp_path / "adapter"))
    adapted = np.asarray(draw_images(pipe, PROMPTS[:1], [7], cfg, "cpu")[0], dtype=np.int16)
    assert np.abs(base - adapted).max() > 0


def test_training_is_deterministic_for_a_seed(tmp_path, model_cache):
    a, _ = train(model_cache, "random:tiny-sd", steps=2)
    b, _ = train(model_cache, "random:tiny-sd", steps=2)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    ea, eb = load_adapter(tmp_path / "a"), load_adapter(tmp_path / "b")
    for module in ea.layers:
        torch.testing.assert_close(ea.delta(module), eb.delta(module), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("spec", "batches"), [("random:tiny-sd", (16, 4)), ("random:tiny-sdxl", (4, 8))], ids=["sd", "sdxl"]
)
def test_selmas_recipe_is_the_default(model_cache, spec, batches):
    """A config that sets nothing trains SELMA's way: LoRA rank = alpha = 128, Gaussian init, on the
    UNet's attention projections alone; AdamW 3e-4 constant, decay 1e-2, eps 1e-8, clipping 1.0;
    5,000 steps of 16 x 4 (SDXL: 4 x 8) images; no flips."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    cfg = TrainConfig()
    assert (cfg.rank, cfg.alpha, cfg.steps, cfg.max_grad_norm, cfg.random_flip) == (
        128,
        128,
        5000,
        1.0,
        False,
    )
    assert cfg.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert (cfg.batch_size, cfg.gradient_accumulation) == (None, None)  # SELMA's for the model
    # Frozen weights in bf16 on a GPU; on the CPU float32, the tests' bit-for-bit reference.
    assert _weight_dtype(cfg, "cuda:0") is torch.bfloat16 and _weight_dtype(cfg, "cpu") is torch.float32

    pipe = load_diffusion_pipeline(spec, model_cache)
    pipe.unet.set_attn_processor(AttnProcessor())  # a model saved with the slow classic attention
    trainer = ExpertTrainer(pipe, cfg, "cpu")
    assert (trainer.cfg.batch_size, trainer.cfg.gradient_accumulation) == batches
    lora = trainer.lora_config
    assert (lora.r, lora.lora_alpha, lora.init_lora_weights) == (128, 128, "gaussian")
    assert set(lora.target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}
    assert type(trainer.optimizer) is torch.optim.AdamW
    defaults = trainer.optimizer.defaults
    assert (defaults["lr"], defaults["weight_decay"], defaults["eps"]) == (3e-4, 1e-2, 1e-8)
    assert trainer.optimizer.param_groups[0]["params"] == trainer.params
    # Only the LoRA factors train: every UNet weight, the VAE and every text encoder stay frozen.
    assert trainer.param_names and all(".lora_A." in n or ".lora_B." in n for n in trainer.param_names)
    frozen = [pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    assert not any(p.requires_grad for m in frozen if m is not None for p in m.parameters())
    assert {n for n, p in pipe.unet.named_parameters() if p.requires_grad} == set(trainer.param_names)
    # Gaussian init: B starts at zero, so the expert starts as the base model.
    b_factors = [
        p.detach() for n, p in zip(trainer.param_names, trainer.params, strict=True) if "lora_B" in n
    ]
    assert b_factors and all(not b.any() for b in b_factors)
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {AttnProcessor2_0}  # SDPA


@pytest.mark.parametrize(
    ("spec", "native", "selmas"),
    [("random:tiny-sd-v", 768, 512), ("random:tiny-sd", 512, 512), ("random:tiny-sdxl", 1024, 1024)],
    ids=["sd2.1", "sd1", "sdxl"],
)
def test_selmas_resolution_is_512_px_for_sd_and_native_for_sdxl(model_cache, spec, native, selmas):
    """SD 2.1 (768 px native) trains at 512 like SD 1.x, as SELMA trains SD 2; SDXL at its own 1024."""
    from dataclasses import replace

    pipe = load_diffusion_pipeline(spec, model_cache)
    pipe.unet.register_to_config(sample_size=native // pipe.vae_scale_factor)  # a full-size config
    trainer = ExpertTrainer(pipe, tiny_train_config(), "cpu")
    assert trainer.native_resolution() == native and trainer.training_resolution() == selmas
    trainer.cfg = replace(trainer.cfg, resolution=640)
    assert trainer.training_resolution() == 640


def test_a_batch_setting_left_null_takes_selmas_for_the_model():
    cfg = TrainConfig(batch_size=2)
    assert (cfg.resolved_for(sdxl=False).batch_size, cfg.resolved_for(sdxl=False).gradient_accumulation) == (
        2,
        4,
    )
    assert (cfg.resolved_for(sdxl=True).batch_size, cfg.resolved_for(sdxl=True).gradient_accumulation) == (
        2,
        8,
    )
    assert TrainConfig(gradient_accumulation=3).resolved_for(sdxl=True).batch_size == 4
    with pytest.raises(ValueError, match="batch_size: expected >= 1 or null"):
        TrainConfig(batch_size=0)


def test_gradients_are_clipped_to_max_grad_norm(model_cache, monkeypatch):
    """Every step clips its gradients to train.max_grad_norm before the update."""
    real = torch.nn.utils.clip_grad_norm_
    norms: list[tuple[float, float]] = []  # (before, after) each step

    def clipping(params, max_norm, *args, **kwargs):
        params = list(params)
        before = real(params, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        norms.append((float(before), float(after)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clipping)
    train(model_cache, "random:tiny-sd", steps=2, max_grad_norm=1e-4)
    assert len(norms) == 2
    assert all(before > 1e-4 and after == pytest.approx(1e-4, rel=1e-3) for before, after in norms)


@pytest.mark.parametrize(
    ("spec", "kind"), [("random:tiny-sd", "epsilon"), ("random:tiny-sd-v", "v_prediction")]
)
def test_the_loss_target_follows_the_models_prediction_type(model_cache, monkeypatch, spec, kind):
    """The UNet regresses the noise for an epsilon model, the velocity for a v-prediction one (SD 2)."""
    from selma_core.phases.train import _decode_images

    trainer = ExpertTrainer(load_diffusion_pipeline(spec, model_cache), tiny_train_config(), "cpu")
    assert trainer.noise_scheduler.config.prediction_type == kind
    seen = {}
    scheduler = trainer.noise_scheduler
    real_add_noise, real_velocity = scheduler.add_noise, scheduler.get_velocity

    def add_noise(latents, noise, timesteps):
        seen["noise"] = noise
        return real_add_noise(latents, noise, timesteps)

    def get_velocity(latents, noise, timesteps):
        seen["velocity"] = real_velocity(latents, noise, timesteps)
        return seen["velocity"]

    monkeypatch.setattr(scheduler, "add_noise", add_noise)
    monkeypatch.setattr(scheduler, "get_velocity", get_velocity)
    dataset = tiny_dataset(model_cache, spec)
    resolution = trainer.native_resolution()
    pixels = _decode_images(dataset, resolution).pixels
    side = resolution // trainer.pipe.vae_scale_factor
    draws = trainer._draw(torch.Generator().manual_seed(0), len(dataset), (2, 4, side, side))
    target = trainer._unet_inputs(draws, pixels, [m["prompt"] for m, _ in dataset], resolution)[3]
    if kind == "epsilon":
        assert "velocity" not in seen and torch.equal(target, seen["noise"])
    else:
        assert torch.equal(target, seen["velocity"]) and not torch.allclose(target, seen["noise"])


def jpeg(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def test_sdxl_trains_with_both_text_encoders_and_each_images_size_and_crop_conditioning(model_cache):
    """Each SDXL micro-batch: diffusers' own conditioning of the prompt (both encoders' hidden
    states side by side, the second's pooled embedding) and each image's own time ids (its size
    before resizing, its crop's top-left corner, mirrored with the image, the target size), as
    diffusers' SDXL training computes them: a smaller image (weak-to-strong) is not passed off as a
    native one, nor a wide one as uncropped."""
    pipe = load_diffusion_pipeline("random:tiny-sdxl", model_cache)
    seen = []
    pipe.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True
    )
    trainer = ExpertTrainer(pipe, tiny_train_config(steps=3, random_flip=True), "cpu")
    r = trainer.native_resolution()
    assert r == 32
    # (width, height) -> (original height, width, crop top, left, left when mirrored) at 32 px.
    sizes = {(32, 32): [32, 32, 0, 0, 0], (24, 24): [24, 24, 0, 0, 0], (32, 45): [45, 32, 6, 0, 0]}
    sizes[(49, 32)] = [32, 49, 0, 8, 9]
    # One prompt for every image: whichever images a micro-batch draws, each row is its conditioning.
    prompt = PROMPTS[1]
    dataset = [({"id": f"s-{i}", "prompt": prompt}, jpeg(*size, i)) for i, size in enumerate(sizes)]
    draws = []
    real_draw = trainer._draw
    trainer._draw = lambda *args: draws.append(real_draw(*args)) or draws[-1]
    trainer.train(dataset)
    hidden, _, pooled, _ = pipe.encode_prompt(
        prompt=[prompt], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert hidden.shape[-1] == width  # both encoders
    assert len(seen) == len(draws) == 6  # three steps of 2 micro-batches
    expected_rows = list(sizes.values())
    flipped_any = False
    for (_args, kwargs), (idx, flip, *_) in zip(seen, draws, strict=True):
        added = kwargs["added_cond_kwargs"]
        expected = []
        for i, f in zip(idx.tolist(), flip.tolist(), strict=True):
            height, width, top, left, mirrored = expected_rows[i]
            expected.append([height, width, top, mirrored if f else left, r, r])
            flipped_any |= f and left != mirrored
        assert added["time_ids"].tolist() == expected
        torch.testing.assert_close(added["text_embeds"], pooled.expand(2, -1), rtol=0, atol=0)
        torch.testing.assert_close(kwargs["encoder_hidden_states"], hidden.expand(2, -1, -1), rtol=0, atol=0)
    assert flipped_any  # the seed draws the wide image mirrored


def test_bad_target_modules_are_an_input_error(model_cache):
    from selma_core.errors import InputError

    cfg = TrainConfig(rank=2, alpha=2, steps=1, target_modules=["no_such_layer"])
    with pytest.raises(InputError, match="no_such_layer"):
        ExpertTrainer(load_diffusion_pipeline("random:tiny-sd", model_cache), cfg, "cpu")


def test_an_expert_on_more_than_the_attention_projections_loads_merges_and_exports(tmp_path, model_cache):
    """diffusers writes the factors of modules other than to_q/k/v/out.0 under peft's names: read
    both, merge them, export them (kohya), and the merged file loads in diffusers again."""
    from selma_core.lora import save_adapter
    from selma_core.merging import merge_experts
    from selma_core.phases.merge import export_kohya

    trainer, _ = train(model_cache, "random:tiny-sd", steps=1, target_modules=["to_q", "ff.net.2"])
    trainer.save(tmp_path / "adapter")
    adapter = load_adapter(tmp_path / "adapter")
    feed_forward = [m for m in adapter.layers if m.endswith("ff.net.2")]
    assert len(feed_forward) == 4 and len(adapter.layers) == 12  # to_q of attn1 and attn2
    merged = merge_experts({"a": adapter, "b": adapter}, [0.5, 0.5])
    assert all(torch.allclose(merged.delta(m), adapter.delta(m), atol=1e-6) for m in feed_forward)
    export_kohya(merged, tmp_path / "kohya.safetensors")
    save_adapter(merged, tmp_path / "merged")
    pipe = load_diffusion_pipeline("random:tiny-sd", model_cache)
    pipe.load_lora_weights(str(tmp_path / "merged"))
    assert (
        sum(1 for name, m in pipe.unet.named_modules() if name.endswith("ff.net.2") and hasattr(m, "lora_A"))
        == 4
    )


def test_convolutions_as_lora_targets_are_refused_before_training(model_cache):
    from selma_core.errors import InputError

    cfg = TrainConfig(rank=2, alpha=2, steps=1, target_modules=["to_q", "proj_in"])  # a Conv2d in SD 1.x
    with pytest.raises(InputError, match=r"not Linear layers \(down_blocks.0.attentions.0.proj_in"):
        ExpertTrainer(load_diffusion_pipeline("random:tiny-sd", model_cache), cfg, "cpu")


def test_train_config_validates():
    with pytest.raises(ValueError, match="rank"):
        TrainConfig(rank=0)
    with pytest.raises(ValueError, match="resolution"):
        TrainConfig(resolution=30)
    with pytest.raises(ValueError, match="cuda_graph and gradient_checkpointing"):
        TrainConfig(cuda_graph=True, gradient_checkpointing=True)
    # Caught as the config loads (exit 2), not as a run that ascends the loss (a negative clip),
    # learns nothing (zero), turns NaN (eps 0) or fails in torch once the models are loaded.
    for name, value in (
        ("max_grad_norm", -1.0),
        ("max_grad_norm", 0.0),
        ("adam_eps", 0.0),
        ("weight_decay", -0.01),
    ):
        with pytest.raises(ValueError, match=f"{name}: expected"):
            TrainConfig(**{name: value})


@pytest.mark.parametrize("spec", ["random:tiny-sd", "random:tiny-sdxl"])
def test_micro_batches_replayed_as_a_graph_train_the_same_adapter(model_cache, spec):
    """cuda_graph: from the third micro-batch on, each runs where the GPU would replay its graph: on
    static buffers its inputs are copied into, adding into gradients that stay allocated, its loss
    overwritten by the next. The losses and the adapter are exactly the ungraphed run's."""
    plain, plain_history = train(model_cache, spec)
    backend = ReplayingBackend()
    graphed, history = train(model_cache, spec, graph_backend=backend, cuda_graph=True)
    assert graphed.cuda_graph_state == "captured" and plain.cuda_graph_state == "off"
    # 3 steps of 2 micro-batches: one compiles, one on the side stream, then capture and 4 replays.
    assert backend.events == ["side stream", "capture"] + ["replay"] * 4
    assert history == plain_history
    for name, tensor in adapter_tensors(plain).items():
        torch.testing.assert_close(adapter_tensors(graphed)[name], tensor, rtol=0, atol=0, msg=name)


def test_a_micro_batch_that_cannot_be_captured_stops_training_with_a_config_error(model_cache):
    from selma_core.errors import ConfigError

    cfg = tiny_train_config(steps=3, cuda_graph=True)
    trainer = ExpertTrainer(load_diffusion_pipeline("random:tiny-sd", model_cache), cfg, "cpu")
    trainer.graph_backend = FailingBackend()
    with pytest.raises(ConfigError, match="train.cuda_graph: the micro-batch's forward and backward cannot"):
        trainer.train(tiny_dataset(model_cache))
    # The graph's buffers are let go; the state says how far it got.
    assert trainer._forward_backward_call == trainer._forward_backward
    assert trainer.cuda_graph_state == "warming up"


def test_cuda_graph_is_off_on_the_cpu(model_cache):
    trainer, _ = train(model_cache, "random:tiny-sd", steps=1, cuda_graph=True)
    assert trainer.cuda_graph_state == "off"


def test_images_do_not_depend_on_their_batch(model_cache):
    """Per-prompt generators: a prompt's image is the same drawn alone or in a batch."""
    pipe = load_diffusion_pipeline("random:tiny-sd", model_cache)
    cfg = ImagesConfig(num_inference_steps=2, height=32, width=32)
    together = draw_images(pipe, PROMPTS, [1, 2, 3], cfg, "cpu")
    alone = draw_images(pipe, PROMPTS[1:2], [2], cfg, "cpu")
    diff = np.abs(np.asarray(together[1], dtype=np.int16) - np.asarray(alone[0], dtype=np.int16))
    assert diff.max() <= 1


def test_an_empty_image_set_is_an_input_error(tmp_path):
    import tarfile

    from selma_core.errors import InputError
    from selma_core.phases.images import SHARD_NAME, read_image_dataset

    with tarfile.open(tmp_path / SHARD_NAME, "w"):
        pass
    with pytest.raises(InputError, match="the image set is empty"):
        read_image_dataset(tmp_path)


def test_training_runs_under_the_configured_attention_kernel(model_cache, monkeypatch):
    """Every micro-batch runs with the configured kernel first (CUDA's dispatch follows that order);
    the compile cache's digest covers it; PyTorch's order returns afterwards."""
    from torch.nn.attention import SDPBackend

    firsts = []
    real = ExpertTrainer._micro_batch

    def recording(self, *args, **kwargs):
        firsts.append(torch._C._get_sdp_priority_order()[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ExpertTrainer, "_micro_batch", recording)
    before = torch._C._get_sdp_priority_order()
    trainer, _ = train(model_cache, "random:tiny-sd", steps=2, attention="math")
    assert set(firsts) == {int(SDPBackend.MATH)} and len(firsts) == 4
    assert trainer.attention.backend == "math" and trainer.compile_signature()["attention"] == "math"
    assert torch._C._get_sdp_priority_order() == before
    firsts.clear()
    trainer, _ = train(model_cache, "random:tiny-sd", steps=1)  # auto: PyTorch's own on the CPU
    assert trainer.attention.backend == "default" and set(firsts) == {before[0]}
