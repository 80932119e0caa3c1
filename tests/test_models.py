"""Model rules as data and the shared validation function."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfbatch.errors import ConfigError
from sfbatch.models import (
    DEFAULT_MODEL,
    ModelRegistry,
    ModelRule,
    effective_params,
    validate_request,
)

REG = ModelRegistry.builtin()
SD = "stabilityai/stable-diffusion-3-5-large"
TURBO = "stabilityai/stable-diffusion-3-5-large-turbo"
KOLORS = "Kwai-Kolors/Kolors"
QWEN = "Qwen/Qwen-Image"
EDIT = "Qwen/Qwen-Image-Edit"
EDIT_2509 = "Qwen/Qwen-Image-Edit-2509"
URL = "https://example.com/cat.png"


def errors_of(**body: object) -> tuple[str, ...]:
    return validate_request({"prompt": "a cat", **body}, REG).errors


def rule(name: str) -> ModelRule:
    found = REG.get(name)
    assert found is not None, name
    return found


def test_builtin_has_the_required_models() -> None:
    for name in (
        SD,
        "stabilityai/stable-diffusion-3-medium",
        TURBO,
        KOLORS,
        QWEN,
        EDIT,
        EDIT_2509,
        "black-forest-labs/FLUX.1-schnell",
    ):
        assert name in REG
    assert DEFAULT_MODEL == KOLORS
    assert rule(TURBO).fixed_steps == 4
    assert rule("black-forest-labs/FLUX.1-schnell").fixed_steps == 4
    assert rule(QWEN).guidance_field == "cfg"
    assert rule(EDIT).takes_image and not rule(QWEN).takes_image


def test_todays_models_follow_the_service() -> None:
    kolors = rule(KOLORS)
    assert (kolors.steps, kolors.default_steps, kolors.batch_size) == ((1, 100), 20, (1, 4))
    assert (kolors.guidance, kolors.default_guidance) == ((0.0, 20.0), 7.5)
    assert kolors.sizes_recommended and kolors.soft_max_pixels == 2_073_600
    qwen = rule(QWEN)
    assert (qwen.steps, qwen.default_steps, qwen.batch_size) == ((1, 100), 20, (1, 1))
    assert (qwen.guidance, qwen.default_guidance) == ((0.1, 20.0), 4.0)
    for name in (EDIT, EDIT_2509):
        edit = rule(name)
        assert not edit.takes_size and edit.default_size is None
        assert (edit.steps, edit.default_steps, edit.guidance) == ((1, 100), 20, (0.1, 20.0))
        assert edit.image_required == ("image",)
    assert rule(EDIT).image_fields == ("image",)
    assert rule(EDIT_2509).image_fields == ("image", "image2", "image3")
    cn = {r.name for r in REG if "cn" in r.endpoints}
    assert cn == {KOLORS, QWEN, EDIT, EDIT_2509}  # the reference's models were withdrawn


def test_valid_request_passes_and_drops_nones() -> None:
    v = validate_request({"prompt": "a cat", "negative_prompt": None, "seed": 5}, REG)
    assert v.ok and v.request == {"prompt": "a cat", "seed": 5, "model": KOLORS}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": ""}, "prompt must be a non-empty string"),
        ({"prompt": "   "}, "prompt must be a non-empty string"),
        ({"prompt": 5}, "prompt must be a non-empty string"),
        ({"batch_size": 9}, "batch_size must be 1..4, got 9"),
        ({"batch_size": 0}, "batch_size must be 1..4, got 0"),
        ({"batch_size": "2"}, "batch_size must be an integer, got '2'"),
        ({"batch_size": True}, "batch_size must be an integer, got True"),
        ({"seed": -1}, "seed must be 0..9999999999, got -1"),
        ({"seed": 10_000_000_000}, "seed must be 0..9999999999, got 10000000000"),
        ({"num_inference_steps": 0}, "num_inference_steps must be 1..100, got 0"),
        ({"num_inference_steps": 101}, "num_inference_steps must be 1..100, got 101"),
        ({"model": SD, "num_inference_steps": 51}, "num_inference_steps must be 1..50, got 51"),
        ({"num_inference_steps": 2.5}, "num_inference_steps must be an integer, got 2.5"),
        ({"guidance_scale": -1}, "guidance_scale must be 0..20, got -1"),
        ({"guidance_scale": 20.5}, "guidance_scale must be 0..20, got 20.5"),
        ({"guidance_scale": "x"}, "guidance_scale must be a number, got 'x'"),
        ({"model": SD, "image_size": "1000x1000"}, "image_size 1000x1000 is not offered by"),
        ({"image_size": "big"}, "image_size must look like WIDTHxHEIGHT, got 'big'"),
        ({"prompt_enhancement": "yes"}, "prompt_enhancement must be true or false"),
        ({"negative_prompt": 3}, "negative_prompt must be a string"),
        ({"model": TURBO, "num_inference_steps": 20}, "num_inference_steps is fixed at 4"),
        ({"model": "black-forest-labs/FLUX.1-schnell", "guidance_scale": 3}, "takes no guidance"),
        ({"model": "Qwen/Qwen-Image", "guidance_scale": 3}, "it takes cfg"),
        ({"model": "Qwen/Qwen-Image", "batch_size": 2}, "batch_size must be 1, got 2"),
        ({"model": QWEN, "cfg": 0.05}, "cfg must be 0.1..20, got 0.05"),
        ({"model": EDIT}, "image is required by Qwen/Qwen-Image-Edit"),
        ({"model": EDIT_2509, "image2": URL}, "image is required by Qwen/Qwen-Image-Edit-2509"),
        ({"model": EDIT, "image": URL, "image2": URL}, "image2 is not accepted by"),
        ({"model": EDIT, "image": ""}, "image must be a URL, a data URI or a file path"),
        ({"model": EDIT, "image": 5}, "image must be a URL, a data URI or a file path"),
        ({"image": URL}, "image is not accepted by Kwai-Kolors/Kolors (it takes no input image)"),
        ({"image3": URL}, "image3 is not accepted"),
        ({"model": ""}, "model must be a non-empty string"),
    ],
)
def test_every_field_is_checked_with_a_precise_message(
    body: dict[str, object], message: str
) -> None:
    errors = errors_of(**body) if "prompt" not in body else validate_request(body, REG).errors
    assert any(message in e for e in errors), errors


def test_all_errors_are_reported_at_once() -> None:
    assert len(errors_of(batch_size=9, seed=-1, guidance_scale=99)) == 3


def test_fixed_steps_equal_to_the_fixed_value_is_dropped() -> None:
    v = validate_request({"prompt": "a", "model": TURBO, "num_inference_steps": 4}, REG)
    assert v.ok and v.request is not None and "num_inference_steps" not in v.request


def test_unknown_model_warns_for_the_client_and_errors_for_the_emulator() -> None:
    client = validate_request({"prompt": "a", "model": "new/model"}, REG)
    assert client.ok and "not in the model rules" in client.warnings[0]
    server = validate_request({"prompt": "a", "model": "new/model"}, REG, unknown_model="error")
    assert server.errors == ("Model does not exist: new/model",)


def test_user_models_file_adds_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[models."acme/fast"]\nimage_sizes = ["512x512"]\nfixed_steps = 8\nbatch_size = [1, 2]\n'
        f'[models."{KOLORS}"]\nimage_sizes = ["256x256"]\n'
    )
    reg = ModelRegistry.load(path)
    assert validate_request({"prompt": "a", "model": "acme/fast", "image_size": "512x512"}, reg).ok
    assert not validate_request({"prompt": "a", "image_size": "1024x1024"}, reg).ok
    assert SD in reg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[models."x"]\nimage_sizes = ["1x1"]\nbogus = 1\n', "unknown key 'bogus'"),
        ("[models", "not valid TOML"),
        ('[models."x"]\nsteps = [1, 2]\n', "give image_sizes or max_pixels"),
        ('[models."x"]\ntakes_size = false\nimage_fields = ["img"]\n', "image_fields may hold"),
        ('[models."x"]\ntakes_size = false\nimage_required = ["image"]\n', "not taken"),
        ('[models."x"]\ntakes_size = "no"\n', "takes_size must be true or false"),
        ("title = 1\n", "expected [models"),
        ('[models."x"]\nmax_pixels = "big"\n', "max_pixels must be a whole number, got 'big'"),
        ('[models."x"]\nmax_pixels = 9\nsteps = "x"\n', "steps must be [low, high]"),
        ('[models."x"]\nmax_pixels = 9\nsteps = [1, "x"]\n', "steps must be [low, high]"),
        ('[models."x"]\nmax_pixels = 9\nsteps = [100, 1]\n', "steps range 100..1 is empty"),
        (
            '[models."x"]\nmax_pixels = 9\nsteps = [1, 10]\ndefault_steps = 50\n',
            "default_steps 50 is outside steps 1..10",
        ),
        ('[models."x"]\nimage_sizes = "1x1"\n', "image_sizes must be a list of text"),
        ('[models."x"]\nmax_pixels = 9\nguidance = [5, 1]\n', "guidance range"),
    ],
)
def test_bad_models_file_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "m.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        ModelRegistry.load(path)


def test_effective_params_fill_model_defaults() -> None:
    assert effective_params({"prompt": "a"}, REG) == {
        "model": KOLORS,
        "image_size": "1024x1024",
        "batch_size": 1,
        "num_inference_steps": 20,
        "guidance_scale": 7.5,
        "prompt_enhancement": False,
    }
    turbo = effective_params({"prompt": "a", "model": TURBO, "batch_size": 2}, REG)
    assert turbo["num_inference_steps"] == 4 and turbo["batch_size"] == 2
    qwen = effective_params({"prompt": "a", "model": QWEN}, REG)
    assert (qwen["image_size"], qwen["num_inference_steps"], qwen["guidance_scale"]) == (
        "1328x1328",
        20,
        4.0,
    )
    edit = effective_params({"prompt": "a", "model": EDIT_2509, "image": URL, "cfg": 2.5}, REG)
    assert (edit["image_size"], edit["num_inference_steps"], edit["guidance_scale"]) == (
        None,
        20,
        2.5,
    )


def test_edit_models_take_up_to_three_images_and_no_size() -> None:
    body = {"prompt": "a", "model": EDIT_2509, "image": URL, "image2": "data:image/png;base64,AA"}
    v = validate_request({**body, "image3": "cat.png", "image_size": "1024x1024"}, REG)
    assert v.ok, v.errors
    assert v.request is not None and "image_size" not in v.request
    assert v.request["image3"] == "cat.png"  # a local path: the engine encodes it later
    assert v.warnings == (
        "image_size is not taken by Qwen/Qwen-Image-Edit-2509 (the output follows the "
        "input image); not sent",
    )


def test_uncertain_facts_warn_instead_of_refusing() -> None:
    custom = validate_request({"prompt": "a", "image_size": "1280x720"}, REG)
    assert custom.ok and "not one of Kwai-Kolors/Kolors's recommended sizes" in custom.warnings[0]
    big = validate_request({"prompt": "a", "model": QWEN, "image_size": "2048x1152"}, REG)
    assert big.ok and any("above the 2073600" in w for w in big.warnings)
    assert validate_request({"prompt": "a", "image_size": "1024x1024"}, REG).warnings == ()
    strict = validate_request({"prompt": "a", "model": SD, "image_size": "1280x720"}, REG)
    assert not strict.ok  # the reference's models list their sizes as the only ones


def test_unknown_models_may_take_images_and_old_takes_image_still_reads(tmp_path: Path) -> None:
    assert validate_request({"prompt": "a", "model": "acme/edit", "image": URL}, REG).ok
    path = tmp_path / "models.toml"
    path.write_text('[models."acme/edit"]\ntakes_size = false\ntakes_image = true\n')
    edit = ModelRegistry.load(path).rule_for("acme/edit")
    assert (edit.image_fields, edit.image_required, edit.takes_image) == (
        ("image",),
        ("image",),
        True,
    )
