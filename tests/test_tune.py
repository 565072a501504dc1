"""Optuna mask-ratio search (ijepa.tune): tiny studies on tiny shards, MLflow parent/child
runs (and ijepa.tracking's create_run / end_run they use), pruning/failure, continued
studies, two worker processes, the apply-best hand-off, and the Pretrainer's on_checkpoint
hook it relies on."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_MASKS, TINY_MODEL, scene_splits, tiny_config

optuna = pytest.importorskip("optuna")

from ijepa import tune  # noqa: E402
from ijepa.tune import storage as tune_storage  # noqa: E402
from ijepa.config import ConfigError  # noqa: E402

SPACE = {"pred_scale_min": [0.1, 0.25], "pred_scale_span": [0.0, 0.1], "enc_scale_min": [0.75, 1.0],
         "npred": [1, 2], "pred_aspect_min": [0.75, 1.0], "pred_aspect_max": [1.0, 1.5]}
PROBE = {"max_iter": 15, "weight_decays": [1e-3, 1e-1], "lowshot_per_class": 2, "lowshot_seeds": 1,
         "feature_batch_size": 64, "probes": ["linear"], "baselines": []}
BAD_POINT = {"pred_scale_min": 1.0, "pred_scale_span": 0.0, "enc_scale_min": 0.8, "npred": 1,
             "pred_aspect_min": 1.0, "pred_aspect_max": 1.0}  # the target covers the grid: no context left


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return scene_splits(tmp_path_factory.mktemp("tune") / "scenes")


def base_pretrain() -> dict:
    cfg = tiny_config()
    cfg.pop("checkpoint_every")
    return cfg


def tune_cfg(tmp_path: Path, **over) -> dict:
    cfg = {"dataset": "scenes", "n_trials": 3, "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
           "study_name": "tiny", "pruner": "none", "seed": 1, "max_train": 48, "max_val": 24,
           "experiment": "tune-test", "enqueue_base": False,
           "trial": {"total_steps": 4, "eval_every": 2, "batch_size": 8}, "space": SPACE}
    cfg.update(over)
    return cfg


@pytest.fixture()
def mlflow_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


# ----------------------------------------------------------------------------- tracking


def test_create_run_child_of_parent_ends_with_status_and_never_activates(mlflow_uri):
    import mlflow
    from mlflow.tracking import MlflowClient

    from ijepa.tracking import MlflowTracker, create_run, end_run

    parent = create_run(tracking_uri=mlflow_uri, experiment="tracking-test", run_name="parent",
                        tags={"kedro_pipeline": "tune"})
    child = create_run(tracking_uri=mlflow_uri, parent_run_id=parent.run_id, run_name="trial-0",
                       tags={"optuna.trial": 0}, params={"trial.npred": 2, "masks": {"npred": 2}})
    assert isinstance(child, MlflowTracker) and mlflow.active_run() is None
    child.log_metrics({"val_score": 0.5}, step=2)
    end_run(child, "KILLED")
    client = MlflowClient(tracking_uri=mlflow_uri)
    c, p = client.get_run(child.run_id), client.get_run(parent.run_id)
    assert c.info.experiment_id == p.info.experiment_id
    assert client.get_experiment(p.info.experiment_id).name == "tracking-test"
    assert c.data.tags["mlflow.parentRunId"] == parent.run_id and c.data.tags["optuna.trial"] == "0"
    assert c.data.tags["mlflow.runName"] == "trial-0" and c.info.status == "KILLED"
    assert c.data.params == {"trial.npred": "2", "masks.npred": "2"} and c.data.metrics == {"val_score": 0.5}
    assert p.info.status == "RUNNING" and "mlflow.parentRunId" not in p.data.tags
    end_run(parent, "FINISHED")
    assert client.get_run(parent.run_id).info.status == "FINISHED"
    with pytest.raises(ValueError, match="status"):
        end_run(parent, "DONE")
    with pytest.raises(ValueError, match="experiment"):
        create_run(tracking_uri=mlflow_uri)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("space, needle", [
    ({"pred_scale_min": [0.3, 0.1]}, "pred_scale_min"),
    ({"enc_scale_min": [0.5, 1.2]}, "enc_scale_min"),
    ({"pred_scale_min": [0.0, 0.2]}, "pred_scale_min"),
    ({"pred_aspect_max": [2.0, 1.0]}, "pred_aspect_max"),
    ({"npred": []}, "npred"),
    ({"lr": [1e-2, 1e-4]}, "lr"),
    ({"bogus": [1, 2]}, "bogus"),
])
def test_invalid_space_rejected_before_any_trial(tmp_path, shards, space, needle):
    cfg = tune_cfg(tmp_path, space={**SPACE, **space}, mlflow=False)
    with pytest.raises(ConfigError, match=needle):
        tune.run_study(cfg, base_pretrain(), PROBE, shards, tmp_path / "work")
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "work").exists()


def test_trial_config_and_masks_from_params():
    p = {"pred_scale_min": 0.95, "pred_scale_span": 0.1, "enc_scale_min": 0.8, "npred": 2,
         "pred_aspect_min": 0.8, "pred_aspect_max": 1.2, "lr": 0.002}
    m = tune.masks_from_params(p)
    assert m == {"npred": 2, "pred_scale": [0.95, 1.0], "pred_aspect": [0.8, 1.2], "enc_scale": [0.8, 1.0]}
    cfg = tune.load_tune_config(tune_cfg(Path("/tmp")))
    out = tune.trial_pretrain_params(base_pretrain(), cfg, p)
    assert out["masks"]["min_keep"] == TINY_MASKS["min_keep"] and out["masks"]["npred"] == 2
    assert out["optimisation"]["total_steps"] == 4 and out["optimisation"]["lr"] == 0.002
    assert out["checkpoint_every"] == 2 and out["nproc"] == 1 and out["model"] == TINY_MODEL
    assert out["data"]["verify"] is False  # the study verifies the shards once, not every trial
    # the objective scores the val split at every checkpoint itself: no probes along training in trials
    assert out["monitor"] == {"enabled": False} and out["export"] == "last"


def test_a_corrupt_shard_stops_the_study_before_any_trial(tmp_path, shards):
    import shutil

    from ijepa.data import ShardError

    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    tar = sorted(bad.glob("train-*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=tar.name):
        tune.run_study({**tune_cfg(tmp_path), "mlflow": False}, base_pretrain(), PROBE, bad, tmp_path / "work")
    assert not (tmp_path / "work").exists()


# ----------------------------------------------------------------------------- the hook


def test_on_checkpoint_hook_leaves_training_unchanged_and_can_stop_it(tmp_path, shards):
    from ijepa.export import load_encoder
    from ijepa.trainer import run_pretraining

    cfg = tiny_config(optimisation={"total_steps": 6}, checkpoint_every=3)
    a = run_pretraining(cfg, shards, tmp_path / "a")
    seen = []

    def noisy(step, enc):  # consumes RNG and flips modes: must not change the run
        seen.append(step)
        torch.rand(100)
        enc.train()
        enc.eval()

    b = run_pretraining(cfg, shards, tmp_path / "b", on_checkpoint=noisy)
    assert seen == [3, 6] and a["final_loss"] == b["final_loss"]
    wa, wb = (load_encoder(s["encoder_dir"]).state_dict() for s in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    class Stop(Exception):
        pass

    def stop(step, enc):
        raise Stop(step)

    with pytest.raises(Stop):
        run_pretraining(cfg, shards, tmp_path / "c", on_checkpoint=stop)
    assert [p.name for p in (tmp_path / "c" / "checkpoints").iterdir() if p.suffix == ".pt"]
    assert not (tmp_path / "c" / "summary.json").exists()


# ----------------------------------------------------------------------------- studies


class PruneTrial(optuna.pruners.BasePruner):
    """Prunes exactly one trial number at its first report (deterministic pruning)."""

    def __init__(self, number: int):
        self.number = number

    def prune(self, study, trial) -> bool:
        return trial.number == self.number


@pytest.mark.filterwarnings("ignore:Fixed parameter:UserWarning")
def test_tiny_study_failed_and_pruned_trials_mlflow_children_and_continue(tmp_path, shards, mlflow_uri, monkeypatch):
    from mlflow.tracking import MlflowClient

    cfg = tune_cfg(tmp_path, n_trials=4)
    study = tune.open_study(tune.load_tune_config(cfg))
    study.enqueue_trial(BAD_POINT)  # trial 0 fails: the masks cannot be sampled on the 4x4 grid
    monkeypatch.setattr(tune_storage, "pruner_for", lambda c: PruneTrial(2))
    summary = tune.run_study(cfg, base_pretrain(), PROBE, shards, tmp_path / "work", tracking_uri=mlflow_uri)

    assert summary["n_trials"] == 4 and summary["trials_added"] == 3  # + the one enqueued before
    assert summary["states"] == {"FAIL": 1, "COMPLETE": 2, "PRUNED": 1}
    assert "min_keep" in summary["failed"][0]
    assert summary["best_trial"] in (1, 3) and 0.0 <= summary["best_value"] <= 1.0
    trials = optuna.load_study(study_name="tiny", storage=tune.storage_for(cfg["storage"])).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "PRUNED", "COMPLETE"]
    assert "ConfigError" in trials[0].user_attrs["fail_reason"] and trials[2].user_attrs["pruned_at_step"] == 2
    assert set(trials[1].intermediate_values) == {2, 4} and trials[1].value == trials[1].intermediate_values[4]
    assert not (tmp_path / "work" / "tiny" / "trial-00001" / "checkpoints").exists()
    assert (tmp_path / "work" / "tiny" / "trial-00001" / "encoder").is_dir()

    client = MlflowClient(tracking_uri=mlflow_uri)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["best_value"] == summary["best_value"]
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert "tune/optimization_history.png" in arts and "tune/best_trial.json" in arts
    assert "tune/param_importances.png" in arts or "plot.param_importances" in parent.data.tags
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_trial = {int(r.data.tags["optuna.trial"]): r for r in children}
    assert sorted(by_trial) == [0, 1, 2, 3]
    states = {n: (r.data.tags["trial_state"], r.info.status) for n, r in by_trial.items()}
    assert states == {0: ("FAIL", "FAILED"), 1: ("COMPLETE", "FINISHED"), 2: ("PRUNED", "KILLED"),
                      3: ("COMPLETE", "FINISHED")}
    assert "min_keep" in by_trial[0].data.tags["fail_reason"]
    done = by_trial[1]
    assert done.data.params["trial.npred"] in ("1", "2") and done.data.params["masks.min_keep"] == "3"
    assert done.data.metrics["objective"] == trials[1].value
    hist = client.get_metric_history(done.info.run_id, "val_score")
    assert [m.step for m in hist] == [2, 4] and "loss" in done.data.metrics

    # a second invocation continues the same study (no MLflow this time)
    monkeypatch.setattr(tune_storage, "pruner_for", lambda c: optuna.pruners.NopPruner())
    again = tune.run_study({**cfg, "n_trials": 1, "mlflow": False}, base_pretrain(), PROBE, shards, tmp_path / "work")
    assert again["n_trials"] == 5 and again["trials_added"] == 1 and again["parent_run_id"] is None


@pytest.mark.slow
def test_two_worker_processes_share_one_storage(tmp_path, shards, mlflow_uri):
    from mlflow.tracking import MlflowClient

    cfg = tune_cfg(tmp_path, n_trials=4, workers=2, enqueue_base=True,
                   space={**SPACE, "pred_scale_min": [0.1, 0.2], "enc_scale_min": [0.8, 1.0]})
    base = base_pretrain()
    base["masks"] = {**TINY_MASKS, "npred": 2, "pred_scale": [0.15, 0.2], "pred_aspect": [0.75, 1.5]}
    summary = tune.run_study(cfg, base, PROBE, shards, tmp_path / "work", tracking_uri=mlflow_uri)
    trials = optuna.load_study(study_name="tiny", storage=tune.storage_for(cfg["storage"])).trials
    assert len(trials) == 4 and summary["trials_added"] == 4
    assert sorted(t.number for t in trials) == [0, 1, 2, 3] and len({t._trial_id for t in trials}) == 4
    assert all(t.state.name == "COMPLETE" for t in trials), [(t.state, t.user_attrs) for t in trials]
    assert sum(t.user_attrs.get("enqueued") == "base masks" for t in trials) == 1
    assert sorted(p.name for p in (tmp_path / "work" / "tiny").glob("trial-*")) == [
        f"trial-{i:05d}" for i in range(4)]
    client = MlflowClient(tracking_uri=mlflow_uri)
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == [0, 1, 2, 3]


def test_sqlite_storage_takes_the_write_lock_when_a_transaction_begins(tmp_path):
    """Two workers popping the same enqueued trial (optuna#4002) need the read-check-write of
    its state to be atomic: while one worker's transaction is open, another cannot start one."""
    import sqlite3

    db = tmp_path / "optuna.db"
    storage = tune.storage_for(f"sqlite:///{db}")
    study = optuna.create_study(storage=storage, study_name="lock")
    study.enqueue_trial({"x": 1.0})
    with storage.engine.connect() as conn, conn.begin():
        conn.exec_driver_sql("SELECT 1")
        other = sqlite3.connect(db, timeout=0, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.close()
    # once it ends, a second storage (another worker) pops the waiting trial, and the first finds none
    second = optuna.load_study(study_name="lock", storage=tune.storage_for(f"sqlite:///{db}"))
    assert second._pop_waiting_trial_id() is not None
    assert study._pop_waiting_trial_id() is None


# ----------------------------------------------------------------------------- hand-off


def test_apply_best_writes_atomically_and_pretrain_params_pick_it_up(tmp_path, monkeypatch):
    from ijepa.train_config import PretrainConfig
    from ijepa.config import from_mapping

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = tune.open_study(tune.load_tune_config({"dataset": "fashion_mnist", "storage": storage}))
    dists = {"pred_scale_min": optuna.distributions.FloatDistribution(0.1, 0.3),
             "pred_scale_span": optuna.distributions.FloatDistribution(0.0, 0.1),
             "enc_scale_min": optuna.distributions.FloatDistribution(0.6, 1.0),
             "npred": optuna.distributions.CategoricalDistribution([1, 2, 4]),
             "pred_aspect_min": optuna.distributions.FloatDistribution(0.5, 1.0),
             "pred_aspect_max": optuna.distributions.FloatDistribution(1.0, 2.0)}
    for value, p in [(0.5, {"pred_scale_min": 0.2, "pred_scale_span": 0.1, "enc_scale_min": 0.9, "npred": 2,
                            "pred_aspect_min": 0.8, "pred_aspect_max": 1.4}),
                     (0.7, {"pred_scale_min": 0.15, "pred_scale_span": 0.05, "enc_scale_min": 0.85, "npred": 4,
                            "pred_aspect_min": 0.75, "pred_aspect_max": 1.5})]:
        study.add_trial(optuna.trial.create_trial(params=p, distributions=dists, value=value,
                                                  user_attrs={"masks": tune.masks_from_params(p)}))
    repo_file = Path(__file__).resolve().parents[1] / "conf" / "base" / "parameters_tuned.yml"
    pfile = tmp_path / "parameters_tuned.yml"
    original = repo_file.read_text() if repo_file.exists() else "# header\ntuned_masks:\n  scenes: {}\n"
    pfile.write_text(original.replace("scenes: {}", "scenes: {npred: 1}"))

    # a failure while writing leaves the file as it was
    def boom(*a, **k):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(yaml, "safe_dump", boom)
        with pytest.raises(OSError):
            tune.apply_best("fashion_mnist", storage, params_file=pfile)
    assert pfile.read_text() == original.replace("scenes: {}", "scenes: {npred: 1}")

    assert tune.main(["apply-best", "--dataset", "fashion_mnist", "--storage", storage,
                      "--params-file", str(pfile), "--conf"]) == 0
    text = pfile.read_text()
    header = [ln for ln in original.splitlines() if ln.startswith("#")]
    assert text.splitlines()[:len(header)] == header
    doc = yaml.safe_load(text)
    expect = {"npred": 4, "pred_scale": [0.15, 0.2], "pred_aspect": [0.75, 1.5], "enc_scale": [0.85, 1.0]}
    assert doc["tuned_masks"]["fashion_mnist"] == expect and doc["tuned_masks"]["scenes"] == {"npred": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".parameters_tuned")]

    from ijepa.params import pretrain_mapping

    section = {"common": {"masks": {"npred": 3, "min_keep": 10}}, "fashion_mnist": {"model": {"patch_size": 4}}}
    params = pretrain_mapping({"pretrain": section, "tuned_masks": doc["tuned_masks"]}, "fashion_mnist")
    assert params["masks"] == {**expect, "min_keep": 10}
    assert from_mapping(PretrainConfig, params, "pretrain").masks.npred == 4

    with pytest.raises(ValueError, match="no study"):
        tune.apply_best("scenes", storage, params_file=pfile)
