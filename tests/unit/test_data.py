import numpy as np
import pytest

from workers import data as data_lib
from workers import mesh as mesh_lib


@pytest.fixture(scope="module")
def corpus():
    return data_lib.Corpus.load()


def test_default_corpus_is_real_text(corpus):
    assert len(corpus) > 1_000_000
    assert b"def " in corpus.tokens[:100_000].tobytes()


def test_batch_is_a_pure_function_of_seed_and_step(corpus):
    kw = dict(seed=(1, 2), global_batch_size=8, seq_len=16, rows=slice(None))
    a, b = data_lib.batch_rows(corpus, step=3, **kw), data_lib.batch_rows(corpus, step=3, **kw)
    np.testing.assert_array_equal(a[0], b[0])
    other_step = data_lib.batch_rows(corpus, step=4, **kw)
    assert not np.array_equal(a[0], other_step[0])
    other_seed = data_lib.batch_rows(corpus, step=3, **{**kw, "seed": (1, 3)})
    assert not np.array_equal(a[0], other_seed[0])


def test_targets_are_inputs_shifted_by_one(corpus):
    inputs, targets = data_lib.batch_rows(corpus, seed=(0,), step=0, global_batch_size=4, seq_len=32,
                                          rows=slice(None))
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])


@pytest.mark.parametrize("num_hosts", [1, 2, 4])
def test_hosts_together_build_the_same_global_batch(corpus, num_hosts):
    """Each host builds only its rows; together they are the global batch, whatever the count."""
    gbs, kw = 32, dict(seed=(0, 7), step=11, seq_len=24)
    full_inputs, _ = data_lib.batch_rows(corpus, global_batch_size=gbs, rows=slice(None), **kw)
    per_host = gbs // num_hosts
    parts = [
        data_lib.batch_rows(corpus, global_batch_size=gbs, rows=slice(h * per_host, (h + 1) * per_host), **kw)[0]
        for h in range(num_hosts)
    ]
    np.testing.assert_array_equal(np.concatenate(parts), full_inputs)


@pytest.mark.parametrize("axes", [{"data": 8}, {"data": -1, "model": 2}, {"data": 2, "model": 4}])
def test_global_array_is_the_same_on_every_mesh(corpus, axes):
    mesh = mesh_lib.build_mesh(axes)
    inputs, targets = data_lib.global_batch(
        corpus, seed=(0,), step=5, global_batch_size=16, seq_len=8, sharding=mesh_lib.batch_sharding(mesh)
    )
    expected, _ = data_lib.batch_rows(corpus, seed=(0,), step=5, global_batch_size=16, seq_len=8, rows=slice(None))
    np.testing.assert_array_equal(np.asarray(inputs), expected)
    assert inputs.addressable_shards[0].data.shape[0] == 16 // mesh.shape["data"]


def test_user_data_folder(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 20)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("more text " * 20)
    corpus = data_lib.Corpus.load(str(tmp_path))
    assert corpus.tokens.tobytes() == (tmp_path / "a.txt").read_bytes() + (tmp_path / "sub" / "b.txt").read_bytes()
