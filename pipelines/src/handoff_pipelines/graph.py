"""The one pipeline graph: train → export → evaluate → register → deploy (if the gate passed).

``build_pipeline`` binds the wrappers to the project's image, so the same graph compiles for a
cluster and runs under kfp.local, where the image is not used and the steps run in this Python.

KFP reads the pipeline's annotations at definition time, so this module keeps them as real types
(no ``from __future__ import annotations``).
"""

from collections.abc import Callable
from typing import Any

from kfp import dsl

from handoff_pipelines import PIPELINE_NAME, STEPS, components


def build_pipeline(image: str) -> Callable[..., Any]:
    """The KFP pipeline for a project whose steps run in ``image``."""

    def component(function: Callable[..., Any]) -> Any:
        # install_kfp_package=False: the image (and a local venv) already has kfp and handoff;
        # installing at run time would make every step slower and less reproducible.
        return dsl.component(function, base_image=image, install_kfp_package=False)

    train, export, evaluate, register, deploy = (component(getattr(components, s)) for s in STEPS)

    @dsl.pipeline(name=PIPELINE_NAME, description="Train, export, evaluate, register and deploy model.py.")
    def handoff(project_dir: str) -> None:
        trained = train(project_dir=project_dir)
        exported = export(project_dir=project_dir, checkpoint=trained.outputs["checkpoint"])
        evaluated = evaluate(project_dir=project_dir, onnx_model=exported.outputs["onnx_model"])
        registered = register(
            project_dir=project_dir,
            onnx_model=exported.outputs["onnx_model"],
            evaluation=evaluated.outputs["record"],
            training=trained.outputs["record"],
        )
        with dsl.If(evaluated.outputs["Output"] == True, name="gate-passed"):  # noqa: E712
            deploy(project_dir=project_dir, registration=registered.outputs["record"])

    return handoff
