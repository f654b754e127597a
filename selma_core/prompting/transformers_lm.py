"""An in-process Hugging Face causal LM as the prompt writer, for clusters without an LLM API.

Loads ``AutoModelForCausalLM`` from a hub id, a local folder or ``random:tiny-lm`` (a random test
model: its text is garbage, which the prompts phase rejects; it tests the plumbing). Uses the
tokenizer's chat template when it has one, else the plain-text form of the request. Requests are
sampled in batches (left padding), seeded per batch so a rerun writes the same text.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from selma_core.prompting.request import PromptRequest, without_cut_line
from selma_core.typed_yaml import execution_only


@dataclass
class TransformersConfig:
    """Settings for an in-process causal LM."""

    model: str = "Qwen/Qwen2.5-7B-Instruct"
    revision: str | None = None
    max_new_tokens: int = 768
    temperature: float = 1.0
    top_p: float = 0.95
    # Requests sampled together in one generate() call. Execution-only, as a throughput setting,
    # though not without effect: the sampling seed is per batch and batching changes the rounding,
    # so another batch size samples other (equally valid) prompts. Like the openai backend's, the
    # prompts are samples; what the key promises is the settings they were sampled under.
    batch_size: int = execution_only(8)
    # "auto": bfloat16 on CUDA, float32 on CPU.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature}")


class TransformersBackend:
    def __init__(
        self,
        cfg: TransformersConfig,
        cache_dir: str | Path,
        device: str,
        seed: int = 0,
        allow_pickle: bool = False,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from selma_core.models.loading import model_load_error, resolve_model_path, weights_kwargs

        self.cfg, self.device, self.seed = cfg, device, seed
        self.model_name = cfg.model
        self.tokens_used = 0
        self.replies_cut = 0  # replies that max_new_tokens ended
        self.token_limit = f"prompts.transformers.max_new_tokens: {cfg.max_new_tokens}"
        path = resolve_model_path(cfg.model, cache_dir)
        if cfg.dtype == "auto":
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        else:
            dtype = getattr(torch, cfg.dtype)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.revision)
            self.model = AutoModelForCausalLM.from_pretrained(
                path, revision=cfg.revision, dtype=dtype, **weights_kwargs(allow_pickle)
            )
        except (OSError, ValueError) as e:
            raise model_load_error(path, e) from e
        self.model.to(device).eval()
        self.tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {int(t) for t in (eos if isinstance(eos, list) else [eos]) if t is not None}

    def _text(self, request: PromptRequest) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            from jinja2.exceptions import TemplateError

            messages = request.messages()
            try:
                return self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            except TemplateError:
                # Some templates (Gemma's) refuse a system role: its text opens the user's message.
                system, user = messages[0]["content"], messages[1]["content"]
                merged = [{"role": "user", "content": f"{system}\n\n{user}"}]
                return self.tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
        return request.as_text()

    def complete_batch(self, requests: list[PromptRequest]) -> list[str]:
        import torch

        replies: list[str] = []
        for start in range(0, len(requests), self.cfg.batch_size):
            batch = requests[start : start + self.cfg.batch_size]
            inputs = self.tokenizer(
                [self._text(r) for r in batch], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.device)
            seed = zlib.crc32(f"{self.seed}:{batch[0].request_id}".encode())
            torch.manual_seed(seed)
            with torch.no_grad():
                out = self.model.generate(
                    **inputs,
                    do_sample=True,
                    temperature=self.cfg.temperature,
                    top_p=self.cfg.top_p,
                    max_new_tokens=self.cfg.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new = out[:, inputs["input_ids"].shape[1] :]
            self.tokens_used += int(inputs["attention_mask"].sum()) + int(
                (new != self.tokenizer.pad_token_id).sum()
            )
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            for row, text in zip(new.tolist(), texts, strict=True):
                # No end-of-sequence: max_new_tokens cut the reply, and its last prompt is unfinished.
                ended = not self.eos_ids or any(token in self.eos_ids for token in row)
                self.replies_cut += not ended
                replies.append(text if ended else without_cut_line(text))
        return replies
