"""Data for MARIS: CLIP BPE tokenizer, SAM image/mask transforms, RefCOCO-family datasets read
straight from the `refer` file layout, and the built-in synthetic "shapes" referring dataset.

Everything between files on disk and the tensors the model eats (DESIGN.md §5). Every dataset
item is one dict with the same keys in every split (see `_make_item`).

Shape letters: B batch, S padded input side, L text tokens (context length), H x W an original
image, h2 x w2 the image after resizing its longest side to S.
"""
from __future__ import annotations

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
from functools import lru_cache

import ftfy
import numpy as np
import regex
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, UnidentifiedImageError
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
        is cut, and gets EOT in the last slot (CLIP's `truncate=True`).
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
    for b, text in enumerate(texts):
        row = [SOT_ID, *tok.encode(text), EOT_ID]
        if len(row) > context_length:
            row = row[:context_length]
            row[-1] = EOT_ID
        ids[b, : len(row)] = torch.tensor(row)
        lengths[b] = len(row)
    word_mask = torch.arange(context_length)[None, :] < lengths[:, None]  # (B, L)
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
        image: PIL image (any mode, converted to RGB) or uint8 array (H, W, 3).
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
    image = image.convert("RGB")
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


def _make_item(index, image_t, mask, orig_size, ids, word_mask, image_size, ref_id, sent_id, image_id, sentence):
    """The one item dict shared by every dataset (same keys in every split).

    `image_t` is the transformed image (3, S, S) or None (load_images=False: an empty tensor, shape (0,)).
    `mask` is the original-resolution bool mask or None (load_masks=False: an empty tensor, shape (0,);
    evaluation scores against `original_mask` and needs no padded copy).
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
# --- RefCOCO, RefCOCO+, G-Ref in the refer layout (DESIGN.md §5) ---
# ============================================================================================

DATASETS = {"refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google")}
SPLITS = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco", "google"): ("train", "val", "test"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
}
# NOTE(paper): the paper does not state L; 20 (RefCOCO/+) and 30 (G-Ref, longer expressions) follow
# the LAVT/CRIS convention. Override with `context_length`.
DEFAULT_CONTEXT_LENGTH = {"refcoco": 20, "refcoco+": 20, "refcocog": 30, "shapes": 20}  # L per dataset
_WHERE_FROM = (
    "Expected the refer layout: <root>/<dataset>/refs(<split_by>).p and <root>/<dataset>/instances.json, "
    "images under <root>/images/mscoco/images/train2014/COCO_train2014_<12-digit id>.jpg. "
    "RefCOCO, RefCOCO+ and RefCOCOg annotations come from the refer project "
    "(https://github.com/lichengunc/refer, data at the links in its README); the images are "
    "COCO train2014 (https://cocodataset.org)."
)


def _require_file(path: pathlib.Path) -> pathlib.Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found. {_WHERE_FROM}")
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


def load_rgb(path: pathlib.Path) -> Image.Image:
    """Open an image file as RGB, with errors that name the file.

    Raises:
        FileNotFoundError: missing file. ValueError: unreadable or corrupt file.
    """
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found. {_WHERE_FROM}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert forces the full decode inside the try
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"image {path} is corrupt or not an image ({e})") from None


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

    def __init__(self, root, dataset="refcoco", split_by=None, split="train", image_size=1024,
                 context_length=None, image_dir=None, load_images=True, load_masks=True):
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
        split_by = split_by or DATASETS[dataset][0]
        if split_by not in DATASETS[dataset]:
            raise ValueError(f"unknown split_by {split_by!r} for {dataset}; expected one of {DATASETS[dataset]}")
        names = SPLITS[(dataset, split_by)]
        allowed = names + (("test",) if any("test" in s for s in names) and "test" not in names else ())
        if split not in allowed:
            raise ValueError(f"unknown split {split!r} for {dataset} ({split_by}); expected one of {allowed}")
        self.root = pathlib.Path(root)
        self.dataset, self.split_by, self.split = dataset, split_by, split
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
        """The original RGB image, checked against the size recorded in instances.json."""
        img = load_rgb(self.image_path(image_id))
        entry = self.images[image_id]
        if (img.height, img.width) != (entry["height"], entry["width"]):
            raise ValueError(f"image {self.image_path(image_id)} is {img.width}x{img.height}, but instances.json "
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

    Raises:
        ValueError: the expression is outside the grammar.
    """
    words = expression.split()
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
# --- Image-grouped batching: one frozen-encoder pass per distinct image (DESIGN.md §7) ---
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

    Returns the default-collated batch without "image", plus
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
# --- Encoder feature cache: SAM's frozen outputs per image on disk (DESIGN.md §7) ---
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
                                     f"(cached {[old.get(k) for k in diff]}, now {[self.fingerprint.get(k) for k in diff]}). "
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


# ============================================================================================
# --- build_dataset ---
# ============================================================================================


def build_dataset(name, split, *, root=None, split_by=None, image_size, context_length=None,
                  image_dir=None, load_images=True, load_masks=True, num_images=None) -> Dataset:
    """One entry point for every dataset.

    Args:
        name: "shapes", "refcoco", "refcoco+" or "refcocog".
        split: split name ("train", "val", "test", "testA", ...).
        root: refer data root (RefCOCO family only).
        split_by, image_dir: RefCOCO family only (see RefDataset).
        image_size: S. context_length: L (None: the dataset's default).
        load_images: False skips pixels (item "image" is an empty tensor).
        load_masks: False skips the padded ground truth (item "mask" is an empty tensor; evaluation
            reads `original_mask` instead).
        num_images: shapes only: scenes in the split (None: `SHAPES_NUM_IMAGES`).
    Returns:
        a Dataset of item dicts.
    Raises:
        ValueError: unknown name, a RefCOCO-family name without a root or with num_images.
    """
    if name == "shapes":
        return ShapesDataset(split=split, image_size=image_size, context_length=context_length or DEFAULT_CONTEXT_LENGTH["shapes"],
                             load_images=load_images, load_masks=load_masks, num_images=num_images)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected 'shapes' or one of {sorted(DATASETS)}")
    if num_images is not None:
        raise ValueError(f"num_images={num_images} is for the generated shapes dataset; {name!r} reads its "
                         f"images from its annotation files")
    if root is None:
        raise ValueError(f"dataset {name!r} needs root=<refer data root>. {_WHERE_FROM}")
    return RefDataset(root, dataset=name, split_by=split_by, split=split, image_size=image_size,
                      context_length=context_length, image_dir=image_dir, load_images=load_images,
                      load_masks=load_masks)
