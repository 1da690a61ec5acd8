"""The shell script that turns a Qualcomm handoff folder into a DLC on a machine with the Qualcomm SDK.

Flags follow the QAIRT / SNPE tool docs: `snpe-onnx-to-dlc --input_network --output_path -d NAME DIMS
--quantization_overrides`, `snpe-dlc-quant --input_dlc --input_list --output_dlc --override_params`,
`snpe-dlc-graph-prepare --input_dlc --output_dlc --htp_socs`; `qairt-converter --input_network
--output_path --quantization_overrides` and `qairt-quantizer --input_dlc --input_list --output_dlc`.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping


def _dims(shape: tuple[int, ...]) -> str:
    return ",".join(str(d) for d in shape)


def convert_script(stem: str, shapes: Mapping[str, tuple[int, ...]], converter: str, htp_socs: str) -> str:
    q = shlex.quote
    dims = " ".join(f"-d {q(name)} {_dims(shape)}" for name, shape in shapes.items())
    head = f"""#!/usr/bin/env bash
# Convert {stem}.onnx + AIMET encodings to a quantized, HTP-prepared DLC (written by trtbuild).
# Needs the Qualcomm AI Runtime SDK on PATH (source $QAIRT_SDK_ROOT/bin/envsetup.sh).
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
cd "$HERE"
HTP_SOCS="${{HTP_SOCS:-{htp_socs}}}"
# input_list.txt holds absolute paths; rewrite them for wherever this folder now lives.
sed "s#[^ =]*/raw/#$HERE/raw/#g" input_list.txt > input_list.local.txt
need() {{
  command -v "$1" >/dev/null || {{ echo "error: $1 not found; source QAIRT envsetup.sh" >&2; exit 2; }}
}}
"""
    if converter == "qairt":
        body = f"""need qairt-converter; need qairt-quantizer
qairt-converter --input_network {q(stem)}.onnx --output_path {q(stem)}.dlc {dims} \\
  --quantization_overrides {q(stem)}.encodings
# Fills in any tensor the overrides do not cover; the overridden encodings stay as given.
qairt-quantizer --input_dlc {q(stem)}.dlc --input_list input_list.local.txt --output_dlc {q(stem)}_quant.dlc
"""
    else:
        body = f"""need snpe-onnx-to-dlc; need snpe-dlc-quant; need snpe-dlc-graph-prepare
snpe-onnx-to-dlc --input_network {q(stem)}.onnx --output_path {q(stem)}.dlc {dims} \\
  --quantization_overrides {q(stem)}.encodings
snpe-dlc-quant --input_dlc {q(stem)}.dlc --input_list input_list.local.txt --output_dlc {q(stem)}_quant.dlc \\
  --override_params --use_per_channel_quantization
"""
    tail = (
        f"""snpe-dlc-graph-prepare --input_dlc {q(stem)}_quant.dlc --output_dlc {q(stem)}_htp.dlc \\
  --htp_socs "$HTP_SOCS"
echo "wrote $HERE/{stem}_htp.dlc"
"""
        if converter != "qairt"
        else f"""if command -v snpe-dlc-graph-prepare >/dev/null; then
  snpe-dlc-graph-prepare --input_dlc {q(stem)}_quant.dlc --output_dlc {q(stem)}_htp.dlc --htp_socs "$HTP_SOCS"
fi
echo "wrote $HERE/{stem}_quant.dlc"
"""
    )
    return head + body + tail
