#!/usr/bin/env python3
"""A real inference engine under npu-supervisor: a PyTorch + transformers causal language model.

Run by npu-supervisord (its channel is fd 3), e.g. in the config::

    [defaults]
    command = ["python3", "/opt/npu-supervisor/python/examples/torch_worker.py", "--model", "/models/qwen-0.5b"]
    start_timeout = "5m"

The model is a local directory that ``from_pretrained`` can load (``--model`` or ``$NPU_MODEL_PATH``; nothing is
downloaded). ``--make-tiny-model DIR`` writes a tiny, randomly initialised GPT-2 or Llama model there, with a
byte-level BPE tokenizer trained in memory, so that demos and tests have a real model on disk without any hub
access. Its text is gibberish, but every token of it comes out of a real forward pass.

Requests (JSON): ``{"prompt": "Hi", "max_new_tokens": 16, "stream": true}``. Greedy decoding with a KV cache;
with ``stream`` every decoded piece of text is sent as a ``chunk`` (the chunks concatenated equal ``text``).
The answer is ``{"text", "tokens", "device", "pid", "model", "rank", "world_size"}``. ``{"fault": "device_oom",
"oom_bytes": N}`` makes a real allocation of N bytes (default 4 TiB) on the device: the framework's
out-of-memory error is mapped to the ``device_oom`` error code, as any out-of-memory error in generation is
(``torch.OutOfMemoryError``, or a ``RuntimeError`` saying "out of memory", e.g. torch_npu's; on CPU, the
allocator's "can't allocate memory"), and the worker reports it and exits 1 so that the supervisor restarts it
with a fresh device context.

Device: torch_npu where ``ASCEND_RT_VISIBLE_DEVICES`` is set (``kind = "npu"``), CUDA where
``CUDA_VISIBLE_DEVICES`` is (``kind = "gpu"``), else CPU; ``--device-kind`` overrides. A pinning variable whose
framework is missing is a configuration error (exit 78), not a silent fall-back to the CPU. Every heartbeat
interval a ``health`` frame reports the device: the framework sees it and a tiny tensor operation on it works.

Tensor-parallel groups (``WORLD_SIZE`` > 1, see docs/PROTOCOL.md, "Tensor-parallel groups: what a rank is
given"): every rank loads the model and joins ``torch.distributed`` (``env://``: MASTER_ADDR, MASTER_PORT;
backend gloo on CPU, nccl on CUDA, hccl on torch_npu) before it says ready, and the ranks check with an
all-reduce that they hold the same weights. The leader (rank 0, the only rank that gets requests) broadcasts
each request's input ids; all ranks run the forward pass in lockstep, and the language-model head is split by
vocabulary: each rank scores its slice of the vocabulary and an all-gather picks the next token, so every token
needs every rank. Followers loop on the broadcast. A failed collective (a peer died) ends the rank with exit 1
and ``rank N: lost peer: ...``; the supervisor restarts the group.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

try:
    import npu_supervisor  # noqa: F401 - installed, or on PYTHONPATH
except ImportError:  # running from a checkout: python/examples/torch_worker.py -> python/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from npu_supervisor import ErrorCode, RankError, RankInfo, Request, RequestFailed, Worker, WorkerError  # noqa: E402

VERSION = "torch_worker 0.1.0"
EX_CONFIG = 78

# Lockstep messages from the leader (the first element of the broadcast header).
OP_STOP = 0
OP_GENERATE = 1

TINY_TEXT = """the model answers quickly on the device and the tokens flow steadily
serving stays up while workers restart hello world ascend npu gpu cpu
a supervisor keeps inference workers serving one process per accelerator device
tensor parallel ranks run the forward pass in lockstep and the leader answers"""


def log(message: str) -> None:
    sys.stderr.write("torch_worker: %s\n" % message)
    sys.stderr.flush()


# --------------------------------------------------------------------------------------------- the tiny model

def make_tiny_model(path: str, arch: str = "llama", seed: int = 0, vocab_size: int = 384) -> str:
    """Writes a tiny random-init causal LM and its tokenizer to ``path`` (``from_pretrained``-loadable, no network).

    The tokenizer is a byte-level BPE trained in memory on a few lines of text (every byte is in its alphabet,
    so any prompt encodes), wrapped as a ``PreTrainedTokenizerFast``. The model is GPT-2 or Llama with two
    layers and a 64-wide hidden state: a few hundred kilobytes, loaded in milliseconds."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TINY_TEXT.splitlines() * 8, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<unk>")
    eos = fast.convert_tokens_to_ids("<|endoftext|>")
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        config = GPT2Config(vocab_size=len(fast), n_positions=256, n_embd=64, n_layer=2, n_head=4,
                            bos_token_id=eos, eos_token_id=eos)
        model_class: Any = GPT2LMHeadModel
    elif arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False)
        model_class = LlamaForCausalLM
    else:
        raise ValueError("unknown architecture %r (gpt2 or llama)" % arch)
    torch.manual_seed(seed)
    model = model_class(config)
    os.makedirs(path, exist_ok=True)
    fast.save_pretrained(path)
    model.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------- the device

def visible_devices(variable: str) -> List[str]:
    return [d.strip() for d in os.environ.get(variable, "").split(",") if d.strip()]


def pick_device(kind: str, rank: RankInfo) -> Tuple[str, str]:
    """(torch device string, torch.distributed backend) for this rank. ``kind`` ``auto`` follows the pinning
    variable the supervisor sets: ASCEND_RT_VISIBLE_DEVICES means torch_npu, CUDA_VISIBLE_DEVICES means CUDA,
    neither means CPU. Raises WorkerError (exit 78) when the framework for the asked device is missing."""
    import torch

    if kind == "auto":
        if visible_devices("ASCEND_RT_VISIBLE_DEVICES"):
            kind = "npu"
        elif visible_devices("CUDA_VISIBLE_DEVICES"):
            kind = "cuda"
        else:
            kind = "cpu"
    if kind == "cpu":
        return "cpu", "gloo"
    if kind == "npu":
        try:
            import torch_npu  # noqa: F401 - registers torch.npu
        except ImportError as error:
            raise WorkerError("ASCEND_RT_VISIBLE_DEVICES is set (or --device-kind npu) but torch_npu cannot be "
                              "imported (%s); use --device-kind cpu to run on the CPU" % error) from None
        if not torch.npu.is_available():  # type: ignore[attr-defined]
            raise WorkerError("torch_npu sees no NPU (ASCEND_RT_VISIBLE_DEVICES=%r)"
                              % os.environ.get("ASCEND_RT_VISIBLE_DEVICES"))
        return "npu:%d" % device_index("ASCEND_RT_VISIBLE_DEVICES", rank), "hccl"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise WorkerError("CUDA_VISIBLE_DEVICES is set (or --device-kind cuda) but torch sees no CUDA device "
                              "(torch %s, built for CUDA %s)" % (torch.__version__, torch.version.cuda))
        return "cuda:%d" % device_index("CUDA_VISIBLE_DEVICES", rank), "nccl"
    raise WorkerError("unknown --device-kind %r" % kind)


def device_index(variable: str, rank: RankInfo) -> int:
    """The pinning variable holds either this rank's own device (index 0) or all of its group's devices (the
    index of its own id there, else its local rank)."""
    devices = visible_devices(variable)
    if len(devices) <= 1:
        return 0
    if rank.device is not None and rank.device in devices:
        return devices.index(rank.device)
    return rank.local_rank


def device_health(device: str) -> Dict[str, Any]:
    """The framework's view of the device: it is available and a tiny operation on it gives the right result."""
    import torch

    try:
        if device.startswith("cuda") and not torch.cuda.is_available():
            return {"device": "error", "detail": "torch.cuda.is_available() is false"}
        if device.startswith("npu") and not torch.npu.is_available():  # type: ignore[attr-defined]
            return {"device": "error", "detail": "torch.npu.is_available() is false"}
        value = (torch.arange(8, dtype=torch.float32, device=device) * 2).sum().item()
        if value != 56.0:
            return {"device": "error", "detail": "a tensor operation on %s gave %r instead of 56" % (device, value)}
        return {"device": "ok"}
    except Exception as error:  # noqa: BLE001 - whatever the framework raises is the device's state
        return {"device": "error", "detail": "%s: %s" % (type(error).__name__, error)}


def is_device_oom(error: BaseException) -> bool:
    """True for the framework's out-of-memory errors, whatever the device."""
    import torch

    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if t is not None)
    if oom_types and isinstance(error, oom_types):
        return True
    if isinstance(error, (RuntimeError, MemoryError)):
        text = str(error).lower()
        return isinstance(error, MemoryError) or any(s in text for s in (
            "out of memory", "can't allocate memory", "not enough memory", "failed to allocate"))
    return False


# --------------------------------------------------------------------------------------------- the engine

class Engine:
    """The model on its device, greedy decoding with a KV cache, and the lockstep of a tensor-parallel group."""

    def __init__(self, model_path: str, device: str, rank: RankInfo, max_new_tokens_limit: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # progress bars on stderr would flood the supervisor's log
        self.torch = torch
        self.device = device
        self.rank = rank
        self.max_new_tokens_limit = max_new_tokens_limit
        self.model_path = model_path
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True).to(device).eval()
        self.base = self.model.base_model  # the transformer body: hidden states, no head
        head = self.model.get_output_embeddings()
        self.vocab_size = head.weight.shape[0]
        # The language-model head, split by vocabulary across the ranks: rows [lo, hi) are this rank's.
        world, me = rank.world_size, rank.rank
        self.lo, self.hi = self.vocab_size * me // world, self.vocab_size * (me + 1) // world
        self.head_weight = head.weight[self.lo:self.hi]
        self.head_bias = head.bias[self.lo:self.hi] if getattr(head, "bias", None) is not None else None
        self.eos = self.tokenizer.eos_token_id
        config = self.model.config
        self.max_positions = int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 0)
                                 or 1 << 30)
        # transformers 5 calls the KV cache `cache`, 4.x `past_key_values`.
        parameters = inspect.signature(self.base.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        #: Collectives are issued in one order on every rank: one request at a time through the group.
        self.lock = threading.Lock()
        #: Set once the group is joined (idle_group()): the request broadcasts go through it.
        self.idle_group: Any = None

    # -- one step

    def next_token(self, ids: Any, cache: Any, keep_going: bool) -> Tuple[int, Any, bool]:
        """One forward pass on this rank, the head on its vocabulary slice, then (in a group) an all-gather of
        every rank's best candidate: the next token (the same on every rank), the new cache, and whether the
        leader wants to go on (it stops a cancelled request; every rank learns it in the same collective)."""
        torch = self.torch
        out = self.base(input_ids=ids, use_cache=True, **{self.cache_argument: cache})
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        hidden = out["last_hidden_state"][0, -1]
        logits = torch.nn.functional.linear(hidden, self.head_weight, self.head_bias)
        best = int(torch.argmax(logits).item())
        mine = torch.tensor([float(logits[best].item()), float(self.lo + best), 1.0 if keep_going else 0.0],
                            dtype=torch.float64, device=self.device)
        if not self.rank.distributed:
            return int(mine[1].item()), cache, keep_going
        import torch.distributed as dist
        gathered = [torch.zeros_like(mine) for _ in range(self.rank.world_size)]
        dist.all_gather(gathered, mine)
        rows = [g.tolist() for g in gathered]
        # Highest score wins; ties go to the lowest token id (every rank sees the same rows: same choice).
        token = int(max(rows, key=lambda r: (r[0], -r[1]))[1])
        return token, cache, rows[0][2] > 0

    def decode(self, prompt_ids: List[int], max_new: int, on_token: Callable[[int], bool]) -> int:
        """Greedy decoding: calls ``on_token`` with each new token id (it returns False to stop: the request
        was cancelled) and returns how many tokens were generated. Runs the same steps on every rank."""
        torch = self.torch
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
            cache = None
            keep_going = True
            count = 0
            for _ in range(max_new):
                token, cache, keep_going = self.next_token(ids, cache, keep_going)
                if not keep_going or token == self.eos:
                    break
                count += 1
                keep_going = on_token(token)
                ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
            return count

    # -- the leader

    def generate(self, request: Request, body: Dict[str, Any], worker: Worker) -> Dict[str, Any]:
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise RequestFailed(ErrorCode.BAD_REQUEST, "prompt must be a string")
        max_new = body.get("max_new_tokens", 16)
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 0:
            raise RequestFailed(ErrorCode.BAD_REQUEST, "max_new_tokens must be a non-negative integer")
        prompt_ids = self.tokenizer(prompt)["input_ids"] or [self.eos]
        if len(prompt_ids) >= self.max_positions:
            raise RequestFailed(ErrorCode.BAD_REQUEST, "the prompt is %d tokens; this model takes at most %d"
                                % (len(prompt_ids), self.max_positions - 1))
        max_new = min(max_new, self.max_new_tokens_limit, self.max_positions - len(prompt_ids))
        stream = body.get("stream") is True
        generated: List[int] = []
        sent = ""

        def on_token(token: int) -> bool:
            nonlocal sent
            generated.append(token)
            if stream:
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                # A token may end inside a multi-byte character (decoded as U+FFFD): wait for the rest of it.
                if text.startswith(sent) and len(text) > len(sent) and not text.endswith("\ufffd"):
                    request.chunk(text[len(sent):])
                    sent = text
            return not request.cancelled

        with self.lock:
            if self.rank.distributed:
                self.broadcast_request(prompt_ids, max_new)
            count = self.decode(prompt_ids, max_new, on_token)
        if request.cancelled:
            raise RequestFailed(ErrorCode.CANCELLED, "cancelled after %d token(s)" % count)
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        if stream and text.startswith(sent) and len(text) > len(sent):
            request.chunk(text[len(sent):])
        return {"text": text, "tokens": count, "device": worker.device, "pid": os.getpid(),
                "model": os.path.basename(os.path.normpath(self.model_path)), "rank": self.rank.rank,
                "world_size": self.rank.world_size}

    def broadcast_request(self, prompt_ids: List[int], max_new: int) -> None:
        import torch.distributed as dist
        header = self.torch.tensor([OP_GENERATE, len(prompt_ids), max_new], dtype=self.torch.long,
                                   device=self.device)
        dist.broadcast(header, src=0, group=self.idle_group)
        dist.broadcast(self.torch.tensor(prompt_ids, dtype=self.torch.long, device=self.device), src=0,
                       group=self.idle_group)

    # -- a follower

    def follow(self) -> None:
        """A follower's life: wait for the leader's next request, run the same steps, forever. Raises when a
        collective fails (a peer is gone), which ends the rank (Worker.run_follower)."""
        import torch.distributed as dist
        torch = self.torch
        while True:
            header = torch.zeros(3, dtype=torch.long, device=self.device)
            dist.broadcast(header, src=0, group=self.idle_group)
            op, length, max_new = (int(v) for v in header.tolist())
            if op == OP_STOP:
                return
            ids = torch.zeros(length, dtype=torch.long, device=self.device)
            dist.broadcast(ids, src=0, group=self.idle_group)
            self.decode(ids.tolist(), max_new, lambda token: True)

    def check_same_weights(self) -> None:
        """Every rank must hold the same model: the sum of the weights, all-reduced by MAX and MIN, must agree."""
        import torch.distributed as dist
        torch = self.torch
        with torch.inference_mode():
            total = sum(float(p.double().sum().item()) for p in self.model.parameters())
        high = torch.tensor([total], dtype=torch.float64, device=self.device)
        low = high.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        if high.item() != low.item():
            raise WorkerError("the ranks of group %s do not hold the same weights (checksums %r to %r): check that "
                              "every rank loads the same --model" % (self.rank.group, low.item(), high.item()))


# --------------------------------------------------------------------------------------------- main

def join_group(rank: RankInfo, backend: str, timeout: float) -> None:
    import torch.distributed as dist
    if backend == "gloo" and not os.environ.get("GLOO_SOCKET_IFNAME") and rank.master_addr in ("127.0.0.1",
                                                                                              "localhost", "::1"):
        # Gloo otherwise picks the interface of the host name, which in containers often is not the loopback
        # the group was told to meet on.
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    log("rank %d/%d of group %s: joining torch.distributed (%s, env:// %s:%s)"
        % (rank.rank, rank.world_size, rank.group, backend, rank.master_addr, rank.master_port))
    dist.init_process_group(backend=backend, init_method="env://", rank=rank.rank, world_size=rank.world_size,
                            timeout=datetime.timedelta(seconds=timeout))


def idle_group() -> Any:
    """The group the followers wait on for the next request. The default group's timeout (the rendezvous
    timeout) also bounds each collective, which is right for the steps of a request (a rank that stalls that
    long is broken) but not for an idle wait: a group without traffic must not fall apart. So the request
    broadcasts get a group of their own, without a practical timeout."""
    import torch.distributed as dist
    return dist.new_group(timeout=datetime.timedelta(days=3650))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("NPU_MODEL_PATH"),
                        help="model directory for from_pretrained (default: $NPU_MODEL_PATH)")
    parser.add_argument("--make-tiny-model", metavar="DIR",
                        help="write a tiny random-init model and tokenizer to DIR, then exit (no worker)")
    parser.add_argument("--arch", default="llama", choices=["gpt2", "llama"], help="with --make-tiny-model")
    parser.add_argument("--device-kind", default="auto", choices=["auto", "npu", "cuda", "cpu"],
                        help="auto: from the pinning variable (ASCEND_RT_VISIBLE_DEVICES, CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--max-new-tokens-limit", type=int, default=512, help="cap on a request's max_new_tokens")
    parser.add_argument("--threads", type=int, default=4, help="requests accepted at once (they queue for the model)")
    parser.add_argument("--rendezvous-timeout", type=float, default=60.0,
                        help="seconds the group may take to form (keep it below the supervisor's start_timeout)")
    parser.add_argument("--health-interval", type=float, default=None,
                        help="seconds between device health reports (default: the supervisor's heartbeat interval)")
    args = parser.parse_args(argv)

    if args.make_tiny_model:
        make_tiny_model(args.make_tiny_model, arch=args.arch)
        print(args.make_tiny_model)
        return 0

    try:
        worker = Worker(model=os.path.basename(os.path.normpath(args.model or "?")), worker_version=VERSION,
                        max_threads=args.threads)
        if not args.model:
            raise WorkerError("no model: pass --model DIR or set NPU_MODEL_PATH (python3 %s --make-tiny-model DIR "
                              "writes a tiny one)" % sys.argv[0])
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise WorkerError("--model %s is not a model directory (no config.json)" % args.model)
        worker.rank.read_rank_table()  # a rank table given by the supervisor must at least be readable
        worker.connect()  # heartbeats start now: loading and the rendezvous may take a while
        import torch  # noqa: F401 - after connect: importing torch takes seconds
        device, backend = pick_device(args.device_kind, worker.rank)
    except (WorkerError, RankError) as error:
        log(str(error))
        return EX_CONFIG
    rank = worker.rank
    log("rank %d/%d: loading %s on %s" % (rank.rank, rank.world_size, args.model, device))
    try:
        engine = Engine(args.model, device, rank, args.max_new_tokens_limit)
    except Exception as error:  # noqa: BLE001
        if is_device_oom(error):
            worker.device_oom("loading the model: %s" % error)
        log("cannot load the model from %s: %s: %s" % (args.model, type(error).__name__, error))
        worker.exit(EX_CONFIG)
    if rank.distributed:
        try:
            join_group(rank, backend, args.rendezvous_timeout)
            engine.idle_group = idle_group()
            engine.check_same_weights()
        except WorkerError as error:
            log(str(error))
            worker.exit(EX_CONFIG)
        except Exception as error:  # noqa: BLE001 - a rendezvous that times out or a peer that vanished
            log("rank %d: the rendezvous of group %s failed: %s: %s" % (rank.rank, rank.group, type(error).__name__,
                                                                       str(error).splitlines()[0] if str(error) else ""))
            worker.exit(1)
        log("rank %d: group %s complete (%d ranks, backend %s)" % (rank.rank, rank.group, rank.world_size, backend))

    interval = args.health_interval or worker.heartbeat_interval

    def report_health() -> None:
        while True:
            worker.send_health(device_health(device))
            time.sleep(interval)

    threading.Thread(target=report_health, name="device-health", daemon=True).start()

    def handle(request: Request) -> Any:
        body = request.json()
        if not isinstance(body, dict):
            raise RequestFailed(ErrorCode.BAD_REQUEST, "the payload must be a JSON object")
        try:
            if body.get("fault") == "device_oom":
                # A real allocation the device cannot hold: the framework's own out-of-memory error.
                size = body.get("oom_bytes", 1 << 42)
                engine.torch.empty(int(size), dtype=engine.torch.uint8, device=device)
            return engine.generate(request, body, worker)
        except RequestFailed:
            raise
        except Exception as error:  # noqa: BLE001
            if is_device_oom(error):
                worker.device_oom("%s: %s" % (type(error).__name__, error), request)
            if rank.distributed and is_collective_error(error):
                worker.lost_peer(error)  # not answered: the supervisor retries it elsewhere
            raise

    def follow() -> None:
        try:
            engine.follow()
        except Exception as error:  # noqa: BLE001
            if is_device_oom(error):
                worker.device_oom("%s: %s" % (type(error).__name__, error))
            raise

    worker.run_rank(handler=handle, follower_loop=follow)
    return 0


def is_collective_error(error: BaseException) -> bool:
    """Errors of a broken communicator: gloo's "Connection closed by peer", NCCL/HCCL errors, store timeouts."""
    text = str(error)
    return isinstance(error, (RuntimeError, ConnectionError)) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Gloo", "gloo", "NCCL", "HCCL", "Broken pipe",
        "Socket Timeout", "timed out"))


if __name__ == "__main__":
    sys.exit(main())
