"""Outputs: where ECS documents go. `open_outputs` makes a session's outputs (`parse_output_spec` turns `--output`
values into outputs). Light to import: a network output's sender loads only when one is asked for."""
from __future__ import annotations

import grp
import importlib
from typing import Callable

from tracer import safefiles
from tracer.outputs.base import Fanout, KindFilter, Output, OutputError, Transform
from tracer.outputs.file import FileOutput, check_file_target
from tracer.outputs.secrets import redact
from tracer.outputs.stdout import StdoutOutput

__all__ = ["Fanout", "FileOutput", "KindFilter", "Transform", "Output", "OutputError", "OutputSpecError", "OutputsError",
           "StdoutOutput", "open_outputs", "parse_output_spec", "parse_output_specs"]

ACCEPTED_FORMS = ("'-' (stdout), 'file:PATH', 'file:PATH?max_mb=N&keep=K&group=G', 'syslog+tcp://HOST:PORT', "
                  "'syslog+udp://HOST:PORT', 'syslog+tls://HOST:PORT?ca=FILE[&cert=FILE&key=FILE]', "
                  "'hec://HOST:PORT?token_file=F[&index=I&sourcetype=S]', 'hecs://HOST:PORT?token_file=F[&...&ca=FILE]', "
                  "'es://HOST:PORT/INDEX', 'ess://HOST:PORT/INDEX[?ca=FILE][&user=U&password_file=F | &api_key_file=F]', "
                  "'forward://HOST:PORT[?tag=T&shared_key_file=F&compress=gzip&tls=1&ca=FILE&cert=FILE&key=FILE]', "
                  "'kafka://BROKER[,BROKER...]/TOPIC[?compression=...&alerts_topic=T&tls=1&ca=FILE&sasl=...&user=U"
                  "&password_file=F]', 'syslog+relp://HOST:PORT[?tls=1&ca=FILE&cert=FILE&key=FILE]' "
                  "(each secret also as NAME= or NAME_env=VAR)")


# Network outputs: a sender per protocol, each driven by the delivery core (queue, spool, retries).
# (prefixes, module under tracer.outputs, its spec parser): imported only when such an output is asked
# for, so that a command writing to a file or stdout (a run client) does not load ssl, http or Kafka.
NETWORK_SENDERS = ((("syslog+relp://",), "relp", "parse_relp_spec"),
                   (("syslog+",), "syslog", "parse_syslog_spec"),
                   (("kafka://",), "kafka", "parse_kafka_spec"),
                   (("hec://", "hecs://", "es://", "ess://"), "http", "parse_http_spec"),
                   (("forward://",), "forward", "parse_forward_spec"))


class OutputSpecError(ValueError):
    """An --output value that is not one of the accepted forms."""


class OutputsError(Exception):
    """An output spec or its destination is wrong (bad input)."""


def open_outputs(specs: list[str] | tuple[str, ...], config=None, schema: str = "ecs"):
    """The session's outputs: the specs, else the config's [output] specs (a tracer.config.Config; None: the
    defaults), else stdout; with the config's spool_mb for network outputs."""
    if config is not None:
        specs, spool_mb = list(specs) or list(config.output.specs), config.output.spool_mb
    else:
        specs, spool_mb = list(specs), None
    try:
        fanout = Fanout(parse_output_specs(specs, spool_mb))
    except (OutputSpecError, OutputError, OSError) as e:
        raise OutputsError(str(e)) from None
    if schema == "ocsf":
        from tracer.schema.ocsf import convert
        return Transform(fanout, convert)
    return fanout


def parse_output_spec(spec: str, spool_mb: float | None = None) -> Output:
    """'-' -> stdout; 'file:PATH[?max_mb=N&keep=K&group=G]' -> FileOutput (N, K positive integers, G a group);
    'syslog+tcp|tls|udp://...', 'hec[s]://...', 'es[s]://...', 'forward://...' -> syslog, Splunk HEC,
    Elasticsearch, Fluent Forward through the delivery core (queue, spool under the state dir)."""
    return _plan(spec, spool_mb)[1]()


def _plan(spec: str, spool_mb: float | None) -> tuple[str, Callable[[], Output]]:
    """The output's name and what makes it, once the whole spec is checked; nothing is made here."""
    if spec == "-":
        return "stdout", StdoutOutput
    if spec.startswith("file:"):
        path, _, query = spec[len("file:"):].partition("?")
        if not path:
            raise OutputSpecError(f"output {spec!r} has no path; accepted forms: {ACCEPTED_FORMS}")
        options = _parse_query(spec, query, allowed=("max_mb", "keep", "group"))
        try:
            check_file_target(path)
        except OutputError as e:
            raise OutputSpecError(str(e)) from None
        group = options.get("group")
        return f"file:{path}", lambda: FileOutput(path, max_mb=options.get("max_mb"), keep=options.get("keep", 5),
                                                  group=group)
    for prefixes, module, parser in NETWORK_SENDERS:
        if spec.startswith(prefixes):
            from tracer.outputs.delivery import DEFAULT_SPOOL_MB as default_spool_mb, DeliveryOutput
            parse_sender = getattr(importlib.import_module(f"tracer.outputs.{module}"), parser)
            spool_mb = default_spool_mb if spool_mb is None else spool_mb
            try:
                sender = parse_sender(spec)     # their errors never echo a token, password or key
            except ValueError as e:
                raise OutputSpecError(redact(str(e))) from None
            from tracer.registry import state_dir
            spool_dir = state_dir() / "spool"
            try:
                safefiles.check_private_dir(spool_dir, "spool directory")
            except safefiles.UnsafePathError as e:
                sender.close()
                raise OutputSpecError(f"output {sender.name}: {e}") from None
            return sender.name, lambda: DeliveryOutput(sender, spool_dir=spool_dir, spool_mb=spool_mb)
    raise OutputSpecError(f"unknown output {redact(spec)!r}; accepted forms: {ACCEPTED_FORMS}")


def parse_output_specs(specs: list[str], spool_mb: float | None = None) -> list[Output]:
    """All outputs for a list of specs; no specs means stdout. The same sink twice is an error.
    Every spec is checked before any output is made, so a bad one leaves no spool or file behind."""
    if not specs:
        return [StdoutOutput()]
    plans: list[tuple[str, Callable[[], Output]]] = []
    for spec in specs:
        name, make = _plan(spec, spool_mb)
        if any(other == name for other, _ in plans):
            raise OutputSpecError(f"output {name} is given twice; give each sink once")
        plans.append((name, make))
    outputs: list[Output] = []
    try:
        for _, make in plans:
            outputs.append(make())
    except safefiles.UnsafePathError as e:
        for output in outputs:
            output.close()
        raise OutputSpecError(str(e)) from None
    except Exception:
        for output in outputs:
            output.close()
        raise
    return outputs


def _parse_query(spec: str, query: str, allowed: tuple[str, ...]) -> dict[str, int]:
    """max_mb, keep: positive integers; group: a group name or gid, as its gid."""
    options: dict[str, int] = {}
    if not query:
        return options
    for item in query.split("&"):
        key, sep, value = item.partition("=")
        if key not in allowed or not sep:
            raise OutputSpecError(f"output {spec!r}: unknown option {item!r} (options: {', '.join(allowed)});"
                                  f" accepted forms: {ACCEPTED_FORMS}")
        if key in options:
            raise OutputSpecError(f"output {spec!r}: option {key} is given twice")
        if key == "group":
            options[key] = _group_id(spec, value)
            continue
        if not (value.isascii() and value.isdigit() and int(value) > 0):
            raise OutputSpecError(f"output {spec!r}: {key} must be a positive integer, got {value!r}")
        options[key] = int(value)
    return options


def _group_id(spec: str, group: str) -> int:
    try:
        return int(group) if group.isascii() and group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise OutputSpecError(f"output {spec!r}: no group named {group!r} on this host") from None
