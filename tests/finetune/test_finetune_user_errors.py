"""A mistake met inside the fine-tune's workers is one user error, raised once by the driver:
no Ray Train restart, no traceback; the hint names the setting of the run's data; no
PlacementGroupCleaner (its state-API thread fails with other Ray instances on the machine)."""

import pytest

from pipeline.config import from_dict, load_config
from pipeline.errors import UserError
from pipeline.finetune.stage import (
    FinetuneUserError,
    _raise_user_error,
    _trainer_class,
    data_source,
    plan_steps,
    recording_user_errors,
)
from pipeline.store import StageDir, Store


def test_a_user_error_in_a_worker_is_recorded_and_raised_once_by_the_driver(tmp_path):
    out = StageDir(Store(str(tmp_path)), "finetune", "0123456789abcdef")
    conf = {"out": out}

    def body(conf):
        plan_steps(64, 128, 1.0, "data.calibration_windows")

    for rank in (0, 1):  # every worker meets it: the worker returns, Train restarts nothing
        recording_user_errors(body, conf, lambda rank=rank: rank)
    with pytest.raises(FinetuneUserError, match=r"^finetune: finetune.batch_size=128 is larger "
                                                r"than the training set \(64 samples; "
                                                r"data.calibration_windows\)$") as e:
        _raise_user_error(out)
    assert isinstance(e.value, UserError)

    def bug(conf):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):  # not a user error: fails the worker as before
        recording_user_errors(bug, conf, lambda: 0)


def test_nothing_recorded_raises_nothing(tmp_path):
    _raise_user_error(StageDir(Store(str(tmp_path)), "finetune", "0123456789abcdef"))


def test_the_batch_hint_names_the_setting_of_the_runs_data():
    lm = from_dict({"model": {"name": "hf_causal_lm", "path": "D"},
                    "data": {"calibration": "c.txt"}})
    assert data_source(lm) == "data.calibration_windows"
    assert data_source(load_config("configs/lenet5_fmnist.yaml")) == "data.train_samples"


def test_the_trainer_starts_no_placement_group_cleaner():
    from ray.train import ScalingConfig

    trainer = _trainer_class()(lambda conf: None, scaling_config=ScalingConfig(num_workers=1))
    names = [type(c).__name__ for c in trainer._create_default_callbacks()]
    assert "PlacementGroupCleanerCallback" not in names
    assert "BackendSetupCallback" in names  # the rest of Ray Train's own callbacks stay


def test_a_user_error_in_the_workers_is_not_retried_by_ray_train(tmp_path, ray_local):
    """Custom data with 16 samples and the default batch of 128: only the workers can see it
    (data.factory is called there). One attempt (max_failures=3 would make four), one
    UserError naming the data's setting, and run.json says where the run failed."""
    import os
    from pathlib import Path

    from pipeline.api import compress
    from pipeline.driver import run_state

    calls = Path(os.environ.get("HWQ_CACHE") or Path.cwd() / ".cache") / "byo-train-calls.txt"
    calls.unlink(missing_ok=True)
    store = tmp_path / "s"
    with pytest.raises(UserError, match=r"finetune.batch_size=128 is larger than the training "
                                        r"set \(16 samples; the calibration batches of "
                                        r"data.factory\)"):
        compress({"model": {"name": "factory", "factory": "tests.byo_model:small_mlp",
                            "kwargs": {"hidden": 8}},
                  "data": {"name": "custom", "factory": "tests.byo_model:few_batches"},
                  "evaluate": {"metric": "tests.byo_model:batch_accuracy"},
                  "quantize": {"method": "hw_kmeans", "k": 4},
                  "finetune": {"workers": 1}, "executor": {"num_cpus": 2},
                  "store": {"url": str(store)}}, keep_ray=True)
    assert calls.read_text().split() == ["calibration"]  # one worker, one attempt
    state = run_state(Store(str(store)))
    assert state["status"] == "failed" and state["failed_stage"] == "finetune"


@pytest.mark.slow  # (65 s: its own hwq process and two Train workers; one worker's user
# error through the driver is test_a_user_error_in_the_workers_is_not_retried_by_ray_train)
def test_an_error_of_the_users_loss_in_one_train_worker_is_one_line_and_not_retried(tmp_path):
    """The user's loss raises (a RuntimeError) in fine-tuning's worker 1 of 2 only, on its
    first step: worker 0 goes on to the next all-reduce and stops there (no hang), Ray Train
    restarts nothing (the loss failed once: max_failures=3 would make four), `hwq run` ends
    with one line naming the setting and the user's line, and run.json records it. Ten
    epochs of two steps: the failed worker holds its error over a step (loss logged every 2)."""
    import json

    from tests.test_cli_errors import _hwq, _user_code_config, assert_user_error_line

    calls, store = tmp_path / "calls.txt", tmp_path / "store"
    _user_code_config(tmp_path / "run.yaml", store,
                      model={"loss_fn": "tests.byo_model:loss_failing_in_finetune"},
                      finetune={"workers": 2, "batch_size": 8, "epochs": 10})
    p, _ = _hwq(["run", str(tmp_path / "run.yaml")],
                env_extra={"HWQ_TEST_CALLS": str(calls), "HWQ_TEST_FAIL_RANK": "1"})
    line = assert_user_error_line(
        p, "finetune: model.loss_fn 'tests.byo_model:loss_failing_in_finetune' raised "
        "RuntimeError: labels must be smoothed before fine-tuning",
        "tests/byo_model.py:")  # the worker's folder is Ray Train's: the path is absolute
    train = [ln for ln in calls.read_text().splitlines() if " rank" in ln]
    # Worker 1 failed at step 0 and held it; worker 0 ran steps 0 and 1 and both stopped at
    # the all-reduce after step 2: one attempt.
    assert sorted(train) == ["loss rank0", "loss rank0", "loss rank1"], train
    run = json.loads((store / "run.json").read_text())
    assert (run["status"], run["failed_stage"], run["error"]) == ("failed", "finetune", line)
