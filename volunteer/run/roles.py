"""What this machine does in a run (trainer, expert server or both) and how its working time is split.

Pure policy, no I/O: the client asks :func:`plan_roles` once when it joins, then asks a :class:`TimeSplit`
before each unit of work (a training step, a batch of expert requests) which role gets it. The split is a
deficit round robin over measured seconds, so a role whose units are slow still gets only its share.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from volunteer.errors import RunError

__all__ = ["Role", "RolePlan", "TimeSplit", "plan_roles"]


class Role(enum.StrEnum):
    """A part a peer plays."""

    TRAINER = "trainer"
    """Computes gradients on its data and averages with the swarm."""
    EXPERT_SERVER = "expert-server"
    """Serves mixture-of-experts layers to other peers' forward and backward passes."""


class RoleChoice(enum.StrEnum):
    """What the user asked for (``--role``)."""

    AUTO = "auto"
    TRAINER = "trainer"
    EXPERT_SERVER = "expert-server"
    BOTH = "both"


@dataclass(frozen=True, slots=True)
class RolePlan:
    """The share of working time each role gets (shares are in [0, 1] and sum to 1)."""

    trainer_share: float
    """Share of time spent training."""
    expert_share: float
    """Share of time spent serving experts."""

    def __post_init__(self) -> None:
        shares = (self.trainer_share, self.expert_share)
        if any(not 0.0 <= s <= 1.0 for s in shares) or abs(sum(shares) - 1.0) > 1e-9:
            raise RunError(f"role shares must lie in [0, 1] and sum to 1, got {shares}")

    @property
    def roles(self) -> tuple[Role, ...]:
        """The roles with a non-zero share."""
        return tuple(role for role, share in self.shares().items() if share > 0)

    def shares(self) -> dict[Role, float]:
        """Share per role."""
        return {Role.TRAINER: self.trainer_share, Role.EXPERT_SERVER: self.expert_share}

    def describe(self) -> str:
        """For the dashboard: ``"trainer"``, ``"expert-server"`` or ``"trainer 75% + expert-server 25%"``."""
        roles = self.roles
        if len(roles) == 1:
            return roles[0].value
        return " + ".join(f"{role.value} {share:.0%}" for role, share in self.shares().items())


def plan_roles(
    choice: RoleChoice | str, *, run_has_experts: bool, has_accelerator: bool, expert_share: float | None = None
) -> RolePlan:
    """Decide the roles for this machine.

    Runs without an expert layout only train (asking to serve experts there is an error). In runs with
    experts, ``auto`` serves experts with half the time on a machine with an accelerator and a quarter on
    a CPU-only one (experts answer other peers' requests: a slow server holds them up); ``both`` uses
    ``expert_share`` (default 0.5).
    """
    choice = RoleChoice(choice)
    if not run_has_experts:
        if choice is RoleChoice.EXPERT_SERVER:
            raise RunError("this run has no experts to serve; join it as a trainer (--role trainer or auto)")
        return RolePlan(1.0, 0.0)
    if choice is RoleChoice.TRAINER:
        return RolePlan(1.0, 0.0)
    if choice is RoleChoice.EXPERT_SERVER:
        return RolePlan(0.0, 1.0)
    if choice is RoleChoice.BOTH:
        share = 0.5 if expert_share is None else expert_share
    else:
        share = (0.5 if has_accelerator else 0.25) if expert_share is None else expert_share
    if not 0.0 < share < 1.0:
        raise RunError(f"an expert share for both roles lies strictly between 0 and 1, got {share}")
    return RolePlan(1.0 - share, share)


@dataclass(frozen=True, slots=True)
class TimeSplit:
    """Chooses the role of the next unit of work from the seconds each role has used so far.

    While experts have requests waiting (``expert_backlog > 0``) the expert share rises to
    ``busy_expert_share`` (if it is higher), so bursts are served promptly; training catches up afterwards
    only up to its planned share, never by starving the experts.
    """

    plan: RolePlan
    """The planned shares."""
    busy_expert_share: float = 0.75
    """Expert share while requests wait (only for plans that serve experts at all)."""

    def next_role(self, used: Mapping[Role, float], expert_backlog: int = 0) -> Role:
        """The role furthest below its share of the total time used; ties go to training."""
        roles = self.plan.roles
        if len(roles) == 1:
            return roles[0]
        shares = self.plan.shares()
        if expert_backlog > 0:
            busy = max(shares[Role.EXPERT_SERVER], self.busy_expert_share)
            shares = {Role.TRAINER: 1.0 - busy, Role.EXPERT_SERVER: busy}
        total = sum(max(0.0, used.get(role, 0.0)) for role in roles)
        deficits = {role: shares[role] * total - max(0.0, used.get(role, 0.0)) for role in roles}
        return max(roles, key=lambda role: (deficits[role], role is Role.TRAINER))
