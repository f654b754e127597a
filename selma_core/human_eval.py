"""Side-by-side human evaluation (the SELMA paper's A/B study): export a rating page, ingest the ratings.

Why: automatic metrics (CLIPScore, TIFA, DSG) are proxies; the paper backs its claims with people
choosing, for one prompt, which of two images (base vs merged, same seed) matches the text better.
This module makes that study cheap and blind:

- ``export_ab_set`` turns an eval folder (``/work/notes/eval_results_schema.md``: ``results.json``
  plus ``images/<variant_slug>/``) into an A/B set: one pair per prompt both variants have (same
  prompt id, same seed, so the only difference is the model), optionally a seeded sample of at most
  ``per_skill`` pairs per skill, pairs in a seeded random order, and the left/right sides drawn per
  pair with the seed. It writes two files:

  * ``page.html``: ONE self-contained page (images as base64 data URIs, inline CSS/JS, a
    Content-Security-Policy that forbids any request) that a rater opens from disk (``file://``, no
    server). It never names a variant: images are re-encoded without metadata (a PNG's text chunks
    may name the model) and pair ids are opaque. The rater answers with buttons or keys, can go
    back and change answers, and saves a ``ratings-<set_id>-<rater>.json`` download.
  * ``key.json``: which variant is on which side of each pair (kept from raters).

- ``ingest_ratings`` maps ratings back to variants through the key and reports, per skill and
  ``"all"``, B's wins, losses and ties against A, and B's win rate ``(wins + ties / 2) / n`` with a
  percentile-bootstrap interval over *pairs* (``selma_core.metrics.bootstrap.bootstrap_ci`` on the
  per-pair outcome 1 / 0.5 / 0, averaged over the raters of the pair: ratings of one pair by several
  raters are not independent, so they are resampled together). Several raters are pooled; a rater
  who rated a pair twice counts once (the last answer wins). With a tracking URI the summary goes to
  MLflow through the project's tracker (metrics ``human.<skill>.win_rate_b`` and its ``_low``,
  ``_high``, ``_n``; the summary as a JSON artifact).

CLI (``python -m selma_core.human_eval --help``): ``export`` and ``ingest``; each prints one JSON
object last; invalid input exits 2 with a message naming it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from selma_core.errors import ConfigError, InputError, SelmaError
from selma_core.metrics.bootstrap import ALL, bootstrap_ci

__all__ = [
    "CHOICES",
    "DEFAULT_EXPERIMENT",
    "DEFAULT_TITLE",
    "QUESTION",
    "export_ab_set",
    "ingest_ratings",
    "log_summary",
    "main",
]

KEY_SCHEMA = "selma.human_eval.key/1"
RATINGS_SCHEMA = "selma.human_eval.ratings/1"
CHOICES = ("left", "right", "tie")
QUESTION = "Which image matches the text better?"
DEFAULT_TITLE = "Side-by-side image rating"
DEFAULT_EXPERIMENT = "selma-human-eval"
PAGE_NAME = "page.html"
KEY_NAME = "key.json"
SUMMARY_ARTIFACT = "human_eval/summary.json"
# Outcome of one rating for variant B: a win, a tie, a loss.
_OUTCOME_WIN, _OUTCOME_TIE, _OUTCOME_LOSS = 1.0, 0.5, 0.0
# MLflow metric names allow these characters; anything else in a skill name becomes "_".
_METRIC_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


# -- reading the eval folder ------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise InputError(f"{what} {path}: no such file") from e
    except OSError as e:
        raise InputError(f"{what} {path}: cannot read: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path}: not valid JSON: {e}") from e


def _variant_slug(variant: str) -> str:
    """The image folder of a variant (the eval schema: ``:`` becomes ``_``)."""
    return variant.replace(":", "_")


def committed_attempt(eval_dir: Path) -> Path:
    """``eval_dir`` itself, or, for an eval output's folder in a local store (its ``_manifest.json``
    beside one folder per commit attempt), the attempt that its manifest says is the committed one."""
    from selma_core.storage.base import MANIFEST

    if (eval_dir / "results.json").is_file() or not (eval_dir / MANIFEST).is_file():
        return eval_dir
    manifest = _read_json(eval_dir / MANIFEST, "eval output manifest")
    attempt = manifest.get("attempt") if isinstance(manifest, dict) else None
    if not isinstance(attempt, str) or not (eval_dir / attempt).is_dir():
        raise InputError(f"eval output {eval_dir}: its {MANIFEST} names no attempt folder beside it")
    return eval_dir / attempt


def _load_rows(eval_dir: Path) -> tuple[dict[str, Any], dict[tuple[str, str], dict[str, Any]]]:
    """``results.json`` and its ``per_prompt`` rows keyed by (variant, prompt id); duplicates are errors."""
    results_path = eval_dir / "results.json"
    results = _read_json(results_path, "eval results")
    if not isinstance(results, dict) or not isinstance(results.get("per_prompt"), list):
        raise InputError(f"eval results {results_path}: expected an object with a 'per_prompt' list")
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for index, row in enumerate(results["per_prompt"]):
        where = f"eval results {results_path}: per_prompt[{index}]"
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected an object, got {type(row).__name__}")
        missing = [k for k in ("variant", "skill", "prompt_id", "prompt", "seed") if k not in row]
        if missing:
            raise InputError(f"{where} (prompt {row.get('prompt_id')!r}): missing {', '.join(missing)}")
        key = (str(row["variant"]), str(row["prompt_id"]))
        if key in rows:
            raise InputError(f"{where}: prompt {key[1]!r} appears twice for variant {key[0]!r}")
        rows[key] = row
    return results, rows


def _image_path(row: dict[str, Any]) -> str:
    """The row's image, relative to the eval folder (the schema's default path when the row has none)."""
    return str(row.get("image") or f"images/{_variant_slug(str(row['variant']))}/{row['prompt_id']}.png")


def _embedded_image(eval_dir: Path, row: dict[str, Any]) -> str:
    """The row's image as a ``data:`` URI, re-encoded as PNG without metadata.

    Why re-encode: a PNG's text chunks (or EXIF) can carry the generation settings, the model or the
    variant's name, which a curious rater could read from the page; re-encoding keeps only pixels.
    """
    from PIL import Image, UnidentifiedImageError

    relative = Path(_image_path(row))
    prompt, variant = row["prompt_id"], row["variant"]
    # Checked by name, not resolved: a store may hand out symlinks, but a row may not point elsewhere.
    if relative.is_absolute() or ".." in relative.parts:
        raise InputError(f"prompt {prompt!r} ({variant}): image {str(relative)!r} lies outside {eval_dir}")
    path = eval_dir / relative
    try:
        with Image.open(path) as image:
            image.load()
            clean = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    except FileNotFoundError as e:
        raise InputError(f"prompt {prompt!r} ({variant}): image {path} does not exist") from e
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"prompt {prompt!r} ({variant}): image {path} is not a readable image: {e}") from e
    buffer = io.BytesIO()
    clean.save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _paired_prompts(
    rows: dict[tuple[str, str], dict[str, Any]], variant_a: str, variant_b: str
) -> tuple[list[str], dict[str, int]]:
    """Prompt ids both variants have (sorted), checked to be the same prompt, skill and seed."""
    ids_a = {pid for (variant, pid) in rows if variant == variant_a}
    ids_b = {pid for (variant, pid) in rows if variant == variant_b}
    for variant, ids in ((variant_a, ids_a), (variant_b, ids_b)):
        if not ids:
            known = sorted({v for (v, _) in rows})
            raise InputError(f"variant {variant!r} has no rows in the eval results (variants: {known})")
    shared = sorted(ids_a & ids_b)
    if not shared:
        raise InputError(f"variants {variant_a!r} and {variant_b!r} share no prompt id")
    for pid in shared:
        a, b = rows[(variant_a, pid)], rows[(variant_b, pid)]
        for field in ("seed", "skill", "prompt"):
            if a[field] != b[field]:
                raise InputError(
                    f"prompt {pid!r}: {field} differs between {variant_a!r} ({a[field]!r}) and "
                    f"{variant_b!r} ({b[field]!r}); the images are not a fair pair"
                )
    unpaired = {variant_a: len(ids_a - ids_b), variant_b: len(ids_b - ids_a)}
    return shared, unpaired


def _sample(
    shared: list[str], skill_of: dict[str, str], per_skill: int | None, rng: np.random.Generator
) -> list[str]:
    """At most ``per_skill`` prompt ids per skill (a seeded sample; skills in sorted order), sorted."""
    if per_skill is None:
        return list(shared)
    chosen: list[str] = []
    for skill in sorted(set(skill_of[pid] for pid in shared)):
        ids = [pid for pid in shared if skill_of[pid] == skill]
        if len(ids) > per_skill:
            picked = rng.choice(len(ids), size=per_skill, replace=False)
            ids = [ids[i] for i in sorted(picked)]
        chosen += ids
    return sorted(chosen)


# -- export -------------------------------------------------------------------------------------------


def export_ab_set(
    eval_dir: str | Path,
    variant_a: str,
    variant_b: str,
    out_dir: str | Path,
    *,
    per_skill: int | None = None,
    seed: int = 0,
    title: str = DEFAULT_TITLE,
) -> dict[str, Any]:
    """Write ``out_dir/page.html`` (the blind rating page) and ``out_dir/key.json``; a summary.

    One pair per prompt id both variants have; prompts only one variant has are left out (counted in
    ``unpaired``). ``per_skill``: at most that many pairs per skill, a sample drawn with ``seed``.
    ``seed`` also draws the order of the pairs and, per pair, which variant is on the left. The set
    id is a digest of the key's content, so the same inputs give the same set (and page), and
    ratings of another set are recognised. An ``out_dir`` already holding another set's key is an
    ``InputError`` (overwriting it would orphan ratings collected for that set).
    """
    eval_dir, out_dir = committed_attempt(Path(eval_dir)), Path(out_dir)
    if variant_a == variant_b:
        raise InputError(f"variants A and B are both {variant_a!r}: nothing to compare")
    if per_skill is not None and (
        not isinstance(per_skill, int) or isinstance(per_skill, bool) or per_skill < 1
    ):
        raise InputError(f"per_skill: expected an integer >= 1, got {per_skill!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed: expected an integer >= 0, got {seed!r}")
    results, rows = _load_rows(eval_dir)
    shared, unpaired = _paired_prompts(rows, variant_a, variant_b)
    skill_of = {pid: str(rows[(variant_a, pid)]["skill"]) for pid in shared}
    rng = np.random.default_rng(int(seed))
    chosen = _sample(shared, skill_of, per_skill, rng)
    order = [chosen[i] for i in rng.permutation(len(chosen))]
    a_on_left = rng.integers(0, 2, size=len(order)).astype(bool)

    width = max(2, len(str(len(order))))
    pairs, page_pairs = [], []
    for number, (pid, left_is_a) in enumerate(zip(order, a_on_left, strict=True), start=1):
        row_a, row_b = rows[(variant_a, pid)], rows[(variant_b, pid)]
        left, right = (variant_a, variant_b) if left_is_a else (variant_b, variant_a)
        pair_id = f"p{number:0{width}d}"
        pairs.append(
            {
                "pair_id": pair_id,
                "skill": skill_of[pid],
                "prompt_id": pid,
                "prompt": str(row_a["prompt"]),
                "seed": row_a["seed"],
                "left": left,
                "right": right,
                "images": {variant_a: _image_path(row_a), variant_b: _image_path(row_b)},
            }
        )
        left_row, right_row = (row_a, row_b) if left_is_a else (row_b, row_a)
        page_pairs.append(
            {
                "pair_id": pair_id,
                "prompt": str(row_a["prompt"]),
                "left": _embedded_image(eval_dir, left_row),
                "right": _embedded_image(eval_dir, right_row),
            }
        )

    skills_order = [str(s) for s in results.get("skills") or []]
    skills = [s for s in skills_order if s in skill_of.values()]
    skills += sorted(set(skill_of.values()) - set(skills))
    results_sha = hashlib.sha256((eval_dir / "results.json").read_bytes()).hexdigest()
    identity = {
        "results_sha256": results_sha,
        "variant_a": variant_a,
        "variant_b": variant_b,
        "pairs": [(p["pair_id"], p["prompt_id"], p["left"]) for p in pairs],
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    set_id = f"ab-{digest[:12]}"
    key = {
        "schema": KEY_SCHEMA,
        "set_id": set_id,
        "variant_a": variant_a,
        "variant_b": variant_b,
        "skills": skills,
        "seed": int(seed),
        "per_skill": per_skill,
        "source": {"eval_dir": str(eval_dir), "results_sha256": results_sha},
        "pairs": pairs,
    }

    key_path, page_path = out_dir / KEY_NAME, out_dir / PAGE_NAME
    if key_path.exists():
        try:
            existing = json.loads(key_path.read_text(encoding="utf-8")).get("set_id")
        except (OSError, json.JSONDecodeError, AttributeError):
            existing = None
        if existing != set_id:
            raise InputError(
                f"{key_path} already holds the key of set {existing!r} (this export is {set_id!r}); "
                "ratings of that set need that key: export to another --out folder"
            )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        page_path.write_text(_page_html(set_id, title, page_pairs), encoding="utf-8")
        key_path.write_text(json.dumps(key, indent=1) + "\n", encoding="utf-8")
    except OSError as e:
        from selma_core.storage.local import NO_SPACE_ERRNOS, no_space_error

        if e.errno in NO_SPACE_ERRNOS:  # a full disk: freeing space helps, so retryable (exit 1)
            raise no_space_error(out_dir, doing="writing the A/B set") from e
        raise InputError(f"--out {out_dir}: cannot write the set: {e}") from e
    per_skill_counts = {s: sum(1 for p in pairs if p["skill"] == s) for s in skills}
    return {
        "set_id": set_id,
        "variant_a": variant_a,
        "variant_b": variant_b,
        "pairs": len(pairs),
        "per_skill": per_skill_counts,
        "unpaired": unpaired,
        "page": str(page_path),
        "key": str(key_path),
        "page_bytes": page_path.stat().st_size,
    }


def _script_json(data: Any) -> str:
    """JSON safe inside ``<script>``: no ``<`` at all, so no ``</script>`` or ``<!--`` can end it early."""
    return json.dumps(data, ensure_ascii=True, separators=(",", ":")).replace("<", "\\u003c")


def _page_html(set_id: str, title: str, pairs: list[dict[str, Any]]) -> str:
    import html

    data = {"set_id": set_id, "pairs": pairs}
    return (
        _PAGE_TEMPLATE.replace("%%TITLE%%", html.escape(title))
        .replace("%%QUESTION%%", html.escape(QUESTION))
        .replace("%%SET_ID%%", html.escape(set_id))
        .replace("%%N%%", str(len(pairs)))
        .replace("%%DATA%%", _script_json(data))
    )


# The page. Kept plain: no framework, no external font or script (the CSP forbids any request), so it
# opens from file:// on an offline laptop. State lives in the page only; saving is a Blob download.
_PAGE_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data: blob:; style-src 'unsafe-inline';
               script-src 'unsafe-inline'">
<title>%%TITLE%%</title>
<style>
  :root { --fg: #1d2430; --muted: #5b6575; --line: #d9dee6; --bg: #f4f6f9; --card: #fff;
          --accent: #2859c5; --accent-soft: #e3ebfb; --ok: #1d7a46; --warn: #b3261e; }
  * { box-sizing: border-box; }
  body { margin: 0; background: var(--bg); color: var(--fg);
         font: 16px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
  header { display: flex; flex-wrap: wrap; gap: .75rem 1.5rem; align-items: center;
           padding: .7rem 1.25rem; background: var(--card); border-bottom: 1px solid var(--line); }
  header h1 { font-size: 1.05rem; margin: 0; font-weight: 600; }
  header label { color: var(--muted); font-size: .9rem; }
  header input { font: inherit; padding: .25rem .5rem; border: 1px solid var(--line); border-radius: 6px;
                 width: 12rem; margin-left: .35rem; }
  .progress { margin-left: auto; display: flex; align-items: center; gap: .6rem; color: var(--muted);
              font-size: .9rem; }
  .bar { width: 10rem; height: .45rem; background: var(--line); border-radius: 99px; overflow: hidden; }
  .bar > div { height: 100%; width: 0; background: var(--accent); transition: width .15s; }
  main { max-width: 1200px; margin: 0 auto; padding: 1rem 1.25rem 2rem; }
  .help { color: var(--muted); font-size: .88rem; margin: 0 0 .8rem; }
  kbd { font: .8rem ui-monospace, SFMono-Regular, Menlo, monospace; padding: .05rem .35rem;
        border: 1px solid var(--line); border-bottom-width: 2px; border-radius: 4px;
        background: var(--card); }
  .question { font-size: .95rem; color: var(--muted); margin: 0; }
  .prompt { font-size: 1.4rem; font-weight: 600; margin: .1rem 0 .7rem; overflow-wrap: anywhere; }
  .images { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
  figure { margin: 0; background: var(--card); border: 2px solid var(--line); border-radius: 10px;
           padding: .5rem; display: flex; flex-direction: column; align-items: center; gap: .3rem; }
  figure.chosen { border-color: var(--accent); background: var(--accent-soft); }
  /* Scaled to fit: as wide as the column, square-ish, never taller than leaves the buttons in view. */
  figure img { display: block; width: 100%; aspect-ratio: 1 / 1;
               max-height: clamp(160px, calc(100vh - 380px), 720px); object-fit: contain;
               background: #e9ecf1; border-radius: 6px; }
  figcaption { color: var(--muted); font-size: .85rem; }
  button { font: inherit; cursor: pointer; border: 1px solid var(--line); background: var(--card);
           color: var(--fg); border-radius: 8px; padding: .5rem 1rem; }
  button:hover:not(:disabled) { border-color: var(--accent); }
  button:disabled { opacity: .45; cursor: default; }
  button.chosen { background: var(--accent); border-color: var(--accent); color: #fff; }
  button.primary { background: var(--accent); border-color: var(--accent); color: #fff; font-weight: 600; }
  .choices { display: grid; grid-template-columns: 1fr auto 1fr; gap: 1rem; margin-top: .75rem; }
  .row { display: flex; justify-content: center; align-items: center; gap: .75rem; margin-top: .75rem; }
  .nav { justify-content: space-between; }
  .status { color: var(--muted); font-size: .9rem; }
  #done { display: none; max-width: 36rem; margin: 3rem auto; background: var(--card); padding: 1.5rem 2rem;
          border: 1px solid var(--line); border-radius: 10px; text-align: center; }
  #done h2 { margin-top: 0; }
  #save-msg { min-height: 1.5em; }
  .ok { color: var(--ok); } .warn { color: var(--warn); }
  @media (max-width: 700px) { header .progress { margin-left: 0; } }  /* images stay side by side */
</style>
</head>
<body>
<header>
  <h1>%%TITLE%%</h1>
  <label>Your name <input id="rater" type="text" autocomplete="name" placeholder="e.g. alice"></label>
  <div class="progress"><span id="progress">Pair 1 of %%N%%</span>
    <div class="bar"><div id="bar"></div></div><span id="answered">0 answered</span></div>
</header>
<main>
  <section id="rate">
    <p class="help">Read the text, then choose the image that shows it more faithfully (objects, counts,
      colours, positions, written text), not the prettier one. If both match equally well or equally badly,
      choose <em>tie</em>. Keys: <kbd>1</kbd> or <kbd>&larr;</kbd> left &middot; <kbd>2</kbd>,
      <kbd>&darr;</kbd> or <kbd>space</kbd> tie &middot; <kbd>3</kbd> or <kbd>&rarr;</kbd> right &middot;
      <kbd>Backspace</kbd> or <kbd>&uarr;</kbd> back to the previous pair. Answering moves on; go back to
      change an answer.</p>
    <p class="question">%%QUESTION%%</p>
    <p class="prompt" id="prompt"></p>
    <div class="images">
      <figure id="fig-left"><img id="img-left" alt="left image"><figcaption>Left</figcaption></figure>
      <figure id="fig-right"><img id="img-right" alt="right image"><figcaption>Right</figcaption></figure>
    </div>
    <div class="choices">
      <button id="btn-left">&larr; Left is better <kbd>1</kbd></button>
      <button id="btn-tie">Tie: about the same <kbd>2</kbd></button>
      <button id="btn-right">Right is better <kbd>3</kbd> &rarr;</button>
    </div>
    <div class="row nav">
      <button id="btn-back">&lsaquo; Back</button>
      <span class="status" id="status"></span>
      <button id="btn-next">Next &rsaquo;</button>
    </div>
    <div class="row"><button id="btn-save-progress">Save progress</button>
      <span class="status" id="progress-msg">(the answers so far, to send or to finish later)</span></div>
  </section>
  <section id="done">
    <h2>All %%N%% pairs answered</h2>
    <p>Thank you. Enter your name at the top if you have not, then save your ratings and send the file
      back. You can still go back and change answers before saving.</p>
    <div class="row"><button id="btn-review">&lsaquo; Back to the last pair</button>
      <button class="primary" id="btn-save">Save ratings</button></div>
    <p id="save-msg"></p>
  </section>
</main>
<script id="set-data" type="application/json">%%DATA%%</script>
<script>
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("set-data").textContent);
  const pairs = data.pairs, n = pairs.length;
  const answers = {};           // pair_id -> {choice, time_s}
  const spent = new Array(n).fill(0);  // seconds each pair has been on screen so far
  let index = 0, shownAt = performance.now(), saved = false;
  const $ = (id) => document.getElementById(id);

  function leave() {            // book the time spent on the pair being left
    if (index < n) spent[index] += (performance.now() - shownAt) / 1000;
    shownAt = performance.now();
  }
  function render() {
    // A button keeps focus after a click, and Enter/space would click it again: answer twice.
    if (document.activeElement && document.activeElement.tagName === "BUTTON") document.activeElement.blur();
    const count = Object.keys(answers).length;
    $("answered").textContent = count + " answered";
    $("bar").style.width = (100 * count / n) + "%";
    if (index >= n) {
      $("rate").style.display = "none"; $("done").style.display = "block";
      $("progress").textContent = "Done: " + n + " of " + n;
      $("btn-save").focus();
      return;
    }
    $("rate").style.display = "block"; $("done").style.display = "none";
    const pair = pairs[index], answer = answers[pair.pair_id];
    $("progress").textContent = "Pair " + (index + 1) + " of " + n;
    $("prompt").textContent = pair.prompt;
    $("img-left").src = pair.left; $("img-right").src = pair.right;
    for (const side of ["left", "right", "tie"]) {
      $("btn-" + side).classList.toggle("chosen", !!answer && answer.choice === side);
    }
    $("fig-left").classList.toggle("chosen", !!answer && answer.choice === "left");
    $("fig-right").classList.toggle("chosen", !!answer && answer.choice === "right");
    $("btn-back").disabled = index === 0;
    $("btn-next").disabled = !answer;
    $("status").textContent = answer ? "Your answer: " + answer.choice + " (choose again to change it)" : "";
  }
  function choose(choice) {
    if (index >= n) return;
    leave();
    const pair = pairs[index];
    answers[pair.pair_id] = {choice: choice, time_s: Math.round(spent[index] * 1000) / 1000};
    saved = false;
    index += 1;
    render();
  }
  function back() {
    if (index === 0) return;
    leave(); index -= 1; render();
  }
  function next() {
    if (index >= n || !answers[pairs[index].pair_id]) return;
    leave(); index += 1; render();
  }
  function save(msg) {            // msg: where to say what happened
    const rater = $("rater").value.trim();
    if (!rater) {
      msg.className = "warn"; msg.textContent = "Please enter your name at the top first.";
      $("rater").focus();
      return;
    }
    const ratings = pairs.filter((p) => answers[p.pair_id]).map((p) => ({
      pair_id: p.pair_id, choice: answers[p.pair_id].choice, time_s: answers[p.pair_id].time_s}));
    const out = {schema: "%%RATINGS_SCHEMA%%", set_id: data.set_id, rater: rater,
                 saved_at: new Date().toISOString(), n_pairs: n, ratings: ratings};
    const name = "ratings-" + data.set_id + "-" + rater.replace(/[^A-Za-z0-9_.-]+/g, "_") + ".json";
    const url = URL.createObjectURL(new Blob([JSON.stringify(out, null, 1)], {type: "application/json"}));
    const link = document.createElement("a");
    link.href = url; link.download = name; link.style.display = "none";
    document.body.appendChild(link); link.click(); link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    saved = true;
    msg.className = "ok"; msg.textContent = "Saved " + ratings.length + " ratings as " + name + ".";
  }

  for (const side of ["left", "right", "tie"]) $("btn-" + side).addEventListener("click", () => choose(side));
  $("btn-back").addEventListener("click", back);
  $("btn-next").addEventListener("click", next);
  $("btn-review").addEventListener("click", back);
  $("btn-save").addEventListener("click", () => save($("save-msg")));
  // A partial file is a valid one (ingest counts the pairs left unrated): a long set need not be
  // finished in one sitting, nor lost with the tab.
  $("btn-save-progress").addEventListener("click", () => save($("progress-msg")));
  document.addEventListener("keydown", (e) => {
    const tag = e.target && e.target.tagName;
    if (tag === "INPUT" || tag === "TEXTAREA" || e.altKey || e.ctrlKey || e.metaKey) return;
    // Space or Enter on a button a keyboard user tabbed to is that button's click, not a tie.
    if (tag === "BUTTON" && (e.key === " " || e.key === "Enter")) return;
    if (index >= n && e.key !== "Backspace" && e.key !== "ArrowUp") return;  // Enter/space on Save stay
    if (e.repeat) { e.preventDefault(); return; }  // a held key answers once, not for every pair
    const action = {"1": "left", "ArrowLeft": "left", "2": "tie", "ArrowDown": "tie", " ": "tie",
                    "3": "right", "ArrowRight": "right"}[e.key];
    if (action) { e.preventDefault(); choose(action); }
    else if (e.key === "Backspace" || e.key === "ArrowUp") { e.preventDefault(); back(); }
  });
  window.addEventListener("beforeunload", (e) => {
    if (Object.keys(answers).length && !saved) { e.preventDefault(); e.returnValue = ""; }
  });
  render();
})();
</script>
</body>
</html>
""".replace("%%RATINGS_SCHEMA%%", RATINGS_SCHEMA)


# -- ingest -------------------------------------------------------------------------------------------


def _load_key(key_path: Path) -> dict[str, Any]:
    key = _read_json(key_path, "key")
    where = f"key {key_path}"
    if not isinstance(key, dict) or not isinstance(key.get("pairs"), list):
        raise InputError(f"{where}: expected an object with a 'pairs' list (written by export)")
    for field in ("set_id", "variant_a", "variant_b"):
        if not isinstance(key.get(field), str):
            raise InputError(f"{where}: missing {field!r}")
    variants = {key["variant_a"], key["variant_b"]}
    for index, pair in enumerate(key["pairs"]):
        if (
            not isinstance(pair, dict)
            or not {"pair_id", "skill", "left", "right"} <= pair.keys()
            or not all(isinstance(pair[f], str) for f in ("pair_id", "skill", "left", "right"))
        ):
            raise InputError(f"{where}: pairs[{index}]: expected pair_id, skill, left, right (strings)")
        if {pair["left"], pair["right"]} != variants:
            raise InputError(
                f"{where}: pair {pair['pair_id']!r}: sides {pair['left']!r}/{pair['right']!r} "
                f"are not the set's variants {sorted(variants)}"
            )
    return key


def _read_ratings(path: Path, key: dict[str, Any], pair_ids: set[str]) -> tuple[str, str, list[tuple]]:
    """(rater, saved_at, [(pair_id, choice, time_s)]) of one rating file, checked against the key."""
    data = _read_json(path, "ratings file")
    where = f"ratings file {path}"
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object (saved by the rating page)")
    if data.get("set_id") != key["set_id"]:
        raise InputError(
            f"{where}: it rates set {data.get('set_id')!r}, but the key is for set {key['set_id']!r}"
        )
    rater = data.get("rater")
    if not isinstance(rater, str) or not rater.strip():
        raise InputError(f"{where}: no rater name")
    entries = data.get("ratings")
    if not isinstance(entries, list):
        raise InputError(f"{where}: expected a 'ratings' list")
    out = []
    for index, entry in enumerate(entries):
        here = f"{where}: ratings[{index}]"
        if not isinstance(entry, dict):
            raise InputError(f"{here}: expected an object with pair_id and choice")
        pair_id, choice = entry.get("pair_id"), entry.get("choice")
        if not isinstance(pair_id, str) or pair_id not in pair_ids:
            raise InputError(f"{here}: pair_id {pair_id!r} is not in set {key['set_id']!r}")
        if choice not in CHOICES:
            raise InputError(f"{here} (pair {pair_id!r}): choice {choice!r} is not one of {list(CHOICES)}")
        time_s = entry.get("time_s")
        if time_s is not None and (
            isinstance(time_s, bool) or not isinstance(time_s, (int, float)) or not math.isfinite(time_s)
        ):
            raise InputError(f"{here} (pair {pair_id!r}): time_s {time_s!r} is not a number")
        out.append((pair_id, choice, None if time_s is None else float(time_s)))
    saved_at = data.get("saved_at")
    return rater.strip(), saved_at if isinstance(saved_at, str) else "", out


def wilson_interval(rate: float, n: int, confidence: float) -> tuple[float, float]:
    """The Wilson score interval of a rate seen over ``n`` trials (here pairs, a tie counting half)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _counts(outcomes: list[float]) -> dict[str, Any]:
    wins = sum(1 for o in outcomes if o == _OUTCOME_WIN)
    losses = sum(1 for o in outcomes if o == _OUTCOME_LOSS)
    ties = len(outcomes) - wins - losses
    n = len(outcomes)
    return {"wins_b": wins, "losses_b": losses, "ties": ties, "n": n, "win_rate_b": (wins + ties / 2) / n}


def ingest_ratings(
    key_path: str | Path,
    rating_paths: Sequence[str | Path],
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
) -> dict[str, Any]:
    """B's wins, losses, ties and win rate against A, per skill and ``"all"``, from rating files.

    Each file must rate the key's set; an unknown pair id or a choice other than left/right/tie is
    an ``InputError`` naming the file and the entry. A rater's repeated answer to a pair counts
    once, the last one winning: files are read in the order they were saved (their ``saved_at``;
    the argument order breaks ties), entries in file order. Raters are pooled: ``n`` counts
    ratings, ``n_pairs`` distinct pairs. ``low``/``high``: ``bootstrap_ci`` (``seed``,
    ``resamples``, ``confidence``) of the per-pair outcome for B (1 win, 0.5 tie, 0 loss, averaged
    over the pair's raters), i.e. pairs are resampled; when every pair has the same outcome (all
    won, say) resampling cannot vary, and the Wilson score interval over ``n_pairs`` is given instead
    (``interval``: which). When every rater rated the same pairs, the mean
    of those per-pair outcomes is ``win_rate_b``; otherwise it may differ a little from the pooled rate
    (in which a pair with more raters weighs more). With ``tracking_uri``, the summary is also logged
    to MLflow (``log_summary``) and the run is named under ``"mlflow"``.
    """
    key_path = Path(key_path)
    if not rating_paths:
        raise InputError("no ratings files given")
    key = _load_key(key_path)
    pairs = {p["pair_id"]: p for p in key["pairs"]}
    variant_b = key["variant_b"]
    files = []
    for position, path in enumerate(rating_paths):
        rater, saved_at, entries = _read_ratings(Path(path), key, set(pairs))
        files.append((saved_at, position, Path(path), rater, entries))
    files.sort(key=lambda f: (f[0], f[1]))

    latest: dict[tuple[str, str], tuple[str, float | None]] = {}  # (rater, pair) -> (choice, time)
    repeated = 0
    for _, _, _, rater, entries in files:
        for pair_id, choice, time_s in entries:
            repeated += (rater, pair_id) in latest
            latest[(rater, pair_id)] = (choice, time_s)
    if not latest:
        raise InputError(f"the ratings files hold no ratings: {', '.join(str(p) for p in rating_paths)}")

    def outcome(pair_id: str, choice: str) -> float:
        if choice == "tie":
            return _OUTCOME_TIE
        return _OUTCOME_WIN if pairs[pair_id][choice] == variant_b else _OUTCOME_LOSS

    by_pair: dict[str, list[float]] = {}
    by_rater: dict[str, list[float]] = {}
    times: dict[str, list[float]] = {}
    for (rater, pair_id), (choice, time_s) in latest.items():
        value = outcome(pair_id, choice)
        by_pair.setdefault(pair_id, []).append(value)
        by_rater.setdefault(rater, []).append(value)
        if time_s is not None:
            times.setdefault(rater, []).append(time_s)

    key_skills = [str(s) for s in key.get("skills") or []]
    rated_skills = {pairs[p]["skill"] for p in by_pair}
    skills = [s for s in key_skills if s in rated_skills] + sorted(rated_skills - set(key_skills))
    if ALL in skills:
        raise InputError(f"key {key_path}: a skill may not be called {ALL!r} (the pooled row's name)")
    groups = {skill: [p for p in sorted(by_pair) if pairs[p]["skill"] == skill] for skill in skills}
    groups[ALL] = sorted(by_pair)
    table: dict[str, dict[str, Any]] = {}
    for group, ids in groups.items():
        row = _counts([o for p in ids for o in by_pair[p]])
        per_pair = {p: float(np.mean(by_pair[p])) for p in ids}
        if len(set(per_pair.values())) > 1:
            interval = bootstrap_ci(per_pair, confidence=confidence, resamples=resamples, seed=seed)
            low, high, method = interval.low, interval.high, "bootstrap"
        else:
            # Every pair went the same way: every resample is the same, a zero-width "interval"
            # that 5 pairs of 5 would claim as certain. The Wilson score interval does not.
            low, high = wilson_interval(next(iter(per_pair.values())), len(per_pair), confidence)
            method = "wilson"
        row.update(n_pairs=len(ids), low=low, high=high, interval=method)
        table[group] = row
    raters = {}
    for rater in sorted(by_rater):
        raters[rater] = _counts(by_rater[rater])
        raters[rater]["median_time_s"] = float(np.median(times[rater])) if times.get(rater) else None
    summary: dict[str, Any] = {
        "set_id": key["set_id"],
        "variant_a": key["variant_a"],
        "variant_b": variant_b,
        "win_rate": "B's (wins + ties / 2) / n; low/high: bootstrap over pairs (the Wilson score "
        "interval over pairs when every pair went the same way)",
        "confidence": confidence,
        "resamples": resamples,
        "seed": seed,
        "files": [str(p) for p in rating_paths],
        "raters": sorted(by_rater),
        "pairs_in_set": len(pairs),
        "pairs_unrated": len(pairs) - len(by_pair),
        "repeated_ratings_dropped": repeated,
        "skills": table,
        "per_rater": raters,
    }
    if tracking_uri:
        run_id = log_summary(summary, tracking_uri, experiment)
        summary["mlflow"] = {"uri": tracking_uri, "experiment": experiment, "run_id": run_id}
    return summary


def _metric_name(skill: str) -> str:
    return _METRIC_UNSAFE.sub("_", skill)


def log_summary(summary: dict[str, Any], tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Log an ``ingest_ratings`` summary as one MLflow run (through the project's tracker); its id.

    Metrics per skill and ``all``: ``human.<skill>.win_rate_b`` with ``_low``, ``_high``, ``_n``
    (ratings), ``_n_pairs``, and the ``wins_b``/``losses_b``/``ties`` counts; the whole summary as
    the ``human_eval/summary.json`` artifact, so the per-rater counts are kept beside the metrics.
    """
    from selma_core.config import TrackingConfig
    from selma_core.tracking import TAG_PHASE, open_tracker

    try:
        tracking = TrackingConfig(uri=tracking_uri)
    except ValueError as e:
        raise ConfigError(f"--tracking-uri: {e}") from e
    tracker = open_tracker(tracking)
    set_id = summary["set_id"]
    run = tracker.start_job_run(
        experiment, None, f"human-eval-{set_id}", {TAG_PHASE: "human_eval", "selma.human_eval.set_id": set_id}
    )
    ok = False
    try:
        run.log_params(
            {
                "set_id": set_id,
                "variant_a": summary["variant_a"],
                "variant_b": summary["variant_b"],
                "raters": ",".join(summary["raters"]),
                "rating_files": len(summary["files"]),
                "confidence": summary["confidence"],
                "resamples": summary["resamples"],
                "seed": summary["seed"],
            }
        )
        metrics: dict[str, float] = {}
        for skill, row in summary["skills"].items():
            prefix = f"human.{_metric_name(skill)}"
            metrics[f"{prefix}.win_rate_b"] = row["win_rate_b"]
            metrics[f"{prefix}.win_rate_b_low"] = row["low"]
            metrics[f"{prefix}.win_rate_b_high"] = row["high"]
            metrics[f"{prefix}.win_rate_b_n"] = row["n"]
            metrics[f"{prefix}.win_rate_b_n_pairs"] = row["n_pairs"]
            for count in ("wins_b", "losses_b", "ties"):
                metrics[f"{prefix}.{count}"] = row[count]
        run.log_metrics(metrics)
        run.log_dict(summary, SUMMARY_ARTIFACT)
        ok = True
    finally:
        tracker.end_job_run(run, ok)
    return run.run_id


# -- CLI ----------------------------------------------------------------------------------------------


def pipeline_eval_dir(config: str, benchmark: str | None = None, models: list[str] | None = None) -> Path:
    """A verified local copy of the eval output that ``config``'s pipeline committed (with the
    ``--benchmark``/``--model`` it was submitted with, which are part of the output's key)."""
    from selma_core.config import load_config
    from selma_core.plan import build_plan
    from selma_core.skills import load_skills
    from selma_core.storage import open_store

    cfg = load_config(config)
    if benchmark:
        cfg.eval.benchmark = benchmark
    if models:
        if any("@" in m for m in models):
            raise ConfigError(
                "--model: give the registry version (models:/NAME/VERSION), as jobs.submit printed it"
            )
        cfg.eval.models = list(models)
    job = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills)).job("eval")
    store = open_store(cfg.storage)
    if not store.is_committed(job.key):
        raise InputError(
            f"{config}: no committed eval output at {store.url(job.key)}; run "
            f"`python -m jobs.submit --phase eval --config {config}` first (an eval submitted with "
            "--benchmark/--model is found with the same flags here)"
        )
    return store.fetch_dir(job.key, cfg.cache_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m selma_core.human_eval",
        description=(
            "Side-by-side human evaluation of two eval variants. 'export' writes a blind rating page "
            "(one self-contained page.html: open it in a browser, no server) and key.json (which variant "
            "is on which side; keep it from raters). 'ingest' reads the ratings files the page saves and "
            "prints B's win rate over A per skill and 'all' with a bootstrap interval. Each prints one "
            "JSON object last; invalid input exits 2."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{export,ingest}")
    export = commands.add_parser(
        "export",
        help="write page.html + key.json from an eval folder",
        description=(
            "One pair per prompt both variants have (same prompt id and seed); sides and order drawn "
            "with --seed. Writes OUT/page.html and OUT/key.json. On the page a rater answers "
            "'Which image matches the text better?' per pair with buttons or keys (1 or Left arrow: left; "
            "2, Down arrow or space: tie; 3 or Right arrow: right; Backspace or Up arrow: back to change "
            "an answer), types a name, and 'Save ratings' downloads ratings-<set_id>-<rater>.json."
        ),
    )
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--eval-dir",
        help="an eval output folder (results.json, images/), or its folder in a local store "
        "(store/eval/<key>: the committed attempt is read)",
    )
    source.add_argument(
        "--config",
        help="a pipeline config: its eval output is fetched from the store (as `jobs.submit --phase eval` "
        "with that config committed it)",
    )
    export.add_argument(
        "--benchmark",
        choices=("heldout", "dsg1k", "tifa"),
        help="with --config: the eval's --benchmark, as submitted (default: the config's)",
    )
    export.add_argument(
        "--model",
        nargs="+",
        metavar="MODEL",
        help="with --config: the eval's --model list, as submitted (default: the config's)",
    )
    export.add_argument("--a", required=True, dest="variant_a", help="variant A, the reference (e.g. base)")
    export.add_argument(
        "--b", required=True, dest="variant_b", help="variant B, the challenger (e.g. merged)"
    )
    export.add_argument(
        "--per-skill", type=int, default=None, help="at most N pairs per skill (a seeded sample); default all"
    )
    export.add_argument(
        "--seed", type=int, default=0, help="seed for the sample, order and sides (default 0)"
    )
    export.add_argument("--title", default=DEFAULT_TITLE, help=f"page heading (default {DEFAULT_TITLE!r})")
    export.add_argument("--out", required=True, help="folder for page.html and key.json")
    ingest = commands.add_parser(
        "ingest",
        help="score ratings files against a key",
        description=(
            "Map each rating back to its variants through the key and report B's wins, losses, ties and "
            "win rate (wins + ties/2)/n per skill and 'all', with a bootstrap interval over pairs, and "
            "per-rater counts. Several raters are pooled; a rater's repeated answer counts once (last wins)."
        ),
    )
    ingest.add_argument("--key", required=True, help="key.json written by export")
    ingest.add_argument("ratings", nargs="+", metavar="RATINGS.json", help="files saved by the rating page")
    ingest.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    ingest.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    ingest.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    ingest.add_argument(
        "--tracking-uri", default=None, help="also log to MLflow: sqlite:///PATH or http(s)://HOST:PORT"
    )
    ingest.add_argument(
        "--experiment",
        default=None,
        help=f"MLflow experiment (with --tracking-uri; default {DEFAULT_EXPERIMENT})",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0), or a usage error argparse explained on stderr
        if e.code:
            print(json.dumps({"error": "invalid command line (see the usage above)"}))
        return int(e.code or 0)
    try:
        if args.command == "export":
            result = export_ab_set(
                args.eval_dir or pipeline_eval_dir(args.config, args.benchmark, args.model),
                args.variant_a,
                args.variant_b,
                args.out,
                per_skill=args.per_skill,
                seed=args.seed,
                title=args.title,
            )
        else:
            if args.experiment and not args.tracking_uri:
                raise ConfigError("--experiment needs --tracking-uri (where to log)")
            if not 0.0 < args.confidence < 1.0:
                raise ConfigError(f"--confidence: expected a number between 0 and 1, got {args.confidence}")
            if args.resamples < 1:
                raise ConfigError(f"--resamples: expected an integer >= 1, got {args.resamples}")
            result = ingest_ratings(
                args.key,
                args.ratings,
                confidence=args.confidence,
                resamples=args.resamples,
                seed=args.seed,
                tracking_uri=args.tracking_uri,
                experiment=args.experiment or DEFAULT_EXPERIMENT,
            )
    except SelmaError as e:
        print(f"error: {e}", file=sys.stderr)
        print(json.dumps({"error": str(e)}))  # the last line is one JSON object, as on success
        return e.exit_code
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
