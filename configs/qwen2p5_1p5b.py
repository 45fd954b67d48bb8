"""The paper's 1.5b pair: Qwen2.5 base vs DeepSeek-R1-Distill-Qwen-1.5b (see configs/paper.py).

    python launch/pipeline.py --config=configs/qwen2p5_1p5b.py --workdir=runs/qwen2p5_1p5b

Needs hub access (or set --config.models.base/distilled to local paths and
--config.data.sources to local files) and an accelerator: pip install -e ".[cuda12]".
"""

import os
import sys

# Config files are loaded by path; the repo root makes `configs` importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import paper  # noqa: E402


def get_config(arg=None):
    return paper.get_config("1.5b")
