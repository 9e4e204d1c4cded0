"""Measuring decodings: prediction, fidelity, the linearized self-test, model checks, zoos, comparisons."""
