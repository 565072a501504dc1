"""The data library: sources (scenes, fashion_mnist, imagefolder), sharding, reading.

    from ijepa.data import ShardConfig, shard_dataset, load_split, verify_shards
    result = shard_dataset({"source": "scenes", "scenes": {"sizes": {"train": 1000}}}, "data/02_shards/scenes")
    images, labels = load_split("data/02_shards/scenes", "train")

No Kedro here; pipelines call these functions.
"""
from ijepa.data.config import FashionMnistConfig, ImageFolderConfig, ScenesConfig, ShardConfig
from ijepa.data.reader import (ManifestMissingError, ShardError, UnknownSplitError, load_manifest, load_split,
                               make_loader, make_pipeline, split_size, split_urls, verify_shards)
from ijepa.data.shards import ShardResult, make_source, shard_dataset

__all__ = ["ShardConfig", "ScenesConfig", "FashionMnistConfig", "ImageFolderConfig", "ShardResult",
           "shard_dataset", "make_source", "ShardError", "ManifestMissingError", "UnknownSplitError",
           "load_manifest", "verify_shards", "split_urls", "split_size", "make_pipeline", "make_loader",
           "load_split"]
