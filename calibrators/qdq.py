"""Q/DQ placement for TensorRT explicit INT8: pure data first (:func:`plan_qdq`), then :func:`apply_qdq`.

The rules (docs/qdq-placement.md): Q/DQ on the inputs of Conv/ConvTranspose/Gemm/MatMul, none on
outputs; residual Add quantizes the skip input only; Concat/pooling share one scale across inputs and output;
attention-mask paths, Softmax/LayerNorm/GELU chains, attention score MatMuls on long sequences, tiny convs,
GEMV-shaped MatMuls and box/score detection heads stay float; users exclude nodes or op types by name/regex.

Stages, one module each: :mod:`calibrators.graph_index` (lookup tables over a graph),
:mod:`calibrators.qdq_types` (options and the plan as data), :mod:`calibrators.qdq_select` (structural rules),
:mod:`calibrators.qdq_scales` (scales and bias correction), :mod:`calibrators.qdq_rewrite` (the rewrite).
This module is the public entry point and re-exports their API.
"""

from calibrators.graph_index import GraphIndex, ensure_node_names
from calibrators.qdq_rewrite import apply_qdq
from calibrators.qdq_scales import GraphCache, plan_qdq
from calibrators.qdq_select import QdqSelection, quantizable_activations, select_qdq
from calibrators.qdq_types import ACTIVATION_TYPES, ActivationQdq, Exclusion, QdqOptions, QdqPlan, WeightQdq

__all__ = [
    "ACTIVATION_TYPES",
    "ActivationQdq",
    "Exclusion",
    "GraphCache",
    "GraphIndex",
    "QdqOptions",
    "QdqPlan",
    "QdqSelection",
    "WeightQdq",
    "apply_qdq",
    "ensure_node_names",
    "plan_qdq",
    "quantizable_activations",
    "select_qdq",
]
