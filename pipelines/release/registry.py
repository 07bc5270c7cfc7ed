"""The generator as a registered MLflow model: `evaluate.py --register NAME` logs it into the run that trained
it and registers a new version of NAME; `sample.py --checkpoint models:/NAME/VERSION` samples from it.

The model is release/generator_model.py logged as code (no pickled Python objects) with the `sagan`
package and the weights as safetensors; its metadata holds the config, the step, the eval scores and the
git commit, which are also tags of the model version so the registry UI shows them.
"""

import re
import tempfile
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from sagan.checkpoint import CheckpointError
from sagan.config import to_dict
from sagan.errors import UsageError
from sagan.export import save_generator_file
from sagan.models import generator_kwargs

MODEL_CODE = Path(__file__).resolve().with_name("generator_model.py")


SAGAN_PACKAGE = Path(__file__).resolve().parents[2] / "sagan"


REQUIREMENTS = ["torch", "safetensors", "numpy", "pandas", "pyyaml", "pydantic>=2.7"]  # what the copied sagan imports


WEIGHTS_FILE = "generator.safetensors"


def signature(resolution: int):
    """Input: class_id, seed and optional truncation per row; output: (rows, R, R, 3) uint8 images."""
    inputs = Schema(
        [ColSpec("long", "class_id"), ColSpec("long", "seed"), ColSpec("double", "truncation", required=False)]
    )
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, resolution, resolution, 3))])
    return ModelSignature(inputs, outputs, params=ParamSchema([ParamSpec("batch_size", "long", 64)]))


def check_name(name: str) -> None:
    """UsageError for a registered-model name MLflow would refuse only after the whole evaluation."""
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name):
        raise UsageError(
            f"--register {name!r} is not a usable model name: use letters, digits, '-', '_' or '.' "
            "(not first), e.g. --register sagan-imagenet128"
        )


def register_generator(uri: str, run_id: str, name: str, G, cfg, meta: dict) -> str:
    """Log G (eval mode) as a pyfunc model into MLflow run `run_id` at `uri`, in a folder of its own
    (generator-step<step>-<id>/, so a later registration from the same run leaves this one as it is), register it
    as a new version of `name` and return that version. `meta` (step, scores, commit, class names...) goes into
    the model's metadata, its scalars also into the version's tags. The run is not reopened: its status stays."""
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    example = pd.DataFrame({"class_id": [0, cfg.model.num_classes - 1], "seed": [0, 1], "truncation": [0.0, 0.5]})
    folder = f"generator-step{meta.get('step', 0):07d}-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_generator_file(Path(tmp) / WEIGHTS_FILE, G, generator_kwargs(cfg.model), meta)
        model_dir = Path(tmp) / folder
        mlflow.pyfunc.save_model(
            model_dir,
            python_model=str(MODEL_CODE),
            artifacts={"generator": str(weights)},
            code_paths=[str(SAGAN_PACKAGE)],
            signature=signature(cfg.model.resolution),
            input_example=example,
            pip_requirements=REQUIREMENTS,
            metadata={"config": to_dict(cfg), **meta},
        )
        client.log_artifacts(run_id, str(model_dir), folder)
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {k: str(v) for k, v in meta.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)}
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{folder}"
    return str(client.create_model_version(name, source, run_id=run_id, tags=tags).version)


def weights_of(model_dir: Path, uri: str) -> Path:
    """The one safetensors file inside a downloaded model folder (as save_model lays artifacts out)."""
    found = sorted(Path(model_dir).rglob(WEIGHTS_FILE))
    if len(found) != 1:
        raise CheckpointError(
            f"{uri} holds {len(found)} {WEIGHTS_FILE} files, not one: it is not a SAGAN generator "
            "model (register one with evaluate.py --register NAME)"
        )
    return found[0]
