"""Tests for maris.py: shapes, masking laws, shared attention logits, losses, weight loading,
and a CPU overfit run. Everything uses the tiny preset (random frozen encoders) at small S."""
import functools
import json
import math
import os
import pathlib
import subprocess
import sys
import warnings
from functools import partial

import pytest
import safetensors.torch
import torch
from hypothesis import given, strategies as st
from torch import nn

import maris
from conftest import ROOT

SOT, EOT = 49406, 49407
sam_modeling = maris.import_sam_modeling()


@functools.lru_cache(maxsize=None)
def tiny_model(image_size: int = 64) -> maris.MARIS:
    """A shared, read-only tiny model in eval mode (do not train or mutate it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return maris.build_maris(maris.make_config("tiny", image_size=image_size)).eval()


def fresh_tiny(image_size: int = 64, **overrides) -> maris.MARIS:
    """A private tiny model that a test may train."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return maris.build_maris(maris.make_config("tiny", image_size=image_size, **overrides))


def make_text(lengths: list[int], L: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (B, L) with SOT first, EOT at length - 1, id 0 after it; prefix word mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 49405, (len(lengths), L), generator=g)
    word_mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]  # (B, L)
    ids[:, 0] = SOT
    ids[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = EOT
    ids[~word_mask] = 0
    return ids, word_mask


def make_images(B: int, S: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(seed))


@st.composite
def text_batches(draw, max_batch=3, max_len=8):
    """(B, L, lengths) with 2 <= length <= L (SOT and EOT always present)."""
    B = draw(st.integers(1, max_batch))
    L = draw(st.integers(2, max_len))
    lengths = draw(st.lists(st.integers(2, L), min_size=B, max_size=B))
    return B, L, lengths


# --- shapes and batching ---------------------------------------------------------------------

@given(text_batches(), st.sampled_from([32, 48, 64]))
def test_forward_features_shapes(batch, S):
    """forward_features returns the contract's shapes for any B, L and small S."""
    B, L, lengths = batch
    model = tiny_model(S)
    cfg = model.cfg
    ids, wm = make_text(lengths, L)
    with torch.no_grad():
        out = model.forward_features(ids, wm, images=make_images(B, S))
    H = S // 16
    assert out["logits"].shape == (B, 1, 4 * H, 4 * H)
    assert out["visual"].shape == (B, H * H, cfg.embed_dim)
    assert out["words"].shape == (B, L, cfg.embed_dim)
    assert out["sentence"].shape == (B, cfg.text_embed_dim)
    assert out["word_features"].shape == (B, L, cfg.text_width)
    assert torch.isfinite(out["logits"]).all()


def test_encode_image_and_predict_shapes():
    """encode_image gives the neck and three taps; predict gives probabilities at (S, S)."""
    model, S = tiny_model(64), 64
    feats = model.encode_image(make_images(2, S))
    assert feats["neck"].shape == (2, model.cfg.embed_dim, 4, 4)
    assert [t.shape for t in feats["taps"]] == [(2, 4, 4, model.cfg.sam_embed_dim)] * 3
    ids, wm = make_text([3, 5], 6)
    probs = model.predict(make_images(2, S), ids, wm)
    assert probs.shape == (2, 1, S, S) and probs.min() >= 0 and probs.max() <= 1


@given(text_batches(max_batch=4))
def test_batch_independence(batch):
    """In eval mode a row's output does not depend on the other rows of the batch."""
    B, L, lengths = batch
    model = tiny_model(32)
    ids, wm = make_text(lengths, L, seed=1)
    images = make_images(B, 32, seed=2)
    with torch.no_grad():
        full = model(images, ids, wm)
        for i in range(B):
            alone = model(images[i:i + 1], ids[i:i + 1], wm[i:i + 1])
            torch.testing.assert_close(alone, full[i:i + 1], atol=1e-5, rtol=1e-4)


def test_image_index_and_image_features_match_repeated_images():
    """Sentences sharing an image row (image_index) or a feature cache equal repeated images."""
    model = tiny_model(32)
    images = make_images(2, 32, seed=3)
    ids, wm = make_text([3, 5, 4], 6, seed=4)
    index = torch.tensor([1, 0, 1])
    with torch.no_grad():
        expected = model(images[index], ids, wm)
        by_index = model(images, ids, wm, image_index=index)
        feats = {"neck": model.encode_image(images)["neck"].half(),
                 "taps": model.encode_image(images)["taps"]}
        cached = model(None, ids, wm, image_index=index, image_features=model.encode_image(images))
        half = model(None, ids, wm, image_index=index, image_features=feats)
    torch.testing.assert_close(by_index, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-4)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


def test_bad_inputs_raise_clear_errors():
    """Wrong image size, a non-prefix word mask and an out-of-range image_index are refused."""
    model = tiny_model(32)
    ids, wm = make_text([3, 4], 5)
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 32, 32\)"):
        model(make_images(2, 64), ids, wm)
    bad = wm.clone()
    bad[0, 4] = True  # a hole between EOT and a later "word"
    with pytest.raises(ValueError, match="word_mask"):
        model(make_images(2, 32), ids, bad)
    with pytest.raises(ValueError, match="image_index"):
        model(make_images(2, 32), ids, wm, image_index=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="exactly one"):
        model.forward_features(ids, wm)


# --- padding invariance -----------------------------------------------------------------------

@given(text_batches(), st.integers(0, 2**16))
def test_padding_ids_change_nothing(batch, seed):
    """Changing the ids after EOT changes no logit and no real-word or sentence feature."""
    B, L, lengths = batch
    model = tiny_model(32)
    ids, wm = make_text(lengths, L, seed=seed)
    other = ids.clone()
    other[~wm] = torch.randint(1, 49405, (int((~wm).sum()),), generator=torch.Generator().manual_seed(seed))
    images = make_images(B, 32)
    with torch.no_grad():
        a = model.forward_features(ids, wm, images=images)
        b = model.forward_features(other, wm, images=images)
    torch.testing.assert_close(a["logits"], b["logits"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a["visual"], b["visual"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a["sentence"], b["sentence"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a["words"][wm], b["words"][wm], atol=1e-5, rtol=1e-4)
    assert (a["words"][~wm] == 0).all() and (b["words"][~wm] == 0).all()


def test_padding_token_embeddings_change_nothing():
    """Changing the token embeddings after EOT (the Mask Grounding hook) changes no output."""
    model = tiny_model(32)
    ids, wm = make_text([3, 6], 8, seed=5)
    emb = model.text_encoder.token_embedding(ids)
    noisy = emb.clone()
    noisy[~wm] = torch.randn_like(noisy[~wm]) * 5
    images = make_images(2, 32)
    with torch.no_grad():
        plain = model.forward_features(ids, wm, images=images)
        a = model.forward_features(ids, wm, images=images, token_embeddings=emb)
        b = model.forward_features(ids, wm, images=images, token_embeddings=noisy)
    torch.testing.assert_close(a["logits"], plain["logits"])
    torch.testing.assert_close(a["logits"], b["logits"], atol=1e-5, rtol=1e-4)


@functools.lru_cache(maxsize=None)
def perturbed_tiny(image_size: int = 32, seed: int = 0) -> maris.MARIS:
    """A shared, read-only tiny model with noise added to every parameter, so no zero-initialised branch
    (Feature Enhancement's last conv, biases) hides a dependence."""
    model = fresh_tiny(image_size).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@given(st.lists(st.integers(2, 8), min_size=1, max_size=3), st.integers(0, 2**16))
def test_logits_do_not_depend_on_the_padding_length(lengths, seed):
    """The same sentences tokenized to L = 8 and to L = 16 (padded with random ids) give the same logits
    and features through the whole model, every parameter perturbed away from its initialisation."""
    model = perturbed_tiny(32)
    ids, wm = make_text(lengths, 8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    long_ids = torch.cat([ids, torch.randint(1, 49405, (len(lengths), 8), generator=g)], dim=1)  # (B, 16)
    long_ids[:, :8][~wm] = torch.randint(1, 49405, (int((~wm).sum()),), generator=g)  # and other padding
    long_wm = torch.cat([wm, torch.zeros_like(wm)], dim=1)
    images = make_images(len(lengths), 32, seed=seed)
    with torch.no_grad():
        short = model.forward_features(ids, wm, images=images)
        long = model.forward_features(long_ids, long_wm, images=images)
    torch.testing.assert_close(long["logits"], short["logits"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(long["visual"], short["visual"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(long["sentence"], short["sentence"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(long["words"][:, :8][wm], short["words"][wm], atol=1e-5, rtol=1e-4)


def test_sentence_feature_is_eot_from_the_mask():
    """F_s is F_w at word_mask.sum(1) - 1 times text_projection, not at argmax(ids)."""
    model = tiny_model(32)
    ids, wm = make_text([4, 7], 8, seed=6)
    ids[0, 1] = EOT + 0  # an EOT-valued id before the real EOT must not be picked...
    ids[1, 7] = 49407  # ...nor a high id in the padding
    F_w, F_s = model.encode_text(ids, wm)
    expected = F_w[torch.arange(2), wm.sum(1) - 1] @ model.text_encoder.text_projection
    torch.testing.assert_close(F_s, expected)


# --- Mutual-Aware Attention: one shared logits tensor ----------------------------------------

def test_vga_and_lga_share_one_logits_tensor():
    """The block's VGA weights are softmax_L(A masked) and its LGA weights softmax_N(A^T) of the
    same A, and the block output is built from exactly those weights."""
    torch.manual_seed(0)
    block = maris.MutualAwareAttention(dim=32, num_heads=4).eval()
    B, N, L, C = 2, 6, 5, 32
    visual, words = torch.randn(B, N, C), torch.randn(B, L, C)
    wm = torch.tensor([[True] * 5, [True, True, True, False, False]])
    visual_pe, word_pe = torch.randn(N, C), torch.randn(L, C)
    captured = {}
    original = block.attention_weights

    def hooked(*args):
        captured["A"], captured["vga"], captured["lga"] = out = original(*args)
        return out

    block.attention_weights = hooked
    new_visual, new_words = block(visual, words, wm, visual_pe, word_pe)
    A, vga, lga = captured["A"], captured["vga"], captured["lga"]
    assert A.shape == (B, 4, N, L)
    torch.testing.assert_close(vga, A.masked_fill(~wm[:, None, None], float("-inf")).softmax(-1))
    torch.testing.assert_close(lga, A.transpose(-2, -1).softmax(-1))
    assert (vga[1, :, :, 3:] == 0).all()  # padded words get no Vision-Guided weight
    # Rebuild both branches from the captured weights (both from the same inputs).
    h = lambda x: maris._split_heads(x, 4)  # noqa: E731
    to_v = block.out_proj_visual(maris._merge_heads(vga @ h(block.v_proj_words(words))))
    to_l = block.out_proj_words(maris._merge_heads(lga @ h(block.v_proj_visual(visual))))
    v = block.norm_visual1(visual + to_v)
    torch.testing.assert_close(new_visual, block.norm_visual2(v + block.mlp_visual(v)))
    w = block.norm_words1(words + to_l * wm[..., None])
    expected_words = block.norm_words2(w + block.mlp_words(w)) * wm[..., None]
    torch.testing.assert_close(new_words, expected_words)
    assert (new_words[1, 3:] == 0).all()


def reference_mutual_aware_attention(block, visual, words, word_mask, visual_pe, word_pe):
    """The block's docstring equations written out with einsum and the block's weights:
    Q = (F_v + P_v) W_q, K = (F_l + P_l) W_k, A = Q K^T / sqrt(d) per head; VGA and LGA from A."""
    h = block.num_heads
    (B, N, C), L = visual.shape, words.shape[1]
    d = C // h

    def heads(x):  # (B, T, C) -> (B, h, T, d)
        return x.reshape(x.shape[0], x.shape[1], h, d).permute(0, 2, 1, 3)

    def linear(m, x):
        return x @ m.weight.T + m.bias

    def norm(m, x):
        return torch.nn.functional.layer_norm(x, (C,), m.weight, m.bias, m.eps)

    def ffn(m, x):
        return linear(m.fc2, torch.nn.functional.gelu(linear(m.fc1, x)))

    Q, K = heads(linear(block.q_proj, visual + visual_pe)), heads(linear(block.k_proj, words + word_pe))
    A = torch.einsum("bhnd,bhld->bhnl", Q, K) / d ** 0.5
    vga = (A + torch.where(word_mask, 0.0, float("-inf"))[:, None, None, :]).softmax(-1)  # over L
    lga = A.transpose(-2, -1).softmax(-1)  # over N
    to_visual = torch.einsum("bhnl,bhld->bnhd", vga, heads(linear(block.v_proj_words, words))).reshape(B, N, C)
    to_words = torch.einsum("bhln,bhnd->blhd", lga, heads(linear(block.v_proj_visual, visual))).reshape(B, L, C)
    real = word_mask[..., None].float()
    v = norm(block.norm_visual1, visual + linear(block.out_proj_visual, to_visual))
    v = norm(block.norm_visual2, v + ffn(block.mlp_visual, v))
    w = norm(block.norm_words1, words + linear(block.out_proj_words, to_words) * real)
    w = norm(block.norm_words2, w + ffn(block.mlp_words, w)) * real
    return v, w


@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.integers(0, 2**16))
def test_mutual_aware_attention_follows_its_equations(lengths, seed):
    """A Mutual-Aware Attention block with random weights equals its equations written out independently
    (P_v and P_l added to the queries and keys, the shared A, both softmaxes, masks, LayerNorms, FFNs)."""
    torch.manual_seed(seed)
    block = maris.MutualAwareAttention(dim=16, num_heads=4).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    B, N, L, C = len(lengths), 6, 5, 16
    visual, words = torch.randn(B, N, C), torch.randn(B, L, C)
    word_mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    visual_pe, word_pe = torch.randn(N, C), torch.randn(L, C)
    with torch.no_grad():
        out = block(visual, words, word_mask, visual_pe, word_pe)
        expected = reference_mutual_aware_attention(block, visual, words, word_mask, visual_pe, word_pe)
    torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], expected[1], atol=1e-5, rtol=1e-4)


# --- Feature Enhancement ------------------------------------------------------------------------

def test_feature_enhancement_is_sam_neck_at_init():
    """At initialisation Feature Enhancement returns SAM's neck output exactly."""
    model = tiny_model(64)
    feats = model.encode_image(make_images(2, 64, seed=7))
    with torch.no_grad():
        F_v = model.feature_enhancement(feats["taps"], feats["neck"])  # (B, N, C)
    assert torch.equal(F_v, feats["neck"].flatten(2).transpose(1, 2))


# --- gradients and frozen encoders ------------------------------------------------------------

def test_gradients_reach_trainable_only_and_frozen_stay_identical():
    """After optimizer steps every trainable parameter has a non-zero gradient; the frozen
    encoders get none and stay bit-identical."""
    model = fresh_tiny(32).train()
    frozen_before = {k: v.clone() for k, v in model.state_dict().items()
                     if k.startswith(("image_encoder.", "text_encoder.", "pe_layer."))}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)  # frozen ones included
    ids, wm = make_text([3, 5], 6)
    images, masks = make_images(2, 32), (torch.rand(2, 32, 32) > 0.5).float()
    for _ in range(2):  # FE's zero-initialised conv blocks gradients to earlier FE layers at step 0
        opt.zero_grad()
        maris.segmentation_loss(model(images, ids, wm), masks, None, model.cfg)["loss"].backward()
        opt.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen_before.items())
    assert not model.image_encoder.training and not model.text_encoder.training
    assert model.feature_enhancement.training


def test_trainable_state_dict_round_trip_and_errors():
    """trainable_state_dict holds only trainable weights and loads back strictly."""
    model, other = fresh_tiny(32), fresh_tiny(32, init_seed=1)
    sd = model.trainable_state_dict()
    assert sd and not any(k.startswith(("image_encoder.", "text_encoder.")) for k in sd)
    other.load_trainable_state_dict(sd)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(KeyError, match="word_pos"):
        other.load_trainable_state_dict({k: v for k, v in sd.items() if k != "word_pos"})
    with pytest.raises(KeyError, match="bogus"):
        other.load_trainable_state_dict({**sd, "bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match="word_pos"):
        other.load_trainable_state_dict({**sd, "word_pos": torch.zeros(3)})


def test_build_is_deterministic_and_restores_rng():
    """build_maris gives identical random encoders for one init_seed and leaves the RNG alone."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = fresh_tiny(32), fresh_tiny(32)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


# --- segment-anything import -----------------------------------------------------------------------

TORCHVISION_STUB = {  # what segment_anything's __init__ imports from torchvision, as do-nothing functions
    "torchvision/__init__.py": "",
    "torchvision/transforms/__init__.py": "",
    "torchvision/transforms/functional.py": "def resize(*a, **k): raise NotImplementedError\n"
                                            "def to_pil_image(*a, **k): raise NotImplementedError\n",
    "torchvision/ops/__init__.py": "",
    "torchvision/ops/boxes.py": "def batched_nms(*a, **k): raise NotImplementedError\n"
                                "def box_area(*a, **k): raise NotImplementedError\n",
}


def run_python(code: str, tmp_path, pythonpath: list) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [*pythonpath, ROOT]))}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


def test_importing_maris_keeps_segment_anything_whole(tmp_path):
    """With a torchvision importable, `import maris` runs segment_anything's own __init__: afterwards
    `from segment_anything import sam_model_registry` works and maris uses the same classes."""
    for name, text in TORCHVISION_STUB.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    proc = run_python("import maris\n"
                      "from segment_anything import sam_model_registry, SamPredictor\n"
                      "import segment_anything.modeling as m\n"
                      "assert maris.ImageEncoderViT is m.ImageEncoderViT and 'vit_b' in sam_model_registry\n",
                      tmp_path, [tmp_path])
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_maris_imports_without_torchvision(tmp_path):
    """Without torchvision, maris still imports and segment_anything.build_sam still builds SAM."""
    proc = run_python("import sys; sys.modules['torchvision'] = None  # makes `import torchvision` fail\n"
                      "import torch, maris\n"
                      "from segment_anything.build_sam import sam_model_registry\n"
                      "with torch.device('meta'):\n"
                      "    sam = sam_model_registry['vit_b']()\n"
                      "assert type(sam.image_encoder) is maris.ImageEncoderViT\n",
                      tmp_path, [])
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_config_round_trip_and_unknown_fields():
    """config_to_dict / config_from_dict round-trip; unknown presets and fields are refused."""
    cfg = maris.make_config("vit_l", context_length=30)
    assert maris.config_from_dict(maris.config_to_dict(cfg)) == cfg
    assert cfg.fe_taps == (11, 17, 23) and cfg.sam_global_attn_indexes == (5, 11, 17, 23)
    with pytest.raises(ValueError, match="nope"):
        maris.make_config("tiny", nope=1)
    with pytest.raises(ValueError, match="vit_x"):
        maris.make_config("vit_x")


# --- losses -------------------------------------------------------------------------------------

@given(st.integers(0, 2**16), st.floats(0.1, 10))
def test_loss_ranges(seed, scale):
    """Focal loss is >= 0 and dice loss lies in [0, 1] for any logits and binary targets."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 16, 16, generator=g) * scale
    targets = (torch.rand(3, 16, 16, generator=g) > 0.5).float()
    valid = torch.rand(3, 16, 16, generator=g) > 0.2
    focal = maris.sigmoid_focal_loss(logits, targets, valid)
    dice = maris.dice_loss(logits, targets, valid)
    assert focal.shape == dice.shape == (3,)
    assert (focal >= 0).all() and (dice >= 0).all() and (dice <= 1).all()


def test_losses_near_zero_for_confident_perfect_prediction():
    """A confident, correct prediction has focal and dice near 0 (also for an empty mask)."""
    targets = torch.zeros(2, 16, 16)
    targets[0, 4:10, 3:12] = 1  # second sample: empty target
    logits = (targets * 2 - 1) * 20
    assert maris.sigmoid_focal_loss(logits, targets).max() < 1e-6
    assert maris.dice_loss(logits, targets).max() < 1e-6
    bad = maris.dice_loss(-logits, targets)
    assert bad[0] > 0.9


def test_padded_area_is_ignored_by_the_loss():
    """Logits and targets outside the valid area do not change segmentation_loss."""
    cfg = maris.make_config("tiny")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=g)
    masks = (torch.rand(2, 32, 32, generator=g) > 0.5).float()
    valid = torch.zeros(2, 32, 32, dtype=torch.bool)
    valid[:, :20, :24] = True
    base = maris.segmentation_loss(logits, masks, valid, cfg)
    changed_masks = masks.clone()
    changed_masks[~valid] = 1 - changed_masks[~valid]
    other = maris.segmentation_loss(logits, changed_masks, valid, cfg)
    # Logits in the bottom-right 8 x 8 cells only reach pixels outside the valid area after
    # bilinear upsampling if they are far from it; change the corner cell only.
    moved = logits.clone()
    moved[:, :, 7, 7] += 50
    other_logits = maris.segmentation_loss(moved, masks, valid, cfg)
    for key in ("loss", "focal", "dice"):
        torch.testing.assert_close(base[key], other[key])
        torch.testing.assert_close(base[key], other_logits[key])
    assert base["loss"] == cfg.loss_focal_weight * base["focal"] + cfg.loss_dice_weight * base["dice"]


# --- SAM weight loading -------------------------------------------------------------------------

def small_sam(cfg: maris.MarisConfig) -> nn.Module:
    """segment_anything's own Sam with the tiny preset's encoder settings (SAM's builder layout)."""
    H = cfg.image_size // cfg.patch_size
    m = sam_modeling
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(
            depth=cfg.sam_depth, embed_dim=cfg.sam_embed_dim, img_size=cfg.image_size, mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=cfg.sam_num_heads,
            patch_size=cfg.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=cfg.sam_global_attn_indexes, window_size=cfg.sam_window_size,
            out_chans=cfg.embed_dim),
        prompt_encoder=m.PromptEncoder(embed_dim=cfg.embed_dim, image_embedding_size=(H, H),
                                       input_image_size=(cfg.image_size, cfg.image_size),
                                       mask_in_chans=16),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.embed_dim,
                                            mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_heads),
            transformer_dim=cfg.embed_dim, iou_head_depth=3, iou_head_hidden_dim=cfg.embed_dim),
    )
    with torch.no_grad():  # SAM zero-initialises pos_embed and rel_pos: make every weight matter
        for p in sam.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return sam.eval()


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = maris.make_config("tiny", image_size=64)
    sam = small_sam(cfg)
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    return cfg, sam, path


def test_sam_checkpoint_loads_and_embeddings_equal_sam(sam_checkpoint):
    """A checkpoint written by segment_anything's Sam loads strictly; the neck equals SAM's own
    image embedding and every decoder weight but the sentence projection comes from SAM."""
    cfg, sam, path = sam_checkpoint
    model = fresh_tiny(64)
    report = maris.load_sam_checkpoint(model, path)
    encoder_keys = {"image_encoder." + k for k in sam.image_encoder.state_dict()}
    assert encoder_keys <= set(report["loaded"])
    assert "pe_layer.positional_encoding_gaussian_matrix" in report["loaded"]
    assert report["initialised"] == ["mask_decoder.sentence_proj.weight", "mask_decoder.sentence_proj.bias"]
    assert "mask_decoder.iou_token.weight" in report["unused"]
    images = make_images(2, 64, seed=8)
    with torch.no_grad():
        expected = sam.image_encoder(images)
    torch.testing.assert_close(model.encode_image(images)["neck"], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.mask_decoder.query_token.weight, sam.mask_decoder.mask_tokens.weight[:1])
    torch.testing.assert_close(model.pe_layer((4, 4)), sam.prompt_encoder.get_dense_pe()[0])


def test_decoder_transformer_matches_sam_without_padding(sam_checkpoint):
    """With SAM's weights and no padded tokens, our two-way transformer equals SAM's."""
    cfg, sam, _ = sam_checkpoint
    ours = maris.TwoWayTransformer(depth=cfg.decoder_depth, dim=cfg.embed_dim,
                                   num_heads=cfg.decoder_heads, mlp_dim=cfg.decoder_mlp_dim)
    ours.load_state_dict(sam.mask_decoder.transformer.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    C, H = cfg.embed_dim, 4
    image, pe = torch.randn(2, C, H, H, generator=g), torch.randn(2, C, H, H, generator=g)
    tokens = torch.randn(2, 5, C, generator=g)
    with torch.no_grad():
        q_sam, k_sam = sam.mask_decoder.transformer(image, pe, tokens)
        q, k = ours(image.flatten(2).transpose(1, 2), pe.flatten(2).transpose(1, 2), tokens,
                    torch.ones(2, 5, dtype=torch.bool))
    torch.testing.assert_close(q, q_sam, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(k, k_sam, atol=1e-5, rtol=1e-4)


def test_sam_registry_vit_b_key_layout_matches():
    """sam_model_registry['vit_b'] (built on the meta device) matches a vit_b MARIS key for key."""
    build_sam = __import__("segment_anything.build_sam", fromlist=["sam_model_registry"])
    with torch.device("meta"):
        sam = build_sam.sam_model_registry["vit_b"]()
        model = maris.MARIS(maris.make_config("vit_b"))
    plan = maris.sam_load_plan(model, sam.state_dict(), "vit_b")
    assert plan["initialised"] == ["mask_decoder.sentence_proj.weight", "mask_decoder.sentence_proj.bias"]
    assert {"image_encoder." + k for k in sam.image_encoder.state_dict()} <= set(plan["sources"])
    assert all(k.startswith(("prompt_encoder.", "mask_decoder.iou", "mask_decoder.output_hypernetworks_mlps."))
               for k in plan["unused"])


def test_sam_bad_files_give_clear_errors(sam_checkpoint, tmp_path):
    """Truncated, wrong-size and non-SAM files raise errors naming the file and the key/shapes."""
    cfg, sam, path = sam_checkpoint
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated.pth"):
        maris.load_sam_checkpoint(fresh_tiny(64), truncated)
    with pytest.raises(ValueError, match=r"pos_embed.*\(1, 4, 4, 128\).*\(1, 2, 2, 128\)"):
        maris.load_sam_checkpoint(fresh_tiny(32), path)  # a checkpoint for another image size
    missing = tmp_path / "missing.pth"
    sd = sam.state_dict()
    sd.pop("image_encoder.neck.0.weight")
    torch.save(sd, missing)
    with pytest.raises(KeyError, match=r"missing.pth.*image_encoder\.neck\.0\.weight"):
        maris.load_sam_checkpoint(fresh_tiny(64), missing)
    other = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(2)}, other)
    with pytest.raises(KeyError, match="other.pth.*not a SAM checkpoint"):
        maris.load_sam_checkpoint(fresh_tiny(64), other)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        maris.load_sam_checkpoint(fresh_tiny(64), tmp_path / "absent.pth")


# --- CLIP weight loading ------------------------------------------------------------------------

class OpenAIClipLike(nn.Module):
    """A module whose state dict is named like OpenAI's CLIP (text tower + visual + logit_scale)."""

    def __init__(self, text: maris.CLIPTextEncoder) -> None:
        super().__init__()
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.transformer = text.transformer
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        self.visual = nn.Linear(3, 4)
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.logit_scale


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    torch.manual_seed(1)
    cfg = maris.make_config("tiny")
    text = maris.CLIPTextEncoder(vocab_size=cfg.vocab_size, context_length=cfg.text_context_length,
                                 width=cfg.text_width, layers=cfg.text_layers, heads=cfg.text_heads,
                                 embed_dim=cfg.text_embed_dim)
    with torch.no_grad():
        for p in text.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    clip = OpenAIClipLike(text)
    folder = tmp_path_factory.mktemp("clip")
    paths = {"plain": folder / "clip_plain.pt", "jit": folder / "clip_jit.pt",
             "open_clip": folder / "open_clip.pt"}
    torch.save(clip.state_dict(), paths["plain"])
    with warnings.catch_warnings():  # torch.jit is deprecated, but it is how OpenAI ships CLIP
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(clip), str(paths["jit"]))
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in clip.state_dict().items()}},
               paths["open_clip"])
    return text.requires_grad_(False).eval(), paths  # frozen like ours: same MHA kernel path


@pytest.mark.parametrize("kind", ["plain", "jit", "open_clip"])
def test_clip_text_loads_with_identical_outputs(clip_files, kind):
    """OpenAI-named, TorchScript and open_clip-wrapped files load to the same text features."""
    text, paths = clip_files
    model = fresh_tiny(32)
    maris.load_clip_text(model, paths[kind])
    ids, wm = make_text([3, 7], 9, seed=9)
    with torch.no_grad():
        F_w, F_s = model.encode_text(ids, wm)
        E_w, E_s = text(ids, wm)
    assert torch.equal(F_w, E_w) and torch.equal(F_s, E_s)


def test_clip_bad_files_give_clear_errors(clip_files, tmp_path):
    """Truncated files, another width or context length, and extra layers are named clearly."""
    _, paths = clip_files
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(paths["jit"].read_bytes()[:3000])
    with pytest.raises(ValueError, match="cut.pt"):
        maris.load_clip_text(fresh_tiny(32), truncated)
    with pytest.raises(ValueError, match=r"clip_plain.pt.*text_width 32"):
        maris.load_clip_text(fresh_tiny(32, text_width=32), paths["plain"])
    with pytest.raises(ValueError, match=r"context length 77.*text_context_length 40"):
        maris.load_clip_text(fresh_tiny(32, text_context_length=40), paths["plain"])
    with pytest.raises(KeyError, match=r"unexpected key 'transformer\.resblocks\.1\."):
        maris.load_clip_text(fresh_tiny(32, text_layers=1), paths["plain"])
    sd = torch.load(paths["plain"])
    sd["ln_final.weight"] = torch.ones(5)
    bad = tmp_path / "bad_shape.pt"
    torch.save(sd, bad)
    with pytest.raises(ValueError, match=r"bad_shape.pt.*'ln_final.weight' has shape \(5,\).*\(64,\)"):
        maris.load_clip_text(fresh_tiny(32), bad)


def test_build_maris_warns_about_random_encoders(clip_files):
    """Without checkpoints build_maris warns that the frozen encoders are random."""
    with pytest.warns(UserWarning, match="RANDOM"):
        maris.build_maris(maris.make_config("tiny", image_size=32))
    _, paths = clip_files
    with pytest.warns(UserWarning, match=r"RANDOM weights in the frozen SAM image encoder \("):
        maris.build_maris(maris.make_config("tiny", image_size=32), clip_checkpoint=paths["plain"])


# --- Hugging Face formats: tests/fixtures/hf, written by transformers itself ----------------------

HF = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf"
# The MARIS config of the fixtures' tiny SamModel and CLIPTextModelWithProjection (SAM_TINY and
# CLIP_TINY in tests/fixtures/hf/make_hf_fixtures.py; vocabulary of 64 ids, EOT = 63).
HF_TINY = dict(image_size=64, sam_embed_dim=16, sam_depth=3, sam_num_heads=2, sam_global_attn_indexes=(2,),
               sam_window_size=3, fe_taps=(0, 1, 2), embed_dim=16, maa_heads=2, decoder_heads=2,
               decoder_mlp_dim=64, vocab_size=64, text_context_length=16, context_length=12, text_width=32,
               text_layers=2, text_heads=4, text_embed_dim=24)
DECODER_NOT_IN_SAM = ["mask_decoder.sentence_proj.weight", "mask_decoder.sentence_proj.bias"]


@functools.lru_cache(maxsize=None)
def hf_reference() -> dict[str, torch.Tensor]:
    """Inputs and transformers' outputs on them (read-only)."""
    return safetensors.torch.load_file(HF / "reference_outputs.safetensors")


def hf_state(model: str) -> dict[str, torch.Tensor]:
    """A fresh copy of a fixture's state dict in transformers' names."""
    return safetensors.torch.load_file(HF / model / "model.safetensors")


def hf_tiny(**overrides) -> maris.MARIS:
    """A private MARIS with the fixtures' sizes (random weights until loaded)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return maris.build_maris(maris.make_config("tiny", **{**HF_TINY, **overrides})).eval()


def hf_text() -> tuple[torch.Tensor, torch.Tensor]:
    """The reference ids (B, L) and their word mask, True through the first EOT (id 63)."""
    ids = hf_reference()["clip.input_ids"]
    eot = (ids == 63).int().argmax(1)  # (B,)
    return ids, torch.arange(ids.shape[1])[None] <= eot[:, None]


def encode_text(model: maris.MARIS) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_text(*hf_text())


def test_hf_sam_folder_gives_transformers_image_embedding():
    """A transformers SamModel folder loads strictly; the neck equals transformers' image embedding."""
    model = hf_tiny()
    report = maris.load_sam_checkpoint(model, HF / "sam-tiny")
    assert report["initialised"] == DECODER_NOT_IN_SAM
    assert "mask_decoder.iou_prediction_head.proj_in.weight" in report["unused"]  # named as in the file
    ref = hf_reference()
    with torch.no_grad():
        neck = model.encode_image(ref["sam.pixel_values"])["neck"]
    torch.testing.assert_close(neck, ref["sam.image_embeddings"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.mask_decoder.query_token.weight,
                               hf_state("sam-tiny")["mask_decoder.mask_tokens.weight"][:1])


def test_sam_name_map_makes_segment_anything_reproduce_transformers():
    """Renamed by SAM_HF_NAMES, the file loads strictly into segment_anything's Sam, whose image
    encoder, prompt encoder and mask decoder then give transformers' embedding, masks and IoUs."""
    state, _ = maris.sam_state_from_hf(hf_state("sam-tiny"))
    sam = small_sam(maris.make_config("tiny", **HF_TINY))
    sam.load_state_dict(state, strict=True)
    ref = hf_reference()
    points, labels = ref["sam.input_points"][0], ref["sam.input_labels"][0]  # (1, n, 2), (1, n)
    with torch.no_grad():
        embedding = sam.image_encoder(ref["sam.pixel_values"])
        sparse, dense = sam.prompt_encoder(points=(points, labels), boxes=None, masks=None)
        masks, iou = sam.mask_decoder(image_embeddings=ref["sam.image_embeddings"],
                                      image_pe=sam.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
                                      dense_prompt_embeddings=dense, multimask_output=True)
    torch.testing.assert_close(embedding, ref["sam.image_embeddings"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masks, ref["sam.pred_masks"][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(iou, ref["sam.iou_scores"][0], atol=1e-5, rtol=1e-5)


def test_hf_and_segment_anything_sam_files_load_identically(tmp_path):
    """The same weights as a transformers file and as segment_anything's own .pth give identical models."""
    state, _ = maris.sam_state_from_hf(hf_state("sam-tiny"))
    sam = small_sam(maris.make_config("tiny", **HF_TINY))
    sam.load_state_dict(state, strict=True)
    torch.save(sam.state_dict(), tmp_path / "sam_tiny.pth")
    from_hf, from_pth = hf_tiny(), hf_tiny()
    report_hf = maris.load_sam_checkpoint(from_hf, HF / "sam-tiny" / "model.safetensors")
    report_pth = maris.load_sam_checkpoint(from_pth, tmp_path / "sam_tiny.pth")
    assert report_hf["loaded"] == report_pth["loaded"] and report_hf["initialised"] == report_pth["initialised"]
    assert len(report_hf["unused"]) == len(report_pth["unused"])
    a, b = from_hf.state_dict(), from_pth.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sam_tied_positional_encoding_loads_from_either_copy(tmp_path):
    """transformers ties prompt_encoder.shared_embedding to shared_image_embedding: either copy gives P_v."""
    sd = hf_state("sam-tiny")
    expected = sd["shared_image_embedding.positional_embedding"]
    both = {**sd, "prompt_encoder.shared_embedding.positional_embedding": expected.clone()}
    only_tied = dict(both)
    del only_tied["shared_image_embedding.positional_embedding"]
    for name, state in (("both", both), ("only_tied", only_tied)):
        safetensors.torch.save_file(state, tmp_path / f"{name}.safetensors")
        model = hf_tiny()
        maris.load_sam_checkpoint(model, tmp_path / f"{name}.safetensors")
        assert torch.equal(model.pe_layer.positional_encoding_gaussian_matrix, expected), name


def test_clip_text_tower_matches_transformers_reference():
    """With transformers' CLIP weights (quick_gelu) our text tower gives its per-token last hidden
    state and projected EOT feature: an independent reference (QuickGELU -> GELU moves them by ~5e-2)."""
    model = hf_tiny()
    maris.load_clip_text(model, HF / "clip-text-tiny")
    F_w, F_s = encode_text(model)
    ref = hf_reference()
    torch.testing.assert_close(F_w, ref["clip.last_hidden_state"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(F_s, ref["clip.text_embeds"], atol=1e-5, rtol=1e-5)


def test_hf_and_openai_named_clip_files_load_identically(tmp_path):
    """The same weights as a transformers file and saved in OpenAI's names give identical features."""
    openai_named, _ = maris.clip_state_from_hf(hf_state("clip-text-tiny"))
    torch.save({**openai_named, "visual.proj": torch.zeros(3), "logit_scale": torch.ones([])}, tmp_path / "clip.pt")
    from_hf, from_openai = hf_tiny(), hf_tiny()
    maris.load_clip_text(from_hf, HF / "clip-text-tiny" / "model.safetensors")
    maris.load_clip_text(from_openai, tmp_path / "clip.pt")
    for x, y in zip(encode_text(from_hf), encode_text(from_openai)):
        assert torch.equal(x, y)


def write_layout(state: dict[str, torch.Tensor], folder: pathlib.Path, layout: str) -> pathlib.Path:
    """Write a state dict as a downloaded Hugging Face model folder (or file) of the given layout."""
    folder.mkdir()
    keys = list(state)
    if layout in ("safetensors-shards", "bin-shards"):
        suffix, save = ((".safetensors", safetensors.torch.save_file) if layout == "safetensors-shards"
                        else (".bin", torch.save))
        weight_map = {}
        for n, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), start=1):
            shard = f"model-{n:05d}-of-00002{suffix}"
            save({k: state[k] for k in part}, folder / shard)
            weight_map.update({k: shard for k in part})
        index = "model.safetensors.index.json" if suffix == ".safetensors" else "pytorch_model.bin.index.json"
        (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return folder
    if layout == "bin":
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    safetensors.torch.save_file(state, folder / "weights.pt")  # safetensors under a misleading name
    return folder / "weights.pt"


@pytest.mark.parametrize("layout", ["safetensors-shards", "bin-shards", "bin", "renamed-file"])
def test_hf_weights_read_from_every_layout(tmp_path, layout):
    """Sharded safetensors / .bin folders, a pytorch_model.bin folder and a safetensors file with
    another name (told by its content) load the same CLIP tower as model.safetensors."""
    path = write_layout(hf_state("clip-text-tiny"), tmp_path / layout, layout)
    reference, model = hf_tiny(), hf_tiny()
    maris.load_clip_text(reference, HF / "clip-text-tiny")
    maris.load_clip_text(model, path)
    a, b = reference.text_encoder.state_dict(), model.text_encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hf_clip_model_vision_keys_and_position_ids_are_ignored(tmp_path):
    """A whole CLIPModel file (vision tower, logit_scale, older files' position_ids buffer) loads its text tower."""
    sd = hf_state("clip-text-tiny")
    sd.update({"vision_model.embeddings.patch_embedding.weight": torch.randn(8, 3, 4, 4),
               "visual_projection.weight": torch.randn(24, 8), "logit_scale": torch.tensor(4.6),
               "text_model.embeddings.position_ids": torch.arange(16)[None],
               "vision_model.embeddings.position_ids": torch.arange(5)[None]})
    safetensors.torch.save_file(sd, tmp_path / "model.safetensors")
    model = hf_tiny()
    maris.load_clip_text(model, tmp_path)
    torch.testing.assert_close(encode_text(model)[1], hf_reference()["clip.text_embeds"], atol=1e-5, rtol=1e-5)


def meta_manifest(hub_name: str) -> dict[str, torch.Tensor]:
    """The real checkpoint's keys as meta tensors of its shapes (tests/fixtures/hf/manifests.json)."""
    shapes = json.loads((HF / "manifests.json").read_text())[hub_name]
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


@pytest.mark.parametrize("hub_name, preset", [("facebook/sam-vit-base", "vit_b"), ("facebook/sam-vit-huge", "vit_h")])
def test_sam_name_map_covers_the_real_checkpoints(hub_name, preset):
    """Renamed by SAM_HF_NAMES, the real checkpoint's keys and shapes are exactly segment_anything's
    sam_model_registry model's, and a MARIS of the preset plans the load as from the .pth."""
    build_sam = __import__("segment_anything.build_sam", fromlist=["sam_model_registry"])
    state, names = maris.sam_state_from_hf(meta_manifest(hub_name))
    with torch.device("meta"):
        sam = build_sam.sam_model_registry[preset]()
        model = maris.MARIS(maris.make_config(preset))
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in sam.state_dict().items()}
    plan = maris.sam_load_plan(model, state, hub_name, names=names)
    assert plan["initialised"] == DECODER_NOT_IN_SAM
    assert {"image_encoder." + k for k in sam.image_encoder.state_dict()} <= set(plan["sources"])


def test_clip_name_map_covers_the_real_checkpoint():
    """Renamed by CLIP_HF_NAMES, openai/clip-vit-base-patch16's text keys pass the strict checks of
    the vit_b preset's OpenAI-named text tower, and its vision keys are left out."""
    with torch.device("meta"):
        model = maris.MARIS(maris.make_config("vit_b"))
    text = maris.clip_text_state(model, meta_manifest("openai/clip-vit-base-patch16"), "clip-vit-base-patch16")
    assert set(text) == set(model.text_encoder.state_dict())
    assert text["transformer.resblocks.11.attn.in_proj_weight"].shape == (3 * 512, 512)


def test_hf_bad_files_give_clear_errors(tmp_path):
    """Truncated, partial, mis-sized or incompletely downloaded Hugging Face files raise one line
    naming the file and the first bad key as the file names it, with its shapes."""
    def save(state, name):
        safetensors.torch.save_file(state, tmp_path / name)
        return tmp_path / name

    (tmp_path / "cut.safetensors").write_bytes((HF / "sam-tiny" / "model.safetensors").read_bytes()[:20000])
    with pytest.raises(ValueError, match="cut.safetensors is not a readable weight file"):
        maris.load_sam_checkpoint(hf_tiny(), tmp_path / "cut.safetensors")
    extra = save({**hf_state("sam-tiny"), "vision_encoder.extra_norm.weight": torch.zeros(2)}, "extra.safetensors")
    with pytest.raises(KeyError, match=r"extra.safetensors: unexpected key 'vision_encoder\.extra_norm\.weight'"
                                       r".*\(2,\)"):
        maris.load_sam_checkpoint(hf_tiny(), extra)
    # A model for another image size: the size mismatch is named first (it shows the config is off).
    with pytest.raises(ValueError, match=r"'vision_encoder\.pos_embed' \('image_encoder\.pos_embed' in the released "
                                         r"names\) has shape \(1, 4, 4, 16\), the model expects \(1, 2, 2, 16\) "
                                         r"\(\d+ problems in all\)"):
        maris.load_sam_checkpoint(hf_tiny(image_size=32), extra)
    sd = hf_state("sam-tiny")
    del sd["vision_encoder.neck.conv1.weight"]
    with pytest.raises(KeyError, match=r"partial.safetensors: missing key 'vision_encoder\.neck\.conv1\.weight' "
                                       r"\('image_encoder\.neck\.0\.weight' .*\(16, 16, 1, 1\)"):
        maris.load_sam_checkpoint(hf_tiny(), save(sd, "partial.safetensors"))

    sd = hf_state("clip-text-tiny")
    del sd["text_model.encoder.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(KeyError, match=r"no_k.safetensors: missing key 'text_model\.encoder\.layers\.1\.self_attn"
                                       r"\.k_proj\.weight'"):
        maris.load_clip_text(hf_tiny(), save(sd, "no_k.safetensors"))
    sd = {k[len("text_model."):]: v for k, v in hf_state("clip-text-tiny").items() if k.startswith("text_model.")}
    with pytest.raises(KeyError, match=r"bare.safetensors: missing key 'text_projection\.weight' \('text_projection'"):
        maris.load_clip_text(hf_tiny(), save(sd, "bare.safetensors"))  # transformers 5's CLIPTextModel layout
    sd = {**hf_state("clip-text-tiny"), "text_model.encoder.layers.0.self_attn.extra": torch.zeros(3)}
    with pytest.raises(KeyError, match=r"unexpected key 'text_model\.encoder\.layers\.0\.self_attn\.extra'"):
        maris.load_clip_text(hf_tiny(), save(sd, "extra_text.safetensors"))
    sd = {**hf_state("clip-text-tiny"), "text_model.final_layer_norm.weight": torch.ones(5)}
    with pytest.raises(ValueError, match=r"'text_model\.final_layer_norm\.weight' \('ln_final\.weight' in the "
                                         r"released names\) has shape \(5,\), the model expects \(32,\)"):
        maris.load_clip_text(hf_tiny(), save(sd, "ln.safetensors"))

    folder = write_layout(hf_state("clip-text-tiny"), tmp_path / "shards", "safetensors-shards")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["text_model.lost.weight"] = "model-00001-of-00002.safetensors"  # in no shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"index.json: key 'text_model.lost.weight' is not in its shard "
                                       r"model-00001-of-00002.safetensors"):
        maris.load_clip_text(hf_tiny(), folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard model-00002-of-00002.safetensors is absent"):
        maris.load_clip_text(hf_tiny(), folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty holds none of model.safetensors"):
        maris.load_clip_text(hf_tiny(), tmp_path / "empty")


def test_failed_load_changes_no_weight(tmp_path):
    """A file failing the strict checks at its last key leaves every weight of the model as it was."""
    model = hf_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clip = {**hf_state("clip-text-tiny"), "text_model.final_layer_norm.bias": torch.zeros(5)}
    safetensors.torch.save_file(clip, tmp_path / "clip.safetensors")
    with pytest.raises(ValueError, match="final_layer_norm"):
        maris.load_clip_text(model, tmp_path / "clip.safetensors")
    sam = {**hf_state("sam-tiny"), "vision_encoder.neck.layer_norm2.bias": torch.zeros(5)}
    safetensors.torch.save_file(sam, tmp_path / "sam.safetensors")
    with pytest.raises(ValueError, match="neck.layer_norm2"):
        maris.load_sam_checkpoint(model, tmp_path / "sam.safetensors")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- command line and overfitting ----------------------------------------------------------

def test_main_prints_parameters_and_shapes(capsys):
    """`python maris.py --preset tiny` prints the parameter table and the stage shapes."""
    maris.main(["--preset", "tiny", "--image-size", "64", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert "feature_enhancement" in out and "frozen" in out
    assert "mask_decoder (logits, query token)" in out and "(2, 1, 16, 16)" in out


def test_tiny_model_overfits_one_batch():
    """A tiny model fits one batch of 4 rectangle masks to IoU > 0.9 within 300 CPU steps."""
    torch.manual_seed(0)
    S = 64
    model = fresh_tiny(S).train()
    ids, wm = make_text([5, 8, 4, 3], 8, seed=10)
    images = make_images(4, S, seed=11)
    masks = torch.zeros(4, S, S)
    for i, (y0, y1, x0, x1) in enumerate([(8, 40, 8, 30), (20, 60, 30, 60), (0, 30, 20, 50), (32, 64, 0, 64)]):
        masks[i, y0:y1, x0:x1] = 1
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    best = 0.0
    for step in range(300):
        opt.zero_grad()
        maris.segmentation_loss(model(images, ids, wm), masks, None, model.cfg)["loss"].backward()
        opt.step()
        if step % 10 == 9:
            pred = model.predict(images, ids, wm)[:, 0] > 0.5
            inter = (pred & (masks > 0)).sum((1, 2)).float()
            union = (pred | (masks > 0)).sum((1, 2)).float()
            best = (inter / union).min().item()
            if best > 0.9:
                break
    assert best > 0.9, f"worst IoU {best:.3f} after {step + 1} steps"


# --- MagNet add-ons: Mask Grounding, alignment loss, TrainStep -----------------------------------

def seg_batch(B: int, S: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks (B, S, S) with one rectangle each, valid (B, S, S) with a padded bottom/right)."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(B, S, S)
    valid = torch.zeros(B, S, S, dtype=torch.bool)
    for i in range(B):
        y0, x0 = torch.randint(0, S // 2, (2,), generator=g).tolist()
        masks[i, y0:y0 + S // 3, x0:x0 + S // 3] = 1
        valid[i, :S - 4 * i, :S - 2 * i] = True
    return masks * valid, valid


@given(st.lists(st.integers(1, 12), min_size=1, max_size=5), st.integers(12, 14),
       st.floats(0.01, 1.0), st.integers(0, 2**16))
def test_choose_masked_words_only_real_words_and_at_least_one(lengths, L, ratio, seed):
    """Masked positions are never SOT, EOT or padding; each sentence with a word gets
    max(1, round(ratio * words)) of them, a sentence without words none."""
    word_mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]  # (B, L)
    chosen = maris.choose_masked_words(word_mask, ratio, torch.Generator().manual_seed(seed))
    assert chosen.shape == word_mask.shape and chosen.dtype == torch.bool
    for row, n in zip(chosen, lengths):
        picked = row.nonzero().flatten().tolist()
        assert all(1 <= p <= n - 2 for p in picked)  # between SOT and EOT
        words = max(n - 2, 0)
        assert len(picked) == (max(1, round(ratio * words)) if words else 0)


def test_choose_masked_words_rejects_bad_ratio():
    """A mask ratio outside (0, 1] is refused with the value named."""
    with pytest.raises(ValueError, match="mask_ratio.*1.5"):
        maris.choose_masked_words(torch.ones(1, 4, dtype=torch.bool), 1.5)


def magnet_setup(S: int = 32, **overrides):
    """A private tiny model, its heads, and one batch (the model shares image rows)."""
    torch.manual_seed(0)
    model = fresh_tiny(S, **overrides).train()
    heads = maris.build_heads(model.cfg, model).train()
    ids, wm = make_text([6, 8, 5], 8, seed=12)
    masks, valid = seg_batch(3, S, seed=13)
    batch = dict(ids=ids, word_mask=wm, masks=masks, valid=valid, images=make_images(2, S, seed=14),
                 image_index=torch.tensor([0, 1, 1]))
    return model, heads, batch


def test_mask_grounding_loss_finite_and_falls_when_overfitting():
    """The Mask Grounding loss starts near log(vocab), is finite and falls on one batch."""
    model, heads, batch = magnet_setup(mask_grounding_weight=1.0)
    assert heads.mask_grounding is not None and heads.alignment is None
    params = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    history = []
    for _ in range(40):
        out = maris.TrainStep(model, heads)(**batch, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out["mask_grounding"])
        history.append(out["mask_grounding"].item())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert abs(history[0] - torch.log(torch.tensor(49408.0)).item()) < 1.5
    assert history[-1] < 0.5 * history[0], history
    assert heads.mask_grounding.mask_embedding.grad.abs().sum() > 0  # through the frozen tower


def test_mask_grounding_runs_without_the_mask_and_then_ignores_it():
    """With mask_grounding_use_mask False the head runs and its loss does not read the masks;
    with it on, the ground-truth mask changes the loss."""
    for use_mask in (False, True):
        model, heads, batch = magnet_setup(mask_grounding_weight=1.0, mask_grounding_use_mask=use_mask)
        assert (heads.mask_grounding.cue_embedding is None) == (not use_mask)
        other = dict(batch, masks=batch["masks"].flip(-1) * batch["valid"])
        with torch.no_grad():
            a = maris.TrainStep(model, heads)(**batch, generator=torch.Generator().manual_seed(1))
            b = maris.TrainStep(model, heads)(**other, generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(a["mask_grounding"])
        assert torch.equal(a["mask_grounding"], b["mask_grounding"]) == (not use_mask)


def test_mask_grounding_untied_and_unfused_variants_run():
    """The untied classifier and the main-pass F_v' variant give finite losses with gradients."""
    model, heads, batch = magnet_setup(mask_grounding_weight=1.0, mask_grounding_tied_output=False,
                                       mask_grounding_fuse_masked=False)
    assert heads.mask_grounding.output_proj.out_features == 49408
    out = maris.TrainStep(model, heads)(**batch)
    out["loss"].backward()
    assert torch.isfinite(out["mask_grounding"]) and heads.mask_grounding.output_proj.weight.grad is not None


def alignment_inputs(seed: int = 0):
    """Pixel features on a 4 x 4 grid where foreground cells share one direction, background
    cells another; masks/valid at S = 32 (8 px cells) with the last column of cells padded."""
    g = torch.Generator().manual_seed(seed)
    B, H, P, S = 2, 4, 16, 32
    fg_dir, bg_dir = torch.randn(P, generator=g), torch.randn(P, generator=g)
    masks = torch.zeros(B, S, S)
    masks[:, 8:24, 0:16] = 1  # cells rows 1-2, cols 0-1
    valid = torch.ones(B, S, S, dtype=torch.bool)
    valid[:, :, 24:] = False  # cells col 3 padded
    cell_fg = masks[:, ::8, ::8].flatten(1).bool()  # (B, N)
    pixels = torch.where(cell_fg[..., None], fg_dir, bg_dir) + 0.3 * torch.randn(B, H * H, P, generator=g)
    return pixels, fg_dir, bg_dir, masks, valid, (H, H)


def test_alignment_loss_lower_when_sentence_matches_foreground():
    """The alignment loss is lower for a sentence feature like the foreground pixels than for
    one like the background pixels."""
    pixels, fg_dir, bg_dir, masks, valid, size = alignment_inputs()
    good = maris.alignment_loss(fg_dir.expand(2, -1), pixels, masks, valid, size)
    bad = maris.alignment_loss(bg_dir.expand(2, -1), pixels, masks, valid, size)
    assert torch.isfinite(good) and good < bad


@given(st.integers(0, 2**16))
def test_alignment_loss_ignores_the_padded_area(seed):
    """Changing the pixel features and the mask inside the padding leaves the loss unchanged."""
    pixels, fg_dir, _, masks, valid, size = alignment_inputs(seed % 7)
    g = torch.Generator().manual_seed(seed)
    base = maris.alignment_loss(fg_dir.expand(2, -1), pixels, masks, valid, size)
    padded_cells = torch.zeros(4, 4, dtype=torch.bool)
    padded_cells[:, 3] = True
    noisy = pixels.clone()
    noisy[:, padded_cells.flatten()] = torch.randn(2, 4, pixels.shape[-1], generator=g) * 10
    other_masks = torch.where(valid, masks, (torch.rand(masks.shape, generator=g) > 0.5).float())
    changed = maris.alignment_loss(fg_dir.expand(2, -1), noisy, other_masks, valid, size)
    assert torch.equal(base, changed)


def test_alignment_head_trains_through_train_step():
    """With alignment on, TrainStep adds the weighted alignment loss and the projections
    get gradients; the Mask Grounding head is absent."""
    model, heads, batch = magnet_setup(alignment_weight=0.5)
    assert heads.mask_grounding is None and heads.alignment is not None
    out = maris.TrainStep(model, heads)(**batch)
    assert out["mask_grounding"] == 0 and out["alignment"] > 0
    torch.testing.assert_close(out["loss"], 20 * out["focal"] + out["dice"] + 0.5 * out["alignment"])
    out["loss"].backward()
    assert heads.alignment.pixel_proj.weight.grad.abs().sum() > 0


def test_train_step_all_off_is_exactly_maris():
    """With both weights 0, TrainStep's loss and gradients are bit-identical to
    segmentation_loss(model(images, ids, word_mask)), and the add-on entries are 0."""
    model, heads, batch = magnet_setup()
    assert not list(heads.parameters())
    grads = []
    for use_train_step in (True, False):
        model.zero_grad()
        if use_train_step:
            out = maris.TrainStep(model, heads)(**batch)
        else:
            logits = model(batch["images"], batch["ids"], batch["word_mask"], image_index=batch["image_index"])
            out = maris.segmentation_loss(logits, batch["masks"], batch["valid"], model.cfg)
        out["loss"].backward()
        grads.append((out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None}))
        if use_train_step:
            assert out["mask_grounding"] == 0 and out["alignment"] == 0
    (loss_a, grad_a), (loss_b, grad_b) = grads
    assert torch.equal(loss_a, loss_b)
    assert grad_a.keys() == grad_b.keys() and all(torch.equal(grad_a[k], grad_b[k]) for k in grad_a)


def test_train_step_refuses_missing_heads():
    """A non-zero weight without the matching head raises an error naming the head."""
    model, _, _ = magnet_setup(alignment_weight=1.0)
    with pytest.raises(ValueError, match="heads.alignment"):
        maris.TrainStep(model, None)


def test_magnet_heads_are_not_in_the_model_checkpoint():
    """MagNetHeads is not a sub-module of MARIS: trainable_state_dict and state_dict lack it."""
    model, heads, _ = magnet_setup(mask_grounding_weight=1.0, alignment_weight=1.0)
    head_params = {id(p) for p in heads.parameters()}
    assert head_params and not head_params & {id(p) for p in model.parameters()}
    keys = set(model.trainable_state_dict()) | set(model.state_dict())
    assert not any("mask_grounding" in k or "alignment" in k or "mask_embedding" in k for k in keys)
    assert set(heads.state_dict()) >= {"mask_grounding.mask_embedding", "alignment.pixel_proj.weight"}


# --- RISAM adapters ------------------------------------------------------------------------------

def test_adapters_leave_encoder_output_bit_identical_at_init():
    """At initialisation the encoder output with adapters equals the output without them."""
    plain, adapted = fresh_tiny(64), fresh_tiny(64, adapters=True)
    assert len(adapted.image_adapters) == adapted.cfg.sam_depth
    images = make_images(2, 64, seed=15)
    with torch.no_grad():
        a, b = plain.encode_image(images), adapted.encode_image(images)
    assert torch.equal(a["neck"], b["neck"]) and all(torch.equal(x, y) for x, y in zip(a["taps"], b["taps"]))


def test_adapter_hooks_add_after_attention_and_mlp_in_windowed_blocks():
    """A hooked block (windowed, padded windows) computes x + a + A_attn(a), then
    + m + A_mlp(m), with the attention adapter applied to the un-partitioned output."""
    model = fresh_tiny(64, adapters=True, sam_window_size=3)  # 4 x 4 grid -> padded 3 x 3 windows
    torch.manual_seed(0)
    for p in model.image_adapters.parameters():
        nn.init.normal_(p, std=0.1)
    block, pair = model.image_encoder.blocks[0], model.image_adapters[0]
    assert block.window_size == 3
    ie = sam_modeling.image_encoder
    x = torch.randn(2, 4, 4, model.cfg.sam_embed_dim)
    with torch.no_grad():
        windows, pad = ie.window_partition(block.norm1(x), 3)
        a = ie.window_unpartition(block.attn.forward(windows), 3, pad, (4, 4))  # .forward: no hooks
        y = x + a + pair["attn"](a)
        m = block.mlp.forward(block.norm2(y))
        expected = y + m + pair["mlp"](m)
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_one_step_changes_only_adapters_and_new_modules():
    """After one optimizer step with adapters on, SAM's and CLIP's own weights are
    bit-identical, the adapters' up-projections changed, and the encoder recorded gradients."""
    model = fresh_tiny(32, adapters=True).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("image_adapters.")}
    assert not any(n.startswith(("image_encoder.", "text_encoder.")) for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids, wm = make_text([3, 5], 6)
    masks, valid = seg_batch(2, 32)
    maris.segmentation_loss(model(make_images(2, 32), ids, wm), masks, valid, model.cfg)["loss"].backward()
    opt.step()
    after = model.state_dict()
    for k, v in before.items():
        same = torch.equal(after[k], v)
        if k.startswith(("image_encoder.", "text_encoder.", "pe_layer.")):
            assert same, k
        elif k.startswith("image_adapters.") and ".up." in k:
            assert not same, k


def test_adapters_keep_sam_checkpoints_loading_strictly(sam_checkpoint):
    """An official-layout SAM checkpoint loads strictly into a model with adapters, which then
    reproduces SAM's image embedding; adapter keys live outside image_encoder.*."""
    cfg, sam, path = sam_checkpoint
    model = fresh_tiny(64, adapters=True)
    report = maris.load_sam_checkpoint(model, path)
    assert {"image_encoder." + k for k in sam.image_encoder.state_dict()} <= set(report["loaded"])
    assert {k for k in model.state_dict() if k.startswith("image_encoder.")} == \
        {"image_encoder." + k for k in sam.image_encoder.state_dict()}
    images = make_images(2, 64, seed=16)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images)["neck"], sam.image_encoder(images),
                                   atol=1e-6, rtol=1e-5)


def test_adapters_survive_deepcopy_and_trainable_state_dict():
    """A deep copy's hooks call the copy's adapters; trainable_state_dict holds the adapters
    and loads them back strictly into another model."""
    import copy
    model = fresh_tiny(32, adapters=True)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.image_adapters.parameters():
            p.normal_(std=0.1)
    images = make_images(1, 32, seed=17)
    with torch.no_grad():
        base = model.encode_image(images)["neck"]
        changed = twin.encode_image(images)["neck"]
        assert torch.equal(model.encode_image(images)["neck"], base)  # original unaffected
        assert not torch.equal(changed, base)
        sd = twin.trainable_state_dict()
        assert any(k.startswith("image_adapters.") for k in sd)
        model.load_trainable_state_dict(sd)
        assert torch.equal(model.encode_image(images)["neck"], changed)


def test_main_shows_adapter_parameters(capsys):
    """`python maris.py --adapters` lists the adapters' extra trainable parameters."""
    maris.main(["--preset", "tiny", "--image-size", "32", "--adapters", "--no-forward"])
    out = capsys.readouterr().out
    assert "image_adapters" in out and "extra trainable parameters" in out


def test_build_heads_is_seeded_by_the_config_not_the_global_rng():
    """build_heads gives the same heads whatever the global RNG state, and leaves that state as it was."""
    cfg = maris.make_config("tiny", mask_grounding_weight=0.1, alignment_weight=0.1)
    torch.manual_seed(1)
    a = maris.build_heads(cfg)
    after = torch.rand(1)
    torch.manual_seed(1)
    torch.rand(5)  # another global state
    b = maris.build_heads(cfg)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    torch.manual_seed(1)
    maris.build_heads(cfg)
    torch.testing.assert_close(torch.rand(1), after, rtol=0, atol=0)


def test_sincos_position_table_values():
    """The table holds sin/cos of row * w_k in its first half and of column * w_k in its second (hand-computed)."""
    t = maris.sincos_position_table(2, 3, 8)  # dim / 4 = 2 frequencies: 1 and 10000 ** -0.5
    w = torch.tensor([1.0, 0.01])
    torch.testing.assert_close(t[1, 2], torch.cat([(1 * w).sin(), (1 * w).cos(), (2 * w).sin(), (2 * w).cos()]))
    torch.testing.assert_close(t[0, 0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    with pytest.raises(ValueError, match="dim 6"):
        maris.sincos_position_table(2, 2, 6)


def test_sincos_pos_embed_changes_only_the_position_embedding():
    """sam_pos_embed_init="sincos" fills the encoder's absolute position embedding with the table and leaves
    every other weight of the seeded build as it is (the default "zeros" keeps SAM's zero start)."""
    zeros, sincos = fresh_tiny(64), fresh_tiny(64, sam_pos_embed_init="sincos")
    a, b = zeros.state_dict(), sincos.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == ["image_encoder.pos_embed"]
    assert not a["image_encoder.pos_embed"].any()
    torch.testing.assert_close(b["image_encoder.pos_embed"][0], maris.sincos_position_table(4, 4, 128))
    with pytest.raises(ValueError, match="sam_pos_embed_init must be"):
        fresh_tiny(64, sam_pos_embed_init="learned")


def test_random_encoder_features_carry_position_only_with_sincos():
    """On a uniform image a random encoder with SAM's zero position embedding gives every patch the same tap
    features (nothing tells positions apart); with the sine-cosine table the patches differ."""
    image = torch.full((1, 3, 64, 64), 0.3)
    for init, differ in (("zeros", False), ("sincos", True)):
        with torch.no_grad():
            taps = fresh_tiny(64, sam_pos_embed_init=init).encode_image(image)["taps"]
        for tap in taps:  # (1, H, W, D)
            spread = (tap - tap[:, :1, :1]).abs().max().item()
            assert (spread > 1e-2) == differ, (init, spread)


def test_visual_pe_is_fp32_exact_under_bf16_autocast():
    """SAM's positional encoding P_v is the same under bf16 autocast as in fp32 (sin/cos of a bf16 matmul is not)."""
    model = maris.MARIS(maris.make_config("tiny"))
    plain = model.visual_pe((8, 8))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        auto = model.visual_pe((8, 8))
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=0, atol=0)


# --- No-target head (ReLA style) and the no-target loss ------------------------------------------

def nt_setup(S: int = 32, **overrides):
    """A private tiny model (training mode) and one batch whose third sentence has no target."""
    model = fresh_tiny(S, **overrides).train()
    ids, wm = make_text([6, 8, 5], 8, seed=21)
    masks, valid = seg_batch(3, S, seed=22)
    masks[2] = 0  # the no-target sentence's all-empty ground truth
    batch = dict(ids=ids, word_mask=wm, masks=masks, valid=valid, images=make_images(2, S, seed=23),
                 image_index=torch.tensor([0, 1, 1]))
    return model, batch, torch.tensor([False, False, True])


def test_no_target_off_builds_nothing_and_changes_nothing():
    """With no_target_weight 0 there is no head, no logit and no extra weight, and passing labels
    changes neither the loss nor any gradient (off is MARIS exactly)."""
    model, batch, labels = nt_setup()
    assert model.no_target_head is None and model.cfg.no_target_weight == 0.0
    assert not any("no_target" in k for k in model.state_dict())
    with torch.no_grad():
        out = model.forward_features(batch["ids"], batch["word_mask"], images=batch["images"],
                                     image_index=batch["image_index"])
    assert out["no_target_logit"] is None and out["query"].shape == (3, model.cfg.embed_dim)
    results = []
    for extra in ({}, {"no_target": labels}):
        model.zero_grad()
        loss = maris.TrainStep(model)(**batch, **extra)
        loss["loss"].backward()
        assert loss["no_target"] == 0
        results.append((loss["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                 if p.grad is not None}))
    (a, ga), (b, gb) = results
    assert torch.equal(a, b) and ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)


def test_no_target_head_on_leaves_maris_weights_and_logits_unchanged():
    """The head is built last: every other initial weight and the mask logits equal the model without
    it; the head adds only no_target_head.* to the trainable state; forward still returns logits."""
    plain, (with_head, batch, _) = nt_setup()[0], nt_setup(no_target_weight=1.0)
    extra = set(with_head.trainable_state_dict()) - set(plain.trainable_state_dict())
    assert extra and all(k.startswith("no_target_head.") for k in extra)
    assert all(torch.equal(v, with_head.state_dict()[k]) for k, v in plain.state_dict().items())
    plain.eval()
    with_head.eval()
    with torch.no_grad():
        args = (batch["images"], batch["ids"], batch["word_mask"])
        logits = with_head(*args, image_index=batch["image_index"])
        out = with_head.forward_features(batch["ids"], batch["word_mask"], images=batch["images"],
                                         image_index=batch["image_index"])
        assert torch.equal(logits, plain(*args, image_index=batch["image_index"]))
    assert torch.is_tensor(logits) and out["no_target_logit"].shape == (3,)
    expected = with_head.no_target_head(out["query"])[:, 0]  # the MLP on the query token's final state
    assert torch.equal(out["no_target_logit"], expected)


def test_focal_and_dice_on_an_all_empty_target_are_finite():
    """An all-empty ground truth (every sentence no-target) gives a finite loss and finite gradients."""
    model, batch, _ = nt_setup()
    batch["masks"] = torch.zeros_like(batch["masks"])
    out = maris.TrainStep(model)(**batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["focal"]) and torch.isfinite(out["dice"])
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_no_target_loss_is_binary_cross_entropy():
    """no_target_loss equals -[y log s + (1 - y) log(1 - s)] averaged, s = sigmoid(logit), by hand."""
    logit = torch.tensor([0.0, 2.0, -1.0])
    label = torch.tensor([True, False, False])
    s = torch.sigmoid(logit)
    by_hand = -(torch.log(s[0]) + torch.log(1 - s[1]) + torch.log(1 - s[2])) / 3
    torch.testing.assert_close(maris.no_target_loss(logit, label), by_hand)
    assert maris.no_target_loss(torch.zeros(2), torch.tensor([True, False])).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="3 logits but 2"):
        maris.no_target_loss(logit, label[:2])


def test_no_target_bce_trains_the_head():
    """With no_target_weight > 0 the weighted BCE is part of the loss, reaches the head, and a few steps
    make the head separate the no-target sentence from the others."""
    torch.manual_seed(0)
    model, batch, labels = nt_setup(no_target_weight=0.5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for step in range(30):
        out = maris.TrainStep(model)(**batch, no_target=labels)
        if step == 0:
            torch.testing.assert_close(out["loss"], 20 * out["focal"] + out["dice"] + 0.5 * out["no_target"])
        history.append(out["no_target"].item())
        opt.zero_grad()
        out["loss"].backward()
        if step == 0:
            assert model.no_target_head.layers[0].weight.grad.abs().sum() > 0
        opt.step()
    assert history[-1] < 0.3 * history[0], history
    model.eval()
    with torch.no_grad():
        logit = model.forward_features(batch["ids"], batch["word_mask"], images=batch["images"],
                                       image_index=batch["image_index"])["no_target_logit"]
    assert ((torch.sigmoid(logit) > 0.5) == labels).all()


def test_no_target_weight_errors():
    """A negative weight is refused at build; a positive weight without labels is refused in the loss."""
    with pytest.raises(ValueError, match="no_target_weight"):
        fresh_tiny(32, no_target_weight=-1.0)
    model, batch, _ = nt_setup(no_target_weight=1.0)
    with pytest.raises(ValueError, match="no_target labels"):
        maris.TrainStep(model)(**batch)
    cfg = maris.config_from_dict(maris.config_to_dict(model.cfg))
    assert cfg.no_target_weight == 1.0

# --- SAM's attention through scaled_dot_product_attention ---------------------------------------

def randomised_sam_encoder(preset: str, S: int, *, window_size: int | None = None, seed: int = 0) -> nn.Module:
    """A SAM image encoder of a preset at side S, every weight perturbed: segment-anything starts
    pos_embed and the relative-position tables at zero, which would hide a wrong bias."""
    cfg = maris.make_config(preset, image_size=S)
    torch.manual_seed(seed)
    encoder = maris.build_sam_image_encoder(
        image_size=S, patch_size=cfg.patch_size, embed_dim=cfg.sam_embed_dim, depth=cfg.sam_depth,
        num_heads=cfg.sam_num_heads, global_attn_indexes=cfg.sam_global_attn_indexes,
        window_size=window_size or cfg.sam_window_size, out_chans=cfg.embed_dim).eval()
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "rel_pos" in name else 0.02))
    return encoder


def encoder_outputs(encoder: nn.Module, images: torch.Tensor, taps: tuple[int, ...]) -> list[torch.Tensor]:
    """[neck, *taps] of `maris.sam_encoder_taps`, without autograd."""
    with torch.no_grad():
        neck, tapped = maris.sam_encoder_taps(encoder, images, taps)
    return [neck, *tapped]


def test_sam_sdpa_attention_equals_stock_tiny_with_padded_windows():
    """Tiny preset, 5 x 5 grid in 4 x 4 windows (padded) and global blocks: neck and every block's
    output with "sdpa" equal segment-anything's forward within 1e-5 in fp32."""
    encoder = randomised_sam_encoder("tiny", 80, window_size=4)
    assert [b.window_size for b in encoder.blocks] == [4, 0, 4, 0]
    taps = tuple(range(len(encoder.blocks)))
    images = make_images(2, 80, seed=20)
    stock = encoder_outputs(encoder, images, taps)
    maris.set_sam_attention(encoder, "sdpa")
    assert all(type(b.attn) is maris.SDPASamAttention for b in encoder.blocks)
    sdpa = encoder_outputs(encoder, images, taps)
    for a, b in zip(stock, sdpa):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the perturbed tables move the outputs far beyond the tolerance
        for block in encoder.blocks:
            block.attn.rel_pos_h.zero_()
            block.attn.rel_pos_w.zero_()
    assert (encoder_outputs(encoder, images, taps)[0] - stock[0]).abs().max() > 1e-2


def test_sam_sdpa_attention_equals_stock_vit_b_small_image():
    """vit_b at S = 256 (16 x 16 grid: windows of 14 padded to 28, four global blocks): neck and the
    Feature Enhancement taps with "sdpa" equal segment-anything's forward within 1e-5 in fp32."""
    encoder = randomised_sam_encoder("vit_b", 256)
    taps = maris.make_config("vit_b").fe_taps
    images = make_images(1, 256, seed=21)
    stock = encoder_outputs(encoder, images, taps)
    maris.set_sam_attention(encoder, "sdpa")
    sdpa = encoder_outputs(encoder, images, taps)
    for a, b in zip(stock, sdpa):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_sam_sdpa_attention_adapter_gradients_equal_stock():
    """With RISAM's adapters (forward hooks on blocks[i].attn) and padded windows, "sdpa" gives the
    same encoder outputs and the same adapter gradients as the stock attention."""
    model = fresh_tiny(64, adapters=True, sam_window_size=3)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in [*model.image_encoder.named_parameters(), *model.image_adapters.named_parameters()]:
            p.add_(torch.randn_like(p) * (0.3 if "rel_pos" in name else 0.05))
    images = make_images(2, 64, seed=22)
    results = {}
    for kind in ("stock", "sdpa"):
        maris.set_sam_attention(model.image_encoder, kind)
        model.zero_grad(set_to_none=True)
        out = model.encode_image(images)
        g = torch.Generator().manual_seed(3)  # a fixed random direction for every output
        loss = sum((t * torch.randn(t.shape, generator=g)).sum() for t in [out["neck"], *out["taps"]])
        loss.backward()
        results[kind] = (out["neck"].detach(), {n: p.grad.clone() for n, p in model.image_adapters.named_parameters()})
    torch.testing.assert_close(results["sdpa"][0], results["stock"][0], atol=1e-5, rtol=1e-5)
    grads_stock, grads_sdpa = results["stock"][1], results["sdpa"][1]
    assert set(grads_sdpa) == set(grads_stock)
    for name, grad in grads_stock.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads_sdpa[name], grad, atol=1e-4, rtol=1e-4, msg=name)


def test_set_sam_attention_is_reversible_and_keeps_keys_copies_and_pickles():
    """Switching to "sdpa" keeps the state-dict keys; switching back restores segment-anything's class
    and bit-identical outputs; deepcopy and pickling keep the switched class."""
    import copy
    import pickle
    encoder = randomised_sam_encoder("tiny", 64, window_size=3)
    images = make_images(1, 64, seed=23)
    keys = list(encoder.state_dict())
    before = encoder_outputs(encoder, images, (1,))
    maris.set_sam_attention(encoder, "sdpa")
    assert list(encoder.state_dict()) == keys and maris.get_sam_attention(encoder) == "sdpa"
    sdpa = encoder_outputs(encoder, images, (1,))
    for twin in (copy.deepcopy(encoder), pickle.loads(pickle.dumps(encoder))):
        assert all(type(b.attn) is maris.SDPASamAttention for b in twin.blocks)
        assert all(torch.equal(a, b) for a, b in zip(encoder_outputs(twin, images, (1,)), sdpa))
    maris.set_sam_attention(encoder, "stock")
    assert all(type(b.attn) is maris.SamAttention for b in encoder.blocks)
    assert maris.get_sam_attention(encoder) == "stock"
    assert all(torch.equal(a, b) for a, b in zip(encoder_outputs(encoder, images, (1,)), before))


def test_set_sam_attention_rejects_unknown_kinds_and_modules():
    """An unknown kind raises ValueError naming it; a block whose attn is not SAM's raises TypeError before
    any block is switched, and get_sam_attention refuses such an encoder."""
    encoder = randomised_sam_encoder("tiny", 64)
    with pytest.raises(ValueError, match="'flash'"):
        maris.set_sam_attention(encoder, "flash")
    encoder.blocks[2].attn = nn.Identity()
    with pytest.raises(TypeError, match=r"blocks\[2\].attn is a Identity"):
        maris.set_sam_attention(encoder, "sdpa")
    assert type(encoder.blocks[0].attn) is maris.SamAttention  # nothing was switched
    with pytest.raises(ValueError, match="Identity"):
        maris.get_sam_attention(encoder)


def test_sam_attention_config_field_builds_round_trips_and_validates():
    """cfg.sam_attention selects the encoder's attention when MARIS is built, survives the checkpoint
    dict, defaults to "stock" for configs written before the field existed, and rejects unknown values."""
    cfg = maris.make_config("tiny", image_size=32, sam_attention="sdpa")
    assert maris.get_sam_attention(maris.MARIS(cfg).image_encoder) == "sdpa"
    assert maris.get_sam_attention(maris.MARIS(maris.make_config("tiny", image_size=32)).image_encoder) == "stock"
    d = maris.config_to_dict(cfg)
    assert d["sam_attention"] == "sdpa" and maris.config_from_dict(d) == cfg
    old = {k: v for k, v in d.items() if k != "sam_attention"}
    assert maris.config_from_dict(old).sam_attention == "stock"
    with pytest.raises(ValueError, match="sam_attention must be one of stock, sdpa; got 'SDPA'"):
        maris.make_config("tiny", sam_attention="SDPA")


def test_sdpa_model_loads_sam_checkpoint_strictly_and_reproduces_sam(sam_checkpoint):
    """An official-layout SAM checkpoint loads strictly into a model built with sam_attention="sdpa",
    whose image embedding then equals segment-anything's own encoder within 1e-5."""
    cfg, sam, path = sam_checkpoint
    model = fresh_tiny(64, sam_attention="sdpa")
    report = maris.load_sam_checkpoint(model, path)
    assert {"image_encoder." + k for k in sam.image_encoder.state_dict()} <= set(report["loaded"])
    images = make_images(2, 64, seed=24)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images)["neck"], sam.image_encoder(images),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_sam_sdpa_attention_matches_stock_in_a_fused_kernel():
    """On the GPU, "sdpa" runs in PyTorch's memory-efficient kernel (which takes the additive bias) and
    matches the stock attention: 1e-4 in fp32, 5e-2 (relative to the largest output) under bf16 autocast."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    encoder = randomised_sam_encoder("vit_b", 256).cuda()
    images = make_images(2, 256, seed=25).cuda()
    taps = maris.make_config("vit_b").fe_taps
    for bf16 in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            maris.set_sam_attention(encoder, "stock")
            stock = encoder_outputs(encoder, images, taps)
            maris.set_sam_attention(encoder, "sdpa")
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):  # raises if the kernel cannot take the inputs
                fused = encoder_outputs(encoder, images, taps)
        for a, b in zip(stock, fused):
            assert torch.isfinite(b).all()
            if bf16:
                assert (b.float() - a.float()).abs().max() <= 5e-2 * a.float().abs().max()
            else:
                torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


# --- The paper's ablations as switches ------------------------------------------------------------

# The tiny preset's sizes at S = 32, written out so that a later change of the preset does not move the
# recorded fingerprint below.
PINNED_TINY = dict(image_size=32, sam_embed_dim=128, sam_depth=4, sam_num_heads=4, sam_global_attn_indexes=(1, 3),
                   sam_window_size=4, fe_taps=(1, 2, 3), embed_dim=96, text_width=64, text_layers=2, text_heads=4,
                   text_embed_dim=64, maa_heads=4, decoder_heads=4, decoder_mlp_dim=384)
# Recorded by running `default_model_fingerprint()` (this file) on main at commit bdd35b9, before the
# fusion / query_token / feature_enhancement fields existed (torch 2.13.0, CPU, 1 and 2 threads).
RECORDED_DEFAULT = dict(
    keys=176, numel=936528,
    layout_sha256="9b75b887e18d78d011701637953de0de0cfc9000108a9168413132d5db70ba88",
    values_sha256="a3f8410ad0cad1ea0d0973ec89f49456f08541bccf348d2cff823a7d30954c7e",
    loss=2.412001609802246, focal=0.09252600371837616, dice=0.5614813566207886, grad_norm=1.9365712134673148,
    grad_probes=[0.524614167244513, -1.1593130913916712, 3.445705048397258])
# Single changes from MARIS, as bench/ablation.py trains them.
VARIANTS = {"vga_only": dict(fusion="vga_only"), "lga_only": dict(fusion="lga_only"),
            "separate": dict(fusion="separate"), "no_fusion": dict(fusion="none"),
            "learned_query": dict(query_token="learned"), "sentence_query": dict(query_token="sentence"),
            "no_fe": dict(feature_enhancement=False), "k1": dict(maa_depth=1), "k3": dict(maa_depth=3)}


def default_model_fingerprint(**overrides) -> dict:
    """The default model's trainable state (key/shape layout and value hashes) and one TrainStep's losses
    and gradients (norm and three seeded random projections, fp64), on fixed seeded inputs."""
    import hashlib
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = maris.build_maris(maris.MarisConfig(**PINNED_TINY, **overrides)).train()
    state = model.trainable_state_dict()
    layout = "\n".join(f"{k} {tuple(v.shape)}" for k, v in sorted(state.items()))
    values = hashlib.sha256()
    for k in sorted(state):
        values.update(state[k].detach().contiguous().numpy().tobytes())
    g = torch.Generator().manual_seed(0)
    B, S, L = 2, 32, 8
    images = torch.randn(B, 3, S, S, generator=g)
    ids = torch.randint(1, SOT - 1, (B, L), generator=g)
    lengths = torch.tensor([8, 5])
    word_mask = torch.arange(L)[None] < lengths[:, None]
    ids[:, 0], ids[torch.arange(B), lengths - 1] = SOT, EOT
    ids[~word_mask] = 0
    masks = (torch.rand(B, S, S, generator=g) > 0.6).float()
    valid = torch.ones(B, S, S, dtype=torch.bool)
    valid[1, 24:], valid[1, :, 20:] = False, False
    out = maris.TrainStep(model)(ids=ids, word_mask=word_mask, masks=masks * valid, valid=valid, images=images)
    out["loss"].backward()
    grads = torch.cat([p.grad.double().flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad])
    probes = torch.randn(3, grads.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return dict(keys=len(state), numel=sum(v.numel() for v in state.values()),
                layout_sha256=hashlib.sha256(layout.encode()).hexdigest(), values_sha256=values.hexdigest(),
                loss=out["loss"].item(), focal=out["focal"].item(), dice=out["dice"].item(),
                grad_norm=grads.norm().item(), grad_probes=(probes @ grads).tolist())


def test_default_model_is_unchanged_by_the_ablation_switches():
    """The default config's trainable keys, shapes and initial values are bit-identical to main's before
    the switches existed, and one step's losses and gradients equal the recorded ones (float rounding)."""
    now = default_model_fingerprint()
    for key in ("keys", "numel", "layout_sha256", "values_sha256"):
        assert now[key] == RECORDED_DEFAULT[key], key
    # The step is compared to 1e-5: the same code gives last-bit differences with another thread count.
    for key in ("loss", "focal", "dice", "grad_norm"):
        assert now[key] == pytest.approx(RECORDED_DEFAULT[key], rel=1e-5), key
    assert now["grad_probes"] == pytest.approx(RECORDED_DEFAULT["grad_probes"], abs=1e-5 * now["grad_norm"])


def test_switch_defaults_are_maris():
    """The switches' defaults are MARIS's choices: mutual fusion, the multi-modal query token, Feature
    Enhancement on, K = 2."""
    cfg = maris.MarisConfig()
    assert (cfg.fusion, cfg.query_token, cfg.feature_enhancement, cfg.maa_depth) == ("mutual", "multimodal", True, 2)


def ablation_step(S: int = 32, **overrides) -> tuple[maris.MARIS, dict]:
    """A private tiny model with `overrides` after one TrainStep backward on a seeded batch; its losses."""
    model = fresh_tiny(S, **overrides).train()
    ids, wm = make_text([6, 8, 3], 8, seed=31)
    masks, valid = seg_batch(3, S, seed=32)
    out = maris.TrainStep(model)(ids=ids, word_mask=wm, masks=masks, valid=valid, images=make_images(2, S, seed=33),
                                 image_index=torch.tensor([0, 1, 1]))
    out["loss"].backward()
    return model, out


@pytest.mark.parametrize("name", ["maris", *VARIANTS])
def test_every_variant_gives_every_trainable_parameter_a_gradient(name):
    """In one step every trainable parameter of every variant gets a gradient (DDP, which trains with
    find_unused_parameters off, stops on a parameter without one) and the loss is finite."""
    model, out = ablation_step(**VARIANTS.get(name, {}))
    assert torch.isfinite(out["loss"])
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_variants_build_only_the_modules_they_use():
    """Each variant's trainable state is MARIS's minus exactly the weights of the part it leaves out (plus,
    for "separate", Language-Guided Attention's own query and key projections)."""
    base = set(fresh_tiny(32).trainable_state_dict())

    def keys(**overrides):
        return set(fresh_tiny(32, **overrides).trainable_state_dict())

    lga_parts = ("v_proj_visual.", "out_proj_words.", "norm_words", "mlp_words.")
    vga_parts = ("v_proj_words.", "out_proj_visual.", "norm_visual", "mlp_visual.")
    in_blocks = lambda k, parts: k.startswith("maa_blocks.") and k.split(".", 2)[2].startswith(parts)  # noqa: E731
    assert base - keys(fusion="vga_only") == {k for k in base if in_blocks(k, lga_parts)} != set()
    assert base - keys(fusion="lga_only") == {k for k in base if in_blocks(k, vga_parts)} != set()
    extra = keys(fusion="separate") - base
    assert keys(fusion="separate") >= base and {k.split(".", 2)[2] for k in extra} == {
        "q_proj_words.weight", "q_proj_words.bias", "k_proj_visual.weight", "k_proj_visual.bias"}
    assert base - keys(fusion="none") == {k for k in base if k.startswith("maa_blocks.")} | {"word_pos"}
    assert base - keys(query_token="learned") == {"mask_decoder.sentence_proj.weight",
                                                  "mask_decoder.sentence_proj.bias"}
    assert base - keys(query_token="sentence") == {"mask_decoder.query_token.weight"}
    assert base - keys(feature_enhancement=False) == {k for k in base if k.startswith("feature_enhancement.")}
    assert {k.split(".")[1] for k in keys(maa_depth=3) if k.startswith("maa_blocks.")} == {"0", "1", "2"}
    assert all(keys(**v) <= base for n, v in VARIANTS.items() if n not in ("separate", "k3"))


def block_inputs(seed: int = 0, C: int = 16):
    """Random F_v (2, 6, C), F_l (2, 5, C), a word mask with padding, P_v (6, C), P_l (5, C)."""
    g = torch.Generator().manual_seed(seed)
    visual, words = torch.randn(2, 6, C, generator=g), torch.randn(2, 5, C, generator=g)
    word_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    return visual, words, word_mask, torch.randn(6, C, generator=g), torch.randn(5, C, generator=g)


def mutual_and(seed: int = 0, **switches) -> tuple[nn.Module, nn.Module]:
    """A Mutual-Aware Attention block with perturbed random weights and an ablated block holding the
    same weights wherever the two share a name (the ablated block's own extra weights stay random)."""
    torch.manual_seed(seed)
    mutual = maris.MutualAwareAttention(dim=16, num_heads=4).eval()
    with torch.no_grad():
        for p in mutual.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ablated = maris.MutualAwareAttention(dim=16, num_heads=4, **switches).eval()
    missing, unexpected = ablated.load_state_dict(mutual.state_dict(), strict=False)
    assert all(k.startswith(("q_proj_words", "k_proj_visual")) for k in missing)
    return mutual, ablated


@given(st.integers(0, 2**16))
def test_one_way_blocks_are_one_branch_of_mutual_attention(seed):
    """Vision-Guided Attention alone gives the mutual block's F_v' and passes F_l through unchanged;
    Language-Guided Attention alone gives its F_l' and passes F_v through unchanged."""
    inputs = block_inputs(seed)
    visual, words = inputs[:2]
    with torch.no_grad():
        mutual, vga_only = mutual_and(seed, language_guided=False)
        expected_visual, expected_words = mutual(*inputs)
        new_visual, new_words = vga_only(*inputs)
        assert torch.equal(new_words, words)
        torch.testing.assert_close(new_visual, expected_visual)
        _, lga_only = mutual_and(seed, vision_guided=False)
        new_visual, new_words = lga_only(*inputs)
        assert torch.equal(new_visual, visual)
        torch.testing.assert_close(new_words, expected_words)


@given(st.integers(0, 2**16))
def test_separate_affinities_are_two_independent_cross_attentions(seed):
    """With "separate" affinities, Language-Guided Attention weights are softmax_N of its own logits
    ((F_l + P_l) W_q,l)((F_v + P_v) W_k,v)^T / sqrt(d), written out here with einsum, not A^T;
    Vision-Guided Attention is the mutual block's; with W_q,l := W_k and W_k,v := W_q the block is mutual again."""
    inputs = block_inputs(seed)
    visual, words, word_mask, visual_pe, word_pe = inputs
    with torch.no_grad():
        mutual, separate = mutual_and(seed, shared_affinity=False)
        A, vga, lga = separate.attention_weights(*inputs)
        heads = lambda x: x.reshape(x.shape[0], x.shape[1], 4, 4).permute(0, 2, 1, 3)  # noqa: E731 (B, h, T, d)
        q = heads(separate.q_proj_words(words + word_pe))  # (B, h, L, d)
        k = heads(separate.k_proj_visual(visual + visual_pe))  # (B, h, N, d)
        torch.testing.assert_close(lga, (torch.einsum("bhld,bhnd->bhln", q, k) / 2.0).softmax(-1))
        assert not torch.allclose(lga, A.transpose(-2, -1).softmax(-1), atol=1e-3)
        torch.testing.assert_close(vga, mutual.attention_weights(*inputs)[1])
        torch.testing.assert_close(separate(*inputs)[0], mutual(*inputs)[0])
        separate.q_proj_words.load_state_dict(mutual.k_proj.state_dict())
        separate.k_proj_visual.load_state_dict(mutual.q_proj.state_dict())
        for got, expected in zip(separate(*inputs), mutual(*inputs)):
            torch.testing.assert_close(got, expected)


def test_no_fusion_feeds_the_decoder_f_v_and_f_l():
    """With fusion "none" the decoder reads F_v (the Feature Enhancement output) and F_l = word_proj(F_w)."""
    model = fresh_tiny(32, fusion="none").eval()
    ids, wm = make_text([6, 3], 8, seed=34)
    with torch.no_grad():
        out = model.forward_features(ids, wm, images=make_images(2, 32, seed=35))
        assert torch.equal(out["visual"], out["enhanced"])
        assert torch.equal(out["words"], model.word_proj(out["word_features"]))


def test_without_feature_enhancement_f_v_is_sams_neck():
    """With feature_enhancement False, F_v is SAM's neck output flattened, also with image rows shared."""
    model = fresh_tiny(32, feature_enhancement=False).eval()
    images = make_images(2, 32, seed=36)
    ids, wm = make_text([6, 3, 5], 8, seed=37)
    with torch.no_grad():
        out = model.forward_features(ids, wm, images=images, image_index=torch.tensor([1, 0, 1]))
        neck = model.encode_image(images)["neck"].flatten(2).transpose(1, 2)  # (B_img, N, C)
    assert model.feature_enhancement is None
    assert torch.equal(out["enhanced"], neck[torch.tensor([1, 0, 1])])


def decoder_pair(query_token: str) -> tuple[nn.Module, nn.Module]:
    """A multi-modal-query decoder with random weights and an ablated decoder sharing its weights."""
    torch.manual_seed(0)
    kw = dict(dim=16, sentence_dim=8, depth=1, num_heads=2, mlp_dim=32)
    full = maris.MutualAwareMaskDecoder(**kw).eval()
    ablated = maris.MutualAwareMaskDecoder(**kw, query_token=query_token).eval()
    ablated.load_state_dict({k: v for k, v in full.state_dict().items() if k in ablated.state_dict()})
    return full, ablated


def decoder_inputs(seed: int = 0):
    """Random F_v' (2, 9, 16) on a 3 x 3 grid, F_l' (2, 5, 16) with a padded row, F_s (2, 8), P_v (9, 16)."""
    g = torch.Generator().manual_seed(seed)
    words, wm = torch.randn(2, 5, 16, generator=g), torch.tensor([[True] * 5, [True, True, False, False, False]])
    visual, sentence = torch.randn(2, 9, 16, generator=g), torch.randn(2, 8, generator=g)
    return visual, words, wm, sentence, torch.randn(9, 16, generator=g)


def test_learned_query_token_ignores_the_sentence_and_equals_a_zero_sentence_projection():
    """The "learned" query token is the multi-modal token without its sentence term: the logits equal the
    full decoder's with sentence_proj zeroed, and do not change with F_s."""
    full, learned = decoder_pair("learned")
    visual, words, wm, sentence, pe = decoder_inputs()
    with torch.no_grad():
        nn.init.zeros_(full.sentence_proj.weight)
        nn.init.zeros_(full.sentence_proj.bias)
        logits, query = learned(visual, words, wm, sentence, pe, (3, 3))
        torch.testing.assert_close(logits, full(visual, words, wm, sentence, pe, (3, 3))[0])
        assert torch.equal(logits, learned(visual, words, wm, torch.randn(2, 8), pe, (3, 3))[0])
    assert logits.shape == (2, 1, 12, 12) and query.shape == (2, 16)


def test_sentence_query_token_equals_a_zero_learned_embedding():
    """The "sentence" query token is the multi-modal token without its learned embedding: the logits equal
    the full decoder's with query_token zeroed, and change with F_s."""
    full, sentence_only = decoder_pair("sentence")
    visual, words, wm, sentence, pe = decoder_inputs()
    with torch.no_grad():
        nn.init.zeros_(full.query_token.weight)
        logits = sentence_only(visual, words, wm, sentence, pe, (3, 3))[0]
        torch.testing.assert_close(logits, full(visual, words, wm, sentence, pe, (3, 3))[0])
        assert not torch.allclose(logits, sentence_only(visual, words, wm, -sentence, pe, (3, 3))[0])


def test_bad_switch_values_give_one_line_errors():
    """An unknown fusion or query token, a non-bool feature_enhancement or a negative K is refused at config
    time with a one-line error naming the field and the value."""
    for field, value in (("fusion", "both"), ("query_token", "text"), ("feature_enhancement", "off"),
                         ("maa_depth", -1), ("maa_depth", 1.5)):
        with pytest.raises(ValueError, match=f"^{field}.*{value!r}") as e:
            maris.make_config("tiny", **{field: value})
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="query_token"):
        maris.MutualAwareMaskDecoder(dim=16, sentence_dim=8, depth=1, num_heads=2, mlp_dim=32, query_token="x")
    with pytest.raises(ValueError, match="at least one"):
        maris.MutualAwareAttention(dim=16, num_heads=4, vision_guided=False, language_guided=False)


def test_checkpoints_without_the_switch_fields_load_as_maris():
    """A checkpoint whose config predates the switches (no fusion / query_token / feature_enhancement keys)
    rebuilds MARIS with the defaults and loads its trainable weights strictly."""
    trained = fresh_tiny(32, init_seed=3)
    config = maris.config_to_dict(trained.cfg)
    old = {k: v for k, v in config.items() if k not in ("fusion", "query_token", "feature_enhancement")}
    assert len(old) == len(config) - 3
    ckpt = {"config": old, "options": {}, "model": trained.trainable_state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = maris.model_from_checkpoint(ckpt)
    assert maris.config_to_dict(model.cfg) == config
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["model"].items())


def test_main_shape_trace_skips_modules_an_ablation_leaves_out():
    """trace_shapes runs for a model without Feature Enhancement and fusion blocks."""
    model = fresh_tiny(32, feature_enhancement=False, fusion="none").eval()
    ids, wm = make_text([4], 8)
    names = [name for name, _ in maris.trace_shapes(model, make_images(1, 32), ids, wm)]
    assert not any(n.startswith(("feature_enhancement", "maa_blocks")) for n in names)
    assert names[-1] == "predict (probabilities)"

# --- Loading a trained model: checkpoint files, encoder hashes, maris.load, one-line errors ------------

def write_trained_checkpoint(path, model: maris.MARIS, **extra) -> dict:
    """A minimal train.py-style checkpoint of `model` (random encoders, no weight files), saved at `path`."""
    hashes = maris.encoder_hashes(model)
    ckpt = {"config": maris.config_to_dict(model.cfg), "options": {"sam_checkpoint": None, "clip_checkpoint": None},
            "model": model.trainable_state_dict(), "step": 1,
            "encoders": {name: {"file": None, "sha256": h} for name, h in hashes.items()}, **extra}
    torch.save(ckpt, path)
    return ckpt


def clip_file(path, model: maris.MARIS, noise: float = 0.0) -> pathlib.Path:
    """The model's CLIP text tower saved under OpenAI's names, optionally perturbed."""
    state = {k: v + noise * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in model.text_encoder.state_dict().items()}
    torch.save(state, path)
    return path


def test_read_checkpoint_names_empty_cut_and_foreign_files(tmp_path):
    """Empty, cut-short, random-bytes and pickled-object files each give a ValueError naming the file, what is
    wrong and what was expected, and never weights_only's advice to load unsafely."""
    good = tmp_path / "good.pt"
    write_trained_checkpoint(good, tiny_model())
    raw = good.read_bytes()
    cases = {"empty.pt": (b"", "is empty"), "cut.pt": (raw[: len(raw) // 2], "not a complete torch file"),
             "random.pt": (os.urandom(4096), "not a complete torch file")}
    for name, (content, problem) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError) as e:
            maris.read_checkpoint(tmp_path / name)
        text = str(e.value)
        assert name in text and problem in text and "expected a last.pt or best.pt written by train.py" in text
        assert "weights_only" not in text and "\n" not in text
    torch.save({"config": functools.partial(print)}, tmp_path / "objects.pt")
    with pytest.raises(ValueError, match="objects.pt holds Python objects other than tensors"):
        maris.read_checkpoint(tmp_path / "objects.pt")
    assert maris.read_checkpoint(good)["step"] == 1


def test_bad_encoder_files_say_what_is_wrong_without_unsafe_advice(tmp_path):
    """An empty or random-bytes SAM / CLIP weight file is named with its problem, without the advice to
    load with weights_only=False."""
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "random.pth").write_bytes(os.urandom(4096))
    for loader in (maris.load_sam_checkpoint, maris.load_clip_text):
        with pytest.raises(ValueError, match=r"empty.pth is empty \(0 bytes\)"):
            loader(fresh_tiny(), tmp_path / "empty.pth")
        with pytest.raises(ValueError) as e:
            loader(fresh_tiny(), tmp_path / "random.pth")
        assert "random.pth is not a readable weight file" in str(e.value) and "weights_only" not in str(e.value)


def test_encoder_check_accepts_the_trained_encoders_and_reports_them(tmp_path):
    """A model rebuilt with the encoders it was trained with passes; the report holds files and hashes."""
    ckpt = write_trained_checkpoint(tmp_path / "m.pt", tiny_model())
    model = maris.model_from_checkpoint(ckpt)
    report = maris.check_encoders(ckpt, model)
    assert set(report) == {"sam", "clip"}
    for name, entry in report.items():
        assert entry["match"] is True and entry["file"] is None
        assert entry["sha256"] == entry["trained_sha256"] == ckpt["encoders"][name]["sha256"]


def test_encoder_check_refuses_other_weights_and_never_claims_the_override_was_trained(tmp_path):
    """Other CLIP weights than the trained ones raise EncoderMismatchError naming the user's file as an
    override and the trained encoder ("random weights") as what it was trained with; allowed, a warning."""
    model = tiny_model()
    ckpt = write_trained_checkpoint(tmp_path / "m.pt", model)
    other = clip_file(tmp_path / "other_clip.pt", model, noise=0.01)
    rebuilt = maris.model_from_checkpoint(ckpt, clip_checkpoint=other)
    with pytest.raises(maris.EncoderMismatchError) as e:
        maris.check_encoders(ckpt, rebuilt, source="m.pt", clip_checkpoint=other)
    text = str(e.value)
    assert f"--clip-checkpoint {other} holds other CLIP text tower weights" in text
    assert "trained with (random weights" in text and f"trained with {other}" not in text
    assert "SAM" not in text  # the SAM encoder matches
    with pytest.warns(maris.EncoderCheckWarning, match="ENCODER MISMATCH"):
        report = maris.check_encoders(ckpt, rebuilt, clip_checkpoint=other, allow_mismatch=True)
    assert report["clip"]["match"] is False and report["clip"]["file"] == str(other)
    assert report["sam"]["match"] is True
    # The same weights under another path pass: the hash is of the weights, not of the file name.
    same = clip_file(tmp_path / "same_clip.pt", model)
    assert maris.check_encoders(ckpt, maris.model_from_checkpoint(ckpt, clip_checkpoint=same),
                                clip_checkpoint=same)["clip"]["match"] is True


def test_encoder_check_warns_for_a_checkpoint_without_hashes(tmp_path):
    """A checkpoint written before hashes were stored loads with a warning that the encoders cannot be checked."""
    ckpt = write_trained_checkpoint(tmp_path / "m.pt", tiny_model())
    del ckpt["encoders"]
    with pytest.warns(maris.EncoderCheckWarning, match="cannot be checked"):
        report = maris.check_encoders(ckpt, maris.model_from_checkpoint(ckpt))
    assert report["sam"]["match"] is None and report["sam"]["trained_sha256"] is None


def test_load_builds_the_trained_model_and_checks_its_encoders(tmp_path):
    """maris.load gives the checkpoint's model in eval mode with its weights and precision; other encoder
    weights are refused unless allowed; an unknown or absent device is a ValueError."""
    model = fresh_tiny()
    with torch.no_grad():
        model.word_pos.add_(1.0)  # a "trained" weight that differs from the seeded build
    write_trained_checkpoint(tmp_path / "m.pt", model)
    loaded = maris.load(tmp_path / "m.pt", device="cpu")
    assert not loaded.training and loaded.precision == "fp32"
    assert torch.equal(loaded.word_pos, model.word_pos)
    other = clip_file(tmp_path / "other.pt", model, noise=0.01)
    with pytest.raises(maris.EncoderMismatchError):
        maris.load(tmp_path / "m.pt", clip_checkpoint=other)
    with pytest.warns(maris.EncoderCheckWarning):
        maris.load(tmp_path / "m.pt", clip_checkpoint=other, allow_encoder_mismatch=True)
    with pytest.raises(FileNotFoundError, match="--clip-checkpoint .*absent.pt does not exist"):
        maris.load(tmp_path / "m.pt", clip_checkpoint=tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="device nonsense: expected auto, cpu, cuda or cuda:N"):
        maris.load(tmp_path / "m.pt", device="nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device cuda: CUDA is not available on this machine"):
            maris.load(tmp_path / "m.pt", device="cuda")


def test_one_line_errors_turn_user_errors_into_one_line_and_keep_bugs(monkeypatch):
    """The script wrapper prints a ValueError / KeyError / OSError as one `error:` line (SystemExit 1),
    keeps the traceback of other exceptions, and keeps every traceback with MARIS_DEBUG=1."""
    import errno

    def failing(error):
        @maris.one_line_errors
        def main(argv=None):
            raise error
        return main

    monkeypatch.delenv(maris.DEBUG_ENV, raising=False)
    cases = [(ValueError("checkpoint x.pt is empty:\nexpected y"), "error: checkpoint x.pt is empty: expected y"),
             (KeyError("SAM checkpoint s.pth lacks 'a'"), "error: SAM checkpoint s.pth lacks 'a'"),
             (OSError(errno.ENOSPC, "No space left on device", "runs/x/last.pt"),
              "error: runs/x/last.pt: No space left on device")]
    for error, line in cases:
        with pytest.raises(SystemExit) as e:
            failing(error)()
        assert e.value.code == line
    with pytest.raises(RuntimeError):
        failing(RuntimeError("a bug"))()
    monkeypatch.setenv(maris.DEBUG_ENV, "1")
    with pytest.raises(ValueError):
        failing(ValueError("shown with its traceback"))()


# --- Shareable model folders: config.json + model.safetensors, no pickle ---

class _Payload:
    """A pickle that, when unpickled, creates the file `marker`: what a hostile .pt / .bin would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def trained_folder(tmp_path, name="model") -> tuple[pathlib.Path, maris.MARIS, dict]:
    """A model folder of a tiny model with one changed trainable weight, its model and its checkpoint dict."""
    model = fresh_tiny()
    with torch.no_grad():
        model.word_pos.add_(1.0)  # differs from the seeded build: the weights must come from the folder
    ckpt = write_trained_checkpoint(tmp_path / f"{name}.pt", model)
    folder = maris.write_model_folder(tmp_path / name, ckpt, card="# card\n")
    return folder, model, ckpt


def test_model_folder_holds_json_and_safetensors_and_loads_the_same_model(tmp_path):
    """A model folder holds config.json (JSON: config, options, encoder hashes), model.safetensors (exactly the
    trainable weights, read here by safetensors itself) and README.md; maris.load(folder) gives the model of the
    .pt, weight for weight and logit for logit."""
    folder, model, ckpt = trained_folder(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["maris_config"] == ckpt["config"] and config["encoders"] == ckpt["encoders"]
    weights = safetensors.torch.load_file(folder / "model.safetensors")
    assert weights.keys() == model.trainable_state_dict().keys()
    from_folder, from_pt = maris.load(folder, device="cpu"), maris.load(tmp_path / "model.pt", device="cpu")
    for key, value in model.trainable_state_dict().items():
        assert torch.equal(from_folder.state_dict()[key], value), key
    ids, wm = make_text([5, 3], 20)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(from_folder(images, ids, wm), from_pt(images, ids, wm))


def test_model_folder_never_unpickles_the_files_beside_it(tmp_path):
    """A hostile best.pt and pytorch_model.bin inside a model folder are never read: loading works from the
    JSON and safetensors files, and without model.safetensors it stops instead of falling back on them."""
    import pickle
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload works: unpickling it creates the marker
    assert marker.exists()
    marker.unlink()
    folder, _, _ = trained_folder(tmp_path)
    for name in ("best.pt", "pytorch_model.bin", "model.pt"):
        torch.save({"model": _Payload(marker)}, folder / name)
    maris.load(folder, device="cpu")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        maris.load(folder, device="cpu")
    assert not marker.exists()


def test_model_folder_errors_name_the_folder_and_what_is_wrong(tmp_path):
    """A missing file, a config.json that is not JSON or not a MARIS config, an unknown config field, weights
    that do not fit the config and a cut-short model.safetensors each give one line naming the folder."""
    folder, _, _ = trained_folder(tmp_path)
    good_config, good_weights = (folder / "config.json").read_text(), (folder / "model.safetensors").read_bytes()
    config = json.loads(good_config)
    small = json.loads(good_config)
    small["maris_config"]["maa_depth"] = 1  # one Mutual-Aware Attention block fewer than the weights hold
    wide = json.loads(good_config)
    wide["maris_config"]["decoder_mlp_dim"] = 8  # other shapes than the weights
    cases = [
        ("config.json", "{not json", ValueError, "config.json is not valid JSON"),
        ("config.json", json.dumps({**config, "model_type": "bert"}), ValueError, "is not a MARIS config"),
        ("config.json", json.dumps({**config, "format_version": 99}), ValueError, "format_version 99"),
        ("config.json", json.dumps({**config, "maris_config": {**config["maris_config"], "colour": 1}}), ValueError,
         "unusable maris_config: unknown MarisConfig field"),
        ("config.json", json.dumps(small), ValueError, "model.safetensors does not fit config.json .*unexpected key"),
        ("config.json", json.dumps(wide), ValueError, "model.safetensors does not fit config.json .*shape"),
        ("model.safetensors", good_weights[: len(good_weights) // 2], ValueError, "not a readable safetensors"),
        ("model.safetensors", b"", ValueError, "not a readable safetensors"),
    ]
    for name, content, error, message in cases:
        (folder / name).write_bytes(content.encode() if isinstance(content, str) else content)
        with pytest.raises(error, match=message) as e:
            maris.load(folder, device="cpu")
        assert str(folder) in str(e.value) and "\n" not in str(e.value)
        (folder / "config.json").write_text(good_config)
        (folder / "model.safetensors").write_bytes(good_weights)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"model folder .* has no config.json: expected a folder written by"):
        maris.read_checkpoint(folder)


def test_model_folder_encoders_are_checked_like_a_checkpoint(tmp_path):
    """A folder whose recorded encoder hash differs from the rebuilt encoder is refused (EncoderMismatchError)."""
    folder, _, _ = trained_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["encoders"]["sam"]["sha256"] = "0" * 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(maris.EncoderMismatchError, match="SAM image encoder"):
        maris.load(folder, device="cpu")


def test_write_model_folder_refuses_a_folder_with_files(tmp_path):
    """Exporting into a folder that holds files is refused, and the files stay."""
    folder, _, ckpt = trained_folder(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match="is not empty: expected a new or empty folder"):
        maris.write_model_folder(folder, ckpt, card="other")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
