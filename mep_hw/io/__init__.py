"""Input and output: datasets (IDX, digits) and run folders."""

from mep_hw.io.datasets import DATASETS, Dataset, cache_dir, download_idx, load_dataset, read_cifar_bin, read_idx

__all__ = ["DATASETS", "Dataset", "cache_dir", "download_idx", "load_dataset", "read_cifar_bin", "read_idx"]
