"""Data for MARIS: CLIP BPE tokenizer, SAM image/mask transforms, RefCOCO-family datasets read
straight from the `refer` file layout, the generalized datasets gRefCOCO (one, several or no
target per expression) and PhraseCut, and the built-in synthetic "shapes" / "shapes-gres" datasets.

Everything between files on disk and the tensors the model eats. Every dataset
item is one dict with the same keys in every split (see `_make_item`).

Shape letters: B batch, S padded input side, L text tokens (context length), H x W an original
image, h2 x w2 the image after resizing its longest side to S.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import html
import json
import os
import pathlib
import pickle
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import NamedTuple

import ftfy
import numpy as np
import regex
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

# ============================================================================================
# --- CLIP byte-level BPE tokenizer (input of MARIS's frozen CLIP text encoder) ---
# ============================================================================================
# Algorithm after OpenAI CLIP simple_tokenizer.py (MIT); written anew here.

VOCAB_PATH = pathlib.Path(__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
SOT_ID, EOT_ID, PAD_ID = 49406, 49407, 0
VOCAB_SIZE = 49408
# How many merges to read: CLIP's BPE was trained to a budget of 49152 symbols, of which 256 are
# the byte symbols and 2 the special tokens, leaving 49152 - 256 - 2 = 48894 merges. Line 0 of the
# file is a version header, so the merges are lines 1 .. 48894 (the slice [1 : 49152-256-2+1]).
# Vocabulary: 256 bytes + 256 bytes-with-"</w>" + 48894 merges + SOT + EOT = 49408 = VOCAB_SIZE.
NUM_MERGES = 49152 - 256 - 2
# Same pre-tokenisation regex as CLIP: special tokens, English contractions, letter runs, single
# digits, runs of other non-space symbols.
_PRETOKEN_RE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte 0..255 to a printable unicode character (BPE never sees raw whitespace).

    Printable Latin-1 bytes map to themselves; the remaining 68 bytes map to code points 256+.
    The dict order (printable bytes first, then the rest) is the order of the first 256 token ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def clean_text(text: str) -> str:
    """CLIP's text normalisation: ftfy fix, HTML-unescape twice, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
    """CLIP's byte-level BPE (Radford et al. 2021), bit-exact with OpenAI's `simple_tokenizer.py`.

    Args:
        vocab_path: the gzipped merges file `bpe_simple_vocab_16e6.txt.gz`.
    Raises:
        FileNotFoundError: the vocabulary file is missing.
        ValueError: its sha256 differs from CLIP's released file.
    """

    def __init__(self, vocab_path: str | pathlib.Path = VOCAB_PATH):
        vocab_path = pathlib.Path(vocab_path)
        if not vocab_path.is_file():
            raise FileNotFoundError(f"CLIP BPE vocabulary {vocab_path} not found (it ships with this repository)")
        raw = vocab_path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest != VOCAB_SHA256:
            raise ValueError(
                f"CLIP BPE vocabulary {vocab_path} has sha256 {digest}, expected {VOCAB_SHA256} "
                "(CLIP's bpe_simple_vocab_16e6.txt.gz, 1,356,917 bytes)"
            )
        lines = gzip.decompress(raw).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        # Id order matters for bit-exactness: bytes, bytes + "</w>", merges, then SOT, EOT.
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        # As in OpenAI's tokenizer, the special tokens written literally in a text are not split
        # by BPE: they encode to SOT / EOT (the pre-tokenisation regex keeps them whole).
        self._cache: dict[str, tuple[str, ...]] = {t: (t,) for t in ("<|startoftext|>", "<|endoftext|>")}

    def bpe(self, token: str) -> tuple[str, ...]:
        """Merge the symbols of one pre-token, lowest-ranked pair first, until no merge applies."""
        if token in self._cache:
            return self._cache[token]
        # The last symbol carries the end-of-word marker, so "cat" inside "cats" differs from "cat".
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:]))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every non-overlapping occurrence, left to right
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self._cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without SOT/EOT."""
        ids = []
        for piece in _PRETOKEN_RE.findall(clean_text(text)):
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(symbols))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` (each word followed by a space, as CLIP's decoder does)."""
        text = "".join(self.decoder[int(i)] for i in ids)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")


@lru_cache(maxsize=1)
def get_tokenizer() -> ClipTokenizer:
    """The shared tokenizer over the repository's vocabulary (built once per process)."""
    return ClipTokenizer(VOCAB_PATH)


def tokenize(texts: str | list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize expressions into fixed-length id rows plus the word mask.

    Args:
        texts: one string or a list of B strings (empty and non-ASCII strings are fine).
        context_length: L, the row length (at least 2: SOT and EOT).
    Returns:
        ids LongTensor (B, L): SOT, tokens, EOT, then PAD_ID; an overflowing expression keeps SOT,
        is cut, and gets EOT in the last slot (CLIP's `truncate=True`), with one
        `TextTruncatedWarning` per call saying how many tokens were kept (`fit_text` gives the text read).
        word_mask BoolTensor (B, L): True from SOT through EOT. Built from the lengths, never from
        `ids == 0`, because id 0 is the real token "!".
    Raises:
        ValueError: context_length < 2.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (SOT and EOT), got {context_length}")
    if isinstance(texts, str):
        texts = [texts]
    tok = get_tokenizer()
    ids = torch.full((len(texts), context_length), PAD_ID, dtype=torch.long)  # (B, L)
    lengths = torch.zeros(len(texts), dtype=torch.long)  # (B,)
    cut = []  # (row, text tokens) of every expression longer than L - 2 text tokens
    for b, text in enumerate(texts):
        tokens = tok.encode(text)
        row = [SOT_ID, *tokens, EOT_ID]
        if len(row) > context_length:
            row = row[:context_length]
            row[-1] = EOT_ID
            cut.append((b, len(tokens)))
        ids[b, : len(row)] = torch.tensor(row)
        lengths[b] = len(row)
    word_mask = torch.arange(context_length)[None, :] < lengths[:, None]  # (B, L)
    if cut:
        _warn_cut(texts, cut, context_length)
    return ids, word_mask


def decode(ids: torch.Tensor) -> str | list[str]:
    """Text of id rows from `tokenize`: SOT dropped, cut at the first EOT, outer spaces stripped.

    Args:
        ids: LongTensor (L,) or (B, L).
    Returns:
        str for (L,), list of B str for (B, L).
    """
    if ids.dim() == 1:
        row = ids.tolist()
        if row and row[0] == SOT_ID:
            row = row[1:]
        if EOT_ID in row:
            row = row[: row.index(EOT_ID)]
        return get_tokenizer().decode(row).strip()
    return [decode(r) for r in ids]


# --- Expressions longer than the context length: say so, and say what the model reads ---

class TextTruncatedWarning(UserWarning):
    """An expression had more tokens than the context length L holds; the model reads only the first ones."""


class FittedText(NamedTuple):
    """What the model reads of one expression (`fit_text`). Token counts leave out SOT and EOT."""

    text: str  # the kept tokens decoded (CLIP's cleaned, lower-cased form)
    kept: int  # tokens the model reads: min(total, L - 2)
    total: int  # tokens of the whole expression

    @property
    def cut(self) -> bool:
        return self.kept < self.total


def fit_text(text: str, context_length: int) -> FittedText:
    """The part of `text` that fits in a `tokenize(text, context_length)` row, decoded, with token counts.

    Args:
        text: one expression.  context_length: L (at least 2).
    Returns:
        FittedText(text, kept, total): `text` is `decode` of the kept ids, so it is what the model reads.
    Raises:
        ValueError: context_length < 2.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (SOT and EOT), got {context_length}")
    tokens = get_tokenizer().encode(text)
    kept = tokens[: context_length - 2]  # the same cut as `tokenize`: SOT + kept + EOT = L
    return FittedText(get_tokenizer().decode(kept).strip(), len(kept), len(tokens))


def _warn_cut(texts: list[str], cut: list[tuple[int, int]], context_length: int) -> None:
    """One TextTruncatedWarning for a `tokenize` call that cut `cut` = [(row, tokens), ...]."""
    keep = context_length - 2
    if len(texts) == 1:
        read = fit_text(texts[0], context_length).text
        message = (f"expression cut to the context length L = {context_length}: the model reads {keep} of its "
                   f"{cut[0][1]} tokens: \"{read}\"")
    else:
        first, tokens = cut[0]
        message = (f"{len(cut)} of {len(texts)} expressions are longer than the context length L = {context_length} "
                   f"and were cut to {keep} tokens (the longest has {max(n for _, n in cut)}; the first cut is "
                   f"#{first}, kept {keep} of {tokens}); data.fit_text(text, L) gives what the model reads")
    warnings.warn(message, TextTruncatedWarning, stacklevel=3)  # points at the caller of tokenize


# ============================================================================================
# --- SAM transforms: resize longest side, normalise, pad (SAM's ResizeLongestSide) ---
# ============================================================================================

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def resize_longest_side(h: int, w: int, size: int) -> tuple[int, int]:
    """(h2, w2) with the longest side equal to `size`, rounding as SAM's get_preprocess_shape."""
    scale = size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def transform_image(image: Image.Image | np.ndarray, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM's image preprocessing.

    Resize the longest side to S keeping the aspect ratio, normalise with SAM's pixel mean/std,
    then pad bottom/right with zeros (i.e. the mean colour) to S x S.
    The resize is PIL's BILINEAR, which widens its filter when shrinking (antialiased): exactly
    what SAM's own `ResizeLongestSide.apply_image` does through torchvision's PIL path.

    Args:
        image: PIL image (any mode, converted by `load_rgb`; orientation as given) or uint8 array (H, W, 3).
        size: S.
    Returns:
        FloatTensor (3, S, S) and the resized size (h2, w2).
    Raises:
        ValueError: an array that is not uint8 (H, W, 3).
    """
    # NOTE(paper): MARIS feeds SAM's encoder, so it takes SAM's preprocessing unchanged.
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"transform_image expects a uint8 (H, W, 3) array, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    image = load_rgb(image)  # 16-bit grey scaled, transparency composited (not image.convert("RGB"))
    h2, w2 = resize_longest_side(image.height, image.width, size)
    resized = np.asarray(image.resize((w2, h2), Image.BILINEAR), dtype=np.float32)  # (h2, w2, 3)
    x = torch.from_numpy(resized).permute(2, 0, 1)  # (3, h2, w2)
    x = (x - torch.tensor(SAM_PIXEL_MEAN)[:, None, None]) / torch.tensor(SAM_PIXEL_STD)[:, None, None]
    return F.pad(x, (0, size - w2, 0, size - h2)), (h2, w2)  # (3, S, S)


def transform_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """The image transform's geometry applied to a mask: nearest resize, zero padding.

    Args:
        mask: bool/uint8 array (H, W); nonzero = object.
        size: S.
    Returns:
        FloatTensor (S, S) with values in {0, 1}; the padding is 0.
    """
    h, w = mask.shape
    h2, w2 = resize_longest_side(h, w, size)
    pil = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
    resized = np.asarray(pil.resize((w2, h2), Image.NEAREST)) > 0  # (h2, w2)
    out = torch.zeros(size, size)
    out[:h2, :w2] = torch.from_numpy(resized).float()
    return out


def invert_transform(x: torch.Tensor, input_size, orig_size) -> torch.Tensor:
    """Undo the transform for a prediction: crop the padding, bilinear-resize to the original size.

    Apply it to logits or probabilities and threshold afterwards (as SAM's postprocess_masks).

    Args:
        x: float Tensor (..., S, S).
        input_size: (h2, w2) from the transform (ints or a LongTensor (2,)).
        orig_size: (H, W) of the original image.
    Returns:
        Tensor (..., H, W).
    """
    h2, w2 = (int(v) for v in input_size)
    H, W = (int(v) for v in orig_size)
    lead = x.shape[:-2]
    x = x[..., :h2, :w2].reshape(-1, 1, h2, w2).float()  # (N, 1, h2, w2)
    x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)  # (N, 1, H, W)
    return x.reshape(*lead, H, W)


def valid_mask(input_size, size: int) -> torch.Tensor:
    """True on the image pixels of the padded S x S input, False on the padding.

    Args:
        input_size: (h2, w2) or LongTensor (B, 2).
        size: S.
    Returns:
        BoolTensor (S, S) for one size, (B, S, S) for a batch.
    """
    sizes = torch.as_tensor(input_size, dtype=torch.long)
    single = sizes.dim() == 1
    sizes = sizes.reshape(-1, 2)  # (B, 2)
    r = torch.arange(size)
    rows = r[None, :, None] < sizes[:, 0, None, None]  # (B, S, 1)
    cols = r[None, None, :] < sizes[:, 1, None, None]  # (B, 1, S)
    out = rows & cols  # (B, S, S)
    return out[0] if single else out


# ============================================================================================
# --- Reading images: EXIF orientation and pixel modes -> the 8-bit RGB picture the model sees ---
# ============================================================================================
# Orientation. Cameras and phones often store a portrait photo as a landscape bitmap plus an EXIF
# Orientation tag (2..8: mirror and/or rotate) that viewers apply. A user's photo is turned upright
# before the model reads "on the left" in it (`exif_transpose=True`, PIL's ImageOps.exif_transpose).
# Dataset images are read as stored (`exif_transpose=False`), because that is the frame their ground
# truth is drawn in:
# - COCO's instances.json records each file's stored width x height, and the refer API rasterises the
#   masks at that size (refer.py getMask: frPyObjects(seg, height, width)); the RIS training code that
#   pairs them with pixels (LAVT's and its descendants' refer datasets) reads the image with PIL's
#   Image.open(...).convert("RGB"), which does not apply the tag.
# - PhraseCut draws its masks at image_data_split.json's width x height and its own viewer reads the
#   picture with PIL's Image.open, without exif_transpose (PhraseCutDataset utils/visualize_utils.py).
# - No COCO image needs turning: detectron2 applies exif_transpose to every image it reads and checks
#   the result against instances.json's size (detection_utils.check_image_size), and it trains on COCO
#   without size errors, so no COCO file carries a 90-degree tag.
# A file that carries a tag anyway is used as stored (turning it would misalign its masks, and a
# 90-degree turn swaps width and height against the annotation), with an ExifOrientationWarning.

EXIF_ORIENTATION_TAG = 0x0112  # 274: the EXIF / TIFF Orientation tag
# Transparent pixels are laid over SAM's pixel mean, which normalises to (almost) 0: the value of the
# padding, i.e. what the model already sees where there is no picture.
TRANSPARENT_BACKGROUND = tuple(round(v) for v in SAM_PIXEL_MEAN)  # (124, 116, 104)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_16_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # unsigned 16-bit grey (PNG/TIFF 16-bit open as these)


class ExifOrientationWarning(UserWarning):
    """An image file carries an EXIF Orientation tag that `load_rgb(..., exif_transpose=False)` leaves unapplied."""


def exif_orientation(image: Image.Image) -> int:
    """EXIF Orientation of a PIL image: 1 = upright as stored (also when absent or invalid), 2..8 = mirror/turn."""
    value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def load_rgb(source: str | os.PathLike | Image.Image, *, exif_transpose: bool = False) -> Image.Image:
    """The 8-bit RGB picture the model sees, from an image file or a PIL image.

    Orientation: `exif_transpose=True` turns the picture upright as its EXIF Orientation tag says
    (PIL's ImageOps.exif_transpose): for a user's photos (single-image mode, prediction). The default
    keeps the stored pixels: for dataset images, whose masks and recorded sizes refer to the stored
    pixels (COCO/refer, PhraseCut; see the comment above); a file whose tag is left unapplied raises an
    `ExifOrientationWarning`.

    Modes: RGB as is; L, 1, P, CMYK, YCbCr, HSV, LAB through PIL's `convert("RGB")`.
    Transparency (RGBA, LA, PA, P or RGB with a transparent colour) is composited over
    `TRANSPARENT_BACKGROUND`, SAM's pixel mean (the padding's colour to the model).
    Grey images wider than 8 bits become grey RGB: 16-bit (I;16, I;16B, ...) on the full 16-bit
    scale, v / 257 rounded (65535 -> 255, 32768 -> 128: the 8-bit value a viewer shows); 32-bit I
    with values in 0..65535 on the same scale (16-bit PNG/TIFF files open as I in some readers);
    float F in [0, 1] times 255, F in [0, 255] as is (PIL's own float scale). Other values (negative,
    above those ranges) have no standard white point: they are stretched from their own min..max to
    0..255 (a constant picture is black), with a UserWarning.

    Args:
        source: path of an image file, or a PIL image (any mode; it is not modified).
        exif_transpose: apply the EXIF Orientation tag (True) or keep the stored pixels (False).
    Returns:
        PIL image, mode "RGB"; size (W, H) as stored, or turned by the tag when exif_transpose is set.
    Raises:
        FileNotFoundError: no such file. ValueError: an unreadable or corrupt file, a mode with no RGB
            conversion, or NaN / infinite pixels in a float image (the message names the file).
    """
    if isinstance(source, Image.Image):
        return _to_rgb(source, "image", exif_transpose=exif_transpose, warn_orientation=False)
    path = pathlib.Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found")
    try:
        with Image.open(path) as img:
            img.load()  # decode inside the try: a truncated file fails here, named
            return _to_rgb(img, str(path), exif_transpose=exif_transpose, warn_orientation=True)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"image {path} is corrupt or not an image ({e}): expected a picture file that Pillow "
                         f"reads (JPEG, PNG, TIFF, WebP, ...)") from None


def _to_rgb(img: Image.Image, name: str, *, exif_transpose: bool, warn_orientation: bool) -> Image.Image:
    """`load_rgb` after opening: orientation, then the mode rules."""
    if exif_transpose:
        img = ImageOps.exif_transpose(img)  # a turned copy without the tag (a plain copy when upright)
    elif warn_orientation and exif_orientation(img) != 1:
        warnings.warn(f"image {name} carries EXIF Orientation {exif_orientation(img)}; it is read as stored "
                      "(dataset masks refer to the stored pixels)", ExifOrientationWarning, stacklevel=3)
    mode = img.mode
    if mode in _16_BIT_MODES or mode in ("I", "F"):
        grey = _grey_to_uint8(np.asarray(img), mode, name)  # (H, W) uint8
        return Image.fromarray(grey).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        img = img.convert("LA") if mode == "La" else img  # PIL converts premultiplied La only to LA
        background = Image.new("RGBA", img.size, (*TRANSPARENT_BACKGROUND, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ValueError(f"image {name}: mode {mode} has no conversion to RGB ({e})") from None


def _grey_to_uint8(values: np.ndarray, mode: str, name: str) -> np.ndarray:
    """(H, W) pixels of a 16-bit, 32-bit or float grey image on the 8-bit scale (rules in `load_rgb`)."""
    v = values.astype(np.float64)
    if not np.isfinite(v).all():
        raise ValueError(f"image {name}: mode {mode} holds NaN or infinite pixels; expected finite values")
    lo, hi = float(v.min()), float(v.max())
    if mode in _16_BIT_MODES or (mode == "I" and lo >= 0 and hi <= 65535):
        v = v / 257  # 65535 / 255 = 257: the 8-bit value k, widened to 16 bits as k * 257, maps back to k
    elif mode == "F" and lo >= 0 and hi <= 1:
        v = v * 255
    elif not (mode == "F" and lo >= 0 and hi <= 255):
        warnings.warn(f"image {name}: mode {mode} pixels span {lo:g}..{hi:g}, outside the usual ranges; "
                      "stretched to black..white", UserWarning, stacklevel=4)
        v = (v - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(v)
    return np.rint(v).clip(0, 255).astype(np.uint8)


def _make_item(index, image_t, mask, orig_size, ids, word_mask, image_size, ref_id, sent_id, image_id, sentence,
               no_target=False):
    """The one item dict shared by every dataset (same keys in every split).

    `image_t` is the transformed image (3, S, S) or None (load_images=False: an empty tensor, shape (0,)).
    `mask` is the original-resolution bool mask or None (load_masks=False: an empty tensor, shape (0,);
    evaluation scores against `original_mask` and needs no padded copy).
    `no_target` is True for an expression that refers to nothing (gRefCOCO `ann_id == [-1]`,
    shapes-gres); False everywhere else, so batches of every dataset have the same keys.
    """
    H, W = orig_size
    input_size = resize_longest_side(H, W, image_size)
    if image_t is None:
        image_t = torch.zeros(0)
    return {
        "image": image_t,  # (3, S, S) or (0,)
        "mask": torch.zeros(0) if mask is None else transform_mask(mask, image_size),  # (S, S) or (0,)
        "ids": ids,  # (L,)
        "word_mask": word_mask,  # (L,)
        "orig_size": torch.tensor([H, W], dtype=torch.long),
        "input_size": torch.tensor(input_size, dtype=torch.long),
        "ref_id": int(ref_id),
        "sent_id": int(sent_id),
        "image_id": int(image_id),
        "sentence": sentence,
        "index": int(index),
        "no_target": bool(no_target),
    }


class _TransformedImages:
    """The last few transformed images of a dataset, by image id.

    Image-grouped batches (see `ImageGroupedBatchSampler`) hold several sentences of one picture;
    with this cache each picture is decoded and resized once per batch, not once per sentence.
    Each DataLoader worker holds its own copy, and a batch is built by one worker.
    """

    def __init__(self, load_image, image_size: int, capacity: int = 16):
        self.load_image, self.image_size, self.capacity = load_image, image_size, capacity
        self.entries: dict[int, torch.Tensor] = {}  # insertion order = age

    def __call__(self, image_id: int) -> torch.Tensor:
        """(3, S, S) normalised, padded image `image_id`."""
        if image_id not in self.entries:
            if len(self.entries) >= self.capacity:
                self.entries.pop(next(iter(self.entries)))  # drop the oldest
            self.entries[image_id] = transform_image(self.load_image(image_id), self.image_size)[0]
        return self.entries[image_id]


# ============================================================================================
# --- RefCOCO, RefCOCO+, G-Ref in the refer layout (the refer API's files) ---
# ============================================================================================

# Dataset name -> its partitions (split_by); PhraseCut has none (None, like shapes).
DATASETS = {"refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google"),
            "grefcoco": ("unc",), "phrasecut": (None,)}
REFER_DATASETS = ("refcoco", "refcoco+", "refcocog")  # the ones RefDataset reads (refs(<split_by>).p)
SPLITS = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco", "google"): ("train", "val", "test"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
    ("grefcoco", "unc"): ("train", "val", "testA", "testB"),
    ("phrasecut", None): ("train", "val", "test", "miniv"),
}
# NOTE(paper): the paper does not state L; 20 (RefCOCO/+) and 30 (G-Ref, longer expressions) follow
# the LAVT/CRIS convention; gRefCOCO takes ReLA's REFERRING.MAX_TOKENS = 20; PhraseCut's phrases
# are short (a name, attributes, a relation). Override with `context_length`.
DEFAULT_CONTEXT_LENGTH = {"refcoco": 20, "refcoco+": 20, "refcocog": 30, "shapes": 20,
                          "grefcoco": 20, "phrasecut": 20, "shapes-gres": 20}  # L per dataset
_WHERE_FROM = (
    "Expected the refer layout: <root>/<dataset>/refs(<split_by>).p and <root>/<dataset>/instances.json, "
    "images under <root>/images/mscoco/images/train2014/COCO_train2014_<12-digit id>.jpg. "
    "RefCOCO, RefCOCO+ and RefCOCOg annotations come from the refer project "
    "(https://github.com/lichengunc/refer, data at the links in its README); the images are "
    "COCO train2014 (https://cocodataset.org)."
)


def _require_file(path: pathlib.Path, where: str = _WHERE_FROM) -> pathlib.Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found. {where}")
    return path


# Parsed files are cached per (path, mtime): refcoco unc and google share one instances.json
# (~100 MB for the real data), and train/val/test datasets share one refs file.
@lru_cache(maxsize=4)
def _read_instances(path: str, mtime_ns: int) -> tuple[dict, dict]:
    """instances.json -> ({image id: image entry}, {annotation id: annotation})."""
    try:
        with open(path, encoding="utf-8") as f:
            coco = json.load(f)
        images = {img["id"]: img for img in coco["images"]}
        anns = {ann["id"]: ann for ann in coco["annotations"]}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a COCO instances file with 'images' and 'annotations' ({e!r})") from None
    return images, anns


@lru_cache(maxsize=8)
def _read_refs(path: str, mtime_ns: int) -> list[dict]:
    """refs(<split_by>).p -> the list of ref dicts."""
    try:
        with open(path, "rb") as f:
            refs = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise ValueError(f"{path} is not a refer refs pickle ({e!r})") from None
    if not isinstance(refs, list):
        raise ValueError(f"{path} should hold a list of ref dicts, got {type(refs).__name__}")
    return refs


def _cached(reader, path: pathlib.Path):
    return reader(str(path), path.stat().st_mtime_ns)


def annotation_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """Binary mask (H, W) of one COCO annotation at the original resolution.

    Polygons go through pycocotools frPyObjects + decode; uncompressed and compressed RLE work too.
    The object's parts are united (`> 0` over all of them).

    Raises:
        ValueError: a segmentation pycocotools cannot read (names the annotation id).
    """
    seg = ann.get("segmentation")
    try:
        if isinstance(seg, list):  # polygons [[x0, y0, x1, y1, ...], ...]
            rles = mask_utils.frPyObjects(seg, height, width)
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
            rles = [mask_utils.frPyObjects(seg, height, width)]
        elif isinstance(seg, dict):  # compressed RLE
            rles = [seg]
        else:
            raise TypeError(f"unsupported segmentation type {type(seg).__name__}")
        with warnings.catch_warnings():  # pycocotools' own numpy-2 deprecation, not ours to fix
            warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
            m = mask_utils.decode(rles)  # (H, W, parts)
    except Exception as e:  # pycocotools raises bare Exceptions from C code
        raise ValueError(f"annotation {ann.get('id')}: cannot decode its segmentation ({e})") from None
    return m.reshape(height, width, -1).max(axis=2) > 0


class RefDataset(Dataset):
    """RefCOCO / RefCOCO+ / G-Ref referring segmentation, one item per (ref, sentence).

    Reads `refs(<split_by>).p` and `instances.json` directly (no refer.py). The text is each
    sentence's `sent` field. Splits follow the refer API: `test` selects every split whose name
    contains "test" (testA + testB for the unc partitions).

    Args:
        root: the refer data root (holds refcoco/, refcoco+/, refcocog/, images/).
        dataset: "refcoco", "refcoco+" or "refcocog".
        split_by: partition; default unc / unc / umd.
        split: e.g. "train", "val", "testA", "testB", "test".
        image_size: S.
        context_length: L; default 20 for RefCOCO/+, 30 for G-Ref.
        image_dir: default <root>/images/mscoco/images/train2014.
        load_images: False skips reading pixels (item "image" is an empty tensor).
        load_masks: False skips decoding the ground truth (item "mask" is an empty tensor).
    Raises:
        ValueError: unknown dataset / split_by / split, unreadable files, a ref naming a missing
            annotation or image id. FileNotFoundError: a missing annotation file.
    """

    where_from = _WHERE_FROM  # the expected layout, named in missing-file errors

    def __init__(self, root, dataset="refcoco", split_by=None, split="train", image_size=1024,
                 context_length=None, image_dir=None, load_images=True, load_masks=True):
        if dataset not in REFER_DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(REFER_DATASETS)}")
        split_by = split_by or DATASETS[dataset][0]
        if split_by not in DATASETS[dataset]:
            raise ValueError(f"unknown split_by {split_by!r} for {dataset}; expected one of {DATASETS[dataset]}")
        names = SPLITS[(dataset, split_by)]
        allowed = names + (("test",) if any("test" in s for s in names) and "test" not in names else ())
        if split not in allowed:
            raise ValueError(f"unknown split {split!r} for {dataset} ({split_by}); expected one of {allowed}")
        self.root = pathlib.Path(root)
        self.dataset, self.split_by, self.split = dataset, split_by, split
        self.image_source = "mscoco-train2014"  # COCO ids: every RefCOCO-family split shares one feature cache
        self.image_size = image_size
        self.context_length = context_length or DEFAULT_CONTEXT_LENGTH[dataset]
        self.image_dir = pathlib.Path(image_dir) if image_dir else self.root / "images/mscoco/images/train2014"
        self.load_images, self.load_masks = load_images, load_masks

        refs_path = _require_file(self.root / dataset / f"refs({split_by}).p")
        inst_path = _require_file(self.root / dataset / "instances.json")
        all_refs = _cached(_read_refs, refs_path)
        images, anns = _cached(_read_instances, inst_path)
        # refer's getRefIds: "test" matches testA/testB/..., any other name must be equal.
        refs = [r for r in all_refs if (split in r["split"] if split == "test" else r["split"] == split)]
        for r in refs:
            if r["ann_id"] not in anns:
                raise ValueError(f"{refs_path}: ref {r['ref_id']} names annotation id {r['ann_id']}, "
                                 f"which {inst_path} does not contain")
            if r["image_id"] not in images:
                raise ValueError(f"{refs_path}: ref {r['ref_id']} names image id {r['image_id']}, "
                                 f"which {inst_path} does not contain")
        # Keep only what this split needs; the parsed files stay in the shared cache.
        self.refs = refs
        self.anns = {r["ann_id"]: anns[r["ann_id"]] for r in refs}
        self.images = {r["image_id"]: images[r["image_id"]] for r in refs}
        # NOTE(paper): the text is `sent` (refer's cleaned, lower-cased form), as CRIS/LAVT read it.
        self.items = [(r, s) for r in refs for s in r["sentences"]]  # one item per (ref, sentence)
        self.image_ids = [r["image_id"] for r, _ in self.items]
        self.sentences = [s["sent"] for _, s in self.items]
        self.ids, self.word_mask = tokenize(self.sentences, self.context_length)  # (N, L) each
        self._images = _TransformedImages(self.load_image, image_size)

    def __len__(self) -> int:
        return len(self.items)

    def image_path(self, image_id: int) -> pathlib.Path:
        """Path of an image's file (COCO's file_name, or COCO_train2014_%012d.jpg)."""
        name = self.images[image_id].get("file_name") or f"COCO_train2014_{image_id:012d}.jpg"
        return self.image_dir / name

    def load_image(self, image_id: int) -> Image.Image:
        """The original RGB image as stored (see `load_rgb`), checked against the size in instances.json."""
        path = self.image_path(image_id)
        if not path.is_file():
            raise FileNotFoundError(f"image {path} not found. {self.where_from}")
        img = load_rgb(path)  # stored orientation: the frame of instances.json's sizes and polygons
        entry = self.images[image_id]
        if (img.height, img.width) != (entry["height"], entry["width"]):
            raise ValueError(f"image {path} is {img.width}x{img.height}, but instances.json "
                             f"records {entry['width']}x{entry['height']} for image {image_id}")
        return img

    def original_mask(self, index: int) -> np.ndarray:
        """Ground-truth mask of item `index` at the original resolution, bool (H, W)."""
        ref, _ = self.items[index]
        entry = self.images[ref["image_id"]]
        return annotation_mask(self.anns[ref["ann_id"]], entry["height"], entry["width"])

    def __getitem__(self, index: int) -> dict:
        ref, sent = self.items[index]
        entry = self.images[ref["image_id"]]
        image = self._images(ref["image_id"]) if self.load_images else None
        mask = self.original_mask(index) if self.load_masks else None
        return _make_item(index, image, mask, (entry["height"], entry["width"]),
                          self.ids[index], self.word_mask[index], self.image_size,
                          ref["ref_id"], sent["sent_id"], ref["image_id"], sent["sent"])


# ============================================================================================
# --- gRefCOCO: generalized referring expressions (one, several or no target) ---
# ============================================================================================
# Liu, Ding, Jiang, "GRES: Generalized Referring Expression Segmentation", CVPR 2023. The files
# follow the official download (henghuiding/gRefCOCO, read by its grefer.py and ReLA's loader):
# refs like RefCOCO's, but `ann_id` is a list of COCO annotation ids and `[-1]` means no target.

_GREFCOCO_WHERE = (
    "Expected the gRefCOCO layout: <root>/grefcoco/grefs(unc).json (or grefs(unc).p) and "
    "<root>/grefcoco/instances.json, images under <root>/images/train2014/COCO_train2014_<12-digit id>.jpg. "
    "gRefCOCO comes from https://github.com/henghuiding/gRefCOCO (download links in its README); the "
    "images are COCO train2014 (https://cocodataset.org)."
)
NO_TARGET_ANN_IDS = [-1]  # gRefCOCO's ann_id of an expression that refers to nothing


@lru_cache(maxsize=8)
def _read_json_list(path: str, mtime_ns: int, what: str) -> list:
    """A JSON file holding a list (`what` names the expected content in errors)."""
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not {what} ({e!r})") from None
    if not isinstance(content, list):
        raise ValueError(f"{path} should hold {what} (a JSON list), got {type(content).__name__}")
    return content


class GRefDataset(RefDataset):
    """gRefCOCO referring segmentation, one item per (ref, sentence); expressions may refer to one,
    several or no object (GRES, CVPR 2023).

    Reads `grefs(unc).p` when it exists, else `grefs(unc).json` (grefer.py's order), and
    `instances.json`. Per ref: `ann_id` is a list (an older scalar is wrapped); `[-1]` marks a
    no-target expression, whose ground truth is all zeros and whose item has `no_target` True.
    Otherwise the ground truth is the union (logical OR) of the referred annotations' masks at the
    original resolution, crowd annotations dropped (grefer.py `getMaskByRef(merge=True)`, ReLA's
    loader); a ref whose annotations are all crowd has an empty mask with `no_target` False, as in
    ReLA. Refs without sentences give no item. The image comes from `image_id` (the ref's
    `file_name` may carry a `_<n>` suffix no file has), checked against instances.json's size.
    Same item dict as RefDataset (`no_target` set). A RefDataset subclass: the pictures are COCO
    train2014 with the same image ids, so code keyed on the image source treats them alike.

    Args:
        root: the data root (holds grefcoco/ and images/train2014/).
        split: "train", "val", "testA" or "testB" (exact names, as grefer.py's getRefIds).
        image_size: S. context_length: L (default 20).
        image_dir: default <root>/images/train2014.
        load_images, load_masks: as RefDataset.
    Raises:
        FileNotFoundError: grefs(unc).json/.p or instances.json missing (the layout is named).
        ValueError: unknown split; unreadable files; a ref naming an annotation or image id that
            instances.json lacks, an annotation of another image, or -1 mixed with real ids.
    """

    where_from = _GREFCOCO_WHERE

    def __init__(self, root, split="train", image_size=1024, context_length=None, image_dir=None,
                 load_images=True, load_masks=True):
        names = SPLITS[("grefcoco", "unc")]
        if split not in names:
            raise ValueError(f"unknown split {split!r} for grefcoco (unc); expected one of {names}")
        self.root = pathlib.Path(root)
        self.dataset, self.split_by, self.split = "grefcoco", "unc", split
        self.image_source = "mscoco-train2014"  # COCO train2014 ids, as the RefCOCO family: one feature cache
        self.image_size = image_size
        self.context_length = context_length or DEFAULT_CONTEXT_LENGTH["grefcoco"]
        self.image_dir = pathlib.Path(image_dir) if image_dir else self.root / "images/train2014"
        self.load_images, self.load_masks = load_images, load_masks

        folder = self.root / "grefcoco"
        pickled = folder / "grefs(unc).p"
        if pickled.is_file():  # grefer.py prefers the pickle when both exist
            refs_path, all_refs = pickled, _cached(_read_refs, pickled)
        else:
            refs_path = _require_file(folder / "grefs(unc).json", _GREFCOCO_WHERE)
            all_refs = _cached(partial(_read_json_list, what="a gRefCOCO refs list"), refs_path)
        inst_path = _require_file(folder / "instances.json", _GREFCOCO_WHERE)
        images, anns = _cached(_read_instances, inst_path)
        refs = []
        for r in all_refs:
            if r["split"] != split:
                continue
            ann_ids = [int(a) for a in (r["ann_id"] if isinstance(r["ann_id"], list) else [r["ann_id"]])]
            where = f"{refs_path}: ref {r['ref_id']}"
            if r["image_id"] not in images:
                raise ValueError(f"{where} names image id {r['image_id']}, which {inst_path} does not contain")
            if -1 in ann_ids and ann_ids != NO_TARGET_ANN_IDS:
                raise ValueError(f"{where} mixes the no-target id -1 with annotation ids {ann_ids}")
            for a in ann_ids:
                if a != -1 and a not in anns:
                    raise ValueError(f"{where} names annotation id {a}, which {inst_path} does not contain")
                if a != -1 and anns[a]["image_id"] != r["image_id"]:
                    raise ValueError(f"{where} (image {r['image_id']}) names annotation {a} of image "
                                     f"{anns[a]['image_id']}")
            refs.append({**r, "ann_id": ann_ids})  # a copy: the cached list stays as read
        self.refs = refs
        self.anns = {a: anns[a] for r in refs for a in r["ann_id"] if a != -1}
        self.images = {r["image_id"]: images[r["image_id"]] for r in refs}
        # One item per (ref, sentence); a ref with an empty `sentences` list gives none.
        self.items = [(r, s) for r in refs for s in r["sentences"]]
        self.image_ids = [r["image_id"] for r, _ in self.items]
        self.sentences = [s["sent"] for _, s in self.items]
        self.no_target = [r["ann_id"] == NO_TARGET_ANN_IDS for r, _ in self.items]
        self.ids, self.word_mask = tokenize(self.sentences, self.context_length)  # (N, L) each
        self._images = _TransformedImages(self.load_image, image_size)

    def image_path(self, image_id: int) -> pathlib.Path:
        """COCO_train2014_%012d.jpg from the image id (never the ref's possibly suffixed file_name)."""
        return self.image_dir / f"COCO_train2014_{int(image_id):012d}.jpg"

    def original_mask(self, index: int) -> np.ndarray:
        """Ground truth of item `index` at the original resolution, bool (H, W): the union of the
        referred non-crowd annotations' masks; all False for a no-target expression."""
        ref, _ = self.items[index]
        entry = self.images[ref["image_id"]]
        mask = np.zeros((entry["height"], entry["width"]), dtype=bool)
        for a in ref["ann_id"]:
            if a != -1 and not self.anns[a].get("iscrowd", 0):
                mask |= annotation_mask(self.anns[a], entry["height"], entry["width"])
        return mask

    def __getitem__(self, index: int) -> dict:
        """RefDataset's item (the merged mask from `original_mask`) with this ref's `no_target`."""
        item = super().__getitem__(index)
        item["no_target"] = bool(self.no_target[index])
        return item


# ============================================================================================
# --- PhraseCut: phrases on Visual Genome images ---
# ============================================================================================
# Wu et al., "PhraseCut: Language-based Image Segmentation in the Wild", CVPR 2020. The files
# follow the official download (ChenyunWu/PhraseCutDataset, its utils/file_paths.py): one task per
# phrase-region pair in refer_<split>.json, image sizes and splits in image_data_split.json.

_PHRASECUT_WHERE = (
    "Expected the PhraseCut layout: <root>/VGPhraseCut_v0/refer_<split>.json and "
    "<root>/VGPhraseCut_v0/image_data_split.json (<root> may also be VGPhraseCut_v0 itself), images under "
    "VGPhraseCut_v0/images/<image_id>.jpg. PhraseCut comes from https://github.com/ChenyunWu/PhraseCutDataset "
    "(its download_dataset.py fetches the annotations and the Visual Genome images)."
)
PHRASECUT_SPLITS = SPLITS[("phrasecut", None)]
PHRASECUT_SIZE_MISMATCH = ("resize", "skip")  # what PhraseCutDataset does with an image of another size


def phrasecut_mask(polygons, width: int, height: int) -> np.ndarray:
    """PhraseCut's ground truth of a task: its polygons drawn and united, bool (height, width).

    Exactly the official `utils/data_transfer.py polygons_to_mask` over every polygon of every
    instance (as `utils/evaluator.py` flattens them): vertices truncated with int() (toward zero,
    so -0.6 -> 0), PIL `ImageDraw.polygon(..., outline=1, fill=1)` (the outline counts, a 2-point
    polygon is a line), polygons with fewer than 2 points skipped. Drawing every polygon on one
    canvas equals the official sum of one canvas per polygon thresholded at > 0.

    Args:
        polygons: a task's `Polygons` flattened to a list of polygons, each a list of [x, y] pixels
            (see `phrasecut_polygons`). width, height: the size recorded in image_data_split.json.
    """
    canvas = Image.new("L", (int(width), int(height)), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        if len(polygon) < 2:
            continue
        draw.polygon([(int(x), int(y)) for x, y in polygon], outline=1, fill=1)
    return np.asarray(canvas) > 0  # (height, width)


def phrasecut_polygons(task: dict) -> list:
    """Every polygon of every instance of a task, in order (`Polygons` is per instance)."""
    return [polygon for instance in task["Polygons"] for polygon in instance]


def _phrasecut_folder(root) -> pathlib.Path:
    """<root>/VGPhraseCut_v0 when it exists, else <root> itself (the folder holding the files)."""
    root = pathlib.Path(root)
    return root / "VGPhraseCut_v0" if (root / "VGPhraseCut_v0").is_dir() else root


class PhraseCutDataset(Dataset):
    """PhraseCut referring segmentation, one item per task (a phrase and the region it names).

    Items are RefDataset's dict plus `task_id` ("<image_id>__<ann ids joined by _>"), with the
    phrase as `sentence`, `ref_id` = `sent_id` = the task's position in the dataset and `no_target`
    False (every task has a region). The ground truth is `phrasecut_mask` of the task's polygons at
    the width x height recorded in image_data_split.json, where the official evaluator scores
    (`utils/evaluator.py` unpacks predictions to that size).

    A few real images decode to another size than the one recorded (CLIPSeg's PhraseCut loader
    drops 17 such image ids). The recorded size is the frame of the polygons and of the official
    scores, so `size_mismatch="resize"` (default) keeps every task, as the official evaluator
    scores every task, and resizes such a picture to the recorded size (bilinear) before the
    transform; "skip" drops their tasks instead (CLIPSeg's choice). Either way one warning names
    the count. The check reads image headers only, when images are loaded or skipping is asked.

    Args:
        root: the folder holding VGPhraseCut_v0/, or VGPhraseCut_v0 itself.
        split: "train", "val", "test", "miniv", or several joined by "_" as the official loader
            takes them ("val_miniv": the whole validation set, whose miniv images val lacks).
        image_size: S. context_length: L (default 20).
        image_dir: default VGPhraseCut_v0/images.
        load_images, load_masks: as RefDataset.
        size_mismatch: "resize" or "skip" (above).
    Raises:
        FileNotFoundError: refer_<split>.json or image_data_split.json missing (the layout is named).
        ValueError: unknown split or size_mismatch; unreadable files; a task whose image is not
            listed for the split in image_data_split.json.
    """

    def __init__(self, root, split="test", image_size=1024, context_length=None, image_dir=None,
                 load_images=True, load_masks=True, size_mismatch="resize"):
        parts = split.split("_")
        if any(p not in PHRASECUT_SPLITS for p in parts) or len(set(parts)) != len(parts):
            raise ValueError(f"unknown split {split!r} for phrasecut; expected one of {PHRASECUT_SPLITS} "
                             "or several of them joined by '_' (e.g. 'val_miniv')")
        if size_mismatch not in PHRASECUT_SIZE_MISMATCH:
            raise ValueError(f"unknown size_mismatch {size_mismatch!r}; expected one of {PHRASECUT_SIZE_MISMATCH}")
        self.folder = _phrasecut_folder(root)
        self.dataset, self.split_by, self.split = "phrasecut", None, split
        self.image_source = "visual-genome"  # Visual Genome image ids
        self.image_size = image_size
        self.context_length = context_length or DEFAULT_CONTEXT_LENGTH["phrasecut"]
        self.image_dir = pathlib.Path(image_dir) if image_dir else self.folder / "images"
        self.load_images, self.load_masks = load_images, load_masks

        task_paths = [_require_file(self.folder / f"refer_{p}.json", _PHRASECUT_WHERE) for p in parts]
        info_path = _require_file(self.folder / "image_data_split.json", _PHRASECUT_WHERE)
        info = _cached(partial(_read_json_list, what="PhraseCut's image list"), info_path)
        # As RefVGLoader: only the images of the requested splits.
        self.images = {int(e["image_id"]): e for e in info if e["split"] in parts}
        tasks = []
        for path in task_paths:
            for task in _cached(partial(_read_json_list, what="a PhraseCut task list"), path):
                if int(task["image_id"]) not in self.images:
                    raise ValueError(f"{path}: task {task['task_id']} names image {task['image_id']}, which "
                                     f"{info_path} does not list for split {split!r}")
                tasks.append(task)
        # image id -> (width, height) of the file, for the images whose file has another size
        self.mismatched_images = self._find_size_mismatches(tasks) if (
            load_images or size_mismatch == "skip") else {}
        if self.mismatched_images:
            image_id, (w, h) = next(iter(self.mismatched_images.items()))
            entry = self.images[image_id]
            action = ("their tasks are skipped (size_mismatch='skip')" if size_mismatch == "skip" else
                      "they are resized to the recorded size, where the polygons and the scores live")
            warnings.warn(f"PhraseCut {split}: {len(self.mismatched_images)} image(s) differ in size from "
                          f"{info_path} (e.g. {self.image_path(image_id)} is {w}x{h}, recorded "
                          f"{entry['width']}x{entry['height']}); {action}", UserWarning, stacklevel=2)
            if size_mismatch == "skip":
                tasks = [t for t in tasks if int(t["image_id"]) not in self.mismatched_images]
        self.tasks = tasks
        self.task_ids = [t["task_id"] for t in tasks]
        self.image_ids = [int(t["image_id"]) for t in tasks]
        self.sentences = [t["phrase"] for t in tasks]
        self.ids, self.word_mask = tokenize(self.sentences, self.context_length)  # (N, L) each
        self._images = _TransformedImages(self.load_image, image_size)

    def _find_size_mismatches(self, tasks) -> dict[int, tuple[int, int]]:
        """{image id: (width, height) of the file} for the images of `tasks` that differ from the
        recorded size; missing or unreadable files are left to `load_image` to report."""
        out = {}
        for image_id in dict.fromkeys(int(t["image_id"]) for t in tasks):
            try:
                with Image.open(self.image_path(image_id)) as img:  # reads the header only
                    size = img.size
            except (OSError, UnidentifiedImageError, SyntaxError):
                continue
            entry = self.images[image_id]
            if size != (entry["width"], entry["height"]):
                out[image_id] = size
        return out

    def __len__(self) -> int:
        return len(self.tasks)

    def image_path(self, image_id: int) -> pathlib.Path:
        return self.image_dir / f"{int(image_id)}.jpg"

    def load_image(self, image_id: int) -> Image.Image:
        """The RGB picture at the size recorded in image_data_split.json (resized when its file
        has another size, see the class docstring)."""
        path = self.image_path(image_id)
        if not path.is_file():
            raise FileNotFoundError(f"image {path} not found. {_PHRASECUT_WHERE}")
        img = load_rgb(path)  # stored orientation, the frame of the polygons (see load_rgb)
        entry = self.images[image_id]
        if img.size != (entry["width"], entry["height"]):
            img = img.resize((entry["width"], entry["height"]), Image.BILINEAR)
        return img

    def original_mask(self, index: int) -> np.ndarray:
        """Ground truth of item `index`, bool (H, W) at the recorded size (`phrasecut_mask`)."""
        task = self.tasks[index]
        entry = self.images[int(task["image_id"])]
        return phrasecut_mask(phrasecut_polygons(task), entry["width"], entry["height"])

    def __getitem__(self, index: int) -> dict:
        task = self.tasks[index]
        image_id = int(task["image_id"])
        entry = self.images[image_id]
        image = self._images(image_id) if self.load_images else None
        mask = self.original_mask(index) if self.load_masks else None
        item = _make_item(index, image, mask, (entry["height"], entry["width"]), self.ids[index],
                          self.word_mask[index], self.image_size, index, index, image_id, task["phrase"])
        item["task_id"] = task["task_id"]
        return item


# ============================================================================================
# --- Built-in "shapes" referring dataset (the embedded default; no files) ---
# ============================================================================================
# Coloured shapes on textured backgrounds. Each expression follows a tiny grammar:
#   expr := "the" NP [POS | REL "the" NP]
#   NP   := [size] [colour] shape
#   POS  := "on the left" | "on the right" | "at the top" | "at the bottom"
#   REL  := "to the left of" | "to the right of" | "above" | "below"
# `evaluate_expression` interprets that grammar against a scene; the generator keeps only the
# expressions it resolves to exactly the referred object, choosing among the shortest kind.
# NOTE(paper): not part of MARIS; a small built-in task so the project trains and tests with no
# download. Its vocabulary, sizes and split sizes are the module constants below.

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 205, 40)}
SIZES = {"small": 0.10, "large": 0.17}  # radius as a fraction of the image's shorter side
# (axis, sign): axis 0 = x, 1 = y; POS picks the minimum of sign * coordinate, REL keeps
# candidates whose sign * (coordinate - anchor coordinate) exceeds the margin.
POSITIONS = {"on the left": (0, 1), "on the right": (0, -1), "at the top": (1, 1), "at the bottom": (1, -1)}
RELATIONS = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1), "below": (1, 1)}
SHAPES_SPLITS = {"train": 0, "val": 1, "test": 2}  # stream id in the seed: disjoint splits
SHAPES_NUM_IMAGES = {"train": 1000, "val": 100, "test": 100}


@dataclass
class ShapeObject:
    shape: str
    color: str
    size: str
    cx: float  # centre, native pixels
    cy: float
    r: float  # radius, native pixels
    rgb: tuple  # fill colour after jitter


@dataclass
class Scene:
    height: int
    width: int
    background_seed: int
    objects: list
    items: list  # [(object index, expression)]

    @property
    def margin(self) -> float:
        """Distance (pixels) two centres must differ by to count as left/right/above/below."""
        return 0.15 * min(self.height, self.width)


def _np_matches(words: list[str], objects: list[ShapeObject]) -> list[int]:
    """Indices of objects matching an NP [size] [colour] shape."""
    if not words:
        raise ValueError("empty noun phrase")
    *mods, shape = words
    if shape not in SHAPES or len(mods) > 2:
        raise ValueError(f"not a noun phrase: {' '.join(words)!r}")
    size = mods[0] if mods and mods[0] in SIZES else None
    color = mods[-1] if mods and mods[-1] in COLORS else None
    if len(mods) != (size is not None) + (color is not None):
        raise ValueError(f"not a noun phrase: {' '.join(words)!r}")
    return [i for i, o in enumerate(objects)
            if o.shape == shape and size in (None, o.size) and color in (None, o.color)]


def evaluate_expression(expression: str, scene: Scene) -> list[int]:
    """Interpret a shapes expression against a scene; returns the indices of the objects it fits.

    A unique referent gives a one-element list. POS picks the extreme candidate(s) within the
    scene's margin; REL needs a unique anchor and keeps candidates beyond it by the margin.
    shapes-gres's plural forms ("all the NPS", "the NUMBER NPS") pick a set, possibly empty.

    Raises:
        ValueError: the expression is outside the grammar.
    """
    words = expression.split()
    if words[:2] == ["all", "the"] or (words[:1] == ["the"] and words[1:2] and words[1] in NUMBERS):
        return _evaluate_plural(words, scene)  # shapes-gres's plural forms (below)
    if not words or words[0] != "the":
        raise ValueError(f"expression must start with 'the': {expression!r}")
    words, pos, rel = words[1:], None, None
    for phrase in POSITIONS:
        if " ".join(words).endswith(" " + phrase):
            pos, words = phrase, words[: -len(phrase.split())]
    for phrase in RELATIONS:
        k = len(phrase.split())
        for i in range(1, len(words) - k):
            if " ".join(words[i : i + k]) == phrase and words[i + k] == "the":
                rel, anchor_words, words = phrase, words[i + k + 1 :], words[:i]
                break
        if rel:
            break
    objs, m = scene.objects, scene.margin
    cands = _np_matches(words, objs)
    if pos:
        axis, sign = POSITIONS[pos]
        key = [sign * (objs[i].cx, objs[i].cy)[axis] for i in cands]
        best = min(key, default=0.0)
        return [i for i, k in zip(cands, key) if k - best < m]
    if rel:
        anchors = _np_matches(anchor_words, objs)
        if len(anchors) != 1:
            return []  # "the X below the Y" presupposes a unique Y
        a, (axis, sign) = objs[anchors[0]], RELATIONS[rel]
        return [i for i in cands if i != anchors[0] and
                sign * ((objs[i].cx, objs[i].cy)[axis] - (a.cx, a.cy)[axis]) > m]
    return cands


def _noun_phrases(o: ShapeObject) -> list[str]:
    """Every NP that describes object o, shortest first."""
    return [o.shape, f"{o.color} {o.shape}", f"{o.size} {o.shape}", f"{o.size} {o.color} {o.shape}"]


def describe(target: int, scene: Scene, rng: np.random.Generator) -> str | None:
    """A referring expression for objects[target] that `evaluate_expression` resolves uniquely.

    Prefers attribute-only expressions; only when none is unique, a position or a relation to a
    uniquely described anchor. None when the object cannot be singled out.
    """
    unique = lambda e: evaluate_expression(e, scene) == [target]
    o = scene.objects[target]
    cands = [f"the {np_}" for np_ in _noun_phrases(o) if unique(f"the {np_}")]
    if not cands:
        cands = [f"the {np_} {p}" for np_ in _noun_phrases(o) for p in POSITIONS
                 if len(_np_matches(np_.split(), scene.objects)) > 1 and unique(f"the {np_} {p}")]
        for j, a in enumerate(scene.objects):
            anchor = next((n for n in _noun_phrases(a) if _np_matches(n.split(), scene.objects) == [j]), None)
            if j == target or anchor is None:
                continue
            cands += [f"the {np_} {r} the {anchor}" for np_ in _noun_phrases(o) for r in RELATIONS
                      if unique(f"the {np_} {r} the {anchor}")]
    return str(rng.choice(cands)) if cands else None


def make_scene(rng: np.random.Generator) -> Scene:
    """Sample one scene: native size, 3-6 non-overlapping objects, their expressions.

    Each scene draws its shapes and colours from a small per-image pool, so objects share
    attributes and the expression is needed to tell them apart.
    """
    while True:
        H, W = (int(v) for v in rng.integers(96, 161, size=2))  # varied aspect ratio
        short = min(H, W)
        shapes = rng.choice(SHAPES, size=int(rng.integers(2, 4)), replace=False)
        colors = rng.choice(list(COLORS), size=int(rng.integers(2, 4)), replace=False)
        objects: list[ShapeObject] = []
        want = int(rng.integers(3, 7))
        for _ in range(200):  # rejection sampling of non-overlapping discs
            if len(objects) == want:
                break
            size = str(rng.choice(list(SIZES)))
            r = SIZES[size] * short * rng.uniform(0.9, 1.1)
            cx, cy = rng.uniform(r + 2, W - r - 2), rng.uniform(r + 2, H - r - 2)
            if all(np.hypot(cx - o.cx, cy - o.cy) > r + o.r + 0.04 * short for o in objects):
                color = str(rng.choice(colors))
                rgb = tuple(int(c) for c in np.clip(np.array(COLORS[color]) + rng.integers(-20, 21, 3), 0, 255))
                objects.append(ShapeObject(str(rng.choice(shapes)), color, size, cx, cy, r, rgb))
        scene = Scene(H, W, int(rng.integers(2**31)), objects, [])
        if len(objects) < 3:
            continue
        for i in range(len(objects)):
            expr = describe(i, scene, rng)
            if expr is not None:
                scene.items.append((i, expr))
        if scene.items:
            return scene


def _draw_shape(draw: ImageDraw.ImageDraw, o: ShapeObject, fill) -> None:
    cx, cy, r = o.cx, o.cy, o.r
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "square":
        s = 0.85 * r  # half side: area close to the circle's
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)], fill=fill)


def render_scene(scene: Scene) -> Image.Image:
    """RGB picture of a scene: a low-saturation textured background, then the shapes."""
    rng = np.random.default_rng(scene.background_seed)
    H, W = scene.height, scene.width
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    base = rng.uniform(70, 170) + rng.uniform(-15, 15, size=3)  # greyish, so colours stay distinct
    kind = int(rng.integers(4))
    if kind == 0:  # stripes at a random angle
        t = rng.uniform(0, np.pi)
        tex = 20 * np.sin((xx * np.cos(t) + yy * np.sin(t)) * rng.uniform(0.15, 0.5))
    elif kind == 1:  # checkerboard
        cell = int(rng.integers(8, 21))
        tex = 18.0 * (((yy // cell) + (xx // cell)) % 2 * 2 - 1)
    elif kind == 2:  # linear gradient
        tex = 30 * (xx / W - 0.5) * rng.choice([-1, 1]) + 30 * (yy / H - 0.5) * rng.choice([-1, 1])
    else:  # plain
        tex = np.zeros((H, W), np.float32)
    noise = rng.normal(0, 8, size=(H, W, 3))
    pixels = np.clip(base[None, None, :] + tex[..., None] + noise, 0, 255).astype(np.uint8)  # (H, W, 3)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_shape(draw, o, o.rgb)
    return img


def scene_mask(scene: Scene, obj: int) -> np.ndarray:
    """bool (H, W) mask of one object, drawn with the same geometry as `render_scene`."""
    img = Image.new("L", (scene.width, scene.height), 0)
    _draw_shape(ImageDraw.Draw(img), scene.objects[obj], 255)
    return np.asarray(img) > 0


class ShapesDataset(Dataset):
    """The built-in synthetic referring dataset, deterministic from a seed, rendered on the fly.

    Scene i of a split comes from `np.random.default_rng([seed, split id, i])`, so splits are
    disjoint streams. Each scene gives one item per object it can describe uniquely.

    Args:
        split: "train", "val" or "test".
        num_images: scenes in the split (default 1000 / 100 / 100, about 3.5 items each).
        image_size: S (native images are 96..160 px a side, so the resize/pad path runs).
        context_length: L.
        seed: base seed.
        load_images: False skips rendering the picture (item "image" is an empty tensor).
        load_masks: False skips the ground truth (item "mask" is an empty tensor).
    Raises:
        ValueError: unknown split, or num_images < 1.
    """

    def __init__(self, split="train", num_images=None, image_size=128,
                 context_length=DEFAULT_CONTEXT_LENGTH["shapes"], seed=0, load_images=True,
                 load_masks=True):
        if split not in SHAPES_SPLITS:
            raise ValueError(f"unknown shapes split {split!r}; expected one of {tuple(SHAPES_SPLITS)}")
        self.split, self.seed, self.image_size, self.load_images = split, seed, image_size, load_images
        self.image_source = f"shapes-{split}-seed{seed}"  # each split and seed is its own stream of scenes
        self.load_masks = load_masks
        self.context_length = context_length
        n = SHAPES_NUM_IMAGES[split] if num_images is None else num_images
        if n < 1:
            raise ValueError(f"shapes {split} split: num_images must be >= 1, got {n}")
        self.scenes = [make_scene(np.random.default_rng([seed, SHAPES_SPLITS[split], i])) for i in range(n)]
        # (image id, object index, expression) per item, scene by scene
        self.items = [(i, obj, expr) for i, s in enumerate(self.scenes) for obj, expr in s.items]
        self.image_ids = [i for i, _, _ in self.items]
        self.sentences = [e for _, _, e in self.items]
        self.ids, self.word_mask = tokenize(self.sentences, context_length)  # (N, L) each
        self._images = _TransformedImages(self.load_image, image_size)

    def __len__(self) -> int:
        return len(self.items)

    def load_image(self, image_id: int) -> Image.Image:
        """The rendered RGB picture of scene `image_id` at its native size."""
        return render_scene(self.scenes[image_id])

    def original_mask(self, index: int) -> np.ndarray:
        """bool (H, W) mask of item `index` at native size."""
        image_id, obj, _ = self.items[index]
        return scene_mask(self.scenes[image_id], obj)

    def __getitem__(self, index: int) -> dict:
        image_id, obj, expr = self.items[index]
        scene = self.scenes[image_id]
        image = self._images(image_id) if self.load_images else None
        mask = self.original_mask(index) if self.load_masks else None
        ref_id = image_id * 8 + obj  # at most 6 objects per scene: a unique id per object
        return _make_item(index, image, mask, (scene.height, scene.width),
                          self.ids[index], self.word_mask[index], self.image_size,
                          ref_id, index, image_id, expr)


# ============================================================================================
# --- shapes-gres: the shapes scenes with multi-target and no-target expressions ---
# ============================================================================================
# Generalized referring (as gRefCOCO) with no download: the very scenes of "shapes" (same seeds,
# same pictures, same single-target expressions), plus expressions that pick several objects and
# expressions that pick none. The grammar grows by plural noun phrases:
#   gexpr := expr                 one object, as in "shapes" (none when no object fits)
#          | "all the" NPS        every object NPS fits
#          | "the" NUMBER NPS     the objects NPS fits when there are exactly NUMBER of them, else none
#   NPS   := [size] [colour] PLURAL,  PLURAL := "circles" | "squares" | "triangles" | "diamonds" | "shapes"
# `evaluate_expression` interprets all of it; every generated expression is checked to pick exactly
# its stated set of objects (possibly empty).
# NOTE(paper): not part of MARIS or GRES; shares per scene: every single-target expression of the
# scene, plus up to ceil(n / 2) multi-target and ceil(n / 2) no-target ones (n = single-target count).

PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle", "diamonds": "diamond",
           "shapes": None}  # plural noun -> the shape it names (None: any shape)
NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6}  # a scene has at most 6 objects
_NUMBER_WORDS = {n: w for w, n in NUMBERS.items()}


def _plural_np_matches(words: list[str], objects: list[ShapeObject]) -> list[int]:
    """Indices of objects matching a plural NP [size] [colour] PLURAL, in object order."""
    if not words or words[-1] not in PLURALS:
        raise ValueError(f"not a plural noun phrase: {' '.join(words)!r}")
    *mods, noun = words
    shapes = SHAPES if PLURALS[noun] is None else (PLURALS[noun],)
    # The singular parser checks the modifiers; "shapes" unites its matches over every shape.
    return sorted({i for shape in shapes for i in _np_matches([*mods, shape], objects)})


def _evaluate_plural(words: list[str], scene: Scene) -> list[int]:
    """`evaluate_expression` for "all the NPS" and "the NUMBER NPS" (split into words)."""
    if words[0] == "all":
        return _plural_np_matches(words[2:], scene.objects)
    fits = _plural_np_matches(words[2:], scene.objects)
    return fits if len(fits) == NUMBERS[words[1]] else []  # "the two circles" presupposes two


def describe_groups(scene: Scene, rng: np.random.Generator) -> list[tuple[tuple[int, ...], str]]:
    """Multi-target expressions: one per distinct set of >= 2 objects that a plural NP picks.

    Each set gets one expression chosen among its "all the NPS" and "the NUMBER NPS" phrasings,
    each checked with `evaluate_expression`. Returns [(object indices, expression)].
    """
    phrasings: dict[tuple[int, ...], list[str]] = {}
    for size in (None, *SIZES):
        for color in (None, *COLORS):
            for noun in PLURALS:
                nps = " ".join(w for w in (size, color, noun) if w)
                fits = tuple(_plural_np_matches(nps.split(), scene.objects))
                if len(fits) >= 2:
                    phrasings.setdefault(fits, []).extend([f"all the {nps}", f"the {_NUMBER_WORDS[len(fits)]} {nps}"])
    out = []
    for fits, exprs in phrasings.items():
        exprs = [e for e in exprs if tuple(evaluate_expression(e, scene)) == fits]
        if exprs:
            out.append((fits, str(rng.choice(exprs))))
    return out


def describe_absent(scene: Scene) -> list[str]:
    """No-target expressions: "the NP" for every NP that fits no object of the scene but shares its
    shape or its colour with one (so the words are about the picture and must be checked)."""
    out = []
    for shape in SHAPES:
        for color in (None, *COLORS):
            for size in (None, *SIZES):
                np_ = " ".join(w for w in (size, color, shape) if w)
                related = any(o.shape == shape or o.color == color for o in scene.objects)
                if related and evaluate_expression(f"the {np_}", scene) == []:
                    out.append(f"the {np_}")
    return out


def gres_items(scene: Scene, rng: np.random.Generator) -> list[tuple[tuple[int, ...], str]]:
    """A scene's shapes-gres items: its single-target items, then multi-target, then no-target ones."""
    singles = [((obj,), expr) for obj, expr in scene.items]
    k = -(-len(singles) // 2)  # ceil(n / 2)
    groups = describe_groups(scene, rng)
    multi = [groups[j] for j in sorted(rng.permutation(len(groups))[:k])]
    absent = describe_absent(scene)
    none = [((), absent[j]) for j in sorted(rng.permutation(len(absent))[:k])]
    return singles + multi + none


class ShapesGresDataset(ShapesDataset):
    """shapes-gres: the shapes scenes with single-, multi- and no-target expressions.

    Scene i is the scene i of `ShapesDataset` with the same split and seed (same picture, same
    single-target items, in the same order); the extra expressions come from a separate stream,
    `np.random.default_rng([seed, split id, i, 1])`, so adding them changes nothing in "shapes".
    The ground truth is the union of the picked objects' masks (all False for no target), and
    items carry `no_target`. `ref_id` = `sent_id` = the item index.

    Args and Raises: as ShapesDataset.
    """

    def __init__(self, split="train", num_images=None, image_size=128,
                 context_length=DEFAULT_CONTEXT_LENGTH["shapes-gres"], seed=0, load_images=True,
                 load_masks=True):
        super().__init__(split, num_images, image_size, context_length, seed, load_images, load_masks)
        # (image id, picked object indices, expression) per item, scene by scene
        self.items = [(i, targets, expr) for i, s in enumerate(self.scenes)
                      for targets, expr in gres_items(s, np.random.default_rng([seed, SHAPES_SPLITS[split], i, 1]))]
        self.image_ids = [i for i, _, _ in self.items]
        self.sentences = [e for _, _, e in self.items]
        self.no_target = [not targets for _, targets, _ in self.items]
        self.ids, self.word_mask = tokenize(self.sentences, context_length)  # (N, L) each

    def original_mask(self, index: int) -> np.ndarray:
        """bool (H, W) union of the picked objects' masks at native size (all False: no target)."""
        image_id, targets, _ = self.items[index]
        scene = self.scenes[image_id]
        mask = np.zeros((scene.height, scene.width), dtype=bool)
        for obj in targets:
            mask |= scene_mask(scene, obj)
        return mask

    def __getitem__(self, index: int) -> dict:
        image_id, _, expr = self.items[index]
        scene = self.scenes[image_id]
        image = self._images(image_id) if self.load_images else None
        mask = self.original_mask(index) if self.load_masks else None
        return _make_item(index, image, mask, (scene.height, scene.width), self.ids[index],
                          self.word_mask[index], self.image_size, index, index, image_id, expr,
                          no_target=self.no_target[index])


# --- Image-grouped batching: one frozen-encoder pass per distinct image ---
# ============================================================================================
# RefCOCO has about 7 sentences per image. Putting several sentences of one image in a batch and
# running SAM's encoder on the batch's distinct images only cuts encoder work several times over;
# the model indexes the per-image features per sentence (MARIS.forward's `image_index`).


class ImageGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices in which sentences of the same image sit together.

    Each epoch: the images are shuffled, each image's sentences are shuffled and cut into chunks of
    at most `sentences_per_image`, the chunks are shuffled, and the chunk sequence is cut into
    batches of `batch_size` sentences. The order is a pure function of (seed, epoch), so a resumed
    run replays it exactly. Under DDP every rank takes every `num_replicas`-th batch (the batch
    list is padded by wrapping around so all ranks step the same number of times).

    Args:
        image_ids: image id of every item, in item order (`dataset.image_ids`).
        batch_size: sentences per batch (per process).
        sentences_per_image: the most sentences of one image kept together (None: all of them).
            1 gives ordinary i.i.d. sentence batches.
        shuffle: False keeps item order (evaluation: sentences of an image are already adjacent).
        seed, drop_last, num_replicas, rank: as torch's DistributedSampler.
    Raises:
        ValueError: batch_size or sentences_per_image < 1, or rank outside [0, num_replicas).
    """

    def __init__(self, image_ids, batch_size: int, *, sentences_per_image: int | None = None, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1 or (sentences_per_image is not None and sentences_per_image < 1):
            raise ValueError(f"batch_size ({batch_size}) and sentences_per_image ({sentences_per_image}) must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.batch_size, self.k, self.shuffle = batch_size, sentences_per_image, shuffle
        self.seed, self.drop_last, self.num_replicas, self.rank = seed, drop_last, num_replicas, rank
        self.epoch = 0
        self.groups: dict[int, list[int]] = {}  # image id -> its item indices, in item order
        for index, image_id in enumerate(image_ids):
            self.groups.setdefault(int(image_id), []).append(index)
        self.num_items = len(image_ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order (call before iterating, as with DistributedSampler)."""
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        """All batches of the epoch, before the split across ranks."""
        rng = np.random.default_rng([self.seed, self.epoch])
        images = list(self.groups)
        if self.shuffle:
            images = [images[i] for i in rng.permutation(len(images))]
        chunks = []
        for image_id in images:
            items = self.groups[image_id]
            if self.shuffle:
                items = [items[i] for i in rng.permutation(len(items))]
            k = self.k or len(items)
            chunks += [items[j:j + k] for j in range(0, len(items), k)]
        if self.shuffle:
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        flat = [index for chunk in chunks for index in chunk]
        batches = [flat[j:j + self.batch_size] for j in range(0, len(flat), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.num_replicas > 1 and batches:  # wrap around so every rank gets as many batches
            short = -len(batches) % self.num_replicas
            batches += [batches[j % len(batches)] for j in range(short)]
        return batches

    def __iter__(self):
        return iter(self._batches()[self.rank::self.num_replicas])

    def __len__(self) -> int:
        if self.drop_last:
            n = self.num_items // self.batch_size
        else:
            n = -(-self.num_items // self.batch_size)  # ceil
        return -(-n // self.num_replicas)


def collate_images(items: list[dict]) -> dict:
    """Collate item dicts, keeping each distinct image once.

    Returns the default-collated batch without "image" ("no_target" becomes a bool tensor (B,),
    PhraseCut's "task_id" a list of B strings), plus
        images       FloatTensor (B_img, 3, S, S): the batch's distinct images, first-seen order
                     (shape (0,) when the items carry no pixels, load_images=False)
        image_index  LongTensor (B,): row of `images` for each sentence
        image_ids    LongTensor (B_img,): image id of each row of `images`
    """
    rows: dict[int, int] = {}  # image id -> row in images
    image_index = [rows.setdefault(item["image_id"], len(rows)) for item in items]
    firsts = {}
    for item in items:
        firsts.setdefault(item["image_id"], item["image"])
    batch = torch.utils.data.default_collate([{k: v for k, v in item.items() if k != "image"} for item in items])
    pictures = list(firsts.values())
    batch["images"] = torch.stack(pictures) if pictures[0].numel() else torch.zeros(0)  # (B_img, 3, S, S)
    batch["image_index"] = torch.tensor(image_index, dtype=torch.long)  # (B,)
    batch["image_ids"] = torch.tensor(list(rows), dtype=torch.long)  # (B_img,)
    return batch


# ============================================================================================
# --- Encoder feature cache: SAM's frozen outputs per image on disk ---
# ============================================================================================
# With the encoder frozen, its outputs for an image never change, so they are computed once and
# read back every epoch. One fp16 .npy file per image holds the neck embedding (C, H, W) and the
# three Feature Enhancement taps (H, W, D) back to back; it is written to a temporary name and
# renamed, so a killed run leaves each image's entry either complete or absent. meta.json records
# what the features depend on, and a cache made for another encoder is refused, never mixed in.


def atomic_write(path, write) -> None:
    """Write a file so that a kill at any moment leaves the old file or the new one, never a part.

    `write(f)` fills a temporary file in the same folder (binary mode); it is flushed, fsynced and
    renamed over `path` (atomic on POSIX and Windows within one file system). On any error,
    KeyboardInterrupt included, the temporary file is removed and the error re-raised.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class FeatureCache:
    """Memory-mapped fp16 cache of the frozen image encoder's outputs, one file per image.

    Args:
        root: cache directory (created if missing).
        fingerprint: JSON-able dict of everything the features depend on (encoder settings and a
            hash of its weights, image size, taps). Stored in `root/meta.json` on first use.
        neck_shape: (C, H, W). tap_shape: (H, W, D). num_taps: taps per image (3).
        rebuild: True deletes the entries of a cache whose fingerprint differs, instead of refusing.
    Raises:
        ValueError: `root` holds a cache with another fingerprint and rebuild is False; the message
            names the fields that differ.
    """

    def __init__(self, root, fingerprint: dict, *, neck_shape, tap_shape, num_taps: int = 3, rebuild: bool = False):
        self.root = pathlib.Path(root)
        self.neck_shape, self.tap_shape, self.num_taps = tuple(neck_shape), tuple(tap_shape), num_taps
        self.fingerprint = {**fingerprint, "neck_shape": list(self.neck_shape), "tap_shape": list(self.tap_shape),
                            "num_taps": num_taps, "dtype": "float16"}
        self.root.mkdir(parents=True, exist_ok=True)
        meta = self.root / "meta.json"
        if meta.exists():
            old = json.loads(meta.read_text())
            if old != self.fingerprint:
                diff = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
                if not rebuild:
                    raise ValueError(f"feature cache {self.root} was built for another encoder or input: {diff} differ "
                                     f"(cached {[old.get(k) for k in diff]}, "
                                     f"now {[self.fingerprint.get(k) for k in diff]}). "
                                     "Use another cache directory, or rebuild it.")
                for entry in self.root.glob("*.npy"):
                    entry.unlink()
        atomic_write(meta, lambda f: f.write(json.dumps(self.fingerprint, indent=1).encode()))
        self.neck_size = int(np.prod(self.neck_shape))
        self.tap_size = int(np.prod(self.tap_shape))

    @property
    def bytes_per_image(self) -> int:
        """Disk cost of one image: 2 bytes x (C*H*W + num_taps*H*W*D)."""
        return 2 * (self.neck_size + self.num_taps * self.tap_size)

    def path(self, image_id: int) -> pathlib.Path:
        return self.root / f"{int(image_id)}.npy"

    def __contains__(self, image_id: int) -> bool:
        return self.path(image_id).exists()

    def store(self, image_ids, features: dict) -> None:
        """Write the features of a batch of images (rows of features["neck"], features["taps"][t])."""
        neck = features["neck"].detach().to("cpu", torch.float16).flatten(1)  # (B, C*H*W)
        taps = [t.detach().to("cpu", torch.float16).flatten(1) for t in features["taps"]]  # num_taps x (B, H*W*D)
        flat = torch.cat([neck, *taps], dim=1).numpy()  # (B, C*H*W + num_taps*H*W*D)
        for row, image_id in enumerate(image_ids):
            atomic_write(self.path(image_id), lambda f: np.save(f, flat[row]))  # complete or absent

    def load(self, image_ids) -> dict:
        """Features of cached images, fp16 as stored: neck (B, C, H, W), taps num_taps x (B, H, W, D).

        fp16 halves host memory and the host-to-device copy; MARIS.forward_features casts them to
        the model's device and dtype.

        Raises:
            ValueError: an entry is missing or has the wrong size (named).
        """
        rows = []
        for image_id in image_ids:
            try:
                row = np.load(self.path(image_id), mmap_mode="r")
            except (OSError, ValueError) as e:
                raise ValueError(f"feature cache entry {self.path(image_id)} is missing or unreadable: {e}") from None
            if row.shape != (self.neck_size + self.num_taps * self.tap_size,):
                raise ValueError(f"feature cache entry {self.path(image_id)} has {row.shape} values, expected "
                                 f"{self.neck_size + self.num_taps * self.tap_size}")
            rows.append(torch.from_numpy(np.array(row)))  # copy out of the memory map, fp16
        flat = torch.stack(rows)  # (B, C*H*W + num_taps*H*W*D)
        B = flat.shape[0]
        neck, *taps = flat.split([self.neck_size] + [self.tap_size] * self.num_taps, dim=1)
        return {"neck": neck.reshape(B, *self.neck_shape), "taps": [t.reshape(B, *self.tap_shape) for t in taps]}

    def get(self, image_ids, encode) -> dict:
        """Features of `image_ids`, computing and storing the missing ones with `encode(missing_ids)`.

        `encode` returns the encoder's dict for the listed images, in that order.
        """
        image_ids = [int(i) for i in image_ids]
        missing = [i for i in dict.fromkeys(image_ids) if i not in self]
        if missing:
            self.store(missing, encode(missing))
        return self.load(image_ids)


# Encoder settings the cached features depend on (besides the encoder weights' hash and the images).
ENCODER_FIELDS = ("sam_embed_dim", "sam_depth", "sam_num_heads", "sam_global_attn_indexes", "sam_window_size",
                  "patch_size", "image_size", "fe_taps", "embed_dim")


def image_source(dataset) -> str:
    """The name of the pictures behind a dataset's image ids (its `image_source`): one cache folder each.

    The RefCOCO family shares COCO train2014 (image id = COCO id), so refcoco, refcoco+ and refcocog
    share one cache; a shapes split is its own seeded stream of scenes (ids restart at 0).

    Raises:
        ValueError: the dataset has no `image_source` attribute.
    """
    source = getattr(dataset, "image_source", None)
    if not isinstance(source, str):
        raise ValueError(f"{type(dataset).__name__} has no image_source: the feature cache needs to know which "
                         "pictures its image ids name")
    return source


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict: each key, dtype, shape and tensor bytes, keys sorted.

    Identifies the weights themselves, so a randomly initialised encoder (another seed) and a loaded
    checkpoint hash differently. It reads every weight (about 2.5 GB for ViT-H): callers hash a model
    once per process and pass the result on (`encoder_sha256=` below).
    """
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes (works for bf16 too)
    return digest.hexdigest()


def encoder_fingerprint(model, source: str, *, precision: str = "fp32", encoder_sha256: str | None = None) -> dict:
    """Everything the frozen encoder's outputs depend on, for FeatureCache's meta.json.

    Args:
        model: a MARIS (its `cfg` and `image_encoder`).  source: `image_source(dataset)`.
        precision: the precision the features are computed in ("fp32" or "bf16").
        encoder_sha256: `state_dict_sha256(model.image_encoder)` when the caller has it (None: hash now).

    Returns:
        JSON-able dict: the ENCODER_FIELDS of the config, the encoder weights' sha256, source, precision.
    """
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model.cfg).items()}
    if encoder_sha256 is None:
        encoder_sha256 = state_dict_sha256(model.image_encoder)
    return {**{k: cfg[k] for k in ENCODER_FIELDS}, "encoder_sha256": encoder_sha256, "images": source,
            "precision": precision}


def _check_precision(precision: str) -> str:
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16' (maris.effective_precision), got {precision!r}")
    return precision


def open_feature_cache(model, dataset, root, *, precision: str = "fp32", rebuild: bool = False,
                       encoder_sha256: str | None = None) -> FeatureCache:
    """The feature cache of `dataset`'s pictures under `root/<image source>/`.

    Args:
        model: a MARIS (not DDP-wrapped).  dataset: has `image_source`.  root: the cache folder.
        precision: "fp32" or "bf16", what missing entries are encoded in.
        rebuild: empty a cache built for another encoder instead of refusing it.
        encoder_sha256: the encoder weights' hash computed once by the caller (`state_dict_sha256`);
            None hashes them here, which costs a full read of the weights per call.

    Raises:
        ValueError: the model has RISAM adapters (its encoder features change as they train); the
            folder holds a cache built for another encoder, input size or image source (and not rebuild).
    """
    cfg = model.cfg
    if cfg.adapters:
        raise ValueError("--feature-cache cannot be used with --adapters: RISAM's adapters train inside SAM's "
                         "image encoder, so its features change every step and cannot be cached")
    H = W = cfg.image_size // cfg.patch_size
    fingerprint = encoder_fingerprint(model, image_source(dataset), precision=_check_precision(precision),
                                      encoder_sha256=encoder_sha256)
    return FeatureCache(pathlib.Path(root) / fingerprint["images"], fingerprint, neck_shape=(cfg.embed_dim, H, W),
                        tap_shape=(H, W, cfg.sam_embed_dim), num_taps=len(cfg.fe_taps), rebuild=rebuild)


@torch.no_grad()
def encode_images(model, dataset, image_ids, *, device: torch.device, batch_size: int,
                  precision: str = "fp32") -> dict:
    """Run the frozen image encoder on pictures loaded by id (what a FeatureCache stores).

    Args:
        model: a MARIS.  dataset: has `load_image(image_id)`.  image_ids: the ids, in output order.
        device: where the encoder runs.  batch_size: images per encoder pass.
        precision: "fp32", or "bf16" (autocast).

    Returns:
        dict(neck=(B_img, C, H, W), taps=[(B_img, H, W, D)] * 3) on the CPU in fp16 (the cache's dtype).
    """
    size = model.cfg.image_size
    bf16 = _check_precision(precision) == "bf16"
    necks, taps = [], []
    ids = [int(i) for i in image_ids]
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        pixels = torch.stack([transform_image(dataset.load_image(i), size)[0] for i in chunk])  # (b, 3, S, S)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            out = model.encode_image(pixels.to(device))
        necks.append(out["neck"].to("cpu", torch.float16))  # (b, C, H, W)
        taps.append([t.to("cpu", torch.float16) for t in out["taps"]])  # 3 x (b, H, W, D)
    return {"neck": torch.cat(necks), "taps": [torch.cat(level) for level in zip(*taps)]}


def batch_image_inputs(batch: dict, *, device: torch.device, model=None, cache: FeatureCache | None = None,
                       dataset=None, batch_size: int = 8, precision: str = "fp32") -> tuple[dict, int]:
    """The image keyword arguments of MARIS.forward for a `collate_images` batch.

    Without a cache: images = the batch's distinct images (B_img, 3, S, S) on the device. With one:
    image_features = the cached encoder outputs of `batch["image_ids"]`, encoding (and storing) the
    missing ones first with `encode_images`.

    Args:
        batch: collate_images output.  device: the model's device.
        model, cache, dataset: needed with a cache (the encoder and `load_image`).
        batch_size, precision: of the encoder passes for missing entries ("fp32" or "bf16").

    Returns:
        (dict(images=..., image_features=..., image_index=(B,) long on the device), one of images /
        image_features None; the number of images the encoder runs on for this batch).
    """
    index = batch["image_index"].to(device)  # (B,)
    if cache is None:
        images = batch["images"].to(device, non_blocking=True)  # (B_img, 3, S, S)
        return dict(images=images, image_features=None, image_index=index), images.shape[0]
    image_ids = [int(i) for i in batch["image_ids"]]
    missing = [i for i in dict.fromkeys(image_ids) if i not in cache]
    features = cache.get(image_ids, lambda ids: encode_images(model, dataset, ids, device=device,
                                                              batch_size=batch_size, precision=precision))
    return dict(images=None, image_features=features, image_index=index), len(missing)


# ============================================================================================
# --- build_dataset ---
# ============================================================================================


def build_dataset(name, split, *, root=None, split_by=None, image_size, context_length=None,
                  image_dir=None, load_images=True, load_masks=True, num_images=None) -> Dataset:
    """One entry point for every dataset.

    Args:
        name: "shapes", "shapes-gres", "refcoco", "refcoco+", "refcocog", "grefcoco" or "phrasecut".
        split: split name ("train", "val", "test", "testA", "miniv", ...).
        root: data root (every name but the shapes ones).
        split_by: RefCOCO family partition; "unc" or None for grefcoco; None for phrasecut.
        image_dir: overrides the image folder (RefCOCO family, grefcoco, phrasecut).
        image_size: S. context_length: L (None: the dataset's default).
        load_images: False skips pixels (item "image" is an empty tensor).
        load_masks: False skips the padded ground truth (item "mask" is an empty tensor; evaluation
            reads `original_mask` instead).
        num_images: shapes only: scenes in the split (None: `SHAPES_NUM_IMAGES`).
    Returns:
        a Dataset of item dicts.
    Raises:
        ValueError: unknown name or split_by, a file-based name without a root, or num_images for a
            file-based name.
    """
    if name in ("shapes", "shapes-gres"):
        cls = ShapesDataset if name == "shapes" else ShapesGresDataset
        return cls(split=split, image_size=image_size, context_length=context_length or DEFAULT_CONTEXT_LENGTH[name],
                   load_images=load_images, load_masks=load_masks, num_images=num_images)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected 'shapes', 'shapes-gres' or one of {sorted(DATASETS)}")
    if num_images is not None:
        raise ValueError(f"num_images={num_images} is for the generated shapes datasets; {name!r} reads its "
                         f"images from its annotation files")
    if root is None:
        where = {"grefcoco": _GREFCOCO_WHERE, "phrasecut": _PHRASECUT_WHERE}.get(name, _WHERE_FROM)
        raise ValueError(f"dataset {name!r} needs root=<data root>. {where}")
    if name in ("grefcoco", "phrasecut"):
        if split_by not in (None, *DATASETS[name]):
            raise ValueError(f"unknown split_by {split_by!r} for {name}; expected one of {DATASETS[name]}")
        cls = GRefDataset if name == "grefcoco" else PhraseCutDataset
        return cls(root, split=split, image_size=image_size, context_length=context_length, image_dir=image_dir,
                   load_images=load_images, load_masks=load_masks)
    return RefDataset(root, dataset=name, split_by=split_by, split=split, image_size=image_size,
                      context_length=context_length, image_dir=image_dir, load_images=load_images,
                      load_masks=load_masks)
