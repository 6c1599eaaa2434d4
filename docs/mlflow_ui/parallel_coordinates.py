"""Screenshot of MLflow's parallel-coordinates chart of a sweep's trials (K, m, tau -> a transfer metric).

Makes docs/mlflow_ui/parallel_coordinates.png from a store filled by `mocoray sweep ... --then-linear-eval N`
(the steps are in docs/design.md, "The MLflow UI"): serves it with `mocoray ui`, opens the printed address in
headless Chromium (Debian's `chromium`, driven by Playwright), and does what a user does: chart view,
expand the sweep's run, "Add chart" -> "Parallel coordinates" with the three params and the metric.

    python docs/mlflow_ui/parallel_coordinates.py --tracking-uri sqlite:///mlflow.db --experiment digits-sweep \
        --sweep digits-tiny --metric transfer.linear_top1 --out docs/mlflow_ui/parallel_coordinates.png
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import time

PARAMS = ("moco.queue_size", "moco.momentum", "moco.temperature")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(tracking_uri: str, experiment: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "mocoray.cli", "ui", "--tracking-uri", tracking_uri,
                             "--experiment", experiment, "--port", str(free_port())],
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        print(line, end="")
        if line.startswith("MLflow UI: "):
            return proc, line.split(": ", 1)[1].strip()
    raise SystemExit("mocoray ui printed no address")


def screenshot(url: str, sweep: str, metric: str, out: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(120_000)
        page.goto(url)
        page.get_by_text(sweep, exact=True).first.wait_for()
        page.locator("label", has=page.locator("input[name=runs-view-mode][value=CHART]")).click()
        # the trials are the sweep run's children: charts draw the runs the list shows
        parent = page.locator(".ag-row", has=page.get_by_text(sweep, exact=True)).first
        parent.locator("button[data-component-id*=runnamecellrenderer]").click()
        page.locator(".ag-row", has_text=f"{sweep}-").first.wait_for()
        page.get_by_role("button", name="Add chart").first.click()
        page.get_by_role("menuitem", name="Parallel coordinates").click()
        dialog = page.get_by_role("dialog")
        for field, names in (("Params", PARAMS), ("Metrics", (metric,))):
            dialog.locator("[data-testid=experiment-view-compare-runs-config-field]", has_text=field) \
                .locator(".du-bois-light-select-selector").click()
            for name in names:  # typed: a long list of metrics is drawn only in part
                page.keyboard.type(name)
                page.locator(f".du-bois-light-select-item-option[title='{name}']").last.click()
            dialog.locator("h2").click()  # closes the drop-down
        dialog.get_by_role("button", name="Add chart").click()
        page.get_by_placeholder("Search metric charts").fill(metric)  # the new chart is last of many
        card = page.locator("[data-testid=experiment-view-compare-runs-card]", has_text="Parallel")
        card.locator("button[data-component-id=fullscreen_button_chartcard]").click()
        time.sleep(3)  # the chart animates in
        page.get_by_role("dialog").screenshot(path=out)
        browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="digits-sweep")
    parser.add_argument("--sweep", default="digits-tiny", help="the sweep's name (its parent run's name)")
    parser.add_argument("--metric", default="transfer.linear_top1")
    parser.add_argument("--out", default="docs/mlflow_ui/parallel_coordinates.png")
    parser.add_argument("--url", default=None, help="the address a running `mocoray ui` printed (else one is started)")
    args = parser.parse_args()
    if args.url:
        screenshot(args.url, args.sweep, args.metric, args.out)
    else:
        proc, url = start_ui(args.tracking_uri, args.experiment)
        try:
            screenshot(url, args.sweep, args.metric, args.out)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
