"""Scoring referring image segmentation (DESIGN.md §6) and the `evaluate.py` command line.

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

import argparse
import contextlib
import hashlib
import json
import os
import pathlib
import textwrap
import time

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

# The splits a checkpoint is scored on when `--split` is not given (DESIGN.md §5): every split of the
# partition but "train", derived from data.py's tables so that a new partition needs no edit here.
EVAL_SPLITS = {
    ("shapes", None): tuple(s for s in data.SHAPES_SPLITS if s != "train"),
    **{key: tuple(s for s in splits if s != "train") for key, splits in data.SPLITS.items()},
}
# split_by used when neither the flag nor the checkpoint names one: data.py's default, the first
# partition listed for the dataset (shapes has none).
DEFAULT_SPLIT_BY = {"shapes": None, **{name: partitions[0] for name, partitions in data.DATASETS.items()}}


# --- Metrics: per-pair I and U, oIoU, mIoU, Prec@X (DESIGN.md §6) ---

def intersection_union(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel counts of intersection and union for each (prediction, ground truth) pair.

    Args:
        pred: bool (B, Ho, Wo) or (Ho, Wo) predicted masks.
        gt: bool, same shape, ground-truth masks.

    Returns:
        (I, U): long tensors (B,) of |pred ∩ gt| and |pred ∪ gt|.

    Raises:
        ValueError: when the shapes differ.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != ground-truth shape {tuple(gt.shape)}")
    if pred.dim() == 2:
        pred, gt = pred[None], gt[None]
    pred = pred.bool().flatten(1)  # (B, Ho*Wo)
    gt = gt.bool().flatten(1)  # (B, Ho*Wo)
    return (pred & gt).sum(1), (pred | gt).sum(1)


def pair_iou(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """Per-pair IoU in float64; an empty union (empty GT, empty prediction) scores 1.

    Args:
        inter: (B,) intersections.  union: (B,) unions.

    Returns:
        (B,) float64 IoU in [0, 1].
    """
    inter = inter.double()
    union = union.double()
    # NOTE(paper): empty GT + empty prediction = IoU 1 (ReLA's gRefCOCO rule, DESIGN.md §6).
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
        """Add a batch of pairs.

        Args:
            inter: (B,) intersections from `intersection_union`.  union: (B,) unions.

        Returns:
            (B,) float64 per-pair IoU (handy for overlays and logs).
        """
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


# --- Shared helpers (device, precision, model rebuilding); train.py imports them ---

def resolve_device(device: str = "auto") -> torch.device:
    """'auto' → CUDA when available, else CPU; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def setup_distributed(device_name: str = "auto") -> tuple[int, int, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA).

    Args:
        device_name: auto | cpu | cuda | cuda:N (see `resolve_device`); under torchrun on CUDA
            each process takes the GPU of its LOCAL_RANK.

    Returns:
        (rank, world size, this process's device).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return 0, 1, device
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# Precision names accepted by train.py and evaluate.py (the one table; `check_precision` the one check).
PRECISIONS = ("auto", "bf16", "fp32")


def check_precision(precision: str) -> str:
    """Return `precision` when it is one of PRECISIONS.

    Raises:
        ValueError: an unknown precision name (the message lists the valid ones).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def effective_precision(device: torch.device, precision: str) -> str:
    """The precision that really runs: "bf16" or "fp32" ("auto" = bf16 on CUDA, fp32 elsewhere).

    Raises:
        ValueError: an unknown precision name.
    """
    # NOTE(paper): bf16 autocast on GPU is DESIGN.md §7's default; CPU autocast is slow, so fp32 there.
    if check_precision(precision) == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str = "auto"):
    """Autocast context for a precision name (see `effective_precision`).

    Raises:
        ValueError: an unknown precision name.
    """
    if effective_precision(device, precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def build_model(config: dict, *, sam_checkpoint: str | None = None, clip_checkpoint: str | None = None) -> maris.MARIS:
    """Build MARIS from a config dict (`maris.build_maris` seeds the build with `init_seed`).

    Without SAM/CLIP weights the frozen encoders are random; the seeded build makes them the same
    random encoders in `train.py` and here, so a checkpoint (trainable weights only) still fits.

    Args:
        config: `maris.config_to_dict` output.
        sam_checkpoint / clip_checkpoint: encoder weight files or None.

    Returns:
        The model on CPU.
    """
    return maris.build_maris(maris.config_from_dict(config), sam_checkpoint=sam_checkpoint,
                             clip_checkpoint=clip_checkpoint)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a train.py checkpoint (plain tensors and Python values only: weights_only loading).

    Raises:
        SystemExit: the file is missing or is not a train.py checkpoint.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise SystemExit(f"error: checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in ("config", "options", "model") if k not in ckpt]
    if missing:
        raise SystemExit(f"error: {path} is not a train.py checkpoint (missing keys {missing})")
    return ckpt


def model_from_checkpoint(ckpt: dict, *, sam_checkpoint: str | None = None,
                          clip_checkpoint: str | None = None) -> maris.MARIS:
    """Rebuild the trained model from a checkpoint alone (plus the encoder weights it names).

    Args:
        ckpt: `read_checkpoint` output.
        sam_checkpoint / clip_checkpoint: override the encoder weight paths stored in the checkpoint.

    Returns:
        The model on CPU in eval mode.

    Raises:
        SystemExit: an encoder weight file named by the checkpoint is not on this machine.
    """
    opts = ckpt["options"]
    sam = sam_checkpoint or opts.get("sam_checkpoint")
    clip = clip_checkpoint or opts.get("clip_checkpoint")
    for flag, path in (("--sam-checkpoint", sam), ("--clip-checkpoint", clip)):
        if path and not pathlib.Path(path).is_file():
            raise SystemExit(f"error: the model was trained with encoder weights {path}, which is not here; "
                             f"pass {flag} with the same file")
    model = build_model(ckpt["config"], sam_checkpoint=sam, clip_checkpoint=clip)
    model.load_trainable_state_dict(ckpt["model"])
    return model.eval()


# --- Image inputs of a batch: distinct images, or frozen-encoder features from a cache (§7) ---
# Batches come from data.collate_images: `images` holds each distinct image of the batch once and
# `image_index` maps every sentence to its row, so SAM's encoder runs once per distinct image.
# With a data.FeatureCache the encoder runs once per image for the whole run instead; the
# helpers below build the cache's fingerprint, open it, and fill it. train.py imports them.

# Encoder settings the cached features depend on (plus the encoder weights' hash and the images).
ENCODER_FIELDS = ("sam_embed_dim", "sam_depth", "sam_num_heads", "sam_global_attn_indexes", "sam_window_size",
                  "patch_size", "image_size", "fe_taps", "embed_dim")


def image_source(dataset) -> str:
    """Name of the pictures behind a dataset's image ids (one cache folder per source).

    The RefCOCO family shares COCO train2014 (image id = COCO id), so refcoco, refcoco+ and
    refcocog share one cache; a shapes split is its own seeded stream of scenes (ids restart at 0).
    """
    base = dataset
    if not isinstance(base, (data.ShapesDataset, data.RefDataset)):
        base = getattr(dataset, "dataset", dataset)  # train.py's _Head wraps a dataset
    if isinstance(base, data.ShapesDataset):
        return f"shapes-{base.split}-seed{base.seed}"
    if isinstance(base, data.RefDataset):
        return "mscoco-train2014"
    raise ValueError(f"no image source known for {type(base).__name__}: the feature cache needs a data.py dataset")


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict: each key, dtype, shape and tensor bytes, keys sorted.

    Identifies the weights themselves, so a randomly initialised encoder (another --seed) and a
    loaded checkpoint hash differently. It reads every weight (about 2.5 GB for ViT-H): callers
    hash a model once per process and pass the result on (`encoder_sha256=` below).
    """
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes (works for bf16 too)
    return digest.hexdigest()


def encoder_fingerprint(model: maris.MARIS, source: str, *, precision: str = "fp32",
                        encoder_sha256: str | None = None) -> dict:
    """Everything the frozen encoder's outputs depend on, for data.FeatureCache's meta.json.

    Args:
        model: MARIS (its config and image encoder weights).
        source: `image_source(dataset)`.
        precision: the autocast the features are computed under ("fp32" or "bf16").
        encoder_sha256: `state_dict_sha256(model.image_encoder)` when the caller has it already
            (None: hash the weights now).

    Returns:
        JSON-able dict: the ENCODER_FIELDS of the config, the encoder weights' sha256, source, precision.
    """
    cfg = maris.config_to_dict(model.cfg)
    if encoder_sha256 is None:
        encoder_sha256 = state_dict_sha256(model.image_encoder)
    return {**{k: cfg[k] for k in ENCODER_FIELDS}, "encoder_sha256": encoder_sha256,
            "images": source, "precision": precision}


def open_feature_cache(model: maris.MARIS, dataset, root: str | os.PathLike, *, device: torch.device,
                       precision: str = "auto", rebuild: bool = False,
                       encoder_sha256: str | None = None) -> data.FeatureCache:
    """The feature cache of `dataset`'s pictures under `root/<image source>/`.

    Args:
        model: MARIS (not DDP-wrapped).  dataset: a data.py dataset (or train.py's _Head of one).
        root: the cache folder.  device, precision: where and how missing entries are encoded.
        rebuild: empty a cache built for another encoder instead of refusing it.
        encoder_sha256: the encoder weights' hash computed once by the caller (`state_dict_sha256`);
            None hashes them here, which costs a full read of the weights per call.

    Raises:
        SystemExit: the model has RISAM adapters (its encoder features change as they train), or the
            folder holds a cache built for another encoder, input size or image source (and not rebuild).
    """
    if model.cfg.adapters:
        raise SystemExit("error: --feature-cache cannot be used with --adapters: RISAM's adapters train inside "
                         "SAM's image encoder, so its features change every step and cannot be cached")
    cfg = model.cfg
    H = W = cfg.image_size // cfg.patch_size
    source = image_source(dataset)
    fingerprint = encoder_fingerprint(model, source, precision=effective_precision(device, precision),
                                      encoder_sha256=encoder_sha256)
    try:
        return data.FeatureCache(pathlib.Path(root) / source, fingerprint, neck_shape=(cfg.embed_dim, H, W),
                                 tap_shape=(H, W, cfg.sam_embed_dim), num_taps=len(cfg.fe_taps), rebuild=rebuild)
    except ValueError as e:
        raise SystemExit(f"error: {e} (train.py: --rebuild-feature-cache)") from None


@torch.no_grad()
def encode_images(model: maris.MARIS, dataset, image_ids, *, device: torch.device, batch_size: int,
                  precision: str = "auto") -> dict:
    """Run the frozen image encoder on pictures loaded by id (the feature cache's `encode`).

    Args:
        model: MARIS.  dataset: has `load_image(image_id)`.  image_ids: the ids, in output order.
        device: where the encoder runs.  batch_size: images per encoder pass.  precision: autocast.

    Returns:
        dict(neck=(B_img, C, H, W), taps=[(B_img, H, W, D)] * 3) on the CPU in fp16 (the cache's dtype).
    """
    size = model.cfg.image_size
    necks, taps = [], []
    ids = [int(i) for i in image_ids]
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        pixels = torch.stack([data.transform_image(dataset.load_image(i), size)[0] for i in chunk])  # (b, 3, S, S)
        with autocast(device, precision):
            out = model.encode_image(pixels.to(device))
        necks.append(out["neck"].to("cpu", torch.float16))  # (b, C, H, W)
        taps.append([t.to("cpu", torch.float16) for t in out["taps"]])  # 3 x (b, H, W, D)
    return {"neck": torch.cat(necks), "taps": [torch.cat(level) for level in zip(*taps)]}


def batch_image_inputs(batch: dict, *, device: torch.device, model: maris.MARIS | None = None,
                       cache: data.FeatureCache | None = None, dataset=None, batch_size: int = 8,
                       precision: str = "auto", counter: dict | None = None) -> dict:
    """The image keyword arguments of MARIS.forward for a `data.collate_images` batch.

    Without a cache: images = the batch's distinct images (B_img, 3, S, S) on the device. With one:
    image_features = the cached encoder outputs of `batch["image_ids"]`, encoding (and storing)
    the missing ones first with `encode_images`.

    Args:
        batch: collate_images output.  device: the model's device.
        model, cache, dataset: needed with a cache (the encoder and `load_image`).
        batch_size, precision: of the encoder passes for missing entries.
        counter: optional dict; counter["encoded"] grows by the images the encoder ran on.

    Returns:
        dict(images=..., image_features=..., image_index=(B,) long on the device), one of images /
        image_features None.
    """
    index = batch["image_index"].to(device)  # (B,)
    if cache is None:
        images = batch["images"].to(device, non_blocking=True)  # (B_img, 3, S, S)
        if counter is not None:
            counter["encoded"] = counter.get("encoded", 0) + images.shape[0]
        return dict(images=images, image_features=None, image_index=index)

    def encode(missing: list[int]) -> dict:
        if counter is not None:
            counter["encoded"] = counter.get("encoded", 0) + len(missing)
        return encode_images(model, dataset, missing, device=device, batch_size=batch_size, precision=precision)

    features = cache.get(batch["image_ids"].tolist(), encode)  # neck (B_img, C, H, W), taps (B_img, H, W, D)
    return dict(images=None, image_features=features, image_index=index)


# --- From mask logits to a scored binary mask ---

def logits_to_masks(logits: torch.Tensor, input_size: torch.Tensor, orig_size: torch.Tensor, *, size: int,
                    eval_size: int | None = None, threshold: float = 0.5) -> list[torch.Tensor]:
    """Binary masks at the scoring resolution from the model's mask logits.

    Args:
        logits: (B, 1, 4H, 4W) mask logits.
        input_size: (B, 2) long (h2, w2) resized image inside the padding.
        orig_size: (B, 2) long original (Ho, Wo).
        size: the padded input side S.
        eval_size: None → original resolution; R → an R × R square resize.
        threshold: foreground where sigmoid(logit) > threshold.

    Returns:
        B bool masks, each (Ho, Wo) (or (R, R)).
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
    """Evaluation batches: every item once, whole images packed together (DESIGN.md §7).

    The items are grouped by image (first-seen image order, item order inside an image). Images
    are packed greedily into batches of at most `batch_size` items: an image that does not fit
    in the rest of the current batch starts the next one, so an image with n ≤ batch_size
    sentences sits in exactly one batch and is encoded once. An image with n > batch_size
    sentences is cut into full batches of `batch_size` and its last n mod batch_size sentences
    start the next batch (ceil(n / batch_size) encoder passes, the fewest possible). Batches
    therefore vary in size. Rank r of `world` takes batches r, r + world, ... (no padding, so no
    pair is scored twice).

    Args:
        image_ids: image id of every item (`dataset.image_ids`).
        batch_size: the most sentences in a batch.  rank, world: this process and the process count.

    Returns:
        This rank's batches of item indices.

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
                   progress: bool = True, desc: str = "eval", cache: data.FeatureCache | None = None,
                   limit: int = 0) -> dict:
    """Score every item (every sentence of every ref) of a dataset, or its first `limit` items.

    Whole images are packed into batches (`eval_batches`) and each distinct image of a batch is
    encoded once (`data.collate_images`), so an image is encoded once per split unless it has more
    sentences than `batch_size`. The ground truth is read with `dataset.original_mask(index)`,
    never from the batch, so the dataset can be built with load_masks=False (nothing decodes a
    mask twice). Under an initialised process group each rank scores its
    share of the batches and the sums are all-reduced, so every rank returns the metrics of the
    whole split.

    Args:
        model: MARIS (not DDP-wrapped); its train/eval mode is restored afterwards.
        dataset: a data.py dataset with `image_ids`, `original_mask(index)` and `load_image(image_id)`
            (its items' "mask" is never read: build it with load_masks=False).
        batch_size: the most sentences per forward pass.  device: where the model runs.
        eval_size: None = original resolution, R = R × R square (LAVT/MagNet).
        threshold: sigmoid threshold.  precision: auto | bf16 | fp32.
        workers: DataLoader worker processes.
        vis: overlay PNGs written for the first `vis` items (rank 0 only) into `vis_dir`.
        progress: show a tqdm bar.  desc: the bar's label.
        cache: optional `open_feature_cache(model, dataset, ...)`: the frozen encoder's outputs come
            from it (the dataset may then be built with load_images=False).
        limit: score items 0 .. limit - 1 only (0 = every item).

    Returns:
        `RISMetrics.compute()` dict.
    """
    device = torch.device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    image_ids = list(dataset.image_ids)[:limit] if limit > 0 else dataset.image_ids
    batches = eval_batches(image_ids, batch_size, rank=rank, world=world)
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
            inputs = batch_image_inputs(batch, device=device, model=model, cache=cache, dataset=dataset,
                                        batch_size=batch_size, precision=precision)
            extra = {} if cache is None else {"image_features": inputs["image_features"]}
            with autocast(device, precision):
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

class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show each option's default, unless its help text already says what the default is."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """evaluate.py's options."""
    p = argparse.ArgumentParser(description="Score a MARIS checkpoint (oIoU, mIoU, Prec@X) or segment one image.",
                                formatter_class=_DefaultsFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (best.pt / last.pt)")
    p.add_argument("--dataset", default=None, help="shapes | refcoco | refcoco+ | refcocog (default: the checkpoint's)")
    p.add_argument("--split-by", default=None, help="unc | google | umd (default: the checkpoint's)")
    p.add_argument("--split", action="append", default=None,
                   help="split(s) to score; repeatable or comma-separated (default: every eval split of the dataset)")
    p.add_argument("--data-root", default=None, help="refer-layout data root (default: the checkpoint's)")
    p.add_argument("--image-dir", default=None, help="COCO train2014 folder (default: the checkpoint's)")
    p.add_argument("--sam-checkpoint", default=None, help="SAM weights (default: the path stored in the checkpoint)")
    p.add_argument("--clip-checkpoint", default=None, help="CLIP weights (default: the path stored in the checkpoint)")
    p.add_argument("--batch-size", type=int, default=8, help="sentences per forward pass")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--eval-size", type=int, default=None,
                   help="score on an R x R square resize (480 = LAVT/MagNet) instead of the original resolution")
    p.add_argument("--threshold", type=float, default=0.5, help="foreground where sigmoid(logit) > threshold")
    p.add_argument("--vis", type=int, default=0, help="write overlay PNGs of the first N pairs of each split")
    p.add_argument("--limit", type=int, default=0,
                   help="score only the first N pairs of each split (default: 0 = every pair)")
    p.add_argument("--out-dir", default=None, help="where the JSON and overlays go (default: the checkpoint's folder)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--feature-cache", default=None, metavar="DIR",
                   help="read SAM's frozen encoder outputs from this cache (written on first use; shared with "
                        "train.py --feature-cache; not with adapters)")
    p.add_argument("--image", default=None, help="single-image mode: an image file")
    p.add_argument("--text", default=None, help="single-image mode: the referring expression")
    p.add_argument("--out", default=None, help="single-image mode: overlay PNG path (default: <image>_overlay.png)")
    p.add_argument("--mask-out", default=None, help="single-image mode: mask PNG path (default: <out>_mask.png)")
    return p


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
    with autocast(device, precision):
        logits = model(pixels[None].to(device), ids.to(device), word_mask.to(device))  # (1, 1, 4H, 4W)
    mask = logits_to_masks(logits, torch.tensor([[h2, w2]]), torch.tensor([[image.height, image.width]]),
                           size=size, threshold=threshold)[0]
    return mask.cpu().numpy()


def main(argv: list[str] | None = None) -> dict:
    """Run evaluate.py; returns {split: metrics} (or {"mask": path, "overlay": path} in single-image mode).

    Metrics of a split with no pairs are None (null in the JSON, "-" in the table).
    """
    args = build_parser().parse_args(argv)
    ckpt = read_checkpoint(args.ckpt)
    # Under torchrun every rank scores its share of each split; rank 0 prints and writes.
    rank, world, device = setup_distributed(args.device)
    try:
        return _run(args, ckpt, rank=rank, world=world, device=device)
    finally:  # every rank leaves the process group, also after an error (as train.main does)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace, ckpt: dict, *, rank: int, world: int, device: torch.device) -> dict:
    """The body of `main` once the process group is joined (single-image mode or split scoring)."""
    opts = ckpt["options"]
    model = model_from_checkpoint(ckpt, sam_checkpoint=args.sam_checkpoint,
                                  clip_checkpoint=args.clip_checkpoint).to(device)
    cfg = maris.config_from_dict(ckpt["config"])
    out_dir = pathlib.Path(args.out_dir) if args.out_dir else pathlib.Path(args.ckpt).resolve().parent

    if args.image is not None or args.text is not None:
        if world > 1:
            raise SystemExit("error: single-image mode runs in one process; run it without torchrun")
        if args.image is None or args.text is None:
            raise SystemExit("error: single-image mode needs both --image and --text")
        if not pathlib.Path(args.image).is_file():
            raise SystemExit(f"error: image {args.image} does not exist")
        image = Image.open(args.image).convert("RGB")
        mask = predict_image(model, image, args.text, device=device, context_length=cfg.context_length,
                             precision=args.precision, threshold=args.threshold)
        image_path = pathlib.Path(args.image)
        out = pathlib.Path(args.out or image_path.with_name(image_path.stem + "_overlay.png"))
        mask_out = pathlib.Path(args.mask_out or out.with_name(out.stem + "_mask.png"))
        out.parent.mkdir(parents=True, exist_ok=True)
        mask_out.parent.mkdir(parents=True, exist_ok=True)
        draw_overlay(image, mask, args.text).save(out)
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(mask_out)
        print(f"overlay: {out}\nmask:    {mask_out}  ({int(mask.sum())} foreground pixels of {mask.size})")
        return {"overlay": str(out), "mask": str(mask_out)}

    dataset_name = args.dataset or opts.get("dataset", "shapes")
    if args.dataset and args.dataset != opts.get("dataset"):
        split_by = args.split_by or DEFAULT_SPLIT_BY.get(dataset_name)
    else:
        split_by = args.split_by or opts.get("split_by") or DEFAULT_SPLIT_BY.get(dataset_name)
    data_root = args.data_root or opts.get("data_root")
    image_dir = args.image_dir or opts.get("image_dir")
    splits = parse_splits(args.split, dataset_name, split_by)
    proto = protocol(eval_size=args.eval_size, threshold=args.threshold, image_size=cfg.image_size)
    if args.limit < 0:
        raise SystemExit(f"error: --limit must be >= 0 (0 = every pair), got {args.limit}")
    if args.limit:
        proto["pairs"] = f"the first {args.limit} sentences of each split (--limit)"
    results: dict[str, dict] = {}
    start = time.time()
    # The encoder weights' hash (a full read of them) is taken once, not once per split's cache.
    encoder_sha256 = (state_dict_sha256(model.image_encoder)
                      if args.feature_cache is not None and not cfg.adapters else None)
    for split in splits:
        try:
            # With a feature cache the pixels are only read to fill missing cache entries.
            # The shapes split a run trained on has the scenes it trained on (train.py --train-scenes).
            scenes = (opts.get("train_scenes") if dataset_name == "shapes" and split == opts.get("train_split")
                      else None)
            ds = data.build_dataset(dataset_name, split, root=data_root, split_by=split_by,
                                    image_size=cfg.image_size, context_length=cfg.context_length,
                                    image_dir=image_dir, load_images=args.feature_cache is None,
                                    load_masks=False, num_images=scenes)  # scored against original_mask(index)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise SystemExit(f"error: {e}") from None
        cache = None if args.feature_cache is None else open_feature_cache(
            model, ds, args.feature_cache, device=device, precision=args.precision, encoder_sha256=encoder_sha256)
        results[split] = evaluate_model(
            model, ds, batch_size=args.batch_size, device=device, eval_size=args.eval_size,
            threshold=args.threshold, precision=args.precision, workers=args.workers,
            vis=args.vis, vis_dir=out_dir / "vis" / split, progress=not args.no_progress and rank == 0, desc=split,
            cache=cache, limit=args.limit)
    results = without_nan(results)  # a split with no pairs has no score: None, not NaN
    if rank != 0:  # every rank holds the all-reduced results; one writes them
        return results
    title = f"{dataset_name}" + (f" ({split_by})" if split_by and dataset_name != "shapes" else "")
    print(f"{title}  checkpoint {args.ckpt}  step {ckpt.get('step', '?')}")
    print(format_table(results))
    print("protocol: " + "; ".join(f"{k}: {v}" for k, v in proto.items() if v is not None))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"eval_{dataset_name}" + (f"_{split_by}" if split_by and dataset_name != "shapes" else "")
    name += "" if args.eval_size is None else f"_sq{args.eval_size}"
    report = {"checkpoint": str(args.ckpt), "step": ckpt.get("step"), "dataset": dataset_name, "split_by": split_by,
              "protocol": proto, "results": results, "seconds": round(time.time() - start, 2)}
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False))
    print(f"wrote {json_path}")
    return results


if __name__ == "__main__":
    main()
