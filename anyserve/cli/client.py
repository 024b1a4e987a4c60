"""``anyserve infer`` and ``anyserve registry``: the API server from the shell.

Typed inputs: ``-i x=1,2,3,4`` is text (one BYTES element) unless the
capability declares input ``x``: then ``infer`` first asks the API server for
the capability's metadata (``GET /infer/metadata`` with the ``X-Capability-*``
headers) and encodes the values with the declared datatype, shaped as
declared (``-1`` dimensions inferred: the last takes what is left, earlier
ones are 1). ``-i x:FP32[1,4]=1,2,3,4`` types an input explicitly (the shape
may be left out: ``[n]``; it may hold ``-1``). Values are comma-separated;
brackets are ignored, so ``[[1,2],[3,4]]`` is four values; BOOL takes
``true``/``false``/``1``/``0``; a BYTES value is one element.

``--json FILE`` (``-``: stdin) sends a whole KServe v2 JSON request instead:
it is parsed here with the API server's own parser
(:func:`anyserve.codec.request_from_json`, so a malformed document is refused
with the server's message before anything is sent) and goes out like every
other request, as protobuf through :class:`anyserve.client.Client`; its
``model_name`` routes it when no ``--capability`` is given. ``--stream``
works with it too.

A server that cannot be reached, or an error answer, is one line on stderr
and exit code 1 (:func:`anyserve.cli.options.fail`); a usage mistake exit code 2.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from anyserve.cli.options import DEFAULT_API, ApiUrl, Token, run_client

if TYPE_CHECKING:
    from anyserve.proto import ModelInferRequest

# name, then optionally :DATATYPE and [shape]
_TYPED = re.compile(
    r"^(?P<name>[^:\[\]]+)(?::(?P<datatype>[A-Za-z0-9]+)(?:\[(?P<shape>[-0-9, ]*)\])?)?$"
)


@dataclass(frozen=True)
class InputSpec:
    """One ``-i`` option: the input's name, its text, and the datatype and
    shape it was given explicitly (None: not given)."""

    name: str
    text: str
    datatype: str | None = None
    shape: tuple[int, ...] | None = None


def parse_input(item: str) -> InputSpec:
    """``name=text`` or ``name:DATATYPE[d0,d1]=text``; raises typer.BadParameter."""
    key, sep, text = item.partition("=")
    found = _TYPED.match(key.strip())
    if not sep or found is None:
        raise typer.BadParameter(
            f"--input must look like name=value or name:FP32[1,4]=1,2,3,4, got {item!r}"
        )
    datatype = found["datatype"]
    shape: tuple[int, ...] | None = None
    if found["shape"] is not None:
        try:
            shape = tuple(int(d) for d in found["shape"].split(",") if d.strip())
        except ValueError:
            raise typer.BadParameter(f"--input {item!r}: bad shape") from None
    return InputSpec(found["name"].strip(), text, datatype.upper() if datatype else None, shape)


def parse_values(datatype: str, text: str, what: str) -> list[Any]:
    """The values of ``text`` for ``datatype`` (see the module docstring);
    raises typer.BadParameter naming ``what``."""
    if datatype == "BYTES":
        return [text.encode()]
    items = [s.strip() for s in re.sub(r"[\[\]]", " ", text).split(",") if s.strip()]
    try:
        if datatype.startswith("FP"):
            return [float(s) for s in items]
        if datatype == "BOOL":
            flags = {"true": True, "1": True, "false": False, "0": False}
            return [flags[s.lower()] for s in items]
        return [int(s) for s in items]
    except (KeyError, ValueError):
        raise typer.BadParameter(f"{what}: {text!r} is not a list of {datatype} values") from None


def build_request(
    specs: Sequence[InputSpec], declared: Mapping[str, tuple[str, Sequence[int]]]
) -> ModelInferRequest:
    """A request with every input: typed when given explicitly or declared
    (``declared``: name -> (datatype, shape)), else text. Raises typer.BadParameter."""
    from anyserve.codec import DATATYPES, encode_into, pack_raw
    from anyserve.errors import InvalidArgument
    from anyserve.proto import ModelInferRequest
    from anyserve.signature import fit_shape

    request = ModelInferRequest()
    for spec in specs:
        tensor = request.inputs.add()
        datatype, shape = spec.datatype, spec.shape
        if datatype is None and spec.name in declared:
            datatype, declared_shape = declared[spec.name]
            shape = tuple(declared_shape)
        if datatype is None:
            encode_into(tensor, spec.name, spec.text)
            continue
        what = f"input {spec.name!r}"
        if datatype not in DATATYPES:
            raise typer.BadParameter(f"{what}: unknown datatype {datatype!r}")
        values = parse_values(datatype, spec.text, what)
        try:
            pack_raw(datatype, values, what)  # range and type check
            dims = fit_shape(shape if shape is not None else [-1], len(values))
        except (InvalidArgument, ValueError) as exc:
            raise typer.BadParameter(f"{what}: {exc}") from None
        tensor.name, tensor.datatype = spec.name, datatype
        tensor.shape.extend(dims)
        getattr(tensor.contents, DATATYPES[datatype][0]).extend(values)
    return request


def json_request(source: str) -> ModelInferRequest:
    """The KServe v2 JSON request in file ``source`` (``-``: stdin), parsed as
    the API server parses one; raises typer.BadParameter naming the problem."""
    from anyserve.codec import request_from_json
    from anyserve.errors import InvalidArgument

    where = "stdin" if source == "-" else source
    try:
        body = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"--json: cannot read {where}: {exc.strerror or exc}") from None
    try:
        return request_from_json(body)
    except InvalidArgument as exc:
        raise typer.BadParameter(f"--json {where}: {exc.message}") from None


async def declared_inputs(api: str, query: Mapping[str, str]) -> dict[str, tuple[str, list[int]]]:
    """The capability's declared inputs, name -> (datatype, shape), from
    ``GET /infer/metadata``; empty when none are declared or the API server
    cannot say (the request itself then reports what is wrong)."""
    import httpx

    from anyserve.capability import HEADER_PREFIX, Capability

    headers = {HEADER_PREFIX + k.replace("_", "-"): v for k, v in Capability(query).items()}
    try:
        async with httpx.AsyncClient(base_url=api, timeout=30) as http:
            response = await http.get("/infer/metadata", headers=headers)
        if response.status_code != 200:
            return {}
        inputs = response.json().get("inputs", [])
        return {str(t["name"]): (str(t["datatype"]), [int(d) for d in t["shape"]]) for t in inputs}
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _parse_pairs(items: list[str], what: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{what} must look like key=value, got {item!r}")
        pairs[key] = value
    return pairs


def infer(
    capability: Annotated[
        list[str] | None,
        typer.Option("--capability", "-c", help="Capability key=value (repeatable)."),
    ] = None,
    input: Annotated[
        list[str] | None,
        typer.Option(
            "--input",
            "-i",
            help="Input name=value, typed as the capability declares it (else text), or "
            "name:FP32[1,4]=1,2,3,4 (repeatable).",
        ),
    ] = None,
    json_file: Annotated[
        str | None,
        typer.Option(
            "--json",
            metavar="FILE|-",
            help="Send the KServe v2 JSON request in FILE ('-': stdin) instead of --input; "
            "its model_name routes it when no --capability is given.",
        ),
    ] = None,
    stream: Annotated[
        bool, typer.Option(help="Stream the answer (tokens as they arrive).")
    ] = False,
    api: ApiUrl = DEFAULT_API,
) -> None:
    """Send one request through the API server and print the outputs."""
    from anyserve import codec
    from anyserve.client import Client

    query = _parse_pairs(capability or [], "--capability")
    if json_file is not None and input:
        raise typer.BadParameter("give --json or --input, not both")
    specs = [parse_input(item) for item in input or []]
    given = json_request(json_file) if json_file is not None else None
    if not query and (given is None or not given.model_name):
        raise typer.BadParameter(
            "say what to run: --capability key=value, or a model_name in the --json request"
        )

    def show(value: Any) -> str:
        if isinstance(value, bytes):
            return value.decode(errors="replace")
        # numpy arrays: every element (str() would elide the middle of a big one).
        return str(value.tolist()) if hasattr(value, "tolist") else str(value)

    async def main() -> None:
        request = given
        if request is None:
            declared = {}
            if any(spec.datatype is None for spec in specs):
                declared = await declared_inputs(api, query)
            request = build_request(specs, declared)
        async with Client(api) as client:
            if stream:
                async for chunk in client.stream(query, request=request):
                    outputs = codec.decode_outputs(chunk)
                    text = outputs.get("text_output")
                    if text is not None and len(outputs) <= 2:
                        typer.echo(show(text), nl=False)
                    else:
                        typer.echo(" ".join(f"{k}={show(v)}" for k, v in outputs.items()))
                typer.echo()
            else:
                response = await client.infer(query, request=request)
                for name, value in codec.decode_outputs(response).items():
                    typer.echo(f"{name}: {show(value)}")

    run_client(main)


async def fetch_registry(api: str, token: str | None = None) -> dict[str, Any]:
    """The API server's ``GET /registry``; raises the anyserve error (Unavailable
    when it cannot be reached)."""
    from anyserve.client import Client

    async with Client(api, token=token) as client:
        return await client.registry()


def registry(api: ApiUrl = DEFAULT_API, token: Token = None) -> None:
    """Print the API server's registry: replicas, capabilities, workers (with a
    token set on the API server, endpoints and pids only for callers with it)."""
    data = run_client(lambda: fetch_registry(api, token))
    replicas = data.get("replicas", [])
    if not replicas:
        typer.echo("no replicas registered")
    for rep in replicas:
        endpoint = rep.get("endpoint") or "(endpoint hidden: pass --token)"
        typer.echo(f"{rep.get('replica_id')}  {endpoint}  in-flight {rep.get('in_flight', 0)}")
        for cap in rep.get("capabilities", []):
            typer.echo(f"    loaded    {','.join(f'{k}={v}' for k, v in cap.items())}")
        for cap in rep.get("loadable", []):
            typer.echo(f"    loadable  {','.join(f'{k}={v}' for k, v in cap.items())}")
        for w in rep.get("workers", []):
            typer.echo(f"    worker {w.get('id')}  pid {w.get('pid') or '-'}  {w.get('state')}")
