"""What protecting a run costs: the size and write time of last.pt, and hashing the frozen encoders.

train.py writes last.pt every --save-minutes (5 by default) and at each epoch's end; it holds the
trainable weights and their AdamW state (the frozen encoders are not in it). Each run also hashes the
frozen encoders' weights once (`maris.encoder_hashes`), for the checkpoints and evaluate.py's check.

    python bench/checkpoint.py                 # vit_b
    python bench/checkpoint.py --preset vit_h --repeats 5

Weights are random (sizes and times do not depend on their values); the AdamW state is filled with zeros
of the right shapes, as after a first step. Prints one line.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import maris  # noqa: E402
import train  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="vit_b", choices=sorted(maris.PRESETS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=pathlib.Path, default=None, help="where to write (default: a temporary folder)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = maris.make_config(args.preset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random encoders are expected here
        model = maris.build_maris(cfg)
    step = maris.TrainStep(model, maris.build_heads(cfg, model))
    optimizer = train.build_optimizer(step, train.resolve_options(train.TrainOptions(dataset="refcoco")))
    for group in optimizer.param_groups:
        for param in group["params"]:
            optimizer.state[param] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(param),
                                      "exp_avg_sq": torch.zeros_like(param)}
    state = {"model": model.trainable_state_dict(), "optimizer": optimizer.state_dict()}
    trainable = sum(p.numel() for p in step.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = pathlib.Path(folder) / "last.pt"
        walls = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            train.atomic_save(state, path)  # temporary file, fsync, rename: what train.py does
            walls.append(time.perf_counter() - start)
        size = path.stat().st_size
    start = time.process_time()
    maris.encoder_hashes(model)
    hashing = time.process_time() - start
    print(f"{args.preset}: {trainable:,} trainable parameters; last.pt {size / 2 ** 20:.1f} MiB, written in "
          f"{min(walls):.2f}-{max(walls):.2f} s wall ({args.repeats} writes); hashing the frozen encoders "
          f"{hashing:.2f} s CPU")


if __name__ == "__main__":
    main()
