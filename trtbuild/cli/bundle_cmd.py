"""CLI: `bundle keygen|create|verify|inspect`, `export-jetson`, `export-snpe` (thin over the Python API)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from trtbuild.cli.profile_options import high_precision_option, shape_option
from trtbuild.core.console import emit_json, out
from trtbuild.core.errors import TrtbuildError

_REPORT_BYTES = 4 << 20  # a fidelity/profile report recorded in the manifest


def _load_json(path: str | None, what: str) -> dict[str, Any] | None:
    if path is None:
        return None
    from trtbuild.bundle.manifest import parse_json

    try:
        with Path(path).open("rb") as fh:
            raw = fh.read(_REPORT_BYTES + 1)
    except OSError as exc:
        raise TrtbuildError(
            f"cannot read {what} file {path} ({exc.strerror})", f"pass a JSON {what} report"
        ) from exc
    try:
        data = parse_json(raw, f"{what} file {path}", max_bytes=_REPORT_BYTES)
    except TrtbuildError as exc:
        raise TrtbuildError(exc.problem, f"pass a JSON {what} report") from None
    if not isinstance(data, dict):
        raise TrtbuildError(f"{what} file {path} is not a JSON object", f"pass a JSON {what} report")
    return data


def _load_ranges(path: str | None) -> Any:
    if path is None:
        return None
    from calibrators.ranges import RangeSet

    return RangeSet.load(path)


@click.group("bundle")
def bundle() -> None:
    """Signed fleet bundles: one archive per model x target x precision."""


@bundle.command("keygen")
@click.argument("private_key", type=click.Path(dir_okay=False))
@click.option("--pub", "public_key", type=click.Path(dir_okay=False), help="Public key path [KEY.pub].")
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
def keygen(private_key: str, public_key: str | None, force: bool) -> None:
    """Create an Ed25519 signing key (PEM, mode 0600) and its public key, written together.

    Refuses a private key path ending in .pub, a --pub path that is the private key's, and existing keys
    unless --force (which never replaces a private key with a public one)."""
    from trtbuild.bundle.signing import generate_keypair, key_id, load_public_key

    priv, pub = generate_keypair(private_key, public_key, overwrite=force)
    out.print(f"private key: {priv}  (keep secret; or export it as TRTBUILD_SIGNING_KEY)")
    out.print(f"public key:  {pub}  (key id {key_id(load_public_key(str(pub)))})")


@bundle.command("create")
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False), help="FP32 ONNX.")
@click.option(
    "--target",
    "targets",
    required=True,
    multiple=True,
    help="Jetson target id, snpe/qairt, or triton-<gpu>/triton-ort-cpu (a Triton model repository).",
)
@click.option(
    "--deepstream", is_flag=True, help="Jetson bundles also carry the DeepStream nvinfer and app configs."
)
@click.option("--precision", "precisions", required=True, multiple=True, help="fp32, fp16 or int8.")
@click.option("--key", help="Ed25519 private key (PEM file) [env TRTBUILD_SIGNING_KEY].")
@click.option("--out", "out_dir", default="bundles", show_default=True, type=click.Path(file_okay=False))
@click.option("--name", "model_name", help="Model name in the manifest [ONNX file stem].")
@click.option("--version", "model_version", default="1", show_default=True, help="Model version.")
@click.option("--ranges", type=click.Path(dir_okay=False), help="Ranges JSON from `trtbuild calibrate`.")
@click.option("--qdq-onnx", type=click.Path(dir_okay=False), help="Q/DQ graph for explicit INT8.")
@click.option("--fp16-onnx", type=click.Path(dir_okay=False), help="FP16 graph (TensorRT 11 FP16).")
@click.option("--calib-data", type=click.Path(exists=True), help="Calibration samples (Qualcomm raw inputs).")
@click.option("--htp-socs", default="sm8650", show_default=True, help="Qualcomm SoC(s) for graph prepare.")
@click.option("--fidelity", type=click.Path(dir_okay=False), help="Fidelity report JSON to record.")
@click.option("--profile", type=click.Path(dir_okay=False), help="Profile report JSON to record.")
@shape_option
@high_precision_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def create(
    model_path: str,
    targets: tuple[str, ...],
    precisions: tuple[str, ...],
    key: str | None,
    out_dir: str,
    model_name: str | None,
    model_version: str,
    ranges: str | None,
    qdq_onnx: str | None,
    fp16_onnx: str | None,
    calib_data: str | None,
    htp_socs: str,
    fidelity: str | None,
    profile: str | None,
    shapes: tuple[str, ...],
    high_precision: str,
    as_json: bool,
    deepstream: bool,
) -> None:
    """Export and sign one bundle per target x precision."""
    from trtbuild.bundle.signing import load_private_key
    from trtbuild.core.inputs import parse_profile_spec
    from trtbuild.ship.bundles import create_bundles

    private = load_private_key(key)  # fail before any export work
    paths = create_bundles(
        model_path,
        targets,
        precisions,
        private,
        out_dir,
        model_name=model_name,
        model_version=model_version,
        ranges=_load_ranges(ranges),
        qdq_onnx=qdq_onnx,
        fp16_onnx=fp16_onnx,
        calibration=calib_data,
        htp_socs=htp_socs,
        fidelity=_load_json(fidelity, "fidelity"),
        profile=_load_json(profile, "profile"),
        deepstream=deepstream,
        shapes=[parse_profile_spec(s) for s in shapes] or None,
        high_precision=high_precision,
    )
    if as_json:
        emit_json({"bundles": [str(p) for p in paths]})
        return
    table = Table(title="bundles")
    table.add_column("bundle")
    table.add_column("size", justify="right")
    for p in paths:
        table.add_row(str(p), f"{p.stat().st_size / 1e6:.1f} MB")
    out.print(table)


@bundle.command("verify")
@click.argument("bundle_path", type=click.Path(dir_okay=False))
@click.option("--pub", "public_key", help="Publisher's public key (PEM file) [env TRTBUILD_VERIFY_KEY].")
@click.option(
    "--device",
    help="State the device (a target id), or 'skip' to skip the device check "
    "[detect: /etc/nv_tegra_release, nvidia-smi].",
)
@click.option(
    "--extract", "extract_to", type=click.Path(file_okay=False), help="Extract here if all checks pass."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify(
    bundle_path: str, public_key: str | None, device: str | None, extract_to: str | None, as_json: bool
) -> None:
    """Check signature, every file hash and the target against this device; optionally extract."""
    from trtbuild.bundle.signing import load_public_key
    from trtbuild.bundle.verify import verify_bundle

    report = verify_bundle(bundle_path, load_public_key(public_key), device=device, extract_to=extract_to)
    if as_json:
        emit_json(report.to_json())
        return
    line = Text("OK", style="green")
    line.append(
        f" {report.manifest.name}: signature (key {report.key_id}), "
        f"{report.files_checked} file(s) hashed; device: {report.device_check}"
    )
    out.print(line)
    if report.extracted_to:
        out.print(Text(f"extracted to {report.extracted_to}"))


@bundle.command("inspect")
@click.argument("bundle_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(bundle_path: str, as_json: bool) -> None:
    """Show a bundle's manifest (NOT verified: use `bundle verify` before deploying)."""
    from trtbuild.bundle.archive import read_manifest_unverified

    doc = read_manifest_unverified(bundle_path)  # size-, depth- and schema-checked, not signature-checked
    if as_json:
        emit_json(doc)
        return
    # untrusted text: shown as plain text (no rich markup, control characters stripped)
    table = Table(title=Text(f"{Path(bundle_path).name} (signature not checked)"))
    table.add_column("field")
    table.add_column("value")
    model = doc["model"]
    rows = [
        ("schema", str(doc["schema"])),
        ("model", f"{model['name']} {model['version']}"),
        ("target / precision", f"{doc['target']} / {doc['precision']}"),
        ("requires", json.dumps(doc["requires"])),
    ]
    rows += [(key, json.dumps(doc[key])) for key in ("fidelity", "profile") if doc.get(key)]
    rows += [
        (rel, f"{entry['size']} B  sha256 {entry['sha256'][:16]}…")
        for rel, entry in sorted(doc["files"].items())
    ]
    for field, value in rows:
        table.add_row(Text(field), Text(value))
    out.print(table)


@click.command("export-jetson")
@click.argument("onnx_path", type=click.Path(dir_okay=False))
@click.option("--target", required=True, help="Jetson target id (see `trtbuild targets`).")
@click.option("--precision", required=True, help="fp32, fp16 or int8.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option(
    "--ranges", type=click.Path(dir_okay=False), help="Ranges JSON: implicit INT8 calibration cache."
)
@click.option("--qdq-onnx", type=click.Path(dir_okay=False), help="Q/DQ graph for explicit INT8.")
@click.option("--fp16-onnx", type=click.Path(dir_okay=False), help="FP16 graph.")
@click.option("--dla-core", type=int, help="Run on this DLA core (with GPU fallback).")
@shape_option
@high_precision_option
@click.option("--json", "as_json", is_flag=True)
def export_jetson_cmd(
    onnx_path: str,
    target: str,
    precision: str,
    out_dir: str,
    ranges: str | None,
    qdq_onnx: str | None,
    fp16_onnx: str | None,
    dla_core: int | None,
    shapes: tuple[str, ...],
    high_precision: str,
    as_json: bool,
) -> None:
    """Write a Jetson bundle folder: ONNX, calibration cache, build.sh, profile.sh, plan."""
    from trtbuild.core.inputs import parse_profile_spec
    from trtbuild.ship.jetson import export_jetson

    result = export_jetson(
        onnx_path,
        target,
        precision,
        out_dir,
        ranges=_load_ranges(ranges),
        qdq_onnx=qdq_onnx,
        fp16_onnx=fp16_onnx,
        shapes=[parse_profile_spec(s) for s in shapes] or None,
        dla_core=dla_core,
        high_precision=high_precision,
    )
    info = {
        "folder": str(result.folder),
        "target": result.target.id,
        "tensorrt": result.trt_version,
        "graph": result.plan.onnx,
        "calib_cache": str(result.calib_cache) if result.calib_cache else None,
        "build": str(result.build_script),
        "profile": str(result.profile_script),
    }
    if as_json:
        emit_json(info)
        return
    out.print(f"Jetson bundle for {result.target.name}, TensorRT {result.trt_version}: {result.folder}")
    out.print(f"on the device: ./build.sh && ./profile.sh   (plan: {', '.join(result.plan.notes)})")


@click.command("export-snpe")
@click.argument("onnx_path", type=click.Path(dir_okay=False))
@click.option(
    "--ranges", required=True, type=click.Path(dir_okay=False), help="Ranges JSON (trtbuild calibrate)."
)
@click.option(
    "--calib-data", required=True, type=click.Path(exists=True), help="Images or .npy/.npz samples."
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option(
    "--converter",
    type=click.Choice(["snpe", "qairt"]),
    default="snpe",
    show_default=True,
    help="snpe: snpe-onnx-to-dlc (NHWC raw inputs); qairt: qairt-converter (ONNX layout).",
)
@click.option("--htp-socs", default="sm8650", show_default=True)
@click.option("--samples", default=16, show_default=True, help="Calibration samples written as .raw.")
@click.option("--symmetric-activations", is_flag=True, help="int8 symmetric activations instead of uint8.")
@click.option("--json", "as_json", is_flag=True)
def export_snpe_cmd(
    onnx_path: str,
    ranges: str,
    calib_data: str,
    out_dir: str,
    converter: str,
    htp_socs: str,
    samples: int,
    symmetric_activations: bool,
    as_json: bool,
) -> None:
    """Write the Qualcomm handoff: ONNX, AIMET encodings (0.6.1 + 1.0.0), raw inputs, convert.sh, .aimet."""
    from trtbuild.ship.qualcomm import export_qualcomm

    if samples < 1:
        raise TrtbuildError(f"--samples must be >= 1, got {samples}", "pass a positive number")
    h = export_qualcomm(
        onnx_path,
        _load_ranges(ranges),
        calib_data,
        out_dir,
        converter=converter,
        htp_socs=htp_socs,
        activation_symmetric=symmetric_activations,
        max_samples=samples,
    )
    info = {
        "folder": str(h.folder),
        "onnx": str(h.onnx),
        "encodings": str(h.encodings),
        "encodings_0.6.1": str(h.encodings_061),
        "input_list": str(h.input_list),
        "script": str(h.script),
        "aimet": str(h.aimet_folder),
        "samples": h.samples,
        "converter": h.converter,
    }
    if as_json:
        emit_json(info)
        return
    out.print(f"Qualcomm handoff ({h.converter}, {h.samples} samples): {h.folder}")
    out.print(f"with the QAIRT SDK: {h.script}   AI Hub upload: {h.aimet_folder}")


COMMANDS: list[click.Command] = [bundle, export_jetson_cmd, export_snpe_cmd]
