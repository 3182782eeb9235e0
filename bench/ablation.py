"""The paper's ablations on the built-in shapes task: MARIS and each single change, several seeds, one table.

    python bench/ablation.py --jobs 2                         # every variant x 3 seeds, the demo's schedule
    python bench/ablation.py --variants maris vga_only --seeds 1
    python bench/ablation.py --steps 1112                     # another budget (optimizer steps per run)
    python bench/ablation.py --quick                          # smoke test: 1 seed, 2 steps, S = 32, 8 items
    python bench/ablation.py --train-flags "--train-scenes 1000 --sentences-per-image 1"   # other train.py flags

Each run is `train.main([...])` (train.py's public entry point) with the shapes demo's default settings
(train.py's "auto" values for shapes: the tiny preset, its learning rate, warm-up and batch size), one
`--model-set` switch for the variant, `--seed k` (the seed of the model initialisation and of the data
order) and `--eval-every 0`: the validation split is scored once, at the end. Variants (`VARIANTS`):
MARIS, then each single change of `MarisConfig`: the fusion of Fig. 4 (Vision-Guided Attention alone,
Language-Guided Attention alone, both with separate affinities, no fusion blocks), the query token of
Fig. 5 (learned embedding alone, sentence feature alone), no Feature Enhancement, K = 1 and K = 3 blocks.

Budget: `--steps N` optimizer steps per run, every variant the same; the learning-rate schedule spans the
whole epochs that hold N steps (`--epochs ceil(N / steps per epoch)`, `--max-steps N`), so it decays fully
when N is a whole number of epochs. The default (0) is the demo's own schedule, all of its epochs.

Runs go to <out>/runs/<variant>/seed<k>/ (train.py's last.pt and metrics.jsonl, its printed output in
train.log, and result.json); the console gets a line per run. A run whose result.json exists is not run
again (a result made with other settings is refused: use another --out); a killed run continues from its
last.pt (`--resume auto`, exact), and its result.json then says from which step its seconds count. Prints
the table and writes <out>/ablation.json and, when matplotlib is installed (it is in requirements.txt; a
trimmed environment without it gets no chart), <out>/ablation.png. Seconds are the wall and CPU
(process) time of each `train.main` call, data building and the final validation included; they depend on
the machine and its load.

Each run uses `--threads` torch threads (default 1: two threads per process on a loaded 2-core machine
were many times slower per step); `--jobs 2` runs two at a time, each in its own process, to use both
cores of a 2-core machine.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import data  # noqa: E402
import maris  # noqa: E402
import train  # noqa: E402

# name: (the MarisConfig switches as train.py's --model-set entries, what the paper calls the change)
VARIANTS = {
    "maris": ([], "MARIS: Mutual-Aware Attention, multi-modal query token, Feature Enhancement, K = 2"),
    "vga_only": (["fusion=vga_only"], "Vision-Guided Attention alone (words pass through)"),
    "lga_only": (["fusion=lga_only"], "Language-Guided Attention alone (visual features pass through)"),
    "separate": (["fusion=separate"], "both directions, separate affinities (no shared A)"),
    "no_fusion": (["fusion=none"], "no fusion blocks: the decoder reads F_v and F_l"),
    "learned_query": (["query_token=learned"], "query token: learned embedding alone (no sentence)"),
    "sentence_query": (["query_token=sentence"], "query token: projected sentence feature alone"),
    "no_fe": (["feature_enhancement=false"], "no Feature Enhancement: F_v = SAM's neck"),
    "k1": (["maa_depth=1"], "K = 1 Mutual-Aware Attention block"),
    "k3": (["maa_depth=3"], "K = 3 Mutual-Aware Attention blocks"),
}
# --quick: a few steps of a tiny run per variant, to check that the script runs end to end.
QUICK = dict(steps=2, seeds=1, extra=["--image-size", "32", "--train-limit", "8", "--batch-size", "4",
                                      "--val-limit", "8", "--warmup-steps", "1"])
METRICS = ("oIoU", "mIoU", "Prec@0.5")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per variant (default 3)")
    p.add_argument("--steps", type=int, default=0,
                   help="optimizer steps per run (default 0: the demo's whole schedule)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME",
                   help=f"variants to run, in this order (default all: {' '.join(VARIANTS)})")
    p.add_argument("--out", default=None,
                   help="output folder (default runs/ablation, runs/ablation-quick with --quick)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per run (default 1: steady on a shared machine)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, each in its own process (default 1; 2 uses both cores of a 2-core machine)")
    p.add_argument("--train-flags", default="", metavar="FLAGS",
                   help="more train.py options for every run, one quoted string (default none: the demo's "
                        "settings), e.g. \"--train-scenes 1000 --sentences-per-image 1\"")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK['seeds']} seed, {QUICK['steps']} steps, {' '.join(QUICK['extra'])}")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    if min(args.seeds, args.threads, args.jobs) < 1 or args.steps < 0:
        p.error(f"--seeds, --threads and --jobs must be >= 1 and --steps >= 0; got {args.seeds}, {args.threads}, "
                f"{args.jobs} and {args.steps}")
    if args.quick:
        args.seeds, args.steps = QUICK["seeds"], QUICK["steps"]
    args.out = pathlib.Path(args.out or ("runs/ablation-quick" if args.quick else "runs/ablation"))
    return args


def budget_args(args: argparse.Namespace) -> tuple[list[str], dict]:
    """train.py flags shared by every run (the budget; --quick's sizes) and a description of the budget."""
    extra = (list(QUICK["extra"]) if args.quick else []) + shlex.split(args.train_flags)
    opts = train.resolve_options(train.maris.parse_options(train.TrainOptions, extra, train.DESCRIPTION)[0])
    if args.steps == 0:
        # The demo's own schedule: its epochs, as many steps as they hold.
        return extra, dict(steps=None, epochs=opts.epochs, batch_size=opts.batch_size)
    # The demo's training split (its --train-scenes) and batching (its --sentences-per-image), as train.py builds them.
    image_ids = list(data.build_dataset("shapes", "train", image_size=maris.make_config(opts.preset).image_size,
                                        load_images=False, load_masks=False, num_images=opts.train_scenes).image_ids)
    if opts.train_limit:
        image_ids = image_ids[:opts.train_limit]
    per_epoch = len(train.epoch_batches(len(image_ids), batch_size=opts.batch_size, seed=0, epoch=0, rank=0, world=1,
                                        image_ids=image_ids, sentences_per_image=opts.sentences_per_image))
    epochs = math.ceil(args.steps / per_epoch)
    if args.steps % per_epoch:
        print(f"note: {args.steps} steps are not a whole number of epochs ({per_epoch} steps each): the "
              f"learning-rate schedule spans {epochs} epochs and stops before it has decayed")
    return [*extra, "--epochs", str(epochs), "--max-steps", str(args.steps)], dict(
        steps=args.steps, epochs=epochs, steps_per_epoch=per_epoch, batch_size=opts.batch_size)


def trainable_parameters(config: dict) -> int:
    """Trainable parameters of the model a run's checkpoint config builds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random frozen encoders are expected here
        model = maris.build_model(config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_one(name: str, seed: int, shared: list[str], out: pathlib.Path) -> dict:
    """Train one variant with one seed through `train.main`, or read its earlier result.json."""
    run_dir = out / "runs" / name / f"seed{seed}"
    argv = ["--dataset", "shapes", "--seed", str(seed), "--out-dir", str(run_dir), "--eval-every", "0",
            "--no-progress", "--resume", "auto", *shared]
    for switch in VARIANTS[name][0]:
        argv += ["--model-set", switch]
    result_path = run_dir / "result.json"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if result.get("argv") != argv:
            raise SystemExit(f"error: {result_path} was made with other settings ({' '.join(result.get('argv', []))});"
                             f" use another --out or delete it")
        print(f"{name} seed {seed}: done earlier ({result_path})")
        return result
    last = run_dir / "last.pt"
    resumed_from = torch.load(last, map_location="cpu", weights_only=True)["step"] if last.is_file() else 0
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "train.log"
    print(f"{name} seed {seed}: python train.py {' '.join(argv)}  (output in {log})", flush=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        wall, cpu = time.perf_counter(), time.process_time()
        outcome = train.main(argv)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if outcome["stopped_by"] or outcome["val"] is None:
        raise SystemExit(f"error: {name} seed {seed} did not finish (stopped by {outcome['stopped_by']}); "
                         f"run the same command again to continue it")
    config = torch.load(last, map_location="cpu", weights_only=True)["config"]
    result = dict(variant=name, seed=seed, argv=argv, step=outcome["step"],
                  **{k: outcome["val"][k] for k in (*METRICS, "count")},
                  trainable=trainable_parameters(config), seconds=round(wall, 2), cpu_seconds=round(cpu, 2),
                  resumed_from_step=resumed_from)
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, result_path)  # a result.json is complete or absent
    print(f"{name} seed {seed}: val oIoU {100 * result['oIoU']:.2f} after {result['step']} steps, "
          f"{result['seconds']:.0f} s ({result['cpu_seconds']:.0f} s CPU)", flush=True)
    return result


def run_many(tasks: list[tuple[str, int]], shared: list[str], args: argparse.Namespace) -> dict:
    """{(variant, seed): result} of every task, `args.jobs` at a time (worker processes when > 1)."""
    names, seeds = [t[0] for t in tasks], [t[1] for t in tasks]
    rest = [[shared] * len(tasks), [args.out] * len(tasks)]
    if args.jobs == 1:
        return dict(zip(tasks, map(run_one, names, seeds, *rest)))
    # "spawn": a fresh interpreter per worker (no forked torch thread pools); each runs --threads threads.
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=torch.set_num_threads, initargs=(args.threads,)) as pool:
        return dict(zip(tasks, pool.map(run_one, names, seeds, *rest)))


def summarise(name: str, runs: list[dict]) -> dict:
    """Mean (and sample standard deviation over seeds, None for one seed) of each figure, in percent."""
    row = dict(variant=name, switches=VARIANTS[name][0], description=VARIANTS[name][1], seeds=len(runs),
               trainable=runs[0]["trainable"], steps=runs[0]["step"])
    for key in (*METRICS, "seconds", "cpu_seconds"):
        values = [r[key] * (100 if key in METRICS else 1) for r in runs]
        row[key] = statistics.fmean(values)
        row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else None
        row[key + "_per_seed"] = values
    return row


def format_table(rows: list[dict]) -> str:
    """The table: variant, val oIoU mean +- std, mIoU, Prec@0.5, trainable parameters, seconds."""
    lines = [f"{'variant':15s} {'switch':27s} {'val oIoU':>14s} {'mIoU':>6s} {'Prec@0.5':>8s} "
             f"{'trainable':>10s} {'s/run':>7s} {'CPU s/run':>9s}"]
    for r in rows:
        oiou = f"{r['oIoU']:.2f}" + ("" if r["oIoU_std"] is None else f" ± {r['oIoU_std']:.2f}")
        lines.append(f"{r['variant']:15s} {' '.join(r['switches']) or '(defaults)':27s} {oiou:>14s} "
                     f"{r['mIoU']:6.2f} {r['Prec@0.5']:8.2f} {r['trainable']:>10,d} "
                     f"{r['seconds']:7.1f} {r['cpu_seconds']:9.1f}")
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: pathlib.Path) -> bool:
    """A horizontal bar chart of val oIoU (mean, std whiskers, one dot per seed) and mIoU; False without
    matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows[::-1]  # the first variant on top
    y = range(len(rows))
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.55 * len(rows)), dpi=120)
    colours = ["#1f5fa8" if r["variant"] == "maris" else "#8aa9cf" for r in rows]
    ax.barh([i + 0.17 for i in y], [r["oIoU"] for r in rows], height=0.34, color=colours, label="val oIoU",
            xerr=[r["oIoU_std"] or 0 for r in rows], error_kw=dict(ecolor="#333333", capsize=3, lw=1))
    ax.barh([i - 0.17 for i in y], [r["mIoU"] for r in rows], height=0.34, color="#d9d9d9", label="val mIoU")
    for i, r in zip(y, rows):
        ax.plot(r["oIoU_per_seed"], [i + 0.17] * len(r["oIoU_per_seed"]), "o", ms=3, color="#111111",
                zorder=3, label="one seed" if i == 0 else None)
        std = "" if r["oIoU_std"] is None else f" ± {r['oIoU_std']:.1f}"
        right = max([r["oIoU"] + (r["oIoU_std"] or 0), *r["oIoU_per_seed"]])  # clear of whisker and dots
        ax.text(right + 1.2, i + 0.17, f"{r['oIoU']:.1f}{std}", va="center", fontsize=8)
    maris_row = next((r for r in rows if r["variant"] == "maris"), None)
    if maris_row is not None:
        ax.axvline(maris_row["oIoU"], color="#1f5fa8", ls="--", lw=0.8, label="MARIS val oIoU")
    ax.set_yticks(list(y), [f"{r['variant']}\n{' '.join(r['switches']) or 'defaults'}" for r in rows], fontsize=8)
    ax.set_xlabel("IoU on the shapes val split (%)")
    ax.set_xlim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    """Run (or read) every variant x seed, print the table, write ablation.json and ablation.png."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run_all(args, argv)
    finally:
        torch.set_num_threads(threads)


def run_all(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """`main` after the options and the thread count are set."""
    shared, budget = budget_args(args)
    results = run_many([(name, seed) for name in args.variants for seed in range(args.seeds)], shared, args)
    rows = [summarise(name, [results[name, seed] for seed in range(args.seeds)]) for name in args.variants]
    steps = rows[0]["steps"] if rows else budget["steps"]
    title = (f"MARIS ablations on the shapes task: {args.seeds} seed(s), {steps} steps per run"
             + (" (--quick)" if args.quick else ""))
    table = format_table(rows)
    print(f"\n{title}\n{table}")
    report = dict(title=title, command=["python", "bench/ablation.py", *(argv if argv is not None else sys.argv[1:])],
                  budget=budget, train_flags=shared, quick=args.quick,
                  machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                               torch_threads=torch.get_num_threads()),
                  variants=rows, table=table)
    (args.out / "ablation.json").write_text(json.dumps(report, indent=1))
    png = args.out / "ablation.png"
    if plot(rows, title, png):
        print(f"wrote {args.out / 'ablation.json'} and {png}")
    else:
        print(f"wrote {args.out / 'ablation.json'}; no chart: matplotlib is not installed (pip install matplotlib)")
    return report


if __name__ == "__main__":
    main()
