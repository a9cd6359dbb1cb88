"""Outputs: where ECS documents go. `parse_output_spec` turns `--output` values into outputs."""
from __future__ import annotations

from tracer.outputs.base import Fanout, KindFilter, Output, OutputError, Transform
from tracer.outputs.file import FileOutput
from tracer.outputs.delivery import DEFAULT_SPOOL_MB, DeliveryOutput
from tracer.outputs.stdout import StdoutOutput
from tracer.outputs.syslog import parse_syslog_spec
from tracer.outputs.forward import parse_forward_spec
from tracer.outputs.http import parse_http_spec
from tracer.outputs.kafka import parse_kafka_spec
from tracer.outputs.relp import parse_relp_spec
from tracer.registry import state_dir

__all__ = ["Fanout", "FileOutput", "KindFilter", "Transform", "Output", "OutputError", "OutputSpecError", "StdoutOutput",
           "parse_output_spec", "parse_output_specs"]

ACCEPTED_FORMS = ("'-' (stdout), 'file:PATH', 'file:PATH?max_mb=N&keep=K', 'syslog+tcp://HOST:PORT', "
                  "'syslog+udp://HOST:PORT', 'syslog+tls://HOST:PORT?ca=FILE[&cert=FILE&key=FILE]', "
                  "'hec://HOST:PORT?token=T[&index=I&sourcetype=S]', 'hecs://HOST:PORT?token=T[&...&ca=FILE]', "
                  "'es://HOST:PORT/INDEX', 'ess://HOST:PORT/INDEX[?ca=FILE][&user=U&password=P | &api_key=K]', "
                  "'forward://HOST:PORT[?tag=T&shared_key=K&compress=gzip&tls=1&ca=FILE&cert=FILE&key=FILE]', "
                  "'kafka://BROKER[,BROKER...]/TOPIC[?compression=...&alerts_topic=T&tls=1&ca=FILE&sasl=...&user=U"
                  "&password_file=FILE]', 'syslog+relp://HOST:PORT[?tls=1&ca=FILE&cert=FILE&key=FILE]'")


# Network outputs: a sender per protocol, each driven by the delivery core (queue, spool, retries).
NETWORK_SENDERS = ((("syslog+relp://",), parse_relp_spec),
                   (("syslog+",), parse_syslog_spec),
                   (("kafka://",), parse_kafka_spec),
                   (("hec://", "hecs://", "es://", "ess://"), parse_http_spec),
                   (("forward://",), parse_forward_spec))


class OutputSpecError(ValueError):
    """An --output value that is not one of the accepted forms."""


def parse_output_spec(spec: str, spool_mb: float = DEFAULT_SPOOL_MB) -> Output:
    """'-' -> stdout; 'file:PATH[?max_mb=N&keep=K]' -> FileOutput (N, K positive integers);
    'syslog+tcp|tls|udp://...', 'hec[s]://...', 'es[s]://...' -> syslog, Splunk HEC, Elasticsearch
    through the delivery core (queue, spool under the state dir)."""
    if spec == "-":
        return StdoutOutput()
    if spec.startswith("file:"):
        path, _, query = spec[len("file:"):].partition("?")
        if not path:
            raise OutputSpecError(f"output {spec!r} has no path; accepted forms: {ACCEPTED_FORMS}")
        options = _parse_query(spec, query, allowed=("max_mb", "keep"))
        return FileOutput(path, max_mb=options.get("max_mb"), keep=options.get("keep", 5))
    for prefixes, parse_sender in NETWORK_SENDERS:
        if spec.startswith(prefixes):
            try:
                sender = parse_sender(spec)     # their errors never echo a token, password or key
            except ValueError as e:
                raise OutputSpecError(str(e)) from None
            return DeliveryOutput(sender, spool_dir=state_dir() / "spool", spool_mb=spool_mb)
    raise OutputSpecError(f"unknown output {spec!r}; accepted forms: {ACCEPTED_FORMS}")


def parse_output_specs(specs: list[str], spool_mb: float = DEFAULT_SPOOL_MB) -> list[Output]:
    """All outputs for a list of specs; no specs means stdout. The same sink twice is an error."""
    if not specs:
        return [StdoutOutput()]
    outputs: list[Output] = []
    try:
        for spec in specs:
            output = parse_output_spec(spec, spool_mb)
            outputs.append(output)
            if any(o.name == output.name for o in outputs[:-1]):
                raise OutputSpecError(f"output {output.name} is given twice; give each sink once")
    except Exception:
        for output in outputs:
            output.close()
        raise
    return outputs


def _parse_query(spec: str, query: str, allowed: tuple[str, ...]) -> dict[str, int]:
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
        if not (value.isascii() and value.isdigit() and int(value) > 0):
            raise OutputSpecError(f"output {spec!r}: {key} must be a positive integer, got {value!r}")
        options[key] = int(value)
    return options
