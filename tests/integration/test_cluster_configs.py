"""The `ray up` files pass Ray's own schema and match the launcher settings of the same name."""

import pathlib

import yaml
from jaxlaunch.launcher.configuration.schema import load_file
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "cluster_configs"


def test_every_ray_up_file_is_valid_and_matches_its_launcher_settings():
    files = sorted((CONFIGS / "ray-up").glob("*.yaml"))
    assert {p.stem for p in files} == {"aws-gpu", "gcp-tpu-pod"}
    for path in files:
        cluster = prepare_config(yaml.safe_load(path.read_text()))
        validate_config(cluster)
        job = load_file(CONFIGS / path.name)
        wanted = job.cluster.resources_per_host
        workers = [t["resources"] for name, t in cluster["available_node_types"].items()
                   if name != cluster["head_node_type"]]
        fitting = [r for r in workers if all(r.get(k, 0) >= v for k, v in wanted.items())]
        assert fitting, f"no worker node type of {path.name} holds a host of {wanted}"
        accelerator = "GPU" if job.cluster.platform == "cuda" else "TPU"
        assert all(r[accelerator] == job.cluster.devices_per_host for r in fitting)
        assert all(r.get("host") == 1 for r in fitting), "one host process per node"
