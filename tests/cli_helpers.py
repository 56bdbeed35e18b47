"""Run the tqc command in-process and check its one-line errors."""

from __future__ import annotations

from tqc.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(capsys, *argv: str) -> str:
    """The single stderr line of a command that must fail with exit status 1."""
    code, _, err = run(capsys, *argv)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tqc: error: "), err
    return lines[0]
