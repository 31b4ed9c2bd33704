"""The fault-injecting relay: bytes pass, vanish or the connection breaks, per direction, and heal cleanly."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import pytest

from spina_fast._raft import encode_frame
from tests.chaos.relay import KIND_HELLO, Network, RelayProcess


class EchoTarget:
    """A stand-in for a node's Raft port: echoes every byte and remembers what each connection received."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received: list[bytearray] = []
        self.closed: list[threading.Event] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            received, closed = bytearray(), threading.Event()
            self.received.append(received)
            self.closed.append(closed)
            threading.Thread(target=self._echo, args=(connection, received, closed), daemon=True).start()

    @staticmethod
    def _echo(connection: socket.socket, received: bytearray, closed: threading.Event) -> None:
        with connection:
            try:
                while data := connection.recv(65536):
                    received.extend(data)
                    connection.sendall(data)
            except OSError:
                closed.set()
        closed.set()

    def close(self) -> None:
        self.listener.close()


def wait_until(condition: Callable[[], object], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def connection_ends(client: socket.socket) -> bool:
    """Whether the relay ended the connection (EOF or reset) before the client's timeout."""
    client.settimeout(10)
    try:
        return client.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def relay() -> Iterator[RelayProcess]:
    process = RelayProcess()
    try:
        yield process
    finally:
        process.close()


@pytest.fixture
def target() -> Iterator[EchoTarget]:
    server = EchoTarget()
    try:
        yield server
    finally:
        server.close()


def hello(src: str) -> bytes:
    return encode_frame(KIND_HELLO, f"{src} 127.0.0.1:1".encode())


def connect(port: int, src: str, expect_echo: bool = True) -> socket.socket:
    """Dial like a node: HELLO first; with ``expect_echo`` wait for the target's echo of it."""
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.sendall(hello(src))
    if expect_echo:
        assert receive(client, len(hello(src))) == hello(src)
    return client


def receive(client: socket.socket, size: int) -> bytes:
    answer = b""
    while len(answer) < size:
        chunk = client.recv(65536)
        if not chunk:
            break
        answer += chunk
    return answer


def echo(client: socket.socket, data: bytes) -> bytes:
    client.sendall(data)
    return receive(client, len(data))


def test_relay_forwards_both_directions(relay: RelayProcess, target: EchoTarget) -> None:
    port = relay.add_node("b", target.port)
    with connect(port, "a") as client:
        assert echo(client, b"hello" * 1000) == b"hello" * 1000
    assert relay.stats()["a>b"]["bytes_passed"] >= 2 * 5000


def test_dropped_direction_is_a_black_hole_until_healed_then_reset(relay: RelayProcess,
                                                                   target: EchoTarget) -> None:
    port = relay.add_node("b", target.port)
    with connect(port, "a") as client:
        assert echo(client, b"before") == b"before"
        relay.set_modes([("a", "b", "drop")])
        client.sendall(b"lost")
        wait_until(lambda: relay.stats()["a>b"]["bytes_dropped"] == 4, "the relay to discard 4 bytes")
        # Healing resets the connection that lost bytes: no stream resumes in the middle of a message.
        relay.set_modes([("a", "b", "pass")])
        assert connection_ends(client)
    wait_until(target.closed[0].is_set, "the target's side to be closed")
    assert bytes(target.received[0]) == hello("a") + b"before"
    with connect(port, "a") as client:
        assert echo(client, b"after") == b"after"


def test_reverse_direction_is_governed_by_its_own_mode(relay: RelayProcess, target: EchoTarget) -> None:
    port = relay.add_node("b", target.port)
    relay.set_modes([("b", "a", "drop")])
    with connect(port, "a", expect_echo=False) as client:
        client.sendall(b"one-way")
        wait_until(lambda: target.received and target.received[0] == hello("a") + b"one-way", "a -> b to pass")
        wait_until(lambda: relay.stats()["a>b"]["bytes_dropped"] == len(hello("a")) + 7,
                   "the echo (b -> a) to be discarded")
        relay.set_modes([("b", "a", "pass")])
        assert connection_ends(client)


def test_cut_resets_and_refuses_one_source_only_until_healed(relay: RelayProcess, target: EchoTarget) -> None:
    port = relay.add_node("b", target.port)
    with connect(port, "a") as client:
        assert echo(client, b"up") == b"up"
        relay.set_modes([("a", "b", "cut")])
        assert connection_ends(client)
    with connect(port, "a", expect_echo=False) as refused:
        assert connection_ends(refused)
    assert len(target.received) == 1, "a refused connection reached the target"
    with connect(port, "c") as other_source:
        assert echo(other_source, b"c is not cut") == b"c is not cut"
    relay.set_modes([("a", "b", "pass")])
    with connect(port, "a") as client:
        assert echo(client, b"again") == b"again"
    stats = relay.stats()
    assert stats["a>b"]["refused"] == 1 and stats["a>b"]["accepted"] == 3 and stats["c>b"]["refused"] == 0


def test_connection_to_a_node_that_is_down_is_held_then_reset(relay: RelayProcess) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        dead_port = probe.getsockname()[1]
    port = relay.add_node("b", dead_port)
    with connect(port, "a", expect_echo=False) as client:
        assert connection_ends(client)
    assert relay.stats()["a>b"]["refused"] == 1


def test_connection_without_hello_has_no_source_and_always_passes(relay: RelayProcess,
                                                                  target: EchoTarget) -> None:
    port = relay.add_node("b", target.port)
    relay.set_modes([("a", "b", "drop"), ("b", "a", "drop")])
    frame = encode_frame(1, b"not a hello")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        assert echo(client, frame) == frame


def test_bad_commands_are_refused_with_a_clear_error(relay: RelayProcess, target: EchoTarget) -> None:
    relay.add_node("b", target.port)
    with pytest.raises(ValueError, match="mode 'sideways' is not one of pass, drop, cut"):
        relay.set_modes([("a", "b", "sideways")])
    with pytest.raises(ValueError, match="node b has a relay port already"):
        relay.add_node("b", target.port)
    with pytest.raises(ValueError, match="unknown op 'reboot'"):
        relay.call({"op": "reboot"})


class RecordingRelay:
    def __init__(self) -> None:
        self.modes: dict[tuple[str, str], str] = {}

    def set_modes(self, changes: Iterable[tuple[str, str, str]]) -> None:
        for src, dst, mode in changes:
            self.modes[(src, dst)] = mode

    def blocked(self) -> set[tuple[str, str]]:
        return {pair for pair, mode in self.modes.items() if mode != "pass"}


def test_partition_blocks_both_directions_between_groups_only() -> None:
    relay = RecordingRelay()
    network = Network(relay, ["n1", "n2", "n3", "n4", "n5"])
    network.partition(["n1", "n2"], ["n3", "n4", "n5"])
    assert relay.blocked() == {(a, b) for a in ("n1", "n2") for b in ("n3", "n4", "n5")} | {
        (b, a) for a in ("n1", "n2") for b in ("n3", "n4", "n5")}
    network.heal()
    assert relay.blocked() == set()


def test_bridge_node_talks_to_both_sides() -> None:
    relay = RecordingRelay()
    network = Network(relay, ["n1", "n2", "n3"])
    network.bridge(["n1"], "n2", ["n3"], mode="cut")
    assert relay.blocked() == {("n1", "n3"), ("n3", "n1")}
    assert relay.modes[("n1", "n3")] == "cut"
    with pytest.raises(ValueError, match="bridge node n2 must be on neither side"):
        network.bridge(["n1", "n2"], "n2", ["n3"])
    with pytest.raises(ValueError, match="unknown node"):
        network.partition(["n1"], ["n9"])


def test_source_is_known_when_hello_and_data_arrive_in_one_segment(relay: RelayProcess,
                                                                    target: EchoTarget) -> None:
    port = relay.add_node("b", target.port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(hello("a") + b"x" * 100)
        assert receive(client, len(hello("a")) + 100) == hello("a") + b"x" * 100
    assert set(relay.stats()) == {"a>b"}
