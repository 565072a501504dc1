"""Probes along training (ijepa.trainer.probing, `monitor`) and `export: best|last`: scores at the
right checkpoint steps (tracker + CSV), a bitwise-unchanged training, the best step's encoder
exported although its checkpoint rotated away, history and best kept across a resume (also
after a crash between a new best and its checkpoint), and the parameters checked before any work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_shards, scene_splits, tiny_config

from ijepa.config import ConfigError
from ijepa.monitor import LossHistory
from ijepa.tracking import RecordingTracker
from ijepa.train_config import load_config
from ijepa.trainer import Trainer, prepare, run_pretraining
from ijepa.trainer.probing import BEST_SUBDIR, ProbeMonitor

# cheap heads on the tiny encoder (2 blocks: last-layer features)
MONITOR = {"enabled": True, "max_train": 48, "max_val": 24, "knn_k": 5,
           "probe": {"n_last": 1, "max_iter": 5, "weight_decays": [0.001]}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """16-px scenes with train / val / test splits and `cls` labels."""
    return scene_splits(tmp_path_factory.mktemp("probes") / "scenes")


def cfg(**over) -> dict:
    """12 steps, checkpoints at 4, 8, 12."""
    return tiny_config(optimisation={"total_steps": 12}, checkpoint_every=4, **over)


def scripted(monkeypatch, values: list[tuple[float, float]]) -> list[int]:
    """ProbeMonitor.score returns (knn, linear) from `values` in call order; returns the call log."""
    calls: list[int] = []

    def fake(self, encoder, device):
        assert not encoder.training  # the exported encoder, scored in eval mode
        knn, lin = values[len(calls)]
        calls.append(len(calls))
        return {"knn_top1": knn, "linear_top1": lin} if self.cfg.linear else {"knn_top1": knn}

    monkeypatch.setattr(ProbeMonitor, "score", fake)
    return calls


def test_scores_at_every_nth_checkpoint_and_the_last_and_training_bitwise_unchanged(tmp_path, shards):
    plain = run_pretraining(cfg(), shards, tmp_path / "plain")
    tracker = RecordingTracker()
    run = run_pretraining(cfg(monitor={**MONITOR, "every_checkpoints": 2}), shards, tmp_path / "mon", tracker=tracker)
    # every 2nd checkpoint (8) and the last step (12); 4 is not scored
    rows = LossHistory.read_csv(tmp_path / "mon" / "probes.csv")
    assert [int(r["step"]) for r in rows] == [8, 12]
    assert all(0.0 <= r["knn_top1"] <= 1.0 and 0.0 <= r["linear_top1"] <= 1.0 for r in rows)
    assert [s for s, _ in tracker.series("val_knn_top1")] == [8, 12]
    assert [s for s, _ in tracker.series("val_linear_top1")] == [8, 12]
    assert [v for _, v in tracker.series("val_linear_top1")] == [r["linear_top1"] for r in rows]
    p = run["probes"]
    assert p["score"] == "linear_top1" and p["scored_steps"] == [8, 12] and p["last_step"] == 12
    assert p["best_score"] == max(r["linear_top1"] for r in rows)
    # the same training: every logged loss and the exported weights bit for bit
    losses = [[r["loss"] for r in LossHistory.read_csv(Path(s["loss_csv"]))] for s in (plain, run)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    from ijepa.export import load_encoder, read_encoder_info

    wa, wb = (load_encoder(s["encoder_dir"]).state_dict() for s in (plain, run))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    info = read_encoder_info(run["encoder_dir"])["metadata"]
    assert info["export"] == "last" and info["step"] == 12 and info["monitor"]["best_step"] == p["best_step"]


def test_export_best_is_the_best_steps_encoder_after_its_checkpoint_rotated(tmp_path, shards, monkeypatch):
    # linear picks step 8; kNN alone would pick step 4
    calls = scripted(monkeypatch, [(0.9, 0.3), (0.1, 0.7), (0.2, 0.5)])
    at_step: dict[int, dict] = {}

    def keep(step, encoder):  # the target encoder's weights at each checkpoint, for the comparison
        at_step[step] = {k: v.clone() for k, v in encoder.state_dict().items()}

    run = run_pretraining(cfg(monitor=MONITOR, export="best", keep_last=1), shards, tmp_path / "run",
                          on_checkpoint=keep)
    assert len(calls) == 3 and run["exported_step"] == 8 and run["probes"]["best_step"] == 8
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt")] == ["ckpt-00000012.pt"]
    from ijepa.export import load_encoder, read_encoder_info

    exported = load_encoder(run["encoder_dir"]).state_dict()
    assert all(torch.equal(exported[k], at_step[8][k]) for k in exported)
    assert not all(torch.equal(exported[k], at_step[12][k]) for k in exported)
    meta = read_encoder_info(run["encoder_dir"])["metadata"]
    assert meta["export"] == "best" and meta["step"] == 8 and meta["monitor"]["score"] == "linear_top1"
    assert [d.name for d in (tmp_path / "run" / BEST_SUBDIR).iterdir()] == ["step-00000008"]


def test_knn_is_the_monitored_score_without_linear(tmp_path, shards, monkeypatch):
    scripted(monkeypatch, [(0.9, 0.0), (0.1, 0.0), (0.2, 0.0)])
    run = run_pretraining(cfg(monitor={**MONITOR, "linear": False}, export="best"), shards, tmp_path / "run")
    assert run["probes"]["score"] == "knn_top1" and run["exported_step"] == 4
    rows = LossHistory.read_csv(tmp_path / "run" / "probes.csv")
    assert [r["knn_top1"] for r in rows] == [0.9, 0.1, 0.2]


def test_resume_keeps_history_and_best_and_scores_each_step_once(tmp_path, shards, monkeypatch):
    calls = scripted(monkeypatch, [(0.5, 0.9), (0.5, 0.2), (0.5, 0.3)])
    c = cfg(monitor=MONITOR, export="best")

    class Stop(Exception):
        pass

    def stop(step, encoder):
        if step == 8:
            raise Stop

    with pytest.raises(Stop):  # killed after the checkpoint of step 8 (it holds the scores of 4 and 8)
        run_pretraining(c, shards, tmp_path / "run", on_checkpoint=stop)
    run = run_pretraining(c, shards, tmp_path / "run")
    assert run["resumed_from_step"] == 8 and len(calls) == 3  # 4 and 8 not scored again
    rows = LossHistory.read_csv(tmp_path / "run" / "probes.csv")
    assert [(int(r["step"]), r["linear_top1"]) for r in rows] == [(4, 0.9), (8, 0.2), (12, 0.3)]
    assert run["probes"]["best_step"] == 4 and run["exported_step"] == 4


def test_crash_between_a_new_best_and_its_checkpoint_resumes_from_the_previous_best(tmp_path, shards, monkeypatch):
    # step 8 is a new best, then its checkpoint fails: the resume point (step 4) names best step 4,
    # whose folder must still be there; step 8 is scored again and becomes the best again
    calls = scripted(monkeypatch, [(0.5, 0.2), (0.5, 0.9), (0.5, 0.9), (0.5, 0.1)])
    c = cfg(monitor=MONITOR, export="best")
    save = Trainer.save_checkpoint

    def failing(self):
        if self.step == 8:
            assert (tmp_path / "run" / BEST_SUBDIR / "step-00000004").is_dir()
            assert (tmp_path / "run" / BEST_SUBDIR / "step-00000008").is_dir()
            raise OSError("disk full")
        return save(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", failing)
    with pytest.raises(OSError):
        run_pretraining(c, shards, tmp_path / "run")
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    trainer = Trainer(prepare(c, shards), tmp_path / "run")
    trainer.build()
    assert trainer.maybe_resume() and trainer.step == 4
    assert trainer.probes.best() == {"step": 4, "score": 0.2}
    assert [d.name for d in (tmp_path / "run" / BEST_SUBDIR).iterdir()] == ["step-00000004"]
    run = run_pretraining(c, shards, tmp_path / "run")
    assert len(calls) == 4 and run["exported_step"] == 8 and run["probes"]["scored_steps"] == [4, 8, 12]


def test_a_fresh_run_drops_an_earlier_runs_probes(tmp_path, shards, monkeypatch):
    scripted(monkeypatch, [(0.1, 0.1)] * 6)
    run_pretraining(cfg(monitor=MONITOR), shards, tmp_path / "run")
    stale = tmp_path / "run" / BEST_SUBDIR / "step-00000099"
    stale.mkdir()
    for p in (tmp_path / "run" / "checkpoints").glob("*.pt"):
        p.unlink()
    run = run_pretraining(cfg(monitor=MONITOR), shards, tmp_path / "run")
    assert run["resumed_from_step"] is None and run["probes"]["scored_steps"] == [4, 8, 12]
    assert not stale.exists()


def test_best_without_monitoring_is_refused_before_any_work(tmp_path, shards):
    with pytest.raises(ConfigError, match="monitor.enabled"):
        run_pretraining(cfg(export="best"), shards, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("over, field", [
    ({"every_checkpoints": 0}, "monitor.every_checkpoints"),
    ({"knn_k": 0}, "monitor.knn_k"),
    ({"knn_temperature": 0.0}, "monitor.knn_temperature"),
    ({"max_train": 0}, "monitor.max_train"),
    ({"max_val": -1}, "monitor.max_val"),
    ({"probe": {"n_last": 3}}, "n_last"),
    ({"knn": 5}, "knn"),
])
def test_bad_monitor_parameters_are_named(over, field):
    with pytest.raises(ConfigError, match=field):
        load_config(cfg(monitor={**MONITOR, **over}))


def test_the_data_and_model_are_checked_before_any_work(tmp_path, shards):
    unlabelled = make_shards(tmp_path / "blobs", n=16)  # a train split only, no labels
    with pytest.raises(ConfigError, match="'val' split"):
        prepare(cfg(monitor=MONITOR), unlabelled)
    with pytest.raises(ConfigError, match="monitor.probe.n_last"):  # 4 layers of a 2-block encoder
        prepare(cfg(monitor={**MONITOR, "probe": {"n_last": 4}}), shards)
    prepare(cfg(monitor={"enabled": False}), unlabelled)  # off: nothing of it is needed


def test_checkpoints_from_before_monitoring_resume_with_it_off():
    from ijepa.trainer import config_differences

    current = load_config(cfg()).to_dict()
    old = {k: v for k, v in current.items() if k not in ("monitor", "export")}
    assert config_differences(old, current) == []
    on = load_config(cfg(monitor=MONITOR)).to_dict()
    assert any(d.startswith("monitor.enabled") for d in config_differences(old, on))
    assert config_differences({**current, "export": "best"}, current) == []  # export only changes the end


def test_the_probes_csv_and_report_land_where_the_stage_puts_them(tmp_path, shards, monkeypatch):
    scripted(monkeypatch, [(0.3, 0.4), (0.6, 0.5), (0.2, 0.1)])
    run = run_pretraining(cfg(monitor=MONITOR), shards, tmp_path / "run", loss_csv=tmp_path / "rep" / "loss.csv",
                          probes_csv=tmp_path / "rep" / "pretrain_probes.csv")
    assert run["probes_csv"] == str(tmp_path / "rep" / "pretrain_probes.csv")
    text = (tmp_path / "rep" / "pretrain_probes.csv").read_text().splitlines()
    assert text[0] == "step,knn_top1,linear_top1,seconds" and len(text) == 4
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["probes"]["best_step"] == 8 and summary["probes"]["last_linear_top1"] == 0.1


@pytest.mark.slow
def test_two_processes_ddp_and_fsdp_score_on_rank_0_only_and_train_the_same(tmp_path, shards):
    # torchrun, 2 CPU ranks: rank 0 scores (the FSDP one on the gathered full weights), rank 1
    # waits at the barrier; the DDP losses are those of the same run without probes
    c = cfg(nproc=2, deterministic=False)
    plain = run_pretraining(c, shards, tmp_path / "plain")
    ddp = run_pretraining({**c, "monitor": MONITOR, "export": "best"}, shards, tmp_path / "ddp")
    fsdp = run_pretraining({**c, "monitor": MONITOR, "export": "best", "distributed": "fsdp"}, shards,
                           tmp_path / "fsdp")
    losses = [[r["loss"] for r in LossHistory.read_csv(Path(s["loss_csv"]))] for s in (plain, ddp)]
    assert losses[0] == losses[1]
    for run in (ddp, fsdp):
        rows = LossHistory.read_csv(Path(run["probes_csv"]))
        assert [int(r["step"]) for r in rows] == [4, 8, 12] and run["probes"]["scored_steps"] == [4, 8, 12]
        assert run["exported_step"] == run["probes"]["best_step"]
        from ijepa.export import read_encoder_info

        assert read_encoder_info(run["encoder_dir"])["metadata"]["step"] == run["exported_step"]


def test_load_split_decodes_only_the_rows_asked_for(shards):
    from ijepa.data.reader import load_split

    images, labels = load_split(shards, "val")
    rows = [1, 5, 6, 23]
    some, some_labels = load_split(shards, "val", rows=rows)
    assert torch.equal(some, images[rows]) and torch.equal(some_labels["cls"], labels["cls"][rows])
    with pytest.raises(ValueError, match="increasing"):
        load_split(shards, "val", rows=[5, 1])
    with pytest.raises(ValueError, match="increasing"):
        load_split(shards, "val", rows=[24])


def test_the_loss_figure_gets_a_probe_panel():
    from ijepa.viz.training import plot_loss_curve

    loss = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 9)]
    probes = [{"step": 4, "knn_top1": 0.3, "linear_top1": 0.4}, {"step": 8, "knn_top1": 0.5, "linear_top1": None}]
    assert len(plot_loss_curve(loss).axes) == 2  # loss + its lr twin
    fig = plot_loss_curve(loss, probes=probes)
    panel = [ax for ax in fig.axes if ax.get_ylabel() == "val top-1"]
    assert len(panel) == 1
    assert {line.get_label(): list(line.get_ydata()) for line in panel[0].lines} == {"kNN": [0.3, 0.5],
                                                                                       "linear": [0.4]}


def test_val_probe_subsets_are_the_seeded_draw_over_the_whole_split(shards):
    from ijepa.data.reader import load_split
    from ijepa.val_probe import ValProbe

    vp = ValProbe({"n_last": 1, "seed": 3}, shards, "linear", max_train=10, max_val=5)
    for images, labels, split, cap in ((vp.train_images, vp.train_y, "train", 10), (vp.val_images, vp.val_y, "val", 5)):
        full, full_labels = load_split(shards, split)
        keep = torch.sort(torch.randperm(full.shape[0], generator=torch.Generator().manual_seed(3))[:cap]).values
        assert torch.equal(images, full[keep]) and torch.equal(labels, full_labels["cls"][keep])
