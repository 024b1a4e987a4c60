"""Every code block of README.md runs as the README shows it, so the README cannot
go stale.

The convention: an HTML comment on the last non-blank line before a fenced block
says how the block runs (it is invisible on GitHub)::

    <!-- readme-test: skip (why) -->     not run; the reason is required
    <!-- readme-test: server -->         one `anyserve run ...` command (below)
    <!-- readme-test: module NAME.py --> a module that defines `app`
    <!-- readme-test: excerpt PATH -->   a verbatim excerpt of the repository file PATH
    <!-- readme-test: pytest -->         a test file for pytest and the anyserve plugin

and a block without one runs as it is:

* ```python blocks run in a fresh interpreter (``python block.py``, from the
  repository root);
* ```bash blocks run one command at a time with ``bash -c`` (continuation
  lines kept), from the repository root, and must exit 0;
* ```text blocks are not code (diagrams); a block in any other language, or
  with a directive this test does not know, fails the test until it gets one.

Servers. Each ``server`` block is started once, all of them at the same time,
exactly as written plus ``--port 0 --grpc-port 0`` (free ports, read back from
what ``anyserve run`` prints), and stopped with SIGINT (Ctrl-C) at the end.
Plain blocks run against the last ``server`` block above them: ``localhost:8080``
and ``localhost:8081`` become that server's HTTP and gRPC addresses, and
``anyserve infer|registry|workers ...`` commands get ``--api-server <its URL>``
(its ports being random). A bash block, or a python block that names
``localhost:8080``/``8081``, with no server above it is an error.

Expected output. A ``# -> TEXT`` comment (a line of its own, or at the end of
a line) states output that must appear: in a bash block, that of the command
above it; in a python block, that of the whole block. ``...`` in TEXT stands
for anything: the pieces between must appear in that order.

The other directives: ``module`` writes the block to NAME.py in a scratch
directory and loads it with ``anyserve.app.load_app`` in a fresh interpreter
(it must import and declare at least one handler). ``excerpt`` checks the block
appears verbatim in PATH (which the ``server`` blocks then run). ``pytest``
writes the block to a scratch directory and runs pytest on it with the
repository as ``--rootdir`` (so app specs resolve as from a clone's root, and
the plugin comes from the installed package's entry point).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BIN = Path(sys.executable).parent

FENCE = re.compile(r"^```(\S*)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*(\w+)\s*(.*?)\s*-->$")
EXPECTED = re.compile(r"(?:^|\s)# -> (.*?)\s*$")
CLI = re.compile(r"\banyserve (?:infer|registry|workers \w+)\b")
READY = "press Ctrl-C to stop"
ENDPOINTS = re.compile(r"API server\s+HTTP (http://\S+)\s+gRPC (\S+)")

COMMAND_TIMEOUT = 60.0
START_TIMEOUT = 60.0


@dataclass
class Block:
    """One fenced block of the README and how it runs."""

    line: int  # the opening fence's line (1-based)
    lang: str
    code: str
    directive: str = ""  # "" (run as it is), skip, server, module, excerpt, pytest
    argument: str = ""  # the reason, file name or path after the directive
    server: int | None = None  # line of the last `server` block above
    problems: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"README.md:{self.line}"

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang or 'plain'}-{self.directive or 'run'}"


def needs_server(block: Block) -> bool:
    if block.directive:
        return False
    return block.lang == "bash" or (
        block.lang == "python" and bool(re.search(r"localhost:808[01]", block.code))
    )


def check(block: Block) -> None:
    """Record in ``block.problems`` why it cannot run (if it cannot)."""
    kind, arg = block.directive, block.argument
    if kind == "skip":
        if not re.fullmatch(r"\(.*\S.*\)", arg):
            block.problems.append("`skip` needs a reason: <!-- readme-test: skip (why) -->")
    elif kind == "server":
        commands = [c for c, _ in commands_of(block.code)]
        if (
            block.lang != "bash"
            or len(commands) != 1
            or not commands[0].startswith(".venv/bin/anyserve run ")
        ):
            block.problems.append("a `server` block is one `.venv/bin/anyserve run ...` command")
    elif kind == "module":
        if block.lang != "python" or not re.fullmatch(r"\w+\.py", arg):
            block.problems.append("`module NAME.py` goes on a python block")
    elif kind == "excerpt":
        if not arg or not (REPO / arg).is_file():
            block.problems.append(f"`excerpt` names no file of the repository: {arg!r}")
    elif kind == "pytest":
        if block.lang != "python":
            block.problems.append("`pytest` goes on a python block")
    elif kind:
        block.problems.append(f"unknown directive {kind!r}")
    elif block.lang not in ("python", "bash", "text"):
        block.problems.append(
            f"a ```{block.lang} block has no way to run: say how, or "
            "<!-- readme-test: skip (why) -->"
        )
    if kind == "pytest" and arg:
        block.problems.append("`pytest` takes no argument")
    if needs_server(block) and block.server is None:
        block.problems.append("runs against a server, but no `server` block is above it")


def parse(text: str) -> tuple[list[Block], list[str]]:
    """The README's fenced blocks, and the problems outside any block (a
    directive nothing follows, a malformed directive, an unclosed fence)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    server: int | None = None
    pending: tuple[int, str, str] | None = None  # line, directive, argument
    i = 0
    while i < len(lines):
        line = lines[i]
        opening = FENCE.match(line)
        if line.lstrip().startswith("<!--") and "readme-test" in line:
            found = DIRECTIVE.match(line.strip())
            if found is None:
                problems.append(f"README.md:{i + 1}: malformed directive {line.strip()!r}")
            else:
                if pending is not None:
                    problems.append(f"README.md:{pending[0]}: directive without a block")
                pending = (i + 1, found[1], found[2])
        elif opening is not None:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                problems.append(f"README.md:{i + 1}: fence never closed")
                break
            block = Block(i + 1, opening[1], "\n".join(lines[i + 1 : end]) + "\n")
            if pending is not None:
                block.directive, block.argument = pending[1], pending[2]
                pending = None
            block.server = server
            if block.directive == "server":
                server = block.line
            check(block)
            blocks.append(block)
            i = end
        elif line.strip() and pending is not None:
            problems.append(f"README.md:{pending[0]}: directive not right before a block")
            pending = None
        i += 1
    if pending is not None:
        problems.append(f"README.md:{pending[0]}: directive without a block")
    return blocks, problems


def commands_of(code: str) -> list[tuple[str, list[str]]]:
    """A bash block's commands (continuation lines kept, comment lines dropped),
    each with the ``# ->`` expectations that follow or end it."""
    commands: list[tuple[str, list[str]]] = []
    current: list[str] = []
    for line in code.splitlines():
        stripped = line.strip()
        if current:
            current.append(line)
            if not stripped.endswith("\\"):
                commands.append(("\n".join(current), []))
                current = []
            continue
        if not stripped:
            continue
        if stripped.startswith("#"):
            found = EXPECTED.search(stripped)
            if found is not None and commands:
                commands[-1][1].append(found[1])
            continue
        if stripped.endswith("\\"):
            current = [line]
        else:
            commands.append((line, []))
    if current:
        commands.append(("\n".join(current), []))
    for command, expected in commands:
        trailing = EXPECTED.search(command.splitlines()[-1])
        if trailing is not None:
            expected.insert(0, trailing[1])
    return commands


def assert_shows(output: str, expected: str, what: str) -> None:
    """``expected``'s pieces (split at ``...``) appear in ``output`` in order."""
    position = 0
    for piece in expected.split("..."):
        if not piece:
            continue
        found = output.find(piece, position)
        assert found >= 0, (
            f"{what}: the README says the output shows {expected!r}, but {piece!r} "
            f"is not in it:\n{output}"
        )
        position = found + len(piece)


BLOCKS, OUTSIDE_PROBLEMS = parse(README.read_text())


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    """An ``anyserve run`` started from a ``server`` block."""

    block: Block
    process: subprocess.Popen[bytes]
    log: Path
    url: str = ""
    grpc: str = ""
    error: str = ""

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def rewrite(self, text: str) -> str:
        """``text`` aimed at this server: its ports, and ``--api-server`` for the CLI."""
        text = text.replace("localhost:8080", self.url.removeprefix("http://"))
        text = text.replace("localhost:8081", self.grpc)
        if "--api-server" not in text:
            text = CLI.sub(lambda m: f"{m[0]} --api-server {self.url}", text)
        return rewrite_bin(text)


def rewrite_bin(text: str) -> str:
    """``.venv/bin/`` is where this interpreter's scripts are (a clone's .venv, or CI's)."""
    return re.sub(r"(?<![\w/.-])\.venv/bin/", f"{BIN}/", text)


def start(block: Block, logs: Path) -> Server:
    argv = shlex.split(rewrite_bin(commands_of(block.code)[0][0]), comments=True)
    log = logs / f"server-{block.line}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*argv, "--port", "0", "--grpc-port", "0"],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Server(block, process, log)


def wait_ready(server: Server, deadline: float) -> None:
    while time.monotonic() < deadline:
        output = server.output()
        if READY in output and (found := ENDPOINTS.search(output)):
            server.url, server.grpc = found[1], found[2]
            return
        if server.process.poll() is not None:
            server.error = f"exited with {server.process.returncode}"
            return
        time.sleep(0.05)
    server.error = f"not ready after {START_TIMEOUT:.0f} s"


def stop(servers: list[Server]) -> None:
    for server in servers:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGINT)  # Ctrl-C
    for server in servers:
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="module")
def readme_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Server]]:
    """Every ``server`` block's system, started at once, by the block's line."""
    logs = tmp_path_factory.mktemp("readme-servers")
    blocks = [b for b in BLOCKS if b.directive == "server" and not b.problems]
    servers: list[Server] = []
    try:
        for block in blocks:
            servers.append(start(block, logs))
        deadline = time.monotonic() + START_TIMEOUT
        for server in servers:
            wait_ready(server, deadline)
        yield {server.block.line: server for server in servers}
    finally:
        stop(servers)


def server_for(block: Block, request: pytest.FixtureRequest) -> Server:
    assert block.server is not None
    servers: dict[int, Server] = request.getfixturevalue("readme_servers")
    server = servers.get(block.server)
    assert server is not None, (
        f"{block.where}: the server block of README.md:{block.server} is broken"
    )
    assert not server.error, (
        f"{block.where}: the server of README.md:{block.server} {server.error}:\n" + server.output()
    )
    return server


# --------------------------------------------------------------------------- running


def run(argv: list[str], cwd: Path, timeout: float = COMMAND_TIMEOUT) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    done = subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout + done.stderr


def run_bash(block: Block, server: Server) -> None:
    commands = commands_of(block.code)
    assert commands, f"{block.where}: a bash block without commands"
    for command, expected in commands:
        if command.lstrip().startswith("curl ") and shutil.which("curl") is None:
            pytest.skip("curl is not installed")
        code, output = run(["bash", "-c", server.rewrite(command)], REPO)
        assert code == 0, f"{block.where}: `{command}` exited with {code}:\n{output}"
        for text in expected:
            assert_shows(output, text, f"{block.where}: `{command}`")


def run_python(block: Block, scratch: Path, server: Server | None) -> None:
    code = server.rewrite(block.code) if server else block.code
    script = scratch / f"readme_{block.line}.py"
    script.write_text(code)
    status, output = run([sys.executable, str(script)], REPO)
    assert status == 0, f"{block.where}: the python block failed:\n{output}"
    for line in block.code.splitlines():
        if (found := EXPECTED.search(line)) is not None:
            assert_shows(output, found[1], block.where)


def run_module(block: Block, scratch: Path) -> None:
    (scratch / block.argument).write_text(block.code)
    spec = block.argument.removesuffix(".py") + ":app"
    load = (
        "import sys\nfrom anyserve.app import load_app\n"
        "app = load_app(sys.argv[1], sys.argv[2])\n"
        "assert app.handlers, 'the app declares no handler'\n"
        "print(len(app.handlers), 'handlers')\n"
    )
    status, output = run([sys.executable, "-c", load, spec, str(scratch)], scratch)
    assert status == 0, f"{block.where}: module {block.argument} does not load:\n{output}"


def run_pytest(block: Block, scratch: Path) -> None:
    test = scratch / f"test_readme_{block.line}.py"
    test.write_text(block.code)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={REPO}"]
    status, output = run([*argv, str(test)], scratch, timeout=120)
    assert status == 0, f"{block.where}: the test file fails under pytest:\n{output}"


# --------------------------------------------------------------------------- tests


def test_every_block_says_how_it_runs() -> None:
    problems = list(OUTSIDE_PROBLEMS)
    problems += [f"{b.where}: {p}" for b in BLOCKS for p in b.problems]
    assert not problems, "\n".join(problems)
    assert any(b.directive == "server" for b in BLOCKS)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang != "text"], ids=lambda b: b.id)
def test_readme_block(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    assert not block.problems, f"{block.where}: " + "; ".join(block.problems)
    kind = block.directive
    if kind == "skip":
        pytest.skip(f"{block.where}: {block.argument.strip('()')}")
    elif kind == "server":
        server = request.getfixturevalue("readme_servers")[block.line]
        assert not server.error, f"{block.where}: {server.error}:\n{server.output()}"
    elif kind == "excerpt":
        source = (REPO / block.argument).read_text()
        assert block.code in source, (
            f"{block.where}: the block is no longer what {block.argument} says; copy it again"
        )
    elif kind == "module":
        run_module(block, tmp_path)
    elif kind == "pytest":
        run_pytest(block, tmp_path)
    elif block.lang == "bash":
        run_bash(block, server_for(block, request))
    else:
        run_python(block, tmp_path, server_for(block, request) if needs_server(block) else None)


# --------------------------------------------------------------------------- the convention


def test_the_convention_refuses_blocks_that_cannot_run() -> None:
    sample = "\n".join(
        [
            "```js",
            "alert(1)",
            "```",
            "<!-- readme-test: skip -->",
            "```bash",
            "make demo",
            "```",
            "```bash",
            "curl http://localhost:8080/registry",
            "```",
            "<!-- readme-test: excerpt no/such/file.py -->",
            "```python",
            "pass",
            "```",
            "<!-- readme-test: skip (fine) -->",
            "```bash",
            "make demo",
            "```",
            "```text",
            "a diagram",
            "```",
        ]
    )
    blocks, outside = parse(sample)
    assert not outside
    assert [bool(b.problems) for b in blocks] == [True, True, True, True, False, False]
    assert "no way to run" in blocks[0].problems[0]
    assert "needs a reason" in blocks[1].problems[0]
    assert "no `server` block" in blocks[2].problems[0]


def test_expected_output_and_commands_are_read_as_documented() -> None:
    code = (
        "curl -X POST http://localhost:8080/infer \\\n"
        "    -d '{\"inputs\": []}'\n"
        "# a note\n"
        "# -> {...}\n"
        "anyserve infer -c type=chat   # -> Hello\n"
    )
    assert commands_of(code) == [
        ("curl -X POST http://localhost:8080/infer \\\n    -d '{\"inputs\": []}'", ["{...}"]),
        ("anyserve infer -c type=chat   # -> Hello", ["Hello"]),
    ]
    assert_shows('{"a": 1, "b": 2}', '{"a": ...2}', "sample")
    with pytest.raises(AssertionError):
        assert_shows('{"a": 1}', '{"b": ...}', "sample")
