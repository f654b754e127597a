"""Expert training on bad input and in trouble, and what it tracks (random test models, CPU).

Unreadable images are skipped and counted, up to a share; a diverging loss stops the job keeping
the last good checkpoint; CUDA running out of memory names the batch size and what to change; every
log interval tracks loss, learning rate and throughput; validation images are drawn with the expert
in training without changing what it learns; gradient checkpointing computes the same thing."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_helpers import RecordingRun, tiny_train_config, train_job_context

from selma_core.checkpoints import CheckpointStore
from selma_core.errors import ConfigError, InputError
from selma_core.models.loading import load_diffusion_pipeline
from selma_core.phases.train import ExpertTrainer, TrainConfig, _decode_images
from selma_core.storage import LocalArtifactStore

from .test_train import tiny_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(model_cache):
    return tiny_dataset(model_cache)


def config(**overrides) -> TrainConfig:
    return tiny_train_config(**{"steps": 3, "checkpoint_every": None, "validation_every": None, **overrides})


def trainer(model_cache, cfg: TrainConfig) -> ExpertTrainer:
    torch.manual_seed(0)
    return ExpertTrainer(load_diffusion_pipeline("random:tiny-sd", model_cache), cfg, "cpu")


def with_garbage(dataset, count: int) -> list:
    broken = b"\xff\xd8 not a jpeg"
    return dataset + [({"id": f"bad-{i}", "prompt": "a broken image"}, broken) for i in range(count)]


def test_undecodable_images_are_skipped_and_counted_up_to_the_allowed_share(dataset, capsys):
    kept, pixels, _ = _decode_images(with_garbage(dataset, 1), 16, max_bad_share=0.25)
    assert [meta["id"] for meta, _ in kept] == ["s-0", "s-1", "s-2"] and pixels.shape == (3, 3, 16, 16)
    assert "skipped 1 of 4 image(s): image 'bad-0' cannot be decoded" in capsys.readouterr().err
    too_many = r"2 of 5 image\(s\) cannot be used, more than train.max_bad_image_share \(25.0%\)"
    with pytest.raises(InputError, match=too_many):
        _decode_images(with_garbage(dataset, 2), 16, max_bad_share=0.25)


def test_training_skips_undecodable_images_and_learns_from_the_rest(model_cache, dataset):
    """The skipped image changes nothing: the same adapter as training on the good images alone."""
    clean = trainer(model_cache, config())
    clean_history = clean.train(dataset)
    noisy = trainer(model_cache, config(max_bad_image_share=0.5))
    assert noisy.train(with_garbage(dataset, 1)) == clean_history
    assert noisy.images_skipped == 1 and clean.images_skipped == 0
    assert all(torch.equal(a, b) for a, b in zip(clean.params, noisy.params, strict=True))


def test_a_diverging_loss_stops_training_and_keeps_the_last_good_checkpoint(
    tmp_path, model_cache, dataset, monkeypatch
):
    store = LocalArtifactStore(tmp_path / "store")
    checkpoints = CheckpointStore(store, "experts/counting/x", tmp_path / "scratch", keep=2)
    expert = trainer(model_cache, config(steps=5, checkpoint_every=1))
    real = ExpertTrainer._micro_batch
    calls = []

    def diverge_at_step_3(self, *args, **kwargs):
        calls.append(1)
        loss = real(self, *args, **kwargs)
        return loss * math.inf if len(calls) > 4 else loss  # step 3's first micro-batch

    monkeypatch.setattr(ExpertTrainer, "_micro_batch", diverge_at_step_3)
    with pytest.raises(ConfigError) as raised:
        expert.train(dataset, checkpoints=checkpoints)
    message = str(raised.value)
    assert "loss became inf at step 3" in message
    assert f"the last good checkpoint, step 2, is kept at {checkpoints.key(2)}" in message
    assert "train.learning_rate (0.01)" in message
    # Nothing of the diverged step was saved; the last good checkpoint resumes.
    assert [state.step for state in [checkpoints.resume(expert.check_state)]] == [2]


def test_losses_are_read_from_the_device_only_at_steps_that_need_them(model_cache, dataset, monkeypatch):
    """Each read waits for the GPU: the trainer reads at the first step, log and checkpoint steps and
    the last, not every step; the history is the one every step's reads would give."""
    reads = []
    real = ExpertTrainer._settle

    def recording(self, pending, *args):
        reads.append([step for step, _, _ in pending])
        return real(self, pending, *args)

    monkeypatch.setattr(ExpertTrainer, "_settle", recording)
    history = trainer(model_cache, config(steps=10, log_every=4, checkpoint_every=6)).train(dataset)
    assert reads == [[1], [2, 3, 4], [5, 6], [7, 8], [9, 10]]
    monkeypatch.setattr(ExpertTrainer, "_settle", real)
    every_step = trainer(model_cache, config(steps=10, log_every=1)).train(dataset)
    assert history == [(step, loss) for step, loss in every_step if step in (4, 8, 10)]


def test_gradients_diverging_between_reads_name_their_step_and_no_later_checkpoint_is_saved(
    tmp_path, model_cache, dataset, monkeypatch
):
    """Step 3's gradients turn NaN: its update makes the weights NaN (in memory) and step 4's loss
    with them. The read at step 4 (a checkpoint step) names step 3, and step 4's checkpoint, which
    would hold those weights, is never saved: step 2's, finite, is what a rerun resumes."""
    store = LocalArtifactStore(tmp_path / "store")
    checkpoints = CheckpointStore(store, "experts/counting/x", tmp_path / "scratch", keep=5)
    expert = trainer(model_cache, config(steps=8, log_every=8, checkpoint_every=2))
    real = ExpertTrainer._micro_batch
    calls = []

    def diverge_at_step_3(self, *args, **kwargs):
        calls.append(1)
        loss = real(self, *args, **kwargs)
        if len(calls) == 5:  # step 3's first micro-batch
            self.params[0].grad.mul_(math.nan)
        return loss

    monkeypatch.setattr(ExpertTrainer, "_micro_batch", diverge_at_step_3)
    with pytest.raises(ConfigError) as raised:
        expert.train(dataset, checkpoints=checkpoints)
    assert len(calls) == 8  # step 4 ran, on the weights step 3 made NaN
    assert not torch.isfinite(expert.params[0]).all()
    kept = f"the last good checkpoint, step 2, is kept at {checkpoints.key(2)}"
    assert f"gradient norm became nan at step 3; training stopped, {kept}" in str(raised.value)
    assert "mixed_precision: no" not in str(raised.value)  # float32 already: no help
    state = checkpoints.resume(expert.check_state)
    assert state.step == 2 and all(torch.isfinite(t).all() for t in state.tensors["lora"].values())


def test_cuda_out_of_memory_names_the_batch_size_and_what_to_change(model_cache, dataset, monkeypatch):
    expert = trainer(model_cache, config(batch_size=2, gradient_accumulation=2))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(expert.pipe.unet, "forward", out_of_memory)
    with pytest.raises(ConfigError) as raised:
        expert.train(dataset)
    message = str(raised.value)
    assert message.startswith("CUDA out of memory at train.batch_size 2 (32 px, LoRA rank 2, float32)")
    assert "lower train.batch_size to 1 and raise train.gradient_accumulation to 4 (the same 4" in message
    assert "set train.gradient_checkpointing: true" in message and "Tried to allocate 2.00 GiB" in message


def test_each_log_interval_tracks_loss_learning_rate_and_throughput(model_cache, dataset):
    logged = []
    warmups = []
    history = trainer(model_cache, config(log_every=2, steps=4)).train(
        dataset, on_log=lambda step, metrics: logged.append((step, metrics)), on_warmup=warmups.append
    )
    assert [step for step, _ in logged] == [2, 4] and [s for s, _ in history] == [2, 4]
    # The same training logged at every step: each step's own loss, for the interval means.
    every_step = [loss for _, loss in trainer(model_cache, config(log_every=1, steps=4)).train(dataset)]
    assert len(set(every_step)) == 4
    for (_, metrics), (_, loss), pair in zip(logged, history, (every_step[:2], every_step[2:]), strict=True):
        # No GPU memory on CPU.
        assert set(metrics) == {
            "train.loss",
            "train.loss_mean",
            "train.lr",
            "train.images_per_s",
            "train.grad_norm",
        }
        assert metrics["train.grad_norm"] > 0
        assert metrics["train.loss"] == loss == pair[1] and metrics["train.lr"] == 1e-2
        assert metrics["train.loss_mean"] == pytest.approx(sum(pair) / 2, rel=1e-12)
        assert metrics["train.images_per_s"] > 0
    assert len(warmups) == 1 and warmups[0] > 0


def test_gradient_checkpointing_computes_the_same_expert(model_cache, dataset):
    plain = trainer(model_cache, config())
    checkpointed = trainer(model_cache, config(gradient_checkpointing=True))
    assert checkpointed.pipe.unet.is_gradient_checkpointing
    assert plain.train(dataset) == checkpointed.train(dataset)
    assert all(torch.equal(a, b) for a, b in zip(plain.params, checkpointed.params, strict=True))


def test_validation_images_are_logged_and_do_not_change_the_expert(
    tmp_path, model_cache, dataset, monkeypatch
):
    """The train phase draws the skill's held-out prompts every validation_every steps with fixed
    seeds and logs them to MLflow; the adapter is bit for bit the one trained without validation."""
    from selma_core.phases import images
    from selma_core.phases.train import train_expert

    monkeypatch.setattr(images, "read_image_dataset", lambda folder: dataset)
    store = LocalArtifactStore(tmp_path / "store")
    prompts = [
        {"id": "h-0", "text": "two dogs under a tree", "split": "heldout"},
        {"id": "t-0", "text": PROMPT_TRAIN, "split": "train"},
        {"id": "h-1", "text": "a red cube on a blue sphere", "split": "heldout"},
    ]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))

    def job(key: str, **overrides) -> RecordingRun:
        run = RecordingRun(tmp_path / "artifacts" / key)
        cfg = config(steps=4, **overrides)
        ctx = train_job_context(store, key, cfg, model_cache, tmp_path / "scratch", tmp_path, run=run)
        train_expert(ctx, "counting")
        return run

    run = job("validated", validation_every=2, validation_prompts=3, validation_inference_steps=2)
    steps = [f"validation/step-0000000{s}" for s in (2, 4)]
    names = ("00.jpg", "00.txt", "01.jpg", "01.txt")
    assert run.artifacts == [f"{s}/{name}" for s in steps for name in names]
    folder = tmp_path / "artifacts" / "validated" / steps[1]
    assert (folder / "01.txt").read_text() == "a red cube on a blue sphere\n"
    assert Image.open(folder / "00.jpg").size == (32, 32)
    # Seeded: the same noise at every validation, so only training changed the image.
    first = Image.open(tmp_path / "artifacts" / "validated" / steps[0] / "00.jpg").tobytes()
    assert first != Image.open(folder / "00.jpg").tobytes()
    assert run.series("train.images_skipped") == [(None, 0)] and len(run.series("train.warmup_s")) == 1
    assert run.tags["train.cuda_graph"] == "off"  # cuda_graph is off unless configured, and on the CPU

    job("plain")
    adapter = "pytorch_lora_weights.safetensors"
    ours = load_file(str(store.fetch_dir("validated", tmp_path / "f1") / adapter))
    theirs = load_file(str(store.fetch_dir("plain", tmp_path / "f2") / adapter))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


PROMPT_TRAIN = "two red apples on a table"


def test_sdxl_encodes_in_float32_under_fp16_unless_an_fp16_safe_vae_is_given(model_cache):
    """SDXL's VAE overflows in float16: it encodes in float32 (its latents cast to the training
    dtype); with train.vae_model the given VAE runs in float16 like the rest."""
    pipe = load_diffusion_pipeline("random:tiny-sdxl", model_cache)
    upcast = ExpertTrainer(pipe, config(mixed_precision="fp16"), "cpu")
    assert upcast.vae_dtype == torch.float32 and pipe.vae.dtype == torch.float32
    assert pipe.unet.dtype == torch.float16
    pixels = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    assert upcast._encode_image(pixels, flipped=False).dtype == torch.float16

    pipe = load_diffusion_pipeline("random:tiny-sdxl", model_cache)
    pipe.vae.register_to_config(force_upcast=False)  # as madebyollin/sdxl-vae-fp16-fix says of itself
    safe = ExpertTrainer(
        pipe, config(mixed_precision="fp16", vae_model="madebyollin/sdxl-vae-fp16-fix"), "cpu"
    )
    assert safe.vae_dtype == torch.float16 and pipe.vae.dtype == torch.float16
    sd = ExpertTrainer(
        load_diffusion_pipeline("random:tiny-sd", model_cache), config(mixed_precision="fp16"), "cpu"
    )
    assert sd.vae_dtype == torch.float16  # SD 1.x/2.x's VAE is fine in float16


def test_a_named_vae_replaces_the_base_models_and_keys_its_latents(
    tmp_path, model_cache, dataset, monkeypatch
):
    from selma_core.latent_cache import CACHE_PREFIX
    from selma_core.models.loading import load_vae
    from selma_core.phases import images
    from selma_core.phases.train import train_expert

    vae = load_vae("random:tiny-sdxl", model_cache)  # a pipeline folder: its vae/
    assert type(vae).__name__ == "AutoencoderKL"
    monkeypatch.setattr(images, "read_image_dataset", lambda folder: dataset)
    store = LocalArtifactStore(tmp_path / "store")
    for key, vae_model in (("a", None), ("b", "random:tiny-sdxl")):
        cfg = config(steps=1, vae_model=vae_model)
        train_expert(
            train_job_context(store, key, cfg, model_cache, tmp_path / "scratch", tmp_path), "counting"
        )
    entries = {k.split("/")[2] for k in store.list_keys(CACHE_PREFIX)}
    assert len(entries) == 2  # one latent cache entry per VAE


def test_a_vae_of_another_latent_space_is_refused(model_cache):
    """An SD VAE (0.18215) named for SDXL (0.13025): latents scaled wrongly, trained without a word."""
    from selma_core.models.loading import load_vae
    from selma_core.phases.train import check_same_latent_space

    base, other = load_vae("random:tiny-sd", model_cache), load_vae("random:tiny-sd", model_cache)
    check_same_latent_space(other, base, "org/vae", "random:tiny-sd")  # the same latents: fine
    other.register_to_config(scaling_factor=0.13025)
    with pytest.raises(ConfigError) as raised:
        check_same_latent_space(other, base, "org/vae", "random:tiny-sd")
    assert str(raised.value).startswith(
        "train.vae_model org/vae: its scaling_factor is 0.13025, the base model random:tiny-sd's VAE's "
        "is 0.18215"
    )


def test_sdxl_validation_under_fp16_decodes_with_its_upcast_vae(model_cache):
    """The VAE kept in float32 for encoding goes back to float16 for the pipeline (which upcasts it
    itself to decode) and returns to float32 for training."""
    from selma_core.phases.images import SamplingConfig

    pipe = load_diffusion_pipeline("random:tiny-sdxl", model_cache)
    expert = ExpertTrainer(pipe, config(mixed_precision="fp16"), "cpu")
    sampling = SamplingConfig(num_inference_steps=2, height=32, width=32)
    images = expert.draw_validation(["a red cube", "two cats"], [1, 2], sampling)
    assert [image.size for image in images] == [(32, 32), (32, 32)]
    assert pipe.vae.dtype == torch.float32 and pipe.unet.dtype == torch.float16


def test_out_of_memory_while_encoding_or_drawing_validation_images_says_what_to_change(
    model_cache, dataset, monkeypatch
):
    """Not only the micro-batches: encoding the dataset and drawing validation images can run out of
    memory too (SDXL's validation: several images at 1024 px). Each is a config error (exit 2, not
    retried) with its own advice."""

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    expert = trainer(model_cache, config())
    monkeypatch.setattr(expert, "_encode_image", out_of_memory)
    with pytest.raises(ConfigError) as raised:
        expert.train(dataset)
    message = str(raised.value)
    assert message.startswith("CUDA out of memory encoding the dataset's images and prompts (32 px")
    assert "lower train.resolution (now 32 px)" in message and "Tried to allocate 1.00 GiB" in message

    expert = trainer(model_cache, config(validation_every=2))
    with pytest.raises(ConfigError) as raised:
        expert.train(dataset, on_validate=out_of_memory)
    message = str(raised.value)
    assert message.startswith("CUDA out of memory drawing 4 validation image(s) at 32 px")
    assert "lower train.validation_prompts or set train.validation_every: null" in message


def test_the_out_of_memory_advice_keeps_the_images_per_step():
    expert = SimpleNamespace(dtype=torch.bfloat16, _doing="training", _parts=1, _world_size=1)
    for batch, accumulation, advice in [
        (16, 4, "lower train.batch_size to 8 and raise train.gradient_accumulation to 8 (the same 64"),
        (5, 2, "lower train.batch_size to 2 and raise train.gradient_accumulation to 5 (the same 10"),
    ]:
        expert.cfg = config(batch_size=batch, gradient_accumulation=accumulation)
        assert advice in ExpertTrainer._out_of_memory_message(expert, 512, RuntimeError("oom"))
    expert.cfg = config(batch_size=1, gradient_checkpointing=True)
    message = ExpertTrainer._out_of_memory_message(expert, 1024, RuntimeError("oom"))
    assert "train.batch_size to" not in message and "lower train.resolution (now 1024 px)" in message
    # SELMA's 16 x 4 on 8 GPUs: each micro-batch is cut in two, 8 images in each process. 8 x 8
    # would give each process 8 images still (whole micro-batches); 4 x 16 gives it 4.
    expert.cfg, expert._parts, expert._world_size = config(batch_size=16, gradient_accumulation=4), 2, 8
    message = ExpertTrainer._out_of_memory_message(expert, 512, RuntimeError("oom"))
    assert message.startswith("CUDA out of memory at train.batch_size 16, 8 of them in each process (512 px")
    assert "lower train.batch_size to 4 and raise train.gradient_accumulation to 16 (the same 64" in message
    # cuda_graph refuses gradient checkpointing: the advice turns it off too.
    expert.cfg, expert._parts, expert._world_size = config(batch_size=1, cuda_graph=True), 1, 1
    message = ExpertTrainer._out_of_memory_message(expert, 1024, RuntimeError("oom"))
    assert "set train.cuda_graph: false and train.gradient_checkpointing: true" in message


# -- precision ------------------------------------------------------------------------------------


def test_fp16_scales_the_loss_skips_overflowing_steps_and_checkpoints_the_scale(model_cache, dataset):
    """Under fp16 the loss is scaled (fp16 gradients of a batch mean underflow otherwise). A scale
    so large the gradients overflow skips those updates and halves the scale, as AMP does; training
    goes on, and the scale is part of the checkpoint a resumed run restores."""
    assert not trainer(model_cache, config()).scaler.is_enabled()  # float32: nothing to scale
    expert = trainer(model_cache, config(mixed_precision="fp16"))  # 3 steps
    assert expert.scaler.is_enabled()
    expert.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 overflows at 65504
    before = [p.detach().clone() for p in expert.params]
    logged = []
    expert.train(dataset, on_log=lambda step, metrics: logged.append(metrics))
    assert expert.steps_skipped == 3 and expert.scaler.get_scale() == 2.0**37
    assert all(torch.equal(a, b) for a, b in zip(before, expert.params, strict=True))  # no update
    assert [m["train.steps_skipped"] for m in logged] == [1, 2, 3]
    assert [m["train.loss_scale"] for m in logged] == [2.0**39, 2.0**38, 2.0**37]
    assert math.isfinite(logged[-1]["train.loss"]) and not math.isfinite(logged[-1]["train.grad_norm"])

    # At the default scale the same model trains: every step updates the LoRA.
    learning = trainer(model_cache, config(mixed_precision="fp16", steps=2))
    before = [p.detach().clone() for p in learning.params]
    learning.train(dataset)
    assert learning.steps_skipped == 0
    assert not any(torch.equal(a, b) for a, b in zip(before, learning.params, strict=True))

    state = expert.checkpoint_state(1, torch.Generator(), [], 0.0)
    assert state.meta["grad_scaler"]["scale"] == 2.0**37
    resumed = trainer(model_cache, config(mixed_precision="fp16"))
    resumed.check_state(state)
    resumed.restore_state(state, torch.Generator())
    assert resumed.scaler.get_scale() == 2.0**37 and resumed.steps_skipped == 3
    del state.meta["grad_scaler"]
    with pytest.raises(ValueError, match="it lacks grad_scaler"):
        resumed.check_state(state)


def test_a_checkpoint_trained_at_another_resolution_is_not_resumed(model_cache):
    """resolution null meant the model's native size before it meant SELMA's 512 px (SD 2.1: 768):
    a checkpoint says what it was trained at, and one written before it said counts as native."""
    expert = trainer(model_cache, config())
    state = expert.checkpoint_state(1, torch.Generator(), [], 0.0)
    assert state.meta["resolution"] == 32
    expert.check_state(state)
    state.meta["resolution"] = 768
    with pytest.raises(ValueError, match="trained at 768 px, this run trains at 32 px"):
        expert.check_state(state)
    del state.meta["resolution"]
    expert.check_state(state)  # the tiny model's native 32 px
    expert.pipe.unet.register_to_config(sample_size=384)  # as SD 2.1: native 768, trained at 512
    with pytest.raises(ValueError, match="trained at 768 px, this run trains at 512 px"):
        expert.check_state(state)


def test_noisy_latents_are_computed_in_float32_before_the_unet_sees_them(model_cache, dataset):
    """In bfloat16 the first timesteps' signal level (sqrt of alphas_cumprod, 0.9996 at t=0) rounds to
    1 and their noise to none: the schedule's arithmetic is float32, only the UNet's input is bf16."""
    expert = trainer(model_cache, config(mixed_precision="bf16", batch_size=2))
    pixels = _decode_images(dataset, 32, 0.0).pixels
    texts = [meta["prompt"] for meta, _ in dataset]
    seen = []
    expert.pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    channels, side = expert.pipe.vae.config.latent_channels, 32 // expert.pipe.vae_scale_factor
    noise = torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(0))
    posterior = torch.zeros(2, channels, side, side, dtype=torch.bfloat16)  # latents: the mean
    draws = (torch.tensor([0, 1]), None, posterior, noise, torch.zeros(2, dtype=torch.long))
    expert._micro_batch(draws, pixels, texts, 32)

    alpha = expert.noise_scheduler.alphas_cumprod[0].item()
    assert torch.tensor(alpha**0.5, dtype=torch.bfloat16).item() == 1.0  # bf16 would drop the noise
    params = torch.cat([expert._encode_image(pixels[i : i + 1], False) for i in (0, 1)])
    mean = params[:, :channels].float()
    latents = mean * expert.pipe.vae.config.scaling_factor
    expected = alpha**0.5 * latents + (1 - alpha) ** 0.5 * noise
    assert seen[0].dtype == torch.bfloat16
    assert torch.allclose(seen[0].float(), expected, atol=2e-2)
    assert (seen[0].float() - latents).abs().max() > 2e-2  # the noise is there
