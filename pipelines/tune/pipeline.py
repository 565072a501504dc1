from kedro.pipeline import Pipeline, node

from .nodes import tune_masks


def create_pipeline(**kwargs) -> Pipeline:
    # Opt-in (`make tune`); not part of __default__ or dvc.yaml. The winner reaches
    # `dvc repro` through `make apply-best` (conf/base/parameters_tuned.yml).
    return Pipeline([
        node(tune_masks, inputs=["params:tune", "params:pretrain", "params:tuned_masks", "params:probe",
                                 "params:dataset", "shards", "tune_dir"],
             outputs="tune_summary", name="tune_masks"),
    ])
