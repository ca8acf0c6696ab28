"""CLU metric collections, computed inside the jitted step and merged on device between logs.

(No `from __future__ import annotations` here: CLU reads the metric types from the annotations.)
"""

import functools

from clu import metrics


@functools.lru_cache(maxsize=None)
def train_metrics_class(names: tuple[str, ...]) -> type[metrics.Collection]:
  """A Collection averaging each of the scalar outputs `names` over the steps of a logging window,
  plus the last learning rate. One class per set of names, so merged windows share their type."""
  fields = {name: metrics.Average.from_output(name) for name in names}
  fields["learning_rate"] = metrics.LastValue.from_output("learning_rate")
  return metrics.Collection.create(**fields)


def train_metrics(scalars: dict, learning_rate) -> metrics.Collection:
  """The step's metrics from its dict of float32 scalars (losses per term, accuracies)."""
  collection = train_metrics_class(tuple(sorted(scalars)))
  return collection.single_from_model_output(**scalars, learning_rate=learning_rate)
