"""cluster/kuberay/, cluster/Dockerfile, cluster/runtime_env.yaml and .rayignore agree with the KubeRay v1.7.0 CRDs,
with what Kubernetes needs of its core kinds, and with the code: scripts, flags, config keys, Ray version, paths.
No cluster is reached: these are file checks."""

import argparse
import copy
import fnmatch
import functools
import gzip
import importlib
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "cluster" / "kuberay"
# The CRDs as released (ray-project/kuberay v1.7.0, ray-operator/config/crd/bases/), gzipped in the repository.
CRDS = ROOT / "cluster" / "kuberay" / "crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml.gz", "RayJob": "ray.io_rayjobs.yaml.gz"}
APP = "/app"  # the image's WORKDIR, where cluster/Dockerfile copies the code
MOUNT = "/mnt/shared"
IMAGE = "REPLACE_ME/sagan-ray:latest"


def documents(kind=None, folder=KUBERAY):
    """(file name, manifest) for every YAML document in `folder` (cluster/kuberay/), of `kind` when given."""
    docs = [(p.name, d) for p in sorted(folder.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    return [(name, d) for name, d in docs if kind is None or d["kind"] == kind]


def one(kind):
    """The only manifest of `kind`."""
    (found,) = [d for _, d in documents(kind)]
    return found


def strict(schema):
    """`schema` with unknown fields refused wherever it lists properties and does not preserve unknown fields,
    as the API server's strict field validation (kubectl's default) does; jsonschema alone would accept them."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.cache
def crd_validator(kind):
    """A jsonschema validator of the v1 openAPIV3Schema of the CRD for `kind`."""
    import jsonschema

    text = gzip.decompress((CRDS / CRD_FILES[kind]).read_bytes()).decode()
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft4Validator(strict(v1["schema"]["openAPIV3Schema"]))  # OpenAPI v3 is draft 4's dialect


def schema_errors(manifest):
    """Every place where `manifest` breaks its CRD, as 'path: message' lines."""
    errors = crd_validator(manifest["kind"]).iter_errors(manifest)
    return ["/".join(map(str, e.absolute_path)) + ": " + e.message for e in errors]


def ray_pods(cluster):
    """(group name, pod spec) of the head and of every worker group."""
    return [("head", cluster["spec"]["headGroupSpec"]["template"]["spec"])] + [
        (g["groupName"], g["template"]["spec"]) for g in cluster["spec"]["workerGroupSpecs"]
    ]


def quantity(value):
    """A Kubernetes CPU quantity as a number of CPUs ('32', 32, '500m')."""
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --- RayCluster and RayJob against the CRDs ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name,manifest", [pytest.param(n, d, id=n) for n, d in documents("RayCluster") + documents("RayJob")]
)
def test_kuberay_manifest_validates_against_the_crd(name, manifest):
    assert manifest["apiVersion"] == "ray.io/v1"
    assert schema_errors(manifest) == []


def test_crd_check_refuses_a_misspelt_field():
    cluster = copy.deepcopy(one("RayCluster"))
    cluster["spec"]["enableInTreeAutoscalng"] = cluster["spec"].pop("enableInTreeAutoscaling")
    assert schema_errors(cluster) == [
        "spec: Additional properties are not allowed ('enableInTreeAutoscalng' was unexpected)"
    ]


def test_raycluster_has_token_auth_autoscaling_and_the_installed_ray():
    import ray

    spec = one("RayCluster")["spec"]
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == ray.__version__  # KubeRay refuses token auth below 2.52
    for group, pod in ray_pods(one("RayCluster")):
        assert pod.get("restartPolicy", "Never") == "Never", (
            f"{group}: autoscaler v2 needs restartPolicy Never or unset"
        )


def test_head_takes_no_tasks_and_no_gpus():
    head = one("RayCluster")["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"].get("limits", {})


def test_every_ray_container_mounts_the_shared_claim_and_knows_the_tracking_server():
    claim = one("PersistentVolumeClaim")["metadata"]["name"]
    service = one("Service")
    uri = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    for group, pod in ray_pods(one("RayCluster")):
        volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        for c in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert volumes.get(mounts.get(MOUNT)) == claim, (
                f"{group}/{c['name']} does not mount claim {claim} at {MOUNT}"
            )
            assert {"name": "MLFLOW_TRACKING_URI", "value": uri} in c["env"], f"{group}/{c['name']}"
            assert c["image"] == IMAGE


def test_gpu_group_requests_gpus_tolerates_their_taint_and_limits_equal_requests():
    (gpu,) = [
        g
        for g in one("RayCluster")["spec"]["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    pod = gpu["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["limits"] == res["requests"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert 0 < gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]


def test_rayjobs_run_on_the_raycluster_and_leave_it_up():
    cluster = one("RayCluster")["metadata"]["name"]
    assert len(cluster) <= 53 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", cluster)  # KubeRay's name rules
    for name, job in documents("RayJob"):
        spec = job["spec"]
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster}, name
        assert "rayClusterSpec" not in spec, name
        # KubeRay: a selected cluster is never deleted, and a TTL needs shutdownAfterJobFinishes; no SidecarMode.
        assert spec.get("shutdownAfterJobFinishes", False) is False and not spec.get("ttlSecondsAfterFinished"), name
        assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode"), name
        assert len(job["metadata"]["name"]) <= 47 and re.fullmatch(
            r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"]
        ), name


# --- Core kinds ---------------------------------------------------------------------------------------------


def test_every_manifest_has_api_version_kind_and_name():
    for name, d in documents():
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name") and d.get("spec"), name


def test_claim_is_read_write_many_with_a_storage_request():
    pvc = one("PersistentVolumeClaim")
    assert pvc["apiVersion"] == "v1"
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert pvc["spec"]["resources"]["requests"]["storage"]
    assert "storageClassName" in pvc["spec"]


def test_mlflow_deployment_selects_its_pods_and_the_service_reaches_their_port():
    deployment, service = one("Deployment"), one("Service")
    assert deployment["apiVersion"] == "apps/v1" and service["apiVersion"] == "v1"
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}
    (sp,) = service["spec"]["ports"]
    assert sp["port"] == 5000 and ports.get(sp["targetPort"], sp["targetPort"]) == 5000


def test_mlflow_server_serves_artifacts_from_the_shared_volume_and_accepts_the_ray_pods_host():
    container = one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = dict(
        a.removeprefix("--").split("=", 1) if "=" in a else (a.removeprefix("--"), True) for a in container["args"]
    )
    assert container["command"] == ["mlflow", "server"]
    assert args["host"] == "0.0.0.0" and args["port"] == "5000" and args["serve-artifacts"] is True
    assert args["artifacts-destination"].startswith(MOUNT + "/") and args["backend-store-uri"].startswith(
        f"sqlite:///{MOUNT}/"
    )
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    # mlflow.server.security_utils.is_allowed_host_header: exact match, or fnmatch for a pattern with '*'.
    allowed = args["allowed-hosts"].split(",")
    for host in ("mlflow:5000", "mlflow.default.svc.cluster.local:5000", "localhost:5000"):
        assert any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed), host


# --- RayJob entry points against the code -------------------------------------------------------------------


def entrypoint(job):
    """(script path in the repository, argv after it) of a RayJob's entrypoint."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python", job["spec"]["entrypoint"]
    assert argv[1].startswith(APP + "/"), f"{argv[1]}: the image's code is under {APP}"
    return Path(argv[1]).relative_to(APP), argv[2:]


def parse(script, argv):
    """(argparse parser, parsed namespace) of `script`'s own parse_args on `argv`."""
    module = importlib.import_module(".".join(script.with_suffix("").parts))
    seen = {}
    real = argparse.ArgumentParser.parse_args

    def spy(self, args=None, namespace=None):
        seen["parser"] = self
        return real(self, args, namespace)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", spy):
        try:
            namespace = module.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{script} refuses the arguments {argv}")
    return seen["parser"], namespace


def job_config(job):
    """The Config a train or tune RayJob runs with (its --config file and overrides)."""
    from pipelines.common.config import load_config

    script, argv = entrypoint(job)
    _, ns = parse(script, argv)
    return load_config(ROOT / Path(ns.config).relative_to(APP), ns.overrides)


@pytest.mark.parametrize("name,job", [pytest.param(n, d, id=n) for n, d in documents("RayJob")])
def test_rayjob_entrypoint_names_a_script_its_flags_and_config_keys(name, job):
    check_entrypoint(name, job)


def check_entrypoint(name, job):
    """The RayJob's entrypoint runs a script of the image with flags and config keys that exist."""
    from pipelines.common.config import Config
    from sagan.config import flatten

    script, argv = entrypoint(job)
    assert (ROOT / script).is_file(), f"{name}: {script} does not exist"
    parser, ns = parse(script, argv)
    for flag in (a.split("=", 1)[0] for a in argv if a.startswith("--")):
        assert flag in parser._option_string_actions, (
            f"{name}: {script} has no flag {flag} (abbreviations do not count)"
        )
    keys = flatten(Config())
    for override in getattr(ns, "overrides", []):
        assert override.split("=", 1)[0] in keys, f"{name}: {override} is not a config key (docs/configuration.md)"
    if getattr(ns, "config", None):
        assert ns.config.startswith(APP + "/") and (ROOT / Path(ns.config).relative_to(APP)).is_file(), ns.config
    if script.name == "evaluate.py":
        from pipelines.evaluate import OVERRIDABLE

        assert all(o.startswith(OVERRIDABLE) for o in ns.overrides), ns.overrides


@pytest.mark.parametrize("name", ["job-train.yaml", "job-tune.yaml"])
def test_train_and_tune_jobs_keep_everything_on_the_shared_volume_and_fit_the_gpu_nodes(name):
    (job,) = [d for n, d in documents("RayJob") if n == name]
    cfg = job_config(job)
    for key in ("data.train_shards", "data.val_shards", "run.storage_path", "eval.cache_dir"):
        section, field = key.split(".")
        assert str(getattr(getattr(cfg, section), field)).startswith(MOUNT + "/"), f"{name}: {key} is not under {MOUNT}"
    (gpu,) = [g for g in one("RayCluster")["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu-8x"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus = int(limits["nvidia.com/gpu"])
    # train.py checks the GPUs and CPUs that are up now, before the autoscaler could add a node.
    assert cfg.scaling.num_workers <= gpus * gpu["minReplicas"]
    assert cfg.scaling.cpus_per_worker * min(cfg.scaling.num_workers, gpus) <= quantity(limits["cpu"])


def test_preprocess_writes_where_training_reads_and_evaluate_scores_the_training_run():
    jobs = {n: d for n, d in documents("RayJob")}
    cfg = job_config(jobs["job-train.yaml"])
    _, pre = parse(*entrypoint(jobs["job-preprocess.yaml"]))
    assert pre.backend == "ray" and pre.src.startswith(MOUNT + "/")
    assert Path(cfg.data.train_shards) == Path(pre.out) / "train" and Path(cfg.data.val_shards) == Path(pre.out) / "val"
    _, ev = parse(*entrypoint(jobs["job-evaluate.yaml"]))
    assert Path(ev.checkpoint) == Path(cfg.run.storage_path) / cfg.run.name
    assert jobs["job-evaluate.yaml"]["spec"]["entrypointNumGpus"] == 1  # the driver itself generates the samples


# --- Image, runtime env, upload -----------------------------------------------------------------------------


def dockerfile():
    """(instruction, argument) pairs of cluster/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "cluster" / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [tuple(ln.split(None, 1)) for ln in lines]


def test_dockerfile_builds_on_the_installed_ray_and_copies_what_the_jobs_run():
    import ray

    steps = dockerfile()
    (base,) = [arg for op, arg in steps if op == "FROM"]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-gpu", base), base
    assert ("WORKDIR", APP) in steps
    copied = [arg.split()[0] for op, arg in steps if op == "COPY"]
    assert "pyproject.toml" in copied and all((ROOT / c).exists() for c in copied)
    for _, job in documents("RayJob"):
        script, _ = entrypoint(job)
        assert script.parts[0] in copied, f"{script} is not in the image"
        assert "configs" in copied


def test_runtime_env_pip_list_is_pyprojects_dependencies_without_ray():
    import tomllib
    from packaging.requirements import Requirement

    def canonical(reqs):
        return {Requirement(r).name.lower().replace("_", "-"): str(Requirement(r).specifier) for r in reqs}

    deps = canonical(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    assert canonical(env["pip"]) == {k: v for k, v in deps.items() if k != "ray"}
    assert env["working_dir"] == "."


def test_rayignore_keeps_data_runs_and_stores_out_of_the_upload(tmp_path):
    from ray._private.runtime_env.packaging import _dir_travel

    kept = ["pipelines/train.py", "configs/imagenet128.yaml", "sagan/data.py", "benchmarks/results/train_step.json"]
    dropped = [
        "data/imagenet128/train/a.tar",
        "runs/sagan-demo/checkpoint_1/checkpoint.pt",
        ".venv/bin/python",
        ".git/HEAD",
        "mlflow.db",
        "mlruns/0/meta.yaml",
        "mlartifacts/1/grid.png",
        "g.pt",
    ]
    for rel in kept + dropped:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / ".rayignore").write_text((ROOT / ".rayignore").read_text())
    uploaded = []
    _dir_travel(
        tmp_path,
        [],
        lambda p: p.is_file() and uploaded.append(p.relative_to(tmp_path).as_posix()),
        include_gitignore=False,
    )
    assert sorted(uploaded) == sorted(kept + [".rayignore"])


def test_readme_applies_and_builds_files_that_exist():
    section = (ROOT / "README.md").read_text().split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"(?:-f|--runtime-env) (cluster/\S+)", section) + re.findall(
        r"ray (?:up|dashboard) (cluster/\S+)", section
    )
    assert "cluster/kuberay/raycluster.yaml" in named and "cluster/Dockerfile" in named
    assert [n for n in named if not (ROOT / n).is_file()] == []
