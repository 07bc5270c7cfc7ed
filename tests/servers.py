"""Real servers for tests, on 127.0.0.1: an MLflow tracking server that can be killed and started again."""

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float, failure: str) -> None:
    """Poll `url` until it answers, or RuntimeError(failure) after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(failure)


def kill_group(proc: subprocess.Popen | None) -> None:
    """SIGKILL a server started in a session of its own, with its children."""
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class TrackingServer:
    """`mlflow server` on 127.0.0.1 over a sqlite file in `folder`, startable again on the same port."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.proc = folder, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> None:
        mlflow_cli = Path(sys.executable).parent / "mlflow"
        cmd = [
            str(mlflow_cli),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.folder / 'server.db'}",
            "--artifacts-destination",
            str(self.folder / "artifacts"),
        ]
        log = open(self.folder / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        wait_for(f"{self.uri}/health", timeout, f"mlflow server did not start; see {self.folder / 'server.log'}")

    def kill(self) -> None:
        kill_group(self.proc)


class S3Server:
    """moto's standalone S3 server on 127.0.0.1: a real S3 HTTP API, reached through the same pyarrow/boto3
    client code as AWS. `auth=True` enforces credentials (every key is unknown to it: all are refused)."""

    def __init__(self, folder: Path, auth: bool = False):
        self.folder, self.port, self.proc, self.auth = folder, free_port(), None, auth
        self.url = f"http://127.0.0.1:{self.port}"

    def env(self) -> dict:
        """The standard AWS variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self, timeout: float = 60) -> "S3Server":
        env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if self.auth else {})}
        log = open(self.folder / f"moto-{self.port}.log", "ab")
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        wait_for(f"{self.url}/moto-api/", timeout, f"moto server did not start; see {self.folder}")
        return self

    def requests(self, prefix: str = "/") -> list[tuple[str, str]]:
        """(method, path) of every request the server has answered so far whose path starts with `prefix`
        (/bucket/key...), from its request log (werkzeug's, which colours some lines)."""
        import re

        found = re.findall(
            rb'"(?:\x1b\[[0-9;]*m)*([A-Z]+) (/[^ ?"]*)\S* HTTP', (self.folder / f"moto-{self.port}.log").read_bytes()
        )
        return [(m.decode(), p.decode()) for m, p in found if p.decode().startswith(prefix)]

    def kill(self) -> None:
        kill_group(self.proc)


class Endpoint:
    """A TCP port in front of a server on 127.0.0.1. `down()` cuts every open connection and resets each new one
    (a client meets what a stopped or restarting server gives it) until `up()`. The server behind keeps its data,
    as a restarted S3 server with a disk does (moto keeps objects in memory: a restart of its process would
    empty the bucket). The port stays bound throughout, so no other socket can take it meanwhile."""

    def __init__(self, target_port: int):
        self.target = target_port
        self._lock, self._open, self._down = threading.Lock(), set(), False
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def up(self) -> "Endpoint":
        with self._lock:
            self._down = False
        return self

    def down(self) -> None:
        with self._lock:
            self._down = True
            for sock in self._open:
                _reset(sock)
            self._open.clear()

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            with self._lock:
                if self._down:
                    _reset(client)
                    continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                _reset(client)
                continue
            pair = [client, server, 2]  # the two sockets, and the directions still open
            with self._lock:
                if self._down:  # went down meanwhile
                    _reset(client)
                    _reset(server)
                    continue
                self._open |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b, pair), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, pair: list) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        with self._lock:
            pair[2] -= 1
            if pair[2] == 0:  # both directions ended: the connection is over
                for sock in pair[:2]:
                    sock.close()
                    self._open.discard(sock)


def _reset(sock: socket.socket) -> None:
    """Close `sock` with a TCP reset, as a server process that dies does to its connections."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def objects(url: str) -> list[str]:
    """The keys under `url` (a folder or an s3:// prefix), relative to it, sorted."""
    import pyarrow.fs as pafs

    from sagan.storage import filesystem

    fs, path = filesystem(url)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path.removeprefix(path + "/") for i in infos if i.type == pafs.FileType.File)


def read_object(url: str) -> bytes:
    from sagan.storage import filesystem

    fs, path = filesystem(url)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_object(url: str, data: bytes) -> None:
    from sagan.storage import filesystem

    fs, path = filesystem(url)
    if "://" not in url:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def upload(folder: Path, url: str) -> None:
    """Every file under the local `folder` to the same relative keys under `url`."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        write_object(f"{url}/{path.relative_to(folder).as_posix()}", path.read_bytes())
