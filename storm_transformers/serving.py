"""`storm serve`: STORM behind transformers' own OpenAI-compatible server (`transformers serve`), not a server of ours.

    storm serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--device auto] [--dtype auto]

Clients talk to `http://HOST:PORT/v1` with the OpenAI API (`POST /v1/chat/completions`, streamed or not); content
parts `text`, `image_url` and `video_url` (a local path on the server, an http(s) URL or a base64 data URI such as
`data:video/mp4;base64,...`). Tested in `tests/test_serving.py` with the `openai` client.

Why `transformers serve FOLDER` cannot serve STORM by itself, and what `registered_for_serving` changes (transformers
5.17 to 5.25, `transformers/cli/serving/model_manager.py`, identical in all on these points):

1. The server loads a checkpoint with `getattr(transformers, config.architectures[0])`, i.e. only a class that
   transformers itself exports (`AutoModelForMultimodalLM` is used only when the config's `model_type` is in the
   static table `MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES`, which `AutoModelForMultimodalLM.register` does not change).
   STORM's class is therefore set as the attribute `transformers.StormForConditionalGeneration`.
2. The server decides what a model takes from the static tables `MODEL_FOR_*_MAPPING_NAMES`: a class in
   `MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES` is a VLM (text, `image_url`, `video_url` parts); one in
   `MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES` is "multimodal", which also loads the audio track of every video (STORM
   has no audio input); any other class is refused ("Unknown modality"). STORM is entered in the image-text-to-text
   table only.

Both entries exist only inside `registered_for_serving()` (`storm serve` runs the whole server inside it) and are
removed on exit. From transformers 5.25 the model loads and generates in a spawned process of its own, with a copy of
the server's `ModelLoader`: `StormServe` gives the server `StormModelLoader`, whose unpickling there imports this
package and which loads inside `registered_for_serving()`. `StormServe` is transformers' `Serve` with two additions
of ours: errors in a request (a video that is missing, corrupt, not base64, too long for the context, …) are an HTTP
400 whose message names the problem and never echoes the request's payload, instead of a 500 (or, on 5.25, a 400
that quotes it); and videos are sampled as the checkpoint's processor says (`num_frames`, its training frame count)
instead of the server's fixed 32 frames.
"""

import contextlib
import inspect
import json
import re
import traceback

# transformers' server; its modules import the serving packages (FastAPI etc.) only where they are installed
from transformers.cli.serve import Serve
from transformers.cli.serving import model_manager, server
from transformers.utils import logging

logger = logging.get_logger(__name__)

SERVE_INSTALL = "pip install -e '.[serve]' (from a clone of this repository)"
# Errors that are the request's fault wherever they are raised: the processor's and the model's input checks
# (ValueError, TypeError: a corrupt or missing video, bad base64, a video too long for the context) and files that
# cannot be read (FileNotFoundError; PIL's UnidentifiedImageError is an OSError). A RuntimeError is the request's fault
# only when raised while its images and videos are read (torchvision's "Unsupported image file"), else the server's.
REQUEST_ERRORS = (ValueError, TypeError, OSError)
MAX_ERROR_CHARS = 1000
# A data URI, or a run of base64 text long enough to be a payload (transformers' `load_image` puts the whole base64 of
# a bad image into its message): replaced by a description in error messages.
_DATA_URI = re.compile(r"data:([\w.+-]+/[\w.+-]+)?[^,\s]{0,200},\S*")
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/=]{120,}")


@contextlib.contextmanager
def registered_for_serving():
    """Within the block, transformers' server (`transformers.cli.serve.Serve`) loads STORM checkpoints and treats
    STORM as a VLM (text, image and video content parts). See the module docstring for the two entries and why.

    STORM is registered with the Auto classes by the package's import (`storm_transformers/__init__.py`); undoes both
    entries on exit, also when the block raises.
    """
    from transformers.models.auto import modeling_auto

    from . import StormConfig, StormForConditionalGeneration

    # The `transformers` module object that the server's lookup reads: importing `AutoProcessor` can put another
    # object under sys.modules["transformers"] (processing_utils' `direct_transformers_import`), so `import
    # transformers` here need not give the one model_manager imported, as in the model's process on 5.25.
    transformers = model_manager.transformers
    name, model_type = StormForConditionalGeneration.__name__, StormConfig.model_type
    table = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    add_entry, add_class = model_type not in table, not hasattr(transformers, name)  # undo only what is added here
    if add_entry:
        table[model_type] = name  # modality: VLM
    if add_class:
        setattr(transformers, name, StormForConditionalGeneration)  # getattr(transformers, config.architectures[0])
    try:
        yield
    finally:
        if add_entry:
            del table[model_type]
        if add_class:
            delattr(transformers, name)


def _without_payloads(message: str) -> str:
    """`message` with data URIs and long base64 runs replaced by their length, cut to `MAX_ERROR_CHARS`."""
    message = _DATA_URI.sub(
        lambda m: f"<data URI, {m.group(1) or 'no media type'}, {len(m.group(0))} characters>", message
    )
    message = _BASE64_RUN.sub(lambda m: f"<{len(m.group(0))} characters of base64>", message)
    return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 1] + "…"


def _raised_preparing_inputs(error: BaseException) -> bool:
    """Whether `error` was raised inside a processor's `apply_chat_template` (the request's media being read)."""
    return any(frame.f_code.co_name == "apply_chat_template" for frame, _ in traceback.walk_tb(error.__traceback__))


def _error_response(request, error: Exception):
    """An OpenAI-style error body (`{"error": {"message", "type", ...}}`, which the `openai` client raises as
    `BadRequestError` / `InternalServerError`) whose message is the error's without payloads: status 400 for an error
    in the request, else 500 (with the traceback's frames in the server's log)."""
    from fastapi.responses import JSONResponse

    message = _without_payloads(f"{type(error).__name__}: {error}")
    request_id = getattr(request.state, "request_id", "")
    if isinstance(error, REQUEST_ERRORS) or _raised_preparing_inputs(error):
        logger.warning(f"storm serve: request {request_id} refused (400): {message}")
        status, kind = 400, "invalid_request_error"
    else:
        # The traceback's frames, not its message: that is `message` above, without payloads.
        frames = "".join(traceback.format_tb(error.__traceback__))
        logger.error(f"storm serve: request {request_id} failed (500): {message}\n{frames}")
        status, kind = 500, "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)


def check_serving_available() -> None:
    """Raise a clear error when transformers' server cannot run here.

    Raises:
        RuntimeError: the serving packages (FastAPI, uvicorn, openai, pydantic) are missing, or this transformers has
        no `Serve` of the 5.17–5.25 form (`force_model`, `chat_template_kwargs`, `serving.server.build_server`).
    """
    import transformers
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise RuntimeError(
            f"storm serve runs transformers' server, which needs FastAPI, uvicorn, openai and pydantic: "
            f"{SERVE_INSTALL}."
        )
    used = {"force_model", "chat_template_kwargs", "host", "port", "device", "dtype"}
    if not used <= inspect.signature(Serve.__init__).parameters.keys() or not hasattr(server, "build_server"):
        raise RuntimeError(
            f"storm serve needs the Serve of transformers 5.17 to 5.25; transformers {transformers.__version__} has "
            "another one. Install a version in that range (pyproject.toml)."
        )


if hasattr(model_manager, "ModelLoader"):  # transformers >= 5.25: each model loads in a spawned process of its own

    class StormModelLoader(model_manager.ModelLoader):
        """transformers' `ModelLoader` (5.25+; same arguments) that loads inside `registered_for_serving()`. The
        server pickles its loader into the model's spawned process; unpickling this class there imports
        `storm_transformers` (STORM's Auto registrations), and loading registers the rest."""

        def load_model_and_processor(self, model_id: str, on_progress=None):
            """`ModelLoader.load_model_and_processor` with STORM registered for serving."""
            with registered_for_serving():
                return super().load_model_and_processor(model_id, on_progress)


@contextlib.contextmanager
def _storm_server_parts():
    """Within the block, transformers' `Serve` builds its FastAPI app with our error handler (`_error_response`: 400
    for errors in a request, payloads left out) and, from 5.25, its models' loader as `StormModelLoader`. `Serve`
    imports both names from their modules when it starts; they are put back on exit."""
    build_server = server.build_server

    def build_storm_server(*args, **kwargs):
        app = build_server(*args, **kwargs)
        for error in (*REQUEST_ERRORS, RuntimeError):
            app.add_exception_handler(error, _error_response)  # replaces transformers' ValueError handler (5.25)
        return app

    loader = getattr(model_manager, "ModelLoader", None)
    server.build_server = build_storm_server
    if loader is not None:
        model_manager.ModelLoader = StormModelLoader
    try:
        yield
    finally:
        server.build_server = build_server
        if loader is not None:
            model_manager.ModelLoader = loader


class StormServe(Serve):
    """transformers' `Serve` (its app, handlers, model manager and uvicorn server, unchanged) for one STORM
    checkpoint, plus our error handler (400 for errors in a request, payloads left out), the processor's frame
    sampling for videos and, from transformers 5.25, `StormModelLoader`. Serves in this thread until interrupted. Use
    it inside `registered_for_serving()`.

    Args:
        model (`str`): the checkpoint folder, preloaded; requests name it as their `model`.
        host (`str`), port (`int`): where to listen.
        device (`str`): `"auto"` (accelerate's `device_map="auto"`), `"cpu"`, `"cuda:0"`, …
        dtype (`str`): `"auto"` (the checkpoint's), `"float32"`, `"bfloat16"`, `"float16"`.
    """

    def __init__(self, model: str, *, host: str, port: int, device: str = "auto", dtype: str = "auto"):
        with _storm_server_parts():
            super().__init__(
                force_model=model,
                host=host,
                port=port,
                device=device,
                dtype=dtype,
                # The server asks for 32 frames of every video; None leaves it to the request (chat_template_kwargs
                # num_frames or fps) or else to the processor's num_frames, the checkpoint's own frame count.
                chat_template_kwargs=json.dumps({"num_frames": None}),
            )


def serve_command(args) -> None:
    """`storm serve`: check the checkpoint and the serving packages, then run transformers' server with STORM
    registered until interrupted.

    Raises:
        RuntimeError: serving packages missing (the message says what to install). FileNotFoundError, ValueError,
        TypeError: a checkpoint that `storm_transformers.loading.check_checkpoint` refuses, or a device that is not here.
    """
    from .loading import check_checkpoint, check_device

    check_serving_available()
    folder = str(check_checkpoint(args.model))
    device = args.device if args.device == "auto" else str(check_device(args.device))
    with registered_for_serving():
        from transformers import AutoVideoProcessor

        num_frames = AutoVideoProcessor.from_pretrained(folder).num_frames
        print(
            f"storm serve: {folder} on http://{args.host}:{args.port}/v1 (OpenAI API; requests name the model "
            f'"{folder}"). Videos: {num_frames} frames each unless a request passes '
            '"chat_template_kwargs": {"num_frames": N} or {"fps": F}.',
            flush=True,
        )
        StormServe(folder, host=args.host, port=args.port, device=device, dtype=args.dtype)


__all__ = ["StormServe", "check_serving_available", "registered_for_serving", "serve_command"]
