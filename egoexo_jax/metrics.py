"""CLU metric collections, computed inside the jitted step and merged on device between logs.

(No `from __future__ import annotations` here: CLU reads the metric types from the annotations.)
"""


import flax
from clu import metrics


@flax.struct.dataclass
class EgoExoTrainMetrics(metrics.Collection):
  """Per-term losses (Ego-Exo Eq. 7), action accuracy and the learning rate."""

  loss: metrics.Average.from_output("loss")
  loss_action: metrics.Average.from_output("loss_action")
  loss_ego: metrics.Average.from_output("loss_ego")
  loss_object: metrics.Average.from_output("loss_object")
  loss_interaction: metrics.Average.from_output("loss_interaction")
  accuracy: metrics.Accuracy
  learning_rate: metrics.LastValue.from_output("learning_rate")
