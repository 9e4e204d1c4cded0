"""tools/gpu_check.sh, the one-call GPU check (docs/gpu.md), run end to end here on the CPU with ``--smoke``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_the_gpu_check_runs_every_step_and_sums_them_up_on_a_cpu(tmp_path):
    """``--smoke`` runs the script's every step on tiny sizes with this Python: each exits 0 (the data part, whose
    baseline needs torch, is run or said to be skipped), and the summary holds each step's table."""
    script = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.sh"
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_SECONDS="400")
    done = subprocess.run(["bash", str(script), "--smoke", str(tmp_path / "out")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    for step in ("tests", "bench-vgg19", "bench-light-vgg19", "bench-resnet50"):
        assert f"{step}: exit 0 after" in summary, summary
    assert "bench-data: exit 0 after" in summary or "bench-data: skipped" in summary, summary
    assert "Traceback" not in summary and "passed" in summary, summary
    for network in ("vgg19", "light_vgg19", "resnet50"):
        assert f"│ {network} " in summary, summary
