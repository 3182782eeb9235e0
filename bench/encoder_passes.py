"""Frozen-encoder passes and wall time of one training epoch: per-sentence vs image-grouped batches.

The paper-style loop runs SAM's encoder once per sentence; RefCOCO has about 7 sentences per image.
The image-grouped path (data.ImageGroupedBatchSampler + data.collate_images + MARIS's image_index)
runs it once per distinct image of a batch. Both paths do the same training step (forward, focal +
dice loss, backward, AdamW step) over the same sentences.

    python bench/encoder_passes.py                                  # vit_b at S = 512 on CPU
    python bench/encoder_passes.py --preset tiny --images 16
    python bench/encoder_passes.py --refcoco-mini ../shared/refcoco-mini
    python bench/encoder_passes.py --device cuda --image-size 1024     # on a GPU (bf16 autocast)

Target (README, "Performance"): >= 3x less wall time at 7 sentences per image with vit_b at S = 512 on CPU.
Weights are random (the time of a step does not depend on them). One summary line per figure.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import maris  # noqa: E402


class SentencesPerImage(Dataset):
    """The shapes dataset reshaped so every image has exactly `k` sentences (items cycled)."""

    def __init__(self, base: data.ShapesDataset, images: int, k: int):
        by_image: dict[int, list[int]] = {}
        for index, image_id in enumerate(base.image_ids):
            by_image.setdefault(image_id, []).append(index)
        chosen = list(by_image.values())[:images]
        self.base, self.indices = base, [group[j % len(group)] for group in chosen for j in range(k)]
        self.image_ids = [base.image_ids[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.base[self.indices[i]]


def epoch(model, loader, optimizer, grouped: bool, device: torch.device) -> tuple[int, float, int]:
    """One training epoch; returns (encoder image passes, seconds, sentences)."""
    passes = [0]
    # every encoder pass starts at SAM's patch embedding (maris.py iterates the blocks itself)
    handle = model.image_encoder.patch_embed.register_forward_hook(
        lambda m, inp, out: passes.__setitem__(0, passes[0] + inp[0].shape[0]))
    sentences = 0
    t0 = time.perf_counter()
    for batch in loader:
        if grouped:
            images, index = batch["images"], batch["image_index"].to(device)  # distinct images only
        else:
            images, index = batch["images"][batch["image_index"]], None  # one image per sentence
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images.to(device), batch["ids"].to(device), batch["word_mask"].to(device),
                           image_index=index)
        valid = data.valid_mask(batch["input_size"], model.cfg.image_size).to(device)
        loss = maris.segmentation_loss(logits.float(), batch["mask"].to(device), valid, model.cfg)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sentences += len(batch["ids"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    handle.remove()
    return passes[0], seconds, sentences


def run(name: str, dataset, model, args) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    per_sentence = DataLoader(dataset, batch_size=args.batch, shuffle=True, collate_fn=data.collate_images,
                              generator=torch.Generator().manual_seed(0))
    grouped = DataLoader(dataset, collate_fn=data.collate_images, batch_sampler=data.ImageGroupedBatchSampler(
        dataset.image_ids, args.batch, sentences_per_image=args.k, seed=0))
    model.train()
    device = next(model.parameters()).device
    epoch(model, grouped, optimizer, True, device)  # warm-up (allocator, kernels, image decode caches)
    results = {}
    for path, loader, is_grouped in (("per_sentence", per_sentence, False), ("grouped", grouped, True)):
        results[path] = epoch(model, loader, optimizer, is_grouped, device)
        passes, seconds, n = results[path]
        print(f"{name} {path}: {n} sentences, {passes} encoder image passes, {seconds:.1f} s/epoch "
              f"({n / seconds:.2f} sentences/s)")
    (p1, s1, _), (p2, s2, _) = results["per_sentence"], results["grouped"]
    print(f"{name} grouped_vs_per_sentence: {p1 / p2:.2f}x fewer encoder passes, {s1 / s2:.2f}x less wall time")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit_b", help="MARIS preset (default vit_b)")
    p.add_argument("--image-size", type=int, default=512, help="input side S (default 512)")
    p.add_argument("--images", type=int, default=4, help="distinct images in the synthetic set (default 4)")
    p.add_argument("--k", type=int, default=7, help="sentences per image (default 7, RefCOCO's average)")
    p.add_argument("--batch", type=int, default=8, help="sentences per batch (default 8, the design default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu; bf16 autocast on cuda)")
    p.add_argument("--refcoco-mini", type=pathlib.Path, default=None,
                   help="also time the refcoco unc train+val+testA+testB splits of this refer-layout root")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = maris.make_config(args.preset, image_size=args.image_size)
    device = torch.device(args.device)
    model = maris.MARIS(cfg).to(device)
    print(f"setup: preset={args.preset} S={cfg.image_size} batch={args.batch} threads={torch.get_num_threads()} "
          f"device={device}, {args.images} images x {args.k} sentences")
    shapes = data.ShapesDataset("train", num_images=4 * args.images, image_size=cfg.image_size,
                                context_length=cfg.context_length)
    run("synthetic", SentencesPerImage(shapes, args.images, args.k), model, args)
    if args.refcoco_mini:
        splits = [data.RefDataset(args.refcoco_mini, "refcoco", "unc", s, image_size=cfg.image_size,
                                  context_length=cfg.context_length) for s in ("train", "val", "testA", "testB")]
        mini = torch.utils.data.ConcatDataset(splits)
        mini.image_ids = [i for s in splits for i in s.image_ids]
        run("refcoco-mini", mini, model, args)


if __name__ == "__main__":
    main()
