"""Every script under benchmarks/ runs in its smoke mode and prints its table: a change that breaks one fails here.

Each runs as its own process, as a user runs it. The scripts that start Ray join the session's Ray instead
(`--address`), which saves a Ray start-up (~20 s) per script. Columns and row names are checked, never the
numbers: those are the benchmarks' business.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

BENCHMARKS = REPO / "benchmarks"


def run(args: list[str], **env: str) -> str:
    """stdout of `args` run from the repository root; fails with its output unless it exits 0."""
    paths = [str(REPO / "platform"), *filter(None, [os.environ.get("PYTHONPATH")])]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(paths), **env})
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def script(name: str, *args: str) -> str:
    return run([sys.executable, str(BENCHMARKS / name), "--smoke", *args])


def table(out: str, header: list[str]) -> list[str]:
    """The first cells of the rows of the fixed-width table (`_bench.table`) whose header is `header`."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if [c for c in re.split(r"\s{2,}", line.strip()) if c] == [h for h in header if h]:
            assert set(lines[i + 1].replace(" ", "")) == {"-"}, f"no rule under the header:\n{out}"
            rows = []
            for j in range(i + 2, len(lines)):
                rule_next = j + 1 < len(lines) and set(lines[j + 1].replace(" ", "")) == {"-"}
                if not re.search(r"\s{2,}", lines[j].strip()) or rule_next:  # the end, or the next table's header
                    break
                rows.append(re.split(r"\s{2,}", lines[j].strip())[0])
            return rows
    raise AssertionError(f"no table with the columns {header}:\n{out}")


def test_step_throughput_times_every_cpu_data_path(tmp_path):
    out = script("step_throughput.py", "--jpeg-dir", str(tmp_path / "jpeg"))
    rows = table(out, ["mode", "pairs/s", "ms/step", "rounds min-max", "vs model", "CPU ms/pair", "cores",
                       "GPU util %", "peak GiB", "warm-up s"])
    assert rows == ["model", "model+plain", "pipeline", "loader:0", "loader:1", "augment", "jpeg-gpu:0",
                    "jpeg-cpu:0", "jpeg-augment"]


def test_split_bn_times_every_implementation_in_both_layouts():
    out = script("split_bn.py")
    rows = table(out, ["BN implementation (layout)", "forward ms", "forward+backward ms"])
    assert rows == ["plain (channels_last)", "split (channels_last)", "split-reshape (channels_last)",
                    "plain (nchw)", "split (nchw)"]


def test_vs_lightly_times_ours_against_lightly_or_says_it_is_absent():
    out = script("vs_lightly.py")
    try:
        import lightly  # noqa: F401
    except ImportError:
        assert "lightly is not installed" in out and "lightly ABSENT" in out
        reference, contenders = "ours (control)", ["ours", "ours (control)", "ours (split BN)"]
    else:
        assert re.search(r"first-step loss .* \(same\)", out), out
        reference, contenders = "lightly", ["ours", "lightly", "ours (control)", "ours (split BN)"]
    rows = table(out, ["implementation", "pairs/s wall", f"vs {reference}", "pairs/CPU-s", "rounds min-max",
                       "best", f"vs {reference}"])
    assert rows == contenders
    assert "noise floor: ours/control" in out


@pytest.mark.parametrize("what", ["throughput", "learn"])
def test_detection_digits_measures_the_detector_variants(what):
    out = script("detection_digits.py", what)
    if what == "throughput":
        rows = table(out, ["what", "images/s", "rounds min-max", "cost vs backbone", "images/CPU-s"])
        assert rows == ["backbone (train)", "c4 (train)", "c4 (inference)", "fpn-32 (train)", "fpn-32 (inference)"]
    else:
        assert table(out, ["variant/seed", "ep0 AP50", "ep1 AP50", "train s"]) == ["c4/seed0", "fpn-32/seed0"]


def test_plain_moco_digits_reports_knn_and_logreg_against_random_init():
    out = script("plain_moco_digits.py")
    assert re.search(r"^random init \(BN recalibrated\): kNN [\d.]+  logreg [\d.]+$", out, re.M), out
    assert re.search(r"^after 2 s \(\d+ steps, \d+ pairs/s\): kNN [\d.]+  logreg [\d.]+; BN recalibrated: kNN "
                     r"[\d.]+  logreg [\d.]+$", out, re.M), out


def test_gpu_check_runs_its_benchmark_steps_on_the_cpu_and_prints_the_readme_table(tmp_path):
    out = run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--smoke"], OUT=str(tmp_path / "out"),
              PYTHON=sys.executable)
    for step in ("2. model-only", "3. torch.compile vs eager", "4. BN layers alone", "5. MoCo v3 model-only",
                 "6. table"):
        assert f" {step}" in out
    assert "ray/mlflow/pydantic/pyarrow imported: []" in out
    assert "| run | mode | pairs/s | ms/step | vs reference | CPU ms/pair | CPU cores | GPU util % | goal |" in out
    measured = re.findall(r"^\| ([A-D]) \| `([^`]+)` \| [\d.]+ \|", out, re.M)
    assert measured == [("A", "model+plain"), ("A", "model"), ("A", "jpeg-gpu:3"), ("A", "jpeg-cpu:1"),
                        ("A", "jpeg-augment"), ("B", "model"), ("B", "model+compile"), ("B", "jpeg-augment"),
                        ("B", "jpeg-augment+compile"), ("C", "model"), ("D", "model")]
    assert re.search(r"^\| C \| `model` \| [\d.]+ \| [\d.]+ \| [\d.]+x v3 ResNet \(D\) \|", out, re.M), out
    assert "run C: vit_tiny_patch4_32, 32 px, batch 8, v3 (no queue)" in out
    assert "run D: small_resnet, 32 px, batch 8, v3 (no queue)" in out
    assert "FAILED" not in out


def _address(ray_session) -> str:
    return ray_session.get_runtime_context().gcs_address


def test_ray_overhead_takes_turns_between_the_ray_job_and_the_plain_loop(ray_session):
    out = script("ray_overhead.py", "--address", _address(ray_session))
    rows = table(out, ["", "plain", "ray train", "ray overhead (epoch range)"])
    assert rows == ["epoch time, steady (s, wall)", "CPU s per steady epoch", "train pairs/s, steady (step loop)",
                    "start-up to first epoch (s)", "tear-down after last epoch (s)"]
    assert re.search(r"steady-state Ray Train overhead: [+-][\d.]+% wall per epoch", out), out


def test_preemption_check_times_the_notice_against_the_step(ray_session):
    out = script("preemption_check.py", "--address", _address(ray_session))
    assert re.search(r"^MoCo step \(reference\) +[\d.]+ ms$", out, re.M), out
    assert re.search(r"^get_preemption_info \(collective\) +[\d.]+ ms$", out, re.M), out
    for every in (" 1", "10"):
        assert re.search(rf"^check every {every} steps adds +[\d.]+ % to a step$", out, re.M), out


def test_detection_transfer_runs_the_job_from_moco_and_from_random_init(ray_session, tmp_path):
    out = script("detection_transfer.py", "--address", _address(ray_session), "--storage", str(tmp_path / "runs"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert re.search(r"^pretraining \w+: kNN top-1 [\d.]+ \(random init [\d.]+\)", out, re.M), out
    rows = table(out, ["source", "seed", "AP", "AP50", "AP75", "AP50 after each pass", "train images/s", "wall s"])
    assert rows == ["moco", "random-init"]
    summary = table(out, ["source", "AP mean +- std", "AP50 mean +- std", "AP75 mean +- std",
                          "mean AP50 after each pass"])
    assert summary == ["moco", "random-init"]


def test_ingest_compares_the_dataloader_with_ray_data_side_by_side(ray_session, tmp_path):
    # the two-node placement is proven by tests/test_ray_ingest.py on its own cluster: not started twice
    out = script("ingest.py", "--folder", str(tmp_path / "jpegs"), "--address", _address(ray_session), "--no-two-nodes")
    rows = table(out, ["path", "view px", "pairs/s", "CPU ms/pair", "pairs timed"])
    cpus = int(ray_session.cluster_resources()["CPU"])
    assert rows == ["torch, 1 loader workers", f"ray data, {cpus} CPUs"] * 2
    assert "map tasks" not in out
