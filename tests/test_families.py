"""Model families as plug-ins: the registry, and a toy family defined only in tests/ (toy_family.py,
toy_modeling.py) that converts, loads and generates through `load`, `chat` and the CLI.

Judges: the project's PyTorch reference decoder (the toy's weights are the reference's LLM weights, so its
logits and greedy tokens must match), the source tensors (`verify`), and the library chat (for the CLI).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import save_file  # noqa: E402

import toy_family  # noqa: E402
from conftest import MODES, mindspore_mode  # noqa: E402
from helpers_checkpoints import GOLDEN_BIN  # noqa: E402
from ms_xcomposer import chat, load  # noqa: E402
from ms_xcomposer.config import ConfigError  # noqa: E402
from ms_xcomposer.conversion.writers import copy_side_files  # noqa: E402
from ms_xcomposer.families import (  # noqa: E402
    family_for_hf_config, family_for_section, family_named, register_family, unregister_family,
)
from ms_xcomposer.models.xcomposer2.config import preset  # noqa: E402
from ms_xcomposer.reference import ReferenceXComposer2  # noqa: E402
from tolerances import assert_close  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
QUERY = "Hello, who are you?"


# ---- the registry -----------------------------------------------------------------------------------------
def test_lookup_by_architecture_and_recorded_name():
    assert family_for_hf_config({"architectures": ["InternLMXComposer2ForCausalLM"]}).name == "xcomposer2"
    assert family_for_section({"variant": "ixc2.5"}).name == "xcomposer2"  # converted before families existed
    with pytest.raises(ConfigError, match=r"cfg/config.json: architectures \['LlamaForCausalLM'\] are not supported"):
        family_for_hf_config({"architectures": ["LlamaForCausalLM"]}, "cfg/config.json")
    with pytest.raises(ConfigError, match="has no 'architectures' list"):
        family_for_hf_config({"model_type": "x"})
    with pytest.raises(ConfigError, match="unknown model family 'nope'"):
        family_named("nope")


def test_registering_twice_is_refused():
    register_family(toy_family.FAMILY)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_family(toy_family.FAMILY)
    finally:
        unregister_family("toy")
    with pytest.raises(ConfigError):
        family_named("toy")


def test_parameter_shapes_come_from_the_cells():
    """The converter's expectations are the Cells' parameters; vision_proj.2 maps proj_hidden to the LLM width
    (a config where the two differ: they are equal in every released checkpoint)."""
    import dataclasses

    cfg = dataclasses.replace(preset("tiny-ixc2.5"), proj_hidden=384)
    shapes = family_named("xcomposer2").parameter_shapes(cfg)
    assert shapes["vision_proj.0.weight"] == (384, 512) and shapes["vision_proj.2.weight"] == (256, 384)
    state = ReferenceXComposer2.random_state_dict(cfg, 0)
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes  # the independent reference agrees


# ---- the toy family, end to end ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(HF dir, converted dir, reference model): the reference's LLM weights in the toy's HF layout."""
    root = tmp_path_factory.mktemp("toy")
    xc = preset("tiny-ixc2.5")
    reference = ReferenceXComposer2.from_pretrained(ReferenceXComposer2.random_state_dict(xc, 3), xc).eval()
    state = {("lm_head.weight" if k == "output.weight" else k): v.contiguous()
             for k, v in reference.state_dict().items() if k.startswith(("model.", "output."))
             and ".Plora_" not in k and ".lora_" not in k}
    state["model.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(8)  # a buffer the key table drops
    hf = root / "hf"
    hf.mkdir()
    save_file(state, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps(toy_family.hf_config(xc.llm)))
    copy_side_files(GOLDEN_BIN, str(hf))
    register_family(toy_family.FAMILY)
    yield str(hf), str(root / "ms"), reference
    unregister_family("toy")


def run_cli(*args):
    env = dict(os.environ, MS_XCOMPOSER_FAMILIES="toy_family",
               PYTHONPATH=os.pathsep.join([TESTS, ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "ms_xcomposer", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


def test_toy_converts_with_its_key_table(toy):
    hf, ms_dir, _ = toy
    done = run_cli("convert", hf, ms_dir)
    assert done.returncode == 0, done.stderr
    with open(os.path.join(ms_dir, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["ms_xcomposer"]["family"] == "toy"
    with open(os.path.join(ms_dir, "conversion_report.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert {"from": "lm_head.weight", "to": "output.weight", "transform": "none"} in report["renamed"]
    assert [d["name"] for d in report["dropped"]] == ["model.layers.0.attention.rotary_emb.inv_freq"]
    verified = run_cli("verify", hf, ms_dir)
    assert verified.returncode == 0 and "OK" in verified.stdout, verified.stdout + verified.stderr
    info = run_cli("info", ms_dir)
    assert info.returncode == 0 and "family: toy (a text-only toy family defined in the tests)" in info.stdout


@pytest.mark.parametrize("mode", sorted(MODES))
def test_toy_loads_and_generates_as_the_reference(toy, mode):
    hf, ms_dir, reference = toy
    if not os.path.isdir(ms_dir):
        assert run_cli("convert", hf, ms_dir).returncode == 0
    with mindspore_mode(mode):
        model, processor = load(ms_dir)
        assert type(model).__name__ == "ToyForCausalLM" and not hasattr(model.model.layers[0].attention.wqkv,
                                                                          "Plora_A")  # rank 0: a plain linear
        ids = processor.tokenizer.encode(processor.prompt(QUERY), add_bos=True)
        logits = model(input_ids=np.asarray([ids], np.int32)).logits
        response, history = chat(model, processor, QUERY, max_new_tokens=6)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids])).logits
        greedy = reference.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                    dtype=torch.long), do_sample=False, max_new_tokens=6, eos_token_id=2,
                                    pad_token_id=2)[0, len(ids):].tolist()
    assert_close(logits, expected, ("float32", "float32"), f"toy logits ({mode})")
    assert response == processor.decode(greedy) and history == [(QUERY, response)]


def test_toy_chats_through_the_cli(toy):
    hf, ms_dir, _ = toy
    if not os.path.isdir(ms_dir):
        assert run_cli("convert", hf, ms_dir).returncode == 0
    done = run_cli("chat", ms_dir, "--query", QUERY, "--max-new-tokens", "6")
    assert done.returncode == 0, done.stderr
    model, processor = load(ms_dir)
    expected, _ = chat(model, processor, QUERY, max_new_tokens=6)
    assert done.stdout == expected + "\n"
    refused = run_cli("chat", ms_dir, "--query", QUERY, "--hd-num", "4")
    assert refused.returncode == 2 and "the toy family takes no options, got ['hd_num']" in refused.stderr
