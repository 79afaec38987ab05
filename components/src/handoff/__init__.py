"""ml-handoff: the prebuilt steps that take a researcher's model.py to a served model.

The steps (train, export, optimize, evaluate, register, deploy) are plain typed functions that read and
write files; orchestrators (kfp.local, Kubeflow Pipelines, Argo) only wire them together.
"""

__version__ = "0.1.0"
