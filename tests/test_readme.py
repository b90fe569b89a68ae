"""The README's Python tour runs as written (on the embedded MiniLM), so it stays true."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
def test_readme_python_tour_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict[str, object] = {}
        exec(compile(blocks[0], "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    assert "trainable params: 75,653" in printed
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    import deltatune as dt

    assert not list(dt.adapter_layers(namespace["plain"]))  # type: ignore[arg-type]
