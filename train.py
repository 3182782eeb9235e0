"""Train MARIS: single process or `torchrun` DDP, atomic checkpoints, exact resume.

    python train.py                                   # tiny preset on the built-in shapes data, CPU
    python train.py --dataset refcoco --sam-checkpoint sam_vit_b_01ec64.pth --clip-checkpoint ViT-B-16.pt
    torchrun --nproc_per_node 4 train.py --dataset refcoco ...        # DDP (NCCL on GPU, gloo on CPU)
    python train.py --resume auto                     # continue <out-dir>/last.pt exactly
    python train.py --mask-grounding-weight 0.1 --alignment-weight 0.1 --out-dir runs/magnet  # + MagNet's losses
    python train.py --adapters --out-dir runs/adapters   # + RISAM's adapters: SAM's encoder fine-tuned cheaply
    python train.py --feature-cache cache/            # SAM's frozen encoder runs once per image, ever
    python train.py --dataset shapes-gres             # generalized RIS demo: multi- and no-target expressions
    python train.py --dataset grefcoco --data-root data ...   # gRefCOCO, with the no-target head

Every option is a field of `TrainOptions`; `python train.py --help` lists them with their defaults.
Options left at "auto" get a dataset-dependent value (`resolve_options`): the shapes demo trains the
tiny preset from scratch with a larger learning rate for a few minutes on a CPU; the RefCOCO family
uses the MARIS recipe (vit_b, lr 1e-4, 50 epochs); both use batch 8 per process. shapes-gres takes the
shapes values, gRefCOCO and PhraseCut the RefCOCO ones; on gRefCOCO and shapes-gres the no-target head
trains too (--no-target-weight), and validation scores them with gIoU / cIoU / N-acc / T-acc.

The script reads top to bottom: options; learning rate, optimizer, data order; checkpoints; the run
(`build_run`: data, model + optimizer, resume); one step (`train_one_step`), one epoch, validation;
`train`, the loop. Each step runs `maris.TrainStep` (MARIS and MagNet's training-only heads; wrapped
in DistributedDataParallel under torchrun) and sets the learning rate from the step number.

One run per folder (README, "Run folders"): a new run is refused where another left last.pt, best.pt or
metrics.jsonl (--resume continues it, --overwrite replaces it), and the running process holds a lock on
<out-dir>/train.lock. last.pt is written at each epoch's end and every --save-minutes of training, so a
kill loses little; metrics.jsonl keeps one record per step and kind across resumes (`claim_run_folder`).
Bad files and values end the script with one line (`maris.one_line_errors`).

Exact resume: the order of the training items is a pure function of (seed, epoch) (a
DistributedSampler permutation), so a checkpoint stores the epoch and the number of batches already
done in it; resuming skips those batches and restores the optimizer and every RNG state, and the
learning rate follows from the step. On a CPU, N steps + resume + N steps give the same weights, bit
for bit, as 2N straight steps (MagNet's random word masking draws from a generator of its own, stored
in the checkpoint too).

Speed (README, "Performance"): every batch is collated by `data.collate_images`, so SAM's frozen
encoder runs once per distinct image of a batch (`--sentences-per-image K` puts K sentences of an
image in one batch); `--feature-cache DIR` stores its outputs per image on disk and reads them back
in later epochs (not with `--adapters`, which change them); `--compile` compiles the trained modules.
MagNet's heads are training-only: checkpoints keep them under "heads", beside the model's trainable
weights, and evaluate.py ignores them.
"""
import dataclasses
import json
import math
import os
import pathlib
import random
import signal
import socket
import time
import uuid
from dataclasses import dataclass

try:  # POSIX: the run folder's lock (RunLock)
    import fcntl
except ImportError:  # Windows
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import maris
from evaluate import COUNT_NOUNS, evaluate_model, metric_set, scoring_for, without_nan

option = maris.option
MARIS_DEFAULTS = maris.MarisConfig  # the class attributes of its fields are their defaults


# --- Options ---

@dataclass
class TrainOptions:
    """Every command-line option of train.py (flag = field name with '-' for '_')."""

    # data
    dataset: str = option("shapes", "shapes (built-in, no download) | shapes-gres (built-in, with multi- and "
                                    "no-target expressions) | refcoco | refcoco+ | refcocog | grefcoco | phrasecut")
    split_by: str | None = option(None, "partition of the RefCOCO family: unc | google | umd",
                                  auto="unc for refcoco/refcoco+, umd for refcocog")
    data_root: str = option("data", "data root (README: Data): <root>/refcoco/refs(unc).p, <root>/images/mscoco/...; "
                                    "<root>/grefcoco/grefs(unc).json; <root>/VGPhraseCut_v0/refer_<split>.json")
    image_dir: str | None = option(None, "image folder (COCO train2014; PhraseCut: Visual Genome)",
                                   auto="<data-root>/images/mscoco/images/train2014; grefcoco: "
                                        "<data-root>/images/train2014; phrasecut: VGPhraseCut_v0/images")
    train_split: str = option("train", "split to train on")
    val_split: str = option("val", "split scored after each evaluation interval ('' = none); best.pt keeps the "
                                   "best oIoU (RefCOCO family, shapes), gIoU (grefcoco, shapes-gres: every sentence "
                                   "counts alike, no-target ones included, so it rewards masks and the no-target "
                                   "decision together, where cIoU gives a rightly rejected no-target sentence no "
                                   "credit and favours large objects) or mIoU (phrasecut: the mean per-task IoU of its "
                                   "official evaluator)")
    val_limit: int = option(0, "score only the first N validation items (0 = the whole split)", check=maris.at_least(0))
    train_limit: int = option(0, "train on the first N training items only (0 = the whole split; quick checks, "
                                 "benchmarks)", check=maris.at_least(0))
    train_scenes: int | None = option(None, "shapes, shapes-gres: scenes the generator makes for the training split "
                                            "(scene i is the same for every N, so a larger N adds scenes)",
                                      auto="1800 for shapes, 1000 for shapes-gres", check=maris.at_least(1))
    # model
    preset: str | None = option(None, "model preset: tiny | vit_b | vit_l | vit_h", auto="tiny for shapes, else vit_b")
    sam_checkpoint: str | None = option(None, "official SAM weights (sam_vit_b_01ec64.pth, ...)", auto="random encoder")
    clip_checkpoint: str | None = option(None, "CLIP weights (OpenAI ViT-B-16.pt, ...)", auto="random text encoder")
    image_size: int | None = option(None, "padded input side S", auto="the preset's (1024 for SAM presets)",
                                    check=maris.at_least(16))
    context_length: int | None = option(None, "text tokens L", auto="30 for refcocog, else 20", check=maris.at_least(3))
    loss_focal_weight: float | None = option(None, "focal loss weight",
                                             auto=f"the preset's ({MARIS_DEFAULTS.loss_focal_weight:g})",
                                             check=maris.at_least(0.0))
    loss_dice_weight: float | None = option(None, "dice loss weight",
                                            auto=f"the preset's ({MARIS_DEFAULTS.loss_dice_weight:g})",
                                            check=maris.at_least(0.0))
    model_set: list | None = option(None, "extra MarisConfig overrides, repeatable: --model-set maa_depth=3",
                                    auto="none", multiple=True, metavar="KEY=VALUE")
    # MagNet's training-only losses (Chng et al., "Mask Grounding for Referring Image Segmentation",
    # CVPR 2024) and RISAM's adapters (the later version of the MARIS paper); all off = exactly MARIS.
    mask_grounding_weight: float = option(MARIS_DEFAULTS.mask_grounding_weight,
                                          "weight of MagNet's Mask Grounding loss (Chng et al., CVPR 2024): predict "
                                          "masked words from the visual features (0 = off)", check=maris.at_least(0.0))
    mask_ratio: float = option(MARIS_DEFAULTS.mask_ratio, "MagNet Mask Grounding: share of the real word tokens masked",
                               check=maris.between(0.0, 1.0, include_high=True))
    mask_grounding_use_mask: bool = option(MARIS_DEFAULTS.mask_grounding_use_mask,
                                           "MagNet Mask Grounding: give the head the features pooled inside the "
                                           "ground-truth mask (--no-... = the ablation without it)")
    alignment_weight: float = option(MARIS_DEFAULTS.alignment_weight,
                                     "weight of MagNet's cross-modal alignment loss (Chng et al., CVPR 2024): "
                                     "pixel-to-text contrast, GT pixels positive (0 = off)", check=maris.at_least(0.0))
    alignment_temperature: float = option(MARIS_DEFAULTS.alignment_temperature,
                                          "MagNet alignment loss: temperature of the cosine similarities",
                                          check=maris.above(0.0))
    adapters: bool = option(MARIS_DEFAULTS.adapters,
                            "RISAM's bottleneck adapters in every SAM ViT block (the later MARIS paper's "
                            "parameter-efficient fine-tuning); only the adapters of the encoder train")
    adapter_ratio: float = option(MARIS_DEFAULTS.adapter_ratio,
                                  "RISAM adapters: bottleneck width as a share of the SAM width D",
                                  check=maris.above(0.0))
    # Generalized RIS (gRefCOCO): ReLA's no-target head on the multi-modal query token, off for RefCOCO.
    no_target_weight: float | None = option(
        None, "weight of the no-target head's BCE against the items' no_target labels (ReLA-style; 0 = no head, "
              "evaluate.py then decides no target by an empty mask); on for the datasets with no-target "
              "expressions, which the head's rule needs",
        auto="0.1 for grefcoco and shapes-gres (ReLA's no-target term weighs 0.1 of its mask term), else 0 (off)",
        check=maris.at_least(0.0))
    # optimisation
    epochs: int | None = option(None, "training epochs", auto="4 for shapes, else 50", check=maris.at_least(1))
    batch_size: int = option(8, "sentences per step per process", check=maris.at_least(1))
    lr: float | None = option(None, "AdamW peak learning rate",
                              auto="1e-3 for shapes (training from scratch), else 1e-4", check=maris.above(0.0))
    weight_decay: float = option(0.01, "AdamW weight decay (not applied to biases and norm weights)",
                                 check=maris.at_least(0.0))
    warmup_steps: int | None = option(None, "linear warm-up steps", auto="100 for shapes, else 1000",
                                      check=maris.at_least(0))
    schedule: str = option("cosine", "learning-rate decay after warm-up: cosine | poly | constant")
    grad_clip: float = option(1.0, "clip the gradient norm to this value (0 = off); metrics.jsonl logs the norm "
                                   "before clipping either way", check=maris.at_least(0.0))
    seed: int = option(0, "seed of the data order, the model initialisation and every RNG", check=maris.at_least(0))
    sentences_per_image: int | None = option(None, "keep up to K sentences of one image in a batch and encode each "
                                                  "image once (1 = ordinary shuffled batches)",
                                             auto="4 for shapes, else 1", check=maris.at_least(1))
    max_steps: int = option(0, "stop after this many optimizer steps (0 = run all epochs); the schedule keeps "
                               "its full length", check=maris.at_least(0))
    # speed (README, "Performance")
    feature_cache: str | None = option(None, "cache folder of SAM's frozen encoder outputs (fp16, one file per "
                                             "image): the encoder runs once per image for the whole run, not once "
                                             "per epoch; refused with --adapters", auto="off", metavar="DIR")
    rebuild_feature_cache: bool = option(False, "empty a --feature-cache built for another encoder or input size "
                                                "instead of stopping")
    compile: bool = option(False, "torch.compile the trained modules (Feature Enhancement, Mutual-Aware Attention, "
                                  "decoder) in place; helps on a GPU, the first steps are slow while it compiles")
    # run
    out_dir: str | None = option(None, "where last.pt, best.pt and metrics.jsonl go", auto="runs/<dataset>")
    resume: str | None = option(None, "checkpoint to continue from, or 'auto' = <out-dir>/last.pt when it exists; "
                                      "metrics.jsonl keeps the records up to that checkpoint", auto="a new run")
    overwrite: bool = option(False, "start a new run in an --out-dir that holds one (its last.pt, best.pt and "
                                    "metrics.jsonl are deleted); without it (and without --resume) such a folder "
                                    "is refused")
    eval_every: int = option(1, "score the validation split every N epochs (0 = only at the end)",
                             check=maris.at_least(0))
    log_every: int = option(20, "write a metrics.jsonl line every N steps (losses and gradient norm averaged "
                                "over those steps and the processes)", check=maris.at_least(1))
    save_every: int = option(0, "also write last.pt every N steps (0 = off)", check=maris.at_least(0))
    save_minutes: float = option(5.0, "also write last.pt when this many minutes of training passed since the last "
                                      "write, so a kill loses at most that much (0 = off); last.pt is written at "
                                      "every epoch's end too, and holds the trainable weights only",
                                 check=maris.at_least(0.0))
    workers: int | None = option(None, "DataLoader worker processes per training process",
                                 auto="0 for shapes (rendering is cheap), else min(4, CPU count)",
                                 check=maris.at_least(0))
    device: str = option("auto", "auto (cuda when available) | cpu | cuda | cuda:N", check=maris.check_device)
    precision: str = option("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32")
    progress: bool = option(True, "show tqdm progress bars")
    # training curves (README, "Training curves")
    curves: bool = option(True, "draw <out-dir>/curves.png (loss and its parts, learning rate, gradient norm, val "
                                "metrics against steps) from metrics.jsonl at each validation; needs matplotlib "
                                "(requirements.txt), a one-line note and no picture without it")
    tensorboard: bool = option(False, "also write every metrics.jsonl record as TensorBoard scalars to "
                                      "<out-dir>/tensorboard/<run id>-<session>/ (pip install tensorboard)")
    plot: str | None = option(None, "draw RUN_DIR/curves.png from RUN_DIR/metrics.jsonl (a finished or running run) "
                                    "and exit; trains nothing", auto="off", metavar="RUN_DIR")


DESCRIPTION = "Train MARIS (referring image segmentation on SAM + CLIP)."
# Learning-rate decays after warm-up (LRSchedule's kinds).
SCHEDULES = ("cosine", "poly", "constant")
# Values that "auto" options take, per dataset kind (the shapes demos vs. the RefCOCO family).
# NOTE(paper): the RefCOCO values reconstruct the MARIS recipe (README, "Train and evaluate"). The shapes values
# were measured to give the best model in about 5 minutes on 2 CPU cores (README, "What the first command
# does"): lr 1e-3 and batch 8 beat 5e-4 / 2e-3 and 4 / 16; 4 sentences of a picture per batch learn as fast per
# step as i.i.d. batches at less cost (one encoder pass and one rendering per picture); the score follows the
# number of steps, not how many scenes they see, and 1,800 scenes x 4 epochs are ~4,000 steps. shapes-gres
# keeps the values its README figures were measured with.
AUTO = {
    "shapes": dict(preset="tiny", epochs=4, lr=1e-3, warmup_steps=100, workers=0, train_scenes=1800,
                   sentences_per_image=4),
    "shapes-gres": dict(preset="tiny", epochs=4, lr=1e-3, warmup_steps=100, workers=0,
                        train_scenes=data.SHAPES_NUM_IMAGES["train"], sentences_per_image=1),
    "refcoco": dict(preset="vit_b", epochs=50, lr=1e-4, warmup_steps=1000, workers=min(4, os.cpu_count() or 1),
                    train_scenes=None, sentences_per_image=1),
}
SHAPES_DATASETS = ("shapes", "shapes-gres")  # built in, no files
DATASET_NAMES = (*SHAPES_DATASETS, *data.DATASETS)
# --no-target-weight's "auto": on where expressions can refer to nothing (the head's BCE needs both labels).
# NOTE(paper): 0.1 follows ReLA's criterion, whose no-target cross-entropy weighs 0.1 of its mask term; on
# RefCOCO, RefCOCO+, G-Ref, shapes and PhraseCut every expression has a target, so the head stays off there
# (RefCOCO training then is exactly MARIS's).
NO_TARGET_WEIGHT = {"grefcoco": 0.1, "shapes-gres": 0.1}
# The validation metric that picks best.pt, per metric set (evaluate.metric_set), and what each validation prints.
# gIoU for gRefCOCO-style data (ReLA reports gIoU and cIoU): see --val-split's help for why.
VAL_METRIC = {"ris": "oIoU", "gres": "gIoU", "phrasecut": "mIoU"}
VAL_PRINTED = {"ris": ("oIoU", "mIoU", "Prec@0.5"), "gres": ("gIoU", "cIoU", "N-acc", "T-acc"),
               "phrasecut": ("mIoU", "cumIoU", "Acc@0.5")}
# TrainOptions that set the MarisConfig field of the same name (stored in the checkpoint's config).
MAGNET_RISAM_FIELDS = ("mask_grounding_weight", "mask_ratio", "mask_grounding_use_mask", "alignment_weight",
                       "alignment_temperature", "adapters", "adapter_ratio")


def resolve_options(opts: TrainOptions) -> TrainOptions:
    """Fill every "auto" (None) option with its dataset-dependent value.

    Raises:
        SystemExit: an unknown dataset, schedule or precision name.
    """
    if opts.dataset not in DATASET_NAMES:
        raise SystemExit(f"error: unknown --dataset {opts.dataset!r}; expected one of {', '.join(DATASET_NAMES)}")
    if opts.schedule not in SCHEDULES:
        raise SystemExit(f"error: --schedule must be one of {', '.join(SCHEDULES)}, got {opts.schedule!r}")
    try:
        maris.check_precision(opts.precision)
    except ValueError as e:
        raise SystemExit(f"error: --{e}") from None
    if opts.dataset not in SHAPES_DATASETS and opts.train_scenes is not None:
        raise SystemExit(f"error: --train-scenes is for the generated shapes datasets, not {opts.dataset}")
    kind = opts.dataset if opts.dataset in SHAPES_DATASETS else "refcoco"
    values = dataclasses.asdict(opts)
    for key, value in AUTO[kind].items():
        if values[key] is None:
            values[key] = value
    if values["no_target_weight"] is None:
        values["no_target_weight"] = NO_TARGET_WEIGHT.get(opts.dataset, 0.0)
    if values["split_by"] is None and opts.dataset not in SHAPES_DATASETS:
        values["split_by"] = data.DATASETS[opts.dataset][0]
    if values["context_length"] is None:  # data.py's default L for the dataset
        values["context_length"] = data.DEFAULT_CONTEXT_LENGTH[opts.dataset]
    if values["out_dir"] is None:
        values["out_dir"] = str(pathlib.Path("runs") / opts.dataset)
    values["model_set"] = list(values["model_set"] or [])
    return TrainOptions(**values)



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
    for name in MAGNET_RISAM_FIELDS:  # MagNet's and RISAM's switches are MarisConfig fields of the same name
        overrides[name] = getattr(opts, name)
    overrides["no_target_weight"] = opts.no_target_weight
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




# --- Learning rate, optimizer, data order ---

class LRSchedule:
    """The factor of the peak learning rate at a step: linear warm-up to 1, then cosine / poly (power 0.9)
    decay to 0, or constant."""

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


def learning_rate(step: int, opts: TrainOptions, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based): a function of the step alone, so a resumed run
    needs no scheduler state and takes --lr / --epochs / --schedule given with --resume from here on."""
    return opts.lr * LRSchedule(total_steps, opts.warmup_steps, opts.schedule)(step)


def build_optimizer(train_step: maris.TrainStep, opts: TrainOptions) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only; no weight decay on biases and norm weights (1-D).

    Parameter order: MARIS's trainable parameters (the new modules, and the adapters when on), then
    MagNet's heads, in each group; the order checkpoints' optimizer states are stored in.

    Raises:
        SystemExit: nothing to train.
    """
    decay, no_decay = [], []
    for module in (train_step.model, train_step.heads):
        for p in module.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
    if not decay and not no_decay:
        raise SystemExit("error: the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opts.lr)


def epoch_batches(num_items: int, *, batch_size: int, seed: int, epoch: int, rank: int, world: int,
                  image_ids: list[int] | None = None, sentences_per_image: int = 1) -> list[list[int]]:
    """The batches (item indices) one process runs in one epoch: a pure function of its arguments.

    sentences_per_image = 1: a DistributedSampler permutation (shuffle, drop_last), cut into
    batches; the last incomplete batch is dropped, so every step sees `batch_size` items per process.
    sentences_per_image = k > 1: data.ImageGroupedBatchSampler keeps up to k sentences of one image
    together, so the frozen encoder runs once per distinct image of the batch.
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


class _Head(torch.utils.data.Dataset):
    """The first `n` items of a dataset (--train-limit / --val-limit), with what training and scoring read:
    `image_ids`, `image_source`, `original_mask(index)`, `load_image(image_id)`."""

    def __init__(self, dataset, n: int):
        self.dataset, self.n = dataset, min(n, len(dataset))
        self.image_ids = dataset.image_ids[:self.n]
        self.image_source = getattr(dataset, "image_source", None)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        return self.dataset[index]

    def original_mask(self, index: int):
        return self.dataset.original_mask(index)

    def load_image(self, image_id: int):
        return self.dataset.load_image(image_id)


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
    """torch.save through `data.atomic_write`: a kill at any moment leaves the old file or the new one.

    Raises:
        OSError: the write failed (a full disk, no permission); the message names the file and the cause, and
            says that the previous file is intact.
    """
    path = pathlib.Path(path)
    try:
        data.atomic_write(path, lambda f: torch.save(obj, f))
    except OSError as e:
        raise OSError(e.errno, f"cannot write checkpoint {path}: {file_error(e)}; "
                               + (f"the previous {path.name} is intact" if path.exists() else "nothing was written")
                      ) from e


def file_error(error: OSError) -> str:
    """The cause of a failed write in words: "No space left on device (errno 28)" rather than "[Errno 28] ..."."""
    return f"{error.strerror} (errno {error.errno})" if error.strerror and error.errno else str(error)




# --- Sums over the processes ---

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


# --- The run: options, data, model + optimizer, resume ---

@dataclass
class Run:
    """Everything a training run builds before its loop (`build_run`); the loop's functions read it."""

    opts: TrainOptions
    config: dict  # maris.config_to_dict of the model's config, as checkpoints store it
    rank: int
    world: int
    device: torch.device
    precision: str  # the precision that runs: "fp32" or "bf16"
    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset | None
    train_step: maris.TrainStep  # MARIS (`.model`) and MagNet's heads (`.heads`)
    runner: torch.nn.Module  # what computes a step's losses: train_step, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    mask_words: torch.Generator  # Mask Grounding's word choice, stored in checkpoints
    log: "RunLog"  # run id, session and clock of metrics.jsonl
    encoders: dict  # the frozen encoders' files and sha256 (maris.encoder_record), stored in every checkpoint
    batches_per_epoch: int = 0
    train_cache: data.FeatureCache | None = None
    val_cache: data.FeatureCache | None = None
    resumed_from: str | None = None  # the checkpoint this session continues, None for a new run
    tensorboard: object | None = None  # torch.utils.tensorboard.SummaryWriter with --tensorboard (rank 0)
    curves_note: bool = False  # the "no matplotlib" note was printed
    validation_seconds: float = 0.0  # wall seconds this session spent scoring the validation split
    validations: int = 0  # validation passes this session

    @property
    def model(self) -> maris.MARIS:
        return self.train_step.model

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @property
    def out_dir(self) -> pathlib.Path:
        return pathlib.Path(self.opts.out_dir)

    @property
    def total_steps(self) -> int:
        return self.opts.epochs * self.batches_per_epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """This process's batches of `epoch` (`epoch_batches`)."""
        return epoch_batches(len(self.train_set), batch_size=self.opts.batch_size, seed=self.opts.seed, epoch=epoch,
                             rank=self.rank, world=self.world, image_ids=list(self.train_set.image_ids),
                             sentences_per_image=self.opts.sentences_per_image)


@dataclass
class Progress:
    """Where the run stands: what a checkpoint restores (step, epoch, batch, best) and the loop's bookkeeping."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` done
    best: float = -1.0  # best validation score so far (the dataset's val_metric: oIoU, gIoU or mIoU)
    last_good: str | None = None  # the checkpoint a non-finite loss falls back on, and its step
    last_good_step: int | None = None
    saved_at: int | None = None  # step of this run's latest last.pt
    saved_time: float = dataclasses.field(default_factory=time.time)  # when (time.time()) it was written
    save_due: bool = False  # --save-minutes passed on rank 0: write last.pt after this step (every rank)
    evaluated_at: int | None = None  # step of this run's latest validation


def epoch_number(progress: Progress) -> int:
    """The 1-based epoch of the latest step (0 before the first step): metrics.jsonl's and the printed epoch."""
    return progress.epoch + (progress.batch_in_epoch > 0)


def load_options(opts: TrainOptions, explicit: dict,
                 main_process: bool) -> tuple[TrainOptions, dict | None, str | None]:
    """The run's resolved options and the checkpoint it resumes (None for a new run) with its path.

    With --resume the checkpoint's options come back, the flags given on this command line on top.
    """
    resume = opts.resume
    if resume == "auto":
        last = pathlib.Path(resolve_options(opts).out_dir) / "last.pt"
        resume = str(last) if last.is_file() else None
        if resume is None and main_process:
            print(f"--resume auto: no {last} yet, starting a new run")
    if not resume:
        return resolve_options(opts), None, None
    if not pathlib.Path(resume).is_file():
        raise SystemExit(f"error: --resume {resume}: no such checkpoint")
    ckpt = maris.read_checkpoint(resume)  # a damaged or foreign file: ValueError naming it
    stored = {k: v for k, v in ckpt["options"].items() if k in {f.name for f in dataclasses.fields(TrainOptions)}}
    opts = resolve_options(TrainOptions(**{**stored, **explicit}))
    if explicit.keys() & {"preset", "image_size", "context_length", "model_set", "loss_focal_weight",
                          "loss_dice_weight", "no_target_weight", *MAGNET_RISAM_FIELDS}:
        if model_config(opts) != ckpt["config"] and main_process:
            print("note: model options given with --resume are ignored; the checkpoint's config is used")
    return opts, ckpt, resume


def build_data(opts: TrainOptions, config: dict) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
    """The training and validation splits (the latter None without --val-split).

    Raises:
        SystemExit: missing or malformed data (data.py's message names the file and the expected layout).
    """
    # With the feature cache the pixels are only read (by load_image) to fill missing entries.
    kw = dict(root=opts.data_root, split_by=opts.split_by, image_size=config["image_size"],
              context_length=config["context_length"], image_dir=opts.image_dir,
              load_images=opts.feature_cache is None)
    try:
        train_set = data.build_dataset(opts.dataset, opts.train_split, **kw, num_images=opts.train_scenes)
        # Validation scores against original_mask(index) (evaluate_model): no padded mask per item.
        val_set = data.build_dataset(opts.dataset, opts.val_split, **kw, load_masks=False) if opts.val_split else None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if opts.train_limit > 0:
        train_set = _Head(train_set, opts.train_limit)
    if val_set is not None and opts.val_limit > 0:
        val_set = _Head(val_set, opts.val_limit)
    return train_set, val_set


def build_train_step(config: dict, opts: TrainOptions, device: torch.device) -> maris.TrainStep:
    """MARIS (seeded by the config's init_seed, encoder weights loaded) and MagNet's heads, on `device`."""
    model = maris.build_model(config, sam_checkpoint=opts.sam_checkpoint, clip_checkpoint=opts.clip_checkpoint)
    model = model.to(device)
    try:  # MagNet's training-only heads (empty when both weights are 0); they never enter model checkpoints
        return maris.TrainStep(model, maris.build_heads(model.cfg, model))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def open_caches(run: Run) -> None:
    """Open --feature-cache for both splits: rank 0 first (emptying it with --rebuild-feature-cache), then the
    others; two ranks writing one image is harmless (each entry is renamed into place)."""
    # The encoder weights' hash (a full read of them, ~2.5 GB for ViT-H) was taken once for the run (build_run);
    # with adapters there is none to pass (open_feature_cache refuses them).
    encoder_sha256 = None if run.model.cfg.adapters else run.encoders["sam"]["sha256"]
    if run.main_process:
        open_split_caches(run, encoder_sha256, rebuild=run.opts.rebuild_feature_cache)
    if run.world > 1:
        dist.barrier()
    if not run.main_process:
        open_split_caches(run, encoder_sha256, rebuild=False)


def open_split_caches(run: Run, encoder_sha256: str | None, *, rebuild: bool) -> None:
    """Set run.train_cache and run.val_cache (`data.open_feature_cache`); its refusals end the run."""
    kw = dict(precision=run.precision, encoder_sha256=encoder_sha256, rebuild=rebuild)
    try:
        run.train_cache = data.open_feature_cache(run.model, run.train_set, run.opts.feature_cache, **kw)
        if run.val_set is not None:
            run.val_cache = data.open_feature_cache(run.model, run.val_set, run.opts.feature_cache, **kw)
    except ValueError as e:
        hint = "" if run.model.cfg.adapters else " (--rebuild-feature-cache)"
        raise SystemExit(f"error: {e}{hint}") from None


def restore(run: Run, ckpt: dict, path: str) -> Progress:
    """Load a checkpoint's weights, optimizer state and RNG states into the run; return its progress."""
    run.model.load_trainable_state_dict(ckpt["model"])
    try:
        run.train_step.heads.load_state_dict(ckpt.get("heads", {}))
    except RuntimeError as e:
        raise SystemExit(f"error: --resume {path}: the MagNet heads in the checkpoint do not match its "
                         f"config: {str(e).splitlines()[0]}") from None
    # Same parameter order as when it was saved (build_optimizer); its "scheduler" entry is not read:
    # the learning rate follows from the step (learning_rate).
    run.optimizer.load_state_dict(ckpt["optimizer"])
    sampler = ckpt["sampler"]
    progress = Progress(step=int(ckpt["step"]), epoch=int(sampler["epoch"]),
                        batch_in_epoch=int(sampler["batch_in_epoch"]),
                        best=float(ckpt.get("best", ckpt.get("best_oIoU", -1.0))),
                        last_good=path, last_good_step=int(ckpt["step"]),
                        evaluated_at=ckpt.get("evaluated_at"))
    if sampler["world_size"] != run.world and run.main_process:
        print(f"note: checkpoint written with {sampler['world_size']} process(es), resuming with {run.world}: "
              f"the data order after resume differs from an uninterrupted run")
    rngs = ckpt["rng"]
    set_rng_state(rngs[run.rank] if run.rank < len(rngs) else rngs[0], run.mask_words)
    if run.main_process:
        print(f"resumed from {path}: step {progress.step}, epoch {progress.epoch}, batch {progress.batch_in_epoch}")
    return progress


def distributed(train_step: maris.TrainStep, device: torch.device, world: int) -> torch.nn.Module:
    """What runs a step: the TrainStep itself, or under torchrun its DistributedDataParallel wrapper."""
    if world == 1:
        return train_step
    # broadcast_buffers off: the frozen encoders' buffers are identical on every rank already.
    # find_unused_parameters off: every trained parameter (MARIS's, the heads', the adapters') gets a
    # gradient at every step, also when no sentence of a rank's batch has a word for Mask Grounding (its
    # loss is then a zero attached to the whole head), so DDP skips the per-step search of the autograd
    # graph. A configuration that left one unused would stop with DDP's error naming it.
    return torch.nn.parallel.DistributedDataParallel(
        train_step, device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False, find_unused_parameters=False)


def build_run(opts: TrainOptions, explicit: dict) -> tuple[Run, Progress]:
    """Join the process group, then build the data, the model, heads and optimizer, the caches; resume."""
    rank, world, device = maris.setup_distributed(opts.device)  # torchrun: join the process group
    opts, ckpt, resume = load_options(opts, explicit, rank == 0)
    if rank == 0:  # refuse a folder that holds another run before minutes of building (`claim_run_folder`)
        check_run_folder(pathlib.Path(opts.out_dir), resume=resume, overwrite=opts.overwrite)
    config = model_config(opts) if ckpt is None else ckpt["config"]
    train_set, val_set = build_data(opts, config)
    # The model and heads are seeded by the config (init_seed); the global RNGs differ per rank, and
    # Mask Grounding's word choice draws from a generator of its own (mask_word_generator).
    random.seed(opts.seed + rank)
    np.random.seed(opts.seed + rank)
    torch.manual_seed(opts.seed + rank)
    train_step = build_train_step(config, opts, device)
    # Each frozen encoder's weights are hashed once per run: every checkpoint records them, a resume and
    # evaluate.py compare them, the feature cache reuses SAM's.
    hashes = maris.encoder_hashes(train_step.model)
    if ckpt is not None:
        maris.check_encoders(ckpt, train_step.model, source=resume, sam_checkpoint=explicit.get("sam_checkpoint"),
                             clip_checkpoint=explicit.get("clip_checkpoint"), hashes=hashes)
    run = Run(opts=opts, config=config, rank=rank, world=world, device=device,
              precision=maris.effective_precision(device, opts.precision), train_set=train_set, val_set=val_set,
              train_step=train_step, runner=train_step, optimizer=build_optimizer(train_step, opts),
              mask_words=mask_word_generator(opts.seed, rank), log=RunLog.of(ckpt),
              encoders=maris.encoder_record(hashes, {"sam": opts.sam_checkpoint, "clip": opts.clip_checkpoint}))
    run.batches_per_epoch = len(run.batches(0))
    if run.batches_per_epoch == 0:
        raise SystemExit(f"error: the {opts.train_split} split has {len(train_set)} items, fewer than "
                         f"batch size {opts.batch_size} x {world} process(es)")
    if opts.feature_cache is not None:
        open_caches(run)
    progress = Progress() if ckpt is None else restore(run, ckpt, resume)
    run.resumed_from = resume
    if opts.compile:
        # In place (nn.Module.compile), so parameter names and state-dict keys stay the same.
        for module in (run.model.feature_enhancement, *run.model.maa_blocks, run.model.mask_decoder):
            if module is not None:  # the ablation without Feature Enhancement has none
                module.compile()
    run.runner = distributed(train_step, device, world)
    return run, progress


def print_banner(run: Run) -> None:
    """What runs: the model, the data, the steps, the encoders' weights, the add-ons (rank 0 only)."""
    if not run.main_process:
        return
    opts, cfg, model = run.opts, run.model.cfg, run.model
    n_train = sum(p.numel() for p in run.train_step.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"MARIS {opts.preset} S={cfg.image_size} on {opts.dataset} {opts.train_split}: {len(run.train_set)} items, "
          f"{run.batches_per_epoch} steps/epoch x {opts.epochs} epochs, batch {opts.batch_size} x {run.world}, "
          f"{n_train:,} trainable of {n_all:,} parameters, {run.device}, out {run.out_dir}")
    print(f"encoders: SAM {opts.sam_checkpoint or 'RANDOM (no --sam-checkpoint)'}, "
          f"CLIP {opts.clip_checkpoint or 'RANDOM (no --clip-checkpoint)'}"
          + (f"; feature cache {run.train_cache.root} ({run.train_cache.bytes_per_image:,} bytes/image)"
             if run.train_cache is not None else ""))
    extras = [f"{name} {getattr(cfg, name + '_weight')}" for name in OPTIONAL_LOSSES
              if getattr(cfg, name + "_weight") > 0] + (["RISAM adapters"] if cfg.adapters else [])
    if extras:
        print("add-ons: " + ", ".join(extras))


# --- Checkpoints and the metrics log ---

def save_checkpoint(run: Run, progress: Progress, path: pathlib.Path) -> None:
    """Write a checkpoint (every rank calls it: the RNG states are gathered to rank 0)."""
    states = [rng_state(run.mask_words)]
    if run.world > 1:
        states = [None] * run.world
        dist.all_gather_object(states, rng_state(run.mask_words))
    if not run.main_process:
        return
    opts = run.opts
    atomic_save({
        "config": run.config, "options": dataclasses.asdict(opts), "model": run.model.trainable_state_dict(),
        "heads": run.train_step.heads.state_dict(), "optimizer": run.optimizer.state_dict(),
        # A description only: resuming recomputes the learning rate from the step.
        "scheduler": {"schedule": opts.schedule, "warmup_steps": opts.warmup_steps, "total_steps": run.total_steps,
                      "peak_lr": opts.lr, "lr": learning_rate(progress.step, opts, run.total_steps)},
        "step": progress.step, "epoch": progress.epoch,
        # the best validation score so far, of the dataset's validation metric (val_metric)
        "best_metric": val_metric(opts), "best": progress.best,
        **({"best_oIoU": progress.best} if val_metric(opts) == "oIoU" else {}),
        "evaluated_at": progress.evaluated_at,  # a resume does not score this step again
        "sampler": {"seed": opts.seed, "epoch": progress.epoch, "batch_in_epoch": progress.batch_in_epoch,
                    "world_size": run.world, "batch_size": opts.batch_size},
        "rng": states,
        "encoders": run.encoders,  # the frozen encoders' files and sha256: checked on resume and by evaluate.py
        "log": run.log.state(),  # metrics.jsonl's records up to here, its run id, session and clock
    }, path)


def save_last(run: Run, progress: Progress) -> None:
    """Write <out-dir>/last.pt; it becomes the checkpoint a non-finite loss falls back on."""
    save_checkpoint(run, progress, run.out_dir / "last.pt")
    progress.last_good, progress.last_good_step = str(run.out_dir / "last.pt"), progress.step
    progress.saved_at, progress.saved_time = progress.step, time.time()


def log_record(run: Run, record: dict) -> None:
    """Append one JSON line to <out-dir>/metrics.jsonl (rank 0) with the run id, session and seconds (`RunLog`);
    NaN (an empty split's metrics) is null.

    Raises:
        OSError: the write failed; the message names the file and the cause.
    """
    if run.main_process:
        path = run.out_dir / "metrics.jsonl"
        line = json.dumps(without_nan({**record, "run": run.log.run_id, "session": run.log.session,
                                       "seconds": round(run.log.now(), 3)}))
        try:
            with open(path, "a") as f:
                f.write(line + "\n")
        except OSError as e:
            raise OSError(e.errno, f"cannot write {path}: {file_error(e)}") from e
        run.log.records += 1
        if run.tensorboard is not None:
            tensorboard_scalars(run.tensorboard, record)


# --- One step, one epoch, validation ---

class _Stop:
    """Set by the SIGINT/SIGTERM handler; checked after every step."""

    def __init__(self):
        self.signal: str | None = None

    def __call__(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now, without saving
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name


# Loss terms averaged into metrics.jsonl; MagNet's two and the no-target BCE only when their weight is > 0.
LOSS_KEYS = ("loss", "focal", "dice", "mask_grounding", "alignment", "no_target")
OPTIONAL_LOSSES = ("mask_grounding", "alignment", "no_target")  # logged when MarisConfig.<name>_weight > 0
# Everything a "train" record averages over its steps: the losses and the gradient norm before clipping.
LOG_KEYS = (*LOSS_KEYS, "grad_norm")


def batch_losses(runner: torch.nn.Module, batch: dict, inputs: dict, *, device: torch.device, precision: str,
                 generator: torch.Generator | None = None, no_target: bool = False) -> dict:
    """The losses of one `data.collate_images` batch: `runner` (a TrainStep or its DDP wrapper) under autocast.

    Args:
        inputs: the batch's image arguments (`data.batch_image_inputs`).  precision: "fp32" or "bf16".
        generator: Mask Grounding's RNG.
        no_target: pass the batch's "no_target" labels (B,) to the no-target head's BCE (set when the
            model's no_target_weight > 0; otherwise TrainStep gets exactly the arguments it got before).

    Returns:
        TrainStep's loss dict; the padded area (outside each image's `input_size`) takes no part.
    """
    masks = batch["mask"].to(device)  # (B, S, S)
    valid = data.valid_mask(batch["input_size"], masks.shape[-1]).to(device)  # (B, S, S) False on the padding
    labels = {"no_target": batch["no_target"].to(device)} if no_target else {}  # (B,) bool
    with maris.autocast(device, precision):
        # focal + dice (+ MagNet's losses, the no-target BCE when their weights are > 0); the losses run in fp32
        return runner(ids=batch["ids"].to(device), word_mask=batch["word_mask"].to(device), masks=masks,
                      valid=valid, generator=generator, **inputs, **labels)


def train_one_step(run: Run, batch: dict, progress: Progress, stop: _Stop) -> tuple[dict, torch.Tensor, int, bool]:
    """Forward, backward, clip and optimizer step on one batch.

    Returns:
        (losses, gradient norm before clipping, images the encoder ran on, whether any rank got a stop signal).

    Raises:
        SystemExit: a non-finite loss on any rank (before the optimizer step: the weights never see it).
    """
    opts, device = run.opts, run.device
    # images (B_img, 3, S, S) of the distinct images, or their cached encoder outputs
    inputs, encoded = data.batch_image_inputs(batch, device=device, model=run.model, cache=run.train_cache,
                                              dataset=run.train_set, batch_size=opts.batch_size,
                                              precision=run.precision)
    losses = batch_losses(run.runner, batch, inputs, device=device, precision=run.precision,
                          generator=run.mask_words, no_target=run.model.cfg.no_target_weight > 0)
    loss = losses["loss"]
    # Every rank learns whether any rank saw a non-finite loss or a stop signal, and whether rank 0's clock
    # says last.pt is due (--save-minutes): three flags in one device tensor, one all-reduce, read after the
    # backward pass has been queued.
    due = run.main_process and opts.save_minutes > 0 and time.time() - progress.saved_time >= 60 * opts.save_minutes
    flags = torch.stack([(~torch.isfinite(loss.detach())).double(),
                         torch.full((), float(stop.signal is not None), dtype=torch.float64, device=device),
                         torch.full((), float(due), dtype=torch.float64, device=device)])
    flags = all_reduce_sum(flags, device)  # (3,) [non-finite, signal, save due]
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()  # under DDP the gradients (the heads' included) are averaged over the ranks here
    trainable = [p for p in run.train_step.parameters() if p.requires_grad]  # MARIS's, then the heads'
    if opts.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, opts.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
    # The loop's deliberate host sync; MARIS's input checks (word mask, image_index) sync as well.
    bad, sig, save_due = flags.tolist()
    if bad:
        where = (f"the last good checkpoint is {progress.last_good} (step {progress.last_good_step})"
                 if progress.last_good else "no checkpoint was written yet")
        raise SystemExit(f"error: non-finite loss ({loss.item()}) at step {progress.step + 1} "
                         f"(epoch {progress.epoch + 1}); stopping without saving; {where}")
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(progress.step, opts, run.total_steps)
    run.optimizer.step()
    progress.step += 1
    progress.batch_in_epoch += 1
    progress.save_due = save_due > 0
    return losses, grad_norm, encoded, sig > 0


class LossWindow:
    """Running sums of the logged values (LOG_KEYS) since the last "train" record, kept on the device
    so that they are read at log steps only."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(LOG_KEYS), dtype=torch.float64, device=device)
        self.n, self.start = 0, time.time()

    def add(self, losses: dict, grad_norm: torch.Tensor) -> None:
        values = [*(losses[k].detach() for k in LOSS_KEYS), grad_norm.to(self.sums.device)]
        self.sums += torch.stack(values).double()  # (len(LOG_KEYS),)
        self.n += 1

    def means(self, world: int) -> dict:
        """The means over the window's steps and every rank (each rank runs as many steps)."""
        sums = all_reduce_sum(self.sums, self.sums.device) / (self.n * world)
        return dict(zip(LOG_KEYS, sums.tolist()))


def log_train(run: Run, progress: Progress, window: LossWindow, bar: tqdm) -> None:
    """Write a "train" record of the window's means (MagNet's losses and the no-target BCE only when on) and
    show it on the bar."""
    cfg = run.model.cfg
    means = {k: v for k, v in window.means(run.world).items()
             if k not in OPTIONAL_LOSSES or getattr(cfg, k + "_weight") > 0}
    speed = window.n * run.opts.batch_size * run.world / max(time.time() - window.start, 1e-9)
    lr = learning_rate(progress.step, run.opts, run.total_steps)  # that of the next step
    log_record(run, {"kind": "train", "step": progress.step, "epoch": epoch_number(progress), "steps": window.n,
                     **means, "lr": lr, "items_per_s": speed})
    bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.2e}", items_s=f"{speed:.1f}")


def done(run: Run, progress: Progress) -> bool:
    """--max-steps reached."""
    return run.opts.max_steps > 0 and progress.step >= run.opts.max_steps


def train_epoch(run: Run, progress: Progress, stop: _Stop) -> bool:
    """Run the rest of the current epoch (or up to --max-steps); return whether a signal stops the run.

    Stopping is decided from values reduced over all ranks only, so every rank stops at the same step.
    """
    opts = run.opts
    batches = run.batches(progress.epoch)[progress.batch_in_epoch:]
    # The generator only seeds the workers; seeding it from (seed, epoch) keeps the global RNG untouched by
    # loader creation, which exact resume relies on. collate_images keeps each distinct image of a batch once.
    loader = torch.utils.data.DataLoader(run.train_set, batch_sampler=batches, collate_fn=data.collate_images,
                                         num_workers=opts.workers, pin_memory=run.device.type == "cuda",
                                         generator=torch.Generator().manual_seed(opts.seed * 1000 + progress.epoch))
    bar = tqdm(loader, total=run.batches_per_epoch, initial=progress.batch_in_epoch,
               desc=f"epoch {progress.epoch + 1}/{opts.epochs}", disable=not (opts.progress and run.main_process),
               dynamic_ncols=True, leave=False)
    run.runner.train()
    window, epoch_start, encoded, stopping = LossWindow(run.device), time.time(), 0, False
    for batch in bar:
        losses, grad_norm, n_encoded, stopping = train_one_step(run, batch, progress, stop)
        encoded += n_encoded
        window.add(losses, grad_norm)
        if progress.step % opts.log_every == 0 or progress.batch_in_epoch == run.batches_per_epoch:
            log_train(run, progress, window, bar)
            window = LossWindow(run.device)
        epoch_ends = progress.batch_in_epoch == run.batches_per_epoch  # `train` writes last.pt then
        if ((opts.save_every > 0 and progress.step % opts.save_every == 0) or progress.save_due) and not epoch_ends:
            save_last(run, progress)
        if stopping or done(run, progress):
            break
    bar.close()
    if not stopping:
        stopping = all_reduce_sum([float(stop.signal is not None)], run.device).item() > 0
    if not stopping and progress.batch_in_epoch == run.batches_per_epoch:
        # Wall time of this process's share of the epoch (before validation), and the images the frozen
        # encoder ran on, summed over ranks (0 once a feature cache holds every image).
        log_record(run, {"kind": "epoch", "step": progress.step, "epoch": epoch_number(progress),
                         "epoch_seconds": round(time.time() - epoch_start, 3),
                         "encoded_images": int(all_reduce_sum([encoded], run.device).item())})
    return stopping


def val_metric(opts: TrainOptions) -> str:
    """The validation metric that picks best.pt for the run's dataset (VAL_METRIC)."""
    return VAL_METRIC[metric_set(opts.dataset)]


def validate(run: Run, progress: Progress) -> dict | None:
    """Score the validation split (every rank its share) with the dataset's metric set; a new best of its
    validation metric (`val_metric`: oIoU, gIoU or mIoU) writes best.pt.

    gRefCOCO-style splits decide "no target" by the model's no-target head when it has one, else by an
    empty mask (`evaluate.scoring_for`, the default of evaluate.py).
    """
    progress.evaluated_at = progress.step
    if run.val_set is None:
        return None
    opts = run.opts
    scoring = scoring_for(opts.dataset, run.model)
    start = time.time()
    metrics = evaluate_model(run.model, run.val_set, batch_size=opts.batch_size, device=run.device,
                             precision=opts.precision, workers=opts.workers, cache=run.val_cache,
                             progress=opts.progress and run.main_process, desc=f"val {opts.val_split}",
                             scoring=scoring)
    run.validation_seconds += time.time() - start
    run.validations += 1
    rule = {"no_target_rule": scoring.nt_rule} if scoring.metrics == "gres" else {}
    log_record(run, {"kind": "eval", "step": progress.step, "epoch": epoch_number(progress), "split": opts.val_split,
                     **metrics, **rule})
    write_curves(run)
    name = val_metric(opts)
    improved = metrics[name] > progress.best  # False for NaN (a split without items)
    if run.main_process:
        shown = "  ".join(f"{k} {_percent(metrics[k])}" for k in VAL_PRINTED[scoring.metrics])
        counted = f"{metrics['count']} {COUNT_NOUNS[scoring.metrics]}" + (
            f"; no target by the {scoring.nt_rule} rule" if rule else "")
        print(f"step {progress.step} epoch {epoch_number(progress)}: {opts.val_split} {shown}  ({counted})"
              + ("  new best" if improved else ""))
    if improved:
        progress.best = metrics[name]
        save_checkpoint(run, progress, run.out_dir / "best.pt")
    return metrics


def _percent(value: float) -> str:
    """A metric (a fraction) in percent with 2 decimals, "-" when undefined (NaN)."""
    return "-" if value != value else f"{100 * value:.2f}"


# --- The run folder: one run per folder, one writer at a time, a faithful metrics.jsonl ---
# A folder holds one run: a new run is refused where another left its files (unless --overwrite), and the
# running process holds an exclusive lock on <out-dir>/train.lock. The lock is flock(2): the system releases
# it when the process ends in any way (kill -9 included), so a killed run never blocks its resume; the file
# stays behind, unlocked, naming the last holder. Under torchrun rank 0 alone holds it.
# metrics.jsonl is the run's history: every checkpoint stores how many records the file had when it was
# written, and a resume drops the records written after it (their steps run again), so no step appears
# twice; each record names the run, the session (1 = the start, + 1 per resume) and the training seconds
# summed over the sessions.

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")  # what makes a folder hold a run; --overwrite deletes them
LOCK_FILE = "train.lock"


def check_run_folder(out_dir: pathlib.Path, *, resume: str | None, overwrite: bool) -> None:
    """Refuse to start where another run's files would be overwritten or mixed in.

    Allowed: a folder without RUN_FILES, --overwrite, or resuming a checkpoint that lies in the folder.

    Raises:
        SystemExit: the folder holds another run; the message says which files and what to do.
    """
    present = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not present or overwrite:
        return
    if resume is not None and pathlib.Path(resume).resolve().parent == out_dir.resolve():
        return
    to_resume = "--resume auto to continue it, " if "last.pt" in present and resume is None else ""
    raise SystemExit(f"error: run folder {out_dir} already holds a run ({', '.join(present)}): expected another "
                     f"--out-dir, {to_resume}or --overwrite to replace it")


class RunLock:
    """An exclusive lock on <out-dir>/train.lock, held from `acquire` to `release` (see the comment above).

    Raises:
        SystemExit: another process holds it; the message names the holder written in the file.
    """

    def __init__(self, out_dir: pathlib.Path):
        self.path, self.file = out_dir / LOCK_FILE, None

    def acquire(self) -> "RunLock":
        if fcntl is None:
            print(f"note: no file locking on this system: nothing stops a second training in {self.path.parent}")
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")  # not truncated: a refused process still reads the holder
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.release()
            raise SystemExit(f"error: run folder {self.path.parent} is in use by another training ({holder} holds "
                             f"{self.path}): expected one training per folder; wait for it to end or pick another "
                             f"--out-dir") from None
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()
        return self

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the last descriptor releases the flock
            self.file = None


@dataclass
class RunLog:
    """The run id, session and clock of metrics.jsonl's records (see the comment above)."""

    run_id: str  # 12 hex digits, drawn when the run starts, the same in every session
    session: int = 1
    records: int = 0  # lines of metrics.jsonl so far
    seconds: float = 0.0  # training seconds of the earlier sessions, up to the checkpoint this one resumed from
    started: float = dataclasses.field(default_factory=time.time)

    @classmethod
    def of(cls, ckpt: dict | None) -> "RunLog":
        """A new run's log, or the log of the checkpoint resumed (one from before run ids: a new id, session 2)."""
        if ckpt is None:
            return cls(run_id=uuid.uuid4().hex[:12])
        if "log" not in ckpt:
            return cls(run_id=uuid.uuid4().hex[:12], session=2, records=-1)  # records: unknown
        log = ckpt["log"]
        return cls(run_id=log["run_id"], session=log["session"] + 1, records=log["records"], seconds=log["seconds"])

    def now(self) -> float:
        """Training seconds of the run so far, summed over its sessions."""
        return self.seconds + time.time() - self.started

    def state(self) -> dict:
        """What a checkpoint stores."""
        return {"run_id": self.run_id, "session": self.session, "records": self.records, "seconds": self.now()}


def keep_records(path: pathlib.Path, keep: int, step: int) -> tuple[int, int]:
    """Cut metrics.jsonl back to its first `keep` lines, those written up to the checkpoint (of `step`) that a
    resume starts from; keep < 0 (a checkpoint from before record counts): the leading records up to that step.
    The file is rewritten atomically. Returns (lines kept, lines dropped)."""
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    if keep < 0:
        keep = 0
        while keep < len(lines) and lines[keep].startswith("{") and json.loads(lines[keep]).get("step", 0) <= step:
            keep += 1
    keep = min(keep, len(lines))
    if keep < len(lines):
        data.atomic_write(path, lambda f: f.write("".join(lines[:keep]).encode()))
    return keep, len(lines) - keep


def claim_run_folder(run: Run, progress: Progress) -> RunLock:
    """Rank 0, before anything is written: lock the folder, check it again under the lock (a run may have
    started since `build_run` checked), delete an overwritten run's files, cut metrics.jsonl back to the
    checkpoint resumed and write this session's "start" record.

    Raises:
        SystemExit: the folder is locked by another process, or holds another run.
    """
    lock = RunLock(run.out_dir).acquire()
    try:
        check_run_folder(run.out_dir, resume=run.resumed_from, overwrite=run.opts.overwrite)
        same_folder = (run.resumed_from is not None
                       and pathlib.Path(run.resumed_from).resolve().parent == run.out_dir.resolve())
        if run.opts.overwrite and not same_folder:
            for name in RUN_FILES:
                (run.out_dir / name).unlink(missing_ok=True)
        run.log.records, dropped = keep_records(run.out_dir / "metrics.jsonl", run.log.records if same_folder else 0,
                                                progress.step)
        log_record(run, {"kind": "start", "step": progress.step, "epoch": epoch_number(progress),
                         "resumed_from": run.resumed_from, "dropped_records": dropped, "processes": run.world,
                         "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    except BaseException:
        lock.release()
        raise
    return lock


# --- Training curves: curves.png (matplotlib) and TensorBoard scalars ---
# The picture is drawn from metrics.jsonl alone, so a finished, killed or running run can be plotted again at
# any time (`python train.py --plot RUN_DIR`); during training it is redrawn after each validation.

CURVES_FILE = "curves.png"
LOSS_PARTS = ("loss", "focal", "dice", "mask_grounding", "alignment", "no_target")  # train records' loss fields
# Val metrics drawn, per metric set (the first of each is the one that picks best.pt).
CURVE_METRICS = {"ris": ("oIoU", "mIoU", "Prec@0.5", "Prec@0.7", "Prec@0.9"),
                 "gres": ("gIoU", "cIoU", "N-acc", "T-acc"), "phrasecut": ("mIoU", "cumIoU", "Acc@0.5")}


def read_metrics(path: pathlib.Path) -> list[dict]:
    """The records of a metrics.jsonl file, in order.

    Raises:
        FileNotFoundError: no such file.  ValueError: a line that is not a JSON object (file and line named).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected the metrics.jsonl of a train.py run")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "kind" not in record or "step" not in record:
            raise ValueError(f"{path} line {number} is not a metrics.jsonl record: expected a JSON object with "
                             f"'kind' and 'step'")
        records.append(record)
    return records


def plot_curves(records: list[dict], out: pathlib.Path, *, title: str = "") -> pathlib.Path:
    """Draw four panels against optimizer steps: the training loss and its parts (log scale), the validation
    metrics in percent, the learning rate, the gradient norm before clipping. Written atomically (temporary
    file, then rename), so a viewer never sees half a picture.

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    train_records = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig = Figure(figsize=(10, 6.4), dpi=80, layout="constrained")
    (ax_loss, ax_val), (ax_lr, ax_grad) = fig.subplots(2, 2, sharex=True)

    def series(rows: list[dict], key: str, scale: float = 1.0) -> tuple[list, list]:
        points = [(r["step"], scale * r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        return [p[0] for p in points], [p[1] for p in points]

    for key in LOSS_PARTS:
        steps, values = series(train_records, key)
        if steps:
            ax_loss.plot(steps, values, label=key, linewidth=2.0 if key == "loss" else 1.2)
    ax_loss.set_yscale("log")
    ax_loss.set_title("training loss (total = weighted parts)")
    kind = _metric_kind(evals)
    for key in CURVE_METRICS[kind]:
        steps, values = series(evals, key, 100.0)
        if steps:
            ax_val.plot(steps, values, marker="o", markersize=4, label=key)
    split = evals[-1].get("split", "val") if evals else "val"
    ax_val.set_title(f"{split} metrics (%)" if evals else "validation metrics (none yet)")
    ax_lr.plot(*series(train_records, "lr"), color="tab:green")
    ax_lr.set_title("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_grad.plot(*series(train_records, "grad_norm"), color="tab:red", linewidth=1.0)
    ax_grad.set_title("gradient norm (before clipping)")
    for ax in (ax_loss, ax_val, ax_lr, ax_grad):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in (ax_lr, ax_grad):
        ax.set_xlabel("optimizer step")
    if title:
        fig.suptitle(title)
    out = pathlib.Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)
    return out


def _metric_kind(evals: list[dict]) -> str:
    """The metric set of eval records, from the metrics they hold (gIoU: gRefCOCO-style; cumIoU: PhraseCut)."""
    last = evals[-1] if evals else {}
    return "gres" if "gIoU" in last else "phrasecut" if "cumIoU" in last else "ris"


def write_curves(run: Run) -> None:
    """Redraw <out-dir>/curves.png from metrics.jsonl (rank 0, with --curves); without matplotlib, say so once."""
    if not (run.main_process and run.opts.curves):
        return
    try:
        plot_curves(read_metrics(run.out_dir / "metrics.jsonl"), run.out_dir / CURVES_FILE,
                    title=f"{run.out_dir.name}: {run.opts.dataset}")
    except ImportError:
        if not run.curves_note:
            print("note: no curves.png: matplotlib is not installed (pip install matplotlib, or --no-curves)")
            run.curves_note = True


def plot_run(run_dir: str) -> pathlib.Path:
    """`train.py --plot RUN_DIR`: draw RUN_DIR/curves.png from RUN_DIR/metrics.jsonl.

    Raises:
        FileNotFoundError, ValueError: no or a damaged metrics.jsonl.  SystemExit: matplotlib is not installed.
    """
    folder = pathlib.Path(run_dir)
    records = read_metrics(folder / "metrics.jsonl")
    try:
        out = plot_curves(records, folder / CURVES_FILE, title=f"{folder.name}")
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib: pip install matplotlib") from None
    print(f"wrote {out} ({sum(r['kind'] == 'train' for r in records)} train and "
          f"{sum(r['kind'] == 'eval' for r in records)} eval records)")
    return out


def summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter (--tensorboard).

    Raises:
        SystemExit: the tensorboard package is not installed.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SystemExit("error: --tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def tensorboard_scalars(writer, record: dict) -> None:
    """A metrics.jsonl record as TensorBoard scalars at its step: train/<field> (losses, lr, grad_norm,
    items_per_s), <split>/<metric> for eval records (fractions, as in metrics.jsonl), epoch/<field>."""
    kind = record["kind"]
    if kind == "start":
        return
    group = record.get("split", "val") if kind == "eval" else kind
    skip = {"kind", "step", "epoch", "run", "session", "seconds", "steps", "split", "count"}
    for key, value in record.items():
        if key not in skip and isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(f"{group}/{key}", value, global_step=record["step"])
    writer.flush()


# --- The loop ---

def train(opts: TrainOptions, explicit: dict) -> dict:
    """Run a training job (called by `main`; see the module docstring).

    Returns:
        dict(step, epoch, best_metric (oIoU, gIoU or mIoU), best (its best validation value, -1 before any),
        best_oIoU (= best where best_metric is oIoU, else None), val=last validation metrics or None, out_dir,
        stopped_by, seconds=`session_seconds` of this session).

    Raises:
        SystemExit: missing data, a bad option, a non-finite loss (names the step).
    """
    writer_class = summary_writer_class() if opts.tensorboard else None  # a missing package stops before anything
    setup_start, setup_cpu = time.time(), time.process_time()
    run, progress = build_run(opts, explicit)
    opts = run.opts
    run.log.started = time.time()  # the clock of metrics.jsonl counts training, not building
    clock = {"setup": run.log.started - setup_start, "start": run.log.started, "cpu_start": time.process_time(),
             "setup_cpu": time.process_time() - setup_cpu}
    lock = claim_run_folder(run, progress) if run.main_process else None
    if writer_class is not None and run.main_process:
        run.tensorboard = writer_class(log_dir=str(run.out_dir / "tensorboard" / f"{run.log.run_id}-{run.log.session}"))
    stop, previous = _Stop(), {}
    stopping, val_metrics = False, None
    try:
        print_banner(run)
        try:  # signal handlers can only be installed from the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, stop)
        except ValueError:
            previous = {}
        while progress.epoch < opts.epochs and not done(run, progress) and not stopping:
            stopping = train_epoch(run, progress, stop)
            if not stopping and progress.batch_in_epoch == run.batches_per_epoch:  # the epoch is complete
                progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
                if opts.eval_every > 0 and progress.epoch % opts.eval_every == 0:
                    val_metrics = validate(run, progress)
                save_last(run, progress)
        final_validation = not stopping and progress.evaluated_at != progress.step
        if final_validation:
            val_metrics = validate(run, progress)
        if progress.saved_at != progress.step or final_validation:
            save_last(run, progress)  # after the final validation too, so last.pt holds the final best score
        reason = (stop.signal or "a signal on another rank") if stopping else None
        if run.main_process:
            print(f"saved {run.out_dir / 'last.pt'} at step {progress.step}"
                  + (f" (stopped by {reason})" if reason else "")
                  + (f"; best val {val_metric(opts)} {100 * progress.best:.2f}" if progress.best >= 0 else ""))
        seconds = session_seconds(run, clock)
        if run.main_process:
            print(time_line(run, seconds))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if run.tensorboard is not None:
            run.tensorboard.close()
        if lock is not None:
            lock.release()
    name = val_metric(opts)
    return {"step": progress.step, "epoch": progress.epoch, "best_metric": name, "best": progress.best,
            "best_oIoU": progress.best if name == "oIoU" else None, "val": val_metrics,
            "out_dir": str(run.out_dir), "stopped_by": reason, "seconds": seconds}


def session_seconds(run: Run, clock: dict) -> dict:
    """This session's times: wall seconds of `setup` (data, model, caches; before the loop), of the loop
    (`total`) split into `train` (steps and checkpoints) and `validation`; process CPU seconds of the loop
    (`cpu`, every thread of this process) and of the setup (`setup_cpu`)."""
    total = time.time() - clock["start"]
    return {"setup": round(clock["setup"], 2), "total": round(total, 2),
            "train": round(total - run.validation_seconds, 2), "validation": round(run.validation_seconds, 2),
            "cpu": round(time.process_time() - clock["cpu_start"], 2), "setup_cpu": round(clock["setup_cpu"], 2)}


def time_line(run: Run, seconds: dict) -> str:
    """The run's closing `time:` line (README, "What the first command does")."""
    passes = run.validations
    scored = (f" + validation {seconds['validation']:.1f} s ({passes} pass{'es' * (passes != 1)} over "
              f"{len(run.val_set)} pairs) = {seconds['total']:.1f} s" if passes else "")
    return (f"time: training {seconds['train']:.1f} s{scored} wall, after {seconds['setup']:.1f} s of setup "
            f"(data, model); process CPU {seconds['cpu']:.1f} s (+ {seconds['setup_cpu']:.1f} s setup), "
            f"{torch.get_num_threads()} torch thread{'s' * (torch.get_num_threads() != 1)}")


@maris.one_line_errors
def main(argv: list[str] | None = None) -> dict:
    """Entry point: `python train.py [options]` (see --help); bad files and values exit with one line
    (`maris.one_line_errors`)."""
    opts, explicit = maris.parse_options(TrainOptions, argv, DESCRIPTION)
    if opts.plot is not None:
        return {"curves": str(plot_run(opts.plot))}
    try:
        return train(opts, explicit)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
