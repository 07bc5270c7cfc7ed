"""The sweep's table and best trial come from what the trials reported to Tune, whatever the tracking server
holds (pipelines/sweep/outcomes.py): no Ray, no server needed."""

from types import SimpleNamespace

import pandas as pd

from pipelines.common.config import load_config
from pipelines.sweep.outcomes import best_row, records_from_results, trial_rows


def combo(ratio):
    return {"lr_g": 1e-4, "ratio": ratio, "g_attn": [16], "d_attn": [16], "seed": 0}


def cfg():
    return load_config(None, ["tune.steps=20", "tune.metric=loop/fid"])


def test_the_best_trial_is_the_one_that_measured_the_best_score():
    # Trial a's FIDs at steps 10 and 20 never reached the server (an outage): the report must still rank it first.
    records = [
        {
            "trial_id": "a",
            "combo": combo(1),
            "status": "TERMINATED",
            "error": None,
            "history": [
                {"step": 5},
                {"step": 10, "loop/fid": 90.0, "loop/is": 1.5},
                {"step": 20, "loop/fid": 40.0, "loop/is": 2.0, "time_total_s": 12.34},
            ],
        },
        {
            "trial_id": "b",
            "combo": combo(2),
            "status": "TERMINATED",
            "error": None,
            "history": [{"step": 10, "loop/fid": 80.0, "done": True}],
        },
        {
            "trial_id": "c",
            "combo": combo(4),
            "status": "ERROR",
            "error": "non-finite loss at step 3",
            "history": [{"step": 5, "loop/fid": 1.0}],
        },
        {"trial_id": "d", "combo": combo(8), "status": "PAUSED", "error": None, "history": [{"step": 5}]},
    ]
    rows, curves = trial_rows(cfg(), records)
    by_id = {r["trial"]: r for r in rows}
    assert by_id["a"]["status"] == "completed" and by_id["a"]["best"] == 40.0 and by_id["a"]["final_fid"] == 40.0
    assert by_id["a"]["final_is"] == 2.0 and by_id["a"]["steps"] == 20 and by_id["a"]["wall_s"] == 12.3
    assert by_id["b"]["status"] == "stopped" and by_id["b"]["stop_reason"] == "ASHA at step 10 (loop/fid 80)"
    assert by_id["c"]["status"] == "failed" and by_id["c"]["stop_reason"] == "non-finite loss at step 3"
    assert by_id["d"]["status"] == "paused" and by_id["d"]["best"] is None
    assert best_row(rows, "min")["trial"] == "a"  # c's 1.0 is a failed trial's: no recommendation
    assert curves["a: ratio 1, attention 16"] == [(10, 90.0), (20, 40.0)]


def test_a_finished_trial_read_back_from_a_restored_sweep_is_completed_not_paused(tmp_path):
    """What Tuner.restore hands back: a finished trial's last result may lack `done` (Tune marks the function's
    end only in memory), and the results table has NaN where a report had no score. The whole history comes
    from the saved results; `done` tells a trial Tune ended from one that Ctrl-C interrupted."""
    frame = pd.DataFrame(
        [
            {"step": 5, "loop/fid": float("nan"), "trial_id": "a"},
            {"step": 10, "loop/fid": 70.0, "trial_id": "a"},
            {"step": 20, "loop/fid": 60.0, "trial_id": "a"},
        ]
    )

    def result(trial_id, metrics, frame=None, error=None):
        return SimpleNamespace(
            metrics=metrics,
            metrics_dataframe=frame,
            error=error,
            path=str(tmp_path / f"trial-{trial_id}"),
            config={"trial": combo(1)},
        )

    finished = result("a", {"step": 20, "loop/fid": 60.0, "trial_id": "a"}, frame)
    stopped = result("b", {"step": 10, "loop/fid": 95.0, "trial_id": "b", "done": True})
    interrupted = result("c", {"step": 5, "trial_id": "c"})
    failed = result("d", {}, error=RuntimeError("Traceback ...\nRuntimeError: diverged at step 7"))
    records = records_from_results([finished, stopped, interrupted, failed], "loop/fid")
    assert records[0]["history"] == [{"step": 5}, {"step": 10, "loop/fid": 70.0}, {"step": 20, "loop/fid": 60.0}]
    rows, _ = trial_rows(cfg(), records)
    statuses = [(r["trial"], r["status"]) for r in rows]
    assert statuses == [("a", "completed"), ("b", "stopped"), ("c", "paused"), ("d", "failed")]
    assert rows[0]["best"] == 60.0 and rows[3]["stop_reason"] == "diverged at step 7"


def test_the_history_the_driver_kept_survives_a_restore_that_rewrote_result_json(tmp_path):
    from pipelines.sweep.outcomes import read_history, write_history

    sweep = str(tmp_path / "sweep")
    write_history(sweep, "a", [{"step": 10, "loop/fid": 50.0}, {"step": 20, "loop/fid": 30.0}])
    assert read_history(sweep, "a")[1] == {"step": 20, "loop/fid": 30.0} and read_history(sweep, "b") == []
    after_restore = pd.DataFrame([{"step": 30, "loop/fid": 40.0}])  # result.json holds only the steps since
    resumed = SimpleNamespace(
        metrics={"step": 30, "loop/fid": 40.0, "trial_id": "a"},
        metrics_dataframe=after_restore,
        error=None,
        path=str(tmp_path / "trial-a"),
        config={"trial": combo(1)},
    )
    (record,) = records_from_results([resumed], "loop/fid", sweep)
    assert [r["step"] for r in record["history"]] == [10, 20, 30]
    (row,), _ = trial_rows(load_config(None, ["tune.steps=30"]), [record])
    assert row["best"] == 30.0 and row["status"] == "completed"
