"""PyTorch to ONNX export, graph preparation, and the Jetson and Qualcomm handoffs."""
