"""HTTP senders: Splunk HTTP Event Collector and Elasticsearch/OpenSearch `_bulk`.

Both keep one HTTP/1.1 connection open (keep-alive) and reconnect after any
error; a kept-alive connection the server closed while idle is retried once at
once on a new one, so routine idle timeouts never cost a backoff. They are
driven by tracer.outputs.delivery: send() returns when every document of the
batch is accepted or refused for good (refused ones are returned and
dead-lettered), or raises SendError to have the whole batch retried later.

Splunk HEC (`hec://` / `hecs://HOST:PORT?token=T[&index=I&sourcetype=S&ca=FILE]`)
    POST /services/collector/event, `Authorization: Splunk T`, a body of
    concatenated event objects, each built around the document's JSON text:
    {"time":<@timestamp, epoch s>,"host":<host.name>,"source":"eptrace",
     "sourcetype":"_json","index":I,"event":<the ECS document>}
    - 2xx: accepted.
    - 400 with "invalid-event-number": k: that event is dead-lettered
      ("hec_invalid_event") and the others are sent again (Splunk may already
      have indexed the ones before k: receivers deduplicate on event.id).
      A 400 without an event number, or a 413, is narrowed down by halving
      the batch. Codes that are about the configuration, not an event
      (7 incorrect index, 10/11 channel, 14 ack, 16 query auth), raise SendError.
    - 401/403 (token refused), 429, 5xx, anything else, network errors: SendError.
    Indexer acknowledgement is not used: a 200 means HEC received the events.

Elasticsearch / OpenSearch (`es://` / `ess://HOST:PORT/INDEX[?ca=FILE&user=U&password=P | &api_key=K]`)
    POST /_bulk, NDJSON `{"create":{"_index":INDEX,"_id":<event.id>}}` + document:
    `create` works for data streams, and event.id as _id makes redelivery
    idempotent (a duplicate answers 409, counted as delivered).
    - Whole request 2xx: each item is checked: 2xx and 409 are delivered;
      429 and 5xx items are sent again, alone, after a short backoff, for at
      most ES_ITEM_RETRIES rounds, then SendError (the batch is retried later;
      what got in answers 409 then); 401/403 items (not allowed to write) raise
      SendError; other 4xx items are dead-lettered as "es_<error type>".
    - 413, or 400 for the whole request: narrowed down by halving the batch.
    - 401/403, 429, 5xx, anything else, network errors: SendError.

Option values are percent-decoded (%26 for &, %25 for %); '+' stays '+'.
"""
from __future__ import annotations

import base64
import calendar
import datetime as _dt
import http.client
import json
import logging
import re
import socket
import ssl
import time
import uuid
from urllib.parse import unquote

from tracer.outputs.secrets import option_names, redact, secret_param
from tracer.outputs.senders import SendError
from tracer.outputs.addresses import check_host_port, split_address
from tracer.outputs.tls import client_context, describe
from tracer.schema import Document

log = logging.getLogger(__name__)

__all__ = ["ACCEPTED_FORMS", "ElasticsearchSender", "HecSender", "parse_es_spec", "parse_hec_spec",
           "parse_http_spec"]

HEC_FORMS = ("'hec://HOST:PORT?token_file=FILE[&index=I&sourcetype=S]', "
             "'hecs://HOST:PORT?token_file=FILE[&index=I&sourcetype=S&ca=FILE]' (or token_env=VAR)")
ES_FORMS = ("'es://HOST:PORT/INDEX', 'ess://HOST:PORT/INDEX[?ca=FILE][&user=U&password_file=FILE | "
            "&api_key_file=FILE]' (or password_env=VAR, api_key_env=VAR)")
ACCEPTED_FORMS = f"{HEC_FORMS}, {ES_FORMS} (IPv6 hosts in brackets)"

DEFAULT_TIMEOUT_S = 30.0
HEC_PATH = "/services/collector/event"
HEC_SOURCE = "eptrace"
HEC_INVALID_EVENT = "hec_invalid_event"
# HEC status codes that are about the token, index or channel, never about one event.
HEC_CONFIG_CODES = {1: "token disabled", 2: "token required", 3: "invalid authorization", 4: "invalid token",
                    7: "incorrect index", 10: "data channel missing", 11: "invalid data channel",
                    14: "ACK is disabled", 16: "query string authorization is not enabled"}
# filter_path keeps the answer small: only what send() reads from it.
ES_BULK_PATH = "/_bulk?filter_path=errors,items.*.status,items.*.error.type,items.*.error.reason"
ES_ITEM_RETRIES = 3             # rounds of resending 429/5xx items inside one send()
ES_ITEM_BACKOFF_S = 0.1         # before the first round; doubles each round
_ID_RE = re.compile(r'"event":\{"id":"([^"\\]{1,512})"')     # the encoder writes event.id first in event
_TS_PREFIX = '{"@timestamp":"'
_HOST_KEY = ',"host":{"name":'
_FRACTION_RE = re.compile(r"\.\d{1,9}")
_scanstring = json.decoder.scanstring
_j = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class _HttpConnection:
    """One keep-alive HTTP/1.1 connection, reopened after errors; errors become SendError."""

    def __init__(self, name: str, host: str, port: int, ssl_context: ssl.SSLContext | None,
                 timeout_s: float) -> None:
        self.name, self.host, self.port = name, host, port
        self.ssl_context = ssl_context
        self.timeout_s = timeout_s
        self.connects = 0              # connections opened: reconnections show up here
        self._conn: http.client.HTTPConnection | None = None
        self._requests = 0             # answered on the current connection

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        for attempt in (1, 2):
            reused = self._conn is not None and self._requests > 0
            try:
                conn = self._conn or self._connect()
                conn.request("POST", path, body, headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:   # ssl.SSLError and timeouts are OSErrors
                self.close()
                # A kept-alive connection the server closed while idle: once more on a new one.
                if reused and attempt == 1 and isinstance(exc, (ConnectionResetError, BrokenPipeError,
                                                                ConnectionAbortedError)):
                    continue
                raise SendError(f"{self.name}: {_describe(exc)}") from exc
            self._requests += 1
            if response.will_close:
                self.close()
            return response.status, data
        raise AssertionError("unreachable")

    def _connect(self) -> http.client.HTTPConnection:
        if self.ssl_context is not None:
            # The certificate is checked against host: DNS names against DNS SANs, IPs against IP SANs.
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout_s, context=self.ssl_context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            conn.connect()          # here rather than in request(): errors name the connection step
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except BaseException:
            conn.close()
            raise
        self._conn, self._requests = conn, 0
        self.connects += 1
        return conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass


class _HttpSender:
    """What the HEC and Elasticsearch senders share: the connection, auth warnings, closing."""

    name: str

    def __init__(self, name: str, host: str, port: int, ssl_context: ssl.SSLContext | None,
                 timeout_s: float) -> None:
        self.name = name
        self._http = _HttpConnection(name, host, port, ssl_context, timeout_s)
        self._auth_logged = False
        self._rejection_logged: set[str] = set()

    @property
    def connects(self) -> int:
        return self._http.connects

    def close(self) -> None:
        self._http.close()

    def _refused(self, status: int, body: bytes, hint: str) -> SendError:
        """401/403: a configuration problem, retried until it is fixed; logged once until then."""
        message = f"{self.name}: HTTP {status} {_snippet(body)}: {hint}"
        if not self._auth_logged:
            self._auth_logged = True
            log.error("%s; delivery is retried until this is fixed", message)
        return SendError(message)

    def _note_rejection(self, reason: str, detail: str) -> None:
        if reason not in self._rejection_logged:
            self._rejection_logged.add(reason)
            log.warning("%s: a document was refused for good (%s: %s); it is dead-lettered and counted",
                        self.name, reason, detail)


class HecSender(_HttpSender):
    """Batches of ECS documents to a Splunk HTTP Event Collector (implements senders.Sender)."""

    def __init__(self, host: str, port: int, token: str, *, tls: bool = False, ca_file: str | None = None,
                 index: str | None = None, sourcetype: str = "_json", source: str = HEC_SOURCE,
                 hostname: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        check_host_port("hec output", host, port)
        if not token or not re.fullmatch(r"[\x21-\x7e]+", token):
            raise ValueError("hec output: the token is empty or has spaces or non-ASCII characters")
        if ca_file and not tls:
            raise ValueError("hec output: ca= is for hecs:// (TLS) only")
        for what, value in (("index", index), ("sourcetype", sourcetype)):
            if value is not None and not value:
                raise ValueError(f"hec output: {what} is empty")
        scheme = "hecs" if tls else "hec"
        name = f"{scheme}://{_shown(host)}:{port}" + (f"?index={index}" if index else "")
        super().__init__(name, host, port, client_context(f"{scheme} output", ca_file) if tls else None, timeout_s)
        self.headers = {"Authorization": f"Splunk {token}", "Content-Type": "application/json",
                        "User-Agent": "eptrace",
                        # Harmless without indexer acknowledgement, required by HEC tokens that have it.
                        "X-Splunk-Request-Channel": str(uuid.uuid4())}
        self._default_host = _j(hostname or socket.gethostname())
        self._middle = (f',"source":{_j(source)},"sourcetype":{_j(sourcetype)}'
                        + (f',"index":{_j(index)}' if index else "") + ',"event":')
        self._epochs: dict[str, str] = {}      # "YYYY-MM-DDTHH:MM:SS" -> epoch seconds, as text

    # --- formatting (no network) -------------------------------------------------------

    def event(self, doc: Document) -> str:
        """The HEC event object for one document: the document's JSON wrapped, not re-serialized."""
        text = doc.json
        time_value = self._time_of(text)
        head = '{"time":' + time_value + ',"host":' if time_value else '{"host":'
        return head + self._host_of(text) + self._middle + text + "}"

    def body(self, docs: list[Document]) -> bytes:
        # "replace": a stray surrogate from a process name must not lose the batch.
        return "".join([self.event(doc) for doc in docs]).encode("utf-8", "replace")

    def _time_of(self, text: str) -> str:
        """@timestamp as epoch seconds with its fraction, exactly ('' if there is none)."""
        if text.startswith(_TS_PREFIX):          # the encoder writes @timestamp first, in UTC with Z
            end = text.find('"', len(_TS_PREFIX))
            stamp = text[len(_TS_PREFIX):end]
            if end > 0 and len(stamp) >= 20 and stamp[-1] == "Z":
                seconds = self._epochs.get(stamp[:19])
                if seconds is None:
                    try:
                        seconds = str(calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")))
                    except ValueError:
                        return _time_slow(text)
                    if len(self._epochs) > 4096:
                        self._epochs.clear()
                    self._epochs[stamp[:19]] = seconds
                fraction = stamp[19:-1]
                if not fraction or _FRACTION_RE.fullmatch(fraction):
                    return seconds + fraction
        return _time_slow(text)

    def _host_of(self, text: str) -> str:
        """host.name as a JSON string literal, copied from the document; else this machine's name."""
        at = text.find(_HOST_KEY)
        if at >= 0:
            start = at + len(_HOST_KEY)
            if text.startswith('"', start):
                try:
                    _, end = _scanstring(text, start + 1)
                except ValueError:
                    return self._default_host
                return text[start:end]
        return self._default_host

    # --- Sender ----------------------------------------------------------------------------

    def send(self, docs: list[Document]) -> list[tuple[Document, str]]:
        rejected: list[tuple[Document, str]] = []
        chunks = [list(docs)] if docs else []
        while chunks:
            chunk = chunks.pop()
            status, answer = self._http.post(HEC_PATH, self.body(chunk), self.headers)
            if 200 <= status < 300:
                continue
            if status in (401, 403):
                raise self._refused(status, answer, "the HEC token is refused (check token=)")
            if status == 400:
                reply = _json_object(answer)
                code, number = reply.get("code"), reply.get("invalid-event-number")
                if code in HEC_CONFIG_CODES:
                    raise SendError(f"{self.name}: HTTP 400 {_snippet(answer)}: {HEC_CONFIG_CODES[code]}"
                                    f"{' (check index=)' if code == 7 else ''}")
                if isinstance(number, int) and not isinstance(number, bool) and 0 <= number < len(chunk):
                    rejected.append((chunk[number], HEC_INVALID_EVENT))
                    self._note_rejection(HEC_INVALID_EVENT, _snippet(answer))
                    rest = chunk[:number] + chunk[number + 1:]
                    if rest:
                        chunks.append(rest)
                    continue
            if status in (400, 413):            # which document? halve the batch until it is found
                if len(chunk) == 1:
                    reason = HEC_INVALID_EVENT if status == 400 else "hec_too_large"
                    rejected.append((chunk[0], reason))
                    self._note_rejection(reason, f"HTTP {status} {_snippet(answer)}")
                else:
                    half = len(chunk) // 2
                    chunks += [chunk[half:], chunk[:half]]
                continue
            raise SendError(f"{self.name}: HTTP {status} {_snippet(answer)}")   # 429, 5xx, 503 busy...
        self._auth_logged = False
        return rejected


class ElasticsearchSender(_HttpSender):
    """Batches of ECS documents to Elasticsearch or OpenSearch `_bulk` (implements senders.Sender)."""

    def __init__(self, host: str, port: int, index: str, *, tls: bool = False, ca_file: str | None = None,
                 user: str | None = None, password: str | None = None, api_key: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        check_host_port("es output", host, port)
        problem = _index_problem(index)
        if problem:
            raise ValueError(f"es output: index {index!r} {problem}")
        if ca_file and not tls:
            raise ValueError("es output: ca= is for ess:// (TLS) only")
        if (user is None) != (password is None):
            raise ValueError("es output: user= and password= go together")
        if api_key is not None and user is not None:
            raise ValueError("es output: give either user= and password= or api_key=, not both")
        for what, value in (("user", user), ("password", password), ("api_key", api_key)):
            if value is not None and not value:
                raise ValueError(f"es output: {what} is empty")
        if user is not None and ":" in user:
            raise ValueError("es output: a user name cannot contain ':'")
        scheme = "ess" if tls else "es"
        super().__init__(f"{scheme}://{_shown(host)}:{port}/{index}", host, port,
                         client_context(f"{scheme} output", ca_file) if tls else None, timeout_s)
        self.index = index
        self.headers = {"Content-Type": "application/x-ndjson", "Accept": "application/json",
                        "User-Agent": "eptrace"}
        if user is not None:
            credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {credentials}"
        elif api_key is not None:
            self.headers["Authorization"] = f"ApiKey {api_key}"
        self._action = '{"create":{"_index":' + _j(index)
        self._action_no_id = self._action + "}}\n"

    # --- formatting (no network) -------------------------------------------------------

    def action(self, doc: Document) -> str:
        """The bulk action line: create, with event.id as _id when the document has one."""
        match = _ID_RE.search(doc.json, 0, 300)
        if match is None:
            return self._action_no_id
        return self._action + ',"_id":"' + match.group(1) + '"}}\n'

    def body(self, docs: list[Document]) -> bytes:
        return "".join([self.action(doc) + doc.json + "\n" for doc in docs]).encode("utf-8", "replace")

    # --- Sender ----------------------------------------------------------------------------

    def send(self, docs: list[Document]) -> list[tuple[Document, str]]:
        rejected: list[tuple[Document, str]] = []
        if docs:
            self._send_chunk(list(docs), rejected)
        self._auth_logged = False
        return rejected

    def _send_chunk(self, pending: list[Document], rejected: list[tuple[Document, str]]) -> None:
        for round_ in range(ES_ITEM_RETRIES + 1):
            if round_:
                time.sleep(ES_ITEM_BACKOFF_S * 2 ** (round_ - 1))
            status, answer = self._http.post(ES_BULK_PATH, self.body(pending), self.headers)
            if status in (401, 403):
                raise self._refused(status, answer, "the credentials are refused or not allowed to write "
                                                    f"to {self.index} (check user=/password= or api_key=)")
            if status in (400, 413):           # the request as a whole: halve it until the culprit is alone
                if len(pending) == 1:
                    reason = f"es_{status}"
                    rejected.append((pending[0], reason))
                    self._note_rejection(reason, _snippet(answer))
                else:
                    half = len(pending) // 2
                    self._send_chunk(pending[:half], rejected)
                    self._send_chunk(pending[half:], rejected)
                return
            if not 200 <= status < 300:
                raise SendError(f"{self.name}: HTTP {status} {_snippet(answer)}")   # 429, 5xx...
            pending = self._check_items(pending, answer, rejected)
            if not pending:
                return
        raise SendError(f"{self.name}: {len(pending)} documents still refused with 429/5xx "
                        f"after {ES_ITEM_RETRIES + 1} tries")

    def _check_items(self, docs: list[Document], answer: bytes,
                     rejected: list[tuple[Document, str]]) -> list[Document]:
        """The documents to send again (429/5xx items); refused ones are added to rejected."""
        if b'"errors":false' in answer[:64]:
            return []
        reply = _json_object(answer)
        items = reply.get("items")
        if reply.get("errors") is False:
            return []
        if not isinstance(items, list) or len(items) != len(docs):
            raise SendError(f"{self.name}: a _bulk answer without one item per document: {_snippet(answer)}")
        again = []
        for doc, item in zip(docs, items):
            result = next(iter(item.values()), None) if isinstance(item, dict) else None
            status = result.get("status") if isinstance(result, dict) else None
            if not isinstance(status, int):
                raise SendError(f"{self.name}: a _bulk item without a status: {_snippet(answer)}")
            if 200 <= status < 300 or status == 409:     # 409: already there (a redelivered event.id)
                continue
            if status == 429 or status >= 500:
                again.append(doc)
                continue
            error = result.get("error") if isinstance(result.get("error"), dict) else {}
            if status in (401, 403):
                raise self._refused(status, json.dumps(error).encode(), f"not allowed to write to {self.index}")
            kind = error.get("type")
            reason = f"es_{kind}" if isinstance(kind, str) and re.fullmatch(r"\w{1,64}", kind) else f"es_{status}"
            rejected.append((doc, reason))
            self._note_rejection(reason, str(error.get("reason", ""))[:300])
        return again


# --- spec parsing -------------------------------------------------------------------------

def parse_http_spec(spec: str) -> HecSender | ElasticsearchSender:
    """hec://, hecs://, es:// or ess:// -> the sender; ValueError naming the accepted forms otherwise."""
    scheme = spec.partition("://")[0]
    if scheme in ("hec", "hecs"):
        return parse_hec_spec(spec)
    if scheme in ("es", "ess"):
        return parse_es_spec(spec)
    raise ValueError(f"output {spec!r}: unknown form; accepted forms: {ACCEPTED_FORMS}")


def parse_hec_spec(spec: str) -> HecSender:
    scheme, host, port, path, options = _split_spec(spec, ("hec", "hecs"), HEC_FORMS)
    tls = scheme == "hecs"
    if path not in ("", "/"):
        raise ValueError(f"hec output {spec!r}: no path is accepted after HOST:PORT; accepted forms: {HEC_FORMS}")
    allowed = option_names("token") + ("index", "sourcetype") + (("ca",) if tls else ())
    _check_options(spec, options, allowed, HEC_FORMS)
    token = secret_param(options, "token", f"hec output {_redacted(spec)!r}")
    if token is None:
        raise ValueError(f"hec output {_redacted(spec)!r}: a token is required: give token_file=FILE (or token_env=VAR); "
                         f"accepted forms: {HEC_FORMS}")
    try:
        return HecSender(host, port, token, tls=tls, ca_file=options.get("ca"),
                         index=options.get("index"), sourcetype=options.get("sourcetype", "_json"))
    except ValueError as exc:
        raise ValueError(f"{exc} (in {_redacted(spec)!r})") from None


def parse_es_spec(spec: str) -> ElasticsearchSender:
    scheme, host, port, path, options = _split_spec(spec, ("es", "ess"), ES_FORMS)
    tls = scheme == "ess"
    index = unquote(path[1:]) if path.startswith("/") else ""
    if not index or "/" in index:
        raise ValueError(f"es output {_redacted(spec)!r}: one INDEX (or data stream) name is required after "
                         f"HOST:PORT/; accepted forms: {ES_FORMS}")
    allowed = ("user",) + option_names("password") + option_names("api_key") + (("ca",) if tls else ())
    _check_options(spec, options, allowed, ES_FORMS)
    label = f"es output {_redacted(spec)!r}"
    password, api_key = secret_param(options, "password", label), secret_param(options, "api_key", label)
    try:
        return ElasticsearchSender(host, port, index, tls=tls, ca_file=options.get("ca"),
                                   user=options.get("user"), password=password, api_key=api_key)
    except ValueError as exc:
        raise ValueError(f"{exc} (in {_redacted(spec)!r})") from None


def _split_spec(spec: str, schemes: tuple[str, ...], forms: str) -> tuple[str, str, int, str, dict[str, str]]:
    """scheme, host, port, path, options (percent-decoded; a key twice is an error)."""
    kind = schemes[0]
    shown = _redacted(spec)
    scheme, sep, rest = spec.partition("://")
    if not sep or scheme not in schemes:
        raise ValueError(f"{kind} output {shown!r}: unknown form; accepted forms: {forms}")
    parts, host, port = split_address(spec, f"{kind} output", shown, forms)
    if parts.fragment or "#" in spec:
        raise ValueError(f"{kind} output {shown!r}: no #fragment is accepted; accepted forms: {forms}")
    options: dict[str, str] = {}
    if parts.query:
        for item in parts.query.split("&"):
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ValueError(f"{kind} output {shown!r}: malformed option {_redacted_item(item)!r} "
                                 f"(KEY=VALUE expected); accepted forms: {forms}")
            if key in options:
                raise ValueError(f"{kind} output {shown!r}: option {key} is given twice; accepted forms: {forms}")
            try:
                options[key] = unquote(value, errors="strict") if "%" in value else value
            except UnicodeDecodeError:
                raise ValueError(f"{kind} output {shown!r}: option {key} is not percent-encoded UTF-8 "
                                 f"(%XX bytes that decode to no text); accepted forms: {forms}") from None
    return scheme, host, port, parts.path, options


def _check_options(spec: str, options: dict[str, str], allowed: tuple[str, ...], forms: str) -> None:
    kind = "hec" if spec.startswith("hec") else "es"
    for key, value in options.items():
        if key not in allowed:
            tls_hint = " (ca= needs the TLS scheme, hecs:// or ess://)" if key == "ca" else ""
            raise ValueError(f"{kind} output {_redacted(spec)!r}: unknown option {key!r}{tls_hint} "
                             f"(options: {', '.join(allowed)}); accepted forms: {forms}")
        if not value:
            raise ValueError(f"{kind} output {_redacted(spec)!r}: option {key} is empty; accepted forms: {forms}")


def _redacted(spec: str) -> str:
    """The spec as it may appear in errors and logs: secrets replaced by ***."""
    return redact(spec)


_redacted_item = _redacted


# --- helpers ------------------------------------------------------------------------------

def _shown(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _index_problem(index: str) -> str | None:
    """Why Elasticsearch would refuse this index or data stream name (None if it would not)."""
    if not index:
        return "is empty"
    if index != index.lower():
        return "must be lowercase"
    if index in (".", ".."):
        return "cannot be . or .."
    if index[0] in "-_+":
        return "cannot start with -, _ or +"
    bad = set(index) & set('\\/*?"<>| ,#:')
    if bad:
        return f"cannot contain {' '.join(sorted(bad))!s}"
    if len(index.encode()) > 255:
        return "is longer than 255 bytes"
    return None


def _time_slow(text: str) -> str:
    """@timestamp of a document that the encoder did not write (offsets, other order); '' if none."""
    try:
        value = json.loads(text).get("@timestamp")
        stamp = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, AttributeError, TypeError):
        return ""
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=_dt.timezone.utc)
    return f"{stamp.timestamp():.6f}"


def _json_object(data: bytes) -> dict:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _snippet(data: bytes, limit: int = 200) -> str:
    text = data.decode("utf-8", "replace").strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(exc: BaseException) -> str:
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    return describe(exc)
