"""Pure tests of the frame codec: no processes, no daemon."""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import tracemalloc
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from npu_supervisor.protocol import (  # noqa: E402
    DEFAULT_MAX_FRAME_BYTES, FLAG_HAS_OPTIONS, HEADER_LENGTH, ErrorCode, Frame, FrameDecoder, FrameReader,
    FrameTooLarge, FrameTooShort, FrameWriter, MessageType, TruncatedFrame, decode_frames, encode_frame,
    encode_request_options, error_payload, parse_error_payload, split_request_options,
)

SAMPLE = [
    Frame(MessageType.HELLO, 0, b'{"protocol":1}'),
    Frame(MessageType.READY, 0, b""),
    Frame(MessageType.REQUEST, 1, b'{"prompt":"Hi","max_new_tokens":5}'),
    Frame(MessageType.CHUNK, 1, b"the"),
    Frame(MessageType.CHUNK, 1, b" model"),
    Frame(MessageType.RESPONSE, 1, bytes(range(256)) * 3),
    Frame(MessageType.ERROR, (1 << 64) - 1, error_payload("device_oom", "out of memory")),
    Frame(MessageType.REQUEST, 7, encode_request_options(250, "3") + b"opaque", FLAG_HAS_OPTIONS),
    Frame(0xEE, 42, b"a type from a later version", 0x80),
    Frame(MessageType.HEARTBEAT, 0, b""),
]


class EncodingTests(unittest.TestCase):
    def test_layout_matches_the_swift_frame(self):
        data = encode_frame(MessageType.CHUNK, 0x0102030405060708, b"xyz", flags=0x01)
        self.assertEqual(data[:4], struct.pack(">I", HEADER_LENGTH + 3))
        self.assertEqual(data[4], 0x05)
        self.assertEqual(data[5], 0x01)
        self.assertEqual(data[6:14], bytes([1, 2, 3, 4, 5, 6, 7, 8]))
        self.assertEqual(data[14:], b"xyz")

    def test_empty_payload_is_ten_bytes(self):
        self.assertEqual(encode_frame(MessageType.HEARTBEAT), b"\x00\x00\x00\x0a\x08\x00" + b"\x00" * 8)

    def test_round_trip(self):
        for frame in SAMPLE:
            with self.subTest(frame=frame):
                self.assertEqual(decode_frames(frame.encode()), [frame])

    def test_payload_conversions(self):
        self.assertEqual(Frame(4, 1, b"").encode(), encode_frame(4, 1, None))
        self.assertEqual(decode_frames(encode_frame(4, 1, "héllo"))[0].payload, "héllo".encode())
        self.assertEqual(decode_frames(encode_frame(4, 1, {"b": 1, "a": [2]}))[0].payload, b'{"a":[2],"b":1}')

    def test_out_of_range_header_fields_are_refused(self):
        with self.assertRaises(ValueError):
            encode_frame(256)
        with self.assertRaises(ValueError):
            encode_frame(4, 1 << 64)
        with self.assertRaises(ValueError):
            encode_frame(4, -1)
        with self.assertRaises(ValueError):
            encode_frame(4, 1, b"", flags=256)

    def test_message_type_names(self):
        self.assertEqual(MessageType.name(MessageType.CHUNK), "chunk")
        self.assertEqual(MessageType.name(0xEE), "type(0xee)")


class SplitPointTests(unittest.TestCase):
    def setUp(self):
        self.stream = b"".join(frame.encode() for frame in SAMPLE)

    def decode_in_pieces(self, pieces):
        decoder = FrameDecoder()
        frames = []
        for piece in pieces:
            decoder.feed(piece)
            frames.extend(decoder.frames())
        decoder.finish()
        return frames

    def test_every_single_split_point(self):
        for cut in range(len(self.stream) + 1):
            with self.subTest(cut=cut):
                self.assertEqual(self.decode_in_pieces([self.stream[:cut], self.stream[cut:]]), SAMPLE)

    def test_every_pair_of_split_points_in_the_first_frames(self):
        head = len(SAMPLE[0].encode()) + len(SAMPLE[1].encode()) + len(SAMPLE[2].encode())
        for first in range(head + 1):
            for second in range(first, head + 1):
                pieces = [self.stream[:first], self.stream[first:second], self.stream[second:]]
                self.assertEqual(self.decode_in_pieces(pieces), SAMPLE, (first, second))

    def test_byte_by_byte(self):
        self.assertEqual(self.decode_in_pieces([self.stream[i:i + 1] for i in range(len(self.stream))]), SAMPLE)

    def test_no_frame_before_the_last_byte(self):
        data = SAMPLE[5].encode()
        decoder = FrameDecoder()
        decoder.feed(data[:-1])
        self.assertIsNone(decoder.next_frame())
        self.assertEqual(decoder.buffered, len(data) - 1)
        decoder.feed(data[-1:])
        self.assertEqual(decoder.next_frame(), SAMPLE[5])
        self.assertEqual(decoder.buffered, 0)

    def test_many_frames_in_one_feed_keep_their_order(self):
        frames = [Frame(MessageType.CHUNK, 9, ("piece %d" % i).encode()) for i in range(1000)]
        self.assertEqual(decode_frames(b"".join(f.encode() for f in frames)), frames)


class LimitTests(unittest.TestCase):
    def test_oversized_length_is_rejected_from_the_length_field_alone(self):
        decoder = FrameDecoder(max_frame_bytes=1024)
        with self.assertRaises(FrameTooLarge) as caught:
            decoder.feed(struct.pack(">I", 1025))  # no byte of the body, no header: rejected already
        self.assertEqual(caught.exception.length, 1025)
        self.assertEqual(caught.exception.maximum, 1024)
        self.assertIn("exceeds the maximum", str(caught.exception))

    def test_the_maximum_itself_is_accepted(self):
        decoder = FrameDecoder(max_frame_bytes=1024)
        decoder.feed(encode_frame(MessageType.RESPONSE, 1, b"x" * (1024 - HEADER_LENGTH)))
        self.assertEqual(len(decoder.next_frame().payload), 1024 - HEADER_LENGTH)

    def test_huge_length_allocates_nothing(self):
        tracemalloc.start()
        try:
            decoder = FrameDecoder()
            with self.assertRaises(FrameTooLarge):
                decoder.feed(b"\xff\xff\xff\xff" + b"\x04\x00" + b"\x00" * 8)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 64 * 1024, "decoding a 4 GiB length must not allocate for it")

    def test_default_limit_is_16_mib(self):
        decoder = FrameDecoder()
        self.assertEqual(decoder.max_frame_bytes, DEFAULT_MAX_FRAME_BYTES)
        with self.assertRaises(FrameTooLarge):
            decoder.feed(struct.pack(">I", DEFAULT_MAX_FRAME_BYTES + 1))

    def test_length_shorter_than_the_header(self):
        for length in range(HEADER_LENGTH):
            with self.subTest(length=length), self.assertRaises(FrameTooShort):
                FrameDecoder().feed(struct.pack(">I", length) + b"\x00" * 20)

    def test_errors_are_sticky(self):
        decoder = FrameDecoder(max_frame_bytes=64)
        with self.assertRaises(FrameTooLarge):
            decoder.feed(struct.pack(">I", 65))
        with self.assertRaises(FrameTooLarge):
            decoder.feed(SAMPLE[1].encode())
        with self.assertRaises(FrameTooLarge):
            decoder.next_frame()

    def test_oversized_frame_after_good_ones(self):
        # The frames before the bad one are delivered, then the stream fails at the bad length.
        decoder = FrameDecoder(max_frame_bytes=64)
        decoder.feed(SAMPLE[1].encode() + SAMPLE[3].encode() + struct.pack(">I", 100))
        self.assertEqual(decoder.next_frame(), SAMPLE[1])
        self.assertEqual(decoder.next_frame(), SAMPLE[3])
        with self.assertRaises(FrameTooLarge):
            decoder.next_frame()


class TruncationTests(unittest.TestCase):
    def test_every_truncation_point_is_reported(self):
        data = SAMPLE[2].encode()
        for cut in range(1, len(data)):
            with self.subTest(cut=cut), self.assertRaises(TruncatedFrame) as caught:
                decode_frames(data[:cut])
            self.assertEqual(caught.exception.buffered, cut)

    def test_clean_end_after_whole_frames(self):
        decoder = FrameDecoder()
        decoder.feed(SAMPLE[0].encode())
        self.assertEqual(list(decoder.frames()), [SAMPLE[0]])
        decoder.finish()  # nothing buffered: no error

    def test_reader_over_a_socket(self):
        a, b = socket.socketpair()
        try:
            a.settimeout(5)
            reader = FrameReader(a)
            writer = FrameWriter(b)
            writer.write_frame(SAMPLE[2])
            b.sendall(SAMPLE[3].encode()[:7])
            self.assertEqual(reader.read_frame(), SAMPLE[2])
            b.close()
            with self.assertRaises(TruncatedFrame):
                reader.read_frame()
        finally:
            a.close()
            b.close()

    def test_reader_returns_none_at_clean_eof(self):
        a, b = socket.socketpair()
        try:
            a.settimeout(5)
            b.sendall(SAMPLE[0].encode() + SAMPLE[1].encode())
            b.close()
            self.assertEqual(list(FrameReader(a)), SAMPLE[:2])
        finally:
            a.close()

    def test_reader_rejects_oversized_length_without_waiting_for_the_body(self):
        a, b = socket.socketpair()
        try:
            a.settimeout(5)  # if the reader waited for the body, this would time out instead
            b.sendall(struct.pack(">I", 2 ** 31))
            with self.assertRaises(FrameTooLarge):
                FrameReader(a, max_frame_bytes=1 << 20).read_frame()
        finally:
            a.close()
            b.close()

    def test_concurrent_writers_do_not_interleave(self):
        a, b = socket.socketpair()
        try:
            a.settimeout(10)
            writer = FrameWriter(b)
            payloads = {t: bytes([t]) * 70000 for t in range(8)}

            def write(t):
                for i in range(20):
                    writer.write(MessageType.CHUNK, t * 100 + i, payloads[t])

            threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
            reader = FrameReader(a)
            received = []

            def read():
                for _ in range(160):
                    received.append(reader.read_frame())

            consumer = threading.Thread(target=read)
            consumer.start()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            consumer.join(10)
            self.assertEqual(len(received), 160)
            for frame in received:
                self.assertEqual(frame.payload, payloads[frame.request_id // 100])
        finally:
            a.close()
            b.close()


class PayloadTests(unittest.TestCase):
    def test_request_options_round_trip(self):
        prefixed = encode_request_options(deadline_ms=1500, device="2") + b"\x00opaque"
        options, rest = split_request_options(prefixed)
        self.assertEqual(options, {"deadline_ms": 1500, "device": "2"})
        self.assertEqual(rest, b"\x00opaque")

    def test_request_options_layout(self):
        prefix = encode_request_options(deadline_ms=10)
        self.assertEqual(prefix, struct.pack(">H", len(b'{"deadline_ms":10}')) + b'{"deadline_ms":10}')
        self.assertEqual(encode_request_options(), b"\x00\x02{}")

    def test_bad_request_options(self):
        for bad in (b"", b"\x00", b"\x00\x05{}", b"\x00\x02[]", b"\x00\x03{x}"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                split_request_options(bad)
        for deadline in (0, -5, 1.5, True, "10"):
            with self.subTest(deadline=deadline), self.assertRaises(ValueError):
                encode_request_options(deadline_ms=deadline)

    def test_error_payload(self):
        payload = error_payload(ErrorCode.OVERLOADED, "queue full", retryable=True)
        self.assertEqual(payload, b'{"code":"overloaded","message":"queue full","retryable":true}')
        self.assertEqual(parse_error_payload(payload),
                         {"code": "overloaded", "message": "queue full", "retryable": True})

    def test_garbled_error_payload_is_still_an_error(self):
        self.assertEqual(parse_error_payload(b"segfault in kernel"),
                         {"code": "worker_error", "message": "segfault in kernel", "retryable": False})
        self.assertEqual(parse_error_payload(b'{"message": "no code"}')["code"], "worker_error")


if __name__ == "__main__":
    unittest.main()
