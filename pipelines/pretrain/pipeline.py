from kedro.pipeline import Pipeline, node

from .nodes import mask_preview, pretrain, resolve_config


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        # Validate every parameter (and the masks on this data's patch grid) before any work.
        node(resolve_config, inputs=["params:pretrain", "params:tuned_masks", "params:dataset"],
             outputs="pretrain_config", name="resolve_pretrain_config"),
        node(mask_preview, inputs=["pretrain_config", "shards"], outputs="pretrain_masks_png",
             name="mask_preview"),
        node(pretrain, inputs=["pretrain_config", "shards", "model_dir", "reporting_dir"],
             outputs=["pretrain_summary", "encoder"], name="pretrain"),
    ])
