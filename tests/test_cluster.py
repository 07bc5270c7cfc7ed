"""The cluster launcher configs in cluster/launcher/ are valid for the Ray version the project installs."""

from pathlib import Path

import pytest
import yaml

LAUNCHER = Path(__file__).resolve().parent.parent / "cluster" / "launcher"


@pytest.mark.parametrize("path", sorted(LAUNCHER.glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_config_passes_rays_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(cfg)  # raises on unknown keys or wrong types
    gpu_types = [
        t for t in cfg["available_node_types"].values() if t["node_config"]["InstanceType"].startswith(("p4", "p5"))
    ]
    assert gpu_types and cfg["available_node_types"][cfg["head_node_type"]]["resources"].get("GPU") == 0
