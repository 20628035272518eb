"""The LLaVA-1.5 family (llava-hf `LlavaForConditionalGeneration` checkpoints): config and key layouts,
CLIPImageProcessor-equal preprocessing, the LLaMA SentencePiece tokenizer and the conversation format."""
