"""Tests for evaluate.py: the metrics, undoing the padding, the command line."""
import dataclasses
import json
import math
import types

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import data
import evaluate
import maris

# --- strategies ---


@st.composite
def mask_pairs(draw, max_side=6, max_batch=5):
    """A batch of (prediction, ground truth) bool masks of one small size."""
    b = draw(st.integers(1, max_batch))
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    bits = st.lists(st.booleans(), min_size=b * h * w, max_size=b * h * w)
    pred = torch.tensor(draw(bits)).reshape(b, h, w)
    gt = torch.tensor(draw(bits)).reshape(b, h, w)
    return pred, gt


# --- metrics ---


@given(mask_pairs())
def test_iou_in_unit_interval(pair):
    """Per-pair IoU lies in [0, 1] and I <= U."""
    inter, union = evaluate.intersection_union(*pair)
    iou = evaluate.pair_iou(inter, union)
    assert bool((inter <= union).all())
    assert bool(((iou >= 0) & (iou <= 1)).all())


@given(mask_pairs())
def test_perfect_prediction_scores_one(pair):
    """Predicting the ground truth exactly gives 1 for oIoU, mIoU and every Prec@X."""
    _, gt = pair
    m = evaluate.RISMetrics()
    m.update(*evaluate.intersection_union(gt, gt))
    out = m.compute()
    assert out["count"] == gt.shape[0]
    assert all(out[k] == 1.0 for k in out if k != "count")


@given(mask_pairs())
def test_oiou_is_sum_i_over_sum_u(pair):
    """oIoU equals ΣI/ΣU and mIoU the mean IoU, counted by hand with numpy."""
    pred, gt = pair
    p, g = pred.numpy(), gt.numpy()
    inter = [(p[b] & g[b]).sum() for b in range(len(p))]
    union = [(p[b] | g[b]).sum() for b in range(len(p))]
    ious = [i / u if u else 1.0 for i, u in zip(inter, union)]
    m = evaluate.RISMetrics()
    m.update(*evaluate.intersection_union(pred, gt))
    out = m.compute()
    expect = sum(inter) / sum(union) if sum(union) else 1.0
    assert out["oIoU"] == pytest.approx(expect, abs=1e-12)
    assert out["mIoU"] == pytest.approx(np.mean(ious), abs=1e-12)


def test_empty_gt_empty_prediction_adds_nothing():
    """An empty GT with an empty prediction scores IoU 1 and leaves ΣI and ΣU unchanged."""
    m = evaluate.RISMetrics()
    m.update(torch.tensor([3]), torch.tensor([4]))
    before = (m.total_i, m.total_u)
    iou = m.update(*evaluate.intersection_union(torch.zeros(1, 3, 3, dtype=torch.bool),
                                                torch.zeros(1, 3, 3, dtype=torch.bool)))
    assert float(iou[0]) == 1.0
    assert (m.total_i, m.total_u) == before
    assert m.compute()["oIoU"] == pytest.approx(0.75)
    assert m.compute()["mIoU"] == pytest.approx((0.75 + 1.0) / 2)


@given(mask_pairs(max_batch=8), st.randoms(use_true_random=False))
def test_metrics_order_and_batching_invariant(pair, rnd):
    """oIoU, mIoU and Prec@X do not depend on the order or batching of the pairs."""
    inter, union = evaluate.intersection_union(*pair)
    whole = evaluate.RISMetrics()
    whole.update(inter, union)
    order = list(range(len(inter)))
    rnd.shuffle(order)
    parts = evaluate.RISMetrics()
    cut = rnd.randint(0, len(order))
    for chunk in (order[:cut], order[cut:]):
        parts.update(inter[chunk], union[chunk])
    a, b = whole.compute(), parts.compute()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-12)


@given(mask_pairs(max_batch=8))
def test_prec_monotone_in_threshold(pair):
    """Prec@X never increases as X grows, and Prec@0.5 <= 1."""
    m = evaluate.RISMetrics()
    m.update(*evaluate.intersection_union(*pair))
    out = m.compute()
    precs = [out[f"Prec@{t:g}"] for t in evaluate.PREC_THRESHOLDS]
    assert all(x >= y for x, y in zip(precs, precs[1:]))
    assert 0.0 <= precs[-1] <= precs[0] <= 1.0


def test_prec_counts_equal_threshold():
    """Prec@X counts an IoU exactly equal to X as a hit (>=)."""
    m = evaluate.RISMetrics()
    m.update(torch.tensor([1, 7]), torch.tensor([2, 10]))  # IoU 0.5 and 0.7
    out = m.compute()
    assert out["Prec@0.5"] == 1.0 and out["Prec@0.7"] == 0.5 and out["Prec@0.8"] == 0.0


def test_state_roundtrip_is_exact_sum():
    """Adding two metric states (what all_reduce does) equals seeing all pairs in one process."""
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(6, 5, 5, generator=gen) > 0.5
    gt = torch.rand(6, 5, 5, generator=gen) > 0.5
    inter, union = evaluate.intersection_union(pred, gt)
    a, b, whole = evaluate.RISMetrics(), evaluate.RISMetrics(), evaluate.RISMetrics()
    a.update(inter[:2], union[:2])
    b.update(inter[2:], union[2:])
    whole.update(inter, union)
    merged = evaluate.RISMetrics()
    merged.load_state(a.state() + b.state())
    assert merged.compute() == pytest.approx(whole.compute())


# --- from logits to the scored mask: undoing the padding ---


@st.composite
def image_sizes(draw, size=32):
    """An original (Ho, Wo) whose longest side is S, so resizing to S is the identity."""
    short = draw(st.integers(1, size))
    return (size, short) if draw(st.booleans()) else (short, size)


@given(image_sizes(), st.integers(0, 2**32 - 1))
def test_original_resolution_scoring_undoes_padding_exactly(hw, seed):
    """A prediction equal to the padded GT comes back as exactly the original GT (IoU 1)."""
    import data
    size = 32
    gt = np.random.default_rng(seed).random(hw) > 0.5  # (Ho, Wo)
    padded = data.transform_mask(gt, size)  # (S, S), padding 0
    input_size = torch.tensor([data.resize_longest_side(*hw, size)])
    logits = (padded * 20 - 10)[None, None]  # (1, 1, S, S): +10 inside the GT, -10 elsewhere
    pred = evaluate.logits_to_masks(logits, input_size, torch.tensor([hw]), size=size)[0]
    assert pred.shape == hw
    assert torch.equal(pred, torch.from_numpy(gt))


@given(st.integers(3, 300), st.integers(3, 300), st.integers(0, 2**16))
def test_original_resolution_scoring_equals_sam_postprocess_masks(h, w, seed):
    """logits_to_masks gives SAM's Sam.postprocess_masks (bilinear to S, crop, bilinear to (Ho, Wo), both
    with align_corners False) thresholded at 0.5, on odd sizes and aspect ratios."""
    size = 64
    h2, w2 = data.resize_longest_side(h, w, size)
    logits = torch.randn(1, 1, size // 4, size // 4, generator=torch.Generator().manual_seed(seed)) * 4
    sam = maris.import_sam_modeling().Sam.postprocess_masks  # reads self.image_encoder.img_size only
    holder = types.SimpleNamespace(image_encoder=types.SimpleNamespace(img_size=size))
    expected = sam(holder, logits, (h2, w2), (h, w))[0, 0].sigmoid() > 0.5  # (Ho, Wo)
    pred = evaluate.logits_to_masks(logits, torch.tensor([[h2, w2]]), torch.tensor([[h, w]]), size=size)[0]
    assert pred.shape == (h, w) and 0 < int(expected.sum()) < h * w
    assert torch.equal(pred, expected)


@given(st.integers(1, 40), st.integers(1, 40))
def test_padding_never_scores(h, w):
    """Foreground logits on the padding alone give an empty mask at the original resolution."""
    import data
    size = 32
    h2, w2 = data.resize_longest_side(h, w, size)
    logits = torch.full((1, 1, size, size), 10.0)
    logits[..., :h2, :w2] = -10.0  # background on the image, foreground on the padding
    pred = evaluate.logits_to_masks(logits, torch.tensor([[h2, w2]]), torch.tensor([[h, w]]), size=size)[0]
    assert pred.shape == (h, w) and not pred.any()


def test_eval_size_scores_on_a_square():
    """--eval-size R scores a hand-computed pair: a (32, 16) image whose prediction is its left half and
    whose GT is its top half gives the left 24 columns and the top 24 rows of a 48 x 48 square, IoU 1/3."""
    size, hw = 32, (32, 16)  # the longest side is S: no resize, the right 16 columns are padding
    logits = torch.full((1, 1, size, size), -10.0)
    logits[..., :, :8] = 10.0  # foreground on the image's left half (columns 0-7)
    pred = evaluate.logits_to_masks(logits, torch.tensor([hw]), torch.tensor([hw]), size=size, eval_size=48)[0]
    expect = torch.zeros(48, 48, dtype=torch.bool)
    expect[:, :24] = True  # bilinear x3 along the width: the sign flips halfway, between columns 23 and 24
    assert torch.equal(pred, expect)
    gt = torch.zeros(hw, dtype=torch.bool)
    gt[:16] = True  # top half
    square = evaluate.gt_at_eval_size(gt, 48)
    expect_gt = torch.zeros(48, 48, dtype=torch.bool)
    expect_gt[:24] = True  # nearest: square row i reads row floor(i * 32 / 48), < 16 for i < 24
    assert torch.equal(square, expect_gt)
    inter, union = evaluate.intersection_union(pred, square)
    assert (int(inter[0]), int(union[0])) == (24 * 24, 3 * 24 * 24)
    assert float(evaluate.pair_iou(inter, union)[0]) == pytest.approx(1 / 3)


@given(st.lists(st.integers(0, 6), min_size=1, max_size=30), st.integers(1, 5), st.integers(1, 3))
def test_eval_batches_pack_whole_images(image_ids, batch, world):
    """Evaluation batches over all ranks hold every item exactly once, at most `batch` each; an image
    lies in ceil(n / batch) consecutive batches (one when it fits), and a batch is closed only when
    the next image does not fit in it."""
    per_rank = [evaluate.eval_batches(image_ids, batch, rank=r, world=world) for r in range(world)]
    ordered = [b for k in range(max(map(len, per_rank))) for r in per_rank for b in r[k:k + 1]]
    flat = [i for b in ordered for i in b]
    assert sorted(flat) == list(range(len(image_ids)))
    assert all(1 <= len(b) <= batch for b in ordered)
    counts = {i: image_ids.count(i) for i in set(image_ids)}
    holding = {i: [k for k, b in enumerate(ordered) if any(image_ids[j] == i for j in b)] for i in counts}
    for i, ks in holding.items():
        assert len(ks) == -(-counts[i] // batch) and ks == list(range(ks[0], ks[0] + len(ks)))
    for a, b in zip(ordered, ordered[1:]):
        first = image_ids[b[0]]
        assert len(a) + sum(image_ids[j] == first for j in b) > batch  # greedy: it would not have fit


class _GTDataset(torch.utils.data.Dataset):
    """Random boxes in images of several sizes; the 'image' channel 0 holds the padded GT."""

    def __init__(self, size=32, n=7):
        import data
        rng = np.random.default_rng(1)
        self.size, self.items = size, []
        for i in range(n):
            hw = (size, int(rng.integers(4, size))) if i % 2 else (int(rng.integers(4, size)), size)
            gt = np.zeros(hw, bool)
            y, x = int(rng.integers(0, hw[0] - 3)), int(rng.integers(0, hw[1] - 3))
            gt[y:y + 3, x:x + 3] = True
            self.items.append((hw, gt, i // 2))
        self.image_ids = list(range(n))  # every item its own picture (the picture carries its GT)
        self.data = data

    def __len__(self):
        return len(self.items)

    def original_mask(self, index):
        return self.items[index][1]

    def __getitem__(self, index):
        hw, gt, image_id = self.items[index]
        m = self.data.transform_mask(gt, self.size)
        # No "mask" key: evaluation reads original_mask(index), never the batch's mask (load_masks=False).
        return {"image": m[None].repeat(3, 1, 1), "ids": torch.zeros(4, dtype=torch.long),
                "word_mask": torch.ones(4, dtype=torch.bool), "orig_size": torch.tensor(hw),
                "input_size": torch.tensor(self.data.resize_longest_side(*hw, self.size)), "ref_id": index,
                "sent_id": index, "image_id": index, "sentence": "x", "index": index}


class _OracleModel(torch.nn.Module):
    """Returns the GT carried in the image as logits (B, 1, S, S), honouring image_index."""

    def __init__(self, size):
        super().__init__()
        self.cfg = type("Cfg", (), {"image_size": size})()

    def forward(self, images, ids, word_mask, *, image_index=None):
        logits = images[:, :1] * 20 - 10  # (B_img, 1, S, S)
        return logits if image_index is None else logits[image_index]


def test_evaluate_model_scores_a_perfect_model_one():
    """evaluate_model gives oIoU = mIoU = 1 for a model whose logits are the padded GT, from items
    without a "mask" (it scores against original_mask)."""
    ds = _GTDataset()
    out = evaluate.evaluate_model(_OracleModel(ds.size), ds, batch_size=3, progress=False)
    assert out["count"] == len(ds)
    assert out["oIoU"] == 1.0 and out["mIoU"] == 1.0 and out["Prec@0.9"] == 1.0


class _SharedImages(_GTDataset):
    """_GTDataset whose items are sentences of a few pictures, interleaved in item order (0, 1, 2, 0, ...);
    a picture is filled with its image id and each sentence's ids name its picture."""

    def __init__(self, sentences_per_image):
        order = [i for k in range(max(sentences_per_image)) for i, n in enumerate(sentences_per_image) if k < n]
        super().__init__(n=len(order))
        self.image_ids = order

    def __getitem__(self, index):
        item = super().__getitem__(index)
        image_id = self.image_ids[index]
        return {**item, "image": torch.full_like(item["image"], float(image_id)), "image_id": image_id,
                "ids": torch.full((4,), image_id, dtype=torch.long)}


class _CountingModel(_OracleModel):
    """Records the image id of every encoded picture and checks each sentence reads its own picture."""

    def __init__(self, size):
        super().__init__(size)
        self.rows = []

    def forward(self, images, ids, word_mask, *, image_index=None):
        self.rows += images[:, 0, 0, 0].long().tolist()  # (B_img,) one entry per encoded picture
        assert torch.equal(images[image_index, 0, 0, 0].long(), ids[:, 0])
        return super().forward(images, ids, word_mask, image_index=image_index)


def test_evaluate_model_limit_scores_the_first_items():
    """limit=k scores items 0..k-1 only: k pairs, and no picture of a later item is encoded."""
    ds = _SharedImages([1, 1, 3])  # item order: pictures 0, 1, 2, 2, 2
    model = _CountingModel(ds.size)
    out = evaluate.evaluate_model(model, ds, batch_size=8, progress=False, limit=2)
    assert out["count"] == 2 and sorted(model.rows) == [0, 1]
    assert evaluate.evaluate_model(_CountingModel(ds.size), ds, progress=False, limit=0)["count"] == 5


@pytest.mark.parametrize("sentences", [[7, 7, 7], [7, 3, 5, 1, 8, 2], [10, 3, 17]])
def test_evaluate_model_encodes_each_image_once_per_split(sentences):
    """Whole images are packed into batches: with batch 8, an image of n sentences is encoded
    ceil(n / 8) times (once when it fits a batch), however the dataset interleaves them."""
    ds = _SharedImages(sentences)
    model = _CountingModel(ds.size)
    out = evaluate.evaluate_model(model, ds, batch_size=8, progress=False)
    assert out["count"] == len(ds) == sum(sentences)
    assert sorted(model.rows) == sorted(i for i, n in enumerate(sentences) for _ in range(-(-n // 8)))


# --- overlays and the command line ---


@pytest.mark.parametrize("width", [40, 500])
def test_overlay_draws_mask_and_caption(width):
    """The overlay tints only the mask pixels, adds a caption band, and enlarges small pictures by a whole factor."""
    image = Image.new("RGB", (width, 30), (0, 0, 255))
    mask = np.zeros((30, width), bool)
    mask[5:10, 5:10] = True
    out = np.asarray(evaluate.draw_overlay(image, mask, "the thing", gt=mask, iou=1.0))
    k = -(-evaluate.MIN_OVERLAY_WIDTH // width)  # 10 for 40 px, 1 for 500 px
    assert out.shape[1] == width * k and out.shape[0] > 30 * k
    assert tuple(out[20 * k, 30 * k]) == (0, 0, 255)  # untouched background
    assert tuple(out[7 * k, 7 * k]) != (0, 0, 255)  # tinted mask


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A 1-step tiny-preset checkpoint trained on shapes at S = 64."""
    import train
    out = tmp_path_factory.mktemp("ckpt")
    train.main(["--max-steps", "1", "--image-size", "64", "--batch-size", "2", "--val-split", "",
                "--train-scenes", "4", "--no-progress", "--out-dir", str(out)])
    return out / "last.pt"


def test_evaluate_cli_end_to_end(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """evaluate.py --ckpt rebuilds the model, prints the table and protocol, writes JSON and overlays;
    it builds the split without padded masks (it scores against original_mask)."""
    import data
    built, real = [], data.build_dataset
    monkeypatch.setattr(data, "build_dataset", lambda name, split, **kw: built.append(
        (split, kw.get("load_masks", True))) or real(name, split, **kw))
    results = evaluate.main(["--ckpt", str(tiny_checkpoint), "--split", "val", "--batch-size", "32",
                             "--vis", "2", "--out-dir", str(tmp_path), "--no-progress", "--eval-size", "48"])
    printed = capsys.readouterr().out
    assert "oIoU" in printed and "protocol" in printed and "48x48" in printed
    report = json.loads((tmp_path / "eval_shapes_sq48.json").read_text())
    assert report["results"]["val"]["count"] == results["val"]["count"] > 0
    assert report["protocol"]["threshold"] == "sigmoid > 0.5"
    assert len(list((tmp_path / "vis" / "val").glob("*.png"))) == 2
    assert built == [("val", False)]


def test_help_lists_every_option(capsys):
    """`evaluate.py --help` names every EvalOptions field as a flag, each with its default (or "required")."""
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    fields = dataclasses.fields(evaluate.EvalOptions)
    for f in fields:
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert text.count("(default:") == len(fields) - 1 and "(required)" in text


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    """--ckpt naming no file, or a file that is not a train.py checkpoint, exits with a one-line error."""
    with pytest.raises(SystemExit, match="absent.pt does not exist"):
        evaluate.main(["--ckpt", str(tmp_path / "absent.pt")])
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match=r"other.pt is not a train.py checkpoint \(missing keys \['config', "):
        evaluate.main(["--ckpt", str(tmp_path / "other.pt")])


def test_split_without_pairs_is_null_in_json_and_dash_in_table(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """A split with no pairs (NaN metrics) is written as valid JSON with null metrics and printed as "-"."""
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *args, **kwargs: evaluate.RISMetrics().compute())
    results = evaluate.main(["--ckpt", str(tiny_checkpoint), "--split", "val", "--out-dir", str(tmp_path),
                             "--no-progress"])
    printed = capsys.readouterr().out

    def no_nan(token):
        raise AssertionError(f"invalid JSON token {token}")

    report = json.loads((tmp_path / "eval_shapes.json").read_text(), parse_constant=no_nan)
    assert report["results"]["val"]["count"] == 0 and report["results"]["val"]["oIoU"] is None
    assert results["val"]["mIoU"] is None and results["val"]["Prec@0.9"] is None
    row = next(line for line in printed.splitlines() if line.startswith("val "))
    assert row.split() == ["val", *["-"] * (2 + len(evaluate.PREC_THRESHOLDS)), "0"]


def test_train_split_is_the_runs_training_scenes(tiny_checkpoint, tmp_path, capsys):
    """--split train scores the shapes scenes the run trained on (its --train-scenes), and --limit N the first N
    pairs; the protocol says so."""
    import data
    results = evaluate.main(["--ckpt", str(tiny_checkpoint), "--split", "train", "--out-dir", str(tmp_path),
                             "--no-progress"])
    assert results["train"]["count"] == len(data.ShapesDataset("train", num_images=4, load_images=False))
    results = evaluate.main(["--ckpt", str(tiny_checkpoint), "--split", "train", "--split", "val", "--limit", "3",
                             "--out-dir", str(tmp_path), "--no-progress"])
    assert results["train"]["count"] == results["val"]["count"] == 3
    report = json.loads((tmp_path / "eval_shapes.json").read_text())
    assert report["protocol"]["pairs"] == "the first 3 sentences of each split (--limit)"


def test_single_image_mode_writes_overlay_and_mask(tiny_checkpoint, tmp_path):
    """--image/--text/--out writes an overlay PNG and a mask PNG at the image's resolution."""
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 70, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "overlay.png"
    evaluate.main(["--ckpt", str(tiny_checkpoint), "--image", str(photo), "--text", "the red circle",
                   "--out", str(out)])
    with Image.open(tmp_path / "overlay_mask.png") as mask, Image.open(out) as overlay:
        assert mask.size == (70, 45) and mask.mode == "L"
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
        assert overlay.size[0] == 70 * -(-evaluate.MIN_OVERLAY_WIDTH // 70)  # enlarged to stay readable


def test_evaluate_cli_feature_cache(tiny_checkpoint, tmp_path, monkeypatch):
    """evaluate.py --feature-cache fills the cache once per image, hashes each frozen encoder's weights once per
    run (not once per split: the encoder check and the cache share SAM's), and scores like the pixel path
    (fp16 features: equal pair count, oIoU within rounding)."""
    common = ["--ckpt", str(tiny_checkpoint), "--split", "val", "--batch-size", "16", "--no-progress",
              "--out-dir", str(tmp_path)]
    plain = evaluate.main(common)["val"]
    hashes, real_hash = [], data.state_dict_sha256
    monkeypatch.setattr(data, "state_dict_sha256", lambda module: hashes.append(type(module).__name__)
                        or real_hash(module))
    cached = evaluate.main([*common, "--split", "test", "--feature-cache", str(tmp_path / "cache")])["val"]
    assert sorted(hashes) == ["CLIPTextEncoder", "ImageEncoderViT"]
    again = evaluate.main([*common, "--feature-cache", str(tmp_path / "cache")])["val"]
    images = set(data.ShapesDataset("val", image_size=64).image_ids)
    assert len(list((tmp_path / "cache" / "shapes-val-seed0").glob("*.npy"))) == len(images)
    assert plain["count"] == cached["count"] == again["count"]
    assert cached == again
    assert cached["oIoU"] == pytest.approx(plain["oIoU"], abs=0.02)


def test_evaluate_under_torchrun_matches_one_process(tiny_checkpoint, tmp_path):
    """evaluate.py under torchrun (2 gloo processes) scores every pair once and reports the single-process numbers."""
    import os
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(evaluate.__file__).resolve().parent
    common = ["--ckpt", str(tiny_checkpoint), "--split", "val", "--batch-size", "16", "--no-progress"]
    one = evaluate.main([*common, "--out-dir", str(tmp_path / "one")])["val"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "evaluate.py", *common, "--out-dir", str(tmp_path / "ddp")],
                          cwd=root, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("protocol:") == 1  # rank 0 alone prints the table
    ddp = json.loads((tmp_path / "ddp" / "eval_shapes.json").read_text())["results"]["val"]
    assert ddp["count"] == one["count"]
    for key, value in one.items():  # the report holds the metrics in percent
        assert ddp[key] == pytest.approx(value if key == "count" else 100 * value, abs=1e-4), key


# --- overlay pictures: colours, legend, marks, captions ---
# A 200 x 150 grey picture is enlarged 2x to 400 x 300, where the line width is 2 px and each dark edge 1 px.

GREY = (128, 128, 128)


def _boxes(h=150, w=200):
    pred = np.zeros((h, w), bool)
    pred[40:100, 50:130] = True
    gt = np.zeros((h, w), bool)
    gt[50:110, 60:140] = True
    return pred, gt


def _band(out, picture_height):
    return out[picture_height:]


def _has(region, color, at_least=4):
    return int((region == np.asarray(color, np.uint8)).all(axis=-1).sum()) >= at_least


def test_overlay_lines_fill_and_edges_at_known_places():
    """Prediction: from its boundary inwards a dark edge, a 2 px PRED_COLOR line, a dark edge, the tinted fill;
    ground truth: from its boundary outwards a dark edge, a 2 px GT_COLOR line, a dark edge; elsewhere the
    picture is untouched."""
    pred, gt = _boxes()
    out = np.asarray(evaluate.draw_overlay(Image.new("RGB", (200, 150), GREY), pred, "x", gt=gt))  # 2x: 400 x 300
    row = 2 * 70  # crosses the prediction's left side at x = 100 and the GT's left side at x = 120
    assert tuple(out[row, 100]) == tuple(out[row, 103]) == evaluate.EDGE_COLOR
    assert tuple(out[row, 101]) == tuple(out[row, 102]) == evaluate.PRED_COLOR
    fill = [round(0.55 * 128 + 0.45 * c) for c in evaluate.PRED_COLOR]
    assert np.abs(out[row, 110].astype(int) - fill).max() <= 1  # translucent fill inside
    assert tuple(out[row, 119]) == tuple(out[row, 116]) == evaluate.EDGE_COLOR
    assert tuple(out[row, 118]) == tuple(out[row, 117]) == evaluate.GT_COLOR
    assert tuple(out[row, 120]) != evaluate.EDGE_COLOR  # the object itself is not covered by the GT's line
    assert tuple(out[row, 99]) == tuple(out[10, 10]) == GREY  # outside both masks: untouched


@pytest.mark.parametrize("background", [(220, 40, 40), (255, 255, 255), (0, 0, 0), (255, 220, 0), (0, 190, 255)])
def test_overlay_lines_stand_out_on_any_background(background):
    """On a red, white, black, yellow or azure picture each line has a strongly different colour or dark edges
    on both sides that do."""
    pred, gt = _boxes()
    out = np.asarray(evaluate.draw_overlay(Image.new("RGB", (200, 150), background), pred, "x", gt=gt)).astype(int)
    bg = np.asarray(background)
    row = 2 * 70
    for line, edges in ((101, (100, 103)), (117, (116, 119))):  # prediction's line, GT's line: x and edges' x
        edge_contrast = min(np.abs(out[row, x] - bg).sum() for x in edges)
        contrast = max(np.abs(out[row, line] - bg).sum(), edge_contrast)
        assert contrast >= 250, (background, line, out[row, line], out[row, edges[0]])
    if background == (220, 40, 40):  # the translucent fill itself parts from a red object (a magenta tint: 131)
        assert np.abs(out[row, 110] - bg).sum() >= 200


def _line_thickness(width, h=300):
    gt = np.zeros((h, width), bool)
    gt[h // 4:3 * h // 4, width // 4:3 * width // 4] = True
    out = np.asarray(evaluate.draw_overlay(Image.new("RGB", (width, h), GREY), gt, "x", gt=gt))
    return int((out[h // 2, :width // 4] == np.asarray(evaluate.GT_COLOR, np.uint8)).all(axis=-1).sum())


def test_overlay_line_width_grows_with_the_picture():
    """The outline is a few px on a small picture and proportionally wider on a phone-sized one (4000 px wide)."""
    small, large = _line_thickness(400), _line_thickness(4000)
    assert 1 <= small <= 3 and large >= 5 * small


def test_overlay_legend_shows_both_swatches():
    """The band under the picture holds a prediction swatch and a ground-truth swatch in the drawing colours;
    without a ground truth only the prediction's."""
    pred, gt = _boxes()
    out = np.asarray(evaluate.draw_overlay(Image.new("RGB", (200, 150), GREY), pred, "x", gt=gt, iou=0.5))
    band = _band(out, 300)
    assert band.shape[0] > 0 and _has(band, evaluate.PRED_COLOR, 16) and _has(band, evaluate.GT_COLOR, 16)
    alone = _band(np.asarray(evaluate.draw_overlay(Image.new("RGB", (200, 150), GREY), pred, "x")), 300)
    assert _has(alone, evaluate.PRED_COLOR, 16) and not _has(alone, evaluate.GT_COLOR, 1)


def test_empty_prediction_shows_the_mark():
    """An empty prediction gets the "no mask predicted" mark at the picture's top left; a non-empty one does not."""
    pred, gt = _boxes()
    image = Image.new("RGB", (200, 150), GREY)
    empty = np.asarray(evaluate.draw_overlay(image, np.zeros_like(pred), "x", gt=gt))
    full = np.asarray(evaluate.draw_overlay(image, pred, "x", gt=gt))
    assert tuple(empty[4, 4]) == evaluate.EMPTY_MARK_COLOR and _has(empty[:40, :200], (255, 255, 255), 10)
    assert tuple(empty[0, 0]) == evaluate.EDGE_COLOR  # its dark edge, for red pictures
    assert tuple(full[4, 4]) == GREY


NON_ASCII = "café crème, Ελληνικά, кириллица, 日本語, 🐶"


@pytest.mark.parametrize("font", ["found", "pillow-default", "old-bitmap"])
def test_non_ascii_caption_draws(monkeypatch, font):
    """A non-ASCII caption draws (text pixels in the band) with DejaVu, Pillow's default font, or an old
    Pillow's bitmap font (no crash)."""
    if font != "found":
        monkeypatch.setattr(evaluate, "_font_path", lambda: None)
    if font == "old-bitmap":  # Pillow < 10.1: load_default takes no size and gives a Latin-1 bitmap font
        bitmap = evaluate.ImageFont.load_default_imagefont()

        def no_size(size=None):
            if size is not None:
                raise TypeError("load_default() got an unexpected keyword argument 'size'")
            return bitmap
        monkeypatch.setattr(evaluate.ImageFont, "load_default", no_size)
    out = np.asarray(evaluate.draw_overlay(Image.new("RGB", (200, 150), GREY), _boxes()[0], NON_ASCII))
    band = _band(out, 300)
    assert (band.astype(int).sum(axis=-1) > 3 * 150).sum() > 50  # bright text pixels on the dark band


def test_font_is_dejavu_when_the_system_has_it():
    """The overlay font is DejaVu Sans where the system has it (as this machine does), else a fallback."""
    path = evaluate._font_path()
    if path is None:
        pytest.skip("no DejaVu Sans (or fontconfig substitute) on this machine")
    assert isinstance(evaluate._font(20), evaluate.ImageFont.FreeTypeFont)


@pytest.mark.parametrize("size", [(640, 480), (128, 128), (400, 120)])
def test_300_word_caption_keeps_the_band_bounded(size):
    """A 300-word caption (shown whole: no context length given) never makes the band taller than the picture."""
    w, h = size
    caption = " ".join(["the tall man in the blue coat"] * 43)  # 301 words
    out = evaluate.draw_overlay(Image.new("RGB", size, GREY), np.zeros((h, w), bool), caption, iou=0.5)
    k = -(-evaluate.MIN_OVERLAY_WIDTH // w)
    assert out.height - h * k <= h * k


def test_caption_shows_what_the_model_read():
    """A caption longer than L shows the model's kept tokens, an ellipsis and how many tokens were read; a short one
    shows itself."""
    caption = " ".join(["dog"] * 300)
    text, note = evaluate.overlay_caption(caption, 20)
    assert text == '"' + " ".join(["dog"] * 18) + ' …"' and note.startswith("the model read 18 of 300 tokens")
    assert evaluate.overlay_caption("the dog", 20) == ('"the dog"', None)
    assert evaluate.overlay_caption(caption) == (f'"{caption}"', None)  # no L: shown as given


def test_wrap_fits_the_width_and_marks_the_cut():
    """Wrapped lines fit the width; past the line limit the last line ends in an ellipsis; long words break."""
    font = evaluate._font(14)
    lines = evaluate._wrap(" ".join(["word"] * 300), font, 200, 3)
    assert len(lines) == 3 and lines[-1].endswith("…")
    assert all(font.getlength(line) <= 200 for line in lines)
    assert evaluate._wrap("a b", font, 200, 3) == ["a b"]
    broken = evaluate._wrap("x" * 200, font, 100, 10)
    assert len(broken) > 1 and all(font.getlength(line) <= 100 for line in broken)


# --- which pairs get overlays (--vis-select) ---

AREAS = [40, 8, 64, 16, 32, 4, 48, 56, 24, 12]  # GT pixels inside a 64-pixel prediction: IoU = area / 64


class _KnownIoUDataset(torch.utils.data.Dataset):
    """Pair i: a 16 x 16 picture of its own whose channel 0 holds the prediction (an 8 x 8 square);
    its GT is the first AREAS[i] pixels of that square, so its IoU is AREAS[i] / 64."""

    size = 16
    context_length = 4

    def __init__(self):
        self.image_ids = list(range(len(AREAS)))
        self.sentences = [f"pair {i} café" for i in self.image_ids]
        self.pred = np.zeros((16, 16), bool)
        self.pred[:8, :8] = True

    def __len__(self):
        return len(AREAS)

    def original_mask(self, index):
        gt = np.zeros((16, 16), bool)
        gt[:8, :8] = (np.arange(64) < AREAS[index]).reshape(8, 8)
        return gt

    def load_image(self, image_id):
        return Image.new("RGB", (16, 16), GREY)

    def __getitem__(self, index):
        image = torch.from_numpy(self.pred).float()[None].repeat(3, 1, 1)
        return {"image": image, "ids": torch.zeros(4, dtype=torch.long), "word_mask": torch.ones(4, dtype=torch.bool),
                "orig_size": torch.tensor([16, 16]), "input_size": torch.tensor([16, 16]), "ref_id": index,
                "sent_id": index, "image_id": index, "sentence": self.sentences[index], "index": index}


class _CountedOracle(_OracleModel):
    def __init__(self, size):
        super().__init__(size)
        self.calls = 0

    def forward(self, images, ids, word_mask, *, image_index=None):
        self.calls += 1
        return super().forward(images, ids, word_mask, image_index=image_index)


def _vis_names(tmp_path, select, n=3, seed=0):
    ds = _KnownIoUDataset()
    model = _CountedOracle(ds.size)
    evaluate.evaluate_model(model, ds, batch_size=4, progress=False, vis=n, vis_dir=tmp_path, vis_select=select,
                            vis_seed=seed)
    assert model.calls == len(evaluate.eval_batches(ds.image_ids, 4))  # one pass over the split, also for worst
    return sorted(p.name for p in tmp_path.glob("*.png"))


def test_vis_with_limit_draws_from_the_scored_pairs(tmp_path):
    """With limit=k, --vis random draws its n pictures among the k scored pairs (ids 0 .. k-1), not the split."""
    ds = _KnownIoUDataset()
    evaluate.evaluate_model(_OracleModel(ds.size), ds, batch_size=4, progress=False, vis=3, vis_dir=tmp_path,
                            vis_select="random", limit=4)
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(names) == 3 and all(int(name.split("_img")[1].split("_")[0]) < 4 for name in names), names


def test_vis_select_worst_draws_the_lowest_ious_in_order(tmp_path, capsys):
    """worst draws the n lowest-IoU pairs, numbered from the worst, named by IoU, image and sentence, and says where."""
    names = _vis_names(tmp_path, "worst")
    assert names == ["worst1_iou006_img5_pair-5-cafe.png", "worst2_iou012_img1_pair-1-cafe.png",
                     "worst3_iou019_img9_pair-9-cafe.png"]  # areas 4, 8, 12 of 64
    assert f"3 overlay pictures (worst) of 10 pairs in {tmp_path}" in capsys.readouterr().out


def test_vis_select_first_draws_the_first_pairs(tmp_path):
    """first draws pairs 0..n-1."""
    assert [n.split("_")[2] for n in _vis_names(tmp_path, "first")] == ["img0", "img1", "img2"]


def test_vis_select_random_is_seeded(tmp_path):
    """random draws n distinct pairs, the same for one seed and others for another seed."""
    one = _vis_names(tmp_path / "a", "random")
    again = _vis_names(tmp_path / "b", "random")
    other = [_vis_names(tmp_path / f"s{seed}", "random", seed=seed) for seed in (1, 2, 3)]
    images = [name.split("_")[2] for name in one]
    assert one == again and len(set(images)) == 3 and any(o != one for o in other)


def test_vis_rerun_replaces_the_earlier_pictures(tmp_path):
    """A second run of one selection into the same folder leaves only its own pictures (others' files stay)."""
    (tmp_path / "notes.png").write_bytes(b"mine")
    _vis_names(tmp_path, "worst", n=5)
    names = _vis_names(tmp_path, "worst", n=2)
    assert names == ["notes.png", "worst1_iou006_img5_pair-5-cafe.png", "worst2_iou012_img1_pair-1-cafe.png"]


def test_worst_selection_keeps_only_n_predictions():
    """The worst selection holds at most n predictions at any time, whatever order the pairs come in."""
    sel = evaluate.OverlaySelection("worst", 3, len(AREAS))
    for index in np.random.default_rng(0).permutation(len(AREAS)):
        iou = AREAS[index] / 64
        if sel.wants(int(index), iou):
            sel.keep(int(index), iou, np.zeros((1, 1), bool), int(index), "x", None)
        assert len(sel.kept) <= 3
    assert [index for _, index in sel.chosen()] == [5, 1, 9]


def _worst_of(indices):
    sel = evaluate.OverlaySelection("worst", 3, len(AREAS))
    for index in indices:
        if sel.wants(index, AREAS[index] / 64):
            sel.keep(index, AREAS[index] / 64, np.zeros((1, 1), bool), index, "x", None)
    return sel


def test_worst_selection_under_ddp_draws_the_split_worst_once(monkeypatch):
    """Under 2 processes (rank 0 scored pairs 0..4, rank 1 pairs 5..9), all_gather_object pools the candidates
    and the split's 3 worst pairs are each drawn by exactly the process that holds them, numbered 1..3."""
    ranks = [_worst_of(range(0, 5)), _worst_of(range(5, 10))]
    candidates = [[(entry[0], index) for index, entry in sel.kept.items()] for sel in ranks]

    def all_gather_object(out, obj):  # torch.distributed's contract: out[r] = rank r's object
        assert obj in candidates
        out[:] = candidates

    monkeypatch.setattr(evaluate.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(evaluate.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(evaluate.dist, "all_gather_object", all_gather_object)
    drawn = [sel.chosen() for sel in ranks]
    assert drawn == [[(2, 1)], [(1, 5), (3, 9)]]  # IoUs 4/64 (pair 5), 8/64 (pair 1), 12/64 (pair 9)


def test_single_image_mode_turns_exif_tagged_photos_upright(tiny_checkpoint, tmp_path):
    """--image with a JPEG stored 70 x 45 and tagged Orientation 6 segments the upright 45 x 70 photo."""
    photo = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 70, 3), dtype=np.uint8)).save(
        photo, exif=exif.tobytes())
    evaluate.main(["--ckpt", str(tiny_checkpoint), "--image", str(photo), "--text", "the red circle",
                   "--out", str(tmp_path / "overlay.png")])
    with Image.open(tmp_path / "overlay_mask.png") as mask:
        assert mask.size == (45, 70)


def test_evaluate_cli_vis_select_worst(tiny_checkpoint, tmp_path, capsys):
    """evaluate.py --vis 2 --vis-select worst writes pictures worst1, worst2 (IoU ascending) and prints where."""
    evaluate.main(["--ckpt", str(tiny_checkpoint), "--split", "val", "--batch-size", "32", "--vis", "2",
                   "--vis-select", "worst", "--out-dir", str(tmp_path), "--no-progress"])
    names = sorted(p.name for p in (tmp_path / "vis" / "val").glob("*.png"))
    assert [n[:6] for n in names] == ["worst1", "worst2"]
    assert int(names[0].split("_iou")[1][:3]) <= int(names[1].split("_iou")[1][:3])
    assert f"in {tmp_path / 'vis' / 'val'}" in capsys.readouterr().out

# --- gRefCOCO metrics (ReLA's refer_evaluation.py), PhraseCut metrics, the no-target decision ---


def _gres_one(i, u, gt_nt, pred_nt):
    """GRESMetrics after one sentence."""
    m = evaluate.GRESMetrics()
    score = m.update(torch.tensor([i]), torch.tensor([u]), torch.tensor([gt_nt]), torch.tensor([pred_nt]))
    return m, float(score[0])


@pytest.mark.parametrize("i,u,gt_nt,pred_nt,score,sum_i,sum_u", [
    (0, 5, True, True, 1.0, 0, 0),  # no target, predicted no target (head rule, mask not empty): nothing added
    (0, 0, True, False, 0.0, 0, 0),  # no target, predicted target with an empty mask: still 0
    (0, 7, True, False, 0.0, 0, 7),  # no target, predicted target: its U is added
    (3, 10, False, True, 0.0, 0, 10),  # target predicted no target: I counts 0, U added
    (3, 4, False, False, 0.75, 3, 4),  # target predicted target: I/U
    (0, 0, False, False, 0.0, 0, 0),  # target with U = 0 (empty GT and prediction): 0
])
def test_gres_metrics_every_row_of_the_table(i, u, gt_nt, pred_nt, score, sum_i, sum_u):
    """Each row of ReLA's per-sentence table: the score and what is added to ΣI and ΣU."""
    m, got = _gres_one(i, u, gt_nt, pred_nt)
    assert got == score and (m.total_i, m.total_u) == (sum_i, sum_u)


def test_gres_metrics_on_a_hand_built_split():
    """cIoU, gIoU, N-acc, T-acc and Pr@X of a hand-built split of six sentences."""
    m = evaluate.GRESMetrics()
    #              NT+NT  NT+T  T+NT  T(0.9)  T(0.75)  T(0.5)
    inter = torch.tensor([0, 0, 4, 9, 3, 1])
    union = torch.tensor([2, 6, 8, 10, 4, 2])
    gt_nt = torch.tensor([True, True, False, False, False, False])
    pred_nt = torch.tensor([True, False, True, False, False, False])
    m.update(inter, union, gt_nt, pred_nt)
    out = m.compute()
    assert out["cIoU"] == pytest.approx((9 + 3 + 1) / (6 + 8 + 10 + 4 + 2))
    assert out["gIoU"] == pytest.approx((1 + 0 + 0 + 0.9 + 0.75 + 0.5) / 6)
    assert (out["N-acc"], out["T-acc"]) == (0.5, 0.75)
    assert (out["Pr@0.7"], out["Pr@0.8"], out["Pr@0.9"]) == (0.5, 0.25, 0.25)  # 0.9 >= 0.9 counts
    assert (out["count"], out["count_no_target"], out["count_target"]) == (6, 2, 4)


def test_gres_metrics_undefined_values_are_nan_not_zero():
    """No sentence, no no-target sentence, no target sentence, ΣU = 0: undefined metrics are NaN."""
    empty = evaluate.GRESMetrics().compute()
    assert empty["count"] == 0 and all(math.isnan(empty[k]) for k in ("cIoU", "gIoU", "N-acc", "T-acc", "Pr@0.7"))
    only_targets, _ = _gres_one(3, 4, False, False)
    out = only_targets.compute()
    assert math.isnan(out["N-acc"]) and out["T-acc"] == 1.0 and out["cIoU"] == 0.75
    only_nt, _ = _gres_one(0, 0, True, True)
    out = only_nt.compute()
    assert math.isnan(out["cIoU"]) and math.isnan(out["T-acc"]) and math.isnan(out["Pr@0.9"])
    assert out["gIoU"] == 1.0 and out["N-acc"] == 1.0
    assert evaluate.without_nan(out)["cIoU"] is None


def _rela_restatement(inter, union, gt_nt, pred_nt):
    """ReLA's per-sample loop restated plainly (after the 2023-08-26 fix)."""
    acc_i = acc_u = acc_iou = 0.0
    tp = tn = fp = fn = 0
    pr = {0.7: 0, 0.8: 0, 0.9: 0}
    for i, u, g, p in zip(inter, union, gt_nt, pred_nt):
        if g:
            if p:
                tp += 1
                acc_iou += 1
            else:
                fn += 1
                acc_u += u
        else:
            if p:
                fp += 1
                i = 0
            else:
                tn += 1
            iou = 0.0 if u == 0 else i / u
            acc_iou += iou
            acc_i += i
            acc_u += u
            for t in pr:
                pr[t] += iou >= t
    n_t = tn + fp
    return {"cIoU": acc_i / acc_u if acc_u else float("nan"), "gIoU": acc_iou / len(inter),
            "N-acc": tp / (tp + fn) if tp + fn else float("nan"), "T-acc": tn / n_t if n_t else float("nan"),
            **{f"Pr@{t:g}": pr[t] / n_t if n_t else float("nan") for t in pr}}


@given(mask_pairs(max_batch=8), st.lists(st.booleans(), min_size=8, max_size=8), st.integers(0, 2**16))
def test_gres_metrics_match_a_restatement_of_relas_loop(pair, pred_flags, seed):
    """On random masks and decisions (empty GT = no target), GRESMetrics equals ReLA's loop restated."""
    pred, gt = pair
    gt_nt = ~gt.flatten(1).any(1)
    pred_nt = torch.tensor(pred_flags[:len(gt)])
    inter, union = evaluate.intersection_union(pred, gt)
    m = evaluate.GRESMetrics()
    m.update(inter, union, gt_nt, pred_nt)
    got, expect = m.compute(), _rela_restatement(inter.tolist(), union.tolist(), gt_nt.tolist(), pred_nt.tolist())
    for key, value in expect.items():
        assert (math.isnan(got[key]) and math.isnan(value)) or got[key] == pytest.approx(value, abs=1e-12), key


def test_gres_state_sums_like_one_process():
    """Two metrics' states added (what all_reduce does) equal one metric that saw every sentence."""
    gen = torch.Generator().manual_seed(3)
    inter, union = torch.randint(0, 5, (9,), generator=gen), torch.randint(5, 9, (9,), generator=gen)
    gt_nt, pred_nt = torch.rand(9, generator=gen) > 0.6, torch.rand(9, generator=gen) > 0.5
    a, b, whole = evaluate.GRESMetrics(), evaluate.GRESMetrics(), evaluate.GRESMetrics()
    a.update(inter[:4], union[:4], gt_nt[:4], pred_nt[:4])
    b.update(inter[4:], union[4:], gt_nt[4:], pred_nt[4:])
    whole.update(inter, union, gt_nt, pred_nt)
    merged = evaluate.GRESMetrics()
    merged.load_state(a.state() + b.state())
    assert merged.compute() == pytest.approx(whole.compute(), nan_ok=True)


def test_gres_update_rejects_mismatched_lengths():
    """inter, union and the two flag vectors must have one entry per sentence."""
    with pytest.raises(ValueError, match="B entries each"):
        evaluate.GRESMetrics().update(torch.tensor([1, 2]), torch.tensor([2, 2]), torch.tensor([False]),
                                      torch.tensor([False, True]))


def test_phrasecut_metrics_official_rules_by_hand():
    """Empty prediction on empty GT scores 0; Acc@X needs IoU strictly above X; cumIoU = ΣI/ΣU."""
    pred = torch.zeros(3, 2, 4, dtype=torch.bool)
    gt = torch.zeros(3, 2, 4, dtype=torch.bool)
    gt[1, 0, :2] = pred[1, 0, :1] = True  # I = 1, U = 2: IoU exactly 0.5
    gt[2, :, :3] = pred[2, :, :3] = True  # IoU 1
    m = evaluate.PhraseCutMetrics()
    iou = m.update(pred, gt)
    assert iou.tolist() == [0.0, 0.5, 1.0]
    out = m.compute()
    assert out["mIoU"] == pytest.approx(0.5) and out["cumIoU"] == pytest.approx(7 / 8)
    assert out["Acc@0.5"] == pytest.approx(1 / 3) and out["Acc@0.9"] == pytest.approx(1 / 3) and out["count"] == 3
    ris = evaluate.RISMetrics()
    ris.update(*evaluate.intersection_union(pred[:1], gt[:1]))
    assert ris.compute()["mIoU"] == 1.0  # the RefCOCO convention differs on purpose


@given(mask_pairs(max_batch=8))
def test_phrasecut_metrics_match_the_official_formulas(pair):
    """Per task IoU = 0 if I == 0 else I/U, mean / cumulative IoU and strict accuracies, restated with numpy."""
    pred, gt = pair
    p, g = pred.numpy(), gt.numpy()
    i = np.array([(p[b] & g[b]).sum() for b in range(len(p))])
    u = np.array([((p[b].astype(int) + g[b]) > 0).sum() for b in range(len(p))])
    iou = np.where(i == 0, 0.0, i / np.maximum(u, 1))
    m = evaluate.PhraseCutMetrics()
    m.update(pred, gt)
    out = m.compute()
    assert out["mIoU"] == pytest.approx(iou.mean(), abs=1e-12)
    assert (math.isnan(out["cumIoU"]) and u.sum() == 0) or out["cumIoU"] == pytest.approx(i.sum() / u.sum())
    for t in evaluate.PHRASECUT_THRESHOLDS:
        assert out[f"Acc@{t:g}"] == pytest.approx(np.mean(iou > t), abs=1e-12)


def test_phrasecut_metrics_refuse_another_size_and_report_nan_when_empty():
    """A prediction whose size differs from the ground truth is refused; no task gives NaN."""
    with pytest.raises(ValueError, match=r"PhraseCut: prediction of shape \(4, 5\).*\(4, 6\).*image_data_split"):
        evaluate.PhraseCutMetrics().update(torch.zeros(4, 5, dtype=torch.bool), torch.zeros(4, 6, dtype=torch.bool))
    out = evaluate.PhraseCutMetrics().compute()
    assert out["count"] == 0 and math.isnan(out["mIoU"]) and math.isnan(out["Acc@0.5"])
    m = evaluate.PhraseCutMetrics()
    m.update(torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool))
    assert math.isnan(m.compute()["cumIoU"]) and m.compute()["mIoU"] == 0.0


def _ddp_metrics_worker(rank, world, init_file, out_file):
    """One gloo rank: score its share of a fixed set of sentences/tasks, all_reduce, rank 0 writes."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(5)
    inter, union = torch.randint(0, 5, (8,), generator=gen), torch.randint(5, 9, (8,), generator=gen)
    gt_nt, pred_nt = torch.rand(8, generator=gen) > 0.6, torch.rand(8, generator=gen) > 0.5
    pred, gt = torch.rand(8, 3, 3, generator=gen) > 0.5, torch.rand(8, 3, 3, generator=gen) > 0.5
    gres, cut = evaluate.GRESMetrics(), evaluate.PhraseCutMetrics()
    gres.update(inter[rank::world], union[rank::world], gt_nt[rank::world], pred_nt[rank::world])
    cut.update(pred[rank::world], gt[rank::world])
    gres.all_reduce()
    cut.all_reduce()
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(evaluate.without_nan({"gres": gres.compute(), "cut": cut.compute()}), f)
    dist.destroy_process_group()


def test_gres_and_phrasecut_metrics_all_reduce_over_two_ranks(tmp_path):
    """Under a 2-process gloo group, all_reduce gives the numbers of one process that saw everything."""
    torch.multiprocessing.spawn(_ddp_metrics_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.json")),
                                nprocs=2, join=True)
    got = json.loads((tmp_path / "out.json").read_text())
    gen = torch.Generator().manual_seed(5)
    inter, union = torch.randint(0, 5, (8,), generator=gen), torch.randint(5, 9, (8,), generator=gen)
    gt_nt, pred_nt = torch.rand(8, generator=gen) > 0.6, torch.rand(8, generator=gen) > 0.5
    pred, gt = torch.rand(8, 3, 3, generator=gen) > 0.5, torch.rand(8, 3, 3, generator=gen) > 0.5
    gres, cut = evaluate.GRESMetrics(), evaluate.PhraseCutMetrics()
    gres.update(inter, union, gt_nt, pred_nt)
    cut.update(pred, gt)
    assert got["gres"] == pytest.approx(evaluate.without_nan(gres.compute()))
    assert got["cut"] == pytest.approx(cut.compute())


def test_no_target_decision_rules():
    """empty-mask: fewer than min_pixels foreground pixels; head: sigmoid(logit) > threshold (strict)."""
    masks = [torch.zeros(3, 4, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool), torch.eye(3, dtype=torch.bool)]
    assert evaluate.no_target_decision("empty-mask", masks=masks).tolist() == [True, False, False]
    assert evaluate.no_target_decision("empty-mask", masks=masks, min_pixels=4).tolist() == [True, False, True]
    assert evaluate.no_target_decision("empty-mask", masks=masks, min_pixels=5).tolist() == [True, True, True]
    logits = torch.tensor([0.0, 0.1, -3.0, 2.0])
    assert evaluate.no_target_decision("head", no_target_logits=logits).tolist() == [False, True, False, True]
    assert evaluate.no_target_decision("head", no_target_logits=logits, threshold=0.9).tolist() == [False] * 4


def test_no_target_decision_errors_and_protocol_text():
    """Unknown rules and missing inputs are named; the rule text states the rule and its value."""
    with pytest.raises(ValueError, match="'largest'"):
        evaluate.no_target_decision("largest", masks=[])
    with pytest.raises(ValueError, match="predicted masks"):
        evaluate.no_target_decision("empty-mask")
    with pytest.raises(ValueError, match="no_target_weight > 0"):
        evaluate.no_target_decision("head", masks=[])
    with pytest.raises(ValueError, match="min_pixels"):
        evaluate.no_target_decision("empty-mask", masks=[], min_pixels=0)
    with pytest.raises(ValueError, match="threshold"):
        evaluate.no_target_decision("head", no_target_logits=torch.zeros(1), threshold=1.0)
    assert "empty-mask rule" in evaluate.no_target_rule_text("empty-mask") and "empty" in \
        evaluate.no_target_rule_text("empty-mask")
    assert "fewer than 50" in evaluate.no_target_rule_text("empty-mask", min_pixels=50)
    assert "sigmoid(logit) > 0.7" in evaluate.no_target_rule_text("head", threshold=0.7)
    with pytest.raises(ValueError, match="'x'"):
        evaluate.no_target_rule_text("x")


# --- scoring generalized datasets: the metric set per dataset, the no-target rules, overlays, the command line ---

class _GresKnownDataset(torch.utils.data.Dataset):
    """Four 16 x 16 sentences; channel 0 of each picture is the prediction, channel 1 the no-target logit.

        0: target, GT = 8 x 8 square, prediction = the square      head logit -10
        1: target, GT = the square, prediction empty               head logit -10
        2: no target, prediction empty                             head logit +10
        3: no target, prediction = a 4 x 4 square (16 px)          head logit +10
    """

    size = 16
    context_length = 4
    no_target = [False, False, True, True]

    def __init__(self):
        self.image_ids = [0, 1, 2, 3]
        self.preds = [np.zeros((16, 16), bool) for _ in range(4)]
        self.preds[0][:8, :8] = True
        self.preds[3][8:12, 8:12] = True
        self.logits = [-10.0, -10.0, 10.0, 10.0]

    def __len__(self):
        return 4

    def original_mask(self, index):
        gt = np.zeros((16, 16), bool)
        if not self.no_target[index]:
            gt[:8, :8] = True
        return gt

    def load_image(self, image_id):
        return Image.new("RGB", (16, 16), GREY)

    def __getitem__(self, index):
        image = torch.stack([torch.from_numpy(self.preds[index]).float(), torch.full((16, 16), self.logits[index]),
                             torch.zeros(16, 16)])
        return {"image": image, "ids": torch.zeros(4, dtype=torch.long), "word_mask": torch.ones(4, dtype=torch.bool),
                "orig_size": torch.tensor([16, 16]), "input_size": torch.tensor([16, 16]), "ref_id": index,
                "sent_id": index, "image_id": index, "sentence": f"s{index}", "index": index,
                "no_target": self.no_target[index]}


class _HeadOracle(_OracleModel):
    """_OracleModel with a no-target head whose logit is read from channel 1 of the picture."""

    def __init__(self, size):
        super().__init__(size)
        self.no_target_head = torch.nn.Identity()

    def forward_features(self, ids, word_mask, *, images=None, image_index=None, image_features=None):
        logits = self(images, ids, word_mask, image_index=image_index)
        return {"logits": logits, "no_target_logit": images[image_index, 1, 0, 0]}  # (B,)


@pytest.mark.parametrize("scoring,expected", [
    # empty mask = no target: 0 -> 1; 1 (empty) -> wrongly no target, 0, U 64; 2 -> 1; 3 (16 px) -> target, 0, U 16
    (evaluate.Scoring("gres"), {"gIoU": 2 / 4, "cIoU": 64 / 144, "N-acc": 0.5, "T-acc": 0.5, "Pr@0.7": 0.5}),
    # fewer than 17 pixels = no target: 3 becomes a right no-target decision, adding nothing
    (evaluate.Scoring("gres", nt_min_pixels=17),
     {"gIoU": 3 / 4, "cIoU": 64 / 128, "N-acc": 1.0, "T-acc": 0.5, "Pr@0.7": 0.5}),
    # the head: 1 is predicted a target with an empty mask (0, U 64), 2 and 3 no target whatever their masks
    (evaluate.Scoring("gres", nt_rule="head"), {"gIoU": 3 / 4, "cIoU": 64 / 128, "N-acc": 1.0, "T-acc": 1.0,
                                                "Pr@0.7": 0.5}),
    # PhraseCut: the empty-on-empty sentence 2 scores 0, not 1
    (evaluate.Scoring("phrasecut"), {"mIoU": 1 / 4, "cumIoU": 64 / 144, "Acc@0.5": 1 / 4}),
    (evaluate.Scoring("ris"), {"mIoU": 2 / 4, "oIoU": 64 / 144, "Prec@0.5": 2 / 4}),
], ids=["empty-mask", "empty-mask-17px", "head", "phrasecut", "ris"])
def test_evaluate_model_scores_each_metric_set_and_rule_by_hand(scoring, expected):
    """evaluate_model with each metric set and no-target rule gives the hand-computed numbers of a
    four-sentence split (ReLA's table for gRefCOCO, PhraseCut's official rules, the RIS rules)."""
    ds = _GresKnownDataset()
    out = evaluate.evaluate_model(_HeadOracle(ds.size), ds, batch_size=3, progress=False, scoring=scoring)
    assert out["count"] == 4
    for key, value in expected.items():
        assert out[key] == pytest.approx(value), key


def test_evaluate_model_refuses_phrasecut_eval_size_and_head_without_head():
    """PhraseCut at an --eval-size square and the head rule on a model without a head are refused."""
    ds = _GresKnownDataset()
    with pytest.raises(ValueError, match="original image size"):
        evaluate.evaluate_model(_HeadOracle(ds.size), ds, eval_size=8, progress=False,
                                scoring=evaluate.Scoring("phrasecut"))
    with pytest.raises(ValueError, match="no-target head"):
        evaluate.evaluate_model(_OracleModel(ds.size), ds, progress=False, scoring=evaluate.Scoring("gres", "head"))


def test_scoring_for_picks_the_metric_set_and_the_default_rule():
    """grefcoco / shapes-gres score with ReLA's metrics, phrasecut with its own, the rest with oIoU; the rule
    defaults to the head when the model has one, else empty-mask; "head" without one is an error."""
    with_head, without = _HeadOracle(16), _OracleModel(16)
    assert [evaluate.metric_set(d) for d in ("grefcoco", "shapes-gres", "phrasecut", "refcoco", "shapes")] == \
        ["gres", "gres", "phrasecut", "ris", "ris"]
    assert evaluate.scoring_for("grefcoco", with_head).nt_rule == "head"
    assert evaluate.scoring_for("grefcoco", without).nt_rule == "empty-mask"
    assert evaluate.scoring_for("grefcoco", with_head, nt_rule="empty-mask").nt_rule == "empty-mask"
    with pytest.raises(ValueError, match="needs a model with a no-target head"):
        evaluate.scoring_for("shapes-gres", without, nt_rule="head")
    with pytest.raises(ValueError, match="nt_min_pixels"):
        evaluate.scoring_for("grefcoco", without, nt_min_pixels=0)


def test_gres_overlays_name_no_target_and_the_decision(tmp_path, monkeypatch):
    """--vis on a gRefCOCO-style split draws each picture with the score, whether the GT has no target and
    what was decided."""
    drawn, real = [], evaluate.draw_overlay
    monkeypatch.setattr(evaluate, "draw_overlay", lambda *a, **kw: drawn.append(kw) or real(*a, **kw))
    ds = _GresKnownDataset()
    evaluate.evaluate_model(_HeadOracle(ds.size), ds, batch_size=4, progress=False, vis=4, vis_select="first",
                            vis_dir=tmp_path, scoring=evaluate.Scoring("gres"))
    assert [(kw["gt_no_target"], kw["pred_no_target"], kw["iou"]) for kw in drawn] == \
        [(False, False, 1.0), (False, True, 0.0), (True, True, 1.0), (True, False, 0.0)]
    assert all(kw["score_label"] == "score" for kw in drawn) and len(list(tmp_path.glob("*.png"))) == 4


def test_overlay_legend_names_no_target_and_the_decision():
    """The legend says "ground truth: no target" instead of the GT swatch, and names the decision."""
    assert evaluate.overlay_legend(gt=True, iou=0.5) == [("pred", "prediction"), ("gt", "ground truth"),
                                                         (None, "IoU 0.500")]
    assert evaluate.overlay_legend(gt=True, iou=1.0, score_label="score", gt_no_target=True, pred_no_target=True) == \
        [("pred", "prediction"), (None, "ground truth: no target"), (None, "decided: no target"), (None, "score 1.000")]
    assert (None, "decided: target") in evaluate.overlay_legend(gt=True, pred_no_target=False)


def test_no_target_decision_is_marked_on_the_picture():
    """A "no target" decision puts the mark at the top left even over a non-empty mask; "target" does not."""
    pred, gt = _boxes()
    image = Image.new("RGB", (200, 150), GREY)
    rejected = np.asarray(evaluate.draw_overlay(image, pred, "x", gt=gt, pred_no_target=True))
    kept = np.asarray(evaluate.draw_overlay(image, pred, "x", gt=gt, pred_no_target=False))
    assert tuple(rejected[4, 4]) == evaluate.EMPTY_MARK_COLOR and _has(rejected[:40, :200], (255, 255, 255), 10)
    assert tuple(kept[4, 4]) == GREY


@pytest.fixture(scope="module")
def gres_checkpoint(tmp_path_factory):
    """A 1-step checkpoint trained on shapes-gres at S = 64, with the no-target head (the default there)."""
    import train
    out = tmp_path_factory.mktemp("gres_ckpt")
    with pytest.MonkeyPatch.context() as mp:
        for split in data.SHAPES_NUM_IMAGES:  # the same first scenes, fewer of them
            mp.setitem(data.SHAPES_NUM_IMAGES, split, 12)
        train.main(["--dataset", "shapes-gres", "--max-steps", "1", "--image-size", "64", "--batch-size", "2",
                    "--val-split", "", "--no-progress", "--out-dir", str(out)])
    return out / "last.pt"


def _fake_scoring(monkeypatch) -> list:
    """Replace evaluate_model by a stand-in that records its `scoring` and returns an empty split's metrics."""
    seen = []

    def fake(model, dataset, **kwargs):
        seen.append(kwargs["scoring"])
        return kwargs["scoring"].new_metrics().compute()

    monkeypatch.setattr(evaluate, "evaluate_model", fake)
    return seen


def test_cli_no_target_rule_follows_the_checkpoint(gres_checkpoint, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """--nt-rule defaults to head for a checkpoint with the head, to empty-mask without; the rule is printed
    and written into the JSON; the table has the gRefCOCO columns."""
    seen = _fake_scoring(monkeypatch)
    common = ["--split", "val", "--no-progress", "--out-dir", str(tmp_path)]
    evaluate.main(["--ckpt", str(gres_checkpoint), *common])
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "eval_shapes-gres.json").read_text())
    assert seen[-1] == evaluate.Scoring("gres", nt_rule="head")
    assert report["protocol"]["no_target_rule"].startswith("no-target head") and "no_target_rule: no-target head" \
        in printed
    header = next(line for line in printed.splitlines() if line.startswith("split"))
    assert header.split() == ["split", *evaluate.METRIC_COLUMNS["gres"], "count"]
    evaluate.main(["--ckpt", str(gres_checkpoint), *common, "--nt-rule", "empty-mask", "--nt-min-pixels", "5"])
    assert seen[-1] == evaluate.Scoring("gres", nt_rule="empty-mask", nt_min_pixels=5)
    assert "below 5 pixels" in json.loads((tmp_path / "eval_shapes-gres.json").read_text())["protocol"][
        "no_target_rule"]
    evaluate.main(["--ckpt", str(tiny_checkpoint), *common, "--dataset", "shapes-gres"])
    assert seen[-1].nt_rule == "empty-mask"
    assert (tmp_path / "eval_shapes-gres_from_shapes.json").is_file()


@pytest.mark.parametrize("args,message", [
    (["--dataset", "shapes-gres", "--nt-rule", "head"], "--nt-\\*: the head no-target rule needs a model with a "
                                                        "no-target head"),
    (["--nt-min-pixels", "3"], "--nt-min-pixels: shapes has no no-target expressions"),
])
def test_cli_no_target_options_are_checked(tiny_checkpoint, tmp_path, monkeypatch, args, message):
    """--nt-rule head on a checkpoint without the head, --nt-* on a dataset without no-target expressions and
    bad --nt-* values stop with a one-line error."""
    _fake_scoring(monkeypatch)
    with pytest.raises(SystemExit, match=message) as e:
        evaluate.main(["--ckpt", str(tiny_checkpoint), "--split", "val", "--out-dir", str(tmp_path), *args])
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def context12_checkpoint(tmp_path_factory):
    """A 1-step shapes checkpoint with context length L = 12 and a stored --image-dir that no dataset has."""
    import train
    out = tmp_path_factory.mktemp("ckpt12")
    with pytest.MonkeyPatch.context() as mp:
        for split in data.SHAPES_NUM_IMAGES:
            mp.setitem(data.SHAPES_NUM_IMAGES, split, 12)
        train.main(["--max-steps", "1", "--image-size", "64", "--batch-size", "2", "--val-split", "", "--no-progress",
                    "--context-length", "12", "--image-dir", str(out / "no-such-folder"), "--out-dir", str(out)])
    return out / "last.pt"


def _phrasecut_root(kind, tmp_path):
    if kind == "shared":
        from conftest import shared_path
        return shared_path("phrasecut-mini"), 8
    from test_data import _write_phrasecut
    return _write_phrasecut(tmp_path / "p", mismatched=False).parent, 3


@pytest.mark.parametrize("kind", ["fixture", "shared"])
def test_cli_scores_a_checkpoint_on_phrasecut_across_datasets(context12_checkpoint, tmp_path, capsys, monkeypatch,
                                                               kind):
    """A shapes checkpoint scored on PhraseCut's test split: the title and the JSON name both datasets, the JSON
    file does not take the training dataset's name, the checkpoint's L is kept, its image folder is not used,
    the columns are PhraseCut's, in percent in the JSON, scored at the original image size."""
    root, tasks = _phrasecut_root(kind, tmp_path)
    built, real = [], data.build_dataset
    monkeypatch.setattr(data, "build_dataset", lambda name, split, **kw: built.append(kw) or real(name, split, **kw))
    results = evaluate.main(["--ckpt", str(context12_checkpoint), "--dataset", "phrasecut", "--data-root", str(root),
                             "--split", "test", "--no-progress", "--out-dir", str(tmp_path / "e")])
    printed = capsys.readouterr().out
    assert f"phrasecut  checkpoint {context12_checkpoint} (trained on shapes)" in printed
    header = next(line for line in printed.splitlines() if line.startswith("split"))
    assert header.split() == ["split", *evaluate.METRIC_COLUMNS["phrasecut"], "count"]
    assert built[0]["context_length"] == 12 and built[0]["image_dir"] is None
    assert not (tmp_path / "e" / "eval_phrasecut.json").exists()
    report = json.loads((tmp_path / "e" / "eval_phrasecut_from_shapes.json").read_text())
    assert (report["dataset"], report["trained_on"]["dataset"]) == ("phrasecut", "shapes")
    assert report["protocol"]["context_length_L"] == 12 and report["protocol"]["scoring"].startswith("original image")
    assert "strictly greater" in report["protocol"]["Acc@X"] and report["unit"] == "percent"
    assert results["test"]["count"] == report["results"]["test"]["count"] == tasks
    for key in evaluate.METRIC_COLUMNS["phrasecut"]:
        assert report["results"]["test"][key] == pytest.approx(100 * results["test"][key]), key
    with pytest.raises(SystemExit, match="--eval-size: PhraseCut is scored at the original image size"):
        evaluate.main(["--ckpt", str(context12_checkpoint), "--dataset", "phrasecut", "--data-root", str(root),
                       "--split", "test", "--eval-size", "32", "--out-dir", str(tmp_path / "e")])


# --- Bad input: one-line errors before anything is written; the encoder check ---

@pytest.mark.parametrize("flag,value", [("--threshold", "0"), ("--threshold", "1"), ("--threshold", "nan"),
                                        ("--batch-size", "0"), ("--workers", "-1"), ("--eval-size", "0"),
                                        ("--vis", "-2"), ("--text", ""), ("--text", "   "), ("--out", "overlay"),
                                        ("--out", "overlay.txt"), ("--mask-out", "mask.npy"),
                                        ("--device", "gpu"), ("--device", "cuda"), ("--nt-threshold", "1.5"),
                                        ("--nt-threshold", "0"), ("--nt-min-pixels", "0"), ("--limit", "-1")])
def test_bad_option_values_fail_at_parse_time_in_one_line(flag, value, tmp_path, capsys):
    """An unusable option value exits (code 2) with one line `error: <flag> <value>: expected ...` before the
    checkpoint is even read."""
    if value == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--ckpt", str(tmp_path / "not-read.pt"), "--image", "x.png", "--text", "x", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith(f"error: {flag} ") and "expected" in err and err.count("\n") == 1


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut", "random"], ids=["empty", "cut", "random"])
def test_bad_checkpoint_file_is_one_line(content, tmp_path):
    """An empty, cut-short or random-bytes --ckpt exits with one line naming the file and what was expected."""
    path = tmp_path / "bad.pt"
    path.write_bytes(np.random.default_rng(0).bytes(3000) if content == "random" else content)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--ckpt", str(path), "--out-dir", str(tmp_path / "out")])
    message = str(e.value.code)
    assert message.startswith(f"error: checkpoint {path} ") and message.endswith("written by train.py")
    assert "\n" not in message and not (tmp_path / "out").exists()


def test_script_prints_one_line_and_no_traceback(tiny_checkpoint, tmp_path):
    """`python evaluate.py --image <a text file>` prints one `error:` line on stderr, no traceback, exit 1."""
    import pathlib
    import subprocess
    import sys
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a picture")
    root = pathlib.Path(evaluate.__file__).resolve().parent
    proc = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(tiny_checkpoint), "--image", str(notes),
                           "--text", "the dog"], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: image {notes} is corrupt") and proc.stderr.count("\n") == 1, proc.stderr


def test_non_image_file_fails_before_the_model_is_built(tiny_checkpoint, tmp_path, monkeypatch):
    """--image naming a file that is no picture exits with one line naming it; no model is built, nothing written."""
    monkeypatch.setattr(maris, "model_from_checkpoint", lambda *a, **k: pytest.fail("the model was built"))
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--ckpt", str(tiny_checkpoint), "--image", str(notes), "--text", "the dog",
                       "--out", str(tmp_path / "out" / "o.png")])
    assert str(e.value.code).startswith(f"error: image {notes} is corrupt or not an image")
    assert "expected a picture file" in str(e.value.code)
    assert not (tmp_path / "out").exists()


def _perturbed_clip(tiny_checkpoint, path, noise=0.01):
    """The tiny checkpoint's (random, seeded) CLIP text tower saved as a weight file, perturbed by `noise`."""
    model = maris.model_from_checkpoint(maris.read_checkpoint(tiny_checkpoint))
    torch.save({k: v + noise * torch.randn_like(v) for k, v in model.text_encoder.state_dict().items()}, path)
    return path


@pytest.mark.filterwarnings("ignore:MARIS. RANDOM weights")
def test_other_encoder_weights_are_refused_or_recorded(tiny_checkpoint, tmp_path):
    """--clip-checkpoint with other weights than the model was trained with stops with one line; with
    --allow-encoder-mismatch it scores, warns, and the JSON records each encoder's file, hashes and match."""
    other = _perturbed_clip(tiny_checkpoint, tmp_path / "other_clip.pt")
    common = ["--ckpt", str(tiny_checkpoint), "--split", "val", "--batch-size", "32", "--no-progress",
              "--out-dir", str(tmp_path), "--clip-checkpoint", str(other)]
    with pytest.raises(SystemExit) as e:
        evaluate.main(common)
    assert f"--clip-checkpoint {other} holds other CLIP text tower weights" in str(e.value.code)
    assert not list(tmp_path.glob("eval_*.json"))
    with pytest.warns(maris.EncoderCheckWarning, match="ENCODER MISMATCH"):
        evaluate.main([*common, "--allow-encoder-mismatch"])
    encoders = json.loads((tmp_path / "eval_shapes.json").read_text())["encoders"]
    trained = torch.load(tiny_checkpoint, weights_only=True)["encoders"]
    assert encoders["clip"]["file"] == str(other) and encoders["clip"]["match"] is False
    assert encoders["clip"]["trained_sha256"] == trained["clip"]["sha256"] != encoders["clip"]["sha256"]
    assert encoders["sam"]["match"] is True and encoders["sam"]["file"] is None


@pytest.mark.filterwarnings("ignore:MARIS. RANDOM weights")
def test_checkpoint_without_hashes_warns_that_it_cannot_be_checked(tiny_checkpoint, tmp_path):
    """A checkpoint from before encoder hashes were stored is scored with a warning; the JSON says unknown (null)."""
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    del ckpt["encoders"]
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.warns(maris.EncoderCheckWarning, match="cannot be checked"):
        evaluate.main(["--ckpt", str(tmp_path / "old.pt"), "--split", "val", "--batch-size", "32", "--no-progress"])
    encoders = json.loads((tmp_path / "eval_shapes.json").read_text())["encoders"]
    assert encoders["sam"]["match"] is None and encoders["clip"]["trained_sha256"] is None


# --- The prediction API: maris.load + evaluate.predict ---

@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return maris.load(tiny_checkpoint)


def _photo(h=45, w=70, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_predict_returns_a_bool_mask_at_the_image_size_for_every_input_kind(loaded, tmp_path):
    """predict gives a bool (H, W) numpy mask at the picture's size, the same for a path, a PIL image and an
    array; an EXIF-tagged path is segmented upright."""
    pixels = _photo()
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    masks = [evaluate.predict(loaded, source, "the red circle")
             for source in (tmp_path / "photo.png", str(tmp_path / "photo.png"), Image.fromarray(pixels), pixels)]
    assert all(m.dtype == np.bool_ and m.shape == (45, 70) for m in masks)
    assert all(np.array_equal(m, masks[0]) for m in masks) and 0 < masks[0].sum() < masks[0].size
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate: the upright photo is 45 wide, 70 high
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif.tobytes())
    assert evaluate.predict(loaded, tmp_path / "phone.jpg", "the red circle").shape == (70, 45)


def test_predict_encodes_the_image_once_for_a_list_of_expressions(loaded):
    """A list of expressions runs SAM's image encoder once (one image) and gives, in order, the masks that
    each expression alone gives."""
    texts = ["the red circle", "the small blue square on the left", "the green triangle", "the large one"]
    calls = []
    # patch_embed runs once per encoder pass (sam_encoder_taps walks the blocks, not the encoder's forward)
    handle = loaded.image_encoder.patch_embed.register_forward_hook(
        lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        together = evaluate.predict(loaded, _photo(), texts, batch_size=3)
    finally:
        handle.remove()
    assert calls == [1]
    alone = [evaluate.predict(loaded, _photo(), t) for t in texts]
    assert isinstance(together, list) and len(together) == len(texts)
    assert all(np.array_equal(a, b) for a, b in zip(together, alone))
    assert len({m.tobytes() for m in alone}) > 1  # the expressions really give different masks


def test_predict_rejects_bad_input_with_clear_errors(loaded, tmp_path):
    """Empty expressions, wrong image arrays or types, a bad threshold and a non-image file raise clear errors."""
    with pytest.raises(ValueError, match="expression #1 is empty"):
        evaluate.predict(loaded, _photo(), ["the dog", " "])
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) uint8 RGB array"):
        evaluate.predict(loaded, _photo().astype(np.float32), "the dog")
    with pytest.raises(TypeError, match="expected a file path, a PIL image"):
        evaluate.predict(loaded, [[0]], "the dog")
    with pytest.raises(TypeError, match="non-empty list"):
        evaluate.predict(loaded, _photo(), [])
    with pytest.raises(ValueError, match="threshold 1.5"):
        evaluate.predict(loaded, _photo(), "the dog", threshold=1.5)
    (tmp_path / "x.jpg").write_text("text")
    with pytest.raises(ValueError, match="x.jpg is corrupt or not an image"):
        evaluate.predict(loaded, tmp_path / "x.jpg", "the dog")


def test_single_image_mode_writes_what_predict_returns(tiny_checkpoint, loaded, tmp_path):
    """evaluate.py --image/--text writes the mask that maris.load + predict give for the same photo."""
    Image.fromarray(_photo(seed=3)).save(tmp_path / "photo.png")
    evaluate.main(["--ckpt", str(tiny_checkpoint), "--image", str(tmp_path / "photo.png"), "--text",
                   "the red circle", "--out", str(tmp_path / "o.png")])
    with Image.open(tmp_path / "o_mask.png") as written:
        expected = evaluate.predict(loaded, tmp_path / "photo.png", "the red circle")
        assert np.array_equal(np.asarray(written) > 0, expected)


def _single_image(ckpt, tmp_path, capsys, *extra) -> tuple[dict, str]:
    """Run single-image mode on a seeded photo; returns main's result and what it printed."""
    Image.fromarray(_photo(seed=4)).save(tmp_path / "photo.png")
    result = evaluate.main(["--ckpt", str(ckpt), "--image", str(tmp_path / "photo.png"), "--text",
                            "the purple star", "--out", str(tmp_path / "o.png"), *extra])
    return result, capsys.readouterr().out


def test_single_image_mode_prints_the_head_no_target_decision(gres_checkpoint, tmp_path, capsys, monkeypatch):
    """With a no-target head, --image/--text prints the head's sigmoid and the decision, which flips with
    --nt-threshold on either side of it; the overlay's legend names the decision."""
    drawn, draw = [], evaluate.draw_overlay
    monkeypatch.setattr(evaluate, "draw_overlay", lambda *a, **kw: drawn.append(kw.get("pred_no_target")) or
                        draw(*a, **kw))
    model = maris.load(gres_checkpoint)
    pixels, _ = data.transform_image(Image.fromarray(_photo(seed=4)), model.cfg.image_size)
    ids, wm = data.tokenize(["the purple star"], model.cfg.context_length)
    with torch.no_grad():
        p = torch.sigmoid(model.forward_features(ids, wm, images=pixels[None])["no_target_logit"][0]).item()
    result, printed = _single_image(gres_checkpoint, tmp_path, capsys)
    assert f"sigmoid(logit) = {p:.3f}" in printed and "no-target head" in printed
    assert result["no_target"] == (p > 0.5) and f"no target: {'yes' if p > 0.5 else 'no'}" in printed
    for threshold, decided in ((max(p - 0.01, 0.001), True), (min(p + 0.01, 0.999), False)):
        result, printed = _single_image(gres_checkpoint, tmp_path, capsys, "--nt-threshold", str(threshold))
        assert result["no_target"] is decided and f"no target: {'yes' if decided else 'no'}" in printed
    assert drawn == [p > 0.5, True, False]


def test_single_image_mode_prints_the_empty_mask_decision_on_a_gres_dataset(tiny_checkpoint, tmp_path, capsys):
    """Without a head, single-image mode on a gRefCOCO-style --dataset decides by the mask's pixel count
    (--nt-min-pixels); on the checkpoint's own shapes dataset it decides nothing and refuses --nt-* options."""
    result, printed = _single_image(tiny_checkpoint, tmp_path, capsys)
    assert result["no_target"] is None and "no target" not in printed
    with Image.open(tmp_path / "o_mask.png") as written:
        pixels = int((np.asarray(written) > 0).sum())
    for min_pixels in (1, pixels + 1):
        result, printed = _single_image(tiny_checkpoint, tmp_path, capsys, "--dataset", "shapes-gres",
                                        "--nt-min-pixels", str(min_pixels))
        assert result["no_target"] == (pixels < min_pixels) and "empty-mask rule" in printed
    assert result["no_target"] is True and "no target: yes" in printed
    with pytest.raises(SystemExit, match="--nt-min-pixels: shapes has no no-target expressions"):
        _single_image(tiny_checkpoint, tmp_path, capsys, "--nt-min-pixels", "3")


def test_report_goes_beside_the_checkpoint_as_the_user_named_it(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """Without --out-dir the JSON goes to the checkpoint's folder, and the path is printed relative as given."""
    _fake_scoring(monkeypatch)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(tiny_checkpoint.read_bytes())
    monkeypatch.chdir(tmp_path)
    evaluate.main(["--ckpt", "run/best.pt", "--split", "val", "--no-progress"])
    assert "wrote run/eval_shapes.json\n" in capsys.readouterr().out and (tmp_path / "run/eval_shapes.json").is_file()
# --- evaluate.py --export: a shareable model folder ---

def _front_matter(card: str) -> dict:
    """The `key: value` lines of a model card's front matter (between the first two '---' lines)."""
    head = card.split("---\n")[1]
    return dict(line.split(": ", 1) for line in head.splitlines() if ": " in line)


def test_export_writes_a_hub_folder_whose_metrics_are_measured_and_reproduced(tiny_checkpoint, tmp_path, capsys):
    """--export writes config.json, model.safetensors and a README.md model card (Hub front matter, the metrics
    of the val split measured now); scoring the folder (--ckpt DIR) and the .pt gives those same metrics."""
    folder = tmp_path / "shared-model"
    common = ["--batch-size", "32", "--no-progress", "--out-dir", str(tmp_path)]
    out = evaluate.main(["--ckpt", str(tiny_checkpoint), "--export", str(folder), *common])
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    evaluation = config["evaluation"]
    assert evaluation["splits"] == ["val"] and evaluation["dataset"] == "shapes"
    from_pt = evaluate.main(["--ckpt", str(tiny_checkpoint), "--split", "val", *common])
    from_folder = evaluate.main(["--ckpt", str(folder), "--split", "val", *common])
    assert from_folder == from_pt == out["results"]
    assert evaluation["results"]["val"]["oIoU"] == pytest.approx(100 * from_pt["val"]["oIoU"])
    card = (folder / "README.md").read_text()
    front = _front_matter(card)
    assert front["pipeline_tag"] == "image-segmentation" and front["library_name"] == "pytorch"
    assert "license" in front and "Apache-2.0" in card and "MIT" in card
    row = next(line for line in card.splitlines() if line.startswith("val "))
    assert row.split()[1] == f"{100 * from_pt['val']['oIoU']:.2f}"
    assert f"maris.load(\"{folder.name}\")" in card and f"--ckpt {folder.name}" in card
    assert config["encoders"] == torch.load(tiny_checkpoint, weights_only=True)["encoders"]


def test_export_refuses_a_folder_with_files_and_single_image_mode(tiny_checkpoint, tmp_path):
    """--export into a folder holding files, or together with --image/--text, stops with one line before
    anything is written."""
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="taken: the folder is not empty"):
        evaluate.main(["--ckpt", str(tiny_checkpoint), "--export", str(folder), "--no-progress"])
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    with pytest.raises(SystemExit, match="--export scores a split for the model card"):
        evaluate.main(["--ckpt", str(tiny_checkpoint), "--export", str(tmp_path / "new"), "--image", "x.png",
                       "--text", "the dog"])
    assert not (tmp_path / "new").exists()
