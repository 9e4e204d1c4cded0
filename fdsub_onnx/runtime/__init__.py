"""onnxruntime: the shared session wrapper, and the streaming top-N capture built on it."""
