import os

import pytest
import torch

os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


if os.environ.get("LXAI_BATCH_ON_CPU") == "1":  # run the suite's training flows through the GPU's batched path
    from lightning_xai.quantization import batched

    batched.BATCH_ON_CPU = True
