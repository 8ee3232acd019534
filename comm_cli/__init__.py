"""comm: compose language models with CALM and train only the bridges.

The composition core (``comm_cli.compose``) is plain PyTorch; Hydra, Accelerate and W&B
live at the edges (``comm_cli.train``, ``comm_cli.eval``).
"""

__version__ = "0.1.0"
