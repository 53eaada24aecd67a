"""The model benchmark in its quickest mode: result structure and FLOP counts (no timing checks)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` is not an installed package

from bench.bench_model import (QUICK, TABLE_COLUMNS, build_model, gflops_per_face, main,  # noqa: E402
                               parse_spec, render)


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    """`python -m bench.bench_model --quick --out ...` (b0@96, batches 1 and 2, one repetition)."""
    out = tmp_path_factory.mktemp("bench") / "results.json"
    assert main(["--quick", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_quick_run_structure(result: dict) -> None:
    assert result["settings"]["configs"] == list(QUICK["configs"]) == ["b0@96"]
    assert result["settings"]["batches"] == [1, 2] and result["settings"]["repeats"] == 1
    machine = result["machine"]
    assert machine["nproc"] >= 1 and machine["cpu_model"] and machine["torch"] and machine["onnxruntime"]
    roof = result["roofline"]
    assert roof["torch_sgemm_gflops"] == max(roof["before"]["torch_sgemm_gflops"],
                                             roof["after"]["torch_sgemm_gflops"]) > 0
    assert roof["numpy_sgemm_gflops"] > 0
    assert roof["sgemm_gflops"] == max(roof["torch_sgemm_gflops"], roof["numpy_sgemm_gflops"])
    (model,) = result["models"]
    assert model["backbone"] == "efficientnet_b0" and model["input_size"] == 96
    # Both backends run the same network: their logits agree.
    assert model["max_abs_logit_diff"] < 1e-3
    assert [b["batch"] for b in model["batches"]] == [1, 2]
    for b in model["batches"]:
        for backend in ("torch", "onnxruntime"):
            t = b[backend]
            assert t["runs"] == len(t["seconds"]) == 1
            assert 0 < t["min_s"] <= t["median_s"]


def test_derived_rows_are_consistent(result: dict) -> None:
    roof = result["roofline"]["sgemm_gflops"]
    rows = result["rows"]
    assert [(r["config"], r["batch"]) for r in rows] == [("b0@96", 1), ("b0@96", 2)]
    for row in rows:
        assert math.isclose(row["speedup"], row["torch_median_s"] / row["ort_median_s"])
        for key in ("torch", "ort"):
            fps = row["batch"] / row[f"{key}_median_s"]
            assert math.isclose(row[f"{key}_faces_per_s"], fps)
            assert math.isclose(row[f"{key}_roofline_fraction"], fps * row["gflops_per_face"] / roof)
        calls = next(b for b in result["models"][0]["batches"] if b["batch"] == row["batch"])
        fps = calls["cores"] * row["batch"] / calls["ort_calls_per_core"]["median_s"]
        assert math.isclose(row["ort_calls_faces_per_s"], fps)
        assert math.isclose(row["ort_calls_roofline_fraction"], fps * row["gflops_per_face"] / roof)
    table = render(result)
    assert table.count("| b0@96 |") == 2
    assert all(header in table for _, header in TABLE_COLUMNS)


def test_flop_count_is_plausible(result: dict) -> None:
    # Two EfficientNet-B0 streams (0.78 GFLOPs each at 224 px) plus the DCT input and the heads.
    gflops_224 = gflops_per_face(build_model(parse_spec("b0@224"), calibration_batch=1))
    assert 1.0 < gflops_224 < 3.0
    # Convolution FLOPs scale with the pixel count.
    gflops_96 = result["models"][0]["gflops_per_face"]
    assert gflops_96 == pytest.approx(gflops_224 * (96 / 224) ** 2, rel=0.05)


def test_bad_specs_are_rejected() -> None:
    assert parse_spec("efficientnet_b4@320").backbone == "efficientnet_b4"
    assert parse_spec("lite0@224").backbone == "tf_efficientnet_lite0"  # the shipped model's
    assert parse_spec("lite0@224+median").input_median and not parse_spec("lite0@224").input_median
    with pytest.raises(ValueError, match="bad model spec"):
        parse_spec("resnet50@224")
    with pytest.raises(ValueError, match="multiple of 32"):
        parse_spec("b0@100")
    with pytest.raises(ValueError, match="batch sizes"):
        main(["--quick", "--batches", "0"])


def test_stream_memory_bench_reports_every_variant(tmp_path) -> None:
    """bench_stream_memory runs each variant in its own process and derives per-stream memory."""
    from bench.bench_stream_memory import main as memory_main
    out = tmp_path / "mem.json"
    memory_main(["--resolution", "320x240", "--streams", "1,3", "--seconds", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["stage"], r["streams"], r["detections_at_once"]) for r in rows] == [
        ("decode", 1, "-"), ("decode", 3, "-"), ("decode", 1, "-"), ("decode", 3, "-"),
        ("decode+detect", 1, "unbounded"), ("decode+detect", 3, "unbounded"),
        ("decode+detect", 1, "unbounded"), ("decode+detect", 3, "unbounded"),
        ("decode+detect", 3, 2)]
    for r in rows:
        assert r["frames_sampled"] == 4 * r["streams"]  # 2 s at 2 frames/s per stream
        assert r["peak_mb"] >= r["base_mb"] > 50
        assert math.isclose(r["per_stream_mb"], (r["peak_mb"] - r["base_mb"]) / r["streams"])
    assert {r["malloc"] for r in rows} == {"glibc default", "mmap >= 1024 KiB"}


def test_median_bench_compares_both_filters_on_the_models_own_shapes(tmp_path) -> None:
    """`python -m bench.bench_median --quick`: every tensor the model filters, both medians, and
    the whole model exported once per median with the same logits."""
    from bench.bench_median import main as median_main

    out = tmp_path / "median.json"
    assert median_main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    # The input prefilter, then noise enhancement of both streams at stages 0 and 1.
    assert [r["shape"] for r in result["layers"]] == [
        "2x3x64x64", "2x16x32x32", "2x16x32x32", "2x24x16x16", "2x24x16x16"]
    for row in result["layers"]:
        for k in ("eager", "ort"):
            assert row[f"{k}_speedup"] == pytest.approx(row[f"{k}_old_ms"] / row[f"{k}_new_ms"])
    whole = result["model_onnxruntime"]
    assert whole["max_abs_logit_diff"] < 1e-5 and whole["batch"] == 2
    assert whole["speedup"] == pytest.approx(whole["new_faces_per_s"] / whole["old_faces_per_s"])
    train = result["train_step_eager"]
    assert train["speedup"] == pytest.approx(train["old_s"] / train["new_s"]) and train["new_s"] > 0


def test_calls_per_core_run_at_once_and_are_all_counted() -> None:
    import threading

    from bench.common import time_calls_per_core
    cores = 3
    barrier = threading.Barrier(cores, timeout=10)  # breaks unless `cores` calls run at once
    calls = []

    def call() -> None:
        barrier.wait()
        calls.append(threading.get_ident())

    timing = time_calls_per_core(call, cores, warmup=1, repeats=2, settle_s=0.0)
    assert timing.runs == 2 and len(timing.seconds) == 2
    assert len(calls) == cores * (1 + 2)
    assert len(set(calls)) == cores
    with pytest.raises(ValueError):
        time_calls_per_core(call, 0)
