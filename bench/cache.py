"""Encoder feature cache: wall time of a training epoch without the cache, building it, reading it.

SAM's image encoder is frozen, so its outputs per image never change; `train.py --feature-cache DIR`
stores them (fp16, one file per image) the first time an image is seen and reads them back in
later epochs. This script runs the real pipeline, `train.main`, three times over the same sentences:

    no_cache        one epoch, SAM's encoder runs on every batch's distinct images
    cache_epoch1    the first epoch with --feature-cache: encodes and writes each image once
    cache_epoch2    the second epoch: every image's features come from the cache

and reads each epoch's wall time and encoder image count from the run's metrics.jsonl ("epoch"
records; validation is off). The cached run goes first, so allocator and thread-pool warm-up fall
into the cache-building epoch, not into the two epochs compared.

    python bench/cache.py                                  # vit_b at S = 512 on CPU
    python bench/cache.py --preset tiny --items 32         # a quick check that it runs
    python bench/cache.py --refcoco-mini ../shared/refcoco-mini

Target (README, "Performance"): epoch 2 >= 5x faster than a no-cache epoch with vit_b at S = 512 on CPU.
Weights are random (the time of a step does not depend on them). One summary line per figure.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import train  # noqa: E402


def epochs(out_dir: pathlib.Path) -> list[dict]:
    """The "epoch" records (epoch_seconds, encoded_images) of a run's metrics.jsonl."""
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "epoch"]


def run(name: str, data_args: list[str], items: int, batch: int, args, work: pathlib.Path) -> None:
    """Time no-cache, cache-building and cache-reading epochs on one dataset; print the figures."""
    common = [*data_args, "--preset", args.preset, "--image-size", str(args.image_size), "--batch-size",
              str(batch), "--sentences-per-image", str(args.sentences_per_image), "--val-split", "",
              "--lr", "1e-4", "--warmup-steps", "1", "--log-every", "1000000", "--workers", str(args.workers),
              "--device", args.device, "--no-progress", "--overwrite"]  # a reused --work-dir starts over
    if items:
        common += ["--train-limit", str(items)]
    cache = work / f"{name}-cache"
    train.main([*common, "--epochs", "2", "--feature-cache", str(cache), "--out-dir", str(work / f"{name}-cached")])
    train.main([*common, "--epochs", "1", "--out-dir", str(work / f"{name}-plain")])
    (plain,) = epochs(work / f"{name}-plain")
    build, read = epochs(work / f"{name}-cached")
    for label, r in (("no_cache", plain), ("cache_epoch1_build", build), ("cache_epoch2_read", read)):
        print(f"{name} {label}: {r['epoch_seconds']:.2f} s/epoch, {r['encoded_images']} encoder image passes, "
              f"{r['step']} steps so far")
    print(f"{name} cache_speedup: no-cache / epoch-2 = {plain['epoch_seconds'] / read['epoch_seconds']:.2f}x "
          f"(build epoch / no-cache = {build['epoch_seconds'] / plain['epoch_seconds']:.2f}x)")
    files = [p for p in cache.rglob("*.npy")]
    on_disk = sum(p.stat().st_size for p in files) / max(1, len(files))
    # 2 bytes (fp16) x (neck C*H*W + 3 taps x H*W*D), plus numpy's .npy header.
    print(f"{name} cache_bytes_per_image: {on_disk:,.0f} bytes on disk ({len(files)} images, "
          f"{on_disk / 2**20:.2f} MiB each)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit_b", help="MARIS preset (default vit_b)")
    p.add_argument("--image-size", type=int, default=512, help="input side S (default 512)")
    p.add_argument("--items", type=int, default=32,
                   help="training sentences of the shapes set (default 32, about 9 images)")
    p.add_argument("--batch", type=int, default=8, help="sentences per batch (default 8, the design default)")
    p.add_argument("--sentences-per-image", type=int, default=1,
                   help="train.py --sentences-per-image for every run (default 1, train.py's default)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    p.add_argument("--refcoco-mini", type=pathlib.Path, default=None,
                   help="also time the refcoco (unc) train split of this refer-layout root")
    p.add_argument("--work-dir", type=pathlib.Path, default=None,
                   help="where runs and caches go (default: a temporary folder, deleted afterwards)")
    args = p.parse_args(argv)
    print(f"setup: preset={args.preset} S={args.image_size} batch={args.batch} "
          f"sentences_per_image={args.sentences_per_image} threads={torch.get_num_threads()} device={args.device}")
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        work = args.work_dir or pathlib.Path(tmp)
        run("synthetic", ["--dataset", "shapes"], args.items, args.batch, args, work)
        if args.refcoco_mini:
            # refcoco-mini's train split is smaller than one batch of 8: shrink the batch to fit.
            n = len(data.RefDataset(args.refcoco_mini, "refcoco", "unc", "train", load_images=False))
            print(f"refcoco-mini: {n} training sentences, batch {min(args.batch, n)}")
            run("refcoco-mini", ["--dataset", "refcoco", "--data-root", str(args.refcoco_mini)], 0,
                min(args.batch, n), args, work)


if __name__ == "__main__":
    main()
