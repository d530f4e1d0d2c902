"""
The report card: every stage's logged curve and summary, rendered into one Markdown report with plots.

Each stage writes two things (rank 0 only):
  out_dir/metrics.jsonl    one JSON object per logged step: {"step", "time", <metric>: value, ...}. A fresh run
                           starts a fresh file; a resumed run drops the entries after its resume step and appends,
                           so the file is the one curve the uninterrupted run would have logged.
  report_dir/<stage>.json  the stage's summary: setup (device, world size, torch version, git commit), params,
                           tokens, wall time, metrics before and after, the path of its metrics.jsonl. A rerun
                           replaces it.
and then regenerates report_dir/report.md and report_dir/<stage>.png from all the stage summaries and their
metrics files, so rerunning a stage never duplicates anything. The report ends with one table of all stages
(rows: metrics, columns: stages), in the style of nanochat's report card.

In a stage script:

    from report import MetricsLogger, run_setup, write_summary
    wandb = dict(project=wandb_project, name=wandb_run_name, config=config) if wandb_log else None
    metrics = MetricsLogger(out_dir, resume_step=start_step if resuming else None, enabled=master, wandb=wandb)
    metrics.log(step, loss=loss, lr=lr, grad_norm=grad_norm)          # every log_interval
    if master:
        write_summary(report_dir, "pretrain", dict(setup=run_setup(device, world_size), params=n_params,
                      tokens=n_tokens, wall_time=seconds, before=dict(val_loss=v0), after=dict(val_loss=v1),
                      metrics=metrics.path))

$ python report.py --report_dir=out/report    # regenerate report.md and the plots by hand

Plots (matplotlib, Agg backend: no display needed): one PNG per stage with one panel per family of logged
keys present: loss, lr, grad norm, reward, margin, KL, accuracy.
"""

import json
import math
import os
import platform
import time

STAGE_ORDER = ("pretrain", "sft", "reward", "dpo", "grpo", "eval")
# panel title -> how a logged key is recognised (its name, lower-cased, contains one of these; first panel wins)
PANELS = (("loss", ("loss",)), ("lr", ("lr",)), ("grad norm", ("grad_norm",)), ("reward", ("reward",)),
          ("margin", ("margin",)), ("KL", ("kl",)), ("accuracy", ("acc",)))


# -----------------------------------------------------------------------------
# writing


def _atomic_write(path, write):
    """write(f) into path.tmp, then rename: a crash leaves the previous file intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    mode = "wb" if path.endswith(".png") else "w"
    with open(tmp, mode) as f:
        write(f)
    os.replace(tmp, path)


def _number(v):
    """A logged value as a JSON number (tensors, numpy scalars), or v unchanged."""
    if hasattr(v, "item"):
        v = v.item()
    return v


def read_metrics(path):
    """The entries of a metrics.jsonl file (a torn last line, from a crash mid-write, is skipped)."""
    out = []
    if not path or not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class MetricsLogger:
    """Appends one JSON line per logged step to out_dir/metrics.jsonl (and, with wandb=dict(project, name, config),
    logs the same to Weights & Biases: one call per log point in a stage). resume_step=None: a fresh run, the
    file starts empty; resume_step=s: the run continues from step s, entries after s are dropped (they are
    logged again), the rest is kept. enabled=False (ranks other than 0) writes nothing."""

    def __init__(self, out_dir, resume_step=None, enabled=True, wandb=None, name="metrics.jsonl"):
        self.path = os.path.join(out_dir, name)
        self.enabled, self.wandb = enabled, None
        if not enabled:
            return
        kept = [e for e in read_metrics(self.path) if e.get("step", 0) <= resume_step] if resume_step is not None \
            else []
        _atomic_write(self.path, lambda f: f.writelines(json.dumps(e) + "\n" for e in kept))
        if wandb:  # WANDB_MODE=offline works without a network
            import wandb as wandb_module
            wandb_module.init(**wandb)
            self.wandb = wandb_module

    def log(self, step, **metrics):
        if not self.enabled:
            return
        metrics = {k: _number(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(step=int(step), time=time.time(), **metrics)) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=int(step))


def run_setup(device=None, world_size=1):
    """What a summary's setup records: device (the GPU's name on CUDA), world size, torch and Python versions,
    the git commit (and whether the tree had uncommitted changes)."""
    import torch
    from checkpoint import git_state
    name = str(device) if device is not None else "cpu"
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        name = torch.cuda.get_device_name(device)
    return dict(device=name, world_size=world_size, torch=torch.__version__, python=platform.python_version(),
                git=git_state())


def write_summary(report_dir, stage, summary, out_dir=None):
    """Write report_dir/<stage>.json (replacing an earlier one) and regenerate the report from all summaries.
    report_dir "" (the stages' default): "report" beside the stage's out_dir (out/sft -> out/report).
    summary: setup, params, tokens, wall_time (seconds), before / after (dicts of metrics), metrics (path of
    the stage's metrics.jsonl), and anything else worth keeping (it is stored, not shown). Returns the
    report's path."""
    report_dir = report_dir or os.path.join(os.path.dirname(os.path.abspath(out_dir)), "report")
    if not stage or os.sep in stage or stage.startswith(".") or stage == "report":
        raise ValueError(f"stage name {stage!r} must be a plain file name (pretrain, sft, ...), not 'report'")
    summary = dict(stage=stage, written=time.strftime("%Y-%m-%d %H:%M:%S"), **summary)
    _atomic_write(os.path.join(report_dir, f"{stage}.json"),
                  lambda f: json.dump(summary, f, indent=2, default=str))
    return generate_report(report_dir)


# -----------------------------------------------------------------------------
# reading and rendering


def load_summaries(report_dir):
    """The stage summaries in report_dir, in pipeline order (then other stages in the order they were written)."""
    out = []
    for name in sorted(os.listdir(report_dir)) if os.path.isdir(report_dir) else []:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(report_dir, name)) as f:
                s = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(s, dict) and "stage" in s:
            out.append(s)
    rank = {s: i for i, s in enumerate(STAGE_ORDER)}
    return sorted(out, key=lambda s: (rank.get(s["stage"], len(rank)), str(s.get("written", "")), s["stage"]))


def fmt(v):
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def fmt_count(n):
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return fmt(n)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return fmt(n)


def panels_of(entries):
    """[(panel title, [keys])] for the numeric keys of metric entries, grouped as PANELS says."""
    keys = []
    for e in entries:
        for k, v in e.items():
            if k not in ("step", "time") and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    out = []
    for title, needles in PANELS:
        mine = [k for k in keys if any(n in k.lower() for n in needles)
                and not any(k in ks for _, ks in out)]
        if mine:
            out.append((title, mine))
    return out


def plot_stage(entries, path, title):
    """One PNG of a stage's curves; returns False (writing nothing) when no key has anything to plot."""
    panels = panels_of(entries)
    if not panels:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels):
        for k in keys:
            pts = sorted((e["step"], e[k]) for e in entries if isinstance(e.get(k), (int, float)) and "step" in e)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 20 else None, markersize=3, label=k)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
    return True


def generate_report(report_dir):
    """Rebuild report_dir/report.md and the stage plots from the summaries; returns the report's path."""
    summaries = load_summaries(report_dir)
    lines = ["# Training report", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from {len(summaries)} stage summaries in "
             f"`{report_dir}` (regenerate with `python report.py --report_dir={report_dir}`).", ""]
    for s in summaries:
        stage = s["stage"]
        lines += [f"## {stage}", ""]
        setup = s.get("setup") or {}
        git = setup.get("git") or {}
        facts = [f"device {setup['device']} x {setup.get('world_size', 1)}" if "device" in setup else None,
                 f"torch {setup['torch']}" if "torch" in setup else None,
                 f"git {git['commit'][:10]}{' (dirty)' if git.get('dirty') else ''}" if git.get("commit") else None,
                 f"params {fmt_count(s['params'])}" if s.get("params") is not None else None,
                 f"tokens {fmt_count(s['tokens'])}" if s.get("tokens") is not None else None,
                 f"wall time {s['wall_time']:.0f} s" if isinstance(s.get("wall_time"), (int, float)) else None,
                 f"written {s['written']}" if s.get("written") else None]
        lines += ["- " + " | ".join(f for f in facts if f), ""]
        before, after = s.get("before") or {}, s.get("after") or {}
        if before:
            lines += ["| metric | before | after |", "|---|---|---|"]
            lines += [f"| {k} | {fmt(before.get(k))} | {fmt(after.get(k))} |" for k in dict.fromkeys([*before, *after])]
            lines.append("")
        elif after:
            lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in after.items()] + [""]
        entries = read_metrics(s.get("metrics"))
        png = f"{stage}.png"
        if entries and plot_stage(entries, os.path.join(report_dir, png), stage):
            lines += [f"![{stage} curves]({png})", "",
                      f"{len(entries)} logged steps in `{s['metrics']}`.", ""]
        elif os.path.exists(os.path.join(report_dir, png)):
            os.remove(os.path.join(report_dir, png))  # a stale plot from an earlier run of this stage
    # the report card: one row per metric, one column per stage
    if summaries:
        stages = [s["stage"] for s in summaries]
        rows = {"params": [fmt_count(s.get("params")) for s in summaries],
                "tokens": [fmt_count(s.get("tokens")) for s in summaries],
                "wall time (s)": [fmt(round(s["wall_time"])) if isinstance(s.get("wall_time"), (int, float))
                                  else "-" for s in summaries]}
        for i, s in enumerate(summaries):
            for k, v in (s.get("after") or {}).items():
                rows.setdefault(k, ["-"] * len(summaries))[i] = fmt(v)
        total = sum(s["wall_time"] for s in summaries if isinstance(s.get("wall_time"), (int, float)))
        lines += ["## Summary", "", f"Total wall time {total:.0f} s ({total / 60:.1f} min).", "",
                  "| metric | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
        lines += [f"| {k} | " + " | ".join(v) + " |" for k, v in rows.items()]
        lines.append("")
    path = os.path.join(report_dir, "report.md")
    _atomic_write(path, lambda f: f.write("\n".join(lines)))
    return path


# -----------------------------------------------------------------------------
report_dir = "out/report"

if __name__ == "__main__":
    from configs import configure
    configure(globals())
    if not os.path.isdir(report_dir):
        raise SystemExit(f"report: {report_dir} does not exist: run a stage first (each writes its summary there)")
    print(f"wrote {generate_report(report_dir)}")
