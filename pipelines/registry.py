"""The generator as a registered MLflow model: `evaluate.py --register NAME` logs it into the run that trained
it and registers a new version of NAME; `sample.py --checkpoint models:/NAME/VERSION` samples from it.

The model is pipelines/generator_model.py logged as code (no pickled Python objects) with the `sagan`
package and the weights as safetensors; its metadata holds the config, the step, the eval scores and the
git commit, which are also tags of the model version so the registry UI shows them.
"""

import tempfile
from pathlib import Path

import numpy as np

from sagan.export import generator_kwargs, save_generator_file

MODEL_CODE = Path(__file__).resolve().with_name("generator_model.py")
SAGAN_PACKAGE = Path(__file__).resolve().parent.parent / "sagan"
REQUIREMENTS = ["torch", "safetensors", "numpy", "pandas", "pyyaml"]


def signature(resolution: int):
    """Input: class_id, seed and optional truncation per row; output: (rows, R, R, 3) uint8 images."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("long", "class_id"), ColSpec("long", "seed"), ColSpec("double", "truncation", required=False)])
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, resolution, resolution, 3))])
    return ModelSignature(inputs, outputs, params=ParamSchema([ParamSpec("batch_size", "long", 64)]))


def register_generator(uri: str, run_id: str, name: str, G, cfg, meta: dict) -> str:
    """Log G (eval mode) as a pyfunc model into MLflow run `run_id` at `uri`, register it as a new version of
    `name` and return that version. `meta` (step, scores, commit, class names...) goes into the model's metadata,
    its scalars also into the version's tags. The run keeps the status it had."""
    import mlflow
    import pandas as pd

    from sagan.config import to_dict

    client = mlflow.MlflowClient(uri)
    status = client.get_run(run_id).info.status
    example = pd.DataFrame({"class_id": [0, cfg.model.num_classes - 1], "seed": [0, 1], "truncation": [0.0, 0.5]})
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_generator_file(Path(tmp) / "generator.safetensors", G, generator_kwargs(cfg.model), meta)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="generator", python_model=str(MODEL_CODE), artifacts={"generator": str(weights)},
                code_paths=[str(SAGAN_PACKAGE)], signature=signature(cfg.model.resolution), input_example=example,
                pip_requirements=REQUIREMENTS, metadata={"config": to_dict(cfg), **meta},
                registered_model_name=name,
            )  # fmt: skip
    client.update_run(run_id, status=status)  # start_run's exit marked it FINISHED
    version = str(info.registered_model_version)
    for key, value in meta.items():
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            client.set_model_version_tag(name, version, key, str(value))
    return version
