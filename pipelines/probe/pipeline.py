from kedro.pipeline import Pipeline, node

from .nodes import probe


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        node(probe, inputs=["params:probe", "params:dataset", "encoder", "shards", "feature_cache"],
             outputs=["probes", "probe_details", "probe_table", "probe_metrics", "probe_bars_png",
                      "probe_confusion_png"], name="probe"),
    ])
