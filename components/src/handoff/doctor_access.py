"""`handoff doctor`'s access check: may the pipeline's pods make the API calls they make?

Reviewed for the account the pods run as, with a SubjectAccessReview for each call, never for
the caller: a SelfSubjectAccessReview answers for whoever runs doctor, so a cluster admin would
pass with the Role never applied. The review names the user and the groups the API server gives
a ServiceAccount token (``system:serviceaccount:<namespace>:<name>``, ``system:serviceaccounts``,
``system:serviceaccounts:<namespace>``, ``system:authenticated``): a SubjectAccessReview evaluates
exactly those, adding none.

The calls, and who makes them (every one polls with ``get`` or ``list``; nothing watches):
- the steps, in the project's namespace: deploy (``kube/inference_service.py``) reads, creates and
  patches the InferenceService, lists its predictor pods and, in raw deployment mode, reads the
  predictor's Deployment; train with ``nodes > 1`` (``kube/train_job.py``) creates, reads and
  deletes its TrainJob or PyTorchJob, and lists its pods for a failed node's message;
- Argo's executor, in every pod (KFP's too), where the pod runs: create and patch its
  WorkflowTaskResult (argo-workflows v4.1.2 ``cmd/argoexec/executor/init.go``,
  ``workflow/executor/taskresult.go``; it reads artifact credentials from mounted Secrets);
- KFP's driver and launcher, where the pod runs: read the ``kfp-launcher`` ConfigMap and their own
  pod, and for a ``minio://`` pipeline root (KFP's default) the ``mlpipeline-minio-artifact``
  Secret (kubeflow/pipelines 2.17.0 ``backend/src/v2/config/env.go``, ``driver/k8s.go``,
  ``component/launcher_v2.go``, ``objectstore/object_store.go``).

``needed_rules`` is also what ``manifests/base/rbac-pipeline.yaml`` grants, rule for rule (its
tests hold the two equal).

Single-user KFP runs its pods in its own namespace, as the account of that name there, which
reaches the project's namespace through a RoleBinding (manifests/components/kfp-single-user).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from handoff.doctor_findings import Finding
from handoff.kube.client import reason
from handoff.project import Project

ROLE = "the Role in manifests/base/rbac-pipeline.yaml (`kubectl apply -k manifests/overlays/<env>`)"
KFP_ROLE = "manifests/components/kfp (add it to the overlay's components)"
SINGLE_USER_BINDING = "manifests/components/kfp-single-user (add it to the overlay's components)"
SINGLE_USER_ACCOUNT = "manifests/platform/kubeflow-single-user (`kubectl apply -k` it once)"
MINIO_SECRET = "mlpipeline-minio-artifact"  # KFP's bundled MinIO's keys (backend/src/v2/config/env.go)
Caller = Literal["step", "executor", "kfp"]


@dataclass(frozen=True)
class ApiRule:
    """One verb on one resource (or one named object), and who calls it."""

    group: str
    resource: str
    verb: str
    name: str = ""
    caller: Caller = "step"  # step: in the project's namespace; others: where the pod runs
    granted_by: str = ROLE  # when the pods run in the project's namespace

    def __str__(self) -> str:
        named = f" {self.name!r}" if self.name else ""
        return f"{self.verb} {self.resource}{'.' + self.group if self.group else ''}{named}"


def needed_rules(project: Project, *, minio_secret: bool = False) -> list[ApiRule]:
    """Every API call the pipeline's pods make, for this project's settings; ``minio_secret``:
    KFP's launcher reads its MinIO Secret (a ``minio://`` pipeline root, or one not known)."""
    rules = [ApiRule("serving.kserve.io", "inferenceservices", v) for v in ("get", "create", "patch")]
    rules.append(ApiRule("serving.kserve.io", "inferencegraphs", "get"))  # deploy: no A/B test running
    rules.append(ApiRule("", "pods", "list"))
    rules.append(ApiRule("apps", "deployments", "get"))
    training = project.settings.training
    if training.distributed_job:
        group, plural = (
            ("trainer.kubeflow.org", "trainjobs")
            if training.job.api == "trainjob"
            else ("kubeflow.org", "pytorchjobs")
        )
        rules += [ApiRule(group, plural, v) for v in ("create", "get", "delete")]
    rules += [
        ApiRule("argoproj.io", "workflowtaskresults", v, caller="executor") for v in ("create", "patch")
    ]
    if project.settings.orchestrator in ("kfp", "both"):
        rules += [
            ApiRule("", "configmaps", "get", name="kfp-launcher", caller="kfp", granted_by=KFP_ROLE),
            ApiRule("", "pods", "get", caller="kfp"),
        ]
        if minio_secret:
            rules.append(ApiRule("", "secrets", "get", name=MINIO_SECRET, caller="kfp", granted_by=KFP_ROLE))
    return rules


@dataclass(frozen=True)
class Review:
    """One call by one account in one namespace, and what grants it there."""

    user: str
    groups: tuple[str, ...]
    namespace: str
    rule: ApiRule
    granted_by: str


def account(namespace: str, name: str) -> tuple[str, tuple[str, ...]]:
    """The user and groups the API server gives a ServiceAccount's token."""
    return (
        f"system:serviceaccount:{namespace}:{name}",
        ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"),
    )


def needed_reviews(project: Project, kfp_pods_in: str | None, *, minio_secret: bool = False) -> list[Review]:
    """Each call by the account of each namespace the pipeline's pods run in.

    ``kfp_pods_in``: where KFP runs the pods (its own namespace when single-user), None when the
    project does not run on KFP.
    """
    namespace = project.settings.namespace
    rules = needed_rules(project, minio_secret=minio_secret)
    engines: list[tuple[str, set[Caller]]] = []
    if project.settings.orchestrator in ("argo", "both"):
        engines.append((namespace, {"step", "executor"}))
    if kfp_pods_in is not None:
        engines.append((kfp_pods_in, {"step", "executor", "kfp"}))
    reviews: dict[tuple[str, str, ApiRule], Review] = {}
    for pods_in, callers in engines:
        user, groups = account(pods_in, project.settings.cluster.service_account)
        for rule in rules:
            if rule.caller not in callers:
                continue
            where = namespace if rule.caller == "step" else pods_in
            if pods_in != namespace:
                fix = SINGLE_USER_BINDING if rule.caller == "step" else SINGLE_USER_ACCOUNT
            else:
                fix = rule.granted_by
            reviews.setdefault((user, where, rule), Review(user, groups, where, rule, fix))
    return list(reviews.values())


def check_access(
    project: Project, api: client.ApiClient, kfp_pods_in: str | None, *, minio_secret: bool = False
) -> Finding:
    """A SubjectAccessReview for each call; skipped, with what an admin can run instead, when the
    caller may not review another account (``create subjectaccessreviews`` at the cluster scope)."""
    authorization = client.AuthorizationV1Api(api)
    reviews = needed_reviews(project, kfp_pods_in, minio_secret=minio_secret)
    denied: dict[tuple[str, str, str], list[str]] = {}
    for review in reviews:
        rule = review.rule
        body = client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=review.user,
                groups=list(review.groups),
                resource_attributes=client.V1ResourceAttributes(
                    namespace=review.namespace,
                    group=rule.group,
                    resource=rule.resource,
                    verb=rule.verb,
                    name=rule.name or None,
                ),
            )
        )
        try:
            answer = authorization.create_subject_access_review(body)
        except ApiException as exc:
            if exc.status != 403:
                raise
            commands = " and ".join(
                sorted({f"`kubectl auth can-i --list -n {r.namespace} --as={r.user}`" for r in reviews})
            )
            users = ", ".join(sorted({r.user for r in reviews}))
            return Finding(
                "access",
                "skip",
                f"you may not review another account's access ({reason(exc)}), so {users}'s was not "
                f"checked: ask a cluster admin to run {commands}",
            )
        if not answer.status.allowed:
            denied.setdefault((review.user, review.namespace, review.granted_by), []).append(str(rule))
    if denied:
        missing = "; ".join(
            f"{user} may not, in {namespace}: {', '.join(rules)} (grant: {fix})"
            for (user, namespace, fix), rules in denied.items()
        )
        return Finding("access", "fail", missing)
    calls: dict[str, set[str]] = {}
    for review in reviews:
        calls.setdefault(review.user, set()).add(review.namespace)
    summary = "; ".join(
        f"{user} may make the pipeline's {sum(r.user == user for r in reviews)} API calls in "
        f"{' and '.join(sorted(namespaces))}"
        for user, namespaces in calls.items()
    )
    return Finding("access", "pass", summary)
