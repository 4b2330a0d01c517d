"""Policy-learner RPC costs: trajectory ingest rate over gRPC and parameter fetch latency.

Starts a real learner process on loopback (tiny experiment unless ``--config``), then measures
in this process, in one run:

* ingest: unrolls per second accepted by ``SubmitUnrolls`` from ``--clients`` concurrent
  client threads, next to the baseline of encoding + decoding (validating) the same unroll in
  process with no network (the floor that serialization alone sets);
* parameters: latency of a full ``GetParameters`` (all chunks) and of an "up to date" poll,
  next to the baseline of snapshotting the same policy in process.

Usage::

    python -m bench.learner_rpc [--config tiny] [--seconds 20] [--clients 2]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np


from spiral.agent.acting import EpisodeRunner
from spiral.config import dump_experiment, experiment_path, load_experiment
from spiral.envs import action_spec_for, make_env
from spiral.nets import build_policy
from spiral.nets.params import snapshot_of
from spiral.runtime.snapshot import ParameterSnapshot
from spiral.rpc.client import make_channel
from spiral.rpc.messages import UnrollExpectation, decode_unroll, encode_unroll
from spiral.rpc.parameters import fetch_parameters
from spiral.commands.layout import free_port
from spiral.v1 import learner_pb2_grpc


def timed(fn, repeats: int) -> list[float]:  # noqa: ANN001
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    # A huge ingest queue and max lag so that the measurement sees the RPC path, not backpressure;
    # small batches and an eager update so that the learner turns over quickly beside it.
    cfg = load_experiment(experiment_path(args.config), {
        "learner": {"batch_size": 8, "checkpoint_every_updates": 5, "sample_grid_every_updates": 5,
                    "compile": False, "queue_capacity": 1_000_000, "max_policy_lag": 1_000_000},
        "actor": {"num_envs": 4}})
    config = tmp / "experiment.yaml"
    dump_experiment(cfg, config)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "spiral.commands.cli", "learner", "--config", str(config),
                             "--run-dir", str(tmp / "run"), "--listen", f"127.0.0.1:{port}", "--metrics-port", "0",
                             "--discriminator-address", f"127.0.0.1:{free_port()}"],
                            stdout=open(tmp / "learner.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    results: dict[str, float] = {}
    try:
        channel = make_channel(f"127.0.0.1:{port}", cfg.services)
        grpc.channel_ready_future(channel).result(timeout=120)
        stub = learner_pb2_grpc.PolicyLearnerStub(channel)
        update = fetch_parameters(stub, -1, timeout=30)
        policy = build_policy(cfg)
        runner = EpisodeRunner(cfg, make_env(cfg, cfg.actor.num_envs, seed=0), policy,
                               np.full((4, 64, 64, cfg.image_channels), 255, np.uint8), seed=0, actor_id="bench")
        runner.load_parameters(ParameterSnapshot(update.version, dict(update.tensors)))
        unroll = runner.run_episode()
        spec = action_spec_for(cfg)
        msg = encode_unroll(unroll, spec.names)
        size = msg.ByteSize()
        expect = UnrollExpectation.for_experiment(cfg, spec)

        codec = timed(lambda: decode_unroll(encode_unroll(unroll, spec.names), expect), 50)
        codec_rate = 1.0 / statistics.median(codec)
        results["inprocess_codec_unrolls_per_second"] = codec_rate

        sent = [0]
        stop = threading.Event()

        def client() -> None:
            ch = make_channel(f"127.0.0.1:{port}", cfg.services)
            s = learner_pb2_grpc.PolicyLearnerStub(ch)
            while not stop.is_set():
                s.SubmitUnrolls(iter([msg]), timeout=60)
                sent[0] += 1
            ch.close()

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join()
        rate = sent[0] / (time.perf_counter() - t0)
        results["grpc_ingest_unrolls_per_second"] = rate
        results["grpc_ingest_episodes_per_second"] = rate * unroll.batch_size
        print(f"unroll: {unroll.batch_size} episodes x {unroll.num_steps} steps, {size / 1e6:.2f} MB on the wire")
        print(f"ingest over gRPC ({args.clients} clients, learner training meanwhile): {rate:7.1f} unrolls/s "
              f"({rate * unroll.batch_size:.0f} episodes/s, {rate * size / 1e6:.1f} MB/s)")
        print(f"  in-process encode+validate baseline: {codec_rate:7.1f} unrolls/s -> gRPC at "
              f"{rate / codec_rate:.2f}x of the codec alone")

        full = timed(lambda: fetch_parameters(stub, -1, timeout=30), 30)
        version = fetch_parameters(stub, -1, timeout=30).version
        poll = [t for t in timed(lambda: fetch_parameters(stub, version, timeout=30), 100)]
        local = timed(lambda: snapshot_of(policy, 1).to_bytes(), 30)
        nbytes = sum(v.nbytes for v in update.tensors.values())
        results.update(full_fetch_ms=1e3 * statistics.median(full), poll_ms=1e3 * statistics.median(poll),
                       inprocess_snapshot_ms=1e3 * statistics.median(local), parameter_bytes=nbytes)
        print(f"parameters ({nbytes / 1e6:.2f} MB): full GetParameters {1e3 * statistics.median(full):.2f} ms median, "
              f"up-to-date poll {1e3 * statistics.median(poll):.2f} ms; in-process snapshot+serialize "
              f"{1e3 * statistics.median(local):.2f} ms (ratio {statistics.median(full) / statistics.median(local):.1f}x)")
        channel.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
