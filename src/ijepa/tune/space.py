"""The search space as Optuna parameters: drawing a point, the `masks` parameters it sets
(and back), and the pretraining parameters of one trial."""
from __future__ import annotations

import math
from typing import Any, Mapping

from ijepa.config import as_dict, deep_merge

from .config import SearchSpace, TuneConfig

__all__ = ["suggest", "masks_from_params", "params_from_masks", "inside", "space_centre", "base_point",
           "trial_pretrain_params"]

FLOAT_PARAMS = ("pred_scale_min", "pred_scale_span", "enc_scale_min", "pred_aspect_min", "pred_aspect_max")


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """Draw one point (flat Optuna params) from `space`."""
    p: dict[str, Any] = {
        "pred_scale_min": trial.suggest_float("pred_scale_min", *space.pred_scale_min),
        "pred_scale_span": trial.suggest_float("pred_scale_span", *space.pred_scale_span),
        "enc_scale_min": trial.suggest_float("enc_scale_min", *space.enc_scale_min),
        "npred": trial.suggest_categorical("npred", list(space.npred)),
        "pred_aspect_min": trial.suggest_float("pred_aspect_min", *space.pred_aspect_min),
        "pred_aspect_max": trial.suggest_float("pred_aspect_max", *space.pred_aspect_max),
    }
    if space.lr is not None:
        p["lr"] = trial.suggest_float("lr", *space.lr, log=True)
    return p


def _r(x: float) -> float:
    return float(round(float(x), 4))


def masks_from_params(p: Mapping[str, Any]) -> dict[str, Any]:
    """Flat trial params -> the `masks` parameters they set."""
    lo = float(p["pred_scale_min"])
    a, b = float(p["pred_aspect_min"]), float(p["pred_aspect_max"])
    return {"npred": int(p["npred"]), "pred_scale": [_r(lo), _r(min(1.0, lo + float(p["pred_scale_span"])))],
            "pred_aspect": [_r(min(a, b)), _r(max(a, b))], "enc_scale": [_r(p["enc_scale_min"]), 1.0]}


def params_from_masks(masks: Mapping[str, Any]) -> dict[str, Any] | None:
    """Inverse of masks_from_params for a base config (None when it has no such form)."""
    try:
        ps, pa, es = masks["pred_scale"], masks["pred_aspect"], masks["enc_scale"]
        if float(es[1]) != 1.0:
            return None
        return {"pred_scale_min": float(ps[0]), "pred_scale_span": float(ps[1]) - float(ps[0]),
                "enc_scale_min": float(es[0]), "npred": int(masks["npred"]),
                "pred_aspect_min": float(pa[0]), "pred_aspect_max": float(pa[1])}
    except (KeyError, TypeError, IndexError, ValueError):
        return None


def inside(params: Mapping[str, Any], space: SearchSpace) -> bool:
    """Whether a point (flat params, without lr) lies in `space`."""
    for name in FLOAT_PARAMS:
        lo, hi = getattr(space, name)
        if not lo - 1e-9 <= params[name] <= hi + 1e-9:
            return False
    return params["npred"] in space.npred


def space_centre(space: SearchSpace) -> dict[str, Any]:
    """A point every trial's config shares the shape of: the middle of each range (the
    geometric middle of lr), the first npred; validated before any trial runs."""
    centre: dict[str, Any] = {n: (lo + hi) / 2 for n, (lo, hi) in ((n, getattr(space, n)) for n in FLOAT_PARAMS)}
    centre["npred"] = space.npred[0]
    if space.lr is not None:
        centre["lr"] = math.sqrt(space.lr[0] * space.lr[1])
    return centre


def base_point(base_pretrain: Mapping[str, Any], space: SearchSpace) -> dict[str, Any] | None:
    """The point of the base pretraining masks (and lr, when searched), or None when it is
    not of the searched form or lies outside `space`: the trial a new study starts with."""
    from ijepa.masks import MaskConfig

    point = params_from_masks(deep_merge(as_dict(MaskConfig()), dict(base_pretrain.get("masks") or {})))
    if point is None or not inside(point, space):
        return None
    if space.lr is not None:
        lr = float((base_pretrain.get("optimisation") or {}).get("lr", 1e-3))
        if not space.lr[0] <= lr <= space.lr[1]:
            return None
        point["lr"] = lr
    return point


def trial_pretrain_params(base: Mapping[str, Any], cfg: TuneConfig, params: Mapping[str, Any],
                          threads: int | None = None) -> dict[str, Any]:
    """The pretraining parameters of one trial: base, then trial overrides, then the point."""
    t = cfg.trial
    out = deep_merge(dict(base), dict(t.overrides))
    optim = {"total_steps": t.total_steps,
             "warmup_steps": t.warmup_steps if t.warmup_steps is not None else max(0, t.total_steps // 10)}
    if t.batch_size is not None:
        optim["batch_size"] = t.batch_size
    if "lr" in params:
        optim["lr"] = float(params["lr"])
    # the study verified the shards once; every trial reads the same ones. Probes along training
    # are off: the objective scores the val split at every checkpoint itself (on_checkpoint)
    run = {"checkpoint_every": t.eval_every, "keep_last": 1, "progress": False, "nproc": 1,
           "data": {"verify": False}, "monitor": {"enabled": False}, "export": "last"}
    if threads is not None and out.get("threads") is None:
        run["threads"] = threads
    log_every = int(out.get("log_every", 10))
    run["log_every"] = max(1, min(log_every, t.eval_every))
    return deep_merge(out, {"masks": masks_from_params(params), "optimisation": optim, **run})
