from kedro.pipeline import Pipeline, node

from .nodes import mask_preview, plan_pretraining, pretrain, visualise_predictions


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        # Validate every parameter (and the masks on this data's patch grid) before any work;
        # the shards are verified once, when the catalog loads them for this node.
        node(plan_pretraining, inputs=["params:pretrain", "params:tuned_masks", "params:dataset", "shards"],
             outputs=["pretrain_plan", "visualise_plan"], name="plan_pretraining"),
        node(mask_preview, inputs="pretrain_plan", outputs="pretrain_masks_png", name="mask_preview"),
        node(pretrain, inputs=["pretrain_plan", "model_dir", "reporting_dir"],
             outputs=["pretrain_summary", "encoder"], name="pretrain"),
        # What the predictor predicts: a patch decoder on the final checkpoint's target features
        # turns the predictions of held-out target blocks into pixels (ijepa.predictions)
        node(visualise_predictions, inputs=["pretrain_plan", "visualise_plan", "model_dir", "pretrain_summary"],
             outputs=["predictions_png", "predictor_viz"], name="visualise_predictions"),
    ])
