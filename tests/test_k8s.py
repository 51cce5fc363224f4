"""k8s/: the manifests parse, the kustomize composition resolves, every object validates against the
Kubernetes and KubeRay schemas, and the deployment rules hold: secrets only by reference, requests
and limits on every container, one shared volume at /data everywhere, Ray token auth on, the Ray
head reachable only inside the cluster, the RayJob and the long-lived RayCluster in step.

Offline and in seconds. The overlays are resolved here by a small kustomize (resources, components,
images, JSON6902 patches through the `jsonpatch` library); where a kustomize binary (`kustomize` or
`kubectl kustomize`) is installed its output must equal ours. The KubeRay CRDs come from
../shared/k8s-crds; those tests skip when it is absent (a fresh clone).
Not checked offline: CEL rules (x-kubernetes-validations) and anything that needs an API server.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
README = K8S / "README.md"
DOCKERFILE = K8S / "image" / "Dockerfile"

# What a user builds: the shared volume, the compute overlays, the per-study RayJob overlays.
ENTRYPOINTS = ["storage", "overlays/cpu-only", "overlays/gpu", "overlays/cpu-only/study", "overlays/gpu/study"]
VARIANTS = ["cpu-only", "gpu"]
STUDY_PLACEHOLDER = "STUDY_NAME"
SAMPLE_STUDY = "a" * 36 + "-k8s1"  # 41 characters: the longest STUDY the README allows

PVC_NAME = "scaling-data"
DATA_PATH = "/data"
RAY_KINDS = {"RayCluster", "RayJob"}
SERVE_COMMAND = ["scaling", "serve", "--host", "0.0.0.0", "--port", "8000", "--root", "/data/runs", "--read-only"]
STUDY_ENTRYPOINT = "scaling run /studies/study.yaml --address auto"
PLACEHOLDER_IMAGES = {"scaling-ray-image", "scaling-api-image"}
# The oldest Kubernetes we support and the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_RAYJOB_NAME = 47  # KubeRay: MaxRayClusterNameLength (53) - 6
MAX_RAYCLUSTER_NAME = 53


# --------------------------------------------------------------------------------------------------
# YAML: duplicate keys are an error (PyYAML would silently keep the last one)


class _StrictLoader(yaml.SafeLoader):
    pass


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    keys = [loader.construct_object(key, deep=deep) for key, _ in node.value]
    repeated = sorted({str(k) for k, n in Counter(keys).items() if n > 1})
    if repeated:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {repeated}", node.start_mark)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=_StrictLoader) if doc is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def manifest_files() -> list[Path]:
    """Kubernetes objects and kustomizations: every YAML file but the example study files."""
    return [p for p in yaml_files() if K8S / "studies" not in p.parents]


# --------------------------------------------------------------------------------------------------
# A small kustomize: exactly the features k8s/ uses; anything else fails loudly.

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "components", "images", "patches"}
API_VERSIONS = {"Kustomization": "kustomize.config.k8s.io/v1beta1", "Component": "kustomize.config.k8s.io/v1alpha1"}


class Kustomize:
    def __init__(self) -> None:
        self.patch_hits: Counter[tuple[str, int]] = Counter()  # (kustomization file, patch index) -> objects patched
        self.visited: set[Path] = set()

    def build(self, directory: Path) -> list[dict]:
        objects = self._build(directory.resolve(), "Kustomization", [])
        ids = Counter((o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in objects)
        assert all(n == 1 for n in ids.values()), f"{directory}: objects defined twice: {[i for i, n in ids.items() if n > 1]}"
        return objects

    def _build(self, directory: Path, kind: str, inherited: list[dict]) -> list[dict]:
        path = directory / "kustomization.yaml"
        assert path.is_file(), f"{directory}: no kustomization.yaml"
        self.visited.add(directory)
        spec = load_docs(path)[0]
        unknown = set(spec) - KUSTOMIZATION_FIELDS
        if unknown:
            raise NotImplementedError(f"{path}: {sorted(unknown)} not resolved by this test's kustomize; extend it")
        assert spec.get("kind", "Kustomization") == kind, f"{path}: kind {spec.get('kind')!r}, expected {kind}"
        assert spec.get("apiVersion") == API_VERSIONS[kind], f"{path}: apiVersion {spec.get('apiVersion')!r}"
        objects = [copy.deepcopy(o) for o in inherited]  # a Component transforms what its parent has so far
        for entry in spec.get("resources", []):
            target = (directory / entry).resolve()
            if target.is_dir():
                objects += self._build(target, "Kustomization", [])
            else:  # kustomize's load restrictor: resource files must lie in or below the kustomization
                assert target.is_relative_to(directory), f"{path}: {entry} is outside {directory}"
                objects += load_docs(target)
        for entry in spec.get("components", []):
            objects = self._build((directory / entry).resolve(), "Component", objects)
        for index, entry in enumerate(spec.get("patches", [])):
            patch, target = self._json6902(path, entry), entry.get("target", {})
            for obj in objects:
                if _target_matches(target, obj):
                    patched = patch.apply(obj)
                    obj.clear()
                    obj.update(patched)
                    self.patch_hits[(str(path), index)] += 1
            self.patch_hits.setdefault((str(path), index), 0)
        for obj in objects:
            _set_images(obj, spec.get("images", []))
        return objects

    @staticmethod
    def _json6902(path: Path, entry: dict) -> jsonpatch.JsonPatch:
        unknown = set(entry) - {"patch", "path", "target"}
        if unknown:
            raise NotImplementedError(f"{path}: patch fields {sorted(unknown)}")
        text = entry["patch"] if "patch" in entry else (path.parent / entry["path"]).read_text()
        ops = yaml.load(text, Loader=_StrictLoader)
        if not isinstance(ops, list):
            raise NotImplementedError(f"{path}: strategic-merge patches are not resolved here; write JSON6902 operations")
        return jsonpatch.JsonPatch(ops)


def _target_matches(target: dict, obj: dict) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name"}
    if unknown:
        raise NotImplementedError(f"patch target fields {sorted(unknown)}")
    group, _, version = obj["apiVersion"].rpartition("/")
    actual = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    return all(re.fullmatch(pattern, actual[field]) for field, pattern in target.items())  # kustomize: anchored regexes


def split_image(image: str) -> tuple[str, str | None, str | None]:
    name, _, digest = image.partition("@")
    slash, colon = name.rfind("/"), name.rfind(":")
    tag = None
    if colon > slash:  # a ':' before the last '/' is a registry port
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest or None


def _set_images(obj: dict, images: list[dict]) -> None:
    """kustomize's `images:`: rewrites `image` in every containers/initContainers list, CRDs included."""
    for entry in images:
        unknown = set(entry) - {"name", "newName", "newTag", "digest"}
        if unknown:
            raise NotImplementedError(f"images fields {sorted(unknown)}")
    for container in iter_containers(obj):
        name, tag, digest = split_image(container["image"])
        for entry in images:
            if entry["name"] != name:
                continue
            new = entry.get("newName", name)
            if "digest" in entry:
                container["image"] = f"{new}@{entry['digest']}"
            elif "newTag" in entry:
                container["image"] = f"{new}:{entry['newTag']}"
            else:
                container["image"] = new + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
            break


# --------------------------------------------------------------------------------------------------
# Walking objects


def iter_containers(node: Any) -> Iterator[dict]:
    """Every container (and init container) anywhere in an object: pod templates nested in CRDs too."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            yield from iter_containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from iter_containers(item)


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(role, pod template) of every pod an object makes."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind == "Deployment":
        return [("api", spec["template"])]
    if kind == "RayCluster":
        return ray_pod_templates(spec)
    if kind == "RayJob":
        templates = ray_pod_templates(spec["rayClusterSpec"])
        if "submitterPodTemplate" in spec:
            templates.append(("submitter", spec["submitterPodTemplate"]))
        return templates
    return []


def ray_pod_templates(cluster_spec: dict) -> list[tuple[str, dict]]:
    groups = [(f"worker:{g['groupName']}", g["template"]) for g in cluster_spec.get("workerGroupSpecs", [])]
    return [("head", cluster_spec["headGroupSpec"]["template"])] + groups


def ray_node_templates(obj: dict) -> list[tuple[str, dict]]:
    return [(role, t) for role, t in pod_templates(obj) if role == "head" or role.startswith("worker:")]


def cluster_spec(obj: dict) -> dict:
    return obj["spec"] if obj["kind"] == "RayCluster" else obj["spec"]["rayClusterSpec"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def render_study(objects: list[dict], study: str) -> list[dict]:
    """What `kubectl kustomize ... | sed "s/STUDY_NAME/$STUDY/g"` produces."""
    text = yaml.safe_dump_all(objects).replace(STUDY_PLACEHOLDER, study)
    return [o for o in yaml.safe_load_all(text) if o]


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@lru_cache(maxsize=None)
def _built(entrypoint: str) -> str:
    return json.dumps(Kustomize().build(K8S / entrypoint))


def build(entrypoint: str) -> list[dict]:
    """The resolved objects of k8s/<entrypoint> (a fresh copy); study RayJobs rendered for SAMPLE_STUDY."""
    objects = json.loads(_built(entrypoint))
    return render_study(objects, SAMPLE_STUDY) if entrypoint.endswith("study") else objects


def all_objects() -> list[dict]:
    return [o for e in ENTRYPOINTS for o in build(e)]


# --------------------------------------------------------------------------------------------------
# Parsing and composition


def test_every_manifest_parses_without_duplicate_keys():
    files = manifest_files()
    assert len(files) >= 10, files
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc, f"{path}: not a Kubernetes object"
            if doc["kind"] not in API_VERSIONS:
                assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} without metadata.name"


def test_duplicate_keys_are_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: 2\na: 3\n")
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate keys"):
        load_docs(bad)


EXPECTED_KINDS = {
    "storage": ["PersistentVolumeClaim"],
    "overlays/cpu-only": ["Deployment", "NetworkPolicy", "RayCluster", "Service"],
    "overlays/gpu": ["Deployment", "NetworkPolicy", "RayCluster", "Service"],
    "overlays/cpu-only/study": ["RayJob"],
    "overlays/gpu/study": ["RayJob"],
}


@pytest.mark.parametrize("entrypoint", ENTRYPOINTS)
def test_kustomizations_resolve(entrypoint):
    objects = build(entrypoint)
    assert sorted(o["kind"] for o in objects) == EXPECTED_KINDS[entrypoint]
    for obj in objects:
        for container in iter_containers(obj):
            assert split_image(container["image"])[0] not in PLACEHOLDER_IMAGES, (
                f"{entrypoint}: {obj['kind']} still has the placeholder image {container['image']}"
            )
        assert STUDY_PLACEHOLDER not in json.dumps(obj)


def test_every_kustomization_is_used_and_every_patch_applies():
    kustomize = Kustomize()
    for entrypoint in ENTRYPOINTS:
        kustomize.build(K8S / entrypoint)
    declared = {p.parent.resolve() for p in K8S.rglob("kustomization.yaml")}
    assert declared == kustomize.visited, f"not reached from {ENTRYPOINTS}: {sorted(map(str, declared - kustomize.visited))}"
    unused = [key for key, hits in kustomize.patch_hits.items() if hits == 0]
    assert not unused, f"patches that match no object (a misspelled target?): {unused}"


def test_resolver_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [cm.yaml]\n"
        "patches:\n- patch: |-\n    apiVersion: v1\n    kind: ConfigMap\n    metadata: {name: x}\n    data: {a: b}\n"
    )
    with pytest.raises(NotImplementedError, match="strategic-merge"):
        Kustomize().build(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [cm.yaml]\nnamePrefix: x-\n"
    )
    with pytest.raises(NotImplementedError, match="namePrefix"):
        Kustomize().build(tmp_path)


def test_json6902_test_op_guards_the_gpu_group_removal(tmp_path):
    """The cpu-only component removes workerGroupSpecs[1] only if it is the gpu group."""
    component = K8S / "components" / "cpu-only"
    shutil.copytree(K8S / "base", tmp_path / "base")
    shutil.copytree(component, tmp_path / "components" / "cpu-only")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [../base]\ncomponents: [../components/cpu-only]\n"
    )
    cluster = one(Kustomize().build(overlay), "RayCluster")
    assert [g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]] == ["cpu"]
    raycluster = tmp_path / "base" / "raycluster.yaml"
    raycluster.write_text(raycluster.read_text().replace("groupName: gpu", "groupName: accel"))
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        Kustomize().build(overlay)


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("entrypoint", ENTRYPOINTS)
def test_resolver_agrees_with_real_kustomize(entrypoint):
    command = _kustomize_command()
    if command is None:
        pytest.skip("neither `kustomize` nor `kubectl` is installed; the overlays were resolved by this file's kustomize only")
    out = subprocess.run([*command, str(K8S / entrypoint)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = [o for o in yaml.safe_load_all(out.stdout) if o]
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(theirs, key=key) == sorted(json.loads(_built(entrypoint)), key=key)


# --------------------------------------------------------------------------------------------------
# Kubernetes schemas (kubernetes-validate, strict: unknown fields are errors)


def _core_objects() -> list[dict]:
    """Core objects of every build, plus every pod template inside the Ray objects as a PodTemplate."""
    seen, out = set(), []
    for obj in all_objects():
        candidates = [obj] if obj["kind"] not in RAY_KINDS else []
        for role, template in pod_templates(obj) if obj["kind"] in RAY_KINDS else []:
            name = f"{obj['metadata']['name']}-{role.replace(':', '-')}"
            candidates.append({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template})
        for candidate in candidates:
            key = json.dumps(candidate, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(candidate)
    return out


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_validate_against_kubernetes_schemas(version):
    objects = _core_objects()
    assert {o["kind"] for o in objects} >= {"PersistentVolumeClaim", "Deployment", "Service", "NetworkPolicy", "PodTemplate"}
    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {error.message}")
    assert not errors, "\n".join(errors)


def test_kubernetes_validation_catches_a_misspelled_field():
    deployment = copy.deepcopy(one(build("overlays/cpu-only"), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/", "port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


# --------------------------------------------------------------------------------------------------
# KubeRay CRD schemas (../shared/k8s-crds)


@pytest.fixture
def kuberay_crds() -> Path:
    crds = ROOT.parent / "shared" / "k8s-crds"  # ../shared, as in conftest.SHARED
    if not crds.is_dir():
        pytest.skip(
            f"{crds} not present (a fresh clone has no ../shared): RayCluster/RayJob not validated against the KubeRay CRDs"
        )
    return crds


@lru_cache(maxsize=None)
def _openapi_schema(crds: Path, kind: str) -> dict:
    path = crds / f"ray.io_{kind.lower()}s.yaml"
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 40k lines: libyaml
    assert crd["spec"]["names"]["kind"] == kind
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def strict_schema(node: Any) -> Any:
    """additionalProperties: false wherever properties are listed (and unknown fields are not preserved)."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items()}
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _list_type(validator, list_type, instance, schema):
    """The API server's uniqueness rules for x-kubernetes-list-type map/set (jsonschema ignores them)."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        items = [json.dumps(i, sort_keys=True) for i in instance]
        if len(set(items)) != len(items):
            yield jsonschema.ValidationError(f"duplicate items in a set-type list: {instance}")
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        defaults = {k: schema.get("items", {}).get("properties", {}).get(k, {}).get("default") for k in keys}
        seen = Counter(tuple(item.get(k, defaults[k]) for k in keys) for item in instance)
        for key, count in seen.items():
            if count > 1:
                yield jsonschema.ValidationError(f"duplicate entries for {dict(zip(keys, key))} in a map-type list")


_CRDValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type})


@lru_cache(maxsize=None)
def _validator(crds: Path, kind: str, strict: bool) -> jsonschema.protocols.Validator:
    schema = _openapi_schema(crds, kind)
    return _CRDValidator(strict_schema(schema) if strict else schema)


def crd_errors(crds: Path, obj: dict, strict: bool) -> list[str]:
    validator = _validator(crds, obj["kind"], strict)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def _ray_objects() -> list[dict]:
    return [o for o in all_objects() if o["kind"] in RAY_KINDS] + [
        o for e in ("base", "study") for o in build(e) if o["kind"] in RAY_KINDS
    ]


@pytest.mark.parametrize("strict", [False, True], ids=["crd", "strict-crd"])
def test_ray_objects_validate_against_kuberay_crds(kuberay_crds, strict):
    objects = _ray_objects()
    assert Counter(o["kind"] for o in objects) == {"RayCluster": 3, "RayJob": 3}
    errors = [f"{o['kind']}/{o['metadata']['name']}: {e}" for o in objects for e in crd_errors(kuberay_crds, o, strict)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    "kind, path, field",
    [
        ("RayCluster", ("spec", "workerGroupSpecs", 0), "minReplica"),
        ("RayCluster", ("spec", "headGroupSpec", "template", "spec", "containers", 0), "resource"),
        ("RayJob", ("spec",), "ttlSecondAfterFinished"),
        ("RayJob", ("spec", "rayClusterSpec", "authOptions"), "secret"),
    ],
)
def test_strict_crd_schema_catches_misspelled_fields(kuberay_crds, kind, path, field):
    obj = next(o for o in _ray_objects() if o["kind"] == kind)
    node = obj
    for step in path:
        node = node[step]
    node[field] = 1 if field != "secret" else "x"
    assert not crd_errors(kuberay_crds, obj, strict=False), "the published CRD tolerates unknown fields here"
    assert any(field in e for e in crd_errors(kuberay_crds, obj, strict=True))


def test_crd_list_map_keys_are_enforced(kuberay_crds):
    cluster = copy.deepcopy(one(build("overlays/gpu"), "RayCluster"))
    ports = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    ports.append({"name": "again", "containerPort": ports[0]["containerPort"]})
    assert any("duplicate" in e for e in crd_errors(kuberay_crds, cluster, strict=True))


# --------------------------------------------------------------------------------------------------
# KubeRay's own admission rules (ray-operator/controllers/ray/utils/validation.go), no CRDs needed


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def kuberay_problems(obj: dict) -> list[str]:
    problems = []
    name = obj["metadata"]["name"]
    limit = MAX_RAYJOB_NAME if obj["kind"] == "RayJob" else MAX_RAYCLUSTER_NAME
    if not DNS1035.fullmatch(name) or len(name) > limit:
        problems.append(f"name {name!r} is not a DNS-1035 label of at most {limit} characters")
    spec = cluster_spec(obj)
    if not spec["headGroupSpec"]["template"]["spec"].get("containers"):
        problems.append("head group without containers")
    if spec.get("authOptions", {}).get("mode") == "token" and _version(spec.get("rayVersion", "0")) < (2, 52, 0):
        problems.append("authOptions.mode token needs rayVersion >= 2.52.0")
    autoscaler_v2 = spec.get("enableInTreeAutoscaling") and spec.get("autoscalerOptions", {}).get("version") == "v2"
    groups = [spec["headGroupSpec"]] + spec.get("workerGroupSpecs", [])
    for group in groups:
        params = group.get("rayStartParams", {})
        if group.get("resources") and any(k in params for k in ("num-cpus", "num-gpus", "memory", "resources")):
            problems.append("resources in both rayStartParams and resources")
        if "labels" in params:
            problems.append("rayStartParams['labels'] is not supported")
        if autoscaler_v2 and group["template"]["spec"].get("restartPolicy", "Never") != "Never":
            problems.append("autoscaler v2 needs restartPolicy Never or unset")
    names = [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
    if len(set(names)) != len(names):
        problems.append(f"worker group names repeat: {names}")
    for group in spec.get("workerGroupSpecs", []):
        if not group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
            problems.append(f"group {group['groupName']}: replicas outside [minReplicas, maxReplicas]")
    if obj["kind"] == "RayJob":
        job = obj["spec"]
        if job.get("ttlSecondsAfterFinished", 0) > 0 and not job.get("shutdownAfterJobFinishes"):
            problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if job.get("clusterSelector") or "rayClusterSpec" not in job:
            problems.append("the study RayJob must bring its own cluster (its head mounts the study file)")
        if job.get("activeDeadlineSeconds", 1) <= 0 or job.get("backoffLimit", 0) < 0:
            problems.append("activeDeadlineSeconds must be > 0 and backoffLimit >= 0")
        if "deletionStrategy" in job:
            problems.append("deletionStrategy needs the RayJobDeletionPolicy feature gate; use shutdownAfterJobFinishes")
        submitter = job.get("submitterPodTemplate")
        if submitter and submitter["spec"].get("restartPolicy") not in ("Never", "OnFailure"):
            problems.append("a Job's pods need restartPolicy Never or OnFailure")
    return problems


def test_ray_objects_pass_kuberay_admission_rules():
    ray = [o for o in all_objects() if o["kind"] in RAY_KINDS]
    problems = [f"{o['kind']}/{o['metadata']['name']}: {p}" for o in ray for p in kuberay_problems(o)]
    assert not problems, "\n".join(problems)


def test_kuberay_rules_catch_bad_objects():
    job = copy.deepcopy(one(build("overlays/gpu/study"), "RayJob"))
    job["metadata"]["name"] = "study-" + "x" * 42
    job["spec"]["shutdownAfterJobFinishes"] = False
    job["spec"]["rayClusterSpec"]["rayVersion"] = "2.51.0"
    problems = kuberay_problems(job)
    assert len(problems) == 3, problems
    assert kuberay_problems(one(render_study(json.loads(_built("overlays/gpu/study")), "Bad_Name"), "RayJob"))


# --------------------------------------------------------------------------------------------------
# Secrets: only references, never values

SECRET_ENV = re.compile(r"(TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL)", re.I)
SECRET_TEXT = [
    (re.compile(r"\b[0-9a-f]{32,}\b", re.I), "a long hex string (W&B keys are 40 hex characters)"),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"\b(ghp|gho|hf|sk|xox[abp])[-_][A-Za-z0-9_-]{20,}"), "a provider token"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\b[A-Za-z0-9+/]{40,}={0,2}"), "a long base64 string"),
    (re.compile(r"--from-literal=[\w.-]+=(?![\"']?\$)[^\s\"']+"), "a literal value on a `kubectl create secret` line"),
]


def _looks_random(candidate: str) -> bool:
    """Mixed case and digits, and not a path of short words (spec/rayClusterSpec/workerGroupSpecs/1)."""
    mixed = all(re.search(c, candidate) for c in (r"\d", "[a-z]", "[A-Z]"))
    return mixed and max(len(part) for part in candidate.split("/")) >= 20


def secret_findings(text: str) -> list[str]:
    return [
        f"{why}: {m.group(0)[:12]}..."
        for pattern, why in SECRET_TEXT
        for m in pattern.finditer(text)
        if why != "a long base64 string" or _looks_random(m.group(0))
    ]


def test_secret_scanner_finds_planted_secrets():
    assert secret_findings("WANDB_API_KEY=" + "3f" * 20)
    assert secret_findings("kubectl create secret generic x --from-literal=token=hunter2")
    assert secret_findings("auth_token: " + "c2VjcmV0LXRva2VuLXZhbHVlLWZvci1yYXktY2x1c3RlcnM=")
    assert not secret_findings("path: /spec/rayClusterSpec/workerGroupSpecs/1/groupName")
    assert not secret_findings('kubectl create secret generic x --from-literal=token="$(openssl rand -hex 32)"')


def test_no_literal_secret_in_any_file():
    files = [*yaml_files(), README, DOCKERFILE, ROOT / ".dockerignore"]
    findings = [f"{p.relative_to(ROOT)}: {f}" for p in files for f in secret_findings(p.read_text())]
    assert not findings, "\n".join(findings)


def test_no_secret_objects_and_secret_env_only_by_reference():
    files = manifest_files()
    assert not [p for p in files for d in load_docs(p) if d["kind"] == "Secret"], "ship Secret references, not Secrets"
    for obj in all_objects():
        for container in iter_containers(obj):
            for name, var in env_of(container).items():
                if SECRET_ENV.search(name):
                    assert "value" not in var and "secretKeyRef" in var.get("valueFrom", {}), (
                        f"{obj['kind']}/{obj['metadata']['name']}: {name} must come from a Secret"
                    )


def _secret_refs() -> set[tuple[str, str]]:
    """(Secret name, key) of every reference in the built objects."""
    refs = set()
    for obj in all_objects():
        for container in iter_containers(obj):
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
        if obj["kind"] in RAY_KINDS:
            auth = cluster_spec(obj)["authOptions"]
            refs.add((auth["secretName"], "auth_token"))  # KubeRay reads the token from key auth_token
    return refs


def test_secrets_are_referenced_where_needed():
    refs = _secret_refs()
    assert {("scaling-wandb", "api-key"), ("scaling-ray-auth", "auth_token"), ("scaling-api-token", "token")} <= refs
    for obj in all_objects():
        for role, template in ray_node_templates(obj):
            for container in template["spec"]["containers"]:
                wandb = env_of(container).get("WANDB_API_KEY", {}).get("valueFrom", {}).get("secretKeyRef", {})
                assert wandb.get("optional") is True, f"{role}: WANDB_API_KEY from an optional Secret (else W&B runs offline)"
        if obj["kind"] == "Deployment":
            token = env_of(obj["spec"]["template"]["spec"]["containers"][0])["SCALING_API_TOKEN"]
            assert token["valueFrom"]["secretKeyRef"].get("optional") is not True


def test_readme_creates_every_referenced_secret():
    text = README.read_text()
    for name, key in _secret_refs():
        pattern = rf"create secret generic {re.escape(name)}\b[^\n]*--from-(literal|file)={re.escape(key)}="
        assert re.search(pattern, text), f"k8s/README.md does not show how to create Secret {name} with key {key}"


# --------------------------------------------------------------------------------------------------
# Resources, volumes, exposure, auth

_QUANTITY = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: Any) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(value))
    assert match and match[2] in _QUANTITY, f"cannot read quantity {value!r}"
    return float(match[1]) * _QUANTITY[match[2]]


def resource_problems(resources: dict | None) -> list[str]:
    requests, limits = (resources or {}).get("requests", {}), (resources or {}).get("limits", {})
    sides = (("requests", requests), ("limits", limits))
    problems = [f"no {side}.{r}" for side, values in sides for r in ("cpu", "memory") if r not in values]
    for name in set(requests) & set(limits):
        if quantity(requests[name]) > quantity(limits[name]):
            problems.append(f"requests.{name} {requests[name]} > limits.{name} {limits[name]}")
    for name in (set(requests) | set(limits)) - {"cpu", "memory", "ephemeral-storage"}:
        if requests.get(name) != limits.get(name):  # extended resources (GPUs) cannot overcommit
            problems.append(f"{name}: requests {requests.get(name)} != limits {limits.get(name)}")
    return problems


def test_resource_check_catches_missing_limits():
    assert resource_problems({"requests": {"cpu": "1", "memory": "1Gi"}}) == ["no limits.cpu", "no limits.memory"]
    assert resource_problems({"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}})
    gpu_only_in_limits = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": 1}}
    assert resource_problems(gpu_only_in_limits)


def test_every_container_has_requests_and_limits():
    problems, count = [], 0
    for obj in all_objects():
        for container in iter_containers(obj):
            count += 1
            where = f"{obj['kind']}/{obj['metadata']['name']}/{container['name']}"
            problems += [f"{where}: {p}" for p in resource_problems(container.get("resources"))]
        if obj["kind"] in RAY_KINDS and cluster_spec(obj).get("enableInTreeAutoscaling"):
            # the autoscaler sidecar that KubeRay injects into the head pod
            resources = cluster_spec(obj).get("autoscalerOptions", {}).get("resources")
            problems += [f"{obj['kind']}/{obj['metadata']['name']}/autoscaler: {p}" for p in resource_problems(resources)]
    assert count == 14  # RayCluster 2+3, RayJob 3+4 (with the submitter), Deployment 1+1
    assert not problems, "\n".join(problems)


def test_shared_volume_at_the_same_path_on_every_pod():
    pvc = one(build("storage"), "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == PVC_NAME and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    templates = [(f"{o['kind']}/{role}", t) for o in all_objects() for role, t in pod_templates(o) if role != "submitter"]
    assert len(templates) == 12  # RayCluster and RayJob: 2 (cpu-only) + 3 (gpu) each; 2 Deployments
    for where, template in templates:
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        data = [n for n, v in volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName") == PVC_NAME]
        assert len(data) == 1, f"{where}: mounts {PVC_NAME} {len(data)} times"
        for container in template["spec"]["containers"]:
            mounts = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] == data[0]]
            assert mounts == [DATA_PATH], f"{where}/{container['name']}: {PVC_NAME} at {mounts}, expected {DATA_PATH}"
            if where.endswith(("head", "cpu", "gpu")):
                assert env_of(container)["SCALING_CACHE"]["value"] == f"{DATA_PATH}/cache"


def test_ray_head_not_exposed_and_token_auth_on():
    for obj in all_objects():
        assert obj["kind"] not in ("Ingress", "Route", "Gateway"), f"{obj['kind']} exposes the cluster"
        if obj["kind"] == "Service":
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", f"Service {obj['metadata']['name']} is exposed"
        if obj["kind"] in RAY_KINDS:
            spec = cluster_spec(obj)
            head = spec["headGroupSpec"]
            assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
            assert not head.get("headService"), "a custom head Service could change its type"
            assert spec["authOptions"]["mode"] == "token"
            for container in iter_containers(obj):
                assert env_of(container).get("RAY_AUTH_MODE", {}).get("value", "token") == "token"


def test_network_policy_covers_every_ray_pod():
    for variant in VARIANTS:
        policy = one(build(f"overlays/{variant}"), "NetworkPolicy")
        selector = policy["spec"]["podSelector"]["matchLabels"]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for obj in build(f"overlays/{variant}") + build(f"overlays/{variant}/study"):
            for role, template in ray_node_templates(obj):
                labels = template["metadata"]["labels"]
                assert selector.items() <= labels.items(), f"{obj['kind']} {role} escapes NetworkPolicy {selector}"
        api_labels = one(build(f"overlays/{variant}"), "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert not selector.items() <= api_labels.items()


def test_worker_groups_autoscale_and_gpu_group_only_where_wanted():
    for variant in VARIANTS:
        for obj in build(f"overlays/{variant}") + build(f"overlays/{variant}/study"):
            if obj["kind"] not in RAY_KINDS:
                continue
            spec = cluster_spec(obj)
            assert spec["enableInTreeAutoscaling"] is True
            groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
            assert all(0 <= g["minReplicas"] < g["maxReplicas"] for g in groups.values())
            limits = {n: g["template"]["spec"]["containers"][0]["resources"]["limits"] for n, g in groups.items()}
            gpus = {n: lim.get("nvidia.com/gpu") for n, lim in limits.items()}
            if variant == "gpu":
                assert set(groups) == {"cpu", "gpu"} and int(gpus["gpu"]) >= 1 and gpus["cpu"] is None
            else:
                assert set(groups) == {"cpu"} and "nvidia.com/gpu" not in json.dumps(obj)


def test_images_per_variant():
    for variant, ray_tag in (("cpu-only", "cpu"), ("gpu", "cuda")):
        objects = build(f"overlays/{variant}") + build(f"overlays/{variant}/study")
        ray_images = {c["image"] for o in objects if o["kind"] in RAY_KINDS for c in iter_containers(o)}
        assert len(ray_images) == 1 and split_image(ray_images.pop())[1].endswith(f"-{ray_tag}")
        api = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
        assert split_image(api)[1].endswith("-cpu"), "the query service needs no CUDA"


# --------------------------------------------------------------------------------------------------
# The study RayJob, the query service, the long-lived cluster


def test_rayjob_runs_the_study_from_its_configmap():
    for variant in VARIANTS:
        job = one(build(f"overlays/{variant}/study"), "RayJob")
        spec = job["spec"]
        assert STUDY_ENTRYPOINT in spec["entrypoint"]
        assert spec["backoffLimit"] >= 1 and spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
        assert spec["shutdownAfterJobFinishes"] is True
        # the driver must run on the head, the only pod with /studies
        assert not {"entrypointNumCpus", "entrypointNumGpus", "entrypointResources"} & set(spec)
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        volume = next(v for v in head["volumes"] if "configMap" in v)
        assert volume["configMap"]["name"] == job["metadata"]["name"] == f"study-{SAMPLE_STUDY}"
        assert [i["key"] for i in volume["configMap"]["items"]] == ["study.yaml"]
        mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
        assert mount["mountPath"] == "/studies" and mount.get("readOnly") is True
    readme = README.read_text()
    assert "create configmap study-$STUDY --from-file=study.yaml=" in readme
    assert f'sed "s/{STUDY_PLACEHOLDER}/$STUDY/g"' in readme


def test_rayjob_cluster_matches_the_long_lived_raycluster():
    """The RayJob's cluster is the RayCluster plus the study file on the head; nothing may drift."""
    for variant in VARIANTS:
        expected = one(build(f"overlays/{variant}"), "RayCluster")["spec"]
        actual = copy.deepcopy(one(build(f"overlays/{variant}/study"), "RayJob")["spec"]["rayClusterSpec"])
        head = actual["headGroupSpec"]["template"]["spec"]
        head["volumes"] = [v for v in head["volumes"] if "configMap" not in v]
        head["containers"][0]["volumeMounts"] = [m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] != "/studies"]
        assert actual == expected


def test_query_service_deployment_and_service():
    for variant in VARIANTS:
        objects = build(f"overlays/{variant}")
        deployment, service = one(objects, "Deployment"), one(objects, "Service")
        pod = deployment["spec"]["template"]
        container = pod["spec"]["containers"][0]
        assert container["command"] == SERVE_COMMAND
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] == "/healthz" and ports.get(get["port"], get["port"]) == 8000
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        target = service["spec"]["ports"][0]["targetPort"]
        assert ports.get(target, target) == 8000
        data = next(m for m in container["volumeMounts"] if m["mountPath"] == DATA_PATH)
        assert data.get("readOnly") is True


def test_pods_run_as_the_image_user():
    uid = dockerfile_user()
    for obj in all_objects():
        for where, template in pod_templates(obj):
            context = template["spec"].get("securityContext", {})
            assert context.get("runAsNonRoot") is True and context.get("runAsUser") == uid, f"{obj['kind']} {where}"
            for container in template["spec"]["containers"]:
                assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False


# --------------------------------------------------------------------------------------------------
# The image: Dockerfile and .dockerignore


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for instruction, args in dockerfile_instructions():
        if instruction == "FROM":
            current = args.split()[-1] if " AS " in args.upper() else args
            stages[current] = []
        stages[current].append((instruction, args))
    return stages


def dockerfile_arg(name: str) -> str:
    values = [a.split("=", 1)[1] for i, a in dockerfile_instructions() if i == "ARG" and a.startswith(f"{name}=")]
    assert len(values) == 1, f"ARG {name} has defaults {values}"
    return values[0]


def dockerfile_user() -> int:
    users = [a for i, a in dockerfile_instructions() if i == "USER"]
    assert users, "the image must not run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: use a numeric non-root uid (runAsNonRoot can verify it)"
    return int(uid)


def test_dockerfile_variants_and_pins():
    stages = dockerfile_stages()
    runs = {name: " ".join(a for i, a in body if i == "RUN") for name, body in stages.items()}
    assert "-c constraints/cpu.txt" in runs["deps-cpu"] and "constraints/gpu.txt" not in runs["deps-cpu"]
    assert "-c constraints/gpu.txt" in runs["deps-cuda"]
    assert (ROOT / "constraints" / "cpu.txt").is_file() and (ROOT / "constraints" / "gpu.txt").is_file()
    assert dockerfile_arg("VARIANT") == "cpu"
    final = next(name for name, body in stages.items() if body and body[0] == ("FROM", f"deps-${{VARIANT}} AS {name}"))
    assert "tools/postinstall.py" in runs[final]
    assert dockerfile_user() == 1000


def test_ray_version_matches_image():
    image_ray = dockerfile_arg("RAY_VERSION")
    for obj in _ray_objects():
        assert cluster_spec(obj)["rayVersion"] == image_ray, f"{obj['kind']}: rayVersion != Dockerfile RAY_VERSION {image_ray}"


def dockerignore_patterns() -> list[tuple[bool, re.Pattern, int]]:
    out = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        out.append((negate, re.compile(regex), pattern.count("/") + 1))
    return out


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path (or its leading directories) decides."""
    parts, excluded = path.split("/"), False
    for negate, regex, depth in dockerignore_patterns():
        if regex.fullmatch(path) or (len(parts) > depth and regex.fullmatch("/".join(parts[:depth]))):
            excluded = not negate
    return excluded


def _packages() -> list[str]:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    dirs = [p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()]
    return sorted(d for d in dirs if any(re.fullmatch(pattern.replace("*", ".*"), d) for pattern in include))


def test_dockerignore_admits_what_the_image_needs_and_nothing_else():
    import tomllib

    packages = _packages()
    assert {"scaling", "storage", "studies", "workers"} <= set(packages)
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("readme", "README.md")
    needed = ["pyproject.toml", readme, "constraints/cpu.txt", "constraints/gpu.txt", "tools/postinstall.py"]
    needed += [f"{p}/__init__.py" for p in packages] + ["studies/examples/quickstart.yaml"]
    assert not [p for p in needed if dockerignored(p)], "excluded from the build context"
    unwanted = [".venv/bin/python", ".git/HEAD", "runs/quickstart/ledger/x.parquet", "wandb/run/x", "tests/test_k8s.py",
                "k8s/README.md", "scaling/__pycache__/cli.cpython-311.pyc", ".env", "oscillator_scaling.egg-info/PKG-INFO"]
    assert not [p for p in unwanted if not dockerignored(p)], "in the build context"


# --------------------------------------------------------------------------------------------------
# Example studies and the README


def test_cluster_studies_write_to_the_shared_volume():
    from studies.spec import load_study

    files = sorted((K8S / "studies").glob("*.yaml"))
    assert files
    for path in files:
        study = load_study(str(path))
        assert study.name == path.stem, f"{path.name}: file name and study name differ (the README uses it as $STUDY)"
        assert DNS1035.fullmatch(study.name) and len(f"study-{study.name}") <= MAX_RAYJOB_NAME
        assert study.storage_uri() == f"{DATA_PATH}/runs/{study.name}"
        assert study.cache is None or study.cache.startswith(f"{DATA_PATH}/cache")


def test_readme_paths_exist():
    text = README.read_text()
    paths = {p.replace("$VARIANT", v) for p in re.findall(r"\bk8s/[\w./$-]*[\w/]", text) for v in VARIANTS}
    assert {"k8s/storage", "k8s/overlays/cpu-only/study", "k8s/image/Dockerfile", "k8s/studies/quickstart-k8s.yaml"} <= paths
    missing = [p for p in paths if "$" not in p and not (ROOT / p).exists()]
    assert not missing, f"k8s/README.md names paths that do not exist: {missing}"
