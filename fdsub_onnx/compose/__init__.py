"""Composition: the array backends, the substitution engine, the graph walker and its op rules (``ops``)."""
