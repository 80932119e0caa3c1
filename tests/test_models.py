"""Model rules as data and the shared validation function."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfbatch.errors import ConfigError
from sfbatch.models import ModelRegistry, effective_params, validate_request

REG = ModelRegistry.builtin()
SD = "stabilityai/stable-diffusion-3-5-large"
TURBO = "stabilityai/stable-diffusion-3-5-large-turbo"


def errors_of(**body: object) -> tuple[str, ...]:
    return validate_request({"prompt": "a cat", **body}, REG).errors


def test_builtin_has_the_required_models() -> None:
    for name in (
        SD,
        "stabilityai/stable-diffusion-3-medium",
        TURBO,
        "Kwai-Kolors/Kolors",
        "Qwen/Qwen-Image",
        "Qwen/Qwen-Image-Edit",
        "black-forest-labs/FLUX.1-schnell",
    ):
        assert name in REG
    assert REG.get(TURBO).fixed_steps == 4  # type: ignore[union-attr]
    assert REG.get("black-forest-labs/FLUX.1-schnell").fixed_steps == 4  # type: ignore[union-attr]
    assert REG.get("Qwen/Qwen-Image").guidance_field == "cfg"  # type: ignore[union-attr]
    assert REG.get("Qwen/Qwen-Image-Edit").takes_image  # type: ignore[union-attr]


def test_valid_request_passes_and_drops_nones() -> None:
    v = validate_request({"prompt": "a cat", "negative_prompt": None, "seed": 5}, REG)
    assert v.ok and v.request == {"prompt": "a cat", "seed": 5, "model": SD}


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
        ({"num_inference_steps": 0}, "num_inference_steps must be 1..50, got 0"),
        ({"num_inference_steps": 51}, "num_inference_steps must be 1..50, got 51"),
        ({"num_inference_steps": 2.5}, "num_inference_steps must be an integer, got 2.5"),
        ({"guidance_scale": -1}, "guidance_scale must be 0..20, got -1"),
        ({"guidance_scale": 20.5}, "guidance_scale must be 0..20, got 20.5"),
        ({"guidance_scale": "x"}, "guidance_scale must be a number, got 'x'"),
        ({"image_size": "1000x1000"}, "image_size 1000x1000 is not offered by"),
        ({"image_size": "big"}, "image_size must look like WIDTHxHEIGHT, got 'big'"),
        ({"prompt_enhancement": "yes"}, "prompt_enhancement must be true or false"),
        ({"negative_prompt": 3}, "negative_prompt must be a string"),
        ({"model": TURBO, "num_inference_steps": 20}, "num_inference_steps is fixed at 4"),
        ({"model": "black-forest-labs/FLUX.1-schnell", "guidance_scale": 3}, "takes no guidance"),
        ({"model": "Qwen/Qwen-Image", "guidance_scale": 3}, "it takes cfg"),
        ({"model": "Qwen/Qwen-Image", "batch_size": 2}, "batch_size must be 1..1, got 2"),
        ({"model": "Qwen/Qwen-Image-Edit"}, "image is required"),
        ({"image": "http://x/y.png"}, "image is not accepted"),
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
        f'[models."{SD}"]\nimage_sizes = ["256x256"]\n'
    )
    reg = ModelRegistry.load(path)
    assert validate_request({"prompt": "a", "model": "acme/fast", "image_size": "512x512"}, reg).ok
    assert not validate_request({"prompt": "a", "image_size": "1024x1024"}, reg).ok
    assert "Kwai-Kolors/Kolors" in reg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[models."x"]\nimage_sizes = ["1x1"]\nbogus = 1\n', "unknown key 'bogus'"),
        ("[models", "not valid TOML"),
        ('[models."x"]\nsteps = [1, 2]\n', "give image_sizes or max_pixels"),
        ("title = 1\n", "expected [models"),
    ],
)
def test_bad_models_file_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "m.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        ModelRegistry.load(path)


def test_effective_params_fill_model_defaults() -> None:
    assert effective_params({"prompt": "a"}, REG) == {
        "model": SD,
        "image_size": "1024x1024",
        "batch_size": 1,
        "num_inference_steps": 20,
        "guidance_scale": 7.5,
        "prompt_enhancement": False,
    }
    turbo = effective_params({"prompt": "a", "model": TURBO, "batch_size": 2}, REG)
    assert turbo["num_inference_steps"] == 4 and turbo["batch_size"] == 2
