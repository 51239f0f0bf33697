"""Named metrics and which way is better, so reports can key and compare them.

A metric is a function `fn(model, data, **kwargs) -> float` and a direction, "higher" or
"lower" (better). Built in: `accuracy` (higher; data is a `pipeline.data.Split`) and
`perplexity` (lower; data is int64 [m, L] token windows). One's own: "package.module:function",
whose direction is the function's `direction` attribute or the `direction` argument.
A stage reports metric `name` as `<stage>_<name>` (`metric_key`), e.g. `quantized_perplexity`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from pipeline.errors import UserError

__all__ = ["Metric", "MetricError", "METRICS", "register_metric", "get_metric", "metric_key",
           "is_better"]

Direction = Literal["higher", "lower"]


class MetricError(UserError, ValueError):
    """An unknown metric, or one without a direction."""


@dataclass(frozen=True)
class Metric:
    name: str  # the key part of reports: metrics.<stage>_<name>
    fn: Callable[..., float]
    direction: Direction

    def __call__(self, model: nn.Module, data: Any, **kwargs: Any) -> float:
        value = self.fn(model, data, **kwargs)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise MetricError(f"metric {self.name!r} returned a {type(value).__name__}, not a "
                              "number") from None


def _accuracy(model: nn.Module, data: Any, **kwargs: Any) -> float:
    from pipeline.evaluate import accuracy

    return accuracy(model, data, **kwargs)


def _perplexity(model: nn.Module, data: Any, **kwargs: Any) -> float:
    from pipeline.evaluate.perplexity import perplexity

    return perplexity(model, data, **kwargs)["ppl"]


METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", _accuracy, "higher"),
    "perplexity": Metric("perplexity", _perplexity, "lower"),
}


def _check_direction(direction: Any, what: str) -> Direction:
    if direction not in ("higher", "lower"):
        raise MetricError(f"metric {what}: direction must be 'higher' or 'lower' (which is "
                          f"better), got {direction!r}")
    return direction


def register_metric(name: str, fn: Callable[..., float], direction: Direction) -> Metric:
    """Add a named metric (replacing one of the same name)."""
    metric = Metric(name, fn, _check_direction(direction, repr(name)))
    METRICS[name] = metric
    return metric


def get_metric(name: str, direction: Direction | None = None) -> Metric:
    """The metric `name`: a built-in or registered name, or "package.module:function"."""
    if name in METRICS:
        return METRICS[name]
    if ":" not in name:
        raise MetricError(f"unknown metric {name!r}; choose one of {sorted(METRICS)} or give "
                          "'package.module:function'")
    from pipeline.user_code import import_callable

    fn = import_callable(name, "metric")
    chosen = direction if direction is not None else getattr(fn, "direction", None)
    if chosen is None:
        raise MetricError(f"metric {name!r}: say whether higher or lower is better (set the "
                          "function's `direction` attribute to 'higher' or 'lower')")
    from pipeline.user_code import UserCallable

    # What the user's metric raises (also their model's forward inside it) is theirs to fix.
    return Metric(name.rsplit(":", 1)[1].rsplit(".", 1)[-1],
                  UserCallable(f"evaluate.metric {name!r}", fn),
                  _check_direction(chosen, repr(name)))


def metric_key(stage: str, metric: str | Metric) -> str:
    """The report key of a stage's metric: "quantized" + "perplexity" → "quantized_perplexity"."""
    name = metric.name if isinstance(metric, Metric) else get_metric(metric).name
    return f"{stage}_{name}"


def is_better(metric: str | Metric, a: float, b: float) -> bool:
    """True if value `a` is strictly better than `b` under the metric's direction."""
    m = metric if isinstance(metric, Metric) else get_metric(metric)
    return a > b if m.direction == "higher" else a < b
