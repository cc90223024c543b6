"""The benchmark script runs end to end in a tiny setting (no timing is asserted)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_runs_and_writes_json(tmp_path):
  out = tmp_path / "b.json"
  cmd = [
    sys.executable, "-m", "experiments.benchmark", "--models=mlp11", "--ks=1",
    "--repeats=1", f"--out={out}",
  ]  # fmt: skip
  p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  result = json.loads(out.read_text())
  m = result["models"]["mlp11"]  # the MLP with an odd parameter count
  assert {"sgd", "sam", "nrs_k1_auto", "nrs_k1_transform", "nrs_k1_transform_sg"} <= set(
    m["ratios"]
  )
  assert m["checks"]["transform_sg_k1_vs_fused_sg"] > 0
  assert m["checks"]["sampling_share_k1_in_step"] < 1
  assert m["checks"]["k1_fused_vs_sam"] > 0
  assert abs(m["checks"]["normal_transform_vs_sam"]) < 10  # present and a ratio
  assert m["checks"]["unpadded_draw_k1_vs_padded"] > 0
  assert result["hessian"]["mlp_100k"]["lanczos_iters"] >= 5
  assert "| mlp11 | nrs_k1_unpadded_draw |" in p.stdout
