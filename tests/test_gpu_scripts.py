"""The prepared GPU scripts run in their --dry-run form on a CPU (the code path a lent GPU will take)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_study_dry_run(tmp_path):
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_study.py"), "--dry-run", "--out", str(out),
                           "--plot", str(png), "--runs", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1",
                                                                            "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [(r["t"], r["loops"]) for r in report["runs"]] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(0 <= r["exact_accuracy"] <= 1 and r["steps"] == 3 for r in report["runs"])
    assert png.stat().st_size > 1000


@pytest.mark.slow
def test_gpu_check_jet2b_train_dry_run(tmp_path):
    out = tmp_path / "c.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--only", "jet2b_train",
                           "--out", str(out)], capture_output=True, text=True, timeout=900,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    section = json.loads(out.read_text())["sections"]["jet2b_train"]
    assert section["status"] == "ok" and section["micro_batch_size"] == 4 and section["batch"] == 8
