"""Tests for evaluate.py: the metrics (DESIGN.md §6), undoing the padding, the command line."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import evaluate

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
    with pytest.raises(SystemExit, match="--limit must be >= 0"):
        evaluate.main(["--ckpt", str(tiny_checkpoint), "--limit", "-1", "--no-progress"])


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
    """evaluate.py --feature-cache fills the cache once per image, hashes the encoder weights once per
    run (not once per split), and scores like the pixel path (fp16 features: equal pair count, oIoU
    within rounding)."""
    common = ["--ckpt", str(tiny_checkpoint), "--split", "val", "--batch-size", "16", "--no-progress",
              "--out-dir", str(tmp_path)]
    plain = evaluate.main(common)["val"]
    hashes, real_hash = [], evaluate.state_dict_sha256
    monkeypatch.setattr(evaluate, "state_dict_sha256", lambda module: hashes.append(1) or real_hash(module))
    cached = evaluate.main([*common, "--split", "test", "--feature-cache", str(tmp_path / "cache")])["val"]
    assert len(hashes) == 1
    again = evaluate.main([*common, "--feature-cache", str(tmp_path / "cache")])["val"]
    import data
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
                          cwd=root, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("protocol:") == 1  # rank 0 alone prints the table
    ddp = json.loads((tmp_path / "ddp" / "eval_shapes.json").read_text())["results"]["val"]
    assert ddp["count"] == one["count"]
    for key, value in one.items():
        assert ddp[key] == pytest.approx(value, abs=1e-6), key
