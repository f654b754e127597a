"""Random test models: real diffusers/transformers architectures, tiny, with random weights.

They exist so the whole pipeline (generation, LoRA training, merging, CLIP scoring, MLflow
registration) runs for real on a laptop CPU and in CI, where no weights can be downloaded. Their
images are noise and their scores meaningless: they test plumbing, never quality. Each is built
deterministically from a fixed seed and saved with ``save_pretrained``, so every job loads the very
same weights through the same ``from_pretrained`` code path a real model takes.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

RANDOM_PREFIX = "random:"
RANDOM_MODELS_VERSION = 1
TINY_TEXT_DIM = 32
TINY_MAX_TOKENS = 77


def tiny_clip_tokenizer():
    """A character-level byte-BPE CLIP tokenizer (no merges) built with the ``tokenizers`` alphabet."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in alphabet:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TINY_MAX_TOKENS)


def _text_config(vocab_size: int, projection_dim: int = TINY_TEXT_DIM):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=TINY_MAX_TOKENS,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _tiny_clip_vision():
    """The CLIP vision tower of the tiny CLIP and of the tiny LLaVA-shaped VLM."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=32,
        patch_size=8,
        projection_dim=TINY_TEXT_DIM,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
    )


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
        steps_offset=1,
    )


def _tiny_unet(**overrides):
    """The tiny UNet both pipelines share: two resolutions, one attention block each way."""
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    return UNet2DConditionModel(**{**config, **overrides})


def build_tiny_sd(prediction_type: str = "epsilon"):
    """A Stable Diffusion 1.x/2.x-shaped pipeline, 32 px images; ``v_prediction`` mimics SD 2.x."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    unet = _tiny_unet()
    return StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl():
    """An SDXL-shaped pipeline: two text encoders, size/crop time ids, 32 px images."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    unet = _tiny_unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TINY_TEXT_DIM,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        # 6 time ids x 8 + the pooled text embedding of text_encoder_2
        projection_class_embeddings_input_dim=6 * 8 + TINY_TEXT_DIM,
        transformer_layers_per_block=(1, 1),
    )
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer))),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=_scheduler(),
    )


class _TinyClipBundle:
    """CLIP model + processor saved into one folder, as hub CLIP checkpoints are."""

    def __init__(self) -> None:
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

        tokenizer = tiny_clip_tokenizer()
        vision = _tiny_clip_vision()
        config = CLIPConfig(
            text_config=_text_config(len(tokenizer)).to_dict(),
            vision_config=vision.to_dict(),
            projection_dim=TINY_TEXT_DIM,
        )
        self.model = CLIPModel(config)
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
        self.processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)


class _TinyCausalLM:
    """A GPT-2-shaped causal LM with a byte-level character tokenizer and a chat template."""

    CHAT_TEMPLATE = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )

    def __init__(self) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from tokenizers.pre_tokenizers import ByteLevel
        from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

        vocab = {"<|endoftext|>": 0}
        for char in sorted(ByteLevel.alphabet()):
            vocab[char] = len(vocab)
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        self.tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
        )
        self.tokenizer.chat_template = self.CHAT_TEMPLATE
        config = GPT2Config(
            vocab_size=len(vocab),
            n_positions=4096,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.model = GPT2LMHeadModel(config)

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


# -- vision-language models (VQA backends) -------------------------------------------------------

_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Whole-word tokens, as real vocabularies have them, so that "Yes"/"No" are one token each.
_TINY_WORDS = ("yes", "no", "Yes", "No")


def tiny_char_tokenizer(special_tokens: list[str], template: str | None = None, **roles: str):
    """A SentencePiece-like character tokenizer (``▁`` marks a word start) over printable ASCII and newline,
    built with the ``tokenizers`` library: one token per character, plus one per word of ``_TINY_WORDS``.

    ``special_tokens`` come first (ids 0, 1, ...); ``roles`` names them (``pad_token="<pad>"``, ...);
    ``template``, e.g. ``"$A </s>"``, adds tokens around every encoded text (as T5 appends ``</s>``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(special_tokens)}
    for char in ["▁", "\n", *(chr(c) for c in range(33, 127))]:
        vocab.setdefault(char, len(vocab))
    merges = []
    for word in _TINY_WORDS:
        piece = "▁"
        for char in word:
            merges.append((piece, char))
            piece += char
            vocab.setdefault(piece, len(vocab))
    merges = list(dict.fromkeys(merges))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=roles.get("unk_token")))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    if template:
        used = [t for t in special_tokens if t in template.split()]
        backend.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, vocab[t]) for t in used]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
    extra = [t for t in special_tokens if t not in roles.values()]
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": extra})
    return tokenizer


def _tiny_t5_tokenizer():
    return tiny_char_tokenizer(
        ["<pad>", "</s>", "<unk>", "<image>"],
        template="$A </s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def _tiny_chat_tokenizer():
    tokenizer = tiny_char_tokenizer(
        ["<pad>", "<s>", "<unk>", "<|end|>", "<image>", "<|user|>", "<|assistant|>", "<|system|>"],
        pad_token="<pad>",
        bos_token="<s>",
        unk_token="<unk>",
        eos_token="<|end|>",
    )
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    return tokenizer


def _tiny_blip_vision(config_class):
    return config_class(
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        initializer_range=0.02,
    ).to_dict()


def _tiny_qformer(config_class, vocab_size: int, **extra):
    return config_class(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        encoder_hidden_size=TINY_TEXT_DIM,
        max_position_embeddings=128,
        **extra,
    ).to_dict()


def _tiny_llama(vocab_size: int, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    ).to_dict()


class _TinyBlip2Bundle:
    """BLIP-2 (vision transformer, Q-Former with 4 queries, T5 language model) + ``Blip2Processor``,
    shaped like ``Salesforce/blip2-flan-t5-xl`` (SELMA's TIFA VQA model), 32 px images."""

    NUM_QUERY_TOKENS = 4

    def __init__(self) -> None:
        from transformers import (
            Blip2Config,
            Blip2ForConditionalGeneration,
            Blip2Processor,
            Blip2QFormerConfig,
            Blip2VisionConfig,
            BlipImageProcessor,
            T5Config,
        )

        tokenizer = _tiny_t5_tokenizer()
        text = T5Config(
            vocab_size=len(tokenizer),
            d_model=TINY_TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=tokenizer.pad_token_id,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
        config = Blip2Config(
            vision_config=_tiny_blip_vision(Blip2VisionConfig),
            qformer_config=_tiny_qformer(Blip2QFormerConfig, len(tokenizer)),
            text_config=text.to_dict(),
            num_query_tokens=self.NUM_QUERY_TOKENS,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        )
        self.model = Blip2ForConditionalGeneration(config)
        image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
        self.processor = Blip2Processor(
            image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=self.NUM_QUERY_TOKENS
        )

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)


class _TinyInstructBlipBundle:
    """InstructBLIP (vision transformer, instruction-aware Q-Former, LLaMA-shaped decoder-only language
    model, like ``Salesforce/instructblip-vicuna-7b``) + ``InstructBlipProcessor``, 32 px images."""

    NUM_QUERY_TOKENS = 4

    def __init__(self) -> None:
        from transformers import (
            BlipImageProcessor,
            InstructBlipConfig,
            InstructBlipForConditionalGeneration,
            InstructBlipProcessor,
            InstructBlipQFormerConfig,
            InstructBlipVisionConfig,
        )

        tokenizer = _tiny_chat_tokenizer()
        tokenizer.padding_side = "left"  # a decoder-only model generates after the prompt
        qformer_tokenizer = tiny_char_tokenizer(
            ["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
            template="[CLS] $A [SEP]",
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
        )
        config = InstructBlipConfig(
            vision_config=_tiny_blip_vision(InstructBlipVisionConfig),
            qformer_config=_tiny_qformer(InstructBlipQFormerConfig, len(qformer_tokenizer), pad_token_id=0),
            text_config=_tiny_llama(len(tokenizer), tokenizer),
            num_query_tokens=self.NUM_QUERY_TOKENS,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        )
        self.model = InstructBlipForConditionalGeneration(config)
        image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
        self.processor = InstructBlipProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            qformer_tokenizer=qformer_tokenizer,
            num_query_tokens=self.NUM_QUERY_TOKENS,
        )

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)


class _TinyVlmBundle:
    """A chat VLM: LLaVA-1.5-shaped (CLIP vision tower, MLP projector, LLaMA-shaped language model),
    ``LlavaProcessor`` with a chat template; loads with ``AutoModelForImageTextToText`` and
    ``AutoProcessor``. 32 px images, 8 px patches: 16 image tokens."""

    def __init__(self) -> None:
        from transformers import (
            CLIPImageProcessor,
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaProcessor,
        )

        tokenizer = _tiny_chat_tokenizer()
        vision = _tiny_clip_vision()
        config = LlavaConfig(
            vision_config=vision.to_dict(),
            text_config=_tiny_llama(len(tokenizer), tokenizer),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_seq_length=16,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
        self.model = LlavaForConditionalGeneration(config)
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
        self.processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
            chat_template=_TINY_CHAT_TEMPLATE,
        )

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)


class _TinyImageRewardBundle:
    """ImageReward-shaped (``selma_core.metrics.image_reward``): a BLIP ViT (128 wide in two 64-wide heads,
    as BLIP's ViTs have them; 32 px images, 8 px patches; LayerNorm eps 1e-6), a BLIP text encoder that
    cross-attends to it (32 wide, so the two widths differ as 1024 and 768 do), the five-Linear head and a
    character tokenizer with BLIP's ``[DEC]``/``[ENC]``; saved as a converted ImageReward folder, so the
    scorer reads it with the code that reads a converted ``ImageReward.pt``."""

    HEAD_WIDTHS = (TINY_TEXT_DIM, 64, 16, 8, 4, 1)

    def __init__(self) -> None:
        from torch import nn
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        from selma_core.metrics.image_reward import VISION_LAYER_NORM_EPS, build_head

        self.tokenizer = tiny_char_tokenizer(
            ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[DEC]", "[ENC]"],
            template="[CLS] $A [SEP]",
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            bos_token="[DEC]",
        )
        vision = BlipVisionConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            layer_norm_eps=VISION_LAYER_NORM_EPS,
            initializer_range=0.02,
        )
        text = BlipTextConfig(
            vocab_size=len(self.tokenizer),
            hidden_size=TINY_TEXT_DIM,
            encoder_hidden_size=vision.hidden_size,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            sep_token_id=self.tokenizer.sep_token_id,
            eos_token_id=self.tokenizer.sep_token_id,
            is_decoder=True,  # the cross-attention blocks
        )
        self.vision_model = BlipVisionModel(vision)
        self.text_encoder = BlipTextModel(text, add_pooling_layer=False)
        self.head = build_head(self.HEAD_WIDTHS)
        # Variance-preserving weights (torch's default init shrinks each of the five layers' outputs),
        # so that different images and prompts get clearly different rewards.
        for layer in self.head.modules():
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
                nn.init.zeros_(layer.bias)

    def save_pretrained(self, path: str | Path) -> None:
        from selma_core.metrics.image_reward import save_converted

        save_converted(
            path,
            self.vision_model,
            self.text_encoder,
            self.head,
            self.tokenizer,
            source={"random": "tiny-image-reward"},
        )


RANDOM_MODELS: dict[str, Callable[[], object]] = {
    "tiny-sd": build_tiny_sd,
    "tiny-sd-v": lambda: build_tiny_sd("v_prediction"),
    "tiny-sdxl": build_tiny_sdxl,
    "tiny-clip": _TinyClipBundle,
    "tiny-lm": _TinyCausalLM,
    "tiny-blip2": _TinyBlip2Bundle,
    "tiny-instructblip": _TinyInstructBlipBundle,
    "tiny-vlm": _TinyVlmBundle,
    "tiny-image-reward": _TinyImageRewardBundle,
}


# The text-to-image ones (what base_model and generator_model may name).
RANDOM_DIFFUSION_MODELS = ("tiny-sd", "tiny-sd-v", "tiny-sdxl")


def is_random_model(spec: str) -> bool:
    return spec.startswith(RANDOM_PREFIX)


def random_model_problem(spec: str, text_to_image: bool = False) -> str | None:
    """Why ``spec`` (a ``random:`` name) cannot be built, or serve as a text-to-image model; None if
    it can."""
    name = spec[len(RANDOM_PREFIX) :]
    if name not in RANDOM_MODELS:
        known = ", ".join(RANDOM_PREFIX + n for n in RANDOM_MODELS)
        return f"unknown random test model {spec!r}; known: {known}"
    if text_to_image and name not in RANDOM_DIFFUSION_MODELS:
        return (
            f"{spec} is not a text-to-image model; the random ones: "
            f"{', '.join(RANDOM_PREFIX + n for n in RANDOM_DIFFUSION_MODELS)}"
        )
    return None


def materialize_random_model(spec: str, cache_dir: str | Path) -> Path:
    """Build ``random:NAME`` once (seed 0) and save it under the cache; the folder's path.

    Several jobs may start at once: each builds into a private temporary folder and renames it into
    place; a job that loses the race keeps the winner's identical copy.
    """
    import torch

    name = spec[len(RANDOM_PREFIX) :]
    problem = random_model_problem(spec)
    if problem:
        from selma_core.errors import ConfigError

        raise ConfigError(problem)
    # The version in the name: a changed architecture never reuses an old cached copy.
    target = Path(cache_dir) / "models" / f"random-{name}-v{RANDOM_MODELS_VERSION}"
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".random-{name}-", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = RANDOM_MODELS[name]()
        model.save_pretrained(tmp)
        (tmp / ".complete").write_text("random test model: weights are noise, for plumbing tests only\n")
        try:
            tmp.rename(target)
        except OSError:
            if not (target / ".complete").is_file():  # a stale half-written folder from a dead job
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
