"""LoRA² as an sd-scripts (kohya-ss) training backend.

- :mod:`lora2_train.kohya.network`: the network module (``--network_module lora2_train.kohya.network``).
- :mod:`lora2_train.kohya.train`: trainer extension adding λ_r·L_reg + λ_e·L_entropy to sd-scripts' SDXL loss.
- :mod:`lora2_train.kohya.launch`: ``train_sd_scripts(...)``, config writing, progress parsing, the ``train`` command.
- :mod:`lora2_train.kohya.tokenizers`: an offline tokenizer folder for ``--tokenizer_cache_dir``.
"""
