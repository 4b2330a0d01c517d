"""TLS and mutual TLS credentials from the PEM files named in ``services``.

``services.tls_cert`` / ``services.tls_key`` are this process's certificate chain and
private key; ``services.tls_ca`` is a CA bundle. What they switch on:

=============================== ============================== ================================
configured                      server                         client
=============================== ============================== ================================
nothing                         plaintext                      plaintext
cert + key                      TLS                            TLS, verifies the server with
                                                               the system roots [#roots]_;
                                                               presents cert + key if asked
cert + key + ca                 mutual TLS: clients must       TLS, verifies the server with
                                present a certificate signed   ``ca``, presents cert + key
                                by ``ca``
ca only                         refuses to start               TLS, verifies the server with
                                                               ``ca``, no client certificate
=============================== ============================== ================================

.. [#roots] Or the bundle named by ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``.

The server's certificate must name the host that clients dial (a DNS or IP subject
alternative name), or clients must pass ``server_name`` to
:func:`spiral.rpc.client.make_channel`.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from spiral.config import ServicesConfig


class TLSConfigError(ValueError):
    """A certificate, key or CA file named in the config cannot be read."""


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"services.{what}: cannot read {path!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise TLSConfigError(f"services.{what}: {path!r} is not a PEM file")
    return data


def server_uses_tls(cfg: ServicesConfig) -> bool:
    """Whether a server with this config serves TLS (it has a certificate and key)."""
    return bool(cfg.tls_cert and cfg.tls_key)


def client_uses_tls(cfg: ServicesConfig) -> bool:
    """Whether a client with this config dials with TLS (it has a CA or its own certificate)."""
    return bool(cfg.tls_ca or (cfg.tls_cert and cfg.tls_key))


def server_credentials(cfg: ServicesConfig) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS when ``tls_ca`` is set) server credentials, or None for plaintext.

    Raises:
        TLSConfigError: A file is missing, unreadable or not PEM, or a CA comes without a
            certificate.
    """
    if not server_uses_tls(cfg):
        if cfg.tls_ca:
            raise TLSConfigError("services.tls_ca: mutual TLS needs tls_cert and tls_key for the server too")
        return None
    chain = _read(cfg.tls_cert, "tls_cert")
    key = _read(cfg.tls_key, "tls_key")
    if cfg.tls_ca:
        return grpc.ssl_server_credentials([(key, chain)], root_certificates=_read(cfg.tls_ca, "tls_ca"),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials([(key, chain)])


def channel_credentials(cfg: ServicesConfig) -> grpc.ChannelCredentials | None:
    """Client credentials for dialing a spiral service, or None for plaintext.

    Raises:
        TLSConfigError: A file is missing, unreadable or not PEM.
    """
    if not client_uses_tls(cfg):
        return None
    roots = _read(cfg.tls_ca, "tls_ca") if cfg.tls_ca else None
    if cfg.tls_cert and cfg.tls_key:
        return grpc.ssl_channel_credentials(root_certificates=roots, private_key=_read(cfg.tls_key, "tls_key"),
                                            certificate_chain=_read(cfg.tls_cert, "tls_cert"))
    return grpc.ssl_channel_credentials(root_certificates=roots)
