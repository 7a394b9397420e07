"""benchmarks/job_e2e.py on the CPU: the steady rate from a loss.jsonl, the picture folder, the pipeline
folder load_base reads, and (slow) one tiny end-to-end run."""
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest

from adapterkit.train.data.buckets import assign_bucket, make_buckets
from adapterkit.train.data.folder import CaptionedImageFolder, DataConfig
from adapterkit.train.jobs.progress import LossLog

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("job_e2e", REPO / "benchmarks" / "job_e2e.py")
e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e)


def rows_from_durations(durations):
    """LossLog rows whose step s took durations[s - 1] seconds."""
    return [{"step": s, "loss": 0.1, "lr": 1e-4, "seconds": float(t)}
            for s, t in enumerate(np.cumsum(durations), start=1)]


def test_steady_rate_skips_the_warm_up_and_times_the_rest():
    # 40 steps: a 20 s first step, two slow captures, then 0.25 s steps (128 img/s at batch 32)
    rows = rows_from_durations([20.0, 3.0, 2.0] + [0.25] * 37)
    r = e2e.steady_rate(rows, batch=32)
    assert r["warmup_steps"] == 4                               # ceil(10% of 40), more than 3
    assert r["first_step_s"] == pytest.approx(20.0)
    assert r["warmup_step_s"] == pytest.approx([20.0, 3.0, 2.0, 0.25])
    assert r["img_s"] == pytest.approx(128.0)
    assert all(v == pytest.approx(128.0) for v in r["per_step_img_s"].values())


def test_steady_rate_percentiles_show_the_per_step_spread():
    steady = [0.25, 0.5] * 10                                    # 128 and 64 img/s alternating
    r = e2e.steady_rate(rows_from_durations([5.0] * 3 + steady), batch=32, min_warmup=3)
    assert r["warmup_steps"] == 3
    assert r["img_s"] == pytest.approx(32 * 20 / sum(steady))   # all images over all time, not mean rate
    p = r["per_step_img_s"]
    assert p["p10"] == pytest.approx(64.0) and p["p90"] == pytest.approx(128.0)
    assert p["p10"] <= p["p50"] <= p["p90"]


def test_steady_rate_refuses_a_log_too_short_or_with_gaps():
    with pytest.raises(ValueError, match="none after the warm-up"):
        e2e.steady_rate(rows_from_durations([1.0] * 3), batch=2)
    rows = rows_from_durations([1.0] * 6)
    with pytest.raises(ValueError, match="steps 1..5"):
        e2e.steady_rate(rows[:2] + rows[3:], batch=2)


def test_read_loss_log_reads_what_the_jobs_loss_log_writes(tmp_path):
    log = LossLog(tmp_path / "loss.jsonl", 0, active=True)
    for step in (1, 2, 3, 4):
        time.sleep(0.01)                                            # "seconds" has millisecond steps
        log.add(step, 0.5, 1e-4)
    rows = e2e.read_loss_log(tmp_path / "loss.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(a["seconds"] <= b["seconds"] for a, b in zip(rows, rows[1:]))
    assert e2e.steady_rate(rows, batch=2, min_warmup=1)["img_s"] > 0


def test_cache_build_is_timed_from_the_data_summary_to_the_cache_log_line():
    stamped = [(3.0, "Loading weights: 100%"), (10.0, "data: 320 of 320 image files accepted under /x"),
               (11.0, "adapterkit.train.data.cache: latent cache: images 32/320 encoded"),
               (17.5, "adapterkit.train.data.cache: latent cache /o/cache: 0 images and 0 captions cached, "
                      "320 + 321 encoded now"), (40.0, "lora:  1%")]
    assert e2e.cache_build_seconds(stamped) == pytest.approx(7.5)
    assert e2e.cache_build_seconds(stamped[:2]) is None


def test_graph_messages_are_found_behind_the_progress_bar():
    stamped = [(1.0, "CUDA graphs: on (forward and backward replayed per input shape)"),
               (9.0, "lora:   3%|▎  | 5/150 [00:09<01:02, img_s=120.1]CUDA graphs: more than 4 input shapes; "
                     "the others run without graphs"), (9.5, "lora:   4%|")]
    assert e2e.graph_lines(stamped) == [stamped[0][1], "CUDA graphs: more than 4 input shapes; the others "
                                                       "run without graphs"]


def test_the_512_px_shapes_are_five_aspect_ratios_each_its_own_bucket():
    sizes = e2e.picture_sizes(512)
    assert sizes == list(e2e.SHAPES)
    ratios = {round(w / h, 3) for w, h in sizes}
    assert len(ratios) == 5 and min(ratios) < 0.65 and max(ratios) > 1.6
    buckets = make_buckets(512, 64)
    assert [assign_bucket(s, buckets) for s in sizes] == sizes
    assert all(abs(w * h / 512**2 - 1) < 0.07 for w, h in sizes)   # all about 512 x 512 pixels


def test_picture_folder_holds_every_shape_in_turn_and_scans_clean(tmp_path):
    sizes = e2e.picture_sizes(64)
    written = e2e.write_pictures(tmp_path / "pics", 10, sizes, seed=0)
    assert written == sizes * 2
    from PIL import Image
    files = sorted((tmp_path / "pics").glob("*.jpg"))
    assert [Image.open(f).size for f in files] == written
    assert all(f.with_suffix(".txt").read_text().strip() for f in files)
    assert len({f.read_bytes() for f in files}) == len(files)
    dataset = CaptionedImageFolder.scan(DataConfig(root=str(tmp_path / "pics"), resolution=64,
                                                   min_side=min(min(s) for s in sizes)))
    assert len(dataset.records) == 10 and not dataset.report.entries
    again = e2e.write_pictures(tmp_path / "again", 10, sizes, seed=0)     # a fixed seed: the same folder
    assert again == written
    assert [f.read_bytes() for f in sorted((tmp_path / "again").glob("*.jpg"))] == \
        [f.read_bytes() for f in files]


def test_tiny_pipeline_folder_loads_with_load_base(tmp_path):
    from adapterkit.train.pipeline.base import load_base
    from adapterkit.train.pipeline.encoding import encode_text
    folder = e2e.build_pipeline(tmp_path / "base", "tiny")
    assert json.loads((folder / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    base = load_base(folder)
    assert base.max_length == 77 == base.text_encoder.config.max_position_embeddings
    assert base.latent_scale == e2e.latent_scale("tiny") == 2
    assert base.scheduler_config["beta_schedule"] == "scaled_linear"
    context = encode_text(base, ["picture 0: a red box"]).context
    assert tuple(context.shape) == (1, 77, e2e.PRESETS["tiny"].context_dim)


def test_sd15_part_configs_are_sd1s_own():
    vae, text = e2e.part_configs("sd15")
    assert vae["block_out_channels"] == [128, 256, 512, 512] and e2e.latent_scale("sd15") == 8
    assert text["hidden_size"] == e2e.PRESETS["sd15"].context_dim == 768
    assert text["num_hidden_layers"] == 12 and text["max_position_embeddings"] == 77


@pytest.mark.slow
def test_tiny_end_to_end_run_reports_every_figure(tmp_path):
    out = tmp_path / "e2e.json"
    r = e2e.main(["--preset", "tiny", "--size", "64", "--pictures", "12", "--steps", "4", "--batch", "2",
                  "--device", "cpu", "--json", str(out), "--work", str(tmp_path / "work")])
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    for key in ("job_img_s", "step_img_s", "job_vs_step", "first_step_s", "cache_build_s", "wall_s"):
        assert r[key] > 0, key
    assert r["job_vs_step"] == pytest.approx(r["job_img_s"] / r["step_img_s"])
    assert r["wall_s"] > r["first_step_s"] + r["cache_build_s"]
    assert r["pictures"] == 12 and r["steps"] == 4 and r["batch"] == 2
    assert set(r["per_step_img_s"]) == {"p10", "p50", "p90"}
    assert (tmp_path / "work" / "out" / "sd15-style.safetensors").is_file()      # the recipe's export ran


def test_warm_up_breakdown_reads_the_jobs_own_lines():
    stamped = [(4.0, "data: 320 of 320 image files accepted under /x"),
               (10.0, "adapterkit.train.data.cache: latent cache /o/cache: 0 images and 0 captions cached, "
                      "320 + 321 encoded now"),
               (12.5, "controlnet:   0%|          | 0/150"),
               (20.0, "CUDA graphs: captured input shape (8, 4, 64, 64) in 6.25 s (Triton kernels "
                      "compiled or loaded in 4.50 s of it)"),
               (29.0, "controlnet:   1%|▏ | 1/150 [00:09<...]CUDA graphs: captured input shape "
                      "(8, 4, 72, 56) in 1.50 s (Triton kernels compiled or loaded in 0.00 s of it)")]
    w = e2e.warmup_breakdown(stamped, "controlnet")
    assert w["load_s"] == 4.0 and w["cache_build_s"] == pytest.approx(6.0)
    assert w["setup_s"] == pytest.approx(2.5)
    assert [c["shape"] for c in w["captures"]] == ["(8, 4, 64, 64)", "(8, 4, 72, 56)"]
    assert w["captures_s"] == pytest.approx(7.75) and w["triton_s"] == pytest.approx(4.5)
    assert e2e.warmup_breakdown(stamped[:1], "lora")["setup_s"] is None


def test_the_controlnet_job_trains_without_accumulation_like_its_step():
    overrides = e2e.job_overrides(Path("/b"), Path("/p"), Path("/o"), 10, 8, 512, "attn-ff", 384,
                                  "controlnet")
    assert "train.grad_accum=1" in overrides and "train.batch_size=8" in overrides
    assert not any(o.startswith("lora.") for o in overrides)
    assert "lora.targets=attn-ff" in e2e.job_overrides(Path("/b"), Path("/p"), Path("/o"), 10, 32, 512,
                                                       "attn-ff", 384)
    assert e2e.RECIPES["controlnet"].is_file() and e2e.BATCH == {"lora": 32, "controlnet": 8}


@pytest.mark.slow
def test_tiny_controlnet_end_to_end_run_reports_every_figure(tmp_path):
    r = e2e.main(["--job", "controlnet", "--preset", "tiny", "--size", "64", "--pictures", "12",
                  "--steps", "4", "--batch", "2", "--device", "cpu", "--json", str(tmp_path / "e2e.json"),
                  "--work", str(tmp_path / "work")])
    for key in ("job_img_s", "step_img_s", "job_vs_step", "first_step_s", "cache_build_s", "wall_s"):
        assert r[key] > 0, key
    assert r["job"] == "controlnet" and r["step_variant"] == "ours-bf16-cn"
    assert r["warmup"]["load_s"] > 0 and r["warmup"]["setup_s"] >= 0 and r["warmup"]["captures"] == []
    assert (tmp_path / "work" / "out" / "sd15-canny" / "config.json").is_file()     # the recipe's export ran
