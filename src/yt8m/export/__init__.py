"""One artifact under a size budget: storage schemes, fused ensembles, size reports, ONNX and TorchScript export."""
