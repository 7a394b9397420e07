"""benchmarks/sample_step.py on the CPU (slow: bf16 on 2 cores): every variant timed against diffusers
on the same weights and agreeing with it within bf16 noise; off CUDA the graphed variant captures
nothing."""
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("sample_step", REPO / "benchmarks" / "sample_step.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.slow
def test_tiny_sampling_call_is_timed_against_diffusers(tmp_path):
    r = bench.main(["--preset", "tiny", "--device", "cpu", "--size", "8", "--iters", "2", "--warmup", "1",
                    "--json", str(tmp_path / "s.json")])
    assert json.loads((tmp_path / "s.json").read_text()) == json.loads(json.dumps(r))
    assert set(r["rows"]) == {"diffusers", "ours-nchw", "ours-cl", "ours-graphs"} and r["batch"] == 2
    assert r["rows"]["diffusers"]["vs_diffusers"] == 1.0 and all(v["ms"] > 0 for v in r["rows"].values())
    assert r["graphs"] == 0 and r["max_abs_diff"]["ours-graphs_vs_ours-cl"] == 0.0
    assert max(r["max_abs_diff"].values()) <= 0.05 * max(r["prediction_scale"], 1.0)
