"""Job configuration: defaults, YAML files, overrides, validation of every number."""

import dataclasses
import math
import pathlib

import pytest
from jaxlaunch.launcher.configuration.schema import (
    ClusterConfig,
    ConfigError,
    JobConfig,
    apply,
    check_run_path,
    load_file,
    merge_settings,
    override,
    parse_mesh,
    parse_settings,
    run_changes,
    validate,
)

from jaxlaunch.contract.mesh import resolve_mesh
from jaxlaunch.contract.protocol import Injection
from jaxlaunch.contract.values import as_setting

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "cluster_configs"


def job(**changes) -> JobConfig:
    return override(JobConfig(), **changes)


def test_the_defaults_are_valid_and_local_yaml_documents_them():
    validate(JobConfig())
    assert load_file(CONFIGS / "local.yaml") == JobConfig(), "local.yaml must say what the defaults are"
    assert JobConfig().cluster.address is None and JobConfig().mesh == {"data": -1, "model": 2}


@pytest.mark.parametrize("hosts", [0, -3])
def test_hosts_must_be_positive(hosts):
    with pytest.raises(ConfigError, match="--hosts must be at least 1"):
        validate(job(num_hosts=hosts))


def test_mesh_must_divide_the_devices():
    with pytest.raises(ConfigError, match="does not divide the 8 devices"):
        validate(job(mesh={"data": -1, "model": 3}))
    with pytest.raises(ConfigError, match="needs 4 devices but the job has 8"):
        validate(job(mesh={"data": 2, "model": 2}))


def test_elastic_bounds():
    with pytest.raises(ConfigError, match="--min-hosts"):
        validate(job(**{"fault.min_hosts": 5}))
    j = job(**{"fault.min_hosts": 2})
    validate(j)
    assert (j.min_hosts, j.max_hosts) == (2, 4)


@pytest.mark.parametrize("field", ["watchdog.hang_timeout_s", "watchdog.startup_timeout_s", "watchdog.save_timeout_s",
                                   "watchdog.poll_interval_s", "fault.capacity_timeout_s", "fault.max_backoff_s",
                                   "cluster.placement_timeout_s", "distributed.init_timeout_s"])
@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf])
def test_timeouts_must_be_finite_and_positive(field, value):
    # an int field (distributed's) refuses a float by its type first
    with pytest.raises(ConfigError, match=f"{field}( must be a finite number above 0|: input should be a valid int)"):
        validate(job(**{field: value}))


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_backoff_may_be_zero_but_not_negative_or_nan(value):
    validate(job(**{"fault.backoff_s": 0.0}))
    with pytest.raises(ConfigError, match="fault.backoff_s must be a finite number at least 0"):
        validate(job(**{"fault.backoff_s": value}))


def test_verify_every_zero_means_at_save_steps_only_as_its_help_says():
    validate(job(**{"fault.verify_every": 0}))
    with pytest.raises(ConfigError, match="fault.verify_every must be a finite number at least 0"):
        validate(job(**{"fault.verify_every": -1}))


def test_step_counts_must_fit_a_step_counter():
    with pytest.raises(ConfigError, match="train.steps must be at most 2147483647"):
        validate(job(**{"train.steps": 10**12}))
    with pytest.raises(ConfigError, match="train.steps must be a finite number above 0"):
        validate(job(**{"train.steps": 0}))


def test_resources_must_be_positive_and_finite():
    for bad in ({}, {"CPU": 0}, {"CPU": math.nan}):
        with pytest.raises(ConfigError, match="resources_per_host"):
            validate(job(cluster=ClusterConfig(resources_per_host=bad)))


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
    with pytest.raises(ConfigError, match="train.steps must be int"):
        load_file(path)


def test_a_yaml_file_applies_only_its_own_keys_over_a_base(tmp_path: pathlib.Path):
    path = tmp_path / "c.yaml"
    path.write_text("checkpoint: {save_every: 7}\nconfig: {model: small}\n")
    base = job(**{"checkpoint.max_to_keep": 9, "train.steps": 11})
    loaded = load_file(path, base)
    assert (loaded.checkpoint.save_every, loaded.checkpoint.max_to_keep, loaded.train.steps) == (7, 9, 11)
    assert loaded.config == {"model": "small"}


def test_every_cluster_config_loads_and_validates():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert {p.stem for p in files} >= {"local", "ray-cluster", "aws-gpu", "gcp-tpu-pod"}
    for path in files:
        validate(load_file(path))


def test_override_only_applies_given_values():
    j = job()
    k = override(j, num_hosts=None, **{"train.steps": 7, "train.seed": None})
    assert k.train.steps == 7 and k.train.seed == j.train.seed and k.num_hosts == j.num_hosts
    assert dataclasses.replace(k, train=j.train) == j


def test_settings_from_set_flags_are_yaml_scalars_but_a_text_setting_keeps_the_text_as_written():
    given = parse_settings(["lr=3e-4", "name=abc", "layers=4", "flag=true", "opt.beta=0.9", "empty="])
    assert as_setting(given, None) == {
        "lr": 3e-4, "name": "abc", "layers": 4, "flag": True, "opt": {"beta": 0.9}, "empty": ""}
    texts = parse_settings(["version=1.10", "name=007", "tag=true", "layers=4", "opt.beta=0.90"])
    assert as_setting(texts, {"version": "1.0", "name": "x", "tag": "t", "layers": 1, "opt": {"beta": 0.5}}) == {
        "version": "1.10", "name": "007", "tag": "true", "layers": 4, "opt": {"beta": 0.9}}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_settings(["novalue"])
    assert merge_settings({"a": 1, "o": {"x": 1, "y": 2}}, {"o": {"y": 3}}) == {"a": 1, "o": {"x": 1, "y": 3}}


def test_run_changes_name_what_a_resume_would_change():
    saved = job(config={"seq_len": 128, "model": "tiny"}, **{"train.schedule_steps": 300})
    same = job(config={"seq_len": 128, "model": "tiny"}, num_hosts=2, **{"train.schedule_steps": 300,
                                                                          "train.steps": 900})
    assert run_changes(saved, same) == {}, "host count and length are not what the run computes"
    other = apply(saved, {"config": {"seq_len": 64}, "train": {"seed": 3}}, "x")
    assert run_changes(saved, other) == {"seed": (0, 3), "seq_len": (128, 64)}


def test_run_path_checks(tmp_path: pathlib.Path):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        check_run_path(str(afile), resume=False)
    check_run_path(str(tmp_path / "new" / "run"), resume=False)


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


@pytest.mark.parametrize(("changes", "message"), [
    ({"checkpoint.memory_tier": True, "checkpoint.save_every": 5, "checkpoint.persist_every": 7},
     "with the memory tier, --persist-every 7 must be a multiple of --save-every 5 (.*): pass --persist-every 5 or 10"),
    ({"watchdog.startup_timeout_s": 1.0}, "--startup-timeout 1 is too short to start JAX on a host: pass at least 10"),
    ({"watchdog.hang_timeout_s": 0.3}, r"--hang-timeout 0.3 is shorter than 2 of the driver's polls .*at least 0.5"),
    ({"watchdog.save_timeout_s": 0.1}, "--save-timeout 0.1 is shorter than 2 of the driver's polls"),
    ({"fault.backoff_s": 40.0}, "fault.max_backoff_s \\(30\\) is below fault.backoff_s \\(40\\)"),
    ({"fault.max_hosts": 2}, r"need 1 <= --min-hosts \(4\) <= --hosts \(4\) <= --max-hosts \(2\)"),
])
def test_rules_across_fields_name_the_fix(changes, message):
    with pytest.raises(ConfigError, match=message):
        validate(job(**changes))


def test_without_the_memory_tier_persist_every_is_unused_and_any_multiple_passes():
    validate(job(**{"checkpoint.memory_tier": False, "checkpoint.save_every": 5, "checkpoint.persist_every": 7}))
    validate(job(**{"checkpoint.memory_tier": True, "checkpoint.save_every": 5, "checkpoint.persist_every": 20}))


def test_every_field_is_type_checked_also_in_a_config_built_in_python():
    with pytest.raises(ConfigError, match="num_hosts: input should be a valid integer, got '2'"):
        validate(JobConfig(num_hosts="2"))  # type: ignore[arg-type]


def test_the_cadences_default_to_auto_with_the_memory_tier_on_and_auto_mixes_with_numbers():
    checkpoint = job().checkpoint
    assert (checkpoint.save_every, checkpoint.persist_every, checkpoint.memory_tier) == ("auto", "auto", True)
    assert checkpoint.persist_max_age_s == 600.0
    validate(job(**{"checkpoint.save_every": 7}))  # persist_every auto: no multiple to check
    validate(job(**{"checkpoint.persist_every": 7}))


@pytest.mark.parametrize(("changes", "message"), [
    ({"checkpoint.save_every": 0}, "checkpoint.save_every must be a finite number above 0, got 0"),
    ({"checkpoint.persist_max_age_s": -1.0}, "checkpoint.persist_max_age_s must be a finite number above 0"),
])
def test_bad_cadences_are_one_line(changes, message):
    with pytest.raises(ConfigError, match=message):
        validate(job(**changes))
