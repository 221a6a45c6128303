from cocoon_faas import protocol as P


def test_frames_split_across_reads_and_batched_in_one_read():
    got = []
    proto = P.FrameProtocol(lambda c, t, m, b: got.append((c, t, m, b)))
    data = P.encode(1, P.CALL, {"t": 5}, b'{"x":1}') + P.encode(2, P.CANCEL) + P.encode(3, P.RESULT, None, b"\x00" * 70000)
    for i in range(0, len(data), 7):  # byte dribble
        proto.data_received(data[i:i + 7])
    assert got[0] == (1, P.CALL, {"t": 5}, b'{"x":1}')
    assert got[1] == (2, P.CANCEL, {}, b"")
    assert got[2][0] == 3 and len(got[2][3]) == 70000
    got.clear()
    proto.data_received(data)
    assert [g[0] for g in got] == [1, 2, 3]


def test_oversized_frame_closes_the_connection():
    lost = []
    proto = P.FrameProtocol(lambda *a: None, lambda exc: lost.append(exc))
    proto.data_received(P.HEADER.pack(P.MAX_FRAME + 1, 1, P.CALL, 0))
    assert lost and "bad frame" in str(lost[0]) and proto.closed


def test_frames_cut_at_every_kind_of_boundary_arrive_intact():
    """Whole frames are parsed from the read itself, partial ones buffered: every split gives the same frames."""
    import random

    rng = random.Random(5)
    frames = [(i, P.RESULT, {"ms": i}, bytes([i % 251]) * rng.choice((0, 1, 13, 4096, 70000))) for i in range(1, 40)]
    data = b"".join(P.encode(c, t, m, b) for c, t, m, b in frames)
    for _ in range(30):
        got: list = []
        proto = P.FrameProtocol(lambda c, t, m, b, got=got: got.append((c, t, m, b)))
        pos = 0
        while pos < len(data):
            step = rng.choice((1, 7, 17, 4096, 65536, 200000))
            proto.data_received(data[pos:pos + step])
            pos += step
        assert got == frames


def test_a_peer_dropped_from_inside_a_frame_handler_with_a_partial_frame_buffered():
    """`abort` from `on_frame` while later bytes of the same read are a partial frame (a view of the buffer is
    held during parsing): the connection closes, nothing raises."""
    lost = []
    proto: P.FrameProtocol

    def on_frame(c, t, m, b):  # type: ignore[no-untyped-def]
        proto.abort("unwelcome")

    proto = P.FrameProtocol(on_frame, lambda exc: lost.append(exc))
    data = P.encode(1, P.CALL, None, b"x") + P.encode(2, P.CALL, None, b"y" * 100)
    proto.data_received(data[:5])
    proto.data_received(data[5:-3])
    assert proto.closed and lost and "unwelcome" in str(lost[0])


def test_send_now_writes_the_first_frame_of_a_pass_at_once_and_batches_the_rest():
    """The sandbox link: a call arriving alone goes out at once (latency); many arriving in one loop pass go out
    in one more write, not one syscall each (throughput)."""
    import asyncio

    class Transport:
        def __init__(self) -> None:
            self.writes: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.writes.append(bytes(data))

        def get_extra_info(self, name: str) -> None:
            return None

    async def main() -> list[bytes]:
        proto = P.FrameProtocol(lambda *a: None)
        t = Transport()
        proto.connection_made(t)  # type: ignore[arg-type]
        proto.send_now(b"a")
        assert t.writes == [b"a"]  # at once
        proto.send_now(b"b")
        proto.send(b"c")
        proto.send_now(b"d")
        assert t.writes == [b"a"]  # the rest of this pass waits for its end
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert t.writes == [b"a", b"bcd"]  # in order, one write
        proto.send_now(b"e")  # a later pass: at once again
        return t.writes

    assert asyncio.run(main()) == [b"a", b"bcd", b"e"]
