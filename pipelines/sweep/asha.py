"""ASHA that survives a restored sweep.

Tune saves its searcher and callbacks with a sweep but not the scheduler's rungs: a restored sweep would
compare its trials only with results recorded after the restore, so the first trial to reach each rung
would always go on. `ResumableASHA` reads each trial's saved results back into the rungs when Tune adds
the trial (which it does again for every trial of a restored sweep, finished ones included).
"""

import json

from ray.tune.schedulers import AsyncHyperBandScheduler

from sagan.storage import filesystem


class ResumableASHA(AsyncHyperBandScheduler):
    """ASHAScheduler whose rungs are rebuilt from the trials' result.json files on restore (on a disk or on
    object storage: read through the filesystem Tune uses for the trial)."""

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        try:
            trial_dir = trial.path
        except RuntimeError:  # a new trial has no folder yet, and nothing saved
            return
        storage = getattr(trial, "storage", None)
        fs = getattr(storage, "storage_filesystem", None)
        for result in saved_results(getattr(storage, "trial_fs_path", None) if fs else trial_dir, fs):
            if self._time_attr in result and self._metric in result:
                # on_result records a value once per rung and trial, so replaying twice changes nothing.
                bracket.on_result(trial, result[self._time_attr], self._metric_op * result[self._metric])


def saved_results(trial_dir: str | None, fs=None) -> list[dict]:
    """The results Tune saved for a trial (result.json, one JSON object per line), or [] when there are none.
    `trial_dir`: a path or URL, or a path inside the pyarrow filesystem `fs`."""
    if not trial_dir:
        return []
    if fs is None:
        fs, trial_dir = filesystem(trial_dir)
    try:
        with fs.open_input_stream(f"{trial_dir.rstrip('/')}/result.json") as f:
            text = f.read().decode()
    except FileNotFoundError:  # no results yet; another error of the store propagates (no silent wrong rungs)
        return []
    results = []
    for line in text.splitlines():
        try:
            results.append(json.loads(line))
        except ValueError:  # a line cut short by a killed driver
            continue
    return results
