"""The replay buffer service: recent final renders for the discriminator.

:mod:`replaybuffer.table` (FIFO table, uniform sampling, rate limiter, checkpoints),
:mod:`replaybuffer.service` (the ``spiral.v1.ReplayBuffer`` gRPC servicer) and
:mod:`replaybuffer.main` (``spiral replaybuffer``).
"""
