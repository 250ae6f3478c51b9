"""A tiny ImageFolder of real photos, made without a download: scikit-learn's two sample photos
(china.jpg, flower.jpg, 427x640) split into left and right halves, four classes; each image is a
random crop of a class's half, of random size (so the training crops and the eval resize do
real work), saved as PNG.

    python benchmarks/photo_folder.py OUT [--train 64] [--val 16] [--size 48]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

CLASSES = ("china_left", "china_right", "flower_left", "flower_right")


def make_photo_folder(root: str | Path, train: int = 64, val: int = 16, size: int = 48, seed: int = 0) -> Path:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` (``train`` / ``val`` images
    in total, spread over the four classes); crops are ``size`` to ``1.5 * size`` pixels square."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            c = i % len(CLASSES)
            photo = photos[c // 2]
            half = photo.shape[1] // 2
            x0 = 0 if c % 2 == 0 else half
            side = int(rng.integers(size, int(size * 1.5) + 1))
            y = int(rng.integers(0, photo.shape[0] - side))
            x = int(rng.integers(x0, x0 + half - side))
            folder = root / split / CLASSES[c]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo[y : y + side, x : x + side]).save(folder / f"{i:05d}.png")
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--val", type=int, default=16)
    parser.add_argument("--size", type=int, default=48)
    args = parser.parse_args()
    make_photo_folder(args.out, args.train, args.val, args.size)
    print(f"wrote {args.train} train and {args.val} val images in {len(CLASSES)} classes under {args.out}")
