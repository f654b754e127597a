"""Bring your own data: image-text datasets (imagefolder, WebDataset; local and S3) read, checked,
fingerprinted and split; a dataset skill's training pairs and held-out captions."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import REPO, S3_BUCKET

from selma_core.config import StorageConfig, load_config
from selma_core.datasets import (
    expand_braces,
    heldout_prompts,
    heldout_records,
    list_dataset,
    load_training_pairs,
    read_external_dataset,
    resolve_uri,
    split_dataset,
)
from selma_core.errors import InputError
from selma_core.plan import build_plan
from selma_core.skills import load_skills


def image_bytes(color: tuple[int, int, int], fmt: str = "PNG", size: int = 16) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, fmt)
    return buffer.getvalue()


CAPTIONS = [f"{n} red apples on table number {i}" for i, n in enumerate(["two", "three", "four"] * 4)]


def make_imagefolder(root: Path, rows: list[dict] | None = None, count: int = 12) -> Path:
    """A Hugging Face imagefolder: images/NN.png and metadata.jsonl (``text`` captions)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    if rows is None:
        rows = []
        for i in range(count):
            (root / "images" / f"{i:02d}.png").write_bytes(image_bytes((i * 20, 0, 0)))
            rows.append({"file_name": f"images/{i:02d}.png", "text": CAPTIONS[i]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                add_member(tar, f"{key}.{ext}", data)
    return path


def make_webdataset(root: Path, shards: int = 3, per_shard: int = 4) -> Path:
    """Shards train-000N.tar: .jpg + .txt in even shards, .png + .json (``caption``) in odd ones."""
    for s in range(shards):
        samples = []
        for j in range(per_shard):
            i = s * per_shard + j
            if s % 2 == 0:
                members = {"jpg": image_bytes((0, i * 20, 0), "JPEG"), "txt": CAPTIONS[i].encode()}
            else:
                members = {
                    "png": image_bytes((0, 0, i * 20)),
                    "json": json.dumps({"caption": CAPTIONS[i], "width": 16}).encode(),
                }
            samples.append((f"s{i:04d}", members))
        make_shard(root / f"train-{s:04d}.tar", samples)
    return root


# -- imagefolder ----------------------------------------------------------------------------------


def test_imagefolder_pairs_in_metadata_order(tmp_path):
    root = make_imagefolder(tmp_path / "data")
    pairs = read_external_dataset(str(root), tmp_path / "scratch")
    assert [m["id"] for m, _ in pairs] == [f"images/{i:02d}.png" for i in range(12)]
    assert [m["prompt"] for m, _ in pairs] == CAPTIONS
    assert pairs[3][1] == (root / "images" / "03.png").read_bytes()  # encoded, not decoded
    assert all(isinstance(m["prompt"], str) for m, _ in pairs)
    # max_samples: the first ones; a relative uri against base_dir
    few = read_external_dataset("data", tmp_path / "scratch", base_dir=tmp_path, max_samples=5)
    assert [m["id"] for m, _ in few] == [m["id"] for m, _ in pairs[:5]]


@pytest.mark.parametrize("column", ["caption", "prompt"])
def test_imagefolder_other_caption_columns(tmp_path, column):
    (tmp_path / "a.jpg").write_bytes(image_bytes((1, 2, 3), "JPEG"))
    make_imagefolder(tmp_path, [{"file_name": "a.jpg", column: " a cat ", "other": 1}])
    ((meta, _),) = read_external_dataset(str(tmp_path), tmp_path / "scratch")
    assert meta["prompt"] == "a cat" and meta["id"] == "a.jpg"


def test_imagefolder_configured_column_and_repeated_images(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes((1, 2, 3)))
    rows = [{"file_name": "a.png", "text": "t", "human": f"caption {i}"} for i in range(3)]
    make_imagefolder(tmp_path, rows)
    pairs = read_external_dataset(str(tmp_path), tmp_path / "s", caption_column="human")
    assert [m["prompt"] for m, _ in pairs] == ["caption 0", "caption 1", "caption 2"]
    assert [m["id"] for m, _ in pairs] == ["a.png", "a.png#2", "a.png#3"]  # unique ids


def test_subfolders_that_are_links_are_read_once(tmp_path):
    """A mounted volume linked into the dataset (images -> /mnt/...) is read; a link back up the
    tree is not walked for ever."""
    made = make_imagefolder(tmp_path / "made")
    root = tmp_path / "data"
    root.mkdir()
    (root / "images").symlink_to(made / "images", target_is_directory=True)
    (root / "metadata.jsonl").write_text((made / "metadata.jsonl").read_text())
    pairs = read_external_dataset(str(root), tmp_path / "scratch")
    assert [m["prompt"] for m, _ in pairs] == CAPTIONS

    shards = make_webdataset(tmp_path / "wds", shards=1)
    make_webdataset(tmp_path / "mounted", shards=2)
    (tmp_path / "mounted" / "train-0000.tar").rename(tmp_path / "mounted" / "more-0000.tar")
    (shards / "part-b").symlink_to(tmp_path / "mounted", target_is_directory=True)
    (shards / "part-b" / "loop").symlink_to(shards, target_is_directory=True)  # back to the root
    listing = list_dataset(str(shards))
    assert [f.path for f in listing.files] == [
        "part-b/more-0000.tar",
        "part-b/train-0001.tar",
        "train-0000.tar",
    ]


# -- WebDataset -----------------------------------------------------------------------------------


def test_webdataset_folder_of_shards(tmp_path):
    root = make_webdataset(tmp_path / "wds")
    (root / "README.md").write_text("not a shard")
    listing = list_dataset(str(root))
    assert listing.layout == "webdataset"
    assert [f.path for f in listing.files] == ["train-0000.tar", "train-0001.tar", "train-0002.tar"]
    pairs = read_external_dataset(str(root), tmp_path / "scratch")
    assert [m["id"] for m, _ in pairs] == [f"s{i:04d}" for i in range(12)]
    assert [m["prompt"] for m, _ in pairs] == CAPTIONS  # .txt, and .json's caption
    assert pairs[5][0]["shard"] == "train-0001.tar"
    assert pairs[0][1][:2] == b"\xff\xd8" and pairs[4][1][:4] == b"\x89PNG"


def test_webdataset_brace_pattern_and_single_shard(tmp_path):
    root = make_webdataset(tmp_path / "wds")
    pattern = read_external_dataset(str(root / "train-{0001..0002}.tar"), tmp_path / "s")
    assert [m["id"] for m, _ in pattern] == [f"s{i:04d}" for i in range(4, 12)]
    single = read_external_dataset("wds/train-0002.tar", tmp_path / "s", base_dir=tmp_path)
    assert [m["id"] for m, _ in single] == [f"s{i:04d}" for i in range(8, 12)]
    assert expand_braces("a-{00..02}-{x,y}.tar") == [
        f"a-{n}-{c}.tar" for n in ("00", "01", "02") for c in ("x", "y")
    ]
    # Padded as bash and braceexpand pad: to the wider bound when either has a leading zero.
    assert expand_braces("t-{1..010}.tar")[::9] == ["t-001.tar", "t-010.tar"]
    assert expand_braces("t-{0..0012}.tar")[::12] == ["t-0000.tar", "t-0012.tar"]
    assert expand_braces("t-{0..10}.tar")[::10] == ["t-0.tar", "t-10.tar"]


def test_webdataset_json_caption_column_and_webp(tmp_path):
    members = {
        "webp": image_bytes((5, 5, 5), "WEBP"),
        "json": json.dumps({"prompt": "p", "human_caption": "a dog"}).encode(),
    }
    make_shard(tmp_path / "d" / "x.tar", [("k1", members)])
    column = "human_caption"
    ((meta, image),) = read_external_dataset(str(tmp_path / "d"), tmp_path / "s", caption_column=column)
    assert meta["prompt"] == "a dog" and image[8:12] == b"WEBP"
    ((meta, _),) = read_external_dataset(str(tmp_path / "d"), tmp_path / "s")
    assert meta["prompt"] == "p"


def test_auto_layout_and_explicit_layouts(tmp_path):
    folder = make_imagefolder(tmp_path / "if", count=2)
    assert list_dataset(str(folder)).layout == "imagefolder"
    with pytest.raises(InputError, match="no .tar shards found"):
        list_dataset(str(folder), layout="webdataset")
    wds = make_webdataset(tmp_path / "wds", shards=1)
    with pytest.raises(InputError, match="no metadata.jsonl at its top"):
        list_dataset(str(wds), layout="imagefolder")


# -- bad input, named ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"text": "a cat"}], "metadata.jsonl: line 2: no 'file_name'"),
        ([{"file_name": "a.png"}], "line 2 (a.png): no caption: expected a string 'text'"),
        ([{"file_name": "a.png", "text": "  "}], "line 2 (a.png): caption 'text': expected non-empty text"),
        ([{"file_name": "missing.png", "text": "x"}], "line 2 (missing.png): image"),
        ([{"file_name": "../a.png", "text": "x"}], "expected a path inside the dataset's folder"),
        ([{"file_name": "a.gif", "text": "x"}], "expected an image file"),
        # The listing skips hidden paths: the file exists, and the message must not say otherwise.
        ([{"file_name": ".thumbs/b.png", "text": "x"}], "a hidden path (a part starts with '.')"),
        ([], "no rows: the dataset is empty"),
    ],
)
def test_bad_imagefolder_rows_are_named(tmp_path, rows, message):
    """Line 1 is good; the bad row after it is named by its line."""
    (tmp_path / "d" / ".thumbs").mkdir(parents=True)
    (tmp_path / "d" / "a.png").write_bytes(image_bytes((1, 1, 1)))
    (tmp_path / "d" / ".thumbs" / "b.png").write_bytes(image_bytes((2, 2, 2)))
    make_imagefolder(tmp_path / "d", [{"file_name": "a.png", "text": "ok"}, *rows])
    if not rows:  # an empty metadata.jsonl
        (tmp_path / "d" / "metadata.jsonl").write_text("\n")
    with pytest.raises(InputError) as info:
        read_external_dataset(str(tmp_path / "d"), tmp_path / "s")
    assert message in str(info.value) and str(tmp_path / "d") in str(info.value)


def test_imagefolder_lines_end_at_newlines_only_and_dot_slash_names_are_inside(tmp_path):
    """JSON Lines: a caption may hold U+2028, U+2029 or U+0085 raw (str.splitlines would split it);
    CRLF line ends; and "./images/00.png" names images/00.png, as Hugging Face reads them."""
    root = make_imagefolder(tmp_path / "if", count=2)
    rows = [
        {"file_name": "./images/00.png", "text": "two apples\u2028on a table\u0085"},
        {"file_name": "images/01.png", "text": "a cat\u2029"},
    ]
    (root / "metadata.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8"
    )
    pairs = read_external_dataset(str(root), tmp_path / "s")
    assert [m["prompt"] for m, _ in pairs] == ["two apples\u2028on a table", "a cat"]
    assert pairs[0][1] == (root / "images" / "00.png").read_bytes()


def test_bad_json_line_and_caption_column_are_named(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes((1, 1, 1)))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{oops\n')
    with pytest.raises(InputError, match=r"metadata.jsonl: line 2: expected a JSON object"):
        read_external_dataset(str(tmp_path), tmp_path / "s")
    make_imagefolder(tmp_path, [{"file_name": "a.png", "text": "x"}])
    with pytest.raises(InputError, match=r"line 1 \(a.png\): no caption column 'human'"):
        read_external_dataset(str(tmp_path), tmp_path / "s", caption_column="human")


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"txt": b"a cat"}, "sample 'k1': no image (.jpg, .jpeg, .png, .webp); it has txt"),
        ({"png": image_bytes((1, 1, 1))}, "sample 'k1': no caption: expected a .txt or a .json"),
        ({"png": image_bytes((1, 1, 1)), "json": b"[1]"}, "sample 'k1': .json: expected an object"),
        ({"png": image_bytes((1, 1, 1)), "json": b"{}"}, "sample 'k1': .json: no caption"),
        ({"png": image_bytes((1, 1, 1)), "txt": b"\xff\xfe"}, "sample 'k1': .txt: expected UTF-8"),
    ],
)
def test_bad_webdataset_samples_are_named(tmp_path, members, message):
    shard = make_shard(tmp_path / "d" / "bad.tar", [("k1", members)])
    with pytest.raises(InputError) as info:
        read_external_dataset(str(tmp_path / "d"), tmp_path / "s")
    assert message in str(info.value) and str(shard) in str(info.value)


def test_bad_webdataset_shards_are_named(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "junk.tar").write_bytes(b"not a tar at all" * 50)
    with pytest.raises(InputError, match=r"junk.tar: expected a tar file"):
        read_external_dataset(str(tmp_path / "d"), tmp_path / "s")
    sample = {"png": image_bytes((1, 1, 1)), "txt": b"x"}
    make_shard(tmp_path / "e" / "a.tar", [("k", sample)])
    make_shard(tmp_path / "e" / "b.tar", [("k", sample)])
    with pytest.raises(InputError, match=r"b.tar: sample 'k': the key is also in .*a.tar"):
        read_external_dataset(str(tmp_path / "e"), tmp_path / "s")
    with pytest.raises(InputError, match=r"shard .*e/a-0001.tar not found \(and 2 more"):
        list_dataset(str(tmp_path / "e" / "a-{0001..0003}.tar"))
    with pytest.raises(InputError, match="no such folder"):
        list_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither a metadata.jsonl"):
        list_dataset(str(tmp_path / "empty"))
    # A shard cut short (a writer that died, a copy interrupted): tarfile alone would read the
    # samples before the cut as the whole shard.
    whole = make_shard(tmp_path / "cut" / "a.tar", [(f"k{i}", sample) for i in range(4)]).read_bytes()
    for cut in (4 * 512, 4 * 512 + 100):  # at a sample's end, inside the next header
        (tmp_path / "cut" / "a.tar").write_bytes(whole[:cut])
        with pytest.raises(InputError, match=r"a.tar: the tar file ends without its end-of-archive"):
            read_external_dataset(str(tmp_path / "cut"), tmp_path / "s")
    # caption_column names a field: a .txt beside the image is not read, and the error says so.
    make_shard(tmp_path / "txt" / "a.tar", [("k", sample)])
    with pytest.raises(InputError, match=r"expected a .text member or a .json with 'text'.*its .txt is not"):
        read_external_dataset(str(tmp_path / "txt"), tmp_path / "s", caption_column="text")


# -- fingerprint and digest ------------------------------------------------------------------------


def test_fingerprint_follows_the_contents_not_the_place(tmp_path):
    root = make_imagefolder(tmp_path / "a")
    first = list_dataset(str(root), scratch_dir=tmp_path / "scratch").fingerprint
    assert list_dataset(str(root), scratch_dir=tmp_path / "scratch").fingerprint == first
    copy = tmp_path / "b"
    shutil.copytree(root, copy)
    assert list_dataset(str(copy)).fingerprint == first  # same data elsewhere
    (copy / "images" / "03.png").write_bytes(image_bytes((1, 2, 3)))
    changed_image = list_dataset(str(copy), scratch_dir=tmp_path / "scratch").fingerprint
    make_imagefolder(root, [{"file_name": "images/00.png", "text": "another caption"}])
    changed_caption = list_dataset(str(root), scratch_dir=tmp_path / "scratch").fingerprint
    assert len({first, changed_image, changed_caption}) == 3


def test_images_no_row_names_are_not_part_of_the_dataset(tmp_path, monkeypatch):
    """A subset's metadata.jsonl beside a whole folder of images (COCO's 118k): only the images its
    rows name are listed, hashed and keyed; adding another image to the folder changes nothing."""
    import selma_core.storage.base as base

    root = make_imagefolder(tmp_path / "a")
    listing = list_dataset(str(root), scratch_dir=tmp_path / "scratch")
    assert len(listing.files) == 13  # metadata.jsonl and its 12 images
    (root / "images" / "unused.png").write_bytes(image_bytes((5, 5, 5)))
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "more.jpg").write_bytes(image_bytes((6, 6, 6), "JPEG"))
    hashed = []
    real = base.sha256_file
    monkeypatch.setattr(base, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    assert list_dataset(str(root), scratch_dir=tmp_path / "scratch") == listing
    assert hashed == []  # nothing new hashed: the unnamed images are not read at all
    # Named by a row ("./" and "\\" spelled as Hugging Face reads them), it is part of it.
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    make_imagefolder(root, [*rows, {"file_name": ".\\images\\unused.png", "text": "one more"}])
    named = list_dataset(str(root), scratch_dir=tmp_path / "scratch")
    assert "images/unused.png" in {f.path for f in named.files} and len(named.files) == 14


def test_hashes_are_remembered_but_a_change_after_listing_is_caught(tmp_path, monkeypatch):
    import selma_core.storage.base as base

    root = make_imagefolder(tmp_path / "a")
    list_dataset(str(root), scratch_dir=tmp_path / "scratch")
    calls = []
    real = base.sha256_file
    monkeypatch.setattr(base, "sha256_file", lambda p: calls.append(p) or real(p))
    listing = list_dataset(str(root), scratch_dir=tmp_path / "scratch")
    assert calls == []  # nothing hashed again
    (root / "images" / "05.png").write_bytes(image_bytes((9, 9, 9), size=20))
    with pytest.raises(InputError, match=r"05.png: changed since the dataset was listed"):
        read_external_dataset(str(root), tmp_path / "scratch", listing=listing)


def test_a_hash_cache_that_cannot_be_written_leaves_no_temporary_file(tmp_path):
    """The cache is written through a temporary file beside it; when replacing fails (here its path
    is a folder) listing still works and nothing half-written stays behind."""
    root = make_imagefolder(tmp_path / "a")
    listing = list_dataset(str(root), scratch_dir=tmp_path / "scratch")
    [cache] = (tmp_path / "scratch" / "datasets").iterdir()
    cache.unlink()
    cache.mkdir()  # os.replace onto a folder fails
    assert list_dataset(str(root), scratch_dir=tmp_path / "scratch").files == listing.files
    assert [p.name for p in (tmp_path / "scratch" / "datasets").iterdir()] == [cache.name]


def pairs_of(captions: list[str]) -> list[tuple[dict, bytes]]:
    return [({"id": f"i{i}", "prompt": c}, str(i).encode()) for i, c in enumerate(captions)]


def test_split_is_deterministic_disjoint_and_sized():
    captions = [f"caption number {i}" for i in range(40)]
    pairs = pairs_of(captions)
    train, held = split_dataset(pairs, 0.25)
    assert len(held) == 10 and len(train) == 30
    assert {m["id"] for m, _ in train}.isdisjoint(m["id"] for m, _ in held)
    assert split_dataset(pairs, 0.25) == (train, held)
    # the captions decide, not their order
    _, shuffled = split_dataset(list(reversed(pairs)), 0.25)
    assert {m["prompt"] for m, _ in shuffled} == {m["prompt"] for m, _ in held}
    assert [m["id"] for m, _ in train] == sorted((m["id"] for m, _ in train), key=lambda i: int(i[1:]))
    assert len(split_dataset(pairs, 3)[1]) == 3
    assert split_dataset(pairs, 0) == (pairs, [])
    assert len(split_dataset(pairs_of(["a", "b", "c"]), 0.01)[1]) == 1  # a share holds out at least one


def test_a_heldout_caption_is_never_trained_on():
    captions = ["A cat", "a  cat", "a dog", "a cow", "a fox", "a cat "] * 2 + [f"x {i}" for i in range(10)]
    train, held = split_dataset(pairs_of(captions), 0.5)
    norm = {" ".join(m["prompt"].lower().split()) for m, _ in held}
    assert norm.isdisjoint(" ".join(m["prompt"].lower().split()) for m, _ in train)
    records = heldout_records("mine", held)
    assert len(records) == len(norm) and len({r["id"] for r in records}) == len(records)
    assert all(r["id"].startswith("mine-") and r["split"] == "heldout" for r in records)


def test_an_image_with_several_captions_is_held_out_whole():
    """COCO-style data, five paraphrases per image: holding out one caption holds out its image and
    so every caption of that image; otherwise the paraphrases trained on would leak the answer."""
    pairs = [
        ({"id": f"img{i}.png#{j}", "prompt": f"image {i} caption {j}", "file": f"img{i}.png"}, b"")
        for i in range(8)
        for j in range(5)
    ]
    train, held = split_dataset(pairs, 0.1)  # 4 of 40 captions: one whole image, 5 captions
    held_images = {m["file"] for m, _ in held}
    assert len(held_images) == 1 and len(held) == 5
    assert held_images.isdisjoint(m["file"] for m, _ in train)
    assert len(train) == 35
    # The same data as one WebDataset sample per caption: the image repeats, told by its bytes.
    wds = [
        ({"id": f"s{i}{j}", "prompt": f"image {i} caption {j}", "image_sha256": f"sha-of-{i}"}, b"")
        for i in range(8)
        for j in range(5)
    ]
    wds_train, wds_held = split_dataset(wds, 0.1)
    assert {m["prompt"] for m, _ in wds_held} == {m["prompt"] for m, _ in held}
    # A caption shared by two images joins their groups: neither image is trained on.
    shared = [*pairs, ({"id": "img9.png", "prompt": "image 0 caption 0", "file": "img9.png"}, b"")]
    _, held = split_dataset(shared, 5)
    held_files = {m["file"] for m, _ in held}
    assert "img9.png" in held_files or "img0.png" not in held_files
    # A templated caption on nine of ten images joins them into one group of 10 captions: it is not
    # held out whole for its rank (that trained on one image); the lone image's captions are.
    templated = [
        ({"id": f"t{i}", "prompt": f"dog photo {i}", "file": f"t{i}.png"}, b"") for i in range(10)
    ] + [({"id": f"t{i}#2", "prompt": "two dogs on the grass", "file": f"t{i}.png"}, b"") for i in range(9)]
    for heldout in (0.1, 1):
        train, held = split_dataset(templated, heldout)
        assert [m["id"] for m, _ in held] == ["t9"] and len(train) == 18
    # Only groups of 5: as near the count as whole groups come, and never none.
    assert [len(split_dataset(pairs, n)[1]) for n in (1, 2, 3, 7, 8)] == [5, 5, 5, 5, 10]
    # Every caption linked into one group: nothing can be held out but all of it.
    one = [({"id": f"x{j}", "prompt": f"caption {j}", "file": "same.png"}, b"") for j in range(5)]
    with pytest.raises(InputError, match="are one group, joined by the images they share"):
        split_dataset(one, 1)


def test_a_webdataset_read_for_its_captions_tells_its_images_apart_as_when_read_whole(tmp_path):
    """The eval job reads a dataset's captions alone (images=False), the train job reads it whole:
    both must see the same images, or their splits would differ."""
    same = image_bytes((3, 3, 3), "JPEG")
    samples = [(f"k{j}", {"jpg": same, "txt": f"the one image, caption {j}".encode()}) for j in range(3)]
    samples += [
        (f"o{i}", {"png": image_bytes((i * 40, 9, 9)), "txt": f"other {i}".encode()}) for i in range(6)
    ]
    make_shard(tmp_path / "wds" / "train-0000.tar", samples)
    whole = read_external_dataset(str(tmp_path / "wds"), tmp_path / "s")
    captions_only = read_external_dataset(str(tmp_path / "wds"), tmp_path / "s", images=False)
    assert [m for m, _ in whole] == [m for m, _ in captions_only]
    assert all(image == b"" for _, image in captions_only)
    assert len({m["image_sha256"] for m, _ in whole}) == 7
    for heldout in (1, 3, 4):
        held = [m for m, _ in split_dataset(whole, heldout)[1]]
        assert held == [m for m, _ in split_dataset(captions_only, heldout)[1]]
        assert len({m["id"] for m in held} & {"k0", "k1", "k2"}) in (0, 3)  # the one image: whole


def test_split_that_leaves_nothing_to_train_on():
    with pytest.raises(InputError, match="2 distinct caption"):
        split_dataset(pairs_of(["a", "a", "b"]), 2)
    with pytest.raises(InputError, match="1 distinct caption"):
        split_dataset(pairs_of(["a", "a"]), 0.5)


# -- S3 (moto_server) ------------------------------------------------------------------------------


def upload(client, folder: Path, prefix: str) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), S3_BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")


def test_s3_datasets(moto_s3, tmp_path):
    import boto3

    client = boto3.client("s3", endpoint_url=moto_s3)
    prefix = f"datasets/{uuid.uuid4().hex[:8]}"
    local_if = make_imagefolder(tmp_path / "if")
    local_wds = make_webdataset(tmp_path / "wds")
    upload(client, local_if, f"{prefix}/if")
    upload(client, local_wds, f"{prefix}/wds")
    storage = StorageConfig(uri=f"s3://{S3_BUCKET}/store", endpoint_url=moto_s3, retry_budget_s=0)
    scratch = tmp_path / "scratch"

    pairs = read_external_dataset(f"s3://{S3_BUCKET}/{prefix}/if/", scratch, storage)
    assert pairs == read_external_dataset(str(local_if), tmp_path / "s2")
    assert any((scratch / "datasets" / "s3").iterdir())  # downloaded to scratch
    wds = read_external_dataset(f"s3://{S3_BUCKET}/{prefix}/wds/train-{{0000..0001}}.tar", scratch, storage)
    assert [m["id"] for m, _ in wds] == [f"s{i:04d}" for i in range(8)]
    assert [m["prompt"] for m, _ in wds] == CAPTIONS[:8]

    # An image no row names is not part of the dataset (listed without a scratch folder: nothing kept).
    client.put_object(Bucket=S3_BUCKET, Key=f"{prefix}/if/images/unused.png", Body=image_bytes((8, 8, 8)))
    listing = list_dataset(f"s3://{S3_BUCKET}/{prefix}/if", storage)
    assert listing.layout == "imagefolder" and len(listing.files) == 13
    assert "images/unused.png" not in {f.path for f in listing.files}
    # Listing reads metadata.jsonl; a scratch folder it cannot write (a Kubernetes controller's
    # cache_dir) only means no copy is kept.
    (tmp_path / "a-file").write_text("not a folder")
    assert list_dataset(listing.root, storage, scratch_dir=tmp_path / "a-file" / "cache") == listing
    assert all(f.version and f.size for f in listing.files)  # ETags and sizes
    # An object replaced after the listing: the read refuses it (If-Match), naming it.
    client.put_object(Bucket=S3_BUCKET, Key=f"{prefix}/if/images/07.png", Body=image_bytes((7, 7, 7)))
    with pytest.raises(InputError, match=r"images/07.png: changed since the dataset was listed"):
        read_external_dataset(listing.root, tmp_path / "fresh", storage, listing=listing)
    assert list_dataset(f"s3://{S3_BUCKET}/{prefix}/if", storage).fingerprint != listing.fingerprint
    with pytest.raises(InputError, match="no objects under it"):
        list_dataset(f"s3://{S3_BUCKET}/{prefix}/nothing", storage)
    with pytest.raises(InputError, match=r"shard s3://.*/wds/train-0003.tar not found \(and 6 more"):
        list_dataset(f"s3://{S3_BUCKET}/{prefix}/wds/train-{{0000..0009}}.tar", storage)
    # Shards at the top of a bucket: no folder before the pattern.
    top = f"top-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=top)
    for shard in ("train-0000.tar", "train-0001.tar"):
        client.upload_file(str(local_wds / shard), top, shard)
    both = read_external_dataset(f"s3://{top}/train-{{0000..0001}}.tar", scratch, storage)
    assert [m["prompt"] for m, _ in both] == CAPTIONS[:8]
    one = read_external_dataset(f"s3://{top}/train-0000.tar", scratch, storage)
    assert [m["prompt"] for m, _ in one] == CAPTIONS[:4]


# -- a dataset skill in a pipeline -----------------------------------------------------------------


def dataset_pipeline(tmp_path: Path, model_cache: Path, heldout=0.25) -> Path:
    """A config with the shipped ``counting`` and a dataset skill ``mine`` (data/mine beside it)."""
    from conftest import write_config

    skills = tmp_path / "skills"
    shutil.copytree(REPO / "skills", skills)
    make_imagefolder(skills / "data" / "mine")
    dataset = {"uri": "data/mine", "heldout": heldout}
    (skills / "mine.yaml").write_text(
        yaml.safe_dump({"name": "mine", "description": "Human captions.", "dataset": dataset})
    )
    return write_config(tmp_path, model_cache, skills=["counting", "mine"], skills_dir=str(skills))


def job_context(config: Path, phase: str = "train", skill: str | None = "mine", fetch=None):
    cfg = load_config(config)
    skills = load_skills(cfg.skills_path, cfg.skills)
    plan = build_plan(cfg, skills)
    job = plan.job(phase, skill)
    return SimpleNamespace(
        config=cfg, skills=skills, plan=plan, job=job, scratch_dir=Path(cfg.cache_dir), fetch=fetch
    )


def test_training_pairs_and_heldout_prompts_of_a_dataset_skill(tmp_path, model_cache):
    ctx = job_context(dataset_pipeline(tmp_path, model_cache, heldout=3))
    train = load_training_pairs(ctx, "mine")
    prompts = heldout_prompts(ctx, "mine")
    assert len(train) == 9 and len(prompts) == 3
    assert {m["prompt"] for m, _ in train}.isdisjoint(r["text"] for r in prompts)
    assert {m["prompt"] for m, _ in train} | {r["text"] for r in prompts} == set(CAPTIONS)
    assert heldout_prompts(ctx, "mine") == prompts  # deterministic
    assert all(r["split"] == "heldout" and r["id"].startswith("mine-") for r in prompts)


def test_a_dataset_changed_since_the_plan_is_refused(tmp_path, model_cache):
    config = dataset_pipeline(tmp_path, model_cache)
    ctx = job_context(config)
    image = tmp_path / "skills" / "data" / "mine" / "images" / "01.png"
    image.write_bytes(image_bytes((3, 3, 3), size=24))
    with pytest.raises(InputError, match="dataset of skill 'mine' .* changed since this pipeline was"):
        load_training_pairs(ctx, "mine")


def test_training_pairs_of_a_generated_skill_are_its_images(tmp_path, model_cache):
    images = tmp_path / "images"
    make_shard(
        images / "shard-00000.tar",
        [("counting-00000", {"jpg": image_bytes((1, 1, 1), "JPEG"), "json": b'{"prompt": "two cats"}'})],
    )
    fetched = []
    ctx = job_context(
        dataset_pipeline(tmp_path, model_cache),
        skill="counting",
        fetch=lambda phase, skill: fetched.append((phase, skill)) or images,
    )
    ((meta, _),) = load_training_pairs(ctx, "counting")
    assert meta["prompt"] == "two cats" and fetched == [("images", "counting")]


def test_resolve_uri(tmp_path):
    assert resolve_uri("s3://b/p/", tmp_path) == "s3://b/p"
    assert resolve_uri("s3://b", tmp_path) == "s3://b"
    assert resolve_uri("data/x", tmp_path) == str(tmp_path / "data" / "x")
    assert resolve_uri(f"file://{tmp_path}/y") == str(tmp_path / "y")
    assert resolve_uri("shards/a-{0..3}.tar", "/base") == "/base/shards/a-{0..3}.tar"


# -- the controller and the job entry point --------------------------------------------------------


def test_the_controller_says_a_dataset_skill_has_no_images_job(tmp_path, model_cache, capsys):
    from jobs import submit as controller

    config = str(dataset_pipeline(tmp_path, model_cache))
    assert controller.main(["--phase", "images", "--skill", "mine", "--dry-run", "--config", config]) == 2
    out = capsys.readouterr()
    assert "skill 'mine' uses an external dataset (data/mine): it has no images job" in out.err
    assert json.loads(out.out.strip().splitlines()[-1])["jobs"] == []

    assert controller.main(["--phase", "images", "--dry-run", "--config", config]) == 0
    out = capsys.readouterr()
    planned = json.loads(out.out.strip().splitlines()[-1])["jobs"]
    assert [(j["phase"], j["skill"]) for j in planned] == [("images", "counting")]
    assert "note: skill 'mine' uses an external dataset" in out.err

    assert controller.main(["--phase", "all", "--dry-run", "--config", config]) == 0
    out = capsys.readouterr()
    planned = {(j["phase"], j.get("skill")) for j in json.loads(out.out.strip().splitlines()[-1])["jobs"]}
    assert ("train", "mine") in planned and ("prompts", "mine") not in planned
    assert "skill mine: external dataset" in out.err and "imagefolder, 13 files" in out.err


def test_a_dataset_skill_holding_out_nothing_is_refused_before_any_job_when_eval_scores_held_out_captions(
    tmp_path, model_cache, capsys
):
    """``heldout: 0`` and the default ``eval.benchmark: heldout``: the eval job would fail after the
    expert is trained and merged (hours, with real models). Refused first, naming both settings;
    training alone, or another benchmark, goes ahead."""
    from jobs import submit as controller

    config = str(dataset_pipeline(tmp_path, model_cache, heldout=0))
    assert controller.main(["--phase", "all", "--dry-run", "--config", config]) == 2
    err = capsys.readouterr().err
    assert "skill 'mine'" in err and "dataset.heldout: 0 holds out no caption" in err
    assert "eval.benchmark: heldout" in err and "eval.benchmark: dsg1k or tifa" in err
    assert controller.main(["--phase", "train", "--dry-run", "--config", config]) == 0
    capsys.readouterr()
    assert controller.main(["--phase", "all", "--benchmark", "dsg1k", "--dry-run", "--config", config]) == 0


def test_the_controller_refuses_a_relative_dataset_on_kubernetes(tmp_path, model_cache, capsys):
    from jobs import submit as controller

    config = str(dataset_pipeline(tmp_path, model_cache))
    args = ["--phase", "train", "--backend", "kubernetes", "--dry-run", "--config", config]
    assert controller.main(args) == 2
    assert "dataset data/mine: on the kubernetes executor a dataset must be in S3" in capsys.readouterr().err


def test_a_job_of_a_phase_a_dataset_skill_lacks_is_a_config_error(tmp_path, model_cache):
    from jobs.run import run_job
    from selma_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--phase prompts: skill 'mine' uses an external dataset"):
        run_job("prompts", "mine", str(dataset_pipeline(tmp_path, model_cache)))


def test_eval_reads_a_dataset_skills_heldout_captions(tmp_path, model_cache):
    from selma_core.phases.evaluate import load_eval_set, load_heldout

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    records = [
        {"id": f"counting-{i:05d}", "text": f"{i} cups", "split": "heldout" if i < 2 else "train"}
        for i in range(5)
    ]
    (prompts / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = dataset_pipeline(tmp_path, model_cache, heldout=3)
    ctx = job_context(config, phase="eval", skill=None, fetch=lambda phase, skill: prompts)
    eval_set = load_eval_set(ctx, ctx.config.eval)
    by_skill = {s: [p.text for p in eval_set.prompts if p.skill == s] for s in ("counting", "mine")}
    assert by_skill["counting"] == ["0 cups", "1 cups"]
    assert (
        by_skill["mine"] == [r["text"] for r in heldout_prompts(ctx, "mine")] and len(by_skill["mine"]) == 3
    )
    trained = {m["prompt"] for m, _ in load_training_pairs(ctx, "mine")}
    assert trained.isdisjoint(by_skill["mine"])
    heldout = load_heldout(ctx, ["counting", "mine"], cap=2)
    assert [r["text"] for r in heldout["mine"]] == by_skill["mine"][:2]


@pytest.mark.slow
def test_a_dataset_skill_trains_its_expert_on_the_training_split_alone(tmp_path, model_cache):
    """``jobs.submit --phase train --skill mine``: the job reads the user's data (no prompts or
    images job runs) and commits an expert trained on the captions not held out."""
    import subprocess
    import sys

    from selma_core.storage import LocalArtifactStore

    config = dataset_pipeline(tmp_path, model_cache, heldout=3)
    done = subprocess.run(
        [sys.executable, "-m", "jobs.submit", "--phase", "train", "--skill", "mine", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = json.loads(done.stdout.strip().splitlines()[-1])["jobs"]
    assert [(j["phase"], j["skill"], j["status"]) for j in jobs] == [("train", "mine", "ran")]
    ctx = job_context(config)
    store = LocalArtifactStore(tmp_path / "store")
    expert = json.loads(store.read_output_file(ctx.job.key, "expert.json"))
    assert expert["skill"] == "mine" and expert["images"] == 9 and expert["images_skipped"] == 0
    assert store.list_keys("prompts") == [] and store.list_keys("images") == []
