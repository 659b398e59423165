"""The many-node simulator: the real node cores at scale, with churn and loss, in virtual time."""

from __future__ import annotations

import pytest

from coordinator_free_dht.testing.simulator import SimConfig, Simulator, run_simulation


def test_thousand_nodes_without_churn_all_gets_succeed() -> None:
    report = run_simulation(SimConfig(nodes=1000, keys=100, seed=11))
    summary = report.as_dict()
    assert summary["success_rate"] == 1.0
    assert summary["store_success_rate"] == 1.0
    assert len(report.hops) == 100
    assert 1 <= summary["hops_median"] <= 4
    assert summary["messages_per_get_median"] >= 1
    assert 0.0 < summary["latency_median_ms"] < 2000.0


def test_thousand_nodes_with_churn_and_loss() -> None:
    report = run_simulation(SimConfig(nodes=1000, keys=100, churn=0.2, loss=0.01, seed=12))
    assert report.replaced == 200
    assert report.success_rate >= 0.99


def test_exactly_num_replicas_copies_and_overwrites_add_none() -> None:
    config = SimConfig(nodes=300, keys=20, seed=13, check_wire=True)
    simulator = Simulator(config)
    report = simulator.run()
    assert report.success_rate == 1.0
    replicas = config.protocol.num_replicas
    # Gets may cache a value at one extra node (section 2.3), so count the copies on a stores-only run. And
    # every node answers in time: a lookup does not wait for a slow node (slow_fraction), so a store may
    # skip a slow replica for the next nearest node (the slow one keeps its older copy until it expires).
    stores_only = Simulator(SimConfig(nodes=300, keys=20, seed=13, read_back=False, slow_fraction=0.0))
    stores_only.run()
    assert [stores_only.holders(f"key-{index}") for index in range(20)] == [replicas] * 20
    # Store every key again (a later expiration overwrites): still exactly num_replicas copies.
    for index in range(20):
        stores_only.schedule("store", index, stores_only.now + 1 + index * 0.05)
    stores_only.run()
    assert [stores_only.holders(f"key-{index}") for index in range(20)] == [replicas] * 20


def test_same_seed_same_run() -> None:
    first = run_simulation(SimConfig(nodes=200, keys=20, churn=0.1, loss=0.02, seed=5)).as_dict()
    second = run_simulation(SimConfig(nodes=200, keys=20, churn=0.1, loss=0.02, seed=5)).as_dict()
    first.pop("wall_s")
    second.pop("wall_s")
    assert first == second


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ten_thousand_nodes_without_churn() -> None:
    report = run_simulation(SimConfig(nodes=10_000, keys=1000, seed=1))
    assert report.success_rate == 1.0
    assert report.as_dict()["hops_median"] <= 4


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ten_thousand_nodes_with_churn_and_loss() -> None:
    report = run_simulation(SimConfig(nodes=10_000, keys=1000, churn=0.2, loss=0.01, seed=1))
    assert report.replaced == 2000
    assert report.success_rate >= 0.995
    assert report.as_dict()["hops_median"] <= 4
