"""OpenAICompatibleBackend against a real HTTP server on 127.0.0.1 that speaks the OpenAI wire format."""

from __future__ import annotations

from pathlib import Path

import pytest

from selma_core.errors import ConfigError, EndpointError
from selma_core.prompting.openai_compat import OpenAICompatibleBackend, OpenAIConfig, _retry_after
from selma_core.prompting.request import PromptRequest, parse_prompt_list
from selma_core.skills import load_skill

from .fake_openai import FakeOpenAI, Reply, chat_reply, closed_port, completion_reply, error_reply

REPO = Path(__file__).resolve().parents[2]
KEY_ENV = "SELMA_TEST_LLM_KEY"


@pytest.fixture
def server():
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def request_():
    skill = load_skill(REPO / "skills", "counting")
    return PromptRequest("counting-00000", skill, tuple(skill.seeds[:3]), 5)


class Sleeps(list):
    """A ``sleep`` that records how long it was asked to wait, and returns at once."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def backend(base_url: str, sleeps: Sleeps | None = None, **overrides) -> OpenAICompatibleBackend:
    settings = {
        "base_url": base_url,
        "model": "test-model",
        "api_key_env": KEY_ENV,
        "timeout_s": 5.0,
        "max_retries": 3,
        "backoff_s": 0.5,
        **overrides,
    }
    return OpenAICompatibleBackend(OpenAIConfig(**settings), sleep=sleeps if sleeps is not None else Sleeps())


# -- success -----------------------------------------------------------------------------------


def test_chat_success_sends_model_messages_and_key(server, request_, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-123")
    server.set_script([chat_reply("1. a\n2. b", total_tokens=42)])
    sleeps = Sleeps()
    llm = backend(server.base_url, sleeps, temperature=0.7, max_tokens=256)

    text = llm.complete(request_)

    assert text == "1. a\n2. b"
    assert parse_prompt_list(text) == ["a", "b"]
    assert llm.tokens_used == 42
    assert sleeps == []
    assert llm.model_name == "test-model"
    [received] = server.requests
    assert received.path == "/v1/chat/completions"
    assert received.headers["Authorization"] == "Bearer sk-test-123"
    assert received.body == {
        "model": "test-model",
        "temperature": 0.7,
        "max_tokens": 256,
        "messages": request_.messages(),
    }
    assert "prompt" not in received.body


def test_completions_success_sends_prompt_text(server, request_, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-other")
    server.set_script([completion_reply(" three cats\n2. four dogs", total_tokens=9)])
    llm = backend(server.base_url + "/", api="completions")  # a trailing slash is fine

    assert llm.complete(request_) == " three cats\n2. four dogs"
    [received] = server.requests
    assert received.path == "/v1/completions"
    assert received.headers["Authorization"] == "Bearer sk-other"
    assert received.body["model"] == "test-model"
    assert received.body["prompt"] == request_.as_text()
    assert "messages" not in received.body
    assert llm.tokens_used == 9


def test_no_key_sends_no_authorization(server, request_, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert backend(server.base_url).complete(request_) == "1. a\n2. b"
    assert backend(server.base_url, api_key_env="").complete(request_) == "1. a\n2. b"
    assert len(server.requests) == 2
    assert all("Authorization" not in r.headers for r in server.requests)


def test_missing_key_for_api_openai_com_is_a_config_error(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=KEY_ENV):
        OpenAICompatibleBackend(OpenAIConfig(api_key_env=KEY_ENV))


def test_tokens_summed_over_requests(server, request_):
    server.set_script(
        [chat_reply("1. a", 10), chat_reply("1. b", 15), chat_reply("1. c"), chat_reply("1. d", 5)]
    )
    llm = backend(server.base_url)
    assert [llm.complete(request_) for _ in range(4)] == ["1. a", "1. b", "1. c", "1. d"]
    assert llm.tokens_used == 30


@pytest.mark.parametrize(
    "finish_reason, reply", [("length", "1. a\n2. b"), ("stop", "1. a\n2. b\n3. three cats on a")]
)
def test_a_reply_cut_by_the_token_limit_loses_its_unfinished_last_line(
    server, request_, finish_reason, reply
):
    choice = {"message": {"role": "assistant", "content": "1. a\n2. b\n3. three cats on a"}}
    server.set_script([Reply(200, {"choices": [{**choice, "finish_reason": finish_reason}]})])
    assert backend(server.base_url).complete(request_) == reply


def test_without_cut_line():
    from selma_core.prompting.request import without_cut_line

    assert without_cut_line("1. a\n2. b\n3. c") == "1. a\n2. b"
    assert without_cut_line("1. a\n2. b\n") == "1. a\n2. b\n"  # cut between lines: all whole
    assert without_cut_line("1. three cats") == ""


def test_null_content_is_an_empty_reply(server, request_):
    server.set_script([chat_reply(None, 3)])
    llm = backend(server.base_url)
    assert llm.complete(request_) == ""
    assert llm.tokens_used == 3


# -- retries -----------------------------------------------------------------------------------


def test_429_with_retry_after_waits_exactly_that_long(server, request_):
    server.set_script([error_reply(429, "slow down", {"Retry-After": "2"}), chat_reply("1. ok", 4)])
    sleeps = Sleeps()
    llm = backend(server.base_url, sleeps, backoff_s=0.5)
    assert llm.complete(request_) == "1. ok"
    assert sleeps == [2.0]
    assert len(server.requests) == 2
    assert llm.tokens_used == 4


def test_retry_after_is_capped_by_max_backoff(server, request_):
    server.set_script([error_reply(503, headers={"Retry-After": "3600"}), chat_reply("1. ok")])
    sleeps = Sleeps()
    assert backend(server.base_url, sleeps, max_backoff_s=7.0).complete(request_) == "1. ok"
    assert sleeps == [7.0]


def test_retry_after_zero_keeps_the_backoff(server, request_):
    """A rate limiter answering "Retry-After: 0" on every 429 would have every retry fire at once,
    and the job fail in a fraction of a second; the backoff stands (as openai-python does)."""
    server.set_script([error_reply(429, headers={"Retry-After": "0"}), error_reply(429), chat_reply("1. ok")])
    sleeps = Sleeps()
    assert backend(server.base_url, sleeps, backoff_s=0.5).complete(request_) == "1. ok"
    assert sleeps == [0.5, 1.0]


def test_500_then_200_after_exponential_backoff(server, request_):
    server.set_script([error_reply(500), error_reply(502), error_reply(500), chat_reply("1. ok")])
    sleeps = Sleeps()
    assert backend(server.base_url, sleeps, backoff_s=0.5, max_retries=3).complete(request_) == "1. ok"
    assert sleeps == [0.5, 1.0, 2.0]
    assert len(server.requests) == 4


def test_429_then_500_then_200(server, request_):
    server.set_script(
        [error_reply(429, headers={"Retry-After": "2"}), error_reply(500), chat_reply("1. x\n2. y")]
    )
    sleeps = Sleeps()
    assert backend(server.base_url, sleeps, backoff_s=0.25).complete(request_) == "1. x\n2. y"
    # Retry-After wins on the first attempt; the second uses the backoff for attempt 1.
    assert sleeps == [2.0, 0.5]


def test_persistent_500_raises_after_max_retries_plus_one_attempts(server, request_):
    server.set_script([error_reply(500, "boom")])
    sleeps = Sleeps()
    llm = backend(server.base_url, sleeps, max_retries=2, backoff_s=1.0, max_backoff_s=1.5)
    with pytest.raises(EndpointError) as info:
        llm.complete(request_)
    message = str(info.value)
    assert f"{server.base_url}/chat/completions" in message
    assert "failed 3 times" in message
    assert "HTTP 500" in message
    assert "boom" in message
    assert len(server.requests) == 3
    assert sleeps == [1.0, 1.5]  # no sleep after the last attempt; capped at max_backoff_s


def test_max_retries_zero_tries_once(server, request_):
    server.set_script([error_reply(503)])
    sleeps = Sleeps()
    with pytest.raises(EndpointError, match="failed 1 times; last error: HTTP 503"):
        backend(server.base_url, sleeps, max_retries=0).complete(request_)
    assert len(server.requests) == 1
    assert sleeps == []


@pytest.mark.parametrize("status", [401, 403])
def test_refused_key_is_a_config_error_naming_the_env_var(server, request_, status, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    server.set_script([error_reply(status, "invalid api key")])
    sleeps = Sleeps()
    with pytest.raises(ConfigError) as info:
        backend(server.base_url, sleeps).complete(request_)
    assert f"${KEY_ENV}" in str(info.value)
    assert f"HTTP {status}" in str(info.value)
    assert len(server.requests) == 1  # not retried
    assert sleeps == []


def test_a_401_without_a_key_says_none_was_sent(server, request_, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    server.set_script([error_reply(401, "missing api key")])
    with pytest.raises(ConfigError, match=f"wants a key, and none was sent \\(\\${KEY_ENV} is not set\\)"):
        backend(server.base_url).complete(request_)


def test_non_retryable_status_fails_at_once(server, request_):
    server.set_script([error_reply(400, "bad model")])
    sleeps = Sleeps()
    with pytest.raises(ConfigError, match=r"rejected the request \(check .*\): HTTP 400.*bad model"):
        backend(server.base_url, sleeps).complete(request_)
    assert len(server.requests) == 1
    assert sleeps == []


@pytest.mark.parametrize(
    "body",
    [{"error": "nope"}, {"choices": []}, {"choices": [{"message": {}}]}, {"choices": [{"text": "x"}]}, []],
    ids=["no-choices", "empty-choices", "no-content", "completion-shape", "list"],
)
def test_reply_without_choices_is_retried_then_an_endpoint_error(server, request_, body):
    server.set_script([Reply(200, body)])
    with pytest.raises(
        EndpointError, match=r"failed 4 times; last error: .*answered without choices\[0\] text"
    ):
        backend(server.base_url).complete(request_)
    assert len(server.requests) == 4  # a gateway's error sent with 200 may pass: retried like a 5xx


def test_reply_without_choices_then_a_reply(server, request_):
    server.set_script([Reply(200, {"error": "upstream overloaded"}), chat_reply("1. a")])
    assert backend(server.base_url).complete(request_) == "1. a"


def test_200_with_a_non_json_body_is_an_endpoint_error(server, request_):
    server.set_script([Reply(200, "<html>502 Bad Gateway</html>")])
    with pytest.raises(EndpointError, match="chat/completions"):
        backend(server.base_url, max_retries=0).complete(request_)


def test_connection_refused_is_retried_then_names_the_url(request_):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    sleeps = Sleeps()
    with pytest.raises(EndpointError) as info:
        backend(url, sleeps, max_retries=2, backoff_s=0.1).complete(request_)
    message = str(info.value)
    assert f"{url}/chat/completions" in message
    assert "failed 3 times" in message
    assert "ConnectionError" in message
    assert sleeps == [0.1, 0.2]


@pytest.mark.parametrize("status", [520, 522, 524, 529])
def test_gateway_5xx_answers_are_outages_to_retry(server, request_, status):
    server.set_script([error_reply(status, "<html>A timeout occurred</html>"), chat_reply("1. ok")])
    assert backend(server.base_url).complete(request_) == "1. ok"


def test_501_is_not_retried(server, request_):
    server.set_script([error_reply(501)])
    with pytest.raises(ConfigError, match="HTTP 501"):
        backend(server.base_url).complete(request_)
    assert len(server.requests) == 1


def test_a_key_read_from_a_file_loses_its_line_break(server, request_, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-abc\n")  # a Secret made with --from-file
    server.set_script([chat_reply("1. ok")])
    assert backend(server.base_url).complete(request_) == "1. ok"
    assert server.requests[0].headers["Authorization"] == "Bearer sk-abc"


@pytest.mark.parametrize("key", ["sk-live-ABCDEF123\nsk-proj-second", "sk-live-ABCDEF123\u2019second"])
def test_a_key_no_header_can_carry_is_refused_without_saying_it(monkeypatch, request_, key):
    """A line break or a pasted typographic quote: no header can carry it, and the error sending it
    quotes the header. The key must not reach the message (it goes to logs, result lines, MLflow)."""
    monkeypatch.setenv(KEY_ENV, key)
    with pytest.raises(ConfigError) as raised:
        backend("http://127.0.0.1:9/v1")
    assert f"the key in ${KEY_ENV} has a line break, NUL or non-ASCII character" in str(raised.value)
    assert "ABCDEF" not in str(raised.value) and "second" not in str(raised.value)


def test_a_header_that_cannot_be_sent_is_named_without_its_value(monkeypatch, request_):
    llm = backend("http://127.0.0.1:9/v1")
    llm.api_key = "sk-secret\nx"  # past the load-time check
    with pytest.raises(ConfigError) as raised:
        llm.complete(request_)
    assert "the request cannot be made (" in str(raised.value) and "sk-secret" not in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_a_request_that_cannot_be_made_is_a_config_error(request_):
    with pytest.raises(ConfigError, match="cannot be made .*InvalidURL"):
        backend("http://llm-host:80oo/v1").complete(request_)


def test_a_failed_request_ends_its_wave_without_waiting_for_the_others_retries(server, request_):
    """One request's permanent error: the others stop retrying (and paying) at once, their
    Retry-After waits cut short, rather than the job waiting for them (or a SIGTERM for them)."""
    import time

    server.set_script([error_reply(503, headers={"Retry-After": "5"}), error_reply(400, "bad model")])
    llm = backend(server.base_url, sleeps=None, max_retries=3)
    llm.sleep = llm._stop.wait  # the production wait (the tests' Sleeps would not block)
    llm.limiter.sleep = llm.sleep
    started = time.monotonic()
    with pytest.raises(ConfigError, match="bad model"):
        llm.complete_batch([request_, request_])
    assert time.monotonic() - started < 4
    time.sleep(0.2)  # the stopped request makes no further attempt
    assert len(server.requests) == 2


def test_a_failed_wave_hands_back_the_replies_before_the_first_missing_one(request_):
    """Requests 0 and 1 answered, 2 refused, 3 still in flight: the error carries 0's and 1's
    replies, in order (paid for), and nothing of 3's."""
    import dataclasses
    import time

    class ByExample(FakeOpenAI):
        def _reply_to(self, body):
            asked = body["messages"][1]["content"]
            if "marker-2" in asked:
                time.sleep(0.3)  # after 0 and 1 have replied
                return error_reply(400, "bad request 2")
            if "marker-3" in asked:
                time.sleep(3)
            return chat_reply(f"1. reply to {asked.split('marker-')[1][0]}")

    wave = [dataclasses.replace(request_, examples=(f"marker-{i}",)) for i in range(4)]
    with ByExample() as server:
        started = time.monotonic()
        with pytest.raises(ConfigError, match="bad request 2") as info:
            backend(server.base_url, max_retries=0).complete_batch(wave)
        assert time.monotonic() - started < 2.5  # request 3 not waited for
    assert info.value.completed == ["1. reply to 0", "1. reply to 1"]


def test_retry_after_parsing():
    assert _retry_after(None) is None
    assert _retry_after("") is None
    assert _retry_after("2") == 2.0
    assert _retry_after("-5") == 0.0
    assert _retry_after("not a date") is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"base_url": "127.0.0.1:8000/v1"}, "base_url"),
        ({"max_retries": -1}, "max_retries"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"backoff_s": -1}, "backoff_s"),
    ],
)
def test_invalid_config(overrides, key):
    with pytest.raises(ValueError, match=key):
        OpenAIConfig(**overrides)


def test_unknown_api_kind_is_a_config_error_naming_the_choices():
    from selma_core.typed_yaml import from_dict

    with pytest.raises(ConfigError, match=r"llm.yaml: api: expected one of 'chat', 'completions'"):
        from_dict(OpenAIConfig, {"api": "responses"}, "llm.yaml")


def test_rate_limiter_spaces_request_starts():
    from selma_core.prompting.openai_compat import RateLimiter

    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)

    limiter = RateLimiter(per_minute=120, clock=lambda: now[0], sleep=sleep)  # one every 0.5 s
    for _ in range(3):
        limiter.wait()
    assert slept == [0.5, 1.0]  # the 2nd waits 0.5 s, the 3rd 1.0 s (both asked at t=100)
    now[0] = 200.0
    limiter.wait()
    assert slept == [0.5, 1.0]  # long after: no wait
    RateLimiter(None, sleep=sleep).wait()
    assert len(slept) == 2
