"""MARIS: Referring Image Segmentation via Mutual-Aware Attention Features (arXiv 2311.15727).

The whole model in one file, in data-flow order (DESIGN.md §3-§4):

    image (B, 3, S, S) --SAM ViT (frozen)--> taps (B, H, W, D) x 3 + neck F_sam (B, C, H, W)
    ids (B, L) --CLIP text tower (frozen)--> per-word F_w (B, L, E), sentence F_s (B, E_proj)
    Feature Enhancement (§4.3)          --> F_v (B, N, C)
    Linear(E -> C)(F_w)                 --> F_l (B, L, C)
    K x Mutual-Aware Attention (§4.4)   --> F_v' (B, N, C), F_l' (B, L, C)
    Mutual-Aware Mask Decoder (§4.5)    --> mask logits (B, 1, 4H, 4W)
    focal + dice losses (§4.6) on the logits upsampled to (S, S), padding ignored

Optional, all off by default (with them off the model and its training are exactly MARIS):
    RISAM's bottleneck adapters in every SAM block (§4.7), the only trainable encoder part;
    MagNet's training-only Mask Grounding and cross-modal alignment losses (Chng et al.,
    CVPR 2024, arXiv 2312.12198; §4.6), computed by `training_loss` with `MagNetHeads`.

Shape letters, used in every comment of this file:
    B batch (sentences), B_img distinct images, S input side, H = W = S / 16 feature side,
    N = H * W visual tokens, D SAM ViT width, L text tokens, E CLIP text width,
    E_proj CLIP embedding width, C fusion width (SAM's prompt width), h heads, d = C / h.

Every detail the paper leaves open is a `MarisConfig` field marked `# NOTE(paper):`.
SAM's image encoder is used from the `segment-anything` package (Apache-2.0); the mask decoder
and the CLIP text tower are written here with attribute names that load the released weights
(SAM: Apache-2.0, CLIP: MIT).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import math
import sys
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# --- segment-anything, modeling sub-package only --------------------------------------------

def import_sam_modeling() -> ModuleType:
    """Import `segment_anything.modeling` without running `segment_anything/__init__.py`.

    The package's top-level `__init__` imports its predictor utilities, which need torchvision;
    the model code in `segment_anything.modeling` needs torch alone. We register a bare package
    module for `segment_anything` (its `__path__` set, its `__init__` never executed), after
    which the sub-modules import normally, `segment_anything.build_sam` included.

    Returns:
        The `segment_anything.modeling` module.

    Raises:
        ImportError: the segment-anything package is not installed.
    """
    if "segment_anything.modeling" in sys.modules:
        return sys.modules["segment_anything.modeling"]
    if "segment_anything" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")  # locates, does not execute
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError("segment-anything is not installed: pip install segment-anything")
        # module_from_spec sets __path__/__spec__ but does not run __init__.py.
        sys.modules["segment_anything"] = importlib.util.module_from_spec(spec)
    return importlib.import_module("segment_anything.modeling")


_sam = import_sam_modeling()
ImageEncoderViT = _sam.ImageEncoderViT
LayerNorm2d = _sam.common.LayerNorm2d  # SAM's channel LayerNorm for (B, C, H, W)
PositionEmbeddingRandom = _sam.prompt_encoder.PositionEmbeddingRandom  # SAM's dense PE
SamMLP = _sam.mask_decoder.MLP  # `layers.{i}` Linear stack with ReLU, SAM's hypernetwork MLP


# --- Config ----------------------------------------------------------------------------------

@dataclass
class MarisConfig:
    """All sizes and reconstruction choices of MARIS; only `build_maris` reads it."""

    # SAM image encoder (§4.1); defaults = SAM ViT-B at S = 1024.
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
    # NOTE(paper): the paper says "shallow, middle and deep" SAM features; we tap the outputs of
    # the 2nd, 3rd and 4th global-attention blocks (DESIGN §4.3).
    fe_taps: tuple[int, ...] = (5, 8, 11)
    # NOTE(paper): the last Feature Enhancement conv starts at zero, so at initialisation
    # F_v == SAM's own image embedding.
    fe_zero_init: bool = True
    embed_dim: int = 256  # C, SAM's prompt width (must be 256 to load SAM's neck/decoder)

    # CLIP text tower (§4.2); defaults = CLIP ViT-B/16's.
    vocab_size: int = 49408
    text_context_length: int = 77  # rows of CLIP's positional_embedding
    text_width: int = 512  # E
    text_layers: int = 12
    text_heads: int = 8
    text_embed_dim: int = 512  # E_proj
    context_length: int = 20  # L used by the datasets (<= text_context_length)

    # Mutual-Aware Attention (§4.4).
    maa_depth: int = 2  # K
    maa_heads: int = 8
    maa_mlp_ratio: float = 4.0  # FFN width = ratio * C
    # NOTE(paper): the word position encoding P_l is a learned (text_context_length, C) table
    # added to the words where they form keys/queries (like SAM's PE), not to the values.
    word_pos_std: float = 0.02

    # Mutual-Aware Mask Decoder (§4.5), SAM's two-way transformer sizes.
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    decoder_attention_downsample_rate: int = 2
    # NOTE(paper): the learned part of the multi-modal query token starts from SAM's first mask
    # token (the single-mask output token) when a SAM checkpoint's decoder is loaded.
    decoder_query_from_sam_mask_token: bool = True
    # NOTE(paper): SAM's mask-decoder weights initialise ours where names and shapes match.
    load_sam_mask_decoder: bool = True

    # Losses (§4.6).
    # NOTE(paper): focal : dice = 20 : 1 is SAM's ratio; the paper does not give its weights.
    loss_focal_weight: float = 20.0
    loss_dice_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    dice_smooth: float = 1.0  # added to numerator and denominator: empty-vs-empty scores 0

    # MagNet's training add-ons (Chng et al., CVPR 2024; DESIGN §4.6), all off by default: with
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

    # RISAM's parameter-efficient fine-tuning of SAM's encoder (DESIGN §4.7), off by default.
    adapters: bool = False
    # NOTE(paper): bottleneck width = round(D * adapter_ratio) (RISAM's D -> D/4 -> D).
    adapter_ratio: float = 0.25

    # Seed for building the model, so randomly initialised frozen encoders (no checkpoint) are
    # the same in every process: trainable weights + config then reproduce the model.
    init_seed: int = 0


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
    """A preset's config with field overrides.

    Args:
        preset: one of `PRESETS`.
        **overrides: `MarisConfig` fields.

    Returns:
        The config.

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


# --- Image encoder: SAM ViT (frozen, §4.1) -----------------------------------------------------

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
    """Run SAM's encoder stage by stage, keeping the outputs of the tapped blocks.

    Same computation as `ImageEncoderViT.forward` (patch embedding, absolute position
    embedding, blocks, neck), unrolled so intermediate block outputs can be returned.

    Args:
        encoder: a SAM `ImageEncoderViT`.
        images: (B, 3, S, S) normalised, padded images.
        taps: block indexes whose outputs to return.

    Returns:
        neck (B, C, H, W) and one (B, H, W, D) tensor per tap, in `taps` order.
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


# --- RISAM adapters on SAM's ViT blocks (§4.7) ------------------------------------------------

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
    """Add residual bottleneck adapters after the attention and the MLP of every SAM ViT block.

    segment-anything's code is not edited: each adapter is a forward hook on `blocks[i].attn`
    and `blocks[i].mlp`, and the adapters live outside the encoder, so the encoder's state-dict
    keys (and strict loading of official SAM checkpoints) are unchanged. A windowed block's
    attention output arrives in window layout (B * windows, w, w, D), padding included; the
    adapter is token-wise, so it commutes with SAM's window un-partition and cropping.

    Args:
        encoder: a SAM `ImageEncoderViT` (its `blocks` have `attn` and `mlp`).
        ratio: bottleneck width / D.

    Returns:
        ModuleList with one ModuleDict(attn=, mlp=) of `BottleneckAdapter` per block; the
        caller must keep it as a sub-module so that it trains and is saved.

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


# --- Text encoder: CLIP text tower (frozen, §4.2) -------------------------------------------

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
    """CLIP's text tower (Radford et al. 2021), the linguistic encoder of MARIS (§3.1).

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
        """Encode token ids.

        Args:
            ids: (B, L) long token ids, SOT first, EOT at `word_mask.sum(1) - 1`.
            word_mask: (B, L) bool, True from SOT through EOT.
            token_embeddings: optional (B, L, E) replacing `token_embedding(ids)` (e.g. a
                learned mask embedding at some positions).

        Returns:
            F_w (B, L, E) per-word features, F_s (B, E_proj) sentence feature.
        """
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


# --- Feature Enhancement (§4.3) ---------------------------------------------------------------

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
        # reconstruction of the paper's "global and local" fusion (DESIGN §4.3).
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


# --- Mutual-Aware Attention (Fig. 4, §4.4) --------------------------------------------------

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
    """

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MutualAwareAttention: dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)  # W_q on visual tokens
        self.k_proj = nn.Linear(dim, dim)  # W_k on words
        self.v_proj_words = nn.Linear(dim, dim)  # W_v,l: values for Vision-Guided Attention
        self.v_proj_visual = nn.Linear(dim, dim)  # W_v,v: values for Language-Guided Attention
        self.out_proj_visual = nn.Linear(dim, dim)  # W_o,v
        self.out_proj_words = nn.Linear(dim, dim)  # W_o,l
        hidden = int(dim * mlp_ratio)
        self.norm_visual1, self.norm_visual2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.norm_words1, self.norm_words2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp_visual = FeedForward(dim, hidden)
        self.mlp_words = FeedForward(dim, hidden)

    def attention_weights(self, visual: Tensor, words: Tensor, word_mask: Tensor,
                          visual_pe: Tensor, word_pe: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The shared logits A and the two attention maps derived from it.

        Args:
            visual: F_v (B, N, C); words: F_l (B, L, C); word_mask: M (B, L) bool;
            visual_pe: P_v (N, C) or (B, N, C); word_pe: P_l (L, C) or (B, L, C).

        Returns:
            A (B, h, N, L); Vision-Guided weights softmax_L(A masked) (B, h, N, L);
            Language-Guided weights softmax_N(A^T) (B, h, L, N).
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
        vga = logits.masked_fill(padded, float("-inf")).softmax(dim=-1)  # over L
        lga = logits.transpose(-2, -1).softmax(dim=-1)  # (B, h, L, N), over N
        return logits, vga, lga

    def forward(self, visual: Tensor, words: Tensor, word_mask: Tensor, visual_pe: Tensor,
                word_pe: Tensor) -> tuple[Tensor, Tensor]:
        """Args as `attention_weights`. Returns F_v' (B, N, C), F_l' (B, L, C)."""
        _, vga, lga = self.attention_weights(visual, words, word_mask, visual_pe, word_pe)
        v_words = _split_heads(self.v_proj_words(words), self.num_heads)  # (B, h, L, d)
        v_visual = _split_heads(self.v_proj_visual(visual), self.num_heads)  # (B, h, N, d)
        to_visual = self.out_proj_visual(_merge_heads(vga @ v_words))  # (B, N, C)
        to_words = self.out_proj_words(_merge_heads(lga @ v_visual))  # (B, L, C)
        real = word_mask[..., None].to(words.dtype)  # (B, L, 1)
        to_words = to_words * real  # padded words' Language-Guided outputs are zero
        # Vision-Guided branch: language-aware visual features.
        visual = self.norm_visual1(visual + to_visual)
        visual = self.norm_visual2(visual + self.mlp_visual(visual))
        # Language-Guided branch: vision-aware linguistic features; padded rows stay zero so
        # nothing downstream can read what the padding held.
        words = self.norm_words1(words + to_words)
        words = self.norm_words2(words + self.mlp_words(words)) * real
        return visual, words


# --- Mutual-Aware Mask Decoder (Fig. 5, §4.5) --------------------------------------------------

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
    """

    def __init__(self, *, dim: int, sentence_dim: int, depth: int, num_heads: int, mlp_dim: int,
                 downsample_rate: int = 2) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer(depth=depth, dim=dim, num_heads=num_heads,
                                             mlp_dim=mlp_dim, downsample_rate=downsample_rate)
        self.query_token = nn.Embedding(1, dim)  # learned part of the multi-modal query token
        self.sentence_proj = nn.Linear(sentence_dim, dim)  # F_s -> C
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
        """Predict the mask logits.

        Args:
            visual: F_v' (B, N, C); words: F_l' (B, L, C); word_mask: (B, L) bool;
            sentence: F_s (B, E_proj); image_pe: (N, C) SAM's dense PE; size: (H, W).

        Returns:
            logits (B, 1, 4H, 4W).
        """
        B, N, C = visual.shape
        H, W = size
        query = self.query_token.weight + self.sentence_proj(sentence)  # (B, C)
        tokens = torch.cat([query[:, None], words], dim=1)  # (B, 1 + L, C)
        token_mask = torch.cat([word_mask.new_ones(B, 1), word_mask], dim=1)  # (B, 1 + L)
        # NOTE(paper): as in SAM, the initial tokens serve as their own positional encoding.
        tokens, image = self.transformer(visual, image_pe.expand(B, N, C), tokens, token_mask)
        image = image.transpose(1, 2).reshape(B, C, H, W)  # (B, N, C) -> (B, C, H, W)
        upscaled = self.output_upscaling(image)  # (B, C/8, 4H, 4W)
        hyper = self.output_hypernetworks_mlps[0](tokens[:, 0])  # (B, C/8)
        logits = hyper[:, None] @ upscaled.flatten(2)  # (B, 1, C/8) @ (B, C/8, 16N) -> (B, 1, 16N)
        return logits.view(B, 1, upscaled.shape[-2], upscaled.shape[-1])  # (B, 1, 4H, 4W)


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
    arguments and can be copied out alone.
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
        self.text_encoder = CLIPTextEncoder(
            vocab_size=cfg.vocab_size, context_length=cfg.text_context_length,
            width=cfg.text_width, layers=cfg.text_layers, heads=cfg.text_heads,
            embed_dim=cfg.text_embed_dim)
        # SAM's dense positional encoding P_v (random Fourier features, C/2 frequencies);
        # its matrix loads from `prompt_encoder.pe_layer.*` of a SAM checkpoint.
        self.pe_layer = PositionEmbeddingRandom(C // 2)
        self.feature_enhancement = FeatureEnhancement(
            in_dim=cfg.sam_embed_dim, dim=C, num_taps=len(cfg.fe_taps), zero_init=cfg.fe_zero_init)
        self.word_proj = nn.Linear(cfg.text_width, C)  # F_w (E) -> F_l (C)
        self.word_pos = nn.Parameter(torch.randn(cfg.text_context_length, C) * cfg.word_pos_std)  # P_l
        self.maa_blocks = nn.ModuleList(
            MutualAwareAttention(dim=C, num_heads=cfg.maa_heads, mlp_ratio=cfg.maa_mlp_ratio)
            for _ in range(cfg.maa_depth))
        self.mask_decoder = MutualAwareMaskDecoder(
            dim=C, sentence_dim=cfg.text_embed_dim, depth=cfg.decoder_depth,
            num_heads=cfg.decoder_heads, mlp_dim=cfg.decoder_mlp_dim,
            downsample_rate=cfg.decoder_attention_downsample_rate)
        # Frozen encoders (§4.1, §4.2): no gradients, always in eval mode (see `train`).
        for module in (self.image_encoder, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        # RISAM adapters (§4.7): the only trainable part of the image encoder, kept outside it.
        self.image_adapters = (attach_adapters(self.image_encoder, ratio=cfg.adapter_ratio)
                               if cfg.adapters else None)

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
            images: (B_img, 3, S, S); or
            image_features: the dict of `encode_image` (e.g. from a feature cache, any dtype).
            image_index: (B,) long, the image row of each sentence (default arange(B),
                B_img == B). Feature Enhancement runs once per image row, then rows are indexed.
            token_embeddings: optional (B, L, E) override of the CLIP token embeddings.

        Returns:
            dict(logits=(B, 1, 4H, 4W), visual=F_v' (B, N, C), words=F_l' (B, L, C),
                 sentence=F_s (B, E_proj), word_features=F_w (B, L, E),
                 enhanced=F_v (B, N, C) the Feature Enhancement output per sentence).

        Raises:
            ValueError: neither or both of images / image_features, bad image_index, bad text.
        """
        if (images is None) == (image_features is None):
            raise ValueError("give exactly one of images and image_features")
        if image_features is None:
            image_features = self.encode_image(images)
        dtype = self.word_pos.dtype
        # Cached features may be fp16 and on another device: bring them to the model's.
        device = self.word_pos.device
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

        enhanced = self.feature_enhancement(taps, neck)[image_index]  # (B_img, N, C) -> (B, N, C)
        word_features, sentence = self.encode_text(ids, word_mask, token_embeddings)  # F_w, F_s
        visual_pe = self.visual_pe((H, W))  # (N, C) = P_v
        visual, words = self.fuse(enhanced, word_features, word_mask, visual_pe)
        logits = self.mask_decoder(visual, words, word_mask, sentence, visual_pe, (H, W))
        return dict(logits=logits, visual=visual, words=words, sentence=sentence,
                    word_features=word_features, enhanced=enhanced)

    def visual_pe(self, size: tuple[int, int]) -> Tensor:
        """SAM's dense positional encoding P_v (N, C) for an (H, W) grid, in the model's dtype.

        Computed in fp32 even under autocast: it is a matmul followed by sin/cos of values up to
        ~2*pi*|gaussian|, and in bf16 the encoding was off by up to 0.2 (on values in [-1, 1]).
        """
        device = self.pe_layer.positional_encoding_gaussian_matrix.device
        with torch.autocast(device_type=device.type, enabled=False):
            pe = self.pe_layer(size)  # (C, H, W), fp32
        return pe.to(self.word_pos.dtype).flatten(1).transpose(0, 1)  # (C, H, W) -> (N, C)

    def fuse(self, visual: Tensor, word_features: Tensor, word_mask: Tensor, visual_pe: Tensor
             ) -> tuple[Tensor, Tensor]:
        """Word projection and the K Mutual-Aware Attention blocks (§4.4).

        Args:
            visual: F_v (B, N, C); word_features: F_w (B, L, E); word_mask: (B, L) bool;
            visual_pe: P_v (N, C).

        Returns:
            F_v' (B, N, C) language-aware visual features, F_l' (B, L, C) vision-aware words.
        """
        L = word_features.shape[1]
        words = self.word_proj(word_features)  # (B, L, C) = F_l
        word_pe = self.word_pos[:L]  # (L, C) = P_l
        for block in self.maa_blocks:
            visual, words = block(visual, words, word_mask, visual_pe, word_pe)
        return visual, words

    def forward(self, images: Tensor | None, ids: Tensor, word_mask: Tensor, *,
                image_index: Tensor | None = None, image_features: dict | None = None,
                features: bool = False) -> Tensor | dict:
        """Mask logits (B, 1, 4H, 4W), the same in train and eval mode (see `forward_features`).

        `features=True` returns the whole `forward_features` dict instead: the way for
        `training_loss` to reach the features through a DistributedDataParallel wrapper, which
        only synchronises gradients of computations that run inside `forward`.
        """
        out = self.forward_features(ids, word_mask, images=images, image_features=image_features,
                                    image_index=image_index)
        return out if features else out["logits"]

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


# --- Losses (§4.6) -----------------------------------------------------------------------------

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


# --- MagNet: Mask Grounding (Chng et al., CVPR 2024, §3) --------------------------------------

def choose_masked_words(word_mask: Tensor, ratio: float, generator: torch.Generator | None = None
                        ) -> Tensor:
    """Pick the word tokens that Mask Grounding hides, uniformly at random per sentence.

    Candidates are the real words between SOT (position 0) and EOT (position length - 1);
    padding is never picked. A sentence with n = length - 2 > 0 words gets exactly
    max(1, round(ratio * n)) of them; a sentence with no word (length <= 2) gets none.

    Args:
        word_mask: (B, L) bool, True from SOT through EOT.
        ratio: share of the words to mask, in (0, 1].
        generator: torch RNG for the choice (None: the global RNG of word_mask's device).

    Returns:
        (B, L) bool, True at the chosen positions.

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
    """Ground truth and valid area per cell of the (H, W) feature grid.

    Args:
        masks: (B, S, S) {0, 1} targets; valid: (B, S, S) bool (None: all valid);
        size: (H, W) of the feature grid (S a multiple of H and W).

    Returns:
        fg (B, N): share of each cell inside mask AND image; inside (B, N): share of each cell
        inside the image. The padding's content never reaches either.
    """
    masks = masks.float()
    valid = torch.ones_like(masks) if valid is None else valid.to(masks.dtype)
    pool = lambda x: F.adaptive_avg_pool2d(x[:, None], size).flatten(1)  # noqa: E731  (B, S, S) -> (B, N)
    return pool(masks * valid), pool(valid)


def segmentation_cue(visual: Tensor, masks: Tensor, valid: Tensor | None, size: tuple[int, int]
                     ) -> tuple[Tensor, Tensor]:
    """MagNet's segmentation cue: F_v' averaged inside the ground-truth mask.

    Args:
        visual: F_v' (B, N, C); masks (B, S, S); valid (B, S, S) or None; size (H, W).

    Returns:
        cue (B, C) (zero for an empty mask) and present (B,) bool, False where the mask is empty.
    """
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
    """Mask Grounding (MagNet §3): predict masked words from the image and the target's mask.

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
        """Vocabulary logits at the masked positions.

        Args:
            words: (B, L, C) features of the masked copy; word_mask: (B, L) bool;
            chosen: (B, L) bool masked positions (M of them in all);
            visual: F_v' (B, N, C); visual_pe: P_v (N, C);
            cue: (cue (B, C), present (B,) bool) from `segmentation_cue`, required when the
                head was built with use_mask, ignored otherwise;
            vocab_embeddings: (V, E) CLIP's token_embedding weight, required when tied.

        Returns:
            (M, V) logits, rows in `words[chosen]` order.

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

    Args:
        model: the MARIS (not a DDP wrapper) that produced `features`.
        head: the Mask Grounding head.
        features: `forward_features` output for (ids, word_mask) (uses enhanced / visual).
        ids, word_mask: (B, L) the expression; masks (B, S, S); valid (B, S, S) or None.
        ratio: share of words to mask; generator: RNG for the choice.

    Returns:
        Scalar mean cross-entropy over all masked tokens of the batch (0, still attached to
        the head's parameters, when no sentence has a word).
    """
    chosen = choose_masked_words(word_mask, ratio, generator)  # (B, L)
    if not chosen.any():
        return head.mask_embedding.sum() * 0.0
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


# --- MagNet training heads and the training loss ----------------------------------------------

class MagNetHeads(nn.Module):
    """The training-only heads of MagNet's add-ons: `mask_grounding` (MaskGroundingHead) and
    `alignment` (AlignmentHead), each None when its loss weight is 0.

    Not a sub-module of MARIS: `MARIS.trainable_state_dict()` and inference checkpoints never
    contain it; a training script saves `heads.state_dict()` beside them.
    """

    def __init__(self, *, mask_grounding: MaskGroundingHead | None = None,
                 alignment: AlignmentHead | None = None) -> None:
        super().__init__()
        self.mask_grounding = mask_grounding
        self.alignment = alignment


def build_heads(cfg: MarisConfig, model: MARIS | None = None) -> MagNetHeads:
    """The heads the config's non-zero weights ask for (sizes from cfg).

    Args:
        cfg: the config (mask_grounding_* and alignment_* fields).
        model: when given, the heads are moved to its device and dtype.

    Returns:
        MagNetHeads (possibly with no parameters when both weights are 0). Built under
        `torch.manual_seed(cfg.init_seed)` like `build_maris` (the global RNG is restored), so
        every DDP rank starts from the same heads, which DDP does not wrap.

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
        heads.to(model.word_pos.device, model.word_pos.dtype)
    return heads


def training_loss(model: nn.Module, heads: MagNetHeads | None, *, ids: Tensor, word_mask: Tensor,
                  masks: Tensor, valid: Tensor | None, images: Tensor | None = None,
                  image_features: dict | None = None, image_index: Tensor | None = None,
                  generator: torch.Generator | None = None) -> dict:
    """One training step's loss: MARIS's focal + dice, plus MagNet's enabled add-ons.

        loss = segmentation loss + mask_grounding_weight * Mask Grounding CE
                                 + alignment_weight * alignment loss

    With both weights 0 nothing else runs and `loss` is exactly MARIS's.

    Args:
        model: MARIS, or a DistributedDataParallel wrapping one (the features come through
            its `forward`, so DDP synchronises the gradients of every use of MARIS's weights).
        heads: from `build_heads` (may be None when both weights are 0).
        ids, word_mask: (B, L); masks: (B, S, S) {0, 1}; valid: (B, S, S) bool or None;
        images / image_features / image_index: as `MARIS.forward_features`;
        generator: RNG for Mask Grounding's choice of words.

    Returns:
        dict(loss, focal, dice, mask_grounding, alignment) of scalars (a disabled add-on's
        entry is a 0 tensor).

    Raises:
        ValueError: a weight is > 0 but `heads` lacks its head.
    """
    core = getattr(model, "module", model)  # the MARIS inside a DDP wrapper
    cfg = core.cfg
    features = model(images, ids, word_mask, image_index=image_index,
                     image_features=image_features, features=True)
    seg = segmentation_loss(features["logits"], masks, valid, cfg)
    zero = seg["loss"].new_zeros(())
    out = dict(loss=seg["loss"], focal=seg["focal"], dice=seg["dice"], mask_grounding=zero,
               alignment=zero)
    if cfg.mask_grounding_weight > 0:
        if heads is None or heads.mask_grounding is None:
            raise ValueError("mask_grounding_weight > 0 but heads.mask_grounding is None: "
                             "build the heads with build_heads(cfg) from the same config")
        out["mask_grounding"] = mask_grounding_loss(
            core, heads.mask_grounding, features, ids, word_mask, masks, valid,
            ratio=cfg.mask_ratio, generator=generator)
        out["loss"] = out["loss"] + cfg.mask_grounding_weight * out["mask_grounding"]
    if cfg.alignment_weight > 0:
        if heads is None or heads.alignment is None:
            raise ValueError("alignment_weight > 0 but heads.alignment is None: build the heads "
                             "with build_heads(cfg) from the same config")
        visual = features["visual"]  # F_v' (B, N, C)
        H = W = math.isqrt(visual.shape[1])
        sentence, pixels = heads.alignment(features["sentence"], visual)
        out["alignment"] = alignment_loss(sentence, pixels, masks, valid, (H, W),
                                          temperature=cfg.alignment_temperature)
        out["loss"] = out["loss"] + cfg.alignment_weight * out["alignment"]
    return out


# --- Weight loading ----------------------------------------------------------------------------

def _is_torchscript(path: Path) -> bool:
    """Whether the file is a TorchScript zip archive (it holds `constants.pkl`)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _read_state_dict(path: str | Path, what: str) -> dict[str, Tensor]:
    """Read a tensor dict from a torch.save file or a TorchScript archive.

    Accepts a flat state dict, `{"state_dict": ...}` / `{"model": ...}` wrappers and DDP's
    `module.` prefixes. Raises ValueError naming the file when it cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} checkpoint {path} does not exist")
    try:
        if _is_torchscript(path):
            # OpenAI's released CLIP .pt files are TorchScript archives; torch.jit is
            # deprecated in recent torch but remains the only reader of those files.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or pickled non-tensor objects
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{what} checkpoint {path} is not a readable torch file (truncated or "
                         f"wrong format): {first}") from e
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


def _first_mismatch(path, what, ours: dict[str, Tensor], theirs: dict[str, Tensor],
                    hint: str = "") -> None:
    """Raise naming the file and the first missing/unexpected key or differing shape."""
    for k, v in ours.items():
        if k not in theirs:
            raise KeyError(f"{what} checkpoint {path}: missing key {k!r} (expected shape "
                           f"{tuple(v.shape)}){hint}")
        if theirs[k].shape != v.shape:
            raise ValueError(f"{what} checkpoint {path}: key {k!r} has shape "
                             f"{tuple(theirs[k].shape)}, the model expects {tuple(v.shape)}{hint}")
    extra = [k for k in theirs if k not in ours]
    if extra:
        raise KeyError(f"{what} checkpoint {path}: unexpected key {extra[0]!r} with shape "
                       f"{tuple(theirs[extra[0]].shape)} (the configured model has no such "
                       f"weight){hint}")


def sam_load_plan(model: MARIS, sam_state: dict[str, Tensor], path="<state dict>", *,
                  load_mask_decoder: bool = True) -> dict:
    """Match a SAM checkpoint's keys to the model's, without copying anything.

    Image encoder and `prompt_encoder.pe_layer`: strict (names and shapes). Mask decoder: each
    model key loads from the same-named SAM key when the shapes match; the query token from
    SAM's mask token 0 (`decoder_query_from_sam_mask_token`).

    Returns:
        dict(sources={model key: (SAM key, row slice or None)}, initialised=[model keys of the
        decoder left at initialisation], unused=[SAM keys not used]).

    Raises:
        KeyError / ValueError: naming `path` and the first mismatching key and shapes.
    """
    ours = model.state_dict()
    sources: dict[str, tuple[str, slice | None]] = {}
    strict_ours = {k: v for k, v in ours.items() if k.startswith("image_encoder.")}
    strict_ours["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = \
        ours["pe_layer.positional_encoding_gaussian_matrix"]
    strict_theirs = {k: v for k, v in sam_state.items()
                     if k.startswith("image_encoder.") or k.startswith("prompt_encoder.pe_layer.")}
    if not strict_theirs:
        raise KeyError(f"SAM checkpoint {path} has no 'image_encoder.*' keys: not a SAM checkpoint "
                       f"(first keys: {list(sam_state)[:3]})")
    cfg = model.cfg
    _first_mismatch(path, "SAM", strict_ours, strict_theirs,
                    f"; the model is configured for image_size {cfg.image_size}, D "
                    f"{cfg.sam_embed_dim}, depth {cfg.sam_depth}, C {cfg.embed_dim} (official SAM "
                    f"checkpoints need S = 1024 and the matching vit_b/l/h preset)")
    for k in strict_ours:
        sources[k.replace("prompt_encoder.", "", 1) if k.startswith("prompt_encoder.") else k] = (k, None)

    initialised = []
    for k, v in ours.items():
        if not k.startswith("mask_decoder."):
            continue
        if k == "mask_decoder.query_token.weight":
            src = sam_state.get("mask_decoder.mask_tokens.weight")
            if (load_mask_decoder and model.cfg.decoder_query_from_sam_mask_token
                    and src is not None and src.shape[1:] == v.shape[1:]):
                sources[k] = ("mask_decoder.mask_tokens.weight", slice(0, 1))
                continue
        elif load_mask_decoder and k in sam_state and sam_state[k].shape == v.shape:
            sources[k] = (k, None)
            continue
        initialised.append(k)
    used = {s for s, _ in sources.values()}
    return dict(sources=sources, initialised=initialised,
                unused=[k for k in sam_state if k not in used])


def load_sam_checkpoint(model: MARIS, path: str | Path, *, load_mask_decoder: bool = True) -> dict:
    """Load an official SAM checkpoint (`sam_vit_{b,l,h}_*.pth`) into the model.

    Args:
        model: a MARIS whose encoder settings match the checkpoint.
        path: flat state dict with `image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`.
        load_mask_decoder: initialise the decoder from SAM's where names and shapes match.

    Returns:
        dict(loaded=[model keys loaded], initialised=[decoder keys left at initialisation],
             unused=[checkpoint keys not used]).

    Raises:
        FileNotFoundError, ValueError, KeyError: naming the file and the first bad key/shapes.
    """
    state = _read_state_dict(path, "SAM")
    plan = sam_load_plan(model, state, path, load_mask_decoder=load_mask_decoder)
    ours = model.state_dict()
    with torch.no_grad():
        for key, (src, rows) in plan["sources"].items():
            value = state[src] if rows is None else state[src][rows]
            ours[key].copy_(value.to(ours[key].dtype))  # state_dict tensors share storage
    return dict(loaded=sorted(plan["sources"]), initialised=plan["initialised"], unused=plan["unused"])


# Text-tower key prefixes in OpenAI / open_clip CLIP checkpoints (visual.*, logit_scale ignored).
_CLIP_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.",
                       "text_projection")


def load_clip_text(model: MARIS, path: str | Path) -> None:
    """Load CLIP's text tower: OpenAI `.pt` (TorchScript), plain state dict, or open_clip.

    Visual keys, `logit_scale` and other non-text keys are ignored; the text keys load strictly.

    Raises:
        FileNotFoundError, ValueError, KeyError: naming the file and, for a mismatch, the first
        mismatching key and its shapes; a context length or width that differs from the config
        is reported as such.
    """
    state = _read_state_dict(path, "CLIP")
    if "token_embedding.weight" not in state and "text.token_embedding.weight" in state:
        state = {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
    text = {k: v for k, v in state.items() if k.startswith(_CLIP_TEXT_PREFIXES)}
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
    ours = model.text_encoder.state_dict()
    _first_mismatch(path, "CLIP", ours, text)
    with torch.no_grad():
        for k, v in ours.items():
            v.copy_(text[k].to(v.dtype))


def build_maris(cfg: MarisConfig, *, sam_checkpoint: str | Path | None = None,
                clip_checkpoint: str | Path | None = None) -> MARIS:
    """Build MARIS and load the released encoder weights.

    The model is built under `torch.manual_seed(cfg.init_seed)` (the global RNG is restored
    afterwards), so frozen encoders that stay random are the same in every process.

    Args:
        cfg: the config.
        sam_checkpoint: official SAM checkpoint for the image encoder, its positional encoding
            and (with `cfg.load_sam_mask_decoder`) the mask decoder.
        clip_checkpoint: CLIP checkpoint for the text tower.

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
    stages += [(f"maa_blocks.{i} (F_v', F_l')", b) for i, b in enumerate(model.maa_blocks)]
    stages += [("mask_decoder.transformer (tokens, image)", model.mask_decoder.transformer),
               ("mask_decoder.output_upscaling", model.mask_decoder.output_upscaling),
               ("mask_decoder (logits)", model.mask_decoder)]
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
