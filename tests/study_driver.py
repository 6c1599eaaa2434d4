"""Driver process of the study tests: one `run_study` against a Ray cluster, so that the test can kill it.

Usage: python study_driver.py '{"address": ..., "recipe": ..., "resume": null | STUDY_DIR, "faults": [...]}'
Its own process, because a process holds one Ray connection: the test session's local Ray stays untouched.
"""

from __future__ import annotations

import json
import sys

from mocoray.config.study import load_study_config
from mocoray.jobs.console import own_terminal
from mocoray.jobs.study import DownstreamFault, load_study_dir, run_study


def main() -> None:
    spec = json.loads(sys.argv[1])
    own_terminal(verbose=False)  # as `mocoray study` does: the test reads what its terminal shows
    study = load_study_dir(spec["resume"]) if spec["resume"] else load_study_config(spec["recipe"])
    res = run_study(study, address=spec["address"], resume=bool(spec["resume"]),
                    faults=[DownstreamFault(**f) for f in spec["faults"]])
    print("RESULT " + json.dumps({"run_id": res.run_id, "interrupted": res.interrupted}), flush=True)


if __name__ == "__main__":
    main()
