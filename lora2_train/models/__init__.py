"""Random-weight SDXL-family UNets for tests, the demo and benchmarks (no weights are downloaded)."""
from .sdxl_unet import SDXLUNet, UNetConfig, koala_700m_config, reduced, sdxl_config

__all__ = ["SDXLUNet", "UNetConfig", "sdxl_config", "koala_700m_config", "reduced"]
