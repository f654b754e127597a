"""VQA backends: a vision-language model answers questions about images (TIFA, DSG) and scores how
likely an image shows a text (VQAScore), behind one interface, ``VqaBackend``.

- ``answer(images, questions)``: one free-form answer per (image, question) pair, greedy decoding,
  short (``max_new_tokens``), normalised by ``clean_answer``: whitespace collapsed, lowercased,
  stripped, one trailing period dropped (``"Yes."`` -> ``"yes"``, as DSG compares ``== "yes"``).
- ``prob_yes(images, texts)``: VQAScore (Lin et al., *Evaluating Text-to-Visual Generation with
  Image-to-Text Generation*, 2024): the model is asked ``Does this figure show "{text}"? Please
  answer yes or no.`` (the template of the authors' ``t2v_metrics``) and the score is **P(yes)**:
  the raw probability of the first token of the backend's yes answer at the first answer position,
  a softmax over the *whole* vocabulary, *not* renormalised over the yes/no tokens, as the paper
  defines it. The answer is spelt as ``t2v_metrics`` spells it per model: ``"yes"`` for the FlanT5
  models (BLIP-2, InstructBLIP: "instruct-blip uses 'yes' instead of 'Yes'"; T5's vocabulary tells
  the two apart), ``"Yes"`` for chat VLMs; InstructBLIP's question is prefixed ``Question: ``.
  (``t2v_metrics`` computes exp(-mean cross-entropy) of the tokenized answer, which for T5
  tokenizers also counts the end-of-sequence token, so its numbers can differ slightly.)

Implementations, all with transformers, batched (``batch_size``), ``torch.autocast`` on CUDA,
tqdm progress bars when there is more than one batch, deterministic (greedy, no sampling):

- ``Blip2Vqa``: ``Blip2ForConditionalGeneration`` + ``Blip2Processor``; prompt
  ``Question: {question} Answer:``. SELMA's TIFA model is ``Salesforce/blip2-flan-t5-xl``.
- ``InstructBlipVqa``: ``InstructBlipForConditionalGeneration`` + ``InstructBlipProcessor``; prompt
  ``Question: {question} Short answer:`` (InstructBLIP's short-answer VQA prompt).
- ``ChatVlmVqa``: any chat VLM that ``AutoModelForImageTextToText`` + ``AutoProcessor`` load (LLaVA,
  Qwen2-VL, Idefics3/SmolVLM, ...); the question goes through the processor's chat template as one
  user turn (an image, then the text) with the generation prompt; prompt
  ``{question}\\nAnswer the question using a single word or phrase.`` (LLaVA-1.5's VQA prompt).

Weights load through ``load_pretrained`` from a hub id, a local folder or a random test model
(``random:tiny-blip2``, ``random:tiny-instructblip``, ``random:tiny-vlm``: real architectures with
random weights, whose answers are noise: they test plumbing only). With ``HF_HUB_OFFLINE=1`` (or
``TRANSFORMERS_OFFLINE=1``) only the local cache is read (``local_files_only``), and a model that is
not there is a ``ConfigError`` naming it and saying how to provide it (``hf download ID`` where
there is network, or a local folder). Online, one request without retries first asks the hub for
the model, so a machine without network finds out in seconds (not after the hub client's retries of
every file): it then reads the local cache only, and without a cached copy raises an
``EndpointError`` (hub unreachable) or a ``ConfigError`` (no such model, no access) naming the
model and how to provide it; other failures are classified by
``selma_core.models.loading.model_load_error``. Weights are read from safetensors only unless
``allow_pickle`` (the project's ``allow_pickle_checkpoints`` rule).

``version`` (the answer cache's key) = model reference (hub id and resolved snapshot commit, local
folder, or random model and its version) + weights dtype + autocast dtype + ``max_new_tokens`` +
``PROMPT_VERSION``; the prompt templates themselves are part of every cache key too.
``cached_backend(backend, cache)`` routes ``answer``/``prob_yes`` through
``selma_core.metrics.answer_cache.cached``, keyed by the SHA-256 of each image's bytes: bytes given
as input (e.g. the committed PNG files, preferred) are hashed as they are, a PIL image is hashed as
its lossless PNG encoding (``image_png_bytes``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from selma_core.errors import ConfigError
from selma_core.models.loading import weights_kwargs

if TYPE_CHECKING:
    from PIL import Image

    from selma_core.metrics.answer_cache import AnswerCache

__all__ = [
    "PROMPT_VERSION",
    "VQASCORE_QUESTION",
    "VQA_BACKENDS",
    "Blip2Vqa",
    "CachedVqaBackend",
    "ChatVlmVqa",
    "InstructBlipVqa",
    "VqaBackend",
    "cached_backend",
    "clean_answer",
    "hub_offline",
    "image_png_bytes",
    "load_pretrained",
    "load_vqa_backend",
    "model_reference",
    "to_rgb",
]

log = logging.getLogger(__name__)

#: Bump when a built-in prompt template, the answer normalisation or the scoring rule changes.
PROMPT_VERSION = 1
#: VQAScore's question (t2v_metrics' ``default_question_template``).
VQASCORE_QUESTION = 'Does this figure show "{text}"? Please answer yes or no.'


@runtime_checkable
class VqaBackend(Protocol):
    """A VQA model. ``name`` and ``version`` key the answer cache: ``version`` changes whenever the
    answers may (model, revision, dtype, prompt templates)."""

    name: str
    version: str

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[str]:
        """One short, lowercased, stripped answer per (image, question) pair."""
        ...

    def prob_yes(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
        """VQAScore: P("Yes") to 'does this figure show "text"?', one per (image, text) pair, in [0, 1]."""
        ...


# -- loading ------------------------------------------------------------------------------------


def hub_offline() -> bool:
    """Whether downloads are off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set to a true value)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _load_errors() -> tuple[type[BaseException], ...]:
    """What ``from_pretrained`` raises when a model cannot be found, fetched or read."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    with contextlib.suppress(ImportError):
        from huggingface_hub.errors import HfHubHTTPError

        errors.append(HfHubHTTPError)
    for http_client in ("httpx", "httpx2", "requests"):  # whichever the installed hub client uses
        with contextlib.suppress(ImportError):
            module = __import__(http_client)
            errors.extend(
                e
                for e in (getattr(module, "HTTPError", None), getattr(module, "RequestException", None))
                if e
            )
    return tuple(errors)


#: Seconds the hub may take to answer the one request that checks a model is there.
HUB_PROBE_TIMEOUT_S = 10.0


def _probe_hub(repo_id: str, revision: str | None) -> tuple[str, str] | None:
    """None when the hub serves ``repo_id``; else ``("missing" | "unreachable", why)``.

    One request without retries, so a machine without network learns it in seconds instead of
    sitting through the hub client's retries of every file ``from_pretrained`` asks for.
    """
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:  # no hub client to ask: let from_pretrained find out
        return None
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=HUB_PROBE_TIMEOUT_S)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        return "missing", f"{type(e).__name__}: {str(e).splitlines()[0]}"
    except HfHubHTTPError as e:
        return "unreachable", f"{type(e).__name__}: {str(e).splitlines()[0]}"
    except Exception as e:  # connection refused, DNS failure, timeout, proxy error ...
        return "unreachable", f"{type(e).__name__}: {e}"
    return None


def _snapshot_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit of the cached snapshot ``from_pretrained`` read (None when unknown)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # a best-effort label: never fail a load over it
        return None
    if isinstance(found, str) and Path(found).parent.parent.name == "snapshots":
        return Path(found).parent.name
    return None


def model_reference(spec: str, path: str, revision: str | None = None) -> str:
    """What identifies the weights: ``random:NAME#vN``, ``/abs/folder[@revision]#files`` or
    ``id@commit``. A local folder's ``files`` is a digest of its files' names, sizes and modification
    times: weights replaced in place must not be answered for from the cache (hashing gigabytes of
    weights at every load would cost more than the scores it saves)."""
    from selma_core.models.random_models import RANDOM_MODELS_VERSION, is_random_model

    if is_random_model(spec):
        return f"{spec}#v{RANDOM_MODELS_VERSION}"
    if Path(path).is_dir():
        folder = Path(path).resolve()
        digest = hashlib.sha256()
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = file.stat()
            digest.update(f"{file.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        reference = f"{folder}@{revision}" if revision else str(folder)
        return f"{reference}#{digest.hexdigest()[:16]}"
    return f"{spec}@{_snapshot_commit(spec, revision) or revision or 'main'}"


def _how_to_provide(spec: str, revision: str | None) -> str:
    return (
        f"on a machine with network run `hf download {spec}{f' --revision {revision}' if revision else ''}` "
        "and copy the Hugging Face cache (HF_HOME) here, or give a local folder holding the model"
    )


def load_pretrained(
    spec: str,
    cache_dir: str | Path,
    model_class: Any | None,
    processor_class: Any | None,
    *,
    revision: str | None = None,
    dtype: Any = None,
    allow_pickle: bool = False,
    what: str = "model",
) -> tuple[Any, Any, str]:
    """``(model, processor, reference)`` from a hub id, a local folder or ``random:NAME``; a class that
    is None is not loaded (its slot is None).

    A hub id: offline (``HF_HUB_OFFLINE=1``) only the local Hugging Face cache is read
    (``local_files_only``), and a model that is not there is a ``ConfigError`` naming it and how to
    provide it. Online, one quick request first checks that the hub serves the model; when it does
    not (no network, no such model), the local cache is tried, and failing that the error is a
    ``ConfigError`` (no such model, no access) or an ``EndpointError`` (hub unreachable: worth a
    retry), each naming the model and how to provide it. Other load failures are classified by
    ``selma_core.models.loading.model_load_error``. Weights are read from safetensors only unless
    ``allow_pickle``.
    """
    from selma_core.errors import EndpointError
    from selma_core.models.loading import model_load_error, resolve_model_path
    from selma_core.models.random_models import is_random_model

    path = resolve_model_path(spec, cache_dir)  # ConfigError for an unknown random model or a missing folder
    hub = not is_random_model(spec) and not Path(path).is_dir()
    offline = hub and hub_offline()
    problem = _probe_hub(spec, revision) if hub and not offline else None
    kwargs: dict[str, Any] = {"revision": revision} if revision and hub else {}
    if offline or problem:
        kwargs["local_files_only"] = True
    model_kwargs: dict[str, Any] = dict(kwargs)
    if kwargs.get("local_files_only"):
        # transformers' Auto classes look for a PEFT adapter config without local_files_only (a hub
        # request with retries per file): pass it there too.
        model_kwargs["adapter_kwargs"] = {"local_files_only": True}
    model_kwargs.update(weights_kwargs(allow_pickle))  # the project's one safetensors-only rule
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    mode = (
        " (offline: local cache only)" if offline else " (hub unusable: local cache only)" if problem else ""
    )
    log.info("loading %s %s%s%s", what, spec, f" revision {revision}" if revision else "", mode)
    try:
        processor = processor_class.from_pretrained(path, **kwargs) if processor_class else None
        model = model_class.from_pretrained(path, **model_kwargs) if model_class else None
    except _load_errors() as e:
        if offline:
            raise ConfigError(
                f"{what} {spec!r}: not in the local Hugging Face cache, and downloads are off "
                f"(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE); {_how_to_provide(spec, revision)}: {e}"
            ) from e
        if problem and problem[0] == "missing":
            raise ConfigError(
                f"{what} {spec!r}: no such model{f' or revision {revision!r}' if revision else ''} on the "
                f"Hugging Face hub, or no access (set HF_TOKEN for a gated or private model), and not in the "
                f"local cache: {problem[1]}"
            ) from e
        if problem:
            raise EndpointError(
                f"{what} {spec!r}: the Hugging Face hub is unreachable ({problem[1]}) and the model is not "
                f"in the local cache; retry when it is reachable, or {_how_to_provide(spec, revision)} "
                "(and set HF_HUB_OFFLINE=1 where there is no network)"
            ) from e
        if not allow_pickle and "safetensors" in str(e):
            raise ConfigError(
                f"{what} {spec!r}: no safetensors weights; only safetensors are read (a pickle checkpoint "
                f"can run arbitrary code): convert them, or allow pickle checkpoints: {e}"
            ) from e
        raise model_load_error(path, e) from e
    return model, processor, model_reference(spec, path, revision)


# -- images -------------------------------------------------------------------------------------


def image_png_bytes(image: Image.Image) -> bytes:
    """A lossless PNG encoding of ``image`` (its pixels and mode), for hashing."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def to_rgb(image: Any) -> Image.Image:
    """A PIL image (or the bytes of an image file) as an RGB PIL image."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(image)))
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or image file bytes, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def clean_answer(text: str) -> str:
    """Whitespace collapsed, lowercased, stripped, one trailing period dropped."""
    text = " ".join(text.split()).lower()
    return text[:-1].rstrip() if text.endswith(".") else text


# -- the transformers backends --------------------------------------------------------------------


def torch_dtype(dtype: Any) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16`` (a torch dtype or None passes through)."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        value = getattr(torch, str(dtype))
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"unknown torch dtype {dtype!r} (float32, bfloat16, float16)")
    return value


def dtype_name(dtype: Any) -> str:
    return "none" if dtype is None else str(dtype).removeprefix("torch.")


class _GenerativeVqa:
    """Shared machinery: batching, autocast, greedy generation, answer decoding, P("Yes")."""

    name: ClassVar[str]
    model_class_name: ClassVar[str]
    processor_class_name: ClassVar[str]
    DEFAULT_ANSWER_TEMPLATE: ClassVar[str]
    DEFAULT_YES_TEMPLATE: ClassVar[str]
    DEFAULT_YES_ANSWER: ClassVar[str] = "Yes"

    def __init__(
        self,
        spec: str,
        cache_dir: str | Path,
        *,
        device: str = "auto",
        dtype: Any = "float32",
        autocast_dtype: Any = "bfloat16",
        batch_size: int = 8,
        max_new_tokens: int = 10,
        revision: str | None = None,
        allow_pickle: bool = False,
        answer_template: str | None = None,
        yes_template: str | None = None,
        yes_answer: str | None = None,
        progress: bool = True,
    ) -> None:
        """``dtype``: the weights' dtype; ``autocast_dtype``: the compute dtype of ``torch.autocast``
        on CUDA (None: no autocast; ignored on CPU). ``answer_template`` (``{question}``) and
        ``yes_template`` (``{text}``) replace the class's prompts; ``yes_answer`` (default: the
        class's) is the answer whose first token's probability ``prob_yes`` returns."""
        import transformers

        from selma_core.models.loading import resolve_device

        if batch_size < 1 or max_new_tokens < 1:
            raise ConfigError(f"{self.name}: batch_size and max_new_tokens must be >= 1")
        self.spec = spec
        self.device = resolve_device(device)
        self.dtype = torch_dtype(dtype)
        self.autocast_dtype = torch_dtype(autocast_dtype) if self.device.startswith("cuda") else None
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.progress = progress
        self.answer_template = answer_template or self.DEFAULT_ANSWER_TEMPLATE
        self.yes_template = yes_template or self.DEFAULT_YES_TEMPLATE
        if "{question}" not in self.answer_template or "{text}" not in self.yes_template:
            raise ConfigError(f"{self.name}: answer_template needs {{question}} and yes_template {{text}}")
        self.model, self.processor, self.reference = load_pretrained(
            spec,
            cache_dir,
            getattr(transformers, self.model_class_name),
            getattr(transformers, self.processor_class_name),
            revision=revision,
            dtype=self.dtype,
            allow_pickle=allow_pickle,
            what=f"VQA model ({self.name})",
        )
        self.model = self.model.to(self.device).eval()
        self.tokenizer = self.processor.tokenizer
        config = self.model.config
        self.is_encoder_decoder = bool(
            getattr(config, "is_encoder_decoder", False)
            or getattr(getattr(config, "text_config", None), "is_encoder_decoder", False)
        )
        if not self.is_encoder_decoder:
            self.tokenizer.padding_side = "left"  # a decoder-only model continues the prompt
        yes_answer = yes_answer or self.DEFAULT_YES_ANSWER
        yes_ids = self.tokenizer(yes_answer, add_special_tokens=False).input_ids
        if not yes_ids:
            raise ConfigError(f"{self.name}: the tokenizer of {spec!r} encodes {yes_answer!r} to no tokens")
        self.yes_answer = yes_answer
        self.yes_token_id = int(yes_ids[0])
        self.version = (
            f"{self.reference}|dtype={dtype_name(self.dtype)}|autocast={dtype_name(self.autocast_dtype)}"
            f"|max_new_tokens={max_new_tokens}|yes={yes_answer}|prompts=v{PROMPT_VERSION}"
        )

    # -- what subclasses change ------------------------------------------------------------------

    def _prompt(self, text: str) -> str:
        """The model input for one templated question (a chat VLM wraps it in its chat template)."""
        return text

    # -- the interface ---------------------------------------------------------------------------

    def answer(self, images: Sequence[Any], questions: Sequence[str]) -> list[str]:
        prompts = [self.answer_template.format(question=q) for q in _check(images, questions, "questions")]
        answers: list[str] = []
        for batch_images, batch_prompts in self._batches(images, prompts, "answer"):
            out = self._generate(batch_images, batch_prompts, self.max_new_tokens)
            new_tokens = out.sequences[:, -len(out.logits) :]
            texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            answers.extend(clean_answer(t) for t in texts)
        return answers

    def prob_yes(self, images: Sequence[Any], texts: Sequence[str]) -> list[float]:
        import torch

        prompts = [self.yes_template.format(text=t) for t in _check(images, texts, "texts")]
        scores: list[float] = []
        for batch_images, batch_prompts in self._batches(images, prompts, "prob_yes"):
            out = self._generate(batch_images, batch_prompts, 1)
            probs = torch.softmax(out.logits[0].float(), dim=-1)[:, self.yes_token_id]
            scores.extend(probs.tolist())
        return scores

    # -- machinery -------------------------------------------------------------------------------

    def _batches(self, images: Sequence[Any], prompts: list[str], what: str) -> Iterator[tuple[list, list]]:
        from tqdm import tqdm

        with tqdm(
            total=len(prompts),
            desc=f"{self.name} {what}",
            unit="q",
            disable=not self.progress or len(prompts) <= self.batch_size,
        ) as bar:
            for start in range(0, len(prompts), self.batch_size):
                stop = start + self.batch_size
                yield [to_rgb(i) for i in images[start:stop]], prompts[start:stop]
                bar.update(len(prompts[start:stop]))

    def _autocast(self) -> contextlib.AbstractContextManager:
        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)

    def _inputs(self, images: list, prompts: list[str]) -> Any:
        texts = [self._prompt(p) for p in prompts]
        return self.processor(images=images, text=texts, padding=True, return_tensors="pt")

    def _generate(self, images: list, prompts: list[str], max_new_tokens: int) -> Any:
        import torch

        inputs = self._inputs(images, prompts)
        tensors = {}
        for key, value in inputs.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.is_floating_point():
                value = value.to(self.model.dtype)
            tensors[key] = value.to(self.device)
        with torch.inference_mode(), self._autocast():
            return self.model.generate(
                **tensors,
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                return_dict_in_generate=True,
                output_logits=True,
            )


def _check(images: Sequence[Any], texts: Sequence[str], what: str) -> Sequence[str]:
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} {what}")
    return texts


class Blip2Vqa(_GenerativeVqa):
    """BLIP-2 (``Salesforce/blip2-flan-t5-xl``, SELMA's TIFA VQA model, by default)."""

    DEFAULT_MODEL = "Salesforce/blip2-flan-t5-xl"
    name = "blip2"
    model_class_name = "Blip2ForConditionalGeneration"
    processor_class_name = "Blip2Processor"
    DEFAULT_ANSWER_TEMPLATE = "Question: {question} Answer:"
    DEFAULT_YES_TEMPLATE = "Question: " + VQASCORE_QUESTION + " Answer:"
    DEFAULT_YES_ANSWER = "yes"  # FlanT5 answers in lower case

    def __init__(self, spec: str = DEFAULT_MODEL, cache_dir: str | Path = "selma-data/cache", **kwargs: Any):
        super().__init__(spec, cache_dir, **kwargs)


class InstructBlipVqa(_GenerativeVqa):
    """InstructBLIP (``Salesforce/instructblip-flan-t5-xl`` by default; the Vicuna ones work alike)."""

    DEFAULT_MODEL = "Salesforce/instructblip-flan-t5-xl"
    name = "instructblip"
    model_class_name = "InstructBlipForConditionalGeneration"
    processor_class_name = "InstructBlipProcessor"
    DEFAULT_ANSWER_TEMPLATE = "Question: {question} Short answer:"
    DEFAULT_YES_TEMPLATE = "Question: " + VQASCORE_QUESTION  # t2v_metrics' InstructBLIP template
    DEFAULT_YES_ANSWER = "yes"  # t2v_metrics: "instruct-blip uses 'yes' instead of 'Yes'"

    def __init__(self, spec: str = DEFAULT_MODEL, cache_dir: str | Path = "selma-data/cache", **kwargs: Any):
        super().__init__(spec, cache_dir, **kwargs)

    def _inputs(self, images: list, prompts: list[str]) -> Any:
        """The Q-Former reads the instruction too, but has fewer positions than the language model
        (512 in the released models): a long prompt (a DSG paragraph) keeps its first ones there,
        and the language model still reads it whole."""
        inputs = super()._inputs(images, prompts)
        limit = self.model.config.qformer_config.max_position_embeddings
        for key in ("qformer_input_ids", "qformer_attention_mask"):
            if key in inputs and inputs[key].shape[1] > limit:
                inputs[key] = inputs[key][:, :limit]
        return inputs


class ChatVlmVqa(_GenerativeVqa):
    """Any chat VLM that ``AutoModelForImageTextToText`` and ``AutoProcessor`` load; the question is one
    user turn (the image, then the text) through the processor's chat template."""

    name = "chat-vlm"
    model_class_name = "AutoModelForImageTextToText"
    processor_class_name = "AutoProcessor"
    DEFAULT_ANSWER_TEMPLATE = "{question}\nAnswer the question using a single word or phrase."
    DEFAULT_YES_TEMPLATE = VQASCORE_QUESTION

    def __init__(self, spec: str, cache_dir: str | Path = "selma-data/cache", **kwargs: Any):
        super().__init__(spec, cache_dir, **kwargs)
        if not getattr(self.processor, "chat_template", None):
            raise ConfigError(f"chat VLM {spec!r}: its processor has no chat template")

    def _prompt(self, text: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _inputs(self, images: list, prompts: list[str]) -> Any:
        # As the processor's own apply_chat_template(tokenize=True): a template that writes the BOS
        # token itself must not get a second one from the tokenizer.
        texts = [self._prompt(p) for p in prompts]
        bos = self.tokenizer.bos_token
        kwargs = {"add_special_tokens": False} if bos and texts[0].startswith(bos) else {}
        return self.processor(images=images, text=texts, padding=True, return_tensors="pt", **kwargs)


VQA_BACKENDS: dict[str, type[_GenerativeVqa]] = {
    Blip2Vqa.name: Blip2Vqa,
    InstructBlipVqa.name: InstructBlipVqa,
    ChatVlmVqa.name: ChatVlmVqa,
}


def load_vqa_backend(kind: str, spec: str, cache_dir: str | Path, **kwargs: Any) -> VqaBackend:
    """``kind``: ``blip2``, ``instructblip`` or ``chat-vlm``; ``kwargs`` as the classes take them."""
    if kind not in VQA_BACKENDS:
        raise ConfigError(f"unknown VQA backend {kind!r}; known: {', '.join(VQA_BACKENDS)}")
    return VQA_BACKENDS[kind](spec, cache_dir, **kwargs)


# -- the answer cache ---------------------------------------------------------------------------


class CachedVqaBackend:
    """A ``VqaBackend`` whose answers and scores go through an ``AnswerCache``: only the (image,
    question) pairs the cache lacks reach the wrapped backend, in one call."""

    def __init__(self, backend: VqaBackend, cache: AnswerCache) -> None:
        self.backend = backend
        self.cache = cache
        self.name = backend.name
        self.version = backend.version

    def answer(self, images: Sequence[Any], questions: Sequence[str]) -> list[str]:
        template = getattr(self.backend, "answer_template", "")
        return self._call(self.backend.answer, "answer", f"answer:{template}", images, questions)

    def prob_yes(self, images: Sequence[Any], texts: Sequence[str]) -> list[float]:
        template = getattr(self.backend, "yes_template", "")
        return self._call(self.backend.prob_yes, "score", f"prob_yes:{template}", images, texts)

    def _call(
        self, method: Callable[[list, list[str]], Sequence[Any]], field: Any, template: str, images, texts
    ) -> list[Any]:
        from selma_core.metrics.answer_cache import cached

        _check(images, texts, "texts")
        encoded: dict[int, bytes] = {}  # one encoding per image object, however many questions it gets
        originals: dict[int, Any] = {}  # the encoding's id -> the image given
        blobs: list[bytes] = []
        for image in images:
            if id(image) not in encoded:
                blob = bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else None
                encoded[id(image)] = blob if blob is not None else image_png_bytes(image)
                originals[id(encoded[id(image)])] = image
            blobs.append(encoded[id(image)])

        def compute(missing: list[bytes], questions: list[str]) -> Sequence[Any]:
            return method([originals[id(b)] for b in missing], questions)

        run = cached(compute, self.cache, self.name, self.version, template=template, field=field)
        return run(blobs, list(texts))


def cached_backend(backend: VqaBackend, cache: AnswerCache) -> CachedVqaBackend:
    """``backend`` with its ``answer`` and ``prob_yes`` cached in ``cache`` (keyed by backend name and
    version, image SHA-256, question or text, and prompt template)."""
    return CachedVqaBackend(backend, cache)
