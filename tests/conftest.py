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


def unet_inputs(unet, batch=2, size=8, tokens=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    return (torch.randn(batch, c.in_channels, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randn(batch, tokens, c.context_dim, generator=g), torch.randn(batch, c.adm_in_channels, generator=g))
