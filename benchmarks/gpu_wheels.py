"""The Python packages the lent GPU machine lacks, as wheels for its Python, and a CPU stand-in for that machine.

    bash benchmarks/gpu_wheels.sh                       # the cp312 set -> .whl/ (git-ignored); prints the total
    python benchmarks/gpu_wheels.py download --python-version 3.11 --dest /tmp/whl311   # the set for this Python
    python benchmarks/gpu_wheels.py device-env /tmp/devenv   # a venv holding only the device image's packages

The device machine reaches no package index: what it lacks travels with the working tree (64 MiB in all). Its
image has torch, pandas, pyarrow, grpcio, ... (DEVICE, the image's package list as read on 2026-11-17); it lacks
ray, mlflow, pydantic, jsonschema, webdataset, braceexpand and torch-fidelity. The set is the dependency closure
of ROOTS, read from this environment's installed metadata (so the versions are the ones the tests ran), less what
the device has, with markers evaluated for the target Python on x86-64 Linux. Ray's wheel is rewritten
without STRIP: ray/jars/ (32 MB: the Java worker, which a Python-only cluster never loads), RLlib, Ray LLM and
Ray Serve (imported only by their own users; Tune looks for RLlib under an ImportError guard) and the source maps
of the dashboard's web UI. That takes Ray's wheel from 79 MB to 43 MB (40.8 MiB).

MLflow travels as mlflow-skinny plus SQLAlchemy and Alembic: the tracking client and the sqlite store, which is
what the pipelines use on one machine; the full `mlflow` package adds its web UI and server (tens of MB).

`device-env` makes a venv whose site-packages hold only the DEVICE packages, linked from this environment, so the
wheel set can be proved on a CPU: install it with --no-deps into a clean --target and run the pipeline on it.
"""

import argparse
import io
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
TREE_LIMIT = 64 * 2**20  # the device tool's limit on what travels: the working tree plus carried paths
ROOTS = [
    "ray[train,tune,data]",
    "mlflow-skinny",
    "sqlalchemy",
    "alembic",
    "cryptography",  # imported by MLflow's SQL model-registry tables, which its sqlite store creates
    # Ray's dashboard (ray.dashboard.optional_deps): without it there is no state API, and Ray Train's
    # PlacementGroupCleaner, which polls it, warns every few seconds and cannot see a dead controller.
    "aiohttp-cors",
    "opencensus",
    "opentelemetry-exporter-prometheus",
    "pydantic",
    "jsonschema",
    "webdataset",
    "braceexpand",
    "torch-fidelity",
]
STRIP = ("ray/jars/", "ray/rllib/", "ray/llm/", "ray/serve/")
STRIP_SUFFIXES = (".js.map",)  # the dashboard web UI's source maps (its code stays: the dashboard needs it)
# The device image's Python packages (read on one of its machines, 2026-11-17).
DEVICE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize
huggingface-hub hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml
markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn
scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp""".split()
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
PLATFORMS += ["manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64"]


def norm(name: str) -> str:
    """A distribution's name as an index compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def target_env(python_version: str) -> dict:
    """Marker variables of CPython `python_version` on x86-64 Linux."""
    return {
        "python_version": python_version,
        "python_full_version": python_version + ".0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }


def closure(roots, have, python_version: str, requires_of) -> dict:
    """{name: version} of every distribution `roots` need on the target, not in `have` (normalized names).

    `requires_of(name)` gives (version, [requirement strings]) as installed here; a needed distribution this
    environment lacks is an error naming it, since its version could not be pinned to a tested one."""
    env = target_env(python_version)
    todo = [Requirement(r) for r in roots]
    seen_extras: dict = {}
    out: dict = {}
    while todo:
        req = todo.pop()
        name = norm(req.name)
        if name in have:
            continue
        new_extras = set(req.extras) - seen_extras.get(name, set())
        if name in seen_extras and not new_extras:
            continue
        seen_extras.setdefault(name, set()).update(req.extras)
        version, requires = requires_of(name)
        out[name] = version
        for text in requires:
            dep = Requirement(text)
            if dep.marker is None:
                todo.append(dep)
                continue
            extras = [""] + sorted(seen_extras[name])
            if any(dep.marker.evaluate({**env, "extra": e}) for e in extras):
                todo.append(dep)
    return dict(sorted(out.items()))


def installed(name: str):
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        sys.exit(
            f"error: {name} is needed on the device but not installed here; "
            f"install it into this environment (pip install {name}) so its tested version can be pinned"
        )
    return dist.version, dist.requires or []


def strip(wheel: Path, prefixes=STRIP, suffixes=STRIP_SUFFIXES) -> int:
    """Rewrite a wheel without the files under `prefixes` or ending in `suffixes` (and their RECORD lines); the
    bytes it saved."""

    def dropped(name: str) -> bool:
        return name.startswith(prefixes) or name.endswith(suffixes)

    before = wheel.stat().st_size
    buf = io.BytesIO()
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if dropped(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not dropped(line.rsplit(",", 2)[0])).encode()
            dst.writestr(info, data)
    wheel.write_bytes(buf.getvalue())
    return before - wheel.stat().st_size


def tree_bytes() -> int:
    """Bytes of what the device tool sends besides carried paths: tracked and untracked, not ignored files."""
    names = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    return sum((REPO / n.decode()).stat().st_size for n in names if n and (REPO / n.decode()).is_file())


def download(args) -> None:
    pins = closure(ROOTS, {norm(n) for n in DEVICE}, args.python_version, installed)
    print(f"{len(pins)} distributions for cp{args.python_version.replace('.', '')}: " + ", ".join(pins), flush=True)
    dest = Path(args.dest)
    with tempfile.TemporaryDirectory(dir=dest.parent if dest.parent.exists() else None) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp]
        cmd += ["--python-version", args.python_version, "--implementation", "cp"]
        cmd += [a for p in PLATFORMS for a in ("--platform", p)]
        if subprocess.run(cmd + [f"{n}=={v}" for n, v in pins.items()]).returncode:
            sys.exit(f"error: pip could not download every wheel for cp{args.python_version} (its message is above)")
        for wheel in Path(tmp).glob("ray-*.whl"):
            print(f"{wheel.name}: {', '.join(STRIP + STRIP_SUFFIXES)} stripped, {strip(wheel) / 2**20:.1f} MiB saved")
        dest.mkdir(parents=True, exist_ok=True)
        for old in dest.glob("*.whl"):  # one version of each, or pip stops the whole install
            old.unlink()
        for wheel in sorted(Path(tmp).glob("*.whl")):
            shutil.move(str(wheel), dest / wheel.name)
    wheels = sorted(dest.glob("*.whl"), key=lambda p: -p.stat().st_size)
    for w in wheels[:8]:
        print(f"  {w.stat().st_size / 2**20:6.1f} MiB  {w.name}")
    total = sum(w.stat().st_size for w in wheels)
    tree = tree_bytes()
    print(
        f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {dest}; with the working tree ({tree / 2**20:.1f} MiB) "
        f"{(total + tree) / 2**20:.1f} MiB of the {TREE_LIMIT / 2**20:.0f} MiB that travels to the device"
    )
    if total + tree > TREE_LIMIT:
        sys.exit("error: the wheels and the working tree exceed what travels to the device; drop a root or strip more")


def check(args) -> None:
    """Every requirement of the distributions installed in --target met by what this Python finds (the target
    first, then its own site-packages): versions too, which an install with --no-deps does not check."""
    target = str(Path(args.target).resolve())
    sys.path.insert(0, target)
    from importlib.metadata import distributions

    found: dict = {}
    for dist in distributions():  # in sys.path order: the target's copy wins, as it will at import
        found.setdefault(norm(dist.metadata["Name"]), dist.version)
    extras = {norm(Requirement(r).name): [""] + sorted(Requirement(r).extras) for r in ROOTS}
    problems, checked = [], 0
    for dist in distributions(path=[target]):
        checked += 1
        name = norm(dist.metadata["Name"])
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras.get(name, [""])):
                continue
            have = found.get(norm(req.name))
            if have is None or not req.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {req.name}{req.specifier} but has {have or 'none'}")
    if problems:
        sys.exit(
            f"error: the wheels in {target} do not fit this Python's packages: " + "; ".join(sorted(set(problems)))
        )
    print(f"{checked} distributions in {target}: every requirement met")


def _own_entries(dist, here: Path) -> set:
    """The top-level entries of `dist` under site-packages `here`; inside a namespace folder (google/, nvidia/,
    no __init__.py, shared by several distributions), its own subfolders only."""
    entries = set()
    for f in dist.files or []:
        parts = f.parts
        if not parts or parts[0] in ("..", "__pycache__") or not (here / parts[0]).exists():
            continue
        top = here / parts[0]  # a package folder without __init__.py; not X.dist-info or X.libs
        namespace = top.is_dir() and parts[0].isidentifier() and not (top / "__init__.py").exists()
        entries.add(Path(*parts[:2]) if namespace and len(parts) >= 2 else Path(parts[0]))
    return entries


def device_env(args) -> None:
    """A venv whose site-packages link only the DEVICE packages installed here: the device image, on this CPU."""
    venv = Path(args.dir)
    if venv.exists():
        sys.exit(f"error: {venv} exists; name a new folder")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    here = Path(distribution("pip").locate_file(""))
    linked = []
    for name in DEVICE:
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        for entry in _own_entries(dist, here):
            if not (site / entry).exists():
                (site / entry).parent.mkdir(parents=True, exist_ok=True)
                (site / entry).symlink_to(here / entry)
        linked.append(name)
    print(f"{venv}: {len(linked)} of the device's {len(DEVICE)} packages linked from {here}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="download the missing wheels (ray's without its jars) into --dest")
    d.add_argument("--python-version", default="3.12", help="the device's Python (3.12); 3.11 for this machine")
    d.add_argument("--dest", default=str(REPO / ".whl"), help="folder for the wheels (replaced); .whl is git-ignored")
    c = sub.add_parser("check", help="after installing the wheels: is every requirement met, versions included")
    c.add_argument("--target", required=True, help="the folder the wheels were installed into (pip --target)")
    e = sub.add_parser("device-env", help="a venv holding only the device image's packages, linked from here")
    e.add_argument("dir", help="a new folder")
    args = p.parse_args(argv)
    {"download": download, "check": check, "device-env": device_env}[args.cmd](args)


if __name__ == "__main__":
    main()
