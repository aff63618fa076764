"""Loads this folder's jsonl files for the local lm-eval tasks, so they run offline from any working directory."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_jsonl(data_file: str, **_metadata) -> datasets.DatasetDict:
    """lm-eval passes the task's `dataset_kwargs` (here `data_file`) and its `metadata` as keyword arguments."""
    lines = (HERE / data_file).read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines if line])})
