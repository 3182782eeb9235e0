"""Tests for maris.py: shapes, masking laws, shared attention logits, losses, weight loading,
and a CPU overfit run. Everything uses the tiny preset (random frozen encoders) at small S."""
import functools
import warnings
from functools import partial

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import maris

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


# --- command line and overfitting ----------------------------------------------------------

def test_main_prints_parameters_and_shapes(capsys):
    """`python maris.py --preset tiny` prints the parameter table and the stage shapes."""
    maris.main(["--preset", "tiny", "--image-size", "64", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert "feature_enhancement" in out and "frozen" in out
    assert "mask_decoder (logits)" in out and "(2, 1, 16, 16)" in out


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


# --- MagNet add-ons: Mask Grounding, alignment loss, training_loss ------------------------------

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
        out = maris.training_loss(model, heads, **batch, generator=torch.Generator().manual_seed(0))
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
            a = maris.training_loss(model, heads, **batch, generator=torch.Generator().manual_seed(1))
            b = maris.training_loss(model, heads, **other, generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(a["mask_grounding"])
        assert torch.equal(a["mask_grounding"], b["mask_grounding"]) == (not use_mask)


def test_mask_grounding_untied_and_unfused_variants_run():
    """The untied classifier and the main-pass F_v' variant give finite losses with gradients."""
    model, heads, batch = magnet_setup(mask_grounding_weight=1.0, mask_grounding_tied_output=False,
                                       mask_grounding_fuse_masked=False)
    assert heads.mask_grounding.output_proj.out_features == 49408
    out = maris.training_loss(model, heads, **batch)
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


def test_alignment_head_trains_through_training_loss():
    """With alignment on, training_loss adds the weighted alignment loss and the projections
    get gradients; the Mask Grounding head is absent."""
    model, heads, batch = magnet_setup(alignment_weight=0.5)
    assert heads.mask_grounding is None and heads.alignment is not None
    out = maris.training_loss(model, heads, **batch)
    assert out["mask_grounding"] == 0 and out["alignment"] > 0
    torch.testing.assert_close(out["loss"], 20 * out["focal"] + out["dice"] + 0.5 * out["alignment"])
    out["loss"].backward()
    assert heads.alignment.pixel_proj.weight.grad.abs().sum() > 0


def test_training_loss_all_off_is_exactly_maris():
    """With both weights 0, training_loss's loss and gradients are bit-identical to
    segmentation_loss(model(images, ids, word_mask)), and the add-on entries are 0."""
    model, heads, batch = magnet_setup()
    assert not list(heads.parameters())
    grads = []
    for use_training_loss in (True, False):
        model.zero_grad()
        if use_training_loss:
            out = maris.training_loss(model, heads, **batch)
        else:
            logits = model(batch["images"], batch["ids"], batch["word_mask"], image_index=batch["image_index"])
            out = maris.segmentation_loss(logits, batch["masks"], batch["valid"], model.cfg)
        out["loss"].backward()
        grads.append((out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None}))
        if use_training_loss:
            assert out["mask_grounding"] == 0 and out["alignment"] == 0
    (loss_a, grad_a), (loss_b, grad_b) = grads
    assert torch.equal(loss_a, loss_b)
    assert grad_a.keys() == grad_b.keys() and all(torch.equal(grad_a[k], grad_b[k]) for k in grad_a)


def test_training_loss_refuses_missing_heads():
    """A non-zero weight without the matching head raises an error naming the head."""
    model, _, batch = magnet_setup(alignment_weight=1.0)
    with pytest.raises(ValueError, match="heads.alignment"):
        maris.training_loss(model, None, **batch)


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
