"""Tests for train.py: options, schedule, data order, checkpoints, exact resume, DDP, MagNet/RISAM
switches, image-grouped batches, the encoder feature cache, end to end."""
import json
import math
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import data
import evaluate
import maris
import train
from conftest import ROOT, shared_path

# Tiny runs: the tiny preset at S = 64 (4 x 4 visual tokens), no progress bars.
TINY = ["--preset", "tiny", "--image-size", "64", "--no-progress", "--log-every", "1", "--workers", "0"]
# Every add-on: MagNet's Mask Grounding and alignment losses, RISAM's adapters.
ADDONS = ["--mask-grounding-weight", "0.1", "--alignment-weight", "0.1", "--adapters"]


# --- a self-written fixture in the refer API's layout ---

def write_refer_fixture(root: pathlib.Path, texts=("{colour} box", "box in the {place}")) -> pathlib.Path:
    """A tiny RefCOCO (unc) in the refer layout: 5 images, 3 boxes each, 2 sentences per ref.

    Images 1-2 are train, 3 val, 4 testA, 5 testB; each box is one COCO polygon annotation; the
    sentences are `texts` formatted with the box's colour and place.
    """
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    images, anns, refs = [], [], []
    rng = np.random.default_rng(0)
    splits = {1: "train", 2: "train", 3: "val", 4: "testA", 5: "testB"}
    img_dir = root / "images" / "mscoco" / "images" / "train2014"
    img_dir.mkdir(parents=True)
    (root / "refcoco").mkdir()
    sent_id = 0
    for image_id, split in splits.items():
        h, w = (48, 72) if image_id % 2 else (80, 56)
        pixels = np.full((h, w, 3), 128, np.uint8)
        name = f"COCO_train2014_{image_id:012d}.jpg"
        images.append({"id": image_id, "height": h, "width": w, "file_name": name})
        for k, (colour, rgb) in enumerate(colours.items()):
            x0 = int(k * w / 3 + 2)
            x1 = int((k + 1) * w / 3 - 2)
            y0 = int(rng.integers(0, h // 2))
            y1 = y0 + h // 3
            pixels[y0:y1, x0:x1] = rgb
            ann_id = image_id * 10 + k
            anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                         "area": float((x1 - x0) * (y1 - y0)), "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
            place = ("left", "middle", "right")[k]
            sents = []
            for text in (t.format(colour=colour, place=place) for t in texts):
                sents.append({"tokens": text.split(), "raw": text, "sent_id": sent_id, "sent": text})
                sent_id += 1
            refs.append({"sent_ids": [s["sent_id"] for s in sents],
                         "file_name": f"COCO_train2014_{image_id:012d}_{k}.jpg",
                         "ann_id": ann_id, "ref_id": ann_id, "image_id": image_id, "split": split,
                         "sentences": sents, "category_id": 1})
        Image.fromarray(pixels).save(img_dir / name, quality=95)
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    categories = [{"id": 1, "name": "box", "supercategory": "thing"}]
    (root / "refcoco" / "instances.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return root


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory):
    return write_refer_fixture(tmp_path_factory.mktemp("refer"))


def refer_args(root, out, *extra):
    return ["--dataset", "refcoco", "--data-root", str(root), "--out-dir", str(out), "--batch-size", "2",
            "--lr", "1e-3", "--warmup-steps", "2", *TINY, *extra]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def log_records(out, kind):
    return [x for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if x["kind"] == kind]


def shapes_args(out, *extra):
    """A short shapes run: 16 training items (of 8 generated scenes), batch 4 (4 steps per epoch), no validation,
    i.i.d. batches (`epoch_batches` without image grouping, whatever the demo's --sentences-per-image is)."""
    return ["--out-dir", str(out), "--batch-size", "4", "--train-scenes", "8", "--train-limit", "16", "--val-split", "",
            "--lr", "1e-3", "--warmup-steps", "1", "--sentences-per-image", "1", *TINY, *extra]


# --- options ---

def test_help_lists_every_option(capsys):
    """`--help` names every TrainOptions field as a flag, each with its default."""
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in train.dataclasses.fields(train.TrainOptions):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert text.count("(default:") >= len(train.dataclasses.fields(train.TrainOptions))


def test_auto_options_depend_on_dataset():
    """Unset options resolve to the shapes demo values for shapes and the MARIS recipe otherwise."""
    shapes = train.resolve_options(train.TrainOptions())
    ref = train.resolve_options(train.TrainOptions(dataset="refcocog"))
    assert (shapes.preset, ref.preset) == ("tiny", "vit_b")
    assert ref.lr == 1e-4 and ref.batch_size == 8 and ref.epochs == 50
    assert ref.split_by == "umd" and ref.context_length == 30 and shapes.context_length == 20
    assert train.resolve_options(train.TrainOptions(lr=3e-4)).lr == 3e-4
    # the shapes demo: 1,800 generated scenes, 4 sentences of a picture per batch (measured, README "What the
    # first command does"); shapes-gres keeps its 1,000 scenes and i.i.d. batches, RefCOCO its i.i.d. batches
    gres = train.resolve_options(train.TrainOptions(dataset="shapes-gres"))
    assert (shapes.train_scenes, shapes.sentences_per_image, shapes.epochs) == (1800, 4, 4)
    assert (gres.train_scenes, gres.sentences_per_image, gres.epochs) == (1000, 1, 4)
    assert (ref.train_scenes, ref.sentences_per_image) == (None, 1)
    assert train.resolve_options(train.TrainOptions(sentences_per_image=1)).sentences_per_image == 1


# --- schedule and data order ---

@given(st.integers(1, 50), st.integers(0, 20), st.sampled_from(["cosine", "poly", "constant"]))
def test_schedule_warms_up_then_never_increases(total, warmup, kind):
    """The LR factor rises linearly to 1 during warm-up, then never increases and stays in [0, 1]."""
    f = train.LRSchedule(total + warmup, warmup, kind)
    values = [f(s) for s in range(total + warmup + 3)]
    assert all(0.0 <= v <= 1.0 for v in values)
    after = values[warmup:] if warmup else values
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert all(a < b for a, b in zip(values[:warmup], values[1:warmup]))


@given(st.integers(4, 60), st.integers(1, 4), st.integers(1, 3), st.integers(0, 5), st.integers(0, 3))
def test_epoch_order_is_pure_and_ranks_disjoint(n, batch, world, seed, epoch):
    """The batches are a pure function of (seed, epoch); ranks get disjoint, full batches."""
    per_rank = [train.epoch_batches(n, batch_size=batch, seed=seed, epoch=epoch, rank=r, world=world)
                for r in range(world)]
    again = [train.epoch_batches(n, batch_size=batch, seed=seed, epoch=epoch, rank=r, world=world)
             for r in range(world)]
    assert per_rank == again
    seen = [i for rank in per_rank for b in rank for i in b]
    assert len(seen) == len(set(seen))
    assert all(len(b) == batch for rank in per_rank for b in rank)


@given(st.lists(st.integers(0, 5), min_size=4, max_size=40), st.integers(1, 4), st.integers(2, 4),
       st.integers(0, 3))
def test_image_grouped_order_is_pure_and_groups_images(image_ids, batch, k, epoch):
    """With --sentences-per-image K the batches are a pure function of (seed, epoch), full, and
    each item appears at most once per epoch."""
    kw = dict(batch_size=batch, seed=1, epoch=epoch, rank=0, world=1, image_ids=image_ids, sentences_per_image=k)
    batches = train.epoch_batches(len(image_ids), **kw)
    assert batches == train.epoch_batches(len(image_ids), **kw)
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) and all(len(b) == batch for b in batches)


# --- checkpoints ---

def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    """A save that dies half-way leaves the previous checkpoint intact and no temp file behind."""
    path = tmp_path / "last.pt"
    train.atomic_save({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(train.torch, "save", broken_save)
    with pytest.raises(OSError):
        train.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_rng_state_roundtrip():
    """Restoring a saved RNG state replays python, numpy and torch random numbers exactly."""
    import random
    state = train.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    train.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_checkpoint_is_self_describing(refer_root, tmp_path, monkeypatch):
    """last.pt loads with weights_only and holds config, options, trainable weights only and state;
    the training split is built with its masks, the validation split (scored on original_mask) without."""
    built, real = [], data.build_dataset
    monkeypatch.setattr(data, "build_dataset", lambda name, split, **kw: built.append(
        (split, kw.get("load_masks", True))) or real(name, split, **kw))
    out = tmp_path / "run"
    result = train.main(refer_args(refer_root, out, "--max-steps", "2"))
    assert built == [("train", True), ("val", False)]
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    for key in ("config", "options", "model", "optimizer", "scheduler", "step", "epoch", "rng", "sampler",
                "best_oIoU"):
        assert key in ckpt, key
    assert ckpt["step"] == result["step"] == 2
    assert not any(k.startswith(("image_encoder.", "text_encoder.")) for k in ckpt["model"])
    model = maris.model_from_checkpoint(ckpt)
    assert set(model.trainable_state_dict()) == set(ckpt["model"])
    assert (out / "best.pt").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {x["kind"] for x in lines} == {"start", "train", "eval"}


@pytest.mark.parametrize("addons", [False, True])
def test_optimizer_holds_only_trainable_parameters(addons):
    """The optimizer holds exactly the model's requires_grad parameters plus MagNet's heads; with
    --adapters the only SAM encoder parameters in it are the adapters."""
    opts = train.resolve_options(train.TrainOptions(dataset="refcoco", preset="tiny", image_size=64,
                                                    mask_grounding_weight=0.1 * addons,
                                                    alignment_weight=0.1 * addons, adapters=addons))
    cfg = train.model_config(opts)
    assert (cfg["adapters"], cfg["mask_grounding_weight"], cfg["alignment_weight"]) == (addons, 0.1 * addons,
                                                                                      0.1 * addons)
    model = maris.build_model(cfg)
    heads = maris.build_heads(maris.config_from_dict(cfg), model)
    opt = train.build_optimizer(maris.TrainStep(model, heads), opts)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in [*model.parameters(), *heads.parameters()] if p.requires_grad}
    assert bool(list(heads.parameters())) == addons
    named = {id(p): n for n, p in model.named_parameters()}
    assert not any(named.get(i, "").startswith(("image_encoder.", "text_encoder.")) for i in in_opt)
    assert any(named.get(i, "").startswith("image_adapters.") for i in in_opt) == addons
    no_decay = {id(p) for p in opt.param_groups[1]["params"]}
    assert all((p.ndim <= 1) == (id(p) in no_decay) for g in opt.param_groups for p in g["params"])
    assert not model.image_encoder.training and not model.text_encoder.training


@pytest.mark.parametrize("addons", [[], ADDONS], ids=["maris", "magnet+adapters"])
def test_resume_is_bit_identical(refer_root, tmp_path, addons):
    """N steps + resume + N steps equal 2N straight steps bit for bit (across an epoch boundary),
    also with MagNet's randomly masked words, its heads and RISAM's adapters training."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    # 12 train items / batch 2 = 6 steps per epoch; 4 + 4 crosses the boundary at step 6.
    train.main(refer_args(refer_root, straight, "--max-steps", "8", "--epochs", "3", *addons))
    train.main(refer_args(refer_root, split, "--max-steps", "4", "--epochs", "3", *addons))
    mid = torch.load(split / "last.pt", weights_only=True)
    assert (mid["step"], mid["sampler"]["batch_in_epoch"]) == (4, 4)
    result = train.main(["--resume", str(split / "last.pt"), "--max-steps", "8", "--no-progress"])
    assert result["step"] == 8
    a, b = weights(straight / "last.pt"), weights(split / "last.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (torch.load(out / "last.pt", weights_only=True) for out in (straight, split))
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert ca["heads"].keys() == cb["heads"].keys() and bool(ca["heads"]) == bool(addons)
    assert all(torch.equal(ca["heads"][k], cb["heads"][k]) for k in ca["heads"])
    if addons:  # the add-ons really ran: their losses are logged and the adapters are saved
        assert all(x["mask_grounding"] > 0 and x["alignment"] > 0 for x in log_records(split, "train"))
        assert any(k.startswith("image_adapters.") for k in a)


def test_resume_with_more_epochs_extends_the_schedule(refer_root, tmp_path):
    """Resuming a finished run with a larger --epochs trains on with a fresh, non-zero learning rate."""
    out = tmp_path / "run"
    train.main(refer_args(refer_root, out, "--epochs", "1", "--schedule", "poly", "--val-split", ""))
    assert log_records(out, "train")[-1]["lr"] == 0.0  # the schedule ended
    result = train.main(["--resume", "auto", "--out-dir", str(out), "--dataset", "refcoco", "--epochs", "2",
                         "--no-progress"])
    assert result["step"] == 12
    lrs = [x["lr"] for x in log_records(out, "train")]
    assert lrs[6] > 0.0 and lrs[-1] == 0.0


def test_nonfinite_loss_stops_and_keeps_last_good(refer_root, tmp_path, monkeypatch):
    """A NaN loss stops the run with a message naming the step; last.pt stays the last good one."""
    real = maris.segmentation_loss
    calls = {"n": 0}

    def loss_nan_at_step_4(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] >= 4:
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    monkeypatch.setattr(maris, "segmentation_loss", loss_nan_at_step_4)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(refer_args(refer_root, out, "--save-every", "2", "--val-split", ""))
    assert "non-finite loss" in str(e.value) and "step 4" in str(e.value)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_sigterm_saves_last_and_exits_cleanly(refer_root, tmp_path, monkeypatch):
    """SIGTERM during training finishes the step, writes last.pt and returns normally."""
    real = maris.segmentation_loss
    calls = {"n": 0}

    def loss_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(maris, "segmentation_loss", loss_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    result = train.main(refer_args(refer_root, tmp_path / "run", "--val-split", ""))
    assert result["stopped_by"] == "SIGTERM" and result["step"] == 3
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 3
    assert signal.getsignal(signal.SIGTERM) == before


# --- user-facing errors ---

def test_missing_refcoco_data_gives_clean_message(tmp_path):
    """`train.py --dataset refcoco` without data exits with the missing file, the layout and the sources."""
    proc = subprocess.run([sys.executable, "train.py", "--dataset", "refcoco", "--data-root", str(tmp_path / "none")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "refs(unc).p" in proc.stderr and "train2014" in proc.stderr
    assert "refer" in proc.stderr and "cocodataset" in proc.stderr.lower()


# --- DDP ---

# Every sentence three CLIP tokens long: with --mask-ratio 1 every word is masked, the same count on every
# rank, so the mean of the ranks' Mask Grounding losses (what DDP's gradient averaging computes) is the
# mean over the whole batch (what one process computes).
THREE_WORDS = ("{colour} box {place}", "the {colour} one")
MAGNET_DDP = ["--mask-grounding-weight", "0.1", "--mask-ratio", "1.0", "--alignment-weight", "0.1"]


@pytest.fixture(scope="module")
def three_word_root(tmp_path_factory):
    return write_refer_fixture(tmp_path_factory.mktemp("refer3"), texts=THREE_WORDS)


def test_fixture_sentences_are_three_tokens(three_word_root):
    """The DDP fixture's sentences all have three word tokens (the premise of the MagNet DDP test)."""
    ds = data.build_dataset("refcoco", "train", root=three_word_root, image_size=64)
    assert set((ds.word_mask.sum(1) - 2).tolist()) == {3}


@pytest.mark.parametrize("extra", [[], MAGNET_DDP], ids=["maris", "mask_grounding+alignment"])
def test_ddp_two_gloo_processes_match_one_process(three_word_root, tmp_path, extra):
    """torchrun with 2 CPU processes (gloo), batch 2 each, gives the losses, gradient norms and weights of
    1 process with batch 4; with MagNet's Mask Grounding and alignment losses, their heads (inside the
    DDP-wrapped TrainStep) are averaged over the ranks too."""
    common = ["--dataset", "refcoco", "--data-root", str(three_word_root), "--max-steps", "3", "--val-split", "",
              *TINY, "--lr", "1e-3", "--warmup-steps", "1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", "--batch-size", "2", "--out-dir", str(tmp_path / "ddp"), *common],
                          cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train.main(["--batch-size", "4", "--out-dir", str(tmp_path / "one"), *common])
    assert single["step"] == 3
    ckpt = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["sampler"]["world_size"] == 2 and len(ckpt["rng"]) == 2
    ddp_log, one_log = log_records(tmp_path / "ddp", "train"), log_records(tmp_path / "one", "train")
    assert [x["step"] for x in ddp_log] == [1, 2, 3]
    # The same items per step and averaged gradients: the (rank-averaged) losses agree to rounding.
    for key in ("loss", "focal", "dice", *(["mask_grounding", "alignment"] if extra else [])):
        assert [x[key] for x in ddp_log] == pytest.approx([x[key] for x in one_log], rel=1e-5), key
    if extra:
        assert all(x["mask_grounding"] > 0 and x["alignment"] > 0 for x in ddp_log)
    # Adam and clipping are blind to a gradient's scale, so the weights alone cannot tell averaged from
    # summed gradients; the logged pre-clipping norm (model + heads) can: summed would be 2x here.
    assert [x["grad_norm"] for x in ddp_log] == pytest.approx([x["grad_norm"] for x in one_log], rel=1e-4)
    # Weights agree far below one Adam step (lr 1e-3); biases with zero true gradient (attention key
    # biases) get rounding-noise gradients that Adam normalises, hence the absolute tolerance.
    a, b = ckpt["model"], weights(tmp_path / "one" / "last.pt")
    assert all(torch.allclose(a[k], b[k], atol=2e-4, rtol=0) for k in a)
    ha, hb = ckpt["heads"], torch.load(tmp_path / "one" / "last.pt", weights_only=True)["heads"]
    assert ha.keys() == hb.keys() and bool(ha) == bool(extra)
    # A head left un-averaged would take a different Adam step (~lr) on each rank's half batch.
    assert all(torch.allclose(ha[k], hb[k], atol=2e-4, rtol=0) for k in ha)


def test_ddp_mask_grounding_step_without_words(tmp_path_factory, tmp_path):
    """Under DDP, steps whose sentences have no word to mask (empty expressions) train on: the Mask Grounding
    loss is 0 and every head parameter still gets a gradient (DDP, find_unused_parameters off, needs one)."""
    root = write_refer_fixture(tmp_path_factory.mktemp("refer_empty"), texts=("", ""))
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", *refer_args(root, out, "--max-steps", "3", "--val-split", "",
                                                   "--mask-grounding-weight", "0.1")],
                          cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [x["mask_grounding"] for x in log_records(out, "train")] == [0.0, 0.0, 0.0]


def test_grad_norm_is_logged_before_clipping(tmp_path):
    """metrics.jsonl's grad_norm is the norm before clipping: the first step logs the same value with a
    tiny --grad-clip and with clipping off (0), far above that clip."""
    norms = {}
    for clip in ("1e-6", "0"):
        out = tmp_path / f"clip{clip}"
        train.main(shapes_args(out, "--max-steps", "2", "--grad-clip", clip))
        norms[clip] = [x["grad_norm"] for x in log_records(out, "train")]
    assert len(norms["1e-6"]) == len(norms["0"]) == 2
    assert norms["1e-6"][0] == pytest.approx(norms["0"][0], rel=1e-6) and norms["0"][0] > 1e-3


def test_first_step_runs_at_the_first_warmup_learning_rate(tmp_path):
    """The first optimizer step uses lr * LRSchedule(0) (= lr / warm-up steps): Adam's first update moves
    each weight with a clear gradient by that learning rate; the log shows the next step's lr * LRSchedule(1)."""
    out = tmp_path / "run"
    train.main(shapes_args(out, "--max-steps", "1", "--warmup-steps", "4", "--weight-decay", "0"))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    start = maris.build_model(ckpt["config"]).trainable_state_dict()  # the seeded build = the run's start
    moved = max(float((ckpt["model"][k] - start[k]).abs().max()) for k in start)
    assert moved == pytest.approx(1e-3 / 4, rel=1e-3)  # --lr 1e-3 (shapes_args), step 0 of 4 warm-up steps
    assert log_records(out, "train")[0]["lr"] == pytest.approx(1e-3 * 2 / 4)


@pytest.mark.filterwarnings("ignore:MARIS. RANDOM weights")
def test_logged_grad_norm_covers_model_and_heads(tmp_path):
    """The first logged grad_norm is the norm of every trained gradient, MagNet's heads' included,
    recomputed here from the run's first batch."""
    out = tmp_path / "run"
    train.main(shapes_args(out, "--max-steps", "1", "--mask-grounding-weight", "0.1", "--alignment-weight", "0.1"))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    model = maris.build_model(ckpt["config"])
    step = maris.TrainStep(model, maris.build_heads(model.cfg, model)).train()
    ds = data.ShapesDataset("train", image_size=64)
    first = train.epoch_batches(16, batch_size=4, seed=0, epoch=0, rank=0, world=1)[0]  # --train-limit 16
    batch = data.collate_images([ds[i] for i in first])
    inputs, _ = data.batch_image_inputs(batch, device=torch.device("cpu"))
    losses = train.batch_losses(step, batch, inputs, device=torch.device("cpu"), precision="fp32",
                                generator=train.mask_word_generator(0, 0))
    losses["loss"].backward()
    grads = [p.grad.double().flatten() for p in step.parameters() if p.grad is not None]  # fp64: exact enough
    assert any(p.grad is not None for p in step.heads.parameters())
    assert log_records(out, "train")[0]["grad_norm"] == pytest.approx(float(torch.cat(grads).norm()), rel=1e-5)


def test_ddp_trains_ablation_variants_that_leave_modules_out(three_word_root, tmp_path):
    """torchrun with 2 gloo processes trains a model without Language-Guided Attention, learned query embedding
    and Feature Enhancement for 2 steps: no weight is left without a gradient (DDP runs with
    find_unused_parameters off and would stop at the second step)."""
    out = tmp_path / "ddp"
    switches = ["--model-set", "fusion=vga_only", "--model-set", "query_token=sentence",
                "--model-set", "feature_enhancement=false"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", *refer_args(three_word_root, out, "--max-steps", "2", "--val-split", "",
                                                   *switches)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["sampler"]["world_size"] == 2
    cfg = ckpt["config"]
    assert (cfg["fusion"], cfg["query_token"], cfg["feature_enhancement"]) == ("vga_only", "sentence", False)


def test_bad_ablation_switch_is_a_one_line_error():
    """--model-set with an unknown fusion value stops with one line naming the field, the value and the choices."""
    with pytest.raises(SystemExit, match="error: bad model configuration: fusion must be one of mutual, vga_only, "
                                         "lga_only, separate, none; got 'both'") as e:
        train.model_config(train.resolve_options(train.TrainOptions(model_set=["fusion=both"])))
    assert "\n" not in str(e.value)


# --- MagNet's losses and RISAM's adapters ---

def test_magnet_and_adapters_train_on_shapes(tmp_path):
    """--mask-grounding-weight 0.1 --alignment-weight 0.1 --adapters trains on shapes: finite logged
    losses, the adapters change, the encoders do not, the heads are saved beside the model."""
    out = tmp_path / "run"
    result = train.main(shapes_args(out, *ADDONS, "--max-steps", "3"))
    assert result["step"] == 3
    ckpt = torch.load(out / "last.pt", weights_only=True)
    config = ckpt["config"]
    assert config["adapters"] and config["mask_grounding_weight"] == config["alignment_weight"] == 0.1
    initial = maris.build_model(config).trainable_state_dict()  # the seeded build = the run's start
    adapters = [k for k in ckpt["model"] if k.startswith("image_adapters.")]
    assert adapters and set(ckpt["model"]) == set(initial)
    assert not any(k.startswith(("image_encoder.", "text_encoder.")) for k in ckpt["model"])
    # `up` starts at zero and gets a gradient at the first step: every one of them moved.
    assert all(not torch.equal(ckpt["model"][k], initial[k]) for k in adapters if ".up." in k)
    assert {k.partition(".")[0] for k in ckpt["heads"]} == {"mask_grounding", "alignment"}
    records = log_records(out, "train")
    assert len(records) == 3
    assert all(np.isfinite([x["loss"], x["mask_grounding"], x["alignment"]]).all() for x in records)
    assert all(x["mask_grounding"] > 0 for x in records)


# --- image-grouped batches ---

@pytest.mark.filterwarnings("ignore:MARIS. RANDOM weights")
def test_grouped_batch_matches_per_sentence_copies():
    """One training step on an image-grouped batch (collate_images + image_index) gives the loss and
    gradients of the per-sentence batch in which every sentence carries its own copy of the image."""
    cfg = maris.make_config("tiny", image_size=64, mask_grounding_weight=0.1, alignment_weight=0.1)
    model = maris.build_maris(cfg)
    heads = maris.build_heads(cfg, model)
    ds = data.ShapesDataset("train", num_images=2, image_size=64)
    batch = data.collate_images([ds[i] for i in range(len(ds))])
    assert batch["images"].shape[0] == 2 < len(ds)  # several sentences per image
    valid = data.valid_mask(batch["input_size"], 64)

    def step(images, image_index):
        model.zero_grad(set_to_none=True)
        heads.zero_grad(set_to_none=True)
        losses = maris.TrainStep(model, heads)(ids=batch["ids"], word_mask=batch["word_mask"],
                                     masks=batch["mask"], valid=valid, images=images, image_index=image_index,
                                     generator=torch.Generator().manual_seed(0))
        losses["loss"].backward()
        params = [*model.named_parameters(), *heads.named_parameters(prefix="heads")]
        return losses, {n: p.grad.clone() for n, p in params if p.grad is not None}

    grouped, grads = step(batch["images"], batch["image_index"])
    per_sentence, grads_ref = step(batch["images"][batch["image_index"]], None)  # (B, 3, S, S) copies
    for k in grouped:
        assert torch.allclose(grouped[k], per_sentence[k], rtol=1e-5, atol=1e-6), k
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    for k in grads:
        assert torch.allclose(grads[k], grads_ref[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.filterwarnings("ignore:MARIS. RANDOM weights")
def test_step_losses_ignore_the_padding():
    """train.batch_losses (what a training step runs, every add-on on) gives the same losses and gradients
    when the targets in the padded area of each input are flipped: the padding takes no part."""
    cfg = maris.make_config("tiny", image_size=64, mask_grounding_weight=0.1, alignment_weight=0.1)
    model = maris.build_maris(cfg)
    step = maris.TrainStep(model, maris.build_heads(cfg, model)).train()
    ds = data.ShapesDataset("train", num_images=3, image_size=64)
    batch = data.collate_images([ds[i] for i in range(4)])
    valid = data.valid_mask(batch["input_size"], 64)
    assert (~valid).flatten(1).any(1).all()  # every picture is padded (shapes pictures are not square)
    flipped = dict(batch, mask=torch.where(valid, batch["mask"], 1 - batch["mask"]))

    def run(b):
        step.zero_grad(set_to_none=True)
        inputs, _ = data.batch_image_inputs(b, device=torch.device("cpu"))
        losses = train.batch_losses(step, b, inputs, device=torch.device("cpu"), precision="fp32",
                                    generator=torch.Generator().manual_seed(0))
        losses["loss"].backward()
        return losses, {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}

    (losses, grads), (losses_flipped, grads_flipped) = run(batch), run(flipped)
    assert all(torch.equal(losses[k], losses_flipped[k]) for k in losses)
    assert grads.keys() == grads_flipped.keys() and any(k.startswith("heads.") for k in grads)
    assert all(torch.equal(grads[k], grads_flipped[k]) for k in grads)


def test_optimizer_order_is_model_then_heads():
    """build_optimizer lists MARIS's trainable parameters before the MagNet heads' in each group: the
    order optimizer states were saved in, so checkpoints of earlier runs resume."""
    opts = train.resolve_options(train.TrainOptions(preset="tiny", image_size=64, mask_grounding_weight=0.1,
                                                    alignment_weight=0.1))
    model = maris.build_model(train.model_config(opts))
    heads = maris.build_heads(model.cfg, model)
    opt = train.build_optimizer(maris.TrainStep(model, heads), opts)
    for group, keep in zip(opt.param_groups, (lambda p: p.ndim > 1, lambda p: p.ndim <= 1)):
        expected = [p for m in (model, heads) for p in m.parameters() if p.requires_grad and keep(p)]
        assert [id(p) for p in group["params"]] == [id(p) for p in expected]


# --- encoder feature cache ---

def count_encoder_images(monkeypatch) -> list:
    """Patch maris.build_model so every SAM encoder pass appends its image count to the returned list."""
    calls, real = [], maris.build_model

    def build_and_count(*args, **kwargs):
        model = real(*args, **kwargs)
        model.image_encoder.patch_embed.register_forward_hook(lambda m, inputs, out: calls.append(len(inputs[0])))
        return model

    monkeypatch.setattr(maris, "build_model", build_and_count)
    return calls


def test_feature_cache_second_epoch_runs_no_encoder(tmp_path, monkeypatch):
    """With --feature-cache, epoch 1 encodes each image once (train and validation), epoch 2 and its
    validation run SAM's encoder zero times, each frozen encoder's weights are hashed once for the whole run
    (not once per cache opened: the checkpoints' record and the cache share SAM's), and the losses stay finite."""
    calls = count_encoder_images(monkeypatch)
    hashes, real_hash = [], data.state_dict_sha256

    def counted_hash(module):
        hashes.append(type(module).__name__)
        return real_hash(module)

    monkeypatch.setattr(data, "state_dict_sha256", counted_hash)
    out, cache = tmp_path / "run", tmp_path / "cache"
    train.main(shapes_args(out, "--epochs", "2", "--feature-cache", str(cache), "--val-split", "val",
                           "--val-limit", "6"))
    train_images = len(set(data.ShapesDataset("train", num_images=10).image_ids[:16]))
    val_images = len(set(data.ShapesDataset("val", num_images=10).image_ids[:6]))
    epochs = log_records(out, "epoch")
    assert [x["encoded_images"] for x in epochs] == [train_images, 0]
    assert sum(calls) == train_images + val_images  # every picture through the encoder exactly once
    assert len(list((cache / "shapes-train-seed0").glob("*.npy"))) == train_images
    assert len(list((cache / "shapes-val-seed0").glob("*.npy"))) == val_images
    assert all(np.isfinite(x["loss"]) for x in log_records(out, "train"))
    assert len(log_records(out, "eval")) == 2
    assert sorted(hashes) == ["CLIPTextEncoder", "ImageEncoderViT"]


def test_feature_cache_on_refcoco_shares_coco_images(refer_root, tmp_path):
    """On the RefCOCO layout the train and val splits share one cache of COCO pictures by image id."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    train.main(refer_args(refer_root, out, "--epochs", "1", "--feature-cache", str(cache)))
    assert sorted(p.name for p in (cache / "mscoco-train2014").glob("*.npy")) == ["1.npy", "2.npy", "3.npy"]
    assert [x["encoded_images"] for x in log_records(out, "epoch")] == [2]
    assert log_records(out, "eval")[0]["count"] == 6


def test_feature_cache_refuses_adapters(tmp_path):
    """--feature-cache with --adapters stops with a message saying why."""
    with pytest.raises(SystemExit) as e:
        train.main(shapes_args(tmp_path / "run", "--adapters", "--feature-cache", str(tmp_path / "cache"),
                               "--max-steps", "1"))
    assert "--feature-cache cannot be used with --adapters" in str(e.value)


def test_feature_cache_refuses_another_encoder(tmp_path):
    """A cache built with another (random) encoder, here another --seed, is refused, naming the hash;
    --rebuild-feature-cache empties and reuses it."""
    cache = tmp_path / "cache"
    train.main(shapes_args(tmp_path / "a", "--feature-cache", str(cache), "--max-steps", "1"))
    with pytest.raises(SystemExit) as e:
        train.main(shapes_args(tmp_path / "b", "--feature-cache", str(cache), "--max-steps", "1", "--seed", "1"))
    assert "encoder_sha256" in str(e.value) and "--rebuild-feature-cache" in str(e.value)
    result = train.main(shapes_args(tmp_path / "c", "--feature-cache", str(cache), "--max-steps", "1", "--seed", "1",
                                    "--rebuild-feature-cache"))
    assert result["step"] == 1
    assert json.loads((cache / "shapes-train-seed0" / "meta.json").read_text())["image_size"] == 64


@pytest.mark.filterwarnings("ignore:MARIS. RANDOM weights")
def test_fingerprint_covers_encoder_weights_and_settings():
    """The encoder fingerprint changes with the encoder's weights and with its input size, not otherwise."""
    a = maris.build_maris(maris.make_config("tiny", image_size=64))
    b = maris.build_maris(maris.make_config("tiny", image_size=64, maa_depth=1))  # same encoder, other head
    c = maris.build_maris(maris.make_config("tiny", image_size=64, init_seed=1))
    d = maris.build_maris(maris.make_config("tiny", image_size=32))
    fa, fb, fc, fd = (data.encoder_fingerprint(m, "shapes-train-seed0") for m in (a, b, c, d))
    assert fa == fb
    assert fa["encoder_sha256"] != fc["encoder_sha256"] and fa["image_size"] != fd["image_size"]


# --- end to end: train, save, resume, evaluate through the command-line entry points ---

def _train_resume_evaluate(root, tmp_path, capsys):
    out = tmp_path / "run"
    first = train.main(refer_args(root, out, "--max-steps", "2"))
    assert first["step"] == 2 and (out / "last.pt").is_file()
    second = train.main(["--resume", "auto", "--out-dir", str(out), "--dataset", "refcoco", "--max-steps", "4",
                         "--no-progress"])
    assert second["step"] == 4
    capsys.readouterr()
    results = evaluate.main(["--ckpt", str(out / "last.pt"), "--split", "val,testA", "--split", "testB",
                             "--no-progress", "--vis", "1", "--out-dir", str(tmp_path / "eval")])
    printed = capsys.readouterr().out
    assert list(results) == ["val", "testA", "testB"]
    for split, m in results.items():
        assert m["count"] > 0 and 0.0 <= m["oIoU"] <= 1.0 and split in printed
    report = json.loads((tmp_path / "eval" / "eval_refcoco_unc.json").read_text())
    assert report["protocol"]["eval_size"] is None and set(report["results"]) == {"val", "testA", "testB"}
    assert len(list((tmp_path / "eval" / "vis").rglob("*.png"))) == 3
    return results


def test_end_to_end_refcoco_mini(tmp_path, capsys):
    """Train on the real-format refcoco-mini (unc train), resume, and score val/testA/testB."""
    root = shared_path("refcoco-mini")
    results = _train_resume_evaluate(root, tmp_path, capsys)
    assert [results[s]["count"] for s in ("val", "testA", "testB")] == [6, 6, 6]


def test_end_to_end_refer_fixture(refer_root, tmp_path, capsys):
    """The same train / resume / evaluate path on the self-written refer-layout fixture."""
    results = _train_resume_evaluate(refer_root, tmp_path, capsys)
    assert [results[s]["count"] for s in ("val", "testA", "testB")] == [6, 6, 6]


# --- the shapes demo: training scenes, timing ---

def test_train_scenes_sets_the_shapes_training_split(tmp_path):
    """--train-scenes N trains on the first N generated scenes: one epoch is len(those items) // batch steps."""
    expected = len(data.ShapesDataset("train", num_images=3, load_images=False)) // 4
    out = tmp_path / "run"
    result = train.main(shapes_args(out, "--train-limit", "0", "--train-scenes", "3", "--epochs", "1",
                                    "--max-steps", "40"))
    assert 0 < expected < 40 and result["step"] == expected
    assert torch.load(out / "last.pt", weights_only=True)["options"]["train_scenes"] == 3


def test_train_scenes_is_refused_for_refcoco(tmp_path):
    """--train-scenes with a RefCOCO-family dataset stops with a one-line error naming the option."""
    with pytest.raises(SystemExit, match="--train-scenes is for the generated shapes datasets, not refcoco"):
        train.main(["--dataset", "refcoco", "--data-root", str(tmp_path), "--train-scenes", "10", *TINY])


def test_run_reports_training_and_validation_time(tmp_path, capsys, monkeypatch):
    """The run prints and returns its wall time split into training and validation (validation slowed by 0.3 s
    per pass here, so the split is checked), and its process CPU time."""
    score = train.evaluate_model

    def slow_score(*args, **kw):
        time.sleep(0.3)
        return score(*args, **kw)
    monkeypatch.setattr(train, "evaluate_model", slow_score)
    result = train.main(shapes_args(tmp_path / "run", "--val-split", "val", "--val-limit", "4", "--epochs", "2"))
    seconds = result["seconds"]
    assert seconds["validation"] >= 0.6  # two passes, one per epoch
    assert seconds["train"] == pytest.approx(seconds["total"] - seconds["validation"], abs=0.02)
    assert 0 < seconds["train"] < seconds["total"] - 0.6 + 0.02 and seconds["cpu"] > 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("time:")]
    assert len(line) == 1
    assert f"training {seconds['train']:.1f} s + validation {seconds['validation']:.1f} s (2 passes over 4 pairs)" \
        in line[0]


# --- GPU ---

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_overfits_one_batch(refer_root):
    """On the GPU in bf16, the tiny preset overfits one real-format batch (IoU > 0.8 on it)."""
    import data
    torch.manual_seed(0)
    device = torch.device("cuda")
    ds = data.build_dataset("refcoco", "train", root=refer_root, image_size=64)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    model = maris.build_model(maris.config_to_dict(maris.make_config("tiny", image_size=64))).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    images, ids, wm = batch["image"].to(device), batch["ids"].to(device), batch["word_mask"].to(device)
    masks = batch["mask"].to(device)
    valid = train.data.valid_mask(batch["input_size"], 64).to(device)
    for _ in range(200):
        with maris.autocast(device, "auto"):
            logits = model(images, ids, wm)
        loss = maris.segmentation_loss(logits.float(), masks, valid, model.cfg)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad(), maris.autocast(device, "auto"):
        logits = model(images, ids, wm)
    preds = evaluate.logits_to_masks(logits, batch["input_size"], batch["orig_size"], size=64)
    m = evaluate.RISMetrics()
    for b, pred in enumerate(preds):
        m.update(*evaluate.intersection_union(pred.cpu(), torch.from_numpy(ds.original_mask(b))))
    assert m.compute()["mIoU"] > 0.8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_train_evaluate_and_cache_end_to_end(tmp_path):
    """On the GPU (bf16 autocast): training with every add-on, training from the feature cache, and
    evaluate.py on the result all run, with finite losses and every pair scored."""
    addons = train.main(shapes_args(tmp_path / "addons", *ADDONS, "--max-steps", "3", "--device", "cuda"))
    assert addons["step"] == 3
    cache = tmp_path / "cache"
    cached = train.main(shapes_args(tmp_path / "cached", "--feature-cache", str(cache), "--max-steps", "3",
                                    "--device", "cuda"))
    assert cached["step"] == 3 and any(cache.rglob("*.npy"))
    logged = [json.loads(x) for x in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x["loss"]) for x in logged if x["kind"] == "train")
    results = evaluate.main(["--ckpt", str(tmp_path / "cached" / "last.pt"), "--split", "val", "--device", "cuda",
                             "--no-progress", "--feature-cache", str(cache), "--out-dir", str(tmp_path / "eval")])
    assert results["val"]["count"] > 0 and 0 <= results["val"]["oIoU"] <= 1


# --- SAM's attention through scaled_dot_product_attention ---

@pytest.mark.parametrize("value", ["sdpa", '"sdpa"'])
def test_model_set_sam_attention_reaches_the_model_and_the_checkpoint(tmp_path, value):
    """`--model-set sam_attention=sdpa` (bare or JSON-quoted) trains with the SDPA attention and the
    checkpoint's config carries it, so a model rebuilt from that config uses it again."""
    out = tmp_path / "run"
    built = []
    real = maris.set_sam_attention
    with pytest.MonkeyPatch.context() as mp:  # record the kind every model of the run is built with
        mp.setattr(maris, "set_sam_attention", lambda encoder, kind: built.append(kind) or real(encoder, kind))
        train.main(shapes_args(out, "--max-steps", "1", "--model-set", f"sam_attention={value}"))
    assert built and set(built) == {"sdpa"}
    config = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["config"]
    assert config["sam_attention"] == "sdpa"
    assert maris.get_sam_attention(maris.MARIS(maris.config_from_dict(config)).image_encoder) == "sdpa"


def test_model_set_rejects_an_unknown_sam_attention(tmp_path):
    """An unknown --model-set sam_attention value stops train.py with a one-line error naming it."""
    with pytest.raises(SystemExit, match="sam_attention must be one of stock, sdpa; got 'flash'"):
        train.main(shapes_args(tmp_path / "run", "--max-steps", "1", "--model-set", "sam_attention=flash"))

# --- generalized RIS: shapes-gres, gRefCOCO, PhraseCut ---

def gres_args(out, *extra):
    """A short shapes-gres run: 16 training items, batch 4, no validation."""
    return ["--dataset", "shapes-gres", *shapes_args(out, *extra)]


@pytest.fixture
def few_scenes(monkeypatch):
    """Shapes splits of 12 scenes (the same first scenes, built in a fraction of the time of 1000)."""
    for split in data.SHAPES_NUM_IMAGES:
        monkeypatch.setitem(data.SHAPES_NUM_IMAGES, split, 12)


def _previous_batch_losses(runner, batch, inputs, *, device, precision, generator=None, no_target=False):
    """train.batch_losses as it was before the no-target head existed (it never passed labels)."""
    masks = batch["mask"].to(device)
    valid = data.valid_mask(batch["input_size"], masks.shape[-1]).to(device)
    with maris.autocast(device, precision):
        return runner(ids=batch["ids"].to(device), word_mask=batch["word_mask"].to(device), masks=masks,
                      valid=valid, generator=generator, **inputs)


@pytest.mark.parametrize("dataset,weight", [("shapes", 0.0), ("shapes-gres", 0.1), ("refcoco", 0.0),
                                            ("refcoco+", 0.0), ("refcocog", 0.0), ("grefcoco", 0.1),
                                            ("phrasecut", 0.0)])
def test_no_target_weight_is_on_only_where_expressions_can_refer_to_nothing(dataset, weight):
    """--no-target-weight defaults to 0.1 for grefcoco and shapes-gres, 0 elsewhere; an explicit value wins."""
    assert train.resolve_options(train.TrainOptions(dataset=dataset)).no_target_weight == weight
    assert train.resolve_options(train.TrainOptions(dataset=dataset, no_target_weight=0.5)).no_target_weight == 0.5


def test_refcoco_training_is_bit_identical_to_the_code_before_the_no_target_head(refer_root, tmp_path, monkeypatch):
    """A RefCOCO run gives the weights, optimizer state and logged losses of the previous code path (no
    no-target labels passed), bit for bit, and builds, logs and stores no no-target head."""
    now = train.main(refer_args(refer_root, tmp_path / "now", "--max-steps", "3", "--val-split", ""))
    monkeypatch.setattr(train, "batch_losses", _previous_batch_losses)
    before = train.main(refer_args(refer_root, tmp_path / "before", "--max-steps", "3", "--val-split", ""))
    assert now["step"] == before["step"] == 3
    a, b = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("now", "before"))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not any("no_target" in k for k in a["model"]) and a["config"]["no_target_weight"] == 0.0
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    logged = [log_records(tmp_path / run, "train") for run in ("now", "before")]
    drop = ("seconds", "items_per_s", "run")  # run: a random id per run
    assert [{k: v for k, v in x.items() if k not in drop} for x in logged[0]] == \
        [{k: v for k, v in x.items() if k not in drop} for x in logged[1]]
    assert all("no_target" not in x for x in logged[0])


def test_no_target_labels_reach_the_train_step_only_with_the_head(tmp_path, monkeypatch, few_scenes):
    """With the head on (shapes-gres default), every step's TrainStep gets the batch's no_target labels;
    with --no-target-weight 0 it gets none and no head is built."""
    seen, real = [], maris.TrainStep.forward

    def recording(self, **kwargs):
        seen.append(kwargs.get("no_target"))
        return real(self, **kwargs)

    monkeypatch.setattr(maris.TrainStep, "forward", recording)
    train.main(gres_args(tmp_path / "on", "--max-steps", "4"))
    ds = data.ShapesGresDataset("train", image_size=64)
    batches = train.epoch_batches(16, batch_size=4, seed=0, epoch=0, rank=0, world=1)  # --train-limit 16
    assert [x.tolist() for x in seen] == [[ds.no_target[i] for i in b] for b in batches]
    assert any(any(b) for b in (x.tolist() for x in seen))  # the first 16 items hold no-target expressions
    seen.clear()
    train.main(gres_args(tmp_path / "off", "--max-steps", "2", "--no-target-weight", "0"))
    assert seen == [None, None]
    ckpt = torch.load(tmp_path / "off" / "last.pt", weights_only=True)
    assert not any(k.startswith("no_target_head.") for k in ckpt["model"])


@pytest.mark.filterwarnings("ignore:MARIS. RANDOM weights")
def test_shapes_gres_logs_the_no_target_bce_of_the_first_batch(tmp_path, few_scenes):
    """metrics.jsonl logs "no_target" beside the other losses: at step 1 it is the head's BCE on the first
    batch, recomputed here from the seeded initial model; the head is stored in the checkpoint."""
    out = tmp_path / "run"
    train.main(gres_args(out, "--max-steps", "2"))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["config"]["no_target_weight"] == 0.1 and any(k.startswith("no_target_head.") for k in ckpt["model"])
    model = maris.build_model(ckpt["config"])  # the seeded build = the run's start
    step = maris.TrainStep(model, maris.build_heads(model.cfg, model)).train()
    ds = data.ShapesGresDataset("train", image_size=64)
    first = train.epoch_batches(16, batch_size=4, seed=0, epoch=0, rank=0, world=1)[0]
    batch = data.collate_images([ds[i] for i in first])
    inputs, _ = data.batch_image_inputs(batch, device=torch.device("cpu"))
    with torch.no_grad():
        losses = train.batch_losses(step, batch, inputs, device=torch.device("cpu"), precision="fp32",
                                    no_target=True)
    records = log_records(out, "train")
    assert {"loss", "focal", "dice", "no_target"} <= set(records[0]) and "alignment" not in records[0]
    assert all(math.isfinite(x["no_target"]) for x in records)
    assert records[0]["no_target"] == pytest.approx(float(losses["no_target"]), rel=1e-5)
    assert records[0]["loss"] == pytest.approx(float(losses["loss"]), rel=1e-5)


@pytest.mark.filterwarnings("ignore:MARIS. RANDOM weights")
def test_all_empty_ground_truths_give_finite_losses_and_gradients():
    """A batch of no-target expressions only (all-zero masks) gives finite focal, dice, no-target BCE and
    MagNet losses and finite gradients through a train step (dice smoothing; MagNet skips maskless samples)."""
    cfg = maris.make_config("tiny", image_size=64, no_target_weight=0.1, mask_grounding_weight=0.1,
                            alignment_weight=0.1)
    model = maris.build_maris(cfg)
    step = maris.TrainStep(model, maris.build_heads(cfg, model)).train()
    ds = data.ShapesGresDataset("train", num_images=6, image_size=64)
    empty = [i for i in range(len(ds)) if ds.no_target[i]][:4]
    batch = data.collate_images([ds[i] for i in empty])
    assert len(empty) == 4 and batch["mask"].sum() == 0 and batch["no_target"].all()
    inputs, _ = data.batch_image_inputs(batch, device=torch.device("cpu"))
    losses = train.batch_losses(step, batch, inputs, device=torch.device("cpu"), precision="fp32",
                                generator=train.mask_word_generator(0, 0), no_target=True)
    assert all(math.isfinite(float(v.detach())) for v in losses.values()) and float(losses["no_target"].detach()) > 0
    losses["loss"].backward()
    grads = [p.grad for p in step.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.no_target_head.layers[0].weight.grad.abs().sum() > 0


class _FakeValidation:
    """evaluate_model's stand-in: returns the next of `scores` (dicts of the metric set's keys)."""

    def __init__(self, scores):
        self.scores, self.calls = list(scores), []

    def __call__(self, model, dataset, **kwargs):
        self.calls.append(kwargs["scoring"])
        return self.scores.pop(0)


@pytest.mark.parametrize("dataset,chosen", [("shapes", "oIoU"), ("shapes-gres", "gIoU")])
def test_best_checkpoint_follows_the_validation_metric(tmp_path, monkeypatch, capsys, few_scenes, dataset, chosen):
    """best.pt keeps the epoch whose validation metric (oIoU for shapes, gIoU for shapes-gres) is highest,
    even where the other numbers say otherwise; each validation prints the metric set's numbers."""
    nan = float("nan")
    if chosen == "gIoU":  # epoch 2 has the better gIoU, epoch 1 the better cIoU
        scores = [dict(gIoU=0.3, cIoU=0.6, **{"N-acc": 0.1, "T-acc": 0.9}, count=5),
                  dict(gIoU=0.5, cIoU=0.2, **{"N-acc": nan, "T-acc": 0.5}, count=5),
                  dict(gIoU=0.4, cIoU=0.7, **{"N-acc": 0.9, "T-acc": 0.9}, count=5)]
    else:
        scores = [dict(oIoU=0.3, mIoU=0.6, **{"Prec@0.5": 0.9}, count=5),
                  dict(oIoU=0.5, mIoU=0.2, **{"Prec@0.5": 0.1}, count=5),
                  dict(oIoU=0.4, mIoU=0.7, **{"Prec@0.5": 0.9}, count=5)]
    fake = _FakeValidation(scores)
    monkeypatch.setattr(train, "evaluate_model", fake)
    out = tmp_path / "run"
    result = train.main(["--dataset", dataset, *shapes_args(out, "--epochs", "3", "--val-split", "val",
                                                               "--train-limit", "8")])
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["step"] == 4 and best["best_metric"] == chosen and best["best"] == 0.5  # epoch 2 of 2-step epochs
    assert (result["best_metric"], result["best"]) == (chosen, 0.5)
    assert [s.metrics for s in fake.calls] == [evaluate.metric_set(dataset)] * 3
    printed = capsys.readouterr().out
    for name in train.VAL_PRINTED[evaluate.metric_set(dataset)]:
        assert f" {name} " in printed
    if chosen == "gIoU":
        assert "N-acc -" in printed and "no target by the head rule" in printed and fake.calls[0].nt_rule == "head"
        assert "best val gIoU 50.00" in printed
    # Resumed for a 4th epoch that scores below the best: best.pt stays the epoch-2 checkpoint.
    fake.scores = [dict(scores[0], **{chosen: 0.45})]
    resumed = train.main(["--resume", "auto", "--out-dir", str(out), "--epochs", "4", "--no-progress"])
    assert (resumed["step"], resumed["best"]) == (8, 0.5)
    assert torch.load(out / "best.pt", weights_only=True)["step"] == 4


@pytest.mark.parametrize("extra", [["--sentences-per-image", "2", "--mask-grounding-weight", "0.1",
                                    "--alignment-weight", "0.1", "--feature-cache", "CACHE"], ["--adapters"]],
                         ids=["grouped+cache+magnet", "adapters"])
def test_grefcoco_resume_is_bit_identical(tmp_path, extra):
    """On a gRefCOCO layout (written here), with the no-target head and image-grouped batches, the feature
    cache and MagNet's losses, or with RISAM's adapters: 2 steps + resume + 2 steps = 4 straight steps."""
    from test_data import _write_gref
    root, _, _ = _write_gref(tmp_path / "g")
    extra = [str(tmp_path / "cache") if x == "CACHE" else x for x in extra]
    common = ["--dataset", "grefcoco", "--data-root", str(root), "--batch-size", "2", "--lr", "1e-3",
              "--warmup-steps", "2", "--val-split", "", *TINY, *extra]
    train.main([*common, "--out-dir", str(tmp_path / "straight"), "--max-steps", "4"])
    train.main([*common, "--out-dir", str(tmp_path / "resumed"), "--max-steps", "2"])
    train.main(["--resume", "auto", "--out-dir", str(tmp_path / "resumed"), "--dataset", "grefcoco",
                "--max-steps", "4", "--no-progress"])
    a, b = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("straight", "resumed"))
    assert a["step"] == b["step"] == 4 and any(k.startswith("no_target_head.") for k in a["model"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["heads"].keys() == b["heads"].keys() and all(torch.equal(a["heads"][k], b["heads"][k]) for k in a["heads"])
    la, lb = log_records(tmp_path / "straight", "train"), log_records(tmp_path / "resumed", "train")
    assert [x["no_target"] for x in la] == [x["no_target"] for x in lb]


def test_ddp_with_the_no_target_head_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes, batch 2 each, on a gRefCOCO layout gives the no-target BCE, the losses
    and the head's weights of 1 process with batch 4 (the head is averaged over the ranks like the rest)."""
    from test_data import _write_gref
    root, _, _ = _write_gref(tmp_path / "g")  # 6 training sentences, one of them no-target: 1 step per epoch
    common = ["--dataset", "grefcoco", "--data-root", str(root), "--max-steps", "3", "--val-split", "", *TINY,
              "--lr", "1e-3", "--warmup-steps", "1"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", "--batch-size", "2", "--out-dir", str(tmp_path / "ddp"), *common],
                          cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    train.main(["--batch-size", "4", "--out-dir", str(tmp_path / "one"), *common])
    ddp_log, one_log = log_records(tmp_path / "ddp", "train"), log_records(tmp_path / "one", "train")
    for key in ("loss", "focal", "dice", "no_target", "grad_norm"):
        assert [x[key] for x in ddp_log] == pytest.approx([x[key] for x in one_log], rel=1e-4), key
    a, b = (torch.load(tmp_path / run / "last.pt", weights_only=True)["model"] for run in ("ddp", "one"))
    head = [k for k in a if k.startswith("no_target_head.")]
    assert head and all(torch.allclose(a[k], b[k], atol=2e-4, rtol=0) for k in a)


def _gres_train_evaluate(root, tmp_path, capsys):
    """Train 2 steps on a gRefCOCO layout with validation, then score val, testA and testB with the head
    rule (default) and with the empty-mask rule; returns the head run's results and JSON report."""
    out = tmp_path / "run"
    result = train.main(["--dataset", "grefcoco", "--data-root", str(root), "--out-dir", str(out), "--batch-size",
                         "2", "--max-steps", "2", "--lr", "1e-3", "--warmup-steps", "1", *TINY])
    assert result["step"] == 2 and result["best_metric"] == "gIoU"
    printed = capsys.readouterr().out
    assert all(f" {k} " in printed for k in ("gIoU", "cIoU", "N-acc", "T-acc"))
    evals = log_records(out, "eval")
    assert evals and {"gIoU", "cIoU", "N-acc", "T-acc", "count_no_target"} <= set(evals[0])
    results = evaluate.main(["--ckpt", str(out / "last.pt"), "--no-progress", "--out-dir", str(tmp_path / "e")])
    report = json.loads((tmp_path / "e" / "eval_grefcoco_unc.json").read_text())
    assert list(results) == ["val", "testA", "testB"]
    assert report["protocol"]["no_target_rule"].startswith("no-target head")
    assert report["unit"] == "percent" and report["trained_on"]["dataset"] == "grefcoco"
    for split, m in results.items():
        for key in evaluate.METRIC_COLUMNS["gres"]:
            value = report["results"][split][key]
            assert (value is None and m[key] is None) or value == pytest.approx(100 * m[key]), (split, key)
    evaluate.main(["--ckpt", str(out / "last.pt"), "--no-progress", "--out-dir", str(tmp_path / "e2"),
                   "--nt-rule", "empty-mask", "--split", "val"])
    empty = json.loads((tmp_path / "e2" / "eval_grefcoco_unc.json").read_text())
    assert empty["protocol"]["no_target_rule"].startswith("empty-mask rule")
    return results, report


def test_end_to_end_grefcoco_mini(tmp_path, capsys):
    """Train on the real-format grefcoco-mini with validation, score val/testA/testB with both rules."""
    results, report = _gres_train_evaluate(shared_path("grefcoco-mini"), tmp_path, capsys)
    assert [(results[s]["count"], results[s]["count_no_target"]) for s in ("val", "testA", "testB")] == \
        [(13, 3), (13, 2), (12, 2)]


def test_end_to_end_gref_fixture(tmp_path, capsys):
    """The same gRefCOCO train / evaluate path on a layout written here (a fresh clone has no ../shared)."""
    from test_data import _write_gref
    root, _, _ = _write_gref(tmp_path / "g")
    results, _ = _gres_train_evaluate(root, tmp_path, capsys)
    assert [(results[s]["count"], results[s]["count_no_target"]) for s in ("val", "testA", "testB")] == \
        [(1, 0), (1, 0), (1, 1)]
    assert results["val"]["N-acc"] is None and results["testB"]["T-acc"] is None  # undefined, not 0


def test_phrasecut_trains_and_keeps_the_best_miou(tmp_path, capsys):
    """--dataset phrasecut trains (every task has a target: no head by default) and validates with
    PhraseCut's mIoU / cumIoU / Acc@X, best.pt by mIoU; on a VGPhraseCut_v0 layout written here."""
    from test_data import _write_phrasecut
    folder = _write_phrasecut(tmp_path / "p", mismatched=False)
    info = json.loads((folder / "image_data_split.json").read_text())
    for entry in info:
        entry["split"] = {"test": "train"}.get(entry["split"], entry["split"])  # images 11, 12 train; 13 val
    (folder / "image_data_split.json").write_text(json.dumps(info))
    (folder / "refer_train.json").write_text((folder / "refer_test.json").read_text())
    out = tmp_path / "run"
    result = train.main(["--dataset", "phrasecut", "--data-root", str(folder.parent), "--out-dir", str(out),
                         "--batch-size", "1", "--max-steps", "3", "--lr", "1e-3", "--warmup-steps", "1", *TINY])
    assert result["best_metric"] == "mIoU" and result["val"]["count"] == 1
    assert " mIoU " in capsys.readouterr().out and set(log_records(out, "eval")[0]) >= {"mIoU", "cumIoU", "Acc@0.5"}
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["config"]["no_target_weight"] == 0.0 and ckpt["best_metric"] == "mIoU"
    assert all("no_target" not in x for x in log_records(out, "train"))
# --- protecting runs: one run per folder, one writer, periodic last.pt, a faithful metrics.jsonl ---

def all_records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def quick_args(root, out, *extra):
    """A short run on the refer-layout fixture without validation (6 steps per epoch)."""
    return refer_args(root, out, "--val-split", "", *extra)


def test_rerun_into_a_run_folder_is_refused_and_overwrite_replaces_it(refer_root, tmp_path):
    """A new run into a folder that holds one stops before writing anything; --resume auto continues it;
    --overwrite starts over: the old files are gone and metrics.jsonl holds only the new run."""
    out = tmp_path / "run"
    train.main(quick_args(refer_root, out, "--max-steps", "1"))
    before = {name: (out / name).read_bytes() for name in ("last.pt", "metrics.jsonl")}
    with pytest.raises(SystemExit) as e:
        train.main(quick_args(refer_root, out, "--max-steps", "2"))
    assert str(e.value) == (f"error: run folder {out} already holds a run (last.pt, metrics.jsonl): expected "
                            f"another --out-dir, --resume auto to continue it, or --overwrite to replace it")
    assert {name: (out / name).read_bytes() for name in before} == before
    (out / "best.pt").write_bytes(b"an old run's best")
    result = train.main(quick_args(refer_root, out, "--max-steps", "2", "--overwrite"))
    assert result["step"] == 2 and not (out / "best.pt").exists()  # no validation: nothing re-creates it
    records = all_records(out)
    assert len({r["run"] for r in records}) == 1 and [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert train.main(["--resume", "auto", "--out-dir", str(out), "--max-steps", "3", "--no-progress"])["step"] == 3


def test_second_writer_is_refused_while_the_first_holds_the_lock(refer_root, tmp_path, monkeypatch):
    """While a training runs, a second one into its folder (even with --overwrite) is refused with a message
    naming the holder's process; once the first ends the folder is free."""
    out = tmp_path / "run"
    real, refused = maris.segmentation_loss, []

    def loss_and_second_writer(*args, **kwargs):
        if not refused:
            with pytest.raises(SystemExit) as e:
                train.main(quick_args(refer_root, out, "--max-steps", "1", "--overwrite"))
            refused.append(str(e.value))
        return real(*args, **kwargs)

    monkeypatch.setattr(maris, "segmentation_loss", loss_and_second_writer)
    assert train.main(quick_args(refer_root, out, "--max-steps", "2"))["step"] == 2
    holder = (out / "train.lock").read_text().strip()
    assert holder.startswith(f"pid {os.getpid()} on ")
    assert refused == [f"error: run folder {out} is in use by another training ({holder} holds {out / 'train.lock'}): "
                       f"expected one training per folder; wait for it to end or pick another --out-dir"]
    monkeypatch.undo()
    assert train.main(["--resume", "auto", "--out-dir", str(out), "--max-steps", "3", "--no-progress"])["step"] == 3


def _complete_records(out) -> list[dict]:
    """metrics.jsonl's complete lines (a process stopped mid-write may leave a partial last line)."""
    text = (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]


def test_kill_9_loses_at_most_the_save_interval_and_the_log_stays_faithful(refer_root, tmp_path, capsys):
    """A run killed with SIGKILL mid-epoch, after --save-minutes passed and more steps were logged, resumes from
    the step of its time-based save despite the lock its process held; metrics.jsonl then has each step once
    per kind, non-decreasing seconds, one run id and two sessions: the records after the checkpoint dropped."""
    import time
    out = tmp_path / "run"
    # 6 steps per epoch; last.pt every 0.12 s of training (--save-minutes 0.002), also mid-epoch.
    args = quick_args(refer_root, out, "--epochs", "1000", "--save-minutes", "0.002")
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    saved = None
    try:
        deadline = time.time() + 120
        while saved is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
            proc.send_signal(signal.SIGSTOP)  # freeze it, look, then kill it or let it go on
            logged = [r["step"] for r in _complete_records(out) if r["kind"] == "train"]
            step = torch.load(out / "last.pt", weights_only=True)["step"] if (out / "last.pt").exists() else 0
            if step % 6 and logged and logged[-1] > step:  # a mid-epoch (time-based) save, steps logged after it
                proc.send_signal(signal.SIGKILL)
                saved = step
            else:
                proc.send_signal(signal.SIGCONT)
        proc.wait(timeout=60)
        assert saved is not None, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert (out / "train.lock").is_file()  # the killed process's lock file is left behind
    killed_records = len(_complete_records(out))
    capsys.readouterr()
    result = train.main(["--resume", "auto", "--out-dir", str(out), "--max-steps", str(saved + 3), "--no-progress"])
    assert f"resumed from {out / 'last.pt'}: step {saved}," in capsys.readouterr().out
    assert result["step"] == saved + 3
    records = all_records(out)
    for kind in ("train", "epoch", "start"):
        steps = [r["step"] for r in records if r["kind"] == kind]
        assert steps == sorted(set(steps)), kind  # strictly increasing: no step twice
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, saved + 4))
    seconds = [r["seconds"] for r in records]
    assert seconds == sorted(seconds)
    assert len({r["run"] for r in records}) == 1
    assert [r["session"] for r in records] == sorted(r["session"] for r in records)
    starts = [r for r in records if r["kind"] == "start"]
    assert [(s["session"], s["step"], s["resumed_from"]) for s in starts] == [(1, 0, None),
                                                                           (2, saved, str(out / "last.pt"))]
    kept = sum(r["session"] == 1 for r in records)
    assert starts[1]["dropped_records"] >= killed_records - kept >= 1
    assert all(r["step"] <= saved for r in records if r["session"] == 1)


def test_a_lock_file_of_a_dead_process_does_not_block(refer_root, tmp_path):
    """A train.lock left behind (its flock released with the process) neither blocks a resume nor a new run."""
    out = tmp_path / "run"
    train.main(quick_args(refer_root, out, "--max-steps", "1"))
    (out / "train.lock").write_text("pid 999999999 on elsewhere since 2020-01-01 00:00:00\n")
    assert train.main(["--resume", "auto", "--out-dir", str(out), "--max-steps", "2", "--no-progress"])["step"] == 2
    assert f"pid {os.getpid()}" in (out / "train.lock").read_text()


def test_one_epoch_convention_for_every_record(refer_root, tmp_path):
    """train, epoch and eval records of a step carry the same 1-based epoch: the last step of epoch e says e."""
    out = tmp_path / "run"
    train.main(refer_args(refer_root, out, "--epochs", "2", "--log-every", "3"))
    by_step = {}
    for r in all_records(out):
        by_step.setdefault(r["step"], set()).add(r["epoch"])
    assert by_step == {0: {0}, 3: {1}, 6: {1}, 9: {2}, 12: {2}}  # 6 steps per epoch
    assert [r["kind"] for r in all_records(out) if r["step"] == 6] == ["train", "epoch", "eval"]


def test_resumed_finished_run_does_not_score_its_last_step_again(refer_root, tmp_path):
    """Resuming a finished run (nothing left to train) adds no second eval record of the same step."""
    out = tmp_path / "run"
    train.main(refer_args(refer_root, out, "--epochs", "1"))
    train.main(["--resume", "auto", "--out-dir", str(out), "--no-progress"])
    assert [r["step"] for r in all_records(out) if r["kind"] == "eval"] == [6]


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--epochs", "0"), ("--epochs", "-1"),
                                        ("--max-steps", "-1"), ("--workers", "-2"), ("--lr", "0"), ("--lr", "inf"),
                                        ("--mask-ratio", "0"), ("--mask-ratio", "1.5"), ("--grad-clip", "-1"),
                                        ("--log-every", "0"), ("--save-minutes", "-1"), ("--seed", "-1"),
                                        ("--image-size", "0"), ("--sentences-per-image", "0"), ("--train-scenes", "0"),
                                        ("--device", "tpu:x"), ("--device", "cuda")])
def test_bad_option_values_fail_at_parse_time_in_one_line(flag, value, tmp_path, capsys):
    """An unusable option value exits (code 2) with `error: <flag> <value>: expected ...` and writes nothing."""
    if value == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        train.main(["--out-dir", str(tmp_path / "run"), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {flag} ") and ": expected " in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut", "random"], ids=["empty", "cut", "random"])
def test_bad_resume_checkpoint_is_one_line(content, tmp_path):
    """An empty, cut-short or random-bytes --resume file exits with one line naming it; nothing is written."""
    path = tmp_path / "bad.pt"
    path.write_bytes(np.random.default_rng(0).bytes(3000) if content == "random" else content)
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(path), "--out-dir", str(tmp_path / "run")])
    assert str(e.value.code).startswith(f"error: checkpoint {path} ") and "\n" not in str(e.value.code)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag,what", [("--sam-checkpoint", "SAM"), ("--clip-checkpoint", "CLIP")])
def test_bad_encoder_file_is_one_line(flag, what, refer_root, tmp_path):
    """A --sam-checkpoint / --clip-checkpoint that is no weight file exits with one line naming it."""
    bad = tmp_path / "weights.pth"
    bad.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(SystemExit) as e:
        train.main(quick_args(refer_root, tmp_path / "run", "--max-steps", "1", flag, str(bad)))
    assert str(e.value.code).startswith(f"error: {what} checkpoint {bad} is not a readable weight file")
    assert "weights_only" not in str(e.value.code) and not (tmp_path / "run" / "last.pt").exists()


def test_disk_full_while_saving_names_the_cause_and_keeps_the_previous_checkpoint(refer_root, tmp_path,
                                                                                    monkeypatch):
    """A save that hits a full disk (ENOSPC) stops with one line naming the file and the cause; the previous
    last.pt stays intact and no temporary file is left."""
    import errno
    real, calls = torch.save, []

    def save_until_disk_full(obj, f):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"part of a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f)

    monkeypatch.setattr(torch, "save", save_until_disk_full)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(quick_args(refer_root, out, "--max-steps", "3", "--save-every", "1"))
    assert str(e.value.code) == (f"error: cannot write checkpoint {out / 'last.pt'}: No space left on device "
                                 f"(errno 28); the previous last.pt is intact")
    monkeypatch.undo()
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "metrics.jsonl", "train.lock"]


def test_checkpoint_records_the_encoder_hashes_and_resume_checks_them(refer_root, tmp_path):
    """last.pt holds each frozen encoder's file (None: random) and weight sha256; resuming with other CLIP
    weights is refused in one line naming the file as an override."""
    out = tmp_path / "run"
    train.main(quick_args(refer_root, out, "--max-steps", "1"))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    model = maris.build_model(ckpt["config"])  # the seeded build: the run's random encoders
    assert ckpt["encoders"] == {"sam": {"file": None, "sha256": data.state_dict_sha256(model.image_encoder)},
                                "clip": {"file": None, "sha256": data.state_dict_sha256(model.text_encoder)}}
    other = tmp_path / "clip.pt"
    torch.save({k: v + 0.01 for k, v in model.text_encoder.state_dict().items()}, other)
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", "auto", "--out-dir", str(out), "--clip-checkpoint", str(other), "--no-progress"])
    assert f"--clip-checkpoint {other} holds other CLIP text tower weights" in str(e.value.code)


# --- Training curves: curves.png and TensorBoard scalars ---

def _has_tensorboard() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def curves_run(tmp_path_factory):
    """A real 2-epoch tiny run (validation after each epoch), with --tensorboard when the package is present."""
    out = tmp_path_factory.mktemp("curves")
    train.main([*TINY, "--train-limit", "48", "--val-limit", "8", "--epochs", "2", "--batch-size", "4",
                "--out-dir", str(out), *(["--tensorboard"] if _has_tensorboard() else [])])
    return out


def _curve_checks(path: pathlib.Path) -> None:
    """The picture's size, its colours, and that the loss line (matplotlib's first colour, C0) rises and falls."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape == (512, 800, 3)  # 10 x 6.4 inches at 80 dpi
    colours = {tuple(c) for c in pixels.reshape(-1, 3)[::7]}
    assert len(colours) > 30  # lines, legends, text and grid, not a blank canvas
    top_left = pixels[:256, :400].astype(int)
    loss_line = np.abs(top_left - np.array([31, 119, 180])).sum(-1) < 40  # "tab:blue"
    rows = np.nonzero(loss_line.any(1))[0]
    assert loss_line.sum() > 50 and rows.max() - rows.min() > 8  # a curve that varies, not a flat line


def test_curves_png_is_written_at_validation_and_shows_the_run(curves_run):
    """A run draws <out-dir>/curves.png at its validations: 800 x 512 px, many colours, a varying loss curve."""
    assert (curves_run / "curves.png").is_file() and not list(curves_run.glob(".*.tmp"))
    _curve_checks(curves_run / "curves.png")


def test_plot_redraws_the_curves_of_a_finished_run(curves_run, tmp_path, capsys):
    """train.py --plot RUN_DIR draws curves.png from metrics.jsonl alone; a missing or damaged file is one line."""
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "metrics.jsonl").write_text((curves_run / "metrics.jsonl").read_text())
    train.main(["--plot", str(copy)])
    assert "wrote" in capsys.readouterr().out
    _curve_checks(copy / "curves.png")
    with pytest.raises(SystemExit, match="metrics.jsonl does not exist: expected the metrics.jsonl of a train.py"):
        train.main(["--plot", str(tmp_path / "absent")])
    (copy / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\nnot json\n')
    with pytest.raises(SystemExit, match="metrics.jsonl line 2 is not a metrics.jsonl record"):
        train.main(["--plot", str(copy)])


def test_plot_without_matplotlib_is_a_note_in_training_and_an_error_for_plot(curves_run, tmp_path, monkeypatch,
                                                                           capsys):
    """Without matplotlib a training run prints one note (once) and goes on; --plot stops with one line."""
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    (tmp_path / "metrics.jsonl").write_text((curves_run / "metrics.jsonl").read_text())
    opts = train.TrainOptions(out_dir=str(tmp_path))
    run = type("RunLike", (), {"main_process": True, "opts": opts, "out_dir": tmp_path, "curves_note": False})()
    train.write_curves(run)
    train.write_curves(run)
    assert capsys.readouterr().out.count("note: no curves.png: matplotlib is not installed") == 1
    assert not (tmp_path / "curves.png").exists()
    with pytest.raises(SystemExit, match="--plot needs matplotlib"):
        train.main(["--plot", str(tmp_path)])


def test_tensorboard_scalars_equal_the_metrics_jsonl_records(curves_run):
    """--tensorboard writes event files whose train/loss, train/lr and val/oIoU scalars are metrics.jsonl's."""
    if not _has_tensorboard():
        pytest.skip("the tensorboard package is not installed (optional: pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    runs = list((curves_run / "tensorboard").iterdir())
    assert len(runs) == 1
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    records = [json.loads(line) for line in (curves_run / "metrics.jsonl").read_text().splitlines()]
    for tag, kind, key in (("train/loss", "train", "loss"), ("train/lr", "train", "lr"), ("val/oIoU", "eval", "oIoU")):
        expected = [(r["step"], r[key]) for r in records if r["kind"] == kind]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert len(got) == len(expected) > 0, tag
        for (step, value), (want_step, want) in zip(got, expected):
            assert step == want_step and value == pytest.approx(want, rel=1e-6), tag


def test_tensorboard_missing_is_a_one_line_error_before_anything_is_written(tmp_path, monkeypatch):
    """--tensorboard without the tensorboard package stops with one line and leaves no run folder."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SystemExit, match="--tensorboard needs the tensorboard package: pip install tensorboard"):
        train.main([*TINY, "--max-steps", "1", "--out-dir", str(tmp_path / "run"), "--tensorboard"])
    assert not (tmp_path / "run").exists()
