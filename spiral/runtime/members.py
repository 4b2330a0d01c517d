"""A population's members and their service addresses, and the static members file.

A member ``i`` is one policy learner, one discriminator and one replay buffer
(:class:`MemberAddresses`). ``spiral up --population K`` writes their addresses into a members
file (JSON; YAML is read too): a list of
``{member, learner_address, discriminator_address, replay_address}``, which the PBT controller
reads (``--members FILE``, :mod:`pbt_controller.discovery`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from spiral.runtime.atomic import atomic_write_bytes


@dataclass(frozen=True)
class MemberAddresses:
    """The services of one population member."""

    member: int
    learner_address: str
    discriminator_address: str
    replay_address: str


def parse_members(entries: Any, source: str = "members") -> dict[int, MemberAddresses]:
    """Validate a list of member dicts (the members file's content).

    Raises:
        ValueError: naming the entry and field that is missing or wrong.
    """
    if not isinstance(entries, list):
        raise ValueError(f"{source}: expected a list of members, got {type(entries).__name__}")
    found: dict[int, MemberAddresses] = {}
    for index, entry in enumerate(entries):
        where = f"{source}[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(entry).__name__}")
        unknown = set(entry) - {"member", "learner_address", "discriminator_address", "replay_address"}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
        member = entry.get("member")
        if not isinstance(member, int) or isinstance(member, bool) or member < 0:
            raise ValueError(f"{where}.member: must be an integer >= 0, got {member!r}")
        if member in found:
            raise ValueError(f"{where}.member: member {member} is listed twice")
        addresses = {}
        for name in ("learner_address", "discriminator_address", "replay_address"):
            value = entry.get(name)
            if not isinstance(value, str) or ":" not in value:
                raise ValueError(f"{where}.{name}: must be a 'host:port' string, got {value!r}")
            addresses[name] = value
        found[member] = MemberAddresses(member=member, **addresses)
    return found


def load_members_file(path: str | Path) -> dict[int, MemberAddresses]:
    """Read a JSON or YAML members file (YAML is a superset of JSON, so one parser reads both)."""
    path = Path(path)
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"members file {path}: {exc}") from None
    return parse_members(content, str(path))


def write_members_file(path: str | Path, members: Iterable[MemberAddresses]) -> Path:
    """Write a members file (JSON) that :func:`load_members_file` reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps([vars(m) for m in sorted(members, key=lambda m: m.member)], indent=2) + "\n"
    atomic_write_bytes(path, text.encode())  # the controller may read it while it is rewritten
    return path
