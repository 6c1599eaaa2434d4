"""`mocoray ui` and what the MLflow UI shows of our runs, checked in a real browser (headless Chromium)."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import mlflow
import pytest

from conftest import REPO, free_port
from mocoray.cli import main
from mocoray.tracking.client import EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT, client, experiment_id
from mocoray.tracking.describe import log_transfer, source_name

UI_START_S = 300  # `mlflow server` answers after ~45 s on a busy 2-core machine


def test_source_name_is_the_job_and_its_recipe_file_without_folders():
    assert source_name("pretrain", "experiments/digits_moco_v2.yaml") == "mocoray pretrain digits_moco_v2.yaml"
    assert source_name("linear", "/abs/linear_digits.yaml") == "mocoray linear-eval linear_digits.yaml"
    assert source_name("detection", "s3://bucket/recipes/detect.yaml") == "mocoray detect detect.yaml"
    assert source_name("sweep", "sweep_digits_tiny.yaml", trial_id="a1_00002") \
        == "mocoray sweep sweep_digits_tiny.yaml trial a1_00002"
    assert source_name("pretrain") == "mocoray pretrain"  # called from Python: no recipe file


def test_experiments_mocoray_creates_carry_mlflows_model_development_kind(tmp_path):
    c = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.get_experiment(experiment_id(c, "new-one"))
    assert exp.tags[EXPERIMENT_KIND_TAG] == MODEL_DEVELOPMENT == "custom_model_development"


def test_rerun_evaluation_logs_its_transfer_result_at_a_new_step(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = mlflow.MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("t")).info.run_id
    assert log_transfer(uri, run_id, "linear", {"linear_top1": 0.5, "linear_top5": 0.9, "epoch": 3}) \
        == {"transfer.linear_top1": 0.5, "transfer.linear_top5": 0.9}
    log_transfer(uri, run_id, "linear", {"linear_top1": 0.6, "linear_top5": 0.95})
    log_transfer(uri, run_id, "detection", {"AP": 40.0, "AP50": 60.0, "AP75": 43.0, "loss": 1.0})
    history = [(m.step, m.value) for m in c.get_metric_history(run_id, "transfer.linear_top1")]
    assert history == [(0, 0.5), (1, 0.6)]
    metrics = c.get_run(run_id).data.metrics
    assert metrics["transfer.linear_top1"] == 0.6  # the newest is what the runs table shows
    assert {k for k in metrics if k.startswith("transfer.")} == {
        "transfer.linear_top1", "transfer.linear_top5", "transfer.AP", "transfer.AP50", "transfer.AP75"}


def test_ui_on_a_missing_store_or_experiment_says_which_and_starts_nothing(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "mlflow.db"
    assert main(["ui", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert f"no MLflow store at {missing}" in capsys.readouterr().err
    assert not missing.parent.exists()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id(client(uri), "digits-sweep")
    assert main(["ui", "--tracking-uri", uri, "--experiment", "digit-sweep"]) == 2
    err = capsys.readouterr().err
    assert "--experiment: no experiment 'digit-sweep'" in err and "experiments there: Default, digits-sweep" in err


def test_ui_on_a_port_in_use_names_the_port(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["ui", "--tracking-uri", uri, "--port", str(port)]) == 2
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# In a real browser


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium for Playwright (nothing downloads a browser here); skipped without one, except in CI."""
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "Playwright for Python is not installed (pip install playwright)"
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if reason is None and path is None:
        reason = "no chromium executable on PATH (apt-get install chromium)"
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(reason)
    return path


class UiProcess:
    """`mocoray ui` as a user starts it, in its own process; `url` is the address it printed."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), os.environ.get("PYTHONPATH", "")])}
        # started with SIGINT ignored, as a non-interactive shell starts a background job: Ctrl-C must still stop it
        self.proc = subprocess.Popen([sys.executable, "-m", "mocoray.cli", "ui", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()

    def wait_for_url(self, timeout_s: float) -> str:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.output.append(line)
            if line.startswith("MLflow UI: "):
                return line.split(": ", 1)[1].strip()
        raise AssertionError(f"mocoray ui printed no address: {''.join(self.output)}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C
        return self.proc.wait(timeout=60)


def _refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_mocoray_ui_opens_the_runs_table_with_sources_and_transfer_columns(chromium, k_m_tau_sweep):
    from playwright.sync_api import sync_playwright

    res, linear = k_m_tau_sweep["res"], k_m_tau_sweep["linear"]
    port = free_port()
    ui = UiProcess(["--tracking-uri", res.tracking_uri, "--port", str(port), "--experiment", "sweep-tests"])
    try:
        url = ui.wait_for_url(UI_START_S)
        exp = mlflow.MlflowClient(res.tracking_uri).get_experiment_by_name("sweep-tests")
        assert url == f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}?workflowType=machine_learning"
        best = res.best["trial_id"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 2400, "height": 1200})
            page.set_default_timeout(120_000)  # the first load of the UI's scripts
            page.goto(url)
            page.get_by_text("k-m-tau", exact=True).wait_for()  # the sweep's parent run
            grid = page.locator(".ag-root")
            text = grid.inner_text()
            # the model-training runs table, not the GenAI overview an experiment opens on by default
            assert "Run Name" in text and "Source" in text
            assert "Token Usage" not in page.inner_text("body")
            assert "mocoray sweep sweep_digits_tiny.yaml" in text
            assert f"k-m-tau-{best}-linear" in text and "mocoray linear-eval linear_digits.yaml" in text

            # the trials, nested under the sweep's run (expanded), and the transfer column picked in "Columns"
            page.set_default_timeout(60_000)
            parent = page.locator(".ag-row", has=page.get_by_text("k-m-tau", exact=True)).first
            parent.locator("button[data-component-id*=runnamecellrenderer]").click()
            best_row = page.locator(".ag-row", has=page.get_by_text(f"k-m-tau-{best}", exact=True)).first
            best_row.wait_for()
            page.get_by_role("button", name="Columns", exact=True).click()
            page.get_by_title("transfer.linear_top1", exact=True).click()
            page.keyboard.press("Escape")
            page.locator(".ag-header-cell", has_text="transfer.linear_top1").wait_for()
            text = grid.inner_text()
            for row in res.trials:
                assert f"k-m-tau-{row['trial_id']}" in text
                assert f"mocoray sweep sweep_digits_tiny.yaml trial {row['trial_id']}" in text
            value = mlflow.MlflowClient(res.tracking_uri).get_run(linear[0]["mlflow_run_id"]).data.metrics[
                "linear_top1_final"]
            index = best_row.get_attribute("row-index")  # the grid draws a row's cells in two containers
            assert repr(value) in page.locator(f".ag-center-cols-container .ag-row[row-index='{index}']").inner_text()
            browser.close()
    finally:
        code = ui.stop()
    assert code == 0, "".join(ui.output)
    assert _refused(port)  # Ctrl-C stopped the server too

