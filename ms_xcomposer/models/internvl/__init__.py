"""InternVL-1.5 building blocks (InternViT, pixel shuffle + mlp1, tiling, config, prompt) as MindSpore Cells
and numpy/PIL helpers; parameter names equal the HF keys of `InternVLChatModel` checkpoints."""
