"""Training items/s and peak memory against the encode-once floor: per-sentence vs image-grouped vs feature cache.

With SAM at S = 1024 the frozen image encoder is the cost of a training step. The floor of an epoch is the
encoder's time per distinct image times the images of the epoch (each encoded once); this script measures
how far real training is from it, driving the real training loop, `train.main`, on a repeated refcoco-mini
(`refer_repeat.py`: 23 sentences on 4 images per copy, each copy new image ids):

    floor         SAM's encoder alone on batches of --batch distinct images (no autograd, same precision)
    per_sentence  train.py --sentences-per-image 1 (i.i.d. sentence batches, the default)
    grouped       train.py --sentences-per-image K (K = 7, RefCOCO's sentences per image)
    cache         train.py --feature-cache DIR, a second run over a cache the first one filled

Each runs in its own child process (so each peak memory is its own: torch.cuda.max_memory_allocated on
CUDA, the peak RSS on CPU). Items/s are train.py's own `items_per_s` from metrics.jsonl, the median of the
log windows after the first (compilation, cuDNN autotuning and allocator warm-up fall into the first).
Every mode runs the first --steps batches of the same epoch order; the encoder passes per sentence are
counted by wrapping `maris.MARIS.encode_image` in the child. The feature cache is filled by a first run
(cache_build, also reported) and timed in a second one.

    python bench/train_speed.py --preset vit_h --device cuda                  # S = 1024, batch 8, bf16 autocast
    python bench/train_speed.py --preset vit_b --device cuda --compile --sam-attention sdpa
    python bench/train_speed.py --preset tiny --image-size 128 --device cpu --steps 4 --log-every 2   # smoke

The issue's target: an image-grouped epoch within 1.5x of the encode-once floor. The RefCOCO projection
uses RefCOCO's train split (120,624 sentences on 16,994 images) with the measured items/s and floor.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "refcoco-mini"
MODES = ("per_sentence", "grouped", "cache")
REFCOCO_TRAIN = dict(sentences=120_624, images=16_994)  # RefCOCO (unc) train split
FIXTURE_SENTENCES = 23  # refcoco-mini's unc refs, every split: 23 sentences on 4 images


def resolve(args):
    """(device, autocast context) as train.py resolves --device and --precision (bf16 autocast on CUDA by default)."""
    import contextlib

    import torch
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    return device, (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())


def peak_memory_mib(device) -> dict:
    """Peak device memory (CUDA) and peak RSS of this process, MiB."""
    import torch
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def child_floor(args) -> dict:
    """SAM's encoder time per distinct image: batches of --batch random images, --precision, no autograd."""
    import torch

    import maris
    device, autocast = resolve(args)
    cfg = maris.make_config(args.preset, image_size=args.image_size, sam_attention=args.sam_attention)
    model = maris.build_maris(cfg).to(device).eval()
    images = torch.randn(args.batch, 3, cfg.image_size, cfg.image_size, device=device)
    times = []
    with torch.no_grad(), autocast:
        for i in range(args.floor_warmup + args.floor_iters):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model.encode_image(images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= args.floor_warmup:
                times.append(time.perf_counter() - start)
    return dict(seconds_per_image=statistics.median(times) / args.batch, **peak_memory_mib(device))


def child_train(mode: str, args) -> dict:
    """One train.main run of a mode; items/s, encoder passes and wall time from its metrics.jsonl."""
    import maris
    import train
    # Count the images SAM's encoder runs on (train.py calls MARIS.encode_image for every pass, the cache's
    # misses included): wrap the method for this child process only.
    passes = [0]
    encode_image = maris.MARIS.encode_image

    def counting_encode_image(self, images):
        passes[0] += images.shape[0]
        return encode_image(self, images)
    maris.MARIS.encode_image = counting_encode_image
    out = pathlib.Path(args.work) / mode
    k = {"per_sentence": 1, "grouped": args.k}.get(mode, args.cache_k)
    argv = ["--dataset", "refcoco", "--data-root", args.root, "--preset", args.preset, "--image-size",
            str(args.image_size), "--batch-size", str(args.batch), "--sentences-per-image", str(k),
            "--max-steps", str(args.steps), "--epochs", "1", "--val-split", "", "--lr", "1e-4",
            "--warmup-steps", "1", "--log-every", str(args.log_every), "--device", args.device,
            "--precision", args.precision, "--no-progress", "--out-dir", str(out),
            "--model-set", f"sam_attention={args.sam_attention}"]
    if args.workers is not None:
        argv += ["--workers", str(args.workers)]
    if args.compile:
        argv += ["--compile"]
    if mode in ("cache", "cache_build"):
        argv += ["--feature-cache", str(pathlib.Path(args.work) / "feature-cache")]
    # A fresh run (train.py appends to an existing metrics.jsonl); cache_build starts from an empty cache.
    shutil.rmtree(out, ignore_errors=True)
    if mode == "cache_build":
        shutil.rmtree(pathlib.Path(args.work) / "feature-cache", ignore_errors=True)
    start = time.perf_counter()
    train.main(argv)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["items_per_s"] for r in records if r["kind"] == "train"]
    steady = speeds[1:] or speeds
    result = dict(mode=mode, k=k, items_per_s=statistics.median(steady), windows_items_per_s=speeds,
                  steps=records[-1]["step"], run_wall_s=wall, encoder_passes=passes[0],
                  **peak_memory_mib(resolve(args)[0]))
    if mode in ("cache", "cache_build"):
        files = list((pathlib.Path(args.work) / "feature-cache").rglob("*.npy"))
        result["cache_bytes_per_image"] = sum(f.stat().st_size for f in files) / max(1, len(files))
        result["cache_images"] = len(files)
    return result


def run_child(what: str, args, argv: list[str]) -> dict:
    """Run this script as a child for one mode; its last stdout line is the JSON result."""
    cmd = [sys.executable, __file__, *argv, "--child", what, "--root", str(args.root), "--work", str(args.work)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return dict(mode=what, error=f"exit {proc.returncode}: {tail[:300]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit_b", help="MARIS preset (default vit_b)")
    p.add_argument("--image-size", type=int, default=1024, help="S (default 1024)")
    p.add_argument("--batch", type=int, default=8, help="sentences per step (default 8)")
    p.add_argument("--k", type=int, default=7, help="sentences per image of the grouped mode (default 7)")
    p.add_argument("--cache-k", type=int, default=1, help="--sentences-per-image of the cache mode (default 1)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="training modes (default: all)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per mode (default 30)")
    p.add_argument("--log-every", type=int, default=10, help="steps per items/s window (default 10)")
    p.add_argument("--floor-warmup", type=int, default=2, help="untimed encoder batches of the floor (default 2)")
    p.add_argument("--floor-iters", type=int, default=5, help="timed encoder batches of the floor (default 5)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--precision", default="auto", help="train.py --precision (default auto: bf16 on CUDA)")
    p.add_argument("--workers", type=int, default=None, help="train.py --workers (default: train.py's)")
    p.add_argument("--compile", action="store_true", help="train.py --compile")
    p.add_argument("--sam-attention", default="stock", help="stock | sdpa (--model-set sam_attention=...)")
    p.add_argument("--refcoco-mini", type=pathlib.Path, default=SHARED, help=f"refer root to repeat (default {SHARED})")
    p.add_argument("--copies", type=int, default=None,
                   help="copies of it (default: enough for --steps x --batch sentences)")
    p.add_argument("--work-dir", type=pathlib.Path, default=None,
                   help="runs and the feature cache go here (default: a temporary folder, deleted afterwards)")
    p.add_argument("--json", type=pathlib.Path, default=None, help="also write the results as JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        result = child_floor(args) if args.child == "floor" else child_train(args.child, args)
        print(json.dumps(result))
        return result

    import torch

    from refer_repeat import repeat_refer_root
    raw = list(sys.argv[1:] if argv is None else argv)
    items = args.steps * args.batch
    # Many more images than a run visits, so i.i.d. batches rarely hold two sentences of one image (RefCOCO:
    # 16,994 images); a run reads the first --steps batches of the epoch's order, the same in every mode.
    copies = args.copies or max(100, math.ceil(4 * items / FIXTURE_SENTENCES))
    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else args.device
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"device: {gpu} | torch {torch.__version__} | "
          f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    with tempfile.TemporaryDirectory(prefix="bench-train-speed-") as tmp:
        args.work = args.work_dir or pathlib.Path(tmp)
        args.work.mkdir(parents=True, exist_ok=True)
        args.root = repeat_refer_root(args.refcoco_mini, args.work / "root", copies)
        import data
        ds = data.RefDataset(args.root, "refcoco", "unc", "train", load_images=False, load_masks=False)
        dataset = dict(sentences=len(ds), images=len(set(ds.image_ids)))
        print(f"setup: {args.preset} S={args.image_size} batch {args.batch} precision {args.precision} "
              f"attention {args.sam_attention} compile {args.compile} workers "
              f"{args.workers if args.workers is not None else 'train.py default'}; "
              f"{args.steps} steps per mode ({items} "
              f"sentences) of an epoch of refcoco-mini x {copies} ({dataset['sentences']} sentences on "
              f"{dataset['images']} images); items/s = median of the windows of {args.log_every} steps after the first")
        results = {"floor": run_child("floor", args, raw)}
        for mode in args.modes:
            if mode == "cache":
                results["cache_build"] = run_child("cache_build", args, raw)
            results[mode] = run_child(mode, args, raw)
        disk = shutil.disk_usage(args.work)
    floor = results["floor"]
    if "error" in floor:
        print(f"floor: {floor['error']}")
    else:
        print(f"floor: SAM encoder {1e3 * floor['seconds_per_image']:.1f} ms per image at batch {args.batch} "
              f"({1 / floor['seconds_per_image']:.2f} images/s): an epoch of these {dataset['images']} images "
              f"{dataset['images'] * floor['seconds_per_image']:.1f} s; of RefCOCO train "
              f"{REFCOCO_TRAIN['images'] * floor['seconds_per_image'] / 60:.1f} min")
    print(f"{'mode':13s} {'K':>2s} {'items/s':>8s} {'passes/item':>11s} {'peak MiB':>9s} {'x floor':>8s} "
          f"{'RefCOCO epoch':>13s} {'x floor':>8s}")
    for mode in ("per_sentence", "grouped", "cache_build", "cache"):
        r = results.get(mode)
        if r is None:
            continue
        if "error" in r:
            print(f"{mode:13s} failed: {r['error']}")
            continue
        passes = r["encoder_passes"] / items
        mem = r.get("peak_cuda_mib", r["peak_rss_mib"])
        line = f"{mode:13s} {r['k']:2d} {r['items_per_s']:8.2f} {passes:11.2f} {mem:9.0f}"
        if "error" not in floor:
            run_ratio = (dataset["sentences"] / r["items_per_s"]) / (dataset["images"] * floor["seconds_per_image"])
            epoch_s = REFCOCO_TRAIN["sentences"] / r["items_per_s"]
            ref_ratio = epoch_s / (REFCOCO_TRAIN["images"] * floor["seconds_per_image"])
            r.update(x_floor=run_ratio, refcoco_epoch_s=epoch_s, refcoco_x_floor=ref_ratio)
            line += f" {run_ratio:8.2f} {epoch_s / 60:10.1f} min {ref_ratio:8.2f}"
        print(line)
    cache = results.get("cache")
    if cache and "cache_bytes_per_image" in cache:
        total = cache["cache_bytes_per_image"] * REFCOCO_TRAIN["images"]
        print(f"cache: {cache['cache_bytes_per_image'] / 2**20:.2f} MiB per image on disk -> RefCOCO train "
              f"{total / 2**30:.0f} GiB; this machine's disk at {args.work_dir or 'the temporary folder'}: "
              f"{disk.free / 2**30:.0f} GiB free of {disk.total / 2**30:.0f} GiB")
    print("peak MiB: torch.cuda.max_memory_allocated on CUDA, else the peak RSS, of each mode's own process. "
          "passes/item: images SAM's encoder ran on per sentence. x floor: an epoch at this items/s over the "
          "encoder's time for the epoch's distinct images, on the repeated set and on RefCOCO's train split "
          "(target for grouped: <= 1.5)")
    out = dict(setup={k: str(v) for k, v in vars(args).items()}, device=gpu, dataset=dataset, items=items,
               results=results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
