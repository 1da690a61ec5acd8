"""Shipping: Jetson, Qualcomm, Triton and DeepStream handoffs, built above the planner."""
