"""Options every service process shares: flags, their environment-variable fallbacks, and config.

A service is started as ``spiral ROLE --config FILE`` (roles: actor, learner, discriminator,
replaybuffer, pbt-controller). In Kubernetes the same values come from environment variables
(set from the pod spec and the downward API), so every flag below has one; a flag given on the
command line wins over its variable.

=========================== =============================== =======================================
flag                        environment variable            meaning
=========================== =============================== =======================================
``--config``                ``SPIRAL_CONFIG``               experiment YAML file (required)
``--set FIELD=VALUE``       ``SPIRAL_SET``                  override a setting (repeatable), see below
``--run-dir``               ``SPIRAL_RUN_DIR``              checkpoints, samples, logs (``runs/NAME``)
``--run-name``              ``SPIRAL_RUN_NAME``             the run's name in ``run.artifact_uri`` (default: ``name``)
``--artifact-uri``          ``SPIRAL_ARTIFACT_URI``         overrides ``run.artifact_uri``
``--listen``                ``SPIRAL_LISTEN``               gRPC address to bind (servers only)
``--metrics-port``          ``SPIRAL_METRICS_PORT``         Prometheus HTTP port (0 disables)
``--metrics-address``       ``SPIRAL_METRICS_ADDRESS``      address the metrics server binds
``--member``                ``SPIRAL_MEMBER``               population member index (PBT), default 0
``--actor-id``              ``SPIRAL_ACTOR_ID``             actor identity (pod name), default host-pid
``--learner-address``       ``SPIRAL_LEARNER_ADDRESS``      overrides ``services.learner_address``
``--discriminator-address`` ``SPIRAL_DISCRIMINATOR_ADDRESS`` overrides ``services.discriminator_address``
``--replay-address``        ``SPIRAL_REPLAY_ADDRESS``       overrides ``services.replay_address``
``--pbt-address``           ``SPIRAL_PBT_ADDRESS``          overrides ``services.pbt_address``
``--shared-discriminator``  ``SPIRAL_SHARED_DISCRIMINATOR`` overrides ``pbt.shared_discriminator``
``--device``                ``SPIRAL_DEVICE``               learners only: torch device of the updates
=========================== =============================== =======================================

``--set FIELD=VALUE`` overrides one setting of the experiment, named by its dotted path; the
value is YAML (``--set learner.reward.band=[-5,5] --set env.conditional=false``). ``SPIRAL_SET``
carries several such items, separated by newlines or ``;``
(``SPIRAL_SET="learner.batch_size=32;learner.reward.band=[-5, 5]"``; see
:func:`spiral.config.split_override_items`); like every variable here it is read only when no
``--set`` is given. Every service of a run must be given the same overrides: peers refuse a
caller whose experiment differs in what they rely on (:mod:`spiral.rpc.contract`).

``SPIRAL_SHARED_DISCRIMINATOR`` is ``true``/``false`` (also ``1``/``0``, ``yes``/``no``); on the
command line ``--shared-discriminator`` / ``--no-shared-discriminator``. It lets a Kubernetes
component switch a population to one shared discriminator and replay buffer
(``deploy/components/population-discriminator``) while the experiment file stays as generated.

A peer address may contain ``{member}``, replaced by the member index: in Kubernetes, replica
*i* of each member StatefulSet finds its own member's services as
``spiral-discriminator-{member}.spiral-discriminator:50052``.

``SPIRAL_ARTIFACT_URI`` and ``SPIRAL_RUN_NAME`` let a Kubernetes component
(``deploy/components/artifacts-s3``) send a run's artifacts to a bucket while the experiment
file stays as generated; only the learners and the PBT controller send any.

``SPIRAL_DEVICE`` is ``cpu`` (the default), ``cuda`` or ``cuda:N``; only the two learners read it
(:func:`add_device_argument`, :func:`resolve_device`), and actors always act on the CPU. The
``gpu`` Kubernetes component sets it to ``cuda`` on both learners' containers. A learner asked
for a GPU that this machine does not have stops at start with a message that says so
(:func:`spiral.runtime.device.training_device`); it never trains on the CPU instead.

Default ports: learner 50051, discriminator 50052, replay buffer 50053, PBT controller 50054;
metrics 9000 (one process per pod in Kubernetes; ``spiral up`` gives each process its own).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from spiral.config import OVERRIDES_ENV_VAR, ConfigError, ExperimentConfig, experiment_path, resolve_experiment, \
    split_override_items

DEFAULT_PORTS = {"learner": 50051, "discriminator": 50052, "replaybuffer": 50053, "pbt-controller": 50054}
DEFAULT_METRICS_PORT = 9000
DEFAULT_DEVICE = "cpu"
"""Where a learner trains when neither ``--device`` nor ``SPIRAL_DEVICE`` says."""

ENV_VARS = {
    "config": "SPIRAL_CONFIG",
    "set": OVERRIDES_ENV_VAR,
    "run_dir": "SPIRAL_RUN_DIR",
    "run_name": "SPIRAL_RUN_NAME",
    "artifact_uri": "SPIRAL_ARTIFACT_URI",
    "listen": "SPIRAL_LISTEN",
    "metrics_port": "SPIRAL_METRICS_PORT",
    "metrics_address": "SPIRAL_METRICS_ADDRESS",
    "member": "SPIRAL_MEMBER",
    "actor_id": "SPIRAL_ACTOR_ID",
    "learner_address": "SPIRAL_LEARNER_ADDRESS",
    "discriminator_address": "SPIRAL_DISCRIMINATOR_ADDRESS",
    "replay_address": "SPIRAL_REPLAY_ADDRESS",
    "pbt_address": "SPIRAL_PBT_ADDRESS",
    "shared_discriminator": "SPIRAL_SHARED_DISCRIMINATOR",
    "device": "SPIRAL_DEVICE",
}
"""Option name -> environment variable read when the flag is absent."""


@dataclass(frozen=True)
class ServiceOptions:
    """Resolved options of one service process."""

    role: str
    config: ExperimentConfig
    config_path: Path
    overrides: tuple[str, ...]
    """The ``FIELD=VALUE`` items applied over the experiment file (``--set`` or ``SPIRAL_SET``)."""
    run_dir: Path
    run_name: str
    """The run's name: its artifacts go to ``run.artifact_uri/RUN_NAME`` (``spiral up --name``)."""
    listen: str
    metrics_port: int
    metrics_address: str
    member: int
    actor_id: str


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the shared flags (all optional on the command line; env vars fill them in)."""
    parser.add_argument("--config", help="experiment YAML (or a name under experiments/) [SPIRAL_CONFIG]")
    parser.add_argument("--set", action="append", default=None, metavar="FIELD=VALUE",
                        help="override a setting of the experiment, e.g. learner.batch_size=32 (VALUE is YAML; "
                             f"repeatable) [{OVERRIDES_ENV_VAR}: items separated by newlines or ';']")
    parser.add_argument("--run-dir", help="directory for checkpoints, samples and logs [SPIRAL_RUN_DIR]")
    parser.add_argument("--run-name", help="the run's folder in run.artifact_uri (default: the experiment's name; "
                        "spiral up passes its --name) [SPIRAL_RUN_NAME]")
    parser.add_argument("--artifact-uri", help="s3://, gs:// or file:// URI that checkpoints and records are sent to "
                        "(overrides run.artifact_uri) [SPIRAL_ARTIFACT_URI]")
    parser.add_argument("--listen", help="gRPC address to bind, e.g. 0.0.0.0:50051 [SPIRAL_LISTEN]")
    parser.add_argument("--metrics-port", type=int, help=f"Prometheus port, 0 disables "
                        f"(default {DEFAULT_METRICS_PORT}) [SPIRAL_METRICS_PORT]")
    parser.add_argument("--metrics-address", help="address the metrics server binds (default 127.0.0.1) "
                        "[SPIRAL_METRICS_ADDRESS]")
    parser.add_argument("--member", type=int, help="population member index (default 0) [SPIRAL_MEMBER]")
    parser.add_argument("--actor-id", help="actor identity (default HOST-PID) [SPIRAL_ACTOR_ID]")
    for peer in ("learner", "discriminator", "replay", "pbt"):
        parser.add_argument(f"--{peer}-address", help=f"address of the {peer} service "
                            f"[{ENV_VARS[peer + '_address']}]")
    parser.add_argument("--shared-discriminator", action=argparse.BooleanOptionalAction, default=None,
                        help="population: one discriminator and replay buffer (member 0's) serve every member "
                             "(overrides pbt.shared_discriminator) [SPIRAL_SHARED_DISCRIMINATOR]")


def add_device_argument(parser: argparse.ArgumentParser, trains: str = "updates") -> None:
    """Add ``--device`` (what a command that trains reads; actors have none)."""
    parser.add_argument("--device", help=f"torch device of the {trains}: cpu (default), cuda or cuda:N; a GPU that "
                                         f"is missing stops it at start [{ENV_VARS['device']}]")


def device_setting(args: argparse.Namespace) -> tuple[str, str]:
    """The device asked for (``--device``, else ``SPIRAL_DEVICE``, else ``cpu``) and where that came from."""
    flag = getattr(args, "device", None)
    if flag:
        return str(flag), "--device"
    variable = os.environ.get(ENV_VARS["device"], "").strip()
    if variable:
        return variable, ENV_VARS["device"]
    return DEFAULT_DEVICE, "the default device"


def device_problem(args: argparse.Namespace) -> tuple[str, str | None]:
    """The device asked for (:func:`device_setting`) and why this machine cannot train on it (None: it can).

    ``cpu`` is always there (torch is not even imported for it); any other name is checked by
    :func:`spiral.runtime.device.training_device`, so ``spiral up`` and ``spiral local`` refuse a
    missing GPU before starting anything, with the message a learner would give.
    """
    name, source = device_setting(args)
    if name == DEFAULT_DEVICE:
        return name, None
    from spiral.runtime.device import DeviceUnavailable, training_device  # torch: only where a GPU is asked for

    try:
        training_device(name, source)
    except DeviceUnavailable as exc:
        return name, str(exc)
    return name, None


def resolve_device(role: str, args: argparse.Namespace) -> str:
    """The device a learner process trains on, checked to exist on this machine (:func:`device_problem`).

    Raises:
        SystemExit: Naming the flag or variable, when the device is not one a learner can use or
            this machine lacks it; the learner never trains on the CPU instead.
    """
    name, problem = device_problem(args)
    if problem:
        raise SystemExit(f"spiral {role}: {problem}")
    return name


def _pick(args: argparse.Namespace, name: str) -> str | None:
    value = getattr(args, name, None)
    if value is None:
        value = os.environ.get(ENV_VARS[name])
    return None if value is None or value == "" else str(value)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_switch(raw: str | None, what: str) -> bool | None:
    """``true``/``false`` (``1``/``0``, ``yes``/``no``, ``on``/``off``, any case); None when unset.

    Raises:
        SystemExit: naming ``what`` when ``raw`` is none of those.
    """
    if raw is None:
        return None
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SystemExit(f"{what} must be true or false, got {raw!r}")


def resolve_service_options(role: str, args: argparse.Namespace) -> ServiceOptions:
    """Combine flags, environment variables and the experiment file into :class:`ServiceOptions`.

    Raises:
        SystemExit: With a message naming the missing or invalid option.
    """
    config_ref = _pick(args, "config")
    if not config_ref:
        raise SystemExit(f"spiral {role}: --config (or SPIRAL_CONFIG) is required")
    path = experiment_path(config_ref)
    if not path.exists():
        raise SystemExit(f"spiral {role}: config file {path} does not exist")
    if getattr(args, "set", None):
        items, source = list(args.set), "--set"
    else:
        items, source = split_override_items(os.environ.get(OVERRIDES_ENV_VAR, "")), OVERRIDES_ENV_VAR
    try:
        resolved = resolve_experiment(path, items, source=source)
    except ConfigError as exc:
        raise SystemExit(f"spiral {role}: {exc}") from None
    config = resolved.config
    overrides = {f"{peer}_address": _pick(args, f"{peer}_address") for peer in ("learner", "discriminator", "replay", "pbt")}
    overrides = {k: v for k, v in overrides.items() if v}
    if overrides:
        config = dataclasses.replace(config, services=dataclasses.replace(config.services, **overrides))
    shared = parse_switch(_pick(args, "shared_discriminator"), f"spiral {role}: {ENV_VARS['shared_discriminator']} "
                                                               "/ --shared-discriminator")
    if shared is not None and shared != config.pbt.shared_discriminator:
        config = dataclasses.replace(config, pbt=dataclasses.replace(config.pbt, shared_discriminator=shared))

    artifact_uri = _pick(args, "artifact_uri")
    if artifact_uri is not None and artifact_uri != config.run.artifact_uri:
        run = dataclasses.replace(config.run, artifact_uri=artifact_uri)
        try:
            run.validate("run")
        except ConfigError as exc:
            raise SystemExit(f"spiral {role}: {ENV_VARS['artifact_uri']} / --artifact-uri: {exc}") from None
        config = dataclasses.replace(config, run=run)

    def integer(name: str, default: int) -> int:
        raw = _pick(args, name)
        if raw is None:
            return default
        try:
            return int(raw)
        except ValueError:
            raise SystemExit(f"spiral {role}: {ENV_VARS[name]} / --{name.replace('_', '-')} must be an integer, "
                             f"got {raw!r}") from None

    member = integer("member", 0)
    if member < 0:
        raise SystemExit(f"spiral {role}: {ENV_VARS['member']} / --member must be >= 0, got {member}")
    # Peer addresses may name the member: "spiral-discriminator-{member}.spiral-discriminator:50052"
    # lets every replica of a StatefulSet population find its own member's services.
    services = config.services
    expanded = {name: getattr(services, name).replace("{member}", str(member))
                for name in ("learner_address", "discriminator_address", "replay_address", "pbt_address")}
    config = dataclasses.replace(config, services=dataclasses.replace(services, **expanded))

    run_name = _pick(args, "run_name") or config.name
    if "/" in run_name:
        raise SystemExit(f"spiral {role}: {ENV_VARS['run_name']} / --run-name must be one path segment, got {run_name!r}")
    port = DEFAULT_PORTS.get(role)
    listen = _pick(args, "listen") or (f"127.0.0.1:{port}" if port else "")
    return ServiceOptions(
        role=role,
        config=config,
        config_path=path,
        overrides=resolved.overrides,
        run_dir=Path(_pick(args, "run_dir") or Path("runs") / config.name),
        run_name=run_name,
        listen=listen,
        metrics_port=integer("metrics_port", DEFAULT_METRICS_PORT),
        metrics_address=_pick(args, "metrics_address") or "127.0.0.1",
        member=member,
        actor_id=_pick(args, "actor_id") or f"{socket.gethostname()}-{os.getpid()}",
    )
