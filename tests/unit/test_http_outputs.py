"""Splunk HEC and Elasticsearch _bulk senders against HTTP servers on loopback that answer as scripted."""
import base64
import json
import logging
import ssl

import pytest
from http_receivers import EsReceiver, HecReceiver, Server, hec_events
from support import fast_backoff, make_certs, wait_for

from tracer.events import Endpoint, Episode, NetworkEvent, Process
from tracer.outputs import http as httpout
from tracer.outputs.delivery import DeliveryOutput
from tracer.outputs.http import ElasticsearchSender, HecSender, parse_es_spec, parse_hec_spec, parse_http_spec
from tracer.outputs.senders import SendError
from tracer.schema import Document, EcsEncoder

TOKEN = "11111111-2222-3333-4444-555555555555"


# --- documents ------------------------------------------------------------------------------

def documents(n, host="sandbox-1"):
    encoder = EcsEncoder(host, "0")
    episode = Episode("ep-test", "/eptrace/ep-test", 42)
    proc = Process(pid=4242, name="python3", executable="/usr/bin/python3", args=["python3", "agent.py"])
    return [encoder.encode_document(NetworkEvent(
        "flow_ended", 1_800_000_000_123_456_000 + i * 1_000_000_000, episode, 42, "/eptrace/ep-test", proc, i,
        "ipv4", "tcp", "egress", source=Endpoint("198.51.100.2", 40000 + i), destination=Endpoint("198.51.100.1", 443),
        outcome="success", duration_ns=5_000_000, source_bytes=1234, destination_bytes=56789)) for i in range(n)]


def event_id(doc):
    return doc.fields()["event"]["id"]


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    fast_backoff(monkeypatch)
    monkeypatch.setattr(httpout, "ES_ITEM_BACKOFF_S", 0.001)


# --- a scripted HTTP server -------------------------------------------------------------------

@pytest.fixture
def serve():
    servers = []

    def start(respond, tls_context=None):
        server = Server(respond, tls_context)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


# --- Splunk HEC -------------------------------------------------------------------------------

def test_hec_happy_path_batches_over_one_kept_alive_connection(serve, tmp_path):
    rx = HecReceiver()
    server = serve(rx)
    docs = documents(1000)
    out = DeliveryOutput(HecSender("127.0.0.1", server.port, TOKEN, index="sandbox", sourcetype="eptrace:ecs"),
                         spool_dir=tmp_path)
    for doc in docs:
        out.write(doc)
    wait_for(lambda: len(rx.events) == 1000)
    out.close()
    assert out.dropped == {} and out.sent == 1000
    assert len(server.requests) >= 2 and server.connections == 1          # batched, keep-alive
    for path, headers, _ in server.requests:
        assert path == "/services/collector/event"
        assert headers["Authorization"] == f"Splunk {TOKEN}"
        assert headers["Content-Type"] == "application/json"
    for doc, event in zip(docs, rx.events):
        fields = doc.fields()
        assert event["event"] == fields
        assert event["host"] == "sandbox-1" and event["source"] == "eptrace"
        assert event["sourcetype"] == "eptrace:ecs" and event["index"] == "sandbox"
        assert event["time"] == pytest.approx(1_800_000_000.123456 + fields["event"]["sequence"] - 1, abs=1e-6)
        assert set(event) == {"time", "host", "source", "sourcetype", "index", "event"}


def test_hec_event_wraps_the_document_text():
    sender = HecSender("127.0.0.1", 9, TOKEN, hostname="fallback")
    doc = documents(1)[0]
    text = sender.event(doc)
    assert text.endswith(',"event":' + doc.json + "}")                 # not re-serialized
    assert text.startswith('{"time":1800000000.123456,"host":"sandbox-1","source":"eptrace","sourcetype":"_json",')
    assert "index" not in json.loads(text)
    # A document from elsewhere: @timestamp not first, with an offset, no host.name
    other = Document('{"message":"x","@timestamp":"2027-01-15T09:00:00.5+01:00"}', "event")
    assert json.loads(sender.event(other)) == {"time": 1_800_000_000.5, "host": "fallback", "source": "eptrace",
                                               "sourcetype": "_json", "event": other.fields()}
    no_time = json.loads(sender.event(Document('{"message":"x"}', "event")))
    assert "time" not in no_time and no_time["event"] == {"message": "x"}


def test_hec_503_twice_then_everything_arrives(serve, tmp_path):
    busy = (503, b'{"text":"Server is busy","code":9}')
    rx = HecReceiver(script=[busy, busy])
    server = serve(rx)
    docs = documents(300)
    out = DeliveryOutput(HecSender("127.0.0.1", server.port, TOKEN), spool_dir=tmp_path)
    for doc in docs:
        out.write(doc)
    wait_for(lambda: set(rx.ids()) == {event_id(d) for d in docs})
    out.close()
    assert out.dropped == {} and len(server.requests) >= 3
    assert not (tmp_path / "dead-letter.ndjson").exists()


def test_hec_invalid_event_is_dead_lettered_and_the_rest_arrive(serve, tmp_path):
    docs = documents(200)
    bad_ids = {event_id(docs[17]), event_id(docs[150])}
    rx = HecReceiver(bad=lambda event: event["event"]["event"]["id"] in bad_ids)
    server = serve(rx)
    out = DeliveryOutput(HecSender("127.0.0.1", server.port, TOKEN), spool_dir=tmp_path)
    for doc in docs:
        out.write(doc)
    good = {event_id(d) for d in docs} - bad_ids
    wait_for(lambda: set(rx.ids()) == good and out.dropped)
    out.close()
    assert out.dropped == {"rejected:hec_invalid_event": 2}
    assert len(rx.ids()) == len(good)                               # nothing twice
    dead = [json.loads(line) for line in next(tmp_path.rglob("dead-letter.ndjson")).read_text().splitlines()]
    assert {d["event"]["id"] for d in dead} == bad_ids


def test_hec_400_without_an_event_number_is_narrowed_down(serve):
    docs = documents(40)
    bad = event_id(docs[23])

    def respond(path, headers, body):
        if any(e["event"]["event"]["id"] == bad for e in hec_events(body)):
            return 400, b'{"text":"Invalid data format","code":6}'
        got.extend(hec_events(body))
        return 200, b'{"text":"Success","code":0}'

    got = []
    server = serve(respond)
    rejected = HecSender("127.0.0.1", server.port, TOKEN).send(docs)
    assert [(event_id(d), r) for d, r in rejected] == [(bad, "hec_invalid_event")]
    assert sorted(e["event"]["event"]["id"] for e in got) == sorted(event_id(d) for d in docs if event_id(d) != bad)


@pytest.mark.parametrize("status,answer,text", [
    (401, b'{"text":"Token is required","code":2}', "token is refused"),
    (403, b'{"text":"Invalid token","code":4}', "token is refused"),
    (400, b'{"text":"Incorrect index","code":7,"invalid-event-number":0}', "incorrect index"),
    (429, b"", "HTTP 429"),
    (500, b'{"text":"Internal server error","code":8}', "HTTP 500"),
])
def test_hec_whole_request_failures_are_retryable(serve, status, answer, text, caplog):
    server = serve(lambda path, headers, body: (status, answer))
    sender = HecSender("127.0.0.1", server.port, TOKEN)
    with caplog.at_level(logging.ERROR, logger="tracer.outputs.http"):
        for _ in range(3):
            with pytest.raises(SendError, match=text):
                sender.send(documents(3))
    # a refused token is logged once, not at every retry
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == (1 if status in (401, 403) else 0)
    assert TOKEN not in caplog.text


def test_connection_errors_are_send_errors_and_it_reconnects(serve):
    rx = HecReceiver()
    server = serve(rx)
    port = server.port
    sender = HecSender("127.0.0.1", port, TOKEN, timeout_s=2)
    sender.send(documents(2))
    server.close()                                     # down: refused
    with pytest.raises(SendError):
        sender.send(documents(2))
    again = HecReceiver()
    back = Server(again, port=port)                    # back on the same port: it reconnects by itself
    try:
        sender.send(documents(5))
        assert len(again.events) == 5 and sender.connects == 2
    finally:
        back.close()


def test_a_keep_alive_connection_closed_by_the_server_is_retried_at_once(serve):
    rx = HecReceiver()
    server = serve(rx)
    sender = HecSender("127.0.0.1", server.port, TOKEN)
    sender.send(documents(1))
    sender._http._conn.sock.shutdown(2)      # as if the server had closed the idle connection
    sender.send(documents(2))                # no SendError: a new connection, once
    assert len(rx.events) == 3 and sender.connects == 2


# --- Elasticsearch _bulk --------------------------------------------------------------------

def test_es_bulk_mixed_item_statuses(serve, tmp_path):
    docs = documents(400)
    ids = [event_id(d) for d in docs]
    throttled, bad, present = set(ids[10:60]), set(ids[100:103]), set(ids[200:220])

    def item(doc_id, doc, attempt):
        if doc_id in bad:
            return 400
        if doc_id in throttled and attempt == 1:
            return 429
        return None

    rx = EsReceiver(item=item)
    rx.store.update({i: ("eptrace", {}) for i in present})    # already delivered once: 409
    server = serve(rx)
    out = DeliveryOutput(ElasticsearchSender("127.0.0.1", server.port, "eptrace"), spool_dir=tmp_path)
    for doc in docs:
        out.write(doc)
    wait_for(lambda: set(rx.store) == set(ids) - bad and sum(out.dropped.values()) == len(bad))
    out.close()
    assert out.dropped == {"rejected:es_mapper_parsing_exception": 3}
    assert out.sent == 400 - 3                                       # 409 counts as delivered
    assert all(rx.store[i][1] == d.fields() for i, d in zip(ids, docs) if i not in bad | present)
    assert all(rx.store[i][0] == "eptrace" for i in rx.store)
    assert all(rx.attempts[i] == 2 for i in throttled) and all(rx.attempts[i] == 1 for i in set(ids) - throttled)
    for path, headers, _ in server.requests:
        assert path.startswith("/_bulk?filter_path=") and headers["Content-Type"] == "application/x-ndjson"
    assert server.connections == 1
    dead = [json.loads(line) for line in next(tmp_path.rglob("dead-letter.ndjson")).read_text().splitlines()]
    assert {d["event"]["id"] for d in dead} == bad


def test_es_items_still_throttled_after_the_rounds_raise_send_error(serve):
    rx = EsReceiver(item=lambda doc_id, doc, attempt: 429 if doc_id.endswith("-2") else None)
    server = serve(rx)
    sender = ElasticsearchSender("127.0.0.1", server.port, "eptrace")
    with pytest.raises(SendError, match="1 documents still refused"):
        sender.send(documents(3))
    assert len(rx.bodies) == httpout.ES_ITEM_RETRIES + 1
    assert all(body.count(b"\n") == 2 for body in rx.bodies[1:])     # only the throttled one is resent


def test_es_whole_request_500_is_retried(serve, tmp_path):
    rx = EsReceiver(script=[(500, b'{"error":"boom"}'), (429, b'{"error":"busy"}')])
    server = serve(rx)
    docs = documents(250)
    out = DeliveryOutput(ElasticsearchSender("127.0.0.1", server.port, "logs-eptrace-default"), spool_dir=tmp_path)
    for doc in docs:
        out.write(doc)
    wait_for(lambda: set(rx.store) == {event_id(d) for d in docs})
    out.close()
    assert out.dropped == {} and out.sent == 250 and len(server.requests) >= 3


def test_es_413_halves_the_batch(serve):
    rx = EsReceiver()

    def respond(path, headers, body):
        return (413, b"") if len(body) > 5000 else rx(path, headers, body)

    server = serve(respond)
    docs = documents(30)
    assert ElasticsearchSender("127.0.0.1", server.port, "eptrace").send(docs) == []
    assert set(rx.store) == {event_id(d) for d in docs}


def test_es_whole_request_400_isolates_the_document(serve):
    docs = documents(9)
    bad = docs[4].json.encode()
    rx = EsReceiver()

    def respond(path, headers, body):
        return (400, b'{"error":{"type":"x_content_parse_exception"}}') if bad in body else rx(path, headers, body)

    server = serve(respond)
    rejected = ElasticsearchSender("127.0.0.1", server.port, "eptrace").send(docs)
    assert [(d, r) for d, r in rejected] == [(docs[4], "es_400")]
    assert set(rx.store) == {event_id(d) for d in docs} - {event_id(docs[4])}


def test_es_bulk_lines_and_auth_headers(serve):
    rx = EsReceiver()
    server = serve(rx)
    sender = ElasticsearchSender("127.0.0.1", server.port, "eptrace", user="elastic", password="s3cr:t")
    no_id = Document('{"message":"no event id"}', "event")
    sender.send(documents(1) + [no_id])
    _, headers, body = server.requests[0]
    assert headers["Authorization"] == "Basic ZWxhc3RpYzpzM2NyOnQ="
    lines = body.decode().split("\n")
    assert json.loads(lines[0]) == {"create": {"_index": "eptrace", "_id": json.loads(lines[1])["event"]["id"]}}
    assert json.loads(lines[2]) == {"create": {"_index": "eptrace"}} and lines[3] == no_id.json
    api = ElasticsearchSender("127.0.0.1", server.port, "eptrace", api_key="aWQ6a2V5+/=")
    assert api.headers["Authorization"] == "ApiKey aWQ6a2V5+/="


@pytest.mark.parametrize("status", [401, 403])
def test_es_refused_credentials_are_retryable(serve, status):
    server = serve(lambda path, headers, body: (status, b'{"error":{"type":"security_exception"}}'))
    with pytest.raises(SendError, match=f"HTTP {status}.*credentials"):
        ElasticsearchSender("127.0.0.1", server.port, "eptrace").send(documents(2))


# --- TLS ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def tls_server(serve, certs, respond):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    return serve(respond, tls_context=context)


def test_hecs_verifies_the_server_against_ca(serve, certs):
    rx = HecReceiver()
    server = tls_server(serve, certs, rx)
    cert, other = certs.ca, certs.rogue_ca
    sender = parse_hec_spec(f"hecs://127.0.0.1:{server.port}?token={TOKEN}&ca={cert}")
    sender.send(documents(10))
    sender.send(documents(10))
    assert len(rx.events) == 20 and sender.connects == 1
    wrong = parse_hec_spec(f"hecs://127.0.0.1:{server.port}?token={TOKEN}&ca={other}")
    with pytest.raises(SendError, match="certificate verification failed"):
        wrong.send(documents(1))
    system = parse_hec_spec(f"hecs://127.0.0.1:{server.port}?token={TOKEN}")      # system store: not trusted
    with pytest.raises(SendError, match="certificate verification failed"):
        system.send(documents(1))


def test_ess_verifies_the_server_against_ca(serve, certs):
    rx = EsReceiver()
    server = tls_server(serve, certs, rx)
    cert, other = certs.ca, certs.rogue_ca
    sender = parse_es_spec(f"ess://127.0.0.1:{server.port}/eptrace?ca={cert}&api_key=abc%3D")
    docs = documents(10)
    assert sender.send(docs) == [] and set(rx.store) == {event_id(d) for d in docs}
    assert server.requests[0][1]["Authorization"] == "ApiKey abc="
    with pytest.raises(SendError, match="certificate verification failed"):
        parse_es_spec(f"ess://127.0.0.1:{server.port}/eptrace?ca={other}").send(docs)


# --- spec parsing -----------------------------------------------------------------------------

def test_good_specs(tmp_path, certs):
    cert = certs.ca
    hec = parse_http_spec(f"hec://splunk.example:8088?token={TOKEN}&index=main&sourcetype=eptrace%3Aecs")
    assert isinstance(hec, HecSender) and hec.name == "hec://splunk.example:8088?index=main"
    assert hec.headers["Authorization"] == f"Splunk {TOKEN}"
    assert '"sourcetype":"eptrace:ecs","index":"main"' in hec.event(documents(1)[0])
    hecs = parse_http_spec(f"hecs://[::1]:8088/?token={TOKEN}&ca={cert}")
    assert hecs.name == "hecs://[::1]:8088" and hecs._http.host == "::1" and hecs._http.ssl_context is not None
    es = parse_http_spec("es://10.0.0.5:9200/logs-eptrace-default")
    assert isinstance(es, ElasticsearchSender) and es.name == "es://10.0.0.5:9200/logs-eptrace-default"
    assert "Authorization" not in es.headers and es._http.ssl_context is None
    ess = parse_http_spec(f"ess://es.example:9243/eptrace?ca={cert}&user=elastic&password=a%26b+c")
    assert ess.name == "ess://es.example:9243/eptrace"
    assert base64.b64decode(ess.headers["Authorization"].split()[1]) == b"elastic:a&b+c"
    assert parse_http_spec("ess://es.example:9243/eptrace")._http.ssl_context is not None     # system CAs


@pytest.mark.parametrize("spec,message", [
    ("hec://splunk:8088", "token is required"),
    ("hec://splunk?token=T", "HOST:PORT is required"),
    ("hec://splunk:0?token=T", "HOST:PORT is required"),
    ("hec://splunk:70000?token=T", "out of range|HOST:PORT"),
    ("hec://splunk:8088?token=", "option token is empty"),
    ("hec://splunk:8088?token=T&ca=/x.pem", "unknown option 'ca'.*TLS scheme"),
    ("hec://splunk:8088?token=T&bogus=1", "unknown option 'bogus'"),
    ("hec://splunk:8088?token=T&token=U", "given twice"),
    ("hec://splunk:8088?token", "malformed option"),
    ("hec://splunk:8088/services?token=T", "no path"),
    ("hec://::1:8088?token=T", "IPv6 address goes in brackets"),
    ("hec://user@splunk:8088?token=T", "no user@"),
    ("hecs://splunk:8088?token=T&ca=/nonexistent/ca.pem", "cannot read the CA file"),
    ("hec://splunk:8088?token=a%20b", "token is empty or has spaces"),
    ("es://es:9200", "one INDEX"),
    ("es://es:9200/", "one INDEX"),
    ("es://es:9200/a/b", "one INDEX"),
    ("es://es:9200/Eptrace", "must be lowercase"),
    ("es://es:9200/_eptrace", "cannot start with"),
    ("es://es:9200/ept*race", "cannot contain"),
    ("es://es:9200/eptrace?user=elastic", "go together"),
    ("es://es:9200/eptrace?user=u&password=p&api_key=k", "not both"),
    ("es://es:9200/eptrace?ca=/x.pem", "unknown option 'ca'"),
    ("ess://es:9200/eptrace?ca=/nonexistent/ca.pem", "cannot read the CA file"),
    ("esx://es:9200/eptrace", "unknown form"),
    ("es:/es:9200/eptrace", "unknown form"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_http_spec(spec)
    assert "accepted forms" in str(info.value) or "output" in str(info.value)


def test_secrets_stay_out_of_errors_and_names():
    with pytest.raises(ValueError) as info:
        parse_http_spec("es://es:9200/eptrace?user=u&password=hunter2&api_key=k3y")
    assert "hunter2" not in str(info.value) and "k3y" not in str(info.value)
    with pytest.raises(ValueError) as info:
        parse_http_spec("hec://splunk:8088?token=s3cret&bogus=1")
    assert "s3cret" not in str(info.value)
    assert "s3cret" not in parse_http_spec("hec://splunk:8088?token=s3cret").name


def test_the_ca_file_must_hold_a_certificate(tmp_path):
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="CA file"):
        parse_http_spec(f"hecs://splunk:8088?token=T&ca={empty}")


def test_parse_output_spec_builds_delivery_outputs(tmp_path, monkeypatch):
    from tracer.outputs import OutputSpecError, parse_output_spec
    monkeypatch.setenv("EPTRACE_STATE_DIR", str(tmp_path))
    for spec, name in ((f"hec://127.0.0.1:9?token={TOKEN}", "hec://127.0.0.1:9"),
                       ("es://127.0.0.1:9/eptrace", "es://127.0.0.1:9/eptrace")):
        out = parse_output_spec(spec)
        try:
            assert isinstance(out, DeliveryOutput) and out.name == name
        finally:
            out.close(timeout_s=0.1)
    with pytest.raises(OutputSpecError, match="token is required"):
        parse_output_spec("hec://127.0.0.1:9")
    with pytest.raises(OutputSpecError, match="hec://"):
        parse_output_spec("splunk://127.0.0.1:9")
