"""SAM image-encoder throughput (images/s) and MFU: fp32 vs bf16, eager vs torch.compile, stock vs SDPA attention.

The frozen encoder is MARIS's cost: SAM ViT-H is 2.97 TMAC (5.9 TFLOP) per 1024 x 1024 image, ViT-B 0.49 TMAC.
For every combination of the flags below this times SAM's `ImageEncoderViT` forward (no autograd, as MARIS
runs it) and prints images/s, the achieved TFLOP/s and the MFU = achieved FLOP/s / the device's peak. The
FLOPs per image are counted once per preset by `torch.utils.flop_counter.FlopCounterMode` on the meta device
(a library count of the stock forward; the SDPA path does the same work) and printed next to the reference
figures above; the peak comes from `PEAK_TFLOPS` by GPU name or from --peak-tflops.

    python bench/encoder.py --preset vit_h vit_b --device cuda                 # the full table on a GPU, S = 1024
    python bench/encoder.py --preset vit_h --device cuda --compile eager compiled --dtype bf16
    python bench/encoder.py --preset tiny --device cpu --iters 2               # a CPU smoke run (seconds)
    python bench/encoder.py --preset vit_b --image-size 256 --device cpu --batch 1 --iters 2
    python bench/encoder.py --preset vit_b vit_h --flops-only                # the FLOP counts alone (seconds)

"bf16" is bf16 autocast over the fp32 weights (what train.py and evaluate.py run); "bf16-weights" casts the
encoder itself to bf16 (no autocast). Weights are random: the time of a forward does not depend on them.
Rows are printed as they finish and `--json PATH` is rewritten after each row, so a run stopped by a time
limit keeps what it measured. A combination that fails (out of memory, a compile error) prints its error
and the run goes on.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import pathlib
import platform
import resource
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import maris  # noqa: E402

# Dense peak TFLOP/s by GPU name: (substring of torch.cuda.get_device_name(), bf16 tensor core, fp32 without
# tensor cores); the first match wins. Source: NVIDIA's product data sheets for the H100, H200 and A100 Tensor
# Core GPUs, which print the bf16 figure "with sparsity": the dense peak is half of it (H100 SXM / H200:
# 1,979 -> 989; H100 NVL / H200 NVL: 1,671 -> 835; H100 PCIe: 1,513 -> 756; A100: 624 -> 312).
PEAK_TFLOPS = (
    ("H200 NVL", 835.0, 60.0),
    ("H200", 989.0, 67.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),  # H100 SXM5: torch names it "NVIDIA H100 80GB HBM3"
    ("A100", 312.0, 19.5),
)
# The figures quoted for SAM's encoders at S = 1024, in TMAC per image (1 MAC = 2 FLOP), to check the count.
REFERENCE_TMAC = {"vit_b": 0.49, "vit_h": 2.97}
DTYPES = ("fp32", "bf16", "bf16-weights")
COMPILE = ("eager", "compiled")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (the platform's processor string elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def peak_tflops(name: str, dtype: str, args) -> float | None:
    """Peak TFLOP/s for a dtype: --peak-tflops / --peak-tflops-fp32, else the table; None when unknown."""
    override = args.peak_tflops_fp32 if dtype == "fp32" else args.peak_tflops
    if override:
        return override
    for key, bf16, fp32 in PEAK_TFLOPS:
        if key in name:
            return fp32 if dtype == "fp32" else bf16
    return None


def build_encoder(preset: str, image_size: int | None, device: torch.device | str
                  ) -> tuple[torch.nn.Module, maris.MarisConfig]:
    """SAM's image encoder of a MARIS preset (random weights), frozen and in eval mode."""
    cfg = maris.make_config(preset, **({"image_size": image_size} if image_size else {}))
    with torch.device(device):
        encoder = maris.build_sam_image_encoder(
            image_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.sam_embed_dim,
            depth=cfg.sam_depth, num_heads=cfg.sam_num_heads, global_attn_indexes=cfg.sam_global_attn_indexes,
            window_size=cfg.sam_window_size, out_chans=cfg.embed_dim)
    return encoder.requires_grad_(False).eval(), cfg


def count_flops(preset: str, image_size: int | None) -> int:
    """FLOPs of one image through the stock encoder, counted by FlopCounterMode on the meta device."""
    encoder, cfg = build_encoder(preset, image_size, "meta")
    image = torch.empty(1, 3, cfg.image_size, cfg.image_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder(image)
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_combination(encoder: torch.nn.Module, images: torch.Tensor, *, dtype: str, compiled: bool, args,
                     device: torch.device) -> dict:
    """Time one (dtype, compile) combination of an encoder whose attention is already set.

    Returns dict(first_call_s = the first forward, compilation included; median_s / min_s over --iters timed
    forwards after --warmup more; cpu_median_s = the median process CPU time of a timed forward;
    peak_mib = the device memory peak, CUDA only).
    """
    module = encoder.to(torch.bfloat16) if dtype == "bf16-weights" else encoder.float()
    x = images.to(torch.bfloat16) if dtype == "bf16-weights" else images
    if compiled:
        torch._dynamo.reset()  # a fresh compilation per combination: its time is part of the row
        module = torch.compile(module, mode=args.compile_mode)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())
    backend = contextlib.nullcontext()
    if args.sdpa_backend != "auto":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = sdpa_kernel([getattr(SDPBackend, args.sdpa_backend.upper())])
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with torch.no_grad(), autocast, backend:
        start = time.perf_counter()
        module(x)
        synchronize(device)
        first = time.perf_counter() - start
        for _ in range(args.warmup):
            module(x)
        synchronize(device)
        cpu_times = []
        for _ in range(args.iters):
            start, cpu_start = time.perf_counter(), time.process_time()
            module(x)
            synchronize(device)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    # process CPU time (all threads): on a shared CPU machine a steadier figure than the wall time
    out = dict(first_call_s=first, median_s=statistics.median(times), min_s=min(times),
               cpu_median_s=statistics.median(cpu_times))
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["vit_b"], choices=sorted(maris.PRESETS),
                   help="MARIS presets whose SAM encoder to time (default vit_b)")
    p.add_argument("--image-size", type=int, default=None, help="input side S (default: the preset's, 1024 for SAM)")
    p.add_argument("--batch", type=int, default=None, help="images per forward (default 8 on CUDA, 1 on CPU)")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=DTYPES,
                   help="fp32 | bf16 (autocast over fp32 weights, as training) | bf16-weights (default fp32 bf16)")
    p.add_argument("--compile", nargs="+", default=["eager"], choices=COMPILE,
                   help="eager and/or compiled (torch.compile of the whole encoder; default eager)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode, e.g. max-autotune-no-cudagraphs (default: torch's default)")
    p.add_argument("--attention", nargs="+", default=list(maris.SAM_ATTENTION_KINDS),
                   choices=maris.SAM_ATTENTION_KINDS, help="SAM attention paths (default: stock sdpa)")
    p.add_argument("--sdpa-backend", default="auto", choices=("auto", "efficient_attention", "cudnn_attention",
                                                             "flash_attention", "math"),
                   help="restrict F.scaled_dot_product_attention to one backend (default auto: PyTorch picks)")
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards after the first (default 3)")
    p.add_argument("--iters", type=int, default=10, help="timed forwards; the median is reported (default 10)")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 peak TFLOP/s of the device (default: PEAK_TFLOPS by GPU name)")
    p.add_argument("--peak-tflops-fp32", type=float, default=None,
                   help="fp32 peak TFLOP/s of the device (default: PEAK_TFLOPS by GPU name)")
    p.add_argument("--json", type=pathlib.Path, default=None, help="also write the header and rows as JSON here")
    p.add_argument("--flops-only", action="store_true", help="print the FLOP counts and stop (no timing)")
    args = p.parse_args(argv)
    if args.flops_only:
        counts = {}
        for preset in args.preset:
            counts[preset] = flops = count_flops(preset, args.image_size)
            S = args.image_size or maris.PRESETS[preset].get("image_size", maris.MarisConfig.image_size)
            ref = REFERENCE_TMAC.get(preset) if S == 1024 else None
            print(f"FlopCounterMode, {preset} at S = {S}: {flops / 1e9:,.1f} GFLOP = {flops / 2e12:.4f} TMAC per image"
                  + (f" (reference: {ref} TMAC)" if ref else ""))
        return {"flops": counts}

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (8 if device.type == "cuda" else 1)
    name = device_name(device)
    header = dict(device=name, torch=torch.__version__, cuda=torch.version.cuda,
                  date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  command="python bench/encoder.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  batch=batch, threads=torch.get_num_threads(), warmup=args.warmup, iters=args.iters,
                  sdpa_backend=args.sdpa_backend, compile_mode=args.compile_mode,
                  tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                  peak_tflops={d: peak_tflops(name, d, args) for d in ("fp32", "bf16")})
    print(f"device: {name} | torch {torch.__version__} (CUDA {torch.version.cuda}) | {header['date']}")
    print(f"setup: batch {batch}, {args.warmup} warm-up + {args.iters} timed forwards (median), no autograd, "
          f"threads {header['threads']}, SDPA backend {args.sdpa_backend}, TF32 matmul {header['tf32_matmul']}, "
          f"peak TFLOP/s {header['peak_tflops']}")
    result = dict(header=header, flops={}, rows=[])

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))

    columns = (f"{'preset':7s} {'S':>5s} {'attention':9s} {'dtype':12s} {'compile':8s} {'ms/batch':>9s} "
               f"{'images/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak MiB':>9s} {'1st call s':>10s} {'CPU ms':>9s}")
    for preset in args.preset:
        flops = count_flops(preset, args.image_size)
        encoder, cfg = build_encoder(preset, args.image_size, device)
        S = cfg.image_size
        ref = REFERENCE_TMAC.get(preset) if S == 1024 else None
        result["flops"][preset] = dict(image_size=S, flop_per_image=flops, reference_tmac=ref)
        print(f"\nFlopCounterMode, {preset} at S = {S}: {flops / 1e9:,.1f} GFLOP = {flops / 2e12:.4f} TMAC per image"
              + (f" (reference: {ref} TMAC)" if ref else ""))
        print(columns)
        images = torch.randn(batch, 3, S, S, device=device)
        for attention, dtype, mode in itertools.product(args.attention, args.dtype, args.compile):
            maris.set_sam_attention(encoder, attention)
            row = dict(preset=preset, image_size=S, batch=batch, attention=attention, dtype=dtype, compile=mode)
            try:
                row.update(time_combination(encoder, images, dtype=dtype, compiled=mode == "compiled",
                                            args=args, device=device))
            except Exception as e:  # noqa: BLE001 - one failing combination must not end the table
                row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                print(f"{preset:7s} {S:5d} {attention:9s} {dtype:12s} {mode:8s} failed: {row['error']}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                result["rows"].append(row)
                save()
                continue
            row["images_per_s"] = batch / row["median_s"]
            row["tflops"] = flops * row["images_per_s"] / 1e12
            peak = peak_tflops(name, "fp32" if dtype == "fp32" else "bf16", args)
            row["mfu"] = row["tflops"] / peak if peak else None
            if device.type == "cpu":
                row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process so far
            mfu = f"{100 * row['mfu']:5.1f}%" if row["mfu"] is not None else "   n/a"
            mem = (f"{row['peak_mib']:9.0f}" if "peak_mib" in row
                   else f"{'rss ' + format(row['peak_rss_mib'], '.0f'):>9s}")
            print(f"{preset:7s} {S:5d} {attention:9s} {dtype:12s} {mode:8s} {1e3 * row['median_s']:9.1f} "
                  f"{row['images_per_s']:9.2f} {row['tflops']:8.2f} {mfu:>6s} {mem} {row['first_call_s']:10.1f} "
                  f"{1e3 * row['cpu_median_s']:9.1f}")
            result["rows"].append(row)
            save()
        del encoder, images
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ok = {(r["preset"], r["dtype"], r["compile"], r["attention"]): r for r in result["rows"] if "error" not in r}
    ratios = [(k[:3], ok[(*k[:3], "stock")]["median_s"] / r["median_s"]) for k, r in ok.items()
              if k[3] == "sdpa" and (*k[:3], "stock") in ok]
    if ratios:
        print("\nsdpa / stock speed (> 1: SDPA faster): "
              + ", ".join(f"{p} {d} {c} {x:.2f}x" for (p, d, c), x in ratios))
    print("MFU = counted FLOP/s over the peak of the row's dtype (bf16 rows: the bf16 tensor-core peak; fp32 rows: "
          "the fp32 peak without tensor cores). Peak MiB: torch.cuda.max_memory_allocated on CUDA; on CPU the "
          "process's peak RSS so far. CPU ms: process CPU time (all threads) of a timed forward.")
    save()
    return result


if __name__ == "__main__":
    main()
