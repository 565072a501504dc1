"""The hand-off of a study's winner to `dvc repro`: its masks written to
conf/base/parameters_tuned.yml under `tuned_masks.<dataset>`, which the pretraining
parameters of that dataset merge last (ijepa.params)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ijepa import atomic

from .config import DEFAULT_STORAGE
from .space import masks_from_params
from .storage import redact, storage_for
from .study import trial_counts

__all__ = ["best_masks", "write_tuned_masks", "apply_best"]


def best_masks(storage: str, study_name: str) -> tuple[dict[str, Any], Any]:
    """(masks of the best COMPLETE trial, that trial); ValueError when there is none."""
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage_for(storage))
    except KeyError:
        raise ValueError(f"no study {study_name!r} in {redact(storage)}; run `make tune` first") from None
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        raise ValueError(f"study {study_name!r} in {redact(storage)} has no complete trial yet "
                         f"({len(study.trials)} trials: {trial_counts(study)})")
    best = study.best_trial
    return dict(best.user_attrs.get("masks") or masks_from_params(best.params)), best


def write_tuned_masks(params_file: str | Path, dataset: str, masks: Mapping[str, Any]) -> None:
    """Set `tuned_masks.<dataset>` in the YAML file atomically, keeping the other datasets'
    entries and the file's leading comment block."""
    import yaml

    path = Path(params_file)
    text = path.read_text() if path.exists() else ""
    header = []
    for line in text.splitlines():
        if line.startswith("#") or (not line.strip() and header):
            header.append(line)
        else:
            break
    while header and not header[-1].strip():
        header.pop()
    doc = yaml.safe_load(text) if text.strip() else {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    tuned = doc.get("tuned_masks") or {}
    if not isinstance(tuned, dict):
        raise ValueError(f"{path}: `tuned_masks` must be a mapping")
    tuned[dataset] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in masks.items()}
    doc["tuned_masks"] = tuned
    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
    atomic.write_text(path, ("\n".join(header) + "\n" if header else "") + body)


def apply_best(dataset: str, storage: str = DEFAULT_STORAGE, study_name: str | None = None,
               params_file: str | Path = "conf/base/parameters_tuned.yml") -> dict[str, Any]:
    """Write the best trial's masks to `params_file` under `tuned_masks.<dataset>`; the next
    `dvc repro` sees the parameter change and re-runs pretrain (and what follows)."""
    name = study_name or f"ijepa-masks-{dataset}"
    masks, best = best_masks(storage, name)
    write_tuned_masks(params_file, dataset, masks)
    info = {"dataset": dataset, "study_name": name, "trial": best.number, "value": best.value, "masks": masks,
            "params_file": str(params_file)}
    if "lr" in best.params:
        info["note"] = (f"the best trial also used lr={best.params['lr']:.3g}; tuned_masks holds masks only: "
                        f"set pretrain.{dataset}.optimisation.lr yourself to use it")
    return info
