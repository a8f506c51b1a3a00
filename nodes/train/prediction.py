"""What a ComfyUI MODEL predicts and with which noise schedule (the trainer's target and schedule)."""
from __future__ import annotations


def model_sampling(model):
    """The ModelPatcher's model_sampling, object patches (ComfyUI's ModelSamplingDiscrete node) included."""
    get = getattr(model, "get_model_object", None)
    if get is not None:
        try:
            return get("model_sampling")
        except (AttributeError, KeyError):
            pass
    patched = getattr(model, "object_patches", {}).get("model_sampling")
    return patched if patched is not None else model.model.model_sampling


def prediction_of(model):
    """(prediction_type, zero_terminal_snr, model_sampling) of a ComfyUI model: ε or v from its sampling
    class, zero terminal SNR when the last discrete σ says ᾱ_T ≈ 0.  Other kinds are refused."""
    import comfy.model_sampling as S

    ms = model_sampling(model)
    denoise = getattr(type(ms), "calculate_denoised", None)
    discrete = isinstance(ms, S.ModelSamplingDiscrete) and getattr(ms, "sigmas", None) is not None
    kinds = {getattr(S, "EPS").calculate_denoised: "epsilon",
             getattr(S, "V_PREDICTION").calculate_denoised: "v_prediction"}
    if not discrete or denoise not in kinds:
        raise ValueError(f"Train LoRA² (SDXL): embedded training needs an ε- or v-prediction model with a discrete "
                         f"noise schedule; this one samples with {type(ms).__name__}")
    sigma_last = float(ms.sigmas[-1])
    return kinds[denoise], 1.0 / (1.0 + sigma_last ** 2) < 1e-6, ms


def schedule_of(base, sampling=None):
    """The trainer's DDPM schedule taken from the model's discrete sigmas (``DDPMSchedule.from_sigmas``)."""
    from lora2_train.objective import DDPMSchedule

    return DDPMSchedule.from_sigmas(getattr(sampling if sampling is not None else base.model_sampling, "sigmas",
                                            None))
