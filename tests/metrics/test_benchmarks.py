"""Benchmark files: the registry's hashes are the upstream files', and downloads are checked before use.

Downloads come from ../shared/benchmarks served on 127.0.0.1 (a thread), with the registry entry's URL
pointed there; nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import BENCHMARKS, free_port, needs_benchmarks

from selma_core.errors import ConfigError, EndpointError, InputError
from selma_core.metrics import benchmarks
from selma_core.metrics.benchmarks import BENCHMARK_FILES, benchmark_file, sha256_of

pytestmark = needs_benchmarks

# Registry name -> the upstream copy under ../shared/benchmarks (the answer files are renamed there).
SHARED = {
    "dsg1k-annotations": "dsg/dsg-1k-anns.csv",
    "dsg1k-answers-pali17b": "dsg/pali17b_dsg_answers.csv",
    "dsg1k-answers-mplug": "dsg/mplug_dsg_answers.csv",
    "dsg1k-answers-instructblip": "dsg/instructblip_dsg_answers.csv",
    "tifa-v1-text-inputs": "tifa/tifa_v1.0_text_inputs.json",
    "tifa-sample-question-answers": "tifa/sample_question_answers.json",
    "tifa-sample-text-inputs": "tifa/sample_text_inputs.json",
    "tifa-sample-evaluation-result": "tifa/sample_evaluation_result.json",
}
SMALL = "tifa-sample-text-inputs"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class TruncatingHandler(BaseHTTPRequestHandler):
    """Promises the whole file (Content-Length) and closes the connection after a few bytes."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "272")
        self.end_headers()
        self.wfile.write(b'[\n    {\n        "id"')
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(handler) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def shared_url() -> Iterator[str]:
    """../shared/benchmarks over HTTP on 127.0.0.1."""
    server, url = serve(partial(QuietHandler, directory=str(BENCHMARKS)))
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def online(monkeypatch):
    """Downloads allowed unless a test says otherwise (conftest sets HF_HUB_OFFLINE=1 for the hub)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("SELMA_OFFLINE", raising=False)


def leftovers(cache: Path) -> list[str]:
    folder = cache / "benchmarks"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.mark.parametrize("name", sorted(SHARED))
def test_registry_hashes_and_sizes_are_the_upstream_files(name):
    entry = BENCHMARK_FILES[name]
    copy = BENCHMARKS / SHARED[name]
    assert entry.size == copy.stat().st_size
    assert entry.sha256 == sha256_of(copy)
    assert entry.url.startswith("https://raw.githubusercontent.com/")


def test_registry_urls_are_pinned_where_a_hash_is_known():
    for entry in BENCHMARK_FILES.values():
        assert entry.name and entry.filename and entry.description
        if entry.sha256 is not None:
            commit = entry.url.split("/")[5]
            assert len(commit) == 40 and int(commit, 16) >= 0, entry.url
    assert BENCHMARK_FILES["tifa-v1-question-answers"].sha256 is None


def test_download_verifies_caches_and_then_needs_no_server(tmp_path):
    server, url = serve(partial(QuietHandler, directory=str(BENCHMARKS)))
    try:
        got = benchmark_file(
            "dsg1k-answers-pali17b", cache_dir=tmp_path, url=f"{url}/dsg/pali17b_dsg_answers.csv"
        )
    finally:
        server.shutdown()
        server.server_close()
    assert got == tmp_path / "benchmarks" / "pali17b_dsg.csv"
    assert sha256_of(got) == BENCHMARK_FILES["dsg1k-answers-pali17b"].sha256
    assert leftovers(tmp_path) == ["pali17b_dsg.csv", "pali17b_dsg.csv.sha256"]
    # Cached: the server is gone, and offline is fine too.
    assert benchmark_file("dsg1k-answers-pali17b", cache_dir=tmp_path, offline=True) == got


def test_a_wrong_expected_hash_raises_and_leaves_nothing(tmp_path, shared_url):
    url = f"{shared_url}/tifa/sample_text_inputs.json"
    with pytest.raises(InputError) as e:
        benchmark_file(SMALL, cache_dir=tmp_path, url=url, sha256="0" * 64)
    message = str(e.value)
    assert url in message and "0" * 64 in message
    assert BENCHMARK_FILES[SMALL].sha256 in message  # the actual hash
    assert leftovers(tmp_path) == []


def test_a_tampered_file_with_the_right_size_leaves_nothing(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    original = (BENCHMARKS / SHARED[SMALL]).read_bytes()
    (served / "f.json").write_bytes(original.replace(b"cats", b"rats"))
    server, url = serve(partial(QuietHandler, directory=str(served)))
    try:
        with pytest.raises(InputError, match="SHA-256"):
            benchmark_file(SMALL, cache_dir=tmp_path / "cache", url=f"{url}/f.json")
        (served / "f.json").write_bytes(original + b"\n")  # one byte too many: stopped by the size
        with pytest.raises(InputError, match="272 bytes"):
            benchmark_file(SMALL, cache_dir=tmp_path / "cache", url=f"{url}/f.json")
    finally:
        server.shutdown()
        server.server_close()
    assert leftovers(tmp_path / "cache") == []


def test_a_truncated_download_is_a_retryable_endpoint_error(tmp_path):
    server, url = serve(TruncatingHandler)
    try:
        with pytest.raises(EndpointError, match=url):
            benchmark_file(SMALL, cache_dir=tmp_path, url=f"{url}/sample_text_inputs.json")
    finally:
        server.shutdown()
        server.server_close()
    assert leftovers(tmp_path) == []


def test_an_unreachable_server_is_an_endpoint_error_naming_the_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/sample_text_inputs.json"  # nothing listens there
    with pytest.raises(EndpointError) as e:
        benchmark_file(SMALL, cache_dir=tmp_path, url=url)
    assert url in str(e.value)
    assert leftovers(tmp_path) == []


def test_not_found_upstream_is_not_retryable(tmp_path, shared_url):
    with pytest.raises(InputError, match="HTTP 404"):
        benchmark_file(SMALL, cache_dir=tmp_path, url=f"{shared_url}/tifa/nope.json")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("how", ["argument", "HF_HUB_OFFLINE", "SELMA_OFFLINE"])
def test_offline_never_downloads_and_says_how_to_provide_the_file(tmp_path, monkeypatch, how):
    kwargs = {"offline": True} if how == "argument" else {}
    if how != "argument":
        monkeypatch.setenv(how, "1")
    with socket.socket() as listener:  # would the code connect, this listener would see it
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.05)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.json"
        with pytest.raises(ConfigError) as e:
            benchmark_file(SMALL, cache_dir=tmp_path, url=url, **kwargs)
        with pytest.raises(TimeoutError):
            listener.accept()
    message = str(e.value)
    assert SMALL in message and "sample_text_inputs.json" in message and url in message
    assert "path" in message
    assert leftovers(tmp_path) == []


def test_a_given_path_is_used_as_is_and_checked(tmp_path):
    good = BENCHMARKS / SHARED[SMALL]
    assert benchmark_file(SMALL, path=good, cache_dir=tmp_path, offline=True) == good
    bad = tmp_path / "copy.json"
    bad.write_bytes(good.read_bytes() + b" ")
    with pytest.raises(InputError) as e:
        benchmark_file(SMALL, path=bad, cache_dir=tmp_path, offline=True)
    message = str(e.value)
    assert str(bad) in message
    assert BENCHMARK_FILES[SMALL].sha256 in message
    assert hashlib.sha256(bad.read_bytes()).hexdigest() in message
    with pytest.raises(InputError, match="not found"):
        benchmark_file(SMALL, path=tmp_path / "missing.json", cache_dir=tmp_path)
    # An entry without a known hash: the user's path is taken as is.
    assert benchmark_file("tifa-v1-question-answers", path=bad, cache_dir=tmp_path) == bad


def test_a_corrupted_cached_copy_is_downloaded_again_or_refused_offline(tmp_path, shared_url):
    url = f"{shared_url}/tifa/sample_text_inputs.json"
    cached = benchmark_file(SMALL, cache_dir=tmp_path, url=url)
    cached.write_bytes(b"[]")
    with pytest.raises(InputError, match="cached copy"):
        benchmark_file(SMALL, cache_dir=tmp_path, url=url, offline=True)
    assert benchmark_file(SMALL, cache_dir=tmp_path, url=url) == cached
    assert sha256_of(cached) == BENCHMARK_FILES[SMALL].sha256


def test_unknown_hash_needs_the_users_hash_or_an_explicit_no_verify(tmp_path, shared_url, capsys):
    name = "tifa-v1-question-answers"
    url = f"{shared_url}/tifa/sample_question_answers.json"  # standing in for the full file
    digest = sha256_of(BENCHMARKS / "tifa" / "sample_question_answers.json")
    with pytest.raises(ConfigError, match="--no-verify"):
        benchmark_file(name, cache_dir=tmp_path / "a", url=url)
    assert leftovers(tmp_path / "a") == []
    # With the user's hash: verified like any other.
    assert sha256_of(benchmark_file(name, cache_dir=tmp_path / "a", url=url, sha256=digest.upper())) == digest
    # verify=False: downloaded, the hash printed loudly and recorded beside the file.
    got = benchmark_file(name, cache_dir=tmp_path / "b", url=url, verify=False)
    err = capsys.readouterr().err
    assert "WARNING" in err and "WITHOUT checksum verification" in err and digest in err
    sidecar = got.with_name(got.name + ".sha256")
    assert digest in sidecar.read_text() and "without verification" in sidecar.read_text()
    # Later runs use the recorded hash: the copy is found offline, and a changed copy is refused.
    assert benchmark_file(name, cache_dir=tmp_path / "b", offline=True) == got
    got.write_bytes(b"[]")
    with pytest.raises(InputError, match=digest):
        benchmark_file(name, cache_dir=tmp_path / "b", offline=True)


def test_bad_names_and_hashes_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="dsg1k-annotations"):
        benchmark_file("dsg-1k", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="64 hexadecimal"):
        benchmark_file(SMALL, cache_dir=tmp_path, sha256="abc", offline=True)


def test_cli_list_and_fetch(tmp_path, shared_url, capsys):
    assert benchmarks.main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in BENCHMARK_FILES)
    assert benchmarks.main(["list", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in rows] == list(BENCHMARK_FILES)

    url = f"{shared_url}/tifa/sample_question_answers.json"
    sample = "tifa-sample-question-answers"
    assert benchmarks.main(["fetch", sample, "--out", str(tmp_path), "--url", url]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["path"] == str(tmp_path / "sample_question_answers.json")
    assert printed["verified"] is True
    assert printed["sha256"] == BENCHMARK_FILES["tifa-sample-question-answers"].sha256

    assert benchmarks.main(["fetch", "tifa-v1-question-answers", "--out", str(tmp_path), "--url", url]) == 2
    assert "--no-verify" in capsys.readouterr().err
    empty = tmp_path / "empty"
    assert benchmarks.main(["fetch", SMALL, "--out", str(empty), "--offline"]) == 2
    assert BENCHMARK_FILES[SMALL].url in capsys.readouterr().err


def test_tifa_reads_a_benchmark_file_fetched_here(tmp_path, shared_url):
    """The TIFA loader and this module agree: the sample questions downloaded, verified and loaded."""
    from selma_core.metrics.tifa import load_questions

    url = f"{shared_url}/tifa/sample_question_answers.json"
    path = benchmark_file("tifa-sample-question-answers", cache_dir=tmp_path, url=url)
    from_path = load_questions(path, sha256=BENCHMARK_FILES["tifa-sample-question-answers"].sha256)
    assert from_path == load_questions(url)
