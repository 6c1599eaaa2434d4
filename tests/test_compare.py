"""`mocoray compare`: pretraining runs joined with their downstream runs through the lineage tags."""

from __future__ import annotations

import csv
import io

import mlflow
import pytest
from PIL import Image

from conftest import EXPERIMENTS, tiny_pretrain_overrides
from mocoray.cli import main
from mocoray.config import load_config, load_linear_config
from mocoray.jobs.linear.driver import run_linear_eval
from mocoray.jobs.pretrain.driver import run_pretrain
from mocoray.tracking.compare import CompareError, compare_table, render, save_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(c, exp_id: str, name: str, job: str | None, params=None, metrics=None, tags=None,
         status: str = "FINISHED", start: int = 0) -> str:
    all_tags = {**({"mocoray.job": job} if job else {}), **(tags or {})}
    run_id = c.create_run(exp_id, run_name=name, tags=all_tags, start_time=start).info.run_id
    for k, v in (params or {}).items():
        c.log_param(run_id, k, v)
    for k, values in (metrics or {}).items():
        for step, v in enumerate(values if isinstance(values, list) else [values]):
            c.log_metric(run_id, k, v, step=step)
    c.set_terminated(run_id, status=status)
    return run_id


def _pretrain_params(k: int, m: float) -> dict:
    return {"moco.version": "v2", "model.arch": "resnet18", "optim.epochs": 200, "moco.queue_size": k,
            "moco.momentum": m, "moco.temperature": 0.2, "moco.bn_mode": "shuffle"}


@pytest.fixture()
def local_store(tmp_path):
    """A local SQLite store with three pretraining runs and downstream runs in two experiments."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = mlflow.MlflowClient(uri)
    a, b = c.create_experiment("sweep-a"), c.create_experiment("elsewhere")
    p1 = _run(c, a, "k4096", "pretrain", _pretrain_params(4096, 0.99), {"knn_top1": [0.3, 0.5]}, start=100)
    p2 = _run(c, a, "k16384", "pretrain", _pretrain_params(16384, 0.999), {"knn_top1": [0.2, 0.55]}, start=200)
    p3 = _run(c, a, "k1024", "pretrain", _pretrain_params(1024, 0.99), {"knn_top1": 0.4}, start=300)
    _run(c, a, "unrelated", None, {"moco.queue_size": 1}, start=400)  # no mocoray.job tag: not a row
    link = {"mocoray.pretrain_run_id": p1}
    _run(c, a, "lin-old", "linear", metrics={"linear_top1": [0.1, 0.4], "linear_top1_final": 0.4,
                                             "linear_top5_final": 0.8}, tags=link, start=1000)
    _run(c, a, "lin-new", "linear", metrics={"linear_top1": [0.2, 0.6], "linear_top1_final": 0.6,
                                             "linear_top5_final": 0.9}, tags=link, start=2000)
    _run(c, a, "lin-failed", "linear", metrics={"linear_top1": 0.95}, tags=link, status="FAILED", start=3000)
    _run(c, b, "lin-p2", "linear", metrics={"linear_top1": [0.5, 0.7], "linear_top5": [0.8, 0.95]},
         tags={"mocoray.pretrain_run_id": p2}, start=1500)  # another experiment; no *_final: latest value
    _run(c, a, "det-p1", "detection", metrics={"AP": 40.1, "AP50": 60.2, "AP75": 43.3}, tags=link, start=1600)
    return {"uri": uri, "p1": p1, "p2": p2, "p3": p3}


def test_join_takes_the_newest_finished_downstream_run_of_each_pretraining_run(local_store):
    s = local_store
    table = compare_table(s["uri"], experiment="sweep-a")
    rows = {r["run_id"]: r for r in table.rows}
    assert list(rows) == [s["p1"], s["p2"], s["p3"]]  # start order; the untagged run is not a row
    p1, p2, p3 = rows[s["p1"]], rows[s["p2"]], rows[s["p3"]]
    assert (p1["K"], p1["m"], p1["tau"], p1["version"], p1["arch"], p1["epochs"], p1["bn_mode"]) == (
        4096, 0.99, 0.2, "v2", "resnet18", 200, "shuffle")
    assert p1["knn_top1"] == 0.5  # the latest kNN, not the first
    assert (p1["linear_top1"], p1["linear_top5"]) == (0.6, 0.9)  # newest FINISHED; the failed newer one is skipped
    assert (p1["AP"], p1["AP50"], p1["AP75"]) == (40.1, 60.2, 43.3)
    assert (p2["linear_top1"], p2["linear_top5"]) == (0.7, 0.95)  # found in another experiment
    assert p2["AP"] is None
    assert p3["linear_top1"] is None and p3["knn_top1"] == 0.4


def test_transfer_metrics_on_pretraining_runs_leave_the_table_to_the_downstream_runs(local_store):
    """`transfer.*` copies on a pretraining run are for the MLflow UI: the table still reads the newest
    finished downstream runs (here the copies disagree with them: a failed run's value, an AP never measured),
    and shows no extra columns."""
    from mocoray.tracking.describe import log_transfer

    s = local_store
    before = compare_table(s["uri"], experiment="sweep-a")
    log_transfer(s["uri"], s["p1"], "linear", {"linear_top1": 0.95, "linear_top5": 0.99})
    log_transfer(s["uri"], s["p3"], "detection", {"AP": 1.0, "AP50": 2.0, "AP75": 3.0})
    after = compare_table(s["uri"], experiment="sweep-a")
    assert after.columns == before.columns and not any(c.startswith("transfer") for c in after.columns)
    assert after.rows == before.rows
    rows = {r["run_id"]: r for r in after.rows}
    assert (rows[s["p1"]]["linear_top1"], rows[s["p3"]]["AP"]) == (0.6, None)


def test_sort_filter_and_formats(local_store):
    s = local_store
    by_linear = compare_table(s["uri"], "sweep-a", sort="linear_top1")
    assert [r["run_id"] for r in by_linear.rows] == [s["p2"], s["p1"], s["p3"]]  # empty cells last
    by_k = compare_table(s["uri"], "sweep-a", sort="queue_size", ascending=True)
    assert [r["K"] for r in by_k.rows] == [1024, 4096, 16384]
    only = compare_table(s["uri"], "sweep-a", filter_string="params.`moco.queue_size` = '16384'")
    assert [r["run_id"] for r in only.rows] == [s["p2"]]

    parsed = list(csv.DictReader(io.StringIO(render(by_linear, "csv"))))
    assert parsed[0]["run_id"] == s["p2"] and parsed[0]["linear_top1"] == "0.7" and parsed[0]["K"] == "16384"
    assert parsed[2]["linear_top1"] == "" and parsed[1]["AP75"] == "43.3"
    md = render(by_linear, "markdown").splitlines()
    assert md[0].startswith("| run_id | run | version |") and set(md[1]) <= {"|", "-"} and len(md) == 5
    plain = render(by_linear, "plain").splitlines()
    assert plain[0].split()[:3] == ["run_id", "run", "version"] and "0.7000" in plain[1]

    with pytest.raises(CompareError, match="no experiment 'nope'.*sweep-a"):
        compare_table(s["uri"], "nope")
    with pytest.raises(CompareError, match="unknown column 'linear_top7'"):
        compare_table(s["uri"], "sweep-a", sort="linear_top7")
    with pytest.raises(CompareError, match="MLflow search failed"):
        compare_table(s["uri"], "sweep-a", filter_string="K is big")


def test_plot_is_a_png_with_one_line_per_momentum(local_store, tmp_path):
    table = compare_table(local_store["uri"], "sweep-a")
    out = tmp_path / "top1_vs_k.png"
    assert save_plot(table, str(out), x="queue_size", y="linear_top1", lines="momentum") == 2  # p3 has no top-1
    assert out.read_bytes()[:8] == PNG_MAGIC
    with Image.open(out) as img:
        img.verify()
    with pytest.raises(CompareError, match="nothing to plot.*AP75"):
        save_plot(compare_table(local_store["uri"], "sweep-a", filter_string="params.`moco.queue_size` = '1024'"),
                  str(tmp_path / "empty.png"), y="AP75")


def test_version_column_reads_v2_for_runs_without_the_param_and_v3_rows_have_no_queue_size(tmp_path):
    c = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.create_experiment("versions")
    old = {k: v for k, v in _pretrain_params(4096, 0.99).items() if k != "moco.version"}  # logged by another tool
    _run(c, exp, "old-v2", "pretrain", old, start=100)
    _run(c, exp, "v3", "pretrain", {"moco.version": "v3", "model.arch": "vit_tiny_patch4_32", "moco.momentum": 0.99,
                                    "moco.temperature": 0.2}, start=200)
    rows = compare_table(c.tracking_uri, "versions").rows
    assert [(r["run"], r["version"], r["K"], r["arch"]) for r in rows] == [
        ("old-v2", "v2", 4096, "resnet18"), ("v3", "v3", None, "vit_tiny_patch4_32")]


def test_compare_with_an_unreachable_server_says_so_and_not_that_the_filter_is_wrong(capsys):
    from conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["compare", "--tracking-uri", uri, "--filter", "params.`moco.queue_size` = '4096'"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the MLflow tracking server at {uri}" in err and "--filter" not in err


def test_compare_on_a_missing_sqlite_file_says_so_and_creates_none(tmp_path, capsys):
    mistyped = tmp_path / "mlfow.db"
    assert main(["compare", "--tracking-uri", f"sqlite:///{mistyped}"]) == 2
    assert f"no MLflow store at {mistyped}" in capsys.readouterr().err
    assert not mistyped.exists()


def test_compare_shows_the_epochs_a_resumed_run_was_extended_to(local_store):
    c = mlflow.MlflowClient(local_store["uri"])
    c.set_tag(local_store["p3"], "mocoray.resumed_with", '{"optim.epochs": 400}')
    rows = {r["run_id"]: r for r in compare_table(local_store["uri"], "sweep-a").rows}
    assert rows[local_store["p3"]]["epochs"] == 400 and rows[local_store["p1"]]["epochs"] == 200


def test_lineage_and_compare_against_a_real_mlflow_server(ray_session, mlflow_server, tmp_path, capsys):
    """Two pretraining runs with different K, each with a linear run (one chained by the CLI), on HTTP."""
    exp = f"compare-{tmp_path.name}"
    linear_set = ["data.name=synthetic", "data.synthetic_images=128", "data.synthetic_classes=4", "data.image_size=16",
                  "optim.epochs=2", "optim.milestones=[1]"]
    tracking = {"tracking.tracking_uri": mlflow_server, "tracking.experiment": exp}

    # K=16: pretrain and linear-eval in one command
    overrides = tiny_pretrain_overrides(tmp_path, "tiny-k16", **tracking, **{"moco.queue_size": 16, "optim.epochs": 1})
    argv = ["pretrain", *[f"--set={o}" for o in overrides], "--then-linear-eval", str(EXPERIMENTS / "linear_digits.yaml"),
            *[f"--linear-set={o}" for o in linear_set]]
    assert main(argv) == 0, capsys.readouterr().err
    # K=64: the two steps through the Python API
    pre64 = run_pretrain(load_config(None, tiny_pretrain_overrides(tmp_path, "tiny-k64", **tracking,
                                                                   **{"moco.queue_size": 64, "optim.epochs": 1})))
    lin64 = run_linear_eval(load_linear_config(
        EXPERIMENTS / "linear_digits.yaml",
        [*linear_set, "run.name=tiny-k64-linear", f"run.storage_path={tmp_path / 'runs'}",
         f"tracking.tracking_uri={mlflow_server}"],
        {"encoder.pretrain_run": pre64.mlflow_run_id}))
    capsys.readouterr()

    c = mlflow.MlflowClient(mlflow_server)
    exp_id = c.get_experiment_by_name(exp).experiment_id
    linear_runs = {r.data.tags["mocoray.pretrain_run_id"]: r
                   for r in c.search_runs([exp_id], "tags.`mocoray.job` = 'linear'")}  # same experiment
    pretrain_runs = {r.data.params["moco.queue_size"]: r for r in c.search_runs([exp_id], "tags.`mocoray.job` = 'pretrain'")}
    assert set(pretrain_runs) == {"16", "64"} and set(linear_runs) == {r.info.run_id for r in pretrain_runs.values()}
    assert linear_runs[pre64.mlflow_run_id].info.run_id == lin64.mlflow_run_id
    for pre in pretrain_runs.values():
        lin = linear_runs[pre.info.run_id]
        assert lin.data.tags["mocoray.checkpoint"] == pre.data.tags["mocoray.checkpoint"]
        assert c.get_run(pre.info.run_id).data.tags["mocoray.linear_run_id"] == lin.info.run_id

    png = tmp_path / "top1_vs_k.png"
    assert main(["compare", "--tracking-uri", mlflow_server, "--experiment", exp, "--csv", "--sort", "K",
                 "--ascending", "--plot", str(png), "--x", "K", "--y", "linear_top1", "--lines", "m"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["K"] for r in rows] == ["16", "64"]
    for row in rows:
        pre = pretrain_runs[row["K"]]
        lin = linear_runs[pre.info.run_id]
        assert row["run_id"] == pre.info.run_id and row["m"] == "0.99" and row["arch"] == "small_resnet"
        assert float(row["knn_top1"]) == pre.data.metrics["knn_top1"]
        assert float(row["linear_top1"]) == lin.data.metrics["linear_top1_final"]
        assert float(row["linear_top5"]) == lin.data.metrics["linear_top5_final"]
        assert row["AP"] == row["AP50"] == row["AP75"] == ""  # no detection runs yet
    assert png.read_bytes()[:8] == PNG_MAGIC
    with Image.open(png) as img:
        img.verify()

    assert main(["compare", "--tracking-uri", mlflow_server, "--experiment", exp, "--markdown"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4  # header, rule, two rows
