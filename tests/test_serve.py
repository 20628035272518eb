"""`ms-xcomposer serve` as a real subprocess on 127.0.0.1, talked to with the official `openai` client (and
http.client where the raw wire matters), on the golden IXC-2.5 tiny model.

Every answer is compared with the library's single-request greedy answer (`chat_with_ids` in this process,
`generation.generate`: not the server's batching code). The server runs in PyNative mode; the batching engine's
GRAPH-mode behaviour (rows equal alone, one decode graph) is tested in test_batching.py.
"""
import base64
import concurrent.futures
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")  # a test dependency (setup.py extra "test"); its absence is a setup error
from helpers_chat import DATA, EOS, SMALL, WIDE  # noqa: E402
from ms_xcomposer import load  # noqa: E402
from ms_xcomposer.conversation import chat_with_ids  # noqa: E402

KEY = "test-key"
MODEL = "ms"  # the converted directory's name
MAX_TOKENS = 8
START_TIMEOUT_S = 120


def data_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def png_bytes(size) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (255, 255, 255)).save(out, "PNG")
    return out.getvalue()


# Sixteen different requests: text-only, with one or two images, a system message, an earlier turn.
# Each: (messages, the library's chat arguments giving the same prompt).
def _requests():
    out = []
    for i in range(10):
        q = f"Question {i}: " + "tell me more " * i
        out.append(([{"role": "user", "content": q}], dict(query=q)))
    for i, image in enumerate((WIDE, SMALL, WIDE)):
        q = ["Describe this image.", "What is this?", "Colours?"][i]
        content = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": q}]
        out.append(([{"role": "user", "content": content}], dict(query=q, images=[image])))
    q = "Image1 <ImageHere>; Image2 <ImageHere>; Compare them."
    content = [{"type": "text", "text": q}, {"type": "image_url", "image_url": {"url": data_url(SMALL)}},
               {"type": "image_url", "image_url": {"url": data_url(WIDE)}}]
    out.append(([{"role": "user", "content": content}], dict(query=q, images=[SMALL, WIDE])))
    out.append(([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
                dict(query="Hi", use_meta=True, meta_instruction="You are terse.")))
    out.append(([{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A model."},
                 {"role": "user", "content": "Why?"}],
                dict(query="Why?", history=[("Who are you?", "A model.")])))
    return out


REQUESTS = _requests()


@pytest.fixture(scope="module")
def library(converted):
    model, processor = load(converted)
    return model, processor


@pytest.fixture(scope="module")
def expected(library):
    """Each request's single-request greedy answer from the library: (response, completion ids, prompt length)."""
    model, processor = library
    out = []
    for _, args in REQUESTS:
        args = dict(args)
        result = chat_with_ids(model, processor, args.pop("query"), max_new_tokens=MAX_TOKENS, hd_num=1, **args)
        out.append(result)
    return out


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: list):
        self.proc, self.url, self.log = proc, url, log
        host, port = url[len("http://"):].split(":")
        self.host, self.port = host, int(port)

    def client(self, key: str = KEY, **kwargs) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120, **kwargs)

    def raw(self, method: str, path: str, body=None, headers=None, key: str = KEY):
        """(status, parsed JSON or raw text) of one plain HTTP request."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
                       **(headers or {})}
        conn.request(method, path, body=data, headers=all_headers)
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text

    def health(self) -> dict:
        return self.raw("GET", "/health", key=None)[1]


def launch(model_dir: str, *args: str):
    """`ms-xcomposer serve model_dir` started on 127.0.0.1 with a free port (--port 0; the URL read from its
    output), not waited for: (process, URL found event, [URL], log lines)."""
    cmd = [sys.executable, "-m", "ms_xcomposer", "serve", model_dir, "--host", "127.0.0.1", "--port", "0",
           "--api-key", KEY, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list = []
    found = threading.Event()
    url_box: list = []

    def read() -> None:
        for line in proc.stdout:
            log.append(line)
            m = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
            if m and not url_box:
                url_box.append(m.group(1))
                found.set()

    threading.Thread(target=read, daemon=True).start()
    return proc, found, url_box, log


def started(launched) -> Server:
    """The `Server` of a `launch`, once it listens (the test fails with its log if it does not start)."""
    proc, found, url_box, log = launched
    if not found.wait(START_TIMEOUT_S):
        proc.kill()
        pytest.fail("the server did not start:\n" + "".join(log))
    return Server(proc, url_box[0], log)


def stop(launched) -> None:
    proc = launched[0]
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def launched(converted):
    """The IXC-2.5 server, launched so that it loads while `expected` is computed."""
    running = launch(converted, "--max-batch", "8", "--max-queue", "16", "--allowed-local-media", DATA,
                     "--max-images", "4", "--max-body-mb", "1", "--max-pixels", "2000000")
    yield running
    stop(running)


@pytest.fixture(scope="module")
def server(launched, expected):
    return started(launched)


def ask(client, messages, stream=False, model=MODEL, extra_body=None):
    """(text, finish_reason, usage) of one chat completion through the openai client (`extra_body`: the
    extensions, default XComposer2's hd_num 1)."""
    params = dict(model=model, messages=messages, max_tokens=MAX_TOKENS,
                  extra_body={"hd_num": 1} if extra_body is None else extra_body)
    if not stream:
        r = client.chat.completions.create(**params)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    text, reason, usage = "", None, None
    for part in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **params):
        if part.usage is not None:
            usage = part.usage
        for choice in part.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    return text, reason, usage


def _reason(result) -> str:
    return "stop" if result.ids and result.ids[-1] in EOS else "length"


def test_models_and_health(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert server.health()["status"] == "ok"


@pytest.mark.parametrize("stream", [False, True])
def test_answers_equal_the_library(server, expected, stream):
    """Text, image, two-image, system-message and history requests, one at a time: the library's greedy answer,
    its finish reason and token counts (image tokens in the prompt count)."""
    client = server.client()
    for k in (0, 10, 13, 14, 15):
        text, reason, usage = ask(client, REQUESTS[k][0], stream=stream)
        want = expected[k]
        assert text == want.response, k
        assert reason == _reason(want)
        assert usage.completion_tokens == len(want.ids)


def test_prompt_tokens_count_image_tokens(server, library):
    model, processor = library
    from ms_xcomposer.conversation import prepare_turn

    turn = prepare_turn(model, processor, "Describe this image.", [WIDE], (), hd_num=1)
    _, _, usage = ask(server.client(), REQUESTS[10][0])
    assert usage.prompt_tokens == int(turn.inputs.inputs_embeds.shape[1]) > 100  # image rows included


def test_sixteen_concurrent_clients(server, expected):
    """16 clients at once (half streaming): every answer equals its single-request greedy answer, none lost."""
    def one(k):
        return ask(server.client(), REQUESTS[k][0], stream=bool(k % 2))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    assert [a[0] for a in answers] == [e.response for e in expected]
    assert [a[2].completion_tokens for a in answers] == [len(e.ids) for e in expected]
    assert server.health()["running"] == 0


def test_local_media_path(server, expected):
    content = [{"type": "image_url", "image_url": {"url": WIDE}}, {"type": "text", "text": "Describe this image."}]
    text, _, _ = ask(server.client(), [{"role": "user", "content": content}])
    assert text == expected[10].response
    content[0]["image_url"]["url"] = "file://" + os.path.abspath(WIDE)
    assert ask(server.client(), [{"role": "user", "content": content}])[0] == expected[10].response


def _chat_body(**overrides):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    body.update(overrides)
    return body


def _image_message(url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is this?"}]}]


BAD_REQUESTS = [
    # (name, body or raw bytes, extra headers, key, status, a piece of the message)
    ("malformed JSON", b'{"model": "ms", "messages": [', None, KEY, 400, "not valid JSON"),
    ("bad base64", _chat_body(messages=_image_message("data:image/png;base64,%%%notbase64")), None, KEY, 400,
     "base64 is malformed"),
    ("not an image", _chat_body(messages=_image_message("data:image/png;base64," + base64.b64encode(b"hi").decode())),
     None, KEY, 400, "not a readable image"),
    ("not an image type", _chat_body(messages=_image_message("data:text/plain;base64,aGVsbG8=")), None, KEY, 400,
     "not an image"),
    ("decompression bomb", _chat_body(messages=_image_message(
        "data:image/png;base64," + base64.b64encode(png_bytes((2000, 1001))).decode())), None, KEY, 400,
     "possible decompression bomb"),
    ("too many images", _chat_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}] * 5}]), None, KEY, 400,
     "over the server's limit of 4"),
    ("remote URL", _chat_body(messages=_image_message("https://example.com/a.png")), None, KEY, 400, "not fetched"),
    ("outside local media", _chat_body(messages=_image_message("/etc/hostname")), None, KEY, 400,
     "outside the allowed local media"),
    ("bad temperature", _chat_body(temperature="hot"), None, KEY, 400, "temperature must be a number"),
    ("bad top_p", _chat_body(top_p=5), None, KEY, 400, "top_p must be in"),
    ("bad max_tokens", _chat_body(max_tokens=0), None, KEY, 400, "max_tokens must be >= 1"),
    ("n > 1", _chat_body(n=2), None, KEY, 400, "n must be 1"),
    ("unknown infer_mode", _chat_body(infer_mode="draw"), None, KEY, 400, "infer_mode 'draw' unknown"),
    ("unknown field", _chat_body(tools=[]), None, KEY, 400, "unsupported field"),
    ("last message not user", _chat_body(messages=[{"role": "assistant", "content": "x"}]), None, KEY, 400,
     "last message must be a user message"),
    ("missing key", _chat_body(), None, None, 401, "API key"),
    ("wrong key", _chat_body(), None, "nope", 401, "API key"),
    ("unknown model", _chat_body(model="gpt-4"), None, KEY, 404, "does not exist"),
    ("oversized body", b"{" + b" " * (1 << 20) + b"}", None, KEY, 413, "over the server's limit"),
]


@pytest.mark.parametrize("name,body,headers,key,status,message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_status_then_good_request(server, expected, name, body, headers, key, status, message):
    got, payload = server.raw("POST", "/v1/chat/completions", body, headers, key=key)
    assert got == status, payload
    assert set(payload["error"]) >= {"message", "type", "code", "param"}
    assert message in payload["error"]["message"]
    good = server.raw("POST", "/v1/chat/completions", {**_chat_body(max_tokens=MAX_TOKENS, hd_num=1),
                                                       "messages": REQUESTS[0][0]})
    assert good[0] == 200 and good[1]["choices"][0]["message"]["content"] == expected[0].response


def test_openai_client_errors(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="other", messages=REQUESTS[0][0])
    with pytest.raises(openai.BadRequestError, match="placeholder"):  # the library's prompt check, as a 400
        server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "text", "text": "Two images, no marks"},
            {"type": "image_url", "image_url": {"url": data_url(SMALL)}},
            {"type": "image_url", "image_url": {"url": data_url(WIDE)}}]}], extra_body={"hd_num": 1})
    status, payload = server.raw("GET", "/v1/nothing")
    assert status == 404 and "error" in payload


def test_stream_ends_with_done(server, expected):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({**_chat_body(max_tokens=MAX_TOKENS, stream=True,
                                                                        hd_num=1), "messages": REQUESTS[0][0]}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [e for e in resp.read().decode().split("\n\n") if e]
    conn.close()
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected[0].response
    assert chunks[-1]["choices"][0]["finish_reason"] == _reason(expected[0])


def test_queue_full_is_429(server):
    """A beam-search request runs alone and holds the engine; meanwhile 16 requests fill the queue (--max-queue
    16) and the 17th is refused with 429. All 16 are then answered."""
    client = server.client()
    beam = client.chat.completions.create(model=MODEL, messages=REQUESTS[1][0], max_tokens=400, stream=True,
                                          extra_body={"num_beams": 2})
    first = next(iter(beam))  # the beam request is prepared and running alone
    assert first.choices[0].delta.role == "assistant"
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        waiting = [pool.submit(server.raw, "POST", "/v1/chat/completions", _chat_body()) for _ in range(16)]
        deadline = time.time() + 30
        while server.health()["queued"] < 16 and time.time() < deadline:
            time.sleep(0.05)
        assert server.health()["queued"] == 16, "the beam request ended before the queue filled"
        status, payload = server.raw("POST", "/v1/chat/completions", _chat_body())
        assert status == 429 and "already waiting" in payload["error"]["message"]
        assert [f.result()[0] for f in waiting] == [200] * 16
    beam.close()


def test_disconnect_mid_stream_cancels_the_row(server, library):
    """A client that goes away after two chunks: its row is cancelled (counted by /health) long before its
    max_tokens, and the next request is answered."""
    model, processor = library
    messages = REQUESTS[9][0]
    long_run = chat_with_ids(model, processor, messages[0]["content"], max_new_tokens=24)
    assert len(long_run.ids) == 24  # precondition: this prompt does not stop early by itself
    before = server.health()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(_chat_body(messages=messages, max_tokens=2000,
                                                                     stream=True)),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    resp.fp.readline(), resp.fp.readline(), resp.fp.readline()  # the role chunk and a content chunk
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.time() + 30
    while server.health()["cancelled"] == before["cancelled"] and time.time() < deadline:
        time.sleep(0.1)
    after = server.health()
    assert after["cancelled"] == before["cancelled"] + 1 and after["running"] == 0
    assert ask(server.client(), REQUESTS[0][0])[0] is not None


def test_sigterm_finishes_in_flight_then_exits(server, expected):
    """Last (it stops the server): SIGTERM while 6 requests are in flight; every one is answered in full, new
    connections are refused, the process exits with 130."""
    ks = [0, 3, 10, 12, 14, 15]
    before = server.health()

    def arrived() -> int:  # requests the server has: waiting, decoding, or already answered
        h = server.health()
        return h["running"] + h["queued"] + h["stop"] + h["length"] - before["stop"] - before["length"]

    with concurrent.futures.ThreadPoolExecutor(len(ks)) as pool:
        futures = [pool.submit(ask, server.client(), REQUESTS[k][0], bool(k % 2)) for k in ks]
        deadline = time.time() + 30
        while arrived() < len(ks) and time.time() < deadline:
            time.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)
        answers = [f.result()[0] for f in futures]
    assert answers == [expected[k].response for k in ks]
    assert server.proc.wait(60) == 130
    with pytest.raises(OSError):
        http.client.HTTPConnection(server.host, server.port, timeout=5).request("GET", "/health")


def test_serve_bad_arguments_exit_2(converted, tmp_path):
    """A missing model directory, and a port already taken: one line on stderr, exit 2."""
    import socket

    missing = subprocess.run([sys.executable, "-m", "ms_xcomposer", "serve", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "not found" in missing.stderr and len(missing.stderr.splitlines()) == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run([sys.executable, "-m", "ms_xcomposer", "serve", converted, "--port", str(port)],
                              capture_output=True, text=True, timeout=300)
    assert busy.returncode == 2, busy.stderr
    assert f"could not listen on 127.0.0.1:{port}" in busy.stderr.splitlines()[-1]


# ---- another family ------------------------------------------------------------------------------------------
INTERNVL_DATA = os.path.join(os.path.dirname(DATA), "internvl15_tiny")


def test_internvl_checkpoint_is_served(tmp_path):
    """The golden InternVL-1.5 checkpoint served: an image request (the official chat's answer, the same as the
    library's; also streamed), a system message (InternVL's `system_message`) and the `max_num` extension, each
    equal to the library's chat with the same arguments, one at a time and then all three at once."""
    from ms_xcomposer.conversion.convert import convert

    model_dir = str(tmp_path / "internvl")
    convert(os.path.join(INTERNVL_DATA, "hf"), model_dir)
    running = launch(model_dir)
    try:
        model, processor = load(model_dir)
        image = os.path.join(INTERNVL_DATA, "image_wide.png")
        with open(os.path.join(INTERNVL_DATA, "golden.json"), encoding="utf-8") as f:
            golden = json.load(f)["chat_a"]
        want = [chat_with_ids(model, processor, "Describe this image.", [image], max_new_tokens=MAX_TOKENS),
                chat_with_ids(model, processor, "Hi", system_message="Be brief.", max_new_tokens=MAX_TOKENS),
                chat_with_ids(model, processor, "Describe this image.", [image], max_num=1, max_new_tokens=MAX_TOKENS)]
        client = started(running).client()
        content = [{"type": "image_url", "image_url": {"url": data_url(image)}},
                   {"type": "text", "text": "Describe this image."}]
        text, reason, usage = ask(client, [{"role": "user", "content": content}], model="internvl", extra_body={})
        assert text == want[0].response and want[0].ids == golden["generated_ids"][:MAX_TOKENS]
        assert reason == "length" and usage.prompt_tokens == 1830  # 7 tiles x 256 image rows + 38 text rows
        streamed = ask(client, [{"role": "user", "content": content}], stream=True, model="internvl", extra_body={})
        assert streamed[0] == want[0].response and streamed[2].completion_tokens == MAX_TOKENS
        text, _, _ = ask(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                         model="internvl", extra_body={})
        assert text == want[1].response
        text, _, usage = ask(client, [{"role": "user", "content": content}], model="internvl",
                             extra_body={"max_num": 1})
        assert text == want[2].response and usage.prompt_tokens == 1830 - 6 * 256
        assert len({w.response for w in want}) == 3
        requests = [([{"role": "user", "content": content}], {}),
                    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], {}),
                    ([{"role": "user", "content": content}], {"max_num": 1})]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # the three at once: rows of one decode batch
            answers = list(pool.map(lambda r: ask(started(running).client(), r[0], model="internvl",
                                                  extra_body=r[1])[0], requests))
        assert answers == [w.response for w in want]
        with pytest.raises(openai.BadRequestError, match=r"unknown InternVL chat options \['hd_num'\]"):
            ask(client, [{"role": "user", "content": "Hi"}], model="internvl")
    finally:
        stop(running)


def test_llava_checkpoint_is_served(tmp_path):
    """A tiny random llava-hf checkpoint (written without torch) served: an image request (also streamed), a
    system message (LLaVA's `system`) and a text-only turn with a history, each equal to the library's chat with
    the same arguments, one at a time and then all at once (rows of one decode batch, of different lengths)."""
    from ms_xcomposer.conversion.convert import convert
    from ms_xcomposer.models.llava.synthetic import write_random_checkpoint

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    write_random_checkpoint(str(hf_dir))
    model_dir = str(tmp_path / "llava")
    convert(str(hf_dir), model_dir)
    running = launch(model_dir)
    try:
        model, processor = load(model_dir)
        image = os.path.join(DATA, "image_wide.png")
        history = [("Hi", "Hello there.")]
        want = [chat_with_ids(model, processor, "Describe this image.", [image], max_new_tokens=MAX_TOKENS),
                chat_with_ids(model, processor, "Hi", system="Be brief.", max_new_tokens=MAX_TOKENS),
                chat_with_ids(model, processor, "And now?", history=history, max_new_tokens=MAX_TOKENS)]
        content = [{"type": "image_url", "image_url": {"url": data_url(image)}},
                   {"type": "text", "text": "Describe this image."}]
        requests = [[{"role": "user", "content": content}],
                    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
                     {"role": "user", "content": "And now?"}]]
        client = started(running).client()
        text, _, usage = ask(client, requests[0], model="llava", extra_body={})
        assert text == want[0].response
        # usage counts the image's rows: the prompt as the transformers-style processor expands it
        expanded = np.asarray(processor(images=[Image.open(image)],
                                        text="USER: <image>\nDescribe this image. ASSISTANT:")["input_ids"])
        image_rows = int((expanded == model.config.image_token_index).sum())
        assert image_rows > 1 and usage.prompt_tokens == expanded.shape[-1]
        assert usage.completion_tokens == len(want[0].ids)
        assert ask(client, requests[0], stream=True, model="llava", extra_body={})[0] == want[0].response
        for messages, expected in zip(requests[1:], want[1:]):
            assert ask(client, messages, model="llava", extra_body={})[0] == expected.response
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda m: ask(started(running).client(), m, model="llava", extra_body={})[0],
                                    requests))
        assert answers == [w.response for w in want]
        with pytest.raises(openai.BadRequestError, match=r"hd_num"):
            ask(client, [{"role": "user", "content": "Hi"}], model="llava")
    finally:
        stop(running)
