"""Fake INT8 quantization for training, matching the Q/DQ graph that calibrators/qdq.py writes.

Activations: per-tensor symmetric int8 with a learned LSQ step size (Esser et al., "Learned Step Size
Quantization"), one step shared by every module reading the same ONNX tensor, so the learned amax
(step * 127) becomes that tensor's range. Weights: per-output-channel symmetric int8 with scale
max|w| / 127 -- exactly what plan_qdq computes from the exported weights, so what is trained is what ships
(a BatchNorm folded into the Conv later scales whole channels, which commutes with per-channel rounding).
Rounding passes gradients straight through (STE).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

QMAX = 127
_MIN_STEP = 1e-8


def _scale_grad(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass, gradient multiplied by ``g`` (LSQ's step-size gradient scale)."""
    return (x - x * g).detach() + x * g


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (torch.round(x) - x).detach() + x


def fake_quant_activation(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """round(x / step) saturated to [-128, 127], times step; LSQ gradients for ``step``. The scale is
    amax / 127, but QuantizeLinear (ONNX Runtime, TensorRT) saturates int8 at -128: a clipped negative
    value dequantizes to -128 steps, and clipping it at -127 made the student differ from the Q/DQ graph
    (MiniLM-L6 layer 0's attention context: 1 - cosine 5e-5 -> 5e-4 against it)."""
    g = 1.0 / math.sqrt(max(x[0].numel(), 1) * QMAX)
    s = _scale_grad(step.abs().clamp_min(_MIN_STEP), g)
    return _round_ste(torch.clamp(x / s, -QMAX - 1, QMAX)) * s


def weight_axis(module: nn.Module) -> int:
    """The output-channel axis of a module's weight (ConvTranspose keeps it in axis 1)."""
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


def fake_quant_weight(w: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Per-channel symmetric int8 with scale max|w| / 127 per output channel (zero channels stay zero)."""
    reduce = [d for d in range(w.ndim) if d != axis]
    amax = w.detach().abs().amax(dim=reduce, keepdim=True) if reduce else w.detach().abs()
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    return _round_ste(torch.clamp(w / scale, -QMAX, QMAX)) * scale


class ActivationQuantizer(nn.Module):
    """One learned step for one ONNX activation tensor (its name is kept for writing the range back)."""

    def __init__(self, tensor: str, amax: float) -> None:
        super().__init__()
        self.tensor = tensor
        self.step = nn.Parameter(torch.tensor(max(float(amax), QMAX * _MIN_STEP) / QMAX))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_activation(x, self.step)

    @property
    def amax(self) -> float:
        return float(self.step.detach().abs().clamp_min(_MIN_STEP)) * QMAX


class QuantHooks:
    """Forward hooks that fake-quantize module inputs and weights; ``remove`` restores the plain model."""

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._installers: list[Callable[[], list[Any]]] = []  # to re-install after ``paused``

    def _install(self, installer: Callable[[], list[Any]]) -> None:
        self._installers.append(installer)
        self._handles.extend(installer())

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The plain model inside the block (e.g. to export its FP32 weights mid-training); the same
        hooks, in the same order, after it."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        try:
            yield
        finally:
            for installer in self._installers:
                self._handles.extend(installer())

    def quantize_input(
        self, module: nn.Module, quantizer: ActivationQuantizer, smooth: torch.Tensor | None = None
    ) -> None:
        """Fake-quantize the module's input; with a SmoothQuant ``smooth`` (s per input channel), x / s
        -- pair it with ``quantize_weight(..., smooth=s)`` so the module computes (x / s) (W diag(s))^T."""

        divisor = None if smooth is None else smooth.float()

        def hook(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0] if divisor is None else args[0] / divisor
            return (quantizer(x), *args[1:])

        self._install(lambda: [module.register_forward_pre_hook(hook)])

    def quantize_output(self, module: nn.Module, quantizer: ActivationQuantizer) -> None:
        """Fake-quantize what ``module`` returns (a tensor every later reader then sees quantized)."""

        def hook(_: nn.Module, __: tuple[Any, ...], out: Any) -> Any:
            return quantizer(out)

        self._install(lambda: [module.register_forward_hook(hook)])

    def quantize_weight(
        self, module: nn.Module, mask: torch.Tensor | None = None, smooth: torch.Tensor | None = None
    ) -> None:
        """Swap in the fake-quantized (and, with ``mask``, 2:4-pruned) weight for each forward call;
        ``smooth``: SmoothQuant's s per input channel (axis 1), multiplied in before quantizing."""
        axis = weight_axis(module)
        if smooth is None:
            transform: Callable[[torch.Tensor], torch.Tensor] = lambda w: fake_quant_weight(w, axis)  # noqa: E731
        else:
            # In float64, rounded once to float32: the same weights smooth_groups.apply writes.
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            s = smooth.double().reshape(1, -1, *([1] * (weight.dim() - 2)))
            transform = lambda w: fake_quant_weight((w.double() * s).to(w.dtype), axis)  # noqa: E731
        swap = _WeightSwap(module, transform, mask)
        self._install(lambda: [swap.install()])

    def mask_weight(self, module: nn.Module, mask: torch.Tensor) -> None:
        """Keep a pruned weight pruned in every forward call (FP32 recovery training without quantization)."""
        swap = _WeightSwap(module, lambda w: w, mask)
        self._install(lambda: [swap.install()])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._installers.clear()


class _WeightSwap:
    """Pre-hook computes the effective weight from the trained parameter; post-hook restores the parameter."""

    def __init__(
        self, module: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor], mask: torch.Tensor | None
    ) -> None:
        self.module, self.transform, self.mask = module, transform, mask
        self.param: nn.Parameter = module.weight  # type: ignore[assignment]
        self._handles: list[Any] = []

    def install(self) -> _WeightSwap:
        self._handles = [
            self.module.register_forward_pre_hook(self._before),
            self.module.register_forward_hook(self._after),
        ]
        return self

    def _before(self, module: nn.Module, _: tuple[Any, ...]) -> None:
        w = self.param if self.mask is None else self.param * self.mask
        del module._parameters["weight"]
        module.weight = self.transform(w)  # a plain tensor attribute for this call only

    def _after(self, module: nn.Module, _: tuple[Any, ...], __: Any) -> None:
        del module.weight
        module._parameters["weight"] = self.param

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
