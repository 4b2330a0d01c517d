"""Every process's random seed, derived in one place from the experiment's one ``seed``.

Processes of one run must draw different random streams (two actors painting the same noise
would waste a core), yet a run must be reproducible from ``cfg.seed``. Each role offsets the
seed by its own stride, so the streams of different roles and members do not collide:

* the policy learner of member ``m``: ``seed + m`` (its initial weights);
* the discriminator of member ``m``: ``seed + 1000 m`` (initial weights, real-image draws);
* the replay buffer of member ``m``: ``seed + 7919 m`` (sampling);
* an actor: ``seed + crc32(actor_id)`` (its environments, noise and action sampling), so a
  restarted actor with the same identity repeats its stream and replicas differ.
"""

from __future__ import annotations

import zlib

DISCRIMINATOR_STRIDE = 1000
REPLAY_STRIDE = 7919


def learner_seed(seed: int, member: int) -> int:
    return seed + member


def discriminator_seed(seed: int, member: int) -> int:
    return seed + DISCRIMINATOR_STRIDE * member


def replay_seed(seed: int, member: int) -> int:
    return seed + REPLAY_STRIDE * member


def actor_seed(seed: int, actor_id: str) -> int:
    return seed + zlib.crc32(actor_id.encode())
