"""The static Kubernetes files in k8s/*.yaml (not the Job templates in k8s/jobs/): every document is
valid against the Kubernetes 1.37 schemas, the controller's Role is least-privilege and namespaced,
the example Secret holds only placeholders, and every pod is locked down and sized."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
K8S_VERSION = "1.37.0"
NAMESPACE = "selma"
FILES = sorted(K8S.glob("*.yaml"))


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


DOCS = [(path, i, doc) for path in FILES for i, doc in enumerate(load(path))]
DOC_IDS = [f"{path.name}#{i}:{doc.get('kind')}" for path, i, doc in DOCS]


def docs_of(kind: str) -> list[dict]:
    return [doc for _, _, doc in DOCS if doc.get("kind") == kind]


def one(kind: str, name: str) -> dict:
    found = [doc for doc in docs_of(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


CLUSTER_SCOPED = {"Namespace", "ClusterQueue", "ResourceFlavor"}
DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")


def test_the_expected_files_are_there():
    names = {path.name for path in FILES}
    expected = {
        "namespace.yaml",
        "rbac.yaml",
        "serviceaccount.yaml",
        "secrets.example.yaml",
        "kueue.yaml",
        "llm-server.yaml",
        "gc-cronjob.yaml",
    }
    assert expected <= names, sorted(expected - names)


# --- schema validation ----------------------------------------------------------------------------

# kubernetes-validate ships the schemas of Kubernetes' own APIs only. Kueue's custom resources
# (kueue.x-k8s.io) have none there, so they are checked by hand below (apiVersion, kind, names,
# required and known fields, cross-references), not skipped.
KUEUE_API = "kueue.x-k8s.io/v1beta2"
KUEUE_SPEC_FIELDS = {
    "ResourceFlavor": {"nodeLabels", "nodeTaints", "tolerations", "topologyName"},
    "ClusterQueue": {
        "namespaceSelector",
        "queueingStrategy",
        "resourceGroups",
        "cohortName",
        "preemption",
        "flavorFungibility",
        "fairSharing",
        "admissionChecksStrategy",
        "admissionScope",
        "stopPolicy",
    },
    "LocalQueue": {"clusterQueue", "stopPolicy", "fairSharing"},
}


def is_kueue(doc: dict) -> bool:
    return str(doc.get("apiVersion", "")).startswith("kueue.x-k8s.io/")


@pytest.mark.parametrize("path,index,doc", DOCS, ids=DOC_IDS)
def test_document_is_valid(path, index, doc):
    if is_kueue(doc):
        check_kueue_document(doc)
    else:
        # strict: unknown fields are errors too. A kind without a schema raises SchemaNotFoundError,
        # which fails this test: add a hand check for it like Kueue's.
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def check_kueue_document(doc: dict) -> None:
    assert doc["apiVersion"] == KUEUE_API, (
        f"{doc['kind']}: apiVersion {doc['apiVersion']}, expected {KUEUE_API}"
    )
    kind = doc["kind"]
    assert kind in KUEUE_SPEC_FIELDS, f"unexpected Kueue kind {kind}"
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, sorted(doc)
    meta = doc["metadata"]
    assert set(meta) <= {"name", "namespace", "labels", "annotations"}, sorted(meta)
    assert DNS_1123.fullmatch(meta["name"]) and len(meta["name"]) <= 63, meta["name"]
    spec = doc.get("spec", {})
    assert set(spec) <= KUEUE_SPEC_FIELDS[kind], (
        f"{kind}: unknown spec fields {sorted(set(spec) - KUEUE_SPEC_FIELDS[kind])}"
    )
    if kind == "ResourceFlavor":
        assert all(isinstance(v, str) for v in spec.get("nodeLabels", {}).values()), "nodeLabels: strings"
        for taint in spec.get("nodeTaints", []):
            assert taint.get("key") and taint.get("effect") in {"NoSchedule", "PreferNoSchedule", "NoExecute"}
    elif kind == "ClusterQueue":
        assert spec.get("resourceGroups"), "ClusterQueue: resourceGroups is required"
        assert spec.get("queueingStrategy", "BestEffortFIFO") in {"StrictFIFO", "BestEffortFIFO"}
        for group in spec["resourceGroups"]:
            covered = group["coveredResources"]
            assert covered and group["flavors"], group
            for flavor in group["flavors"]:
                # Kueue requires each flavor to list exactly the covered resources, in their order.
                assert [r["name"] for r in flavor["resources"]] == covered, flavor
                for resource in flavor["resources"]:
                    assert QUANTITY.fullmatch(str(resource["nominalQuota"])), resource
    elif kind == "LocalQueue":
        assert spec.get("clusterQueue"), "LocalQueue: spec.clusterQueue is required"


def test_kueue_objects_fit_together():
    flavors = {doc["metadata"]["name"] for doc in docs_of("ResourceFlavor")}
    queues = {doc["metadata"]["name"]: doc for doc in docs_of("ClusterQueue")}
    for queue in queues.values():
        for group in queue["spec"]["resourceGroups"]:
            for flavor in group["flavors"]:
                assert flavor["name"] in flavors, (
                    f"ClusterQueue uses undefined ResourceFlavor {flavor['name']}"
                )
    local = one("LocalQueue", "selma")
    assert local["metadata"]["namespace"] == NAMESPACE
    assert local["spec"]["clusterQueue"] in queues
    # The ClusterQueue takes workloads from the selma namespace.
    selector = queues[local["spec"]["clusterQueue"]]["spec"].get("namespaceSelector", {})
    assert selector in ({}, {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}), selector


def template_resources() -> set[str]:
    """Every resource a Job template in k8s/jobs/ requests (those Kueue must cover)."""
    names = {"cpu", "memory", "nvidia.com/gpu"}
    for path in sorted((K8S / "jobs").glob("*.yaml")):
        for doc in load(path):
            for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                for section in ("requests", "limits"):
                    names |= set(container.get("resources", {}).get(section, {}))
    return names


def test_kueue_covers_every_resource_the_jobs_request():
    # Kueue never admits a workload asking for a resource its ClusterQueue does not cover.
    queue = one("ClusterQueue", one("LocalQueue", "selma")["spec"]["clusterQueue"])
    covered = {name for group in queue["spec"]["resourceGroups"] for name in group["coveredResources"]}
    missing = template_resources() - covered
    assert not missing, f"ClusterQueue does not cover {sorted(missing)}"


# --- labels and namespaces ------------------------------------------------------------------------


@pytest.mark.parametrize("path,index,doc", DOCS, ids=DOC_IDS)
def test_labels_and_namespace(path, index, doc):
    labels = doc["metadata"].get("labels", {})
    assert labels.get("app.kubernetes.io/part-of") == "selma", labels
    assert labels.get("app.kubernetes.io/name") and labels.get("app.kubernetes.io/component"), labels
    if doc["kind"] in CLUSTER_SCOPED:
        assert "namespace" not in doc["metadata"], f"{doc['kind']} is cluster-scoped"
    else:
        assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]


# --- RBAC -----------------------------------------------------------------------------------------

# What the controller needs, and nothing more (see the comment in k8s/rbac.yaml).
CONTROLLER_RULES = {
    ("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
    ("", "pods"): {"list"},
    ("", "pods/log"): {"get"},
    ("", "configmaps"): {"create", "list", "delete"},
    ("", "services"): {"create", "get", "list", "delete"},
}


def test_nothing_cluster_wide_in_rbac():
    kinds = {doc["kind"] for _, _, doc in DOCS}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, kinds


def test_roles_grant_no_wildcards():
    for role in docs_of("Role"):
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(key, []), f"Role {role['metadata']['name']}: '*' in {key}"
            assert not rule.get("nonResourceURLs"), "nonResourceURLs are cluster-wide"


def test_controller_role_is_exactly_what_the_controller_needs():
    role = one("Role", "selma-controller")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == CONTROLLER_RULES
    binding = one("RoleBinding", "selma-controller")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "selma-controller",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "selma-controller", "namespace": NAMESPACE}
    ]
    one("ServiceAccount", "selma-controller")


def test_job_service_account_mounts_no_token():
    account = one("ServiceAccount", "selma-job")
    assert account.get("automountServiceAccountToken") is False
    # Jobs never call the Kubernetes API: no binding may give this account a Role.
    for binding in docs_of("RoleBinding"):
        assert all(s["name"] != "selma-job" for s in binding["subjects"]), binding["metadata"]["name"]


# --- secrets --------------------------------------------------------------------------------------

PLACEHOLDER = re.compile(r"REPLACE_ME")
CREDENTIAL_KEYS = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "HF_TOKEN",
    "OPENAI_API_KEY",
}


def test_secret_example_holds_only_placeholders():
    secrets = docs_of("Secret")
    assert [s["metadata"]["name"] for s in secrets] == ["selma-credentials"]
    assert {path.name for path, _, doc in DOCS if doc["kind"] == "Secret"} == {"secrets.example.yaml"}
    secret = secrets[0]
    assert secret.get("type") == "Opaque"
    # base64 `data` could hide a real value: only readable stringData.
    assert "data" not in secret
    assert set(secret["stringData"]) == CREDENTIAL_KEYS
    for key, value in secret["stringData"].items():
        assert PLACEHOLDER.fullmatch(str(value)), f"{key}: not a placeholder"


# --- pods -----------------------------------------------------------------------------------------


def pod_specs() -> list[tuple[str, dict]]:
    found = []
    for path, _, doc in DOCS:
        name = f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"
        spec = doc.get("spec", {})
        if doc["kind"] == "Pod":
            found.append((name, spec))
        elif doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
            found.append((name, spec["template"]["spec"]))
        elif doc["kind"] == "CronJob":
            found.append((name, spec["jobTemplate"]["spec"]["template"]["spec"]))
    return found


POD_SPECS = pod_specs()


def test_there_are_pods_to_check():
    assert POD_SPECS, "no pod spec found in k8s/*.yaml (the LLM server has one)"


@pytest.mark.parametrize("name,spec", POD_SPECS, ids=[name for name, _ in POD_SPECS])
def test_pod_is_locked_down_and_sized(name, spec):
    pod_security = spec.get("securityContext", {})
    containers = spec.get("initContainers", []) + spec["containers"]
    for container in containers:
        where = f"{name} container {container['name']}"
        security = container.get("securityContext", {})
        assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, where
        seccomp = security.get("seccompProfile", pod_security.get("seccompProfile", {}))
        assert seccomp.get("type") == "RuntimeDefault", where
        assert security.get("allowPrivilegeEscalation") is False, where
        assert "ALL" in security.get("capabilities", {}).get("drop", []), where
        assert not security.get("capabilities", {}).get("add"), where
        assert not security.get("privileged"), where
        resources = container.get("resources", {})
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(section, {})), f"{where}: resources.{section}"
        image = container["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: pin {image}"
        for env in container.get("env", []):
            if re.search(r"KEY|SECRET|TOKEN|PASSWORD", env["name"]):
                assert "value" not in env, f"{where}: {env['name']} must come from a Secret (valueFrom)"
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name


# --- the in-cluster LLM server --------------------------------------------------------------------


def commented_yaml(path: Path, first_key: str) -> dict:
    """The YAML example in a file's leading comment that starts with ``first_key:``."""
    lines = [line[1:] for line in path.read_text().splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.strip() == f"{first_key}:")
    indent = len(lines[start]) - len(lines[start].lstrip())
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.strip() or len(line) - len(line.lstrip()) <= indent:
            break
        block.append(line)
    return yaml.safe_load("\n".join(line[indent:] for line in block))


def test_llm_server_matches_the_prompts_config_it_documents():
    from selma_core.phases.prompts import PromptsConfig
    from selma_core.typed_yaml import from_dict

    example = commented_yaml(K8S / "llm-server.yaml", "prompts")["prompts"]
    # The documented keys are the real ones: the config loader rejects unknown keys.
    cfg = from_dict(PromptsConfig, example, "k8s/llm-server.yaml", "prompts.")
    assert cfg.backend == "openai"

    service = one("Service", "selma-llm")
    port = service["spec"]["ports"][0]["port"]
    assert cfg.openai.base_url == f"http://selma-llm.{service['metadata']['namespace']}.svc:{port}/v1"

    deployment = one("Deployment", "selma-llm")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items(), "the Service selects the server's pods"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    assert container["image"].startswith("vllm/vllm-openai:v")
    args = container["args"]
    assert args[args.index("--served-model-name") + 1] == cfg.openai.model
    assert args[args.index("--port") + 1] == str(port)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
    hf_token = next(env for env in container["env"] if env["name"] == "HF_TOKEN")
    assert hf_token["valueFrom"]["secretKeyRef"] == {
        "name": "selma-credentials",
        "key": "HF_TOKEN",
        "optional": True,
    }


# --- the nightly garbage collection ----------------------------------------------------------------


def test_the_gc_cronjob_runs_jobs_gc_on_the_config_it_mounts():
    """What the CronJob runs is a command jobs.gc accepts, deleting, on the file the ConfigMap its
    header tells to create puts where the command reads it; one run at a time, as the jobs' identity."""
    from jobs.gc import build_parser

    cron = one("CronJob", "selma-gc")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"][:3] == ["python", "-m", "jobs.gc"]
    args = build_parser().parse_args(container["command"][3:])
    assert args.delete and not args.abandoned
    [mount] = [m for m in container["volumeMounts"] if Path(args.config).parent == Path(m["mountPath"])]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    header = (K8S / "gc-cronjob.yaml").read_text()
    name, file = volume["configMap"]["name"], Path(args.config).name
    assert f"create configmap {name} --from-file={file}=" in header
    assert pod["serviceAccountName"] == one("ServiceAccount", "selma-job")["metadata"]["name"]
