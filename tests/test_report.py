"""The evaluation report: one self-contained, escaped, deterministic HTML page and its PNG figures."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from selma_core.errors import InputError
from selma_core.report import write_report

SKILLS = ["counting", "spatial"]
VARIANTS = ["base", "expert:counting", "merged"]
METRICS = {
    "clip_score": {"label": "CLIPScore", "higher_is_better": True, "scale": "0-100"},
    "dsg": {
        "label": "DSG (dsg-official)",
        "higher_is_better": True,
        "scale": "0-1",
        "convention": "dsg-official",
    },
}
EVIL = '<script>alert("x")</script> & two "cats"'
VOID = {"meta", "img", "br", "hr", "link", "input", "source", "wbr", "col", "area", "base", "embed", "track"}


class Page(HTMLParser):
    """Collects tags and URL attributes, and checks every non-void element is closed in order."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.imgs: list[str] = []
        self.urls: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "srcset", "action", "poster", "data"):
                self.urls.append(value or "")
        if tag == "img":
            self.imgs.append(dict(attrs).get("src") or "")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    page.close()
    assert not page.errors, page.errors[:5]
    assert page.stack == [], page.stack
    return page


def png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (96, 80)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def make_results(
    eval_dir: Path,
    skills: list[str] = SKILLS,
    variants: list[str] = VARIANTS,
    prompts_per_skill: int = 3,
    images: bool = True,
) -> dict:
    """A small eval folder: results.json per the schema, and tiny PNGs (one left missing)."""
    rows = []
    for s_i, skill in enumerate(skills):
        for p in range(prompts_per_skill):
            pid = f"{skill}-{p:05d}"
            text = EVIL if (skill, p) == (skills[0], 1) else f"{p + 2} red apples on a {skill} table"
            for v_i, variant in enumerate(variants):
                image = f"images/{variant.replace(':', '_')}/{pid}.png"
                if images and (skill, p, variant) != (skills[-1], 0, variants[-1]):
                    png(eval_dir / image, (40 * v_i % 256, 90 + 20 * p, 60 * s_i % 256))
                scores = {"clip_score": 25.0 + v_i + 0.5 * p, "dsg": round(0.5 + 0.1 * v_i + 0.05 * p, 3)}
                rows.append(
                    {
                        "variant": variant,
                        "skill": skill,
                        "prompt_id": pid,
                        "prompt": text,
                        "seed": 1000 + p,
                        "image": image,
                        "scores": scores,
                    }
                )
    summary: dict = {}
    paired: dict = {}
    for metric in METRICS:
        summary[metric], paired[metric] = {}, {}
        for group in [*skills, "all"]:
            chosen = [r for r in rows if group == "all" or r["skill"] == group]
            summary[metric][group], paired[metric][group] = {}, {}
            for v_i, variant in enumerate(variants):
                values = [r["scores"][metric] for r in chosen if r["variant"] == variant]
                mean = sum(values) / len(values)
                half = 0.04 if metric == "dsg" else 0.8
                summary[metric][group][variant] = {
                    "mean": mean,
                    "low": mean - half,
                    "high": mean + half,
                    "n": len(values),
                }
                if variant != "base":
                    diff = 0.1 * v_i if metric == "dsg" else (-0.3 if v_i == 1 else 1.0)
                    low, high = (diff - 0.05, diff + 0.05) if metric == "dsg" else (diff - 0.5, diff + 0.5)
                    paired[metric][group][variant] = {
                        "baseline": "base",
                        "difference": diff,
                        "low": low,
                        "high": high,
                        "p_value": 0.0004 if v_i == 2 else 0.21,
                        "n": len(values),
                    }
    results = {
        "benchmark": "heldout",
        "skills": skills,
        "variants": variants,
        "metrics": json.loads(json.dumps(METRICS)),  # a copy: tests change it
        "per_prompt": rows,
        "summary": summary,
        "paired": paired,
        "confidence": 0.95,
        "wall_s": 12.3,
    }
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "results.json").write_text(json.dumps(results))
    return results


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    results = make_results(root / "eval")
    written = write_report(results, root / "eval", root / "out")
    return results, root, written


def test_the_page_is_self_contained_and_names_everything(report):
    results, root, written = report
    html = written["html"].read_text(encoding="utf-8")
    assert written["html"] == root / "out" / "report.html"
    page = parse(html)
    text = " ".join(page.text)
    for name in [*SKILLS, *VARIANTS, "CLIPScore", "DSG (dsg-official)", "convention: dsg-official", "95% CI"]:
        assert name in text, name
    assert "heldout" in text and "6 (counting 3, spatial 3)" in text
    # Nothing is fetched: every image a data URI, links only to anchors in the page.
    assert page.urls and all(u.startswith(("data:image/", "#")) for u in page.urls), page.urls[:3]
    assert "http://" not in html and "https://" not in html
    assert "<link" not in html and "<script" not in html.lower()
    # 2 bar charts + 2 skills x 3 prompts x 3 variants thumbnails, one of them missing.
    charts = [s for s in page.imgs if s.startswith("data:image/png;base64,")]
    thumbs = [s for s in page.imgs if s.startswith("data:image/jpeg;base64,")]
    assert (len(charts), len(thumbs)) == (2, 17)
    assert html.count("image missing") == 1
    # Paired differences: merged's intervals exclude 0 above (better), expert's CLIPScore does not.
    assert 'class="good"' in html and "▲ +1.00" in html and "p &lt; 0.001" in html
    assert "[-0.80, +0.20]" in html  # an interval that contains 0, not highlighted


def test_prompts_are_escaped(report):
    _, _, written = report
    html = written["html"].read_text(encoding="utf-8")
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; two &quot;cats&quot;" in html
    assert EVIL in " ".join(parse(html).text)  # and reads back as the prompt


def test_figures_are_pngs_of_a_sane_size(report):
    _, root, written = report
    figures = root / "out" / "figures"
    assert written["figures"] == [
        figures / "clip_score.png",
        figures / "dsg.png",
        figures / "samples_counting.png",
        figures / "samples_spatial.png",
    ]
    for path in written["figures"]:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG"
            width, height = image.size
            assert 500 <= width <= 3000 and 300 <= height <= 3000, (path.name, image.size)
            assert image.getextrema() != ((255, 255),) * 3  # something is drawn
            assert "Software" not in image.info and "Creation Time" not in image.info


def test_output_is_deterministic(report, tmp_path):
    results, root, first = report
    again = write_report(json.loads(json.dumps(results)), root / "eval", tmp_path / "out")
    assert again["html"].read_bytes() == first["html"].read_bytes()
    for a, b in zip(first["figures"], again["figures"], strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_the_sample_rows_are_the_first_prompt_ids(tmp_path):
    results = make_results(tmp_path / "eval", skills=["counting"], prompts_per_skill=5)
    results["per_prompt"].reverse()  # order in the file does not matter
    html = write_report(results, tmp_path / "eval", tmp_path / "out", samples_per_skill=2, thumb_px=64)
    text = html["html"].read_text(encoding="utf-8")
    assert "counting-00000" in text and "counting-00001" in text and "counting-00002" not in text
    assert 'width="64" height="53"' in text  # thumbnails keep the aspect ratio


def test_gaps_are_shown_not_fatal(tmp_path):
    """A metric on base only (no summary, no paired), images missing or pointing outside the folder."""
    results = make_results(tmp_path / "eval", images=False)
    results["metrics"]["vqa"] = {"label": "VQAScore (base only)", "higher_is_better": True, "scale": "0-1"}
    for row in results["per_prompt"]:
        if row["variant"] == "base":
            row["scores"]["vqa"] = 0.5
        row["image"] = "../../../etc/passwd" if row["skill"] == "spatial" else row["image"]
    del results["summary"]["dsg"]["spatial"]["merged"]  # falls back to the per-prompt mean
    del results["paired"]["dsg"]
    written = write_report(results, tmp_path / "eval", tmp_path / "out")
    html = written["html"].read_text(encoding="utf-8")
    page = parse(html)
    assert "VQAScore (base only)" in html and "no interval" in html
    assert "no paired differences for DSG (dsg-official)" in html
    assert html.count("image missing") == 18 and "outside the eval folder" in html
    assert not [s for s in page.imgs if s.startswith("data:image/jpeg")]
    assert (tmp_path / "out" / "figures" / "vqa.png").is_file()


def test_a_single_variant_and_many_skills(tmp_path):
    skills = [f"skill_{i:02d}_with_a_long_name" for i in range(12)]
    results = make_results(tmp_path / "eval", skills=skills, variants=["base"], prompts_per_skill=1)
    for group in results["paired"].values():
        for entry in group.values():
            entry.clear()
    written = write_report(results, tmp_path / "eval", tmp_path / "out", samples_per_skill=1, thumb_px=48)
    html = written["html"].read_text(encoding="utf-8")
    parse(html)
    assert "only one variant: nothing to compare" in html
    assert len(written["figures"]) == 2 + 12
    with Image.open(written["figures"][0]) as chart:
        assert chart.size[0] <= 22 * 110 + 1


def test_unusable_results_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="per_prompt"):
        write_report({"skills": [], "variants": [], "metrics": {}}, tmp_path, tmp_path / "out")
    with pytest.raises(InputError, match="metrics"):
        write_report({"skills": [], "variants": [], "per_prompt": []}, tmp_path, tmp_path / "out")


def test_chart_axes_follow_the_scale_phrases_and_show_negative_means(tmp_path, monkeypatch):
    """The eval writes scales as phrases ("item score 0-1"): a 0-1 metric gets a 0-1 axis; a
    negative mean (ImageReward's often are) is drawn, not cut off by an axis from 0."""
    import selma_core.report as report_module

    results = make_results(tmp_path / "eval")
    results["metrics"]["dsg"]["scale"] = "item score 0-1"
    results["metrics"]["clip_score"]["scale"] = "standardised reward (about -2 to 2)"
    for group in results["summary"]["clip_score"].values():
        group["base"] = {"mean": -0.8, "low": -1.2, "high": -0.4, "n": 3}
    limits: dict[str, tuple[float, float]] = {}
    real_png = report_module._png

    def png_with_limits(fig):
        limits.update((ax.get_title(loc="left"), ax.get_ylim()) for ax in fig.axes)
        return real_png(fig)

    monkeypatch.setattr(report_module, "_png", png_with_limits)
    write_report(results, tmp_path / "eval", tmp_path / "out")
    dsg_limits, clip_limits = limits["DSG (dsg-official)"], limits["CLIPScore"]
    assert dsg_limits == (0.0, 1.0)
    assert clip_limits[0] <= -1.2 < 0 < clip_limits[1]


def test_a_difference_on_one_prompt_is_not_highlighted(tmp_path):
    """One prompt gives a zero-width interval that excludes 0, and p = 1: no evidence, no highlight."""
    from selma_core.metrics.summary import summarize

    rows = [
        {"variant": v, "skill": "counting", "prompt_id": "p1", "prompt": "two cats", "scores": {"dsg": s}}
        for v, s in (("base", 0.5), ("merged", 0.75))
    ]
    summary, paired = summarize(rows, ["dsg"], ["counting"], ["base", "merged"])
    assert (
        paired["dsg"]["counting"]["merged"]["low"] == 0.25
        and paired["dsg"]["counting"]["merged"]["p_value"] == 1.0
    )
    results = {
        "per_prompt": rows,
        "skills": ["counting"],
        "variants": ["base", "merged"],
        "metrics": {"dsg": METRICS["dsg"]},
        "summary": summary,
        "paired": paired,
        "confidence": 0.95,
    }
    html = write_report(results, tmp_path, tmp_path / "out")["html"].read_text(encoding="utf-8")
    assert "+0.250" in html and "p = 1.000" in html
    assert 'class="good"' not in html and "▲ +0.250" not in html
