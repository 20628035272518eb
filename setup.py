"""Packaging for ms-xcomposer: a MindSpore port of InternLM-XComposer2 (VL, 4KHD, 2.5), and LLaVA-1.5."""
from setuptools import find_packages, setup

setup(
    name="ms-xcomposer",
    version="0.1.0",
    description="InternLM-XComposer2 family (IXC2-VL, IXC2-4KHD, IXC-2.5) on MindSpore",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["ms_xcomposer", "ms_xcomposer.*"]),
    package_data={"ms_xcomposer": ["assets/*"]},
    install_requires=[
        "mindspore==2.10.0",
        "numpy<2",
        "pillow>=10.1",
        "sentencepiece",
        "protobuf",  # llava-hf tokenizers (legacy=false) edit the SentencePiece normaliser, as transformers
        "safetensors",
        "ml_dtypes",
        "tqdm",
        "psutil",
    ],
    extras_require={
        # The PyTorch side of parity checks: the project's reference model and HF's CLIPVisionModel.
        "parity": ["torch==2.13.0", "transformers==4.57.1"],
        # Video files for IXC-2.5 chat (lists of frames and GIFs need nothing extra).
        "video": ["av"],
        # `ms-xcomposer serve`: the OpenAI-compatible HTTP server.
        "serve": ["fastapi", "uvicorn"],
        "test": ["pytest", "torch==2.13.0", "transformers==4.57.1", "av", "fastapi", "uvicorn", "openai"],
    },
    entry_points={"console_scripts": ["ms-xcomposer=ms_xcomposer.cli:main"]},
)
