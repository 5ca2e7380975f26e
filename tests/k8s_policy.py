"""Policy checks for rendered Kubernetes objects: hardened containers and least-privilege RBAC.

Each check takes objects as plain dicts (parsed YAML or `ApiClient().sanitize_for_serialization`
output) and returns a list of violation messages, empty when everything complies, so a test can
assert `== []` and see every problem at once. Usable for any pod-bearing object, including the
training workers' Job the trainer builds. The container rules include what the
namespace's Pod Security "restricted" profile would otherwise reject only at admission time.
"""

import re

# Where each workload kind keeps its pod spec.
POD_SPEC_PATHS = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
REQUIRED_RESOURCES = ("cpu", "memory")
# Resources Kubernetes itself manages; any other (nvidia.com/gpu, ...) is an extended resource,
# whose request must equal its limit.
NATIVE_RESOURCES = {"cpu", "memory", "ephemeral-storage"}
SECCOMP_PROFILES = {"RuntimeDefault", "Localhost"}  # what Pod Security "restricted" accepts
QUANTITY_SUFFIXES = {
    "m": 1e-3,
    "": 1,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
# Verbs that hand out more rights than they name.
DANGEROUS_VERBS = {"escalate", "bind", "impersonate"}
CLUSTER_WIDE_KINDS = {"ClusterRole", "ClusterRoleBinding"}


def object_name(doc):
    """`Kind/name` of an object, for messages."""
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def pod_specs(doc):
    """The pod specs an object runs: none for non-workloads."""
    path = POD_SPEC_PATHS.get(doc.get("kind"))
    if path is None:
        return []
    spec = doc
    for key in path:
        spec = spec[key]
    return [spec]


def parse_quantity(quantity):
    """A Kubernetes resource quantity ("500m", "1536Mi", "2", "1e3", 4) as a number."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?)(?:[eE]([+-]?[0-9]+))?([a-zA-Z]*)", str(quantity))
    if not match or match.group(3) not in QUANTITY_SUFFIXES:
        raise ValueError(f"resource quantity {quantity!r} is not a Kubernetes quantity")
    number, exponent, suffix = match.groups()
    return float(number) * 10 ** int(exponent or 0) * QUANTITY_SUFFIXES[suffix]


def _resource_problems(resources):
    problems = []
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    for section, values in (("requests", requests), ("limits", limits)):
        missing = [r for r in REQUIRED_RESOURCES if r not in values]
        if missing:
            problems.append(f"resources.{section} lacks {', '.join(missing)}")
    for name in sorted(requests.keys() & limits.keys()):
        request, limit = parse_quantity(requests[name]), parse_quantity(limits[name])
        if request > limit:
            problems.append(f"resources.requests.{name} {requests[name]} exceeds the limit")
        if name not in NATIVE_RESOURCES and request != limit:
            problems.append(f"resources.requests.{name} differs from its limit")
    return problems


def image_violation(image):
    """Why an image reference is not pinned (no digest, no tag, or `latest`), or None."""
    if not image:
        return "has no image"
    if "@sha256:" in image:
        return None
    name_and_tag = image.rsplit("/", 1)[-1]
    if ":" not in name_and_tag:
        return f"image {image!r} has no tag"
    if name_and_tag.rsplit(":", 1)[1] == "latest":
        return f"image {image!r} uses the floating tag 'latest'"
    return None


def _container_problems(pod_spec, container):
    pod_context = pod_spec.get("securityContext", {})
    context = container.get("securityContext", {})

    def effective(key):
        return context.get(key, pod_context.get(key))

    problems = []
    image_problem = image_violation(container.get("image"))
    if image_problem:
        problems.append(image_problem)
    problems.extend(_resource_problems(container.get("resources", {})))
    if effective("runAsNonRoot") is not True:
        problems.append("runAsNonRoot is not true")
    user = effective("runAsUser")
    if isinstance(user, bool) or not isinstance(user, int) or user <= 0:
        problems.append(f"runAsUser is {user!r}, not a numeric non-root user id")
    seccomp = (effective("seccompProfile") or {}).get("type")
    if seccomp not in SECCOMP_PROFILES:
        problems.append(f"seccompProfile is {seccomp!r}, not RuntimeDefault or Localhost")
    if context.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem is not true")
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if context.get("privileged"):
        problems.append("is privileged")
    capabilities = context.get("capabilities", {})
    if "ALL" not in capabilities.get("drop", []):
        problems.append("capabilities.drop lacks ALL")
    if capabilities.get("add"):
        problems.append(f"adds capabilities {capabilities['add']}")
    return problems


def container_violations(doc):
    """Every container rule an object breaks, as 'Kind/name container C: problem' messages."""
    messages = []
    for pod_spec in pod_specs(doc):
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod_spec.get(flag):
                messages.append(f"{object_name(doc)}: {flag} is set")
        for volume in pod_spec.get("volumes", []):
            if "hostPath" in volume:
                messages.append(f"{object_name(doc)}: volume {volume['name']} is a hostPath")
        containers = pod_spec.get("initContainers", []) + pod_spec.get("containers", [])
        for container in containers:
            where = f"{object_name(doc)} container {container.get('name')}"
            messages.extend(f"{where}: {p}" for p in _container_problems(pod_spec, container))
    return messages


def rbac_violations(docs, allowed_cluster_wide=()):
    """Least-privilege problems of the RBAC objects among `docs`.

    Flags cluster-wide roles and bindings (unless their name is in `allowed_cluster_wide`),
    wildcards anywhere in a rule, the verbs escalate/bind/impersonate, access to secrets, and
    role bindings whose role is not defined among `docs` (such as the built-in `edit`).
    """
    messages = []
    roles = {doc["metadata"]["name"] for doc in docs if doc.get("kind") == "Role"}
    for doc in docs:
        kind = doc.get("kind")
        if kind in CLUSTER_WIDE_KINDS and doc["metadata"]["name"] not in allowed_cluster_wide:
            messages.append(f"{object_name(doc)}: cluster-wide RBAC object")
        if kind in ("Role", "ClusterRole"):
            for number, rule in enumerate(doc.get("rules", [])):
                where = f"{object_name(doc)} rule {number}"
                for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                    if any("*" in value for value in rule.get(field, [])):
                        messages.append(f"{where}: wildcard in {field}")
                for verb in sorted(DANGEROUS_VERBS & set(rule.get("verbs", []))):
                    messages.append(f"{where}: grants {verb}")
                if "secrets" in rule.get("resources", []):
                    messages.append(f"{where}: grants access to secrets")
        if kind == "RoleBinding":
            ref = doc["roleRef"]
            if ref["kind"] != "Role" or ref["name"] not in roles:
                messages.append(
                    f"{object_name(doc)}: binds {ref['kind']}/{ref['name']}, "
                    "not a Role defined here"
                )
    return messages
