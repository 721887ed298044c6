import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/hf_models.py


@pytest.fixture(scope="session")
def hf_dir_factory(tmp_path_factory):
    """Make (and cache per session) a tiny random-init HF model directory."""
    from hf_models import make_hf_model

    made = {}

    def make(arch="qwen2", **overrides):
        key = (arch, repr(sorted(overrides.items())))
        if key not in made:
            d = tmp_path_factory.mktemp(f"hf_{arch}")
            made[key] = (d, make_hf_model(d, arch, **overrides))
        return made[key]

    return make
