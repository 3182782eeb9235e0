"""What the new MARIS modules cost on top of SAM's image encoder, at inference.

Times the whole MARIS forward (SAM encoder + CLIP text tower + Feature Enhancement + Mutual-Aware
Attention + Mutual-Aware Mask Decoder) against SAM's image encoder alone on the same input, and
reports the peak memory of each. Each measurement runs in its own child process so that the
peak resident memory (CPU) of one does not hide the other's.

    python bench/overhead.py                       # vit_b, S = 1024, batch 1, CPU
    python bench/overhead.py --preset tiny --repeats 20
    python bench/overhead.py --device cuda         # on a GPU: peak = torch.cuda.max_memory_allocated

Target (README, "Performance"): the new modules add <= 10 % to SAM's encoder time on CPU. Weights are random
(timing does not depend on their values). Prints one summary line per figure.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


MODES = ("sam", "maris", "new_modules")


def measure(modes: list[str], args) -> dict:
    """In a child process: build the model, time each mode (interleaved), report times and peak memory.

    Modes: "sam" = SAM's image encoder forward alone; "maris" = the whole MARIS forward from pixels;
    "new_modules" = MARIS from precomputed encoder features (text tower, Feature Enhancement,
    Mutual-Aware Attention, decoder: exactly what MARIS adds). Interleaving the modes within each
    repeat cancels slow drifts of a shared machine.
    """
    import torch

    import maris
    from data import tokenize

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides = {"image_size": args.image_size} if args.image_size else {}
    cfg = maris.make_config(args.preset, **overrides)
    model = maris.MARIS(cfg).to(device).eval()
    S = cfg.image_size
    images = torch.randn(args.batch, 3, S, S, device=device)
    ids, word_mask = tokenize(["the girl on the very left"] * args.batch, cfg.context_length)
    ids, word_mask = ids.to(device), word_mask.to(device)
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    with torch.inference_mode():
        features = model.encode_image(images) if "new_modules" in modes else None
    run = {
        "sam": lambda: model.image_encoder(images),  # SAM's own forward: patch embed, blocks, neck
        "maris": lambda: model(images, ids, word_mask),
        "new_modules": lambda: model(None, ids, word_mask, image_features=features),
    }
    times = {m: [] for m in modes}
    cuda_peak = {}
    with torch.inference_mode():
        for i in range(args.warmup + args.repeats):
            for mode in modes:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                run[mode]()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    cuda_peak[mode] = torch.cuda.max_memory_allocated() / 2**20
                if i >= args.warmup:
                    times[mode].append((time.perf_counter() - t0) * 1000)
    out = {"times_ms": times, "rss_built_mib": rss_built, "image_size": S,
           "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_peak_mib"] = cuda_peak
        out["gpu"] = torch.cuda.get_device_name()
    return out


def child(modes: list[str], argv: list[str], repeats: int | None = None) -> dict:
    """Run `measure` in a fresh interpreter (its own peak memory) and return its report."""
    extra = ["--repeats", str(repeats), "--warmup", "0"] if repeats is not None else []
    cmd = [sys.executable, __file__, *argv, *extra, "--child", ",".join(modes)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"child {modes} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit_b", help="MARIS preset (tiny, vit_b, vit_l, vit_h); default vit_b")
    p.add_argument("--image-size", type=int, default=None, help="input side S (default: the preset's)")
    p.add_argument("--batch", type=int, default=1, help="images per forward (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per mode; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards first (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child.split(","), args)))
        return

    argv = list(argv if argv is not None else sys.argv[1:])
    timing = child(list(MODES), argv)
    memory = {mode: child([mode], argv, repeats=1) for mode in ("sam", "maris")}  # one process each
    med = {m: statistics.median(timing["times_ms"][m]) for m in MODES}
    print(f"setup: preset={args.preset} S={timing['image_size']} batch={args.batch} device={args.device} "
          f"repeats={args.repeats} interleaved (median of each)")
    print(f"sam_encoder_ms: {med['sam']:.1f}")
    print(f"maris_forward_ms: {med['maris']:.1f}")
    print(f"new_modules_ms: {med['new_modules']:.1f} (MARIS from cached encoder features)")
    print(f"new_modules_overhead: {100 * med['new_modules'] / med['sam']:.1f} % of SAM's encoder time "
          f"(whole forward / encoder = {med['maris'] / med['sam']:.3f}; target <= 10 %)")
    for mode in ("sam", "maris"):
        r = memory[mode]
        line = f"peak_memory_{mode}: rss {r['rss_peak_mib']:.0f} MiB (after build {r['rss_built_mib']:.0f} MiB)"
        if "cuda_peak_mib" in r:
            line += f", cuda {r['cuda_peak_mib'][mode]:.0f} MiB on {r['gpu']}"
        print(line)


if __name__ == "__main__":
    main()
