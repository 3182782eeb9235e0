"""A larger refer-layout training set made of copies of a small one (for the data and training benchmarks).

The refcoco-mini fixture holds 23 RefCOCO (unc) sentences on 4 images. `repeat_refer_root` writes a refer
layout whose train split holds every ref of the source's unc partition (all splits), `copies` times over.
Each copy gets its own image, annotation, ref and sentence ids, so the samplers, the image-grouped batches
and the feature cache treat every copy as a new picture (about 5.75 sentences per image; RefCOCO has 7.1);
the image files are symbolic links to the source's JPEGs, so every read still decodes a real JPEG.

    python bench/refer_repeat.py ../shared/refcoco-mini /tmp/refcoco-x50 --copies 50
"""
from __future__ import annotations

import argparse
import json
import pathlib
import pickle

# Id offsets per copy, above the largest COCO image (581,929), annotation (about 2.2e6; crowd ids reach
# 9.0e11) and RefCOCO ref / sentence ids.
IMAGE_STEP, ANN_STEP, REF_STEP, SENT_STEP = 10**6, 10**12, 10**6, 10**7


def repeat_refer_root(src: str | pathlib.Path, dst: str | pathlib.Path, copies: int, *, dataset: str = "refcoco",
                      split_by: str = "unc") -> pathlib.Path:
    """Write `copies` copies of src's <dataset>/refs(<split_by>).p refs (every split), all as "train", to dst.

    Args:
        src: a refer data root (refs pickle, instances.json, images/mscoco/images/train2014/).
        dst: the new root (created; existing files in it are overwritten).
        copies: how many copies (>= 1).
        dataset, split_by: the partition to copy.

    Returns:
        dst, a refer data root whose <dataset> <split_by> train split has copies x the source's sentences.

    Raises:
        FileNotFoundError: a source file is missing. ValueError: copies < 1.
    """
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    refs_path, inst_path = src / dataset / f"refs({split_by}).p", src / dataset / "instances.json"
    for path in (refs_path, inst_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {src} is not a refer data root with {dataset} ({split_by})")
    with open(refs_path, "rb") as f:
        refs = pickle.load(f)
    instances = json.loads(inst_path.read_text())
    images = {im["id"]: im for im in instances["images"]}
    anns = {a["id"]: a for a in instances["annotations"]}
    src_images, dst_images = src / "images/mscoco/images/train2014", dst / "images/mscoco/images/train2014"
    dst_images.mkdir(parents=True, exist_ok=True)
    (dst / dataset).mkdir(parents=True, exist_ok=True)
    used_images = sorted({r["image_id"] for r in refs})
    images_used = set(used_images)
    new_refs, new_images, new_anns = [], [], []
    for c in range(copies):
        for image_id in used_images:
            new_id = image_id + (c + 1) * IMAGE_STEP
            name = f"COCO_train2014_{new_id:012d}.jpg"
            new_images.append({**images[image_id], "id": new_id, "file_name": name})
            link = dst_images / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to((src_images / images[image_id].get("file_name",
                                                                f"COCO_train2014_{image_id:012d}.jpg")).resolve())
        for ann in anns.values():
            if ann["image_id"] in images_used:
                new_anns.append({**ann, "id": ann["id"] + (c + 1) * ANN_STEP,
                                 "image_id": ann["image_id"] + (c + 1) * IMAGE_STEP})
        for r in refs:
            sentences = [{**s, "sent_id": s["sent_id"] + (c + 1) * SENT_STEP} for s in r["sentences"]]
            new_refs.append({**r, "ref_id": r["ref_id"] + (c + 1) * REF_STEP,
                             "ann_id": r["ann_id"] + (c + 1) * ANN_STEP,
                             "image_id": r["image_id"] + (c + 1) * IMAGE_STEP, "split": "train",
                             "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences]})
    with open(dst / dataset / f"refs({split_by}).p", "wb") as f:
        pickle.dump(new_refs, f, protocol=2)
    (dst / dataset / "instances.json").write_text(json.dumps(
        {"images": new_images, "annotations": new_anns, "categories": instances["categories"]}))
    return dst


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=pathlib.Path, help="source refer root (e.g. ../shared/refcoco-mini)")
    p.add_argument("dst", type=pathlib.Path, help="new refer root")
    p.add_argument("--copies", type=int, default=50, help="copies of the source (default 50)")
    args = p.parse_args(argv)
    root = repeat_refer_root(args.src, args.dst, args.copies)
    refs = pickle.loads((root / "refcoco" / "refs(unc).p").read_bytes())
    print(f"wrote {root}: {len(refs)} refs, {sum(len(r['sentences']) for r in refs)} sentences on "
          f"{len({r['image_id'] for r in refs})} images (refcoco unc train)")


if __name__ == "__main__":
    main()
