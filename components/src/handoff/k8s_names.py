"""Names that end up as Kubernetes object names, labels or namespaces.

The project, model and namespace names become pod, service and InferenceService names, so they
must be DNS-1123 labels. Checking that when the YAML is loaded fails in the researcher's editor
rather than minutes later in the cluster.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

from handoff.yaml_files import FieldError

# The same rule Kubernetes applies (and hooks/pre_gen_project.py checks when a project is
# generated): lowercase letters, digits and '-', starting and ending with a letter or digit.
DNS_1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_1123_LABEL_MAX_LENGTH = 63

Dns1123Label = Annotated[str, Field(pattern=DNS_1123_LABEL, max_length=DNS_1123_LABEL_MAX_LENGTH)]
"""A string field that must be a DNS-1123 label (at most 63 characters)."""

# KServe's rule for an InferenceService name (IsvcNameFmt in its validation webhook): a DNS-1123
# label that starts with a letter. The project's slug names its InferenceService.
INFERENCE_SERVICE_NAME = r"[a-z]([-a-z0-9]*[a-z0-9])?"


def _starts_with_a_letter(name: str) -> str:
    if not re.fullmatch(INFERENCE_SERVICE_NAME, name):
        raise FieldError(
            (),
            f"{name!r} must start with a letter: the InferenceService is named after it and KServe "
            f"accepts only names matching {INFERENCE_SERVICE_NAME}",
        )
    return name


InferenceServiceName = Annotated[Dns1123Label, AfterValidator(_starts_with_a_letter)]
"""A DNS-1123 label KServe also accepts as an InferenceService name."""
