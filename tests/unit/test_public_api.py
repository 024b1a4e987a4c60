"""The public surface is what ``__all__`` says, and the README uses nothing else."""

from __future__ import annotations

import re
from pathlib import Path

import anyserve
from anyserve import codec, errors

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_top_level_api_is_pinned() -> None:
    # Changing this list changes what users may import: do it on purpose.
    assert sorted(anyserve.__all__) == [
        "AnyServe",
        "Capability",
        "Client",
        "Context",
        "ObjRef",
        "ObjectStore",
        "Stream",
        "StreamClosed",
        "Tensor",
        "__version__",
        "call",
        "current",
        "objects",
    ]
    for name in anyserve.__all__:
        assert getattr(anyserve, name) is not None


def test_every_codec_and_errors_name_the_readme_uses_is_public() -> None:
    text = README.read_text()
    used = set(re.findall(r"\bcodec\.([a-z_]+)", text))
    assert used, "the README shows codec calls"
    assert used <= set(codec.__all__), used - set(codec.__all__)
    for name in codec.__all__:
        assert hasattr(codec, name), name
    error_classes = {cls.__name__ for cls in errors.ERROR_TYPES.values()}
    for name in re.findall(r"\berrors\.([A-Z][A-Za-z]+)", text):
        assert name in error_classes, name
