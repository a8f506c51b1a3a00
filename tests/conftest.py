import pytest
import torch

from lora2_train.models import SDXLUNet, koala_700m_config, reduced, sdxl_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_sdxl():
    """Reduced-width SDXL UNet (full block structure: 70 transformer blocks)."""
    torch.manual_seed(0)
    return SDXLUNet(reduced(sdxl_config())).requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_koala():
    torch.manual_seed(0)
    return SDXLUNet(reduced(koala_700m_config())).requires_grad_(False)
