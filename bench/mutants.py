"""Mutation check of the test suite: put one-line faults into a scratch copy of the repository, one at a
time, run the tests that guard the changed module there, and print whether the suite catches each.

    python bench/mutants.py                  # every fault; the scratch copy has no ../shared (a fresh clone)
    python bench/mutants.py --only 1 3 8     # some of them
    python bench/mutants.py --with-shared    # with ../shared beside the scratch copy, as in this checkout
    python bench/mutants.py --list           # the faults, without running anything

A fault is "caught" when pytest fails with it in, "missed" when the tests pass. Each fault first runs the
tests named in its `first` (-k) expression and, when those pass, the whole of its test files, so a miss
is always a miss of whole files. The scratch copy holds the files git tracks plus the untracked ones it
does not ignore. Faults 1-8 are faults an earlier version of the suite let through.
Conditions: hypothesis runs without shrinking (HYPOTHESIS_PROFILE=mutants, tests/conftest.py); every
fault's tests run in one process, one fault after the other.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutant:
    """A one-line fault: `old` (present exactly once in `path`) replaced by `new`."""

    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # test files that guard the module
    first: str  # pytest -k expression of the tests expected to catch it (run first)
    what: str


MUTANTS = [
    # --- faults 1-8: an earlier suite let them through ---
    Mutant("maris.py", "token_mask = torch.cat([word_mask.new_ones(B, 1), word_mask], dim=1)",
           "token_mask = torch.cat([word_mask.new_ones(B, 1), torch.ones_like(word_mask)], dim=1)",
           ("tests/test_maris.py",), "padding", "1 the mask decoder attends to padded words"),
    Mutant("maris.py", "return x * torch.sigmoid(1.702 * x)", "return F.gelu(x)",
           ("tests/test_maris.py",), "clip", "2 QuickGELU replaced by GELU in the CLIP text tower"),
    Mutant("maris.py", "q = _split_heads(self.q_proj(visual + visual_pe), self.num_heads)",
           "q = _split_heads(self.q_proj(visual), self.num_heads)",
           ("tests/test_maris.py",), "mutual_aware",
           "3 SAM's P_v dropped from the Mutual-Aware Attention queries"),
    Mutant("data.py", 'x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)',
           'x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=True)',
           ("tests/test_data.py", "tests/test_evaluate.py"), "sam or invert",
           "4 invert_transform with align_corners=True"),
    Mutant("data.py", "SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)", "SAM_PIXEL_MEAN = (103.53, 116.28, 123.675)",
           ("tests/test_data.py",), "sam", "5 SAM's pixel mean in BGR order"),
    Mutant("evaluate.py", 'size=(size, size), mode="bilinear", align_corners=False)[:, 0]',
           'size=(size, size), mode="bilinear", align_corners=True)[:, 0]',
           ("tests/test_evaluate.py",), "sam", "6 evaluation upsampling with align_corners=True"),
    Mutant("train.py", "valid=valid, generator=generator, **inputs, **labels)",
           "valid=None, generator=generator, **inputs, **labels)",
           ("tests/test_train.py",), "padding", "7 the training step passes no valid-pixel mask to the loss"),
    Mutant("data.py", r"'d|[\p{L}]+|[\p{N}]|", r"'d|[\p{L}]+|[\p{N}]+|",
           ("tests/test_data.py",), "golden",
           "8 the tokenizer's regex takes digit runs (in a clone without ../shared)"),
    # --- more faults in the modules this round touched ---
    Mutant("maris.py", 'vga = logits.masked_fill(padded, float("-inf")).softmax(dim=-1)',
           "vga = logits.softmax(dim=-1)",
           ("tests/test_maris.py",), "padding or mutual_aware", "Vision-Guided Attention reads padded words"),
    Mutant("maris.py", "lga = logits.transpose(-2, -1).softmax(dim=-1)",
           "lga = logits.transpose(-2, -1).softmax(dim=-2)",
           ("tests/test_maris.py",), "mutual_aware or share", "Language-Guided softmax over L instead of N"),
    Mutant("maris.py", "eot = word_mask.sum(1) - 1", "eot = ids.argmax(1)",
           ("tests/test_maris.py",), "eot", "sentence feature F_s taken at argmax(ids)"),
    Mutant("maris.py", "return sum(p.sum() for p in head.parameters()) * 0.0",
           "return head.mask_embedding.sum() * 0.0",
           ("tests/test_train.py",), "without_words", "a Mask Grounding step without words leaves head parameters "
                                                      "unused (DDP)"),
    Mutant("maris.py", "        self.heads = heads\n", '        object.__setattr__(self, "heads", heads)\n',
           ("tests/test_train.py",), "ddp", "MagNet heads outside TrainStep's parameters (DDP does not average them)"),
    Mutant("maris.py", 'out["loss"] = out["loss"] + cfg.alignment_weight * out["alignment"]',
           'out["loss"] = out["loss"] + out["alignment"]',
           ("tests/test_maris.py",), "alignment", "the alignment loss enters unweighted"),
    Mutant("maris.py", '        importlib.import_module("segment_anything")\n    except ModuleNotFoundError',
           '        _register_bare_sam_package()\n    except ModuleNotFoundError',
           ("tests/test_maris.py",), "segment_anything or torchvision",
           "segment_anything's __init__ never runs (sam_model_registry unimportable after `import maris`)"),
    Mutant("maris.py", 'help_text = f"{meta[\'help\']} ({shown})"', "help_text = meta['help']",
           ("tests/test_train.py",), "help", "--help without the defaults"),
    Mutant("data.py", "rows = r[None, :, None] < sizes[:, 0, None, None]",
           "rows = r[None, :, None] < sizes[:, 1, None, None]",
           ("tests/test_data.py", "tests/test_train.py"), "valid or padding",
           "valid_mask with height and width swapped"),
    Mutant("data.py", '"encoder_sha256": encoder_sha256, "images": source', '"encoder_sha256": None, "images": source',
           ("tests/test_train.py",), "fingerprint or another_encoder",
           "the cache fingerprint ignores the encoder weights"),
    Mutant("data.py", "    return dict(images=None, image_features=features, image_index=index), len(missing)",
           "    return dict(images=None, image_features=features, image_index=index), len(image_ids)",
           ("tests/test_train.py",), "feature_cache", "cached images counted as encoded"),
    Mutant("data.py", 'self.image_source = f"shapes-{split}-seed{seed}"', 'self.image_source = f"shapes-seed{seed}"',
           ("tests/test_train.py", "tests/test_evaluate.py"), "feature_cache",
           "all shapes splits share one cache folder (their image ids collide)"),
    Mutant("train.py", "return opts.lr * LRSchedule(total_steps, opts.warmup_steps, opts.schedule)(step)",
           "return opts.lr * LRSchedule(total_steps, opts.warmup_steps, opts.schedule)(step + 1)",
           ("tests/test_train.py",), "learning_rate or schedule",
           "the learning rate of the next step used one step early"),
    Mutant("train.py", "set_rng_state(rngs[run.rank] if run.rank < len(rngs) else rngs[0], run.mask_words)",
           "set_rng_state(rngs[run.rank] if run.rank < len(rngs) else rngs[0])",
           ("tests/test_train.py",), "resume", "resume forgets Mask Grounding's RNG"),
    Mutant("train.py", 'self.image_source = getattr(dataset, "image_source", None)', "self.image_source = None",
           ("tests/test_train.py",), "feature_cache", "--train-limit hides the dataset's image source"),
    Mutant("train.py", "trainable = [p for p in run.train_step.parameters() if p.requires_grad]",
           "trainable = [p for p in run.model.parameters() if p.requires_grad]",
           ("tests/test_train.py",), "grad_norm or clip", "gradient clipping and its logged norm skip the heads"),
    Mutant("train.py", "for module in (train_step.model, train_step.heads):",
           "for module in (train_step.heads, train_step.model):",
           ("tests/test_train.py",), "optimizer",
           "optimizer parameter order changed (old checkpoints would not resume)"),
    Mutant("evaluate.py", "self._add(inter, union, iou, strict=False)", "self._add(inter, union, iou, strict=True)",
           ("tests/test_evaluate.py",), "prec", "Prec@X counts IoU > X instead of >= X"),
    Mutant("evaluate.py", "inter / union.clamp(min=1), torch.ones_like(union))",
           "inter / union.clamp(min=1), torch.zeros_like(union))",
           ("tests/test_evaluate.py",), "empty", "empty GT + empty prediction scores 0"),
    Mutant("evaluate.py", "    return batches[rank::world]", "    return batches[rank:]",
           ("tests/test_evaluate.py",), "eval_batches or torchrun", "evaluation ranks score overlapping batches"),
    # --- the paper's ablations as switches (MarisConfig fusion / query_token / feature_enhancement) ---
    Mutant("maris.py", "self.v_proj_words = nn.Linear(dim, dim) if vision_guided else None",
           "self.v_proj_words = nn.Linear(dim, dim) if vision_guided else None; torch.rand(1)",
           ("tests/test_maris.py",), "default_model", "the default model's initial weights move (an extra RNG draw)"),
    Mutant("maris.py", "self.out_proj_words = nn.Linear(dim, dim) if language_guided else None  # W_o,l",
           "self.out_proj_words = nn.Linear(dim, dim)  # W_o,l",
           ("tests/test_maris.py",), "variant", "Vision-Guided Attention alone builds an unused weight (DDP stops)"),
    Mutant("maris.py", "q_words = _split_heads(self.q_proj_words(words + word_pe), self.num_heads)",
           "q_words = _split_heads(self.q_proj_words(words), self.num_heads)",
           ("tests/test_maris.py",), "separate", "the separate Language-Guided affinity loses P_l"),
    Mutant("maris.py", "new_visual, new_words = visual, words  # a branch",
           "new_visual, new_words = visual, self.k_proj(words)  # a branch",
           ("tests/test_maris.py",), "one_way", "a one-way block changes the features of the branch it lacks"),
    Mutant("maris.py", "query = self.query_token.weight.expand(B, C)  # (1, C) -> (B, C)",
           "query = self.query_token.weight.expand(B, C) + sentence[:, :1]  # (1, C) -> (B, C)",
           ("tests/test_maris.py",), "query_token", "the learned query token reads the sentence"),
    # --- generalized RIS: training and scoring gRefCOCO, shapes-gres, PhraseCut ---
    Mutant("train.py", 'labels = {"no_target": batch["no_target"].to(device)} if no_target else {}', "labels = {}",
           ("tests/test_train.py",), "no_target", "the batch's no_target labels never reach the train step"),
    Mutant("train.py", 'NO_TARGET_WEIGHT = {"grefcoco": 0.1, "shapes-gres": 0.1}',
           'NO_TARGET_WEIGHT = {"grefcoco": 0.1, "shapes-gres": 0.1, "refcoco": 0.1}',
           ("tests/test_train.py",), "no_target or bit_identical", "RefCOCO trains a no-target head by default"),
    Mutant("train.py", 'VAL_METRIC = {"ris": "oIoU", "gres": "gIoU", "phrasecut": "mIoU"}',
           'VAL_METRIC = {"ris": "oIoU", "gres": "cIoU", "phrasecut": "mIoU"}',
           ("tests/test_train.py",), "best_checkpoint", "best.pt of a gRefCOCO-style run picked by cIoU"),
    Mutant("train.py", 'best=float(ckpt.get("best", ckpt.get("best_oIoU", -1.0))),', "best=-1.0,",
           ("tests/test_train.py",), "best_checkpoint", "resume forgets the best validation score"),
    Mutant("evaluate.py", "decided = bool(no_target_decision(self.nt_rule, masks=[pred],",
           'decided = bool(no_target_decision("empty-mask", masks=[pred],',
           ("tests/test_evaluate.py",), "by_hand", "the head rule decides by the empty mask"),
    Mutant("evaluate.py", 'gt_nt = scoring.metrics == "gres" and bool(batch["no_target"][b])', "gt_nt = False",
           ("tests/test_evaluate.py",), "by_hand", "gRefCOCO scoring ignores the no-target ground truth"),
    Mutant("evaluate.py", '    rule = nt_rule or ("head" if has_head else "empty-mask")',
           '    rule = nt_rule or "empty-mask"', ("tests/test_evaluate.py",), "scoring_for or no_target_rule",
           "the head rule is never the default"),
    Mutant("evaluate.py", '    image_dir = opts.image_dir or (stored.get("image_dir") if own_dataset else None)',
           '    image_dir = opts.image_dir or stored.get("image_dir")', ("tests/test_evaluate.py",), "across",
           "another dataset is read from the training dataset's image folder"),
    Mutant("evaluate.py", 'name += f"_from_{trained}" + (f"_{trained_by}" if trained_by else "") if cross else ""',
           'name += ""', ("tests/test_evaluate.py",), "across",
           "a cross-dataset report takes the name of the dataset's own report"),
    Mutant("evaluate.py", "return {split: {k: 100 * v if k in columns and v is not None else v for k, v in m.items()}",
           "return {split: {k: v for k, v in m.items()}", ("tests/test_evaluate.py",), "across or torchrun",
           "the JSON report in fractions, not percent"),
    # --- protecting runs, the encoder check, parse-time checks, the prediction API ---
    Mutant("train.py", "    if not present or overwrite:\n        return\n", "    return\n",
           ("tests/test_train.py",), "rerun", "a new run overwrites the run in its folder"),
    Mutant("train.py", "            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)", "            pass",
           ("tests/test_train.py",), "second_writer", "no lock: two trainings write one folder"),
    Mutant("train.py", '        data.atomic_write(path, lambda f: f.write("".join(lines[:keep]).encode()))',
           "        pass", ("tests/test_train.py",), "kill_9", "a resume keeps the records of the steps it runs again"),
    Mutant("maris.py", "    if problems and not allow_mismatch:", "    if False:",
           ("tests/test_maris.py", "tests/test_evaluate.py"), "encoder", "other encoder weights are accepted silently"),
    Mutant("maris.py", "            except ValueError as e:\n                parser.exit(2,",
           "            except TypeError as e:\n                parser.exit(2,",
           ("tests/test_train.py", "tests/test_evaluate.py"), "parse_time", "option values are not checked"),
    Mutant("evaluate.py", "    return data.load_rgb(image, exif_transpose=True)", "    return data.load_rgb(image)",
           ("tests/test_evaluate.py",), "predict", "predict ignores a photo's EXIF orientation"),
]


def scratch_copy(dest: pathlib.Path, with_shared: bool) -> pathlib.Path:
    """Copy the repository's files (git-tracked, and untracked but not ignored) to dest/repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\n")
    repo = dest / "repo"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    if with_shared and (ROOT.parent / "shared").is_dir():
        (dest / "shared").symlink_to(ROOT.parent / "shared")
    return repo


def pytest(repo: pathlib.Path, files: tuple[str, ...], select: str | None, timeout: int) -> int | None:
    """pytest's exit code (0 = the tests passed, 1 = a test failed, 2 = collection failed), stopping at the
    first failure; None when it ran past `timeout` seconds."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files]
    cmd += ["-k", select] if select else []
    env = {**os.environ, "HYPOTHESIS_PROFILE": "mutants", "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return None


def check(repo: pathlib.Path, m: Mutant, timeout: int) -> str:
    """Apply `m`, run its tests, restore the file: "caught", "missed", "timeout", "error" or "stale" (its
    `old` text is not in the file exactly once)."""
    path = repo / m.path
    original = path.read_text()
    if original.count(m.old) != 1:
        return "stale"
    path.write_text(original.replace(m.old, m.new))
    try:
        code = pytest(repo, m.tests, m.first, timeout)
        if code == 5:  # no test matched `first`: run the files
            code = 0
        if code == 0:
            code = pytest(repo, m.tests, None, timeout)
    finally:
        path.write_text(original)
    return {0: "missed", 1: "caught", 2: "caught", None: "timeout"}.get(code, "error")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", type=int, nargs="+", help="fault numbers (1-based, as --list shows)")
    p.add_argument("--with-shared", action="store_true", help="put ../shared beside the scratch copy")
    p.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    p.add_argument("--list", action="store_true", help="list the faults and exit")
    args = p.parse_args(argv)
    chosen = [(i, m) for i, m in enumerate(MUTANTS, 1) if not args.only or i in args.only]
    if args.list:
        for i, m in chosen:
            applies = (ROOT / m.path).read_text().count(m.old) == 1
            print(f"{i:2d}  {m.path:12s} {m.what}" + ("" if applies else "  [stale: not in the file exactly once]"))
        return
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        repo = scratch_copy(pathlib.Path(tmp), args.with_shared)
        print(f"scratch copy {repo} ({'with' if args.with_shared else 'without'} ../shared); "
              f"{len(chosen)} faults")
        for i, m in chosen:
            start = time.time()
            result = check(repo, m, args.timeout)
            counts[result] = counts.get(result, 0) + 1
            print(f"{i:2d}  {result:7s} {time.time() - start:6.0f} s  {m.path:12s} {m.what}", flush=True)
    print("; ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + f" (of {len(chosen)})")


if __name__ == "__main__":
    main()
