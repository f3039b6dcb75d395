import dataclasses
import pathlib

import pytest

from launcher.config import (
    DEFAULT_CLUSTER_CONFIG,
    ConfigError,
    Injection,
    JobConfig,
    load_file,
    override,
    parse_mesh,
    resolve_mesh,
    validate,
)


def job(**changes) -> JobConfig:
    return override(load_file(DEFAULT_CLUSTER_CONFIG), **changes)


def test_default_config_is_valid_and_matches_the_issue_defaults():
    j = job()
    validate(j)
    assert j.num_hosts == 4 and j.cluster.address is None and j.mesh == {"data": -1, "model": 2}


@pytest.mark.parametrize("hosts", [0, -3])
def test_hosts_must_be_positive(hosts):
    with pytest.raises(ConfigError, match="--hosts must be at least 1"):
        validate(job(num_hosts=hosts))


def test_mesh_must_divide_the_devices():
    with pytest.raises(ConfigError, match="does not divide the 8 devices"):
        validate(job(mesh={"data": -1, "model": 3}))
    with pytest.raises(ConfigError, match="needs 4 devices but the job has 8"):
        validate(job(mesh={"data": 2, "model": 2}))


def test_global_batch_must_divide_by_data_parallel_size():
    with pytest.raises(ConfigError, match="not divisible by the data-parallel size 4"):
        validate(job(**{"train.global_batch_size": 30}))


def test_unknown_model_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown model preset 'huge': choose one of tiny, small, base"):
        validate(job(**{"train.model": "huge"}))


def test_unreadable_data(tmp_path: pathlib.Path):
    with pytest.raises(ConfigError, match="no such file"):
        validate(job(**{"train.data": str(tmp_path / "missing.txt")}))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no files"):
        validate(job(**{"train.data": str(empty)}))


def test_elastic_bounds():
    with pytest.raises(ConfigError, match="--min-hosts"):
        validate(job(**{"fault.min_hosts": 5}))
    j = job(**{"fault.min_hosts": 2})
    validate(j)
    assert (j.min_hosts, j.max_hosts) == (2, 4)


def test_resolve_mesh_infers_the_minus_one_axis():
    assert resolve_mesh({"data": -1, "model": 2}, 8) == {"data": 4, "model": 2}
    assert resolve_mesh({"data": -1}, 6) == {"data": 6}
    with pytest.raises(ConfigError):
        resolve_mesh({"data": -1, "model": -1}, 8)


def test_parse_mesh():
    assert parse_mesh("data=-1,model=2") == {"data": -1, "model": 2}
    with pytest.raises(ConfigError, match="not of the form"):
        parse_mesh("data:4")


def test_unknown_yaml_key_is_reported_with_its_section(tmp_path: pathlib.Path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'stepz' in .*c.yaml.train"):
        load_file(path)


def test_wrong_yaml_type_is_reported(tmp_path: pathlib.Path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: many\n")
    with pytest.raises(ConfigError, match="train.steps must be a int"):
        load_file(path)


def test_every_cluster_config_loads_and_validates():
    files = sorted(DEFAULT_CLUSTER_CONFIG.parent.glob("*.yaml"))
    assert DEFAULT_CLUSTER_CONFIG in files
    for path in files:
        validate(load_file(path))


def test_every_ray_up_file_is_valid_and_matches_its_launcher_settings():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    files = sorted((DEFAULT_CLUSTER_CONFIG.parent / "ray-up").glob("*.yaml"))
    assert {p.stem for p in files} == {"aws-gpu", "gcp-tpu-pod"}
    for path in files:
        cluster = prepare_config(yaml.safe_load(path.read_text()))
        validate_config(cluster)  # Ray's own schema
        job = load_file(DEFAULT_CLUSTER_CONFIG.parent / path.name)
        wanted = job.cluster.resources_per_host
        workers = [t["resources"] for name, t in cluster["available_node_types"].items()
                   if name != cluster["head_node_type"]]
        fitting = [r for r in workers if all(r.get(k, 0) >= v for k, v in wanted.items())]
        assert fitting, f"no worker node type of {path.name} holds a host of {wanted}"
        accelerator = "GPU" if job.cluster.platform == "cuda" else "TPU"
        assert all(r[accelerator] == job.cluster.devices_per_host for r in fitting)
        assert all(r.get("host") == 1 for r in fitting), "one host process per node"


def test_override_only_applies_given_values():
    j = job()
    k = override(j, num_hosts=None, **{"train.steps": 7, "train.seed": None})
    assert k.train.steps == 7 and k.train.seed == j.train.seed and k.num_hosts == j.num_hosts
    assert dataclasses.replace(k, train=j.train) == j


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kill@step=5,host=1", Injection("kill", 5, 1)),
        ("exception@step=3,host=0,times=9", Injection("exception", 3, 0, 9)),
        ("hang@step=2", Injection("hang", 2, 0)),
    ],
)
def test_injection_parse(text, expected):
    assert Injection.parse(text) == expected


@pytest.mark.parametrize("text", ["explode@step=1", "kill", "kill@step=x", "kill@step=0", "kill@when=3"])
def test_injection_parse_errors(text):
    with pytest.raises(ConfigError, match="--inject"):
        Injection.parse(text)
