"""From the command line, on a copy of the project: `ijepa import` a timm I-JEPA ViT, probe it with
`kedro run --pipeline probe` on 28-px grey Fashion-MNIST-format shards (the encoder takes 56-px
RGB: resized and replicated, recorded in probes.json and the run's tags); a `kedro run --pipeline
pretrain` logs its exported encoder to MLflow, loaded back with the README's one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import copy_project, fake_fashion_mnist, grey_shards

pytestmark = pytest.mark.slow
timm = pytest.importorskip("timm")
BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path) -> str:
    env = dict(os.environ, KEDRO_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1", MPLBACKEND="Agg",
               MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false", PYTHONDONTWRITEBYTECODE="1")
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout + proc.stderr


def _edit(path: Path, fn) -> None:
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The tracked project files, tiny probe and pretrain parameters, grey shards of fashion_mnist."""
    root = tmp_path_factory.mktemp("proj")
    copy_project(root)

    def probe(p):
        p["probe"]["common"].update(max_iter=5, weight_decays=[0.001], lowshot_per_class=2, lowshot_seeds=1,
                                    feature_batch_size=64, n_last=1)

    def pretrain(p):
        c = p["pretrain"]["common"]
        c["model"] = {"preset": "tiny", "encoder": {"embed_dim": 32, "depth": 2, "num_heads": 2},
                      "predictor": {"embed_dim": 16, "depth": 1, "num_heads": 2}}
        c["masks"]["min_keep"] = 4
        c.update(checkpoint_every=2, log_every=1, threads=1)
        c["monitor"]["probe"] = {"n_last": 1, "max_iter": 5, "weight_decays": [0.001]}  # 2 blocks: last layer
        p["pretrain"]["fashion_mnist"]["optimisation"] = {"batch_size": 8, "total_steps": 2, "warmup_steps": 1}

    _edit(root / "conf/base/parameters_probe.yml", probe)
    _edit(root / "conf/base/parameters_pretrain.yml", pretrain)
    grey_shards(root / "data/02_shards/fashion_mnist", fake_fashion_mnist(tmp_path_factory.mktemp("idx")))
    return root


def test_imported_encoder_through_the_probe_pipeline(project):
    from safetensors.torch import save_file

    from ijepa.hashing import file_sha256

    torch.manual_seed(0)
    vit = timm.create_model("vit_huge_patch14_gap_224", pretrained=False, num_classes=0, img_size=56,
                            embed_dim=64, depth=2, num_heads=4)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(project / "vit.safetensors"))
    _run([str(BIN / "ijepa"), "import", "vit.safetensors", "models/vit", "--num-heads", "4"], project)
    _run(["kedro", "run", "--pipeline", "probe", "--params", "dataset=fashion_mnist,probe.encoder_path=models/vit"],
         project)

    probes = json.loads((project / "reports/fashion_mnist/probes.json").read_text())
    assert probes["encoder_sha256"] == file_sha256(project / "models/vit/encoder.safetensors")
    assert probes["input_adaptation"]["from"] == [1, 28, 28] and probes["input_adaptation"]["to"] == [3, 56, 56]
    assert {"ijepa", "random_init", "pixels"} <= set(probes["probes"]["linear"])

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("fashion_mnist").experiment_id])[0]
    tags = run.data.tags
    assert tags["input.encoder_source.format"] == "timm"
    assert tags["input.encoder_source.sha256"] == file_sha256(project / "vit.safetensors")
    assert tags["input.adaptation"].startswith("[1, 28, 28] -> [3, 56, 56]")


def test_pretrain_run_logs_the_encoder_and_the_readme_line_loads_it(project, monkeypatch):
    _run(["kedro", "run", "--pipeline", "pretrain", "--params", "dataset=fashion_mnist"], project)
    import mlflow

    import ijepa

    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("fashion_mnist").experiment_id],
                              filter_string="tags.dvc_stage = 'pretrain@fashion_mnist'")
    run_id = runs[0].info.run_id
    assert {a.path for a in client.list_artifacts(run_id, "encoder")} == {"encoder/encoder.json",
                                                                          "encoder/encoder.safetensors"}
    monkeypatch.chdir(project)  # the run's artifact root is relative to the project
    encoder = ijepa.load_encoder(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="encoder",
                                                                     tracking_uri=uri))
    assert encoder.cfg.embed_dim == 32 and encoder.cfg.in_chans == 1
