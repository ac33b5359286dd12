"""The PyTorch + transformers example (examples/torch_worker.py) as a real worker: one rank, and a group of two
ranks joined with torch.distributed (gloo, on the CPU), each on a socketpair held by the fake supervisor of
test_worker.py. The model is a tiny random-init one written by the example's own --make-tiny-model; the expected
text comes from transformers' own greedy ``generate`` on the same model, an oracle independent of the example.

Skipped (with the reason) where torch, transformers or tokenizers are not installed: ``pip install torch
transformers tokenizers safetensors``. Every wait has a deadline (long ones: importing torch takes seconds)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_worker import PYTHON_DIR, FakeSupervisor  # noqa: E402

from npu_supervisor.protocol import MessageType, json_bytes, parse_error_payload  # noqa: E402

TORCH_WORKER = os.path.join(PYTHON_DIR, "examples", "torch_worker.py")
START_TIMEOUT = 180.0  # importing torch on a busy 2-CPU machine
PROMPT = "hello world"
TOKENS = 12

MODEL_DIR = None
EXPECTED = None  # transformers' greedy generate on the tiny model: (text, number of tokens)


def require(module, reason):
    """Skips the whole module when ``module`` is missing. (unittest.SkipTest rather than pytest.importorskip:
    `make test` runs these files with unittest, to which pytest's skip exception is an error.)"""
    try:
        return __import__(module)
    except ImportError as error:
        raise unittest.SkipTest("%s (%s)" % (reason, error))


def setUpModule():
    global MODEL_DIR, EXPECTED
    install = "pip install torch transformers tokenizers safetensors"
    torch = require("torch", "PyTorch is not installed: " + install)
    require("transformers", "transformers is not installed: " + install)
    require("tokenizers", "tokenizers is not installed: " + install)
    spec = importlib.util.spec_from_file_location("torch_worker_for_tests", TORCH_WORKER)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    MODEL_DIR = tempfile.mkdtemp(prefix="npu-tiny-model-")
    example.make_tiny_model(MODEL_DIR, arch="llama")  # untied head: varied text, not one repeated token
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True).eval()
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        output = model.generate(prompt, max_new_tokens=TOKENS, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)
    new = [t for t in output[0, prompt.shape[1]:].tolist() if t != tokenizer.eos_token_id]
    EXPECTED = (tokenizer.decode(new, skip_special_tokens=True), len(new))


def tearDownModule():
    if MODEL_DIR:
        shutil.rmtree(MODEL_DIR, ignore_errors=True)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TorchWorkerTests(unittest.TestCase):
    def start(self, env=None, device="0", hello=True):
        environment = {"CUDA_VISIBLE_DEVICES": "", "ASCEND_RT_VISIBLE_DEVICES": "", "NPU_MODEL_PATH": MODEL_DIR,
                       "OMP_NUM_THREADS": "1"}
        environment.update(env or {})
        sup = FakeSupervisor(command=[sys.executable, TORCH_WORKER, "--health-interval", "0.2"], env=environment,
                             device=device, heartbeat_ms=200, hello=hello)
        self.addCleanup(sup.close)
        return sup

    def request(self, sup, request_id, body, timeout=60):
        sup.send(MessageType.REQUEST, request_id, json_bytes(body))
        return sup.answer(request_id, timeout)

    def test_one_rank_streams_a_real_model_reports_health_and_maps_oom(self):
        sup = self.start()
        sup.expect(lambda f: f.type == MessageType.HELLO, timeout=START_TIMEOUT)
        sup.expect(lambda f: f.type == MessageType.READY, timeout=START_TIMEOUT)
        health = sup.health.get(timeout=30)
        self.assertEqual(health.json(), {"device": "ok"})

        chunks, final = self.request(sup, 1, {"prompt": PROMPT, "max_new_tokens": TOKENS, "stream": True})
        self.assertEqual(final.type, MessageType.RESPONSE, final.payload)
        answer = final.json()
        self.assertEqual((answer["text"], answer["tokens"]), EXPECTED)
        self.assertEqual(b"".join(chunks).decode(), answer["text"])
        self.assertGreater(len(chunks), 1, "expected the answer streamed in pieces")
        self.assertEqual((answer["rank"], answer["world_size"], answer["device"]), (0, 1, "0"))
        _, again = self.request(sup, 2, {"prompt": PROMPT, "max_new_tokens": TOKENS})
        self.assertEqual(again.json()["text"], answer["text"])  # greedy: the same text, streamed or not

        _, bad = self.request(sup, 3, {"prompt": 7})
        self.assertEqual(parse_error_payload(bad.payload)["code"], "bad_request")

        # A real allocation the device (here: the CPU) cannot hold: the framework's error becomes device_oom.
        _, oom = self.request(sup, 4, {"fault": "device_oom", "oom_bytes": 1 << 46})
        error = parse_error_payload(oom.payload)
        self.assertEqual(error["code"], "device_oom", error)
        report = sup.expect(lambda f: f.type == MessageType.ERROR and f.request_id == 0)
        self.assertEqual(parse_error_payload(report.payload)["code"], "device_oom")
        self.assertEqual(sup.wait_exit(), 1)

    def test_two_ranks_with_gloo_answer_like_one_and_fail_together(self):
        port = free_port()

        def group_env(rank):
            return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port), "NPU_GROUP": "tp0"}

        leader = self.start(group_env(0), device="0")
        follower = self.start(group_env(1), device="1")
        for sup in (leader, follower):
            sup.expect(lambda f: f.type == MessageType.HELLO, timeout=START_TIMEOUT)
            sup.expect(lambda f: f.type == MessageType.READY, timeout=START_TIMEOUT)
            self.assertEqual(sup.health.get(timeout=30).json(), {"device": "ok"})
        follower.stderr.wait_for("rank 1: group tp0 complete (2 ranks, backend gloo)")

        # The head is split by vocabulary across the two ranks: the answer must still be the model's own.
        chunks, final = self.request(leader, 1, {"prompt": PROMPT, "max_new_tokens": TOKENS, "stream": True})
        self.assertEqual(final.type, MessageType.RESPONSE, final.payload)
        answer = final.json()
        self.assertEqual((answer["text"], answer["tokens"]), EXPECTED)
        self.assertEqual(b"".join(chunks).decode(), answer["text"])
        self.assertEqual((answer["rank"], answer["world_size"]), (0, 2))
        _, second = self.request(leader, 2, {"prompt": "a second request", "max_new_tokens": 4})
        self.assertEqual(second.type, MessageType.RESPONSE, second.payload)

        _, refused = self.request(follower, 3, {"prompt": PROMPT})
        self.assertIn("rank 1 of group tp0 is a follower", parse_error_payload(refused.payload)["message"])

        # The follower dies: the leader's next collective fails and the leader exits 1 without answering (the
        # supervisor retries the request on another replica once the group is down).
        follower.process.kill()
        follower.wait_exit()
        leader.send(MessageType.REQUEST, 4, json_bytes({"prompt": PROMPT, "max_new_tokens": TOKENS}))
        self.assertEqual(leader.wait_exit(timeout=60), 1)
        answers = []
        while True:  # every frame it wrote, up to the end of its channel
            frame = leader.frames.get(timeout=30)
            if frame is None or isinstance(frame, Exception):
                break
            if frame.request_id == 4 and frame.type in (MessageType.RESPONSE, MessageType.ERROR):
                answers.append(frame)
        self.assertEqual(answers, [], "a broken group answers nothing")
        leader.stderr.wait_for("rank 0: lost peer:")

    def test_a_rank_whose_group_never_forms_gives_up_after_the_rendezvous_timeout(self):
        port = free_port()  # and no rank 0 ever listens there
        sup = FakeSupervisor(
            command=[sys.executable, TORCH_WORKER, "--rendezvous-timeout", "2"],
            env={"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port), "NPU_GROUP": "tp0", "NPU_MODEL_PATH": MODEL_DIR, "CUDA_VISIBLE_DEVICES": "",
                 "ASCEND_RT_VISIBLE_DEVICES": ""}, device="1", heartbeat_ms=200)
        self.addCleanup(sup.close)
        sup.expect(lambda f: f.type == MessageType.HELLO, timeout=START_TIMEOUT)
        self.assertEqual(sup.wait_exit(timeout=START_TIMEOUT), 1)  # restartable: not 78
        sup.stderr.wait_for("rank 1: the rendezvous of group tp0 failed")
        # It never said ready: everything it sent after hello was heartbeats (skipped) or health frames.
        while True:
            frame = sup.frames.get(timeout=10)
            if frame is None:
                break
            self.assertEqual(getattr(frame, "type", None), MessageType.HEARTBEAT, frame)

    def test_a_missing_model_is_a_configuration_error(self):
        sup = self.start({"NPU_MODEL_PATH": os.path.join(MODEL_DIR, "nope")}, hello=False)
        self.assertEqual(sup.wait_exit(timeout=START_TIMEOUT), 78)
        sup.stderr.wait_for("is not a model directory (no config.json)")


if __name__ == "__main__":
    unittest.main()


class SupervisedTorchGroupTests(unittest.TestCase):
    """The example as a tensor-parallel group under the real npu-supervisord: two ranks joined with gloo serve one
    replica; a follower killed with SIGKILL takes the group down, the supervisor restarts both ranks together,
    and the replica answers like the model again. Skipped (saying why) without the daemon binary."""

    def test_a_group_of_two_torch_ranks_serves_and_survives_a_killed_follower(self):
        from test_integration import DAEMON, Daemon, process_alive
        from npu_supervisor import Client
        if not os.path.exists(DAEMON):
            self.skipTest("npu-supervisord not found at %s: run `swift build`" % DAEMON)
        command = ", ".join('"%s"' % part for part in (sys.executable, TORCH_WORKER, "--health-interval", "0.5"))
        daemon = Daemon(devices=(), extra="\n".join([
            "[[group]]",
            'id = "tp0"',
            'devices = ["0", "1"]',
            'kind = "cpu"',
            "command = [%s]" % command,
            'env = { NPU_MODEL_PATH = "%s", OMP_NUM_THREADS = "1" }' % MODEL_DIR,
            'start_timeout = "%ds"' % START_TIMEOUT,
            'heartbeat_timeout = "10s"',
        ]))
        self.addCleanup(daemon.cleanup)

        def group(document):
            return document["groups"][0]

        daemon.wait(lambda d: group(d)["serving"], START_TIMEOUT, "the group serving")
        client = Client(daemon.requests_socket)
        self.addCleanup(client.close)
        body = {"prompt": PROMPT, "max_new_tokens": TOKENS}
        answer = client.infer_json(body, device="tp0", deadline_ms=120000)
        self.assertEqual((answer["text"], answer["tokens"], answer["world_size"]), EXPECTED + (2,))

        before = daemon.status()
        follower = next(w for w in before["workers"] if w["device"] == "1")
        self.assertEqual((follower["group"], follower["rank"]), ("tp0", 1))
        os.kill(follower["pid"], signal.SIGKILL)
        after = daemon.wait(lambda d: group(d)["restarts"] == 1 and group(d)["serving"], START_TIMEOUT,
                            "the group restarted and serving again")
        self.assertEqual((group(after)["last_exit"], group(after)["last_exit_rank"]), ("signaled(9)", 1))
        self.assertNotEqual(group(after)["master_port"], group(before)["master_port"])
        answer = client.infer_json(body, device="tp0", deadline_ms=120000)
        self.assertEqual((answer["text"], answer["tokens"]), EXPECTED)

        pids = [w["pid"] for w in after["workers"] if w["pid"]]
        self.assertEqual(daemon.terminate(), 0)
        self.assertFalse([pid for pid in pids if process_alive(pid)], "no rank left running")
