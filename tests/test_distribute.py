import json

import pytest

from nbn_keras.training import distribute

TWO_WORKERS = json.dumps({
    "cluster": {"worker": ["localhost:1", "localhost:2"]},
    "task": {"type": "worker", "index": 0},
})


def test_cluster_workers_reads_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert distribute.cluster_workers() == 1
    monkeypatch.setenv("TF_CONFIG", TWO_WORKERS)
    assert distribute.cluster_workers() == 2
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid"):
        distribute.cluster_workers()


def test_xla_is_refused_with_several_workers(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", TWO_WORKERS)
    with pytest.raises(ValueError, match="XLA .* cannot be combined with a distribution strategy"):
        distribute.make_strategy(single_device=True)


def test_xla_runs_without_a_strategy_on_one_device(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    strategy = distribute.make_strategy(single_device=True)
    assert strategy.num_replicas_in_sync == 1
    assert not strategy.extended._in_multi_worker_mode()
    assert distribute.is_chief(strategy)
