"""Calibration data, activation collection, range methods, Q/DQ placement, caches and encodings."""
