"""Kedro pipelines of the project: shard, pretrain, probe (the default job) and tune; thin nodes over `ijepa`."""
