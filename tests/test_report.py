"""report.py: metrics.jsonl logging (fresh, resumed, rank 0 only), stage summaries, report.md and the PNG plots."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def log_run(out_dir, steps, resume_step=None, **curves):
    m = report.MetricsLogger(str(out_dir), resume_step=resume_step)
    for s in steps:
        m.log(s, **{k: f(s) for k, f in curves.items()})
    return m


def assert_real_png(path):
    import matplotlib.image
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert os.path.getsize(path) > 5000  # axes, curves and text, not an empty canvas
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # not one flat colour
    assert len({tuple(p) for p in img[::7, ::7, :3].reshape(-1, 3).round(2).tolist()}) > 10


def test_two_stage_report_with_plots_and_no_duplicates_on_rerun(tmp_path):
    rd = str(tmp_path / "report")
    pre = log_run(tmp_path / "pretrain", range(1, 31), loss=lambda s: 5 - s / 10, lr=lambda s: 1e-3 * min(1, s / 5),
                  grad_norm=lambda s: 1 + (s % 3) / 10)
    pre.log(30, val_loss=2.5)  # an eval line with other keys: plotted where it exists
    report.write_summary(rd, "pretrain", dict(setup=report.run_setup("cpu", 1), params=3_150_000, tokens=1_228_800,
                                              wall_time=228.4, before=dict(val_loss=9.0), after=dict(val_loss=2.5),
                                              metrics=pre.path))
    sft = log_run(tmp_path / "sft", range(10, 101, 10), loss=lambda s: 2 - s / 100, lr=lambda s: 2e-3,
                  accuracy=lambda s: s / 200)
    path = report.write_summary(rd, "sft", dict(params=3_150_000, tokens=500_000, wall_time=311.0, metrics=sft.path,
                                                before=dict(accuracy=0.0), after=dict(accuracy=0.672)))
    text = open(path).read()
    assert text.count("## pretrain") == 1 and text.count("## sft") == 1
    assert text.index("## pretrain") < text.index("## sft") < text.index("## Summary")
    assert "| metric | pretrain | sft |" in text
    assert "| val_loss | 2.5 | - |" in text and "| accuracy | - | 0.672 |" in text
    assert "| wall time (s) | 228 | 311 |" in text and "| params | 3.15M | 3.15M |" in text
    assert "![pretrain curves](pretrain.png)" in text and "31 logged steps" in text
    git = report.run_setup()["git"]  # None outside a git checkout
    assert (f"git {git['commit'][:10]}" in text) if git else "git " not in text
    for stage in ("pretrain", "sft"):
        assert_real_png(os.path.join(rd, f"{stage}.png"))
    # rerun sft: its summary is replaced, nothing is duplicated
    report.write_summary(rd, "sft", dict(params=3_150_000, wall_time=300.0, after=dict(accuracy=0.7), metrics=sft.path))
    text = open(path).read()
    assert text.count("## sft") == 1 and text.count("| accuracy |") == 2  # its section's table and the summary's
    assert "| accuracy | - | 0.7 |" in text and "0.672" not in text
    assert json.load(open(os.path.join(rd, "sft.json")))["wall_time"] == 300.0
    assert sorted(f for f in os.listdir(rd)) == ["pretrain.json", "pretrain.png", "report.md", "sft.json", "sft.png"]


def test_panels_group_the_keys_that_exist():
    entries = [dict(step=1, time=0.0, loss=1.0, val_loss=2.0, lr=1e-3, grad_norm=0.5, **{"rewards/margins": 0.1},
                    kl=0.01, accuracy=0.5, tok_s=1000.0, note="text")]
    assert report.panels_of(entries) == [("loss", ["loss", "val_loss"]), ("lr", ["lr"]), ("grad norm", ["grad_norm"]),
                                         ("reward", ["rewards/margins"]), ("KL", ["kl"]), ("accuracy", ["accuracy"])]
    assert report.panels_of([dict(step=1, time=0.0, tok_s=5.0)]) == []


def test_resumed_run_continues_the_curve(tmp_path):
    run = tmp_path / "run"
    log_run(run, range(1, 11), loss=lambda s: 10 - s)          # interrupted after step 10, checkpoint at step 6
    m = log_run(run, range(7, 13), resume_step=6, loss=lambda s: 10 - s)
    entries = report.read_metrics(m.path)
    assert [e["step"] for e in entries] == list(range(1, 13))   # 7..10 were dropped and logged again, once
    assert [e["loss"] for e in entries] == [10 - s for s in range(1, 13)]
    with open(m.path, "a") as f:
        f.write('{"step": 13, "loss"')                          # a torn last line (a crash mid-write) is skipped
    assert len(report.read_metrics(m.path)) == 12
    m = log_run(run, [1], loss=lambda s: 0.0)                   # a fresh run starts a fresh file
    assert [e["step"] for e in report.read_metrics(m.path)] == [1]
    report.MetricsLogger(str(run), enabled=False).log(5, loss=1.0)  # ranks other than 0 write nothing
    assert [e["step"] for e in report.read_metrics(m.path)] == [1]


def test_report_regenerates_by_hand(tmp_path):
    rd = tmp_path / "report"
    m = log_run(tmp_path / "dpo", range(1, 6), loss=lambda s: 0.7 - s / 20, **{"rewards/margins": lambda s: s / 10})
    report.write_summary(str(rd), "dpo", dict(after=dict(accuracy=0.8), metrics=m.path))
    os.remove(rd / "report.md")
    os.remove(rd / "dpo.png")
    p = subprocess.run([sys.executable, "report.py", f"--report_dir={rd}"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "## dpo" in open(rd / "report.md").read()
    assert_real_png(rd / "dpo.png")
    p = subprocess.run([sys.executable, "report.py", f"--report_dir={tmp_path / 'none'}"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode != 0 and "does not exist" in p.stderr
    with pytest.raises(ValueError, match="plain file name"):
        report.write_summary(str(rd), "report", {})
