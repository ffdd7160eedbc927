"""Real-time streaming server: one WebSocket per viewer, several viewers sharing one model.

``create_app(pipeline, ServerConfig(...))`` returns a FastAPI app with

* ``GET /`` and ``GET /static/app.js`` / ``/static/style.css``: the page, read from package data once at start;
  no request path ever reaches the file system.
* ``GET /api/status``: model, frame size, open sessions.
* ``GET /download/{token}``: the MP4 of a session's last finished run; the token is sent only to that session's
  socket and dies with it.
* ``WS /ws``: the session protocol (see ``docs/serving.md``). Text messages are JSON objects with a ``type``;
  client binary messages are I2V images; server binary messages are JPEG frames, one per message, sent as each
  block is decoded, right after a ``block`` message that announces them.

Sessions: at most ``max_sessions`` sockets are served at once; the next one gets a ``busy`` message and is
closed (code 1013). Each session owns one ``InteractiveStream`` at a time (its KV cache, noise and decoder state)
and drops it when the run stops or the socket closes, abruptly or not; freed heap memory is then handed back to
the OS. Model calls run in a pool of ``max_sessions`` threads, one call in flight per session, so a slow session
never blocks the event loop or the others. Generation is paced to
real time (at most ``max_lead_s`` of video ahead of playback) unless ``realtime=False``.

Bad input never stops the server: malformed JSON, unknown types or fields, oversized messages, messages out of
order and unreadable images each get an ``error`` message and the session goes on. Browsers' cross-site sockets
are refused by the Origin check (same origin, or an allow-list); the Host check (``allowed_hosts``) defeats DNS
rebinding for a server bound to a loopback address.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.resources
import io
import json
import logging
import secrets
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Mapping
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from PIL import Image, ImageOps
from starlette.concurrency import run_in_threadpool

from ..errors import ConfigError, InputError
from ..models.vae import latent_frames_for
from ..pipelines.interactive import InteractiveStream
from ..pipelines.video import BlockTiming, VideoPipeline

__all__ = ["PROTOCOL_VERSION", "ServerConfig", "create_app"]

PROTOCOL_VERSION = 1
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_SEED = 2**53  # integers a browser's JSON keeps exactly
DOWNLOAD_CHUNK = 256 * 1024
CLOSE_POLICY = 1008   # WebSocket close code: policy violation (bad origin / host)
CLOSE_BUSY = 1013     # WebSocket close code: try again later
_STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
log = logging.getLogger("causal_forcing.serving")


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerConfig:
    """Limits and behaviour of the server (see the module docstring).

    ``allowed_origins``: extra browser origins (``scheme://host[:port]``) allowed to open sockets besides the
    page's own. ``allowed_hosts``: accepted Host header names (without port); ``None`` accepts any.
    ``window_frames`` / ``sink_frames``: the rolling KV cache of every run (default: the pipeline's window, else
    its default video length with the first block as sink). ``recache_frames``: frames re-cached on a prompt
    switch that asks for it (``None``: all the cache can rewind). ``max_frames``: pixel frames after which a run
    stops (it also bounds the recording).
    """

    max_sessions: int = 2
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] | None = None
    window_frames: int | None = None
    sink_frames: int | None = None
    recache_frames: int | None = None
    max_frames: int = 16 * 600 + 1
    realtime: bool = True
    max_lead_s: float = 0.5
    jpeg_quality: int = 85
    max_message_bytes: int = 16 * 1024
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_side: int = 4096
    max_prompt_chars: int = 2000

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_frames", "max_message_bytes", "max_image_bytes", "max_image_side",
                     "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.max_lead_s < 0:
            raise ConfigError(f"max_lead_s must be >= 0, got {self.max_lead_s}")
        if self.recache_frames is not None and self.recache_frames < 0:
            raise ConfigError(f"recache_frames must be >= 0, got {self.recache_frames}")
        for origin in self.allowed_origins:
            if normalize_origin(origin) is None:
                raise ConfigError(f"not an origin (scheme://host[:port]): {origin!r}")


def normalize_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` in lower case, or None when ``origin`` is not an http(s) origin."""
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") \
            or parts.query or parts.fragment or "@" in parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def _host_name(host: str) -> str:
    """A Host header without its port: ``127.0.0.1:7860`` → ``127.0.0.1``, ``[::1]:80`` → ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


# ---------------------------------------------------------------------------------------------------------------
# Input checking
# ---------------------------------------------------------------------------------------------------------------
class ProtocolError(Exception):
    """A client message the server refuses; ``code`` goes to the client with the message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _check_keys(data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(data) - {"type", *allowed})
    if unknown:
        raise ProtocolError("bad_message", f"unknown field(s) for {data['type']!r}: {', '.join(unknown)}")


def _int_field(data: Mapping[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ProtocolError("bad_message", f"{name!r} must be an integer or null")
    return value


def _bool_field(data: Mapping[str, Any], name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolError("bad_message", f"{name!r} must be true or false")
    return value


def decode_image(data: bytes, *, max_side: int, frame_hw: tuple[int, int]) -> Image.Image:
    """Validate and decode an uploaded image: PNG, JPEG or WebP, each side at most ``max_side``. EXIF orientation
    is applied and the image is shrunk to twice what covers ``frame_hw`` (only that much is ever used)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in IMAGE_FORMATS:
                raise ProtocolError("bad_image", f"images must be {', '.join(IMAGE_FORMATS)}, got {image.format}")
            if max(image.size) > max_side:
                raise ProtocolError("bad_image", f"the image is {image.width}x{image.height}; at most {max_side} "
                                                 "pixels per side")
            image.load()
            upright = ImageOps.exif_transpose(image)
    except ProtocolError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ProtocolError("bad_image", f"not a readable image: {e}") from None
    height, width = frame_hw
    scale = 2 * max(width / upright.width, height / upright.height)
    if scale < 1:
        size = (max(1, round(upright.width * scale)), max(1, round(upright.height * scale)))
        upright = upright.resize(size, Image.Resampling.LANCZOS)
    return upright


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------------------------
class Recording:
    """The H.264 MP4 of one run, encoded frame by frame into an anonymous temporary file (gone when closed)."""

    def __init__(self, width: int, height: int, fps: int):
        import av  # imported on use, like the pipeline's MP4 writer

        self._av = av
        self._file = tempfile.TemporaryFile(prefix="causal-forcing-", suffix=".mp4")
        self._container = av.open(self._file, mode="w", format="mp4")
        self._video = self._container.add_stream("libx264", rate=fps)
        self._video.width, self._video.height = width, height
        # 4:2:0 plays in every browser; odd sizes need full-resolution chroma.
        self._video.pix_fmt = "yuv444p" if width % 2 or height % 2 else "yuv420p"
        self._video.options = {"crf": "23", "preset": "veryfast"}
        self._lock = threading.Lock()
        self.frames = 0
        self.size = 0
        self.finished = False

    def add(self, frames: np.ndarray) -> None:
        for frame in frames:
            for packet in self._video.encode(self._av.VideoFrame.from_ndarray(frame, format="rgb24")):
                self._container.mux(packet)
        self.frames += len(frames)

    def finish(self) -> None:
        """Flush the encoder and write the index; the file is complete and readable afterwards."""
        for packet in self._video.encode():
            self._container.mux(packet)
        self._container.close()
        self.size = self._file.tell()
        self.finished = True

    def read(self, offset: int, size: int) -> bytes:
        """Bytes of the finished file (raises ValueError once closed)."""
        with self._lock:
            self._file.seek(offset)
            return self._file.read(size)

    def close(self) -> None:
        with self._lock:
            if not self.finished:
                with contextlib.suppress(Exception):
                    self._container.close()
            self._file.close()


# ---------------------------------------------------------------------------------------------------------------
# One run (start → stop) of a session
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StartRequest:
    prompt: str
    seed: int
    frames: int | None
    image: Image.Image | None


@dataclass(frozen=True)
class StepResult:
    jpegs: list[bytes]
    timing: BlockTiming
    fps: float
    switched: dict[str, Any] | None


class Run:
    """An ``InteractiveStream`` plus its recording; every method runs in a worker thread, one at a time."""

    def __init__(self, server: Server, request: StartRequest):
        pipeline, cfg = server.pipeline, server.config
        self.stream = InteractiveStream(pipeline, request.prompt, seed=request.seed, image=request.image,
                                        num_frames=request.frames, window_frames=server.window[0],
                                        sink_frames=server.window[1], sink_rope="rolling",
                                        recache_frames=cfg.recache_frames if cfg.recache_frames is not None
                                        else server.window[0])
        height, width = pipeline.frame_size
        self.recording = Recording(width, height, pipeline.fps)
        self.quality = cfg.jpeg_quality
        self.block = 0
        self._lock = threading.Lock()

    def step(self, switch: tuple[str, bool] | None) -> StepResult:
        """Apply a pending prompt switch, then sample, decode, JPEG-encode and record one block."""
        with self._lock:
            switched = None
            if switch is not None:
                prompt, recache = switch
                recached = self.stream.set_prompt(prompt, recache_frames=None if recache else 0)
                switched = {"prompt": prompt, "recached": recached, "block": self.block,
                            "switch_ms": round(1e3 * (self.stream.timing.last_switch_s or 0.0), 2)}
            frames = self.stream.next_block()
            self.recording.add(frames)
            self.block += 1
            timing = self.stream.timing
            return StepResult([encode_jpeg(f, self.quality) for f in frames], timing.recent[-1], timing.recent_fps,
                              switched)

    def finish(self) -> Recording | None:
        """Close the stream (its cache goes) and complete the recording; None when nothing was recorded."""
        with self._lock:
            self.stream.close()
            if self.recording.frames == 0:
                self.recording.close()
                return None
            self.recording.finish()
            return self.recording


def _close_orphan_recording(done: Future[Recording | None]) -> None:
    """Close the recording of a run whose session went away while it was being finished."""
    if not done.cancelled() and done.exception() is None:
        recording = done.result()
        if recording is not None:
            recording.close()


# ---------------------------------------------------------------------------------------------------------------
# A session: one socket
# ---------------------------------------------------------------------------------------------------------------
class Session:
    """One connected viewer: its protocol state, its current run and its last recording."""

    def __init__(self, server: Server, websocket: WebSocket):
        self.server = server
        self.websocket = websocket
        self.id = secrets.token_hex(8)
        self.token = secrets.token_urlsafe(24)
        self.image: Image.Image | None = None
        self.run: Run | None = None
        self.recording: Recording | None = None
        self.runs = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._pending_prompt: tuple[str, bool] | None = None
        self._send_lock = asyncio.Lock()
        self._connected = True

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # ---- sending (never raises: a failed send means the peer is gone) ----------------------------------------
    async def send(self, *messages: dict[str, Any] | bytes) -> None:
        if not self._connected:
            return
        async with self._send_lock:
            try:
                for message in messages:
                    if isinstance(message, bytes):
                        await self.websocket.send_bytes(message)
                    else:
                        await self.websocket.send_text(json.dumps(message))
            except Exception:  # disconnected mid-send (the exception type depends on the ASGI server)
                self._connected = False
                self._stop.set()

    async def send_error(self, code: str, message: str) -> None:
        await self.send({"type": "error", "code": code, "message": message})

    # ---- receiving ----------------------------------------------------------------------------------------
    async def serve(self) -> None:
        """Greet, then handle messages until the socket closes."""
        await self.send(self.server.hello(self))
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                if message.get("bytes") is not None:
                    await self._on_image(message["bytes"])
                elif message.get("text") is not None:
                    await self._on_text(message["text"])
            except ProtocolError as e:
                await self.send_error(e.code, str(e))
            except Exception:
                log.exception("session %s: error while handling a message", self.id)
                await self.send_error("internal", "the server failed to handle this message")

    async def _on_text(self, text: str) -> None:
        cfg = self.server.config
        if len(text.encode("utf-8", "replace")) > cfg.max_message_bytes:
            raise ProtocolError("too_large", f"text messages are limited to {cfg.max_message_bytes} bytes")
        try:
            data = json.loads(text)
        except ValueError:
            raise ProtocolError("bad_json", "the message is not valid JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            raise ProtocolError("bad_message", 'a message must be a JSON object with a string "type"')
        handler: Callable[[dict[str, Any]], Any] | None = {
            "start": self._on_start, "prompt": self._on_prompt, "stop": self._on_stop, "ping": self._on_ping,
        }.get(data["type"])
        if handler is None:
            raise ProtocolError("unknown_type", f"unknown message type {data['type'][:40]!r} "
                                                "(known: start, prompt, stop, ping)")
        await handler(data)

    def _prompt(self, data: Mapping[str, Any]) -> str:
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ProtocolError("bad_message", "'prompt' must be a non-empty string")
        if len(prompt) > self.server.config.max_prompt_chars:
            raise ProtocolError("too_large", f"prompts are limited to {self.server.config.max_prompt_chars} "
                                             "characters")
        return prompt.strip()

    async def _on_start(self, data: dict[str, Any]) -> None:
        _check_keys(data, ("prompt", "seed", "frames", "image"))
        if self.running:
            raise ProtocolError("bad_state", "a stream is already running; stop it first")
        prompt = self._prompt(data)
        seed = _int_field(data, "seed")
        if seed is None or seed == -1:
            seed = secrets.randbelow(MAX_SEED)
        elif not 0 <= seed <= MAX_SEED:
            raise ProtocolError("bad_message", f"'seed' must be in [0, {MAX_SEED}], or -1/null for a random one")
        frames = _int_field(data, "frames")
        if frames is not None:
            try:
                latent_frames_for(frames)
            except InputError as e:
                raise ProtocolError("bad_message", f"'frames': {e}") from None
            if frames > self.server.config.max_frames:
                raise ProtocolError("bad_message", f"'frames' is limited to {self.server.config.max_frames}")
        use_image = _bool_field(data, "image", False)
        if use_image and self.image is None:
            raise ProtocolError("bad_state", "no image uploaded (send it as a binary message first)")
        request = StartRequest(prompt, seed, frames, self.image if use_image else None)
        self._stop.clear()
        self._pending_prompt = None
        self.runs += 1
        self._task = asyncio.create_task(self._generate(request, self.runs))

    async def _on_prompt(self, data: dict[str, Any]) -> None:
        _check_keys(data, ("prompt", "recache"))
        prompt = self._prompt(data)
        recache = _bool_field(data, "recache", True)
        if not self.running:
            raise ProtocolError("bad_state", "no stream is running; send 'start' first")
        self._pending_prompt = (prompt, recache)

    async def _on_stop(self, data: dict[str, Any]) -> None:
        _check_keys(data, ())
        if not self.running:
            raise ProtocolError("bad_state", "no stream is running")
        self._stop.set()

    async def _on_ping(self, data: dict[str, Any]) -> None:
        _check_keys(data, ("t",))
        await self.send({"type": "pong", "t": data.get("t")})

    async def _on_image(self, data: bytes) -> None:
        cfg, pipeline = self.server.config, self.server.pipeline
        if len(data) > cfg.max_image_bytes:
            raise ProtocolError("too_large", f"images are limited to {cfg.max_image_bytes} bytes")
        if pipeline.block_size != 1:
            raise ProtocolError("unsupported", "this model cannot start from an image (it is not frame-wise)")
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(self.server.image_executor, lambda: decode_image(
            data, max_side=cfg.max_image_side, frame_hw=pipeline.frame_size))
        self.image = image
        await self.send({"type": "image", "width": image.width, "height": image.height})

    # ---- generating ---------------------------------------------------------------------------------------
    async def _generate(self, request: StartRequest, index: int) -> None:
        """One run: open the stream, send blocks until stopped / done / at the limit, then finish it."""
        server, loop = self.server, asyncio.get_running_loop()
        reason, run = "stopped", None
        try:
            run = await loop.run_in_executor(server.executor, Run, server, request)
            self.run = run
            await self.send({"type": "started", "run": index, "prompt": request.prompt, "seed": request.seed,
                             "frames": request.frames, "image": request.image is not None,
                             "window": server.window[0], "setup_ms": round(1e3 * run.stream.timing.setup_s, 2)})
            first_sent, sent = 0.0, 0
            while True:
                if self._stop.is_set():
                    break
                if run.stream.done:
                    reason = "done"
                    break
                if run.stream.pixel_frames >= server.config.max_frames:
                    reason = "limit"
                    break
                switch, self._pending_prompt = self._pending_prompt, None
                step = await loop.run_in_executor(server.executor, run.step, switch)
                if step.switched is not None:
                    await self.send({"type": "prompt_set", **step.switched})
                await self.send({"type": "block", "index": step.timing.index, "frames": len(step.jpegs),
                                 "latency_ms": round(1e3 * step.timing.latency_s, 2), "fps": round(step.fps, 2)},
                                *step.jpegs)
                if sent == 0:
                    first_sent = time.monotonic()
                sent += len(step.jpegs)
                if server.config.realtime:
                    lead = sent / server.pipeline.fps - (time.monotonic() - first_sent)
                    if lead > server.config.max_lead_s:
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self._stop.wait(), lead - server.config.max_lead_s)
        except InputError as e:
            reason = "error"
            await self.send_error("bad_input", str(e))
        except Exception:
            reason = "error"
            log.exception("session %s: generation failed", self.id)
            await self.send_error("internal", "generation failed (see the server log)")
        finally:
            self.run = None
            recording = None if run is None else await self._finish(run)
            if recording is not None and not self._connected:
                recording.close()  # nobody is left to download it
            elif recording is not None:
                old, self.recording = self.recording, recording
                if old is not None:
                    old.close()
            await self.send({"type": "stopped", "reason": reason, "run": index,
                             "frames": 0 if recording is None else recording.frames,
                             "download": None if recording is None else f"/download/{self.token}"})

    async def _finish(self, run: Run) -> Recording | None:
        """``run.finish()`` in a worker thread (after the block in flight). It runs even if this task is cancelled
        meanwhile (server shutdown); the recording is then closed as soon as it is complete."""
        done = self.server.executor.submit(run.finish)
        try:
            return await asyncio.shield(asyncio.wrap_future(done))
        except asyncio.CancelledError:
            done.add_done_callback(_close_orphan_recording)
            raise

    async def close(self) -> None:
        """The socket is gone: stop the run and drop the session's data. Everything that matters happens before
        the first ``await``, so a cancelled caller still frees the session; the run's block in flight finishes in
        its thread and the run is dropped right after."""
        self._connected = False
        self._stop.set()
        self.image = None
        if self.recording is not None:
            self.recording.close()
            self.recording = None
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait({task})


# ---------------------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------------------
class Server:
    """Shared state: the pipeline, the worker threads and the open sessions."""

    def __init__(self, pipeline: VideoPipeline, config: ServerConfig):
        self.pipeline = pipeline
        self.config = config
        own = pipeline.stream_config
        if config.window_frames is None and own.window_frames is not None:
            window, default_sink = own.window_frames, own.sink_frames
        else:
            window, default_sink = config.window_frames or pipeline.latent_frames(), pipeline.block_size
        sink = default_sink if config.sink_frames is None else config.sink_frames
        if sink < 0 or window - sink < pipeline.block_size:
            raise ConfigError(f"a window of {window} latent frames with a {sink}-frame sink cannot hold a block of "
                              f"{pipeline.block_size}")
        self.window = (window, sink)
        # Model work: one call in flight per session, so a slow session never waits for another. Few, long-lived
        # threads also bound the memory that thread-local pools (allocator arenas, OpenMP teams) keep.
        self.executor = ThreadPoolExecutor(max_workers=config.max_sessions, thread_name_prefix="cf-model")
        # Uploaded images are decoded one at a time, apart from the model work.
        self.image_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cf-image")
        self.sessions: dict[str, Session] = {}
        self.page = {name: _static_text(name) for name in ("index.html", *_STATIC)}

    def hello(self, session: Session) -> dict[str, Any]:
        height, width = self.pipeline.frame_size
        cfg = self.config
        return {"type": "hello", "protocol": PROTOCOL_VERSION, "session": session.id,
                "model": self.pipeline.description, "width": width, "height": height, "fps": self.pipeline.fps,
                "block_size": self.pipeline.block_size, "i2v": self.pipeline.block_size == 1,
                "window": self.window[0], "sink": self.window[1],
                "limits": {"max_message_bytes": cfg.max_message_bytes, "max_image_bytes": cfg.max_image_bytes,
                           "max_image_side": cfg.max_image_side, "max_prompt_chars": cfg.max_prompt_chars,
                           "max_frames": cfg.max_frames}}

    # ---- admission ----------------------------------------------------------------------------------------
    def host_allowed(self, headers: Mapping[str, str]) -> bool:
        allowed = self.config.allowed_hosts
        return allowed is None or _host_name(headers.get("host", "")) in {_host_name(h) for h in allowed}

    def origin_allowed(self, headers: Mapping[str, str]) -> bool:
        """No Origin (not a browser), the page's own origin, or an allow-listed one."""
        origin = headers.get("origin")
        if origin is None:
            return True
        normalized = normalize_origin(origin)
        if normalized is None:
            return False
        if normalized in {normalize_origin(o) for o in self.config.allowed_origins}:
            return True
        return urlsplit(normalized).netloc == headers.get("host", "").strip().lower()

    def open_session(self, websocket: WebSocket) -> Session | None:
        if len(self.sessions) >= self.config.max_sessions:
            return None
        session = Session(self, websocket)
        self.sessions[session.id] = session
        return session

    async def close_session(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        await session.close()
        await asyncio.get_running_loop().run_in_executor(self.executor, release_free_memory)

    def recording_for(self, token: str) -> Recording | None:
        for session in self.sessions.values():
            if secrets.compare_digest(session.token, token):
                return session.recording
        return None


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _load_malloc_trim() if sys.platform.startswith("linux") else None


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A session's tensors, frames and encoder buffers are freed when it closes, but glibc keeps most of that memory
    in its per-thread arenas, so without this the process's resident size stays at its high-water mark.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _static_text(name: str) -> str:
    return importlib.resources.files("causal_forcing.serving").joinpath("static", name).read_text(encoding="utf-8")


def create_app(pipeline: VideoPipeline, config: ServerConfig | None = None) -> FastAPI:
    """The server app for ``pipeline`` (shared by every session). ``app.state.server`` is the ``Server``."""
    server = Server(pipeline, config or ServerConfig())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for session in list(server.sessions.values()):
            session._stop.set()
        for executor in (server.executor, server.image_executor):
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="causal-forcing", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Any]) -> Response:
        if not server.host_allowed(request.headers):
            return PlainTextResponse("invalid Host header", status_code=400)
        response = await call_next(request)
        response.headers.update(_SECURITY_HEADERS)
        return response

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(server.page["index.html"])

    @app.get("/static/app.js")
    async def app_js() -> Response:
        return Response(server.page["app.js"], media_type=_STATIC["app.js"])

    @app.get("/static/style.css")
    async def style_css() -> Response:
        return Response(server.page["style.css"], media_type=_STATIC["style.css"])

    @app.get("/api/status")
    async def status() -> dict[str, Any]:
        height, width = pipeline.frame_size
        return {"model": pipeline.description, "width": width, "height": height, "fps": pipeline.fps,
                "sessions": len(server.sessions), "max_sessions": server.config.max_sessions,
                "running": sum(s.running for s in server.sessions.values())}

    @app.get("/download/{token}")
    async def download(token: str) -> Response:
        recording = server.recording_for(token)
        if recording is None:
            return JSONResponse({"error": "no finished recording for this link (it lives as long as its session)"},
                                status_code=404)

        async def chunks() -> AsyncIterator[bytes]:
            for offset in range(0, recording.size, DOWNLOAD_CHUNK):
                try:
                    yield await run_in_threadpool(recording.read, offset, DOWNLOAD_CHUNK)
                except ValueError:  # the session closed meanwhile
                    return

        return StreamingResponse(chunks(), media_type="video/mp4", headers={
            "Content-Length": str(recording.size),
            "Content-Disposition": 'attachment; filename="causal-forcing.mp4"'})

    @app.websocket("/ws")
    async def socket(websocket: WebSocket) -> None:
        if not (server.host_allowed(websocket.headers) and server.origin_allowed(websocket.headers)):
            await websocket.close(code=CLOSE_POLICY)
            return
        await websocket.accept()
        session = server.open_session(websocket)
        if session is None:
            with contextlib.suppress(Exception):  # the client may already be gone
                await websocket.send_text(json.dumps({
                    "type": "busy", "message": f"the server is busy ({server.config.max_sessions} session(s) in "
                                               "use); try again later"}))
                await websocket.close(code=CLOSE_BUSY)
            return
        log.info("session %s opened (%d/%d)", session.id, len(server.sessions), server.config.max_sessions)
        try:
            await session.serve()
        finally:
            await server.close_session(session)
            log.info("session %s closed", session.id)

    return app
