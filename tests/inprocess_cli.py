"""The real ``litft`` command line, called in the test process (no interpreter start-up per call)."""

from __future__ import annotations

import pytest

from litft.cli import main as litft_main


def litft(*args: object) -> None:
    """Run ``litft ARGS...``; a failure raises SystemExit as the command would exit."""
    litft_main([str(a) for a in args])


def litft_error(capsys: pytest.CaptureFixture, *args: object) -> str:
    """Run a call that must fail cleanly (exit status 1, no traceback); returns what it printed to stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        litft(*args)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err
