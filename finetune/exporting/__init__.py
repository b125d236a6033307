"""A checkpoint as deployable files: ONNX, TorchScript, safetensors (`formats`), a timm / Hugging Face hub
folder (`hub`), each checked against the network it came from."""
