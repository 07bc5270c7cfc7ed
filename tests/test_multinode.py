"""The job path on a real multi-node Ray cluster on this machine (cluster/local.py: a head and a worker node,
token authentication on, a real MLflow server): sharding, training across the nodes, evaluation.

The nodes share no folder: shards, checkpoints, the evaluation cache and MLflow's artifacts are on a real S3
server (moto, on 127.0.0.1), as on a cloud cluster without a ReadWriteMany volume. Every single-node test runs
the shared-disk path."""

import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from cluster.local import free_port, ray_env
from pipelines.common.run_folder import RunFolder
from pipelines.training.batch_log import first_step_time, read_log, sample_ids, worlds_after
from tests.servers import objects, read_object, upload

REPO = Path(__file__).resolve().parent.parent
LOCAL = [sys.executable, str(REPO / "cluster" / "local.py")]

pytestmark = pytest.mark.cluster


BUCKET = "s3://cluster"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    """(folder, state) of a 2-node cluster whose processes, MLflow server included, have the S3 server's AWS_*
    variables (as a Secret gives every pod on KubeRay), as this module's tests do, and whose MLflow artifacts go
    to BUCKET/mlartifacts."""
    import pyarrow.fs as pafs

    folder = tmp_path_factory.mktemp("cluster")
    port = free_port()
    with pytest.MonkeyPatch.context() as env:
        for key, value in s3_server.env().items():
            env.setenv(key, value)
        env.setenv("XDG_CACHE_HOME", str(folder / "client-cache"))  # this process's, never the user's ~/.cache
        pafs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{s3_server.port}", scheme="http", allow_bucket_creation=True
        ).create_dir(BUCKET.removeprefix("s3://"))
        cmd = [*LOCAL, "up", "--dir", str(folder), "--workers", "1", "--cpus", "1", "--mlflow-port", str(port)]
        cmd += ["--artifacts-destination", f"{BUCKET}/mlartifacts"]
        up = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        try:
            assert up.returncode == 0, up.stderr + up.stdout
            state = json.loads((folder / "cluster.json").read_text())
            yield folder, state
        finally:
            subprocess.run([*LOCAL, "down", "--dir", str(folder)], capture_output=True, timeout=120)


def submit(
    state: dict, folder: Path, *entrypoint: str, token: bool = True, job_env: dict | None = None
) -> subprocess.CompletedProcess:
    """`ray job submit` the entrypoint; `job_env`: variables of the job's processes (its runtime env)."""
    env = {**ray_env(folder), "RAY_ADDRESS": state["address"]}
    if not token:
        env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    ray = str(Path(sys.executable).parent / "ray")
    runtime = ["--runtime-env-json", json.dumps({"env_vars": job_env})] if job_env else []
    return subprocess.run(
        [ray, "job", "submit", "--working-dir", str(REPO), *runtime, "--", *entrypoint],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )


def task_nodes(state: dict, folder: Path, name: str) -> set[str]:
    """The ids of the nodes that ran the cluster's tasks called `name` (Ray's state API, with the token)."""
    script = (
        "import json\nfrom ray.util.state import list_tasks\n"
        f"tasks = list_tasks(address={state['address']!r}, filters=[('name', '=', {name!r})], detail=True, limit=10000)\n"
        "print(json.dumps(sorted({t.node_id for t in tasks})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=ray_env(folder), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_a_submission_without_the_token_is_refused(cluster):
    folder, state = cluster
    out = submit(state, folder, "python", "-c", "print('ran')", token=False)
    assert out.returncode != 0 and "ran" not in out.stdout
    assert "Missing authentication token" in out.stdout + out.stderr


def test_shard_train_across_nodes_and_evaluate_as_jobs_on_object_storage(cluster, tmp_path):
    folder, state = cluster
    from preprocessing.make_sample_data import write_sample_data

    write_sample_data(tmp_path / "raw")
    shards, runs = f"{BUCKET}/shards", f"{BUCKET}/runs"
    out = submit(
        state,
        folder,
        "python",
        "preprocessing/shard_imagenet.py",
        "--backend",
        "ray",
        "--src",
        str(tmp_path / "raw"),
        "--out",
        shards,
        "--size",
        "32",
        "--shard-size",
        "200",
    )
    assert out.returncode == 0, out.stdout[-3000:]
    assert json.loads(read_object(f"{shards}/manifest.json"))["complete"]
    assert len(task_nodes(state, folder, "write_shard")) == 2  # one CPU per node: the shards were written on both

    train = [
        "python",
        "pipelines/train.py",
        f"data.train_shards={shards}/train",
        f"data.val_shards={shards}/val",
        f"run.storage_path={runs}",
        "run.name=spread",
        f"mlflow.tracking_uri={state['mlflow']}",
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=0.5",
        "scaling.placement_strategy=STRICT_SPREAD",
        "model.ch=8",
        "train.batch_size=4",
        "train.log_every=1",
        "train.ckpt_every=2",
        "train.sample_every=2",
        "train.eval_every=0",
    ]
    batch_log = {"SAGAN_BATCH_LOG": str(tmp_path / "batches")}  # what each step trained on, by rank
    out = submit(state, folder, *train, "train.steps=2", job_env=batch_log)
    assert out.returncode == 0, out.stdout[-3000:]
    out = submit(state, folder, *train, "train.steps=4", job_env=batch_log)  # a relaunch: on to step 4
    assert out.returncode == 0, out.stdout[-3000:]
    assert "resumed from step 2" in out.stdout
    # Steps 1-4, over two launches on two nodes, trained on the samples of one uninterrupted schedule.
    assert read_log(tmp_path / "batches") == uninterrupted(f"{shards}/train", world=2, batch=4, steps=4)
    assert any(k.startswith("checkpoint_") and k.endswith("/checkpoint.pt") for k in objects(f"{runs}/spread"))
    client = mlflow.MlflowClient(state["mlflow"])
    (run,) = client.search_runs([client.get_experiment_by_name("sagan-train").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "d_loss")] == [1, 2, 3, 4]
    assert any("samples" in a.path for a in client.list_artifacts(run.info.run_id, "images"))
    # ... uploaded through the MLflow server into the bucket, not into a folder of the cluster's
    assert any(run.info.run_id in k and "/images/samples" in k for k in objects(f"{BUCKET}/mlartifacts"))
    assert not (folder / "mlartifacts").exists()
    # The two workers ran on the two nodes: Ray Train's STRICT_SPREAD would not have started them otherwise.
    assert run.data.params["scaling.placement_strategy"] == "STRICT_SPREAD"

    out = submit(
        state,
        folder,
        "python",
        "pipelines/evaluate.py",
        "--checkpoint",
        f"{runs}/spread",
        "eval.num_samples=40",
        "eval.feature_extractor=sample-classifier",
        f"eval.cache_dir={BUCKET}/eval-cache",
        f"mlflow.tracking_uri={state['mlflow']}",
    )
    assert out.returncode == 0, out.stdout[-3000:]
    assert client.get_metric_history(run.info.run_id, "eval/fid")[0].step == 4

    out = submit(
        state, folder, "python", "pipelines/sample.py", "--checkpoint", f"{runs}/spread", "--out", f"{BUCKET}/samples"
    )
    assert out.returncode == 0, out.stdout[-3000:]
    assert "grid.png" in objects(f"{BUCKET}/samples")
    cached = objects(f"{BUCKET}/eval-cache")
    assert any(k.startswith("sample-classifier-") for k in cached) and any(k.startswith("fid-stats-") for k in cached)
    assert list(folder.glob("*/cache/sagan/mirrors/*/sample-classifier-*"))  # the job's node used its own cache
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batches", "raw"]  # the source images, the test's log


def uninterrupted(train_shards: str, world: int, batch: int, steps: int) -> dict[int, list[str]]:
    """{step: sorted sample ids} of steps 1..`steps` of a run that is never stopped (the default seed, n_dis 1):
    each rank's loader from batch 0."""
    from sagan.data import find_shards
    from sagan.loader import rank_loader

    shards, expected = find_shards(train_shards), {}
    for rank in range(world):
        batches = rank_loader(shards, rank, world, batch, seed=0, start_batch=0)
        for step in range(1, steps + 1):
            expected.setdefault(step, []).extend(sample_ids(*next(batches)))
        batches.close()
    return {step: sorted(ids) for step, ids in expected.items()}


def test_an_elastic_run_goes_on_without_a_lost_node_and_grows_back_when_it_returns(cluster, digits, tmp_path):
    """scaling.num_workers=[1, 2] on the 2 nodes: the worker node is killed mid-run (every process of it, as a
    lost machine); the run goes on with one worker from its last checkpoint, grows back to two at a resize check
    once the node is started again, and ends at its last step: one MLflow run, every step trained on the samples
    of an uninterrupted 2-worker schedule."""
    folder, state = cluster
    data, runs, log = f"{BUCKET}/elastic-data", f"{BUCKET}/elastic-runs", tmp_path / "batches"
    ray_run = RunFolder(runs, "elastic")
    upload(digits, data)
    steps = 400
    cmd = [*submit_command(state), "--runtime-env-json", json.dumps({"env_vars": {"SAGAN_BATCH_LOG": str(log)}})]
    cmd += ["--", "python", "pipelines/train.py", f"data.train_shards={data}/train", f"run.storage_path={runs}"]
    cmd += ["run.name=elastic", f"mlflow.tracking_uri={state['mlflow']}", "scaling.num_workers=[1,2]"]
    cmd += ["scaling.resize_check_s=5", "scaling.cpus_per_worker=1"]  # a node holds one worker: Ray Train counts CPUs
    cmd += ["model.ch=8", "train.batch_size=4", f"train.steps={steps}", "train.log_every=10", "train.ckpt_every=10"]
    cmd += ["train.sample_every=1000", "train.eval_every=0", "run.max_failures=3"]
    output = open(tmp_path / "job.log", "w+")  # a file: a pipe read only at the end could fill and block the job
    job = subprocess.Popen(cmd, env=submit_env(state, folder), stdout=output, stderr=subprocess.STDOUT, text=True)
    try:
        # A checkpoint of each group before the kill and before the restart, as Ray Train records it (its snapshot,
        # not the storage: it takes a report at its next poll of the workers), so that both resize lines are due.
        # The run may start on one worker.
        wait_until(lambda: ray_run.resume_world() == 2, job, 240)
        killed_at = time.time()
        stop = subprocess.run(
            [*LOCAL, "stop-node", "--dir", str(folder), "--node", "1"], capture_output=True, text=True
        )
        assert stop.returncode == 0, stop.stderr
        wait_until(lambda: 1 in worlds_after(log, killed_at), job, 240)
        lost = first_step_time(log, killed_at, world=1) - killed_at
        wait_until(lambda: ray_run.resume_world() == 1, job, 240)
        back_at = time.time()  # the node's start included, as benchmarks/node_loss.py times it
        start = subprocess.run(
            [*LOCAL, "start-node", "--dir", str(folder), "--node", "1"], capture_output=True, text=True
        )
        assert start.returncode == 0, start.stderr
        wait_until(lambda: 2 in worlds_after(log, back_at), job, 240)
        grown = first_step_time(log, back_at, world=2) - back_at
        job.wait(timeout=400)
    finally:
        if job.poll() is None:
            job.kill()
        out = (tmp_path / "job.log").read_text()
        output.close()
    assert job.returncode == 0, out[-4000:]
    print(
        f"\nelastic: from the kill to the next step on 1 worker {lost:.1f} s; from the restart to 2 workers {grown:.1f} s"
    )
    assert "resize at" in out and "2 -> 1 workers" in out and "1 -> 2 workers" in out
    client = mlflow.MlflowClient(state["mlflow"])
    (run,) = client.search_runs(
        [client.get_experiment_by_name("sagan-train").experiment_id], "tags.`mlflow.runName` = 'elastic'"
    )
    sizes = [int(m.value) for m in client.get_metric_history(run.info.run_id, "world_size")]
    assert is_subsequence([2, 1, 2], sizes) and sizes[-1] == 2, sizes
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "d_loss")}) == list(
        range(10, steps + 1, 10)
    )
    assert run.info.status == "FINISHED"
    # Every step, whichever group ran it, trained on the samples of an uninterrupted 2-worker run.
    assert read_log(log) == uninterrupted(f"{data}/train", world=2, batch=4, steps=steps)


def is_subsequence(short: list, long: list) -> bool:
    it = iter(long)
    return all(any(x == y for y in it) for x in short)


def submit_command(state: dict) -> list[str]:
    return [str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", str(REPO)]


def submit_env(state: dict, folder: Path) -> dict:
    return {**ray_env(folder), "RAY_ADDRESS": state["address"]}


def wait_until(ready, job: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert job.poll() is None, f"the job ended (exit {job.returncode}) before the wait was over"
        assert time.time() < deadline, "timed out"
        time.sleep(0.5)
