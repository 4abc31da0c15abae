"""curate: audit and clean an image-classification dataset (one folder per class).

The pipeline, one module per stage, data flowing one way through the manifest table:

    scan (scan, quality, duplicates) -> flag (embed, labels) -> fiftyone_bridge (review)
        -> export -> compare (train/) -> report / preview

Each stage reads and adds to a run folder (default `reports/<dataset name>/`); see io.py.
"""

__version__ = "0.1.0"
