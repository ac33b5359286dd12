"""Tensor-parallel ranks of the Swift reference worker (npu-worker), without the supervisor: each rank is a real
process with its channel on a socketpair held by the test (the FakeSupervisor of test_worker.py), and the ranks
meet over real TCP on MASTER_ADDR:MASTER_PORT, as the supervisor's group contract describes (docs/PROTOCOL.md,
"Tensor-parallel groups: what a rank is given"). Every wait has a deadline.

The binary is ``$NPU_SUPERVISOR_BIN/npu-worker`` or ``<repo>/.build/debug/npu-worker`` (``swift build``)."""

from __future__ import annotations

import os
import queue
import signal
import socket
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_worker import TIMEOUT, FakeSupervisor  # noqa: E402

from npu_supervisor.protocol import Frame, MessageType, json_bytes, parse_error_payload  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN_DIR = os.environ.get("NPU_SUPERVISOR_BIN") or os.path.join(REPO, ".build", "debug")
NPU_WORKER = os.path.join(BIN_DIR, "npu-worker")


def free_port() -> int:
    """A TCP port free right now (what the supervisor does for each group start)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_env(rank, world, port, group="tp0"):
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "NPU_GROUP": group, "ASCEND_RT_VISIBLE_DEVICES": str(rank)}


class RankTests(unittest.TestCase):
    def setUp(self):
        if not os.access(NPU_WORKER, os.X_OK):
            raise unittest.SkipTest("npu-worker not found at %s: run `swift build` in %s or set NPU_SUPERVISOR_BIN"
                                    % (NPU_WORKER, REPO))
        self.port = free_port()

    def rank(self, rank, world=2, args=(), env=None, group="tp0", hello=True):
        environment = rank_env(rank, world, self.port, group)
        environment.update(env or {})
        sup = FakeSupervisor(command=[NPU_WORKER], args=list(args), env=environment, device=str(rank), hello=hello)
        self.addCleanup(sup.close)
        return sup

    def no_ready_yet(self, sup):
        """True when no ready frame has arrived so far (frames already queued are looked at, nothing waited for)."""
        while True:
            try:
                frame = sup.frames.get_nowait()
            except queue.Empty:
                return True
            if isinstance(frame, Frame) and frame.type == MessageType.READY:
                return False
            if frame is None or isinstance(frame, Exception):
                raise AssertionError("channel ended before the group formed; stderr:\n%s" % sup.stderr.text)

    def request(self, sup, request_id, body, timeout=TIMEOUT):
        sup.send(MessageType.REQUEST, request_id, json_bytes(body) if isinstance(body, dict) else body)
        return sup.answer(request_id, timeout)

    def form_group(self):
        leader = self.rank(0)
        leader.expect(lambda f: f.type == MessageType.HELLO)
        leader.stderr.wait_for("waiting for 1 rank(s) of group tp0")
        follower = self.rank(1)
        follower.handshake()
        leader.expect(lambda f: f.type == MessageType.READY)
        return leader, follower

    def test_ready_only_once_every_rank_joined_and_the_leader_serves(self):
        leader = self.rank(0)
        leader.expect(lambda f: f.type == MessageType.HELLO)
        leader.stderr.wait_for("waiting for 1 rank(s)")  # listening: the rendezvous has begun
        # Heartbeats flow meanwhile (the supervisor must not take the rendezvous for a hang) ...
        leader.expect(lambda f: f.type == MessageType.HEARTBEAT, skip_heartbeats=False)
        # ... but no ready before rank 1 exists.
        self.assertTrue(self.no_ready_yet(leader), "the leader said ready before rank 1 was started")
        follower = self.rank(1)
        follower.handshake()
        leader.expect(lambda f: f.type == MessageType.READY)
        leader.stderr.wait_for("rank 1 joined (2/2)")
        follower.stderr.wait_for("rank 1: group complete (2 ranks)")

        chunks, final = self.request(leader, 1, {"prompt": "Hi", "max_new_tokens": 5, "stream": True})
        self.assertEqual(final.type, MessageType.RESPONSE)
        self.assertEqual(final.json()["text"], "npu npu quickly tokens workers")  # as a single worker answers
        self.assertEqual(b"".join(chunks), b"npu npu quickly tokens workers")
        _, echo = self.request(leader, 2, b"raw bytes")
        self.assertEqual((echo.type, echo.payload), (MessageType.RESPONSE, b"raw bytes"))

        # The supervisor sends requests to rank 0 only; one that reaches a follower gets a clear refusal.
        _, refused = self.request(follower, 3, {"prompt": "Hi"})
        error = parse_error_payload(refused.payload)
        self.assertEqual(error["code"], "worker_error")
        self.assertIn("rank 1 of group tp0 is a follower", error["message"])

    def test_a_stopped_follower_stalls_the_leader_like_a_collective(self):
        leader, follower = self.form_group()
        follower.process.send_signal(signal.SIGSTOP)
        self.addCleanup(lambda: follower.process.poll() is None and follower.process.send_signal(signal.SIGCONT))
        leader.send(MessageType.REQUEST, 1, json_bytes({"prompt": "stalled", "max_new_tokens": 3}))
        # The follower cannot acknowledge the prefill step: no answer may come while it is stopped. The leader
        # stays alive meanwhile (its heartbeats have their own thread).
        stalled_until = time.monotonic() + 0.8
        while time.monotonic() < stalled_until:
            try:
                frame = leader.frames.get(timeout=max(0.01, stalled_until - time.monotonic()))
            except queue.Empty:
                continue
            self.assertIsInstance(frame, Frame, "leader channel ended; stderr:\n%s" % leader.stderr.text)
            self.assertEqual(frame.type, MessageType.HEARTBEAT, "an answer while rank 1 was stopped: %r" % (frame,))
        follower.process.send_signal(signal.SIGCONT)
        _, final = leader.answer(1)
        self.assertEqual((final.type, final.json()["tokens"]), (MessageType.RESPONSE, 3))

    def test_killing_the_follower_breaks_the_leader(self):
        leader, follower = self.form_group()
        follower.process.kill()
        follower.wait_exit()
        code = leader.wait_exit()
        self.assertNotIn(code, (0, 78))
        leader.stderr.wait_for("rank 0: lost peer rank 1: connection closed")

    def test_losing_the_leader_breaks_the_follower(self):
        leader, follower = self.form_group()
        leader.process.kill()
        code = follower.wait_exit()
        self.assertNotIn(code, (0, 78))
        follower.stderr.wait_for("rank 1: lost peer rank 0:")

    def test_a_follower_started_first_retries_until_the_leader_listens(self):
        follower = self.rank(1)
        follower.expect(lambda f: f.type == MessageType.HELLO)
        # Nothing listens yet: the follower's first connects are refused; it keeps trying and stays not ready.
        self.assertTrue(self.no_ready_yet(follower))
        leader = self.rank(0)
        leader.handshake()
        follower.expect(lambda f: f.type == MessageType.READY)
        _, final = self.request(leader, 1, {"prompt": "Hi", "max_new_tokens": 2})
        self.assertEqual(final.type, MessageType.RESPONSE)

    def test_the_rendezvous_times_out(self):
        leader = self.rank(0, world=3, args=["--rendezvous-timeout-ms", "300"])
        code = leader.wait_exit()
        self.assertNotIn(code, (0, 78))
        leader.stderr.wait_for("rank 0: rendezvous timed out after")
        leader.stderr.wait_for("rank(s) 1, 2 never joined")
        follower = self.rank(1, args=["--rendezvous-timeout-ms", "300"])  # and nobody listens for this one
        self.assertNotIn(follower.wait_exit(), (0, 78))
        follower.stderr.wait_for("rank 1: rendezvous timed out after")

    def test_the_leader_refuses_duplicate_out_of_range_and_foreign_ranks(self):
        leader = self.rank(0, world=3)
        leader.expect(lambda f: f.type == MessageType.HELLO)
        leader.stderr.wait_for("waiting for 2 rank(s)")
        first = self.rank(1, world=3)
        first.expect(lambda f: f.type == MessageType.HELLO)
        leader.stderr.wait_for("rank 1 joined (2/3)")

        def hello(line):
            with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as conn:
                conn.sendall(line)
                return conn.makefile("rb").readline().decode()

        self.assertEqual(hello(b"npu-rank 1 3 tp0\n"), "refused rank 1 already joined\n")
        self.assertEqual(hello(b"npu-rank 3 3 tp0\n"), "refused rank 3 is out of range (followers are 1..2)\n")
        self.assertEqual(hello(b"npu-rank 2 4 tp0\n"), "refused rank 2 has WORLD_SIZE=4, this group has 3\n")
        self.assertEqual(hello(b"npu-rank 2 3 tp9\n"), 'refused rank 2 belongs to group "tp9", not "tp0"\n')
        self.assertTrue(hello(b"GET / HTTP/1.0\n").startswith("refused not a rank hello"))
        # A real rank 1 with a duplicate id is refused the same way, and says so as it exits.
        duplicate = self.rank(1, world=3)
        self.assertNotIn(duplicate.wait_exit(), (0, 78))
        duplicate.stderr.wait_for("rank 1: rank 0 refused this rank: rank 1 already joined")
        self.assertTrue(self.no_ready_yet(leader))
        last = self.rank(2, world=3)
        last.handshake()
        leader.expect(lambda f: f.type == MessageType.READY)
        first.expect(lambda f: f.type == MessageType.READY)
        _, final = self.request(leader, 1, {"prompt": "three ranks", "max_new_tokens": 4, "stream": True})
        self.assertEqual(final.json()["tokens"], 4)

    def test_inconsistent_rank_variables_are_a_configuration_error(self):
        for env, message in [
            ({"RANK": "2", "LOCAL_RANK": "2"}, "RANK=2 is not an integer in 0..<2"),
            ({"MASTER_PORT": "99999"}, "MASTER_PORT=99999 is not a TCP port"),
            ({"WORLD_SIZE": "two"}, "WORLD_SIZE=two is not a positive integer"),
            ({"LOCAL_RANK": "1"}, "LOCAL_RANK=1 differs from RANK=0"),
        ]:
            with self.subTest(env=env):
                sup = self.rank(0, env=env, hello=False)  # it exits before reading anything
                self.assertEqual(sup.wait_exit(), 78)
                sup.stderr.wait_for(message)

    def test_world_size_1_is_a_plain_worker(self):
        sup = self.rank(0, world=1, env={"MASTER_PORT": ""})  # no rendezvous, nothing to listen on
        sup.handshake()
        _, final = self.request(sup, 1, {"prompt": "Hi", "max_new_tokens": 5})
        self.assertEqual(final.json()["text"], "npu npu quickly tokens workers")
        self.assertNotIn("rendezvous", sup.stderr.text)


if __name__ == "__main__":
    unittest.main()
