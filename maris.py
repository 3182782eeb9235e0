"""MARIS: Referring Image Segmentation via Mutual-Aware Attention Features (arXiv 2311.15727).

The whole model in one file, in data-flow order (the paper's Fig. 2):

    image (B, 3, S, S) --SAM ViT (frozen)--> taps (B, H, W, D) x 3 + neck F_sam (B, C, H, W)
    ids (B, L) --CLIP text tower (frozen)--> per-word F_w (B, L, E), sentence F_s (B, E_proj)
    Feature Enhancement                 --> F_v (B, N, C)
    Linear(E -> C)(F_w)                 --> F_l (B, L, C)
    K x Mutual-Aware Attention (Fig. 4) --> F_v' (B, N, C), F_l' (B, L, C)
    Mutual-Aware Mask Decoder (Fig. 5)  --> mask logits (B, 1, 4H, 4W)
    focal + dice losses on the logits upsampled to (S, S), padding ignored

Optional, all off by default (with them off the model and its training are exactly MARIS):
    RISAM's bottleneck adapters in every SAM block (the paper's later version), the only trainable
    encoder part; MagNet's training-only Mask Grounding and cross-modal alignment losses (Chng et al.,
    CVPR 2024, arXiv 2312.12198), computed by `TrainStep` with `MagNetHeads`.
    A ReLA-style no-target head on the query token for expressions that refer to nothing (gRefCOCO),
    trained with `no_target_loss`.

The paper's ablations are `MarisConfig` switches whose defaults are MARIS: `fusion` (Fig. 4: both
directions with one shared affinity, one direction alone, separate affinities, no fusion blocks),
`query_token` (Fig. 5: the multi-modal query token, its learned or its sentence part alone),
`feature_enhancement` (Fig. 2) and K = `maa_depth`. A variant builds only the weights it uses.

Shape letters, used in every comment of this file:
    B batch (sentences), B_img distinct images, S input side, H = W = S / 16 feature side,
    N = H * W visual tokens, D SAM ViT width, L text tokens, E CLIP text width,
    E_proj CLIP embedding width, C fusion width (SAM's prompt width), h heads, d = C / h,
    T tokens of an attention (Tq queries, Tk keys), V vocabulary size, M masked words of a batch,
    P width of the alignment space.

Every detail the paper leaves open is a `MarisConfig` field marked `# NOTE(paper):`.
SAM's image encoder is used from the `segment-anything` package (Apache-2.0); the mask decoder
and the CLIP text tower are written here with attribute names that load the released weights
(SAM: Apache-2.0, CLIP: MIT).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import json
import math
import os
import pickle
import re
import shlex
import sys
import typing
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType

import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import data  # the weight hash shared with the feature cache (data.py imports nothing of this file)


# --- segment-anything ---------------------------------------------------------------------------

def import_sam_modeling() -> ModuleType:
    """Import `segment_anything.modeling`, running the package's `__init__` whenever it can.

    That `__init__` imports the predictor utilities, which need torchvision; the model code needs torch
    alone. Without a working torchvision, a bare package module (`__init__` never run) stands in for
    `segment_anything` and the sub-modules import under it, `segment_anything.build_sam` included.

    Raises:
        ImportError: segment-anything is not installed.
    """
    try:
        importlib.import_module("segment_anything")
    except ModuleNotFoundError as e:
        if e.name == "segment_anything":
            raise ImportError("segment-anything is not installed: pip install segment-anything") from None
        _register_bare_sam_package()
    except (ImportError, RuntimeError, OSError):  # a torchvision that is installed but broken
        _register_bare_sam_package()
    return importlib.import_module("segment_anything.modeling")


def _register_bare_sam_package() -> None:
    """Put an un-initialised `segment_anything` package module in sys.modules (see `import_sam_modeling`)."""
    # Sub-modules a failed `__init__` left behind would belong to no package: import them afresh.
    for name in [n for n in sys.modules if n == "segment_anything" or n.startswith("segment_anything.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("segment_anything")  # locates, does not execute
    sys.modules["segment_anything"] = importlib.util.module_from_spec(spec)  # sets __path__, runs nothing


_sam = import_sam_modeling()
ImageEncoderViT = _sam.ImageEncoderViT
LayerNorm2d = _sam.common.LayerNorm2d  # SAM's channel LayerNorm for (B, C, H, W)
PositionEmbeddingRandom = _sam.prompt_encoder.PositionEmbeddingRandom  # SAM's dense PE
SamMLP = _sam.mask_decoder.MLP  # `layers.{i}` Linear stack with ReLU, SAM's hypernetwork MLP


# --- Config ----------------------------------------------------------------------------------

# How SAM's ViT blocks compute attention (`set_sam_attention`): segment-anything's own forward, or
# the same function through F.scaled_dot_product_attention.
SAM_ATTENTION_KINDS = ("stock", "sdpa")


@dataclass
class MarisConfig:
    """All sizes and reconstruction choices of MARIS; only `build_maris` reads it."""

    # SAM image encoder; defaults = SAM ViT-B at S = 1024.
    image_size: int = 1024  # S
    patch_size: int = 16  # SAM's; H = S / patch_size
    sam_embed_dim: int = 768  # D
    sam_depth: int = 12
    sam_num_heads: int = 12
    sam_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    sam_window_size: int = 14
    # NOTE(paper): SAM's constructor starts the encoder's absolute position embedding at zero and
    # the released weights fill it in, so an encoder left random has no absolute position in its
    # features (nothing tells two identical objects apart but the attention's P_v). "sincos"
    # starts it from a fixed 2-D sine-cosine table instead; a SAM checkpoint overwrites either.
    sam_pos_embed_init: str = "zeros"
    # "stock" = segment-anything's attention code; "sdpa" = `SDPASamAttention`, the same outputs
    # (within float rounding) through F.scaled_dot_product_attention, for fused GPU kernels.
    sam_attention: str = "stock"
    # NOTE(paper): the paper says "shallow, middle and deep" SAM features; we tap the outputs of
    # the 2nd, 3rd and 4th global-attention blocks.
    fe_taps: tuple[int, ...] = (5, 8, 11)
    # NOTE(paper): the last Feature Enhancement conv starts at zero, so at initialisation
    # F_v == SAM's own image embedding.
    fe_zero_init: bool = True
    embed_dim: int = 256  # C, SAM's prompt width (must be 256 to load SAM's neck/decoder)

    # CLIP text tower; defaults = CLIP ViT-B/16's.
    vocab_size: int = 49408
    text_context_length: int = 77  # rows of CLIP's positional_embedding
    text_width: int = 512  # E
    text_layers: int = 12
    text_heads: int = 8
    text_embed_dim: int = 512  # E_proj
    context_length: int = 20  # L used by the datasets (<= text_context_length)

    # Mutual-Aware Attention (Fig. 4).
    maa_depth: int = 2  # K
    maa_heads: int = 8
    maa_mlp_ratio: float = 4.0  # FFN width = ratio * C
    # NOTE(paper): the word position encoding P_l is a learned (text_context_length, C) table
    # added to the words where they form keys/queries (like SAM's PE), not to the values.
    word_pos_std: float = 0.02

    # Mutual-Aware Mask Decoder (Fig. 5), SAM's two-way transformer sizes.
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    decoder_attention_downsample_rate: int = 2
    # NOTE(paper): the learned part of the multi-modal query token starts from SAM's first mask
    # token (the single-mask output token) when a SAM checkpoint's decoder is loaded.
    decoder_query_from_sam_mask_token: bool = True
    # NOTE(paper): SAM's mask-decoder weights initialise ours where names and shapes match.
    load_sam_mask_decoder: bool = True

    # Losses.
    # NOTE(paper): focal : dice = 20 : 1 is SAM's ratio; the paper does not give its weights.
    loss_focal_weight: float = 20.0
    loss_dice_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    dice_smooth: float = 1.0  # added to numerator and denominator: empty-vs-empty scores 0

    # MagNet's training add-ons (Chng et al., CVPR 2024), all off by default: with
    # both weights at 0 training is exactly MARIS. Training-only heads, see `MagNetHeads`.
    mask_grounding_weight: float = 0.0  # weight of the Mask Grounding cross-entropy
    # NOTE(paper): the share of real word tokens masked, rounded, at least one per sentence
    # that has a word (MagNet masks a random share of the tokens; the exact count rule is ours).
    mask_ratio: float = 0.15
    # Ablation: False drops the segmentation cue (F_v' pooled inside the ground-truth mask).
    mask_grounding_use_mask: bool = True
    # NOTE(paper): the masked copy of the expression runs through word_proj and the Mutual-Aware
    # Attention blocks again (sharing F_v), and the head reads that pass's F_v' and F_l'. The
    # main pass's F_v' has read the unmasked words through Vision-Guided Attention, so using it
    # (False: cheaper) lets the head read the answer back from the visual map.
    mask_grounding_fuse_masked: bool = True
    # NOTE(paper): head = `mask_grounding_depth` x [word self-attention -> cross-attention to
    # F_v' (+ cue token) -> FFN], each residual + LayerNorm (MagNet's fusion layout is not ours).
    mask_grounding_depth: int = 1
    # NOTE(paper): the vocabulary classifier is tied to CLIP's frozen token_embedding matrix
    # (a Linear C -> E, then logits = x E_tok^T + bias), saving ~C x 49408 parameters; False
    # uses a separate Linear(C -> vocab_size).
    mask_grounding_tied_output: bool = True
    alignment_weight: float = 0.0  # weight of the cross-modal alignment loss
    # NOTE(paper): a fixed (not learned) temperature, CLIP's initial value.
    alignment_temperature: float = 0.07
    alignment_dim: int = 256  # width of the shared projection space of F_s and F_v' pixels

    # No-target head for generalized referring (gRefCOCO: expressions that refer to nothing), off
    # by default: with the weight 0 the head is not built and model, loss and gradients are MARIS's.
    # NOTE(paper): RISAM's own no-target mechanism is not in the text available to us; this is
    # ReLA's (GRES, CVPR 2023) no-target classifier placed on MARIS: an MLP (C -> C -> 1) on the
    # multi-modal query token's final state, trained with BCE against the `no_target` labels.
    no_target_weight: float = 0.0  # weight of the no-target BCE; > 0 builds `MARIS.no_target_head`

    # The paper's ablations as switches; the defaults are MARIS, and each other value builds only the
    # parameters it uses (DDP trains with find_unused_parameters off). K, the fourth, is `maa_depth` above.
    # Cross-modal fusion (Fig. 4): "mutual" = Vision-Guided + Language-Guided Attention sharing one
    # affinity A; "vga_only" = Vision-Guided Attention alone (words pass through unchanged); "lga_only" =
    # Language-Guided Attention alone (visual features pass through); "separate" = both directions, each
    # with its own affinity (its own query/key projections); "none" = no fusion blocks, the decoder reads
    # F_v and F_l directly.
    fusion: str = "mutual"
    # The Mask Decoder's query token (Fig. 5): "multimodal" = learned embedding + Linear(F_s);
    # "learned" = the learned embedding alone (SAM's plain mask token); "sentence" = Linear(F_s) alone.
    query_token: str = "multimodal"
    # Feature Enhancement (Fig. 2); False: F_v = SAM's neck output F_sam and the module is not built.
    feature_enhancement: bool = True

    # RISAM's parameter-efficient fine-tuning of SAM's encoder, off by default.
    adapters: bool = False
    # NOTE(paper): bottleneck width = round(D * adapter_ratio) (RISAM's D -> D/4 -> D).
    adapter_ratio: float = 0.25

    # Seed for building the model, so randomly initialised frozen encoders (no checkpoint) are
    # the same in every process: trainable weights + config then reproduce the model.
    init_seed: int = 0

    def __post_init__(self) -> None:
        """Check the switches that take one of a few values (a one-line ValueError names the field, the value
        and the choices)."""
        if self.sam_attention not in SAM_ATTENTION_KINDS:
            raise ValueError(f"sam_attention must be one of {', '.join(SAM_ATTENTION_KINDS)}; "
                             f"got {self.sam_attention!r}")
        for name, choices in (("fusion", FUSIONS), ("query_token", QUERY_TOKENS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        if not isinstance(self.feature_enhancement, bool):
            raise ValueError(f"feature_enhancement must be true or false; got {self.feature_enhancement!r}")
        if isinstance(self.maa_depth, bool) or not isinstance(self.maa_depth, int) or self.maa_depth < 0:
            raise ValueError(f"maa_depth (K, the number of fusion blocks) must be an integer >= 0; "
                             f"got {self.maa_depth!r}")


# Values of the ablation switches `MarisConfig.fusion` and `MarisConfig.query_token`, MARIS's first.
FUSIONS = ("mutual", "vga_only", "lga_only", "separate", "none")
QUERY_TOKENS = ("multimodal", "learned", "sentence")


PRESETS: dict[str, dict] = {
    # SAM ViT-B/L/H image encoders at S = 1024 with CLIP ViT-B/16's text tower.
    "vit_b": dict(sam_embed_dim=768, sam_depth=12, sam_num_heads=12,
                  sam_global_attn_indexes=(2, 5, 8, 11), fe_taps=(5, 8, 11)),
    "vit_l": dict(sam_embed_dim=1024, sam_depth=24, sam_num_heads=16,
                  sam_global_attn_indexes=(5, 11, 17, 23), fe_taps=(11, 17, 23)),
    "vit_h": dict(sam_embed_dim=1280, sam_depth=32, sam_num_heads=16,
                  sam_global_attn_indexes=(7, 15, 23, 31), fe_taps=(15, 23, 31)),
    # CPU-sized model for tests and the built-in shapes demo (random frozen encoders).
    "tiny": dict(image_size=128, sam_embed_dim=128, sam_depth=4, sam_num_heads=4,
                 sam_global_attn_indexes=(1, 3), sam_window_size=4, fe_taps=(1, 2, 3),
                 embed_dim=96, text_width=64, text_layers=2, text_heads=4, text_embed_dim=64,
                 maa_heads=4, decoder_heads=4, decoder_mlp_dim=384),
}


def make_config(preset: str = "vit_b", **overrides) -> MarisConfig:
    """A preset's config (one of `PRESETS`) with `MarisConfig` field overrides.

    Raises:
        ValueError: unknown preset or field name.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    return config_from_dict({**PRESETS[preset], **overrides})


def config_to_dict(cfg: MarisConfig) -> dict:
    """Plain dict of a config (tuples as lists), for checkpoints."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def config_from_dict(d: dict) -> MarisConfig:
    """Inverse of `config_to_dict`; lists become tuples again.

    Raises:
        ValueError: a key is not a `MarisConfig` field.
    """
    names = {f.name for f in dataclasses.fields(MarisConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown MarisConfig field(s) {unknown}; known fields: {sorted(names)}")
    return MarisConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# --- Image encoder: SAM ViT (frozen) ----------------------------------------------------------

def build_sam_image_encoder(*, image_size: int, patch_size: int, embed_dim: int, depth: int,
                            num_heads: int, global_attn_indexes: tuple[int, ...],
                            window_size: int, out_chans: int) -> nn.Module:
    """SAM's `ImageEncoderViT` with the settings of SAM's own builder (`build_sam.py`).

    Returns:
        The encoder; its state-dict keys equal a SAM checkpoint's `image_encoder.*` keys.
    """
    return ImageEncoderViT(
        img_size=image_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_ratio=4, out_chans=out_chans, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
        global_attn_indexes=tuple(global_attn_indexes), window_size=window_size)


def sincos_position_table(height: int, width: int, dim: int) -> Tensor:
    """A fixed 2-D sine-cosine position table (the sinusoids of Vaswani et al. 2017, per axis).

    The first half of the channels encodes the row, the second half the column, each as
    [sin(p * w_k), cos(p * w_k)] for dim / 4 frequencies w_k = 10000^(-k / (dim / 4)).

    Returns:
        (height, width, dim) float32 table with values in [-1, 1].

    Raises:
        ValueError: dim is not a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"sincos_position_table: dim {dim} is not a multiple of 4")
    freqs = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)

    def axis(n: int) -> Tensor:
        angles = torch.arange(n, dtype=torch.float64)[:, None] * freqs  # (n, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (n, dim/2)

    rows = axis(height)[:, None].expand(height, width, dim // 2)  # (H, W, dim/2)
    cols = axis(width)[None].expand(height, width, dim // 2)  # (H, W, dim/2)
    return torch.cat([rows, cols], dim=-1).float()  # (H, W, dim)


def sam_encoder_taps(encoder: nn.Module, images: Tensor, taps: tuple[int, ...]
                     ) -> tuple[Tensor, list[Tensor]]:
    """SAM's `ImageEncoderViT.forward` unrolled, keeping the outputs of the blocks listed in `taps`.

    Args: encoder a SAM `ImageEncoderViT`; images (B, 3, S, S) normalised, padded; taps block indexes.
    Returns: neck (B, C, H, W) and one (B, H, W, D) tensor per tap, in `taps` order.
    """
    x = encoder.patch_embed(images)  # (B, H, W, D)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    kept: dict[int, Tensor] = {}
    for i, block in enumerate(encoder.blocks):
        x = block(x)  # (B, H, W, D)
        if i in taps:
            kept[i] = x
    neck = encoder.neck(x.permute(0, 3, 1, 2))  # (B, D, H, W) -> (B, C, H, W)
    return neck, [kept[i] for i in taps]


# --- SAM's ViT attention through scaled_dot_product_attention (opt-in) ------------------------
# segment-anything's `Attention.forward` materialises the logits (B * h, N, N), adds the decomposed
# relative-position terms and runs a separate softmax. `SDPASamAttention` computes the same function
# with F.scaled_dot_product_attention, the relative-position terms passed as its additive float
# mask, so PyTorch can pick a fused kernel on a GPU. The package is not edited: `set_sam_attention`
# switches the class of the existing modules, which keeps their parameters, state-dict keys and
# forward hooks (RISAM's adapters), and survives copy.deepcopy and pickling.

SamAttention = _sam.image_encoder.Attention  # segment-anything's ViT attention (the "stock" path)


def sam_rel_pos_bias(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, grid: tuple[int, int]) -> Tensor:
    """SAM's decomposed relative-position terms as an additive attention bias.

    bias[n, m] = q_n . R_h[y_n - y_m] + q_n . R_w[x_n - x_m] for query token n at grid position
    (y_n, x_n) and key token m (MViTv2's decomposed relative positions, Li et al., CVPR 2022), as
    segment-anything's `add_decomposed_rel_pos` adds them to the logits; q is the unscaled query.
    The tables are read with segment-anything's own `get_rel_pos`.

    Args:
        q: (B, h, N, d) queries of an (Hg, Wg) token grid, N = Hg * Wg (a window or the whole map).
        rel_pos_h: (2 Hg - 1, d) table of vertical offsets; rel_pos_w: (2 Wg - 1, d) horizontal.
        grid: (Hg, Wg).

    Returns:
        (B, h, N, N) bias, in q's dtype.
    """
    Hg, Wg = grid
    B, h, N, d = q.shape
    R_h = _sam.image_encoder.get_rel_pos(Hg, Hg, rel_pos_h).to(q.dtype)  # (Hg, Hg, d): [y_n, y_m]
    R_w = _sam.image_encoder.get_rel_pos(Wg, Wg, rel_pos_w).to(q.dtype)  # (Wg, Wg, d): [x_n, x_m]
    q_grid = q.reshape(B, h, Hg, Wg, d)  # (B, h, N, d) -> (B, h, Hg, Wg, d)
    rel_h = torch.einsum("bnyxd,ykd->bnyxk", q_grid, R_h)  # (B, h, Hg, Wg, Hg): per key row
    rel_w = torch.einsum("bnyxd,xkd->bnyxk", q_grid, R_w)  # (B, h, Hg, Wg, Wg): per key column
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B, h, Hg, Wg, Hg, Wg)
    return bias.reshape(B, h, N, N)  # query (y, x) x key (y, x) -> (B, h, N, N)


class SDPASamAttention(SamAttention):
    """segment-anything's ViT-block attention (SAM's `image_encoder.Attention`) through
    F.scaled_dot_product_attention.

    softmax(q k^T * scale + bias) v with bias = `sam_rel_pos_bias` passed as SDPA's additive float
    mask and scale = SAM's head_dim ** -0.5 (SDPA's default too, given explicitly). Same parameters
    as the parent (so the same state-dict keys); `set_sam_attention` makes existing modules of
    segment-anything's class into this one and back.
    """

    def forward(self, x: Tensor) -> Tensor:
        """x (B, Hg, Wg, D) -> (B, Hg, Wg, D); in a windowed block B counts the windows."""
        B, Hg, Wg, _ = x.shape
        N = Hg * Wg
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1)  # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (3, B, h, N, d) -> 3 x (B, h, N, d)
        bias = sam_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (Hg, Wg)) if self.use_rel_pos else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, Hg, Wg, -1)  # (B, N, h, d) -> (B, Hg, Wg, D)
        return self.proj(out)


_SAM_ATTENTION_CLASSES = {"stock": SamAttention, "sdpa": SDPASamAttention}


def set_sam_attention(encoder: nn.Module, kind: str) -> None:
    """Switch the attention of every ViT block of a SAM image encoder, in place and reversibly.

    Only the class of each `blocks[i].attn` changes (segment-anything's `Attention` for "stock",
    `SDPASamAttention` for "sdpa"); its parameters, state-dict keys and forward hooks stay, so
    official SAM checkpoints load strictly and RISAM's adapters keep working. Switch before
    `torch.compile`-ing the encoder.

    Args:
        encoder: a SAM `ImageEncoderViT`.
        kind: one of `SAM_ATTENTION_KINDS`.

    Raises:
        ValueError: an unknown kind. TypeError: a block's `attn` is not segment-anything's
            `Attention` (nor `SDPASamAttention`).
    """
    if kind not in _SAM_ATTENTION_CLASSES:
        raise ValueError(f"sam_attention must be one of {', '.join(SAM_ATTENTION_KINDS)}; got {kind!r}")
    for i, block in enumerate(encoder.blocks):  # check every block before switching any
        if type(block.attn) not in _SAM_ATTENTION_CLASSES.values():
            raise TypeError(f"blocks[{i}].attn is a {type(block.attn).__name__}, not segment-anything's "
                            f"image_encoder.Attention")
    for block in encoder.blocks:
        block.attn.__class__ = _SAM_ATTENTION_CLASSES[kind]


def get_sam_attention(encoder: nn.Module) -> str:
    """The attention kind of a SAM image encoder's blocks ("stock" or "sdpa").

    Raises:
        ValueError: the blocks do not all use one known kind.
    """
    by_class = {cls: kind for kind, cls in _SAM_ATTENTION_CLASSES.items()}
    kinds = {by_class.get(type(block.attn), type(block.attn).__name__) for block in encoder.blocks}
    if len(kinds) != 1 or not kinds <= set(SAM_ATTENTION_KINDS):
        raise ValueError(f"the encoder's blocks use attention {sorted(kinds)}, expected one of {SAM_ATTENTION_KINDS}")
    return kinds.pop()


# --- RISAM adapters on SAM's ViT blocks -------------------------------------------------------

class BottleneckAdapter(nn.Module):
    """Bottleneck adapter (Houlsby et al. 2019), RISAM's parameter-efficient fine-tuning of SAM.

    adapter(x) = up(GELU(down(x))), D -> hidden -> D, token-wise. `up` starts at zero, so
    `x + adapter(x)` is exactly `x` at initialisation and SAM's features are the starting point.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., D) -> (..., D)."""
        return self.up(F.gelu(self.down(x)))

    def residual_hook(self, _module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
        """Forward hook: replace a sub-layer's output by output + adapter(output).

        A bound method (not a closure), so `copy.deepcopy` / pickling of the model re-binds the
        hook to the copied adapter instead of calling the original's.
        """
        return output + self(output)


def attach_adapters(encoder: nn.Module, *, ratio: float) -> nn.ModuleList:
    """Add residual bottleneck adapters (width round(D * ratio)) after the attention and the MLP of
    every SAM ViT block, as forward hooks: SAM's code and state-dict keys stay as released. A windowed
    block's attention output arrives in window layout, padding included; the adapter is token-wise, so
    it commutes with SAM's window un-partition and cropping.

    Returns:
        ModuleList of one ModuleDict(attn=, mlp=) per block; the caller keeps it as a sub-module.

    Raises:
        ValueError: ratio is not positive.
    """
    if ratio <= 0:
        raise ValueError(f"adapter_ratio must be > 0, got {ratio}")
    adapters = nn.ModuleList()
    for block in encoder.blocks:
        D = block.norm1.normalized_shape[0]
        hidden = max(1, round(D * ratio))
        pair = nn.ModuleDict(dict(attn=BottleneckAdapter(D, hidden), mlp=BottleneckAdapter(D, hidden)))
        block.attn.register_forward_hook(pair["attn"].residual_hook)
        block.mlp.register_forward_hook(pair["mlp"].residual_hook)
        adapters.append(pair)
    return adapters


# --- Text encoder: CLIP text tower (frozen) ------------------------------------------------

class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """One pre-norm CLIP text block; names as OpenAI's (`attn`, `ln_1`, `mlp.c_fc`, ...)."""

    def __init__(self, *, width: int, heads: int) -> None:
        super().__init__()
        # batch_first changes no parameter name: in_proj_weight / out_proj load as released.
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """x (B, L, E), attn_mask (L, L) additive causal mask -> (B, L, E)."""
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """The stack of text blocks, under OpenAI's name `transformer.resblocks.N`."""

    def __init__(self, *, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width=width, heads=heads) for _ in range(layers))

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class CLIPTextEncoder(nn.Module):
    """CLIP's text tower (Radford et al. 2021), the linguistic encoder of MARIS (Fig. 2).

    Per-word features F_w are the `ln_final` outputs; the sentence feature F_s is the EOT
    position's feature times `text_projection`, CLIP's own sentence embedding. The attention is
    causal, so the features of positions up to EOT never depend on the padding after it.
    """

    def __init__(self, *, vocab_size: int, context_length: int, width: int, layers: int,
                 heads: int, embed_dim: int) -> None:
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = TextTransformer(width=width, layers=layers, heads=heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        # OpenAI's initialisation of the embeddings; released weights replace them.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def forward(self, ids: Tensor, word_mask: Tensor, token_embeddings: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """ids (B, L), SOT first and EOT at `word_mask.sum(1) - 1`; word_mask (B, L) bool, True from SOT
        through EOT; token_embeddings optional (B, L, E) in place of `token_embedding(ids)` (e.g. a learned
        mask embedding at some positions) -> F_w (B, L, E) per-word features, F_s (B, E_proj) sentence."""
        B, L = ids.shape
        x = self.token_embedding(ids) if token_embeddings is None else token_embeddings
        x = x + self.positional_embedding[:L]  # (B, L, E)
        causal = torch.full((L, L), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        x = self.ln_final(self.transformer(x, causal))  # (B, L, E) = F_w
        # EOT from the mask's length, never argmax(ids): id 0 is a real token and the ids of
        # a custom vocabulary need not put EOT highest.
        eot = word_mask.sum(1) - 1  # (B,)
        sentence = x[torch.arange(B, device=x.device), eot] @ self.text_projection  # (B, E_proj)
        return x, sentence


# --- Feature Enhancement (Fig. 2) -------------------------------------------------------------

class FeatureEnhancement(nn.Module):
    """Feature Enhancement: fuse shallow/middle/deep SAM features into the image embedding.

    F_v = F_sam + conv_fuse([LN -> Linear(D -> C)](tap_i) for each tap), the last conv
    zero-initialised so that F_v == F_sam at initialisation.
    """

    def __init__(self, *, in_dim: int, dim: int, num_taps: int = 3, zero_init: bool = True) -> None:
        super().__init__()
        self.tap_norms = nn.ModuleList(nn.LayerNorm(in_dim) for _ in range(num_taps))
        self.tap_projs = nn.ModuleList(nn.Linear(in_dim, dim) for _ in range(num_taps))
        # NOTE(paper): the fusion layout (1x1 -> 3x3 -> LN2d -> GELU -> 1x1) is our
        # reconstruction of the paper's "global and local" fusion.
        self.fuse = nn.Sequential(
            nn.Conv2d(num_taps * dim, dim, kernel_size=1),  # mix the taps
            nn.Conv2d(dim, dim, kernel_size=3, padding=1),  # local context
            LayerNorm2d(dim),
            nn.GELU(),
            nn.Conv2d(dim, dim, kernel_size=1),
        )
        if zero_init:
            nn.init.zeros_(self.fuse[-1].weight)
            nn.init.zeros_(self.fuse[-1].bias)

    def forward(self, taps: list[Tensor], neck: Tensor) -> Tensor:
        """Args: taps list of (B, H, W, D); neck F_sam (B, C, H, W). Returns F_v (B, N, C)."""
        projected = [proj(norm(t)) for t, norm, proj in zip(taps, self.tap_norms, self.tap_projs)]
        x = torch.cat(projected, dim=-1).permute(0, 3, 1, 2)  # (B, H, W, 3C) -> (B, 3C, H, W)
        x = neck + self.fuse(x)  # (B, C, H, W)
        return x.flatten(2).transpose(1, 2)  # (B, N, C)


# --- Mutual-Aware Attention (Fig. 4) --------------------------------------------------------

def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, T, h*d) -> (B, h, T, d)."""
    B, T, _ = x.shape
    return x.view(B, T, heads, -1).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, h, T, d) -> (B, T, h*d)."""
    B, h, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, h * d)


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear, the FFN of a Mutual-Aware Attention branch."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MutualAwareAttention(nn.Module):
    """Mutual-Aware Attention block (Fig. 4): one affinity A serves both directions.

        Q = (F_v + P_v) W_q   (B, h, N, d)      K = (F_l + P_l) W_k   (B, h, L, d)
        A = Q K^T / sqrt(d)   (B, h, N, L)      computed once
        Vision-Guided Attention:   F_v' = F_v + W_o,v softmax_L(A masked by M) (F_l W_v,l)
        Language-Guided Attention: F_l' = F_l + W_o,l softmax_N(A^T) (F_v W_v,v)
        each followed by LayerNorm -> FFN (residual) -> LayerNorm.

    Both branches read the same inputs (parallel, not one after the other). Padded words
    (M False) take no part in the Vision-Guided softmax and their Language-Guided outputs, and
    whole F_l' rows, are zero.

    The paper's ablations of the block (defaults: MARIS), each building only the weights it uses:
    `language_guided=False` keeps Vision-Guided Attention alone (F_l' = F_l); `vision_guided=False`
    keeps Language-Guided Attention alone (F_v' = F_v); `shared_affinity=False` gives Language-Guided
    Attention its own logits A_l = ((F_l + P_l) W_q,l) ((F_v + P_v) W_k,v)^T / sqrt(d) (B, h, L, N)
    instead of A^T, so the two directions no longer share an affinity.
    """

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0, vision_guided: bool = True,
                 language_guided: bool = True, shared_affinity: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MutualAwareAttention: dim {dim} is not divisible by {num_heads} heads")
        if not (vision_guided or language_guided):
            raise ValueError("MutualAwareAttention needs at least one of vision_guided and language_guided")
        self.num_heads = num_heads
        self.vision_guided, self.language_guided = vision_guided, language_guided
        # Built in MARIS's order whatever the switches, so the default block's initial weights never move.
        self.q_proj = nn.Linear(dim, dim)  # W_q on visual tokens
        self.k_proj = nn.Linear(dim, dim)  # W_k on words
        self.v_proj_words = nn.Linear(dim, dim) if vision_guided else None  # W_v,l: values for VGA
        self.v_proj_visual = nn.Linear(dim, dim) if language_guided else None  # W_v,v: values for LGA
        self.out_proj_visual = nn.Linear(dim, dim) if vision_guided else None  # W_o,v
        self.out_proj_words = nn.Linear(dim, dim) if language_guided else None  # W_o,l
        hidden = int(dim * mlp_ratio)
        self.norm_visual1, self.norm_visual2 = (nn.LayerNorm(dim), nn.LayerNorm(dim)) if vision_guided else (None, None)
        self.norm_words1, self.norm_words2 = (nn.LayerNorm(dim), nn.LayerNorm(dim)) if language_guided else (None, None)
        self.mlp_visual = FeedForward(dim, hidden) if vision_guided else None
        self.mlp_words = FeedForward(dim, hidden) if language_guided else None
        # Ablation "separate": Language-Guided Attention's own queries (words) and keys (visual tokens).
        # A block with one direction has one affinity either way.
        self.shared_affinity = shared_affinity or not (vision_guided and language_guided)
        if not self.shared_affinity:
            self.q_proj_words = nn.Linear(dim, dim)  # W_q,l on words
            self.k_proj_visual = nn.Linear(dim, dim)  # W_k,v on visual tokens

    def attention_weights(self, visual: Tensor, words: Tensor, word_mask: Tensor,
                          visual_pe: Tensor, word_pe: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The shared logits A and the two attention maps derived from it.

        Args:
            visual: F_v (B, N, C); words: F_l (B, L, C); word_mask: M (B, L) bool;
            visual_pe: P_v (N, C) or (B, N, C); word_pe: P_l (L, C) or (B, L, C).

        Returns:
            A (B, h, N, L); Vision-Guided weights softmax_L(A masked) (B, h, N, L);
            Language-Guided weights softmax_N(A^T) (B, h, L, N). A branch the block does not have gives
            None; without a shared affinity the Language-Guided weights are softmax_N(A_l).
        """
        q = _split_heads(self.q_proj(visual + visual_pe), self.num_heads)  # (B, h, N, d)
        k = _split_heads(self.k_proj(words + word_pe), self.num_heads)  # (B, h, L, d)
        # A is materialised once on purpose: F.scaled_dot_product_attention cannot hand its
        # logits to a second, transposed softmax, and the paper's point is that VGA and LGA
        # share one affinity. (N x L is small: 4096 x 20 per head at S = 1024.)
        logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, h, N, L)
        # NOTE(paper): only padded words are masked; the padded image area (bottom/right) stays
        # in LGA's softmax over N, as SAM's decoder keeps it in its image attention.
        padded = ~word_mask[:, None, None, :]  # (B, 1, 1, L)
        vga = logits.masked_fill(padded, float("-inf")).softmax(dim=-1) if self.vision_guided else None  # over L
        if not self.language_guided:
            return logits, vga, None
        if self.shared_affinity:
            lga = logits.transpose(-2, -1).softmax(dim=-1)  # (B, h, L, N), over N
        else:  # ablation "separate": LGA's own affinity A_l
            q_words = _split_heads(self.q_proj_words(words + word_pe), self.num_heads)  # (B, h, L, d)
            k_visual = _split_heads(self.k_proj_visual(visual + visual_pe), self.num_heads)  # (B, h, N, d)
            lga = (q_words @ k_visual.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)  # (B, h, L, N)
        return logits, vga, lga

    def forward(self, visual: Tensor, words: Tensor, word_mask: Tensor, visual_pe: Tensor,
                word_pe: Tensor) -> tuple[Tensor, Tensor]:
        """Args as `attention_weights`. Returns F_v' (B, N, C), F_l' (B, L, C)."""
        _, vga, lga = self.attention_weights(visual, words, word_mask, visual_pe, word_pe)
        new_visual, new_words = visual, words  # a branch the block does not have passes its input through
        if self.vision_guided:
            v_words = _split_heads(self.v_proj_words(words), self.num_heads)  # (B, h, L, d)
            to_visual = self.out_proj_visual(_merge_heads(vga @ v_words))  # (B, N, C)
            # Vision-Guided branch: language-aware visual features.
            new_visual = self.norm_visual1(visual + to_visual)
            new_visual = self.norm_visual2(new_visual + self.mlp_visual(new_visual))
        if self.language_guided:
            v_visual = _split_heads(self.v_proj_visual(visual), self.num_heads)  # (B, h, N, d)
            to_words = self.out_proj_words(_merge_heads(lga @ v_visual))  # (B, L, C)
            real = word_mask[..., None].to(words.dtype)  # (B, L, 1)
            to_words = to_words * real  # padded words' Language-Guided outputs are zero
            # Language-Guided branch: vision-aware linguistic features; padded rows stay zero so
            # nothing downstream can read what the padding held.
            new_words = self.norm_words1(words + to_words)
            new_words = self.norm_words2(new_words + self.mlp_words(new_words)) * real
        return new_visual, new_words


# --- Mutual-Aware Mask Decoder (Fig. 5) --------------------------------------------------------

class MaskedAttention(nn.Module):
    """SAM's decoder attention (q/k/v/out projections, internal width C / downsample) with an
    optional key padding mask; names as `segment_anything.modeling.transformer.Attention`."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        inner = dim // downsample_rate
        if inner % num_heads:
            raise ValueError(f"MaskedAttention: inner width {inner} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """q (B, Tq, C), k/v (B, Tk, C), key_mask (B, Tk) bool True = attend -> (B, Tq, C)."""
        q = _split_heads(self.q_proj(q), self.num_heads)  # (B, h, Tq, d)
        k = _split_heads(self.k_proj(k), self.num_heads)  # (B, h, Tk, d)
        v = _split_heads(self.v_proj(v), self.num_heads)  # (B, h, Tk, d)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Tk)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, Tq, d)
        return self.out_proj(_merge_heads(out))


class MLPBlock(nn.Module):
    """SAM's `lin1` -> ReLU -> `lin2` token MLP (names load SAM's weights)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayAttentionBlock(nn.Module):
    """One layer of SAM's two-way transformer, with a key padding mask for the word tokens:
    token self-attention, tokens -> image, token MLP, image -> tokens (each + LayerNorm)."""

    def __init__(self, *, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int,
                 skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = MaskedAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = MaskedAttention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = MaskedAttention(dim, num_heads, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor,
                token_mask: Tensor) -> tuple[Tensor, Tensor]:
        """queries (B, T, C) tokens, keys (B, N, C) image, pes alike, token_mask (B, T)."""
        if self.skip_first_layer_pe:
            # As SAM: the first layer's self-attention replaces the tokens (no residual, no PE),
            # so SAM's released first-layer weights mean what they meant there.
            queries = self.self_attn(queries, queries, queries, token_mask)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries, token_mask)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        # Image tokens attend to the real tokens only.
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries, token_mask))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's two-way transformer (names as `mask_decoder.transformer.*`) plus a token mask."""

    def __init__(self, *, depth: int, dim: int, num_heads: int, mlp_dim: int,
                 downsample_rate: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim=dim, num_heads=num_heads, mlp_dim=mlp_dim,
                                 downsample_rate=downsample_rate, skip_first_layer_pe=(i == 0))
            for i in range(depth))
        self.final_attn_token_to_image = MaskedAttention(dim, num_heads, downsample_rate)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: Tensor, image_pe: Tensor, tokens: Tensor, token_mask: Tensor
                ) -> tuple[Tensor, Tensor]:
        """image/image_pe (B, N, C), tokens (B, T, C), token_mask (B, T) -> (B, T, C), (B, N, C)."""
        queries, keys = tokens, image
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, image_pe, token_mask)
        attn = self.final_attn_token_to_image(queries + tokens, keys + image_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class MutualAwareMaskDecoder(nn.Module):
    """Mutual-Aware Mask Decoder (Fig. 5): SAM's decoder driven by a multi-modal query token.

    tokens = [query token (1); vision-aware words F_l' (L, masked)], where the multi-modal
    query token = learned embedding + Linear(E_proj -> C)(F_s) carries the sentence
    ("explicit linguistic guidance"). After the two-way transformer, the query token's state
    -> hypernetwork MLP (C -> C -> C/8) dotted with the upscaled image (C/8, 4H, 4W) = logits.
    The query token's final state is returned too (MARIS's optional no-target head reads it).

    The paper's ablation of the query token (`query_token`, default "multimodal"): "learned" = the
    learned embedding alone (SAM's plain mask token; the sentence reaches the decoder only through
    F_l'), "sentence" = Linear(E_proj -> C)(F_s) alone; the part left out is not built.
    """

    def __init__(self, *, dim: int, sentence_dim: int, depth: int, num_heads: int, mlp_dim: int,
                 downsample_rate: int = 2, query_token: str = "multimodal") -> None:
        super().__init__()
        if query_token not in QUERY_TOKENS:
            raise ValueError(f"query_token must be one of {', '.join(QUERY_TOKENS)}; got {query_token!r}")
        self.transformer = TwoWayTransformer(depth=depth, dim=dim, num_heads=num_heads,
                                             mlp_dim=mlp_dim, downsample_rate=downsample_rate)
        # learned part of the multi-modal query token
        self.query_token = nn.Embedding(1, dim) if query_token != "sentence" else None
        self.sentence_proj = nn.Linear(sentence_dim, dim) if query_token != "learned" else None  # F_s -> C
        # Same layout (indexes 0, 1, 3 hold weights) as SAM's `output_upscaling`.
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        # A one-entry list so the key is `output_hypernetworks_mlps.0.*`: SAM's MLP for its
        # single-mask token, the token our query token replaces.
        self.output_hypernetworks_mlps = nn.ModuleList([SamMLP(dim, dim, dim // 8, 3)])

    def forward(self, visual: Tensor, words: Tensor, word_mask: Tensor, sentence: Tensor,
                image_pe: Tensor, size: tuple[int, int]) -> Tensor:
        """F_v' (B, N, C), F_l' (B, L, C), word_mask (B, L), F_s (B, E_proj), SAM's dense PE P_v (N, C) and
        the grid size (H, W) -> mask logits (B, 1, 4H, 4W) and the query token's final state (B, C)."""
        B, N, C = visual.shape
        H, W = size
        if self.query_token is None:  # ablation "sentence": the projected sentence feature alone
            query = self.sentence_proj(sentence)  # (B, C)
        elif self.sentence_proj is None:  # ablation "learned": SAM's plain mask token, no sentence
            query = self.query_token.weight.expand(B, C)  # (1, C) -> (B, C)
        else:  # MARIS: the multi-modal query token
            query = self.query_token.weight + self.sentence_proj(sentence)  # (B, C)
        tokens = torch.cat([query[:, None], words], dim=1)  # (B, 1 + L, C)
        token_mask = torch.cat([word_mask.new_ones(B, 1), word_mask], dim=1)  # (B, 1 + L)
        # NOTE(paper): as in SAM, the initial tokens serve as their own positional encoding.
        tokens, image = self.transformer(visual, image_pe.expand(B, N, C), tokens, token_mask)
        image = image.transpose(1, 2).reshape(B, C, H, W)  # (B, N, C) -> (B, C, H, W)
        upscaled = self.output_upscaling(image)  # (B, C/8, 4H, 4W)
        hyper = self.output_hypernetworks_mlps[0](tokens[:, 0])  # (B, C/8)
        logits = hyper[:, None] @ upscaled.flatten(2)  # (B, 1, C/8) @ (B, C/8, 16N) -> (B, 1, 16N)
        return logits.view(B, 1, upscaled.shape[-2], upscaled.shape[-1]), tokens[:, 0]  # (B, 1, 4H, 4W), (B, C)


# --- MARIS ----------------------------------------------------------------------------------

def _check_text(ids: Tensor, word_mask: Tensor, max_length: int) -> None:
    """Raise ValueError unless ids/word_mask are (B, L) with a prefix mask containing SOT."""
    if ids.dim() != 2 or word_mask.shape != ids.shape:
        raise ValueError(f"ids and word_mask must both be (B, L); got {tuple(ids.shape)} and "
                         f"{tuple(word_mask.shape)}")
    if word_mask.dtype != torch.bool:
        raise ValueError(f"word_mask must be a bool tensor, got {word_mask.dtype}")
    L = ids.shape[1]
    if L > max_length:
        raise ValueError(f"{L} text tokens exceed the text tower's context length {max_length}")
    lengths = word_mask.sum(1)  # (B,)
    prefix = torch.arange(L, device=word_mask.device)[None] < lengths[:, None]  # (B, L)
    if (lengths < 1).any() or not torch.equal(prefix, word_mask):
        raise ValueError("word_mask must be True from SOT through EOT and False after it "
                         "(a non-empty prefix) in every row")


class MARIS(nn.Module):
    """MARIS (Fig. 2): frozen SAM + CLIP encoders, Feature Enhancement, K Mutual-Aware
    Attention blocks and the Mutual-Aware Mask Decoder.

    Build with `build_maris` (which also loads weights); the sub-modules take explicit
    arguments and can be copied out alone. The config's ablation switches decide which modules exist:
    `fusion` the kind of the K = `maa_depth` blocks (none, and no word position encoding P_l, for
    "none"), `query_token` the decoder's query token, `feature_enhancement` whether the Feature
    Enhancement module exists (`feature_enhancement` is None without it).
    """

    def __init__(self, cfg: MarisConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        if not all(0 <= t < cfg.sam_depth for t in cfg.fe_taps):
            raise ValueError(f"fe_taps {cfg.fe_taps} must index blocks 0..{cfg.sam_depth - 1}")
        if cfg.context_length > cfg.text_context_length:
            raise ValueError(f"context_length {cfg.context_length} > text_context_length "
                             f"{cfg.text_context_length}")
        self.cfg = cfg
        C = cfg.embed_dim
        self.image_encoder = build_sam_image_encoder(
            image_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.sam_embed_dim,
            depth=cfg.sam_depth, num_heads=cfg.sam_num_heads,
            global_attn_indexes=cfg.sam_global_attn_indexes, window_size=cfg.sam_window_size,
            out_chans=C)
        if cfg.sam_pos_embed_init not in ("zeros", "sincos"):
            raise ValueError(f"sam_pos_embed_init must be 'zeros' or 'sincos', got {cfg.sam_pos_embed_init!r}")
        if cfg.sam_pos_embed_init == "sincos":  # (1, H, W, D), deterministic: draws nothing from the RNG
            H = cfg.image_size // cfg.patch_size
            with torch.no_grad():
                self.image_encoder.pos_embed.copy_(sincos_position_table(H, H, cfg.sam_embed_dim)[None])
        set_sam_attention(self.image_encoder, cfg.sam_attention)  # "stock" leaves SAM's code as is
        self.text_encoder = CLIPTextEncoder(
            vocab_size=cfg.vocab_size, context_length=cfg.text_context_length,
            width=cfg.text_width, layers=cfg.text_layers, heads=cfg.text_heads,
            embed_dim=cfg.text_embed_dim)
        # SAM's dense positional encoding P_v (random Fourier features, C/2 frequencies);
        # its matrix loads from `prompt_encoder.pe_layer.*` of a SAM checkpoint.
        self.pe_layer = PositionEmbeddingRandom(C // 2)
        # Ablation `feature_enhancement=False`: F_v = F_sam, no module (see `forward_features`).
        self.feature_enhancement = (
            FeatureEnhancement(in_dim=cfg.sam_embed_dim, dim=C, num_taps=len(cfg.fe_taps), zero_init=cfg.fe_zero_init)
            if cfg.feature_enhancement else None)
        self.word_proj = nn.Linear(cfg.text_width, C)  # F_w (E) -> F_l (C)
        # Ablation `fusion`: which branches of Fig. 4 a block has, and whether they share A; "none" builds
        # no block, and then no word position encoding P_l either (only the blocks read it).
        branches = dict(mutual=(True, True, True), vga_only=(True, False, True), lga_only=(False, True, True),
                        separate=(True, True, False))  # (Vision-Guided, Language-Guided, shared affinity)
        depth = 0 if cfg.fusion == "none" else cfg.maa_depth  # K
        self.word_pos = (nn.Parameter(torch.randn(cfg.text_context_length, C) * cfg.word_pos_std)
                         if depth else None)  # P_l
        self.maa_blocks = nn.ModuleList(
            MutualAwareAttention(dim=C, num_heads=cfg.maa_heads, mlp_ratio=cfg.maa_mlp_ratio,
                                 vision_guided=branches[cfg.fusion][0], language_guided=branches[cfg.fusion][1],
                                 shared_affinity=branches[cfg.fusion][2])
            for _ in range(depth))
        self.mask_decoder = MutualAwareMaskDecoder(
            dim=C, sentence_dim=cfg.text_embed_dim, depth=cfg.decoder_depth,
            num_heads=cfg.decoder_heads, mlp_dim=cfg.decoder_mlp_dim,
            downsample_rate=cfg.decoder_attention_downsample_rate, query_token=cfg.query_token)
        # Frozen encoders: no gradients, always in eval mode (see `train`).
        for module in (self.image_encoder, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        # RISAM adapters: the only trainable part of the image encoder, kept outside it.
        self.image_adapters = (attach_adapters(self.image_encoder, ratio=cfg.adapter_ratio)
                               if cfg.adapters else None)
        # No-target head (ReLA style): built last, so the other modules' initial weights do not
        # depend on it; absent (None) when its loss weight is 0.
        if cfg.no_target_weight < 0:
            raise ValueError(f"no_target_weight must be >= 0, got {cfg.no_target_weight}")
        self.no_target_head = SamMLP(C, C, 1, 2) if cfg.no_target_weight > 0 else None  # C -> C -> 1

    def train(self, mode: bool = True) -> "MARIS":
        """Set training mode on the new modules; the frozen encoders stay in eval mode."""
        super().train(mode)
        self.image_encoder.eval()
        self.text_encoder.eval()
        return self

    @staticmethod
    def _grad_needed(module: nn.Module) -> bool:
        """Whether autograd must record `module` (only if some parameter of it trains)."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())

    def encode_image(self, images: Tensor) -> dict:
        """Run the frozen SAM image encoder (with its adapters when `cfg.adapters`).

        Args:
            images: (B_img, 3, S, S) normalised, padded images.

        Returns:
            dict(neck=(B_img, C, H, W), taps=[(B_img, H, W, D)] * len(fe_taps)).

        Raises:
            ValueError: images are not (B_img, 3, S, S) at the configured S.
        """
        S = self.cfg.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, S, S):
            raise ValueError(f"images must be (B, 3, {S}, {S}); got {tuple(images.shape)}")
        dtype = self.image_encoder.patch_embed.proj.weight.dtype
        # With adapters on, autograd records the frozen encoder to reach the adapters.
        grad = self._grad_needed(self.image_encoder) or (
            self.image_adapters is not None and self._grad_needed(self.image_adapters))
        with torch.set_grad_enabled(grad):
            neck, taps = sam_encoder_taps(self.image_encoder, images.to(dtype), tuple(self.cfg.fe_taps))
        return dict(neck=neck, taps=taps)

    def encode_text(self, ids: Tensor, word_mask: Tensor, token_embeddings: Tensor | None = None
                    ) -> tuple[Tensor, Tensor]:
        """Frozen CLIP text tower: F_w (B, L, E), F_s (B, E_proj); see `CLIPTextEncoder`."""
        _check_text(ids, word_mask, self.cfg.text_context_length)
        # Gradients flow through the frozen tower only to reach a trainable token_embeddings.
        grad = self._grad_needed(self.text_encoder) or (
            token_embeddings is not None and token_embeddings.requires_grad and torch.is_grad_enabled())
        with torch.set_grad_enabled(grad):
            return self.text_encoder(ids, word_mask, token_embeddings)

    def forward_features(self, ids: Tensor, word_mask: Tensor, *, images: Tensor | None = None,
                         image_features: dict | None = None, image_index: Tensor | None = None,
                         token_embeddings: Tensor | None = None) -> dict:
        """The full model, returning the intermediate features as well as the logits.

        Args:
            ids: (B, L) token ids; word_mask: (B, L) bool, True from SOT through EOT.
            images (B_img, 3, S, S), or image_features: the dict of `encode_image` (e.g. cached, any dtype).
            image_index: (B,) long, the image row of each sentence (default arange(B), B_img == B);
                Feature Enhancement runs once per image row.
            token_embeddings: optional (B, L, E) override of the CLIP token embeddings.

        Returns:
            dict(logits=(B, 1, 4H, 4W), visual=F_v' (B, N, C), words=F_l' (B, L, C),
                 sentence=F_s (B, E_proj), word_features=F_w (B, L, E),
                 enhanced=F_v (B, N, C) the Feature Enhancement output per sentence,
                 query=(B, C) the multi-modal query token's final state,
                 no_target_logit=(B,) the no-target head's logit, None without the head).

        Raises:
            ValueError: neither or both of images / image_features, bad image_index, bad text.
        """
        if (images is None) == (image_features is None):
            raise ValueError("give exactly one of images and image_features")
        if image_features is None:
            image_features = self.encode_image(images)
        # Cached features may be fp16 and on another device: bring them to the model's.
        device, dtype = self.word_proj.weight.device, self.word_proj.weight.dtype
        neck = image_features["neck"].to(device, dtype)  # (B_img, C, H, W)
        taps = [t.to(device, dtype) for t in image_features["taps"]]  # (B_img, H, W, D) each
        B = ids.shape[0]
        B_img, C, H, W = neck.shape
        if image_index is None:
            if B_img != B:
                raise ValueError(f"{B} sentences but {B_img} image rows: pass image_index")
            image_index = torch.arange(B, device=ids.device)
        elif (image_index.shape != (B,) or image_index.dtype != torch.long
              or image_index.min() < 0 or image_index.max() >= B_img):
            raise ValueError(f"image_index must be a (B={B},) long tensor with values in "
                             f"[0, {B_img}); got {tuple(image_index.shape)} {image_index.dtype}")

        if self.feature_enhancement is not None:
            enhanced = self.feature_enhancement(taps, neck)  # (B_img, N, C) = F_v
        else:  # ablation without Feature Enhancement: F_v = SAM's neck output F_sam
            enhanced = neck.flatten(2).transpose(1, 2)  # (B_img, C, H, W) -> (B_img, N, C)
        enhanced = enhanced[image_index]  # (B_img, N, C) -> (B, N, C)
        word_features, sentence = self.encode_text(ids, word_mask, token_embeddings)  # F_w, F_s
        visual_pe = self.visual_pe((H, W))  # (N, C) = P_v
        visual, words = self.fuse(enhanced, word_features, word_mask, visual_pe)
        logits, query = self.mask_decoder(visual, words, word_mask, sentence, visual_pe, (H, W))
        no_target_logit = None if self.no_target_head is None else self.no_target_head(query)[:, 0]  # (B,)
        return dict(logits=logits, visual=visual, words=words, sentence=sentence,
                    word_features=word_features, enhanced=enhanced, query=query, no_target_logit=no_target_logit)

    def visual_pe(self, size: tuple[int, int]) -> Tensor:
        """SAM's dense positional encoding P_v (N, C) for an (H, W) grid, in the model's dtype.

        Computed in fp32 even under autocast: it is a matmul followed by sin/cos of values up to
        ~2*pi*|gaussian|, and in bf16 the encoding was off by up to 0.2 (on values in [-1, 1]).
        """
        device = self.pe_layer.positional_encoding_gaussian_matrix.device
        with torch.autocast(device_type=device.type, enabled=False):
            pe = self.pe_layer(size)  # (C, H, W), fp32
        return pe.to(self.word_proj.weight.dtype).flatten(1).transpose(0, 1)  # (C, H, W) -> (N, C)

    def fuse(self, visual: Tensor, word_features: Tensor, word_mask: Tensor, visual_pe: Tensor
             ) -> tuple[Tensor, Tensor]:
        """Word projection and the K Mutual-Aware Attention blocks (Fig. 4): F_v (B, N, C), F_w (B, L, E),
        word_mask (B, L), P_v (N, C) -> F_v' (B, N, C) language-aware visual, F_l' (B, L, C) vision-aware words.
        With `fusion="none"` (no blocks) F_v' = F_v and F_l' = F_l."""
        L = word_features.shape[1]
        words = self.word_proj(word_features)  # (B, L, C) = F_l
        word_pe = None if self.word_pos is None else self.word_pos[:L]  # (L, C) = P_l
        for block in self.maa_blocks:
            visual, words = block(visual, words, word_mask, visual_pe, word_pe)
        return visual, words

    def forward(self, images: Tensor | None, ids: Tensor, word_mask: Tensor, *,
                image_index: Tensor | None = None, image_features: dict | None = None) -> Tensor:
        """Mask logits (B, 1, 4H, 4W), the same in train and eval mode; arguments as `forward_features`."""
        return self.forward_features(ids, word_mask, images=images, image_features=image_features,
                                     image_index=image_index)["logits"]

    @torch.no_grad()
    def predict(self, images: Tensor, ids: Tensor, word_mask: Tensor) -> Tensor:
        """Mask probabilities (B, 1, S, S) at the (padded) input size; threshold at 0.5."""
        logits = self(images, ids, word_mask)  # (B, 1, 4H, 4W)
        S = self.cfg.image_size
        return F.interpolate(logits.float(), size=(S, S), mode="bilinear", align_corners=False).sigmoid()

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Parameters with requires_grad, plus the buffers of modules owning such parameters."""
        owners = {name.rpartition(".")[0] for name, p in self.named_parameters() if p.requires_grad}
        state = self.state_dict()
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        keep |= {n for n, _ in self.named_buffers() if n.rpartition(".")[0] in owners}
        return {k: v for k, v in state.items() if k in keep}

    def load_trainable_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load `trainable_state_dict` output strictly.

        Raises:
            KeyError: a key is missing or unexpected (the first one is named).
            ValueError: a shape differs (key and both shapes named).
        """
        expected = self.trainable_state_dict()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if missing:
            raise KeyError(f"trainable state dict lacks {missing[0]!r} ({len(missing)} missing)")
        if unexpected:
            raise KeyError(f"trainable state dict has unexpected key {unexpected[0]!r} "
                           f"({len(unexpected)} unexpected)")
        for k, v in expected.items():
            if v.shape != state_dict[k].shape:
                raise ValueError(f"trainable state dict {k!r}: shape {tuple(state_dict[k].shape)}, "
                                 f"model expects {tuple(v.shape)}")
        self.load_state_dict(state_dict, strict=False)


# --- Losses ------------------------------------------------------------------------------------

def _valid_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Per-sample mean of x (B, ...) over the valid (B, ...) pixels -> (B,)."""
    valid = valid.to(x.dtype)
    return (x * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, valid: Tensor | None = None, *,
                       alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss (Lin et al. 2017), averaged over the valid pixels of each sample.

    Args:
        logits, targets ({0, 1} or soft), valid (bool or {0, 1}, None = all): (B, ...) alike.

    Returns:
        (B,) non-negative losses.
    """
    logits, targets = logits.float(), targets.float()
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)  # probability given to the true class
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return _valid_mean(loss, torch.ones_like(loss) if valid is None else valid)


def dice_loss(logits: Tensor, targets: Tensor, valid: Tensor | None = None, *,
              smooth: float = 1.0) -> Tensor:
    """Dice loss 1 - (2 sum(p t) + s) / (sum p + sum t + s) over the valid pixels.

    Args:
        logits, targets, valid: (B, ...) alike; `smooth` s > 0 keeps empty masks finite.

    Returns:
        (B,) losses in [0, 1] (since 2 p t <= p + t for p, t in [0, 1]).
    """
    prob = logits.float().sigmoid().flatten(1)
    targets = targets.float().flatten(1)
    if valid is not None:
        v = valid.to(prob.dtype).flatten(1)
        prob, targets = prob * v, targets * v
    inter = (prob * targets).sum(1)
    return 1 - (2 * inter + smooth) / (prob.sum(1) + targets.sum(1) + smooth)


def segmentation_loss(logits: Tensor, masks: Tensor, valid: Tensor | None, cfg: MarisConfig) -> dict:
    """MARIS's training loss: weighted focal + dice on the logits upsampled to the input size.

    Args:
        logits: (B, 1, h, w) mask logits; masks: (B, S, S) targets in {0, 1};
        valid: (B, S, S) bool, True inside the image (padding ignored), or None;
        cfg: supplies loss weights, focal alpha/gamma and the dice smoothing.

    Returns:
        dict(loss, focal, dice) of scalars (batch means; loss is the weighted sum).
    """
    S = masks.shape[-2:]
    up = F.interpolate(logits.float(), size=S, mode="bilinear", align_corners=False)[:, 0]  # (B, S, S)
    focal = sigmoid_focal_loss(up, masks, valid, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma).mean()
    dice = dice_loss(up, masks, valid, smooth=cfg.dice_smooth).mean()
    loss = cfg.loss_focal_weight * focal + cfg.loss_dice_weight * dice
    return dict(loss=loss, focal=focal, dice=dice)


def no_target_loss(logit: Tensor, no_target: Tensor) -> Tensor:
    """Binary cross-entropy of the no-target head (ReLA's no-target classification loss).

    Args:
        logit: (B,) no-target logits (`forward_features(...)["no_target_logit"]`).
        no_target: (B,) bool or {0, 1}, True where the expression refers to nothing.

    Returns:
        scalar, the batch mean, computed in fp32.

    Raises:
        ValueError: the two do not have the same number of entries.
    """
    if logit.numel() != no_target.numel():
        raise ValueError(f"no_target_loss: {logit.numel()} logits but {no_target.numel()} no_target labels")
    return F.binary_cross_entropy_with_logits(logit.float().reshape(-1),
                                              no_target.to(logit.device, torch.float32).reshape(-1))


# --- MagNet: Mask Grounding (Chng et al., CVPR 2024) ------------------------------------------

def choose_masked_words(word_mask: Tensor, ratio: float, generator: torch.Generator | None = None
                        ) -> Tensor:
    """Pick the word tokens that Mask Grounding hides, uniformly at random per sentence.

    Candidates are the real words between SOT (position 0) and EOT (position length - 1), never
    padding. A sentence with n = length - 2 > 0 words gets exactly max(1, round(ratio * n)) of them;
    one with no word gets none. word_mask (B, L) -> (B, L) bool, True at the chosen positions;
    `generator` None draws from the global RNG of word_mask's device.

    Raises:
        ValueError: ratio outside (0, 1] or word_mask not a (B, L) bool tensor.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"mask_ratio must be in (0, 1], got {ratio}")
    if word_mask.dim() != 2 or word_mask.dtype != torch.bool:
        raise ValueError(f"word_mask must be a (B, L) bool tensor, got {tuple(word_mask.shape)} "
                         f"{word_mask.dtype}")
    B, L = word_mask.shape
    lengths = word_mask.sum(1)  # (B,)
    position = torch.arange(L, device=word_mask.device)[None]  # (1, L)
    candidate = (position >= 1) & (position < lengths[:, None] - 1)  # (B, L) words only
    n_words = candidate.sum(1)  # (B,)
    n_masked = torch.where(n_words > 0, (ratio * n_words).round().long().clamp(min=1), 0)  # (B,)
    # Random scores, non-candidates pushed last; the n_masked lowest-ranked candidates win.
    device = generator.device if generator is not None else word_mask.device
    scores = torch.rand(B, L, generator=generator, device=device).to(word_mask.device)  # [0, 1)
    scores = scores.masked_fill(~candidate, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)  # (B, L) rank of each position's score
    return candidate & (rank < n_masked[:, None])


def mask_fractions(masks: Tensor, valid: Tensor | None, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Ground truth and valid area per cell of the (H, W) feature grid (S a multiple of H and W).

    masks (B, S, S) {0, 1}, valid (B, S, S) bool or None (all valid) -> fg (B, N), the share of each
    cell inside mask AND image, and inside (B, N), the share inside the image; the padding's content
    never reaches either.
    """
    masks = masks.float()
    valid = torch.ones_like(masks) if valid is None else valid.to(masks.dtype)
    pool = lambda x: F.adaptive_avg_pool2d(x[:, None], size).flatten(1)  # noqa: E731  (B, S, S) -> (B, N)
    return pool(masks * valid), pool(valid)


def segmentation_cue(visual: Tensor, masks: Tensor, valid: Tensor | None, size: tuple[int, int]
                     ) -> tuple[Tensor, Tensor]:
    """MagNet's segmentation cue: F_v' (B, N, C) averaged inside the ground-truth mask (B, S, S) ->
    cue (B, C) (zero for an empty mask) and present (B,) bool, False where the mask is empty."""
    fg, _ = mask_fractions(masks, valid, size)  # (B, N) cell weights = covered share
    total = fg.sum(1)  # (B,)
    cue = (fg[:, None].to(visual.dtype) @ visual)[:, 0]  # (B, 1, N) @ (B, N, C) -> (B, C)
    return cue / total.clamp(min=1e-6)[:, None].to(visual.dtype), total > 0


class MaskGroundingLayer(nn.Module):
    """One Mask Grounding fusion layer: word self-attention (real words only), cross-attention
    from the words to the visual tokens (+ segmentation cue), FFN; each residual + LayerNorm."""

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.self_attn = MaskedAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MaskedAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, words: Tensor, word_mask: Tensor, keys: Tensor, key_pe: Tensor,
                key_mask: Tensor) -> Tensor:
        """words (B, L, C), word_mask (B, L), keys/key_pe (B, T, C), key_mask (B, T) -> (B, L, C)."""
        # The CLIP tower is causal: self-attention lets a masked word see the words after it.
        words = self.norm1(words + self.self_attn(words, words, words, word_mask))
        words = self.norm2(words + self.cross_attn(words, keys + key_pe, keys, key_mask))
        return self.norm3(words + self.mlp(words))


class MaskGroundingHead(nn.Module):
    """Mask Grounding (MagNet, Chng et al. 2024): predict masked words from the image and the target's mask.

    A learned mask embedding replaces the CLIP token embeddings of the chosen words in a second
    copy of the expression (`embed_masked`) before the frozen text tower. The masked copy's
    word features attend to the language-aware visual features F_v' and to the segmentation
    cue (F_v' pooled inside the ground-truth mask, `segmentation_cue`), then a classifier over
    the CLIP vocabulary predicts the original ids at the masked positions. Training-only.
    """

    def __init__(self, *, dim: int, text_width: int, vocab_size: int, num_heads: int,
                 depth: int = 1, use_mask: bool = True, tied_output: bool = True) -> None:
        super().__init__()
        # NOTE(paper): CLIP has no mask token; ours starts like CLIP's token embeddings.
        self.mask_embedding = nn.Parameter(torch.randn(text_width) * 0.02)  # (E,)
        self.use_mask = use_mask
        # Tells the segmentation cue token apart from the pixel tokens (which carry P_v).
        self.cue_embedding = nn.Parameter(torch.zeros(dim)) if use_mask else None  # (C,)
        self.layers = nn.ModuleList(MaskGroundingLayer(dim=dim, num_heads=num_heads)
                                    for _ in range(depth))
        self.tied_output = tied_output
        if tied_output:
            # logits = Linear(C -> E)(x) @ E_tok^T + b: CLIP's frozen token embeddings serve as
            # the classifier weights (passed to `forward`, never stored here).
            self.output_proj = nn.Linear(dim, text_width)
            self.output_bias = nn.Parameter(torch.zeros(vocab_size))  # (V,)
        else:
            self.output_proj = nn.Linear(dim, vocab_size)

    def embed_masked(self, token_embeddings: Tensor, chosen: Tensor) -> Tensor:
        """(B, L, E) CLIP token embeddings, (B, L) bool -> (B, L, E) with the mask embedding at
        the chosen positions (gradients reach it through the frozen tower)."""
        mask = self.mask_embedding.to(token_embeddings.dtype)
        return torch.where(chosen[..., None], mask, token_embeddings)

    def forward(self, words: Tensor, word_mask: Tensor, chosen: Tensor, visual: Tensor,
                visual_pe: Tensor, cue: tuple[Tensor, Tensor] | None = None,
                vocab_embeddings: Tensor | None = None) -> Tensor:
        """Vocabulary logits (M, V) at the M masked positions, rows in `words[chosen]` order.

        Args:
            words: (B, L, C) features of the masked copy; word_mask, chosen: (B, L) bool;
            visual: F_v' (B, N, C); visual_pe: P_v (N, C);
            cue: `segmentation_cue`'s (cue (B, C), present (B,)), required with use_mask;
            vocab_embeddings: (V, E) CLIP's token_embedding weight, required when tied.

        Raises:
            ValueError: a required cue or vocab_embeddings is missing.
        """
        B, N, C = visual.shape
        keys, key_pe = visual, visual_pe.expand(B, N, C)  # (B, N, C)
        key_mask = visual.new_ones(B, N, dtype=torch.bool)  # (B, N)
        if self.use_mask:
            if cue is None:
                raise ValueError("MaskGroundingHead built with use_mask needs the segmentation cue")
            pooled, present = cue
            keys = torch.cat([keys, pooled[:, None]], dim=1)  # (B, N + 1, C)
            key_pe = torch.cat([key_pe, self.cue_embedding.to(keys.dtype).expand(B, 1, C)], dim=1)
            key_mask = torch.cat([key_mask, present[:, None]], dim=1)  # an empty mask gives no cue
        for layer in self.layers:
            words = layer(words, word_mask, keys, key_pe, key_mask)
        picked = self.output_proj(words[chosen])  # (M, E) tied, (M, V) untied
        if not self.tied_output:
            return picked
        if vocab_embeddings is None:
            raise ValueError("MaskGroundingHead with tied_output needs vocab_embeddings (V, E)")
        return picked @ vocab_embeddings.to(picked.dtype).t() + self.output_bias  # (M, V)


def mask_grounding_loss(model: MARIS, head: MaskGroundingHead, features: dict, ids: Tensor,
                        word_mask: Tensor, masks: Tensor, valid: Tensor | None, *, ratio: float,
                        generator: torch.Generator | None = None) -> Tensor:
    """Mask Grounding's cross-entropy over the CLIP vocabulary, on the masked positions only.

    `features` is the `forward_features` output of `model` (a MARIS, not a DDP wrapper) for ids and
    word_mask (B, L); masks (B, S, S), valid (B, S, S) or None; `ratio` of the words masked, chosen
    with `generator`.

    Returns:
        Scalar mean cross-entropy over all masked tokens of the batch; when no sentence has a word,
        0 attached to every parameter of the head (zero gradients, not none).
    """
    chosen = choose_masked_words(word_mask, ratio, generator)  # (B, L)
    if not chosen.any():
        # DistributedDataParallel (find_unused_parameters off) needs a gradient for every trained
        # parameter on every rank at every step; another rank's batch may have words.
        return sum(p.sum() for p in head.parameters()) * 0.0
    visual = features["enhanced"]  # F_v (B, N, C)
    B, N, C = visual.shape
    H = W = math.isqrt(N)  # the feature grid is square (S x S inputs)
    with torch.no_grad():  # the frozen table; only the mask embedding needs gradients
        tokens = model.text_encoder.token_embedding(ids)  # (B, L, E)
    masked_words, _ = model.encode_text(ids, word_mask, head.embed_masked(tokens, chosen))  # (B, L, E)
    visual_pe = model.visual_pe((H, W))  # (N, C)
    if model.cfg.mask_grounding_fuse_masked:
        visual, words = model.fuse(visual, masked_words, word_mask, visual_pe)  # F_v', F_l' of the copy
    else:
        visual, words = features["visual"], model.word_proj(masked_words)
    cue = segmentation_cue(visual, masks, valid, (H, W)) if head.use_mask else None
    vocab = model.text_encoder.token_embedding.weight if head.tied_output else None
    logits = head(words, word_mask, chosen, visual, visual_pe, cue, vocab)  # (M, V)
    return F.cross_entropy(logits.float(), ids[chosen])


# --- MagNet: cross-modal alignment loss -------------------------------------------------------

class AlignmentHead(nn.Module):
    """Projections of the sentence feature F_s and of each pixel of F_v' into one space where
    the alignment loss compares them by cosine similarity. Training-only."""

    def __init__(self, *, sentence_dim: int, visual_dim: int, dim: int) -> None:
        super().__init__()
        self.sentence_proj = nn.Linear(sentence_dim, dim)
        self.pixel_proj = nn.Linear(visual_dim, dim)

    def forward(self, sentence: Tensor, visual: Tensor) -> tuple[Tensor, Tensor]:
        """F_s (B, E_proj), F_v' (B, N, C) -> (B, P), (B, N, P), P = dim."""
        return self.sentence_proj(sentence), self.pixel_proj(visual)


def alignment_loss(sentence: Tensor, pixels: Tensor, masks: Tensor, valid: Tensor | None,
                   size: tuple[int, int], *, temperature: float = 0.07) -> Tensor:
    """Pixel-to-text contrast between a sentence and the pixels of its image.

    z_i = cos(sentence, pixel_i) / temperature. Each positive pixel i is contrasted with all
    negative pixels of its image (InfoNCE with one positive per term, averaged over positives):

        loss_b = mean_{i in P_b} -log( e^{z_i} / (e^{z_i} + sum_{k in N_b} e^{z_k}) )
               = mean_{i in P_b} softplus( logsumexp_{k in N_b} z_k - z_i )

    Args:
        sentence: (B, P) projected F_s; pixels: (B, N, P) projected F_v' on the (H, W) grid;
        masks: (B, S, S) {0, 1}; valid: (B, S, S) bool (None: all valid); size: (H, W);
        temperature: > 0.

    Returns:
        Scalar mean of loss_b over the samples that have both positives and negatives (0,
        attached to the inputs, when none has).
    """
    # NOTE(paper): the form above (MagNet's pixel-to-text term as we read it) and the cell
    # rule: a cell of the (H, W) grid counts when at least half of it lies inside the image;
    # it is positive when at least half of that part lies inside the mask, else negative.
    # A mask that fills no cell by half (a small or thin object) makes its most-covered
    # cell(s) positive. Cells mostly in the padding take no part.
    if temperature <= 0:
        raise ValueError(f"alignment_temperature must be > 0, got {temperature}")
    fg, inside = mask_fractions(masks, valid, size)  # (B, N) each
    counted = inside >= 0.5
    positive = counted & (fg > 0) & (fg >= 0.5 * inside)  # (B, N)
    most = fg.masked_fill(~counted, 0.0).amax(1, keepdim=True)  # (B, 1) best-covered share
    fallback = counted & (fg > 0) & (fg == most) & ~positive.any(1, keepdim=True)
    positive = positive | fallback  # (B, N)
    negative = counted & ~positive
    z = (F.normalize(pixels.float(), dim=-1) @ F.normalize(sentence.float(), dim=-1)[..., None])[..., 0]
    z = z / temperature  # (B, N, P) @ (B, P, 1) -> (B, N)
    negatives = z.masked_fill(~negative, float("-inf")).logsumexp(dim=1)  # (B,)
    per_pixel = F.softplus(negatives[:, None] - z)  # (B, N), only positives are read
    n_pos = positive.sum(1)  # (B,)
    used = (n_pos > 0) & negative.any(1)  # (B,)
    if not used.any():
        return z.sum() * 0.0
    per_sample = per_pixel.masked_fill(~positive, 0.0).sum(1) / n_pos.clamp(min=1)  # (B,)
    return per_sample[used].mean()


# --- MagNet training heads and the training step -----------------------------------------------

class MagNetHeads(nn.Module):
    """The training-only heads of MagNet's add-ons: `mask_grounding` (MaskGroundingHead) and
    `alignment` (AlignmentHead), each None when its loss weight is 0.

    Not a sub-module of MARIS (`TrainStep` holds both): `MARIS.trainable_state_dict()` and inference
    checkpoints never contain it; a training script saves `heads.state_dict()` beside them.
    """

    def __init__(self, *, mask_grounding: MaskGroundingHead | None = None,
                 alignment: AlignmentHead | None = None) -> None:
        super().__init__()
        self.mask_grounding = mask_grounding
        self.alignment = alignment


def build_heads(cfg: MarisConfig, model: MARIS | None = None) -> MagNetHeads:
    """The MagNet heads the config's non-zero weights ask for (none when both are 0), on `model`'s device
    and dtype when given. Built under `torch.manual_seed(cfg.init_seed)` like `build_maris` (the global
    RNG is restored), so the config alone fixes their initial weights.

    Raises:
        ValueError: a negative weight or an out-of-range ratio / temperature.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        return _build_heads(cfg, model)


def _build_heads(cfg: MarisConfig, model: MARIS | None) -> MagNetHeads:
    """`build_heads` without the seeding."""
    for name in ("mask_grounding_weight", "alignment_weight"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    mask_grounding = alignment = None
    # The loss functions check these too; checking here fails at build time, before a run loads
    # its data and weights.
    if cfg.mask_grounding_weight > 0:
        if not 0 < cfg.mask_ratio <= 1:
            raise ValueError(f"mask_ratio must be in (0, 1], got {cfg.mask_ratio}")
        mask_grounding = MaskGroundingHead(
            dim=cfg.embed_dim, text_width=cfg.text_width, vocab_size=cfg.vocab_size,
            num_heads=cfg.maa_heads, depth=cfg.mask_grounding_depth,
            use_mask=cfg.mask_grounding_use_mask, tied_output=cfg.mask_grounding_tied_output)
    if cfg.alignment_weight > 0:
        if cfg.alignment_temperature <= 0:
            raise ValueError(f"alignment_temperature must be > 0, got {cfg.alignment_temperature}")
        alignment = AlignmentHead(sentence_dim=cfg.text_embed_dim, visual_dim=cfg.embed_dim,
                                  dim=cfg.alignment_dim)
    heads = MagNetHeads(mask_grounding=mask_grounding, alignment=alignment)
    if model is not None:
        heads.to(model.word_proj.weight.device, model.word_proj.weight.dtype)
    return heads


class TrainStep(nn.Module):
    """One training step's losses as a module: MARIS plus MagNet's training-only heads.

        loss = focal + dice + mask_grounding_weight * Mask Grounding CE + alignment_weight * alignment
               + no_target_weight * no-target BCE

    With the three weights 0 `loss` is exactly MARIS's; a no-target expression's all-zero mask is an
    ordinary target for focal + dice (finite: the dice is smoothed). This is the module DistributedDataParallel
    wraps: every use of a trained weight (the heads' and Mask Grounding's masked pass included) runs
    inside `forward`, so DDP averages every gradient.

    Raises:
        ValueError: a MagNet weight is > 0 but `heads` lacks its head; no_target_weight > 0 and no labels.
    """

    def __init__(self, model: MARIS, heads: MagNetHeads | None = None) -> None:
        super().__init__()
        heads = MagNetHeads() if heads is None else heads
        for name in ("mask_grounding", "alignment"):
            if getattr(model.cfg, name + "_weight") > 0 and getattr(heads, name) is None:
                raise ValueError(f"{name}_weight > 0 but heads.{name} is None: build the heads with "
                                 f"build_heads(cfg) from the model's config")
        self.model = model
        self.heads = heads

    def forward(self, *, ids: Tensor, word_mask: Tensor, masks: Tensor, valid: Tensor | None,
                images: Tensor | None = None, image_features: dict | None = None,
                image_index: Tensor | None = None, generator: torch.Generator | None = None,
                no_target: Tensor | None = None) -> dict:
        """ids, word_mask (B, L); masks (B, S, S) {0, 1}; valid (B, S, S) bool, False on the padding (None:
        all valid); images / image_features / image_index as `MARIS.forward_features`; generator: Mask
        Grounding's RNG; no_target (B,) bool labels (needed when no_target_weight > 0) -> dict(loss, focal,
        dice, mask_grounding, alignment, no_target) of scalars (0 when off)."""
        model, cfg = self.model, self.model.cfg
        features = model.forward_features(ids, word_mask, images=images, image_features=image_features,
                                          image_index=image_index)
        out = segmentation_loss(features["logits"], masks, valid, cfg)
        zero = out["loss"].new_zeros(())
        out.update(mask_grounding=zero, alignment=zero, no_target=zero)
        if cfg.mask_grounding_weight > 0:
            out["mask_grounding"] = mask_grounding_loss(
                model, self.heads.mask_grounding, features, ids, word_mask, masks, valid,
                ratio=cfg.mask_ratio, generator=generator)
            out["loss"] = out["loss"] + cfg.mask_grounding_weight * out["mask_grounding"]
        if cfg.alignment_weight > 0:
            visual = features["visual"]  # F_v' (B, N, C)
            H = W = math.isqrt(visual.shape[1])
            sentence, pixels = self.heads.alignment(features["sentence"], visual)
            out["alignment"] = alignment_loss(sentence, pixels, masks, valid, (H, W),
                                              temperature=cfg.alignment_temperature)
            out["loss"] = out["loss"] + cfg.alignment_weight * out["alignment"]
        if cfg.no_target_weight > 0:
            if no_target is None:
                raise ValueError("no_target_weight > 0 but no no_target labels were given: pass the batch's "
                                 "\"no_target\"")
            out["no_target"] = no_target_loss(features["no_target_logit"], no_target)
            out["loss"] = out["loss"] + cfg.no_target_weight * out["no_target"]
        return out


# --- Weight loading ----------------------------------------------------------------------------

def _is_torchscript(path: Path) -> bool:
    """Whether the file is a TorchScript zip archive (it holds `constants.pkl`)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _is_safetensors(head: bytes, size: int) -> bool:
    """Whether a file of `size` bytes starting with `head` (9 bytes) is a safetensors file: a
    little-endian u64 header length, then the JSON header."""
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") + 8 <= size


# A downloaded Hugging Face model folder holds one of these (the first found is read).
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


def _read_tensor_file(path: Path, what: str) -> dict:
    """One file, told apart by its content: a sharded checkpoint's `*.index.json`, safetensors,
    TorchScript or torch.save (read with weights_only)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise ValueError(f"{what} checkpoint {path} is empty (0 bytes): expected a weight file")
    if head[:1] == b"{":
        return _read_sharded(path, what)
    try:
        if _is_safetensors(head, path.stat().st_size):
            return safetensors.torch.load_file(path, device="cpu")
        if _is_torchscript(path):
            # OpenAI's released CLIP .pt files are TorchScript archives; torch.jit is
            # deprecated in recent torch but remains the only reader of those files.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location="cpu").state_dict()
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a weight file, or pickled non-tensor objects
        if isinstance(e, pickle.UnpicklingError):  # weights_only's refusal: its advice to drop it does not apply
            first = "no torch, safetensors or TorchScript weights, or Python objects beyond tensors"
        else:
            first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{what} checkpoint {path} is not a readable weight file (truncated or "
                         f"wrong format): {first}") from e


def _read_sharded(index: Path, what: str) -> dict[str, Tensor]:
    """The tensors of a sharded Hugging Face checkpoint, from its `*.index.json` (`weight_map`)."""
    try:
        weight_map = dict(json.loads(index.read_text())["weight_map"])  # {key: shard file name}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{what} checkpoint {index} is neither a weight file nor a sharded checkpoint's "
                         f"index (a JSON file with a 'weight_map')") from e
    state: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not (index.parent / shard).is_file():
            raise FileNotFoundError(f"{what} checkpoint {index}: its shard {shard} is absent (incomplete "
                                    f"download?)")
        state.update(_read_tensor_file(index.parent / shard, what))
    absent = [k for k in weight_map if k not in state]
    if absent:
        raise KeyError(f"{what} checkpoint {index}: key {absent[0]!r} is not in its shard "
                       f"{weight_map[absent[0]]} ({len(absent)} keys absent)")
    return state


def _read_state_dict(path: str | Path, what: str) -> dict[str, Tensor]:
    """Read a tensor dict from a file or a downloaded Hugging Face model folder.

    Files: safetensors, a sharded checkpoint's `*.index.json`, torch.save (read with
    weights_only) or a TorchScript archive, told apart by their content. A folder: the first of
    `HF_WEIGHT_FILES` it holds. Accepts a flat state dict, `{"state_dict": ...}` / `{"model": ...}`
    wrappers and DDP's `module.` prefixes.

    Raises:
        FileNotFoundError: the path, a folder's weight file or a shard is absent.
        ValueError: the file cannot be read or holds no tensors (the file is named).
        KeyError: a sharded checkpoint's index names a key that its shard lacks.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in HF_WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{what} checkpoint folder {path} holds none of {', '.join(HF_WEIGHT_FILES)}")
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(f"{what} checkpoint {path} does not exist")
    state = _read_tensor_file(path, what)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not any(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{what} checkpoint {path} does not hold a state dict of tensors")
    # Non-tensor entries (epoch counters, names) are not weights.
    state = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


# Hugging Face `transformers` names -> the released names. A row is (transformers name, released
# name); `{i}` stands for a layer index and `{p}` for the rest of the name. The first row whose
# left side matches a key renames it; keys no row matches keep their names. Rows that send keys
# to one name stack them along dim 0 in row order (CLIP's q, k, v -> in_proj).

# transformers' `SamModel` (facebook/sam-vit-base|large|huge) -> segment-anything's `Sam`.
SAM_HF_NAMES: tuple[tuple[str, str], ...] = (
    ("vision_encoder.pos_embed", "image_encoder.pos_embed"),
    ("vision_encoder.patch_embed.projection.{p}", "image_encoder.patch_embed.proj.{p}"),
    ("vision_encoder.layers.{i}.layer_norm1.{p}", "image_encoder.blocks.{i}.norm1.{p}"),
    ("vision_encoder.layers.{i}.layer_norm2.{p}", "image_encoder.blocks.{i}.norm2.{p}"),
    ("vision_encoder.layers.{i}.{p}", "image_encoder.blocks.{i}.{p}"),  # attn.{qkv,proj,rel_pos_*}, mlp.lin*
    ("vision_encoder.neck.conv1.{p}", "image_encoder.neck.0.{p}"),
    ("vision_encoder.neck.layer_norm1.{p}", "image_encoder.neck.1.{p}"),
    ("vision_encoder.neck.conv2.{p}", "image_encoder.neck.2.{p}"),
    ("vision_encoder.neck.layer_norm2.{p}", "image_encoder.neck.3.{p}"),
    ("vision_encoder.{p}", "image_encoder.{p}"),  # anything else: reported as unexpected
    # The dense positional encoding P_v. transformers ties `prompt_encoder.shared_embedding` to it.
    ("shared_image_embedding.positional_embedding",
     "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    ("prompt_encoder.point_embed.{p}", "prompt_encoder.point_embeddings.{p}"),
    ("prompt_encoder.mask_embed.conv1.{p}", "prompt_encoder.mask_downscaling.0.{p}"),
    ("prompt_encoder.mask_embed.layer_norm1.{p}", "prompt_encoder.mask_downscaling.1.{p}"),
    ("prompt_encoder.mask_embed.conv2.{p}", "prompt_encoder.mask_downscaling.3.{p}"),
    ("prompt_encoder.mask_embed.layer_norm2.{p}", "prompt_encoder.mask_downscaling.4.{p}"),
    ("prompt_encoder.mask_embed.conv3.{p}", "prompt_encoder.mask_downscaling.6.{p}"),
    ("mask_decoder.transformer.layers.{i}.layer_norm1.{p}", "mask_decoder.transformer.layers.{i}.norm1.{p}"),
    ("mask_decoder.transformer.layers.{i}.layer_norm2.{p}", "mask_decoder.transformer.layers.{i}.norm2.{p}"),
    ("mask_decoder.transformer.layers.{i}.layer_norm3.{p}", "mask_decoder.transformer.layers.{i}.norm3.{p}"),
    ("mask_decoder.transformer.layers.{i}.layer_norm4.{p}", "mask_decoder.transformer.layers.{i}.norm4.{p}"),
    ("mask_decoder.transformer.layer_norm_final_attn.{p}", "mask_decoder.transformer.norm_final_attn.{p}"),
    ("mask_decoder.upscale_conv1.{p}", "mask_decoder.output_upscaling.0.{p}"),
    ("mask_decoder.upscale_layer_norm.{p}", "mask_decoder.output_upscaling.1.{p}"),
    ("mask_decoder.upscale_conv2.{p}", "mask_decoder.output_upscaling.3.{p}"),
    # SAM's 3-layer MLPs (`layers.0-2`): transformers names them proj_in, layers.0, proj_out.
    ("mask_decoder.output_hypernetworks_mlps.{i}.proj_in.{p}",
     "mask_decoder.output_hypernetworks_mlps.{i}.layers.0.{p}"),
    ("mask_decoder.output_hypernetworks_mlps.{i}.layers.0.{p}",
     "mask_decoder.output_hypernetworks_mlps.{i}.layers.1.{p}"),
    ("mask_decoder.output_hypernetworks_mlps.{i}.proj_out.{p}",
     "mask_decoder.output_hypernetworks_mlps.{i}.layers.2.{p}"),
    ("mask_decoder.iou_prediction_head.proj_in.{p}", "mask_decoder.iou_prediction_head.layers.0.{p}"),
    ("mask_decoder.iou_prediction_head.layers.0.{p}", "mask_decoder.iou_prediction_head.layers.1.{p}"),
    ("mask_decoder.iou_prediction_head.proj_out.{p}", "mask_decoder.iou_prediction_head.layers.2.{p}"),
    # Same names on both sides: prompt_encoder.{not_a_point_embed,no_mask_embed}, mask_decoder's
    # iou_token, mask_tokens and the two-way transformer's attention and MLP weights.
)

# transformers' `CLIPModel` / `CLIPTextModelWithProjection` (openai/clip-vit-base-patch16) -> OpenAI's
# CLIP text tower. `vision_model.*`, `visual_projection` and `logit_scale` are not part of it and
# keep their names (unused); older files' `text_model.embeddings.position_ids` buffer is dropped.
CLIP_HF_NAMES: tuple[tuple[str, str], ...] = (
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.encoder.layers.{i}.self_attn.q_proj.{p}", "transformer.resblocks.{i}.attn.in_proj_{p}"),
    ("text_model.encoder.layers.{i}.self_attn.k_proj.{p}", "transformer.resblocks.{i}.attn.in_proj_{p}"),
    ("text_model.encoder.layers.{i}.self_attn.v_proj.{p}", "transformer.resblocks.{i}.attn.in_proj_{p}"),
    ("text_model.encoder.layers.{i}.self_attn.out_proj.{p}", "transformer.resblocks.{i}.attn.out_proj.{p}"),
    ("text_model.encoder.layers.{i}.layer_norm1.{p}", "transformer.resblocks.{i}.ln_1.{p}"),
    ("text_model.encoder.layers.{i}.mlp.fc1.{p}", "transformer.resblocks.{i}.mlp.c_fc.{p}"),
    ("text_model.encoder.layers.{i}.mlp.fc2.{p}", "transformer.resblocks.{i}.mlp.c_proj.{p}"),
    ("text_model.encoder.layers.{i}.layer_norm2.{p}", "transformer.resblocks.{i}.ln_2.{p}"),
    ("text_model.final_layer_norm.{p}", "ln_final.{p}"),
    # An nn.Linear weight (E_proj, E) in transformers, a matrix (E, E_proj) applied as x @ P in
    # OpenAI's CLIP: transposed by `clip_state_from_hf`.
    ("text_projection.weight", "text_projection"),
)


def _name_pattern(template: str) -> re.Pattern:
    """Regex of a name-map template: `{i}` a layer index, `{p}` the rest of the name."""
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>.+)"))


def rename_state(state: dict[str, Tensor], table: tuple[tuple[str, str], ...], path="<state dict>",
                 what: str = "") -> tuple[dict[str, Tensor], dict[str, tuple[str, ...]]]:
    """Apply a name map (`SAM_HF_NAMES`, `CLIP_HF_NAMES`) to a state dict.

    Returns:
        (renamed state dict, {new name: the file's key(s) it came from}).

    Raises:
        KeyError: some, not all, of the keys stacked into one name are present (the absent one named).
        ValueError: keys stacked into one name have shapes that do not stack, or two keys would
            get one name.
    """
    rows = [(_name_pattern(src), dst) for src, dst in table]
    sources: dict[str, dict[int, str]] = {}  # new name -> {row index: file key}
    for key in state:
        for r, (pattern, dst) in enumerate(rows):
            match = pattern.fullmatch(key)
            if match:
                sources.setdefault(dst.format(**match.groupdict()), {})[r] = key
                break
        else:
            sources.setdefault(key, {})[-1] = key
    out, names = {}, {}
    for name, found in sources.items():
        r0 = min(found)
        stack = [r for r, (_, dst) in enumerate(rows) if r0 >= 0 and dst == rows[r0][1]] or [r0]
        if set(found) - set(stack):
            raise ValueError(f"{what} checkpoint {path}: keys {sorted(found.values())} would all be "
                             f"named {name!r} (a file mixing two naming schemes?)")
        if len(stack) > 1:  # e.g. q, k, v; their groups are those of the row that matched first
            groups = rows[r0][0].fullmatch(found[r0]).groupdict()
            expected = {r: table[r][0].format(**groups) for r in stack}
            absent = [k for r, k in expected.items() if r not in found]
            if absent:
                raise KeyError(f"{what} checkpoint {path}: missing key {absent[0]!r} (stacked with "
                               f"{found[r0]!r} into {name!r})")
            try:
                out[name] = torch.cat([state[expected[r]] for r in stack])
            except RuntimeError as e:
                raise ValueError(f"{what} checkpoint {path}: keys {list(expected.values())} have shapes "
                                 f"{[tuple(state[k].shape) for k in expected.values()]} that do not "
                                 f"stack into {name!r}") from e
            names[name] = tuple(expected.values())
        else:
            out[name], names[name] = state[found[r0]], (found[r0],)
    return out, names


def _released_to_hf(key: str, table: tuple[tuple[str, str], ...]) -> str | None:
    """The transformers name of a released name by the first row that produces it, or None."""
    for src, dst in table:
        match = _name_pattern(dst).fullmatch(key)
        if match:
            return src.format(**match.groupdict())
    return None


def sam_state_from_hf(state: dict[str, Tensor], path="<state dict>"
                      ) -> tuple[dict[str, Tensor], dict[str, tuple[str, ...]]]:
    """transformers `SamModel` names -> segment-anything's (`SAM_HF_NAMES`); see `rename_state`."""
    tied = "prompt_encoder.shared_embedding.positional_embedding"
    if "shared_image_embedding.positional_embedding" not in state and tied in state:
        state = {**state, "shared_image_embedding.positional_embedding": state[tied]}  # a file may hold either
    return rename_state(state, SAM_HF_NAMES, path, "SAM")


def clip_state_from_hf(state: dict[str, Tensor], path="<state dict>"
                       ) -> tuple[dict[str, Tensor], dict[str, tuple[str, ...]]]:
    """transformers CLIP names -> OpenAI's (`CLIP_HF_NAMES`; `text_projection` transposed)."""
    if not any(k.startswith("text_model.") for k in state):
        # transformers >= 5 saves a bare CLIPTextModel without the `text_model.` prefix.
        state = {("text_model." + k if k.startswith(("embeddings.", "encoder.", "final_layer_norm.")) else k): v
                 for k, v in state.items()}
    # Older transformers saved the `position_ids` buffer (arange(L)) with the weights.
    state = {k: v for k, v in state.items() if k != "text_model.embeddings.position_ids"}
    out, names = rename_state(state, CLIP_HF_NAMES, path, "CLIP")
    if out.get("text_projection") is not None and out["text_projection"].dim() == 2:
        out["text_projection"] = out["text_projection"].t()  # (E_proj, E) -> (E, E_proj)
    return out, names


# torch's strict `load_state_dict` report: missing / unexpected key lists and size mismatches.
_TORCH_KEY_LIST = re.compile(r'(Missing|Unexpected) key\(s\) in state_dict: ((?:"[^"]*"(?:, )?)+)')
_TORCH_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape")


def _check_strict(twin: nn.Module, state: dict[str, Tensor], *, path, what: str, prefix: str = "",
                  names: dict[str, tuple[str, ...]] | None = None,
                  table: tuple[tuple[str, str], ...] = (), hint: str = "") -> None:
    """Torch's strict `load_state_dict` of `state` into `twin`, a meta-device copy of a model part.

    With `assign=True` on meta tensors nothing is copied, so a bad file changes no weight of the
    real model. Torch's report (missing / unexpected keys, size mismatches) becomes one line naming
    the file and its first problem: a size mismatch first (it shows a configuration that does not
    match the file), then a missing, then an unexpected key. Keys are named as in the file: `prefix`
    + key, and for a converted (Hugging Face) file the file's own key by `names` / `table`.

    Raises:
        ValueError: a shape differs (key and both shapes named).
        KeyError: a key is missing or unexpected.
    """
    try:
        twin.load_state_dict(state, strict=True, assign=True)
        return
    except RuntimeError as e:
        report, cause = str(e), e

    def name(key: str) -> str:
        full = prefix + key
        if names is None:
            return repr(full)
        file_keys = names.get(full) or (_released_to_hf(full, table),)
        shown = " + ".join(repr(k) for k in file_keys if k)
        return f"{shown} ({full!r} in the released names)" if shown and file_keys != (full,) else repr(full)

    lists = {kind: re.findall(r'"([^"]*)"', keys) for kind, keys in _TORCH_KEY_LIST.findall(report)}
    sizes = _TORCH_SIZE_MISMATCH.findall(report)
    count = len(sizes) + sum(len(v) for v in lists.values())
    more = f" ({count} problems in all)" if count > 1 else ""
    expected = twin.state_dict()  # meta tensors: the shapes the model expects
    if sizes:
        key = sizes[0]
        raise ValueError(f"{what} checkpoint {path}: key {name(key)} has shape {tuple(state[key].shape)}, "
                         f"the model expects {tuple(expected[key].shape)}{more}{hint}") from cause
    if lists.get("Missing"):
        key = lists["Missing"][0]
        raise KeyError(f"{what} checkpoint {path}: missing key {name(key)} (expected shape "
                       f"{tuple(expected[key].shape)}){more}{hint}") from cause
    if lists.get("Unexpected"):
        key = lists["Unexpected"][0]
        raise KeyError(f"{what} checkpoint {path}: unexpected key {name(key)} with shape "
                       f"{tuple(state[key].shape)} (the configured model has no such weight){more}{hint}") from cause
    raise ValueError(f"{what} checkpoint {path}: {report.splitlines()[-1].strip()}{hint}") from cause


def _meta_twin(model: MARIS) -> MARIS:
    """A MARIS with the model's config on the meta device (no memory, nothing initialised)."""
    with torch.device("meta"):
        return MARIS(model.cfg)


def sam_load_plan(model: MARIS, sam_state: dict[str, Tensor], path="<state dict>", *,
                  load_mask_decoder: bool = True, names: dict[str, tuple[str, ...]] | None = None) -> dict:
    """Match a SAM checkpoint's keys (segment-anything's names) to the model's, copying nothing.

    Image encoder and `prompt_encoder.pe_layer`: torch's strict `load_state_dict` checks, run on
    a meta-device twin. Mask decoder: each model key loads from the same-named SAM key when the
    shapes match; the query token from SAM's mask token 0 (`decoder_query_from_sam_mask_token`).

    Args:
        names: for a converted Hugging Face file, `sam_state_from_hf`'s {name: file key(s)}, so
            errors and `unused` name the file's keys.

    Returns:
        dict(sources={model key: (SAM key, row slice or None)}, initialised=[model keys of the
        decoder left at initialisation], unused=[checkpoint keys not used]).

    Raises:
        KeyError / ValueError: naming `path` and the first mismatching key and shapes.
    """
    if not any(k.startswith("image_encoder.") for k in sam_state):
        raise KeyError(f"SAM checkpoint {path} has no 'image_encoder.*' keys: not a SAM checkpoint "
                       f"(first keys: {list(sam_state)[:3]})")
    cfg = model.cfg
    hint = (f"; the model is configured for image_size {cfg.image_size}, D {cfg.sam_embed_dim}, depth "
            f"{cfg.sam_depth}, C {cfg.embed_dim} (official SAM checkpoints need S = 1024 and the "
            f"matching vit_b/l/h preset)")
    twin = _meta_twin(model)
    sources: dict[str, tuple[str, slice | None]] = {}
    for part, prefix in (("image_encoder", "image_encoder."), ("pe_layer", "prompt_encoder.pe_layer.")):
        state = {k[len(prefix):]: v for k, v in sam_state.items() if k.startswith(prefix)}
        _check_strict(getattr(twin, part), state, path=path, what="SAM", prefix=prefix, names=names,
                      table=SAM_HF_NAMES, hint=hint)
        sources.update({f"{part}.{k}": (prefix + k, None) for k in state})

    ours = model.state_dict()
    initialised = []
    for k, v in ours.items():
        if not k.startswith("mask_decoder."):
            continue
        if k == "mask_decoder.query_token.weight":
            src = sam_state.get("mask_decoder.mask_tokens.weight")
            if (load_mask_decoder and cfg.decoder_query_from_sam_mask_token
                    and src is not None and src.shape[1:] == v.shape[1:]):
                sources[k] = ("mask_decoder.mask_tokens.weight", slice(0, 1))
                continue
        elif load_mask_decoder and k in sam_state and sam_state[k].shape == v.shape:
            sources[k] = (k, None)
            continue
        initialised.append(k)
    used = {s for s, _ in sources.values()}
    unused = [k for k in sam_state if k not in used]
    if names is not None:
        unused = [file_key for k in unused for file_key in names.get(k, (k,))]
    return dict(sources=sources, initialised=initialised, unused=unused)


def load_sam_checkpoint(model: MARIS, path: str | Path, *, load_mask_decoder: bool = True) -> dict:
    """Load SAM's weights into the model: segment-anything's or Hugging Face's format.

    Accepts an official checkpoint (`sam_vit_{b,l,h}_*.pth`, a flat state dict with
    `image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`) or a transformers `SamModel` checkpoint
    (facebook/sam-vit-base|large|huge: `model.safetensors`, `pytorch_model.bin`, the downloaded
    folder, sharded or not), recognised by its `vision_encoder.*` keys and renamed by `SAM_HF_NAMES`.
    On any error no weight of the model changes.

    Args:
        model: a MARIS whose encoder settings match the checkpoint.
        path: the file or folder.
        load_mask_decoder: initialise the decoder from SAM's where names and shapes match.

    Returns:
        dict(loaded=[model keys loaded], initialised=[decoder keys left at initialisation],
             unused=[checkpoint keys not used, as named in the file]).

    Raises:
        FileNotFoundError, ValueError, KeyError: naming the file and the first bad key/shapes.
    """
    state = _read_state_dict(path, "SAM")
    names = None
    if any(k.startswith("vision_encoder.") for k in state):
        state, names = sam_state_from_hf(state, path)
    plan = sam_load_plan(model, state, path, load_mask_decoder=load_mask_decoder, names=names)
    ours = model.state_dict()
    with torch.no_grad():
        for key, (src, rows) in plan["sources"].items():
            value = state[src] if rows is None else state[src][rows]
            ours[key].copy_(value.to(ours[key].dtype))  # state_dict tensors share storage
    return dict(loaded=sorted(plan["sources"]), initialised=plan["initialised"], unused=plan["unused"])


# Text-tower key prefixes in OpenAI / open_clip CLIP checkpoints (visual.*, logit_scale ignored).
_CLIP_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.",
                       "text_projection")


def clip_text_state(model: MARIS, state: dict[str, Tensor], path="<state dict>") -> dict[str, Tensor]:
    """The text-tower weights of a CLIP state dict, in OpenAI's names, checked against the model.

    A transformers `CLIPModel` / `CLIPTextModelWithProjection` state dict (recognised by its
    `text_model.*` keys) is converted by `CLIP_HF_NAMES` (q, k, v stacked into `in_proj`,
    `text_projection` transposed); open_clip's `text.` prefix is removed. Visual keys, `logit_scale`
    and other non-text keys are dropped; the text keys pass torch's strict `load_state_dict` checks
    on a meta-device twin of `model.text_encoder`. Nothing is copied.

    Returns:
        {key of `model.text_encoder`: tensor}.

    Raises:
        KeyError, ValueError: naming `path` and the first mismatching key and shapes (as named in
        the file); a context length or width that differs from the config is reported as such.
    """
    names = None
    if any(k.startswith(("text_model.", "embeddings.token_embedding.")) for k in state):
        state, names = clip_state_from_hf(state, path)
    if "token_embedding.weight" not in state and "text.token_embedding.weight" in state:
        state = {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
    # Keys left in transformers' text namespace match no row of the name map: unexpected.
    text = {k: v for k, v in state.items() if k.startswith(_CLIP_TEXT_PREFIXES + ("text_model.",))}
    if "token_embedding.weight" not in text:
        raise KeyError(f"CLIP checkpoint {path} has no 'token_embedding.weight': not a CLIP text "
                       f"tower (first keys: {list(state)[:3]})")
    cfg = model.cfg
    vocab, width = text["token_embedding.weight"].shape
    if width != cfg.text_width or vocab != cfg.vocab_size:
        raise ValueError(f"CLIP checkpoint {path}: token_embedding is {vocab} x {width}, the config "
                         f"has vocab_size {cfg.vocab_size} x text_width {cfg.text_width}")
    pos = text.get("positional_embedding")
    if pos is not None and pos.shape[0] != cfg.text_context_length:
        raise ValueError(f"CLIP checkpoint {path}: context length {pos.shape[0]} "
                         f"(positional_embedding {tuple(pos.shape)}), the config has "
                         f"text_context_length {cfg.text_context_length}")
    _check_strict(_meta_twin(model).text_encoder, text, path=path, what="CLIP", names=names,
                  table=CLIP_HF_NAMES)
    return text


def load_clip_text(model: MARIS, path: str | Path) -> None:
    """Load CLIP's text tower: OpenAI's or Hugging Face's format.

    Accepts OpenAI's `.pt` (TorchScript), plain state dicts with OpenAI's names, open_clip
    checkpoints, and transformers' `CLIPModel` / `CLIPTextModelWithProjection` checkpoints
    (openai/clip-vit-base-patch16: `model.safetensors`, `pytorch_model.bin`, the downloaded folder,
    sharded or not); see `clip_text_state`. On any error no weight of the model changes.

    Raises:
        FileNotFoundError, ValueError, KeyError: naming the file and, for a mismatch, the first
        mismatching key and its shapes; a context length or width that differs from the config
        is reported as such.
    """
    text = clip_text_state(model, _read_state_dict(path, "CLIP"), path)
    model.text_encoder.load_state_dict(text, strict=True)


def build_maris(cfg: MarisConfig, *, sam_checkpoint: str | Path | None = None,
                clip_checkpoint: str | Path | None = None) -> MARIS:
    """Build MARIS and load the released encoder weights.

    The model is built under `torch.manual_seed(cfg.init_seed)` (the global RNG is restored
    afterwards), so frozen encoders that stay random are the same in every process.

    Args:
        cfg: the config.
        sam_checkpoint: SAM checkpoint (official `.pth`, or a Hugging Face facebook/sam-vit-*
            file or folder; see `load_sam_checkpoint`) for the image encoder, its positional
            encoding and (with `cfg.load_sam_mask_decoder`) the mask decoder.
        clip_checkpoint: CLIP checkpoint for the text tower (OpenAI, open_clip, or a Hugging Face
            openai/clip-vit-* file or folder; see `load_clip_text`).

    Returns:
        The model, in training mode (frozen encoders in eval mode).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = MARIS(cfg)
    random_parts = []
    if sam_checkpoint is not None:
        load_sam_checkpoint(model, sam_checkpoint, load_mask_decoder=cfg.load_sam_mask_decoder)
    else:
        random_parts.append("SAM image encoder")
    if clip_checkpoint is not None:
        load_clip_text(model, clip_checkpoint)
    else:
        random_parts.append("CLIP text encoder")
    if random_parts:
        # One warning per process (Python's default filter shows a warning once per location).
        warnings.warn(f"MARIS: RANDOM weights in the frozen {' and '.join(random_parts)} (no "
                      f"checkpoint given): fine for tests and the tiny demo, useless on real data",
                      UserWarning, stacklevel=2)
    return model


# --- Loading a trained MARIS ------------------------------------------------------------------

def build_model(config: dict, *, sam_checkpoint: str | Path | None = None,
                clip_checkpoint: str | Path | None = None) -> MARIS:
    """`build_maris` from a config dict (`config_to_dict` output, as checkpoints store it); the seeded
    build gives the same random frozen encoders wherever no encoder weights are loaded."""
    return build_maris(config_from_dict(config), sam_checkpoint=sam_checkpoint, clip_checkpoint=clip_checkpoint)


CHECKPOINT_EXPECTED = "expected a last.pt or best.pt written by train.py"


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a train.py checkpoint (plain tensors and Python values only: weights_only loading), or a shareable
    model folder (`read_model_folder`: the same keys, read from JSON and safetensors).

    Raises:
        FileNotFoundError: no such file (a folder: one of its two files is absent).
        ValueError: an empty, cut-short or damaged file, another kind of file, or a torch file that is not a
            train.py checkpoint; the message names the file, what is wrong and what was expected.
    """
    path = Path(path)
    if path.is_dir():  # a shareable model folder (`write_model_folder`): JSON and safetensors, never a pickle
        return read_model_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    ckpt, problem = None, None
    if size == 0:
        problem = "is empty (0 bytes)"
    elif not zipfile.is_zipfile(path):  # torch.save writes a zip archive whose directory comes last
        problem = (f"is not a complete torch file ({size:,} bytes without the zip directory torch.save ends "
                   f"with: cut short while copying, or another kind of file)")
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # weights_only refused an object: not something train.py writes
            problem = "holds Python objects other than tensors and plain values"
        except Exception as e:  # a damaged archive
            problem = f"is damaged ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
    if problem is not None:
        raise ValueError(f"checkpoint {path} {problem}: {CHECKPOINT_EXPECTED}")
    missing = [k for k in ("config", "options", "model") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a train.py checkpoint (missing keys {missing}): {CHECKPOINT_EXPECTED}")
    return ckpt


def model_from_checkpoint(ckpt: dict, *, sam_checkpoint: str | Path | None = None,
                          clip_checkpoint: str | Path | None = None) -> MARIS:
    """The trained model (CPU, eval mode) from a `read_checkpoint` dict plus the encoder weight files it
    names (`sam_checkpoint` / `clip_checkpoint` override those paths). It does not compare the encoders
    with those the model was trained with: `check_encoders` does (`load` calls both).

    Raises:
        FileNotFoundError: an encoder weight file (the checkpoint's or an override) is not on this machine.
        ValueError: a model folder whose weights do not fit its config (the folder is named).
    """
    opts = ckpt["options"]
    sam = sam_checkpoint or opts.get("sam_checkpoint")
    clip = clip_checkpoint or opts.get("clip_checkpoint")
    for flag, given, path in (("--sam-checkpoint", sam_checkpoint, sam), ("--clip-checkpoint", clip_checkpoint, clip)):
        if given and not Path(given).exists():  # the user's file: not one the model was trained with
            raise FileNotFoundError(f"{flag} {given} does not exist")
        if path and not Path(path).exists():
            raise FileNotFoundError(f"the model was trained with encoder weights {path}, which is not here; "
                                    f"pass {flag} with the same file")
    model = build_model(ckpt["config"], sam_checkpoint=sam, clip_checkpoint=clip)
    try:
        model.load_trainable_state_dict(ckpt["model"])
    except (KeyError, ValueError) as e:
        if "folder" not in ckpt:
            raise
        raise ValueError(f"model folder {ckpt['folder']}: {MODEL_WEIGHTS} does not fit {MODEL_CONFIG} "
                         f"({error_line(e)}): {MODEL_FOLDER_EXPECTED}") from None
    return model.eval()


# --- Shareable model folders (the Hugging Face Hub's layout) -------------------------------------
# `evaluate.py --export DIR` writes a folder that can be uploaded to the Hub as it is and loaded wherever a
# checkpoint is: config.json (JSON: the MarisConfig, the training options, the frozen encoders' files and
# sha256) + model.safetensors (the trainable weights only) + README.md (the model card). Reading it runs no
# pickle: other files in the folder (a .pt, a .bin) are never opened.

MODEL_CONFIG, MODEL_WEIGHTS = "config.json", "model.safetensors"
MODEL_FOLDER_FORMAT = 1  # config.json's "format_version"; raised when its layout changes
MODEL_FOLDER_EXPECTED = f"expected a folder written by evaluate.py --export ({MODEL_CONFIG} + {MODEL_WEIGHTS})"


def write_model_folder(folder: str | os.PathLike, ckpt: dict, *, card: str, evaluation: dict | None = None) -> Path:
    """Write a shareable model folder from a `read_checkpoint` dict: config.json, model.safetensors, README.md.

    Args:
        folder: a new or empty folder (created).
        ckpt: the checkpoint (its "config", "options", "model", "encoders", "step", "epoch").
        card: the model card's text (README.md).
        evaluation: what config.json records under "evaluation" (evaluate.py: the metrics measured at export).

    Returns:
        The folder. Each file is written to a temporary name and renamed.

    Raises:
        ValueError: the folder holds files already.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"export folder {folder} is not empty: expected a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "maris", "format_version": MODEL_FOLDER_FORMAT, "maris_config": ckpt["config"],
              "training_options": ckpt["options"], "encoders": ckpt.get("encoders"), "step": ckpt.get("step"),
              "epoch": ckpt.get("epoch"), "evaluation": evaluation}
    # safetensors refuses tensors that share memory or are not contiguous; the weights are fp32 as trained.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in ckpt["model"].items()}
    files = {MODEL_CONFIG: json.dumps(config, indent=2, allow_nan=False).encode(), "README.md": card.encode()}
    tmp = folder / f".{MODEL_WEIGHTS}.tmp"
    safetensors.torch.save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / MODEL_WEIGHTS)
    for name, payload in files.items():
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(payload)
        os.replace(tmp, folder / name)
    return folder


def read_model_folder(folder: str | os.PathLike) -> dict:
    """A shareable model folder as a `read_checkpoint` dict ("config", "options", "model", "encoders", "step",
    "epoch", plus "folder" and "evaluation"), read from config.json (JSON) and model.safetensors only.

    Raises:
        FileNotFoundError: config.json or model.safetensors is absent (the folder and the file are named).
        ValueError: config.json is not this format's JSON, names an unknown MarisConfig field, or
            model.safetensors is not a readable safetensors file.
    """
    folder = Path(folder)
    for name in (MODEL_CONFIG, MODEL_WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"model folder {folder} has no {name}: {MODEL_FOLDER_EXPECTED}")
    try:
        config = json.loads((folder / MODEL_CONFIG).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"model folder {folder}: {MODEL_CONFIG} is not valid JSON ({e}): "
                         f"{MODEL_FOLDER_EXPECTED}") from None
    keys = ("maris_config", "training_options", "encoders")
    if not isinstance(config, dict) or config.get("model_type") != "maris" or any(k not in config for k in keys):
        raise ValueError(f"model folder {folder}: {MODEL_CONFIG} is not a MARIS config (model_type \"maris\" and "
                         f"keys {', '.join(keys)}): {MODEL_FOLDER_EXPECTED}")
    if config.get("format_version") != MODEL_FOLDER_FORMAT:
        raise ValueError(f"model folder {folder}: {MODEL_CONFIG} has format_version {config.get('format_version')!r}: "
                         f"expected {MODEL_FOLDER_FORMAT} (a folder from another version of this code)")
    try:
        config_from_dict(config["maris_config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"model folder {folder}: {MODEL_CONFIG} has an unusable maris_config: "
                         f"{error_line(e)}") from None
    path = folder / MODEL_WEIGHTS
    with open(path, "rb") as f:
        head = f.read(9)
    try:
        if not _is_safetensors(head, path.stat().st_size):
            raise ValueError("no safetensors header")
        state = safetensors.torch.load_file(path, device="cpu")
    except Exception as e:  # safetensors' own errors are not ValueErrors
        raise ValueError(f"model folder {folder}: {MODEL_WEIGHTS} is not a readable safetensors file "
                         f"({(str(e).splitlines() or [type(e).__name__])[0]}): {MODEL_FOLDER_EXPECTED}") from None
    return {"config": config["maris_config"], "options": config["training_options"], "model": state,
            "encoders": config["encoders"], "step": config.get("step"), "epoch": config.get("epoch"),
            "evaluation": config.get("evaluation"), "folder": str(folder)}


# --- The frozen encoders a model was trained with ---------------------------------------------
# A checkpoint records a sha256 of each frozen encoder's weights ("encoders": {"sam": {"file", "sha256"},
# "clip": {...}}); a model rebuilt with other weights would compute other features than it learnt on.

# name -> (MARIS attribute, the option naming its weight file, what it is called in messages)
FROZEN_ENCODERS = {"sam": ("image_encoder", "sam_checkpoint", "SAM image encoder"),
                   "clip": ("text_encoder", "clip_checkpoint", "CLIP text tower")}


class EncoderMismatchError(ValueError):
    """A frozen encoder's weights differ from those the model was trained with."""


class EncoderCheckWarning(UserWarning):
    """The frozen encoders could not be checked (an old checkpoint), or differ and the mismatch was allowed."""


def encoder_hashes(model: MARIS) -> dict[str, str]:
    """{"sam": sha256 of the SAM image encoder's weights, "clip": of the CLIP text tower's} (`data.state_dict_sha256`,
    the feature cache's hash). Adapters are not part of them. It reads every weight (about 2.5 GB for ViT-H):
    compute it once per run."""
    return {name: data.state_dict_sha256(getattr(model, attr)) for name, (attr, _, _) in FROZEN_ENCODERS.items()}


def encoder_record(hashes: dict[str, str], files: dict[str, str | None]) -> dict:
    """The checkpoint's "encoders" entry: {name: {"file": weight file or None (random), "sha256": hash}}."""
    return {name: {"file": None if files.get(name) is None else str(files[name]), "sha256": hashes[name]}
            for name in FROZEN_ENCODERS}


def check_encoders(ckpt: dict, model: MARIS, *, source: str | os.PathLike = "the checkpoint",
                   sam_checkpoint: str | Path | None = None, clip_checkpoint: str | Path | None = None,
                   allow_mismatch: bool = False, hashes: dict[str, str] | None = None) -> dict:
    """Compare the model's frozen encoders with those its checkpoint was trained with.

    Args:
        ckpt: the `read_checkpoint` dict; source: its path, for the messages.
        sam_checkpoint, clip_checkpoint: the overrides the model was built with (None: the checkpoint's files).
        allow_mismatch: warn (EncoderCheckWarning) instead of raising.
        hashes: `encoder_hashes(model)` when the caller has them (None: computed here).

    Returns:
        {name: {"file", "sha256", "trained_file", "trained_sha256", "match"}} for "sam" and "clip"; "file" is
        None for a random encoder; "trained_sha256" and "match" are None for a checkpoint without hashes
        (written before they were recorded), which gives an EncoderCheckWarning.

    Raises:
        EncoderMismatchError: an encoder differs and allow_mismatch is False; the message names the file, both
            hashes and, for an override, the file the model was trained with.
    """
    hashes = encoder_hashes(model) if hashes is None else hashes
    stored, opts = ckpt.get("encoders"), ckpt["options"]
    overrides = {"sam": sam_checkpoint, "clip": clip_checkpoint}
    report, problems = {}, []
    for name, (_, option, what) in FROZEN_ENCODERS.items():
        trained = (stored or {}).get(name) or {"file": opts.get(option), "sha256": None}
        file = overrides[name] or trained["file"]
        entry = {"file": None if file is None else str(file), "sha256": hashes[name], "trained_file": trained["file"],
                 "trained_sha256": trained["sha256"],
                 "match": None if trained["sha256"] is None else hashes[name] == trained["sha256"]}
        report[name] = entry
        if entry["match"] is not False:
            continue
        now = f"{hashes[name][:12]}…"
        then = f"{trained['sha256'][:12]}…"
        trained_with = trained["file"] or "random weights (no weight file)"
        if overrides[name]:  # the user's file: never say the model was trained with it
            problems.append(f"--{option.replace('_', '-')} {file} holds other {what} weights (sha256 {now}) than the "
                            f"model was trained with ({trained_with}, sha256 {then})")
        elif file:
            problems.append(f"the {what} weights {file} (sha256 {now}) are not those the model was trained with "
                            f"(sha256 {then}): the file changed since training")
        else:
            problems.append(f"the random {what} (sha256 {now}) is not the one the model was trained with "
                            f"(sha256 {then})")
    if stored is None:
        warnings.warn(f"checkpoint {source} records no hash of its encoder weights (written before hashes were "
                      f"stored): the SAM and CLIP weights used now cannot be checked against those it was trained "
                      f"with", EncoderCheckWarning, stacklevel=2)
    if problems and not allow_mismatch:
        raise EncoderMismatchError(f"checkpoint {source}: {'; '.join(problems)}: expected the encoder weights the "
                                   f"model was trained with (--allow-encoder-mismatch / allow_mismatch=True to run "
                                   f"anyway)")
    if problems:
        warnings.warn(f"ENCODER MISMATCH, results are not those of the trained model: {'; '.join(problems)}",
                      EncoderCheckWarning, stacklevel=2)
    return report


def load(path: str | os.PathLike, *, device: str | torch.device = "auto", precision: str = "auto",
         sam_checkpoint: str | Path | None = None, clip_checkpoint: str | Path | None = None,
         allow_encoder_mismatch: bool = False) -> MARIS:
    """A trained MARIS from a train.py checkpoint or a shareable model folder, ready for `evaluate.predict`
    (README, "Predict in Python").

        model = maris.load("runs/refcoco/best.pt")
        model = maris.load("exports/refcoco")     # evaluate.py --export's folder: JSON + safetensors, no pickle

    The frozen encoders come from the weight files the checkpoint names (or the overrides) and are checked
    against the hashes it recorded (`check_encoders`).

    Args:
        path: best.pt / last.pt, or a model folder (`read_model_folder`).
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:N".
        precision: "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16" or "fp32": stored as
            `model.precision`, what `evaluate.predict` runs in unless told otherwise.
        sam_checkpoint, clip_checkpoint: other paths of the same encoder weights.
        allow_encoder_mismatch: warn instead of raising when an encoder's weights differ.

    Returns:
        The model on `device`, in eval mode.

    Raises:
        FileNotFoundError: the checkpoint (a folder's config.json or model.safetensors) or an encoder file is
            absent.
        ValueError: an unusable checkpoint or folder, encoder file, device or precision (EncoderMismatchError: other
            encoder weights than the model was trained with).
    """
    device = resolve_device(str(device))
    check_precision(precision)
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, sam_checkpoint=sam_checkpoint, clip_checkpoint=clip_checkpoint)
    check_encoders(ckpt, model, source=path, sam_checkpoint=sam_checkpoint, clip_checkpoint=clip_checkpoint,
                   allow_mismatch=allow_encoder_mismatch)
    model.precision = effective_precision(device, precision)
    return model.to(device)


# --- Running the model: device, precision, processes -------------------------------------------

# Precision names of train.py and evaluate.py: bf16 autocast on CUDA by default; CPU autocast is slow.
PRECISIONS = ("auto", "bf16", "fp32")


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else is checked (`check_device`) and passed to torch.device.

    Raises:
        ValueError: a device this machine does not have, or not a device name.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_device(device)
    except ValueError as e:
        raise ValueError(f"device {device}: {e}") from None
    return torch.device(device)


def check_device(name: str) -> None:
    """Check a --device value: auto, cpu, cuda, cuda:N (or another torch device type) that this machine has.

    Raises:
        ValueError: "expected ..." saying what would work here.
    """
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError("expected auto, cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"CUDA is not available on this machine ({why}): expected auto or cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"expected cuda:0 to cuda:{torch.cuda.device_count() - 1} (this machine has "
                         f"{torch.cuda.device_count()} CUDA devices)")


def setup_distributed(device_name: str = "auto") -> tuple[int, int, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA) -> (rank, world
    size, this process's device); under torchrun on CUDA each process takes the GPU of its LOCAL_RANK."""
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


def check_precision(precision: str) -> str:
    """Return `precision` when it is one of PRECISIONS, else raise ValueError listing them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def effective_precision(device: torch.device | str, precision: str) -> str:
    """The precision that really runs: "bf16" or "fp32" ("auto" = bf16 on CUDA, fp32 elsewhere)."""
    if check_precision(precision) == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device | str, precision: str = "auto"):
    """Autocast context for a precision name (see `effective_precision`)."""
    if effective_precision(device, precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


# --- Command-line options from a dataclass (train.py, evaluate.py) ------------------------------

def option(default=dataclasses.MISSING, help: str = "", *, auto: str | None = None,
           choices: tuple | None = None, multiple: bool = False, metavar: str | None = None, check=None):
    """A dataclass field that is a command-line option (`options_parser`): `default` MISSING makes the flag
    required; `auto` says in the help what a None default resolves to; `multiple` collects a repeatable
    flag into a list; `check(value)` validates a given value at parse time (`parse_options`) and raises
    ValueError("expected ...") when it is unusable (`at_least`, `above`, `between`, `nonempty`, ...)."""
    return dataclasses.field(default=default, metadata=dict(help=help, auto=auto, choices=choices,
                                                            multiple=multiple, metavar=metavar, check=check))


def at_least(low: float):
    """Option check: a finite number >= low ("an integer" when low is an int)."""
    def check(value) -> None:
        if not (math.isfinite(value) and value >= low):
            raise ValueError(f"expected {'an integer' if isinstance(low, int) else 'a number'} >= {low:g}")
    return check


def above(low: float):
    """Option check: a finite number > low."""
    def check(value) -> None:
        if not (math.isfinite(value) and value > low):
            raise ValueError(f"expected a number > {low:g}")
    return check


def between(low: float, high: float, *, include_high: bool = False):
    """Option check: low < value < high (value <= high with include_high)."""
    def check(value) -> None:
        if not (low < value < high or (include_high and value == high)):
            raise ValueError(f"expected a number > {low:g} and {'<=' if include_high else '<'} {high:g}")
    return check


def nonempty(value: str) -> None:
    """Option check: text with at least one non-space character."""
    if not value.strip():
        raise ValueError("expected a non-empty text")


class _OptionParser(argparse.ArgumentParser):
    """argparse with its errors in one line (`error: ...`), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (--help lists the options)\n")


DEBUG_ENV = "MARIS_DEBUG"  # MARIS_DEBUG=1: full tracebacks instead of one-line errors
ERRORS_EPILOG = (f"Errors print one line 'error: <what>: <what was expected>' and exit non-zero; {DEBUG_ENV}=1 "
                 f"prints the full traceback instead.")


def options_parser(cls: type, description: str) -> argparse.ArgumentParser:
    """argparse parser of an options dataclass: flag `--a-b` per field `a_b`, help showing the default.

    bool fields become `--x / --no-x`; absent flags stay absent from the parsed namespace, so a caller
    can tell the options given on the command line (e.g. to override a resumed checkpoint's).
    """
    p = _OptionParser(description=description, argument_default=argparse.SUPPRESS, epilog=ERRORS_EPILOG)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        required = f.default is dataclasses.MISSING
        shown = "required" if required else f"default: {meta['auto'] if f.default is None else f.default}"
        help_text = f"{meta['help']} ({shown})"
        if hints[f.name] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif meta["multiple"]:
            p.add_argument(flag, action="append", metavar=meta["metavar"] or "VALUE", help=help_text)
        else:
            kind = next(t for t in (*typing.get_args(hints[f.name]), hints[f.name]) if t is not type(None))
            p.add_argument(flag, type=kind if kind in (int, float) else str, metavar=meta["metavar"] or f.name.upper(),
                           choices=meta["choices"], required=required, help=help_text)
    return p


def parse_options(cls: type, argv: list[str] | None, description: str) -> tuple:
    """Command line -> (the options dataclass with defaults filled, {field: value} given explicitly).

    Each given value is validated by its option's `check`; an unusable one exits (code 2) with one line,
    `error: --flag value: expected ...`.
    """
    parser = options_parser(cls, description)
    explicit = vars(parser.parse_args(argv))
    for f in dataclasses.fields(cls):
        check = f.metadata.get("check")
        if check is None or explicit.get(f.name) is None:
            continue
        for value in explicit[f.name] if f.metadata["multiple"] else [explicit[f.name]]:
            try:
                check(value)
            except ValueError as e:
                parser.exit(2, f"error: --{f.name.replace('_', '-')} {shlex.quote(str(value))}: {e}\n")
    return cls(**explicit), explicit


def error_line(error: BaseException) -> str:
    """The one-line text of an error: its message (a KeyError's without quotes; an OSError's with the file it
    names), newlines folded."""
    if isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    elif isinstance(error, OSError) and error.strerror and error.filename is not None:
        text = f"{error.filename}: {error.strerror}"
    elif isinstance(error, OSError) and error.strerror:
        text = error.strerror
    else:
        text = str(error) or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


# The errors that the library raises for bad files, values and machines, each with a message naming the file or
# value and what was expected (file readers, weight loaders, option and encoder checks, a full disk).
USER_ERRORS = (OSError, ValueError, KeyError)


def one_line_errors(main):
    """Decorator of a script's `main(argv)`: a USER_ERRORS error exits with one line `error: <message>`
    (SystemExit, code 1) instead of a traceback; MARIS_DEBUG=1 keeps the traceback. Other exceptions are bugs
    and keep theirs."""
    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None):
        try:
            return main(argv)
        except USER_ERRORS as e:
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            raise SystemExit(f"error: {error_line(e)}") from None
    return wrapper


# --- Command line: parameter table and shapes -----------------------------------------------

def parameter_table(model: MARIS) -> list[tuple[str, int, int]]:
    """(component, trainable parameters, frozen parameters) per top-level module."""
    rows = []
    for name, module in model.named_children():
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
        rows.append((name, trainable, frozen))
    own = [p for n, p in model.named_parameters(recurse=False)]
    rows.append(("(MARIS parameters: word_pos)", sum(p.numel() for p in own if p.requires_grad),
                 sum(p.numel() for p in own if not p.requires_grad)))
    return rows


def trace_shapes(model: MARIS, images: Tensor, ids: Tensor, word_mask: Tensor) -> list[tuple[str, tuple]]:
    """Run one forward and record the output shape of every stage via forward hooks."""
    stages = [("image_encoder.patch_embed", model.image_encoder.patch_embed)]
    stages += [(f"image_encoder.blocks.{i} (tap)", model.image_encoder.blocks[i]) for i in model.cfg.fe_taps]
    stages += [("image_encoder.neck (F_sam)", model.image_encoder.neck),
               ("text_encoder (F_w, F_s)", model.text_encoder),
               ("feature_enhancement (F_v)", model.feature_enhancement),
               ("word_proj (F_l)", model.word_proj)]
    stages = [(name, module) for name, module in stages if module is not None]  # ablations leave some out
    stages += [(f"maa_blocks.{i} (F_v', F_l')", b) for i, b in enumerate(model.maa_blocks)]
    stages += [("mask_decoder.transformer (tokens, image)", model.mask_decoder.transformer),
               ("mask_decoder.output_upscaling", model.mask_decoder.output_upscaling),
               ("mask_decoder (logits, query token)", model.mask_decoder)]
    record: list[tuple[str, tuple]] = [("images", tuple(images.shape)), ("ids", tuple(ids.shape))]

    def hook(name):
        def fn(_module, _inputs, output):
            outs = output if isinstance(output, tuple) else (output,)
            record.append((name, tuple(tuple(o.shape) for o in outs)))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in stages]
    try:
        with torch.no_grad():
            probs = model.predict(images, ids, word_mask)
    finally:
        for h in handles:
            h.remove()
    record.append(("predict (probabilities)", tuple(probs.shape)))
    return record


def main(argv: list[str] | None = None) -> None:
    """Print the parameter table and the shapes of every stage for one dummy input."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vit_b", choices=sorted(PRESETS))
    parser.add_argument("--image-size", type=int, default=None, help="override S (multiple of 16)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--no-forward", action="store_true", help="only the parameter table")
    parser.add_argument("--adapters", action="store_true",
                        help="RISAM's bottleneck adapters in every SAM block (row image_adapters)")
    parser.add_argument("--adapter-ratio", type=float, default=MarisConfig.adapter_ratio,
                        help="adapter bottleneck width / D")
    args = parser.parse_args(argv)
    overrides = {} if args.image_size is None else {"image_size": args.image_size}
    if args.adapters:
        overrides.update(adapters=True, adapter_ratio=args.adapter_ratio)
    cfg = make_config(args.preset, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights are expected here
        model = build_maris(cfg).eval()

    print(f"MARIS preset {args.preset}: S={cfg.image_size}, D={cfg.sam_embed_dim}, "
          f"C={cfg.embed_dim}, E={cfg.text_width}, L={cfg.context_length}")
    print(f"{'component':40s} {'trainable':>14s} {'frozen':>14s}")
    rows = parameter_table(model)
    for name, trainable, frozen in rows:
        print(f"{name:40s} {trainable:>14,d} {frozen:>14,d}")
    print(f"{'total':40s} {sum(r[1] for r in rows):>14,d} {sum(r[2] for r in rows):>14,d}")
    if model.image_adapters is not None:
        extra = sum(p.numel() for p in model.image_adapters.parameters())
        print(f"RISAM adapters: {extra:,} extra trainable parameters "
              f"({len(model.image_adapters)} blocks x 2, ratio {cfg.adapter_ratio})")
    if args.no_forward:
        return

    B, L = args.batch_size, cfg.context_length
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size)
    ids = torch.randint(1, cfg.vocab_size - 2, (B, L))
    word_mask = torch.arange(L)[None] < torch.tensor([max(2, L - 3 * i) for i in range(B)])[:, None]
    print("\nshapes for one dummy input:")
    for name, shape in trace_shapes(model, images, ids, word_mask):
        print(f"  {name:44s} {shape}")


if __name__ == "__main__":
    main()
