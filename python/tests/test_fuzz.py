"""Fuzzing the Python frame codec (issue 14): a seeded mutation fuzzer (atheris is not installed here).

Random and mutated inputs (seeds: Fuzz/corpus, shared with the Swift libFuzzer targets) through FrameDecoder
(whole and in random chunks), decode_frames, split_request_options and parse_error_payload. Asserted: the
decoder raises nothing but ProtocolError, the options prefix nothing but ValueError, parse_error_payload nothing
at all; chunking never changes the frames; and no call allocates from a length it has not checked (tracemalloc
peak bounded by the input's size, whatever a length field announces).

NPU_FUZZ_ITERATIONS (default 3000) and NPU_FUZZ_SEED set the run; the figures in BENCHMARKS.md are a long run.
"""

from __future__ import annotations

import os
import random
import struct
import sys
import time
import tracemalloc
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from npu_supervisor.protocol import (  # noqa: E402
    HEADER_LENGTH, FrameDecoder, ProtocolError, decode_frames, parse_error_payload, split_request_options,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ITERATIONS = int(os.environ.get("NPU_FUZZ_ITERATIONS", "3000"))
SEED = int(os.environ.get("NPU_FUZZ_SEED", "14"))
MAX_FRAME = 1 << 16
INTERESTING = [0, 1, 9, 10, 11, 0x7F, 0x80, 0xFF, 0xFFFF, 0x10000, MAX_FRAME - 1, MAX_FRAME, MAX_FRAME + 1,
               0x7FFFFFFF, 0xFFFFFFFF]


def seeds(*folders: str) -> list:
    out = []
    for folder in folders:
        path = os.path.join(ROOT, "Fuzz", "corpus", folder)
        for name in sorted(os.listdir(path)):
            with open(os.path.join(path, name), "rb") as f:
                out.append(f.read())
    return out


def frame(rng: random.Random, payload: bytes) -> bytes:
    length = HEADER_LENGTH + len(payload) if rng.random() < 0.8 else rng.choice(INTERESTING)
    return struct.pack(">IBBQ", length & 0xFFFFFFFF, rng.randrange(256), rng.randrange(256),
                       rng.getrandbits(64)) + payload


def mutate(rng: random.Random, data: bytes, corpus: list) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(8)
        at = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        elif op == 2 and data:
            del data[at:at + rng.randrange(1, 16)]
        elif op == 3:  # an interesting big-endian u32 or u16 (a length field)
            value = rng.choice(INTERESTING)
            data[at:at + 4] = struct.pack(">I", value) if rng.random() < 0.5 else struct.pack(">H", value & 0xFFFF)
        elif op == 4:  # splice another input
            other = rng.choice(corpus)
            data[at:] = other[rng.randrange(len(other) + 1):]
        elif op == 5:
            data[at:at] = frame(rng, bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40))))
        elif op == 6:  # deep JSON nesting and odd JSON tokens
            data[at:at] = rng.choice([b"[" * 3000, b"{\"a\":" * 2000, b"1" * 5000, b"\xff\xfe", b"NaN", b"\"\\ud800\""])
        else:
            data = data[:at]
    return bytes(data[:1 << 16])


def generate(rng: random.Random, corpus: list) -> bytes:
    r = rng.random()
    if r < 0.15:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    if r < 0.3:
        return b"".join(frame(rng, bytes(rng.randrange(256) for _ in range(rng.randrange(0, 30))))
                        for _ in range(rng.randrange(1, 5)))
    return mutate(rng, rng.choice(corpus), corpus)


def check_decoder(rng: random.Random, data: bytes) -> None:
    whole: list = []
    whole_error = None
    try:
        whole = decode_frames(data, MAX_FRAME)
    except ProtocolError as error:
        whole_error = error
    decoder = FrameDecoder(MAX_FRAME)
    chunked: list = []
    chunked_error = None
    offset = 0
    try:
        while offset < len(data):
            n = rng.randrange(1, 40)
            decoder.feed(data[offset:offset + n])
            offset += n
            chunked.extend(decoder.frames())
        decoder.finish()
    except ProtocolError as error:
        chunked_error = error
    # Same frames, same verdict, however the stream is cut.
    assert chunked == whole or (whole_error is not None and whole[:len(chunked)] == chunked[:len(whole)]), data
    assert (whole_error is None) == (chunked_error is None), (data, whole_error, chunked_error)
    if whole_error is not None:
        assert type(whole_error) is type(chunked_error), (data, whole_error, chunked_error)
    for f in whole:
        assert len(f.payload) <= MAX_FRAME - HEADER_LENGTH


def check_options(data: bytes) -> None:
    try:
        options, rest = split_request_options(data)
    except ValueError:
        return
    assert isinstance(options, dict) and isinstance(rest, bytes)


def check_error_payload(data: bytes) -> None:
    value = parse_error_payload(data)
    assert isinstance(value["code"], str) and isinstance(value["message"], str)
    assert isinstance(value["retryable"], bool)


class FuzzTests(unittest.TestCase):
    def run_fuzz(self, corpus: list, check) -> int:
        rng = random.Random(SEED)
        started = time.monotonic()
        tracemalloc.start()
        try:
            for i in range(ITERATIONS):
                data = generate(rng, corpus)
                tracemalloc.reset_peak()
                before = tracemalloc.get_traced_memory()[0]
                try:
                    check(data) if check is not check_decoder else check(rng, data)
                except AssertionError:
                    raise
                except Exception as error:  # anything but the documented error
                    self.fail("iteration %d (seed %d): %s: %r on input %r" % (i, SEED, type(error).__name__,
                                                                              error, data[:200]))
                peak = tracemalloc.get_traced_memory()[1] - before
                # No allocation sized by an unchecked length: at most a few copies of the input, plus overhead.
                self.assertLess(peak, 8 * len(data) + (256 << 10), "input %r" % data[:200])
        finally:
            tracemalloc.stop()
        elapsed = time.monotonic() - started
        if os.environ.get("NPU_FUZZ_REPORT"):
            print("\n%s: %d inputs in %.1f s (seed %d)" % (check.__name__, ITERATIONS, elapsed, SEED))
        return ITERATIONS

    def test_frame_decoder(self) -> None:
        self.run_fuzz(seeds("frame", "options"), check_decoder)

    def test_request_options(self) -> None:
        self.run_fuzz(seeds("options", "control"), check_options)

    def test_error_payload(self) -> None:
        self.run_fuzz(seeds("control", "options"), check_error_payload)

    def test_deep_json_is_the_documented_error(self) -> None:
        # Found by this fuzzer: json.loads raises RecursionError, which split_request_options let through
        # (documented: ValueError) and parse_error_payload let through (documented: never raises).
        deep = b"[" * 100000
        with self.assertRaises(ValueError):
            split_request_options(struct.pack(">H", 60000) + deep[:60000])
        self.assertEqual(parse_error_payload(deep)["code"], "worker_error")

    def test_hostile_length_allocates_nothing(self) -> None:
        tracemalloc.start()
        try:
            decoder = FrameDecoder()  # 16 MiB maximum: a length just under it must not be allocated up front
            decoder.feed(struct.pack(">IBBQ", (16 << 20) - 1, 1, 0, 1))
            self.assertIsNone(decoder.next_frame())
            self.assertLess(tracemalloc.get_traced_memory()[1], 1 << 20)
        finally:
            tracemalloc.stop()


if __name__ == "__main__":
    unittest.main()
