"""The Python library's side of tensor-parallel groups: RankInfo read from the environment the supervisor gives a
rank, the rank table, and Worker.run_rank's leader/follower split run as real processes against the fake
supervisor of test_worker.py (a follower's collective loop talks to a TCP "leader" held by the test)."""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import textwrap
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_worker import PYTHON_DIR, TIMEOUT, FakeSupervisor  # noqa: E402

from npu_supervisor import RankError, RankInfo  # noqa: E402
from npu_supervisor.protocol import MessageType, json_bytes, parse_error_payload  # noqa: E402

GROUP = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
         "NPU_GROUP": "tp0", "NPU_DEVICE_ID": "1"}


class RankInfoTests(unittest.TestCase):
    def test_a_worker_outside_any_group_is_its_own_leader(self):
        info = RankInfo.from_env({"NPU_DEVICE_ID": "3"})
        self.assertEqual((info.rank, info.local_rank, info.world_size, info.device), (0, 0, 1, "3"))
        self.assertTrue(info.is_leader)
        self.assertFalse(info.distributed)
        self.assertEqual(RankInfo.from_env({"WORLD_SIZE": "1"}).world_size, 1)

    def test_a_rank_of_a_group(self):
        info = RankInfo.from_env(dict(GROUP, RANK_TABLE_FILE="/run/npu-supervisor/tp0.json"))
        self.assertEqual(info, RankInfo(rank=1, local_rank=1, world_size=2, master_addr="127.0.0.1", master_port=29500,
                                        group="tp0", rank_table_file="/run/npu-supervisor/tp0.json", device="1"))
        self.assertFalse(info.is_leader)
        self.assertTrue(info.distributed)
        self.assertTrue(RankInfo.from_env(dict(GROUP, RANK="0", LOCAL_RANK="0")).is_leader)
        # LOCAL_RANK defaults to RANK (one host).
        self.assertEqual(RankInfo.from_env({k: v for k, v in GROUP.items() if k != "LOCAL_RANK"}).local_rank, 1)

    def test_inconsistent_variables_are_refused_with_the_reason(self):
        cases = [
            ({"RANK": "2", "LOCAL_RANK": "2"}, "RANK=2 is out of range (0..1)"),
            ({"RANK": ""}, "WORLD_SIZE=2 but RANK is not set"),
            ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 is out of range (>= 1)"),
            ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
            ({"LOCAL_RANK": "0"}, "LOCAL_RANK=0 differs from RANK=1"),
            ({"MASTER_ADDR": ""}, "MASTER_ADDR is not set"),
            ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is out of range (1..65535)"),
            ({"MASTER_PORT": ""}, "MASTER_PORT is not set"),
        ]
        for change, message in cases:
            with self.subTest(change=change):
                with self.assertRaises(RankError) as caught:
                    RankInfo.from_env(dict(GROUP, **change))
                self.assertIn(message, str(caught.exception))

    def test_rank_table(self):
        table = {"version": "1.0", "server_count": "1", "status": "completed", "server_list": [
            {"server_id": "127.0.0.1", "device": [{"device_id": "0", "device_ip": "192.168.1.8", "rank_id": "0"},
                                                  {"device_id": "1", "device_ip": "192.168.1.9", "rank_id": "1"}]}]}
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "rank_table.json")
            with open(path, "w") as handle:
                json.dump(table, handle)
            info = RankInfo.from_env(dict(GROUP, RANK_TABLE_FILE=path))
            self.assertEqual(info.read_rank_table(), table)
            self.assertIsNone(RankInfo.from_env(GROUP).read_rank_table())
            with self.assertRaisesRegex(RankError, "does not list rank 1 \\(it lists 0\\)"):
                table["server_list"][0]["device"].pop()
                with open(path, "w") as handle:
                    json.dump(table, handle)
                info.read_rank_table()
            with open(path, "w") as handle:
                handle.write("{not json")
            with self.assertRaisesRegex(RankError, "is not valid JSON"):
                info.read_rank_table()
            with self.assertRaisesRegex(RankError, "cannot be read"):
                RankInfo.from_env(dict(GROUP, RANK_TABLE_FILE=os.path.join(folder, "missing.json"))).read_rank_table()


# A rank of a toy group: the "collective" is a TCP connection to a leader held by the test; the follower loop
# acknowledges each line and raises when the connection ends (what a broken communicator does).
RANK_WORKER = textwrap.dedent("""
    import socket, sys
    sys.path.insert(0, %r)
    from npu_supervisor import Worker, WorkerError
    try:
        worker = Worker(model="toy", worker_version="rank-test 1.0")
        worker.connect()
    except WorkerError as error:
        sys.stderr.write("%%s\\n" %% error)
        sys.exit(78)
    rank = worker.rank

    def handle(request):
        return {"rank": rank.rank, "echo": request.json()}

    def follow():
        peer = socket.create_connection((rank.master_addr, rank.master_port))
        stream = peer.makefile("rwb")
        stream.write(b"rank %%d\\n" %% rank.rank)
        stream.flush()
        while True:
            line = stream.readline()
            if not line:
                raise ConnectionError("connection closed by rank 0")
            stream.write(b"ack " + line)
            stream.flush()

    worker.run_rank(handler=handle, follower_loop=follow)
""") % PYTHON_DIR


class RunRankTests(unittest.TestCase):
    def start(self, env, hello=True):
        sup = FakeSupervisor(command=[sys.executable, "-c", RANK_WORKER], env=env, device=env["NPU_DEVICE_ID"],
                             hello=hello)
        self.addCleanup(sup.close)
        return sup

    def test_the_leader_serves_requests(self):
        sup = self.start(dict(GROUP, RANK="0", LOCAL_RANK="0", NPU_DEVICE_ID="0"))
        sup.handshake()
        sup.send(MessageType.REQUEST, 1, json_bytes({"prompt": "Hi"}))
        _, final = sup.answer(1)
        self.assertEqual(final.json(), {"rank": 0, "echo": {"prompt": "Hi"}})

    def test_a_follower_says_ready_runs_its_loop_refuses_requests_and_dies_with_its_peer(self):
        leader = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(leader.close)
        leader.settimeout(TIMEOUT)
        port = leader.getsockname()[1]
        sup = self.start(dict(GROUP, MASTER_PORT=str(port)))
        sup.handshake()
        conn, _ = leader.accept()
        conn.settimeout(TIMEOUT)
        stream = conn.makefile("rwb")
        self.assertEqual(stream.readline(), b"rank 1\n")
        stream.write(b"step 1\n")
        stream.flush()
        self.assertEqual(stream.readline(), b"ack step 1\n")
        # The loop runs on the main thread; heartbeats still come from their own.
        sup.expect(lambda f: f.type == MessageType.HEARTBEAT, skip_heartbeats=False)
        sup.send(MessageType.REQUEST, 9, json_bytes({"prompt": "Hi"}))
        _, refused = sup.answer(9)
        error = parse_error_payload(refused.payload)
        self.assertEqual(error["code"], "worker_error")
        self.assertIn("rank 1 of group tp0 is a follower", error["message"])
        stream.close()
        conn.close()  # the leader is gone
        self.assertEqual(sup.wait_exit(), 1)
        sup.stderr.wait_for("rank 1: lost peer: ConnectionError: connection closed by rank 0; exiting 1")

    def test_inconsistent_rank_variables_exit_78(self):
        sup = self.start(dict(GROUP, RANK="5"), hello=False)  # it exits before reading anything
        self.assertEqual(sup.wait_exit(), 78)
        sup.stderr.wait_for("RANK=5 is out of range (0..1)")


if __name__ == "__main__":
    unittest.main()
