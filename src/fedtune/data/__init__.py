"""Datasets and how they are split across clients.

- :mod:`~fedtune.data.registry`: the registered datasets, one spec each.
- :mod:`~fedtune.data.sources`: where a dataset is found (path, data root, Hub).
- :mod:`~fedtune.data.readers`: parsing CSV/TSV/JSON/JSONL into columns.
- :mod:`~fedtune.data.columns`: a user's text and label columns found by name.
- :mod:`~fedtune.data.holdout`: an eval split held out of a dataset that has none.
- :mod:`~fedtune.data.loaders`: a dataset as a task (:class:`TaskData`).
- :mod:`~fedtune.data.partition`: splitting the training examples across clients.
"""

from fedtune.data.loaders import TaskData, describe, describe_table, load_task_data
from fedtune.data.partition import partition_clients, partition_summary, split_client_test, summary_table
from fedtune.data.registry import PARALLEL, REGISTRY, DatasetSpec, ParallelSpec, list_datasets

__all__ = [
    "PARALLEL",
    "REGISTRY",
    "DatasetSpec",
    "ParallelSpec",
    "TaskData",
    "describe",
    "describe_table",
    "list_datasets",
    "load_task_data",
    "partition_clients",
    "partition_summary",
    "split_client_test",
    "summary_table",
]
