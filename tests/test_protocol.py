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
