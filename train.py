"""Train MARIS (DESIGN.md §7): single process or `torchrun` DDP, atomic checkpoints, exact resume.

    python train.py                                   # tiny preset on the built-in shapes data, CPU
    python train.py --dataset refcoco --sam-checkpoint sam_vit_b_01ec64.pth --clip-checkpoint ViT-B-16.pt
    torchrun --nproc_per_node 4 train.py --dataset refcoco ...        # DDP (NCCL on GPU, gloo on CPU)
    python train.py --resume auto                     # continue <out-dir>/last.pt exactly
    python train.py --mask-grounding-weight 0.1 --alignment-weight 0.1   # + MagNet's losses (CVPR 2024)
    python train.py --adapters                        # + RISAM's adapters: SAM's encoder fine-tuned cheaply
    python train.py --feature-cache cache/            # SAM's frozen encoder runs once per image, ever

Every option is a field of `TrainOptions`; `python train.py --help` lists them with their defaults.
Options left at "auto" get a dataset-dependent value (`resolve_options`): the shapes demo trains the
tiny preset from scratch with a larger learning rate for a few minutes on a CPU; the RefCOCO family
uses the MARIS recipe (vit_b, lr 1e-4, 50 epochs); both use batch 8 per process.

Exact resume: the order of the training items is a pure function of (seed, epoch) (a
DistributedSampler permutation), so a checkpoint stores the epoch and the number of batches already
done in it; resuming skips those batches and restores the optimizer, scheduler and every RNG state.
On a CPU, N steps + resume + N steps give the same weights, bit for bit, as 2N straight steps
(MagNet's random word masking draws from a generator of its own, stored in the checkpoint too).

Speed (DESIGN.md §7): every batch is collated by `data.collate_images`, so SAM's frozen encoder
runs once per distinct image of a batch (`--sentences-per-image K` puts K sentences of an image in
one batch); `--feature-cache DIR` stores its outputs per image on disk and reads them back in
later epochs (not with `--adapters`, which change them); `--compile` compiles the trained modules.
MagNet's heads are training-only: checkpoints keep them under "heads", beside the model's
trainable weights, and evaluate.py ignores them.
"""
import argparse
import dataclasses
import json
import math
import os
import pathlib
import random
import signal
import time
import typing
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import maris
from evaluate import (autocast, batch_image_inputs, build_model, check_precision, evaluate_model, open_feature_cache,
                      setup_distributed, state_dict_sha256, without_nan)


# --- Options ---

def _opt(default, help: str, auto: str | None = None, **kw):
    """A TrainOptions field with its help text (and what "auto" resolves to, for None defaults)."""
    return field(default=default, metadata={"help": help, "auto": auto, **kw})


@dataclass
class TrainOptions:
    """Every command-line option of train.py (flag = field name with '-' for '_')."""

    # data
    dataset: str = _opt("shapes", "shapes (built-in, no download) | refcoco | refcoco+ | refcocog")
    split_by: str | None = _opt(None, "partition of the RefCOCO family: unc | google | umd",
                                "unc for refcoco/refcoco+, umd for refcocog")
    data_root: str = _opt("data", "refer-layout data root: <root>/refcoco/refs(unc).p, <root>/images/mscoco/...")
    image_dir: str | None = _opt(None, "COCO train2014 image folder", "<data-root>/images/mscoco/images/train2014")
    train_split: str = _opt("train", "split to train on")
    val_split: str = _opt("val", "split scored after each evaluation interval ('' = none)")
    val_limit: int = _opt(0, "score only the first N validation items (0 = the whole split)")
    train_limit: int = _opt(0, "train on the first N training items only (0 = the whole split; quick checks, "
                               "benchmarks)")
    train_scenes: int | None = _opt(None, "shapes only: scenes the generator makes for the training split (scene i "
                                          "is the same for every N, so a larger N adds scenes)", "see AUTO")
    # model
    preset: str | None = _opt(None, "model preset: tiny | vit_b | vit_l | vit_h", "tiny for shapes, else vit_b")
    sam_checkpoint: str | None = _opt(None, "official SAM weights (sam_vit_b_01ec64.pth, ...); none = random encoder")
    clip_checkpoint: str | None = _opt(None, "CLIP weights (OpenAI ViT-B-16.pt, ...); none = random text encoder")
    image_size: int | None = _opt(None, "padded input side S", "the preset's (1024 for SAM presets)")
    context_length: int | None = _opt(None, "text tokens L", "30 for refcocog, else 20")
    loss_focal_weight: float | None = _opt(None, "focal loss weight", "the preset's (20)")
    loss_dice_weight: float | None = _opt(None, "dice loss weight", "the preset's (1)")
    model_set: list | None = _opt(None, "extra MarisConfig overrides, repeatable: --model-set maa_depth=3", "none",
                           multiple=True)
    # MagNet's training-only losses (Chng et al., "Mask Grounding for Referring Image Segmentation",
    # CVPR 2024) and RISAM's adapters (the later version of the MARIS paper); all off = exactly MARIS.
    mask_grounding_weight: float = _opt(0.0, "weight of MagNet's Mask Grounding loss (Chng et al., CVPR 2024): "
                                             "predict masked words from the visual features (0 = off)")
    mask_ratio: float = _opt(0.15, "MagNet Mask Grounding: share of the real word tokens masked")
    mask_grounding_use_mask: bool = _opt(True, "MagNet Mask Grounding: give the head the features pooled inside "
                                               "the ground-truth mask (--no-... = the ablation without it)")
    alignment_weight: float = _opt(0.0, "weight of MagNet's cross-modal alignment loss (Chng et al., CVPR 2024): "
                                        "pixel-to-text contrast, GT pixels positive (0 = off)")
    alignment_temperature: float = _opt(0.07, "MagNet alignment loss: temperature of the cosine similarities")
    adapters: bool = _opt(False, "RISAM's bottleneck adapters in every SAM ViT block (the later MARIS paper's "
                                 "parameter-efficient fine-tuning); only the adapters of the encoder train")
    adapter_ratio: float = _opt(0.25, "RISAM adapters: bottleneck width as a share of the SAM width D")
    # optimisation
    epochs: int | None = _opt(None, "training epochs", "4 for shapes, else 50")
    batch_size: int = _opt(8, "sentences per step per process")
    lr: float | None = _opt(None, "AdamW peak learning rate", "1e-3 for shapes (training from scratch), else 1e-4")
    weight_decay: float = _opt(0.01, "AdamW weight decay (not applied to biases and norm weights)")
    warmup_steps: int | None = _opt(None, "linear warm-up steps", "100 for shapes, else 1000")
    schedule: str = _opt("cosine", "learning-rate decay after warm-up: cosine | poly | constant")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this value (0 = off); metrics.jsonl logs the norm "
                                 "before clipping either way")
    seed: int = _opt(0, "seed of the data order, the model initialisation and every RNG")
    sentences_per_image: int = _opt(1, "keep up to K sentences of one image in a batch and encode each image "
                                       "once (1 = ordinary shuffled batches)")
    max_steps: int = _opt(0, "stop after this many optimizer steps (0 = run all epochs); the schedule keeps "
                             "its full length")
    # speed (DESIGN.md §7)
    feature_cache: str | None = _opt(None, "cache folder of SAM's frozen encoder outputs (fp16, one file per "
                                           "image): the encoder runs once per image for the whole run, not once "
                                           "per epoch; refused with --adapters", "off")
    rebuild_feature_cache: bool = _opt(False, "empty a --feature-cache built for another encoder or input size "
                                              "instead of stopping")
    compile: bool = _opt(False, "torch.compile the trained modules (Feature Enhancement, Mutual-Aware Attention, "
                                "decoder) in place; helps on a GPU, the first steps are slow while it compiles")
    # run
    out_dir: str | None = _opt(None, "where last.pt, best.pt and metrics.jsonl go", "runs/<dataset>")
    resume: str | None = _opt(None, "checkpoint to continue from, or 'auto' = <out-dir>/last.pt when it exists")
    eval_every: int = _opt(1, "score the validation split every N epochs (0 = only at the end)")
    log_every: int = _opt(20, "write a metrics.jsonl line every N steps (losses and gradient norm averaged "
                              "over those steps and the processes)")
    save_every: int = _opt(0, "also write last.pt every N steps (0 = at the end of each epoch only)")
    workers: int | None = _opt(None, "DataLoader worker processes per training process",
                               "0 for shapes (rendering is cheap), else min(4, CPU count)")
    device: str = _opt("auto", "auto (cuda when available) | cpu | cuda | cuda:N")
    precision: str = _opt("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32")
    progress: bool = _opt(True, "show tqdm progress bars")


# Learning-rate decays after warm-up (LRSchedule's kinds).
SCHEDULES = ("cosine", "poly", "constant")
# Values that "auto" options take, per dataset kind (shapes demo vs. the RefCOCO family).
# NOTE(paper): the RefCOCO values are DESIGN.md §7's reconstruction of the MARIS recipe; the shapes
# values were tuned so that `python train.py` gives a useful model in a few minutes on 2 CPU cores.
AUTO = {
    "shapes": dict(preset="tiny", epochs=4, lr=1e-3, warmup_steps=100, workers=0),
    "refcoco": dict(preset="vit_b", epochs=50, lr=1e-4, warmup_steps=1000, workers=min(4, os.cpu_count() or 1)),
}


def resolve_options(opts: TrainOptions) -> TrainOptions:
    """Fill every "auto" (None) option with its dataset-dependent value.

    Raises:
        SystemExit: an unknown dataset, schedule or precision name.
    """
    if opts.dataset != "shapes" and opts.dataset not in data.DATASETS:
        raise SystemExit(f"error: unknown --dataset {opts.dataset!r}; expected shapes or one of "
                         f"{sorted(data.DATASETS)}")
    if opts.schedule not in SCHEDULES:
        raise SystemExit(f"error: --schedule must be one of {', '.join(SCHEDULES)}, got {opts.schedule!r}")
    try:
        check_precision(opts.precision)
    except ValueError as e:
        raise SystemExit(f"error: --{e}") from None
    if opts.dataset != "shapes" and opts.train_scenes is not None:
        raise SystemExit(f"error: --train-scenes is for the generated shapes dataset, not {opts.dataset}")
    kind = "shapes" if opts.dataset == "shapes" else "refcoco"
    values = dataclasses.asdict(opts)
    for key, value in AUTO[kind].items():
        if values[key] is None:
            values[key] = value
    if values["split_by"] is None and opts.dataset != "shapes":
        values["split_by"] = data.DATASETS[opts.dataset][0]
    if values["context_length"] is None:  # data.py's default L for the dataset
        values["context_length"] = data.DEFAULT_CONTEXT_LENGTH[opts.dataset]
    if values["out_dir"] is None:
        values["out_dir"] = str(pathlib.Path("runs") / opts.dataset)
    values["model_set"] = list(values["model_set"] or [])
    return TrainOptions(**values)


def build_parser() -> argparse.ArgumentParser:
    """argparse built from TrainOptions; each flag's help shows its default (or its "auto" rule)."""
    p = argparse.ArgumentParser(description="Train MARIS (referring image segmentation on SAM + CLIP).",
                                argument_default=argparse.SUPPRESS)  # absent flags stay absent (resume)
    hints = typing.get_type_hints(TrainOptions)
    for f in dataclasses.fields(TrainOptions):
        flag = "--" + f.name.replace("_", "-")
        shown = f.metadata["auto"] if f.default is None else f.default
        help_text = f"{f.metadata['help']} (default: {shown})"
        if hints[f.name] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        base = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
        kind = base[0]
        if f.metadata.get("multiple"):
            p.add_argument(flag, action="append", metavar="KEY=VALUE", help=help_text)
        else:
            p.add_argument(flag, type=kind if kind in (int, float) else str, metavar=f.name.upper(), help=help_text)
    return p


def parse_options(argv: list[str] | None) -> tuple[TrainOptions, dict]:
    """Command line → (options with defaults filled, the options given explicitly)."""
    explicit = vars(build_parser().parse_args(argv))
    return TrainOptions(**explicit), explicit


# TrainOptions that set the MarisConfig field of the same name (stored in the checkpoint's config).
MAGNET_RISAM_FIELDS = ("mask_grounding_weight", "mask_ratio", "mask_grounding_use_mask", "alignment_weight",
                       "alignment_temperature", "adapters", "adapter_ratio")


def model_config(opts: TrainOptions) -> dict:
    """The MarisConfig dict for resolved options (preset + explicit overrides).

    Raises:
        SystemExit: an unknown preset or a bad --model-set entry.
    """
    overrides = {}
    if opts.image_size is not None:
        overrides["image_size"] = opts.image_size
    overrides["context_length"] = opts.context_length
    known = {f.name: f for f in dataclasses.fields(maris.MarisConfig)}
    overrides["init_seed"] = opts.seed  # the model initialisation follows --seed too
    if opts.loss_focal_weight is not None:
        overrides["loss_focal_weight"] = opts.loss_focal_weight
    if opts.loss_dice_weight is not None:
        overrides["loss_dice_weight"] = opts.loss_dice_weight
    for name in MAGNET_RISAM_FIELDS:  # the switches of issue 5 are MarisConfig fields of the same name
        overrides[name] = getattr(opts, name)
    for item in opts.model_set:
        key, sep, raw = item.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"error: --model-set {item!r}: expected KEY=VALUE with KEY a MarisConfig field "
                             f"({', '.join(sorted(known))})")
        try:
            overrides[key] = json.loads(raw)  # numbers, booleans, lists
        except json.JSONDecodeError:
            overrides[key] = raw  # plain strings
    if opts.preset not in maris.PRESETS:
        raise SystemExit(f"error: unknown --preset {opts.preset!r}; expected one of {sorted(maris.PRESETS)}")
    try:
        cfg = maris.make_config(opts.preset, **overrides)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"error: bad model configuration: {e}") from None
    return maris.config_to_dict(cfg)


# --- Learning-rate schedule ---

class LRSchedule:
    """Linear warm-up to the peak, then cosine / poly (power 0.9) decay to 0, or constant.

    A callable object (not a lambda) so LambdaLR's state_dict keeps its fields.
    """

    def __init__(self, total_steps: int, warmup_steps: int, kind: str):
        self.total_steps, self.warmup_steps, self.kind = int(total_steps), int(warmup_steps), kind

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        t = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.kind == "poly":
            return (1.0 - t) ** 0.9  # NOTE(paper): LAVT/CRIS-style poly decay, power 0.9
        return 0.5 * (1.0 + math.cos(math.pi * t))


def build_optimizer(model: torch.nn.Module, opts: TrainOptions,
                    heads: torch.nn.Module | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only; no weight decay on biases and norm weights (1-D).

    Args:
        model: MARIS (its requires_grad parameters: the new modules, and the adapters when on).
        opts: lr and weight decay.
        heads: MagNet's training-only heads (maris.build_heads), trained beside the model.
    """
    decay, no_decay = [], []
    for module in (model, heads):
        for p in (module.parameters() if module is not None else ()):
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
    if not decay and not no_decay:
        raise SystemExit("error: the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opts.lr)


# --- Data order: a pure function of (seed, epoch) ---

def epoch_batches(num_items: int, *, batch_size: int, seed: int, epoch: int, rank: int, world: int,
                  image_ids: list[int] | None = None, sentences_per_image: int = 1) -> list[list[int]]:
    """The batches (item indices) one process runs in one epoch: a pure function of its arguments.

    sentences_per_image = 1: a DistributedSampler permutation (shuffle, drop_last), cut into
    batches; the last incomplete batch is dropped, so every step sees `batch_size` items per process.
    sentences_per_image = k > 1: data.ImageGroupedBatchSampler keeps up to k sentences of one image
    together, so the frozen encoder runs once per distinct image of the batch (DESIGN.md §7).
    Either way a resumed run can skip the batches it already did.
    """
    if sentences_per_image > 1:
        if image_ids is None:
            raise ValueError("image-grouped batches need the dataset's image_ids")
        sampler = data.ImageGroupedBatchSampler(image_ids, batch_size, sentences_per_image=sentences_per_image,
                                                shuffle=True, seed=seed, drop_last=True, num_replicas=world,
                                                rank=rank)
        sampler.set_epoch(epoch)
        return [list(b) for b in sampler]
    sampler = torch.utils.data.DistributedSampler(range(num_items), num_replicas=world, rank=rank,
                                                  shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    order = list(sampler)
    return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


# --- Checkpoints: atomic, self-describing ---

def rng_state(generator: torch.Generator | None = None) -> dict:
    """Every RNG this process uses, in plain tensors and Python values (weights_only-loadable).

    `generator` is the seeded generator of Mask Grounding's word choice (`mask_word_generator`).
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["mask_words"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    """Inverse of `rng_state`."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "mask_words" in state:
        generator.set_state(state["mask_words"])


def mask_word_generator(seed: int, rank: int) -> torch.Generator:
    """The CPU generator of Mask Grounding's random word choice, seeded from (seed, rank).

    A generator of its own (not the global RNG) whose state the checkpoint stores, so a resumed
    run masks the same words as an uninterrupted one; ranks mask independently.
    """
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank, 5]).generate_state(1)[0]))


def atomic_save(obj: dict, path: pathlib.Path) -> None:
    """torch.save through `data.atomic_write`: a kill at any moment leaves the old file or the new one."""
    data.atomic_write(path, lambda f: torch.save(obj, f))


# --- Distributed setup ---

def all_reduce_sum(values: torch.Tensor | list[float], device: torch.device) -> torch.Tensor:
    """Sum a vector over all ranks (identity in a single process).

    Returns a float64 tensor on `device`; a device tensor in gives no host sync (NCCL queues the
    reduction on the stream), so the caller decides when to read the result.
    """
    if isinstance(values, torch.Tensor):
        t = values.to(device, torch.float64)
    else:
        t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Average the gradients of parameters that live outside the DDP wrapper over all ranks.

    MagNet's heads are called by `maris.training_loss` beside the model, not through its DDP
    wrapper, so DDP does not synchronise them. One all-reduce carries every gradient and a
    has-gradient flag per parameter; a parameter no rank gave a gradient keeps `grad = None`
    (as in one process), the others get the mean over the ranks (what DDP does for the model).
    """
    if world <= 1 or not params:
        return
    device = params[0].device
    flags = torch.tensor([float(p.grad is not None) for p in params], device=device)  # (P,)
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    flat = torch.cat([*grads, flags])  # (sum of numel + P,)
    dist.all_reduce(flat)
    values, flags = flat[:-len(params)], flat[-len(params):]
    for p, g, flag in zip(params, values.split([p.numel() for p in params]), flags.tolist()):
        if flag > 0:
            p.grad = (g / world).reshape(p.shape).to(p.dtype)


# --- Training ---

# Loss terms averaged into metrics.jsonl; MagNet's two only when their weight is > 0.
LOSS_KEYS = ("loss", "focal", "dice", "mask_grounding", "alignment")
# Everything a "train" record averages over its steps: the losses and the gradient norm before clipping.
LOG_KEYS = (*LOSS_KEYS, "grad_norm")

class _Stop:
    """Set by the SIGINT/SIGTERM handler; checked after every step."""

    def __init__(self):
        self.signal: str | None = None

    def __call__(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now, without saving
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name


def train(opts: TrainOptions, explicit: dict) -> dict:
    """Run a training job (called by `main`; see the module docstring).

    Returns:
        dict(step, epoch, best_oIoU, val=last validation metrics or None, out_dir, stopped_by,
             seconds=dict(total, train, validation: wall seconds of the loop, setup: before it; cpu,
                          setup_cpu: process CPU seconds of the same)).

    Raises:
        SystemExit: missing data, a bad option, a non-finite loss (names the step).
    """
    setup_start, setup_cpu_start = time.time(), time.process_time()  # dataset generation, model build
    rank, world, device = setup_distributed(opts.device)  # torchrun: join the process group
    main_process = rank == 0

    # Resume: the checkpoint's options, with the flags given on this command line on top.
    ckpt = None
    resume = opts.resume
    if resume == "auto":
        out_dir = resolve_options(opts).out_dir
        resume = str(pathlib.Path(out_dir) / "last.pt") if (pathlib.Path(out_dir) / "last.pt").is_file() else None
        if resume is None and main_process:
            print(f"--resume auto: no {pathlib.Path(out_dir) / 'last.pt'} yet, starting a new run")
    if resume:
        if not pathlib.Path(resume).is_file():
            raise SystemExit(f"error: --resume {resume}: no such checkpoint")
        ckpt = torch.load(resume, map_location="cpu", weights_only=True)
        stored = {k: v for k, v in ckpt["options"].items() if k in {f.name for f in dataclasses.fields(TrainOptions)}}
        opts = TrainOptions(**{**stored, **explicit})
    opts = resolve_options(opts)
    out_dir = pathlib.Path(opts.out_dir)

    # Datasets (data.py raises FileNotFoundError naming the missing file and the expected layout).
    try:
        config = model_config(opts) if ckpt is None else ckpt["config"]
        if ckpt is not None and explicit.keys() & {"preset", "image_size", "context_length", "model_set",
                                                   "loss_focal_weight", "loss_dice_weight", *MAGNET_RISAM_FIELDS}:
            if model_config(opts) != config and main_process:
                print("note: model options given with --resume are ignored; the checkpoint's config is used")
        size = config["image_size"]
        # With the feature cache the pixels are only read (by load_image) to fill missing entries.
        kw = dict(root=opts.data_root, split_by=opts.split_by, image_size=size,
                  context_length=config["context_length"], image_dir=opts.image_dir,
                  load_images=opts.feature_cache is None)
        train_set = data.build_dataset(opts.dataset, opts.train_split, **kw, num_images=opts.train_scenes)
        # Validation scores against original_mask(index) (evaluate_model): no padded mask per item.
        val_set = (data.build_dataset(opts.dataset, opts.val_split, **kw, load_masks=False) if opts.val_split
                   else None)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if opts.train_limit > 0:
        train_set = _Head(train_set, opts.train_limit)
    if val_set is not None and opts.val_limit > 0:
        val_set = _Head(val_set, opts.val_limit)

    # Seeds: the model build is seeded on its own (evaluate.build_model); the RNGs used while
    # training differ per rank so that random choices (e.g. Mask Grounding's masking) do too.
    random.seed(opts.seed + rank)
    np.random.seed(opts.seed + rank)
    torch.manual_seed(opts.seed + rank)

    model = build_model(config, sam_checkpoint=opts.sam_checkpoint, clip_checkpoint=opts.clip_checkpoint).to(device)
    cfg = maris.config_from_dict(config)
    try:  # MagNet's training-only heads (empty when both weights are 0); they never enter model checkpoints
        heads = maris.build_heads(cfg, model)  # seeded by cfg.init_seed: the same on every rank
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    mask_words = mask_word_generator(opts.seed, rank)
    optimizer = build_optimizer(model, opts, heads)

    # Encoder feature cache (DESIGN.md §7): rank 0 opens (and, when asked, empties) it first, then
    # the others; two ranks writing one image is harmless (each entry is renamed into place).
    train_cache = val_cache = None
    if opts.feature_cache is not None:
        # The encoder weights' hash (a full read of them, ~2.5 GB for ViT-H) is taken once per run;
        # with adapters there is none to take (open_feature_cache refuses them).
        encoder_sha256 = None if cfg.adapters else state_dict_sha256(model.image_encoder)

        def open_caches(rebuild: bool):
            kw = dict(device=device, precision=opts.precision, rebuild=rebuild, encoder_sha256=encoder_sha256)
            return (open_feature_cache(model, train_set, opts.feature_cache, **kw),
                    open_feature_cache(model, val_set, opts.feature_cache, **kw) if val_set is not None else None)
        if main_process:
            train_cache, val_cache = open_caches(opts.rebuild_feature_cache)
        if world > 1:
            dist.barrier()
        if not main_process:
            train_cache, val_cache = open_caches(False)
    order = dict(batch_size=opts.batch_size, seed=opts.seed, rank=rank, world=world,
                 image_ids=list(train_set.image_ids), sentences_per_image=opts.sentences_per_image)
    batches_per_epoch = len(epoch_batches(len(train_set), epoch=0, **order))
    if batches_per_epoch == 0:
        raise SystemExit(f"error: the {opts.train_split} split has {len(train_set)} items, fewer than "
                         f"batch size {opts.batch_size} x {world} process(es)")
    total_steps = opts.epochs * batches_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(total_steps, opts.warmup_steps,
                                                                         opts.schedule))
    step, epoch, batch_in_epoch, best = 0, 0, 0, -1.0
    if ckpt is not None:
        model.load_trainable_state_dict(ckpt["model"])
        try:
            heads.load_state_dict(ckpt.get("heads", {}))
        except RuntimeError as e:
            raise SystemExit(f"error: --resume {resume}: the MagNet heads in the checkpoint do not match its "
                             f"config: {str(e).splitlines()[0]}") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        # The schedule follows this run's options, so --epochs / --lr given with --resume take effect
        # from the current step on; with unchanged options this reproduces the stored values exactly.
        scheduler.lr_lambdas = [LRSchedule(total_steps, opts.warmup_steps, opts.schedule)
                                for _ in optimizer.param_groups]
        scheduler.base_lrs = [opts.lr for _ in optimizer.param_groups]
        for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = opts.lr, opts.lr * fn(scheduler.last_epoch)
        step, best = int(ckpt["step"]), float(ckpt["best_oIoU"])
        epoch, batch_in_epoch = int(ckpt["sampler"]["epoch"]), int(ckpt["sampler"]["batch_in_epoch"])
        if ckpt["sampler"]["world_size"] != world and main_process:
            print(f"note: checkpoint written with {ckpt['sampler']['world_size']} process(es), resuming with "
                  f"{world}: the data order after resume differs from an uninterrupted run")
        rngs = ckpt["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0], mask_words)
        if main_process:
            print(f"resumed from {resume}: step {step}, epoch {epoch}, batch {batch_in_epoch}")
    if opts.compile:
        # In place (nn.Module.compile), so parameter names and state-dict keys stay the same.
        for module in (model.feature_enhancement, *model.maa_blocks, model.mask_decoder):
            module.compile()
    ddp_model = model
    if world > 1:
        # broadcast_buffers off: the frozen encoders' buffers are identical on every rank already.
        # find_unused_parameters off: every trainable parameter of MARIS gets a gradient each step (with
        # and without MagNet's losses and RISAM's adapters; the heads live outside the wrapper), so DDP
        # skips the per-step search of the autograd graph. A configuration that left one unused would
        # stop with DDP's error naming it at the next step.
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False, find_unused_parameters=False)

    head_params = [p for p in heads.parameters() if p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad] + head_params
    n_train = sum(p.numel() for p in trainable)
    n_all = sum(p.numel() for p in model.parameters())
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"MARIS {opts.preset} S={size} on {opts.dataset} {opts.train_split}: {len(train_set)} items, "
              f"{batches_per_epoch} steps/epoch x {opts.epochs} epochs, batch {opts.batch_size} x {world}, "
              f"{n_train:,} trainable of {n_all:,} parameters, {device}, out {out_dir}")
        print(f"encoders: SAM {opts.sam_checkpoint or 'RANDOM (no --sam-checkpoint)'}, "
              f"CLIP {opts.clip_checkpoint or 'RANDOM (no --clip-checkpoint)'}"
              + (f"; feature cache {train_cache.root} ({train_cache.bytes_per_image:,} bytes/image)"
                 if train_cache is not None else ""))
        extras = [f"{name} {getattr(cfg, name + '_weight')}" for name in ("mask_grounding", "alignment")
                  if getattr(cfg, name + "_weight") > 0] + (["RISAM adapters"] if cfg.adapters else [])
        if extras:
            print("add-ons: " + ", ".join(extras))
    log_path = out_dir / "metrics.jsonl"

    start, cpu_start = time.time(), time.process_time()
    # Wall seconds spent scoring the validation split (the rest of the loop's time is training).
    timing = {"validation": 0.0, "validations": 0}

    def log(record: dict) -> None:
        if main_process:
            with open(log_path, "a") as f:  # NaN (an empty validation split's metrics) is written as null
                f.write(json.dumps(without_nan({**record, "seconds": round(time.time() - start, 2),
                                                "cpu_seconds": round(time.process_time() - cpu_start, 2)})) + "\n")

    def checkpoint(path: pathlib.Path) -> None:
        """Write a checkpoint (every rank calls it: the RNG states are gathered to rank 0)."""
        states = [None] * world
        if world > 1:
            dist.all_gather_object(states, rng_state(mask_words))
        else:
            states = [rng_state(mask_words)]
        if not main_process:
            return
        atomic_save({
            "config": config, "options": dataclasses.asdict(opts),
            "model": model.trainable_state_dict(), "heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch, "best_oIoU": best,
            "sampler": {"seed": opts.seed, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                        "world_size": world, "batch_size": opts.batch_size},
            "rng": states,
        }, path)

    # The checkpoint a non-finite loss falls back on: the resumed one until this run saves.
    last_good = {"path": resume, "step": step} if ckpt is not None else {"path": None, "step": None}

    def save_last() -> None:
        checkpoint(out_dir / "last.pt")
        last_good.update(path=out_dir / "last.pt", step=step)

    def validate() -> dict | None:
        nonlocal best
        if val_set is None:
            return None
        val_start = time.time()
        metrics = evaluate_model(model, val_set, batch_size=opts.batch_size, device=device,
                                 precision=opts.precision, workers=opts.workers, cache=val_cache,
                                 progress=opts.progress and main_process, desc=f"val {opts.val_split}")
        timing["validation"] += time.time() - val_start
        timing["validations"] += 1
        log({"kind": "eval", "step": step, "epoch": epoch, "split": opts.val_split, **metrics})
        improved = metrics["oIoU"] > best
        if main_process:
            print(f"step {step} epoch {epoch}: {opts.val_split} oIoU {100 * metrics['oIoU']:.2f}  "
                  f"mIoU {100 * metrics['mIoU']:.2f}  Prec@0.5 {100 * metrics['Prec@0.5']:.2f}  "
                  f"({metrics['count']} pairs)" + ("  new best" if improved else ""))
        if improved:
            best = metrics["oIoU"]
            checkpoint(out_dir / "best.pt")
        return metrics

    stop = _Stop()
    previous = {}
    try:  # signal handlers can only be installed from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, stop)
    except ValueError:
        previous = {}

    def done() -> bool:
        return opts.max_steps > 0 and step >= opts.max_steps

    # Stopping is decided from values reduced over all ranks only, so every rank stops at the same step.
    stopping = False
    val_metrics, evaluated_at, saved_at = None, None, None
    loader_kw = dict(num_workers=opts.workers, pin_memory=device.type == "cuda")
    try:
        while epoch < opts.epochs and not done() and not stopping:
            batches = epoch_batches(len(train_set), epoch=epoch, **order)[batch_in_epoch:]
            # The generator only seeds the workers; seeding it from (seed, epoch) keeps the global
            # RNG untouched by loader creation, which exact resume relies on.
            # collate_images keeps each distinct image of a batch once: the encoder runs once per image.
            loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, collate_fn=data.collate_images,
                                                 **loader_kw,
                                                 generator=torch.Generator().manual_seed(opts.seed * 1000 + epoch))
            bar = tqdm(loader, total=batches_per_epoch, initial=batch_in_epoch, desc=f"epoch {epoch + 1}/{opts.epochs}",
                       disable=not (opts.progress and main_process), dynamic_ncols=True, leave=False)
            ddp_model.train()
            heads.train()
            # Running sums of the logged values (LOSS_KEYS, then grad_norm) stay on the device and are
            # read at log steps only, so a step makes a single host sync (the flags below).
            window = {"sums": torch.zeros(len(LOG_KEYS), dtype=torch.float64, device=device), "n": 0, "t": time.time()}
            epoch_start, encoded = time.time(), {"encoded": 0}
            for batch in bar:
                # images (B_img, 3, S, S) of the distinct images, or their cached encoder outputs
                inputs = batch_image_inputs(batch, device=device, model=model, cache=train_cache, dataset=train_set,
                                            batch_size=opts.batch_size, precision=opts.precision, counter=encoded)
                masks = batch["mask"].to(device)  # (B, S, S)
                valid = data.valid_mask(batch["input_size"], size).to(device)  # (B, S, S)
                with autocast(device, opts.precision):
                    # focal + dice (+ MagNet's losses when their weights are > 0); the losses run in fp32
                    losses = maris.training_loss(ddp_model, heads, ids=batch["ids"].to(device),
                                                 word_mask=batch["word_mask"].to(device), masks=masks, valid=valid,
                                                 generator=mask_words, **inputs)
                loss = losses["loss"]
                # Every rank learns whether any rank saw a non-finite loss or a stop signal: both flags in
                # one device tensor, one all-reduce, read after the backward pass has been queued.
                flags = torch.stack([(~torch.isfinite(loss.detach())).double(),
                                     torch.full((), float(stop.signal is not None), dtype=torch.float64,
                                                device=device)])  # (2,) [non-finite, signal]
                flags = all_reduce_sum(flags, device)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                average_gradients(head_params, world)  # DDP averaged the model's gradients already
                # The norm of the (rank-averaged, so the same on every rank) gradient before clipping,
                # over the model's trainable parameters and MagNet's heads.
                if opts.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, opts.grad_clip)
                else:
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
                bad, sig = flags.tolist()  # the step's one host sync
                if bad:  # before optimizer.step: the weights in memory never see the bad gradients
                    where = (f"the last good checkpoint is {last_good['path']} (step {last_good['step']})"
                             if last_good["path"] else "no checkpoint was written yet")
                    raise SystemExit(f"error: non-finite loss ({loss.item()}) at step {step + 1} "
                                     f"(epoch {epoch + 1}); stopping without saving; {where}")
                stopping = sig > 0
                optimizer.step()
                scheduler.step()
                step += 1
                batch_in_epoch += 1
                window["sums"] += torch.stack([*(losses[k].detach() for k in LOSS_KEYS),
                                               grad_norm.to(device)]).double()  # (len(LOG_KEYS),)
                window["n"] += 1
                if step % opts.log_every == 0 or batch_in_epoch == batches_per_epoch:
                    # Every rank runs as many steps: the mean over ranks and steps divides by n * world.
                    sums = (all_reduce_sum(window["sums"], device) / (window["n"] * world)).tolist()
                    means = {k: v for k, v in zip(LOG_KEYS, sums)
                             if k not in ("mask_grounding", "alignment") or getattr(cfg, k + "_weight") > 0}
                    seconds = time.time() - window["t"]
                    speed = window["n"] * opts.batch_size * world / max(seconds, 1e-9)
                    lr = scheduler.get_last_lr()[0]
                    log({"kind": "train", "step": step, "epoch": epoch, **means, "lr": lr, "items_per_s": speed})
                    bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.2e}", items_s=f"{speed:.1f}")
                    window = {"sums": torch.zeros_like(window["sums"]), "n": 0, "t": time.time()}
                if opts.save_every > 0 and step % opts.save_every == 0:
                    save_last()
                    saved_at = step
                if stopping or done():
                    break
            bar.close()
            if not stopping:
                stopping = all_reduce_sum([float(stop.signal is not None)], device).item() > 0
            if stopping:
                break
            if batch_in_epoch == batches_per_epoch:  # the epoch is complete
                # Wall time of this process's share of the epoch (before validation), and the images the
                # frozen encoder ran on, summed over ranks (0 once a feature cache holds every image).
                log({"kind": "epoch", "step": step, "epoch": epoch,
                     "epoch_seconds": round(time.time() - epoch_start, 3),
                     "encoded_images": int(all_reduce_sum([encoded["encoded"]], device).item())})
                epoch, batch_in_epoch = epoch + 1, 0
                if opts.eval_every > 0 and epoch % opts.eval_every == 0:
                    val_metrics, evaluated_at = validate(), step
                save_last()
                saved_at = step
        final_validation = not stopping and evaluated_at != step
        if final_validation:
            val_metrics, evaluated_at = validate(), step
        if saved_at != step or final_validation:
            save_last()  # after the final validation too, so last.pt holds the final best score
        reason = (stop.signal or "a signal on another rank") if stopping else None
        total = time.time() - start
        seconds = {"setup": round(start - setup_start, 2), "total": round(total, 2),
                   "train": round(total - timing["validation"], 2), "validation": round(timing["validation"], 2),
                   "cpu": round(time.process_time() - cpu_start, 2),
                   "setup_cpu": round(cpu_start - setup_cpu_start, 2)}
        if main_process:
            print(f"saved {out_dir / 'last.pt'} at step {step}" + (f" (stopped by {reason})" if reason else "")
                  + (f"; best val oIoU {100 * best:.2f}" if best >= 0 else ""))
            # Training = the steps and checkpoints; process CPU time counts every thread of this process.
            passes = timing["validations"]
            scored = (f" + validation {seconds['validation']:.1f} s ({passes} pass{'es' * (passes != 1)} over "
                      f"{len(val_set)} pairs) = {seconds['total']:.1f} s" if passes else "")
            print(f"time: training {seconds['train']:.1f} s{scored} wall, after {seconds['setup']:.1f} s of setup "
                  f"(data, model); process CPU {seconds['cpu']:.1f} s (+ {seconds['setup_cpu']:.1f} s setup), "
                  f"{torch.get_num_threads()} torch threads")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return {"step": step, "epoch": epoch, "best_oIoU": best, "val": val_metrics, "out_dir": str(out_dir),
            "stopped_by": reason, "seconds": seconds}


class _Head(torch.utils.data.Dataset):
    """The first `n` items of a dataset, keeping `original_mask` / `load_image` (for --val-limit)."""

    def __init__(self, dataset, n: int):
        self.dataset, self.n = dataset, min(n, len(dataset))
        self.image_ids = dataset.image_ids[:self.n]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        return self.dataset[index]

    def original_mask(self, index: int):
        return self.dataset.original_mask(index)

    def load_image(self, image_id: int):
        return self.dataset.load_image(image_id)


def main(argv: list[str] | None = None) -> dict:
    """Entry point: `python train.py [options]` (see --help)."""
    opts, explicit = parse_options(argv)
    try:
        return train(opts, explicit)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
