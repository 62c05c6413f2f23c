"""indis.export: ONNX / TensorRT export of the predictor and denoisers (not written yet)."""
