"""A generator to sample from, whatever it is stored as: a checkpoint, a run folder, a safetensors export or a
registered MLflow model (models:/NAME/VERSION); with its class names when the data has them.
"""

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.common.run_folder import load_checkpoint_at
from pipelines.tracking.store import TrackingError, check_tracking, default_tracking_uri
from sagan.checkpoint import generator_from_state
from sagan.errors import UsageError, first_line
from sagan.export import load_generator_file, save_generator_file
from sagan.folder import Folder
from sagan.models import generator_kwargs
from sagan.sampling import class_names
from sagan.storage import is_url


@dataclass
class Source:
    """A generator in eval mode, its class names (None when unknown) and what to say about it."""

    G: object
    kwargs: dict  # sagan.models.Generator's keyword arguments
    meta: dict = field(default_factory=dict)  # step, weights (ema/raw), checkpoint, class_names...
    names: list[str] | None = None
    description: str = ""

    def export(self, path: Path) -> Path:
        """The weights as safetensors at `path`, with the kwargs, metadata and class names in its header."""
        meta = {**self.meta, **({"class_names": self.names} if self.names else {})}
        return save_generator_file(path, self.G, self.kwargs, meta)


def load_source(
    spec: str, ema: bool = True, device="cpu", names_file: str | None = None, tracking_uri: str | None = None
) -> Source:
    """The generator named by `spec` on `device`; `names_file` is a classes.tsv overriding the known names."""
    if spec.startswith(("models:/", "runs:/")):
        source = from_mlflow(spec, ema, device, tracking_uri)
    elif spec.endswith(".safetensors"):
        if not ema:
            raise UsageError("--raw needs a checkpoint: a .safetensors export holds one generator only")
        G, meta = load_generator_file(spec, device)
        weights = meta.get("weights", "ema")
        source = Source(G, meta.pop("generator"), meta, meta.pop("class_names", None), f"{spec} ({weights} weights)")
    else:
        state, ckpt = load_checkpoint_at(spec)  # a path or an object-storage URL
        G, cfg = generator_from_state(state, ema, device)
        step = int(state["step"])
        meta = {"step": step, "weights": "ema" if ema else "raw", "checkpoint": str(ckpt)}
        names = shard_class_names(cfg.data.train_shards, G.num_classes)
        source = Source(
            G, generator_kwargs(cfg.model), meta, names, f"{'G_ema' if ema else 'raw G'} of {ckpt} (step {step})"
        )
    if names_file:
        source.names = class_names_file(names_file, source.G.num_classes)
    return source


def shard_class_names(train_shards: str, num_classes: int) -> list[str] | None:
    """The names in the classes.tsv that shard_imagenet.py wrote beside the split folders, when it is there:
    train_shards is the train split's folder (OUT/train) or a pattern of files inside it."""
    if is_url(train_shards):  # on object storage: the same two places, read through a temporary copy
        parent = train_shards.rstrip("/").rpartition("/")[0]
        for folder in (parent, parent.rpartition("/")[0]):
            with Folder(folder).local_copy("classes.tsv") as copy:
                names = class_names(copy, num_classes) if copy else None
            if names:
                return names
        return None
    folder = Path(train_shards)
    for candidate in (folder.parent / "classes.tsv", folder.parent.parent / "classes.tsv"):
        names = class_names(candidate, num_classes)
        if names:
            return names
    return None


def class_names_file(path: str, num_classes: int) -> list[str]:
    names = class_names(path, num_classes)
    if names is None:
        raise UsageError(
            f"--class-names {path} is missing or does not list {num_classes} classes (index<TAB>wnid<TAB>name per line)"
        )
    return names


def from_mlflow(uri: str, ema: bool, device, tracking_uri: str | None) -> Source:
    """The generator of a model registered by evaluate.py --register: the model is downloaded and only its
    safetensors weights are read (its code is not run here; mlflow.pyfunc.load_model runs it for its users)."""
    # MLflow (and the registry module, which needs it) load only for a models:/ source, not for a checkpoint's
    # samples (benchmarks/import_times.py).
    import mlflow

    from pipelines.release.registry import weights_of

    if not ema:
        raise UsageError("--raw needs a checkpoint: a registered model holds the EMA generator only")
    store = default_tracking_uri(tracking_uri)
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        raise UsageError(
            f"MLflow store {store} does not exist; pass --tracking-uri (or MLFLOW_TRACKING_URI) of the "
            f"store that registered {uri}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            check_tracking(store, setting="give --tracking-uri (or MLFLOW_TRACKING_URI)")
            mlflow.set_tracking_uri(store)  # models:/ URIs resolve through the process's registry URI
            mlflow.set_registry_uri(store)
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        except TrackingError as e:
            raise UsageError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - an unknown name or version, a store without it: one line, the fix
            raise UsageError(
                f"cannot load {uri} from MLflow at {store} ({first_line(e)}); check the name and version "
                "on the MLflow UI's Models page and pass --tracking-uri of the store that registered it"
            ) from None
        G, meta = load_generator_file(weights_of(Path(local), uri), device)
    kwargs = meta.pop("generator")
    return Source(G, kwargs, meta, meta.pop("class_names", None), f"{uri} (step {meta.get('step', '?')})")
