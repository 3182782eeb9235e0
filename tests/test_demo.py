"""Tests for demo.py: the prediction function without gradio, the shapes scenes, the model cache, and the running
app driven through Gradio's Python client on 127.0.0.1 (skipped without gradio)."""
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import data
import demo
import evaluate
import maris
from conftest import ROOT


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A 1-step tiny-preset checkpoint trained on shapes at S = 64."""
    import train
    out = tmp_path_factory.mktemp("ckpt")
    train.main(["--max-steps", "1", "--image-size", "64", "--batch-size", "2", "--val-split", "",
                "--no-progress", "--out-dir", str(out)])
    return out / "last.pt"


def test_segment_gives_evaluates_mask_overlay_and_png(tiny_checkpoint, tmp_path):
    """segment's mask is evaluate.predict's at a low threshold (a non-empty mask), its overlay is draw_overlay's
    picture, and the PNG it writes holds the mask as 0 / 255 at the picture's size."""
    model = maris.load(tiny_checkpoint, device="cpu")
    picture, expressions = demo.shapes_scene(3)
    overlay, mask, path = demo.segment(model, picture, expressions[0], threshold=0.05, out_dir=tmp_path)
    expected = evaluate.predict(model, picture, expressions[0], threshold=0.05)
    assert mask.shape == (picture.height, picture.width) and np.array_equal(mask, expected) and mask.any()
    reference = evaluate.draw_overlay(picture, expected, expressions[0], context_length=model.cfg.context_length)
    assert np.array_equal(np.asarray(overlay), np.asarray(reference))
    with Image.open(path) as png:
        assert png.mode == "L" and np.array_equal(np.asarray(png) == 255, mask)
        assert set(np.unique(np.asarray(png))) <= {0, 255}
    array_mask = demo.segment(model, np.asarray(picture), expressions[0], threshold=0.05)[1]
    assert np.array_equal(array_mask, mask)  # an (H, W, 3) array, as gradio may hand it over


def test_segment_rejects_a_missing_picture_or_expression(tiny_checkpoint):
    """No picture or an empty expression is a ValueError that says what to give."""
    model = maris.load(tiny_checkpoint, device="cpu")
    with pytest.raises(ValueError, match="image: expected a picture"):
        demo.segment(model, None, "the red circle")
    with pytest.raises(ValueError, match="expression: expected a referring expression"):
        demo.segment(model, demo.shapes_scene(0)[0], "  ")


def test_shapes_scene_is_seeded_and_each_suggestion_picks_one_object():
    """The same seed gives the same picture and expressions, another seed another scene; every suggested
    expression refers to exactly one object of the scene (the generator's own resolver)."""
    first, again, other = demo.shapes_scene(7), demo.shapes_scene(7), demo.shapes_scene(8)
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[0])) and first[1] == again[1]
    assert first[1] != other[1] or not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))
    scene = data.make_scene(np.random.default_rng(7))
    assert first[1] and all(len(data.evaluate_expression(e, scene)) == 1 for e in first[1])
    with pytest.raises(ValueError, match="seed -1: expected an integer >= 0"):
        demo.shapes_scene(-1)


def test_model_cache_loads_once_and_names_a_missing_checkpoint(tiny_checkpoint, tmp_path, monkeypatch):
    """The cache loads a checkpoint once; a missing default checkpoint says to train first."""
    calls = []
    real = maris.load
    monkeypatch.setattr(maris, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    cache = demo.ModelCache(device="cpu")
    assert cache.get(str(tiny_checkpoint)) is cache.get(str(tiny_checkpoint)) and len(calls) == 1
    monkeypatch.chdir(tmp_path)  # no runs/shapes/best.pt here
    with pytest.raises(FileNotFoundError, match=r"runs/shapes/best.pt does not exist \(train it first"):
        cache.get(demo.DEFAULT_CKPT)


def test_demo_imports_and_segments_without_gradio(tiny_checkpoint):
    """With gradio unimportable, demo.py imports and segments; only build_app stops, with one line."""
    code = (f"import sys; sys.modules['gradio'] = None\nimport demo, maris\n"
            f"m = maris.load({str(tiny_checkpoint)!r}, device='cpu')\n"
            f"print(demo.segment(m, demo.shapes_scene(1)[0], 'the red circle')[1].shape)\n"
            f"demo.build_app(demo.DemoOptions())\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "error: the demo needs gradio: pip install -r requirements-demo.txt" in done.stderr
    assert "(" in done.stdout  # the mask's shape was printed before build_app


def test_main_with_a_missing_checkpoint_is_one_line_before_any_server(tmp_path):
    """demo.py --ckpt naming nothing exits with one line naming the path (the server never starts)."""
    with pytest.raises(SystemExit, match="checkpoint .*absent.pt does not exist"):
        demo.main(["--ckpt", str(tmp_path / "absent.pt")])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_running_app_answers_through_the_gradio_client(tiny_checkpoint, tmp_path, monkeypatch):
    """The app, served on 127.0.0.1, generates a scene and segments it through gradio_client: the overlay and
    the mask PNG it returns match `segment`'s."""
    pytest.importorskip("gradio", reason="gradio is optional (pip install -r requirements-demo.txt)")
    client_module = pytest.importorskip("gradio_client", reason="gradio_client comes with gradio")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    opts = demo.DemoOptions(ckpt=str(tiny_checkpoint), device="cpu", port=_free_port())
    app = demo.build_app(opts)
    app.launch(server_name="127.0.0.1", server_port=opts.port, prevent_thread_lock=True, quiet=True)
    try:
        client = client_module.Client(f"http://127.0.0.1:{opts.port}/", verbose=False)
        scene_path, suggestion, _ = client.predict(5, api_name="/scene")
        picture, expressions = demo.shapes_scene(5)
        assert suggestion == expressions[0]
        assert np.array_equal(np.asarray(Image.open(scene_path).convert("RGB")), np.asarray(picture))
        overlay_path, mask_path, info = client.predict(str(tiny_checkpoint), client_module.handle_file(scene_path),
                                                       suggestion, 0.05, api_name="/segment")
        model = maris.load(tiny_checkpoint, device="cpu")
        overlay, mask, _ = demo.segment(model, picture, suggestion, threshold=0.05)
        assert np.array_equal(np.asarray(Image.open(mask_path)) == 255, mask)
        assert np.array_equal(np.asarray(Image.open(overlay_path).convert("RGB")), np.asarray(overlay))
        assert "pixels" in info
    finally:
        app.close()
