"""cluster/kuberay/object-storage/, the KubeRay cluster without a shared volume, against the KubeRay v1.7.0 CRDs
and the code: no ReadWriteMany claim, the store's keys in every pod, a train job that reads and writes the
bucket. No cluster is reached: these are file checks (helpers: tests/test_cluster_manifests.py)."""

import pytest
import yaml

from tests.test_cluster_manifests import (
    KUBERAY,
    MOUNT,
    check_entrypoint,
    documents,
    job_config,
    ray_pods,
    schema_errors,
)

OBJECT_STORAGE = KUBERAY / "object-storage"  # the variant with everything in a bucket


@pytest.mark.parametrize(
    "name,manifest",
    [
        pytest.param(n, d, id=n)
        for n, d in documents("RayCluster", OBJECT_STORAGE) + documents("RayJob", OBJECT_STORAGE)
    ],
)
def test_object_storage_manifests_validate_against_the_crd(name, manifest):
    assert schema_errors(manifest) == []


def test_object_storage_variant_needs_no_shared_volume_and_gives_every_pod_the_keys():
    texts = yaml.safe_dump([d for _, d in documents(folder=OBJECT_STORAGE)])  # the manifests, not their comments
    assert "ReadWriteMany" not in texts and "sagan-shared" not in texts and MOUNT not in texts
    (secret,) = [d for _, d in documents("Secret", OBJECT_STORAGE)]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= set(secret["stringData"])
    wanted = {"secretRef": {"name": secret["metadata"]["name"]}}
    (cluster,) = [d for _, d in documents("RayCluster", OBJECT_STORAGE)]
    (mlflow,) = [d for _, d in documents("Deployment", OBJECT_STORAGE)]
    pods = ray_pods(cluster) + [("mlflow", mlflow["spec"]["template"]["spec"])]
    for group, pod in pods:
        assert wanted in pod["containers"][0].get("envFrom", []), f"{group} does not load the store's keys"
    args = mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    assert any(a.startswith("--artifacts-destination=s3://") for a in args) and "--serve-artifacts" in args
    (claim,) = [d for _, d in documents("PersistentVolumeClaim", OBJECT_STORAGE)]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    volumes = mlflow["spec"]["template"]["spec"]["volumes"]
    assert [v["persistentVolumeClaim"]["claimName"] for v in volumes] == [claim["metadata"]["name"]]


def test_object_storage_train_job_reads_and_writes_the_bucket_and_caches_shards_on_the_gpu_nodes():
    (job,) = [d for _, d in documents("RayJob", OBJECT_STORAGE)]
    check_entrypoint("object-storage/job-train.yaml", job)
    cfg = job_config(job)
    # eval.cache_dir too: in-loop FID's statistics are computed by a task on one node and read by rank 0 on another
    for key in ("data.train_shards", "data.val_shards", "run.storage_path", "eval.cache_dir"):
        section, field = key.split(".")
        assert str(getattr(getattr(cfg, section), field)).startswith("s3://"), key
    (cluster,) = [d for _, d in documents("RayCluster", OBJECT_STORAGE)]
    (gpu,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu-8x"]
    mounts = [m["mountPath"] for m in gpu["template"]["spec"]["containers"][0]["volumeMounts"]]
    assert any(cfg.data.cache_dir.startswith(m + "/") for m in mounts), (cfg.data.cache_dir, mounts)
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
