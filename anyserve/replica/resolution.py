"""Which handler of a replica serves a request (the dispatcher's first step).

The capability query from metadata wins over the request's model name; its
``model_version`` narrows the choice; the endpoint decides the kind
(docs/protocol.md). Handlers never change while a replica runs, so a
resolution is remembered for the next request that asks the same.
"""

from __future__ import annotations

from collections.abc import Mapping

from anyserve import versions
from anyserve.app import HandlerInfo
from anyserve.capability import HEADER_PREFIX as HEADER
from anyserve.capability import Capability, query_from_headers, rank
from anyserve.errors import InvalidArgument, NotFound
from anyserve.sequence import SequenceFlags, peek_request

# Resolutions remembered; bounded because queries come from the network.
_REMEMBERED = 4096
_PREFIX = len(HEADER)


class StreamOnly(NotFound):
    """A unary request that only a streaming handler here matches. Another
    replica may still serve it unary; when none does, the client's mistake is
    the endpoint (the dispatcher then answers InvalidArgument)."""


class UnknownVersion(NotFound):
    """A model served here, but not in the version asked for. Another replica
    may serve that version; when none does, this answer (in Triton's words)
    tells the client more than the delegation's "not found"."""


class Resolver:
    """Resolves requests to the ``handlers`` of one replica."""

    def __init__(self, handlers: list[HandlerInfo]) -> None:
        self.handlers = handlers
        self._resolved: dict[tuple[tuple[tuple[str, str], ...], str, str, bool], HandlerInfo] = {}

    def resolve(
        self, query: Mapping[str, str], model_name: str, *, stream: bool, version: str = ""
    ) -> HandlerInfo:
        """The handler for a request, or NotFound saying why there is none
        (in Triton's words when a model name or version is unknown).

        Capability headers win over the model name; ``version`` keeps the
        handlers of that model version only. Of several matches the best
        :func:`~anyserve.capability.rank` wins, then the latest version (of
        equal ones, the first handler). Stream requests prefer stream handlers
        and fall back to unary ones; a unary request that only a stream
        handler matches is told to use the streaming endpoint (StreamOnly).
        """
        if query:
            wanted = str(Capability(query))
        elif model_name:
            wanted = f"model {model_name!r}"
        else:
            raise InvalidArgument("no capability metadata (x-capability-*) and no model_name")
        # Of equal ranks, the latest version first.
        scored = [
            ((found, _latest_first(h.version)), h)
            for h in self.handlers
            if (found := rank(h.capability, query, model_name)) is not None
        ]
        if scored and version:
            name = model_name or scored[0][1].capability.name
            scored = [(score, h) for score, h in scored if h.version == version]
            if not scored:
                detail = f"this replica serves {wanted} in other versions only"
                raise UnknownVersion(versions.unknown_model(name, version, detail))
        if not scored:
            detail = f"no handler for {wanted} on this replica"
            if not query:
                detail = versions.unknown_model(model_name, "", detail)
            raise NotFound(detail)
        kinds = [True, False] if stream else [False]
        for kind in kinds:
            of_kind = [(score, h) for score, h in scored if h.stream is kind]
            if of_kind:
                return min(of_kind, key=lambda item: item[0])[1]
        raise StreamOnly(
            f"{wanted} is served by a streaming handler only: send it to the streaming"
            " endpoint (/infer/stream, /v2/models/{name}/generate_stream or gRPC"
            " ModelStreamInfer)"
        )

    def route(
        self, payload: bytes, metadata: Mapping[str, str], *, stream: bool
    ) -> tuple[HandlerInfo, SequenceFlags | None]:
        """The handler for a serialized request and the sequence it belongs
        to (or None). Raises as :meth:`resolve`, and InvalidArgument as
        :func:`~anyserve.sequence.peek_request`."""
        # The capability pairs as they came (what query_from_headers reads) key
        # the resolution: the query is built only for one not remembered.
        pairs = tuple([item for item in metadata.items() if item[0][:_PREFIX].lower() == HEADER])
        model_name, version, seq = peek_request(payload)
        if pairs:  # capability headers win over the model name
            model_name = ""
        key = (pairs, model_name, version, stream)
        handler = self._resolved.get(key)
        if handler is None:
            query = query_from_headers(pairs)
            handler = self.resolve(query, model_name, stream=stream, version=version)
            if len(self._resolved) >= _REMEMBERED:
                self._resolved.clear()
            self._resolved[key] = handler
        return handler, seq


def _latest_first(version: str) -> tuple[int, int, str]:
    """Sort key putting the latest version first (numbers, highest first)."""
    group, number, text = versions.order(version)
    return (-group, -number, text)
