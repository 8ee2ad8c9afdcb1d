"""The flextron_tiny tasks' documents: flextron_tiny.jsonl, next to this file."""

from pathlib import Path

import datasets


def load(**metadata) -> datasets.DatasetDict:
    """lm-eval passes the run's metadata (model arguments and the like); none is needed here."""
    documents = Path(__file__).with_name("flextron_tiny.jsonl")
    return datasets.load_dataset("json", data_files={"test": str(documents)})
