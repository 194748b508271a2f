"""The package's front door: `import aefeatures` and `aefeatures --help` stay light."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("faiss", "polars", "pyarrow", "torch", "duckdb")
ROOT = Path(__file__).resolve().parents[1]


def _heavy_modules_after(code: str) -> list[str]:
    probe = (f"import sys\n{code}\n"
             f"print('\\n' + __import__('json').dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_aefeatures_loads_no_faiss_polars_pyarrow_or_torch():
    assert _heavy_modules_after("import aefeatures") == []


def test_cli_help_loads_no_faiss_polars_pyarrow_or_torch():
    code = ("from aefeatures.cli.app import cli\n"
            "try:\n    cli(['--help'], prog_name='aefeatures')\nexcept SystemExit as e:\n    assert e.code == 0")
    assert _heavy_modules_after(code) == []


def test_public_names_load_on_first_use():
    import aefeatures

    assert callable(aefeatures.open_store) and issubclass(aefeatures.NotFoundError, KeyError)
    assert set(aefeatures.__all__) <= set(dir(aefeatures))
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        aefeatures.nope  # noqa: B018
