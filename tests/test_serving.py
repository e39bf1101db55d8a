"""STORM through the ecosystem's entry points (issue 14, item 3): transformers' pipelines loading a checkpoint folder
by task, and `storm serve` (transformers' OpenAI-compatible server) asked with the `openai` client. Each answer is
compared with `model.generate` on the same inputs (the tiny random checkpoint: answers are noise, but deterministic).
The server tests need the `serve` extra and are skipped without it."""

import base64
import functools
import http.server
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import pipeline

from storm_transformers import StormForConditionalGeneration, StormVideoProcessor
from storm_transformers.loading import load_storm
from storm_transformers.serving import registered_for_serving
from storm_cli import main

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What happens in the video?"
MAX_NEW_TOKENS = 6
SERVER_START_TIMEOUT_S = 180  # a cold start on a busy 2-core CI runner: imports, model load


@pytest.fixture(scope="module")
def offline(tiny_checkpoint):
    """`answer(content, **processor_kwargs)` -> (greedy answer, prompt length in tokens) with `model.generate`."""
    model, processor = load_storm(tiny_checkpoint)

    def answer(content, **processor_kwargs):
        inputs = processor.apply_chat_template(
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs=processor_kwargs,
        )
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        prompt_length = inputs["input_ids"].shape[1]
        return processor.decode(output[0, prompt_length:], skip_special_tokens=True), prompt_length

    answer.num_frames = processor.video_processor.num_frames
    return answer


@pytest.fixture(scope="module")
def image_data_uri():
    image = Image.new("RGB", (96, 72))
    image.putdata([(3 * x % 256, 5 * y % 256, (x * y) % 256) for y in range(72) for x in range(96)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# ---------------------------------------------------------------------------------------------------------------
# Data URIs: how the OpenAI API sends files
# ---------------------------------------------------------------------------------------------------------------


def test_video_processor_reads_base64_data_uris_and_never_quotes_them(videos_dir):
    path = videos_dir / "bikes.mp4"
    data_uri = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    processor = StormVideoProcessor(size={"height": 64, "width": 64})
    from_uri = processor(data_uri, num_frames=4, return_metadata=True)
    from_path = processor(str(path), num_frames=4, return_metadata=True)
    torch.testing.assert_close(from_uri["pixel_values_videos"], from_path["pixel_values_videos"], rtol=0, atol=0)
    assert from_uri["video_metadata"][0].timestamps == from_path["video_metadata"][0].timestamps

    payload = "QUJD" * 1000
    for bad, error in [
        (f"data:video/mp4;base64,{payload}!", "<data URI, video/mp4, 4023 characters> does not hold valid base64"),
        (f"data:video/mp4,{payload}", "<data URI, video/mp4, 4015 characters> is not a base64 data URI"),
        (f"data:video/mp4;base64,{payload}", "Could not read <data URI, video/mp4, 4022 characters> as a video"),
    ]:
        with pytest.raises(ValueError, match=re.escape(error)) as raised:
            processor(bad, num_frames=4)
        assert "QUJDQUJD" not in str(raised.value)


# ---------------------------------------------------------------------------------------------------------------
# Pipelines: a folder loads by task
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["any-to-any", "image-text-to-text"])
def test_pipeline_loads_a_folder_and_answers_videos_and_images(
    task, tiny_checkpoint, videos_dir, image_data_uri, offline
):
    """`any-to-any` resolves STORM through `AutoModelForMultimodalLM`, `image-text-to-text` through
    `AutoModelForImageTextToText`; both take video and image content parts and answer as `generate` does."""
    pipe = pipeline(task, model=str(tiny_checkpoint))
    assert isinstance(pipe.model, StormForConditionalGeneration)
    video = [{"type": "video", "path": str(videos_dir / "bikes.mp4")}, {"type": "text", "text": QUESTION}]
    image = [{"type": "image", "url": image_data_uri}, {"type": "text", "text": "What is in the image?"}]
    for content, processor_kwargs in ((video, {"num_frames": 8}), (image, {})):
        (result,) = pipe(
            text=[{"role": "user", "content": content}],
            max_new_tokens=MAX_NEW_TOKENS,
            return_full_text=False,
            processor_kwargs=processor_kwargs,
        )
        assert result["generated_text"] == offline(content, **processor_kwargs)[0]


# ---------------------------------------------------------------------------------------------------------------
# storm serve: transformers' server, asked with the openai client
# ---------------------------------------------------------------------------------------------------------------


def _server_lookups(folder):
    """`(load, modality)`: `load()` loads `folder` and `modality(model)` classifies it (None: refused) as
    transformers' server does (5.25+: its `ModelLoader`; 5.17–5.24: its `ModelManager`)."""
    from transformers.cli.serving import model_manager

    if hasattr(model_manager, "ModelLoader"):
        loader = model_manager.ModelLoader(device="cpu")
        model_id = model_manager.canonical_model_id(str(folder))
        processor = loader.load_processor(model_id)
        return lambda: loader._load_model(model_id), lambda model: loader.get_model_modality(model.config, processor)
    manager = model_manager.ModelManager(device="cpu")
    name = manager.process_model_name(str(folder))

    def modality(model):  # None for a model it refuses, as 5.25's loader says it
        try:
            return manager.get_model_modality(model)
        except ValueError as error:
            assert "Unknown modality" in str(error)
            return None

    return lambda: manager._load_model(name), modality


def test_transformers_server_loads_and_classifies_storm_only_inside_registered_for_serving(tiny_checkpoint):
    """The two lookups of transformers' server that refuse STORM (see `storm_transformers.serving`), before, inside
    and after `registered_for_serving()`. Needs no serving packages."""
    from transformers.cli.serving import model_manager
    from transformers.cli.serving.utils import Modality
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    load, modality = _server_lookups(tiny_checkpoint)
    with pytest.raises(AttributeError, match="StormForConditionalGeneration"):
        load()
    with registered_for_serving():
        model = load()
        assert isinstance(model, StormForConditionalGeneration)
        assert modality(model) == Modality.VLM  # text, image_url, video_url; no audio from videos
    assert "storm" not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    assert not hasattr(model_manager.transformers, "StormForConditionalGeneration")
    assert modality(model) is None


def test_errors_of_the_server_are_500s_and_errors_of_the_request_400s_both_without_payloads(caplog):
    """`_error_response` (the handler `StormServe` adds to transformers' app): a RuntimeError outside input preparation
    is the server's (500), a ValueError the request's (400); neither message nor log line quotes a data URI."""
    pytest.importorskip("fastapi", reason="storm serve needs the serve extra: pip install -e '.[serve]'")
    from types import SimpleNamespace

    from storm_transformers.serving import _error_response

    request = SimpleNamespace(state=SimpleNamespace(request_id="req-1"))
    uri = "data:video/mp4;base64," + "QUJD" * 500
    for error, status, kind in [
        (RuntimeError(f"CUDA out of memory while reading {uri}"), 500, "server_error"),
        (ValueError(f"bad video {uri}"), 400, "invalid_request_error"),
    ]:
        try:
            raise error  # a traceback, as the app's handler gets it
        except Exception as raised:
            response = _error_response(request, raised)
        body = json.loads(response.body)["error"]
        assert response.status_code == status and body["type"] == kind
        assert f"<data URI, video/mp4, {len(uri)} characters>" in body["message"]
        assert "QUJDQUJD" not in body["message"]
    assert "req-1 failed (500)" in caplog.text and "req-1 refused (400)" in caplog.text
    assert "QUJDQUJD" not in caplog.text


def test_storm_server_parts_are_ours_only_while_the_server_starts():
    """`_storm_server_parts`: inside, transformers' `build_server` returns an app whose ValueError handler is ours and
    (transformers >= 5.25) its `ModelLoader` is `StormModelLoader`, which pickles by reference (the model's spawned
    process imports it); both names are transformers' own again on exit."""
    pytest.importorskip("fastapi", reason="storm serve needs the serve extra: pip install -e '.[serve]'")
    import inspect
    import pickle

    from transformers.cli.serving import model_manager, server

    from storm_transformers import serving

    build_server, loader = server.build_server, getattr(model_manager, "ModelLoader", None)
    with serving._storm_server_parts():
        assert server.build_server is not build_server
        required = [p for p in inspect.signature(build_server).parameters.values() if p.default is p.empty]
        app = server.build_server(*[None] * len(required))  # handlers and manager are only referenced by routes
        assert app.exception_handlers[ValueError] is serving._error_response
        if loader is not None:
            assert model_manager.ModelLoader is serving.StormModelLoader
            copy = pickle.loads(pickle.dumps(serving.StormModelLoader(device="cpu")))
            assert type(copy) is serving.StormModelLoader and copy.device == "cpu"
    assert server.build_server is build_server and getattr(model_manager, "ModelLoader", None) is loader


def test_storm_serve_says_what_to_install_without_the_serving_packages(tiny_checkpoint, monkeypatch, capsys):
    from transformers.utils import import_utils

    monkeypatch.setattr(import_utils, "is_serve_available", lambda: False)
    assert main(["serve", "--model", str(tiny_checkpoint)]) == 1
    assert "pip install -e '.[serve]'" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["0", "65536", "http"])
def test_storm_serve_refuses_a_port_that_is_not_one(port, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port", port])
    assert exited.value.code == 2 and f"--port: {port!r}" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """`(client, model name, log file)` of a `storm serve` subprocess on a free port of 127.0.0.1, stopped (SIGTERM)
    after the module's tests."""
    openai = pytest.importorskip("openai", reason="storm serve needs the serve extra: pip install -e '.[serve]'")
    for package in ("fastapi", "uvicorn"):
        pytest.importorskip(package, reason="storm serve needs the serve extra: pip install -e '.[serve]'")
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    command = [sys.executable, "-m", "storm_cli", "serve", "--model", str(tiny_checkpoint)]
    command += ["--port", str(port), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"storm serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    assert json.load(response) == {"status": "ok"}
                break
            except OSError:  # not listening yet
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"storm serve did not answer within {SERVER_START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
                    )
                time.sleep(0.5)
        yield client, str(tiny_checkpoint), log
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=60)  # transformers' shutdown frees the model (gc.collect): seconds
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert process.returncode == 143, log.read_text()[-3000:]  # "storm serve: terminated", as `main` says


def _ask(server, content, **chat_template_kwargs):
    client, model, _ = server
    extra = {"chat_template_kwargs": chat_template_kwargs} if chat_template_kwargs else None
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=MAX_NEW_TOKENS, extra_body=extra
    )


def _served_as_offline(response, offline_answer):
    answer, prompt_length = offline_answer
    assert response.choices[0].message.content == answer
    assert response.usage.prompt_tokens == prompt_length
    assert response.usage.completion_tokens == MAX_NEW_TOKENS  # the random model never stops early


def test_serve_answers_a_video_given_as_a_path_with_the_processors_frame_count(server, videos_dir, offline):
    """No frame count in the request: the processor's `num_frames` (16 for the tiny checkpoint), not the server's
    default of 32."""
    path = str(videos_dir / "bikes.mp4")
    response = _ask(server, [{"type": "video_url", "video_url": {"url": path}}, {"type": "text", "text": QUESTION}])
    _served_as_offline(response, offline([{"type": "video", "path": path}, {"type": "text", "text": QUESTION}]))
    assert offline.num_frames == 16


def test_serve_answers_a_video_given_as_a_data_uri_and_over_http(server, videos_dir, offline):
    """The request's own sampling (`chat_template_kwargs`): 8 frames, then 1 frame per second."""
    path = str(videos_dir / "bikes.mp4")
    expected = offline([{"type": "video", "path": path}, {"type": "text", "text": QUESTION}], num_frames=8)
    data_uri = "data:video/mp4;base64," + base64.b64encode(Path(path).read_bytes()).decode()
    video = {"type": "video_url", "video_url": {"url": data_uri}}
    _served_as_offline(_ask(server, [video, {"type": "text", "text": QUESTION}], num_frames=8), expected)

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(videos_dir))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as files:
        threading.Thread(target=files.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{files.server_address[1]}/bikes.mp4"
        video = {"type": "video_url", "video_url": {"url": url}}
        response = _ask(server, [video, {"type": "text", "text": QUESTION}], fps=1)
        files.shutdown()
    # 10 s at 1 fps: 10 frames, floored to a multiple of k = 4
    _served_as_offline(response, offline([{"type": "video", "path": path}, {"type": "text", "text": QUESTION}], fps=1))


def test_serve_answers_an_image(server, image_data_uri, offline):
    text = {"type": "text", "text": "What is in the image?"}
    response = _ask(server, [{"type": "image_url", "image_url": {"url": image_data_uri}}, text])
    _served_as_offline(response, offline([{"type": "image", "url": image_data_uri}, text]))


def test_serve_refuses_bad_media_with_a_clear_400_that_does_not_echo_them(server):
    import openai

    payload = "AAAAIGZ0eXBpc29t" + "QUJD" * 5000 + "!!"  # an mp4 header's base64, then 20 kB, then not base64
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + payload}}
    with pytest.raises(openai.BadRequestError) as raised:
        _ask(server, [video, {"type": "text", "text": QUESTION}])
    message = raised.value.body["message"]
    assert raised.value.status_code == 400
    assert message.startswith(
        "ValueError: The video <data URI, video/mp4, 20040 characters> does not hold valid base64"
    )
    assert "QUJDQUJD" not in str(raised.value) and len(str(raised.value)) < 1000
    assert "QUJDQUJD" not in server[2].read_text()  # nor in the server's log

    not_a_video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + "QUJD" * 5000}}
    with pytest.raises(openai.BadRequestError, match="as a video") as raised:
        _ask(server, [not_a_video, {"type": "text", "text": QUESTION}])
    assert "QUJDQUJD" not in str(raised.value)

    # transformers reads images (torchvision's decoder on 5.24, PIL on 5.17, whose message quotes the whole base64)
    not_an_image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "QUJD" * 5000}}
    with pytest.raises(openai.BadRequestError) as raised:
        _ask(server, [not_an_image, {"type": "text", "text": "What is in the image?"}])
    assert "QUJDQUJD" not in str(raised.value) and len(str(raised.value)) < 1200
