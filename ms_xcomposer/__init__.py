"""ms-xcomposer: the InternLM-XComposer2 family (IXC2-VL-7B, IXC2-4KHD-7B, IXC-2.5-7B) on MindSpore."""
__version__ = "0.1.0"
