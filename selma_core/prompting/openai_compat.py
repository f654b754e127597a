"""An OpenAI-compatible HTTP backend (OpenAI, vLLM, TGI, Ollama, LiteLLM...).

Transient failures (connection errors, timeouts, 429, 5xx) are retried with exponential backoff,
honouring ``Retry-After``; after ``max_retries`` the error names the endpoint and the last status.
The API key is read from the environment variable the config names, never from the config itself.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Literal

from selma_core.errors import ConfigError, EndpointError
from selma_core.prompting.request import PromptRequest, without_cut_line
from selma_core.typed_yaml import execution_only

# 4xx worth a retry; every 5xx is one (a gateway's 520-524, an overloaded 529) except those that
# say the server never will (501 not implemented, 505 HTTP version).
RETRYABLE_STATUS = {408, 409, 425, 429}
PERMANENT_5XX = {501, 505}


def retryable(status: int) -> bool:
    return status in RETRYABLE_STATUS or (500 <= status < 600 and status not in PERMANENT_5XX)


@dataclass
class OpenAIConfig:
    """Settings for an OpenAI-compatible endpoint."""

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    # Name of the environment variable holding the key (empty: send no key, as local servers allow).
    api_key_env: str = "OPENAI_API_KEY"
    # "chat" uses /chat/completions, "completions" the plain /completions endpoint.
    api: Literal["chat", "completions"] = "chat"
    temperature: float = 1.0
    max_tokens: int = 1024
    # Seconds to connect, and the longest wait for the reply's next bytes: a reply (not streamed)
    # usually starts once the whole completion is generated, so this bounds generation too. One that
    # times out is retried, as other transient failures are.
    timeout_s: float = execution_only(60.0)
    max_retries: int = execution_only(5)
    backoff_s: float = execution_only(1.0)
    # Upper bound on one wait, whatever Retry-After asks for.
    max_backoff_s: float = execution_only(60.0)
    # An optional cap on requests started per minute (prompts.concurrency sets how many are in flight).
    requests_per_minute: float | None = execution_only(None)

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: expected http(s)://..., got {self.base_url!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: expected > 0, got {self.timeout_s}")
        if not (self.backoff_s >= 0 and self.max_backoff_s >= 0):
            raise ValueError(
                f"backoff_s, max_backoff_s: expected >= 0, got {self.backoff_s}, {self.max_backoff_s}"
            )
        if self.max_retries < 0:
            raise ValueError(f"max_retries: expected >= 0, got {self.max_retries}")
        if self.requests_per_minute is not None and self.requests_per_minute <= 0:
            raise ValueError(f"requests_per_minute: expected > 0, got {self.requests_per_minute}")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class RateLimiter:
    """Spaces request starts at least ``60 / per_minute`` seconds apart, across threads."""

    def __init__(self, per_minute: float | None, clock=time.monotonic, sleep=time.sleep) -> None:
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.clock, self.sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = self.clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self.sleep(start - now)


class OpenAICompatibleBackend:
    def __init__(self, cfg: OpenAIConfig, sleep=None) -> None:
        self.cfg = cfg
        self.model_name = cfg.model
        self._local = threading.local()  # one HTTP session per thread: Session is not thread-safe
        # Set when the wave is abandoned (SIGTERM, another request's permanent error): the other
        # requests stop retrying (and paying) at once, their waits cut short.
        self._stop = threading.Event()
        self.sleep = sleep if sleep is not None else self._stop.wait  # a wait the stop ends
        self.limiter = RateLimiter(cfg.requests_per_minute, sleep=self.sleep)
        self._lock = threading.Lock()
        self.tokens_used = 0
        self.replies_cut = 0  # replies that max_tokens ended (finish_reason "length")
        self.token_limit = f"prompts.openai.max_tokens: {cfg.max_tokens}"
        # Stripped: a Secret made from a file ends the key with a line break, which no header may hold.
        self.api_key = os.environ.get(cfg.api_key_env, "").strip() if cfg.api_key_env else ""
        if any(c in self.api_key for c in "\r\n\0") or not self.api_key.isascii():
            # No header may hold it, and the error sending it would quote the header, key and all.
            raise ConfigError(
                f"prompts.openai.api_key_env: the key in ${cfg.api_key_env} has a line break, NUL or "
                "non-ASCII character (a typographic quote?) inside it: no HTTP header can carry it; "
                "store the key alone, on one line"
            )
        if cfg.api_key_env and not self.api_key and "api.openai.com" in cfg.base_url:
            raise ConfigError(
                f"prompts.openai.api_key_env: environment variable {cfg.api_key_env} is not set "
                f"(the key for {cfg.base_url})"
            )

    def _url(self) -> str:
        path = "chat/completions" if self.cfg.api == "chat" else "completions"
        return f"{self.cfg.base_url.rstrip('/')}/{path}"

    def _payload(self, request: PromptRequest) -> dict:
        payload: dict = {
            "model": self.cfg.model,
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }
        if self.cfg.api == "chat":
            payload["messages"] = request.messages()
        else:
            payload["prompt"] = request.as_text()
        return payload

    @property
    def session(self):
        import requests

        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def complete_batch(self, requests: list[PromptRequest]) -> list[str]:
        """Replies in request order; all of ``requests`` in flight at once (one wave).

        The first error ends the wave, and is raised with ``completed``: the replies, in request
        order, of the requests before the first one without a reply (paid for: the caller keeps
        them). The requests still in flight are not waited for."""
        if len(requests) == 1:
            return [self.complete(requests[0])]
        self._stop.clear()
        pool = ThreadPoolExecutor(max_workers=len(requests))
        futures = []
        try:
            futures = [pool.submit(self.complete, request) for request in requests]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in futures:
                if future in done and future.exception() is not None:
                    raise future.exception()
            return [future.result() for future in futures]
        except BaseException as e:
            self._stop.set()  # not waited for: a job told to stop must not retry on for a minute
            e.completed = _leading_replies(futures)  # type: ignore[attr-defined]
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def complete(self, request: PromptRequest) -> str:
        import requests

        url = self._url()
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        last = "no attempt"
        for attempt in range(self.cfg.max_retries + 1):
            if self._stop.is_set():
                raise EndpointError(f"LLM endpoint {url}: the wave was abandoned; last error: {last}")
            wait = min(self.cfg.backoff_s * 2**attempt, self.cfg.max_backoff_s)
            self.limiter.wait()
            try:
                response = self.session.post(
                    url, json=self._payload(request), headers=headers, timeout=self.cfg.timeout_s
                )
            except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL) as e:
                # Never sent: a key no header can hold, a malformed URL. A header's error quotes the
                # header, the key with it: only its kind is said.
                header = isinstance(e, requests.exceptions.InvalidHeader)
                what = type(e).__name__ if header else f"{type(e).__name__}: {e}"
                raise ConfigError(
                    f"LLM endpoint {url}: the request cannot be made ({what}); check "
                    f"prompts.openai.base_url and the key in ${self.cfg.api_key_env}"
                ) from None
            except requests.RequestException as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if response.status_code == 200:
                    try:
                        return self._text(response.json(), url)
                    except (ValueError, EndpointError) as e:
                        # A 200 that is not JSON (a proxy's error page, a truncated body), or JSON without
                        # a reply (a gateway's {"error": ...}): transient.
                        last = (
                            str(e)
                            if isinstance(e, EndpointError)
                            else f"HTTP 200 with a body that is not JSON: {response.text[:200]!r}"
                        )
                        if attempt < self.cfg.max_retries:
                            self.sleep(wait)
                        continue
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code in (401, 403):
                    unset = (
                        f"${self.cfg.api_key_env}" if self.cfg.api_key_env else "prompts.openai.api_key_env"
                    )
                    what = (
                        f"refused the key from ${self.cfg.api_key_env}"
                        if self.api_key
                        else f"wants a key, and none was sent ({unset} is not set)"
                    )
                    raise ConfigError(f"LLM endpoint {url} {what} ({last})")
                if not retryable(response.status_code):
                    # 400/404/422: a wrong model name or URL; the same request would fail again.
                    raise ConfigError(
                        f"LLM endpoint {url} rejected the request (check prompts.openai.base_url and "
                        f"model {self.cfg.model!r}): {last}"
                    )
                asked = _retry_after(response.headers.get("Retry-After"))
                if asked:  # 0 (or a date past) asks for no wait: the backoff stands, as openai-python does
                    wait = min(asked, self.cfg.max_backoff_s)
            if attempt < self.cfg.max_retries:
                self.sleep(wait)
        raise EndpointError(f"LLM endpoint {url} failed {self.cfg.max_retries + 1} times; last error: {last}")

    def _text(self, data: dict, url: str) -> str:
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if self.cfg.api == "chat" else choice["text"]
        except (KeyError, IndexError, TypeError) as e:
            raise EndpointError(
                f"LLM endpoint {url} answered without choices[0] text: {str(data)[:200]}"
            ) from e
        if text is not None and not isinstance(text, str):
            raise EndpointError(f"LLM endpoint {url} answered with non-text content: {str(text)[:200]}")
        usage = data.get("usage")
        if isinstance(usage, dict):
            # A malformed usage count is not worth failing a request over.
            with contextlib.suppress(TypeError, ValueError), self._lock:
                self.tokens_used += int(usage.get("total_tokens") or 0)
        if choice.get("finish_reason") == "length":
            with self._lock:
                self.replies_cut += 1
            return without_cut_line(text or "")
        return text or ""


def _leading_replies(futures: list) -> list[str]:
    """The replies of the futures that ended with one, up to the first that has none (yet)."""
    replies = []
    for future in futures:
        if not future.done() or future.cancelled() or future.exception() is not None:
            break
        replies.append(future.result())
    return replies
