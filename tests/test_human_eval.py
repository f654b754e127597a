"""Side-by-side human evaluation: export a blind rating page, rate it in a real browser, ingest.

The browser test drives Debian's ``chromium`` through ``chromium-driver`` with Selenium (both paths
given, so Selenium Manager never downloads anything). Without the browser it is skipped with how to
install it, except under CI (``CI=true``), where a silent skip would hide that it never ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from selma_core.errors import InputError
from selma_core.human_eval import export_ab_set, ingest_ratings, main, wilson_interval

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SKILLS = ["counting", "spatial"]
VARIANTS = ["base", "expert:counting", "merged"]


def make_eval(root: Path, prompts_per_skill: int = 3, variants: list[str] = VARIANTS) -> Path:
    """A tiny eval folder in the schema's layout: 8x8 PNGs whose text chunk names the variant."""
    rows = []
    for s, skill in enumerate(SKILLS):
        for i in range(prompts_per_skill):
            prompt_id = f"{skill}-{i:05d}"
            for v, variant in enumerate(variants):
                relative = f"images/{variant.replace(':', '_')}/{prompt_id}.png"
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                info = PngImagePlugin.PngInfo()
                info.add_text("parameters", f"model variant {variant}")
                colour = (40 * v + 20, 30 * i + 10, 120 * s + 30)
                Image.new("RGB", (8, 8), colour).save(root / relative, pnginfo=info)
                rows.append(
                    {
                        "variant": variant,
                        "skill": skill,
                        "prompt_id": prompt_id,
                        "prompt": f"{i + 2} red apples left of a {skill} </script> box",
                        "seed": 1000 + 10 * s + i,
                        "image": relative,
                        "scores": {"clip_score": 25.0 + v},
                    }
                )
    results = {"benchmark": "heldout", "skills": SKILLS, "variants": variants, "per_prompt": rows}
    (root / "results.json").write_text(json.dumps(results))
    return root


def edit_rows(eval_dir: Path, edit) -> None:
    results = json.loads((eval_dir / "results.json").read_text())
    edit(results["per_prompt"])
    (eval_dir / "results.json").write_text(json.dumps(results))


def write_ratings(path: Path, set_id: str, rater: str, choices: dict[str, str], saved_at: str = "") -> Path:
    ratings = [{"pair_id": p, "choice": c, "time_s": 1.5} for p, c in choices.items()]
    data = {"set_id": set_id, "rater": rater, "saved_at": saved_at, "ratings": ratings}
    path.write_text(json.dumps(data))
    return path


def outcome_for_b(key: dict, pair_id: str, choice: str) -> float:
    """What a choice means for variant B, from the key: 1 win, 0.5 tie, 0 loss."""
    if choice == "tie":
        return 0.5
    pair = next(p for p in key["pairs"] if p["pair_id"] == pair_id)
    return 1.0 if pair[choice] == key["variant_b"] else 0.0


@pytest.fixture
def eval_dir(tmp_path) -> Path:
    return make_eval(tmp_path / "eval")


# -- export ---------------------------------------------------------------------------------------------


def test_export_pairs_every_shared_prompt_and_records_sides(eval_dir, tmp_path):
    out = export_ab_set(eval_dir, "base", "merged", tmp_path / "set", seed=3)
    key = json.loads(Path(out["key"]).read_text())
    assert out["pairs"] == 6 and out["per_skill"] == {"counting": 3, "spatial": 3}
    assert key["set_id"] == out["set_id"] and key["variant_a"] == "base" and key["variant_b"] == "merged"
    assert sorted(p["prompt_id"] for p in key["pairs"]) == sorted(
        f"{s}-{i:05d}" for s in SKILLS for i in range(3)
    )
    assert [p["pair_id"] for p in key["pairs"]] == [f"p{i:02d}" for i in range(1, 7)]
    for pair in key["pairs"]:
        assert {pair["left"], pair["right"]} == {"base", "merged"}
        assert pair["skill"] == pair["prompt_id"].split("-")[0] and pair["prompt"].endswith("box")
    # Deterministic for a seed (same set id, same page); another seed draws other sides or order.
    again = export_ab_set(eval_dir, "base", "merged", tmp_path / "again", seed=3)
    assert again["set_id"] == out["set_id"]
    assert Path(again["page"]).read_bytes() == Path(out["page"]).read_bytes()
    other = json.loads(
        Path(export_ab_set(eval_dir, "base", "merged", tmp_path / "other", seed=4)["key"]).read_text()
    )
    assert other["set_id"] != key["set_id"]
    assert [(p["prompt_id"], p["left"]) for p in other["pairs"]] != [
        (p["prompt_id"], p["left"]) for p in key["pairs"]
    ]


def test_export_reads_the_committed_attempt_of_an_eval_output_in_a_local_store(eval_dir, tmp_path):
    """store/eval/<key>/ holds one folder per commit attempt; its manifest names the committed one."""
    from selma_core.storage.local import LocalArtifactStore

    store = LocalArtifactStore(tmp_path / "store")
    store.commit_dir(make_eval(tmp_path / "stale"), "eval/abc")  # an earlier attempt (e.g. --force)
    manifest = store.commit_dir(eval_dir, "eval/abc")
    folder = tmp_path / "store" / "eval" / "abc"
    assert len([p for p in folder.iterdir() if p.is_dir()]) == 2
    out = export_ab_set(folder, "base", "merged", tmp_path / "set", seed=3)
    source = json.loads(Path(out["key"]).read_text())["source"]
    assert source["eval_dir"] == str(folder / manifest["attempt"])
    assert out["set_id"] == export_ab_set(eval_dir, "base", "merged", tmp_path / "direct", seed=3)["set_id"]


def test_export_page_is_self_contained_and_blind(eval_dir, tmp_path):
    out = export_ab_set(eval_dir, "expert:counting", "merged", tmp_path / "set")
    page = Path(out["page"]).read_text()
    assert page.count("data:image/png;base64,") == 2 * out["pairs"]
    assert "http://" not in page and "https://" not in page  # nothing fetched from anywhere
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    # No variant name (PNG text chunks are stripped by re-encoding), no image path, no key.
    for leak in ("merged", "expert", "variant", "images/", "counting-0000", '"left":"base'):
        assert leak not in page, leak
    # A prompt holding "</script>" cannot end the data block early.
    assert page.count("</script>") == 2
    assert "Which image matches the text better?" in page


def test_export_per_skill_is_a_seeded_sample(eval_dir, tmp_path):
    first = json.loads(
        Path(export_ab_set(eval_dir, "base", "merged", tmp_path / "a", per_skill=2)["key"]).read_text()
    )
    again = json.loads(
        Path(export_ab_set(eval_dir, "base", "merged", tmp_path / "b", per_skill=2)["key"]).read_text()
    )
    assert first == {**again, "source": first["source"]}
    assert sorted(p["skill"] for p in first["pairs"]) == ["counting", "counting", "spatial", "spatial"]
    picked = {
        seed: {
            p["prompt_id"]
            for p in json.loads(
                Path(
                    export_ab_set(eval_dir, "base", "merged", tmp_path / f"s{seed}", per_skill=1, seed=seed)[
                        "key"
                    ]
                ).read_text()
            )["pairs"]
        }
        for seed in range(6)
    }
    assert len({frozenset(ids) for ids in picked.values()}) > 1  # the seed changes the sample


def test_export_refuses_a_seed_mismatch_naming_the_prompt(eval_dir, tmp_path):
    def bump(rows):
        next(r for r in rows if r["variant"] == "merged" and r["prompt_id"] == "spatial-00001")["seed"] += 1

    edit_rows(eval_dir, bump)
    with pytest.raises(InputError, match=r"spatial-00001.*seed differs"):
        export_ab_set(eval_dir, "base", "merged", tmp_path / "set")
    assert not (tmp_path / "set").exists()


def test_export_leaves_out_prompts_only_one_variant_has(eval_dir, tmp_path):
    edit_rows(eval_dir, lambda rows: rows.remove(next(r for r in rows if r["variant"] == "merged")))
    out = export_ab_set(eval_dir, "base", "merged", tmp_path / "set")
    assert out["pairs"] == 5 and out["unpaired"] == {"base": 1, "merged": 0}


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        ("base", "base", "both 'base'"),
        ("base", "nope", "variant 'nope' has no rows.*'expert:counting'"),
    ],
)
def test_export_rejects_bad_variants(eval_dir, tmp_path, a, b, message):
    with pytest.raises(InputError, match=message):
        export_ab_set(eval_dir, a, b, tmp_path / "set")


def test_export_names_missing_images_and_bad_options(eval_dir, tmp_path):
    (eval_dir / "images" / "merged" / "counting-00002.png").unlink()
    with pytest.raises(InputError, match=r"'counting-00002' \(merged\): image .* does not exist"):
        export_ab_set(eval_dir, "base", "merged", tmp_path / "set")
    with pytest.raises(InputError, match="per_skill"):
        export_ab_set(eval_dir, "base", "merged", tmp_path / "set", per_skill=0)
    with pytest.raises(InputError, match="results.json: no such file"):
        export_ab_set(tmp_path / "nowhere", "base", "merged", tmp_path / "set")


def test_export_will_not_overwrite_another_sets_key(eval_dir, tmp_path):
    export_ab_set(eval_dir, "base", "merged", tmp_path / "set", seed=1)
    export_ab_set(eval_dir, "base", "merged", tmp_path / "set", seed=1)  # the same set: fine
    with pytest.raises(InputError, match="already holds the key of set"):
        export_ab_set(eval_dir, "base", "merged", tmp_path / "set", seed=2)


# -- ingest ---------------------------------------------------------------------------------------------


@pytest.fixture
def ab_set(eval_dir, tmp_path) -> tuple[Path, dict]:
    out = export_ab_set(eval_dir, "base", "merged", tmp_path / "set", seed=5)
    return Path(out["key"]), json.loads(Path(out["key"]).read_text())


def b_side(key: dict, pair_id: str) -> str:
    """The choice that makes B win the pair."""
    pair = next(p for p in key["pairs"] if p["pair_id"] == pair_id)
    return "left" if pair["left"] == key["variant_b"] else "right"


def a_side(key: dict, pair_id: str) -> str:
    return {"left": "right", "right": "left"}[b_side(key, pair_id)]


def test_ingest_counts_wins_per_skill_and_all(ab_set, tmp_path):
    key_path, key = ab_set
    ids = {s: [p["pair_id"] for p in key["pairs"] if p["skill"] == s] for s in SKILLS}
    # counting: B wins, wins, ties; spatial: B loses, loses, wins.
    choices = {
        ids["counting"][0]: b_side(key, ids["counting"][0]),
        ids["counting"][1]: b_side(key, ids["counting"][1]),
        ids["counting"][2]: "tie",
        ids["spatial"][0]: a_side(key, ids["spatial"][0]),
        ids["spatial"][1]: a_side(key, ids["spatial"][1]),
        ids["spatial"][2]: b_side(key, ids["spatial"][2]),
    }
    summary = ingest_ratings(key_path, [write_ratings(tmp_path / "r.json", key["set_id"], "ann", choices)])
    counting, spatial, pooled = (summary["skills"][s] for s in ("counting", "spatial", "all"))
    assert list(summary["skills"]) == ["counting", "spatial", "all"]
    assert (counting["wins_b"], counting["losses_b"], counting["ties"], counting["n"]) == (2, 0, 1, 3)
    assert counting["win_rate_b"] == pytest.approx(2.5 / 3)
    assert (spatial["wins_b"], spatial["losses_b"], spatial["ties"]) == (1, 2, 0)
    assert pooled["win_rate_b"] == pytest.approx(3.5 / 6) and pooled["n"] == pooled["n_pairs"] == 6
    for row in summary["skills"].values():
        assert 0.0 <= row["low"] <= row["win_rate_b"] <= row["high"] <= 1.0
    assert summary["per_rater"]["ann"]["n"] == 6 and summary["per_rater"]["ann"]["median_time_s"] == 1.5
    # Deterministic for a seed.
    assert ingest_ratings(key_path, [tmp_path / "r.json"]) == summary


def test_ingest_pools_raters_and_counts_a_repeated_answer_once(ab_set, tmp_path):
    key_path, key = ab_set
    first, second = key["pairs"][0]["pair_id"], key["pairs"][1]["pair_id"]
    ann_early = write_ratings(
        tmp_path / "ann (1).json", key["set_id"], "ann", {first: a_side(key, first)}, "2025-01-01T10:00:00Z"
    )
    # Ann saved again later, changing her mind (the file that sorts first by name is the newer one).
    ann_late = write_ratings(
        tmp_path / "ann.json",
        key["set_id"],
        "ann",
        {first: b_side(key, first), second: "tie"},
        "2025-01-01T11:00:00Z",
    )
    bob = write_ratings(tmp_path / "bob.json", key["set_id"], "bob", {first: "tie"})
    summary = ingest_ratings(key_path, [ann_late, bob, ann_early])
    pooled = summary["skills"]["all"]
    assert (pooled["wins_b"], pooled["losses_b"], pooled["ties"], pooled["n"], pooled["n_pairs"]) == (
        1,
        0,
        2,
        3,
        2,
    )
    assert summary["raters"] == ["ann", "bob"] and summary["repeated_ratings_dropped"] == 1
    assert summary["per_rater"]["ann"]["wins_b"] == 1 and summary["per_rater"]["bob"]["ties"] == 1
    assert summary["pairs_unrated"] == 4


def test_ingest_repeated_entry_in_one_file_last_wins(ab_set, tmp_path):
    key_path, key = ab_set
    pair_id = key["pairs"][0]["pair_id"]
    path = tmp_path / "r.json"
    ratings = [{"pair_id": pair_id, "choice": a_side(key, pair_id)}, {"pair_id": pair_id, "choice": "tie"}]
    path.write_text(json.dumps({"set_id": key["set_id"], "rater": "ann", "ratings": ratings}))
    pooled = ingest_ratings(key_path, [path])["skills"]["all"]
    assert (pooled["ties"], pooled["n"]) == (1, 1)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(set_id="ab-other"), r"rates set 'ab-other', but the key is for set"),
        (lambda d: d["ratings"].append({"pair_id": "p99", "choice": "left"}), r"ratings\[1\]: pair_id 'p99'"),
        (lambda d: d["ratings"][0].update(choice="both"), r"ratings\[0\] \(pair 'p01'\): choice 'both'"),
        (lambda d: d.update(rater="  "), "no rater name"),
        (lambda d: d["ratings"][0].update(time_s="slow"), "time_s 'slow'"),
    ],
)
def test_ingest_names_the_file_and_entry_of_bad_ratings(ab_set, tmp_path, mutate, message):
    key_path, key = ab_set
    data = {"set_id": key["set_id"], "rater": "ann", "ratings": [{"pair_id": "p01", "choice": "left"}]}
    mutate(data)
    path = tmp_path / "bad-ratings.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=f"bad-ratings.json.*{message}"):
        ingest_ratings(key_path, [path])


def test_ingest_rejects_unreadable_inputs(ab_set, tmp_path):
    key_path, key = ab_set
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputError, match="broken.json: not valid JSON"):
        ingest_ratings(key_path, [tmp_path / "broken.json"])
    empty = write_ratings(tmp_path / "empty.json", key["set_id"], "ann", {})
    with pytest.raises(InputError, match="hold no ratings"):
        ingest_ratings(key_path, [empty])
    with pytest.raises(InputError, match="key .*missing.json: no such file"):
        ingest_ratings(tmp_path / "missing.json", [empty])


def test_ingest_logs_to_mlflow(ab_set, tmp_path):
    from mlflow.tracking import MlflowClient

    key_path, key = ab_set
    choices = {p["pair_id"]: b_side(key, p["pair_id"]) for p in key["pairs"][:4]}
    ratings = write_ratings(tmp_path / "r.json", key["set_id"], "ann", choices)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = ingest_ratings(key_path, [ratings], tracking_uri=uri, experiment="human")
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(summary["mlflow"]["run_id"])
    metrics = run.data.metrics
    assert metrics["human.all.win_rate_b"] == 1.0 and metrics["human.all.win_rate_b_n"] == 4
    assert {"human.all.win_rate_b_low", "human.all.win_rate_b_high"} <= metrics.keys()
    # Every pair won: no resample can vary, so the Wilson interval over 4 pairs, not [1, 1].
    assert summary["skills"]["all"]["interval"] == "wilson"
    assert metrics["human.all.win_rate_b_low"] == pytest.approx(wilson_interval(1.0, 4, 0.95)[0])
    assert 0.4 < metrics["human.all.win_rate_b_low"] < 0.6 and metrics["human.all.win_rate_b_high"] == 1.0
    for skill in {p["skill"] for p in key["pairs"][:4]}:
        assert metrics[f"human.{skill}.win_rate_b"] == summary["skills"][skill]["win_rate_b"]
    assert run.data.params["variant_b"] == "merged" and run.info.status == "FINISHED"
    logged = client.download_artifacts(run.info.run_id, "human_eval/summary.json", str(tmp_path))
    assert json.loads(Path(logged).read_text())["skills"] == summary["skills"]


# -- CLI ------------------------------------------------------------------------------------------------


def test_cli_export_then_ingest_prints_one_json_object(eval_dir, tmp_path, capsys):
    out_dir = tmp_path / "set"
    args = ["export", "--eval-dir", str(eval_dir), "--a", "base", "--b", "merged", "--per-skill", "1"]
    assert main([*args, "--seed", "2", "--out", str(out_dir)]) == 0
    exported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert exported["pairs"] == 2 and Path(exported["page"]).is_file()
    key = json.loads((out_dir / "key.json").read_text())
    ratings = write_ratings(
        tmp_path / "r.json", key["set_id"], "ann", {p["pair_id"]: "tie" for p in key["pairs"]}
    )
    assert main(["ingest", "--key", str(out_dir / "key.json"), str(ratings), "--resamples", "200"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skills"]["all"]["win_rate_b"] == 0.5 and summary["resamples"] == 200


def test_cli_bad_input_exits_2_naming_it(eval_dir, tmp_path, capsys):
    assert main(["ingest", "--key", str(tmp_path / "nokey.json"), str(tmp_path / "r.json")]) == 2
    said = capsys.readouterr()
    assert "nokey.json: no such file" in said.err
    assert "nokey.json: no such file" in json.loads(said.out.strip().splitlines()[-1])["error"]
    assert main(["ingest", "--key", "k.json", "r.json", "--resamples", "x"]) == 2  # a usage error
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"].startswith(
        "invalid command line"
    )
    assert main(["ingest", "--key", "k.json", "r.json", "--experiment", "x"]) == 2
    assert "--experiment needs --tracking-uri" in capsys.readouterr().err
    # The module entry point, as a job would run it: --help, and a bad variant (exit 2, named).
    cli = [sys.executable, "-m", "selma_core.human_eval"]
    shown = subprocess.run([*cli, "export", "--help"], capture_output=True, text=True, cwd=REPO, check=True)
    assert "--per-skill" in shown.stdout and "--eval-dir" in shown.stdout
    bad = [
        *cli,
        "export",
        "--eval-dir",
        str(eval_dir),
        "--a",
        "base",
        "--b",
        "mergd",
        "--out",
        str(tmp_path / "o"),
    ]
    done = subprocess.run(bad, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and "variant 'mergd'" in done.stderr


# -- the real browser -----------------------------------------------------------------------------------


def ensure_browser() -> None:
    """Skip with how to install the browser when it is missing; under CI=true, fail instead."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        how = (
            f"missing {', '.join(missing)}: install with `sudo apt-get install --no-install-recommends "
            "chromium chromium-driver` (or `bash scripts/ensure-browser.sh` as root; `make test` runs it) "
            "and `pip install -e '.[test]'`"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI: the browser test must run, but {how}")
        pytest.skip(how)


@pytest.fixture
def browser(tmp_path):
    ensure_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
    ):
        options.add_argument(arg)
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
            "download.directory_upgrade": True,
        },
    )
    os.environ.setdefault("SE_OFFLINE", "true")  # belt and braces: Selenium Manager never downloads
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    try:
        yield driver, downloads
    finally:
        driver.quit()


def wait_for_download(folder: Path, timeout: float = 10.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [p for p in folder.iterdir() if p.suffix == ".json"]
        if done and not any(p.suffix == ".crdownload" for p in folder.iterdir()):
            return done[0]
        time.sleep(0.05)
    raise AssertionError(f"no download in {folder} after {timeout}s: {list(folder.iterdir())}")


def test_rating_page_in_a_headless_browser(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver, downloads = browser
    eval_dir = make_eval(tmp_path / "eval")
    out = export_ab_set(eval_dir, "base", "merged", tmp_path / "set", per_skill=2, seed=7)
    key = json.loads(Path(out["key"]).read_text())
    assert out["pairs"] == 4
    driver.get(Path(out["page"]).as_uri())

    def text(element_id: str) -> str:
        return driver.find_element(By.ID, element_id).text

    def press(key_name: str) -> None:
        driver.find_element(By.TAG_NAME, "body").send_keys(key_name)

    def prompt_of(index: int) -> str:
        return key["pairs"][index]["prompt"]

    assert text("progress") == "Pair 1 of 4" and text("prompt") == prompt_of(0)
    assert driver.find_element(By.ID, "img-left").get_attribute("src").startswith("data:image/png;base64,")
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    driver.find_element(By.ID, "btn-left").click()  # pair 1: left, by click
    assert text("progress") == "Pair 2 of 4" and text("prompt") == prompt_of(1)
    press("3")  # pair 2: right, by key (changed below)
    press(Keys.SPACE)  # pair 3: tie, by key
    assert text("progress") == "Pair 4 of 4"
    press(Keys.BACKSPACE)  # back to pair 3: its tie is shown
    assert text("progress") == "Pair 3 of 4" and "tie" in text("status")
    press(Keys.ARROW_UP)  # back to pair 2, answered "right"
    assert text("progress") == "Pair 2 of 4" and "chosen" in driver.find_element(
        By.ID, "btn-right"
    ).get_attribute("class")
    press(Keys.ARROW_LEFT)  # change pair 2 to left; moves on to pair 3
    assert text("progress") == "Pair 3 of 4"
    driver.find_element(By.ID, "btn-next").click()  # keep pair 3's tie
    # Pair 4: right, as a keyboard user gives it: Tab to the button, Space (that button, not a tie).
    driver.execute_script("document.getElementById('btn-right').focus()")
    driver.switch_to.active_element.send_keys(Keys.SPACE)
    assert driver.find_element(By.ID, "done").is_displayed() and text("answered") == "4 answered"

    driver.find_element(By.ID, "btn-save").click()  # no name yet: asked for one, nothing saved
    assert "enter your name" in text("save-msg") and not list(downloads.iterdir())
    driver.find_element(By.ID, "rater").send_keys("Ann Rater")
    driver.find_element(By.ID, "btn-save").click()
    saved = wait_for_download(downloads)
    assert saved.name == f"ratings-{key['set_id']}-Ann_Rater.json"
    driver.find_element(By.ID, "btn-review").click()  # progress can be saved while rating, too
    driver.find_element(By.ID, "btn-save-progress").click()
    assert text("progress-msg").startswith("Saved 4 ratings as ")

    ratings = json.loads(saved.read_text())
    expected = {"p01": "left", "p02": "left", "p03": "tie", "p04": "right"}
    assert ratings["set_id"] == key["set_id"] and ratings["rater"] == "Ann Rater"
    assert {r["pair_id"]: r["choice"] for r in ratings["ratings"]} == expected
    assert all(isinstance(r["time_s"], float | int) and r["time_s"] >= 0 for r in ratings["ratings"])

    summary = ingest_ratings(Path(out["key"]), [saved])
    outcomes = {
        p["pair_id"]: (p["skill"], outcome_for_b(key, p["pair_id"], expected[p["pair_id"]]))
        for p in key["pairs"]
    }
    for skill in [*SKILLS, "all"]:
        values = [o for s, o in outcomes.values() if skill in (s, "all")]
        row = summary["skills"][skill]
        assert row["n"] == len(values) == (4 if skill == "all" else 2)
        assert row["win_rate_b"] == pytest.approx(sum(values) / len(values))
        assert (row["wins_b"], row["losses_b"], row["ties"]) == (
            values.count(1.0),
            values.count(0.0),
            values.count(0.5),
        )
    assert summary["per_rater"]["Ann Rater"]["n"] == 4


def test_ensure_browser_script_is_a_no_op_when_installed():
    ensure_browser()
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "ensure-browser.sh")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "installing" not in done.stdout + done.stderr


def test_export_finds_images_by_the_schema_layout_and_keeps_rows_inside(eval_dir, tmp_path):
    edit_rows(eval_dir, lambda rows: [row.pop("image") for row in rows])
    out = export_ab_set(eval_dir, "expert:counting", "merged", tmp_path / "set")
    key = json.loads(Path(out["key"]).read_text())
    assert key["pairs"][0]["images"]["expert:counting"].startswith("images/expert_counting/")

    def escape(rows):
        rows[0]["image"] = "../../etc/passwd"

    edit_rows(eval_dir, escape)
    with pytest.raises(InputError, match="lies outside"):
        export_ab_set(eval_dir, "base", "merged", tmp_path / "other")
