"""Tests for data.py: tokenizer, transforms, RefCOCO-family loading, the shapes dataset, errors."""
import functools
import importlib.util
import json
import pathlib
import pickle
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

import data
import maris
from conftest import ROOT, shared_path

ITEM_KEYS = {"image", "mask", "ids", "word_mask", "orig_size", "input_size", "ref_id", "sent_id",
             "image_id", "sentence", "index", "no_target"}


# ============================================================================================
# Tokenizer
# ============================================================================================


@pytest.fixture(scope="module")
def golden():
    """OpenAI's tokenizer outputs (tests/fixtures/README.md says where they come from)."""
    with open(ROOT / "tests" / "fixtures" / "clip_tokenizer_golden.json", encoding="utf-8") as f:
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
    mean, std = torch.tensor(data.SAM_PIXEL_MEAN), torch.tensor(data.SAM_PIXEL_STD)
    expect = (torch.tensor(rgb, dtype=torch.float) - mean) / std
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


# --- SAM's own pre- and post-processing as the reference -----------------------------------------


@functools.lru_cache(maxsize=None)
def small_sam(size: int):
    """segment_anything's `Sam` with a one-block encoder at input side `size`; only its pre- and
    post-processing (pixel mean/std, padding, mask upsampling) are used."""
    m = maris.import_sam_modeling()
    return m.Sam(image_encoder=m.ImageEncoderViT(img_size=size, patch_size=16, embed_dim=16, depth=1, num_heads=2,
                                                 out_chans=8),
                 prompt_encoder=m.PromptEncoder(embed_dim=8, image_embedding_size=(size // 16, size // 16),
                                                input_image_size=(size, size), mask_in_chans=4),
                 mask_decoder=m.MaskDecoder(transformer_dim=8, transformer=m.TwoWayTransformer(
                     depth=1, embedding_dim=8, num_heads=2, mlp_dim=16))).eval()


@pytest.fixture(scope="module")
def sam_transforms():
    """segment_anything/utils/transforms.py (SAM's ResizeLongestSide); its torchvision import is stubbed
    out when torchvision is missing (only the size arithmetic is used)."""
    path = pathlib.Path(importlib.util.find_spec("segment_anything").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location("_sam_utils_transforms", path / "utils" / "transforms.py")
    module = importlib.util.module_from_spec(spec)
    stubs = {}
    try:
        import torchvision.transforms.functional  # noqa: F401
    except ImportError:
        functional = types.ModuleType("torchvision.transforms.functional")
        functional.resize = functional.to_pil_image = None
        stubs = {"torchvision": types.ModuleType("torchvision"),
                 "torchvision.transforms": types.ModuleType("torchvision.transforms"),
                 "torchvision.transforms.functional": functional}
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                del sys.modules[name]
            else:
                sys.modules[name] = old
    return module


@given(st.integers(1, 2000), st.integers(1, 2000), st.sampled_from([64, 1024, 1000]))
@example(1, 16, 1000)  # h * S / max(h, w) = 62.5 exactly: rounds half up, as SAM does
def test_resize_longest_side_is_sams_arithmetic(sam_transforms, h, w, size):
    """resize_longest_side gives ResizeLongestSide.get_preprocess_shape's (h2, w2) for any size."""
    assert data.resize_longest_side(h, w, size) == sam_transforms.ResizeLongestSide.get_preprocess_shape(h, w, size)


@given(st.integers(5, 90), st.integers(5, 90), st.integers(0, 2**16))
def test_transform_image_equals_sam_preprocess(h, w, seed):
    """transform_image equals SAM's Sam.preprocess (normalise with its pixel mean/std in RGB order, pad
    bottom/right) of the PIL-bilinear-resized picture that ResizeLongestSide.apply_image feeds it."""
    size = 64
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    x, (h2, w2) = data.transform_image(pixels, size)
    resized = np.array(Image.fromarray(pixels).resize((w2, h2), Image.BILINEAR))  # torchvision's PIL path
    with torch.no_grad():
        expected = small_sam(size).preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None].float())[0]
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)


@given(st.integers(3, 200), st.integers(3, 200), st.integers(0, 2**16))
def test_invert_transform_equals_sam_postprocess_masks(h, w, seed):
    """invert_transform of (S, S) logits equals Sam.postprocess_masks (crop the padding, bilinear resize to
    the original size, align_corners False) on odd sizes and aspect ratios."""
    size = 64
    h2, w2 = data.resize_longest_side(h, w, size)
    x = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(seed))
    expected = small_sam(size).postprocess_masks(x, (h2, w2), (h, w))
    torch.testing.assert_close(data.invert_transform(x[0, 0], (h2, w2), (h, w)), expected[0, 0],
                               atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("dataset,split_by", [(d, s) for d in data.REFER_DATASETS for s in data.DATASETS[d]])
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


@pytest.mark.parametrize("dataset", data.REFER_DATASETS)
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
    for dataset in data.REFER_DATASETS:
        for split_by in data.DATASETS[dataset]:
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
        sentences = [{"sent": s, "raw": s, "sent_id": ref_id * 10 + k, "tokens": s.split()}
                     for k, s in enumerate(sents)]
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
    n = {s: len(data.RefDataset(refer_root, split=s, image_size=32))
         for s in ("train", "val", "testA", "testB", "test")}
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
               "sentences": [{"sent": "x", "raw": "x", "sent_id": 1, "tokens": ["x"]}], "category_id": 1,
               "file_name": "x"}
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
    shared = sum(len({o.shape for o in s.objects}) < len(s.objects)
                 or len({o.color for o in s.objects}) < len(s.objects)
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
    return {"neck": torch.randn(n, C, H, H, generator=g),
            "taps": [torch.randn(n, H, H, D, generator=g) for _ in range(3)]}


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


# ============================================================================================
# Expressions longer than the context length
# ============================================================================================

LONG = "the man in the red shirt standing to the left of the tall woman"  # 14 tokens


def test_cut_expression_warns_with_kept_and_total_tokens():
    """Cutting one expression warns once, saying it kept L - 2 of its tokens and what the model reads."""
    assert len(data.get_tokenizer().encode(LONG)) == 14
    with pytest.warns(data.TextTruncatedWarning, match='reads 6 of its 14 tokens: "the man in the red shirt"') as got:
        data.tokenize(LONG, 8)
    assert len(got) == 1


def test_cut_batch_warns_once_with_counts():
    """A batch with several cut expressions gives one warning counting them."""
    with pytest.warns(data.TextTruncatedWarning, match=r"2 of 3 expressions .* L = 8 .* longest has 14") as got:
        data.tokenize([LONG, "a dog", LONG[:40]], 8)
    assert len(got) == 1


def test_expressions_that_fit_do_not_warn():
    """No warning when every expression fits (exactly L tokens with SOT and EOT fits)."""
    import warnings
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        data.tokenize(["a dog", LONG], 16)
    assert [str(w.message) for w in got] == []


@given(texts, st.integers(2, 30))
def test_fit_text_is_what_the_row_holds(text, L):
    """fit_text gives the decoded row of tokenize and the counts of the tokenizer's own encoding."""
    import warnings
    tokens = data.get_tokenizer().encode(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data.TextTruncatedWarning)
        ids, mask = data.tokenize(text, L)
    fitted = data.fit_text(text, L)
    assert fitted.text == data.decode(ids[0])
    assert (fitted.kept, fitted.total) == (int(mask.sum()) - 2, len(tokens))
    assert fitted.cut == (len(tokens) > L - 2)


# ============================================================================================
# Reading images: EXIF orientation and pixel modes (load_rgb)
# ============================================================================================
# Expected values are worked out by hand from the stated rules (16-bit: v / 257; alpha over SAM's
# mean (124, 116, 104): (src * a + bg * (255 - a)) / 255), or come from numpy's own flips and turns.

SAM_MEAN_RGB = (124, 116, 104)


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode,suffix", [("I;16", "png"), ("I;16B", "tif")])
def test_16_bit_grey_is_scaled_by_its_full_range(tmp_path, mode, suffix):
    """A 16-bit grey file reads as grey RGB on the 16-bit scale, v / 257: 0, 257, 32768, 65000, 65535 -> 0, 1, 128,
    253, 255."""
    values = np.array([[0, 257, 32768, 65000, 65535]], "<u2" if mode == "I;16" else ">u2")  # little / big endian
    path = _save(Image.fromarray(values), tmp_path / f"grey.{suffix}")
    assert Image.open(path).mode == mode
    rgb = np.asarray(data.load_rgb(path))
    assert rgb.shape == (1, 5, 3) and (rgb == np.array([0, 1, 128, 253, 255])[None, :, None]).all()


def test_32_bit_integer_grey_uses_the_16_bit_scale_or_stretches(tmp_path):
    """Mode I with values in 0..65535 reads on the 16-bit scale; wider values are stretched min..max, with a warning."""
    path = _save(Image.fromarray(np.array([[0, 32768, 50000]], np.int32)), tmp_path / "i32.tif")
    assert Image.open(path).mode == "I"
    assert np.asarray(data.load_rgb(path))[0, :, 0].tolist() == [0, 128, 195]  # 50000 / 257 = 194.6
    path = _save(Image.fromarray(np.array([[-1000, 49000, 99000]], np.int32)), tmp_path / "wide.tif")
    with pytest.warns(UserWarning, match="stretched"):
        assert np.asarray(data.load_rgb(path))[0, :, 0].tolist() == [0, 128, 255]  # (v + 1000) * 255 / 100000


@pytest.mark.parametrize("values,expected", [([0.0, 0.5, 1.0], [0, 128, 255]), ([0.0, 100.0, 255.0], [0, 100, 255])])
def test_float_grey_reads_on_the_unit_or_pil_scale(tmp_path, values, expected):
    """Mode F in [0, 1] is scaled by 255; F in [0, 255] (PIL's own float scale) is kept."""
    path = _save(Image.fromarray(np.array([values], np.float32)), tmp_path / "f.tif")
    assert Image.open(path).mode == "F"
    assert np.asarray(data.load_rgb(path))[0, :, 1].tolist() == expected


def test_float_grey_with_nan_is_a_named_error(tmp_path):
    """NaN pixels in a float image are a ValueError naming the file."""
    path = _save(Image.fromarray(np.array([[0.0, np.nan]], np.float32)), tmp_path / "nan.tif")
    with pytest.raises(ValueError, match="nan.tif.*NaN"):
        data.load_rgb(path)


def _half_alpha(src, a=128):
    return [round((s * a + b * (255 - a)) / 255) for s, b in zip(src, SAM_MEAN_RGB)]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "RGB"])
def test_transparent_pixels_lie_on_sam_mean(tmp_path, mode):
    """Transparent pixels (RGBA, LA, P with a transparent index, RGB with a transparent colour) become SAM's
    mean colour; opaque pixels keep theirs; half-transparent ones mix."""
    if mode == "RGBA":
        img = Image.fromarray(np.array([[[255, 0, 0, 0], [10, 200, 30, 255], [255, 255, 255, 128]]], np.uint8))
        expected = [list(SAM_MEAN_RGB), [10, 200, 30], _half_alpha((255, 255, 255))]
    elif mode == "LA":
        img = Image.fromarray(np.array([[[0, 0], [200, 255], [255, 128]]], np.uint8), mode="LA")
        expected = [list(SAM_MEAN_RGB), [200] * 3, _half_alpha((255, 255, 255))]
    elif mode == "P":
        img = Image.fromarray(np.array([[0, 1, 1]], np.uint8), mode="P")
        img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
        img.info["transparency"] = 0
        expected = [list(SAM_MEAN_RGB), [10, 200, 30], [10, 200, 30]]
    else:
        img = Image.fromarray(np.array([[[0, 0, 0], [10, 200, 30], [10, 200, 30]]], np.uint8))
        img.info["transparency"] = (0, 0, 0)
        expected = [list(SAM_MEAN_RGB), [10, 200, 30], [10, 200, 30]]
    path = _save(img, tmp_path / f"{mode}.png", **({"transparency": img.info["transparency"]}
                                                   if "transparency" in img.info else {}))
    assert Image.open(path).mode == mode
    rgb = np.asarray(data.load_rgb(path))[0].tolist()
    assert all(abs(a - b) <= 1 for got, want in zip(rgb, expected) for a, b in zip(got, want)), rgb


@pytest.mark.parametrize("suffix", ["tif", "jpg"])
def test_cmyk_goes_through_pil_conversion(tmp_path, suffix):
    """CMYK reads as PIL converts it: no ink is white, full magenta + yellow is red."""
    img = Image.new("CMYK", (16, 8), (0, 0, 0, 0))
    img.paste((0, 255, 255, 0), (8, 0, 16, 8))
    path = _save(img, tmp_path / f"c.{suffix}")
    assert Image.open(path).mode == "CMYK"
    rgb = np.asarray(data.load_rgb(path)).astype(int)
    assert np.abs(rgb[4, 2] - [255, 255, 255]).max() <= 3 and np.abs(rgb[4, 13] - [255, 0, 0]).max() <= 3


@pytest.mark.parametrize("mode", ["1", "L"])
def test_bilevel_and_grey_become_grey_rgb(tmp_path, mode):
    """Modes 1 and L read as grey RGB with the same levels (1 bit: 0 / 255)."""
    levels = np.array([[0, 255, 90]], np.uint8) if mode == "L" else np.array([[False, True, True]])
    path = _save(Image.fromarray(levels), tmp_path / f"{mode}.png")
    assert Image.open(path).mode == mode
    want = [0, 255, 90] if mode == "L" else [0, 255, 255]
    assert np.asarray(data.load_rgb(path))[0].tolist() == [[v] * 3 for v in want]


# EXIF Orientation -> how the stored pixels are shown (TIFF 6.0 / EXIF 2.3), written with numpy.
EXIF_TURNS = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
              5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
              7: lambda a: np.rot90(a, 2).transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}


def _tagged(path, pixels, orientation, **kw):
    exif = Image.Exif()
    exif[data.EXIF_ORIENTATION_TAG] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), **kw)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_transpose_turns_photos_upright(tmp_path, orientation):
    """exif_transpose=True shows the stored pixels as the EXIF tag says (numpy's flips and turns), size swapped
    for orientations 5..8."""
    pixels = np.random.default_rng(orientation).integers(0, 255, (20, 40, 3), dtype=np.uint8)
    path = _tagged(tmp_path / "photo.png", pixels, orientation)
    upright = np.asarray(data.load_rgb(path, exif_transpose=True))
    assert np.array_equal(upright, EXIF_TURNS[orientation](pixels))
    assert upright.shape[:2] == ((40, 20) if orientation >= 5 else (20, 40))


def test_exif_rotated_jpeg_phone_photo_is_upright(tmp_path):
    """A JPEG stored landscape with Orientation 6 ("rotate 90 clockwise") reads portrait: its left half on top."""
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :40] = (220, 30, 30)  # red left half
    stored[:, 40:] = (30, 30, 220)  # blue right half
    path = _tagged(tmp_path / "phone.jpg", stored, 6, quality=95)
    upright = np.asarray(data.load_rgb(path, exif_transpose=True)).astype(int)
    assert upright.shape == (80, 40, 3)
    assert upright[10, 20, 0] > 180 and upright[10, 20, 2] < 80  # top: red
    assert upright[70, 20, 2] > 180 and upright[70, 20, 0] < 80  # bottom: blue


def test_dataset_images_keep_their_stored_pixels(refer_root):
    """A refer-layout image that carries an EXIF tag is read as stored (the frame of instances.json's size and
    polygons), with an ExifOrientationWarning naming it."""
    path = refer_root / "images/mscoco/images/train2014/COCO_train2014_000000000001.jpg"
    stored = np.random.default_rng(3).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    _tagged(path, stored, 6, quality=95)
    ds = data.RefDataset(refer_root, split="train", image_size=32)
    with pytest.warns(data.ExifOrientationWarning, match="COCO_train2014_000000000001.jpg"):
        img = ds.load_image(1)
    with Image.open(path) as raw:
        assert np.array_equal(np.asarray(img), np.asarray(raw.convert("RGB")))  # PIL decodes without turning
    assert img.size == (60, 40)


def test_transform_image_of_16_bit_grey_gives_mid_grey_input():
    """transform_image reads a PIL 16-bit image through load_rgb: mid-grey 32768 becomes the normalised 128."""
    x, _ = data.transform_image(Image.fromarray(np.full((8, 8), 32768, np.uint16)), 16)
    expect = (128 - torch.tensor(data.SAM_PIXEL_MEAN)) / torch.tensor(data.SAM_PIXEL_STD)  # (3,)
    torch.testing.assert_close(x[:, 0, 0], expect)


def test_transform_image_of_transparent_rgba_is_the_padding_value():
    """A fully transparent RGBA picture normalises to (almost) 0, the padding's value."""
    x, _ = data.transform_image(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), 8)
    assert x.abs().max() < 0.01

# gRefCOCO (GRES): against ../shared/grefcoco-mini and a fixture written here
# ============================================================================================

GREF_MINI_COUNTS = [  # split, refs, sentences, no-target, multi-target, single-target sentences, image (README)
    ("train", 6, 10, 2, 4, 4, 460986), ("val", 7, 13, 3, 5, 5, 572949),
    ("testA", 7, 13, 2, 6, 5, 495169), ("testB", 6, 12, 2, 5, 5, 510027),
]


@pytest.fixture(scope="module")
def gref_mini():
    return shared_path("grefcoco-mini")


def _independent_union(anns, ann_ids, h, w):
    """pycocotools' own merge of every polygon of the non-crowd annotations, decoded (not our code path)."""
    rles = [rle for a in ann_ids if a != -1 and not anns[a]["iscrowd"]
            for rle in mask_utils.frPyObjects(anns[a]["segmentation"], h, w)]
    if not rles:
        return np.zeros((h, w), dtype=bool)
    with warnings.catch_warnings():  # pycocotools' own numpy-2 deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(mask_utils.merge(rles, intersect=False)) > 0


@pytest.mark.parametrize("split,n_refs,n_sents,n_nt,n_multi,n_single,image_id", GREF_MINI_COUNTS)
def test_grefcoco_mini_counts(gref_mini, split, n_refs, n_sents, n_nt, n_multi, n_single, image_id):
    """Refs, sentences and no-/multi-/single-target sentences per split match the fixture's README."""
    ds = data.GRefDataset(gref_mini, split, image_size=32, load_images=False)
    kinds = [0 if r["ann_id"] == [-1] else len(r["ann_id"]) for r, _ in ds.items]
    assert len(ds.refs) == n_refs and len(ds) == n_sents and set(ds.image_ids) == {image_id}
    assert (kinds.count(0), sum(k > 1 for k in kinds), kinds.count(1)) == (n_nt, n_multi, n_single)
    assert ds.no_target == [k == 0 for k in kinds]


def test_grefcoco_mini_masks_equal_a_pycocotools_union(gref_mini):
    """Every item's mask equals pycocotools' merge of its annotations (all False for no target),
    and the item's no_target flag is ann_id == [-1]."""
    with open(gref_mini / "grefcoco/instances.json", encoding="utf-8") as f:
        anns = {a["id"]: a for a in json.load(f)["annotations"]}
    with open(gref_mini / "grefcoco/grefs(unc).json", encoding="utf-8") as f:
        raw = {r["ref_id"]: r for r in json.load(f)}
    seen = 0
    for split in data.SPLITS[("grefcoco", "unc")]:
        ds = data.GRefDataset(gref_mini, split, image_size=32, load_images=False)
        for i, (ref, _) in enumerate(ds.items):
            got = ds.original_mask(i)
            entry = ds.images[ref["image_id"]]
            expect = _independent_union(anns, raw[ref["ref_id"]]["ann_id"], entry["height"], entry["width"])
            assert got.dtype == bool and np.array_equal(got, expect), ref["ref_id"]
            item = ds[i]
            assert item["no_target"] == (raw[ref["ref_id"]]["ann_id"] == [-1]) == (not got.any())
            assert item["mask"].max() <= 1
            seen += 1
    assert seen == 48


def test_grefcoco_mini_overlapping_annotations_unite(gref_mini):
    """Ref 200020's two men share 2,936 px (README): its mask has |a| + |b| - 2936 pixels."""
    ds = data.GRefDataset(gref_mini, "val", image_size=32, load_images=False)
    i = next(i for i, (r, _) in enumerate(ds.items) if r["ref_id"] == 200020)
    entry = ds.images[572949]
    a, b = (data.annotation_mask(ds.anns[k], entry["height"], entry["width"]) for k in (426784, 497043))
    assert (a & b).sum() == 2936
    assert ds.original_mask(i).sum() == a.sum() + b.sum() - 2936


def test_grefcoco_mini_quirks(gref_mini):
    """ref 0 / sent 0 load; the ref without sentences gives no item; typos are kept; images come from
    image_id although file_name carries a suffix no file has."""
    train = data.GRefDataset(gref_mini, "train", image_size=32)
    assert (train[0]["ref_id"], train[0]["sent_id"]) == (0, 0)
    assert 200013 in {r["ref_id"] for r in train.refs} and 200013 not in {r["ref_id"] for r, _ in train.items}
    assert train.items[0][0]["file_name"].endswith("_9.jpg") and train[0]["image"].shape == (3, 32, 32)
    val = data.GRefDataset(gref_mini, "val", image_size=32, load_images=False)
    assert "the b;ack keyboard in front of the computer on the table" in val.sentences


def _write_gref(root, *, refs=None, pickle_refs=None, instances=True):
    """A tiny gRefCOCO layout: images 7 (40 x 60) and 8 (30 x 20), annotations 0-5 (3 is crowd)."""
    (root / "grefcoco").mkdir(parents=True)
    img_dir = root / "images/train2014"
    img_dir.mkdir(parents=True)
    sizes = {7: (40, 60), 8: (30, 20)}
    rng = np.random.default_rng(1)
    for iid, (h, w) in sizes.items():
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(img_dir / f"COCO_train2014_{iid:012d}.jpg")
    rect = lambda x0, y0, x1, y1: [[x0, y0, x1, y0, x1, y1, x0, y1]]
    anns = [{"id": 0, "image_id": 7, "iscrowd": 0, "category_id": 1, "segmentation": rect(1, 1, 6, 5)},
            {"id": 1, "image_id": 7, "iscrowd": 0, "category_id": 1, "segmentation": rect(10, 10, 30, 20)},
            {"id": 2, "image_id": 7, "iscrowd": 0, "category_id": 1, "segmentation": rect(20, 15, 40, 30)},
            {"id": 3, "image_id": 7, "iscrowd": 1, "category_id": 1, "segmentation": rect(40, 0, 59, 39)},
            {"id": 4, "image_id": 7, "iscrowd": 0, "category_id": 2, "segmentation": rect(0, 30, 8, 38)},
            {"id": 5, "image_id": 8, "iscrowd": 0, "category_id": 2, "segmentation": rect(2, 2, 12, 20)}]
    if instances:
        images = [{"id": i, "height": h, "width": w, "file_name": f"COCO_train2014_{i:012d}.jpg"}
                  for i, (h, w) in sizes.items()]
        with open(root / "grefcoco/instances.json", "w", encoding="utf-8") as f:
            json.dump({"images": images, "annotations": anns, "categories": []}, f)

    def ref(ref_id, ann_id, image_id, split, sents, first_sent):
        sentences = [{"raw": s, "sent": s, "sent_id": first_sent + k, "tokens": s.split()} for k, s in enumerate(sents)]
        return {"ref_id": ref_id, "image_id": image_id, "split": split, "ann_id": ann_id, "category_id": 1,
                "no_target": ann_id == [-1], "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences,
                "file_name": f"COCO_train2014_{image_id:012d}_3.jpg"}

    refs = refs or [ref(0, 0, 7, "train", ["left box"], 0),  # scalar ann_id, ids 0
                    ref(1, [1, 2], 7, "train", ["two boxes", "both boxes"], 1),  # overlapping union
                    ref(2, [-1], 7, "train", ["the dog"], 3),  # no target
                    ref(3, [1, 3], 7, "train", ["box and crowd"], 4),  # crowd dropped
                    ref(4, [3], 7, "train", ["only crowd"], 5),  # crowd only: empty, yet a target
                    ref(5, [4], 7, "train", [], 6),  # no sentences: no item
                    ref(6, [5], 8, "val", ["tall box"], 7), ref(7, [0], 7, "testA", ["a"], 8),
                    ref(8, [-1], 8, "testB", ["b"], 9)]
    with open(root / "grefcoco/grefs(unc).json", "w", encoding="utf-8") as f:
        json.dump(refs, f)
    if pickle_refs is not None:
        with open(root / "grefcoco/grefs(unc).p", "wb") as f:
            pickle.dump(pickle_refs, f)
    return root, refs, anns


def test_gref_fixture_items_masks_and_flags(tmp_path):
    """Scalar ann_id is wrapped, ids 0 work, the union has values <= 1, crowd is dropped, a crowd-only
    ref is an empty target, [-1] is an all-zero no-target mask, and a ref without sentences has no item."""
    root, _, anns = _write_gref(tmp_path / "g")
    ds = data.GRefDataset(root, "train", image_size=32)
    assert [(it["ref_id"], it["sent_id"]) for it in (ds[i] for i in range(len(ds)))] == \
        [(0, 0), (1, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert ds.refs[0]["ann_id"] == [0] and ds.sentences == ["left box", "two boxes", "both boxes", "the dog",
                                                             "box and crowd", "only crowd"]
    anns = {a["id"]: a for a in anns}
    for i, (ref, _) in enumerate(ds.items):
        assert np.array_equal(ds.original_mask(i), _independent_union(anns, ref["ann_id"], 40, 60)), ref["ref_id"]
    assert ds.original_mask(1)[15:21, 20:31].all()  # the overlap of annotations 1 and 2
    assert ds[1]["mask"].max() == 1 and set(ds[1]["mask"].unique().tolist()) == {0.0, 1.0}
    assert np.array_equal(ds.original_mask(4), _independent_union(anns, [1], 40, 60))  # crowd 3 dropped
    assert [ds[i]["no_target"] for i in range(len(ds))] == [False, False, False, True, False, False]
    assert not ds.original_mask(3).any() and not ds.original_mask(5).any()
    assert ds[3]["mask"].sum() == 0 and ds[5]["mask"].sum() == 0


def test_gref_fixture_pickle_is_preferred_and_image_comes_from_the_id(tmp_path):
    """grefs(unc).p wins over grefs(unc).json (grefer.py's order); the suffixed file_name is ignored."""
    root, refs, _ = _write_gref(tmp_path / "g")
    assert data.GRefDataset(root, "val", image_size=32)[0]["image"].shape == (3, 32, 32)  # file_name has _3
    (root / "grefcoco/grefs(unc).p").write_bytes(pickle.dumps([dict(refs[6], sentences=[
        {"raw": "from the pickle", "sent": "from the pickle", "sent_id": 70, "tokens": []}])]))
    assert data.GRefDataset(root, "val", image_size=32, load_images=False).sentences == ["from the pickle"]


@pytest.mark.parametrize("missing", ["grefs(unc).json", "instances.json"])
def test_gref_missing_files_name_the_layout(tmp_path, missing):
    """A missing refs or instances file is a FileNotFoundError naming it, the layout and the source."""
    root, _, _ = _write_gref(tmp_path / "g")
    (root / "grefcoco" / missing).unlink()
    with pytest.raises(FileNotFoundError) as e:
        data.GRefDataset(root, "train")
    msg = str(e.value)
    assert missing in msg and "henghuiding/gRefCOCO" in msg and "images/train2014" in msg


def test_gref_bad_split_and_bad_refs_are_named(tmp_path):
    """An unknown split names the choices; a ref with an annotation id absent from instances.json or
    with -1 among real ids names the ref, the id and the files."""
    root, refs, _ = _write_gref(tmp_path / "g")
    with pytest.raises(ValueError, match="'test'.*expected one of"):
        data.GRefDataset(root, "test")
    root2, _, _ = _write_gref(tmp_path / "h", refs=[dict(refs[1], ann_id=[1, 99])])
    with pytest.raises(ValueError, match="ref 1 names annotation id 99") as e:
        data.GRefDataset(root2, "train")
    assert "grefs(unc).json" in str(e.value) and "instances.json" in str(e.value)
    root3, _, _ = _write_gref(tmp_path / "i", refs=[dict(refs[1], ann_id=[-1, 1])])
    with pytest.raises(ValueError, match="mixes the no-target id -1"):
        data.GRefDataset(root3, "train")


# ============================================================================================
# PhraseCut: against ../shared/phrasecut-mini and a fixture written here
# ============================================================================================

PHRASECUT_MINI = {"train": (13, {3000101, 3000102, 3000103}), "val": (7, {3000201, 3000202}),
                  "test": (8, {3000301, 3000302}), "miniv": (4, {3000401}),
                  "val_miniv": (11, {3000201, 3000202, 3000401})}  # README: tasks, images


def _official_restatement(task, w, h, vertex=int):
    """The official polygons_to_mask restated: one PIL canvas per polygon, summed, > 0."""
    total = np.zeros((h, w))
    for instance in task["Polygons"]:
        for polygon in instance:
            if len(polygon) < 2:
                continue
            img = Image.new("L", (w, h), 0)
            ImageDraw.Draw(img).polygon([(vertex(x), vertex(y)) for x, y in polygon], outline=1, fill=1)
            total += np.array(img)
    return total > 0


@pytest.fixture(scope="module")
def phrasecut_mini():
    return shared_path("phrasecut-mini")


@pytest.mark.parametrize("split", list(PHRASECUT_MINI))
def test_phrasecut_mini_counts(phrasecut_mini, split):
    """Tasks and images per split match the fixture's README; task ids and phrases are carried."""
    n, images = PHRASECUT_MINI[split]
    ds = data.PhraseCutDataset(phrasecut_mini, split, image_size=32, load_images=False)
    assert len(ds) == n and set(ds.image_ids) == images
    item = ds[0]
    assert item["task_id"] == ds.tasks[0]["task_id"] and item["sentence"] == ds.tasks[0]["phrase"]
    assert item["task_id"].split("__")[0] == str(item["image_id"]) and item["no_target"] is False


def test_phrasecut_mini_masks_equal_the_official_restatement(phrasecut_mini):
    """Every task's mask equals the per-polygon PIL re-statement at the recorded size, and differs from
    rounding the vertices for 30 of the 32 tasks (README), so truncation is what makes it equal."""
    differ = 0
    for split in data.PHRASECUT_SPLITS:
        ds = data.PhraseCutDataset(phrasecut_mini / "VGPhraseCut_v0", split, image_size=32, load_images=False)
        for i, task in enumerate(ds.tasks):
            entry = ds.images[task["image_id"]]
            got = ds.original_mask(i)
            assert got.shape == (entry["height"], entry["width"])
            assert np.array_equal(got, _official_restatement(task, entry["width"], entry["height"])), task["task_id"]
            differ += not np.array_equal(got, _official_restatement(task, entry["width"], entry["height"], round))
    assert differ == 30


def test_phrasecut_mask_hand_counted_pixels():
    """Tiny polygons counted by hand: int() truncates -1.5 to -1 (floor would give -2), the outline
    counts, a 2-point polygon is a line, a 1-point polygon is skipped, instances unite."""
    tri = [[-1.5, 0.0], [3.0, 0.0], [-1.5, 4.5]]  # -> (-1,0) (3,0) (-1,4): pixels with x + y <= 3, x >= 0
    assert data.phrasecut_mask([tri], 8, 6).sum() == 4 + 3 + 2 + 1
    floor = Image.new("L", (8, 6), 0)
    ImageDraw.Draw(floor).polygon([(-2, 0), (3, 0), (-2, 4)], outline=1, fill=1)
    assert np.asarray(floor).sum() != 10
    line = data.phrasecut_mask([[[0.7, 0.2], [4.9, 0.8]]], 8, 6)
    assert line.sum() == 5 and line[0, :5].all()
    assert data.phrasecut_mask([[[1.5, 1.5]]], 8, 6).sum() == 0
    square = [[1, 1], [3.9, 1], [3.9, 3.2], [1, 3.2]]  # -> (1,1)-(3,3) inclusive: 3 x 3
    other = [[3, 3], [5, 3], [5, 4], [3, 4]]  # 3 x 2, overlapping the square at (3, 3)
    task = {"Polygons": [[square], [other, [[0, 5]]]]}
    assert data.phrasecut_mask(data.phrasecut_polygons(task), 8, 6).sum() == 9 + 6 - 1


def _write_phrasecut(root, *, mismatched=True):
    """A tiny VGPhraseCut_v0: image 11 (recorded 40 x 30) saved at its size, image 12 (recorded 50 x 20)
    saved at 25 x 10 when `mismatched`; test tasks on both, a val task on 12."""
    folder = root / "VGPhraseCut_v0"
    (folder / "images").mkdir(parents=True)
    info = [{"image_id": 11, "width": 40, "height": 30, "split": "test"},
            {"image_id": 12, "width": 50, "height": 20, "split": "test"},
            {"image_id": 13, "width": 10, "height": 10, "split": "val"}]
    for entry, saved in zip(info, [(40, 30), (25, 10) if mismatched else (50, 20), (10, 10)]):
        Image.new("RGB", saved, (200, 10, 10)).save(folder / f"images/{entry['image_id']}.jpg")
    with open(folder / "image_data_split.json", "w", encoding="utf-8") as f:
        json.dump(info, f)

    def task(image_id, ann_ids, phrase, polygons):
        return {"task_id": f"{image_id}__" + "_".join(map(str, ann_ids)), "image_id": image_id, "ann_ids": ann_ids,
                "phrase": phrase, "phrase_structure": {"name": phrase, "attributes": [], "relation_ids": [],
                                                       "relation_descriptions": [], "type": "name"},
                "instance_boxes": [[0, 0, 1, 1]] * len(polygons), "Polygons": polygons}

    tests = [task(11, [1], "red car", [[[[2.5, 2.5], [10.9, 2.5], [10.9, 8.7], [2.5, 8.7]]]]),
             task(12, [2, 3], "two cars", [[[[0, 0], [4, 0], [4, 4]]], [[[40, 10], [49, 10], [49, 19]]]]),
             task(11, [4], "sky", [[[[0, 0], [39.9, 0]]]])]
    for name, tasks in [("test", tests), ("val", [task(13, [5], "box", [[[[1, 1], [3, 1], [3, 3]]]])])]:
        with open(folder / f"refer_{name}.json", "w", encoding="utf-8") as f:
            json.dump(tasks, f)
    return folder


def test_phrasecut_fixture_layouts_items_and_collate(tmp_path):
    """Both root layouts load; items carry task_id and no_target; collate_images carries them."""
    folder = _write_phrasecut(tmp_path / "p", mismatched=False)
    for root in (folder.parent, folder):
        ds = data.PhraseCutDataset(root, "test", image_size=32)
        assert ds.task_ids == ["11__1", "12__2_3", "11__4"] and not ds.mismatched_images
    items = [ds[i] for i in range(3)]
    assert all(set(it) == ITEM_KEYS | {"task_id"} for it in items)
    assert items[0]["orig_size"].tolist() == [30, 40] and ds.original_mask(0).sum() == 9 * 7
    batch = data.collate_images(items)
    assert batch["task_id"] == ["11__1", "12__2_3", "11__4"] and batch["no_target"].tolist() == [False] * 3
    assert batch["images"].shape == (2, 3, 32, 32) and batch["image_index"].tolist() == [0, 1, 0]


@pytest.mark.parametrize("mode", ["resize", "skip"])
def test_phrasecut_size_mismatch_warns_once_and_resizes_or_skips(tmp_path, mode):
    """An image whose file differs from the recorded size: one warning with the count; "resize" keeps
    its tasks and serves the picture at the recorded size, "skip" drops them."""
    folder = _write_phrasecut(tmp_path / "p")
    with pytest.warns(UserWarning, match=r"1 image\(s\) differ in size") as record:
        ds = data.PhraseCutDataset(folder, "test", image_size=32, size_mismatch=mode)
    assert len(record) == 1 and "12.jpg is 25x10, recorded 50x20" in str(record[0].message)
    assert ds.mismatched_images == {12: (25, 10)}
    if mode == "skip":
        assert ds.task_ids == ["11__1", "11__4"]
    else:
        assert ds.task_ids == ["11__1", "12__2_3", "11__4"]
        assert ds.load_image(12).size == (50, 20) and ds[1]["orig_size"].tolist() == [20, 50]
        assert ds.original_mask(1).shape == (20, 50)


def test_phrasecut_bad_input_is_named(tmp_path):
    """Unknown split or size_mismatch, a missing refer_<split>.json and a task whose image is not
    listed for the split are one-line errors naming the value or file."""
    folder = _write_phrasecut(tmp_path / "p", mismatched=False)
    for split in ("dev", "val_val", "val_"):
        with pytest.raises(ValueError, match="unknown split"):
            data.PhraseCutDataset(folder, split)
    with pytest.raises(ValueError, match="size_mismatch"):
        data.PhraseCutDataset(folder, "test", size_mismatch="crop")
    with pytest.raises(FileNotFoundError, match=r"refer_miniv.json.*ChenyunWu/PhraseCutDataset"):
        data.PhraseCutDataset(folder, "miniv")
    assert len(data.PhraseCutDataset(folder, "test_val", image_size=32, load_images=False)) == 4
    info = json.loads((folder / "image_data_split.json").read_text())
    info[1]["split"] = "train"
    (folder / "image_data_split.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"task 12__2_3 names image 12.*image_data_split.json"):
        data.PhraseCutDataset(folder, "test")


def test_build_dataset_knows_the_generalized_datasets(tmp_path):
    """build_dataset builds grefcoco, phrasecut and shapes-gres, and rejects a wrong split_by or no root."""
    root, _, _ = _write_gref(tmp_path / "g")
    folder = _write_phrasecut(tmp_path / "p", mismatched=False)
    assert isinstance(data.build_dataset("grefcoco", "val", root=root, image_size=32), data.GRefDataset)
    assert isinstance(data.build_dataset("grefcoco", "val", root=root, split_by="unc", image_size=32), data.GRefDataset)
    assert isinstance(data.build_dataset("phrasecut", "test", root=folder.parent, image_size=32), data.PhraseCutDataset)
    assert isinstance(data.build_dataset("shapes-gres", "val", image_size=32), data.ShapesGresDataset)
    with pytest.raises(ValueError, match="split_by 'google'"):
        data.build_dataset("grefcoco", "val", root=root, split_by="google", image_size=32)
    with pytest.raises(ValueError, match="PhraseCutDataset|ChenyunWu"):
        data.build_dataset("phrasecut", "test", image_size=32)
    assert data.DEFAULT_CONTEXT_LENGTH["grefcoco"] == data.DEFAULT_CONTEXT_LENGTH["phrasecut"] == 20


# ============================================================================================
# shapes-gres
# ============================================================================================

# Recorded from the shapes generator before shapes-gres was added (30 scenes per split; train with
# seed 3): sha256 of repr(ds.items) and of each scene's size, background seed and objects.
SHAPES_RECORDED = {
    "train": (132, "ab7b4afc113a1890a682820c161454733b5f5c89e71fecfc2cf8f163bcd48cd7",
              "d538a8fc4387629ee4f48ef81133fcf5f171e9e40b6108d6ccf35275b78d30fb"),
    "val": (131, "6bbb6ec83273c56cd9acb99c2bfe270845ac0e99cd5cfbce0ad615aed25a440a",
            "febba08cfdfbb8b59a84728cd59cc9c58e2f5dbdf000bf0cf9671fc60a3f1718"),
    "test": (149, "29864152f8c2afb361ebbf2c924eb3f957ddcb168f0845bcd4c14a647d84864c",
             "1a1602bc445d05010618c847564a6153b2fec495ea176ba86f77218c8fd6add1"),
}
SHAPES_VAL_MASKS_SHA256 = "9503c28445c8f71bcfcf6d7ccdbecef87e2f25cd55afcb6d6fd4b32cc8d0da9e"  # packbits of every mask


def _scene_signature(scenes):
    return [(s.height, s.width, s.background_seed,
             [(o.shape, o.color, o.size, round(o.cx, 6), round(o.cy, 6), round(o.r, 6), o.rgb) for o in s.objects])
            for s in scenes]


@pytest.mark.parametrize("split", list(SHAPES_RECORDED))
def test_shapes_is_bit_identical_to_the_recorded_generator(split):
    """The plain shapes dataset still yields the recorded scenes, expressions, order and masks."""
    import hashlib
    n, items_sha, scenes_sha = SHAPES_RECORDED[split]
    ds = data.ShapesDataset(split, num_images=30, seed=3 if split == "train" else 0, load_images=False)
    assert len(ds) == n
    assert hashlib.sha256(repr(ds.items).encode()).hexdigest() == items_sha
    assert hashlib.sha256(repr(_scene_signature(ds.scenes)).encode()).hexdigest() == scenes_sha
    if split == "val":
        digest = hashlib.sha256()
        for i in range(len(ds)):
            digest.update(np.packbits(ds.original_mask(i)).tobytes())
        assert digest.hexdigest() == SHAPES_VAL_MASKS_SHA256


@pytest.fixture(scope="module")
def gres_val():
    return data.ShapesGresDataset("val", num_images=40, image_size=64)


def test_shapes_gres_every_expression_picks_exactly_its_set(gres_val):
    """The checker resolves every expression to exactly its stated objects (possibly none); masks are
    their union and no_target is the empty set."""
    for index, (image_id, targets, expr) in enumerate(gres_val.items):
        scene = gres_val.scenes[image_id]
        assert data.evaluate_expression(expr, scene) == list(targets), expr
        expect = np.zeros((scene.height, scene.width), dtype=bool)
        for obj in targets:
            expect |= data.scene_mask(scene, obj)
        assert np.array_equal(gres_val.original_mask(index), expect)
        assert gres_val.no_target[index] == (not targets) == (not expect.any())


def test_shapes_gres_keeps_the_shapes_scenes_and_shares(gres_val):
    """Same scenes and single-target items as shapes; per scene at most ceil(n/2) multi- and no-target
    items; overall about a quarter of each (measured 26.5 % on the default splits)."""
    plain = data.ShapesDataset("val", num_images=40, image_size=64)
    assert _scene_signature(plain.scenes) == _scene_signature(gres_val.scenes)
    singles = [(i, t[0], e) for i, t, e in gres_val.items if len(t) == 1]
    assert singles == plain.items
    assert torch.equal(plain[0]["image"], gres_val[0]["image"])
    for image_id, scene in enumerate(gres_val.scenes):
        kinds = [len(t) for i, t, _ in gres_val.items if i == image_id]
        k = -(-kinds.count(1) // 2)
        assert sum(n > 1 for n in kinds) <= k and kinds.count(0) <= k
    n = len(gres_val)
    assert 0.2 < sum(len(t) > 1 for _, t, _ in gres_val.items) / n < 0.35
    assert 0.2 < sum(not t for _, t, _ in gres_val.items) / n < 0.35


def test_shapes_gres_items_and_collate(gres_val):
    """Items carry no_target, no-target masks are all zero, and collate_images carries the flags."""
    nt = gres_val.no_target.index(True)
    multi = next(i for i, (_, t, _) in enumerate(gres_val.items) if len(t) > 1)
    items = [gres_val[0], gres_val[multi], gres_val[nt]]
    assert all(set(it) == ITEM_KEYS for it in items)
    assert items[2]["mask"].sum() == 0 and items[1]["mask"].sum() > 0 and items[2]["no_target"]
    assert data.collate_images(items)["no_target"].tolist() == [False, False, True]


def test_checker_plural_forms_on_a_hand_built_scene():
    """Hand-built scene: "all the", "the NUMBER" (exact count or nothing), "shapes", absent NPs."""
    O = data.ShapeObject
    objs = [O("circle", "red", "small", 20, 50, 8, (0, 0, 0)), O("circle", "red", "large", 80, 50, 12, (0, 0, 0)),
            O("circle", "blue", "small", 140, 50, 8, (0, 0, 0)), O("square", "red", "small", 50, 100, 8, (0, 0, 0))]
    scene = data.Scene(150, 160, 0, objs, [])
    ev = lambda e: data.evaluate_expression(e, scene)
    assert ev("all the circles") == [0, 1, 2] and ev("the three circles") == [0, 1, 2]
    assert ev("the two red circles") == [0, 1] and ev("the two circles") == []
    assert ev("all the red shapes") == [0, 1, 3] and ev("the four shapes") == [0, 1, 2, 3]
    assert ev("all the small shapes") == [0, 2, 3] and ev("all the triangles") == []
    assert ev("the blue square") == [] and ev("the large blue circle") == []
    for bad in ("the two", "all the red", "all the purple stars"):
        with pytest.raises(ValueError):
            ev(bad)
