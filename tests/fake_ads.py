"""A fake control plane for the xDS proxy's tests (plaintext gRPC in this process, port 0 read
back), and a client playing Envoy on the proxy's unix socket.

The control plane records every stream (its requests, whether the client ended it) and sends
what a test pushes to a stream; with `serve`, it answers each first request of a type (no nonce)
with the resources given for that type, as a control plane answers Envoy's subscriptions."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
    Resource,
)
from google.protobuf.any_pb2 import Any
from google.protobuf.message import Message

END = object()


def wait_for(condition: Callable[[], object], what: str, timeout: float = 10.0) -> object:
    """Poll `condition` until it holds (returns what it returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"no {what} within {timeout}s")


class Upstream:
    """One stream as the control plane sees it."""

    def __init__(self, delta: bool, metadata: Mapping[str, str | bytes]) -> None:
        self.delta = delta
        self.metadata = metadata
        self.requests: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.received: list[Message] = []
        self.count = 0  # requests received
        self.ended = threading.Event()  # the client ended (cancelled) it
        self._out: queue.Queue[object] = queue.Queue(maxsize=4)  # a push waits for the stream to send

    def push(self, response: Message) -> None:
        while not self.ended.is_set():
            try:
                self._out.put(response, timeout=0.05)
                return
            except queue.Full:
                continue

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.push((code, details))  # type: ignore[arg-type]

    def finish(self) -> None:
        """End the stream cleanly (status OK)."""
        self.push(END)  # type: ignore[arg-type]

    def outgoing(self) -> Iterator[object]:
        """What the test pushed, until the stream ends."""
        while not self.ended.is_set():
            try:
                item = self._out.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is END:
                return
            yield item

    def next_request(self, timeout: float = 10.0) -> Message:
        request = self.requests.get(timeout=timeout)
        return request

    def request_of(self, type_url: str, timeout: float = 10.0) -> Message:
        """The next request of `type_url` (the ones of other types before it are passed over)."""
        deadline = time.monotonic() + timeout
        while True:
            request = self.requests.get(timeout=max(deadline - time.monotonic(), 0.001))
            if request.type_url == type_url:
                return request


def response(delta: bool, type_url: str, version: str, nonce: str, resources: Sequence[tuple[str, Any]]) -> Message:
    """A response of either protocol carrying `resources` (name, packed)."""
    if delta:
        return DeltaDiscoveryResponse(type_url=type_url, system_version_info=version, nonce=nonce,
                                      resources=[Resource(name=name, version=version, resource=packed)
                                                 for name, packed in resources])
    return DiscoveryResponse(type_url=type_url, version_info=version, nonce=nonce,
                             resources=[packed for _, packed in resources])


class FakeAds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, serve: Mapping[str, Sequence[tuple[str, Any]]] | None = None) -> None:
        self.serve = serve or {}
        self.answer: Message | None = None  # sent for every request, which is then not kept (a flood's echo)
        self.streams: list[Upstream] = []
        self.opened = threading.Semaphore(0)
        self._nonces = iter(range(1, 1 << 62))

    def next_stream(self, timeout: float = 10.0) -> Upstream:
        assert self.opened.acquire(timeout=timeout), "no upstream stream opened"
        return self.streams[-1]

    def _pump(self, stream: Upstream, requests: Iterator[Message]) -> None:
        try:
            for request in requests:
                stream.count += 1
                if self.answer is not None:
                    stream.push(self.answer)
                    continue
                stream.received.append(request)
                stream.requests.put(request)
                if request.type_url in self.serve and not request.response_nonce:
                    stream.push(response(stream.delta, request.type_url, "v1", str(next(self._nonces)),
                                         self.serve[request.type_url]))
        except grpc.RpcError:
            pass

    def _stream(self, requests: Iterator[Message], context: grpc.ServicerContext, delta: bool) -> Iterator[Message]:
        stream = Upstream(delta, dict(context.invocation_metadata()))
        context.add_callback(stream.ended.set)
        self.streams.append(stream)
        self.opened.release()
        threading.Thread(target=self._pump, args=(stream, requests), daemon=True).start()
        for item in stream.outgoing():
            if isinstance(item, tuple):
                context.abort(*item)
            yield item  # type: ignore[misc]

    def StreamAggregatedResources(self, request_iterator, context):  # type: ignore[no-untyped-def]
        return self._stream(request_iterator, context, delta=False)

    def DeltaAggregatedResources(self, request_iterator, context):  # type: ignore[no-untyped-def]
        return self._stream(request_iterator, context, delta=True)


def start_fake(servicer: FakeAds) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="fake-ads"))
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


class Envoyish:
    """A gRPC client on the proxy's socket, sending what the test puts and collecting what comes."""

    def __init__(self, socket_path: str, delta: bool, requests: Iterator[Message] | None = None) -> None:
        """`requests`: what the client sends, instead of what the test puts (and then the
        client reads nothing by itself: the test iterates `call`)."""
        self.channel = grpc.insecure_channel(f"unix:{socket_path}")
        self._out: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.responses: queue.SimpleQueue[Message] = queue.SimpleQueue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        method = stub.DeltaAggregatedResources if delta else stub.StreamAggregatedResources
        self.call = method(requests or self._requests())
        self.done = threading.Event()
        if requests is None:
            threading.Thread(target=self._read, daemon=True).start()

    def _requests(self) -> Iterator[Message]:
        while (item := self._out.get()) is not END:
            yield item  # type: ignore[misc]

    def _read(self) -> None:
        try:
            for message in self.call:
                self.responses.put(message)
        except grpc.RpcError:
            pass
        finally:
            self.done.set()

    def send(self, request: DiscoveryRequest | DeltaDiscoveryRequest) -> None:
        self._out.put(request)

    def next_response(self, timeout: float = 10.0) -> Message:
        return self.responses.get(timeout=timeout)

    def status(self, timeout: float = 10.0) -> tuple[grpc.StatusCode, str]:
        """How the stream ended (waits for it)."""
        assert self.done.wait(timeout), "the stream did not end"
        return self.call.code(), self.call.details()

    def close(self) -> None:
        self.call.cancel()
        self._out.put(END)
        self.channel.close()
