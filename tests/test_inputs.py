"""Tests of sfbatch.inputs and the loader's image inputs: paths, URLs, data URIs, checks, digests.

The end-to-end test runs the real engine against the emulator over loopback and looks at the
bodies the emulator received.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from PIL import Image

from sfbatch.config import RequestDefaults, RunConfig
from sfbatch.emulator import Emulator
from sfbatch.errors import ConfigError
from sfbatch.inputs import (
    MAX_INPUT_BYTES,
    ImageInput,
    InputChecker,
    InputImageError,
    abbreviate_source,
    input_kind,
    input_records,
    materialize,
)
from sfbatch.loader import PromptSource, Row
from sfbatch.manifest import latest_records
from sfbatch.models import ModelRegistry
from sfbatch.pipeline import Pipeline

REPO = Path(__file__).resolve().parent.parent
EDIT = "Qwen/Qwen-Image-Edit"  # takes `image` (required)
EDIT3 = "Qwen/Qwen-Image-Edit-2509"  # takes `image` (required), `image2`, `image3`
# Until the model rules of today land (emu branch), describe EDIT3 here; afterwards the
# built-in rule is used and this file is not written.
_EDIT3_RULE = f"""
[models."{EDIT3}"]
max_pixels = 4194304
default_size = "1328x1328"
steps = [1, 100]
default_steps = 20
guidance_field = "cfg"
guidance = [0.1, 20.0]
default_guidance = 4.0
batch_size = [1, 1]
takes_image = true
"""


def models_file(tmp_path: Path) -> Path | None:
    if EDIT3 in ModelRegistry.builtin():
        return None
    path = tmp_path / "models.toml"
    path.write_text(_EDIT3_RULE)
    return path


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry.load(models_file(tmp_path))


def image_bytes(fmt: str = "PNG", color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), color).save(buf, fmt)
    return buf.getvalue()


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def jsonl(*objs: Any) -> str:
    return "".join(orjson.dumps(o).decode() + "\n" for o in objs)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rows(path: Path | str, registry: ModelRegistry, **kwargs: Any) -> list[Row]:
    return list(PromptSource(path, registry=registry, **kwargs))


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def decode_data_uri(uri: str) -> bytes:
    header, _, payload = uri.partition(",")
    assert header.endswith(";base64")
    return base64.b64decode(payload)


# -- kinds, records -------------------------------------------------------------------


def test_input_kind() -> None:
    assert input_kind("https://x.test/a.png") == "url"
    assert input_kind("HTTP://x.test/a.png") == "url"
    assert input_kind("data:image/png;base64,AAAA") == "data"
    assert input_kind("cat.png") == "path"
    assert input_kind("/abs/cat.png") == "path"
    assert input_kind("~/cat.png") == "path"
    assert input_kind("ftp://x.test/a.png") is None


def test_records_list_inputs_and_never_a_whole_data_uri() -> None:
    uri = data_uri(image_bytes())
    inputs = (
        ImageInput("image", "cat.png", "path", sha256="a" * 64, path=Path("/d/cat.png")),
        ImageInput("image2", uri, "data", sha256="b" * 64),
        ImageInput("image3", "https://x.test/c.png", "url"),
    )
    records = input_records(inputs)
    assert records[0] == {"field": "image", "source": "cat.png", "sha256": "a" * 64}
    assert records[2] == {"field": "image3", "source": "https://x.test/c.png", "sha256": None}
    assert records[1]["field"] == "image2" and records[1]["sha256"] == "b" * 64
    assert records[1]["source"] == abbreviate_source(uri)
    assert records[1]["source"].startswith("data:image/png;base64,")
    assert f"({len(uri)} chars)" in records[1]["source"] and len(records[1]["source"]) < 70
    assert abbreviate_source("data:,x") == "data:,x"


# -- the loader: where paths are taken from ------------------------------------------------


def test_relative_path_is_taken_from_the_input_files_folder(
    tmp_path: Path, registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    cat = image_bytes()
    write(tmp_path / "job" / "pics" / "cat.png", cat)
    write(tmp_path / "elsewhere" / "pics" / "cat.png", image_bytes(color=(0, 0, 0)))
    p = write(tmp_path / "job" / "p.jsonl", jsonl({"prompt": "a", "image": "pics/cat.png"}))
    monkeypatch.chdir(tmp_path / "elsewhere")
    (row,) = rows(p, registry, defaults=RequestDefaults(model=EDIT))
    assert row.valid, row.error
    assert row.request is not None and row.request["image"] == "pics/cat.png"  # as written
    (item,) = row.inputs
    assert (item.field, item.source, item.kind) == ("image", "pics/cat.png", "path")
    assert item.path == tmp_path / "job" / "pics" / "cat.png"
    assert item.sha256 == sha256(cat) and item.size_bytes == len(cat)
    assert row.input_digests == (sha256(cat),)


def test_absolute_and_home_paths(
    tmp_path: Path, registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    cat, dog = image_bytes(), image_bytes("JPEG")
    write(tmp_path / "abs" / "cat.png", cat)
    write(tmp_path / "home" / "dog.jpg", dog)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    p = write(
        tmp_path / "in" / "p.jsonl",
        jsonl(
            {"prompt": "a", "image": str(tmp_path / "abs" / "cat.png")},
            {"prompt": "b", "image": "~/dog.jpg"},
        ),
    )
    a, b = rows(p, registry, defaults=RequestDefaults(model=EDIT))
    assert a.valid and b.valid, (a.error, b.error)
    assert a.inputs[0].path == tmp_path / "abs" / "cat.png" and a.input_digests == (sha256(cat),)
    assert b.inputs[0].path == tmp_path / "home" / "dog.jpg" and b.input_digests == (sha256(dog),)
    assert b.request is not None and b.request["image"] == "~/dog.jpg"


def test_url_and_data_uri_are_sent_as_they_are(tmp_path: Path, registry: ModelRegistry) -> None:
    webp = image_bytes("WEBP")
    uri = data_uri(webp, "image/webp")
    url = "https://img.example.com/cat.png?sig=1"
    p = write(
        tmp_path / "p.jsonl", jsonl({"prompt": "a", "image": url}, {"prompt": "b", "image": uri})
    )
    a, b = rows(p, registry, defaults=RequestDefaults(model=EDIT))
    assert a.valid and b.valid, (a.error, b.error)
    assert a.request is not None and a.request["image"] == url
    assert a.inputs == (ImageInput("image", url, "url"),)
    assert a.input_digests == (url,)  # a URL is not fetched: it stands for itself
    assert b.request is not None and b.request["image"] == uri
    assert (b.inputs[0].kind, b.inputs[0].sha256) == ("data", sha256(webp))


def test_csv_columns_image_image2_image3_in_field_order(
    tmp_path: Path, registry: ModelRegistry
) -> None:
    pics = {name: image_bytes(color=(i * 60, 10, 10)) for i, name in enumerate("abc")}
    for name, data in pics.items():
        write(tmp_path / f"{name}.png", data)
    p = write(
        tmp_path / "p.csv",
        f"prompt,image3,image,image2,model\nmerge them,c.png,a.png,b.png,{EDIT3}\n"
        f"just one,,a.png,,{EDIT3}\n",
    )
    three, one = rows(p, registry)
    assert three.valid and one.valid, (three.error, one.error)
    assert [i.field for i in three.inputs] == ["image", "image2", "image3"]
    assert three.input_digests == tuple(sha256(pics[n]) for n in "abc")
    assert three.request is not None
    assert (three.request["image"], three.request["image2"], three.request["image3"]) == (
        "a.png",
        "b.png",
        "c.png",
    )
    assert one.input_digests == (sha256(pics["a"]),)
    assert one.request is not None and "image2" not in one.request


def test_default_image_applies_to_rows_without_one(
    tmp_path: Path, registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    cat, dog = image_bytes(), image_bytes(color=(1, 2, 3))
    write(tmp_path / "cat.png", cat)
    write(tmp_path / "in" / "dog.png", dog)
    p = write(
        tmp_path / "in" / "p.jsonl",
        jsonl({"prompt": "a"}, {"prompt": "b", "image": "dog.png"}, {"prompt": "c", "seed": 4}),
    )
    monkeypatch.chdir(tmp_path)  # the default's relative path is taken from the cwd
    defaults = RequestDefaults(model=EDIT, image="cat.png")
    a, b, c = rows(p, registry, defaults=defaults, variations=2)[::2]
    assert a.input_digests == (sha256(cat),) and c.input_digests == (sha256(cat),)
    assert b.input_digests == (sha256(dog),)
    assert a.request is not None and a.request["image"] == "cat.png"
    # A .txt file: every row takes the fast path, with the default's inputs.
    t = write(tmp_path / "in" / "p.txt", "one\ntwo\n")
    assert [r.input_digests for r in rows(t, registry, defaults=defaults)] == [(sha256(cat),)] * 2


def test_a_bad_default_image_is_a_config_error(tmp_path: Path, registry: ModelRegistry) -> None:
    p = write(tmp_path / "p.txt", "one\n")
    with pytest.raises(ConfigError, match=r"default image: no such file .*nope\.png"):
        PromptSource(p, registry=registry, defaults=RequestDefaults(model=EDIT, image="nope.png"))


def test_variations_share_the_rows_inputs(tmp_path: Path, registry: ModelRegistry) -> None:
    write(tmp_path / "cat.png", image_bytes())
    p = write(tmp_path / "p.jsonl", jsonl({"prompt": "a", "model": EDIT, "image": "cat.png"}))
    got = rows(p, registry, variations=3)
    base = got[0].id.removesuffix("-v0")
    assert [r.id for r in got] == [f"{base}-v0", f"{base}-v1", f"{base}-v2"]
    assert len({r.input_digests for r in got}) == 1 and got[0].input_digests


# -- the loader: bad inputs are invalid rows, with file:line ---------------------------------


@pytest.fixture
def bad_files(tmp_path: Path) -> Path:
    write(tmp_path / "notes.txt", "not a picture at all\n")
    write(tmp_path / "empty.png", b"")
    os.mkdir(tmp_path / "folder.png")
    with open(tmp_path / "big.png", "wb") as f:  # sparse: cheap to make
        f.write(image_bytes())
        f.truncate(MAX_INPUT_BYTES + 1)
    write(tmp_path / "ok.png", image_bytes())
    return tmp_path


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image", "missing.png", "image: no such file missing.png (looked at {dir}/missing.png)"),
        ("image", "notes.txt", "image: notes.txt is not a PNG, JPEG or WebP image"),
        ("image", "empty.png", "image: empty.png is not a PNG, JPEG or WebP image"),
        ("image", "folder.png", "image: folder.png is not a file ({dir}/folder.png)"),
        ("image", "big.png", "image: big.png is 10.0 MB, above the 10.0 MB cap for input images"),
        ("image2", "missing.png", "image2: no such file missing.png (looked at {dir}/missing.png)"),
        ("image3", "notes.txt", "image3: notes.txt is not a PNG, JPEG or WebP image"),
        ("image", 5, "image must be a string (a path, URL or data URI), got 5"),
        ("image", " ", "image is empty"),
        (
            "image",
            "ftp://x.test/a.png",
            "image: ftp://x.test/a.png is not an http(s) URL, a data URI or a local path",
        ),
        ("image", "data:image/png,abc", "image: a data URI must be data:image/...;base64,..."),
        (
            "image",
            "data:image/png;base64,@@@",
            "image: the data URI is not valid base64 (Only base64 data is allowed)",
        ),
        (
            "image",
            data_uri(b"GIF89a......"),
            "image: the data URI is not a PNG, JPEG or WebP image",
        ),
    ],
)
def test_bad_input_images_are_invalid_rows_with_file_and_line(
    bad_files: Path, registry: ModelRegistry, field: str, value: Any, message: str
) -> None:
    row = {"prompt": "b", "model": EDIT3, "image": "ok.png", field: value}
    p = write(bad_files / "p.jsonl", jsonl({"prompt": "a", "model": EDIT3, "image": "ok.png"}, row))
    good, bad = rows(p, registry)
    assert good.valid, good.error
    assert not bad.valid and bad.request is None and bad.inputs == ()
    assert bad.error == f"{p}:2: " + message.format(dir=bad_files)


def test_a_too_big_data_uri_is_invalid(tmp_path: Path, registry: ModelRegistry) -> None:
    huge = data_uri(image_bytes() + bytes(MAX_INPUT_BYTES))
    p = write(tmp_path / "p.jsonl", jsonl({"prompt": "a", "model": EDIT, "image": huge}))
    (bad,) = rows(p, registry)
    assert bad.error is not None and bad.error.startswith(f"{p}:1: image: the data URI's image")
    assert "above the 10.0 MB cap" in bad.error


def test_model_rules_decide_which_fields_an_image_may_fill(
    tmp_path: Path, registry: ModelRegistry
) -> None:
    write(tmp_path / "cat.png", image_bytes())
    p = write(
        tmp_path / "p.csv",
        "prompt,model,image\n"
        "a lighthouse,Kwai-Kolors/Kolors,cat.png\n"  # a text-to-image model: no input
        f"make it blue,{EDIT},\n",  # an edit model without its required image
    )
    not_taken, missing = rows(p, registry)
    assert not_taken.error is not None and not_taken.error.startswith(f"{p}:2: image ")
    assert "Kwai-Kolors/Kolors" in not_taken.error
    assert missing.error is not None and missing.error.startswith(f"{p}:3: image ")
    assert EDIT in missing.error


# -- the digest cache -------------------------------------------------------------------


def test_a_file_named_by_many_rows_is_hashed_once(tmp_path: Path) -> None:
    cat = write(tmp_path / "cat.png", image_bytes())
    checker = InputChecker(tmp_path)
    got = {checker.check("image", "cat.png").sha256 for _ in range(1000)}
    got.add(checker.check("image", str(cat)).sha256)
    assert got == {sha256(cat.read_bytes())} and checker.files_hashed == 1
    # A changed file (new size and mtime) is hashed again.
    write(cat, image_bytes(color=(9, 9, 9)) + b"tail")
    assert checker.check("image", "cat.png").sha256 == sha256(cat.read_bytes())
    assert checker.files_hashed == 2


def test_the_digest_cache_is_bounded(tmp_path: Path) -> None:
    for name in "ab":
        write(tmp_path / f"{name}.png", image_bytes())
    checker = InputChecker(tmp_path, cache_size=1)
    for _ in range(3):
        checker.check("image", "a.png")
        checker.check("image", "b.png")
    assert checker.files_hashed == 6  # each evicts the other
    problems = InputChecker(tmp_path, cache_size=1)
    write(tmp_path / "n.png", "text")
    for _ in range(3):
        with pytest.raises(InputImageError):
            problems.check("image", "n.png")
    assert problems.files_hashed == 1  # a problem is cached too


# -- materialize: the data URI is built when the request is made ------------------------------


@pytest.mark.parametrize(
    ("fmt", "media_type"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
async def test_materialize_sends_the_files_bytes(tmp_path: Path, fmt: str, media_type: str) -> None:
    data = write(tmp_path / "pic", image_bytes(fmt)).read_bytes()
    url = "https://x.test/b.png"
    checker = InputChecker(tmp_path)
    inputs = (checker.check("image", "pic"), checker.check("image2", url))
    request = {"prompt": "a", "image": "pic", "image2": url}
    body = await materialize(request, inputs)
    assert body["image"].startswith(f"data:{media_type};base64,")
    assert decode_data_uri(body["image"]) == data
    assert body["image2"] == url and body["prompt"] == "a"
    assert request["image"] == "pic"  # the row's request is not changed


async def test_materialize_without_files_returns_the_request_itself(tmp_path: Path) -> None:
    uri = data_uri(image_bytes())
    request = {"prompt": "a", "image": uri}
    inputs = (InputChecker(tmp_path).check("image", uri),)
    assert await materialize(request, inputs) is request


async def test_materialize_refuses_a_file_changed_or_gone_since_it_was_checked(
    tmp_path: Path,
) -> None:
    cat = write(tmp_path / "cat.png", image_bytes())
    (item,) = [InputChecker(tmp_path).check("image", "cat.png")]
    write(cat, image_bytes(color=(0, 255, 0)))
    with pytest.raises(InputImageError, match=r"image: cat\.png changed since it was checked"):
        await materialize({"prompt": "a", "image": "cat.png"}, (item,))
    cat.unlink()
    with pytest.raises(InputImageError, match=r"image: cannot read cat\.png"):
        await materialize({"prompt": "a", "image": "cat.png"}, (item,))


# -- sfbatch validate --------------------------------------------------------------------


def test_validate_reports_bad_input_files(tmp_path: Path) -> None:
    write(tmp_path / "cat.png", image_bytes())
    write(tmp_path / "notes.txt", "text")
    p = write(
        tmp_path / "p.jsonl",
        jsonl(
            {"prompt": "a", "model": EDIT, "image": "cat.png"},
            {"prompt": "b", "model": EDIT, "image": "gone.png"},
            {"prompt": "c", "model": EDIT, "image": "notes.txt"},
        ),
    )
    result = subprocess.run(
        [sys.executable, "-m", "sfbatch", "validate", str(p)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SILICONFLOW_API_KEY": ""},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{p}:2: image: no such file gone.png" in result.stdout
    assert f"{p}:3: image: notes.txt is not a PNG, JPEG or WebP image" in result.stdout
    assert "3 rows: 1 valid, 2 invalid" in result.stdout


# -- end to end, against the emulator over loopback ------------------------------------------


async def test_edit_job_with_three_local_images_per_row(tmp_path: Path) -> None:
    models = models_file(tmp_path)
    registry = ModelRegistry.load(models)
    pics = {f"{n}.png": image_bytes(color=(n * 40, 99, 7)) for n in range(4)}
    for name, data in pics.items():
        write(tmp_path / "in" / "pics" / name, data)
    write(tmp_path / "in" / "pics" / "notes.txt", "text")
    edit_rows = [
        {
            "prompt": f"edit {k}",
            "model": EDIT3,
            "image": f"pics/{k}.png",
            "image2": f"pics/{(k + 1) % 4}.png",
            "image3": f"pics/{(k + 2) % 4}.png",
        }
        for k in range(3)
    ]
    p = write(
        tmp_path / "in" / "p.jsonl",
        jsonl(
            *edit_rows,
            {"prompt": "x", "model": EDIT3, "image": "pics/0.png", "image2": "pics/gone.png"},
            {"prompt": "y", "model": EDIT3, "image": "pics/notes.txt"},
        ),
    )
    received: list[dict[str, Any]] = []
    emu = Emulator(models_file=models, latency_s=0.01)
    handler = emu._app.generations

    # Until the emulator records image inputs (emu branch), look at its bodies here.
    async def recording(request: web.Request) -> web.StreamResponse:
        received.append(orjson.loads(await request.read()))
        return await handler(request)

    emu._app.generations = recording  # type: ignore[method-assign]
    async with emu:
        config = RunConfig(
            out_dir=tmp_path / "out", api_key=emu.api_key, base_url=emu.base_url, concurrency=2
        )
        source = PromptSource(p, registry=registry)
        result = await Pipeline(config, source, registry=registry).run()
        assert emu.stats()["generation_requests"] == 3
    records = {r["line"]: r for r in latest_records([tmp_path / "out" / "manifest.jsonl"]).values()}
    assert result.exit_code == 1, result.summary
    assert sorted(r["status"] for r in records.values()) == ["invalid"] * 2 + ["ok"] * 3
    assert "no such file pics/gone.png" in records[4]["error"]["message"]
    assert "pics/notes.txt is not a PNG" in records[5]["error"]["message"]
    assert len(received) == 3
    for body in received:
        k = int(body["prompt"].split()[-1])
        expected = edit_rows[k]
        for field in ("image", "image2", "image3"):
            assert body[field].startswith("data:image/png;base64,")
            assert decode_data_uri(body[field]) == pics[expected[field].removeprefix("pics/")]
    rows_by_line = {row.line: row for row in PromptSource(p, registry=registry)}
    first = input_records(rows_by_line[1].inputs)
    assert first == [
        {"field": f, "source": f"pics/{n}.png", "sha256": sha256(pics[f"{n}.png"])}
        for f, n in (("image", 0), ("image2", 1), ("image3", 2))
    ]
