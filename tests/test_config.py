"""RunConfig and its parts: construction (parts and flat keywords), validation, environment."""

from __future__ import annotations

import dataclasses
import doctest
import math
from pathlib import Path
from typing import Any

import pytest

import sfbatch.config
from sfbatch.config import (
    Build,
    Environment,
    Limits,
    Output,
    RequestDefaults,
    RunConfig,
    Timeouts,
    Workers,
)
from sfbatch.errors import ConfigError
from sfbatch.retry import RetryPolicy
from sfbatch.settings import specs_of


def test_the_readme_call_takes_a_str_out_dir_and_flat_keywords() -> None:
    config = RunConfig(out_dir="library-out", api_key="sk-x", rpm=60)
    assert config.out_dir == Path("library-out")
    assert config.limits == Limits(rpm=60)
    assert "sk-x" not in repr(config)


def test_flat_keywords_and_parts_build_the_same_config() -> None:
    flat = RunConfig(
        out_dir="o",
        api_key="k",
        base_url="http://127.0.0.1:1/v1/",
        rpm=2,
        ipd=400,
        day_utc_offset_h=0,
        concurrency=3,
        queue_size=9,
        max_retries=1,
        backoff_base_s=0.5,
        backoff_cap_s=4,
        download_timeout_s=7,
        grace_s=2,
        fsync_images=False,
        name_template="{id}-{index}",
        shard=(1, 3),
        variations=2,
        retry_failed=True,
    )
    parts = RunConfig(
        out_dir=Path("o"),
        api_key="k",
        base_url="http://127.0.0.1:1/v1",
        limits=Limits(rpm=2, ipd=400, day_utc_offset_h=0),
        workers=Workers(concurrency=3, queue_size=9),
        retry=RetryPolicy(max_retries=1, base_s=0.5, cap_s=4),
        timeouts=Timeouts(download_timeout_s=7, grace_s=2),
        output=Output(fsync_images=False, name_template="{id}-{index}", shard=(1, 3)),
        build=Build(variations=2, retry_failed=True),
    )
    assert flat == parts
    assert parts.base_url == "http://127.0.0.1:1/v1"
    assert parts.manifest_name == "manifest-1-of-3.jsonl"
    assert parts.summary_name == "summary-1-of-3.json"


def test_flat_keywords_apply_over_a_given_part() -> None:
    config = RunConfig(out_dir="o", api_key="k", limits=Limits(rpm=5, ipm=5), ipm=3)
    assert config.limits == Limits(rpm=5, ipm=3)


def test_flat_reads_of_old_still_work() -> None:
    config = RunConfig(out_dir="o", api_key="k", rpm=7, backoff_cap_s=9)
    assert (config.rpm, config.backoff_cap_s, config.cap_s, config.concurrency) == (7, 9, 9, None)
    with pytest.raises(AttributeError):
        _ = config.no_such_setting


def test_an_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="rmp"):
        RunConfig(out_dir="o", api_key="k", rmp=60)


def test_replace_and_frozen() -> None:
    config = RunConfig(out_dir="o", api_key="k", rpm=7)
    moved = dataclasses.replace(config, base_url="http://127.0.0.1:9/v1", api_key="other")
    assert moved.limits is config.limits and moved.api_key == "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.limits = Limits()  # type: ignore[misc]
    with pytest.raises(TypeError):
        Limits(60)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rpm": 0}, "rpm must be more than 0"),
        ({"ipm": -1.5}, "ipm must be more than 0"),
        ({"rpm": "fast"}, "rpm must be a number"),
        ({"rpm": True}, "rpm must be a number"),
        ({"ipm": math.inf}, "ipm must be a number"),
        ({"ipd": -1}, "ipd must be at least 0"),
        ({"ipd": 1.5}, "ipd must be a whole number"),
        ({"concurrency": 0}, "concurrency must be at least 1"),
        ({"download_concurrency": 0}, "download_concurrency must be at least 1"),
        ({"queue_size": 0}, "queue_size must be at least 1"),
        ({"max_retries": -1}, "max_retries must be at least 0"),
        ({"backoff_base_s": 0}, "backoff_base_s must be more than 0"),
        ({"backoff_base_s": 10, "backoff_cap_s": 5}, "cap_s"),
        ({"request_timeout_s": 0}, "request_timeout_s must be more than 0"),
        ({"connect_timeout_s": -1}, "connect_timeout_s must be more than 0"),
        ({"download_timeout_s": math.nan}, "download_timeout_s must be a number"),
        ({"grace_s": 0}, "grace_s must be more than 0"),
        ({"max_image_bytes": 0}, "max_image_bytes must be at least 1"),
        ({"fsync_images": "yes"}, "fsync_images must be true or false"),
        ({"variations": 0}, "variations must be at least 1"),
        ({"limit": -1}, "limit must be at least 0"),
        ({"shard": (2, 2)}, "shard"),
        ({"name_template": "{id}"}, "file naming must contain"),
        ({"name_template": "{id}_{index"}, "expected '}' before end of string"),
        ({"name_template": "{id}/{index}"}, "path separator"),
        ({"base_url": "ftp://example.com/v1"}, "must start with http"),
        ({"base_url": "http://127.0.0.1:99999/v1"}, "Port out of range"),
        ({"base_url": "http://[::1:80/v1"}, "is not a URL"),
        ({"concurrency": 99999999999999999999}, "concurrency must be at most 10,000"),
        ({"max_concurrency": 10_001}, "max_concurrency must be at most 10,000"),
        ({"download_concurrency": 10**6}, "download_concurrency must be at most 10,000"),
        ({"tz_offset_h": 30}, "tz_offset_h must be at most 14"),
        ({"tz_offset_h": math.nan}, "tz_offset_h must be a number"),
        ({"limit": 10**20}, "limit must be at most"),
        ({"base_seed": 2**64}, "base_seed must be at most"),
        ({"ipd": 10**20}, "ipd must be at most"),
        ({"variations": 10**20}, "variations must be at most 10,000"),
        ({"defaults": RequestDefaults(batch_size=4), "ipm": 2}, "can never fit"),
    ],
)
def test_bad_values_are_config_errors_naming_the_setting(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        RunConfig(out_dir="o", api_key="k", **kwargs)


def test_request_defaults_check_their_types() -> None:
    with pytest.raises(ConfigError, match="batch_size must be a whole number"):
        RequestDefaults(batch_size="2")  # type: ignore[arg-type]
    assert RequestDefaults(batch_size=2, seed=1).as_request() == {"batch_size": 2, "seed": 1}


def test_from_settings_builds_the_parts_by_spec_id() -> None:
    config = RunConfig.from_settings(
        {
            "job.out": Path("o"),
            "api.base_url": "http://127.0.0.1:1/v1",
            "limits.rpm": 2,
            "limits.concurrency": 3,
            "retry.backoff_cap_s": 9.0,
            "request.model": "Kwai-Kolors/Kolors",
            "build.file_naming": "{index}-{id}",
        },
        api_key="k",
    )
    assert config.limits.rpm == 2 and config.workers.concurrency == 3
    assert config.retry.cap_s == 9.0 and config.defaults.model == "Kwai-Kolors/Kolors"
    assert config.output.name_template == "{index}-{id}"


def test_every_setting_has_one_unique_key_and_flag() -> None:
    specs = specs_of(RunConfig)
    assert len({s.id for s in specs}) == len(specs)
    assert len({s.flag for s in specs}) == len(specs)
    by_id = {s.id: s.flag for s in specs}
    assert by_id["retry.download_timeout_s"] == "download-timeout"
    assert by_id["limits.tz_offset_h"] == "tz-offset"
    assert by_id["retry.grace_s"] == "grace"
    assert by_id["request.num_inference_steps"] == "steps"


def test_the_environment_is_read_in_one_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SILICONFLOW_API_KEY", " sk-a \n")
    monkeypatch.setenv("MY_KEY", "sk-b")
    monkeypatch.setenv("SILICONFLOW_BASE_URL", "http://127.0.0.1:2/v1")
    assert Environment.read() == Environment(api_key="sk-a", base_url="http://127.0.0.1:2/v1")
    assert Environment.read("MY_KEY").api_key == "sk-b"
    assert RunConfig(out_dir="o", api_key="k").base_url == "http://127.0.0.1:2/v1"
    monkeypatch.delenv("SILICONFLOW_BASE_URL")
    assert RunConfig(out_dir="o", api_key="k").base_url == "https://api.siliconflow.cn/v1"


def test_docstring_examples() -> None:
    assert doctest.testmod(sfbatch.config).failed == 0


@pytest.mark.parametrize(
    ("api_key", "keys"),
    [
        ("sk-a", ("sk-a",)),
        (" sk-a , sk-b,,", ("sk-a", "sk-b")),
        ("sk-a\nsk-b\n", ("sk-a", "sk-b")),  # a key file's lines: "$(cat keys.txt)"
        (" , ,", ()),
    ],
)
def test_keys_are_split_on_commas_and_white_space(api_key: str, keys: tuple[str, ...]) -> None:
    assert RunConfig(out_dir="o", api_key=api_key).api_keys == keys


@pytest.mark.parametrize(
    ("api_key", "message"),
    [
        ("sk-a,sk-b,sk-a", r"API keys #0 and #2 \(counting from 0\) are the same key"),
        ("sk-a,sk-\x00b", r"API key #1 \(counting from 0\) has a control character"),
        ("sk-ä", "not ASCII"),
    ],
)
def test_keys_no_request_could_carry_are_refused_without_showing_them(
    api_key: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        RunConfig(out_dir="o", api_key=api_key)
    assert "sk-" not in str(info.value)


def test_the_key_is_not_shown_when_given_where_the_base_url_goes() -> None:
    key = "sk-LEAKCANARY1234567890abcdef"
    with pytest.raises(ConfigError, match="must start with http") as info:
        RunConfig(out_dir="o", api_key=key, base_url=key)
    assert "LEAKCANARY" not in str(info.value) and "cdef" not in str(info.value)
    with pytest.raises(ConfigError, match="user name or password") as creds:
        RunConfig(out_dir="o", api_key=key, base_url=f"http://u:{key}@127.0.0.1:8/v1")
    assert "LEAKCANARY" not in str(creds.value) and "http://127.0.0.1:8/v1" in str(creds.value)


def test_an_api_key_that_is_not_text_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="api_key must be a str"):
        RunConfig(out_dir="o", api_key=None)  # type: ignore[arg-type]


def test_file_naming_may_format_its_fields() -> None:
    config = RunConfig(out_dir="o", api_key="k", name_template="{id}_{index:03d}")
    assert config.output.name_template.format(id="a", index=1) == "a_001"
