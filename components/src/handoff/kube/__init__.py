"""What the steps do on a Kubernetes cluster, through the official ``kubernetes`` client.

Objects are built as plain dicts in the shape of their CRDs (so the same dict is what tests
validate against the published schemas and what the compiled output shows), and every call goes
through :mod:`handoff.kube.client`, which turns API errors into messages naming the object.
"""
