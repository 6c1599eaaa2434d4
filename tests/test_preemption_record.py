"""The preemption record next to the checkpoints: what a restarted group adds, and the steps it counts as lost."""

from __future__ import annotations

import json

from mocoray.jobs.preemption import note_resume, read_record


def test_a_restart_completes_the_last_preemption_once_and_counts_the_steps_no_checkpoint_kept(tmp_path):
    record = tmp_path / "preemptions.json"
    assert note_resume(str(record), global_step=10, checkpoint="epoch_0000_step_000010", world_size=2) == 0
    notice = {"notice_time": 100.0, "deadline": 130.0, "ranks": [1], "nodes": ["n"], "notice_step": 40,
              "checkpoints": ["epoch_0001_step_000008", "epoch_0001_step_000020"], "last_step": 57}
    record.write_text(json.dumps([notice]))
    # the last checkpoint holds step 52 (20 steps into epoch 2 of 32): steps 53..57 were trained for nothing
    assert note_resume(str(record), global_step=52, checkpoint="epoch_0001_step_000020", world_size=1) == 5
    (event,) = read_record(str(record))
    assert event["resumed_step"] == 52 and event["resumed_from"] == "epoch_0001_step_000020"
    assert event["resumed_world_size"] == 1 and event["steps_lost"] == 5 and event["resumed_time"] > 0
    # a later restart (a crash, say) does not count the same preemption again
    assert note_resume(str(record), global_step=60, checkpoint="epoch_0002", world_size=2) == 0
    assert read_record(str(record)) == [event]
