"""CloudNode gRPC service: runs model suffixes and whole models for agents."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import psutil

from protos import codec
from protos import tandem_pb2 as pb
from protos import tandem_pb2_grpc as pb_grpc
from runtimes.admission import Admission
from runtimes.model_store import ModelStore
from runtimes.profiler import load_or_measure
from runtimes.rpc import ModelMismatch, abort_for

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_PROBE_BYTES = 16 * 1024 * 1024


class CloudNodeService(pb_grpc.CloudNodeServicer):
    def __init__(self, store: ModelStore, *, node_id: str, max_concurrency: int, max_queue: int, profile_dir: Path | None) -> None:
        self.store = store
        self.node_id = node_id
        self.profile_dir = profile_dir
        self.admission = Admission(max_concurrency=max_concurrency, max_queue=max_queue)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="cloud-compute")
        psutil.cpu_percent()  # first call primes the counter

    def load(self) -> pb.NodeLoad:
        return pb.NodeLoad(
            in_flight=self.admission.in_flight,
            queued=self.admission.queued,
            max_concurrency=self.admission.max_concurrency,
            max_queue=self.admission.max_queue,
            queue_delay_ms=self.admission.queue_delay_ms,
            cpu_percent=psutil.cpu_percent(),
        )

    async def _compute(self, context: grpc.aio.ServicerContext, model_name: str, digest: str, tensors, reply_encoding: int,
                       run: Callable[[object, dict[str, np.ndarray]], dict[str, np.ndarray]]) -> pb.RunReply:
        """Decode, admit, run in a worker thread, encode; every failure becomes a status."""
        try:
            model = self.store.get(model_name)
            if digest and digest != model.digest:
                raise ModelMismatch(
                    f"model {model_name}: caller has digest {digest[:12]}…, this node has {model.digest[:12]}…"
                )
            start = time.perf_counter()
            feeds = {t.name: codec.decode(t) for t in tensors}
            decode_ms = (time.perf_counter() - start) * 1e3
            async with self.admission.slot() as waited_ms:
                start = time.perf_counter()
                outputs = await asyncio.get_running_loop().run_in_executor(self._pool, run, model, feeds)
                compute_ms = (time.perf_counter() - start) * 1e3
            start = time.perf_counter()
            encoded = [codec.encode(array, name, reply_encoding) for name, array in outputs.items()]
            encode_ms = (time.perf_counter() - start) * 1e3
        except Exception as exc:  # noqa: BLE001 -- mapped to a status, server stays up
            await abort_for(context, exc)
        return pb.RunReply(
            outputs=encoded, compute_ms=compute_ms, queue_ms=waited_ms, decode_ms=decode_ms,
            encode_ms=encode_ms, load=self.load(), node_id=self.node_id,
        )

    async def RunPartition(self, request: pb.PartitionRequest, context: grpc.aio.ServicerContext) -> pb.RunReply:
        def run(model, feeds):
            cut = model.find_cut(list(request.cut))
            return model.run_suffix(cut, feeds)

        return await self._compute(context, request.model, request.model_digest, request.tensors, request.reply_encoding, run)

    async def RunModel(self, request: pb.ModelRequest, context: grpc.aio.ServicerContext) -> pb.RunReply:
        def run(model, feeds):
            model.check_inputs(feeds)
            return model.run(feeds)

        return await self._compute(context, request.model, request.model_digest, request.inputs, request.reply_encoding, run)

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.NodeStatus:
        return pb.NodeStatus(node_id=self.node_id, models=self.store.model_infos(), load=self.load())

    async def GetProfile(self, request: pb.ProfileRequest, context: grpc.aio.ServicerContext) -> pb.ModelProfileMsg:
        try:
            model = self.store.get(request.model)
            profile = await asyncio.get_running_loop().run_in_executor(
                self._pool, lambda: load_or_measure(model, cache_dir=self.profile_dir)
            )
        except Exception as exc:  # noqa: BLE001
            await abort_for(context, exc)
        return pb.ModelProfileMsg(
            model=profile.model, digest=profile.digest, segment_ms=profile.segment_ms,
            run_overhead_ms=profile.run_overhead_ms, json=profile.to_json(),
        )

    async def Probe(self, request: pb.ProbeRequest, context: grpc.aio.ServicerContext) -> pb.ProbeReply:
        size = max(0, min(request.reply_bytes, MAX_PROBE_BYTES))
        return pb.ProbeReply(payload=bytes(size))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
