"""Would Pod Security admission admit a pod? The checks of the standard, as the API server runs them.

Argo's init and wait containers (and KFP's driver and launcher pods, which Argo runs) take their
security context from the workflow controller's ``executor`` setting, not from the workflow, so
``handoff doctor`` holds that setting to the level the project's namespace enforces
(``pod-security.kubernetes.io/enforce``) before a run's pods are refused; the manifests' tests
hold whole pods to it.

Read from kubernetes/pod-security-admission v0.36.2 (Kubernetes 1.36), ``policy/check_*.go`` and
``policy/registry.go``: every check at its newest version (the level's ``latest``), in the order
the API server reports them (baseline checks, then restricted ones, each sorted by check id;
restricted replaces baseline's capabilities, hostPath volume, procMount and seccomp checks with
its own), each as ``reason (detail)`` in upstream's words. A check sees the pod's own security
context and each container's (init, regular and ephemeral) separately: a pod that sets
``runAsNonRoot: false`` is refused even when every container sets ``true``. A namespace pinned to
an older ``enforce-version`` lacks the later changes: probe and lifecycle hosts (1.34), the
longer sysctl lists (1.27, 1.29, 1.32), ``container_engine_t`` (1.31) and the relaxation for pods
in a user namespace (``hostUsers: false``, 1.35); seccomp annotations (before 1.19) are not read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

Obj = dict[str, Any]
Result = tuple[str, str] | None  # (reason, detail) of a refusal, None when the check passes

LEVELS = ("privileged", "baseline", "restricted")
ENFORCE_LABEL = "pod-security.kubernetes.io/enforce"
# check_capabilities_baseline.go: what a baseline container may add.
BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
    "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
SECCOMP_TYPES = {"RuntimeDefault", "Localhost"}
APPARMOR_TYPES = {"RuntimeDefault", "Localhost"}
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"
SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range", "net.ipv4.ip_unprivileged_port_start", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes", "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem",
}  # fmt: skip
# check_restrictedVolumes.go: the volume types "restricted" allows, and the others in the order
# its switch names them (a volume of none of these is "unknown").
ALLOWED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "image", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip
RESTRICTED_VOLUMES = (
    "hostPath", "gcePersistentDisk", "awsElasticBlockStore", "gitRepo", "nfs", "iscsi", "glusterfs",
    "rbd", "flexVolume", "cinder", "cephfs", "flocker", "fc", "azureFile", "vsphereVolume", "quobyte",
    "azureDisk", "photonPersistentDisk", "portworxVolume", "scaleIO", "storageos",
)  # fmt: skip


def violations(pod: Obj, level: str) -> list[str]:
    """What admission at ``level`` says about ``pod`` (a Pod, or anything with its ``spec`` and
    ``metadata``), one ``reason (detail)`` per failed check; empty when the pod is admitted."""
    if level not in LEVELS:
        raise ValueError(f"unknown Pod Security level {level!r}: expected one of {', '.join(LEVELS)}")
    if level == "privileged":
        return []
    checks = BASELINE if level == "baseline" else RESTRICTED
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    found = []
    for check in checks:
        refused = check(meta, spec)
        if refused is not None:
            found.append(f"{refused[0]} ({refused[1]})")
    return found


# --- helpers (policy/helpers.go, visitor.go) -----------------------------------------------------


def _quote(items: list[str]) -> str:
    return ", ".join(f'"{item}"' for item in items)


def _plural(singular: str, plural: str, count: int) -> str:
    return singular if count == 1 else plural


def _containers_named(names: list[str]) -> str:
    return f"{_plural('container', 'containers', len(names))} {_quote(names)}"


def _containers(spec: Obj) -> Iterator[Obj]:
    """Init containers, containers, ephemeral containers: visitContainers' order."""
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from spec.get(key) or []


def _must_not_add(containers: list[str], capabilities: set[str]) -> str:
    added = _quote(sorted(capabilities))
    return f"{_containers_named(containers)} must not include {added} in securityContext.capabilities.add"


def _sc(obj: Obj) -> Obj:
    return obj.get("securityContext") or {}


def _user_namespace(spec: Obj) -> bool:
    """relaxPolicyForUserNamespacePod: a pod in its own user namespace runs as no host user."""
    return spec.get("hostUsers") is False


def _windows(spec: Obj) -> bool:
    return (spec.get("os") or {}).get("name") == "windows"


def _setters(pod_bad: bool, containers: list[str]) -> str:
    """``pod``, ``container "x"`` or ``pod and containers "x", "y"``."""
    parts = (["pod"] if pod_bad else []) + ([_containers_named(containers)] if containers else [])
    return " and ".join(parts)


# --- baseline ----------------------------------------------------------------------------------


def app_armor_profile(meta: Obj, spec: Obj) -> Result:
    values: set[str] = set()
    profile = _sc(spec).get("appArmorProfile")
    pod_bad = profile is not None and profile.get("type") not in APPARMOR_TYPES
    if profile is not None and pod_bad:
        values.add(str(profile.get("type", "")))
    bad = []
    for container in _containers(spec):
        own = _sc(container).get("appArmorProfile")
        if own is not None and own.get("type") not in APPARMOR_TYPES:
            bad.append(container["name"])
            values.add(str(own.get("type", "")))
    annotations = sorted(
        f"{key}={json.dumps(value)}"
        for key, value in (meta.get("annotations") or {}).items()
        if key.startswith(APPARMOR_ANNOTATION)
        and not (value == "" or value == "runtime/default" or str(value).startswith("localhost/"))
    )
    listed = sorted(values) + annotations
    setters = [_setters(pod_bad, bad)] if pod_bad or bad else []
    if annotations:
        setters.append(_plural("annotation", "annotations", len(annotations)))
    if not setters:
        return None
    return (
        _plural("forbidden AppArmor profile", "forbidden AppArmor profiles", len(listed)),
        f"{' and '.join(setters)} must not set AppArmor profile type to {_quote(listed)}",
    )


def capabilities_baseline(meta: Obj, spec: Obj) -> Result:
    bad, added = [], set()
    for container in _containers(spec):
        extra = {str(c) for c in (_sc(container).get("capabilities") or {}).get("add") or []}
        extra -= BASELINE_CAPABILITIES
        if extra:
            bad.append(container["name"])
            added |= extra
    if not bad:
        return None
    return "non-default capabilities", _must_not_add(bad, added)


def host_namespaces(meta: Obj, spec: Obj) -> Result:
    found = [f"{field}=true" for field in ("hostNetwork", "hostPID", "hostIPC") if spec.get(field) is True]
    return ("host namespaces", ", ".join(found)) if found else None


def host_path_volumes(meta: Obj, spec: Obj) -> Result:
    names = [v["name"] for v in spec.get("volumes") or [] if v.get("hostPath") is not None]
    return (
        ("hostPath volumes", f"{_plural('volume', 'volumes', len(names))} {_quote(names)}") if names else None
    )


def host_ports(meta: Obj, spec: Obj) -> Result:
    bad, ports = [], set()
    for container in _containers(spec):
        used = {str(p["hostPort"]) for p in container.get("ports") or [] if p.get("hostPort")}
        if used:
            bad.append(container["name"])
            ports |= used
    if not bad:
        return None
    uses = _plural("uses", "use", len(bad))
    what = _plural("hostPort", "hostPorts", len(ports))
    return "hostPort", f"{_containers_named(bad)} {uses} {what} {', '.join(sorted(ports))}"


def _hosts(handler: Obj | None) -> list[str]:
    handler = handler or {}
    return [str(h) for key in ("httpGet", "tcpSocket") if (h := (handler.get(key) or {}).get("host"))]


def host_probes_and_lifecycle(meta: Obj, spec: Obj) -> Result:
    bad, hosts = set(), set()
    for container in _containers(spec):
        lifecycle = container.get("lifecycle") or {}
        found = [
            *(
                h
                for probe in ("livenessProbe", "readinessProbe", "startupProbe")
                for h in _hosts(container.get(probe))
            ),
            *(h for hook in ("postStart", "preStop") for h in _hosts(lifecycle.get(hook))),
        ]
        if found:
            bad.add(container["name"])
            hosts |= set(found)
    if not bad:
        return None
    uses = _plural("uses", "use", len(bad))
    what = _plural("probe or lifecycle host", "probe or lifecycle hosts", len(hosts))
    return (
        "probe or lifecycle host",
        f"{_containers_named(sorted(bad))} {uses} {what} {_quote(sorted(hosts))}",
    )


def privileged(meta: Obj, spec: Obj) -> Result:
    bad = [c["name"] for c in _containers(spec) if _sc(c).get("privileged") is True]
    return (
        ("privileged", f"{_containers_named(bad)} must not set securityContext.privileged=true")
        if bad
        else None
    )


def proc_mount(meta: Obj, spec: Obj) -> Result:
    if _user_namespace(spec):
        return None
    bad, kinds = [], set()
    for container in _containers(spec):
        kind = _sc(container).get("procMount")
        if kind is not None and kind != "Default":
            bad.append(container["name"])
            kinds.add(str(kind))
    if not bad:
        return None
    return (
        "procMount",
        f"{_containers_named(bad)} must not set securityContext.procMount to {_quote(sorted(kinds))}",
    )


def se_linux_options(meta: Obj, spec: Obj) -> Result:
    types: set[str] = set()
    user = role = False

    def valid(options: Obj) -> bool:
        nonlocal user, role
        ok = True
        if options.get("type", "") not in SELINUX_TYPES:
            ok = False
            types.add(str(options.get("type")))
        if options.get("user"):
            ok, user = False, True
        if options.get("role"):
            ok, role = False, True
        return ok

    pod_options = _sc(spec).get("seLinuxOptions")
    pod_bad = pod_options is not None and not valid(pod_options)
    bad = [
        c["name"]
        for c in _containers(spec)
        if _sc(c).get("seLinuxOptions") is not None and not valid(_sc(c)["seLinuxOptions"])
    ]
    if not pod_bad and not bad:
        return None
    data = [f"{_plural('type', 'types', len(types))} {_quote(sorted(types))}"] if types else []
    data += ["user may not be set"] if user else []
    data += ["role may not be set"] if role else []
    return (
        "seLinuxOptions",
        f"{_setters(pod_bad, bad)} set forbidden securityContext.seLinuxOptions: {'; '.join(data)}",
    )


def _seccomp(spec: Obj, *, require: bool) -> Result:
    """check_seccompProfile_baseline.go (an explicit bad type) and, with ``require``,
    check_seccompProfile_restricted.go (and a type set on the pod or on every container)."""
    values: set[str] = set()
    profile = _sc(spec).get("seccompProfile")
    pod_bad = profile is not None and profile.get("type") not in SECCOMP_TYPES
    if profile is not None and pod_bad:
        values.add(str(profile.get("type")))
    pod_set = profile is not None and not pod_bad
    bad, unset = [], []
    for container in _containers(spec):
        own = _sc(container).get("seccompProfile")
        if own is not None:
            if own.get("type") not in SECCOMP_TYPES:
                bad.append(container["name"])
                values.add(str(own.get("type")))
        elif not pod_set:
            unset.append(container["name"])
    if pod_bad or bad:
        to = _quote(sorted(values))
        return (
            "seccompProfile",
            f"{_setters(pod_bad, bad)} must not set securityContext.seccompProfile.type to {to}",
        )
    if require and unset:
        need = '"RuntimeDefault" or "Localhost"'
        return (
            "seccompProfile",
            f"pod or {_containers_named(unset)} must set securityContext.seccompProfile.type to {need}",
        )
    return None


def seccomp_profile_baseline(meta: Obj, spec: Obj) -> Result:
    return _seccomp(spec, require=False)


def sysctls(meta: Obj, spec: Obj) -> Result:
    bad = [str(s.get("name")) for s in _sc(spec).get("sysctls") or [] if s.get("name") not in SYSCTLS]
    return ("forbidden sysctls", ", ".join(bad)) if bad else None


def windows_host_process(meta: Obj, spec: Obj) -> Result:
    pod_bad = (_sc(spec).get("windowsOptions") or {}).get("hostProcess") is True
    bad = [
        c["name"]
        for c in _containers(spec)
        if (_sc(c).get("windowsOptions") or {}).get("hostProcess") is True
    ]
    if not pod_bad and not bad:
        return None
    return (
        "hostProcess",
        f"{_setters(pod_bad, bad)} must not set securityContext.windowsOptions.hostProcess=true",
    )


# --- restricted --------------------------------------------------------------------------------


def allow_privilege_escalation(meta: Obj, spec: Obj) -> Result:
    if _windows(spec):
        return None
    bad = [c["name"] for c in _containers(spec) if _sc(c).get("allowPrivilegeEscalation") is not False]
    if not bad:
        return None
    return (
        "allowPrivilegeEscalation != false",
        f"{_containers_named(bad)} must set securityContext.allowPrivilegeEscalation=false",
    )


def capabilities_restricted(meta: Obj, spec: Obj) -> Result:
    if _windows(spec):
        return None
    no_drop, adding, added = [], [], set()
    for container in _containers(spec):
        capabilities = _sc(container).get("capabilities")
        if capabilities is None:
            no_drop.append(container["name"])
            continue
        if "ALL" not in (capabilities.get("drop") or []):
            no_drop.append(container["name"])
        extra = {str(c) for c in capabilities.get("add") or []} - {"NET_BIND_SERVICE"}
        if extra:
            adding.append(container["name"])
            added |= extra
    details = (
        [f'{_containers_named(no_drop)} must set securityContext.capabilities.drop=["ALL"]']
        if no_drop
        else []
    )
    if adding:
        details.append(_must_not_add(adding, added))
    return ("unrestricted capabilities", "; ".join(details)) if details else None


def restricted_volumes(meta: Obj, spec: Obj) -> Result:
    bad, kinds = [], set()
    for volume in spec.get("volumes") or []:
        if any(volume.get(k) is not None for k in ALLOWED_VOLUMES):
            continue
        bad.append(volume["name"])
        kinds.add(next((k for k in RESTRICTED_VOLUMES if volume.get(k) is not None), "unknown"))
    if not bad:
        return None
    volumes, uses = _plural("volume", "volumes", len(bad)), _plural("uses", "use", len(bad))
    types = _plural("restricted volume type", "restricted volume types", len(kinds))
    return "restricted volume types", f"{volumes} {_quote(bad)} {uses} {types} {_quote(sorted(kinds))}"


def run_as_non_root(meta: Obj, spec: Obj) -> Result:
    if _user_namespace(spec):
        return None
    pod_value = _sc(spec).get("runAsNonRoot")
    explicit, implicit = [], []
    for container in _containers(spec):
        own = _sc(container).get("runAsNonRoot")
        if own is not None:
            if own is False:
                explicit.append(container["name"])
        elif pod_value is not True:
            implicit.append(container["name"])
    if pod_value is False or explicit:
        return (
            "runAsNonRoot != true",
            f"{_setters(pod_value is False, explicit)} must not set securityContext.runAsNonRoot=false",
        )
    if implicit:
        return (
            "runAsNonRoot != true",
            f"pod or {_containers_named(implicit)} must set securityContext.runAsNonRoot=true",
        )
    return None


def run_as_user(meta: Obj, spec: Obj) -> Result:
    if _user_namespace(spec):
        return None
    pod_bad = _sc(spec).get("runAsUser") == 0
    bad = [c["name"] for c in _containers(spec) if _sc(c).get("runAsUser") == 0]
    if not pod_bad and not bad:
        return None
    return "runAsUser=0", f"{_setters(pod_bad, bad)} must not set runAsUser=0"


def seccomp_profile_restricted(meta: Obj, spec: Obj) -> Result:
    return None if _windows(spec) else _seccomp(spec, require=True)


Check = Callable[[Obj, Obj], Result]
# Sorted by check id within each level, as registry.go orders them.
BASELINE: tuple[Check, ...] = (
    app_armor_profile,  # appArmorProfile
    capabilities_baseline,  # capabilities_baseline
    host_namespaces,  # hostNamespaces
    host_path_volumes,  # hostPathVolumes
    host_ports,  # hostPorts
    host_probes_and_lifecycle,  # hostProbesAndHostLifecycle
    privileged,  # privileged
    proc_mount,  # procMount
    se_linux_options,  # seLinuxOptions
    seccomp_profile_baseline,  # seccompProfile_baseline
    sysctls,  # sysctls
    windows_host_process,  # windowsHostProcess
)
_OVERRIDDEN = {capabilities_baseline, host_path_volumes, proc_mount, seccomp_profile_baseline}
RESTRICTED: tuple[Check, ...] = (
    *(check for check in BASELINE if check not in _OVERRIDDEN),
    allow_privilege_escalation,  # allowPrivilegeEscalation
    capabilities_restricted,  # capabilities_restricted
    proc_mount,  # procMount_restricted: the same check, in restricted's place since 1.35
    restricted_volumes,  # restrictedVolumes
    run_as_non_root,  # runAsNonRoot
    run_as_user,  # runAsUser
    seccomp_profile_restricted,  # seccompProfile_restricted
)
