"""A multi-node Ray cluster on this machine, with token authentication and an MLflow server beside it: the
job path of a real cluster (`ray job submit`), for trying it before a cloud bill does.

    python cluster/local.py up                 # head + 1 worker node (each its own raylet), MLflow on :5000
    python cluster/local.py up --workers 2 --cpus 2
    python cluster/local.py env                # the exports `ray job submit` needs (address, token)
    python cluster/local.py stop-node --node 1 # kill worker node 1 at once, as a lost machine (rehearse a loss)
    python cluster/local.py start-node --node 1  # and bring it back
    python cluster/local.py down

Everything lives in --dir (default .local-cluster/, git-ignored): the auth token, Ray's temporary files,
the MLflow store and artifacts, logs, and each node's own cache folder (DIR/head/cache, DIR/worker-N/cache: its
XDG_CACHE_HOME, so the nodes share no ~/.cache/sagan, as separate machines would not). `down` stops only this cluster's processes, never another Ray.
"""

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATE = "cluster.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(folder: Path) -> dict:
    """The environment of every Ray process and client of the cluster in `folder`: token auth on."""
    # The jobs' `python` is the first on the nodes' PATH: this interpreter's, with the project's dependencies.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(folder / "auth_token")}


def run(cmd: list[str], env: dict, what: str) -> None:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"error: {what} failed: {tail[0]}")


def wait_http(url: str, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"error: {what} did not answer at {url} within {timeout:.0f} s")


def mlflow_command(folder: Path, port: int, artifacts: str | None = None) -> list[str]:
    """The MLflow server of the cluster: runs in sqlite under `folder`, artifacts proxied by the server (clients
    upload to it over HTTP, so no node needs a shared disk or the store's keys) into `artifacts`: a folder, or
    object storage (s3://BUCKET/PREFIX; the server reads AWS_ENDPOINT_URL and the AWS keys from its
    environment). Default: folder/mlartifacts."""
    return [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination",
        artifacts or str(folder / "mlartifacts"),
    ]


def up(folder: Path, workers: int, cpus: int, mlflow_port: int, artifacts: str | None = None) -> dict:
    """Start the head, `workers` worker nodes and MLflow; returns the cluster's description (also in STATE)."""
    if (folder / STATE).is_file():
        raise SystemExit(
            f"error: a cluster is already up in {folder}; `python cluster/local.py down --dir {folder}` first"
        )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "auth_token").write_text(secrets.token_hex(32))
    (folder / "auth_token").chmod(0o600)
    # Ray's sockets live under the temp dir, and a unix socket path must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="sagan-ray-")
    port, dashboard, bin_dir = free_port(), free_port(), Path(sys.executable).parent
    env = ray_env(folder)
    print(f"starting the head node (port {port}, dashboard {dashboard}) ...", flush=True)
    run(
        [
            str(bin_dir / "ray"),
            "start",
            "--head",
            "--port",
            str(port),
            "--dashboard-port",
            str(dashboard),
            "--dashboard-host",
            "127.0.0.1",
            "--num-cpus",
            str(cpus),
            "--resources",
            '{"head": 1}',
            *common_args(temp_dir),
        ],
        node_env(folder, "head"),
        "ray start --head",
    )
    for i in range(1, workers + 1):
        print(f"starting worker node {i} of {workers} ...", flush=True)
        start_worker(folder, f"127.0.0.1:{port}", temp_dir, cpus, i)
    log = open(folder / "mlflow.log", "ab")
    mlflow = subprocess.Popen(
        mlflow_command(folder, mlflow_port, artifacts), stdout=log, stderr=log, start_new_session=True
    )
    state = {
        "address": f"http://127.0.0.1:{dashboard}",
        "gcs": f"127.0.0.1:{port}",
        "temp_dir": temp_dir,
        "cpus": cpus,
        "mlflow": f"http://127.0.0.1:{mlflow_port}",
        "mlflow_pid": mlflow.pid,
        "nodes": 1 + workers,
        "token_path": str(folder / "auth_token"),
    }
    (folder / STATE).write_text(json.dumps(state, indent=1))
    wait_http(f"{state['mlflow']}/health", 90, "the MLflow server")
    wait_nodes(state, 1 + workers, env)
    return state


def common_args(temp_dir: str) -> list[str]:
    """`ray start` arguments of every node: the cluster's temp dir, a small object store, and ports of its own
    (every node on one machine needs its own agent ports: the defaults collide)."""
    common = ["--temp-dir", temp_dir, "--disable-usage-stats", "--object-store-memory", str(200 * 2**20)]
    return common + [
        arg
        for flag in (
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
            "--metrics-export-port",
            "--ray-client-server-port",
        )
        for arg in (flag, str(free_port()))
    ]


def node_env(folder: Path, node: str) -> dict:
    """The environment of one node's processes: each node its own ~/.cache/sagan (XDG_CACHE_HOME under `folder`),
    as separate machines have; `stop-node` finds a node's processes by it."""
    return {**ray_env(folder), "XDG_CACHE_HOME": str(folder / node / "cache")}


def start_worker(folder: Path, gcs: str, temp_dir: str, cpus: int, i: int) -> None:
    """Start worker node `i` (1, 2, ...) and join it to the head at `gcs`."""
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--address", gcs, "--num-cpus", str(cpus)]
    run(cmd + common_args(temp_dir), node_env(folder, f"worker-{i}"), f"ray start (worker node {i})")


def node_processes(folder: Path, node: str) -> list[int]:
    """The live processes of one node of the cluster in `folder` (its raylet, its workers...), by their environment."""
    mark = f"XDG_CACHE_HOME={folder / node / 'cache'}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if mark in (proc / "environ").read_bytes().split(b"\0") and int(proc.name) != os.getpid():
                if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


def stop_node(folder: Path, i: int) -> int:
    """Kill worker node `i` at once (SIGKILL to its raylet and every process it started: a lost machine)."""
    pids = node_processes(folder, f"worker-{i}")
    if not pids:
        raise SystemExit(f"error: worker node {i} of the cluster in {folder} is not running")
    killed, deadline = set(), time.time() + 10
    while pids and time.time() < deadline:  # again, for a process started while the others were killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed |= set(pids)
        time.sleep(0.2)
        pids = node_processes(folder, f"worker-{i}")
    return len(killed)


def wait_nodes(state: dict, n: int, env: dict, timeout: float = 60) -> None:
    script = (
        "import ray, time, sys\n"
        f"ray.init(address={state['gcs']!r}, logging_level='ERROR')\n"
        f"deadline = time.time() + {timeout}\n"
        f"while sum(x['Alive'] for x in ray.nodes()) < {n} and time.time() < deadline: time.sleep(0.5)\n"
        f"sys.exit(0 if sum(x['Alive'] for x in ray.nodes()) >= {n} else 1)\n"
    )
    if subprocess.run([sys.executable, "-c", script], env=env, capture_output=True).returncode:
        raise SystemExit(f"error: fewer than {n} Ray nodes came up within {timeout:.0f} s")


def down(folder: Path) -> None:
    """Stop this cluster's Ray processes (found by its temp dir) and its MLflow server; keep the data."""
    state_file = folder / STATE
    if not state_file.is_file():
        print(f"no cluster is up in {folder}")
        return
    state = json.loads(state_file.read_text())
    pids = ours(state["temp_dir"])
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while ours(state["temp_dir"]) and time.time() < deadline:
            time.sleep(0.2)
        if not ours(state["temp_dir"]):
            break
        pids = ours(state["temp_dir"])
    killed = len(pids)
    try:
        os.killpg(state["mlflow_pid"], signal.SIGTERM)
    except ProcessLookupError:
        pass
    state_file.unlink()
    print(f"stopped {killed} Ray process(es) and the MLflow server; data kept in {folder}")


def ours(temp_dir: str) -> list[int]:
    """The live processes of the cluster whose Ray temp dir is `temp_dir` (its path is in their command lines)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if temp_dir in cmdline and int(proc.name) != os.getpid() and state != "Z":
            found.append(int(proc.name))
    return found


def env_lines(folder: Path) -> str:
    state = json.loads((folder / STATE).read_text())
    return "\n".join(
        [
            f"export RAY_ADDRESS={state['address']}",
            "export RAY_AUTH_MODE=token",
            f"export RAY_AUTH_TOKEN_PATH={state['token_path']}",
            f"export MLFLOW_TRACKING_URI={state['mlflow']}",
        ]
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="local.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("command", choices=["up", "down", "env", "stop-node", "start-node"])
    p.add_argument("--node", type=int, default=1, help="stop-node / start-node: which worker node (default 1)")
    p.add_argument("--dir", default=str(ROOT / ".local-cluster"), help="where the token, MLflow store and logs live")
    p.add_argument("--workers", type=int, default=1, help="worker nodes besides the head (default 1)")
    p.add_argument("--cpus", type=int, default=2, help="logical CPUs per node (default 2)")
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument(
        "--artifacts-destination",
        default=None,
        help="where MLflow keeps artifacts: a folder or s3://BUCKET/PREFIX (AWS_* variables; default DIR/mlartifacts)",
    )
    args = p.parse_args(argv)
    folder = Path(args.dir).expanduser().resolve()
    if args.command == "up":
        if args.workers < 1:
            raise SystemExit("error: --workers must be at least 1: a multi-node cluster needs a node besides the head")
        if args.artifacts_destination and "://" in args.artifacts_destination:
            from sagan.storage import StorageError, check_storage

            try:  # the endpoint, keys and bucket: one line now, not a failed upload in MLflow's log later
                check_storage(args.artifacts_destination, "--artifacts-destination")
            except StorageError as e:
                raise SystemExit(f"error: {e}") from None
        up(folder, args.workers, args.cpus, args.mlflow_port, args.artifacts_destination)
        print(
            f"up: {1 + args.workers} Ray nodes, token auth on, MLflow at http://127.0.0.1:{args.mlflow_port}\n"
            f'submit jobs after:\n  eval "$(python cluster/local.py env)"\n{env_lines(folder)}'
        )
    elif args.command in ("stop-node", "start-node"):
        if not (folder / STATE).is_file():
            raise SystemExit(f"error: no cluster is up in {folder}; `python cluster/local.py up` first")
        state = json.loads((folder / STATE).read_text())
        if not 1 <= args.node < state["nodes"]:
            raise SystemExit(f"error: --node {args.node}: the cluster has worker nodes 1 to {state['nodes'] - 1}")
        if args.command == "stop-node":
            print(f"killed worker node {args.node} ({stop_node(folder, args.node)} processes), as a lost machine")
        elif node_processes(folder, f"worker-{args.node}"):
            raise SystemExit(f"error: worker node {args.node} is running; `stop-node --node {args.node}` first")
        else:
            start_worker(folder, state["gcs"], state["temp_dir"], state.get("cpus", 2), args.node)
            print(f"started worker node {args.node} again")
    elif args.command == "env":
        if not (folder / STATE).is_file():
            raise SystemExit(f"error: no cluster is up in {folder}; `python cluster/local.py up` first")
        print(env_lines(folder))
    else:
        down(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
