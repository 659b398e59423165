"""Roles: which parts this machine plays and how its working time is split."""

from __future__ import annotations

import random

import pytest

from volunteer.errors import RunError
from volunteer.run.roles import Role, RoleChoice, RolePlan, TimeSplit, plan_roles


def test_runs_without_experts_only_train() -> None:
    for choice in ("auto", "trainer", "both"):
        plan = plan_roles(choice, run_has_experts=False, has_accelerator=True)
        assert plan.roles == (Role.TRAINER,)
        assert plan.describe() == "trainer"
    with pytest.raises(RunError, match="no experts to serve"):
        plan_roles(RoleChoice.EXPERT_SERVER, run_has_experts=False, has_accelerator=True)


def test_plans_for_runs_with_experts() -> None:
    assert plan_roles("trainer", run_has_experts=True, has_accelerator=True) == RolePlan(1.0, 0.0)
    assert plan_roles("expert-server", run_has_experts=True, has_accelerator=False) == RolePlan(0.0, 1.0)
    assert plan_roles("auto", run_has_experts=True, has_accelerator=True) == RolePlan(0.5, 0.5)
    assert plan_roles("auto", run_has_experts=True, has_accelerator=False) == RolePlan(0.75, 0.25)
    both = plan_roles("both", run_has_experts=True, has_accelerator=False, expert_share=0.3)
    assert both.describe() == "trainer 70% + expert-server 30%"
    with pytest.raises(RunError, match="strictly between 0 and 1"):
        plan_roles("both", run_has_experts=True, has_accelerator=False, expert_share=1.0)
    with pytest.raises(ValueError, match="'miner'"):
        plan_roles("miner", run_has_experts=True, has_accelerator=False)
    with pytest.raises(RunError, match="sum to 1"):
        RolePlan(0.5, 0.6)


def _simulate(split: TimeSplit, units: int, backlog: bool = False) -> dict[Role, float]:
    rng = random.Random(0)
    used = {Role.TRAINER: 0.0, Role.EXPERT_SERVER: 0.0}
    cost = {Role.TRAINER: 0.3, Role.EXPERT_SERVER: 0.05}  # training steps are slower than expert batches
    for _ in range(units):
        role = split.next_role(used, expert_backlog=1 if backlog else 0)
        used[role] += cost[role] * rng.uniform(0.5, 1.5)
    return used


def test_time_split_meets_the_planned_shares_whatever_the_unit_costs() -> None:
    used = _simulate(TimeSplit(RolePlan(0.75, 0.25)), 5000)
    share = used[Role.EXPERT_SERVER] / sum(used.values())
    assert share == pytest.approx(0.25, abs=0.02)


def test_waiting_expert_requests_raise_the_expert_share() -> None:
    used = _simulate(TimeSplit(RolePlan(0.75, 0.25), busy_expert_share=0.6), 5000, backlog=True)
    assert used[Role.EXPERT_SERVER] / sum(used.values()) == pytest.approx(0.6, abs=0.02)


def test_single_role_plans_never_switch() -> None:
    split = TimeSplit(RolePlan(1.0, 0.0))
    assert split.next_role({Role.TRAINER: 100.0}, expert_backlog=5) is Role.TRAINER
    assert TimeSplit(RolePlan(0.0, 1.0)).next_role({}) is Role.EXPERT_SERVER
    assert TimeSplit(RolePlan(0.5, 0.5)).next_role({}) is Role.TRAINER  # ties go to training
