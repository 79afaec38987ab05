"""The pipeline graph of handoff steps, once for Kubeflow Pipelines v2 (also run by kfp.local)."""

PIPELINE_NAME = "handoff"
STEPS = ("train", "export", "optimize", "evaluate", "register", "deploy")
