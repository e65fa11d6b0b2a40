"""Input and output: datasets (IDX, digits) and run folders."""

from mep_hw.io.datasets import DATASETS, DataAvailability, Dataset, cache_dir, check_dataset, download_idx, load_dataset, read_idx

__all__ = ["DATASETS", "DataAvailability", "Dataset", "cache_dir", "check_dataset", "download_idx", "load_dataset", "read_idx"]
