"""CLI flags with environment twins, declared once.

Every flag of every process is added with :func:`flag`, which records its environment variable; a value
given on the command line wins over the environment, which wins over the default. ``parse_args(argv)``
functions take argv (and optionally an env mapping) so tests and the manifest checker can parse real
command lines without touching ``os.environ``. Where one flag picks a part with flags of its own (the worker's
``--engine``), the part's own parser parses what the first one does not know (:attr:`Parser.then`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, overload

from dynamo_rt.errors import ConfigError

DEFAULT_ETCD = "http://127.0.0.1:2379"
DEFAULT_NATS = "nats://127.0.0.1:4222"
DEFAULT_NAMESPACE = "dynamo"

# Every env var any of our processes reads, for the manifest checker.
KNOWN_ENV: set[str] = set()


def parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {v!r}")


_N = TypeVar("_N")
_HELP = ("-h", "--help")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that knows each flag's environment twin.

    ``then``: a function from what this parser parsed to a second parser (the chosen engine's), which parses
    the arguments this one does not know; so each flag has one owner. What neither knows is an error of the
    second parser, and ``--help`` prints both parsers' flags.
    """

    def __init__(self, *args: Any, env: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.env: Mapping[str, str] = os.environ if env is None else env
        self.env_twins: dict[str, str] = {}
        self.then: Callable[[argparse.Namespace], argparse.ArgumentParser] | None = None

    @overload
    def parse_known_args(self, args: Iterable[str] | None = None,
                         namespace: None = None) -> tuple[argparse.Namespace, list[str]]: ...

    @overload
    def parse_known_args(self, args: Iterable[str] | None, namespace: _N) -> tuple[_N, list[str]]: ...

    @overload
    def parse_known_args(self, *, namespace: _N) -> tuple[_N, list[str]]: ...

    def parse_known_args(self, args: Iterable[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:
        if self.then is None:
            return super().parse_known_args(args, namespace)
        argv = list(sys.argv[1:] if args is None else args)
        # Help waits for the second parser: which one it is depends on the flags (--engine E --help).
        ns, rest = super().parse_known_args([a for a in argv if a not in _HELP], namespace)
        second = self.then(ns)
        if any(a in _HELP for a in argv):
            self.print_help()
            print()
            second.print_help()
            self.exit()
        return second.parse_args(rest, ns), []


def flag(
    parser: argparse.ArgumentParser,
    name: str,
    *,
    env: str,
    type: Callable[[str], Any] = str,
    default: Any = None,
    help: str = "",
    choices: Sequence[Any] | None = None,
    is_bool: bool = False,
) -> None:
    """Add ``--name`` with environment twin ``env``."""
    KNOWN_ENV.add(env)
    environ: Mapping[str, str] = getattr(parser, "env", os.environ)
    raw = environ.get(env)
    value = default
    if raw is not None and raw != "":
        try:
            value = parse_bool(raw) if is_bool else type(raw)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(name, f"{env}={raw!r} is not a valid value ({exc})") from None
    if isinstance(parser, Parser):
        parser.env_twins[name] = env
    h = f"{help} [env {env}; default {default!r}]"
    if is_bool:
        parser.add_argument(name, action=argparse.BooleanOptionalAction, default=value, help=h)
    else:
        parser.add_argument(name, type=type, default=value, help=h, choices=choices)


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every process that talks to etcd / NATS has."""
    flag(parser, "--etcd-endpoints", env="DYN_ETCD_ENDPOINTS", default=DEFAULT_ETCD,
         help="comma-separated etcd endpoints")
    flag(parser, "--nats-endpoints", env="DYN_NATS_ENDPOINTS", default=DEFAULT_NATS,
         help="comma-separated NATS servers")
    flag(parser, "--namespace", env="DYN_NAMESPACE", default=DEFAULT_NAMESPACE, help="dynamo namespace")
    flag(parser, "--log-level", env="DYN_LOG", default="info", help="log level (debug, info, warning)")
    flag(parser, "--log-format", env="DYN_LOG_FORMAT", default="text", choices=["text", "json"],
         help="log line format")
    flag(parser, "--nats-user", env="DYN_NATS_USER", default=None, help="NATS user")
    flag(parser, "--nats-password", env="DYN_NATS_PASSWORD", default=None, help="NATS password")
    flag(parser, "--nats-token", env="DYN_NATS_TOKEN", default=None, help="NATS token")
    flag(parser, "--nats-creds", env="DYN_NATS_CREDS", default=None, help="NATS credentials file")
    flag(parser, "--nats-ca", env="DYN_NATS_CA", default=None, help="CA file for NATS TLS")
    flag(parser, "--nats-cert", env="DYN_NATS_CERT", default=None, help="client certificate for NATS TLS")
    flag(parser, "--nats-key", env="DYN_NATS_KEY", default=None, help="client key for NATS TLS")
    flag(parser, "--etcd-user", env="DYN_ETCD_USER", default=None, help="etcd user")
    flag(parser, "--etcd-password", env="DYN_ETCD_PASSWORD", default=None, help="etcd password")
    flag(parser, "--etcd-ca", env="DYN_ETCD_CA", default=None, help="CA file for etcd TLS")
    flag(parser, "--etcd-cert", env="DYN_ETCD_CERT", default=None, help="client certificate for etcd TLS")
    flag(parser, "--etcd-key", env="DYN_ETCD_KEY", default=None, help="client key for etcd TLS")
    flag(parser, "--metrics-port", env="DYN_METRICS_PORT", type=int, default=0,
         help="Prometheus port for workers (0: pick a free port; -1: off)")
