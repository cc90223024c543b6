"""The benchmark's two entry points run end to end in a tiny setting (no timing is asserted)."""

import json
import os
import subprocess
import sys

import pytest

from experiments import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_cpu_benchmark_runs_and_writes_json(tmp_path):
  out = tmp_path / "b.json"
  cmd = [sys.executable, "-m", "experiments.benchmark", "--models=mlp11", "--ks=1", "--repeats=1"]
  p = subprocess.run([*cmd, f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  result = json.loads(out.read_text())
  m = result["models"]["mlp11"]  # the MLP with an odd parameter count
  assert {"sgd", "sam", "nrs_k1_auto", "nrs_k1_transform", "nrs_k1_transform_sg"} <= set(m["raw"])
  assert m["checks"]["transform_sg_k1_vs_fused_sg"] > 0 and m["checks"]["sampling_share_k1"] > 0
  assert result["hessian"]["mlp_100k"]["lanczos_iters"] >= 5
  assert "| mlp11 | nrs_k1_auto | float32 |" in p.stdout


def test_both_entry_points_share_one_row_list():
  cpu = {s[0]: s for s in benchmark.row_specs("mlp", [1, 8], 128, False)}
  acc = {s[0]: s for s in benchmark.row_specs("resnet18", [1, 4], 256, True)}
  assert {"nrs_k8_loop", "nrs_k8_vmap", "nrs_k8_chunked", "nrs_k8_chunked2"} <= set(cpu)
  assert cpu["nrs_k8_chunked2"][3] == {
    "num_neighbors": 8,
    "strategy": "chunked",
    "neighbor_chunk_size": 2,
  }
  assert cpu["nrs_k1_sub4_reuse"][3]["neighbor_batch_size"] == 32 and "sam_optax_opaque" not in cpu
  assert {"sam_optax_opaque", "nrs_k4_chunked2", "sgd_f32", "nrs_k1_sub4"} <= set(acc)
  assert acc["sgd"][1] == "bfloat16" and acc["sgd_f32"][1] == "float32"
  assert acc["nrs_k1_sub4"][3]["neighbor_batch_size"] == 64
  assert not {"nrs_k1_loop", "nrs_k4_transform"} & set(acc)  # strategies at the largest K only
  cpu_resnet = {s[0] for s in benchmark.row_specs("resnet18", [1, 2], 128, False)}
  assert "nrs_k2_vmap" not in cpu_resnet and "nrs_k2_auto" in cpu_resnet  # slow on XLA:CPU


def test_summary_and_table_from_synthetic_timings():
  rows = {
    "sgd": {"seconds": 1.0, "compile_seconds": 2.0, "temp_bytes": 2**20, "dtype": "float32"},
    "sam": {"seconds": 2.0, "compile_seconds": 3.0, "temp_bytes": 2**20, "dtype": "float32"},
    "nrs_k2_auto": {
      "seconds": 3.3,
      "compile_seconds": 5.0,
      "temp_bytes": 2**21,
      "dtype": "float32",
    },
    "nrs_k2_loop": {"seconds": 3.0, "compile_seconds": 5.0, "temp_bytes": 2**21},
    "nrs_k2_vmap": {"seconds": 4.0, "compile_seconds": 5.0, "temp_bytes": 2**21},
    "nrs_k1_sub4": {"seconds": 1.8, "compile_seconds": 5.0, "temp_bytes": 2**21},
    "nrs_k2_transform_sg": {"seconds": 2.2, "compile_seconds": 5.0, "temp_bytes": 2**21},
    "nrs_k2_fused_sg": {"seconds": 2.0, "compile_seconds": 5.0, "temp_bytes": 2**21},
    "nrs_k1_sub4_reuse": {"error": "XlaRuntimeError: out of memory"},
  }
  checks = benchmark.summarize(rows, [2])
  assert rows["nrs_k2_auto"]["vs_sam"] == 1.65 and rows["sam"]["vs_sgd"] == 2.0
  assert checks["default_k2_vs_floor"] == pytest.approx(3.3 / 3.0)
  assert checks["k2_fastest_strategy"] == "loop" and checks["k2_auto_within_5pct"] is False
  assert checks["nrs_k1_sub4_vs_work"] == pytest.approx(1.8 / 1.5)
  assert checks["transform_sg_k2_vs_fused_sg"] == pytest.approx(1.1)
  table = benchmark.report({"models": {"m": {"raw": rows, "checks": checks}}})
  assert "| m | nrs_k2_auto | float32 | 3.30 | 1.65 | 2.50 | 2.0 |" in table
  assert "| m | nrs_k1_sub4_reuse |  | XlaRuntimeError: out of memory |" in table


@pytest.mark.slow  # a minute on 2 cores: make test-slow
def test_accelerator_entry_point_runs_on_cpu_with_tiny_shapes(tmp_path):
  result = benchmark.main(
    ["--accelerator", "--models=tiny", "--ks=1,2", "--repeats=1", f"--out={tmp_path}"]
  )
  (out,) = list(tmp_path.glob("benchmark_gpu_*.json"))
  assert json.loads(out.read_text())["machine"]["device"] == result["machine"]["device"]
  m = result["models"]["tiny"]
  want = {"sgd", "sam", "sam_optax_opaque", "nrs_k1_auto", "sgd_f32", "nrs_k1_auto_f32"}
  want |= {f"nrs_k2_{s}" for s in ("auto", "vmap", "loop", "chunked")}
  assert want <= set(m["raw"]), sorted(m["raw"])
  for label, r in m["raw"].items():
    assert r["seconds"] > 0 and r["images_per_second"] > 0 and r["compile_seconds"] > 0, label
  secs = {s: m["raw"][f"nrs_k2_{s}"]["seconds"] for s in ("vmap", "loop", "chunked")}
  assert m["checks"]["k2_fastest_strategy"] == min(secs, key=secs.get)
  for s, r in m["strategy_agreement"].items():
    assert r["value_rel_diff"] < 1e-4 and r["grad_rel_diff"] < 1e-4, (s, r)


@pytest.mark.slow
def test_token_level_rows_run_and_chunked_holds_less_than_the_loop():
  rows = benchmark.bench_tokens([64], k=4, batch=4, length=16, width=8, repeats=1)["V64"]
  assert set(rows) == {"ce", "loop", "vmap", "chunked"}
  assert rows["ce"]["vs_ce"] == 1.0 and all(r["seconds"] > 0 for r in rows.values())
  assert rows["chunked"]["temp_bytes"] < rows["loop"]["temp_bytes"]


@pytest.mark.slow
def test_step_profile_runs_a_study_model_and_its_parts_add_up(tmp_path):
  """experiments.step_profile on the MLP task, one timed round: every step row, and parts
  that are differences of cumulative programs (they add up to the full NRS gradient's)."""
  from experiments import step_profile

  out = step_profile.profile("mnist1d_mlp", repeats=1)
  assert out["model"] == "MLP" and out["batch_size"] == 128
  assert set(out["steps"]) == {"sgd", "sam", "looksam", "nrs", "nrs rademacher", "nrs_look"}
  assert out["steps"]["sgd"] == 1.0 and all(v > 0 for v in out["steps"].values())
  assert list(out["parts"]) == list(step_profile.PARTS)


def test_step_profile_tables_render_the_json(tmp_path):
  from experiments import result_tables

  d = {
    "tasks": {
      "mnist1d_mlp": {
        "model": "MLP",
        "batch_size": 128,
        "steps": {"sgd": 1.0, "sam": 1.7, "nrs": 2.0},
        "parts": {
          "task pass": 0.7,
          "draw": 0.3,
          "neighbour pass": 0.1,
          "divergence": 0.0,
          "backward": 0.9,
        },
      }
    }
  }
  path = tmp_path / "p.json"
  path.write_text(json.dumps(d))
  parts = result_tables.step_profile(str(path), "parts")
  assert "| MLP | 128 | 0.70 | 0.30 | 0.10 | 0.00 | 0.90 | 2.00 |" in parts
  assert "| MLP | `sgd` | 1.70 | 2.00 |" in result_tables.step_profile(str(path), "steps")
