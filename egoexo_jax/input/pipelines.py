"""Transition shim: the names outside callers imported from `input.pipelines` before issue 14 split it.

The shared Grain tail is stream.py, the Ego-Exo pipeline egoexo_pipeline.py, "records, or convert
once" prepared_records.py. Import from those; this module goes when no caller is left.
"""

from egoexo_jax.input.clip_sampler import check_boxes  # noqa: F401
from egoexo_jax.input.egoexo_pipeline import (  # noqa: F401
    EgoExoTrainTransform, egoexo_transform, feature_grid, make_train_dataset)
from egoexo_jax.input.prepared_records import train_records as prepare_records  # noqa: F401
from egoexo_jax.input.stream import (  # noqa: F401
    DEFAULT_CHECK_RECORDS, HOST_KEYS, MAX_CONSECUTIVE_UNREADABLE, RECORD_INDEX, SKIPPED_RECORDS,
    ConfigMismatchError, HostRowsDataset, IndexedSource, IndexedTransform, SkipUnreadableDataset,
    UnreadableRecordError, batched_stream, check_sample, open_train_records)
