"""Names that end up as Kubernetes object names, labels or namespaces.

The project, model and namespace names become pod, service and InferenceService names, so they
must be DNS-1123 labels. Checking that when the YAML is loaded fails in the researcher's editor
rather than minutes later in the cluster.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

# The same rule Kubernetes applies (and hooks/pre_gen_project.py checks when a project is
# generated): lowercase letters, digits and '-', starting and ending with a letter or digit.
DNS_1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_1123_LABEL_MAX_LENGTH = 63

Dns1123Label = Annotated[str, Field(pattern=DNS_1123_LABEL, max_length=DNS_1123_LABEL_MAX_LENGTH)]
"""A string field that must be a DNS-1123 label (at most 63 characters)."""
