"""The error tree: one table of exit codes, the CLI help made from it, library messages free of
CLI flags, and "not found" kept apart from "cannot write the store"."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from click.testing import CliRunner

import aefeatures
from aefeatures import errors
from aefeatures.cli.app import cli


def _codes_of_every_error_class() -> set[int]:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.AEFeaturesError)]
    return {c.exit_code for c in classes if c is not errors.Interrupted}


def test_every_exit_code_an_error_carries_is_in_the_one_table():
    listed = {c for code in errors.EXIT_CODES for c in (code if isinstance(code, tuple) else (code,))}
    assert _codes_of_every_error_class() <= listed
    assert {128 + 2, 128 + 15} <= listed  # Interrupted: SIGINT, SIGTERM


@pytest.mark.parametrize("command, listed, absent", [
    ([], ["0 done", "3 quality gate", "4 another run", "5 user or item not found", "130/143"], []),
    (["run"], ["2 bad input", "3 quality gate refused publishing", "4 another run holds the lock"], ["5 "]),
    (["embed"], ["4 another run holds the lock"], ["3 ", "5 "]),
    (["recommend"], ["5 user or item not found"], ["3 ", "4 "]),
    (["versions"], ["2 bad input"], ["3 ", "4 ", "5 "]),
])
def test_help_lists_the_exit_codes_the_command_can_return_from_the_table(command, listed, absent):
    out = CliRunner().invoke(cli, [*command, "--help"], terminal_width=1000).output
    codes = " ".join(out[out.index("Exit codes:"):].split())
    for text in listed:
        assert text in codes
    for text in absent:
        assert f", {text}" not in codes and not codes.startswith(f"Exit codes: {text}")


def test_a_library_lookup_error_names_no_cli_flag_the_cli_adds_it(tmp_path):
    (tmp_path / "movies").mkdir()
    (tmp_path / "movies" / "LATEST").write_text("v1")
    with pytest.raises(errors.FeatureSetNotFoundError) as e:
        aefeatures.open_store(tmp_path)["books"]
    assert "--" not in str(e.value) and e.value.missing == "name"
    with pytest.raises(errors.FeatureSetNotFoundError) as e:
        aefeatures.open_store(tmp_path / "nowhere")
    assert "--" not in str(e.value)
    out = CliRunner().invoke(cli, ["versions", "--store", str(tmp_path), "--name", "books"])
    assert out.exit_code == 2 and out.stderr.strip().endswith("Pass an existing `--name`.")
    out = CliRunner().invoke(cli, ["versions", "--store", str(tmp_path / "nowhere")])
    assert out.exit_code == 2 and out.stderr.strip().endswith("Pass an existing `--store`.")


def test_not_found_and_not_writable_are_different_errors():
    missing = errors.no_feature_set(Path("store"), "books", ["movies"])
    unwritable = errors.store_not_writable(Path("store"), "Permission denied")
    assert isinstance(missing, LookupError) and not isinstance(missing, errors.StoreError)
    assert not isinstance(unwritable, errors.FeatureSetNotFoundError)
    assert missing.exit_code == unwritable.exit_code == errors.EXIT_BAD_INPUT


def test_the_http_service_answers_404_for_an_unknown_feature_set_only():
    pytest.importorskip("fastapi")
    import asyncio

    from fastapi import FastAPI

    from aefeatures.serving.http import _install_error_handlers

    app = FastAPI()
    _install_error_handlers(app)

    def status(exc: Exception) -> int:  # the handler Starlette picks: the nearest class in the MRO
        handler = next(app.exception_handlers[c] for c in type(exc).__mro__ if c in app.exception_handlers)
        return asyncio.run(handler(None, exc)).status_code

    assert status(errors.no_feature_set(Path("store"), "books", ["movies"])) == 404
    assert status(errors.no_store(Path("store"))) == 404
    assert status(errors.store_not_writable(Path("store"), "Permission denied")) == 400


def test_the_readme_lists_the_same_exit_codes():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("Exit codes:"):].split("\n\n")[1]
    listed = {line.split("|")[1].strip() for line in table.splitlines()[2:]}
    assert listed == {" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in errors.EXIT_CODES}
