"""A real cloud-node behind a proxy that alters what it answers.

The hostile peer in a test is only the node's answer: status, profiles and
probes, and the computation behind every reply, are the real node's. Each
``mode`` is one way a reply can be wrong; "honest" forwards unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from protos import codec
from protos import tandem_pb2 as pb

TENSOR_LIES = ("no outputs", "renamed", "wrong shape", "wrong dtype", "extra output")
STREAM_LIES = ("skipped token", "repeated token", "early length")
LIE_AT = 5  # the token a stream lie starts at
STREAM_TIMEOUT_S = 120.0


class LyingNode:
    SERVICE = "/tandem.v1.CloudNode/"

    def __init__(self, upstream: str) -> None:
        self.mode = "honest"
        limits = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        self._channel = grpc.insecure_channel(upstream, options=limits)  # the link probes send up to 4 MiB
        self._server = grpc.server(ThreadPoolExecutor(8), options=limits)
        self._server.add_generic_rpc_handlers([self])
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def service(self, details: grpc.HandlerCallDetails):
        if not details.method.startswith(self.SERVICE):
            return None
        if details.method.endswith("/Generate"):
            upstream = self._channel.unary_stream(details.method)

            def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
                prompt = len(pb.GenerateRequest.FromString(request).prompt_token_ids)
                return self._altered_stream(upstream(request, timeout=STREAM_TIMEOUT_S), prompt)  # the agent sets none

            return grpc.unary_stream_rpc_method_handler(stream)
        forward = self._channel.unary_unary(details.method)
        tamper = details.method.endswith(("/RunModel", "/RunPartition"))

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            reply = forward(request, timeout=context.time_remaining())
            return self._altered(reply) if tamper and self.mode in TENSOR_LIES else reply

        return grpc.unary_unary_rpc_method_handler(handle)

    def _altered(self, raw: bytes) -> bytes:
        reply = pb.RunReply.FromString(raw)
        logits = codec.decode(reply.outputs[0])
        altered = {
            "no outputs": [],
            "renamed": [codec.encode(logits, "probabilities")],
            "wrong shape": [codec.encode(logits[:, :-1], "logits")],
            "wrong dtype": [codec.encode(logits.astype(np.float64), "logits")],
            "extra output": [reply.outputs[0], codec.encode(logits, "extra")],
        }[self.mode]
        del reply.outputs[:]
        reply.outputs.extend(altered)
        return reply.SerializeToString()

    def _altered_stream(self, chunks: Iterator[bytes], prompt_tokens: int) -> Iterator[bytes]:
        mode = self.mode
        for raw in chunks:
            chunk = pb.GenerateChunk.FromString(raw)
            at = chunk.token.index if chunk.HasField("token") else -1
            if mode == "skipped token" and at == LIE_AT:
                continue
            if mode == "repeated token" and at == LIE_AT:
                yield raw
            if mode == "early length" and at == LIE_AT:
                # counts that add up: only "length" before max_tokens gives it away
                summary = pb.GenerateSummary(finish_reason="length", completion_tokens=LIE_AT, prompt_tokens=prompt_tokens)
                yield pb.GenerateChunk(done=summary).SerializeToString()
                return
            yield raw

    def close(self) -> None:
        self._server.stop(None)
        self._channel.close()
