"""Tests of sfbatch.loader: formats, line numbers, validation messages, ids, seeds, sharding."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import logging
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfbatch.config import RequestDefaults
from sfbatch.errors import ConfigError, InputFileError
from sfbatch.identity import content_digest, content_id, content_of_request
from sfbatch.loader import (
    ROW_FIELDS,
    JobRows,
    PromptSource,
    Row,
    _row,
    derive_seed,
    image_shard_dir,
    shard_of,
)
from sfbatch.models import DEFAULT_MODEL, SEED_MAX, ModelRegistry

REG = ModelRegistry.builtin()


def write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def jsonl(*objs: Any) -> str:
    return "".join(orjson.dumps(o).decode() + "\n" for o in objs)


def rows(path: Path | str, **kwargs: Any) -> list[Row]:
    kwargs.setdefault("registry", REG)
    return list(PromptSource(path, **kwargs))


def cid(prompt: str, nth: int = 1, **fields: Any) -> str:
    """The content id of the ``nth`` row asking for ``prompt`` (and ``fields``), by definition."""
    request = {"model": DEFAULT_MODEL, "prompt": prompt, **fields}
    return content_id(content_digest(content_of_request(request, REG)), nth)


def is_content_id(row_id: str) -> bool:
    return len(row_id) == 12 and all(c in "0123456789abcdef" for c in row_id)


# -- .txt --------------------------------------------------------------------------


def test_txt_skips_blank_lines_but_counts_them(tmp_path: Path) -> None:
    p = write(tmp_path / "p.txt", "\ufeffa cat\n\n   \n  a  dog  \r\n\t\nlast without newline")
    got = rows(p)
    assert [(r.line, r.id, r.prompt) for r in got] == [
        (1, cid("a cat"), "a cat"),
        (4, cid("a  dog"), "a  dog"),
        (6, cid("last without newline"), "last without newline"),
    ]
    r = got[1]
    assert r.valid and r.error is None and r.file == str(p) and r.variation == 0
    seed = derive_seed(0, cid("a  dog"), 0)
    assert r.request == {"model": DEFAULT_MODEL, "prompt": "a  dog", "seed": seed}


def test_bad_utf8_line_is_one_invalid_row(tmp_path: Path) -> None:
    p = write(tmp_path / "p.txt", b"ok 1\nbad \xff\xfe bytes\nok 3\n")
    got = rows(p)
    assert [r.valid for r in got] == [True, False, True]
    assert got[1].error == f"{p}:2: not valid UTF-8"
    assert is_content_id(got[1].id) and got[1].request is None and got[1].prompt is None


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.text(st.characters(exclude_categories=["Cs"]), min_size=0, max_size=30).filter(
            lambda s: "\n" not in s and "\r" not in s
        ),
        max_size=20,
    )
)
def test_txt_round_trip(tmp_path_factory: pytest.TempPathFactory, prompts: list[str]) -> None:
    p = tmp_path_factory.mktemp("rt") / "p.txt"
    # str.splitlines() separators other than \n (e.g. \x1c, \u2028) are not line ends here.
    p.write_bytes("".join(s + "\n" for s in prompts).encode())
    expected = [(i, s.strip()) for i, s in enumerate(prompts, 1) if s.strip()]
    assert [(r.line, r.prompt) for r in rows(p)] == expected


# -- .jsonl ------------------------------------------------------------------------


def test_jsonl_fields_ids_and_errors(tmp_path: Path) -> None:
    p = write(
        tmp_path / "p.jsonl",
        jsonl({"prompt": "a", "id": "first", "negative_prompt": "blurry", "batch_size": 2})
        + "\n"
        + jsonl({"prompt": "b", "id": 42, "seed": 7, "prompt_enhancement": True})
        + "not json\n"
        + "[1, 2]\n"
        + jsonl({"id": "x"})
        + jsonl({"prompt": "c", "id": None}),
    )
    got = rows(p)
    assert [(r.line, r.valid) for r in got] == [
        (1, True),
        (3, True),
        (4, False),
        (5, False),
        (6, False),
        (7, True),
    ]
    assert [r.id for r in got[:2]] == ["first", "42"] and got[4].id == "x"
    assert is_content_id(got[2].id) and is_content_id(got[3].id) and got[5].id == cid("c")
    assert got[0].request == {
        "model": DEFAULT_MODEL,
        "prompt": "a",
        "negative_prompt": "blurry",
        "batch_size": 2,
        "seed": derive_seed(0, "first", 0),
    }
    assert got[1].request is not None
    assert got[1].request["seed"] == 7 and got[1].request["prompt_enhancement"] is True
    assert got[2].error is not None and got[2].error.startswith(f"{p}:4: not a JSON object")
    assert got[3].error == f"{p}:5: not a JSON object (got an array)"
    assert got[4].error == f"{p}:6: missing prompt"


def test_jsonl_bad_utf8_line(tmp_path: Path) -> None:
    p = write(tmp_path / "p.jsonl", b'{"prompt": "ok"}\n{"prompt": "\xff"}\n{"prompt": "ok"}\n')
    got = rows(p)
    assert [r.valid for r in got] == [True, False, True]
    assert got[1].error == f"{p}:2: not valid UTF-8"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("batch_size", 9, "batch_size must be 1..4, got 9"),
        ("batch_size", "2", "batch_size must be an integer, got '2'"),
        ("seed", -1, "seed must be 0..9999999999, got -1"),
        ("seed", SEED_MAX + 1, "seed must be 0..9999999999, got 10000000000"),
        ("num_inference_steps", 51, "num_inference_steps must be 1..50, got 51"),
        ("num_inference_steps", 0, "num_inference_steps must be 1..50, got 0"),
        ("guidance_scale", 20.5, "guidance_scale must be 0..20, got 20.5"),
        ("guidance_scale", -1, "guidance_scale must be 0..20, got -1"),
        (
            "image_size",
            "999x999",
            "image_size 999x999 is not offered by stabilityai/stable-diffusion-3-5-large "
            "(one of: 1024x1024, 512x1024, 768x512, 768x1024, 1024x576, 576x1024)",
        ),
        ("image_size", "big", "image_size must look like WIDTHxHEIGHT, got 'big'"),
        ("prompt_enhancement", "yes", "prompt_enhancement must be true or false, got 'yes'"),
        ("negative_prompt", 3, "negative_prompt must be a string, got 3"),
        (
            "cfg",
            4.0,
            "cfg is not accepted by stabilityai/stable-diffusion-3-5-large "
            "(it takes guidance_scale)",
        ),
        (
            "image",
            "http://x/y.png",
            "image is not accepted by stabilityai/stable-diffusion-3-5-large "
            "(it takes no input image)",
        ),
        ("prompt", "   ", "prompt must be a non-empty string"),
    ],
)
def test_out_of_range_field_message(tmp_path: Path, field: str, value: Any, message: str) -> None:
    row = {"prompt": "a cat", "model": "stabilityai/stable-diffusion-3-5-large", field: value}
    p = write(tmp_path / "p.jsonl", jsonl({"prompt": "ok"}, row))
    ok, bad = rows(p)
    assert ok.valid
    assert not bad.valid and bad.request is None
    assert bad.error == f"{p}:2: {message}"


def test_all_reasons_are_joined(tmp_path: Path) -> None:
    p = write(tmp_path / "p.jsonl", jsonl({"id": "../x", "batch_size": 9, "seed": -1}))
    (bad,) = rows(p)
    assert bad.error == (
        f"{p}:1: id '../x' would escape the output directory; missing prompt; "
        "batch_size must be 1..4, got 9; seed must be 0..9999999999, got -1"
    )


def test_image_fields_are_row_fields_checked_at_load_time(tmp_path: Path) -> None:
    # sfbatch.inputs has the details (tests/test_inputs.py); here: the loader wires them in.
    p = write(
        tmp_path / "p.jsonl",
        jsonl(
            {"prompt": "a", "model": "Qwen/Qwen-Image-Edit", "image": "https://x.test/a.png"},
            {"prompt": "b", "model": "Qwen/Qwen-Image-Edit", "image": "gone.png"},
        ),
    )
    source = PromptSource(p, registry=REG)
    url, missing = source
    assert url.valid and url.input_digests == ("https://x.test/a.png",)
    assert missing.error == f"{p}:2: image: no such file gone.png (looked at {tmp_path}/gone.png)"
    assert source.warnings == []
    assert {"image", "image2", "image3"} <= ROW_FIELDS


def test_model_specific_rules(tmp_path: Path) -> None:
    p = write(
        tmp_path / "p.jsonl",
        jsonl(
            {"prompt": "a", "model": "Qwen/Qwen-Image", "cfg": 4.0, "image_size": "1328x1328"},
            {
                "prompt": "b",
                "model": "stabilityai/stable-diffusion-3-5-large-turbo",
                "num_inference_steps": 20,
            },
        ),
    )
    qwen, turbo = rows(p)
    assert qwen.valid and qwen.request is not None and qwen.request["cfg"] == 4.0
    assert turbo.error == (
        f"{p}:2: num_inference_steps is fixed at 4 for "
        "stabilityai/stable-diffusion-3-5-large-turbo, got 20"
    )


def test_unknown_model_warns_once_and_passes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = write(
        tmp_path / "p.jsonl", jsonl(*({"prompt": f"p{i}", "model": "new/model"} for i in range(5)))
    )
    src = PromptSource(p, registry=REG)
    with caplog.at_level(logging.WARNING, logger="sfbatch"):
        got = list(src)
    assert all(r.valid for r in got)
    assert got[0].request is not None and got[0].request["model"] == "new/model"
    assert len(src.warnings) == 1
    assert src.warnings[0].startswith(
        f"{p}: model 'new/model' is not in the model rules; checked with generic rules"
    )
    assert "--models-file" in src.warnings[0]
    assert [r.getMessage() for r in caplog.records] == src.warnings


def test_unknown_default_model_warns_once(tmp_path: Path) -> None:
    p = write(tmp_path / "p.txt", "a\nb\n")
    src = PromptSource(p, registry=REG, defaults=RequestDefaults(model="new/model"))
    assert all(r.valid for r in src)
    assert len(src.warnings) == 1 and "new/model" in src.warnings[0]


def test_unknown_key_warns_once_and_is_ignored(tmp_path: Path) -> None:
    p = write(
        tmp_path / "prompts.jsonl", jsonl({"prompt": "a", "sead": 1}, {"prompt": "b", "sead": 2})
    )
    src = PromptSource(p, registry=REG)
    got = list(src)
    assert all(r.valid for r in got)
    assert got[0].request is not None and "sead" not in got[0].request
    assert src.warnings == [f"{p}:1: unknown field 'sead' ignored (did you mean 'seed'?)"]


@pytest.mark.parametrize(
    ("row_id", "reason"),
    [
        ("../x", "id '../x' would escape the output directory"),
        ("a/b", "id 'a/b' would escape the output directory"),
        ("a\\b", "id 'a\\\\b' would escape the output directory"),
        (".hidden", "id '.hidden' would escape the output directory"),
        (".", "id '.' would escape the output directory"),
        ("..", "id '..' would escape the output directory"),
        ("", "id is empty"),
        ("a\x00b", "id 'a\\x00b' contains a control character"),
        ("a\nb", "id 'a\\nb' contains a control character"),
        ("x" * 201, "id is longer than 200 characters"),
        (True, "id must be a string or a number, got True"),
        ([1], "id must be a string or a number, got [1]"),
    ],
)
def test_unsafe_ids_are_invalid(tmp_path: Path, row_id: Any, reason: str) -> None:
    p = write(tmp_path / "p.jsonl", jsonl({"prompt": "a", "id": row_id}))
    (bad,) = rows(p)
    assert bad.error == f"{p}:1: {reason}"
    assert is_content_id(bad.id)  # never the unsafe id
    assert bad.prompt == "a"


@pytest.mark.parametrize(
    ("row_id", "expected"),
    [("a b", "a b"), ("ünï-çödé", "ünï-çödé"), (7, "7"), (7.0, "7"), ("x" * 200, "x" * 200)],
)
def test_safe_ids(tmp_path: Path, row_id: Any, expected: str) -> None:
    p = write(tmp_path / "p.jsonl", jsonl({"prompt": "a", "id": row_id}))
    (row,) = rows(p)
    assert row.valid and row.id == expected


def test_duplicate_id_later_row_is_invalid(tmp_path: Path) -> None:
    p = write(
        tmp_path / "p.jsonl",
        jsonl({"prompt": "a", "id": "k"}, {"prompt": "b", "id": "j"}, {"prompt": "c", "id": "k"}),
    )
    first, other, dup = rows(p)
    assert first.valid and first.id == "k" and other.valid
    assert dup.error == f"{p}:3: duplicate id k (first at {p}:1)"
    assert is_content_id(dup.id)  # its record must not supersede the first row's


# -- .csv / .tsv -------------------------------------------------------------------


def test_csv_multiline_cells_and_conversions(tmp_path: Path) -> None:
    p = write(
        tmp_path / "p.csv",
        "\ufeffPrompt, Seed ,batch_size,guidance_scale,prompt_enhancement,id\r\n"
        '"a cat,\r\non two lines",5.0,2,7.5,yes,c1\r\n'
        "\r\n"
        "a dog,,,,No,\r\n"
        '"quoted ""word""",1,1,0,0,c3\r\n',
    )
    got = rows(p)
    assert [(r.line, r.id, r.prompt) for r in got] == [
        (2, "c1", "a cat,\r\non two lines"),
        (5, cid("a dog"), "a dog"),  # an explicit default (No) is no change
        (6, "c3", 'quoted "word"'),
    ]
    assert got[0].request == {
        "model": DEFAULT_MODEL,
        "prompt": "a cat,\r\non two lines",
        "seed": 5,
        "batch_size": 2,
        "guidance_scale": 7.5,
        "prompt_enhancement": True,
    }
    assert got[1].request is not None
    assert got[1].request["prompt_enhancement"] is False
    assert "seed" in got[1].request and "batch_size" not in got[1].request  # empty = absent


@pytest.mark.parametrize(
    ("column", "cell", "message"),
    [
        ("seed", "abc", "seed must be an integer, got 'abc'"),
        ("seed", "1.5", "seed must be an integer, got '1.5'"),
        ("batch_size", "two", "batch_size must be an integer, got 'two'"),
        ("num_inference_steps", "1e999", "num_inference_steps must be an integer, got '1e999'"),
        ("guidance_scale", "high", "guidance_scale must be a number, got 'high'"),
        ("cfg", "x", "cfg must be a number, got 'x'"),
        (
            "prompt_enhancement",
            "maybe",
            "prompt_enhancement must be true/false/1/0/yes/no, got 'maybe'",
        ),
    ],
)
def test_csv_conversion_errors_name_the_column(
    tmp_path: Path, column: str, cell: str, message: str
) -> None:
    p = write(tmp_path / "p.csv", f'prompt,{column}\nfine,\n"multi\nline",{cell}\nnext,\n')
    got = rows(p)
    assert [r.line for r in got] == [2, 3, 5]
    assert got[1].error == f"{p}:3: {message}"
    assert got[1].prompt == "multi\nline"
    assert got[0].valid and got[2].valid


def test_csv_row_problems(tmp_path: Path) -> None:
    p = write(
        tmp_path / "p.csv",
        b"prompt,negative_prompt,notes\n"
        b"ok,,whatever\n"
        b"a cat, sitting,blurry,x,extra\n"
        b"bad \xff byte,,\n"
        b",blurry,\n"
        b"short\n",
    )
    src = PromptSource(p, registry=REG)
    got = list(src)
    assert [(r.line, r.valid) for r in got] == [
        (2, True),
        (3, False),
        (4, False),
        (5, False),
        (6, True),
    ]
    assert got[1].error == f"{p}:3: row has 5 fields, the header has 3"
    assert got[2].error == f"{p}:4: not valid UTF-8"
    assert got[3].error == f"{p}:5: missing prompt"
    assert src.warnings == [f"{p}:1: unknown field 'notes' ignored"]


def test_csv_malformed_row_does_not_stop_the_file(tmp_path: Path) -> None:
    p = write(tmp_path / "p.csv", 'prompt\nok\n"' + "x" * 200 + '"\nafter\n')
    old = csv.field_size_limit(100)
    try:
        got = rows(p)
    finally:
        csv.field_size_limit(old)
    assert [(r.line, r.valid) for r in got] == [(2, True), (3, False), (4, True)]
    assert got[1].error is not None and got[1].error.startswith(f"{p}:3: malformed CSV row")


def test_csv_header_without_prompt_column(tmp_path: Path) -> None:
    p = write(tmp_path / "p.csv", "a cat\na dog\n")
    with pytest.raises(InputFileError, match=r"p\.csv:1: the header row has no 'prompt' column"):
        rows(p)


def test_tsv(tmp_path: Path) -> None:
    p = write(
        tmp_path / "p.tsv",
        "id\tprompt\tnum_inference_steps\nt1\ta cat, with a comma\t30\nt2\ta dog\t101\n",
    )
    good, bad = rows(p)
    assert good.id == "t1" and good.prompt == "a cat, with a comma"
    assert good.request is not None and good.request["num_inference_steps"] == 30
    assert bad.error == f"{p}:3: num_inference_steps must be 1..100, got 101"


# -- gzip, stdin, files ------------------------------------------------------------

FORMAT_SAMPLES = {
    "txt": "a\n\nb\n",
    "jsonl": jsonl({"prompt": "a"}) + "\n" + jsonl({"prompt": "b"}),
    "csv": "prompt\na\n\nb\n",
    "tsv": "prompt\tseed\na\t\n\nb\t\n",
}


@pytest.mark.parametrize("fmt", sorted(FORMAT_SAMPLES))
def test_gzip_gives_the_same_rows(tmp_path: Path, fmt: str) -> None:
    plain = write(tmp_path / f"p.{fmt}", FORMAT_SAMPLES[fmt])
    packed = write(tmp_path / f"p.{fmt}.GZ", gzip.compress(FORMAT_SAMPLES[fmt].encode()))
    expected = [(r.id, r.line, r.request) for r in rows(plain)]
    assert [(r.line, r.prompt) for r in rows(plain)] == [
        (1 + (fmt in ("csv", "tsv")), "a"),
        (3 + (fmt in ("csv", "tsv")), "b"),
    ]
    src = PromptSource(packed, registry=REG)
    assert [(r.id, r.line, r.request) for r in src] == expected
    assert src.total_bytes == packed.stat().st_size
    assert src.bytes_read == src.total_bytes


def test_corrupt_gzip_mid_file(tmp_path: Path) -> None:
    data = gzip.compress(b"".join(b"prompt %d\n" % i for i in range(200_000)))
    mid = len(data) // 2
    p = write(tmp_path / "p.txt.gz", data[:mid] + b"\xff" * 5000 + data[mid + 5000 :])
    seen = 0
    with pytest.raises(
        InputFileError, match=r"p\.txt\.gz: corrupt or truncated gzip data after line"
    ):
        for _ in PromptSource(p, registry=REG):
            seen += 1
    assert seen > 1000  # the rows before the damage were delivered


def test_truncated_gzip(tmp_path: Path) -> None:
    data = gzip.compress(b"".join(b"prompt %d\n" % i for i in range(50_000)))
    p = write(tmp_path / "p.jsonl.gz", data[:-100])
    with pytest.raises(
        InputFileError, match=r"p\.jsonl\.gz: corrupt or truncated gzip data after line [1-9]"
    ):
        list(PromptSource(p, registry=REG))


def test_not_gzip_at_all(tmp_path: Path) -> None:
    p = write(tmp_path / "p.csv.gz", "prompt\na\n")
    with pytest.raises(InputFileError, match="after line 0"):
        list(PromptSource(p, registry=REG))


def test_stdin_txt_and_jsonl() -> None:
    data = b"\n  \na cat\nb\n"
    src = PromptSource("-", registry=REG, stdin=io.BytesIO(data))
    got = list(src)
    assert src.total_bytes is None and src.bytes_read == len(data)
    assert [(r.file, r.line, r.prompt) for r in got] == [("-", 3, "a cat"), ("-", 4, "b")]

    data = b"\n" + jsonl({"prompt": "x", "id": "i1"}, {"prompt": "y"}).encode()
    got = rows("-", stdin=io.BytesIO(data))
    assert [(r.id, r.line, r.prompt) for r in got] == [("i1", 2, "x"), (cid("y"), 3, "y")]

    assert rows("-", stdin=io.BytesIO(b"")) == []
    assert rows("-", stdin=io.BytesIO(b"\n\n")) == []


def test_stdin_limit_reads_no_further() -> None:
    stream = io.BytesIO(b"a\nb\nc\nd\n")
    got = rows("-", stdin=stream, limit=2)
    assert [r.prompt for r in got] == ["a", "b"]
    assert stream.tell() == 4


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match=r"nope\.txt: cannot open: No such file"):
        PromptSource(tmp_path / "nope.txt")
    (tmp_path / "d.txt").mkdir()
    with pytest.raises(InputFileError, match=r"d\.txt: cannot open"):
        PromptSource(tmp_path / "d.txt")


def test_file_removed_before_iteration(tmp_path: Path) -> None:
    p = write(tmp_path / "p.txt", "a\n")
    src = PromptSource(p)
    p.unlink()
    with pytest.raises(InputFileError, match="cannot open"):
        list(src)


@pytest.mark.parametrize("name", ["p.json", "p.gz", "p", "p.txt.bz2"])
def test_unknown_extension(tmp_path: Path, name: str) -> None:
    write(tmp_path / name, "a\n")
    with pytest.raises(ConfigError, match=r"unknown prompt file type; supported: \.txt") as info:
        PromptSource(tmp_path / name)
    assert not isinstance(info.value, InputFileError)
    assert name in str(info.value)


def test_bad_arguments(tmp_path: Path) -> None:
    p = write(tmp_path / "p.txt", "a\n")
    for kwargs in ({"variations": 0}, {"limit": -1}, {"shard": (2, 2)}, {"shard": (0, 0)}):
        with pytest.raises(ConfigError):
            PromptSource(p, **kwargs)


def test_iterating_again_gives_the_same_rows(tmp_path: Path) -> None:
    p = write(tmp_path / "p.jsonl", jsonl({"prompt": "a", "id": "k"}, {"prompt": "b"}))
    src = PromptSource(p, registry=REG, dedupe=True)
    assert list(src) == list(src)
    assert all(r.valid for r in src)  # the seen-id set starts afresh


# -- seeds, variations, defaults ---------------------------------------------------


def test_derive_seed_golden_values() -> None:
    # Resumed runs and other machines must derive the same seeds: pin the function.
    assert derive_seed(0, "000000001", 0) == 3804440239
    assert derive_seed(42, "abc", 3) == 4025722965


@given(st.integers(-(2**70), 2**70), st.text(max_size=50), st.integers(0, 10_000))
def test_derive_seed_range_and_determinism(base: int, row_id: str, k: int) -> None:
    seed = derive_seed(base, row_id, k)
    assert 0 <= seed <= SEED_MAX
    assert seed == derive_seed(base, row_id, k)


def test_derive_seed_is_stable_across_processes() -> None:
    code = "from sfbatch.loader import derive_seed; print(derive_seed(5, 'row-1', 2))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": str(hashseed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for hashseed in (1, 2)
    }
    assert outs == {str(derive_seed(5, "row-1", 2))}


def test_variations(tmp_path: Path) -> None:
    p = write(
        tmp_path / "p.jsonl",
        jsonl(
            {"prompt": "a"},
            {"prompt": "b", "id": "s", "seed": 11},
            {"prompt": "c", "batch_size": 9},
        ),
    )
    got = rows(p, variations=3, base_seed=5)
    a, c = cid("a"), got[6].id.removesuffix("-v0")
    assert is_content_id(c)
    assert [r.id for r in got] == [
        f"{a}-v0",
        f"{a}-v1",
        f"{a}-v2",
        "s-v0",
        "s-v1",
        "s-v2",
        f"{c}-v0",
        f"{c}-v1",
        f"{c}-v2",
    ]
    assert len({r.fingerprint for r in got}) == 9
    assert [r.variation for r in got] == [0, 1, 2] * 3
    seeds = [r.request["seed"] for r in got[:6] if r.request is not None]
    assert seeds == [
        derive_seed(5, a, 0),
        derive_seed(5, a, 1),
        derive_seed(5, a, 2),
        11,
        derive_seed(11, "s", 1),
        derive_seed(11, "s", 2),
    ]
    assert len(set(seeds)) == 6
    # variation 0 of a derived seed is the seed the row gets without variations
    assert seeds[0] == rows(p, base_seed=5)[0].request["seed"]  # type: ignore[index]
    invalid = got[6:]
    assert all(r.error == f"{p}:3: batch_size must be 1..4, got 9" for r in invalid)
    assert all(r.request is None for r in invalid)


def test_defaults_and_per_row_overrides(tmp_path: Path) -> None:
    p = write(
        tmp_path / "p.jsonl",
        jsonl(
            {"prompt": "a"},
            {"prompt": "b", "image_size": "1024x1024", "seed": 3, "negative_prompt": "ugly"},
            {"prompt": "c", "image_size": None},
        ),
    )
    defaults = RequestDefaults(
        image_size="768x512", num_inference_steps=30, seed=99, negative_prompt="blurry"
    )
    a, b, c = rows(p, defaults=defaults, variations=1)
    assert a.request == {
        "model": DEFAULT_MODEL,
        "prompt": "a",
        "image_size": "768x512",
        "num_inference_steps": 30,
        "seed": 99,
        "negative_prompt": "blurry",
    }
    assert b.request is not None and c.request is not None
    assert (b.request["image_size"], b.request["seed"], b.request["negative_prompt"]) == (
        "1024x1024",
        3,
        "ugly",
    )
    assert c.request["image_size"] == "768x512"  # null means "not given"
    v = rows(p, defaults=defaults, variations=2)
    assert [r.request["seed"] for r in v[:2]] == [99, derive_seed(99, a.id, 1)]  # type: ignore[index]


def test_invalid_defaults_make_rows_invalid_unless_overridden(tmp_path: Path) -> None:
    p = write(tmp_path / "p.jsonl", jsonl({"prompt": "a"}, {"prompt": "b", "batch_size": 2}))
    a, b = rows(p, defaults=RequestDefaults(batch_size=9))
    assert a.error == f"{p}:1: batch_size must be 1..4, got 9"
    assert b.valid
    t = write(tmp_path / "p.txt", "x\n")
    (x,) = rows(t, defaults=RequestDefaults(batch_size=9))
    assert x.error == f"{t}:1: batch_size must be 1..4, got 9"


# -- shard, limit, dedupe ----------------------------------------------------------


def test_shard_partition(tmp_path: Path) -> None:
    objs = [
        {"prompt": f"p{i}", "id": f"id{i}"} if i % 3 else {"prompt": f"p{i}"} for i in range(300)
    ]
    objs[7] = {"prompt": "unsafe", "id": "../x"}  # invalid: sharded by its content id
    p = write(tmp_path / "p.jsonl", jsonl(*objs))
    everything = rows(p)
    parts = [rows(p, shard=(i, 4)) for i in range(4)]
    ids = [r.id for part in parts for r in part]
    assert len(ids) == len(set(ids)) == 300  # disjoint
    assert set(ids) == {r.id for r in everything}  # and together they are everything
    assert all(len(part) > 40 for part in parts)
    for i, part in enumerate(parts):
        assert all(shard_of(r.id, 4) == i for r in part)
    unsafe = everything[7].id
    assert is_content_id(unsafe) and unsafe in {r.id for r in parts[shard_of(unsafe, 4)]}


def test_shard_of_and_image_shard_dir() -> None:
    assert shard_of("000000001", 7) == 2
    assert all(shard_of(f"x{i}", 5) in range(5) for i in range(100))
    with pytest.raises(ValueError):
        shard_of("a", 0)
    assert image_shard_dir("000042017") == "042"
    assert image_shard_dir("1234567") == "234"
    assert image_shard_dir("7") == "000"
    assert image_shard_dir("abc") == "984"
    assert image_shard_dir("000000042-v1") == image_shard_dir("000000042-v1")
    assert all(len(image_shard_dir(f"r{i}")) == 3 for i in range(100))


def test_limit_counts_input_rows_not_blank_lines(tmp_path: Path) -> None:
    p = write(
        tmp_path / "p.jsonl",
        "\n" + jsonl({"prompt": "a"}) + "bad\n\n" + jsonl({"prompt": "c"}, {"prompt": "d"}),
    )
    assert [r.line for r in rows(p, limit=3)] == [2, 3, 5]
    a, bad = (r.id for r in rows(p, limit=2))
    assert [r.id for r in rows(p, limit=2, variations=2)] == [
        f"{a}-v0",
        f"{a}-v1",
        f"{bad}-v0",
        f"{bad}-v1",
    ]
    assert rows(p, limit=0) == []


def test_limit_applies_before_shard(tmp_path: Path) -> None:
    p = write(tmp_path / "p.txt", "".join(f"p{i}\n" for i in range(100)))
    limited = {r.id for r in rows(p, limit=40)}
    sharded = [{r.id for r in rows(p, limit=40, shard=(i, 3))} for i in range(3)]
    assert set().union(*sharded) == limited and sum(map(len, sharded)) == 40


def test_dedupe(tmp_path: Path) -> None:
    p = write(
        tmp_path / "p.jsonl",
        jsonl(
            {"prompt": "cat", "id": "a"},
            {"prompt": "dog"},
            {"prompt": "cat", "seed": 5},  # the seed does not count
            {"prompt": "cat", "batch_size": 2},  # other parameters do
            {"prompt": "cat", "id": "e", "model": DEFAULT_MODEL},
            {"prompt": "cat", "batch_size": 9},  # invalid rows are never duplicates
        ),
    )
    got = rows(p, dedupe=True)
    assert [r.duplicate_of for r in got] == [None, None, "a", None, "a", None]
    assert got[2].request is not None and got[2].request["seed"] == 5
    assert [r.duplicate_of for r in rows(p)] == [None] * 6
    v = rows(p, dedupe=True, variations=2)
    assert [r.duplicate_of for r in v[4:6]] == ["a-v0", "a-v1"]


# -- progress, counting, memory, Row -----------------------------------------------


def test_count_rows(tmp_path: Path) -> None:
    text = "a\n\n  \r\nb\r\nc"
    p = write(tmp_path / "p.txt", text)
    assert PromptSource(p).count_rows() == 3 == len(rows(p))
    assert PromptSource(p, limit=2, variations=3).count_rows() == 6
    big = write(tmp_path / "big.jsonl", ("\n" + jsonl({"prompt": "x" * 100})) * 30_000)
    assert PromptSource(big).count_rows() == 30_000
    assert PromptSource(write(tmp_path / "p.txt.gz", gzip.compress(b"a\n"))).count_rows() is None
    assert PromptSource(write(tmp_path / "p.csv", "prompt\na\n")).count_rows() is None
    assert PromptSource(p, shard=(0, 2)).count_rows() is None
    assert PromptSource("-", stdin=io.BytesIO(b"a\n")).count_rows() is None


def test_bytes_read_grows(tmp_path: Path) -> None:
    p = write(tmp_path / "p.txt", "".join(f"prompt {i}\n" for i in range(100_000)))
    src = PromptSource(p)
    assert src.bytes_read == 0
    it = iter(src)
    next(it)
    middle = [next(it) for _ in range(50_000)]
    assert 0 < src.bytes_read < src.total_bytes  # type: ignore[operator]
    del middle
    for _ in it:
        pass
    assert src.bytes_read == src.total_bytes == p.stat().st_size


def test_streaming_memory_stays_small(tmp_path: Path) -> None:
    p = tmp_path / "big.txt"
    with open(p, "w") as f:
        for i in range(200_000):
            f.write(f"a watercolor painting of lighthouse number {i} at dusk, seagulls\n")
    assert p.stat().st_size > 12_000_000
    tracemalloc.start()
    try:
        count = 0
        for row in PromptSource(p):
            count += row.valid
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 200_000
    assert peak < 20 * 1024 * 1024, peak


def test_row_is_frozen_and_fast_constructor_matches() -> None:
    fast = _row("a", 1, "f", 0, {"prompt": "x"}, None, "x", "b")
    assert fast == Row("a", 1, "f", 0, {"prompt": "x"}, None, "x", "b")
    assert fast.valid and not Row("a", 1, "f", 0, None, "f:1: bad", None).valid
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.id = "b"  # type: ignore[misc]


# -- identity: ids that survive edits, fingerprints, one id space per job ----------


def test_ids_survive_inserted_deleted_moved_and_repeated_lines(tmp_path: Path) -> None:
    lines = [f"prompt {i}" for i in range(20)]
    before = {r.prompt: r for r in rows(write(tmp_path / "a.txt", "\n".join(lines)))}
    edited = ["a new first line", *lines[:5], *lines[6:12], lines[15], *lines[12:15], *lines[16:]]
    after = {r.prompt: r for r in rows(write(tmp_path / "b.txt", "\n\n".join(edited)))}
    for prompt, row in after.items():
        if prompt in before:  # moved or not, the same id, seed and fingerprint
            old = before[prompt]
            assert (row.id, row.fingerprint, row.request) == (old.id, old.fingerprint, old.request)
    assert after["a new first line"].id not in {r.id for r in before.values()}

    repeated = rows(write(tmp_path / "c.txt", "same\nother\nsame\nsame\n"))
    assert [r.id for r in repeated] == [cid("same"), cid("other"), cid("same", 2), cid("same", 3)]
    assert len({r.request["seed"] for r in repeated}) == 4  # type: ignore[index]
    deleted = rows(write(tmp_path / "d.txt", "other\nsame\nsame\n"))
    assert [r.id for r in deleted] == [cid("other"), cid("same"), cid("same", 2)]


def test_content_ids_do_not_collide_with_explicit_ids(tmp_path: Path) -> None:
    taken = cid("a")
    p = write(tmp_path / "p.jsonl", jsonl({"prompt": "z", "id": taken}, {"prompt": "a"}))
    explicit, content = rows(p)
    assert explicit.id == taken and content.id == cid("a", 2)
    q = write(tmp_path / "q.jsonl", jsonl({"prompt": "a"}, {"prompt": "z", "id": taken}))
    first, clash = rows(q)
    assert first.id == taken and clash.error is not None and "duplicate id" in clash.error


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt", "b"),
        ("model", "black-forest-labs/FLUX.1-schnell"),
        ("negative_prompt", "blurry"),
        ("image_size", "768x1024"),
        ("num_inference_steps", 21),
        ("guidance_scale", 7.0),
        ("batch_size", 2),
        ("seed", 1234),
        ("prompt_enhancement", True),
    ],
)
def test_the_fingerprint_changes_with_each_field(tmp_path: Path, field: str, value: Any) -> None:
    base = {"prompt": "a", "id": "k"}
    p = write(tmp_path / "p.jsonl", jsonl(base, {**base, field: value, "id": "k2"}))
    a, b = rows(p)
    assert a.valid and b.valid, b.error
    assert a.fingerprint != b.fingerprint


def test_the_fingerprint_ignores_explicit_defaults_and_sees_variations_and_inputs(
    tmp_path: Path,
) -> None:
    explicit = {
        "model": DEFAULT_MODEL,
        "image_size": "1024x1024",
        "num_inference_steps": 20,
        "guidance_scale": 7.5,
        "batch_size": 1,
        "prompt_enhancement": False,
        "negative_prompt": "",
    }
    p = write(tmp_path / "p.jsonl", jsonl({"prompt": "a", "id": "k"}, {"prompt": "a", **explicit}))
    plain, spelled_out = rows(p)
    assert spelled_out.id == cid("a")  # the same content as a bare "a"
    same_seed = rows(write(tmp_path / "q.jsonl", jsonl({"prompt": "a", "id": cid("a")})))[0]
    assert spelled_out.fingerprint == same_seed.fingerprint
    assert plain.fingerprint != spelled_out.fingerprint  # another id: another derived seed
    v = rows(p, variations=2)
    assert len({r.fingerprint for r in v}) == 4
    fixed = rows(p, defaults=RequestDefaults(seed=5))
    assert fixed[0].request["seed"] == fixed[1].request["seed"] == 5  # type: ignore[index]
    assert fixed[0].fingerprint == fixed[1].fingerprint  # same request, same images
    content = content_of_request({"prompt": "a", "model": DEFAULT_MODEL}, REG)
    with_input = content_of_request({"prompt": "a", "model": DEFAULT_MODEL}, REG, ("ab" * 32,))
    assert content_digest(content) != content_digest(with_input)


def test_ids_never_collide_across_the_files_of_a_job(tmp_path: Path) -> None:
    a = write(tmp_path / "a.jsonl", jsonl({"prompt": "cat"}, {"prompt": "x", "id": "k"}))
    b = write(tmp_path / "b.jsonl", jsonl({"prompt": "dog", "id": "k"}, {"prompt": "cat"}))
    job = JobRows([PromptSource(a, registry=REG), PromptSource(b, registry=REG)])
    got = list(job)
    assert [r.id for r in got] == [cid("cat"), "k", got[2].id, cid("cat", 2)]
    assert is_content_id(got[2].id)
    assert got[2].error == f"{b}:1: duplicate id k (first at {a}:2)"
    assert list(job) == got  # each pass starts afresh
    assert [r.id for r in rows(b)] == ["k", cid("cat")]  # alone, b's rows are the first
