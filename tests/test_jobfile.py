"""Job files: every setting from a file and from a flag, merging, precedence, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sfbatch import cli, jobfile
from sfbatch.config import BASE_URLS, Environment, RunConfig
from sfbatch.errors import ConfigError
from sfbatch.jobfile import Overrides, load, merge
from sfbatch.settings import Spec, specs_of

REPO = Path(__file__).resolve().parent.parent
SPECS = specs_of(RunConfig)
NO_ENV = Environment()
MODELS = (REPO / "sfbatch/data/models.toml").read_text()

# A value for every setting that differs from its default (by spec id where a kind's
# generic sample would not be valid).
_SPECIAL: dict[str, Any] = {
    "api.base_url": "http://127.0.0.1:1/v1",
    "build.file_naming": "{index}-{id}",
    "build.shard": "1/3",
    "output.images_to": "s3://bucket/run-1",
    "request.batch_size": 2,
    "request.image_size": "512x512",
    "request.image": "https://example.com/cat.png",
}
_GENERIC: dict[type, Any] = {int: 3, float: 5.5, str: "some text", Path: "things"}
# The request defaults are checked against their model's rules (flags are checked as
# flags), and a model takes guidance_scale or cfg, never both: two passes, each leaving
# one out, the second with a model of the models file that takes cfg.
CFG_MODEL = "Acme/Sample-Cfg"
MODELS += f"""
[models."{CFG_MODEL}"]
max_pixels = 4194304
steps = [1, 100]
guidance_field = "cfg"
guidance = [0.1, 20.0]
image_fields = ["image"]
"""
PASSES = pytest.mark.parametrize("left_out", ["request.cfg", "request.guidance_scale"])


def settable(left_out: str) -> list[Spec]:
    return [spec for spec in SPECS if spec.id != left_out]


def sample(spec: Spec, left_out: str = "request.cfg") -> Any:
    if spec.id == "request.model" and left_out == "request.guidance_scale":
        return CFG_MODEL
    if spec.id in _SPECIAL:
        return _SPECIAL[spec.id]
    if spec.kind is bool:
        return not spec.default
    return _GENERIC[spec.kind]


def read(config: RunConfig, spec: Spec) -> Any:
    holder = config if spec.part is None else getattr(config, spec.part)
    return getattr(holder, spec.name)


def expected(spec: Spec, base: Path, left_out: str) -> Any:
    value = sample(spec, left_out)
    if spec.setting.parse is not None:
        return spec.setting.parse(value)
    return base / value if spec.kind is Path else value


def toml(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else json.dumps(value)


def write_job(path: Path, lines: dict[str, list[str]]) -> Path:
    path.write_text("".join(f"[{s}]\n" + "".join(f"{x}\n" for x in ls) for s, ls in lines.items()))
    return path


@PASSES
def test_every_setting_can_come_from_a_job_file(tmp_path: Path, left_out: str) -> None:
    tables: dict[str, list[str]] = {"job": ['inputs = ["p.txt"]']}
    for spec in settable(left_out):
        value = toml(sample(spec, left_out))
        tables.setdefault(spec.section, []).append(f"{spec.key} = {value}")
    (tmp_path / "things").write_text(MODELS)  # the models file
    config = merge(load(write_job(tmp_path / "job.toml", tables)), Overrides(), NO_ENV).config
    for spec in settable(left_out):
        assert read(config, spec) == expected(spec, tmp_path, left_out), spec.id


@PASSES
def test_every_setting_can_come_from_a_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, left_out: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SILICONFLOW_BASE_URL", raising=False)
    Path("things").write_text(MODELS)
    argv = ["run", "p.txt"]
    for spec in settable(left_out):
        value = sample(spec, left_out)
        if spec.kind is bool:
            argv.append(f"--{spec.flag}" if value else f"--no-{spec.flag}")
        else:
            argv += [f"--{spec.flag}", str(value)]
    config = cli.job_from_args(cli.build_parser().parse_args(argv)).config
    for spec in settable(left_out):
        assert read(config, spec) == expected(spec, Path(), left_out), spec.id


def test_the_example_jobs_load_with_paths_relative_to_the_file() -> None:
    nightly = load(REPO / "jobs/nightly.toml")
    assert nightly.inputs == (str(REPO / "jobs/nightly-prompts.jsonl"),)
    assert nightly.settings["job.out"] == REPO / "data/nightly"
    assert nightly.settings["limits.ipd"] == 400 and nightly.settings["retry.max_retries"] == 6
    assert (nightly.profile, nightly.key_env, nightly.emulator) == (
        "cn",
        "SILICONFLOW_API_KEY",
        "off",
    )
    demo = merge(load(REPO / "jobs/demo.toml"), Overrides(), NO_ENV)
    assert demo.emulator == "auto" and demo.name == "demo"
    assert demo.emulator_settings == {"latency_s": 0.3, "latency_jitter_s": 0.1, "image_px": 256}
    assert demo.config.workers.download_concurrency == 4 and demo.config.build.variations == 2


def test_flags_override_the_job_file(tmp_path: Path) -> None:
    job = load(
        write_job(
            tmp_path / "job.toml",
            {"job": ['inputs = ["p.txt"]', 'out = "out"'], "limits": ["rpm = 2", "ipm = 2"]},
        )
    )
    merged = merge(job, Overrides(settings={"limits.rpm": 30.0, "job.out": Path("x")}), NO_ENV)
    assert merged.config.limits.rpm == 30.0 and merged.config.limits.ipm == 2
    assert merged.config.out_dir == Path("x")
    assert merged.inputs == [str(tmp_path / "p.txt")]
    prompts = merge(job, Overrides(input="other.txt"), NO_ENV)
    assert prompts.inputs == ["other.txt"]


@pytest.mark.parametrize(
    ("job_api", "overrides", "env_url", "url"),
    [
        ([], {}, None, BASE_URLS["cn"]),
        (['profile = "com"'], {}, None, BASE_URLS["com"]),
        (['base_url = "http://job:1/v1"'], {}, None, "http://job:1/v1"),
        (['base_url = "http://job:1/v1"'], {}, "http://env:1/v1", "http://env:1/v1"),
        (['profile = "com"'], {}, "http://env:1/v1", "http://env:1/v1"),
        ([], {"profile": "com"}, "http://env:1/v1", BASE_URLS["com"]),
        (
            [],
            {"settings": {"api.base_url": "http://flag:1/v1"}},
            "http://env:1/v1",
            "http://flag:1/v1",
        ),
    ],
)
def test_base_url_precedence_flag_then_environment_then_job_then_default(
    tmp_path: Path, job_api: list[str], overrides: dict[str, Any], env_url: str | None, url: str
) -> None:
    tables = {"job": ['inputs = ["p.txt"]', 'out = "o"'], "api": job_api}
    job = load(write_job(tmp_path / "job.toml", tables))
    env = Environment(api_key="sk-x", base_url=env_url)
    merged = merge(job, Overrides(**overrides), env)
    assert merged.config.base_url == url and merged.config.api_key == "sk-x"


def test_the_key_comes_from_the_variable_the_job_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SILICONFLOW_API_KEY", "sk-default")
    monkeypatch.setenv("MY_COM_KEY", "sk-com")
    tables = {"job": ['inputs = ["p.txt"]', 'out = "o"'], "api": ['key_env = "MY_COM_KEY"']}
    merged = merge(load(write_job(tmp_path / "job.toml", tables)), Overrides())
    assert merged.config.api_key == "sk-com" and merged.key_env == "MY_COM_KEY"
    plain = merge(None, Overrides(input="p.txt", settings={"job.out": Path("o")}))
    assert plain.config.api_key == "sk-default" and plain.name == ""


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ({"limits": ["rpm = 2", "bogus = 1"]}, "job.toml: unknown key limits.bogus"),
        ({"limits": ['rpm = "fast"']}, "job.toml: limits.rpm must be int or float, got str"),
        ({"build": ["dedupe = 1"]}, "job.toml: build.dedupe must be bool"),
        ({"retry": ["download_timeout_s = true"]}, "retry.download_timeout_s must be int or float"),
        ({"build": ['shard = "3/3"']}, "job.toml: build.shard: shard I/N needs"),
        (
            {"limits": ["concurrency = 0"]},
            "(or a flag overriding it): concurrency must be at least 1",
        ),
        ({"retry": ["connect_timeout_s = 0"]}, "connect_timeout_s must be more than 0"),
        ({"api": ['profile = "eu"']}, "job.toml: api.profile must be cn or com"),
        ({"job": ['emulator = "maybe"']}, "job.toml: job.emulator must be off, auto or on"),
        ({"emulator": ['latency_s = "x"']}, "job.toml: emulator.latency_s must be int or float"),
        ({"job": ["inputs = [1]"]}, "job.inputs must be a list of file paths"),
        ({"nope": []}, "unknown section [nope]"),
    ],
)
def test_bad_job_files_name_the_key_and_the_file(
    tmp_path: Path, tables: dict[str, list[str]], message: str
) -> None:
    base = {"job": ['out = "o"']}
    for section, lines in tables.items():
        base[section] = base.get(section, []) + lines
    if not any(line.startswith("inputs") for line in base["job"]):
        base["job"].append('inputs = ["p.txt"]')
    path = write_job(tmp_path / "job.toml", base)
    with pytest.raises(ConfigError) as caught:
        merge(load(path), Overrides(), NO_ENV)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_a_job_needs_an_output_directory_and_inputs(tmp_path: Path) -> None:
    no_out = load(write_job(tmp_path / "a.toml", {"job": ['inputs = ["p.txt"]']}))
    with pytest.raises(ConfigError, match="--out"):
        merge(no_out, Overrides(), NO_ENV)
    no_inputs = load(write_job(tmp_path / "b.toml", {"job": ['out = "o"']}))
    with pytest.raises(ConfigError, match="names no prompt file"):
        merge(no_inputs, Overrides(), NO_ENV)
    with pytest.raises(ConfigError, match="cannot read job file"):
        load(tmp_path / "missing.toml")


def test_jobfile_knows_no_argparse_and_validate_does_not_import_the_cli() -> None:
    code = (
        "import sys, sfbatch.validate, sfbatch.jobfile; "
        "print(sorted(m for m in ('argparse', 'sfbatch.cli') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "sfbatch.cli" not in out.stdout
    assert "argparse" not in Path(jobfile.__file__).read_text()
