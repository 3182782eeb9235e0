"""Tests for evaluate.py: the metrics (DESIGN.md §6), undoing the padding, the command line."""
import json
import math

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
                "--no-progress", "--out-dir", str(out)])
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
