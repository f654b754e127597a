"""Third-party benchmark files (DSG-1k, TIFA v1.0): a path the user gives, or a checksummed download.

Why this module: the benchmark files are other people's data under their own licenses, so the project
never copies them into its repository. A job reads them from a path in its configuration, or
downloads them from the upstream repository, at a pinned commit where one is known. A download is
the one place where a third party's bytes enter an evaluation, so it is only trusted once its
SHA-256 matches the one in ``BENCHMARK_FILES`` (or the one the user passes): a changed upstream file,
a proxy's error page or a tampered mirror then stops the job (exit 2) instead of silently changing
published figures.

``benchmark_file(name, path=..., cache_dir=...)`` resolves a file in this order:

1. ``path`` given: used as is (it must exist; its SHA-256 is checked when one is known).
2. A cached copy ``cache_dir/benchmarks/<file name>``: checked against the known SHA-256, or against
   the hash recorded beside it (``<file name>.sha256``) when it was downloaded; one that fails the
   check is downloaded again (when downloads are allowed).
3. A download with ``requests``: streamed to a temporary file in the same folder, hashed while it
   is written, and renamed into place (atomically) only after the size and the hash match, so a
   failed, truncated or tampered download leaves nothing behind.

No download is tried offline (``offline=True``, or ``HF_HUB_OFFLINE`` / ``SELMA_OFFLINE`` set to a
true value when ``offline`` is None): a ``ConfigError`` names the file, its URL and how to provide it.

Safe default for a file whose hash is not known here (TIFA v1.0's question-answer file): the
download needs an expected ``sha256`` from the user. Only an explicit ``verify=False``
(``--no-verify``) downloads it unchecked; its hash is then printed with a warning and recorded beside
the file, so later runs at least detect a copy that changed since.

Errors: ``InputError`` (exit 2) for a missing path or a hash/size mismatch (retrying cannot help);
``ConfigError`` (exit 2) for an unknown name, an offline download, a missing expected hash;
``EndpointError`` (retryable) when the server cannot be reached, answers 5xx/408/429, or the
transfer breaks off.

CLI: ``python -m selma_core.metrics.benchmarks list`` and
``python -m selma_core.metrics.benchmarks fetch NAME [--out DIR]`` (prints one JSON line).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from selma_core.errors import ConfigError, EndpointError, InputError, SelmaError

__all__ = [
    "BENCHMARK_FILES",
    "BenchmarkFile",
    "benchmark_file",
    "download",
    "fetch_bytes",
    "offline_mode",
    "sha256_of",
]

log = logging.getLogger(__name__)

# (connect, read) seconds: a stalled server fails the job (retryable) instead of hanging it.
TIMEOUT = (15.0, 60.0)
_CHUNK = 1 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TRUE = ("1", "ON", "YES", "TRUE")
# Where the CLI caches files when given neither --out nor --cache-dir (the configuration's default cache_dir).
DEFAULT_CACHE_DIR = "selma-data/cache"
_DSG = "https://raw.githubusercontent.com/j-min/DSG"
_TIFA = "https://raw.githubusercontent.com/Yushi-Hu/tifa"


@dataclass(frozen=True)
class BenchmarkFile:
    """One upstream file: where to get it and what its bytes must hash to.

    ``sha256``/``size`` None: not known here (the download then needs the user's expected hash).
    """

    name: str
    filename: str  # the name of the cached copy (upstream's file name)
    url: str
    sha256: str | None
    size: int | None
    description: str
    upstream: str  # the repository, for its license and documentation
    license: str = "Apache-2.0"


# Hashes and sizes: of the upstream copies in ../shared/benchmarks (see its README); the commits are
# ones where the code search index holds the file at that path with the same length in characters.
# DSG moved dsg-1k-anns.csv to dsg/data/ later; the pinned commit still has it at the root.
BENCHMARK_FILES: dict[str, BenchmarkFile] = {
    f.name: f
    for f in (
        BenchmarkFile(
            name="dsg1k-annotations",
            filename="dsg-1k-anns.csv",
            url=f"{_DSG}/3f844c1dadd141e5c7b3e9d68f3889208c9b6248/dsg-1k-anns.csv",
            sha256="b7ce06ea8a0478ccfd8fba105ecd26d7d301eb99d5c412987546c4cc8e08917a",
            size=1906040,
            description="DSG-1k: 1,060 prompts, 8,182 questions with dependency ids (PaLM 2 generated)",
            upstream="https://github.com/j-min/DSG",
        ),
        BenchmarkFile(
            name="dsg1k-answers-pali17b",
            filename="pali17b_dsg.csv",
            url=f"{_DSG}/94fc47e00c023f0294ab85d720ba36c0c5bd493f/vqa_answers_release/pali17b_dsg.csv",
            sha256="ac394cb8116e2e3723e21064683ffa24b34c866bf2450c6fb0ae6688b15dbf85",
            size=858502,
            description="PaLI-17B answers to the DSG-1k questions (SD v2.1 images): the published figures",
            upstream="https://github.com/j-min/DSG",
        ),
        BenchmarkFile(
            name="dsg1k-answers-mplug",
            filename="mplug_dsg.csv",
            url=f"{_DSG}/94fc47e00c023f0294ab85d720ba36c0c5bd493f/vqa_answers_release/mplug_dsg.csv",
            sha256="80feb7ea352dadaca6de97149b9a43c122a5feaec985c32f2fffbf38a39a795c",
            size=859505,
            description="mPLUG-large answers to the DSG-1k questions (SD v2.1 images)",
            upstream="https://github.com/j-min/DSG",
        ),
        BenchmarkFile(
            name="dsg1k-answers-instructblip",
            filename="instructblip_dsg.csv",
            url=f"{_DSG}/94fc47e00c023f0294ab85d720ba36c0c5bd493f/vqa_answers_release/instructblip_dsg.csv",
            sha256="459bf361e237efff7f6e127e66076a1205c1f4912b8ba20dab813b89fe8fbb92",
            size=878640,
            description="InstructBLIP answers to the DSG-1k questions (SD v2.1 images)",
            upstream="https://github.com/j-min/DSG",
        ),
        BenchmarkFile(
            name="tifa-v1-text-inputs",
            filename="tifa_v1.0_text_inputs.json",
            url=f"{_TIFA}/5abab2dc3df7a9fa75db88083c20d6feae243512/tifa_v1.0/tifa_v1.0_text_inputs.json",
            sha256="650281d508b056ac9782bc84d5493626424ee851a8778af90b9db554cfbc1a0f",
            size=549960,
            description="TIFA v1.0: the 4,081 prompts",
            upstream="https://github.com/Yushi-Hu/tifa",
        ),
        # Not in ../shared/benchmarks and not in the code index: no hash, no pinned commit (main branch).
        BenchmarkFile(
            name="tifa-v1-question-answers",
            filename="tifa_v1.0_question_answers.json",
            url=f"{_TIFA}/main/tifa_v1.0/tifa_v1.0_question_answers.json",
            sha256=None,
            size=None,
            description="TIFA v1.0: the GPT-3 generated multiple-choice questions and answers (hash unknown "
            "here: pass --sha256, or --no-verify to record it)",
            upstream="https://github.com/Yushi-Hu/tifa",
        ),
        BenchmarkFile(
            name="tifa-sample-question-answers",
            filename="sample_question_answers.json",
            url=f"{_TIFA}/eb3a0fb6a8b88ce467166abeeb0baa45fb58ea1e/sample/sample_question_answers.json",
            sha256="99b7ffd220d5252de6e729786af057165a97cc8dbc715d9548c25f6842e14fe5",
            size=7233,
            description="TIFA's 3-prompt sample: questions and answers",
            upstream="https://github.com/Yushi-Hu/tifa",
        ),
        BenchmarkFile(
            name="tifa-sample-text-inputs",
            filename="sample_text_inputs.json",
            url=f"{_TIFA}/eb3a0fb6a8b88ce467166abeeb0baa45fb58ea1e/sample/sample_text_inputs.json",
            sha256="f3ad068fe04d0e6e64e15fea2587433db7dffcc03f49bbba2d98cfda049fd853",
            size=272,
            description="TIFA's sample: the prompts",
            upstream="https://github.com/Yushi-Hu/tifa",
        ),
        BenchmarkFile(
            name="tifa-sample-evaluation-result",
            filename="sample_evaluation_result.json",
            url=f"{_TIFA}/eb3a0fb6a8b88ce467166abeeb0baa45fb58ea1e/sample/sample_evaluation_result.json",
            sha256="1661a6a34a0967b3b822d5756e75370fcc44d80685edb926a76c6338aeb3b499",
            size=12008,
            description="TIFA's sample: the expected scored output (tifa_average 0.8125)",
            upstream="https://github.com/Yushi-Hu/tifa",
        ),
    )
}


def offline_mode() -> bool:
    """Whether downloads are off: ``HF_HUB_OFFLINE`` or ``SELMA_OFFLINE`` set to a true value.

    ``HF_HUB_OFFLINE`` counts too because a job without network already sets it for the model hub.
    """
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("SELMA_OFFLINE", ""))
    return any(f.strip().upper() in _TRUE for f in flags)


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file, read in chunks (the files are megabytes; never read whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_hash(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    text = value.strip().lower()
    if not _HEX64.match(text):
        raise ConfigError(f"{what}: expected SHA-256 {value!r} is not 64 hexadecimal digits")
    return text


def _status_error(what: str, url: str, status: int) -> SelmaError:
    """A non-200 answer: retryable for 5xx, timeouts and rate limits; a wrong URL (other 4xx) is not."""
    retryable = status >= 500 or status in (408, 429)
    return (EndpointError if retryable else InputError)(f"{what} {url}: HTTP {status}")


def fetch_bytes(url: str, *, what: str, timeout: tuple[float, float] = TIMEOUT) -> bytes:
    """A small file's bytes over http(s) (e.g. TIFA questions given as a URL), errors mapped as above."""
    import requests

    try:
        with requests.get(url, stream=True, timeout=timeout) as response:
            if response.status_code != 200:
                raise _status_error(what, url, response.status_code)
            return b"".join(response.iter_content(_CHUNK))
    except requests.RequestException as e:
        raise EndpointError(f"{what} {url}: cannot download: {e}") from e


def download(
    url: str,
    dest: Path,
    *,
    what: str,
    sha256: str | None,
    size: int | None = None,
    timeout: tuple[float, float] = TIMEOUT,
) -> str:
    """Download ``url`` to ``dest``; its SHA-256 (checked against ``sha256`` unless that is None).

    The bytes go to a temporary file beside ``dest`` (same file system, so the final ``os.replace`` is
    atomic) and are hashed while written; ``dest`` appears only after the size and hash match, and the
    temporary file is removed on any failure: a reader never sees a partial or unverified file.
    """
    import requests

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        received = 0
        with os.fdopen(fd, "wb") as out:
            try:
                with requests.get(url, stream=True, timeout=timeout) as response:
                    if response.status_code != 200:
                        raise _status_error(what, url, response.status_code)
                    for chunk in response.iter_content(_CHUNK):
                        received += len(chunk)
                        if size is not None and received > size:
                            raise InputError(
                                f"{what} {url}: more than the expected {size} bytes: not the expected file"
                            )
                        digest.update(chunk)
                        out.write(chunk)
            except requests.RequestException as e:
                raise EndpointError(f"{what} {url}: download failed: {e}") from e
            out.flush()
            os.fsync(out.fileno())
        if size is not None and received != size:
            raise EndpointError(f"{what} {url}: download broke off after {received} of {size} bytes")
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256:
            raise InputError(
                f"{what} {url}: SHA-256 {actual} is not the expected {sha256} ({received} bytes received); "
                "the file was not saved"
            )
        os.replace(tmp, dest)
        return actual
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _lookup(name: str) -> BenchmarkFile:
    try:
        return BENCHMARK_FILES[name]
    except KeyError:
        raise ConfigError(
            f"unknown benchmark file {name!r}; known: {', '.join(sorted(BENCHMARK_FILES))}"
        ) from None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _recorded_hash(path: Path) -> str | None:
    """The hash recorded beside a downloaded copy (``sha256sum`` format, ``#`` comments), if any."""
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        return None
    for line in sidecar.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            return _expected_hash(line.split()[0], str(sidecar))
    return None


def _record_hash(path: Path, digest: str, verified: bool) -> None:
    note = (
        "" if verified else "# recorded without verification (--no-verify): compare with a trusted source\n"
    )
    tmp = _sidecar(path).with_suffix(".sha256.part")
    tmp.write_text(f"{note}{digest}  {path.name}\n")
    os.replace(tmp, _sidecar(path))


def _check(path: Path, expected: str, what: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise InputError(f"{what} {path}: SHA-256 {actual} is not the expected {expected}")


def _resolve(
    entry: BenchmarkFile,
    folder: Path,
    *,
    url: str | None,
    sha256: str | None,
    offline: bool | None,
    verify: bool,
) -> tuple[Path, str | None]:
    """The file in ``folder`` (cached or downloaded now) and the hash it was checked against."""
    what = f"benchmark file {entry.name}"
    expected = _expected_hash(sha256, what) or entry.sha256
    # The registry's size belongs to the registry's hash; a user's own hash may name another version.
    size = entry.size if expected == entry.sha256 else None
    source = url or entry.url
    offline = offline_mode() if offline is None else offline
    target = folder / entry.filename
    if target.is_file():
        check_against = expected or _recorded_hash(target)
        if check_against is not None:
            actual = sha256_of(target)
            if actual == check_against:
                return target, check_against
            if offline:
                raise InputError(
                    f"{what}: cached copy {target}: SHA-256 {actual} is not the expected {check_against}; "
                    f"delete it and download it again ({source}), or pass the path of a good copy"
                )
            log.warning(
                "%s: cached copy %s has SHA-256 %s, expected %s: downloading it again",
                what,
                target,
                actual,
                check_against,
            )
    if offline:
        raise ConfigError(
            f"{what} ({entry.filename}) is not in {folder} and downloads are off (offline, or "
            f"HF_HUB_OFFLINE/SELMA_OFFLINE set). Download {source} where there is a network"
            + (f" (SHA-256 {expected})" if expected else "")
            + f", then pass its path (path=..., or put it at {target}); e.g. on a machine with network: "
            f"python -m selma_core.metrics.benchmarks fetch {entry.name} --out DIR"
        )
    if expected is None and verify:
        raise ConfigError(
            f"{what}: no SHA-256 is known for {source}, so the download cannot be checked. Pass the "
            "expected sha256 (--sha256 HEX) from a source you trust, a local path, or verify=False "
            "(--no-verify) to download it unchecked and record its hash"
        )
    actual = download(source, target, what=what, sha256=expected, size=size)
    _record_hash(target, actual, verified=expected is not None)
    if expected is None:
        message = (
            f"WARNING: {what} downloaded from {source} WITHOUT checksum verification (--no-verify). "
            f"Its SHA-256 is {actual} (recorded in {_sidecar(target)}). Compare it with a trusted source "
            "and pass it as sha256 from now on."
        )
        log.warning(message)
        print(f"\n{'!' * 80}\n{message}\n{'!' * 80}\n", file=sys.stderr)
    return target, expected or actual


def benchmark_file(
    name: str,
    *,
    path: str | Path | None = None,
    cache_dir: str | Path,
    url: str | None = None,
    sha256: str | None = None,
    offline: bool | None = None,
    verify: bool = True,
) -> Path:
    """The local path of benchmark file ``name`` (a key of ``BENCHMARK_FILES``), verified.

    ``path``: the user's copy, used as is (checked against ``sha256`` or the registry's hash when one
    is known). Else the copy cached under ``cache_dir/benchmarks/``, else a download from ``url``
    (default: the registry's pinned URL), never when offline (``offline``, or the environment when
    None). ``sha256`` overrides the registry's hash (e.g. for a mirror of another version).
    ``verify=False`` allows downloading a file whose hash is known nowhere; it is then recorded.
    """
    entry = _lookup(name)
    what = f"benchmark file {name}"
    if path is not None:
        given = Path(path).expanduser()
        if not given.is_file():
            raise InputError(f"{what}: {given} not found")
        expected = _expected_hash(sha256, what) or entry.sha256
        if expected is not None:
            _check(given, expected, what)
        return given
    found, _ = _resolve(
        entry,
        Path(cache_dir).expanduser() / "benchmarks",
        url=url,
        sha256=sha256,
        offline=offline,
        verify=verify,
    )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m selma_core.metrics.benchmarks",
        description="Third-party benchmark files, downloaded from upstream with a SHA-256 check. "
        "Exit 2 on invalid input (unknown name, hash mismatch, offline), 1 when the server failed.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="the known files, their sizes, hashes and URLs")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    fetch = sub.add_parser("fetch", help="download (or find in the cache) one file and print its path")
    fetch.add_argument("name", help="a name from `list`")
    fetch.add_argument("--out", type=Path, help="folder to put the file in (default: <cache-dir>/benchmarks)")
    fetch.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help=f"default: {DEFAULT_CACHE_DIR}")
    fetch.add_argument("--url", help="download from here instead (e.g. a mirror); the hash is still checked")
    fetch.add_argument("--sha256", help="expected SHA-256 (needed where the registry knows none)")
    fetch.add_argument(
        "--no-verify",
        action="store_true",
        help="download a file whose hash is unknown without checking it; prints and records its hash",
    )
    fetch.add_argument("--offline", action="store_true", help="never download (only a cached copy)")
    args = parser.parse_args(argv)
    if args.command == "list":
        for entry in BENCHMARK_FILES.values():
            if args.json:
                print(json.dumps(entry.__dict__))
            else:
                size = f"{entry.size:>9}" if entry.size is not None else "        ?"
                print(f"{entry.name:<30} {size}  {entry.sha256 or 'sha256 unknown':<64}  {entry.url}")
        return 0
    try:
        entry = _lookup(args.name)
        folder = args.out if args.out is not None else Path(args.cache_dir).expanduser() / "benchmarks"
        path, digest = _resolve(
            entry,
            folder,
            url=args.url,
            sha256=args.sha256,
            offline=True if args.offline else None,
            verify=not args.no_verify,
        )
    except SelmaError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    verified = digest is not None and (entry.sha256 is not None or args.sha256 is not None)
    print(json.dumps({"name": entry.name, "path": str(path), "sha256": digest, "verified": verified}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
