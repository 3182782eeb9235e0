"""Items/s that the training DataLoader delivers: JPEG decode, SAM's resize + pad, masks, collate.

Builds the training split of a repeated refcoco-mini (`refer_repeat.py`: every copy is a new image id, so
each item decodes a real JPEG, as RefCOCO's random order mostly does) at S = 1024 and iterates the loader
that train.py builds (shuffled batches of 8, `data.collate_images`, pinned memory on CUDA) with each
worker count, with no model: the figure is the most items/s the data pipeline can feed a GPU.

    python bench/dataloader.py --workers 0 4 8 16                   # on the GPU machine
    python bench/dataloader.py --workers 0 1 2 --batches 20         # on a 2-core CPU
    python bench/dataloader.py --refcoco-mini ../shared/refcoco-mini --copies 100 --image-size 1024

Each worker count runs `--batches` batches after the loader's first batch (worker start-up is timed
separately). Prints one line per worker count and, with --json, writes them. The CPU milliseconds per item
(main process and workers, start-up included) are the steadier figure on a shared machine: items/s per
core = 1000 / that.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import data  # noqa: E402
from refer_repeat import repeat_refer_root  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "refcoco-mini"


def measure(dataset, workers: int, args) -> dict:
    """Time one DataLoader configuration: start-up (first batch) and the next --batches batches."""
    sampler = torch.utils.data.RandomSampler(dataset, replacement=False,
                                             num_samples=(args.batches + 1) * args.batch,
                                             generator=torch.Generator().manual_seed(0))
    batches = torch.utils.data.BatchSampler(sampler, args.batch, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=data.collate_images,
                                         num_workers=workers, pin_memory=args.pin_memory,
                                         persistent_workers=False)
    cpu_start = cpu_seconds()
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    items = 0
    for batch in iterator:
        items += len(batch["ids"])
    seconds = time.perf_counter() - start
    del iterator, loader  # joins the workers, so their CPU time is counted below
    cpu = cpu_seconds() - cpu_start
    return dict(workers=workers, items=items, seconds=seconds, items_per_s=items / seconds, startup_s=first,
                cpu_s_per_item=cpu / (items + args.batch))


def cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes (DataLoader workers), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 4, 8, 16], help="worker counts (default 0 4 8 16)")
    p.add_argument("--image-size", type=int, default=1024, help="S (default 1024)")
    p.add_argument("--batch", type=int, default=8, help="sentences per batch (default 8)")
    p.add_argument("--batches", type=int, default=50, help="timed batches per worker count (default 50)")
    p.add_argument("--refcoco-mini", type=pathlib.Path, default=SHARED, help=f"refer root to repeat (default {SHARED})")
    p.add_argument("--copies", type=int, default=100, help="copies of it (default 100: 2,300 sentences, 400 images)")
    p.add_argument("--repeated-root", type=pathlib.Path, default=None,
                   help="an already repeated root (refer_repeat.py) instead of --refcoco-mini/--copies")
    p.add_argument("--pin-memory", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                   help="pinned host memory, as train.py on CUDA (default: on when CUDA is available)")
    p.add_argument("--json", type=pathlib.Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-dataloader-") as tmp:
        root = args.repeated_root or repeat_refer_root(args.refcoco_mini, pathlib.Path(tmp) / "root", args.copies)
        dataset = data.RefDataset(root, "refcoco", "unc", "train", image_size=args.image_size)
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        print(f"date {now} | torch {torch.__version__} | "
              f"{os.cpu_count()} CPUs | {len(dataset)} sentences on {len(set(dataset.image_ids))} images, "
              f"S = {args.image_size}, batch {args.batch}, {args.batches} timed batches, pin_memory {args.pin_memory}")
        rows = []
        for workers in args.workers:
            row = measure(dataset, workers, args)
            rows.append(row)
            print(f"workers {workers:2d}: {row['items_per_s']:7.1f} items/s ({row['items']} items in "
                  f"{row['seconds']:.2f} s; first batch after {row['startup_s']:.2f} s); "
                  f"{1e3 * row['cpu_s_per_item']:.0f} CPU ms per item (all processes, start-up included)")
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(dict(setup=vars(args) | {"refcoco_mini": str(args.refcoco_mini),
                                                                         "repeated_root": str(root), "json": None},
                                                     rows=rows), indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()
