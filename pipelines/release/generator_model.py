"""The trained generator as an MLflow pyfunc model, logged from this file's code (release.registry).

MLflow copies this file into the model with the `sagan` package beside it, so loading the model needs
torch, safetensors and pandas, not Ray and not this repository:

    model = mlflow.pyfunc.load_model("models:/sagan-imagenet128/1")
    images = model.predict(pd.DataFrame({"class_id": [207, 207], "seed": [0, 1], "truncation": [0.5, 0.5]}))

Input: one row per image, columns class_id (int), seed (int) and truncation (float, 0 = off; optional).
Output: uint8 images (rows, R, R, 3). Row i's latent is drawn from its seed alone (sagan.sampling.noise), so
it is the image `pipelines/sample.py` makes for that class, seed and truncation (a missing truncation is 0).
"""

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from sagan.export import load_generator_file
from sagan.sampling import generate, noise, to_uint8

COLUMNS = ("class_id", "seed", "truncation")


class GeneratorModel(PythonModel):
    def load_context(self, context):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.G, self.meta = load_generator_file(context.artifacts["generator"], device=device)

    def predict(self, context, model_input, params=None) -> np.ndarray:
        if len(model_input) == 0:
            raise ValueError("input has no rows: give one row (class_id, seed[, truncation]) per image")
        missing = [c for c in COLUMNS[:2] if c not in model_input.columns]
        if missing:
            raise ValueError(f"input lacks column(s) {missing}: give class_id, seed and optionally truncation")
        classes = torch.tensor(model_input["class_id"].to_numpy(dtype=np.int64))
        n = self.G.num_classes
        if len(classes) and (classes.min() < 0 or classes.max() >= n):
            raise ValueError(f"class_id must be in 0..{n - 1}, got {classes.min().item()}..{classes.max().item()}")
        seeds = model_input["seed"].to_numpy(dtype=np.int64)
        trunc = (
            np.where(model_input["truncation"].isna(), 0.0, model_input["truncation"].to_numpy(dtype=float))
            if "truncation" in model_input
            else np.zeros(len(seeds))
        )
        z = torch.cat([noise([s], self.G.z_dim, float(t)) for s, t in zip(seeds, trunc)])  # ValueError for a bad T
        batch = int((params or {}).get("batch_size", 64))
        return to_uint8(generate(self.G, z, classes, batch_size=batch))


mlflow.models.set_model(GeneratorModel())
