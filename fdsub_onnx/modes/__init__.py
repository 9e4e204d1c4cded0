"""The decoding modes (weights, fds, local, deconvnet, and the Neuron Feature) and their one dispatcher."""
