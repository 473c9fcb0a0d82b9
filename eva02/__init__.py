"""EVA-02 vision transformers in PyTorch."""
