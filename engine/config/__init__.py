"""From YAML to a validated pipeline: Hydra composition (and its cache), the `_target_` allow-list,
the stage registry, each stage's Params validation and the DAG."""
