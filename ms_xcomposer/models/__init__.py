"""MindSpore Cells of the XComposer2 family; parameter names equal the HF state-dict keys."""
