"""Tests for the shapes-demo scripts in bench/: the reference scores and the surrogate-feature diagnostic."""
import json
import sys

import numpy as np
import pytest
import torch

import data
import maris
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import shapes_oracle_features  # noqa: E402
import shapes_references  # noqa: E402


def _scene(*objs, height=96, width=128):
    """A hand-built scene from (shape, colour, size, cx, cy, r) tuples, one item per object."""
    objects = [data.ShapeObject(s, c, z, x, y, r, (0, 0, 0)) for s, c, z, x, y, r in objs]
    return data.Scene(height, width, 0, objects, [(j, "the " + o.shape) for j, o in enumerate(objects)])


class _Scenes:
    """The parts of a ShapesDataset that shapes_references reads: scenes, items, original_mask."""

    def __init__(self, scenes):
        self.scenes = scenes
        self.items = [(i, j, e) for i, s in enumerate(scenes) for j, e in s.items]

    def original_mask(self, index):
        image_id, obj, _ = self.items[index]
        return data.scene_mask(self.scenes[image_id], obj)


def test_references_on_hand_built_scenes():
    """whole_image scores sum(GT) / sum(image area); every_object is perfect on one-object scenes and
    sum(GT) / sum(union) otherwise; the logit grid at a large S is close to perfect."""
    one = _scene(("square", "red", "large", 40, 40, 20))
    two = _scene(("circle", "red", "small", 30, 30, 12), ("diamond", "blue", "large", 90, 60, 20))
    ds = _Scenes([one, two])
    out = shapes_references.references(ds, [512], patch_size=16)
    gts = [ds.original_mask(i) for i in range(len(ds.items))]
    assert out["whole_image"]["oIoU"] == pytest.approx(sum(g.sum() for g in gts) / (3 * 96 * 128))
    union = data.scene_mask(two, 0) | data.scene_mask(two, 1)
    ious = [1.0, gts[1].sum() / union.sum(), gts[2].sum() / union.sum()]
    assert out["every_object"]["mIoU"] == pytest.approx(np.mean(ious))
    assert out["logit_grid_512"]["oIoU"] > 0.97 and out["logit_grid_512"]["count"] == 3


def test_logit_grid_gets_coarser_with_smaller_inputs():
    """The ground truth seen through the logit grid loses more at S = 64 than at S = 256."""
    ds = data.ShapesDataset("val", num_images=6, load_images=False)
    out = shapes_references.references(ds, [64, 256], patch_size=16)
    assert out["logit_grid_64"]["oIoU"] < out["logit_grid_256"]["oIoU"] < 1.0


def test_oracle_features_hold_the_attributes_and_drop_parts():
    """Through identity projections the surrogate shows each object's shape, colour and size one-hots on the
    patches it covers, its occupancy and the position table; --drop parts are zero."""
    scene = _scene(("triangle", "green", "small", 24, 24, 20), height=64, width=64)
    K = 10 + 16 + shapes_oracle_features.POSITION_DIM
    eye = torch.eye(K)
    out = shapes_oracle_features.oracle_features(scene, size=64, patch_size=16, proj_taps=eye, proj_neck=eye)
    f = out["taps"][0][0]  # (H, W, K)
    assert f.shape == (4, 4, K) and torch.equal(out["neck"][0].permute(1, 2, 0), f)
    cover = torch.nn.functional.avg_pool2d(data.transform_mask(data.scene_mask(scene, 0), 64)[None, None], 16)[0, 0]
    expected = torch.zeros(4, 4, 10)
    for k in (list(data.COLORS).index("green"), 4 + data.SHAPES.index("triangle"), 8 + list(data.SIZES).index("small")):
        expected[..., k] = cover  # each one-hot weighted by the share of the patch the object covers
    torch.testing.assert_close(f[..., :10], expected)
    assert cover[1, 1] > 0 and cover[3, 3] == 0  # the far corner is background
    torch.testing.assert_close(f[..., 26:], maris.sincos_position_table(4, 4, shapes_oracle_features.POSITION_DIM))
    dropped = shapes_oracle_features.oracle_features(scene, size=64, patch_size=16, proj_taps=eye, proj_neck=eye,
                                                     drop=("shape", "position"))["taps"][0][0]
    assert not dropped[..., 4:8].any() and not dropped[..., 26:].any()
    torch.testing.assert_close(dropped[..., :4], f[..., :4])
    torch.testing.assert_close(dropped[..., 10:26], f[..., 10:26])


@pytest.mark.filterwarnings("ignore:MARIS. RANDOM weights")
def test_oracle_features_script_trains_without_running_the_encoder(tmp_path):
    """The script runs train.py with every training image's features already in the cache: the encoder runs
    on no image, and the run trains and validates."""
    out = tmp_path / "run"
    result = shapes_oracle_features.main(["--drop", "shape", "--cache-dir", str(tmp_path / "cache"),
                                          "--train-scenes", "3", "--epochs", "1", "--val-limit", "4",
                                          "--image-size", "64", "--batch-size", "2", "--no-progress",
                                          "--out-dir", str(out)])
    assert result["step"] > 0 and result["val"]["count"] == 4
    epochs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    assert [r["encoded_images"] for r in epochs] == [0]
    with pytest.raises(SystemExit, match="unknown part"):
        shapes_oracle_features.main(["--drop", "texture"])
