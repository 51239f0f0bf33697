"""What the user's own code raises is a one-line UserCodeError naming the setting and the
user's line; Ray's and Ray Train's wrappers around a user error unwrap to it; a user error is
not what Ray Train restarts a worker group for, a killed worker or a bug is."""

import pytest
import torch

from pipeline.error_lines import error_line, is_users, unwrap, user_error
from pipeline.errors import StoreAccessError, UserError
from pipeline.user_code import UserCallable, UserCodeError, call_user


def _raises_runtime_error(x):
    raise RuntimeError(f"cannot use {x}\nsecond line")


def test_an_error_of_the_users_code_names_the_setting_and_the_users_line():
    with pytest.raises(UserCodeError) as e:
        call_user("model.loss_fn 'pkg.mod:f'", _raises_runtime_error, 3)
    assert str(e.value).startswith("model.loss_fn 'pkg.mod:f' raised RuntimeError: cannot use 3 "
                                   "(at tests/test_user_code.py:")
    assert str(e.value).endswith(" in _raises_runtime_error)")
    assert isinstance(e.value.__cause__, RuntimeError)  # -v shows the original traceback

    mlp = torch.nn.Linear(784, 4)  # the user's model, inside torch: the user's line named
    with pytest.raises(UserCodeError, match=r"raised RuntimeError: mat1 and mat2 shapes .* \(at "
                                            r"tests/test_user_code.py:\d+ in <lambda>\)$"):
        UserCallable("evaluate.metric 'm:f'", lambda: mlp(torch.zeros(2, 3)))()


@pytest.mark.parametrize("exc", [MemoryError(), torch.OutOfMemoryError("oom"),
                                 torch.distributed.DistBackendError("peer died"),
                                 UserError("already says what to fix")])
def test_the_machines_failures_and_user_errors_keep_their_type(exc):
    def f():
        raise exc

    with pytest.raises(type(exc)):
        call_user("data.factory 'm:f'", f)


def test_rays_and_ray_trains_wrappers_unwrap_to_the_users_error():
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    mine = UserCodeError("model.loss_fn 'm:f' raised ValueError: no")
    task = RayTaskError("f", "Traceback ...\nUserCodeError: ...", mine).as_instanceof_cause()
    # Rank 0 failed in a collective because rank 1 met the user's error: rank 1's is shown.
    group = WorkerGroupError("2 workers failed", {0: RuntimeError("gloo: connection closed"),
                                                  1: task})
    for wrapped in (task, group, ControllerError(group)):
        assert unwrap(wrapped) is mine and is_users(wrapped)
        assert user_error(wrapped) is mine and error_line(wrapped) == str(mine)
    bug = WorkerGroupError("1 worker failed", {0: RuntimeError("a bug")})
    assert user_error(bug) is None and not is_users(bug)  # a bug keeps its traceback
    assert error_line(bug) == "RuntimeError: a bug"


def test_a_store_that_cannot_be_reached_is_retried():
    assert not is_users(StoreAccessError("cannot reach the store"))
    assert is_users(ValueError("bad value")) and is_users(FileNotFoundError("gone"))


def test_a_workers_user_error_in_a_step_is_held_until_the_next_all_reduce():
    """_in_step: with peers, the user's error is held and the step's loss is zero (the same
    gradient collectives run); alone it is raised; under ZeRO-3 it fails the worker (_Unheld,
    not recorded), and the driver still shows the user's error; a bug is raised as it is."""
    import pickle

    from pipeline.finetune.stage import _in_step, _Unheld, recording_user_errors

    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    mine = UserCodeError("model.loss_fn 'm:f' raised KeyError: 7")

    def fails(idx):
        raise mine

    loss, held = _in_step(fails, torch.arange(2), None, params, world=2, zero_stage=2)
    assert held is mine and float(loss.detach()) == 0.0
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in params)
    again, held = _in_step(lambda idx: 1 / 0, torch.arange(2), mine, params, 2, 0)
    assert held is mine and float(again.detach()) == 0.0  # held: the forward is not run again
    with pytest.raises(UserCodeError):
        _in_step(fails, torch.arange(2), None, params, world=1, zero_stage=0)
    with pytest.raises(_Unheld) as e:
        _in_step(fails, torch.arange(2), None, params, world=2, zero_stage=3)
    assert unwrap(pickle.loads(pickle.dumps(e.value))).args == mine.args
    with pytest.raises(_Unheld):  # fails the worker: Ray Train stops every worker
        recording_user_errors(lambda conf: _in_step(fails, None, None, params, 2, 3), {}, int)
    with pytest.raises(ZeroDivisionError):
        _in_step(lambda idx: 1 / 0, torch.arange(2), None, params, world=2, zero_stage=0)
