"""The `fdsub` command line; installed as the subpackage ``fdsub_onnx.cli``."""
