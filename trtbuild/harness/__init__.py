"""Profiling harness: runners behind one interface, CUDA-event timing (cuda-python or pycuda), statistics,
reports and plots. The entry point is :func:`trtbuild.harness.profile.profile_models`."""

from __future__ import annotations

from typing import Any

__all__ = ["profile_models", "ProfileReport"]


def __getattr__(name: str) -> Any:  # lazy: `import trtbuild.harness` must not pull in torch/ORT
    if name == "profile_models":
        from trtbuild.harness.profile import profile_models

        return profile_models
    if name == "ProfileReport":
        from trtbuild.harness.report import ProfileReport

        return ProfileReport
    raise AttributeError(name)
