"""A bring-your-own model for the tests: imported by hwq through `model.factory`."""

from torch import nn


def small_mlp(hidden: int = 32) -> nn.Module:
    import torch

    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def few_batches(split: str) -> list:
    """`data.factory` of 16 random images and labels per split (a fine-tune batch of 128 does
    not fit); each call from inside a Ray Train worker appends a line to
    $HWQ_CACHE/byo-train-calls.txt (how many worker-group attempts there were)."""
    import os

    import torch

    try:
        import ray.train

        ray.train.get_context().get_world_rank()
        with open(os.path.join(os.environ["HWQ_CACHE"], "byo-train-calls.txt"), "a") as f:
            f.write(f"{split}\n")
    except Exception:  # noqa: BLE001 - not in a Train worker
        pass
    g = torch.Generator().manual_seed(0 if split == "calibration" else 1)
    return [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g))]


def batch_accuracy(model, batches) -> float:
    """A metric of one's own over (x, y) batches."""
    import torch

    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return right / sum(len(y) for _, y in batches)


batch_accuracy.direction = "higher"


def _count_call(what: str) -> int | None:
    """Append a line to the file $HWQ_TEST_CALLS names (how many times a test's user function
    ran, retries included): `what`, and ` rank<r>` in Ray Train's worker of rank r. Returns
    that rank, or None outside a Train worker."""
    import os

    try:
        import ray.train

        rank = ray.train.get_context().get_world_rank()
    except Exception:  # noqa: BLE001 - not in a Train worker
        rank = None
    path = os.environ.get("HWQ_TEST_CALLS")
    if path:
        with open(path, "a") as f:
            f.write(what + ("" if rank is None else f" rank{rank}") + "\n")
    return rank


def bad_batches(split: str) -> list:
    """`data.factory` whose images have 3 values, not 28x28: the model cannot take them."""
    import torch

    _count_call(f"bad_batches {split}")
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 3, generator=g), torch.randint(0, 10, (16,), generator=g))]


def loss_failing_in_finetune(model, batch):
    """`model.loss_fn`: cross-entropy, except in the Ray Train worker whose rank is
    $HWQ_TEST_FAIL_RANK (default: every worker), where it raises (once a call is counted)."""
    import os

    from torch import nn

    rank = _count_call("loss")
    fail = os.environ.get("HWQ_TEST_FAIL_RANK")
    if rank is not None and (fail is None or int(fail) == rank):
        raise RuntimeError("labels must be smoothed before fine-tuning")
    x, y = batch
    return nn.functional.cross_entropy(model(x).float(), y)


def eval_only_batches(split: str) -> list:
    """`data.factory` with calibration and eval batches but no "train" split."""
    import torch

    if split == "train":
        raise KeyError("this dataset has no 'train' split")
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g))]
