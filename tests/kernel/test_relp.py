"""The RELP sender against a real rsyslogd with imrelp (Debian's rsyslog-relp) on loopback.

Each test starts its own rsyslogd (as tests/kernel/test_syslog.py does) with an imrelp input.
Its main queue is direct: imrelp acknowledges a message only once omfile has written it, so a
SIGKILLed rsyslogd has on disk every message it acknowledged (with rsyslog's default in-memory
queue, an acknowledged message still queued would die with it: that is rsyslog's to configure).
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

import eptrace_helpers
from support import require
from test_syslog import RSYSLOGD, Certs, Rsyslog, certs, check_received, rsyslog_factory  # noqa: F401,F811 (fixtures)

from tracer.outputs.delivery import DeliveryOutput
from tracer.outputs.relp import RelpSender, parse_relp_spec
from tracer.outputs.senders import SendError

IMRELP = "/usr/lib/x86_64-linux-gnu/rsyslog/imrelp.so"


@pytest.fixture(scope="module", autouse=True)
def prerequisites():
    missing = [p for p in (RSYSLOGD, IMRELP) if not os.path.exists(p)]
    require(not missing, f"{', '.join(missing)} missing: apt-get install rsyslog rsyslog-relp (make setup)")


class RelpRsyslog(Rsyslog):
    """rsyslogd with one imrelp input (TLS with a client certificate when certs are given)."""

    def __init__(self, directory: Path, certs: Certs | None = None, client_auth: bool = True):
        # client_auth is rsyslog_factory's; with TLS this input always wants a client certificate
        super().__init__(directory)          # paths and a TCP port; the config is written again below
        self.tls = certs is not None
        self.udp_port = None
        tls = ""
        if certs is not None:
            tls = (f' tls="on" tls.caCert="{certs.ca}" tls.myCert="{certs.server_cert}"'
                   f' tls.myPrivKey="{certs.server_key}" tls.authMode="name"'
                   ' tls.permittedPeer=["eptrace-client"]')
        # test_syslog's outputs (msg.log, raw.log, internal.log) behind an imrelp input instead of imtcp/imudp
        _, marker, outputs = self.config.read_text().partition('template(name="msgonly"')
        self.config.write_text(f"""\
global(workDirectory="{self.dir}" maxMessageSize="256k")
main_queue(queue.type="direct")
module(load="imrelp")
input(type="imrelp" port="{self.tcp_port}" address="127.0.0.1" maxDataSize="256k" ruleset="remote"{tls})
""" + marker + outputs)

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def event_ids(self) -> list[str]:
        return [json.loads(line)["event"]["id"] for line in self.lines() if line.strip()]


@pytest.fixture
def relp_factory(rsyslog_factory):
    return lambda certs=None: rsyslog_factory(certs, kind=RelpRsyslog)


def test_1000_documents_arrive_whole(relp_factory):
    r = relp_factory()
    docs = eptrace_helpers.make_docs(1000, episode_id="ep-relp")
    assert max(len(d.json.encode()) for d in docs) > 10_000 and any(d.kind == "alert" for d in docs)
    sender = parse_relp_spec(f"syslog+relp://127.0.0.1:{r.tcp_port}")
    try:
        for start in range(0, len(docs), 300):       # 300 frames: more than one window of 128
            sender.send(docs[start:start + 300])
        assert sender.acked == len(docs) and sender.sessions == 1
    finally:
        sender.close()
    check_received(r, docs)


def test_receiver_sigkilled_mid_stream_then_restarted_loses_nothing(relp_factory, tmp_path):
    """rsyslogd is SIGKILLed while documents stream in, then started again: every document arrives.
    Frames in flight at the kill were not acknowledged, so they are sent again: some arrive twice."""
    r = relp_factory()
    out = DeliveryOutput(parse_relp_spec(f"syslog+relp://127.0.0.1:{r.tcp_port}"), spool_dir=tmp_path / "spool")
    docs = eptrace_helpers.make_docs(3000, episode_id="ep-relp")
    killed = False
    for i, doc in enumerate(docs):
        out.write(doc)
        if i % 50 == 0:
            time.sleep(0.01)
        if not killed and i >= 1200:
            eptrace_helpers.wait_until(lambda: len(r.lines()) >= 1000, 20, "1000 documents received")
            r.kill()                              # mid-stream: documents are queued and in flight
            killed = True
            restart_at = time.monotonic() + 2.0
        if killed and r.proc is None and time.monotonic() >= restart_at:
            r.start()                             # same port, same files
    if r.proc is None:
        time.sleep(max(0.0, restart_at - time.monotonic()))
        r.start()
    want = [d.fields()["event"]["id"] for d in docs]
    eptrace_helpers.wait_until(lambda: set(want) <= set(r.event_ids()), 60,
                               lambda: f"{len(set(want) - set(r.event_ids()))} documents missing")
    out.close()
    assert out.dropped == {}, out.dropped
    got = r.event_ids()
    assert out.sender.sessions >= 2
    by_id = {d.fields()["event"]["id"]: d.json for d in docs}
    assert all(by_id[json.loads(line)["event"]["id"]] == line for line in r.lines())     # whole, byte for byte
    print(f"{len(got) - len(set(got))} duplicates after the kill")


def test_tls_with_a_test_ca_and_a_client_certificate(relp_factory, certs):
    r = relp_factory(certs)
    docs = eptrace_helpers.make_docs(200, episode_id="ep-relp")
    sender = parse_relp_spec(f"syslog+relp://127.0.0.1:{r.tcp_port}?tls=1&ca={certs.ca}"
                             f"&cert={certs.client_cert}&key={certs.client_key}")
    try:
        for start in range(0, len(docs), 50):
            sender.send(docs[start:start + 50])
    finally:
        sender.close()
    check_received(r, docs)
    rogue = RelpSender("127.0.0.1", r.tcp_port, tls=True, ca_file=str(certs.rogue_ca),
                       cert_file=str(certs.client_cert), key_file=str(certs.client_key))
    with pytest.raises(SendError, match="certificate verification failed"):
        rogue.send(docs[:1])
    rogue.close()
    no_cert = RelpSender("127.0.0.1", r.tcp_port, tls=True, ca_file=str(certs.ca), timeout_s=3)
    with pytest.raises(SendError):
        no_cert.send(docs[:1])                   # the receiver requires a client certificate
    no_cert.close()
    time.sleep(0.3)
    assert len(r.lines()) == len(docs)


def test_eptrace_run_delivers_to_relp(relp_factory, tmp_path):
    r = relp_factory()
    events_file = tmp_path / "events.ndjson"
    workload = ("import socket\n"
                "for i in range(10):\n"
                "    l=socket.create_server(('127.0.0.1',0)); s=socket.create_connection(l.getsockname())\n"
                "    c,_=l.accept(); c.close(); s.close(); l.close()\n")
    run = eptrace_helpers.run_eptrace("run", "--episode", "ep-relp-run", "--output", f"file:{events_file}",
                                      "--output", f"syslog+relp://127.0.0.1:{r.tcp_port}",
                                      "--", "/usr/bin/python3", "-c", workload, state_dir=tmp_path / "state")
    assert run.returncode == 0, run.stderr
    want = {d["event"]["id"] for d in eptrace_helpers.read_docs(events_file)}
    eptrace_helpers.wait_until(lambda: want <= set(r.event_ids()), 20, "every document in rsyslog")
