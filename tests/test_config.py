"""The job file: the committed example loads from any folder, defaults fill the gaps, and every
wrong key, type or value is a ConfigError (exit code 2) that names the file and the key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from aefeatures import config as config_mod
from aefeatures.config import IndexConfig, InputConfig, ModelConfig, load_job_config
from aefeatures.data.read import read_interactions
from aefeatures.errors import BadInputError, ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "jobs" / "example.toml"

MINIMAL = '[job]\nname = "movies"\nstore = "store"\n\n[input]\npath = "data.parquet"\n'


def write(folder: Path, text: str, name: str = "job.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def fails(path: Path, message: str) -> ConfigError:
    """Load ``path`` expecting a ConfigError whose message is `job file `path`: <message>`."""
    with pytest.raises(ConfigError, match=re.escape(f"job file `{path}`: ") + message) as e:
        load_job_config(path)
    err = e.value
    assert isinstance(err, BadInputError) and isinstance(err, ValueError)
    assert err.exit_code == 2 and err.path == str(path)
    assert "\n" not in str(err)
    return err


# --- the committed example ------------------------------------------------------------------


@pytest.mark.parametrize("cwd", ["tmp", "repo", "jobs"])
def test_example_job_loads_and_resolves_paths_against_its_folder(tmp_path, monkeypatch, cwd):
    folder = {"tmp": tmp_path, "repo": REPO, "jobs": REPO / "jobs"}[cwd]
    monkeypatch.chdir(folder)
    as_given = {"tmp": EXAMPLE, "repo": Path("jobs/example.toml"), "jobs": Path("example.toml")}[cwd]
    cfg = load_job_config(as_given)
    assert cfg.source == as_given
    assert cfg.job.name == "example"
    assert cfg.job.store.is_absolute() and cfg.job.store == REPO / "store"
    assert Path(cfg.input.path).is_absolute()
    assert Path(cfg.input.path).resolve() == REPO / "fixtures" / "interactions.parquet"
    assert cfg.input == InputConfig(path=cfg.input.path, user_col="user_id", item_col="item_id",
                                    weight_col="rating", timestamp_col="timestamp", min_weight=4.0)
    assert isinstance(cfg.input.min_weight, float)
    m = cfg.model
    assert (m.kind, m.dim, m.epochs, m.batch_size, m.lr, m.seed) == ("dlae", 64, 50, 512, 1e-3, 0)
    assert m.hidden == ModelConfig().hidden  # not set in the example: the default
    assert cfg.index.kind == "auto"


def test_example_input_is_readable_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_job_config(EXAMPLE)
    got = read_interactions(cfg.input)
    assert got.n_rows_read == 57879 and got.n_rows_kept == 42359


def test_to_dict_is_plain_json():
    cfg = load_job_config(EXAMPLE)
    out = json.loads(json.dumps(cfg.to_dict()))
    assert out["job"] == {"name": "example", "store": str(REPO / "store")}
    assert out["model"]["hidden"] == list(ModelConfig().hidden)
    assert out["input"]["min_weight"] == 4.0 and "source" not in out


# --- defaults and path resolution --------------------------------------------------------------


def test_minimal_job_takes_every_default(tmp_path):
    cfg = load_job_config(write(tmp_path, MINIMAL))
    assert cfg.job.name == "movies" and cfg.job.store == tmp_path / "store"
    assert cfg.input == InputConfig(path=str(tmp_path / "data.parquet"))
    assert cfg.input.user_col == "user_id" and cfg.input.item_col == "item_id"
    assert cfg.input.weight_col is None and cfg.input.timestamp_col is None and cfg.input.min_weight is None
    assert cfg.input.binarize is True
    assert cfg.model == ModelConfig()
    assert (cfg.model.kind, cfg.model.dim, cfg.model.hidden, cfg.model.epochs) == ("dlae", 0, (600,), 50)
    assert (cfg.model.batch_size, cfg.model.lr, cfg.model.dropout, cfg.model.device) == (512, 1e-3, 0.5, "auto")
    assert cfg.index == IndexConfig() and cfg.index.kind == "auto"


def test_relative_paths_and_globs_resolve_against_the_job_folder(tmp_path, monkeypatch):
    import polars as pl

    (tmp_path / "jobs").mkdir()
    (tmp_path / "data").mkdir()
    for i in range(2):
        frame = pl.DataFrame({"user_id": [1, 2, 3], "item_id": [i, i + 1, i + 2]})
        frame.write_parquet(tmp_path / "data" / f"p{i}.parquet")
    write(tmp_path / "jobs", '[job]\nname = "m"\nstore = "../out/store"\n[input]\npath = "../data/*.parquet"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_job_config(Path("..") / "jobs" / "job.toml")
    assert cfg.job.store == tmp_path / "out" / "store"  # resolved, no `..` left
    assert cfg.input.path == str(tmp_path / "jobs" / "../data/*.parquet")  # a glob stays a pattern
    assert len(read_interactions(cfg.input).files) == 2


def test_absolute_paths_are_kept(tmp_path):
    job = write(tmp_path, f'[job]\nname = "m"\nstore = "{tmp_path / "s"}"\n[input]\npath = "/data/x.parquet"\n')
    cfg = load_job_config(job)
    assert cfg.job.store == tmp_path / "s" and cfg.input.path == "/data/x.parquet"


def test_numbers_and_lists_are_coerced(tmp_path):
    cfg = load_job_config(write(tmp_path, MINIMAL + 'min_weight = 4\nweight_col = "r"\nbinarize = false\n'
                                "[model]\nlr = 1\nhidden = [32, 16]\ndropout = 0\ndevice = \"cuda:1\"\n"))
    assert cfg.input.min_weight == 4.0 and isinstance(cfg.input.min_weight, float)  # int accepted for float
    assert cfg.model.lr == 1.0 and isinstance(cfg.model.lr, float)
    assert cfg.model.hidden == (32, 16) and cfg.model.dropout == 0.0
    assert cfg.input.binarize is False and cfg.model.device == "cuda:1"


# --- unknown keys -----------------------------------------------------------------------------


def test_unknown_top_level_section(tmp_path):
    err = fails(write(tmp_path, MINIMAL + "[modle]\ndim = 8\n"),
                r"unknown key `modle`; did you mean `model`\? valid keys here: job, input, model, index, evaluation, gate")
    assert "modle" in err.problem


def test_unknown_section_without_a_close_match(tmp_path):
    fails(write(tmp_path, MINIMAL + "[zzz]\n"), r"unknown key `zzz`; valid keys here: job, input, model, index, evaluation, gate")


@pytest.mark.parametrize("section, key, suggestion", [
    ("model", "epoch", "epochs"),
    ("model", "dims", "dim"),
    ("input", "weight", "weight_col"),
    ("index", "knd", "kind"),
    ("job", "nmae", "name"),
])
def test_unknown_key_suggests_the_close_one(tmp_path, section, key, suggestion):
    text = MINIMAL.replace(f"[{section}]\n", f"[{section}]\n{key} = 1\n") if section in ("job", "input") \
        else MINIMAL + f"[{section}]\n{key} = 1\n"
    err = fails(write(tmp_path, text),
                rf"unknown key `{section}\.{key}`; did you mean `{section}\.{suggestion}`\? valid keys here: ")
    assert suggestion in err.problem.split("valid keys here: ")[1].rstrip(".").split(", ")


def test_unknown_key_without_a_close_match_lists_the_valid_ones(tmp_path):
    fails(write(tmp_path, MINIMAL + "[model]\nfrobnicate = 1\n"),
          r"unknown key `model\.frobnicate`; valid keys here: kind, dim, hidden, epochs, .*\.$")


# --- wrong types ----------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    ('[model]\ndim = "8"', r"`model\.dim` must be an integer, got str '8'\. Fix the value\."),
    ("[model]\nepochs = true", r"`model\.epochs` must be an integer, got bool True\."),
    ("[model]\nepochs = 1.5", r"`model\.epochs` must be an integer, got float 1\.5\."),
    ("[model]\nbatch_size = 512.0", r"`model\.batch_size` must be an integer, got float 512\.0\."),
    ("[model]\nlr = true", r"`model\.lr` must be a number, got bool True\."),
    ('[model]\nlr = "1e-3"', r"`model\.lr` must be a number, got str '1e-3'\."),
    ("[model]\nhidden = 600", r"`model\.hidden` must be a list such as \[600\], got int 600\."),
    ('[model]\nhidden = [16, "a"]', r"`model\.hidden\[1\]` must be an integer, got str 'a'\."),
    ("[model]\nkind = 1", r"`model\.kind` must be a string, got int 1\."),
    ("[index]\nkind = [\"flat\"]", r"`index\.kind` must be a string, got list \['flat'\]\."),
], ids=["str-for-int", "bool-for-int", "float-for-int", "float-for-int-2", "bool-for-float", "str-for-float",
        "int-for-list", "str-in-list", "int-for-str", "list-for-str"])
def test_wrong_value_types(tmp_path, extra, message):
    fails(write(tmp_path, MINIMAL + extra + "\n"), message)


@pytest.mark.parametrize("line, message", [
    ('binarize = "yes"', r"`input\.binarize` must be true or false, got str 'yes'\."),
    ("min_weight = true", r"`input\.min_weight` must be a number, got bool True\."),
    ("weight_col = 3", r"`input\.weight_col` must be a string, got int 3\."),
])
def test_wrong_types_in_input(tmp_path, line, message):
    fails(write(tmp_path, MINIMAL + line + "\n"), message)


def test_wrong_type_for_a_path(tmp_path):
    fails(write(tmp_path, MINIMAL.replace('store = "store"', "store = 5")),
          r"`job\.store` must be a string, got int 5\.")
    fails(write(tmp_path, MINIMAL.replace('name = "movies"', "name = 5")), r"`job\.name` must be a string, got int 5\.")


def test_section_that_is_not_a_table(tmp_path):
    fails(write(tmp_path, 'job = "movies"\n[input]\npath = "x"\n'),
          r"`job` must be a table `\[job\]`, got str 'movies'\.")


def test_coercion_of_an_unknown_type_is_a_programming_error():
    with pytest.raises(TypeError, match="no coercion for"):
        config_mod._coerce(Path("job.toml"), "model.x", {"a": 1}, dict)


# --- bad values -------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    ('[model]\nkind = "xyz"', r"`model\.kind` = 'xyz' is not allowed: choose one of dae, vae, dlae, recvae\."),
    ("[model]\ndim = -1", r"`model\.dim` = -1 is not allowed: it must be at least 1 \(or 0: the kind's default\)\."),
    ("[model]\nhidden = [16, 0]", r"`model\.hidden` = \[16, 0\] is not allowed: every layer needs >= 1 unit\."),
    ("[model]\nepochs = -1", r"`model\.epochs` = -1 is not allowed: it must be 0 or more\."),
    ("[model]\nbatch_size = 0", r"`model\.batch_size` = 0 is not allowed: it must be at least 1\."),
    ("[model]\nlr = 0", r"`model\.lr` = 0\.0 is not allowed: it must be positive\."),
    ("[model]\nweight_decay = -0.1", r"`model\.weight_decay` = -0\.1 is not allowed: it must be 0 or more\."),
    ("[model]\ndropout = 1.0", r"`model\.dropout` = 1\.0 is not allowed: it must be in \[0, 1\)\."),
    ("[model]\ndropout = -0.1", r"`model\.dropout` = -0\.1 is not allowed: it must be in \[0, 1\)\."),
    ("[model]\nbeta_cap = -1", r"`model\.beta_cap` = -1\.0 is not allowed: it must be 0 or more\."),
    ("[model]\nanneal_steps = 0", r"`model\.anneal_steps` = 0 is not allowed: it must be at least 1\."),
    ('[model]\ndevice = "gpu"', r"`model\.device` = 'gpu' is not allowed: use auto, cpu, cuda or cuda:N\."),
    ('[model]\ndevice = "cuda:x"', r"`model\.device` = 'cuda:x' is not allowed"),
    ('[evaluation]\nprotocol = "held-out rows"', r"`evaluation\.protocol` = 'held-out rows' is not allowed: "
                                                r"choose one of held-out items, held-out users\."),
    ("[evaluation]\nfolds = 5", r"`evaluation\.folds` = 5 is not allowed: k folds deal the users into k groups held "
                               r"out in turn: set `evaluation\.protocol = \"held-out users\"` too\."),
    ('[index]\nkind = "  "', r"`index\.kind` = '  ' is neither a named kind .* \(it is empty\); use one of auto, "
                              r"flat, hnsw, ivf, ivfpq or a factory string"),
], ids=lambda v: v.split("\n")[1] if "\n" in v else None)
def test_bad_values(tmp_path, extra, message):
    fails(write(tmp_path, MINIMAL + extra + "\n"), message)


@pytest.mark.parametrize("kind, message", [
    ("ivf_pq", r"`index\.kind` = 'ivf_pq' is neither a named kind nor a FAISS factory string FAISS can make for "
               r"65-wide rows \(.+\); did you mean \"ivfpq\"\?"),
    ("HSNW", r"`index\.kind` = 'HSNW' .*; did you mean \"hnsw\"\?"),
    ("IVF64,PQ7", r"`index\.kind` = 'IVF64,PQ7' is neither .* 65-wide rows \(.+\); use one of"),  # 7 does not divide 65
])
def test_index_kind_is_checked_when_the_job_file_is_loaded(tmp_path, kind, message):
    fails(write(tmp_path, MINIMAL + f'[model]\ndim = 64\n[index]\nkind = "{kind}"\n'), message)


@pytest.mark.parametrize("kind", ["auto", "flat", "hnsw", "ivf", "ivfpq", "HNSW16,Flat", "IVF64,PQ13", "OPQ13,IVF64,PQ13"])
def test_named_kinds_and_factory_strings_faiss_can_make_load(tmp_path, kind):
    assert load_job_config(write(tmp_path, MINIMAL + f'[model]\ndim = 64\n[index]\nkind = "{kind}"\n')).index.kind == kind


@pytest.mark.parametrize("name", ["my-set", "has space", "dot.ted", "", "ümlaut", "7day", "2024"])
def test_feature_set_name_must_be_an_identifier(tmp_path, name):
    fails(write(tmp_path, MINIMAL.replace('"movies"', f'"{name}"')),
          rf"`job\.name` = '{re.escape(name)}' is not allowed: use letters, digits and _ only, starting with a "
          r"letter or _ \(it names SQL views and Feast objects\)\.")


def test_min_weight_needs_a_weight_column(tmp_path):
    fails(write(tmp_path, MINIMAL + "min_weight = 4.0\n"),
          r"`input\.min_weight` = 4\.0 is not allowed: it needs `input\.weight_col` to know which column to compare\.")


@pytest.mark.parametrize("key", ["user_col", "item_col"])
def test_id_columns_cannot_be_empty(tmp_path, key):
    fails(write(tmp_path, MINIMAL + f'{key} = ""\n'), rf"`input\.{key}` = '' is not allowed: name a column\.")


# --- missing parts ----------------------------------------------------------------------------


def test_missing_job_section(tmp_path):
    fails(write(tmp_path, '[input]\npath = "x.parquet"\n'),
          r"missing section `\[job\]`\. Add it \(see jobs/example\.toml\)\.")


def test_missing_input_section(tmp_path):
    fails(write(tmp_path, '[job]\nname = "m"\nstore = "s"\n'), r"missing section `\[input\]`\.")


@pytest.mark.parametrize("drop, key", [('name = "movies"\n', "job.name"), ('store = "store"\n', "job.store"),
                                       ('path = "data.parquet"\n', "input.path")])
def test_missing_required_key(tmp_path, drop, key):
    section = key.split(".")[0]
    fails(write(tmp_path, MINIMAL.replace(drop, "")),
          rf"missing key `{re.escape(key)}`\. Add it to the `\[{section}\]` section\.")


# --- unreadable files -------------------------------------------------------------------------


def test_invalid_toml(tmp_path):
    fails(write(tmp_path, '[job\nname = "m"\n'), r"is not valid TOML \(.*line 1.*\)\. Fix the syntax\.")


def test_invalid_toml_value(tmp_path):
    fails(write(tmp_path, MINIMAL + "[model]\ndim = \n"), r"is not valid TOML \(.*line 8.*\)")


def test_missing_file(tmp_path):
    fails(tmp_path / "nope.toml", r"file not found\. Pass the path of an existing job file\.$")


def test_a_directory_is_not_a_job_file(tmp_path):
    fails(tmp_path, r"cannot be read \(.*Is a directory.*\)\.$")


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "job.toml"
    path.write_bytes(b'[job]\nname = "\xff\xfe"\n')
    fails(path, r"cannot be read \('utf-8' codec can't decode byte 0xff.*\)\.$")


def test_a_weight_transform_needs_weights_the_model_reads(tmp_path):
    cfg = load_job_config(write(tmp_path, MINIMAL + 'weight_col = "plays"\nbinarize = false\nweight_transform = "log1p"\n'))
    assert cfg.input.weight_transform == "log1p"
    fails(write(tmp_path, MINIMAL + 'weight_col = "plays"\nweight_transform = "log1p"\n'),
          re.escape("`input.weight_transform` = 'log1p' is not allowed: it transforms the weights the model reads: set "))
    fails(write(tmp_path, MINIMAL + 'weight_col = "plays"\nbinarize = false\nweight_transform = "log"\n'),
          re.escape("`input.weight_transform` = 'log' is not allowed: choose one of none, log1p"))
