"""The benchmark script runs end to end in a tiny setting (no timing is asserted)."""

import json
import os
import subprocess
import sys

import pytest

from experiments import accelerator_benchmark
from experiments import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
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
  assert m["checks"]["k1_fused_vs_sam"] > 0
  assert result["hessian"]["mlp_100k"]["lanczos_iters"] >= 5
  assert "| mlp11 | nrs_k1_auto |" in p.stdout


def test_benchmark_summary_and_table_from_synthetic_timings():
  # The fast stand-in for the end-to-end run above: ratios and checks from known rows.
  rows = {
    "sgd": {"seconds": 1.0, "compile_seconds": 2.0, "temp_bytes": 2**20},
    "sam": {"seconds": 2.0, "compile_seconds": 3.0, "temp_bytes": 2**20},
    "nrs_k1_auto": {"seconds": 2.2, "compile_seconds": 5.0, "temp_bytes": 2**21},
    "nrs_k1_transform": {"seconds": 2.6, "compile_seconds": 5.0, "temp_bytes": 2**21},
    "sampling_k1": {"seconds": 0.2},
  }
  ratios, checks = benchmark.summarize("m", rows, [1])
  assert ratios["nrs_k1_auto"]["vs_sam"] == 1.1 and ratios["sam"]["vs_sgd"] == 2.0
  assert abs(checks["sampling_share_k1"] - 0.2 / 2.2) < 1e-12
  assert checks["default_k1_vs_floor"] == 1.1
  table = benchmark.markdown_table({"models": {"m": {"ratios": ratios, "checks": checks}}})
  assert "| m | nrs_k1_auto | 2.20 | 1.10 | 2.50 | 2.0 |" in table


@pytest.mark.slow  # a minute on 2 cores: make test-slow
def test_accelerator_benchmark_runs_on_cpu_with_tiny_shapes(tmp_path):
  result = accelerator_benchmark.main(["--model=tiny", "--k=2", "--repeats=1", f"--out={tmp_path}"])
  (out,) = list(tmp_path.glob("benchmark_gpu_*.json"))
  assert json.loads(out.read_text())["machine"]["device"] == result["machine"]["device"]
  rows = result["rows"]
  want = {"sgd", "sam", "sam_optax_opaque", "nrs_k1_auto", "sgd_f32", "nrs_k1_auto_f32"}
  want |= {"nrs_k1_sub4", "nrs_k1_sub4_reuse"}
  want |= {f"nrs_k2_{s}" for s in ("auto", "vmap", "loop", "chunked", "chunked2")}
  assert want <= set(rows), sorted(rows)
  for label, r in rows.items():
    assert r["seconds"] > 0 and r["images_per_second"] > 0 and r["compile_seconds"] > 0, label
  assert rows["sgd"]["vs_sgd"] == 1.0 and rows["sam"]["vs_sam"] == 1.0
  assert rows["sgd_f32"]["dtype"] == "float32" and rows["sgd"]["dtype"] == "bfloat16"
  secs = {s: rows[f"nrs_k2_{s}"]["seconds"] for s in ("vmap", "loop", "chunked", "chunked2")}
  fastest = min(secs, key=secs.get)
  assert result["checks"]["k2_fastest_strategy"] == fastest
  auto = rows["nrs_k2_auto"]["seconds"]
  assert result["checks"]["k2_auto_within_5pct"] is (auto <= 1.05 * secs[fastest])
  assert result["checks"]["nrs_k1_sub4_vs_work"] > 0
  for s, r in result["strategy_agreement"].items():
    assert r["value_rel_diff"] < 1e-4 and r["grad_rel_diff"] < 1e-4, (s, r)


def test_token_level_rows_run_and_chunked_holds_less_than_the_loop():
  rows = benchmark.bench_tokens([64], k=4, batch=4, length=16, width=8, repeats=1)["V64"]
  assert set(rows) == {"ce", "loop", "vmap", "chunked"}
  assert rows["ce"]["vs_ce"] == 1.0 and all(r["seconds"] > 0 for r in rows.values())
  assert rows["chunked"]["temp_bytes"] < rows["loop"]["temp_bytes"]
