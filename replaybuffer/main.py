"""``spiral replaybuffer``: the replay buffer of final renders as a service process.

Serves ``spiral.v1.ReplayBuffer`` on ``--listen`` (default ``127.0.0.1:50053``) with the
capacity, minimum size and samples-per-insert limit of the experiment's ``replay`` section,
and the image shape and mode (conditional or not) of its environment. Prometheus metrics
(``spiral_replay_size_items``, ``_capacity_items``, ``_inserts_total``, ``_samples_total``
and the gRPC call metrics) are served on ``--metrics-port``.

On SIGTERM or SIGINT the buffer turns NOT_SERVING, wakes waiting samplers, gives in-flight
calls a grace period, writes its items to ``RUN_DIR/replaybuffer/member-M.npz`` (atomically)
and exits 0. On start it reloads that file unless ``--fresh`` is given, so a restarted buffer
can serve the discriminator at once.
"""

from __future__ import annotations

import argparse
import logging

from replaybuffer.service import ReplayBufferServicer
from replaybuffer.table import ReplayTable
from spiral.rpc.contract import declare_process_contract
from spiral.rpc.messages import experiment_image_shape
from spiral.rpc.server import BindError, build_server
from spiral.runtime.service_runtime import start_process
from spiral.runtime.seeding import replay_seed
from spiral.runtime.service_options import add_service_arguments, resolve_service_options

log = logging.getLogger(__name__)


def register(parser: argparse.ArgumentParser) -> None:
    add_service_arguments(parser)
    parser.add_argument("--fresh", action="store_true",
                        help="start empty instead of reloading the items saved at the last shutdown")
    parser.add_argument("--max-wait-seconds", type=float, default=5.0,
                        help="longest a Sample call waits for the rate limiter (default 5)")


def run(args: argparse.Namespace) -> int:
    opts = resolve_service_options("replaybuffer", args)
    cfg = opts.config
    declare_process_contract(cfg)  # callers of another experiment are refused
    start_process(opts)
    table = ReplayTable(capacity=cfg.replay.capacity, min_size=cfg.replay.min_size,
                        samples_per_insert=cfg.replay.samples_per_insert, seed=replay_seed(cfg.seed, opts.member))
    checkpoint = opts.run_dir / "replaybuffer" / f"member-{opts.member}.npz"
    image_shape = experiment_image_shape(cfg)
    if checkpoint.exists() and not args.fresh:
        try:
            restored = table.restore(checkpoint)
            held = table.items()
            if held and (held[0].render.shape != image_shape or (held[0].target is not None) != cfg.env.conditional):
                log.warning("%s holds items of another experiment (shape %s); starting empty",
                            checkpoint, held[0].render.shape)
                table = ReplayTable(capacity=cfg.replay.capacity, min_size=cfg.replay.min_size,
                                    samples_per_insert=cfg.replay.samples_per_insert,
                                    seed=replay_seed(cfg.seed, opts.member))
            else:
                log.info("restored %d items from %s", restored, checkpoint)
        except (OSError, ValueError) as exc:
            log.warning("could not restore %s (%s); starting empty", checkpoint, exc)

    serves = cfg.pbt.served_members(opts.member)
    servicer = ReplayBufferServicer(table, image_shape, cfg.env.conditional, member=opts.member,
                                    max_wait_seconds=args.max_wait_seconds,
                                    max_batch_size=max(cfg.replay.capacity, 1024), serves=serves)
    if len(serves) > 1:
        log.info("population replay buffer: taking the renders of members %s", sorted(serves))
    try:
        server = build_server([servicer.binding()], opts.listen, cfg.services)
    except BindError as exc:
        log.error("%s", exc)
        return 1
    server.start()
    log.info("replay buffer serving on %s (capacity %d, min_size %d, samples_per_insert %g, items %s, %s)",
             server.address, table.capacity, cfg.replay.min_size, cfg.replay.samples_per_insert, image_shape,
             "conditional" if cfg.env.conditional else "unconditional")

    def save() -> None:
        written = table.save(checkpoint)
        log.info("saved %d items to %s", written, checkpoint)

    server.serve_until_signal(grace=cfg.services.shutdown_grace_seconds, on_stopping=table.close, on_stopped=save)
    info = table.info()
    log.info("replay buffer stopped: %d items held, %d inserted, %d sampled", info.size, info.inserts, info.samples)
    return 0
