"""`make bench` harness (benchmarks/run_all.py): a --quick smoke run of the speed sections writes
results.json in the issue's shape and a RESULTS.md table, merging into an existing file."""
from __future__ import annotations

import importlib
import json
import sys

import pytest

from conftest import BENCHMARKS as BENCH


@pytest.fixture(scope="module")
def run_all():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("run_all")
    finally:
        sys.path.remove(str(BENCH))


FAKE_QUALITY = {"fashion_mnist": {
    "budget_s": 1200.0, "seeds": 1, "quick": False, "probes": ["linear", "lowshot"], "n_last": 4,
    "ijepa": {"n_seeds": 1, "linear": 0.85, "linear_std": 0.0, "lowshot": 0.7, "lowshot_std": 0.01,
              "pretrain": [{"steps": 900, "train_s": 1190.0, "wall_s": 1230.0}]},
    "mae": {"n_seeds": 1, "linear": 0.8, "linear_std": 0.0, "lowshot": 0.6, "lowshot_std": 0.02,
            "pretrain": [{"steps": 1000, "train_s": 1195.0, "wall_s": 1228.0}]},
    "random_init": {"n_seeds": 1, "linear": 0.75, "lowshot": 0.55},
    "pixels": {"n_seeds": 1, "linear": 0.83, "lowshot": 0.77},
    "targets": {"linear": {"threshold": 0.88, "ijepa": 0.85, "above_all_baselines": True, "met": False}}}}


def test_quick_speed_run_writes_results_and_merges(run_all, tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"quality": FAKE_QUALITY}))
    res = run_all.main(["--quick", "--only", "speed", "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["quality"] == FAKE_QUALITY  # merged, not overwritten
    for key in ("cpu", "cores", "torch", "date"):
        assert saved["machine"][key]
    ts = saved["train_step"]
    for key in ("ours_img_s", "naive_img_s", "ratio", "model_gflop_s", "matmul_gflop_s", "flop_fraction",
                "peak_mem_mb"):
        assert ts[key] > 0, key
    for key in ("ours_img_s", "loop_img_s", "ratio"):
        assert saved["masks"][key] > 0, key
    ld = saved["loader"]
    assert ld["img_s"] > 0 and ld["train_consumption_img_s"] == pytest.approx(ts["ours_img_s"], rel=1e-3)
    assert ts["precision"] in ("fp32", "bf16") and ts["flop_fraction_own_precision"] > 0
    assert ld["ratio"] == pytest.approx(ld["img_s"] / ld["train_consumption_img_s"], rel=0.02)
    assert saved["shard"]["scenes_img_s"] > 0
    pf = saved["probe_fits"]
    assert pf["in_turn_s"] > 0 and pf["side_by_side_s"] > 0
    assert pf["ratio"] == pytest.approx(pf["in_turn_s"] / pf["side_by_side_s"], rel=0.05)
    assert res["gpu"].get("measured") is True or "not measured" in saved["gpu"]["note"]
    md = (tmp_path / "RESULTS.md").read_text()
    for needle in ("## Machine", "| CPU |", "torch", "train step, img/s", "mask collator", "probe fits, s", "loader",
                   "### GPU", "## Quality at equal compute", "### fashion_mnist", "| 0.8500 (n=1) | 0.7000 ± 0.0100 (n=1) |"):
        assert needle in md, needle
    if not res["gpu"].get("measured"):
        assert "not measured" in md


def test_quality_cell_shows_the_spread_only_where_there_is_one(run_all):
    two = {"n_seeds": 2, "linear": 0.86, "linear_std": 0.0042, "linear_per_seed": [0.857, 0.863]}
    assert run_all.quality_cell(two, "linear") == "0.8600 ± 0.0042 (n=2: 0.8570, 0.8630)"
    one = {"n_seeds": 1, "linear": 0.86, "linear_std": 0.0, "lowshot": 0.76, "lowshot_std": 0.004}
    assert run_all.quality_cell(one, "linear") == "0.8600 (n=1)"  # no spread over seeds to show
    assert run_all.quality_cell(one, "lowshot") == "0.7600 ± 0.0040 (n=1)"  # over label subsets
    assert run_all.quality_cell(one, "depth") == "–"


def test_only_rejects_unknown_sections(run_all):
    assert run_all.parse_only("speed") == list(run_all.SPEED)
    assert run_all.parse_only("masks,quality") == ["masks", "quality"]
    with pytest.raises(SystemExit, match="unknown section 'speeed'"):
        run_all.parse_only("speeed")


def test_repeat_median_and_spread(run_all):
    vals = iter([{"a": 1.0, "b": "x"}, {"a": 3.0, "b": "x"}, {"a": 2.0, "b": "x"}])
    out = run_all.repeat_median(lambda: next(vals), 3)
    assert out["a"] == 2.0 and out["spread"]["a"] == [1.0, 3.0] and out["b"] == "x" and out["repeats"] == 3


def test_quality_run_of_one_dataset_keeps_the_others(run_all):
    prev = {**FAKE_QUALITY, "measured_at": "2026-11-01T00:00:00", "seconds": 5.0,
            "scenes": {"quick": False, "budget_s": 1.0, "ijepa": {"count": 0.1}}}
    new = {"scenes": {"quick": False, "budget_s": 1200.0, "ijepa": {"count": 0.4}}}
    out = run_all.merge_quality(prev, new, "2026-11-24T00:00:00")
    assert out["scenes"]["ijepa"]["count"] == 0.4 and out["scenes"]["measured_at"] == "2026-11-24T00:00:00"
    assert out["fashion_mnist"]["ijepa"] == FAKE_QUALITY["fashion_mnist"]["ijepa"]
    assert out["fashion_mnist"]["measured_at"] == "2026-11-01T00:00:00"  # the old run's date, not today's
    # a quick smoke run never sits beside benchmark figures
    smoke = run_all.merge_quality(prev, {"scenes": {"quick": True, "ijepa": {"count": 0.2}}}, "d")
    assert set(smoke) == {"scenes"}


def test_step_time_sums_window_times_and_skips_start_up(run_all):
    bq = importlib.import_module("bench_quality")  # benchmarks/ is on sys.path while run_all is in use
    # windows of 10, 10 and 5 steps at batch 4: 40 images at 10 img/s, 40 at 40, 20 at 20
    rows = [{"step": "10", "img_per_s": "10.0"}, {"step": "20", "img_per_s": "40.0"},
            {"step": "25", "img_per_s": "20.0"}]
    assert bq.step_time(rows, batch=4) == (pytest.approx(4.0 + 1.0 + 1.0), 100)
    # the total rate (100 / 6 s) is not the median window rate (20 img/s)
    assert bq.step_time(rows, batch=4, skip_windows=1) == (pytest.approx(2.0), 60)
    with pytest.raises(RuntimeError, match="step 20"):
        bq.step_time([rows[0], {"step": "20", "img_per_s": ""}], batch=4)
    with pytest.raises(RuntimeError, match="no timed log windows"):
        bq.step_time(rows[:1], batch=4, skip_windows=1)
