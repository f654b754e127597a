"""The in-process causal LM backend, on a random tiny GPT-2 (its text is garbage: plumbing only)."""

from __future__ import annotations

import pytest
from conftest import REPO

from selma_core.prompting.request import PromptRequest
from selma_core.prompting.transformers_lm import TransformersBackend, TransformersConfig
from selma_core.skills import load_skill


@pytest.fixture(scope="module")
def backend(model_cache):
    cfg = TransformersConfig(model="random:tiny-lm", max_new_tokens=24, batch_size=2)
    return TransformersBackend(cfg, model_cache, "cpu", seed=0)


def requests(n: int) -> list[PromptRequest]:
    skill = load_skill(REPO / "skills", "spatial")
    return [PromptRequest(f"spatial-{i:05d}", skill, tuple(skill.seeds[:3]), 5) for i in range(n)]


def test_batched_sampling_returns_one_reply_per_request_and_counts_tokens(backend):
    before = backend.tokens_used
    replies = backend.complete_batch(requests(3))
    assert len(replies) == 3 and all(isinstance(r, str) for r in replies)
    assert backend.tokens_used > before


def test_sampling_is_seeded(backend):
    assert backend.complete_batch(requests(2)) == backend.complete_batch(requests(2))


def test_the_chat_template_is_used(backend):
    text = backend._text(requests(1)[0])
    assert text.startswith("<|system|>") and text.endswith("<|assistant|>")


def test_a_template_that_refuses_a_system_role_gets_it_in_the_users_message(backend, monkeypatch):
    """Gemma's chat template raises on a system message: its text opens the user's instead."""
    refusing = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
    )
    monkeypatch.setattr(backend.tokenizer, "chat_template", refusing)
    request = requests(1)[0]
    system, user = (m["content"] for m in request.messages())
    assert backend._text(request) == f"<|user|>{system}\n\n{user}<|assistant|>"


def test_a_reply_cut_by_max_new_tokens_loses_its_unfinished_last_line(backend):
    """No end-of-sequence token within max_new_tokens (24 here): the last line is cut off mid-way."""
    from selma_core.prompting.request import without_cut_line

    assert backend.eos_ids  # the model's generation config names its end-of-sequence token
    counted = backend.replies_cut
    cut = backend.complete_batch(requests(2))
    assert backend.replies_cut == counted + 2  # counted, for the too-few-prompts error
    eos_ids, backend.eos_ids = backend.eos_ids, set()  # as if every reply had ended
    try:
        whole = backend.complete_batch(requests(2))
    finally:
        backend.eos_ids = eos_ids
    assert backend.replies_cut == counted + 2
    assert cut == [without_cut_line(text) for text in whole] and cut != whole
    assert backend.token_limit == "prompts.transformers.max_new_tokens: 24"
