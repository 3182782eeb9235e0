"""Scoring referring image segmentation and the `evaluate.py` command line (README: "Scoring protocol").

    python evaluate.py --ckpt runs/shapes/best.pt
    python evaluate.py --ckpt best.pt --dataset refcoco --split-by unc --split val,testA,testB
    python evaluate.py --ckpt best.pt --eval-size 480          # LAVT/MagNet-style square scoring
    python evaluate.py --ckpt best.pt --image photo.jpg --text "the dog on the left" --out overlay.png
    python evaluate.py --ckpt best.pt --feature-cache cache/  # SAM's encoder runs once per image, ever

The metrics are defined once, here; `train.py` imports them.

- Per (ref, sentence) pair: I = |pred ∩ gt|, U = |pred ∪ gt| in pixels.
- oIoU (also called cIoU) = ΣI / ΣU over every pair of the split; mIoU = mean of the per-pair IoU;
  Prec@X = share of pairs with IoU ≥ X, X ∈ {0.5, 0.6, 0.7, 0.8, 0.9}.
- An empty ground truth with an empty prediction scores IoU 1 and adds nothing to ΣI / ΣU
  (ReLA's gRefCOCO convention; RefCOCO ground truths are never empty).
- Default scoring at the original image resolution: mask logits (B, 1, 4H, 4W) are upsampled
  (bilinear) to the padded input side S, the bottom/right padding is cropped, the rest is resized
  (bilinear) to the original (Ho, Wo), and a pixel is foreground when sigmoid > threshold (0.5).
  `--eval-size R` instead resizes that prediction and the ground truth to an R × R square, the way
  LAVT and MagNet score (their tables use R = 480).
- Every sentence of a split is scored; whole images are packed into batches, so an image is
  encoded once per split (data.collate_images), or read from the encoder feature cache.
- A split with no pairs has no score: its metrics are null in the JSON and "-" in the table.

Shape letters: B pairs in a batch, S padded input side, (h2, w2) the resized image inside the
padding, (Ho, Wo) the original image, R the square side of `--eval-size`, H = W = S/16 the feature side,
B_img distinct images in a batch, C neck width, D SAM ViT width.
"""
from __future__ import annotations

import json
import os
import pathlib
import textwrap
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import data
import maris

# Prec@X thresholds of the RIS literature (LAVT, CRIS, MARIS tables).
PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)

# The splits a checkpoint is scored on when `--split` is not given : every split of the
# partition but "train", derived from data.py's tables so that a new partition needs no edit here.
EVAL_SPLITS = {
    ("shapes", None): tuple(s for s in data.SHAPES_SPLITS if s != "train"),
    **{key: tuple(s for s in splits if s != "train") for key, splits in data.SPLITS.items()},
}
# split_by used when neither the flag nor the checkpoint names one: data.py's default, the first
# partition listed for the dataset (shapes has none).
DEFAULT_SPLIT_BY = {"shapes": None, **{name: partitions[0] for name, partitions in data.DATASETS.items()}}


# --- Metrics: per-pair I and U, oIoU, mIoU, Prec@X ---

def intersection_union(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel counts I = |pred ∩ gt| and U = |pred ∪ gt|, long (B,), of bool masks (B, Ho, Wo) or (Ho, Wo).

    Raises:
        ValueError: the shapes differ.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != ground-truth shape {tuple(gt.shape)}")
    if pred.dim() == 2:
        pred, gt = pred[None], gt[None]
    pred = pred.bool().flatten(1)  # (B, Ho*Wo)
    gt = gt.bool().flatten(1)  # (B, Ho*Wo)
    return (pred & gt).sum(1), (pred | gt).sum(1)


def pair_iou(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """Per-pair IoU (B,) in float64 from I and U (B,); an empty union (empty GT and prediction) scores 1."""
    inter = inter.double()
    union = union.double()
    # NOTE(paper): empty GT + empty prediction = IoU 1 (ReLA's gRefCOCO rule).
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


class RISMetrics:
    """Running sums for oIoU, mIoU and Prec@X over a split; sums add up across DDP ranks.

    Keeps ΣI, ΣU, ΣIoU, the pair count and the hits of each Prec@X threshold, so the result is
    the same however the pairs are batched, ordered or sharded over processes.
    """

    def __init__(self, thresholds: tuple[float, ...] = PREC_THRESHOLDS):
        self.thresholds = tuple(float(t) for t in thresholds)
        self.reset()

    def reset(self) -> None:
        """Forget every pair seen so far."""
        self.total_i = 0.0
        self.total_u = 0.0
        self.iou_sum = 0.0
        self.count = 0
        self.hits = [0] * len(self.thresholds)

    def update(self, inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
        """Add a batch of pairs' I and U (B,) (`intersection_union`); returns their IoU (B,) in float64."""
        inter = inter.detach().reshape(-1).cpu()
        union = union.detach().reshape(-1).cpu()
        iou = pair_iou(inter, union)  # (B,)
        # Empty-GT/empty-prediction pairs have I = U = 0, so they add nothing to ΣI / ΣU.
        self.total_i += float(inter.double().sum())
        self.total_u += float(union.double().sum())
        self.iou_sum += float(iou.sum())
        self.count += int(iou.numel())
        for k, t in enumerate(self.thresholds):
            self.hits[k] += int((iou >= t).sum())  # ≥, as the RIS papers count
        return iou

    def state(self) -> torch.Tensor:
        """The sums as one float64 vector [ΣI, ΣU, ΣIoU, count, hits...] (exact below 2**53)."""
        return torch.tensor([self.total_i, self.total_u, self.iou_sum, float(self.count), *map(float, self.hits)],
                            dtype=torch.float64)

    def load_state(self, state: torch.Tensor) -> None:
        """Inverse of `state`."""
        values = state.double().cpu().tolist()
        self.total_i, self.total_u, self.iou_sum = values[0], values[1], values[2]
        self.count = int(round(values[3]))
        self.hits = [int(round(v)) for v in values[4:]]

    def all_reduce(self) -> None:
        """Sum the running totals over every DDP rank (no-op without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        # NCCL only reduces CUDA tensors; gloo reduces CPU tensors.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        state = self.state().to(device)
        dist.all_reduce(state, op=dist.ReduceOp.SUM)
        self.load_state(state)

    def compute(self) -> dict:
        """The metrics as fractions in [0, 1] (multiply by 100 for the papers' tables).

        Returns:
            dict with "oIoU", "mIoU", "Prec@0.5" ... "Prec@0.9" (floats; NaN when no pair was seen)
            and "count" (int). ΣU = 0 with pairs seen (every GT and prediction empty) gives oIoU 1.
        """
        nan = float("nan")
        out = {"count": self.count}
        if self.count == 0:
            out["oIoU"] = nan
        else:
            out["oIoU"] = self.total_i / self.total_u if self.total_u > 0 else 1.0
        out["mIoU"] = self.iou_sum / self.count if self.count else nan
        for t, h in zip(self.thresholds, self.hits):
            out[f"Prec@{t:g}"] = h / self.count if self.count else nan
        return out


# --- From mask logits to a scored binary mask ---

def logits_to_masks(logits: torch.Tensor, input_size: torch.Tensor, orig_size: torch.Tensor, *, size: int,
                    eval_size: int | None = None, threshold: float = 0.5) -> list[torch.Tensor]:
    """Binary masks at the scoring resolution from mask logits (B, 1, 4H, 4W), as SAM's `postprocess_masks`.

    input_size (B, 2) is each (h2, w2) inside the padding of side `size` = S, orig_size (B, 2) each
    (Ho, Wo); foreground where sigmoid(logit) > threshold. Returns B bool masks (Ho, Wo), or (R, R) with
    eval_size R.
    """
    up = F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]  # (B, S, S)
    masks = []
    for b in range(up.shape[0]):
        h2, w2 = (int(v) for v in input_size[b])
        ho, wo = (int(v) for v in orig_size[b])
        x = data.invert_transform(up[b], (h2, w2), (ho, wo))  # (Ho, Wo): padding cropped, resized back
        if eval_size is not None:
            # NOTE(paper): LAVT/MagNet score on a square resize of prediction and GT (R = 480).
            x = F.interpolate(x[None, None], size=(eval_size, eval_size), mode="bilinear",
                              align_corners=False)[0, 0]  # (R, R)
        masks.append(torch.sigmoid(x) > threshold)
    return masks


def gt_at_eval_size(gt: torch.Tensor, eval_size: int | None) -> torch.Tensor:
    """The ground truth at the scoring resolution: unchanged, or nearest-resized to (R, R)."""
    if eval_size is None:
        return gt.bool()
    return F.interpolate(gt.float()[None, None], size=(eval_size, eval_size), mode="nearest")[0, 0] > 0.5


# --- Overlay pictures ---

def _font(px: int):
    try:
        return ImageFont.load_default(size=px)  # Pillow >= 10.1 ships a scalable default font
    except TypeError:
        return ImageFont.load_default()


def _outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a bool mask: the mask minus its 3 × 3 erosion."""
    padded = np.pad(mask, 1, constant_values=False)
    eroded = np.ones_like(mask)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            eroded &= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return mask & ~eroded


MIN_OVERLAY_WIDTH = 384  # px; smaller pictures (the shapes demo's ~128 px) are enlarged


def draw_overlay(image: Image.Image, pred: np.ndarray, caption: str, *, gt: np.ndarray | None = None,
                 iou: float | None = None, color: tuple[int, int, int] = (255, 0, 255)) -> Image.Image:
    """The image with the predicted mask tinted, the GT outlined in green, and a caption band.

    Args:
        image: original PIL image (Wo × Ho).  pred: bool (Ho, Wo).  caption: the expression.
        gt: optional bool (Ho, Wo) ground truth.  iou: optional score written after the caption.

    Returns:
        RGB PIL image, (Ho + caption band) × Wo; pictures narrower than `MIN_OVERLAY_WIDTH` are
        enlarged by a whole factor (nearest neighbour, so mask edges stay sharp) to keep the
        caption readable.
    """
    rgb = np.asarray(image.convert("RGB")).astype(np.float32)  # (Ho, Wo, 3)
    if pred.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {pred.shape} does not match image size {rgb.shape[:2]}")
    tint = np.asarray(color, dtype=np.float32)
    rgb[pred] = 0.45 * rgb[pred] + 0.55 * tint
    if gt is not None:
        rgb[_outline(gt.astype(bool))] = (40, 255, 40)
    picture = Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8))
    scale = -(-MIN_OVERLAY_WIDTH // picture.width)  # ceil; 1 for pictures already wide enough
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    width = picture.width
    px = max(12, width // 40)
    font = _font(px)
    text = f'"{caption}"' + (f"   IoU {iou:.3f}" if iou is not None else "")
    lines = textwrap.wrap(text, width=max(10, int(width / (0.6 * px)))) or [""]
    band = Image.new("RGB", (width, (px + 6) * len(lines) + 8), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for k, line in enumerate(lines):
        draw.text((6, 4 + k * (px + 6)), line, fill=(255, 255, 255), font=font)
    out = Image.new("RGB", (width, picture.height + band.height))
    out.paste(picture, (0, 0))
    out.paste(band, (0, picture.height))
    return out


# --- Evaluating a model on a dataset split ---

def eval_batches(image_ids, batch_size: int, *, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This rank's evaluation batches (item indices): every item once, whole images packed together.

    Items are grouped by image (first-seen order) and images packed greedily into batches of at most
    `batch_size` items: an image that does not fit the current batch starts the next one, so an image
    of n <= batch_size sentences is encoded once; a larger one fills ceil(n / batch_size) batches, the
    fewest possible. Rank r of `world` takes batches r, r + world, ... (no pair scored twice).

    Raises:
        ValueError: batch_size < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[int, list[int]] = {}  # image id -> its items, first-seen image order
    for index, image_id in enumerate(image_ids):
        groups.setdefault(int(image_id), []).append(index)
    batches, current = [], []
    for items in groups.values():
        if len(current) + len(items) > batch_size and current:
            batches.append(current)  # the image does not fit: close the batch, start the next one
            current = []
        while len(items) > batch_size:  # more sentences than a batch holds: full batches of this image
            batches.append(items[:batch_size])
            items = items[batch_size:]
        current += items
    if current:
        batches.append(current)
    return batches[rank::world]


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, dataset, *, batch_size: int = 8, device: str | torch.device = "cpu",
                   eval_size: int | None = None, threshold: float = 0.5, precision: str = "auto",
                   workers: int = 0, vis: int = 0, vis_dir: str | os.PathLike | None = None,
                   progress: bool = True, desc: str = "eval", cache: data.FeatureCache | None = None) -> dict:
    """Score every item (every sentence of every ref) of a dataset -> `RISMetrics.compute()`.

    Whole images are packed into batches (`eval_batches`), each distinct image of a batch encoded once
    (`data.collate_images`). The ground truth comes from `dataset.original_mask(index)`, never from the
    batch, so the dataset can be built with load_masks=False. Under a process group each rank scores
    its share and the sums are all-reduced: every rank returns the metrics of the whole split.

    Args:
        model: MARIS (not DDP-wrapped); its train/eval mode is restored afterwards.
        dataset: has `image_ids`, `original_mask(index)` and `load_image(image_id)`.
        eval_size: None = original resolution, R = R × R square (LAVT/MagNet).
        threshold: sigmoid threshold.  precision: auto | bf16 | fp32.
        vis: overlay PNGs of the first `vis` items (rank 0 only) into `vis_dir`.
        cache: optional `data.open_feature_cache(model, dataset, ...)` giving the frozen encoder's
            outputs (the dataset may then be built with load_images=False).
    """
    device = torch.device(device)
    precision = maris.effective_precision(device, precision)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    batches = eval_batches(dataset.image_ids, batch_size, rank=rank, world=world)
    # A fixed generator: creating the loader must not draw from the global RNG (exact resume in train.py).
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         collate_fn=data.collate_images, generator=torch.Generator().manual_seed(0))
    size = model.cfg.image_size  # S
    metrics = RISMetrics()
    was_training = model.training
    model.eval()
    vis_left = vis if rank == 0 else 0
    if vis_left:
        vis_dir = pathlib.Path(vis_dir or "vis")
        vis_dir.mkdir(parents=True, exist_ok=True)
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
            inputs, _ = data.batch_image_inputs(batch, device=device, model=model, cache=cache, dataset=dataset,
                                                batch_size=batch_size, precision=precision)
            extra = {} if cache is None else {"image_features": inputs["image_features"]}
            with maris.autocast(device, precision):
                logits = model(inputs["images"], batch["ids"].to(device), batch["word_mask"].to(device),
                               image_index=inputs["image_index"], **extra)  # (B, 1, 4H, 4W)
            preds = logits_to_masks(logits, batch["input_size"], batch["orig_size"], size=size,
                                    eval_size=eval_size, threshold=threshold)
            for b, pred in enumerate(preds):
                index = int(batch["index"][b])
                gt_orig = torch.from_numpy(np.asarray(dataset.original_mask(index), dtype=bool))  # (Ho, Wo)
                gt = gt_at_eval_size(gt_orig, eval_size).to(pred.device)
                inter, union = intersection_union(pred, gt)
                iou = float(metrics.update(inter, union)[0])
                if vis_left > 0:
                    vis_left -= 1
                    # Overlays are always drawn at the original resolution.
                    full = pred if eval_size is None else logits_to_masks(
                        logits[b:b + 1], batch["input_size"][b:b + 1], batch["orig_size"][b:b + 1],
                        size=size, threshold=threshold)[0]
                    picture = draw_overlay(dataset.load_image(int(batch["image_id"][b])), full.cpu().numpy(),
                                           batch["sentence"][b], gt=gt_orig.numpy(), iou=iou)
                    picture.save(pathlib.Path(vis_dir) / f"{index:06d}_sent{int(batch['sent_id'][b])}.png")
    finally:
        model.train(was_training)
    metrics.all_reduce()
    return metrics.compute()


# --- Reporting ---

def protocol(*, eval_size: int | None, threshold: float, image_size: int) -> dict:
    """The scoring protocol, stated next to every table and in the JSON."""
    if eval_size is None:
        scoring = "original image resolution (logits upsampled to S, padding cropped, bilinear resize to (Ho, Wo))"
    else:
        scoring = (f"{eval_size}x{eval_size} square (logits upsampled to S, padding cropped, bilinear resize "
                   f"to {eval_size}x{eval_size}; GT nearest-resized; LAVT/MagNet protocol)")
    return {"pairs": "every sentence of every ref", "scoring": scoring, "eval_size": eval_size,
            "threshold": f"sigmoid > {threshold}", "input_size_S": image_size,
            "oIoU": "sum of I / sum of U over all pairs (a.k.a. cIoU)", "mIoU": "mean per-pair IoU",
            "Prec@X": "share of pairs with IoU >= X",
            "empty_gt": "empty GT + empty prediction = IoU 1, adds nothing to the sums"}


def without_nan(value):
    """`value` with every float NaN (a metric of a split with no pairs) replaced by None, recursively.

    JSON has no NaN (json.dumps would write the invalid token NaN), so the reports write null.
    """
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN is the only float unequal to itself
        return None
    return value


def format_table(results: dict[str, dict]) -> str:
    """A text table: one row per split, metrics in percent ("-" where undefined), then the pair count."""
    cols = ["oIoU", "mIoU", *[f"Prec@{t:g}" for t in PREC_THRESHOLDS]]
    width = max([5, *map(len, results)])

    def cell(value) -> str:
        return f"{'-':>8}" if value is None or value != value else f"{100 * value:8.2f}"  # None / NaN: no pairs

    lines = [f"{'split':<{width}}  " + "  ".join(f"{c:>8}" for c in cols) + f"  {'count':>7}"]
    for split, m in results.items():
        lines.append(f"{split:<{width}}  " + "  ".join(cell(m[c]) for c in cols) + f"  {m['count']:>7d}")
    return "\n".join(lines)


# --- Command line ---

@dataclass
class EvalOptions:
    """Every command-line option of evaluate.py (flag = field name with '-' for '_')."""

    ckpt: str = maris.option(help="checkpoint written by train.py (best.pt / last.pt)")
    dataset: str | None = maris.option(None, "shapes | refcoco | refcoco+ | refcocog", auto="the checkpoint's")
    split_by: str | None = maris.option(None, "unc | google | umd", auto="the checkpoint's")
    split: list | None = maris.option(None, "split(s) to score; repeatable or comma-separated",
                                      auto="every evaluation split of the dataset", multiple=True)
    data_root: str | None = maris.option(None, "refer-layout data root", auto="the checkpoint's")
    image_dir: str | None = maris.option(None, "COCO train2014 folder", auto="the checkpoint's")
    sam_checkpoint: str | None = maris.option(None, "SAM weights", auto="the path stored in the checkpoint")
    clip_checkpoint: str | None = maris.option(None, "CLIP weights", auto="the path stored in the checkpoint")
    batch_size: int = maris.option(8, "sentences per forward pass")
    workers: int = maris.option(0, "DataLoader worker processes")
    device: str = maris.option("auto", "auto | cpu | cuda | cuda:N")
    precision: str = maris.option("auto", "auto = bf16 autocast on CUDA, fp32 on CPU", choices=maris.PRECISIONS)
    eval_size: int | None = maris.option(None, "score on an R x R square resize (480 = LAVT/MagNet)",
                                         auto="the original resolution")
    threshold: float = maris.option(0.5, "foreground where sigmoid(logit) > threshold")
    vis: int = maris.option(0, "write overlay PNGs of the first N pairs of each split")
    out_dir: str | None = maris.option(None, "where the JSON and overlays go", auto="the checkpoint's folder")
    progress: bool = maris.option(True, "show progress bars")
    feature_cache: str | None = maris.option(
        None, "read SAM's frozen encoder outputs from this cache folder (written on first use; shared with "
              "train.py --feature-cache; not with adapters)", auto="off", metavar="DIR")
    image: str | None = maris.option(None, "single-image mode: an image file", auto="split scoring")
    text: str | None = maris.option(None, "single-image mode: the referring expression", auto="none")
    out: str | None = maris.option(None, "single-image mode: overlay PNG path", auto="<image>_overlay.png")
    mask_out: str | None = maris.option(None, "single-image mode: mask PNG path", auto="<out>_mask.png")


DESCRIPTION = "Score a MARIS checkpoint (oIoU, mIoU, Prec@X) or segment one image."


def parse_splits(values: list[str] | None, dataset: str, split_by: str | None) -> list[str]:
    """`--split a,b --split c` → [a, b, c]; none given → the dataset's evaluation splits."""
    if values:
        return [s.strip() for v in values for s in v.split(",") if s.strip()]
    key = (dataset, None if dataset == "shapes" else split_by)
    if key not in EVAL_SPLITS:
        raise SystemExit(f"error: no default splits for dataset {dataset!r} split_by {split_by!r}; pass --split")
    return list(EVAL_SPLITS[key])


@torch.no_grad()
def predict_image(model: maris.MARIS, image: Image.Image, text: str, *, device: torch.device,
                  context_length: int, precision: str = "auto", threshold: float = 0.5) -> np.ndarray:
    """Segment one expression in one image.

    Returns:
        bool (Ho, Wo) mask at the image's own resolution.
    """
    size = model.cfg.image_size
    pixels, (h2, w2) = data.transform_image(image, size)  # (3, S, S)
    ids, word_mask = data.tokenize([text], context_length)  # (1, L), (1, L)
    with maris.autocast(device, precision):
        logits = model(pixels[None].to(device), ids.to(device), word_mask.to(device))  # (1, 1, 4H, 4W)
    mask = logits_to_masks(logits, torch.tensor([[h2, w2]]), torch.tensor([[image.height, image.width]]),
                           size=size, threshold=threshold)[0]
    return mask.cpu().numpy()


def main(argv: list[str] | None = None) -> dict:
    """Run evaluate.py; returns {split: metrics} (or {"mask": path, "overlay": path} in single-image mode).

    Metrics of a split with no pairs are None (null in the JSON, "-" in the table).
    """
    opts, _ = maris.parse_options(EvalOptions, argv, DESCRIPTION)
    try:
        ckpt = maris.read_checkpoint(opts.ckpt)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    # Under torchrun every rank scores its share of each split; rank 0 prints and writes.
    rank, world, device = maris.setup_distributed(opts.device)
    try:
        try:
            model = maris.model_from_checkpoint(ckpt, sam_checkpoint=opts.sam_checkpoint,
                                                clip_checkpoint=opts.clip_checkpoint).to(device)
        except FileNotFoundError as e:
            raise SystemExit(f"error: {e}") from None
        if opts.image is not None or opts.text is not None:
            if world > 1:
                raise SystemExit("error: single-image mode runs in one process; run it without torchrun")
            return segment_one_image(opts, model, device=device)
        return score_splits(opts, ckpt, model, rank=rank, device=device)
    finally:  # every rank leaves the process group, also after an error (as train.main does)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def segment_one_image(opts: EvalOptions, model: maris.MARIS, *, device: torch.device) -> dict:
    """Single-image mode: write the overlay picture and the mask PNG of `opts.text` in `opts.image`."""
    if opts.image is None or opts.text is None:
        raise SystemExit("error: single-image mode needs both --image and --text")
    if not pathlib.Path(opts.image).is_file():
        raise SystemExit(f"error: image {opts.image} does not exist")
    image = Image.open(opts.image).convert("RGB")
    mask = predict_image(model, image, opts.text, device=device, context_length=model.cfg.context_length,
                         precision=opts.precision, threshold=opts.threshold)
    image_path = pathlib.Path(opts.image)
    out = pathlib.Path(opts.out or image_path.with_name(image_path.stem + "_overlay.png"))
    mask_out = pathlib.Path(opts.mask_out or out.with_name(out.stem + "_mask.png"))
    out.parent.mkdir(parents=True, exist_ok=True)
    mask_out.parent.mkdir(parents=True, exist_ok=True)
    draw_overlay(image, mask, opts.text).save(out)
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(mask_out)
    print(f"overlay: {out}\nmask:    {mask_out}  ({int(mask.sum())} foreground pixels of {mask.size})")
    return {"overlay": str(out), "mask": str(mask_out)}


def score_splits(opts: EvalOptions, ckpt: dict, model: maris.MARIS, *, rank: int, device: torch.device) -> dict:
    """Score every requested split; rank 0 prints the table and writes the JSON report."""
    stored, cfg = ckpt["options"], model.cfg
    dataset_name = opts.dataset or stored.get("dataset", "shapes")
    if opts.dataset and opts.dataset != stored.get("dataset"):
        split_by = opts.split_by or DEFAULT_SPLIT_BY.get(dataset_name)
    else:
        split_by = opts.split_by or stored.get("split_by") or DEFAULT_SPLIT_BY.get(dataset_name)
    splits = parse_splits(opts.split, dataset_name, split_by)
    proto = protocol(eval_size=opts.eval_size, threshold=opts.threshold, image_size=cfg.image_size)
    out_dir = pathlib.Path(opts.out_dir) if opts.out_dir else pathlib.Path(opts.ckpt).resolve().parent
    results: dict[str, dict] = {}
    start = time.time()
    # The encoder weights' hash (a full read of them) is taken once, not once per split's cache.
    encoder_sha256 = (data.state_dict_sha256(model.image_encoder)
                      if opts.feature_cache is not None and not cfg.adapters else None)
    for split in splits:
        try:
            # With a feature cache the pixels are only read to fill missing cache entries.
            ds = data.build_dataset(dataset_name, split, root=opts.data_root or stored.get("data_root"),
                                    split_by=split_by, image_size=cfg.image_size, context_length=cfg.context_length,
                                    image_dir=opts.image_dir or stored.get("image_dir"),
                                    load_images=opts.feature_cache is None,
                                    load_masks=False)  # scored against original_mask(index)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise SystemExit(f"error: {e}") from None
        cache = None if opts.feature_cache is None else open_cache(model, ds, opts, device, encoder_sha256)
        results[split] = evaluate_model(
            model, ds, batch_size=opts.batch_size, device=device, eval_size=opts.eval_size,
            threshold=opts.threshold, precision=opts.precision, workers=opts.workers,
            vis=opts.vis, vis_dir=out_dir / "vis" / split, progress=opts.progress and rank == 0, desc=split,
            cache=cache)
    results = without_nan(results)  # a split with no pairs has no score: None, not NaN
    if rank == 0:  # every rank holds the all-reduced results; one writes them
        write_report(opts, ckpt, results, proto, dataset_name, split_by, out_dir, time.time() - start)
    return results


def open_cache(model: maris.MARIS, dataset, opts: EvalOptions, device: torch.device,
               encoder_sha256: str | None) -> data.FeatureCache:
    """`data.open_feature_cache` for `--feature-cache`, its refusals turned into command-line errors."""
    try:
        return data.open_feature_cache(model, dataset, opts.feature_cache, encoder_sha256=encoder_sha256,
                                       precision=maris.effective_precision(device, opts.precision))
    except ValueError as e:
        hint = "" if model.cfg.adapters else " (train.py: --rebuild-feature-cache)"
        raise SystemExit(f"error: {e}{hint}") from None


def write_report(opts: EvalOptions, ckpt: dict, results: dict, proto: dict, dataset_name: str,
                 split_by: str | None, out_dir: pathlib.Path, seconds: float) -> None:
    """Print the table and the protocol; write them to <out_dir>/eval_<dataset>[_<split_by>][_sq<R>].json."""
    title = f"{dataset_name}" + (f" ({split_by})" if split_by and dataset_name != "shapes" else "")
    print(f"{title}  checkpoint {opts.ckpt}  step {ckpt.get('step', '?')}")
    print(format_table(results))
    print("protocol: " + "; ".join(f"{k}: {v}" for k, v in proto.items() if v is not None))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"eval_{dataset_name}" + (f"_{split_by}" if split_by and dataset_name != "shapes" else "")
    name += "" if opts.eval_size is None else f"_sq{opts.eval_size}"
    report = {"checkpoint": str(opts.ckpt), "step": ckpt.get("step"), "dataset": dataset_name, "split_by": split_by,
              "protocol": proto, "results": results, "seconds": round(seconds, 2)}
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False))
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
