"""Run the benchmarks (`make bench`) and record them: benchmarks/results.json + benchmarks/RESULTS.md.

Sections (``--only`` takes a comma list; "speed" = every section but quality):

  train_step  bench_train_step: our train step vs a naive one (img/s, ratio), model GFLOP/s vs
              this machine's matmul rate in the step's own precision (flop_fraction: bf16 against
              the bf16 matmul, fp32 against fp32), peak memory
  masks       bench_masks: vectorised MaskGenerator vs the per-image loop collator, batch 256
  probe_fits  bench_probe_fits: the probe stage's fits side by side (one torch thread each) vs in
              turn on all threads, at the default Fashion-MNIST probe sizes
  loader      bench_loader: decoding shards (img/s) vs what the train step consumes
  shard       bench_shard: sharding img/s per source
  photos      bench_photos: photo folders at 224 px: sharding img/s per core and bytes, training
              input img/s with 0/1/2 workers, what a ViT-B/16 / ViT-H/14 step on an H100 consumes
  gpu         bench_gpu: ViT-B/16 and ViT-H/14 train steps (bf16, eager and compiled), MFU against
              the GPU's spec bf16 peak and a measured matmul (also `make gpu-check`);
              "not measured" without a CUDA device
  quality     bench_quality: I-JEPA vs MAE vs random init vs pixels at equal wall-clock budget

Figures are medians over ``--repeats`` whole runs of a section (each benchmark also takes
medians over its own interleaved repeats); `spread` gives [min, max] over the repeats.
Speed comparisons are ratios measured side by side in one process, since the machine is
shared. Each run MERGES its sections into an existing results.json (so speed and quality can
be run separately), written atomically, then RESULTS.md is re-rendered from it.

    python benchmarks/run_all.py                      # everything (quality: 20 min per method per dataset)
    python benchmarks/run_all.py --only speed         # the speed sections (a few minutes)
    python benchmarks/run_all.py --only quality --budget-s 1200 --seeds 1
    python benchmarks/run_all.py --quick              # smoke run: tiny sizes, 1 repeat
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

SPEED = ("train_step", "masks", "probe_fits", "loader", "shard", "photos", "gpu")
SECTIONS = SPEED + ("quality",)
TARGETS = {"train_step.ratio": 1.5, "train_step.flop_fraction": 0.6, "masks.ratio": 10.0, "loader.ratio": 5.0}


# --------------------------------------------------------------------------------- machine
def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_gb": mem_gb,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


# ------------------------------------------------------------------------------ repeating
def repeat_median(fn: Callable[[], dict], repeats: int) -> dict:
    """Run `fn` `repeats` times; numbers -> median, with spread [min, max] and the raw values."""
    runs = [fn() for _ in range(repeats)]
    out: dict[str, Any] = {}
    spread: dict[str, list[float]] = {}
    for key, first in runs[0].items():
        vals = [r.get(key) for r in runs]
        if isinstance(first, (int, float)) and not isinstance(first, bool) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            med = statistics.median(vals)
            out[key] = round(med, 4) if isinstance(med, float) else med
            if repeats > 1 and min(vals) != max(vals):
                spread[key] = [min(vals), max(vals)]
        else:
            out[key] = first
    out["repeats"] = repeats
    if spread:
        out["spread"] = spread
    return out


# ------------------------------------------------------------------------------- sections
def section_train_step(quick: bool, repeats: int) -> dict:
    import bench_train_step

    if quick:
        kw = dict(bench_train_step.QUICK)  # 16 px grey, a 2-block width-32 ViT, batch 8, 2 steps
    else:
        kw = dict(batch_size=128, min_keep=10, steps=10, warmup=2)  # the default job's batch and min_keep
    return repeat_median(lambda: bench_train_step.run(**kw), repeats)


def section_masks(quick: bool, repeats: int) -> dict:
    import bench_masks

    kw = dict(batch_size=32, repeats=3) if quick else dict(batch_size=256, repeats=20)
    return repeat_median(lambda: bench_masks.run(**kw), repeats)


def section_probe_fits(quick: bool, repeats: int) -> dict:
    import bench_probe_fits

    kw = dict(bench_probe_fits.QUICK) if quick else {}
    return repeat_median(lambda: bench_probe_fits.run(**kw), repeats)


def section_loader(quick: bool, repeats: int, consumption: float | None) -> dict:
    import bench_loader

    kw = dict(n=256, repeats=1, batch_size=32) if quick else dict(n=10000, repeats=3)
    return bench_loader.run(train_consumption_img_s=consumption, **kw) if consumption else \
        bench_loader.run(**kw)


def section_shard(quick: bool, repeats: int) -> dict:
    import bench_shard

    return bench_shard.run(60, 300, 10) if quick else bench_shard.run()


def section_photos(quick: bool, repeats: int) -> dict:
    import bench_photos

    return bench_photos.run(n=60, batch_size=8, steps=4) if quick else bench_photos.run()


def section_gpu(quick: bool, repeats: int) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"measured": False, "note": "not measured: no CUDA device on this machine"}
    import bench_gpu

    return bench_gpu.run_suite("cuda", quick=quick)


def section_quality(quick: bool, budget_s: float, seeds: int, datasets: tuple[str, ...], work: str) -> dict:
    import bench_quality

    return bench_quality.run(datasets, budget_s=budget_s, seeds=seeds, quick=quick, work=work)


def merge_quality(prev: Mapping[str, Any] | None, new: Mapping[str, Any], date: str) -> dict:
    """Quality runs one dataset at a time (each takes ~45 min): keep the other datasets' figures.

    Each dataset entry carries its own ``measured_at``; an entry from a run of the other kind
    (quick smoke vs full) is dropped, so a smoke run never sits beside benchmark figures."""
    fresh = {ds: {**r, "measured_at": date} for ds, r in new.items() if isinstance(r, dict)}
    quick = any(r.get("quick") for r in fresh.values())
    prev = dict(prev or {})
    kept = {ds: {"measured_at": prev.get("measured_at"), **r} for ds, r in prev.items()
            if isinstance(r, dict) and ds not in fresh and bool(r.get("quick")) == quick}
    return {**kept, **fresh}


# ---------------------------------------------------------------------------------- output
def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def quality_cell(entry: Mapping[str, Any], probe: str) -> str:
    """One model's probe figure: mean ± sample std over pretraining seeds, then n and each
    seed's value. With one seed there is no spread over seeds: no ±, except low-shot, whose ±
    is then the spread over its label subsets (the caption says so)."""
    if probe not in entry:
        return "–"
    n = int(entry.get("n_seeds") or 1)
    mean, std = float(entry[probe]), float(entry.get(probe + "_std") or 0.0)
    if n >= 2:
        per_seed = ", ".join(f"{float(v):.4f}" for v in entry.get(probe + "_per_seed") or [])
        return f"{mean:.4f} ± {std:.4f} (n={n}" + (f": {per_seed})" if per_seed else ")")
    if probe == "lowshot" and std > 0:
        return f"{mean:.4f} ± {std:.4f} (n=1)"
    return f"{mean:.4f} (n=1)"


def _spread(sec: Mapping[str, Any], key: str, digits: int = 1) -> str:
    s = (sec.get("spread") or {}).get(key)
    return f"{_fmt(float(s[0]), digits)} – {_fmt(float(s[1]), digits)}" if s else ""


def _met(value: Any, target: float) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    return "**yes**" if value >= target else "**no**"


def render_markdown(res: Mapping[str, Any]) -> str:
    m = res.get("machine", {})
    lines = ["# Benchmark results", "",
             "Written by `make bench` (`benchmarks/run_all.py`) from `benchmarks/results.json`; do not edit by hand.",
             "Figures are medians over repeats (spread = min – max over repeats); speed ratios are measured side by",
             "side in one process because the machine is shared and noisy.", "",
             "## Machine", "", "| | |", "|---|---|",
             f"| CPU | {m.get('cpu', '?')} |", f"| cores | {m.get('cores', '?')} (torch threads {m.get('torch_threads', '?')}) |",
             f"| memory | {_fmt(m.get('memory_gb'))} GB |", f"| torch | {m.get('torch', '?')} |",
             f"| python | {m.get('python', '?')} |", f"| GPU | {m.get('cuda') or 'none'} |",
             f"| date (last run) | {m.get('date', '?')} |",
             f"| load average (1 min) at start / end | {_fmt(m.get('loadavg_1m'), 2)} / {_fmt(m.get('loadavg_end_1m'), 2)} |",
             ""] + ([f"Note: {m['note']}", ""] if m.get("note") else [])
    ts, mk, ld, sh, pf = (res.get(k) for k in ("train_step", "masks", "loader", "shard", "probe_fits"))
    if ts or mk or ld or pf:
        lines += ["## Speed", "", "| benchmark | ours | baseline | ratio (spread) | target | met |",
                  "|---|---|---|---|---|---|"]
        if ts:
            c = ts.get("config", {})
            prec = ts.get("precision", "fp32")
            lines.append(f"| train step, img/s (preset {c.get('preset')}, {c.get('img_size')} px, batch "
                         f"{c.get('batch_size')}, ours {prec} vs naive fp32) | {_fmt(ts.get('ours_img_s'))} | naive "
                         f"{_fmt(ts.get('naive_img_s'))} | {_fmt(ts.get('ratio'), 2)} ({_spread(ts, 'ratio', 2)}) "
                         f"| ≥ 1.5 | {_met(ts.get('ratio'), 1.5)} |")
            if prec != "fp32" and ts.get("ratio_same_precision") is not None:
                lines.append(f"| train step, img/s, both {prec} (what the code alone gains) | "
                             f"{_fmt(ts.get('ours_img_s'))} | naive {prec} {_fmt(ts.get('naive_same_precision_img_s'))} | "
                             f"{_fmt(ts.get('ratio_same_precision'), 2)} ({_spread(ts, 'ratio_same_precision', 2)}) "
                             f"| – | – |")
            # like with like: the model's FLOP/s against the matmul rate of the precision it runs in
            own_mm = ts.get(f"matmul_{prec}_gflop_s") if prec != "fp32" else ts.get("matmul_gflop_s")
            lines.append(f"| model GFLOP/s (enc + target + predictor, fwd + bwd, {prec}) | "
                         f"{_fmt(ts.get('model_gflop_s'))} | {prec} matmul {_fmt(own_mm)} | "
                         f"{_fmt(ts.get('flop_fraction'), 3)} ({_spread(ts, 'flop_fraction', 3)}) | ≥ 0.6 | "
                         f"{_met(ts.get('flop_fraction'), 0.6)} |")
            lines.append(f"| train step bf16 autocast vs fp32, img/s | {_fmt(ts.get('ours_bf16_img_s'))} | our fp32 "
                         f"{_fmt(ts.get('ours_fp32_img_s', ts.get('ours_img_s')))} | {_fmt(ts.get('bf16_speedup'), 2)} "
                         f"| – | – |")
        if mk:
            lines.append(f"| mask collator, img/s (batch {mk.get('batch_size')}, grid {mk.get('grid')}) | "
                         f"{_fmt(mk.get('ours_img_s'))} | loop {_fmt(mk.get('loop_img_s'))} | "
                         f"{_fmt(mk.get('ratio'), 1)} ({_spread(mk, 'ratio', 1)}) | ≥ 10 | {_met(mk.get('ratio'), 10)} |")
        if pf:
            c = pf.get("config", {})
            lines.append(f"| probe fits, s ({c.get('models')} models' linear heads on {c.get('n_train')} x {c.get('dim')} "
                         f"features + attentive probes on {c.get('tokens')} x {c.get('token_dim')} tokens; "
                         f"{c.get('workers')} side by side vs in turn on {c.get('threads')} threads) | "
                         f"{_fmt(pf.get('side_by_side_s'))} | in turn {_fmt(pf.get('in_turn_s'))} | "
                         f"{_fmt(pf.get('ratio'), 2)} ({_spread(pf, 'ratio', 2)}) | – | – |")
        if ld:
            lines.append(f"| loader: shard decoding img/s ({ld.get('config', {}).get('source')}, 1 process) vs "
                         f"train-step consumption | {_fmt(ld.get('img_s'))} | train step "
                         f"{_fmt(ld.get('train_consumption_img_s'))} | {_fmt(ld.get('ratio'), 2)} | ≥ 5 | "
                         f"{_met(ld.get('ratio'), 5)} |")
        if ts:
            lines += ["", f"Peak memory of the train step: {_fmt(ts.get('peak_mem_mb'))} MB "
                          f"({ts.get('peak_mem_note', '')}).", ""]
    if sh:
        lines += ["### Sharding (images/s, one process)", "", "| source | wall img/s | CPU-time img/s | images |",
                  "|---|---|---|---|"]
        for src in ("scenes", "fashion_mnist", "imagefolder"):
            if f"{src}_img_s" in sh:
                lines.append(f"| {src} | {_fmt(sh.get(f'{src}_img_s'))} | {_fmt(sh.get(f'{src}_cpu_img_s'))} | "
                             f"{_fmt(sh.get(f'{src}_n'))} |")
        lines.append("")
    if res.get("photos"):
        import bench_photos

        lines += bench_photos.render(res["photos"], _fmt)
    lines += render_gpu(res.get("gpu"))
    q = res.get("quality")
    if q:
        lines += ["## Quality at equal compute", ""]
        for ds, r in q.items():
            if not isinstance(r, dict):  # run-level entries (measured_at, seconds) sit beside the datasets
                continue
            probes = r.get("probes", [])
            lines += [f"### {ds}" + (" (quick smoke run: small data, NOT the benchmark)" if r.get("quick") else ""),
                      "", (f"Measured {r['measured_at'][:10]}. " if r.get("measured_at") else "") +
                      f"Budget {_fmt(r.get('budget_s'), 0)} s of training per method, {r.get('seeds')} "
                          f"pretraining seed(s), probe features of the last {r.get('n_last')} layers. "
                          f"Cells: mean ± sample std over pretraining seeds (n, then each seed's figure); with one "
                          f"seed no ±, except low-shot, whose ± is then over its label subsets. Seed k also draws "
                          f"the low-shot label subsets from k. Pixels do not depend on the seed (n=1).", "",
                      "| model | " + " | ".join(probes) + " | training steps | train s | wall s |",
                      "|---|" + "---|" * (len(probes) + 3)]
            for model in ("ijepa", "mae", "random_init", "pixels"):
                e = r.get(model)
                if not e:
                    continue
                cells = [quality_cell(e, p) for p in probes]
                pre = e.get("pretrain") or []
                steps = "/".join(str(x["steps"]) for x in pre) or "–"
                tr = "/".join(_fmt(x.get("train_s"), 0) for x in pre) or "–"
                wall = "/".join(_fmt(x.get("wall_s"), 0) for x in pre) or "–"
                lines.append(f"| {model} | " + " | ".join(cells) + f" | {steps} | {tr} | {wall} |")
            lines += ["", "| target | threshold | I-JEPA | above MAE, random init, pixels | met |", "|---|---|---|---|---|"]
            for p, t in (r.get("targets") or {}).items():
                lines.append(f"| {p} | {_fmt(t.get('threshold'), 2)} | {t.get('ijepa'):.4f} | "
                             f"{_fmt(t.get('above_all_baselines'))} | **{_fmt(t.get('met'))}** |")
            lines.append("")
    else:
        lines += ["## Quality at equal compute", "", "Not run yet: `python benchmarks/run_all.py --only quality`.", ""]
    return "\n".join(lines) + "\n"


def render_gpu(gpu: Mapping[str, Any] | None) -> list[str]:
    """The GPU section (`make gpu-check`, bench_gpu.run_suite); "not measured" without one."""
    lines = ["### GPU", ""]
    if not gpu or not gpu.get("measured"):
        return lines + [f"{(gpu or {}).get('note', 'not measured')}.", ""]
    if "runs" not in gpu:  # the single-run format of earlier versions
        return lines + [f"{gpu.get('device')}: {_fmt(gpu.get('img_s'))} img/s (older format, re-run make gpu-check).",
                        ""]
    lines += [f"{gpu.get('device')}, measured {str(gpu.get('measured_at', '?'))[:10]} (torch {gpu.get('torch')}): "
              f"spec dense bf16 peak {_fmt(gpu.get('spec_bf16_tflops'), 0)} TFLOP/s, measured bf16 matmul "
              f"{_fmt(gpu.get('matmul_bf16_tflop_s'), 1)} TFLOP/s. {gpu.get('timed')}; FLOPs: {gpu.get('flops')}.", "",
              "| model | mode | batch | img/s | model TFLOP/s | MFU (spec peak) | MFU (matmul) | peak memory GB "
              "| compile s | graphs / recompiles |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in gpu.get("runs", []):
        mode = "compiled" if r.get("compiled") else "eager"
        if "skipped" in r:
            lines.append(f"| {r['preset']} | {mode} | {r.get('batch_size')} | {r['skipped']} | | | | | | |")
            continue
        lines.append(f"| {r['preset']} | {mode} | {r['batch_size']} | {_fmt(r.get('img_s'))} | "
                     f"{_fmt(r.get('model_tflop_s'), 1)} | {_fmt(r.get('mfu_spec'), 3)} | {_fmt(r.get('mfu_matmul'), 3)} "
                     f"| {_fmt(r.get('peak_mem_gb'), 1)} | {_fmt(r.get('compile_s'), 0)} | "
                     f"{r.get('graphs')} / {r.get('recompiles')} |")
    for t in gpu.get("targets", []):
        lines.append(f"\nTarget: {t['preset']} {'compiled' if t['compiled'] else 'eager'} MFU ≥ "
                     f"{t['target_mfu_spec']:.2f} of the spec peak: **{_fmt(t.get('met'))}**.")
    return lines + [""]


def write_results(res: Mapping[str, Any], out_dir: Path) -> None:
    from ijepa import atomic

    atomic.write_json(out_dir / "results.json", res)
    atomic.write_text(out_dir / "RESULTS.md", render_markdown(res))
    for name in ("results.json", "RESULTS.md"):  # committed files: readable like the others
        os.chmod(out_dir / name, 0o644)


# ------------------------------------------------------------------------------------ main
def parse_only(text: str | None) -> list[str]:
    if not text:
        return list(SECTIONS)
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        names = SPEED if part == "speed" else (part,)
        for n in names:
            if n not in SECTIONS:
                raise SystemExit(f"--only: unknown section {n!r}; choose from {', '.join(SECTIONS)} or 'speed'")
            if n not in out:
                out.append(n)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma list of " + ", ".join(SECTIONS) + " or 'speed'")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 1 repeat")
    ap.add_argument("--repeats", type=int, default=None, help="whole-section repeats (default 3; quick 1)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="quality: training seconds per method per dataset (default 1200; quick 20)")
    ap.add_argument("--seeds", type=int, default=1, help="quality: pretraining seeds per method")
    ap.add_argument("--datasets", default="fashion_mnist,scenes", help="quality: comma list")
    ap.add_argument("--work", default="data/09_bench", help="quality: shards, runs and feature caches")
    ap.add_argument("--out-dir", default=str(HERE), help="where results.json and RESULTS.md go")
    ap.add_argument("--note", default=None, help="a remark on the conditions of this run (shown in RESULTS.md)")
    ap.add_argument("--render-only", action="store_true", help="re-render RESULTS.md from results.json")
    a = ap.parse_args(argv)
    os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    sections = parse_only(a.only)
    repeats = a.repeats or (1 if a.quick else 3)
    budget = a.budget_s if a.budget_s is not None else (20.0 if a.quick else 1200.0)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    res: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if a.render_only:
        if a.note is not None:
            res.setdefault("machine", {})["note"] = a.note
        write_results(res, out_dir)
        return res
    res["machine"] = machine_info()
    if a.note:
        res["machine"]["note"] = a.note
    for name in sections:
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        if name == "loader":
            ts = res.get("train_step") or {}
            cons = ts.get("ours_img_s")  # what training consumes at its default precision
            if "train_step" not in sections and not a.quick:
                cons = None  # an old figure from another run is not side by side: measure it again
            out = section_loader(a.quick, repeats, cons)
        elif name == "quality":
            out = section_quality(a.quick, budget, a.seeds, tuple(d for d in a.datasets.split(",") if d), a.work)
            out = merge_quality(res.get("quality"), out, res["machine"]["date"])
        else:
            out = globals()[f"section_{name}"](a.quick, repeats)
        out = dict(out)
        out["seconds"] = round(time.perf_counter() - t0, 1)
        out["measured_at"] = res["machine"]["date"]
        if a.quick:
            out["quick"] = True
        res[name] = out
        write_results(res, out_dir)  # after every section: a crash keeps what was measured
        print(f"[bench] {name} done in {out['seconds']} s", file=sys.stderr, flush=True)
    if hasattr(os, "getloadavg"):
        res["machine"]["loadavg_end_1m"] = round(os.getloadavg()[0], 2)
    write_results(res, out_dir)
    return res


if __name__ == "__main__":
    main()
