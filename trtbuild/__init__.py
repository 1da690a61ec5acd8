"""trtbuild: export, calibrate, quantize, build, profile and ship models for TensorRT and edge devices."""

__version__ = "0.1.0"
