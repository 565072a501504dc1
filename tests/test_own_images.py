"""The README's "Your own images" path end to end, as a user runs it: a folder of photos in
data/01_raw/imagefolder, then `kedro run --pipeline shard|pretrain|probe --params dataset=imagefolder`
with the base parameters (photos kept whole, 224 px, the vit_b16 preset), only the run length and
probe sizes shortened in conf/local (a few CPU steps)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, copy_project, load_benchmark

STAGES = r"""
import sys
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
bootstrap_project(sys.argv[1])
for stage in ("shard", "pretrain", "probe"):
    with KedroSession.create(project_path=sys.argv[1], runtime_params={"dataset": "imagefolder"}) as session:
        session.run(pipeline_names=[stage])
"""

LOCAL = {
    "parameters_shard.yml": {"shard": {"common": {"preview": 4}}},
    "parameters_pretrain.yml": {"pretrain": {"imagefolder": {
        "optimisation": {"batch_size": 4, "total_steps": 2, "warmup_steps": 1},
        "checkpoint_every": 2, "log_every": 1}}},
    "parameters_probe.yml": {"probe": {"imagefolder": {
        "max_iter": 5, "weight_decays": [0.001], "lowshot_per_class": 1, "lowshot_seeds": 1, "n_last": 1,
        "feature_batch_size": 8, "baselines": ["pixels"]}}},
}


@pytest.mark.slow
def test_own_photos_shard_pretrain_vit_b16_at_224_probe(tmp_path):
    project = tmp_path / "proj"
    copy_project(project)
    # photos of 300-700 px, 2 classes, where the README says to put them
    load_benchmark("photo_folder").write_photo_folder(project / "data/01_raw/imagefolder", n=24, classes=2,
                                                      min_side=300, max_side=700)
    (project / "conf/local").mkdir(parents=True, exist_ok=True)
    for name, data in LOCAL.items():
        (project / "conf/local" / name).write_text(yaml.safe_dump(data))
    env = {**os.environ, "OMP_NUM_THREADS": "2", "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
           "MPLBACKEND": "Agg", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "PYTHONDONTWRITEBYTECODE": "1"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", STAGES, str(project)], cwd=project, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    manifest = json.loads((project / "data/02_shards/imagefolder/manifest.json").read_text())
    assert manifest["image"]["storage"] == "photo" and manifest["image_size"] == 224
    assert manifest["samples"] == 24 and manifest["labels"]["cls"]["names"] == ["class_0", "class_1"]
    run = project / "data/06_models/imagefolder"
    summary = json.loads(next(run.rglob("summary.json")).read_text())
    assert summary["steps"] == 2 and summary["img_size"] == 224 and summary["grid"] == [14, 14]
    enc = json.loads(next(run.rglob("encoder.json")).read_text())
    assert enc["encoder"]["embed_dim"] == 768 and enc["encoder"]["depth"] == 12  # vit_b16
    probes = json.loads((project / "reports/imagefolder/probes.json").read_text())
    flat = json.dumps(probes)
    assert "linear" in flat and "ijepa" in flat and "pixels" in flat
