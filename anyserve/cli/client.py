"""``anyserve infer`` and ``anyserve registry``: the API server from the shell."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
import typer

ApiUrl = Annotated[str, typer.Option("--api-server", help="API server URL.")]


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
        list[str], typer.Option("--capability", "-c", help="Capability key=value (repeatable).")
    ],
    input: Annotated[
        list[str] | None, typer.Option("--input", "-i", help="Input name=text (repeatable).")
    ] = None,
    stream: Annotated[
        bool, typer.Option(help="Stream the answer (tokens as they arrive).")
    ] = False,
    api: ApiUrl = "http://127.0.0.1:8080",
) -> None:
    """Send one request through the API server and print the outputs."""
    from anyserve import codec
    from anyserve.client import Client
    from anyserve.errors import AnyServeError

    query = _parse_pairs(capability, "--capability")
    inputs = _parse_pairs(input or [], "--input")

    def show(value: Any) -> str:
        return value.decode(errors="replace") if isinstance(value, bytes) else str(value)

    async def main() -> None:
        async with Client(api) as client:
            if stream:
                async for chunk in client.stream(query, inputs):
                    outputs = codec.decode_outputs(chunk)
                    text = outputs.get("text_output")
                    if text is not None and len(outputs) <= 2:
                        typer.echo(show(text), nl=False)
                    else:
                        typer.echo(" ".join(f"{k}={show(v)}" for k, v in outputs.items()))
                typer.echo()
            else:
                response = await client.infer(query, inputs)
                for name, value in codec.decode_outputs(response).items():
                    typer.echo(f"{name}: {show(value)}")

    try:
        anyio.run(main)
    except AnyServeError as exc:
        typer.echo(f"anyserve: {type(exc).__name__} ({exc.http_status}): {exc.message}", err=True)
        raise typer.Exit(1) from None


def registry(api: ApiUrl = "http://127.0.0.1:8080") -> None:
    """Print the API server's registry: replicas, capabilities, workers."""
    from anyserve.client import Client

    async def main() -> dict[str, Any]:
        async with Client(api) as client:
            return await client.registry()

    data = anyio.run(main)
    replicas = data.get("replicas", [])
    if not replicas:
        typer.echo("no replicas registered")
    for rep in replicas:
        typer.echo(
            f"{rep.get('replica_id')}  {rep.get('endpoint')}  in-flight {rep.get('in_flight', 0)}"
        )
        for cap in rep.get("capabilities", []):
            typer.echo(f"    loaded    {','.join(f'{k}={v}' for k, v in cap.items())}")
        for cap in rep.get("loadable", []):
            typer.echo(f"    loadable  {','.join(f'{k}={v}' for k, v in cap.items())}")
        for w in rep.get("workers", []):
            typer.echo(f"    worker {w.get('id')}  pid {w.get('pid')}  {w.get('state')}")
