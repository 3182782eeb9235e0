"""Diagnostic: the shapes demo with "perfect" frozen image features in place of the random SAM encoder's.

The built-in demo trains MARIS on frozen *random* encoders. This script measures how much of the
remaining error is theirs: it fills train.py's encoder feature cache (`--feature-cache`) with
features computed from the scenes' ground truth, then runs the real `train.main` with the same
options, so everything else — Feature Enhancement, the Mutual-Aware Attention blocks, the
decoder, the text tower, the recipe, validation — is the demo's own. Per 16 x 16 patch (the
encoder's token), the surrogate feature holds

    attributes   colour, shape and size one-hots of the objects over the patch, each weighted by
                 the share of the patch it covers (10 values)
    occupancy    the share of each of the patch's 4 x 4 sub-cells (the decoder's logit cells)
                 covered by any object (16 values)
    position     a 2-D sine-cosine table of the patch's row and column (32 values)

through a fixed random projection to the encoder's width D (the three Feature Enhancement taps)
and to C (SAM's neck). `--drop` removes parts, to see which the demo misses most. The surrogate
knows nothing about the expression: which object is meant is still for MARIS to work out.

    python bench/shapes_oracle_features.py --out-dir runs/oracle                 # demo defaults
    python bench/shapes_oracle_features.py --drop shape --out-dir runs/oracle-noshape
    python bench/shapes_oracle_features.py --drop occupancy,position --epochs 1 ...   # any train.py option

Every option but --drop and --cache-dir goes to train.py (see `python train.py --help`).
This is a diagnostic, not a model: the features come from the answer key of the scenes.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import maris  # noqa: E402
import train  # noqa: E402

PARTS = ("colour", "shape", "size", "occupancy", "position")
POSITION_DIM = 32  # channels of the sine-cosine position table


def oracle_features(scene: data.Scene, *, size: int, patch_size: int, proj_taps: torch.Tensor,
                    proj_neck: torch.Tensor, drop: tuple[str, ...] = (), num_taps: int = 3) -> dict:
    """The surrogate encoder output of one scene at input side S (see the module docstring).

    Args:
        scene: a shapes scene.  size: S.  patch_size: pixels per token side (H = S / patch_size).
        proj_taps: (K, D) and proj_neck: (K, C) fixed projections, K = 10 + 16 + POSITION_DIM.
        drop: parts of PARTS set to zero.

    Returns:
        dict(neck=(1, C, H, W), taps=[(1, H, W, D)] * num_taps), as MARIS.encode_image returns.
    """
    H = size // patch_size
    masks = torch.stack([data.transform_mask(data.scene_mask(scene, j), size)
                         for j in range(len(scene.objects))])  # (n, S, S), padded like the image
    cover = F.avg_pool2d(masks[:, None], patch_size)[:, 0]  # (n, H, W): share of each patch per object
    attrs = torch.tensor([[o.color == c for c in data.COLORS] + [o.shape == s for s in data.SHAPES]
                          + [o.size == z for z in data.SIZES] for o in scene.objects], dtype=torch.float)  # (n, 10)
    for part, cols in (("colour", slice(0, 4)), ("shape", slice(4, 8)), ("size", slice(8, 10))):
        if part in drop:
            attrs[:, cols] = 0
    per_patch = torch.einsum("nhw,nk->hwk", cover, attrs)  # (H, W, 10)
    cell = patch_size // 4  # the decoder's logit cell: 4 x 4 per token
    occupancy = F.avg_pool2d(masks.amax(0)[None, None], cell)[0, 0]  # (4H, 4W)
    occupancy = occupancy.reshape(H, 4, H, 4).permute(0, 2, 1, 3).reshape(H, H, 16)  # (H, W, 16)
    position = maris.sincos_position_table(H, H, POSITION_DIM)  # (H, W, 32)
    feature = torch.cat([per_patch, occupancy * ("occupancy" not in drop),
                         position * ("position" not in drop)], dim=-1)  # (H, W, K)
    taps = (feature @ proj_taps)[None]  # (1, H, W, D)
    neck = (feature @ proj_neck).permute(2, 0, 1)[None]  # (1, C, H, W)
    return {"neck": neck, "taps": [taps] * num_taps}


def fill_cache(model: maris.MARIS, dataset: data.ShapesDataset, root: pathlib.Path, drop: tuple[str, ...],
               seed: int = 0) -> int:
    """Store the surrogate features of every scene of `dataset` in its feature cache; returns the count."""
    cfg = model.cfg
    K = 10 + 16 + POSITION_DIM
    g = torch.Generator().manual_seed(seed)
    # Unit-variance rows: the projected features have roughly the scale of SAM's LayerNorm'd ones.
    proj_taps = torch.randn(K, cfg.sam_embed_dim, generator=g) * 2 / math.sqrt(K)
    proj_neck = torch.randn(K, cfg.embed_dim, generator=g) * 2 / math.sqrt(K)
    cache = data.open_feature_cache(model, dataset, root, precision="fp32")
    for image_id, scene in enumerate(dataset.scenes):
        cache.store([image_id], oracle_features(scene, size=cfg.image_size, patch_size=cfg.patch_size,
                                                proj_taps=proj_taps, proj_neck=proj_neck, drop=drop,
                                                num_taps=len(cfg.fe_taps)))
    return len(dataset.scenes)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    p.add_argument("--drop", default="", help=f"comma-separated parts to leave out: {', '.join(PARTS)}")
    p.add_argument("--cache-dir", default=None, help="feature cache folder (default: a temporary one)")
    args, train_argv = p.parse_known_args(argv)
    drop = tuple(x for x in args.drop.split(",") if x)
    unknown = [x for x in drop if x not in PARTS]
    if unknown:
        raise SystemExit(f"error: --drop {args.drop!r}: unknown part(s) {unknown}; expected some of {list(PARTS)}")
    if any(a.startswith(("--feature-cache", "--adapters", "--device")) for a in train_argv):
        raise SystemExit("error: --feature-cache, --adapters and --device are set by this script (CPU, its cache)")
    opts = train.resolve_options(maris.parse_options(train.TrainOptions, train_argv, train.DESCRIPTION)[0])
    if opts.dataset != "shapes":
        raise SystemExit("error: the surrogate features need the shapes scenes: --dataset shapes only")
    config = train.model_config(opts)
    model = maris.build_model(config)  # the run's own seeded build: same encoder hash, same cache folder
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(args.cache_dir or tmp)
        kw = dict(image_size=config["image_size"], context_length=config["context_length"], load_images=False)
        filled = fill_cache(model, data.ShapesDataset(opts.train_split, num_images=opts.train_scenes, **kw), root, drop)
        if opts.val_split:
            filled += fill_cache(model, data.ShapesDataset(opts.val_split, **kw), root, drop)
        print(f"surrogate image features (dropped: {', '.join(drop) or 'nothing'}) for {filled} scenes in {root}")
        return train.main([*train_argv, "--feature-cache", str(root), "--device", "cpu"])


if __name__ == "__main__":
    main()
