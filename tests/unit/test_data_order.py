"""Data order across host counts, the pure parts: which saved `extra` is per host, the refusal of a
--resume that would change the data order, the event and its summary, what each host restores, and
the batch fingerprint's independence of row order and sharding."""

import json
import pathlib

import grain
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxlaunch.launcher.configuration.job import prepare
from jaxlaunch.launcher.records import history
from jaxlaunch.launcher.records.runs import RunDir
from jaxlaunch.workers import extras
from jaxlaunch.workers.inputs.data import batch_fingerprint, elastic_iterator

from jaxlaunch.contract import data_order, events
from jaxlaunch.contract.layout import CHECKPOINT_COMMIT_MARKER
from jaxlaunch.contract.protocol import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[2]
PER_HOST = {"data": {"state": {"next_index": 3}}, "best": {"value": 0.5}}
ELASTIC = {"data": {"state": {"global_next_index": 96}, "scope": "global"}, "best": {"value": 0.5}}


def test_only_iterator_states_saved_per_host_change_with_the_host_count():
    assert data_order.per_host_keys(PER_HOST) == ["data"]
    assert data_order.per_host_keys({"raw": {"bytes": "AAE="}}) == ["raw"]
    assert data_order.changed_keys(PER_HOST, 2, 1) == ["data"]
    assert data_order.changed_keys(PER_HOST, 2, 2) == [], "the same host count resumes exactly"
    assert data_order.changed_keys(ELASTIC, 2, 1) == [], "an elastic state is valid on any host count"
    assert data_order.changed_keys({"best": {"value": 1}}, 4, 2) == [], "JSON values are rank 0's everywhere"


def test_the_refusal_is_one_line_naming_the_key_and_the_fix():
    line = data_order.resume_refusal(["data"], 2, 1)
    assert "\n" not in line and "'data'" in line and "--allow-change data_order" in line and "--hosts 2" in line


def saved_run(tmp_path, hosts: int, part: dict) -> None:
    """A run of examples/elastic_grain.py with step 8 committed by `hosts` hosts, each saving `part`."""
    job = prepare({"run_dir": str(tmp_path / "run"), "entry": str(ROOT / "examples" / "elastic_grain.py"),
                   "hosts": hosts}).job
    run = RunDir(tmp_path / "run")
    run.create()
    run.save_config(job.to_dict())
    run.event(events.Launch(fingerprint=None))
    step = pathlib.Path(run.checkpoints) / "8"
    (step / "meta").mkdir(parents=True)
    (step / CHECKPOINT_COMMIT_MARKER).write_text("{}")
    (step / "meta" / "metadata").write_text(json.dumps({"topology": {"num_hosts": hosts}, "extra": [part] * hosts}))


def test_a_resume_on_another_host_count_over_per_host_iterators_is_refused_unless_allowed(tmp_path):
    saved_run(tmp_path, 2, PER_HOST)
    resume = {"run_dir": str(tmp_path / "run"), "resume": True}
    with pytest.raises(ConfigError, match="extra 'data' holds each host's own position.*--allow-change data_order"):
        prepare({**resume, "hosts": 1})
    assert prepare({**resume, "hosts": 1, "allow_change": ["data_order"]}).job.num_hosts == 1
    assert prepare({**resume, "hosts": 2}).job.num_hosts == 2


def test_a_resume_of_an_elastic_pipeline_on_another_host_count_goes_ahead(tmp_path):
    saved_run(tmp_path, 2, ELASTIC)
    assert prepare({"run_dir": str(tmp_path / "run"), "resume": True, "hosts": 1}).job.num_hosts == 1


def test_the_event_reads_back_and_reaches_the_summary(tmp_path):
    event = events.DataOrderChanged(keys=["data"], old_hosts=2, new_hosts=1, step=40, attempt=2, rank=0)
    line = json.loads(json.dumps(event.to_dict()))
    assert events.parse_event(line) == event
    assert event.message == "the data order changed at step 40: extra data was saved by 2 host(s) and restored on 1"
    run = RunDir(tmp_path / "run")
    run.create()
    run.event(event)
    assert history.load_history(run).summary(run)["data_order_changed"] == [
        {"step": 40, "keys": ["data"], "old_hosts": 2, "new_hosts": 1, "attempt": 2}]


def examples() -> grain.MapDataset:
    return grain.MapDataset.range(1000).shuffle(seed=0).map(lambda i: np.array([i]))


def test_an_elastic_iterator_is_saved_as_global_and_json_values_come_from_rank_0():
    batches = elastic_iterator(examples(), 8)
    next(batches)
    mine = extras.snapshot({"data": batches, "best": 0.25})
    assert mine["data"] == {"state": {"global_next_index": 8}, "scope": "global"}
    assert extras.shared(mine) == mine, "nothing of it is per host"
    fresh = elastic_iterator(examples(), 8)
    got = extras.restore({"data": fresh, "best": None}, own={"best": {"value": 9.0}}, rank_0=mine)
    assert got["best"] == 0.25 and fresh.get_state() == {"global_next_index": 8}


def test_the_iterator_of_an_elastic_iterator_is_global_too():
    """`for batch in it` (or `iter(it)`) gives the iterator Grain keeps inside an ElasticIterator, of a
    class of its own: its state is the ElasticIterator's, valid on any host count. Taken as a host's
    own, it made a resume on another host count refused and an elastic job warned for nothing."""
    batches = iter(elastic_iterator(examples(), 8))
    next(batches)
    mine = extras.snapshot({"data": batches})
    assert mine["data"] == {"state": {"global_next_index": 8}, "scope": "global"}
    assert extras.per_host_names({"data": batches}) == []
    assert data_order.changed_keys(mine, 2, 1) == []


def test_a_per_host_iterator_comes_from_the_host_s_own_part():
    it = iter(examples().to_iter_dataset())
    next(it)
    mine = extras.snapshot({"data": it, "best": 1.0})
    assert extras.shared(mine) == {"best": {"value": 1.0}}
    assert extras.per_host_names({"data": it, "e": elastic_iterator(examples(), 8), "best": 1.0}) == ["data"]
    expected = next(it)
    again = iter(examples().to_iter_dataset())
    extras.restore({"data": again}, own=mine, rank_0=extras.shared(mine))
    assert next(again) == expected


def test_the_fingerprint_depends_on_the_rows_not_their_order_or_sharding():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 4)).astype(np.float32), np.arange(16, dtype=np.int32)
    value = int(batch_fingerprint((x, y)))
    order = rng.permutation(16)
    assert int(batch_fingerprint((x[order], y[order]))) == value
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    assert int(batch_fingerprint((jax.device_put(x, rows), jax.device_put(y, rows)))) == value
    changed = x.copy()
    changed[5, 2] = np.nextafter(changed[5, 2], np.float32(np.inf))
    assert int(batch_fingerprint((changed, y))) != value, "one bit of one row changes it"
    swapped = x.copy()
    swapped[3, [0, 1]] = swapped[3, [1, 0]]
    assert int(batch_fingerprint((swapped, y))) != value, "the position inside a row counts"


def test_a_resume_whose_host_range_could_start_it_on_another_count_is_refused_unless_allowed(tmp_path):
    """--max-hosts would let the first attempt start on as many hosts as are free: the refusal covers
    every count the wider range adds, not only --hosts."""
    saved_run(tmp_path, 2, PER_HOST)
    resume = {"run_dir": str(tmp_path / "run"), "resume": True}
    with pytest.raises(ConfigError, match=r"^--resume on \d host\(s\) would change the data order: .* resume with "
                                          r"--max-hosts 2 and --min-hosts 2 \(this launch's range 2-4 may start on "
                                          r"\d\), or pass --allow-change data_order"):
        prepare({**resume, "hosts": 2, "max_hosts": 4})
    assert prepare({**resume, "max_hosts": 4, "allow_change": ["data_order"]}).job.max_hosts == 4
    saved_run(tmp_path / "elastic", 2, ELASTIC)
    assert prepare({"run_dir": str(tmp_path / "elastic" / "run"), "resume": True, "max_hosts": 4}).job.max_hosts == 4
