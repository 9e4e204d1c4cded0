"""Data at the edges: image sets, atomic file writers, and the top-N instances with their file contract."""
