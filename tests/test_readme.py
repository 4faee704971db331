"""Every ```python block in README.md runs as written (each in a fresh namespace, in a temporary
working directory) and prints what its comments say it prints, so the documentation cannot
drift from the code."""

import contextlib
import io
import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BATCHNORM_PROGRESS", "0")
    code = compile(BLOCKS[index], f"README.md[python block {index}]", "exec")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {"__name__": "__readme__"})
    assert os.getcwd() == str(tmp_path)  # (a block that changes folder would leak into others)
    lines = [ln.strip() for ln in out.getvalue().splitlines()]
    for shown in expected_outputs(BLOCKS[index]):
        assert any(ln == shown or ln.startswith(shown + " ") for ln in lines), (shown, lines)


#: ``print(...)  # what it prints``; the comment up to ": " or " — " is the printed value
PRINTED = re.compile(r"^\s*print\(.*\)\s+#\s+(.*)$")


def expected_outputs(block: str) -> list[str]:
    """The values a block's print comments show, where they are values: not prose (a leading
    lowercase word), approximations (``~0``) or elisions (``...``)."""
    shown = []
    for line in block.splitlines():
        m = PRINTED.match(line)
        if m is None:
            continue
        text = re.split(r": | — ", m.group(1))[0].strip()
        if "..." in m.group(1) or text.startswith("~") or re.match(r"[a-z]+( |$)", text):
            continue
        shown.append(text)
    return shown


def test_print_comments_are_read_as_values() -> None:
    values = [v for block in BLOCKS for v in expected_outputs(block)]
    assert "torch.Size([8, 50, 16])" in values and "3108032 1140928 0.367" in values
    assert len(values) >= 8
