"""A web demo of a trained MARIS: pick a checkpoint, upload a picture or generate a shapes scene, type an
expression, see the overlay and download the mask (README, "Web demo").

    python train.py && python demo.py                # the built-in shapes model, http://127.0.0.1:7860
    python demo.py --ckpt exports/refcoco --sam-checkpoint sam_vit_b_01ec64.pth --clip-checkpoint ViT-B-16.pt
    python demo.py --host 0.0.0.0 --port 8080        # reachable from other machines of the network

The app is Gradio's (`pip install -r requirements-demo.txt`; the rest of the project does not need it). It binds
to 127.0.0.1 unless --host says otherwise, turns Gradio's usage analytics off and makes no network call of its
own; `--share` asks Gradio for a public *.gradio.live link, which goes through Gradio's servers.

Everything but `build_app` and `main` works without gradio installed (the test suite calls `segment` and
`shapes_scene` directly): a checkpoint (`.pt` or a folder from `evaluate.py --export`) is loaded once by
`maris.load` and kept (`ModelCache`), the masks come from `evaluate.predict` and the pictures from
`evaluate.draw_overlay`, as in `evaluate.py --image`.
"""
from __future__ import annotations

import os
import pathlib
import tempfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

import data
import maris
from evaluate import _slug, draw_overlay, predict, read_picture

DEFAULT_CKPT = "runs/shapes/best.pt"  # what `python train.py` writes


@dataclass
class DemoOptions:
    """Every command-line option of demo.py (flag = field name with '-' for '_')."""

    ckpt: str = maris.option(DEFAULT_CKPT, "checkpoint shown first: a train.py .pt or an evaluate.py --export folder "
                                           "(another can be typed in the page)")
    sam_checkpoint: str | None = maris.option(None, "SAM weights", auto="the path stored in the checkpoint")
    clip_checkpoint: str | None = maris.option(None, "CLIP weights", auto="the path stored in the checkpoint")
    device: str = maris.option("auto", "auto | cpu | cuda | cuda:N", check=maris.check_device)
    host: str = maris.option("127.0.0.1", "address to listen on (0.0.0.0: every network interface)")
    port: int = maris.option(7860, "port", check=maris.at_least(1))
    share: bool = maris.option(False, "also ask Gradio for a public *.gradio.live link (through Gradio's servers)")


DESCRIPTION = "A web demo of a trained MARIS: an image and an expression in, the overlay and the mask out."


class ModelCache:
    """Trained models by path: each loaded once by `maris.load` (encoder hashes checked), reloaded when the
    checkpoint file or folder changes."""

    def __init__(self, *, device: str = "auto", sam_checkpoint: str | None = None,
                 clip_checkpoint: str | None = None):
        self.device, self.sam_checkpoint, self.clip_checkpoint = device, sam_checkpoint, clip_checkpoint
        self.models: dict[tuple, maris.MARIS] = {}

    def get(self, path: str) -> maris.MARIS:
        """The model of `path` (`maris.load` errors pass through: FileNotFoundError, ValueError)."""
        path = path.strip()
        if not path:
            raise ValueError("checkpoint: expected a .pt file or a model folder path")
        p = pathlib.Path(path)
        if not p.exists():
            hint = " (train it first: python train.py)" if path == DEFAULT_CKPT else ""
            raise FileNotFoundError(f"checkpoint {path} does not exist{hint}")
        stamp = max(f.stat().st_mtime_ns for f in ([p] if p.is_file() else p.iterdir()))
        key = (str(p.resolve()), stamp)
        if key not in self.models:
            self.models = {k: m for k, m in self.models.items() if k[0] != key[0]}  # drop an older version
            self.models[key] = maris.load(path, device=self.device, sam_checkpoint=self.sam_checkpoint,
                                          clip_checkpoint=self.clip_checkpoint)
        return self.models[key]


def shapes_scene(seed: int) -> tuple[Image.Image, list[str]]:
    """A scene of the built-in shapes generator (`data.make_scene`, seeded) and the expressions it wrote for it,
    each checked to pick exactly one object (the first is the suggestion).

    Raises:
        ValueError: a seed that is not an integer >= 0.
    """
    if seed is None or int(seed) != seed or seed < 0:
        raise ValueError(f"seed {seed!r}: expected an integer >= 0")
    scene = data.make_scene(np.random.default_rng(int(seed)))
    return data.render_scene(scene), [expr for _, expr in scene.items]


def segment(model: maris.MARIS, image, text: str, *, threshold: float = 0.5,
            out_dir: str | os.PathLike | None = None) -> tuple[Image.Image, np.ndarray, pathlib.Path | None]:
    """One expression in one picture: the overlay (`draw_overlay`), the mask and, with `out_dir`, the mask written
    as a PNG (255 = the object) named after the expression.

    Args:
        model: a loaded MARIS.  image: a path, a PIL image or an (H, W, 3) uint8 array (`evaluate.read_picture`).
        text: the referring expression.  threshold: foreground where sigmoid(logit) > threshold.

    Returns:
        (overlay RGB picture, bool mask (H, W) at the picture's size, the mask PNG's path or None).

    Raises:
        ValueError: no picture, an empty expression, a bad threshold (`evaluate.predict`'s errors).
    """
    if image is None:
        raise ValueError("image: expected a picture (upload one or generate a shapes scene)")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("expression: expected a referring expression such as \"the small red circle\"")
    picture = read_picture(image)  # upright by its EXIF tag, RGB, as evaluate.py --image reads it
    mask = predict(model, picture, text, threshold=threshold)
    overlay = draw_overlay(picture, mask, text, context_length=model.cfg.context_length)
    path = None
    if out_dir is not None:
        path = pathlib.Path(out_dir) / f"mask_{_slug(text)}.png"
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path)
    return overlay, mask, path


def build_app(opts: DemoOptions, cache: ModelCache | None = None):
    """The Gradio Blocks app (gradio is imported here, so the rest of the file works without it); `cache` holds
    the models already loaded (None: a new one from `opts`).

    Raises:
        SystemExit: gradio is not installed.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports to Gradio's servers
    try:
        import gradio as gr
    except ImportError:
        raise SystemExit("error: the demo needs gradio: pip install -r requirements-demo.txt") from None
    if cache is None:
        cache = ModelCache(device=opts.device, sam_checkpoint=opts.sam_checkpoint,
                           clip_checkpoint=opts.clip_checkpoint)
    out_dir = tempfile.mkdtemp(prefix="maris-demo-")  # the mask PNGs offered for download

    def run(ckpt, image, text, threshold):
        try:
            model = cache.get(ckpt)
            overlay, mask, path = segment(model, image, text, threshold=threshold, out_dir=out_dir)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise gr.Error(maris.error_line(e)) from None
        info = (f"{int(mask.sum()):,} of {mask.size:,} pixels ({100 * mask.mean():.1f} %) in the mask; "
                f"model {ckpt} (S = {model.cfg.image_size}), threshold {threshold}")
        return overlay, str(path), info

    def generate(seed):
        try:
            picture, expressions = shapes_scene(seed)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        return picture, expressions[0], gr.update(choices=expressions, value=expressions[0])

    with gr.Blocks(title="MARIS referring image segmentation", analytics_enabled=False) as app:
        gr.Markdown("## MARIS: referring image segmentation\nAn image and an expression such as *the small red "
                    "circle on the left* in, the mask of that object out. The built-in shapes model "
                    "(`python train.py`) knows only the synthetic shapes scenes: generate one below.")
        ckpt = gr.Textbox(opts.ckpt, label="checkpoint (.pt from train.py or a folder from evaluate.py --export)")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="image", sources=["upload", "clipboard"], format="png")
                with gr.Row():
                    seed = gr.Number(0, label="shapes scene seed", precision=0, minimum=0)
                    make = gr.Button("generate a shapes scene")
                suggestions = gr.Dropdown([], label="expressions the generator wrote for this scene",
                                          allow_custom_value=True)
                text = gr.Textbox(label="expression", placeholder="the small red circle on the left")
                threshold = gr.Slider(0.05, 0.95, value=0.5, step=0.05, label="threshold on sigmoid(logit)")
                go = gr.Button("segment", variant="primary")
            with gr.Column():
                overlay = gr.Image(type="pil", label="prediction (azure)", format="png", interactive=False)
                mask_file = gr.File(label="mask PNG (255 = the object)", interactive=False)
                info = gr.Markdown()
        make.click(generate, inputs=seed, outputs=[image, text, suggestions], api_name="scene")
        suggestions.input(lambda s: s, inputs=suggestions, outputs=text, api_name=False)
        go.click(run, inputs=[ckpt, image, text, threshold], outputs=[overlay, mask_file, info], api_name="segment")
        text.submit(run, inputs=[ckpt, image, text, threshold], outputs=[overlay, mask_file, info], api_name=False)
    app.mask_dir = out_dir
    return app


@maris.one_line_errors
def main(argv: list[str] | None = None):
    """`python demo.py [options]`: check the checkpoint loads, then serve the app until interrupted."""
    opts, _ = maris.parse_options(DemoOptions, argv, DESCRIPTION)
    cache = ModelCache(device=opts.device, sam_checkpoint=opts.sam_checkpoint, clip_checkpoint=opts.clip_checkpoint)
    cache.get(opts.ckpt)  # a missing or bad checkpoint fails here, in one line, before the server starts
    app = build_app(opts, cache)
    app.launch(server_name=opts.host, server_port=opts.port, share=opts.share)
    return app


if __name__ == "__main__":
    main()
