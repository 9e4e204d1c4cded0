"""The ONNX graph: loading, layer lookup, pruning, and receptive-field geometry
(the one place for window arithmetic)."""
