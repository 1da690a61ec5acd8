"""INT4 weight-only quantization (W4A16): block-wise INT4 MatMul/Gemm weights, float activations.

``quantize_int4`` (calibrators/int4/pipeline.py) is the entry point; the weight algorithms live in
blocks.py (round-to-nearest), awq.py (activation-aware scales), gptq.py (Hessian error compensation) and
sequential.py (AWQ scales + GPTQ rounding fitted group by group to the FP32 output, the default; its
inputs from segments.py, its least-squares ridge from ridge.py, its rows picked by rows.py); budget.py
(`--weight-budget`: per-layer block sizes within a byte budget, layers weighed by output_noise.py); mixed.py
is `--precision int4-weights,int8`; graph.py writes TensorRT's weight-only pattern (INT4
DequantizeLinear with block_size feeding the MatMul).
"""

from calibrators.int4.blocks import DEFAULT_BLOCK_SIZE, BlockQuant, dequantize, quantize_blocks
from calibrators.int4.pipeline import ALGORITHMS, DEFAULT_ALGORITHM, Int4Result, quantize_int4

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "DEFAULT_BLOCK_SIZE",
    "BlockQuant",
    "Int4Result",
    "dequantize",
    "quantize_blocks",
    "quantize_int4",
]
