from kedro.pipeline import Pipeline, node

from .nodes import shard


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        node(shard, inputs=["params:shard", "params:dataset", "shard_dir"],
             outputs=["shard_summary", "shard_manifest", "shard_metrics", "shard_samples_png"], name="shard"),
    ])
