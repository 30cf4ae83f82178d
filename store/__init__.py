"""What training and serving both read and write: checkpoints with their manifest, tokenizers and text data.

Sits below `train/` and `serve/` (both import it, it imports neither) and above `models/`
and `mpx/`.
"""
