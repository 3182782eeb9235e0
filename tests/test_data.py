"""Tests for data.py: tokenizer, transforms, RefCOCO-family loading, the shapes dataset, errors."""
import json
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

import data
from conftest import shared_path

ITEM_KEYS = {"image", "mask", "ids", "word_mask", "orig_size", "input_size", "ref_id", "sent_id",
             "image_id", "sentence", "index"}


# ============================================================================================
# Tokenizer
# ============================================================================================


@pytest.fixture(scope="module")
def golden():
    with open(shared_path("fixtures", "clip_tokenizer_golden.json"), encoding="utf-8") as f:
        return json.load(f)


def test_golden_vocab_is_ours(golden):
    """The golden file was made with the vocabulary whose sha256 we check."""
    assert golden["vocab_sha256"] == data.VOCAB_SHA256


def test_golden_ids_match_exactly(golden):
    """SOT + encode + EOT equals OpenAI's untruncated ids for every golden case."""
    tok = data.get_tokenizer()
    for case in golden["cases"]:
        assert [data.SOT_ID, *tok.encode(case["text"]), data.EOT_ID] == case["ids"], case["text"]


def test_golden_tokenize77_matches_exactly(golden):
    """tokenize(text, 77) equals OpenAI's clip.tokenize row for every golden case."""
    texts = [c["text"] for c in golden["cases"]]
    ids, word_mask = data.tokenize(texts, 77)
    assert ids.tolist() == [c["tokenize77"] for c in golden["cases"]]
    assert word_mask.sum(1).tolist() == [len(c["ids"]) for c in golden["cases"]]


def test_golden_decode_matches(golden):
    """ClipTokenizer.decode of the ids without SOT/EOT equals OpenAI's decoded text."""
    tok = data.get_tokenizer()
    for case in golden["cases"]:
        assert tok.decode(case["ids"][1:-1]) == case["decoded"], case["text"]


def test_vocab_sha256_mismatch_is_a_clear_error(tmp_path):
    """A vocabulary file with the wrong bytes fails with its path and both digests."""
    bad = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    bad.write_bytes(b"not the vocabulary")
    with pytest.raises(ValueError, match="sha256") as e:
        data.ClipTokenizer(bad)
    assert str(bad) in str(e.value) and data.VOCAB_SHA256 in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.gz"):
        data.ClipTokenizer(tmp_path / "missing.gz")


def test_literal_special_tokens_encode_to_their_ids():
    """A literal <|endoftext|> / <|startoftext|> in a text encodes to EOT / SOT, as OpenAI's tokenizer does."""
    tok = data.get_tokenizer()
    assert tok.encode("a <|endoftext|> b") == tok.encode("a") + [data.EOT_ID] + tok.encode("b")
    assert tok.encode("<|startoftext|>cat") == [data.SOT_ID] + tok.encode("cat")


def test_vocab_size_and_specials():
    """The vocabulary has 49408 entries with SOT/EOT at 49406/49407 and id 0 = '!'."""
    tok = data.get_tokenizer()
    assert len(tok.encoder) == data.VOCAB_SIZE
    assert tok.encoder["<|startoftext|>"] == data.SOT_ID and tok.encoder["<|endoftext|>"] == data.EOT_ID
    assert tok.decoder[0] == "!"


def test_overflow_keeps_sot_and_puts_eot_last():
    """An expression longer than L keeps SOT, is cut, and ends in EOT with a full mask."""
    text = "the man in the red shirt standing to the left of the tall woman"
    full = data.get_tokenizer().encode(text)
    ids, mask = data.tokenize(text, 8)
    assert ids[0].tolist() == [data.SOT_ID, *full[:6], data.EOT_ID]
    assert mask.all()


def test_word_mask_does_not_come_from_id_zero():
    """A real '!' token (id 0) inside the expression stays inside the word mask."""
    ids, mask = data.tokenize("a!$ b", 10)
    row = ids[0].tolist()
    assert 0 in row[: row.index(data.EOT_ID)]
    assert mask[0].sum().item() == row.index(data.EOT_ID) + 1


def test_empty_and_non_ascii_expressions_are_valid():
    """Empty and non-ASCII text tokenize to SOT..EOT rows."""
    ids, mask = data.tokenize(["", "café crème 日本"], 12)
    assert ids[0, :2].tolist() == [data.SOT_ID, data.EOT_ID] and mask[0].sum() == 2
    assert data.decode(ids[1]) == "café crème 日本"


def test_context_length_below_two_is_rejected():
    """L < 2 cannot hold SOT and EOT."""
    with pytest.raises(ValueError, match="context_length"):
        data.tokenize("x", 1)


texts = st.text(st.characters(codec="ascii"), max_size=60)


@given(texts, st.integers(2, 30))
def test_rows_have_length_l_and_sot_first(text, L):
    """Every row is L long and starts with SOT."""
    ids, mask = data.tokenize(text, L)
    assert ids.shape == mask.shape == (1, L) and ids[0, 0] == data.SOT_ID


@given(texts, st.integers(2, 30))
def test_exactly_one_eot(text, L):
    """Every row has exactly one EOT."""
    ids, _ = data.tokenize(text, L)
    assert (ids[0] == data.EOT_ID).sum() == 1


@given(texts, st.integers(2, 30))
def test_mask_is_the_prefix_through_eot(text, L):
    """The word mask is True exactly from SOT through EOT and padding is PAD_ID."""
    ids, mask = data.tokenize(text, L)
    n = int((ids[0] == data.EOT_ID).nonzero()[0]) + 1
    assert mask[0].tolist() == [True] * n + [False] * (L - n)
    assert (ids[0, n:] == data.PAD_ID).all()


@given(texts)
def test_decode_encode_is_stable_on_ascii(text):
    """decode(tokenize(decode(tokenize(t)))) == decode(tokenize(t)) for ASCII text."""
    once = data.decode(data.tokenize(text, 77)[0][0])
    assert data.decode(data.tokenize(once, 77)[0][0]) == once


def test_decode_batch_returns_list():
    """decode of (B, L) gives B strings."""
    ids, _ = data.tokenize(["left vase", "bowl"], 10)
    assert data.decode(ids) == ["left vase", "bowl"]


# ============================================================================================
# Transforms
# ============================================================================================


@given(st.integers(8, 400), st.integers(8, 400), st.sampled_from([64, 128, 1024]))
def test_resize_longest_side_keeps_aspect(h, w, size):
    """The longest side becomes S and the aspect ratio is kept to rounding."""
    h2, w2 = data.resize_longest_side(h, w, size)
    assert max(h2, w2) == size
    assert abs(h2 - h * size / max(h, w)) <= 0.5 and abs(w2 - w * size / max(h, w)) <= 0.5


@given(st.integers(10, 200), st.integers(10, 200), st.sampled_from([48, 64, 96]),
       st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)))
def test_image_normalised_and_padding_zero(h, w, size, rgb):
    """A flat colour becomes (c - mean) / std inside the image and exactly 0 in the padding."""
    x, (h2, w2) = data.transform_image(np.full((h, w, 3), rgb, np.uint8), size)
    assert x.shape == (3, size, size)
    expect = (torch.tensor(rgb, dtype=torch.float) - torch.tensor(data.SAM_PIXEL_MEAN)) / torch.tensor(data.SAM_PIXEL_STD)
    assert torch.allclose(x[:, :h2, :w2], expect[:, None, None].expand(3, h2, w2), atol=1e-4)
    inside = data.valid_mask((h2, w2), size)
    assert (x[:, ~inside] == 0).all()


def test_transform_image_accepts_pil_and_rejects_bad_arrays():
    """PIL images of any mode work; a float array is a clear error."""
    x, size = data.transform_image(Image.new("L", (30, 20), 200), 40)
    assert x.shape == (3, 40, 40) and size == (27, 40)
    with pytest.raises(ValueError, match="uint8"):
        data.transform_image(np.zeros((5, 5, 3), np.float32), 40)


@given(st.integers(32, 400), st.floats(1 / 3, 3), st.sampled_from([128, 256]), st.data())
def test_mask_round_trip_iou(h, aspect, size, draw):
    """A mask sent forward and back keeps IoU >= 0.95 with the original (aspect ratios 1:3..3:1)."""
    w = max(8, round(h * aspect))
    # An ellipse covering 40..90 % of each side: a region of realistic size for its image.
    fy, fx = draw.draw(st.floats(0.4, 0.9)), draw.draw(st.floats(0.4, 0.9))
    pil = Image.new("L", (w, h), 0)
    ImageDraw.Draw(pil).ellipse([w * (1 - fx) / 2, h * (1 - fy) / 2, w * (1 + fx) / 2, h * (1 + fy) / 2], fill=1)
    mask = np.asarray(pil) > 0
    fwd = data.transform_mask(mask, size)
    h2, w2 = data.resize_longest_side(h, w, size)
    back = data.invert_transform(fwd, (h2, w2), (h, w)) > 0.5
    m = torch.from_numpy(mask)
    iou = (back & m).sum() / (back | m).sum()
    assert iou >= 0.95


@given(st.integers(5, 300), st.integers(5, 300), st.sampled_from([32, 64]))
def test_mask_values_binary_and_padding_zero(h, w, size):
    """A full mask transforms to {0, 1} with 1 exactly on the valid area."""
    fwd = data.transform_mask(np.ones((h, w), bool), size)
    assert torch.equal(fwd.bool(), data.valid_mask(data.resize_longest_side(h, w, size), size))


def test_valid_mask_batch_matches_single():
    """valid_mask of (B, 2) stacks the single-size masks."""
    sizes = torch.tensor([[10, 16], [16, 7]])
    batch = data.valid_mask(sizes, 16)
    assert batch.shape == (2, 16, 16)
    for b in range(2):
        assert torch.equal(batch[b], data.valid_mask(tuple(sizes[b].tolist()), 16))
    assert batch[0].sum() == 160 and batch[1].sum() == 112


def test_invert_transform_keeps_leading_dims():
    """invert_transform maps (..., S, S) to (..., H, W)."""
    x = torch.randn(2, 1, 32, 32)
    assert data.invert_transform(x, torch.tensor([24, 32]), torch.tensor([60, 80])).shape == (2, 1, 60, 80)


# ============================================================================================
# RefCOCO family against ../shared/refcoco-mini (real records)
# ============================================================================================

MINI_COUNTS = [  # dataset, split_by, split, refs, sentences, image ids (README table)
    ("refcoco", "unc", "train", 2, 5, {460986}), ("refcoco", "unc", "val", 2, 6, {572949}),
    ("refcoco", "unc", "testA", 2, 6, {495169}), ("refcoco", "unc", "testB", 2, 6, {510027}),
    ("refcoco", "unc", "test", 4, 12, {495169, 510027}),
    ("refcoco", "google", "train", 2, 6, {460986}), ("refcoco", "google", "val", 2, 5, {460986, 510027}),
    ("refcoco", "google", "test", 2, 6, {460986}),
    ("refcoco+", "unc", "train", 2, 6, {460986}), ("refcoco+", "unc", "val", 2, 7, {572949}),
    ("refcoco+", "unc", "testA", 2, 6, {495169}), ("refcoco+", "unc", "testB", 2, 6, {510027}),
    ("refcoco+", "unc", "test", 4, 12, {495169, 510027}),
    ("refcocog", "umd", "train", 2, 4, {460986}), ("refcocog", "umd", "val", 2, 4, {510027}),
    ("refcocog", "umd", "test", 2, 4, {495169}),
    ("refcocog", "google", "train", 2, 4, {460986}), ("refcocog", "google", "val", 2, 4, {460986, 495169}),
]


@pytest.fixture(scope="module")
def mini():
    return shared_path("refcoco-mini")


@pytest.mark.parametrize("dataset,split_by,split,n_refs,n_sents,image_ids", MINI_COUNTS)
def test_mini_counts(mini, dataset, split_by, split, n_refs, n_sents, image_ids):
    """Refs, sentences and images per dataset/partition/split match the fixture's README."""
    ds = data.RefDataset(mini, dataset, split_by, split, image_size=32)
    assert len(ds.refs) == n_refs and len(ds) == n_sents and set(ds.image_ids) == image_ids


@pytest.mark.parametrize("dataset,split_by", [(d, s) for d, parts in data.DATASETS.items() for s in parts])
def test_mini_sentences_are_the_sent_field(mini, dataset, split_by):
    """Items carry every ref's `sent` strings, in file order, with their sent ids."""
    with open(mini / dataset / f"refs({split_by}).p", "rb") as f:
        refs = pickle.load(f)
    got = []
    for split in data.SPLITS[(dataset, split_by)]:
        ds = data.RefDataset(mini, dataset, split_by, split, load_images=False, image_size=32)
        got += [(ds[i]["sent_id"], ds[i]["sentence"]) for i in range(len(ds))]
        assert torch.equal(ds.ids, data.tokenize(ds.sentences, ds.context_length)[0])
    assert sorted(got) == sorted((s["sent_id"], s["sent"]) for r in refs for s in r["sentences"])


def _pil_polygon_mask(ann, h, w):
    """An independent rasterisation: PIL's polygon fill of every part."""
    img = Image.new("L", (w, h), 0)
    for poly in ann["segmentation"]:
        ImageDraw.Draw(img).polygon(list(zip(poly[0::2], poly[1::2])), fill=1)
    return np.asarray(img) > 0


@pytest.mark.parametrize("dataset", list(data.DATASETS))
def test_mini_mask_areas_match_independent_rasterisation(mini, dataset):
    """Every referenced mask agrees with PIL's rasterisation (IoU >= 0.95) and COCO's area (1 %)."""
    with open(mini / dataset / "instances.json", encoding="utf-8") as f:
        coco = json.load(f)
    anns = {a["id"]: a for a in coco["annotations"]}
    for split_by in data.DATASETS[dataset]:
        for split in data.SPLITS[(dataset, split_by)]:
            ds = data.RefDataset(mini, dataset, split_by, split, load_images=False, image_size=32)
            for i, (ref, _) in enumerate(ds.items):
                got = ds.original_mask(i)
                entry = ds.images[ref["image_id"]]
                assert got.shape == (entry["height"], entry["width"]) and got.dtype == bool
                ann = anns[ref["ann_id"]]
                ref_mask = _pil_polygon_mask(ann, *got.shape)
                assert (got & ref_mask).sum() / (got | ref_mask).sum() >= 0.95
                assert abs(int(got.sum()) - ann["area"]) <= max(64, 0.01 * ann["area"])


def test_mini_every_item_loads_with_the_same_keys(mini):
    """Every item of every dataset/partition/split loads with the contract's keys and shapes."""
    S = 64
    for dataset, parts in data.DATASETS.items():
        for split_by in parts:
            for split in data.SPLITS[(dataset, split_by)]:
                ds = data.RefDataset(mini, dataset, split_by, split, image_size=S)
                L = data.DEFAULT_CONTEXT_LENGTH[dataset]
                for i in range(len(ds)):
                    item = ds[i]
                    assert set(item) == ITEM_KEYS
                    assert item["image"].shape == (3, S, S) and item["mask"].shape == (S, S)
                    assert item["ids"].shape == item["word_mask"].shape == (L,)
                    H, W = item["orig_size"].tolist()
                    assert tuple(item["input_size"].tolist()) == data.resize_longest_side(H, W, S)
                    assert item["mask"].sum() > 0 and item["index"] == i
                    assert item["image_id"] == ds.image_ids[i]


def test_mini_default_image_size_item(mini):
    """One item at the default S = 1024: image and mask padded to 1024, mask inside the image."""
    item = data.RefDataset(mini, "refcocog", split="val")[0]
    assert item["image"].shape == (3, 1024, 1024)
    h2, w2 = item["input_size"].tolist()
    assert item["mask"][h2:].sum() == 0 and item["mask"][:, w2:].sum() == 0


# ============================================================================================
# RefCOCO family against a fixture written here (same layout; runs without ../shared)
# ============================================================================================

IMAGES = {1: (40, 60), 2: (50, 30)}  # image id -> (H, W)


def _write_refer(root, *, image_bytes=None, refs_override=None):
    """Write a tiny refer layout: refcoco with unc and google refs, two JPEGs, four annotations."""
    (root / "refcoco").mkdir(parents=True)
    img_dir = root / "images/mscoco/images/train2014"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = []
    for iid, (h, w) in IMAGES.items():
        name = f"COCO_train2014_{iid:012d}.jpg"
        path = img_dir / name
        if image_bytes is not None:
            path.write_bytes(image_bytes)
        else:
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        images.append({"id": iid, "file_name": name, "height": h, "width": w})
    rle_mask = np.zeros(IMAGES[2], np.uint8, order="F")
    rle_mask[10:20, 5:15] = 1  # 100 px
    compressed = mask_utils.encode(rle_mask)
    compressed["counts"] = compressed["counts"].decode("ascii")
    # Uncompressed RLE of a column-major mask: alternating runs starting with zeros.
    flat = np.zeros(IMAGES[1], np.uint8)
    flat[:, :3] = 1  # the first 3 columns: 120 px
    anns = [
        {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0,
         "segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]]},  # 20 x 10 rectangle
        {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 0,  # two disjoint squares
         "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5], [50, 30, 60, 30, 60, 40, 50, 40]]},
        {"id": 13, "image_id": 1, "category_id": 1, "iscrowd": 1,
         "segmentation": {"size": list(IMAGES[1]), "counts": [0, 120, 40 * 60 - 120]}},
        {"id": 21, "image_id": 2, "category_id": 2, "iscrowd": 1, "segmentation": compressed},
    ]
    with open(root / "refcoco/instances.json", "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": anns, "categories": []}, f)

    def ref(ref_id, ann_id, image_id, split, sents):
        sentences = [{"sent": s, "raw": s, "sent_id": ref_id * 10 + k, "tokens": s.split()} for k, s in enumerate(sents)]
        return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "sentences": sentences,
                "sent_ids": [s["sent_id"] for s in sentences], "category_id": 1, "file_name": "x.jpg"}

    unc = refs_override or [ref(1, 11, 1, "train", ["left box", "the box"]), ref(2, 12, 1, "train", ["two squares"]),
                            ref(3, 13, 1, "testA", ["", "café"]), ref(4, 21, 2, "testB", ["square thing"]),
                            ref(5, 11, 1, "val", ["box"])]
    for name, refs in [("unc", unc), ("google", [ref(6, 21, 2, "test", ["x"])])]:
        with open(root / f"refcoco/refs({name}).p", "wb") as f:
            pickle.dump(refs, f, protocol=2)
    return root


@pytest.fixture
def refer_root(tmp_path):
    return _write_refer(tmp_path / "refer")


def test_fixture_counts_and_test_union(refer_root):
    """Splits select their refs; `test` is testA + testB; one item per (ref, sentence)."""
    n = {s: len(data.RefDataset(refer_root, split=s, image_size=32)) for s in ("train", "val", "testA", "testB", "test")}
    assert n == {"train": 3, "val": 1, "testA": 2, "testB": 1, "test": 3}
    assert len(data.RefDataset(refer_root, split_by="google", split="test", image_size=32)) == 1


def test_fixture_masks_polygon_multipolygon_and_rle(refer_root):
    """Polygon, multi-part polygon, uncompressed and compressed RLE masks decode to the drawn areas."""
    train = data.RefDataset(refer_root, split="train", image_size=32)
    rect = train.original_mask(0)
    assert rect.shape == IMAGES[1] and rect[10:20, 10:30].all()
    assert 200 <= rect.sum() <= 231  # pycocotools rasterises the 20 x 10 outline inclusively
    parts = train.original_mask(2)
    assert parts[:5, :5].all() and parts[30:40, 50:60].all() and not parts[20, 20]
    test = data.RefDataset(refer_root, split="test", image_size=32)
    assert test.original_mask(0).sum() == 120 and test.original_mask(0)[:, :3].all()
    assert test.original_mask(2).sum() == 100 and test.original_mask(2)[10:20, 5:15].all()


def test_fixture_items_have_contract_keys(refer_root):
    """Every fixture item has the contract's keys; empty and non-ASCII sentences load."""
    ds = data.RefDataset(refer_root, split="testA", image_size=48, context_length=6)
    items = [ds[i] for i in range(len(ds))]
    assert all(set(it) == ITEM_KEYS for it in items)
    assert [it["sentence"] for it in items] == ["", "café"]
    assert items[0]["word_mask"].sum() == 2 and items[0]["ids"].shape == (6,)
    assert items[0]["orig_size"].tolist() == [40, 60] and items[0]["input_size"].tolist() == [32, 48]
    batch = torch.utils.data.default_collate(items)
    assert batch["image"].shape == (2, 3, 48, 48)


def test_fixture_load_images_false_skips_pixels(tmp_path):
    """load_images=False returns an empty image tensor and never opens the (broken) files."""
    root = _write_refer(tmp_path / "r", image_bytes=b"not a jpeg")
    item = data.RefDataset(root, split="train", image_size=32, load_images=False)[0]
    assert item["image"].shape == (0,) and item["mask"].sum() > 0


@pytest.mark.parametrize("name", ["refer", "shapes"])
def test_load_masks_false_skips_the_ground_truth(refer_root, monkeypatch, name):
    """load_masks=False returns an empty mask tensor without decoding the annotation, other keys unchanged."""
    if name == "shapes":
        full, lean = (data.ShapesDataset("val", num_images=2, image_size=32, load_masks=m) for m in (True, False))
    else:
        full, lean = (data.RefDataset(refer_root, split="train", image_size=32, load_masks=m) for m in (True, False))
    expected = full[0]
    monkeypatch.setattr(lean, "original_mask", lambda index: pytest.fail("decoded a mask"))
    item = lean[0]
    assert item["mask"].shape == (0,) and item.keys() == expected.keys()
    torch.testing.assert_close(item["image"], expected["image"], rtol=0, atol=0)


def test_fixture_annotations_are_parsed_once(refer_root):
    """Several splits of one partition share the parsed instances.json and refs file."""
    data.RefDataset(refer_root, split="train", image_size=32)
    before = data._read_instances.cache_info()
    data.RefDataset(refer_root, split="val", image_size=32)
    data.RefDataset(refer_root, split_by="google", split="test", image_size=32)
    after = data._read_instances.cache_info()
    assert after.hits == before.hits + 2 and after.misses == before.misses


def test_build_dataset_dispatches(refer_root):
    """build_dataset builds both kinds and rejects unknown names or a missing root."""
    assert isinstance(data.build_dataset("refcoco", "val", root=refer_root, image_size=32), data.RefDataset)
    shapes = data.build_dataset("shapes", "val", image_size=64)
    assert isinstance(shapes, data.ShapesDataset) and shapes[0]["image"].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="'imagenet'"):
        data.build_dataset("imagenet", "val", image_size=32)
    with pytest.raises(ValueError, match="root"):
        data.build_dataset("refcocog", "val", image_size=32)


# ============================================================================================
# Bad input: every error names the file or value
# ============================================================================================


def test_missing_annotation_file_says_where_data_comes_from(tmp_path):
    """A missing refs file names its path, the layout and the refer / COCO sources."""
    with pytest.raises(FileNotFoundError) as e:
        data.RefDataset(tmp_path, "refcocog", split="val")
    msg = str(e.value)
    assert "refs(umd).p" in msg and "lichengunc/refer" in msg and "cocodataset.org" in msg and "train2014" in msg


def test_missing_instances_file(refer_root):
    """A missing instances.json is named."""
    (refer_root / "refcoco/instances.json").unlink()
    with pytest.raises(FileNotFoundError, match="instances.json"):
        data.RefDataset(refer_root, split="train")


def test_missing_image_is_named(refer_root):
    """A missing JPEG is named when the item is loaded."""
    path = refer_root / "images/mscoco/images/train2014/COCO_train2014_000000000001.jpg"
    path.unlink()
    with pytest.raises(FileNotFoundError, match="COCO_train2014_000000000001.jpg"):
        data.RefDataset(refer_root, split="train", image_size=32)[0]


@pytest.mark.parametrize("payload", [b"garbage, not an image", "truncated"])
def test_corrupt_image_is_named(refer_root, payload):
    """Garbage bytes or a truncated JPEG give a ValueError naming the file."""
    path = refer_root / "images/mscoco/images/train2014/COCO_train2014_000000000001.jpg"
    if payload == "truncated":
        payload = path.read_bytes()[:300]
    path.write_bytes(payload)
    with pytest.raises(ValueError, match="COCO_train2014_000000000001.jpg"):
        data.RefDataset(refer_root, split="train", image_size=32)[0]


def test_image_of_wrong_size_is_named(refer_root):
    """An image whose size disagrees with instances.json is a clear error."""
    path = refer_root / "images/mscoco/images/train2014/COCO_train2014_000000000001.jpg"
    Image.new("RGB", (10, 10)).save(path)
    with pytest.raises(ValueError, match="records 60x40"):
        data.RefDataset(refer_root, split="train", image_size=32)[0]


@pytest.mark.parametrize("kwargs,bad", [({"dataset": "refclef"}, "'refclef'"),
                                        ({"dataset": "refcoco+", "split_by": "google"}, "'google'"),
                                        ({"split": "testC"}, "'testC'"),
                                        ({"dataset": "refcocog", "split_by": "google", "split": "test"}, "'test'")])
def test_unknown_names_are_rejected(refer_root, kwargs, bad):
    """Unknown dataset / split_by / split give a ValueError naming the value and the choices."""
    with pytest.raises(ValueError, match=bad) as e:
        data.RefDataset(refer_root, **kwargs)
    assert "expected one of" in str(e.value)


def test_ref_with_missing_annotation_id(tmp_path):
    """A ref naming an annotation id absent from instances.json names the ref, the id and the files."""
    bad_ref = {"ref_id": 9, "ann_id": 999, "image_id": 1, "split": "train", "sent_ids": [1],
               "sentences": [{"sent": "x", "raw": "x", "sent_id": 1, "tokens": ["x"]}], "category_id": 1, "file_name": "x"}
    root = _write_refer(tmp_path / "r", refs_override=[bad_ref])
    with pytest.raises(ValueError, match="annotation id 999") as e:
        data.RefDataset(root, split="train")
    assert "refs(unc).p" in str(e.value) and "ref 9" in str(e.value)


def test_corrupt_refs_and_instances_are_named(refer_root):
    """Unreadable pickle or JSON files are ValueErrors naming the file."""
    (refer_root / "refcoco/refs(unc).p").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match=r"refs\(unc\).p"):
        data.RefDataset(refer_root, split="train")
    (refer_root / "refcoco/instances.json").write_text("{not json")
    with pytest.raises(ValueError, match="instances.json"):
        data.RefDataset(refer_root, split_by="google", split="test")


def test_unreadable_segmentation_names_annotation():
    """A segmentation pycocotools cannot read gives a ValueError naming the annotation."""
    with pytest.raises(ValueError, match="annotation 7"):
        data.annotation_mask({"id": 7, "segmentation": 3.5}, 10, 10)


# ============================================================================================
# Shapes dataset
# ============================================================================================


@pytest.fixture(scope="module")
def shapes_val():
    return data.ShapesDataset("val", num_images=40)


def test_shapes_is_deterministic(shapes_val):
    """The same seed gives the same sentences, images and masks."""
    again = data.ShapesDataset("val", num_images=40)
    assert again.sentences == shapes_val.sentences
    for i in (0, 7, len(again) - 1):
        a, b = again[i], shapes_val[i]
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in ITEM_KEYS)


def test_shapes_splits_and_seeds_differ(shapes_val):
    """Train, val, test and another seed give different scenes."""
    sig = lambda ds: {(s.height, s.width, round(s.objects[0].cx, 3)) for s in ds.scenes}
    others = [data.ShapesDataset("train", num_images=40), data.ShapesDataset("test", num_images=40),
              data.ShapesDataset("val", num_images=40, seed=1)]
    assert all(not (sig(o) & sig(shapes_val)) for o in others)


def test_shapes_every_expression_picks_exactly_one_object():
    """The checker resolves every generated expression to exactly its referred object."""
    ds = data.ShapesDataset("train", num_images=300, load_images=False)
    for image_id, obj, expr in ds.items:
        assert data.evaluate_expression(expr, ds.scenes[image_id]) == [obj], expr


def _scene(*objs):
    """A hand-built 100 x 100 scene from (shape, colour, size, cx, cy) tuples."""
    return data.Scene(100, 100, 0, [data.ShapeObject(s, c, z, x, y, 8.0, (0, 0, 0)) for s, c, z, x, y in objs], [])


def test_checker_on_a_hand_built_scene():
    """The checker follows the grammar's meaning: attributes, extremes, relations, ambiguity."""
    sc = _scene(("circle", "red", "small", 20, 50), ("circle", "red", "small", 80, 50),
                ("square", "blue", "large", 50, 20), ("circle", "blue", "large", 50, 85))
    ev = lambda e: data.evaluate_expression(e, sc)
    assert ev("the red circle") == [0, 1]  # ambiguous: two referents
    assert ev("the red circle on the left") == [0] and ev("the small circle on the right") == [1]
    assert ev("the circle at the bottom") == [3] and ev("the square") == [2]
    assert ev("the circle below the blue square") == [0, 1, 3]
    assert ev("the red circle to the right of the square") == [1]
    assert ev("the circle above the circle") == []  # the anchor must itself be unique
    with pytest.raises(ValueError):
        ev("a red circle")
    with pytest.raises(ValueError):
        ev("the purple blob")


def test_shapes_text_is_needed(shapes_val):
    """Most images have several items and objects sharing an attribute (distractors)."""
    shared = sum(len({o.shape for o in s.objects}) < len(s.objects) or len({o.color for o in s.objects}) < len(s.objects)
                 for s in shapes_val.scenes)
    assert shared == len(shapes_val.scenes)
    assert sum(len(s.items) >= 2 for s in shapes_val.scenes) >= 0.9 * len(shapes_val.scenes)


def test_shapes_items_and_masks(shapes_val):
    """Items have the contract keys, varied native sizes, masks aligned with the drawn object."""
    sizes = set()
    for i in range(0, len(shapes_val), 5):
        item = shapes_val[i]
        assert set(item) == ITEM_KEYS and item["image"].shape == (3, 128, 128)
        sizes.add(tuple(item["input_size"].tolist()))
        # learnable at a 32 x 32 logit map: at least 4 logit cells (4 x 4 px each at S = 128)
        assert item["mask"].sum() >= 4 * 16
        image_id, obj, _ = shapes_val.items[i]
        pixels = np.asarray(shapes_val.load_image(image_id))[shapes_val.original_mask(i)]
        assert (pixels == shapes_val.scenes[image_id].objects[obj].rgb).all()
    assert len(sizes) > 3


def test_shapes_default_sizes():
    """Default val split has a few hundred items with tokens that fit the context length."""
    ds = data.ShapesDataset("val", load_images=False)
    assert 250 <= len(ds) <= 600
    assert (ds.word_mask.sum(1) < ds.context_length).all()  # never truncated


def test_shapes_unknown_split():
    """An unknown shapes split names the value."""
    with pytest.raises(ValueError, match="'dev'"):
        data.ShapesDataset("dev")


def test_shapes_more_scenes_extend_the_split():
    """A larger num_images keeps the smaller split's scenes and items as its prefix (scene i is seeded by i)."""
    small = data.ShapesDataset("train", num_images=12, load_images=False)
    large = data.build_dataset("shapes", "train", image_size=128, num_images=20, load_images=False)
    assert len(large.scenes) == 20 and len(large) > len(small)
    assert large.items[:len(small)] == small.items
    assert all(a.objects == b.objects for a, b in zip(small.scenes, large.scenes))


def test_shapes_num_images_errors():
    """num_images < 1 and num_images for a RefCOCO-family dataset are refused, naming the value."""
    with pytest.raises(ValueError, match="got 0"):
        data.ShapesDataset("train", num_images=0)
    with pytest.raises(ValueError, match="num_images=5 is for the generated shapes"):
        data.build_dataset("refcoco", "train", image_size=64, num_images=5)


# ============================================================================================
# Image-grouped batching
# ============================================================================================

image_id_lists = st.lists(st.integers(0, 12), min_size=1, max_size=60)


@given(image_id_lists, st.integers(1, 9), st.one_of(st.none(), st.integers(1, 5)), st.integers(0, 3))
def test_grouped_sampler_yields_every_item_once(image_ids, batch_size, k, epoch):
    """One epoch of the grouped sampler is a partition of the dataset into batches of at most B."""
    sampler = data.ImageGroupedBatchSampler(image_ids, batch_size, sentences_per_image=k, seed=3)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(image_ids)))
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert len(batches) == len(sampler)


@given(image_id_lists, st.integers(1, 5))
def test_grouped_sampler_keeps_chunks_of_one_image_together(image_ids, k):
    """Consecutive runs of one image are at most k long and every image is split into ceil(n/k) runs."""
    sampler = data.ImageGroupedBatchSampler(image_ids, 4, sentences_per_image=k, seed=0)
    flat = [i for b in sampler for i in b]
    runs, counts = [], {}
    for index in flat:  # the stream is chunks of one image each, chunk after chunk
        if runs and image_ids[runs[-1][-1]] == image_ids[index] and len(runs[-1]) < k:
            runs[-1].append(index)
        else:
            runs.append([index])
    for run in runs:
        counts[image_ids[run[0]]] = counts.get(image_ids[run[0]], 0) + 1
    for image_id in set(image_ids):
        n = image_ids.count(image_id)
        assert counts[image_id] == -(-n // k)


def test_grouped_sampler_order_is_a_function_of_seed_and_epoch():
    """Same (seed, epoch) gives the same batches; another epoch gives another order."""
    ids = [i // 3 for i in range(60)]
    a, b = (data.ImageGroupedBatchSampler(ids, 8, seed=1) for _ in range(2))
    a.set_epoch(2), b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)


@given(image_id_lists, st.integers(1, 6), st.integers(2, 4), st.booleans())
def test_grouped_sampler_ranks_cover_all_with_equal_lengths(image_ids, batch_size, world, drop_last):
    """Under DDP every rank steps equally often and the ranks together cover every item (drop_last aside)."""
    per_rank = [list(data.ImageGroupedBatchSampler(image_ids, batch_size, seed=5, drop_last=drop_last,
                                                   num_replicas=world, rank=r)) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    assert all(len(b) == len(data.ImageGroupedBatchSampler(image_ids, batch_size, drop_last=drop_last,
                                                           num_replicas=world)) for b in per_rank)
    covered = {i for batches in per_rank for b in batches for i in b}
    if not drop_last:
        assert covered == set(range(len(image_ids)))


def test_grouped_sampler_rejects_bad_arguments():
    """Zero batch size, zero sentences per image and a rank outside the world are refused."""
    with pytest.raises(ValueError, match="batch_size"):
        data.ImageGroupedBatchSampler([0, 1], 0)
    with pytest.raises(ValueError, match="sentences_per_image"):
        data.ImageGroupedBatchSampler([0, 1], 2, sentences_per_image=0)
    with pytest.raises(ValueError, match="rank 2"):
        data.ImageGroupedBatchSampler([0, 1], 2, num_replicas=2, rank=2)


def test_collate_images_keeps_each_image_once(shapes_val):
    """collate_images stores each distinct picture once and image_index recovers every item's image."""
    sampler = data.ImageGroupedBatchSampler(shapes_val.image_ids[:40], 7, shuffle=False)
    batch_indices = next(iter(sampler))
    items = [shapes_val[i] for i in batch_indices]
    batch = data.collate_images(items)
    assert batch["images"].shape[0] == len({it["image_id"] for it in items}) < len(items)
    assert "image" not in batch
    for row, item in enumerate(items):
        torch.testing.assert_close(batch["images"][batch["image_index"][row]], item["image"], rtol=0, atol=0)
        assert batch["image_ids"][batch["image_index"][row]] == item["image_id"]
    torch.testing.assert_close(batch["ids"], torch.stack([it["ids"] for it in items]))


def test_collate_images_without_pixels(shapes_val):
    """With load_images=False the batch has an empty images tensor and still maps sentences to images."""
    ds = data.ShapesDataset("val", num_images=3, image_size=64, load_images=False)
    batch = data.collate_images([ds[i] for i in range(len(ds))])
    assert batch["images"].numel() == 0
    assert batch["image_ids"][batch["image_index"]].tolist() == ds.image_ids


def test_transformed_image_cache_equals_a_fresh_transform(shapes_val):
    """The per-dataset image cache returns exactly what transform_image computes, for many images."""
    for image_id in list(range(20)) + [0, 1]:  # more ids than the cache holds, then old ones again
        fresh = data.transform_image(shapes_val.load_image(image_id), shapes_val.image_size)[0]
        torch.testing.assert_close(shapes_val._images(image_id), fresh, rtol=0, atol=0)


# ============================================================================================
# Encoder feature cache
# ============================================================================================


def _features(n, C=4, H=3, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"neck": torch.randn(n, C, H, H, generator=g), "taps": [torch.randn(n, H, H, D, generator=g) for _ in range(3)]}


def _cache(root, **fingerprint):
    return data.FeatureCache(root, {"encoder": "tiny", **fingerprint}, neck_shape=(4, 3, 3), tap_shape=(3, 3, 5))


def test_feature_cache_round_trip_is_fp16_exact(tmp_path):
    """Stored features come back as their fp16 rounding, in the order asked for."""
    cache, feats = _cache(tmp_path), _features(3)
    cache.store([7, 8, 9], feats)
    back = cache.load([9, 7])
    assert back["neck"].dtype == torch.float16
    torch.testing.assert_close(back["neck"], feats["neck"][[2, 0]].half(), rtol=0, atol=0)
    for got, want in zip(back["taps"], feats["taps"]):
        torch.testing.assert_close(got, want[[2, 0]].half(), rtol=0, atol=0)
    assert cache.bytes_per_image == 2 * (4 * 9 + 3 * 9 * 5) == cache.path(7).stat().st_size - 128  # .npy header


def test_feature_cache_computes_only_missing_images(tmp_path):
    """get() encodes just the images not cached yet, once each, and returns rows in request order."""
    cache, feats, calls = _cache(tmp_path), _features(4), []

    def encode(ids):
        calls.append(list(ids))
        return {"neck": feats["neck"][ids], "taps": [t[ids] for t in feats["taps"]]}

    cache.get([0, 1], encode)
    out = cache.get([2, 1, 2, 3], encode)
    assert calls == [[0, 1], [2, 3]]
    torch.testing.assert_close(out["neck"], feats["neck"][[2, 1, 2, 3]].half(), rtol=0, atol=0)


def test_feature_cache_refuses_another_fingerprint(tmp_path):
    """A cache built for another encoder is refused with the differing fields named, or rebuilt on request."""
    _cache(tmp_path, weights="aaa").store([1], _features(1))
    with pytest.raises(ValueError, match=r"\['weights'\] differ"):
        _cache(tmp_path, weights="bbb")
    rebuilt = data.FeatureCache(tmp_path, {"encoder": "tiny", "weights": "bbb"}, neck_shape=(4, 3, 3),
                                tap_shape=(3, 3, 5), rebuild=True)
    assert 1 not in rebuilt
    assert json.loads((tmp_path / "meta.json").read_text())["weights"] == "bbb"


def test_feature_cache_killed_write_leaves_no_entry(tmp_path, monkeypatch):
    """A write that dies half-way leaves the image absent (no torn entry), and the next get recomputes it."""
    cache = _cache(tmp_path)

    def dying_save(f, arr):
        f.write(b"\\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(data.np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        cache.store([5], _features(1))
    monkeypatch.undo()
    assert 5 not in cache
    assert not list(tmp_path.glob("*.tmp"))  # the half-written temporary file is removed too
    with pytest.raises(ValueError, match="5.npy"):
        cache.load([5])
