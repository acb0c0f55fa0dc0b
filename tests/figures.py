"""A check shared by tests that draw: the file is a PNG with something drawn in it, not an empty file."""

from pathlib import Path


def assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, f"{path}: not a drawn PNG ({len(data)} bytes)"
