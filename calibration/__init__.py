"""tqc calibration: sensitivity scoring of quantization options."""
