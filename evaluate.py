"""Scoring referring image segmentation and the `evaluate.py` command line (README: "Scoring protocol").

    python evaluate.py --ckpt runs/shapes/best.pt
    python evaluate.py --ckpt best.pt --dataset refcoco --split-by unc --split val,testA,testB
    python evaluate.py --ckpt best.pt --eval-size 480          # LAVT/MagNet-style square scoring
    python evaluate.py --ckpt best.pt --image photo.jpg --text "the dog on the left" --out overlay.png
    python evaluate.py --ckpt best.pt --feature-cache cache/  # SAM's encoder runs once per image, ever
    python evaluate.py --ckpt runs/grefcoco/best.pt --nt-rule empty-mask   # gRefCOCO: gIoU, cIoU, N-acc, T-acc
    python evaluate.py --ckpt runs/refcoco/best.pt --dataset phrasecut --split test   # zero-shot PhraseCut

    model = maris.load("best.pt"); mask = evaluate.predict(model, "photo.jpg", "the dog")   # from Python

The metrics are defined once, here; `train.py` imports them. The frozen encoders are checked against the
hashes the checkpoint recorded (`maris.check_encoders`; `--allow-encoder-mismatch` to score anyway) and the JSON
report records them.

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
- Generalized RIS (`Scoring`): gRefCOCO and shapes-gres are scored with ReLA's metrics (`GRESMetrics`)
  and a no-target decision (`no_target_decision`: the empty-mask rule or the no-target head);
  PhraseCut with its official evaluator's (`PhraseCutMetrics`), at the original image size only.
  The table and the JSON hold every metric in percent and name the decision rule and the resolution.

Shape letters: B pairs in a batch, S padded input side, (h2, w2) the resized image inside the
padding, (Ho, Wo) the original image, R the square side of `--eval-size`, H = W = S/16 the feature side,
B_img distinct images in a batch, C neck width, D SAM ViT width.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import time
import unicodedata
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
    ("shapes-gres", None): tuple(s for s in data.SHAPES_SPLITS if s != "train"),
    **{key: tuple(s for s in splits if s != "train") for key, splits in data.SPLITS.items()},
}
# split_by used when neither the flag nor the checkpoint names one: data.py's default, the first
# partition listed for the dataset (shapes has none).
DEFAULT_SPLIT_BY = {"shapes": None, "shapes-gres": None,
                    **{name: partitions[0] for name, partitions in data.DATASETS.items()}}


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


class _RankSummed:
    """Metrics whose `state()` is a vector of sums: `all_reduce` adds it up over DDP ranks."""

    def all_reduce(self) -> None:
        """Sum the running totals over every DDP rank (no-op without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        # NCCL only reduces CUDA tensors; gloo reduces CPU tensors.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        state = self.state().to(device)
        dist.all_reduce(state, op=dist.ReduceOp.SUM)
        self.load_state(state)


class _IoUSums(_RankSummed):
    """ΣI, ΣU, ΣIoU, the count and the hits of each IoU threshold: the running sums that `RISMetrics` and
    `PhraseCutMetrics` keep (they differ in how a pair's IoU is defined and how a hit is counted)."""

    def __init__(self, thresholds: tuple[float, ...]):
        self.thresholds = tuple(float(t) for t in thresholds)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.total_i = 0.0
        self.total_u = 0.0
        self.iou_sum = 0.0
        self.count = 0
        self.hits = [0] * len(self.thresholds)

    def _add(self, inter: torch.Tensor, union: torch.Tensor, iou: torch.Tensor, *, strict: bool) -> None:
        """Add (B,) I, U and IoU; a hit of threshold t is IoU > t (`strict`) or IoU >= t."""
        self.total_i += float(inter.double().sum())
        self.total_u += float(union.double().sum())
        self.iou_sum += float(iou.sum())
        self.count += int(iou.numel())
        for k, t in enumerate(self.thresholds):
            self.hits[k] += int(((iou > t) if strict else (iou >= t)).sum())

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


class RISMetrics(_IoUSums):
    """Running sums for oIoU, mIoU and Prec@X over a split; sums add up across DDP ranks.

    Keeps ΣI, ΣU, ΣIoU, the pair count and the hits of each Prec@X threshold, so the result is
    the same however the pairs are batched, ordered or sharded over processes.
    """

    def __init__(self, thresholds: tuple[float, ...] = PREC_THRESHOLDS):
        super().__init__(thresholds)

    def update(self, inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
        """Add a batch of pairs' I and U (B,) (`intersection_union`); returns their IoU (B,) in float64."""
        inter = inter.detach().reshape(-1).cpu()
        union = union.detach().reshape(-1).cpu()
        iou = pair_iou(inter, union)  # (B,)
        # Empty-GT/empty-prediction pairs have I = U = 0, so they add nothing to ΣI / ΣU.
        self._add(inter, union, iou, strict=False)  # a hit is IoU ≥ X, as the RIS papers count
        return iou

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


# --- Generalized RIS metrics: gRefCOCO (ReLA) and PhraseCut (official evaluator) -----------------

GRES_PREC_THRESHOLDS = (0.7, 0.8, 0.9)  # ReLA's Pr@X on gRefCOCO
PHRASECUT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)  # PhraseCut's utils/evaluator.py mask_threshs
NO_TARGET_RULES = ("empty-mask", "head")

# Metric definitions, for the printed protocol and the JSON next to the numbers.
GRES_METRICS_PROTOCOL = {
    "gRefCOCO metrics": "ReLA refer_evaluation.py after its 2023-08-26 fix, per sentence",
    "cIoU": "sum of I / sum of U over all sentences; a no-target sentence predicted no-target adds nothing, one "
            "predicted target adds its U; a target sentence predicted no-target adds I = 0 and its U",
    "gIoU": "mean per-sentence score over all sentences: 1 for a no-target sentence predicted no-target, 0 for one "
            "predicted target (even with an empty mask), 0 for a target sentence predicted no-target, else I/U "
            "(0 when U = 0)",
    "N-acc": "share of no-target sentences predicted no-target (null without no-target sentences)",
    "T-acc": "share of target sentences predicted target (null without target sentences)",
    "Pr@X": "share of target sentences with score >= X, X in 0.7, 0.8, 0.9",
}
PHRASECUT_METRICS_PROTOCOL = {
    "PhraseCut metrics": "official ChenyunWu/PhraseCutDataset utils/evaluator.py, per task",
    "ground truth": "PIL polygon fill (outline included) of int()-truncated vertices, every polygon of every "
                    "instance, at the width x height of image_data_split.json",
    "IoU": "I / U, and 0 whenever I = 0: an empty prediction on an empty ground truth scores 0 here",
    "mIoU": "mean per-task IoU", "cumIoU": "sum of I / sum of U over all tasks",
    "Acc@X": "share of tasks with IoU strictly greater than X, X in 0.5 ... 0.9",
}


def no_target_decision(rule: str, *, masks=None, no_target_logits: torch.Tensor | None = None,
                       min_pixels: int = 1, threshold: float = 0.5) -> torch.Tensor:
    """Whether each expression is predicted to refer to nothing.

    Rules:
        "empty-mask" (LISA / EVF-SAM style): no target when the predicted mask has fewer than
            `min_pixels` foreground pixels (default 1: the mask is empty).
        "head" (ReLA style): no target when sigmoid(no-target logit) > `threshold`; the logit is
            MARIS's `forward_features(...)["no_target_logit"]` (config `no_target_weight` > 0).

    Args:
        masks: for "empty-mask", bool (B, Ho, Wo) or a list of B (Ho, Wo) masks at the scoring size.
        no_target_logits: for "head", (B,) logits.
        min_pixels: >= 1. threshold: in (0, 1).

    Returns:
        bool (B,) on the CPU, True = no target.

    Raises:
        ValueError: unknown rule, its input missing, min_pixels < 1 or threshold outside (0, 1).
    """
    if rule not in NO_TARGET_RULES:
        raise ValueError(f"unknown no-target rule {rule!r}; expected one of {NO_TARGET_RULES}")
    if rule == "empty-mask":
        if masks is None:
            raise ValueError("the empty-mask no-target rule needs the predicted masks")
        if min_pixels < 1:
            raise ValueError(f"min_pixels must be >= 1, got {min_pixels}")
        counts = [int(m.sum()) for m in masks]  # foreground pixels per mask
        return torch.tensor(counts, dtype=torch.long) < min_pixels
    if no_target_logits is None:
        raise ValueError("the head no-target rule needs no_target_logits: build the model with no_target_weight > 0")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    return torch.sigmoid(no_target_logits.detach().float().reshape(-1).cpu()) > threshold


def no_target_rule_text(rule: str, *, min_pixels: int = 1, threshold: float = 0.5) -> str:
    """The no-target decision rule in words, for the printed protocol and the JSON.

    Raises:
        ValueError: unknown rule.
    """
    if rule == "empty-mask":
        what = "empty" if min_pixels == 1 else f"below {min_pixels} pixels"
        return (f"empty-mask rule (LISA/EVF-SAM): no target when the predicted mask at the scoring size is {what} "
                f"(fewer than {min_pixels} foreground pixels)")
    if rule == "head":
        return (f"no-target head (ReLA style, an MLP on the multi-modal query token's final state): no target when "
                f"sigmoid(logit) > {threshold:g}")
    raise ValueError(f"unknown no-target rule {rule!r}; expected one of {NO_TARGET_RULES}")


class GRESMetrics(_RankSummed):
    """gRefCOCO's metrics as ReLA's `refer_evaluation.py` computes them after its 2023-08-26 fix.

    Per sentence, with gt_nt the ground-truth no-target flag, pred_nt the decision
    (`no_target_decision`) and I, U from the predicted and ground-truth masks:

        gt_nt,     pred_nt:      score 1; adds nothing to ΣI, ΣU
        gt_nt,     not pred_nt:  score 0 (even when the predicted mask is empty); adds U to ΣU
        not gt_nt, pred_nt:      score 0; I counts as 0, U (of the predicted mask) is added to ΣU
        otherwise:               score I/U (0 when U = 0); adds I and U

    cIoU = ΣI/ΣU; gIoU = mean score over all sentences; N-acc = share of no-target sentences
    predicted no-target; T-acc = share of target sentences predicted target; Pr@X = share of
    target sentences with score >= X. Undefined values are NaN (null in the JSON), never 0: every
    metric without sentences, cIoU when ΣU = 0, N-acc without no-target sentences, T-acc and Pr@X
    without target sentences. Sums add up across DDP ranks (`state`, `all_reduce`).
    """

    def __init__(self, thresholds: tuple[float, ...] = GRES_PREC_THRESHOLDS):
        self.thresholds = tuple(float(t) for t in thresholds)
        self.reset()

    def reset(self) -> None:
        """Forget every sentence seen so far."""
        self.total_i = 0.0
        self.total_u = 0.0
        self.score_sum = 0.0
        # ReLA's confusion counts: TP/FN over no-target sentences, TN/FP over target sentences
        self.tp = self.fn = self.tn = self.fp = 0
        self.hits = [0] * len(self.thresholds)  # target sentences with score >= X

    def update(self, inter: torch.Tensor, union: torch.Tensor, gt_nt: torch.Tensor, pred_nt: torch.Tensor
               ) -> torch.Tensor:
        """Add a batch of sentences.

        Args:
            inter, union: (B,) from `intersection_union(predicted masks, ground truths)`.
            gt_nt: (B,) bool, the expression refers to nothing (item "no_target").
            pred_nt: (B,) bool, predicted no target (`no_target_decision`).

        Returns:
            (B,) float64 per-sentence scores (the gIoU terms).

        Raises:
            ValueError: the four inputs do not have B entries each.
        """
        inter, union, gt_nt, pred_nt = (torch.as_tensor(x).detach().reshape(-1).cpu()
                                        for x in (inter, union, gt_nt, pred_nt))
        if not inter.numel() == union.numel() == gt_nt.numel() == pred_nt.numel():
            raise ValueError(f"inter, union, gt_nt and pred_nt must have B entries each; got {inter.numel()}, "
                             f"{union.numel()}, {gt_nt.numel()}, {pred_nt.numel()}")
        gt_nt, pred_nt = gt_nt.bool(), pred_nt.bool()
        inter, union = inter.double(), union.double()
        i_used = torch.where(gt_nt | pred_nt, torch.zeros_like(inter), inter)  # I counts only for a predicted target
        u_used = torch.where(gt_nt & pred_nt, torch.zeros_like(union), union)
        target_score = torch.where(union > 0, i_used / union.clamp(min=1), torch.zeros_like(union))
        score = torch.where(gt_nt, (gt_nt & pred_nt).double(), target_score)  # (B,)
        self.total_i += float(i_used.sum())
        self.total_u += float(u_used.sum())
        self.score_sum += float(score.sum())
        self.tp += int((gt_nt & pred_nt).sum())
        self.fn += int((gt_nt & ~pred_nt).sum())
        self.tn += int((~gt_nt & ~pred_nt).sum())
        self.fp += int((~gt_nt & pred_nt).sum())
        for k, t in enumerate(self.thresholds):
            self.hits[k] += int(((score >= t) & ~gt_nt).sum())
        return score

    @property
    def count(self) -> int:
        return self.tp + self.fn + self.tn + self.fp

    def state(self) -> torch.Tensor:
        """The sums as one float64 vector [ΣI, ΣU, Σscore, TP, FN, TN, FP, hits...] (exact below 2**53)."""
        return torch.tensor([self.total_i, self.total_u, self.score_sum, self.tp, self.fn, self.tn, self.fp,
                             *self.hits], dtype=torch.float64)

    def load_state(self, state: torch.Tensor) -> None:
        """Inverse of `state`."""
        values = state.double().cpu().tolist()
        self.total_i, self.total_u, self.score_sum = values[:3]
        self.tp, self.fn, self.tn, self.fp = (int(round(v)) for v in values[3:7])
        self.hits = [int(round(v)) for v in values[7:]]

    def compute(self) -> dict:
        """The metrics as fractions in [0, 1] (multiply by 100 for the papers' tables), NaN where undefined.

        Returns:
            dict with "cIoU", "gIoU", "N-acc", "T-acc", "Pr@0.7", "Pr@0.8", "Pr@0.9" and the counts
            "count", "count_no_target", "count_target".
        """
        nan = float("nan")
        n_nt, n_t = self.tp + self.fn, self.tn + self.fp
        out = {"cIoU": self.total_i / self.total_u if self.total_u > 0 else nan,
               "gIoU": self.score_sum / self.count if self.count else nan,
               "N-acc": self.tp / n_nt if n_nt else nan,
               "T-acc": self.tn / n_t if n_t else nan}
        for t, h in zip(self.thresholds, self.hits):
            out[f"Pr@{t:g}"] = h / n_t if n_t else nan
        out.update(count=self.count, count_no_target=n_nt, count_target=n_t)
        return out


class PhraseCutMetrics(_IoUSums):
    """PhraseCut's mask metrics as the official `utils/evaluator.py` computes them.

    Per task, IoU = I/U from `utils/iou.py iou_polygons_masks`, which is 0 whenever I = 0: an empty
    prediction on an empty ground truth scores 0 here (unlike the RefCOCO / gRefCOCO convention).
    mIoU = mean IoU (`mean_mask_iou`), cumIoU = ΣI/ΣU (`cum_mask_iou`), Acc@X = share of tasks with
    IoU strictly greater than X (`pred_mask_acc`, X in 0.5 ... 0.9). NaN where undefined (no task;
    cumIoU with ΣU = 0). Masks are scored at the recorded image size: a prediction of another size is
    refused (the official code would draw the ground truth at the prediction's size and score that).
    """

    def __init__(self, thresholds: tuple[float, ...] = PHRASECUT_THRESHOLDS):
        super().__init__(thresholds)

    def update(self, pred, gt) -> torch.Tensor:
        """Add tasks from their masks.

        Args:
            pred: bool (B, Ho, Wo) or (Ho, Wo) predicted masks. gt: the ground truths, same shape
                (`PhraseCutDataset.original_mask`, at the size recorded in image_data_split.json).

        Returns:
            (B,) float64 per-task IoU.

        Raises:
            ValueError: the prediction's size differs from the ground truth's.
        """
        pred, gt = torch.as_tensor(pred), torch.as_tensor(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"PhraseCut: prediction of shape {tuple(pred.shape)} but ground truth of shape "
                             f"{tuple(gt.shape)}; predict at the image size recorded in image_data_split.json")
        inter, union = intersection_union(pred, gt)
        inter, union = inter.double(), union.double()
        iou = torch.where(inter > 0, inter / union.clamp(min=1), torch.zeros_like(inter))  # (B,)
        self._add(inter, union, iou, strict=True)  # a hit is IoU > X, as the official evaluator counts
        return iou

    def compute(self) -> dict:
        """The metrics as fractions in [0, 1]: "mIoU", "cumIoU", "Acc@0.5" ... "Acc@0.9", and "count"."""
        nan = float("nan")
        out = {"mIoU": self.iou_sum / self.count if self.count else nan,
               "cumIoU": self.total_i / self.total_u if self.total_u > 0 else nan}
        for t, h in zip(self.thresholds, self.hits):
            out[f"Acc@{t:g}"] = h / self.count if self.count else nan
        out["count"] = self.count
        return out


# --- Scoring a split: the dataset's metric set and, for generalized RIS, the no-target decision ---

GRES_DATASETS = ("grefcoco", "shapes-gres")  # expressions may refer to one, several or no object
# The metrics of each metric set, in the order of the printed table (all in percent there and in the JSON).
METRIC_COLUMNS = {
    "ris": ("oIoU", "mIoU", *(f"Prec@{t:g}" for t in PREC_THRESHOLDS)),
    "gres": ("gIoU", "cIoU", "N-acc", "T-acc", *(f"Pr@{t:g}" for t in GRES_PREC_THRESHOLDS)),
    "phrasecut": ("mIoU", "cumIoU", *(f"Acc@{t:g}" for t in PHRASECUT_THRESHOLDS)),
}
COUNT_NOUNS = {"ris": "pairs", "gres": "sentences", "phrasecut": "tasks"}  # what "count" counts


def metric_set(dataset: str) -> str:
    """The metric set a dataset is scored with: "gres" (grefcoco, shapes-gres: ReLA's gRefCOCO metrics),
    "phrasecut" (PhraseCut's official evaluator) or "ris" (oIoU, mIoU, Prec@X: RefCOCO family, shapes)."""
    if dataset in GRES_DATASETS:
        return "gres"
    return "phrasecut" if dataset == "phrasecut" else "ris"


@dataclass(frozen=True)
class Scoring:
    """How each item of a split is scored: the metric set and, for "gres", the no-target decision.

    Args:
        metrics: "ris" (`RISMetrics`), "gres" (`GRESMetrics`) or "phrasecut" (`PhraseCutMetrics`).
        nt_rule, nt_min_pixels, nt_threshold: `no_target_decision`'s rule, min_pixels and threshold
            ("gres" only).
    Raises:
        ValueError: unknown metric set or rule, nt_min_pixels < 1, nt_threshold outside (0, 1).
    """

    metrics: str = "ris"
    nt_rule: str = "empty-mask"
    nt_min_pixels: int = 1
    nt_threshold: float = 0.5

    def __post_init__(self):
        if self.metrics not in METRIC_COLUMNS:
            raise ValueError(f"unknown metric set {self.metrics!r}; expected one of {tuple(METRIC_COLUMNS)}")
        no_target_rule_text(self.nt_rule)  # raises for an unknown rule
        if self.nt_min_pixels < 1:
            raise ValueError(f"nt_min_pixels must be >= 1, got {self.nt_min_pixels}")
        if not 0 < self.nt_threshold < 1:
            raise ValueError(f"nt_threshold must be in (0, 1), got {self.nt_threshold}")

    @property
    def uses_head(self) -> bool:
        """Whether the decision reads the model's no-target logit (the "head" rule on a "gres" split)."""
        return self.metrics == "gres" and self.nt_rule == "head"

    def rule_text(self) -> str:
        """The no-target decision in words (`no_target_rule_text`)."""
        return no_target_rule_text(self.nt_rule, min_pixels=self.nt_min_pixels, threshold=self.nt_threshold)

    def new_metrics(self) -> RISMetrics | GRESMetrics | PhraseCutMetrics:
        """Empty running sums of this metric set."""
        return {"ris": RISMetrics, "gres": GRESMetrics, "phrasecut": PhraseCutMetrics}[self.metrics]()

    def update(self, metrics, pred: torch.Tensor, gt: torch.Tensor, *, gt_no_target: bool = False,
               no_target_logit: torch.Tensor | None = None) -> tuple[float, bool | None]:
        """Score one item: bool pred and gt (h, w) at the scoring size, the item's `no_target` flag and,
        for the head rule, its no-target logit (1,).

        Returns:
            (its score: IoU, or for "gres" the gIoU term; the no-target decision, None outside "gres").
        """
        if self.metrics == "phrasecut":
            return float(metrics.update(pred, gt)[0]), None
        inter, union = intersection_union(pred, gt)  # (1,) each
        if self.metrics == "ris":
            return float(metrics.update(inter, union)[0]), None
        decided = bool(no_target_decision(self.nt_rule, masks=[pred], no_target_logits=no_target_logit,
                                          min_pixels=self.nt_min_pixels, threshold=self.nt_threshold)[0])
        score = metrics.update(inter, union, torch.tensor([gt_no_target]), torch.tensor([decided]))
        return float(score[0]), decided


def scoring_for(dataset: str, model, *, nt_rule: str | None = None, nt_min_pixels: int = 1,
                nt_threshold: float = 0.5) -> Scoring:
    """The `Scoring` of `dataset` for `model`: its metric set; for gRefCOCO-style datasets the no-target
    rule `nt_rule`, by default "head" when the model has a no-target head (`MARIS.no_target_head`, trained
    with no_target_weight > 0) and "empty-mask" otherwise.

    Raises:
        ValueError: "head" asked for a model without the head; bad values (see `Scoring`).
    """
    has_head = getattr(model, "no_target_head", None) is not None
    if nt_rule == "head" and not has_head:
        raise ValueError("the head no-target rule needs a model with a no-target head (trained with "
                         "no_target_weight > 0, train.py --no-target-weight); this one has none: use empty-mask")
    rule = nt_rule or ("head" if has_head else "empty-mask")
    return Scoring(metric_set(dataset), nt_rule=rule, nt_min_pixels=nt_min_pixels, nt_threshold=nt_threshold)


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
# The prediction is a translucent azure fill with a solid azure line just inside its boundary; the
# ground truth is a yellow line just outside its boundary, so a perfect prediction shows both lines side
# by side. Each line lies between two dark edges, which keep it visible on light, dark and same-coloured
# objects.
# Azure is the complement of red (red objects, skin); yellow stays apart from it for red-green colour
# blindness. Line widths grow with the picture (`_line_width`).

PRED_COLOR = (0, 190, 255)  # azure: fill and line of the prediction
GT_COLOR = (255, 220, 0)  # yellow: line of the ground truth
EDGE_COLOR = (0, 0, 0)  # the dark edge along each line
EMPTY_MARK_COLOR = (200, 0, 0)  # background of the "no mask predicted" mark at the picture's top left
BAND_COLOR = (24, 24, 24)  # the legend and caption band under the picture
TEXT_COLOR = (255, 255, 255)
PRED_FILL_ALPHA = 0.45  # share of PRED_COLOR in the fill
MIN_OVERLAY_WIDTH = 384  # px; smaller pictures (the shapes demo's ~128 px) are enlarged
MAX_CAPTION_SHARE = 0.5  # the caption's lines take at most this share of the picture's height (at least one line)
EMPTY_MARK_TEXT = "no mask predicted"
NO_TARGET_MARK_TEXT = "decided: no target"  # the mark of an expression the no-target decision rejected
VIS_SELECT = ("first", "random", "worst")


@functools.lru_cache(maxsize=1)
def _font_path() -> str | None:
    """A DejaVu Sans file (Latin, Greek, Cyrillic and many symbols), or None when none is found.

    Looked up by file name (PIL searches the system font folders), then through fontconfig's
    `fc-match` (which may answer with its closest installed sans font), then as matplotlib's bundled copy.
    """
    try:
        return ImageFont.truetype("DejaVuSans.ttf", 10).path
    except OSError:
        pass
    if shutil.which("fc-match"):
        try:
            found = subprocess.run(["fc-match", "-f", "%{file}", "DejaVu Sans"], capture_output=True, text=True,
                                   timeout=10).stdout.strip()
            if found:
                return found
        except (OSError, subprocess.SubprocessError):
            pass
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin:
        bundled = pathlib.Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if bundled.is_file():
            return str(bundled)
    return None


def _font(px: int):
    """A font `px` pixels high: DejaVu Sans when found, else Pillow's default font."""
    path = _font_path()
    if path is not None:
        try:
            return ImageFont.truetype(path, px)
        except OSError:  # fontconfig answered with a file FreeType cannot read
            pass
    try:
        return ImageFont.load_default(size=px)  # Pillow >= 10.1: scalable (Latin letters; others draw as boxes)
    except TypeError:
        return ImageFont.load_default()  # older Pillow: a small bitmap font


def _drawable(text: str, font) -> str:
    """`text` as `font` can draw it: Pillow's old bitmap font only encodes Latin-1 (others become "?")."""
    return text if isinstance(font, ImageFont.FreeTypeFont) else text.encode("latin-1", "replace").decode("latin-1")


def _line_width(width: int, height: int) -> int:
    """Outline width in px for a picture of width x height: 1 px per 200 px of its longer side, at least 2."""
    return max(2, round(max(width, height) / 200))


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    """bool (h, w) mask grown by r px (a (2r+1) x (2r+1) square); nothing lies beyond its border.

    A running count of mask pixels along each axis (cumsum), so the cost does not grow with r (a max-pool
    with a (2r+1)-wide window took seconds on a 12-megapixel phone photo).
    """
    out = mask
    for axis in (0, 1):
        n = out.shape[axis]
        width = [(0, 0), (0, 0)]
        width[axis] = (r + 1, r)
        counts = np.cumsum(np.pad(out, width), axis=axis, dtype=np.int32)  # (h + 2r + 1, w) or (h, w + 2r + 1)
        hi, lo = [slice(None)] * 2, [slice(None)] * 2
        hi[axis], lo[axis] = slice(2 * r + 1, 2 * r + 1 + n), slice(0, n)
        out = counts[tuple(hi)] - counts[tuple(lo)] > 0  # a mask pixel lies within r along this axis
    return out


def _near_mask(mask: np.ndarray, r: int, op) -> np.ndarray:
    """`op(crop, r)` on the mask's bounding box widened by r px (clipped to the picture), pasted into a copy.

    Growing or shrinking by r changes nothing farther than r from the mask, so this is exact, and an
    object costs its own area rather than the picture's.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    out = mask.copy()
    if rows.size:
        y0, y1 = max(0, rows[0] - r), min(mask.shape[0], rows[-1] + r + 1)
        x0, x1 = max(0, cols[0] - r), min(mask.shape[1], cols[-1] + r + 1)
        out[y0:y1, x0:x1] = op(mask[y0:y1, x0:x1], r)
    return out


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """bool (H, W) mask grown by r px (a (2r+1) x (2r+1) square)."""
    return _near_mask(mask, r, _grow)


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    """bool (H, W) mask shrunk by r px; beyond the picture counts as inside, so no line runs along its border."""
    return _near_mask(mask, r, lambda crop, k: ~_grow(~crop, k))


def _wrap(text: str, font, width: float, max_lines: int) -> list[str]:
    """Greedy word wrap of `text` into lines at most `width` px wide; past `max_lines` the last line ends in "…".

    A word wider than a line (a long name, an unspaced CJK sentence) is broken between characters.
    """
    lines, line, cut = [], "", False
    for word in text.split():
        while font.getlength(word) > width and len(word) > 1:
            k = 1
            while k < len(word) and font.getlength(word[:k + 1]) <= width:
                k += 1
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:k])
            word = word[k:]
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
        if len(lines) > max_lines:
            cut = True
            break
    if line and not cut:
        lines.append(line)
    if len(lines) > max_lines or cut:
        lines, last = lines[:max_lines], lines[max_lines - 1]
        while last and font.getlength(last + " …") > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + " …"
    return lines or [""]


def overlay_caption(caption: str, context_length: int | None = None) -> tuple[str, str | None]:
    """The caption an overlay shows: (quoted text, note or None).

    With `context_length` (L), an expression longer than the model reads shows what it read
    (`data.fit_text`), ended by "…", and the note says how many tokens were read.
    """
    if context_length is None:
        return f'"{caption}"', None
    fitted = data.fit_text(caption, context_length)
    if not fitted.cut:
        return f'"{caption}"', None
    return (f'"{fitted.text} …"',
            f"the model read {fitted.kept} of {fitted.total} tokens (context length L = {context_length})")


def overlay_legend(*, gt: bool, iou: float | None = None, score_label: str = "IoU", gt_no_target: bool = False,
                   pred_no_target: bool | None = None) -> list[tuple[str | None, str]]:
    """The legend items of an overlay, (swatch kind "pred" | "gt" | None, label), in order: the prediction,
    the ground truth (or "ground truth: no target"), the decision ("decided: target" / "decided: no
    target", when one was made), the score."""
    legend = [("pred", "prediction")]
    if gt_no_target:
        legend.append((None, "ground truth: no target"))
    elif gt:
        legend.append(("gt", "ground truth"))
    if pred_no_target is not None:
        legend.append((None, NO_TARGET_MARK_TEXT if pred_no_target else "decided: target"))
    return legend + ([(None, f"{score_label} {iou:.3f}")] if iou is not None else [])


def draw_overlay(image: Image.Image, pred: np.ndarray, caption: str, *, gt: np.ndarray | None = None,
                 iou: float | None = None, context_length: int | None = None, score_label: str = "IoU",
                 gt_no_target: bool = False, pred_no_target: bool | None = None) -> Image.Image:
    """The picture with the prediction and ground truth drawn on it, over a band with a legend and the caption.

    Prediction: translucent `PRED_COLOR` fill, `PRED_COLOR` line inside its boundary between dark edges;
    an empty prediction gets the mark "no mask predicted" (white on `EMPTY_MARK_COLOR`) at the top left,
    a "no target" decision the mark "decided: no target".
    Ground truth: `GT_COLOR` line outside its boundary between dark edges. Line width grows with the
    picture. The band holds the legend (prediction, ground truth, IoU) and the caption, word-wrapped,
    in DejaVu Sans when the system has it (non-Latin text draws) else Pillow's default font. The caption
    takes at most `MAX_CAPTION_SHARE` of the picture's height (at least one line); a longer one ends in "…".

    Args:
        image: original PIL image, Wo x Ho (any mode; converted by `data.load_rgb`).
        pred: bool (Ho, Wo) prediction.  caption: the expression.
        gt: optional bool (Ho, Wo) ground truth.  iou: optional score shown in the legend.
        context_length: L the model read the caption with; an expression longer than that is
            captioned with what the model read and a note of how many tokens it read (`overlay_caption`).
        score_label: the legend's name of `iou` ("score" for a gRefCOCO-style gIoU term).
        gt_no_target: the expression refers to nothing; the legend says "ground truth: no target".
        pred_no_target: the no-target decision (None: none made); the legend names it, and a "no target"
            decision gets the mark "decided: no target" (instead of "no mask predicted").
    Returns:
        RGB PIL image: the picture (enlarged by a whole factor, nearest neighbour, when narrower than
        `MIN_OVERLAY_WIDTH`, so the caption stays readable and mask edges stay sharp) over the band.
    Raises:
        ValueError: pred or gt shaped unlike the image.
    """
    rgb = np.asarray(data.load_rgb(image))  # (Ho, Wo, 3) uint8
    for name, mask in (("mask", pred), ("ground truth", gt)):
        if mask is not None and mask.shape != rgb.shape[:2]:
            raise ValueError(f"{name} shape {mask.shape} does not match image size {rgb.shape[:2]}")
    pred = np.asarray(pred, dtype=bool)
    gt = None if gt is None else np.asarray(gt, dtype=bool)
    scale = -(-MIN_OVERLAY_WIDTH // rgb.shape[1])  # ceil; 1 for pictures already wide enough
    if scale > 1:  # enlarge first, so the lines are drawn at the output's resolution
        rgb, pred = (a.repeat(scale, 0).repeat(scale, 1) for a in (rgb, pred))
        gt = None if gt is None else gt.repeat(scale, 0).repeat(scale, 1)
    picture = Image.fromarray(_paint_masks(rgb, pred, gt))
    height, width = pred.shape
    px = max(12, width // 40)  # font size
    font = _font(px)
    mark_text = NO_TARGET_MARK_TEXT if pred_no_target else (EMPTY_MARK_TEXT if not pred.any() else None)
    if mark_text is not None:
        text_h, pad = font.getbbox("Ag")[3], px // 2
        draw = ImageDraw.Draw(picture)
        mark = (0, 0, 2 * pad + font.getlength(mark_text), text_h + px // 4 + pad)
        draw.rectangle(mark, fill=EMPTY_MARK_COLOR, outline=EDGE_COLOR, width=max(1, px // 10))  # edged, as the lines
        draw.text((pad, pad // 2 + px // 8), mark_text, fill=TEXT_COLOR, font=font)
    legend = overlay_legend(gt=gt is not None, iou=iou, score_label=score_label, gt_no_target=gt_no_target,
                            pred_no_target=pred_no_target)
    band = _legend_band(legend, *overlay_caption(caption, context_length), font=font, px=px, width=width,
                 max_height=MAX_CAPTION_SHARE * height)
    result = Image.new("RGB", (width, height + band.height))
    result.paste(picture, (0, 0))
    result.paste(band, (0, height))
    return result


def _paint_masks(rgb: np.ndarray, pred: np.ndarray, gt: np.ndarray | None) -> np.ndarray:
    """(H, W, 3) uint8 picture with the prediction's fill and line and the ground truth's line (see draw_overlay).

    Each coloured line, w px wide, lies between two dark edges, e px wide: the prediction's just inside its
    boundary (edge, line, edge, then the fill), the ground truth's just outside (edge, line, edge), so the
    object itself is not covered and a line stays visible on an object of its own colour.
    """
    height, width = pred.shape
    w = _line_width(width, height)
    e = max(1, w // 2)  # dark edge width
    out = rgb.copy()  # (H, W, 3)
    tint = (1 - PRED_FILL_ALPHA) * rgb[pred] + PRED_FILL_ALPHA * np.asarray(PRED_COLOR, np.float32)  # (P, 3)
    out[pred] = tint.round().astype(np.uint8)
    shrunk = [pred] + [_erode(pred, r) for r in (e, e + w, 2 * e + w)]  # the prediction shrunk by 0, e, e+w, 2e+w
    out[shrunk[0] & ~shrunk[3]] = EDGE_COLOR
    out[shrunk[1] & ~shrunk[2]] = PRED_COLOR
    if gt is not None:
        grown = [gt] + [_dilate(gt, r) for r in (e, e + w, 2 * e + w)]
        out[grown[3] & ~grown[0]] = EDGE_COLOR
        out[grown[2] & ~grown[1]] = GT_COLOR
    return out


def _legend_band(legend: list[tuple[str | None, str]], text: str, note: str | None, *, font, px: int, width: int,
          max_height: float) -> Image.Image:
    """The band under an overlay: legend rows, the caption's lines (at most `max_height` px of them, at least
    one), then the note. `legend` holds (swatch kind "pred" | "gt" | None, label) items."""
    text_h = font.getbbox("Ag")[3]  # from the line's top to the bottom of descenders (every font kind has getbbox)
    line_h, pad, gap = text_h + px // 4, px // 2, px // 3
    side = min(px, text_h)  # swatch size
    rows, x = [[]], pad  # legend items flow left to right, onto more rows when the picture is narrow
    for kind, label in legend:
        item_w = (side + gap if kind else 0) + font.getlength(_drawable(label, font))
        if x + item_w > width - pad and rows[-1]:
            rows.append([])
            x = pad
        rows[-1].append((x, kind, label))
        x += item_w + 2 * px
    fixed = len(rows) + (note is not None)
    max_lines = max(1, int((max_height - 2 * pad) // line_h) - fixed)
    lines = _wrap(_drawable(text, font), font, width - 2 * pad, max_lines)
    band = Image.new("RGB", (width, 2 * pad + (fixed + len(lines)) * line_h), BAND_COLOR)
    draw = ImageDraw.Draw(band)
    for r, row in enumerate(rows):
        y = pad + r * line_h
        for x, kind, label in row:
            if kind is not None:  # a swatch in the colours the picture uses for that mask
                top = y + px // 8 + (text_h - side) // 2 + 1
                box = (x, top, x + side - 1, top + side - 1)
                draw.rectangle(box, fill=EDGE_COLOR)
                inside = (box[0] + 1, box[1] + 1, box[2] - 1, box[3] - 1)
                if kind == "pred":
                    draw.rectangle(inside, fill=PRED_COLOR)
                else:
                    draw.rectangle(inside, outline=GT_COLOR, width=max(2, side // 5))
                x += side + gap
            draw.text((x, y + px // 8), _drawable(label, font), fill=TEXT_COLOR, font=font)
    for k, line in enumerate(lines + ([_drawable(note, font)] if note is not None else [])):
        draw.text((pad, pad + (len(rows) + k) * line_h + px // 8), line, fill=TEXT_COLOR, font=font)
    return band


def _slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a sentence: ASCII letters and digits joined by "-" ("text" when none)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")[:limit].rstrip("-") or "text"


def overlay_file_name(mode: str, number: int, n: int, iou: float, image_id: int, sentence: str) -> str:
    """`<mode><number>_iou<IoU in %>_img<image id>_<sentence slug>.png`.

    e.g. `worst03_iou012_img572949_man-on-right.png`; numbers are zero-padded to the width of n.
    """
    return f"{mode}{number:0{len(str(n))}d}_iou{round(100 * iou):03d}_img{image_id}_{_slug(sentence)}.png"


class OverlaySelection:
    """Which pairs of a split get overlay pictures, chosen while the split is scored (one model pass).

    first: the n lowest item indices. random: n item indices drawn without replacement by
    `numpy.random.default_rng(seed)`, the same on every process. worst: the n lowest per-pair IoUs
    (ties: the lower index); each process keeps only its n worst predictions so far (masks at the
    original resolution), and under DDP the candidates' (IoU, index) are all-gathered, so the split's n
    worst are drawn, each by the process that scored it.

    Args:
        mode: "first" | "random" | "worst".  n: pictures wanted.  num_items: pairs in the split.
        seed: the draw of "random".
    Raises:
        ValueError: an unknown mode.
    """

    def __init__(self, mode: str, n: int, num_items: int, *, seed: int = 0):
        if mode not in VIS_SELECT:
            raise ValueError(f"unknown overlay selection {mode!r}; expected one of {VIS_SELECT}")
        self.mode, self.n = mode, max(0, min(n, num_items))
        if mode == "first":
            self.wanted = set(range(self.n))
        elif mode == "random":
            self.wanted = set(np.random.default_rng(seed).choice(num_items, size=self.n, replace=False).tolist())
        else:
            self.wanted = None  # worst: known only once every pair is scored
        self.kept: dict[int, tuple] = {}  # index -> (iou, pred bool (Ho, Wo), image id, sentence, L, marks)

    def _best_kept(self) -> tuple[float, int]:
        return max((entry[0], index) for index, entry in self.kept.items())

    def wants(self, index: int, iou: float) -> bool:
        """Whether pair `index`, scored `iou`, is (for worst: so far) among the chosen."""
        if self.wanted is not None:
            return index in self.wanted
        return len(self.kept) < self.n or (iou, index) < self._best_kept()

    def keep(self, index: int, iou: float, pred: np.ndarray, image_id: int, sentence: str,
             context_length: int | None, marks: dict | None = None) -> None:
        """Hold a wanted pair's prediction (bool (Ho, Wo)) until the pictures are drawn; `marks` are extra
        `draw_overlay` arguments (the no-target legend of gRefCOCO-style items)."""
        self.kept[index] = (iou, pred, image_id, sentence, context_length, marks or {})
        if self.wanted is None and len(self.kept) > self.n:
            del self.kept[self._best_kept()[1]]

    def chosen(self) -> list[tuple[int, int]]:
        """(number, index) of the pictures this process draws; number 1..n in the selection's order.

        A collective call under DDP for "worst" (every process must call it).
        """
        if self.wanted is not None:
            order = sorted(self.wanted)
        else:
            candidates = [(entry[0], index) for index, entry in self.kept.items()]
            if dist.is_available() and dist.is_initialized():
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, candidates)
                candidates = [c for part in gathered for c in part]
            order = [index for _, index in sorted(candidates)[: self.n]]
        return [(number, index) for number, index in enumerate(order, 1) if index in self.kept]


def write_overlays(selection: OverlaySelection, dataset, vis_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Draw the selection's pictures into `vis_dir` (named by `overlay_file_name`); returns their paths.

    The image and ground truth come from `dataset.load_image(image_id)` and `dataset.original_mask(index)`.
    """
    vis_dir = pathlib.Path(vis_dir)
    vis_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, index in selection.chosen():
        iou, pred, image_id, sentence, context_length, marks = selection.kept[index]
        picture = draw_overlay(dataset.load_image(image_id), pred, sentence, iou=iou, context_length=context_length,
                               gt=np.asarray(dataset.original_mask(index), dtype=bool), **marks)
        paths.append(vis_dir / overlay_file_name(selection.mode, number, selection.n, iou, image_id, sentence))
        picture.save(paths[-1])
    return paths


def remove_old_overlays(vis_dir: str | os.PathLike, mode: str) -> None:
    """Delete the pictures an earlier run of `mode` left in `vis_dir` (only names `overlay_file_name` makes)."""
    for old in pathlib.Path(vis_dir).glob(f"{mode}[0-9]*_iou[0-9]*_img*.png"):
        old.unlink()


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
                   vis_select: str = "random", vis_seed: int = 0,
                   progress: bool = True, desc: str = "eval", cache: data.FeatureCache | None = None,
                   scoring: Scoring | None = None, limit: int = 0) -> dict:
    """Score every item (every sentence of every ref) of a dataset, or its first `limit` items -> the
    `compute()` of its metric set (`RISMetrics` by default; `scoring` picks `GRESMetrics` or `PhraseCutMetrics`).

    Whole images are packed into batches (`eval_batches`), each distinct image of a batch encoded once
    (`data.collate_images`). The ground truth comes from `dataset.original_mask(index)`, never from the
    batch, so the dataset can be built with load_masks=False. Under a process group each rank scores
    its share and the sums are all-reduced: every rank returns the metrics of the whole split.

    Args:
        model: MARIS (not DDP-wrapped); its train/eval mode is restored afterwards.
        dataset: has `image_ids`, `original_mask(index)` and `load_image(image_id)`.
        eval_size: None = original resolution, R = R × R square (LAVT/MagNet).
        threshold: sigmoid threshold.  precision: auto | bf16 | fp32.
        vis: overlay PNGs (`draw_overlay`) of this many pairs into `vis_dir` (default "vis"), replacing
            those an earlier run of the same selection left there; their place is printed.
        vis_select: which pairs (`OverlaySelection`): "first", "random" (seeded by `vis_seed`) or
            "worst" (lowest IoU; chosen during the single pass over the split).
        cache: optional `data.open_feature_cache(model, dataset, ...)` giving the frozen encoder's
            outputs (the dataset may then be built with load_images=False).
        scoring: the metric set and no-target decision (`Scoring`, `scoring_for`); None = oIoU, mIoU,
            Prec@X. "gres" reads the items' `no_target`; its "head" rule runs `model.forward_features`
            for the no-target logit.
        limit: score items 0 .. limit - 1 only (0 = every item).

    Raises:
        ValueError: "phrasecut" with an eval_size (PhraseCut is scored at the original image size); the
            "head" rule with a model that has no no-target head.
    """
    scoring = scoring or Scoring()
    if scoring.metrics == "phrasecut" and eval_size is not None:
        raise ValueError(f"PhraseCut is scored at the original image size (its official evaluator), not at "
                         f"eval_size {eval_size}")
    if scoring.uses_head and getattr(model, "no_target_head", None) is None:
        raise ValueError("the head no-target rule needs a model with a no-target head (no_target_weight > 0)")
    device = torch.device(device)
    precision = maris.effective_precision(device, precision)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    image_ids = list(dataset.image_ids)[:limit] if limit > 0 else dataset.image_ids
    batches = eval_batches(image_ids, batch_size, rank=rank, world=world)
    # A fixed generator: creating the loader must not draw from the global RNG (exact resume in train.py).
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         collate_fn=data.collate_images, generator=torch.Generator().manual_seed(0))
    size = model.cfg.image_size  # S
    metrics = scoring.new_metrics()
    was_training = model.training
    model.eval()
    scored = min(limit, len(dataset)) or len(dataset)  # items 0 .. scored - 1
    selection = OverlaySelection(vis_select, vis, scored, seed=vis_seed) if vis > 0 else None
    vis_dir = pathlib.Path(vis_dir or "vis")
    if selection is not None and rank == 0 and vis_dir.is_dir():
        remove_old_overlays(vis_dir, vis_select)  # before every rank's all_reduce below, so before any rank draws
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
            inputs, _ = data.batch_image_inputs(batch, device=device, model=model, cache=cache, dataset=dataset,
                                                batch_size=batch_size, precision=precision)
            extra = {} if cache is None else {"image_features": inputs["image_features"]}
            nt_logits = None  # (B,) the no-target head's logits, read by the "head" rule only
            with maris.autocast(device, precision):
                if scoring.uses_head:
                    out = model.forward_features(batch["ids"].to(device), batch["word_mask"].to(device),
                                                 images=inputs["images"], image_index=inputs["image_index"], **extra)
                    logits, nt_logits = out["logits"], out["no_target_logit"].float()
                else:
                    logits = model(inputs["images"], batch["ids"].to(device), batch["word_mask"].to(device),
                                   image_index=inputs["image_index"], **extra)  # (B, 1, 4H, 4W)
            preds = logits_to_masks(logits, batch["input_size"], batch["orig_size"], size=size,
                                    eval_size=eval_size, threshold=threshold)
            for b, pred in enumerate(preds):
                index = int(batch["index"][b])
                gt_orig = torch.from_numpy(np.asarray(dataset.original_mask(index), dtype=bool))  # (Ho, Wo)
                gt = gt_at_eval_size(gt_orig, eval_size).to(pred.device)
                gt_nt = scoring.metrics == "gres" and bool(batch["no_target"][b])
                iou, decided = scoring.update(metrics, pred, gt, gt_no_target=gt_nt,
                                              no_target_logit=None if nt_logits is None else nt_logits[b:b + 1])
                if selection is not None and selection.wants(index, iou):
                    # Overlays are always drawn at the original resolution.
                    full = pred if eval_size is None else logits_to_masks(
                        logits[b:b + 1], batch["input_size"][b:b + 1], batch["orig_size"][b:b + 1],
                        size=size, threshold=threshold)[0]
                    # gRefCOCO-style: the score is the gIoU term; the legend names the GT and the decision.
                    marks = {} if decided is None else dict(score_label="score", gt_no_target=gt_nt,
                                                            pred_no_target=decided)
                    selection.keep(index, iou, full.cpu().numpy(), int(batch["image_id"][b]), batch["sentence"][b],
                                   context_length=batch["ids"].shape[-1], marks=marks)
    finally:
        model.train(was_training)
    metrics.all_reduce()
    if selection is not None:
        write_overlays(selection, dataset, vis_dir)
        if rank == 0:
            print(f"{desc}: {selection.n} overlay pictures ({vis_select}) of {len(dataset)} pairs in {vis_dir}")
    return metrics.compute()


# --- Reporting ---

def protocol(*, eval_size: int | None, threshold: float, image_size: int, scoring: Scoring | None = None,
             context_length: int | None = None) -> dict:
    """The scoring protocol, stated next to every table and in the JSON: what is scored, at which
    resolution, the metric definitions of the metric set (`scoring`, default oIoU/mIoU/Prec@X), the
    no-target decision rule (gRefCOCO-style), the context length L and the unit."""
    scoring = scoring or Scoring()
    if eval_size is None:
        resolution = "original image resolution (logits upsampled to S, padding cropped, bilinear resize to (Ho, Wo))"
    else:
        resolution = (f"{eval_size}x{eval_size} square (logits upsampled to S, padding cropped, bilinear resize "
                      f"to {eval_size}x{eval_size}; GT nearest-resized; LAVT/MagNet protocol)")
    out = {"pairs": "every task" if scoring.metrics == "phrasecut" else "every sentence of every ref",
           "scoring": resolution, "eval_size": eval_size, "threshold": f"sigmoid > {threshold}",
           "input_size_S": image_size, "context_length_L": context_length}
    if scoring.metrics == "ris":
        out.update({"oIoU": "sum of I / sum of U over all pairs (a.k.a. cIoU)", "mIoU": "mean per-pair IoU",
                    "Prec@X": "share of pairs with IoU >= X",
                    "empty_gt": "empty GT + empty prediction = IoU 1, adds nothing to the sums"})
    elif scoring.metrics == "gres":
        out.update(GRES_METRICS_PROTOCOL)
        out["no_target_rule"] = scoring.rule_text()
    else:
        out["scoring"] = ("original image size recorded in image_data_split.json, as the official evaluator "
                          "(logits upsampled to S, padding cropped, bilinear resize to that size)")
        out.update(PHRASECUT_METRICS_PROTOCOL)
        out["size_mismatch"] = ("an image file whose size differs from the recorded one is resized to the "
                                "recorded size before the model sees it; every task is scored")
    out["unit"] = "percent (counts are numbers of items)"
    return out


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


def format_table(results: dict[str, dict], columns: tuple[str, ...] = METRIC_COLUMNS["ris"]) -> str:
    """A text table: one row per split, the metrics `columns` (fractions in `results`) in percent ("-" where
    undefined), then the count."""
    cols = list(columns)
    width = max([5, *map(len, results)])

    def cell(value) -> str:
        return f"{'-':>8}" if value is None or value != value else f"{100 * value:8.2f}"  # None / NaN: no pairs

    lines = [f"{'split':<{width}}  " + "  ".join(f"{c:>8}" for c in cols) + f"  {'count':>7}"]
    for split, m in results.items():
        lines.append(f"{split:<{width}}  " + "  ".join(cell(m[c]) for c in cols) + f"  {m['count']:>7d}")
    return "\n".join(lines)


def in_percent(results: dict[str, dict], columns: tuple[str, ...]) -> dict[str, dict]:
    """`results` ({split: metrics as fractions}) with the metrics `columns` in percent, as the JSON report
    holds them; counts and undefined values (None) unchanged."""
    return {split: {k: 100 * v if k in columns and v is not None else v for k, v in m.items()}
            for split, m in results.items()}


# --- Command line ---

def image_file_name(path: str) -> None:
    """Option check: a file name whose extension Pillow can write (.png, .jpg, .webp, ...)."""
    if Image.registered_extensions().get(pathlib.Path(path).suffix.lower()) not in Image.SAVE:
        raise ValueError("expected a file name ending in an image extension Pillow writes (.png, .jpg, .webp, ...)")


@dataclass
class EvalOptions:
    """Every command-line option of evaluate.py (flag = field name with '-' for '_')."""

    ckpt: str = maris.option(help="checkpoint written by train.py (best.pt / last.pt) or a model folder written by "
                                  "--export")
    dataset: str | None = maris.option(None, "shapes | shapes-gres | refcoco | refcoco+ | refcocog | grefcoco | "
                                             "phrasecut; another than the checkpoint's scores it across datasets "
                                             "(e.g. a RefCOCO model on PhraseCut)", auto="the checkpoint's")
    split_by: str | None = maris.option(None, "unc | google | umd", auto="the checkpoint's")
    split: list | None = maris.option(None, "split(s) to score; repeatable or comma-separated",
                                      auto="every evaluation split of the dataset", multiple=True)
    data_root: str | None = maris.option(None, "data root (README: Data)", auto="the checkpoint's")
    image_dir: str | None = maris.option(None, "image folder", auto="the checkpoint's on its own dataset, else the "
                                                                    "dataset's layout")
    sam_checkpoint: str | None = maris.option(None, "SAM weights", auto="the path stored in the checkpoint")
    clip_checkpoint: str | None = maris.option(None, "CLIP weights", auto="the path stored in the checkpoint")
    batch_size: int = maris.option(8, "sentences per forward pass", check=maris.at_least(1))
    workers: int = maris.option(0, "DataLoader worker processes", check=maris.at_least(0))
    device: str = maris.option("auto", "auto | cpu | cuda | cuda:N", check=maris.check_device)
    precision: str = maris.option("auto", "auto = bf16 autocast on CUDA, fp32 on CPU", choices=maris.PRECISIONS)
    eval_size: int | None = maris.option(None, "score on an R x R square resize (480 = LAVT/MagNet); refused for "
                                               "phrasecut, whose official evaluator scores at the image size",
                                         auto="the original resolution", check=maris.at_least(1))
    threshold: float = maris.option(0.5, "foreground where sigmoid(logit) > threshold", check=maris.between(0.0, 1.0))
    # The no-target decision of gRefCOCO-style datasets (grefcoco, shapes-gres), printed with the results.
    nt_rule: str | None = maris.option(
        None, "no-target decision (grefcoco, shapes-gres): empty-mask = no target when the predicted mask has "
              "fewer than --nt-min-pixels pixels (LISA, EVF-SAM); head = the no-target head's sigmoid > "
              "--nt-threshold (ReLA; checkpoints trained with --no-target-weight > 0)",
        auto="head when the checkpoint has a no-target head, else empty-mask", choices=NO_TARGET_RULES)
    nt_min_pixels: int = maris.option(1, "empty-mask rule: fewer foreground pixels than this (at the scoring size) "
                                         "means no target", check=maris.at_least(1))
    nt_threshold: float = maris.option(0.5, "head rule: no target when sigmoid(no-target logit) > this",
                                      check=maris.between(0.0, 1.0))
    vis: int = maris.option(0, "write overlay PNGs of N pairs of each split into <out-dir>/vis/<split>/, named "
                               "<selection><number>_iou<IoU %%>_img<image id>_<sentence>.png", check=maris.at_least(0))
    vis_select: str = maris.option("random", "which pairs --vis draws: random (a seeded sample over the whole split, "
                                             "a fair picture of the model), first (the first N pairs, often one "
                                             "image), worst (lowest IoU)", choices=VIS_SELECT)
    vis_seed: int = maris.option(0, "seed of --vis-select random", check=maris.at_least(0))
    limit: int = maris.option(0, "score only the first N pairs of each split (0 = every pair)", check=maris.at_least(0))
    out_dir: str | None = maris.option(None, "where the JSON and overlays go", auto="the checkpoint's folder")
    progress: bool = maris.option(True, "show progress bars")
    feature_cache: str | None = maris.option(
        None, "read SAM's frozen encoder outputs from this cache folder (written on first use; shared with "
              "train.py --feature-cache; not with adapters)", auto="off", metavar="DIR")
    allow_encoder_mismatch: bool = maris.option(
        False, "run although the SAM / CLIP weights differ from those the model was trained with (their sha256 "
               "in the checkpoint), with a warning; the JSON records the files and hashes either way")
    export: str | None = maris.option(
        None, "write a shareable model folder in the Hugging Face Hub's layout (config.json, model.safetensors with "
              "the trainable weights, README.md model card with the metrics of --split, measured now) into DIR, a new "
              "or empty folder; it loads wherever a checkpoint does (--ckpt DIR, maris.load(DIR))",
        auto="off; the split scored for the card: the checkpoint's validation split", metavar="DIR")
    image: str | None = maris.option(None, "single-image mode: an image file", auto="split scoring")
    text: str | None = maris.option(None, "single-image mode: the referring expression", auto="none",
                                    check=maris.nonempty)
    out: str | None = maris.option(None, "single-image mode: overlay picture path (.png, .jpg, ...)",
                                   auto="<image>_overlay.png", check=image_file_name)
    mask_out: str | None = maris.option(None, "single-image mode: mask picture path", auto="<out>_mask.png",
                                        check=image_file_name)


DESCRIPTION = ("Score a MARIS checkpoint (oIoU, mIoU, Prec@X; gRefCOCO: gIoU, cIoU, N-acc, T-acc, Pr@X; "
               "PhraseCut: mIoU, cumIoU, Acc@X) or segment one image.")


def parse_splits(values: list[str] | None, dataset: str, split_by: str | None) -> list[str]:
    """`--split a,b --split c` → [a, b, c]; none given → the dataset's evaluation splits."""
    if values:
        return [s.strip() for v in values for s in v.split(",") if s.strip()]
    key = (dataset, None if dataset in ("shapes", "shapes-gres") else split_by)
    if key not in EVAL_SPLITS:
        raise SystemExit(f"error: no default splits for dataset {dataset!r} split_by {split_by!r}; pass --split")
    return list(EVAL_SPLITS[key])


# --- Prediction: expressions in one image (README, "Predict in Python") ---

def read_picture(image) -> Image.Image:
    """The RGB picture of a path, a PIL image or an (H, W, 3) uint8 RGB array, through `data.load_rgb`
    (upright by its EXIF orientation; 16-bit, alpha, palette and CMYK modes converted).

    Raises:
        FileNotFoundError: no such file.  TypeError: another kind of object.
        ValueError: an unreadable file, or an array that is not (H, W, 3) uint8 with H, W >= 1.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ValueError(f"image array of shape {image.shape} and dtype {image.dtype}: expected an (H, W, 3) "
                             f"uint8 RGB array")
        image = Image.fromarray(image)
    elif not isinstance(image, (str, os.PathLike, Image.Image)):
        raise TypeError(f"image of type {type(image).__name__}: expected a file path, a PIL image or an (H, W, 3) "
                        f"uint8 array")
    return data.load_rgb(image, exif_transpose=True)


@torch.no_grad()
def predict(model: maris.MARIS, image, text: str | list[str], *, threshold: float = 0.5,
            precision: str | None = None, batch_size: int = 32) -> np.ndarray | list[np.ndarray]:
    """Segment one or several expressions in one image.

        model = maris.load("runs/refcoco/best.pt")
        mask = predict(model, "photo.jpg", "the dog on the left")              # bool (H, W)
        masks = predict(model, "photo.jpg", ["the dog", "the cat on the right"])  # one image-encoder pass

    The picture is read by `read_picture` and resized and padded as in training (`data.transform_image`);
    SAM's image encoder runs once for all the expressions; the masks are thresholded exactly as the scoring
    does (`logits_to_masks` at the original resolution).

    Args:
        model: a MARIS (`maris.load`), on any device; its train / eval mode is restored afterwards.
        image: a file path, a PIL image or an (H, W, 3) uint8 RGB array.
        text: one expression, or a list of expressions of this image.
        threshold: foreground where sigmoid(logit) > threshold, in (0, 1).
        precision: "auto" | "bf16" | "fp32"; None = `model.precision` (set by `maris.load`), else "auto".
        batch_size: expressions per decoder pass.

    Returns:
        bool numpy array (H, W) at the picture's (upright) size for one expression; a list of them, in order,
        for a list of expressions.

    Raises:
        FileNotFoundError: no such image file.  TypeError: an image or expression of another type.
        ValueError: an unreadable image, an empty expression or list, a threshold outside (0, 1).
    """
    texts = [text] if isinstance(text, str) else list(text)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("text: expected an expression (str) or a non-empty list of them")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ValueError(f"expression #{empty[0]} is empty: expected a referring expression such as \"the dog on "
                         f"the left\"")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold {threshold}: expected a number > 0 and < 1")
    precision = precision or getattr(model, "precision", "auto")  # `maris.load` sets model.precision
    masks, _ = predict_outputs(model, read_picture(image), texts, threshold=threshold, precision=precision,
                               batch_size=batch_size)
    return masks[0] if isinstance(text, str) else masks


@torch.no_grad()
def predict_outputs(model: maris.MARIS, picture: Image.Image, texts: list[str], *, threshold: float,
                    precision: str, batch_size: int) -> tuple[list[np.ndarray], torch.Tensor | None]:
    """`predict`'s model pass over checked inputs: the B masks and, for a model with a no-target head
    (`MARIS.no_target_head`), its no-target logits (B,) on the CPU (None without the head), from the same pass.

    Args:
        picture: RGB PIL image (`read_picture`).  texts: B non-empty expressions.
        threshold, precision, batch_size: as `predict` (precision "auto" | "bf16" | "fp32").
    """
    device, S = model.word_pos.device, model.cfg.image_size
    pixels, (h2, w2) = data.transform_image(picture, S)  # (3, S, S)
    head = getattr(model, "no_target_head", None) is not None
    was_training = model.training
    model.eval()
    masks, nt_logits = [], []
    try:
        with maris.autocast(device, precision):
            features = model.encode_image(pixels[None].to(device))  # neck (1, C, H, W), taps (1, H, W, D)
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            ids, word_mask = data.tokenize(chunk, model.cfg.context_length)  # (B, L), (B, L)
            with maris.autocast(device, precision):
                out = model.forward_features(ids.to(device), word_mask.to(device), image_features=features,
                                             image_index=torch.zeros(len(chunk), dtype=torch.long, device=device))
            if head:
                nt_logits.append(out["no_target_logit"].float().cpu())  # (B,)
            B = len(chunk)
            masks += [m.cpu().numpy() for m in logits_to_masks(
                out["logits"], torch.tensor([[h2, w2]] * B), torch.tensor([[picture.height, picture.width]] * B),
                size=S, threshold=threshold)]  # logits (B, 1, 4H, 4W)
    finally:
        model.train(was_training)
    return masks, torch.cat(nt_logits) if head else None


@maris.one_line_errors
def main(argv: list[str] | None = None) -> dict:
    """Run evaluate.py; returns {split: metrics} (or {"mask": path, "overlay": path, "no_target": the decision,
    None where none is made} in single-image mode).

    The returned metrics are fractions in [0, 1], as `RISMetrics.compute()` (and the other metric sets) give
    them; the printed table and the JSON report hold them in percent. Metrics of a split with no pairs are
    None (null in the JSON, "-" in the table). Bad files and values exit with one line
    (`maris.one_line_errors`), before anything is written.
    """
    opts, _ = maris.parse_options(EvalOptions, argv, DESCRIPTION)
    ckpt = maris.read_checkpoint(opts.ckpt)
    picture = None
    if opts.image is not None or opts.text is not None:
        if opts.image is None or opts.text is None:
            raise SystemExit("error: single-image mode needs both --image and --text")
        if opts.export is not None:
            raise SystemExit("error: --export scores a split for the model card; drop --image / --text")
        picture = read_picture(opts.image)  # before the model is built: a bad file fails at once
    # Under torchrun every rank scores its share of each split; rank 0 prints and writes.
    rank, world, device = maris.setup_distributed(opts.device)
    try:
        if picture is not None and world > 1:
            raise SystemExit("error: single-image mode runs in one process; run it without torchrun")
        model = maris.model_from_checkpoint(ckpt, sam_checkpoint=opts.sam_checkpoint,
                                            clip_checkpoint=opts.clip_checkpoint)
        # The encoder weights are hashed once per run: the check against the checkpoint and the feature cache.
        encoders = maris.check_encoders(ckpt, model, source=opts.ckpt, sam_checkpoint=opts.sam_checkpoint,
                                        clip_checkpoint=opts.clip_checkpoint,
                                        allow_mismatch=opts.allow_encoder_mismatch)
        model = model.to(device)
        if picture is not None:
            return segment_one_image(opts, model, picture, device=device,
                                     dataset_name=opts.dataset or ckpt["options"].get("dataset", "shapes"))
        if opts.export is not None:
            return export_model(opts, ckpt, model, world=world, device=device, encoders=encoders)
        return score_splits(opts, ckpt, model, rank=rank, device=device, encoders=encoders)
    finally:  # every rank leaves the process group, also after an error (as train.main does)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def segment_one_image(opts: EvalOptions, model: maris.MARIS, picture: Image.Image, *, device: torch.device,
                      dataset_name: str = "shapes") -> dict:
    """Single-image mode: write the overlay picture and the mask of `opts.text` in `picture` (`predict`) and,
    for a gRefCOCO-style `dataset_name` or a model with a no-target head, print the no-target decision
    (`single_image_scoring`), which the overlay's legend names too."""
    scoring = single_image_scoring(opts, dataset_name, model)
    masks, nt_logits = predict_outputs(model, picture, [opts.text], threshold=opts.threshold,
                                       precision=maris.effective_precision(device, opts.precision), batch_size=1)
    mask = masks[0]
    decided = None
    if scoring is not None:
        decided = bool(no_target_decision(scoring.nt_rule, masks=[mask], no_target_logits=nt_logits,
                                          min_pixels=scoring.nt_min_pixels, threshold=scoring.nt_threshold)[0])
    image_path = pathlib.Path(opts.image)
    out = pathlib.Path(opts.out or image_path.with_name(image_path.stem + "_overlay.png"))
    mask_out = pathlib.Path(opts.mask_out or out.with_name(out.stem + "_mask.png"))
    out.parent.mkdir(parents=True, exist_ok=True)
    mask_out.parent.mkdir(parents=True, exist_ok=True)
    draw_overlay(picture, mask, opts.text, context_length=model.cfg.context_length,
                 pred_no_target=decided).save(out)
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(mask_out)
    print(f"overlay: {out}\nmask:    {mask_out}  ({int(mask.sum())} foreground pixels of {mask.size})")
    if scoring is not None:
        logit = "" if nt_logits is None else f"; sigmoid(logit) = {torch.sigmoid(nt_logits[0]).item():.3f}"
        print(f"no target: {'yes' if decided else 'no'}  ({scoring.rule_text()}{logit})")
    return {"overlay": str(out), "mask": str(mask_out), "no_target": decided}


def single_image_scoring(opts: EvalOptions, dataset_name: str, model: maris.MARIS) -> Scoring | None:
    """The no-target decision of single-image mode: for a gRefCOCO-style dataset (--dataset, else the
    checkpoint's) or a model with a no-target head, the `Scoring` of the --nt-* options (`scoring_for`;
    default rule: the head when the model has one, else the empty mask); None otherwise.

    Raises:
        SystemExit: --nt-* options where no decision is made, --nt-rule head without a head.
    """
    if metric_set(dataset_name) != "gres" and getattr(model, "no_target_head", None) is None:
        split_scoring(opts, dataset_name, model)  # refuses --nt-* options, as split scoring does
        return None
    try:
        return scoring_for(GRES_DATASETS[0], model, nt_rule=opts.nt_rule, nt_min_pixels=opts.nt_min_pixels,
                           nt_threshold=opts.nt_threshold)
    except ValueError as e:
        raise SystemExit(f"error: --nt-*: {e}") from None


def score_splits(opts: EvalOptions, ckpt: dict, model: maris.MARIS, *, rank: int, device: torch.device,
                 encoders: dict) -> dict:
    """Score every requested split; rank 0 prints the table and writes the JSON report.

    `encoders` is `maris.check_encoders`' report: the JSON records it, the feature cache uses its SAM hash.
    """
    stored, cfg = ckpt["options"], model.cfg
    dataset_name, split_by = scored_dataset(opts, stored)
    splits = parse_splits(opts.split, dataset_name, split_by)
    scoring = split_scoring(opts, dataset_name, model)
    # Across datasets the checkpoint's context length L is kept: it is what the model was trained to read.
    proto = protocol(eval_size=opts.eval_size, threshold=opts.threshold, image_size=cfg.image_size,
                     scoring=scoring, context_length=cfg.context_length)
    # The stored image folder belongs to the training dataset's layout.
    own_dataset = dataset_name == stored.get("dataset", "shapes")
    image_dir = opts.image_dir or (stored.get("image_dir") if own_dataset else None)
    out_dir = pathlib.Path(opts.out_dir or pathlib.Path(opts.ckpt).parent)  # printed as the user wrote it
    if opts.limit:
        proto["pairs"] = f"the first {opts.limit} sentences of each split (--limit)"
    results: dict[str, dict] = {}
    start = time.time()
    # The encoder weights' hash (a full read of them) was taken once, for the encoder check.
    encoder_sha256 = encoders["sam"]["sha256"] if opts.feature_cache is not None and not cfg.adapters else None
    for split in splits:
        try:
            # With a feature cache the pixels are only read to fill missing cache entries.
            # The shapes split a run trained on has the scenes it trained on (train.py --train-scenes).
            scenes = (stored.get("train_scenes") if own_dataset and dataset_name == "shapes"
                      and split == stored.get("train_split") else None)
            ds = data.build_dataset(dataset_name, split, root=opts.data_root or stored.get("data_root"),
                                    split_by=split_by, image_size=cfg.image_size, context_length=cfg.context_length,
                                    image_dir=image_dir, load_images=opts.feature_cache is None,
                                    load_masks=False, num_images=scenes)  # scored against original_mask(index)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise SystemExit(f"error: {e}") from None
        cache = None if opts.feature_cache is None else open_cache(model, ds, opts, device, encoder_sha256)
        results[split] = evaluate_model(
            model, ds, batch_size=opts.batch_size, device=device, eval_size=opts.eval_size,
            threshold=opts.threshold, precision=opts.precision, workers=opts.workers,
            vis=opts.vis, vis_dir=out_dir / "vis" / split, vis_select=opts.vis_select, vis_seed=opts.vis_seed,
            progress=opts.progress and rank == 0, desc=split,
            cache=cache, scoring=scoring, limit=opts.limit)
    results = without_nan(results)  # a split with no pairs has no score: None, not NaN
    if rank == 0:  # every rank holds the all-reduced results; one writes them
        write_report(opts, ckpt, results, proto, dataset_name, split_by, out_dir, time.time() - start, encoders)
    return results


def scored_dataset(opts: EvalOptions, stored: dict) -> tuple[str, str | None]:
    """(dataset, split_by) that `opts` scores, given the checkpoint's training options `stored`: --dataset or the
    checkpoint's; --split-by, else the checkpoint's on its own dataset, else the dataset's default partition."""
    dataset_name = opts.dataset or stored.get("dataset", "shapes")
    if opts.dataset and opts.dataset != stored.get("dataset"):
        return dataset_name, opts.split_by or DEFAULT_SPLIT_BY.get(dataset_name)
    return dataset_name, opts.split_by or stored.get("split_by") or DEFAULT_SPLIT_BY.get(dataset_name)


def split_scoring(opts: EvalOptions, dataset_name: str, model: maris.MARIS) -> Scoring:
    """The `Scoring` of `dataset_name` under the --nt-* options (`scoring_for`).

    Raises:
        SystemExit: --nt-* options for a dataset without no-target expressions, --nt-rule head without a
            head, bad --nt-* values, --eval-size for PhraseCut.
    """
    kind = metric_set(dataset_name)
    defaults = {f.name: f.default for f in dataclasses.fields(EvalOptions) if f.name.startswith("nt_")}
    changed = [name for name, default in defaults.items() if getattr(opts, name) != default]
    if kind != "gres" and changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise SystemExit(f"error: {flags}: {dataset_name} has no no-target expressions; the no-target decision "
                         f"applies to {' and '.join(GRES_DATASETS)}")
    if kind == "phrasecut" and opts.eval_size is not None:
        raise SystemExit("error: --eval-size: PhraseCut is scored at the original image size, as its official "
                         "evaluator (utils/evaluator.py) does; drop --eval-size")
    try:
        return scoring_for(dataset_name, model, nt_rule=opts.nt_rule, nt_min_pixels=opts.nt_min_pixels,
                           nt_threshold=opts.nt_threshold)
    except ValueError as e:
        raise SystemExit(f"error: --nt-*: {e}") from None


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
                 split_by: str | None, out_dir: pathlib.Path, seconds: float, encoders: dict | None = None) -> None:
    """Print the table (the dataset's metric set, in percent) and the protocol; write them, in percent, with
    the encoder files and hashes (`maris.check_encoders`), to
    <out_dir>/eval_<dataset>[_<split_by>][_from_<training dataset>[_<split_by>]][_sq<R>].json.

    The "_from_" part (a checkpoint scored on another dataset or partition than it was trained on) keeps the
    report apart from the one of its own dataset; title and JSON then name both datasets.
    """
    stored = ckpt.get("options", {})
    trained, trained_by = stored.get("dataset", "shapes"), stored.get("split_by")
    cross = (trained, trained_by) != (dataset_name, split_by)
    columns = METRIC_COLUMNS[metric_set(dataset_name)]
    title = _dataset_title(dataset_name, split_by)
    origin = f" (trained on {_dataset_title(trained, trained_by)})" if cross else ""
    print(f"{title}  checkpoint {opts.ckpt}{origin}  step {ckpt.get('step', '?')}")
    print(format_table(results, columns))
    print("protocol: " + "; ".join(f"{k}: {v}" for k, v in proto.items() if v is not None))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"eval_{dataset_name}" + (f"_{split_by}" if split_by and dataset_name != "shapes" else "")
    name += f"_from_{trained}" + (f"_{trained_by}" if trained_by else "") if cross else ""
    name += "" if opts.eval_size is None else f"_sq{opts.eval_size}"
    report = {"checkpoint": str(opts.ckpt), "step": ckpt.get("step"), "dataset": dataset_name, "split_by": split_by,
              "trained_on": {"dataset": trained, "split_by": trained_by, "split": stored.get("train_split")},
              "protocol": proto, "unit": "percent", "results": in_percent(results, columns),
              "encoders": encoders,
              "seconds": round(seconds, 2)}
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False))
    print(f"wrote {json_path}")


def _dataset_title(dataset: str, split_by: str | None) -> str:
    """"refcoco (unc)", "phrasecut", "shapes"."""
    return dataset + (f" ({split_by})" if split_by else "")


# --- A shareable model folder: evaluate.py --export ---

def export_model(opts: EvalOptions, ckpt: dict, model: maris.MARIS, *, world: int, device: torch.device,
                 encoders: dict) -> dict:
    """`--export DIR`: score the checkpoint's validation split (or --split) now, then write the model folder
    (`maris.write_model_folder`: config.json, model.safetensors, and the model card of `model_card`).

    Returns:
        {"folder": DIR, "results": {split: metrics as fractions}}.

    Raises:
        SystemExit: under torchrun, a folder that holds files, encoders that differ from the trained ones (the
            metrics would not be the model's), missing data for the scored split.
    """
    folder = pathlib.Path(opts.export)
    if world > 1:
        raise SystemExit("error: --export runs in one process; run it without torchrun")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise SystemExit(f"error: --export {folder}: the folder is not empty: expected a new or empty folder")
    differ = [name for name, entry in encoders.items() if entry["match"] is False]
    if differ:
        raise SystemExit(f"error: --export: the {' and '.join(differ)} weights differ from those the model was trained "
                         f"with, so the card's metrics would not be the model's: pass the encoder files it was "
                         f"trained with")
    stored = ckpt["options"]
    dataset_name, split_by = scored_dataset(opts, stored)
    splits = parse_splits(opts.split, dataset_name, split_by) if opts.split else [stored.get("val_split") or "val"]
    scored = dataclasses.replace(opts, split=splits, vis=0)
    results = score_splits(scored, ckpt, model, rank=0, device=device, encoders=encoders)
    columns = METRIC_COLUMNS[metric_set(dataset_name)]
    evaluation = {
        "dataset": dataset_name, "split_by": split_by, "splits": splits, "checkpoint": str(opts.ckpt),
        "date": time.strftime("%Y-%m-%d"), "unit": "percent", "results": in_percent(results, columns),
        "protocol": protocol(eval_size=opts.eval_size, threshold=opts.threshold, image_size=model.cfg.image_size,
                             scoring=split_scoring(scored, dataset_name, model),
                             context_length=model.cfg.context_length)}
    if not ckpt.get("encoders"):  # a checkpoint older than the hashes: record those of the encoders scored now
        ckpt = {**ckpt, "encoders": {name: {"file": e["file"], "sha256": e["sha256"]} for name, e in encoders.items()}}
        evaluation["encoders_hashed_at_export"] = True
    card = model_card(ckpt, evaluation, columns, folder.name)
    maris.write_model_folder(folder, ckpt, card=card, evaluation=evaluation)
    print(f"exported {folder}: {maris.MODEL_CONFIG}, {maris.MODEL_WEIGHTS}, README.md (metrics of "
          f"{', '.join(splits)} measured now)")
    return {"folder": str(folder), "results": results}


# Encoders in the model card: name, what they are, their licence and where the released files come from.
CARD_ENCODERS = {
    "sam": ("SAM image encoder", "Apache-2.0, Meta; https://github.com/facebookresearch/segment-anything"),
    "clip": ("CLIP text tower", "MIT, OpenAI; https://github.com/openai/CLIP"),
}


def model_card(ckpt: dict, evaluation: dict, columns: tuple[str, ...], name: str) -> str:
    """The README.md of a model folder: front matter the Hugging Face Hub reads (library, pipeline tag, tags,
    licence), what the model is, its training, the metrics measured at export with their protocol, the frozen
    encoders it needs (file names and sha256) and how to load it with this repository."""
    cfg, opts = ckpt["config"], ckpt["options"]
    trained_on = _dataset_title(opts.get("dataset", "shapes"), opts.get("split_by"))
    params = sum(v.numel() for v in ckpt["model"].values())
    needs_files = [k for k, e in ckpt["encoders"].items() if e and e.get("file")]
    rows = []
    for key, (what, licence) in CARD_ENCODERS.items():
        entry = ckpt["encoders"].get(key) or {}
        file = (pathlib.Path(entry["file"]).name if entry.get("file")
                else f"none: random, seeded by init_seed {cfg['init_seed']}")
        rows.append(f"| {what} | {file} | `{entry.get('sha256')}` | {licence} |")
    addons = [f"{k} {opts[k]}" for k in ("mask_grounding_weight", "alignment_weight", "no_target_weight")
              if opts.get(k)] + (["RISAM adapters"] if cfg.get("adapters") else [])
    table = format_table({s: {k: (None if v is None else v / 100 if k in columns else v) for k, v in m.items()}
                          for s, m in evaluation["results"].items()}, columns)
    proto = "\n".join(f"- {k}: {v}" for k, v in evaluation["protocol"].items() if v is not None)
    sam_flag = " --sam-checkpoint sam.pth" if "sam" in needs_files else ""
    clip_flag = " --clip-checkpoint clip.pt" if "clip" in needs_files else ""
    load_args = (", sam_checkpoint=\"sam.pth\"" if "sam" in needs_files else "") + (
        ", clip_checkpoint=\"clip.pt\"" if "clip" in needs_files else "")
    random_note = ("" if len(needs_files) == 2 else
                   "\nThe encoders without a file are random, rebuilt from `init_seed` in config.json (the hash check "
                   "confirms it): enough for the built-in synthetic shapes task, useless on photographs.\n")
    return f"""---
library_name: pytorch
pipeline_tag: image-segmentation
license: other
license_name: unspecified
tags:
- referring-image-segmentation
- maris
- segment-anything
- clip
---

# {name}: MARIS, trained on {trained_on}

A MARIS referring image segmentation model (Zhang et al., "Referring Image Segmentation via Mutual-Aware
Attention Features", arXiv 2311.15727): given an image and an expression such as "the dog on the left", it
predicts the mask of that object. Preset: SAM image size S = {cfg['image_size']}, SAM width D = {cfg['sam_embed_dim']},
text context length L = {cfg['context_length']}; {params:,} trainable parameters in `model.safetensors` (Feature
Enhancement, Mutual-Aware Attention, Mutual-Aware Mask Decoder and the other trained parts; fp32).

## Training

Dataset {trained_on}, split `{opts.get('train_split')}`; {ckpt.get('step')} optimizer steps, epoch {ckpt.get('epoch')} of
{opts.get('epochs')} completed, batch {opts.get('batch_size')} per process, AdamW lr {opts.get('lr')},
{opts.get('schedule')} schedule; add-ons: {', '.join(addons) or 'none (plain MARIS)'}. `config.json` holds the whole
`MarisConfig` and every training option.

## Evaluation, measured at export ({evaluation['date']})

{_dataset_title(evaluation['dataset'], evaluation['split_by'])}, split(s) {', '.join(evaluation['splits'])}, scored
from `{evaluation['checkpoint']}` by `evaluate.py --export` (percent):

```
{table}
```

Protocol:
{proto}

## Frozen encoders (not in this folder)

| encoder | file the model was trained with | sha256 of its weights | licence, source |
|---|---|---|---|
{chr(10).join(rows)}
{random_note}
Loading checks the encoders' weights against these hashes and refuses others.

## How to use (with the MARIS reference implementation)

```
python evaluate.py --ckpt {name}{sam_flag}{clip_flag} --image photo.jpg --text "the dog on the left"
python evaluate.py --ckpt {name}{sam_flag}{clip_flag}          # score the dataset's evaluation splits
python demo.py --ckpt {name}               # web demo (pip install -r requirements-demo.txt)
```

```python
import maris
from evaluate import predict

model = maris.load("{name}"{load_args})
mask = predict(model, "photo.jpg", "the dog on the left")  # bool numpy array (H, W)
```

Only `config.json` (JSON) and `model.safetensors` are read: loading runs no pickle.

## Licence

No licence was chosen at export: set `license:` above before sharing. The model was trained on top of SAM's image
encoder and CLIP's text tower (licences in the table above); their weights are not part of this folder. The
training data keeps its own terms.
"""


if __name__ == "__main__":
    main()
