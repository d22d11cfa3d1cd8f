"""A handle's read-ahead advice (cloudfs.handles.ReadAhead), without a mount."""

from __future__ import annotations

from cloudfs.handles import ReadAhead

MiB = 1024 * 1024
K128 = 128 * 1024


def test_a_sequential_reader_whose_reads_arrive_out_of_order_gets_read_ahead() -> None:
    """The kernel has several reads of a file in flight: they may reach us in any order."""
    ra = ReadAhead(4 * MiB, 4)
    offsets = [i * K128 for i in range(64)]  # 8 MiB in 128 KiB reads
    for i in range(0, len(offsets), 4):  # each group of four in reverse
        offsets[i:i + 4] = reversed(offsets[i:i + 4])
    windows = [ra.advise(o, o + K128) for o in offsets]
    assert windows[:28] == [0] * 28  # under 4 MiB read: the kernel's own read-ahead says nothing
    assert max(windows) == 4 and windows[-1] == 4


def test_random_reads_get_no_read_ahead() -> None:
    ra = ReadAhead(4 * MiB, 4)
    for off in (30 * MiB + 100, 41 * MiB + 100, 46 * MiB + 100, 2 * MiB, 20 * MiB):
        assert ra.advise(off, off + 4096) == 0


def test_a_seek_further_than_the_slack_starts_a_new_run() -> None:
    ra = ReadAhead(4 * MiB, 4)
    for off in range(0, 6 * MiB, K128):
        last = ra.advise(off, off + K128)
    assert last == 4
    far = 6 * MiB + ReadAhead.SLACK + 1
    assert ra.advise(far, far + K128) == 0
    assert ra.advise(2 * MiB, 2 * MiB + K128) == 0  # and so does a jump back


def test_no_read_ahead_when_it_is_off() -> None:
    ra = ReadAhead(4 * MiB, 0)
    assert all(ra.advise(o, o + K128) == 0 for o in range(0, 16 * MiB, K128))
