"""Pure per-architecture name and layout mappings between Megatron and Hugging Face."""
