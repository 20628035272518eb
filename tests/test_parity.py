"""The parity harness (`ms_xcomposer.parity`, `ms-xcomposer parity`) on the golden IXC-2.5 checkpoint.

It must pass on the real conversion path (HF dir as the PyTorch side, the converted MindSpore dir), in both
MindSpore modes, and fail naming `layer 1` when one weight of decoder layer 1 is changed on the MindSpore side
only. Measured (PyNative and GRAPH alike, image_small.png, 854-row prompt): vision tower 6.2e-6 max abs,
projector 4.8e-6, layer 0 8.4e-5, layer 1 1.6e-4, logits 1.6e-4 (rel <= 4e-6); greedy tokens identical.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ms_xcomposer.cli import main  # noqa: E402
from ms_xcomposer.models.xcomposer2.parity import IMAGE_STAGES, load_torch_side  # noqa: E402
from ms_xcomposer.parity import ParityError, ParityReport, compare, compare_tokens, run_parity  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "ixc25_tiny")
HF = os.path.join(DATA, "hf")
IMAGE = os.path.join(DATA, "image_small.png")  # 400x300: one 560 tile, 841 image rows
STEPS = 4
LLM_STAGES = ["embeddings", "layer 0", "layer 1", "logits", "greedy tokens"]
ALL_STAGES = list(IMAGE_STAGES) + LLM_STAGES
CORRUPTED_KEY = "model.layers.1.feed_forward.w2.weight"


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory) -> str:
    """The safetensors copy of the checkpoint with layer 1's w2 scaled by 1.05 (bf16, like the rest)."""
    from safetensors.torch import load_file, save_file

    src = os.path.join(DATA, "hf_safetensors")
    dst = str(tmp_path_factory.mktemp("parity") / "corrupted")
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "model.safetensors.index.json"), encoding="utf-8") as f:
        shard = os.path.join(dst, json.load(f)["weight_map"][CORRUPTED_KEY])
    tensors = load_file(shard)
    tensors[CORRUPTED_KEY] = (tensors[CORRUPTED_KEY].float() * 1.05).to(tensors[CORRUPTED_KEY].dtype)
    save_file(tensors, shard, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def with_remote_code(tmp_path_factory) -> str:
    """The HF checkpoint (linked) plus a `modeling_*.py`, as real repos carry: remote code that is never run."""
    dst = tmp_path_factory.mktemp("parity") / "remote"
    dst.mkdir()
    for name in os.listdir(HF):
        os.symlink(os.path.abspath(os.path.join(HF, name)), dst / name)
    (dst / "modeling_internlm_xcomposer2.py").write_text("raise RuntimeError('remote code must not run')\n")
    return str(dst)


def test_golden_case_passes(converted):
    report = run_parity(HF, converted, [IMAGE], steps=STEPS)
    assert [s.stage for s in report.stages] == ALL_STAGES
    assert report.passed and report.first_failure is None, report.format_table()
    assert report.torch_side == "reference" and report.mode == "pynative"
    assert report.tolerance_key == ("float32", "float32")
    assert report.inputs["image_tokens"] == 841 and report.inputs["prompt_length"] == 854
    assert "not an independent check" in report.stage("pixels").note
    # Both sides really computed: differences are rounding-sized, not zero.
    for stage in ("vision tower", "projector", "layer 1", "logits"):
        assert report.stage(stage).max_abs > 0
    assert report.tokens["mindspore"] == report.tokens["pytorch"] and len(report.tokens["pytorch"]) == STEPS


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m ms_xcomposer ARGS` in a fresh process: the command selects the MindSpore device, which a
    process can do only before its first kernel."""
    return subprocess.run([sys.executable, "-m", "ms_xcomposer", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_cli_passes_in_graph_mode(with_remote_code, tmp_path):
    """GRAPH mode through the CLI; `--reference` picks the project's reference although remote code is there."""
    out_json = tmp_path / "report.json"
    run = run_cli("parity", with_remote_code, "--reference", "--image", IMAGE, "--steps", str(STEPS),
                  "--mode", "graph", "--json", str(out_json))
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"parity: all {len(ALL_STAGES)} stages pass" in run.stdout
    data = json.loads(out_json.read_text())
    assert data["passed"] is True and data["first_failure"] is None and data["mode"] == "graph"
    assert [s["stage"] for s in data["stages"]] == ALL_STAGES
    assert all(s["passed"] for s in data["stages"])


def test_corrupted_layer_is_named(corrupted, tmp_path):
    out_json = tmp_path / "report.json"
    run = run_cli("parity", HF, "--ms-dir", corrupted, "--image", IMAGE, "--steps", str(STEPS),
                  "--json", str(out_json))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "first diverging stage: layer 1" in run.stdout
    data = json.loads(out_json.read_text())
    assert data["passed"] is False and data["first_failure"] == "layer 1"
    by_name = {s["stage"]: s for s in data["stages"]}
    before = ALL_STAGES[:ALL_STAGES.index("layer 1")]
    assert all(by_name[name]["passed"] for name in before)  # the image side and layer 0 are untouched
    assert by_name["layer 1"]["rel_frobenius"] > 1e-3 and not by_name["logits"]["passed"]
    # re-judged against the reference's float64 run: still far (the rerun works for this family)
    assert by_name["layer 1"]["rule"] == "failed" and by_name["layer 1"]["float64"]["pytorch_dtype"] == "float32"
    assert by_name["layer 1"]["float64"]["mindspore"] > 1.5 * by_name["layer 1"]["float64"]["pytorch"]


def test_text_only_prompt():
    """No image: the official text-only prompt (ids start [1, 1]); only the language-model stages."""
    report = run_parity(HF, query="Hello", steps=2)
    assert [s.stage for s in report.stages] == LLM_STAGES
    assert report.passed, report.format_table()
    assert report.inputs["image_tokens"] == 0


def test_remote_code_needs_the_flag(with_remote_code, capsys):
    """Refused before anything is loaded (the planted modeling file would raise if it were run)."""
    with pytest.raises(ParityError, match="--trust-remote-code"):
        load_torch_side(with_remote_code)
    assert main(["parity", with_remote_code, "--image", IMAGE]) == 2
    err = capsys.readouterr().err
    assert "modeling_internlm_xcomposer2.py" in err and "--trust-remote-code" in err and "--reference" in err


def test_bad_input_exits_2(tmp_path, capsys):
    assert main(["parity", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["parity", HF, "--image", str(tmp_path / "missing.png")]) == 2
    assert "missing.png does not exist" in capsys.readouterr().err
    for usage in (["--steps", "0"], ["--reference", "--trust-remote-code"]):
        with pytest.raises(SystemExit) as exc:
            main(["parity", HF, *usage])
        assert exc.value.code == 2
    with pytest.raises(ParityError, match="steps must be a positive integer"):
        run_parity(HF, steps=0)


def test_report_logic():
    """Stage verdicts, first failure in pipeline order, shape mismatches and token differences, JSON."""
    key = ("float32", "float32")
    x = np.linspace(-3, 3, 64, dtype=np.float32).reshape(8, 8)
    ok = compare("layer 0", x + 1e-6, x, key)
    assert ok.passed and ok.tolerance == (1e-4, 1e-5)
    # allclose with atol x max(1, RMS): 1.2e-4 off passes for [3.0] (bound 3e-4 + 3e-5) and fails for [1.0]
    # (bound 1e-4 + 1e-5); NaN never passes.
    assert compare("large", np.float32([3.0]) + 1.2e-4, np.float32([3.0]), key).passed
    assert not compare("small", np.float32([1.0]) + 1.2e-4, np.float32([1.0]), key).passed
    assert not compare("nan", np.float32([np.nan]), np.float32([1.0]), key).passed
    bad = compare("layer 1", x * 1.01, x, key)
    shape = compare("logits", x[:4], x, key)
    assert not bad.passed and not shape.passed and "shape mismatch" in shape.note
    tokens = compare_tokens([5, 6, 7], [5, 6, 8])
    assert not tokens.passed and tokens.max_abs == 1 and "step 2" in tokens.note
    assert compare_tokens([5, 6], [5, 6]).passed and not compare_tokens([5], [5, 6]).passed
    report = ParityReport([ok, bad, shape, tokens], "reference", key, "pynative")
    assert not report.passed and report.first_failure.stage == "layer 1"
    data = json.loads(report.to_json())
    assert data["first_failure"] == "layer 1" and data["stages"][2]["max_abs"] is None  # inf is not JSON
    assert "FAIL" in report.format_table().splitlines()[2]


def test_float64_rule():
    """`tolerances.judge` on arrays whose distances are known: the row against the PyTorch run first; missing it,
    the row against the float64 run, then FLOAT64_FACTOR x the reference's own distance from float64."""
    from ms_xcomposer.tolerances import FLOAT64_FACTOR, judge

    fp32, fp16 = ("float32", "float32"), ("float16", "float16")
    exact = np.linspace(-3, 3, 64).reshape(8, 8)
    torch32 = exact + 1e-3  # an ill-conditioned model: PyTorch fp32 itself is 1e-3 from exact (row: 1.3e-4 here)
    assert judge(exact + 1e-5, exact, fp32, exact, torch32).rule == "row"
    near = judge(torch32 + 5e-5, torch32, fp32)  # no float64 run: the row alone
    assert near.passed and near.rule == "row" and near.ours is None
    assert judge(exact + 2e-3, torch32, fp32).rule == "failed"
    assert judge(exact + 5e-5, torch32, fp32, exact).rule == "row vs float64"
    ill = judge(exact - 1.2e-3, torch32, fp32, exact)  # the reference defaults to the fp32 run compared
    assert ill.passed and ill.rule == "ill-conditioned" and ill.reference_dtype == "float32"
    assert np.isclose(ill.ours, 1.2e-3) and np.isclose(ill.reference, 1e-3)
    assert "ill-conditioned: PyTorch float32 itself is 0.001 from float64, MindSpore 0.0012" in ill.explain()
    far = judge(exact + 1e-3 * (FLOAT64_FACTOR + 0.1), torch32, fp32, exact)
    assert not far.passed and far.rule == "failed" and "failed against float64 too" in far.explain()
    # fp16 compute: the reference's own fp16 run is the measure, and it is required
    torch16 = exact + 0.1
    assert judge(exact - 0.12, torch32, fp16, exact, torch16).rule == "ill-conditioned"
    assert judge(exact - 0.2, torch32, fp16, exact, torch16).rule == "failed"
    with pytest.raises(ValueError, match="float16 compute needs the reference's own float16 run"):
        judge(exact - 0.12, torch32, fp16, exact)


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory) -> str:
    """A tiny random IXC-2.5 HF directory (hidden 64, 32-wide 1-layer ViT on 560 tiles) with the golden tokenizer:
    cheap enough for prompts with several images."""
    from safetensors.torch import save_file

    from ms_xcomposer.models.xcomposer2.config import TASK_ADAPTERS, LLMConfig, VisionConfig, XComposerConfig
    from ms_xcomposer.conversion.synthetic import hf_config_dict
    from ms_xcomposer.reference import ReferenceXComposer2

    cfg = XComposerConfig(
        variant="ixc2.5", proj_hidden=64, task_adapters=TASK_ADAPTERS,
        llm=LLMConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=1000, rope_scaling={"type": "dynamic", "factor": 2.0},
                      max_position_embeddings=4096),
        vision=VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64,
                            image_size=560))
    dst = tmp_path_factory.mktemp("parity") / "small"
    dst.mkdir()
    state = {k: v.to(torch.bfloat16) for k, v in ReferenceXComposer2.random_state_dict(cfg, seed=3).items()}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        shutil.copy(os.path.join(HF, name), dst / name)
    return str(dst)


def test_two_images(small_hf):
    """Several images: per-image stages named by position, IXC-2.5's forced hd_num 6 (the tall image gets a 2x2
    grid), the images spliced where the query's placeholders are."""
    tall = os.path.join(DATA, "image_tall.png")
    report = run_parity(small_hf, images=[IMAGE, tall], query="A <ImageHere> and B <ImageHere>: which is taller?",
                        steps=2)
    per_image = [f"{stage} (image {i})" for i in (1, 2) for stage in IMAGE_STAGES]
    assert [s.stage for s in report.stages] == per_image + LLM_STAGES
    assert report.passed, report.format_table()
    assert report.inputs["hd_num"] == 6 and report.inputs["image_tokens"] == 841 + 2061
