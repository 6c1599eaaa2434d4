"""Driver process of the spot tests: one `run_pretrain` against a Ray cluster, its result on the last line.

Usage: python cluster_driver.py '{"address": ..., "recipe": null, "overrides": [...], "faults": {...}, "resume": false}'
Its own process, because a process holds one Ray connection: the test session's local Ray stays untouched.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from mocoray.config import load_config
from mocoray.jobs.faults import Faults
from mocoray.jobs.pretrain.driver import run_pretrain


def main() -> None:
    spec = json.loads(sys.argv[1])
    cfg = load_config(spec.get("recipe"), spec["overrides"])
    res = run_pretrain(cfg, address=spec["address"], resume=spec["resume"], faults=Faults(**spec["faults"]))
    print("RESULT " + json.dumps(dataclasses.asdict(res), default=str), flush=True)


if __name__ == "__main__":
    main()
