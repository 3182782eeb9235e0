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
# Every add-on of issue 5: MagNet's Mask Grounding and alignment losses, RISAM's adapters.
ADDONS = ["--mask-grounding-weight", "0.1", "--alignment-weight", "0.1", "--adapters"]


# --- a self-written refer-layout fixture (DESIGN.md §5) ---

def write_refer_fixture(root: pathlib.Path) -> pathlib.Path:
    """A tiny RefCOCO (unc) in the refer layout: 5 images, 3 boxes each, 2 sentences per ref.

    Images 1-2 are train, 3 val, 4 testA, 5 testB; each box is one COCO polygon annotation.
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
            for text in (f"{colour} box", f"box in the {place}"):
                sents.append({"tokens": text.split(), "raw": text, "sent_id": sent_id, "sent": text})
                sent_id += 1
            refs.append({"sent_ids": [s["sent_id"] for s in sents], "file_name": f"COCO_train2014_{image_id:012d}_{k}.jpg",
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
    """A short shapes run: 16 training items (of 8 generated scenes), batch 4 (4 steps per epoch), no validation."""
    return ["--out-dir", str(out), "--batch-size", "4", "--train-scenes", "8", "--train-limit", "16", "--val-split", "",
            "--lr", "1e-3", "--warmup-steps", "1", *TINY, *extra]


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
    model = evaluate.model_from_checkpoint(ckpt)
    assert set(model.trainable_state_dict()) == set(ckpt["model"])
    assert (out / "best.pt").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {x["kind"] for x in lines} == {"train", "eval"}


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
    model = evaluate.build_model(cfg)
    heads = maris.build_heads(maris.config_from_dict(cfg), model)
    opt = train.build_optimizer(model, opts, heads)
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
    assert torch.load(out / "last.pt", weights_only=True)["scheduler"]["_last_lr"][0] == 0.0
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

@pytest.mark.parametrize("extra", [[], ["--alignment-weight", "0.1"]], ids=["maris", "alignment"])
def test_ddp_two_gloo_processes_match_one_process(tmp_path, extra):
    """torchrun with 2 CPU processes (gloo), batch 2 each, gives the weights of 1 process with batch 4;
    with MagNet's alignment loss its head (outside the DDP wrapper) is averaged over the ranks too."""
    common = ["--max-steps", "3", "--val-split", "", "--image-size", "64", "--no-progress", "--log-every", "1",
              "--lr", "1e-3", "--warmup-steps", "1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", "--batch-size", "2", "--out-dir", str(tmp_path / "ddp"), *common],
                          cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train.main(["--batch-size", "4", "--out-dir", str(tmp_path / "one"), *common])
    assert single["step"] == 3
    ckpt = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["sampler"]["world_size"] == 2 and len(ckpt["rng"]) == 2
    ddp_log = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    one_log = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in ddp_log if x["kind"] == "train"] == [1, 2, 3]
    # The same items per step and averaged gradients: the (rank-averaged) losses agree to rounding.
    assert [x["loss"] for x in ddp_log] == pytest.approx([x["loss"] for x in one_log], rel=1e-5)
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


# --- MagNet's losses and RISAM's adapters (issue 5) ---

def test_magnet_and_adapters_train_on_shapes(tmp_path):
    """--mask-grounding-weight 0.1 --alignment-weight 0.1 --adapters trains on shapes: finite logged
    losses, the adapters change, the encoders do not, the heads are saved beside the model."""
    out = tmp_path / "run"
    result = train.main(shapes_args(out, *ADDONS, "--max-steps", "3"))
    assert result["step"] == 3
    ckpt = torch.load(out / "last.pt", weights_only=True)
    config = ckpt["config"]
    assert config["adapters"] and config["mask_grounding_weight"] == config["alignment_weight"] == 0.1
    initial = evaluate.build_model(config).trainable_state_dict()  # the seeded build = the run's start
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


# --- image-grouped batches (issue 6) ---

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
        losses = maris.training_loss(model, heads, ids=batch["ids"], word_mask=batch["word_mask"],
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


# --- encoder feature cache (issue 6) ---

def count_encoder_images(monkeypatch) -> list:
    """Patch train.build_model so every SAM encoder pass appends its image count to the returned list."""
    calls, real = [], train.build_model

    def build_and_count(*args, **kwargs):
        model = real(*args, **kwargs)
        model.image_encoder.patch_embed.register_forward_hook(lambda m, inputs, out: calls.append(len(inputs[0])))
        return model

    monkeypatch.setattr(train, "build_model", build_and_count)
    return calls


def test_feature_cache_second_epoch_runs_no_encoder(tmp_path, monkeypatch):
    """With --feature-cache, epoch 1 encodes each image once (train and validation), epoch 2 and its
    validation run SAM's encoder zero times, the encoder weights are hashed once for the whole run
    (not once per cache opened), and the losses stay finite."""
    calls = count_encoder_images(monkeypatch)
    hashes, real_hash = [], evaluate.state_dict_sha256

    def counted_hash(module):
        hashes.append(1)
        return real_hash(module)

    monkeypatch.setattr(evaluate, "state_dict_sha256", counted_hash)
    monkeypatch.setattr(train, "state_dict_sha256", counted_hash)
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
    assert len(hashes) == 1


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
    fa, fb, fc, fd = (evaluate.encoder_fingerprint(m, "shapes-train-seed0") for m in (a, b, c, d))
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
    with pytest.raises(SystemExit, match="--train-scenes is for the generated shapes dataset, not refcoco"):
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
    model = evaluate.build_model(maris.config_to_dict(maris.make_config("tiny", image_size=64))).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    images, ids, wm = batch["image"].to(device), batch["ids"].to(device), batch["word_mask"].to(device)
    masks = batch["mask"].to(device)
    valid = train.data.valid_mask(batch["input_size"], 64).to(device)
    for _ in range(200):
        with evaluate.autocast(device, "auto"):
            logits = model(images, ids, wm)
        loss = maris.segmentation_loss(logits.float(), masks, valid, model.cfg)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad(), evaluate.autocast(device, "auto"):
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
