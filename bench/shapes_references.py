"""Reference scores for the built-in shapes task: what text-blind or resolution-limited answers get.

Each row scores a rule that needs no model on a shapes split, with the same metrics and the same
scoring protocol as `evaluate.py` (original image resolution, every sentence):

    whole_image        every pixel is foreground
    every_object       a text-blind oracle: the union of the perfect masks of every object in the
                       picture (it knows where the objects are, not which one is meant)
    random_object      a text-blind oracle: the perfect mask of one object drawn at random from
                       the picture (seeded)
    logit_grid_S       the ground truth seen through the model's logit grid at input size S: the
                       padded S x S ground truth averaged over each logit cell (4H x 4W = 4S/16
                       cells a side), turned into logits and scored through evaluate.py's own
                       upsampling, cropping and resizing. A model cannot beat it by much, so it
                       shows the cap that S alone puts on the masks.

    python bench/shapes_references.py                        # val split, S = 128 and 256
    python bench/shapes_references.py --split test --image-size 192

The first three rows do not depend on S or on any model; a model that scores well above
`every_object` and `random_object` reads the expression.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import evaluate  # noqa: E402


def grid_logits(gt: np.ndarray, size: int, patch_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The ground truth as logits on the decoder's (4H, 4W) grid for input side S.

    Returns:
        logits (1, 1, 4H, 4W) (+-20 where a cell is all background / all object) and the resized
        image size (h2, w2) inside the padding.
    """
    H = size // patch_size  # feature side; the decoder upsamples it 4x
    cell = size // (4 * H)  # input pixels per logit cell, a side
    padded = data.transform_mask(gt, size)  # (S, S) {0, 1}
    p = F.avg_pool2d(padded[None, None], cell)  # (1, 1, 4H, 4W): object share of each cell
    logits = torch.logit(p, eps=1e-9).clamp(-20, 20)  # p = 0.5 sits exactly on the threshold
    return logits, data.resize_longest_side(*gt.shape, size)


def references(dataset: data.ShapesDataset, sizes: list[int], patch_size: int, seed: int = 0) -> dict:
    """Score every reference rule on every item of `dataset`; returns {rule: RISMetrics.compute()}."""
    rng = np.random.default_rng(seed)
    rules = ["whole_image", "every_object", "random_object", *(f"logit_grid_{s}" for s in sizes)]
    metrics = {name: evaluate.RISMetrics() for name in rules}
    for index, (image_id, _, _) in enumerate(dataset.items):
        scene = dataset.scenes[image_id]
        gt = dataset.original_mask(index)  # (Ho, Wo) bool
        objects = [data.scene_mask(scene, j) for j in range(len(scene.objects))]
        preds = {"whole_image": np.ones_like(gt), "every_object": np.logical_or.reduce(objects),
                 "random_object": objects[int(rng.integers(len(objects)))]}
        for s in sizes:
            logits, input_size = grid_logits(gt, s, patch_size)
            preds[f"logit_grid_{s}"] = evaluate.logits_to_masks(
                logits, torch.tensor([input_size]), torch.tensor([gt.shape]), size=s)[0].numpy()
        for name, pred in preds.items():
            metrics[name].update(*evaluate.intersection_union(torch.from_numpy(pred), torch.from_numpy(gt)))
    return {name: m.compute() for name, m in metrics.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", default="val", help="shapes split: train | val | test (default: val)")
    p.add_argument("--image-size", type=int, action="append", default=None,
                   help="input side S of a logit_grid row, repeatable (default: 128 and 256)")
    p.add_argument("--patch-size", type=int, default=16, help="SAM's patch size: H = S / patch (default: 16)")
    p.add_argument("--scenes", type=int, default=None, help="scenes of the split (default: the split's own)")
    args = p.parse_args(argv)
    sizes = args.image_size or [128, 256]
    for s in sizes:
        if s % args.patch_size or (s // (4 * (s // args.patch_size))) < 1:
            raise SystemExit(f"error: --image-size {s} must be a multiple of --patch-size {args.patch_size}")
    try:
        dataset = data.ShapesDataset(split=args.split, num_images=args.scenes, load_images=False)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    results = references(dataset, sizes, args.patch_size)
    print(f"shapes {args.split}: {len(dataset)} pairs on {len(dataset.scenes)} scenes, scored at the original "
          f"image resolution (evaluate.py's protocol)")
    print(evaluate.format_table(results))
    return results


if __name__ == "__main__":
    main()
