"""Where a model comes from: `module:attribute` (factory or nn.Module), a TorchScript file, or an ONNX file.

Every failure here is the user's input (a typo, a missing file, weights for another model), so each one
becomes a one-line TrtbuildError naming the problem and what to do.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from trtbuild.core.errors import TrtbuildError

SourceKind = Literal["python", "torchscript", "onnx"]
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")


@dataclass(frozen=True)
class ModelSource:
    """A parsed model source. ``name`` is a short identifier used for default output paths."""

    kind: SourceKind
    spec: str
    name: str


def resolve_source(spec: str) -> ModelSource:
    """Classify ``spec``: an ``.onnx`` file, a TorchScript file, or ``module:attribute``."""
    path = Path(spec)
    if spec.lower().endswith(".onnx"):
        if not path.is_file():
            raise TrtbuildError(f"ONNX file '{spec}' does not exist", "check the path")
        return ModelSource("onnx", str(path), path.stem)
    if path.suffix.lower() in TORCHSCRIPT_SUFFIXES and ":" not in spec:
        if not path.is_file():
            raise TrtbuildError(f"TorchScript file '{spec}' does not exist", "check the path")
        return ModelSource("torchscript", str(path), path.stem)
    module, sep, attribute = spec.rpartition(":")
    if not sep or not module or not attribute.isidentifier():
        raise TrtbuildError(
            f"cannot understand model source '{spec}'",
            "give module:attribute (e.g. trtbuild.examples:efficientnet_lite0), path/to/file.py:attribute, "
            "a TorchScript .pt file or an .onnx file",
        )
    return ModelSource("python", spec, attribute)


def load_torch_model(source: ModelSource, weights: str | os.PathLike[str] | None = None) -> Any:
    """Build the torch.nn.Module named by ``source`` (eval mode), optionally loading a state dict."""
    import torch

    if source.kind == "onnx":
        raise TrtbuildError(f"'{source.spec}' is already ONNX", "use `trtbuild prepare` for ONNX files")
    model = _load_torchscript(source.spec) if source.kind == "torchscript" else _load_python(source.spec)
    if not isinstance(model, torch.nn.Module):
        raise TrtbuildError(
            f"'{source.spec}' gave a {type(model).__name__}, not a torch.nn.Module",
            "point at an nn.Module instance, an nn.Module class, or a function that returns one",
        )
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def _load_python(spec: str) -> Any:
    module_name, _, attribute = spec.rpartition(":")
    module = _import(module_name)
    if not hasattr(module, attribute):
        raise TrtbuildError(
            f"module '{module_name}' has no attribute '{attribute}'",
            f"check the name after ':' ({_candidates(module, attribute)})",
        )
    target = getattr(module, attribute)
    import torch

    if isinstance(target, torch.nn.Module):
        return target
    if not callable(target):
        raise TrtbuildError(
            f"'{spec}' is a {type(target).__name__}, not a model or factory",
            "point at an nn.Module or a function/class that builds one",
        )
    if _required_params(target):
        raise TrtbuildError(
            f"'{spec}' needs arguments ({', '.join(_required_params(target))}) to build the model",
            "write a small factory function with no required arguments and point at it",
        )
    try:
        return target()
    except TrtbuildError:
        raise
    except Exception as exc:
        raise TrtbuildError(
            f"building the model with {spec}() failed: {type(exc).__name__}: {_first_line(exc)}",
            "fix the factory or run with --debug for the traceback",
        ) from exc


def _candidates(module: Any, attribute: str) -> str:
    """Likely intended names: close matches first, then the functions and classes the module defines."""
    defined = [
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and callable(v) and getattr(v, "__module__", None) == module.__name__
    ]
    close = difflib.get_close_matches(attribute, defined, n=3)
    names = close or defined[:8]
    return (
        f"did you mean {', '.join(names)}?"
        if close
        else f"it defines: {', '.join(names) or 'nothing callable'}"
    )


def _import(module_name: str) -> Any:
    """Import a dotted module name, or a ``.py`` file path."""
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise TrtbuildError(f"Python file '{module_name}' does not exist", "check the path")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise TrtbuildError(f"cannot import '{module_name}'", "give a readable .py file")
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(path.stem, module)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise TrtbuildError(
                f"importing '{module_name}' failed: {type(exc).__name__}: {_first_line(exc)}",
                "fix the file or run with --debug for the traceback",
            ) from exc
        return module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise TrtbuildError(
            f"cannot import module '{module_name}' ({_first_line(exc)})",
            "check the spelling, install the package, or run from the folder that contains it",
        ) from exc
    except Exception as exc:
        raise TrtbuildError(
            f"importing '{module_name}' failed: {type(exc).__name__}: {_first_line(exc)}",
            "fix the module or run with --debug for the traceback",
        ) from exc


def _required_params(target: Any) -> list[str]:
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in signature.parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def _load_torchscript(path: str) -> Any:
    import torch

    try:
        return torch.jit.load(path, map_location="cpu")
    except Exception as exc:
        raise TrtbuildError(
            f"'{path}' is not a loadable TorchScript file ({type(exc).__name__}: {_first_line(exc)})",
            "save it with torch.jit.script/trace + torch.jit.save, or use module:attribute with --weights",
        ) from exc


def load_weights(model: Any, weights: str | os.PathLike[str]) -> None:
    """Load a state dict into ``model``; on any key or shape mismatch name a few of them and stop."""
    import torch

    path = Path(weights)
    if not path.is_file():
        raise TrtbuildError(f"weights file '{weights}' does not exist", "check the --weights path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrtbuildError(
            f"cannot read weights '{weights}' ({type(exc).__name__}: {_first_line(exc)})",
            "give a state dict saved with torch.save(model.state_dict(), path)",
        ) from exc
    state = _unwrap_state_dict(state, str(weights))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} with wrong shape (e.g. {'; '.join(wrong_shape[:3])})")
    if problems:
        raise TrtbuildError(
            f"weights '{weights}' do not match the model: keys {', '.join(problems)}",
            "pass the weights saved from this exact model architecture",
        )
    model.load_state_dict(state, strict=True)


def _unwrap_state_dict(state: Any, label: str) -> dict[str, Any]:
    """Accept a bare state dict, the common checkpoint wrappers, and DataParallel's 'module.' prefix."""
    import torch

    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TrtbuildError(
            f"weights '{label}' are not a state dict of tensors",
            "save them with torch.save(model.state_dict(), path)",
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
