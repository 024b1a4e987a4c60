"""The worker process: imports the user's app and runs one handler's calls.

Started by the replica's manager as ``python -m anyserve.replica.worker``, or
forked with the same options by the replica's fork server
(:mod:`anyserve.replica.forkserver`, which has imported this module but no
app, and never the gRPC-holding replica itself). It gets one end of a Unix
socketpair from the manager, says Hello on it, then serves Call frames
concurrently until the connection closes — so a worker never outlives its replica.

Around each call the worker applies the declared signature (:mod:`anyserve.signature`):
``check_request`` before the handler runs, then (unary calls) the requested
``outputs`` and, with ``ANYSERVE_CHECK_OUTPUTS=1`` in its environment (test
suites), ``check_response``. Batched handlers' calls go through a
:class:`~anyserve.replica.batching.Batcher`, each with its own Context and answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import traceback
from typing import Any

import anyio

from anyserve import codec, logs, memory, rpc, shm_tensors, tracing_servers, wire
from anyserve._proto import worker_pb2 as wpb
from anyserve.app import Handler, load_app
from anyserve.call_tasks import CallTasks
from anyserve.calls import ApiCaller
from anyserve.context import Caller, Context, StreamClosed
from anyserve.errors import AnyServeError, InvalidArgument, to_frame
from anyserve.handlers import Emit
from anyserve.objects import ObjectStore
from anyserve.objects.peers import OBJECT_SOURCE_ENV
from anyserve.proto import InferParameter, ModelInferRequest
from anyserve.replica.batching import Batcher, handler_batcher, handler_error
from anyserve.replica.worker_call import WorkerCall
from anyserve.sequence import SequenceStates
from anyserve.signature import check_request, check_response, select_outputs
from anyserve.sync_pool import SyncPool, call_limiter

log = logging.getLogger("anyserve.worker")

# Exit code when the app cannot be imported or the handler is unknown.
EXIT_BAD_APP = 3
# Names the handler a worker process serves.
HANDLER_ENV = "ANYSERVE_HANDLER"
# "1" in a worker's environment: check every response against the handler's
# declared outputs (a contract check for test suites; off in production).
CHECK_OUTPUTS_ENV = "ANYSERVE_CHECK_OUTPUTS"
# The context of a call with no inputs to attach (reentrant: one will do).
_NOTHING = contextlib.nullcontext()


class WorkerServer:
    """Serves one handler's calls arriving on one dispatcher connection."""

    def __init__(
        self,
        handler: Handler,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        replica_id: str = "",
        store: ObjectStore | None = None,
        caller: Caller | None = None,
        max_frame: int = wire.DEFAULT_MAX_FRAME,
        check_outputs: bool = False,
    ) -> None:
        self.handler = handler
        self.reader = reader
        self.writer = writer
        self.replica_id = replica_id
        self.store = store
        self.caller = caller
        self.max_frame = max_frame
        self.limiter = call_limiter(handler.is_sync, handler.info.max_concurrency)
        self.calls: dict[int, WorkerCall] = {}
        # The calls' tasks, and the frames they answer with (written together
        # once per loop iteration); a failure in either stops serve().
        self._serving: anyio.CancelScope | None = None
        self._tasks = CallTasks(on_error=self._stop)
        self._frames = wire.FrameQueue(writer, on_error=self._tasks.fail)
        self.check_outputs = check_outputs
        self._served_by = InferParameter(string_param=replica_id)
        self.batcher: Batcher[tuple[ModelInferRequest, Context]] | None = handler_batcher(handler)
        self.sequences = SequenceStates()  # state of sequences pinned here (replica/sequences.py)

    async def serve(self) -> None:
        """Read frames until the dispatcher closes the connection."""
        async with anyio.create_task_group() as tg:
            self._serving = tg.cancel_scope
            if self.batcher is not None:
                tg.start_soon(self.batcher.serve)
            if isinstance(self.limiter, SyncPool):
                tg.start_soon(self.limiter.serve)  # the sync handler's threads
            try:
                await self._read_frames()
            finally:
                # The replica is gone (or the worker stops): nobody can
                # receive results any more.
                for call_id in list(self.calls):
                    self._cancel(call_id)
                tg.cancel_scope.cancel()
                await self._tasks.wait()
                self._frames.flush()
        self._tasks.raise_errors()

    def _stop(self) -> None:
        if self._serving is not None:
            self._serving.cancel()

    async def _read_frames(self) -> None:
        frames = wire.FrameBuffer(self.max_frame)
        while True:
            try:
                batch = await wire.read_frames(self.reader, frames)
            except wire.ConnectionClosed:
                return
            for header, payload in batch:
                self._on_frame(header, payload)

    def _on_frame(self, header: wpb.Header, payload: bytes) -> None:
        kind = header.WhichOneof("kind")
        if kind == "call":
            state = self.calls[header.call_id] = WorkerCall(header.call_id)
            self._tasks.start(self._run(state, header.call, payload))
        elif kind == "cancel":
            self._cancel_requested(header.call_id)
        elif kind == "credit":
            call = self.calls.get(header.call_id)
            if call is not None:
                call.grant(header.credit.chunks)
        else:
            log.warning("ignoring unexpected %s frame from the dispatcher", kind)

    def _cancel_requested(self, call_id: int) -> None:
        """The dispatcher cancelled a call. It is told when the call has really
        ended (a Cancel frame back): at once when it already had, else when its
        task ends — a sync handler's thread cannot be stopped, so only then.
        The replica recycles a worker whose cancelled call goes on too long
        (see :mod:`anyserve.replica.recycling`)."""
        call = self.calls.get(call_id)
        if call is None:
            self._confirm_cancel(call_id)
            return
        call.confirm = True
        self._cancel(call_id)

    def _confirm_cancel(self, call_id: int) -> None:
        self._frames.write(wpb.Header(call_id=call_id, cancel=wpb.Cancel()))

    def _cancel(self, call_id: int) -> None:
        call = self.calls.get(call_id)
        if call is not None:
            # The flag makes a sync handler's next stream.send() raise; the
            # scope cancels an async handler at its next await (or a request
            # waiting for its batch, which leaves it); a send waiting for
            # credit wakes up and sees the cancel.
            if call.context is not None:
                call.context.cancelled = True
            call.scope.cancel()
            call.wake()

    def _send(self, header: wpb.Header, payload: bytes = b"") -> None:
        # An answer too large to pass on fails its call (PayloadTooLarge), not the worker.
        wire.check_answer(payload, self.max_frame)
        self._frames.write(header, payload)

    async def _run(self, state: WorkerCall, call: wpb.Call, payload: bytes) -> None:
        try:
            if not state.scope.cancel_called:  # else the caller went away already
                await self._serve_call(state, call, payload)
        finally:
            del self.calls[state.call_id]
            if state.confirm:
                self._confirm_cancel(state.call_id)

    async def _serve_call(self, state: WorkerCall, call: wpb.Call, payload: bytes) -> None:
        call_id, info = state.call_id, self.handler.info
        try:
            request = ModelInferRequest.FromString(payload)
            check_request(info.inputs, request)
            shared = shm_tensors.input_buffers(request, info.zero_copy)  # mapped shm inputs
        except AnyServeError as exc:
            self._error(call_id, exc)  # never reaches the handler (nor a batch)
            return
        except Exception as exc:  # protobuf raises DecodeError, a plain Exception
            self._error(call_id, InvalidArgument(f"malformed ModelInferRequest: {exc}"))
            return
        fields = call.metadata  # dict(fields) would take the Mapping ABC's slower methods
        metadata = {key: fields[key] for key in fields}
        # Most requests carry no parameters, so no sequence to look for.
        sequence = self.sequences.open(request.parameters) if request.parameters else None
        context = state.context = Context(
            request_id=metadata.get(rpc.REQUEST_ID) or request.id,
            metadata=metadata,
            capability=info.capability,
            limiter=self.limiter,
            is_sync=self.handler.is_sync,
            timeout=call.timeout,
            store=self.store,
            caller=self.caller,
            replica_id=self.replica_id,
            sequence=sequence,
        )
        results: list[Any] = []

        async def emit_unary(value: Any) -> None:
            if results:
                raise RuntimeError("a unary handler must produce exactly one response")
            results.append(value)

        emit = self._emit_stream(call_id, request, context, state) if call.stream else emit_unary
        # Inputs in shared memory are attached for decoding; most calls have none.
        attached = _NOTHING if shared is None else codec.attached_inputs(request, shared)
        tokens = context.bind()
        try:
            with state.scope, attached:
                if self.batcher is not None and not call.stream:
                    deadline = anyio.current_time() + call.timeout if call.timeout > 0 else math.inf
                    results.append(await self.batcher.submit((request, context), deadline))
                else:
                    await self.handler.run(request, context, emit)
            if state.scope.cancelled_caught:
                return  # the dispatcher already answered the caller
            if call.stream:
                self._send(state.end())
            else:
                if not results:
                    raise RuntimeError("the handler produced no response")
                body = self._response(results[0], request)
                self._send(state.end(), body)
            await self._frames.drain()
        except StreamClosed:
            pass  # the caller went away (cancel or lost replica): nobody to answer
        except AnyServeError as exc:
            self._error(call_id, exc)
        except Exception as exc:
            log.warning(
                "handler %s raised on request %s:\n%s",
                info.name,
                context.request_id,
                "".join(traceback.format_exception(exc)),
            )
            self._error(call_id, handler_error(exc))
        finally:
            Context.unbind(tokens)
            self.sequences.close(sequence)

    def _emit_stream(
        self, call_id: int, request: ModelInferRequest, context: Context, state: WorkerCall
    ) -> Emit:
        """A stream call's ``emit``: each chunk a frame, sent at once, within its credit."""
        raw = len(request.raw_input_contents) > 0
        first = True

        async def emit_stream(chunk: Any) -> None:
            nonlocal first
            if context.cancelled:
                raise StreamClosed("the caller has gone")
            await state.spend()
            if context.cancelled:
                raise StreamClosed("the caller has gone")
            response = codec.to_stream_response(chunk, request)
            if response.HasField("infer_response"):
                if raw:
                    codec.use_raw_outputs(response.infer_response)
                if first and self.replica_id:
                    response.infer_response.parameters[rpc.SERVED_BY].CopyFrom(self._served_by)
                first = False
            self._send(wpb.Header(call_id=call_id, chunk=wpb.Chunk()), response.SerializeToString())
            # Out now, not at the end of the loop iteration: a handler may
            # compute its next chunk without giving the loop back.
            self._frames.flush()
            await self._frames.drain()

        return emit_stream

    def _response(self, result: Any, request: ModelInferRequest) -> bytes:
        """One unary response: encoded, checked (checked mode), the requested
        outputs selected, raw when the request was, stamped. An exception in a
        batched handler's results (failing that request alone) is raised."""
        if isinstance(result, Exception):
            raise result
        divert = shm_tensors.output_diverter(request)  # big numpy outputs: to their segments
        response = codec.to_infer_response(result, request, divert=divert)
        if self.check_outputs:
            check_response(self.handler.info.outputs, response)
        select_outputs(request, response)
        if request.raw_input_contents:
            codec.use_raw_outputs(response)
        shm_tensors.place_outputs(request, response)
        if self.replica_id:
            response.parameters[rpc.SERVED_BY].CopyFrom(self._served_by)
        return response.SerializeToString()

    def _error(self, call_id: int, exc: AnyServeError) -> None:
        header = wpb.Header(call_id=call_id, error=to_frame(exc))
        state = self.calls.get(call_id)
        self._send(header if state is None else state.report(header))


async def _serve(args: argparse.Namespace, handler: Handler) -> None:
    store = None
    if args.object_store:
        # The same TTL and size limit as the replica's sweeper uses.
        store = ObjectStore(
            args.object_store, ttl=args.object_ttl, max_object_size=args.object_max_size
        )
    caller: ApiCaller | None = None
    if args.api_server:
        token, own = os.environ.get("ANYSERVE_TOKEN"), os.environ.get(OBJECT_SOURCE_ENV)
        caller = ApiCaller(args.api_server, token=token, object_source=own, store=store)
    sock = socket.socket(fileno=args.fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=2**20)
    hello = wpb.Hello(worker_id=args.worker_id, pid=os.getpid(), handler=handler.info.name)
    wire.write_frame(writer, wpb.Header(hello=hello))
    await writer.drain()
    server = WorkerServer(
        handler,
        reader,
        writer,
        replica_id=args.replica_id,
        store=store,
        caller=caller,
        max_frame=args.max_frame,
        check_outputs=os.environ.get(CHECK_OUTPUTS_ENV) == "1",
    )
    try:
        await server.serve()
    finally:
        writer.close()
        if caller is not None:
            await caller.aclose()


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m anyserve.replica.worker``."""
    parser = argparse.ArgumentParser(prog="anyserve.replica.worker")
    parser.add_argument("--app", required=True)
    parser.add_argument("--app-dir", default=None)
    parser.add_argument("--handler", required=True)
    parser.add_argument("--fd", type=int, help="inherited Unix socket to the dispatcher")
    parser.add_argument("--worker-id", default="")
    parser.add_argument("--replica-id", default="")
    parser.add_argument("--object-store", default=None)
    parser.add_argument("--object-ttl", type=float, default=3600.0)
    parser.add_argument("--object-max-size", type=int, default=None)
    parser.add_argument("--api-server", default=None)
    parser.add_argument("--max-frame", type=int, default=wire.DEFAULT_MAX_FRAME)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if os.environ.get(logs.ENV_FORMAT) == "json":  # --log-format json, from the replica
        logs.set_worker(args.worker_id or "-")
        logs.configure(args.log_level.upper(), "json")
    else:
        fmt = f"%(asctime)s %(levelname)s worker {args.worker_id or '-'} %(name)s: %(message)s"
        logging.basicConfig(level=args.log_level.upper(), format=fmt)
    memory.return_big_blocks()  # a handler's tensors come and go: keep the RSS flat
    memory.skip_httpx_cli()  # context.call's client, without httpx's command line
    logs.name_process(args.worker_id or f"anyserve {args.handler}")
    # One line per context.call's discovery request is noise for an operator.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Ctrl-C in a terminal reaches the whole process group; the replica decides
    # when workers stop (after draining), so the worker ignores SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Set before the app is imported, so module-level code can load only what
    # this worker's handler needs (documented in the README).
    os.environ[HANDLER_ENV] = args.handler
    try:
        handler = load_app(args.app, args.app_dir).handler(args.handler)
    except Exception:
        traceback.print_exc()
        sys.exit(EXIT_BAD_APP)
    handler = tracing_servers.worker_handler(handler)  # after the app's import: see there
    anyio.run(_serve, args, handler, backend_options=event_loop_options())


def event_loop_options() -> dict[str, Any]:
    """anyio backend options: uvloop when it is installed (the ``fast`` extra)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


if __name__ == "__main__":
    main()
