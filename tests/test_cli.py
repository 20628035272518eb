"""The `ms-xcomposer` dispatcher and the chat / info / demo commands: output, exit codes, error paths.

Judges: the golden outputs of the official PyTorch code (chat), the safetensors library and the golden case's
documented sizes (info), the golden tokenizer files and torch.load (demo checkpoint), and the library chat run in
this process (the interactive session, whose prompts the official code never built).
"""
import builtins
import io
import json
import os
import re
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

from helpers_checkpoints import GOLDEN_BIN, GOLDEN_ST, flip_byte, tiny_hf_checkpoint
from ms_xcomposer import cli
from ms_xcomposer.commands import chat as chat_command
from ms_xcomposer.commands import demo as demo_command
from ms_xcomposer.models.xcomposer2.config import preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "ixc25_tiny")
WIDE, SMALL = (os.path.join(DATA, f"image_{n}.png") for n in ("wide", "small"))
GREEDY = ["--max-new-tokens", "4", "--repetition-penalty", "1.0", "--hd-num", "1"]


def run_cli(*args, stdin=None, timeout=600, cwd=ROOT, env=None):
    """`python -m ms_xcomposer ARGS` in a fresh process, as a user runs it (no GLOG_v set by us); `env`: extra
    environment variables."""
    env = {**{k: v for k, v in os.environ.items() if k != "GLOG_v"}, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ms_xcomposer", *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", env=env, cwd=cwd, timeout=timeout)


@pytest.fixture(autouse=True)
def back_to_pynative():
    """Commands select the mode for the whole process; every test starts and ends in PyNative."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(DATA, "golden.json"), encoding="utf-8") as f:
        return json.load(f)


def lib_chat(library, query, image, history=(), **kwargs):
    from ms_xcomposer import chat

    options = dict(hd_num=1, do_sample=False, max_new_tokens=4, repetition_penalty=1.0)
    options.update(kwargs)
    return chat(*library, query, images=image, history=history, **options)


# ---- dispatcher -------------------------------------------------------------------------------------------
def test_help_lists_every_command_and_the_exit_codes():
    out = run_cli("--help", timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("convert", "export-hf", "verify", "info", "chat", "serve", "parity", "demo"):
        assert re.search(rf"^    {re.escape(name)}\b", out.stdout, re.M), name
    for code in ("0 ", "1 ", "2 ", "3 ", "130"):
        assert re.search(rf"^  {code}", out.stdout, re.M), code
    assert out.stderr == ""


def test_commands_tuple_names_modules_that_all_register():
    sub = cli.build_parser()._subparsers._group_actions[0]
    registered = set(sub.choices)
    assert registered == {"convert", "export-hf", "verify", "info", "chat", "serve", "parity", "demo"}
    assert len(cli.COMMANDS) == len(registered)


@pytest.mark.parametrize("command", ["convert", "export-hf", "verify", "info", "chat", "serve", "parity", "demo"])
def test_every_command_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"ms-xcomposer {command}" in out


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == cli.EXIT_BAD_INPUT
    assert "usage: ms-xcomposer" in capsys.readouterr().out


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "nowhere")
    plain = run_cli("info", missing, timeout=120)
    assert plain.returncode == 2
    assert plain.stderr == f"error: checkpoint path {missing} does not exist\n"
    debug = run_cli("--debug", "info", missing, timeout=120)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr and "CheckpointError" in debug.stderr


def test_internal_errors_are_one_line_exit_3(monkeypatch, capsys):
    def boom(path):
        raise RuntimeError("kernel launch failed\n----\n- C++ Call Stack: (For framework developers)\n...")

    monkeypatch.setattr("ms_xcomposer.checkpoint_info.summarize", boom)
    assert cli.main(["info", GOLDEN_BIN]) == cli.EXIT_INTERNAL_ERROR
    err = capsys.readouterr().err
    assert err == ("error: internal error: RuntimeError: kernel launch failed (run with --debug for the "
                   "traceback)\n")
    with pytest.raises(RuntimeError):
        cli.main(["--debug", "info", GOLDEN_BIN])


def test_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr("ms_xcomposer.checkpoint_info.summarize", interrupted)
    assert cli.main(["info", GOLDEN_BIN]) == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err == "interrupted\n"


def test_glog_level_defaults_to_3_unless_set():
    code = "import os, ms_xcomposer.cli; print(os.environ['GLOG_v'])"
    env = {k: v for k, v in os.environ.items() if k != "GLOG_v"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout == "3\n"
    env["GLOG_v"] = "1"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout == "1\n"


# ---- info -------------------------------------------------------------------------------------------------
def _safetensors_params(directory):
    """{name: shape} of every tensor, read by the safetensors library (not by this package's readers)."""
    from safetensors import safe_open

    shapes = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "np") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def test_info_on_the_golden_checkpoint_hf_and_converted(converted, capsys):
    shapes = _safetensors_params(GOLDEN_ST)
    total = sum(int(np.prod(s)) for s in shapes.values())
    plora = sum(int(np.prod(s)) for k, s in shapes.items() if ".Plora_" in k)
    adapters = sum(int(np.prod(s)) for k, s in shapes.items() if ".lora_" in k)
    outputs = {}
    for name, path in (("hf", GOLDEN_BIN), ("ms", converted)):
        assert cli.main(["info", path]) == 0
        outputs[name] = capsys.readouterr().out.splitlines()
    hf, ms_out = outputs["hf"], outputs["ms"]
    assert hf[0].startswith(f"{GOLDEN_BIN}: Hugging Face directory, bin (2 file(s)")
    assert ms_out[0].startswith(f"{converted}: converted MindSpore directory, ckpt")
    assert hf[1:] == ms_out[1:]  # the same model, whichever form it is in
    text = "\n".join(hf)
    # facts of the golden case (CASE.md)
    assert "variant: IXC-2.5 (ixc2.5)" in text
    assert f"parameters: {total / 1e6:.2f}M ({total:,}) in {len(shapes)} tensors" in text
    assert re.search(rf"^  PLoRA +{plora / 1e6:.2f}M \({plora:,}\)$", text, re.M)
    assert re.search(rf"^  task adapters +{adapters / 1e6:.2f}M \({adapters:,}\)$", text, re.M)
    assert "dtypes: bfloat16 (142 tensors)" in text
    assert ("language model: InternLM2, hidden 256, 2 layers, 4 heads (2 KV heads, head_dim 64), FFN 512, vocab "
            "rows 1000, rope theta 1,000,000, rope scaling dynamic x2.0, max positions 4096") in text
    assert ("vision tower: CLIP ViT, image 560, patch 14 (grid 40x40), width 128, 2 layers, 2 heads, FFN 512, "
            "post_layernorm present (unused)") in text
    assert "projector: 512 -> 256 -> 256 (GELU), 2x2 patch merge" in text
    assert "PLoRA: wqkv r=256 alpha=256 (scale 1)" in text
    assert "task adapters: lora_web, lora_sft, lora_dpo (rank 256)" in text
    assert "image tokens: 841 for 1 tile, 2061 for 2x2" in text
    assert re.search(r"^  model\.layers\.\*\.attention\.wqkv\.weight +\[512, 256\] +bfloat16  x2$", text, re.M)
    assert re.search(r"^  model\.layers\.\*\.attention\.wqkv\.lora_\*_B\.weight +\[512, 256\] +bfloat16  x6$",
                     text, re.M)
    assert re.search(r"^  plora_sub_GN +\[1, 1, 1, 512\] +bfloat16$", text, re.M)


def test_info_json(capsys):
    shapes = _safetensors_params(GOLDEN_ST)
    assert cli.main(["info", GOLDEN_ST, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["family"] == "xcomposer2" and d["config"]["variant"] == "ixc2.5"
    assert d["kind"] == "hf" and d["format"] == "safetensors"
    assert d["tensors"] == len(shapes) == 142
    assert d["total_params"] == sum(int(np.prod(s)) for s in shapes.values())
    assert d["config"]["plora"]["wqkv"] == {"rank": 256, "alpha": 256}
    assert sum(g["count"] for g in d["shapes"]) == 142


@pytest.mark.parametrize("name, expected", [
    ("tiny-ixc2-vl", ["variant: IXC2-VL (ixc2-vl)", "image 490, patch 14 (grid 35x35)",
                      "projector: 128 -> 256 -> 256 (GELU)\n", "task adapters: none",
                      "images: one 490x490 view, 1225 tokens per image"]),
    ("tiny-ixc2-4khd", ["variant: IXC2-4KHD (ixc2-4khd)", "post_layernorm absent",
                        "PLoRA: wqkv r=8 alpha=16 (scale 2), wo r=256 alpha=256", "task adapters: none",
                        "images: HD tiles of 336 px, default hd_num 25; image tokens: 313 for 1 tile"]),
])
def test_info_tells_the_variants_apart(tmp_path, capsys, name, expected):
    tiny_hf_checkpoint(str(tmp_path / name), name, fmt="safetensors")
    assert cli.main(["info", str(tmp_path / name)]) == 0
    out = capsys.readouterr().out
    for line in expected:
        assert line in out, line


def test_info_bad_inputs(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path)]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    hf = tiny_hf_checkpoint(str(tmp_path / "hf"), fmt="safetensors")
    with open(os.path.join(hf, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    del config["num_hidden_layers"]
    with open(os.path.join(hf, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    assert cli.main(["info", hf]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "num_hidden_layers" in err and err.count("\n") == 1


# ---- chat ---------------------------------------------------------------------------------------------------
def test_chat_query_reproduces_the_official_answer(golden, capsys):
    g = golden["gen_greedy"]
    kw = g["kwargs"]
    args = ["chat", GOLDEN_BIN, "--image", os.path.join(DATA, g["image"][0]), "--query", g["query"],
            "--hd-num", str(kw["hd_num"]), "--max-new-tokens", str(kw["max_new_tokens"]),
            "--repetition-penalty", str(kw["repetition_penalty"])]
    assert cli.main(args) == 0
    out = capsys.readouterr()
    assert out.out == g["response"] + "\n"
    assert "loaded XComposer2ForCausalLM from" in out.err and "pynative mode, float32 compute" in out.err
    assert f"[{kw['max_new_tokens']} tokens in " in out.err
    # loading shows its progress (plain lines when stderr is not a terminal), ending at 100% before "loaded"
    done = re.search(r"^load: 100% \(([\d.]+) of \1 GB, \d+ s\)$", out.err, re.M)
    first = re.search(r"^load: \d+% ", out.err, re.M)
    assert done and first.start() < done.start() < out.err.index("loaded XComposer2ForCausalLM")


def test_chat_passes_the_sampling_options(converted, library, capsys):
    args = ["--do-sample", "--seed", "3", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "20",
            "--repetition-penalty", "1.1", "--max-new-tokens", "4", "--hd-num", "1"]
    assert cli.main(["chat", converted, "--image", SMALL, "--query", "What is this?", *args]) == 0
    expected, _ = lib_chat(library, "What is this?", [SMALL], do_sample=True, seed=3, temperature=0.7, top_p=0.9,
                           top_k=20, repetition_penalty=1.1)
    greedy, _ = lib_chat(library, "What is this?", [SMALL])
    assert expected != greedy  # the options change the answer, so the comparison below can fail
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("args, message", [
    (["--image", "/no/such/image.png"], "error: image /no/such/image.png does not exist"),
    (["--do-sample", "--temperature", "0"], "error: temperature must be > 0 when sampling, got 0.0"),
    (["--top-p", "1.5"], "error: top_p must be in (0, 1], got 1.5"),
    (["--mode", "eager"], "error: unknown mode 'eager'; expected 'pynative' or 'graph'"),
    (["--device", "TPU"], "error: unknown device 'TPU'; expected one of CPU, GPU, Ascend"),
    (["--image", SMALL, "--image", WIDE, "--query", "<ImageHere> compare"],
     "error: the prompt (history included) has 1 <ImageHere> placeholder(s) but 2 image(s) were given"),
])
def test_chat_bad_input_is_one_line_exit_2(converted, capsys, args, message):
    argv = ["chat", converted, *args] + ([] if "--query" in args else ["--query", "hi"])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(message) and not any("Traceback" in line for line in err)


def test_chat_missing_model_dir_and_bad_numbers(tmp_path, capsys):
    assert cli.main(["chat", str(tmp_path / "none"), "--query", "hi"]) == 2
    assert capsys.readouterr().err == f"error: model directory {tmp_path / 'none'} does not exist\n"
    with pytest.raises(SystemExit) as e:
        cli.main(["chat", str(tmp_path), "--hd-num", "0"])
    assert e.value.code == 2
    assert "must be a positive integer, got 0" in capsys.readouterr().err


def test_interactive_session_over_stdin_in_graph_mode(converted, library):
    """/image, a follow-up turn (history + the image re-sent), /reset, errors that do not end the session."""
    a1, h1 = lib_chat(library, "Describe this image.", [SMALL])
    a2, _ = lib_chat(library, "What is in it?", [SMALL], history=h1)
    a3, _ = lib_chat(library, "Describe this image.", None)  # after /reset: no image, no history
    assert len({a1, a2, a3}) == 3, "the three answers must differ for this test to tell them apart"
    script = "\n".join(["/help", "/image /no/such.png", "/frob", f"/image {SMALL}", "Describe this image.",
                        "What is in it?", "/reset", "Describe this image.", "/exit", "never read"]) + "\n"
    out = run_cli("chat", converted, "--mode", "graph", *GREEDY, stdin=script)
    assert out.returncode == 0, out.stderr
    stdout = out.stdout
    positions = [stdout.index(s) for s in (f"[image {SMALL} attached to the next message]",
                                           f"assistant> {a1}\n", f"assistant> {a2}\n", "[conversation reset]",
                                           f"assistant> {a3}\n")]
    assert positions == sorted(positions)
    assert stdout.startswith("you> commands: /image PATH")
    assert "error: image /no/such.png does not exist" in out.stderr
    assert "error: unknown command '/frob'" in out.stderr
    assert "graph mode" in out.stderr
    assert "Traceback" not in out.stderr and "[WARNING]" not in out.stderr  # GLOG_v=3 keeps MindSpore quiet


def _session(monkeypatch, converted, lines, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    code = cli.main(["chat", converted, *GREEDY])
    return code, capsys.readouterr()


def test_session_ends_at_eof_and_survives_prompt_errors(monkeypatch, converted, capsys):
    code, out = _session(monkeypatch, converted, ["<ImageHere> hi", "/reset"], capsys)
    assert code == 0
    assert "[conversation reset]" in out.out
    assert "error: the prompt (history included) has 1 <ImageHere> placeholder(s) but no image was given" in out.err


def test_ctrl_c_stops_the_answer_not_the_session(monkeypatch, converted, capsys):
    class Interrupted:
        def __iter__(self):
            raise KeyboardInterrupt

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr("ms_xcomposer.conversation.stream_chat", lambda *a, **k: Interrupted())
    code, out = _session(monkeypatch, converted, ["hello", "/reset"], capsys)
    assert code == 0
    assert "[stopped]" in out.out and out.out.index("[stopped]") < out.out.index("[conversation reset]")


def test_ctrl_c_at_the_prompt_exits_130(monkeypatch, converted, capsys):
    def interrupt(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr(builtins, "input", interrupt)
    assert cli.main(["chat", converted]) == 130


@pytest.mark.parametrize("auto", [True, False])
def test_session_places_images(auto):
    p = "<ImageHere>"
    s = chat_command.Session("<ImageHere>", auto_image_placeholder=auto)
    s.pending = ["a.png"]
    query, images, history = s.turn("Describe.")
    assert images == ["a.png"] and history == []
    assert query == ("Describe." if auto else p + "Describe.")  # IXC-2.5 places a lone image itself
    s.commit([(query, "A")])
    assert s.turn("And?") == ("And?", ["a.png"], [(query, "A")])  # the image is re-sent, no new mark
    s.pending = ["b.png"]
    query, images, history = s.turn("Compare.")
    assert images == ["a.png", "b.png"] and query == p + "Compare."
    assert history == [(p + "Describe.", "A")]  # the first image's place made explicit for two images
    s.commit(history + [(query, "B")])
    s.pending = ["c.png"]
    assert s.turn(f"Third {p} here")[0] == f"Third {p} here"  # the user's own mark is kept
    s.reset()
    assert s.turn("hi") == ("hi", None, [])


# ---- demo ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("demo-cache")
    return cache, run_cli("demo", "--cache-dir", str(cache))


def test_demo_report(demo_run):
    cache, out = demo_run
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "Its weights are random, so its answers are meaningless text" in text
    assert "[1/5] checkpoint created in " in text and str(cache / "hf") in text
    assert re.search(r"^\[2/5\] converted 142 tensors, 0\.02 GB in [\d.]+ s \([\d.]+ GB/s\)", text, re.M)
    assert re.search(r"^\[3/5\] PyNative chat, 'Describe this image\.' about demo\.png \(hd_num 1\):", text, re.M)
    assert re.search(r"^      12 new tokens in [\d.]+ s: first token after [\d.]+ s", text, re.M)
    assert re.search(r"^\[4/5\] parity with the PyTorch reference", text, re.M)
    compiling = "\n      compiling the graphs (vision encoder, token embedding, language model step): a few seconds ...\n"
    assert text.index("\n[5/5] GRAPH chat") < text.index(compiling) < text.index("answer:", text.index("[5/5]"))
    assert re.search(r"^      greedy tokens +0 differ +0\.00 +identical +pass +identical$", text, re.M)
    assert re.search(r"^  conversion +[\d.]+ GB/s \(142 tensors, 19\.8 MB", text, re.M)
    assert re.search(r"^  PyNative +[\d.]+ tokens/s, first token after", text, re.M)
    assert re.search(r"^  GRAPH +[\d.]+ tokens/s, first token after", text, re.M)
    assert re.search(r"^  graphs compiled +[1-9]\d* in the first GRAPH turn, 0 more for the follow-up$", text, re.M)
    assert re.search(r"^  PyNative = GRAPH +identical tokens \(12 tokens\)$", text, re.M)
    assert re.search(r"^  parity +pass: all 10 stages within tolerance; .* greedy tokens identical over 8 steps$",
                     text, re.M)
    assert text.rstrip().endswith("demo: OK")
    assert "Traceback" not in out.stderr and "[WARNING]" not in out.stderr


def test_demo_checkpoint_has_the_real_layout(demo_run):
    """Weights read by torch; tokenizer files as the golden case's (same 1000-piece size); same trainer spec."""
    import torch
    from sentencepiece import sentencepiece_model_pb2

    from ms_xcomposer.models.xcomposer2 import FAMILY
    from ms_xcomposer.tokenizer import InternLM2Tokenizer

    cache, _ = demo_run
    hf = cache / "hf"
    with open(hf / "pytorch_model.bin.index.json", encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    assert sorted(set(weight_map.values())) == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    state = {}
    for shard in sorted(set(weight_map.values())):
        state.update(torch.load(hf / shard, weights_only=True))
    expected = FAMILY.parameter_shapes(preset("tiny-ixc2.5"))
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    with open(hf / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["architectures"] == ["InternLMXComposer2ForCausalLM"] and config["vocab_size"] == 1000
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "generation_config.json"):
        with open(hf / name, encoding="utf-8") as a, open(os.path.join(GOLDEN_BIN, name), encoding="utf-8") as b:
            assert json.load(a) == json.load(b), name
    specs = []
    for path in (hf / "tokenizer.model", os.path.join(GOLDEN_BIN, "tokenizer.model")):
        proto = sentencepiece_model_pb2.ModelProto()
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
        t, n = proto.trainer_spec, proto.normalizer_spec
        specs.append((t.model_type, t.vocab_size, list(t.user_defined_symbols), t.byte_fallback, t.split_digits,
                      t.unk_id, t.bos_id, t.eos_id, t.pad_id, n.name, n.add_dummy_prefix, n.remove_extra_whitespaces,
                      len(proto.pieces)))
    assert specs[0] == specs[1]
    tok = InternLM2Tokenizer.from_pretrained(str(hf))
    assert tok.encode("[UNUSED_TOKEN_146]\n<|plugin|>", add_bos=True) == [1, 3, 15, 1005]
    assert os.path.isfile(cache / "ms" / "mindspore_model.index.json")


def test_demo_cache_is_reused_only_when_valid(tmp_path):
    from ms_xcomposer import demo

    first = demo.ensure_checkpoint(str(tmp_path))
    assert first.status == "created"
    assert demo.ensure_checkpoint(str(tmp_path)).status == "reused"
    shard = os.path.join(first.hf_dir, "pytorch_model-00002-of-00002.bin")
    flip_byte(shard, os.path.getsize(shard) // 2)
    again = demo.ensure_checkpoint(str(tmp_path))
    assert (again.status, again.reason) == ("rebuilt", "pytorch_model-00002-of-00002.bin was modified")
    assert demo.ensure_checkpoint(str(tmp_path)).status == "reused"
    os.remove(os.path.join(first.hf_dir, "tokenizer.model"))
    assert demo.ensure_checkpoint(str(tmp_path)).reason == "tokenizer.model is missing"
    with open(os.path.join(first.hf_dir, demo.MANIFEST), "w", encoding="utf-8") as f:
        f.write("{")
    assert demo.ensure_checkpoint(str(tmp_path)).reason == f"{demo.MANIFEST} is missing or unreadable"
    assert demo.ensure_checkpoint(str(tmp_path), rebuild=True).reason == "--rebuild requested"
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary directories left behind


def test_demo_parity_step_says_why_it_is_skipped(monkeypatch, capsys):
    monkeypatch.setattr(demo_command, "have_torch", lambda: False)
    line, failure = demo_command.parity_step(False, None, None, "unused", 1)
    assert failure is None
    assert line == "skipped: torch and transformers are not installed (pip install 'ms-xcomposer[parity]')"
    assert capsys.readouterr().out == f"[4/5] parity: {line}\n"
    assert demo_command.parity_step(True, None, None, "unused", 1) == ("skipped (--no-parity)", None)


def test_demo_llava(tmp_path):
    """`demo --family llava`: a tiny random llava-hf checkpoint (written without torch) converted, chatted in both
    modes with identical tokens, and compared with transformers' Llava stage by stage; --hd-num is refused."""
    out = run_cli("demo", "--family", "llava", "--cache-dir", str(tmp_path), "--max-new-tokens", "6")
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "a tiny RANDOM LLaVA-1.5 model" in text
    assert "[1/5] checkpoint created in " in text and str(tmp_path / "llava" / "hf") in text
    assert re.search(r"^\[2/5\] converted 80 tensors", text, re.M)
    assert re.search(r"^\[3/5\] PyNative chat, 'Describe this image\.' about demo\.png:$", text, re.M)
    assert re.search(r"^\[4/5\] parity with transformers' LlavaForConditionalGeneration", text, re.M)
    for stage in ("pixels", "prompt ids", "vision layer -2", "projector", "embeddings", "layer 1", "logits"):
        assert re.search(rf"^      {stage} .* pass +(row|identical)$", text, re.M), stage
    assert re.search(r"^  graphs compiled +[1-9]\d* in the first GRAPH turn, 0 more for the follow-up$", text, re.M)
    assert re.search(r"^  PyNative = GRAPH +identical tokens \(6 tokens\)$", text, re.M)
    assert re.search(r"^  parity +pass: all 9 stages within tolerance; .* greedy tokens identical over 8 steps$",
                     text, re.M)
    assert text.rstrip().endswith("demo: OK") and "Traceback" not in out.stderr
    refused = run_cli("demo", "--family", "llava", "--hd-num", "2", "--cache-dir", str(tmp_path))
    assert refused.returncode == 2 and "--hd-num applies to the xcomposer2 demo" in refused.stderr


def test_demo_internvl(tmp_path):
    """`demo --family internvl`: a tiny random InternVL-1.5 checkpoint written without torch, in the official
    layout (the golden case's tensor names, saved by the official code; its tokenizer's special-token structure),
    converted and chatted in both modes with identical tokens."""
    from safetensors import safe_open

    from ms_xcomposer.tokenizer import InternLM2Tokenizer

    out = run_cli("demo", "--family", "internvl", "--cache-dir", str(tmp_path), "--max-new-tokens", "6")
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "a tiny RANDOM InternVL-1.5 model" in text
    hf = tmp_path / "internvl" / "hf"
    assert "[1/5] checkpoint created in " in text and str(hf) in text
    assert re.search(r"^\[2/5\] converted 53 tensors", text, re.M)
    assert re.search(r"^\[3/5\] PyNative chat, 'Describe this image\.' about demo\.png:$", text, re.M)
    assert re.search(r"^  graphs compiled +[1-9]\d* in the first GRAPH turn, 0 more for the follow-up$", text, re.M)
    assert re.search(r"^  PyNative = GRAPH +identical tokens \(6 tokens\)$", text, re.M)
    assert text.rstrip().endswith("demo: OK") and "Traceback" not in out.stderr
    golden = os.path.join(ROOT, "tests", "data", "internvl15_tiny", "hf")
    names = {}
    for directory in (str(hf), golden):
        keys = set()
        for name in os.listdir(directory):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(directory, name), "np") as f:
                    keys.update(f.keys())
        names[directory] = keys
    assert names[str(hf)] == names[golden] and len(names[golden]) == 53
    with open(os.path.join(golden, "tokenizer_config.json"), encoding="utf-8") as f:
        golden_specials = json.load(f)["additional_special_tokens"]
    with open(hf / "tokenizer_config.json", encoding="utf-8") as f:
        assert json.load(f)["additional_special_tokens"] == golden_specials
    tok = InternLM2Tokenizer.from_pretrained(str(hf))
    # the added tokens follow the 1000 pieces in the golden's order: <|im_start|> 1000, <img> 1006, <IMG_CONTEXT> 1008
    assert tok.encode("<|im_start|><img><IMG_CONTEXT></img><|im_end|>", add_bos=True) == [1, 1000, 1006, 1008, 1007,
                                                                                        1001]


def test_tokenizer_training_refuses_a_vocabulary_too_small():
    from ms_xcomposer.synthetic_tokenizer import train_sentencepiece

    with pytest.raises(ValueError, match="cannot train a 300-piece tokenizer on the demo corpus: .*Vocabulary size"):
        train_sentencepiece(300)


# ---- usage errors, --version, devices -----------------------------------------------------------------------
def test_usage_errors_are_one_line_with_a_help_pointer():
    out = run_cli("chat", GOLDEN_BIN, "--frob", timeout=120)
    assert out.returncode == 2
    assert out.stderr == "error: unrecognized arguments: --frob; see `ms-xcomposer --help`\n"
    out = run_cli("chat", GOLDEN_BIN, "--hd-num", "0", timeout=120)
    assert out.returncode == 2
    assert out.stderr == ("error: argument --hd-num: must be a positive integer, got 0; "
                          "see `ms-xcomposer chat --help`\n")


def test_version():
    from ms_xcomposer import __version__

    out = run_cli("--version", timeout=120)
    assert (out.returncode, out.stdout) == (0, f"ms-xcomposer {__version__}\n")


def test_a_missing_device_is_one_line_exit_2():
    import mindspore.device_context as device_context

    assert not device_context.gpu.is_available(), "this test needs a machine without a GPU"
    out = run_cli("chat", GOLDEN_BIN, "--device", "GPU", "--query", "hi", timeout=120)
    assert out.returncode == 2
    assert out.stderr == ("error: GPU is not available: this MindSpore installation or machine has no usable GPU "
                          "(use --device CPU)\n")


# ---- chat: every input checked before the model is loaded --------------------------------------------------
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("bad-files")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    Image.new("RGB", (200, 100), "white").save(d / "200x100.png")
    tiny_hf_checkpoint(str(d / "vl"), "tiny-ixc2-vl", fmt="safetensors")
    return d


@pytest.mark.parametrize("case, args, message", [
    ("directory", ["--image", "{d}"], "error: image {d} is a directory, not an image file"),
    ("corrupt", ["--image", "{d}/corrupt.png"], "error: '{d}/corrupt.png' is not a readable image: "),
    ("bomb", ["--image", "{d}/200x100.png", "--max-pixels", "19999"],
     "error: '{d}/200x100.png' has 200x100 = 20000 pixels, over the limit of 19999 (possible decompression bomb; "
     "pass a larger max_pixels, `--max-pixels` in the CLI, to allow it)"),
    ("placeholders", ["--image", SMALL, "--image", WIDE, "--query", "<ImageHere> compare"],
     "error: the prompt (history included) has 1 <ImageHere> placeholder(s) but 2 image(s) were given"),
    ("context", ["--max-new-tokens", "100000000"],
     "error: --max-new-tokens 100000000 exceeds the model's context length of 4096 positions"),
    ("adapters", ["--infer-mode", "web", "--model", "{d}/vl"],
     "error: --infer-mode web needs the task adapters lora_web, which this checkpoint does not have"),
])
def test_chat_refuses_bad_input_before_loading(bad_files, case, args, message):
    args = [a.format(d=bad_files) for a in args]
    model = GOLDEN_BIN
    if "--model" in args:
        i = args.index("--model")
        model = args[i + 1]
        del args[i:i + 2]
    query = [] if "--query" in args else ["--query", "hi"]
    out = run_cli("chat", model, *args, *query, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert lines[-1].startswith(message.format(d=bad_files)), lines
    assert not any(line.startswith(("loading", "loaded")) for line in lines)  # refused before the weights


def test_max_pixels_admits_a_larger_image(bad_files, converted, library, capsys):
    image = str(bad_files / "200x100.png")
    assert cli.main(["chat", converted, "--image", image, "--max-pixels", "20000", "--query", "hi", *GREEDY]) == 0
    expected, _ = lib_chat(library, "hi", [image])
    assert capsys.readouterr().out == expected + "\n"


MEMORY_PROBE = ("import sys, psutil\n"
                "available = int(sys.argv[1])\n"
                "real = psutil.virtual_memory\n"
                "psutil.virtual_memory = lambda: real()._replace(available=available)\n"
                "from ms_xcomposer.cli import main\n"
                "sys.exit(main(sys.argv[2:]))\n")


def test_chat_refuses_a_request_larger_than_the_memory_unless_forced(converted):
    """The real command in a subprocess whose memory probe reports 0.3 GB available: below what the tiny model's
    process alone takes (about 0.6 GB measured), so the request must be refused; with --force it runs."""
    env = {k: v for k, v in os.environ.items() if k != "GLOG_v"}
    argv = ["chat", converted, "--image", SMALL, "--query", "hi", *GREEDY]
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, "300000000", *argv], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 2, out.stderr
    last = out.stderr.splitlines()[-1]
    assert re.match(r"error: this request needs about [\d.]+ GB of memory \(weights [\d.]+ GB \+ KV cache 2 x "
                    r"[\d.]+ GB \+ activation [\d.]+ GB \(a prompt of \d+ rows\) \+ runtime [\d.]+ GB.*\), more "
                    r"than the 0\.30 GB available; use a smaller --hd-num", last), last
    assert "loading" not in out.stderr
    forced = subprocess.run([sys.executable, "-c", MEMORY_PROBE, "300000000", *argv, "--force"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert forced.returncode == 0, forced.stderr
    assert "warning: this request may need" in forced.stderr and "going on (--force)" in forced.stderr
    assert forced.stdout.strip()


def test_sampling_options_without_do_sample_warn_and_decode_greedily(converted, library):
    out = run_cli("chat", converted, "--image", SMALL, "--query", "hi", "--temperature", "0.5", "--top-k", "3",
                  *GREEDY)
    assert out.returncode == 0, out.stderr
    assert ("warning: --temperature, --top-k are ignored without --do-sample (greedy decoding); add --do-sample to "
            "sample") in out.stderr
    assert out.stdout == lib_chat(library, "hi", [SMALL])[0] + "\n"
    quiet = run_cli("chat", converted, "--image", SMALL, "--query", "hi", "--do-sample", "--temperature", "0.5",
                    *GREEDY)
    assert "warning" not in quiet.stderr


def test_infer_mode_and_meta_instruction_reach_the_chat(converted, library, capsys):
    args = ["--infer-mode", "write", "--meta-instruction", "Answer in one word."]
    assert cli.main(["chat", converted, "--image", SMALL, "--query", "hi", *args, *GREEDY]) == 0
    expected, _ = lib_chat(library, "hi", [SMALL], infer_mode="write", use_meta=True,
                           meta_instruction="Answer in one word.")
    plain, _ = lib_chat(library, "hi", [SMALL])
    meta_only, _ = lib_chat(library, "hi", [SMALL], use_meta=True, meta_instruction="Answer in one word.")
    assert len({expected, plain, meta_only}) == 3  # both options change the answer: the comparison can fail
    assert capsys.readouterr().out == expected + "\n"


def test_beam_sampling_runs_and_tends_to_beam_search_at_low_temperature(converted, library):
    """--num-beams 2 --do-sample crashed ("Fewer non-zero entries in p than size"). As the temperature goes to 0,
    HF's beam sampling draws the candidates in score order, i.e. becomes beam search."""
    out = run_cli("chat", converted, "--image", SMALL, "--query", "hi", "--num-beams", "2", "--do-sample",
                  "--temperature", "1e-4", "--top-p", "1", "--top-k", "0", "--seed", "0", *GREEDY)
    assert out.returncode == 0, out.stderr
    beams, _ = lib_chat(library, "hi", [SMALL], num_beams=2)
    assert out.stdout == beams + "\n"
    warm = run_cli("chat", converted, "--image", SMALL, "--query", "hi", "--num-beams", "2", "--do-sample",
                   "--seed", "0", *GREEDY)  # default top-p 0.8 keeps few tokens per beam: the original crash
    assert warm.returncode == 0, warm.stderr


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """Copies of the golden safetensors checkpoint with NaN in one tensor: a decoder layer, the vision tower."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = {}
    for name, key in (("layer1", "model.layers.1.feed_forward.w2.weight"),
                      ("vision", "vit.vision_tower.vision_model.encoder.layers.0.mlp.fc2.weight")):
        d = tmp_path_factory.mktemp(f"nan-{name}")
        shutil.copytree(GOLDEN_ST, d, dirs_exist_ok=True)
        with open(os.path.join(d, "model.safetensors.index.json"), encoding="utf-8") as f:
            shard = os.path.join(d, json.load(f)["weight_map"][key])
        tensors = load_file(shard)
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = torch.nan
        save_file(tensors, shard, metadata={"format": "pt"})
        out[name] = str(d)
    return out


@pytest.mark.parametrize("name, stage", [("layer1", "decoder layer 1"),
                                         ("vision", "the image embeddings (vision tower or projector)")])
def test_nan_weights_are_reported_with_the_first_non_finite_stage(poisoned, name, stage):
    out = run_cli("chat", poisoned[name], "--image", SMALL, "--query", "hi", *GREEDY)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.splitlines()[-1] == (
        f"error: the model produced NaN/Inf logits in the prefill; the first non-finite output is {stage}. The "
        "weights may hold NaN/Inf (`ms-xcomposer convert --check-finite` finds them), or the compute dtype "
        "overflowed (float16: try float32)")
    assert out.stdout.strip() == ""


# ---- info --estimate ----------------------------------------------------------------------------------------
def test_info_estimate_counts_weights_and_cache_from_the_checkpoint_facts():
    """Weights: every tensor the safetensors library finds (the model allocates exactly these); the KV cache and
    the prompt from the golden case's facts (CASE.md: 2 layers, 2 KV heads of 64; 400 rows per 560-px tile, a
    20-row separator per tile row, one between the views). The activation is judged by test_memory.py."""
    shapes = _safetensors_params(GOLDEN_ST)
    weights = sum(int(np.prod(s)) for s in shapes.values()) * 4
    out = run_cli("info", GOLDEN_ST, "--estimate", "--hd-num", "4", "--max-new-tokens", "100", "--dtype", "float32",
                  "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    rows = (4 + 1) * 400 + 1 + (4 + 1) * 20 + 256  # the worst 4-tile layout, a 4x1 strip, and 256 text rows
    capacity = -(-(rows + 100) // 256) * 256
    assert (d["weights"], d["prompt_rows"], d["capacity"]) == (weights, rows, capacity)
    assert d["kv_cache"] == 2 * 2 * 2 * capacity * 64 * 4
    assert d["total"] == d["weights"] + 2 * d["kv_cache"] + d["activation"]
    text = run_cli("info", GOLDEN_ST, "--estimate", "--hd-num", "4", "--max-new-tokens", "100", "--dtype",
                   "float32", timeout=120).stdout.splitlines()
    assert text[0].endswith("IXC-2.5, memory of one chat (float32 weights and compute, batch 1): one image "
                            f"(hd_num 4, 4x1 tiles: {rows - 256} rows) + 256 text rows, 100 new tokens")
    assert [line.split()[0] for line in text[1:]] == ["weights", "KV", "peak", "loading", "total"]
    bad = run_cli("info", GOLDEN_ST, "--hd-num", "4", timeout=120)
    assert (bad.returncode, bad.stderr) == (2, "error: --hd-num applies only with --estimate\n")


# ---- examples without torch ---------------------------------------------------------------------------------
NO_TORCH = ("import importlib.machinery as machinery, runpy, sys\n"
            "class NoTorch(machinery.PathFinder):  # torch and transformers look not installed\n"
            "    @classmethod\n"
            "    def find_spec(cls, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'transformers'):\n"
            "            return None\n"
            "        return super().find_spec(name, path, target)\n"
            "sys.meta_path = [NoTorch if f is machinery.PathFinder else f for f in sys.meta_path]\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def test_parity_example_without_torch_is_one_line():
    env = {k: v for k, v in os.environ.items() if k != "GLOG_v"}
    script = os.path.join(ROOT, "examples", "parity_check.py")
    out = subprocess.run([sys.executable, "-c", NO_TORCH, script, GOLDEN_BIN, "--image", SMALL, "--steps", "1"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert out.stderr == ("error: parity needs torch and transformers for the PyTorch side: "
                          "pip install 'ms-xcomposer[parity]'\n")
